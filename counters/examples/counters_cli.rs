//! `hilrig counters ...` as a stand-alone program, until (and besides) the `hilrig`
//! binary embeds it: `cargo run -p hilrig-counters --example counters_cli -- verify ...`.

use clap::Parser;

#[derive(Parser)]
#[command(name = "hilrig-counters", about = "The counters attestation service")]
struct Cli {
    #[command(subcommand)]
    cmd: hilrig_counters::CountersCmd,
}

fn main() -> std::process::ExitCode {
    match hilrig_counters::run(Cli::parse().cmd) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
