//! The host-bridge protocol: framed requests from the host to the board's bridge
//! (`crate::bridge::HostBridge`) over the FTDI UART, and the bridge's responses.
//!
//! Request: `5A | seq | op | len | fields[len] | crc16-be`
//! Response: `A6 | seq | op | status | data u32-le | crc16-be`  (always 10 bytes)
//!
//! - `seq`: chosen by the host, a new one for each new request (retries reuse it),
//!   echoed in the response. The bridge remembers the last executed request's `seq`
//!   and `op` with its response: a request repeating them is answered from memory
//!   and **not executed again**, so a retried write to a trigger register (FLASH_CMD,
//!   SOFT_RESET) acts once. IDENTIFY always executes and forgets the remembered
//!   request (a host starts a session with it).
//! - `fields`: `addr` (3 bytes, little-endian word address), then `be` (1 byte, byte
//!   enables in bits 3:0), then `data` (4 bytes, little-endian); each op sends a
//!   prefix of them: IDENTIFY and RESET none, ROM_READ `addr`, READ `addr be`,
//!   WRITE `addr be data`.
//! - `crc16`: CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF) over every byte after the
//!   sync byte and before the CRC, sent big-endian (so the CRC over everything after
//!   the sync byte, CRC included, is 0).

use std::fmt;

/// First byte of a request frame.
pub const REQ_SYNC: u8 = 0x5A;
/// First byte of a response frame.
pub const RESP_SYNC: u8 = 0xA6;
/// Bytes of a request frame around its fields (sync, seq, op, len, crc).
pub const REQ_OVERHEAD: usize = 6;
/// Largest `len` of a request.
pub const MAX_FIELDS: usize = 8;
/// Bytes of a response frame.
pub const RESP_LEN: usize = 10;
/// Protocol version, in the top byte of IDENTIFY's data.
pub const VERSION: u8 = 1;

/// Operation codes.
pub mod op {
    /// IDENTIFY: data = `VERSION << 24 | ROM size in words`; forgets the remembered request.
    pub const IDENTIFY: u8 = 0x01;
    /// READ one BAR0 word.
    pub const READ: u8 = 0x02;
    /// WRITE one BAR0 word with byte enables.
    pub const WRITE: u8 = 0x03;
    /// Read one expansion-ROM word.
    pub const ROM_READ: u8 = 0x04;
    /// Reset the device (volatile state).
    pub const RESET: u8 = 0x05;
}

/// Field bytes each op carries, by op code (None: unknown op).
pub fn fields_len(op: u8) -> Option<usize> {
    match op {
        op::IDENTIFY | op::RESET => Some(0),
        op::ROM_READ => Some(3),
        op::READ => Some(4),
        op::WRITE => Some(8),
        _ => None,
    }
}

/// BAR0 word addresses are below this (64 KiB / 4).
pub const BAR0_WORDS: u32 = 1 << 14;
/// Expansion-ROM word addresses are below this (the bus has 18 address bits).
pub const ROM_ADDR_LIMIT: u32 = 1 << 18;

const CRC: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_IBM_3740);

/// CRC-16/CCITT-FALSE of `data`.
pub fn crc16(data: &[u8]) -> u16 {
    CRC.checksum(data)
}

/// A request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Who is there: protocol version and ROM size.
    Identify,
    /// Read the BAR0 word at word address `addr` (byte offset / 4).
    Read {
        /// Word address (below [`BAR0_WORDS`]).
        addr: u32,
        /// Byte enables (bits 3:0).
        be: u8,
    },
    /// Write the bytes of `data` selected by `be` to the BAR0 word at `addr`.
    Write {
        /// Word address (below [`BAR0_WORDS`]).
        addr: u32,
        /// Byte enables (bits 3:0).
        be: u8,
        /// The word.
        data: u32,
    },
    /// Read the expansion-ROM word at word address `addr`.
    RomRead {
        /// Word address (below the ROM size in words).
        addr: u32,
    },
    /// Reset the device: volatile state is lost, nonvolatile state kept.
    Reset,
}

impl Request {
    /// The op code.
    pub fn op(&self) -> u8 {
        match self {
            Request::Identify => op::IDENTIFY,
            Request::Read { .. } => op::READ,
            Request::Write { .. } => op::WRITE,
            Request::RomRead { .. } => op::ROM_READ,
            Request::Reset => op::RESET,
        }
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Identify => write!(f, "IDENTIFY"),
            Request::Read { addr, be } => write!(f, "READ BAR0+{:#x} be {be:#x}", addr * 4),
            Request::Write { addr, be, data } => {
                write!(f, "WRITE BAR0+{:#x} be {be:#x} data {data:#010x}", addr * 4)
            }
            Request::RomRead { addr } => write!(f, "ROM_READ {:#x}", addr * 4),
            Request::Reset => write!(f, "RESET"),
        }
    }
}

/// Response status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Done; `data` holds the result (read data, IDENTIFY word, 0 for writes).
    Ok = 0,
    /// The request's CRC did not match (the request was not executed).
    BadCrc = 1,
    /// Unknown op (not executed).
    BadOp = 2,
    /// `len` wrong for the op or above [`MAX_FIELDS`] (not executed).
    BadLength = 3,
    /// Address out of range or byte enables above 0xF (not executed).
    BadArgument = 4,
    /// The device stayed busy (not ready) past the bridge's timeout (not executed).
    BusyTimeout = 5,
}

impl Status {
    /// The status for a byte, if known.
    pub fn from_u8(v: u8) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::BadCrc,
            2 => Status::BadOp,
            3 => Status::BadLength,
            4 => Status::BadArgument,
            5 => Status::BusyTimeout,
            _ => return None,
        })
    }

    /// Whether the request reached the bridge damaged (worth sending again).
    pub fn is_transit_damage(self) -> bool {
        matches!(self, Status::BadCrc | Status::BadOp | Status::BadLength)
    }
}

/// A response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// The request's sequence number.
    pub seq: u8,
    /// The request's op (as received; 0 when the frame was too damaged to tell).
    pub op: u8,
    /// Outcome.
    pub status: Status,
    /// Result word.
    pub data: u32,
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The frame is empty or shorter than its header says.
    #[error("frame truncated: {got} bytes, {want} expected")]
    Truncated {
        /// Bytes present.
        got: usize,
        /// Bytes the frame needs.
        want: usize,
    },
    /// More bytes than the header says.
    #[error("frame too long: {got} bytes, {want} expected")]
    TooLong {
        /// Bytes present.
        got: usize,
        /// Bytes the frame needs.
        want: usize,
    },
    /// The first byte is not the sync byte.
    #[error("bad sync byte {got:#04x} (expected {want:#04x})")]
    BadSync {
        /// The byte.
        got: u8,
        /// The sync byte.
        want: u8,
    },
    /// CRC mismatch.
    #[error("CRC mismatch: frame says {got:#06x}, computed {want:#06x}")]
    BadCrc {
        /// CRC in the frame.
        got: u16,
        /// CRC of the bytes.
        want: u16,
    },
    /// Unknown op code.
    #[error("unknown op {0:#04x}")]
    BadOp(u8),
    /// `len` wrong for the op.
    #[error("op {op:#04x} carries {len} field bytes, {want} expected")]
    BadLength {
        /// The op.
        op: u8,
        /// The length byte.
        len: u8,
        /// What the op needs.
        want: usize,
    },
    /// A field out of range.
    #[error("bad argument: {0}")]
    BadArgument(String),
    /// Unknown status byte in a response.
    #[error("unknown status {0:#04x}")]
    BadStatus(u8),
}

/// Encode a request frame. Field ranges are not checked here (the bridge answers
/// [`Status::BadArgument`]); see [`Request::check`].
pub fn encode_request(seq: u8, req: &Request) -> Vec<u8> {
    let mut f = Vec::with_capacity(REQ_OVERHEAD + MAX_FIELDS);
    f.extend_from_slice(&[REQ_SYNC, seq, req.op(), 0]);
    match *req {
        Request::Identify | Request::Reset => {}
        Request::RomRead { addr } => f.extend_from_slice(&addr.to_le_bytes()[..3]),
        Request::Read { addr, be } => {
            f.extend_from_slice(&addr.to_le_bytes()[..3]);
            f.push(be);
        }
        Request::Write { addr, be, data } => {
            f.extend_from_slice(&addr.to_le_bytes()[..3]);
            f.push(be);
            f.extend_from_slice(&data.to_le_bytes());
        }
    }
    f[3] = (f.len() - 4) as u8;
    let c = crc16(&f[1..]);
    f.extend_from_slice(&c.to_be_bytes());
    f
}

impl Request {
    /// Check the fields' ranges as the bridge does (`rom_words`: the ROM size in words).
    pub fn check(&self, rom_words: u32) -> Result<(), ProtoError> {
        match *self {
            Request::Read { addr, be } | Request::Write { addr, be, .. } => {
                if addr >= BAR0_WORDS {
                    return Err(ProtoError::BadArgument(format!(
                        "word address {addr:#x} is past BAR0 ({BAR0_WORDS:#x} words)"
                    )));
                }
                if be > 0xf {
                    return Err(ProtoError::BadArgument(format!(
                        "byte enables {be:#x} above 0xf"
                    )));
                }
            }
            Request::RomRead { addr } => {
                if addr >= rom_words {
                    return Err(ProtoError::BadArgument(format!(
                        "ROM word address {addr:#x} is past the ROM ({rom_words:#x} words)"
                    )));
                }
            }
            Request::Identify | Request::Reset => {}
        }
        Ok(())
    }
}

fn check_len(f: &[u8], want: usize) -> Result<(), ProtoError> {
    if f.len() < want {
        return Err(ProtoError::Truncated { got: f.len(), want });
    }
    if f.len() > want {
        return Err(ProtoError::TooLong { got: f.len(), want });
    }
    Ok(())
}

fn check_crc(body: &[u8], crc_bytes: &[u8]) -> Result<(), ProtoError> {
    let got = u16::from_be_bytes([crc_bytes[0], crc_bytes[1]]);
    let want = crc16(body);
    if got != want {
        return Err(ProtoError::BadCrc { got, want });
    }
    Ok(())
}

/// Decode a whole request frame (bridge side; the RTL does the same): framing, CRC,
/// op and length. Returns the sequence number and the request.
pub fn decode_request(f: &[u8]) -> Result<(u8, Request), ProtoError> {
    match f.first() {
        None => return Err(ProtoError::Truncated { got: 0, want: 4 }),
        Some(&REQ_SYNC) => {}
        Some(&b) => {
            return Err(ProtoError::BadSync {
                got: b,
                want: REQ_SYNC,
            })
        }
    }
    if f.len() < 4 {
        return Err(ProtoError::Truncated {
            got: f.len(),
            want: 4,
        });
    }
    let (seq, opc, len) = (f[1], f[2], f[3]);
    if len as usize > MAX_FIELDS {
        return Err(ProtoError::BadLength {
            op: opc,
            len,
            want: fields_len(opc).unwrap_or(MAX_FIELDS),
        });
    }
    let total = REQ_OVERHEAD + len as usize;
    check_len(f, total)?;
    check_crc(&f[1..total - 2], &f[total - 2..])?;
    let want = fields_len(opc).ok_or(ProtoError::BadOp(opc))?;
    if want != len as usize {
        return Err(ProtoError::BadLength { op: opc, len, want });
    }
    let p = &f[4..4 + want];
    let addr = |p: &[u8]| u32::from_le_bytes([p[0], p[1], p[2], 0]);
    let req = match opc {
        op::IDENTIFY => Request::Identify,
        op::RESET => Request::Reset,
        op::ROM_READ => Request::RomRead { addr: addr(p) },
        op::READ => Request::Read {
            addr: addr(p),
            be: p[3],
        },
        _ => Request::Write {
            addr: addr(p),
            be: p[3],
            data: u32::from_le_bytes([p[4], p[5], p[6], p[7]]),
        },
    };
    Ok((seq, req))
}

/// Encode a response frame (what the bridge sends).
pub fn encode_response(r: &Response) -> [u8; RESP_LEN] {
    let d = r.data.to_le_bytes();
    let mut f = [
        RESP_SYNC,
        r.seq,
        r.op,
        r.status as u8,
        d[0],
        d[1],
        d[2],
        d[3],
        0,
        0,
    ];
    let c = crc16(&f[1..8]).to_be_bytes();
    f[8] = c[0];
    f[9] = c[1];
    f
}

/// Decode a whole response frame (host side).
pub fn decode_response(f: &[u8]) -> Result<Response, ProtoError> {
    match f.first() {
        None => {
            return Err(ProtoError::Truncated {
                got: 0,
                want: RESP_LEN,
            })
        }
        Some(&RESP_SYNC) => {}
        Some(&b) => {
            return Err(ProtoError::BadSync {
                got: b,
                want: RESP_SYNC,
            })
        }
    }
    check_len(f, RESP_LEN)?;
    check_crc(&f[1..8], &f[8..10])?;
    let status = Status::from_u8(f[3]).ok_or(ProtoError::BadStatus(f[3]))?;
    Ok(Response {
        seq: f[1],
        op: f[2],
        status,
        data: u32::from_le_bytes([f[4], f[5], f[6], f[7]]),
    })
}

/// Splits the host's incoming byte stream into response frames: bytes before a
/// [`RESP_SYNC`] are skipped; a frame is [`RESP_LEN`] bytes. A damaged frame is
/// reported as such (its bytes are not rescanned: the host retries).
#[derive(Debug, Default)]
pub struct ResponseReader {
    buf: Vec<u8>,
    skipped: u64,
}

impl ResponseReader {
    /// Feed one byte; a whole frame (decoded or not) when one completes.
    pub fn push(&mut self, b: u8) -> Option<Result<Response, ProtoError>> {
        if self.buf.is_empty() && b != RESP_SYNC {
            self.skipped += 1;
            return None;
        }
        self.buf.push(b);
        if self.buf.len() == RESP_LEN {
            let r = decode_response(&self.buf);
            self.buf.clear();
            return Some(r);
        }
        None
    }

    /// Bytes skipped outside frames so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Drop a partial frame.
    pub fn clear(&mut self) {
        self.buf.clear();
    }
}

/// Splits a byte stream into request frames as the bridge does (software twin of
/// the RTL parser, for tests and tools): resync on [`REQ_SYNC`], a frame ends after
/// `len + 6` bytes; a `len` above [`MAX_FIELDS`] ends it at once.
#[derive(Debug, Default)]
pub struct RequestReader {
    buf: Vec<u8>,
}

impl RequestReader {
    /// Feed one byte; the frame's bytes when one completes.
    pub fn push(&mut self, b: u8) -> Option<Vec<u8>> {
        if self.buf.is_empty() && b != REQ_SYNC {
            return None;
        }
        self.buf.push(b);
        if self.buf.len() == 4 && self.buf[3] as usize > MAX_FIELDS {
            return Some(std::mem::take(&mut self.buf));
        }
        if self.buf.len() >= 4 && self.buf.len() == self.buf[3] as usize + REQ_OVERHEAD {
            return Some(std::mem::take(&mut self.buf));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            Just(Request::Identify),
            Just(Request::Reset),
            (0u32..1 << 24).prop_map(|addr| Request::RomRead { addr }),
            (0u32..1 << 24, any::<u8>()).prop_map(|(addr, be)| Request::Read { addr, be }),
            (0u32..1 << 24, any::<u8>(), any::<u32>())
                .prop_map(|(addr, be, data)| Request::Write { addr, be, data }),
        ]
    }

    fn any_status() -> impl Strategy<Value = Status> {
        (0u8..6).prop_map(|v| Status::from_u8(v).unwrap_or(Status::Ok))
    }

    #[test]
    fn crc_is_ccitt_false_and_residue_is_zero() {
        assert_eq!(crc16(b"123456789"), 0x29B1);
        let f = encode_request(
            7,
            &Request::Write {
                addr: 3,
                be: 0xf,
                data: 0xdead_beef,
            },
        );
        assert_eq!(crc16(&f[1..]), 0);
        assert_eq!(f.len(), 14);
    }

    #[test]
    fn errors_name_what_was_wrong() {
        let mut f = encode_request(1, &Request::Identify);
        f[0] = 0;
        assert!(decode_request(&f).unwrap_err().to_string().contains("sync"));
        let f = encode_request(1, &Request::Read { addr: 1, be: 1 });
        assert_eq!(
            decode_request(&f[..5]).unwrap_err(),
            ProtoError::Truncated { got: 5, want: 10 }
        );
        let mut f = vec![REQ_SYNC, 1, 0x77, 0];
        let c = crc16(&f[1..]);
        f.extend_from_slice(&c.to_be_bytes());
        assert_eq!(decode_request(&f).unwrap_err(), ProtoError::BadOp(0x77));
        let mut f = vec![REQ_SYNC, 1, op::READ, 0];
        let c = crc16(&f[1..]);
        f.extend_from_slice(&c.to_be_bytes());
        assert!(matches!(
            decode_request(&f).unwrap_err(),
            ProtoError::BadLength { want: 4, .. }
        ));
        assert!(Request::Read {
            addr: BAR0_WORDS,
            be: 1
        }
        .check(512)
        .is_err());
        assert!(Request::RomRead { addr: 512 }.check(512).is_err());
    }

    #[test]
    fn readers_resync_on_the_sync_byte() {
        let f = encode_response(&Response {
            seq: 3,
            op: op::READ,
            status: Status::Ok,
            data: 5,
        });
        let mut r = ResponseReader::default();
        let mut got = Vec::new();
        for &b in [0x00u8, 0x13].iter().chain(f.iter()) {
            if let Some(x) = r.push(b) {
                got.push(x);
            }
        }
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].as_ref().map(|r| r.data), Ok(5));
        assert_eq!(r.skipped(), 2);
        let q = encode_request(9, &Request::Reset);
        let mut rr = RequestReader::default();
        let frames: Vec<_> = [1u8, 2]
            .iter()
            .chain(q.iter())
            .filter_map(|&b| rr.push(b))
            .collect();
        assert_eq!(frames, vec![q]);
    }

    proptest! {
        #[test]
        fn request_round_trips(seq in any::<u8>(), req in any_request()) {
            let f = encode_request(seq, &req);
            prop_assert_eq!(decode_request(&f), Ok((seq, req)));
        }

        #[test]
        fn response_round_trips(seq in any::<u8>(), op in any::<u8>(), st in any_status(), data in any::<u32>()) {
            let r = Response { seq, op, status: st, data };
            prop_assert_eq!(decode_response(&encode_response(&r)), Ok(r));
        }

        #[test]
        fn any_corrupted_request_byte_is_detected(seq in any::<u8>(), req in any_request(), i in any::<usize>(), x in 1u8..) {
            let mut f = encode_request(seq, &req);
            let i = i % f.len();
            f[i] ^= x;
            prop_assert!(decode_request(&f).is_err(), "byte {} ^ {:#x} undetected", i, x);
        }

        #[test]
        fn any_corrupted_response_byte_is_detected(seq in any::<u8>(), st in any_status(), data in any::<u32>(), i in 0usize..RESP_LEN, x in 1u8..) {
            let mut f = encode_response(&Response { seq, op: op::READ, status: st, data });
            f[i] ^= x;
            prop_assert!(decode_response(&f).is_err(), "byte {} ^ {:#x} undetected", i, x);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = decode_request(&bytes);
            let _ = decode_response(&bytes);
            let mut r = ResponseReader::default();
            let mut q = RequestReader::default();
            for b in bytes { let _ = r.push(b); let _ = q.push(b); }
        }
    }
}
