//! Where observations come from: a small trait, so the rig and the VMM can supply
//! their own (a PTY, a VFIO device, a simulated host).

use crate::decide::{Hash, Observation};
use crate::{Error, Result};
use hilrig_device::oob::{self, CounterReport, OobClient, Request, Response};
use hilrig_device::{Device, Model, Region};
use std::path::Path;
use std::time::Duration;

/// A device's out-of-band port, as the counters service reads it.
pub trait CounterSource {
    /// What this is (a port path, a state file), for messages.
    fn name(&self) -> String;
    /// Send one OOB request and return its response (error frames are errors).
    fn request(&mut self, req: &Request) -> Result<Response>;

    /// The device's serial number (IDENTIFY).
    fn serial(&mut self) -> Result<u64> {
        match self.request(&Request::Identify)? {
            Response::Identity { serial, .. } => Ok(serial),
            other => Err(self.unexpected("IDENTIFY", &other)),
        }
    }

    /// All counters (READ_COUNTERS).
    fn counters(&mut self) -> Result<CounterReport> {
        match self.request(&Request::ReadCounters)? {
            Response::Counters(c) => Ok(c),
            other => Err(self.unexpected("READ_COUNTERS", &other)),
        }
    }

    /// A region's SHA-256 (READ_HASH).
    fn hash(&mut self, region: Region) -> Result<Hash> {
        match self.request(&Request::ReadHash(region))? {
            Response::Hash { region: r, sha256 } if r == region => Ok(sha256),
            other => Err(self.unexpected("READ_HASH", &other)),
        }
    }

    /// Counters and every region hash.
    fn observe(&mut self) -> Result<Observation> {
        let report = self.counters()?;
        let mut hashes = [[0u8; 32]; 3];
        for (h, r) in hashes.iter_mut().zip(Region::ALL) {
            *h = self.hash(r)?;
        }
        // Read the counters again: an attempt between the two reads would pair new
        // hashes with old counters.
        let again = self.counters()?;
        if again != report {
            return Err(Error::Source {
                source_name: self.name(),
                detail: format!("counters changed while reading: {report:?} -> {again:?}"),
            });
        }
        Ok(Observation { report, hashes })
    }

    #[doc(hidden)]
    fn unexpected(&self, what: &str, got: &Response) -> Error {
        Error::Source {
            source_name: self.name(),
            detail: format!("{what} answered with {got:?}"),
        }
    }
}

/// A real or PTY serial port speaking the OOB protocol.
pub struct SerialSource {
    client: OobClient<Box<dyn serialport::SerialPort>>,
    path: String,
}

impl SerialSource {
    /// Open `path` at `baud` with a per-request `timeout`.
    pub fn open(path: &str, baud: u32, timeout: Duration) -> Result<SerialSource> {
        let client = OobClient::open_serial(path, baud, timeout).map_err(|e| Error::Source {
            source_name: path.to_string(),
            detail: e.to_string(),
        })?;
        Ok(SerialSource {
            client,
            path: path.to_string(),
        })
    }
}

impl CounterSource for SerialSource {
    fn name(&self) -> String {
        self.path.clone()
    }
    fn request(&mut self, req: &Request) -> Result<Response> {
        self.client.request(req).map_err(|e| Error::Source {
            source_name: self.path.clone(),
            detail: e.to_string(),
        })
    }
}

/// Any in-process device (model, RTL, lockstep) through its OOB entry point.
pub struct DeviceSource<D: Device> {
    /// The device.
    pub dev: D,
    /// Its name in messages.
    pub label: String,
}

impl<D: Device> DeviceSource<D> {
    /// Wrap a device.
    pub fn new(dev: D, label: impl Into<String>) -> Self {
        DeviceSource {
            dev,
            label: label.into(),
        }
    }
}

impl DeviceSource<Model> {
    /// Open a model device's state file.
    pub fn model_file(path: &Path) -> Result<Self> {
        let m = Model::open(path).map_err(|e| Error::Source {
            source_name: path.display().to_string(),
            detail: e.to_string(),
        })?;
        Ok(DeviceSource::new(m, path.display().to_string()))
    }
}

impl<D: Device> CounterSource for DeviceSource<D> {
    fn name(&self) -> String {
        self.label.clone()
    }
    fn request(&mut self, req: &Request) -> Result<Response> {
        oob::request_device(&mut self.dev, req).map_err(|e| Error::Source {
            source_name: self.label.clone(),
            detail: e.to_string(),
        })
    }
}

/// Open a source named by a spec: `model:PATH` (a model state file), `serial:PATH`
/// or a bare path under /dev (an OOB serial port or PTY).
pub fn open_source(spec: &str, baud: u32, timeout: Duration) -> Result<Box<dyn CounterSource>> {
    if let Some(p) = spec.strip_prefix("model:") {
        Ok(Box::new(DeviceSource::model_file(Path::new(p))?))
    } else if let Some(p) = spec.strip_prefix("serial:") {
        Ok(Box::new(SerialSource::open(p, baud, timeout)?))
    } else if spec.starts_with("/dev/") {
        Ok(Box::new(SerialSource::open(spec, baud, timeout)?))
    } else {
        Err(Error::Input(format!(
            "source {spec:?}: use model:STATE_FILE or serial:PORT"
        )))
    }
}
