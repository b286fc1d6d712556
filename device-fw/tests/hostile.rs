//! Attacks by a local user on hilrig-fw's key files (issue 16). Each test names its
//! attack in its first comment.

use hilrig_fw::keys::{self, KeyKind};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn chmod(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

#[test]
fn ed25519_secret_key_readable_by_others_is_refused() {
    // Attack: a signing key left 0644 (readable by every local user) is used anyway.
    let d = tempfile::tempdir().unwrap();
    let prefix = d.path().join("vendor");
    keys::keygen_sign(&prefix).unwrap();
    let k = keys::with_ext(&prefix, "key");
    keys::signing_key(&k).unwrap();
    chmod(&k, 0o644);
    let e = keys::signing_key(&k).unwrap_err().to_string();
    assert!(e.contains("vendor.key") && e.contains("0644"), "{e}");
    assert!(keys::check_secret_file(&k).is_err());
    chmod(&k, 0o600);
    keys::signing_key(&k).unwrap();
    keys::check_secret_file(&k).unwrap();
    // Public keys may be world-readable.
    keys::verifying_key(&keys::with_ext(&prefix, "pub")).unwrap();
}

#[test]
fn x25519_secret_key_writable_by_group_is_refused() {
    // Attack: a group-writable bundle-decryption key (a group member swaps it).
    let d = tempfile::tempdir().unwrap();
    let prefix = d.path().join("box");
    keys::keygen_box(&prefix).unwrap();
    let k = keys::with_ext(&prefix, "key");
    chmod(&k, 0o620);
    let e = keys::read_key(&k, KeyKind::BoxSecret)
        .unwrap_err()
        .to_string();
    assert!(e.contains("box.key") && e.contains("0620"), "{e}");
}

#[test]
fn symlink_to_a_secret_key_is_resolved_and_the_target_mode_checked() {
    // Attack: a private-looking symlink pointing at a world-readable key.
    let d = tempfile::tempdir().unwrap();
    let prefix = d.path().join("vendor");
    keys::keygen_sign(&prefix).unwrap();
    let k = keys::with_ext(&prefix, "key");
    let link = d.path().join("link.key");
    std::os::unix::fs::symlink(&k, &link).unwrap();
    keys::signing_key(&link).unwrap();
    chmod(&k, 0o644);
    let e = keys::signing_key(&link).unwrap_err().to_string();
    assert!(e.contains("link.key") && e.contains("0644"), "{e}");
}

#[test]
fn a_key_file_that_is_a_device_is_refused_without_reading_it() {
    // Attack: /dev/zero as a key file (an endless read).
    let e = keys::read_key(Path::new("/dev/zero"), KeyKind::SignPublic)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/dev/zero") && e.contains("not a regular file"),
        "{e}"
    );
}

#[test]
fn a_trusted_public_key_others_can_write_or_own_is_refused() {
    // Attack: the patch signing public key (`--patch-pubkey`, a trust anchor) is
    // group/other-writable, or a file another user owns (their own key, reached
    // through a symlink or swapped into a directory they write): they put their key
    // in and sign a native patch module, which the VMM (often root) then loads.
    let d = tempfile::tempdir().unwrap();
    let prefix = d.path().join("patch");
    let pk = keys::keygen_sign(&prefix).unwrap();
    let public = keys::with_ext(&prefix, "pub");
    // Negative control: root's (our) 0644 public key is trusted.
    assert_eq!(keys::verifying_key(&public).unwrap(), pk);
    chmod(&public, 0o666);
    let msg = keys::verifying_key(&public).unwrap_err().to_string();
    assert!(
        msg.contains(public.to_str().unwrap()) && msg.contains("0666") && msg.contains("write"),
        "{msg}"
    );
    chmod(&public, 0o644);
    // We own what we just made: root only if its uid is 0.
    if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&public).unwrap()) != 0 {
        eprintln!("SKIPPED: the foreign-owner case (needs root to chown)");
        return;
    }
    std::os::unix::fs::chown(&public, Some(65534), Some(65534)).unwrap();
    let link = d.path().join("trusted.pub");
    std::os::unix::fs::symlink(&public, &link).unwrap();
    for p in [&public, &link] {
        let msg = keys::verifying_key(p).unwrap_err().to_string();
        assert!(
            msg.contains(p.to_str().unwrap()) && msg.contains("owned by uid 65534"),
            "{msg}"
        );
    }
}
