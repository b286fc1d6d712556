//! The board top verilated: the Verilog that goes on the FPGA (`board_top_verilog`:
//! device core + host bridge + OOB UART + LEDs + power-on reset), compiled with
//! `cpp/board.cpp` (a small C ABI) and driven pin by pin as a
//! [`hilrig_board::BoardCircuit`]. A [`hilrig_board::SimBoard`] on it is the `fpga`
//! path in simulation with the very Verilog the board gets: `hilrig fpga serve-sim
//! --engine verilator` serves it on two PTYs.

use crate::build::{BuildOptions, Sources};
use crate::core::{build_and_load, load_mem, mem_words, open_checked, Handle, MemFn};
use crate::Error;
use hilrig_board::{BoardCircuit, BoardParams, SimBoard};
use hilrig_device::state::NvState;
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// The C++ wrapper compiled into every board library.
pub const BOARD_WRAPPER: &str = concat!(
    include_str!("../cpp/common.inc"),
    include_str!("../cpp/board.cpp")
);
/// Verilator configuration: the status signals made public (read only).
pub const BOARD_VLT: &str = include_str!("../cpp/board.vlt");
/// The ABI version `hb_abi_version` must return.
pub const BOARD_ABI_VERSION: u32 = 1;

/// The sources of the board library for `p`.
pub fn board_sources(p: BoardParams) -> Sources<'static> {
    Sources {
        what: "board top",
        verilog: vec![("board_top.v", hilrig_board::board_top_verilog(p))],
        config: vec![("board.vlt", BOARD_VLT)],
        cpp: vec![("board.cpp", BOARD_WRAPPER)],
        shared: true,
        args: vec![],
    }
}

#[derive(Clone, Copy)]
struct BoardApi {
    new: unsafe extern "C" fn() -> Handle,
    free: unsafe extern "C" fn(Handle),
    outputs: unsafe extern "C" fn(Handle) -> u32,
    cycle: unsafe extern "C" fn(Handle, u32) -> u32,
    mem: MemFn,
}

/// A loaded board library (one per parameter set per process).
pub struct BoardLib {
    api: BoardApi,
    path: PathBuf,
    // Declared last: dropped after everything that uses its functions.
    _lib: libloading::Library,
}

impl std::fmt::Debug for BoardLib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoardLib")
            .field("path", &self.path)
            .finish()
    }
}

type Key = (String, BuildOptions);

fn loaded() -> &'static Mutex<HashMap<Key, Arc<BoardLib>>> {
    static L: OnceLock<Mutex<HashMap<Key, Arc<BoardLib>>>> = OnceLock::new();
    L.get_or_init(Default::default)
}

impl BoardLib {
    /// The library of the board top elaborated for `p`: loaded already in this
    /// process, or from the cache, or built.
    pub fn get(p: BoardParams, opts: &BuildOptions) -> Result<Arc<BoardLib>, Error> {
        if opts.trace {
            return Err(Error::NoTrace);
        }
        let key = (format!("{p:?}"), opts.clone());
        let mut map = loaded().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = map.get(&key) {
            return Ok(l.clone());
        }
        let lib = Arc::new(build_and_load(&board_sources(p), opts, |path, _| {
            BoardLib::load(path)
        })?);
        map.insert(key, lib.clone());
        Ok(lib)
    }

    /// Load the library at `path` and check its ABI.
    pub fn load(path: &Path) -> Result<BoardLib, Error> {
        let fail = |detail: String| Error::Load {
            path: path.to_path_buf(),
            detail,
        };
        let lib = open_checked(path, b"hb_abi_version\0", BOARD_ABI_VERSION)?;
        macro_rules! sym {
            ($name:literal, $t:ty) => {{
                // SAFETY: the symbol's type is the one `cpp/board.cpp` declares for
                // this ABI version (checked by `open_checked`).
                let s: libloading::Symbol<'_, $t> =
                    unsafe { lib.get($name) }.map_err(|e| fail(e.to_string()))?;
                *s
            }};
        }
        let api = BoardApi {
            new: sym!(b"hb_new\0", unsafe extern "C" fn() -> Handle),
            free: sym!(b"hb_free\0", unsafe extern "C" fn(Handle)),
            outputs: sym!(b"hb_outputs\0", unsafe extern "C" fn(Handle) -> u32),
            cycle: sym!(b"hb_cycle\0", unsafe extern "C" fn(Handle, u32) -> u32),
            mem: sym!(
                b"hb_mem\0",
                unsafe extern "C" fn(Handle, u32, u32, *mut u32, u64) -> i64
            ),
        };
        Ok(BoardLib {
            api,
            path: path.to_path_buf(),
            _lib: lib,
        })
    }

    /// The library file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Output bits of `hb_cycle` / `hb_outputs`.
const UART_TX: u32 = 1;
const OOB_TX: u32 = 1 << 1;
const LEDS_SHIFT: u32 = 8;
const BRIDGE_IDLE: u32 = 1 << 16;
const BRIDGE_RECEIVING: u32 = 1 << 17;
const CORE_BUSY: u32 = 1 << 18;

/// One instance of the verilated board top (its own `VerilatedContext`), a
/// [`BoardCircuit`].
pub struct VerilatedBoard {
    lib: Arc<BoardLib>,
    h: std::ptr::NonNull<c_void>,
    out: u32,
}

// SAFETY: the instance is owned by this value alone and used through `&mut self`
// (reads of its cached outputs through `&self`); a Verilator model with its own
// context and no threads of its own may move between threads.
unsafe impl Send for VerilatedBoard {}

impl VerilatedBoard {
    /// A factory-fresh board top for `params` (RAMs zero, as the bitstream of
    /// `board_top_verilog` configures them), built or taken from the cache.
    pub fn new(params: BoardParams, opts: &BuildOptions) -> Result<VerilatedBoard, Error> {
        let lib = BoardLib::get(params, opts)?;
        // SAFETY: hb_new takes nothing; it returns null only when allocation failed.
        let h = std::ptr::NonNull::new(unsafe { (lib.api.new)() }).ok_or(Error::Create)?;
        // SAFETY: `h` came from hb_new of this library.
        let out = unsafe { (lib.api.outputs)(h.as_ptr()) };
        Ok(VerilatedBoard { lib, h, out })
    }

    /// A board top whose bitstream holds `nv`'s flash contents, device key and OOB
    /// reset key. `params.core`'s geometry must match `nv`'s configuration.
    pub fn with_nv(
        params: BoardParams,
        nv: &NvState,
        opts: &BuildOptions,
    ) -> Result<VerilatedBoard, Error> {
        let mut b = VerilatedBoard::new(params, opts)?;
        let rams: [(u32, &str, &[u8]); 5] = [
            (0, "flash region 0", &nv.flash[0]),
            (1, "flash region 1", &nv.flash[1]),
            (2, "flash region 2", &nv.flash[2]),
            (3, "DEVICE_KEY", &nv.device_key),
            (4, "OOB reset key", &nv.reset_key),
        ];
        for (which, what, bytes) in rams {
            let words = b.mem_words(which);
            if bytes.len() != words * 4 {
                return Err(Error::Geometry {
                    what: what.to_string(),
                    board: words * 4,
                    state: bytes.len(),
                });
            }
            b.load_mem(which, bytes);
        }
        Ok(b)
    }

    fn mem_words(&self, which: u32) -> usize {
        // SAFETY: `h` is live and came from this library's hb_new.
        unsafe { mem_words(self.lib.api.mem, self.h.as_ptr(), which) }
    }

    fn load_mem(&mut self, which: u32, bytes: &[u8]) {
        // SAFETY: as in `mem_words`.
        unsafe { load_mem(self.lib.api.mem, self.h.as_ptr(), which, bytes) }
    }

    /// The loaded library.
    pub fn lib(&self) -> &Arc<BoardLib> {
        &self.lib
    }
}

impl BoardCircuit for VerilatedBoard {
    #[inline]
    fn cycle(&mut self, uart_rx: bool, oob_rx: bool) {
        let pins = uart_rx as u32 | (oob_rx as u32) << 1;
        // SAFETY: `h` came from hb_new of this library, which `self.lib` keeps loaded.
        self.out = unsafe { (self.lib.api.cycle)(self.h.as_ptr(), pins) };
    }
    fn uart_tx(&self) -> bool {
        self.out & UART_TX != 0
    }
    fn oob_tx(&self) -> bool {
        self.out & OOB_TX != 0
    }
    fn leds(&self) -> u8 {
        (self.out >> LEDS_SHIFT) as u8
    }
    fn bridge_idle(&self) -> bool {
        self.out & BRIDGE_IDLE != 0
    }
    fn bridge_receiving(&self) -> bool {
        self.out & BRIDGE_RECEIVING != 0
    }
    fn core_busy(&self) -> bool {
        self.out & CORE_BUSY != 0
    }
    fn engine(&self) -> &'static str {
        "verilator"
    }
}

impl Drop for VerilatedBoard {
    fn drop(&mut self) {
        // SAFETY: `h` came from hb_new of this library, which `self.lib` keeps loaded,
        // and is freed once.
        unsafe { (self.lib.api.free)(self.h.as_ptr()) }
    }
}

/// A simulated board on the verilated board top holding `nv` (see
/// [`VerilatedBoard::with_nv`]), through its power-on reset.
pub fn sim_board(
    params: BoardParams,
    nv: &NvState,
    opts: &BuildOptions,
) -> Result<SimBoard, Error> {
    let b = VerilatedBoard::with_nv(params, nv, opts)?;
    Ok(SimBoard::with_circuit(Box::new(b), params))
}
