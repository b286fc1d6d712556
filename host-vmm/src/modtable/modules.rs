//! The versioned module table: the VMM's patchable components.
//!
//! Each component (`policy`: the MMIO policy rules, a data module; `device-handler`:
//! native device handler routines, a `cdylib` with the C ABI below) lives in a
//! [`Slot`]. Callers go through the slot ([`Slot::call`], [`Slot::call_with`]), never
//! hold the module itself. Every installed version has an in-flight count (raised on
//! entry, lowered on exit) and a cancellation flag.
//!
//! Replacing a module without stopping the vCPUs ([`Slot::swap`]):
//! 1. the new module is published: every call that starts from now on lands in it;
//! 2. the old one's cancellation flag is raised: a call still inside it sees the flag
//!    at the module ABI's check points (ABI v2 passes the flag; a module returns
//!    RETRY) or on its way out, its result is discarded, a [`CallError::Retry`] is
//!    raised into it and it is re-dispatched through the table, landing in the new
//!    module (so module calls must be pure decisions: the VMM acts on their results,
//!    not the module);
//! 3. the swap waits, within a bound, for the old in-flight count to reach zero and
//!    resets it;
//! 4. the old module is retired ([`Retire`]): a native module's code pages are made
//!    inaccessible (`mprotect(PROT_NONE)`; the library is never unloaded, so the
//!    addresses stay reserved). A call through a stale code address faults; the
//!    VMM's SIGSEGV handler recognises an instruction fetch from retired code,
//!    counts a stale-address alarm ([`stale_address_faults`]) and makes the call
//!    return [`STALE_CODE`] instead of running old code. Any other fault in retired
//!    code is not survivable and ends the process loudly.
//!
//! A [`Handle`] kept from before a swap is stale: calling it returns
//! [`CallError::Stale`] and raises an alarm rather than running old code.
//! [`Slot::replace`] is the quiesced form: publish and cancel, nothing waited for.
//!
//! ## Native module C ABI (versions 1 and 2)
//!
//! A module is a shared library exporting
//! `const HilrigModuleV1 *hilrig_module_v1(void)`:
//!
//! ```c
//! struct HilrigModuleV1 {
//!     uint32_t abi;          // 1 or 2
//!     uint64_t version;      // must equal the bundle manifest's version
//!     const char *name;      // NUL-terminated; must equal the component name
//!     // Called for each allowed register-sized part of a trapped access.
//!     // word: 4-aligned BAR0 offset; is_write: 0/1; *value: the value written, or
//!     // for reads the value to return when the module completes the access.
//!     // Returns 0 PASS (forward to the device, a write with *value), 1 COMPLETE
//!     // (the module emulated it: a read returns *value, a write is consumed),
//!     // 2 RETRY (ABI 2 only: *cancel became non-zero at a check point),
//!     // negative: error (the access is dropped and an alarm raised).
//!     // ABI 1: int32_t (*on_access)(uint32_t word, uint32_t is_write, uint32_t *value);
//!     int32_t (*on_access)(uint32_t word, uint32_t is_write, uint32_t *value,
//!                          const volatile uint32_t *cancel);   // ABI 2
//! };
//! ```
//!
//! An ABI-2 module must check `*cancel` wherever it may wait or loop (its defined
//! check points) and return 2 when it is set.
//!
//! Libraries are loaded only after their file's SHA-256 matched the signed manifest
//! (see `patch`), and are never unloaded while the VMM runs (a stale address must
//! fault, not jump into whatever was mapped there later).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The newest native module ABI this VMM speaks (it also loads version 1).
pub const HILRIG_MODULE_ABI: u32 = 2;
/// The symbol a native module exports.
pub const MODULE_SYMBOL: &[u8] = b"hilrig_module_v1\0";
/// What a module returns when it saw its cancellation flag (ABI 2).
pub const MODULE_RETRY: i32 = 2;
/// What a call through a retired module's code address returns (the SIGSEGV handler
/// makes the faulting call return it).
pub const STALE_CODE: i32 = -0x57a1e;
/// How long [`Slot::swap`] waits at most for calls in the old module to drain.
pub const DRAIN_BOUND: Duration = Duration::from_millis(250);
/// How often a call is re-dispatched before it gives up ([`CallError::Unstable`]).
pub const MAX_TRIES: u32 = 8;

/// The C struct a native module returns (the fields common to ABI 1 and 2; the hook's
/// signature depends on `abi`).
#[repr(C)]
pub struct HilrigModuleV1 {
    /// ABI version.
    pub abi: u32,
    /// Module version.
    pub version: u64,
    /// Component name.
    pub name: *const c_char,
    /// The access hook (ABI 1: three arguments; ABI 2: four, see the module doc).
    pub on_access: *const c_void,
}

type HookV1 = extern "C" fn(word: u32, is_write: u32, value: *mut u32) -> i32;
type HookV2 = extern "C" fn(word: u32, is_write: u32, value: *mut u32, cancel: *const u32) -> i32;

/// What a device handler decided for one access part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerAction {
    /// Forward to the device (a write with this value).
    Pass(u32),
    /// Emulated: a read returns this value; a write is consumed.
    Complete(u32),
}

/// Why a module call did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The module was replaced while the call was in flight; re-dispatch.
    #[error("module {component} v{version} was replaced during the call; retry")]
    Retry {
        /// Component.
        component: String,
        /// The replaced version.
        version: u64,
    },
    /// A handle from before a swap was used.
    #[error("stale handle to {component} v{version} (invalidated; current is v{current})")]
    Stale {
        /// Component.
        component: String,
        /// The handle's version.
        version: u64,
        /// The current version.
        current: u64,
    },
    /// A call reached a retired module's code (it faulted and was turned back).
    #[error("call into retired module code at {addr:#x} (faulted; alarm raised)")]
    StaleAddress {
        /// The code address called.
        addr: usize,
    },
    /// The module itself reported an error.
    #[error("module {component} v{version} returned error {code}")]
    Module {
        /// Component.
        component: String,
        /// Version.
        version: u64,
        /// Its code.
        code: i32,
    },
    /// Still being replaced after several retries.
    #[error("module {component} kept changing during {tries} retries")]
    Unstable {
        /// Component.
        component: String,
        /// Retries made.
        tries: u32,
    },
}

/// Why a native module could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// dlopen or symbol lookup failed.
    #[error("loading module {path}: {detail}")]
    Load {
        /// The file.
        path: String,
        /// What failed.
        detail: String,
    },
    /// The module's self-description does not match.
    #[error("module {path}: {detail}")]
    Mismatch {
        /// The file.
        path: String,
        /// What differs.
        detail: String,
    },
}

/// Why a swap did not complete. The new module is installed in every case; what
/// failed is retiring the old one.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// Calls stayed inside the old module past the bound: it stays mapped (a retired
    /// module with a thread inside cannot be made inaccessible) and an alarm is raised.
    #[error("{component} v{version}: {inflight} call(s) still inside after {bound:?}; old code left mapped")]
    Drain {
        /// Component.
        component: String,
        /// The old version.
        version: u64,
        /// Calls still inside.
        inflight: u64,
        /// The bound.
        bound: Duration,
    },
    /// Making the old code inaccessible failed.
    #[error("{component} v{version}: retiring the old code: {detail}")]
    Retire {
        /// Component.
        component: String,
        /// The old version.
        version: u64,
        /// What failed.
        detail: String,
    },
}

/// What a completed swap measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Swapped {
    /// The replaced version.
    pub from: u64,
    /// Calls that were inside the old module when it was unpublished.
    pub inflight_at_publish: u64,
    /// Start to the new module published (the only time a new call can wait: the
    /// slot's write lock).
    pub publish: Duration,
    /// Start to the old module drained, its count reset and its code retired.
    pub total: Duration,
    /// Bytes of old code made inaccessible.
    pub retired_bytes: usize,
}

/// Why retiring a module's code failed (the message says which step).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RetireError(pub String);

/// What happens to a module once nothing can reach it any more.
pub trait Retire {
    /// Make its code inaccessible (data modules: nothing). Returns the bytes retired.
    fn retire(&self) -> Result<usize, RetireError> {
        Ok(0)
    }
}

impl<T: Retire> Retire for Option<T> {
    fn retire(&self) -> Result<usize, RetireError> {
        self.as_ref().map_or(Ok(0), Retire::retire)
    }
}
impl<T: ?Sized> Retire for Arc<T> {}
impl Retire for &'static str {}
impl Retire for u64 {}

/// A call's cancellation flag, as the module ABI sees it (a `const volatile uint32_t*`).
#[derive(Debug, Default)]
pub struct Cancel(AtomicU32);

impl Cancel {
    /// Whether the module this flag belongs to was replaced.
    #[inline]
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst) != 0
    }
    fn set(&self) {
        self.0.store(1, Ordering::SeqCst);
    }
    /// The flag's address for a native module.
    pub fn as_ptr(&self) -> *const u32 {
        self.0.as_ptr()
    }
}

/// A module call noticed its cancellation flag: the slot re-dispatches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

/// A loaded native device-handler module.
pub struct NativeHandler {
    // Keeps the code mapped for as long as any handle could reach it (and for good
    // once retired: see `Retire`).
    lib: Arc<libloading::Library>,
    hook: *const c_void,
    abi: u32,
    // The sealed memfd the library was loaded from (after `lib`: dropped after it;
    // closed when the module is retired: its mappings keep the bytes).
    _sealed: Mutex<Option<Arc<super::sealed::SealedModule>>>,
    /// Its version.
    pub version: u64,
}

// SAFETY: the hook is a plain function pointer into the library `lib` keeps loaded;
// the ABI requires it to be callable from any thread.
unsafe impl Send for NativeHandler {}
// SAFETY: as above; calling it needs no exclusive access.
unsafe impl Sync for NativeHandler {}

impl std::fmt::Debug for NativeHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeHandler")
            .field("version", &self.version)
            .field("abi", &self.abi)
            .finish()
    }
}

impl NativeHandler {
    /// Load a module file and check its ABI, name and version against what the signed
    /// manifest promised. The caller has already checked the file's SHA-256.
    pub fn load(path: &Path, component: &str, version: u64) -> Result<NativeHandler, LoadError> {
        let p = path.display().to_string();
        // SAFETY: loading runs the library's initialisers. Only libraries whose SHA-256
        // matched a manifest signed by a trusted patch authority reach this point.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| LoadError::Load {
            path: p.clone(),
            detail: e.to_string(),
        })?;
        // SAFETY: the symbol's type is fixed by the ABI above.
        let desc = unsafe {
            let f: libloading::Symbol<'_, extern "C" fn() -> *const HilrigModuleV1> =
                lib.get(MODULE_SYMBOL).map_err(|e| LoadError::Load {
                    path: p.clone(),
                    detail: format!("no hilrig_module_v1 symbol: {e}"),
                })?;
            f()
        };
        if desc.is_null() {
            return Err(LoadError::Mismatch {
                path: p,
                detail: "hilrig_module_v1() returned NULL".into(),
            });
        }
        // SAFETY: non-null, points to the module's static descriptor.
        let d = unsafe { &*desc };
        if d.abi != 1 && d.abi != 2 {
            return Err(LoadError::Mismatch {
                path: p,
                detail: format!("ABI {} (this VMM speaks 1 and 2)", d.abi),
            });
        }
        if d.on_access.is_null() {
            return Err(LoadError::Mismatch {
                path: p,
                detail: "on_access is NULL".into(),
            });
        }
        let name = if d.name.is_null() {
            String::new()
        } else {
            // SAFETY: the ABI requires a NUL-terminated static string.
            unsafe { CStr::from_ptr(d.name) }
                .to_string_lossy()
                .into_owned()
        };
        if name != component || d.version != version {
            return Err(LoadError::Mismatch {
                path: p,
                detail: format!(
                    "declares {name:?} v{}, the manifest says {component:?} v{version}",
                    d.version
                ),
            });
        }
        Ok(NativeHandler {
            hook: d.on_access,
            abi: d.abi,
            lib: Arc::new(lib),
            _sealed: Mutex::new(None),
            version,
        })
    }

    /// Load a module from its sealed memfd ([`super::sealed::SealedModule`]): the
    /// bytes whose hash was checked are the bytes loaded. The memfd is kept open
    /// until the module is retired.
    ///
    /// The dynamic loader hands back an already loaded object whose name matches,
    /// and a retired library stays loaded for good (its code `PROT_NONE`); so each
    /// load goes through a name no load in this process had before:
    /// `/proc/self/task/TID/fd/N`, from a thread of its own (thread ids are not
    /// reused until the kernel's pid space wraps), not `/proc/self/fd/N` (N is
    /// reused once a retired module's memfd is closed: dlopen would return the
    /// retired library instead of loading the new one).
    pub fn load_sealed(
        module: super::sealed::SealedModule,
        component: &str,
        version: u64,
    ) -> Result<NativeHandler, LoadError> {
        let fd = module.raw_fd();
        let failed = |detail: String| LoadError::Load {
            path: module.path().display().to_string(),
            detail,
        };
        let loaded = std::thread::scope(|t| {
            std::thread::Builder::new()
                .name("module-load".into())
                .spawn_scoped(t, || {
                    // SAFETY: gettid has no preconditions.
                    let tid = unsafe { libc::gettid() };
                    let path = std::path::PathBuf::from(format!("/proc/self/task/{tid}/fd/{fd}"));
                    NativeHandler::load(&path, component, version)
                })
                .map_err(|e| failed(format!("starting the loading thread: {e}")))?
                .join()
                .map_err(|_| failed("the loading thread panicked".into()))
        });
        let h = loaded??;
        // A thread id reused after the pid space wrapped, with the same fd number,
        // names a retired library again, and the loader would hand that back:
        // never run it (its code is PROT_NONE; a call would fault as stale).
        if in_retired(h.hook_address()) {
            return Err(failed(
                "the dynamic loader returned a retired version (a load name reused after the thread ids wrapped); load it again".into(),
            ));
        }
        *h._sealed.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(module));
        Ok(h)
    }

    /// The module's ABI version (1 or 2).
    pub fn abi(&self) -> u32 {
        self.abi
    }

    /// The code address of its access hook (what a stale caller would jump to).
    pub fn hook_address(&self) -> usize {
        self.hook as usize
    }

    /// Call the module's access hook (with a flag that is never raised).
    pub fn on_access(&self, word: u32, write: bool, value: u32) -> Result<HandlerAction, i32> {
        let never = Cancel::default();
        match self.on_access_cancellable(word, write, value, &never) {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(Cancelled)) => Err(MODULE_RETRY),
            Err(c) => Err(c),
        }
    }

    /// Call the module's access hook; an ABI-2 module watches `cancel`.
    /// `Ok(Err(Cancelled))`: the module gave up because `cancel` was raised.
    /// `Err(STALE_CODE)`: the module's code was retired (an alarm was raised).
    pub fn on_access_cancellable(
        &self,
        word: u32,
        write: bool,
        value: u32,
        cancel: &Cancel,
    ) -> Result<Result<HandlerAction, Cancelled>, i32> {
        let mut v = value;
        let before = stale_address_faults();
        let code = if self.abi == 2 {
            // SAFETY: ABI 2's hook signature (checked at load).
            let f: HookV2 = unsafe { std::mem::transmute::<*const c_void, HookV2>(self.hook) };
            f(word, write as u32, &mut v, cancel.as_ptr())
        } else {
            // SAFETY: ABI 1's hook signature (checked at load).
            let f: HookV1 = unsafe { std::mem::transmute::<*const c_void, HookV1>(self.hook) };
            f(word, write as u32, &mut v)
        };
        match code {
            0 => Ok(Ok(HandlerAction::Pass(v))),
            1 => Ok(Ok(HandlerAction::Complete(v))),
            MODULE_RETRY if self.abi == 2 => Ok(Err(Cancelled)),
            STALE_CODE if stale_address_faults() != before => {
                let e = CallError::StaleAddress {
                    addr: self.hook_address(),
                };
                tracing::error!("module alarm: {e}");
                Err(STALE_CODE)
            }
            c => Err(c),
        }
    }
}

impl Retire for NativeHandler {
    /// Make the library's executable pages inaccessible and keep it loaded for good,
    /// so its addresses fault instead of running anything.
    fn retire(&self) -> Result<usize, RetireError> {
        let ranges = exec_ranges_of(self.hook_address())?;
        // Never unloaded: dlclose would run its finalisers (in PROT_NONE code) and free
        // the addresses for something else to be mapped there.
        std::mem::forget(self.lib.clone());
        install_stale_fault_handler()?;
        register_retired(&ranges);
        let mut bytes = 0;
        for &(start, end) in &ranges {
            // SAFETY: `start..end` are whole pages of the module's own executable
            // segment (never the VMM's: checked by exec_ranges_of); nothing runs in
            // them (the swap drained every call first).
            let r = unsafe { libc::mprotect(start as *mut c_void, end - start, libc::PROT_NONE) };
            if r != 0 {
                return Err(RetireError(format!(
                    "mprotect {start:#x}..{end:#x}: {}",
                    std::io::Error::last_os_error()
                )));
            }
            bytes += end - start;
        }
        // Its memfd is closed (the mappings keep its bytes): a VMM patched many
        // times holds no descriptor per retired module. Its name stays unique
        // (`load_sealed`), so the number's reuse cannot hand this library back.
        drop(
            self._sealed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        tracing::info!(
            version = self.version,
            bytes,
            "retired device-handler code (PROT_NONE)"
        );
        Ok(bytes)
    }
}

/// The page-rounded executable segments of the shared object holding `addr`; refused
/// for the main executable (the VMM never retires its own code).
fn exec_ranges_of(addr: usize) -> Result<Vec<(usize, usize)>, RetireError> {
    struct Ctx {
        addr: usize,
        found: Option<(bool, Vec<(usize, usize)>)>,
    }
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: the loader passes valid info and our own Ctx.
        let (info, ctx) = unsafe { (&*info, &mut *(data as *mut Ctx)) };
        let base = info.dlpi_addr as usize;
        let phdrs = if info.dlpi_phdr.is_null() {
            &[][..]
        } else {
            // SAFETY: dlpi_phnum program headers at dlpi_phdr.
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) }
        };
        let page = 4096usize;
        let mut ranges = Vec::new();
        let mut hit = false;
        for ph in phdrs {
            if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_X != 0 {
                let s = base.wrapping_add(ph.p_vaddr as usize);
                let e = s.wrapping_add(ph.p_memsz as usize);
                hit |= (s..e).contains(&ctx.addr);
                ranges.push((s & !(page - 1), (e + page - 1) & !(page - 1)));
            }
        }
        if hit {
            // SAFETY: dlpi_name is NUL-terminated or null.
            let main = info.dlpi_name.is_null() || unsafe { *info.dlpi_name } == 0;
            ctx.found = Some((main, ranges));
            return 1;
        }
        0
    }
    let mut ctx = Ctx { addr, found: None };
    // SAFETY: the callback only reads the loader's headers and writes `ctx`.
    unsafe { libc::dl_iterate_phdr(Some(each), &mut ctx as *mut Ctx as *mut c_void) };
    match ctx.found {
        None => Err(RetireError(format!("no loaded object holds {addr:#x}"))),
        Some((true, _)) => Err(RetireError(format!(
            "{addr:#x} is in the VMM's own executable"
        ))),
        Some((false, r)) if r.is_empty() => {
            Err(RetireError(format!("no executable segment at {addr:#x}")))
        }
        Some((false, r)) => Ok(r),
    }
}

// Retired code, as the SIGSEGV handler sees it (async-signal-safe: atomics only).
//
// Retired code stays reserved for good (the library is never unloaded, its
// executable pages stay PROT_NONE), so its ranges are never forgotten either: they
// live in an append-only list of fixed-size chunks, the first static and the rest
// leaked, linked by atomic pointers. Registration (rare: one per retired module)
// takes a lock, coalesces a range with one it touches or overlaps, and links a new
// chunk when every entry is taken; the handler walks the chunks lock-free. There is
// no limit on how many modules a long-running VMM retires (once one was a fixed
// table of 64: the 65th retire failed and left the old code executable).
const RETIRED_CHUNK: usize = 128;

/// A chunk of retired ranges: `(start, end)`, start 0 when free; written only
/// under [`RETIRED_LOCK`], `end` before `start` (a reader seeing a start sees its
/// end; a coalesced range only grows).
struct RetiredChunk {
    ranges: [(AtomicUsize, AtomicUsize); RETIRED_CHUNK],
    next: AtomicPtr<RetiredChunk>,
}

impl RetiredChunk {
    const fn new() -> RetiredChunk {
        RetiredChunk {
            ranges: [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; RETIRED_CHUNK],
            next: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// This chunk and every one linked after it.
    fn chain(&'static self) -> impl Iterator<Item = &'static RetiredChunk> {
        std::iter::successors(Some(self), |c| {
            // SAFETY: `next` is null or a leaked chunk, never freed.
            unsafe { c.next.load(Ordering::Acquire).as_ref() }
        })
    }
}

static RETIRED: RetiredChunk = RetiredChunk::new();
static RETIRED_LOCK: Mutex<()> = Mutex::new(());
/// Modules retired since the process started.
static RETIRED_MODULES: AtomicU64 = AtomicU64::new(0);
static STALE_FAULTS: AtomicU64 = AtomicU64::new(0);
static LAST_STALE_ADDR: AtomicUsize = AtomicUsize::new(0);
static HANDLER: std::sync::Mutex<Option<libc::sigaction>> = std::sync::Mutex::new(None);
static PREVIOUS: std::sync::atomic::AtomicPtr<libc::sigaction> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

/// Calls into retired module code that faulted and were turned back (alarms).
pub fn stale_address_faults() -> u64 {
    STALE_FAULTS.load(Ordering::SeqCst)
}

/// The code address of the last such call.
pub fn last_stale_address() -> usize {
    LAST_STALE_ADDR.load(Ordering::SeqCst)
}

/// Native modules retired since the process started.
pub fn retired_modules() -> u64 {
    RETIRED_MODULES.load(Ordering::SeqCst)
}

/// Entries the retired-code list holds (coalesced ranges; diagnostics and tests).
#[doc(hidden)]
pub fn retired_ranges() -> usize {
    RETIRED
        .chain()
        .flat_map(|c| c.ranges.iter())
        .filter(|(a, _)| a.load(Ordering::SeqCst) != 0)
        .count()
}

/// Record `ranges` as retired code (before they are made inaccessible, so the
/// handler knows them by the time a call can fault there). Never fails for want of
/// room: a full list grows by a chunk.
fn register_retired(ranges: &[(usize, usize)]) {
    let _g = RETIRED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for &(s, e) in ranges {
        if s == 0 || e <= s {
            continue;
        }
        // A range it touches or overlaps grows to cover it (its start only falls,
        // its end only rises: a reader sees the old range or the new one, both
        // retired code).
        let touching = RETIRED
            .chain()
            .flat_map(|c| c.ranges.iter())
            .find(|(a, b)| {
                let (a, b) = (a.load(Ordering::SeqCst), b.load(Ordering::SeqCst));
                a != 0 && s <= b && a <= e
            });
        if let Some((a, b)) = touching {
            if e > b.load(Ordering::SeqCst) {
                b.store(e, Ordering::SeqCst);
            }
            if s < a.load(Ordering::SeqCst) {
                a.store(s, Ordering::SeqCst);
            }
            continue;
        }
        let free = RETIRED
            .chain()
            .flat_map(|c| c.ranges.iter())
            .find(|(a, _)| a.load(Ordering::SeqCst) == 0);
        let (a, b) = match free {
            Some(x) => x,
            None => {
                let last = RETIRED.chain().last().unwrap_or(&RETIRED);
                let chunk: &'static RetiredChunk = Box::leak(Box::new(RetiredChunk::new()));
                last.next.store(
                    chunk as *const RetiredChunk as *mut RetiredChunk,
                    Ordering::Release,
                );
                &chunk.ranges[0]
            }
        };
        b.store(e, Ordering::SeqCst);
        a.store(s, Ordering::SeqCst);
    }
    RETIRED_MODULES.fetch_add(1, Ordering::SeqCst);
}

/// The function a faulting stale call is turned into: it returns [`STALE_CODE`] to the
/// caller (the `call` already pushed the return address, so it runs as the callee).
extern "C" fn stale_call_stub() -> i32 {
    STALE_CODE
}

fn in_retired(addr: usize) -> bool {
    // Lock-free (the SIGSEGV handler): atomics and leaked chunks only.
    RETIRED.chain().flat_map(|c| c.ranges.iter()).any(|(a, b)| {
        let s = a.load(Ordering::SeqCst);
        s != 0 && addr >= s && addr < b.load(Ordering::SeqCst)
    })
}

fn write_stderr(msg: &[u8]) {
    // SAFETY: write(2) is async-signal-safe.
    unsafe { libc::write(2, msg.as_ptr() as *const c_void, msg.len()) };
}

extern "C" fn on_segv(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: the kernel passes valid siginfo and ucontext to an SA_SIGINFO handler.
    let (addr, uc) = unsafe {
        (
            (*info).si_addr() as usize,
            &mut *(ctx as *mut libc::ucontext_t),
        )
    };
    let rip = uc.uc_mcontext.gregs[libc::REG_RIP as usize] as usize;
    if rip == addr && in_retired(addr) {
        // An instruction fetch from retired code: a call through a stale address (a
        // stale hook pointer, or the library's own finalisers at process exit) that
        // faulted on the callee's first instruction. Count the alarm and make the call
        // return STALE_CODE to its caller instead of running old code: the `call`
        // pushed the return address, so the stub runs as the callee.
        STALE_FAULTS.fetch_add(1, Ordering::SeqCst);
        LAST_STALE_ADDR.store(addr, Ordering::SeqCst);
        uc.uc_mcontext.gregs[libc::REG_RIP as usize] = stale_call_stub as *const () as usize as i64;
        return;
    }
    if in_retired(rip) || in_retired(addr) {
        write_stderr(b"hilrig-vmm: FATAL: execution reached a retired module's code (a stale module address); aborting\n");
    }
    // Not a stale call we can turn back: hand the fault to whoever handled it before
    // (it repeats on return).
    let prev = PREVIOUS.load(Ordering::SeqCst);
    // SAFETY: sigaction is async-signal-safe; `prev` is a leaked, never freed copy.
    unsafe {
        if prev.is_null() {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        } else {
            libc::sigaction(sig, prev, std::ptr::null_mut());
        }
    }
}

/// Install the SIGSEGV handler that turns stale-address calls into alarms (once).
pub fn install_stale_fault_handler() -> Result<(), RetireError> {
    let mut h = HANDLER.lock().unwrap_or_else(|e| e.into_inner());
    if h.is_some() {
        return Ok(());
    }
    // SAFETY: a plain sigaction install; the handler only touches atomics, the
    // ucontext and sigaction/write.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_segv as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
        libc::sigemptyset(&mut sa.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGSEGV, &sa, &mut old) != 0 {
            return Err(RetireError(format!(
                "installing the SIGSEGV handler: {}",
                std::io::Error::last_os_error()
            )));
        }
        PREVIOUS.store(Box::into_raw(Box::new(old)), Ordering::SeqCst);
        *h = Some(sa);
    }
    Ok(())
}

/// One installed version of a component.
#[derive(Debug)]
pub struct Installed<T> {
    /// The module.
    pub module: T,
    /// Its version.
    pub version: u64,
    valid: AtomicBool,
    cancel: Cancel,
    inflight: AtomicU64,
}

impl<T> Installed<T> {
    fn new(module: T, version: u64) -> Installed<T> {
        Installed {
            module,
            version,
            valid: AtomicBool::new(true),
            cancel: Cancel::default(),
            inflight: AtomicU64::new(0),
        }
    }

    /// Enter: count the call, unless the module was already replaced (then the caller
    /// re-dispatches). Checked after counting, so a swap either sees this call in
    /// flight or this call sees the swap (both SeqCst).
    fn enter(&self) -> bool {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        if self.cancel.is_set() {
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn exit(&self) {
        self.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A patchable component's slot in the table.
///
/// The current version is an atomic pointer: a call costs one atomic load and the
/// in-flight count's increment and decrement, no lock (the policy is decided through
/// its slot on every trapped access). Every version ever installed stays allocated
/// while the slot lives (`all`; a native module's code is never unloaded anyway), so
/// a pointer loaded just before a swap still points at a live, cancelled version.
pub struct Slot<T> {
    name: String,
    current: AtomicPtr<Installed<T>>,
    /// Every version installed, the current one last (keeps them alive).
    all: Mutex<Vec<Arc<Installed<T>>>>,
    /// The installed version, readable without the lock (the hot trap path asks
    /// whether any device handler is installed on every access).
    version: AtomicU64,
    stale_calls: AtomicU64,
    retries: AtomicU64,
    alarm: Box<dyn Fn(&CallError) + Send + Sync>,
}

/// A reference to one installed version, for callers that keep one. Calling it after
/// the version was replaced fails with [`CallError::Stale`] and raises an alarm.
pub struct Handle<T> {
    slot: Arc<Slot<T>>,
    installed: Arc<Installed<T>>,
}

impl<T> Slot<T> {
    /// A slot holding `module` at `version`; `alarm` is told of stale-handle calls.
    pub fn new(
        name: &str,
        module: T,
        version: u64,
        alarm: Box<dyn Fn(&CallError) + Send + Sync>,
    ) -> Arc<Slot<T>> {
        let first = Arc::new(Installed::new(module, version));
        Arc::new(Slot {
            name: name.to_string(),
            current: AtomicPtr::new(Arc::as_ptr(&first).cast_mut()),
            all: Mutex::new(vec![first]),
            version: AtomicU64::new(version),
            stale_calls: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            alarm,
        })
    }

    /// Component name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current version (no lock, no reference count).
    #[inline]
    fn current(&self) -> &Installed<T> {
        // SAFETY: `current` always points into an `Arc` held by `all`, which only
        // grows while the slot lives; the reference does not outlive `self`.
        unsafe { &*self.current.load(Ordering::SeqCst) }
    }

    /// The current version, counted.
    fn load(&self) -> Arc<Installed<T>> {
        let all = self.all.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.current.load(Ordering::SeqCst).cast_const();
        all.iter()
            .rev()
            .find(|m| Arc::as_ptr(m) == cur)
            .cloned()
            .unwrap_or_else(|| all[all.len() - 1].clone())
    }

    /// The installed version.
    #[inline]
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Calls inside the installed version right now.
    pub fn inflight(&self) -> u64 {
        self.current().inflight.load(Ordering::SeqCst)
    }

    /// A handle to the current version.
    pub fn handle(self: &Arc<Self>) -> Handle<T> {
        Handle {
            slot: self.clone(),
            installed: self.load(),
        }
    }

    /// Publish `module` and cancel the old version; returns the old one.
    fn publish(&self, module: T, version: u64) -> Arc<Installed<T>> {
        let new = Arc::new(Installed::new(module, version));
        let mut all = self.all.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.current.load(Ordering::SeqCst).cast_const();
        let old = all
            .iter()
            .rev()
            .find(|m| Arc::as_ptr(m) == cur)
            .cloned()
            .unwrap_or_else(|| all[all.len() - 1].clone());
        self.current
            .store(Arc::as_ptr(&new).cast_mut(), Ordering::SeqCst);
        all.push(new);
        self.version.store(version, Ordering::Release);
        drop(all);
        old.valid.store(false, Ordering::SeqCst);
        old.cancel.set();
        old
    }

    /// Replace the module with every vCPU quiesced (the caller checked the version is
    /// newer): publish and cancel; nothing is waited for or retired. Returns the old
    /// version number.
    pub fn replace(&self, module: T, version: u64) -> u64 {
        self.publish(module, version).version
    }

    /// Call the current module. If it is replaced while `f` runs, `f`'s result is
    /// discarded (the injected retry) and the call is re-dispatched to the new module.
    pub fn call<R>(&self, f: impl Fn(&T) -> R) -> Result<R, CallError> {
        self.call_with(|m, _| Ok(f(m)))
    }

    /// Call the current module with its cancellation flag (for modules that check it
    /// at their own points and give up with [`Cancelled`]). A call whose module was
    /// replaced meanwhile — it returned `Cancelled`, or the flag was up when it
    /// returned — gets a [`CallError::Retry`] and is re-dispatched through the table.
    pub fn call_with<R>(
        &self,
        f: impl Fn(&T, &Cancel) -> Result<R, Cancelled>,
    ) -> Result<R, CallError> {
        for _ in 0..MAX_TRIES {
            let m = self.current();
            if !m.enter() {
                continue;
            }
            let r = f(&m.module, &m.cancel);
            let replaced = m.cancel.is_set();
            m.exit();
            match r {
                Ok(v) if !replaced => return Ok(v),
                _ => {
                    let e = CallError::Retry {
                        component: self.name.clone(),
                        version: m.version,
                    };
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("{e}");
                }
            }
        }
        Err(CallError::Unstable {
            component: self.name.clone(),
            tries: MAX_TRIES,
        })
    }

    /// The current module, uncounted (for reads that decide nothing: names,
    /// settings). Every version stays allocated while the slot lives.
    #[inline]
    pub fn peek(&self) -> &T {
        &self.current().module
    }

    /// Decide through the current module without a lock (the per-access policy
    /// path): `f` runs inside it, counted in flight; if the module was replaced
    /// while `f` ran, `f`'s result is discarded (the injected retry) and `f` runs
    /// again in the new one. Returns the module that decided — alive as long as the
    /// slot — with its result, so the caller carries out a decision made entirely
    /// by one version, exactly once. `f` must be a pure decision (it may run more
    /// than once).
    #[inline]
    pub fn decide<R>(&self, f: impl FnMut(&T) -> R) -> Result<(&T, R), CallError> {
        self.decide_versioned(f).map(|(m, _, r)| (m, r))
    }

    /// [`Slot::decide`], also returning the deciding module's version.
    #[inline]
    pub fn decide_versioned<R>(
        &self,
        mut f: impl FnMut(&T) -> R,
    ) -> Result<(&T, u64, R), CallError> {
        for _ in 0..MAX_TRIES {
            let m = self.current();
            if !m.enter() {
                continue;
            }
            let r = f(&m.module);
            let replaced = m.cancel.is_set();
            m.exit();
            if !replaced {
                return Ok((&m.module, m.version, r));
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                "{}",
                CallError::Retry {
                    component: self.name.clone(),
                    version: m.version,
                }
            );
        }
        Err(CallError::Unstable {
            component: self.name.clone(),
            tries: MAX_TRIES,
        })
    }

    /// The module installed as `version` (every version stays allocated while the
    /// slot lives), if any; takes the slot's lock.
    pub fn installed(&self, version: u64) -> Option<Arc<Installed<T>>> {
        let all = self.all.lock().unwrap_or_else(|e| e.into_inner());
        all.iter().rev().find(|m| m.version == version).cloned()
    }

    /// Calls re-dispatched because their module was replaced mid-call.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Calls through stale handles.
    pub fn stale_calls(&self) -> u64 {
        self.stale_calls.load(Ordering::Relaxed)
    }
}

impl<T: Retire> Slot<T> {
    /// Replace the module while the vCPUs keep running (see the module doc): publish
    /// the new one, cancel the old, wait up to `bound` for the old in-flight count to
    /// reach zero, reset it and retire the old code. The new module is installed
    /// whatever happens after publishing; an error says the old one could not be
    /// retired (and raised an alarm).
    pub fn swap(&self, module: T, version: u64, bound: Duration) -> Result<Swapped, SwapError> {
        let t0 = Instant::now();
        let old = self.publish(module, version);
        let publish = t0.elapsed();
        let inflight_at_publish = old.inflight.load(Ordering::SeqCst);
        let mut spins = 0u32;
        loop {
            let n = old.inflight.load(Ordering::SeqCst);
            if n == 0 {
                break;
            }
            if t0.elapsed() > bound {
                let e = SwapError::Drain {
                    component: self.name.clone(),
                    version: old.version,
                    inflight: n,
                    bound,
                };
                tracing::error!("module alarm: {e}");
                return Err(e);
            }
            spins += 1;
            if spins < 256 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // Drained: nothing is inside and nothing can enter (its flag is up).
        old.inflight.store(0, Ordering::SeqCst);
        let retired_bytes = old.module.retire().map_err(|detail| {
            let e = SwapError::Retire {
                component: self.name.clone(),
                version: old.version,
                detail: detail.0,
            };
            tracing::error!("module alarm: {e}");
            e
        })?;
        Ok(Swapped {
            from: old.version,
            inflight_at_publish,
            publish,
            total: t0.elapsed(),
            retired_bytes,
        })
    }
}

impl<T> Handle<T> {
    /// Call this handle's version, if it is still the installed one.
    pub fn call<R>(&self, f: impl FnOnce(&T) -> R) -> Result<R, CallError> {
        if !self.installed.valid.load(Ordering::Acquire) || !self.installed.enter() {
            let e = CallError::Stale {
                component: self.slot.name.clone(),
                version: self.installed.version,
                current: self.slot.version(),
            };
            self.slot.stale_calls.fetch_add(1, Ordering::Relaxed);
            (self.slot.alarm)(&e);
            return Err(e);
        }
        let r = f(&self.installed.module);
        self.installed.exit();
        Ok(r)
    }

    /// The version this handle refers to.
    pub fn version(&self) -> u64 {
        self.installed.version
    }

    /// The module this handle refers to, without the staleness check: what a caller
    /// that kept a raw pointer across a swap would reach. A retired native module's
    /// code is inaccessible, so a call through it faults and is turned back as a
    /// stale-address alarm ([`stale_address_faults`]); for adversarial tests.
    #[doc(hidden)]
    pub fn module_unchecked(&self) -> &T {
        &self.installed.module
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Build the demo handler module (modules/demo_handler.rs) at `version` into `dir`
    /// with rustc; returns the library path.
    pub fn build_demo_module(
        dir: &Path,
        version: u64,
        version_reg_value: u32,
    ) -> std::path::PathBuf {
        build_demo_module_with(dir, version, version_reg_value, None)
    }

    /// The same, with reads of `block_word` blocking until the call is cancelled.
    pub fn build_demo_module_with(
        dir: &Path,
        version: u64,
        version_reg_value: u32,
        block_word: Option<u32>,
    ) -> std::path::PathBuf {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("modules/demo_handler.rs");
        let tag = block_word.map_or(String::new(), |w| format!("_block{w:x}"));
        let out = dir.join(format!("libdemo_v{version}{tag}.so"));
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
        let mut cmd = std::process::Command::new(rustc);
        cmd.args([
            "--edition=2021",
            "--crate-type=cdylib",
            "-O",
            "--crate-name",
            "demo_handler",
        ])
        .env("DEMO_VERSION", version.to_string())
        .env("DEMO_VERSION_REG", format!("{version_reg_value:#x}"))
        .env_remove("DEMO_BLOCK_WORD");
        if let Some(w) = block_word {
            cmd.env("DEMO_BLOCK_WORD", format!("{w:#x}"));
        }
        let st = cmd
            .arg("-o")
            .arg(&out)
            .arg(&src)
            .status()
            .expect("run rustc");
        assert!(st.success(), "building the demo module");
        out
    }

    /// A device that counts what reaches it.
    struct Spy {
        writes: Arc<AtomicU64>,
        reads: Arc<Mutex<Vec<u32>>>,
    }
    impl hilrig_device::device::Device for Spy {
        fn read_word(&mut self, word: u32, _: u8) -> Result<u32, hilrig_device::DeviceError> {
            self.reads.lock().unwrap().push(word);
            Ok(0x5157_0000 | word)
        }
        fn write_word(&mut self, _: u32, _: u32, _: u8) -> Result<(), hilrig_device::DeviceError> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn rom_size(&self) -> u64 {
            0
        }
        fn rom_read(&mut self, _: u64, _: &mut [u8]) -> Result<(), hilrig_device::DeviceError> {
            Ok(())
        }
        fn reset(&mut self, _: hilrig_device::ResetKind) -> Result<(), hilrig_device::DeviceError> {
            Ok(())
        }
    }

    /// Issue 21.1: a vCPU blocked inside the old handler while the others storm the
    /// device; the handler is swapped with no quiesce. The blocked call is cancelled,
    /// retried and lands in the new module; every access is decided exactly once,
    /// each vCPU sees old-then-new; the old code is PROT_NONE and a call through its
    /// stale address faults and is counted as an alarm.
    #[test]
    fn handler_swapped_mid_call_under_a_storm_without_quiesce() {
        use crate::devices::handled::HandledDevice;
        use hilrig_device::device::Device;
        let d = tempfile::tempdir().unwrap();
        let scratch = hilrig_device::Reg::Scratch.offset();
        let version_reg = hilrig_device::Reg::Version.offset();
        let v1 = build_demo_module_with(d.path(), 1, 0x0001_0001, Some(scratch));
        let v2 = build_demo_module_with(d.path(), 2, 0x0001_0002, None);
        let h1 = NativeHandler::load(&v1, "device-handler", 1).unwrap();
        assert_eq!(h1.abi(), 2);
        let stale_hook = h1.hook_address();
        let h2 = NativeHandler::load(&v2, "device-handler", 2).unwrap();
        let slot: Arc<Slot<Option<NativeHandler>>> =
            Slot::new("device-handler", Some(h1), 1, Box::new(|_| {}));
        let old_handle = slot.handle();
        let writes = Arc::new(AtomicU64::new(0));
        let reads = Arc::new(Mutex::new(Vec::new()));
        let device = |slot: &Arc<Slot<Option<NativeHandler>>>| {
            HandledDevice::new(
                Box::new(Spy {
                    writes: writes.clone(),
                    reads: reads.clone(),
                }),
                slot.clone(),
            )
        };
        // vCPU 0 reads SCRATCH[0]: it blocks inside v1.
        let mut dev0 = device(&slot);
        let blocked = std::thread::spawn(move || dev0.read_word(scratch, 0xf));
        while slot.inflight() == 0 {
            std::thread::yield_now();
        }
        // vCPUs 1..=3 storm: a write and a VERSION read per round.
        let stop = Arc::new(AtomicBool::new(false));
        let rounds: Vec<_> = (0..3).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let storm: Vec<_> = (0..3)
            .map(|i| {
                let mut dev = device(&slot);
                let (stop, rounds) = (stop.clone(), rounds[i as usize].clone());
                std::thread::spawn(move || {
                    let mut seen = Vec::new();
                    let mut issued = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        dev.write_word(scratch + 4 * (1 + i), issued as u32, 0xf)
                            .unwrap();
                        issued += 1;
                        seen.push(dev.read_word(version_reg, 0xf).unwrap());
                        rounds.fetch_add(1, Ordering::SeqCst);
                    }
                    (issued, seen)
                })
            })
            .collect();
        let done = |n| rounds.iter().all(|r| r.load(Ordering::SeqCst) >= n);
        while !done(100) {
            std::thread::yield_now();
        }
        assert!(!blocked.is_finished(), "vCPU 0 is still inside v1");
        // The blocked call is inside v1 (counted) before the swap: on a loaded machine
        // its thread may not have entered yet when the storm has made its rounds.
        let t0 = std::time::Instant::now();
        while slot.inflight() == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the blocked call never entered v1"
            );
            std::thread::yield_now();
        }
        let sw = slot.swap(Some(h2), 2, Duration::from_secs(10)).unwrap();
        assert_eq!(sw.from, 1);
        assert!(sw.inflight_at_publish >= 1, "{sw:?}");
        assert!(sw.retired_bytes > 0, "{sw:?}");
        let after: Vec<u64> = rounds.iter().map(|r| r.load(Ordering::SeqCst)).collect();
        while !rounds
            .iter()
            .zip(&after)
            .all(|(r, a)| r.load(Ordering::SeqCst) >= a + 100)
        {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::SeqCst);
        // The blocked read was retried in v2, which passed it to the device: once.
        assert_eq!(blocked.join().unwrap().unwrap(), 0x5157_0000 | scratch);
        assert!(slot.retries() >= 1);
        assert_eq!(
            reads
                .lock()
                .unwrap()
                .iter()
                .filter(|&&w| w == scratch)
                .count(),
            1,
            "the interrupted access reached the device exactly once"
        );
        let mut issued = 0;
        for t in storm {
            let (n, seen) = t.join().unwrap();
            issued += n;
            let first_new = seen.iter().position(|&v| v == 0x0001_0002).unwrap();
            assert!(first_new > 0, "saw v1 first");
            assert!(seen[..first_new].iter().all(|&v| v == 0x0001_0001));
            assert!(
                seen[first_new..].iter().all(|&v| v == 0x0001_0002),
                "old-then-new"
            );
        }
        assert_eq!(
            writes.load(Ordering::SeqCst),
            issued,
            "every write exactly once"
        );
        assert!(
            reads.lock().unwrap().iter().all(|&w| w == scratch),
            "VERSION emulated"
        );
        // The old code is gone: a call through its stale address faults, is turned
        // back and counted as an alarm; it never runs.
        let before = stale_address_faults();
        let old = old_handle.installed.module.as_ref().unwrap();
        assert_eq!(old.hook_address(), stale_hook);
        assert_eq!(old.on_access(version_reg, false, 0), Err(STALE_CODE));
        assert_eq!(stale_address_faults(), before + 1);
        assert_eq!(last_stale_address(), stale_hook);
        // The kept handle is stale: an error and an alarm, no call.
        assert!(matches!(
            old_handle.call(|_| ()),
            Err(CallError::Stale {
                version: 1,
                current: 2,
                ..
            })
        ));
        // v2 is live.
        assert_eq!(
            slot.call(|h| h.as_ref().map(|h| h.on_access(version_reg, false, 0)))
                .unwrap(),
            Some(Ok(HandlerAction::Complete(0x0001_0002)))
        );
    }

    /// A call that stays inside the old module past the bound: the swap reports it and
    /// leaves the old code mapped (never PROT_NONE under a running call).
    #[test]
    fn swap_that_cannot_drain_leaves_old_code_mapped() {
        let slot: Arc<Slot<u64>> = Slot::new("policy", 1, 1, Box::new(|_| {}));
        let release = Arc::new(AtomicBool::new(false));
        let (s2, r2) = (slot.clone(), release.clone());
        let t = std::thread::spawn(move || {
            s2.call(|v| {
                while !r2.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                *v
            })
        });
        while slot.inflight() == 0 {
            std::thread::yield_now();
        }
        let e = slot.swap(2, 2, Duration::from_millis(20)).unwrap_err();
        assert!(matches!(e, SwapError::Drain { inflight: 1, .. }), "{e}");
        assert_eq!(slot.version(), 2, "the new module is installed anyway");
        release.store(true, Ordering::SeqCst);
        assert_eq!(
            t.join().unwrap(),
            Ok(2),
            "the ignored call was retried in v2"
        );
    }

    #[test]
    fn native_module_loads_checks_and_runs() {
        let d = tempfile::tempdir().unwrap();
        let lib = build_demo_module(d.path(), 2, 0x0001_0002);
        let h = NativeHandler::load(&lib, "device-handler", 2).unwrap();
        let version = hilrig_device::Reg::Version.offset();
        assert_eq!(
            h.on_access(version, false, 0),
            Ok(HandlerAction::Complete(0x0001_0002))
        );
        assert_eq!(h.on_access(0x10, true, 5), Ok(HandlerAction::Pass(5)));
        let e = NativeHandler::load(&lib, "device-handler", 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("declares \"device-handler\" v2"), "{e}");
        let e = NativeHandler::load(&lib, "policy", 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("manifest says \"policy\""), "{e}");
        let not_a_lib = d.path().join("x.so");
        std::fs::write(&not_a_lib, b"nope").unwrap();
        assert!(NativeHandler::load(&not_a_lib, "device-handler", 1).is_err());
    }

    #[test]
    fn in_flight_call_retries_into_the_new_module_and_stale_handles_alarm() {
        let alarms = Arc::new(Mutex::new(Vec::new()));
        let a2 = alarms.clone();
        let slot = Slot::new(
            "policy",
            "old",
            1,
            Box::new(move |e: &CallError| a2.lock().unwrap().push(e.to_string())),
        );
        let handle = slot.handle();
        assert_eq!(handle.call(|m| *m), Ok("old"));
        // A call in flight when the swap happens lands in the new module.
        let entered = Arc::new(std::sync::Barrier::new(2));
        let proceed = Arc::new(std::sync::Barrier::new(2));
        let (s2, e2, p2) = (slot.clone(), entered.clone(), proceed.clone());
        let first = Arc::new(AtomicBool::new(true));
        let t = std::thread::spawn(move || {
            s2.call(|m| {
                if first.swap(false, Ordering::SeqCst) {
                    e2.wait();
                    p2.wait();
                }
                *m
            })
        });
        entered.wait();
        assert_eq!(slot.replace("new", 2), 1);
        proceed.wait();
        assert_eq!(t.join().unwrap(), Ok("new"));
        assert_eq!(slot.retries(), 1);
        // The old handle is stale: error + alarm, never old code.
        let e = handle.call(|m| *m).unwrap_err();
        assert!(
            matches!(
                e,
                CallError::Stale {
                    version: 1,
                    current: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(slot.stale_calls(), 1);
        assert_eq!(alarms.lock().unwrap().len(), 1);
        assert_eq!(slot.handle().call(|m| *m), Ok("new"));
    }

    #[test]
    fn a_decision_overtaken_by_a_swap_is_made_again_by_the_new_module() {
        let slot = Slot::new("policy", "old", 1, Box::new(|_| {}));
        let mut calls = Vec::new();
        let (m, r) = slot
            .decide(|m| {
                calls.push(*m);
                if *m == "old" {
                    // A swap lands while this decision is inside the old module.
                    assert_eq!(slot.inflight(), 1);
                    slot.replace("new", 2);
                }
                m.len()
            })
            .unwrap();
        assert_eq!(calls, ["old", "new"], "retried once, in the new module");
        assert_eq!((*m, r), ("new", 3));
        assert_eq!(slot.retries(), 1);
        assert_eq!(slot.inflight(), 0);
        // The old version stays allocated; a peek sees the new one, no lock taken.
        assert_eq!(*slot.peek(), "new");
        assert_eq!(slot.version(), 2);
    }
}
