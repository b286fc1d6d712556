//! Signed patch bundles for live patching the VMM.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `HRPB` |
//! | 4 | 2 | format version (1) |
//! | 6 | 2 | reserved, 0 |
//! | 8 | 4 | manifest length M (at most 64 KiB) |
//! | 12 | M | manifest, JSON (see [`Manifest`]) |
//! | 12+M | 64 | Ed25519 signature over bytes 0..12+M |
//! | 76+M | ... | payloads, in manifest order, `wire_size` bytes each |
//!
//! The manifest names the component, its version, the SHA-256 of the VMM build it
//! targets, the signer, and for every payload its name, plaintext SHA-256 and size on
//! the wire. Optional encryption (for bundles fetched over untrusted paths):
//! X25519 between an ephemeral key (in the manifest, so it is signed) and the
//! recipient's key, HKDF-SHA256 to a ChaCha20-Poly1305 key; each payload on the wire
//! is a 12-byte nonce, the ciphertext and the tag, with the payload's name as AAD.
//! Nothing is trusted before [`Bundle::verify`] and [`Bundle::payloads`] succeed.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Magic of a patch bundle.
pub const MAGIC: &[u8; 4] = b"HRPB";
/// Format version.
pub const FORMAT_VERSION: u16 = 1;
/// Largest manifest accepted.
pub const MAX_MANIFEST: usize = 64 * 1024;
/// Largest total payload accepted.
pub const MAX_PAYLOADS: usize = 256 * 1024 * 1024;
const ENC_SCHEME: &str = "x25519-hkdf-sha256-chacha20poly1305";

/// A bundle problem, naming the field (and offset where it applies).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("patch bundle: {field}{}: {problem}", offset.map(|o| format!(" at offset {o}")).unwrap_or_default())]
pub struct BundleError {
    /// The field.
    pub field: String,
    /// Byte offset, where one applies.
    pub offset: Option<usize>,
    /// What is wrong.
    pub problem: String,
}

fn err(field: impl Into<String>, offset: Option<usize>, problem: impl Into<String>) -> BundleError {
    BundleError {
        field: field.into(),
        offset,
        problem: problem.into(),
    }
}

/// One payload's entry in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadEntry {
    /// Name (e.g. `rules.toml`, `handler.so`).
    pub name: String,
    /// SHA-256 of the plaintext, hex.
    pub sha256: String,
    /// Bytes on the wire (ciphertext + nonce + tag when encrypted).
    pub wire_size: u64,
}

/// Encryption parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    /// Scheme name.
    pub scheme: String,
    /// Ephemeral X25519 public key, hex.
    pub ephemeral_public: String,
    /// Recipient X25519 public key, hex.
    pub recipient: String,
}

/// The signed manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Component name in the VMM's module table (e.g. `policy`, `device-handler`).
    pub component: String,
    /// Component version; the VMM refuses versions not newer than the running one.
    pub version: u64,
    /// SHA-256 of the VMM executable this patch targets, hex.
    pub target_vmm_sha256: String,
    /// Signer's Ed25519 public key, hex.
    pub signer: String,
    /// Payloads, in wire order.
    pub payloads: Vec<PayloadEntry>,
    /// Encryption, if the payloads are encrypted.
    pub encryption: Option<Encryption>,
    /// SHA-256 of the target VMM's patch-applying code (its `hilrig_patch_text`
    /// section, [`PATCH_PATH_SECTION`]) as the VMM maps it, hex. The VMM hashes its
    /// own mapped code after the signature check and refuses on a mismatch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_path_sha256: Option<String>,
    /// The patch widens what a guest may do (a policy that lets through an access
    /// the running one keeps from the device). A VMM applies such a patch only when
    /// this is declared and it was started with `--allow-policy-widening`. Absent
    /// (false) in bundles that do not declare it, so their signed bytes are unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub widens: bool,
}

/// Options of [`build_with`] beyond the [`BundleSpec`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BuildOptions {
    /// Declare in the signed manifest that the patch widens a policy
    /// ([`Manifest::widens`]).
    pub widens: bool,
}

/// What to put in a bundle.
pub struct BundleSpec<'a> {
    /// Component name.
    pub component: &'a str,
    /// Version.
    pub version: u64,
    /// SHA-256 of the target VMM executable.
    pub target_vmm_sha256: [u8; 32],
    /// (name, contents) of each payload.
    pub payloads: Vec<(String, Vec<u8>)>,
    /// Encrypt to this X25519 public key.
    pub encrypt_to: Option<[u8; 32]>,
    /// SHA-256 of the target VMM's patch-applying code ([`patch_path_sha256_of_elf`]).
    pub patch_path_sha256: Option<[u8; 32]>,
}

fn hkdf_key(shared: &[u8; 32]) -> [u8; 32] {
    let hk = hkdf::Hkdf::<Sha256>::new(Some(b"hilrig-bundle-v1"), shared);
    let mut k = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's output limit.
    let _ = hk.expand(b"payload key", &mut k);
    k
}

/// Build and sign a bundle.
pub fn build(spec: &BundleSpec<'_>, key: &SigningKey) -> Result<Vec<u8>, BundleError> {
    build_with(spec, key, BuildOptions::default())
}

/// Build and sign a bundle with `opts` in its manifest.
pub fn build_with(
    spec: &BundleSpec<'_>,
    key: &SigningKey,
    opts: BuildOptions,
) -> Result<Vec<u8>, BundleError> {
    let mut wire: Vec<Vec<u8>> = Vec::new();
    let mut entries = Vec::new();
    let (encryption, cipher) = match spec.encrypt_to {
        None => (None, None),
        Some(recipient) => {
            let eph = x25519_dalek::StaticSecret::from(
                crate::keys::random32().map_err(|e| err("encryption", None, e.to_string()))?,
            );
            let eph_pub = x25519_dalek::PublicKey::from(&eph);
            let shared = eph.diffie_hellman(&x25519_dalek::PublicKey::from(recipient));
            let cipher = ChaCha20Poly1305::new(&hkdf_key(shared.as_bytes()).into());
            (
                Some(Encryption {
                    scheme: ENC_SCHEME.into(),
                    ephemeral_public: hex::encode(eph_pub.as_bytes()),
                    recipient: hex::encode(recipient),
                }),
                Some(cipher),
            )
        }
    };
    for (name, data) in &spec.payloads {
        if name.is_empty() || name.len() > 255 || name.contains(['/', '\0']) {
            return Err(err(
                "payload name",
                None,
                format!("{name:?} must be 1-255 bytes without '/' or NUL"),
            ));
        }
        let bytes = match &cipher {
            None => data.clone(),
            Some(c) => {
                let nonce =
                    crate::keys::random32().map_err(|e| err("encryption", None, e.to_string()))?;
                let mut out = nonce[..12].to_vec();
                let ct = c
                    .encrypt(
                        nonce[..12].into(),
                        Payload {
                            msg: data,
                            aad: name.as_bytes(),
                        },
                    )
                    .map_err(|_| err("encryption", None, format!("encrypting {name}")))?;
                out.extend_from_slice(&ct);
                out
            }
        };
        entries.push(PayloadEntry {
            name: name.clone(),
            sha256: hex::encode(Sha256::digest(data)),
            wire_size: bytes.len() as u64,
        });
        wire.push(bytes);
    }
    let manifest = Manifest {
        component: spec.component.to_string(),
        version: spec.version,
        target_vmm_sha256: hex::encode(spec.target_vmm_sha256),
        signer: hex::encode(key.verifying_key().as_bytes()),
        payloads: entries,
        encryption,
        patch_path_sha256: spec.patch_path_sha256.map(hex::encode),
        widens: opts.widens,
    };
    let m = serde_json::to_vec(&manifest).map_err(|e| err("manifest", None, e.to_string()))?;
    if m.len() > MAX_MANIFEST {
        return Err(err(
            "manifest",
            None,
            format!("{} bytes, at most {MAX_MANIFEST}", m.len()),
        ));
    }
    let mut b = Vec::new();
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&(m.len() as u32).to_le_bytes());
    b.extend_from_slice(&m);
    let sig = key.sign(&b);
    b.extend_from_slice(&sig.to_bytes());
    for w in wire {
        b.extend_from_slice(&w);
    }
    Ok(b)
}

/// A parsed bundle. Its manifest is NOT trusted until [`Bundle::verify`] succeeds.
#[derive(Debug, Clone)]
pub struct Bundle<'a> {
    /// The manifest.
    pub manifest: Manifest,
    signed: &'a [u8],
    signature: [u8; 64],
    wire: Vec<&'a [u8]>,
}

/// Parse a bundle's framing and manifest (no trust yet).
pub fn parse(b: &[u8]) -> Result<Bundle<'_>, BundleError> {
    if b.len() < 12 {
        return Err(err(
            "header",
            Some(0),
            format!("truncated: {} bytes, the header has 12", b.len()),
        ));
    }
    if &b[0..4] != MAGIC {
        return Err(err(
            "magic",
            Some(0),
            format!("{:02x?}, expected \"HRPB\"", &b[0..4]),
        ));
    }
    let ver = u16::from_le_bytes([b[4], b[5]]);
    if ver != FORMAT_VERSION {
        return Err(err(
            "format version",
            Some(4),
            format!("{ver}, this build reads {FORMAT_VERSION}"),
        ));
    }
    if b[6] != 0 || b[7] != 0 {
        return Err(err("reserved", Some(6), "not zero"));
    }
    let mlen = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize;
    if mlen > MAX_MANIFEST {
        return Err(err(
            "manifest length",
            Some(8),
            format!("{mlen} bytes, at most {MAX_MANIFEST}"),
        ));
    }
    let sig_at = 12 + mlen;
    if b.len() < sig_at + 64 {
        return Err(err(
            "manifest length",
            Some(8),
            format!(
                "{mlen}-byte manifest and 64-byte signature do not fit {} bytes: truncated",
                b.len()
            ),
        ));
    }
    let manifest: Manifest = serde_json::from_slice(&b[12..sig_at])
        .map_err(|e| err("manifest", Some(12), format!("not a valid manifest: {e}")))?;
    let mut signature = [0u8; 64];
    signature.copy_from_slice(&b[sig_at..sig_at + 64]);
    let mut off = sig_at + 64;
    let mut wire = Vec::with_capacity(manifest.payloads.len());
    let mut total = 0u64;
    for p in &manifest.payloads {
        total = total.saturating_add(p.wire_size);
        if total > MAX_PAYLOADS as u64 {
            return Err(err(
                format!("payload {}", p.name),
                Some(off),
                "payloads exceed 256 MiB",
            ));
        }
        let end = off
            .checked_add(p.wire_size as usize)
            .filter(|&e| e <= b.len())
            .ok_or_else(|| {
                err(
                    format!("payload {}", p.name),
                    Some(off),
                    format!(
                        "{} bytes announced, {} present: truncated",
                        p.wire_size,
                        b.len() - off
                    ),
                )
            })?;
        wire.push(&b[off..end]);
        off = end;
    }
    if off != b.len() {
        return Err(err(
            "trailing bytes",
            Some(off),
            format!("{} bytes after the last payload", b.len() - off),
        ));
    }
    Ok(Bundle {
        manifest,
        signed: &b[..sig_at],
        signature,
        wire,
    })
}

impl Bundle<'_> {
    /// Verify the signature strictly against one of `trusted` keys, and the manifest's
    /// internal consistency.
    pub fn verify(&self, trusted: &[VerifyingKey]) -> Result<(), BundleError> {
        let signer = hex::decode(&self.manifest.signer).unwrap_or_default();
        let key = trusted
            .iter()
            .find(|k| k.as_bytes()[..] == signer[..])
            .ok_or_else(|| {
                err(
                    "signer",
                    None,
                    format!("{} is not a trusted key", self.manifest.signer),
                )
            })?;
        key.verify_strict(self.signed, &Signature::from_bytes(&self.signature))
            .map_err(|e| {
                err(
                    "signature",
                    Some(self.signed.len()),
                    format!("does not verify: {e}"),
                )
            })?;
        if decode32(&self.manifest.target_vmm_sha256).is_none() {
            return Err(err("target_vmm_sha256", None, "not 64 hex digits"));
        }
        Ok(())
    }

    /// The target VMM build hash.
    pub fn target_vmm_sha256(&self) -> Option<[u8; 32]> {
        decode32(&self.manifest.target_vmm_sha256)
    }

    /// The reference hash of the target VMM's patch-applying code, if the manifest
    /// carries one (None also when it is not 64 hex digits).
    pub fn patch_path_sha256(&self) -> Option<[u8; 32]> {
        self.manifest
            .patch_path_sha256
            .as_deref()
            .and_then(decode32)
    }

    /// Decrypt (when encrypted; `recipient` is the X25519 secret) and check every
    /// payload against its SHA-256. Call after `verify`.
    pub fn payloads(
        &self,
        recipient: Option<&[u8; 32]>,
    ) -> Result<Vec<(String, Vec<u8>)>, BundleError> {
        let cipher = match (&self.manifest.encryption, recipient) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(err(
                    "encryption",
                    None,
                    "the bundle is encrypted; a recipient key is needed",
                ))
            }
            (Some(e), Some(sk)) => {
                if e.scheme != ENC_SCHEME {
                    return Err(err(
                        "encryption.scheme",
                        None,
                        format!("{:?} is not supported", e.scheme),
                    ));
                }
                let eph = decode32(&e.ephemeral_public)
                    .ok_or_else(|| err("encryption.ephemeral_public", None, "not 64 hex digits"))?;
                let secret = x25519_dalek::StaticSecret::from(*sk);
                if hex::encode(x25519_dalek::PublicKey::from(&secret).as_bytes()) != e.recipient {
                    return Err(err(
                        "encryption.recipient",
                        None,
                        "the bundle is encrypted to another key",
                    ));
                }
                let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(eph));
                Some(ChaCha20Poly1305::new(&hkdf_key(shared.as_bytes()).into()))
            }
        };
        let mut out = Vec::with_capacity(self.wire.len());
        for (p, w) in self.manifest.payloads.iter().zip(&self.wire) {
            let data = match &cipher {
                None => w.to_vec(),
                Some(c) => {
                    if w.len() < 12 + 16 {
                        return Err(err(
                            format!("payload {}", p.name),
                            None,
                            "too short to be encrypted",
                        ));
                    }
                    c.decrypt(
                        w[..12].into(),
                        Payload {
                            msg: &w[12..],
                            aad: p.name.as_bytes(),
                        },
                    )
                    .map_err(|_| {
                        err(
                            format!("payload {}", p.name),
                            None,
                            "does not decrypt (tampered or wrong key)",
                        )
                    })?
                }
            };
            if hex::encode(Sha256::digest(&data)) != p.sha256.to_ascii_lowercase() {
                return Err(err(
                    format!("payload {}", p.name),
                    None,
                    "SHA-256 does not match the manifest",
                ));
            }
            out.push((p.name.clone(), data));
        }
        Ok(out)
    }
}

fn decode32(s: &str) -> Option<[u8; 32]> {
    hex::decode(s).ok()?.try_into().ok()
}

/// The linker section that holds the VMM's patch-applying code (a C identifier, so
/// the linker defines `__start_`/`__stop_` symbols for it).
pub const PATCH_PATH_SECTION: &str = "hilrig_patch_text";

/// SHA-256 of the [`PATCH_PATH_SECTION`] section of a VMM executable (ELF64,
/// little-endian): the bytes the VMM maps as its patch-applying code (position-
/// independent code has no relocations in text, so file and memory bytes agree).
pub fn patch_path_sha256_of_elf(elf: &[u8]) -> Result<[u8; 32], BundleError> {
    let e = |problem: String| err("VMM executable", None, problem);
    let u16_at = |o: usize| -> Result<u16, BundleError> {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| e(format!("truncated at {o}")))
    };
    let u32_at = |o: usize| -> Result<u32, BundleError> {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| e(format!("truncated at {o}")))
    };
    let u64_at = |o: usize| -> Result<u64, BundleError> {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| e(format!("truncated at {o}")))
    };
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return Err(e("not a little-endian ELF64 file".into()));
    }
    let shoff = u64_at(0x28)? as usize;
    let shentsize = u16_at(0x3a)? as usize;
    let shnum = u16_at(0x3c)? as usize;
    let shstrndx = u16_at(0x3e)? as usize;
    if shentsize < 64 || shnum == 0 || shstrndx >= shnum {
        return Err(e("no usable section header table".into()));
    }
    let sh = |i: usize| shoff.checked_add(i.checked_mul(shentsize)?);
    let strtab = sh(shstrndx).ok_or_else(|| e("section table out of range".into()))?;
    let (str_off, str_size) = (
        u64_at(strtab + 0x18)? as usize,
        u64_at(strtab + 0x20)? as usize,
    );
    let names = elf
        .get(str_off..str_off.saturating_add(str_size))
        .ok_or_else(|| e("section names out of range".into()))?;
    for i in 0..shnum {
        let h = sh(i).ok_or_else(|| e("section table out of range".into()))?;
        let name_off = u32_at(h)? as usize;
        let name = names
            .get(name_off..)
            .and_then(|n| n.split(|&c| c == 0).next())
            .unwrap_or_default();
        if name == PATCH_PATH_SECTION.as_bytes() {
            let (off, size) = (u64_at(h + 0x18)? as usize, u64_at(h + 0x20)? as usize);
            let bytes = elf
                .get(off..off.saturating_add(size))
                .ok_or_else(|| e(format!("section {PATCH_PATH_SECTION} out of range")))?;
            if bytes.is_empty() {
                return Err(e(format!("section {PATCH_PATH_SECTION} is empty")));
            }
            return Ok(Sha256::digest(bytes).into());
        }
    }
    Err(e(format!(
        "no {PATCH_PATH_SECTION} section (not a hilrig VMM build?)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(encrypt_to: Option<[u8; 32]>) -> BundleSpec<'static> {
        BundleSpec {
            component: "policy",
            version: 3,
            target_vmm_sha256: [9; 32],
            payloads: vec![
                ("rules.toml".into(), b"[rules]".to_vec()),
                ("x.bin".into(), vec![1, 2, 3]),
            ],
            encrypt_to,
            patch_path_sha256: Some([5; 32]),
        }
    }

    #[test]
    fn plain_bundle_round_trip() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let b = build(&spec(None), &k).unwrap();
        let p = parse(&b).unwrap();
        p.verify(&[k.verifying_key()]).unwrap();
        let pl = p.payloads(None).unwrap();
        assert_eq!(pl[0], ("rules.toml".to_string(), b"[rules]".to_vec()));
        assert_eq!(p.target_vmm_sha256(), Some([9; 32]));
        assert_eq!(p.patch_path_sha256(), Some([5; 32]));
        assert_eq!(p.manifest.version, 3);
    }

    #[test]
    fn patch_path_of_elf_names_what_is_wrong() {
        let e = patch_path_sha256_of_elf(b"nope").unwrap_err().to_string();
        assert!(e.contains("not a little-endian ELF64"), "{e}");
        // This test binary is ELF but no VMM: it has no patch-path section.
        let me = std::fs::read("/proc/self/exe").unwrap();
        let e = patch_path_sha256_of_elf(&me).unwrap_err().to_string();
        assert!(e.contains("no hilrig_patch_text section"), "{e}");
        // Truncated section tables are errors, never panics.
        for n in [64, 100, me.len() / 2] {
            let _ = patch_path_sha256_of_elf(&me[..n]);
        }
    }

    #[test]
    fn encrypted_bundle_round_trip_and_wrong_key() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let sk = [5u8; 32];
        let pk = *x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(sk)).as_bytes();
        let b = build(&spec(Some(pk)), &k).unwrap();
        let p = parse(&b).unwrap();
        p.verify(&[k.verifying_key()]).unwrap();
        assert_eq!(p.payloads(Some(&sk)).unwrap()[1].1, vec![1, 2, 3]);
        assert!(p
            .payloads(None)
            .unwrap_err()
            .problem
            .contains("recipient key"));
        assert_eq!(
            p.payloads(Some(&[6; 32])).unwrap_err().field,
            "encryption.recipient"
        );
        // A flipped ciphertext byte is caught by the AEAD.
        let mut t = b.clone();
        let n = t.len();
        t[n - 1] ^= 1;
        let p = parse(&t).unwrap();
        assert!(p
            .payloads(Some(&sk))
            .unwrap_err()
            .problem
            .contains("decrypt"));
    }

    #[test]
    fn tampering_is_caught() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let b = build(&spec(None), &k).unwrap();
        // Wrong signer.
        let other = SigningKey::from_bytes(&[2; 32]).verifying_key();
        assert_eq!(
            parse(&b).unwrap().verify(&[other]).unwrap_err().field,
            "signer"
        );
        // Manifest edit (version 3 -> 4) breaks the signature.
        let s = String::from_utf8_lossy(&b).replace("\"version\":3", "\"version\":4");
        let t = s.as_bytes().to_vec();
        if t.len() == b.len() {
            assert_eq!(
                parse(&t)
                    .unwrap()
                    .verify(&[k.verifying_key()])
                    .unwrap_err()
                    .field,
                "signature"
            );
        }
        // Payload edit: signature fine, hash caught.
        let mut t = b.clone();
        let n = t.len();
        t[n - 1] ^= 1;
        let p = parse(&t).unwrap();
        p.verify(&[k.verifying_key()]).unwrap();
        assert_eq!(p.payloads(None).unwrap_err().field, "payload x.bin");
        // Truncated and trailing.
        assert!(parse(&b[..b.len() - 1])
            .unwrap_err()
            .problem
            .contains("truncated"));
        let mut t = b.clone();
        t.push(0);
        assert_eq!(parse(&t).unwrap_err().field, "trailing bytes");
        assert_eq!(parse(&b[..5]).unwrap_err().field, "header");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..600), magic in any::<bool>()) {
            if magic && bytes.len() >= 12 {
                bytes[..4].copy_from_slice(MAGIC);
                bytes[4..8].copy_from_slice(&[1, 0, 0, 0]);
                let mlen = (bytes.len() as u32).saturating_sub(80) % 200;
                bytes[8..12].copy_from_slice(&mlen.to_le_bytes());
            }
            if let Ok(p) = parse(&bytes) {
                let _ = p.verify(&[SigningKey::from_bytes(&[1; 32]).verifying_key()]);
                let _ = p.payloads(Some(&[1; 32]));
            }
        }
    }
}
