//! The VM: KVM setup, guest memory and vCPUs, the state the vCPU threads share
//! ([`Shared`], which is their [`ExitBus`], [`VcpuHost`] and [`DirectPages`]), the
//! kick signal, the watchdog and the run report. The vCPU thread itself is
//! [`super::vcpu`] (which knows the VM only through those traits); exit dispatch is
//! [`super::dispatch`].

use crate::devices::backend::Backend;
use crate::devices::pci::{PciBus, Route};
use crate::devices::plan::{DirectWindow, PagePlan, SlotRange, TrapSet};
use crate::error::VmmError;
use crate::lifecycle::Lifecycle;
use crate::policy::engine::{AlarmConfig, PolicyEngine, PolicyReport};
use crate::policy::fault::DirectPages;
use crate::policy::Profile;
use crate::vstate::dispatch::{ExitBus, MmioData};
use crate::vstate::layout::*;
use crate::vstate::vcpu::{vcpu_loop, VcpuHost, VcpuResult, KVM_RUN};
use hilrig_device::regmap::BAR0_SIZE;
use hilrig_device::Device;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Where the guest's serial console goes.
#[derive(Debug, Clone, Default)]
pub enum Console {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// The VMM's standard error.
    Stderr,
    /// A file (created or truncated).
    File(PathBuf),
    /// Discarded.
    Null,
    /// Kept in memory and returned in the [`RunReport`].
    Capture,
}

/// Everything a VM run needs besides the device.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Number of vCPUs (1..=[`MAX_VCPUS`]).
    pub vcpus: u8,
    /// Guest RAM in bytes ([`MIN_MEM`]..=[`MAX_MEM`], a multiple of 4 KiB).
    pub mem_size: u64,
    /// The flat payload, loaded at [`PAYLOAD_ADDR`].
    pub payload: Vec<u8>,
    /// Name of the payload for messages.
    pub payload_name: String,
    /// Wall-clock watchdog.
    pub timeout: Duration,
    /// Serial console destination.
    pub console: Console,
    /// Users besides us and root whose terminal may be the console (a lab's
    /// ser2net or labgrid exporter user holding the pty it serves; see
    /// [`hilrig_device::secure::open_console_output`]).
    pub console_owners: Vec<u32>,
    /// Pages of BAR0 that must trap besides those the policy traps (e.g. all, for
    /// a debug run).
    pub trap: TrapSet,
    /// The MMIO policy profile: pages it has rules on trap and every access there
    /// is decided per register. None: no policy engine (every access reaches the
    /// device; what `Vm` did before issue 6).
    pub policy: Option<Arc<Profile>>,
    /// Where alarms go.
    pub alarms: AlarmConfig,
    /// Record every decided part in the [`PolicyReport`] (tests, oracles).
    pub record_decisions: bool,
    /// The control socket to serve (owner-only, JSON lines), if any.
    pub control: Option<std::path::PathBuf>,
    /// Live patching and teardown settings.
    pub lifecycle: crate::lifecycle::LifecycleConfig,
    /// An instruction KVM cannot emulate on MMIO: end the VM with a verdict naming
    /// it (`Stop`), or inject #UD into the guest and go on (`Ud`).
    pub on_unemulated: hilrig_vmm_api::OnUnemulated,
    /// The in-kernel interrupt controller (`--irqchip`): with `Auto` only when the
    /// backend has an interrupt line ([`Backend::intx`]).
    pub irqchip: hilrig_vmm_api::Irqchip,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vcpus: 1,
            mem_size: 64 << 20,
            payload: Vec::new(),
            payload_name: String::new(),
            timeout: Duration::from_secs(10),
            console: Console::Stdout,
            console_owners: Vec::new(),
            trap: TrapSet::none(),
            policy: None,
            alarms: AlarmConfig::default(),
            record_decisions: false,
            control: None,
            lifecycle: crate::lifecycle::LifecycleConfig::default(),
            on_unemulated: hilrig_vmm_api::OnUnemulated::Stop,
            irqchip: hilrig_vmm_api::Irqchip::Auto,
        }
    }
}

/// The GSI (IOAPIC input) a device's INTx is wired to: above the 16 inputs KVM's
/// default routing shares with the PIC, so only the IOAPIC sees it. The guest reads
/// it from config byte 0x3c (interrupt line).
pub const INTX_GSI: u32 = 16;

/// A device's interrupt line wired to the in-kernel IOAPIC: the trigger and resample
/// eventfds registered with `KVM_IRQFD` and handed to the source. Dropping it
/// disconnects the source and removes the irqfd.
struct IrqWiring {
    vm: Arc<VmFd>,
    source: Arc<dyn crate::devices::irq::IntxSource>,
    trigger: vmm_sys_util::eventfd::EventFd,
    gsi: u32,
    _resample: vmm_sys_util::eventfd::EventFd,
}

impl IrqWiring {
    fn connect(
        vm: &Arc<VmFd>,
        source: Arc<dyn crate::devices::irq::IntxSource>,
        gsi: u32,
    ) -> Result<IrqWiring, VmmError> {
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let efd = |what: &str| {
            EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Irq {
                what: format!("eventfd for the {what} of {}", source.name()),
                detail: e.to_string(),
            })
        };
        let trigger = efd("trigger")?;
        let resample = efd("resample")?;
        vm.register_irqfd_with_resample(&trigger, &resample, gsi)
            .map_err(|e| VmmError::Irq {
                what: format!(
                    "KVM_IRQFD (GSI {gsi}, KVM_IRQFD_FLAG_RESAMPLE) for {}",
                    source.name()
                ),
                detail: e.to_string(),
            })?;
        let w = IrqWiring {
            vm: vm.clone(),
            source,
            trigger,
            gsi,
            _resample: resample,
        };
        w.source.connect(&w.trigger, &w._resample)?;
        tracing::debug!(gsi, "{} wired to the IOAPIC", w.source.name());
        Ok(w)
    }
}

impl Drop for IrqWiring {
    fn drop(&mut self) {
        self.source.disconnect();
        if let Err(e) = self.vm.unregister_irqfd(&self.trigger, self.gsi) {
            tracing::warn!("KVM_IRQFD (deassign GSI {}): {e}", self.gsi);
        }
    }
}

pub use crate::verdict::Verdict;
pub use crate::vstate::dispatch::{describe_insn, unknown_exit};
pub use hilrig_vmm_api::{ExitCounts, ExitStatus, TrapLatency};

/// What a finished run tells.
pub struct RunReport {
    /// How it ended.
    pub verdict: Verdict,
    /// Kick rounds the VMM sent (watchdog, pauses, stops): bounded however the guest
    /// behaves.
    pub kicks: u64,
    /// Exits by kind.
    pub exits: ExitCounts,
    /// From the start of VM creation to the end of the run.
    pub wall: Duration,
    /// From the start of VM creation to the first exit of any vCPU (the first guest
    /// instruction that exits, e.g. a payload's first `out`).
    pub first_exit: Option<Duration>,
    /// From the first trapped MMIO exit to the last vCPU leaving its run loop (for
    /// exit-rate figures).
    pub mmio_span: Option<Duration>,
    /// The console output, with [`Console::Capture`].
    pub console: Vec<u8>,
    /// The page plan BAR0 ran with.
    pub plan: PagePlan,
    /// The device, back from the VM (for inspection after the run).
    pub device: Option<Box<dyn Device>>,
    /// What the policy engine did (None without a policy).
    pub policy: Option<PolicyReport>,
    /// Values the guest wrote to the result port ([`PORT_RESULT`]), in order.
    pub results: Vec<u32>,
    /// Vector features the guest was given (AVX availability).
    pub vector: VectorFeatures,
    /// The teardown record, if the tenant was torn down.
    pub teardown: Option<crate::lifecycle::teardown::TeardownRecord>,
    /// Blackouts of pauses and patches.
    pub blackouts: Vec<crate::lifecycle::quiesce::Blackout>,
    /// Patches applied.
    pub patches: Vec<crate::lifecycle::PatchEvent>,
}

pub(crate) struct NoTrigger;
impl vm_superio::Trigger for NoTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

#[derive(Clone, Default)]
struct CaptureBuf(Arc<Mutex<Vec<u8>>>);
impl Write for CaptureBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

type SerialDev = vm_superio::Serial<NoTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

/// Lock a mutex, recovering from poisoning (a panicked vCPU thread must not wedge
/// the rest of the VMM).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// BAR0 memory slots: where the direct pages are registered now.
struct Mapper {
    vm: Arc<VmFd>,
    slots: Vec<SlotRange>,
    active: Vec<u32>,
    mem_size: u64,
}

const FIRST_BAR_SLOT: u32 = 1;

impl Mapper {
    /// Re-register the direct pages at `bar0` (None: unmapped, all accesses trap).
    fn apply(&mut self, bar0: Option<u64>) -> Result<(), VmmError> {
        for &slot in &self.active {
            let r = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: 0,
                memory_size: 0,
                userspace_addr: 0,
                flags: 0,
            };
            // SAFETY: deleting a slot we created; no host memory is handed to KVM.
            unsafe { self.vm.set_user_memory_region(r) }
                .map_err(VmmError::kvm("deleting a BAR memory slot"))?;
        }
        self.active.clear();
        let Some(base) = bar0 else { return Ok(()) };
        // The window must not overlap RAM or wrap the 32-bit space.
        let tss = TSS_ADDR as u64..TSS_ADDR as u64 + 0x3000;
        let overlaps_tss = base < tss.end && tss.start < base + BAR0_SIZE;
        if base < self.mem_size || base + BAR0_SIZE > 1 << 32 || overlaps_tss {
            tracing::warn!(
                base,
                "BAR0 placed over RAM, KVM's TSS pages or past 4 GiB: direct pages not mapped"
            );
            return Ok(());
        }
        for (i, s) in self.slots.iter().enumerate() {
            let slot = FIRST_BAR_SLOT + i as u32;
            let r = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: base + s.bar_offset,
                memory_size: s.len,
                userspace_addr: s.host_addr,
                flags: 0,
            };
            // SAFETY: host_addr..+len is a shared mapping the backend keeps alive for
            // the VM's lifetime (Backend::keep), and the slot is deleted above before
            // any remap; the guest may write it at any time, which the backend expects.
            unsafe { self.vm.set_user_memory_region(r) }
                .map_err(VmmError::kvm("registering a BAR memory slot"))?;
            self.active.push(slot);
        }
        Ok(())
    }
}

pub(crate) struct PciState {
    bus: PciBus,
    mapper: Mapper,
    /// Pages trapped besides the policy's ([`VmConfig::trap`]).
    base_trap: TrapSet,
    /// The memory the backend offers for BAR0.
    windows: Vec<DirectWindow>,
    /// Guest RAM mapped for the device's DMA (VFIO), unmapped with BAR0 at teardown.
    dma: Option<Arc<crate::devices::vfio::GuestDma>>,
}

pub(crate) struct Shared {
    /// Kick rounds sent (each one signal per live vCPU thread).
    pub(crate) kicks: std::sync::atomic::AtomicU64,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) device: Mutex<Box<dyn Device>>,
    pub(crate) pci: Mutex<PciState>,
    pub(crate) serial: Mutex<SerialDev>,
    pub(crate) stop: AtomicBool,
    pub(crate) verdict: Mutex<Option<Verdict>>,
    pub(crate) threads: Mutex<Vec<libc::pthread_t>>,
    pub(crate) start: Instant,
    pub(crate) policy: Option<Arc<PolicyEngine>>,
    pub(crate) results: Mutex<Vec<u32>>,
    /// KVM can copy the registers into `kvm_run` at an exit (KVM_CAP_SYNC_REGS; a
    /// vCPU asks for it run by run, for alarms' RIP).
    pub(crate) sync_regs: bool,
    /// Where vCPUs park while the VMM acts (pause, patch, teardown).
    pub(crate) rv: Arc<crate::lifecycle::quiesce::Rendezvous>,
    /// The patchable components.
    pub(crate) modules: crate::lifecycle::patch::ModuleTable,
    /// Pause/patch/teardown state and settings.
    pub(crate) life: crate::lifecycle::Life,
    /// What an instruction KVM cannot emulate on MMIO gets.
    pub(crate) on_unemulated: hilrig_vmm_api::OnUnemulated,
    /// #UD injected for instructions KVM could not emulate (`--on-unemulated ud`).
    pub(crate) unemulated: std::sync::atomic::AtomicU64,
    /// Sampling rounds of the stuck-RIP detector (a vCPU samples itself only on a
    /// kick of a new round, not on pause or stop kicks: `vstate::stuck`).
    pub(crate) sample_round: std::sync::atomic::AtomicU64,
}

impl crate::lifecycle::VmHost for Shared {
    fn life(&self) -> &crate::lifecycle::Life {
        &self.life
    }
    fn rendezvous(&self) -> &Arc<crate::lifecycle::quiesce::Rendezvous> {
        &self.rv
    }
    fn kick_all(&self) {
        Shared::kick_all(self)
    }
    fn modules(&self) -> &crate::lifecycle::patch::ModuleTable {
        &self.modules
    }
    fn device(&self) -> MutexGuard<'_, Box<dyn Device>> {
        lock(&self.device)
    }
    fn policy_engine(&self) -> Option<&PolicyEngine> {
        self.policy.as_deref()
    }
    fn replace_policy(
        &self,
        profile: Arc<Profile>,
        version: u64,
    ) -> Result<Arc<Profile>, VmmError> {
        Shared::replace_policy_at(self, profile, Some(version))
    }
    fn guest_ram(&self) -> Vec<(*mut u8, usize)> {
        Shared::guest_ram(self)
    }
    fn unmap_device(&self) -> Result<usize, VmmError> {
        Shared::unmap_device(self)
    }
    fn detach_device(&self) -> Result<usize, VmmError> {
        // Off the bus first (config space all ones, nothing decodes), then unmapped.
        lock(&self.pci).bus.detach();
        Shared::unmap_device(self)
    }
    fn verdict(&self) -> MutexGuard<'_, Option<Verdict>> {
        lock(&self.verdict)
    }
    fn stop_flag(&self) -> &AtomicBool {
        &self.stop
    }
    fn finish(&self, v: Verdict) {
        Shared::finish(self, v)
    }
    fn started(&self) -> Instant {
        self.start
    }
    fn as_host(&self) -> &dyn crate::lifecycle::VmHost {
        self
    }
}

impl Shared {
    /// Record `v` (the first verdict wins), stop every vCPU.
    pub(crate) fn finish(&self, v: Verdict) {
        {
            let mut g = lock(&self.verdict);
            if g.is_none() {
                *g = Some(v);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        self.kick_all();
    }

    /// Kick every vCPU thread out of KVM_RUN (SIGRTMIN: `immediate_exit`).
    pub(crate) fn kick_all(&self) {
        self.kicks.fetch_add(1, Ordering::Relaxed);
        for &t in lock(&self.threads).iter() {
            // SAFETY: the thread ids are of threads not yet joined (joins happen after
            // the last kick, in `Vm::run`); the signal's handler only sets immediate_exit.
            unsafe {
                libc::pthread_kill(t, kick_signal());
            }
        }
    }
}

impl ExitBus for Shared {
    #[inline]
    fn route(&self, addr: u64) -> Route {
        lock(&self.pci).bus.route(addr)
    }
    #[inline]
    fn policy_on(&self) -> bool {
        self.policy.is_some()
    }
    #[inline]
    fn bar0(&self, off: u64, data: MmioData<'_>) -> Result<(), hilrig_device::DeviceError> {
        let mut dev = lock(&self.device);
        match data {
            MmioData::Read(d) => dev.mmio_read(off, d),
            MmioData::Write(d) => dev.mmio_write(off, d),
        }
    }
    fn rom_size(&self) -> u64 {
        lock(&self.pci).bus.rom_size()
    }
    fn rom_read(&self, off: u64, data: &mut [u8]) -> Result<(), hilrig_device::DeviceError> {
        lock(&self.device).rom_read(off, data)
    }
    fn serial_write(&self, reg: u8, value: u8) {
        let _ = lock(&self.serial).write(reg, value);
    }
    fn serial_read(&self, reg: u8) -> u8 {
        lock(&self.serial).read(reg)
    }
    fn pci_write(&self, port: u16, data: &[u8]) -> Result<(), VmmError> {
        let mut pci = lock(&self.pci);
        if pci.bus.io_write(port, data) {
            let d = pci.bus.decode();
            pci.mapper.apply(d.bar0)?;
        }
        Ok(())
    }
    fn pci_read(&self, port: u16, data: &mut [u8]) {
        lock(&self.pci).bus.io_read(port, data)
    }
    fn push_result(&self, value: u32) {
        let mut r = lock(&self.results);
        if r.len() < MAX_RESULTS {
            r.push(value);
        }
    }
    fn finish(&self, verdict: Verdict) {
        Shared::finish(self, verdict)
    }
}

impl VcpuHost for Shared {
    #[inline]
    fn rv(&self) -> &crate::lifecycle::quiesce::Rendezvous {
        &self.rv
    }
    #[inline]
    fn stop_flag(&self) -> &AtomicBool {
        &self.stop
    }
    #[inline]
    fn guest_mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }
    #[inline]
    fn device_lock(&self) -> MutexGuard<'_, Box<dyn Device>> {
        lock(&self.device)
    }
    #[inline]
    fn policy_engine(&self) -> Option<&PolicyEngine> {
        self.policy.as_deref()
    }
    #[inline]
    fn sync_regs(&self) -> bool {
        self.sync_regs
    }
    #[inline]
    fn on_unemulated(&self) -> hilrig_vmm_api::OnUnemulated {
        self.on_unemulated
    }
    fn count_unemulated(&self) {
        self.unemulated.fetch_add(1, Ordering::Relaxed);
    }
    fn sample_round(&self) -> u64 {
        self.sample_round.load(Ordering::Acquire)
    }
}

impl DirectPages for Shared {
    fn read_direct(&self, gpa: u64, out: &mut [u8]) -> bool {
        let pci = lock(&self.pci);
        let Some(base) = pci.bus.decode().bar0 else {
            return false;
        };
        if pci.mapper.active.is_empty() {
            return false;
        }
        for s in &pci.mapper.slots {
            let start = base + s.bar_offset;
            if gpa >= start && gpa + out.len() as u64 <= start + s.len {
                let src = (s.host_addr + (gpa - start)) as *const u8;
                for (i, b) in out.iter_mut().enumerate() {
                    // SAFETY: inside a window the backend keeps mapped while the VM
                    // lives (`Vm` holds it); the guest may write it concurrently, so
                    // each byte is read volatile, like guest RAM.
                    *b = unsafe { std::ptr::read_volatile(src.add(i)) };
                }
                return true;
            }
        }
        false
    }
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer is this thread's kvm_run mapping, set while the VcpuFd
        // is alive and cleared before it is dropped.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).immediate_exit), 1) };
    }
}

fn install_kick_handler() -> Result<(), VmmError> {
    static ONCE: Once = Once::new();
    static mut RESULT: i32 = 0;
    ONCE.call_once(|| {
        // SAFETY: a plain sigaction with an async-signal-safe handler (one volatile
        // store through a thread-local pointer), no SA_RESTART so KVM_RUN returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = kick_handler as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            RESULT = libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
    // SAFETY: written once inside call_once, which happens-before this read.
    let r = unsafe { RESULT };
    if r != 0 {
        return Err(VmmError::Thread(
            "installing the vCPU kick signal handler".into(),
        ));
    }
    Ok(())
}

/// Stops a running VM from another thread: every vCPU is kicked out of KVM_RUN and
/// the run ends with [`Verdict::Stopped`] (unless a verdict came first).
#[derive(Clone)]
pub struct StopHandle(std::sync::Weak<Shared>);

impl StopHandle {
    /// Stop the VM, giving `why`; a no-op once the VM has finished.
    pub fn stop(&self, why: impl Into<String>) {
        if let Some(s) = self.0.upgrade() {
            s.finish(Verdict::Stopped(why.into()));
        }
    }
}

/// Reads or replaces the MMIO policy of a running VM (for the control socket and
/// live patching, issue 9).
#[derive(Clone)]
pub struct PolicyHandle(std::sync::Weak<Shared>);

impl PolicyHandle {
    /// The active profile (None once the VM is gone).
    pub fn profile(&self) -> Option<Arc<Profile>> {
        let s = self.0.upgrade()?;
        s.policy.as_ref().map(|e| e.profile())
    }

    /// Live policy figures (alarms per register, actions, faults) for metrics.
    pub fn metrics(&self) -> Option<PolicyReport> {
        let s = self.0.upgrade()?;
        s.policy.as_ref().map(|e| e.metrics())
    }

    /// Replace the active profile, with vCPUs running: the BAR0 memory slots are
    /// re-planned for the new profile's trapping pages (a page that is about to
    /// gain rules stops being mapped before the new profile is visible), then the
    /// profile and a fresh shadow store are published as the next version of the
    /// module table's policy slot. Every access is decided entirely by the old or
    /// entirely by the new profile, exactly once. Returns the old one.
    pub fn replace(&self, profile: Arc<Profile>) -> Result<Arc<Profile>, VmmError> {
        let s = self
            .0
            .upgrade()
            .ok_or_else(|| VmmError::Config("the VM has finished".into()))?;
        s.replace_policy(profile)
    }
}

impl Shared {
    /// Replace the active policy profile (see [`PolicyHandle::replace`]).
    pub(crate) fn replace_policy(&self, profile: Arc<Profile>) -> Result<Arc<Profile>, VmmError> {
        self.replace_policy_at(profile, None)
    }

    /// Install `profile` as policy `version` (None: the next version) through the
    /// module table's policy slot, without a quiesce: the BAR0 memory slots are
    /// re-planned for the new trapping pages first, then the new module is
    /// published (decisions the swap overtakes are made again by it).
    pub(crate) fn replace_policy_at(
        &self,
        profile: Arc<Profile>,
        version: Option<u64>,
    ) -> Result<Arc<Profile>, VmmError> {
        let engine = self
            .policy
            .as_ref()
            .ok_or_else(|| VmmError::Config("the VM runs without a policy".into()))?;
        let mut pci = lock(&self.pci);
        let mut trap = pci.base_trap;
        for p in profile.trapping_pages() {
            trap.insert(p);
        }
        let plan = PagePlan::decide(trap, &pci.windows);
        let slots = plan.slots();
        let bar0 = pci.bus.decode().bar0;
        let mut result = Ok(());
        // Re-map only when the trapping pages change: memslot ioctls are the expensive
        // part of a swap (tens of microseconds each under nested virtualisation).
        let remap = slots != pci.mapper.slots;
        let version = version.unwrap_or_else(|| engine.slot().version() + 1);
        let old = engine.replace_at(profile, version, || {
            if remap {
                pci.mapper.slots = slots;
                result = pci.mapper.apply(bar0);
            }
        });
        result.map(|()| old)
    }

    /// Remove every guest mapping of the device's BAR0 (teardown). Returns how many
    /// memory slots were removed; afterwards none is left.
    pub(crate) fn unmap_device(&self) -> Result<usize, VmmError> {
        let mut pci = lock(&self.pci);
        let n = pci.mapper.active.len();
        pci.mapper.slots.clear();
        pci.mapper.apply(None)?;
        // The device may no longer reach guest RAM (before the RAM is scrubbed).
        if let Some(dma) = &pci.dma {
            dma.unmap_all()?;
        }
        if !pci.mapper.active.is_empty() {
            return Err(VmmError::Config(
                "BAR0 memory slots still mapped after unmapping".into(),
            ));
        }
        Ok(n)
    }

    /// Guest RAM regions as (host pointer, length), for scrubbing.
    pub(crate) fn guest_ram(&self) -> Vec<(*mut u8, usize)> {
        self.mem
            .iter()
            .map(|r| (r.as_ptr(), r.len() as usize))
            .collect()
    }
}

/// A VM ready to run.
pub struct Vm {
    vector: VectorFeatures,
    config: VmConfig,
    vcpus: Vec<VcpuFd>,
    shared: Arc<Shared>,
    capture: Option<CaptureBuf>,
    plan: PagePlan,
    sandbox: crate::seccomp::Sandbox,
    /// The device's interrupt wiring (dropped first: the source stops signalling).
    _irq: Option<IrqWiring>,
    /// Whether the VM has the in-kernel irqchip.
    irqchip: bool,
    // Drop order: the VM fd before the memory it maps, the backend's mappings last.
    _vm: Arc<VmFd>,
    _mem: GuestMemoryMmap,
    _backend_keep: Vec<Box<dyn Send>>,
}

/// Check a VM configuration and payload before anything is created.
pub fn check_config(config: &VmConfig) -> Result<(), VmmError> {
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(VmmError::Config(format!(
            "{} vCPUs: 1 to {MAX_VCPUS} are supported",
            config.vcpus
        )));
    }
    if config.mem_size < MIN_MEM || config.mem_size > MAX_MEM || config.mem_size % 4096 != 0 {
        return Err(VmmError::Config(format!(
            "guest memory of {} bytes: must be a multiple of 4 KiB from {} MiB to {} GiB",
            config.mem_size,
            MIN_MEM >> 20,
            MAX_MEM >> 30
        )));
    }
    let room = config.mem_size - PAYLOAD_ADDR;
    if config.payload.is_empty() {
        return Err(VmmError::Guest(hilrig_guest::GuestError::Payload {
            what: config.payload_name.clone(),
            detail: "is empty (0 bytes)".into(),
        }));
    }
    if config.payload.len() as u64 > room {
        return Err(VmmError::Guest(hilrig_guest::GuestError::Payload {
            what: config.payload_name.clone(),
            detail: format!(
                "is {} bytes; guest memory of {} bytes has room for {room} bytes at {PAYLOAD_ADDR:#x}",
                config.payload.len(),
                config.mem_size
            ),
        }));
    }
    Ok(())
}

/// Ask for transparent huge pages on guest RAM (as QEMU does): the guest's first
/// touches fault in 2 MiB at a time, KVM maps it with large pages, and teardown
/// zeroes, checks and hands back 512 times fewer pages (issue 21.7: the scrub of a
/// 1 GiB guest was bound by 4 KiB page walks). Best effort: a kernel without THP (or
/// with it off) keeps 4 KiB pages, said at debug level.
fn huge_pages(host: *mut u8, len: usize) {
    // SAFETY: advice on guest RAM's own private anonymous mapping; it changes no
    // contents.
    if unsafe { libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE) } != 0 {
        tracing::debug!(
            "madvise(MADV_HUGEPAGE) on guest RAM: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Allocate guest RAM, register it with KVM, write the system tables and load the
/// payload.
fn guest_memory(vm: &VmFd, config: &VmConfig) -> Result<GuestMemoryMmap, VmmError> {
    let mem_size = usize::try_from(config.mem_size)
        .map_err(|_| VmmError::Config("guest memory size".into()))?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size)])
        .map_err(|e| VmmError::Memory(format!("allocating {mem_size} bytes: {e}")))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| VmmError::Memory(e.to_string()))?;
        huge_pages(host, region.len() as usize);
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is owned by `mem`, which the Vm keeps until the VM fd
        // is dropped (field order: _mem is dropped after the vCPUs and with _vm).
        unsafe { vm.set_user_memory_region(r) }.map_err(VmmError::kvm("registering guest RAM"))?;
    }
    write_system_tables(&mem)?;
    mem.write_slice(&config.payload, GuestAddress(PAYLOAD_ADDR))
        .map_err(|e| VmmError::Memory(format!("loading the payload: {e}")))?;
    Ok(mem)
}

/// The policy engine of the configured profile (None without a policy).
fn policy_engine(config: &VmConfig) -> Result<Option<Arc<PolicyEngine>>, VmmError> {
    let Some(p) = &config.policy else {
        return Ok(None);
    };
    let engine = PolicyEngine::new(p.clone(), &config.alarms).map_err(|source| VmmError::Io {
        path: config.alarms.file.clone().unwrap_or_default(),
        source,
    })?;
    let forced = (0..hilrig_device::regmap::PAGES).filter(|&p| config.trap.contains(p));
    Ok(Some(Arc::new(
        engine
            .record_decisions(config.record_decisions)
            .forced_pages(forced),
    )))
}

type ConsoleOut = (Box<dyn Write + Send>, Option<CaptureBuf>);

/// Where the UART writes, and the capture buffer with [`Console::Capture`].
fn console_writer(console: &Console, owners: &[u32]) -> Result<ConsoleOut, VmmError> {
    Ok(match console {
        Console::Stdout => (Box::new(std::io::stdout()), None),
        Console::Stderr => (Box::new(std::io::stderr()), None),
        Console::Null => (Box::new(std::io::sink()), None),
        Console::Capture => {
            let c = CaptureBuf::default();
            (Box::new(c.clone()), Some(c))
        }
        Console::File(p) => (
            // A terminal (directly or through a symlink) as it is; otherwise a
            // regular file: a symlink, FIFO or hard link planted there is refused.
            Box::new(
                hilrig_device::secure::open_console_output(p, owners).map_err(|e| {
                    VmmError::Io {
                        path: p.clone(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            format!("console file refused: {e}"),
                        ),
                    }
                })?,
            ),
            None,
        ),
    })
}

/// Create vCPU `i` in long mode at the payload's entry (see the entry ABI).
fn create_vcpu(
    vm: &VmFd,
    i: u8,
    cpuid: &kvm_bindings::CpuId,
    vector: VectorFeatures,
    config: &VmConfig,
) -> Result<VcpuFd, VmmError> {
    let vcpu = vm
        .create_vcpu(u64::from(i))
        .map_err(VmmError::kvm("KVM_CREATE_VCPU"))?;
    let mut c = cpuid.clone();
    for e in c.as_mut_slice() {
        if e.function == 1 {
            e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(i) << 24);
        }
        if e.function == 0xb {
            e.edx = u32::from(i);
        }
    }
    vcpu.set_cpuid2(&c)
        .map_err(VmmError::kvm("KVM_SET_CPUID2"))?;
    let sregs = vcpu.get_sregs().map_err(VmmError::kvm("KVM_GET_SREGS"))?;
    let mut sregs = long_mode_sregs(sregs);
    if vector.xsave {
        sregs.cr4 |= X86_CR4_OSXSAVE;
    }
    vcpu.set_sregs(&sregs)
        .map_err(VmmError::kvm("KVM_SET_SREGS"))?;
    if vector.xsave {
        let mut x = kvm_bindings::kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        x.xcrs[0].xcr = 0;
        x.xcrs[0].value = vector.xcr0;
        vcpu.set_xcrs(&x).map_err(VmmError::kvm("KVM_SET_XCRS"))?;
    }
    vcpu.set_fpu(&entry_fpu())
        .map_err(VmmError::kvm("KVM_SET_FPU"))?;
    vcpu.set_regs(&entry_regs(BAR0_DEFAULT, i, config.vcpus, config.mem_size))
        .map_err(VmmError::kvm("KVM_SET_REGS"))?;
    Ok(vcpu)
}

impl Vm {
    /// Create the VM: KVM, guest memory, system tables, payload, PCI, vCPUs.
    pub fn new(config: VmConfig, backend: Backend) -> Result<Vm, VmmError> {
        crate::ticks::calibrate();
        let start = Instant::now();
        check_config(&config)?;
        install_kick_handler()?;
        let kvm = Kvm::new().map_err(VmmError::kvm("opening /dev/kvm"))?;
        let vm = Arc::new(kvm.create_vm().map_err(VmmError::kvm("KVM_CREATE_VM"))?);
        vm.set_tss_address(TSS_ADDR)
            .map_err(VmmError::kvm("KVM_SET_TSS_ADDR"))?;
        // The in-kernel LAPIC/IOAPIC/PIC, before any vCPU (KVM requires it).
        use hilrig_vmm_api::Irqchip;
        let irqchip = match config.irqchip {
            Irqchip::Off => false,
            Irqchip::Auto => backend.intx.is_some(),
            Irqchip::On | Irqchip::Unwired => true,
        };
        if irqchip {
            vm.create_irq_chip()
                .map_err(VmmError::kvm("KVM_CREATE_IRQCHIP"))?;
        }
        let mem = guest_memory(&vm, &config)?;
        if let Some(dma) = &backend.dma {
            for region in mem.iter() {
                // SAFETY: guest RAM lives as long as the VM (`_mem`, `Shared::mem`);
                // the mapping is removed at teardown (`unmap_device`) or when the
                // backend's DMA handle is dropped with the VM.
                unsafe {
                    dma.map(
                        region.start_addr().0,
                        region.len() as usize,
                        region.as_ptr(),
                    )
                }?;
            }
        }
        let engine = policy_engine(&config)?;
        let mut trap = config.trap;
        if let Some(p) = &config.policy {
            for page in p.trapping_pages() {
                trap.insert(page);
            }
            if !p.enforce && !p.rule_pages().is_empty() {
                tracing::warn!(
                    profile = %p.name,
                    "MMIO restriction OFF: BAR0 pages {:?} have rules but are mapped straight through (no trap, no alarm)",
                    p.rule_pages()
                );
            }
        }
        let plan = PagePlan::decide(trap, &backend.windows);
        let mut bus = PciBus::new(backend.device.rom_size());
        if let Some((vendor, device, class_rev)) = backend.pci_identity {
            bus.set_identity(vendor, device, class_rev);
        }
        bus.assign(BAR0_DEFAULT, ROM_DEFAULT);
        // The device's INTx: pin A on the IOAPIC's input INTX_GSI (told to the guest
        // in config space), wired unless the negative control asks otherwise.
        let irq = match &backend.intx {
            Some(src) if irqchip => {
                bus.set_interrupt(1, INTX_GSI as u8);
                if config.irqchip == Irqchip::Unwired {
                    tracing::warn!(
                        "--irqchip unwired: {} is not connected; the guest's interrupt line never fires",
                        src.name()
                    );
                    None
                } else {
                    Some(IrqWiring::connect(&vm, src.clone(), INTX_GSI)?)
                }
            }
            _ => None,
        };
        let mut mapper = Mapper {
            vm: vm.clone(),
            slots: plan.slots(),
            active: Vec::new(),
            mem_size: config.mem_size,
        };
        mapper.apply(bus.decode().bar0)?;
        let (out, capture) = console_writer(&config.console, &config.console_owners)?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let vector = vector_features(
            cpuid
                .as_slice()
                .iter()
                .map(|e| (e.function, e.index, e.eax, e.ecx)),
        );
        // KVM can copy the registers into kvm_run at an exit (KVM_CAP_SYNC_REGS), so
        // an alarm's RIP costs no KVM_GET_REGS (on this host any vCPU ioctl costs
        // about as much as an exit). Paid on every exit it is asked for, so a vCPU
        // asks only for the KVM_RUN after an alarm-raising exit when the sink would
        // admit another alarm (`AlarmSink::token_due`): in a flood, about one run
        // in (exit rate / alarm rate). Other alarms read the registers with
        // KVM_GET_REGS (`policy::fault`).
        let sync_regs = config.policy.is_some() && kvm.check_extension(kvm_ioctls::Cap::SyncRegs);
        let vcpus = (0..config.vcpus)
            .map(|i| create_vcpu(&vm, i, &cpuid, vector, &config))
            .collect::<Result<Vec<_>, _>>()?;
        if irqchip {
            // With an in-kernel LAPIC the other vCPUs would wait for INIT/SIPI: the
            // entry ABI starts every vCPU at the payload.
            for v in vcpus.iter().skip(1) {
                v.set_mp_state(kvm_bindings::kvm_mp_state {
                    mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
                })
                .map_err(VmmError::kvm("KVM_SET_MP_STATE"))?;
            }
        }
        let Backend {
            device,
            keep,
            windows,
            dma,
            ..
        } = backend;
        // The policy engine decides through the module table's policy slot.
        let modules = crate::lifecycle::patch::ModuleTable::with_policy(
            engine.as_ref().map(|e| e.slot().clone()),
            crate::lifecycle::module_alarm,
        );
        let device: Box<dyn Device> = Box::new(crate::devices::handled::HandledDevice::new(
            device,
            modules.handler.clone(),
        ));
        let shared = Arc::new(Shared {
            rv: Arc::new(crate::lifecycle::quiesce::Rendezvous::new()),
            modules,
            life: crate::lifecycle::Life::new(config.lifecycle.clone()),
            mem: mem.clone(),
            device: Mutex::new(device),
            pci: Mutex::new(PciState {
                bus,
                mapper,
                base_trap: config.trap,
                windows,
                dma,
            }),
            serial: Mutex::new(vm_superio::Serial::new(NoTrigger, out)),
            stop: AtomicBool::new(false),
            verdict: Mutex::new(None),
            threads: Mutex::new(Vec::new()),
            start,
            kicks: std::sync::atomic::AtomicU64::new(0),
            policy: engine,
            results: Mutex::new(Vec::new()),
            sync_regs,
            on_unemulated: config.on_unemulated,
            unemulated: std::sync::atomic::AtomicU64::new(0),
            sample_round: std::sync::atomic::AtomicU64::new(0),
        });
        Ok(Vm {
            vector,
            config,
            vcpus,
            shared,
            capture,
            plan,
            sandbox: crate::seccomp::Sandbox::default(),
            _irq: irq,
            irqchip,
            _vm: vm,
            _mem: mem,
            _backend_keep: keep,
        })
    }

    /// A handle that stops the VM from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(Arc::downgrade(&self.shared))
    }

    /// The page plan BAR0 runs with.
    pub fn plan(&self) -> &PagePlan {
        &self.plan
    }

    /// The module table's device-handler slot (live patches swap the handler in it).
    pub fn handler_slot(
        &self,
    ) -> Arc<crate::modtable::modules::Slot<Option<crate::modtable::modules::NativeHandler>>> {
        self.shared.modules.handler.clone()
    }

    /// A handle on the policy (None without a policy): read or replace the active
    /// profile while the VM runs.
    pub fn policy_handle(&self) -> Option<PolicyHandle> {
        self.shared
            .policy
            .as_ref()
            .map(|_| PolicyHandle(Arc::downgrade(&self.shared)))
    }

    /// Confine the run ([`crate::seccomp`]): each thread's seccomp filter once it is set up (the main thread's after the
    /// vCPU and control threads are started, so `run` must be the last set-up step
    /// of the calling thread: its filter stays). Off by default (library users and
    /// in-process tests); the CLI turns it on.
    pub fn sandbox(&mut self, sandbox: crate::seccomp::Sandbox) {
        self.sandbox = sandbox;
    }

    /// Whether the VM has the in-kernel interrupt controller (`--irqchip`).
    pub fn irqchip(&self) -> bool {
        self.irqchip
    }

    /// Whether a device interrupt line is wired to the guest's IOAPIC.
    pub fn interrupt_wired(&self) -> bool {
        self._irq.is_some()
    }

    /// The vector features the guest gets.
    pub fn vector_features(&self) -> VectorFeatures {
        self.vector
    }

    /// Run every vCPU on its own thread until a verdict, all halt, or the watchdog.
    pub fn run(mut self) -> Result<RunReport, VmmError> {
        self.shared.record_baseline();
        let control_stop = Arc::new(AtomicBool::new(false));
        let control = self.start_control(&control_stop)?;
        // The watcher threads start before the main thread's filter (they would
        // inherit none): each installs the control thread's filter (patches,
        // teardown, the counters service) first, and a failure ends the VM.
        let confine = |what: &'static str| {
            let (seccomp, network) = (self.sandbox.seccomp, self.sandbox.network);
            let shared = self.shared.clone();
            move || {
                if !seccomp {
                    return true;
                }
                match crate::seccomp::install(crate::seccomp::ThreadKind::Control, network) {
                    Ok(()) => true,
                    Err(e) => {
                        shared.finish(Verdict::Internal(format!("{what} thread: {e}")));
                        false
                    }
                }
            }
        };
        let poller = match &self.config.lifecycle.patch_source {
            Some(dir) => {
                let host: Arc<dyn crate::lifecycle::VmHost> = self.shared.clone();
                Some(
                    crate::lifecycle::spawn_patch_source(
                        Arc::downgrade(&host),
                        dir.clone(),
                        self.config.lifecycle.patch_poll,
                        control_stop.clone(),
                        confine("patch source"),
                    )
                    .map_err(|e| VmmError::Config(format!("patch source thread: {e}")))?,
                )
            }
            None => None,
        };
        // Breach triggers of the policy's `[breach]` table (issue 21.5).
        let breach = match self.shared.life.breach_monitor() {
            Some(m) => {
                let host: Arc<dyn crate::lifecycle::VmHost> = self.shared.clone();
                Some(
                    crate::lifecycle::breach::spawn_watch(
                        Arc::downgrade(&host),
                        m,
                        control_stop.clone(),
                        confine("breach watch"),
                    )
                    .map_err(|e| VmmError::Config(format!("breach watch thread: {e}")))?,
                )
            }
            None => None,
        };
        let (handles, rx) = self.spawn_vcpus();
        if self.sandbox.seccomp {
            if let Err(e) =
                crate::seccomp::install(crate::seccomp::ThreadKind::Main, self.sandbox.network)
            {
                self.shared.finish(Verdict::Internal(e.to_string()));
            }
        }
        let results = self.watch(handles.len(), &rx);
        lock(&self.shared.threads).clear();
        for h in handles {
            if h.join().is_err() {
                self.shared
                    .finish(Verdict::Internal("a vCPU thread panicked".into()));
            }
        }
        if self.config.lifecycle.teardown_on_exit {
            self.shared.teardown();
        }
        control_stop.store(true, Ordering::Release);
        if let Some(p) = poller {
            let _ = p.join();
        }
        if let Some(b) = breach {
            let _ = b.join();
        }
        if let Some((path, (t, in_flight))) = control {
            let _ = t.join();
            // A request that ended the VM (teardown) is still being answered.
            crate::lifecycle::control::drain(&in_flight, Duration::from_secs(5));
            let _ = std::fs::remove_file(&path);
        }
        Ok(self.report(&results))
    }

    /// Serve the control socket, if one is configured.
    fn start_control(&self, stop: &Arc<AtomicBool>) -> Result<Option<Control>, VmmError> {
        let Some(path) = &self.config.control else {
            return Ok(None);
        };
        // The error names the socket (once).
        let l =
            crate::lifecycle::control::bind(path).map_err(|e| VmmError::Config(e.to_string()))?;
        let host: Arc<dyn crate::lifecycle::VmHost> = self.shared.clone();
        let ctl = Arc::new(crate::lifecycle::VmControl(Arc::downgrade(&host)));
        let (seccomp, network) = (self.sandbox.seccomp, self.sandbox.network);
        let served = crate::lifecycle::control::serve_with(l, ctl, stop.clone(), move || {
            if seccomp {
                crate::seccomp::install(crate::seccomp::ThreadKind::Control, network)
            } else {
                Ok(())
            }
        });
        Ok(Some((path.clone(), served)))
    }

    /// Start one thread per vCPU ([`vcpu_loop`]); each sends its result when it ends.
    /// A thread that cannot be started ends the VM.
    fn spawn_vcpus(&mut self) -> (Vec<JoinHandle<()>>, mpsc::Receiver<VcpuResult>) {
        let (tx, rx) = mpsc::channel::<VcpuResult>();
        let mut handles = Vec::new();
        for (i, vcpu) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let shared = self.shared.clone();
            let tx = tx.clone();
            let seccomp = self.sandbox.seccomp;
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    if seccomp {
                        if let Err(e) =
                            crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu, false)
                        {
                            // Ends the VM: the loop sees the stop at once.
                            shared.finish(Verdict::Internal(e.to_string()));
                        }
                    }
                    let r = vcpu_loop(i as u8, vcpu, &*shared);
                    let _ = tx.send(r);
                });
            match h {
                Ok(h) => {
                    use std::os::unix::thread::JoinHandleExt;
                    lock(&self.shared.threads).push(h.as_pthread_t());
                    handles.push(h);
                }
                Err(e) => {
                    let e = VmmError::Thread(e.to_string());
                    self.shared.finish(Verdict::Internal(e.to_string()));
                    break;
                }
            }
        }
        (handles, rx)
    }

    /// Collect the results of `n` vCPU threads. Waits in slices: on each slice, if
    /// the VM is stopping, kick again (a kick can race a thread's registration or its
    /// entry into KVM_RUN); past the deadline, the watchdog stops the guest. A
    /// timeout too large to represent never fires.
    fn watch(&self, n: usize, rx: &mpsc::Receiver<VcpuResult>) -> Vec<VcpuResult> {
        let deadline = self.shared.start.checked_add(self.config.timeout);
        let slice = crate::vstate::stuck::SAMPLE_EVERY;
        let mut results = Vec::new();
        let mut timed_out = false;
        // Once stopping, kick at a bounded, escalating interval (1 ms doubling to
        // 20 ms): a vCPU that missed a kick is caught soon, and a guest that will not
        // leave never floods the host with signals (a wait of 0 past the deadline
        // used to re-kick without pause).
        let mut kick_every = Duration::from_millis(1);
        let mut last_sample = Instant::now();
        while results.len() < n {
            let stopping = self.shared.stop.load(Ordering::SeqCst);
            let wait = if stopping {
                kick_every
            } else {
                deadline.map_or(slice, |d| {
                    d.saturating_duration_since(Instant::now()).min(slice)
                })
            };
            match rx.recv_timeout(wait) {
                Ok(r) => results.push(r),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if stopping {
                        self.shared.kick_all();
                        kick_every = (kick_every * 2).min(Duration::from_millis(20));
                    } else if last_sample.elapsed() >= crate::vstate::stuck::SAMPLE_EVERY
                        && deadline.is_none_or(|d| Instant::now() < d)
                    {
                        // The stuck-RIP detector's sample: one kick per vCPU per
                        // period (crate::vstate::stuck).
                        last_sample = Instant::now();
                        self.shared.sample_round.fetch_add(1, Ordering::Release);
                        self.shared.kick_all();
                    } else if !timed_out && deadline.is_some_and(|d| Instant::now() >= d) {
                        timed_out = true;
                        tracing::warn!(
                            "watchdog: stopping the guest after {:?}",
                            self.config.timeout
                        );
                        self.shared.finish(Verdict::Timeout {
                            after: self.config.timeout,
                        });
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        results
    }

    /// The report of a finished run (takes the device back when no handle is left).
    fn report(self, results: &[VcpuResult]) -> RunReport {
        let teardown = self.shared.life.teardown_record();
        let blackouts = self.shared.life.blackouts();
        let patches = self.shared.life.patches();
        let end = Instant::now();
        let mut exits = ExitCounts::default();
        let mut first_exit: Option<Instant> = None;
        let mut first_mmio: Option<Instant> = None;
        let mut last_end: Option<Instant> = None;
        for r in results {
            last_end = Some(last_end.map_or(r.end, |e: Instant| e.max(r.end)));
            exits.add(&r.counts);
            first_exit = min_opt(first_exit, r.first_exit);
            first_mmio = min_opt(first_mmio, r.first_mmio);
        }
        let verdict = lock(&self.shared.verdict).take();
        let verdict = verdict.unwrap_or(Verdict::NoVerdict);
        let _ = lock(&self.shared.serial).writer_mut().flush();
        let console = self
            .capture
            .as_ref()
            .map(|c| lock(&c.0).clone())
            .unwrap_or_default();
        let start = self.shared.start;
        let policy = self.shared.policy.as_ref().map(|e| e.report());
        let results = std::mem::take(&mut *lock(&self.shared.results));
        let kicks = self.shared.kicks.load(Ordering::Relaxed);
        let device = Arc::try_unwrap(self.shared)
            .ok()
            .map(|s| s.device.into_inner().unwrap_or_else(|p| p.into_inner()));
        RunReport {
            verdict,
            exits,
            wall: end - start,
            first_exit: first_exit.map(|t| t - start),
            mmio_span: first_mmio.map(|t| last_end.unwrap_or(end).saturating_duration_since(t)),
            console,
            plan: self.plan,
            device,
            policy,
            results,
            vector: self.vector,
            teardown,
            blackouts,
            patches,
            kicks,
        }
    }
}

/// The served control socket: its path, the server thread and its in-flight count.
type Control = (
    PathBuf,
    (JoinHandle<()>, crate::lifecycle::control::InFlight),
);

fn min_opt(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}
