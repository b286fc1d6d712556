//! Run `bench_vm_exit` once and print the figures: `cargo run --release -p hilrig-bench --example bench_vm_exit [seconds]`.

fn main() -> anyhow::Result<()> {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let figs = hilrig_bench::vm_exit::bench_vm_exit(std::time::Duration::from_secs_f64(secs))?;
    for f in &figs {
        let ratio = f
            .baseline
            .and_then(|i| figs.get(i))
            .map(|b| format!("  ({:.3} x {})", f.value / b.value, b.name))
            .unwrap_or_default();
        let target = f
            .target
            .as_deref()
            .map(|t| format!("  [target {t}]"))
            .unwrap_or_default();
        println!("{:70} {:>14.1} {}{ratio}{target}", f.name, f.value, f.unit);
    }
    Ok(())
}
