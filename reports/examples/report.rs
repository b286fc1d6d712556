//! `cargo run -p hilrig-reports --example report -- --sample 7 --prev-sample 6 -o /tmp/demo`
//! The same command line as `hilrig report`, for trying the reports out standalone.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "report",
    about = "Render JUnit, JSON and HTML reports of a run"
)]
struct Cli {
    #[command(flatten)]
    cmd: hilrig_reports::ReportCmd,
}

fn main() -> std::process::ExitCode {
    match hilrig_reports::run(Cli::parse().cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
