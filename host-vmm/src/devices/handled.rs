//! The device as the VMM's trap paths see it: the backend, behind the patchable
//! device-handler module (see `modules`). Every trapped access part that reaches the
//! device (after the policy allowed it) goes through the installed handler, if any,
//! through the module table, so a handler patched in while vCPUs are quiesced takes
//! effect on the next access, and a call in flight in an old handler is re-dispatched.

use crate::lifecycle::modules::{HandlerAction, NativeHandler, Slot};
use hilrig_device::device::{Device, DeviceError, ResetKind};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The backend behind the device-handler slot.
pub struct HandledDevice {
    inner: Box<dyn Device>,
    handler: Arc<Slot<Option<NativeHandler>>>,
    /// Handler errors (the access was dropped / read as all-ones).
    pub errors: Arc<AtomicU64>,
}

impl HandledDevice {
    /// Wrap `inner`.
    pub fn new(inner: Box<dyn Device>, handler: Arc<Slot<Option<NativeHandler>>>) -> HandledDevice {
        HandledDevice {
            inner,
            handler,
            errors: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The backend itself.
    pub fn inner(&mut self) -> &mut dyn Device {
        &mut *self.inner
    }

    /// Unwrap.
    pub fn into_inner(self) -> Box<dyn Device> {
        self.inner
    }

    #[inline]
    fn active(&self) -> bool {
        self.handler.version() != 0
    }

    /// Ask the handler; None = no handler or it failed (counted).
    fn ask(&self, word: u32, write: bool, value: u32) -> Result<Option<HandlerAction>, ()> {
        // A call still inside a handler that is swapped out is cancelled (the module
        // returns RETRY at its check point, or its answer is discarded) and lands in
        // the new handler through the table: every access is decided exactly once.
        match self.handler.call_with(|h, cancel| match h {
            None => Ok(None),
            Some(h) => match h.on_access_cancellable(word, write, value, cancel) {
                Ok(Ok(a)) => Ok(Some(Ok(a))),
                Ok(Err(c)) => Err(c),
                Err(code) => Ok(Some(Err(code))),
            },
        }) {
            Ok(None) => Ok(None),
            Ok(Some(Ok(a))) => Ok(Some(a)),
            Ok(Some(Err(code))) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("device handler returned error {code} for {word:#x}");
                Err(())
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("device handler: {e}");
                Err(())
            }
        }
    }
}

impl Device for HandledDevice {
    fn read_word(&mut self, word: u32, mask: u8) -> Result<u32, DeviceError> {
        if self.active() {
            match self.ask(word, false, 0) {
                Ok(Some(HandlerAction::Complete(v))) => return Ok(v),
                Ok(_) => {}
                Err(()) => return Ok(u32::MAX),
            }
        }
        self.inner.read_word(word, mask)
    }

    fn write_word(&mut self, word: u32, value: u32, mask: u8) -> Result<(), DeviceError> {
        if self.active() {
            match self.ask(word, true, value) {
                Ok(Some(HandlerAction::Complete(_))) | Err(()) => return Ok(()),
                Ok(Some(HandlerAction::Pass(v))) => return self.inner.write_word(word, v, mask),
                Ok(None) => {}
            }
        }
        self.inner.write_word(word, value, mask)
    }

    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        if self.active() {
            // Through the word path, so the handler sees every register part.
            hilrig_device::device::check_access(offset, data.len())?;
            for p in hilrig_device::device::split_access(offset, data.len()) {
                let v = self.read_word(p.word, p.mask)?.to_le_bytes();
                data[p.data_start..p.data_start + p.len]
                    .copy_from_slice(&v[p.byte_in_word..p.byte_in_word + p.len]);
            }
            return Ok(());
        }
        // No handler: the backend's own access path (VFIO keeps the guest's width).
        self.inner.mmio_read(offset, data)
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if self.active() {
            hilrig_device::device::check_access(offset, data.len())?;
            for p in hilrig_device::device::split_access(offset, data.len()) {
                let mut b = [0u8; 4];
                b[p.byte_in_word..p.byte_in_word + p.len]
                    .copy_from_slice(&data[p.data_start..p.data_start + p.len]);
                self.write_word(p.word, u32::from_le_bytes(b), p.mask)?;
            }
            return Ok(());
        }
        self.inner.mmio_write(offset, data)
    }

    fn rom_size(&self) -> u64 {
        self.inner.rom_size()
    }
    fn rom_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.inner.rom_read(offset, data)
    }
    fn reset(&mut self, kind: ResetKind) -> Result<(), DeviceError> {
        self.inner.reset(kind)
    }
    fn oob(&mut self, request: &[u8]) -> Result<Vec<u8>, DeviceError> {
        self.inner.oob(request)
    }
    fn buffer_fd(&self) -> Option<BorrowedFd<'_>> {
        self.inner.buffer_fd()
    }
}
