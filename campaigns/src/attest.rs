//! The counters service around a case: the device is enrolled from the state the
//! rig prepared ([`enroll`]), and before the case it must verify `trusted` against
//! those enrolled values (provisioning gate, [`provision`]); after the case
//! the service's verdict on the device is recorded (`service_verdict`). One service
//! database per attempt, in the attempt directory, so cases stay independent.

use crate::format::HostSpec;
use hilrig_counters::mac::Key;
use hilrig_counters::remediate::Pager;
use hilrig_counters::service::Enrollment;
use hilrig_counters::source::{CounterSource, DeviceSource};
use hilrig_counters::Service;
use hilrig_device::attest::Verdict;
use hilrig_device::NvState;
use std::path::Path;

/// Why the counters service could not be asked, or said no.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// A service call failed.
    #[error("{what}: {source}")]
    Service {
        /// What was being done.
        what: &'static str,
        /// The service's error.
        source: hilrig_counters::Error,
    },
    /// The prepared device state is not a valid device.
    #[error("the prepared device state: {detail}")]
    Prepared {
        /// What is wrong.
        detail: String,
    },
    /// The device is not trusted before the case.
    #[error("device {serial} not trusted before the case: {verdict} ({reasons}){paged}")]
    NotTrusted {
        /// Its serial number.
        serial: u64,
        /// The verdict.
        verdict: Verdict,
        /// Why.
        reasons: String,
        /// Whether a human was paged about it.
        paged: Paged,
    },
}

/// Whether a refusal at the gate paged a human (the inventory's `[counters]`
/// `page` command or `webhook`): only a locked or quarantined device is paged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Paged {
    /// Nobody: no pager, or a verdict no human needs to see.
    Nobody,
    /// Paged (whom).
    Sent(String),
    /// Paging failed (why); the device is refused all the same.
    Failed(String),
}

impl std::fmt::Display for Paged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Paged::Nobody => Ok(()),
            Paged::Sent(to) => write!(f, " (paged: {to})"),
            Paged::Failed(e) => write!(f, " (paging a human FAILED: {e})"),
        }
    }
}

fn ctx(what: &'static str) -> impl FnOnce(hilrig_counters::Error) -> AttestError {
    move |source| AttestError::Service { what, source }
}

fn open(dir: &Path, create: bool) -> Result<Service, AttestError> {
    let key_path = dir.join("counters.key");
    let key = if create {
        Key::init(&key_path)
    } else {
        Key::load(&key_path)
    }
    .map_err(ctx("counters key"))?;
    let db = dir.join("counters.sqlite");
    Service::open(&db.to_string_lossy(), key).map_err(ctx("counters service"))
}

fn source(state: &Path) -> Result<DeviceSource<hilrig_device::Model>, AttestError> {
    DeviceSource::model_file(state).map_err(ctx("reading the device"))
}

/// Enrol device `serial` of `host` with the expected values `expected` (an
/// observation the rig computed for the device it prepared, e.g. a board's
/// factory state, or read right after the rig's keyed physical reset).
pub fn enroll_observation(
    dir: &Path,
    host: &HostSpec,
    serial: u64,
    expected: &hilrig_counters::decide::Observation,
) -> Result<(), AttestError> {
    let mut svc = open(dir, true)?;
    svc.enroll(
        &Enrollment {
            serial,
            host: host.name.clone(),
            rack: "sim".into(),
            expected: expected.as_expected(),
        },
        true,
    )
    .map_err(ctx("enrolling the device"))?;
    Ok(())
}

/// The observation (counters and region hashes, as the OOB port reports them)
/// of a device in state `nv`, computed in memory.
pub fn observation_of(nv: &NvState) -> Result<hilrig_counters::decide::Observation, AttestError> {
    let model = hilrig_device::Model::new(nv.clone()).map_err(|e| AttestError::Prepared {
        detail: e.to_string(),
    })?;
    DeviceSource::new(model, "the prepared device state")
        .observe()
        .map_err(ctx("reading the prepared device state"))
}

/// Enrol the device as the rig prepared it: its expected values are taken from
/// `prepared` (the state the rig wrote, read in memory), never from the device's
/// state file, so whatever happens to the device afterwards is judged against
/// them. Creates the attempt's key and service database.
pub fn enroll(dir: &Path, host: &HostSpec, prepared: &NvState) -> Result<(), AttestError> {
    let model = hilrig_device::Model::new(prepared.clone()).map_err(|e| AttestError::Prepared {
        detail: e.to_string(),
    })?;
    let obs = DeviceSource::new(model, "the prepared device state")
        .observe()
        .map_err(ctx("reading the prepared device state"))?;
    let mut svc = open(dir, true)?;
    svc.enroll_with_reset_key(
        &Enrollment {
            serial: host.serial,
            host: host.name.clone(),
            rack: "sim".into(),
            expected: obs.as_expected(),
        },
        true,
        &prepared.reset_key,
    )
    .map_err(ctx("enrolling the device"))?;
    Ok(())
}

/// The provisioning gate before a case: the device of `state` is read out of band
/// and verified against the values enrolled earlier ([`enroll`]); it never
/// enrols. An error unless the service says `trusted` (or `accepted-update` closing
/// an authorised intent): counters rolled back or advanced behind the service's
/// back, a held, locked or needs-reflash device, an unknown one are all refused.
pub fn provision(dir: &Path, state: &Path, host: &HostSpec) -> Result<(), AttestError> {
    provision_paging(dir, state, host, None)
}

/// [`provision`], and a locked or quarantined device refused is paged to a human
/// through `pager` (the inventory's `[counters]` `page`/`webhook`); the error
/// says whether the page went out ([`Paged`]).
pub fn provision_paging(
    dir: &Path,
    state: &Path,
    host: &HostSpec,
    pager: Option<&Pager>,
) -> Result<(), AttestError> {
    provision_from_paging(dir, host.serial, &mut source(state)?, pager)
}

/// [`provision`] of device `serial` read out of band through `src` (a board's OOB
/// port).
pub fn provision_from(
    dir: &Path,
    serial: u64,
    src: &mut dyn CounterSource,
) -> Result<(), AttestError> {
    provision_from_paging(dir, serial, src, None)
}

/// [`provision_from`] paging through `pager` (see [`provision_paging`]).
pub fn provision_from_paging(
    dir: &Path,
    serial: u64,
    src: &mut dyn CounterSource,
    pager: Option<&Pager>,
) -> Result<(), AttestError> {
    provision_observed(dir, serial, src, pager).map(|_| ())
}

/// [`provision_from_paging`], returning what the gate read out of band (the
/// device as the case starts on it; `None` if the service kept no reading).
pub fn provision_observed(
    dir: &Path,
    serial: u64,
    src: &mut dyn CounterSource,
    pager: Option<&Pager>,
) -> Result<Option<hilrig_counters::decide::Observation>, AttestError> {
    let host_serial = serial;
    let mut svc = open(dir, false)?;
    // As the VMM's gate and rig leases: counters that rose with no committed
    // intent are not re-baselined; the device is held for review and stays
    // refused until `counters hold clear`.
    svc.require_intents = true;
    let r = svc
        .verify(serial, src)
        .map_err(ctx("verifying the device before the case"))?;
    let authorised = match r.decision.verdict {
        Verdict::Trusted => true,
        Verdict::AcceptedUpdate => !r.decision.intents.is_empty(),
        _ => false,
    };
    if !r.trusted() || !authorised {
        let mut reasons = r.decision.reasons.clone();
        if r.trusted() {
            reasons.push("counters rose with no authorised update intent".into());
        }
        // Locked or quarantined: a human is paged (refused either way).
        let paged = match pager.map(|p| hilrig_counters::remediate::page_refused(p, &r)) {
            Some(Ok(Some(to))) => Paged::Sent(to),
            Some(Err(e)) => {
                tracing::error!("device {host_serial}: paging a human failed: {e}");
                Paged::Failed(e.to_string())
            }
            Some(Ok(None)) | None => Paged::Nobody,
        };
        return Err(AttestError::NotTrusted {
            serial: host_serial,
            verdict: r.decision.verdict,
            reasons: reasons.join("; "),
            paged,
        });
    }
    Ok(r.observed)
}

/// The service's verdict on the device after the case, with its reasons.
pub fn verdict_after(
    dir: &Path,
    state: &Path,
    host: &HostSpec,
) -> Result<(Verdict, String), AttestError> {
    verdict_from(dir, host.serial, &mut source(state)?)
}

/// [`verdict_after`] of device `serial` read out of band through `src`.
pub fn verdict_from(
    dir: &Path,
    serial: u64,
    src: &mut dyn CounterSource,
) -> Result<(Verdict, String), AttestError> {
    verdict_observed(dir, serial, src).map(|(v, why, _)| (v, why))
}

/// [`verdict_from`], with what the service read out of band for it (`None` if
/// it kept no reading).
pub fn verdict_observed(
    dir: &Path,
    serial: u64,
    src: &mut dyn CounterSource,
) -> Result<
    (
        Verdict,
        String,
        Option<hilrig_counters::decide::Observation>,
    ),
    AttestError,
> {
    let mut svc = open(dir, false)?;
    let r = svc
        .verify(serial, src)
        .map_err(ctx("verifying the device after the case"))?;
    Ok((
        r.decision.verdict,
        r.decision.reasons.join("; "),
        r.observed,
    ))
}

/// An authorised update as the rig records it before flashing: `image` (the whole
/// region after the update) is added to the catalog and the intent recorded.
pub fn begin_update(
    dir: &Path,
    host: &HostSpec,
    region: hilrig_device::Region,
    image: &[u8],
) -> Result<String, AttestError> {
    let mut svc = open(dir, false)?;
    let sha = crate::scenario::sha_hex(image);
    svc.catalog_add(region, &sha, "campaign-target", "hilrig-campaigns")
        .map_err(ctx("adding the target image to the catalog"))?;
    let intent = svc
        .begin_update(host.serial, region, &sha)
        .map_err(ctx("recording the update intent"))?;
    Ok(format!("intent {intent}: {region:?} -> {}", &sha[..12]))
}
