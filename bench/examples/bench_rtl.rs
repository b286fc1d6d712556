//! Print the `bench_rtl` figures (release build recommended).
fn main() {
    let secs = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    match hilrig_bench::rtl::bench_rtl(std::time::Duration::from_secs_f64(secs)) {
        Ok(figs) => {
            for f in &figs {
                let ratio = f
                    .baseline
                    .map(|b| format!("  ({:.2}x of #{b})", f.value / figs[b].value))
                    .unwrap_or_default();
                println!("{:60} {:>14.0} {}{ratio}", f.name, f.value, f.unit);
            }
        }
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::exit(1);
        }
    }
}
