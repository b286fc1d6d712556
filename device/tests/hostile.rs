//! Attacks by a local user on the files hilrig-device writes and reads (issue 16).
//! Each test names its attack in its first comment.

use hilrig_device::secure::{self, SecureFileError};
use hilrig_device::state::{write_atomic, DeviceConfig, NvState};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn chmod(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

#[test]
fn state_save_does_not_follow_symlinks_planted_at_the_old_temporary_names() {
    // Attack: symlinks at the predictable temporary names (`.<name>.<pid>.tmp`, and
    // the reports' `.<name>.tmp.<pid>`) pointing at a file root owns.
    let d = tempfile::tempdir().unwrap();
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let pid = std::process::id();
    for name in [
        format!(".dev.state.{pid}.tmp"),
        format!(".dev.state.tmp.{pid}"),
        ".dev.state.tmp".to_string(),
    ] {
        std::os::unix::fs::symlink(&victim, d.path().join(name)).unwrap();
    }
    let p = d.path().join("dev.state");
    let s = NvState::factory(DeviceConfig::with_width(4), 9).unwrap();
    s.save(&p).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(NvState::load(&p).unwrap(), s);
    // Saving again (replacing the file) is just as safe.
    s.save(&p).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

#[test]
fn state_save_replaces_a_symlink_at_the_target_instead_of_writing_through_it() {
    // Attack: the state file's own name is a symlink to a victim file.
    let d = tempfile::tempdir().unwrap();
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let p = d.path().join("dev.state");
    std::os::unix::fs::symlink(&victim, &p).unwrap();
    write_atomic(&p, b"new bytes").unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(!std::fs::symlink_metadata(&p).unwrap().is_symlink());
    assert_eq!(std::fs::read(&p).unwrap(), b"new bytes");
}

#[test]
fn state_files_holding_keys_are_created_0600_whatever_the_umask() {
    // Attack: another local user reads the device key and OOB reset key from a
    // world-readable state file.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("dev.state");
    NvState::factory(DeviceConfig::default(), 3)
        .unwrap()
        .save(&p)
        .unwrap();
    assert_eq!(mode(&p), 0o600);
    // Replacing a file that was 0644 leaves a 0600 file.
    chmod(&p, 0o644);
    write_atomic(&p, b"x").unwrap();
    assert_eq!(mode(&p), 0o600);
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
}

#[test]
fn secret_key_files_readable_by_others_are_refused_and_symlinks_resolve_to_the_target_mode() {
    // Attack: a secret key file others can read (or a symlink to one) is used.
    let d = tempfile::tempdir().unwrap();
    let k = d.path().join("vendor.key");
    std::fs::write(&k, "secret\n").unwrap();
    chmod(&k, 0o644);
    let e = secure::check_secret_file(&k).unwrap_err();
    assert!(matches!(e, SecureFileError::SecretMode { mode: 0o644, .. }));
    let msg = e.to_string();
    assert!(msg.contains("vendor.key") && msg.contains("0644"), "{msg}");
    for m in [0o640, 0o604, 0o620, 0o602] {
        chmod(&k, m);
        assert!(secure::check_secret_file(&k).is_err(), "mode {m:o}");
    }
    chmod(&k, 0o600);
    assert_eq!(secure::read_secret_file(&k, 4096).unwrap(), "secret\n");
    // A symlink is followed and the target's mode checked.
    let link = d.path().join("link.key");
    std::os::unix::fs::symlink(&k, &link).unwrap();
    secure::check_secret_file(&link).unwrap();
    chmod(&k, 0o644);
    let msg = secure::check_secret_file(&link).unwrap_err().to_string();
    assert!(msg.contains("link.key") && msg.contains("0644"), "{msg}");
}

#[test]
fn a_fifo_or_device_is_refused_without_hanging() {
    // Attack: a FIFO (hangs a reader) or /dev/zero (endless bytes) given as a file.
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("fifo");
    let st = std::process::Command::new("mkfifo").arg(&fifo).status();
    match st {
        Ok(s) if s.success() => {
            let e = secure::read_bounded(&fifo, 1024).unwrap_err();
            assert!(matches!(e, SecureFileError::NotRegular { .. }), "{e}");
            assert!(e.to_string().contains("FIFO"), "{e}");
            let e = secure::read_secret_file(&fifo, 1024).unwrap_err();
            assert!(matches!(e, SecureFileError::NotRegular { .. }), "{e}");
        }
        _ => eprintln!("SKIPPED: the FIFO case (no mkfifo)"),
    }
    let e = secure::read_bounded(Path::new("/dev/zero"), 1024).unwrap_err();
    assert!(e.to_string().contains("character device"), "{e}");
}

#[test]
fn an_oversized_file_is_refused_before_it_is_read() {
    // Attack: a huge file makes a parser take all memory.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("big.toml");
    std::fs::write(&p, vec![b'#'; 2049]).unwrap();
    let e = secure::read_bounded(&p, 2048).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("big.toml") && msg.contains("2049") && msg.contains("2048"),
        "{msg}"
    );
    std::fs::write(&p, vec![b'#'; 2048]).unwrap();
    assert_eq!(secure::read_bounded(&p, 2048).unwrap().len(), 2048);
}

#[test]
fn work_directories_are_created_0700_and_foreign_or_open_ones_refused() {
    // Attack: a local user pre-creates the work directory (world-writable, or owned
    // by them, or a symlink to somewhere else) so that we write into it.
    let d = tempfile::tempdir().unwrap();
    let w = d.path().join("a/b/work");
    secure::ensure_private_dir(&w).unwrap();
    assert_eq!(mode(&w), 0o700);
    secure::ensure_private_dir(&w).unwrap();

    chmod(&w, 0o777);
    let msg = secure::ensure_private_dir(&w).unwrap_err().to_string();
    assert!(msg.contains("work") && msg.contains("0777"), "{msg}");
    chmod(&w, 0o755);
    secure::ensure_private_dir(&w).unwrap();

    let link = d.path().join("link");
    std::os::unix::fs::symlink(&w, &link).unwrap();
    let msg = secure::ensure_private_dir(&link).unwrap_err().to_string();
    assert!(msg.contains("symlink"), "{msg}");

    let me = std::fs::metadata(&w).unwrap().uid();
    if me != 0 {
        eprintln!("SKIPPED: the foreign-owner case (needs root to chown)");
        return;
    }
    let st = std::process::Command::new("chown")
        .arg("65534:65534")
        .arg(&w)
        .status();
    match st {
        Ok(s) if s.success() => {
            let msg = secure::ensure_private_dir(&w).unwrap_err().to_string();
            assert!(msg.contains("owned by uid 65534"), "{msg}");
        }
        _ => eprintln!("SKIPPED: the foreign-owner case (chown failed)"),
    }
}

#[test]
fn a_state_file_that_is_a_fifo_or_a_device_is_refused_not_read() {
    // Attack: point a VMM or the rig at a FIFO (nobody writes: the open would hang)
    // or at /dev/zero (never ends) as its device state file.
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("dev.state");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string; mkfifo has no other preconditions.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send((
            NvState::load(&fifo).map(|_| ()).map_err(|e| e.to_string()),
            NvState::load(Path::new("/dev/zero"))
                .map(|_| ())
                .map_err(|e| e.to_string()),
        ));
    });
    let (a, b) = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("loading returned (did not hang)");
    assert!(a.unwrap_err().contains("not a regular file"));
    assert!(b.unwrap_err().contains("not a regular file"));
}

#[test]
fn an_oversized_state_file_is_refused_unread() {
    // Attack: a (sparse) multi-GiB file as the state file.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("dev.state");
    std::fs::File::create(&p).unwrap().set_len(4 << 30).unwrap();
    let e = NvState::load(&p).unwrap_err().to_string();
    assert!(e.contains("larger than any state file"), "{e}");
}

#[test]
fn a_secret_key_file_another_user_owns_is_refused() {
    // Attack: a local user makes their own 0600 key file and gets root to use it (a
    // symlink from the expected key path, or a swap in a directory they can write):
    // root then MACs counters rows, signs teardown records or resets devices with a
    // key the attacker knows.
    let d = tempfile::tempdir().unwrap();
    let theirs = d.path().join("theirs.key");
    secure::write_reset_key_file(&theirs, &[7u8; 32]).unwrap();
    let link = d.path().join("reset.key");
    std::os::unix::fs::symlink(&theirs, &link).unwrap();
    // Negative control: our own 0600 key, directly or through the symlink, is fine.
    assert_eq!(secure::read_reset_key_file(&link).unwrap(), [7u8; 32]);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: the foreign-owner case (needs root to chown)");
        return;
    }
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    assert_eq!(mode(&theirs), 0o600);
    for p in [&theirs, &link] {
        let e = secure::read_reset_key_file(p).unwrap_err();
        assert!(
            matches!(e, SecureFileError::ForeignOwner { owner: 65534, .. }),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(p.to_str().unwrap()) && msg.contains("owned by uid 65534"),
            "{msg}"
        );
    }
    assert!(secure::check_secret_file(&link).is_err());
}

#[test]
fn a_directory_chain_through_a_symlink_is_checked_where_it_leads() {
    // Attack: a path of our own directories that passes through a symlink into a
    // directory all can write (0777, not sticky): the chain at the path looks fine,
    // but whoever can write where it leads can swap what is under it.
    let d = tempfile::tempdir().unwrap();
    let open = d.path().join("open");
    std::fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    let inner = open.join("inner");
    std::fs::create_dir(&inner).unwrap();
    chmod(&inner, 0o700);
    let mine = d.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    chmod(&mine, 0o700);
    std::os::unix::fs::symlink(&inner, mine.join("link")).unwrap();
    let e = secure::check_dir_chain(&mine.join("link")).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(&e, SecureFileError::UnsafeDir { path, .. } if path == &open)
            && msg.contains("writable by group or others"),
        "{msg}"
    );
    // Output files and private directories under it are refused too.
    let msg = secure::create_output_file(&mine.join("link/out.log"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains(open.to_str().unwrap()), "{msg}");
    assert!(!inner.join("out.log").exists());
    let msg = secure::ensure_private_dir(&mine.join("link/work"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains(open.to_str().unwrap()), "{msg}");
    assert!(!inner.join("work").exists());
    // Negative control: sticky, it passes (as /tmp), and so does the chain at `mine`.
    chmod(&open, 0o1777);
    secure::check_dir_chain(&mine.join("link")).unwrap();
    secure::create_output_file(&mine.join("link/out.log")).unwrap();
    secure::ensure_private_dir(&mine.join("link/work")).unwrap();
}
