//! The `Device` trait: what every backend (model, rtl, lockstep, vfio, fpga) offers.

use crate::regmap::BAR0_SIZE;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;

/// Errors a device backend reports. None of them is a panic; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An MMIO access was refused before it reached the device.
    #[error("MMIO access of {len} bytes at BAR0+{offset:#x}: {reason}")]
    Access {
        /// Byte offset in BAR0.
        offset: u64,
        /// Access length in bytes.
        len: usize,
        /// Why it was refused.
        reason: AccessFault,
    },
    /// An expansion-ROM read was out of range.
    #[error("expansion-ROM read of {len} bytes at {offset:#x}: past the ROM's end ({size:#x})")]
    RomRange {
        /// Offset of the read.
        offset: u64,
        /// Length of the read.
        len: usize,
        /// ROM size.
        size: u64,
    },
    /// Nonvolatile state could not be saved; the command that needed it did not act.
    #[error("saving device state to {path}: {source}")]
    Persist {
        /// The state file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A state file could not be loaded.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// The backend's transport failed (serial port, bridge, VFIO).
    #[error("device transport {what}: {detail}")]
    Transport {
        /// Which transport (port path, device).
        what: String,
        /// What went wrong.
        detail: String,
    },
    /// Two backends disagreed (lockstep).
    #[error("backends diverged: {0}")]
    Divergence(String),
    /// The backend does not offer this operation (e.g. OOB on a VFIO function: the
    /// rig reaches that device's OOB port separately).
    #[error("{backend} backend does not support {what}")]
    Unsupported {
        /// The backend.
        backend: &'static str,
        /// The operation.
        what: &'static str,
    },
}

/// Why an MMIO access was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AccessFault {
    /// Length 0 or more than 8 bytes.
    #[error("bad width (lengths 1 to 8 are allowed)")]
    BadWidth,
    /// The access reaches past the end of BAR0.
    #[error("out of range (BAR0 is 0x10000 bytes)")]
    OutOfRange,
}

/// The kinds of reset a device undergoes. All three clear volatile state; none
/// touches nonvolatile state (flash, counters, fuse, keys, serial).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResetKind {
    /// Conventional (hot/secondary-bus) reset.
    Reset,
    /// PCIe function-level reset.
    Flr,
    /// Power removed and restored.
    PowerCycle,
}

/// Validate an expansion-ROM read of `len` bytes at `offset` against the ROM's `size`.
pub fn check_rom(offset: u64, len: usize, size: u64) -> Result<(), DeviceError> {
    if offset.checked_add(len as u64).is_none_or(|e| e > size) {
        return Err(DeviceError::RomRange { offset, len, size });
    }
    Ok(())
}

/// A ROM read for backends that fetch the ROM a 32-bit word at a time:
/// `word(byte offset of an aligned word)` returns it; `data` is filled from
/// `offset` on, any alignment. The range is checked against `size` first.
pub fn rom_read_by_words(
    offset: u64,
    data: &mut [u8],
    size: u64,
    mut word: impl FnMut(u64) -> Result<u32, DeviceError>,
) -> Result<(), DeviceError> {
    check_rom(offset, data.len(), size)?;
    let mut pos = offset;
    let mut i = 0;
    while i < data.len() {
        let w = pos & !3;
        let v = word(w)?.to_le_bytes();
        let b = (pos - w) as usize;
        let n = (4 - b).min(data.len() - i);
        data[i..i + n].copy_from_slice(&v[b..b + n]);
        i += n;
        pos += n as u64;
    }
    Ok(())
}

/// Validate an MMIO access against BAR0.
#[inline]
pub fn check_access(offset: u64, len: usize) -> Result<(), DeviceError> {
    let reason = if len == 0 || len > 8 {
        AccessFault::BadWidth
    } else if offset
        .checked_add(len as u64)
        .is_none_or(|end| end > BAR0_SIZE)
    {
        AccessFault::OutOfRange
    } else {
        return Ok(());
    };
    Err(DeviceError::Access {
        offset,
        len,
        reason,
    })
}

/// One register-sized piece of a split MMIO access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WordPart {
    /// 4-aligned offset of the register word.
    pub word: u32,
    /// Byte mask of the bytes touched within the word (bit i = byte i).
    pub mask: u8,
    /// Index into the access's data of the first touched byte.
    pub data_start: usize,
    /// Byte position within the word of the first touched byte.
    pub byte_in_word: usize,
    /// Number of bytes touched.
    pub len: usize,
}

/// Split a (validated) access into the 32-bit words it touches, ascending.
/// An access of at most 8 bytes touches at most 3 words.
#[inline]
pub fn split_access(offset: u64, len: usize) -> impl Iterator<Item = WordPart> {
    let mut pos = offset;
    let end = offset + len as u64;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let word = pos & !3;
        let byte_in_word = (pos - word) as usize;
        let n = ((word + 4).min(end) - pos) as usize;
        let mask = (((1u16 << n) - 1) as u8) << byte_in_word;
        let part = WordPart {
            word: word as u32,
            mask,
            data_start: (pos - offset) as usize,
            byte_in_word,
            len: n,
        };
        pos += n as u64;
        Some(part)
    })
}

/// Expand a 4-bit byte mask to a 32-bit bit mask.
#[inline]
pub fn byte_mask_bits(mask: u8) -> u32 {
    let mut m = 0u32;
    for i in 0..4 {
        if mask & (1 << i) != 0 {
            m |= 0xff << (8 * i);
        }
    }
    m
}

/// A device backend. Implementations: the behavioural model (`hilrig_device::model`),
/// the RTL, lockstep, VFIO and the FPGA bridge.
///
/// Backends implement the word-level methods (`read_word`/`write_word`, like the
/// hardware bus with byte enables); the byte-level `mmio_read`/`mmio_write` are provided
/// and apply the documented access rules (`regmap::ACCESS_RULES`) identically for
/// every simulated backend. A pass-through backend (VFIO, where the real device must
/// see the guest's exact access width) may override them, but must keep the same
/// bounds checks (`check_access`):
/// - 1 to 8 bytes at any offset wholly inside BAR0, else an `Access` error and no effect;
/// - split into the 32-bit registers touched, ascending, each with a byte mask;
/// - reads have no side effects.
pub trait Device: Send {
    /// Read the 32-bit register word at `word` (4-aligned, inside BAR0). `mask` names
    /// the bytes the access wants; backends may return the whole word.
    fn read_word(&mut self, word: u32, mask: u8) -> Result<u32, DeviceError>;

    /// Write the bytes of `value` selected by `mask` to the register word at `word`
    /// (4-aligned, inside BAR0).
    fn write_word(&mut self, word: u32, value: u32, mask: u8) -> Result<(), DeviceError>;

    /// Size of the expansion ROM in bytes (the VBIOS region).
    fn rom_size(&self) -> u64;

    /// Read the expansion ROM (the VBIOS region). Reads past the end are refused.
    fn rom_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError>;

    /// Reset the device. Volatile state is lost; nonvolatile state is kept.
    fn reset(&mut self, kind: ResetKind) -> Result<(), DeviceError>;

    /// Handle one OOB request frame and return the response frame. Malformed frames
    /// get an error frame (see `oob`), never an `Err`; `Err` means the transport failed
    /// or the backend has no OOB path of its own (the default).
    fn oob(&mut self, request: &[u8]) -> Result<Vec<u8>, DeviceError> {
        let _ = request;
        Err(DeviceError::Unsupported {
            backend: "this",
            what: "out-of-band requests",
        })
    }

    /// A file descriptor of the device's data-buffer memory (pages 4..=15,
    /// `regmap::BUFFER_SIZE` bytes at offset 0), if the backend keeps it in shared
    /// memory that a VMM may map straight into a guest.
    fn buffer_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// Read `data.len()` bytes at `offset` in BAR0 (see the trait docs for the rules).
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        check_access(offset, data.len())?;
        if data.len() == 4 && offset & 3 == 0 {
            let v = self.read_word(offset as u32, 0xf)?;
            data.copy_from_slice(&v.to_le_bytes());
            return Ok(());
        }
        for p in split_access(offset, data.len()) {
            let v = self.read_word(p.word, p.mask)?.to_le_bytes();
            data[p.data_start..p.data_start + p.len]
                .copy_from_slice(&v[p.byte_in_word..p.byte_in_word + p.len]);
        }
        Ok(())
    }

    /// Write `data` at `offset` in BAR0 (see the trait docs for the rules).
    fn mmio_write(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        check_access(offset, data.len())?;
        if data.len() == 4 && offset & 3 == 0 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            return self.write_word(offset as u32, v, 0xf);
        }
        for p in split_access(offset, data.len()) {
            let mut b = [0u8; 4];
            b[p.byte_in_word..p.byte_in_word + p.len]
                .copy_from_slice(&data[p.data_start..p.data_start + p.len]);
            self.write_word(p.word, u32::from_le_bytes(b), p.mask)?;
        }
        Ok(())
    }

    /// Convenience: read a 32-bit register at a 4-aligned offset.
    fn read32(&mut self, offset: u32) -> Result<u32, DeviceError> {
        let mut b = [0u8; 4];
        self.mmio_read(offset as u64, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Convenience: write a 32-bit register at a 4-aligned offset.
    fn write32(&mut self, offset: u32, value: u32) -> Result<(), DeviceError> {
        self.mmio_write(offset as u64, &value.to_le_bytes())
    }
}

impl<D: Device + ?Sized> Device for Box<D> {
    fn read_word(&mut self, word: u32, mask: u8) -> Result<u32, DeviceError> {
        (**self).read_word(word, mask)
    }
    fn write_word(&mut self, word: u32, value: u32, mask: u8) -> Result<(), DeviceError> {
        (**self).write_word(word, value, mask)
    }
    fn rom_size(&self) -> u64 {
        (**self).rom_size()
    }
    fn rom_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        (**self).rom_read(offset, data)
    }
    fn reset(&mut self, kind: ResetKind) -> Result<(), DeviceError> {
        (**self).reset(kind)
    }
    fn oob(&mut self, request: &[u8]) -> Result<Vec<u8>, DeviceError> {
        (**self).oob(request)
    }
    fn buffer_fd(&self) -> Option<BorrowedFd<'_>> {
        (**self).buffer_fd()
    }
}

/// Why scrubbing a device's tenant state failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    /// The backend failed.
    #[error("scrubbing the device's tenant state: {0}")]
    Device(#[from] DeviceError),
    /// An element still holds something after the scrub.
    #[error("{element} reads {value:#x} after scrubbing, not {expect:#x}")]
    NotScrubbed {
        /// The element, e.g. `SCRATCH[3]` or `BUFFER[17]`.
        element: String,
        /// What it reads.
        value: u32,
        /// What it should read (its reset value).
        expect: u32,
    },
}

/// Scrub the tenant state ([`crate::regmap::tenant_state`]): write every element's
/// scrub value, in table order, then check every element reads its reset value.
/// Returns the bytes scrubbed. A wedged device (the hang magic) ignores writes and
/// reads all-ones, so reset it first.
pub fn scrub_tenant_state(dev: &mut dyn Device) -> Result<u64, ScrubError> {
    let state = crate::regmap::tenant_state();
    let mut bytes = 0;
    for t in &state {
        for w in t.words() {
            dev.write_word(w, t.scrub, 0xf)?;
        }
        bytes += t.bytes();
    }
    for t in &state {
        for w in t.words() {
            let value = dev.read_word(w, 0xf)?;
            if value != t.expect {
                return Err(ScrubError::NotScrubbed {
                    element: t.reg.def().element_name(w),
                    value,
                    expect: t.expect,
                });
            }
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_every_byte_once_in_order() {
        for off in 0..16u64 {
            for len in 1..=8usize {
                let parts: Vec<_> = split_access(off, len).collect();
                let total: usize = parts.iter().map(|p| p.len).sum();
                assert_eq!(total, len);
                let mut next = 0;
                for p in &parts {
                    assert_eq!(p.data_start, next);
                    assert_eq!(p.word % 4, 0);
                    assert_eq!(p.mask.count_ones() as usize, p.len);
                    assert_eq!(p.mask.trailing_zeros() as usize, p.byte_in_word);
                    next += p.len;
                }
                assert!(parts.len() <= 3);
            }
        }
    }

    #[test]
    fn check_access_rules() {
        assert!(check_access(0, 8).is_ok());
        assert!(check_access(0xfff8, 8).is_ok());
        assert!(check_access(0xfff9, 8).is_err());
        assert!(check_access(0, 0).is_err());
        assert!(check_access(0, 9).is_err());
        assert!(check_access(u64::MAX, 1).is_err());
        assert_eq!(byte_mask_bits(0b0101), 0x00ff_00ff);
    }
}
