//! Quiescing: the VMM parks its vCPUs at a rendezvous, acts, then lets them go. The
//! blackout — first request to last resume — is measured every time.
//!
//! Every vCPU thread [`Rendezvous::register`]s when it starts and publishes where it
//! is in an atomic slot state:
//!
//! | state | where the thread is | a pause |
//! |---|---|---|
//! | `IDLE` | in the VMM between exits (or back from a KVM_RUN without an exit: a kick), touching no device, policy or PCI state | claims it by state |
//! | `RUN` | inside KVM_RUN | claims it by state |
//! | `DECIDING` | handling a trapped BAR0 access before its commit point: routing it, waiting for the device's lock, the policy decision (nothing it did is seen by anyone: an access whose decision must read the device, a rule filtering on the value, commits before that read) | claims it by state (`CLAIMED_DECIDING`); the decision is void |
//! | `BUSY` | committing: from the commit point (before the first side effect: the device access, the shadow store, the decision record) to the end of the access; any other exit's handling (port I/O, PCI, split stores, #GP injection) | waits for it to leave (short; spins for 10 µs, then a gate backs off and tries again, holding nobody, for up to 50 ms; then, or in a stopping pause at once, sleeps until it leaves) |
//! | `CLAIMED_IDLE` / `CLAIMED_RUN` / `CLAIMED_DECIDING` | counted as parked by the pause | — |
//! | `ABORTED` | released from `CLAIMED_DECIDING`: the decision it was making must be made again | claims it by state |
//!
//! The controller claims every `IDLE`, `RUN`, `DECIDING` and `ABORTED` slot with a
//! compare-and-swap and waits only for `BUSY` ones. A vCPU enters `BUSY` only by a
//! compare-and-swap, from `RUN` ([`Member::left_run`]) or from `DECIDING` at its
//! commit point ([`Member::commit`]), so once claimed it cannot reach a side effect
//! until the pause ends. A vCPU claimed while deciding finds out at its commit point:
//! it discards its decision, drops the device's lock, waits for the release
//! ([`Member::decide_again`]) and handles the exit again from the start (the MMIO
//! exit's data is still in `kvm_run`; nothing was done). So every access is decided
//! and carried out entirely before or entirely after the pause, and the pause waits
//! only for vCPUs inside the short committing section. A vCPU that is preempted in
//! KVM_RUN, between exits, or anywhere in its decision (holding the device's lock
//! included) is parked without having to run, so when vCPU threads outnumber cores
//! the pause does not wait for the host scheduler. The committing section of an
//! access that does not fault ends before the device's lock is dropped
//! ([`Member::leave_busy`]): a vCPU preempted by the waiter its unlock wakes is
//! already out of it; its alarms are raised after, naming the rules of the version
//! that decided (`policy::engine::Outcome::decided_by`).
//!
//! Two kinds of pause:
//!
//! - [`Rendezvous::pause`] (operator `pause`, `quiesce`, teardown): the guest stops.
//!   Every vCPU is kicked (immediate_exit + a real-time signal, as Firecracker and
//!   cloud-hypervisor do; repeated every [`REKICK`] so a kick that races a vCPU
//!   entering KVM_RUN is not lost); a claimed vCPU neither commits an access nor
//!   enters KVM_RUN again until released. (A vCPU claimed inside its decision may
//!   still finish reading what it decides on: reads whose result is discarded.)
//! - [`Rendezvous::gate`] (live patches): only the device and policy code is closed.
//!   Nobody is kicked; vCPUs in KVM_RUN keep running guest code and a claimed idle
//!   vCPU may enter KVM_RUN; a claimed vCPU that returns with an exit waits before
//!   handling it, one claimed in its decision waits at its commit point. The patch
//!   needs only that no access is half-decided while it acts: every access is
//!   decided entirely before or entirely after it.
//!
//! How a gate waits (issue 21.7). A committing vCPU that is running leaves its
//! section within a microsecond or two; one still committing after [`SPIN_FIRST`]
//! is off its CPU (preempted inside the section: vCPU threads outnumber cores), and
//! holding everyone until the host scheduler runs it again was the whole tail of
//! the blackout (milliseconds, at time-slice granularity). So a gate that finds a
//! vCPU still committing after [`SPIN_FIRST`] backs off: it releases every claim
//! (a claimed decision is made again, as after any release), drops its request
//! (nothing on the vCPUs' path looks at the rendezvous then), polls until the
//! vCPUs that were committing have left their sections, and tries again. For at
//! most [`BACKOFF_MAX`] (and half its bound): after that it waits, as a stopping
//! pause does (a handler that is slow, not preempted, is waited for).
//! Nobody is held between tries, so that time is not blackout: a gate's
//! [`Blackout`] leaves it out ([`Blackout::backoff`]) and counts every try's hold
//! (a failed try's ends when the last vCPU that slept in it runs again).
//!
//! How a blackout ends (decided for issue 21.7). The release is stamped by the
//! controller (`Blackout::released`); the blackout (`total`) runs on to the last
//! resume stamped by a vCPU that *slept* in the hold: its wake-up latency is the
//! pause's doing (it had to be woken), so it counts until its thread runs again. A
//! claimed vCPU that must wait spins for [`SPIN_FIRST`] (a pause that swaps a
//! pointer is over by then, and the thread never left its CPU), then yields, up to
//! [`SPIN`], and only then sleeps. One that finds the pause over before it would
//! sleep goes on without a stamp and is not waited for: it was runnable throughout,
//! and if the host runs it late that is the host's oversubscription, which delays a
//! runnable thread as much without any pause (counted as before this was written
//! down; the spin makes the case rare: a short hold costs a waiter no yield).
//!
//! A vCPU that does not arrive within the bound aborts the pause: everyone is
//! released, nothing was done. A vCPU that leaves its loop (halt, stop) deregisters
//! and no longer counts.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most vCPUs a rendezvous tracks by state (more register, but are parked only at
/// their checkpoints, by a [`Rendezvous::pause`]).
pub const MAX_MEMBERS: usize = 64;
const FREE: u8 = 0;
const IDLE: u8 = 1;
const RUN: u8 = 2;
const BUSY: u8 = 3;
const CLAIMED_IDLE: u8 = 4;
const CLAIMED_RUN: u8 = 5;
const DECIDING: u8 = 6;
const CLAIMED_DECIDING: u8 = 7;
const ABORTED: u8 = 8;

fn claimed(s: u8) -> bool {
    s == CLAIMED_IDLE || s == CLAIMED_RUN || s == CLAIMED_DECIDING
}

/// How often the kick is repeated while waiting for vCPUs to park.
pub const REKICK: Duration = Duration::from_millis(2);

/// How long a claimed vCPU waiting for the release spins (for [`SPIN_FIRST`]), then
/// yields, before it sleeps: a hold that ends within it costs the waiting vCPU no
/// wake-up, and the yields let the controller (or a preempted busy vCPU) on the
/// same CPU go on.
pub const SPIN: Duration = Duration::from_micros(50);

/// How long the controller spins (keeping its CPU) for a committing vCPU before it
/// sleeps until that vCPU wakes it, and a claimed vCPU spins before it yields.
pub const SPIN_FIRST: Duration = Duration::from_micros(10);

/// How long a gate backs off at most (holding nobody) while a vCPU stays in its
/// committing section, before it holds everyone and waits for it (module docs).
pub const BACKOFF_MAX: Duration = Duration::from_millis(50);

/// How often a gate backing off looks whether the committing vCPU it gave way to
/// has left its section.
pub const BACKOFF_POLL: Duration = Duration::from_micros(20);

/// Why a pause failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuiesceError {
    /// Not every vCPU parked in time; the pause was aborted and all were released.
    #[error(
        "{parked} of {live} vCPUs parked within {bound:?}; pause aborted, guest state unchanged"
    )]
    Timeout {
        /// vCPUs that arrived.
        parked: usize,
        /// vCPUs running.
        live: usize,
        /// The bound.
        bound: Duration,
    },
    /// Another pause is in progress.
    #[error("a pause is already in progress")]
    Busy,
}

/// What a pause holds back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Mode {
    /// The guest stops: vCPUs are kicked and none enters KVM_RUN.
    #[default]
    Stop,
    /// Only device and policy code is closed; guests run on.
    Gate,
}

#[derive(Debug, Default)]
struct State {
    live: usize,
    /// Members without a slot parked at their checkpoint.
    parked: usize,
    /// Claimed vCPUs blocked until the pause ends (they wanted to handle an exit, or
    /// to run the guest during a stopping pause).
    waiting: usize,
    /// When the last held vCPU resumed, stamped by the vCPUs themselves (so the
    /// controller's own scheduling delay is not counted as blackout).
    last_resumed: Option<Instant>,
    /// Incremented on every release.
    generation: u64,
    /// vCPUs that waited during the current hold (diagnostics).
    waited: usize,
    pausing: bool,
    mode: Mode,
}

/// The rendezvous every vCPU of a VM shares.
#[derive(Debug)]
pub struct Rendezvous {
    requested: AtomicBool,
    /// The running pause is a [`Mode::Stop`] one (read by vCPUs without the lock).
    stopping: AtomicBool,
    state: Mutex<State>,
    cv: Condvar,
    /// Per member: FREE, IDLE, RUN, DECIDING, BUSY, ABORTED and the CLAIMED_ states
    /// (module docs).
    slots: Box<[AtomicU8]>,
    /// Diagnostics ([`trace_holds`]): per member, when it last became busy and when
    /// it left busy during a hold, wall and thread CPU time (ns since `epoch`).
    stamps: Box<[BusyStamps]>,
    epoch: Instant,
    /// How long a gate backs off at most ([`BACKOFF_MAX`]; tests set their own).
    backoff_max: Duration,
}

/// A member's busy-section stamps (written only while [`trace_holds`] is on).
#[derive(Debug, Default)]
struct BusyStamps {
    since: AtomicU64,
    since_cpu: AtomicU64,
    left: AtomicU64,
    left_cpu: AtomicU64,
}

impl Default for Rendezvous {
    fn default() -> Self {
        Rendezvous {
            requested: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            slots: (0..MAX_MEMBERS).map(|_| AtomicU8::new(FREE)).collect(),
            stamps: (0..MAX_MEMBERS).map(|_| BusyStamps::default()).collect(),
            epoch: Instant::now(),
            backoff_max: BACKOFF_MAX,
        }
    }
}

static TRACE: AtomicBool = AtomicBool::new(false);
static TRACES: Mutex<Vec<HoldTrace>> = Mutex::new(Vec::new());
/// Most traces kept (the oldest are dropped).
const MAX_TRACES: usize = 10_000;

/// Diagnostics (issue 21.7), process-wide: while on, every pause or gate records a
/// [`HoldTrace`] of what it waited for ([`take_hold_traces`]). vCPUs then stamp their
/// busy sections (a clock read and a thread-CPU-time read per exit), so leave it off
/// when measuring blackouts.
pub fn trace_holds(on: bool) {
    TRACE.store(on, Ordering::SeqCst);
}

/// The hold traces recorded since the last call (see [`trace_holds`]).
pub fn take_hold_traces() -> Vec<HoldTrace> {
    std::mem::take(&mut *TRACES.lock().unwrap_or_else(|e| e.into_inner()))
}

/// What one pause or gate waited for (diagnostics, [`trace_holds`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HoldTrace {
    /// A stopping pause (true) or a gate.
    pub stopping: bool,
    /// vCPUs registered.
    pub live: usize,
    /// vCPUs claimed by state at the first claim (idle, or inside KVM_RUN).
    pub claimed_at_once: usize,
    /// vCPUs busy (handling an exit) at the first claim: the ones the hold waited for.
    pub busy_at_start: usize,
    /// First request to every vCPU claimed.
    pub park: Duration,
    /// Of the vCPUs waited for, the one that left its busy section last: how long it
    /// had been busy when it left (wall time) ...
    pub slowest_busy_wall: Duration,
    /// ... and how much CPU time its thread got in that time (the rest it was not
    /// running: preempted, or blocked on a lock).
    pub slowest_busy_cpu: Duration,
    /// Claimed vCPUs that came back with an exit (or wanted to run, in a stopping
    /// pause) and waited for the release.
    pub waiters: usize,
    /// First request to the release (every vCPU free to go on).
    pub released: Duration,
    /// The release to the last waiter running again (its own stamp): the host
    /// scheduler's wake-up latency.
    pub resume_lag: Duration,
    /// Tries a gate made (1: held at the first; more: it backed off while a vCPU
    /// preempted in its committing section could not leave it).
    pub tries: u32,
    /// Time between tries, when nobody was held (not blackout).
    pub backoff: Duration,
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// A vCPU's membership; dropping it deregisters the vCPU.
pub struct Member<'a> {
    rv: &'a Rendezvous,
    slot: Option<usize>,
}

impl Drop for Member<'_> {
    fn drop(&mut self) {
        let mut s = self.rv.lock();
        if let Some(i) = self.slot {
            self.rv.slots[i].store(FREE, Ordering::SeqCst);
        }
        s.live = s.live.saturating_sub(1);
        self.rv.cv.notify_all();
    }
}

impl Member<'_> {
    /// Call right before KVM_RUN. Returns false if a stopping pause holds this vCPU:
    /// then do not enter KVM_RUN; go back to the checkpoint (which waits).
    #[inline]
    pub fn enter_run(&self) -> bool {
        let Some(i) = self.slot else {
            return !(self.rv.requested.load(Ordering::SeqCst)
                && self.rv.stopping.load(Ordering::SeqCst));
        };
        let slot = &self.rv.slots[i];
        loop {
            match slot.compare_exchange(IDLE, RUN, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return true,
                Err(CLAIMED_IDLE) => {
                    if self.rv.stopping.load(Ordering::SeqCst) {
                        return false;
                    }
                    // A gate: the guest may run on; the exit it comes back with waits.
                    if slot
                        .compare_exchange(
                            CLAIMED_IDLE,
                            CLAIMED_RUN,
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        )
                        .is_ok()
                    {
                        return true;
                    }
                }
                // Not from the checkpoint (a loop bug): publish the truth.
                Err(BUSY | RUN | DECIDING | ABORTED) => {
                    slot.store(IDLE, Ordering::SeqCst);
                }
                Err(_) => return true,
            }
        }
    }

    /// Call right after KVM_RUN returns, before handling the exit: the vCPU enters
    /// device and policy code (`BUSY`). If a pause claimed it while it was in
    /// KVM_RUN, it waits here until the pause ends.
    #[inline]
    pub fn left_run(&self) {
        self.left_run_to(BUSY);
    }

    /// [`Member::left_run`] for a trapped BAR0 access whose handling up to its
    /// commit point only reads (route, device lock, policy decision): the vCPU
    /// enters `DECIDING`, where a pause claims it by state. Call [`Member::commit`]
    /// before the access's first side effect.
    #[inline]
    pub fn left_run_deciding(&self) {
        self.left_run_to(DECIDING);
    }

    #[inline]
    fn left_run_to(&self, to: u8) {
        let Some(i) = self.slot else { return };
        let slot = &self.rv.slots[i];
        loop {
            match slot.compare_exchange(RUN, to, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => {
                    if to == BUSY {
                        self.stamp_busy(i);
                    }
                    return;
                }
                Err(CLAIMED_RUN | CLAIMED_IDLE | CLAIMED_DECIDING) => self.rv.wait_unclaimed(i),
                Err(_) => {
                    // Not from KVM_RUN (a loop bug): never claimable while busy.
                    if slot
                        .compare_exchange(IDLE, RUN, Ordering::SeqCst, Ordering::SeqCst)
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    }

    #[inline]
    fn stamp_busy(&self, i: usize) {
        if TRACE.load(Ordering::Relaxed) {
            let st = &self.rv.stamps[i];
            st.since.store(self.rv.now_ns(), Ordering::Relaxed);
            st.since_cpu.store(thread_cpu_ns(), Ordering::Relaxed);
        }
    }

    #[inline]
    fn stamp_left(&self, i: usize) {
        if TRACE.load(Ordering::Relaxed)
            && self.rv.requested.load(Ordering::SeqCst)
            && self.rv.slots[i].load(Ordering::SeqCst) == BUSY
        {
            let st = &self.rv.stamps[i];
            st.left.store(self.rv.now_ns(), Ordering::SeqCst);
            st.left_cpu.store(thread_cpu_ns(), Ordering::SeqCst);
        }
    }

    /// The commit point of a decided access (after [`Member::left_run_deciding`]),
    /// right before its first side effect: `DECIDING` becomes `BUSY` and true is
    /// returned. False if a pause claimed this vCPU during its decision: the
    /// decision is void (it may have been made by the code the pause replaces);
    /// carry out nothing, drop every lock, call [`Member::decide_again`] and
    /// handle the exit again from the start. True without a slot, or when already
    /// committed.
    #[inline]
    pub fn commit(&self) -> bool {
        let Some(i) = self.slot else { return true };
        match self.rv.slots[i].compare_exchange(DECIDING, BUSY, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => {
                self.stamp_busy(i);
                true
            }
            Err(s) => s == BUSY,
        }
    }

    /// Whether this vCPU may still commit the decision it is making (false: a pause
    /// claimed it; stop deciding and call [`Member::decide_again`]). A hint to save
    /// work: only [`Member::commit`] decides.
    #[inline]
    pub fn still_deciding(&self) -> bool {
        self.slot
            .is_none_or(|i| self.rv.slots[i].load(Ordering::SeqCst) == DECIDING)
    }

    /// After a failed [`Member::commit`] (holding no lock): wait while a pause
    /// holds this vCPU, then start deciding again (`DECIDING`).
    pub fn decide_again(&self) {
        let Some(i) = self.slot else { return };
        let slot = &self.rv.slots[i];
        loop {
            match slot.load(Ordering::SeqCst) {
                DECIDING => return,
                s if claimed(s) => self.rv.wait_unclaimed(i),
                s => {
                    if slot
                        .compare_exchange(s, DECIDING, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                    {
                        return;
                    }
                }
            }
        }
    }

    /// Called by the vCPU between exits, when it has finished handling one (it
    /// leaves `BUSY`, or a decision that carried out nothing). Holds the vCPU while
    /// a stopping pause is on; returns true if it was held (the caller then clears
    /// its immediate_exit before KVM_RUN).
    #[inline]
    pub fn checkpoint(&self) -> bool {
        if let Some(i) = self.slot {
            let slot = &self.rv.slots[i];
            self.stamp_left(i);
            let mut v = slot.load(Ordering::SeqCst);
            loop {
                let to = match v {
                    BUSY | DECIDING | ABORTED => IDLE,
                    CLAIMED_DECIDING => CLAIMED_IDLE,
                    _ => break,
                };
                match slot.compare_exchange(v, to, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => break,
                    Err(now) => v = now,
                }
            }
        }
        if !self.rv.requested.load(Ordering::SeqCst) {
            return false;
        }
        let mut s = self.rv.lock();
        if !s.pausing {
            return false;
        }
        let Some(i) = self.slot else {
            if s.mode == Mode::Gate {
                return false;
            }
            let generation = s.generation;
            s.parked += 1;
            s.waited += 1;
            self.rv.cv.notify_all();
            while s.generation == generation {
                s = self.rv.cv.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.parked -= 1;
            s.last_resumed = Some(Instant::now());
            self.rv.cv.notify_all();
            return true;
        };
        let slot = &self.rv.slots[i];
        if s.mode == Mode::Stop {
            // Claim ourselves: the guest stays stopped until the release.
            let _ = slot.compare_exchange(IDLE, CLAIMED_IDLE, Ordering::SeqCst, Ordering::SeqCst);
        }
        // The controller may count us now.
        self.rv.cv.notify_all();
        if s.mode == Mode::Stop && claimed(slot.load(Ordering::SeqCst)) {
            self.rv.wait_unclaimed_locked(s, i);
            return true;
        }
        false
    }

    /// End the committing section early: the access is carried out and what is
    /// left of the exit's handling touches no device, policy or PCI state (call it
    /// before dropping the device's lock, so a vCPU preempted by the waiter its
    /// unlock wakes is out of the section already). A pause claims it by state from
    /// here.
    #[inline]
    pub fn leave_busy(&self) {
        let Some(i) = self.slot else { return };
        let slot = &self.rv.slots[i];
        self.stamp_left(i);
        if slot
            .compare_exchange(BUSY, IDLE, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
            && self.rv.requested.load(Ordering::SeqCst)
        {
            // A controller may be waiting for this vCPU.
            let _s = self.rv.lock();
            self.rv.cv.notify_all();
        }
    }

    /// Test hook ([`hold_vcpus_for_test`]): while vCPU `idx` is held, wait here
    /// (between exits, outside KVM_RUN and outside any handler, like a thread the
    /// host stopped) until released or `stop` is set.
    #[doc(hidden)]
    pub fn test_hold_point(&self, idx: u8, stop: &AtomicBool) {
        hold_at(0, idx, stop);
    }

    /// Test hook ([`hold_deciding_for_test`]): while vCPU `idx` is held, wait here
    /// (inside a trapped access's decision, right before its commit point, holding
    /// the device's lock, like a thread the host preempted there).
    #[doc(hidden)]
    pub fn test_hold_deciding(&self, idx: u8, stop: &AtomicBool) {
        hold_at(1, idx, stop);
    }
}

fn hold_at(at: usize, idx: u8, stop: &AtomicBool) {
    let bit = 1u64 << (idx % 64);
    if TEST_HOLD[at].load(Ordering::Relaxed) & bit == 0 {
        return;
    }
    TEST_HELD[at].fetch_or(bit, Ordering::SeqCst);
    while TEST_HOLD[at].load(Ordering::SeqCst) & bit != 0 && !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(1));
    }
    TEST_HELD[at].fetch_and(!bit, Ordering::SeqCst);
}

static PROBE: AtomicBool = AtomicBool::new(false);
static PROBE_INSIDE: AtomicU64 = AtomicU64::new(0);
static PROBE_CHECKS: AtomicU64 = AtomicU64::new(0);
static PROBE_VIOLATIONS: AtomicU64 = AtomicU64::new(0);
static PROBE_DAWDLE_NS: AtomicU64 = AtomicU64::new(0);

/// Test probe (issue 21.7), process-wide: while on, vCPU threads count themselves
/// inside exit handlers (device, policy engine, PCI, fault injection: every call the
/// vCPU loop makes to handle an exit), each handler call lasts at least `dawdle` (a
/// slow or preempted handler), and every quiesced patch checks, throughout its swap
/// and for `dawdle` before it, that no vCPU is inside one ([`handler_probe_for_test`]
/// counts the checks and the violations). Use it in a test binary of its own.
#[doc(hidden)]
pub fn probe_handlers_for_test(on: bool, dawdle: Duration) {
    PROBE_DAWDLE_NS.store(
        u64::try_from(dawdle.as_nanos()).unwrap_or(u64::MAX),
        Ordering::SeqCst,
    );
    PROBE.store(on, Ordering::SeqCst);
}

/// Test probe: (patches checked, times a vCPU was inside a handler during a patch).
#[doc(hidden)]
pub fn handler_probe_for_test() -> (u64, u64) {
    (
        PROBE_CHECKS.load(Ordering::SeqCst),
        PROBE_VIOLATIONS.load(Ordering::SeqCst),
    )
}

/// A vCPU inside an exit handler, for the test probe ([`probe_handlers_for_test`]);
/// a relaxed load when the probe is off.
#[doc(hidden)]
pub struct HandlerProbe(Option<Instant>);

impl HandlerProbe {
    /// The vCPU enters a handler.
    #[inline]
    pub fn enter() -> HandlerProbe {
        if !PROBE.load(Ordering::Relaxed) {
            return HandlerProbe(None);
        }
        PROBE_INSIDE.fetch_add(1, Ordering::SeqCst);
        HandlerProbe(Some(Instant::now()))
    }
}

impl Drop for HandlerProbe {
    fn drop(&mut self) {
        if let Some(t0) = self.0 {
            let dawdle = Duration::from_nanos(PROBE_DAWDLE_NS.load(Ordering::Relaxed));
            while t0.elapsed() < dawdle {
                std::hint::spin_loop();
            }
            PROBE_INSIDE.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Called by a quiesced patch right before and right after its swap: with the test
/// probe on, counts a violation if any vCPU is inside a handler (watching for the
/// probe's `dawdle` before the swap, so a handler entered late is caught too).
#[doc(hidden)]
pub fn probe_no_handler_running() {
    if !PROBE.load(Ordering::Relaxed) {
        return;
    }
    PROBE_CHECKS.fetch_add(1, Ordering::SeqCst);
    let t0 = Instant::now();
    let dawdle = Duration::from_nanos(PROBE_DAWDLE_NS.load(Ordering::Relaxed));
    loop {
        if PROBE_INSIDE.load(Ordering::SeqCst) != 0 {
            PROBE_VIOLATIONS.fetch_add(1, Ordering::SeqCst);
            return;
        }
        if t0.elapsed() >= dawdle {
            return;
        }
        std::hint::spin_loop();
    }
}

/// Test holds (vCPU index bits): [between exits, inside a decision].
static TEST_HOLD: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static TEST_HELD: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// Test hook (process-wide): hold the vCPUs whose indices are set in `mask` between
/// exits, outside KVM_RUN and outside any handler, as if the host had stopped their
/// threads; 0 releases them. Use it in a test binary of its own.
#[doc(hidden)]
pub fn hold_vcpus_for_test(mask: u64) {
    TEST_HOLD[0].store(mask, Ordering::SeqCst);
}

/// Test hook: the vCPUs (by index bit) sitting in the hold right now.
#[doc(hidden)]
pub fn held_vcpus_for_test() -> u64 {
    TEST_HELD[0].load(Ordering::SeqCst)
}

/// Test hook (process-wide): hold the vCPUs in `mask` inside their next trapped
/// access's decision (made, not yet committed, device lock held), as if the host
/// had preempted them there; 0 releases them. Use it in a test binary of its own.
#[doc(hidden)]
pub fn hold_deciding_for_test(mask: u64) {
    TEST_HOLD[1].store(mask, Ordering::SeqCst);
}

/// Test hook: the vCPUs (by index bit) held inside a decision right now.
#[doc(hidden)]
pub fn held_deciding_for_test() -> u64 {
    TEST_HELD[1].load(Ordering::SeqCst)
}

/// Proof that no vCPU is inside device or policy code, and none can enter it until
/// [`Paused::resume`] (after [`Rendezvous::pause`] also: the guest is stopped).
/// Dropping it resumes too. It owns a reference to the rendezvous, so a pause can
/// outlive the request that made it (a control-socket `pause` followed by `resume`).
pub struct Paused {
    rv: Arc<Rendezvous>,
    first_kick: Instant,
    parked_at: Instant,
    vcpus: usize,
    done: bool,
    /// Diagnostics: a stopping pause; vCPUs claimed at once; busy ones at the first
    /// claim (slot bits).
    stopping: bool,
    claimed_at_once: usize,
    busy_mask: u64,
    /// Tries a gate made (1: no back-off) and the time between them, when nobody
    /// was held (not blackout).
    tries: u32,
    backoff: Duration,
}

/// What a completed pause measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Blackout {
    /// vCPUs that were parked.
    pub vcpus: usize,
    /// First kick (request) to the last vCPU parked.
    pub park: Duration,
    /// First kick (request) to the last vCPU resumed, stamped by the vCPUs
    /// themselves: the release plus the host scheduler's latency in running each
    /// held vCPU thread again.
    pub total: Duration,
    /// First kick (request) to the release: the time the VMM held vCPUs back (every
    /// vCPU is free to go on from here).
    pub released: Duration,
    /// Of the request to the end, the time a gate spent between tries, holding
    /// nobody (see [`Rendezvous::gate`]); left out of `park`, `total` and
    /// `released`. Zero for a stopping pause.
    pub backoff: Duration,
}

impl Rendezvous {
    /// A rendezvous with no members.
    pub fn new() -> Rendezvous {
        Rendezvous::default()
    }

    /// Test hook: a rendezvous whose gates back off for at most `max` (instead of
    /// [`BACKOFF_MAX`]), so a test can hold a vCPU in its committing section for
    /// longer than a loaded machine's scheduler delays without crossing it.
    #[doc(hidden)]
    pub fn with_backoff_max_for_test(max: Duration) -> Rendezvous {
        Rendezvous {
            backoff_max: max,
            ..Rendezvous::default()
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Slots busy right now (bits).
    fn busy_mask(&self) -> u64 {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, x)| x.load(Ordering::SeqCst) == BUSY)
            .fold(0, |m, (i, _)| m | 1u64 << i)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register the calling vCPU (it starts `IDLE`, between exits).
    pub fn register(&self) -> Member<'_> {
        let mut s = self.lock();
        s.live += 1;
        let slot = self.slots.iter().position(|x| {
            x.compare_exchange(FREE, IDLE, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        });
        Member { rv: self, slot }
    }

    /// Claim every member that is idle, in KVM_RUN or deciding (not committed);
    /// returns how many are claimed.
    fn claim(&self) -> usize {
        let mut n = 0;
        for x in self.slots.iter() {
            let mut v = x.load(Ordering::SeqCst);
            loop {
                let to = match v {
                    IDLE => CLAIMED_IDLE,
                    RUN => CLAIMED_RUN,
                    DECIDING | ABORTED => CLAIMED_DECIDING,
                    _ => break,
                };
                match x.compare_exchange(v, to, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => v = to,
                    Err(now) => v = now,
                }
            }
            n += claimed(v) as usize;
        }
        n
    }

    /// Undo every claim (under the state lock, so a vCPU waiting for its claim to end
    /// cannot miss it).
    fn unclaim(&self) {
        for x in self.slots.iter() {
            let mut v = x.load(Ordering::SeqCst);
            loop {
                let to = match v {
                    CLAIMED_IDLE => IDLE,
                    CLAIMED_RUN => RUN,
                    // Its decision may predate what the pause did: made again.
                    CLAIMED_DECIDING => ABORTED,
                    _ => break,
                };
                match x.compare_exchange(v, to, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => break,
                    Err(now) => v = now,
                }
            }
        }
    }

    /// Block the calling vCPU (slot `i`) while its slot is claimed.
    fn wait_unclaimed(&self, i: usize) {
        // Spin first: a hold of a pointer exchange ends within microseconds, and
        // this thread keeps its CPU. Then yield (the controller may need this
        // CPU), then sleep.
        let t0 = Instant::now();
        while claimed(self.slots[i].load(Ordering::SeqCst)) {
            let t = t0.elapsed();
            if t >= SPIN {
                break;
            }
            if t < SPIN_FIRST {
                for _ in 0..64 {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::yield_now();
            }
        }
        let s = self.lock();
        if claimed(self.slots[i].load(Ordering::SeqCst)) {
            self.wait_unclaimed_locked(s, i);
        }
    }

    fn wait_unclaimed_locked(&self, mut s: MutexGuard<'_, State>, i: usize) {
        s.waiting += 1;
        s.waited += 1;
        while claimed(self.slots[i].load(Ordering::SeqCst)) {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.waiting -= 1;
        s.last_resumed = Some(Instant::now());
        self.cv.notify_all();
    }

    /// vCPUs registered.
    pub fn live(&self) -> usize {
        self.lock().live
    }

    /// Stop the guest: request, `kick()` (repeated every [`REKICK`]), claim every
    /// vCPU that is idle, in KVM_RUN or deciding and wait up to `bound` for those
    /// committing an access (or handling another exit). On timeout everyone is
    /// released.
    pub fn pause(
        self: &Arc<Self>,
        kick: &dyn Fn(),
        bound: Duration,
    ) -> Result<Paused, QuiesceError> {
        self.hold(Mode::Stop, kick, bound)
    }

    /// Close the device and policy code without stopping the guest (live patches):
    /// claim every vCPU that is idle, in KVM_RUN or deciding (nobody is kicked: they
    /// run on, and wait only if they come back with an exit to handle or reach a
    /// commit point) and wait up to `bound` for those committing an access (or
    /// handling another exit): a few microseconds, then, for up to [`BACKOFF_MAX`],
    /// it backs off and tries again rather than hold everyone for a vCPU
    /// preempted in its committing section (module docs). On timeout everyone is
    /// released.
    pub fn gate(self: &Arc<Self>, bound: Duration) -> Result<Paused, QuiesceError> {
        self.hold(Mode::Gate, &|| {}, bound)
    }

    fn hold(
        self: &Arc<Self>,
        mode: Mode,
        kick: &dyn Fn(),
        bound: Duration,
    ) -> Result<Paused, QuiesceError> {
        let first_kick = Instant::now();
        {
            let mut s = self.lock();
            if s.pausing {
                return Err(QuiesceError::Busy);
            }
            s.pausing = true;
            s.mode = mode;
            s.last_resumed = None;
            s.waited = 0;
            self.stopping.store(mode == Mode::Stop, Ordering::SeqCst);
        }
        self.requested.store(true, Ordering::SeqCst);
        if mode == Mode::Stop {
            kick();
        }
        let deadline = first_kick + bound;
        // A gate backs off (below) for at most BACKOFF_MAX (and half its bound);
        // then it waits for committing vCPUs however long they take, up to the
        // bound (handlers that are slow rather than preempted).
        let backoff_until = first_kick + (bound / 2).min(self.backoff_max);
        let mut s = self.lock();
        let mut first: Option<(usize, u64)> = None;
        // The current try started here; tries made; time between tries (nobody held).
        let (mut tried, mut tries, mut backoff) = (first_kick, 1u32, Duration::ZERO);
        loop {
            let claimed = self.claim();
            let (claimed_at_once, busy_mask) =
                *first.get_or_insert_with(|| (claimed, self.busy_mask()));
            if claimed + s.parked >= s.live {
                return Ok(Paused {
                    rv: self.clone(),
                    first_kick,
                    parked_at: Instant::now(),
                    vcpus: claimed + s.parked,
                    done: false,
                    stopping: mode == Mode::Stop,
                    claimed_at_once,
                    busy_mask,
                    tries,
                    backoff,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                let (parked, live) = (claimed + s.parked, s.live);
                drop(s);
                self.release();
                return Err(QuiesceError::Timeout {
                    parked,
                    live,
                    bound,
                });
            }
            if now < tried + SPIN_FIRST {
                // A committing vCPU that is running leaves its section within a
                // microsecond or two: spin (without the lock, keeping this CPU)
                // rather than sleep. Not yield: that gives this CPU to every
                // runnable thread before the controller gets it back (time slices,
                // when vCPU threads outnumber cores).
                drop(s);
                for _ in 0..64 {
                    std::hint::spin_loop();
                }
                s = self.lock();
                continue;
            }
            if mode == Mode::Gate && now < backoff_until {
                // Still committing after SPIN_FIRST: that vCPU is off its CPU
                // (preempted inside its short section, when vCPU threads outnumber
                // cores). Holding everyone until the host scheduler runs it again is
                // the blackout's whole tail: let everyone go, wait (holding nobody)
                // until it has left its section, and try again.
                s = self.back_off(s, &mut tried, &mut backoff, backoff_until);
                tries += 1;
                continue;
            }
            // Sleep: the vCPU leaving its section wakes us (a woken sleeper is
            // scheduled ahead of threads that have been running).
            let wait = REKICK.min(deadline - now);
            s = self
                .cv
                .wait_timeout(s, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
            if mode == Mode::Stop && self.claim() + s.parked < s.live {
                drop(s);
                kick();
                s = self.lock();
            }
        }
    }

    /// A gate's try failed (a vCPU still committing after [`SPIN_FIRST`]): release
    /// every claim, drop the request (the vCPUs run at full speed, nothing on their
    /// path looks at the rendezvous), poll until every vCPU that was committing has
    /// left its section (or `until`), then raise the request again for the next
    /// try. Adds to `backoff` the time nobody was held: from the later of the
    /// release and the last held vCPU's own resume stamp to the next try.
    fn back_off<'a>(
        &'a self,
        mut s: MutexGuard<'a, State>,
        tried: &mut Instant,
        backoff: &mut Duration,
        until: Instant,
    ) -> MutexGuard<'a, State> {
        let busy = self.busy_mask();
        self.requested.store(false, Ordering::SeqCst);
        self.unclaim();
        let off = Instant::now();
        s.last_resumed = None;
        self.cv.notify_all();
        drop(s);
        // Poll (a timed sleep gives the CPU to the preempted vCPU; no wake-up is
        // asked of the vCPUs, whose path stays as it is without a request).
        while self.busy_mask() & busy != 0 && Instant::now() < until {
            std::thread::sleep(BACKOFF_POLL);
        }
        let mut s = self.lock();
        let now = Instant::now();
        // A claimed vCPU that slept in the failed try is held until it runs again.
        let held_until = if s.waiting > 0 {
            now
        } else {
            s.last_resumed.filter(|t| *t > off).unwrap_or(off)
        };
        *backoff += now.saturating_duration_since(held_until);
        s.last_resumed = None;
        *tried = now;
        self.requested.store(true, Ordering::SeqCst);
        s
    }

    /// Release everyone; returns when.
    fn release(&self) -> Instant {
        let mut s = self.lock();
        self.requested.store(false, Ordering::SeqCst);
        self.unclaim();
        let at = Instant::now();
        s.pausing = false;
        s.generation += 1;
        self.cv.notify_all();
        at
    }
}

impl Paused {
    /// vCPUs parked.
    pub fn vcpus(&self) -> usize {
        self.vcpus
    }

    /// Release every vCPU and wait (briefly) until those held have left the
    /// rendezvous; returns the blackout.
    pub fn resume(mut self) -> Blackout {
        self.finish()
    }

    fn finish(&mut self) -> Blackout {
        self.done = true;
        let released = self.rv.release();
        let bound = released + Duration::from_secs(1);
        let mut s = self.rv.lock();
        while (s.parked > 0 || s.waiting > 0) && Instant::now() < bound {
            s = self
                .rv
                .cv
                .wait_timeout(s, Duration::from_millis(1))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        // The last held vCPU's own resume stamp; with none held, the release itself.
        let last = match s.last_resumed {
            _ if s.parked > 0 || s.waiting > 0 => Instant::now(),
            Some(t) if t >= released => t,
            _ => released,
        };
        let waited = s.waited;
        drop(s);
        let b = Blackout {
            vcpus: self.vcpus,
            park: self
                .parked_at
                .saturating_duration_since(self.first_kick)
                .saturating_sub(self.backoff),
            total: last
                .saturating_duration_since(self.first_kick)
                .saturating_sub(self.backoff),
            released: released
                .saturating_duration_since(self.first_kick)
                .saturating_sub(self.backoff),
            backoff: self.backoff,
        };
        if TRACE.load(Ordering::Relaxed) {
            self.trace(&b, waited, last.saturating_duration_since(released));
        }
        b
    }

    /// Record what this hold waited for ([`trace_holds`]).
    fn trace(&self, b: &Blackout, waiters: usize, resume_lag: Duration) {
        let (mut wall, mut cpu, mut left_last) = (0u64, 0u64, 0u64);
        for i in 0..MAX_MEMBERS.min(64) {
            if self.busy_mask & (1u64 << i) == 0 {
                continue;
            }
            let st = &self.rv.stamps[i];
            let (since, left) = (
                st.since.load(Ordering::SeqCst),
                st.left.load(Ordering::SeqCst),
            );
            if left >= since && left >= left_last {
                left_last = left;
                wall = left - since;
                cpu = st
                    .left_cpu
                    .load(Ordering::SeqCst)
                    .saturating_sub(st.since_cpu.load(Ordering::SeqCst));
            }
        }
        let t = HoldTrace {
            stopping: self.stopping,
            live: self.vcpus,
            claimed_at_once: self.claimed_at_once,
            busy_at_start: self.busy_mask.count_ones() as usize,
            park: b.park,
            slowest_busy_wall: Duration::from_nanos(wall),
            slowest_busy_cpu: Duration::from_nanos(cpu),
            waiters,
            released: b.released,
            resume_lag,
            tries: self.tries,
            backoff: b.backoff,
        };
        let mut v = TRACES.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() >= MAX_TRACES {
            v.remove(0);
        }
        v.push(t);
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if !self.done {
            self.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// Threads shaped like vCPU loops: checkpoint, "KVM_RUN" (`guest` counts guest
    /// progress there), then "handle the exit" (`handled` counts, `inside` says a
    /// thread is in device code).
    struct Loops {
        stop: Arc<AtomicBool>,
        guest: Arc<AtomicU64>,
        handled: Arc<AtomicU64>,
        inside: Arc<AtomicU64>,
        hs: Vec<std::thread::JoinHandle<()>>,
    }

    fn spawn(rv: &Arc<Rendezvous>, n: usize, run_for: Duration) -> Loops {
        let base = rv.live();
        let stop = Arc::new(AtomicBool::new(false));
        let guest = Arc::new(AtomicU64::new(0));
        let handled = Arc::new(AtomicU64::new(0));
        let inside = Arc::new(AtomicU64::new(0));
        let hs = (0..n)
            .map(|_| {
                let (rv, stop, guest, handled, inside) = (
                    rv.clone(),
                    stop.clone(),
                    guest.clone(),
                    handled.clone(),
                    inside.clone(),
                );
                std::thread::spawn(move || {
                    let m = rv.register();
                    while !stop.load(Ordering::Acquire) {
                        m.checkpoint();
                        if !m.enter_run() {
                            continue;
                        }
                        guest.fetch_add(1, Ordering::SeqCst);
                        if !run_for.is_zero() {
                            std::thread::sleep(run_for);
                        }
                        m.left_run();
                        inside.fetch_add(1, Ordering::SeqCst);
                        handled.fetch_add(1, Ordering::SeqCst);
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        while rv.live() < base + n {
            std::thread::yield_now();
        }
        Loops {
            stop,
            guest,
            handled,
            inside,
            hs,
        }
    }

    /// A registered vCPU back from KVM_RUN with an exit it is handling (busy).
    fn committing(rv: &Rendezvous) -> Member<'_> {
        let m = rv.register();
        assert!(m.enter_run());
        m.left_run();
        m
    }

    impl Loops {
        fn wait_progress(&self) {
            let before = self.handled.load(Ordering::SeqCst);
            while self.handled.load(Ordering::SeqCst) == before {
                std::thread::yield_now();
            }
        }
        fn end(self) {
            self.stop.store(true, Ordering::Release);
            for h in self.hs {
                h.join().unwrap();
            }
        }
    }

    #[test]
    fn nothing_runs_while_paused_and_all_resume() {
        let rv = Arc::new(Rendezvous::new());
        let l = spawn(&rv, 4, Duration::ZERO);
        for _ in 0..50 {
            let p = rv.pause(&|| {}, Duration::from_secs(5)).unwrap();
            assert_eq!(p.vcpus(), 4);
            assert_eq!(l.inside.load(Ordering::SeqCst), 0, "a vCPU is in a handler");
            // (Stopping the guest itself is the kick's job, not simulated here.)
            let h = l.handled.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
            assert_eq!(l.handled.load(Ordering::SeqCst), h, "an exit was handled");
            let b = p.resume();
            assert!(b.total >= b.park);
        }
        l.wait_progress();
        l.end();
        assert_eq!(rv.live(), 0);
    }

    #[test]
    fn a_vcpu_that_stays_in_a_handler_aborts_the_pause() {
        let rv = Arc::new(Rendezvous::new());
        // Into KVM_RUN and out with an exit it never finishes handling.
        let stuck = committing(&rv);
        let l = spawn(&rv, 2, Duration::ZERO);
        let kicks = AtomicU64::new(0);
        let e = rv
            .pause(
                &|| {
                    kicks.fetch_add(1, Ordering::Relaxed);
                },
                Duration::from_millis(30),
            )
            .err()
            .unwrap();
        assert!(matches!(e, QuiesceError::Timeout { live: 3, .. }), "{e}");
        assert!(kicks.load(Ordering::Relaxed) > 1, "the kick is repeated");
        assert!(matches!(
            rv.gate(Duration::from_millis(30)).err(),
            Some(QuiesceError::Timeout { live: 3, .. })
        ));
        // Released: the others run again; once it has handled its exit, a pause works.
        l.wait_progress();
        assert!(!stuck.checkpoint());
        rv.pause(&|| {}, Duration::from_secs(5)).unwrap().resume();
        drop(stuck);
        rv.pause(&|| {}, Duration::from_secs(5)).unwrap().resume();
        l.end();
    }

    #[test]
    fn vcpus_inside_kvm_run_are_claimed_without_running() {
        let rv = Arc::new(Rendezvous::new());
        // Each "vCPU" spends 200 ms in "KVM_RUN" (as if descheduled), then handles
        // an exit: the handling must never happen while a pause holds.
        let l = spawn(&rv, 3, Duration::from_millis(200));
        std::thread::sleep(Duration::from_millis(20));
        let t = std::time::Instant::now();
        let p = rv.pause(&|| {}, Duration::from_secs(5)).unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(150),
            "claimed, not waited for: {:?}",
            t.elapsed()
        );
        assert_eq!(p.vcpus(), 3);
        let before = l.handled.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(450));
        assert_eq!(
            l.handled.load(Ordering::SeqCst),
            before,
            "no exit handled while paused"
        );
        p.resume();
        l.wait_progress();
        l.end();
    }

    #[test]
    fn a_gate_lets_guests_run_and_holds_only_exits() {
        let rv = Arc::new(Rendezvous::new());
        let l = spawn(&rv, 3, Duration::from_millis(2));
        l.wait_progress();
        let p = rv.gate(Duration::from_secs(5)).unwrap();
        assert_eq!(p.vcpus(), 3);
        assert_eq!(l.inside.load(Ordering::SeqCst), 0);
        let (g, h) = (
            l.guest.load(Ordering::SeqCst),
            l.handled.load(Ordering::SeqCst),
        );
        std::thread::sleep(Duration::from_millis(50));
        // vCPUs coming back with an exit wait: none is handled.
        assert_eq!(l.handled.load(Ordering::SeqCst), h, "an exit was handled");
        assert!(
            l.guest.load(Ordering::SeqCst) >= g,
            "guest progress counter went backwards"
        );
        let b = p.resume();
        assert_eq!(b.vcpus, 3);
        l.wait_progress();
        l.end();
    }

    #[test]
    fn idle_vcpus_are_parked_by_state_without_running() {
        // Registered vCPUs that never run again (their threads stopped by the host
        // between exits): both kinds of pause complete without them.
        let rv = Arc::new(Rendezvous::new());
        let idle: Vec<_> = (0..3).map(|_| rv.register()).collect();
        let l = spawn(&rv, 2, Duration::ZERO);
        let p = rv.gate(Duration::from_secs(5)).unwrap();
        assert_eq!(p.vcpus(), 5);
        p.resume();
        let p = rv.pause(&|| {}, Duration::from_secs(5)).unwrap();
        assert_eq!(p.vcpus(), 5);
        // Held idle by a stopping pause: may not enter KVM_RUN.
        assert!(!idle[0].enter_run());
        p.resume();
        // Released: it runs; a gate lets it enter KVM_RUN, the exit it brings back
        // waits until the gate opens.
        let p = rv.gate(Duration::from_secs(5)).unwrap();
        assert!(idle[0].enter_run());
        drop(p);
        idle[0].left_run();
        assert!(!idle[0].checkpoint());
        drop(idle);
        l.wait_progress();
        l.end();
        assert_eq!(rv.live(), 0);
    }

    #[test]
    fn a_claimed_exit_waits_for_the_gate_to_open() {
        let rv = Arc::new(Rendezvous::new());
        let handled = Arc::new(AtomicBool::new(false));
        let in_run = Arc::new(AtomicBool::new(false));
        let go = Arc::new(AtomicBool::new(false));
        let t = {
            let (rv, handled, in_run, go) =
                (rv.clone(), handled.clone(), in_run.clone(), go.clone());
            std::thread::spawn(move || {
                let m = rv.register();
                assert!(m.enter_run());
                in_run.store(true, Ordering::SeqCst);
                while !go.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                m.left_run();
                handled.store(true, Ordering::SeqCst);
                m.checkpoint();
            })
        };
        while !in_run.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let p = rv.gate(Duration::from_secs(5)).unwrap();
        go.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        assert!(!handled.load(Ordering::SeqCst), "handled during the gate");
        let b = p.resume();
        t.join().unwrap();
        assert!(handled.load(Ordering::SeqCst));
        assert!(b.total >= Duration::from_millis(30), "{b:?}");
    }

    #[test]
    fn a_vcpu_claimed_while_deciding_decides_again_after_the_release() {
        let rv = Arc::new(Rendezvous::new());
        let m = rv.register();
        assert!(m.enter_run());
        m.left_run_deciding();
        // Deciding (it never runs here): both kinds of pause claim it by state.
        let p = rv.gate(Duration::from_millis(100)).unwrap();
        assert_eq!(p.vcpus(), 1);
        assert!(!m.still_deciding());
        assert!(!m.commit(), "committed during the gate");
        let released = AtomicBool::new(false);
        std::thread::scope(|t| {
            let w = t.spawn(|| {
                m.decide_again();
                assert!(
                    released.load(Ordering::SeqCst),
                    "went on before the release"
                );
            });
            std::thread::sleep(Duration::from_millis(20));
            released.store(true, Ordering::SeqCst);
            drop(p);
            w.join().unwrap();
        });
        assert!(m.still_deciding());
        assert!(m.commit());
        // Committing: waited for (here it never leaves: the pause times out).
        assert!(matches!(
            rv.gate(Duration::from_millis(20)).err(),
            Some(QuiesceError::Timeout { live: 1, .. })
        ));
        m.leave_busy();
        rv.pause(&|| {}, Duration::from_secs(5)).unwrap().resume();
        // A decision the release found void stays void: made again, then committed.
        assert!(!m.checkpoint());
        assert!(m.enter_run());
        m.left_run_deciding();
        let p = rv.pause(&|| {}, Duration::from_millis(100)).unwrap();
        p.resume();
        assert!(!m.commit(), "a decision a pause overtook was committed");
        m.decide_again();
        assert!(m.commit());
        assert!(!m.checkpoint());
    }

    /// Issue 21.7: a vCPU that stays in its committing section (preempted there:
    /// here it does not run for 100 ms) does not hold the others up: the gate backs
    /// off, they go on handling exits, and once it has left, the gate holds every
    /// vCPU for far less than those 100 ms. (Before, a gate held every vCPU from its
    /// first claim until the committing one ran again: the blackout's tail was the
    /// host scheduler's delay.) Bounds are generous, for a loaded machine: the
    /// failure they catch is a hold of the whole 100 ms.
    #[test]
    fn a_gate_backs_off_from_a_vcpu_preempted_while_committing() {
        let rv = Arc::new(Rendezvous::with_backoff_max_for_test(Duration::from_secs(
            10,
        )));
        let busy = committing(&rv);
        let l = spawn(&rv, 2, Duration::ZERO);
        l.wait_progress();
        std::thread::scope(|t| {
            let t0 = Instant::now();
            let g = t.spawn(|| rv.gate(Duration::from_secs(30)));
            std::thread::sleep(Duration::from_millis(10));
            let h = l.handled.load(Ordering::SeqCst);
            let until = Instant::now() + Duration::from_secs(2);
            while l.handled.load(Ordering::SeqCst) <= h && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(
                l.handled.load(Ordering::SeqCst) > h,
                "the gate held the other vCPUs while one was committing"
            );
            std::thread::sleep(Duration::from_millis(100).saturating_sub(t0.elapsed()));
            busy.leave_busy();
            let p = g.join().unwrap().unwrap();
            assert_eq!(p.vcpus(), 3);
            let b = p.resume();
            assert!(b.backoff >= Duration::from_millis(50), "{b:?}");
            assert!(
                b.total < Duration::from_millis(50),
                "held every vCPU for the committing one: {b:?}"
            );
        });
        l.end();
        // One that stays past the back-off (here half the bound) is waited for, up
        // to the bound (here it never leaves: the gate times out, everyone
        // released).
        assert!(!busy.checkpoint());
        assert!(busy.enter_run());
        busy.left_run();
        let bound = Duration::from_millis(80);
        let t0 = Instant::now();
        assert!(matches!(
            rv.gate(bound).err(),
            Some(QuiesceError::Timeout { live: 1, .. })
        ));
        assert!(t0.elapsed() >= bound);
        busy.leave_busy();
        rv.gate(bound).unwrap().resume();
    }

    #[test]
    fn pause_with_no_vcpus_and_busy() {
        let rv = Arc::new(Rendezvous::new());
        let p = rv.pause(&|| {}, Duration::from_millis(10)).unwrap();
        assert_eq!(
            rv.pause(&|| {}, Duration::from_millis(10)).err(),
            Some(QuiesceError::Busy)
        );
        assert_eq!(
            rv.gate(Duration::from_millis(10)).err(),
            Some(QuiesceError::Busy)
        );
        assert_eq!(p.resume().vcpus, 0);
    }
}
