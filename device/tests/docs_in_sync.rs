//! docs/registers.md is generated from the register table; this fails when they differ.
//! Regenerate with: cargo run -- device regmap --markdown > docs/registers.md
//! (or HILRIG_BLESS=1 cargo nextest run -p hilrig-device --test docs_in_sync).

#[test]
fn docs_registers_md_matches_the_table() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/registers.md");
    let generated = hilrig_device::regmap::to_markdown();
    if std::env::var_os("HILRIG_BLESS").is_some() {
        std::fs::write(&path, &generated)
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
    let on_disk = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(
        on_disk == generated,
        "{} differs from the register table; regenerate it with \
         `cargo run -- device regmap --markdown > docs/registers.md`",
        path.display()
    );
}

#[test]
fn json_export_lists_every_register() {
    let v: serde_json::Value = serde_json::from_str(&hilrig_device::regmap::to_json()).unwrap();
    let regs = v["registers"].as_array().unwrap();
    assert_eq!(regs.len(), hilrig_device::regmap::REGISTERS.len());
    for (j, r) in regs.iter().zip(hilrig_device::regmap::REGISTERS) {
        assert_eq!(j["name"], r.name);
        assert_eq!(j["offset"], r.offset);
    }
}
