//! The flow subcommands standalone, until the `hilrig` binary wires them in:
//! `cargo run -p hilrig-flow --example flow -- synth --board alchitry-cu ...`.

use clap::Parser;
use hilrig_flow::cli::{run, FlowCommand};

#[derive(Debug, Parser)]
#[command(about = "hilrig-flow: iCE40 flow and flash programmer")]
struct Cli {
    #[command(subcommand)]
    cmd: FlowCommand,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli.cmd, &mut std::io::stdout()) {
        eprintln!("error: {e}");
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            eprintln!("  caused by: {s}");
            src = s.source();
        }
        std::process::exit(1);
    }
}
