//! Signed flash images for the FIRMWARE and CONFIG regions.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `HRFW` |
//! | 4 | 2 | format version (1) |
//! | 6 | 1 | region (1 firmware, 2 config) |
//! | 7 | 1 | reserved, 0 |
//! | 8 | 4 | image version |
//! | 12 | 4 | payload length |
//! | 16 | 32 | SHA-256 of the payload |
//! | 48 | 32 | signer's Ed25519 public key |
//! | 80 | 64 | Ed25519 signature over bytes 0..80 |
//! | 144 | length | payload |
//!
//! The signature covers the header, and the header holds the payload's SHA-256, so the
//! signature covers the payload. Verification is strict (`verify_strict`) and the
//! signer must be one of the caller's trusted keys.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hilrig_device::Region;
use sha2::{Digest, Sha256};

/// Magic of a flash image.
pub const MAGIC: &[u8; 4] = b"HRFW";
/// Format version written and read.
pub const FORMAT_VERSION: u16 = 1;
/// Header length (bytes before the payload).
pub const HEADER_LEN: usize = 144;

/// A flash-image problem, naming the field and its byte offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("flash image: {field} at offset {offset}: {problem}")]
pub struct ImageError {
    /// The field.
    pub field: &'static str,
    /// Byte offset.
    pub offset: usize,
    /// What is wrong.
    pub problem: String,
}

fn err(field: &'static str, offset: usize, problem: impl Into<String>) -> ImageError {
    ImageError {
        field,
        offset,
        problem: problem.into(),
    }
}

/// A parsed (not yet verified) flash image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FlashImage {
    /// Target region.
    pub region: Region,
    /// Image version.
    pub version: u32,
    /// SHA-256 of the payload, hex.
    pub payload_sha256: String,
    /// Signer's public key, hex.
    pub signer: String,
    /// Payload length.
    pub payload_len: usize,
    #[serde(skip)]
    signer_key: [u8; 32],
    #[serde(skip)]
    signature: [u8; 64],
    #[serde(skip)]
    header: Vec<u8>,
}

/// Build and sign an image of `payload` for `region` (firmware or config).
pub fn build(
    region: Region,
    version: u32,
    payload: &[u8],
    key: &SigningKey,
) -> Result<Vec<u8>, ImageError> {
    if region == Region::Vbios {
        return Err(err(
            "region",
            6,
            "the vbios region takes an expansion ROM, not a flash image",
        ));
    }
    let len = u32::try_from(payload.len()).map_err(|_| err("payload length", 12, "over 4 GiB"))?;
    let mut h = Vec::with_capacity(HEADER_LEN + payload.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    h.push(region as u8);
    h.push(0);
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&Sha256::digest(payload));
    h.extend_from_slice(key.verifying_key().as_bytes());
    let sig = key.sign(&h[..80]);
    h.extend_from_slice(&sig.to_bytes());
    h.extend_from_slice(payload);
    Ok(h)
}

/// Parse an image: every field checked, the payload hash recomputed. Bytes after the
/// payload are refused unless they are erased flash (all 0xFF), as when a whole region
/// is read back.
pub fn parse(b: &[u8]) -> Result<FlashImage, ImageError> {
    if b.len() < HEADER_LEN {
        return Err(err(
            "header",
            0,
            format!("truncated: {} bytes, the header has {HEADER_LEN}", b.len()),
        ));
    }
    if &b[0..4] != MAGIC {
        return Err(err(
            "magic",
            0,
            format!("{:02x?}, expected \"HRFW\"", &b[0..4]),
        ));
    }
    let ver = u16::from_le_bytes([b[4], b[5]]);
    if ver != FORMAT_VERSION {
        return Err(err(
            "format version",
            4,
            format!("{ver}, this build reads {FORMAT_VERSION}"),
        ));
    }
    let region = match Region::from_index(b[6] as u32) {
        Some(r @ (Region::Firmware | Region::Config)) => r,
        _ => {
            return Err(err(
                "region",
                6,
                format!("{}, expected 1 (firmware) or 2 (config)", b[6]),
            ))
        }
    };
    if b[7] != 0 {
        return Err(err("reserved", 7, format!("{}, expected 0", b[7])));
    }
    let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    let len = u32::from_le_bytes([b[12], b[13], b[14], b[15]]) as usize;
    let rest = &b[HEADER_LEN..];
    if rest.len() < len {
        return Err(err(
            "payload length",
            12,
            format!("{len} bytes announced, {} present: truncated", rest.len()),
        ));
    }
    if let Some(i) = rest[len..].iter().position(|&x| x != 0xff) {
        return Err(err(
            "trailing bytes",
            HEADER_LEN + len + i,
            "bytes after the payload that are not erased flash (0xff)",
        ));
    }
    let payload = &rest[..len];
    let digest: [u8; 32] = Sha256::digest(payload).into();
    if digest[..] != b[16..48] {
        return Err(err("payload SHA-256", 16, "does not match the payload"));
    }
    let mut signer_key = [0u8; 32];
    signer_key.copy_from_slice(&b[48..80]);
    let mut signature = [0u8; 64];
    signature.copy_from_slice(&b[80..144]);
    Ok(FlashImage {
        region,
        version,
        payload_sha256: hex::encode(digest),
        signer: hex::encode(signer_key),
        payload_len: len,
        signer_key,
        signature,
        header: b[..80].to_vec(),
    })
}

impl FlashImage {
    /// Verify the signature strictly against one of `trusted` keys.
    pub fn verify(&self, trusted: &[VerifyingKey]) -> Result<(), ImageError> {
        let key = trusted
            .iter()
            .find(|k| k.as_bytes() == &self.signer_key)
            .ok_or_else(|| {
                err(
                    "signer",
                    48,
                    format!("{} is not a trusted key", self.signer),
                )
            })?;
        key.verify_strict(&self.header, &Signature::from_bytes(&self.signature))
            .map_err(|e| err("signature", 80, format!("does not verify: {e}")))
    }
}

/// The payload of a parsed image's bytes (after `parse` succeeded on them).
pub fn payload<'a>(bytes: &'a [u8], img: &FlashImage) -> &'a [u8] {
    &bytes[HEADER_LEN..HEADER_LEN + img.payload_len]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn build_parse_verify() {
        let k = key(1);
        let img = build(Region::Firmware, 42, b"firmware!", &k).unwrap();
        let p = parse(&img).unwrap();
        assert_eq!(
            (p.region, p.version, p.payload_len),
            (Region::Firmware, 42, 9)
        );
        p.verify(&[k.verifying_key()]).unwrap();
        assert_eq!(payload(&img, &p), b"firmware!");
        // Read back from a whole region: erased tail is fine.
        let mut region = img.clone();
        region.resize(4096, 0xff);
        assert_eq!(parse(&region).unwrap(), p);
        // Untrusted signer.
        assert_eq!(
            p.verify(&[key(2).verifying_key()]).unwrap_err().field,
            "signer"
        );
        assert!(build(Region::Vbios, 1, b"x", &k).is_err());
    }

    #[test]
    fn each_defect_is_named() {
        let k = key(1);
        let img = build(Region::Config, 1, &[7u8; 100], &k).unwrap();
        for (at, field) in [
            (0usize, "magic"),
            (4, "format version"),
            (6, "region"),
            (7, "reserved"),
            (12, "trailing bytes"),
            (13, "payload length"),
            (20, "payload SHA-256"),
            (150, "payload SHA-256"),
        ] {
            let mut b = img.clone();
            b[at] ^= 0x40;
            assert_eq!(parse(&b).unwrap_err().field, field, "flip at {at}");
        }
        // Signature and version tampering parse but do not verify.
        for at in [8usize, 90] {
            let mut b = img.clone();
            b[at] ^= 1;
            let p = parse(&b).unwrap();
            assert_eq!(
                p.verify(&[k.verifying_key()]).unwrap_err().field,
                "signature",
                "flip at {at}"
            );
        }
        let mut b = img.clone();
        b.push(0);
        assert_eq!(parse(&b).unwrap_err().field, "trailing bytes");
        assert_eq!(parse(&img[..50]).unwrap_err().field, "header");
        assert_eq!(parse(&img[..200]).unwrap_err().field, "payload length");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..400), magic in any::<bool>()) {
            if magic && bytes.len() >= 4 {
                bytes[..4].copy_from_slice(MAGIC);
            }
            if let Ok(p) = parse(&bytes) {
                let _ = p.verify(&[key(1).verifying_key()]);
            }
        }
    }
}
