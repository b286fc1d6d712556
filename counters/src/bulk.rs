//! Bulk enrolment from a file (`hilrig counters enroll --from FILE`): JSON lines or
//! CSV, one device a line.
//!
//! - JSON lines: `{"serial": "0x5eed", "host": "h1", "rack": "r1", "counters": [0, 2, 0],
//!   "master": 2, "epoch": 0, "hashes": {"vbios": SHA, "firmware": SHA, "config": SHA}}`
//!   (`master` defaults to the counters' sum, `epoch` to 0, `host`/`rack` to "").
//! - CSV: `serial,host,rack,c_vbios,c_firmware,c_config,master,epoch,h_vbios,h_firmware,h_config`
//!   (an empty `master` is the counters' sum); a first line starting with `serial`
//!   is a header.
//!
//! - Either form may name the device's OOB reset-key file (`"reset_key_file":
//!   "keys/5eed.reset-key"` in JSON; a 12th CSV field), relative to the list's
//!   directory: read (0600, 64 hex digits) while the file is checked, stored sealed
//!   with the batch.
//!
//! Blank lines and lines starting with `#` are skipped. A line is at most
//! [`MAX_LINE`] bytes. The whole file is checked first, so a malformed file writes
//! nothing; then devices are enrolled in transactions of `batch` devices. Every
//! error names the file and the line.

use crate::decide::{parse_hash, Expected, Hash};
use crate::service::{parse_serial, serial_key, Enrollment, Service};
use crate::{Error, Result};
use std::io::{BufRead, Read};
use std::path::Path;

/// Longest line accepted, bytes (without its newline).
pub const MAX_LINE: usize = 4096;
/// Devices enrolled per transaction.
pub const BATCH: usize = 5000;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLine {
    serial: serde_json::Value,
    #[serde(default)]
    host: String,
    #[serde(default)]
    rack: String,
    counters: [u32; 3],
    master: Option<u32>,
    #[serde(default)]
    epoch: u32,
    hashes: JsonHashes,
    #[serde(default)]
    reset_key_file: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonHashes {
    vbios: String,
    firmware: String,
    config: String,
}

/// What is wrong with one line (the caller adds the file and line number).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct LineError(String);

impl From<String> for LineError {
    fn from(detail: String) -> Self {
        LineError(detail)
    }
}

fn hashes(v: [&str; 3]) -> std::result::Result<[Hash; 3], LineError> {
    let mut out = [[0u8; 32]; 3];
    for (o, (name, h)) in out
        .iter_mut()
        .zip(["vbios", "firmware", "config"].iter().zip(v))
    {
        *o = parse_hash(h).map_err(|e| format!("{name} hash: {e}"))?;
    }
    Ok(out)
}

/// Parse one line (already trimmed, not blank, not a comment).
fn parse_line(line: &str) -> std::result::Result<(Enrollment, Option<String>), LineError> {
    if line.starts_with('{') {
        let j: JsonLine = serde_json::from_str(line).map_err(|e| format!("JSON: {e}"))?;
        let serial = match &j.serial {
            serde_json::Value::String(s) => parse_serial(s).map_err(|e| e.to_string())?,
            serde_json::Value::Number(n) => n
                .as_u64()
                .ok_or_else(|| format!("serial {n}: not a 64-bit unsigned number"))?,
            other => return Err(format!("serial {other}: give a number or a string").into()),
        };
        let hs = hashes([&j.hashes.vbios, &j.hashes.firmware, &j.hashes.config])?;
        let kf = j.reset_key_file;
        return Ok((
            Enrollment {
                serial,
                host: j.host,
                rack: j.rack,
                expected: Expected {
                    counters: j.counters,
                    master: j.master.unwrap_or_else(|| j.counters.iter().sum()),
                    epoch: j.epoch,
                    hashes: hs,
                },
            },
            kf,
        ));
    }
    let f: Vec<&str> = line.split(',').map(str::trim).collect();
    if f.len() != 11 && f.len() != 12 {
        return Err(format!(
            "CSV: {} fields; want 11 or 12: serial,host,rack,c_vbios,c_firmware,c_config,master,epoch,h_vbios,h_firmware,h_config[,reset_key_file]",
            f.len()
        )
        .into());
    }
    let serial = parse_serial(f[0]).map_err(|e| e.to_string())?;
    let num = |i: usize, what: &str| -> std::result::Result<u32, LineError> {
        f[i].parse()
            .map_err(|_| LineError(format!("{what} {:?}: not a number", f[i])))
    };
    let counters = [
        num(3, "c_vbios")?,
        num(4, "c_firmware")?,
        num(5, "c_config")?,
    ];
    let master = if f[6].is_empty() {
        counters.iter().sum()
    } else {
        num(6, "master")?
    };
    let kf = f.get(11).filter(|k| !k.is_empty()).map(|k| k.to_string());
    Ok((
        Enrollment {
            serial,
            host: f[1].to_string(),
            rack: f[2].to_string(),
            expected: Expected {
                counters,
                master,
                epoch: num(7, "epoch")?,
                hashes: hashes([f[8], f[9], f[10]])?,
            },
        },
        kf,
    ))
}

/// One enrolment and its reset key (read from the key file the line names).
type Keyed = (Enrollment, Option<[u8; 32]>);

/// Read `path` line by line (bounded), calling `f(line_no, enrollment)`.
fn each_line(path: &Path, f: &mut dyn FnMut(usize, Keyed) -> Result<()>) -> Result<()> {
    let at = |n: usize, detail: String| Error::Input(format!("{}:{n}: {detail}", path.display()));
    let file = std::fs::File::open(path)
        .map_err(|e| Error::Input(format!("enroll --from {}: {e}", path.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::Input(format!("enroll --from {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(Error::Input(format!(
            "enroll --from {}: not a regular file",
            path.display()
        )));
    }
    let mut r = std::io::BufReader::new(file);
    let mut buf = Vec::with_capacity(512);
    let mut n = 0usize;
    loop {
        n += 1;
        buf.clear();
        let got = (&mut r)
            .take(MAX_LINE as u64 + 2)
            .read_until(b'\n', &mut buf)
            .map_err(|e| at(n, format!("reading: {e}")))?;
        if got == 0 {
            return Ok(());
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
        }
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        if buf.len() > MAX_LINE {
            return Err(at(n, format!("line longer than {MAX_LINE} bytes")));
        }
        let line = std::str::from_utf8(&buf).map_err(|_| at(n, "not UTF-8".into()))?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || (n == 1 && line.starts_with("serial")) {
            continue;
        }
        let (e, kf) = parse_line(line).map_err(|d| at(n, d.0))?;
        let rk = match kf {
            Some(k) => {
                let kp = path.parent().unwrap_or(Path::new(".")).join(k);
                Some(
                    hilrig_device::secure::read_reset_key_file(&kp)
                        .map_err(|err| at(n, format!("reset key: {err}")))?,
                )
            }
            None => None,
        };
        for (what, v) in [("host", &e.host), ("rack", &e.rack)] {
            if v.len() > 256 || v.chars().any(|c| c.is_control()) {
                return Err(at(
                    n,
                    format!("{what} {v:?}: at most 256 printable characters"),
                ));
            }
        }
        f(n, (e, rk))?;
    }
}

/// Enrol every device in `path`; returns how many. The file is checked whole
/// before anything is written. A device already enrolled stops the run at its
/// batch: earlier batches stay committed (the error says how many), that batch
/// writes nothing.
pub fn enroll_file(svc: &mut Service, path: &Path, batch: usize) -> Result<u64> {
    let batch = batch.max(1);
    // Pass 1: every line parses.
    let mut total = 0u64;
    each_line(path, &mut |_, _| {
        total += 1;
        Ok(())
    })?;
    // Pass 2: enrol, a transaction per batch.
    let mut done = 0u64;
    let mut pending: Vec<Enrollment> = Vec::with_capacity(batch.min(total as usize));
    let mut keys: Vec<(u64, [u8; 32])> = Vec::new();
    let mut lines: Vec<usize> = Vec::with_capacity(batch.min(total as usize));
    let mut flush = |pending: &mut Vec<Enrollment>,
                     lines: &mut Vec<usize>,
                     keys: &mut Vec<(u64, [u8; 32])>|
     -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        svc.enroll_many(pending).map_err(|e| {
            let line = match &e {
                Error::DuplicateDevice(k) => pending
                    .iter()
                    .position(|x| serial_key(x.serial) == *k)
                    .map(|i| lines[i]),
                _ => None,
            };
            Error::Input(format!(
                "{}:{}: {e}; {done} devices enrolled by earlier batches (committed), none of lines {}-{}",
                path.display(),
                line.map(|l| l.to_string()).unwrap_or_else(|| "?".into()),
                lines.first().copied().unwrap_or(0),
                lines.last().copied().unwrap_or(0),
            ))
        })?;
        svc.set_reset_keys(keys).map_err(|e| {
            Error::Input(format!(
                "{}: lines {}-{} enrolled, but storing their reset keys failed: {e}; store them with `enroll SERIAL --replace --reset-key-file`",
                path.display(),
                lines.first().copied().unwrap_or(0),
                lines.last().copied().unwrap_or(0),
            ))
        })?;
        done += pending.len() as u64;
        pending.clear();
        lines.clear();
        keys.clear();
        Ok(())
    };
    each_line(path, &mut |n, (e, rk)| {
        if let Some(k) = rk {
            keys.push((e.serial, k));
        }
        pending.push(e);
        lines.push(n);
        if pending.len() >= batch {
            flush(&mut pending, &mut lines, &mut keys)?;
        }
        Ok(())
    })?;
    flush(&mut pending, &mut lines, &mut keys)?;
    Ok(done)
}
