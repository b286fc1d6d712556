//! `hilrig serve ...` and `hilrig runs ...`: the command-line edge (anyhow here only).

use crate::auth;
use crate::db::Db;
use crate::history::case_history;
use crate::server::{outcome_letter, AppState, DEFAULT_NIGHTS, MAX_NIGHTS};
use crate::worker::{take_one, WorkerOptions};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;

/// Default results store (as `hilrig campaign run` writes it).
pub const DEFAULT_DB: &str = "hilrig-out/results.sqlite";

/// `hilrig serve`: the lab service.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeCmd {
    /// Results store: a SQLite file or a postgresql:// URL.
    #[arg(long, global = true, default_value = DEFAULT_DB)]
    pub db: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8019")]
    pub listen: String,
    /// Store connections.
    #[arg(long, default_value_t = 4)]
    pub conns: usize,
    #[command(subcommand)]
    /// What else to do.
    pub sub: Option<ServeSub>,
}

/// Subcommands of `hilrig serve`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ServeSub {
    /// API tokens.
    Token {
        #[command(subcommand)]
        /// What to do.
        cmd: TokenCmd,
    },
    /// Take queued campaigns from the store and run them.
    Worker {
        /// Output directory of the runs.
        #[arg(long, default_value = "hilrig-out")]
        out: PathBuf,
        /// Simulated hosts.
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        /// The VMM executable.
        #[arg(long)]
        vmm: Option<PathBuf>,
        /// Take one campaign (if any is queued) and exit.
        #[arg(long)]
        once: bool,
        /// Seconds between looks at an empty queue.
        #[arg(long, default_value_t = 5)]
        poll: u64,
    },
    /// Add a webhook to a campaign.
    Webhook {
        /// The campaign.
        campaign: String,
        /// http://host:port/path
        url: String,
        /// HMAC-SHA256 key (at least 16 characters).
        #[arg(long)]
        secret: String,
    },
}

/// `hilrig serve token ...`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum TokenCmd {
    /// Create (or replace) user NAME's token; prints it once (only its hash is stored).
    Add {
        /// The user.
        name: String,
    },
}

/// Run `hilrig serve`.
pub fn serve(cmd: ServeCmd) -> Result<ExitCode> {
    match cmd.sub {
        Some(ServeSub::Token {
            cmd: TokenCmd::Add { name },
        }) => {
            let db = Db::open(&cmd.db, 1)?;
            let t = auth::add_token(&db, &name)?;
            println!("{t}");
            eprintln!("token of {name} stored (hashed); it is shown only now");
            Ok(ExitCode::SUCCESS)
        }
        Some(ServeSub::Webhook {
            campaign,
            url,
            secret,
        }) => {
            crate::webhook::parse_url(&url)?;
            anyhow::ensure!(secret.len() >= 16, "--secret: at least 16 characters");
            let db = Db::open(&cmd.db, 1)?;
            db.blocking(|s| {
                s.webhook_put(&hilrig_campaigns::store::WebhookRow {
                    campaign,
                    url,
                    secret,
                })
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Some(ServeSub::Worker {
            out,
            hosts,
            vmm,
            once,
            poll,
        }) => {
            let db = Db::open(&cmd.db, 1)?;
            let o = WorkerOptions {
                out_dir: out,
                hosts,
                vmm,
                vmm_args: vec![],
                name: hilrig_rig::lease::default_holder(),
                retry: Default::default(),
            };
            loop {
                match take_one(&db, &o)? {
                    Some(t) => {
                        eprintln!(
                            "queue #{}: {} {}: {}",
                            t.queue_id,
                            t.state,
                            t.run_id.as_deref().unwrap_or("-"),
                            t.message
                        );
                        for (url, r) in &t.webhooks {
                            match r {
                                Ok(n) => eprintln!("  webhook {url}: delivered ({n} attempt(s))"),
                                Err(e) => eprintln!("  webhook {url}: {e}"),
                            }
                        }
                    }
                    None if once => {
                        eprintln!("queue empty");
                        return Ok(ExitCode::SUCCESS);
                    }
                    None => std::thread::sleep(std::time::Duration::from_secs(poll.max(1))),
                }
                if once {
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        None => {
            let db = Db::open(&cmd.db, cmd.conns)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?;
            rt.block_on(async {
                let l = tokio::net::TcpListener::bind(&cmd.listen)
                    .await
                    .with_context(|| format!("listening on {}", cmd.listen))?;
                eprintln!("hilrig serve: http://{}/", l.local_addr()?);
                crate::server::serve(l, AppState::new(db)).await?;
                Ok::<_, anyhow::Error>(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `hilrig runs list|show RUN|history CASE`: the store from the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct RunsCmd {
    /// Results store: a SQLite file or a postgresql:// URL.
    #[arg(long, global = true, default_value = DEFAULT_DB)]
    pub db: String,
    /// JSON output (the API's shapes).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    /// What to show.
    pub cmd: RunsSub,
}

/// Subcommands of `hilrig runs`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum RunsSub {
    /// Runs, newest first.
    List {
        /// Only this campaign.
        #[arg(long)]
        campaign: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One run's cases.
    Show {
        /// The run id.
        run: String,
    },
    /// One case over its last nights.
    History {
        /// The case id (`attack/backend/profile@tag`).
        case: String,
        /// Nights.
        #[arg(long, default_value_t = DEFAULT_NIGHTS)]
        nights: usize,
    },
}

/// Run `hilrig runs`.
pub fn runs(cmd: RunsCmd) -> Result<ExitCode> {
    let db = Db::open(&cmd.db, 1)?;
    match cmd.cmd {
        RunsSub::List { campaign, limit } => {
            let rows = db.blocking(|s| s.run_index(campaign.as_deref(), limit, 0))?;
            if cmd.json {
                let v: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|r| serde_json::json!({"id": r.run.id, "campaign": r.run.campaign, "started_ms": r.run.started_ms, "finished_ms": r.run.finished_ms, "counts": r.counts}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for r in rows {
                    let c = |k: &str| r.counts.get(k).copied().unwrap_or(0);
                    println!(
                        "{:<40} {:<12} {}  pass {} fail {} timeout {} infra {} flaky {} skipped {}{}",
                        r.run.id,
                        r.run.campaign,
                        crate::pages::ts(r.run.started_ms),
                        c("pass"),
                        c("fail"),
                        c("timeout"),
                        c("infra"),
                        c("flaky"),
                        c("skipped"),
                        if r.run.finished_ms.is_none() { "  (running)" } else { "" }
                    );
                }
            }
        }
        RunsSub::Show { run } => {
            let r = db
                .blocking(|s| s.load_run(&run))?
                .with_context(|| format!("no run {run} in the store"))?;
            if cmd.json {
                let summary = hilrig_reports::RunSummary::of(&r, None);
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"summary": summary, "run": r})
                    )?
                );
            } else {
                println!("{} {} ({} cases)", r.campaign, r.id, r.cases.len());
                for c in &r.cases {
                    println!("  {:7} {} on {}: {}", c.outcome, c.id, c.host, c.message);
                }
            }
        }
        RunsSub::History { case, nights } => {
            let n = nights.clamp(1, MAX_NIGHTS);
            let h = db.blocking(|s| case_history(s, &case, n))?;
            anyhow::ensure!(!h.nights.is_empty(), "case {case}: not in the store");
            if cmd.json {
                println!("{}", serde_json::to_string_pretty(&h)?);
            } else {
                let strip: String = h
                    .nights
                    .iter()
                    .rev()
                    .map(|n| outcome_letter(n.outcome))
                    .collect();
                println!(
                    "{} over {} nights (oldest → newest): {strip}",
                    h.case_id,
                    h.nights.len()
                );
                println!(
                    "flake rate {:.1} %, failure rate {:.1} %",
                    h.flake_rate * 100.0,
                    h.fail_rate * 100.0
                );
                if let Some(c) = &h.change {
                    println!(
                        "failing since {} ({}); last good: {}",
                        c.first_bad.run_id,
                        crate::pages::ts(c.first_bad.started_ms),
                        c.last_good
                            .as_ref()
                            .map_or("none shown".into(), |g| g.run_id.clone())
                    );
                }
                for n in &h.nights {
                    println!(
                        "  {} {:<40} {:7} {} {}",
                        crate::pages::ts(n.started_ms),
                        n.run_id,
                        n.outcome,
                        n.host,
                        n.message
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
