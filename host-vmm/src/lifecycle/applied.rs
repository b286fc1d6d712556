//! Applied patch versions, recorded per host and MACed (issue 16.6, downgrades).
//!
//! `--patch-record FILE --patch-record-key KEY`: before a patch is applied its
//! component and version are written to FILE (atomically, mode 0600) with an
//! HMAC-SHA256 under KEY (a 0600 key file, `hilrig counters init --key`'s format, read
//! through `hilrig_device::secure`). A restarted VMM reads the record first and refuses
//! any bundle not newer than what was applied on this host before. A record that does
//! not verify (edited, truncated, another host's, another key's) is refused — the VMM
//! does not start — and left exactly as found: never reset by the VMM. A patchable VMM
//! must have a record (`hilrig_vmm::cli::lifecycle_config` refuses `--patch-pubkey`
//! without one).
//!
//! What it does not protect against: the MAC binds the record to a host and key, not to
//! a moment. An older copy of the record, put back, verifies, and a missing record
//! starts empty, so whoever can write the record's directory can lower the floor again
//! (roll back, or delete) and re-open a downgrade. Anchoring the floor outside the file
//! (e.g. in the counters service) is not done (ignored test
//! `a_rolled_back_patch_record_is_refused`).

use hilrig_counters::mac::Key;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Largest record file read.
pub const MAX_RECORD: u64 = 64 << 10;
const TABLE: &str = "hilrig-vmm applied patches v1";

/// Why the record was refused or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AppliedError {
    /// The key file.
    #[error("patch record key: {0}")]
    Key(#[from] hilrig_counters::Error),
    /// The record could not be read.
    #[error("patch record: {0}")]
    Read(#[from] hilrig_device::secure::SecureFileError),
    /// The record does not parse.
    #[error("patch record {path}: {detail}; refused (left as found)")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The record's MAC does not verify.
    #[error("patch record {path}: its MAC does not verify (edited, or made with another key); refused (left as found, not reset)")]
    Mac {
        /// The file.
        path: PathBuf,
    },
    /// The record is another host's.
    #[error("patch record {path} belongs to host {found:?}, this is {host:?}; refused")]
    OtherHost {
        /// The file.
        path: PathBuf,
        /// The host in the record.
        found: String,
        /// This host.
        host: String,
    },
    /// Another live VMM holds this record (its lock file is locked): two VMMs
    /// writing one record each from its own copy could lower each other's floor.
    #[error("the patch record {path} is in use by another VMM (its lock {lock} is held): give each VMM its own --patch-record")]
    InUse {
        /// The record.
        path: PathBuf,
        /// Its lock file.
        lock: PathBuf,
    },
    /// The record's lock file could not be made or locked.
    #[error("locking the patch record {path}: {detail}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// Writing the record failed (the patch is then not applied).
    #[error("writing the patch record {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    host: String,
    versions: BTreeMap<String, u64>,
    mac: String,
}

/// The applied-versions record of this host.
pub struct AppliedVersions {
    path: PathBuf,
    key: Key,
    host: String,
    versions: Mutex<BTreeMap<String, u64>>,
    /// `<record>.lock`, locked (flock, exclusive) for as long as this VMM lives.
    _lock: std::fs::File,
}

impl std::fmt::Debug for AppliedVersions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppliedVersions")
            .field("path", &self.path)
            .field("host", &self.host)
            .finish()
    }
}

/// This host's name (the record is bound to it).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Lock `<record>.lock` (made 0600 if missing, never through a link) for this
/// VMM's lifetime: the record itself is replaced on every write, so it cannot carry
/// the lock. Held by another VMM: [`AppliedError::InUse`].
fn lock_record(path: &Path) -> Result<std::fs::File, AppliedError> {
    use std::os::fd::AsRawFd;
    let mut name = path.as_os_str().to_os_string();
    name.push(".lock");
    let lock = PathBuf::from(name);
    let f = hilrig_device::secure::create_output_file(&lock).map_err(|e| AppliedError::Lock {
        path: lock.clone(),
        detail: e.to_string(),
    })?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            AppliedError::InUse {
                path: path.to_path_buf(),
                lock,
            }
        } else {
            AppliedError::Lock {
                path: lock,
                detail: e.to_string(),
            }
        });
    }
    Ok(f)
}

fn mac(key: &Key, host: &str, versions: &BTreeMap<String, u64>) -> String {
    let mut i = hilrig_counters::mac::MacInput::new(TABLE);
    i.s(host);
    for (c, v) in versions {
        i.s(c).b(&v.to_le_bytes());
    }
    key.mac_input(&i)
}

impl AppliedVersions {
    /// Open the record at `path` (none yet: nothing applied) with the MAC key file
    /// `key`, for host `host`. A record that does not verify is an error.
    pub fn open(path: &Path, key: &Path, host: &str) -> Result<AppliedVersions, AppliedError> {
        let key = Key::load(key)?;
        let lock = lock_record(path)?;
        let versions = match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            _ => {
                let text = hilrig_device::secure::read_bounded(path, MAX_RECORD)?;
                let r: Record = serde_json::from_str(&text).map_err(|e| AppliedError::Parse {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                })?;
                let mut i = hilrig_counters::mac::MacInput::new(TABLE);
                i.s(&r.host);
                for (c, v) in &r.versions {
                    i.s(c).b(&v.to_le_bytes());
                }
                if !key.check_input(&i, &r.mac) {
                    return Err(AppliedError::Mac {
                        path: path.to_path_buf(),
                    });
                }
                if r.host != host {
                    return Err(AppliedError::OtherHost {
                        path: path.to_path_buf(),
                        found: r.host,
                        host: host.to_string(),
                    });
                }
                r.versions
            }
        };
        Ok(AppliedVersions {
            path: path.to_path_buf(),
            key,
            host: host.to_string(),
            versions: Mutex::new(versions),
            _lock: lock,
        })
    }

    /// The newest version of `component` applied on this host (0: none).
    pub fn applied(&self, component: &str) -> u64 {
        let v = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        v.get(component).copied().unwrap_or(0)
    }

    /// Record `component` at `version` (before it is applied). Never lowers a version.
    pub fn record(&self, component: &str, version: u64) -> Result<(), AppliedError> {
        let mut v = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = v.clone();
        let e = next.entry(component.to_string()).or_insert(0);
        *e = (*e).max(version);
        let r = Record {
            host: self.host.clone(),
            mac: mac(&self.key, &self.host, &next),
            versions: next.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&r).map_err(|e| AppliedError::Write {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        hilrig_device::secure::write_atomic_mode(&self.path, &bytes, 0o600).map_err(|source| {
            AppliedError::Write {
                path: self.path.clone(),
                source,
            }
        })?;
        *v = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key(dir: &Path) -> PathBuf {
        let k = dir.join("record.key");
        Key::init(&k).unwrap();
        k
    }

    #[test]
    fn a_record_another_live_vmm_holds_is_refused() {
        // Two VMMs on one record each wrote their own copy back: B (floor 0)
        // recording policy 2 after A recorded 3 left {policy: 2}, and a restart
        // took the downgrade. Now the second VMM is refused while the first lives.
        let d = tempfile::tempdir().unwrap();
        let (k, rec) = (key(d.path()), d.path().join("applied.json"));
        let a = AppliedVersions::open(&rec, &k, "h1").unwrap();
        a.record("policy", 3).unwrap();
        let e = AppliedVersions::open(&rec, &k, "h1").unwrap_err();
        assert!(matches!(e, AppliedError::InUse { .. }), "{e}");
        assert!(e.to_string().contains("its own --patch-record"), "{e}");
        // Negative control: once A is gone, the next VMM opens it, floor kept.
        drop(a);
        let b = AppliedVersions::open(&rec, &k, "h1").unwrap();
        assert_eq!(b.applied("policy"), 3);
    }

    #[test]
    fn a_restarted_vmm_keeps_the_versions_and_a_tampered_record_is_refused_not_reset() {
        let d = tempfile::tempdir().unwrap();
        let (k, rec) = (key(d.path()), d.path().join("applied.json"));
        let a = AppliedVersions::open(&rec, &k, "h1").unwrap();
        assert_eq!(a.applied("policy"), 0);
        a.record("policy", 3).unwrap();
        a.record("policy", 2).unwrap();
        assert_eq!(a.applied("policy"), 3, "never lowered");
        let mode = std::fs::metadata(&rec).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(a);
        // "Restart".
        let a = AppliedVersions::open(&rec, &k, "h1").unwrap();
        assert_eq!(a.applied("policy"), 3);
        drop(a);
        // Another host's record, or another key's: refused.
        let e = AppliedVersions::open(&rec, &k, "h2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("belongs to host \"h1\""), "{e}");
        let e = AppliedVersions::open(&rec, &key(&d.path().join("o")), "h1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("MAC does not verify"), "{e}");
        // Rolled back by hand: refused, and the file is left as found.
        let text = std::fs::read_to_string(&rec).unwrap();
        let edited = text.replace("\"policy\": 3", "\"policy\": 1");
        assert_ne!(text, edited);
        std::fs::write(&rec, &edited).unwrap();
        let e = AppliedVersions::open(&rec, &k, "h1")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("MAC does not verify") && e.contains("not reset"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&rec).unwrap(), edited);
        std::fs::write(&rec, b"{not json").unwrap();
        let e = AppliedVersions::open(&rec, &k, "h1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("refused"), "{e}");
        // A key file others can read is refused.
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(AppliedVersions::open(&d.path().join("new.json"), &k, "h1").is_err());
    }
}
