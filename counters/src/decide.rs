//! The verdict decision: expected values and an observation in, a [`Decision`] out.
//! Pure: no database, no device. The service stores what it decides; the benchmark
//! measures it with the store around it.

use crate::Verdict;
use hilrig_device::oob::CounterReport;
use hilrig_device::Region;
use serde::{Deserialize, Serialize};

/// A SHA-256.
pub type Hash = [u8; 32];

/// Parse a SHA-256 in hex (64 digits); a clear error names what was wrong.
pub fn parse_hash(s: &str) -> crate::Result<Hash> {
    let t = s.trim();
    let t = t.strip_prefix("sha256:").unwrap_or(t);
    if t.len() != 64 {
        return Err(crate::Error::Input(format!(
            "hash {s:?} has {} hex digits; a SHA-256 has 64",
            t.len()
        )));
    }
    let v =
        hex::decode(t).map_err(|e| crate::Error::Input(format!("hash {s:?} is not hex: {e}")))?;
    let mut h = [0u8; 32];
    h.copy_from_slice(&v);
    Ok(h)
}

/// Parse a region name (vbios, firmware, config).
pub fn parse_region(s: &str) -> crate::Result<Region> {
    Region::parse(s.trim()).ok_or_else(|| {
        crate::Error::Input(format!(
            "unknown region {s:?}; use vbios, firmware or config"
        ))
    })
}

/// What the service expects of a device: counters, MASTER, EPOCH and the region
/// hashes it last verified as known-good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expected {
    /// Region counters: VBIOS, FIRMWARE, CONFIG.
    pub counters: [u32; 3],
    /// MASTER.
    pub master: u32,
    /// EPOCH.
    pub epoch: u32,
    /// Known-good region hashes.
    #[serde(with = "hashes_hex")]
    pub hashes: [Hash; 3],
}

/// What was read from a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    /// Counters as the OOB port reported them.
    pub report: CounterReport,
    /// Region hashes as the OOB port reported them.
    #[serde(with = "hashes_hex")]
    pub hashes: [Hash; 3],
}

impl Observation {
    /// The expected values this observation would become if accepted.
    pub fn as_expected(&self) -> Expected {
        Expected {
            counters: self.report.counters,
            master: self.report.master,
            epoch: self.report.epoch,
            hashes: self.hashes,
        }
    }
}

mod hashes_hex {
    use super::Hash;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(h: &[Hash; 3], s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut q = s.serialize_seq(Some(3))?;
        for x in h {
            q.serialize_element(&crate::mac::hex32(x))?;
        }
        q.end()
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[Hash; 3], D::Error> {
        let v: Vec<String> = Vec::deserialize(d)?;
        if v.len() != 3 {
            return Err(serde::de::Error::custom("want 3 region hashes"));
        }
        let mut out = [[0u8; 32]; 3];
        for (o, s) in out.iter_mut().zip(&v) {
            *o = super::parse_hash(s).map_err(serde::de::Error::custom)?;
        }
        Ok(out)
    }
}

/// How bad a verdict is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    /// Nothing to do.
    Info,
    /// Worth a look.
    Warning,
    /// Needs action (reflash, retry).
    Error,
    /// Security incident or locked device: page a human.
    Critical,
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        })
    }
}

/// The state a device is kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceState {
    /// Passed its last verify.
    Trusted,
    /// Holds an image not in the catalog after an authorised update: reflash it.
    NeedsReflash,
    /// Taken out of service: tampering, rollback, unauthorised image.
    Quarantined,
    /// Fuse blown: page a human.
    Locked,
    /// Not verified since enrolment, an update, or a failed read.
    Unknown,
    /// Counters rose with no authorised update intent (in a service that requires
    /// intents): held until an operator clears the hold.
    NeedsReview,
}

impl DeviceState {
    /// The name stored in the database.
    pub fn name(self) -> &'static str {
        match self {
            DeviceState::Trusted => "trusted",
            DeviceState::NeedsReflash => "needs-reflash",
            DeviceState::Quarantined => "quarantined",
            DeviceState::Locked => "locked",
            DeviceState::Unknown => "unknown",
            DeviceState::NeedsReview => "needs-review",
        }
    }

    /// Parse a stored name; anything else is `None`.
    pub fn parse(s: &str) -> Option<DeviceState> {
        Some(match s {
            "trusted" => DeviceState::Trusted,
            "needs-reflash" => DeviceState::NeedsReflash,
            "quarantined" => DeviceState::Quarantined,
            "locked" => DeviceState::Locked,
            "unknown" => DeviceState::Unknown,
            "needs-review" => DeviceState::NeedsReview,
            _ => return None,
        })
    }
}

impl std::fmt::Display for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An open authorised update: intent recorded before flashing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Intent {
    /// Intent id.
    pub id: i64,
    /// Region being flashed.
    pub region: Region,
    /// The image hash the update should leave.
    #[serde(serialize_with = "hex_ser")]
    pub target: Hash,
}

fn hex_ser<S: serde::Serializer>(h: &Hash, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(h))
}

/// How an open intent ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IntentOutcome {
    /// The device holds the intended image.
    Committed,
    /// The region changed to something else (accepted or not).
    Abandoned,
}

impl IntentOutcome {
    /// Stored name.
    pub fn name(self) -> &'static str {
        match self {
            IntentOutcome::Committed => "committed",
            IntentOutcome::Abandoned => "abandoned",
        }
    }
}

/// A verdict with everything needed to act on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The verdict.
    pub verdict: Verdict,
    /// The state the device goes to.
    pub state: DeviceState,
    /// How bad.
    pub severity: Severity,
    /// Whether the rig can bring the device back without a human (reflash, retry).
    pub recoverable: bool,
    /// Why, in words.
    pub reasons: Vec<String>,
    /// Record the observation as the new expected values.
    pub rebaseline: bool,
    /// Open intents this verdict closes.
    pub intents: Vec<(i64, IntentOutcome)>,
}

impl Decision {
    fn new(verdict: Verdict, state: DeviceState, severity: Severity, recoverable: bool) -> Self {
        Decision {
            verdict,
            state,
            severity,
            recoverable,
            reasons: Vec::new(),
            rebaseline: false,
            intents: Vec::new(),
        }
    }

    /// Fail closed: the device could not be verified (read error, timeout, internal
    /// error). Never trusted.
    pub fn unverifiable(reason: impl Into<String>) -> Decision {
        let mut d = Decision::new(
            Verdict::Unverifiable,
            DeviceState::Unknown,
            Severity::Error,
            true,
        );
        d.reasons.push(reason.into());
        d
    }

    /// Counters rose with no authorised update intent, in a service that requires
    /// one (the provisioning gate): not accepted as the new expected values; the
    /// device is held for an operator's review.
    pub fn needs_review(reason: impl Into<String>) -> Decision {
        let mut d = Decision::new(
            Verdict::Changed,
            DeviceState::NeedsReview,
            Severity::Error,
            false,
        );
        d.reasons.push(reason.into());
        d
    }

    /// Quarantine because a stored record was tampered with.
    pub fn tampered(reason: impl Into<String>) -> Decision {
        let mut d = Decision::new(
            Verdict::Quarantined,
            DeviceState::Quarantined,
            Severity::Critical,
            false,
        );
        d.reasons.push(reason.into());
        d
    }
}

/// Require an authorised intent for every counted attempt: an `accepted-update`
/// in which a region's counter rose without an intent on that region that this
/// observation commits becomes [`Decision::needs_review`] (nothing re-baselined,
/// no intent closed). Any other decision is returned as it is.
pub fn require_intents(
    d: Decision,
    exp: &Expected,
    obs: &Observation,
    intents: &[Intent],
) -> Decision {
    if d.verdict != Verdict::AcceptedUpdate {
        return d;
    }
    let mut uncovered = Vec::new();
    for (i, r) in Region::ALL.iter().enumerate() {
        if obs.report.counters[i] == exp.counters[i] {
            continue;
        }
        let covered = d.intents.iter().any(|(id, outcome)| {
            *outcome == IntentOutcome::Committed
                && intents.iter().any(|it| it.id == *id && it.region == *r)
        });
        if !covered {
            uncovered.push(format!(
                "{r} counter {} -> {}",
                exp.counters[i], obs.report.counters[i]
            ));
        }
    }
    if uncovered.is_empty() {
        return d;
    }
    let mut n = Decision::needs_review(format!(
        "counters rose with no authorised update intent ({}): not accepted as the new expected values",
        uncovered.join(", ")
    ));
    n.reasons.push(
        "held for review: clear with `hilrig counters hold clear SERIAL --reason ...` or reflash with `hilrig counters remediate`".into(),
    );
    n
}

/// Decide a verdict for a device expected to be `exp` that was observed as `obs`.
/// `in_catalog(region, hash)` says whether an image is known-good; `intents` are the
/// device's open authorised updates.
pub fn decide(
    exp: &Expected,
    obs: &Observation,
    in_catalog: &dyn Fn(Region, &Hash) -> bool,
    intents: &[Intent],
) -> Decision {
    let a = &obs.report;
    // 1. Counters never go backwards: MASTER is never cleared, EPOCH only grows, and
    //    region counters only drop on a physical reset (which advances EPOCH).
    let mut back = Vec::new();
    if a.epoch < exp.epoch {
        back.push(format!("epoch {} < expected {}", a.epoch, exp.epoch));
    }
    if a.master < exp.master {
        back.push(format!("master {} < expected {}", a.master, exp.master));
    }
    if a.epoch == exp.epoch {
        for (i, r) in Region::ALL.iter().enumerate() {
            if a.counters[i] < exp.counters[i] {
                back.push(format!(
                    "{r} counter {} < expected {}",
                    a.counters[i], exp.counters[i]
                ));
            }
        }
    }
    if !back.is_empty() {
        let mut d = Decision::new(
            Verdict::RolledBack,
            DeviceState::Quarantined,
            Severity::Critical,
            false,
        );
        d.reasons = back;
        d.reasons
            .push("counters never go backwards: restored state or tampering".into());
        return d;
    }
    // 2. Fuse blown: locked for good until a keyed physical reset.
    if a.fuse {
        let mut d = Decision::new(
            Verdict::Locked,
            DeviceState::Locked,
            Severity::Critical,
            false,
        );
        d.reasons.push(format!(
            "fuse blown (counters {:?}, width {}): flash refused for good; page a human (only the keyed OOB physical reset clears it)",
            a.counters, a.width
        ));
        return d;
    }
    // Per-region image check: unchanged from the last known-good, or in the catalog.
    let mut good = [true; 3];
    for (i, &r) in Region::ALL.iter().enumerate() {
        good[i] = obs.hashes[i] == exp.hashes[i] || in_catalog(r, &obs.hashes[i]);
    }
    let bad_reasons = |d: &mut Decision| {
        for (i, r) in Region::ALL.iter().enumerate() {
            if !good[i] {
                d.reasons.push(format!(
                    "{r} image {} is not in the catalog",
                    hex::encode(obs.hashes[i])
                ));
            }
        }
    };
    let close_intents = |d: &mut Decision, epoch_changed: bool| {
        for it in intents {
            let i = it.region as usize;
            if obs.hashes[i] == it.target {
                d.intents.push((it.id, IntentOutcome::Committed));
            } else if epoch_changed || a.counters[i] != exp.counters[i] {
                d.intents.push((it.id, IntentOutcome::Abandoned));
            }
        }
    };
    // 3. Physical reset: a distinct outcome, re-baselined only on known-good images.
    if a.epoch > exp.epoch {
        let all_good = good.iter().all(|&g| g);
        let mut d = if all_good {
            let mut d = Decision::new(
                Verdict::PhysicalReset,
                DeviceState::Trusted,
                Severity::Warning,
                true,
            );
            d.rebaseline = true;
            close_intents(&mut d, true);
            d
        } else {
            Decision::new(
                Verdict::PhysicalReset,
                DeviceState::NeedsReflash,
                Severity::Error,
                true,
            )
        };
        d.reasons.insert(
            0,
            format!(
                "physical reset: epoch {} -> {}, counters {:?} -> {:?}, master {} -> {}",
                exp.epoch, a.epoch, exp.counters, a.counters, exp.master, a.master
            ),
        );
        if all_good {
            d.reasons
                .push("every region image is known-good: re-baselined".into());
        } else {
            bad_reasons(&mut d);
            d.reasons
                .push("not re-baselined: reflash known-good images".into());
        }
        return d;
    }
    // 4. Same epoch, nothing counted: the images must be the ones last verified.
    let mut d_reasons = Vec::new();
    for (i, r) in Region::ALL.iter().enumerate() {
        if a.counters[i] == exp.counters[i] && obs.hashes[i] != exp.hashes[i] {
            d_reasons.push(format!(
                "{r} image changed ({} -> {}) with no counted attempt: counter bypassed",
                hex::encode(exp.hashes[i]),
                hex::encode(obs.hashes[i])
            ));
        }
    }
    let region_delta: u64 = (0..3)
        .map(|i| (a.counters[i] - exp.counters[i]) as u64)
        .sum();
    let master_delta = (a.master - exp.master) as u64;
    if master_delta != region_delta {
        d_reasons.push(format!(
            "master advanced by {master_delta} but the region counters by {region_delta}"
        ));
    }
    if !d_reasons.is_empty() {
        let mut d = Decision::new(
            Verdict::Quarantined,
            DeviceState::Quarantined,
            Severity::Critical,
            false,
        );
        d.reasons = d_reasons;
        return d;
    }
    if master_delta == 0 {
        return Decision::new(Verdict::Trusted, DeviceState::Trusted, Severity::Info, true);
    }
    // 5. Counters advanced: accept if every image is known-good.
    let mut changes = Vec::new();
    for (i, r) in Region::ALL.iter().enumerate() {
        if a.counters[i] != exp.counters[i] {
            changes.push(format!(
                "{r} counter {} -> {}",
                exp.counters[i], a.counters[i]
            ));
        }
    }
    if good.iter().all(|&g| g) {
        let mut d = Decision::new(
            Verdict::AcceptedUpdate,
            DeviceState::Trusted,
            Severity::Info,
            true,
        );
        d.rebaseline = true;
        close_intents(&mut d, false);
        d.reasons = changes;
        d.reasons
            .push("every region image is in the catalog: new expected values recorded".into());
        if d.intents.is_empty() {
            d.severity = Severity::Warning;
            d.reasons
                .push("no authorised update intent covered these attempts".into());
        }
        return d;
    }
    // A bad image: after an authorised update (an open intent on that region) it is
    // an interrupted or wrong flash: reflash. Otherwise an unauthorised image.
    let intended_bad = Region::ALL
        .iter()
        .enumerate()
        .all(|(i, r)| good[i] || intents.iter().any(|it| it.region == *r));
    let mut d = if intended_bad {
        Decision::new(
            Verdict::NeedsReflash,
            DeviceState::NeedsReflash,
            Severity::Error,
            true,
        )
    } else {
        Decision::new(
            Verdict::Quarantined,
            DeviceState::Quarantined,
            Severity::Critical,
            true,
        )
    };
    d.reasons = changes;
    bad_reasons(&mut d);
    if intended_bad {
        d.reasons
            .push("an authorised update of that region is open: reflash a catalog image".into());
    } else {
        d.reasons
            .push("no authorised update covers it: quarantined, reflash a catalog image".into());
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp() -> Expected {
        Expected {
            counters: [1, 2, 0],
            master: 3,
            epoch: 0,
            hashes: [[1; 32], [2; 32], [3; 32]],
        }
    }

    fn obs(c: [u32; 3], master: u32, epoch: u32, fuse: bool, h: [Hash; 3]) -> Observation {
        Observation {
            report: CounterReport {
                counters: c,
                master,
                fuse,
                slots_left: 0,
                width: 8,
                epoch,
            },
            hashes: h,
        }
    }

    #[test]
    fn every_verdict() {
        let e = exp();
        let good = [[1; 32], [9; 32], [3; 32]];
        let cat = |r: Region, h: &Hash| r == Region::Firmware && *h == [9; 32];
        let none = |_: Region, _: &Hash| false;
        let it = [Intent {
            id: 7,
            region: Region::Firmware,
            target: [9; 32],
        }];
        let v =
            |o: &Observation, c: &dyn Fn(Region, &Hash) -> bool, i: &[Intent]| decide(&e, o, c, i);
        assert_eq!(
            v(&obs([1, 2, 0], 3, 0, false, e.hashes), &none, &[]).verdict,
            Verdict::Trusted
        );
        let d = v(&obs([1, 4, 0], 5, 0, false, good), &cat, &it);
        assert_eq!(d.verdict, Verdict::AcceptedUpdate);
        assert_eq!(d.intents, vec![(7, IntentOutcome::Committed)]);
        assert!(d.rebaseline);
        assert_eq!(
            v(&obs([1, 4, 0], 5, 0, false, good), &none, &it).verdict,
            Verdict::NeedsReflash
        );
        let d = v(&obs([1, 4, 0], 5, 0, false, good), &none, &[]);
        assert_eq!((d.verdict, d.recoverable), (Verdict::Quarantined, true));
        assert_eq!(
            v(&obs([1, 1, 0], 3, 0, false, e.hashes), &none, &[]).verdict,
            Verdict::RolledBack
        );
        assert_eq!(
            v(&obs([1, 2, 0], 2, 0, false, e.hashes), &none, &[]).verdict,
            Verdict::RolledBack
        );
        assert_eq!(
            v(&obs([0, 0, 0], 3, 0, false, e.hashes), &none, &[]).verdict,
            Verdict::RolledBack
        );
        assert_eq!(
            v(&obs([8, 2, 0], 10, 0, true, e.hashes), &none, &[]).verdict,
            Verdict::Locked
        );
        let d = v(&obs([0, 0, 0], 3, 1, false, e.hashes), &none, &[]);
        assert_eq!(
            (d.verdict, d.state),
            (Verdict::PhysicalReset, DeviceState::Trusted)
        );
        let d = v(&obs([0, 0, 0], 3, 1, false, [[5; 32]; 3]), &none, &[]);
        assert_eq!(
            (d.verdict, d.state),
            (Verdict::PhysicalReset, DeviceState::NeedsReflash)
        );
        // Content changed with no counted attempt; master out of step with regions.
        let d = v(&obs([1, 2, 0], 3, 0, false, good), &cat, &[]);
        assert_eq!((d.verdict, d.recoverable), (Verdict::Quarantined, false));
        let d = v(&obs([1, 3, 0], 5, 0, false, e.hashes), &none, &[]);
        assert_eq!(d.verdict, Verdict::Quarantined);
    }

    #[test]
    fn extreme_values_never_panic() {
        let e = exp();
        let none = |_: Region, _: &Hash| false;
        for &x in &[0u32, 1, 2, 3, u32::MAX - 1, u32::MAX] {
            for &m in &[0u32, 3, u32::MAX] {
                for &ep in &[0u32, 1, u32::MAX] {
                    let _ = decide(
                        &e,
                        &obs([x, x, x], m, ep, x % 2 == 0, [[0; 32]; 3]),
                        &none,
                        &[],
                    );
                }
            }
        }
        let max = Expected {
            counters: [u32::MAX; 3],
            master: u32::MAX,
            epoch: u32::MAX,
            hashes: [[0; 32]; 3],
        };
        let _ = decide(
            &max,
            &obs([u32::MAX; 3], u32::MAX, u32::MAX, false, [[1; 32]; 3]),
            &none,
            &[],
        );
        assert!(parse_hash("zz").is_err());
        assert!(parse_hash(&"0".repeat(65)).is_err());
        assert!(parse_hash(&format!("sha256:{}", "a".repeat(64))).is_ok());
    }
}
