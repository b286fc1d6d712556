//! The vCPU thread: its run loop as an explicit state machine.
//!
//! Each vCPU thread owns its `VcpuFd` and moves between these states; [`transition`]
//! is the whole table (pure, unit-tested), [`vcpu_loop`] performs each state's
//! action and feeds the resulting [`Event`] back in.
//!
//! | state | action | event → next state |
//! |---|---|---|
//! | `Parked` | the rendezvous checkpoint (parks while a pause is on) | `Resumed` → `Running`; `StopRequested` → `Stopping(Quiet)` |
//! | `Running` | enter KVM_RUN (unless a pause is requested), dispatch the exit ([`super::dispatch`]) | `PauseRequested`, `Kicked`, `Handled(Continue)` → `Parked`; `Handled(Policy)` → `Deciding`; `Handled(Halt \| Stop)` → `Stopping(Quiet)`; `Handled(Bad)` → `Stopping(Bad)`; `Handled(Shutdown)` → `Stopping(TripleFault)`; `Handled(Emulation)` → `Stopping(Emulation)`; `Failed` → `Stopping(Finish)` |
//! | `Deciding` | a trapped BAR0 access through the policy engine (reads answered, alarms) | `Decided` → `Parked`; `SplitStore` → `Gathering`; `Faulted` → `Completing`; `Failed` → `Stopping(Finish)` |
//! | `Gathering` | collect the rest of a 16/32-byte store (`immediate_exit` runs), decide the pieces together | `Decided` → `Parked`; `Faulted` → `Completing`; `Failed` → `Stopping(Finish)` |
//! | `Completing` | let KVM finish the faulting instruction without running the guest, restore, inject #GP ([`crate::policy::fault`]) | `Decided` → `Parked`; `StopRequested` → `Stopping(Quiet)`; `Failed` → `Stopping(Finish)` |
//! | `Stopping` | record the verdict (with the guest's RIP and instruction where it names them) and stop the VM | `Ended` → `Done` |
//! | `Done` | leave the rendezvous, hand back the counts | — |
//!
//! Any other pair is a bug in the loop; it ends the VM with an internal verdict
//! rather than panicking.
//!
//! Each vCPU publishes where it is to the rendezvous ([`crate::lifecycle::quiesce`]):
//! idle in `Parked`, in KVM_RUN inside `Running`; a trapped access for the policy
//! engine is *deciding* from KVM_RUN's return through its dispatch, the wait for the
//! device's lock and the policy decision, and *busy* (committing) from its commit
//! point (right before the first side effect) to the end of the access — before the
//! device's lock is dropped (its alarms are raised after it), unless it faults
//! (then through `Completing` to `Parked`); any
//! other exit is busy from KVM_RUN's return through `Gathering`/`Completing` back to
//! `Parked`; a KVM_RUN that returns without an exit (a kick) is idle at once. A pause claims idle, in-KVM_RUN and deciding vCPUs by that state,
//! without their threads having to run, and waits only for busy ones; a claimed vCPU
//! waits before handling its next exit (and, in a stopping pause, before entering
//! KVM_RUN); one claimed while deciding fails its commit, drops the lock, waits, and
//! handles the access again from the start. So no access is ever half-decided when
//! the VMM acts.
//!
//! The loop knows its VM only through [`VcpuHost`] (with [`ExitBus`] and
//! [`DirectPages`]): this file never names the VM (`super::vm` implements the
//! traits), so the two files do not import each other.

use crate::lifecycle::quiesce::{HandlerProbe, Member, Rendezvous};
use crate::policy::engine::{Outcome, PolicyEngine};
use crate::policy::fault::{set_direct_pages, Ctx, DirectPages, SiteCache};
use crate::vstate::dispatch::{handle_exit, ExitBus, Next, Pending};
use crate::vstate::Verdict;
use hilrig_device::regmap::BAR0_SIZE;
use hilrig_device::Device;
use hilrig_vmm_api::{ExitCounts, OnUnemulated};
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::MutexGuard;
use std::time::Instant;
use vm_memory::GuestMemoryMmap;

/// What the vCPU loop needs of its VM beyond answering exits ([`ExitBus`]): the
/// rendezvous, the stop flag, guest memory, the device and the policy engine for
/// trapped accesses, and the `--on-unemulated` setting. The VM implements it.
pub(crate) trait VcpuHost: ExitBus + DirectPages + Sync + 'static {
    /// Where vCPUs park while the VMM acts.
    fn rv(&self) -> &Rendezvous;
    /// Set when the VM is to stop.
    fn stop_flag(&self) -> &AtomicBool;
    /// Guest RAM.
    fn guest_mem(&self) -> &GuestMemoryMmap;
    /// The device, locked (poisoning recovered).
    fn device_lock(&self) -> MutexGuard<'_, Box<dyn Device>>;
    /// The MMIO policy engine, if a policy is on.
    fn policy_engine(&self) -> Option<&PolicyEngine>;
    /// KVM can copy the registers into `kvm_run` at an exit (KVM_CAP_SYNC_REGS; asked
    /// for run by run).
    fn sync_regs(&self) -> bool;
    /// What an instruction KVM cannot emulate on MMIO gets.
    fn on_unemulated(&self) -> OnUnemulated;
    /// Count one #UD injected for an instruction KVM could not emulate.
    fn count_unemulated(&self);
    /// The watchdog's sampling round (bumped before its sampling kicks).
    fn sample_round(&self) -> u64;
}

thread_local! {
    /// This thread's `kvm_run` mapping, for the kick signal's handler.
    pub(crate) static KVM_RUN: std::cell::Cell<*mut kvm_run> =
        const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// Where a vCPU thread is (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum State {
    /// Between exits, at the rendezvous checkpoint.
    Parked,
    /// Entering or inside KVM_RUN, then dispatching the exit.
    Running,
    /// A trapped BAR0 access being decided by the policy engine.
    Deciding(Pending),
    /// Collecting the 8-byte pieces of a `size`-byte store (16 or 32).
    Gathering(Pending, usize),
    /// Finishing a faulting instruction, then injecting #GP.
    Completing,
    /// Leaving the loop.
    Stopping(Ending),
    /// Out of the loop.
    Done,
}

/// How a vCPU leaves its loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Nothing to record (halt, stop requested, verdict recorded already).
    Quiet,
    /// Record this verdict as it is.
    Finish(Box<Verdict>),
    /// Record this BAD ACCESS after filling in the guest's RIP and instruction.
    Bad(Box<Verdict>),
    /// A triple fault at the guest's RIP.
    TripleFault,
    /// KVM could not emulate the instruction at the guest's RIP.
    Emulation,
}

/// What a state's action produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// The checkpoint passed (no pause, or the pause ended) and no stop is set.
    Resumed,
    /// The VM is stopping.
    StopRequested,
    /// A pause was requested as the vCPU was about to enter KVM_RUN.
    PauseRequested,
    /// KVM_RUN returned early (EINTR: a kick, or EAGAIN).
    Kicked,
    /// The exit was dispatched.
    Handled(Next),
    /// The access is a 16/32-byte store near a fault rule: gather it.
    SplitStore(usize),
    /// The access (or instruction) is done; back to the guest.
    Decided,
    /// The access faults: #GP for the guest.
    Faulted,
    /// The vCPU cannot go on: end the VM with this verdict.
    Failed(Box<Verdict>),
    /// The stopping vCPU recorded its verdict.
    Ended,
}

/// The state after `state` when its action produced `event`.
#[inline]
pub(crate) fn transition(state: State, event: Event) -> State {
    use Event as E;
    use State as S;
    match (state, event) {
        (S::Parked, E::Resumed) => S::Running,
        (S::Parked | S::Completing, E::StopRequested) => S::Stopping(Ending::Quiet),
        (S::Running, E::PauseRequested | E::Kicked) => S::Parked,
        (S::Running, E::Handled(next)) => match next {
            Next::Continue => S::Parked,
            Next::Policy(p) => S::Deciding(p),
            Next::Halt | Next::Stop => S::Stopping(Ending::Quiet),
            Next::Bad(v) => S::Stopping(Ending::Bad(v)),
            Next::Shutdown => S::Stopping(Ending::TripleFault),
            Next::Emulation => S::Stopping(Ending::Emulation),
        },
        (S::Deciding(p), E::SplitStore(size)) => S::Gathering(p, size),
        (S::Deciding(_) | S::Gathering(..) | S::Completing, E::Decided) => S::Parked,
        (S::Deciding(_) | S::Gathering(..), E::Faulted) => S::Completing,
        (S::Running | S::Deciding(_) | S::Gathering(..) | S::Completing, E::Failed(v)) => {
            S::Stopping(Ending::Finish(v))
        }
        (S::Stopping(_), E::Ended) => S::Done,
        (S::Done, _) => S::Done,
        (s, e) => S::Stopping(Ending::Finish(Box::new(Verdict::Internal(format!(
            "vCPU state machine: event {e:?} in state {s:?}"
        ))))),
    }
}

/// What a vCPU thread hands back when it ends.
pub(crate) struct VcpuResult {
    pub counts: ExitCounts,
    pub end: Instant,
    pub first_exit: Option<Instant>,
    pub first_mmio: Option<Instant>,
}

/// A vCPU thread: its fd and its bookkeeping.
struct Vcpu<'a, H: VcpuHost> {
    fd: VcpuFd,
    shared: &'a H,
    book: Book,
    site_cache: SiteCache,
    /// The stuck-RIP detector's samples ([`crate::vstate::stuck`]).
    stuck: crate::vstate::stuck::Stuck,
    /// The last decided access raised an alarm (a guest in an alarm flood).
    alarm_streak: bool,
    /// The current KVM_RUN has KVM copy the registers into `kvm_run` at its exit.
    regs_synced: bool,
    /// When (policy engine µs) [`Vcpu::ask_registers`] last looked.
    asked_us: u64,
}

/// What a vCPU thread counts and stamps.
struct Book {
    idx: u8,
    counts: ExitCounts,
    first_exit: Option<Instant>,
    first_mmio: Option<Instant>,
    /// A trapped access is timed from KVM_RUN's return to the end of its handling
    /// (device, policy and all): the tick it started at.
    trapped: Option<crate::ticks::Tick>,
}

/// Run one vCPU until it halts or the VM stops.
pub(crate) fn vcpu_loop<H: VcpuHost>(idx: u8, fd: VcpuFd, shared: &H) -> VcpuResult {
    let mut fd = fd;
    KVM_RUN.with(|c| c.set(fd.get_kvm_run() as *mut kvm_run));
    let direct: &(dyn DirectPages + 'static) = shared;
    // SAFETY: `shared` outlives this call; cleared below before returning.
    unsafe { set_direct_pages(Some(direct as *const dyn DirectPages)) };
    let mut v = Vcpu {
        fd,
        shared,
        book: Book {
            idx,
            counts: ExitCounts::default(),
            first_exit: None,
            first_mmio: None,
            trapped: None,
        },
        site_cache: SiteCache::default(),
        stuck: crate::vstate::stuck::Stuck::default(),
        alarm_streak: false,
        regs_synced: false,
        asked_us: 0,
    };
    let member = shared.rv().register();
    let mut state = State::Parked;
    loop {
        let event = match &state {
            State::Parked => v.park(&member),
            State::Running => v.run(&member),
            State::Deciding(p) => v.decide(*p, &member),
            State::Gathering(p, size) => v.gather(*p, *size),
            State::Completing => v.complete(),
            State::Stopping(end) => {
                v.end(end);
                Event::Ended
            }
            State::Done => break,
        };
        state = transition(state, event);
    }
    KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    // SAFETY: clearing.
    unsafe { set_direct_pages(None) };
    let Vcpu { book, fd, .. } = v;
    drop(fd);
    let Book {
        counts,
        first_exit,
        first_mmio,
        ..
    } = book;
    VcpuResult {
        counts,
        end: Instant::now(),
        first_exit,
        first_mmio,
    }
}

impl Book {
    /// The event of a KVM_RUN return: dispatch the exit, or a kick (true: clear
    /// `immediate_exit`), or a failure.
    #[inline]
    fn run_event<B: ExitBus + ?Sized>(
        &mut self,
        shared: &B,
        ran: Result<VcpuExit<'_>, kvm_ioctls::Error>,
    ) -> (Event, bool) {
        let t0 = crate::ticks::now();
        match ran {
            Ok(exit) => {
                self.first_exit.get_or_insert_with(Instant::now);
                if matches!(exit, VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)) {
                    self.trapped = Some(t0);
                }
                let io_size = match exit {
                    VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => io_element_size(),
                    _ => 0,
                };
                let next = handle_exit(
                    self.idx,
                    exit,
                    shared,
                    &mut self.counts,
                    &mut self.first_mmio,
                    io_size,
                );
                (Event::Handled(next), false)
            }
            Err(e) if e.errno() == libc::EINTR => {
                self.counts.intr += 1;
                (Event::Kicked, true)
            }
            Err(e) if e.errno() == libc::EAGAIN => (Event::Kicked, false),
            Err(e) => {
                let v = Verdict::Internal(format!("vCPU {}: KVM_RUN: {e}", self.idx));
                (Event::Failed(Box::new(v)), false)
            }
        }
    }
}

impl<H: VcpuHost> Vcpu<'_, H> {
    /// `Parked`: record the trapped access just handled, then the rendezvous
    /// checkpoint: the vCPU leaves device and policy code (its published state goes
    /// from busy to idle, so a pause parks it by state from here until its next
    /// exit) and waits here while a stopping pause holds it.
    #[inline]
    fn park(&mut self, member: &Member<'_>) -> Event {
        if let Some(t0) = self.book.trapped.take() {
            self.book
                .counts
                .trap_latency
                .record_ns(crate::ticks::ns_since(t0));
        }
        member.checkpoint();
        member.test_hold_point(self.book.idx, self.shared.stop_flag());
        if self.shared.stop_flag().load(Ordering::Acquire) {
            Event::StopRequested
        } else {
            Event::Resumed
        }
    }

    /// `Running`: KVM_RUN (unless a pause is requested) and the exit's dispatch.
    #[inline]
    fn run(&mut self, member: &Member<'_>) -> Event {
        if !member.enter_run() {
            return Event::PauseRequested;
        }
        if self.alarm_streak || self.regs_synced {
            self.ask_registers();
        }
        let ran = self.fd.run();
        // A trapped access for the policy engine is handled up to its commit point
        // without a side effect (route, device lock, decision: `DECIDING`, where a
        // pause claims it by state; `decide` commits); any other exit goes into
        // device and policy code at once (busy). If a pause claimed this vCPU while
        // it was in KVM_RUN, it waits here before handling the exit.
        let deciding = self.shared.policy_on()
            && matches!(&ran, Ok(VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)));
        if deciding {
            member.left_run_deciding();
        } else {
            // Any other exit, and a kicked run too: the watchdog's stuck-RIP sample
            // routes the RIP (PCI state), reads guest memory and may inject #UD or
            // end the VM, so it is busy like a handler.
            member.left_run();
        }
        let probe = (!deciding).then(HandlerProbe::enter);
        let (mut event, kicked) = self.book.run_event(self.shared, ran);
        if event == Event::Handled(Next::Emulation)
            && self.shared.on_unemulated() == OnUnemulated::Ud
        {
            event = self.unemulated_ud();
        }
        drop(probe);
        // A trapped access the policy engine does not decide (expansion ROM, BAR
        // disabled, nothing there) only read to be answered; if a pause claimed the
        // vCPU meanwhile, answer it again after the release.
        while deciding && !matches!(event, Event::Handled(Next::Policy(_))) && !member.commit() {
            member.decide_again();
            event = self.mmio_again();
        }
        if kicked {
            // A kick (pause or stop): the request flag was set before the kick, so the
            // checkpoint sees it; clear immediate_exit or KVM_RUN keeps failing.
            self.fd.set_kvm_immediate_exit(0);
            if !self.shared.stop_flag().load(Ordering::Acquire) {
                if let Some(e) = self.sample() {
                    event = e;
                }
            }
        }
        event
    }

    /// After a kick: the stuck-RIP detector's sample ([`crate::vstate::stuck`]). An
    /// instruction KVM loops on ends the VM with a verdict naming it, or gets #UD
    /// with `--on-unemulated ud`.
    #[cold]
    #[inline(never)]
    fn sample(&mut self) -> Option<Event> {
        let c = &self.book.counts;
        let exits = c.mmio_read + c.mmio_write + c.io_in + c.io_out + c.hlt + c.other;
        let at = self.stuck.sample(&self.fd, self.shared, exits)?;
        let idx = self.book.idx;
        if self.shared.on_unemulated() != hilrig_vmm_api::OnUnemulated::Ud {
            return Some(Event::Failed(Box::new(Verdict::Internal(at.describe(idx)))));
        }
        tracing::warn!(vcpu = idx, "{}: #UD to the guest", at.describe(idx));
        self.shared.count_unemulated();
        let ud = crate::policy::fault::inject_exception(&self.fd, crate::policy::fault::UD_VECTOR);
        Some(match ud {
            Ok(()) => Event::Kicked,
            Err(e) => Event::Failed(Box::new(Verdict::Internal(format!(
                "vCPU {idx}: injecting #UD for `{}` at rip {:#x}: {e}",
                at.insn, at.rip
            )))),
        })
    }

    /// `--on-unemulated ud`: KVM could not emulate the instruction at RIP (still at
    /// it): the guest gets #UD there and goes on; the VMM logs the instruction.
    #[cold]
    #[inline(never)]
    fn unemulated_ud(&mut self) -> Event {
        let idx = self.book.idx;
        let (rip, insn) = crate::policy::fault::name_rip(self.shared.guest_mem(), &self.fd);
        tracing::warn!(
            vcpu = idx,
            "KVM cannot emulate `{insn}` at rip {rip:#x}: #UD to the guest"
        );
        self.shared.count_unemulated();
        match crate::policy::fault::inject_exception(&self.fd, crate::policy::fault::UD_VECTOR) {
            Ok(()) => Event::Handled(Next::Continue),
            Err(e) => Event::Failed(Box::new(Verdict::Internal(format!(
                "vCPU {idx}: injecting #UD for `{insn}` at rip {rip:#x}: {e}"
            )))),
        }
    }

    /// `Stopping`: record how this vCPU ends.
    #[cold]
    #[inline(never)]
    fn end(&mut self, end: &Ending) {
        let (idx, mem) = (self.book.idx, self.shared.guest_mem());
        let v = match end {
            Ending::Quiet => return,
            Ending::Finish(v) => (**v).clone(),
            Ending::Bad(v) => {
                let mut v = (**v).clone();
                if let Verdict::BadAccess {
                    rip,
                    insn,
                    addr,
                    len,
                    write,
                    ..
                } = &mut v
                {
                    // The faulting instruction, not the next one (a write has retired).
                    (*rip, *insn) =
                        crate::policy::fault::name_access(mem, &self.fd, *addr, *len, *write);
                }
                v
            }
            Ending::TripleFault => {
                let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                Verdict::TripleFault { vcpu: idx, rip }
            }
            Ending::Emulation => {
                let (rip, insn) = crate::policy::fault::name_rip(mem, &self.fd);
                Verdict::Internal(format!(
                    "vCPU {idx}: KVM cannot emulate `{insn}` at rip {rip:#x} (KVM internal error: an instruction KVM cannot emulate on MMIO; --on-unemulated ud gives the guest #UD instead)"
                ))
            }
        };
        self.shared.finish(v);
    }

    /// In an alarm flood, have KVM copy the registers into `kvm_run` at the next
    /// exit when the sink would admit its alarm (its RIP then costs no
    /// KVM_GET_REGS); otherwise stop asking (the copy is paid on every exit). The
    /// exit comes later than the asking: look ahead by two of this vCPU's recent
    /// exit intervals (at most 1 ms).
    #[cold]
    fn ask_registers(&mut self) {
        let mut want = false;
        if self.alarm_streak && self.shared.sync_regs() {
            if let Some(e) = self.shared.policy_engine() {
                let now = e.elapsed_us();
                let gap = now.saturating_sub(self.asked_us).min(1000);
                self.asked_us = now;
                want = e.alarms.token_due(now + 2 * gap);
            }
        }
        if want != self.regs_synced {
            if want {
                self.fd.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
            } else {
                self.fd.clear_sync_valid_reg(kvm_ioctls::SyncReg::Register);
            }
            self.regs_synced = want;
        }
    }

    /// The MMIO exit being handled, dispatched again from `kvm_run` (its data is
    /// still there: nothing consumed it), without counting it again.
    #[cold]
    #[inline(never)]
    fn mmio_again(&mut self) -> Event {
        let run = self.fd.get_kvm_run();
        // SAFETY: called only while handling a KVM_EXIT_MMIO exit, so `mmio` is the
        // union's active member; `len` is clamped to its 8-byte data array.
        let m = unsafe { &mut run.__bindgen_anon_1.mmio };
        let (addr, len) = (m.phys_addr, (m.len as usize).min(8));
        let exit = if m.is_write != 0 {
            VcpuExit::MmioWrite(addr, &m.data[..len])
        } else {
            VcpuExit::MmioRead(addr, &mut m.data[..len])
        };
        let next = handle_exit(
            self.book.idx,
            exit,
            self.shared,
            &mut ExitCounts::default(),
            &mut None,
            0,
        );
        Event::Handled(next)
    }

    /// `Deciding`: carry out a trapped BAR0 access through the policy engine. The
    /// vCPU decides (`DECIDING`: a pause claims it by state) and commits right
    /// before the first side effect; claimed meanwhile, it drops the device's lock,
    /// waits for the release and decides again from the start.
    fn decide(&mut self, p: Pending, member: &Member<'_>) -> Event {
        let Some(ctx) = ctx(self.shared) else {
            // (Never: a policy access comes only with an engine.)
            return Event::Decided;
        };
        let mut p = p;
        loop {
            let dev = self.shared.device_lock();
            if member.still_deciding() {
                if let Some(ev) = self.decide_locked(&ctx, dev, p, member) {
                    return ev;
                }
            } else {
                drop(dev);
            }
            member.decide_again();
            if self.shared.stop_flag().load(Ordering::Acquire) {
                return Event::Decided;
            }
            // A hold came between the exit's dispatch and its commit: route it again
            // (the device may have left the guest meanwhile: reads all ones, writes
            // dropped, as for a disabled BAR).
            match self.shared.route(p.addr) {
                crate::devices::pci::Route::Bar0(off) => p.off = off,
                _ => {
                    if !p.write {
                        self.answer_read(&[0xff; 8][..p.len]);
                    }
                    return Event::Decided;
                }
            }
        }
    }

    /// One try at [`Vcpu::decide`] holding the device's lock: None if a pause
    /// claimed the vCPU before its commit point (nothing was done; the lock is
    /// dropped).
    fn decide_locked(
        &mut self,
        ctx: &Ctx<'_>,
        mut dev: MutexGuard<'_, Box<dyn Device>>,
        p: Pending,
        member: &Member<'_>,
    ) -> Option<Event> {
        // A store KVM hands over in pieces (a 16/32-byte move as 8-byte exits, any
        // store split at a page end, e.g. 4 + 8 + 4) with a fault rule within its
        // reach: gather every piece and decide them together, before any lands.
        if p.write
            && (p.len == 8 || (p.addr + p.len as u64) % 4096 == 0)
            && ctx.engine.write_may_fault(p.off + p.len as u64, p.off + 32)
        {
            if let Some(size) = crate::policy::fault::store_size(ctx.mem, &self.fd, p.addr, p.len) {
                if size > p.len && size <= 32 {
                    // Gathered committed (the pieces leave KVM as they are read;
                    // `gather` takes the device's lock itself).
                    return member.commit().then_some(Event::SplitStore(size));
                }
            }
        }
        let mut buf = p.buf;
        let (idx, stop) = (self.book.idx, self.shared.stop_flag());
        let mut probe = None;
        let mut out = Outcome::default();
        let r = ctx.engine.access_committing(
            &mut **dev,
            p.off,
            &mut buf[..p.len],
            p.write,
            || {
                member.test_hold_deciding(idx, stop);
                let ok = member.commit();
                if ok {
                    probe = Some(HandlerProbe::enter());
                }
                ok
            },
            &mut out,
        );
        match r {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                drop(dev);
                let (rip, insn) =
                    crate::policy::fault::name_access(ctx.mem, &self.fd, p.addr, p.len, p.write);
                return Some(Event::Failed(Box::new(Verdict::BadAccess {
                    vcpu: idx,
                    addr: p.addr,
                    len: p.len,
                    write: p.write,
                    detail: e.to_string(),
                    rip,
                    insn,
                })));
            }
        }
        let alarms = out.hits.iter().any(Option::is_some);
        if !out.fault {
            // Carried out: out of the committing section before the unlock wakes a
            // waiter that may preempt this thread. (Its alarms name the rules of the
            // version that decided: `Outcome::decided_by`.)
            drop(probe.take());
            member.leave_busy();
        }
        drop(dev);
        if !p.write {
            // A faulting read is finished by KVM before the fault is delivered: give
            // it zeros, never stale bytes of an earlier exit.
            if out.fault {
                buf = [0; 8];
            }
            self.answer_read(&buf[..p.len]);
        }
        self.alarm_streak = alarms;
        if alarms {
            let (fd, synced, cache) = (&self.fd, self.regs_synced, &mut self.site_cache);
            ctx.raise_alarms(idx, fd, synced, p.addr, p.len, p.write, &out, cache);
        }
        drop(probe);
        Some(if out.fault {
            Event::Faulted
        } else {
            Event::Decided
        })
    }

    /// Answer the MMIO read being handled with `data` (at most 8 bytes).
    fn answer_read(&mut self, data: &[u8]) {
        let run = self.fd.get_kvm_run();
        let n = data.len().min(8);
        // SAFETY: the exit being answered is KVM_EXIT_MMIO, so `mmio` is the
        // union's active member; `n` is at most 8, the size of its data array.
        unsafe {
            run.__bindgen_anon_1.mmio.data[..n].copy_from_slice(&data[..n]);
        }
    }

    /// `Gathering`: a 16/32-byte store reaches the VMM as 8-byte exits after the
    /// instruction retired, and a store across a page end as one piece per page
    /// (split again at 8 bytes: a 16-byte store at a page's last dword comes as
    /// 4 + 8 + 4). With a fault rule within its reach, collect the remaining pieces
    /// first (KVM_RUN with `immediate_exit`: KVM hands over the next piece without
    /// running the guest, and returns EINTR once the instruction is complete) and
    /// decide them together, so a fault in a later piece keeps the earlier ones
    /// from the device too. A piece outside BAR0 faults the whole store.
    #[cold]
    #[inline(never)]
    fn gather(&mut self, p: Pending, size: usize) -> Event {
        let _probe = HandlerProbe::enter();
        let idx = self.book.idx;
        let bar0 = p.addr - p.off;
        let mut pieces = [(0u64, [0u8; 8], 0usize); MAX_PIECES];
        pieces[0] = (p.off, p.buf, p.len);
        let (mut n, mut total, mut outside) = (1, p.len, false);
        while total < size && n < MAX_PIECES {
            match self.next_piece() {
                Ok(Some((addr, b, len))) => {
                    match addr
                        .checked_sub(bar0)
                        .filter(|o| o + len as u64 <= BAR0_SIZE)
                    {
                        Some(off) => {
                            pieces[n] = (off, b, len);
                            n += 1;
                        }
                        None => outside = true,
                    }
                    total += len;
                }
                Ok(None) => break,
                Err(what) => {
                    return Event::Failed(Box::new(Verdict::Internal(format!(
                        "vCPU {idx}: gathering a {size}-byte store at {:#x}: unexpected {what}",
                        p.addr
                    ))))
                }
            }
        }
        let Some(ctx) = ctx(self.shared) else {
            return Event::Decided;
        };
        let mut outs = [Outcome::default(); MAX_PIECES];
        let r = if outside {
            // Nothing of it may reach the device: decide (for alarms) as a fault.
            Ok(true)
        } else {
            let mut dev = self.shared.device_lock();
            ctx.engine
                .access_split(&mut **dev, &mut pieces[..n], &mut outs[..n])
        };
        let fault = match r {
            Ok(f) => f,
            Err(e) => {
                let (rip, insn) =
                    crate::policy::fault::name_access(ctx.mem, &self.fd, p.addr, p.len, true);
                return Event::Failed(Box::new(Verdict::BadAccess {
                    vcpu: idx,
                    addr: p.addr,
                    len: size,
                    write: true,
                    detail: e.to_string(),
                    rip,
                    insn,
                }));
            }
        };
        self.alarm_streak = false;
        for (i, out) in outs[..n].iter().enumerate() {
            if out.hits.iter().any(Option::is_some) {
                self.alarm_streak = true;
                let (off, _, len) = pieces[i];
                let a = bar0 + off;
                let (fd, synced) = (&self.fd, self.regs_synced);
                ctx.raise_alarms(idx, fd, synced, a, len, true, out, &mut self.site_cache);
            }
        }
        if fault {
            Event::Faulted
        } else {
            Event::Decided
        }
    }

    /// The next piece of a split store: (address, bytes, length). None when the
    /// instruction is complete (the rest went to RAM) or a kick came: decide what
    /// came.
    fn next_piece(&mut self) -> Result<Option<(u64, [u8; 8], usize)>, UnexpectedExit> {
        self.fd.set_kvm_immediate_exit(1);
        let r = match self.fd.run() {
            Ok(VcpuExit::MmioWrite(a, d)) if d.len() <= 8 => {
                let mut b = [0u8; 8];
                b[..d.len()].copy_from_slice(d);
                Ok(Some((a, b, d.len())))
            }
            Err(_) => Ok(None),
            Ok(other) => Err(UnexpectedExit(format!("{other:?}"))),
        };
        self.fd.set_kvm_immediate_exit(0);
        r
    }

    /// `Completing`: #GP for the faulting access.
    #[cold]
    #[inline(never)]
    fn complete(&mut self) -> Event {
        let _probe = HandlerProbe::enter();
        let Some(ctx) = ctx(self.shared) else {
            return Event::Decided;
        };
        match ctx.inject_gp(self.book.idx, &mut self.fd) {
            Ok(true) => Event::Decided,
            Ok(false) => Event::StopRequested,
            Err(v) => Event::Failed(Box::new(v)),
        }
    }
}

/// An exit other than the MMIO write a split store continues with (its debug form).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UnexpectedExit(String);

/// The element size of the port exit being handled (`kvm_run.io.size`), 0 if unknown.
fn io_element_size() -> usize {
    KVM_RUN.with(|c| {
        let p = c.get();
        if p.is_null() {
            return 0;
        }
        // SAFETY: `p` is this thread's kvm_run mapping (set in vcpu_loop while the
        // VcpuFd lives); the exit being handled is KVM_EXIT_IO, so `io` is the
        // union's active member. Only this plain field is read.
        unsafe {
            usize::from(std::ptr::read_volatile(std::ptr::addr_of!(
                (*p).__bindgen_anon_1.io.size
            )))
        }
    })
}

/// The policy engine's context (None without a policy).
fn ctx<H: VcpuHost>(shared: &H) -> Option<Ctx<'_>> {
    let engine = shared.policy_engine()?;
    Some(Ctx {
        mem: shared.guest_mem(),
        engine,
        stop: shared.stop_flag(),
    })
}

/// Most pieces one store reaches the VMM in (32 bytes: 4 + 8 + 8 + 8 + 4).
const MAX_PIECES: usize = 6;

#[cfg(test)]
mod tests {
    use super::*;

    fn pending() -> Pending {
        Pending {
            addr: 0xe000_0038,
            off: 0x38,
            len: 8,
            write: true,
            buf: [1; 8],
        }
    }

    fn stopping(s: &State) -> Option<&Ending> {
        match s {
            State::Stopping(e) => Some(e),
            _ => None,
        }
    }

    #[test]
    fn a_kick_while_running_parks() {
        assert_eq!(transition(State::Running, Event::Kicked), State::Parked);
        assert_eq!(
            transition(State::Running, Event::PauseRequested),
            State::Parked
        );
        assert_eq!(
            transition(State::Running, Event::Handled(Next::Continue)),
            State::Parked
        );
    }

    #[test]
    fn stop_while_parked_ends() {
        let s = transition(State::Parked, Event::StopRequested);
        assert_eq!(stopping(&s), Some(&Ending::Quiet));
        assert_eq!(transition(s, Event::Ended), State::Done);
        assert_eq!(transition(State::Done, Event::Resumed), State::Done);
    }

    #[test]
    fn parked_resumes_into_running() {
        assert_eq!(transition(State::Parked, Event::Resumed), State::Running);
    }

    #[test]
    fn exits_that_end_the_vcpu() {
        let bad = Box::new(Verdict::Internal("x".into()));
        for (next, end) in [
            (Next::Halt, Ending::Quiet),
            (Next::Stop, Ending::Quiet),
            (Next::Bad(bad.clone()), Ending::Bad(bad.clone())),
            (Next::Shutdown, Ending::TripleFault),
            (Next::Emulation, Ending::Emulation),
        ] {
            let s = transition(State::Running, Event::Handled(next));
            assert_eq!(stopping(&s), Some(&end));
        }
        let s = transition(State::Running, Event::Failed(bad.clone()));
        assert_eq!(stopping(&s), Some(&Ending::Finish(bad)));
    }

    #[test]
    fn a_policy_access_is_decided_gathered_and_completed() {
        let p = pending();
        let s = transition(State::Running, Event::Handled(Next::Policy(p)));
        assert_eq!(s, State::Deciding(p));
        assert_eq!(transition(s.clone(), Event::Decided), State::Parked);
        assert_eq!(transition(s.clone(), Event::Faulted), State::Completing);
        let g = transition(s, Event::SplitStore(32));
        assert_eq!(g, State::Gathering(p, 32));
        assert_eq!(transition(g.clone(), Event::Decided), State::Parked);
        assert_eq!(transition(g, Event::Faulted), State::Completing);
        assert_eq!(transition(State::Completing, Event::Decided), State::Parked);
        let s = transition(State::Completing, Event::StopRequested);
        assert_eq!(stopping(&s), Some(&Ending::Quiet));
        let v = Box::new(Verdict::Internal("inject".into()));
        let s = transition(State::Completing, Event::Failed(v.clone()));
        assert_eq!(stopping(&s), Some(&Ending::Finish(v)));
    }

    #[test]
    fn an_impossible_pair_ends_the_vm_instead_of_panicking() {
        for (s, e) in [
            (State::Parked, Event::Faulted),
            (State::Running, Event::Resumed),
            (State::Completing, Event::SplitStore(16)),
            (State::Stopping(Ending::Quiet), Event::Kicked),
        ] {
            match transition(s, e) {
                State::Stopping(Ending::Finish(v)) => {
                    assert!(matches!(*v, Verdict::Internal(ref m) if m.contains("state machine")))
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
