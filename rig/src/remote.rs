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
use std::io::Write;
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

/// SHA-256 of a file, hex.
pub fn file_sha256(path: &Path) -> Result<String, RemoteError> {
    let mut f = std::fs::File::open(path).map_err(|source| RemoteError::Io {
        what: format!("reading {}", path.display()),
        source,
    })?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|source| RemoteError::Io {
        what: format!("reading {}", path.display()),
        source,
    })?;
    Ok(hex::encode(h.finalize()))
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
for f in $fetch; do rm -f "$f"; done
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
    let mut at = 0usize;
    let bad = |at: usize, why: String| FrameError { at, why };
    let header = |at: &mut usize, want: &str| -> Result<i64, FrameError> {
        let rest = &out[*at..];
        let nl = rest
            .iter()
            .take(64)
            .position(|&b| b == b'\n')
            .ok_or_else(|| bad(*at, format!("no `{want}` header line")))?;
        let line =
            std::str::from_utf8(&rest[..nl]).map_err(|_| bad(*at, "header is not UTF-8".into()))?;
        let (name, n) = line
            .split_once(' ')
            .ok_or_else(|| bad(*at, format!("header {line:?}")))?;
        if name != want {
            return Err(bad(*at, format!("expected `{want}`, got {name:?}")));
        }
        let n: i64 = n
            .parse()
            .map_err(|_| bad(*at, format!("bad number in {line:?}")))?;
        *at += nl + 1;
        Ok(n)
    };
    let code = header(&mut at, "exit")?;
    let body = |at: &mut usize, want: &str| -> Result<Option<Vec<u8>>, FrameError> {
        let n = header(at, want)?;
        if n < 0 {
            return Ok(None);
        }
        if n as u64 > MAX_GET_BYTES {
            return Err(bad(*at, format!("`{want}` of {n} bytes is too large")));
        }
        let n = n as usize;
        let b = out
            .get(*at..*at + n)
            .ok_or_else(|| bad(*at, format!("`{want}` cut short ({n} bytes announced)")))?;
        *at += n;
        Ok(Some(b.to_vec()))
    };
    let stdout = body(&mut at, "out")?.unwrap_or_default();
    let stderr = body(&mut at, "err")?.unwrap_or_default();
    let mut files = Vec::new();
    for i in 0..nfiles {
        files.push(body(&mut at, &format!("f{i}"))?);
    }
    if at != out.len() {
        return Err(bad(
            at,
            format!("{} bytes after the last frame", out.len() - at),
        ));
    }
    Ok(StepOutput {
        code: code.clamp(0, 255) as i32,
        stdout,
        stderr,
        files,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

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
