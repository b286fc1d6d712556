//! The counters service around a case: the device is enrolled from its state file
//! and must verify `trusted` before the case (provisioning gate); after the case
//! the service's verdict on the device is recorded (`service_verdict`). One service
//! database per attempt, in the attempt directory, so cases stay independent.

use crate::format::HostSpec;
use hilrig_counters::mac::Key;
use hilrig_counters::service::Enrollment;
use hilrig_counters::source::{CounterSource, DeviceSource};
use hilrig_counters::Service;
use std::path::Path;

fn open(dir: &Path, create: bool) -> Result<Service, String> {
    let key_path = dir.join("counters.key");
    let key = if create {
        Key::init(&key_path)
    } else {
        Key::load(&key_path)
    }
    .map_err(|e| format!("counters key: {e}"))?;
    let db = dir.join("counters.sqlite");
    Service::open(&db.to_string_lossy(), key).map_err(|e| format!("counters service: {e}"))
}

fn source(state: &Path) -> Result<DeviceSource<hilrig_device::Model>, String> {
    DeviceSource::model_file(state).map_err(|e| format!("reading the device: {e}"))
}

/// Enroll the device of `state` and verify it; an error unless it is trusted.
pub fn provision(dir: &Path, state: &Path, host: &HostSpec) -> Result<(), String> {
    let mut svc = open(dir, true)?;
    let obs = source(state)?
        .observe()
        .map_err(|e| format!("reading the device's counters: {e}"))?;
    svc.enroll(
        &Enrollment {
            serial: host.serial,
            host: host.name.clone(),
            rack: "sim".into(),
            expected: obs.as_expected(),
        },
        true,
    )
    .map_err(|e| format!("enrolling the device: {e}"))?;
    let r = svc
        .verify(host.serial, &mut source(state)?)
        .map_err(|e| format!("verifying the device before the case: {e}"))?;
    if !r.trusted() {
        return Err(format!(
            "device {} not trusted before the case: {} ({})",
            host.serial,
            verdict_name(&r.decision.verdict),
            r.decision.reasons.join("; ")
        ));
    }
    Ok(())
}

fn verdict_name(v: &hilrig_counters::Verdict) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{v:?}"))
}

/// The service's verdict on the device after the case, with its reasons.
pub fn verdict_after(
    dir: &Path,
    state: &Path,
    host: &HostSpec,
) -> Result<(String, String), String> {
    let mut svc = open(dir, false)?;
    let r = svc
        .verify(host.serial, &mut source(state)?)
        .map_err(|e| format!("verifying the device after the case: {e}"))?;
    Ok((
        verdict_name(&r.decision.verdict),
        r.decision.reasons.join("; "),
    ))
}

/// An authorised update as the rig records it before flashing: `image` (the whole
/// region after the update) is added to the catalog and the intent recorded.
pub fn begin_update(
    dir: &Path,
    host: &HostSpec,
    region: hilrig_device::Region,
    image: &[u8],
) -> Result<String, String> {
    let mut svc = open(dir, false)?;
    let sha = crate::scenario::sha_hex(image);
    svc.catalog_add(region, &sha, "campaign-target", "hilrig-campaigns")
        .map_err(|e| format!("adding the target image to the catalog: {e}"))?;
    let intent = svc
        .begin_update(host.serial, region, &sha)
        .map_err(|e| format!("recording the update intent: {e}"))?;
    Ok(format!("intent {intent}: {region:?} -> {}", &sha[..12]))
}
