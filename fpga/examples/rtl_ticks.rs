//! Profile helper: idle ticks and MMIO through `Rtl`.
use hilrig_device::device::Device;
use hilrig_device::state::{DeviceConfig, NvState};
fn main() {
    let nv = NvState::factory(DeviceConfig::default(), 1).unwrap_or_else(|e| panic!("{e}"));
    let mut r = hilrig_fpga::Rtl::new(nv).unwrap_or_else(|e| panic!("{e}"));
    let t = std::time::Instant::now();
    for _ in 0..2_000_000 {
        r.tick();
    }
    println!(
        "idle: {:.0} cycles/s, {} passes",
        2e6 / t.elapsed().as_secs_f64(),
        r.passes()
    );
    let (c0, p0) = (r.cycles(), r.passes());
    let t = std::time::Instant::now();
    for i in 0..300_000u32 {
        r.write32(0x4000 + 4 * (i % 1000), i)
            .unwrap_or_else(|e| panic!("{e}"));
        r.read32(0x10 + 4 * (i % 8))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    println!("mmio: {:.0} ops/s", 6e5 / t.elapsed().as_secs_f64());
    println!(
        "per op: {:.2} cycles, {:.2} passes",
        (r.cycles() - c0) as f64 / 6e5,
        (r.passes() - p0) as f64 / 6e5
    );
}
