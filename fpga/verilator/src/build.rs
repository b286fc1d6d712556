//! Verilating a design into a shared library, cached by the SHA-256 of everything
//! that goes into it, built in a temporary directory and renamed into place.

use crate::Error;
use sha2::{Digest, Sha256};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where and with what a library is built.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BuildOptions {
    /// The `verilator` program (default: `$HILRIG_VERILATOR`, else `verilator` on
    /// the `PATH`).
    pub verilator: PathBuf,
    /// The cache directory (default: [`default_cache_dir`]).
    pub cache_dir: PathBuf,
    /// Parallel compile jobs (default 2: this is a 2-core machine shared with others).
    pub jobs: u32,
    /// Build the device core with VCD tracing (`verilator --trace`; a separate
    /// library, somewhat slower): needed for `Verilator::trace_vcd`.
    pub trace: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            verilator: std::env::var_os("HILRIG_VERILATOR")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("verilator")),
            cache_dir: default_cache_dir(),
            jobs: 2,
            trace: false,
        }
    }
}

/// `$HILRIG_VERILATOR_CACHE`, else `$XDG_CACHE_HOME/hilrig/verilator`, else
/// `$HOME/.cache/hilrig/verilator`, else under the system temporary directory.
pub fn default_cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = env("HILRIG_VERILATOR_CACHE") {
        return p;
    }
    if let Some(p) = env("XDG_CACHE_HOME") {
        return p.join("hilrig").join("verilator");
    }
    if let Some(p) = env("HOME") {
        return p.join(".cache").join("hilrig").join("verilator");
    }
    std::env::temp_dir().join("hilrig-verilator-cache")
}

/// What goes into one library: the Verilog (top module `top`), Verilator
/// configuration and the C++ sources compiled with it.
#[derive(Debug, Clone)]
pub struct Sources<'a> {
    /// A name for logs and errors (`device core`, `bare harness`).
    pub what: &'a str,
    /// Verilog source files by name.
    pub verilog: Vec<(&'a str, String)>,
    /// Verilator configuration files (`.vlt`) by name.
    pub config: Vec<(&'a str, &'a str)>,
    /// C++ sources by name.
    pub cpp: Vec<(&'a str, &'a str)>,
    /// Build a shared library (else an executable).
    pub shared: bool,
    /// Extra arguments to verilator (e.g. `--trace`).
    pub args: Vec<&'a str>,
}

/// The file name of the built artefact in its cache directory.
pub const ARTEFACT: &str = "artefact";
const MANIFEST: &str = "artefact.sha256";
/// Bumped when the build recipe changes.
const RECIPE: &str = "hilrig-verilator build recipe 1";

/// `verilator --version`, or `VerilatorMissing` if it cannot be run.
pub fn verilator_version(verilator: &Path) -> Result<String, Error> {
    let out = Command::new(verilator)
        .arg("--version")
        .output()
        .map_err(|source| Error::VerilatorMissing {
            program: verilator.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Build {
            what: format!("{} --version", verilator.display()),
            status: out.status.to_string(),
            dir: PathBuf::from("."),
            log: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn cache_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Cache {
        path: path.to_path_buf(),
        source,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The cache key of `src` built with `version`.
pub fn cache_key(src: &Sources<'_>, version: &str) -> String {
    let mut h = Sha256::new();
    let mut part = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    part(RECIPE.as_bytes());
    part(version.as_bytes());
    part(&[src.shared as u8]);
    for a in &src.args {
        part(a.as_bytes());
    }
    for (n, t) in &src.verilog {
        part(n.as_bytes());
        part(t.as_bytes());
    }
    for (n, t) in src.config.iter().chain(&src.cpp) {
        part(n.as_bytes());
        part(t.as_bytes());
    }
    hex::encode(h.finalize())
}

/// A built artefact in the cache.
#[derive(Debug, Clone)]
pub struct Built {
    /// The library or executable.
    pub path: PathBuf,
    /// Whether this call built it (false: it came from the cache).
    pub fresh: bool,
    /// The cache key.
    pub key: String,
}

/// Whether the artefact in `dir` is whole: present and equal to its manifest.
fn whole(dir: &Path) -> bool {
    let (Ok(art), Ok(man)) = (
        std::fs::read(dir.join(ARTEFACT)),
        std::fs::read_to_string(dir.join(MANIFEST)),
    ) else {
        return false;
    };
    sha256_hex(&art) == man.trim()
}

/// Move a stale or broken cache entry out of the way and delete it. Another process
/// doing the same at once is fine (whoever renames first deletes it).
pub fn discard(dir: &Path) -> Result<(), Error> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    let away = parent.join(format!(
        ".stale-{}-{}",
        std::process::id(),
        dir.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    match std::fs::rename(dir, &away) {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(&away);
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(cache_err(dir)(e)),
    }
}

/// The artefact of `src`: from the cache if it is there and whole, else built (in a
/// temporary directory beside the cache entry, renamed into place when complete).
pub fn build(src: &Sources<'_>, opts: &BuildOptions) -> Result<Built, Error> {
    let version = verilator_version(&opts.verilator)?;
    let key = cache_key(src, &version);
    let dir = opts.cache_dir.join(&key);
    if whole(&dir) {
        return Ok(Built {
            path: dir.join(ARTEFACT),
            fresh: false,
            key,
        });
    }
    std::fs::create_dir_all(&opts.cache_dir).map_err(cache_err(&opts.cache_dir))?;
    // One build of a key at a time across processes (the others wait, then find it
    // in the cache); correctness does not depend on it (see the rename below).
    let _lock = BuildLock::take(&opts.cache_dir.join(format!(".{key}.lock")))?;
    if whole(&dir) {
        return Ok(Built {
            path: dir.join(ARTEFACT),
            fresh: false,
            key,
        });
    }
    if dir.exists() {
        discard(&dir)?;
    }
    let tmp = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&opts.cache_dir)
        .map_err(cache_err(&opts.cache_dir))?;
    if let Err(e) = compile(src, opts, tmp.path()) {
        // Keep the failed build (its log) for a look.
        let _ = tmp.keep();
        return Err(e);
    }
    // Complete: hand the temporary directory over to its final name. If another
    // process got there first, its (equal) build stays and ours is deleted.
    let staged = tmp.keep();
    match std::fs::rename(&staged, &dir) {
        Ok(()) => {}
        Err(_) if whole(&dir) => {
            let _ = std::fs::remove_dir_all(&staged);
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staged);
            return Err(cache_err(&dir)(e));
        }
    }
    Ok(Built {
        path: dir.join(ARTEFACT),
        fresh: true,
        key,
    })
}

/// An exclusive `flock` on a lock file, released when dropped (or when the process
/// dies).
struct BuildLock(std::fs::File);

impl BuildLock {
    fn take(path: &Path) -> Result<BuildLock, Error> {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(cache_err(path))?;
        loop {
            // SAFETY: flock on a file descriptor this function owns.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(BuildLock(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                return Err(cache_err(path)(e));
            }
        }
    }
}

impl Drop for BuildLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: unlocking the descriptor this value owns.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Verilate and compile `src` in `dir`; leaves `dir/artefact` and its manifest.
fn compile(src: &Sources<'_>, opts: &BuildOptions, dir: &Path) -> Result<(), Error> {
    let mut files = Vec::new();
    for (name, text) in src
        .config
        .iter()
        .map(|(n, t)| (*n, *t))
        .chain(src.verilog.iter().map(|(n, t)| (*n, t.as_str())))
        .chain(src.cpp.iter().map(|(n, t)| (*n, *t)))
    {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(cache_err(&p))?;
        files.push(name.to_string());
    }
    let mut cmd = Command::new(&opts.verilator);
    cmd.current_dir(dir)
        .args(["--cc", "--exe", "--build", "--top-module", "top"])
        .args(["-Wno-fatal", "-Wno-lint", "-Wno-style", "--Mdir", "obj"])
        .args(["-j", &opts.jobs.max(1).to_string()])
        .args(["-MAKEFLAGS", "OPT_FAST=-O2 OPT_SLOW=-O1 OPT_GLOBAL=-O2"])
        .args(["-o", "artefact.out"])
        .args(&src.args)
        .args(&files);
    if src.shared {
        cmd.args(["-CFLAGS", "-fPIC", "-LDFLAGS", "-shared -Wl,-Bsymbolic"]);
    }
    let out = cmd.output().map_err(|source| Error::VerilatorMissing {
        program: opts.verilator.clone(),
        source,
    })?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::write(dir.join("build.log"), &log);
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        return Err(Error::Build {
            what: format!("verilating the {}", src.what),
            status: out.status.to_string(),
            dir: dir.to_path_buf(),
            log: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    let built = dir.join("obj").join("artefact.out");
    let art = dir.join(ARTEFACT);
    std::fs::rename(&built, &art).map_err(cache_err(&built))?;
    let bytes = std::fs::read(&art).map_err(cache_err(&art))?;
    let man = dir.join(MANIFEST);
    std::fs::write(&man, sha256_hex(&bytes)).map_err(cache_err(&man))?;
    let _ = std::fs::remove_dir_all(dir.join("obj"));
    Ok(())
}
