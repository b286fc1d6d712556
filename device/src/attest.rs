//! What the counters service concludes about a device: the [`Verdict`] type shared by
//! the service, the VMM's teardown records, campaign expectations and reports.

use serde::{Deserialize, Serialize};

/// The outcome of comparing a device's counters with what was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Counters equal the expected values.
    Trusted,
    /// Counters advanced: updates happened that must be checked against the catalog.
    Changed,
    /// A counter is lower than expected within the same epoch: tampering or a
    /// restored state file.
    RolledBack,
    /// The fuse is blown: the device is locked for good; page a human.
    Locked,
    /// Counters advanced and every region image is in the catalog: the new values
    /// were recorded.
    AcceptedUpdate,
    /// An authorised update left an image that is not in the catalog: reflash.
    NeedsReflash,
    /// Taken out of service: unauthorised image, bypassed counter, tampered record.
    Quarantined,
    /// EPOCH advanced: the keyed physical reset happened.
    PhysicalReset,
    /// The hardware counted attempts the VMM never saw: its trap was bypassed.
    BypassedTrap,
    /// The VMM passed attempts to the device that the hardware did not count.
    Undercount,
    /// The device could not be read or the service failed: fail closed, not trusted.
    Unverifiable,
}

impl Verdict {
    /// Every verdict.
    pub const ALL: [Verdict; 11] = [
        Verdict::Trusted,
        Verdict::Changed,
        Verdict::RolledBack,
        Verdict::Locked,
        Verdict::AcceptedUpdate,
        Verdict::NeedsReflash,
        Verdict::Quarantined,
        Verdict::PhysicalReset,
        Verdict::BypassedTrap,
        Verdict::Undercount,
        Verdict::Unverifiable,
    ];

    /// Parse a verdict's name.
    pub fn parse(s: &str) -> Option<Verdict> {
        Verdict::ALL.into_iter().find(|v| v.to_string() == s)
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Trusted => "trusted",
            Verdict::Changed => "changed",
            Verdict::RolledBack => "rolled-back",
            Verdict::Locked => "locked",
            Verdict::AcceptedUpdate => "accepted-update",
            Verdict::NeedsReflash => "needs-reflash",
            Verdict::Quarantined => "quarantined",
            Verdict::PhysicalReset => "physical-reset",
            Verdict::BypassedTrap => "bypassed-trap",
            Verdict::Undercount => "undercount",
            Verdict::Unverifiable => "unverifiable",
        })
    }
}

impl std::str::FromStr for Verdict {
    type Err = UnknownVerdict;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Verdict::parse(s).ok_or_else(|| UnknownVerdict(s.to_string()))
    }
}

/// A name that is not a verdict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown counters verdict `{0}` (expected one of: trusted, changed, rolled-back, locked, accepted-update, needs-reflash, quarantined, physical-reset, bypassed-trap, undercount, unverifiable)")]
pub struct UnknownVerdict(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for v in Verdict::ALL {
            assert_eq!(v.to_string().parse::<Verdict>(), Ok(v));
            assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{v}\""));
        }
        assert!("fine".parse::<Verdict>().is_err());
    }
}
