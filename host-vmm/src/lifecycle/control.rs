//! The control socket: a unix socket, owner-only (mode 0600, created without a window
//! in which it has other permissions), every connection checked with SO_PEERCRED (the
//! VMM's own uid, or for a jailed VMM the uid that launched it, or root; else refused
//! and logged). JSON lines: one request object per
//! line, one reply object per line.
//!
//! Requests: `{"op":"status"}`, `{"op":"pause"}`, `{"op":"resume"}`, `{"op":"quiesce"}`,
//! `{"op":"patch","bundle":"/path/to/bundle"}`, `{"op":"teardown"}`,
//! `{"op":"metrics"}`. Replies: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
//! Malformed, oversized (over [`MAX_LINE`]) or unknown requests get an error reply;
//! the VM is unaffected.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use hilrig_vmm_api::control::{request, Reply, Request, Response, MAX_LINE};

/// What answers requests (the VM).
pub trait Control: Send + Sync {
    /// Handle a request: a reply, or the refusal in words.
    fn handle(&self, req: Request) -> Response;
}

/// Whether a peer with `uid` may use a socket owned by `owner`.
pub fn peer_allowed(uid: u32, owner: u32) -> bool {
    uid == owner || uid == 0
}

/// The uid of the process at the other end of `s`.
pub fn peer_uid(s: &UnixStream) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Refuse a control socket whose directory, or any directory above it, another
/// local user could rename or replace entries in: each must be owned by us or root
/// and not writable by group or others unless sticky (as /tmp), checked by
/// [`hilrig_device::secure::check_dir_chain`]. Otherwise someone could swap the
/// socket (clients would talk to theirs) or the temporary name between bind and
/// chmod (the chmod would follow their symlink). A jailed VMM's launcher calls this
/// on the real path before entering the jail (inside it the host's directories are
/// out of sight). The error names the socket and the directory.
pub fn check_socket_dirs(path: &Path) -> std::io::Result<()> {
    use hilrig_device::secure::SecureFileError;
    let abs = std::path::absolute(path)?;
    let parent = abs.parent().unwrap_or(Path::new("/"));
    hilrig_device::secure::check_dir_chain(parent).map_err(|e| match e {
        SecureFileError::UnsafeDir { path: dir, reason } => std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "control socket {}: directory {} {reason}; use a directory only you can write (mode 0700)",
                path.display(),
                dir.display()
            ),
        ),
        SecureFileError::Io { path: dir, source } => std::io::Error::new(
            source.kind(),
            format!(
                "control socket {}: directory {}: {source}",
                path.display(),
                dir.display()
            ),
        ),
        e => std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("control socket {}: {e}", path.display()),
        ),
    })
}

/// Bind the control socket at `path` with mode 0600: bound under a temporary name in
/// the same directory, chmod'ed, then renamed into place, so it never exists at
/// `path` with wider permissions. Refuses to replace anything but a stale socket, and
/// a directory others could write in ([`check_socket_dirs`]). Every error names the
/// socket once (`control socket PATH: ...`), as [`check_socket_dirs`]'s do.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    check_socket_dirs(path)?;
    bind_checked(path).map_err(|e| {
        std::io::Error::new(e.kind(), format!("control socket {}: {e}", path.display()))
    })
}

/// [`bind`] once the directories have passed.
fn bind_checked(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "in use by a running VMM",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".hilrig-ctl-{}-{}.tmp",
        std::process::id(),
        rand_suffix()
    ));
    let l = UnixListener::bind(&tmp)?;
    let r = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(l)
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}

/// Requests being handled or answered right now (see [`serve`]).
pub type InFlight = Arc<std::sync::atomic::AtomicUsize>;

/// Most connections served at once; one more is answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A reply that cannot be written for this long closes the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection slot of [`MAX_CONNECTIONS`], given back when dropped.
struct Slot(Arc<std::sync::atomic::AtomicUsize>);

impl Slot {
    fn take(open: &Arc<std::sync::atomic::AtomicUsize>) -> Option<Slot> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_CONNECTIONS).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(open.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serve `listener` on a thread until `stop`; each connection on its own thread, at
/// most [`MAX_CONNECTIONS`] at once (one more gets an error reply and is closed), each
/// closed after [`IDLE_TIMEOUT`] without a request. A thread that cannot be started
/// costs that connection only (error reply), never the socket.
/// The count of requests not yet answered is returned with the thread, so that the
/// VMM can let a reply (e.g. to the teardown that ended the VM) go out before the
/// process exits.
pub fn serve(
    listener: UnixListener,
    control: Arc<dyn Control>,
    stop: Arc<AtomicBool>,
) -> (std::thread::JoinHandle<()>, InFlight) {
    serve_with(listener, control, stop, || {
        Ok::<(), std::convert::Infallible>(())
    })
}

/// As [`serve`], with `on_start` run first on the server thread (e.g. installing
/// its seccomp filter, which its connection threads inherit). When it fails, the
/// socket is not served (its error logged).
pub fn serve_with<E: std::fmt::Display>(
    listener: UnixListener,
    control: Arc<dyn Control>,
    stop: Arc<AtomicBool>,
    on_start: impl FnOnce() -> Result<(), E> + Send + 'static,
) -> (std::thread::JoinHandle<()>, InFlight) {
    let in_flight = InFlight::default();
    let counter = in_flight.clone();
    let handle = std::thread::spawn(move || {
        if let Err(e) = on_start() {
            tracing::error!("control socket not served: {e}");
            return;
        }
        // A jailed VMM answers root and its launcher, never its own (shared,
        // unprivileged) uid.
        let owner = crate::jail::control_owner();
        if let Err(e) = listener.set_nonblocking(true) {
            tracing::error!("control socket: {e}");
            return;
        }
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        while !stop.load(Ordering::Acquire) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
                    let Some(slot) = Slot::take(&open) else {
                        tracing::warn!(
                            "control socket: {MAX_CONNECTIONS} connections open; refusing one"
                        );
                        let _ = reply(
                            &mut s,
                            &error(format!(
                                "too many connections ({MAX_CONNECTIONS} open); try again"
                            )),
                        );
                        continue;
                    };
                    let c = control.clone();
                    let n = counter.clone();
                    let spare = s.try_clone();
                    let spawned = std::thread::Builder::new()
                        .name("vmm-control".into())
                        .spawn(move || {
                            let _slot = slot;
                            connection(s, owner, &*c, &n)
                        });
                    if let Err(e) = spawned {
                        tracing::error!("control socket: no thread for a connection: {e}");
                        if let Ok(mut s) = spare {
                            let _ =
                                reply(&mut s, &error(format!("the VMM is out of threads: {e}")));
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    tracing::warn!("control socket accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    });
    (handle, in_flight)
}

/// Wait (at most `limit`) until no request is being handled or answered.
pub fn drain(in_flight: &InFlight, limit: Duration) {
    let t = std::time::Instant::now();
    while in_flight.load(Ordering::Acquire) > 0 && t.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn reply(s: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut line = hilrig_vmm_api::control::encode(r);
    line.push('\n');
    s.write_all(line.as_bytes())
}

fn error(msg: impl Into<String>) -> Response {
    Err(hilrig_vmm_api::control::Refusal(msg.into()))
}

fn connection(mut s: UnixStream, owner: u32, control: &dyn Control, in_flight: &InFlight) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
    match peer_uid(&s) {
        Ok(uid) if peer_allowed(uid, owner) => {}
        Ok(uid) => {
            tracing::warn!("control socket: refused a connection from uid {uid} (owner {owner})");
            let _ = reply(
                &mut s,
                &error(format!(
                    "permission denied: uid {uid} is not the VMM's owner"
                )),
            );
            return;
        }
        Err(e) => {
            tracing::warn!("control socket: no peer credentials: {e}");
            return;
        }
    }
    let Ok(rs) = s.try_clone() else { return };
    let mut reader = BufReader::new(rs);
    loop {
        let mut buf = Vec::new();
        // Read at most MAX_LINE + 1 bytes of one line.
        let n = match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
        {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        let req = match hilrig_vmm_api::control::parse_request(&buf) {
            Ok(None) => continue,
            Ok(Some(req)) => Ok(req),
            Err(e @ hilrig_vmm_api::control::RequestError::TooLong(_)) => {
                let _ = reply(&mut s, &error(e.to_string()));
                return;
            }
            Err(e) => Err(e),
        };
        in_flight.fetch_add(1, Ordering::AcqRel);
        let out = match req {
            Err(e) => error(e.to_string()),
            Ok(req) => control.handle(req),
        };
        let sent = reply(&mut s, &out);
        in_flight.fetch_sub(1, Ordering::AcqRel);
        if sent.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use hilrig_vmm_api::control::PauseReply;
    use serde_json::{json, Value};

    struct Echo(Mutex<Vec<Request>>);
    impl Control for Echo {
        fn handle(&self, req: Request) -> Response {
            self.0.lock().unwrap().push(req.clone());
            match req {
                Request::Teardown {} => Err("not now".into()),
                Request::Patch { bundle } => Ok(Reply::Patch(hilrig_vmm_api::PatchEvent {
                    component: bundle.display().to_string(),
                    from: 1,
                    to: 2,
                    blackout_us: None,
                    ..Default::default()
                })),
                _ => Ok(Reply::Pause(PauseReply {
                    vcpus: 3,
                    blackout_us: None,
                    park_us: None,
                })),
            }
        }
    }

    /// One raw line to the socket, its raw reply (the wire format itself).
    fn raw(path: &Path, line: &str) -> Value {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        let mut out = String::new();
        BufReader::new(s).read_line(&mut out).unwrap();
        serde_json::from_str(&out).unwrap()
    }

    #[test]
    fn requests_replies_and_bad_input() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vm.sock");
        let l = bind(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let echo = Arc::new(Echo(Mutex::new(vec![])));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, _) = serve(l, echo.clone(), stop.clone());
        let ask = |line: &str| raw(&p, line);
        assert_eq!(ask(r#"{"op":"status"}"#)["ok"], true);
        assert_eq!(ask(r#"{"op":"status"}"#)["vcpus"], 3);
        // The typed client: a reply of the request's kind.
        let r = request(
            &p,
            &Request::Patch {
                bundle: "/x".into(),
            },
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(matches!(r, Ok(Reply::Patch(ev)) if ev.component == "/x"));
        // A reply of another kind is not taken for an answer.
        assert!(request(&p, &Request::Metrics {}, Duration::from_secs(5)).is_err());
        assert_eq!(
            ask(r#"{"op":"teardown"}"#),
            json!({"ok": false, "error": "not now"})
        );
        for bad in [
            r#"{"op":"reboot"}"#,
            "not json",
            r#"{"op":"patch"}"#,
            r#"{"op":"status","x":1}"#,
        ] {
            let r = ask(bad);
            assert_eq!(r["ok"], false, "{bad}");
            assert!(
                r["error"].as_str().unwrap().starts_with("bad request"),
                "{r}"
            );
        }
        let huge = format!("{{\"op\":\"status\",\"pad\":\"{}\"}}", "x".repeat(MAX_LINE));
        assert!(ask(&huge)["error"]
            .as_str()
            .unwrap()
            .contains("longer than"));
        // Only the five well-formed requests reached the VM.
        assert_eq!(echo.0.lock().unwrap().len(), 5);
        // A second VMM cannot take over a live socket.
        assert!(bind(&p).is_err());
        stop.store(true, Ordering::Release);
        t.join().unwrap();
        // A stale socket (no server) is replaced.
        drop(bind(&p).unwrap());
    }

    #[test]
    fn peer_credentials_are_checked() {
        assert!(peer_allowed(1000, 1000));
        assert!(peer_allowed(0, 1000));
        assert!(!peer_allowed(1001, 1000));
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: peer_credentials_are_checked needs root to connect as another uid");
            return;
        }
        let Ok(py) = which_python() else {
            eprintln!(
                "SKIPPED: peer_credentials_are_checked needs python3 to connect as another uid"
            );
            return;
        };
        let d = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        // Sticky, as /tmp: others may enter, not swap entries (bind refuses 0777).
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let p = d.path().join("vm.sock");
        let l = bind(&p).unwrap();
        // Open the file permissions so only SO_PEERCRED stands in the way.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        let echo = Arc::new(Echo(Mutex::new(vec![])));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, _) = serve(l, echo.clone(), stop.clone());
        use std::os::unix::process::CommandExt;
        let out = std::process::Command::new(py)
            .uid(65534)
            .gid(65534)
            .arg("-c")
            .arg(format!(
                "import socket;s=socket.socket(socket.AF_UNIX);s.connect({:?});s.sendall(b'{{\"op\":\"status\"}}\\n');print(s.makefile().readline())",
                p.to_str().unwrap()
            ))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("permission denied: uid 65534"),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            echo.0.lock().unwrap().is_empty(),
            "the request never reached the VM"
        );
        stop.store(true, Ordering::Release);
        t.join().unwrap();
    }

    fn which_python() -> Result<&'static str, ()> {
        for p in ["/usr/bin/python3", "/usr/local/bin/python3"] {
            if Path::new(p).exists() {
                return Ok(p);
            }
        }
        Err(())
    }
}
