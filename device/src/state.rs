//! Nonvolatile device state and its state file.
//!
//! The state file is what survives a power cycle: flash contents, counters, fuse,
//! epoch, keys, serial and geometry. Every backend (model, rtl) reads and writes the
//! same format, so a file written by one opens in the other.
//!
//! Format (all integers little-endian), version 1:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `HILRIGNV` |
//! | 2 | format version (1) |
//! | 1 | counter width W (1..=64) |
//! | 12 | region sizes VBIOS, FIRMWARE, CONFIG (u32 each) |
//! | 8 | serial |
//! | 24 | region counters as thermometer bits (u64 each; the lowest N bits set) |
//! | 4 | MASTER |
//! | 1 | fuse (0 or 1) |
//! | 4 | EPOCH |
//! | 32 | device key |
//! | 32 | OOB reset key |
//! | sum of region sizes | flash contents, VBIOS then FIRMWARE then CONFIG |
//! | 32 | SHA-256 of everything above |
//!
//! Saving writes a new file (mode 0600, random name, `O_EXCL`) beside the old one,
//! syncs it, renames it over the old one and syncs the directory: a crash leaves
//! either the old or the new file, never half; a planted symlink is never followed.

use crate::regmap::Region;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"HILRIGNV";
const FORMAT_VERSION: u16 = 1;
const HEADER_LEN: usize = 8 + 2 + 1 + 12 + 8 + 24 + 4 + 1 + 4 + 32 + 32;

/// The largest state file any valid configuration produces (every region at
/// [`MAX_REGION_SIZE`]); a larger file is refused unread.
pub const MAX_STATE_FILE: u64 = (HEADER_LEN + 3 * MAX_REGION_SIZE as usize + 32) as u64;
/// Largest region a state file may describe.
pub const MAX_REGION_SIZE: u32 = 1 << 20;

/// Why a state file could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file could not be read.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid state file.
    #[error("state file {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the byte offset where it applies.
        reason: String,
    },
    /// A configuration is not valid (a reason from outside this crate).
    #[error("device configuration: {0}")]
    Config(String),
    /// A configuration breaks one of [`DeviceConfig::validate`]'s rules.
    #[error("device configuration: {0}")]
    InvalidConfig(#[from] ConfigError),
    /// Another process holds the state file (a running VMM, an OOB server, a rig
    /// action): see [`StateLock`].
    #[error("state file {path} is in use by {} (lock file {lock}); stop that process first", match .holder { Some(pid) => format!("pid {pid}"), None => "another process".to_string() })]
    Locked {
        /// The state file.
        path: PathBuf,
        /// Its lock file.
        lock: PathBuf,
        /// The holder's pid, as it recorded it in the lock file (if readable).
        holder: Option<u32>,
    },
}

/// Which rule of [`DeviceConfig::validate`] a configuration breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The counter width is outside 1..=64.
    #[error("counter width {0} is not in 1..=64")]
    Width(u8),
    /// A region size is zero, not a multiple of 4, or too large.
    #[error("{region} region size {size} must be a multiple of 4 from 4 to {MAX_REGION_SIZE}")]
    RegionSize {
        /// The region.
        region: Region,
        /// Its size in bytes.
        size: u32,
    },
    /// The VBIOS size is not a power of two of at least 2 KiB.
    #[error("vbios region size {0} must be a power of two of at least 2048")]
    VbiosSize(u32),
}

/// Device geometry and budget, fixed when a device is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceConfig {
    /// Thermometer counter width: attempts per region before the fuse blows (1..=64).
    pub counter_width: u8,
    /// Region sizes in bytes (VBIOS, FIRMWARE, CONFIG).
    pub region_sizes: [u32; 3],
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            counter_width: 64,
            region_sizes: [16 * 1024, 32 * 1024, 4 * 1024],
        }
    }
}

impl DeviceConfig {
    /// A configuration with a small counter budget, for tests that reach the fuse.
    pub fn with_width(counter_width: u8) -> Self {
        DeviceConfig {
            counter_width,
            ..Default::default()
        }
    }

    /// Check the configuration's rules: width 1..=64; region sizes multiples of 4,
    /// 4 bytes to 1 MiB; the VBIOS size a power of two of at least 2 KiB (it is the
    /// expansion ROM, whose BAR is sized in powers of two).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=64).contains(&self.counter_width) {
            return Err(ConfigError::Width(self.counter_width));
        }
        for (&region, &size) in Region::ALL.iter().zip(&self.region_sizes) {
            if size == 0 || size % 4 != 0 || size > MAX_REGION_SIZE {
                return Err(ConfigError::RegionSize { region, size });
            }
        }
        let v = self.region_sizes[0];
        if !v.is_power_of_two() || v < 2048 {
            return Err(ConfigError::VbiosSize(v));
        }
        Ok(())
    }

    /// Size of `region` in bytes.
    pub fn region_size(&self, region: Region) -> u32 {
        self.region_sizes[region as usize]
    }

    fn file_len(&self) -> usize {
        HEADER_LEN + self.region_sizes.iter().map(|&s| s as usize).sum::<usize>() + 32
    }
}

/// The outcome of counting one program/erase attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// The region counter (and MASTER) incremented.
    pub counted: bool,
    /// The fuse was already blown before this attempt: it must be refused.
    pub fuse_was_blown: bool,
}

/// Everything the device keeps across reset, FLR and power cycle.
#[derive(Clone, PartialEq, Eq)]
pub struct NvState {
    /// Geometry and budget.
    pub config: DeviceConfig,
    /// Serial number.
    pub serial: u64,
    /// Region counters as thermometer bits.
    pub counters: [u64; 3],
    /// MASTER: total counted attempts; never cleared.
    pub master: u32,
    /// Fuse blown.
    pub fuse: bool,
    /// Number of authorised physical resets.
    pub epoch: u32,
    /// The provisioned device key (DEVICE_KEY registers).
    pub device_key: [u8; 32],
    /// The key the OOB physical-reset request must carry.
    pub reset_key: [u8; 32],
    /// Flash contents, one vector per region.
    pub flash: [Vec<u8>; 3],
}

impl std::fmt::Debug for NvState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvState")
            .field("config", &self.config)
            .field("serial", &self.serial)
            .field("counters", &self.counter_values())
            .field("master", &self.master)
            .field("fuse", &self.fuse)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// The development keys of a factory-fresh device with serial `serial`:
/// (device key, OOB reset key). Documented, not secret: real devices are provisioned.
pub fn dev_keys(serial: u64) -> ([u8; 32], [u8; 32]) {
    let dk = Sha256::new()
        .chain_update(b"hilrig device key")
        .chain_update(serial.to_le_bytes())
        .finalize();
    let rk = Sha256::new()
        .chain_update(b"hilrig oob reset key")
        .chain_update(serial.to_le_bytes())
        .finalize();
    (dk.into(), rk.into())
}

impl NvState {
    /// A factory-fresh device: erased flash (all 0xFF), zero counters, development keys.
    pub fn factory(config: DeviceConfig, serial: u64) -> Result<NvState, StateError> {
        config.validate()?;
        let (device_key, reset_key) = dev_keys(serial);
        Ok(NvState {
            config,
            serial,
            counters: [0; 3],
            master: 0,
            fuse: false,
            epoch: 0,
            device_key,
            reset_key,
            flash: config.region_sizes.map(|s| vec![0xff; s as usize]),
        })
    }

    /// Counter values (thermometer bits set) per region.
    pub fn counter_values(&self) -> [u32; 3] {
        self.counters.map(|c| c.count_ones())
    }

    /// Counter value of `region`.
    pub fn counter(&self, region: Region) -> u32 {
        self.counters[region as usize].count_ones()
    }

    /// Attempts left before the fuse blows: WIDTH minus the largest region counter.
    pub fn slots_left(&self) -> u32 {
        let max = self.counter_values().into_iter().max().unwrap_or(0);
        (self.config.counter_width as u32).saturating_sub(max)
    }

    /// Count one program/erase attempt on `region`, BEFORE it is acted on: the region's
    /// thermometer gains a bit and MASTER increments, unless the region counter is
    /// already at WIDTH (then it stays at its maximum). The attempt that fills the last
    /// slot blows the fuse; it is itself still acted on. An attempt made while the fuse
    /// was already blown must be refused.
    pub fn count_attempt(&mut self, region: Region) -> Attempt {
        let fuse_was_blown = self.fuse;
        let w = self.config.counter_width as u32;
        let c = &mut self.counters[region as usize];
        let counted = c.count_ones() < w;
        if counted {
            *c = (*c << 1) | 1;
            self.master = self.master.wrapping_add(1);
            if c.count_ones() >= w {
                self.fuse = true;
            }
        }
        Attempt {
            counted,
            fuse_was_blown,
        }
    }

    /// The authorised physical reset: clears region counters and the fuse, and
    /// increments EPOCH so the reset is told apart from a rollback. MASTER is kept.
    pub fn physical_reset(&mut self) {
        self.counters = [0; 3];
        self.fuse = false;
        self.epoch = self.epoch.wrapping_add(1);
    }

    /// SHA-256 of a region's contents.
    pub fn region_hash(&self, region: Region) -> [u8; 32] {
        Sha256::digest(&self.flash[region as usize]).into()
    }

    /// Serialize to the state-file format.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.config.file_len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.push(self.config.counter_width);
        for s in self.config.region_sizes {
            b.extend_from_slice(&s.to_le_bytes());
        }
        b.extend_from_slice(&self.serial.to_le_bytes());
        for c in self.counters {
            b.extend_from_slice(&c.to_le_bytes());
        }
        b.extend_from_slice(&self.master.to_le_bytes());
        b.push(self.fuse as u8);
        b.extend_from_slice(&self.epoch.to_le_bytes());
        b.extend_from_slice(&self.device_key);
        b.extend_from_slice(&self.reset_key);
        for f in &self.flash {
            b.extend_from_slice(f);
        }
        let sum = Sha256::digest(&b);
        b.extend_from_slice(&sum);
        b
    }

    /// Parse the state-file format; `path` names the file in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<NvState, StateError> {
        let bad = |reason: String| StateError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() < HEADER_LEN + 32 {
            return Err(bad(format!(
                "truncated: {} bytes, a state file has at least {}",
                bytes.len(),
                HEADER_LEN + 32
            )));
        }
        if &bytes[0..8] != MAGIC {
            return Err(bad("bad magic at offset 0: not a hilrig state file".into()));
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version} at offset 8 is not supported (this build reads {FORMAT_VERSION})"
            )));
        }
        let mut r = Reader { b: bytes, pos: 10 };
        let counter_width = r.u8();
        let region_sizes = [r.u32(), r.u32(), r.u32()];
        let config = DeviceConfig {
            counter_width,
            region_sizes,
        };
        config
            .validate()
            .map_err(|e| bad(format!("header at offset 10: {e}")))?;
        if bytes.len() != config.file_len() {
            return Err(bad(format!(
                "length {} does not match its header ({} expected){}",
                bytes.len(),
                config.file_len(),
                if bytes.len() < config.file_len() {
                    ": truncated"
                } else {
                    ""
                }
            )));
        }
        let body = &bytes[..bytes.len() - 32];
        let sum: [u8; 32] = Sha256::digest(body).into();
        if sum[..] != bytes[bytes.len() - 32..] {
            return Err(bad(format!(
                "checksum mismatch (SHA-256 at offset {})",
                bytes.len() - 32
            )));
        }
        let serial = r.u64();
        let counters_at = r.pos;
        let counters = [r.u64(), r.u64(), r.u64()];
        for (i, c) in counters.iter().enumerate() {
            let n = c.count_ones();
            let thermometer = if n == 64 {
                *c == u64::MAX
            } else {
                *c == (1u64 << n) - 1
            };
            if !thermometer || n > counter_width as u32 {
                return Err(bad(format!(
                    "counter {} at offset {} is {:#x}: not a thermometer of at most {} bits",
                    Region::ALL[i],
                    counters_at + 8 * i,
                    c,
                    counter_width
                )));
            }
        }
        let master = r.u32();
        let fuse_at = r.pos;
        let fuse = match r.u8() {
            0 => false,
            1 => true,
            v => {
                return Err(bad(format!(
                    "fuse byte at offset {fuse_at} is {v}, not 0 or 1"
                )))
            }
        };
        let epoch = r.u32();
        let device_key = r.array32();
        let reset_key = r.array32();
        let flash = region_sizes.map(|s| r.take(s as usize).to_vec());
        Ok(NvState {
            config,
            serial,
            counters,
            master,
            fuse,
            epoch,
            device_key,
            reset_key,
            flash,
        })
    }

    /// Load a state file. A bad file is reported and left untouched. Only a regular
    /// file is read (opened without blocking, so a FIFO is refused, never waited on),
    /// and at most [`MAX_STATE_FILE`] bytes of it.
    pub fn load(path: &Path) -> Result<NvState, StateError> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| StateError::Io {
            path: path.to_path_buf(),
            source,
        };
        let corrupt = |reason: String| StateError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(io)?;
        let meta = f.metadata().map_err(io)?;
        if !meta.file_type().is_file() {
            return Err(corrupt("not a regular file".into()));
        }
        let mut bytes = Vec::new();
        f.take(MAX_STATE_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > MAX_STATE_FILE {
            return Err(corrupt(format!(
                "larger than any state file can be ({MAX_STATE_FILE} bytes)"
            )));
        }
        Self::from_bytes(&bytes, path)
    }

    /// Save atomically: write a temporary file beside `path`, sync, rename, sync dir.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        write_atomic(path, &self.to_bytes())
    }
}

/// Refuse to create a device's state file where one already exists (a device's
/// nonvolatile state is never replaced by accident).
pub fn refuse_existing(path: &Path) -> Result<(), StateError> {
    if path.exists() {
        return Err(StateError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "already exists; refusing to replace a device's state",
            ),
        });
    }
    Ok(())
}

/// Save `nv` to the state file `store`, if the device has one (every backend's
/// persist step); the error names the file.
pub fn persist(nv: &NvState, store: Option<&Path>) -> Result<bool, crate::device::DeviceError> {
    let Some(p) = store else { return Ok(false) };
    nv.save(p)
        .map_err(|source| crate::device::DeviceError::Persist {
            path: p.to_path_buf(),
            source,
        })?;
    Ok(true)
}

/// Write `bytes` to `path` atomically, mode 0600 (state files hold the device key
/// and the OOB reset key): a temporary file with a random name created
/// `O_CREAT|O_EXCL|O_NOFOLLOW` beside `path`, fsync, rename, fsync of the directory.
/// A symlink planted at any name is never followed (see [`crate::secure`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::secure::write_atomic(path, bytes)
}

/// The lock file of state file `state`: `.NAME.lock` in the same directory.
pub fn lock_path(state: &Path) -> PathBuf {
    let name = state
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let dir = match state.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    dir.join(format!(".{name}.lock"))
}

/// An exclusive hold on a state file: whoever writes a device's state holds one
/// for as long as it may write (a VMM with a model/rtl device for its whole life; a
/// rig action or an OOB physical reset around its read-modify-write). A second
/// holder is refused with [`StateError::Locked`], naming the file and the holder's
/// pid, before it reads or writes anything.
///
/// The lock is `flock(LOCK_EX)` on the lock file ([`lock_path`]; created
/// `O_NOFOLLOW`, mode 0600), which records the holder's pid. It is released when the
/// `StateLock` is dropped or the holder dies (the kernel drops it with the last
/// descriptor: a killed VMM never leaves a stale lock behind).
///
/// Readers do not lock: the state file is only ever replaced whole (rename), so a
/// reader sees either the old or the new file, never half of one. This is how the
/// rig's simulated OOB port answers IDENTIFY / READ_COUNTERS / READ_HASH while the
/// host's VMM runs; only PHYSICAL_RESET (a write) needs the lock, and is refused
/// while the VMM holds it.
#[derive(Debug)]
pub struct StateLock {
    file: std::fs::File,
    lock: PathBuf,
}

impl StateLock {
    /// Take the lock of `state` now, or fail with [`StateError::Locked`].
    pub fn acquire(state: &Path) -> Result<StateLock, StateError> {
        Self::acquire_within(state, std::time::Duration::ZERO)
    }

    /// Take the lock of `state`, waiting up to `wait` for a short-lived holder (a
    /// concurrent rig action) to finish; then fail with [`StateError::Locked`].
    pub fn acquire_within(
        state: &Path,
        wait: std::time::Duration,
    ) -> Result<StateLock, StateError> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let lock = lock_path(state);
        let io = |source| StateError::Io {
            path: lock.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&lock)
            .map_err(io)?;
        if !file.metadata().map_err(io)?.file_type().is_file() {
            return Err(io(std::io::Error::other("not a regular file")));
        }
        let deadline = std::time::Instant::now() + wait;
        loop {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => {
                    if std::time::Instant::now() < deadline {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        continue;
                    }
                    let mut text = String::new();
                    let _ = (&file).take(32).read_to_string(&mut text);
                    return Err(StateError::Locked {
                        path: state.to_path_buf(),
                        lock,
                        holder: text.trim().parse().ok(),
                    });
                }
                _ => return Err(io(e)),
            }
        }
        // Ours: record who holds it.
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(StateLock { file, lock })
    }

    /// The lock file.
    pub fn lock_file(&self) -> &Path {
        &self.lock
    }
}

impl Drop for StateLock {
    fn drop(&mut self) {
        // The pid is no longer the holder's; closing the descriptor releases the lock.
        let _ = self.file.set_len(0);
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    // Callers check the total length first, so every take stays in bounds.
    fn take(&mut self, n: usize) -> &'a [u8] {
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        s
    }
    fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }
    fn u32(&mut self) -> u32 {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4));
        u32::from_le_bytes(a)
    }
    fn u64(&mut self) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8));
        u64::from_le_bytes(a)
    }
    fn array32(&mut self) -> [u8; 32] {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32));
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_atomic_save() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev.state");
        let mut s = NvState::factory(DeviceConfig::with_width(4), 7).unwrap();
        s.count_attempt(Region::Firmware);
        s.flash[1][5] = 0x12;
        s.save(&p).unwrap();
        let l = NvState::load(&p).unwrap();
        assert_eq!(l, s);
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn corrupt_files_are_refused_with_the_path() {
        let p = Path::new("/x/dev.state");
        let good = NvState::factory(DeviceConfig::default(), 1)
            .unwrap()
            .to_bytes();
        let mut flipped = good.clone();
        flipped[100] ^= 1;
        let mut badmagic = good.clone();
        badmagic[0] = b'X';
        for (bytes, want) in [
            (&good[..10], "truncated"),
            (&good[..good.len() - 1], "truncated"),
            (&flipped[..], "checksum"),
            (&badmagic[..], "magic"),
        ] {
            let e = NvState::from_bytes(bytes, p).unwrap_err().to_string();
            assert!(e.contains("/x/dev.state") && e.contains(want), "{e}");
        }
    }

    #[test]
    fn non_thermometer_counter_is_refused_even_with_good_checksum() {
        let mut s = NvState::factory(DeviceConfig::with_width(8), 1).unwrap();
        s.counters[0] = 0b101;
        let e = NvState::from_bytes(&s.to_bytes(), Path::new("f")).unwrap_err();
        assert!(e.to_string().contains("thermometer"), "{e}");
    }

    #[test]
    fn budget_blows_fuse_and_saturates() {
        let mut s = NvState::factory(DeviceConfig::with_width(3), 1).unwrap();
        let a: Vec<_> = (0..5).map(|_| s.count_attempt(Region::Config)).collect();
        assert!(a[..3].iter().all(|x| x.counted && !x.fuse_was_blown));
        assert!(a[3..].iter().all(|x| !x.counted && x.fuse_was_blown));
        assert!(s.fuse);
        assert_eq!(s.counter(Region::Config), 3);
        assert_eq!(s.master, 3);
        assert_eq!(s.slots_left(), 0);
        s.physical_reset();
        assert_eq!(
            (s.fuse, s.epoch, s.master, s.slots_left()),
            (false, 1, 3, 3)
        );
    }

    #[test]
    fn a_second_holder_is_refused_naming_the_file_and_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev.state");
        NvState::factory(DeviceConfig::default(), 3)
            .unwrap()
            .save(&p)
            .unwrap();
        let first = StateLock::acquire(&p).unwrap();
        let e = StateLock::acquire(&p).unwrap_err();
        match &e {
            StateError::Locked { path, holder, .. } => {
                assert_eq!(path, &p);
                assert_eq!(*holder, Some(std::process::id()));
            }
            other => panic!("{other:?}"),
        }
        let text = e.to_string();
        assert!(
            text.contains("dev.state") && text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        let again = StateLock::acquire(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(again.lock_file())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn state_files_are_created_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev.state");
        NvState::factory(DeviceConfig::default(), 3)
            .unwrap()
            .save(&p)
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = NvState::from_bytes(&bytes, Path::new("fuzz"));
        }
    }
}
