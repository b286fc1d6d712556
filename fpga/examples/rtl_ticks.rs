//! Profile helper: idle ticks and MMIO through `Rtl`.
//! `rtl_ticks [IDLE_TICKS [MMIO_PAIRS]]` (default 2,000,000 and 300,000); e.g.
//! `valgrind --tool=callgrind target/debug/examples/rtl_ticks 200000 0`.
use hilrig_device::device::Device;
use hilrig_device::state::{DeviceConfig, NvState};
fn main() {
    let arg = |i: usize, d: u32| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(d)
    };
    let (idle, pairs) = (arg(1, 2_000_000), arg(2, 300_000));
    let nv = NvState::factory(DeviceConfig::default(), 1).unwrap_or_else(|e| panic!("{e}"));
    let mut r = hilrig_fpga::Rtl::new(nv).unwrap_or_else(|e| panic!("{e}"));
    let t = std::time::Instant::now();
    for _ in 0..idle {
        r.tick();
    }
    println!(
        "idle: {:.0} cycles/s, {} passes",
        idle as f64 / t.elapsed().as_secs_f64(),
        r.passes()
    );
    let (c0, p0) = (r.cycles(), r.passes());
    let t = std::time::Instant::now();
    for i in 0..pairs {
        r.write32(0x4000 + 4 * (i % 1000), i)
            .unwrap_or_else(|e| panic!("{e}"));
        r.read32(0x10 + 4 * (i % 8))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let ops = 2.0 * pairs.max(1) as f64;
    println!("mmio: {:.0} ops/s", ops / t.elapsed().as_secs_f64());
    println!(
        "per op: {:.2} cycles, {:.2} passes",
        (r.cycles() - c0) as f64 / ops,
        (r.passes() - p0) as f64 / ops
    );
}
