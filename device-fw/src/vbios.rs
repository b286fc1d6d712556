//! VBIOS images in the PCI expansion-ROM format (PCI Firmware Specification 3.x):
//! a builder and a strict parser that says exactly which field at which offset is wrong.
//!
//! Layout of one image:
//!
//! | offset | field |
//! |---|---|
//! | 0x00 | signature 0x55 0xAA |
//! | 0x02 | initialization size in 512-byte units (x86 images) |
//! | 0x03 | entry point (3 bytes, x86 `jmp`) |
//! | 0x18 | u16 pointer to the PCI data structure (PCIR) |
//! | PCIR+0x00 | "PCIR" |
//! | PCIR+0x04 | vendor ID u16, device ID u16 |
//! | PCIR+0x08 | device list pointer u16 (0) |
//! | PCIR+0x0A | PCIR length u16 (0x18) |
//! | PCIR+0x0C | PCIR revision u8 (3) |
//! | PCIR+0x0D | class code, 3 bytes (prog-if, subclass, base class) |
//! | PCIR+0x10 | image length u16 in 512-byte units |
//! | PCIR+0x12 | revision level of code/data u16 |
//! | PCIR+0x14 | code type u8 (0 x86, 3 EFI) |
//! | PCIR+0x15 | indicator u8 (bit 7: last image) |
//! | PCIR+0x16 | max runtime image length u16 |
//!
//! The bytes of each image sum to zero (mod 256); the builder sets the last byte.

use hilrig_device::regmap::{PCI_CLASS_CODE, PCI_DEVICE_ID, PCI_VENDOR_ID};

/// Where the PCIR structure goes in built images.
const PCIR_OFFSET: usize = 0x20;
/// Where the payload starts in built images.
const PAYLOAD_OFFSET: usize = 0x40;
const PCIR_LEN: usize = 0x18;

/// A problem with a ROM image, naming the field and its byte offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expansion ROM: {field} at offset {offset:#x}: {problem}")]
pub struct RomError {
    /// The field.
    pub field: &'static str,
    /// Byte offset in the ROM.
    pub offset: usize,
    /// What is wrong.
    pub problem: String,
}

fn err(field: &'static str, offset: usize, problem: impl Into<String>) -> RomError {
    RomError {
        field,
        offset,
        problem: problem.into(),
    }
}

/// What to put in a VBIOS image.
#[derive(Debug, Clone)]
pub struct VbiosSpec {
    /// PCI vendor ID.
    pub vendor_id: u16,
    /// PCI device ID.
    pub device_id: u16,
    /// Class code (base class << 16 | subclass << 8 | prog-if).
    pub class_code: u32,
    /// Revision level of the code (the image version).
    pub revision: u16,
    /// Code type: 0 x86 PC-AT, 3 EFI.
    pub code_type: u8,
    /// Code/data placed after the headers.
    pub payload: Vec<u8>,
}

impl VbiosSpec {
    /// A VBIOS for the reference device with `revision` and `payload`.
    pub fn reference(revision: u16, payload: &[u8]) -> VbiosSpec {
        VbiosSpec {
            vendor_id: PCI_VENDOR_ID,
            device_id: PCI_DEVICE_ID,
            class_code: PCI_CLASS_CODE,
            revision,
            code_type: 0,
            payload: payload.to_vec(),
        }
    }
}

/// Build a single, last-image expansion ROM. Its length is a multiple of 512.
pub fn build(spec: &VbiosSpec) -> Result<Vec<u8>, RomError> {
    let len = (PAYLOAD_OFFSET + spec.payload.len() + 1).div_ceil(512) * 512;
    let units = len / 512;
    if units > 0xff {
        return Err(err(
            "payload",
            PAYLOAD_OFFSET,
            format!(
                "{} bytes make a ROM of {len} bytes; at most 255 x 512 fit",
                spec.payload.len()
            ),
        ));
    }
    let mut r = vec![0u8; len];
    r[0] = 0x55;
    r[1] = 0xAA;
    r[2] = units as u8;
    // jmp short to the payload: EB rel8.
    r[3] = 0xEB;
    r[4] = (PAYLOAD_OFFSET - 5) as u8;
    r[5] = 0x90;
    r[0x18..0x1A].copy_from_slice(&(PCIR_OFFSET as u16).to_le_bytes());
    let p = PCIR_OFFSET;
    r[p..p + 4].copy_from_slice(b"PCIR");
    r[p + 4..p + 6].copy_from_slice(&spec.vendor_id.to_le_bytes());
    r[p + 6..p + 8].copy_from_slice(&spec.device_id.to_le_bytes());
    r[p + 0x0A..p + 0x0C].copy_from_slice(&(PCIR_LEN as u16).to_le_bytes());
    r[p + 0x0C] = 3;
    r[p + 0x0D] = spec.class_code as u8;
    r[p + 0x0E] = (spec.class_code >> 8) as u8;
    r[p + 0x0F] = (spec.class_code >> 16) as u8;
    r[p + 0x10..p + 0x12].copy_from_slice(&(units as u16).to_le_bytes());
    r[p + 0x12..p + 0x14].copy_from_slice(&spec.revision.to_le_bytes());
    r[p + 0x14] = spec.code_type;
    r[p + 0x15] = 0x80;
    r[p + 0x16..p + 0x18].copy_from_slice(&(units as u16).to_le_bytes());
    r[PAYLOAD_OFFSET..PAYLOAD_OFFSET + spec.payload.len()].copy_from_slice(&spec.payload);
    let sum = r.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    r[len - 1] = 0u8.wrapping_sub(sum);
    Ok(r)
}

/// One parsed image of an expansion ROM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RomImage {
    /// Offset of the image in the ROM.
    pub offset: usize,
    /// Image length in bytes.
    pub length: usize,
    /// PCI vendor ID.
    pub vendor_id: u16,
    /// PCI device ID.
    pub device_id: u16,
    /// Class code.
    pub class_code: u32,
    /// Revision level of the code.
    pub revision: u16,
    /// Code type.
    pub code_type: u8,
    /// Last image in the ROM.
    pub last: bool,
}

/// Parse and validate an expansion ROM: every image's signature, PCIR structure,
/// lengths and checksum. Bytes after the last image (erased flash) are ignored.
pub fn parse(rom: &[u8]) -> Result<Vec<RomImage>, RomError> {
    let mut images = Vec::new();
    let mut off = 0usize;
    loop {
        let img = parse_one(rom, off)?;
        let last = img.last;
        off += img.length;
        images.push(img);
        if last {
            return Ok(images);
        }
        if images.len() >= 16 {
            return Err(err(
                "indicator",
                off,
                "more than 16 images and none marked last",
            ));
        }
    }
}

fn u16_at(b: &[u8], at: usize, field: &'static str) -> Result<u16, RomError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| {
            err(
                field,
                at,
                format!("past the end of the {}-byte ROM", b.len()),
            )
        })
}

fn parse_one(rom: &[u8], base: usize) -> Result<RomImage, RomError> {
    let sig = rom.get(base..base + 2);
    if sig != Some(&[0x55, 0xAA][..]) {
        return Err(err(
            "signature",
            base,
            match sig {
                Some(s) => format!("{:02x} {:02x}, expected 55 aa", s[0], s[1]),
                None => format!("missing: the ROM has {} bytes", rom.len()),
            },
        ));
    }
    let ptr = u16_at(rom, base + 0x18, "PCIR pointer")? as usize;
    let p = base + ptr;
    if ptr % 4 != 0 || ptr < 0x1A {
        return Err(err(
            "PCIR pointer",
            base + 0x18,
            format!("{ptr:#x} is not a 4-aligned offset past the header"),
        ));
    }
    let pcir = rom.get(p..p + PCIR_LEN).ok_or_else(|| {
        err(
            "PCIR structure",
            p,
            format!("past the end of the {}-byte ROM", rom.len()),
        )
    })?;
    if &pcir[0..4] != b"PCIR" {
        return Err(err(
            "PCIR signature",
            p,
            format!("{:02x?}, expected \"PCIR\"", &pcir[0..4]),
        ));
    }
    let plen = u16::from_le_bytes([pcir[0x0A], pcir[0x0B]]) as usize;
    if plen < PCIR_LEN {
        return Err(err(
            "PCIR length",
            p + 0x0A,
            format!("{plen}, at least {PCIR_LEN}"),
        ));
    }
    let units = u16::from_le_bytes([pcir[0x10], pcir[0x11]]) as usize;
    let length = units * 512;
    if units == 0 {
        return Err(err("image length", p + 0x10, "0 units of 512 bytes"));
    }
    if base + length > rom.len() {
        return Err(err(
            "image length",
            p + 0x10,
            format!(
                "{length} bytes from offset {base:#x} run past the {}-byte ROM",
                rom.len()
            ),
        ));
    }
    if p + PCIR_LEN > base + length {
        return Err(err(
            "PCIR pointer",
            base + 0x18,
            "the PCIR structure lies outside its image",
        ));
    }
    let code_type = pcir[0x14];
    if code_type == 0 && rom[base + 2] as usize * 512 > length {
        return Err(err(
            "initialization size",
            base + 2,
            format!(
                "{} x 512 bytes exceeds the image length {length}",
                rom[base + 2]
            ),
        ));
    }
    let sum = rom[base..base + length]
        .iter()
        .fold(0u8, |a, &b| a.wrapping_add(b));
    if sum != 0 {
        return Err(err(
            "checksum",
            base + length - 1,
            format!(
                "bytes {base:#x}..{:#x} sum to {sum:#04x}, not 0",
                base + length
            ),
        ));
    }
    Ok(RomImage {
        offset: base,
        length,
        vendor_id: u16::from_le_bytes([pcir[4], pcir[5]]),
        device_id: u16::from_le_bytes([pcir[6], pcir[7]]),
        class_code: pcir[0x0D] as u32 | (pcir[0x0E] as u32) << 8 | (pcir[0x0F] as u32) << 16,
        revision: u16::from_le_bytes([pcir[0x12], pcir[0x13]]),
        code_type,
        last: pcir[0x15] & 0x80 != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_rom_parses_back() {
        let rom = build(&VbiosSpec::reference(7, b"hello")).unwrap();
        assert_eq!(rom.len(), 512);
        let imgs = parse(&rom).unwrap();
        assert_eq!(imgs.len(), 1);
        assert_eq!(
            (imgs[0].vendor_id, imgs[0].device_id, imgs[0].revision),
            (PCI_VENDOR_ID, PCI_DEVICE_ID, 7)
        );
        assert!(imgs[0].last);
        // Erased flash after the image is fine.
        let mut padded = rom.clone();
        padded.resize(4096, 0xff);
        assert_eq!(parse(&padded).unwrap(), imgs);
    }

    #[test]
    fn each_defect_is_named() {
        let rom = build(&VbiosSpec::reference(1, &[1, 2, 3])).unwrap();
        type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|r| r[0] = 0), "signature"),
            (Box::new(|r| r[100] ^= 1), "checksum"),
            (Box::new(|r| r[0x20] = b'X'), "PCIR signature"),
            (Box::new(|r| r[0x18] = 0xf0), "PCIR"),
            (Box::new(|r| r[0x30] = 9), "image length"),
            (Box::new(|r| r.truncate(300)), "image length"),
        ];
        for (mutate, field) in cases {
            let mut r = rom.clone();
            mutate(&mut r);
            let e = parse(&r).unwrap_err();
            assert!(e.field.starts_with(field), "{e} (wanted {field})");
        }
        assert!(parse(&[]).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x: u32 = 1;
        for _ in 0..2000 {
            let n = (x % 1200) as usize;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                v.push(x as u8);
            }
            if v.len() > 2 {
                v[0] = 0x55;
                v[1] = 0xAA;
            }
            let _ = parse(&v);
        }
    }
}
