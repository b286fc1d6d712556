//! Artifacts streamed from run directories, with path traversal impossible:
//! the relative path is checked component by component (no `..`, `.`, empty
//! or NUL parts, not absolute), then opened `openat`-style one component at a
//! time from the run directory with `O_NOFOLLOW` (a symlink anywhere on the way
//! is refused, never followed), the result must be a regular file, and the
//! opened file's real path must lie under the run directory's canonical path.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Why an artifact was not served.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The path is not a plain relative path inside the run directory.
    #[error("artifact path {path:?} refused: {why}")]
    Refused {
        /// The path asked for.
        path: String,
        /// Why.
        why: &'static str,
    },
    /// Opening failed (missing, a symlink on the way, not a regular file).
    #[error("artifact {path:?} in {dir}: {why}")]
    Open {
        /// The path asked for.
        path: String,
        /// The run directory.
        dir: String,
        /// Why.
        why: String,
    },
}

/// Largest artifact served whole in a page's "last lines" (the stream has no bound).
pub const TAIL_BYTES: u64 = 64 * 1024;

/// The components of a safe relative path, or why not.
pub fn check(rel: &str) -> Result<Vec<&str>, ArtifactError> {
    let refuse = |why| ArtifactError::Refused {
        path: rel.to_string(),
        why,
    };
    if rel.is_empty() {
        return Err(refuse("empty"));
    }
    if rel.len() > 4096 {
        return Err(refuse("too long"));
    }
    if rel.starts_with('/') {
        return Err(refuse("absolute"));
    }
    if rel.contains('\0') {
        return Err(refuse("NUL byte"));
    }
    if rel.contains('\\') {
        return Err(refuse("backslash"));
    }
    let parts: Vec<&str> = rel.split('/').collect();
    for p in &parts {
        match *p {
            "" => return Err(refuse("empty component")),
            "." | ".." => return Err(refuse("`.` or `..` component")),
            _ => {}
        }
    }
    Ok(parts)
}

fn open_at(dir: libc::c_int, name: &str, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    let c =
        CString::new(name).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated string and `dir` an open descriptor
    // (or AT_FDCWD); the returned descriptor is owned below.
    let fd = unsafe { libc::openat(dir, c.as_ptr(), flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open the artifact `rel` of the run directory `run_dir` for reading.
pub fn open(run_dir: &Path, rel: &str) -> Result<(File, u64), ArtifactError> {
    let parts = check(rel)?;
    let fail = |why: String| ArtifactError::Open {
        path: rel.to_string(),
        dir: run_dir.display().to_string(),
        why,
    };
    let root: PathBuf = run_dir
        .canonicalize()
        .map_err(|e| fail(format!("run directory: {e}")))?;
    let root_c = CString::new(root.as_os_str().as_bytes()).map_err(|_| fail("NUL".into()))?;
    // SAFETY: a valid path string; the descriptor is owned right after.
    let fd = unsafe {
        libc::open(
            root_c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(fail(format!(
            "run directory: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: just opened, owned here only.
    let mut cur = unsafe { OwnedFd::from_raw_fd(fd) };
    let (last, dirs) = parts.split_last().ok_or_else(|| fail("empty".into()))?;
    for d in dirs {
        cur = open_at(cur.as_raw_fd(), d, libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(|e| fail(format!("{d}: {e} (symlinks are not followed)")))?;
    }
    let f = open_at(cur.as_raw_fd(), last, libc::O_RDONLY | libc::O_NONBLOCK)
        .map_err(|e| fail(format!("{e} (symlinks are not followed)")))?;
    let file = File::from(f);
    let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    // Belt and braces: the opened file's real path is under the run directory.
    let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|e| fail(format!("resolving the opened file: {e}")))?;
    if !real.starts_with(&root) {
        return Err(fail("outside the run directory".into()));
    }
    Ok((file, meta.len()))
}

/// The last `n` lines of a text artifact (at most [`TAIL_BYTES`] read).
pub fn tail_lines(run_dir: &Path, rel: &str, n: usize) -> Result<Vec<String>, ArtifactError> {
    use std::io::{Read, Seek, SeekFrom};
    let (mut f, len) = open(run_dir, rel)?;
    let from = len.saturating_sub(TAIL_BYTES);
    let mut buf = vec![];
    f.seek(SeekFrom::Start(from))
        .and_then(|_| f.take(TAIL_BYTES).read_to_end(&mut buf))
        .map_err(|e| ArtifactError::Open {
            path: rel.to_string(),
            dir: run_dir.display().to_string(),
            why: e.to_string(),
        })?;
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    Ok(lines[lines.len().saturating_sub(n)..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        for bad in [
            "",
            "/etc/passwd",
            "..",
            "../x",
            "a/../../x",
            "a/./b",
            "a//b",
            "a/",
            "a\\..\\b",
            "a\0b",
        ] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check("cases/x/console.txt").unwrap().len(), 3);
        assert!(
            check("..hidden").is_ok(),
            "a name starting with dots is a name"
        );
    }
}
