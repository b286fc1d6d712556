//! How the runner reaches a host: `local` (this machine) or over SSH with the
//! OpenSSH client, labgrid's SSHDriver convention: one ControlMaster connection per
//! host (its ControlPath in a private 0700 directory), key authentication only, a
//! pinned known_hosts file (`StrictHostKeyChecking=yes`), `BatchMode=yes` (never a
//! prompt). The runner makes sure the host runs the same `hilrig` build as itself
//! ([`Remote::ensure_hilrig`], by SHA-256; copied atomically otherwise), then runs
//! `hilrig vm run ...` there ([`Remote::command`]) and moves files with
//! [`Remote::put`] / [`Remote::get`] (`ssh cat`, through the master connection).
//!
//! [`HostSource`] is where hosts come from: an [`Inventory`] here, a labgrid
//! coordinator's places elsewhere.

use crate::error::{InvalidField, RigError};
use crate::inventory::{HostSpec, Inventory};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Largest file fetched from a host with [`Remote::get`] (bytes).
pub const MAX_GET_BYTES: u64 = 64 << 20;

/// `[host.ssh]`: the host is reached over SSH.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshSpec {
    /// Address (name or IP) the host's sshd listens on.
    pub address: String,
    /// Port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Login user.
    pub user: String,
    /// Private key (key authentication only); relative to the inventory file.
    pub identity: PathBuf,
    /// The pinned known_hosts file holding the host's key; relative to the
    /// inventory file. A host whose key is not in it is refused.
    pub known_hosts: PathBuf,
    /// Work directory on the host (attempt files, the hilrig binary).
    pub workdir: String,
    /// Where the runner's `hilrig` build is kept on the host; default
    /// `<workdir>/bin/hilrig`.
    #[serde(default)]
    pub hilrig: Option<String>,
    /// Seconds to wait for a connection.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_s: u32,
    /// The path on the host its VMM writes its serial console (COM1) to: a tty
    /// wired to the host's `[[host.console]]`, which the controller captures
    /// through the rig's console driver. Default: the console is a file fetched
    /// back with the step's artifacts.
    #[serde(default)]
    pub console: Option<String>,
    /// Who owns `console` on the host when it is not the SSH user or root: the
    /// console service holding the pty (`"ser2net"`, a labgrid exporter's
    /// user), a user name or a numeric uid, passed to the VMM as its
    /// `--console-owner` and resolved on the host (uids are per host; a name
    /// the host does not know fails the step, naming it and the host). Without
    /// it the VMM refuses a console terminal another user owns.
    #[serde(default)]
    pub console_owner: Option<hilrig_vmm_api::ConsoleOwner>,
}

fn default_port() -> u16 {
    22
}
fn default_connect_timeout() -> u32 {
    10
}

impl SshSpec {
    /// The remote path of the `hilrig` build.
    pub fn hilrig_path(&self) -> String {
        self.build_path(Path::new("hilrig"))
    }

    /// Where a copy of the local build `local` is kept on the host: `hilrig` if
    /// set, else `<workdir>/bin/<its file name>`.
    pub fn build_path(&self, local: &Path) -> String {
        let name = local
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty() && !n.starts_with('.'))
            .unwrap_or_else(|| "hilrig".into());
        self.hilrig
            .clone()
            .unwrap_or_else(|| format!("{}/bin/{name}", self.workdir.trim_end_matches('/')))
    }

    /// Check the fields that end up on a command line.
    pub fn validate(&self) -> Result<(), InvalidField> {
        let plain = |what: &str, v: &str| -> Result<(), InvalidField> {
            if v.is_empty() {
                return Err(InvalidField(format!("{what} is empty")));
            }
            if v.starts_with('-') {
                return Err(InvalidField(format!(
                    "{what} {v:?} must not start with `-`"
                )));
            }
            if let Some(c) = v
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')))
            {
                return Err(InvalidField(format!("{what} {v:?} contains {c:?}")));
            }
            Ok(())
        };
        plain("address", &self.address)?;
        plain("user", &self.user)?;
        let path = |what: &str, v: &str| -> Result<(), InvalidField> {
            if !v.starts_with('/') {
                return Err(InvalidField(format!(
                    "{what} {v:?} must be an absolute path"
                )));
            }
            if v.split('/').any(|c| c == "..") {
                return Err(InvalidField(format!("{what} {v:?} must not contain `..`")));
            }
            if v.chars().any(|c| c.is_control()) {
                return Err(InvalidField(format!(
                    "{what} {v:?} contains a control character"
                )));
            }
            Ok(())
        };
        path("workdir", &self.workdir)?;
        if let Some(h) = &self.hilrig {
            path("hilrig", h)?;
        }
        if self.port == 0 {
            return Err(InvalidField("port 0".into()));
        }
        if let (Some(o), None) = (&self.console_owner, &self.console) {
            return Err(InvalidField(format!(
                "console_owner {:?} without console (the tty it owns)",
                o.to_string()
            )));
        }
        Ok(())
    }

    /// `identity` and `known_hosts` anchored at `base` (the inventory's directory).
    pub fn anchored(mut self, base: &Path) -> SshSpec {
        if self.identity.is_relative() {
            self.identity = base.join(&self.identity);
        }
        if self.known_hosts.is_relative() {
            self.known_hosts = base.join(&self.known_hosts);
        }
        self
    }
}

/// Why a remote operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The `ssh` client could not be started.
    #[error("host `{host}`: starting ssh: {source}")]
    Spawn {
        /// The host.
        host: String,
        /// Why.
        source: std::io::Error,
    },
    /// ssh itself failed (exit 255: unreachable, refused key, unknown host key).
    #[error("host `{host}`: ssh {address}: {detail}")]
    Ssh {
        /// The host.
        host: String,
        /// user@address:port.
        address: String,
        /// ssh's last stderr lines.
        detail: String,
    },
    /// A command on the host exited non-zero.
    #[error("host `{host}`: `{what}` exited {code:?}: {stderr}")]
    Command {
        /// The host.
        host: String,
        /// What was run.
        what: String,
        /// Its exit code.
        code: Option<i32>,
        /// Its last stderr lines.
        stderr: String,
    },
    /// A local file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What, with the path.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The copy of the build on the host does not hash as sent.
    #[error("host `{host}`: {path} hashes {got} after the copy, expected {want}")]
    Hash {
        /// The host.
        host: String,
        /// The remote path.
        path: String,
        /// What it hashes to.
        got: String,
        /// The local build's hash.
        want: String,
    },
    /// A bounded command did not finish in time (the host may be wedged).
    #[error("host `{host}`: `{what}` did not finish within {timeout:?} (killed)")]
    Timeout {
        /// The host.
        host: String,
        /// What was run.
        what: String,
        /// The bound.
        timeout: Duration,
    },
    /// A fetched file is larger than [`MAX_GET_BYTES`].
    #[error("host `{host}`: {path} is larger than {MAX_GET_BYTES} bytes")]
    TooLarge {
        /// The host.
        host: String,
        /// The remote path.
        path: String,
    },
}

impl RemoteError {
    /// As a rig error: a missing local file is configuration, the rest
    /// infrastructure.
    pub fn into_rig(self, host: &str) -> RigError {
        match self {
            RemoteError::Io { what, source } => RigError::Io { what, source },
            e => RigError::Driver {
                host: host.to_string(),
                driver: "transport/ssh".into(),
                detail: e.to_string(),
            },
        }
    }
}

/// Quote `s` for a POSIX shell (ssh hands the remote command to the login shell).
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-=:,+@%".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn tail(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let t: Vec<&str> = s.lines().rev().take(3).collect();
    t.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Run `c` (stdout/stderr piped) for at most `timeout`; `Err(None)` when it was
/// killed at the timeout, `Err(Some(e))` when it could not be run.
fn run_within(mut c: Command, timeout: Duration) -> Result<Output, Option<std::io::Error>> {
    use std::io::Read;
    let mut child = c.spawn().map_err(Some)?;
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.take(MAX_GET_BYTES).read_to_end(&mut v);
        }
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(o) = err.as_mut() {
            let _ = o.take(1 << 20).read_to_end(&mut v);
        }
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(None);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Some(e));
            }
        }
    };
    Ok(Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

/// SHA-256 of a file, hex. Remembered per process by the file's identity
/// (device, inode, size, modification and change times), so a run hashes its
/// build once however many hosts and attempts ask; a file that changed is hashed
/// again.
pub fn file_sha256(path: &Path) -> Result<String, RemoteError> {
    use std::os::unix::fs::MetadataExt;
    type Key = (PathBuf, u64, u64, u64, i64, i64, i64, i64);
    static CACHE: Mutex<Vec<(Key, String)>> = Mutex::new(Vec::new());
    let io = |source| RemoteError::Io {
        what: format!("reading {}", path.display()),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let m = f.metadata().map_err(io)?;
    let key: Key = (
        path.to_path_buf(),
        m.dev(),
        m.ino(),
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    );
    if let Some((_, h)) = CACHE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|(k, _)| *k == key)
    {
        return Ok(h.clone());
    }
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io)?;
    let hex = hex::encode(h.finalize());
    let mut c = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    c.retain(|(k, _)| k.0 != key.0);
    if c.len() >= 64 {
        c.remove(0);
    }
    c.push((key, hex.clone()));
    Ok(hex)
}

/// The remote side of one step in one SSH round trip ([`step_argv`]): files
/// staged from standard input (`<len> <path>` lines, each followed by its bytes;
/// `end -` last), the files to fetch removed first, the command run with its
/// pid in `<dir>/.pid`, then framed on standard output: `exit <code>`, then
/// `out`, `err` and `f0..` (the fetched files) each as `<name> <len>` and the
/// bytes (`<name> -1` for a missing file); the directory removed.
pub const STEP_SH: &str = r#"set -f
d=$1; fetch=$2; shift 2
umask 077
mkdir -p "$d" || exit 250
IFS='
'
[ -z "$fetch" ] || rm -f $fetch
while IFS=' ' read -r len path; do
  [ "$len" = end ] && break
  head -c "$len" > "$path" || exit 250
done
"$@" > "$d/.out" 2> "$d/.err" < /dev/null &
echo $! > "$d/.pid"
wait $!
code=$?
emit() { if [ -f "$2" ]; then printf '%s %s
' "$1" "$(wc -c < "$2")"; cat "$2"; else printf '%s -1
' "$1"; fi; }
printf 'exit %s
' "$code"
emit out "$d/.out"; emit err "$d/.err"
i=0; for f in $fetch; do emit "f$i" "$f"; i=$((i+1)); done
rm -rf "$d"
"#;

/// The argv running `cmd` on the host through [`STEP_SH`] in `dir`, fetching
/// `fetch` afterwards (absolute paths without newlines).
pub fn step_argv(dir: &str, fetch: &[String], cmd: &[String]) -> Vec<String> {
    let mut a = vec![
        "sh".to_string(),
        "-c".to_string(),
        STEP_SH.to_string(),
        "hilrig-step".to_string(),
        dir.to_string(),
        fetch.join("\n"),
    ];
    a.extend(cmd.iter().cloned());
    a
}

/// Standard input of [`STEP_SH`]: `files` (remote path, bytes) framed.
pub fn stage_input(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (p, b) in files {
        v.extend_from_slice(format!("{} {p}\n", b.len()).as_bytes());
        v.extend_from_slice(b);
    }
    v.extend_from_slice(b"end -\n");
    v
}

/// What [`STEP_SH`] sent back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepOutput {
    /// The command's exit code as the shell saw it (128+n: killed by signal n).
    pub code: i32,
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
    /// The fetched files, in order (`None`: missing).
    pub files: Vec<Option<Vec<u8>>>,
}

/// Why [`parse_step`] refused an output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed step output at byte {at}: {why}")]
pub struct FrameError {
    /// Offset in the output.
    pub at: usize,
    /// What is wrong.
    pub why: String,
}

/// Parse [`STEP_SH`]'s output (bounded: no frame over [`MAX_GET_BYTES`]).
pub fn parse_step(out: &[u8], nfiles: usize) -> Result<StepOutput, FrameError> {
    let mut r = FrameReader::new(out);
    let s = read_step(&mut r, nfiles)?;
    if r.at != out.len() {
        return Err(FrameError {
            at: r.at,
            why: format!("{} bytes after the last frame", out.len() - r.at),
        });
    }
    Ok(s)
}

/// A bounded reader of `<name> <len>` framed streams (the step output of
/// [`STEP_SH`] and of the step agent, the agent's requests), counting bytes so
/// errors say where. A stream that ends inside a frame is a [`FrameError`].
pub struct FrameReader<R> {
    inner: R,
    /// Bytes consumed so far.
    pub at: usize,
}

impl<R: Read> FrameReader<R> {
    /// Read frames from `inner`.
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader { inner, at: 0 }
    }

    fn bad(&self, why: String) -> FrameError {
        FrameError { at: self.at, why }
    }

    /// One header line `<name> <number>` (at most 64 bytes); `None` at a clean
    /// end of stream before its first byte.
    pub fn header(&mut self) -> Result<Option<(String, i64)>, FrameError> {
        let start = self.at;
        let mut line = Vec::with_capacity(32);
        loop {
            let mut b = [0u8; 1];
            match self.inner.read(&mut b) {
                Ok(0) if line.is_empty() => return Ok(None),
                Ok(0) => {
                    return Err(FrameError {
                        at: start,
                        why: format!(
                            "stream ends inside a header ({:?})",
                            String::from_utf8_lossy(&line)
                        ),
                    })
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.bad(format!("reading: {e}"))),
            }
            self.at += 1;
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
            if line.len() > 64 {
                return Err(FrameError {
                    at: start,
                    why: "header line longer than 64 bytes".into(),
                });
            }
        }
        let line = std::str::from_utf8(&line).map_err(|_| FrameError {
            at: start,
            why: "header is not UTF-8".into(),
        })?;
        let (name, n) = line.split_once(' ').ok_or_else(|| FrameError {
            at: start,
            why: format!("header {line:?}"),
        })?;
        let n: i64 = n.parse().map_err(|_| FrameError {
            at: start,
            why: format!("bad number in {line:?}"),
        })?;
        Ok(Some((name.to_string(), n)))
    }

    /// A header that must be `want`; its number.
    pub fn expect(&mut self, want: &str) -> Result<i64, FrameError> {
        match self.header()? {
            Some((name, n)) if name == want => Ok(n),
            Some((name, _)) => Err(self.bad(format!("expected `{want}`, got {name:?}"))),
            None => Err(self.bad(format!("stream ends before `{want}`"))),
        }
    }

    /// `n` bytes of a body named `what` (refused over [`MAX_GET_BYTES`]).
    pub fn body(&mut self, what: &str, n: i64) -> Result<Vec<u8>, FrameError> {
        if n < 0 || n as u64 > MAX_GET_BYTES {
            return Err(self.bad(format!("`{what}` of {n} bytes is too large")));
        }
        let n = n as usize;
        let mut b = Vec::with_capacity(n.min(1 << 20));
        let got = (&mut self.inner)
            .take(n as u64)
            .read_to_end(&mut b)
            .map_err(|e| self.bad(format!("reading `{what}`: {e}")))?;
        if got < n {
            return Err(self.bad(format!(
                "`{what}` cut short ({n} bytes announced, {got} sent)"
            )));
        }
        self.at += n;
        Ok(b)
    }

    /// A body frame named `want` (`None`: announced missing, `-1`).
    fn file(&mut self, want: &str) -> Result<Option<Vec<u8>>, FrameError> {
        let n = self.expect(want)?;
        if n == -1 {
            return Ok(None);
        }
        self.body(want, n).map(Some)
    }
}

/// Read one step output (`exit`, `out`, `err`, `f0..`) from a stream; an agent's
/// `error <len>` frame in place of `exit` is [`StepError::Remote`]-worthy and
/// returned as a [`FrameError`] whose `why` starts with `host: `.
pub fn read_step<R: Read>(r: &mut FrameReader<R>, nfiles: usize) -> Result<StepOutput, FrameError> {
    let code = match r.header()? {
        Some((name, n)) if name == "exit" => n,
        Some((name, n)) if name == "error" => {
            let m = r.body("error", n)?;
            return Err(r.bad(format!("host: {}", String::from_utf8_lossy(&m))));
        }
        Some((name, _)) => return Err(r.bad(format!("expected `exit`, got {name:?}"))),
        None => return Err(r.bad("no `exit` header line (empty output)".into())),
    };
    let stdout = r.file("out")?.unwrap_or_default();
    let stderr = r.file("err")?.unwrap_or_default();
    let mut files = Vec::with_capacity(nfiles);
    for i in 0..nfiles {
        files.push(r.file(&format!("f{i}"))?);
    }
    Ok(StepOutput {
        code: code.clamp(0, 255) as i32,
        stdout,
        stderr,
        files,
    })
}

/// The first line a step agent (`hilrig rig step-agent`) writes.
pub const AGENT_HELLO: &str = "hilrig-step-agent 1";
/// Most arguments, files to put and files to fetch of one agent request.
pub const MAX_REQUEST_ITEMS: usize = 4096;

/// One VMM step for a step agent: like [`step_argv`] + [`stage_input`], but sent
/// as one framed request over the agent's standing SSH session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepRequest {
    /// The step's directory on the host (created 0700, removed afterwards).
    pub dir: String,
    /// The command (program first).
    pub argv: Vec<String>,
    /// Files written before the command runs (path, bytes), each atomically
    /// (a temporary name in its directory, then renamed over the path).
    pub puts: Vec<(String, Vec<u8>)>,
    /// Files removed before and sent back after the command (in order).
    pub fetch: Vec<String>,
    /// Files removed after the puts, before the command (a device's kept
    /// buffers when its state file is replaced).
    pub remove: Vec<String>,
    /// Bytes written after the command ended to paths that exist (opened for
    /// appending, never created): the end marker on the host's console line,
    /// after the VMM's last output ([`crate::console::Capture::start_until`]).
    pub marks: Vec<(String, Vec<u8>)>,
    /// No command: the files are staged (and removed) and the reply is
    /// `exit 0` with empty output (`stage 0` ends the request, not `run 0`).
    pub stage_only: bool,
}

impl StepRequest {
    /// The request as a stream of `<tag> <len>` frames ending with `run 0`.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        let mut rec = |tag: &str, b: &[u8]| {
            v.extend_from_slice(format!("{tag} {}\n", b.len()).as_bytes());
            v.extend_from_slice(b);
        };
        rec("dir", self.dir.as_bytes());
        for a in &self.argv {
            rec("arg", a.as_bytes());
        }
        for (p, b) in &self.puts {
            rec("put", p.as_bytes());
            rec("data", b);
        }
        for f in &self.fetch {
            rec("fetch", f.as_bytes());
        }
        for f in &self.remove {
            rec("rm", f.as_bytes());
        }
        for (p, b) in &self.marks {
            rec("mark", p.as_bytes());
            rec("data", b);
        }
        v.extend_from_slice(if self.stage_only {
            b"stage 0\n"
        } else {
            b"run 0\n"
        });
        v
    }

    /// Read one request; `None` at a clean end of stream.
    pub fn decode<R: Read>(r: &mut FrameReader<R>) -> Result<Option<StepRequest>, FrameError> {
        let mut q = StepRequest::default();
        let mut first = true;
        let text = |r: &mut FrameReader<R>, what: &str, n: i64| -> Result<String, FrameError> {
            let b = r.body(what, n)?;
            String::from_utf8(b).map_err(|_| r.bad(format!("`{what}` is not UTF-8")))
        };
        // A path, then its `data` item.
        let with_data =
            |r: &mut FrameReader<R>, what: &str, n: i64| -> Result<(String, Vec<u8>), FrameError> {
                let p = text(r, what, n)?;
                let m = r.expect("data")?;
                Ok((p, r.body("data", m)?))
            };
        loop {
            let Some((tag, n)) = r.header()? else {
                if first {
                    return Ok(None);
                }
                return Err(r.bad("request cut short (no `run`)".into()));
            };
            first = false;
            if q.argv.len() + q.puts.len() + q.fetch.len() + q.remove.len() + q.marks.len()
                > MAX_REQUEST_ITEMS
            {
                return Err(r.bad("too many items in one request".into()));
            }
            match tag.as_str() {
                "dir" => q.dir = text(r, "dir", n)?,
                "arg" => {
                    let a = text(r, "arg", n)?;
                    q.argv.push(a);
                }
                "put" => q.puts.push(with_data(r, "put", n)?),
                "fetch" => {
                    let f = text(r, "fetch", n)?;
                    q.fetch.push(f);
                }
                "rm" => {
                    let f = text(r, "rm", n)?;
                    q.remove.push(f);
                }
                "mark" => q.marks.push(with_data(r, "mark", n)?),
                "run" if n == 0 => break,
                "stage" if n == 0 => {
                    q.stage_only = true;
                    break;
                }
                other => return Err(r.bad(format!("unknown request frame {other:?}"))),
            }
        }
        let abs = |what: &str, p: &str| -> Result<(), FrameError> {
            if !p.starts_with('/') || p.split('/').any(|c| c == "..") {
                return Err(FrameError {
                    at: 0,
                    why: format!("{what} {p:?} must be absolute, without `..`"),
                });
            }
            Ok(())
        };
        abs("dir", &q.dir)?;
        for (p, _) in &q.puts {
            abs("put", p)?;
        }
        for f in q.fetch.iter().chain(&q.remove) {
            abs("fetch/rm", f)?;
        }
        for (p, _) in &q.marks {
            abs("mark", p)?;
        }
        match (q.stage_only, q.argv.is_empty()) {
            (false, true) => return Err(r.bad("request without a command".into())),
            (true, false) => return Err(r.bad("a staging request with a command".into())),
            _ => {}
        }
        if q.stage_only && !(q.fetch.is_empty() && q.marks.is_empty()) {
            return Err(r.bad("a staging request fetches and marks nothing".into()));
        }
        Ok(Some(q))
    }
}

/// Why the step agent (the host side) stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A malformed request: the agent stops (the runner sees a transport error).
    #[error("step agent: {0}")]
    Frame(#[from] FrameError),
    /// Writing a reply failed (the runner went away).
    #[error("step agent: writing the reply: {0}")]
    Write(std::io::Error),
}

/// The host side of the step protocol (`hilrig rig step-agent`): writes
/// [`AGENT_HELLO`], then serves [`StepRequest`]s from `input` one at a time,
/// answering each on `output` in [`STEP_SH`]'s format (`exit`, `out`, `err`,
/// `f0..`), or `error <len>` when the step could not be set up. The command's
/// pid is kept in `<dir>/.pid` (a runner that times out kills it there); when
/// `input` ends (the runner or its SSH session went away) a running command is
/// killed. Files are created 0600 and the step directory 0700.
pub fn serve_steps<R, W>(input: R, mut output: W) -> Result<(), AgentError>
where
    R: Read + Send + 'static,
    W: Write,
{
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o077) };
    writeln!(output, "{AGENT_HELLO}").map_err(AgentError::Write)?;
    output.flush().map_err(AgentError::Write)?;
    let running: std::sync::Arc<Mutex<Option<u32>>> = Default::default();
    let (tx, rx) = std::sync::mpsc::channel::<Result<Option<StepRequest>, FrameError>>();
    let watch = running.clone();
    std::thread::spawn(move || {
        let mut r = FrameReader::new(BufReader::new(input));
        loop {
            let q = StepRequest::decode(&mut r);
            let stop = !matches!(q, Ok(Some(_)));
            if stop {
                // The runner is gone (or spoke nonsense): nothing of ours runs on.
                if let Some(pid) = *watch.lock().unwrap_or_else(|p| p.into_inner()) {
                    // SAFETY: kill(2) on our own child's pid.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
            }
            if tx.send(q).is_err() || stop {
                return;
            }
        }
    });
    while let Ok(q) = rx.recv() {
        let q = match q? {
            Some(q) => q,
            None => return Ok(()),
        };
        let reply = match agent_step(&q, &running) {
            Ok(b) => b,
            Err(m) => {
                let m = m.to_string();
                let mut v = format!("error {}\n", m.len()).into_bytes();
                v.extend_from_slice(m.as_bytes());
                v
            }
        };
        let _ = std::fs::remove_dir_all(&q.dir);
        output.write_all(&reply).map_err(AgentError::Write)?;
        output.flush().map_err(AgentError::Write)?;
    }
    Ok(())
}

/// Why the step agent could not set a step up or send its files back (sent to the
/// runner as the step's `error` frame).
#[derive(Debug, thiserror::Error)]
enum SetupError {
    /// A file or directory operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the path.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file to send back is over the reply bound.
    #[error("{path} is larger than {MAX_GET_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: String,
    },
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> SetupError {
    move |source| SetupError::Io { what, source }
}

/// Run one request; the framed reply, or why the step could not be set up.
fn agent_step(q: &StepRequest, running: &Mutex<Option<u32>>) -> Result<Vec<u8>, SetupError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    use std::os::unix::process::ExitStatusExt;
    let dir = Path::new(&q.dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(format!("creating {}", q.dir)))?;
    let remove = |f: &String| match std::fs::remove_file(f) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("removing {f}"))(e)),
    };
    q.fetch.iter().try_for_each(remove)?;
    let create = |p: &Path| {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(p)
            .map_err(io_err(format!("creating {}", p.display())))
    };
    for (p, b) in &q.puts {
        let path = Path::new(p);
        let parent = path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(parent)
            .map_err(io_err(format!("creating {}", parent.display())))?;
        // Atomically: a reader of the path sees the old file or the new one.
        let mut t = tempfile::Builder::new()
            .prefix(".put.")
            .tempfile_in(parent)
            .map_err(io_err(format!(
                "creating a temporary file in {}",
                parent.display()
            )))?;
        t.write_all(b).map_err(io_err(format!("writing {p}")))?;
        t.persist(path).map_err(|e| SetupError::Io {
            what: format!("renaming into {p}"),
            source: e.error,
        })?;
    }
    q.remove.iter().try_for_each(remove)?;
    if q.stage_only {
        return Ok(b"exit 0\nout 0\nerr 0\n".to_vec());
    }
    let (out_p, err_p) = (dir.join(".out"), dir.join(".err"));
    let mut child = Command::new(&q.argv[0])
        .args(&q.argv[1..])
        .stdin(Stdio::null())
        .stdout(create(&out_p)?)
        .stderr(create(&err_p)?)
        .spawn()
        .map_err(io_err(format!("starting {}", q.argv[0])))?;
    *running.lock().unwrap_or_else(|p| p.into_inner()) = Some(child.id());
    let _ = std::fs::write(dir.join(".pid"), format!("{}\n", child.id()));
    let status = child.wait();
    *running.lock().unwrap_or_else(|p| p.into_inner()) = None;
    let status = status.map_err(io_err(format!("waiting for {}", q.argv[0])))?;
    // After the command's last output: the marks (a tty, an existing file).
    for (p, b) in &q.marks {
        // Never blocking on a line nobody drains (the runner then waits its
        // bound), never becoming the agent's controlling terminal.
        let written = std::fs::OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(p)
            .and_then(|mut f| write_all_within(&mut f, b, MARK_WRITE_BOUND));
        if let Err(e) = written {
            // The runner then waits its bound for the marker; say why here.
            eprintln!("step agent: writing the mark on {p}: {e}");
        }
    }
    // The shell's convention (as STEP_SH): 128+n for a command killed by signal n.
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    let mut v = format!("exit {code}\n").into_bytes();
    let mut emit = |name: &str, p: &Path| -> Result<(), SetupError> {
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_file() => {
                if m.len() > MAX_GET_BYTES {
                    return Err(SetupError::TooLarge {
                        path: p.display().to_string(),
                    });
                }
                let b = std::fs::read(p).map_err(io_err(format!("reading {}", p.display())))?;
                v.extend_from_slice(format!("{name} {}\n", b.len()).as_bytes());
                v.extend_from_slice(&b);
            }
            _ => v.extend_from_slice(format!("{name} -1\n").as_bytes()),
        }
        Ok(())
    };
    emit("out", &out_p)?;
    emit("err", &err_p)?;
    for (i, f) in q.fetch.iter().enumerate() {
        emit(&format!("f{i}"), Path::new(f))?;
    }
    Ok(v)
}

/// Why a step through the agent did not produce an output.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The host's build has no step agent (another VMM program): use [`STEP_SH`].
    #[error("host `{host}`: no step agent: {why}")]
    Unsupported {
        /// The host.
        host: String,
        /// What it answered instead of the hello.
        why: String,
    },
    /// The step ran past its time: the command was killed on the host.
    #[error("host `{host}`: step still running after {after:?}: killed there")]
    Timeout {
        /// The host.
        host: String,
        /// The time it had.
        after: std::time::Duration,
    },
    /// The agent, its SSH session or its reply failed (a transport fault, never a
    /// device verdict).
    #[error("host `{host}`: step agent transport: {why}")]
    Transport {
        /// The host.
        host: String,
        /// What went wrong (a [`FrameError`], ssh's last words).
        why: String,
    },
    /// The host could not set the step up (directory, files, starting the command).
    #[error("host `{host}`: step agent: {why}")]
    Remote {
        /// The host.
        host: String,
        /// The agent's message.
        why: String,
    },
}

/// A running step agent: `ssh ... <hilrig> rig step-agent` over the master
/// connection, and a thread reading its replies.
struct Agent {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    want: std::sync::mpsc::Sender<usize>,
    replies: std::sync::mpsc::Receiver<Result<StepOutput, FrameError>>,
    stderr: std::sync::Arc<Mutex<Vec<u8>>>,
    stderr_thread: Option<std::thread::JoinHandle<()>>,
    /// The build it runs.
    hilrig: String,
}

impl Agent {
    fn stderr_tail(&self) -> String {
        tail(&self.stderr.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The step agent slot of a connection.
#[derive(Default)]
enum AgentSlot {
    #[default]
    None,
    Up(Box<Agent>),
    /// The build has no agent: every step goes through [`STEP_SH`].
    Unsupported(String),
}

impl std::fmt::Debug for AgentSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentSlot::None => f.write_str("None"),
            AgentSlot::Up(a) => write!(f, "Up({})", a.hilrig),
            AgentSlot::Unsupported(w) => write!(f, "Unsupported({w:?})"),
        }
    }
}

/// One host's transport: this machine, or an SSH master connection.
#[derive(Debug)]
pub enum Remote {
    /// Commands run here.
    Local,
    /// Commands run over SSH.
    Ssh(Box<Ssh>),
}

/// An SSH connection to one host (ControlMaster; closed on drop).
#[derive(Debug)]
pub struct Ssh {
    host: String,
    spec: SshSpec,
    /// Private 0700 directory of the control socket.
    dir: tempfile::TempDir,
    /// Hash of the build last verified on the host.
    verified: Mutex<Option<String>>,
    /// The standing step agent session ([`Ssh::step`]).
    agent: Mutex<AgentSlot>,
}

impl Remote {
    /// The transport of inventory host `h`.
    pub fn of(h: &HostSpec) -> Result<Remote, RigError> {
        match &h.ssh {
            None => Ok(Remote::Local),
            Some(spec) => Ok(Remote::Ssh(Box::new(Ssh::new(&h.name, spec.clone())?))),
        }
    }

    /// True for an SSH host.
    pub fn is_remote(&self) -> bool {
        matches!(self, Remote::Ssh(_))
    }

    /// A command running `argv` on the host.
    pub fn command(&self, argv: &[String]) -> Command {
        match self {
            Remote::Local => {
                let mut c = Command::new(argv.first().map(String::as_str).unwrap_or("true"));
                c.args(argv.iter().skip(1));
                c
            }
            Remote::Ssh(s) => s.command(argv),
        }
    }

    /// Make sure the host runs `local` (by SHA-256): for SSH, copy it when the
    /// host's copy differs or is missing. The path to run there.
    pub fn ensure_hilrig(&self, local: &Path) -> Result<String, RemoteError> {
        match self {
            Remote::Local => Ok(local.to_string_lossy().into_owned()),
            Remote::Ssh(s) => s.ensure_hilrig(local),
        }
    }
}

impl Ssh {
    /// A connection to `host` (opened at the first command).
    pub fn new(host: &str, spec: SshSpec) -> Result<Ssh, RigError> {
        spec.validate().map_err(|m| RigError::Inventory {
            file: PathBuf::from("-"),
            host: Some(host.to_string()),
            driver: Some("ssh".into()),
            detail: m.0,
        })?;
        // tempfile creates the directory 0700, under a random name.
        let dir = tempfile::Builder::new()
            .prefix("hilrig-ssh-")
            .tempdir()
            .map_err(|e| RigError::io("creating the ssh control directory", e))?;
        Ok(Ssh {
            host: host.to_string(),
            spec,
            dir,
            verified: Mutex::new(None),
            agent: Mutex::new(AgentSlot::None),
        })
    }

    /// The spec.
    pub fn spec(&self) -> &SshSpec {
        &self.spec
    }

    fn address(&self) -> String {
        format!(
            "{}@{}:{}",
            self.spec.user, self.spec.address, self.spec.port
        )
    }

    /// The ssh options: key only, pinned host key, no prompts, a master connection.
    pub fn options(&self) -> Vec<OsString> {
        let o = |k: &str, v: &dyn AsRef<std::ffi::OsStr>| {
            let mut s = OsString::from(format!("{k}="));
            s.push(v.as_ref());
            ["-o".into(), s]
        };
        let mut a: Vec<OsString> = Vec::new();
        a.extend(o("BatchMode", &"yes"));
        a.extend(o("StrictHostKeyChecking", &"yes"));
        a.extend(o("UserKnownHostsFile", &self.spec.known_hosts));
        a.extend(o("GlobalKnownHostsFile", &"/dev/null"));
        a.extend(o("IdentitiesOnly", &"yes"));
        a.extend(o("IdentityFile", &self.spec.identity));
        a.extend(o("PasswordAuthentication", &"no"));
        a.extend(o("KbdInteractiveAuthentication", &"no"));
        a.extend(o("ControlMaster", &"auto"));
        a.extend(o("ControlPath", &self.dir.path().join("cm")));
        a.extend(o("ControlPersist", &"120"));
        a.extend(o(
            "ConnectTimeout",
            &self.spec.connect_timeout_s.to_string(),
        ));
        a.extend(o("ServerAliveInterval", &"5"));
        a.extend(o("LogLevel", &"ERROR"));
        a.push("-p".into());
        a.push(self.spec.port.to_string().into());
        a.push("-l".into());
        a.push(self.spec.user.clone().into());
        a
    }

    /// `ssh ... -- 'argv'` (each argument quoted for the remote shell).
    pub fn command(&self, argv: &[String]) -> Command {
        let mut c = Command::new("ssh");
        c.args(self.options())
            .arg("-T")
            .arg(&self.spec.address)
            .arg("--")
            .arg(
                argv.iter()
                    .map(|a| shell_quote(a))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        c
    }

    /// Run a shell command line on the host (`sh -c line`), feeding `input`.
    pub fn sh(&self, line: &str, input: Option<&[u8]>) -> Result<Output, RemoteError> {
        let mut c = self.command(&["sh".into(), "-c".into(), line.into()]);
        c.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = c.spawn().map_err(|source| RemoteError::Spawn {
            host: self.host.clone(),
            source,
        })?;
        if let (Some(data), Some(mut w)) = (input, child.stdin.take()) {
            // A write error shows as the command's failure below.
            let _ = w.write_all(data);
        }
        let out = child
            .wait_with_output()
            .map_err(|source| RemoteError::Spawn {
                host: self.host.clone(),
                source,
            })?;
        match out.status.code() {
            Some(0) => Ok(out),
            Some(255) | None => Err(RemoteError::Ssh {
                host: self.host.clone(),
                address: self.address(),
                detail: tail(&out.stderr),
            }),
            code => Err(RemoteError::Command {
                host: self.host.clone(),
                what: line.chars().take(120).collect(),
                code,
                stderr: tail(&out.stderr),
            }),
        }
    }

    /// Write `data` to `path` on the host atomically (a temporary name in the
    /// same directory, then rename), creating the directory; `mode` in octal.
    pub fn put(&self, path: &str, data: &[u8], mode: u32) -> Result<(), RemoteError> {
        let p = shell_quote(path);
        let line = format!(
            "set -e; umask 077; d=$(dirname {p}); mkdir -p \"$d\"; t=$(mktemp \"$d/.put.XXXXXX\"); \
             cat > \"$t\"; chmod {mode:o} \"$t\"; mv -f \"$t\" {p}"
        );
        self.sh(&line, Some(data)).map(|_| ())
    }

    /// Read `path` from the host (at most [`MAX_GET_BYTES`]); `None` when it does
    /// not exist.
    pub fn get(&self, path: &str) -> Result<Option<Vec<u8>>, RemoteError> {
        let p = shell_quote(path);
        let line = format!(
            "if [ -f {p} ]; then echo Y; head -c {} {p}; else echo N; fi",
            MAX_GET_BYTES + 1
        );
        let out = self.sh(&line, None)?;
        match out.stdout.split_first() {
            Some((b'Y', rest)) => {
                let body = rest.strip_prefix(b"\n").unwrap_or(rest);
                if body.len() as u64 > MAX_GET_BYTES {
                    return Err(RemoteError::TooLarge {
                        host: self.host.clone(),
                        path: path.to_string(),
                    });
                }
                Ok(Some(body.to_vec()))
            }
            _ => Ok(None),
        }
    }

    /// SHA-256 of `path` on the host (`sha256sum`); `None` when missing.
    pub fn sha256(&self, path: &str) -> Result<Option<String>, RemoteError> {
        let p = shell_quote(path);
        let out = self.sh(
            &format!("if [ -f {p} ]; then sha256sum {p}; else echo missing; fi"),
            None,
        )?;
        let s = String::from_utf8_lossy(&out.stdout);
        let h = s.split_whitespace().next().unwrap_or("");
        Ok((h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit())).then(|| h.to_string()))
    }

    /// The host's copy of `local`, by hash: copied (atomically) when missing or
    /// different, then checked again. Remembered per connection, so a run hashes
    /// the remote file once.
    pub fn ensure_hilrig(&self, local: &Path) -> Result<String, RemoteError> {
        let want = file_sha256(local)?;
        let path = self.spec.build_path(local);
        {
            let v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if v.as_deref() == Some(want.as_str()) {
                return Ok(path);
            }
        }
        if self.sha256(&path)?.as_deref() != Some(want.as_str()) {
            let data = std::fs::read(local).map_err(|source| RemoteError::Io {
                what: format!("reading {}", local.display()),
                source,
            })?;
            tracing::info!(
                "host {}: copying the hilrig build ({} bytes, sha256 {want}) to {path}",
                self.host,
                data.len()
            );
            self.put(&path, &data, 0o755)?;
            let got = self.sha256(&path)?.unwrap_or_else(|| "nothing".into());
            if got != want {
                return Err(RemoteError::Hash {
                    host: self.host.clone(),
                    path,
                    got,
                    want,
                });
            }
        }
        *self.verified.lock().unwrap_or_else(|p| p.into_inner()) = Some(want);
        Ok(path)
    }

    /// Run one step through the host's step agent (`<hilrig> rig step-agent`,
    /// started over the master connection at the first step and kept for the
    /// next ones): one framed request in, one framed reply out, no process
    /// started on the host but the command itself. Past `timeout` the command is
    /// killed on the host and the agent session dropped. A build without the
    /// agent is remembered ([`StepError::Unsupported`]: use [`STEP_SH`]).
    pub fn step(
        &self,
        hilrig: &str,
        req: &StepRequest,
        timeout: std::time::Duration,
    ) -> Result<StepOutput, StepError> {
        use std::sync::mpsc::RecvTimeoutError;
        let deadline = std::time::Instant::now() + timeout;
        let mut slot = self.agent.lock().unwrap_or_else(|p| p.into_inner());
        if let AgentSlot::Unsupported(why) = &*slot {
            return Err(StepError::Unsupported {
                host: self.host.clone(),
                why: why.clone(),
            });
        }
        if matches!(&*slot, AgentSlot::Up(a) if a.hilrig != hilrig) {
            *slot = AgentSlot::None;
        }
        if matches!(*slot, AgentSlot::None) {
            match self.start_agent(hilrig, deadline) {
                Ok(a) => *slot = AgentSlot::Up(Box::new(a)),
                Err(e @ StepError::Unsupported { .. }) => {
                    *slot = AgentSlot::Unsupported(e.to_string());
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
        let AgentSlot::Up(agent) = &mut *slot else {
            return Err(self.transport("no agent".into()));
        };
        let sent = agent
            .want
            .send(req.fetch.len())
            .map_err(|_| "the reply reader is gone".to_string())
            .and_then(|_| {
                agent
                    .stdin
                    .write_all(&req.encode())
                    .and_then(|_| agent.stdin.flush())
                    .map_err(|e| format!("sending the request: {e}"))
            });
        if let Err(why) = sent {
            let why = format!("{why}; {}", agent.stderr_tail());
            *slot = AgentSlot::None;
            return Err(self.transport(why));
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match agent.replies.recv_timeout(left) {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => {
                let why = e.why.strip_prefix("host: ").map(str::to_string);
                // An `error` frame leaves the agent in step; anything else does not.
                match why {
                    Some(why) if e.why.starts_with("host: ") => Err(StepError::Remote {
                        host: self.host.clone(),
                        why,
                    }),
                    _ => {
                        let why = format!("{e}; {}", agent.stderr_tail());
                        *slot = AgentSlot::None;
                        Err(self.transport(why))
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                let why = agent.stderr_tail();
                *slot = AgentSlot::None;
                Err(self.transport(format!("the agent session ended: {why}")))
            }
            Err(RecvTimeoutError::Timeout) => {
                // Kill the command there (its pid file), then drop the session
                // (the agent kills whatever still runs when its input ends).
                // Bounded: a wedged host must not hang the runner; a VMM that
                // cannot be killed there is a transport fault (the runner then
                // recovers the host), not the case's timeout.
                let d = shell_quote(&req.dir);
                let killed = self.sh_within(
                    &format!("kill -KILL $(cat {d}/.pid) 2>/dev/null; rm -rf {d}; true"),
                    Duration::from_secs(10),
                );
                *slot = AgentSlot::None;
                if let Err(e) = killed {
                    return Err(self.transport(format!(
                        "the step outlived its timeout of {timeout:?} and its VMM could not be killed there (host wedged?): {e}"
                    )));
                }
                Err(StepError::Timeout {
                    host: self.host.clone(),
                    after: timeout,
                })
            }
        }
    }

    /// The pid of the local `ssh` process of the running step agent, if any.
    pub fn agent_pid(&self) -> Option<u32> {
        match &*self.agent.lock().unwrap_or_else(|p| p.into_inner()) {
            AgentSlot::Up(a) => Some(a.child.id()),
            _ => None,
        }
    }

    fn transport(&self, why: String) -> StepError {
        StepError::Transport {
            host: self.host.clone(),
            why,
        }
    }

    /// Start `<hilrig> rig step-agent` and read its hello.
    fn start_agent(&self, hilrig: &str, deadline: std::time::Instant) -> Result<Agent, StepError> {
        let mut c = self.command(&[hilrig.to_string(), "rig".into(), "step-agent".into()]);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .map_err(|e| self.transport(format!("starting ssh: {e}")))?;
        let (Some(stdin), Some(stdout), Some(err)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(self.transport("ssh without pipes".into()));
        };
        let stderr: std::sync::Arc<Mutex<Vec<u8>>> = Default::default();
        let sink = stderr.clone();
        let stderr_thread = std::thread::spawn(move || {
            let mut err = err;
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
                s.extend_from_slice(&buf[..n]);
                // Keep the last 16 KiB.
                let over = s.len().saturating_sub(16 << 10);
                s.drain(..over);
            }
        });
        let (want_tx, want_rx) = std::sync::mpsc::channel::<usize>();
        let (reply_tx, reply_rx) = std::sync::mpsc::channel();
        let (hello_tx, hello_rx) = std::sync::mpsc::channel::<std::io::Result<String>>();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut hello = Vec::new();
            let h = (&mut r)
                .take(64)
                .read_until(b'\n', &mut hello)
                .map(|_| String::from_utf8_lossy(&hello).trim_end().to_string());
            let ok = matches!(&h, Ok(l) if l == AGENT_HELLO);
            if hello_tx.send(h).is_err() || !ok {
                return;
            }
            let mut fr = FrameReader::new(r);
            while let Ok(n) = want_rx.recv() {
                let r = read_step(&mut fr, n);
                let fatal = matches!(&r, Err(e) if !e.why.starts_with("host: "));
                if reply_tx.send(r).is_err() || fatal {
                    return;
                }
            }
        });
        let agent = Agent {
            child,
            stdin,
            want: want_tx,
            replies: reply_rx,
            stderr,
            hilrig: hilrig.to_string(),
            stderr_thread: Some(stderr_thread),
        };
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match hello_rx.recv_timeout(left) {
            Ok(Ok(l)) if l == AGENT_HELLO => Ok(agent),
            Ok(Ok(l)) => {
                // Give ssh a moment to say why (exit 255: the connection itself).
                let mut agent = agent;
                let code = wait_briefly(&mut agent.child);
                if code.is_some() {
                    // ssh has exited: its stderr is complete.
                    if let Some(t) = agent.stderr_thread.take() {
                        let _ = t.join();
                    }
                }
                let why = format!("answered {l:?}; {}", agent.stderr_tail());
                if code == Some(255) {
                    Err(self.transport(why))
                } else {
                    Err(StepError::Unsupported {
                        host: self.host.clone(),
                        why,
                    })
                }
            }
            Ok(Err(e)) => Err(self.transport(format!("reading the agent's hello: {e}"))),
            Err(_) => Err(self.transport(format!(
                "no hello from the step agent in time; {}",
                agent.stderr_tail()
            ))),
        }
    }

    /// SSH reachable and the build at `path` answers `--version` (the health
    /// check, and the wait after a power cycle).
    pub fn alive_at(&self, path: &str) -> Result<String, RemoteError> {
        let out = self.sh(&format!("{} --version", shell_quote(path)), None)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// [`Ssh::alive_at`] the default `hilrig` path.
    pub fn alive(&self) -> Result<String, RemoteError> {
        let h = shell_quote(&self.spec.hilrig_path());
        let out = self.sh(&format!("{h} --version"), None)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The inventory host's name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// [`Ssh::sh`] (no input) bounded by `timeout`: the ssh client is killed after
    /// it ([`RemoteError::Timeout`]), so a wedged host cannot hang the caller.
    pub fn sh_within(&self, line: &str, timeout: Duration) -> Result<Output, RemoteError> {
        let mut c = self.command(&["sh".into(), "-c".into(), line.into()]);
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = run_within(c, timeout).map_err(|e| match e {
            None => RemoteError::Timeout {
                host: self.host.clone(),
                what: line.chars().take(120).collect(),
                timeout,
            },
            Some(source) => RemoteError::Spawn {
                host: self.host.clone(),
                source,
            },
        })?;
        match out.status.code() {
            Some(0) => Ok(out),
            Some(255) | None => Err(RemoteError::Ssh {
                host: self.host.clone(),
                address: self.address(),
                detail: tail(&out.stderr),
            }),
            code => Err(RemoteError::Command {
                host: self.host.clone(),
                what: line.chars().take(120).collect(),
                code,
                stderr: tail(&out.stderr),
            }),
        }
    }

    /// [`Ssh::alive_at`] bounded by `timeout`.
    pub fn alive_within(&self, path: &str, timeout: Duration) -> Result<String, RemoteError> {
        let out = self.sh_within(&format!("{} --version", shell_quote(path)), timeout)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Close the master connection (`ssh -O exit`, bounded by `timeout`; a hung
    /// master is left to its `ServerAliveInterval`): the next command opens a
    /// fresh one. Used after a host was reset or power cycled.
    pub fn close_master(&self, timeout: Duration) {
        let mut c = Command::new("ssh");
        c.args(self.options())
            .args(["-O", "exit"])
            .arg(&self.spec.address)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let _ = run_within(c, timeout);
        // A master that did not answer holds the socket: remove it so the next
        // command does not queue behind it.
        let _ = std::fs::remove_file(self.dir.path().join("cm"));
    }
}

impl Drop for Ssh {
    fn drop(&mut self) {
        // Close the master connection (it would otherwise linger ControlPersist).
        let _ = Command::new("ssh")
            .args(self.options())
            .args(["-O", "exit"])
            .arg(&self.spec.address)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The exit code of a child that ends within a second (`None`: still running,
/// or killed by a signal).
fn wait_briefly(child: &mut std::process::Child) -> Option<i32> {
    for _ in 0..100 {
        if let Ok(Some(s)) = child.try_wait() {
            return s.code();
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    None
}

/// Where hosts come from: an inventory file, or (elsewhere) a labgrid
/// coordinator's acquired places. Each host comes with its drivers' wiring and,
/// for remote hosts, its `[host.ssh]`.
pub trait HostSource: Send + Sync {
    /// A name for messages (the file, the coordinator's address).
    fn describe(&self) -> String;
    /// The hosts this source lends.
    fn hosts(&self) -> Result<Vec<HostSpec>, RigError>;
    /// The lab's configured VMM (`lab.vmm`), if any.
    fn vmm(&self) -> Option<PathBuf> {
        None
    }
    /// Give the hosts back (labgrid: release the places). Default: nothing.
    fn release(&self) -> Result<(), RigError> {
        Ok(())
    }
}

impl HostSource for Inventory {
    fn describe(&self) -> String {
        format!("inventory {}", self.file.display())
    }
    fn hosts(&self) -> Result<Vec<HostSpec>, RigError> {
        Ok(self.hosts.clone())
    }
    fn vmm(&self) -> Option<PathBuf> {
        self.lab.vmm.clone().map(|v| {
            if v.is_relative() {
                self.base_dir().join(v)
            } else {
                v
            }
        })
    }
}

/// How long the step agent waits for room on a console line to write its end
/// mark (a slow line still draining the command's last output).
const MARK_WRITE_BOUND: Duration = Duration::from_secs(2);

/// Write all of `b` to the non-blocking `f`, waiting for room (poll) and resuming
/// partial writes, for at most `bound`; a line that stays full is a `TimedOut`.
fn write_all_within(f: &mut std::fs::File, b: &[u8], bound: Duration) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let until = Instant::now() + bound;
    let mut off = 0;
    while off < b.len() {
        match f.write(&b[off..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "the line stayed full for {bound:?} ({off} of {} bytes written)",
                            b.len()
                        ),
                    ));
                }
                let mut pfd = libc::pollfd {
                    fd: f.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, ms) };
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The end mark waits for room on a full line and resumes a partial write;
    /// a line nobody drains is a bounded `TimedOut`, not a hang.
    #[test]
    fn a_mark_waits_for_room_on_a_full_line_and_gives_up_in_bounds() {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: a two-int array for pipe2 to fill.
        assert_eq!(
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) },
            0
        );
        // SAFETY: the descriptors were just created and are owned here only.
        let (mut r, mut w) = unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        };
        // Fill the line.
        let mut filled = 0usize;
        while let Ok(n) = w.write(&[b'x'; 4096]) {
            filled += n;
        }
        while let Ok(n) = w.write(b"x") {
            filled += n;
        }
        let mark = vec![b'm'; 10_000];
        let e = write_all_within(&mut w, &mark, Duration::from_millis(100)).expect_err("full");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        // Drained by a slow reader meanwhile: the whole mark arrives, in order.
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let mut got = Vec::new();
            let mut buf = [0u8; 8192];
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            got
        });
        write_all_within(&mut w, &mark, Duration::from_secs(5)).expect("drained");
        drop(w);
        let got = reader.join().expect("reader");
        assert!(got.len() >= filled, "{} < {filled}", got.len());
        assert!(
            got.ends_with(&mark[mark.len() - 100..]),
            "the mark's end arrived last"
        );
        assert_eq!(
            got.iter().filter(|&&c| c == b'm').count(),
            mark.len(),
            "the whole mark"
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("abc/d.e"), "abc/d.e");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's; rm -rf /"), r"'it'\''s; rm -rf /'");
        assert_eq!(shell_quote("$(id)"), "'$(id)'");
    }

    #[test]
    fn step_frames() {
        let out = b"exit 3\nout 2\n{}err -1\nf0 0\nf1 -1\n";
        let s = parse_step(out, 2).unwrap();
        assert_eq!(s.code, 3);
        assert_eq!(s.stdout, b"{}");
        assert_eq!(s.files, vec![Some(vec![]), None]);
        // Cut short, extra bytes, wrong order, huge, garbage: errors, no panic.
        for bad in [
            &b"exit 0\nout 5\nab"[..],
            b"exit 0\nout 0\nerr 0\nf0 0\nf1 0\nX",
            b"exit 0\nerr 0\nout 0\n",
            b"exit 0\nout 99999999999\n",
            b"\xff\xfe",
            b"",
            b"exit x\n",
        ] {
            assert!(parse_step(bad, 2).is_err(), "{bad:?}");
        }
        let i = stage_input(&[("/a b".into(), b"xy".to_vec())]);
        assert_eq!(i, b"2 /a b\nxyend -\n");
    }

    /// The step agent over in-memory pipes: hostile names and bytes put and
    /// fetched unchanged, exit codes and missing files framed, the directory
    /// removed; a malformed request stops it with an error, never a reply.
    #[test]
    fn step_agent_serves_framed_requests() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().to_string_lossy().into_owned();
        let d1 = format!("{base}/s 1");
        let hostile = format!("{d1}/it's $(id) `x`\nline;c");
        let data: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let out_f = format!("{d1}/out.bin");
        let q1 = StepRequest {
            dir: d1.clone(),
            argv: vec![
                "sh".into(),
                "-c".into(),
                "cat \"$1\" > \"$2\"; printf '{}'; echo oops >&2; exit 3".into(),
                "x".into(),
                hostile.clone(),
                out_f.clone(),
            ],
            puts: vec![(hostile.clone(), data.clone())],
            fetch: vec![out_f, format!("{d1}/none"), hostile.clone()],
            ..StepRequest::default()
        };
        let q2 = StepRequest {
            dir: format!("{base}/s2"),
            argv: vec!["/nonexistent/hilrig".into()],
            ..StepRequest::default()
        };
        use std::os::unix::net::UnixStream;
        let (agent_in, mut to_agent) = UnixStream::pair().unwrap();
        let (agent_out, from_agent) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve_steps(agent_in, agent_out));
        let mut r = FrameReader::new(BufReader::new(from_agent));
        let mut hello = Vec::new();
        r.inner.read_until(b'\n', &mut hello).unwrap();
        assert_eq!(hello, format!("{AGENT_HELLO}\n").as_bytes());
        to_agent.write_all(&q1.encode()).unwrap();
        let s = read_step(&mut r, 3).expect("reply 1");
        assert_eq!(s.code, 3);
        assert_eq!(s.stdout, b"{}");
        assert_eq!(s.stderr, b"oops\n");
        assert_eq!(s.files[0].as_deref(), Some(&data[..]));
        assert_eq!(s.files[1], None);
        assert_eq!(s.files[2].as_deref(), Some(&data[..]));
        assert!(!Path::new(&d1).exists(), "step directory left behind");
        to_agent.write_all(&q2.encode()).unwrap();
        let e = read_step(&mut r, 0).expect_err("reply 2 is an error frame");
        assert!(
            e.why.starts_with("host: starting /nonexistent/hilrig"),
            "{e}"
        );
        // Staging only (a device's state put in place): the file replaced
        // atomically, the buffers removed, no command run.
        let (st, bufs) = (format!("{base}/dev/state"), format!("{base}/dev/bufs"));
        std::fs::create_dir_all(format!("{base}/dev")).unwrap();
        std::fs::write(&st, b"old").unwrap();
        std::fs::write(&bufs, b"kept").unwrap();
        let stage = StepRequest {
            dir: format!("{base}/stage"),
            puts: vec![(st.clone(), b"new state".to_vec())],
            remove: vec![bufs.clone(), format!("{base}/dev/none")],
            stage_only: true,
            ..StepRequest::default()
        };
        to_agent.write_all(&stage.encode()).unwrap();
        let s = read_step(&mut r, 0).expect("the staging reply");
        assert_eq!((s.code, s.stdout.len(), s.stderr.len()), (0, 0, 0));
        assert_eq!(std::fs::read(&st).unwrap(), b"new state");
        assert!(!Path::new(&bufs).exists(), "buffers kept");
        // A mark is written after the command's own output, on a path that
        // exists; a missing one is not created.
        let (line, nowhere) = (format!("{base}/dev/line"), format!("{base}/dev/nowhere"));
        std::fs::write(&line, b"").unwrap();
        let marked = StepRequest {
            dir: format!("{base}/m"),
            argv: vec![
                "sh".into(),
                "-c".into(),
                "printf 'last words' >> \"$1\"".into(),
                "x".into(),
                line.clone(),
            ],
            marks: vec![
                (line.clone(), b"END".to_vec()),
                (nowhere.clone(), b"E".to_vec()),
            ],
            ..StepRequest::default()
        };
        to_agent.write_all(&marked.encode()).unwrap();
        assert_eq!(read_step(&mut r, 0).expect("the marked reply").code, 0);
        assert_eq!(std::fs::read(&line).unwrap(), b"last wordsEND");
        assert!(!Path::new(&nowhere).exists());
        // The runner goes away while a command runs: the agent kills it.
        let d3 = format!("{base}/s3");
        let q3 = StepRequest {
            dir: d3.clone(),
            argv: vec!["sleep".into(), "600".into()],
            ..StepRequest::default()
        };
        to_agent.write_all(&q3.encode()).unwrap();
        let pid_file = Path::new(&d3).join(".pid");
        let pid: i32 = loop {
            if let Some(p) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break p;
            }
            std::thread::yield_now();
        };
        drop(to_agent);
        let reply = read_step(&mut r, 0).expect("the killed command's reply");
        assert_eq!(reply.code, 128 + libc::SIGKILL);
        server
            .join()
            .unwrap()
            .expect("agent ends cleanly at the end of its input");
        // SAFETY: signal 0 only checks whether the pid exists.
        assert_eq!(
            unsafe { libc::kill(pid, 0) },
            -1,
            "the command outlived its runner"
        );
        assert!(
            r.header().unwrap().is_none(),
            "nothing after the last reply"
        );

        // Requests that are not: relative paths, `..`, no command, cut short,
        // unknown frames, oversized bodies.
        for bad in [
            b"dir 3\nrelarg 1\nxrun 0\n".to_vec(),
            b"dir 7\n/a/../barg 1\nxrun 0\n".to_vec(),
            b"dir 2\n/arun 0\n".to_vec(),
            b"dir 2\n/aarg 1\nxstage 0\n".to_vec(),
            b"dir 2\n/afetch 2\n/bstage 0\n".to_vec(),
            b"dir 2\n/arm 1\nbstage 0\n".to_vec(),
            b"dir 2\n/amark 2\n/bdata 1\nxstage 0\n".to_vec(),
            b"dir 2\n/aarg 1\nx".to_vec(),
            b"dir 2\n/azzz 0\nrun 0\n".to_vec(),
            b"dir 2\n/aput 2\n/bdata 99999999999\n".to_vec(),
            b"dir 99999999999\n".to_vec(),
        ] {
            let mut out = Vec::new();
            let e = serve_steps(std::io::Cursor::new(bad.clone()), &mut out);
            assert!(matches!(e, Err(AgentError::Frame(_))), "{bad:?}: {e:?}");
            assert_eq!(out, format!("{AGENT_HELLO}\n").as_bytes(), "{bad:?}");
        }
    }

    #[test]
    fn file_hash_is_cached_until_the_file_changes() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("build");
        std::fs::write(&p, b"one").unwrap();
        let a = file_sha256(&p).unwrap();
        assert_eq!(file_sha256(&p).unwrap(), a);
        std::fs::write(&p, b"two, longer").unwrap();
        let b = file_sha256(&p).unwrap();
        assert_ne!(a, b);
        assert_eq!(b, hex::encode(Sha256::digest(b"two, longer")));
    }

    #[test]
    fn spec_validation() {
        let s = SshSpec {
            address: "127.0.0.11".into(),
            port: 22,
            user: "sim1".into(),
            identity: "k".into(),
            known_hosts: "kh".into(),
            workdir: "/var/lib/x".into(),
            hilrig: None,
            connect_timeout_s: 5,
            console: None,
            console_owner: None,
        };
        assert!(s.validate().is_ok());
        assert_eq!(s.hilrig_path(), "/var/lib/x/bin/hilrig");
        for bad in [
            SshSpec {
                address: "-oProxyCommand=x".into(),
                ..s.clone()
            },
            SshSpec {
                user: "a b".into(),
                ..s.clone()
            },
            SshSpec {
                workdir: "rel".into(),
                ..s.clone()
            },
            SshSpec {
                workdir: "/a/../b".into(),
                ..s.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
