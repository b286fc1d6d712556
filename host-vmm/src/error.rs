//! The library's error type.

use std::path::PathBuf;

/// Everything that can go wrong setting up or running a VM. Guest misbehaviour is
/// not an error: it is a [`crate::Verdict`].
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A KVM ioctl failed.
    #[error("KVM {what}: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be created or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The configuration is invalid (sizes, counts, names).
    #[error("configuration: {0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The device backend failed.
    #[error("device backend: {0}")]
    Device(#[from] hilrig_device::DeviceError),
    /// The requested backend does not exist yet or cannot be opened here.
    #[error("device backend `{backend}`: {detail}")]
    Backend {
        /// Backend name.
        backend: String,
        /// Why.
        detail: String,
    },
    /// VFIO setup or access failed.
    #[error("VFIO {what}: {detail}")]
    Vfio {
        /// What was being done.
        what: String,
        /// Why it failed.
        detail: String,
    },
    /// Wiring a device's interrupt to the guest failed (the ioctl or step named).
    #[error("interrupt {what}: {detail}")]
    Irq {
        /// What was being done (the ioctl).
        what: String,
        /// Why it failed.
        detail: String,
    },
    /// The payload assembler refused an instruction (a bug in a payload builder).
    #[error("assembling payload: {0}")]
    Asm(String),
    /// A payload could not be built or loaded.
    #[error(transparent)]
    Guest(#[from] hilrig_guest::GuestError),
    /// A vCPU thread could not be started or died.
    #[error("vCPU thread: {0}")]
    Thread(String),
}

impl VmmError {
    /// The `map_err` of a failed KVM call named `what`.
    pub fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
        move |source| VmmError::Kvm { what, source }
    }
}

impl From<iced_x86::IcedError> for VmmError {
    fn from(e: iced_x86::IcedError) -> Self {
        VmmError::Asm(e.to_string())
    }
}
