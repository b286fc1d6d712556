#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(img) = hilrig_fw::image::parse(data) {
        let k = ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key();
        let _ = img.verify(&[k]);
    }
});
