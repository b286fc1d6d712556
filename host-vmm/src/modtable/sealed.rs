//! Native modules loaded from a sealed memfd (issue 16 item 3).
//!
//! The bytes of a patch's native module are copied into an anonymous
//! `memfd_create` file, sealed (`F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW |
//! F_SEAL_SEAL`), read back through the fd and hashed, and only then `dlopen`ed
//! through `/proc/self/fd/N`. No path in any directory is involved, so there is
//! nothing a local user can swap between the hash check and the load: the bytes
//! whose SHA-256 matched the signed manifest are the bytes mapped.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

/// The seals a module's memfd carries.
pub const MODULE_SEALS: libc::c_int =
    libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Why a module could not be sealed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// A system call on the memfd failed.
    #[error("module {name}: {what}: {source}")]
    Io {
        /// The module's name.
        name: String,
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The sealed bytes do not hash to the expected SHA-256.
    #[error("module {name}: the sealed bytes hash to {got}, the signed manifest says {want}")]
    Hash {
        /// The module's name.
        name: String,
        /// SHA-256 of the sealed bytes.
        got: String,
        /// Expected SHA-256.
        want: String,
    },
    /// The memfd does not carry every seal.
    #[error("module {name}: memfd seals {got:#x}, {want:#x} required")]
    Seals {
        /// The module's name.
        name: String,
        /// Seals found.
        got: libc::c_int,
        /// Seals required.
        want: libc::c_int,
    },
}

/// A module's bytes in a sealed memfd. `NativeHandler::load_sealed` keeps it open
/// until the module is retired, and loads it through a name no other load had
/// (`/proc/self/task/TID/fd/N`), so the fd number may be reused afterwards.
#[derive(Debug)]
pub struct SealedModule {
    fd: OwnedFd,
    name: String,
    len: usize,
}

fn memfd(name: &str) -> std::io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(format!(
        "hilrig-module-{}",
        name.replace('\0', "").chars().take(200).collect::<String>()
    ))
    .map_err(std::io::Error::other)?;
    // MFD_EXEC (Linux >= 6.3) keeps `vm.memfd_noexec = 1` from sealing it
    // non-executable; older kernels refuse the flag, so try without.
    const MFD_EXEC: libc::c_uint = 0x10;
    let base = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    for flags in [base | MFD_EXEC, base] {
        // SAFETY: a valid NUL-terminated name; the returned fd is owned below.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
        if fd >= 0 {
            // SAFETY: a fresh fd nobody else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
    }
    Err(std::io::Error::from_raw_os_error(libc::EINVAL))
}

impl SealedModule {
    /// Copy `bytes` into a new memfd, seal it, and check that what the memfd holds
    /// hashes to `sha256_hex` (the signed manifest's SHA-256, lower-case hex).
    pub fn new(name: &str, bytes: &[u8], sha256_hex: &str) -> Result<SealedModule, SealError> {
        let io = |what: &'static str| {
            let name = name.to_string();
            move |source| SealError::Io { name, what, source }
        };
        let fd = memfd(name).map_err(io("memfd_create"))?;
        let mut file = std::fs::File::from(fd);
        std::io::Write::write_all(&mut file, bytes).map_err(io("writing the module"))?;
        let fd = OwnedFd::from(file);
        // SAFETY: fcntl on an fd we own.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, MODULE_SEALS) } != 0 {
            return Err(io("sealing")(std::io::Error::last_os_error()));
        }
        let m = SealedModule {
            fd,
            name: name.to_string(),
            len: bytes.len(),
        };
        let got = m.seals().map_err(io("reading the seals"))?;
        if got & MODULE_SEALS != MODULE_SEALS {
            return Err(SealError::Seals {
                name: name.to_string(),
                got,
                want: MODULE_SEALS,
            });
        }
        // Hash what the memfd holds now (sealed: it can no longer change), not the
        // buffer it was copied from.
        let got = hex::encode(m.sha256().map_err(io("reading the module back"))?);
        if !got.eq_ignore_ascii_case(sha256_hex) {
            return Err(SealError::Hash {
                name: name.to_string(),
                got,
                want: sha256_hex.to_string(),
            });
        }
        Ok(m)
    }

    /// The seals on the memfd (`F_GET_SEALS`).
    pub fn seals(&self) -> std::io::Result<libc::c_int> {
        // SAFETY: fcntl on an fd we own.
        let s = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_GET_SEALS) };
        if s < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(s)
    }

    /// SHA-256 of the memfd's contents, read through the fd.
    pub fn sha256(&self) -> std::io::Result<[u8; 32]> {
        let dup = self.fd.try_clone()?;
        let mut f = std::fs::File::from(dup);
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0))?;
        let mut h = Sha256::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(h.finalize().into())
    }

    /// The path `dlopen` is given: `/proc/self/fd/N`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// The raw fd (for tests that try to write through it).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }

    /// The module's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_bytes_cannot_change_and_are_hashed() {
        let bytes = b"not a library, just bytes".to_vec();
        let want = hex::encode(Sha256::digest(&bytes));
        let m = SealedModule::new("t", &bytes, &want).unwrap();
        assert_eq!(m.seals().unwrap() & MODULE_SEALS, MODULE_SEALS);
        // An attacker with the fd (e.g. through /proc/PID/fd/N) cannot change it.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.path())
            .unwrap();
        let e = std::io::Write::write_all(&mut f, b"evil").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        // SAFETY: ftruncate on a valid fd.
        assert_ne!(unsafe { libc::ftruncate(f.as_raw_fd(), 1) }, 0);
        assert_eq!(hex::encode(m.sha256().unwrap()), want);
        assert_eq!(m.len(), bytes.len());
    }

    #[test]
    fn wrong_hash_is_refused() {
        let e = SealedModule::new("t", b"abc", &"00".repeat(32)).unwrap_err();
        assert!(matches!(e, SealError::Hash { .. }), "{e}");
    }
}
