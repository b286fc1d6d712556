//! The campaign runner: cases spread over (simulated) hosts in parallel with tokio;
//! each attempt runs `hilrig-vmm --json` as a child process on a fresh device state
//! file; outcomes are classified PASS / FAIL / INFRA / TIMEOUT / FLAKY, stored as
//! they finish, and reported at the end.

use crate::attacks::Setup;
use crate::error::{RunError, RunResult};
use crate::format::{self, AlarmExp, Campaign, Case, Counter, Expect, HostSpec};
use crate::store::{RunRow, Store};
use hilrig_counters::decide::Observation;
use hilrig_device::attest::Verdict as CountersVerdict;
use hilrig_device::state::{DeviceConfig, NvState};
use hilrig_device::Region;
use hilrig_reports::{
    Artifact, Attempt, CaseResult, CounterReading, Counts, Host, Metrics, Outcome, Run,
};
use hilrig_vmm_api::{ExitStatus, RunSummary as VmSummary};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What to run and where.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The campaign file (also names the campaign in errors when `campaign_text` is set).
    pub campaign: PathBuf,
    /// The campaign's text, when it is embedded rather than read from `campaign`.
    pub campaign_text: Option<String>,
    /// Number of simulated hosts (parallel cases) when there is no inventory.
    pub hosts: usize,
    /// A rig inventory (TOML): its simulated hosts, with their tags, are used
    /// instead of `hosts` anonymous ones; its `lab.vmm` is the default VMM.
    pub inventory: Option<PathBuf>,
    /// Output directory; each run gets `<out>/<run id>/`.
    pub out_dir: PathBuf,
    /// Results store: a SQLite file or a `postgresql://` URL; default
    /// `<out>/results.sqlite`.
    pub db: Option<PathBuf>,
    /// Resume this run: skip its finished cases.
    pub resume: Option<String>,
    /// The `hilrig-vmm` executable; default: found like the rig finds it
    /// (`HILRIG_VMM`, next to the running executable, the workspace target dir).
    pub vmm: Option<PathBuf>,
    /// Arguments put before the VMM flags (e.g. `["vm", "run"]` when `vmm` is the
    /// `hilrig` executable itself, whose `vm run` is the VMM).
    pub vmm_args: Vec<String>,
    /// Progress: `None` = a bar on a terminal, plain lines otherwise.
    pub progress: Option<bool>,
    /// Scale-out (PostgreSQL store only): join the run with this id, creating it
    /// if no runner has yet; its cases are shared with every runner that joins it
    /// (see [`crate::claim`]). `None`: a new run (still joinable by its id when
    /// the store is PostgreSQL).
    pub join: Option<String>,
    /// This runner's name in claims (default `<hostname>:<pid>`).
    pub claimant: Option<String>,
    /// How long a claim on a case lasts without a heartbeat (renewed every
    /// third of it): a runner that dies gives its cases back after this.
    pub claim_ttl: Duration,
    /// Hosts from a labgrid coordinator (places reserved by tags) instead of
    /// `hosts` ([`crate::hostsource::LabgridSource`]); with `inventory` too, the
    /// inventory's hosts plus the places ([`crate::hostsource::MixedSource`]).
    pub labgrid: Option<crate::hostsource::LabgridOptions>,
    /// Set from outside (the lab service's worker, on a cancel request) to stop
    /// the run: no case starts after it is set; cases not started end SKIPPED
    /// ("run cancelled"); attempts already running finish (bounded by their
    /// timeouts) and are kept.
    pub cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Bounds of the recovery of a wedged SSH host after an INFRA attempt
    /// (soft -> hard -> power cycle through the inventory's power driver, then
    /// the wait for SSH and `hilrig --version`): see [`hilrig_rig::recover`].
    pub recover: hilrig_rig::recover::RecoverOptions,
    /// The `hilrig` executable whose `fpga serve-sim` simulates a board for `fpga`
    /// cases on hosts without one; default: the VMM when it is `hilrig`, else
    /// `hilrig` beside it.
    pub fpga_sim: Option<PathBuf>,
    /// Arguments appended to `hilrig fpga serve-sim` (e.g. `--engine verilator`).
    pub fpga_sim_args: Vec<String>,
}

impl RunOptions {
    /// Options for `campaign` with defaults: 2 hosts, out dir `hilrig-out`.
    pub fn new(campaign: impl Into<PathBuf>) -> RunOptions {
        RunOptions {
            campaign: campaign.into(),
            campaign_text: None,
            hosts: 2,
            inventory: None,
            out_dir: PathBuf::from("hilrig-out"),
            db: None,
            resume: None,
            vmm: None,
            vmm_args: Vec::new(),
            progress: None,
            join: None,
            claimant: None,
            claim_ttl: crate::claim::DEFAULT_CLAIM_TTL,
            labgrid: None,
            cancel: None,
            recover: hilrig_rig::recover::RecoverOptions::default(),
            fpga_sim: None,
            fpga_sim_args: Vec::new(),
        }
    }
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Run id.
    pub run_id: String,
    /// Run directory (artifacts, reports).
    pub run_dir: PathBuf,
    /// `report.html`.
    pub report_html: PathBuf,
    /// `junit.xml`.
    pub junit: PathBuf,
    /// Counts by outcome.
    pub counts: Counts,
    /// The results model written to the reports.
    pub run: Run,
    /// Wall time of this invocation.
    pub wall: Duration,
    /// Cases run by this invocation (fewer than `counts.total` on a resume):
    /// the rate is these over `wall`.
    pub ran_now: usize,
    /// Hosts that ended the run unhealthy (too many INFRA attempts in a row).
    pub unhealthy_hosts: Vec<String>,
    /// Hosts taken offline by a failed health check, with the reason.
    pub offline_hosts: Vec<(String, String)>,
    /// Setup errors met by attempts (a VMM that cannot be run, ...): CONFIG, never
    /// retried; their cases are SKIPPED and the run exits 2.
    pub config_errors: Vec<String>,
    /// The run was cancelled (see [`RunOptions::cancel`]) before every case ran.
    pub cancelled: bool,
}

impl RunSummary {
    /// Process exit status: 0 when every case is PASS or FLAKY (flaky cases are
    /// listed loudly but do not fail the job), 1 when any case FAILed or TIMEd OUT,
    /// 3 when none failed but some could not run (INFRA after retries, SKIPPED);
    /// 2 (before all of these) when an attempt met a setup error (CONFIG).
    pub fn exit_status(&self) -> u8 {
        use crate::error::exit;
        let c = &self.counts;
        if !self.config_errors.is_empty() {
            exit::CONFIG
        } else if c.fail + c.timeout > 0 {
            exit::FAILED
        } else if c.infra + c.skipped > 0 {
            exit::INFRA
        } else {
            exit::PASSED
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `YYYYMMDD-HHMMSS` (UTC) of unix milliseconds.
fn stamp(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// File-system-safe form of a case id.
pub fn safe_id(id: &str) -> String {
    id.replace('/', "__")
}

/// Progress output.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: usize,
    done: Mutex<usize>,
}

impl Progress {
    fn new(total: usize, tty: bool) -> Progress {
        let bar = tty.then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} {msg}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b
        });
        Progress {
            bar,
            total,
            done: Mutex::new(0),
        }
    }

    fn line(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
        }
    }

    fn finished(&self, c: &CaseResult) {
        let n = {
            let mut d = self.done.lock().unwrap_or_else(|p| p.into_inner());
            *d += 1;
            *d
        };
        let mut s = format!(
            "[{n}/{}] {:7} {} on {} ({} ms)",
            self.total, c.outcome, c.id, c.host, c.duration_ms
        );
        if !c.message.is_empty() && c.outcome != Outcome::Pass {
            s.push_str(&format!(": {}", c.message));
        }
        self.line(&s);
        if let Some(b) = &self.bar {
            b.inc(1);
            b.set_message(c.id.clone());
        }
    }

    fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// How long a run's lease on a host lasts without a heartbeat.
pub const LEASE_TTL: Duration = Duration::from_secs(60);

/// Consecutive INFRA attempts after which a host is unhealthy: not used while a
/// healthy host could run the case.
pub const UNHEALTHY_AFTER: u32 = 3;

/// Hosts, leased to one case at a time, with their health.
struct Pool {
    all: Vec<HostSpec>,
    free: Mutex<Vec<HostSpec>>,
    infra_streak: Mutex<BTreeMap<String, u32>>,
    /// Hosts a health check took offline, with the reason: never handed work.
    offline: Mutex<BTreeMap<String, String>>,
    sem: tokio::sync::Semaphore,
}

impl Pool {
    fn new(hosts: Vec<HostSpec>) -> Pool {
        let n = hosts.len();
        Pool {
            all: hosts.clone(),
            free: Mutex::new(hosts),
            infra_streak: Mutex::new(BTreeMap::new()),
            offline: Mutex::new(BTreeMap::new()),
            sem: tokio::sync::Semaphore::new(n),
        }
    }

    fn healthy(&self, name: &str) -> bool {
        self.infra_streak
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .copied()
            .unwrap_or(0)
            < UNHEALTHY_AFTER
    }

    fn is_offline(&self, name: &str) -> bool {
        self.offline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
    }

    /// Take `name` offline (a failed health check): no more work for it.
    fn set_offline(&self, name: &str, reason: String) {
        tracing::warn!("host {name} offline: {reason}");
        self.offline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), reason);
    }

    /// Hosts offline, with reasons.
    fn offline(&self) -> Vec<(String, String)> {
        self.offline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// INFRA attempts in a row on `name`.
    fn streak(&self, name: &str) -> u32 {
        self.infra_streak
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    /// Hosts marked unhealthy.
    fn unhealthy(&self) -> Vec<String> {
        self.all
            .iter()
            .filter(|h| !self.healthy(&h.name))
            .map(|h| h.name.clone())
            .collect()
    }

    /// A free host for `case`: a healthy one not in `avoid` (waiting for one if
    /// there is such a host), else a healthy one; an unhealthy one only when no
    /// healthy host can run the case at all; `None` when every host that could
    /// is offline.
    async fn acquire(&self, case: &Case, avoid: &[String]) -> Option<HostSpec> {
        let fits = |h: &HostSpec| h.fits(case) && !self.is_offline(&h.name);
        loop {
            if !self.all.iter().any(fits) {
                return None;
            }
            let any_healthy = self.all.iter().any(|h| fits(h) && self.healthy(&h.name));
            let permit = self.sem.acquire().await;
            {
                let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
                let ok = |h: &HostSpec| fits(h) && (!any_healthy || self.healthy(&h.name));
                // A retry waits for a host it has not failed on, when there is one.
                let other_exists = self.all.iter().any(|h| ok(h) && !avoid.contains(&h.name));
                let pick = free
                    .iter()
                    .position(|h| ok(h) && !avoid.contains(&h.name))
                    .or_else(|| {
                        if other_exists {
                            None
                        } else {
                            free.iter().position(ok)
                        }
                    });
                if let Some(i) = pick {
                    if let Ok(p) = permit {
                        p.forget();
                    }
                    return Some(free.remove(i));
                }
            }
            drop(permit);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Give `h` back after an attempt that ended `outcome`.
    fn release(&self, h: HostSpec, outcome: Outcome) {
        {
            let mut st = self.infra_streak.lock().unwrap_or_else(|p| p.into_inner());
            let n = st.entry(h.name.clone()).or_insert(0);
            if outcome == Outcome::Infra {
                *n += 1;
                if *n == UNHEALTHY_AFTER {
                    tracing::warn!(
                        "host {} unhealthy after {n} INFRA attempts in a row",
                        h.name
                    );
                }
            } else if outcome != Outcome::Skipped {
                *n = 0;
            }
        }
        self.free.lock().unwrap_or_else(|p| p.into_inner()).push(h);
        self.sem.add_permits(1);
    }
}

/// The lock file simulated hosts of every runner on this machine share.
pub fn machine_lock_path() -> PathBuf {
    std::env::temp_dir().join("hilrig-sim-machine.lock")
}

/// Hold this machine's CPUs shared (ordinary attempts) or alone (exclusive ones)
/// across processes: `flock` on [`machine_lock_path`]. `None` (and a warning) when
/// the lock file cannot be used: the attempt runs anyway.
async fn machine_lock(exclusive: bool) -> Option<std::fs::File> {
    let path = machine_lock_path();
    let r = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a descriptor we own; released when the file is closed.
        if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f)
    })
    .await;
    match r {
        Ok(Ok(f)) => Some(f),
        Ok(Err(e)) => {
            tracing::warn!("machine lock {}: {e}", machine_lock_path().display());
            None
        }
        Err(e) => {
            tracing::warn!("machine lock task: {e}");
            None
        }
    }
}

/// Result of one attempt.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    /// Verdict.
    pub outcome: Outcome,
    /// Why (mismatches, error text).
    pub message: String,
    /// What was observed (short).
    pub observed: String,
    /// Measurements.
    pub metrics: Metrics,
    /// Files kept, relative to the run directory.
    pub artifacts: Vec<Artifact>,
}

impl AttemptResult {
    fn new(outcome: Outcome, message: impl Into<String>) -> AttemptResult {
        AttemptResult {
            outcome,
            message: message.into(),
            observed: String::new(),
            metrics: Metrics::default(),
            artifacts: Vec::new(),
        }
    }
}

/// Why a device state file could not be prepared (an infrastructure fault).
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The factory image could not be built.
    #[error("factory device of {host}: {source}")]
    Factory {
        /// The host.
        host: String,
        /// Why.
        source: hilrig_device::state::StateError,
    },
    /// The foreign VBIOS could not be built or does not fit.
    #[error("building the foreign VBIOS: {0}")]
    ForeignVbios(String),
    /// The state file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Prepare the device state file for `setup`.
pub fn prepare_state(setup: Setup, host: &HostSpec, path: &Path) -> Result<NvState, PrepareError> {
    let width = match setup {
        Setup::Width(w) => w,
        _ => host.counter_width,
    };
    let mut nv = hilrig_fw::factory::device(DeviceConfig::with_width(width), host.serial).map_err(
        |source| PrepareError::Factory {
            host: host.name.clone(),
            source,
        },
    )?;
    // A random OOB reset key (never the serial-derived development key); the
    // attempt's enrolment hands it to the counters service.
    nv.reset_key = hilrig_device::secure::random_key().map_err(|source| PrepareError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    if setup == Setup::ForeignVbios {
        let rom = hilrig_fw::vbios::build(&hilrig_fw::vbios::VbiosSpec::reference(
            0x7e57,
            b"hilrig campaign: a VBIOS no catalog knows\0",
        ))
        .map_err(|e| PrepareError::ForeignVbios(e.to_string()))?;
        let flash = &mut nv.flash[Region::Vbios as usize];
        if rom.len() > flash.len() {
            return Err(PrepareError::ForeignVbios(format!(
                "{} bytes do not fit the {}-byte vbios region",
                rom.len(),
                flash.len()
            )));
        }
        flash.fill(0xff);
        flash[..rom.len()].copy_from_slice(&rom);
    }
    nv.save(path).map_err(|source| PrepareError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    // A freshly powered device: no buffers kept from an earlier one.
    hilrig_device::model::power_cycle_buffers(path);
    Ok(nv)
}

/// A counter reading of a device state.
pub fn reading(nv: &NvState) -> CounterReading {
    reading_of(&hilrig_device::oob::CounterReport::of(nv))
}

/// A counter reading of an OOB counters report.
pub fn reading_of(r: &hilrig_device::oob::CounterReport) -> CounterReading {
    let c = r.counters;
    CounterReading {
        t_ms: now_ms(),
        regions: [("vbios", c[0]), ("firmware", c[1]), ("config", c[2])]
            .into_iter()
            .map(|(k, v)| (k.to_string(), u64::from(v)))
            .collect(),
        master: u64::from(r.master),
    }
}

/// `p` relative to the run directory.
pub fn rel(run_dir: &Path, p: &Path) -> String {
    p.strip_prefix(run_dir)
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

pub use crate::attempt::{run_attempt, run_attempt_on, Target, CONFIG_PREFIX};
use hilrig_rig::hoststate::HostStates;
use hilrig_rig::remote::Ssh;

/// What an attempt observed besides the last step's JSON: counter readings after
/// each step, blackouts, teardown times and the steps' own notes.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Counter readings: before the first step and after each.
    pub readings: Vec<CounterReading>,
    /// Live-patch blackouts (patches applied), microseconds.
    pub patch_blackouts_us: Vec<f64>,
    /// Bare quiesce blackouts (pause + resume, nothing changed), microseconds.
    pub quiesce_blackouts_us: Vec<f64>,
    /// Secure teardown times of every VMM run, microseconds.
    pub teardown_us: Vec<f64>,
    /// Trapped-MMIO round trips (per-window means under a storm), microseconds.
    pub trap_latency_us: Vec<f64>,
    /// Every trapped MMIO access's handling time in the VMMs, as their log2-ns
    /// histograms (`exits.trap_latency` of the VMM's JSON), summed.
    pub trap_log2_ns: Vec<u64>,
    /// What the steps saw (for the observed column).
    pub notes: Vec<String>,
    /// The counters service's verdicts (gate and teardown) of every VMM run.
    pub counters_verdicts: BTreeMap<String, u64>,
}

impl Observed {
    /// Count the counters service's verdicts a VMM run met (its provisioning
    /// gate's and its teardown's).
    pub fn add_counters_verdicts(&mut self, summary: &VmSummary) {
        let gate = summary.gate.as_ref().and_then(|g| g.verdict);
        let teardown = summary
            .teardown
            .as_ref()
            .and_then(|t| t.verdict.as_ref())
            .map(|v| v.verdict);
        for v in gate.into_iter().chain(teardown) {
            *self.counters_verdicts.entry(v.to_string()).or_insert(0) += 1;
        }
    }

    /// Add a VMM run's trap-latency histogram (`exits.trap_latency.log2_ns`).
    pub fn add_trap_latency(&mut self, summary: &VmSummary) {
        let b = &summary.exits.trap_latency.log2_ns;
        if self.trap_log2_ns.len() < b.len() {
            self.trap_log2_ns.resize(b.len(), 0);
        }
        for (acc, v) in self.trap_log2_ns.iter_mut().zip(b) {
            *acc += v;
        }
    }

    /// The summed trap-latency histogram over its non-empty range, in microseconds.
    pub fn trap_histogram(&self) -> Option<hilrig_reports::Histogram> {
        let lo = self.trap_log2_ns.iter().position(|&c| c > 0)?;
        let hi = self.trap_log2_ns.iter().rposition(|&c| c > 0)?;
        Some(hilrig_reports::Histogram {
            edges_us: (lo..=hi + 1)
                .map(|i| (1u64 << i.min(63)) as f64 / 1000.0)
                .collect(),
            counts: self.trap_log2_ns[lo..=hi].to_vec(),
        })
    }

    /// The measurements for the results store and the reports.
    pub fn metrics(&self, alarms: u64) -> Metrics {
        Metrics {
            counters: self.readings.clone(),
            blackouts_us: self.patch_blackouts_us.clone(),
            trap_latency: hilrig_reports::Latency {
                samples_us: self.trap_latency_us.clone(),
                histogram: self.trap_histogram(),
            },
            teardown_us: self.teardown_us.clone(),
            alarms,
            counters_verdicts: self.counters_verdicts.clone(),
        }
    }
}

/// What a check saw and what it found wrong.
#[derive(Default)]
struct Findings {
    /// What was observed (the report's "observed" column).
    obs: Vec<String>,
    /// Every expectation that did not hold.
    bad: Vec<String>,
}

impl Findings {
    /// The exit status against `verdict` / `exit_status`; a TIMEOUT outcome when the
    /// watchdog ended a run that should not have.
    fn exit(&mut self, e: &Expect, summary: &VmSummary) -> Outcome {
        let code = summary.exit_status;
        self.obs.push(format!("exit {}", code.code()));
        let want = e.verdict.map(|v| v.exit_status()).or(e.exit_status);
        match want {
            Some(w) if w != code => {
                self.bad.push(format!(
                    "exit status {} ({}), expected {}",
                    code.code(),
                    summary.verdict,
                    w.code()
                ));
                if code == ExitStatus::Timeout {
                    Outcome::Timeout
                } else {
                    Outcome::Pass
                }
            }
            _ => Outcome::Pass,
        }
    }

    /// Alarm count and the registers that must have alarmed.
    fn alarms(&mut self, e: &Expect, summary: &VmSummary) {
        let alarms = summary.policy.as_ref().map(|p| p.alarms);
        if let Some(a) = alarms {
            self.obs.push(format!("alarms {a}"));
        }
        if let Some(want) = e.alarms {
            match (want, alarms.unwrap_or(0)) {
                (AlarmExp::Some, 0) => self.bad.push("no alarm raised, expected some".into()),
                (AlarmExp::None, n) if n > 0 => {
                    self.bad.push(format!("{n} alarms raised, expected none"))
                }
                _ => {}
            }
        }
        for reg in e.alarm_registers.iter().flatten() {
            if summary.policy.as_ref().map_or(0, |p| p.alarms_on(reg)) == 0 {
                self.bad.push(format!("no alarm on {reg}"));
            }
        }
    }

    /// Counter moves over the case, from the device before and after (out of band).
    fn counters(&mut self, e: &Expect, before: &Observation, after: &Observation) {
        let mut delta: BTreeMap<Counter, i64> = BTreeMap::new();
        for r in Region::ALL {
            let i = r as usize;
            delta.insert(
                Counter::of(r),
                i64::from(after.report.counters[i]) - i64::from(before.report.counters[i]),
            );
        }
        delta.insert(
            Counter::Master,
            i64::from(after.report.master) - i64::from(before.report.master),
        );
        let moved: Vec<String> = delta
            .iter()
            .filter(|(_, v)| **v != 0)
            .map(|(k, v)| format!("{k}{v:+}"))
            .collect();
        self.obs.push(if moved.is_empty() {
            "counters unchanged".into()
        } else {
            format!("counters {}", moved.join(" "))
        });
        for (k, w) in e.counter_delta.iter().flatten() {
            let got = delta.get(k).copied().unwrap_or(0);
            if got != *w as i64 {
                self.bad
                    .push(format!("counter {k} moved {got:+}, expected {w:+}"));
            }
        }
    }

    /// The teardown record: complete, and the counters verdict it carries.
    fn teardown(&mut self, e: &Expect, summary: &VmSummary) {
        let td = summary.teardown.as_ref();
        let verdict = td.and_then(|t| t.counters_verdict());
        if let Some(v) = verdict {
            self.obs.push(format!("counters verdict {v}"));
        }
        if let Some(w) = e.counters_verdict {
            if verdict != Some(w) {
                self.bad.push(format!(
                    "counters verdict {}, expected {w}",
                    verdict.map_or("(none)".to_string(), |v| v.to_string())
                ));
            }
        }
        let complete = td.map(|t| t.complete);
        if let Some(w) = e.teardown_complete {
            if complete != Some(w) {
                self.bad.push(format!(
                    "teardown complete = {}, expected {w}",
                    complete.map_or("(no teardown)".to_string(), |c| c.to_string())
                ));
            }
        }
    }

    /// The counters service's verdict after the case.
    fn service(&mut self, e: &Expect, service: Option<&(CountersVerdict, String)>) {
        let Some((v, why)) = service else { return };
        self.obs.push(format!("service verdict {v}"));
        if let Some(w) = &e.service_verdict {
            if v != w {
                self.bad.push(format!(
                    "counters service verdict {v} ({why}), expected {w}"
                ));
            }
        }
    }

    /// The fuse and the flash contents (region hashes) after the case.
    fn device(&mut self, e: &Expect, before: &Observation, after: &Observation) {
        let fuse = after.report.fuse;
        if let Some(w) = e.fuse {
            self.obs
                .push(format!("fuse {}", if fuse { "blown" } else { "intact" }));
            if fuse != w {
                self.bad.push(format!("fuse blown = {fuse}, expected {w}"));
            }
        }
        let changed: Vec<String> = Region::ALL
            .iter()
            .filter(|r| before.hashes[**r as usize] != after.hashes[**r as usize])
            .map(|r| format!("{r:?}").to_lowercase())
            .collect();
        if let Some(w) = e.flash_unchanged {
            self.obs.push(if changed.is_empty() {
                "flash unchanged".into()
            } else {
                format!("flash changed: {}", changed.join(" "))
            });
            if changed.is_empty() != w {
                self.bad.push(if w {
                    format!("flash changed ({}), expected unchanged", changed.join(", "))
                } else {
                    "flash unchanged, expected a change".into()
                });
            }
        }
    }

    /// Live-patch and bare-quiesce blackouts, against the bound.
    fn blackouts(&mut self, e: &Expect, seen: &Observed) {
        let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
        let patches = &seen.patch_blackouts_us;
        if !patches.is_empty() {
            self.obs.push(format!(
                "{} patch blackouts, max {:.0} us",
                patches.len(),
                max(patches)
            ));
        }
        let q = &seen.quiesce_blackouts_us;
        if !q.is_empty() {
            self.obs
                .push(format!("{} bare quiesces, max {:.0} us", q.len(), max(q)));
        }
        if let Some(bound) = e.blackout_max_us {
            if patches.is_empty() {
                self.bad
                    .push("no live-patch blackout was measured (no patch applied)".into());
            } else if max(patches) > bound as f64 {
                self.bad.push(format!(
                    "blackout {:.0} us exceeds the bound of {bound} us",
                    max(patches)
                ));
            }
        }
    }
}

/// Compare what was observed with `case.expect` (device states before and after).
pub fn check(
    case: &Case,
    summary: &VmSummary,
    before: &NvState,
    after: &NvState,
    service: Option<&(CountersVerdict, String)>,
    seen: &Observed,
) -> AttemptResult {
    match (
        crate::attest::observation_of(before),
        crate::attest::observation_of(after),
    ) {
        (Ok(b), Ok(a)) => check_observed(case, summary, &b, &a, service, seen),
        (Err(e), _) | (_, Err(e)) => AttemptResult::new(Outcome::Infra, e.to_string()),
    }
}

/// [`check`] against the device's counters and region hashes as read out of
/// band (a board's OOB port; a state file's device's OOB answers) before and after.
pub fn check_observed(
    case: &Case,
    summary: &VmSummary,
    before: &Observation,
    after: &Observation,
    service: Option<&(CountersVerdict, String)>,
    seen: &Observed,
) -> AttemptResult {
    let e = &case.expect;
    let mut f = Findings::default();
    let mut outcome = f.exit(e, summary);
    f.alarms(e, summary);
    f.counters(e, before, after);
    f.teardown(e, summary);
    f.service(e, service);
    f.device(e, before, after);
    f.blackouts(e, seen);
    f.obs.extend(seen.notes.iter().cloned());
    if !f.bad.is_empty() && outcome == Outcome::Pass {
        outcome = Outcome::Fail;
    }
    let mut seen = seen.clone();
    if seen.readings.is_empty() {
        seen.readings = vec![reading_of(&before.report), reading_of(&after.report)];
    }
    if seen.teardown_us.is_empty() {
        if let Some(t) = &summary.teardown {
            seen.teardown_us.push(t.total_micros as f64);
        }
    }
    if seen.trap_log2_ns.is_empty() {
        seen.add_trap_latency(summary);
    }
    let metrics = seen.metrics(summary.alarms());
    AttemptResult {
        outcome,
        message: f.bad.join("; "),
        observed: f.obs.join(", "),
        metrics,
        artifacts: Vec::new(),
    }
}

/// Shared state of one run.
pub(crate) struct Ctx {
    pool: Pool,
    vmm: PathBuf,
    vmm_args: Vec<String>,
    run_dir: PathBuf,
    pub(crate) run_id: String,
    store: Mutex<Store>,
    progress: Progress,
    deadline: Instant,
    /// The machine the simulated hosts share: attempts hold it shared, exclusive
    /// cases alone.
    machine: tokio::sync::RwLock<()>,
    /// Remote hosts: the SSH connection and the VMM build's path there.
    remotes: BTreeMap<String, (Arc<Ssh>, String)>,
    /// The inventory's drivers (power for the recovery of a wedged host); `None`
    /// for hosts without an inventory (anonymous, labgrid places).
    rig: Option<Arc<hilrig_rig::Rig>>,
    /// Bounds of a host recovery.
    recover: hilrig_rig::recover::RecoverOptions,
    /// `hilrig` for `fpga serve-sim` ([`RunOptions::fpga_sim`]) and its extra arguments.
    fpga_sim: Option<PathBuf>,
    fpga_sim_args: Vec<String>,
    /// Whom the provisioning gate pages about a locked or quarantined device (the
    /// inventory's `[counters]` `page`/`webhook`).
    pager: Option<hilrig_counters::remediate::Pager>,
    /// Recorded host states (a SQLite results database): offline hosts stay
    /// offline for every runner until `hilrig rig host DB online NAME`.
    states: Option<Mutex<HostStates>>,
    /// Setup errors seen (CONFIG).
    config_errors: Mutex<Vec<String>>,
    /// Set to stop the run (see [`RunOptions::cancel`]).
    cancel: Arc<std::sync::atomic::AtomicBool>,
    /// The build every attempt runs: SHA-256 of the VMM executable (remote
    /// hosts get an identical copy by this hash); `None` if it cannot be read.
    build: Option<String>,
}

fn is_postgres(db: &Path) -> bool {
    let s = db.to_string_lossy();
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// Record `host` offline in the host-state table (a warning if that fails).
fn record_offline(states: Option<&HostStates>, host: &str, why: &str) {
    if let Some(s) = states {
        if let Err(e) = s.set_offline(host, why) {
            tracing::warn!("recording host {host} offline: {e}");
        }
    }
}

/// The health check of a remote host: SSH reachable, the runner's build there
/// (copied when its SHA-256 differs) and answering `--version`. The path of the
/// build on the host, or why the host is not healthy.
pub fn health_check(ssh: &Ssh, vmm: &Path) -> Result<String, hilrig_rig::remote::RemoteError> {
    let path = ssh.ensure_hilrig(vmm)?;
    let v = ssh.alive_at(&path)?;
    tracing::info!("host health: {v} at {path}");
    Ok(path)
}

/// A host that failed its health check before the run, recovered soft -> hard
/// -> power cycle through its inventory power driver ([`hilrig_rig::recover`]):
/// the step that brought it back, for a second health check. `Err(None)`: no
/// power driver (nothing tried); `Err(Some(why))`: it did not come back. A host
/// whose build is not there yet answers no `--version`: reachable again after
/// the recovery, it is what the second health check judges.
fn recover_before_run(
    rig: Option<&hilrig_rig::Rig>,
    ssh: &Ssh,
    vmm: &Path,
    opts: hilrig_rig::recover::RecoverOptions,
) -> Result<String, Option<String>> {
    let host = ssh.host().to_string();
    let power = match rig.map(|r| r.power(&host)) {
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            tracing::warn!("host {host}: no power driver for its recovery: {e}");
            return Err(None);
        }
        None => return Err(None),
    };
    let hilrig = ssh.spec().build_path(vmm);
    match hilrig_rig::recover::recover_host(ssh, &hilrig, Some(power), opts) {
        Ok(step) => Ok(step.to_string()),
        // Up again but without this build yet: the health check copies it.
        Err(e) if ssh.alive_within("true", opts.ssh_timeout).is_ok() => {
            tracing::info!("host {host}: reachable after recovery ({e})");
            Ok("its recovery steps (reachable again)".into())
        }
        Err(e) => Err(Some(format!("recovery before the run: {e}"))),
    }
}

/// After an INFRA attempt on a remote host: if it does not answer (SSH and
/// `hilrig --version`, bounded), recover it soft -> hard -> power cycle through
/// its inventory power driver and wait for it ([`hilrig_rig::recover`]); a host
/// that does not come back goes offline with the reason (recorded). What to add
/// to the attempt's message; `None` when the host answered at once.
async fn recover_after_infra(ctx: &Arc<Ctx>, name: &str) -> Option<String> {
    let (ssh, hilrig) = ctx.remotes.get(name).cloned()?;
    let rig = ctx.rig.clone();
    let opts = ctx.recover;
    let host = name.to_string();
    let r = tokio::task::spawn_blocking(move || {
        if ssh.alive_within(&hilrig, opts.ssh_timeout).is_ok() {
            return Ok(None);
        }
        let power = match rig.as_ref().map(|r| r.power(&host)) {
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                tracing::warn!("host {host}: no power driver for its recovery: {e}");
                None
            }
            None => None,
        };
        hilrig_rig::recover::recover_host(&ssh, &hilrig, power, opts).map(Some)
    })
    .await;
    let why = match r {
        Ok(Ok(None)) => return None,
        Ok(Ok(Some(step))) => {
            let m = format!("host {name} did not answer; recovered by {step}");
            ctx.line(&m);
            return Some(m);
        }
        Ok(Err(e)) => e.to_string(),
        Err(e) => format!("recovery task: {e}"),
    };
    let why = format!("recovery after an INFRA attempt: {why}");
    ctx.line(&format!("host {name}: OFFLINE: {why}"));
    if let Some(m) = &ctx.states {
        let g = m.lock().unwrap_or_else(|p| p.into_inner());
        record_offline(Some(&g), name, &why);
    }
    ctx.pool.set_offline(name, why.clone());
    Some(why)
}

impl Ctx {
    /// Whether the run was asked to stop.
    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// Print a finished case's progress line.
    pub(crate) fn finished(&self, c: &CaseResult) {
        self.progress.finished(c);
    }

    /// Print a line.
    pub(crate) fn line(&self, s: &str) {
        self.progress.line(s);
    }

    /// Hosts this runner drives (parallel cases).
    pub(crate) fn hosts(&self) -> usize {
        self.pool.all.len()
    }
}

/// Run every repeat of `case` with its retries; the final verdict.
pub(crate) async fn run_case(ctx: Arc<Ctx>, case: Case) -> CaseResult {
    let mut attempts: Vec<Attempt> = Vec::new();
    let mut rep_outcomes = Vec::new();
    let mut last: Option<AttemptResult> = None;
    let mut host_name = String::new();
    let mut any_failed_attempt = false;
    'reps: for rep in 0..case.repeats {
        let (mut infra_used, mut retries_used) = (0u32, 0u32);
        let mut avoid: Vec<String> = Vec::new();
        loop {
            let Some(host) = ctx.pool.acquire(&case, &avoid).await else {
                rep_outcomes.push(Outcome::Skipped);
                last = Some(AttemptResult::new(
                    Outcome::Skipped,
                    format!(
                        "no host can run the case: every host tagged `{}` is offline ({})",
                        case.tag,
                        ctx.pool
                            .offline()
                            .iter()
                            .map(|(h, why)| format!("{h}: {why}"))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                ));
                break 'reps;
            };
            if ctx.cancelled() {
                ctx.pool.release(host, Outcome::Skipped);
                rep_outcomes.push(Outcome::Skipped);
                last = Some(AttemptResult::new(
                    Outcome::Skipped,
                    "run cancelled before the case could run",
                ));
                break 'reps;
            }
            if Instant::now() >= ctx.deadline {
                ctx.pool.release(host, Outcome::Skipped);
                rep_outcomes.push(Outcome::Skipped);
                last = Some(AttemptResult::new(
                    Outcome::Skipped,
                    "campaign timeout reached before the case could run",
                ));
                break 'reps;
            }
            let n = attempts.len();
            let dir = ctx
                .run_dir
                .join("cases")
                .join(safe_id(&case.id))
                .join(format!("r{rep}-a{n}-{}", host.name));
            let (r, t) = {
                let (_alone, _shared) = if case.exclusive {
                    (Some(ctx.machine.write().await), None)
                } else {
                    (None, Some(ctx.machine.read().await))
                };
                // The same between runners on this machine (other runs, CI jobs).
                let _machine = machine_lock(case.exclusive).await;
                let t = Instant::now();
                let target = Target {
                    vmm: &ctx.vmm,
                    vmm_args: &ctx.vmm_args,
                    remote: ctx.remotes.get(&host.name).cloned(),
                    fpga_sim: ctx.fpga_sim.as_deref(),
                    fpga_sim_args: &ctx.fpga_sim_args,
                    pager: ctx.pager.as_ref(),
                };
                let r = run_attempt_on(&case, &host, &target, &ctx.run_dir, &dir).await;
                (r, t)
            };
            host_name = host.name.clone();
            attempts.push(Attempt {
                outcome: r.outcome,
                host: host.name.clone(),
                duration_ms: t.elapsed().as_millis() as u64,
                message: r.message.clone(),
                build: ctx.build.clone(),
            });
            let outcome = r.outcome;
            if outcome == Outcome::Infra {
                avoid.push(host.name.clone());
                // A wedged host is recovered (or taken offline) before anyone
                // else is given it.
                if let Some(note) = recover_after_infra(&ctx, &host.name).await {
                    if let Some(a) = attempts.last_mut() {
                        a.message = format!("{}; {note}", a.message);
                    }
                }
            }
            let config = r.message.starts_with(CONFIG_PREFIX);
            if config {
                ctx.config_errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("{}: {}", case.id, r.message));
            }
            let recheck =
                outcome == Outcome::Infra && ctx.pool.streak(&host.name) + 1 >= UNHEALTHY_AFTER;
            let name = host.name.clone();
            ctx.pool.release(host, outcome);
            if recheck {
                // A streak of INFRA: the health check decides whether the host stays.
                if let Some((ssh, _)) = ctx.remotes.get(&name) {
                    let (ssh, vmm) = (ssh.clone(), ctx.vmm.clone());
                    let r = tokio::task::spawn_blocking(move || health_check(&ssh, &vmm)).await;
                    let why = match r {
                        Ok(Ok(_)) => None,
                        Ok(Err(why)) => Some(why.to_string()),
                        Err(e) => Some(format!("health check task: {e}")),
                    };
                    if let Some(why) = why {
                        let why = format!(
                            "health check after {UNHEALTHY_AFTER} INFRA attempts in a row: {why}"
                        );
                        if let Some(m) = &ctx.states {
                            let g = m.lock().unwrap_or_else(|p| p.into_inner());
                            record_offline(Some(&g), &name, &why);
                        }
                        ctx.pool.set_offline(&name, why);
                    }
                }
            }
            last = Some(r);
            if config {
                rep_outcomes.push(Outcome::Skipped);
                break 'reps;
            }
            match outcome {
                Outcome::Pass => {
                    rep_outcomes.push(Outcome::Pass);
                    break;
                }
                Outcome::Infra if infra_used < case.infra_retries => infra_used += 1,
                Outcome::Fail | Outcome::Timeout if retries_used < case.retries => {
                    any_failed_attempt = true;
                    retries_used += 1;
                }
                other => {
                    if other.is_failure() {
                        any_failed_attempt = true;
                    }
                    rep_outcomes.push(other);
                    break;
                }
            }
        }
    }
    let outcome = if let Some(o) = rep_outcomes.iter().find(|o| o.is_failure()) {
        *o
    } else if rep_outcomes.contains(&Outcome::Infra) {
        Outcome::Infra
    } else if rep_outcomes.contains(&Outcome::Skipped) {
        Outcome::Skipped
    } else if any_failed_attempt {
        Outcome::Flaky
    } else {
        Outcome::Pass
    };
    let last = last.unwrap_or_else(|| AttemptResult::new(Outcome::Skipped, "not run"));
    let message = match outcome {
        Outcome::Flaky => {
            let first = attempts
                .iter()
                .find(|a| a.outcome.is_failure())
                .map(|a| a.message.clone())
                .unwrap_or_default();
            format!("failed, then passed on retry: {first}")
        }
        _ => last.message.clone(),
    };
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
        host: host_name,
        outcome,
        // Time on hosts (not the wait for one): the attempts' durations.
        duration_ms: attempts.iter().map(|a| a.duration_ms).sum(),
        attempts,
        message,
        expected: case.expect.describe(),
        observed: last.observed,
        metrics: last.metrics,
        artifacts: last.artifacts,
    }
}

/// Run a campaign: validate, run (or resume), store, report.
pub fn run_campaign(opts: RunOptions) -> RunResult<RunSummary> {
    let t0 = Instant::now();
    use crate::hostsource::HostSource;
    // Reserved labgrid places are held until this function returns (released on
    // drop); with an inventory too, its hosts run beside them.
    let mut labgrid = opts
        .labgrid
        .clone()
        .map(crate::hostsource::LabgridSource::new);
    let (hosts, lab_vmm) = match (labgrid.as_mut(), &opts.inventory) {
        (Some(l), Some(inv)) => crate::hostsource::MixedSource {
            inventory: crate::hostsource::InventorySource {
                inventory: Some(inv.clone()),
                n: 0,
            },
            labgrid: l,
        }
        .hosts()?,
        (Some(l), None) => l.hosts()?,
        (None, _) => hosts_for(opts.inventory.as_deref(), opts.hosts)?,
    };
    let campaign = match &opts.campaign_text {
        Some(text) => format::parse(text, &opts.campaign, &hosts)?,
        None => format::load(&opts.campaign, &hosts)?,
    };
    let mut vmm_args = opts.vmm_args.clone();
    let vmm = match &opts.vmm {
        // `--vmm .../hilrig` alone: its VMM is `hilrig vm run`.
        Some(p) if vmm_args.is_empty() => {
            vmm_args = hilrig_rig::sim::vmm_prefix(p)
                .iter()
                .map(|s| s.to_string())
                .collect();
            p.clone()
        }
        Some(p) => p.clone(),
        None => {
            let p = hilrig_rig::sim::find_vmm(lab_vmm.as_deref())?;
            let prefix = hilrig_rig::sim::vmm_prefix(&p)
                .iter()
                .map(|s| s.to_string());
            vmm_args = prefix.chain(vmm_args).collect();
            p
        }
    };
    // Everything of the run is written under it (VMM state, consoles, records, the
    // results database): created 0700; an existing one must be a real directory of
    // ours that others cannot write, so no local user can plant a symlink or swap a
    // file there (DESIGN §6).
    hilrig_device::secure::ensure_private_dir(&opts.out_dir).map_err(|e| {
        RunError::io(
            "refusing the output directory",
            &opts.out_dir,
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string()),
        )
    })?;
    // Absolute from here on: every path handed to a VMM (state, console, bundles
    // over the control socket) must mean the same in a jailed VMM, whose working
    // directory is its jail root; stored run directories too (the lab service reads
    // them from elsewhere).
    let out_dir = std::path::absolute(&opts.out_dir)
        .map_err(|e| RunError::io("making absolute", &opts.out_dir, e))?;
    let db = opts
        .db
        .clone()
        .unwrap_or_else(|| out_dir.join("results.sqlite"));
    let mut store = Store::open(&db)?;
    // Scale-out: a PostgreSQL store shares the run's cases between runners.
    let mut queue = if store.kind() == "postgresql" {
        Some(crate::claim::ClaimQueue::open(&db.to_string_lossy())?)
    } else {
        if opts.join.is_some() {
            return Err(crate::claim::ClaimError::NotPostgres(db.display().to_string()).into());
        }
        None
    };
    let report_hosts: Vec<Host> = hosts
        .iter()
        .map(|h| Host {
            name: h.name.clone(),
            tags: h.tags.clone(),
            simulated: h.ssh.is_none(),
        })
        .collect();
    let (row, done) = match (&opts.resume, &opts.join, queue.as_mut()) {
        (Some(_), Some(_), _) => {
            return Err(RunError::Options(
                "--resume and --join exclude each other".into(),
            ))
        }
        (None, Some(id), Some(q)) => {
            crate::claim::check_run_id(id)?;
            let row = RunRow {
                run_dir: out_dir.join(id).to_string_lossy().into_owned(),
                id: id.clone(),
                campaign: campaign.name.clone(),
                file: campaign.file.to_string_lossy().into_owned(),
                started_ms: now_ms(),
                finished_ms: None,
            };
            let hosts_json = serde_json::to_string(&report_hosts)?;
            q.create_run_if_absent(&row, &hosts_json)?;
            let mut row = store.run(id)?.ok_or_else(|| {
                RunError::Options(format!(
                    "--join {id}: the run vanished from {}",
                    db.display()
                ))
            })?;
            if row.campaign != campaign.name {
                return Err(RunError::Options(format!(
                    "--join {id}: that run is of campaign `{}`, not `{}`",
                    row.campaign, campaign.name
                )));
            }
            // Artifacts and reports of this runner: its own directory.
            row.run_dir = out_dir.join(id).to_string_lossy().into_owned();
            let done = store.cases(id)?;
            (row, done)
        }
        (Some(id), _, _) => {
            let row = store.run(id)?.ok_or_else(|| {
                RunError::Options(format!("--resume {id}: no such run in {}", db.display()))
            })?;
            if row.campaign != campaign.name {
                return Err(RunError::Options(format!(
                    "--resume {id}: that run is of campaign `{}`, not `{}`",
                    row.campaign, campaign.name
                )));
            }
            let done = store.cases(id)?;
            (row, done)
        }
        _ => {
            let started_ms = now_ms();
            let base = format!("{}-{}", campaign.name, stamp(started_ms));
            let mut id = base.clone();
            let mut i = 2;
            while store.run(&id)?.is_some() || out_dir.join(&id).exists() {
                id = format!("{base}-{i}");
                i += 1;
            }
            let row = RunRow {
                run_dir: out_dir.join(&id).to_string_lossy().into_owned(),
                id,
                campaign: campaign.name.clone(),
                file: campaign.file.to_string_lossy().into_owned(),
                started_ms,
                finished_ms: None,
            };
            store.create_run(&row, &report_hosts)?;
            (row, Vec::new())
        }
    };
    let run_dir = PathBuf::from(&row.run_dir);
    std::fs::create_dir_all(&run_dir).map_err(|e| RunError::io("creating", &run_dir, e))?;
    let todo: Vec<Case> = campaign
        .cases
        .iter()
        .filter(|c| !done.iter().any(|d| d.id == c.id))
        .cloned()
        .collect();
    let tty = opts
        .progress
        .unwrap_or_else(|| std::io::stderr().is_terminal());
    let ran_now = todo.len();
    let progress = Progress::new(todo.len(), tty);
    progress.line(&format!(
        "campaign {} ({}): run {}, {} cases ({} already finished), {} hosts, vmm {}",
        campaign.name,
        campaign.file.display(),
        row.id,
        campaign.cases.len(),
        done.len(),
        hosts.len(),
        vmm.display()
    ));
    if let Some(q) = queue.as_mut() {
        let ids: Vec<String> = todo.iter().map(|c| c.id.clone()).collect();
        q.enqueue(&row.id, &ids)?;
    }
    // Health check of every remote host before the run (LAVA's health check):
    // SSH reachable, this build there (copied when its hash differs), `--version`.
    // Hosts recorded offline (by an earlier check) stay offline until an operator
    // brings them back.
    let pool = Pool::new(hosts.clone());
    let states = if is_postgres(&db) {
        None
    } else {
        match HostStates::open(&db.to_string_lossy()) {
            Ok(s) => Some(s),
            Err(e) => return Err(RunError::rig(format!("host states in {}", db.display()), e)),
        }
    };
    // The inventory's drivers (a labgrid place's: its power port, consoles and
    // OOB as mapped), for recovering a host that fails its health check or
    // wedges (anonymous hosts have none).
    let rig = match (&opts.inventory, &opts.labgrid) {
        (_, Some(_)) if hosts.iter().any(|h| h.ssh.is_some()) => labgrid
            .as_ref()
            .and_then(|l| l.inventory.clone())
            .map(|inv| Arc::new(hilrig_rig::Rig::new(inv))),
        (Some(inv), None) if hosts.iter().any(|h| h.ssh.is_some()) => {
            match hilrig_rig::Rig::load(inv) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    tracing::warn!("inventory {}: no drivers for recovery: {e}", inv.display());
                    None
                }
            }
        }
        _ => None,
    };
    // Whom the gate pages (the inventory's `[counters]`); a pager configured
    // wrongly (a webhook without its key) stops the run rather than page nobody.
    let pager = match &opts.inventory {
        Some(inv) => gate_pager(inv)?,
        None => None,
    };
    let mut remotes = BTreeMap::new();
    for h in &hosts {
        if let Some(st) = states
            .as_ref()
            .map(|s| s.get(&h.name))
            .transpose()
            .map_err(|e| RunError::rig(format!("host state of {}", h.name), e))?
            .flatten()
        {
            if !st.online() {
                let why = format!(
                    "offline since {}: {} (bring it back: hilrig rig host {} online {})",
                    hilrig_rig::lease::format_unix_ms(st.since_unix_ms),
                    st.reason,
                    db.display(),
                    h.name
                );
                progress.line(&format!("host {}: OFFLINE: {why}", h.name));
                pool.set_offline(&h.name, why);
                continue;
            }
        }
        let Some(spec) = &h.ssh else { continue };
        let ssh = match Ssh::new(&h.name, spec.clone()) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                pool.set_offline(&h.name, e.to_string());
                continue;
            }
        };
        let checked = match health_check(&ssh, &vmm) {
            Ok(path) => Ok((path, String::new())),
            // LAVA-style: a failing host is recovered (soft -> hard -> power
            // cycle through its power driver) and checked again before it is
            // marked Bad.
            Err(why) => match recover_before_run(rig.as_deref(), &ssh, &vmm, opts.recover) {
                Ok(step) => health_check(&ssh, &vmm)
                    .map(|path| (path, format!("; recovered by {step}")))
                    .map_err(|again| format!("{why}; after recovery by {step}: {again}")),
                Err(Some(failed)) => Err(format!("{why}; {failed}")),
                Err(None) => Err(why.to_string()),
            },
        };
        match checked {
            Ok((path, recovered)) => {
                progress.line(&format!(
                    "host {}: healthy (build at {path}){recovered}",
                    h.name
                ));
                remotes.insert(h.name.clone(), (ssh, path));
            }
            Err(why) => {
                let why = format!("health check before the run: {why}");
                progress.line(&format!("host {}: OFFLINE: {why}", h.name));
                record_offline(states.as_ref(), &h.name, &why);
                pool.set_offline(&h.name, why);
            }
        }
    }
    // The hosts are leased to this run while it uses them (renewed by heartbeat;
    // a host someone else holds is left out of this run, not recorded offline).
    let mut heartbeats = Vec::new();
    let mut leased = None;
    if !is_postgres(&db) {
        let leases = Arc::new(
            hilrig_rig::lease::LeaseStore::open(&db.to_string_lossy())
                .map_err(|e| RunError::rig(format!("leases in {}", db.display()), e))?,
        );
        // The run's own name (no pid): a resumed run (after its runner was
        // killed) takes its own leases back instead of waiting for them to expire.
        let machine = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let holder = format!("run {}@{machine}", row.id);
        leased = Some((leases.clone(), holder.clone()));
        for h in &hosts {
            if pool.is_offline(&h.name) {
                continue;
            }
            match leases.acquire(&h.name, &holder, LEASE_TTL) {
                Ok(l) => heartbeats.push((
                    h.name.clone(),
                    hilrig_rig::lease::Heartbeat::start(leases.clone(), l, LEASE_TTL),
                )),
                Err(e) => {
                    progress.line(&format!("host {}: not used: {e}", h.name));
                    pool.set_offline(&h.name, e.to_string());
                }
            }
        }
    }
    let states = states.map(Mutex::new);
    let ctx = Arc::new(Ctx {
        pool,
        remotes,
        rig,
        recover: opts.recover,
        fpga_sim: opts.fpga_sim.clone(),
        fpga_sim_args: opts.fpga_sim_args.clone(),
        pager,
        states,
        config_errors: Mutex::new(Vec::new()),
        cancel: opts.cancel.clone().unwrap_or_default(),
        build: hilrig_rig::remote::file_sha256(&vmm).ok(),
        vmm,
        vmm_args,
        run_dir: run_dir.clone(),
        run_id: row.id.clone(),
        store: Mutex::new(store),
        progress,
        deadline: Instant::now() + campaign.timeout,
        machine: tokio::sync::RwLock::new(()),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    match queue {
        Some(q) => rt.block_on(crate::claim::run_shared(
            ctx.clone(),
            todo,
            q,
            opts.claimant
                .clone()
                .unwrap_or_else(crate::claim::default_claimant),
            opts.claim_ttl,
        ))?,
        None => rt.block_on(run_all(ctx.clone(), todo))?,
    }
    drop(rt);
    ctx.progress.done();
    // Give the hosts back (the heartbeats stop; the leases are released).
    for (host, hb) in heartbeats {
        if let Some(why) = hb.lost() {
            tracing::warn!("host {host}: its lease was lost during the run: {why}");
        }
        drop(hb);
        if let Some((store, holder)) = &leased {
            if let Err(e) = store.release_host(&host, holder, None) {
                tracing::warn!("host {host}: releasing its lease: {e}");
            }
        }
    }
    let unhealthy_hosts = ctx.pool.unhealthy();
    let offline_hosts = ctx.pool.offline();
    let cancelled = ctx.cancelled();
    let config_errors = ctx
        .config_errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut store = ctx.store.lock().unwrap_or_else(|p| p.into_inner());
    // Resuming a run that had finished with nothing left to run keeps its end:
    // its duration (and the report's) stays the run's, not the time since.
    let finished_ms = match row.finished_ms {
        Some(f) if ran_now == 0 => f,
        _ => {
            let f = now_ms();
            store.finish_run(&row.id, f)?;
            f
        }
    };
    // Campaign order, finished earlier (resume) or now.
    let stored = store.cases(&row.id)?;
    let mut cases = Vec::new();
    for c in &campaign.cases {
        if let Some(r) = stored.iter().find(|s| s.id == c.id) {
            cases.push(r.clone());
        }
    }
    let run = Run {
        schema: hilrig_reports::SCHEMA_VERSION,
        id: row.id.clone(),
        campaign: campaign.name.clone(),
        started_ms: row.started_ms,
        finished_ms,
        hosts: report_hosts,
        cases,
    };
    let prev = store.previous_run(&campaign.name, &row.id, row.started_ms)?;
    let paths = hilrig_reports::write_reports(&run, prev.as_ref(), &run_dir)?;
    let counts = Counts::of(&run);
    Ok(RunSummary {
        run_id: row.id,
        run_dir,
        report_html: paths.html,
        junit: paths.junit,
        counts,
        run,
        wall: t0.elapsed(),
        ran_now,
        unhealthy_hosts,
        offline_hosts,
        config_errors,
        cancelled,
    })
}

/// Where the runner gets its cases: claimed one at a time, reported back when
/// stored. [`LocalQueue`] hands out one campaign's cases to this process; a
/// PostgreSQL queue (`SELECT ... FOR UPDATE SKIP LOCKED`) shares them between
/// runners.
pub trait CaseQueue: Send + Sync {
    /// Claim the next case for this runner; `None` when none are left.
    fn claim(&self) -> Option<Case>;
    /// A claimed case finished and was stored (default: nothing to do).
    fn finished(&self, _case_id: &str) {}
}

/// The cases of one campaign, in order, for this process alone.
pub struct LocalQueue(Mutex<std::collections::VecDeque<Case>>);

impl LocalQueue {
    /// A queue of `cases`.
    pub fn new(cases: Vec<Case>) -> LocalQueue {
        LocalQueue(Mutex::new(cases.into()))
    }
}

impl CaseQueue for LocalQueue {
    fn claim(&self) -> Option<Case> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
    }
}

async fn run_all(ctx: Arc<Ctx>, todo: Vec<Case>) -> RunResult<()> {
    run_queue(ctx, Arc::new(LocalQueue::new(todo))).await
}

/// Every case the queue hands out, each waiting for a host that fits it
/// (claimed eagerly here: with one process there is no one to share with).
async fn run_queue(ctx: Arc<Ctx>, queue: Arc<dyn CaseQueue>) -> RunResult<()> {
    let mut set = tokio::task::JoinSet::new();
    while let Some(case) = queue.claim() {
        let queue = queue.clone();
        let ctx = ctx.clone();
        set.spawn(async move {
            let r = run_case(ctx.clone(), case).await;
            // The PostgreSQL client blocks (and runs its own runtime): off the workers.
            let c = ctx.clone();
            let (stored, r) = tokio::task::spawn_blocking(move || {
                let s = c
                    .store
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .put_case(&c.run_id, &r);
                (s, r)
            })
            .await
            .map_err(|source| RunError::Task {
                what: "storing a case",
                source,
            })?;
            if stored.is_ok() {
                queue.finished(&r.id);
            }
            ctx.progress.finished(&r);
            stored.map_err(RunError::from)
        });
    }
    while let Some(j) = set.join_next().await {
        j.map_err(|source| RunError::Task {
            what: "case task",
            source,
        })??;
    }
    Ok(())
}

/// The hosts to run on: the simulated hosts of `inventory`, or `n` anonymous
/// simulated hosts; and the inventory's configured VMM.
pub fn hosts_for(
    inventory: Option<&Path>,
    n: usize,
) -> RunResult<(Vec<HostSpec>, Option<PathBuf>)> {
    let Some(path) = inventory else {
        return Ok((HostSpec::sim(n), None));
    };
    let inv = hilrig_rig::inventory::Inventory::load(path)
        .map_err(|e| RunError::rig(format!("inventory {}", path.display()), e))?;
    let (hosts, other) = HostSpec::from_inventory(&inv);
    if !other.is_empty() {
        tracing::warn!(
            "inventory {}: hosts {} left out (neither `[host.ssh]` nor simulated: the runner cannot start a VMM there)",
            path.display(),
            other.join(", ")
        );
    }
    if hosts.is_empty() {
        return Err(RunError::NoReachableHost(path.to_path_buf()));
    }
    let vmm = inv.lab.vmm.clone().map(|v| {
        if v.is_relative() {
            inv.base_dir().join(v)
        } else {
            v
        }
    });
    Ok((hosts, vmm))
}

/// Whom the campaign's provisioning gate pages about a locked or quarantined
/// device it refuses: the `[counters]` `page` command or `webhook` of
/// `inventory` (see `hilrig_rig::inventory::CountersSpec::pager`); `None` without
/// a `[counters]` table or a pager in it.
pub fn gate_pager(inventory: &Path) -> RunResult<Option<hilrig_counters::remediate::Pager>> {
    let inv = hilrig_rig::inventory::Inventory::load(inventory)
        .map_err(|e| RunError::rig(format!("inventory {}", inventory.display()), e))?;
    match &inv.counters {
        Some(c) => c
            .pager()
            .map_err(|e| RunError::rig(format!("inventory {} [counters]", inventory.display()), e)),
        None => Ok(None),
    }
}

/// Validate a campaign file against the hosts (see [`hosts_for`]); the cases.
pub fn validate(path: &Path, inventory: Option<&Path>, hosts: usize) -> RunResult<Campaign> {
    let (hosts, _) = hosts_for(inventory, hosts)?;
    Ok(format::load(path, &hosts)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps() {
        assert_eq!(stamp(0), "19700101-000000");
        assert_eq!(stamp(1_795_250_980_000), "20261121-084940");
    }
}
