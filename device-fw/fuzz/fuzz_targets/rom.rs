#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = hilrig_fw::vbios::parse(data);
});
