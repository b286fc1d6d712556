//! The real serial-port code path: the simulated board served on two PTYs, the
//! `Fpga` backend opening them with the serialport crate, as it opens a board.

mod common;

use common::*;
use hilrig_board::{Fpga, PtyBoard, SerialTransport, SimBoard};
use hilrig_device::device::Device;
use hilrig_device::model::ops;
use hilrig_device::oob::{decode_response, encode_request, Request, Response};
use hilrig_device::regmap::*;
use hilrig_device::state::NvState;
use std::time::Instant;

#[test]
fn fpga_backend_over_a_pty() {
    let nv = NvState::factory(config(4), 21).unwrap();
    let pty = PtyBoard::spawn(SimBoard::with_nv(params(4, 21), &nv)).unwrap();
    let mut f = Fpga::open_serial(pty.host_path(), 115_200).unwrap();
    f.set_oob(Box::new(
        SerialTransport::open(pty.oob_path(), 115_200).unwrap(),
    ));
    assert!(f.port().starts_with("/dev/"), "{}", f.port());
    assert_eq!(f.read32(Reg::Id.offset()).unwrap(), DEVICE_ID_VALUE);
    let t = Instant::now();
    let n = 40u32;
    for i in 0..n {
        f.write32(Reg::Scratch.offset(), i).unwrap();
        assert_eq!(f.read32(Reg::Scratch.offset()).unwrap(), i);
    }
    eprintln!(
        "PTY: {:.0} ops/s",
        (2 * n) as f64 / t.elapsed().as_secs_f64()
    );
    ops::unlock(&mut f).unwrap();
    assert!(ops::erase(&mut f, Region::Firmware).unwrap().done());
    assert_eq!(f.read32(Reg::Counter.offset() + 4).unwrap(), 1);
    let resp = f.oob(&encode_request(3, &Request::ReadCounters)).unwrap();
    match decode_response(&resp).unwrap().1 {
        Response::Counters(c) => assert_eq!((c.counters, c.master), ([0, 1, 0], 1)),
        other => panic!("{other:?}"),
    }
    assert_eq!(f.stats().retries, 0, "{:?}", f.stats());
    drop(f);
    // A frame cut short on the wire: the board waits a little for the rest, then
    // the bridge's inter-byte timeout drops it, and the next session works.
    {
        use hilrig_board::Transport;
        let mut raw = SerialTransport::open(pty.host_path(), 115_200).unwrap();
        let frame = hilrig_board::proto::encode_request(
            9,
            &hilrig_board::proto::Request::Read { addr: 0, be: 0xf },
        );
        raw.send(&frame[..5]).unwrap();
        let mut buf = [0u8; 16];
        let n = raw
            .recv(&mut buf, std::time::Duration::from_millis(200))
            .unwrap();
        assert_eq!(n, 0, "a truncated frame was answered");
    }
    // A second session on the same board: IDENTIFY resets the bridge's memory, so
    // the new host's first sequence numbers are not mistaken for retries.
    let mut g = Fpga::open_serial(pty.host_path(), 115_200).unwrap();
    g.write32(Reg::Scratch.offset() + 4, 77).unwrap();
    assert_eq!(g.read32(Reg::Scratch.offset() + 4).unwrap(), 77);
    let board = pty.stop().expect("the server thread ends cleanly");
    assert_eq!(board.leds(), 1);
}

/// A serial port with nothing answering: the error names the port, and comes
/// within the retry bound (attempts x timeout) in real time.
#[test]
fn silent_port_fails_within_the_bound() {
    use hilrig_board::FpgaOptions;
    use hilrig_device::DeviceError;
    use serialport::SerialPort;
    use std::time::Duration;
    let (_master, slave) = serialport::TTYPort::pair().unwrap();
    let path = slave.name().unwrap();
    let opts = FpgaOptions {
        timeout: Duration::from_millis(40),
        retries: 3,
    };
    let t = Instant::now();
    let e = Fpga::open_serial_with(&path, 115_200, opts)
        .err()
        .expect("no bridge answers");
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(160), "{took:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    match e {
        DeviceError::Transport { what, detail } => {
            assert_eq!(what, path);
            assert!(
                detail.contains("IDENTIFY") && detail.contains("4 attempts"),
                "{detail}"
            );
            assert!(detail.contains("no response within"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
}
