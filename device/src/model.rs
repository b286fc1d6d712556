//! The behavioural model of the reference device: every semantic of the datasheet,
//! decoded from the register table, fast enough never to limit a KVM guest.

use crate::device::{byte_mask_bits, Device, DeviceError, ResetKind};
use crate::regmap::*;
use crate::state::NvState;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

/// The data-buffer area (pages 4..=15) in shared memory (a memfd), so a VMM can map it
/// straight into a guest while the device reads and writes it too. All access goes
/// through raw pointers with volatile word accesses, because the guest may write the
/// same memory at any time.
pub struct BufferMem {
    file: std::fs::File,
    map: memmap2::MmapRaw,
}

impl BufferMem {
    /// A zeroed, shareable buffer area of `BUFFER_SIZE` bytes.
    pub fn new() -> std::io::Result<BufferMem> {
        let mfd = memfd::MemfdOptions::default()
            .close_on_exec(true)
            .create("hilrig-device-buffers")
            .map_err(std::io::Error::other)?;
        let file = mfd.into_file();
        file.set_len(BUFFER_SIZE as u64)?;
        let map = memmap2::MmapOptions::new()
            .len(BUFFER_SIZE)
            .map_raw(&file)?;
        Ok(BufferMem { file, map })
    }

    /// The buffer area kept in the file `path` (created 0600, `O_NOFOLLOW`, sized
    /// `BUFFER_SIZE`; an existing one keeps its contents): the data buffers of a
    /// simulated device that stays powered while VMM processes come and go, so what
    /// one tenant leaves there is what the next one finds unless teardown scrubs it.
    pub fn open_file(path: &Path) -> std::io::Result<BufferMem> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)?;
        let meta = file.metadata()?;
        if !meta.file_type().is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        if meta.len() != BUFFER_SIZE as u64 {
            file.set_len(BUFFER_SIZE as u64)?;
        }
        let map = memmap2::MmapOptions::new()
            .len(BUFFER_SIZE)
            .map_raw(&file)?;
        Ok(BufferMem { file, map })
    }

    /// Read the 32-bit word at byte offset `off` (4-aligned, < BUFFER_SIZE).
    #[inline]
    pub fn read_u32(&self, off: usize) -> u32 {
        assert!(off + 4 <= BUFFER_SIZE && off % 4 == 0);
        // SAFETY: in bounds and aligned (checked above); the mapping lives as long as self.
        unsafe { std::ptr::read_volatile(self.map.as_ptr().add(off) as *const u32) }
    }

    /// Write the 32-bit word at byte offset `off` (4-aligned, < BUFFER_SIZE).
    #[inline]
    pub fn write_u32(&self, off: usize, v: u32) {
        assert!(off + 4 <= BUFFER_SIZE && off % 4 == 0);
        // SAFETY: as in read_u32.
        unsafe { std::ptr::write_volatile(self.map.as_mut_ptr().add(off) as *mut u32, v) }
    }

    /// Copy `out.len()` bytes starting at `off` out of the buffer area.
    pub fn read_bytes(&self, off: usize, out: &mut [u8]) {
        assert!(off + out.len() <= BUFFER_SIZE);
        // SAFETY: in bounds (checked above); `out` is our own memory.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(off), out.as_mut_ptr(), out.len())
        }
    }

    /// Copy `data` into the buffer area at `off`.
    pub fn write_bytes(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= BUFFER_SIZE);
        // SAFETY: in bounds (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.map.as_mut_ptr().add(off), data.len())
        }
    }

    /// Zero the whole area.
    pub fn clear(&self) {
        // SAFETY: the whole mapping.
        unsafe { std::ptr::write_bytes(self.map.as_mut_ptr(), 0, BUFFER_SIZE) }
    }
}

impl AsFd for BufferMem {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The file that holds the data buffers of the device in state file `state` while
/// it stays powered ([`Model::keep_buffers_beside_state`]): `.NAME.buffers` beside it.
pub fn buffers_path(state: &Path) -> PathBuf {
    let name = state
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let dir = match state.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    dir.join(format!(".{name}.buffers"))
}

/// The device in state file `state` loses power: its kept data buffers are gone.
pub fn power_cycle_buffers(state: &Path) {
    let _ = std::fs::remove_file(buffers_path(state));
}

/// Volatile state: lost on reset, FLR, power cycle and soft reset.
#[derive(Debug, Clone)]
struct Volatile {
    control: u32,
    scratch: [u32; 8],
    doorbell: u32,
    irq_status: u32,
    hung: bool,
    flash_region: u32,
    flash_addr: u32,
    flash_len: u32,
    flash_src: u32,
    /// DONE / REFUSED_* bits of the last command.
    flash_result: u32,
    unlocked: bool,
    unlock_stage: u8,
    bad_key: bool,
}

impl Default for Volatile {
    /// The state after reset: every register at the table's reset value.
    fn default() -> Self {
        Volatile {
            control: def(Reg::Control).reset,
            scratch: [def(Reg::Scratch).reset; 8],
            doorbell: def(Reg::Doorbell).reset,
            irq_status: def(Reg::IrqStatus).reset,
            hung: false,
            flash_region: def(Reg::FlashRegion).reset,
            flash_addr: def(Reg::FlashAddr).reset,
            flash_len: def(Reg::FlashLen).reset,
            flash_src: def(Reg::FlashSrc).reset,
            flash_result: def(Reg::FlashStatus).reset,
            unlocked: false,
            unlock_stage: 0,
            bad_key: false,
        }
    }
}

// The storage registers' table rows: writes go through `RegisterDef::write`
// (writable mask, W1C bits).
const CONTROL: &RegisterDef = def(Reg::Control);
const SCRATCH: &RegisterDef = def(Reg::Scratch);
const DOORBELL: &RegisterDef = def(Reg::Doorbell);
const IRQ_STATUS: &RegisterDef = def(Reg::IrqStatus);
const FLASH_REGION: &RegisterDef = def(Reg::FlashRegion);
const FLASH_ADDR: &RegisterDef = def(Reg::FlashAddr);
const FLASH_LEN: &RegisterDef = def(Reg::FlashLen);
const FLASH_SRC: &RegisterDef = def(Reg::FlashSrc);
const BUFFER: &RegisterDef = def(Reg::Buffer);
const _: () = assert!(
    SCRATCH.count as usize == 8,
    "Volatile::scratch holds SCRATCH's elements"
);

/// Statistics the model keeps for tests and benchmarks (volatile, not device state).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ModelStats {
    /// Program/erase attempts seen (counted or not).
    pub attempts: u64,
    /// Attempts that were acted on.
    pub acted: u64,
    /// State-file saves.
    pub saves: u64,
}

/// The behavioural model.
pub struct Model {
    nv: NvState,
    store: Option<PathBuf>,
    vol: Volatile,
    buf: BufferMem,
    stats: ModelStats,
}

impl Model {
    /// A model of `nv` kept in memory only (no state file).
    pub fn new(nv: NvState) -> Result<Model, DeviceError> {
        let buf = BufferMem::new().map_err(|e| DeviceError::Transport {
            what: "memfd for the data buffers".into(),
            detail: e.to_string(),
        })?;
        Ok(Model {
            nv,
            store: None,
            vol: Volatile::default(),
            buf,
            stats: ModelStats::default(),
        })
    }

    /// Open the device whose nonvolatile state is in `path`. A bad file is refused
    /// and left untouched.
    pub fn open(path: &Path) -> Result<Model, DeviceError> {
        let nv = NvState::load(path)?;
        let mut m = Model::new(nv)?;
        m.store = Some(path.to_path_buf());
        Ok(m)
    }

    /// Create a new state file at `path` holding `nv` and open it. Refuses to replace
    /// an existing file.
    pub fn create(path: &Path, nv: NvState) -> Result<Model, DeviceError> {
        crate::state::refuse_existing(path)?;
        // A new device: nothing of an earlier one's buffers.
        power_cycle_buffers(path);
        let mut m = Model::new(nv)?;
        m.store = Some(path.to_path_buf());
        m.persist()?;
        Ok(m)
    }

    /// Keep the data buffers in the file beside the state file
    /// ([`buffers_path`]) instead of process memory: the device stays powered
    /// between VMM processes (as a real device does between tenants), so the next
    /// process sees what the last one left unless teardown scrubbed it. A power
    /// cycle or a new device removes the file ([`power_cycle_buffers`]).
    pub fn keep_buffers_beside_state(&mut self) -> Result<(), DeviceError> {
        let Some(state) = self.store.clone() else {
            return Ok(());
        };
        let p = buffers_path(&state);
        self.buf = BufferMem::open_file(&p).map_err(|e| DeviceError::Transport {
            what: format!("device buffer file {}", p.display()),
            detail: e.to_string(),
        })?;
        Ok(())
    }

    /// The nonvolatile state.
    pub fn nv(&self) -> &NvState {
        &self.nv
    }

    /// The state file, if any.
    pub fn store(&self) -> Option<&Path> {
        self.store.as_deref()
    }

    /// Statistics.
    pub fn stats(&self) -> ModelStats {
        self.stats
    }

    /// Whether the device is wedged by the hang magic.
    pub fn is_hung(&self) -> bool {
        self.vol.hung
    }

    /// The data-buffer memory.
    pub fn buffers(&self) -> &BufferMem {
        &self.buf
    }

    fn persist(&mut self) -> Result<(), DeviceError> {
        if crate::state::persist(&self.nv, self.store.as_deref())? {
            self.stats.saves += 1;
        }
        Ok(())
    }

    fn volatile_reset(&mut self) {
        self.vol = Volatile::default();
        self.buf.clear();
    }

    fn status(&self) -> u32 {
        let mut s = 0;
        if self.nv.fuse {
            s |= STATUS_FUSE_BLOWN;
        }
        if self.vol.unlocked {
            s |= STATUS_FLASH_UNLOCKED;
        }
        if self.vol.irq_status & self.vol.control & CONTROL_IRQ_ENABLE != 0 {
            s |= STATUS_IRQ_PENDING;
        }
        s
    }

    fn flash_status(&self) -> u32 {
        let mut s = self.vol.flash_result;
        if self.vol.unlocked {
            s |= FLASH_STATUS_UNLOCKED;
        }
        if self.vol.bad_key {
            s |= FLASH_STATUS_BAD_KEY;
        }
        s
    }

    fn unlock(&mut self, v: u32) {
        let v_ = &mut self.vol;
        if v == UNLOCK_KEY1 {
            v_.unlock_stage = 1;
        } else if v == UNLOCK_KEY2 && v_.unlock_stage == 1 {
            v_.unlock_stage = 0;
            v_.unlocked = true;
            v_.bad_key = false;
        } else {
            v_.unlock_stage = 0;
            v_.bad_key = true;
        }
    }

    /// Execute a FLASH_CMD write.
    fn command(&mut self, v: u32) -> Result<(), DeviceError> {
        let kind = match v {
            FLASH_CMD_ERASE | FLASH_CMD_PROGRAM => v,
            FLASH_CMD_LOCK => {
                self.vol.unlocked = false;
                self.vol.flash_result = FLASH_STATUS_DONE;
                return Ok(());
            }
            _ => {
                self.vol.flash_result = FLASH_STATUS_REFUSED_ARGS;
                return Ok(());
            }
        };
        let Some(region) = Region::from_index(self.vol.flash_region) else {
            // Targets no region: refused, and not an attempt on any counter.
            self.vol.flash_result = FLASH_STATUS_REFUSED_ARGS;
            return Ok(());
        };
        self.stats.attempts += 1;
        // Count first and make the count durable before acting: a power cut can
        // never undercount.
        let a = self.nv.count_attempt(region);
        if a.counted {
            self.persist()?;
        }
        let size = self.nv.config.region_size(region);
        let (addr, len, src) = (self.vol.flash_addr, self.vol.flash_len, self.vol.flash_src);
        self.vol.flash_result = if a.fuse_was_blown {
            FLASH_STATUS_REFUSED_FUSE
        } else if !self.vol.unlocked {
            FLASH_STATUS_REFUSED_LOCKED
        } else if kind == FLASH_CMD_PROGRAM && !program_args_ok(addr, len, src, size) {
            FLASH_STATUS_REFUSED_ARGS
        } else {
            let flash = &mut self.nv.flash[region as usize];
            if kind == FLASH_CMD_ERASE {
                flash.fill(0xff);
            } else {
                let (addr, len, src) = (addr as usize, len as usize, src as usize);
                let mut data = vec![0u8; len];
                self.buf.read_bytes(src, &mut data);
                for (f, d) in flash[addr..addr + len].iter_mut().zip(data) {
                    *f &= d;
                }
            }
            self.stats.acted += 1;
            self.persist()?;
            FLASH_STATUS_DONE
        };
        Ok(())
    }
}

/// PROGRAM's argument rules: address, length and source 4-aligned; length non-zero;
/// destination inside the region; source inside the buffer area.
pub fn program_args_ok(addr: u32, len: u32, src: u32, region_size: u32) -> bool {
    addr % 4 == 0
        && len % 4 == 0
        && src % 4 == 0
        && len > 0
        && (addr as u64 + len as u64) <= region_size as u64
        && (src as u64 + len as u64) <= BUFFER_SIZE as u64
}

impl Device for Model {
    #[inline]
    fn read_word(&mut self, word: u32, _mask: u8) -> Result<u32, DeviceError> {
        if self.vol.hung {
            return Ok(u32::MAX);
        }
        let Some((reg, i)) = DECODER.decode(word) else {
            return Ok(0);
        };
        let i = i as usize;
        let v = &self.vol;
        Ok(match reg {
            Reg::Buffer => self.buf.read_u32(i * 4),
            Reg::Id => DEVICE_ID_VALUE,
            Reg::Version => DEVICE_VERSION_VALUE,
            Reg::Status => self.status(),
            Reg::Control => v.control,
            Reg::Scratch => v.scratch[i],
            Reg::Doorbell => v.doorbell,
            Reg::IrqStatus => v.irq_status,
            Reg::HangTrigger | Reg::SoftReset | Reg::FlashCmd | Reg::FlashUnlock => 0,
            Reg::Serial => (self.nv.serial >> (32 * i)) as u32,
            Reg::FlashRegion => v.flash_region,
            Reg::FlashAddr => v.flash_addr,
            Reg::FlashData => match Region::from_index(v.flash_region) {
                Some(r) => {
                    let f = &self.nv.flash[r as usize];
                    let a = (v.flash_addr & !3) as usize;
                    match f.get(a..a + 4) {
                        Some(w) => u32::from_le_bytes([w[0], w[1], w[2], w[3]]),
                        None => u32::MAX,
                    }
                }
                None => u32::MAX,
            },
            Reg::FlashLen => v.flash_len,
            Reg::FlashSrc => v.flash_src,
            Reg::FlashStatus => self.flash_status(),
            Reg::Counter => self.nv.counters[i].count_ones(),
            Reg::Master => self.nv.master,
            Reg::Fuse => self.nv.fuse as u32,
            Reg::SlotsLeft => self.nv.slots_left(),
            Reg::Width => self.nv.config.counter_width as u32,
            Reg::Epoch => self.nv.epoch,
            Reg::DeviceKey => {
                let k = &self.nv.device_key[i * 4..i * 4 + 4];
                u32::from_le_bytes([k[0], k[1], k[2], k[3]])
            }
        })
    }

    #[inline]
    fn write_word(&mut self, word: u32, value: u32, mask: u8) -> Result<(), DeviceError> {
        if self.vol.hung {
            return Ok(());
        }
        let Some((reg, i)) = DECODER.decode(word) else {
            return Ok(());
        };
        let i = i as usize;
        let bits = if mask == 0xf {
            u32::MAX
        } else {
            byte_mask_bits(mask)
        };
        let trig = value & bits;
        let v = &mut self.vol;
        match reg {
            Reg::Buffer => {
                let off = i * 4;
                let new = if bits == u32::MAX && BUFFER.writable == u32::MAX {
                    value
                } else {
                    BUFFER.write(self.buf.read_u32(off), value, bits)
                };
                self.buf.write_u32(off, new);
            }
            Reg::Control => v.control = CONTROL.write(v.control, value, bits),
            Reg::Scratch => v.scratch[i] = SCRATCH.write(v.scratch[i], value, bits),
            Reg::Doorbell => {
                v.doorbell = DOORBELL.write(v.doorbell, value, bits);
                v.irq_status |= IRQ_DOORBELL;
            }
            Reg::IrqStatus => v.irq_status = IRQ_STATUS.write(v.irq_status, value, bits),
            Reg::HangTrigger => {
                if trig == HANG_MAGIC {
                    v.hung = true;
                }
            }
            Reg::SoftReset => {
                if trig == SOFT_RESET_MAGIC {
                    self.volatile_reset();
                }
            }
            Reg::FlashRegion => v.flash_region = FLASH_REGION.write(v.flash_region, value, bits),
            Reg::FlashAddr => v.flash_addr = FLASH_ADDR.write(v.flash_addr, value, bits),
            Reg::FlashLen => v.flash_len = FLASH_LEN.write(v.flash_len, value, bits),
            Reg::FlashSrc => v.flash_src = FLASH_SRC.write(v.flash_src, value, bits),
            Reg::FlashCmd => self.command(trig)?,
            Reg::FlashUnlock => self.unlock(trig),
            Reg::Id
            | Reg::Version
            | Reg::Status
            | Reg::Serial
            | Reg::FlashData
            | Reg::FlashStatus
            | Reg::Counter
            | Reg::Master
            | Reg::Fuse
            | Reg::SlotsLeft
            | Reg::Width
            | Reg::Epoch
            | Reg::DeviceKey => {}
        }
        Ok(())
    }

    fn rom_size(&self) -> u64 {
        self.nv.config.region_size(Region::Vbios) as u64
    }

    fn rom_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        crate::device::check_rom(offset, data.len(), self.rom_size())?;
        if self.vol.hung {
            data.fill(0xff);
        } else {
            let o = offset as usize;
            data.copy_from_slice(&self.nv.flash[Region::Vbios as usize][o..o + data.len()]);
        }
        Ok(())
    }

    fn reset(&mut self, _kind: ResetKind) -> Result<(), DeviceError> {
        // Reset, FLR and power cycle all lose volatile state; nonvolatile state is
        // already durable (saved on every change).
        self.volatile_reset();
        Ok(())
    }

    fn oob(&mut self, request: &[u8]) -> Result<Vec<u8>, DeviceError> {
        let store = self.store.clone();
        let mut saves = 0;
        let out = crate::oob::serve(&mut self.nv, request, &mut |nv| match &store {
            Some(p) => {
                saves += 1;
                nv.save(p).is_ok()
            }
            None => true,
        });
        self.stats.saves += saves;
        Ok(out)
    }

    fn buffer_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.buf.as_fd())
    }
}

/// Operator helpers that drive the in-band flash controller, as a tenant-less
/// operator would. Shared by the CLI, tests and the conformance suite.
pub mod ops {
    use super::*;

    /// What one flash command did.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct CmdResult {
        /// FLASH_STATUS after the command.
        pub status: u32,
    }

    impl CmdResult {
        /// The command completed.
        pub fn done(self) -> bool {
            self.status & FLASH_STATUS_DONE != 0
        }
    }

    /// Write the unlock sequence.
    pub fn unlock(d: &mut dyn Device) -> Result<(), DeviceError> {
        d.write32(Reg::FlashUnlock.offset(), UNLOCK_KEY1)?;
        d.write32(Reg::FlashUnlock.offset(), UNLOCK_KEY2)
    }

    /// Issue ERASE on `region`.
    pub fn erase(d: &mut dyn Device, region: Region) -> Result<CmdResult, DeviceError> {
        d.write32(Reg::FlashRegion.offset(), region as u32)?;
        d.write32(Reg::FlashCmd.offset(), FLASH_CMD_ERASE)?;
        Ok(CmdResult {
            status: d.read32(Reg::FlashStatus.offset())?,
        })
    }

    /// Stage `data` in the buffer area at `src` and issue PROGRAM to `region` at `addr`.
    pub fn program(
        d: &mut dyn Device,
        region: Region,
        addr: u32,
        src: u32,
        data: &[u8],
    ) -> Result<CmdResult, DeviceError> {
        for (i, chunk) in data.chunks(8).enumerate() {
            let off = BUFFER_BASE as u64 + src as u64 + 8 * i as u64;
            d.mmio_write(off, chunk)?;
        }
        d.write32(Reg::FlashRegion.offset(), region as u32)?;
        d.write32(Reg::FlashAddr.offset(), addr)?;
        d.write32(Reg::FlashSrc.offset(), src)?;
        d.write32(Reg::FlashLen.offset(), data.len() as u32)?;
        d.write32(Reg::FlashCmd.offset(), FLASH_CMD_PROGRAM)?;
        Ok(CmdResult {
            status: d.read32(Reg::FlashStatus.offset())?,
        })
    }

    /// Unlock, erase `region`, program `image` in buffer-sized chunks, lock. Returns the
    /// number of attempts made. Stops at the first refused command and says which.
    pub fn flash_region(
        d: &mut dyn Device,
        region: Region,
        image: &[u8],
    ) -> Result<u32, FlashError> {
        let padded_len = image.len().div_ceil(4) * 4;
        let mut img = image.to_vec();
        img.resize(padded_len, 0xff);
        unlock(d)?;
        let mut attempts = 1;
        let r = erase(d, region)?;
        if !r.done() {
            return Err(FlashError::Refused {
                step: "erase".into(),
                status: r.status,
            });
        }
        for (i, chunk) in img.chunks(BUFFER_SIZE).enumerate() {
            attempts += 1;
            let r = program(d, region, (i * BUFFER_SIZE) as u32, 0, chunk)?;
            if !r.done() {
                return Err(FlashError::Refused {
                    step: format!("program chunk {i}"),
                    status: r.status,
                });
            }
        }
        d.write32(Reg::FlashCmd.offset(), FLASH_CMD_LOCK)?;
        Ok(attempts)
    }

    /// Read a whole region back through the FLASH_DATA window.
    pub fn read_region(
        d: &mut dyn Device,
        region: Region,
        len: u32,
    ) -> Result<Vec<u8>, DeviceError> {
        d.write32(Reg::FlashRegion.offset(), region as u32)?;
        let mut out = Vec::with_capacity(len as usize);
        for a in (0..len).step_by(4) {
            d.write32(Reg::FlashAddr.offset(), a)?;
            out.extend_from_slice(&d.read32(Reg::FlashData.offset())?.to_le_bytes());
        }
        Ok(out)
    }

    /// Why flashing failed.
    #[derive(Debug, thiserror::Error)]
    pub enum FlashError {
        /// The device refused a command.
        #[error("device refused the {step}: FLASH_STATUS {status:#x} ({})", describe_flash_status(*status))]
        Refused {
            /// Which step.
            step: String,
            /// FLASH_STATUS.
            status: u32,
        },
        /// The backend failed.
        #[error(transparent)]
        Device(#[from] DeviceError),
    }

    /// FLASH_STATUS bits as words, from the register table's field list.
    pub fn describe_flash_status(status: u32) -> String {
        let names: Vec<&str> = Reg::FlashStatus
            .def()
            .fields
            .iter()
            .filter(|f| status >> f.lsb & 1 != 0)
            .map(|f| f.name)
            .collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join("|")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ops::*;
    use super::*;
    use crate::state::DeviceConfig;

    fn model(width: u8) -> Model {
        Model::new(NvState::factory(DeviceConfig::with_width(width), 1).unwrap()).unwrap()
    }

    #[test]
    fn identity_and_scratch() {
        let mut m = model(8);
        assert_eq!(m.read32(Reg::Id.offset()).unwrap(), DEVICE_ID_VALUE);
        m.write32(Reg::Scratch.offset() + 8, 0x1122_3344).unwrap();
        // Byte write merges into a storage register.
        m.mmio_write(Reg::Scratch.offset() as u64 + 9, &[0xaa])
            .unwrap();
        assert_eq!(m.read32(Reg::Scratch.offset() + 8).unwrap(), 0x1122_aa44);
        // 8-byte read spanning two scratch registers.
        let mut b = [0u8; 8];
        m.mmio_read(Reg::Scratch.offset() as u64 + 4, &mut b)
            .unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x1122_aa44_0000_0000);
    }

    #[test]
    fn refused_attempts_are_counted_before_acting() {
        let mut m = model(8);
        // Locked: refused, counted.
        let r = erase(&mut m, Region::Firmware).unwrap();
        assert_eq!(
            r.status & FLASH_STATUS_REFUSED_LOCKED,
            FLASH_STATUS_REFUSED_LOCKED
        );
        assert_eq!(m.read32(Reg::Counter.offset() + 4).unwrap(), 1);
        assert_eq!(m.read32(Reg::Master.offset()).unwrap(), 1);
        // Bad key then a program: refused, counted, BAD_KEY shown.
        m.write32(Reg::FlashUnlock.offset(), 0x1234).unwrap();
        let r = program(&mut m, Region::Config, 0, 0, &[0; 4]).unwrap();
        assert_ne!(r.status & FLASH_STATUS_BAD_KEY, 0);
        assert_eq!(m.read32(Reg::Counter.offset() + 8).unwrap(), 1);
        assert_eq!(m.read32(Reg::Master.offset()).unwrap(), 2);
    }

    #[test]
    fn flash_program_and_read_back() {
        let mut m = model(8);
        let img: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        assert_eq!(flash_region(&mut m, Region::Firmware, &img).unwrap(), 2);
        let back = read_region(&mut m, Region::Firmware, 1000).unwrap();
        assert_eq!(back, img);
        assert_eq!(m.nv().counter(Region::Firmware), 2);
        assert_eq!(
            m.read32(Reg::Status.offset()).unwrap() & STATUS_FLASH_UNLOCKED,
            0
        );
    }

    #[test]
    fn fuse_blows_at_budget_end_and_locks_flash() {
        let mut m = model(3);
        unlock(&mut m).unwrap();
        for _ in 0..3 {
            assert!(erase(&mut m, Region::Config).unwrap().done());
        }
        assert_eq!(m.read32(Reg::Fuse.offset()).unwrap(), 1);
        let before = m.nv().flash.clone();
        let r = program(&mut m, Region::Vbios, 0, 0, &[0; 8]).unwrap();
        assert_eq!(
            r.status & FLASH_STATUS_REFUSED_FUSE,
            FLASH_STATUS_REFUSED_FUSE
        );
        assert_eq!(m.nv().flash, before);
        assert_eq!(
            m.read32(Reg::Counter.offset()).unwrap(),
            1,
            "vbios attempt counted"
        );
        assert_eq!(m.read32(Reg::SlotsLeft.offset()).unwrap(), 0);
    }

    #[test]
    fn hang_wedges_until_reset_and_oob_still_answers() {
        let mut m = model(8);
        m.write32(Reg::Scratch.offset(), 5).unwrap();
        // A byte write of part of the magic does nothing.
        m.mmio_write(Reg::HangTrigger.offset() as u64, &[0x47])
            .unwrap();
        assert!(!m.is_hung());
        m.write32(Reg::HangTrigger.offset(), HANG_MAGIC).unwrap();
        assert_eq!(m.read32(Reg::Id.offset()).unwrap(), u32::MAX);
        let mut rom = [0u8; 4];
        m.rom_read(0, &mut rom).unwrap();
        assert_eq!(rom, [0xff; 4]);
        m.write32(Reg::SoftReset.offset(), SOFT_RESET_MAGIC)
            .unwrap();
        assert!(
            m.is_hung(),
            "soft reset is a write, and writes are ignored while hung"
        );
        assert_eq!(crate::oob::read_counters(&mut m).unwrap().width, 8);
        m.reset(ResetKind::Flr).unwrap();
        assert_eq!(m.read32(Reg::Id.offset()).unwrap(), DEVICE_ID_VALUE);
        assert_eq!(m.read32(Reg::Scratch.offset()).unwrap(), 0);
    }

    #[test]
    fn persistence_survives_reopen_and_bad_files_are_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.state");
        let mut m = Model::create(
            &p,
            NvState::factory(DeviceConfig::with_width(8), 3).unwrap(),
        )
        .unwrap();
        erase(&mut m, Region::Vbios).unwrap();
        drop(m);
        let mut m = Model::open(&p).unwrap();
        assert_eq!(m.read32(Reg::Counter.offset()).unwrap(), 1);
        assert!(Model::create(&p, m.nv().clone()).is_err());
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.truncate(100);
        std::fs::write(&p, &bytes).unwrap();
        let e = Model::open(&p).err().unwrap().to_string();
        assert!(e.contains("d.state") && e.contains("truncated"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), bytes);
    }

    #[test]
    fn out_of_range_and_bad_widths_are_errors_not_panics() {
        let mut m = model(8);
        let mut b = [0u8; 8];
        assert!(m.mmio_read(0xfffc, &mut b).is_err());
        assert!(m.mmio_write(0x10000, &[1]).is_err());
        assert!(m.mmio_read(0, &mut []).is_err());
        assert!(m.mmio_read(0, &mut [0u8; 9]).is_err());
        assert!(m.rom_read(16 * 1024 - 2, &mut [0u8; 4]).is_err());
        // Holes read 0 and ignore writes.
        m.write32(0x0ffc, 7).unwrap();
        assert_eq!(m.read32(0x0ffc).unwrap(), 0);
    }
}
