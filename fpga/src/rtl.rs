//! The `rtl` backend: the rust-hdl device core simulated in-process, driven
//! directly (set inputs, settle, toggle the clock) — no `simple_sim!` threads.

use crate::core::{CoreParams, DeviceCore};
use crate::uartsim::{LineDriver, SoftRx};
use hilrig_device::device::{Device, DeviceError, ResetKind};
use hilrig_device::regmap::{Region, BAR0_SIZE, BUFFER_BASE, BUFFER_SIZE};
use hilrig_device::state::{NvState, StateError};
use rust_hdl::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Cycles an OOB exchange may take once the request is in (READ_HASH of the
/// largest region, 1 MiB, takes about 1.07M).
const MAX_OOB_CYCLES: u64 = 2_000_000;

/// Cycles a single access may take before the backend gives up (a hung state
/// machine would otherwise spin forever).
const MAX_CYCLES_PER_ACCESS: u64 = 50_000_000;

/// Run evaluation passes until nothing inside the core changed (its outputs are
/// read by this backend, not by the circuit); returns the passes run.
#[inline]
fn settle(c: &mut DeviceCore) -> u64 {
    let mut n = 0;
    loop {
        c.update_all();
        n += 1;
        if !c.changed_within() {
            return n;
        }
    }
}

/// A growable byte buffer shared with a VCD writer.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
    fn snapshot(&self) -> Vec<u8> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("VCD buffer poisoned"))?
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Records the last cycles as VCD: a window of `window` cycles, plus the one before.
struct Tracer {
    window: u64,
    start: u64,
    buf: SharedBuf,
    probe: Option<rust_hdl::core::vcd_probe::VCDProbe<SharedBuf>>,
    prev: Vec<u8>,
}

/// Simulated time of one clock period in the VCD (10 ns: 100 MHz).
const PERIOD_PS: u64 = 10_000;

impl Tracer {
    fn begin(&mut self, core: &DeviceCore, cycle: u64) {
        self.probe = None;
        self.prev = self.buf.take();
        let mut p = write_vcd_header(self.buf.clone(), core);
        let _ = p.timestamp(cycle * PERIOD_PS);
        self.probe = Some(write_vcd_dump(p, core));
        self.start = cycle;
    }
    fn sample(&mut self, core: &DeviceCore, ts: u64) {
        if let Some(mut p) = self.probe.take() {
            let _ = p.timestamp(ts);
            self.probe = Some(write_vcd_change(p, core));
        }
    }
}

/// The RTL backend.
pub struct Rtl {
    core: Box<DeviceCore>,
    /// The parts of the nonvolatile state that live outside the core's registers and
    /// RAMs (geometry, serial, keys), and a cache of the rest.
    nv: NvState,
    store: Option<PathBuf>,
    cycles: u64,
    passes: u64,
    saves: u64,
    inputs_dirty: bool,
    tracer: Option<Box<Tracer>>,
    oob_divisor: u16,
    /// The data buffers' file beside the state file while the device stays
    /// powered ([`Rtl::keep_buffers_beside_state`]): written through on every
    /// buffer write, cleared on every reset.
    kept: Option<hilrig_device::model::BufferMem>,
}

impl Rtl {
    /// An RTL device of `nv` kept in memory only (no state file).
    pub fn new(nv: NvState) -> Result<Rtl, DeviceError> {
        Rtl::with_oob_divisor(nv, crate::core::OOB_DIVISOR)
    }

    /// An RTL device of `nv` whose OOB UART sends a bit every `divisor` cycles
    /// (2 and up; see [`Rtl::oob_uart`]).
    pub fn with_oob_divisor(nv: NvState, divisor: u16) -> Result<Rtl, DeviceError> {
        nv.config
            .validate()
            .map_err(|e| DeviceError::State(StateError::InvalidConfig(e)))?;
        let params = CoreParams {
            oob_divisor: divisor,
            ..CoreParams::of(&nv)
        };
        let mut core = Box::new(DeviceCore::new(params));
        core.flash0.load_bytes(&nv.flash[0]);
        core.flash1.load_bytes(&nv.flash[1]);
        core.flash2.load_bytes(&nv.flash[2]);
        core.keys.load_bytes(&nv.device_key);
        core.oob.load_key(&nv.reset_key);
        core.connect_all();
        // The OOB UART line idles high; responses go to the byte interface.
        core.uart_rx.next = true;
        core.oob_tx_ready.next = true;
        let mut rtl = Rtl {
            core,
            nv,
            store: None,
            cycles: 0,
            passes: 0,
            saves: 0,
            inputs_dirty: true,
            tracer: None,
            oob_divisor: divisor,
            kept: None,
        };
        rtl.settle_inputs();
        let nv = rtl.nv.clone();
        rtl.load_nv(&nv);
        Ok(rtl)
    }

    /// Open the device whose nonvolatile state is in `path` (the same state-file
    /// format as the model). A bad file is refused and left untouched.
    pub fn open(path: &Path) -> Result<Rtl, DeviceError> {
        let nv = NvState::load(path)?;
        let mut r = Rtl::new(nv)?;
        r.store = Some(path.to_path_buf());
        Ok(r)
    }

    /// Create a new state file at `path` holding `nv` and open it. Refuses to replace
    /// an existing file.
    pub fn create(path: &Path, nv: NvState) -> Result<Rtl, DeviceError> {
        hilrig_device::state::refuse_existing(path)?;
        let mut r = Rtl::new(nv)?;
        r.store = Some(path.to_path_buf());
        r.persist()?;
        Ok(r)
    }

    /// Keep the data buffers in the file beside the state file
    /// ([`hilrig_device::model::buffers_path`], as the model does) as well as in the
    /// core's block RAM: the device stays powered between VMM processes, so the
    /// next process starts with what the last one left there unless teardown
    /// scrubbed it. The file's contents are loaded into the buffer RAM now; every
    /// buffer write is written through; a reset (the RAM's generation bump makes
    /// every word read 0) clears it; a power cycle or a new device removes it
    /// ([`hilrig_device::model::power_cycle_buffers`]).
    pub fn keep_buffers_beside_state(&mut self) -> Result<(), DeviceError> {
        let Some(state) = self.store.clone() else {
            return Ok(());
        };
        let p = hilrig_device::model::buffers_path(&state);
        let mem =
            hilrig_device::model::BufferMem::open_file(&p).map_err(|e| DeviceError::Transport {
                what: format!("device buffer file {}", p.display()),
                detail: e.to_string(),
            })?;
        let words = self.core.bufram.words();
        let mut bytes = vec![0u8; (words * 4).min(BUFFER_SIZE)];
        mem.read_bytes(0, &mut bytes);
        self.core.bufram.load_bytes(&bytes);
        self.kept = Some(mem);
        Ok(())
    }

    /// Write buffer word `word` (a BAR0 offset in the buffer area) through to the
    /// kept file: the word as the device now shows it.
    fn write_through(&self, word: u32) -> Result<(), DeviceError> {
        let Some(mem) = &self.kept else {
            return Ok(());
        };
        let Some(off) = word.checked_sub(BUFFER_BASE) else {
            return Ok(());
        };
        let off = off as usize;
        if off + 4 > BUFFER_SIZE {
            return Ok(());
        }
        // A written word carries the current generation's tag, so the RAM word
        // is what the device shows.
        let v = self
            .core
            .bufram
            .contents()
            .get(off / 4)
            .copied()
            .unwrap_or(0);
        mem.write_u32(off, v);
        Ok(())
    }

    /// Clock cycles simulated so far.
    pub fn cycles(&self) -> u64 {
        self.cycles
    }

    /// Evaluation passes over the whole circuit so far (the cost of simulation:
    /// each settle runs passes until nothing changes).
    pub fn passes(&self) -> u64 {
        self.passes
    }

    /// State-file saves so far.
    pub fn saves(&self) -> u64 {
        self.saves
    }

    /// The state file, if any.
    pub fn store(&self) -> Option<&Path> {
        self.store.as_deref()
    }

    /// Whether the device is wedged by the hang magic.
    pub fn is_hung(&self) -> bool {
        self.core.hung_out.val()
    }

    /// The Verilog of this device's core, with the RAMs' current contents (flash,
    /// keys, buffers) as initial values: generate it before simulating to get the
    /// device as configured.
    pub fn verilog(&self) -> String {
        generate_verilog(&*self.core)
    }

    /// The simulated circuit (for test benches).
    pub fn core(&self) -> &DeviceCore {
        &self.core
    }

    /// The nonvolatile state, read back from the circuit's registers and RAMs.
    pub fn nv(&self) -> NvState {
        let c = &self.core;
        let mut nv = self.nv.clone();
        let join = |lo: u32, hi: u32| ((hi as u64) << 32) | lo as u64;
        nv.counters = [
            join(c.nv_ctr0_lo.val().to_u32(), c.nv_ctr0_hi.val().to_u32()),
            join(c.nv_ctr1_lo.val().to_u32(), c.nv_ctr1_hi.val().to_u32()),
            join(c.nv_ctr2_lo.val().to_u32(), c.nv_ctr2_hi.val().to_u32()),
        ];
        nv.master = c.nv_master.val().to_u32();
        nv.fuse = c.nv_fuse.val();
        nv.epoch = c.nv_epoch.val().to_u32();
        c.flash0.copy_to(&mut nv.flash[0]);
        c.flash1.copy_to(&mut nv.flash[1]);
        c.flash2.copy_to(&mut nv.flash[2]);
        nv
    }

    fn settle_inputs(&mut self) {
        if self.inputs_dirty {
            self.core.move_inputs();
            self.passes += settle(&mut self.core);
            self.inputs_dirty = false;
        }
    }

    /// One clock cycle: settle changed inputs, rising edge, falling edge.
    ///
    /// Both edges are fanned out to every register at once
    /// (`DeviceCore::clock_to`): the rising edge is latched in the first pass of the
    /// settle, and the falling edge, which acts on nothing, takes no pass.
    #[inline]
    pub fn tick(&mut self) {
        self.settle_inputs();
        let c = &mut *self.core;
        c.clock_to(true);
        self.passes += settle(c);
        c.clock_to(false);
        if let Some(t) = &mut self.tracer {
            if self.cycles - t.start >= t.window {
                t.begin(c, self.cycles);
            }
            t.sample(c, self.cycles * PERIOD_PS + PERIOD_PS / 2);
        }
        self.cycles += 1;
    }

    /// Record the last `window` to `2 x window` cycles as VCD (slow: every signal is
    /// visited each cycle). See `write_vcd`.
    pub fn trace_vcd(&mut self, window: u64) {
        let mut t = Box::new(Tracer {
            window: window.max(1),
            start: 0,
            buf: SharedBuf::default(),
            probe: None,
            prev: Vec::new(),
        });
        t.begin(&self.core, self.cycles);
        self.tracer = Some(t);
    }

    /// Write the recorded cycles: the current window to `path` and, if there is one,
    /// the window before it to `path` with `.prev.vcd` appended. Returns the files
    /// written (none if tracing is off).
    pub fn write_vcd(&self, path: &Path) -> std::io::Result<Vec<PathBuf>> {
        let Some(t) = &self.tracer else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        hilrig_device::state::write_atomic(path, &t.buf.snapshot())?;
        out.push(path.to_path_buf());
        if !t.prev.is_empty() {
            let mut p = path.as_os_str().to_owned();
            p.push(".prev.vcd");
            let p = PathBuf::from(p);
            hilrig_device::state::write_atomic(&p, &t.prev)?;
            out.push(p);
        }
        Ok(out)
    }

    /// Load the nonvolatile registers from `nv` (counters, MASTER, fuse, EPOCH).
    fn load_nv(&mut self, nv: &NvState) {
        let c = &mut *self.core;
        let lo = |v: u64| -> Bits<32> { (v & 0xffff_ffff).into() };
        let hi = |v: u64| -> Bits<32> { (v >> 32).into() };
        c.nv_ctr0_lo_in.next = lo(nv.counters[0]);
        c.nv_ctr0_hi_in.next = hi(nv.counters[0]);
        c.nv_ctr1_lo_in.next = lo(nv.counters[1]);
        c.nv_ctr1_hi_in.next = hi(nv.counters[1]);
        c.nv_ctr2_lo_in.next = lo(nv.counters[2]);
        c.nv_ctr2_hi_in.next = hi(nv.counters[2]);
        let cnt = nv.counter_values();
        c.nv_cnt0_in.next = (cnt[0] as u64).into();
        c.nv_cnt1_in.next = (cnt[1] as u64).into();
        c.nv_cnt2_in.next = (cnt[2] as u64).into();
        c.nv_master_in.next = (nv.master as u64).into();
        c.nv_fuse_in.next = nv.fuse;
        c.nv_epoch_in.next = (nv.epoch as u64).into();
        c.nv_load.next = true;
        self.inputs_dirty = true;
        self.tick();
        self.core.nv_load.next = false;
        self.inputs_dirty = true;
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
        if r.is_ok() {
            self.core.persist_ack.next = true;
        } else {
            self.core.persist_nak.next = true;
        }
        self.inputs_dirty = true;
        self.tick();
        self.core.persist_ack.next = false;
        self.core.persist_nak.next = false;
        self.inputs_dirty = true;
        r
    }

    /// Run until the core is ready for an access, serving persist requests.
    fn run_until_ready(&mut self) -> Result<(), DeviceError> {
        let start = self.cycles;
        while !self.core.ready.val() {
            if self.core.persist_req.val() {
                self.serve_persist()?;
                continue;
            }
            if self.cycles - start > MAX_CYCLES_PER_ACCESS {
                return Err(DeviceError::Transport {
                    what: "rtl simulation".into(),
                    detail: format!(
                        "the core did not become ready within {MAX_CYCLES_PER_ACCESS} cycles"
                    ),
                });
            }
            self.tick();
        }
        Ok(())
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
        self.run_until_ready()?;
        let c = &mut *self.core;
        c.strobe.next = true;
        c.addr.next = ((addr >> 2) as u64).into();
        c.we.next = we;
        c.wdata.next = (wdata as u64).into();
        c.be.next = (be as u64).into();
        c.rom_sel.next = rom;
        self.inputs_dirty = true;
        self.tick();
        // ack and rdata come from registers: settled by the rising edge. Dropping the
        // strobe is settled at the start of the next tick.
        self.core.strobe.next = false;
        self.core.rom_sel.next = false;
        self.inputs_dirty = true;
        if !self.core.ack.val() {
            return Err(DeviceError::Transport {
                what: "rtl simulation".into(),
                detail: format!("no ack for the access at {addr:#x}"),
            });
        }
        let v = self.core.rdata.val().to_u32();
        self.tick();
        self.run_until_ready()?;
        Ok(v)
    }
}

impl Device for Rtl {
    fn read_word(&mut self, word: u32, mask: u8) -> Result<u32, DeviceError> {
        debug_assert!((word as u64) < BAR0_SIZE && word % 4 == 0);
        self.access(false, word, false, 0, mask)
    }

    fn write_word(&mut self, word: u32, value: u32, mask: u8) -> Result<(), DeviceError> {
        debug_assert!((word as u64) < BAR0_SIZE && word % 4 == 0);
        self.access(false, word, true, value, mask)?;
        if self.kept.is_some() && word >= BUFFER_BASE {
            self.write_through(word)?;
        }
        Ok(())
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
        // Reset, FLR and power cycle all clear volatile state (the core's Clear state
        // walks the buffer RAM); nonvolatile registers and RAMs are kept, and are
        // already durable.
        self.run_until_ready()?;
        self.core.reset.next = true;
        self.inputs_dirty = true;
        self.tick();
        self.core.reset.next = false;
        self.inputs_dirty = true;
        self.tick();
        self.run_until_ready()?;
        // Every buffer word now reads 0: so does the kept file.
        if let Some(mem) = &self.kept {
            mem.clear();
        }
        Ok(())
    }

    /// Served entirely by the RTL OOB engine (`crate::oob::OobEngine`) through the
    /// core's OOB byte interface ([`Rtl::oob_rtl`]): IDENTIFY, READ_COUNTERS,
    /// READ_HASH (the SHA-256 unit hashes the region's flash RAM), PHYSICAL_RESET
    /// (key compared in RTL; the core clears counters and fuse and increments EPOCH,
    /// saved like every nonvolatile change; a failed save is an `Internal` error
    /// frame and changes nothing) and every error frame (bad sync, CRC, truncated,
    /// oversized, unknown command, bad length, bad key, bad region).
    fn oob(&mut self, request: &[u8]) -> Result<Vec<u8>, DeviceError> {
        self.run_until_ready()?;
        self.oob_rtl(request)
    }
}

impl Rtl {
    /// One OOB exchange through the core's OOB byte interface: the request bytes
    /// (one every other cycle), the end of the request, then the response bytes as
    /// the engine sends them. An error if no complete response comes in time.
    pub fn oob_rtl(&mut self, request: &[u8]) -> Result<Vec<u8>, DeviceError> {
        self.oob_rtl_with_host_resets(request, &[])
    }

    /// [`Rtl::oob_rtl`] with host resets (the core's `reset` input, as a PCIe reset
    /// or FLR drives it) pulsed `reset_at` cycles after the request is in, while the
    /// engine works on it. The OOB port does not belong to the host: the response
    /// must be the same as without them.
    pub fn oob_rtl_with_host_resets(
        &mut self,
        request: &[u8],
        reset_at: &[u64],
    ) -> Result<Vec<u8>, DeviceError> {
        let r = self.oob_exchange(request, reset_at);
        if self.core.reset.val() {
            self.core.reset.next = false;
            self.inputs_dirty = true;
        }
        r
    }

    fn oob_exchange(&mut self, request: &[u8], reset_at: &[u64]) -> Result<Vec<u8>, DeviceError> {
        for &b in request {
            self.core.oob_rx_data.next = (b as u64).into();
            self.core.oob_rx_valid.next = true;
            self.inputs_dirty = true;
            self.tick();
            self.core.oob_rx_valid.next = false;
            self.inputs_dirty = true;
            self.tick();
        }
        self.core.oob_rx_end.next = true;
        self.inputs_dirty = true;
        self.tick();
        self.core.oob_rx_end.next = false;
        self.inputs_dirty = true;
        let start = self.cycles;
        let mut out = Vec::new();
        loop {
            self.settle_inputs();
            if self.core.persist_req.val() {
                // PHYSICAL_RESET: a failed save is answered by the engine (an
                // Internal error frame), not by the backend.
                let _ = self.serve_persist();
                continue;
            }
            if self.core.oob_tx_valid.val() {
                out.push(self.core.oob_tx_data.val().to_u32() as u8);
            }
            let pulse = reset_at.contains(&(self.cycles - start));
            if pulse != self.core.reset.val() {
                self.core.reset.next = pulse;
                self.inputs_dirty = true;
                self.settle_inputs();
            }
            self.tick();
            if out.len() >= 2 && out.len() == out[1] as usize + hilrig_device::oob::OVERHEAD {
                return Ok(out);
            }
            if self.cycles - start > MAX_OOB_CYCLES {
                return Err(DeviceError::Transport {
                    what: "rtl simulation".into(),
                    detail: format!(
                        "no complete OOB response within {MAX_OOB_CYCLES} cycles (got {})",
                        hilrig_device::oob::hex_string(&out)
                    ),
                });
            }
        }
    }

    /// One OOB exchange through the core's UART, end to end: the request is sent bit
    /// by bit on `uart_rx` (8N1, back to back, at the core's divisor), the core's
    /// idle timer ends it, and the response is decoded from `uart_tx` by a software
    /// receiver sampling mid-bit. An error on a framing error or if no complete
    /// response comes in time.
    pub fn oob_uart(&mut self, request: &[u8]) -> Result<Vec<u8>, DeviceError> {
        self.run_until_ready()?;
        let d = self.oob_divisor as u64;
        self.core.oob_uart.next = true;
        self.inputs_dirty = true;
        let mut rx = SoftRx::new(self.oob_divisor);
        let mut line = LineDriver::new(self.oob_divisor);
        line.push(request);
        let fail = |detail: String| DeviceError::Transport {
            what: "rtl simulation (OOB UART)".into(),
            detail,
        };
        while !line.is_idle() {
            if self.core.uart_rx.val() != line.level() {
                self.core.uart_rx.next = line.level();
                self.inputs_dirty = true;
            }
            self.tick();
            rx.sample(self.core.uart_tx.val());
            line.advance();
        }
        self.core.uart_rx.next = true;
        self.inputs_dirty = true;
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
            self.settle_inputs();
            if self.core.persist_req.val() {
                let _ = self.serve_persist();
            } else {
                self.tick();
            }
            rx.sample(self.core.uart_tx.val());
        };
        // Let the stop bit finish before handing the line back.
        for _ in 0..d {
            self.tick();
        }
        self.core.oob_uart.next = false;
        self.inputs_dirty = true;
        result
    }
}
