//! The MMIO policy engine at run time: every trapped BAR0 access is split into
//! register-sized parts, each part decided by the active [`Profile`], and the
//! decision carried out (allow, drop, shadow, fault), with alarms counted per
//! register and written, rate-limited, to a JSON-lines sink.
//!
//! - The policy is a module in the module table (issue 21.1): a [`PolicyModule`]
//!   (compiled profile + its shadow store) in a [`PolicySlot`]. Every access is
//!   decided through the slot ([`Slot::decide`]: one atomic load and the version's
//!   in-flight count, no lock): all its parts by one version; a decision that a
//!   swap overtook is discarded and made again by the new version, then carried
//!   out once. [`PolicyEngine::swap`] replaces the module without a quiesce
//!   (publish, cancel, drain the old version's in-flight count);
//!   `vm::PolicyHandle::replace` also re-plans the BAR0 mappings around it.
//! - [`PolicyEngine::access`] is the per-access path: it allocates nothing. A
//!   fault anywhere in an access means no part of it reaches the device.
//! - [`AlarmSink`]: a token bucket (`rate` per second, `burst`) in front of the
//!   file; alarms past it are counted as suppressed, the per-register counters
//!   count every alarm.

use crate::modtable::modules::Slot;
use crate::policy::{merges_writes, Action, Profile};
use hilrig_device::device::{byte_mask_bits, check_access, split_access};
use hilrig_device::regmap::{self, BAR0_SIZE, PAGE_SIZE};
use hilrig_device::{Device, DeviceError};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Where alarms go and how fast.
#[derive(Debug, Clone)]
pub struct AlarmConfig {
    /// JSON-lines file (created or truncated), if any.
    pub file: Option<PathBuf>,
    /// Keep the recorded alarms in memory for the [`PolicyReport`].
    pub capture: bool,
    /// Alarms written per second, sustained.
    pub rate: u32,
    /// Alarms written in a burst.
    pub burst: u32,
}

impl Default for AlarmConfig {
    fn default() -> Self {
        AlarmConfig {
            file: None,
            capture: false,
            rate: 1000,
            burst: 100,
        }
    }
}

/// One alarm as written to the sink (one JSON object per line).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Alarm {
    /// Microseconds since the VM started.
    pub t_us: u64,
    /// The vCPU.
    pub vcpu: u8,
    /// Guest RIP: of the instruction for reads; for writes KVM has already retired
    /// the instruction, so this is where the guest resumes (see `insn_rip`).
    pub rip: u64,
    /// Address of the instruction that made the access (equal to `rip` for reads;
    /// for writes found by decoding backwards from `rip` and checking the operand's
    /// address against the access), if known.
    pub insn_rip: Option<u64>,
    /// The instruction, decoded (Intel syntax), fetched through the guest's page
    /// tables, or why it could not be.
    pub insn: String,
    /// Register name, e.g. `HANG_TRIGGER` or `DEVICE_KEY[3]`.
    pub register: String,
    /// BAR0 offset of the first byte of this part.
    pub offset: u32,
    /// Bytes of this register the access touched.
    pub width: u8,
    /// Length of the whole (KVM) access.
    pub access_len: u8,
    /// `read` or `write`.
    pub access: String,
    /// The bytes of this part: written (writes) or returned to the guest (reads).
    pub value: u32,
    /// What was done (`allow` when enforcement is off).
    pub action: Action,
    /// The profile.
    pub profile: String,
    /// The rule (1-based, as written in the file; 0: no rule covers the access and
    /// the profile's default deny decided).
    pub rule: usize,
    /// Whether enforcement was on.
    pub enforce: bool,
    /// Alarms of this key — (register word, access, action) — so far, this one
    /// included (suppressed ones too: the rate limit is per key).
    #[serde(default)]
    pub count: u64,
    /// When this key's first alarm was raised (µs since the VM started).
    #[serde(default)]
    pub first_us: u64,
}

/// An alarm the engine raised, before the vCPU adds RIP and instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlarmHit {
    /// BAR0 offset of the first byte of the part.
    pub offset: u32,
    /// Bytes in the part.
    pub width: u8,
    /// Write or read.
    pub write: bool,
    /// Part value (see [`Alarm::value`]).
    pub value: u32,
    /// Action taken.
    pub action: Action,
    /// Rule index (0-based).
    pub rule: u16,
}

/// What an access came to.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    /// The access faults: the guest gets an exception, nothing reached the device.
    pub fault: bool,
    /// Alarms raised (at most 3 parts per access).
    pub hits: [Option<AlarmHit>; 3],
    /// With hits: the policy version that decided them, so their alarms name its
    /// rules even if a patch replaced it before they are raised
    /// ([`PolicyEngine::alarm`]).
    pub decided_by: Option<u64>,
}

/// One decided part, for an oracle (recorded only with [`PolicyEngine::record_decisions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decided {
    /// Register word.
    pub word: u32,
    /// Byte mask within the word.
    pub mask: u8,
    /// Write or read.
    pub write: bool,
    /// The value the filter saw.
    pub filter_value: u32,
    /// Bytes written (in place in the word) or returned (in place).
    pub bits: u32,
    /// The action the profile decided for this part.
    pub action: Action,
    /// The rule.
    pub rule: Option<u16>,
    /// Another part of the same access (or this one) faulted: nothing happened.
    pub faulted: bool,
}

/// Rate-limited alarm sink. The rate limit is per key — (register word, access,
/// action) — not global: a flood of one key uses up only its own tokens, so it never
/// hides the first alarm of another (the first alarm of every key is always
/// written). Every key is aggregated (first/last time, count, written) for the
/// [`PolicySummary`]'s `alarm_groups`. Keys are bounded (BAR0 words x 2 x 4).
pub struct AlarmSink {
    state: Mutex<SinkState>,
    /// When (µs since the VM started) the key that last raised an alarm has a
    /// token again ([`AlarmSink::token_due`]; `u64::MAX`: never).
    next_token_us: AtomicU64,
}

/// One key's bucket and aggregate.
struct KeyState {
    action: Action,
    tokens: f64,
    /// When the bucket was last refilled (µs since the VM started: the alarm's time).
    last_refill_us: u64,
    first_us: u64,
    last_us: u64,
    count: u64,
    written: u64,
}

struct SinkState {
    file: Option<std::io::BufWriter<std::fs::File>>,
    capture: Option<Vec<Alarm>>,
    rate: f64,
    burst: f64,
    keys: std::collections::HashMap<u32, KeyState, KeyHash>,
    written: u64,
    suppressed: u64,
    error: Option<String>,
}

/// What the sink knows of an admitted alarm's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Alarms of this key so far, this one included (suppressed ones too).
    pub count: u64,
    /// When this key's first alarm was raised (µs since the VM started).
    pub first_us: u64,
}

impl AlarmSink {
    /// A sink per `cfg` (creates the file, refusing a planted symlink, FIFO or hard
    /// link: [`hilrig_device::secure::create_output_file`]; the error names it).
    pub fn new(cfg: &AlarmConfig) -> std::io::Result<AlarmSink> {
        let file = match &cfg.file {
            Some(p) => Some(std::io::BufWriter::new(
                hilrig_device::secure::create_output_file(p).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("alarm file refused: {e}"),
                    )
                })?,
            )),
            None => None,
        };
        Ok(AlarmSink {
            state: Mutex::new(SinkState {
                file,
                capture: cfg.capture.then(Vec::new),
                rate: f64::from(cfg.rate),
                burst: f64::from(cfg.burst.max(1)),
                keys: std::collections::HashMap::default(),
                written: 0,
                suppressed: 0,
                error: None,
            }),
            next_token_us: AtomicU64::new(0),
        })
    }

    /// Whether an alarm raised at `now_us` by the key that last raised one would be
    /// admitted: a vCPU in an alarm flood asks KVM for the registers at its next
    /// exit only then (`vstate::vcpu`). A hint, never a decision: a wrong answer
    /// costs a KVM_GET_REGS, or a register copy nobody reads.
    #[inline]
    pub fn token_due(&self, now_us: u64) -> bool {
        now_us >= self.next_token_us.load(Ordering::Relaxed)
    }

    /// Count `hit` (raised at `t_us`) under its key and take a token of that key:
    /// Some if the alarm may be written now (always for a key's first alarm); None
    /// counts it suppressed.
    pub fn admit(&self, hit: &AlarmHit, t_us: u64) -> Option<Admitted> {
        // The bucket refills by the alarm's own time (no second clock read); the key
        // is one u32 with a multiplicative hash (no SipHash on the alarm path).
        let mut guard = lock(&self.state);
        let s = &mut *guard;
        let (rate, burst) = (s.rate, s.burst);
        let k = s
            .keys
            .entry(alarm_key(hit.offset, hit.write, hit.action))
            .or_insert(KeyState {
                action: hit.action,
                tokens: burst,
                last_refill_us: t_us,
                first_us: t_us,
                last_us: t_us,
                count: 0,
                written: 0,
            });
        let dt = t_us.saturating_sub(k.last_refill_us) as f64 / 1e6;
        k.last_refill_us = k.last_refill_us.max(t_us);
        k.tokens = (k.tokens + dt * rate).min(burst);
        k.count += 1;
        k.last_us = t_us;
        let admit = k.tokens >= 1.0 || k.count == 1;
        if admit {
            k.tokens = (k.tokens - 1.0).max(0.0);
        }
        let due = if k.tokens >= 1.0 {
            t_us
        } else if rate > 0.0 {
            // Rounded up without a libm call on the alarm path.
            let wait = (1.0 - k.tokens) / rate * 1e6;
            let whole = wait as u64;
            t_us.saturating_add(whole + u64::from((whole as f64) < wait))
        } else {
            u64::MAX
        };
        self.next_token_us.store(due, Ordering::Relaxed);
        if admit {
            k.written += 1;
            Some(Admitted {
                count: k.count,
                first_us: k.first_us,
            })
        } else {
            s.suppressed += 1;
            None
        }
    }

    /// The aggregate of every key, in register order; `name` names a register word
    /// (the profile's names: the reference device's, or a described device's).
    pub fn groups(&self, name: impl Fn(u32) -> String) -> Vec<hilrig_vmm_api::AlarmGroup> {
        let s = lock(&self.state);
        let mut g: Vec<_> = s
            .keys
            .iter()
            .map(|(&key, k)| {
                let (word, write, ai) = (key >> 3, key & 4 != 0, key & 3);
                (
                    (word, write, ai),
                    hilrig_vmm_api::AlarmGroup {
                        register: name(word),
                        offset: word,
                        access: if write { "write" } else { "read" }.into(),
                        action: serde_json::to_value(k.action)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default(),
                        first_us: k.first_us,
                        last_us: k.last_us,
                        count: k.count,
                        written: k.written,
                    },
                )
            })
            .collect();
        g.sort_by_key(|(k, _)| *k);
        g.into_iter().map(|(_, v)| v).collect()
    }

    /// Write an admitted alarm.
    pub fn push(&self, a: Alarm) {
        let mut s = lock(&self.state);
        s.written += 1;
        if let Some(f) = s.file.as_mut() {
            let r = serde_json::to_writer(&mut *f, &a)
                .map_err(std::io::Error::from)
                .and_then(|_| f.write_all(b"\n"));
            if let Err(e) = r {
                if s.error.is_none() {
                    tracing::error!("alarm sink: {e}");
                    s.error = Some(e.to_string());
                }
            }
        }
        if let Some(c) = s.capture.as_mut() {
            c.push(a);
        }
    }

    fn counts(&self) -> (u64, u64, Option<String>) {
        let s = lock(&self.state);
        (s.written, s.suppressed, s.error.clone())
    }

    fn finish(&self) -> (u64, u64, Vec<Alarm>, Option<String>) {
        let mut s = lock(&self.state);
        if let Some(f) = s.file.as_mut() {
            if let Err(e) = f.flush() {
                s.error.get_or_insert(e.to_string());
            }
        }
        (
            s.written,
            s.suppressed,
            s.capture.take().unwrap_or_default(),
            s.error.clone(),
        )
    }
}

/// An alarm key — (register word, access, action) — as one number (BAR0 offsets
/// fit in 16 bits), ordered as (word, write, action).
#[inline]
fn alarm_key(offset: u32, write: bool, action: Action) -> u32 {
    ((offset & !3) << 3) | (u32::from(write) << 2) | action_index(action) as u32
}

/// Hashes an alarm key with one multiplication (keys are bounded and not chosen by
/// anyone who gains from collisions beyond a slower alarm of their own).
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        // The product's high half depends on every bit of the key: fold it into the
        // low bits the table indexes by.
        self.0 ^ (self.0 >> 32)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type KeyHash = std::hash::BuildHasherDefault<KeyHasher>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One installed version of the policy module: a compiled profile and its shadow
/// store (fresh at install: the reset values).
pub struct PolicyModule {
    /// The compiled profile.
    pub profile: Arc<Profile>,
    shadow: Box<[AtomicU32]>,
}

impl PolicyModule {
    /// The module for `profile`.
    pub fn new(profile: Arc<Profile>) -> PolicyModule {
        let shadow = profile
            .shadow_init
            .iter()
            .map(|&v| AtomicU32::new(v))
            .collect();
        PolicyModule { profile, shadow }
    }
}

impl std::fmt::Debug for PolicyModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyModule")
            .field("profile", &self.profile.name)
            .field("source", &self.profile.source)
            .finish()
    }
}

/// The module table's policy slot (None: no policy module installed; an engine then
/// drops every trapped access, fail closed).
pub type PolicySlot = Slot<Option<Arc<PolicyModule>>>;

type Active = PolicyModule;

/// Most pieces of one split store (a 32-byte store split at a page end: 5).
const MAX_PIECES: usize = 8;

const WORDS: usize = (BAR0_SIZE / 4) as usize;
const FLASH_CMD_WORD: u32 = hilrig_device::regmap::Reg::FlashCmd.offset();
const FLASH_REGION_WORD: u32 = hilrig_device::regmap::Reg::FlashRegion.offset();

/// Told of every alarm the engine raises (the breach monitor's alarm thresholds,
/// `lifecycle::breach`). Called on the vCPU thread: must not block for long.
pub trait AlarmObserver: Send + Sync {
    /// An alarm on the register word at BAR0 offset `word`.
    fn alarm(&self, word: u32);
}

/// The policy engine of one VM.
pub struct PolicyEngine {
    /// The policy module's slot (the module table's, when the VM has one).
    slot: Arc<PolicySlot>,
    /// The profile the engine started with.
    initial: Arc<Profile>,
    /// The last swap's figures.
    last_swap: Mutex<Option<crate::modtable::modules::Swapped>>,
    /// Told of every alarm (set once, by the breach monitor).
    observer: std::sync::OnceLock<Arc<dyn AlarmObserver>>,
    /// FLASH_CMD program/erase commands passed to the device with a region selected
    /// (what the hardware counts as attempts: the breach monitor's cross-check).
    flash_attempts: AtomicU64,
    /// The alarm sink.
    pub alarms: AlarmSink,
    per_word_alarms: Box<[AtomicU64]>,
    /// Per-access counters, a shard per thread that owns one (the vCPUs), the
    /// last shared by the rest ([`stat_shard`]), summed for reports.
    stats: Box<[StatShard]>,
    alarms_total: AtomicU64,
    record: Option<Mutex<Vec<Decided>>>,
    /// The engine's clock origin (alarm times): the TSC, no system call on the
    /// alarm path ([`crate::ticks`]).
    start: crate::ticks::Tick,
    /// BAR0 pages (bit per page) the VM traps whatever the profile says
    /// (`--trap all`): there a page without rules gets the profile's default.
    forced: u16,
}

/// Shards of the per-access counters: one per thread that holds a claim (at
/// most [`OWNED_SHARDS`] threads at a time, e.g. the vCPUs), and the last one
/// shared by every other thread.
const STAT_SHARDS: usize = OWNED_SHARDS + 1;
/// Shards a thread can own.
const OWNED_SHARDS: usize = 8;

/// One shard of the per-access counters: its own cache lines, so vCPUs counting
/// their accesses do not pull one line back and forth between cores.
#[repr(align(128))]
#[derive(Default)]
struct StatShard {
    parts: AtomicU64,
    actions: [AtomicU64; 4],
    faults: AtomicU64,
}

/// A thread's counter shard: owned (only this thread writes it, in every engine,
/// while the thread lives), or the shared one.
#[derive(Clone, Copy)]
struct ShardRef {
    index: usize,
    owned: bool,
}

impl ShardRef {
    /// Add `n` to `counter` of this shard: an owned shard has one writer, so a
    /// plain load and store (no locked instruction on the per-access path); the
    /// shared shard adds atomically.
    #[inline(always)]
    fn add(self, counter: &AtomicU64, n: u64) {
        if self.owned {
            counter.store(counter.load(Ordering::Relaxed) + n, Ordering::Relaxed);
        } else {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Which threads own which shard, process-wide (a claim is released when its
/// thread ends, with release ordering, so the next owner's plain loads see every
/// count its predecessor stored).
static SHARD_OWNED: [AtomicBool; OWNED_SHARDS] = [const { AtomicBool::new(false) }; OWNED_SHARDS];

/// A thread's claim on a shard, released when the thread ends.
struct ShardClaim(ShardRef);

impl Drop for ShardClaim {
    fn drop(&mut self) {
        if self.0.owned {
            SHARD_OWNED[self.0.index].store(false, Ordering::Release);
        }
    }
}

/// This thread's counter shard (claimed on first use; the shared one when every
/// owned shard is taken).
#[inline]
fn stat_shard() -> ShardRef {
    thread_local! {
        static SHARD: ShardClaim = ShardClaim(claim_shard());
    }
    SHARD
        .try_with(|c| c.0)
        // Asked while the thread's locals are being destroyed: the shared shard.
        .unwrap_or(ShardRef {
            index: OWNED_SHARDS,
            owned: false,
        })
}

#[cold]
fn claim_shard() -> ShardRef {
    for (index, o) in SHARD_OWNED.iter().enumerate() {
        if o.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return ShardRef { index, owned: true };
        }
    }
    ShardRef {
        index: OWNED_SHARDS,
        owned: false,
    }
}

fn action_index(a: Action) -> usize {
    match a {
        Action::Allow => 0,
        Action::Drop => 1,
        Action::Shadow => 2,
        Action::Fault => 3,
    }
}

/// What the policy did during a run: the [`PolicySummary`] every client reads (its
/// fields are reachable directly, `report.alarms`), plus what stays in process.
#[derive(Debug, Clone, Default)]
pub struct PolicyReport {
    /// The counters (what `--json` and the control socket carry).
    pub summary: PolicySummary,
    /// Alarms kept in memory ([`AlarmConfig::capture`]).
    pub captured: Vec<Alarm>,
    /// Every decided part ([`PolicyEngine::record_decisions`]).
    pub decided: Vec<Decided>,
}

impl std::ops::Deref for PolicyReport {
    type Target = PolicySummary;
    fn deref(&self) -> &PolicySummary {
        &self.summary
    }
}

impl std::ops::DerefMut for PolicyReport {
    fn deref_mut(&mut self) -> &mut PolicySummary {
        &mut self.summary
    }
}

pub use hilrig_vmm_api::PolicySummary;

/// One register-sized part of a planned access (bytes within an 8-byte access fit
/// a byte each; the plan stays small enough to be copied inline, no `memcpy`).
#[derive(Clone, Copy)]
struct Part {
    word: u32,
    /// Byte mask within the word.
    mask: u8,
    /// First byte within the word.
    biw: u8,
    /// First byte within the access's data.
    ds: u8,
    len: u8,
}

/// Phase 1 of an access: every register-sized part decided, nothing done yet.
#[derive(Clone, Copy)]
struct Plan {
    parts: [Part; 3],
    decs: [crate::policy::Decision; 3],
    /// (bits written in place / device value, filter value, device value known)
    vals: [(u32, u32, bool); 3],
    n: u8,
    fault: bool,
}

impl Plan {
    const EMPTY: Plan = Plan {
        parts: [Part {
            word: 0,
            mask: 0,
            biw: 0,
            ds: 0,
            len: 0,
        }; 3],
        decs: [crate::policy::Decision::ALLOW; 3],
        vals: [(0, 0, false); 3],
        n: 0,
        fault: false,
    };
}

/// The device as a decision sees it: each (word, byte mask) read at most once per
/// access. A decision runs again when its policy module is replaced mid-call (the
/// module table's retry) and must then see the values the first run read, not
/// read again: reading a register may change it (read-to-clear).
struct ReadOnce<'d, const N: usize> {
    dev: &'d mut dyn Device,
    got: [(u32, u8, u32); N],
    n: usize,
}

impl<'d, const N: usize> ReadOnce<'d, N> {
    #[inline(always)]
    fn new(dev: &'d mut dyn Device) -> Self {
        ReadOnce {
            dev,
            got: [(0, 0, 0); N],
            n: 0,
        }
    }

    #[inline]
    fn read_word(&mut self, word: u32, mask: u8) -> Result<u32, DeviceError> {
        if let Some(&(.., v)) = self.got[..self.n]
            .iter()
            .find(|&&(w, m, _)| w == word && m == mask)
        {
            return Ok(v);
        }
        let v = self.dev.read_word(word, mask)?;
        if self.n < N {
            self.got[self.n] = (word, mask, v);
            self.n += 1;
        }
        Ok(v)
    }
}

/// Whether deciding an access of `len` bytes at `off` under `p` reads the device
/// (a rule of `p` filters on the value of a word the access touches).
#[inline]
fn reads_to_decide(p: &Profile, off: u64, len: usize, write: bool) -> bool {
    let end = (off + len as u64).min(BAR0_SIZE);
    let mut w = off & !3;
    while w < end {
        if p.needs_value(w as u32, write) && (!write || merges_writes(w as u32)) {
            return true;
        }
        w += 4;
    }
    false
}

/// Why a decision produced no plan.
enum NoPlan {
    /// The deciding module must read the device to decide, and the access could
    /// not commit first (a pause claimed the vCPU): decide again later.
    Void,
    /// The device failed a read.
    Device(DeviceError),
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn plan_into<const N: usize>(
    p: &Profile,
    forced: u16,
    dev: &mut ReadOnce<'_, N>,
    off: u64,
    data: &[u8],
    write: bool,
    pl: &mut Plan,
) -> Result<(), DeviceError> {
    *pl = Plan::EMPTY;
    for part in split_access(off, data.len()) {
        let (w, m) = (part.word, byte_mask_bits(part.mask));
        let (bits, fv, known) = if write {
            let mut b = [0u8; 4];
            b[part.byte_in_word..part.byte_in_word + part.len]
                .copy_from_slice(&data[part.data_start..part.data_start + part.len]);
            let bits = u32::from_le_bytes(b);
            let fv = if p.needs_value(w, true) && merges_writes(w) {
                (dev.read_word(w, 0xf)? & !m) | bits
            } else {
                bits
            };
            (bits, fv, false)
        } else if p.needs_value(w, false) {
            let v = dev.read_word(w, part.mask)?;
            (v, v, true)
        } else {
            (0, 0, false)
        };
        let mut d = p.decide(w, write, fv);
        if d.rule.is_none()
            && forced & (1 << (w as u64 / PAGE_SIZE)) != 0
            && !p.page_has_rules((w as u64 / PAGE_SIZE) as usize)
        {
            d = p.default_decision();
        }
        pl.fault |= d.action == Action::Fault;
        let i = usize::from(pl.n);
        pl.parts[i] = Part {
            word: w,
            mask: part.mask,
            biw: part.byte_in_word as u8,
            ds: part.data_start as u8,
            len: part.len as u8,
        };
        pl.decs[i] = d;
        pl.vals[i] = (bits, fv, known);
        pl.n += 1;
    }
    Ok(())
}

impl PolicyEngine {
    /// An engine running `profile` (v1 in a slot of its own), alarms per `alarms`.
    pub fn new(profile: Arc<Profile>, alarms: &AlarmConfig) -> std::io::Result<PolicyEngine> {
        let slot = Slot::new(
            crate::modtable::POLICY,
            Some(Arc::new(PolicyModule::new(profile))),
            1,
            Box::new(|_| {}),
        );
        PolicyEngine::in_slot(slot, alarms)
    }

    /// An engine deciding through `slot` (the module table's policy slot).
    pub fn in_slot(slot: Arc<PolicySlot>, alarms: &AlarmConfig) -> std::io::Result<PolicyEngine> {
        let initial = slot
            .peek()
            .as_ref()
            .map(|m| m.profile.clone())
            .ok_or_else(|| std::io::Error::other("the policy slot holds no policy module"))?;
        Ok(PolicyEngine {
            slot,
            initial,
            last_swap: Mutex::new(None),
            observer: std::sync::OnceLock::new(),
            flash_attempts: AtomicU64::new(0),
            alarms: AlarmSink::new(alarms)?,
            per_word_alarms: (0..WORDS).map(|_| AtomicU64::new(0)).collect(),
            stats: (0..STAT_SHARDS).map(|_| StatShard::default()).collect(),
            alarms_total: AtomicU64::new(0),
            record: None,
            start: crate::ticks::now(),
            forced: 0,
        })
    }

    /// The BAR0 pages the VM traps whatever the profile says (`VmConfig::trap`, e.g.
    /// `--trap all`): an access there on a page without rules gets the profile's
    /// default (deny unless `default = "allow"`) instead of passing undecided.
    pub fn forced_pages(mut self, pages: impl IntoIterator<Item = usize>) -> Self {
        self.forced = 0;
        for p in pages {
            if p < 16 {
                self.forced |= 1 << p;
            }
        }
        self
    }

    /// Record every decided part (for tests and oracles; allocates per access).
    pub fn record_decisions(mut self, on: bool) -> Self {
        self.record = on.then(|| Mutex::new(Vec::new()));
        self
    }

    /// The figures of the last swap (None: none yet, or it could not drain).
    pub fn last_swap(&self) -> Option<crate::modtable::modules::Swapped> {
        *lock(&self.last_swap)
    }

    /// The policy slot the engine decides through.
    pub fn slot(&self) -> &Arc<PolicySlot> {
        &self.slot
    }

    /// The active profile (None: no policy module installed).
    pub fn try_profile(&self) -> Option<Arc<Profile>> {
        self.slot.peek().as_ref().map(|m| m.profile.clone())
    }

    /// The active profile (the first one, for names, when no module is installed).
    pub fn profile(&self) -> Arc<Profile> {
        self.try_profile().unwrap_or_else(|| self.initial.clone())
    }

    /// Replace the active profile (and its shadow store) without stopping anyone:
    /// accesses decided by the old version are carried out as decided, a decision
    /// the swap overtook is made again by the new one, every later one is decided
    /// by the new (see [`PolicyEngine::swap`]). The caller keeps the page plan in
    /// step (pages the new profile traps must trap before it takes effect; see `Vm`
    /// / issue 9). Returns the old profile.
    pub fn replace(&self, profile: Arc<Profile>) -> Arc<Profile> {
        self.replace_with(profile, || {})
    }

    /// [`PolicyEngine::replace`], running `during` just before the new version is
    /// published (the caller re-plans the page mappings there).
    pub fn replace_with(&self, profile: Arc<Profile>, during: impl FnOnce()) -> Arc<Profile> {
        let v = self.slot.version() + 1;
        self.replace_at(profile, v, during)
    }

    /// [`PolicyEngine::replace_with`] as policy `version`.
    pub fn replace_at(
        &self,
        profile: Arc<Profile>,
        version: u64,
        during: impl FnOnce(),
    ) -> Arc<Profile> {
        let old = self.profile();
        during();
        let sw = self.swap(profile, version, crate::modtable::modules::DRAIN_BOUND);
        *lock(&self.last_swap) = sw.as_ref().ok().copied();
        if let Err(e) = sw {
            // Published; the old version could not be drained in time (alarmed).
            crate::modtable::MODULE_ALARMS.fetch_add(1, Ordering::Relaxed);
            tracing::error!("module alarm: {e}");
        }
        old
    }

    /// Install `profile` as policy `version` while every vCPU is claimed by a
    /// quiesce (`lifecycle::quiesce`): publish and cancel the old version; nothing
    /// is drained or retired (a claimed vCPU may still be inside a decision of the
    /// old version: [`Slot::decide`] makes it again in the new one, and the vCPU
    /// voids it at its commit point anyway). Returns the old version.
    /// `module` is built by the caller before the quiesce (nothing is allocated
    /// while the vCPUs are held but the slot's own record).
    pub fn replace_quiesced(&self, module: Arc<PolicyModule>, version: u64) -> u64 {
        self.slot.replace(Some(module), version)
    }

    /// Install `profile` as policy `version` through the slot without a quiesce:
    /// publish, cancel the old version (decisions inside it are retried in the new),
    /// wait up to `bound` for its in-flight count to drain.
    pub fn swap(
        &self,
        profile: Arc<Profile>,
        version: u64,
        bound: std::time::Duration,
    ) -> Result<crate::modtable::modules::Swapped, crate::modtable::modules::SwapError> {
        self.slot
            .swap(Some(Arc::new(PolicyModule::new(profile))), version, bound)
    }

    /// Tell `o` of every alarm from now on. Only one observer per engine: false if
    /// one was already set.
    pub fn observe_alarms(&self, o: Arc<dyn AlarmObserver>) -> bool {
        self.observer.set(o).is_ok()
    }

    /// FLASH_CMD program/erase commands the engine let reach the device with a flash
    /// region selected (the attempts the hardware should have counted).
    pub fn flash_attempts(&self) -> u64 {
        self.flash_attempts.load(Ordering::Relaxed)
    }

    /// Microseconds since the engine started.
    #[inline]
    pub fn elapsed_us(&self) -> u64 {
        crate::ticks::ns_since(self.start) / 1000
    }

    /// Carry out one trapped access of `data.len()` bytes at BAR0 offset `off`:
    /// a write of `data`, or a read into `data`. Allocates nothing (unless
    /// recording decisions).
    #[inline]
    pub fn access(
        &self,
        dev: &mut dyn Device,
        off: u64,
        data: &mut [u8],
        write: bool,
    ) -> Result<Outcome, DeviceError> {
        let mut out = Outcome::default();
        self.access_committing(dev, off, data, write, || true, &mut out)?;
        Ok(out)
    }

    /// [`PolicyEngine::access`] with a commit point: once the access is decided
    /// (reads only: the device's current value where a filter needs it, the policy
    /// module), `commit` is called right before the first side effect (counters,
    /// the device access, the shadow store, the decision record). If it returns
    /// false nothing is done and `Ok(false)` comes back: the decision is void (a
    /// pause claimed the vCPU; see `lifecycle::quiesce`), make it again later.
    /// Otherwise the outcome is written to `out` (in place: no copy of it on the
    /// per-access path) and `Ok(true)` comes back.
    #[inline(always)]
    pub fn access_committing(
        &self,
        dev: &mut dyn Device,
        off: u64,
        data: &mut [u8],
        write: bool,
        commit: impl FnOnce() -> bool,
        out: &mut Outcome,
    ) -> Result<bool, DeviceError> {
        let mut commit = Some(commit);
        // Committed, or not (a pause claimed the vCPU): asked once, the answer
        // kept (a decision rerun in a newer module after a void one stays void).
        let mut verdict: Option<bool> = None;
        let mut committed = || *verdict.get_or_insert_with(|| commit.take().is_none_or(|c| c()));
        // Decided in place (the plan is not copied on the per-access path), by the
        // module the slot runs: if *its* rules filter on a value this access
        // touches, deciding reads the device, so the access commits first (a
        // decision a pause voids must not have read a read-to-clear register). A
        // rerun in a newer module reads nothing twice ([`ReadOnce`]).
        let mut plan = Plan::EMPTY;
        let mut view = ReadOnce::<3>::new(dev);
        let decided = check_access(off, data.len())
            .map_err(NoPlan::Device)
            .and_then(|()| {
                match self.slot.decide_versioned(|m| match m {
                    Some(m) => {
                        if reads_to_decide(&m.profile, off, data.len(), write) && !committed() {
                            return Err(NoPlan::Void);
                        }
                        plan_into(
                            &m.profile,
                            self.forced,
                            &mut view,
                            off,
                            data,
                            write,
                            &mut plan,
                        )
                        .map_err(NoPlan::Device)
                    }
                    None => {
                        plan = Plan::EMPTY;
                        Ok(())
                    }
                }) {
                    Ok((Some(m), v, r)) => r.map(|()| (Some(m), v)),
                    // No policy module, or one that kept changing: drop the access
                    // (reads return 0), fail closed.
                    Ok((None, ..)) | Err(_) => Ok((None, 0)),
                }
            });
        let dev = view.dev;
        // A bad access is reported only when committed: claimed meanwhile, it is
        // decided again (perhaps by another version) after the pause.
        let (module, version) = match decided {
            Err(NoPlan::Void) => return Ok(false),
            _ if !committed() => return Ok(false),
            Err(NoPlan::Device(e)) => return Err(e),
            Ok(d) => d,
        };
        let Some(module) = module else {
            if !write {
                data.fill(0);
            }
            *out = Outcome::default();
            return Ok(true);
        };
        if plan.fault {
            let sh = stat_shard();
            sh.add(&self.stats[sh.index].faults, 1);
        }
        self.apply(module, version, &plan, dev, data, write, plan.fault, out)?;
        Ok(true)
    }

    /// Carry out the pieces of one store that KVM split into several exits
    /// (`(offset, bytes, len)`, in order), all or nothing: if any part of any
    /// piece faults, none reaches the device. One outcome per piece.
    pub fn access_split(
        &self,
        dev: &mut dyn Device,
        pieces: &mut [(u64, [u8; 8], usize)],
        outs: &mut [Outcome],
    ) -> Result<bool, DeviceError> {
        for (off, _, len) in pieces.iter() {
            check_access(*off, *len)?;
        }
        if pieces.len() > MAX_PIECES {
            return Err(DeviceError::Access {
                offset: pieces.first().map_or(0, |p| p.0),
                len: pieces.iter().map(|p| p.2).sum(),
                reason: hilrig_device::device::AccessFault::BadWidth,
            });
        }
        // Every piece decided by one version of the policy module.
        let mut view = ReadOnce::<{ 3 * MAX_PIECES }>::new(dev);
        let decided = self.slot.decide_versioned(|m| {
            let mut plans = [Plan::EMPTY; MAX_PIECES];
            if let Some(m) = m {
                for (i, (off, buf, len)) in pieces.iter().enumerate() {
                    plan_into(
                        &m.profile,
                        self.forced,
                        &mut view,
                        *off,
                        &buf[..*len],
                        true,
                        &mut plans[i],
                    )?;
                }
            }
            Ok::<_, DeviceError>(plans)
        });
        let dev = view.dev;
        let (module, version, plans) = match decided {
            Ok((Some(m), v, p)) => (m, v, p?),
            Ok((None, ..)) | Err(_) => return Ok(false), // dropped, fail closed
        };
        let fault = plans[..pieces.len()].iter().any(|p| p.fault);
        if fault {
            let sh = stat_shard();
            sh.add(&self.stats[sh.index].faults, 1);
        }
        for (((_, buf, len), out), plan) in pieces.iter_mut().zip(outs.iter_mut()).zip(&plans) {
            self.apply(
                module,
                version,
                plan,
                dev,
                &mut buf[..*len],
                true,
                fault,
                out,
            )?;
        }
        Ok(fault)
    }

    /// Whether a write fault rule covers any word in `start..end` (cheap; decides
    /// whether a split store must be gathered before deciding).
    pub fn write_may_fault(&self, start: u64, end: u64) -> bool {
        let Some(m) = self.slot.peek() else {
            return false;
        };
        let p = &m.profile;
        p.enforce
            && (start & !3..end.min(BAR0_SIZE))
                .step_by(4)
                .any(|w| p.may_fault(w as u32, true))
    }

    /// Phase 2: carry out the decided parts (none if `fault`), count, alarm, record.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        active: &Active,
        version: u64,
        plan: &Plan,
        dev: &mut dyn Device,
        data: &mut [u8],
        write: bool,
        fault: bool,
        out: &mut Outcome,
    ) -> Result<(), DeviceError> {
        let p = &*active.profile;
        *out = Outcome {
            fault,
            hits: [None; 3],
            decided_by: None,
        };
        let sh = stat_shard();
        let st = &self.stats[sh.index];
        sh.add(&st.parts, u64::from(plan.n));
        for i in 0..usize::from(plan.n) {
            let Part {
                word: w,
                mask,
                biw,
                ds,
                len,
            } = plan.parts[i];
            let (biw, ds, len) = (usize::from(biw), usize::from(ds), usize::from(len));
            let d = plan.decs[i];
            let m = byte_mask_bits(mask);
            let (bits, fv, known) = plan.vals[i];
            let mut shown = bits;
            if !fault {
                if write {
                    match d.action {
                        Action::Allow => {
                            if w == FLASH_CMD_WORD
                                && mask & 1 != 0
                                && matches!(
                                    bits & 0xff,
                                    regmap::FLASH_CMD_ERASE | regmap::FLASH_CMD_PROGRAM
                                )
                                && dev.read_word(FLASH_REGION_WORD, 0xf)? & 3 != 3
                            {
                                self.flash_attempts.fetch_add(1, Ordering::Relaxed);
                            }
                            dev.write_word(w, bits, mask)?
                        }
                        Action::Drop | Action::Fault => {}
                        Action::Shadow => {
                            if let Some(rule) = d.rule {
                                let s = &active.shadow[p.shadow_slot(rule, w)];
                                let old = s.load(Ordering::Relaxed);
                                s.store((old & !m) | (bits & m), Ordering::Relaxed);
                            }
                        }
                    }
                } else {
                    let v = match (d.action, d.rule) {
                        (Action::Drop, Some(r)) => p.rules[r as usize].value,
                        (Action::Shadow, Some(r)) => {
                            active.shadow[p.shadow_slot(r, w)].load(Ordering::Relaxed)
                        }
                        _ if known => bits,
                        _ => dev.read_word(w, mask)?,
                    };
                    data[ds..ds + len].copy_from_slice(&v.to_le_bytes()[biw..biw + len]);
                    shown = v;
                }
            }
            if d.rule.is_some() {
                let ai = if fault { 3 } else { action_index(d.action) };
                sh.add(&st.actions[ai], 1);
            }
            if d.alarm {
                if let Some(o) = self.observer.get() {
                    o.alarm(w);
                }
                self.alarms_total.fetch_add(1, Ordering::Relaxed);
                self.per_word_alarms[(w / 4) as usize].fetch_add(1, Ordering::Relaxed);
                out.hits[i] = d.rule.map(|rule| AlarmHit {
                    offset: w + biw as u32,
                    width: len as u8,
                    write,
                    value: (shown & m) >> (8 * biw),
                    action: if fault { Action::Fault } else { d.action },
                    rule,
                });
            }
            if out.hits[i].is_some() {
                out.decided_by = Some(version);
            }
            if let Some(rec) = &self.record {
                lock(rec).push(Decided {
                    word: w,
                    mask,
                    write,
                    filter_value: fv,
                    bits: shown & m,
                    action: d.action,
                    rule: d.rule,
                    faulted: fault,
                });
            }
        }
        Ok(())
    }

    /// Build the alarm for `hit` (RIP and instruction supplied by the vCPU), naming
    /// the rules of policy version `decided_by` (the one that decided the hit:
    /// [`Outcome::decided_by`]), of the active profile if None.
    #[allow(clippy::too_many_arguments)]
    pub fn alarm(
        &self,
        decided_by: Option<u64>,
        vcpu: u8,
        rip: u64,
        insn_rip: Option<u64>,
        insn: String,
        access_len: usize,
        hit: &AlarmHit,
    ) -> Alarm {
        let p = decided_by
            .and_then(|v| self.slot.installed(v))
            .and_then(|m| m.module.as_ref().map(|m| m.profile.clone()))
            .unwrap_or_else(|| self.profile());
        Alarm {
            t_us: self.elapsed_us(),
            vcpu,
            rip,
            insn_rip,
            insn,
            register: p.register_name(hit.offset),
            offset: hit.offset,
            width: hit.width,
            access_len: access_len as u8,
            access: if hit.write { "write" } else { "read" }.into(),
            value: hit.value,
            action: hit.action,
            profile: p.name.clone(),
            rule: p.rule_number(hit.rule),
            enforce: p.enforce,
            count: 1,
            first_us: 0,
        }
    }

    /// Live figures for metrics (no captured alarms or decisions; drains nothing).
    pub fn metrics(&self) -> PolicyReport {
        let (written, suppressed, sink_error) = self.alarms.counts();
        self.build_report(written, suppressed, Vec::new(), sink_error, Vec::new())
    }

    /// The run's figures (flushes the sink, drains captured alarms and the decision
    /// record).
    pub fn report(&self) -> PolicyReport {
        let (written, suppressed, captured, sink_error) = self.alarms.finish();
        let decided = self
            .record
            .as_ref()
            .map(|r| std::mem::take(&mut *lock(r)))
            .unwrap_or_default();
        self.build_report(written, suppressed, captured, sink_error, decided)
    }

    /// A per-access counter summed over the shards.
    fn stat(&self, f: impl Fn(&StatShard) -> &AtomicU64) -> u64 {
        self.stats
            .iter()
            .map(|s| f(s).load(Ordering::Relaxed))
            .sum()
    }

    fn build_report(
        &self,
        written: u64,
        suppressed: u64,
        captured: Vec<Alarm>,
        sink_error: Option<String>,
        decided: Vec<Decided>,
    ) -> PolicyReport {
        let p = self.profile();
        let mut per_register = BTreeMap::new();
        for (i, c) in self.per_word_alarms.iter().enumerate() {
            let c = c.load(Ordering::Relaxed);
            if c > 0 {
                *per_register
                    .entry(p.register_name(i as u32 * 4))
                    .or_insert(0) += c;
            }
        }
        PolicyReport {
            summary: PolicySummary {
                profile: p.name.clone(),
                source: p.source.clone(),
                enforce: p.enforce,
                default_deny: p.default_rule.is_some(),
                untrapped_rule_pages: if p.enforce {
                    Vec::new()
                } else {
                    p.rule_pages().into_iter().map(|x| x as u32).collect()
                },
                parts: self.stat(|s| &s.parts),
                allowed: self.stat(|s| &s.actions[0]),
                dropped: self.stat(|s| &s.actions[1]),
                shadowed: self.stat(|s| &s.actions[2]),
                faults: self.stat(|s| &s.faults),
                alarms: self.alarms_total.load(Ordering::Relaxed),
                alarms_written: written,
                alarms_suppressed: suppressed,
                per_register,
                sink_error,
                alarm_groups: self.alarms.groups(|w| p.register_name(w)),
            },
            captured,
            decided,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{load_profile, PolicyFile};
    use hilrig_device::regmap::{Reg, HANG_MAGIC};

    fn model() -> Box<dyn Device> {
        Box::new(crate::devices::backend::fresh_model(7).expect("model"))
    }

    fn engine(profile: &str) -> PolicyEngine {
        let p = load_profile(None, profile).expect("profile");
        PolicyEngine::new(Arc::new(p), &AlarmConfig::default()).expect("engine")
    }

    #[test]
    fn tenant_drops_hang_and_key_and_allows_scratch() {
        let e = engine("tenant");
        let mut d = model();
        let hang = Reg::HangTrigger.offset() as u64;
        let mut buf = HANG_MAGIC.to_le_bytes();
        let o = e.access(&mut *d, hang, &mut buf, true).expect("access");
        assert!(!o.fault);
        assert_eq!(o.hits[0].map(|h| h.action), Some(Action::Drop));
        assert_ne!(
            d.read32(Reg::Id.offset()).expect("id"),
            u32::MAX,
            "not hung"
        );
        // An 8-byte read straddling SERIAL[1] (allowed) and the next word.
        let key = Reg::DeviceKey.offset() as u64;
        let mut k = [0xaau8; 8];
        e.access(&mut *d, key + 2, &mut k, false).expect("read");
        assert_eq!(k, [0; 8]);
        let mut s = 0x1234_5678u32.to_le_bytes();
        e.access(&mut *d, Reg::Scratch.offset() as u64, &mut s, true)
            .expect("scratch");
        assert_eq!(d.read32(Reg::Scratch.offset()).expect("r"), 0x1234_5678);
        // 8 bytes over SCRATCH[7] and DOORBELL both allowed; 8 over SOFT_RESET+SERIAL:
        // the SOFT_RESET half is dropped, the SERIAL half read.
        let mut x = [0u8; 8];
        e.access(&mut *d, Reg::SoftReset.offset() as u64, &mut x, false)
            .expect("read");
        let serial = d.read32(Reg::Serial.offset()).expect("serial");
        assert_eq!(&x[4..], &serial.to_le_bytes());
        let r = e.report();
        assert_eq!(r.alarms, 1 + 3 + 1);
        assert_eq!(r.per_register.get("HANG_TRIGGER"), Some(&1));
        assert_eq!(r.per_register.get("DEVICE_KEY[0]"), Some(&1));
        assert_eq!(r.per_register.get("DEVICE_KEY[2]"), Some(&1));
    }

    /// Issue 21.7: a vCPU raises an access's alarms after its committing section
    /// (a quiesce may swap the policy in between): the alarm names the rule of the
    /// version that decided, not of the one installed by then.
    #[test]
    fn an_alarm_raised_after_a_swap_names_the_rule_that_decided() {
        let prof = |name: &str, text: &str| {
            Arc::new(
                PolicyFile::parse(text, "t.toml")
                    .expect("parse")
                    .compile(name, "t.toml")
                    .expect("compile"),
            )
        };
        let rule = |name: &str| {
            format!("[[profile.{name}]]\nregister = \"SCRATCH[0]\"\naccess = \"write\"\naction = \"drop\"\nalarm = true\n")
        };
        let e =
            PolicyEngine::new(prof("old", &rule("old")), &AlarmConfig::default()).expect("engine");
        let mut d = model();
        let off = u64::from(Reg::Scratch.offset());
        let out = e
            .access(&mut *d, off, &mut 7u32.to_le_bytes(), true)
            .expect("access");
        let hit = out.hits[0].expect("alarmed");
        e.replace_quiesced(Arc::new(PolicyModule::new(prof("new", &rule("new")))), 2);
        let a = e.alarm(out.decided_by, 0, 0, None, String::new(), 4, &hit);
        assert_eq!(a.profile, "old", "named by the version that decided");
        assert_eq!(a.rule, 1);
        // (Named by the installed version it would be wrong: the difference is real.)
        assert_eq!(
            e.alarm(None, 0, 0, None, String::new(), 4, &hit).profile,
            "new"
        );
    }

    #[test]
    fn shadow_and_fault_rules() {
        let f = PolicyFile::parse(
            r#"
            [[profile.t]]
            register = "SCRATCH[0]"
            access = "both"
            action = "shadow"
            [[profile.t]]
            register = "SCRATCH[1]"
            access = "write"
            action = "fault"
            alarm = true
            "#,
            "t.toml",
        )
        .expect("parse");
        let p = f.compile("t", "t.toml").expect("compile");
        let e = PolicyEngine::new(Arc::new(p), &AlarmConfig::default()).expect("engine");
        let mut d = model();
        let s0 = Reg::Scratch.offset();
        let mut b = 0xdead_beefu32.to_le_bytes();
        e.access(&mut *d, s0 as u64, &mut b, true).expect("w");
        assert_eq!(
            d.read32(s0).expect("r"),
            0,
            "shadowed: the device never saw it"
        );
        let mut r = [0u8; 2];
        e.access(&mut *d, s0 as u64 + 2, &mut r, false).expect("r");
        assert_eq!(r, [0xad, 0xde]);
        // An 8-byte write over SCRATCH[0] (shadow) and SCRATCH[1] (fault): nothing.
        let mut w = [1u8; 8];
        let o = e.access(&mut *d, s0 as u64, &mut w, true).expect("w");
        assert!(o.fault);
        assert_eq!(d.read32(s0 + 4).expect("r"), 0);
        let mut r = [0u8; 4];
        e.access(&mut *d, s0 as u64, &mut r, false).expect("r");
        assert_eq!(
            u32::from_le_bytes(r),
            0xdead_beef,
            "shadow untouched by the fault"
        );
        // Replacing the profile resets the shadow store.
        e.replace(Arc::new(load_profile(None, "operator").expect("op")));
        e.access(&mut *d, s0 as u64, &mut r, false).expect("r");
        assert_eq!(u32::from_le_bytes(r), 0);
        assert_eq!(e.report().faults, 1);
    }

    /// Per-access counters lose nothing: more threads than owned shards count at
    /// once (the rest share the atomic shard), and threads that end hand their
    /// shard to the next wave, whose plain stores start from every count the
    /// last owner stored.
    #[test]
    fn counters_are_exact_across_owned_and_shared_shards_and_thread_waves() {
        let e = Arc::new(
            PolicyEngine::new(
                Arc::new(load_profile(None, "tenant").expect("tenant")),
                &AlarmConfig::default(),
            )
            .expect("engine"),
        );
        let scratch = Reg::Scratch.offset() as u64;
        const PER_THREAD: u64 = 20_000;
        let threads = OWNED_SHARDS + 4;
        for _wave in 0..3 {
            // All at once: owners and sharers count side by side.
            let start = Arc::new(std::sync::Barrier::new(threads));
            let hs: Vec<_> = (0..threads)
                .map(|_| {
                    let (e, start) = (e.clone(), start.clone());
                    std::thread::spawn(move || {
                        let mut dev = CountingReads(0, None);
                        start.wait();
                        for i in 0..PER_THREAD {
                            // An 8-byte write: two parts, SCRATCH[0] and [1].
                            let mut b = i.to_le_bytes();
                            e.access(&mut dev, scratch, &mut b, true).expect("access");
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().expect("thread");
            }
        }
        let parts = e.report().parts;
        assert_eq!(parts, 3 * threads as u64 * PER_THREAD * 2, "parts counted");
    }

    /// A device counting the reads that reach it (every read gives 1), running
    /// its hook once, at its first read.
    struct CountingReads(u32, Option<Box<dyn FnOnce() + Send>>);

    impl Device for CountingReads {
        fn read_word(&mut self, _word: u32, _mask: u8) -> Result<u32, DeviceError> {
            self.0 += 1;
            if let Some(hook) = self.1.take() {
                hook();
            }
            Ok(1)
        }
        fn write_word(&mut self, _word: u32, _value: u32, _mask: u8) -> Result<(), DeviceError> {
            Ok(())
        }
        fn rom_size(&self) -> u64 {
            0
        }
        fn rom_read(&mut self, _offset: u64, _data: &mut [u8]) -> Result<(), DeviceError> {
            Ok(())
        }
        fn reset(&mut self, _kind: hilrig_device::ResetKind) -> Result<(), DeviceError> {
            Ok(())
        }
        fn oob(&mut self, _request: &[u8]) -> Result<Vec<u8>, DeviceError> {
            Ok(Vec::new())
        }
    }

    /// A profile that drops reads of SCRATCH[1] whose bit 0 is `deny`: deciding
    /// such a read reads the register.
    fn scratch1_read_filter(deny: u32) -> Arc<Profile> {
        let f = PolicyFile::parse(
            &format!(
                "[[profile.t]]\nregister = \"SCRATCH[1]\"\naccess = \"read\"\n\
                 filter = {{ deny = [{deny}], mask = 1 }}\naction = \"drop\"\n"
            ),
            "<test>",
        )
        .and_then(|f| f.compile("t", "<test>"))
        .expect("profile");
        Arc::new(f)
    }

    /// A decision voided by a pause (`commit` false) leaves no trace on the device,
    /// even when a rule filtering on the value needs the register read to decide:
    /// such an access commits before it reads (a read-to-clear register read while
    /// deciding, then again when decided anew after the pause, would lose data).
    #[test]
    fn a_voided_decision_never_read_the_device() {
        let e =
            PolicyEngine::new(scratch1_read_filter(1), &AlarmConfig::default()).expect("engine");
        let scratch = Reg::Scratch.offset() as u64;
        let mut dev = CountingReads(0, None);
        let mut buf = [0u8; 4];
        // Filtered: the pause claimed the vCPU before the read, nothing was read.
        let mut out = Outcome::default();
        let r = e.access_committing(&mut dev, scratch + 4, &mut buf, false, || false, &mut out);
        assert_eq!((r.ok(), dev.0), (Some(false), 0));
        // Committed: read once, to decide (denied value 1: dropped, reads 0).
        let r = e.access_committing(&mut dev, scratch + 4, &mut buf, false, || true, &mut out);
        assert!(r.is_ok_and(|o| o), "decided");
        assert_eq!(dev.0, 1, "one read, to decide");
        // Unfiltered: decided without the device; voided, nothing read.
        let r = e.access_committing(&mut dev, scratch + 8, &mut buf, false, || false, &mut out);
        assert_eq!((r.ok(), dev.0), (Some(false), 1));
        // A bad access is reported only when committed.
        let r = e.access_committing(&mut dev, 0x1_0000, &mut buf, false, || false, &mut out);
        assert!(matches!(r, Ok(false)), "{r:?}");
        let r = e.access_committing(&mut dev, 0x1_0000, &mut buf, false, || true, &mut out);
        assert!(r.is_err(), "{r:?}");
    }

    /// A decision that read a register and is then rerun in the module that
    /// replaced its own mid-call (the module table's retry) reads nothing again: a
    /// read-to-clear register is read once per access, whatever the patches do.
    #[test]
    fn a_decision_rerun_in_a_new_module_does_not_read_the_device_again() {
        let e = Arc::new(
            PolicyEngine::new(scratch1_read_filter(0), &AlarmConfig::default()).expect("engine"),
        );
        let scratch = Reg::Scratch.offset() as u64;
        // The device swaps the engine's policy (no quiesce) at its first read, i.e.
        // while the deciding module reads it to decide: published and the old
        // version cancelled; it cannot drain (the call is in it), so the bound
        // runs out: fine, it is retired late.
        let (swapper, next) = (e.clone(), scratch1_read_filter(1));
        let mut dev = CountingReads(
            0,
            Some(Box::new(move || {
                let _ = swapper.swap(next, 2, std::time::Duration::from_millis(1));
            })),
        );
        let mut buf = [0xffu8; 4];
        let o = e
            .access(&mut dev, scratch + 4, &mut buf, false)
            .expect("access");
        assert_eq!(dev.0, 1, "the register was read once");
        // Decided by the new version (value 1 denied: dropped, the rule's 0).
        assert_eq!((buf, o.fault), ([0; 4], false));
        assert_eq!(
            e.slot.retries(),
            1,
            "the decision was rerun in the new module"
        );
    }

    /// A decision voided at its commit point (a pause claimed the vCPU) stays void
    /// when the module that made it is replaced meanwhile and the slot reruns it
    /// in the new one: nothing read, nothing carried out.
    #[test]
    fn a_void_decision_stays_void_when_rerun_in_a_new_module() {
        let e = Arc::new(
            PolicyEngine::new(scratch1_read_filter(1), &AlarmConfig::default()).expect("engine"),
        );
        let scratch = Reg::Scratch.offset() as u64;
        let mut dev = CountingReads(0, None);
        let mut buf = [0xffu8; 4];
        let mut out = Outcome::default();
        let (swapper, next) = (e.clone(), scratch1_read_filter(1));
        // The pause claims the vCPU and the patch it makes replaces the module
        // without quiesce (publish, cancel) before the vCPU looks at the cancel.
        let r = e.access_committing(
            &mut dev,
            scratch + 4,
            &mut buf,
            false,
            || {
                let _ = swapper.swap(next, 2, std::time::Duration::from_millis(1));
                false
            },
            &mut out,
        );
        assert!(matches!(r, Ok(false)), "{r:?}");
        assert_eq!(
            (dev.0, buf),
            (0, [0xff; 4]),
            "nothing read, nothing answered"
        );
        assert_eq!(e.report().parts, 0, "nothing carried out");
    }

    #[test]
    fn sink_buckets_refill_by_the_alarms_time_and_keys_stay_apart() {
        let s = AlarmSink::new(&AlarmConfig {
            file: None,
            capture: false,
            rate: 10,
            burst: 2,
        })
        .expect("sink");
        let hit = |offset, write, action| AlarmHit {
            offset,
            width: 4,
            write,
            value: 0,
            action,
            rule: 0,
        };
        let a = hit(0x38, true, Action::Drop);
        assert!(s.token_due(0), "nothing raised yet");
        assert!(s.admit(&a, 0).is_some());
        assert!(s.token_due(0), "a second token in the burst");
        assert!(s.admit(&a, 0).is_some());
        assert!(
            !s.token_due(99_999) && s.token_due(100_000),
            "next token at 100 ms"
        );
        assert!(s.admit(&a, 0).is_none(), "burst used up");
        assert!(
            s.admit(&a, 50_000).is_none(),
            "half a token after 50 ms at 10/s"
        );
        assert!(
            !s.token_due(99_999) && s.token_due(100_000),
            "still at 100 ms"
        );
        assert!(s.admit(&a, 100_000).is_some(), "a token after 100 ms");
        assert!(
            s.admit(&hit(0x39, true, Action::Drop), 100_000).is_none(),
            "a byte of the same word is the same key"
        );
        // Another access, action or word is another key: its first alarm is written.
        for k in [
            hit(0x38, false, Action::Drop),
            hit(0x38, true, Action::Fault),
            hit(0x3c, true, Action::Drop),
        ] {
            assert_eq!(s.admit(&k, 100_000).map(|a| a.count), Some(1), "{k:?}");
        }
        let g: Vec<_> = s
            .groups(|w| format!("{w:#x}"))
            .into_iter()
            .map(|g| (g.offset, g.access, g.action, g.count, g.written))
            .collect();
        let row = |o: u32, acc: &str, act: &str, c: u64, w: u64| {
            (o, acc.to_string(), act.to_string(), c, w)
        };
        assert_eq!(
            g,
            vec![
                row(0x38, "read", "drop", 1, 1),
                row(0x38, "write", "drop", 6, 3),
                row(0x38, "write", "fault", 1, 1),
                row(0x3c, "write", "drop", 1, 1),
            ]
        );
    }

    #[test]
    fn sink_rate_limits_and_counts_suppressed() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("alarms.jsonl");
        let cfg = AlarmConfig {
            file: Some(path.clone()),
            capture: false,
            rate: 1,
            burst: 5,
        };
        let e = PolicyEngine::new(Arc::new(load_profile(None, "tenant").expect("p")), &cfg)
            .expect("engine");
        let mut d = model();
        for _ in 0..100 {
            let mut b = [1u8; 4];
            let o = e
                .access(&mut *d, Reg::HangTrigger.offset() as u64, &mut b, true)
                .expect("a");
            for h in o.hits.iter().flatten() {
                if e.alarms.admit(h, 0).is_some() {
                    e.alarms
                        .push(e.alarm(None, 0, 0x1000, Some(0x1000), "mov".into(), 4, h));
                }
            }
        }
        let r = e.report();
        assert_eq!(r.alarms, 100);
        assert!(r.alarms_written >= 5 && r.alarms_written <= 6, "{r:?}");
        assert_eq!(r.alarms_written + r.alarms_suppressed, 100);
        let text = std::fs::read_to_string(&path).expect("read");
        let first: Alarm = serde_json::from_str(text.lines().next().expect("line")).expect("json");
        assert_eq!(first.register, "HANG_TRIGGER");
        assert_eq!(first.action, Action::Drop);
        assert_eq!(first.profile, "tenant");
    }

    /// Counts the SCRATCH[0] writes that reach it.
    struct Spy(Arc<AtomicU64>);
    impl Device for Spy {
        fn read_word(&mut self, _: u32, _: u8) -> Result<u32, DeviceError> {
            Ok(0)
        }
        fn write_word(&mut self, word: u32, _: u32, _: u8) -> Result<(), DeviceError> {
            if word == Reg::Scratch.offset() {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        }
        fn rom_size(&self) -> u64 {
            0
        }
        fn rom_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
            hilrig_device::device::check_rom(offset, data.len(), 0)
        }
        fn reset(&mut self, _: hilrig_device::ResetKind) -> Result<(), DeviceError> {
            Ok(())
        }
    }

    #[test]
    fn a_policy_swap_under_an_mmio_storm_decides_every_access_exactly_once_by_old_or_new() {
        // Old: the tenant may write SCRATCH[0] (it reaches the device, no alarm).
        // New: SCRATCH[0] writes are dropped with an alarm. Swapped back and forth
        // through the module table's slot while 4 threads write SCRATCH[0].
        let open = Arc::new(load_profile(None, "tenant").unwrap());
        let text = format!(
            "{}\n[[profile.tenant]]\nregister = \"SCRATCH[0]\"\naccess = \"write\"\naction = \"drop\"\nalarm = true\n",
            crate::policy::default_policy_toml()
        );
        let closed = Arc::new(
            PolicyFile::parse(&text, "t")
                .unwrap()
                .compile("tenant", "t")
                .unwrap(),
        );
        let table = crate::lifecycle::patch::ModuleTable::new(Some(open.clone()), |_| {});
        let e = Arc::new(
            PolicyEngine::in_slot(table.policy.clone(), &AlarmConfig::default())
                .unwrap()
                .record_decisions(true),
        );
        const THREADS: usize = 4;
        const EACH: usize = 20_000;
        let reached = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let storm: Vec<_> = (0..THREADS)
            .map(|_| {
                let (e, reached) = (e.clone(), reached.clone());
                std::thread::spawn(move || {
                    let mut d = Spy(reached);
                    let (mut allowed, mut dropped) = (0u64, 0u64);
                    for i in 0..EACH {
                        let mut b = (i as u32).to_le_bytes();
                        let o = e
                            .access(&mut d, Reg::Scratch.offset() as u64, &mut b, true)
                            .unwrap();
                        match o.hits[0] {
                            None => allowed += 1,
                            Some(h) => {
                                assert_eq!(h.action, Action::Drop);
                                dropped += 1;
                            }
                        }
                    }
                    (allowed, dropped)
                })
            })
            .collect();
        let swapper = {
            let (e, stop) = (e.clone(), stop.clone());
            let (open, closed) = (open.clone(), closed.clone());
            std::thread::spawn(move || {
                let mut v = 1;
                loop {
                    v += 1;
                    let p = if v % 2 == 0 { &closed } else { &open };
                    e.swap(p.clone(), v, std::time::Duration::from_secs(5))
                        .expect("drains");
                    if stop.load(Ordering::SeqCst) {
                        return v;
                    }
                    std::thread::yield_now();
                }
            })
        };
        let (mut allowed, mut dropped) = (0, 0);
        for t in storm {
            let (a, d) = t.join().unwrap();
            allowed += a;
            dropped += d;
        }
        stop.store(true, Ordering::SeqCst);
        let last = swapper.join().unwrap();
        let total = (THREADS * EACH) as u64;
        // Exactly once: every access either reached the device (decided by the open
        // version) or was dropped with an alarm (the closed one), never both or none.
        assert_eq!(allowed + dropped, total);
        assert_eq!(reached.load(Ordering::SeqCst), allowed);
        let r = e.report();
        assert_eq!(r.alarms, dropped);
        assert_eq!(r.decided.len() as u64, total, "one decision per access");
        for d in &r.decided {
            assert!(matches!(d.action, Action::Allow | Action::Drop), "{d:?}");
        }
        // The engine decided through the module table's slot.
        assert_eq!(table.policy.version(), last);
        assert_eq!(table.policy.inflight(), 0);
        assert!(last >= 2, "at least one swap");
    }
}
