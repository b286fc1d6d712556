//! The rusb [`Transport`]: one FTDI interface opened by VID/PID (and optionally
//! serial number or bus:address).

use crate::mpsse::{Transport, TransportError};
use rusb::{Direction, Recipient, RequestType, UsbContext};
use std::path::Path;
use std::time::Duration;

/// Which device to open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// USB vendor ID.
    pub vid: u16,
    /// USB product ID.
    pub pid: u16,
    /// Interface (0 = A).
    pub interface: u8,
    /// Only the device with this serial number.
    pub serial: Option<String>,
    /// Only the device at this bus and address.
    pub bus_addr: Option<(u8, u8)>,
}

/// Opening the device failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No matching device.
    #[error("no USB device {vid:04x}:{pid:04x}{which} found; attached: {attached}")]
    NoDevice {
        /// Vendor ID.
        vid: u16,
        /// Product ID.
        pid: u16,
        /// " with serial X" / " at bus:addr" or "".
        which: String,
        /// The devices that are attached, `bus:addr vid:pid` each, or "none".
        attached: String,
    },
    /// Several devices match and none was chosen.
    #[error("{count} USB devices {vid:04x}:{pid:04x} attached ({list}): choose one by serial or bus:address")]
    Ambiguous {
        /// Vendor ID.
        vid: u16,
        /// Product ID.
        pid: u16,
        /// How many.
        count: usize,
        /// `bus:addr` of each.
        list: String,
    },
    /// The device could not be opened or the interface claimed.
    #[error("USB device {vid:04x}:{pid:04x} at {bus}:{addr}: {what}: {source}{hint}")]
    Usb {
        /// Vendor ID.
        vid: u16,
        /// Product ID.
        pid: u16,
        /// Bus.
        bus: u8,
        /// Address.
        addr: u8,
        /// The step (open, claim interface ...).
        what: String,
        /// libusb's error.
        #[source]
        source: rusb::Error,
        /// A hint ("add a udev rule ...").
        hint: &'static str,
    },
    /// The device has no such interface.
    #[error("USB device {vid:04x}:{pid:04x} has {count} interface(s); interface {interface} does not exist (wrong board?)")]
    NoInterface {
        /// Vendor ID.
        vid: u16,
        /// Product ID.
        pid: u16,
        /// Interfaces present.
        count: u8,
        /// Asked for.
        interface: u8,
    },
}

/// A claimed FTDI interface.
pub struct RusbTransport {
    handle: rusb::DeviceHandle<rusb::Context>,
    interface: u8,
    ep_in: u8,
    ep_out: u8,
    timeout: Duration,
}

/// The attached devices as `bus:addr vid:pid`, or "none".
pub fn attached_devices() -> String {
    let list = rusb::Context::new().and_then(|c| c.devices());
    let v: Vec<String> = match list {
        Ok(l) => l
            .iter()
            .filter_map(|d| {
                let desc = d.device_descriptor().ok()?;
                Some(format!(
                    "{:03}:{:03} {:04x}:{:04x}",
                    d.bus_number(),
                    d.address(),
                    desc.vendor_id(),
                    desc.product_id()
                ))
            })
            .collect(),
        Err(e) => return no_usb(e),
    };
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// What to say when libusb cannot start or list devices (no USB bus visible).
fn no_usb(e: rusb::Error) -> String {
    let bus = if Path::new("/dev/bus/usb").exists() {
        ""
    } else {
        ", /dev/bus/usb does not exist: no USB bus is visible here (container without USB passthrough?)"
    };
    format!("none (libusb cannot list devices: {e}{bus})")
}

impl RusbTransport {
    /// Find, open and claim the interface `sel` names.
    pub fn open(sel: &Selector) -> Result<RusbTransport, OpenError> {
        let which = match (&sel.serial, sel.bus_addr) {
            (Some(s), _) => format!(" with serial {s:?}"),
            (None, Some((b, a))) => format!(" at {b:03}:{a:03}"),
            (None, None) => String::new(),
        };
        // No USB at all is the same answer as no such device, with the reason.
        let devices = match rusb::Context::new().and_then(|c| c.devices()) {
            Ok(d) => d,
            Err(e) => {
                return Err(OpenError::NoDevice {
                    vid: sel.vid,
                    pid: sel.pid,
                    which,
                    attached: no_usb(e),
                })
            }
        };
        let mut found = Vec::new();
        for d in devices.iter() {
            let Ok(desc) = d.device_descriptor() else {
                continue;
            };
            if desc.vendor_id() != sel.vid || desc.product_id() != sel.pid {
                continue;
            }
            if let Some((b, a)) = sel.bus_addr {
                if d.bus_number() != b || d.address() != a {
                    continue;
                }
            }
            found.push((d, desc));
        }
        let no_device = || OpenError::NoDevice {
            vid: sel.vid,
            pid: sel.pid,
            which: which.clone(),
            attached: attached_devices(),
        };
        let usb_err = |d: &rusb::Device<rusb::Context>, what: &str, source: rusb::Error| {
            let hint = match source {
                rusb::Error::Access => " (permission denied: run as root or add a udev rule giving your user access to this VID:PID)",
                rusb::Error::Busy => " (another program has the interface claimed: close iceprog/openFPGALoader or a serial terminal on it)",
                _ => "",
            };
            OpenError::Usb {
                vid: sel.vid,
                pid: sel.pid,
                bus: d.bus_number(),
                addr: d.address(),
                what: what.to_string(),
                source,
                hint,
            }
        };
        let mut chosen = None;
        if let Some(serial) = &sel.serial {
            for (d, desc) in &found {
                let Ok(h) = d.open() else { continue };
                let s = h.read_serial_number_string_ascii(desc).unwrap_or_default();
                if &s == serial {
                    chosen = Some((d.clone(), h));
                    break;
                }
            }
            if chosen.is_none() {
                return Err(no_device());
            }
        } else {
            match found.len() {
                0 => return Err(no_device()),
                1 => {
                    let (d, _) = &found[0];
                    let h = d.open().map_err(|e| usb_err(d, "open", e))?;
                    chosen = Some((d.clone(), h));
                }
                n => {
                    return Err(OpenError::Ambiguous {
                        vid: sel.vid,
                        pid: sel.pid,
                        count: n,
                        list: found
                            .iter()
                            .map(|(d, _)| format!("{:03}:{:03}", d.bus_number(), d.address()))
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
                }
            }
        }
        let Some((d, handle)) = chosen else {
            return Err(no_device());
        };
        let cfg = d
            .active_config_descriptor()
            .map_err(|e| usb_err(&d, "read configuration", e))?;
        let count = cfg.num_interfaces();
        let Some(iface) = cfg.interfaces().find(|i| i.number() == sel.interface) else {
            return Err(OpenError::NoInterface {
                vid: sel.vid,
                pid: sel.pid,
                count,
                interface: sel.interface,
            });
        };
        let (mut ep_in, mut ep_out) = (None, None);
        for alt in iface.descriptors() {
            for ep in alt.endpoint_descriptors() {
                if ep.transfer_type() == rusb::TransferType::Bulk {
                    match ep.direction() {
                        Direction::In => ep_in = Some(ep.address()),
                        Direction::Out => ep_out = Some(ep.address()),
                    }
                }
            }
        }
        let (Some(ep_in), Some(ep_out)) = (ep_in, ep_out) else {
            return Err(OpenError::NoInterface {
                vid: sel.vid,
                pid: sel.pid,
                count,
                interface: sel.interface,
            });
        };
        // The kernel's ftdi_sio driver binds every interface; let libusb detach it.
        let _ = handle.set_auto_detach_kernel_driver(true);
        handle
            .claim_interface(sel.interface)
            .map_err(|e| usb_err(&d, &format!("claim interface {}", sel.interface), e))?;
        Ok(RusbTransport {
            handle,
            interface: sel.interface,
            ep_in,
            ep_out,
            timeout: Duration::from_millis(1000),
        })
    }
}

impl Drop for RusbTransport {
    fn drop(&mut self) {
        let _ = self.handle.release_interface(self.interface);
    }
}

fn usb(op: &'static str, e: rusb::Error) -> TransportError {
    TransportError::Usb {
        op,
        detail: e.to_string(),
    }
}

impl Transport for RusbTransport {
    fn bulk_write(&mut self, data: &[u8]) -> Result<usize, TransportError> {
        let mut off = 0;
        while off < data.len() {
            let n = self
                .handle
                .write_bulk(self.ep_out, &data[off..], self.timeout)
                .map_err(|e| usb("bulk write", e))?;
            if n == 0 {
                break;
            }
            off += n;
        }
        Ok(off)
    }

    fn bulk_read(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        match self.handle.read_bulk(self.ep_in, buf, self.timeout) {
            Ok(n) => Ok(n),
            Err(rusb::Error::Timeout) => Ok(0),
            Err(e) => Err(usb("bulk read", e)),
        }
    }

    fn control(&mut self, request: u8, value: u16, index: u16) -> Result<(), TransportError> {
        let rt = rusb::request_type(Direction::Out, RequestType::Vendor, Recipient::Device);
        self.handle
            .write_control(rt, request, value, index, &[], self.timeout)
            .map_err(|e| usb("control", e))?;
        Ok(())
    }
}
