//! The board simulated in-process: [`SimBoard`] runs a [`BoardCircuit`] — the board
//! top's rust-hdl RTL driven directly ([`RtlBoard`]: set inputs, settle, clock edges
//! fanned out with [`Clocked`]; no `simple_sim!`), or its Verilog compiled by
//! Verilator (`hilrig_verilator::VerilatedBoard`) — with the UART pins driven from
//! bytes and decoded back into bytes, bit by bit at the elaborated divisors.
//!
//! The simulation only runs while something is in flight (bits on a line, the
//! bridge busy, an OOB exchange under way): an idle board costs nothing.
//!
//! Two ways to reach it, both giving a [`Transport`] for [`crate::backend::Fpga`]:
//! - [`SimPipe`]: in memory, single-threaded; simulated time, so a lost response
//!   times out at once. Faults can be injected on whole frames in either direction
//!   ([`Fault`]): drop, duplicate, corrupt, delay (delivered after the host's next
//!   send, i.e. late).
//! - [`PtyBoard`]: a thread serving the two UARTs on two pseudo-terminals, opened by
//!   the host exactly as it opens a board's serial ports.

use crate::backend::Transport;
use crate::proto::{RESP_LEN, RESP_SYNC};
use crate::top::{BoardParams, BoardTop};
use crate::uartsim::{LineDriver, SoftRx};
use hilrig_device::state::NvState;
use hilrig_fpga::sim::Clocked;
use rust_hdl::prelude::*;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Cycles an OOB exchange may stay silent before the board counts it as over (an
/// OOB READ_HASH of a 2 KiB region takes ~2,200 cycles before the first byte).
const OOB_SILENCE_LIMIT: u64 = 200_000;

/// The board's circuit as the simulation drives it: the two UART receive pins in,
/// one clock cycle, the pins and a few status signals out. [`RtlBoard`] is the
/// rust-hdl [`BoardTop`]; `hilrig_verilator::VerilatedBoard` is the board top's
/// Verilog compiled by Verilator. [`SimBoard`] drives either the same way.
pub trait BoardCircuit: Send {
    /// One clock cycle with the receive pins at `uart_rx` and `oob_rx` (idle high):
    /// moved pins settle before the rising edge, then the falling edge.
    fn cycle(&mut self, uart_rx: bool, oob_rx: bool);
    /// The bridge UART's transmit pin.
    fn uart_tx(&self) -> bool;
    /// The OOB UART's transmit pin.
    fn oob_tx(&self) -> bool;
    /// The LEDs (MASTER's low byte).
    fn leds(&self) -> u8;
    /// Whether the host bridge hunts for a frame with nothing to send.
    fn bridge_idle(&self) -> bool;
    /// Whether the host bridge is inside a frame.
    fn bridge_receiving(&self) -> bool;
    /// Whether the device core is busy (a command running).
    fn core_busy(&self) -> bool;
    /// Evaluation passes run (engines that do not count them say 0).
    fn passes(&self) -> u64 {
        0
    }
    /// The rust-hdl circuit, when this is one.
    fn rtl(&self) -> Option<&BoardTop> {
        None
    }
    /// What simulates the board (`rtl`, `verilator`).
    fn engine(&self) -> &'static str;
}

/// [`BoardTop`]'s rust-hdl RTL driven directly (set inputs, settle, clock edges fanned
/// out with [`Clocked`]; no `simple_sim!`).
pub struct RtlBoard {
    top: Box<BoardTop>,
    passes: u64,
    first: bool,
}

impl RtlBoard {
    /// A factory-fresh board top (RAMs zero, as `board_top_verilog` configures it).
    pub fn new(params: BoardParams) -> RtlBoard {
        RtlBoard::from_top(Box::new(BoardTop::new(params)))
    }

    /// A board top whose bitstream holds `nv`'s flash contents, device key and OOB
    /// reset key.
    pub fn with_nv(params: BoardParams, nv: &NvState) -> RtlBoard {
        let mut top = Box::new(BoardTop::new(params));
        top.core.flash0.load_bytes(&nv.flash[0]);
        top.core.flash1.load_bytes(&nv.flash[1]);
        top.core.flash2.load_bytes(&nv.flash[2]);
        top.core.keys.load_bytes(&nv.device_key);
        top.core.oob.load_key(&nv.reset_key);
        RtlBoard::from_top(top)
    }

    fn from_top(mut top: Box<BoardTop>) -> RtlBoard {
        top.connect_all();
        top.uart_rx.next = true;
        top.oob_rx.next = true;
        RtlBoard {
            top,
            passes: 0,
            first: true,
        }
    }

    fn settle(&mut self) {
        loop {
            self.top.update_all();
            self.passes += 1;
            if !self.top.has_changed() {
                return;
            }
        }
    }
}

impl BoardCircuit for RtlBoard {
    #[inline]
    fn cycle(&mut self, uart_rx: bool, oob_rx: bool) {
        if self.top.uart_rx.val() != uart_rx || self.top.oob_rx.val() != oob_rx || self.first {
            self.top.uart_rx.next = uart_rx;
            self.top.oob_rx.next = oob_rx;
            self.first = false;
            // Only a moved pin calls for a settle before the edge: the circuit is
            // settled after every edge.
            self.settle();
        }
        self.top.clock_to(true, false);
        self.settle();
        self.top.clock_to(false, false);
    }
    fn uart_tx(&self) -> bool {
        self.top.uart_tx.val()
    }
    fn oob_tx(&self) -> bool {
        self.top.oob_tx.val()
    }
    fn leds(&self) -> u8 {
        self.top.leds.val().index() as u8
    }
    fn bridge_idle(&self) -> bool {
        self.top.bridge.idle.val()
    }
    fn bridge_receiving(&self) -> bool {
        self.top.bridge.receiving.val()
    }
    fn core_busy(&self) -> bool {
        self.top.core.busy.val()
    }
    fn passes(&self) -> u64 {
        self.passes
    }
    fn rtl(&self) -> Option<&BoardTop> {
        Some(&self.top)
    }
    fn engine(&self) -> &'static str {
        "rtl"
    }
}

/// The simulated board: a [`BoardCircuit`] with its UART pins driven from bytes and
/// decoded back into bytes, bit by bit at the elaborated divisors.
pub struct SimBoard {
    circuit: Box<dyn BoardCircuit>,
    params: BoardParams,
    host_in: LineDriver,
    host_out: SoftRx,
    oob_in: LineDriver,
    oob_out: SoftRx,
    /// OOB response bytes seen since the request started (to know when it is whole).
    oob_seen: Vec<u8>,
    /// OOB response bytes not yet taken.
    oob_pending: Vec<u8>,
    oob_active: bool,
    oob_silent: u64,
    tail: u64,
    cycles: u64,
}

impl SimBoard {
    /// A factory-fresh board (RAMs zero, as `board_top_verilog` configures it).
    pub fn new(params: BoardParams) -> SimBoard {
        SimBoard::with_circuit(Box::new(RtlBoard::new(params)), params)
    }

    /// A board whose bitstream holds `nv`'s flash contents, device key and OOB reset
    /// key (counters, MASTER, fuse and EPOCH start at zero, as after power-on).
    /// `params.core`'s geometry must match `nv`'s configuration.
    pub fn with_nv(params: BoardParams, nv: &NvState) -> SimBoard {
        SimBoard::with_circuit(Box::new(RtlBoard::with_nv(params, nv)), params)
    }

    /// A board simulated by `circuit` (elaborated for `params`), taken through its
    /// power-on reset.
    pub fn with_circuit(circuit: Box<dyn BoardCircuit>, params: BoardParams) -> SimBoard {
        let mut b = SimBoard {
            circuit,
            params,
            host_in: LineDriver::new(params.bridge.divisor),
            host_out: SoftRx::new(params.bridge.divisor),
            oob_in: LineDriver::new(params.core.oob_divisor),
            oob_out: SoftRx::new(params.core.oob_divisor),
            oob_seen: Vec::new(),
            oob_pending: Vec::new(),
            oob_active: false,
            oob_silent: 0,
            tail: 0,
            cycles: 0,
        };
        // Through the power-on reset.
        for _ in 0..crate::top::POR_CYCLES as u32 + 4 {
            b.tick();
        }
        b
    }

    /// The elaboration parameters.
    pub fn params(&self) -> BoardParams {
        self.params
    }

    /// The simulated circuit.
    pub fn circuit(&self) -> &dyn BoardCircuit {
        &*self.circuit
    }

    /// The rust-hdl circuit, when the board is simulated by one.
    pub fn top(&self) -> Option<&BoardTop> {
        self.circuit.rtl()
    }

    /// The LEDs (MASTER's low byte).
    pub fn leds(&self) -> u8 {
        self.circuit.leds()
    }

    /// The Verilog of this board with its RAMs' current contents as initial values
    /// (rust-hdl boards only).
    pub fn verilog(&self) -> Option<String> {
        self.circuit.rtl().map(generate_verilog)
    }

    /// Clock cycles simulated.
    pub fn cycles(&self) -> u64 {
        self.cycles
    }

    /// Evaluation passes run.
    pub fn passes(&self) -> u64 {
        self.circuit.passes()
    }

    /// Queue bytes on the bridge UART (host to board).
    pub fn push_host(&mut self, bytes: &[u8]) {
        self.host_in.push(bytes);
    }

    /// Queue bytes on the OOB UART.
    pub fn push_oob(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            if !self.oob_active {
                self.oob_seen.clear();
            }
            self.oob_active = true;
            self.oob_silent = 0;
        }
        self.oob_in.push(bytes);
    }

    /// Bytes the board sent on the bridge UART.
    pub fn take_host(&mut self) -> Vec<u8> {
        self.host_out.take()
    }

    /// Bytes the board sent on the OOB UART.
    pub fn take_oob(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.oob_pending)
    }

    fn oob_complete(&self) -> bool {
        let s = &self.oob_seen;
        s.len() >= 2 && s.len() >= s[1] as usize + hilrig_device::oob::OVERHEAD
    }

    /// Whether a host frame is partly received by the bridge and nothing more is
    /// queued (a driver fed by a real port may wait for the rest before simulating
    /// on, which would let the bridge's inter-byte timeout drop it).
    pub fn awaiting_host_bytes(&self) -> bool {
        self.host_in.is_idle() && self.circuit.bridge_receiving()
    }

    /// Whether anything is in flight (the simulation must run on).
    pub fn is_active(&self) -> bool {
        !self.host_in.is_idle()
            || !self.oob_in.is_idle()
            || !self.circuit.bridge_idle()
            || self.circuit.core_busy()
            || self.host_out.is_busy()
            || self.oob_out.is_busy()
            || self.oob_active
            || self.tail > 0
    }

    /// One clock cycle.
    #[inline]
    pub fn tick(&mut self) {
        let h = self.host_in.level();
        let o = self.oob_in.level();
        self.circuit.cycle(h, o);
        self.host_in.advance();
        self.oob_in.advance();
        self.host_out.sample(self.circuit.uart_tx());
        self.oob_out.sample(self.circuit.oob_tx());
        self.cycles += 1;
        // A little quiet tail after the lines go idle (the receivers' synchronizers
        // and stop bits).
        if !self.host_in.is_idle() || !self.oob_in.is_idle() || !self.circuit.bridge_idle() {
            self.tail = 4 * self.params.bridge.divisor.max(self.params.core.oob_divisor) as u64;
        } else {
            self.tail = self.tail.saturating_sub(1);
        }
        if self.oob_out.has_bytes() {
            let b = self.oob_out.take();
            if self.oob_active {
                self.oob_seen.extend_from_slice(&b);
            }
            self.oob_pending.extend(b);
            self.oob_silent = 0;
        }
        if self.oob_active {
            if self.oob_out.is_busy() || !self.oob_in.is_idle() {
                self.oob_silent = 0;
            } else {
                self.oob_silent += 1;
            }
            if self.oob_complete() || self.oob_silent > OOB_SILENCE_LIMIT {
                self.oob_active = false;
            }
        }
    }

    /// Run while active, up to `max_cycles`; stop early once output bytes are
    /// waiting if `until_output`. Returns the cycles run.
    pub fn run(&mut self, max_cycles: u64, until_output: bool) -> u64 {
        let start = self.cycles;
        while self.is_active() && self.cycles - start < max_cycles {
            self.tick();
            if until_output && (self.host_out.has_bytes() || !self.oob_pending.is_empty()) {
                break;
            }
        }
        self.cycles - start
    }
}

/// A fault injected on one whole frame of the simulated pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Deliver it.
    None,
    /// Lose it.
    Drop,
    /// Deliver it twice.
    Duplicate,
    /// Flip the bits `xor` (non-zero) of byte `index` (modulo the frame length).
    Corrupt {
        /// Byte index.
        index: usize,
        /// Bits to flip.
        xor: u8,
    },
    /// Deliver it late: after the host's next send (responses only; a delayed
    /// request is dropped).
    Delay,
}

/// Which way a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Host to board (request frames, as the host wrote them).
    Request,
    /// Board to host (response frames).
    Response,
}

/// Chooses the fault for the `n`th frame (from 0) going `dir`.
pub type FaultFn = Box<dyn FnMut(Dir, u64) -> Fault + Send>;

fn apply(fault: Fault, frame: &[u8], out: &mut Vec<u8>, late: &mut Vec<u8>) {
    match fault {
        Fault::None => out.extend_from_slice(frame),
        Fault::Drop => {}
        Fault::Duplicate => {
            out.extend_from_slice(frame);
            out.extend_from_slice(frame);
        }
        Fault::Corrupt { index, xor } => {
            let mut f = frame.to_vec();
            if !f.is_empty() {
                let i = index % f.len();
                f[i] ^= xor.max(1);
            }
            out.extend_from_slice(&f);
        }
        Fault::Delay => late.extend_from_slice(frame),
    }
}

/// Counts of what the pipe did to frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipeStats {
    /// Request frames from the host.
    pub requests: u64,
    /// Response frames from the board.
    pub responses: u64,
    /// Frames a fault other than `None` was applied to.
    pub faults: u64,
}

struct PipeShared {
    board: SimBoard,
    faults: Option<FaultFn>,
    /// Response bytes ready for the host.
    host_out: VecDeque<u8>,
    /// Board output not yet a whole frame.
    partial: Vec<u8>,
    /// Delayed responses, delivered after the next host send.
    late: Vec<u8>,
    stats: PipeStats,
}

impl PipeShared {
    fn fault(&mut self, dir: Dir) -> Fault {
        let n = match dir {
            Dir::Request => self.stats.requests,
            Dir::Response => self.stats.responses,
        };
        let f = self.faults.as_mut().map_or(Fault::None, |f| f(dir, n));
        match dir {
            Dir::Request => self.stats.requests += 1,
            Dir::Response => self.stats.responses += 1,
        }
        if f != Fault::None {
            self.stats.faults += 1;
        }
        f
    }

    /// Move the board's response bytes into `host_out`, frame by frame, with faults.
    fn collect(&mut self) {
        for b in self.board.take_host() {
            if self.partial.is_empty() && b != RESP_SYNC {
                self.host_out.push_back(b);
                continue;
            }
            self.partial.push(b);
            if self.partial.len() == RESP_LEN {
                let frame = std::mem::take(&mut self.partial);
                let f = self.fault(Dir::Response);
                let mut out = Vec::new();
                let mut late = std::mem::take(&mut self.late);
                apply(f, &frame, &mut out, &mut late);
                self.late = late;
                self.host_out.extend(out);
            }
        }
    }
}

/// Cycles a pipe `recv` simulates at most before reporting a timeout.
const PIPE_MAX_CYCLES: u64 = 20_000_000;

/// The simulated board's two UARTs as in-memory transports (see the module docs).
#[derive(Clone)]
pub struct SimPipe {
    shared: Arc<Mutex<PipeShared>>,
}

/// The bridge UART end of a [`SimPipe`].
pub struct PipeHost {
    shared: Arc<Mutex<PipeShared>>,
}

/// The OOB UART end of a [`SimPipe`].
pub struct PipeOob {
    shared: Arc<Mutex<PipeShared>>,
}

fn poisoned() -> std::io::Error {
    std::io::Error::other("simulated board poisoned by an earlier panic")
}

impl SimPipe {
    /// Wrap `board`.
    pub fn new(board: SimBoard) -> SimPipe {
        SimPipe {
            shared: Arc::new(Mutex::new(PipeShared {
                board,
                faults: None,
                host_out: VecDeque::new(),
                partial: Vec::new(),
                late: Vec::new(),
                stats: PipeStats::default(),
            })),
        }
    }

    /// The bridge UART transport (for [`crate::backend::Fpga`]).
    pub fn host(&self) -> PipeHost {
        PipeHost {
            shared: self.shared.clone(),
        }
    }

    /// The OOB UART transport.
    pub fn oob(&self) -> PipeOob {
        PipeOob {
            shared: self.shared.clone(),
        }
    }

    /// Inject faults from now on (`None`: stop).
    pub fn set_faults(&self, f: Option<FaultFn>) {
        if let Ok(mut s) = self.shared.lock() {
            s.faults = f;
        }
    }

    /// What the pipe did so far.
    pub fn stats(&self) -> PipeStats {
        self.shared.lock().map(|s| s.stats).unwrap_or_default()
    }

    /// Run `f` on the board (e.g. to read its LEDs or cycle count).
    pub fn with_board<R>(&self, f: impl FnOnce(&mut SimBoard) -> R) -> Option<R> {
        self.shared.lock().ok().map(|mut s| f(&mut s.board))
    }
}

impl Transport for PipeHost {
    fn name(&self) -> &str {
        "simulated board (pipe, bridge UART)"
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let mut s = self.shared.lock().map_err(|_| poisoned())?;
        let late = std::mem::take(&mut s.late);
        s.host_out.extend(late);
        let f = s.fault(Dir::Request);
        let mut out = Vec::new();
        let mut dropped = Vec::new();
        apply(f, bytes, &mut out, &mut dropped);
        s.board.push_host(&out);
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8], _timeout: Duration) -> std::io::Result<usize> {
        let mut s = self.shared.lock().map_err(|_| poisoned())?;
        let start = s.board.cycles();
        while s.host_out.is_empty() {
            if !s.board.is_active() || s.board.cycles() - start > PIPE_MAX_CYCLES {
                // Simulated time: nothing more will come, the wait times out.
                return Ok(0);
            }
            s.board.run(PIPE_MAX_CYCLES, true);
            s.collect();
        }
        let n = buf.len().min(s.host_out.len());
        for (d, b) in buf.iter_mut().zip(s.host_out.drain(..n)) {
            *d = b;
        }
        Ok(n)
    }
}

impl Transport for PipeOob {
    fn name(&self) -> &str {
        "simulated board (pipe, OOB UART)"
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let mut s = self.shared.lock().map_err(|_| poisoned())?;
        s.board.push_oob(bytes);
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8], _timeout: Duration) -> std::io::Result<usize> {
        let mut s = self.shared.lock().map_err(|_| poisoned())?;
        let start = s.board.cycles();
        let mut got = s.board.take_oob();
        while got.is_empty() {
            if !s.board.is_active() || s.board.cycles() - start > PIPE_MAX_CYCLES {
                return Ok(0);
            }
            s.board.run(PIPE_MAX_CYCLES, true);
            s.collect();
            got = s.board.take_oob();
        }
        // Whatever does not fit is lost; callers read with large buffers.
        let n = buf.len().min(got.len());
        buf[..n].copy_from_slice(&got[..n]);
        Ok(n)
    }
}

/// The simulated board served on two pseudo-terminals by a thread: open
/// [`PtyBoard::host_path`] and [`PtyBoard::oob_path`] as serial ports.
pub struct PtyBoard {
    host_path: String,
    oob_path: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<SimBoard>>,
}

/// How long the server waits for the rest of a partly received frame before
/// simulating on (so the bridge's inter-byte timeout can drop a truncated one).
const PTY_REST_WAIT: Duration = Duration::from_millis(20);

impl PtyBoard {
    /// Serve `board` on two new PTYs.
    pub fn spawn(board: SimBoard) -> std::io::Result<PtyBoard> {
        use serialport::SerialPort;
        let err = |e: serialport::Error| std::io::Error::other(e.to_string());
        let (mut host_m, host_s) = serialport::TTYPort::pair().map_err(err)?;
        let (mut oob_m, oob_s) = serialport::TTYPort::pair().map_err(err)?;
        let host_path = host_s
            .name()
            .ok_or_else(|| std::io::Error::other("the PTY has no slave path"))?;
        let oob_path = oob_s
            .name()
            .ok_or_else(|| std::io::Error::other("the PTY has no slave path"))?;
        host_m.set_timeout(Duration::from_millis(1)).map_err(err)?;
        oob_m.set_timeout(Duration::from_millis(1)).map_err(err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("hilrig-simboard-pty".into())
            .spawn(move || {
                // The slaves stay open so the masters never see EIO between clients.
                let _slaves = (host_s, oob_s);
                serve_ptys(board, &mut host_m, &mut oob_m, &stop2)
            })?;
        Ok(PtyBoard {
            host_path,
            oob_path,
            stop,
            thread: Some(thread),
        })
    }

    /// The bridge UART's PTY path.
    pub fn host_path(&self) -> &str {
        &self.host_path
    }

    /// The OOB UART's PTY path.
    pub fn oob_path(&self) -> &str {
        &self.oob_path
    }

    /// Stop serving; returns the board (None if the server thread panicked).
    pub fn stop(mut self) -> Option<SimBoard> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for PtyBoard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_some(port: &mut serialport::TTYPort, buf: &mut [u8]) -> usize {
    use std::io::Read;
    port.read(buf).unwrap_or_default()
}

/// Wait up to `ms` for input on either PTY master.
fn wait_input(a: &serialport::TTYPort, b: &serialport::TTYPort, ms: i32) {
    use std::os::fd::AsRawFd;
    let mut fds = [
        libc::pollfd {
            fd: a.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfd structs for the call's duration.
    unsafe {
        libc::poll(fds.as_mut_ptr(), 2, ms);
    }
}

fn serve_ptys(
    mut board: SimBoard,
    host: &mut serialport::TTYPort,
    oob: &mut serialport::TTYPort,
    stop: &AtomicBool,
) -> SimBoard {
    use serialport::SerialPort;
    use std::io::Write;
    let mut buf = [0u8; 512];
    let mut waited = false;
    while !stop.load(Ordering::Relaxed) {
        if !board.is_active() {
            wait_input(host, oob, 5);
        }
        for (port, is_host) in [(&mut *host, true), (&mut *oob, false)] {
            if port.bytes_to_read().unwrap_or(0) > 0 {
                let n = read_some(port, &mut buf);
                if n > 0 {
                    waited = false;
                    if is_host {
                        board.push_host(&buf[..n]);
                    } else {
                        board.push_oob(&buf[..n]);
                    }
                }
            }
        }
        if board.awaiting_host_bytes() && !waited {
            // The rest of a frame may be on its way: wait for it in real time.
            let _ = host.set_timeout(PTY_REST_WAIT);
            let n = read_some(host, &mut buf);
            let _ = host.set_timeout(Duration::from_millis(1));
            if n > 0 {
                board.push_host(&buf[..n]);
            } else {
                waited = true;
            }
        }
        if board.is_active() {
            board.run(50_000, false);
            let h = board.take_host();
            if !h.is_empty() {
                let _ = host.write_all(&h);
                let _ = host.flush();
            }
            let o = board.take_oob();
            if !o.is_empty() {
                let _ = oob.write_all(&o);
                let _ = oob.flush();
            }
        }
    }
    board
}
