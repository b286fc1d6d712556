//! Device interrupts (issue 18): a level-triggered line (PCI INTx) that the VM wires
//! to its in-kernel IOAPIC through a KVM irqfd with a resample fd.
//!
//! The VM creates two eventfds and registers them with `KVM_IRQFD`
//! (`KVM_IRQFD_FLAG_RESAMPLE`) on the device's GSI, then hands them to the source:
//! the source signals `trigger` when its line goes up; KVM holds the GSI asserted
//! until the guest's EOI for that vector, then lowers it and signals `resample`,
//! where the source re-arms (VFIO unmasks INTx; a line still asserted fires again).

use crate::error::VmmError;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
/// interrupts: a level-triggered line stuck asserted. It signals `trigger` when
/// connected and again after every resample (KVM signals one when the guest unmasks
/// the IOAPIC input with the line pending — KVM then drops the pending state and
/// expects the source to fire again if still asserted, as VFIO does — and one at
/// every EOI), from a thread of its own, at most [`SimulatedIntx::MAX_FIRES`] times.
#[derive(Default)]
pub struct SimulatedIntx {
    resamples: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl SimulatedIntx {
    /// Re-assertions after resamples, at most (a guest looping on EOIs cannot make
    /// it spin for ever).
    pub const MAX_FIRES: u64 = 1000;

    /// Not yet connected.
    pub fn new() -> SimulatedIntx {
        SimulatedIntx::default()
    }

    /// Resamples seen so far (the guest's unmask of a pending input, its EOIs).
    pub fn resamples(&self) -> u64 {
        self.resamples.load(Ordering::SeqCst)
    }
}

fn irq_err(what: &str) -> impl FnOnce(std::io::Error) -> VmmError + '_ {
    move |e| VmmError::Irq {
        what: what.into(),
        detail: e.to_string(),
    }
}

impl IntxSource for SimulatedIntx {
    fn connect(&self, trigger: &EventFd, resample: &EventFd) -> Result<(), VmmError> {
        let trigger = trigger
            .try_clone()
            .map_err(irq_err("cloning the simulated line's trigger eventfd"))?;
        let resample = resample
            .try_clone()
            .map_err(irq_err("cloning the simulated line's resample eventfd"))?;
        trigger
            .write(1)
            .map_err(irq_err("raising the simulated line (eventfd write)"))?;
        let (count, stop) = (self.resamples.clone(), self.stop.clone());
        let t = std::thread::Builder::new()
            .name("sim-intx".into())
            .spawn(move || {
                let mut pfd = libc::pollfd {
                    fd: resample.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                while !stop.load(Ordering::SeqCst) {
                    // SAFETY: one pollfd we own, for 50 ms.
                    let n = unsafe { libc::poll(&mut pfd, 1, 50) };
                    if n <= 0 {
                        continue;
                    }
                    // Nonblocking (the VM creates it EFD_NONBLOCK): EAGAIN is none.
                    let Ok(k) = resample.read() else { continue };
                    let seen = count.fetch_add(k, Ordering::SeqCst) + k;
                    if seen <= SimulatedIntx::MAX_FIRES {
                        let _ = trigger.write(1);
                    }
                }
            })
            .map_err(irq_err("starting the simulated line's thread"))?;
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        Ok(())
    }

    fn disconnect(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }

    fn name(&self) -> String {
        "simulated INTx (stuck asserted)".into()
    }
}
