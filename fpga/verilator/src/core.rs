//! The device core's shared library: `core::verilog` of the parameters, verilated
//! with `cpp/wrapper.cpp` (a small C ABI), loaded with libloading and kept for the
//! life of the process (one per parameter set).

use crate::build::{self, BuildOptions, Sources};
use crate::Error;
use hilrig_fpga::core::CoreParams;
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// The C++ wrapper compiled into every core library.
pub const WRAPPER: &str = concat!(
    include_str!("../cpp/common.inc"),
    include_str!("../cpp/wrapper.cpp")
);
/// Verilator configuration: the nonvolatile RAMs made public (read/write).
pub const MEMS_VLT: &str = include_str!("../cpp/mems.vlt");
/// The ABI version `hv_abi_version` must return.
pub const ABI_VERSION: u32 = 2;

/// Ports of the core, by the numbers of `cpp/wrapper.cpp`.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Port {
    Reset = 0,
    Strobe,
    Addr,
    We,
    Wdata,
    Be,
    RomSel,
    PersistAck,
    PersistNak,
    NvLoad,
    NvCtr0LoIn,
    NvCtr0HiIn,
    NvCtr1LoIn,
    NvCtr1HiIn,
    NvCtr2LoIn,
    NvCtr2HiIn,
    NvCnt0In,
    NvCnt1In,
    NvCnt2In,
    NvMasterIn,
    NvFuseIn,
    NvEpochIn,
    OobRxData,
    OobRxValid,
    OobRxEnd,
    OobTxReady,
    OobUart,
    UartRx,
    Ready = 64,
    Ack,
    Rdata,
    Busy,
    PersistReq,
    NvCtr0Lo,
    NvCtr0Hi,
    NvCtr1Lo,
    NvCtr1Hi,
    NvCtr2Lo,
    NvCtr2Hi,
    NvMaster,
    NvFuse,
    NvEpoch,
    HungOut,
    OobTxData,
    OobTxValid,
    UartTx,
}

/// The word RAMs holding nonvolatile state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Mem {
    /// Flash region 0 (VBIOS).
    Flash0 = 0,
    /// Flash region 1 (FIRMWARE).
    Flash1 = 1,
    /// Flash region 2 (CONFIG).
    Flash2 = 2,
    /// DEVICE_KEY.
    Keys = 3,
    /// The OOB reset key.
    ResetKey = 4,
}

pub(crate) type Handle = *mut c_void;

/// The functions of one loaded library.
#[derive(Clone, Copy)]
struct Api {
    new: unsafe extern "C" fn() -> Handle,
    free: unsafe extern "C" fn(Handle),
    set: unsafe extern "C" fn(Handle, u32, u64) -> u32,
    get: unsafe extern "C" fn(Handle, u32) -> u64,
    eval: unsafe extern "C" fn(Handle),
    tick: unsafe extern "C" fn(Handle, u64),
    run: unsafe extern "C" fn(Handle, u64, *mut u64) -> u32,
    access: unsafe extern "C" fn(Handle, u32, u32, u32, u32, u32, *mut u32) -> u32,
    mem: MemFn,
    trace_start: unsafe extern "C" fn(Handle, *const std::ffi::c_char, u64) -> u32,
    trace_flush: unsafe extern "C" fn(Handle),
}

/// A loaded core library.
pub struct CoreLib {
    api: Api,
    path: PathBuf,
    fresh: bool,
    // Declared last: dropped after everything that uses its functions.
    _lib: libloading::Library,
}

impl std::fmt::Debug for CoreLib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreLib").field("path", &self.path).finish()
    }
}

/// The sources of the core library for `p`.
pub fn sources(p: CoreParams) -> Sources<'static> {
    sources_with(p, false)
}

/// The sources of the core library for `p`, with VCD tracing if `trace`.
pub fn sources_with(p: CoreParams, trace: bool) -> Sources<'static> {
    Sources {
        what: if trace {
            "device core (trace build)"
        } else {
            "device core"
        },
        verilog: vec![("device_core.v", hilrig_fpga::core::verilog(p))],
        config: vec![("mems.vlt", MEMS_VLT)],
        cpp: vec![("wrapper.cpp", WRAPPER)],
        shared: true,
        args: if trace {
            vec!["--trace", "-CFLAGS", "-DHV_TRACE"]
        } else {
            vec![]
        },
    }
}

// `CoreParams` is not `Hash`: keyed by its debug form (every field, in order).
type Key = (String, BuildOptions);

fn loaded() -> &'static Mutex<HashMap<Key, Arc<CoreLib>>> {
    static L: OnceLock<Mutex<HashMap<Key, Arc<CoreLib>>>> = OnceLock::new();
    L.get_or_init(Default::default)
}

impl CoreLib {
    /// The library of the core elaborated for `p`: loaded already in this process,
    /// or from the cache, or built (see [`build::build`]). A cached library that does
    /// not load or is of another ABI is rebuilt once.
    pub fn get(p: CoreParams, opts: &BuildOptions) -> Result<Arc<CoreLib>, Error> {
        let key = (format!("{p:?}"), opts.clone());
        // Held while building: one build per process at a time (the machine is small).
        let mut map = loaded().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = map.get(&key) {
            return Ok(l.clone());
        }
        let src = sources_with(p, opts.trace);
        let lib = build_and_load(&src, opts, CoreLib::load)?;
        let lib = Arc::new(lib);
        map.insert(key, lib.clone());
        Ok(lib)
    }

    /// Load the library at `path` and check its ABI.
    pub fn load(path: &Path, fresh: bool) -> Result<CoreLib, Error> {
        let fail = |detail: String| Error::Load {
            path: path.to_path_buf(),
            detail,
        };
        let lib = open_checked(path, b"hv_abi_version\0", ABI_VERSION)?;
        macro_rules! sym {
            ($name:literal, $t:ty) => {{
                // SAFETY: the symbol's type is the one `cpp/wrapper.cpp` declares for
                // this ABI version (checked by `open_checked`).
                let s: libloading::Symbol<'_, $t> =
                    unsafe { lib.get($name) }.map_err(|e| fail(e.to_string()))?;
                *s
            }};
        }
        let api = Api {
            new: sym!(b"hv_new\0", unsafe extern "C" fn() -> Handle),
            free: sym!(b"hv_free\0", unsafe extern "C" fn(Handle)),
            set: sym!(b"hv_set\0", unsafe extern "C" fn(Handle, u32, u64) -> u32),
            get: sym!(b"hv_get\0", unsafe extern "C" fn(Handle, u32) -> u64),
            eval: sym!(b"hv_eval\0", unsafe extern "C" fn(Handle)),
            tick: sym!(b"hv_tick\0", unsafe extern "C" fn(Handle, u64)),
            run: sym!(
                b"hv_run_until_ready\0",
                unsafe extern "C" fn(Handle, u64, *mut u64) -> u32
            ),
            access: sym!(
                b"hv_access\0",
                unsafe extern "C" fn(Handle, u32, u32, u32, u32, u32, *mut u32) -> u32
            ),
            mem: sym!(
                b"hv_mem\0",
                unsafe extern "C" fn(Handle, u32, u32, *mut u32, u64) -> i64
            ),
            trace_start: sym!(
                b"hv_trace_start\0",
                unsafe extern "C" fn(Handle, *const std::ffi::c_char, u64) -> u32
            ),
            trace_flush: sym!(b"hv_trace_flush\0", unsafe extern "C" fn(Handle)),
        };
        Ok(CoreLib {
            api,
            path: path.to_path_buf(),
            fresh,
            _lib: lib,
        })
    }

    /// The library file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it was built by this process (false: from the cache).
    pub fn fresh(&self) -> bool {
        self.fresh
    }
}

/// A wrapper's RAM access function (`hv_mem`, `hb_mem`): copy words into (write
/// != 0) or out of a RAM; returns its size in words, or -1 for an unknown RAM.
pub(crate) type MemFn = unsafe extern "C" fn(Handle, u32, u32, *mut u32, u64) -> i64;

/// Words in RAM `which`.
///
/// # Safety
/// `h` is a live instance of the library `mem` belongs to.
pub(crate) unsafe fn mem_words(mem: MemFn, h: Handle, which: u32) -> usize {
    // SAFETY: per the caller; a null buffer asks for the size only.
    let n = unsafe { mem(h, which, 0, std::ptr::null_mut(), 0) };
    n.max(0) as usize
}

/// Load RAM `which` from little-endian bytes (a whole number of words; the rest of
/// the RAM keeps its contents).
///
/// # Safety
/// As [`mem_words`].
pub(crate) unsafe fn load_mem(mem: MemFn, h: Handle, which: u32, bytes: &[u8]) {
    let mut words: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    // SAFETY: per the caller; the wrapper copies at most `words.len()` words.
    unsafe { mem(h, which, 1, words.as_mut_ptr(), words.len() as u64) };
}

/// Build `src` (or take it from the cache) and load it with `load`; a cached
/// library that does not load or is of another ABI is discarded and rebuilt once.
pub(crate) fn build_and_load<T>(
    src: &Sources<'_>,
    opts: &BuildOptions,
    load: impl Fn(&Path, bool) -> Result<T, Error>,
) -> Result<T, Error> {
    let built = build::build(src, opts)?;
    match load(&built.path, built.fresh) {
        Ok(l) => Ok(l),
        Err(_) if !built.fresh => {
            // A stale or broken cache entry: rebuild it.
            if let Some(dir) = built.path.parent() {
                build::discard(dir)?;
            }
            let again = build::build(src, opts)?;
            load(&again.path, again.fresh)
        }
        Err(e) => Err(e),
    }
}

/// Open a library this crate built and check its ABI: `version` (a function of no
/// arguments returning u32) must return `expected`.
pub(crate) fn open_checked(
    path: &Path,
    version: &[u8],
    expected: u32,
) -> Result<libloading::Library, Error> {
    let fail = |detail: String| Error::Load {
        path: path.to_path_buf(),
        detail,
    };
    // SAFETY: the library is one this crate built from its own wrapper (checked by
    // its content hash); its initialisers are Verilator's and the wrapper's.
    // RTLD_LOCAL keeps its symbols from resolving another library's.
    let lib = unsafe {
        libloading::os::unix::Library::open(
            Some(path),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL,
        )
    }
    .map_err(|e| fail(e.to_string()))?;
    let lib: libloading::Library = lib.into();
    // SAFETY: every wrapper of this crate exports its version function as
    // `extern "C" fn() -> u32`.
    let f: libloading::Symbol<'_, unsafe extern "C" fn() -> u32> =
        unsafe { lib.get(version) }.map_err(|e| fail(e.to_string()))?;
    // SAFETY: a function of no arguments returning u32.
    let v = unsafe { f() };
    if v != expected {
        return Err(fail(format!(
            "ABI version {v}, this backend speaks {expected}"
        )));
    }
    Ok(lib)
}

/// Outcome of [`Core::run_until_ready`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStop {
    /// The core is ready for an access.
    Ready,
    /// The core asks for its nonvolatile state to be saved.
    PersistReq,
    /// Neither within the cycle budget.
    Budget,
}

/// Outcome of [`Core::access`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessStop {
    /// Done; the read data.
    Done(u32),
    /// The core was not ready: nothing happened.
    NotReady,
    /// The core did not acknowledge the strobe.
    NoAck,
}

/// One instance of the verilated core (its own `VerilatedContext`).
pub struct Core {
    lib: Arc<CoreLib>,
    h: std::ptr::NonNull<c_void>,
}

// SAFETY: the instance is owned by this value alone and used through `&mut self`
// (or `&self` for reads of its outputs); a Verilator model with its own context
// and no threads of its own may move between threads.
unsafe impl Send for Core {}

impl Core {
    /// A new instance: RAMs and registers at their initial values, clock low.
    pub fn new(lib: Arc<CoreLib>) -> Result<Core, Error> {
        // SAFETY: hv_new takes nothing; it returns null only when allocation failed.
        let h = unsafe { (lib.api.new)() };
        let h = std::ptr::NonNull::new(h).ok_or(Error::Create)?;
        Ok(Core { lib, h })
    }

    /// The library this instance runs.
    pub fn lib(&self) -> &Arc<CoreLib> {
        &self.lib
    }

    /// Set an input port (truncated to its width).
    #[inline]
    pub fn set(&mut self, p: Port, v: u64) {
        // SAFETY: `h` came from hv_new of this library and is live; unknown ports are
        // refused by the wrapper (not reachable: `Port` lists the wrapper's).
        unsafe { (self.lib.api.set)(self.h.as_ptr(), p as u32, v) };
    }

    /// Read a port.
    #[inline]
    pub fn get(&self, p: Port) -> u64 {
        // SAFETY: as in `set`; hv_get only reads.
        unsafe { (self.lib.api.get)(self.h.as_ptr(), p as u32) }
    }

    /// Read a one-bit port.
    #[inline]
    pub fn bit(&self, p: Port) -> bool {
        self.get(p) & 1 != 0
    }

    /// Settle the logic after inputs moved.
    pub fn eval(&mut self) {
        // SAFETY: as in `set`.
        unsafe { (self.lib.api.eval)(self.h.as_ptr()) }
    }

    /// `n` clock cycles.
    #[inline]
    pub fn tick(&mut self, n: u64) {
        // SAFETY: as in `set`.
        unsafe { (self.lib.api.tick)(self.h.as_ptr(), n) }
    }

    /// Run until ready or a persist request, at most `max` cycles; returns why it
    /// stopped and the cycles run.
    #[inline]
    pub fn run_until_ready(&mut self, max: u64) -> (RunStop, u64) {
        let mut ran = 0u64;
        // SAFETY: as in `set`; `ran` is a valid u64 for the call.
        let r = unsafe { (self.lib.api.run)(self.h.as_ptr(), max, &mut ran) };
        let stop = match r {
            0 => RunStop::Ready,
            1 => RunStop::PersistReq,
            _ => RunStop::Budget,
        };
        (stop, ran)
    }

    /// One bus access (two cycles unless `NotReady`).
    #[inline]
    pub fn access(&mut self, rom: bool, addr: u32, we: bool, wdata: u32, be: u8) -> AccessStop {
        let mut v = 0u32;
        // SAFETY: as in `set`; `v` is a valid u32 for the call.
        let r = unsafe {
            (self.lib.api.access)(
                self.h.as_ptr(),
                rom as u32,
                addr,
                we as u32,
                wdata,
                be as u32,
                &mut v,
            )
        };
        match r {
            0 => AccessStop::Done(v),
            1 => AccessStop::NotReady,
            _ => AccessStop::NoAck,
        }
    }

    /// Record a VCD of the last `window` to `2 x window` cycles: the current window
    /// in `path`, the one before in `path` + `.prev.vcd`. Returns false if this is
    /// not a trace build or the file could not be opened.
    pub fn trace_start(&mut self, path: &Path, window: u64) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: as in `set`; `c` is a NUL-terminated string live for the call
        // (the wrapper copies it).
        unsafe { (self.lib.api.trace_start)(self.h.as_ptr(), c.as_ptr(), window) == 0 }
    }

    /// Write out the buffered trace.
    pub fn trace_flush(&mut self) {
        // SAFETY: as in `set`.
        unsafe { (self.lib.api.trace_flush)(self.h.as_ptr()) }
    }

    /// Words in RAM `m`.
    pub fn mem_words(&self, m: Mem) -> usize {
        // SAFETY: `h` is live and came from this library's hv_new.
        unsafe { mem_words(self.lib.api.mem, self.h.as_ptr(), m as u32) }
    }

    /// Load RAM `m` from little-endian bytes (a whole number of words; the rest of
    /// the RAM keeps its contents).
    pub fn load_mem(&mut self, m: Mem, bytes: &[u8]) {
        // SAFETY: as in `mem_words`.
        unsafe { load_mem(self.lib.api.mem, self.h.as_ptr(), m as u32, bytes) }
    }

    /// Copy RAM `m` as little-endian bytes into `out` (as many words as both hold).
    pub fn copy_mem(&self, m: Mem, out: &mut [u8]) {
        let mut words = vec![0u32; out.len() / 4];
        // SAFETY: as in `set`; the wrapper copies at most `words.len()` words.
        unsafe {
            (self.lib.api.mem)(
                self.h.as_ptr(),
                m as u32,
                0,
                words.as_mut_ptr(),
                words.len() as u64,
            )
        };
        for (w, c) in words.iter().zip(out.chunks_exact_mut(4)) {
            c.copy_from_slice(&w.to_le_bytes());
        }
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        // SAFETY: `h` came from hv_new of this library, which `self.lib` keeps loaded,
        // and is freed once.
        unsafe { (self.lib.api.free)(self.h.as_ptr()) }
    }
}
