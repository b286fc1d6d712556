//! The `verilator` backend: the generated Verilog of the device core, compiled with
//! Verilator, driven exactly as the `rtl` backend drives the rust-hdl core.

use crate::build::BuildOptions;
use crate::core::{AccessStop, Core, CoreLib, Mem, Port, RunStop};
use crate::Error;
use hilrig_device::device::{Device, DeviceError, ResetKind};
use hilrig_device::regmap::{Region, BAR0_SIZE};
use hilrig_device::state::{NvState, StateError};
use hilrig_fpga::core::{CoreParams, OOB_DIVISOR};
use hilrig_fpga::uartsim::{LineDriver, SoftRx};
use std::path::{Path, PathBuf};

/// Cycles an OOB exchange may take once the request is in (as `Rtl`).
const MAX_OOB_CYCLES: u64 = 2_000_000;

/// Cycles a single access may take before the backend gives up (as `Rtl`).
const MAX_CYCLES_PER_ACCESS: u64 = 50_000_000;

/// The Verilator backend.
pub struct Verilator {
    core: Core,
    /// Geometry, serial and keys, and a cache of the rest (as `Rtl`).
    nv: NvState,
    store: Option<PathBuf>,
    cycles: u64,
    saves: u64,
    oob_divisor: u16,
    /// Where the VCD windows go while tracing (see `trace_vcd`).
    trace: Option<tempfile::TempDir>,
}

fn transport(detail: String) -> DeviceError {
    DeviceError::Transport {
        what: "verilator simulation".into(),
        detail,
    }
}

impl std::fmt::Debug for Verilator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verilator")
            .field("lib", &self.core.lib().path())
            .field("store", &self.store)
            .field("cycles", &self.cycles)
            .finish()
    }
}

impl Verilator {
    /// A device of `nv` kept in memory only (no state file), built with the default
    /// [`BuildOptions`].
    pub fn new(nv: NvState) -> Result<Verilator, Error> {
        Verilator::with_options(nv, OOB_DIVISOR, &BuildOptions::default())
    }

    /// A device of `nv` whose OOB UART sends a bit every `divisor` cycles, built
    /// with `opts` (the verilator program, the cache directory).
    pub fn with_options(
        nv: NvState,
        divisor: u16,
        opts: &BuildOptions,
    ) -> Result<Verilator, Error> {
        nv.config
            .validate()
            .map_err(|e| DeviceError::State(StateError::InvalidConfig(e)))?;
        let params = CoreParams {
            oob_divisor: divisor,
            ..CoreParams::of(&nv)
        };
        let lib = CoreLib::get(params, opts)?;
        let mut core = Core::new(lib)?;
        // The initial blocks have run (RAMs zeroed): load the configured RAMs.
        core.load_mem(Mem::Flash0, &nv.flash[0]);
        core.load_mem(Mem::Flash1, &nv.flash[1]);
        core.load_mem(Mem::Flash2, &nv.flash[2]);
        core.load_mem(Mem::Keys, &nv.device_key);
        core.load_mem(Mem::ResetKey, &nv.reset_key);
        // The OOB UART line idles high; responses go to the byte interface.
        core.set(Port::UartRx, 1);
        core.set(Port::OobTxReady, 1);
        core.eval();
        let mut v = Verilator {
            core,
            nv,
            store: None,
            cycles: 0,
            saves: 0,
            oob_divisor: divisor,
            trace: None,
        };
        let nv = v.nv.clone();
        v.load_nv(&nv);
        Ok(v)
    }

    /// Open the device whose nonvolatile state is in `path` (the same state-file
    /// format as the model and `rtl`). A bad file is refused and left untouched.
    pub fn open(path: &Path) -> Result<Verilator, Error> {
        Verilator::open_with(path, &BuildOptions::default())
    }

    /// [`Verilator::open`] built with `opts`.
    pub fn open_with(path: &Path, opts: &BuildOptions) -> Result<Verilator, Error> {
        let nv = NvState::load(path).map_err(DeviceError::from)?;
        let mut v = Verilator::with_options(nv, OOB_DIVISOR, opts)?;
        v.store = Some(path.to_path_buf());
        Ok(v)
    }

    /// Create a new state file at `path` holding `nv` and open it. Refuses to replace
    /// an existing file.
    pub fn create(path: &Path, nv: NvState) -> Result<Verilator, Error> {
        hilrig_device::state::refuse_existing(path).map_err(DeviceError::from)?;
        let mut v = Verilator::new(nv)?;
        v.store = Some(path.to_path_buf());
        v.persist()?;
        Ok(v)
    }

    /// Clock cycles simulated so far.
    pub fn cycles(&self) -> u64 {
        self.cycles
    }

    /// State-file saves so far.
    pub fn saves(&self) -> u64 {
        self.saves
    }

    /// The state file, if any.
    pub fn store(&self) -> Option<&Path> {
        self.store.as_deref()
    }

    /// The loaded library (its path; whether this process built it).
    pub fn lib(&self) -> &CoreLib {
        self.core.lib()
    }

    /// Whether the device is wedged by the hang magic.
    pub fn is_hung(&self) -> bool {
        self.core.bit(Port::HungOut)
    }

    /// The nonvolatile state, read back from the core's outputs and RAMs.
    pub fn nv(&self) -> NvState {
        let c = &self.core;
        let mut nv = self.nv.clone();
        let join = |lo: Port, hi: Port| (c.get(hi) << 32) | (c.get(lo) & 0xffff_ffff);
        nv.counters = [
            join(Port::NvCtr0Lo, Port::NvCtr0Hi),
            join(Port::NvCtr1Lo, Port::NvCtr1Hi),
            join(Port::NvCtr2Lo, Port::NvCtr2Hi),
        ];
        nv.master = c.get(Port::NvMaster) as u32;
        nv.fuse = c.bit(Port::NvFuse);
        nv.epoch = c.get(Port::NvEpoch) as u32;
        c.copy_mem(Mem::Flash0, &mut nv.flash[0]);
        c.copy_mem(Mem::Flash1, &mut nv.flash[1]);
        c.copy_mem(Mem::Flash2, &mut nv.flash[2]);
        nv
    }

    /// Record the last `window` to `2 x window` cycles as VCD (see `write_vcd`).
    /// Needs a trace build (`BuildOptions { trace: true, .. }`), else
    /// `Error::NoTrace`.
    pub fn trace_vcd(&mut self, window: u64) -> Result<(), Error> {
        let dir = tempfile::Builder::new()
            .prefix("hilrig-verilator-vcd-")
            .tempdir()
            .map_err(|source| Error::Cache {
                path: std::env::temp_dir(),
                source,
            })?;
        if !self
            .core
            .trace_start(&dir.path().join("trace.vcd"), window.max(1))
        {
            return Err(Error::NoTrace);
        }
        self.trace = Some(dir);
        Ok(())
    }

    /// Write the recorded cycles: the current window to `path` and, if there is one,
    /// the window before it to `path` with `.prev.vcd` appended. Returns the files
    /// written (none if tracing is off).
    pub fn write_vcd(&mut self, path: &Path) -> std::io::Result<Vec<PathBuf>> {
        let Some(dir) = &self.trace else {
            return Ok(Vec::new());
        };
        self.core.trace_flush();
        let cur = dir.path().join("trace.vcd");
        let mut prev_src = cur.as_os_str().to_owned();
        prev_src.push(".prev.vcd");
        let mut out = Vec::new();
        hilrig_device::state::write_atomic(path, &std::fs::read(&cur)?)?;
        out.push(path.to_path_buf());
        if let Ok(bytes) = std::fs::read(PathBuf::from(prev_src)) {
            let mut p = path.as_os_str().to_owned();
            p.push(".prev.vcd");
            let p = PathBuf::from(p);
            hilrig_device::state::write_atomic(&p, &bytes)?;
            out.push(p);
        }
        Ok(out)
    }

    /// One clock cycle (inputs settle before the rising edge).
    #[inline]
    pub fn tick(&mut self) {
        self.core.tick(1);
        self.cycles += 1;
    }

    /// `n` clock cycles in one call.
    pub fn ticks(&mut self, n: u64) {
        self.core.tick(n);
        self.cycles += n;
    }

    /// Load the nonvolatile registers from `nv` (counters, MASTER, fuse, EPOCH).
    fn load_nv(&mut self, nv: &NvState) {
        let c = &mut self.core;
        let lo = |v: u64| v & 0xffff_ffff;
        let hi = |v: u64| v >> 32;
        c.set(Port::NvCtr0LoIn, lo(nv.counters[0]));
        c.set(Port::NvCtr0HiIn, hi(nv.counters[0]));
        c.set(Port::NvCtr1LoIn, lo(nv.counters[1]));
        c.set(Port::NvCtr1HiIn, hi(nv.counters[1]));
        c.set(Port::NvCtr2LoIn, lo(nv.counters[2]));
        c.set(Port::NvCtr2HiIn, hi(nv.counters[2]));
        let cnt = nv.counter_values();
        c.set(Port::NvCnt0In, cnt[0] as u64);
        c.set(Port::NvCnt1In, cnt[1] as u64);
        c.set(Port::NvCnt2In, cnt[2] as u64);
        c.set(Port::NvMasterIn, nv.master as u64);
        c.set(Port::NvFuseIn, nv.fuse as u64);
        c.set(Port::NvEpochIn, nv.epoch as u64);
        c.set(Port::NvLoad, 1);
        self.tick();
        self.core.set(Port::NvLoad, 0);
        self.core.eval();
    }

    fn persist(&mut self) -> Result<(), DeviceError> {
        if self.store.is_some() && hilrig_device::state::persist(&self.nv(), self.store.as_deref())?
        {
            self.saves += 1;
        }
        Ok(())
    }

    /// Serve a persist request: save, answer `persist_ack` (or `persist_nak` when
    /// saving failed) for one cycle.
    fn serve_persist(&mut self) -> Result<(), DeviceError> {
        let r = self.persist();
        let port = if r.is_ok() {
            Port::PersistAck
        } else {
            Port::PersistNak
        };
        self.core.set(port, 1);
        self.tick();
        self.core.set(port, 0);
        self.core.eval();
        r
    }

    /// Run until the core is ready for an access, serving persist requests.
    fn run_until_ready(&mut self) -> Result<(), DeviceError> {
        let mut budget = MAX_CYCLES_PER_ACCESS + 1;
        loop {
            let (stop, ran) = self.core.run_until_ready(budget);
            self.cycles += ran;
            budget = budget.saturating_sub(ran);
            match stop {
                RunStop::Ready => return Ok(()),
                RunStop::PersistReq => self.serve_persist()?,
                RunStop::Budget => {
                    return Err(transport(format!(
                        "the core did not become ready within {MAX_CYCLES_PER_ACCESS} cycles"
                    )))
                }
            }
        }
    }

    /// One bus access: returns the read data (0 for writes).
    fn access(
        &mut self,
        rom: bool,
        addr: u32,
        we: bool,
        wdata: u32,
        be: u8,
    ) -> Result<u32, DeviceError> {
        loop {
            match self.core.access(rom, addr, we, wdata, be) {
                AccessStop::Done(v) => {
                    self.cycles += 2;
                    if !self.core.bit(Port::Ready) {
                        self.run_until_ready()?;
                    }
                    return Ok(v);
                }
                AccessStop::NotReady => self.run_until_ready()?,
                AccessStop::NoAck => {
                    self.cycles += 2;
                    return Err(transport(format!("no ack for the access at {addr:#x}")));
                }
            }
        }
    }
}

impl Device for Verilator {
    fn read_word(&mut self, word: u32, mask: u8) -> Result<u32, DeviceError> {
        debug_assert!((word as u64) < BAR0_SIZE && word % 4 == 0);
        self.access(false, word, false, 0, mask)
    }

    fn write_word(&mut self, word: u32, value: u32, mask: u8) -> Result<(), DeviceError> {
        debug_assert!((word as u64) < BAR0_SIZE && word % 4 == 0);
        self.access(false, word, true, value, mask).map(|_| ())
    }

    fn rom_size(&self) -> u64 {
        self.nv.config.region_size(Region::Vbios) as u64
    }

    fn rom_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        let size = self.rom_size();
        hilrig_device::device::rom_read_by_words(offset, data, size, |w| {
            self.access(true, w as u32, false, 0, 0xf)
        })
    }

    fn reset(&mut self, _kind: ResetKind) -> Result<(), DeviceError> {
        // As `Rtl`: reset, FLR and power cycle clear volatile state; nonvolatile
        // registers and RAMs are kept, and are already durable.
        self.run_until_ready()?;
        self.core.set(Port::Reset, 1);
        self.tick();
        self.core.set(Port::Reset, 0);
        self.tick();
        self.run_until_ready()
    }

    /// Served by the verilated OOB engine through the core's OOB byte interface
    /// (as `Rtl::oob`).
    fn oob(&mut self, request: &[u8]) -> Result<Vec<u8>, DeviceError> {
        self.run_until_ready()?;
        self.oob_bytes(request)
    }
}

impl hilrig_fpga::Side for Verilator {
    fn label(&self) -> &'static str {
        "verilator"
    }
    fn nv_state(&self) -> NvState {
        self.nv()
    }
    fn sim_cycles(&self) -> Option<u64> {
        Some(self.cycles)
    }
    fn start_trace(&mut self, window: u64) -> bool {
        self.trace_vcd(window).is_ok()
    }
    fn write_trace(&mut self, path: &Path) -> std::io::Result<Vec<PathBuf>> {
        self.write_vcd(path)
    }
}

impl Verilator {
    /// One OOB exchange through the core's OOB byte interface: the request bytes
    /// (one every other cycle), the end of the request, then the response bytes as
    /// the engine sends them (as `Rtl::oob_rtl`).
    pub fn oob_bytes(&mut self, request: &[u8]) -> Result<Vec<u8>, DeviceError> {
        self.oob_with_host_resets(request, &[])
    }

    /// [`Verilator::oob_bytes`] with host resets pulsed `reset_at` cycles after the
    /// request is in (as `Rtl::oob_rtl_with_host_resets`).
    pub fn oob_with_host_resets(
        &mut self,
        request: &[u8],
        reset_at: &[u64],
    ) -> Result<Vec<u8>, DeviceError> {
        let r = self.oob_exchange(request, reset_at);
        if self.core.bit(Port::Reset) {
            self.core.set(Port::Reset, 0);
            self.core.eval();
        }
        r
    }

    fn oob_exchange(&mut self, request: &[u8], reset_at: &[u64]) -> Result<Vec<u8>, DeviceError> {
        for &b in request {
            self.core.set(Port::OobRxData, b as u64);
            self.core.set(Port::OobRxValid, 1);
            self.tick();
            self.core.set(Port::OobRxValid, 0);
            self.tick();
        }
        self.core.set(Port::OobRxEnd, 1);
        self.tick();
        self.core.set(Port::OobRxEnd, 0);
        self.core.eval();
        let start = self.cycles;
        let mut out = Vec::new();
        loop {
            if self.core.bit(Port::PersistReq) {
                // PHYSICAL_RESET: a failed save is answered by the engine (an
                // Internal error frame), not by the backend.
                let _ = self.serve_persist();
                continue;
            }
            if self.core.bit(Port::OobTxValid) {
                out.push(self.core.get(Port::OobTxData) as u8);
            }
            let pulse = reset_at.contains(&(self.cycles - start));
            if pulse != self.core.bit(Port::Reset) {
                self.core.set(Port::Reset, pulse as u64);
                self.core.eval();
            }
            self.tick();
            if out.len() >= 2 && out.len() == out[1] as usize + hilrig_device::oob::OVERHEAD {
                return Ok(out);
            }
            if self.cycles - start > MAX_OOB_CYCLES {
                return Err(transport(format!(
                    "no complete OOB response within {MAX_OOB_CYCLES} cycles (got {})",
                    hilrig_device::oob::hex_string(&out)
                )));
            }
        }
    }

    /// One OOB exchange end to end through the core's UART at its divisor (as
    /// `Rtl::oob_uart`).
    pub fn oob_uart(&mut self, request: &[u8]) -> Result<Vec<u8>, DeviceError> {
        self.run_until_ready()?;
        let d = self.oob_divisor as u64;
        self.core.set(Port::OobUart, 1);
        let mut rx = SoftRx::new(self.oob_divisor);
        let mut line = LineDriver::new(self.oob_divisor);
        line.push(request);
        let fail = |detail: String| DeviceError::Transport {
            what: "verilator simulation (OOB UART)".into(),
            detail,
        };
        while !line.is_idle() {
            self.core.set(Port::UartRx, line.level() as u64);
            self.tick();
            rx.sample(self.core.bit(Port::UartTx));
            line.advance();
        }
        self.core.set(Port::UartRx, 1);
        self.core.eval();
        let start = self.cycles;
        let budget = MAX_OOB_CYCLES + 1000 * d;
        let mut out = Vec::new();
        let result = loop {
            if rx.framing_errors() > 0 {
                break Err(fail(format!(
                    "framing error after {} bytes",
                    out.len() + rx.take().len()
                )));
            }
            out.extend(rx.take());
            if out.len() >= 2 && out.len() == out[1] as usize + hilrig_device::oob::OVERHEAD {
                break Ok(out);
            }
            if self.cycles - start > budget {
                break Err(fail(format!(
                    "no complete response within {budget} cycles (got {})",
                    hilrig_device::oob::hex_string(&out)
                )));
            }
            if self.core.bit(Port::PersistReq) {
                let _ = self.serve_persist();
            } else {
                self.tick();
            }
            rx.sample(self.core.bit(Port::UartTx));
        };
        for _ in 0..d {
            self.tick();
        }
        self.core.set(Port::OobUart, 0);
        self.core.eval();
        result
    }
}
