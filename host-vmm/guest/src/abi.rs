//! The guest entry ABI: what a payload may rely on (addresses, ports), shared by the
//! payload builders here and the VMM that implements it (`hilrig_vmm::vstate::layout`
//! re-exports these). See the VMM README's "Guest entry ABI".

/// Stack top of vCPU 0 (each further vCPU's stack is [`STACK_SIZE`] lower).
pub const STACK_TOP: u64 = 0xA_0000;
/// Stack size per vCPU.
pub const STACK_SIZE: u64 = 0x1_0000;
/// Where the payload is loaded and entered.
pub const PAYLOAD_ADDR: u64 = 0x10_0000;
/// The address the VMM assigns BAR0 before the payload runs.
pub const BAR0_DEFAULT: u64 = 0xE000_0000;
/// The address the VMM assigns the expansion-ROM BAR (not enabled) before the payload runs.
pub const ROM_DEFAULT: u64 = 0xE010_0000;
/// PCI slot (bus 0) of the reference device.
pub const DEVICE_SLOT: u8 = 1;
/// CONFIG_ADDRESS of the reference device (bus 0, device 1, function 0), register 0.
pub const DEVICE_CONFIG_BASE: u32 = 0x8000_0000 | ((DEVICE_SLOT as u32) << 11);
/// Test-exit port: a write of any width ends the VM with the written value as the
/// verdict code (0 = pass).
pub const PORT_EXIT: u16 = 0xf4;
/// Debug port: writes are logged (tracing, debug level) and otherwise ignored.
pub const PORT_DEBUG: u16 = 0xf5;
/// Result port: each `out` of 1, 2 or 4 bytes appends the value (zero-extended)
/// to the run's results, in order, for tests to inspect what the guest saw.
pub const PORT_RESULT: u16 = 0xf6;
/// Where [`crate::payload::Payload::install_fault_handler`] builds its IDT (256 gates).
pub const FAULT_IDT_ADDR: u64 = 0x1000;
/// The fault area the payload library's exception handler fills (see the README's
/// fault ABI): `+0` count (u64), `+8` last vector, `+16` last error code, `+24` last
/// faulting RIP, `+32` resume address (0: report the fault as a verdict instead).
pub const FAULT_AREA: u64 = 0x2000;
/// COM1 base.
pub const PORT_COM1: u16 = 0x3f8;
/// PCI configuration address register.
pub const PORT_PCI_ADDR: u16 = 0xcf8;
/// PCI configuration data window (4 ports).
pub const PORT_PCI_DATA: u16 = 0xcfc;
