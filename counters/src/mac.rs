//! Row integrity: every stored row carries an HMAC-SHA256 over its fields, keyed from
//! a key file, so a row edited outside the service is detected.

use crate::{Error, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::Write;
use std::path::Path;

/// The MAC key (32 bytes; the key file holds it as 64 hex digits), with the keyed
/// HMAC state computed once.
#[derive(Clone)]
pub struct Key(Hmac<Sha256>);

fn keyed(b: &[u8; 32]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length: new_from_slice cannot fail here.
    match <Hmac<Sha256>>::new_from_slice(b) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    }
}

/// The bytes a row's MAC covers: the table name and each field, length-prefixed.
pub struct MacInput(Vec<u8>);

impl MacInput {
    /// Start a row of `table`.
    pub fn new(table: &str) -> MacInput {
        let mut v = Vec::with_capacity(512);
        v.extend_from_slice(&(table.len() as u32).to_le_bytes());
        v.extend_from_slice(table.as_bytes());
        MacInput(v)
    }
    /// Add a byte field.
    pub fn b(&mut self, f: &[u8]) -> &mut Self {
        self.0.extend_from_slice(&(f.len() as u32).to_le_bytes());
        self.0.extend_from_slice(f);
        self
    }
    /// Add a text field.
    pub fn s(&mut self, f: &str) -> &mut Self {
        self.b(f.as_bytes())
    }
    /// Add an integer field (as its decimal text).
    pub fn n(&mut self, v: i64) -> &mut Self {
        let mut buf = [0u8; 24];
        let mut i = buf.len();
        let neg = v < 0;
        let mut u = v.unsigned_abs();
        loop {
            i -= 1;
            buf[i] = b'0' + (u % 10) as u8;
            u /= 10;
            if u == 0 {
                break;
            }
        }
        if neg {
            i -= 1;
            buf[i] = b'-';
        }
        self.b(&buf[i..])
    }
}

/// Lower-case hex, fast.
pub fn hex32(h: &[u8; 32]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(64);
    for &b in h {
        out.push(D[(b >> 4) as usize]);
        out.push(D[(b & 15) as usize]);
    }
    // Only ASCII digits were pushed.
    String::from_utf8(out).unwrap_or_default()
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
        hex32(&self.raw(table, fields))
    }

    fn raw(&self, table: &str, fields: &[&[u8]]) -> [u8; 32] {
        let mut i = MacInput::new(table);
        for f in fields {
            i.b(f);
        }
        self.raw_input(&i)
    }

    fn raw_input(&self, i: &MacInput) -> [u8; 32] {
        let mut m = self.0.clone();
        m.update(&i.0);
        m.finalize().into_bytes().into()
    }

    /// The MAC of prepared input, hex.
    pub fn mac_input(&self, i: &MacInput) -> String {
        hex32(&self.raw_input(i))
    }

    /// Check a stored MAC against prepared input (constant time).
    pub fn check_input(&self, i: &MacInput, stored: &str) -> bool {
        let Ok(v) = hex::decode(stored) else {
            return false;
        };
        let want = self.raw_input(i);
        v.len() == 32 && v.iter().zip(want.iter()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
    }

    /// Check a stored MAC (constant time).
    pub fn check(&self, table: &str, fields: &[&[u8]], stored: &str) -> bool {
        let mut i = MacInput::new(table);
        for f in fields {
            i.b(f);
        }
        self.check_input(&i, stored)
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
