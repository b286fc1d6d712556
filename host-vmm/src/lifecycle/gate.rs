//! The provisioning gate (issue 21 item 4): before a guest gets the device, its
//! counters are read OUT OF BAND (the device's OOB byte interface, `Device::oob`,
//! which for `fpga` is the board's OOB port — never the in-band counter registers)
//! and the counters service decides against the enrolled expected values.
//!
//! The gate admits the device only when the service's verdict is `trusted`, or
//! `accepted-update` closing an authorised update intent. Everything else is
//! refused: an unknown device, a rollback, a quarantined/held, locked or
//! needs-reflash device, and counters that rose with no authorised intent (an
//! update attempt made behind the service's back). The gate runs the service with
//! `require_intents`: such counters are NOT made the new expected values; the
//! device is held `needs-review` (a hold, the observation kept as evidence) and
//! every later start is refused too, until an operator clears the hold
//! (`hilrig counters hold clear SERIAL --reason ...`). A fault on the OOB read is a
//! transport fault (no verdict on the device, nothing written to the service), and
//! the device is refused all the same (fail closed).

use hilrig_counters::remediate::Pager;
use hilrig_counters::source::CounterSource;
use hilrig_counters::{Error as CountersError, Service};
use hilrig_device::attest::Verdict;
use hilrig_device::oob::{self, Request, Response};
use hilrig_device::Device;
use hilrig_vmm_api::{GateOutcome, GateRecord};
use std::path::Path;
use std::time::Instant;

/// A device's OOB byte interface as a counters source: every request goes through
/// [`oob::request_device`] (framed, CRC-checked), errors keep their OOB cause.
struct OobSource<'a> {
    dev: &'a mut dyn Device,
    label: String,
}

impl CounterSource for OobSource<'_> {
    fn name(&self) -> String {
        self.label.clone()
    }
    fn request(&mut self, req: &Request) -> hilrig_counters::Result<Response> {
        oob::request_device(self.dev, req).map_err(|e| CountersError::Source {
            source_name: self.label.clone(),
            detail: e.to_string(),
        })
    }
}

/// Whether a verify report lets the guest have the device.
fn admits(r: &hilrig_counters::service::VerifyReport) -> bool {
    if !r.trusted() {
        return false;
    }
    match r.decision.verdict {
        Verdict::Trusted => true,
        // Counters rose: only an authorised update (an intent it closes) is fine.
        Verdict::AcceptedUpdate => !r.decision.intents.is_empty(),
        _ => false,
    }
}

/// Run the gate on `dev` (labelled `label` in messages) against the counters
/// service at `db` with the MAC key file `key`; a refused locked or quarantined
/// device is paged to a human through `pager` (`--page-cmd`; the reasons say whom
/// it paged, or that paging failed: the device is refused either way). Never
/// panics; every failure is a refusing [`GateRecord`].
pub fn check(
    dev: &mut dyn Device,
    label: &str,
    db: &str,
    key: &Path,
    pager: Option<&Pager>,
) -> GateRecord {
    let t0 = Instant::now();
    // Read the device first, out of band: identity, counters, region hashes.
    let mut src = OobSource {
        dev,
        label: format!("{label} (OOB)"),
    };
    let mut rec = check_inner(&mut src, db, key, pager);
    rec.micros = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
    rec
}

fn record(outcome: GateOutcome, serial: Option<u64>, reasons: Vec<String>) -> GateRecord {
    GateRecord {
        outcome,
        serial: serial.map(hilrig_counters::service::serial_key),
        verdict: None,
        reasons,
        micros: 0,
    }
}

fn check_inner(src: &mut OobSource, db: &str, key: &Path, pager: Option<&Pager>) -> GateRecord {
    let serial = match src.serial() {
        Ok(s) => s,
        Err(e) => {
            return record(
                GateOutcome::TransportFault,
                None,
                vec![format!("reading the device's identity out of band: {e}")],
            )
        }
    };
    let obs = match src.observe() {
        Ok(o) => o,
        Err(e) => {
            return record(
                GateOutcome::TransportFault,
                Some(serial),
                vec![format!("reading the device's counters out of band: {e}")],
            )
        }
    };
    let key = match hilrig_counters::mac::Key::load(key) {
        Ok(k) => k,
        Err(e) => {
            return record(
                GateOutcome::ServiceError,
                Some(serial),
                vec![format!("counters key: {e}")],
            )
        }
    };
    let mut svc = match Service::open(db, key) {
        Ok(s) => s,
        Err(e) => {
            return record(
                GateOutcome::ServiceError,
                Some(serial),
                vec![format!("counters service {db}: {e}")],
            )
        }
    };
    svc.require_intents = true;
    match svc.verify_observation(serial, Ok(obs)) {
        Ok(r) => {
            let ok = admits(&r);
            let mut reasons = r.decision.reasons.clone();
            if !ok && r.trusted() {
                reasons.push(
                    "counters rose with no authorised update intent: refused at provisioning"
                        .into(),
                );
            }
            if !ok {
                reasons.push(format!("device state: {}", r.decision.state));
                if let Some(p) = pager {
                    match hilrig_counters::remediate::page_refused(p, &r) {
                        Ok(Some(to)) => reasons.push(format!("paged: {to}")),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!("paging a human failed: {e}");
                            reasons.push(format!("paging a human FAILED: {e}"));
                        }
                    }
                }
            }
            GateRecord {
                outcome: if ok {
                    GateOutcome::Trusted
                } else {
                    GateOutcome::Untrusted
                },
                serial: Some(hilrig_counters::service::serial_key(serial)),
                verdict: Some(r.decision.verdict),
                reasons,
                micros: 0,
            }
        }
        Err(CountersError::UnknownDevice(s)) => record(
            GateOutcome::UnknownDevice,
            Some(serial),
            vec![format!(
                "device {s} is not enrolled with the counters service"
            )],
        ),
        Err(e) => record(
            GateOutcome::ServiceError,
            Some(serial),
            vec![format!("counters service verify: {e}")],
        ),
    }
}
