//! The device of an `fpga` attempt: a board's two serial ports (the host bridge the
//! VMM drives, the OOB port the rig reads), either the host's own board (named by
//! its inventory: `device = "fpga=PORT,oob=PORT"`) or `hilrig fpga serve-sim` (the
//! board top's RTL behind two PTYs, opened through serialport exactly as a board's
//! USB-serial ports) started for the attempt.
//!
//! Counters and region hashes come out of band, from the OOB port, never from a
//! state file. A fresh device for an attempt goes the way a board's does: a new
//! serve-sim process (its power-on: the bitstream's initial state) or, on a board,
//! the keyed OOB PHYSICAL_RESET (counters and fuse cleared, EPOCH + 1).
//!
//! Every failure here is a transport or set-up fault ([`BoardError`]): the runner
//! reports it as INFRA, never as a device FAIL.

use crate::format::Board;
use hilrig_counters::decide::Observation;
use hilrig_counters::source::{CounterSource, SerialSource};
use hilrig_device::oob::{CounterReport, Request, Response};
use hilrig_device::{DeviceConfig, NvState};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Per OOB request.
const OOB_TIMEOUT: Duration = Duration::from_secs(3);
/// How long serve-sim may take to print its ports.
const SIM_START: Duration = Duration::from_secs(60);

/// Why the board could not be set up or read (a transport or rig fault).
#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    /// `hilrig fpga serve-sim` could not be started or did not print its ports.
    #[error("starting `{program} fpga serve-sim`: {detail}")]
    Sim {
        /// The executable.
        program: String,
        /// What went wrong.
        detail: String,
    },
    /// The board's OOB port failed (open, timeout, malformed reply).
    #[error("the board's OOB port {port}: {detail}")]
    Oob {
        /// The port.
        port: String,
        /// What went wrong.
        detail: String,
    },
    /// The board answered, but cannot be made a fresh device for the attempt.
    #[error("board on {port}: {detail}")]
    Setup {
        /// The host-bridge port.
        port: String,
        /// What is wrong.
        detail: String,
    },
}

/// The region sizes of the board build (`hilrig_fpga::core::CoreParams::small`).
fn board_config(width: u8, serial: u64) -> DeviceConfig {
    DeviceConfig {
        counter_width: width,
        region_sizes: hilrig_fpga::core::CoreParams::small(width, serial).region_sizes,
    }
}

/// The nonvolatile state a board of counter width `width` and serial `serial`
/// powers up with (the bitstream's initial values; what `serve-sim` serves).
pub fn factory(width: u8, serial: u64) -> Result<NvState, hilrig_device::state::StateError> {
    hilrig_fw::factory::device(board_config(width, serial), serial)
}

/// The `hilrig` executable that runs `fpga serve-sim`: `explicit`, else the VMM
/// when it is `hilrig` itself, else `hilrig` beside the VMM.
pub fn find_hilrig(explicit: Option<&Path>, vmm: &Path) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if vmm.file_stem().and_then(|s| s.to_str()) == Some("hilrig") {
        return Some(vmm.to_path_buf());
    }
    let beside = vmm.with_file_name("hilrig");
    beside.is_file().then_some(beside)
}

/// The attempt's board.
pub struct BoardSession {
    /// Host-bridge port (`fpga=`).
    pub port: String,
    /// OOB port.
    pub oob: String,
    /// Baud rate of both.
    pub baud: u32,
    /// The device's serial number (IDENTIFY over OOB).
    pub serial: u64,
    /// The state the device was brought to for the attempt (keys, geometry; on a
    /// board after the physical reset: its flash as the bitstream configured it).
    pub factory: NvState,
    /// The serve-sim process (killed when the session ends).
    sim: Option<Child>,
}

impl Drop for BoardSession {
    fn drop(&mut self) {
        if let Some(c) = &mut self.sim {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl BoardSession {
    /// Start `hilrig fpga serve-sim` (`extra` arguments appended) for a fresh
    /// simulated board of `width` and `serial`; its stderr goes to `log`. It is
    /// killed when the session ends, and stops by itself after `life` (unless
    /// `extra` sets `--seconds`), so a runner killed outright leaks no board for
    /// long. (Not PR_SET_PDEATHSIG: that fires when the spawning *thread* ends,
    /// and the runner spawns from short-lived blocking threads.)
    pub fn start_sim(
        hilrig: &Path,
        extra: &[String],
        width: u8,
        serial: u64,
        life: Duration,
        log: &Path,
    ) -> Result<BoardSession, BoardError> {
        let sim_err = |detail: String| BoardError::Sim {
            program: hilrig.display().to_string(),
            detail,
        };
        let factory = factory(width, serial).map_err(|e| sim_err(e.to_string()))?;
        let stderr = std::fs::File::create(log)
            .map_err(|e| sim_err(format!("creating {}: {e}", log.display())))?;
        let mut cmd = Command::new(hilrig);
        cmd.args(["fpga", "serve-sim", "--width"])
            .arg(width.to_string())
            .arg("--serial")
            .arg(serial.to_string());
        if !extra.iter().any(|a| a == "--seconds") {
            cmd.arg("--seconds").arg(life.as_secs().max(1).to_string());
        }
        cmd.args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = cmd.spawn().map_err(|e| sim_err(e.to_string()))?;
        let Some(out) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(sim_err("no standard output".into()));
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(out).lines();
            let mut get = |want: &str| -> Option<String> {
                let l = lines.next()?.ok()?;
                l.strip_prefix(want).map(str::to_string)
            };
            let host = get("host ");
            let oob = get("oob ");
            let _ = tx.send((host, oob));
            // Keep reading (and discarding) so serve-sim never blocks on a full pipe.
            for _ in lines {}
        });
        let Ok((Some(port), Some(oob))) = rx.recv_timeout(SIM_START) else {
            let status = child.try_wait().ok().flatten();
            let _ = child.kill();
            let _ = child.wait();
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            return Err(sim_err(format!(
                "it printed no `host PTY` / `oob PTY` lines ({}); {}",
                status.map_or("still running".to_string(), |s| s.to_string()),
                tail.lines().last().unwrap_or("")
            )));
        };
        if let Ok(Some(st)) = child.try_wait() {
            return Err(sim_err(format!("it ended at once ({st})")));
        }
        let mut s = BoardSession {
            port,
            oob,
            baud: hilrig_vmm_api::spec::FPGA_BAUD,
            serial,
            factory,
            sim: None,
        };
        s.sim = Some(child);
        // The simulated board answers on its OOB port as the board would.
        let (got_serial, got_width) = s.identify()?;
        if got_serial != serial || got_width != width {
            return Err(s.setup(format!(
                "serve-sim identifies as serial {got_serial} width {got_width}, asked for serial {serial} width {width}"
            )));
        }
        Ok(s)
    }

    /// The host's board: identified over OOB, its counter width checked against
    /// `width` (a board's is fixed by its bitstream), then made a fresh device
    /// with the keyed PHYSICAL_RESET (its serial's documented development key, as
    /// the bitstream carries it): region counters and fuse must read cleared
    /// (MASTER is not cleared by the reset; deltas are taken from here).
    pub fn open_board(board: &Board, width: u8) -> Result<BoardSession, BoardError> {
        let placeholder = factory(width, 1).map_err(|e| BoardError::Setup {
            port: board.port.clone(),
            detail: e.to_string(),
        })?;
        let mut s = BoardSession {
            port: board.port.clone(),
            oob: board.oob.clone(),
            baud: board.baud,
            serial: 0,
            factory: placeholder,
            sim: None,
        };
        let (serial, got_width) = s.identify()?;
        if got_width != width {
            return Err(s.setup(format!(
                "its counter width is {got_width}, the case needs {width} (a board's width is its bitstream's)"
            )));
        }
        s.serial = serial;
        s.factory = factory(width, serial).map_err(|e| s.setup(e.to_string()))?;
        let key = s.factory.reset_key;
        match s.request(&Request::PhysicalReset(key))? {
            Response::ResetDone { .. } => {}
            other => return Err(s.setup(format!("the keyed PHYSICAL_RESET answered {other:?}"))),
        }
        let c = s.counters()?;
        if c.counters != [0; 3] || c.fuse {
            return Err(s.setup(format!(
                "after the keyed PHYSICAL_RESET its counters read {c:?}"
            )));
        }
        Ok(s)
    }

    fn setup(&self, detail: String) -> BoardError {
        BoardError::Setup {
            port: self.port.clone(),
            detail,
        }
    }

    fn oob_err(&self, detail: impl std::fmt::Display) -> BoardError {
        BoardError::Oob {
            port: self.oob.clone(),
            detail: detail.to_string(),
        }
    }

    /// A counters source on the OOB port (opened for one use: the VMM opens the
    /// same port for its own teardown reads while it runs).
    pub fn source(&self) -> Result<SerialSource, BoardError> {
        SerialSource::open(&self.oob, self.baud, OOB_TIMEOUT).map_err(|e| self.oob_err(e))
    }

    fn request(&mut self, req: &Request) -> Result<Response, BoardError> {
        let mut src = self.source()?;
        src.request(req).map_err(|e| self.oob_err(e))
    }

    /// IDENTIFY: serial and counter width.
    pub fn identify(&mut self) -> Result<(u64, u8), BoardError> {
        match self.request(&Request::Identify)? {
            Response::Identity { serial, width, .. } => Ok((serial, width)),
            other => Err(self.oob_err(format!("IDENTIFY answered {other:?}"))),
        }
    }

    /// READ_COUNTERS.
    pub fn counters(&mut self) -> Result<CounterReport, BoardError> {
        let mut src = self.source()?;
        src.counters().map_err(|e| self.oob_err(e))
    }

    /// Counters and every region hash, out of band.
    pub fn observe(&mut self) -> Result<Observation, BoardError> {
        let mut src = self.source()?;
        src.observe().map_err(|e| self.oob_err(e))
    }

    /// Whether the board still answers: serve-sim still running, and an OOB
    /// IDENTIFY answered with this device's serial. `Err` names the fault.
    pub fn alive(&mut self) -> Result<(), BoardError> {
        if let Some(c) = &mut self.sim {
            if let Ok(Some(st)) = c.try_wait() {
                return Err(BoardError::Sim {
                    program: "serve-sim".into(),
                    detail: format!("the simulated board ended mid-case ({st}): its PTYs closed"),
                });
            }
        }
        let (serial, _) = self.identify()?;
        if serial != self.serial {
            return Err(self.setup(format!(
                "another device answers on the OOB port (serial {serial}, expected {})",
                self.serial
            )));
        }
        Ok(())
    }
}

/// How long the runner waits for a host's `hilrig fpga relay-oob` to print its PTY.
const RELAY_START: Duration = Duration::from_secs(20);

/// The board's OOB port lent to a lab host for one VMM step: the host's
/// `hilrig fpga relay-oob` (its PTY there is the VMM's `oob=`) sends each OOB
/// frame the VMM writes over the SSH session; the runner puts it on the board's
/// OOB port on the controller's end and sends the board's answer back. Reads
/// only (IDENTIFY, READ_COUNTERS, READ_HASH): a PHYSICAL_RESET from the host, a
/// malformed frame or any other request is refused without reaching the board
/// and without an answer (recorded as a fault: the step is INFRA). The rig's own readings never go through
/// it (nor through the VMM). Ended when dropped:
/// the session is killed (the host's relay sees the end of its input).
pub struct OobRelay {
    child: Child,
    /// The PTY on the host (the VMM's `oob=`).
    pub host_path: String,
    pump: Option<std::thread::JoinHandle<()>>,
    /// Why a frame found no answer on the controller's end, or was refused
    /// (for messages).
    faults: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl OobRelay {
    /// End the relay (the session killed, its pump joined, so a board read
    /// still in flight is accounted for) and say what failed on the
    /// controller's end while it ran (empty: nothing).
    pub fn finish(mut self) -> Vec<String> {
        self.stop();
        self.faults.lock().map(|f| f.clone()).unwrap_or_default()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(p) = self.pump.take() {
            let _ = p.join();
        }
    }
}

impl Drop for OobRelay {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why the OOB relay has no answer from the board (the host's request times out).
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("opening {path}: {source}")]
    Open {
        path: String,
        source: serialport::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: crate::scenario::ScenarioError,
    },
    /// Not put on the line (recorded as a fault where it was refused).
    #[error("refused")]
    Refused,
}

/// One OOB frame on the board's port (opened for this frame only: the runner
/// opens the same port between steps), its answer frame.
fn board_frame(path: &str, baud: u32, frame: &[u8]) -> Result<Vec<u8>, RelayError> {
    let mut port = serialport::new(path, baud)
        .timeout(Duration::from_millis(20))
        .open()
        .map_err(|source| RelayError::Open {
            path: path.into(),
            source,
        })?;
    port.write_all(frame).map_err(|source| RelayError::Write {
        path: path.into(),
        source,
    })?;
    crate::scenario::read_frame(&mut port, OOB_TIMEOUT).map_err(|source| RelayError::Read {
        path: path.into(),
        source,
    })
}

/// Lend a board's OOB port (`oob` at `baud`, on this machine) to a host through
/// `relay` (the host's `hilrig fpga relay-oob`, run over its SSH connection):
/// started, its PTY path read, then every frame it sends answered from the
/// board's OOB port here until the relay is dropped.
pub fn relay(oob: &str, baud: u32, mut relay: Command) -> Result<OobRelay, BoardError> {
    let err = |detail: String| BoardError::Oob {
        port: oob.to_string(),
        detail: format!("relaying it to the host: {detail}"),
    };
    let mut child = relay
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    let (Some(out), Some(mut input), Some(stderr)) =
        (child.stdout.take(), child.stdin.take(), child.stderr.take())
    else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(err("no pipes".into()));
    };
    // Its standard error drained (its tail kept for the message if it fails).
    let errors = std::thread::spawn(move || {
        let mut tail = Vec::new();
        let mut buf = [0u8; 1024];
        let mut stderr = stderr;
        while let Ok(n) = std::io::Read::read(&mut stderr, &mut buf) {
            if n == 0 {
                break;
            }
            tail.extend_from_slice(&buf[..n]);
            let cut = tail.len().saturating_sub(4096);
            tail.drain(..cut);
        }
        String::from_utf8_lossy(&tail).into_owned()
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let faults = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (path, seen) = (oob.to_string(), faults.clone());
    let pump = std::thread::spawn(move || {
        use hilrig_device::oob::{FrameReader, StreamEvent};
        use std::io::{BufRead, Read, Write};
        let mut out = std::io::BufReader::new(out);
        let mut first = String::new();
        // The host's first line names its PTY: bounded like every reply.
        let ok = (&mut out).take(4096).read_line(&mut first).is_ok();
        let _ = tx.send(
            first
                .trim_end()
                .strip_prefix("oob ")
                .filter(|_| ok)
                .map(str::to_string),
        );
        let mut reader = FrameReader::default();
        let mut buf = [0u8; 512];
        loop {
            let n = match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            for &b in &buf[..n] {
                let Some(StreamEvent::Frame(f)) = reader.push(b) else {
                    continue;
                };
                let refuse = |why: String| -> Result<Vec<u8>, RelayError> {
                    if let Ok(mut v) = seen.lock() {
                        v.push(why);
                    }
                    Err(RelayError::Refused)
                };
                let answer = match hilrig_device::oob::decode_request(&f) {
                    // Reads only, named one by one (a request added later does
                    // not reach the board by default).
                    Ok((_, Request::Identify | Request::ReadCounters | Request::ReadHash(_))) => {
                        board_frame(&path, baud, &f)
                    }
                    // A host's VMM never resets the board.
                    Ok((_, Request::PhysicalReset(_))) => refuse(
                        "the host sent PHYSICAL_RESET through the OOB relay: refused, not answered (it lends reads only)"
                            .into(),
                    ),
                    // Malformed: never put on the line, and no answer made up.
                    Err((_, code, request)) => refuse(format!(
                        "the host sent a malformed OOB frame through the relay ({code:?}, request {request:#04x}): not answered"
                    )),
                };
                match answer {
                    Ok(answer) => {
                        if input
                            .write_all(&answer)
                            .and_then(|_| input.flush())
                            .is_err()
                        {
                            return;
                        }
                    }
                    // No answer is made up: the VMM's OOB request times out.
                    Err(RelayError::Refused) => {}
                    Err(e) => {
                        if let Ok(mut v) = seen.lock() {
                            v.push(e.to_string());
                        }
                    }
                }
            }
        }
    });
    let host_path = match rx.recv_timeout(RELAY_START) {
        Ok(Some(p)) if !p.is_empty() => p,
        other => {
            let _ = child.kill();
            let _ = child.wait();
            let _ = pump.join();
            let why = errors.join().unwrap_or_default();
            return Err(err(format!(
                "the host's `hilrig fpga relay-oob` printed no `oob PTY` line ({}){}",
                if other.is_err() { "timed out" } else { "ended" },
                match why.trim() {
                    "" => String::new(),
                    w => format!(": {w}"),
                }
            )));
        }
    };
    Ok(OobRelay {
        child,
        host_path,
        pump: Some(pump),
        faults,
    })
}
