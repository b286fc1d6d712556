//! Attacks on the VMM from the local machine (DESIGN §6, local user → VMM): each test
//! names its attack and shows it gets nothing.

use hilrig_vmm::api::control::{PauseReply, Reply, Request, Response};
use hilrig_vmm::lifecycle::control::{self, Control, MAX_CONNECTIONS};
use hilrig_vmm::lifecycle::{read_bundle, LifecycleError, MAX_BUNDLE};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Run `f` on a thread and give up after `limit` (a hang is a failure, not a stuck run).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("did not finish within {limit:?}"))
}

#[test]
fn a_fifo_bundle_is_refused_not_waited_on() {
    // Attack: name a FIFO as the bundle; nobody ever writes to it.
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("bundle.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string; mkfifo has no other preconditions.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let r = within(Duration::from_secs(5), move || read_bundle(&fifo));
    assert!(matches!(r, Err(LifecycleError::NotAFile { .. })), "{r:?}");
}

#[test]
fn dev_zero_as_a_bundle_is_refused_without_reading_it_whole() {
    // Attack: a "file" whose metadata says 0 bytes but never ends.
    let r = within(Duration::from_secs(5), || {
        read_bundle(std::path::Path::new("/dev/zero"))
    });
    assert!(matches!(r, Err(LifecycleError::NotAFile { .. })), "{r:?}");
}

#[test]
fn a_symlinked_bundle_is_not_followed() {
    // Attack: swap the bundle path for a symlink to another file.
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("real.bundle");
    std::fs::write(&target, b"bundle bytes").unwrap();
    let link = d.path().join("link.bundle");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert!(matches!(
        read_bundle(&link),
        Err(LifecycleError::Bundle { .. })
    ));
    assert_eq!(read_bundle(&target).unwrap(), b"bundle bytes");
}

#[test]
fn an_oversized_bundle_is_refused_after_a_bounded_read() {
    // Attack: a (sparse) bundle past the limit.
    let d = tempfile::tempdir().unwrap();
    let big = d.path().join("big.bundle");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(MAX_BUNDLE + 1).unwrap();
    assert!(matches!(
        read_bundle(&big),
        Err(LifecycleError::BundleTooLarge { .. })
    ));
}

struct Quiet;
impl Control for Quiet {
    fn handle(&self, _: Request) -> Response {
        Ok(Reply::Pause(PauseReply {
            vcpus: 1,
            blackout_us: None,
            park_us: None,
        }))
    }
}

fn raw(s: &mut UnixStream, line: &str) -> String {
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut out = String::new();
    BufReader::new(s.try_clone().unwrap())
        .read_line(&mut out)
        .unwrap();
    out
}

#[test]
fn a_connection_flood_is_capped_and_the_socket_keeps_serving() {
    // Attack: open far more connections than the VMM serves and hold them open.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("vm.sock");
    let l = control::bind(&p).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (t, _) = control::serve(l, Arc::new(Quiet), stop.clone());
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut s = UnixStream::connect(&p).unwrap();
        assert!(raw(&mut s, r#"{"op":"status"}"#).contains("\"ok\":true"));
        held.push(s);
    }
    // Every connection past the cap is answered with an error and closed.
    for _ in 0..3 * MAX_CONNECTIONS {
        let s = UnixStream::connect(&p).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = String::new();
        BufReader::new(s).read_line(&mut out).unwrap();
        assert!(out.contains("too many connections"), "{out}");
    }
    // The held connections still work, and once they go, new ones are served.
    assert!(raw(&mut held[0], r#"{"op":"status"}"#).contains("\"ok\":true"));
    drop(held);
    let t0 = Instant::now();
    loop {
        let mut s = UnixStream::connect(&p).unwrap();
        if raw(&mut s, r#"{"op":"status"}"#).contains("\"ok\":true") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "slots never came back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    t.join().unwrap();
}
