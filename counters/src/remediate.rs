//! Remediation, enforced (issue 21 item 4): what `hilrig counters remediate` does
//! with a device the service does not vouch for.
//!
//! - **needs-reflash** (or a recoverable quarantine: an image not in the catalog,
//!   no hold): reflash exactly the regions whose counters rose since the last
//!   verified values, each from the catalog image for that region, through the
//!   authorised-update path: `begin_update` (intent recorded, rate limit) for every
//!   region → flash through the device's own in-band update path (unlock, erase,
//!   program, lock) → `commit_update` (a verify that requires an intent for every
//!   counted attempt) → trusted, or an error saying what is left.
//! - **locked**, or anything an operator must look at (a hold, a rollback, a
//!   tampered record, counters that rose with no intent): page a human — run the
//!   inventory's `page` command (the page as JSON on its standard input) or POST it
//!   to a webhook signed with HMAC-SHA256 (`X-Hilrig-Signature: sha256=HEX` over
//!   the body).
//! - **trusted**: nothing to do.

use crate::decide::{DeviceState, Hash, IntentOutcome};
use crate::service::{serial_key, Service, VerifyReport};
use crate::source::CounterSource;
use crate::{Error, Result};
use hilrig_device::oob::{self, Request, Response};
use hilrig_device::{Device, DeviceConfig, Region};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Whom to page.
#[derive(Debug, Clone)]
pub enum Pager {
    /// A command (argv, no shell), given the page as JSON on its standard input and
    /// `HILRIG_PAGE_SERIAL` / `HILRIG_PAGE_VERDICT` in its environment; must exit 0
    /// within 30 s.
    Command(Vec<String>),
    /// An `http://` URL POSTed the page as JSON, with `X-Hilrig-Signature:
    /// sha256=HEX` (HMAC-SHA256 of the body under `key`); must answer 2xx within
    /// 10 s.
    Webhook {
        /// The URL.
        url: String,
        /// The HMAC key (the key file's bytes, trimmed).
        key: Vec<u8>,
    },
}

/// What a page says.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// The device (`0x...`).
    pub serial: String,
    /// The verdict (`locked`, `quarantined`, `changed` ...).
    pub verdict: String,
    /// The state the device is in.
    pub state: String,
    /// Severity.
    pub severity: String,
    /// Why, in words.
    pub reasons: Vec<String>,
    /// The evidence: what was read and what was expected (JSON).
    pub observed: Option<crate::decide::Observation>,
    /// The expected values before the verdict.
    pub expected: Option<crate::decide::Expected>,
    /// What the operator should do.
    pub action: String,
}

impl Page {
    /// The page for a verify report.
    pub fn of(r: &VerifyReport, action: &str) -> Page {
        Page {
            serial: r.serial.clone(),
            verdict: r.decision.verdict.to_string(),
            state: r.decision.state.to_string(),
            severity: r.decision.severity.to_string(),
            reasons: r.decision.reasons.clone(),
            observed: r.observed.clone(),
            expected: r.expected.clone(),
            action: action.to_string(),
        }
    }
}

/// Read a webhook key file: at most 4 KiB, not readable by group or others.
pub fn load_webhook_key(path: &Path) -> Result<Vec<u8>> {
    use std::os::unix::fs::MetadataExt;
    let err = |detail: String| Error::Key {
        path: path.to_path_buf(),
        detail,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(err(format!(
            "mode {:o}: others can read it; chmod 600",
            meta.mode() & 0o777
        )));
    }
    if meta.len() > 4096 {
        return Err(err(format!("{} bytes; a key is at most 4096", meta.len())));
    }
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let key = bytes.trim_ascii().to_vec();
    if key.is_empty() {
        return Err(err("empty".into()));
    }
    Ok(key)
}

/// HMAC-SHA256 of `body` under `key`, hex.
pub fn sign(key: &[u8], body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    // HMAC takes keys of any length: new_from_slice cannot fail.
    let mut m = match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    m.update(body);
    hex::encode(m.finalize().into_bytes())
}

fn page_err(to: &str, detail: impl Into<String>) -> Error {
    Error::Page {
        to: to.to_string(),
        detail: detail.into(),
    }
}

/// Send `page` through `pager`. Ok once the command exited 0 or the webhook
/// answered 2xx.
pub fn send_page(pager: &Pager, page: &Page) -> Result<()> {
    let body = serde_json::to_vec(page).map_err(|e| page_err("page", e.to_string()))?;
    match pager {
        Pager::Command(argv) => {
            let Some((prog, args)) = argv.split_first() else {
                return Err(page_err("page command", "empty"));
            };
            let to = format!("page command {prog:?}");
            let mut child = std::process::Command::new(prog)
                .args(args)
                .env("HILRIG_PAGE_SERIAL", &page.serial)
                .env("HILRIG_PAGE_VERDICT", &page.verdict)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| page_err(&to, format!("cannot start: {e}")))?;
            if let Some(mut i) = child.stdin.take() {
                // A command that does not read its input still pages.
                let _ = i.write_all(&body);
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                match child.try_wait() {
                    Ok(Some(st)) if st.success() => return Ok(()),
                    Ok(Some(st)) => return Err(page_err(&to, format!("failed: {st}"))),
                    Ok(None) if std::time::Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(page_err(&to, "still running after 30 s: killed"));
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                    Err(e) => return Err(page_err(&to, e.to_string())),
                }
            }
        }
        Pager::Webhook { url, key } => post(url, key, &body),
    }
}

/// POST `body` to an `http://HOST[:PORT]/PATH` URL with its HMAC signature.
fn post(url: &str, key: &[u8], body: &[u8]) -> Result<()> {
    let to = format!("webhook {url}");
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        page_err(
            &to,
            "only http:// URLs (put a TLS-terminating relay in front of an https endpoint)",
        )
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty()
        || authority.contains('@')
        || path.chars().any(|c| c.is_control() || c == ' ')
    {
        return Err(page_err(&to, "not a valid http://HOST[:PORT]/PATH URL"));
    }
    let addr = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let timeout = Duration::from_secs(10);
    use std::net::ToSocketAddrs;
    let sa = addr
        .to_socket_addrs()
        .map_err(|e| page_err(&to, format!("resolving {addr}: {e}")))?
        .next()
        .ok_or_else(|| page_err(&to, format!("{addr} resolves to nothing")))?;
    let mut s = std::net::TcpStream::connect_timeout(&sa, timeout)
        .map_err(|e| page_err(&to, format!("connecting: {e}")))?;
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Hilrig-Signature: sha256={}\r\nConnection: close\r\n\r\n",
        body.len(),
        sign(key, body)
    );
    s.write_all(head.as_bytes())
        .and_then(|_| s.write_all(body))
        .map_err(|e| page_err(&to, format!("sending: {e}")))?;
    let mut resp = Vec::new();
    let _ = s.take(8192).read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok());
    match status {
        Some(c) if (200..300).contains(&c) => Ok(()),
        Some(c) => Err(page_err(&to, format!("answered HTTP {c}"))),
        None => Err(page_err(&to, "no HTTP answer")),
    }
}

/// A known-good image file for a region, as the operator gives it
/// (`--image REGION=FILE`).
#[derive(Debug, Clone)]
pub struct ImageFile {
    /// The region.
    pub region: Region,
    /// The file.
    pub path: PathBuf,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// The region hash a device shows once it is flashed (padded with 0xff to the
    /// region's size).
    pub hash: Hash,
}

/// Most bytes of an image file.
pub const MAX_IMAGE: u64 = 16 << 20;

impl ImageFile {
    /// Read `REGION=FILE`.
    pub fn parse(spec: &str) -> Result<ImageFile> {
        let (r, p) = spec.split_once('=').ok_or_else(|| {
            Error::Input(format!(
                "--image {spec:?}: give REGION=FILE (vbios, firmware or config)"
            ))
        })?;
        let region = crate::decide::parse_region(r)?;
        ImageFile::read(region, Path::new(p))
    }

    /// Read an image file for `region`, hashed at the default region size (use
    /// [`ImageFile::read_sized`] or [`ImageFile::sized`] with the device's own).
    pub fn read(region: Region, path: &Path) -> Result<ImageFile> {
        ImageFile::read_sized(region, path, DeviceConfig::default().region_size(region))
    }

    /// The same image hashed as a device whose `region` is `size` bytes shows it
    /// once flashed (READ_HASH covers the whole region, padded with 0xff).
    pub fn sized(&self, size: u32) -> Result<ImageFile> {
        let size = size as usize;
        if self.bytes.len() > size {
            return Err(Error::Input(format!(
                "image {}: {} bytes do not fit the device's {} region ({size} bytes)",
                self.path.display(),
                self.bytes.len(),
                self.region
            )));
        }
        let mut v = self.bytes.clone();
        v.resize(size, 0xff);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&Sha256::digest(&v));
        Ok(ImageFile {
            hash,
            ..self.clone()
        })
    }

    /// Read an image file for a `region` of `size` bytes (the device's own region
    /// size: its hash is what the device's READ_HASH shows once flashed).
    pub fn read_sized(region: Region, path: &Path, size: u32) -> Result<ImageFile> {
        let bad = |d: String| Error::Input(format!("image {}: {d}", path.display()));
        let size = size as usize;
        let f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
        let mut bytes = Vec::new();
        f.take(MAX_IMAGE + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(e.to_string()))?;
        if bytes.len() > size {
            return Err(bad(format!(
                "{} bytes do not fit the {region} region ({size} bytes)",
                bytes.len()
            )));
        }
        let mut v = bytes.clone();
        v.resize(size, 0xff);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&Sha256::digest(&v));
        Ok(ImageFile {
            region,
            path: path.to_path_buf(),
            bytes,
            hash,
        })
    }
}

/// What remediation did.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// The device was trusted: nothing done.
    Trusted {
        /// The verify.
        report: VerifyReport,
    },
    /// Regions reflashed through the authorised-update path; the final verify.
    Reflashed {
        /// Region names.
        regions: Vec<String>,
        /// Intent ids.
        intents: Vec<i64>,
        /// The commit's verify (trusted).
        report: VerifyReport,
    },
    /// A human was paged.
    Paged {
        /// Whom.
        to: String,
        /// The page.
        page: Page,
    },
}

/// A device's OOB entry point as a counters source.
struct DevSource<'a> {
    dev: &'a mut dyn Device,
    label: String,
}

impl CounterSource for DevSource<'_> {
    fn name(&self) -> String {
        self.label.clone()
    }
    fn request(&mut self, req: &Request) -> Result<Response> {
        oob::request_device(self.dev, req).map_err(|e| Error::Source {
            source_name: self.label.clone(),
            detail: e.to_string(),
        })
    }
}

fn pager_name(p: &Pager) -> String {
    match p {
        Pager::Command(a) => format!("page command {:?}", a.first().cloned().unwrap_or_default()),
        Pager::Webhook { url, .. } => format!("webhook {url}"),
    }
}

/// What an operator must do for a device in `state` that no command remediates.
fn human_action(state: DeviceState) -> &'static str {
    match state {
        DeviceState::Locked => "fuse blown: only the keyed OOB physical reset clears it; replace or reset the device, then re-enrol it",
        DeviceState::NeedsReview => "counters rose with no authorised intent: find out who flashed it, then `hilrig counters hold clear` (or reflash after clearing)",
        _ => "held: investigate (rollback, tampering, bypassed counter), then `hilrig counters enroll --replace`",
    }
}

/// A gate's remediation (VMM provisioning, rig lease, campaign): a device the gate
/// refused whose verify report `r` says it is locked or quarantined is paged to a
/// human through `pager` (the inventory's `page` command or webhook), with the
/// serial, verdict, state, reasons and evidence. Ok(Some(whom)) once paged,
/// Ok(None) when the report needs no human (trusted, needs-reflash, ...).
pub fn page_refused(pager: &Pager, r: &VerifyReport) -> Result<Option<String>> {
    let needs_human = matches!(
        r.decision.state,
        DeviceState::Locked | DeviceState::Quarantined
    ) || matches!(
        r.decision.verdict,
        crate::Verdict::Locked | crate::Verdict::Quarantined
    );
    if r.trusted() || !needs_human {
        return Ok(None);
    }
    send_page(pager, &Page::of(r, human_action(r.decision.state)))?;
    Ok(Some(pager_name(pager)))
}

/// Remediate device `serial`, reachable in band and out of band as `dev`
/// (labelled `label`): see the module docs. `images` are the known-good image
/// files the operator offers (each must be in the catalog to be used); `pager`
/// whom to page. Errors say what is left to do.
pub fn remediate(
    svc: &mut Service,
    serial: u64,
    dev: &mut dyn Device,
    label: &str,
    images: &[ImageFile],
    pager: Option<&Pager>,
) -> Result<Outcome> {
    let key = serial_key(serial);
    let strict = std::mem::replace(&mut svc.require_intents, true);
    let r = remediate_inner(svc, serial, &key, dev, label, images, pager);
    svc.require_intents = strict;
    r
}

fn remediate_inner(
    svc: &mut Service,
    serial: u64,
    key: &str,
    dev: &mut dyn Device,
    label: &str,
    images: &[ImageFile],
    pager: Option<&Pager>,
) -> Result<Outcome> {
    let mut src = DevSource {
        dev: &mut *dev,
        label: label.to_string(),
    };
    let report = svc.verify(serial, &mut src)?;
    let d = &report.decision;
    let held = !svc.device(serial)?.hold.is_empty();
    let reflashable = !held
        && (d.state == DeviceState::NeedsReflash
            || (d.state == DeviceState::Quarantined && d.recoverable));
    if report.trusted() {
        return Ok(Outcome::Trusted { report });
    }
    if !reflashable {
        if d.verdict == crate::Verdict::Unverifiable {
            return Err(Error::Update {
                serial: key.to_string(),
                detail: format!("the device could not be read: {}", d.reasons.join("; ")),
            });
        }
        let action = human_action(d.state);
        let page = Page::of(&report, action);
        let Some(p) = pager else {
            return Err(Error::Update {
                serial: key.to_string(),
                detail: format!(
                    "{} ({}): a human must act ({action}), and no pager is configured: give --page-cmd or --webhook (or the inventory's [counters] page/webhook)",
                    d.verdict, d.state
                ),
            });
        };
        send_page(p, &page)?;
        return Ok(Outcome::Paged {
            to: pager_name(p),
            page,
        });
    }
    // Reflash exactly the regions whose counters rose since the last verified values.
    let (obs, exp) = match (&report.observed, &report.expected) {
        (Some(o), Some(e)) => (o.clone(), e.clone()),
        _ => {
            return Err(Error::Update {
                serial: key.to_string(),
                detail: "no observation to remediate from".into(),
            })
        }
    };
    let risen: Vec<Region> = Region::ALL
        .iter()
        .enumerate()
        .filter(|(i, _)| obs.report.counters[*i] > exp.counters[*i])
        .map(|(_, r)| *r)
        .collect();
    if risen.is_empty() {
        return Err(Error::Update {
            serial: key.to_string(),
            detail: format!(
                "{} but no region counter rose since the last verified values: nothing this command may reflash",
                d.state
            ),
        });
    }
    let catalog = svc.catalog_list()?;
    let mut plan = Vec::new();
    for r in &risen {
        let i = *r as usize;
        let in_cat = |h: &Hash| {
            let hs = hex::encode(h);
            catalog
                .iter()
                .any(|c| c.intact && c.region == *r && c.sha256 == hs)
        };
        // The last verified image first, then any other catalog image offered.
        let pick = images
            .iter()
            .filter(|f| f.region == *r && in_cat(&f.hash))
            .min_by_key(|f| f.hash != exp.hashes[i]);
        match pick {
            Some(f) => plan.push(f),
            None => {
                return Err(Error::Update {
                    serial: key.to_string(),
                    detail: format!(
                        "{r}: its counter rose and no --image {r}=FILE offered is in the catalog (last verified image {})",
                        hex::encode(exp.hashes[i])
                    ),
                })
            }
        }
    }
    let mut ids = Vec::new();
    for f in &plan {
        ids.push(svc.begin_update(serial, f.region, &hex::encode(f.hash))?);
    }
    for f in &plan {
        hilrig_device::model::ops::flash_region(&mut *dev, f.region, &f.bytes).map_err(|e| {
            Error::Update {
                serial: key.to_string(),
                detail: format!(
                    "flashing {} from {}: {e} (the intents stay open: the next verify resolves them)",
                    f.region,
                    f.path.display()
                ),
            }
        })?;
    }
    let mut src = DevSource {
        dev: &mut *dev,
        label: label.to_string(),
    };
    let Some(first) = ids.first().copied() else {
        return Err(Error::Update {
            serial: key.to_string(),
            detail: "no intent recorded".into(),
        });
    };
    let report = svc.commit_update(serial, first, &mut src)?;
    let committed = ids.iter().all(|id| {
        report
            .decision
            .intents
            .iter()
            .any(|(i, o)| i == id && *o == IntentOutcome::Committed)
    });
    if !report.trusted() || !committed {
        return Err(Error::Update {
            serial: key.to_string(),
            detail: format!(
                "after reflashing {}: {} ({}): {}",
                plan.iter()
                    .map(|f| f.region.name())
                    .collect::<Vec<_>>()
                    .join(", "),
                report.decision.verdict,
                report.decision.state,
                report.decision.reasons.join("; ")
            ),
        });
    }
    Ok(Outcome::Reflashed {
        regions: plan.iter().map(|f| f.region.name().to_string()).collect(),
        intents: ids,
        report,
    })
}
