//! Run the counters benchmark: `cargo run --release -p hilrig-bench --example
//! bench_counters [SECONDS]` (PostgreSQL too when HILRIG_TEST_PG is set).

use clap::Parser;

/// The scale rows run `counters status|master` as child processes of this
/// executable (as they run `hilrig counters ...` under `hilrig bench counters`).
#[derive(Parser)]
struct Child {
    #[command(subcommand)]
    cmd: hilrig_counters::CountersCmd,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("counters") {
        let c = Child::parse_from(args.iter().skip(1));
        let code = hilrig_counters::run(c.cmd)?;
        if code != std::process::ExitCode::SUCCESS {
            anyhow::bail!("counters exited {code:?}");
        }
        return Ok(());
    }
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let pg = std::env::var("HILRIG_TEST_PG")
        .ok()
        .filter(|s| !s.is_empty());
    let figs = hilrig_bench::counters::bench_counters(
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
