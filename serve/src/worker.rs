//! Campaign workers: take the oldest queued campaign from the store (two
//! workers never take the same one), run it with the campaign runner into the
//! same store, record the outcome on the queue entry, then notify the
//! campaign's webhooks.

use crate::db::Db;
use crate::webhook::{self, Retry};
use crate::Result;
use hilrig_campaigns::runner::{run_campaign, RunOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often a running campaign's queue entry is read for a cancel request.
const CANCEL_POLL: Duration = Duration::from_millis(250);

/// How a worker runs campaigns.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Output directory of the runs.
    pub out_dir: PathBuf,
    /// Simulated hosts.
    pub hosts: usize,
    /// The VMM (default: found as the runner finds it).
    pub vmm: Option<PathBuf>,
    /// Arguments before the VMM flags.
    pub vmm_args: Vec<String>,
    /// This worker's name in the queue.
    pub name: String,
    /// Webhook delivery.
    pub retry: Retry,
}

/// What one take did.
#[derive(Debug)]
pub struct Took {
    /// The queue entry.
    pub queue_id: i64,
    /// The run, if it started.
    pub run_id: Option<String>,
    /// `done`, `cancelled` or `failed`.
    pub state: String,
    /// Summary or error.
    pub message: String,
    /// Webhook results: (url, Ok(attempts) or why delivery failed).
    pub webhooks: Vec<(String, std::result::Result<u32, webhook::WebhookError>)>,
}

/// Take one queued campaign and run it. `Ok(None)`: the queue is empty.
/// Blocking (the runner has its own runtime): call it from a plain thread.
pub fn take_one(db: &Arc<Db>, o: &WorkerOptions) -> Result<Option<Took>> {
    let name = o.name.clone();
    let Some(q) = db.blocking(move |s| s.queue_take(&name))? else {
        return Ok(None);
    };
    let mut opts = RunOptions::new(PathBuf::from(format!("queue-{}.toml", q.id)));
    opts.campaign_text = Some(q.campaign_text.clone());
    opts.out_dir = o.out_dir.clone();
    opts.db = Some(PathBuf::from(db.spec()));
    opts.hosts = o.hosts;
    opts.vmm = o.vmm.clone();
    opts.vmm_args = o.vmm_args.clone();
    opts.progress = Some(false);
    // A cancel request while it runs (`cancel-requested` on the queue entry):
    // a watcher sees it and tells the runner, which starts no further case.
    let cancel = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (db, cancel, stop, id) = (db.clone(), cancel.clone(), stop.clone(), q.id);
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match db.blocking(move |s| s.queue_entry(id)) {
                    Ok(Some(e)) if e.state == "cancel-requested" => {
                        cancel.store(true, Ordering::SeqCst);
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("queue entry {id}: reading its state: {e}"),
                }
                std::thread::sleep(CANCEL_POLL);
            }
        })
    };
    opts.cancel = Some(cancel.clone());
    let ran = run_campaign(opts);
    stop.store(true, Ordering::SeqCst);
    let _ = watcher.join();
    let (state, run_id, message) = match ran {
        Ok(s) if s.cancelled => {
            let c = &s.counts;
            (
                "cancelled",
                Some(s.run_id.clone()),
                format!(
                    "cancelled while running: {} of {} cases ran ({} pass, {} fail); the rest SKIPPED",
                    c.total - c.skipped,
                    c.total,
                    c.pass,
                    c.fail
                ),
            )
        }
        Ok(s) => {
            let c = &s.counts;
            (
                "done",
                Some(s.run_id.clone()),
                format!(
                    "{} cases: {} pass, {} fail, {} timeout, {} infra, {} flaky, {} skipped",
                    c.total, c.pass, c.fail, c.timeout, c.infra, c.flaky, c.skipped
                ),
            )
        }
        Err(e) => ("failed", None, format!("{e:#}")),
    };
    let (id, st, rid, msg) = (q.id, state.to_string(), run_id.clone(), message.clone());
    db.blocking(move |s| s.queue_update(id, &st, rid.as_deref(), &msg))?;
    let mut webhooks = vec![];
    if let Some(r) = &run_id {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| crate::ServeError::Io {
                what: "webhook runtime".into(),
                source,
            })?;
        webhooks = rt.block_on(webhook::notify_run(db, r, o.retry))?;
    }
    Ok(Some(Took {
        queue_id: q.id,
        run_id,
        state: state.into(),
        message,
        webhooks,
    }))
}
