//! Files and directories a hostile local user may have prepared: the shared checks
//! of issue 16 (DESIGN.md §6, "local user → VMM / rig").
//!
//! - [`write_atomic`] / [`write_atomic_mode`]: a temporary file with a random name
//!   created `O_CREAT|O_EXCL|O_NOFOLLOW` beside the target (a planted symlink is
//!   never followed), synced, renamed into place, directory synced.
//! - [`read_secret_file`] / [`check_secret_file`]: secret key files must be regular
//!   files with no group/other permission bits, owned by the current user or root.
//!   A symlink is resolved and the *target's* mode and owner are checked, on the
//!   opened file descriptor (no race between the check and the read).
//! - [`read_trusted_file`]: trusted (public) key files must be regular files owned
//!   by the current user or root and not writable by group or others.
//! - [`check_trusted_program`]: a program we run (the VMM a rig starts) must be a
//!   regular file owned by us or root, not group/other-writable, under directory
//!   chains (its path's and its symlinks') that pass [`check_dir_chain`].
//! - [`check_dir_chain`]: a directory and every one above it must be owned by us
//!   or root and not group/other-writable unless sticky; a symlink on the way is
//!   checked where it leads. Used for output files, private directories and the
//!   VMM's control socket.
//! - [`ensure_private_dir`]: a directory we write into is created 0700 if missing
//!   (once the nearest existing directory above passes [`check_dir_chain`]); an
//!   existing one is refused unless it is a real directory (not a symlink), owned
//!   by the current user and not writable by group or others, under a chain that
//!   passes [`check_dir_chain`].
//! - [`read_bounded`]: a regular file read with a size limit, refusing FIFOs and
//!   devices before opening them for reading blocks.
//! - [`create_output_file`]: an output file (console, alarms) opened without
//!   following a symlink or waiting on a FIFO, and refused unless it is a regular
//!   file with a single link owned by us or root, under a directory chain that
//!   passes [`check_dir_chain`]; made 0600 before it is truncated.
//!   [`check_output_path`]: its checks by name, for a caller handing the path on.
//! - [`open_console_output`]: a VMM's console, a terminal through a chain of at most
//!   [`MAX_CONSOLE_LINKS`] symlinks, each link's directories (and the terminal's)
//!   passing [`check_dir_chain`]; the terminal ours, root's or a named console
//!   service user's (ser2net, labgrid); anything else an output file.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a file or directory was refused. Every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum SecureFileError {
    /// An I/O error.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A secret file others may read or write.
    #[error("{path}: mode {mode:04o} gives group/other access to a secret key file; run `chmod 600 {path}`")]
    SecretMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A secret or trusted file (a key, a trust anchor) owned by someone other
    /// than us or root: its owner may have put a key there they know (a symlink
    /// to it, or a swap in a directory they can write), so it is not ours to trust.
    #[error("{path}: owned by uid {owner}, not by the current user (uid {me}) or root; refusing a {what} someone else controls")]
    ForeignOwner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The current (effective) user.
        me: u32,
        /// What the file is ("secret key file", "trusted key file").
        what: &'static str,
    },
    /// A trusted (public) key file group or others may write: anyone who can
    /// write it can make us trust their key.
    #[error("{path}: mode {mode:04o} lets group/other write a {what}; run `chmod go-w {path}`")]
    TrustedWritable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// What the file is ("trusted key file", "program").
        what: &'static str,
    },
    /// Not a regular file (a FIFO, device, socket or directory).
    #[error("{path}: {kind}, not a regular file")]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// Larger than the limit.
    #[error("{path}: {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size (or at least this many bytes were read).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A key file whose contents are not a key.
    #[error("key file {path}: {detail}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What is wrong (never the key's bytes).
        detail: String,
    },
    /// A console path whose symlinks go on for more than the limit (or loop).
    #[error("{path}: more than {limit} symlinks on the way to a terminal")]
    TooManyLinks {
        /// The console path.
        path: PathBuf,
        /// The most links followed.
        limit: usize,
    },
    /// A work directory that is not safe to write into.
    #[error("directory {path}: {reason}")]
    UnsafeDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SecureFileError + '_ {
    move |source| SecureFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn kind_of(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "a directory"
    } else if ft.is_file() {
        "a regular file"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_symlink() {
        "a symlink"
    } else {
        "a special file"
    }
}

/// Write `bytes` to `path` atomically with mode 0600 (see [`write_atomic_mode`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_mode(path, bytes, 0o600)
}

/// Write `bytes` to `path` atomically: a temporary file with a random name in the
/// same directory, created `O_CREAT|O_EXCL|O_NOFOLLOW` with `mode`, written and
/// synced, renamed over `path` (a symlink at `path` is replaced, not followed),
/// then the directory is synced. On error the temporary file is removed.
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} has no file name", path.display())))?;
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(&dir)?;
    // `permissions` is subject to the umask; set the exact mode on the fd.
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(&dir)?.sync_all()
}

/// 32 random bytes from the kernel's CSPRNG (`getrandom(2)`), for keys and nonces.
pub fn random_key() -> std::io::Result<[u8; 32]> {
    let mut k = [0u8; 32];
    let mut filled = 0;
    while filled < k.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `k`.
        let n = unsafe {
            libc::getrandom(
                k[filled..].as_mut_ptr() as *mut libc::c_void,
                k.len() - filled,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(k)
}

/// Create the secret file `path` holding `bytes`: `O_CREAT|O_EXCL|O_NOFOLLOW`, mode
/// 0600 (set on the descriptor, whatever the umask), synced. An existing file or a
/// planted symlink is refused, never replaced or followed.
pub fn create_secret_file(path: &Path, bytes: &[u8]) -> Result<(), SecureFileError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io(path))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// The OOB reset-key file `device init` writes beside a state file by default:
/// `STATE.reset-key`.
pub fn reset_key_path(state: &Path) -> PathBuf {
    let mut s = state.as_os_str().to_owned();
    s.push(".reset-key");
    PathBuf::from(s)
}

/// Write a new OOB reset-key file (64 hex digits and a newline; 0600,
/// `O_EXCL|O_NOFOLLOW`: an existing file is never replaced).
pub fn write_reset_key_file(path: &Path, key: &[u8; 32]) -> Result<(), SecureFileError> {
    let mut text = String::with_capacity(65);
    for b in key {
        text.push_str(&format!("{b:02x}"));
    }
    text.push('\n');
    create_secret_file(path, text.as_bytes())
}

/// Read an OOB reset-key file: 64 hex digits, the file owner-only (a key file
/// group/other can read is refused, naming the file and its mode). Errors never
/// quote the file's contents.
pub fn read_reset_key_file(path: &Path) -> Result<[u8; 32], SecureFileError> {
    let text = read_secret_file(path, 4096)?;
    let t = text.trim();
    let bad = |detail: String| SecureFileError::BadKey {
        path: path.to_path_buf(),
        detail,
    };
    if t.len() != 64 {
        return Err(bad(format!(
            "{} characters, a reset key is 64 hex digits",
            t.len()
        )));
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = t
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or_else(|| bad("not hex (a reset key is 64 hex digits)".into()))?;
    }
    Ok(k)
}

/// Open `path` for reading without blocking (a FIFO cannot hang us) and check on
/// the descriptor that it is a regular file; with its metadata.
fn open_regular(path: &Path) -> Result<(std::fs::File, std::fs::Metadata), SecureFileError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_nonblock())
        .open(path)
        .map_err(io(path))?;
    let meta = f.metadata().map_err(io(path))?;
    if !meta.file_type().is_file() {
        return Err(SecureFileError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(meta.file_type()),
        });
    }
    Ok((f, meta))
}

/// Open a secret key file for reading and check it: a regular file with no
/// group/other permission bits, owned by the current user or root. A symlink is
/// followed and the target's mode and owner checked, on the opened descriptor.
pub fn open_secret_file(path: &Path) -> Result<std::fs::File, SecureFileError> {
    let (f, meta) = open_regular(path)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecureFileError::SecretMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    ours_or_roots(&meta, path, "secret key file")?;
    Ok(f)
}

/// A file we trust must be owned by us or root.
fn ours_or_roots(
    meta: &std::fs::Metadata,
    path: &Path,
    what: &'static str,
) -> Result<(), SecureFileError> {
    let me = euid();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(SecureFileError::ForeignOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
            what,
        });
    }
    Ok(())
}

/// Read a trusted (public) key file of at most `limit` bytes, as text: a regular
/// file (opened non-blocking; a FIFO or device refused), owned by us or root and
/// not writable by group or others, checked on the opened descriptor (a symlink is
/// followed and its target checked). Whoever can write a trust anchor (a patch or
/// firmware signing key) can make us accept what they sign.
pub fn read_trusted_file(path: &Path, limit: u64) -> Result<String, SecureFileError> {
    let (f, meta) = open_regular(path)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(SecureFileError::TrustedWritable {
            path: path.to_path_buf(),
            mode,
            what: "trusted key file",
        });
    }
    ours_or_roots(&meta, path, "trusted key file")?;
    read_limited(f, path, limit)
}

/// Check a program we are about to run (as root, say: the VMM a rig starts) and
/// return the path to run it by, with every symlink resolved: the file and the
/// directories above it (where the path says and where its links lead) must be
/// where only we or root can change them ([`check_dir_chain`]), and the file a
/// regular file owned by us or root that group and others cannot write. Whoever can
/// replace a program we run runs their code as us.
pub fn check_trusted_program(path: &Path) -> Result<PathBuf, SecureFileError> {
    check_dir_chain(parent_dir(path))?;
    let real = std::fs::canonicalize(path).map_err(io(path))?;
    check_dir_chain(parent_dir(&real))?;
    let meta = std::fs::metadata(&real).map_err(io(&real))?;
    if !meta.file_type().is_file() {
        return Err(SecureFileError::NotRegular {
            path: real,
            kind: kind_of(meta.file_type()),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(SecureFileError::TrustedWritable {
            path: real,
            mode,
            what: "program",
        });
    }
    ours_or_roots(&meta, &real, "program")?;
    Ok(real)
}

/// Check a secret key file without keeping it open (see [`open_secret_file`]).
pub fn check_secret_file(path: &Path) -> Result<(), SecureFileError> {
    open_secret_file(path).map(drop)
}

/// Read a secret key file of at most `limit` bytes (checked as in
/// [`open_secret_file`]), as text.
pub fn read_secret_file(path: &Path, limit: u64) -> Result<String, SecureFileError> {
    let f = open_secret_file(path)?;
    read_limited(f, path, limit)
}

/// Open the output file `path` (a console capture, an alarm log) for writing from
/// its start, as a VMM run as root may be asked to in a directory others can write:
/// created mode 0600 if missing; opened `O_NOFOLLOW` (a planted symlink is refused,
/// never followed) and non-blocking (a planted FIFO cannot hang the caller), then
/// checked on the descriptor: a regular file with one link (a planted hard link to
/// another file is refused), owned by us or root (a file another user made keeps
/// their access to it), then made 0600 on the descriptor. Only then is it
/// truncated. The directories above it must pass [`check_dir_chain`] (`O_NOFOLLOW`
/// covers only the last component).
pub fn create_output_file(path: &Path) -> Result<std::fs::File, SecureFileError> {
    check_dir_chain(parent_dir(path))?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc_o_nonblock())
        .open(path)
        .map_err(|e| match std::fs::symlink_metadata(path) {
            // ELOOP (a symlink) or ENXIO (a FIFO nobody reads): say what is there.
            Ok(m) if m.file_type().is_symlink() => SecureFileError::NotRegular {
                path: path.to_path_buf(),
                kind: "a symlink (not followed)",
            },
            Ok(m) if !m.file_type().is_file() => SecureFileError::NotRegular {
                path: path.to_path_buf(),
                kind: kind_of(m.file_type()),
            },
            _ => io(path)(e),
        })?;
    let meta = f.metadata().map_err(io(path))?;
    if !meta.file_type().is_file() {
        return Err(SecureFileError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(meta.file_type()),
        });
    }
    if meta.nlink() != 1 {
        return Err(SecureFileError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(format!(
                "has {} hard links; refusing to overwrite a file linked elsewhere",
                meta.nlink()
            )),
        });
    }
    ours_or_roots(&meta, path, "output file")?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io(path))?;
    f.set_len(0).map_err(io(path))?;
    Ok(f)
}

/// Most symlinks [`open_console_output`] follows from the console path to its
/// terminal (a lab's `console.tty` -> `/dev/serial/by-id/...` -> `../../ttyUSB0` is
/// two).
pub const MAX_CONSOLE_LINKS: usize = 8;

/// Open a VMM's console output `path`: a terminal (a host's serial line, a pty),
/// directly or through symlinks (`/dev/serial/by-id/...`, a lab's `console.tty`
/// link), is opened for writing as it is, never truncated; anything else must be a
/// regular file and is opened by [`create_output_file`] (no symlink followed, no
/// FIFO waited on, no hard link truncated). A symlink to anything but a terminal is
/// refused, so a link planted at the path cannot have root truncate or write its
/// target.
///
/// The links are followed one at a time (at most [`MAX_CONSOLE_LINKS`]), and the
/// directories above every one of them, and above the terminal, must pass
/// [`check_dir_chain`]: a link in a directory another user can write would let them
/// point the console at a terminal of theirs. The terminal itself is opened
/// `O_NOFOLLOW` at the path the links led to and checked on the open descriptor (a
/// character device, `isatty`), so a swap between the look and the open is caught.
///
/// Its owner must be us, root, or one of `owners`: the uids the caller names as
/// the lab's console services (a ser2net or labgrid exporter user holding the pty
/// it serves; `hilrig-vmm --console-owner UID`). A terminal anyone else owns is
/// refused (its owner would read the console), so a pty number an attacker grabbed
/// after the service's pty closed is not written to. Its open does not wait for a
/// carrier (`O_NONBLOCK`, cleared after the checks) nor make it our controlling
/// terminal.
pub fn open_console_output(path: &Path, owners: &[u32]) -> Result<std::fs::File, SecureFileError> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::io::AsRawFd;
    let is_char = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_char_device());
    if !is_char {
        return create_output_file(path);
    }
    let terminal = console_link_target(path, owners)?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_CLOEXEC | libc_o_nonblock())
        .open(&terminal)
        .map_err(io(path))?;
    let meta = f.metadata().map_err(io(path))?;
    // SAFETY: isatty on a descriptor we own.
    if !meta.file_type().is_char_device() || unsafe { libc::isatty(f.as_raw_fd()) } != 1 {
        return Err(SecureFileError::NotRegular {
            path: path.to_path_buf(),
            kind: "a character device that is not a terminal",
        });
    }
    if !owners.contains(&meta.uid()) {
        ours_or_roots(&meta, path, "console terminal")?;
    }
    // Blocking writes from here, as to any console.
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
    let cleared = unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        fl >= 0 && libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) == 0
    };
    if !cleared {
        return Err(io(path)(std::io::Error::last_os_error()));
    }
    Ok(f)
}

/// Follow the symlinks from `path` one at a time (at most [`MAX_CONSOLE_LINKS`]),
/// checking the directories above each link and above where they end with
/// [`check_dir_chain`], and that each link is ours, root's or one of `owners`' (a
/// sticky directory such as /tmp passes the chain check, and another user's link
/// there is theirs to point anywhere: read_link does not apply the kernel's
/// protected_symlinks rule); the path they end at (not a symlink).
fn console_link_target(path: &Path, owners: &[u32]) -> Result<PathBuf, SecureFileError> {
    let mut at = std::path::absolute(path).map_err(io(path))?;
    for _ in 0..=MAX_CONSOLE_LINKS {
        check_dir_chain(parent_dir(&at))?;
        let m = std::fs::symlink_metadata(&at).map_err(io(&at))?;
        if !m.file_type().is_symlink() {
            return Ok(at);
        }
        if !owners.contains(&m.uid()) {
            ours_or_roots(&m, &at, "console link")?;
        }
        let to = std::fs::read_link(&at).map_err(io(&at))?;
        // A relative target is relative to the link's directory; an absolute one
        // replaces the path.
        at = parent_dir(&at).join(to);
    }
    Err(SecureFileError::TooManyLinks {
        path: path.to_path_buf(),
        limit: MAX_CONSOLE_LINKS,
    })
}

/// What [`create_output_file`] checks of `path` by name, for a caller about to hand
/// the path to a process that will see it otherwise (a jailed VMM: its directories
/// above are out of sight, and other uids may look like its own): the directory
/// chain passes [`check_dir_chain`], and an existing entry is owned by us or root.
pub fn check_output_path(path: &Path) -> Result<(), SecureFileError> {
    check_dir_chain(parent_dir(path))?;
    match std::fs::symlink_metadata(path) {
        Ok(m) => ours_or_roots(&m, path, "output file"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

/// `O_NONBLOCK`, so opening a FIFO does not wait for a writer (the flag only
/// matters for FIFOs and devices, which are refused right after the open).
const fn libc_o_nonblock() -> i32 {
    libc::O_NONBLOCK
}

fn read_limited(f: std::fs::File, path: &Path, limit: u64) -> Result<String, SecureFileError> {
    let meta = f.metadata().map_err(io(path))?;
    if meta.len() > limit {
        return Err(SecureFileError::TooLarge {
            path: path.to_path_buf(),
            size: meta.len(),
            limit,
        });
    }
    let mut buf = Vec::new();
    f.take(limit + 1).read_to_end(&mut buf).map_err(io(path))?;
    if buf.len() as u64 > limit {
        return Err(SecureFileError::TooLarge {
            path: path.to_path_buf(),
            size: buf.len() as u64,
            limit,
        });
    }
    String::from_utf8(buf).map_err(|e| SecureFileError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not UTF-8 text (at byte {})", e.utf8_error().valid_up_to()),
        ),
    })
}

/// Read a regular text file of at most `limit` bytes. FIFOs, devices, sockets and
/// directories are refused (checked on the descriptor, opened non-blocking so a
/// FIFO cannot hang the caller); a file over the limit is refused before parsing,
/// and the read itself is bounded (a file growing after the check cannot exceed it).
pub fn read_bounded(path: &Path, limit: u64) -> Result<String, SecureFileError> {
    let (f, _) = open_regular(path)?;
    read_limited(f, path, limit)
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Check `dir` and every directory above it: each must be owned by the current
/// user or root and not writable by group or others unless sticky (as /tmp), so no
/// other local user can rename, replace or plant entries along the way. A symlink
/// on the path is checked where it leads (the canonical path's chain too). Every
/// error names the directory it is about.
pub fn check_dir_chain(dir: &Path) -> Result<(), SecureFileError> {
    let abs = std::path::absolute(dir).map_err(io(dir))?;
    check_ancestors(&abs)?;
    // The directories a symlink in the path leads through.
    let real = std::fs::canonicalize(&abs).map_err(io(&abs))?;
    if real != abs {
        check_ancestors(&real)?;
    }
    Ok(())
}

fn check_ancestors(first: &Path) -> Result<(), SecureFileError> {
    let me = euid();
    for dir in first.ancestors() {
        let m = std::fs::symlink_metadata(dir).map_err(io(dir))?;
        let refuse = |reason: String| {
            Err(SecureFileError::UnsafeDir {
                path: dir.to_path_buf(),
                reason,
            })
        };
        if m.file_type().is_symlink() {
            // Checked where it leads (the canonical path) by the caller.
            continue;
        }
        if !m.is_dir() {
            return refuse(format!("is {}", kind_of(m.file_type())));
        }
        if m.uid() != me && m.uid() != 0 {
            return refuse(format!(
                "is owned by uid {}, not by uid {me} or root",
                m.uid()
            ));
        }
        if m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0 {
            return refuse(format!(
                "is writable by group or others (mode {:04o}, not sticky)",
                m.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

/// The directory `path` is in (`.` for a bare name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Make sure `dir` is a directory only we can write into: created (with missing
/// parents, each 0700) if it does not exist, once the nearest existing directory
/// above it passes [`check_dir_chain`]; if it exists it must be a real directory (a
/// symlink is refused), owned by the current user and not writable by group or
/// others, and every directory above it must pass [`check_dir_chain`] (whoever
/// owns or can write a parent could swap it for a symlink later).
pub fn ensure_private_dir(dir: &Path) -> Result<(), SecureFileError> {
    let unsafe_dir = |reason: String| SecureFileError::UnsafeDir {
        path: dir.to_path_buf(),
        reason,
    };
    let abs = std::path::absolute(dir).map_err(io(dir))?;
    match std::fs::symlink_metadata(&abs) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // The nearest existing directory above must be safe before we create
            // anything in it.
            let mut existing = None;
            for a in abs.ancestors().skip(1) {
                match std::fs::symlink_metadata(a) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io(a)(e)),
                    Ok(_) => {
                        existing = Some(a);
                        break;
                    }
                }
            }
            check_dir_chain(existing.unwrap_or(Path::new("/")))?;
            match std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&abs)
            {
                Ok(()) => {}
                // Someone made it between our look and our mkdir: check theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(dir)(e)),
            }
        }
        Err(e) => return Err(io(dir)(e)),
        Ok(_) => {}
    }
    let m = std::fs::symlink_metadata(&abs).map_err(io(dir))?;
    if m.file_type().is_symlink() {
        return Err(unsafe_dir(
            "is a symlink; refusing to write through it".into(),
        ));
    }
    if !m.is_dir() {
        return Err(unsafe_dir(format!("is {}", kind_of(m.file_type()))));
    }
    let me = euid();
    if m.uid() != me {
        return Err(unsafe_dir(format!(
            "owned by uid {}, not by the current user (uid {me}); refusing to use a directory someone else made",
            m.uid()
        )));
    }
    let mode = m.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "mode {mode:04o} lets group/other write into it; run `chmod 700 {}`",
            dir.display()
        )));
    }
    check_dir_chain(parent_dir(&abs))
}
