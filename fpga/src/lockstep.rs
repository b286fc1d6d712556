//! The `lockstep` backend: two backends side by side on every operation (by default
//! the behavioural model and the RTL; any two [`Side`]s, e.g. model, rtl or
//! verilator, boxed or not); the first disagreement is a `DeviceError::Divergence`.

use crate::rtl::Rtl;
use hilrig_device::device::{Device, DeviceError, ResetKind};
use hilrig_device::model::Model;
use hilrig_device::regmap::{self, Reg};
use hilrig_device::state::NvState;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

/// A backend that can run in lockstep: a `Device` whose nonvolatile state can be
/// read back for comparison.
pub trait Side: Device {
    /// Its name in divergence messages (`model`, `rtl`, `verilator`).
    fn label(&self) -> &'static str;
    /// The nonvolatile state as the backend holds it now.
    fn nv_state(&self) -> NvState;
    /// Clock cycles simulated so far, for simulated hardware.
    fn sim_cycles(&self) -> Option<u64> {
        None
    }
    /// Start recording a trace of the last `window` to `2 x window` cycles, if the
    /// backend can (returns whether it does).
    fn start_trace(&mut self, window: u64) -> bool {
        let _ = window;
        false
    }
    /// Write the recorded trace to `path` (and its previous window beside it);
    /// returns the files written.
    fn write_trace(&mut self, path: &Path) -> std::io::Result<Vec<PathBuf>> {
        let _ = path;
        Ok(Vec::new())
    }
}

impl Side for Model {
    fn label(&self) -> &'static str {
        "model"
    }
    fn nv_state(&self) -> NvState {
        self.nv().clone()
    }
}

impl Side for Rtl {
    fn label(&self) -> &'static str {
        "rtl"
    }
    fn nv_state(&self) -> NvState {
        self.nv()
    }
    fn sim_cycles(&self) -> Option<u64> {
        Some(self.cycles())
    }
    fn start_trace(&mut self, window: u64) -> bool {
        self.trace_vcd(window);
        true
    }
    fn write_trace(&mut self, path: &Path) -> std::io::Result<Vec<PathBuf>> {
        self.write_vcd(path)
    }
}

impl<S: Side + ?Sized> Side for Box<S> {
    fn label(&self) -> &'static str {
        (**self).label()
    }
    fn nv_state(&self) -> NvState {
        (**self).nv_state()
    }
    fn sim_cycles(&self) -> Option<u64> {
        (**self).sim_cycles()
    }
    fn start_trace(&mut self, window: u64) -> bool {
        (**self).start_trace(window)
    }
    fn write_trace(&mut self, path: &Path) -> std::io::Result<Vec<PathBuf>> {
        (**self).write_trace(path)
    }
}

/// Two backends in lockstep: `A` answers (and owns the state file, if any); `B` runs
/// alongside and must agree on every value and on nonvolatile state. By default the
/// model and the RTL; `Lockstep<Box<dyn Side>, Box<dyn Side>>` pairs any two.
pub struct Lockstep<A: Side = Model, B: Side = Rtl> {
    a: A,
    b: B,
    ops: u64,
    diverged: Option<String>,
    vcd: Option<PathBuf>,
}

/// Any two backends in lockstep, chosen at run time.
pub type DynLockstep = Lockstep<Box<dyn Side>, Box<dyn Side>>;

fn reg_name(word: u32) -> String {
    match regmap::lookup(word) {
        Some(def) => def.element_name(word & !3),
        None => "unmapped".into(),
    }
}

fn same_outcome<T: PartialEq + std::fmt::Debug>(
    (la, a): (&str, &Result<T, DeviceError>),
    (lb, b): (&str, &Result<T, DeviceError>),
) -> Option<String> {
    match (a, b) {
        (Ok(x), Ok(y)) if x == y => None,
        (Err(_), Err(_)) => None,
        (x, y) => Some(format!("{la} {x:?}, {lb} {y:?}")),
    }
}

impl Lockstep<Model, Rtl> {
    /// Both backends on `nv`, in memory.
    pub fn new(nv: NvState) -> Result<Lockstep, DeviceError> {
        Ok(Lockstep {
            b: Rtl::new(nv.clone())?,
            a: Model::new(nv)?,
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
            a: model,
            b: rtl,
            ops: 0,
            diverged: None,
            vcd: None,
        })
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.a
    }

    /// The RTL.
    pub fn rtl(&self) -> &Rtl {
        &self.b
    }

    /// The RTL, mutably: for fault injection in tests (an access made here is not
    /// mirrored on the model, so the next comparison of that state diverges).
    pub fn rtl_mut(&mut self) -> &mut Rtl {
        &mut self.b
    }
}

impl<A: Side, B: Side> Lockstep<A, B> {
    /// `a` and `b` in lockstep, which must start from the same state: `a` answers
    /// (and keeps the state file, if it has one).
    pub fn pair(a: A, b: B) -> Lockstep<A, B> {
        Lockstep {
            a,
            b,
            ops: 0,
            diverged: None,
            vcd: None,
        }
    }

    /// On divergence, write a VCD of the last `window` to `2 x window` cycles of
    /// the second side (the first if the second cannot trace) to `path` (tracing
    /// slows the RTL down several times). No effect if neither side traces.
    pub fn with_vcd(mut self, path: PathBuf, window: u64) -> Lockstep<A, B> {
        if self.b.start_trace(window) || self.a.start_trace(window) {
            self.vcd = Some(path);
        }
        self
    }

    /// Operations checked so far.
    pub fn ops(&self) -> u64 {
        self.ops
    }

    /// The side that answers.
    pub fn a(&self) -> &A {
        &self.a
    }

    /// The side checked against it.
    pub fn b(&self) -> &B {
        &self.b
    }

    /// The side checked against the first, mutably: for fault injection in tests
    /// (an access made here is not mirrored, so the next comparison diverges).
    pub fn b_mut(&mut self) -> &mut B {
        &mut self.b
    }

    fn fail(&mut self, what: String) -> DeviceError {
        let mut msg = format!("operation #{}: {what}", self.ops);
        if let Some(p) = &self.vcd {
            let traced = match self.b.write_trace(p) {
                Ok(f) if f.is_empty() => self.a.write_trace(p),
                r => r,
            };
            match traced {
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
        let m = self.a.nv_state();
        let r = self.b.nv_state();
        let (la, lb) = (self.a.label(), self.b.label());
        let mut diff = Vec::new();
        if m.counters != r.counters {
            diff.push(format!(
                "COUNTER thermometers: {la} {:x?}, {lb} {:x?}",
                m.counters, r.counters
            ));
        }
        if m.master != r.master {
            diff.push(format!("MASTER: {la} {}, {lb} {}", m.master, r.master));
        }
        if m.fuse != r.fuse {
            diff.push(format!("FUSE: {la} {}, {lb} {}", m.fuse, r.fuse));
        }
        if m.epoch != r.epoch {
            diff.push(format!("EPOCH: {la} {}, {lb} {}", m.epoch, r.epoch));
        }
        if flash {
            for reg in hilrig_device::Region::ALL {
                let (a, b) = (&m.flash[reg as usize], &r.flash[reg as usize]);
                if let Some(i) = a.iter().zip(b.iter()).position(|(x, y)| x != y) {
                    diff.push(format!(
                        "{reg} flash byte {i:#x}: {la} {:#04x}, {lb} {:#04x}",
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

impl<A: Side, B: Side> Device for Lockstep<A, B> {
    fn read_word(&mut self, word: u32, mask: u8) -> Result<u32, DeviceError> {
        self.check_stuck()?;
        self.ops += 1;
        let a = self.a.read_word(word, mask);
        let b = self.b.read_word(word, mask);
        if let (Ok(x), Ok(y)) = (&a, &b) {
            // Only the bytes the access wants are compared.
            let m = hilrig_device::device::byte_mask_bits(mask);
            if x & m != y & m {
                return Err(self.fail(format!(
                    "read BAR0+{word:#06x} ({}) mask {mask:#x}: {} {x:#010x}, {} {y:#010x}",
                    reg_name(word),
                    self.a.label(),
                    self.b.label()
                )));
            }
            return a;
        }
        if let Some(d) = same_outcome((self.a.label(), &a), (self.b.label(), &b)) {
            return Err(self.fail(format!("read BAR0+{word:#06x} ({}): {d}", reg_name(word))));
        }
        a
    }

    fn write_word(&mut self, word: u32, value: u32, mask: u8) -> Result<(), DeviceError> {
        self.check_stuck()?;
        self.ops += 1;
        let a = self.a.write_word(word, value, mask);
        let b = self.b.write_word(word, value, mask);
        if let Some(d) = same_outcome((self.a.label(), &a), (self.b.label(), &b)) {
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
        self.a.rom_size()
    }

    fn rom_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.check_stuck()?;
        self.ops += 1;
        let mut other = vec![0u8; data.len()];
        let a = self.a.rom_read(offset, data);
        let b = self.b.rom_read(offset, &mut other);
        if let Some(d) = same_outcome((self.a.label(), &a), (self.b.label(), &b)) {
            return Err(self.fail(format!("ROM read at {offset:#x}: {d}")));
        }
        if a.is_ok() && data != &other[..] {
            let i = data
                .iter()
                .zip(&other)
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            return Err(self.fail(format!(
                "ROM read of {} bytes at {offset:#x}: byte {i}: {} {:#04x}, {} {:#04x}",
                data.len(),
                self.a.label(),
                data[i],
                self.b.label(),
                other[i]
            )));
        }
        a
    }

    fn reset(&mut self, kind: ResetKind) -> Result<(), DeviceError> {
        self.check_stuck()?;
        self.ops += 1;
        let a = self.a.reset(kind);
        let b = self.b.reset(kind);
        if let Some(d) = same_outcome((self.a.label(), &a), (self.b.label(), &b)) {
            return Err(self.fail(format!("reset {kind:?}: {d}")));
        }
        self.check_nv(false)?;
        a
    }

    fn oob(&mut self, request: &[u8]) -> Result<Vec<u8>, DeviceError> {
        self.check_stuck()?;
        self.ops += 1;
        let a = self.a.oob(request);
        let b = self.b.oob(request);
        if let Some(d) = same_outcome((self.a.label(), &a), (self.b.label(), &b)) {
            return Err(self.fail(format!(
                "OOB request {}: {d}",
                hilrig_device::oob::hex_string(request)
            )));
        }
        self.check_nv(false)?;
        a
    }

    fn buffer_fd(&self) -> Option<BorrowedFd<'_>> {
        // Both sides must see every buffer access: guest accesses must trap.
        None
    }
}
