//! [`ExitStatus`]: the one place the VMM's process exit statuses are defined.

use serde::{Deserialize, Serialize};

/// How a `hilrig vm run` / `hilrig-vmm` process ended, as its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
#[repr(u8)]
pub enum ExitStatus {
    /// 0: the payload wrote 0 to the exit port.
    Pass = 0,
    /// 1: the payload wrote a non-zero code.
    Fail = 1,
    /// 2: usage or setup error (bad payload, backend, KVM unavailable, ...).
    Usage = 2,
    /// 3: the watchdog stopped the guest.
    Timeout = 3,
    /// 4: KVM_EXIT_SHUTDOWN (a triple fault).
    TripleFault = 4,
    /// 5: MMIO nothing claims, or an access the device refused.
    BadAccess = 5,
    /// 6: an exit reason the VMM does not handle.
    UnknownExit = 6,
    /// 7: every vCPU halted without reporting.
    NoVerdict = 7,
    /// 8: the VMM failed while the guest ran.
    VmmError = 8,
    /// 9: stopped from outside (teardown, operator).
    Stopped = 9,
    /// 10: the device was refused before the guest started (measured VBIOS).
    DeviceRefused = 10,
    /// 11: a VMM thread made a syscall its seccomp filter forbids; the VMM was
    /// killed (the message on standard error names the thread kind and syscall).
    SeccompViolation = 11,
    /// 12: the counters service does not vouch for the device (unknown, rolled back,
    /// quarantined, locked, needs reflash, an unrecorded update attempt) or its
    /// counters could not be read out of band: refused before the guest started.
    DeviceUntrusted = 12,
}

impl ExitStatus {
    /// Every status, by code.
    pub const ALL: [ExitStatus; 13] = [
        ExitStatus::Pass,
        ExitStatus::Fail,
        ExitStatus::Usage,
        ExitStatus::Timeout,
        ExitStatus::TripleFault,
        ExitStatus::BadAccess,
        ExitStatus::UnknownExit,
        ExitStatus::NoVerdict,
        ExitStatus::VmmError,
        ExitStatus::Stopped,
        ExitStatus::DeviceRefused,
        ExitStatus::SeccompViolation,
        ExitStatus::DeviceUntrusted,
    ];

    /// The numeric process exit status.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The status for a process exit code (None: not one the VMM uses, e.g. a
    /// signal's 128+n or a crash).
    pub fn from_code(code: i32) -> Option<ExitStatus> {
        u8::try_from(code)
            .ok()
            .and_then(|c| ExitStatus::try_from(c).ok())
    }

    /// The short name, as campaign files and reports spell it.
    pub fn name(self) -> &'static str {
        match self {
            ExitStatus::Pass => "pass",
            ExitStatus::Fail => "fail",
            ExitStatus::Usage => "usage",
            ExitStatus::Timeout => "timeout",
            ExitStatus::TripleFault => "triple-fault",
            ExitStatus::BadAccess => "bad-access",
            ExitStatus::UnknownExit => "unknown-exit",
            ExitStatus::NoVerdict => "no-verdict",
            ExitStatus::VmmError => "vmm-error",
            ExitStatus::Stopped => "stopped",
            ExitStatus::DeviceRefused => "device-refused",
            ExitStatus::SeccompViolation => "seccomp-violation",
            ExitStatus::DeviceUntrusted => "device-untrusted",
        }
    }
}

impl From<ExitStatus> for u8 {
    fn from(s: ExitStatus) -> u8 {
        s.code()
    }
}

impl From<ExitStatus> for std::process::ExitCode {
    fn from(s: ExitStatus) -> std::process::ExitCode {
        std::process::ExitCode::from(s.code())
    }
}

/// A number that is not one of the VMM's exit statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not a VMM exit status (0..=11)")]
pub struct UnknownStatus(pub u8);

impl TryFrom<u8> for ExitStatus {
    type Error = UnknownStatus;
    fn try_from(c: u8) -> Result<Self, Self::Error> {
        ExitStatus::ALL
            .get(usize::from(c))
            .copied()
            .ok_or(UnknownStatus(c))
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.code(), self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for (i, s) in ExitStatus::ALL.iter().enumerate() {
            assert_eq!(s.code() as usize, i);
            assert_eq!(ExitStatus::from_code(i as i32), Some(*s));
            assert_eq!(serde_json::to_string(s).unwrap(), i.to_string());
        }
        assert_eq!(ExitStatus::from_code(12), Some(ExitStatus::DeviceUntrusted));
        assert_eq!(
            ExitStatus::from_code(11),
            Some(ExitStatus::SeccompViolation)
        );
        assert_eq!(ExitStatus::from_code(13), None);
        assert_eq!(ExitStatus::from_code(-1), None);
        assert_eq!(ExitStatus::from_code(137), None);
        assert!(serde_json::from_str::<ExitStatus>("42").is_err());
    }
}
