//! Row integrity: every stored row carries an HMAC-SHA256 over its fields, keyed from
//! a key file, so a row edited outside the service is detected.

use crate::{Error, Result};
use hilrig_db::mac::RowKey;
pub use hilrig_db::mac::{hex32, MacInput};
use std::io::Write;
use std::path::Path;

/// The MAC key (32 bytes; the key file holds it as 64 hex digits), with the keyed
/// HMAC state computed once (hilrig-db's [`RowKey`]: HMAC-SHA256 over the
/// canonical row encoding of [`MacInput`], constant-time checks).
#[derive(Clone)]
pub struct Key(RowKey);

fn keyed(b: &[u8; 32]) -> RowKey {
    RowKey::new(b)
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A key from bytes (tests, benchmarks).
    pub fn from_bytes(b: [u8; 32]) -> Key {
        Key(keyed(&b))
    }

    /// Create a new random key file with mode 0600. Refuses to replace a file.
    pub fn init(path: &Path) -> Result<Key> {
        let err = |detail: String| Error::Key {
            path: path.to_path_buf(),
            detail,
        };
        let mut k = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut k))
            .map_err(|e| err(format!("reading /dev/urandom: {e}")))?;
        if let Some(d) = path.parent() {
            if !d.as_os_str().is_empty() {
                std::fs::create_dir_all(d)
                    .map_err(|e| err(format!("creating its directory: {e}")))?;
            }
        }
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    err(
                        "already exists; refusing to replace a key (every row's MAC depends on it)"
                            .into(),
                    )
                } else {
                    err(e.to_string())
                }
            })?;
        f.write_all(format!("{}\n", hex::encode(k)).as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| err(e.to_string()))?;
        Ok(Key(keyed(&k)))
    }

    /// Load a key file: 64 hex digits, not readable by group or others.
    pub fn load(path: &Path) -> Result<Key> {
        let err = |detail: String| Error::Key {
            path: path.to_path_buf(),
            detail,
        };
        if !path.exists() {
            return Err(err(format!(
                "no such file (create one with `hilrig counters init --key {}`)",
                path.display()
            )));
        }
        // Regular file, not readable or writable by group/other, read with a bound.
        let text = hilrig_device::secure::read_secret_file(path, 4096)
            .map_err(|e| err(format!("{e}; run chmod 600 on it")))?;
        let t = text.trim();
        let v = hex::decode(t).map_err(|e| err(format!("not hex: {e}")))?;
        if v.len() != 32 {
            return Err(err(format!("holds {} bytes; a key has 32", v.len())));
        }
        let mut k = [0u8; 32];
        k.copy_from_slice(&v);
        Ok(Key(keyed(&k)))
    }

    /// The MAC of a row of `table` with `fields` (each length-prefixed), hex.
    pub fn mac(&self, table: &str, fields: &[&[u8]]) -> String {
        self.0.mac_fields(table, fields)
    }

    /// The MAC of prepared input, hex.
    pub fn mac_input(&self, i: &MacInput) -> String {
        self.0.mac(i)
    }

    /// Check a stored MAC against prepared input (constant time).
    pub fn check_input(&self, i: &MacInput, stored: &str) -> bool {
        self.0.check(i, stored)
    }

    /// Check a stored MAC (constant time).
    pub fn check(&self, table: &str, fields: &[&[u8]], stored: &str) -> bool {
        self.0.check_fields(table, fields, stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_is_private_and_never_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("sub/k");
        let k = Key::init(&p).unwrap_or_else(|e| panic!("{e}"));
        let mode = std::fs::metadata(&p).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode.ok(), Some(0o600));
        assert!(Key::init(&p).is_err(), "refuses to replace");
        let l = Key::load(&p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(k.mac("t", &[b"x"]), l.mac("t", &[b"x"]));
        assert!(l.check("t", &[b"x"], &k.mac("t", &[b"x"])));
        assert!(!l.check("t", &[b"y"], &k.mac("t", &[b"x"])));
        assert!(!l.check("t", &[b"x"], "zz"));
        // Field boundaries matter.
        assert_ne!(k.mac("t", &[b"ab", b"c"]), k.mac("t", &[b"a", b"bc"]));
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644));
        let e = Key::load(&p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("chmod 600"), "{e}");
        let q = dir.path().join("bad");
        let _ = std::fs::write(&q, "abcd");
        let _ = std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o600));
        assert!(Key::load(&q).is_err());
        let mut i = MacInput::new("n");
        i.n(-12).n(0).n(i64::MAX).n(i64::MIN);
        assert_eq!(
            hex32(&[0xab; 32]),
            "ab".repeat(32),
            "hex32 matches hex::encode"
        );
    }
}
