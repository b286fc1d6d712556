#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(b) = hilrig_fw::bundle::parse(data) {
        let k = ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key();
        let _ = b.verify(&[k]);
        let _ = b.payloads(Some(&[1; 32]));
        let _ = b.target_vmm_sha256();
    }
});
