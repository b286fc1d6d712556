//! A running VM's lifecycle operations: pause/resume (quiesce), live patching through
//! the module table, secure teardown, status and metrics — what the control socket
//! exposes, and what the VMM does itself when a VM exits (teardown on exit).

use crate::lifecycle::control::Control;
use crate::lifecycle::modules::CallError;
use crate::lifecycle::patch::{ModuleTable, PatchAuthority, Prepared};
use crate::lifecycle::quiesce::{Blackout, Paused, Rendezvous};
use crate::lifecycle::teardown::{self, StepError, TeardownOps, TeardownRecord, VerdictSummary};
use crate::policy::engine::{PolicyEngine, PolicyModule};
use crate::policy::Profile;
use crate::verdict::Verdict;
use ed25519_dalek::SigningKey;
use hilrig_device::attest::Verdict as CountersVerdict;
use hilrig_device::oob::{self, CounterReport};
use hilrig_device::regmap::{Reg, DEVICE_ID_VALUE};
use hilrig_device::ResetKind;
use hilrig_vmm_api::control::{
    BlackoutStats, Metrics, ModuleVersions, PauseReply, Reply, Request, Response, VmState, VmStatus,
};
use hilrig_vmm_api::teardown::BreachTrigger;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// Largest bundle file a patch request may name.
pub const MAX_BUNDLE: u64 = 64 << 20;

pub use crate::modtable::MODULE_ALARMS;

/// The module table's alarm: a stale handle was called.
pub fn module_alarm(e: &CallError) {
    MODULE_ALARMS.fetch_add(1, Ordering::Relaxed);
    tracing::error!("module alarm: {e}");
}

/// Live patching and teardown settings of a VM.
#[derive(Debug, Clone)]
pub struct LifecycleConfig {
    /// Who may patch this VMM (None: patches are refused).
    pub patch: Option<Arc<PatchAuthority>>,
    /// The VMM's key for signing teardown records (None: an ephemeral key, whose public
    /// half is in the record).
    pub vmm_key: Option<SigningKey>,
    /// Write the teardown record here.
    pub teardown_record: Option<PathBuf>,
    /// Tear the tenant down when the VM exits.
    pub teardown_on_exit: bool,
    /// How long vCPUs get to park before a pause is aborted.
    pub pause_bound: Duration,
    /// The policy profile name patches compile for.
    pub profile_name: String,
    /// The counters service (database, MAC key file) that gives teardown verdicts;
    /// without it the verdict compares with the counters read at VM start.
    pub counters: Option<(String, PathBuf)>,
    /// The passed-through device's description when it is not the reference device:
    /// teardown scrubs, resets and checks it by the description, and reads no
    /// counters (it has none).
    pub device_desc: Option<Arc<crate::policy::desc::DeviceDesc>>,
    /// Pull mode: a directory polled for `*.bundle` files, each applied once as if a
    /// `patch` request had named it (for hosts the control plane cannot reach).
    pub patch_source: Option<PathBuf>,
    /// How often the patch source is polled.
    pub patch_poll: Duration,
    /// The nonce the teardown record carries (`--teardown-nonce`; None: a fresh one).
    pub teardown_nonce: Option<hilrig_vmm_api::Nonce>,
    /// The VM id the teardown record names (`--vm-id`; None: `hilrig-vmm pid N`).
    pub vm_id: Option<String>,
    /// Apply patches quiesced (every vCPU parked for the swap) instead of swapping
    /// the module under load. A patch that changes only userspace code and data
    /// (a handler module, a policy with the same trapping pages) claims the vCPUs
    /// without kicking them ([`Rendezvous::gate`]); one that changes the BAR0
    /// memory slots stops the guest ([`Rendezvous::pause`]).
    pub quiesce_patches: bool,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            patch: None,
            vmm_key: None,
            teardown_record: None,
            teardown_on_exit: false,
            pause_bound: Duration::from_millis(250),
            profile_name: "tenant".into(),
            counters: None,
            device_desc: None,
            patch_source: None,
            patch_poll: Duration::from_secs(1),
            teardown_nonce: None,
            vm_id: None,
            quiesce_patches: false,
        }
    }
}

pub use hilrig_vmm_api::PatchEvent;

/// Why a lifecycle request was refused (the control socket answers with its words).
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The VM has ended.
    #[error("the VM has finished")]
    Finished,
    /// The tenant was torn down: nothing more may be done to it.
    #[error("the tenant was torn down; the VM takes no more requests")]
    TornDown,
    /// `pause` while paused.
    #[error("already paused")]
    AlreadyPaused,
    /// `resume` while not paused.
    #[error("not paused")]
    NotPaused,
    /// `quiesce` while an operator holds the VM paused.
    #[error("paused by an operator; resume first")]
    HeldPaused,
    /// The vCPUs did not park.
    #[error(transparent)]
    Quiesce(#[from] crate::lifecycle::quiesce::QuiesceError),
    /// The VMM was started without a patch key.
    #[error("this VMM accepts no patches (started without a patch key)")]
    NotPatchable,
    /// The patch was refused before anything was touched.
    #[error(transparent)]
    Patch(#[from] crate::lifecycle::patch::PatchError),
    /// A policy patch for a VM without a policy engine.
    #[error("this VM runs without a policy engine; a policy patch has nothing to replace")]
    NoPolicyEngine,
    /// The new policy could not be installed.
    #[error("replacing the policy: {0}")]
    ReplacePolicy(crate::VmmError),
    /// The applied-versions record could not be written (nothing applied).
    #[error(transparent)]
    Record(#[from] crate::lifecycle::applied::AppliedError),
    /// The bundle file could not be read.
    #[error("bundle {path}: {source}")]
    Bundle {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The bundle is not a regular file (a FIFO, a device, a directory).
    #[error("bundle {path} is not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The device was detached: there is nothing of the tenant's left on it to tear
    /// down, and no device to patch.
    #[error("the device was already detached (the guest runs on without it); {op} refused")]
    Detached {
        /// The refused request.
        op: &'static str,
    },
    /// The bundle file is too large.
    #[error("bundle {path} is {len} bytes; at most {MAX_BUNDLE}")]
    BundleTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
}

/// Lifecycle state of a VM.
pub struct Life {
    /// Settings.
    pub cfg: LifecycleConfig,
    key: SigningKey,
    paused: Mutex<Option<Paused>>,
    blackouts: Mutex<Vec<Blackout>>,
    patches: Mutex<Vec<PatchEvent>>,
    teardown: Mutex<Option<TeardownRecord>>,
    baseline: Mutex<Option<CounterReport>>,
    /// The in-run counters check's device serial (read once out of band) and its
    /// open counters service (opened once, reopened after a failure).
    enrolled: Mutex<Option<(u64, hilrig_counters::Service)>>,
    /// The breach monitor, when the policy arms any trigger.
    breach: Mutex<Option<Arc<crate::lifecycle::breach::Monitor>>>,
    /// Serialises pause/patch/teardown.
    op: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn us(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

impl Life {
    /// Lifecycle state from settings.
    pub fn new(cfg: LifecycleConfig) -> Life {
        let key = cfg.vmm_key.clone().unwrap_or_else(|| {
            let seed = hilrig_fw::keys::random32().unwrap_or_else(|_| {
                // No OS randomness: a per-process key still signs; it is only ever
                // trusted through the public key in the record.
                let t = Instant::now().elapsed().as_nanos() as u8 ^ std::process::id() as u8;
                [t; 32]
            });
            SigningKey::from_bytes(&seed)
        });
        Life {
            cfg,
            key,
            paused: Mutex::new(None),
            blackouts: Mutex::new(Vec::new()),
            patches: Mutex::new(Vec::new()),
            teardown: Mutex::new(None),
            baseline: Mutex::new(None),
            enrolled: Mutex::new(None),
            breach: Mutex::new(None),
            op: Mutex::new(()),
        }
    }

    /// Blackouts measured so far (pauses and patches).
    pub fn blackouts(&self) -> Vec<Blackout> {
        lock(&self.blackouts).clone()
    }

    /// The teardown record, once torn down.
    pub fn teardown_record(&self) -> Option<TeardownRecord> {
        lock(&self.teardown).clone()
    }

    /// Patches applied.
    pub fn patches(&self) -> Vec<PatchEvent> {
        lock(&self.patches).clone()
    }

    /// Whether the tenant was torn down or its device detached.
    pub fn torn_down(&self) -> bool {
        lock(&self.teardown).is_some()
    }

    /// The breach monitor, if the policy arms any trigger.
    pub fn breach_monitor(&self) -> Option<Arc<crate::lifecycle::breach::Monitor>> {
        lock(&self.breach).clone()
    }
}

/// SHA-256 of the running executable, hashed once ([0; 32] when it cannot be read).
fn running_build() -> [u8; 32] {
    static BUILD: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    *BUILD.get_or_init(|| {
        crate::lifecycle::patch::running_build_sha256().unwrap_or_else(|e| {
            tracing::warn!("hashing the running VMM executable: {e}");
            [0; 32]
        })
    })
}

/// Median and p99 of blackouts in microseconds.
pub fn percentiles(v: &[Blackout]) -> (u64, u64, u64) {
    if v.is_empty() {
        return (0, 0, 0);
    }
    let mut t: Vec<u64> = v.iter().map(|b| us(b.total)).collect();
    t.sort_unstable();
    let at = |q: f64| t[((t.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), t[t.len() - 1])
}

/// What the lifecycle operations need of a running VM: the narrow interface the VM
/// (`vstate::vm`) implements, so this module never names the VM's internals.
pub trait VmHost: Send + Sync {
    /// The VM's lifecycle state.
    fn life(&self) -> &Life;
    /// Where its vCPUs park.
    fn rendezvous(&self) -> &Arc<Rendezvous>;
    /// Kick every vCPU out of KVM_RUN.
    fn kick_all(&self);
    /// The patchable modules.
    fn modules(&self) -> &ModuleTable;
    /// The device, locked.
    fn device(&self) -> MutexGuard<'_, Box<dyn hilrig_device::Device>>;
    /// The policy engine, if the VM has one.
    fn policy_engine(&self) -> Option<&PolicyEngine>;
    /// Install a new policy profile as policy `version` through the module table's
    /// policy slot, without a quiesce (re-planning the BAR0 mappings).
    fn replace_policy(
        &self,
        profile: Arc<Profile>,
        version: u64,
    ) -> Result<Arc<Profile>, crate::VmmError>;
    /// Guest RAM regions (host address, length).
    fn guest_ram(&self) -> Vec<(*mut u8, usize)>;
    /// Remove every guest mapping of the device; returns the slots removed.
    fn unmap_device(&self) -> Result<usize, crate::VmmError>;
    /// Take the device away from a guest that runs on: every mapping removed as by
    /// [`VmHost::unmap_device`] (memory slots, traps, DMA), and the function removed
    /// from the guest's PCI bus (its config space reads all ones, its BARs decode
    /// nothing). Returns the slots removed.
    fn detach_device(&self) -> Result<usize, crate::VmmError>;
    /// The run's verdict slot, locked.
    fn verdict(&self) -> MutexGuard<'_, Option<Verdict>>;
    /// The flag every vCPU loop checks to end.
    fn stop_flag(&self) -> &AtomicBool;
    /// Record a verdict (the first wins) and stop every vCPU.
    fn finish(&self, v: Verdict);
    /// When the VM started.
    fn started(&self) -> Instant;
    /// Itself, as the interface.
    fn as_host(&self) -> &dyn VmHost;
}

/// The lifecycle operations, on any [`VmHost`].
pub trait Lifecycle: VmHost {
    /// Read the device's counters at VM start (the teardown verdict's baseline) and
    /// arm the policy's breach triggers (`[breach]`).
    fn record_baseline(&self) {
        if let Some(engine) = self.policy_engine() {
            let cfg = engine.profile().breach.clone();
            if cfg.armed() && lock(&self.life().breach).is_none() {
                let m = Arc::new(crate::lifecycle::breach::Monitor::new(cfg));
                engine.observe_alarms(m.clone());
                *lock(&self.life().breach) = Some(m);
            }
        }
        if self.life().cfg.device_desc.is_some() {
            return; // a described device has no out-of-band counters
        }
        let mut dev = self.device();
        let c = oob::read_counters(&mut **dev).ok();
        *lock(&self.life().baseline) = c;
    }

    /// The counters verdict of the running tenancy: counters read out of band now
    /// against the expected values — with a counters service (`--counters-db`) the
    /// values it has ENROLLED for the device (asked on every poll, so a device rolled
    /// back before the run started is caught too), without one those read at VM
    /// start — cross-checked with the program/erase attempts the policy engine passed
    /// ([`crate::lifecycle::breach::counters_verdict`]). A service that cannot answer
    /// gives `unverifiable` (logged). None when there is no baseline, the device has
    /// no OOB counters, or the read failed (logged).
    fn running_counters_verdict(&self) -> Option<(CountersVerdict, Vec<String>)> {
        if self.life().cfg.device_desc.is_some() {
            return None;
        }
        // The device is locked only for the out-of-band reads, not while the
        // service is asked. The serial is read and the service opened once per
        // run (again only after a failure); the enrolled values are asked every poll.
        let counters = self.life().cfg.counters.clone();
        let open = lock(&self.life().enrolled).is_some();
        let (now, serial) = {
            let mut dev = self.device();
            let now = match oob::read_counters(&mut **dev) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("breach: reading counters out of band: {e}");
                    return None;
                }
            };
            let serial = (counters.is_some() && !open).then(|| oob_serial(&mut **dev));
            (now, serial)
        };
        let base = match counters {
            Some((db, key)) => {
                let mut cache = lock(&self.life().enrolled);
                let asked = (|| {
                    if cache.is_none() {
                        let serial = serial.unwrap_or_else(|| {
                            Err(ServiceError::Unexpected {
                                request: "IDENTIFY".into(),
                                answer: "not read (the service was reset meanwhile)".into(),
                            })
                        })?;
                        let key = hilrig_counters::mac::Key::load(&key)?;
                        *cache = Some((serial, hilrig_counters::Service::open(&db, key)?));
                    }
                    match cache.as_mut() {
                        Some((serial, svc)) => enrolled_counters(svc, *serial, &now),
                        None => Err(ServiceError::Unexpected {
                            request: "the counters service".into(),
                            answer: "not open".into(),
                        }),
                    }
                })();
                match asked {
                    Ok(b) => b,
                    Err(e) => {
                        *cache = None;
                        tracing::warn!("breach: the counters service gave no expected values: {e}");
                        return Some((
                            CountersVerdict::Unverifiable,
                            vec![format!("counters service: {e}")],
                        ));
                    }
                }
            }
            None => (*lock(&self.life().baseline))?,
        };
        let attempts = self.policy_engine().map(|e| e.flash_attempts());
        Some(crate::lifecycle::breach::counters_verdict(
            &base, &now, attempts,
        ))
    }

    /// Park every vCPU now (bounded by the configured pause bound).
    fn pause_now(&self) -> Result<Paused, LifecycleError> {
        Ok(self
            .rendezvous()
            .pause(&|| self.kick_all(), self.life().cfg.pause_bound)?)
    }

    /// Park every vCPU until [`Shared::resume`] (control `pause`).
    fn pause(&self) -> Result<PauseReply, LifecycleError> {
        let _op = lock(&self.life().op);
        if lock(&self.life().paused).is_some() {
            return Err(LifecycleError::AlreadyPaused);
        }
        let p = self.pause_now()?;
        let v = PauseReply {
            vcpus: p.vcpus(),
            blackout_us: None,
            park_us: None,
        };
        *lock(&self.life().paused) = Some(p);
        Ok(v)
    }

    /// Resume after [`Shared::pause`]; returns the blackout.
    fn resume(&self) -> Result<PauseReply, LifecycleError> {
        let _op = lock(&self.life().op);
        let p = lock(&self.life().paused)
            .take()
            .ok_or(LifecycleError::NotPaused)?;
        let b = p.resume();
        lock(&self.life().blackouts).push(b);
        Ok(PauseReply {
            vcpus: b.vcpus,
            blackout_us: Some(us(b.total)),
            park_us: None,
        })
    }

    /// Pause and resume at once (the bare blackout, for measurements).
    fn quiesce(&self) -> Result<PauseReply, LifecycleError> {
        let _op = lock(&self.life().op);
        if lock(&self.life().paused).is_some() {
            return Err(LifecycleError::HeldPaused);
        }
        let b = self.pause_now()?.resume();
        lock(&self.life().blackouts).push(b);
        Ok(PauseReply {
            vcpus: b.vcpus,
            blackout_us: Some(us(b.total)),
            park_us: Some(us(b.park)),
        })
    }

    /// Apply a signed patch bundle: verify and prepare everything first (a refused
    /// patch leaves the VM running and unchanged), then quiesce, swap, resume.
    fn patch(&self, bytes: &[u8]) -> Result<PatchEvent, LifecycleError> {
        let _op = lock(&self.life().op);
        let auth = self
            .life()
            .cfg
            .patch
            .as_ref()
            .ok_or(LifecycleError::NotPatchable)?;
        let prepared = auth.prepare(bytes, self.modules(), &self.life().cfg.profile_name)?;
        if matches!(prepared, Prepared::Policy { .. }) && self.policy_engine().is_none() {
            return Err(LifecycleError::NoPolicyEngine);
        }
        // Recorded before it is applied, so a crash can only make the floor higher.
        if let Some(a) = &auth.applied {
            a.record(prepared.component(), prepared.version())?;
        }
        let held = lock(&self.life().paused).take();
        let was_held = held.is_some();
        let swap = !was_held && !self.life().cfg.quiesce_patches;
        // A device handler is swapped under load, without parking the vCPUs: calls in
        // flight in the old module are cancelled and retried in the new one, the old
        // code is retired once drained (see `modules`).
        let prepared = match prepared {
            Prepared::Handler { version, handler } if swap => {
                let sw = self.modules().handler.swap(
                    Some(handler),
                    version,
                    self.life().cfg.pause_bound,
                );
                let ev = match sw {
                    Ok(sw) => PatchEvent {
                        component: crate::lifecycle::patch::DEVICE_HANDLER.to_string(),
                        from: sw.from,
                        to: version,
                        blackout_us: Some(us(sw.publish)),
                        quiesced: false,
                        swap_us: Some(us(sw.total)),
                        inflight: sw.inflight_at_publish,
                    },
                    Err(e) => {
                        // The new module is installed; the old one could not be
                        // retired (alarmed). The patch itself took effect.
                        MODULE_ALARMS.fetch_add(1, Ordering::Relaxed);
                        tracing::error!("module alarm: {e}");
                        PatchEvent {
                            component: crate::lifecycle::patch::DEVICE_HANDLER.to_string(),
                            from: match e {
                                crate::lifecycle::modules::SwapError::Drain { version, .. }
                                | crate::lifecycle::modules::SwapError::Retire {
                                    version, ..
                                } => version,
                            },
                            to: version,
                            blackout_us: None,
                            quiesced: false,
                            swap_us: None,
                            inflight: 0,
                        }
                    }
                };
                lock(&self.life().patches).push(ev.clone());
                tracing::info!(component = %ev.component, from = ev.from, to = ev.to, swap_us = ?ev.swap_us, "patch applied without quiesce");
                return Ok(ev);
            }
            // The policy module too is swapped under load, through its slot: every
            // access is decided by the old or the new version, exactly once.
            Prepared::Policy { version, profile } if swap => {
                let Some(engine) = self.policy_engine() else {
                    return Err(LifecycleError::NoPolicyEngine);
                };
                let profile = Arc::new(profile);
                let from = self.modules().policy.version();
                let t0 = Instant::now();
                self.replace_policy(profile.clone(), version)
                    .map_err(LifecycleError::ReplacePolicy)?;
                let total = t0.elapsed();
                if let Some(m) = self.life().breach_monitor() {
                    m.configure(profile.breach.clone());
                }
                let sw = engine.last_swap();
                let ev = PatchEvent {
                    component: crate::lifecycle::patch::POLICY.to_string(),
                    from,
                    to: version,
                    blackout_us: Some(us(sw.as_ref().map_or(total, |s| s.publish))),
                    quiesced: false,
                    swap_us: Some(us(total)),
                    inflight: sw.map_or(0, |s| s.inflight_at_publish),
                };
                lock(&self.life().patches).push(ev.clone());
                tracing::info!(component = %ev.component, from, to = version, swap_us = ?ev.swap_us, "policy patch applied without quiesce");
                return Ok(ev);
            }
            p => p,
        };
        // Quiesced. Not held by an operator: a patch of userspace code and data only
        // closes the device and policy code (vCPUs inside KVM_RUN run only guest
        // code: claimed by state, not kicked; see `quiesce::Rendezvous::gate`); a
        // policy that traps other pages re-plans the BAR0 memory slots: the guest
        // stops for that.
        let gated = held.is_none() && !self.changes_memslots(&prepared);
        // Built before the vCPUs are held (only the pointer exchange happens under
        // the gate).
        let module = match &prepared {
            Prepared::Policy { profile, .. } if gated => {
                Some(Arc::new(PolicyModule::new(Arc::new(profile.clone()))))
            }
            _ => None,
        };
        let paused = match held {
            Some(p) => p,
            None if !gated => self.pause_now()?,
            None => self
                .rendezvous()
                .gate(self.life().cfg.pause_bound)
                .map_err(LifecycleError::from)?,
        };
        crate::lifecycle::quiesce::probe_no_handler_running();
        // No vCPU is committing an access and none can until the release: swap.
        let (component, from, to) = match prepared {
            Prepared::Policy { version, profile } => {
                let from = self.modules().policy.version();
                let profile = match &module {
                    Some(m) => m.profile.clone(),
                    None => Arc::new(profile),
                };
                match (self.policy_engine(), module) {
                    // The same trapping pages: nothing to re-map (no PCI lock, which
                    // a claimed vCPU routing its access may hold), nothing to drain
                    // (a claimed vCPU may be inside a decision: it is made again).
                    (Some(engine), Some(module)) => {
                        engine.replace_quiesced(module, version);
                    }
                    _ => {
                        if let Err(e) = self.replace_policy(profile.clone(), version) {
                            drop(paused);
                            return Err(LifecycleError::ReplacePolicy(e));
                        }
                    }
                }
                if let Some(m) = self.life().breach_monitor() {
                    m.configure(profile.breach.clone());
                }
                (crate::lifecycle::patch::POLICY, from, version)
            }
            Prepared::Handler { version, handler } => {
                let from = self.modules().handler.replace(Some(handler), version);
                (crate::lifecycle::patch::DEVICE_HANDLER, from, version)
            }
        };
        crate::lifecycle::quiesce::probe_no_handler_running();
        let blackout_us = if was_held {
            *lock(&self.life().paused) = Some(paused);
            None
        } else {
            let b = paused.resume();
            lock(&self.life().blackouts).push(b);
            Some(us(b.total))
        };
        let ev = PatchEvent {
            component: component.to_string(),
            from,
            to,
            blackout_us,
            quiesced: true,
            ..PatchEvent::default()
        };
        lock(&self.life().patches).push(ev.clone());
        tracing::info!(component, from, to, ?blackout_us, "patch applied");
        Ok(ev)
    }

    /// Whether applying `p` changes the guest's memory slots (a policy whose
    /// trapping pages differ from the running one's re-plans BAR0's mappings).
    fn changes_memslots(&self, p: &Prepared) -> bool {
        let Prepared::Policy { profile, .. } = p else {
            return false;
        };
        let running = self
            .modules()
            .policy
            .call(|m| m.as_ref().map(|m| m.profile.trapping_pages()))
            .ok()
            .flatten();
        running.is_none_or(|pages| pages != profile.trapping_pages())
    }

    /// Secure teardown at the end of the run (see [`Lifecycle::teardown_for`]).
    fn teardown(&self) -> TeardownRecord {
        self.teardown_for(BreachTrigger::Exit {})
    }

    /// Take the device away from the guest and let the guest run on (control
    /// `detach`, or `[breach] action = "detach"`): pause → detach the device
    /// (unmapped, traps dropped, off the guest's PCI bus) → scrub its tenant state →
    /// reset → counters → verdict → signed record (`detached: true`, the trigger
    /// named) → resume. Guest memory stays (the guest still uses it). Idempotent: a
    /// second detach returns the first record; after a teardown it is refused.
    fn detach_for(&self, trigger: BreachTrigger) -> Result<TeardownRecord, LifecycleError> {
        let _op = lock(&self.life().op);
        if let Some(r) = lock(&self.life().teardown).clone() {
            return if r.detached {
                Ok(r)
            } else {
                Err(LifecycleError::TornDown)
            };
        }
        let held = lock(&self.life().paused).take();
        let was_held = held.is_some();
        let mut ops = VmTeardown {
            shared: self.as_host(),
            paused: held,
            detach: true,
        };
        let (name, nonce) = record_identity(&self.life().cfg);
        let record = teardown::run_with(
            &mut ops,
            &name,
            nonce,
            &self.life().key,
            true,
            Some(trigger.clone()),
        );
        match ops.paused.take() {
            Some(p) if was_held => *lock(&self.life().paused) = Some(p),
            Some(p) => {
                let b = p.resume();
                lock(&self.life().blackouts).push(b);
            }
            // The vCPUs would not park and were stopped: the guest cannot run on.
            None if self.stop_flag().load(Ordering::SeqCst) => self.finish(Verdict::Stopped(
                "detach: the vCPUs had to be stopped".into(),
            )),
            None => {}
        }
        self.save_record(&record);
        tracing::warn!(
            trigger = %trigger.describe(),
            complete = record.complete,
            "device detached; the guest runs on without it"
        );
        Ok(record)
    }

    /// Write the record where configured and keep it.
    fn save_record(&self, record: &TeardownRecord) {
        if let Some(p) = &self.life().cfg.teardown_record {
            match serde_json::to_vec_pretty(record) {
                Ok(bytes) => {
                    if let Err(e) = hilrig_device::state::write_atomic(p, &bytes) {
                        tracing::error!("writing the teardown record {}: {e}", p.display());
                    }
                }
                Err(e) => tracing::error!("teardown record: {e}"),
            }
        }
        *lock(&self.life().teardown) = Some(record.clone());
    }

    /// Secure teardown (see `teardown`) for `trigger` (named in the record); ends the
    /// VM. Idempotent: a second call returns the first record (also after a detach).
    fn teardown_for(&self, trigger: BreachTrigger) -> TeardownRecord {
        let _op = lock(&self.life().op);
        if let Some(r) = lock(&self.life().teardown).clone() {
            return r;
        }
        // The run ends as "torn down" (unless it already had a verdict). Recorded before
        // any vCPU can leave its loop, so the run never ends without a verdict.
        {
            let mut v = self.verdict();
            if v.is_none() {
                *v = Some(Verdict::Stopped("torn down".into()));
            }
        }
        let held = lock(&self.life().paused).take();
        let mut ops = VmTeardown {
            shared: self.as_host(),
            paused: held,
            detach: false,
        };
        let (name, nonce) = record_identity(&self.life().cfg);
        if trigger.is_breach() {
            tracing::error!(trigger = %trigger.describe(), "breach: tearing the tenant down");
        }
        let record = teardown::run_with(
            &mut ops,
            &name,
            nonce,
            &self.life().key,
            false,
            Some(trigger),
        );
        // The tenant is gone: end the VM, then let the parked vCPUs go (they see stop).
        self.stop_flag().store(true, Ordering::SeqCst);
        drop(ops);
        self.finish(Verdict::Stopped("torn down".into()));
        self.save_record(&record);
        record
    }

    /// The control socket's `status`.
    fn status(&self) -> VmStatus {
        let verdict = self.verdict().as_ref().map(|v| v.to_string());
        // One lock at a time (a guard in a struct field lives to the statement's end).
        let (torn_down, detached) = {
            let t = lock(&self.life().teardown);
            (t.is_some(), t.as_ref().is_some_and(|r| r.detached))
        };
        VmStatus {
            state: if verdict.is_some() {
                VmState::Finished
            } else {
                VmState::Running
            },
            verdict,
            uptime_ms: self.started().elapsed().as_millis() as u64,
            vcpus: self.rendezvous().live(),
            paused: lock(&self.life().paused).is_some(),
            profile: self.life().cfg.profile_name.clone(),
            versions: ModuleVersions {
                policy: self.modules().policy.version(),
                device_handler: self.modules().handler.version(),
            },
            patchable: self.life().cfg.patch.is_some(),
            torn_down,
            detached,
            build: Some(hex::encode(match &self.life().cfg.patch {
                Some(a) => a.build_sha256,
                None => running_build(),
            })),
        }
    }

    /// The control socket's `metrics`.
    fn metrics(&self) -> Metrics {
        let b = self.life().blackouts();
        let (median_us, p99_us, max_us) = percentiles(&b);
        Metrics {
            blackouts: BlackoutStats {
                count: b.len(),
                median_us,
                p99_us,
                max_us,
            },
            patches: self.life().patches(),
            policy: self.policy_engine().map(|e| e.metrics().summary),
            module_alarms: MODULE_ALARMS.load(Ordering::Relaxed)
                + crate::lifecycle::modules::stale_address_faults(),
            module_retries: self.modules().policy.retries() + self.modules().handler.retries(),
            stale_module_calls: self.modules().policy.stale_calls()
                + self.modules().handler.stale_calls(),
        }
    }
}

impl<T: VmHost + ?Sized> Lifecycle for T {}

struct VmTeardown<'a> {
    shared: &'a dyn VmHost,
    paused: Option<Paused>,
    /// Detach (the guest runs on): the device leaves the guest's PCI bus too.
    detach: bool,
}

impl VmTeardown<'_> {
    fn dev(&self) -> MutexGuard<'_, Box<dyn hilrig_device::Device>> {
        self.shared.device()
    }
}

impl TeardownOps for VmTeardown<'_> {
    fn pause(&mut self) -> Result<(), StepError> {
        if self.paused.is_some() {
            return Ok(());
        }
        match self.shared.pause_now() {
            Ok(p) => {
                self.paused = Some(p);
                Ok(())
            }
            Err(e) => {
                // The tenant is going away: escalate from parking to stopping. Every
                // vCPU is kicked until its thread has left the run loop.
                tracing::warn!("teardown: {e}; stopping the vCPUs instead");
                self.shared.stop_flag().store(true, Ordering::SeqCst);
                let deadline = Instant::now() + 4 * self.shared.life().cfg.pause_bound;
                while self.shared.rendezvous().live() > 0 {
                    if Instant::now() > deadline {
                        return Err(StepError::Vcpus {
                            why: e.to_string(),
                            running: self.shared.rendezvous().live(),
                        });
                    }
                    self.shared.kick_all();
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(())
            }
        }
    }

    fn unmap_device(&mut self) -> Result<(), StepError> {
        if self.detach {
            self.shared.detach_device()?;
        } else {
            self.shared.unmap_device()?;
        }
        Ok(())
    }

    fn scrub_guest_memory(&mut self) -> Result<u64, StepError> {
        let mut total = 0u64;
        for (ptr, len) in self.shared.guest_ram() {
            // SAFETY: guest RAM: private anonymous mappings of this VM (vm-memory's
            // from_ranges); every vCPU is parked or stopped and the device is unmapped,
            // so nothing else uses the memory.
            unsafe { teardown::scrub_anonymous(ptr, len) }.map_err(|source| {
                StepError::GuestMemory {
                    addr: ptr as usize,
                    source,
                }
            })?;
            total += len as u64;
        }
        Ok(total)
    }

    fn scrub_device_state(&mut self) -> Result<u64, StepError> {
        if let Some(d) = self.shared.life().cfg.device_desc.clone() {
            return Ok(d.scrub(&mut **self.dev())?);
        }
        let mut dev = self.dev();
        // A wedged device (the hang magic) ignores writes and reads all-ones: reset it
        // first so the scrub can act and be checked (the reset step follows anyway).
        if dev.read32(Reg::Id.offset())? != DEVICE_ID_VALUE {
            dev.reset(ResetKind::Flr)?;
        }
        // What is tenant state, how it is scrubbed and checked: the register table.
        Ok(hilrig_device::device::scrub_tenant_state(&mut **dev)?)
    }

    fn reset_device(&mut self) -> Result<(), StepError> {
        let mut dev = self.dev();
        dev.reset(ResetKind::Flr)?;
        if let Some(d) = self.shared.life().cfg.device_desc.clone() {
            return Ok(d.check_id(&mut **dev)?);
        }
        let id = dev.read32(Reg::Id.offset())?;
        if id != DEVICE_ID_VALUE {
            return Err(StepError::NotReset {
                got: id,
                want: DEVICE_ID_VALUE,
            });
        }
        Ok(())
    }

    fn read_counters(&mut self) -> Result<CounterReport, StepError> {
        if let Some(d) = &self.shared.life().cfg.device_desc {
            return Err(StepError::NoOobCounters(d.name.clone()));
        }
        let mut dev = self.dev();
        Ok(oob::read_counters(&mut **dev)?)
    }

    fn device_serial(&mut self) -> Option<u64> {
        if self.shared.life().cfg.device_desc.is_some() {
            return None;
        }
        let mut dev = self.dev();
        match oob::request_device(&mut **dev, &oob::Request::Identify) {
            Ok(oob::Response::Identity { serial, .. }) => Some(serial),
            _ => None,
        }
    }

    fn verdict(&mut self, counters: &CounterReport) -> Result<VerdictSummary, StepError> {
        if let Some((db, key)) = self.shared.life().cfg.counters.clone() {
            return Ok(self
                .service_verdict(&db, &key, counters)
                .unwrap_or_else(|e| VerdictSummary {
                    // Fail closed: an unreachable or failing service is never "trusted".
                    verdict: CountersVerdict::Unverifiable,
                    handoff_ok: false,
                    reasons: vec![e.to_string()],
                }));
        }
        let Some(base) = *lock(&self.shared.life().baseline) else {
            return Ok(VerdictSummary {
                verdict: CountersVerdict::Unverifiable,
                handoff_ok: false,
                reasons: vec!["no counter baseline was read at VM start".into()],
            });
        };
        let (v, reasons) = hilrig_counters::compare(&base, counters);
        Ok(VerdictSummary {
            verdict: v,
            handoff_ok: v == CountersVerdict::Trusted,
            reasons,
        })
    }
}

/// Why the counters service gave no verdict (recorded as `unverifiable`).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The device did not answer out of band.
    #[error(transparent)]
    Oob(#[from] hilrig_device::oob::OobError),
    /// The device answered with something else.
    #[error("{request} answered {answer}")]
    Unexpected {
        /// The request.
        request: String,
        /// The answer.
        answer: String,
    },
    /// The service failed.
    #[error(transparent)]
    Counters(#[from] hilrig_counters::Error),
}

/// The device's serial, asked out of band (IDENTIFY).
fn oob_serial(dev: &mut dyn hilrig_device::Device) -> Result<u64, ServiceError> {
    use hilrig_device::oob::{Request, Response};
    match oob::request_device(dev, &Request::Identify)? {
        Response::Identity { serial, .. } => Ok(serial),
        other => Err(ServiceError::Unexpected {
            request: "IDENTIFY".into(),
            answer: format!("{other:?}"),
        }),
    }
}

/// The counters the service has enrolled for device `serial` as a report to compare
/// `now` with: the expected region counters, MASTER and EPOCH (MAC-checked by the
/// service), the rest as read now.
fn enrolled_counters(
    svc: &mut hilrig_counters::Service,
    serial: u64,
    now: &CounterReport,
) -> Result<CounterReport, ServiceError> {
    let rec = svc.device(serial)?;
    Ok(CounterReport {
        counters: rec.expected.counters,
        master: rec.expected.master,
        epoch: rec.expected.epoch,
        ..*now
    })
}

impl VmTeardown<'_> {
    /// Ask the counters service: identity and region hashes out of band, then verify.
    fn service_verdict(
        &mut self,
        db: &str,
        key: &std::path::Path,
        counters: &CounterReport,
    ) -> Result<VerdictSummary, ServiceError> {
        use hilrig_device::oob::{Request, Response};
        let mut dev = self.dev();
        let serial = oob_serial(&mut **dev)?;
        let mut hashes = [[0u8; 32]; 3];
        for r in hilrig_device::Region::ALL {
            match oob::request_device(&mut **dev, &Request::ReadHash(r))? {
                Response::Hash { sha256, .. } => hashes[r as usize] = sha256,
                other => {
                    return Err(ServiceError::Unexpected {
                        request: format!("READ_HASH {r}"),
                        answer: format!("{other:?}"),
                    })
                }
            }
        }
        drop(dev);
        let key = hilrig_counters::mac::Key::load(key)?;
        let mut svc = hilrig_counters::Service::open(db, key)?;
        let obs = hilrig_counters::Observation {
            report: *counters,
            hashes,
        };
        let r = svc.verify_observation(serial, Ok(obs))?;
        Ok(VerdictSummary {
            verdict: r.decision.verdict,
            handoff_ok: r.trusted(),
            reasons: r.decision.reasons.clone(),
        })
    }
}

/// Read a bundle file named in a patch request: opened without following a symlink
/// and without blocking (a FIFO is refused, never waited on), checked to be a regular
/// file on the opened descriptor, and read with a bound ([`MAX_BUNDLE`]) whatever its
/// metadata claims (`/dev/zero` and growing files are refused).
pub fn read_bundle(path: &std::path::Path) -> Result<Vec<u8>, LifecycleError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| LifecycleError::Bundle {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(err)?;
    let meta = f.metadata().map_err(err)?;
    if !meta.file_type().is_file() {
        return Err(LifecycleError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mut bytes = Vec::new();
    f.take(MAX_BUNDLE + 1)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    if bytes.len() as u64 > MAX_BUNDLE {
        return Err(LifecycleError::BundleTooLarge {
            path: path.to_path_buf(),
            len: meta.len().max(bytes.len() as u64),
        });
    }
    Ok(bytes)
}

/// A bundle file the patch source tried, and how it went.
pub type SourceOutcome = (PathBuf, Result<PatchEvent, LifecycleError>);

/// Most bundle files one poll of the patch source looks at.
pub const MAX_SOURCE_FILES: usize = 64;

/// Most outcomes the patch source's poller keeps for the run's report (the newest).
pub const MAX_SOURCE_LOG: usize = 1024;

/// Pull mode: poll `dir` every `every` for `*.bundle` regular files (at most
/// [`MAX_SOURCE_FILES`] per poll, by name order) and apply each new one (a file is
/// tried once per name, size and mtime while it stays in the directory; a refusal
/// is logged, not retried). A directory that cannot be listed is said once, at
/// warn level, until it can be again. Ends when `stop` is set or the VM is gone;
/// returns the newest [`MAX_SOURCE_LOG`] outcomes.
///
/// `confine` runs first on the new thread (its seccomp filter: the thread is
/// started before the main thread's filter, so it inherits none); when it fails the
/// thread ends at once and applies nothing.
pub fn spawn_patch_source(
    host: Weak<dyn VmHost>,
    dir: PathBuf,
    every: Duration,
    stop: Arc<AtomicBool>,
    confine: impl FnOnce() -> bool + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<Vec<SourceOutcome>>> {
    std::thread::Builder::new()
        .name("patch-source".into())
        .spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            let mut log = Vec::new();
            if !confine() {
                return log;
            }
            let mut unreadable = false;
            while !stop.load(Ordering::Acquire) {
                let Some(h) = host.upgrade() else { break };
                if lock(&h.life().teardown).is_some() {
                    break;
                }
                let files = match source_files(&dir) {
                    Ok(f) => {
                        if std::mem::take(&mut unreadable) {
                            tracing::info!(dir = %dir.display(), "patch source: readable again");
                        }
                        // Only what is in the directory now is remembered (a poller
                        // fed ever new names or mtimes keeps a bounded set); not
                        // forgotten while the directory cannot be listed.
                        seen.retain(|k| f.contains(k));
                        f
                    }
                    Err(e) => {
                        // Said once per stretch of failures (not every poll): the
                        // poller applies nothing while the directory cannot be read.
                        if !std::mem::replace(&mut unreadable, true) {
                            tracing::warn!(dir = %dir.display(), "patch source: cannot list the directory: {e}");
                        }
                        Vec::new()
                    }
                };
                for (path, id) in files {
                    if stop.load(Ordering::Acquire) || !seen.insert((path.clone(), id)) {
                        continue;
                    }
                    let r = read_bundle(&path).and_then(|b| h.patch(&b));
                    match &r {
                        Ok(ev) => tracing::info!(file = %path.display(), to = ev.to, "patch source: applied"),
                        Err(e) => tracing::warn!(file = %path.display(), "patch source: refused: {e}"),
                    }
                    if log.len() == MAX_SOURCE_LOG {
                        drop(log.remove(0));
                    }
                    log.push((path, r));
                }
                drop(h);
                let until = Instant::now() + every;
                while Instant::now() < until && !stop.load(Ordering::Acquire) {
                    std::thread::sleep(every.min(Duration::from_millis(10)));
                }
            }
            log
        })
}

/// A bundle file the patch source saw: its path and (size, mtime s, mtime ns).
type SourceFile = (PathBuf, (u64, i64, i64));

/// The `*.bundle` regular files in `dir` (name order, bounded), with (size, mtime),
/// or why the directory cannot be listed.
fn source_files(dir: &std::path::Path) -> std::io::Result<Vec<SourceFile>> {
    use std::os::unix::fs::MetadataExt;
    let rd = std::fs::read_dir(dir)?;
    let mut v: Vec<_> = rd
        .filter_map(|e| e.ok())
        .take(16 * MAX_SOURCE_FILES)
        .filter(|e| e.path().extension().is_some_and(|x| x == "bundle"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            m.file_type()
                .is_file()
                .then(|| (e.path(), (m.len(), m.mtime(), m.mtime_nsec())))
        })
        .collect();
    v.sort();
    v.truncate(MAX_SOURCE_FILES);
    Ok(v)
}

/// The control socket's view of a VM.
pub struct VmControl(pub(crate) Weak<dyn VmHost>);

impl VmControl {
    fn handle_typed(&self, req: Request) -> Result<Reply, LifecycleError> {
        let s = self.0.upgrade().ok_or(LifecycleError::Finished)?;
        // After teardown the tenant is gone: only status, metrics and the (idempotent)
        // teardown record are answered. After a detach the guest runs on: it may be
        // paused and resumed; a second detach answers the first record; teardown and
        // patches are refused (no device).
        let (torn_down, detached) = match &*lock(&s.life().teardown) {
            Some(r) => (!r.detached, r.detached),
            None => (false, false),
        };
        if torn_down
            && !matches!(
                req,
                Request::Status {} | Request::Metrics {} | Request::Teardown {}
            )
        {
            return Err(LifecycleError::TornDown);
        }
        if detached && matches!(req, Request::Teardown {} | Request::Patch { .. }) {
            return Err(LifecycleError::Detached { op: req.op() });
        }
        Ok(match req {
            Request::Status {} => Reply::Status(s.status()),
            Request::Metrics {} => Reply::Metrics(Box::new(s.metrics())),
            Request::Pause {} => Reply::Pause(s.pause()?),
            Request::Resume {} => Reply::Resume(s.resume()?),
            Request::Quiesce {} => Reply::Quiesce(s.quiesce()?),
            Request::Patch { bundle } => Reply::Patch(s.patch(&read_bundle(&bundle)?)?),
            Request::Teardown {} => {
                Reply::Teardown(Box::new(s.teardown_for(BreachTrigger::Request {
                    op: "teardown".into(),
                })))
            }
            Request::Detach {} => {
                Reply::Detach(Box::new(s.detach_for(BreachTrigger::Request {
                    op: "detach".into(),
                })?))
            }
        })
    }
}

impl Control for VmControl {
    fn handle(&self, req: Request) -> Response {
        self.handle_typed(req)
            .map_err(|e| hilrig_vmm_api::control::Refusal(e.to_string()))
    }
}

/// The VM id (`--vm-id`, else this process) and the run's nonce
/// (`--teardown-nonce`, else a fresh one: a record is never without one) that a
/// teardown or detach record carries.
fn record_identity(cfg: &LifecycleConfig) -> (String, hilrig_vmm_api::Nonce) {
    let name = cfg
        .vm_id
        .clone()
        .unwrap_or_else(|| format!("hilrig-vmm pid {}", std::process::id()));
    let nonce = match cfg.teardown_nonce {
        Some(n) => n,
        None => hilrig_vmm_api::Nonce::random().unwrap_or_else(|e| {
            tracing::error!("no random nonce for the teardown record: {e}");
            hilrig_vmm_api::Nonce([0; 32])
        }),
    };
    (name, nonce)
}
