//! The "bundle / image → VMM" boundary (DESIGN §6) at the parsers: forged,
//! spliced, lying, truncated and malformed patch bundles and flash images. Each
//! is refused with an error naming the field (and offset where one applies),
//! never a panic, never an allocation the input's own size does not bound.
//! Manifests an honest build tool would never write are signed here with the
//! trusted key on purpose: the parser must not rely on the signer being careful.

use ed25519_dalek::{Signer, SigningKey};
use hilrig_device::Region;
use hilrig_fw::bundle::{self, BundleSpec};
use hilrig_fw::image;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn spec(payloads: Vec<(&str, Vec<u8>)>) -> BundleSpec<'static> {
    BundleSpec {
        component: "policy",
        version: 3,
        target_vmm_sha256: [9; 32],
        payloads: payloads
            .into_iter()
            .map(|(n, d)| (n.to_string(), d))
            .collect(),
        encrypt_to: None,
        patch_path_sha256: Some([5; 32]),
    }
}

/// A bundle of `manifest` (any text) signed by `k`, then `wire`.
fn raw(manifest: &str, k: &SigningKey, wire: &[u8]) -> Vec<u8> {
    let mut b = bundle::MAGIC.to_vec();
    b.extend_from_slice(&bundle::FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
    b.extend_from_slice(manifest.as_bytes());
    let sig = k.sign(&b);
    b.extend_from_slice(&sig.to_bytes());
    b.extend_from_slice(wire);
    b
}

fn manifest(k: &SigningKey, payloads: &str) -> String {
    format!(
        r#"{{"component":"policy","version":3,"target_vmm_sha256":"{}","signer":"{}","payloads":[{payloads}],"encryption":null}}"#,
        hex::encode([9u8; 32]),
        hex::encode(k.verifying_key().as_bytes())
    )
}

fn entry(name: &str, data: &[u8], wire_size: u64) -> String {
    use sha2::Digest;
    format!(
        r#"{{"name":"{name}","sha256":"{}","wire_size":{wire_size}}}"#,
        hex::encode(sha2::Sha256::digest(data))
    )
}

/// Everything a VMM checks before acting, in its order.
fn accept(b: &[u8], trusted: &SigningKey) -> Result<Vec<(String, Vec<u8>)>, bundle::BundleError> {
    let p = bundle::parse(b)?;
    p.verify(&[trusted.verifying_key()])?;
    p.payloads(None)
}

/// Attack: a bundle signed by another key; one that names the trusted key as
/// its signer but was signed by another; a trusted key's signature moved onto
/// another manifest.
#[test]
fn another_keys_bundle_or_a_transplanted_signature_is_refused() {
    let (trusted, other) = (key(1), key(2));
    let theirs = bundle::build(&spec(vec![("rules.toml", b"a".to_vec())]), &other).unwrap();
    let e = accept(&theirs, &trusted).unwrap_err();
    assert_eq!(e.field, "signer", "{e}");
    // The manifest claims the trusted signer; the signature is the other key's.
    let m = manifest(&trusted, &entry("rules.toml", b"a", 1));
    let mut lying = raw(&m, &other, b"a");
    let e = accept(&lying, &trusted).unwrap_err();
    assert_eq!(e.field, "signature", "{e}");
    assert!(e.to_string().contains("offset"), "{e}");
    // The trusted signature of one manifest over another of the same length.
    let good = raw(&m, &trusted, b"a");
    let m2 = m.replace("\"version\":3", "\"version\":9");
    assert_eq!(m2.len(), m.len());
    let sig_at = 12 + m.len();
    lying = raw(&m2, &other, b"a");
    lying[sig_at..sig_at + 64].copy_from_slice(&good[sig_at..sig_at + 64]);
    assert_eq!(accept(&lying, &trusted).unwrap_err().field, "signature");
    // The untouched one passes: the refusals above are the attacks'.
    assert_eq!(accept(&good, &trusted).unwrap()[0].1, b"a");
}

/// Attack: a valid signature over different payloads: another bundle's
/// payloads of the same size spliced in, two payloads swapped on the wire.
#[test]
fn a_valid_signature_over_other_payloads_is_refused() {
    let k = key(1);
    let a = bundle::build(
        &spec(vec![
            ("rules.toml", b"AAAA".to_vec()),
            ("x.bin", b"BBBB".to_vec()),
        ]),
        &k,
    )
    .unwrap();
    let b = bundle::build(
        &spec(vec![
            ("rules.toml", b"CCCC".to_vec()),
            ("x.bin", b"DDDD".to_vec()),
        ]),
        &k,
    )
    .unwrap();
    assert_eq!(a.len(), b.len());
    let n = a.len();
    // a's header and signature, b's payloads: same version, other content.
    let mut spliced = a[..n - 8].to_vec();
    spliced.extend_from_slice(&b[n - 8..]);
    let e = accept(&spliced, &k).unwrap_err();
    assert_eq!(e.field, "payload rules.toml", "{e}");
    // a's payloads swapped on the wire.
    let mut swapped = a[..n - 8].to_vec();
    swapped.extend_from_slice(b"BBBBAAAA");
    assert_eq!(
        accept(&swapped, &k).unwrap_err().field,
        "payload rules.toml"
    );
    assert!(accept(&a, &k).is_ok());
}

/// Attack: declared sizes that lie (larger, smaller, u64::MAX, a sum over the
/// bound from parts under it), a manifest length past the file, every
/// truncation of a valid bundle. Refused with the field and offset; no panic.
#[test]
fn lying_sizes_and_every_truncation_are_refused_with_the_field() {
    let k = key(1);
    let data = b"0123456789";
    let cases: Vec<(String, &[u8], &str)> = vec![
        (entry("p", data, 11), data, "truncated"),
        (entry("p", data, 9), data, "after the last payload"),
        (entry("p", data, u64::MAX), data, "exceed 256 MiB"),
        (
            format!(
                "{},{}",
                entry("p", data, 200 << 20),
                entry("q", data, 200 << 20)
            ),
            data,
            // The first lie found is the first payload's.
            "truncated",
        ),
        (entry("p", data, 0), b"", "SHA-256 does not match"),
    ];
    for (payloads, wire, want) in cases {
        let b = raw(&manifest(&k, &payloads), &k, wire);
        let e = accept(&b, &k).unwrap_err();
        assert!(e.to_string().contains(want), "{payloads}: {e}");
    }
    // The manifest length field past the file, and past the manifest bound.
    let good = bundle::build(&spec(vec![("rules.toml", data.to_vec())]), &k).unwrap();
    for len in [
        u32::MAX,
        (bundle::MAX_MANIFEST + 1) as u32,
        good.len() as u32,
    ] {
        let mut b = good.clone();
        b[8..12].copy_from_slice(&len.to_le_bytes());
        let e = bundle::parse(&b).unwrap_err();
        assert_eq!(e.field, "manifest length", "{len}: {e}");
        assert_eq!(e.offset, Some(8));
    }
    // Every prefix: refused, never a panic, never accepted.
    for n in 0..good.len() {
        assert!(accept(&good[..n], &k).is_err(), "{n}-byte prefix accepted");
    }
    assert!(accept(&good, &k).is_ok());
}

/// Attack: a signed manifest with duplicate fields (which one wins?), unknown
/// fields (a newer format's meaning ignored), wrong types, a non-hex target.
#[test]
fn a_manifest_with_duplicate_unknown_or_mistyped_fields_is_refused() {
    let k = key(1);
    let data = b"x";
    let base = manifest(&k, &entry("p", data, 1));
    let variants = [
        (
            base.replace(
                "\"component\":\"policy\"",
                "\"component\":\"policy\",\"component\":\"device-handler\"",
            ),
            "duplicate field",
        ),
        (
            base.replace("\"version\":3", "\"version\":3,\"version\":99"),
            "duplicate field",
        ),
        (
            base.replace("\"version\":3", "\"version\":3,\"min_version\":1"),
            "unknown field",
        ),
        (
            base.replace("\"wire_size\":1", "\"wire_size\":1,\"offset\":0"),
            "unknown field",
        ),
        (
            base.replace("\"version\":3", "\"version\":\"3\""),
            "invalid type",
        ),
        (
            base.replace("\"version\":3", "\"version\":-1"),
            "invalid value",
        ),
        (
            base.replace("\"version\":3", "\"version\":3.5"),
            "invalid type",
        ),
        (format!("{base} {{}}"), "trailing characters"),
    ];
    for (m, want) in variants {
        let b = raw(&m, &k, data);
        let e = bundle::parse(&b).unwrap_err();
        assert_eq!(e.field, "manifest", "{m}");
        assert_eq!(e.offset, Some(12));
        assert!(e.problem.contains(want), "{m}: {e}");
    }
    let m = base.replace(&hex::encode([9u8; 32]), &"zz".repeat(32));
    let e = accept(&raw(&m, &k, data), &k).unwrap_err();
    assert_eq!(e.field, "target_vmm_sha256", "{e}");
    assert!(accept(&raw(&base, &k, data), &k).is_ok());
}

/// Attack on flash images: another key, a payload length that lies (larger:
/// u32::MAX; smaller: trailing bytes that are not erased flash), every
/// truncation, a payload swapped under a valid header.
#[test]
fn flash_images_that_lie_or_are_cut_are_refused_with_the_field() {
    let (k, other) = (key(1), key(2));
    let good = image::build(Region::Firmware, 4, b"firmware!", &k).unwrap();
    let img = image::parse(&good).unwrap();
    img.verify(&[k.verifying_key()]).unwrap();
    assert_eq!(
        img.verify(&[other.verifying_key()]).unwrap_err().field,
        "signer"
    );
    for len in [u32::MAX, 10, 8] {
        let mut b = good.clone();
        b[12..16].copy_from_slice(&len.to_le_bytes());
        let e = image::parse(&b).unwrap_err().to_string();
        assert!(
            e.contains("payload length") || e.contains("trailing bytes"),
            "{len}: {e}"
        );
    }
    let mut b = good.clone();
    let n = b.len();
    b[n - 1] ^= 0x20;
    assert!(image::parse(&b)
        .unwrap_err()
        .to_string()
        .contains("SHA-256"));
    // Erased flash after the payload is fine; anything else is not.
    let mut padded = good.clone();
    padded.extend_from_slice(&[0xff; 64]);
    assert!(image::parse(&padded).is_ok());
    padded.push(0);
    assert!(image::parse(&padded)
        .unwrap_err()
        .to_string()
        .contains("trailing bytes"));
    for n in 0..good.len() {
        assert!(image::parse(&good[..n]).is_err(), "{n}-byte prefix parsed");
    }
    let rom = hilrig_fw::vbios::build(&hilrig_fw::vbios::VbiosSpec::reference(1, b"code")).unwrap();
    assert!(hilrig_fw::vbios::parse(&rom).is_ok());
    for n in 0..rom.len().min(4096) {
        let _ = hilrig_fw::vbios::parse(&rom[..n]);
    }
}
