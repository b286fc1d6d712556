//! `hilrig rig` without the main binary: `cargo run -p hilrig-rig --example rig -- check rig/inventory/sim.toml`.

use clap::Parser;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "rig", about = "hilrig rig controller")]
struct Cli {
    #[command(subcommand)]
    cmd: hilrig_rig::RigCmd,
}

fn main() -> ExitCode {
    match hilrig_rig::run(Cli::parse().cmd) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
