//! Row MACs: HMAC-SHA256 over a canonical row encoding (the table name, then each
//! field, each length-prefixed, so field boundaries count), a constant-time
//! compare, and a key fingerprint. Key *files* stay with the crate that owns the
//! key (counters' `mac::Key` loads and creates them).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The bytes a row's MAC covers: the table name and each field, length-prefixed
/// (u32 little-endian length, then the bytes).
#[derive(Debug, Clone)]
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
    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Lower-case hex of 32 bytes, fast.
pub fn hex32(h: &[u8; 32]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for &b in h {
        out.push(D[(b >> 4) as usize] as char);
        out.push(D[(b & 15) as usize] as char);
    }
    out
}

/// Equal bytes, in time that depends only on the lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An HMAC-SHA256 key with its keyed state computed once.
#[derive(Clone)]
pub struct RowKey(Hmac<Sha256>);

impl std::fmt::Debug for RowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RowKey(..)")
    }
}

impl RowKey {
    /// A key from its bytes (any length; the project's keys are 32 bytes).
    pub fn new(key: &[u8]) -> RowKey {
        // HMAC accepts keys of any length: new_from_slice cannot fail.
        match <Hmac<Sha256>>::new_from_slice(key) {
            Ok(m) => RowKey(m),
            Err(_) => unreachable!("HMAC takes keys of any length"),
        }
    }

    /// The raw MAC of prepared input.
    pub fn raw(&self, i: &MacInput) -> [u8; 32] {
        let mut m = self.0.clone();
        m.update(&i.0);
        m.finalize().into_bytes().into()
    }

    /// The MAC of prepared input, hex.
    pub fn mac(&self, i: &MacInput) -> String {
        hex32(&self.raw(i))
    }

    /// The MAC of a row of `table` with `fields`, hex.
    pub fn mac_fields(&self, table: &str, fields: &[&[u8]]) -> String {
        self.mac(&input(table, fields))
    }

    /// Does the stored hex MAC match the input? Constant time; a stored value
    /// that is not 64 hex digits is simply a mismatch.
    pub fn check(&self, i: &MacInput, stored: &str) -> bool {
        let Ok(v) = hex::decode(stored) else {
            return false;
        };
        ct_eq(&v, &self.raw(i))
    }

    /// [`RowKey::check`] of a row of `table` with `fields`.
    pub fn check_fields(&self, table: &str, fields: &[&[u8]], stored: &str) -> bool {
        self.check(&input(table, fields), stored)
    }

    /// A fingerprint naming the key without revealing it: the first 32 hex
    /// digits of the MAC of `label` (stored beside the data, it makes a wrong key
    /// a clear error instead of every row failing).
    pub fn fingerprint(&self, label: &str) -> String {
        let mut fp = self.mac_fields("key-fingerprint", &[label.as_bytes()]);
        fp.truncate(32);
        fp
    }
}

fn input(table: &str, fields: &[&[u8]]) -> MacInput {
    let mut i = MacInput::new(table);
    for f in fields {
        i.b(f);
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        let k = RowKey::new(&[7u8; 32]);
        let m = k.mac_fields("t", &[b"x"]);
        assert_eq!(m.len(), 64);
        assert!(k.check_fields("t", &[b"x"], &m));
        assert!(!k.check_fields("t", &[b"y"], &m));
        assert!(!k.check_fields("u", &[b"x"], &m), "the table is covered");
        assert!(!k.check_fields("t", &[b"x"], "zz"));
        assert!(!k.check_fields("t", &[b"x"], &m[..62]));
        assert!(!RowKey::new(&[8u8; 32]).check_fields("t", &[b"x"], &m));
        // Field boundaries matter.
        assert_ne!(
            k.mac_fields("t", &[b"ab", b"c"]),
            k.mac_fields("t", &[b"a", b"bc"])
        );
        let mut a = MacInput::new("n");
        a.n(-12).n(0).n(i64::MAX).n(i64::MIN);
        let mut b = MacInput::new("n");
        b.s("-12")
            .s("0")
            .s(&i64::MAX.to_string())
            .s(&i64::MIN.to_string());
        assert_eq!(a.bytes(), b.bytes(), "integers are their decimal text");
        assert_eq!(hex32(&[0xab; 32]), "ab".repeat(32));
        assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"ab", b"abc"));
        assert_eq!(k.fingerprint("x").len(), 32);
        assert_ne!(k.fingerprint("x"), RowKey::new(&[8u8; 32]).fingerprint("x"));
    }
}
