//! `hilrig campaign ...` and the main job (the embedded smoke campaign).

use crate::runner::{run_campaign, RunOptions, RunSummary};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The smoke campaign, embedded (the file ships as `campaigns/smoke.toml`).
pub const SMOKE: &str = include_str!("../smoke.toml");
/// The nightly campaign, embedded (`campaigns/nightly.toml`).
pub const NIGHTLY: &str = include_str!("../nightly.toml");

/// `hilrig campaign`: run, validate and list.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CampaignCmd {
    /// Run a campaign file on simulated hosts; writes junit.xml, report.json and
    /// report.html into the run directory. Exit: 0 all PASS/FLAKY, 1 any
    /// FAIL/TIMEOUT, 3 INFRA/SKIPPED left (no failure), 2 errors.
    Run {
        /// The campaign file (TOML).
        file: PathBuf,
        /// Simulated hosts (cases run in parallel, one per host).
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        /// Rig inventory: run on its simulated hosts (with their tags) instead.
        #[arg(long)]
        inventory: Option<PathBuf>,
        /// Output directory; the run goes into `<out>/<run id>/`.
        #[arg(long, default_value = "hilrig-out")]
        out: PathBuf,
        /// Results store: a SQLite file or a `postgresql://` URL (the counters
        /// service's choice); default `<out>/results.sqlite`.
        #[arg(long)]
        db: Option<PathBuf>,
        /// Resume an interrupted run: finished cases are kept, the rest run.
        #[arg(long)]
        resume: Option<String>,
        /// The hilrig-vmm executable (default: HILRIG_VMM, next to this binary, target/).
        #[arg(long)]
        vmm: Option<PathBuf>,
        /// Scale-out: join the run RUN in the PostgreSQL store `--db` (created by
        /// the first runner that names it) and share its cases with every other
        /// runner of it. A SQLite store has a single runner.
        #[arg(long, value_name = "RUN")]
        join: Option<String>,
        /// How long a claim on a case lasts without heartbeat (a runner that dies
        /// gives its cases back after this).
        #[arg(long, default_value = "60s", value_parser = hilrig_rig::cli::parse_duration)]
        claim_ttl: std::time::Duration,
        /// This runner's name in claims (default `<hostname>:<pid>`).
        #[arg(long)]
        runner_name: Option<String>,
        /// labgrid: hosts from a coordinator.
        #[command(flatten)]
        lab: Box<LabgridArgs>,
        /// Print the summary as one JSON document on standard output (run id,
        /// counts, exit status, reports, offline hosts, setup errors).
        #[arg(long)]
        json: bool,
    },
    /// Check a campaign file and list the cases it expands to.
    Validate {
        /// The campaign file (TOML).
        file: PathBuf,
        /// Simulated hosts to validate against.
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        /// Rig inventory to validate against (its simulated hosts and tags).
        #[arg(long)]
        inventory: Option<PathBuf>,
    },
    /// List the attack library.
    ListAttacks,
}

/// `campaign run --labgrid ...`.
#[derive(Debug, Clone, clap::Args)]
pub struct LabgridArgs {
    /// Hosts from a labgrid coordinator (HOST:PORT): places reserved by
    /// `--labgrid-tag`s and acquired, released when the run ends. With
    /// `--inventory`, its hosts run beside the places (names must not clash).
    #[arg(long, value_name = "HOST:PORT")]
    pub labgrid: Option<String>,
    /// A tag (KEY=VALUE) every reserved place must carry; repeatable.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_tag)]
    pub labgrid_tag: Vec<(String, String)>,
    /// How many places to reserve (default: --hosts).
    #[arg(long)]
    pub labgrid_places: Option<usize>,
    /// How long to wait for each place: allocated by the coordinator, then
    /// every resource its matches name published by its exporter and available
    /// (not in time: an error naming the place and what is missing).
    #[arg(long, default_value = "5m", value_parser = hilrig_rig::cli::parse_duration)]
    pub labgrid_wait: std::time::Duration,
    /// Our user name at the coordinator (default `<hostname>/hilrig`).
    #[arg(long)]
    pub labgrid_user: Option<String>,
    /// The lab's labgrid config (TOML: `[ssh]` key and pinned host keys for the
    /// places' SSH services, `[power]` readback); see rig/README.md.
    #[arg(long, value_name = "FILE")]
    pub labgrid_config: Option<std::path::PathBuf>,
}

/// A `--labgrid-tag` that is not `KEY=VALUE`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?}: expected KEY=VALUE")]
pub struct BadTag(String);

/// `KEY=VALUE` of `--labgrid-tag`.
fn parse_tag(s: &str) -> Result<(String, String), BadTag> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(BadTag(s.to_string())),
    }
}

/// Print a run's summary and the report path.
pub fn print_summary(s: &RunSummary) {
    let c = &s.counts;
    let mins = s.wall.as_secs_f64() / 60.0;
    eprintln!(
        "run {}: {} cases: {} pass, {} fail, {} timeout, {} infra, {} flaky, {} skipped in {:.1} s ({:.0} cases/min)",
        s.run_id,
        c.total,
        c.pass,
        c.fail,
        c.timeout,
        c.infra,
        c.flaky,
        c.skipped,
        s.wall.as_secs_f64(),
        // Cases run now, not those a resumed run had finished before.
        if mins > 0.0 { s.ran_now as f64 / mins } else { 0.0 }
    );
    for case in &s.run.cases {
        if case.outcome != hilrig_reports::Outcome::Pass {
            eprintln!("  {:7} {}: {}", case.outcome, case.id, case.message);
        }
    }
    if !s.unhealthy_hosts.is_empty() {
        eprintln!("unhealthy hosts: {}", s.unhealthy_hosts.join(", "));
    }
    eprintln!("junit:  {}", s.junit.display());
    println!("{}", s.report_html.display());
}

/// A run's summary as JSON (`campaign run --json`).
pub fn summary_json(s: &RunSummary) -> serde_json::Value {
    serde_json::json!({
        "run_id": s.run_id,
        "campaign": s.run.campaign,
        "exit_status": s.exit_status(),
        "counts": s.counts,
        "wall_s": s.wall.as_secs_f64(),
        "run_dir": s.run_dir,
        "report_html": s.report_html,
        "junit": s.junit,
        "cases": s.run.cases.iter().map(|c| serde_json::json!({
            "id": c.id, "outcome": c.outcome, "host": c.host,
            "attempts": c.attempts.len(), "message": c.message,
        })).collect::<Vec<_>>(),
        "unhealthy_hosts": s.unhealthy_hosts,
        "offline_hosts": s.offline_hosts.iter()
            .map(|(h, why)| serde_json::json!({"host": h, "reason": why}))
            .collect::<Vec<_>>(),
        "config_errors": s.config_errors,
    })
}

/// Run `cmd`; the process exit code (errors are returned; the caller exits 2).
pub fn run(cmd: CampaignCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        CampaignCmd::Run {
            file,
            hosts,
            inventory,
            out,
            db,
            resume,
            vmm,
            join,
            claim_ttl,
            runner_name,
            lab,
            json,
        } => {
            let mut opts = RunOptions::new(file);
            opts.hosts = hosts;
            opts.inventory = inventory;
            opts.out_dir = out;
            opts.db = db;
            opts.resume = resume;
            opts.vmm = vmm;
            opts.join = join;
            opts.claim_ttl = claim_ttl;
            opts.claimant = runner_name;
            let lab = *lab;
            opts.labgrid = lab
                .labgrid
                .map(|address| crate::hostsource::LabgridOptions {
                    address,
                    user: lab.labgrid_user,
                    tags: lab.labgrid_tag.into_iter().collect(),
                    places: lab.labgrid_places.unwrap_or(hosts),
                    wait: lab.labgrid_wait,
                    config: lab.labgrid_config,
                });
            self_as_vmm(&mut opts);
            if json {
                opts.progress = Some(false);
            }
            let s = run_campaign(opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary_json(&s))?);
            } else {
                print_summary(&s);
            }
            Ok(ExitCode::from(s.exit_status()))
        }
        CampaignCmd::Validate {
            file,
            hosts,
            inventory,
        } => {
            let c = crate::runner::validate(&file, inventory.as_deref(), hosts)?;
            for case in &c.cases {
                println!("{:50} expect {}", case.id, case.expect.describe());
            }
            eprintln!(
                "{}: campaign {} is valid: {} cases",
                file.display(),
                c.name,
                c.cases.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        CampaignCmd::ListAttacks => {
            for a in crate::attacks::library() {
                let steps: Vec<&str> = a.steps.iter().map(|s| s.payload).collect();
                println!(
                    "{:26} @{:11} [{}] {}",
                    a.name,
                    a.group,
                    steps.join(" -> "),
                    a.summary
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// When this process is the `hilrig` binary (whose `vm run` is the VMM) and no VMM
/// was named (`--vmm`, `HILRIG_VMM`, an inventory's `lab.vmm`), run cases with this
/// very executable: no separate `hilrig-vmm` build is needed, and the VMM is always
/// the same build as the runner.
fn self_as_vmm(opts: &mut RunOptions) {
    if opts.vmm.is_some() || std::env::var_os("HILRIG_VMM").is_some() || opts.inventory.is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    if exe.file_stem().and_then(|s| s.to_str()) == Some("hilrig") {
        opts.vmm = Some(exe);
        opts.vmm_args = vec!["vm".into(), "run".into()];
    }
}

/// The main job: the embedded smoke campaign on 2 simulated hosts, results store
/// and reports under `out_dir` (default `hilrig-out`); prints the report path.
pub fn main_job(out_dir: Option<&Path>) -> anyhow::Result<ExitCode> {
    let mut opts = RunOptions::new("<embedded>/campaigns/smoke.toml");
    opts.campaign_text = Some(SMOKE.to_string());
    opts.out_dir = out_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("hilrig-out"));
    self_as_vmm(&mut opts);
    let s = run_campaign(opts)?;
    print_summary(&s);
    Ok(ExitCode::from(s.exit_status()))
}
