//! A host's OOB port opened through the rig's OOB driver, whatever it is: a
//! serial port or PTY (`serial`), or a serial port served over the network
//! (`rfc2217`, incl. raw TCP). [`OobPort`] is a counters
//! [`CounterSource`](hilrig_counters::source::CounterSource), so the rig's own
//! requests ([`crate::rig::Rig::oob_request`]) and a campaign runner's per-attempt
//! reads of an SSH host's device go through one code path.
//!
//! A transport fault (refused connection, closed peer, no reply) is the
//! driver's error ([`RigError::Driver`], INFRA), never a device fault.

use crate::error::RigError;
use crate::inventory::OobSpec;
use hilrig_counters::source::CounterSource;
use hilrig_device::oob::{OobClient, Request, Response};
use std::time::Duration;

/// A byte transport an OOB client runs over.
pub trait Transport: std::io::Read + std::io::Write + Send {}
impl<T: std::io::Read + std::io::Write + Send> Transport for T {}

/// An open OOB port of a host.
pub struct OobPort {
    client: OobClient<Box<dyn Transport>>,
    host: String,
    label: String,
    name: String,
}

impl std::fmt::Debug for OobPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OobPort")
            .field("host", &self.host)
            .field("name", &self.name)
            .finish()
    }
}

/// The driver label of an OOB spec (`oob/serial`, `oob/rfc2217`, `oob/sim`).
pub fn label(spec: &OobSpec) -> &'static str {
    match spec {
        OobSpec::Sim {} => "oob/sim",
        OobSpec::Serial { .. } => "oob/serial",
        OobSpec::Rfc2217 { .. } => "oob/rfc2217",
    }
}

/// What an OOB spec reaches, for messages (`/dev/ttyUSB2`,
/// `rfc2217://127.0.0.1:4001`, `raw://...`).
pub fn describe(spec: &OobSpec) -> String {
    match spec {
        OobSpec::Sim {} => "the simulated device's OOB PTY".into(),
        OobSpec::Serial { path, .. } => path.clone(),
        OobSpec::Rfc2217 {
            host, port, raw, ..
        } => format!("{}://{host}:{port}", if *raw { "raw" } else { "rfc2217" }),
    }
}

/// Open the byte transport of `host`'s OOB port as `spec` describes it (a
/// serial port or PTY at its baud rate, 8N1; or a network serial port, the line
/// set through RFC 2217 unless raw): the transport, its name for messages and
/// the spec's reply timeout. Reads time out every 20 ms (`TimedOut`). A
/// simulated OOB (`sim`) is served by a rig from a state file: open it with
/// [`crate::rig::Rig::open_oob`].
pub fn open_transport(
    host: &str,
    spec: &OobSpec,
) -> Result<(Box<dyn Transport>, String, Duration), RigError> {
    let label = label(spec);
    let drv = |e: String| RigError::driver(host, label, e);
    match spec {
        OobSpec::Sim {} => Err(RigError::Unsupported {
            host: host.into(),
            driver: label.into(),
            detail: "a simulated OOB port is served by the rig from the host's state file".into(),
        }),
        OobSpec::Serial {
            path,
            baud,
            timeout_ms,
        } => serial(path, *baud)
            .map(|p| (p, path.clone(), Duration::from_millis(*timeout_ms)))
            .map_err(|e| drv(e.to_string())),
        OobSpec::Rfc2217 {
            host: h,
            port,
            baud,
            timeout_ms,
            raw,
        } => {
            let t = Duration::from_millis(*timeout_ms);
            let protocol = if *raw {
                crate::rfc2217::Protocol::Raw
            } else {
                crate::rfc2217::Protocol::Rfc2217
            };
            let p = crate::rfc2217::NetSerialPort::connect(
                h,
                *port,
                protocol,
                crate::rfc2217::LineSettings::n81(*baud),
                t,
            )
            .map_err(|e| drv(e.to_string()))?;
            let name = format!("{}://{}", if *raw { "raw" } else { "rfc2217" }, p.addr());
            Ok((Box::new(p), name, t))
        }
    }
}

/// A serial port (or PTY) at `baud`, 8N1, reads timing out every 20 ms.
fn serial(path: &str, baud: u32) -> Result<Box<dyn Transport>, hilrig_device::oob::OobError> {
    let port = hilrig_device::oob::open_serial_port(path, baud)?;
    Ok(Box::new(port))
}

impl OobPort {
    /// Open `host`'s OOB port as `spec` describes it ([`open_transport`]).
    pub fn open(host: &str, spec: &OobSpec) -> Result<OobPort, RigError> {
        let (t, name, timeout) = open_transport(host, spec)?;
        Ok(OobPort {
            client: OobClient::new(t, &name, timeout),
            host: host.into(),
            label: label(spec).into(),
            name,
        })
    }

    /// Open a serial OOB port at `path` (a PTY the rig serves for a simulated
    /// host).
    pub(crate) fn open_serial(
        host: &str,
        path: &str,
        baud: u32,
        timeout: Duration,
    ) -> Result<OobPort, RigError> {
        let t = serial(path, baud).map_err(|e| RigError::driver(host, "oob/sim", e.to_string()))?;
        Ok(OobPort {
            client: OobClient::new(t, path, timeout),
            host: host.into(),
            label: "oob/sim".into(),
            name: path.into(),
        })
    }

    /// One request; a transport fault is the driver's error.
    pub fn send(&mut self, req: &Request) -> Result<Response, RigError> {
        self.client
            .request(req)
            .map_err(|e| RigError::driver(&self.host, &self.label, e.to_string()))
    }
}

impl CounterSource for OobPort {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn request(&mut self, req: &Request) -> hilrig_counters::Result<Response> {
        self.client
            .request(req)
            .map_err(|e| hilrig_counters::Error::Source {
                source_name: self.name.clone(),
                detail: e.to_string(),
            })
    }
}
