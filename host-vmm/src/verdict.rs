//! [`Verdict`]: how a VM run ended, as the VM decides it (the process exit status is
//! [`Verdict::exit_status`]). Shared by the vCPU loop, the fault path and the
//! lifecycle operations.

use hilrig_vmm_api::ExitStatus;
use std::time::Duration;

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The payload wrote 0 to the exit port.
    Pass,
    /// The payload wrote a non-zero code to the exit port.
    Fail {
        /// The code.
        code: u32,
        /// Which vCPU reported it.
        vcpu: u8,
    },
    /// The watchdog stopped the guest.
    Timeout {
        /// The limit that was exceeded.
        after: Duration,
    },
    /// KVM_EXIT_SHUTDOWN: a triple fault (or a guest-requested shutdown).
    TripleFault {
        /// The vCPU.
        vcpu: u8,
        /// RIP as KVM reports it after the shutdown.
        rip: u64,
    },
    /// An MMIO access nothing claims, or one the device refused.
    BadAccess {
        /// The vCPU.
        vcpu: u8,
        /// Guest-physical address.
        addr: u64,
        /// Length in bytes.
        len: usize,
        /// Write (true) or read.
        write: bool,
        /// Why.
        detail: String,
        /// Guest RIP of the access.
        rip: u64,
        /// The instruction at RIP, decoded (Intel syntax), or why it could not be.
        insn: String,
    },
    /// An exit the VMM does not handle.
    UnknownExit {
        /// The vCPU.
        vcpu: u8,
        /// The exit, as KVM reported it.
        exit: String,
    },
    /// Every vCPU halted without a verdict.
    NoVerdict,
    /// The VMM itself failed while the guest ran (KVM error, device transport).
    Internal(String),
    /// Stopped from outside through a [`StopHandle`] (teardown, operator).
    Stopped(String),
}

impl Verdict {
    /// The process exit status for this verdict ([`ExitStatus`]; usage errors and a
    /// refused device are decided at the CLI edge).
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            Verdict::Pass => ExitStatus::Pass,
            Verdict::Fail { .. } => ExitStatus::Fail,
            Verdict::Timeout { .. } => ExitStatus::Timeout,
            Verdict::TripleFault { .. } => ExitStatus::TripleFault,
            Verdict::BadAccess { .. } => ExitStatus::BadAccess,
            Verdict::UnknownExit { .. } => ExitStatus::UnknownExit,
            Verdict::NoVerdict => ExitStatus::NoVerdict,
            Verdict::Internal(_) => ExitStatus::VmmError,
            Verdict::Stopped(_) => ExitStatus::Stopped,
        }
    }

    /// Whether the guest passed.
    pub fn passed(&self) -> bool {
        *self == Verdict::Pass
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Pass => write!(f, "PASS"),
            Verdict::Fail { code, vcpu } => {
                write!(f, "FAIL: the payload reported code {code} (vCPU {vcpu})")
            }
            Verdict::Timeout { after } => write!(
                f,
                "TIMEOUT: the watchdog stopped the guest after {:.3} s without a verdict",
                after.as_secs_f64()
            ),
            Verdict::TripleFault { vcpu, rip } => {
                write!(
                    f,
                    "TRIPLE FAULT: vCPU {vcpu} shut down (KVM_EXIT_SHUTDOWN, rip {rip:#x})"
                )
            }
            Verdict::BadAccess {
                vcpu,
                addr,
                len,
                write,
                detail,
                rip,
                insn,
            } => write!(
                f,
                "BAD ACCESS: vCPU {vcpu} {} of {len} bytes at {addr:#x} by `{insn}` at rip {rip:#x}: {detail}",
                if *write { "write" } else { "read" }
            ),
            Verdict::UnknownExit { vcpu, exit } => {
                write!(f, "UNKNOWN EXIT: vCPU {vcpu}: {exit}")
            }
            Verdict::NoVerdict => write!(f, "NO VERDICT: every vCPU halted without reporting"),
            Verdict::Internal(e) => write!(f, "VMM ERROR: {e}"),
            Verdict::Stopped(why) => write!(f, "STOPPED: {why}"),
        }
    }
}
