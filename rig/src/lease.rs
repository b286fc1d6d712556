//! Host leases: a host is held by one runner at a time through a row in the
//! results database, with an expiry the holder renews by heartbeat. A runner that
//! dies stops renewing and its lease expires by itself; nothing needs cleaning up
//! by hand. Every acquisition bumps the row's `generation`, so a runner that lost
//! its lease (expired, taken over) finds out at its next renewal and must stop.
//!
//! Backends: SQLite (a file; one controller, any number of runner processes on
//! it; `BEGIN IMMEDIATE` serialises acquisitions; the controller's clock) and
//! PostgreSQL (several controllers sharing one database; rows locked with
//! `SELECT ... FOR UPDATE SKIP LOCKED`; the database server's clock, so
//! controllers' clocks need not agree).
//!
//! Table `rig_leases(host PRIMARY KEY, holder, generation, acquired_ms,
//! expires_ms)`; times are Unix milliseconds.

use crate::error::RigError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A lease held (at the time it was granted or last renewed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The host.
    pub host: String,
    /// Who holds it.
    pub holder: String,
    /// Acquisition number of this host's row; changes when someone else takes it.
    pub generation: i64,
    /// Expiry, Unix ms (database clock for PostgreSQL).
    pub expires_unix_ms: i64,
}

/// A row of the lease table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    /// The host.
    pub host: String,
    /// Last holder ("" if never held).
    pub holder: String,
    /// Acquisitions so far.
    pub generation: i64,
    /// Expiry, Unix ms.
    pub expires_unix_ms: i64,
    /// Whether it is held now (not expired).
    pub active: bool,
}

enum Db {
    Sqlite(rusqlite::Connection),
    Pg(Box<postgres::Client>),
}

/// A connection to the lease table.
pub struct LeaseStore {
    db: Mutex<Db>,
    label: String,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

const PG_NOW: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// Unix milliseconds as an RFC 3339 UTC time (`2026-12-03T18:20:00.123Z`).
pub fn format_unix_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A default holder name: `hostname:pid:nanos` (unique per runner).
pub fn default_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{host}:{}:{nanos:08x}", std::process::id())
}

/// Hide a password in a URL for messages.
fn redact(spec: &str) -> String {
    hilrig_db::redact(spec)
}

/// The `rig_leases` schema. Migration 1 is the table as created before the
/// migrations layer (`CREATE TABLE IF NOT EXISTS`, so adopting an old database is
/// harmless). Never edit a published migration: add one.
pub const SCHEMA: hilrig_db::Schema<'static> = hilrig_db::Schema {
    name: "rig_leases",
    migrations: &[hilrig_db::Migration::per_engine(
        1,
        "CREATE TABLE IF NOT EXISTS rig_leases (
            host TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            generation INTEGER NOT NULL,
            acquired_ms INTEGER NOT NULL,
            expires_ms INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS rig_leases (
                    host TEXT PRIMARY KEY,
                    holder TEXT NOT NULL,
                    generation BIGINT NOT NULL,
                    acquired_ms BIGINT NOT NULL,
                    expires_ms BIGINT NOT NULL)",
    )],
    adopt: hilrig_db::Adopt::Tables(&[(
        "rig_leases",
        &["host", "holder", "generation", "acquired_ms", "expires_ms"],
    )]),
};

impl LeaseStore {
    /// Open `spec` (see [`hilrig_db::DbUrl`]): a `postgres://` / `postgresql://` URL
    /// (or a `host=... ` key-value string containing `dbname=`), `sqlite:PATH`, else a
    /// SQLite file path (created if missing); the `rig_leases` schema is migrated.
    pub fn open(spec: &str) -> Result<LeaseStore, RigError> {
        let label = redact(spec);
        let err = |d: String| RigError::Lease {
            store: label.clone(),
            detail: d,
        };
        let url = hilrig_db::DbUrl::parse(spec).map_err(|e| err(e.to_string()))?;
        let settings = hilrig_db::Settings::new("hilrig-rig");
        let mut conn = hilrig_db::open(&url, &settings).map_err(|e| err(e.to_string()))?;
        hilrig_db::migrate(conn.as_mut(), &label, &SCHEMA).map_err(|e| err(e.to_string()))?;
        let db = match conn {
            hilrig_db::Conn::Sqlite(c) => Db::Sqlite(c),
            hilrig_db::Conn::Pg(c) => Db::Pg(c),
        };
        Ok(LeaseStore {
            db: Mutex::new(db),
            label,
        })
    }

    /// The store's name for messages (password hidden).
    pub fn label(&self) -> &str {
        &self.label
    }

    fn err(&self, d: impl std::fmt::Display) -> RigError {
        RigError::Lease {
            store: self.label.clone(),
            detail: d.to_string(),
        }
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take `host` for `holder` for `ttl`. Free, expired, or already held by
    /// `holder`: granted (the last extends it). Held by someone else:
    /// [`RigError::Leased`].
    pub fn acquire(&self, host: &str, holder: &str, ttl: Duration) -> Result<Lease, RigError> {
        match self.acquire_any(&[host], holder, ttl)? {
            Some(l) => Ok(l),
            None => {
                let row = self.list()?.into_iter().find(|r| r.host == host);
                // An inactive row here means another controller held the row lock
                // (SKIP LOCKED) while acquiring it.
                let holder = match &row {
                    Some(r) if r.active && r.holder != holder => r.holder.clone(),
                    _ => "(another runner, acquiring it now)".to_string(),
                };
                Err(RigError::Leased {
                    host: host.into(),
                    holder,
                    expires_unix_ms: row.map(|r| r.expires_unix_ms).unwrap_or(0),
                })
            }
        }
    }

    /// Take the first free host of `hosts` (in order); `None` when all are held.
    pub fn acquire_any(
        &self,
        hosts: &[&str],
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, RigError> {
        if holder.is_empty() {
            return Err(self.err("empty holder name"));
        }
        let ttl_ms = ttl.as_millis().min(i64::MAX as u128) as i64;
        let mut db = self.db();
        match &mut *db {
            Db::Sqlite(c) => {
                let tx = c
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(|e| self.err(e))?;
                let now = now_ms();
                let mut got = None;
                for &h in hosts {
                    let row: Option<(String, i64, i64)> = tx
                        .query_row(
                            "SELECT holder, generation, expires_ms FROM rig_leases WHERE host = ?1",
                            [h],
                            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                        )
                        .map(Some)
                        .or_else(|e| match e {
                            rusqlite::Error::QueryReturnedNoRows => Ok(None),
                            e => Err(e),
                        })
                        .map_err(|e| self.err(e))?;
                    let gen = match row {
                        None => {
                            tx.execute(
                                "INSERT INTO rig_leases (host, holder, generation, acquired_ms, expires_ms) VALUES (?1, ?2, 1, ?3, ?4)",
                                rusqlite::params![h, holder, now, now + ttl_ms],
                            )
                            .map_err(|e| self.err(e))?;
                            1
                        }
                        Some((who, gen, exp)) if who == holder && exp > now => {
                            tx.execute(
                                "UPDATE rig_leases SET expires_ms = ?2 WHERE host = ?1",
                                rusqlite::params![h, now + ttl_ms],
                            )
                            .map_err(|e| self.err(e))?;
                            gen
                        }
                        Some((_, gen, exp)) if exp <= now => {
                            tx.execute(
                                "UPDATE rig_leases SET holder = ?2, generation = ?3, acquired_ms = ?4, expires_ms = ?5 WHERE host = ?1",
                                rusqlite::params![h, holder, gen + 1, now, now + ttl_ms],
                            )
                            .map_err(|e| self.err(e))?;
                            gen + 1
                        }
                        Some(_) => continue,
                    };
                    got = Some(Lease {
                        host: h.to_string(),
                        holder: holder.to_string(),
                        generation: gen,
                        expires_unix_ms: now + ttl_ms,
                    });
                    break;
                }
                tx.commit().map_err(|e| self.err(e))?;
                Ok(got)
            }
            Db::Pg(c) => {
                // Make sure every host has a row to lock (outside the transaction).
                for &h in hosts {
                    c.execute(
                        "INSERT INTO rig_leases (host, holder, generation, acquired_ms, expires_ms) VALUES ($1, '', 0, 0, 0) ON CONFLICT (host) DO NOTHING",
                        &[&h],
                    )
                    .map_err(|e| self.err(e))?;
                }
                let names: Vec<String> = hosts.iter().map(|s| s.to_string()).collect();
                let mut tx = c.transaction().map_err(|e| self.err(e))?;
                // Rows another controller is acquiring right now are skipped,
                // never waited for.
                let q = format!(
                    "SELECT host, generation FROM rig_leases
                     WHERE host = ANY($1) AND (expires_ms <= {PG_NOW} OR holder = $2)
                     ORDER BY array_position($1, host) LIMIT 1 FOR UPDATE SKIP LOCKED"
                );
                let rows = tx.query(&q, &[&names, &holder]).map_err(|e| self.err(e))?;
                let Some(r) = rows.first() else {
                    tx.commit().map_err(|e| self.err(e))?;
                    return Ok(None);
                };
                let h: String = r.get(0);
                let u = format!(
                    "UPDATE rig_leases SET
                        generation = CASE WHEN holder = $2 AND expires_ms > {PG_NOW} THEN generation ELSE generation + 1 END,
                        acquired_ms = CASE WHEN holder = $2 AND expires_ms > {PG_NOW} THEN acquired_ms ELSE {PG_NOW} END,
                        holder = $2,
                        expires_ms = {PG_NOW} + $3
                     WHERE host = $1 RETURNING generation, expires_ms"
                );
                let row = tx
                    .query_one(&u, &[&h, &holder, &ttl_ms])
                    .map_err(|e| self.err(e))?;
                let lease = Lease {
                    host: h,
                    holder: holder.to_string(),
                    generation: row.get(0),
                    expires_unix_ms: row.get(1),
                };
                tx.commit().map_err(|e| self.err(e))?;
                Ok(Some(lease))
            }
        }
    }

    /// Extend a lease by `ttl` from now. Fails when it was lost: expired (even if
    /// nobody took it yet) or taken over (generation changed).
    pub fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, RigError> {
        let ttl_ms = ttl.as_millis().min(i64::MAX as u128) as i64;
        let mut db = self.db();
        let updated: Option<i64> = match &mut *db {
            Db::Sqlite(c) => {
                let now = now_ms();
                let n = c
                    .execute(
                        "UPDATE rig_leases SET expires_ms = ?4 WHERE host = ?1 AND holder = ?2 AND generation = ?3 AND expires_ms > ?5",
                        rusqlite::params![lease.host, lease.holder, lease.generation, now + ttl_ms, now],
                    )
                    .map_err(|e| self.err(e))?;
                (n == 1).then_some(now + ttl_ms)
            }
            Db::Pg(c) => {
                let q = format!(
                    "UPDATE rig_leases SET expires_ms = {PG_NOW} + $4
                     WHERE host = $1 AND holder = $2 AND generation = $3 AND expires_ms > {PG_NOW}
                     RETURNING expires_ms"
                );
                let rows = c
                    .query(
                        &q,
                        &[&lease.host, &lease.holder, &lease.generation, &ttl_ms],
                    )
                    .map_err(|e| self.err(e))?;
                rows.first().map(|r| r.get(0))
            }
        };
        drop(db);
        match updated {
            Some(exp) => Ok(Lease {
                expires_unix_ms: exp,
                ..lease.clone()
            }),
            None => Err(RigError::Infra {
                host: lease.host.clone(),
                detail: format!(
                    "lease of `{}` (generation {}) was lost: expired or taken over",
                    lease.holder, lease.generation
                ),
            }),
        }
    }

    /// Give a lease back (no-op if it was already lost).
    pub fn release(&self, lease: &Lease) -> Result<(), RigError> {
        self.release_host(&lease.host, &lease.holder, Some(lease.generation))
            .map(|_| ())
    }

    /// Release `host` if `holder` (and `generation`, when given) hold it; returns
    /// whether a lease was released.
    pub fn release_host(
        &self,
        host: &str,
        holder: &str,
        generation: Option<i64>,
    ) -> Result<bool, RigError> {
        let mut db = self.db();
        let n = match &mut *db {
            Db::Sqlite(c) => c
                .execute(
                    "UPDATE rig_leases SET expires_ms = 0 WHERE host = ?1 AND holder = ?2 AND (?3 IS NULL OR generation = ?3)",
                    rusqlite::params![host, holder, generation],
                )
                .map_err(|e| self.err(e))? as u64,
            Db::Pg(c) => c
                .execute(
                    "UPDATE rig_leases SET expires_ms = 0 WHERE host = $1 AND holder = $2 AND ($3::BIGINT IS NULL OR generation = $3)",
                    &[&host, &holder, &generation],
                )
                .map_err(|e| self.err(e))?,
        };
        Ok(n > 0)
    }

    /// Every row, by host.
    pub fn list(&self) -> Result<Vec<LeaseRow>, RigError> {
        let mut db = self.db();
        match &mut *db {
            Db::Sqlite(c) => {
                let now = now_ms();
                let mut st = c
                    .prepare(
                        "SELECT host, holder, generation, expires_ms FROM rig_leases ORDER BY host",
                    )
                    .map_err(|e| self.err(e))?;
                let rows = st
                    .query_map([], |r| {
                        let exp: i64 = r.get(3)?;
                        Ok(LeaseRow {
                            host: r.get(0)?,
                            holder: r.get(1)?,
                            generation: r.get(2)?,
                            expires_unix_ms: exp,
                            active: exp > now,
                        })
                    })
                    .map_err(|e| self.err(e))?;
                rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
            }
            Db::Pg(c) => {
                let q = format!(
                    "SELECT host, holder, generation, expires_ms, expires_ms > {PG_NOW} FROM rig_leases ORDER BY host"
                );
                Ok(c.query(&q, &[])
                    .map_err(|e| self.err(e))?
                    .iter()
                    .map(|r| LeaseRow {
                        host: r.get(0),
                        holder: r.get(1),
                        generation: r.get(2),
                        expires_unix_ms: r.get(3),
                        active: r.get(4),
                    })
                    .collect())
            }
        }
    }
}

impl LeaseStore {
    /// The active lease on `host`, if any.
    pub fn who(&self, host: &str) -> Result<Option<LeaseRow>, RigError> {
        Ok(self
            .list()?
            .into_iter()
            .find(|r| r.host == host && r.active))
    }

    /// [`LeaseStore::acquire`] of a host `inv` knows; an unknown host is refused
    /// (a typo must not create a lease nobody can use).
    pub fn acquire_known(
        &self,
        inv: &crate::inventory::Inventory,
        host: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease, RigError> {
        inv.host(host)?;
        self.acquire(host, holder, ttl)
    }

    /// [`LeaseStore::acquire_known`], then, with a counters `gate`, the host's
    /// device verified out of band through `rig` while the lease is held: a device
    /// the counters service does not vouch for gives the lease back and is
    /// [`RigError::Untrusted`] with the verdict.
    pub fn acquire_gated(
        &self,
        rig: &crate::Rig,
        host: &str,
        holder: &str,
        ttl: Duration,
        gate: Option<&CountersGate>,
    ) -> Result<Lease, RigError> {
        let lease = self.acquire_known(&rig.inv, host, holder, ttl)?;
        if let Some(g) = gate {
            if let Err(e) = g.check(rig, host) {
                let _ = self.release(&lease);
                return Err(e);
            }
        }
        Ok(lease)
    }
}

/// The counters service a lease consults (`--counters-db`/`--counters-key`, or the
/// inventory's `[counters]`): a host whose device is not trusted is not leased.
#[derive(Debug, Clone)]
pub struct CountersGate {
    /// The counters database (SQLite path or postgresql:// URL).
    pub db: String,
    /// Its MAC key file.
    pub key: std::path::PathBuf,
    /// Its anchor (file, `sqlite:PATH` or URL), if any.
    pub anchor: Option<String>,
    /// Whom a refused locked or quarantined device is paged to (the inventory's
    /// `[counters] page` command or `webhook`).
    pub pager: Option<hilrig_counters::remediate::Pager>,
}

/// A host's device through the rig's OOB driver, as a counters source.
struct RigOob<'a> {
    rig: &'a crate::Rig,
    host: &'a str,
}

impl hilrig_counters::source::CounterSource for RigOob<'_> {
    fn name(&self) -> String {
        format!("host `{}` (OOB)", self.host)
    }
    fn request(
        &mut self,
        req: &hilrig_device::oob::Request,
    ) -> hilrig_counters::Result<hilrig_device::oob::Response> {
        self.rig
            .oob_request(self.host, req)
            .map_err(|e| hilrig_counters::Error::Source {
                source_name: self.name(),
                detail: e.to_string(),
            })
    }
}

impl CountersGate {
    /// The gate of an inventory's `[counters]` table, its pager included (a
    /// `page` command wins over a `webhook`; a webhook needs its `webhook_key`).
    pub fn from_spec(c: &crate::inventory::CountersSpec) -> Result<CountersGate, RigError> {
        let pager = c.pager()?;
        Ok(CountersGate {
            db: c.db.clone(),
            key: c.key.clone(),
            anchor: c.anchor.clone(),
            pager,
        })
    }

    /// Open the counters service (key checked, anchor set). Failures are
    /// [`RigError::Untrusted`] with verdict `service-error`.
    pub fn open_service(&self, host: &str) -> Result<hilrig_counters::Service, RigError> {
        let refuse = |detail: String| RigError::Untrusted {
            host: host.to_string(),
            verdict: "service-error".into(),
            detail,
        };
        let key = hilrig_counters::mac::Key::load(&self.key)
            .map_err(|e| refuse(format!("counters key: {e}")))?;
        let mut svc = hilrig_counters::Service::open(&self.db, key).map_err(|e| {
            refuse(format!(
                "counters service {}: {e}",
                hilrig_counters::store::redact(&self.db)
            ))
        })?;
        if let Some(a) = &self.anchor {
            svc.set_anchor_spec(a)
                .map_err(|e| refuse(format!("anchor: {e}")))?;
        }
        Ok(svc)
    }

    /// Enrol `host`'s device with the counters service: its expected values read
    /// out of band through the rig (IDENTIFY, counters, region hashes), and its OOB
    /// reset key from `reset_key_file` (0600; for a simulated host
    /// [`crate::sim::SimHost::reset_key_path`]), stored sealed. Returns the serial.
    pub fn enroll(
        &self,
        rig: &crate::Rig,
        host: &str,
        reset_key_file: &std::path::Path,
        replace: bool,
    ) -> Result<u64, RigError> {
        use hilrig_counters::source::CounterSource;
        let fail = |verdict: &str, detail: String| RigError::Untrusted {
            host: host.to_string(),
            verdict: verdict.to_string(),
            detail,
        };
        let rk = hilrig_device::secure::read_reset_key_file(reset_key_file)?;
        let mut src = RigOob { rig, host };
        let serial = src
            .serial()
            .map_err(|e| fail("transport-fault", e.to_string()))?;
        let obs = src
            .observe()
            .map_err(|e| fail("transport-fault", e.to_string()))?;
        let rack = String::new();
        let mut svc = self.open_service(host)?;
        svc.enroll_with_reset_key(
            &hilrig_counters::service::Enrollment {
                serial,
                host: host.to_string(),
                rack,
                expected: obs.as_expected(),
            },
            replace,
            &rk,
        )
        .map_err(|e| {
            fail(
                "service-error",
                format!("enrolling device {serial:#x}: {e}"),
            )
        })?;
        Ok(serial)
    }

    /// The keyed OOB physical reset of `host`'s device, with the reset key the
    /// counters service holds for the serial the device identifies as (never a
    /// key derived from the serial, never one on a command line). Returns the new
    /// EPOCH. A device that refuses the key is an error naming its reply.
    pub fn physical_reset(&self, rig: &crate::Rig, host: &str) -> Result<u32, RigError> {
        use hilrig_counters::source::CounterSource;
        use hilrig_device::oob::{Request, Response};
        let fail = |verdict: &str, detail: String| RigError::Untrusted {
            host: host.to_string(),
            verdict: verdict.to_string(),
            detail,
        };
        let serial = RigOob { rig, host }
            .serial()
            .map_err(|e| fail("transport-fault", e.to_string()))?;
        let rk = self
            .open_service(host)?
            .reset_key(serial)
            .map_err(|e| fail("service-error", e.to_string()))?;
        match rig.oob_request(host, &Request::PhysicalReset(rk))? {
            Response::ResetDone { epoch } => Ok(epoch),
            other => Err(fail(
                "reset-refused",
                format!("device {serial:#x} answered the keyed physical reset with {other:?}"),
            )),
        }
    }

    /// Verify `host`'s device out of band through `rig` (IDENTIFY, counters, region
    /// hashes) against the enrolled values, requiring an authorised intent for every
    /// counted attempt. Ok only when the device is trusted; every other outcome
    /// (quarantined, locked, held for review, needs-reflash, not enrolled, an OOB
    /// fault, a service error) is [`RigError::Untrusted`] naming the verdict.
    pub fn check(&self, rig: &crate::Rig, host: &str) -> Result<(), RigError> {
        use hilrig_counters::source::CounterSource;
        let refuse = |verdict: &str, detail: String| RigError::Untrusted {
            host: host.to_string(),
            verdict: verdict.to_string(),
            detail,
        };
        let mut src = RigOob { rig, host };
        let serial = src
            .serial()
            .map_err(|e| refuse("transport-fault", e.to_string()))?;
        let obs = src
            .observe()
            .map_err(|e| refuse("transport-fault", e.to_string()))?;
        let mut svc = self.open_service(host)?;
        svc.require_intents = true;
        let r = match svc.verify_observation(serial, Ok(obs)) {
            Ok(r) => r,
            Err(hilrig_counters::Error::UnknownDevice(s)) => {
                return Err(refuse(
                    "unknown-device",
                    format!("device {s} is not enrolled with the counters service"),
                ))
            }
            Err(e) => return Err(refuse("service-error", e.to_string())),
        };
        let admitted = r.trusted()
            && match r.decision.verdict {
                hilrig_device::attest::Verdict::Trusted => true,
                hilrig_device::attest::Verdict::AcceptedUpdate => !r.decision.intents.is_empty(),
                _ => false,
            };
        if admitted {
            return Ok(());
        }
        let mut detail = format!(
            "device {} is {}: {}",
            r.serial,
            r.decision.state,
            r.decision.reasons.join("; ")
        );
        // Locked or quarantined: a human is paged (the lease is refused either way).
        if let Some(p) = &self.pager {
            match hilrig_counters::remediate::page_refused(p, &r) {
                Ok(Some(to)) => detail.push_str(&format!(" (paged: {to})")),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!("host `{host}`: paging a human failed: {e}");
                    detail.push_str(&format!(" (paging a human FAILED: {e})"));
                }
            }
        }
        Err(refuse(&r.decision.verdict.to_string(), detail))
    }
}

/// Lease enforcement for actions on hosts (power, console, OOB): an action on a
/// host leased by someone else is refused with [`RigError::Leased`], unless forced
/// with a reason, which is logged (tracing, and standard error).
pub struct LeaseGuard {
    /// The lease table.
    pub store: LeaseStore,
    /// Who is acting.
    pub holder: String,
    /// `--force REASON`: act even on a host leased by someone else.
    pub force: Option<String>,
}

impl std::fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("store", &self.store.label())
            .field("holder", &self.holder)
            .field("force", &self.force)
            .finish()
    }
}

impl LeaseGuard {
    /// May `holder` act (`what`) on `host` now?
    pub fn check(&self, host: &str, what: &str) -> Result<(), RigError> {
        let Some(row) = self.store.who(host)? else {
            return Ok(());
        };
        if row.holder == self.holder {
            return Ok(());
        }
        match &self.force {
            Some(reason) if !reason.trim().is_empty() => {
                let msg = format!(
                    "FORCED {what} on host `{host}` leased by `{}` until {}: by `{}`: {reason}",
                    row.holder,
                    format_unix_ms(row.expires_unix_ms),
                    self.holder
                );
                tracing::warn!("{msg}");
                eprintln!("hilrig rig: {msg}");
                Ok(())
            }
            _ => Err(RigError::Leased {
                host: host.to_string(),
                holder: row.holder,
                expires_unix_ms: row.expires_unix_ms,
            }),
        }
    }
}

/// Renews a lease in the background every `ttl / 3` until dropped or the lease
/// is lost. A runner checks [`Heartbeat::lost`] before acting on the host (and
/// treats a lost lease as an infrastructure fault of the case).
pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    lost: Arc<Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    /// Start renewing `lease` in `store`.
    pub fn start(store: Arc<LeaseStore>, lease: Lease, ttl: Duration) -> Heartbeat {
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(Mutex::new(None));
        let (st, lo) = (stop.clone(), lost.clone());
        let period = (ttl / 3).max(Duration::from_millis(10));
        let thread = std::thread::spawn(move || {
            let mut lease = lease;
            let mut next = std::time::Instant::now() + period;
            while !st.load(Ordering::Relaxed) {
                if std::time::Instant::now() < next {
                    std::thread::sleep(Duration::from_millis(10).min(period));
                    continue;
                }
                next += period;
                match store.renew(&lease, ttl) {
                    Ok(l) => lease = l,
                    Err(e) => {
                        *lo.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                        return;
                    }
                }
            }
        });
        Heartbeat {
            stop,
            lost,
            thread: Some(thread),
        }
    }

    /// Why the lease was lost, if it was.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod format_tests {
    #[test]
    fn times() {
        assert_eq!(super::format_unix_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            super::format_unix_ms(1_795_250_980_123),
            "2026-11-21T08:49:40.123Z"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_acquire_renew_release() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("leases.db");
        let s = LeaseStore::open(p.to_str().unwrap()).unwrap();
        let ttl = Duration::from_secs(60);
        let a = s.acquire("h1", "alice", ttl).unwrap();
        assert_eq!(a.generation, 1);
        let e = s.acquire("h1", "bob", ttl).unwrap_err();
        assert!(
            matches!(&e, RigError::Leased { holder, .. } if holder == "alice"),
            "{e}"
        );
        // Re-entrant for the same holder.
        assert_eq!(s.acquire("h1", "alice", ttl).unwrap().generation, 1);
        let b = s.acquire_any(&["h1", "h2"], "bob", ttl).unwrap().unwrap();
        assert_eq!(b.host, "h2");
        assert!(s
            .acquire_any(&["h1", "h2"], "carol", ttl)
            .unwrap()
            .is_none());
        s.renew(&a, ttl).unwrap();
        s.release(&a).unwrap();
        let c = s.acquire("h1", "carol", ttl).unwrap();
        assert_eq!(c.generation, 2);
        // Alice's old lease is gone for good.
        assert!(s.renew(&a, ttl).is_err());
        let rows = s.list().unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.active));
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact("postgres://u:secret@db/x"), "postgres://u:***@db/x");
        assert_eq!(redact("/tmp/l.db"), "/tmp/l.db");
    }
}
