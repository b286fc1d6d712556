//! A serial port over the network: an RFC 2217 client (telnet with the
//! COM-PORT-OPTION), or a raw TCP byte stream. This is how labgrid exporters
//! publish serial ports (`NetworkSerialPort`, served by ser2net), and what the
//! rig's `rfc2217` console and OOB drivers use.
//!
//! [`NetSerialPort::connect`] opens the TCP connection, negotiates the telnet
//! options (BINARY both ways, SUPPRESS-GO-AHEAD, COM-PORT-OPTION), sets the line
//! (baud, data bits, parity, stop bits, no flow control) and waits until the
//! server acknowledged each setting with the value asked for. Afterwards it is a
//! plain `Read + Write` byte stream: data bytes 0xFF are doubled on the way out and
//! undoubled on the way in, telnet commands and subnegotiations inside the data are
//! answered or dropped, never delivered as data.
//!
//! Everything that can go wrong is a [`NetSerialError`] (or an `io::Error` from
//! `Read`/`Write` carrying the same text) naming `host:port`: a refused option, a
//! server that sets another baud than asked, a subnegotiation longer than
//! [`MAX_SUBNEG`], a peer that closes mid-command. These are transport faults of
//! the rig, never faults of the device behind the port. Buffers are bounded: at
//! most [`MAX_PENDING`] data bytes are held while negotiating (more are dropped and
//! counted), and a read never holds more than one socket read's worth.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Interpret As Command.
pub const IAC: u8 = 255;
const DONT: u8 = 254;
const DO: u8 = 253;
const WONT: u8 = 252;
const WILL: u8 = 251;
const SB: u8 = 250;
const SE: u8 = 240;

/// Telnet BINARY option.
pub const OPT_BINARY: u8 = 0;
/// Telnet SUPPRESS-GO-AHEAD option.
pub const OPT_SGA: u8 = 3;
/// RFC 2217 COM-PORT-OPTION.
pub const OPT_COM_PORT: u8 = 44;

/// COM-PORT-OPTION client commands (the server answers with `+100`).
pub mod cmd {
    /// SET-BAUDRATE (4 bytes, network order).
    pub const SET_BAUDRATE: u8 = 1;
    /// SET-DATASIZE.
    pub const SET_DATASIZE: u8 = 2;
    /// SET-PARITY.
    pub const SET_PARITY: u8 = 3;
    /// SET-STOPSIZE.
    pub const SET_STOPSIZE: u8 = 4;
    /// SET-CONTROL.
    pub const SET_CONTROL: u8 = 5;
    /// Offset of the server's answers.
    pub const SERVER: u8 = 100;
}

/// Largest subnegotiation accepted (bytes between `IAC SB` and `IAC SE`).
pub const MAX_SUBNEG: usize = 64;
/// Most data bytes held while negotiating (more are dropped).
pub const MAX_PENDING: usize = 64 * 1024;

/// Parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    /// None.
    None,
    /// Odd.
    Odd,
    /// Even.
    Even,
}

/// The line settings asked of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineSettings {
    /// Baud rate.
    pub baud: u32,
    /// Data bits (5-8).
    pub data_bits: u8,
    /// Parity.
    pub parity: Parity,
    /// Stop bits (1 or 2).
    pub stop_bits: u8,
}

impl LineSettings {
    /// `baud` 8N1.
    pub fn n81(baud: u32) -> LineSettings {
        LineSettings {
            baud,
            data_bits: 8,
            parity: Parity::None,
            stop_bits: 1,
        }
    }
}

/// How the bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Telnet + RFC 2217 COM-PORT-OPTION (labgrid's default).
    Rfc2217,
    /// Plain TCP bytes; the line is set up by whoever serves the port.
    Raw,
}

/// A telnet stream the decoder cannot follow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A subnegotiation longer than [`MAX_SUBNEG`] bytes.
    #[error("subnegotiation longer than {MAX_SUBNEG} bytes")]
    LongSubnegotiation,
    /// `IAC` followed by something other than `SE` or `IAC` inside a subnegotiation.
    #[error("IAC {0} inside a subnegotiation (expected IAC SE or IAC IAC)")]
    InSubnegotiation(u8),
}

/// Errors of a network serial port; every one names `host:port`.
#[derive(Debug, thiserror::Error)]
pub enum NetSerialError {
    /// Bad settings asked for.
    #[error("serial port {addr}: {what}")]
    Settings {
        /// `host:port`.
        addr: String,
        /// What is wrong.
        what: String,
    },
    /// The TCP connection could not be made.
    #[error("serial port {addr}: cannot connect: {source}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The server refused an option hilrig needs.
    #[error("serial port {addr}: the server refused telnet option {option} ({name})")]
    Refused {
        /// `host:port`.
        addr: String,
        /// The option number.
        option: u8,
        /// Its name.
        name: &'static str,
    },
    /// The server answered a COM-PORT-OPTION setting with another value.
    #[error("serial port {addr}: asked for {what} {asked}, the server set {got}")]
    Mismatch {
        /// `host:port`.
        addr: String,
        /// The setting.
        what: &'static str,
        /// What was asked.
        asked: u32,
        /// What the server answered.
        got: u32,
    },
    /// The telnet stream broke the protocol.
    #[error("serial port {addr}: protocol error: {what}")]
    Protocol {
        /// `host:port`.
        addr: String,
        /// What.
        what: String,
    },
    /// Negotiation did not finish in time.
    #[error("serial port {addr}: negotiation not finished within {after:?} (still waiting for {waiting})")]
    Timeout {
        /// `host:port`.
        addr: String,
        /// How long.
        after: Duration,
        /// What was missing.
        waiting: String,
    },
    /// I/O on the connection (including the peer closing it).
    #[error("serial port {addr}: {source}")]
    Io {
        /// `host:port`.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
}

impl From<NetSerialError> for std::io::Error {
    fn from(e: NetSerialError) -> std::io::Error {
        let kind = match &e {
            NetSerialError::Io { source, .. } | NetSerialError::Connect { source, .. } => {
                source.kind()
            }
            NetSerialError::Timeout { .. } => std::io::ErrorKind::TimedOut,
            _ => std::io::ErrorKind::InvalidData,
        };
        // Keep the addressing text (the kind matters to readers that retry
        // timeouts; a closed peer stays UnexpectedEof).
        let kind = if kind == std::io::ErrorKind::TimedOut || kind == std::io::ErrorKind::WouldBlock
        {
            std::io::ErrorKind::Other
        } else {
            kind
        };
        std::io::Error::new(kind, e.to_string())
    }
}

fn option_name(o: u8) -> &'static str {
    match o {
        OPT_BINARY => "BINARY",
        OPT_SGA => "SUPPRESS-GO-AHEAD",
        OPT_COM_PORT => "COM-PORT-OPTION",
        _ => "unknown",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Data,
    Iac,
    Verb(u8),
    Sb,
    SbIac,
}

/// What the decoder saw besides data.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    /// `IAC verb option` (verb: WILL/WONT/DO/DONT).
    Option(u8, u8),
    /// A complete subnegotiation (without IAC SB / IAC SE).
    Sub(Vec<u8>),
}

/// The telnet receive state machine (bytes in, data and events out).
#[derive(Debug)]
struct Decoder {
    state: State,
    sub: Vec<u8>,
}

impl Decoder {
    fn new() -> Decoder {
        Decoder {
            state: State::Data,
            sub: Vec::new(),
        }
    }

    /// True in the middle of a command or subnegotiation.
    fn mid_command(&self) -> bool {
        self.state != State::Data
    }

    fn feed(
        &mut self,
        bytes: &[u8],
        data: &mut dyn FnMut(u8),
        events: &mut Vec<Event>,
    ) -> Result<(), WireError> {
        for &b in bytes {
            self.state = match (self.state, b) {
                (State::Data, IAC) => State::Iac,
                (State::Data, _) => {
                    data(b);
                    State::Data
                }
                (State::Iac, IAC) => {
                    data(IAC);
                    State::Data
                }
                (State::Iac, WILL | WONT | DO | DONT) => State::Verb(b),
                (State::Iac, SB) => {
                    self.sub.clear();
                    State::Sb
                }
                // NOP, GA, SE out of place, AYT, ...: no data, nothing to do.
                (State::Iac, _) => State::Data,
                (State::Verb(v), o) => {
                    events.push(Event::Option(v, o));
                    State::Data
                }
                (State::Sb, IAC) => State::SbIac,
                (State::Sb, _) => {
                    self.push_sub(b)?;
                    State::Sb
                }
                (State::SbIac, IAC) => {
                    self.push_sub(IAC)?;
                    State::Sb
                }
                (State::SbIac, SE) => {
                    events.push(Event::Sub(std::mem::take(&mut self.sub)));
                    State::Data
                }
                (State::SbIac, other) => return Err(WireError::InSubnegotiation(other)),
            };
        }
        Ok(())
    }

    fn push_sub(&mut self, b: u8) -> Result<(), WireError> {
        if self.sub.len() >= MAX_SUBNEG {
            return Err(WireError::LongSubnegotiation);
        }
        self.sub.push(b);
        Ok(())
    }
}

/// Double every 0xFF (data and subnegotiation values on the wire).
pub fn escape(bytes: &[u8], out: &mut Vec<u8>) {
    for &b in bytes {
        out.push(b);
        if b == IAC {
            out.push(IAC);
        }
    }
}

/// One COM-PORT-OPTION command frame `IAC SB 44 cmd value.. IAC SE`.
pub fn com_port_frame(command: u8, value: &[u8]) -> Vec<u8> {
    let mut f = vec![IAC, SB, OPT_COM_PORT, command];
    escape(value, &mut f);
    f.extend_from_slice(&[IAC, SE]);
    f
}

/// A serial port reached over TCP (RFC 2217 or raw).
#[derive(Debug)]
pub struct NetSerialPort {
    stream: TcpStream,
    addr: String,
    protocol: Protocol,
    decoder: Decoder,
    pending: VecDeque<u8>,
    dropped: u64,
    // Option state: what we said (our side) and what the peer agreed to.
    sent_will: [bool; 256],
    sent_do: [bool; 256],
    peer_do_com_port: bool,
    acks: Vec<(u8, Vec<u8>)>,
}

impl NetSerialPort {
    /// Connect to `host:port` and set the line to `settings` (RFC 2217), within
    /// `timeout` (connecting and negotiating each). Reads then time out every
    /// 20 ms (`ErrorKind::TimedOut`), like the rig's serial ports.
    pub fn connect(
        host: &str,
        port: u16,
        protocol: Protocol,
        settings: LineSettings,
        timeout: Duration,
    ) -> Result<NetSerialPort, NetSerialError> {
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let bad = |what: String| NetSerialError::Settings {
            addr: addr.clone(),
            what,
        };
        if settings.baud == 0 {
            return Err(bad("baud rate 0".into()));
        }
        if !(5..=8).contains(&settings.data_bits) {
            return Err(bad(format!("{} data bits (5-8)", settings.data_bits)));
        }
        if !(1..=2).contains(&settings.stop_bits) {
            return Err(bad(format!("{} stop bits (1 or 2)", settings.stop_bits)));
        }
        let io = |source: std::io::Error| NetSerialError::Connect {
            addr: addr.clone(),
            source,
        };
        let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs().map_err(io)?.collect();
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        let mut stream = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let stream = stream.ok_or_else(|| io(last))?;
        let _ = stream.set_nodelay(true);
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        stream
            .set_read_timeout(Some(Duration::from_millis(20)))
            .map_err(io)?;
        let mut p = NetSerialPort {
            stream,
            addr,
            protocol,
            decoder: Decoder::new(),
            pending: VecDeque::new(),
            dropped: 0,
            sent_will: [false; 256],
            sent_do: [false; 256],
            peer_do_com_port: false,
            acks: Vec::new(),
        };
        if protocol == Protocol::Rfc2217 {
            p.negotiate(settings, timeout)?;
        }
        Ok(p)
    }

    /// `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Data bytes dropped because they arrived (while negotiating) beyond
    /// [`MAX_PENDING`].
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Set how long a read waits before `ErrorKind::TimedOut`.
    pub fn set_read_timeout(&self, t: Duration) -> Result<(), NetSerialError> {
        self.stream
            .set_read_timeout(Some(t))
            .map_err(|source| self.io_err(source))
    }

    fn io_err(&self, source: std::io::Error) -> NetSerialError {
        NetSerialError::Io {
            addr: self.addr.clone(),
            source,
        }
    }

    fn proto_err(&self, what: String) -> NetSerialError {
        NetSerialError::Protocol {
            addr: self.addr.clone(),
            what,
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) -> Result<(), NetSerialError> {
        self.stream
            .write_all(bytes)
            .map_err(|source| NetSerialError::Io {
                addr: self.addr.clone(),
                source,
            })
    }

    fn negotiate(&mut self, s: LineSettings, timeout: Duration) -> Result<(), NetSerialError> {
        let mut hello = Vec::new();
        for (verb, opt) in [
            (WILL, OPT_BINARY),
            (DO, OPT_BINARY),
            (WILL, OPT_SGA),
            (DO, OPT_SGA),
            (WILL, OPT_COM_PORT),
        ] {
            hello.extend_from_slice(&[IAC, verb, opt]);
            if verb == WILL {
                self.sent_will[opt as usize] = true;
            } else {
                self.sent_do[opt as usize] = true;
            }
        }
        self.send_raw(&hello)?;
        let deadline = Instant::now() + timeout;
        // Wait for DO COM-PORT-OPTION before setting the line.
        while !self.peer_do_com_port {
            if Instant::now() > deadline {
                return Err(NetSerialError::Timeout {
                    addr: self.addr.clone(),
                    after: timeout,
                    waiting: "DO COM-PORT-OPTION".into(),
                });
            }
            self.pump(true)?;
        }
        let parity = match s.parity {
            Parity::None => 1u8,
            Parity::Odd => 2,
            Parity::Even => 3,
        };
        let wanted: [(u8, Vec<u8>, &'static str, u32); 4] = [
            (
                cmd::SET_BAUDRATE,
                s.baud.to_be_bytes().to_vec(),
                "baud rate",
                s.baud,
            ),
            (
                cmd::SET_DATASIZE,
                vec![s.data_bits],
                "data bits",
                u32::from(s.data_bits),
            ),
            (cmd::SET_PARITY, vec![parity], "parity", u32::from(parity)),
            (
                cmd::SET_STOPSIZE,
                vec![s.stop_bits],
                "stop bits",
                u32::from(s.stop_bits),
            ),
        ];
        let mut out = Vec::new();
        for (c, v, _, _) in &wanted {
            out.extend(com_port_frame(*c, v));
        }
        // No flow control (acknowledged or not: some servers do not echo it).
        out.extend(com_port_frame(cmd::SET_CONTROL, &[1]));
        self.send_raw(&out)?;
        for (c, v, what, asked) in wanted {
            let got = loop {
                if let Some(i) = self.acks.iter().position(|(k, _)| *k == c + cmd::SERVER) {
                    break self.acks.remove(i).1;
                }
                if Instant::now() > deadline {
                    return Err(NetSerialError::Timeout {
                        addr: self.addr.clone(),
                        after: timeout,
                        waiting: format!("the server's answer to SET {what}"),
                    });
                }
                self.pump(true)?;
            };
            if got != v {
                let got_n = got
                    .iter()
                    .take(4)
                    .fold(0u32, |a, b| (a << 8) | u32::from(*b));
                if got.len() != v.len() {
                    return Err(self.proto_err(format!(
                        "the answer to SET {what} has {} value bytes, expected {}",
                        got.len(),
                        v.len()
                    )));
                }
                return Err(NetSerialError::Mismatch {
                    addr: self.addr.clone(),
                    what,
                    asked,
                    got: got_n,
                });
            }
        }
        self.acks.clear();
        Ok(())
    }

    /// Read once from the socket, decode, answer options. Data goes to
    /// `pending` (bounded while `negotiating`). Returns whether the socket gave
    /// bytes (false: the read timed out).
    fn pump(&mut self, negotiating: bool) -> Result<bool, NetSerialError> {
        let mut buf = [0u8; 4096];
        let n = match self.stream.read(&mut buf) {
            Ok(0) => {
                let what = if self.decoder.mid_command() {
                    "the peer closed the connection in the middle of a telnet command"
                } else {
                    "the peer closed the connection"
                };
                return Err(
                    self.io_err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, what))
                );
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
                return Ok(false)
            }
            Err(e) => return Err(self.io_err(e)),
        };
        if self.protocol == Protocol::Raw {
            self.pending.extend(&buf[..n]);
            return Ok(true);
        }
        let mut events = Vec::new();
        let (pending, dropped) = (&mut self.pending, &mut self.dropped);
        let mut data = |b: u8| {
            if negotiating && pending.len() >= MAX_PENDING {
                *dropped += 1;
            } else {
                pending.push_back(b);
            }
        };
        let res = self.decoder.feed(&buf[..n], &mut data, &mut events);
        if let Err(what) = res {
            return Err(self.proto_err(what.to_string()));
        }
        for ev in events {
            self.handle(ev)?;
        }
        Ok(true)
    }

    fn handle(&mut self, ev: Event) -> Result<(), NetSerialError> {
        match ev {
            Event::Option(verb, opt) => {
                let ours = matches!(opt, OPT_BINARY | OPT_SGA | OPT_COM_PORT);
                let theirs = matches!(opt, OPT_BINARY | OPT_SGA);
                match verb {
                    DO => {
                        if opt == OPT_COM_PORT {
                            self.peer_do_com_port = true;
                        }
                        if !ours {
                            self.send_raw(&[IAC, WONT, opt])?;
                        } else if !self.sent_will[opt as usize] {
                            self.sent_will[opt as usize] = true;
                            self.send_raw(&[IAC, WILL, opt])?;
                        }
                    }
                    DONT => {
                        if matches!(opt, OPT_COM_PORT | OPT_BINARY) {
                            return Err(NetSerialError::Refused {
                                addr: self.addr.clone(),
                                option: opt,
                                name: option_name(opt),
                            });
                        }
                        if self.sent_will[opt as usize] {
                            self.sent_will[opt as usize] = false;
                            self.send_raw(&[IAC, WONT, opt])?;
                        }
                    }
                    WILL => {
                        if !theirs {
                            self.send_raw(&[IAC, DONT, opt])?;
                        } else if !self.sent_do[opt as usize] {
                            self.sent_do[opt as usize] = true;
                            self.send_raw(&[IAC, DO, opt])?;
                        }
                    }
                    WONT => {
                        if opt == OPT_BINARY {
                            return Err(NetSerialError::Refused {
                                addr: self.addr.clone(),
                                option: opt,
                                name: option_name(opt),
                            });
                        }
                        if self.sent_do[opt as usize] {
                            self.sent_do[opt as usize] = false;
                            self.send_raw(&[IAC, DONT, opt])?;
                        }
                    }
                    _ => {}
                }
            }
            Event::Sub(s) => {
                if s.first() == Some(&OPT_COM_PORT) && s.len() >= 2 {
                    let c = s[1];
                    // Answers to our SETs are kept for negotiate(); notifications
                    // (line/modem state, flow control) are not hilrig's business.
                    if (cmd::SERVER + cmd::SET_BAUDRATE..=cmd::SERVER + cmd::SET_CONTROL)
                        .contains(&c)
                        && self.acks.len() < 16
                    {
                        self.acks.push((c, s[2..].to_vec()));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Read for NetSerialPort {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        while self.pending.is_empty() {
            if !self.pump(false)? {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("serial port {}: no data yet", self.addr),
                ));
            }
        }
        let n = out.len().min(self.pending.len());
        for (o, b) in out.iter_mut().zip(self.pending.drain(..n)) {
            *o = b;
        }
        Ok(n)
    }
}

impl Write for NetSerialPort {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.protocol == Protocol::Raw {
            self.send_raw(buf)?;
        } else {
            let mut out = Vec::with_capacity(buf.len() + 8);
            escape(buf, &mut out);
            self.send_raw(&out)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush().map_err(|e| self.io_err(e).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_undoubles_iac_and_splits_commands_across_reads() {
        let mut d = Decoder::new();
        let mut data = Vec::new();
        let mut ev = Vec::new();
        let wire = [
            1,
            IAC,
            IAC,
            2,
            IAC,
            DO,
            OPT_COM_PORT,
            IAC,
            SB,
            OPT_COM_PORT,
            101,
            0,
            1,
            IAC,
            IAC,
            0,
            IAC,
            SE,
            3,
        ];
        // Byte by byte: every split point.
        for b in wire {
            d.feed(&[b], &mut |x| data.push(x), &mut ev).unwrap();
        }
        assert_eq!(data, vec![1, 255, 2, 3]);
        assert_eq!(
            ev,
            vec![
                Event::Option(DO, OPT_COM_PORT),
                Event::Sub(vec![OPT_COM_PORT, 101, 0, 1, 255, 0])
            ]
        );
    }

    #[test]
    fn oversized_and_broken_subnegotiations_are_errors() {
        let mut d = Decoder::new();
        let mut ev = Vec::new();
        let mut long = vec![IAC, SB];
        long.extend(std::iter::repeat_n(7u8, MAX_SUBNEG + 1));
        let e = d.feed(&long, &mut |_| {}, &mut ev).unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
        let mut d = Decoder::new();
        let e = d
            .feed(&[IAC, SB, 44, IAC, 1], &mut |_| {}, &mut ev)
            .unwrap_err();
        assert!(e.to_string().contains("inside a subnegotiation"), "{e}");
    }

    #[test]
    fn escaping_doubles_iac_in_values() {
        assert_eq!(
            com_port_frame(cmd::SET_BAUDRATE, &0x0001_ff00u32.to_be_bytes()),
            vec![IAC, SB, 44, 1, 0, 1, 255, 255, 0, IAC, SE]
        );
    }
}
