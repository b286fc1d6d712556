//! The attestation service: enrolment, the known-good catalog, verification,
//! authorised updates, history, master sums and the VMM cross-check.
//!
//! Every write runs in one transaction, so nothing is stored half-way; every row
//! carries a MAC checked on read. Fail closed: a device is trusted only after a
//! fresh passing verify, and any error leaves it untrusted.

use crate::crash::point;
use crate::decide::{
    decide, parse_hash, Decision, DeviceState, Expected, Hash, Intent, IntentOutcome, Observation,
    Severity,
};
use crate::mac::{hex32, Key, MacInput};
use crate::source::CounterSource;
use crate::store::{self, now_ms, Db, Val};
use crate::{Error, Result, Verdict};
use hilrig_device::oob::CounterReport;
use hilrig_device::Region;
use serde::Serialize;

/// A device to enrol.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// Serial (as the OOB IDENTIFY reports it).
    pub serial: u64,
    /// Host it is in.
    pub host: String,
    /// Rack the host is in.
    pub rack: String,
    /// Expected counters, master, epoch and known-good region hashes.
    pub expected: Expected,
}

/// A stored device.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceRecord {
    /// Serial, as stored (`0x...`).
    pub serial: String,
    /// Host.
    pub host: String,
    /// Rack.
    pub rack: String,
    /// State.
    pub state: DeviceState,
    /// Expected values.
    pub expected: Expected,
    /// Why it is in its state.
    pub reason: String,
    /// Non-empty: quarantined until an operator re-enrols it.
    pub hold: String,
    /// Last passing verify (ms since the Unix epoch; 0 = never).
    pub verified_at: i64,
    /// Sequence number of the device's latest history row when the row was written
    /// (0: written before the history chain existed). A device row older than its
    /// history (a replayed row) is detected.
    pub hseq: i64,
}

/// Where [`Service::verify_batch`] spent its time (wall clock, summed over the
/// batches since [`Service::reset_batch_profile`]): the benchmark's breakdown.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct BatchProfile {
    /// Batches run (a batch run again after a lost race counts again).
    pub batches: u64,
    /// Devices verified.
    pub devices: u64,
    /// `BEGIN` (a round trip on PostgreSQL).
    pub begin: std::time::Duration,
    /// Reading the rows, holds, latest seqs and chain head: queries and decoding.
    pub read: std::time::Duration,
    /// Of `read`: parsing the rows and checking their MACs (client side).
    pub read_check: std::time::Duration,
    /// Deciding, MACing the new rows and history (client side; SQLite: with the
    /// device row updates, which run in-process).
    pub decide: std::time::Duration,
    /// Writing the device rows and history rows.
    pub write: std::time::Duration,
    /// Of `write`: the history rows (SQLite; PostgreSQL writes both in one
    /// statement: 0).
    pub write_history: std::time::Duration,
    /// `COMMIT`.
    pub commit: std::time::Duration,
}

/// A known-good image.
#[derive(Debug, Clone, Serialize)]
pub struct CatalogEntry {
    /// Region.
    pub region: Region,
    /// SHA-256, hex.
    pub sha256: String,
    /// Version label.
    pub version: String,
    /// Who approved it.
    pub approved_by: String,
    /// When it was added (ms).
    pub added_at: i64,
    /// MAC intact (a tampered entry is never used).
    pub intact: bool,
}

/// One stored verdict.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    /// Row id.
    pub id: i64,
    /// Device.
    pub serial: String,
    /// When (ms).
    pub at: i64,
    /// Verdict name.
    pub verdict: String,
    /// Severity.
    pub severity: String,
    /// Recoverable.
    pub recoverable: bool,
    /// State the device went to.
    pub state: String,
    /// Observation (JSON); "same" when it equalled the expected values (and no fuse
    /// was blown); "" when the device could not be read.
    pub observed: String,
    /// Expected values before the verdict (JSON).
    pub expected: String,
    /// Reasons.
    pub reasons: Vec<String>,
    /// MAC intact.
    pub intact: bool,
}

/// The outcome of a verify.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Device.
    pub serial: String,
    /// The decision.
    #[serde(flatten)]
    pub decision: Decision,
    /// What was read, if anything.
    pub observed: Option<Observation>,
    /// What was expected before.
    pub expected: Option<Expected>,
}

impl VerifyReport {
    /// Passing: the device may be used.
    pub fn trusted(&self) -> bool {
        self.decision.state == DeviceState::Trusted
    }
}

/// Sum of MASTER counters over a group of devices.
#[derive(Debug, Clone, Serialize)]
pub struct MasterSum {
    /// Host or rack name.
    pub group: String,
    /// Sum of the devices' expected MASTER values (last verified).
    pub master: u64,
    /// Devices: (serial, master, state, intact).
    pub devices: Vec<(String, u32, String, bool)>,
}

/// Group master sums by host or rack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// Per host.
    Host,
    /// Per rack.
    Rack,
}

/// Per-device limit on update attempts.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    /// Attempts allowed in the window.
    pub max: i64,
    /// Window, seconds.
    pub window_s: i64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            max: 8,
            window_s: 3600,
        }
    }
}

/// The canonical stored form of a serial.
pub fn serial_key(serial: u64) -> String {
    format!("{serial:#x}")
}

/// Parse a serial: decimal or 0x-hex.
pub fn parse_serial(s: &str) -> Result<u64> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| Error::Input(format!("serial {s:?}: use a decimal or 0x-hex number")))
}

const DEV_COLS: &str =
    "serial, host, rack, state, c0, c1, c2, master, epoch, h0, h1, h2, reason, hold, verified_at, mac, hseq";

/// The BIGINT columns of [`DEV_COLS`] (the others are text).
const DEV_INT_COLS: [usize; 7] = [4, 5, 6, 7, 8, 14, 16];

/// The service over a database.
pub struct Service {
    db: Box<dyn Db>,
    key: Key,
    /// Update rate limit.
    pub rate_limit: RateLimit,
    /// Every counted attempt needs an authorised intent (the provisioning gate, rig
    /// leases, `verify --require-intent`): counters that rose without one are not
    /// accepted as the new expected values; the device is held `needs-review`
    /// until an operator clears the hold ([`Service::hold_clear`]). Off by default
    /// (the design's catalog rule: known-good images re-baseline).
    pub require_intents: bool,
    /// During `verify_batch`: device rows read up front (taken once each).
    prefetched: Option<std::collections::HashMap<String, (DeviceRecord, bool)>>,
    /// During `verify_batch`: history rows written together before the commit.
    pending_history: Option<Vec<Vec<Val>>>,
    /// During `verify_batch` on PostgreSQL: device rows written together.
    pending_devices: Option<Vec<(DeviceRecord, String)>>,
    /// Runs inside `verify_batch` after the rows are read and before they are
    /// written (tests: another process commits in between).
    batch_hook: Option<Box<dyn FnMut() + Send>>,
    /// During `verify_batch` on PostgreSQL: each device row's MAC (rows are not
    /// locked; the batched UPDATE compares and swaps on it) and region hashes as
    /// read (an unchanged hash is not sent back).
    batch_macs: Option<std::collections::HashMap<String, (String, [Hash; 3])>>,
    /// During `verify_batch`: every hold, read up front.
    holds: Option<std::collections::HashMap<String, String>>,
    /// The device row last read, as found (for the evidence).
    last_raw: Option<Vec<Val>>,
    /// During `verify`: the device record's MAC before the device was read.
    stale_check: Option<String>,
    /// The record changed since `stale_check`.
    stale_seen: bool,
    /// During `verify_batch`: each device's latest history seq, read up front.
    max_seqs: Option<std::collections::HashMap<String, i64>>,
    /// During a transaction: the history chain's head (seq, MAC), once read.
    head: Option<(i64, String)>,
    /// The external anchor of the chain head (a file or a second database).
    anchor: Option<crate::anchor::Anchor>,
    /// The newest head this service checked against or wrote to the anchor:
    /// that history row must still be in the database at every commit (a
    /// database replayed under a running service is refused).
    anchored: Option<(i64, String)>,
    /// During a transaction, with an anchor: the history rows written, for the
    /// anchor's device entries (serial, seq, MAC).
    anchor_rows: Vec<crate::anchor::DeviceHead>,
    /// During `verify_batch`, with an anchor: each device's anchor entry, read
    /// before its row, and the history rows those entries name (seq → serial,
    /// MAC).
    anchor_entries: Option<AnchorEntries>,
    /// During `verify_batch`: the device rows were read ahead, before the anchor
    /// (a row behind its anchor entry may be one another process moved on since:
    /// the batch runs again on fresh rows instead of quarantining it).
    rows_read_ahead: bool,
    /// During `hold_clear`: the operator's note, first reason of the history row.
    clear_note: Option<String>,
    /// Where `verify_batch` spent its time.
    profile: BatchProfile,
    /// The last batch's time spent writing its history rows.
    history_time: std::time::Duration,
    /// The last transaction's `BEGIN` and `COMMIT` times.
    tx_times: (std::time::Duration, std::time::Duration),
    /// A second connection to the same database: [`Service::verify_batch_ahead`]
    /// reads the next batch's rows on it while the current batch writes.
    read_ahead: Option<Box<dyn Db>>,
    /// The next batch's rows, read ahead (its serials and what was read); used by
    /// the very next batch only if its serials are these and no transaction ran
    /// in between.
    ahead: Option<(Vec<String>, BatchRead)>,
}

/// Anchor entries read for a batch: each device's (seq, MAC), and the history
/// rows at those sequences (seq → serial, MAC).
#[derive(Default)]
struct AnchorEntries {
    devices: std::collections::HashMap<String, (i64, String)>,
    rows: std::collections::HashMap<i64, (String, String)>,
}

/// Device rows read for a batch by [`read_batch`].
#[derive(Default)]
struct BatchRead {
    /// Each row, parsed, and whether its MAC holds.
    rows: std::collections::HashMap<String, (DeviceRecord, bool)>,
    /// PostgreSQL: each row's MAC and region hashes as read (the batched UPDATE
    /// compares and swaps on the MAC).
    macs: std::collections::HashMap<String, (String, [Hash; 3])>,
    /// PostgreSQL: each device's latest history seq.
    max_seqs: std::collections::HashMap<String, i64>,
    /// PostgreSQL: each device's hold.
    holds: std::collections::HashMap<String, String>,
    /// PostgreSQL: the history chain head.
    head: Option<(i64, String)>,
    /// Time spent parsing and MAC-checking the rows.
    check: std::time::Duration,
}

/// Read many device rows in a few queries (SQLite: locked for the transaction;
/// PostgreSQL: not locked, with each device's latest history seq and hold and the
/// chain head, one round trip per 1,000 devices). Rows that do not even parse are
/// left out (the one-by-one path reads them again and keeps the evidence).
fn read_batch(db: &mut dyn Db, key: &Key, keys: &[String]) -> Result<BatchRead> {
    let mut out = BatchRead {
        rows: std::collections::HashMap::with_capacity(keys.len()),
        ..BatchRead::default()
    };
    let pg = db.kind() == "postgresql";
    for chunk in keys.chunks(1000) {
        let (sql, params) = if pg {
            (
                // Not locked: the batched UPDATE compares and swaps on the MAC
                // read here (locking 1,000 rows costs a write to each). With
                // each device's latest history seq (the replayed-row check).
                // Its hold and the chain head come along too: one round trip
                // instead of four.
                format!("SELECT {DEV_COLS}, (SELECT MAX(h.seq) FROM history h WHERE h.serial = devices.serial), \
                         (SELECT reason FROM holds WHERE holds.serial = devices.serial), \
                         (SELECT seq FROM history WHERE seq > 0 ORDER BY seq DESC LIMIT 1), \
                         (SELECT mac FROM history WHERE seq > 0 ORDER BY seq DESC LIMIT 1) \
                         FROM devices WHERE serial = ANY($1)"),
                vec![Val::TextArray(chunk.to_vec())],
            )
        } else {
            let list: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            (
                format!(
                    "SELECT {DEV_COLS} FROM devices WHERE serial IN ({}){}",
                    list.join(","),
                    db.for_update()
                ),
                chunk.iter().map(|k| Val::Text(k.clone())).collect(),
            )
        };
        let rows = db.query(&sql, &params)?;
        let t = std::time::Instant::now();
        for mut row in rows {
            if row.len() == 21 {
                let extra = row.split_off(17);
                let k = match row.first() {
                    Some(Val::Text(k)) => k.clone(),
                    _ => String::new(),
                };
                if let Val::I64(m) = &extra[0] {
                    out.max_seqs.insert(k.clone(), *m);
                }
                match &extra[1] {
                    Val::Null => {}
                    // Whatever the row says (even if edited), it is held.
                    v => {
                        out.holds
                            .insert(k, v.text("reason").unwrap_or_else(|_| "held".into()));
                    }
                }
                if out.head.is_none() {
                    if let (Val::I64(seq), Val::Text(mac)) = (&extra[2], &extra[3]) {
                        out.head = Some((*seq, mac.clone()));
                    }
                }
            }
            // Rows that do not even parse are left to the one-by-one path.
            if let Ok(raw) = Service::parse_device(&row) {
                let intact = key.check_input(&Service::device_input(&raw.rec), &raw.mac);
                if pg {
                    out.macs.insert(
                        raw.rec.serial.clone(),
                        (raw.mac.clone(), raw.rec.expected.hashes),
                    );
                }
                out.rows.insert(raw.rec.serial.clone(), (raw.rec, intact));
            }
        }
        out.check += t.elapsed();
    }
    Ok(out)
}

/// MAC of a history row: its fields, and for a chained row (seq > 0) its sequence
/// number and the previous row's MAC (rows from before the chain: fields only).
fn history_mac(key: &Key, f: [&str; 9], seq: i64, prev: &str) -> String {
    let mut fields: Vec<&[u8]> = f.iter().map(|x| x.as_bytes()).collect();
    let seq_s = seq.to_string();
    if seq > 0 {
        fields.push(seq_s.as_bytes());
        fields.push(prev.as_bytes());
    }
    key.mac("history", &fields)
}

/// A key's fingerprint: a MAC of a fixed label (reveals nothing of the key).
pub fn key_fingerprint(key: &Key) -> String {
    let full = key.mac("key-fingerprint", &[b"hilrig-counters"]);
    full.chars().take(32).collect()
}

fn check_fingerprint(db: &mut dyn Db, fp: &str) -> Result<()> {
    let rows = db.query("SELECT value FROM meta WHERE name = 'key_fingerprint'", &[])?;
    if let Some(v) = rows.first().and_then(|r| r.first()) {
        let stored = v.text("value")?;
        if stored != fp {
            return Err(Error::WrongKey {
                stored,
                given: fp.to_string(),
            });
        }
    }
    Ok(())
}

fn row_as_found(row: &[Val]) -> String {
    let v: Vec<serde_json::Value> = row
        .iter()
        .map(|x| match x {
            Val::Null => serde_json::Value::Null,
            Val::I64(i) => serde_json::json!(i),
            Val::Text(t) => serde_json::json!(t),
            Val::Blob(b) => serde_json::json!({ "hex": hex::encode(b) }),
            Val::TextArray(v) => serde_json::json!(v),
            Val::I64Array(v) => serde_json::json!(v),
        })
        .collect();
    serde_json::to_string(&v).unwrap_or_default()
}

/// Rows as column arrays (PostgreSQL `unnest` parameters): `ints` are the BIGINT
/// columns, the others text.
fn columns(rows: Vec<Vec<Val>>, ncol: usize, ints: &[usize]) -> Result<Vec<Val>> {
    let mut cols: Vec<Val> = (0..ncol)
        .map(|c| {
            if ints.contains(&c) {
                Val::I64Array(Vec::with_capacity(rows.len()))
            } else {
                Val::TextArray(Vec::with_capacity(rows.len()))
            }
        })
        .collect();
    for row in rows {
        for (c, v) in row.into_iter().enumerate().take(ncol) {
            match (&mut cols[c], v) {
                (Val::I64Array(a), Val::I64(x)) => a.push(x),
                (Val::TextArray(a), Val::Text(x)) => a.push(x),
                (_, other) => {
                    return Err(Error::db(
                        "building array parameters",
                        format!("column {c}: unexpected {other:?}"),
                    ))
                }
            }
        }
    }
    Ok(cols)
}

struct RawDevice {
    rec: DeviceRecord,
    mac: String,
}

impl Service {
    /// Open the database named by `spec` (SQLite path or postgresql:// URL) and
    /// migrate it.
    pub fn open(spec: &str, key: Key) -> Result<Service> {
        Service::with_db(store::open(spec)?, key)
    }

    /// Use an open database; migrates it. The key is checked first: a database
    /// initialised with another key is refused before anything is written.
    pub fn with_db(mut db: Box<dyn Db>, key: Key) -> Result<Service> {
        let fp = key_fingerprint(&key);
        if store::schema_version(&mut *db)? >= 3 {
            check_fingerprint(&mut *db, &fp)?;
        }
        store::migrate(&mut *db)?;
        // First open since the fingerprint existed (init): store it.
        db.begin()?;
        let r = (|| -> Result<()> {
            let rows = db.query("SELECT value FROM meta WHERE name = 'key_fingerprint'", &[])?;
            if rows.is_empty() {
                db.exec(
                    "INSERT INTO meta (name, value) VALUES ('key_fingerprint', $1)",
                    &[Val::Text(fp.clone())],
                )?;
            }
            Ok(())
        })();
        match r {
            Ok(()) => db.commit()?,
            Err(e) => {
                db.rollback();
                return Err(e);
            }
        }
        check_fingerprint(&mut *db, &fp)?;
        Ok(Service {
            db,
            key,
            rate_limit: RateLimit::default(),
            require_intents: false,
            prefetched: None,
            pending_history: None,
            holds: None,
            last_raw: None,
            stale_check: None,
            stale_seen: false,
            head: None,
            anchor: None,
            anchored: None,
            anchor_rows: Vec::new(),
            anchor_entries: None,
            rows_read_ahead: false,
            max_seqs: None,
            pending_devices: None,
            batch_macs: None,
            batch_hook: None,
            clear_note: None,
            profile: BatchProfile::default(),
            tx_times: Default::default(),
            history_time: Default::default(),
            read_ahead: None,
            ahead: None,
        })
    }

    /// The database's kind.
    pub fn db_kind(&self) -> &'static str {
        self.db.kind()
    }

    /// Run `f` inside every `verify_batch`, after the device rows are read and
    /// before anything is written (tests: a concurrent commit at the worst moment).
    pub fn set_batch_hook(&mut self, f: Option<Box<dyn FnMut() + Send>>) {
        self.batch_hook = f;
    }

    /// Where `verify_batch` spent its time since the last reset.
    pub fn batch_profile(&self) -> BatchProfile {
        self.profile
    }

    /// Start the `verify_batch` profile again.
    pub fn reset_batch_profile(&mut self) {
        self.profile = BatchProfile::default();
    }

    /// Keep the connection's own memory small for long scans (`status`, `master`).
    pub fn low_memory(&mut self) -> Result<()> {
        self.db.low_memory()
    }

    /// Direct access to the database (tests: tampering from outside).
    pub fn db_mut(&mut self) -> &mut dyn Db {
        &mut *self.db
    }

    /// Run `f` in a transaction: committed if it returns Ok, rolled back otherwise.
    fn tx<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.tx_as(false, f)
    }

    /// [`Service::tx`]; `deferred`: the `BEGIN` waits until a statement writes
    /// (see [`Db::begin_deferred`]).
    fn tx_as<T>(&mut self, deferred: bool, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let t = std::time::Instant::now();
        if deferred {
            self.db.begin_deferred()?;
        } else {
            self.db.begin()?;
        }
        self.tx_times = (t.elapsed(), Default::default());
        self.head = None;
        self.anchor_rows.clear();
        // Rows read ahead serve only the batch right after the one that read
        // them (it takes them before its transaction).
        self.ahead = None;
        match f(self) {
            Ok(v) => {
                if self.head.is_some() {
                    if let Err(e) = self.still_anchored() {
                        self.db.rollback();
                        self.head = None;
                        return Err(e);
                    }
                }
                point("before commit");
                let head = self.head.take();
                let t = std::time::Instant::now();
                self.db.commit()?;
                self.tx_times.1 = t.elapsed();
                point("after commit");
                if let (Some(h), Some(a)) = (head, self.anchor.as_mut()) {
                    // After the commit: a crash in between leaves the anchor behind
                    // the database (accepted: the chain continues from it), never
                    // ahead of it.
                    point("anchor: before write");
                    let rows = std::mem::take(&mut self.anchor_rows);
                    a.write_with(h.0, &h.1, &rows)?;
                    point("anchor: written");
                    if self.anchored.as_ref().is_none_or(|f| f.0 < h.0) {
                        self.anchored = Some(h);
                    }
                }
                Ok(v)
            }
            Err(e) => {
                self.db.rollback();
                self.head = None;
                Err(e)
            }
        }
    }

    /// Before a commit that appends history: the newer of the anchor's current
    /// head (read now: another service on the same database may have moved it on)
    /// and the newest head this service anchored must still be in the database,
    /// as it was (history rows are never rewritten or deleted by the service).
    /// Otherwise the database was replayed or its history rewritten under this
    /// running service: refused, nothing of this transaction kept (a PostgreSQL
    /// batch whose single write statement ran without `BEGIN` is already stored:
    /// it is refused all the same, and the anchor is not moved). An anchor that
    /// cannot be read refuses the commit too (fail closed).
    fn still_anchored(&mut self) -> Result<()> {
        let current = match self.anchor.as_mut() {
            Some(a) => a.read()?,
            None => None,
        };
        let newest = match (current, self.anchored.clone()) {
            (Some(c), Some(o)) => Some(if c.0 > o.0 { c } else { o }),
            (c, o) => c.or(o),
        };
        let Some((seq, mac)) = newest.filter(|a| a.0 > 0) else {
            return Ok(());
        };
        let rows = self.db.query(
            "SELECT mac FROM history WHERE seq > 0 AND seq = $1",
            &[Val::I64(seq)],
        )?;
        let found = rows
            .first()
            .and_then(|r| r.first())
            .and_then(|v| v.text("mac").ok());
        if found.as_deref() == Some(mac.as_str()) {
            return Ok(());
        }
        Err(Error::Replayed {
            head: self.head.as_ref().map(|h| h.0).unwrap_or(0),
            anchor: seq,
            detail: format!(
                "history row {seq}, anchored by this or another service, is gone or different: the database was replayed or its history rewritten while the service ran"
            ),
        })
    }

    /// The next history row's (seq, previous MAC) in this transaction.
    fn chain_next(&mut self) -> Result<(i64, String)> {
        if self.head.is_none() {
            let rows = self.db.query(
                "SELECT seq, mac FROM history WHERE seq > 0 ORDER BY seq DESC LIMIT 1",
                &[],
            )?;
            self.head = Some(match rows.first() {
                Some(r) => (r[0].i64("seq")?, r[1].text("mac")?),
                None => (0, "genesis".into()),
            });
        }
        let (seq, mac) = self.head.clone().unwrap_or((0, "genesis".into()));
        Ok((seq + 1, mac))
    }

    /// The history chain's head in the database: (seq, MAC); (0, "genesis") if empty.
    pub fn chain_head(&mut self) -> Result<(i64, String)> {
        let rows = self.db.query(
            "SELECT seq, mac FROM history WHERE seq > 0 ORDER BY seq DESC LIMIT 1",
            &[],
        )?;
        Ok(match rows.first() {
            Some(r) => (r[0].i64("seq")?, r[1].text("mac")?),
            None => (0, "genesis".into()),
        })
    }

    /// Check the database against the anchor file of its history chain head, and
    /// keep it up to date after every write from now on (see
    /// [`Service::set_anchor_to`]).
    pub fn set_anchor(&mut self, path: &std::path::Path) -> Result<()> {
        self.set_anchor_to(crate::anchor::Anchor::File(path.to_path_buf()))
    }

    /// The anchor named by `spec`: a file path, `sqlite:PATH` or a
    /// `postgresql://` URL (a second database; this database's row there is named
    /// by the key's fingerprint). See [`Service::set_anchor_to`].
    pub fn set_anchor_spec(&mut self, spec: &str) -> Result<()> {
        let name = key_fingerprint(&self.key);
        self.set_anchor_to(crate::anchor::Anchor::open(spec, &name)?)
    }

    /// Check the database against the external anchor of its history chain head, and
    /// keep it up to date after every write from now on. A database (or history)
    /// older than the anchor is refused: "database replayed: head 41, anchor 57". An
    /// empty anchor is created from the current head.
    pub fn set_anchor_to(&mut self, mut anchor: crate::anchor::Anchor) -> Result<()> {
        let (hseq, hmac) = self.chain_head()?;
        let checked = match anchor.read()? {
            None => {
                anchor.write(hseq, &hmac)?;
                (hseq, hmac)
            }
            Some((aseq, amac)) => {
                if hseq < aseq {
                    return Err(Error::Replayed {
                        head: hseq,
                        anchor: aseq,
                        detail: "the database is older than the anchor".into(),
                    });
                }
                if aseq > 0 {
                    if let Some(detail) = self.anchored_row_fault(aseq, &amac)? {
                        return Err(Error::Replayed {
                            head: hseq,
                            anchor: aseq,
                            detail,
                        });
                    }
                }
                (aseq, amac)
            }
        };
        self.anchored = Some(checked);
        self.anchor = Some(anchor);
        Ok(())
    }

    /// What is wrong with the history row the anchor recorded at `aseq` (with
    /// MAC `amac`), or None: it must be there with that MAC, pass its own MAC
    /// check (so a forged row carrying the anchored MAC, copied from the anchor
    /// or the live database, is refused), and chain onto the row before it (so
    /// the genuine anchored row copied alone into an older database is refused).
    fn anchored_row_fault(&mut self, aseq: i64, amac: &str) -> Result<Option<String>> {
        let rows = self.db.query(
            "SELECT serial, at, verdict, severity, recoverable, state, observed, expected, reasons, mac, prev FROM history WHERE seq > 0 AND seq = $1",
            &[Val::I64(aseq)],
        )?;
        let Some(r) = rows.first().filter(|r| r.len() == 11) else {
            return Ok(Some(format!(
                "history row {aseq} is not the one the anchor recorded (a different database or rewritten history)"
            )));
        };
        let text = |i: usize| match &r[i] {
            Val::Text(t) => t.clone(),
            Val::I64(n) => n.to_string(),
            other => format!("{other:?}"),
        };
        if text(9) != amac {
            return Ok(Some(format!(
                "history row {aseq} is not the one the anchor recorded (a different database or rewritten history)"
            )));
        }
        let f: Vec<String> = (0..9).map(text).collect();
        let prev = text(10);
        let want = history_mac(
            &self.key,
            [
                &f[0], &f[1], &f[2], &f[3], &f[4], &f[5], &f[6], &f[7], &f[8],
            ],
            aseq,
            &prev,
        );
        if !hilrig_db::mac::ct_eq(want.as_bytes(), amac.as_bytes()) {
            return Ok(Some(format!(
                "history row {aseq} carries the anchored MAC but fails its own MAC check (a forged or edited row)"
            )));
        }
        if aseq > 1 {
            let rows = self.db.query(
                "SELECT mac FROM history WHERE seq > 0 AND seq = $1",
                &[Val::I64(aseq - 1)],
            )?;
            let before = rows
                .first()
                .and_then(|r| r.first())
                .and_then(|v| v.text("mac").ok());
            if before.as_deref() != Some(prev.as_str()) {
                return Ok(Some(format!(
                    "history row {} (the one the anchored row {aseq} chains onto) is missing or not the one it was chained to (rows deleted, or an older database with newer rows copied in)",
                    aseq - 1
                )));
            }
        }
        Ok(None)
    }

    /// Each of `keys`' anchor entry and the history rows they name (empty
    /// without an anchor). Read before the device rows: an entry is never newer
    /// than what was committed when it was read.
    fn read_anchor_entries(&mut self, keys: &[String]) -> Result<AnchorEntries> {
        let Some(a) = self.anchor.as_mut() else {
            return Ok(AnchorEntries::default());
        };
        let devices = a.devices(keys)?;
        let mut rows = std::collections::HashMap::with_capacity(devices.len());
        let seqs: Vec<i64> = devices.values().map(|e| e.0).collect();
        for chunk in seqs.chunks(500) {
            let (sql, params) = if self.db.kind() == "postgresql" {
                (
                    "SELECT seq, serial, mac FROM history WHERE seq > 0 AND seq = ANY($1)"
                        .to_string(),
                    vec![Val::I64Array(chunk.to_vec())],
                )
            } else {
                let list: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
                (
                    // `seq > 0`: the partial index `history_seq` serves it.
                    format!(
                        "SELECT seq, serial, mac FROM history WHERE seq > 0 AND seq IN ({})",
                        list.join(",")
                    ),
                    chunk.iter().map(|q| Val::I64(*q)).collect(),
                )
            };
            for r in self.db.query(&sql, &params)? {
                // A row that does not read as (seq, serial, mac) matches nothing.
                if let (Some(Val::I64(q)), Some(Val::Text(k)), Some(Val::Text(m))) =
                    (r.first(), r.get(1), r.get(2))
                {
                    rows.insert(*q, (k.clone(), m.clone()));
                }
            }
        }
        Ok(AnchorEntries { devices, rows })
    }

    /// What is wrong with device `key`'s record (written at history `hseq`)
    /// against its anchor entry, or None: the record must be at least as new as
    /// the device's newest history row the anchor names, and that row must be in
    /// the database with the anchored MAC. Either fails when the device's state
    /// was rolled back below the chain head (an older row put back, its newer
    /// history deleted, moved to another serial, or an older database restored
    /// with other rows copied in). A device with no entry (none written since the
    /// anchor kept devices) is not checked.
    fn anchored_device_fault(&self, key: &str, hseq: i64, e: &AnchorEntries) -> Option<String> {
        let (aseq, amac) = e.devices.get(key)?;
        if hseq < *aseq {
            return Some(format!(
                "device record {key} is older than its anchored history (row written at history {hseq}, the anchor names history {aseq}): a replayed row"
            ));
        }
        match e.rows.get(aseq) {
            Some((k, m)) if k == key && m == amac => None,
            _ => Some(format!(
                "history row {aseq}, the anchor's newest for {key}, is gone or different: its history was rolled back or rewritten"
            )),
        }
    }

    // ---- devices ---------------------------------------------------------

    fn device_input(r: &DeviceRecord) -> MacInput {
        let e = &r.expected;
        let mut i = MacInput::new("devices");
        i.s(&r.serial)
            .s(&r.host)
            .s(&r.rack)
            .s(r.state.name())
            .n(e.counters[0] as i64)
            .n(e.counters[1] as i64)
            .n(e.counters[2] as i64)
            .n(e.master as i64)
            .n(e.epoch as i64)
            .s(&hex32(&e.hashes[0]))
            .s(&hex32(&e.hashes[1]))
            .s(&hex32(&e.hashes[2]))
            .s(&r.reason)
            .s(&r.hold)
            .n(r.verified_at);
        if r.hseq > 0 {
            // Rows written since the history chain exist carry it (older rows keep
            // their MAC; a row cannot drop it without failing its MAC).
            i.n(r.hseq);
        }
        i
    }

    fn device_mac(&self, r: &DeviceRecord) -> String {
        self.key.mac_input(&Self::device_input(r))
    }

    fn device_params(&self, r: &DeviceRecord) -> Vec<Val> {
        let e = &r.expected;
        vec![
            Val::Text(r.serial.clone()),
            Val::Text(r.host.clone()),
            Val::Text(r.rack.clone()),
            Val::from(r.state.name()),
            e.counters[0].into(),
            e.counters[1].into(),
            e.counters[2].into(),
            e.master.into(),
            e.epoch.into(),
            Val::Text(hex32(&e.hashes[0])),
            Val::Text(hex32(&e.hashes[1])),
            Val::Text(hex32(&e.hashes[2])),
            Val::Text(r.reason.clone()),
            Val::Text(r.hold.clone()),
            Val::I64(r.verified_at),
            Val::Text(self.device_mac(r)),
            Val::I64(r.hseq),
        ]
    }

    fn parse_device(row: &[Val]) -> Result<RawDevice> {
        if row.len() != 17 {
            return Err(Error::db("reading devices", "wrong column count"));
        }
        let u = |i: usize, c: &str| -> Result<u32> {
            let v = row[i].i64(c)?;
            u32::try_from(v).map_err(|_| Error::db("reading devices", format!("{c} = {v}")))
        };
        let h = |i: usize, c: &str| -> Result<Hash> {
            parse_hash(&row[i].text(c)?).map_err(|e| Error::db("reading devices", e))
        };
        let state_s = row[3].text("state")?;
        Ok(RawDevice {
            rec: DeviceRecord {
                serial: row[0].text("serial")?,
                host: row[1].text("host")?,
                rack: row[2].text("rack")?,
                state: DeviceState::parse(&state_s).unwrap_or(DeviceState::Unknown),
                expected: Expected {
                    counters: [u(4, "c0")?, u(5, "c1")?, u(6, "c2")?],
                    master: u(7, "master")?,
                    epoch: u(8, "epoch")?,
                    hashes: [h(9, "h0")?, h(10, "h1")?, h(11, "h2")?],
                },
                reason: row[12].text("reason")?,
                hold: row[13].text("hold")?,
                verified_at: row[14].i64("verified_at")?,
                hseq: row[16].i64("hseq")?,
            },
            mac: row[15].text("mac")?,
        })
    }

    /// Load a device row and check its MAC. Ok(None): not enrolled. Err(Tampered)
    /// carries no record; `load_raw` gives the row for quarantining.
    fn load_raw(&mut self, serial: &str, lock: bool) -> Result<Option<(DeviceRecord, bool)>> {
        if let Some(hit) = self.prefetched.as_mut().and_then(|p| p.remove(serial)) {
            return Ok(Some(hit));
        }
        let sql = format!(
            "SELECT {DEV_COLS} FROM devices WHERE serial = $1{}",
            if lock { self.db.for_update() } else { "" }
        );
        let rows = self.db.query(&sql, &[Val::from(serial)])?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        self.last_raw = Some(row.clone());
        match Self::parse_device(row) {
            Ok(raw) => {
                if let Some(m) = &mut self.batch_macs {
                    m.entry(serial.to_string())
                        .or_insert_with(|| (raw.mac.clone(), raw.rec.expected.hashes));
                }
                let intact = self
                    .key
                    .check_input(&Self::device_input(&raw.rec), &raw.mac);
                Ok(Some((raw.rec, intact)))
            }
            // A row the service cannot even parse was edited outside it.
            Err(_) => Ok(Some((
                DeviceRecord {
                    serial: serial.to_string(),
                    host: String::new(),
                    rack: String::new(),
                    state: DeviceState::Quarantined,
                    expected: Expected {
                        counters: [u32::MAX; 3],
                        master: u32::MAX,
                        epoch: u32::MAX,
                        hashes: [[0; 32]; 3],
                    },
                    reason: String::new(),
                    hold: String::new(),
                    verified_at: 0,
                    hseq: 0,
                },
                false,
            ))),
        }
    }

    /// Why device `key`'s MAC-valid record (written at history `hseq`) is a
    /// replayed row, or None: it fails its anchor entry, or it is older than its
    /// own history in the database.
    fn replay_fault(&mut self, key: &str, hseq: i64, e: &AnchorEntries) -> Result<Option<String>> {
        if let Some(why) = self.anchored_device_fault(key, hseq, e) {
            return Ok(Some(why));
        }
        Ok(self
            .older_than_history(key, hseq)?
            .then(|| format!("device record {key} is older than its own history: a replayed row")))
    }

    /// Whether device `key`'s record (written at history `hseq`) is older than
    /// its newest history row in the database: a replayed row.
    fn older_than_history(&mut self, key: &str, hseq: i64) -> Result<bool> {
        let rows = self.db.query(
            "SELECT MAX(seq) FROM history WHERE serial = $1",
            &[Val::from(key)],
        )?;
        Ok(matches!(rows.first().and_then(|x| x.first()), Some(Val::I64(latest)) if *latest > hseq))
    }

    /// A device record, MAC-checked. A record older than its history is
    /// [`Error::Tampered`]; one that fails its anchor entry is [`Error::Anchor`]
    /// naming the anchor and what is wrong.
    pub fn device(&mut self, serial: u64) -> Result<DeviceRecord> {
        let key = serial_key(serial);
        let anchored = self.read_anchor_entries(std::slice::from_ref(&key))?;
        match self.load_raw(&key, false)? {
            None => Err(Error::UnknownDevice(key)),
            Some((_, false)) => Err(Error::Tampered {
                table: "devices",
                row: key,
            }),
            Some((mut r, true)) => {
                // A row older than its history is a replayed row.
                if self.older_than_history(&key, r.hseq)? {
                    return Err(Error::Tampered {
                        table: "devices",
                        row: key,
                    });
                }
                // Or older than its anchored history.
                if let Some(why) = self.anchored_device_fault(&key, r.hseq, &anchored) {
                    let path = self
                        .anchor
                        .as_ref()
                        .map(|a| a.describe())
                        .unwrap_or_default();
                    return Err(Error::Anchor {
                        path: path.into(),
                        detail: why,
                    });
                }
                // A hold kept beside the row wins over what the row says.
                if let Some(h) = self.hold_for(&key)? {
                    if r.state != DeviceState::NeedsReview {
                        r.state = DeviceState::Quarantined;
                    }
                    if r.hold.is_empty() {
                        r.hold = h;
                    }
                }
                Ok(r)
            }
        }
    }

    /// Every device with whether its MAC is intact.
    pub fn devices(&mut self) -> Result<Vec<(DeviceRecord, bool)>> {
        let mut out = Vec::new();
        self.devices_each(|d, ok| {
            out.push((d, ok));
            Ok(())
        })?;
        Ok(out)
    }

    /// Every device, in serial order, with whether its MAC is intact, handed to `f`
    /// one at a time: memory stays flat however many devices there are. A row that
    /// does not even parse is skipped (as [`Service::devices`] does).
    pub fn devices_each(
        &mut self,
        mut f: impl FnMut(DeviceRecord, bool) -> Result<()>,
    ) -> Result<()> {
        self.scan_devices("serial", &mut f)
    }

    fn scan_devices(
        &mut self,
        order: &str,
        f: &mut dyn FnMut(DeviceRecord, bool) -> Result<()>,
    ) -> Result<()> {
        let key = &self.key;
        self.db.query_each(
            &format!("SELECT {DEV_COLS} FROM devices ORDER BY {order}"),
            &[],
            &mut |row| match Self::parse_device(&row) {
                Ok(raw) => {
                    let ok = key.check_input(&Self::device_input(&raw.rec), &raw.mac);
                    f(raw.rec, ok)
                }
                Err(_) => Ok(()),
            },
        )
    }

    fn write_device(&mut self, r: &DeviceRecord, insert: bool) -> Result<()> {
        // The row points at the history row that follows it in this transaction (or
        // past every row so far): a replayed older row points below its history.
        let mut r = r.clone();
        r.hseq = self.chain_next()?.0;
        if !insert && self.pending_devices.is_some() {
            // verify_batch on PostgreSQL: written together before the history; a
            // later verify of the same device in the batch reads this record.
            let mac = self.device_mac(&r);
            if let Some(pf) = &mut self.prefetched {
                pf.insert(r.serial.clone(), (r.clone(), true));
            }
            if let Some(pd) = &mut self.pending_devices {
                pd.push((r, mac));
            }
            return Ok(());
        }
        let p = self.device_params(&r);
        if insert {
            self.db.exec(
                &format!(
                    "INSERT INTO devices ({DEV_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17)"
                ),
                &p,
            )?;
        } else {
            // Host and rack rarely change (only a re-enrolment moves a device):
            // leaving them out of the SET list spares SQLite the index updates.
            let n = self.db.exec(
                "UPDATE devices SET state=$4, c0=$5, c1=$6, c2=$7, master=$8, epoch=$9, h0=$10, h1=$11, h2=$12, reason=$13, hold=$14, verified_at=$15, mac=$16, hseq=$17 WHERE serial=$1 AND host=$2 AND rack=$3",
                &p,
            )?;
            if n == 1 {
                return Ok(());
            }
            let n = self.db.exec(
                "UPDATE devices SET host=$2, rack=$3, state=$4, c0=$5, c1=$6, c2=$7, master=$8, epoch=$9, h0=$10, h1=$11, h2=$12, reason=$13, hold=$14, verified_at=$15, mac=$16, hseq=$17 WHERE serial=$1",
                &p,
            )?;
            if n != 1 {
                return Err(Error::UnknownDevice(r.serial.clone()));
            }
        }
        Ok(())
    }

    /// Enrol a device. A duplicate is refused unless `replace` (an operator
    /// re-baselining a device on purpose, e.g. after investigating a quarantine).
    /// The device is `unknown` until its first passing verify.
    pub fn enroll(&mut self, e: &Enrollment, replace: bool) -> Result<()> {
        self.enroll_keyed(e, replace, None)
    }

    /// Enrol a device and store its OOB reset key (read by the caller from the
    /// key file `device init` wrote), sealed, in the same transaction. Who needs
    /// the key later (the conformance suite's reset properties, the rig's OOB
    /// power-cycle, remediation) takes it from [`Service::reset_key`].
    pub fn enroll_with_reset_key(
        &mut self,
        e: &Enrollment,
        replace: bool,
        reset_key: &[u8; 32],
    ) -> Result<()> {
        self.enroll_keyed(e, replace, Some(reset_key))
    }

    fn enroll_keyed(
        &mut self,
        e: &Enrollment,
        replace: bool,
        reset_key: Option<&[u8; 32]>,
    ) -> Result<()> {
        let key = serial_key(e.serial);
        for (what, v) in [("host", &e.host), ("rack", &e.rack)] {
            if v.len() > 256 || v.chars().any(|c| c.is_control()) {
                return Err(Error::Input(format!(
                    "{what} {v:?}: at most 256 printable characters"
                )));
            }
        }
        self.tx(|s| {
            point("enroll: start");
            let exists = s.load_raw(&key, true)?.is_some();
            if exists && !replace {
                return Err(Error::DuplicateDevice(key.clone()));
            }
            point("enroll: checked");
            if exists {
                // Re-enrolled on purpose: the operator has investigated the hold.
                s.db.exec(
                    "DELETE FROM holds WHERE serial = $1",
                    &[Val::from(key.as_str())],
                )?;
            }
            let rec = DeviceRecord {
                serial: key.clone(),
                host: e.host.clone(),
                rack: e.rack.clone(),
                state: DeviceState::Unknown,
                expected: e.expected.clone(),
                reason: if exists { "re-enrolled" } else { "enrolled" }.into(),
                hold: String::new(),
                verified_at: 0,
                hseq: 0,
            };
            s.write_device(&rec, !exists).map_err(|err| match err {
                Error::Db { detail, .. }
                    if detail.contains("UNIQUE") || detail.contains("duplicate") =>
                {
                    Error::DuplicateDevice(key.clone())
                }
                other => other,
            })?;
            point("enroll: written");
            if let Some(rk) = reset_key {
                s.write_reset_key(&key, rk)?;
            }
            Ok(())
        })
    }

    /// The key sealing stored reset keys: derived from the MAC key (a PRF output
    /// under a label of its own), so it lives nowhere but in the key file.
    fn seal_key(&self) -> Result<[u8; 32]> {
        let h = self.key.mac(
            "reset_keys.seal",
            &[b"hilrig-counters OOB reset-key sealing v1"],
        );
        let v = hex::decode(h).map_err(|e| Error::Input(format!("seal key: {e}")))?;
        v.try_into()
            .map_err(|_| Error::Input("seal key: not 32 bytes".into()))
    }

    fn reset_key_aad(serial: &str) -> Vec<u8> {
        let mut a = b"hilrig-counters reset key v1\0".to_vec();
        a.extend_from_slice(serial.as_bytes());
        a
    }

    /// Seal and store (replacing) a device's reset key, inside a transaction.
    fn write_reset_key(&mut self, serial: &str, rk: &[u8; 32]) -> Result<()> {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        let cipher = chacha20poly1305::ChaCha20Poly1305::new(&self.seal_key()?.into());
        let rnd = hilrig_device::secure::random_key()
            .map_err(|e| Error::Input(format!("random nonce: {e}")))?;
        let nonce = chacha20poly1305::Nonce::from_slice(&rnd[..12]);
        let aad = Self::reset_key_aad(serial);
        let ct = cipher
            .encrypt(nonce, Payload { msg: rk, aad: &aad })
            .map_err(|_| Error::ResetKey {
                serial: serial.to_string(),
                detail: "sealing failed".into(),
            })?;
        let mut sealed = rnd[..12].to_vec();
        sealed.extend_from_slice(&ct);
        let sealed = hex::encode(sealed);
        let at = now_ms();
        let mac = self.key.mac(
            "reset_keys",
            &[serial.as_bytes(), sealed.as_bytes(), &at.to_le_bytes()],
        );
        self.db.exec(
            "DELETE FROM reset_keys WHERE serial = $1",
            &[Val::from(serial)],
        )?;
        self.db.exec(
            "INSERT INTO reset_keys (serial, sealed, at, mac) VALUES ($1, $2, $3, $4)",
            &[
                Val::from(serial),
                Val::Text(sealed),
                Val::I64(at),
                Val::Text(mac),
            ],
        )?;
        Ok(())
    }

    /// Store (or replace) the OOB reset key of an enrolled device, sealed
    /// (ChaCha20-Poly1305 under a key derived from the MAC key, bound to the
    /// serial) and MACed. Never printed, never in `status`, history or exports.
    pub fn set_reset_key(&mut self, serial: u64, rk: &[u8; 32]) -> Result<()> {
        let key = serial_key(serial);
        self.tx(|s| {
            if s.load_raw(&key, false)?.is_none() {
                return Err(Error::UnknownDevice(key.clone()));
            }
            s.write_reset_key(&key, rk)
        })
    }

    /// Store the reset keys of several enrolled devices in one transaction.
    pub fn set_reset_keys(&mut self, keys: &[(u64, [u8; 32])]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        self.tx(|s| {
            for (serial, rk) in keys {
                let key = serial_key(*serial);
                if s.load_raw(&key, false)?.is_none() {
                    return Err(Error::UnknownDevice(key));
                }
                s.write_reset_key(&key, rk)?;
            }
            Ok(())
        })
    }

    /// Whether the service holds a reset key for the device.
    pub fn has_reset_key(&mut self, serial: u64) -> Result<bool> {
        let key = serial_key(serial);
        let rows = self.db.query(
            "SELECT serial FROM reset_keys WHERE serial = $1",
            &[Val::from(key.as_str())],
        )?;
        Ok(!rows.is_empty())
    }

    /// The OOB reset key of a device, unsealed: for the keyed physical reset
    /// (conformance, the rig's OOB power-cycle, remediation). A row edited
    /// outside the service, or a sealed key moved to another serial, is refused.
    pub fn reset_key(&mut self, serial: u64) -> Result<[u8; 32]> {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        let key = serial_key(serial);
        let rows = self.db.query(
            "SELECT sealed, at, mac FROM reset_keys WHERE serial = $1",
            &[Val::from(key.as_str())],
        )?;
        let Some(r) = rows.first() else {
            return Err(Error::NoResetKey(key));
        };
        let bad = |detail: &str| Error::ResetKey {
            serial: key.clone(),
            detail: detail.into(),
        };
        let sealed = r[0].text("sealed")?;
        let at = r[1].i64("at")?;
        let mac = r[2].text("mac")?;
        if !self.key.check(
            "reset_keys",
            &[key.as_bytes(), sealed.as_bytes(), &at.to_le_bytes()],
            &mac,
        ) {
            return Err(bad("MAC mismatch (edited outside the service)"));
        }
        let raw = hex::decode(&sealed).map_err(|_| bad("not hex"))?;
        if raw.len() != 12 + 32 + 16 {
            return Err(bad("wrong length"));
        }
        let cipher = chacha20poly1305::ChaCha20Poly1305::new(&self.seal_key()?.into());
        let aad = Self::reset_key_aad(&key);
        let pt = cipher
            .decrypt(
                chacha20poly1305::Nonce::from_slice(&raw[..12]),
                Payload {
                    msg: &raw[12..],
                    aad: &aad,
                },
            )
            .map_err(|_| bad("does not open (sealed for another device or key)"))?;
        pt.try_into().map_err(|_| bad("not 32 bytes"))
    }

    /// Enrol many devices in one transaction: all or none (bulk provisioning). A
    /// device already enrolled (or listed twice) fails the whole list.
    pub fn enroll_many(&mut self, list: &[Enrollment]) -> Result<()> {
        for e in list {
            for (what, v) in [("host", &e.host), ("rack", &e.rack)] {
                if v.len() > 256 || v.chars().any(|c| c.is_control()) {
                    return Err(Error::Input(format!(
                        "device {}: {what} {v:?}: at most 256 printable characters",
                        serial_key(e.serial)
                    )));
                }
            }
        }
        let rec_of = |e: &Enrollment| DeviceRecord {
            serial: serial_key(e.serial),
            host: e.host.clone(),
            rack: e.rack.clone(),
            state: DeviceState::Unknown,
            expected: e.expected.clone(),
            reason: "enrolled".into(),
            hold: String::new(),
            verified_at: 0,
            hseq: 0,
        };
        if self.db.kind() != "postgresql" {
            return self.tx(|s| {
                for e in list {
                    let key = serial_key(e.serial);
                    if s.load_raw(&key, true)?.is_some() {
                        return Err(Error::DuplicateDevice(key));
                    }
                    s.write_device(&rec_of(e), true)?;
                }
                Ok(())
            });
        }
        // PostgreSQL: a few statements of array parameters, not two round trips a
        // device.
        self.tx(|s| {
            let keys: Vec<String> = list.iter().map(|e| serial_key(e.serial)).collect();
            let mut seen = std::collections::HashSet::with_capacity(keys.len());
            for k in &keys {
                if !seen.insert(k.as_str()) {
                    return Err(Error::DuplicateDevice(k.clone()));
                }
            }
            for chunk in keys.chunks(5000) {
                let rows = s.db.query(
                    "SELECT serial FROM devices WHERE serial = ANY($1) LIMIT 1",
                    &[Val::TextArray(chunk.to_vec())],
                )?;
                if let Some(r) = rows.first() {
                    return Err(Error::DuplicateDevice(r[0].text("serial")?));
                }
            }
            let hseq = s.chain_next()?.0;
            for chunk in list.chunks(5000) {
                let rows: Vec<Vec<Val>> = chunk
                    .iter()
                    .map(|e| {
                        let mut r = rec_of(e);
                        r.hseq = hseq;
                        s.device_params(&r)
                    })
                    .collect();
                let n = rows.len() as u64;
                let params = columns(rows, 17, &DEV_INT_COLS)?;
                let done = s.db.exec(
                    &format!("INSERT INTO devices ({DEV_COLS}) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::bigint[], $16::text[], $17::bigint[])"),
                    &params,
                ).map_err(|err| match err {
                    Error::Db { detail, .. } if detail.contains("duplicate") => {
                        Error::DuplicateDevice("(one of this batch)".into())
                    }
                    other => other,
                })?;
                if done != n {
                    return Err(Error::db("enrolling devices", format!("{done} of {n} rows inserted")));
                }
            }
            Ok(())
        })
    }

    // ---- catalog ---------------------------------------------------------

    fn catalog_mac(&self, region: &str, sha: &str, version: &str, by: &str, at: i64) -> String {
        self.key.mac(
            "catalog",
            &[
                region.as_bytes(),
                sha.as_bytes(),
                version.as_bytes(),
                by.as_bytes(),
                at.to_string().as_bytes(),
            ],
        )
    }

    /// Add a known-good image. A hash of the wrong length, or a duplicate, is an error.
    pub fn catalog_add(
        &mut self,
        region: Region,
        sha256: &str,
        version: &str,
        approved_by: &str,
    ) -> Result<()> {
        let h = hex::encode(parse_hash(sha256)?);
        if approved_by.trim().is_empty() {
            return Err(Error::Input(
                "approved_by must name who approved the image".into(),
            ));
        }
        let at = now_ms();
        let mac = self.catalog_mac(region.name(), &h, version, approved_by, at);
        self.tx(|s| {
            let rows = s.db.query(
                "SELECT sha256 FROM catalog WHERE region = $1 AND sha256 = $2",
                &[region.name().into(), h.clone().into()],
            )?;
            if !rows.is_empty() {
                return Err(Error::DuplicateImage {
                    region: region.name().into(),
                    sha256: h.clone(),
                });
            }
            if s
                .revoked(std::slice::from_ref(&h))?
                .iter()
                .any(|(r, _)| r == region.name())
            {
                return Err(Error::Input(format!(
                    "{region} image {h} was revoked; a revoked image cannot be added again"
                )));
            }
            s.db.exec(
                "INSERT INTO catalog (region, sha256, version, approved_by, added_at, mac) VALUES ($1,$2,$3,$4,$5,$6)",
                &[
                    region.name().into(),
                    h.clone().into(),
                    version.into(),
                    approved_by.into(),
                    Val::I64(at),
                    mac.clone().into(),
                ],
            )?;
            Ok(())
        })
    }

    /// Revoke a known-good image: its catalog row is removed and a MACed tombstone
    /// kept, so a catalog row put back (by hand or by `catalog_add`) stays revoked.
    pub fn catalog_remove(&mut self, region: Region, sha256: &str) -> Result<()> {
        let h = hex::encode(parse_hash(sha256)?);
        self.tx(|s| {
            let n = s.db.exec(
                "DELETE FROM catalog WHERE region = $1 AND sha256 = $2",
                &[region.name().into(), h.clone().into()],
            )?;
            if n == 0 {
                return Err(Error::UnknownImage {
                    region: region.name().into(),
                    sha256: h.clone(),
                });
            }
            let at = now_ms();
            let mac = s.key.mac(
                "revoked",
                &[
                    region.name().as_bytes(),
                    h.as_bytes(),
                    at.to_string().as_bytes(),
                ],
            );
            s.db.exec(
                "INSERT INTO revoked (region, sha256, at, mac) VALUES ($1, $2, $3, $4)",
                &[
                    region.name().into(),
                    h.clone().into(),
                    Val::I64(at),
                    mac.into(),
                ],
            )?;
            Ok(())
        })
    }

    /// Revoked images among `hashes` (region, sha256 hex). A tombstone counts
    /// whatever its MAC says (fail closed: an edited tombstone still revokes).
    fn revoked(&mut self, hashes: &[String]) -> Result<Vec<(String, String)>> {
        let mut params: Vec<Val> = hashes.iter().map(|h| Val::Text(h.clone())).collect();
        params.truncate(3);
        while params.len() < 3 {
            params.push(Val::Text(String::new()));
        }
        let rows = self.db.query(
            "SELECT region, sha256 FROM revoked WHERE sha256 IN ($1, $2, $3)",
            &params,
        )?;
        rows.iter()
            .map(|r| Ok((r[0].text("region")?, r[1].text("sha256")?)))
            .collect()
    }

    fn catalog_rows(&mut self, sql: &str, params: &[Val]) -> Result<Vec<CatalogEntry>> {
        let rows = self.db.query(sql, params)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            if r.len() != 6 {
                continue;
            }
            let region_s = r[0].text("region")?;
            let Some(region) = Region::parse(&region_s) else {
                continue;
            };
            let (sha, version, by, at, mac) = (
                r[1].text("sha256")?,
                r[2].text("version")?,
                r[3].text("approved_by")?,
                r[4].i64("added_at")?,
                r[5].text("mac")?,
            );
            let intact = self.key.check(
                "catalog",
                &[
                    region_s.as_bytes(),
                    sha.as_bytes(),
                    version.as_bytes(),
                    by.as_bytes(),
                    at.to_string().as_bytes(),
                ],
                &mac,
            );
            out.push(CatalogEntry {
                region,
                sha256: sha,
                version,
                approved_by: by,
                added_at: at,
                intact,
            });
        }
        Ok(out)
    }

    /// The catalog.
    pub fn catalog_list(&mut self) -> Result<Vec<CatalogEntry>> {
        self.catalog_rows(
            "SELECT region, sha256, version, approved_by, added_at, mac FROM catalog ORDER BY region, added_at, sha256",
            &[],
        )
    }

    /// Intact catalog entries for the given hashes.
    fn catalog_lookup(&mut self, hashes: &[Hash; 3]) -> Result<Vec<CatalogEntry>> {
        let hs: Vec<Val> = hashes.iter().map(|h| Val::Text(hex::encode(h))).collect();
        let mut cat = self.catalog_rows(
            "SELECT region, sha256, version, approved_by, added_at, mac FROM catalog WHERE sha256 IN ($1, $2, $3)",
            &hs,
        )?;
        if !cat.is_empty() {
            let hx: Vec<String> = hashes.iter().map(hex::encode).collect();
            let gone = self.revoked(&hx)?;
            // A revoked image is never known-good, even if its row came back.
            for c in &mut cat {
                if gone
                    .iter()
                    .any(|(r, h)| r == c.region.name() && *h == c.sha256)
                {
                    c.intact = false;
                }
            }
        }
        Ok(cat)
    }

    // ---- history ---------------------------------------------------------

    fn record_history(
        &mut self,
        serial: &str,
        d: &Decision,
        observed: &str,
        expected: &str,
    ) -> Result<()> {
        let at = now_ms();
        let reasons = serde_json::to_string(&d.reasons).unwrap_or_else(|_| "[]".into());
        let verdict = d.verdict.to_string();
        let sev = d.severity.to_string();
        let rec = (d.recoverable as i64).to_string();
        let (seq, prev) = self.chain_next()?;
        let mac = history_mac(
            &self.key,
            [
                serial,
                &at.to_string(),
                &verdict,
                &sev,
                &rec,
                d.state.name(),
                observed,
                expected,
                &reasons,
            ],
            seq,
            &prev,
        );
        self.head = Some((seq, mac.clone()));
        if self.anchor.is_some() {
            self.anchor_rows
                .push((serial.to_string(), seq, mac.clone()));
        }
        point("history: chained");
        let row = vec![
            serial.into(),
            Val::I64(at),
            verdict.into(),
            sev.into(),
            Val::I64(d.recoverable as i64),
            d.state.name().into(),
            observed.into(),
            expected.into(),
            reasons.into(),
            mac.into(),
            Val::I64(seq),
            prev.into(),
        ];
        if let Some(p) = &mut self.pending_history {
            p.push(row);
            return Ok(());
        }
        self.insert_history(vec![row])
    }

    fn insert_history(&mut self, rows: Vec<Vec<Val>>) -> Result<()> {
        let t = std::time::Instant::now();
        let r = self.insert_history_rows(rows);
        self.history_time = t.elapsed();
        r
    }

    fn insert_history_rows(&mut self, rows: Vec<Vec<Val>>) -> Result<()> {
        if self.db.kind() == "postgresql" && rows.len() > 1 {
            // One statement of 12 array parameters however many rows: parsed and
            // planned once (a prepared generic plan), unlike a VALUES list.
            let params = columns(rows, 12, &[1, 4, 10])?;
            self.db.exec(
                "INSERT INTO history (serial, at, verdict, severity, recoverable, state, observed, expected, reasons, mac, seq, prev) \
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::bigint[], $12::text[])",
                &params,
            )?;
            return Ok(());
        }
        // PostgreSQL: one statement per 1,000 rows (a round trip each); SQLite has no
        // round trips and prefers smaller statements.
        let per = if self.db.kind() == "postgresql" {
            1000
        } else {
            100
        };
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let chunk: Vec<Vec<Val>> = rows.by_ref().take(per).collect();
            let mut sql = String::from(
                "INSERT INTO history (serial, at, verdict, severity, recoverable, state, observed, expected, reasons, mac, seq, prev) VALUES ",
            );
            let mut params = Vec::with_capacity(chunk.len() * 12);
            for (r, row) in chunk.into_iter().enumerate() {
                if r > 0 {
                    sql.push(',');
                }
                sql.push('(');
                for c in 0..12 {
                    if c > 0 {
                        sql.push(',');
                    }
                    sql.push_str(&format!("${}", r * 12 + c + 1));
                }
                sql.push(')');
                params.extend(row);
            }
            self.db.exec(&sql, &params)?;
        }
        Ok(())
    }

    /// Read many device rows (locked for the transaction) in a few queries, and
    /// on PostgreSQL each one's latest history seq and hold and the chain head
    /// (kept for the batch). Also returns the time spent parsing and MAC-checking
    /// the rows.
    #[allow(clippy::type_complexity)]
    fn prefetch(
        &mut self,
        keys: &[String],
    ) -> Result<(
        std::collections::HashMap<String, (DeviceRecord, bool)>,
        std::time::Duration,
    )> {
        let read = read_batch(&mut *self.db, &self.key, keys)?;
        Ok(self.take_read(read, true))
    }

    /// Keep what a [`read_batch`] found for this batch; returns its rows and
    /// check time. `head`: also take its chain head (a read ahead leaves the head
    /// to be read in the batch's own turn, after the batch before it wrote).
    #[allow(clippy::type_complexity)]
    fn take_read(
        &mut self,
        read: BatchRead,
        head: bool,
    ) -> (
        std::collections::HashMap<String, (DeviceRecord, bool)>,
        std::time::Duration,
    ) {
        if let Some(seqs) = &mut self.max_seqs {
            seqs.extend(read.max_seqs);
        }
        if let Some(h) = &mut self.holds {
            h.extend(read.holds);
        }
        if head && self.head.is_none() {
            self.head = read.head;
        }
        if let Some(m) = &mut self.batch_macs {
            m.extend(read.macs);
        }
        (read.rows, read.check)
    }

    /// Stored verdicts, newest first; `serial` filters, `limit` bounds.
    pub fn history(&mut self, serial: Option<u64>, limit: i64) -> Result<Vec<HistoryEntry>> {
        let cols = "id, serial, at, verdict, severity, recoverable, state, observed, expected, reasons, mac, seq, prev";
        let rows = match serial {
            Some(s) => self.db.query(
                &format!("SELECT {cols} FROM history WHERE serial = $1 ORDER BY id DESC LIMIT $2"),
                &[serial_key(s).into(), Val::I64(limit.max(0))],
            )?,
            None => self.db.query(
                &format!("SELECT {cols} FROM history ORDER BY id DESC LIMIT $1"),
                &[Val::I64(limit.max(0))],
            )?,
        };
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            if r.len() != 13 {
                continue;
            }
            let seq = r[11].i64("seq")?;
            let prev = r[12].text("prev")?;
            let serial = r[1].text("serial")?;
            let at = r[2].i64("at")?;
            let verdict = r[3].text("verdict")?;
            let severity = r[4].text("severity")?;
            let recoverable = r[5].i64("recoverable")?;
            let state = r[6].text("state")?;
            let observed = r[7].text("observed")?;
            let expected = r[8].text("expected")?;
            let reasons_s = r[9].text("reasons")?;
            let mac = r[10].text("mac")?;
            let want = history_mac(
                &self.key,
                [
                    &serial,
                    &at.to_string(),
                    &verdict,
                    &severity,
                    &recoverable.to_string(),
                    &state,
                    &observed,
                    &expected,
                    &reasons_s,
                ],
                seq,
                &prev,
            );
            let intact = want.len() == mac.len()
                && want
                    .bytes()
                    .zip(mac.bytes())
                    .fold(0u8, |a, (x, y)| a | (x ^ y))
                    == 0;
            out.push(HistoryEntry {
                id: r[0].i64("id")?,
                serial,
                at,
                verdict,
                severity,
                recoverable: recoverable != 0,
                state,
                observed,
                expected,
                reasons: serde_json::from_str(&reasons_s).unwrap_or_else(|_| vec![reasons_s]),
                intact,
            });
        }
        Ok(out)
    }

    // ---- intents ---------------------------------------------------------

    /// MAC of an intent row; `text` = [serial, region, target, status],
    /// `nums` = [id, created_at, closed_at].
    fn intent_mac(&self, text: [&str; 4], nums: [i64; 3]) -> String {
        let [serial, region, target, status] = text;
        let [id, created, closed] = nums;
        self.key.mac(
            "intents",
            &[
                id.to_string().as_bytes(),
                serial.as_bytes(),
                region.as_bytes(),
                target.as_bytes(),
                created.to_string().as_bytes(),
                status.as_bytes(),
                closed.to_string().as_bytes(),
            ],
        )
    }

    /// Open intents of a device; Err(Tampered) if any row fails its MAC.
    fn open_intents(&mut self, serial: &str) -> Result<Vec<Intent>> {
        let rows = self.db.query(
            "SELECT id, region, target, created_at, status, closed_at, mac FROM intents WHERE serial = $1 AND status = 'open' ORDER BY id",
            &[serial.into()],
        )?;
        let mut out = Vec::new();
        for r in rows {
            if r.len() != 7 {
                continue;
            }
            // A row whose columns do not even parse (SQLite keeps any type in
            // any column) was edited outside the service: tampered, as one that
            // fails its MAC (never an error that leaves the device as it was).
            let parsed = (|| -> Result<_> {
                Ok((
                    r[0].i64("id")?,
                    r[1].text("region")?,
                    r[2].text("target")?,
                    r[3].i64("created_at")?,
                    r[4].text("status")?,
                    r[5].i64("closed_at")?,
                    r[6].text("mac")?,
                ))
            })();
            let Ok((id, region_s, target_s, created, status, closed, mac)) = parsed else {
                return Err(Error::Tampered {
                    table: "intents",
                    row: match &r[0] {
                        Val::I64(id) => id.to_string(),
                        other => format!("{other:?}"),
                    },
                });
            };
            let want = self.intent_mac(
                [serial, &region_s, &target_s, &status],
                [id, created, closed],
            );
            let tampered = || Error::Tampered {
                table: "intents",
                row: id.to_string(),
            };
            if want != mac {
                return Err(tampered());
            }
            let region = Region::parse(&region_s).ok_or_else(tampered)?;
            let target = parse_hash(&target_s).map_err(|_| tampered())?;
            out.push(Intent { id, region, target });
        }
        Ok(out)
    }

    fn close_intent(&mut self, serial: &str, it: &Intent, outcome: IntentOutcome) -> Result<()> {
        let rows = self.db.query(
            "SELECT created_at FROM intents WHERE id = $1",
            &[Val::I64(it.id)],
        )?;
        let created = match rows.first().and_then(|r| r.first()) {
            Some(v) => v.i64("created_at")?,
            None => return Ok(()),
        };
        let closed = now_ms();
        let target = hex::encode(it.target);
        let mac = self.intent_mac(
            [serial, it.region.name(), &target, outcome.name()],
            [it.id, created, closed],
        );
        self.db.exec(
            "UPDATE intents SET status = $2, closed_at = $3, mac = $4 WHERE id = $1",
            &[
                Val::I64(it.id),
                outcome.name().into(),
                Val::I64(closed),
                mac.into(),
            ],
        )?;
        Ok(())
    }

    fn update_log_mac(&self, f: [&str; 4], prev: &str) -> String {
        let mut fields: Vec<&[u8]> = f.iter().map(|x| x.as_bytes()).collect();
        if !prev.is_empty() {
            fields.push(prev.as_bytes());
        }
        self.key.mac("update_log", &fields)
    }

    /// The device's rate-limit log, checked: attempts begun since `since`, plus every
    /// entry that fails its MAC or breaks the chain (a tampered entry counts as an
    /// attempt, whatever its time or outcome says). Returns (count, last MAC).
    fn rate_log(&mut self, serial: &str, since: i64) -> Result<(i64, String)> {
        let rows = self.db.query(
            "SELECT at, region, outcome, mac, prev FROM update_log WHERE serial = $1 ORDER BY id",
            &[Val::from(serial)],
        )?;
        let mut count = 0;
        let mut last = String::new();
        for r in rows {
            let (at, region, outcome, mac, prev) = (
                r[0].i64("at").unwrap_or(i64::MAX),
                r[1].text("region").unwrap_or_default(),
                r[2].text("outcome").unwrap_or_default(),
                r[3].text("mac").unwrap_or_default(),
                r[4].text("prev").unwrap_or_default(),
            );
            let want = self.update_log_mac([serial, &at.to_string(), &region, &outcome], &prev);
            // Chained entries name the previous entry's MAC ("genesis" first).
            let chained = prev.is_empty() || prev == last || (last.is_empty() && prev == "genesis");
            if !chained {
                // Entries are missing before this one: at least one attempt.
                count += 1;
            }
            if want != mac || (at > since && outcome == "begun") {
                count += 1;
            }
            last = mac;
        }
        Ok((count, last))
    }

    fn rate_count(&mut self, serial: &str, since: i64) -> Result<i64> {
        Ok(self.rate_log(serial, since)?.0)
    }

    fn log_update(&mut self, serial: &str, region: Region, outcome: &str) -> Result<()> {
        let at = now_ms();
        let (_, last) = self.rate_log(serial, i64::MAX)?;
        let prev = if last.is_empty() {
            "genesis".to_string()
        } else {
            last
        };
        let mac = self.update_log_mac([serial, &at.to_string(), region.name(), outcome], &prev);
        self.db.exec(
            "INSERT INTO update_log (serial, at, region, outcome, mac, prev) VALUES ($1,$2,$3,$4,$5,$6)",
            &[
                serial.into(),
                Val::I64(at),
                region.name().into(),
                outcome.into(),
                mac.into(),
                prev.into(),
            ],
        )?;
        Ok(())
    }

    /// Record the intent to flash `region` of a device with the catalog image
    /// `target`, BEFORE flashing. Refused for an unknown device, a held device, an
    /// image not in the catalog, or past the rate limit. The device is not trusted
    /// again until a verify (or [`Service::commit_update`]) passes.
    pub fn begin_update(&mut self, serial: u64, region: Region, target: &str) -> Result<i64> {
        let key = serial_key(serial);
        let target_h = parse_hash(target)?;
        let target_s = hex::encode(target_h);
        let limit = self.rate_limit;
        self.tx(|s| {
            point("begin_update: start");
            let (mut rec, intact) = s
                .load_raw(&key, true)?
                .ok_or_else(|| Error::UnknownDevice(key.clone()))?;
            if !intact {
                return Err(Error::Tampered { table: "devices", row: key.clone() });
            }
            if !rec.hold.is_empty() {
                return Err(Error::Update {
                    serial: key.clone(),
                    detail: format!("device is held in quarantine: {}", rec.hold),
                });
            }
            if rec.state == DeviceState::Locked {
                return Err(Error::Update {
                    serial: key.clone(),
                    detail: "the device is locked (fuse blown): every flash command would be refused; page a human".into(),
                });
            }
            let cat = s.catalog_lookup(&[target_h; 3])?;
            if !cat.iter().any(|c| c.intact && c.region == region && c.sha256 == target_s) {
                return Err(Error::Update {
                    serial: key.clone(),
                    detail: format!("{region} image {target_s} is not in the catalog"),
                });
            }
            let since = now_ms().saturating_sub(limit.window_s.saturating_mul(1000));
            let count = s.rate_count(&key, since)?;
            if count >= limit.max {
                return Err(Error::RateLimited {
                    serial: key.clone(),
                    count,
                    limit: limit.max,
                    window_s: limit.window_s,
                });
            }
            point("begin_update: checked");
            let created = now_ms();
            s.db.exec(
                "INSERT INTO intents (serial, region, target, created_at, status, closed_at, mac) VALUES ($1,$2,$3,$4,'open',0,'')",
                &[key.clone().into(), region.name().into(), target_s.clone().into(), Val::I64(created)],
            )?;
            let rows = s.db.query(
                "SELECT MAX(id) FROM intents WHERE serial = $1",
                &[key.clone().into()],
            )?;
            let id = match rows.first().and_then(|r| r.first()) {
                Some(v) => v.i64("id")?,
                None => return Err(Error::db("recording the intent", "no id")),
            };
            let mac = s.intent_mac([&key, region.name(), &target_s, "open"], [id, created, 0]);
            s.db.exec("UPDATE intents SET mac = $2 WHERE id = $1", &[Val::I64(id), mac.into()])?;
            point("begin_update: intent");
            s.log_update(&key, region, "begun")?;
            if rec.state == DeviceState::Trusted {
                rec.state = DeviceState::Unknown;
            }
            rec.reason = format!("update {id} of {region} in progress");
            s.write_device(&rec, false)?;
            point("begin_update: device");
            Ok(id)
        })
    }

    /// After flashing: read the device and close intent `id` if the region holds the
    /// intended image (the same decision a verify makes, so a crash between flashing
    /// and this call is resolved by the next verify).
    pub fn commit_update(
        &mut self,
        serial: u64,
        id: i64,
        source: &mut dyn CounterSource,
    ) -> Result<VerifyReport> {
        let key = serial_key(serial);
        let open = self.open_intents(&key)?;
        if !open.iter().any(|i| i.id == id) {
            return Err(Error::UnknownIntent { serial: key, id });
        }
        let mut rep = self.verify(serial, source)?;
        if !rep
            .decision
            .intents
            .iter()
            .any(|(i, o)| *i == id && *o == IntentOutcome::Committed)
        {
            rep.decision.reasons.push(format!(
                "intent {id} not committed: the device does not hold its image"
            ));
        }
        Ok(rep)
    }

    // ---- verify ----------------------------------------------------------

    /// Read the device through `source` and decide. Fail closed: an unreadable
    /// device is recorded as `unverifiable`, never trusted. Err only when the device
    /// is not enrolled or the database itself fails (also never trusted).
    pub fn verify(&mut self, serial: u64, source: &mut dyn CounterSource) -> Result<VerifyReport> {
        let key = serial_key(serial);
        // Compare-and-swap on the device record: note it before reading the device;
        // if another process changes it before our transaction and the observation
        // then looks like a rollback, it is older than the stored state: read again.
        for _ in 0..3 {
            let before = match self.load_raw(&key, false)? {
                Some((rec, true)) => Some(self.device_mac(&rec)),
                _ => None,
            };
            let obs = Self::observe(serial, source);
            self.stale_check = before;
            self.stale_seen = false;
            let r = self.tx(|s| s.verify_in_tx(&key, obs));
            self.stale_check = None;
            self.stale_seen = false;
            match r {
                Err(Error::Stale(_)) => continue,
                other => return other,
            }
        }
        self.verify_observation(serial, Err(Error::Stale(key)))
    }

    fn observe(serial: u64, source: &mut dyn CounterSource) -> Result<Observation> {
        let obs = (|| {
            let id = source.serial()?;
            if id != serial {
                return Err(Error::Source {
                    source_name: source.name(),
                    detail: format!(
                        "the device there identifies as {}, not {}",
                        serial_key(id),
                        serial_key(serial)
                    ),
                });
            }
            source.observe()
        })();
        point("verify: observed");
        obs
    }

    /// Decide on an observation already read (or the error that prevented it).
    pub fn verify_observation(
        &mut self,
        serial: u64,
        obs: std::result::Result<Observation, Error>,
    ) -> Result<VerifyReport> {
        let key = serial_key(serial);
        self.tx(|s| s.verify_in_tx(&key, obs))
    }

    /// Verify many devices in one transaction (a rack after a campaign; the benchmark).
    /// Every device must be enrolled: an unknown one fails the whole batch (nothing
    /// is stored). Rows are read up front and history rows written together, so a
    /// batch costs few round trips on PostgreSQL.
    ///
    /// On PostgreSQL the rows are read without locks and written back in one
    /// `UPDATE` that compares and swaps on each row's MAC as read: a row another
    /// process changed meanwhile makes the whole batch roll back and run again
    /// (3 tries, then [`Error::Stale`]).
    pub fn verify_batch(&mut self, items: &[(u64, Observation)]) -> Result<Vec<VerifyReport>> {
        self.verify_batch_ahead(items, &[])
    }

    /// Give the service a second connection to the same PostgreSQL database (the
    /// same URL and schema), on which [`Service::verify_batch_ahead`] reads the
    /// next batch's rows while the current batch writes. Rows read there are
    /// trusted no more than rows read on the main connection: MAC-checked, and
    /// written back only by compare-and-swap on the MAC as read.
    pub fn set_read_ahead(&mut self, db: Box<dyn Db>) -> Result<()> {
        if self.db.kind() != "postgresql" || db.kind() != "postgresql" {
            return Err(Error::Input(
                "reading ahead needs a second connection to the same PostgreSQL database".into(),
            ));
        }
        self.read_ahead = Some(db);
        self.ahead = None;
        Ok(())
    }

    /// [`Service::verify_batch`] of `items`; with a read-ahead connection
    /// ([`Service::set_read_ahead`]), `next` (the batch the caller verifies
    /// next, none of its serials in `items`) has its rows read on that connection
    /// while this batch writes, and the next call with those serials starts from
    /// them. Its chain head is read in its own turn, and its rows are written
    /// back by compare-and-swap: a row another process changed meanwhile makes
    /// that batch run again on fresh rows, as in [`Service::verify_batch`].
    pub fn verify_batch_ahead(
        &mut self,
        items: &[(u64, Observation)],
        next: &[(u64, Observation)],
    ) -> Result<Vec<VerifyReport>> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.verify_batch_once(items, next) {
                Err(Error::Stale(_)) if tries < 3 => continue,
                other => return other,
            }
        }
    }

    fn verify_batch_once(
        &mut self,
        items: &[(u64, Observation)],
        next: &[(u64, Observation)],
    ) -> Result<Vec<VerifyReport>> {
        let keys: Vec<String> = items.iter().map(|(k, _)| serial_key(*k)).collect();
        // Rows read ahead for exactly this batch (taken once: a run again after a
        // lost race reads afresh).
        let mut ahead = self.ahead.take().filter(|(k, _)| *k == keys).map(|a| a.1);
        // The next batch is read ahead only if it shares no device with this one
        // (this batch's writes would make its rows stale).
        let next_keys: Vec<String> = if self.read_ahead.is_some() && !next.is_empty() {
            let mine: std::collections::HashSet<&String> = keys.iter().collect();
            let nk: Vec<String> = next.iter().map(|(k, _)| serial_key(*k)).collect();
            if nk.iter().any(|k| mine.contains(k)) {
                Vec::new()
            } else {
                nk
            }
        } else {
            Vec::new()
        };
        if self.db.kind() == "postgresql" {
            self.batch_macs = Some(std::collections::HashMap::with_capacity(items.len()));
        }
        let mut prof = BatchProfile {
            batches: 1,
            devices: items.len() as u64,
            ..BatchProfile::default()
        };
        // PostgreSQL: the rows are read without locks and written back in one
        // statement that compares and swaps (atomic by itself): no BEGIN/COMMIT
        // round trips unless a device needs another write (a hold, evidence, a
        // closed intent), which then sends BEGIN first.
        let deferred = self.db.kind() == "postgresql";
        self.history_time = std::time::Duration::ZERO;
        let mut next_ahead = None;
        let r = self.tx_as(deferred, |s| {
            let t_read = std::time::Instant::now();
            let pg = s.db.kind() == "postgresql";
            // PostgreSQL reads each device's latest history seq with its row.
            s.max_seqs = Some(std::collections::HashMap::with_capacity(keys.len()));
            if pg {
                s.holds = Some(std::collections::HashMap::new());
            }
            // The anchor's entries before the rows (rows read ahead came
            // before them: see `rows_read_ahead`).
            s.rows_read_ahead = ahead.is_some();
            if s.anchor.is_some() {
                s.anchor_entries = Some(s.read_anchor_entries(&keys)?);
            }
            let (pre, check) = match ahead.take() {
                Some(read) => s.take_read(read, false),
                None => s.prefetch(&keys)?,
            };
            prof.read_check = check;
            s.prefetched = Some(pre);
            if !pg {
                let mut holds = std::collections::HashMap::new();
                for r in s.db.query("SELECT serial, reason FROM holds", &[])? {
                    if let (Ok(k), Ok(v)) = (r[0].text("serial"), r[1].text("reason")) {
                        holds.insert(k, v);
                    }
                }
                s.holds = Some(holds);
            }
            let mut seqs = s.max_seqs.take().unwrap_or_default();
            for chunk in keys.chunks(1000) {
                if pg {
                    break;
                }
                let list: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
                let sql = format!(
                    "SELECT serial, MAX(seq) FROM history WHERE serial IN ({}) GROUP BY serial",
                    list.join(",")
                );
                let params: Vec<Val> = chunk.iter().map(|k| Val::Text(k.clone())).collect();
                for r in s.db.query(&sql, &params)? {
                    if let (Ok(k), Val::I64(v)) = (r[0].text("serial"), &r[1]) {
                        seqs.insert(k, *v);
                    }
                }
            }
            s.max_seqs = Some(seqs);
            s.pending_history = Some(Vec::with_capacity(items.len()));
            if pg {
                // One round trip per 1,000 rows instead of one per device.
                s.pending_devices = Some(Vec::with_capacity(items.len()));
            }
            prof.read = t_read.elapsed();
            let t_decide = std::time::Instant::now();
            let mut out = Vec::with_capacity(items.len());
            for (key, (_, obs)) in keys.iter().zip(items) {
                out.push(s.verify_in_tx(key, Ok(obs.clone()))?);
            }
            s.prefetched = None;
            let rows = s.pending_history.take().unwrap_or_default();
            prof.decide = t_decide.elapsed();
            if let Some(h) = &mut s.batch_hook {
                h();
            }
            let t_write = std::time::Instant::now();
            if let Some(devs) = s.pending_devices.take() {
                // PostgreSQL: the device rows (compare-and-swap) and the history
                // rows in one statement, one round trip; meanwhile the next
                // batch's rows are read on the read-ahead connection.
                match s.read_ahead.take() {
                    Some(mut db) if !next_keys.is_empty() => {
                        let key = s.key.clone();
                        let (w, r) = std::thread::scope(|sc| {
                            let h = sc.spawn(|| read_batch(&mut *db, &key, &next_keys));
                            let w = s.update_devices(devs, rows);
                            (w, h.join())
                        });
                        s.read_ahead = Some(db);
                        w?;
                        // A failed read ahead costs nothing: the next batch
                        // reads its rows itself.
                        if let Ok(Ok(read)) = r {
                            next_ahead = Some((next_keys, read));
                        }
                    }
                    db => {
                        s.read_ahead = db;
                        s.update_devices(devs, rows)?;
                    }
                }
            } else {
                s.insert_history(rows)?;
            }
            prof.write = t_write.elapsed();
            point("verify_batch: history");
            Ok(out)
        });
        prof.begin = self.tx_times.0;
        prof.commit = self.tx_times.1;
        let p = &mut self.profile;
        p.batches += prof.batches;
        p.devices += prof.devices;
        p.begin += prof.begin;
        p.read += prof.read;
        p.read_check += prof.read_check;
        p.decide += prof.decide;
        p.write += prof.write;
        p.write_history += self.history_time;
        p.commit += prof.commit;
        self.prefetched = None;
        self.pending_history = None;
        self.holds = None;
        self.max_seqs = None;
        self.pending_devices = None;
        self.batch_macs = None;
        self.anchor_entries = None;
        self.rows_read_ahead = false;
        if r.is_ok() {
            self.ahead = next_ahead;
        }
        r
    }

    /// Update many device rows and append `history` rows (PostgreSQL) in one
    /// statement: the device rows by `UPDATE ... FROM unnest(arrays)`, comparing
    /// and swapping on each row's MAC as read, the history rows by `INSERT ...
    /// SELECT unnest(arrays)`, in one `WITH`. A row another process changed
    /// since it was read, or a history chain that moved on, keeps nothing:
    /// [`Error::Stale`].
    ///
    /// Host and rack are not written (a verify never changes them; the
    /// compare-and-swap on the MAC, which covers them, guarantees the stored ones
    /// are those read), nor a region hash equal to the one read (sent as '', a
    /// hash is never empty): less to send and to unpack per row.
    fn update_devices(
        &mut self,
        rows: Vec<(DeviceRecord, String)>,
        history: Vec<Vec<Val>>,
    ) -> Result<()> {
        // The last write of each device wins (a device verified twice in a batch).
        let mut last = std::collections::HashMap::with_capacity(rows.len());
        for (i, (r, _)) in rows.iter().enumerate() {
            last.insert(r.serial.clone(), i);
        }
        let macs = self.batch_macs.take().unwrap_or_default();
        let n = last.len();
        let mut serial = Vec::with_capacity(n);
        let mut state = Vec::with_capacity(n);
        let mut ints: [Vec<i64>; 5] = Default::default();
        let mut hs: [Vec<String>; 3] = Default::default();
        let mut reason = Vec::with_capacity(n);
        let mut hold = Vec::with_capacity(n);
        let mut verified_at = Vec::with_capacity(n);
        let mut mac = Vec::with_capacity(n);
        let mut hseq = Vec::with_capacity(n);
        let mut old = Vec::with_capacity(n);
        for (i, (r, m)) in rows.into_iter().enumerate() {
            if last.get(&r.serial) != Some(&i) {
                continue;
            }
            // Each row's MAC as read: the compare in the compare-and-swap (a row
            // not read in this batch matches nothing: Stale).
            let (was_mac, was_h) = match macs.get(&r.serial) {
                Some((m, h)) => (m.clone(), Some(*h)),
                None => (String::new(), None),
            };
            let e = &r.expected;
            for (k, v) in [
                e.counters[0],
                e.counters[1],
                e.counters[2],
                e.master,
                e.epoch,
            ]
            .into_iter()
            .enumerate()
            {
                ints[k].push(v as i64);
            }
            for (k, h) in e.hashes.iter().enumerate() {
                hs[k].push(if was_h.map(|w| w[k]) == Some(*h) {
                    String::new()
                } else {
                    hex32(h)
                });
            }
            state.push(r.state.name().to_string());
            verified_at.push(r.verified_at);
            hseq.push(r.hseq);
            reason.push(r.reason);
            hold.push(r.hold);
            serial.push(r.serial);
            mac.push(m);
            old.push(was_mac);
        }
        let [c0, c1, c2, master, epoch] = ints;
        let [h0, h1, h2] = hs;
        let nh = history.len() as i64;
        let mut params = vec![
            Val::TextArray(serial),
            Val::TextArray(state),
            Val::I64Array(c0),
            Val::I64Array(c1),
            Val::I64Array(c2),
            Val::I64Array(master),
            Val::I64Array(epoch),
            Val::TextArray(h0),
            Val::TextArray(h1),
            Val::TextArray(h2),
            Val::TextArray(reason),
            Val::TextArray(hold),
            Val::I64Array(verified_at),
            Val::TextArray(mac),
            Val::I64Array(hseq),
            Val::TextArray(old),
            Val::I64(n as i64),
        ];
        params.extend(columns(history, 12, &[1, 4, 10])?);
        // One statement: atomic by itself (it may run outside BEGIN/COMMIT), so a
        // lost compare-and-swap must fail it whole: the cast of the "stale batch"
        // text raises an error and nothing of it is kept.
        let got = self
            .db
            .query(
                "WITH u AS (UPDATE devices AS d SET state=v.state, c0=v.c0, c1=v.c1, c2=v.c2, master=v.master, epoch=v.epoch, \
                 h0=CASE WHEN v.h0 = '' THEN d.h0 ELSE v.h0 END, h1=CASE WHEN v.h1 = '' THEN d.h1 ELSE v.h1 END, h2=CASE WHEN v.h2 = '' THEN d.h2 ELSE v.h2 END, \
                 reason=v.reason, hold=v.hold, verified_at=v.verified_at, mac=v.mac, hseq=v.hseq \
                 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::bigint[], $14::text[], $15::bigint[], $16::text[]) \
                 AS v(serial, state, c0, c1, c2, master, epoch, h0, h1, h2, reason, hold, verified_at, mac, hseq, old) WHERE d.serial = v.serial AND d.mac = v.old RETURNING 1), \
                 h AS (INSERT INTO history (serial, at, verdict, severity, recoverable, state, observed, expected, reasons, mac, seq, prev) \
                 SELECT * FROM unnest($18::text[], $19::bigint[], $20::text[], $21::text[], $22::bigint[], $23::text[], $24::text[], $25::text[], $26::text[], $27::text[], $28::bigint[], $29::text[]) RETURNING 1), \
                 c AS (SELECT (SELECT COUNT(*) FROM u) AS nu, (SELECT COUNT(*) FROM h) AS nh) \
                 SELECT nu, nh, CASE WHEN nu = $17::bigint THEN 0 ELSE ('stale batch: ' || ($17::bigint - nu) || ' of ' || $17::bigint || ' device rows changed since they were read')::int END FROM c",
                &params,
            )
            .map_err(|e| match e {
                Error::Db { detail, .. } if detail.contains("stale batch") => {
                    // A row changed (or went) since it was read: nothing of this
                    // batch is kept; the caller runs it again on fresh rows.
                    Error::Stale(detail)
                }
                // Another process appended to the history chain since its head
                // was read: our sequence numbers are taken. Run the batch again.
                Error::Db { detail, .. } if detail.contains("history_seq") => {
                    Error::Stale("the history chain moved on during the batch".into())
                }
                other => other,
            })?;
        let (done, hdone) = match got.first() {
            Some(r) if r.len() == 3 => (r[0].i64("updated")?, r[1].i64("inserted")?),
            _ => return Err(Error::db("writing a batch", "no counts returned")),
        };
        if done != n as i64 || hdone != nh {
            return Err(Error::db(
                "writing a batch",
                format!("{done} of {n} device rows and {hdone} of {nh} history rows written"),
            ));
        }
        Ok(())
    }

    fn verify_in_tx(
        &mut self,
        key: &str,
        obs: std::result::Result<Observation, Error>,
    ) -> Result<VerifyReport> {
        point("verify: start");
        // The anchor entry before the row (a batch read them all before its rows).
        let (anchored, batch) = match self.anchor_entries.take() {
            Some(e) => (e, true),
            None => (self.read_anchor_entries(&[key.to_string()])?, false),
        };
        let r = self.verify_anchored(key, obs, &anchored);
        if batch {
            self.anchor_entries = Some(anchored);
        }
        r
    }

    fn verify_anchored(
        &mut self,
        key: &str,
        obs: std::result::Result<Observation, Error>,
        anchored: &AnchorEntries,
    ) -> Result<VerifyReport> {
        let (mut rec, intact) = self
            .load_raw(key, true)?
            .ok_or_else(|| Error::UnknownDevice(key.to_string()))?;
        let mut replayed_row: Option<String> = None;
        // A device row older than its own history is a replayed row (its MAC is
        // valid, but it is not the latest): treated as tampered.
        let intact = if intact {
            let latest = match self.max_seqs.as_ref() {
                Some(m) => m.get(key).copied().unwrap_or(0),
                None => {
                    let rows = self.db.query(
                        "SELECT MAX(seq) FROM history WHERE serial = $1",
                        &[Val::from(key)],
                    )?;
                    match rows.first().and_then(|r| r.first()) {
                        Some(Val::I64(v)) => *v,
                        _ => 0,
                    }
                }
            };
            if latest > rec.hseq {
                replayed_row = Some(format!(
                    "device record {key} is older than its history (row written at history {}, latest history {latest}): a replayed row",
                    rec.hseq
                ));
                false
            } else if let Some(why) = self.anchored_device_fault(key, rec.hseq, anchored) {
                if self.rows_read_ahead {
                    // Read before the anchor entry: maybe only stale.
                    return Err(Error::Stale(key.to_string()));
                }
                replayed_row = Some(why);
                false
            } else {
                true
            }
        } else {
            false
        };
        // A hold kept outside the device row (set when the row itself could not be
        // trusted, so it was not rewritten): a row put back afterwards stays held.
        if intact && rec.hold.is_empty() {
            if let Some(h) = self.hold_for(key)? {
                rec.hold = h;
            }
        }
        if let (Some(before), true) = (&self.stale_check, intact) {
            let now = self.device_mac(&rec);
            if &now != before {
                self.stale_seen = true;
            }
        }
        let expected_before = rec.expected.clone();
        let expected_json = serde_json::to_string(&rec.expected).unwrap_or_default();
        // History keeps the observation; "same" when it equals the expected values
        // (the common case), "" when the device could not be read.
        let observed_json = match &obs {
            Ok(o) if o.as_expected() == rec.expected && !o.report.fuse => "same".to_string(),
            Ok(o) => serde_json::to_string(o).unwrap_or_default(),
            Err(_) => String::new(),
        };
        let mut d = if let Some(why) = &replayed_row {
            Decision::tampered(format!("{why}; held until re-enrolled"))
        } else if !intact {
            Decision::tampered(format!(
                "device record {key}: MAC mismatch (edited outside the service); held until re-enrolled"
            ))
        } else if !rec.hold.is_empty() && rec.state == DeviceState::NeedsReview {
            Decision::needs_review(format!(
                "held for review: {}; clear with `hilrig counters hold clear {key} --reason ...` or reflash with `hilrig counters remediate {key}`",
                rec.hold
            ))
        } else if !rec.hold.is_empty() {
            let mut d = Decision::tampered(format!("held in quarantine: {}", rec.hold));
            d.reasons
                .push("re-enrol the device (--replace) after investigating".into());
            d
        } else {
            match &obs {
                Err(e) => Decision::unverifiable(format!("device could not be read: {e}")),
                Ok(o) => match self.decide_for(key, &rec.expected, o) {
                    Ok(d) => d,
                    Err(Error::Tampered { table, row }) => Decision::tampered(format!(
                        "{table} row {row}: MAC mismatch (edited outside the service); held until re-enrolled"
                    )),
                    Err(e) => return Err(e),
                },
            }
        };
        if let Some(note) = &self.clear_note {
            d.reasons.insert(0, note.clone());
        }
        point("verify: decided");
        // Apply.
        let old_state = rec.state;
        // Tampering, rollback and a bypassed counter hold the device until an
        // operator re-enrols it (the stored values are kept for the investigation).
        if rec.hold.is_empty()
            && (!intact
                || d.verdict == Verdict::RolledBack
                || (d.verdict == Verdict::Quarantined && !d.recoverable))
        {
            rec.hold = d.reasons.join("; ");
        }
        // Counters that rose with no authorised intent (require_intents): held for
        // review, the hold also kept beside the row, the observation as evidence.
        let review_hold = d.state == DeviceState::NeedsReview && rec.hold.is_empty() && intact;
        if review_hold {
            rec.hold = d.reasons.join("; ");
        }
        rec.state = match d.verdict {
            // Fail closed, but never soften a worse state.
            Verdict::Unverifiable => match old_state {
                DeviceState::Quarantined
                | DeviceState::Locked
                | DeviceState::NeedsReflash
                | DeviceState::NeedsReview => old_state,
                _ => DeviceState::Unknown,
            },
            _ => d.state,
        };
        d.state = rec.state;
        if d.rebaseline {
            if let Ok(o) = &obs {
                rec.expected = o.as_expected();
            }
        }
        if rec.state == DeviceState::Trusted {
            rec.verified_at = now_ms();
        }
        rec.reason = if d.reasons.is_empty() {
            d.verdict.to_string()
        } else {
            format!("{}: {}", d.verdict, d.reasons.join("; "))
        };
        if self.stale_seen
            && (d.verdict == Verdict::RolledBack
                || (d.verdict == Verdict::Quarantined && !d.recoverable))
        {
            // The observation was read before another process committed a change to
            // this device (an authorised update): it is older than the stored state.
            // Write nothing; the caller reads the device again.
            return Err(Error::Stale(key.to_string()));
        }
        if intact {
            self.write_device(&rec, false)?;
            if review_hold {
                self.set_hold(key, &rec.hold)?;
                self.keep_evidence("observation", key, &observed_json, &rec.reason)?;
            }
        } else {
            self.keep_row_as_found(key, &rec.reason)?;
            rec.state = DeviceState::Quarantined;
        }
        point("verify: device written");
        if intact && !d.intents.is_empty() {
            let open = self.open_intents(key)?;
            for (id, outcome) in d.intents.clone() {
                if let Some(it) = open.iter().find(|i| i.id == id) {
                    self.close_intent(key, it, outcome)?;
                    point("verify: intent closed");
                }
            }
        }
        self.record_history(key, &d, &observed_json, &expected_json)?;
        point("verify: history");
        Ok(VerifyReport {
            serial: key.to_string(),
            decision: d,
            observed: obs.ok(),
            expected: Some(expected_before),
        })
    }

    /// A device row that fails its MAC, does not parse or is replayed is never
    /// rewritten: it is kept as found in the evidence table, and the hold (with
    /// `reason`) lives beside it.
    fn keep_row_as_found(&mut self, key: &str, reason: &str) -> Result<()> {
        self.last_raw = None;
        let raw = self.db.query(
            &format!("SELECT {DEV_COLS} FROM devices WHERE serial = $1"),
            &[Val::from(key)],
        )?;
        let found = raw.first().map(|r| row_as_found(r)).unwrap_or_default();
        self.keep_evidence("devices", key, &found, reason)?;
        self.set_hold(key, reason)
    }

    fn hold_for(&mut self, key: &str) -> Result<Option<String>> {
        if let Some(h) = &self.holds {
            return Ok(h.get(key).cloned());
        }
        let rows = self.db.query(
            "SELECT reason FROM holds WHERE serial = $1",
            &[Val::from(key)],
        )?;
        match rows.first().and_then(|r| r.first()) {
            // Whatever the row says (even if edited), the device is held.
            Some(v) => Ok(Some(v.text("reason").unwrap_or_else(|_| "held".into()))),
            None => Ok(None),
        }
    }

    fn set_hold(&mut self, key: &str, reason: &str) -> Result<()> {
        if self.hold_for(key)?.is_some() {
            return Ok(());
        }
        let at = now_ms();
        let mac = self.key.mac(
            "holds",
            &[key.as_bytes(), reason.as_bytes(), at.to_string().as_bytes()],
        );
        self.db.exec(
            "INSERT INTO holds (serial, reason, at, mac) VALUES ($1, $2, $3, $4)",
            &[
                Val::from(key),
                Val::from(reason),
                Val::I64(at),
                Val::Text(mac),
            ],
        )?;
        if let Some(h) = &mut self.holds {
            h.insert(key.to_string(), reason.to_string());
        }
        Ok(())
    }

    fn keep_evidence(&mut self, table: &str, key: &str, found: &str, reason: &str) -> Result<()> {
        let rows = self.db.query(
            "SELECT id FROM evidence WHERE tbl = $1 AND row_key = $2 AND found = $3",
            &[Val::from(table), Val::from(key), Val::from(found)],
        )?;
        if rows.is_empty() {
            self.db.exec(
                "INSERT INTO evidence (tbl, row_key, found, at, reason) VALUES ($1, $2, $3, $4, $5)",
                &[
                    Val::from(table),
                    Val::from(key),
                    Val::from(found),
                    Val::I64(now_ms()),
                    Val::from(reason),
                ],
            )?;
        }
        Ok(())
    }

    /// Rows kept as evidence: (table, row key, the row as found, JSON), oldest first.
    pub fn evidence(&mut self) -> Result<Vec<(String, String, String)>> {
        let rows = self
            .db
            .query("SELECT tbl, row_key, found FROM evidence ORDER BY id", &[])?;
        rows.iter()
            .map(|r| {
                Ok((
                    r[0].text("tbl")?,
                    r[1].text("row_key")?,
                    r[2].text("found")?,
                ))
            })
            .collect()
    }

    fn decide_for(&mut self, key: &str, exp: &Expected, o: &Observation) -> Result<Decision> {
        // Intents only matter when something was counted (decide closes or weighs
        // them only then); skip the query on the common, unchanged path.
        let unchanged = o.report.counters == exp.counters
            && o.report.master == exp.master
            && o.report.epoch == exp.epoch;
        let intents = if unchanged {
            Vec::new()
        } else {
            self.open_intents(key)?
        };
        let need_catalog = o.hashes != exp.hashes;
        let cat = if need_catalog {
            self.catalog_lookup(&o.hashes)?
        } else {
            Vec::new()
        };
        let mut tampered_cat = Vec::new();
        for c in &cat {
            if !c.intact {
                tampered_cat.push(format!(
                    "catalog entry {} {} fails its MAC: ignored",
                    c.region, c.sha256
                ));
            }
        }
        let lookup = |r: Region, h: &Hash| {
            let hs = hex::encode(h);
            cat.iter()
                .any(|c| c.intact && c.region == r && c.sha256 == hs)
        };
        let mut d = decide(exp, o, &lookup, &intents);
        if self.require_intents {
            d = crate::decide::require_intents(d, exp, o, &intents);
        }
        d.reasons.extend(tampered_cat);
        Ok(d)
    }

    /// An operator clears a device's hold after reviewing it: `reason` (required)
    /// and the hold it lifts are logged in the history chain with the verdict of a
    /// fresh reading through `source`, decided by the catalog rule (counters that
    /// rose with known-good images become the new expected values). A hold for a
    /// rollback or a tampered record comes straight back (the same verdict holds
    /// it again): those need `enroll --replace`. A device row that fails its MAC,
    /// or is older than its history or its anchor entry (a replayed row), is
    /// refused before anything is written (re-enrol it). Not held: [`Error::Input`].
    pub fn hold_clear(
        &mut self,
        serial: u64,
        reason: &str,
        source: &mut dyn CounterSource,
    ) -> Result<VerifyReport> {
        let key = serial_key(serial);
        let reason = reason.trim();
        if reason.is_empty() || reason.len() > 1024 || reason.chars().any(|c| c.is_control()) {
            return Err(Error::Input(
                "--reason: say why the hold is cleared (1 to 1,024 printable characters)".into(),
            ));
        }
        // Read first: a device that cannot be read keeps its hold.
        let obs = Self::observe(serial, source)?;
        let strict = std::mem::replace(&mut self.require_intents, false);
        let r = self.tx(|s| {
            let anchored = s.read_anchor_entries(std::slice::from_ref(&key))?;
            let (mut rec, intact) = s
                .load_raw(&key, true)?
                .ok_or_else(|| Error::UnknownDevice(key.clone()))?;
            // A replayed row (older than its history or its anchor entry) is
            // refused as one that fails its MAC, before anything is rewritten.
            if !intact || s.replay_fault(&key, rec.hseq, &anchored)?.is_some() {
                return Err(Error::Tampered {
                    table: "devices",
                    row: key.clone(),
                });
            }
            let beside = s.hold_for(&key)?;
            let was = match (rec.hold.is_empty(), beside) {
                (false, _) => rec.hold.clone(),
                (true, Some(h)) => h,
                (true, None) => {
                    return Err(Error::Input(format!("device {key} is not held")));
                }
            };
            s.db.exec(
                "DELETE FROM holds WHERE serial = $1",
                &[Val::from(key.as_str())],
            )?;
            if let Some(h) = &mut s.holds {
                h.remove(&key);
            }
            rec.hold = String::new();
            if matches!(
                rec.state,
                DeviceState::NeedsReview | DeviceState::Quarantined
            ) {
                rec.state = DeviceState::Unknown;
            }
            s.write_device(&rec, false)?;
            point("hold_clear: lifted");
            s.clear_note = Some(format!(
                "hold cleared by an operator: {reason} (was held: {was})"
            ));
            let r = s.verify_in_tx(&key, Ok(obs));
            s.clear_note = None;
            r
        });
        self.require_intents = strict;
        r
    }

    /// Whether a device is trusted now: its last verify passed and is no older than
    /// `max_age`.
    pub fn is_trusted(&mut self, serial: u64, max_age: std::time::Duration) -> Result<bool> {
        let r = self.device(serial)?;
        Ok(r.state == DeviceState::Trusted
            && r.hold.is_empty()
            && now_ms() - r.verified_at <= max_age.as_millis() as i64)
    }

    // ---- master sums and the VMM cross-check -----------------------------

    /// MASTER sums per host or per rack, with the devices in each.
    pub fn master_sums(&mut self, by: GroupBy) -> Result<Vec<MasterSum>> {
        let mut out = Vec::new();
        self.master_sums_each(by, |g| {
            out.push(g);
            Ok(())
        })?;
        Ok(out)
    }

    /// MASTER sums per host or per rack, one group at a time in group order (the
    /// devices streamed from the database in (group, serial) order): memory is
    /// bounded by the largest group, not by the number of devices.
    pub fn master_sums_each(
        &mut self,
        by: GroupBy,
        mut f: impl FnMut(MasterSum) -> Result<()>,
    ) -> Result<()> {
        let order = match by {
            GroupBy::Host => "host, serial",
            GroupBy::Rack => "rack, serial",
        };
        let mut cur: Option<MasterSum> = None;
        self.scan_devices(order, &mut |d, intact| {
            let g = match by {
                GroupBy::Host => d.host,
                GroupBy::Rack => d.rack,
            };
            if cur.as_ref().is_some_and(|c| c.group != g) {
                if let Some(done) = cur.take() {
                    f(done)?;
                }
            }
            let e = cur.get_or_insert_with(|| MasterSum {
                group: g,
                master: 0,
                devices: Vec::new(),
            });
            if intact {
                e.master += d.expected.master as u64;
            }
            e.devices.push((
                d.serial,
                d.expected.master,
                d.state.name().to_string(),
                intact,
            ));
            Ok(())
        })?;
        if let Some(done) = cur {
            f(done)?;
        }
        Ok(())
    }

    /// Compare the VMM's count of flash-update attempts it passed to the device over
    /// a tenancy with the hardware's MASTER delta (`start`, `end` read out of band
    /// before and after). More hardware attempts than the VMM saw: its trap was
    /// bypassed; fewer: the device undercounts. Either quarantines the device.
    pub fn cross_check(
        &mut self,
        serial: u64,
        start: &CounterReport,
        end: &CounterReport,
        vmm_attempts: u64,
    ) -> Result<Decision> {
        let key = serial_key(serial);
        let mut d = if end.master < start.master || end.epoch < start.epoch {
            let mut d = Decision::tampered(format!(
                "master {} -> {}, epoch {} -> {} over the tenancy: counters went backwards",
                start.master, end.master, start.epoch, end.epoch
            ));
            d.verdict = Verdict::RolledBack;
            d
        } else {
            let hw = (end.master - start.master) as u64;
            if hw > vmm_attempts {
                let mut d = Decision::tampered(format!(
                    "hardware counted {hw} attempts, the VMM saw {vmm_attempts}: {} attempts bypassed the trap",
                    hw - vmm_attempts
                ));
                d.verdict = Verdict::BypassedTrap;
                d
            } else if hw < vmm_attempts {
                let mut d = Decision::tampered(format!(
                    "the VMM passed {vmm_attempts} attempts, the hardware counted {hw}: the device undercounts"
                ));
                d.verdict = Verdict::Undercount;
                d
            } else {
                let mut d = Decision::unverifiable("");
                d.verdict = Verdict::Trusted;
                d.severity = Severity::Info;
                d.reasons = vec![format!("hardware and VMM agree: {hw} attempts")];
                d
            }
        };
        let obs = serde_json::json!({"start": start, "end": end, "vmm_attempts": vmm_attempts})
            .to_string();
        self.tx(|s| {
            let anchored = s.read_anchor_entries(std::slice::from_ref(&key))?;
            let (mut rec, mac_ok) = s
                .load_raw(&key, true)?
                .ok_or_else(|| Error::UnknownDevice(key.clone()))?;
            // A replayed row (older than its history or its anchor entry) is not
            // intact either. A row that is not intact is never rewritten, whatever
            // the counts say (a fresh MAC would launder its edited values; pointing
            // it at the new history row would hide the replay): it is kept as
            // found, held and quarantined with the reason, as `verify` does.
            let fault = if mac_ok {
                s.replay_fault(&key, rec.hseq, &anchored)?
            } else {
                Some(format!(
                    "device record {key}: MAC mismatch (edited outside the service)"
                ))
            };
            let exp = serde_json::to_string(&rec.expected).unwrap_or_default();
            if let Some(why) = fault {
                if d.verdict == Verdict::Trusted {
                    // The counts agree, but the stored row cannot be trusted.
                    d.verdict = Verdict::Quarantined;
                    d.severity = Severity::Critical;
                    d.recoverable = false;
                }
                d.reasons.push(format!("{why}; held until re-enrolled"));
                d.state = DeviceState::Quarantined;
                let reason = format!("{}: {}", d.verdict, d.reasons.join("; "));
                s.keep_row_as_found(&key, &reason)?;
            } else if d.verdict != Verdict::Trusted {
                rec.state = DeviceState::Quarantined;
                // An earlier hold's reason is kept (as `verify` keeps it).
                if rec.hold.is_empty() {
                    rec.hold = d.reasons.join("; ");
                }
                rec.reason = format!("{}: {}", d.verdict, d.reasons.join("; "));
                s.write_device(&rec, false)?;
                d.state = DeviceState::Quarantined;
            } else {
                // Agreement does not establish trust by itself: keep the state,
                // and a held device stays held and is not reported trusted.
                let held = if rec.hold.is_empty() {
                    s.hold_for(&key)?
                } else {
                    Some(rec.hold.clone())
                };
                if let Some(h) = held {
                    d.verdict = Verdict::Quarantined;
                    d.severity = Severity::Critical;
                    d.recoverable = false;
                    d.reasons.push(format!("the device is held: {h}"));
                }
                // Rewritten as it is, so that it points at the history row below
                // (a row older than its history reads as replayed).
                s.write_device(&rec, false)?;
                d.state = rec.state;
            }
            s.record_history(&key, &d, &obs, &exp)?;
            Ok(())
        })?;
        Ok(d)
    }
}
