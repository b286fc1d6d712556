//! `cargo run -p hilrig-campaigns --example campaign -- run campaigns/smoke.toml`:
//! the `hilrig campaign` CLI before the lead wires it into `hilrig`.

use clap::Parser;
use std::process::ExitCode;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<hilrig_campaigns::CampaignCmd>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Some(cmd) => hilrig_campaigns::run(cmd),
        None => hilrig_campaigns::main_job(None),
    };
    match r {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
