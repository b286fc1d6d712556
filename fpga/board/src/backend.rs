//! The `fpga` device backend: [`Fpga`] speaks the host-bridge protocol
//! ([`crate::proto`]) to a board over any byte [`Transport`] — a serial port (the
//! board's FTDI UART, or a PTY of the simulated board) or an in-memory pipe.
//!
//! Every request carries a new sequence number and a CRC and has a deadline. A
//! response is accepted only if it is whole, its CRC is good, and it echoes the
//! request's sequence number and op; anything else is counted and discarded (a
//! stale response to an earlier request, a duplicate, a damaged frame). A lost,
//! damaged or late response, or a request the bridge reports damaged or could not
//! run (busy), makes the request go out again with the **same** sequence number, a
//! bounded number of times; the bridge answers a repeated request from memory
//! instead of running it again, so a retried write to FLASH_CMD or SOFT_RESET acts
//! once. When the bound is reached the error is `DeviceError::Transport` naming the
//! port, the request and what went wrong; a wrong value is never returned.
//!
//! OOB requests go to the board's second UART ([`Fpga::set_oob`]), one attempt each
//! (PHYSICAL_RESET is not idempotent and the OOB protocol has no replay memory).

use crate::proto::{self, Request, ResponseReader, Status};
use hilrig_device::device::{AccessFault, Device, DeviceError, ResetKind};
use hilrig_device::regmap::BAR0_SIZE;
use std::time::{Duration, Instant};

/// A byte transport to a board.
pub trait Transport: Send {
    /// What to call it in errors (the port path).
    fn name(&self) -> &str;
    /// Send all of `bytes`.
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    /// Receive what is available, waiting up to `timeout` for the first byte.
    /// `Ok(0)`: nothing came within `timeout`.
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize>;
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        (**self).send(bytes)
    }
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize> {
        (**self).recv(buf, timeout)
    }
}

/// A serial port (8N1, no flow control) as a [`Transport`].
pub struct SerialTransport {
    port: Box<dyn serialport::SerialPort>,
    name: String,
    timeout: Duration,
}

impl SerialTransport {
    /// Open `path` at `baud`.
    pub fn open(path: &str, baud: u32) -> Result<SerialTransport, DeviceError> {
        let port =
            hilrig_device::oob::serial_8n1(path, baud, Duration::from_millis(50)).map_err(|e| {
                DeviceError::Transport {
                    what: path.to_string(),
                    detail: format!("cannot open the serial port at {baud} baud: {e}"),
                }
            })?;
        Ok(SerialTransport {
            port,
            name: path.to_string(),
            timeout: Duration::from_millis(50),
        })
    }
}

impl Transport for SerialTransport {
    fn name(&self) -> &str {
        &self.name
    }
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.port.write_all(bytes)?;
        self.port.flush()
    }
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize> {
        if timeout != self.timeout {
            self.port
                .set_timeout(timeout)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            self.timeout = timeout;
        }
        loop {
            return match self.port.read(buf) {
                Ok(n) => Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                    ) =>
                {
                    Ok(0)
                }
                Err(e) => Err(e),
            };
        }
    }
}

/// Retry policy of [`Fpga`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FpgaOptions {
    /// How long to wait for each response.
    pub timeout: Duration,
    /// Extra attempts after the first (so `retries + 1` in all).
    pub retries: u32,
}

impl Default for FpgaOptions {
    /// 100 ms a response (a request and its response take about 2 ms at 115200
    /// baud), 4 retries.
    fn default() -> Self {
        FpgaOptions {
            timeout: Duration::from_millis(100),
            retries: 4,
        }
    }
}

/// What the link has seen (for tests and the bench).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Requests made (not counting retries).
    pub requests: u64,
    /// Requests sent again.
    pub retries: u64,
    /// Waits that ended with no response.
    pub timeouts: u64,
    /// Damaged response frames (bad CRC, sync, status).
    pub corrupted: u64,
    /// Responses discarded for an old sequence number or another op (stale, late,
    /// duplicated).
    pub stale: u64,
    /// Responses saying the request reached the bridge damaged or the device was busy.
    pub refused: u64,
}

/// The `fpga` backend: the reference device on a board, through its host bridge.
pub struct Fpga {
    link: Box<dyn Transport>,
    oob: Option<Box<dyn Transport>>,
    opts: FpgaOptions,
    seq: u8,
    rom_words: u32,
    reader: ResponseReader,
    /// Bytes received after the response that ended the last request (a duplicate
    /// or a late copy): judged, as stale, during the next request.
    leftover: Vec<u8>,
    stats: LinkStats,
}

impl Fpga {
    /// Talk to the bridge on `link` with the default options: IDENTIFY first (which
    /// also makes the bridge forget any request remembered from an earlier session).
    pub fn new(link: Box<dyn Transport>) -> Result<Fpga, DeviceError> {
        Fpga::with_options(link, FpgaOptions::default())
    }

    /// As [`Fpga::new`], with `opts`.
    pub fn with_options(link: Box<dyn Transport>, opts: FpgaOptions) -> Result<Fpga, DeviceError> {
        let mut f = Fpga {
            link,
            oob: None,
            opts,
            seq: 0,
            rom_words: 0,
            reader: ResponseReader::default(),
            leftover: Vec::new(),
            stats: LinkStats::default(),
        };
        let id = f.request(Request::Identify)?;
        let version = (id >> 24) as u8;
        if version != proto::VERSION {
            return Err(f.fail(format!(
                "IDENTIFY answered protocol version {version} (this host speaks {})",
                proto::VERSION
            )));
        }
        f.rom_words = id & 0xff_ffff;
        Ok(f)
    }

    /// Open the board's bridge UART at `path` (`baud`: 115200 for the iCE40 build).
    pub fn open_serial(path: &str, baud: u32) -> Result<Fpga, DeviceError> {
        Fpga::new(Box::new(SerialTransport::open(path, baud)?))
    }

    /// As [`Fpga::open_serial`], with `opts`.
    pub fn open_serial_with(path: &str, baud: u32, opts: FpgaOptions) -> Result<Fpga, DeviceError> {
        Fpga::with_options(Box::new(SerialTransport::open(path, baud)?), opts)
    }

    /// Use `t` (the board's OOB UART) for [`Device::oob`].
    pub fn set_oob(&mut self, t: Box<dyn Transport>) {
        self.oob = Some(t);
    }

    /// The link's counters.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// The transport's name.
    pub fn port(&self) -> &str {
        self.link.name()
    }

    fn fail(&self, detail: String) -> DeviceError {
        DeviceError::Transport {
            what: self.link.name().to_string(),
            detail,
        }
    }

    /// One request, with retries; the response's data word.
    pub fn request(&mut self, req: Request) -> Result<u32, DeviceError> {
        self.stats.requests += 1;
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let frame = proto::encode_request(seq, &req);
        let mut last = String::from("nothing received");
        let mut buf = [0u8; 256];
        for attempt in 0..=self.opts.retries {
            if attempt > 0 {
                self.stats.retries += 1;
            }
            self.reader.clear();
            if let Err(e) = self.link.send(&frame) {
                return Err(self.fail(format!("{req} (seq {seq}): sending failed: {e}")));
            }
            let deadline = Instant::now() + self.opts.timeout;
            'wait: loop {
                let remaining = deadline.saturating_duration_since(Instant::now());
                let n = if !self.leftover.is_empty() {
                    let n = self.leftover.len().min(buf.len());
                    buf[..n].copy_from_slice(&self.leftover[..n]);
                    self.leftover.drain(..n);
                    n
                } else if remaining.is_zero() {
                    0
                } else {
                    match self.link.recv(&mut buf, remaining) {
                        Ok(n) => n,
                        Err(e) => {
                            return Err(
                                self.fail(format!("{req} (seq {seq}): receiving failed: {e}"))
                            )
                        }
                    }
                };
                if n == 0 {
                    self.stats.timeouts += 1;
                    last = format!("no response within {:?}", self.opts.timeout);
                    break 'wait;
                }
                let mut again = false;
                for (i, &b) in buf[..n].iter().enumerate() {
                    match self.reader.push(b) {
                        None => {}
                        Some(Err(e)) => {
                            self.stats.corrupted += 1;
                            last = format!("damaged response ({e})");
                            again = true;
                        }
                        Some(Ok(r)) if r.seq != seq || r.op != req.op() => {
                            // Stale (an earlier request's, late or duplicated): skip.
                            self.stats.stale += 1;
                        }
                        Some(Ok(r)) => match r.status {
                            Status::Ok => {
                                self.leftover.extend_from_slice(&buf[i + 1..n]);
                                self.reader.clear();
                                return Ok(r.data);
                            }
                            Status::BadArgument => {
                                return Err(self.fail(format!(
                                    "{req} (seq {seq}): the bridge refused the arguments"
                                )))
                            }
                            s => {
                                self.stats.refused += 1;
                                last = format!("the bridge answered {s:?}");
                                again = true;
                            }
                        },
                    }
                }
                if again {
                    break 'wait;
                }
            }
        }
        Err(self.fail(format!(
            "{req} (seq {seq}): no valid response after {} attempts; last: {last}",
            self.opts.retries + 1
        )))
    }

    fn check_word(word: u32) -> Result<(), DeviceError> {
        if word % 4 != 0 || word as u64 >= BAR0_SIZE {
            return Err(DeviceError::Access {
                offset: word as u64,
                len: 4,
                reason: AccessFault::OutOfRange,
            });
        }
        Ok(())
    }
}

impl Device for Fpga {
    fn read_word(&mut self, word: u32, mask: u8) -> Result<u32, DeviceError> {
        Fpga::check_word(word)?;
        self.request(Request::Read {
            addr: word / 4,
            be: mask & 0xf,
        })
    }

    fn write_word(&mut self, word: u32, value: u32, mask: u8) -> Result<(), DeviceError> {
        Fpga::check_word(word)?;
        self.request(Request::Write {
            addr: word / 4,
            be: mask & 0xf,
            data: value,
        })
        .map(|_| ())
    }

    fn rom_size(&self) -> u64 {
        self.rom_words as u64 * 4
    }

    fn rom_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        let size = self.rom_size();
        hilrig_device::device::rom_read_by_words(offset, data, size, |w| {
            self.request(Request::RomRead {
                addr: (w / 4) as u32,
            })
        })
    }

    /// All three kinds clear the device's volatile state (RESET over the bridge); a
    /// board's power cycle would also lose the nonvolatile state (see `top`), so it
    /// is not offered separately.
    fn reset(&mut self, _kind: ResetKind) -> Result<(), DeviceError> {
        self.request(Request::Reset).map(|_| ())
    }

    fn oob(&mut self, request: &[u8]) -> Result<Vec<u8>, DeviceError> {
        let timeout = self.opts.timeout.max(Duration::from_millis(500));
        let Some(t) = self.oob.as_mut() else {
            return Err(DeviceError::Unsupported {
                backend: "fpga (no OOB port given)",
                what: "out-of-band requests",
            });
        };
        let fail = |t: &dyn Transport, detail: String| DeviceError::Transport {
            what: t.name().to_string(),
            detail,
        };
        t.send(request)
            .map_err(|e| fail(&**t, format!("OOB request: sending failed: {e}")))?;
        let mut reader = hilrig_device::oob::FrameReader::default();
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 128];
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let n = if remaining.is_zero() {
                0
            } else {
                t.recv(&mut buf, remaining)
                    .map_err(|e| fail(&**t, format!("OOB response: receiving failed: {e}")))?
            };
            if n == 0 {
                return Err(fail(
                    &**t,
                    format!(
                        "no complete OOB response within {timeout:?} (partial: {} bytes)",
                        reader.pending()
                    ),
                ));
            }
            for &b in &buf[..n] {
                match reader.push(b) {
                    Some(hilrig_device::oob::StreamEvent::Frame(f)) => return Ok(f),
                    Some(hilrig_device::oob::StreamEvent::Oversized) => {
                        return Err(fail(
                            &**t,
                            "OOB response announces an oversized payload".into(),
                        ))
                    }
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{encode_response, op, Response};
    use std::collections::VecDeque;

    type Script = Box<dyn FnMut(u64, &[u8]) -> Vec<u8> + Send>;

    /// A transport answering each send with bytes a script computes from the request.
    struct Scripted {
        script: Script,
        sends: u64,
        out: VecDeque<u8>,
    }

    impl Transport for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }
        fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            let r = (self.script)(self.sends, bytes);
            self.sends += 1;
            self.out.extend(r);
            Ok(())
        }
        fn recv(&mut self, buf: &mut [u8], _t: Duration) -> std::io::Result<usize> {
            let n = buf.len().min(self.out.len());
            for (d, b) in buf.iter_mut().zip(self.out.drain(..n)) {
                *d = b;
            }
            Ok(n)
        }
    }

    fn resp(seq: u8, op: u8, status: Status, data: u32) -> Vec<u8> {
        encode_response(&Response {
            seq,
            op,
            status,
            data,
        })
        .to_vec()
    }

    /// An `Fpga` whose IDENTIFY (send 0) is answered well and whose later sends go
    /// to `script` (numbered from 0).
    fn fpga(mut script: impl FnMut(u64, u8, u8) -> Vec<u8> + Send + 'static) -> Fpga {
        let t = Scripted {
            script: Box::new(move |n, req| {
                let (seq, opc) = (req[1], req[2]);
                if n == 0 {
                    return resp(seq, op::IDENTIFY, Status::Ok, (1 << 24) | 512);
                }
                script(n - 1, seq, opc)
            }),
            sends: 0,
            out: VecDeque::new(),
        };
        Fpga::new(Box::new(t)).expect("identify")
    }

    #[test]
    fn stale_and_foreign_responses_are_discarded() {
        let mut f = fpga(|_, seq, opc| {
            let mut v = resp(seq.wrapping_sub(1), opc, Status::Ok, 0xbad);
            v.extend(resp(seq, op::WRITE, Status::Ok, 0xbad2));
            v.extend([0x00, 0x13]);
            v.extend(resp(seq, opc, Status::Ok, 0x600d));
            v
        });
        assert_eq!(f.read_word(0, 0xf).unwrap(), 0x600d);
        assert_eq!(f.stats().stale, 2);
        assert_eq!(f.stats().retries, 0);
        assert_eq!(f.rom_size(), 2048);
    }

    #[test]
    fn damaged_then_good_is_retried_once() {
        let mut f = fpga(|n, seq, opc| {
            let mut r = resp(seq, opc, Status::Ok, 7);
            if n == 0 {
                r[5] ^= 1;
            }
            r
        });
        assert_eq!(f.read_word(4, 0xf).unwrap(), 7);
        assert_eq!((f.stats().corrupted, f.stats().retries), (1, 1));
    }

    #[test]
    fn bridge_statuses() {
        // BadCrc then Ok: retried. BadArgument: reported at once, naming the port.
        let mut f = fpga(|n, seq, opc| match n {
            0 => resp(seq, opc, Status::BadCrc, 0),
            1 => resp(seq, opc, Status::Ok, 0),
            _ => resp(seq, opc, Status::BadArgument, 0),
        });
        f.write_word(8, 1, 0xf).unwrap();
        assert_eq!(f.stats().refused, 1);
        let e = f.read_word(8, 0xf).unwrap_err().to_string();
        assert!(
            e.contains("scripted") && e.contains("refused the arguments"),
            "{e}"
        );
        assert!(f.read_word(0x1_0000, 0xf).is_err(), "past BAR0");
    }

    #[test]
    fn silence_is_an_error_after_the_bound() {
        let mut f = fpga(|_, _, _| Vec::new());
        let e = f.read_word(0, 0xf).unwrap_err().to_string();
        assert!(e.contains("5 attempts") && e.contains("no response"), "{e}");
        assert_eq!(f.stats().retries, 4);
    }

    #[test]
    fn wrong_protocol_version_is_refused() {
        let t = Scripted {
            script: Box::new(|_, req| resp(req[1], req[2], Status::Ok, 9 << 24)),
            sends: 0,
            out: VecDeque::new(),
        };
        let e = Fpga::new(Box::new(t)).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("protocol version 9")));
    }
}
