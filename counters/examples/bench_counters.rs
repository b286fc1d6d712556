//! Run the counters benchmark: `cargo run --release -p hilrig-counters --example
//! bench_counters [SECONDS]` (PostgreSQL too when HILRIG_TEST_PG is set).

fn main() -> anyhow::Result<()> {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let pg = std::env::var("HILRIG_TEST_PG")
        .ok()
        .filter(|s| !s.is_empty());
    let figs = hilrig_counters::bench::bench_counters(
        std::time::Duration::from_secs_f64(secs),
        pg.as_deref(),
    )?;
    for f in &figs {
        let ratio = f
            .baseline
            .and_then(|b| figs.get(b))
            .map(|b| format!("{:.3}x", f.value / b.value))
            .unwrap_or_default();
        println!(
            "{:<60} {:>14.0} {:<10} {:>8}  {}",
            f.name,
            f.value,
            f.unit,
            ratio,
            f.target.clone().unwrap_or_default()
        );
    }
    Ok(())
}
