//! Device interrupts (issue 18): a level-triggered line (PCI INTx) that the VM wires
//! to its in-kernel IOAPIC through a KVM irqfd with a resample fd.
//!
//! The VM creates two eventfds and registers them with `KVM_IRQFD`
//! (`KVM_IRQFD_FLAG_RESAMPLE`) on the device's GSI, then hands them to the source:
//! the source signals `trigger` when its line goes up; KVM holds the GSI asserted
//! until the guest's EOI for that vector, then lowers it and signals `resample`,
//! where the source re-arms (VFIO unmasks INTx; a line still asserted fires again).

use crate::error::VmmError;
use std::sync::Mutex;
use vmm_sys_util::eventfd::EventFd;

/// A device's level-triggered interrupt line.
pub trait IntxSource: Send + Sync {
    /// Start signalling `trigger`; re-arm whenever `resample` is signalled.
    fn connect(&self, trigger: &EventFd, resample: &EventFd) -> Result<(), VmmError>;
    /// Stop signalling (best effort: the VM is going away).
    fn disconnect(&self);
    /// What it is, for messages.
    fn name(&self) -> String;
}

/// A simulated interrupt source for tests on a host without a device that
/// interrupts: a device with one interrupt pending from the start. It signals
/// `trigger` once, as soon as it is connected, and counts the guest's EOIs (the
/// resample eventfd) for the test to read.
#[derive(Default)]
pub struct PendingOnce {
    resample: Mutex<Option<EventFd>>,
}

impl PendingOnce {
    /// Not yet connected.
    pub fn new() -> PendingOnce {
        PendingOnce::default()
    }

    /// How many times the guest has ended the interrupt (EOI) since the last call:
    /// KVM's resample signals. 0 when not connected.
    pub fn eois(&self) -> u64 {
        let g = self.resample.lock().unwrap_or_else(|p| p.into_inner());
        // A nonblocking eventfd (the VM creates it EFD_NONBLOCK): EAGAIN is 0.
        g.as_ref().and_then(|fd| fd.read().ok()).unwrap_or(0)
    }
}

impl IntxSource for PendingOnce {
    fn connect(&self, trigger: &EventFd, resample: &EventFd) -> Result<(), VmmError> {
        let r = resample.try_clone().map_err(|e| VmmError::Irq {
            what: "cloning the resample eventfd of the simulated interrupt".into(),
            detail: e.to_string(),
        })?;
        *self.resample.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        trigger.write(1).map_err(|e| VmmError::Irq {
            what: "raising the simulated interrupt (eventfd write)".into(),
            detail: e.to_string(),
        })
    }

    fn disconnect(&self) {}

    fn name(&self) -> String {
        "simulated INTx (pending once)".into()
    }
}
