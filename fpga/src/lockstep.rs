//! The `lockstep` backend: the behavioural model and the RTL side by side on every
//! operation; the first disagreement is a `DeviceError::Divergence`.

use crate::rtl::Rtl;
use hilrig_device::device::{Device, DeviceError, ResetKind};
use hilrig_device::model::Model;
use hilrig_device::regmap::{self, Reg};
use hilrig_device::state::NvState;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

/// Model and RTL in lockstep. The model answers (and owns the state file, if any);
/// the RTL runs in memory and must agree on every value and on nonvolatile state.
pub struct Lockstep {
    model: Model,
    rtl: Rtl,
    ops: u64,
    diverged: Option<String>,
    vcd: Option<PathBuf>,
}

fn reg_name(word: u32) -> String {
    match regmap::lookup(word) {
        Some(def) => def.element_name(word & !3),
        None => "unmapped".into(),
    }
}

fn same_outcome<T: PartialEq + std::fmt::Debug>(
    a: &Result<T, DeviceError>,
    b: &Result<T, DeviceError>,
) -> Option<String> {
    match (a, b) {
        (Ok(x), Ok(y)) if x == y => None,
        (Err(_), Err(_)) => None,
        (x, y) => Some(format!("model {x:?}, rtl {y:?}")),
    }
}

impl Lockstep {
    /// Both backends on `nv`, in memory.
    pub fn new(nv: NvState) -> Result<Lockstep, DeviceError> {
        Ok(Lockstep {
            rtl: Rtl::new(nv.clone())?,
            model: Model::new(nv)?,
            ops: 0,
            diverged: None,
            vcd: None,
        })
    }

    /// Open the state file at `path`: the model keeps it; the RTL starts from the
    /// same state in memory.
    pub fn open(path: &Path) -> Result<Lockstep, DeviceError> {
        let model = Model::open(path)?;
        let rtl = Rtl::new(model.nv().clone())?;
        Ok(Lockstep {
            model,
            rtl,
            ops: 0,
            diverged: None,
            vcd: None,
        })
    }

    /// On divergence, write a VCD of the RTL's last `window` to `2 x window` cycles
    /// to `path` (tracing slows the RTL down several times).
    pub fn with_vcd(mut self, path: PathBuf, window: u64) -> Lockstep {
        self.rtl.trace_vcd(window);
        self.vcd = Some(path);
        self
    }

    /// Operations checked so far.
    pub fn ops(&self) -> u64 {
        self.ops
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The RTL.
    pub fn rtl(&self) -> &Rtl {
        &self.rtl
    }

    /// The RTL, mutably: for fault injection in tests (an access made here is not
    /// mirrored on the model, so the next comparison of that state diverges).
    pub fn rtl_mut(&mut self) -> &mut Rtl {
        &mut self.rtl
    }

    fn fail(&mut self, what: String) -> DeviceError {
        let mut msg = format!("operation #{}: {what}", self.ops);
        if let Some(p) = &self.vcd {
            match self.rtl.write_vcd(p) {
                Ok(files) => {
                    let names: Vec<String> =
                        files.iter().map(|f| f.display().to_string()).collect();
                    msg.push_str(&format!(
                        " (RTL trace of the last cycles: {})",
                        names.join(", ")
                    ));
                }
                Err(e) => msg.push_str(&format!(" (writing the VCD to {}: {e})", p.display())),
            }
        }
        self.diverged = Some(msg.clone());
        DeviceError::Divergence(msg)
    }

    fn check_stuck(&self) -> Result<(), DeviceError> {
        match &self.diverged {
            Some(m) => Err(DeviceError::Divergence(format!("already diverged: {m}"))),
            None => Ok(()),
        }
    }

    /// Compare nonvolatile state (counters, MASTER, fuse, EPOCH; flash if `flash`).
    fn check_nv(&mut self, flash: bool) -> Result<(), DeviceError> {
        let m = self.model.nv();
        let r = self.rtl.nv();
        let mut diff = Vec::new();
        if m.counters != r.counters {
            diff.push(format!(
                "COUNTER thermometers: model {:x?}, rtl {:x?}",
                m.counters, r.counters
            ));
        }
        if m.master != r.master {
            diff.push(format!("MASTER: model {}, rtl {}", m.master, r.master));
        }
        if m.fuse != r.fuse {
            diff.push(format!("FUSE: model {}, rtl {}", m.fuse, r.fuse));
        }
        if m.epoch != r.epoch {
            diff.push(format!("EPOCH: model {}, rtl {}", m.epoch, r.epoch));
        }
        if flash {
            for reg in hilrig_device::Region::ALL {
                let (a, b) = (&m.flash[reg as usize], &r.flash[reg as usize]);
                if let Some(i) = a.iter().zip(b.iter()).position(|(x, y)| x != y) {
                    diff.push(format!(
                        "{reg} flash byte {i:#x}: model {:#04x}, rtl {:#04x}",
                        a[i], b[i]
                    ));
                }
            }
        }
        if diff.is_empty() {
            Ok(())
        } else {
            Err(self.fail(format!("nonvolatile state differs: {}", diff.join("; "))))
        }
    }
}

impl Device for Lockstep {
    fn read_word(&mut self, word: u32, mask: u8) -> Result<u32, DeviceError> {
        self.check_stuck()?;
        self.ops += 1;
        let a = self.model.read_word(word, mask);
        let b = self.rtl.read_word(word, mask);
        if let (Ok(x), Ok(y)) = (&a, &b) {
            // Only the bytes the access wants are compared.
            let m = hilrig_device::device::byte_mask_bits(mask);
            if x & m != y & m {
                return Err(self.fail(format!(
                    "read BAR0+{word:#06x} ({}) mask {mask:#x}: model {x:#010x}, rtl {y:#010x}",
                    reg_name(word)
                )));
            }
            return a;
        }
        if let Some(d) = same_outcome(&a, &b) {
            return Err(self.fail(format!("read BAR0+{word:#06x} ({}): {d}", reg_name(word))));
        }
        a
    }

    fn write_word(&mut self, word: u32, value: u32, mask: u8) -> Result<(), DeviceError> {
        self.check_stuck()?;
        self.ops += 1;
        let a = self.model.write_word(word, value, mask);
        let b = self.rtl.write_word(word, value, mask);
        if let Some(d) = same_outcome(&a, &b) {
            return Err(self.fail(format!(
                "write {value:#010x} mask {mask:#x} to BAR0+{word:#06x} ({}): {d}",
                reg_name(word)
            )));
        }
        if word == Reg::FlashCmd.offset() {
            self.check_nv(true)?;
        }
        a
    }

    fn rom_size(&self) -> u64 {
        self.model.rom_size()
    }

    fn rom_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.check_stuck()?;
        self.ops += 1;
        let mut other = vec![0u8; data.len()];
        let a = self.model.rom_read(offset, data);
        let b = self.rtl.rom_read(offset, &mut other);
        if let Some(d) = same_outcome(&a, &b) {
            return Err(self.fail(format!("ROM read at {offset:#x}: {d}")));
        }
        if a.is_ok() && data != &other[..] {
            let i = data
                .iter()
                .zip(&other)
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            return Err(self.fail(format!(
                "ROM read of {} bytes at {offset:#x}: byte {i}: model {:#04x}, rtl {:#04x}",
                data.len(),
                data[i],
                other[i]
            )));
        }
        a
    }

    fn reset(&mut self, kind: ResetKind) -> Result<(), DeviceError> {
        self.check_stuck()?;
        self.ops += 1;
        let a = self.model.reset(kind);
        let b = self.rtl.reset(kind);
        if let Some(d) = same_outcome(&a, &b) {
            return Err(self.fail(format!("reset {kind:?}: {d}")));
        }
        self.check_nv(false)?;
        a
    }

    fn oob(&mut self, request: &[u8]) -> Result<Vec<u8>, DeviceError> {
        self.check_stuck()?;
        self.ops += 1;
        let a = self.model.oob(request);
        let b = self.rtl.oob(request);
        if let Some(d) = same_outcome(&a, &b) {
            return Err(self.fail(format!(
                "OOB request {}: {d}",
                hilrig_device::oob::hex_string(request)
            )));
        }
        self.check_nv(false)?;
        a
    }

    fn buffer_fd(&self) -> Option<BorrowedFd<'_>> {
        // The RTL keeps the buffers in block RAM: guest accesses must trap.
        None
    }
}
