//! What the guest sees of the device: PCI configuration space ([`pci`]), which BAR0
//! pages are mapped and which trap ([`plan`]), the device backends behind one type
//! ([`backend`], [`vfio`]) and the patchable handler in front of them ([`handled`]).

pub mod backend;
pub mod handled;
pub mod pci;
pub mod plan;
pub mod vfio;
