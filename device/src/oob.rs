//! The out-of-band (OOB) protocol: framed requests and responses with a CRC, spoken
//! over the device's OOB UART (115200 8N1 by default) and only reachable by the rig.
//!
//! Frame: `A5 | len | seq | cmd | payload[len] | crc16`
//! - `len`: payload length in bytes, at most [`MAX_PAYLOAD`];
//! - `seq`: chosen by the requester, echoed in the response;
//! - `cmd`: request code; a response uses `cmd | 0x80`, an error frame uses `0xFF`
//!   with payload `[error code, request cmd]`;
//! - `crc16`: CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF) over `len..payload`,
//!   little-endian.
//!
//! | cmd | request payload | response payload |
//! |---|---|---|
//! | 0x01 IDENTIFY | - | id u32, version u32, serial u64, width u8 |
//! | 0x02 READ_COUNTERS | - | counter u32 x3, master u32, fuse u8, slots_left u32, width u8, epoch u32 |
//! | 0x03 READ_HASH | region u8 | region u8, SHA-256 [32] |
//! | 0x04 PHYSICAL_RESET | key [32] | epoch u32 (after the reset) |
//!
//! Integers are little-endian. A malformed request (bad sync, bad CRC, truncated,
//! oversized, unknown command, wrong payload length, bad key, bad region) is answered
//! with an error frame; the device never stops answering.

use crate::regmap::{Region, DEVICE_ID_VALUE, DEVICE_VERSION_VALUE};
use crate::state::NvState;
use serde::Serialize;
use std::time::{Duration, Instant};

/// Start-of-frame byte.
pub const SYNC: u8 = 0xA5;
/// Largest payload in either direction.
pub const MAX_PAYLOAD: usize = 64;
/// Bytes of framing around a payload.
pub const OVERHEAD: usize = 6;
/// Default baud rate of the OOB UART.
pub const DEFAULT_BAUD: u32 = 115_200;

/// Request codes.
pub mod cmd {
    /// IDENTIFY.
    pub const IDENTIFY: u8 = 0x01;
    /// READ_COUNTERS.
    pub const READ_COUNTERS: u8 = 0x02;
    /// READ_HASH.
    pub const READ_HASH: u8 = 0x03;
    /// PHYSICAL_RESET.
    pub const PHYSICAL_RESET: u8 = 0x04;
    /// Error response.
    pub const ERROR: u8 = 0xFF;
}

const CRC: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_IBM_3740);

/// CRC-16/CCITT-FALSE of `data`.
pub fn crc16(data: &[u8]) -> u16 {
    CRC.checksum(data)
}

/// Error codes carried in error frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ErrorCode {
    /// The first byte was not SYNC.
    BadSync = 1,
    /// CRC mismatch.
    BadCrc = 2,
    /// Fewer bytes than the length byte announces.
    Truncated = 3,
    /// Length byte above MAX_PAYLOAD, or more bytes than announced.
    Oversized = 4,
    /// Unknown command.
    UnknownCommand = 5,
    /// Payload length wrong for the command.
    BadLength = 6,
    /// PHYSICAL_RESET with a wrong key.
    BadKey = 7,
    /// READ_HASH of a region that does not exist.
    BadRegion = 8,
    /// The device could not persist the change (PHYSICAL_RESET); nothing changed.
    Internal = 9,
    /// PHYSICAL_RESET while another process holds the device's state file (a
    /// simulated device whose VMM runs); nothing changed.
    Busy = 10,
}

impl ErrorCode {
    /// The code for a byte, if known.
    pub fn from_u8(v: u8) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match v {
            1 => BadSync,
            2 => BadCrc,
            3 => Truncated,
            4 => Oversized,
            5 => UnknownCommand,
            6 => BadLength,
            7 => BadKey,
            8 => BadRegion,
            9 => Internal,
            10 => Busy,
            _ => return None,
        })
    }
}

/// An OOB request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Device identity.
    Identify,
    /// All counters, master, fuse, slots left, width, epoch.
    ReadCounters,
    /// SHA-256 of a flash region.
    ReadHash(Region),
    /// The keyed physical reset (clears counters and fuse, increments EPOCH).
    PhysicalReset([u8; 32]),
}

/// Counter readings, as the OOB port reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CounterReport {
    /// Region counters: VBIOS, FIRMWARE, CONFIG.
    pub counters: [u32; 3],
    /// MASTER.
    pub master: u32,
    /// Fuse blown.
    pub fuse: bool,
    /// Attempts left before the fuse blows.
    pub slots_left: u32,
    /// Counter width.
    pub width: u8,
    /// Physical resets so far.
    pub epoch: u32,
}

impl CounterReport {
    /// The report for a nonvolatile state.
    pub fn of(nv: &NvState) -> CounterReport {
        CounterReport {
            counters: nv.counter_values(),
            master: nv.master,
            fuse: nv.fuse,
            slots_left: nv.slots_left(),
            width: nv.config.counter_width,
            epoch: nv.epoch,
        }
    }
}

/// An OOB response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    /// IDENTIFY.
    Identity {
        /// ID register value.
        id: u32,
        /// VERSION register value.
        version: u32,
        /// Serial number.
        serial: u64,
        /// Counter width.
        width: u8,
    },
    /// READ_COUNTERS.
    Counters(CounterReport),
    /// READ_HASH.
    Hash {
        /// The region.
        region: Region,
        /// Its SHA-256, hex.
        #[serde(serialize_with = "hex_ser")]
        sha256: [u8; 32],
    },
    /// PHYSICAL_RESET done.
    ResetDone {
        /// EPOCH after the reset.
        epoch: u32,
    },
    /// Error frame.
    Error {
        /// The error.
        code: ErrorCode,
        /// The request command it answers (0 if unknown).
        request: u8,
    },
}

fn hex_ser<S: serde::Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex_string(v))
}

/// Lower-case hex of bytes.
pub fn hex_string(v: &[u8]) -> String {
    v.iter().map(|b| format!("{b:02x}")).collect()
}

/// Failures of an OOB exchange, seen from the requester.
#[derive(Debug, thiserror::Error)]
pub enum OobError {
    /// The response frame is malformed.
    #[error("malformed OOB response: {0}")]
    Malformed(String),
    /// The device answered with an error frame.
    #[error("device refused OOB request {request:#04x}: {code:?}")]
    Refused {
        /// Error code.
        code: ErrorCode,
        /// The request.
        request: u8,
    },
    /// The response's sequence number does not match.
    #[error("OOB response sequence {got} does not match request {want}")]
    Sequence {
        /// Expected.
        want: u8,
        /// Received.
        got: u8,
    },
    /// No complete response in time.
    #[error("OOB port {port}: no complete response within {timeout:?}")]
    Timeout {
        /// Port.
        port: String,
        /// Timeout.
        timeout: Duration,
    },
    /// I/O error on the port.
    #[error("OOB port {port}: {source}")]
    Io {
        /// Port.
        port: String,
        /// Error.
        source: std::io::Error,
    },
    /// The device backend failed.
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
}

/// Build a frame.
pub fn frame(seq: u8, cmd: u8, payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    let mut f = Vec::with_capacity(payload.len() + OVERHEAD);
    f.push(SYNC);
    f.push(payload.len() as u8);
    f.push(seq);
    f.push(cmd);
    f.extend_from_slice(payload);
    let c = crc16(&f[1..]);
    f.extend_from_slice(&c.to_le_bytes());
    f
}

/// A checked frame: (seq, cmd, payload).
pub type Parsed<'a> = (u8, u8, &'a [u8]);

/// Check a frame's framing. On error returns (seq if known, code, cmd if known).
pub fn parse_frame(f: &[u8]) -> Result<Parsed<'_>, (u8, ErrorCode, u8)> {
    let seq = f.get(2).copied().unwrap_or(0);
    let cmd = f.get(3).copied().unwrap_or(0);
    if f.first() != Some(&SYNC) {
        return Err((0, ErrorCode::BadSync, 0));
    }
    let Some(&len) = f.get(1) else {
        return Err((0, ErrorCode::Truncated, 0));
    };
    let len = len as usize;
    if len > MAX_PAYLOAD {
        return Err((seq, ErrorCode::Oversized, cmd));
    }
    let want = len + OVERHEAD;
    if f.len() < want {
        return Err((seq, ErrorCode::Truncated, cmd));
    }
    if f.len() > want {
        return Err((seq, ErrorCode::Oversized, cmd));
    }
    let c = u16::from_le_bytes([f[want - 2], f[want - 1]]);
    if crc16(&f[1..want - 2]) != c {
        return Err((seq, ErrorCode::BadCrc, cmd));
    }
    Ok((seq, cmd, &f[4..4 + len]))
}

/// Encode a request frame.
pub fn encode_request(seq: u8, req: &Request) -> Vec<u8> {
    match req {
        Request::Identify => frame(seq, cmd::IDENTIFY, &[]),
        Request::ReadCounters => frame(seq, cmd::READ_COUNTERS, &[]),
        Request::ReadHash(r) => frame(seq, cmd::READ_HASH, &[*r as u8]),
        Request::PhysicalReset(k) => frame(seq, cmd::PHYSICAL_RESET, k),
    }
}

/// Decode a request frame (device side).
pub fn decode_request(f: &[u8]) -> Result<(u8, Request), (u8, ErrorCode, u8)> {
    let (seq, c, p) = parse_frame(f)?;
    let need = |n: usize| {
        if p.len() == n {
            Ok(())
        } else {
            Err((seq, ErrorCode::BadLength, c))
        }
    };
    let req = match c {
        cmd::IDENTIFY => {
            need(0)?;
            Request::Identify
        }
        cmd::READ_COUNTERS => {
            need(0)?;
            Request::ReadCounters
        }
        cmd::READ_HASH => {
            need(1)?;
            let r = Region::from_index(p[0] as u32).ok_or((seq, ErrorCode::BadRegion, c))?;
            Request::ReadHash(r)
        }
        cmd::PHYSICAL_RESET => {
            need(32)?;
            let mut k = [0u8; 32];
            k.copy_from_slice(p);
            Request::PhysicalReset(k)
        }
        _ => return Err((seq, ErrorCode::UnknownCommand, c)),
    };
    Ok((seq, req))
}

/// Encode a response frame (device side).
pub fn encode_response(seq: u8, resp: &Response) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    let c = match resp {
        Response::Identity {
            id,
            version,
            serial,
            width,
        } => {
            p.extend_from_slice(&id.to_le_bytes());
            p.extend_from_slice(&version.to_le_bytes());
            p.extend_from_slice(&serial.to_le_bytes());
            p.push(*width);
            cmd::IDENTIFY | 0x80
        }
        Response::Counters(r) => {
            for c in r.counters {
                p.extend_from_slice(&c.to_le_bytes());
            }
            p.extend_from_slice(&r.master.to_le_bytes());
            p.push(r.fuse as u8);
            p.extend_from_slice(&r.slots_left.to_le_bytes());
            p.push(r.width);
            p.extend_from_slice(&r.epoch.to_le_bytes());
            cmd::READ_COUNTERS | 0x80
        }
        Response::Hash { region, sha256 } => {
            p.push(*region as u8);
            p.extend_from_slice(sha256);
            cmd::READ_HASH | 0x80
        }
        Response::ResetDone { epoch } => {
            p.extend_from_slice(&epoch.to_le_bytes());
            cmd::PHYSICAL_RESET | 0x80
        }
        Response::Error { code, request } => {
            p.push(*code as u8);
            p.push(*request);
            cmd::ERROR
        }
    };
    frame(seq, c, &p)
}

/// Decode a response frame (requester side).
pub fn decode_response(f: &[u8]) -> Result<(u8, Response), OobError> {
    let (seq, c, p) =
        parse_frame(f).map_err(|(_, code, _)| OobError::Malformed(format!("{code:?}")))?;
    let len_err =
        |what: &str| OobError::Malformed(format!("{what} response has a {}-byte payload", p.len()));
    let u32_at = |i: usize| u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
    let resp = match c {
        x if x == cmd::IDENTIFY | 0x80 => {
            if p.len() != 17 {
                return Err(len_err("IDENTIFY"));
            }
            let mut s = [0u8; 8];
            s.copy_from_slice(&p[8..16]);
            Response::Identity {
                id: u32_at(0),
                version: u32_at(4),
                serial: u64::from_le_bytes(s),
                width: p[16],
            }
        }
        x if x == cmd::READ_COUNTERS | 0x80 => {
            if p.len() != 26 {
                return Err(len_err("READ_COUNTERS"));
            }
            let fuse = match p[16] {
                0 => false,
                1 => true,
                v => return Err(OobError::Malformed(format!("fuse byte {v}"))),
            };
            Response::Counters(CounterReport {
                counters: [u32_at(0), u32_at(4), u32_at(8)],
                master: u32_at(12),
                fuse,
                slots_left: u32_at(17),
                width: p[21],
                epoch: u32_at(22),
            })
        }
        x if x == cmd::READ_HASH | 0x80 => {
            if p.len() != 33 {
                return Err(len_err("READ_HASH"));
            }
            let region = Region::from_index(p[0] as u32)
                .ok_or_else(|| OobError::Malformed(format!("region {}", p[0])))?;
            let mut h = [0u8; 32];
            h.copy_from_slice(&p[1..]);
            Response::Hash { region, sha256: h }
        }
        x if x == cmd::PHYSICAL_RESET | 0x80 => {
            if p.len() != 4 {
                return Err(len_err("PHYSICAL_RESET"));
            }
            Response::ResetDone { epoch: u32_at(0) }
        }
        cmd::ERROR => {
            if p.len() != 2 {
                return Err(len_err("error"));
            }
            let code = ErrorCode::from_u8(p[0])
                .ok_or_else(|| OobError::Malformed(format!("error code {}", p[0])))?;
            Response::Error {
                code,
                request: p[1],
            }
        }
        other => return Err(OobError::Malformed(format!("response code {other:#04x}"))),
    };
    Ok((seq, resp))
}

/// The device side of the protocol over a nonvolatile state: decode, act, encode.
/// `persist` is called after a PHYSICAL_RESET changed `nv`; if it fails the change is
/// undone and an `Internal` error frame is returned.
pub fn serve(
    nv: &mut NvState,
    request: &[u8],
    persist: &mut dyn FnMut(&NvState) -> bool,
) -> Vec<u8> {
    let (seq, req) = match decode_request(request) {
        Ok(x) => x,
        Err((seq, code, request)) => {
            return encode_response(seq, &Response::Error { code, request })
        }
    };
    let resp = match req {
        Request::Identify => Response::Identity {
            id: DEVICE_ID_VALUE,
            version: DEVICE_VERSION_VALUE,
            serial: nv.serial,
            width: nv.config.counter_width,
        },
        Request::ReadCounters => Response::Counters(CounterReport::of(nv)),
        Request::ReadHash(region) => Response::Hash {
            region,
            sha256: nv.region_hash(region),
        },
        Request::PhysicalReset(key) => {
            if !constant_time_eq(&key, &nv.reset_key) {
                Response::Error {
                    code: ErrorCode::BadKey,
                    request: cmd::PHYSICAL_RESET,
                }
            } else {
                let before = nv.clone();
                nv.physical_reset();
                if persist(nv) {
                    Response::ResetDone { epoch: nv.epoch }
                } else {
                    *nv = before;
                    Response::Error {
                        code: ErrorCode::Internal,
                        request: cmd::PHYSICAL_RESET,
                    }
                }
            }
        }
    };
    encode_response(seq, &resp)
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Splits a byte stream into frames, resynchronising on SYNC after garbage.
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

/// What a byte stream produced.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamEvent {
    /// A complete frame (framing not yet CRC-checked).
    Frame(Vec<u8>),
    /// Bytes before a SYNC that belong to no frame.
    Garbage(usize),
    /// A frame announced a payload above MAX_PAYLOAD; (seq unknown yet).
    Oversized,
}

impl FrameReader {
    /// Feed one byte; returns an event when one completes.
    pub fn push(&mut self, b: u8) -> Option<StreamEvent> {
        if self.buf.is_empty() && b != SYNC {
            return Some(StreamEvent::Garbage(1));
        }
        self.buf.push(b);
        if self.buf.len() == 2 && self.buf[1] as usize > MAX_PAYLOAD {
            self.buf.clear();
            return Some(StreamEvent::Oversized);
        }
        if self.buf.len() >= 2 && self.buf.len() == self.buf[1] as usize + OVERHEAD {
            return Some(StreamEvent::Frame(std::mem::take(&mut self.buf)));
        }
        None
    }

    /// Bytes of an incomplete frame held (a truncated frame when the line goes idle).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Drop an incomplete frame (after an inter-byte timeout); returns it.
    pub fn take_partial(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

/// A requester over any byte transport (a serial port, a PTY, a pipe).
pub struct OobClient<T: std::io::Read + std::io::Write> {
    port: T,
    name: String,
    seq: u8,
    timeout: Duration,
}

/// Open a serial port (or PTY) at `baud`, 8N1, no flow control, reads timing
/// out after `read_timeout`: how every serial line of the rig is opened (OOB
/// ports, relay boards, FPGA bridges).
pub fn serial_8n1(
    path: &str,
    baud: u32,
    read_timeout: Duration,
) -> Result<Box<dyn serialport::SerialPort>, serialport::Error> {
    serialport::new(path, baud)
        .data_bits(serialport::DataBits::Eight)
        .parity(serialport::Parity::None)
        .stop_bits(serialport::StopBits::One)
        .flow_control(serialport::FlowControl::None)
        .timeout(read_timeout)
        .open()
}

/// Open an OOB serial port (or PTY) at `baud`, 8N1, no flow control, reads
/// timing out every 20 ms.
pub fn open_serial_port(
    path: &str,
    baud: u32,
) -> Result<Box<dyn serialport::SerialPort>, OobError> {
    serial_8n1(path, baud, Duration::from_millis(20)).map_err(|e| OobError::Io {
        port: path.to_string(),
        source: std::io::Error::other(e.to_string()),
    })
}

impl OobClient<Box<dyn serialport::SerialPort>> {
    /// Open a serial port (or PTY) at `baud`, 8N1 ([`open_serial_port`]).
    pub fn open_serial(path: &str, baud: u32, timeout: Duration) -> Result<Self, OobError> {
        Ok(Self::new(open_serial_port(path, baud)?, path, timeout))
    }
}

impl<T: std::io::Read + std::io::Write> OobClient<T> {
    /// Wrap a transport; `name` appears in errors.
    pub fn new(port: T, name: &str, timeout: Duration) -> Self {
        OobClient {
            port,
            name: name.to_string(),
            seq: 0,
            timeout,
        }
    }

    fn io(&self, source: std::io::Error) -> OobError {
        OobError::Io {
            port: self.name.clone(),
            source,
        }
    }

    /// Send a request and wait for its response. Error frames become `Refused`.
    pub fn request(&mut self, req: &Request) -> Result<Response, OobError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let f = encode_request(seq, req);
        self.port.write_all(&f).map_err(|e| self.io(e))?;
        self.port.flush().map_err(|e| self.io(e))?;
        let deadline = Instant::now() + self.timeout;
        let mut reader = FrameReader::default();
        let mut byte = [0u8; 64];
        loop {
            if Instant::now() > deadline {
                return Err(OobError::Timeout {
                    port: self.name.clone(),
                    timeout: self.timeout,
                });
            }
            let n = match self.port.read(&mut byte) {
                Ok(0) => {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(self.io(e)),
            };
            for &b in &byte[..n] {
                if let Some(StreamEvent::Frame(fr)) = reader.push(b) {
                    let (rseq, resp) = decode_response(&fr)?;
                    if rseq != seq {
                        // A stale response to an earlier request: skip it.
                        continue;
                    }
                    return match resp {
                        Response::Error { code, request } => {
                            Err(OobError::Refused { code, request })
                        }
                        r => Ok(r),
                    };
                }
            }
        }
    }
}

/// Send a request to an in-process device and decode the response.
pub fn request_device(
    dev: &mut dyn crate::device::Device,
    req: &Request,
) -> Result<Response, OobError> {
    let (seq, resp) = decode_response(&dev.oob(&encode_request(0x5a, req))?)?;
    if seq != 0x5a {
        return Err(OobError::Sequence {
            want: 0x5a,
            got: seq,
        });
    }
    match resp {
        Response::Error { code, request } => Err(OobError::Refused { code, request }),
        r => Ok(r),
    }
}

/// Read the counters of an in-process device over its OOB port.
pub fn read_counters(dev: &mut dyn crate::device::Device) -> Result<CounterReport, OobError> {
    match request_device(dev, &Request::ReadCounters)? {
        Response::Counters(c) => Ok(c),
        other => Err(OobError::Malformed(format!(
            "READ_COUNTERS answered with {other:?}"
        ))),
    }
}

/// How long a partial frame may sit without a new byte before it is answered as truncated.
pub const INTER_BYTE_TIMEOUT: Duration = Duration::from_millis(100);

/// Serve a device's OOB port over a byte transport until `stop()` says so: frames are
/// answered by the device; oversized frames and frames cut short (no byte for
/// [`INTER_BYTE_TIMEOUT`]) get error frames; garbage between frames is skipped.
/// The transport's reads should time out (a few ms) so `stop` is polled.
pub fn serve_stream<T: std::io::Read + std::io::Write>(
    port: &mut T,
    dev: &mut dyn crate::device::Device,
    stop: &dyn Fn() -> bool,
) -> Result<(), crate::device::DeviceError> {
    serve_stream_with(port, &mut |f| dev.oob(f), stop)
}

/// Answers one complete request frame with its response frame.
pub type FrameAnswer<'a> = dyn FnMut(&[u8]) -> Result<Vec<u8>, crate::device::DeviceError> + 'a;

/// Opens the device of a state file (a backend by name, e.g. the model).
pub type StateOpener<'a> = dyn FnMut(&std::path::Path) -> Result<Box<dyn crate::device::Device>, crate::device::DeviceError>
    + 'a;

/// [`serve_stream`] with each complete frame answered by `answer` (e.g. one that
/// opens a state file under its lock for every request: [`serve_state_request`]).
pub fn serve_stream_with<T: std::io::Read + std::io::Write>(
    port: &mut T,
    answer: &mut FrameAnswer<'_>,
    stop: &dyn Fn() -> bool,
) -> Result<(), crate::device::DeviceError> {
    let transport = |e: std::io::Error| crate::device::DeviceError::Transport {
        what: "OOB port".into(),
        detail: e.to_string(),
    };
    let mut reader = FrameReader::default();
    let mut buf = [0u8; 256];
    let mut last_byte = Instant::now();
    while !stop() {
        let n = match port.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                0
            }
            Err(e) => return Err(transport(e)),
        };
        if n == 0 {
            if reader.pending() > 0 && last_byte.elapsed() > INTER_BYTE_TIMEOUT {
                let partial = reader.take_partial();
                let seq = partial.get(2).copied().unwrap_or(0);
                let request = partial.get(3).copied().unwrap_or(0);
                let out = encode_response(
                    seq,
                    &Response::Error {
                        code: ErrorCode::Truncated,
                        request,
                    },
                );
                port.write_all(&out).map_err(transport)?;
            }
            continue;
        }
        last_byte = Instant::now();
        for &b in &buf[..n] {
            let out = match reader.push(b) {
                Some(StreamEvent::Frame(f)) => answer(&f)?,
                Some(StreamEvent::Oversized) => encode_response(
                    0,
                    &Response::Error {
                        code: ErrorCode::Oversized,
                        request: 0,
                    },
                ),
                Some(StreamEvent::Garbage(_)) | None => continue,
            };
            port.write_all(&out).map_err(transport)?;
            port.flush().map_err(transport)?;
        }
    }
    Ok(())
}

/// A device's OOB port served on a new pseudo-terminal: the rig (or `hilrig device oob`)
/// opens [`PtyServer::path`] as a serial port, exactly as it would a real UART.
pub struct PtyServer {
    master: serialport::TTYPort,
    // Held open so the master never sees EIO between clients.
    _slave: serialport::TTYPort,
    path: String,
}

impl PtyServer {
    /// Create the PTY pair.
    pub fn new() -> std::io::Result<PtyServer> {
        let (mut master, slave) =
            serialport::TTYPort::pair().map_err(|e| std::io::Error::other(e.to_string()))?;
        let path = slave
            .name()
            .ok_or_else(|| std::io::Error::other("the PTY has no slave path"))?;
        use serialport::SerialPort;
        master
            .set_timeout(Duration::from_millis(10))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(PtyServer {
            master,
            _slave: slave,
            path,
        })
    }

    /// The path a client opens.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Serve `dev` until `stop()` (see [`serve_stream`]).
    pub fn serve(
        mut self,
        dev: &mut dyn crate::device::Device,
        stop: &dyn Fn() -> bool,
    ) -> Result<(), crate::device::DeviceError> {
        serve_stream(&mut self.master, dev, stop)
    }

    /// Serve with each request answered by `answer` (see [`serve_stream_with`]).
    pub fn serve_with(
        mut self,
        answer: &mut FrameAnswer<'_>,
        stop: &dyn Fn() -> bool,
    ) -> Result<(), crate::device::DeviceError> {
        serve_stream_with(&mut self.master, answer, stop)
    }
}

/// The lock file of a device state file: `.NAME.lock` beside it
/// ([`crate::state::lock_path`]).
pub fn state_lock_path(state: &std::path::Path) -> std::path::PathBuf {
    crate::state::lock_path(state)
}

/// How long [`with_state_lock`] waits for a short-lived holder (another rig action)
/// before it reports the holder.
pub const STATE_LOCK_WAIT: Duration = Duration::from_secs(2);

/// Run `f` holding the exclusive lock of the device state file `state`
/// ([`crate::state::StateLock`]), released when `f` returns, or when the process
/// dies. Every process that reads-modifies-writes the state file outside a running
/// device (an OOB PHYSICAL_RESET, `hilrig counters sim-*`, `hilrig device flash`)
/// takes it, so none writes back a stale snapshot over another's change. A
/// short-lived holder is waited for up to [`STATE_LOCK_WAIT`]; a long-lived one (a
/// running VMM) makes this fail with [`crate::state::StateError::Locked`], naming the
/// file and the holder's pid, before anything is read or written.
pub fn with_state_lock<R>(
    state: &std::path::Path,
    f: impl FnOnce() -> Result<R, crate::device::DeviceError>,
) -> Result<R, crate::device::DeviceError> {
    with_state_lock_within(state, STATE_LOCK_WAIT, f)
}

/// How long an OOB *server* waits for the state file's lock before answering
/// [`ErrorCode::Busy`]: well inside a client's reply timeout (2 s), so a client
/// gets the BUSY frame rather than a transport timeout.
pub const SERVE_LOCK_WAIT: Duration = Duration::from_millis(300);

/// [`with_state_lock`] waiting at most `wait` for a short-lived holder.
pub fn with_state_lock_within<R>(
    state: &std::path::Path,
    wait: Duration,
    f: impl FnOnce() -> Result<R, crate::device::DeviceError>,
) -> Result<R, crate::device::DeviceError> {
    let lock = crate::state::StateLock::acquire_within(state, wait)?;
    let r = f();
    drop(lock);
    r
}

/// Whether OOB request frame `request` may change the device's nonvolatile state
/// (PHYSICAL_RESET): such a request needs the state file's lock; every other request
/// (and a malformed one, which only gets an error frame) only reads.
pub fn writes_state(request: &[u8]) -> bool {
    matches!(decode_request(request), Ok((_, Request::PhysicalReset(_))))
}

/// Answer one OOB request for the device in state file `state`, keeping nothing
/// between requests (no stale snapshot is ever written back).
///
/// Reads (IDENTIFY, READ_COUNTERS, READ_HASH) take no lock: they load the file's
/// current contents, which a holder only ever replaces whole, so they work while a
/// VMM runs on the device and see what it persisted. A PHYSICAL_RESET (a write) is
/// answered under the state file's lock ([`with_state_lock`]); while another process
/// holds it (a running VMM) the request gets a [`ErrorCode::Busy`] error frame and
/// nothing changes.
pub fn serve_state_request(
    state: &std::path::Path,
    open: &mut StateOpener<'_>,
    request: &[u8],
) -> Result<Vec<u8>, crate::device::DeviceError> {
    let result = if writes_state(request) {
        with_state_lock_within(state, SERVE_LOCK_WAIT, || open(state)?.oob(request))
    } else {
        open(state).and_then(|mut d| d.oob(request))
    };
    Ok(match result {
        Ok(out) => out,
        Err(e) => error_frame_for(request, &e),
    })
}

/// The error frame answering `request` when the device behind it failed with `e`:
/// [`ErrorCode::Busy`] when another process holds the state file, else
/// [`ErrorCode::Internal`] (the state file could not be read: a half-written copy by
/// a foreign tool, a permission change). The server keeps serving either way.
pub fn error_frame_for(request: &[u8], e: &crate::device::DeviceError) -> Vec<u8> {
    let code = match e {
        crate::device::DeviceError::State(crate::state::StateError::Locked { .. }) => {
            ErrorCode::Busy
        }
        _ => ErrorCode::Internal,
    };
    encode_response(
        request.get(2).copied().unwrap_or(0),
        &Response::Error {
            code,
            request: request.get(3).copied().unwrap_or(0),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::DeviceConfig;
    use proptest::prelude::*;

    fn nv() -> NvState {
        NvState::factory(DeviceConfig::with_width(4), 9).unwrap()
    }

    fn serve_ok(nv: &mut NvState, f: &[u8]) -> Response {
        decode_response(&serve(nv, f, &mut |_| true)).unwrap().1
    }

    #[test]
    fn every_request_round_trips() {
        let mut s = nv();
        s.count_attempt(Region::Vbios);
        let reqs = [
            Request::Identify,
            Request::ReadCounters,
            Request::ReadHash(Region::Config),
            Request::PhysicalReset(s.reset_key),
        ];
        for r in &reqs {
            assert_eq!(
                decode_request(&encode_request(3, r)).unwrap(),
                (3, r.clone())
            );
        }
        assert_eq!(
            serve_ok(&mut s, &encode_request(1, &Request::ReadCounters)),
            Response::Counters(CounterReport {
                counters: [1, 0, 0],
                master: 1,
                fuse: false,
                slots_left: 3,
                width: 4,
                epoch: 0
            })
        );
        let key = s.reset_key;
        assert_eq!(
            serve_ok(&mut s, &encode_request(1, &Request::PhysicalReset(key))),
            Response::ResetDone { epoch: 1 }
        );
    }

    #[test]
    fn malformed_requests_get_error_frames() {
        let mut s = nv();
        let good = encode_request(7, &Request::ReadCounters);
        let mut badcrc = good.clone();
        badcrc[4] ^= 0xff;
        let unknown = frame(7, 0x42, &[]);
        let badlen = frame(7, cmd::READ_HASH, &[0, 0]);
        let badregion = frame(7, cmd::READ_HASH, &[9]);
        let badkey = encode_request(7, &Request::PhysicalReset([0; 32]));
        let mut oversized = good.clone();
        oversized[1] = 200;
        let mut long = good.clone();
        long.push(0);
        for (f, want) in [
            (&good[..3], ErrorCode::Truncated),
            (&badcrc[..], ErrorCode::BadCrc),
            (&unknown[..], ErrorCode::UnknownCommand),
            (&badlen[..], ErrorCode::BadLength),
            (&badregion[..], ErrorCode::BadRegion),
            (&badkey[..], ErrorCode::BadKey),
            (&oversized[..], ErrorCode::Oversized),
            (&long[..], ErrorCode::Oversized),
            (&[0x00u8][..], ErrorCode::BadSync),
            (&[][..], ErrorCode::BadSync),
        ] {
            match serve_ok(&mut s, f) {
                Response::Error { code, .. } => assert_eq!(code, want, "{f:02x?}"),
                other => panic!("{f:02x?}: {other:?}"),
            }
        }
        // A bad key changed nothing.
        assert_eq!(s.epoch, 0);
    }

    #[test]
    fn failed_persist_undoes_physical_reset() {
        let mut s = nv();
        for _ in 0..4 {
            s.count_attempt(Region::Firmware);
        }
        let key = s.reset_key;
        let out = serve(
            &mut s,
            &encode_request(1, &Request::PhysicalReset(key)),
            &mut |_| false,
        );
        assert!(matches!(
            decode_response(&out).unwrap().1,
            Response::Error {
                code: ErrorCode::Internal,
                ..
            }
        ));
        assert!(s.fuse);
        assert_eq!(s.epoch, 0);
    }

    #[test]
    fn frame_reader_resyncs_after_garbage() {
        let mut r = FrameReader::default();
        let f = encode_request(1, &Request::Identify);
        let mut stream = vec![0x00, 0x13];
        stream.extend_from_slice(&f);
        let events: Vec<_> = stream.iter().filter_map(|&b| r.push(b)).collect();
        assert_eq!(
            events,
            vec![
                StreamEvent::Garbage(1),
                StreamEvent::Garbage(1),
                StreamEvent::Frame(f)
            ]
        );
    }

    proptest! {
        #[test]
        fn arbitrary_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let mut s = nv();
            let out = serve(&mut s, &bytes, &mut |_| true);
            prop_assert!(decode_response(&out).is_ok());
            let _ = decode_response(&bytes);
            let mut r = FrameReader::default();
            for b in bytes { let _ = r.push(b); }
        }
    }
}
