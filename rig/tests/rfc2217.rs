//! The RFC 2217 client against byte-level peers (an in-test telnet server with
//! COM-PORT-OPTION): negotiation, IAC doubling both ways, option refusals, a
//! server that sets another baud, a peer that closes mid-command or mid-frame (a
//! transport error naming host:port, never a device fault), and the rig's
//! `rfc2217` OOB and console drivers. (Against labgrid's exporter + ser2net:
//! tests/labgrid.rs.)

use hilrig_device::model::{ops, Model};
use hilrig_device::oob::{OobClient, OobError, Request};
use hilrig_device::regmap::Region;
use hilrig_device::state::{DeviceConfig, NvState};
use hilrig_rig::rfc2217::{
    LineSettings, NetSerialError, NetSerialPort, Protocol, IAC, OPT_BINARY, OPT_COM_PORT, OPT_SGA,
};
use hilrig_rig::{ErrorKind, Rig};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

const WILL: u8 = 251;
const WONT: u8 = 252;
const DO: u8 = 253;
const DONT: u8 = 254;
const SB: u8 = 250;
const SE: u8 = 240;

/// What the in-test server's telnet parser saw.
#[derive(Debug, Default)]
struct Seen {
    options: Vec<(u8, u8)>,
    subs: Vec<Vec<u8>>,
    data: Vec<u8>,
}

/// A minimal server-side telnet reader over a stream (blocking, with a timeout).
struct Peer {
    s: TcpStream,
    state: u8, // 0 data, 1 iac, 2 verb, 3 sb, 4 sb-iac
    verb: u8,
    sub: Vec<u8>,
    seen: Seen,
}

impl Peer {
    fn new(s: TcpStream) -> Peer {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        Peer {
            s,
            state: 0,
            verb: 0,
            sub: Vec::new(),
            seen: Seen::default(),
        }
    }

    /// Read what is there (one read); false when the client closed.
    fn pump(&mut self) -> bool {
        let mut b = [0u8; 4096];
        let n = match self.s.read(&mut b) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(_) => return true,
        };
        for &x in &b[..n] {
            match (self.state, x) {
                (0, IAC) => self.state = 1,
                (0, _) => self.seen.data.push(x),
                (1, IAC) => {
                    self.seen.data.push(IAC);
                    self.state = 0
                }
                (1, SB) => {
                    self.sub.clear();
                    self.state = 3
                }
                (1, v) if v >= WILL => {
                    self.verb = v;
                    self.state = 2
                }
                (1, _) => self.state = 0,
                (2, o) => {
                    self.seen.options.push((self.verb, o));
                    self.state = 0
                }
                (3, IAC) => self.state = 4,
                (3, _) => self.sub.push(x),
                (4, SE) => {
                    self.seen.subs.push(std::mem::take(&mut self.sub));
                    self.state = 0
                }
                (4, _) => {
                    self.sub.push(x);
                    self.state = 3
                }
                _ => unreachable!(),
            }
        }
        true
    }

    /// Pump until `f` holds (bounded).
    fn until(&mut self, f: impl Fn(&Seen) -> bool) {
        let t0 = Instant::now();
        while !f(&self.seen) {
            assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", self.seen);
            if !self.pump() {
                return;
            }
        }
    }

    fn send(&mut self, b: &[u8]) {
        let _ = self.s.write_all(b);
    }

    /// Agree to everything and answer the four SETs (with `baud_answer` for
    /// SET-BAUDRATE, or echo the value when None).
    fn negotiate(&mut self, baud_answer: Option<u32>) {
        self.until(|s| s.options.contains(&(WILL, OPT_COM_PORT)));
        self.send(&[
            IAC,
            DO,
            OPT_BINARY,
            IAC,
            WILL,
            OPT_BINARY,
            IAC,
            DO,
            OPT_SGA,
            IAC,
            WILL,
            OPT_SGA,
            // Something nobody asked for: the client must refuse it.
            IAC,
            DO,
            24,
            IAC,
            DO,
            OPT_COM_PORT,
        ]);
        self.until(|s| s.subs.iter().filter(|x| x.first() == Some(&44)).count() >= 4);
        let subs = self.seen.subs.clone();
        for sub in subs {
            if sub.len() < 2 || sub[0] != OPT_COM_PORT || sub[1] > 4 {
                continue;
            }
            let mut val = sub[2..].to_vec();
            if sub[1] == 1 {
                if let Some(b) = baud_answer {
                    val = b.to_be_bytes().to_vec();
                }
            }
            let mut f = vec![IAC, SB, OPT_COM_PORT, sub[1] + 100];
            for v in val {
                f.push(v);
                if v == IAC {
                    f.push(IAC);
                }
            }
            f.extend([IAC, SE]);
            self.send(&f);
        }
    }
}

/// A one-connection server running `f` on a thread; its port.
fn serve(f: impl FnOnce(Peer) + Send + 'static) -> (u16, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        f(Peer::new(s))
    });
    (port, t)
}

fn connect(port: u16, baud: u32) -> Result<NetSerialPort, NetSerialError> {
    NetSerialPort::connect(
        "127.0.0.1",
        port,
        Protocol::Rfc2217,
        LineSettings::n81(baud),
        Duration::from_secs(10),
    )
}

fn read_n(p: &mut NetSerialPort, n: usize) -> std::io::Result<Vec<u8>> {
    let mut got = Vec::new();
    let t0 = Instant::now();
    let mut b = [0u8; 512];
    while got.len() < n {
        assert!(t0.elapsed() < Duration::from_secs(20), "got {got:?}");
        match p.read(&mut b) {
            Ok(k) => got.extend_from_slice(&b[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[test]
fn negotiates_and_moves_every_byte_value_both_ways() {
    // 0x0001_FEFF: a baud whose value bytes hold an IAC (doubled inside SB).
    let baud = 0x0001_feff;
    let (port, t) = serve(move |mut p| {
        p.negotiate(None);
        // The client refused the option nobody asked for.
        p.until(|s| s.options.contains(&(WONT, 24)));
        let all: Vec<u8> = (0..=255u8).collect();
        p.until(|s| s.data.len() >= 512);
        assert_eq!(p.seen.data[..256], all[..], "client->server bytes");
        assert_eq!(p.seen.data[256..512], all[..], "client->server bytes");
        // Server -> client: every value doubled as needed, with a NOP, a modem
        // state notification and an option request mixed into the data.
        let mut out = Vec::new();
        for v in 0..=255u8 {
            out.push(v);
            if v == IAC {
                out.push(IAC);
            }
            if v == 100 {
                out.extend([IAC, 241, IAC, SB, OPT_COM_PORT, 107, 0x30, IAC, SE]);
                out.extend([IAC, WILL, 1]); // ECHO: the client says DONT
            }
        }
        p.send(&out);
        p.until(|s| s.options.contains(&(DONT, 1)));
        // Let the client read before closing.
        p.until(|s| s.data.len() >= 513);
    });
    let mut c = connect(port, baud).unwrap();
    let all: Vec<u8> = (0..=255u8).collect();
    c.write_all(&all).unwrap();
    c.write_all(&all).unwrap();
    c.flush().unwrap();
    assert_eq!(read_n(&mut c, 256).unwrap(), all);
    c.write_all(b"!").unwrap();
    t.join().unwrap();
}

#[test]
fn the_sets_carry_the_line_settings() {
    let (port, t) = serve(|mut p| {
        p.negotiate(None);
        let subs: Vec<Vec<u8>> = p.seen.subs.clone();
        assert!(subs.contains(&vec![44, 1, 0, 0, 0x25, 0x80]), "{subs:?}"); // 9600
        assert!(subs.contains(&vec![44, 2, 8]), "{subs:?}");
        assert!(subs.contains(&vec![44, 3, 1]), "{subs:?}"); // no parity
        assert!(subs.contains(&vec![44, 4, 1]), "{subs:?}");
        assert!(p.seen.options.contains(&(WILL, OPT_BINARY)));
        assert!(p.seen.options.contains(&(DO, OPT_BINARY)));
        p.until(|s| s.data == b"x");
    });
    let mut c = connect(port, 9600).unwrap();
    c.write_all(b"x").unwrap();
    t.join().unwrap();
}

#[test]
fn a_refused_com_port_option_is_a_clear_error() {
    let (port, t) = serve(|mut p| {
        p.until(|s| s.options.contains(&(WILL, OPT_COM_PORT)));
        p.send(&[IAC, DONT, OPT_COM_PORT]);
        p.until(|_| false);
    });
    let e = connect(port, 115_200).unwrap_err();
    let s = e.to_string();
    assert!(
        matches!(e, NetSerialError::Refused { option: 44, .. }),
        "{s}"
    );
    assert!(
        s.contains(&format!("127.0.0.1:{port}")) && s.contains("COM-PORT-OPTION"),
        "{s}"
    );
    drop(e);
    t.join().unwrap();
}

#[test]
fn a_refused_binary_mode_is_a_clear_error() {
    let (port, t) = serve(|mut p| {
        p.until(|s| s.options.contains(&(WILL, OPT_COM_PORT)));
        p.send(&[IAC, WONT, OPT_BINARY]);
        p.until(|_| false);
    });
    let e = connect(port, 115_200).unwrap_err();
    assert!(
        matches!(e, NetSerialError::Refused { option: 0, .. }),
        "{e}"
    );
    t.join().unwrap();
}

#[test]
fn a_server_that_sets_another_baud_is_refused() {
    let (port, t) = serve(|mut p| {
        p.negotiate(Some(9600));
        p.until(|_| false);
    });
    let e = connect(port, 115_200).unwrap_err();
    match &e {
        NetSerialError::Mismatch { asked, got, .. } => assert_eq!((*asked, *got), (115_200, 9600)),
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    t.join().unwrap();
}

#[test]
fn a_silent_server_times_out_and_no_server_is_a_connect_error() {
    let (port, t) = serve(|mut p| {
        p.until(|s| s.options.contains(&(WILL, OPT_COM_PORT)));
        // Answers nothing; waits for the client to give up.
        p.until(|_| false);
    });
    let e = NetSerialPort::connect(
        "127.0.0.1",
        port,
        Protocol::Rfc2217,
        LineSettings::n81(115_200),
        Duration::from_millis(300),
    )
    .unwrap_err();
    assert!(
        matches!(e, NetSerialError::Timeout { .. }) && e.to_string().contains("DO COM-PORT"),
        "{e}"
    );
    t.join().unwrap();
    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = connect(free, 115_200).unwrap_err();
    assert!(
        matches!(e, NetSerialError::Connect { .. })
            && e.to_string().contains(&format!("127.0.0.1:{free}")),
        "{e}"
    );
}

#[test]
fn a_peer_closing_mid_command_is_a_transport_error() {
    let (port, t) = serve(|mut p| {
        p.negotiate(None);
        p.send(&[b'a', IAC, SB, OPT_COM_PORT, 107]);
        // closed here (dropped)
    });
    let mut c = connect(port, 115_200).unwrap();
    t.join().unwrap();
    assert_eq!(read_n(&mut c, 1).unwrap(), b"a");
    let e = read_n(&mut c, 1).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    let s = e.to_string();
    assert!(
        s.contains(&format!("127.0.0.1:{port}")) && s.contains("middle of a telnet command"),
        "{s}"
    );
}

#[test]
fn an_oversized_subnegotiation_is_a_protocol_error_not_a_hang() {
    let (port, t) = serve(|mut p| {
        p.negotiate(None);
        // Only once the client is past negotiation (it says so with a byte).
        p.until(|s| s.data == b"go");
        let mut f = vec![IAC, SB, OPT_COM_PORT];
        f.extend(std::iter::repeat_n(7u8, 10_000));
        p.send(&f);
        p.until(|_| false);
    });
    let mut c = connect(port, 115_200).unwrap();
    c.write_all(b"go").unwrap();
    let e = read_n(&mut c, 1).unwrap_err();
    assert!(e.to_string().contains("longer than"), "{e}");
    drop(c);
    t.join().unwrap();
}

fn model(dir: &std::path::Path) -> Model {
    let state = dir.join("dev.state");
    let mut m = Model::create(
        &state,
        NvState::factory(DeviceConfig::with_width(6), 77).unwrap(),
    )
    .unwrap();
    ops::unlock(&mut m).unwrap();
    ops::erase(&mut m, Region::Firmware).unwrap();
    m
}

/// An RFC 2217 server in front of a device model's OOB port (what ser2net does
/// for a real UART), answering whole frames; `cut` sends only the first bytes
/// of the first response and closes.
fn oob_server(dir: &std::path::Path, cut: bool) -> (u16, std::thread::JoinHandle<()>) {
    let mut m = model(dir);
    serve(move |mut p| {
        p.negotiate(None);
        let mut used = 0;
        loop {
            if !p.pump() {
                return;
            }
            // OOB frames: SYNC len seq cmd payload crc16.
            let d = &p.seen.data[used..];
            if d.len() >= 6 && d.len() >= 6 + d[1] as usize {
                let n = 6 + d[1] as usize;
                let req = d[..n].to_vec();
                used += n;
                let resp = hilrig_device::device::Device::oob(&mut m, &req).unwrap();
                let mut out = Vec::new();
                for b in resp {
                    out.push(b);
                    if b == IAC {
                        out.push(IAC);
                    }
                }
                if cut {
                    p.send(&out[..3]);
                    return;
                }
                p.send(&out);
            }
        }
    })
}

#[test]
fn oob_over_rfc2217_reads_the_device_and_a_cut_frame_is_a_transport_fault() {
    let d = tempfile::tempdir().unwrap();
    let (port, t) = oob_server(d.path(), false);
    let c = connect(port, 115_200).unwrap();
    let mut o = OobClient::new(c, "net", Duration::from_secs(10));
    let r = o.request(&Request::ReadCounters).unwrap();
    match r {
        hilrig_device::oob::Response::Counters(c) => {
            assert_eq!((c.counters, c.master, c.width), ([0, 1, 0], 1, 6))
        }
        other => panic!("{other:?}"),
    }
    drop(o);
    t.join().unwrap();

    // The rig's `rfc2217` OOB driver, and a peer that dies mid-frame.
    let d2 = tempfile::tempdir().unwrap();
    let (port, t) = oob_server(d2.path(), true);
    let inv = d2.path().join("lab.toml");
    std::fs::write(
        &inv,
        format!(
            "[[host]]\nname = \"net-1\"\n[host.power]\ndriver = \"command\"\non = \"true\"\noff = \"true\"\nstatus = \"echo on\"\n\
             [host.oob]\ndriver = \"rfc2217\"\nhost = \"127.0.0.1\"\nport = {port}\ntimeout_ms = 10000\n"
        ),
    )
    .unwrap();
    let rig = Rig::load(&inv).unwrap();
    let e = rig.read_counters("net-1").unwrap_err();
    t.join().unwrap();
    let s = e.to_string();
    assert_eq!(e.kind(), ErrorKind::Infra, "{s}");
    assert!(
        s.contains("net-1")
            && s.contains("oob/rfc2217")
            && s.contains(&format!("127.0.0.1:{port}")),
        "{s}"
    );
    assert!(
        s.contains("closed the connection"),
        "a transport fault: {s}"
    );

    // The client's own error for the same cut: Io (transport), not a refusal or
    // a malformed answer from the device.
    let d3 = tempfile::tempdir().unwrap();
    let (port, t) = oob_server(d3.path(), true);
    let mut o = OobClient::new(
        connect(port, 115_200).unwrap(),
        "net",
        Duration::from_secs(10),
    );
    let e = o.request(&Request::ReadCounters).unwrap_err();
    t.join().unwrap();
    assert!(matches!(e, OobError::Io { .. }), "{e}");
}

#[test]
fn rfc2217_console_is_captured_through_the_rig() {
    let d = tempfile::tempdir().unwrap();
    let (port, t) = serve(|mut p| {
        p.negotiate(None);
        p.send(b"BIOS \xff\xff v1\r\nbooting\r\n");
        // Wait for the capture to end (the client closes).
        while p.pump() {}
    });
    let inv = d.path().join("lab.toml");
    std::fs::write(
        &inv,
        format!(
            "[[host]]\nname = \"net-1\"\n[host.power]\ndriver = \"command\"\non = \"true\"\noff = \"true\"\nstatus = \"echo on\"\n\
             [[host.console]]\nname = \"com1\"\ndriver = \"rfc2217\"\nhost = \"127.0.0.1\"\nport = {port}\nbaud = 115200\n"
        ),
    )
    .unwrap();
    let rig = Rig::load(&inv).unwrap();
    let caps = rig
        .start_captures("net-1", &d.path().join("art"), "c1")
        .unwrap();
    let p = caps[0].path().to_path_buf();
    let t0 = Instant::now();
    while !std::fs::read_to_string(&p)
        .unwrap_or_default()
        .contains("booting")
    {
        assert!(t0.elapsed() < Duration::from_secs(30), "nothing captured");
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in caps {
        c.stop().unwrap();
    }
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains("] booting"), "{text}");
    // One 0xFF data byte per doubled pair reached the capture (shown as U+FFFD).
    let line = text.lines().next().unwrap();
    assert_eq!(line.matches('\u{fffd}').count(), 1, "{text}");
    assert!(line.ends_with("] BIOS \u{fffd} v1"), "{text}");
    t.join().unwrap();
}
