//! Scale-out: several runners (processes, on one or several controllers) share one
//! campaign run through the PostgreSQL results store.
//!
//! The run's cases are queued in `run_queue` (one row per case: `queued`, `claimed`
//! by a runner until a lease expiry on the database server's clock, or `done`). A
//! runner claims the next case with `SELECT ... FOR UPDATE SKIP LOCKED` (concurrent
//! claims never wait for each other nor get the same case), renews its claim by
//! heartbeat while the case runs, and stores the result and marks the case `done`
//! in one transaction — only while it still holds the claim (same claimant and
//! generation), so a case is stored exactly once. A runner that dies stops
//! renewing: once its lease expires another runner takes the case over and records
//! the lost claim as an INFRA attempt (`lost` lists the claimants that lost it).
//!
//! SQLite stays single-runner: [`ClaimQueue::open`] refuses anything but a
//! `postgresql://` URL.

use crate::error::{RunError, RunResult};
use crate::store::{is_pg, migrate_all, pg_put_case, settings};
use hilrig_reports::CaseResult;
use std::time::Duration;

/// Errors of the claim queue.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The store is not PostgreSQL.
    #[error(
        "results store {0}: sharing a run between runners needs a PostgreSQL store \
         (`--db postgresql://...`); a SQLite store has a single runner"
    )]
    NotPostgres(String),
    /// PostgreSQL said no.
    #[error("claim queue {db}: {what}: {source}")]
    Postgres {
        /// The database (URL, password redacted).
        db: String,
        /// What was being done.
        what: String,
        /// Cause.
        source: postgres::Error,
    },
    /// Connecting or migrating (hilrig-db).
    #[error("claim queue: {0}")]
    Db(#[from] hilrig_db::DbError),
    /// A value cannot be stored or a row makes no sense.
    #[error("claim queue {db}: {what}")]
    Data {
        /// The database.
        db: String,
        /// What is wrong.
        what: String,
    },
}

type Result<T> = std::result::Result<T, ClaimError>;

/// A case this runner holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The run.
    pub run_id: String,
    /// The case id.
    pub case_id: String,
    /// Bumped by every claim: a stale holder's renew/complete is refused.
    pub generation: i64,
    /// Runners whose claim on this case expired before they finished it (oldest
    /// first): each is an INFRA attempt of the case.
    pub lost: Vec<String>,
}

/// A row of a run's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedCase {
    /// The case id.
    pub case_id: String,
    /// `queued`, `claimed` or `done`.
    pub state: String,
    /// The runner holding (or that finished) it.
    pub claimant: Option<String>,
    /// Runners whose claim on it expired.
    pub lost: Vec<String>,
}

/// The state of a run's queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueState {
    /// Not claimed yet.
    pub queued: u64,
    /// Claimed, lease still running.
    pub claimed: u64,
    /// Claimed, lease expired (the claimant stopped renewing): claimable.
    pub expired: u64,
    /// Finished and stored.
    pub done: u64,
}

impl QueueState {
    /// Nothing left to claim now or later.
    pub fn finished(&self) -> bool {
        self.queued + self.claimed + self.expired == 0
    }
}

/// The claim queue of the PostgreSQL results store (its own connection).
pub struct ClaimQueue {
    client: postgres::Client,
    name: String,
}

fn pg_err(db: &str, what: &str) -> impl FnOnce(postgres::Error) -> ClaimError {
    let (db, what) = (db.to_string(), what.to_string());
    move |source| ClaimError::Postgres { db, what, source }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(0.001)
}

impl ClaimQueue {
    /// Connect to the store `spec` (a `postgresql://` URL; anything else is
    /// [`ClaimError::NotPostgres`]) and make sure the queue table exists.
    pub fn open(spec: &str) -> Result<ClaimQueue> {
        let name = hilrig_db::redact(spec);
        if !is_pg(spec) {
            return Err(ClaimError::NotPostgres(name));
        }
        let mut client = hilrig_db::connect_pg(spec, &settings())?;
        migrate_all(hilrig_db::ConnMut::Pg(&mut client), &name)?;
        Ok(ClaimQueue { client, name })
    }

    fn pg(&self, what: &str) -> impl FnOnce(postgres::Error) -> ClaimError {
        pg_err(&self.name, what)
    }

    /// Record the run `row` unless a runner already did (several runners started
    /// with the same `--join` id race here: exactly one inserts). Whether this call
    /// created it.
    pub fn create_run_if_absent(
        &mut self,
        row: &crate::store::RunRow,
        hosts: &str,
    ) -> Result<bool> {
        let e = self.pg("creating run");
        let n = self
            .client
            .execute(
                "INSERT INTO runs (id, campaign, file, run_dir, started_ms, hosts)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
                &[
                    &row.id,
                    &row.campaign,
                    &row.file,
                    &row.run_dir,
                    &(row.started_ms as i64),
                    &hosts,
                ],
            )
            .map_err(e)?;
        Ok(n == 1)
    }

    /// Queue `case_ids` (in this order) for `run_id`; cases already queued,
    /// claimed or done are left as they are, so every runner may call this.
    pub fn enqueue(&mut self, run_id: &str, case_ids: &[String]) -> Result<()> {
        let what = "queueing cases";
        let mut run = || -> std::result::Result<(), postgres::Error> {
            let mut tx = self.client.transaction()?;
            for (i, id) in case_ids.iter().enumerate() {
                tx.execute(
                    "INSERT INTO run_queue (run_id, case_id, ord) VALUES ($1, $2, $3)
                     ON CONFLICT (run_id, case_id) DO NOTHING",
                    &[&run_id, id, &(i as i32)],
                )?;
            }
            tx.commit()
        };
        run().map_err(pg_err(&self.name, what))
    }

    /// Claim the next case of `run_id` for `claimant` for `ttl`: a queued one, or
    /// one whose claimant's lease expired (that claimant is added to
    /// [`Claim::lost`]). `None` when nothing is claimable now.
    pub fn claim(&mut self, run_id: &str, claimant: &str, ttl: Duration) -> Result<Option<Claim>> {
        let name = self.name.clone();
        let e = || pg_err(&name, "claiming a case");
        let mut tx = self.client.transaction().map_err(e())?;
        let row = tx
            .query_opt(
                "SELECT case_id FROM run_queue WHERE run_id = $1
                   AND (state = 'queued' OR (state = 'claimed' AND lease_expires < clock_timestamp()))
                 ORDER BY ord LIMIT 1 FOR UPDATE SKIP LOCKED",
                &[&run_id],
            )
            .map_err(e())?;
        let Some(row) = row else {
            tx.commit().map_err(e())?;
            return Ok(None);
        };
        let case_id: String = row.get(0);
        let r = tx
            .query_one(
                "UPDATE run_queue SET
                   lost = CASE WHEN state = 'claimed' THEN array_append(lost, claimant) ELSE lost END,
                   state = 'claimed', claimant = $3, generation = generation + 1,
                   lease_expires = clock_timestamp() + make_interval(secs => $4)
                 WHERE run_id = $1 AND case_id = $2 RETURNING generation, lost",
                &[&run_id, &case_id, &claimant, &secs(ttl)],
            )
            .map_err(e())?;
        let claim = Claim {
            run_id: run_id.to_string(),
            case_id,
            generation: r.get(0),
            lost: r.get(1),
        };
        tx.commit().map_err(e())?;
        Ok(Some(claim))
    }

    /// Extend `claim` by `ttl` from now. `false` when it is no longer ours (taken
    /// over after expiry, or finished).
    pub fn renew(&mut self, claim: &Claim, claimant: &str, ttl: Duration) -> Result<bool> {
        let e = self.pg("renewing a claim");
        let n = self
            .client
            .execute(
                "UPDATE run_queue SET lease_expires = clock_timestamp() + make_interval(secs => $5)
                 WHERE run_id = $1 AND case_id = $2 AND claimant = $3 AND generation = $4
                   AND state = 'claimed'",
                &[
                    &claim.run_id,
                    &claim.case_id,
                    &claimant,
                    &claim.generation,
                    &secs(ttl),
                ],
            )
            .map_err(e)?;
        Ok(n == 1)
    }

    /// Store `result` and mark the case done, in one transaction, if `claim` is
    /// still ours. `false` (nothing stored) when another runner took the case over.
    pub fn complete(&mut self, claim: &Claim, claimant: &str, result: &CaseResult) -> Result<bool> {
        if result.id != claim.case_id {
            return Err(ClaimError::Data {
                db: self.name.clone(),
                what: format!(
                    "the result of case {} offered for the claim on case {}",
                    result.id, claim.case_id
                ),
            });
        }
        let json = serde_json::to_string(result).map_err(|err| ClaimError::Data {
            db: self.name.clone(),
            what: format!("case {}: {err}", result.id),
        })?;
        let name = self.name.clone();
        let e = || pg_err(&name, "completing a case");
        let mut tx = self.client.transaction().map_err(e())?;
        let n = tx
            .execute(
                "UPDATE run_queue SET state = 'done', lease_expires = NULL
                 WHERE run_id = $1 AND case_id = $2 AND claimant = $3 AND generation = $4
                   AND state = 'claimed'",
                &[&claim.run_id, &claim.case_id, &claimant, &claim.generation],
            )
            .map_err(e())?;
        if n != 1 {
            tx.rollback().map_err(e())?;
            return Ok(false);
        }
        pg_put_case(&mut tx, &claim.run_id, result, &json)
            .map_err(pg_err(&name, "storing the case"))?;
        tx.commit().map_err(e())?;
        Ok(true)
    }

    /// How far `run_id` is.
    pub fn state(&mut self, run_id: &str) -> Result<QueueState> {
        let e = self.pg("reading the queue");
        let rows = self
            .client
            .query(
                "SELECT CASE WHEN state = 'claimed' AND lease_expires < clock_timestamp()
                             THEN 'expired' ELSE state END AS s, count(*)
                 FROM run_queue WHERE run_id = $1 GROUP BY s",
                &[&run_id],
            )
            .map_err(e)?;
        let mut q = QueueState::default();
        for r in rows {
            let (s, n): (String, i64) = (r.get(0), r.get(1));
            let n = n.max(0) as u64;
            match s.as_str() {
                "queued" => q.queued = n,
                "claimed" => q.claimed = n,
                "expired" => q.expired = n,
                "done" => q.done = n,
                other => {
                    return Err(ClaimError::Data {
                        db: self.name.clone(),
                        what: format!("run {run_id}: unknown queue state {other:?}"),
                    })
                }
            }
        }
        Ok(q)
    }

    /// Every queued case of `run_id` with its state and claimant, in queue order.
    pub fn list(&mut self, run_id: &str) -> Result<Vec<QueuedCase>> {
        let e = self.pg("listing the queue");
        Ok(self
            .client
            .query(
                "SELECT case_id, state, claimant, lost FROM run_queue WHERE run_id = $1 ORDER BY ord",
                &[&run_id],
            )
            .map_err(e)?
            .into_iter()
            .map(|r| QueuedCase {
                case_id: r.get(0),
                state: r.get(1),
                claimant: r.get(2),
                lost: r.get(3),
            })
            .collect())
    }
}

/// A default claimant name: `<hostname>:<pid>`.
pub fn default_claimant() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", std::process::id())
}

/// Default claim lease: a runner that dies gives its cases back after this.
pub const DEFAULT_CLAIM_TTL: Duration = Duration::from_secs(60);

/// A run id given to `--join`: it becomes a directory name, so 1-64 bytes of
/// `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
pub fn check_run_id(id: &str) -> std::result::Result<(), BadRunId> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with(['.', '-'])
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(BadRunId(id.chars().take(80).collect()))
    }
}

/// A run id that cannot name a run directory.
#[derive(Debug, thiserror::Error)]
#[error(
    "run id {0:?}: must be 1-64 bytes of A-Z a-z 0-9 . _ - and not start with . or - \
     (it names the run directory)"
)]
pub struct BadRunId(pub String);

use crate::format::Case;
use crate::runner::{run_case, Ctx};
use hilrig_reports::{Attempt, Metrics, Outcome};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The queue shared by a runner's workers. The synchronous PostgreSQL client
/// must not be dropped on a tokio worker (it runs its own runtime): the last
/// reference, wherever it goes, drops it on a plain thread.
struct QueueCell(Option<ClaimQueue>);

impl Drop for QueueCell {
    fn drop(&mut self) {
        if let Some(q) = self.0.take() {
            std::thread::scope(|s| {
                s.spawn(move || drop(q));
            });
        }
    }
}

type Queue = Arc<Mutex<QueueCell>>;

/// Run `f` on the queue off the tokio workers (the PostgreSQL client blocks).
async fn blocking<T: Send + 'static>(
    q: &Queue,
    f: impl FnOnce(&mut ClaimQueue) -> Result<T> + Send + 'static,
) -> RunResult<T> {
    let q = q.clone();
    let r = tokio::task::spawn_blocking(move || {
        let mut q = q.lock().unwrap_or_else(|p| p.into_inner());
        match q.0.as_mut() {
            Some(q) => f(q).map_err(RunError::from),
            None => Err(RunError::QueueClosed),
        }
    })
    .await
    .map_err(|source| RunError::Task {
        what: "claim queue task",
        source,
    })?;
    r
}

/// The INFRA attempts of runners that lost their claim on a case.
fn lost_attempts(lost: &[String]) -> Vec<Attempt> {
    lost.iter()
        .map(|r| Attempt {
            outcome: Outcome::Infra,
            host: format!("runner {r}"),
            duration_ms: 0,
            message: format!(
                "runner {r} claimed the case and stopped renewing its claim (died or cut \
                 off); the claim expired and the case was taken over"
            ),
            build: None,
        })
        .collect()
}

/// A case given up without running: its claims were lost more often than its
/// INFRA retries allow (a case that takes its runners down).
fn given_up(case: &Case, lost: &[String]) -> CaseResult {
    let attempts = lost_attempts(lost);
    CaseResult {
        id: case.id.clone(),
        attack: case.attack.name.to_string(),
        backend: case.backend.to_string(),
        profile: if case.enforce {
            case.profile.clone()
        } else {
            format!("{}+enforce-off", case.profile)
        },
        host_tag: case.tag.clone(),
        host: String::new(),
        outcome: Outcome::Infra,
        duration_ms: 0,
        message: format!(
            "{} runners lost their claim on this case ({}); more than its {} INFRA retries: \
             not run again",
            lost.len(),
            lost.join(", "),
            case.infra_retries
        ),
        attempts,
        expected: case.expect.describe(),
        observed: String::new(),
        metrics: Metrics::default(),
        artifacts: Vec::new(),
    }
}

/// Run the shared run `ctx.run_id`: queued cases are claimed one at a time per
/// host of this runner until none is left queued or claimed by a live runner.
pub(crate) async fn run_shared(
    ctx: Arc<Ctx>,
    cases: Vec<Case>,
    queue: ClaimQueue,
    claimant: String,
    ttl: Duration,
) -> RunResult<()> {
    let queue: Queue = Arc::new(Mutex::new(QueueCell(Some(queue))));
    let cases: Arc<BTreeMap<String, Case>> =
        Arc::new(cases.into_iter().map(|c| (c.id.clone(), c)).collect());
    ctx.line(&format!(
        "runner {claimant}: sharing run {} through the PostgreSQL store (claim lease {:.1} s)",
        ctx.run_id,
        ttl.as_secs_f64()
    ));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..ctx.hosts().max(1) {
        set.spawn(worker(
            ctx.clone(),
            cases.clone(),
            queue.clone(),
            claimant.clone(),
            ttl,
        ));
    }
    let mut first_err = None;
    while let Some(j) = set.join_next().await {
        let r = j
            .map_err(|source| RunError::Task {
                what: "runner worker",
                source,
            })
            .and_then(|r| r);
        if let Err(e) = r {
            if first_err.is_none() {
                first_err = Some(e);
            }
            set.abort_all();
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn worker(
    ctx: Arc<Ctx>,
    cases: Arc<BTreeMap<String, Case>>,
    queue: Queue,
    claimant: String,
    ttl: Duration,
) -> RunResult<()> {
    let poll = (ttl / 4).clamp(Duration::from_millis(50), Duration::from_millis(500));
    let run_id = ctx.run_id.clone();
    loop {
        // Cancelled: this runner takes no more cases (others sharing the run go on).
        if ctx.cancelled() {
            return Ok(());
        }
        let (r, c) = (run_id.clone(), claimant.clone());
        let Some(claim) = blocking(&queue, move |q| q.claim(&r, &c, ttl)).await? else {
            let r = run_id.clone();
            if blocking(&queue, move |q| q.state(&r)).await?.finished() {
                return Ok(());
            }
            // Others hold the rest: wait, to take over a case whose runner dies.
            tokio::time::sleep(poll).await;
            continue;
        };
        let Some(case) = cases.get(&claim.case_id) else {
            return Err(RunError::UnknownQueuedCase {
                run: run_id.clone(),
                case: claim.case_id.clone(),
            });
        };
        let result = if claim.lost.len() as u32 > case.infra_retries {
            given_up(case, &claim.lost)
        } else {
            let hb = {
                let (queue, claim, claimant) = (queue.clone(), claim.clone(), claimant.clone());
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(ttl / 3).await;
                        let (cl, who) = (claim.clone(), claimant.clone());
                        match blocking(&queue, move |q| q.renew(&cl, &who, ttl)).await {
                            Ok(true) => {}
                            Ok(false) => {
                                tracing::warn!(
                                    "runner {claimant}: lost the claim on {}",
                                    claim.case_id
                                );
                                return;
                            }
                            Err(e) => tracing::warn!("runner {claimant}: renewing a claim: {e}"),
                        }
                    }
                })
            };
            let mut r = run_case(ctx.clone(), case.clone()).await;
            hb.abort();
            r.attempts.splice(0..0, lost_attempts(&claim.lost));
            r
        };
        let (cl, who) = (claim.clone(), claimant.clone());
        let (stored, result) = blocking(&queue, move |q| {
            let s = q.complete(&cl, &who, &result);
            s.map(|s| (s, result))
        })
        .await?;
        if stored {
            ctx.finished(&result);
        } else {
            ctx.line(&format!(
                "runner {claimant}: case {} was taken over by another runner (claim expired); \
                 this result is discarded",
                claim.case_id
            ));
        }
    }
}
