//! `hilrig-vmm`: boot a payload with the reference device (same flags as `hilrig vm run`).

use clap::Parser;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "hilrig-vmm",
    version,
    about = "KVM VMM booting guest payloads with the hilrig reference device on PCI"
)]
struct Cli {
    #[command(flatten)]
    vm: hilrig_vmm::VmArgs,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match hilrig_vmm::run_cli(cli.vm) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hilrig-vmm: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
