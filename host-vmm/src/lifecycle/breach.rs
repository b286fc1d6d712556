//! Teardown on breach (issue 21.5): the triggers of the policy file's `[breach]`
//! table ([`crate::policy::breach`]) watched while the guest runs, and the thread
//! that acts on the first one.
//!
//! - **Alarm thresholds**: the policy engine tells the [`Monitor`] of every alarm
//!   (an [`AlarmObserver`]); `count` alarms on a register within `within` fire at
//!   once, on the vCPU thread that raised the last one (it only records the trigger
//!   and wakes the watcher: a vCPU cannot park itself).
//! - **Counters verdicts**: every `counters_poll` the watcher reads the device's
//!   counters out of band (READ_COUNTERS, never the in-band registers) and
//!   compares them with the expected values: with a counters service those it has
//!   enrolled for the device (asked every poll, so counters rolled back before the
//!   run started are caught), without one those read at VM start. Lower counters are
//!   `rolled-back`; a MASTER that rose by more program/erase attempts than the
//!   policy engine passed to the device is `bypassed-trap`, by fewer `undercount`
//!   (the cross-check the counters service does at the end of a tenancy, while the
//!   guest runs); a blown fuse `locked`; other changes `changed`.
//! - **Stale module calls**: calls into a retired module (stale handles, and calls
//!   through a retired library's code pages caught by the SIGSEGV handler).
//!
//! The watcher runs the configured action once — teardown (the VM ends) or detach
//! (the guest runs on without the device) — with the trigger named in the record.

use crate::lifecycle::{Lifecycle, VmHost};
use crate::policy::breach::{BreachAction, BreachConfig};
use crate::policy::engine::AlarmObserver;
use hilrig_device::attest::Verdict;
use hilrig_device::oob::CounterReport;
use hilrig_vmm_api::teardown::BreachTrigger;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How often the watcher looks at the module table when nothing wakes it.
const TICK: Duration = Duration::from_millis(5);

struct State {
    cfg: Arc<BreachConfig>,
    /// Per alarm threshold: the times of its last `count` alarms.
    windows: Vec<VecDeque<Instant>>,
}

/// Watches a VM's breach triggers; the first one fired is acted on.
pub struct Monitor {
    state: Mutex<State>,
    /// Whether any alarm threshold is configured (the engine's fast path).
    alarm_armed: AtomicBool,
    fired: Mutex<Option<BreachTrigger>>,
    wake: Condvar,
}

impl Monitor {
    /// A monitor for `cfg`.
    pub fn new(cfg: Arc<BreachConfig>) -> Monitor {
        let m = Monitor {
            state: Mutex::new(State {
                cfg: cfg.clone(),
                windows: Vec::new(),
            }),
            alarm_armed: AtomicBool::new(false),
            fired: Mutex::new(None),
            wake: Condvar::new(),
        };
        m.configure(cfg);
        m
    }

    /// Take a new `[breach]` table (a policy patch): windows start empty.
    pub fn configure(&self, cfg: Arc<BreachConfig>) {
        let mut s = lock(&self.state);
        s.windows = cfg.alarms.iter().map(|_| VecDeque::new()).collect();
        self.alarm_armed
            .store(!cfg.alarms.is_empty(), Ordering::Release);
        s.cfg = cfg;
    }

    /// The table in force.
    pub fn config(&self) -> Arc<BreachConfig> {
        lock(&self.state).cfg.clone()
    }

    /// Record a trigger (the first one wins) and wake the watcher.
    pub fn fire(&self, t: BreachTrigger) {
        let mut f = lock(&self.fired);
        if f.is_none() {
            tracing::error!("breach: {}", t.describe());
            *f = Some(t);
        }
        self.wake.notify_all();
    }

    /// The trigger fired, if any (kept).
    pub fn fired(&self) -> Option<BreachTrigger> {
        lock(&self.fired).clone()
    }

    /// Count one alarm on `word` at `now` against the thresholds.
    pub fn alarm_at(&self, word: u32, now: Instant) {
        if !self.alarm_armed.load(Ordering::Acquire) {
            return;
        }
        let mut hit = None;
        {
            let mut s = lock(&self.state);
            let cfg = s.cfg.clone();
            for (t, w) in cfg.alarms.iter().zip(s.windows.iter_mut()) {
                if word < t.range.0 || word >= t.range.1 {
                    continue;
                }
                w.push_back(now);
                while w.len() as u64 > t.count {
                    w.pop_front();
                }
                while w
                    .front()
                    .is_some_and(|&f| now.saturating_duration_since(f) > t.within)
                {
                    w.pop_front();
                }
                if w.len() as u64 >= t.count && hit.is_none() {
                    hit = Some(BreachTrigger::Alarms {
                        register: t.register.clone(),
                        count: w.len() as u64,
                        within_ms: t.within.as_millis() as u64,
                    });
                }
            }
        }
        if let Some(t) = hit {
            self.fire(t);
        }
    }

    /// Wait until a trigger fires or `d` passes.
    fn wait(&self, d: Duration) -> Option<BreachTrigger> {
        let f = lock(&self.fired);
        if f.is_some() {
            return f.clone();
        }
        let (f, _) = self
            .wake
            .wait_timeout(f, d)
            .unwrap_or_else(|e| e.into_inner());
        f.clone()
    }
}

impl AlarmObserver for Monitor {
    fn alarm(&self, word: u32) {
        self.alarm_at(word & !3, Instant::now());
    }
}

/// The counters verdict of a running tenancy: `base` read at VM start, `now` read
/// out of band, `vmm_attempts` the program/erase commands the VMM passed to the
/// device since (None: not known, no cross-check).
pub fn counters_verdict(
    base: &CounterReport,
    now: &CounterReport,
    vmm_attempts: Option<u64>,
) -> (Verdict, Vec<String>) {
    let (v, reasons) = hilrig_counters::compare(base, now);
    if v == Verdict::RolledBack || now.epoch != base.epoch {
        return (v, reasons);
    }
    if let Some(vmm) = vmm_attempts {
        let hw = u64::from(now.master.wrapping_sub(base.master));
        if hw > vmm {
            return (
                Verdict::BypassedTrap,
                vec![format!(
                    "hardware counted {hw} program/erase attempts, the VMM passed {vmm}: {} bypassed the trap",
                    hw - vmm
                )],
            );
        }
        // A counter at the end of its budget (the fuse blows there) counts no
        // more: attempts refused for good past it are not an undercount.
        let saturated = now.fuse
            || now
                .counters
                .iter()
                .any(|&c| now.width > 0 && c >= u32::from(now.width));
        if hw < vmm && !saturated {
            return (
                Verdict::Undercount,
                vec![format!(
                    "the VMM passed {vmm} program/erase attempts, the hardware counted {hw}: the device undercounts"
                )],
            );
        }
    }
    (v, reasons)
}

/// Stale module calls seen so far (handles and code addresses).
fn stale_calls(host: &dyn VmHost) -> u64 {
    host.modules().policy.stale_calls()
        + host.modules().handler.stale_calls()
        + crate::lifecycle::modules::stale_address_faults()
}

/// Start the watcher of `monitor` for the VM behind `host`: it checks the module
/// table every few milliseconds and the counters every `counters_poll`, and acts on
/// the first trigger (the configured action, once). Ends when `stop` is set, the VM
/// is gone or the tenant was torn down or detached.
///
/// `confine` runs first on the new thread (its seccomp filter); when it fails the
/// watcher ends at once (the caller ends the VM: a breach must not go unwatched).
pub fn spawn_watch(
    host: Weak<dyn VmHost>,
    monitor: Arc<Monitor>,
    stop: Arc<AtomicBool>,
    confine: impl FnOnce() -> bool + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<Option<BreachTrigger>>> {
    let stale_base = host.upgrade().map_or(0, |h| stale_calls(&*h));
    std::thread::Builder::new()
        .name("breach-watch".into())
        .spawn(move || {
            if !confine() {
                return None;
            }
            let mut next_counters = Instant::now();
            loop {
                let fired = monitor.wait(TICK);
                if stop.load(Ordering::Acquire) {
                    return None;
                }
                let h = host.upgrade()?;
                if h.life().torn_down() {
                    return None;
                }
                let cfg = monitor.config();
                if fired.is_none() && cfg.stale_module_calls {
                    let n = stale_calls(&*h).saturating_sub(stale_base);
                    if n > 0 {
                        monitor.fire(BreachTrigger::StaleModuleCall { calls: n });
                    }
                }
                if fired.is_none() && !cfg.counters.is_empty() && Instant::now() >= next_counters {
                    next_counters = Instant::now() + cfg.counters_poll;
                    if let Some((v, reasons)) = h.running_counters_verdict() {
                        if cfg.counters.contains(&v) {
                            monitor.fire(BreachTrigger::Counters {
                                verdict: v,
                                reasons,
                            });
                        }
                    }
                }
                if let Some(t) = monitor.fired() {
                    match cfg.action {
                        BreachAction::Teardown => {
                            h.teardown_for(t.clone());
                        }
                        BreachAction::Detach => {
                            if let Err(e) = h.detach_for(t.clone()) {
                                tracing::error!("breach: detach refused: {e}");
                            }
                        }
                    }
                    return Some(t);
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::breach::AlarmThreshold;

    fn cfg(count: u64, within_ms: u64) -> Arc<BreachConfig> {
        Arc::new(BreachConfig {
            alarms: vec![AlarmThreshold {
                register: "HANG_TRIGGER".into(),
                range: (0x38, 0x3c),
                count,
                within: Duration::from_millis(within_ms),
            }],
            ..Default::default()
        })
    }

    #[test]
    fn n_alarms_within_the_window_fire_and_slower_ones_do_not() {
        let m = Monitor::new(cfg(3, 1000));
        let t0 = Instant::now();
        // Two alarms, then one 1.5 s later: never 3 within 1 s.
        m.alarm_at(0x38, t0);
        m.alarm_at(0x38, t0 + Duration::from_millis(10));
        m.alarm_at(0x38, t0 + Duration::from_millis(1500));
        assert_eq!(m.fired(), None);
        // Another register's alarms do not count.
        m.alarm_at(0x3c, t0 + Duration::from_millis(1510));
        m.alarm_at(0x10, t0 + Duration::from_millis(1520));
        assert_eq!(m.fired(), None);
        m.alarm_at(0x38, t0 + Duration::from_millis(1600));
        assert_eq!(m.fired(), None);
        m.alarm_at(0x38, t0 + Duration::from_millis(1700));
        assert_eq!(
            m.fired(),
            Some(BreachTrigger::Alarms {
                register: "HANG_TRIGGER".into(),
                count: 3,
                within_ms: 1000
            })
        );
        // The first trigger stays.
        m.fire(BreachTrigger::StaleModuleCall { calls: 1 });
        assert!(matches!(m.fired(), Some(BreachTrigger::Alarms { .. })));
    }

    #[test]
    fn no_thresholds_no_trigger() {
        let m = Monitor::new(Arc::new(BreachConfig::default()));
        for i in 0..100 {
            m.alarm_at(0x38, Instant::now() + Duration::from_millis(i));
        }
        assert_eq!(m.fired(), None);
    }

    #[test]
    fn counters_verdicts_of_a_running_tenancy() {
        let base = CounterReport {
            counters: [1, 1, 0],
            master: 2,
            fuse: false,
            slots_left: 5,
            width: 8,
            epoch: 0,
        };
        let same = counters_verdict(&base, &base, Some(0)).0;
        assert_eq!(same, Verdict::Trusted);
        let mut more = base;
        more.counters[1] = 3;
        more.master = 3;
        assert_eq!(
            counters_verdict(&base, &more, Some(0)).0,
            Verdict::BypassedTrap
        );
        assert_eq!(
            counters_verdict(&base, &more, Some(2)).0,
            Verdict::Undercount
        );
        assert_eq!(counters_verdict(&base, &more, Some(1)).0, Verdict::Changed);
        // A counter at its maximum counts no more: not a false undercount.
        let mut full = base;
        full.counters[1] = 8;
        full.master = 9;
        full.fuse = true;
        full.slots_left = 0;
        let (v, r) = counters_verdict(&base, &full, Some(10));
        assert_ne!(v, Verdict::Undercount, "{r:?}");
        let mut full_no_fuse = full;
        full_no_fuse.fuse = false;
        assert_ne!(
            counters_verdict(&base, &full_no_fuse, Some(10)).0,
            Verdict::Undercount
        );
        // Below the budget, fewer counted than passed is still an undercount.
        assert_eq!(
            counters_verdict(&base, &more, Some(5)).0,
            Verdict::Undercount
        );
        let mut less = base;
        less.counters[0] = 0;
        less.master = 1;
        assert_eq!(
            counters_verdict(&base, &less, Some(0)).0,
            Verdict::RolledBack
        );
    }
}
