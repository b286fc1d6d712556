//! Quiescing: every vCPU is kicked out of KVM_RUN and parks at a rendezvous, the
//! controller acts, then all resume. The blackout — first kick to last resume — is
//! measured every time.
//!
//! vCPU threads [`Rendezvous::register`] when they start and call
//! [`Rendezvous::checkpoint`] between exits (after KVM_RUN returns, before the next
//! one). A parked vCPU is between two exits, so no MMIO access is half-decided while
//! the controller acts: every access is decided entirely before or entirely after.
//! A vCPU that leaves its loop (halt, stop) deregisters and no longer counts.
//!
//! A vCPU thread that is inside KVM_RUN when the pause is requested counts as parked
//! without having to run: it was kicked, so the guest stops at the next instruction
//! boundary the signal reaches, and the thread touches no VMM state before KVM_RUN
//! returns. The controller claims it (IN_RUN -> CLAIMED); on return the thread sees
//! the claim and parks before handling its exit ([`Member::left_run`]). This keeps the
//! blackout independent of the host scheduler when there are more vCPUs than cores.
//!
//! The kick is the caller's (immediate_exit + a real-time signal, as Firecracker and
//! cloud-hypervisor do); it is repeated every [`REKICK`] until all have parked, so a
//! kick that races a vCPU entering KVM_RUN cannot be lost. A vCPU that does not arrive
//! within the bound aborts the pause: everyone is released, nothing was done.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most vCPUs a rendezvous tracks.
pub const MAX_MEMBERS: usize = 64;
const USER: u8 = 0;
const IN_RUN: u8 = 1;
const CLAIMED: u8 = 2;
const FREE: u8 = 3;

/// How often the kick is repeated while waiting for vCPUs to park.
pub const REKICK: Duration = Duration::from_millis(2);

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

#[derive(Debug, Default)]
struct State {
    live: usize,
    parked: usize,
    /// When the last vCPU parked / resumed, stamped by the vCPUs themselves (so the
    /// controller's own scheduling delay is not counted as blackout).
    last_parked: Option<Instant>,
    last_resumed: Option<Instant>,
    /// Incremented on every release, so parked vCPUs know to leave.
    generation: u64,
    pausing: bool,
}

/// The rendezvous every vCPU of a VM shares.
#[derive(Debug)]
pub struct Rendezvous {
    requested: AtomicBool,
    state: Mutex<State>,
    cv: Condvar,
    /// Per member: USER (in the VMM), IN_RUN (in KVM_RUN), CLAIMED (in KVM_RUN and
    /// counted as parked by the controller), FREE (slot unused).
    slots: Box<[AtomicU8]>,
}

impl Default for Rendezvous {
    fn default() -> Self {
        Rendezvous {
            requested: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            slots: (0..MAX_MEMBERS).map(|_| AtomicU8::new(FREE)).collect(),
        }
    }
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
    /// Call right before KVM_RUN. Returns false if a pause is requested: then do not
    /// enter KVM_RUN; go back to the checkpoint.
    #[inline]
    pub fn enter_run(&self) -> bool {
        let Some(i) = self.slot else { return true };
        self.rv.slots[i].store(IN_RUN, Ordering::SeqCst);
        if self.rv.requested.load(Ordering::SeqCst) {
            // Back out unless the controller already claimed us (then we must wait).
            if self.rv.slots[i]
                .compare_exchange(IN_RUN, USER, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                self.left_run();
            }
            return false;
        }
        true
    }

    /// Call right after KVM_RUN returns, before handling the exit. If the controller
    /// counted this vCPU as parked while it was in KVM_RUN, wait here until the
    /// pause ends.
    #[inline]
    pub fn left_run(&self) {
        let Some(i) = self.slot else { return };
        if self.rv.slots[i]
            .compare_exchange(IN_RUN, USER, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return;
        }
        // CLAIMED: park until the pause that claimed us is over.
        let mut s = self.rv.lock();
        while s.pausing {
            s = self.rv.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        self.rv.slots[i].store(USER, Ordering::SeqCst);
        s.last_resumed = Some(Instant::now());
        self.rv.cv.notify_all();
    }
}

/// Proof that every vCPU is parked. Resume with [`Paused::resume`]; dropping it
/// resumes too. It owns a reference to the rendezvous, so a pause can outlive the
/// request that made it (a control-socket `pause` followed by `resume`).
pub struct Paused {
    rv: Arc<Rendezvous>,
    first_kick: Instant,
    parked_at: Instant,
    vcpus: usize,
    done: bool,
}

/// What a completed pause measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Blackout {
    /// vCPUs that were parked.
    pub vcpus: usize,
    /// First kick to the last vCPU parked.
    pub park: Duration,
    /// First kick to the last vCPU resumed.
    pub total: Duration,
}

impl Rendezvous {
    /// A rendezvous with no members.
    pub fn new() -> Rendezvous {
        Rendezvous::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register the calling vCPU.
    pub fn register(&self) -> Member<'_> {
        let mut s = self.lock();
        s.live += 1;
        let slot = self.slots.iter().position(|x| {
            x.compare_exchange(FREE, USER, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        });
        Member { rv: self, slot }
    }

    /// Claim every member that is in KVM_RUN; returns how many are claimed now.
    fn claim(&self) -> usize {
        let mut n = 0;
        for x in self.slots.iter() {
            let _ = x.compare_exchange(IN_RUN, CLAIMED, Ordering::SeqCst, Ordering::SeqCst);
            if x.load(Ordering::SeqCst) == CLAIMED {
                n += 1;
            }
        }
        n
    }

    /// vCPUs registered.
    pub fn live(&self) -> usize {
        self.lock().live
    }

    /// Called by a vCPU between exits; parks while a pause is requested. Returns true
    /// if it parked (the caller then clears its immediate_exit before KVM_RUN).
    #[inline]
    pub fn checkpoint(&self) -> bool {
        if !self.requested.load(Ordering::Acquire) {
            return false;
        }
        let mut s = self.lock();
        if !s.pausing {
            return false;
        }
        let generation = s.generation;
        s.parked += 1;
        s.last_parked = Some(Instant::now());
        self.cv.notify_all();
        while s.generation == generation {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked -= 1;
        s.last_resumed = Some(Instant::now());
        self.cv.notify_all();
        true
    }

    /// Park every vCPU: request, `kick()` (repeated every [`REKICK`]), and wait up to
    /// `bound` for all registered vCPUs to arrive. On timeout everyone is released.
    pub fn pause(
        self: &Arc<Self>,
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
            s.last_parked = None;
            s.last_resumed = None;
        }
        self.requested.store(true, Ordering::SeqCst);
        kick();
        let deadline = first_kick + bound;
        let mut s = self.lock();
        loop {
            let claimed = self.claim();
            if s.parked + claimed >= s.live {
                if claimed > 0 {
                    s.last_parked = Some(Instant::now());
                }
                let vcpus = s.parked + claimed;
                return Ok(Paused {
                    rv: self.clone(),
                    first_kick,
                    parked_at: s.last_parked.unwrap_or_else(Instant::now),
                    vcpus,
                    done: false,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                let (parked, live) = (s.parked + self.claim(), s.live);
                drop(s);
                self.release();
                return Err(QuiesceError::Timeout {
                    parked,
                    live,
                    bound,
                });
            }
            let wait = REKICK.min(deadline - now);
            s = self
                .cv
                .wait_timeout(s, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
            if s.parked + self.claim() < s.live {
                drop(s);
                kick();
                s = self.lock();
            }
        }
    }

    fn release(&self) {
        self.requested.store(false, Ordering::Release);
        let mut s = self.lock();
        s.pausing = false;
        s.generation += 1;
        self.cv.notify_all();
    }
}

impl Paused {
    /// vCPUs parked.
    pub fn vcpus(&self) -> usize {
        self.vcpus
    }

    /// Release every vCPU and wait (briefly) until all have left the rendezvous;
    /// returns the blackout.
    pub fn resume(mut self) -> Blackout {
        self.finish()
    }

    fn finish(&mut self) -> Blackout {
        self.done = true;
        self.rv.release();
        let released = Instant::now();
        let bound = released + Duration::from_secs(1);
        let mut s = self.rv.lock();
        while s.parked > 0 && Instant::now() < bound {
            s = self
                .rv
                .cv
                .wait_timeout(s, Duration::from_millis(1))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        // The last vCPU's own resume stamp; with none parked, the release itself.
        let last = match s.last_resumed {
            Some(t) if s.parked == 0 && t >= released => t,
            _ if self.vcpus == 0 => released,
            _ => Instant::now(),
        };
        Blackout {
            vcpus: self.vcpus,
            park: self.parked_at.saturating_duration_since(self.first_kick),
            total: last.saturating_duration_since(self.first_kick),
        }
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

    /// Threads that "run" (increment a counter) and checkpoint, like vCPUs.
    fn spawn(
        rv: &Arc<Rendezvous>,
        n: usize,
        stop: &Arc<AtomicBool>,
        work: &Arc<AtomicU64>,
    ) -> Vec<std::thread::JoinHandle<()>> {
        (0..n)
            .map(|_| {
                let (rv, stop, work) = (rv.clone(), stop.clone(), work.clone());
                std::thread::spawn(move || {
                    let _m = rv.register();
                    while !stop.load(Ordering::Acquire) {
                        work.fetch_add(1, Ordering::Relaxed);
                        rv.checkpoint();
                    }
                })
            })
            .collect()
    }

    #[test]
    fn nothing_runs_while_paused_and_all_resume() {
        let rv = Arc::new(Rendezvous::new());
        let stop = Arc::new(AtomicBool::new(false));
        let work = Arc::new(AtomicU64::new(0));
        let hs = spawn(&rv, 4, &stop, &work);
        while rv.live() < 4 {
            std::thread::yield_now();
        }
        for _ in 0..50 {
            let p = rv.pause(&|| {}, Duration::from_secs(5)).unwrap();
            assert_eq!(p.vcpus(), 4);
            let before = work.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
            assert_eq!(
                work.load(Ordering::SeqCst),
                before,
                "a vCPU ran while paused"
            );
            let b = p.resume();
            assert!(b.total >= b.park);
        }
        let before = work.load(Ordering::SeqCst);
        while work.load(Ordering::SeqCst) == before {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::Release);
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(rv.live(), 0);
    }

    #[test]
    fn a_vcpu_that_never_arrives_aborts_the_pause() {
        let rv = Arc::new(Rendezvous::new());
        let _stuck = rv.register(); // registered, never checkpoints
        let stop = Arc::new(AtomicBool::new(false));
        let work = Arc::new(AtomicU64::new(0));
        let hs = spawn(&rv, 2, &stop, &work);
        while rv.live() < 3 {
            std::thread::yield_now();
        }
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
        // Released: the others run again, and a later pause without the stuck one works.
        let before = work.load(Ordering::SeqCst);
        while work.load(Ordering::SeqCst) == before {
            std::thread::yield_now();
        }
        drop(_stuck);
        rv.pause(&|| {}, Duration::from_secs(5)).unwrap().resume();
        stop.store(true, Ordering::Release);
        for h in hs {
            h.join().unwrap();
        }
    }

    #[test]
    fn vcpus_inside_kvm_run_are_claimed_without_running() {
        let rv = Arc::new(Rendezvous::new());
        let stop = Arc::new(AtomicBool::new(false));
        let handled = Arc::new(AtomicU64::new(0));
        // Each "vCPU" spends 200 ms in "KVM_RUN" (as if descheduled), then handles
        // an exit: the handling must never happen while a pause holds.
        let paused_flag = Arc::new(AtomicBool::new(false));
        let hs: Vec<_> = (0..3)
            .map(|_| {
                let (rv, stop, handled, pf) = (
                    rv.clone(),
                    stop.clone(),
                    handled.clone(),
                    paused_flag.clone(),
                );
                std::thread::spawn(move || {
                    let m = rv.register();
                    while !stop.load(Ordering::Acquire) {
                        rv.checkpoint();
                        if !m.enter_run() {
                            continue;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                        m.left_run();
                        assert!(
                            !pf.load(Ordering::SeqCst),
                            "an exit was handled during a pause"
                        );
                        handled.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        while rv.live() < 3 {
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(20));
        let t = std::time::Instant::now();
        let p = rv.pause(&|| {}, Duration::from_secs(5)).unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(150),
            "claimed, not waited for: {:?}",
            t.elapsed()
        );
        assert_eq!(p.vcpus(), 3);
        paused_flag.store(true, Ordering::SeqCst);
        let before = handled.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(450));
        assert_eq!(
            handled.load(Ordering::SeqCst),
            before,
            "no exit handled while paused"
        );
        paused_flag.store(false, Ordering::SeqCst);
        p.resume();
        while handled.load(Ordering::SeqCst) == before {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::Release);
        for h in hs {
            h.join().unwrap();
        }
    }

    #[test]
    fn pause_with_no_vcpus_and_busy() {
        let rv = Arc::new(Rendezvous::new());
        let p = rv.pause(&|| {}, Duration::from_millis(10)).unwrap();
        assert_eq!(
            rv.pause(&|| {}, Duration::from_millis(10)).err(),
            Some(QuiesceError::Busy)
        );
        assert_eq!(p.resume().vcpus, 0);
    }
}
