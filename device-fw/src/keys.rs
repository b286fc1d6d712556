//! Key files: Ed25519 signing keys (vendor and patch authority) and X25519 keys (bundle
//! encryption). One line of text each: `hilrig-<kind> <64 hex digits>`. Secret key
//! files are created with mode 0600 and never overwritten; secret key files readable
//! or writable by group/other are refused when read.

use ed25519_dalek::{SigningKey, VerifyingKey};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A key-file problem, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// I/O.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Malformed contents.
    #[error("key file {path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Refused before reading: a secret key file others can read or write, not a
    /// regular file, or too large (the message names the file and its mode).
    #[error("key file {0}")]
    Insecure(hilrig_device::secure::SecureFileError),
    /// No randomness.
    #[error("no randomness from the OS: {0}")]
    Random(String),
}

/// The kinds of key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// Ed25519 secret (signing) key.
    SignSecret,
    /// Ed25519 public (verifying) key.
    SignPublic,
    /// X25519 secret key.
    BoxSecret,
    /// X25519 public key.
    BoxPublic,
}

impl KeyKind {
    fn tag(self) -> &'static str {
        match self {
            KeyKind::SignSecret => "hilrig-ed25519-secret",
            KeyKind::SignPublic => "hilrig-ed25519-public",
            KeyKind::BoxSecret => "hilrig-x25519-secret",
            KeyKind::BoxPublic => "hilrig-x25519-public",
        }
    }
}

/// 32 random bytes from the OS.
pub fn random32() -> Result<[u8; 32], KeyError> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(b)
}

/// Write a key file; refuses to replace an existing one. Secret keys get mode 0600.
pub fn write_key(path: &Path, kind: KeyKind, key: &[u8; 32]) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let secret = matches!(kind, KeyKind::SignSecret | KeyKind::BoxSecret);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io)?;
    writeln!(f, "{} {}", kind.tag(), hex::encode(key)).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Largest key file read (one line of about 90 bytes).
pub const MAX_KEY_FILE: u64 = 4096;

/// Check a secret key file: a regular file that group and others can neither read
/// nor write (a symlink is followed and its target's mode checked).
pub fn check_secret_file(path: &Path) -> Result<(), KeyError> {
    hilrig_device::secure::check_secret_file(path).map_err(KeyError::Insecure)
}

/// Read a key file of `kind`. Secret key files must be private (mode 0600 or
/// stricter, see [`check_secret_file`]); public ones (trust anchors) must be
/// owned by us or root and not group/other-writable
/// ([`hilrig_device::secure::read_trusted_file`]); every key file is read with a
/// bound.
pub fn read_key(path: &Path, kind: KeyKind) -> Result<[u8; 32], KeyError> {
    let secret = matches!(kind, KeyKind::SignSecret | KeyKind::BoxSecret);
    let text = if secret {
        hilrig_device::secure::read_secret_file(path, MAX_KEY_FILE)
    } else {
        hilrig_device::secure::read_trusted_file(path, MAX_KEY_FILE)
    }
    .map_err(KeyError::Insecure)?;
    let bad = |reason: String| KeyError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let mut parts = text.split_whitespace();
    let tag = parts.next().unwrap_or("");
    if tag != kind.tag() {
        return Err(bad(format!(
            "starts with {tag:?}, expected {:?}",
            kind.tag()
        )));
    }
    let hexkey = parts
        .next()
        .ok_or_else(|| bad("no key after the tag".into()))?;
    let bytes = hex::decode(hexkey).map_err(|e| bad(format!("key is not hex: {e}")))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| bad(format!("key has {} bytes, expected 32", b.len())))
}

/// Generate an Ed25519 key pair into `<prefix>.key` and `<prefix>.pub`.
pub fn keygen_sign(prefix: &Path) -> Result<VerifyingKey, KeyError> {
    let sk = SigningKey::from_bytes(&random32()?);
    let pk = sk.verifying_key();
    write_key(
        &with_ext(prefix, "key"),
        KeyKind::SignSecret,
        &sk.to_bytes(),
    )?;
    write_key(&with_ext(prefix, "pub"), KeyKind::SignPublic, pk.as_bytes())?;
    Ok(pk)
}

/// Generate an X25519 key pair into `<prefix>.key` and `<prefix>.pub`.
pub fn keygen_box(prefix: &Path) -> Result<[u8; 32], KeyError> {
    let sk = x25519_dalek::StaticSecret::from(random32()?);
    let pk = x25519_dalek::PublicKey::from(&sk);
    write_key(&with_ext(prefix, "key"), KeyKind::BoxSecret, &sk.to_bytes())?;
    write_key(&with_ext(prefix, "pub"), KeyKind::BoxPublic, pk.as_bytes())?;
    Ok(*pk.as_bytes())
}

/// `prefix` with `.ext` appended.
pub fn with_ext(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_os_string();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Read an Ed25519 signing key.
pub fn signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    Ok(SigningKey::from_bytes(&read_key(
        path,
        KeyKind::SignSecret,
    )?))
}

/// Read an Ed25519 verifying key (rejects invalid curve points).
pub fn verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let b = read_key(path, KeyKind::SignPublic)?;
    VerifyingKey::from_bytes(&b).map_err(|e| KeyError::Format {
        path: path.to_path_buf(),
        reason: format!("not a valid Ed25519 public key: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_round_trip_and_refusals() {
        let d = tempfile::tempdir().unwrap();
        let prefix = d.path().join("vendor");
        let pk = keygen_sign(&prefix).unwrap();
        assert_eq!(
            signing_key(&with_ext(&prefix, "key"))
                .unwrap()
                .verifying_key(),
            pk
        );
        assert_eq!(verifying_key(&with_ext(&prefix, "pub")).unwrap(), pk);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(with_ext(&prefix, "key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Never overwritten.
        assert!(keygen_sign(&prefix).is_err());
        // Wrong kind and garbage are named.
        let e = read_key(&with_ext(&prefix, "pub"), KeyKind::SignSecret).unwrap_err();
        assert!(e.to_string().contains("vendor.pub"), "{e}");
        std::fs::write(d.path().join("bad"), "hilrig-ed25519-public 1234").unwrap();
        let e = verifying_key(&d.path().join("bad")).unwrap_err();
        assert!(e.to_string().contains("2 bytes"), "{e}");
    }
}
