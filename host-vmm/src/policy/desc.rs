//! Device description files: what the VMM needs to know about a passed-through
//! device that is not the reference device (whose register table,
//! `hilrig_device::regmap`, stays the one source of truth for it).
//!
//! ```toml
//! name = "edu"
//! vendor = 0x1234
//! device = 0x11e8
//! bar0_size = 0x100000           # the real BAR0's size, checked against the device
//! id = { register = "ID", value = 0x010000ed, mask = 0xff0000ff }  # checked after reset
//!
//! [[register]]
//! name = "LIVENESS"
//! offset = 0x04
//! width = 4                      # 4 or 8
//! access = "rw"                  # what the hardware offers: ro | wo | rw
//! tenant = "rw"                  # what a tenant may do (default: access); the rest is
//!                                # dropped with an alarm by the default policy
//! scrub = 0                      # tenant state: teardown writes this and reads it back
//! ```
//!
//! The guest sees a BAR0 window of at most 64 KiB (the VMM's BAR0 size): the first
//! `min(bar0_size, 0x10000)` bytes of the real BAR0. Every register must lie inside it.
//! Policy files for a described device name its registers (`register = "IRQ_RAISE"`),
//! and alarms and policy counters name them too.

use crate::policy::{AccessKind, Action, PolicyError, PolicyFile, Profile, RuleSpec};
use hilrig_device::regmap::BAR0_SIZE;
use hilrig_device::{Device, DeviceError};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The largest description file read (a description is a few KiB).
pub const MAX_DESC_BYTES: u64 = 1 << 20;

/// A description file that cannot be used: the file, where in it, and why.
#[derive(Debug, thiserror::Error)]
#[error("device description {file}: {at}{reason}")]
pub struct DescError {
    /// The file.
    pub file: String,
    /// Where in it (`register IRQ_RAISE: `), or empty.
    pub at: String,
    /// Why.
    pub reason: String,
}

/// What the hardware or a tenant may do with a register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Neither (tenant column only).
    None,
    /// Read only.
    Ro,
    /// Write only.
    Wo,
    /// Read and write.
    Rw,
}

impl Access {
    fn read(self) -> bool {
        matches!(self, Access::Ro | Access::Rw)
    }
    fn write(self) -> bool {
        matches!(self, Access::Wo | Access::Rw)
    }
}

/// The register whose value says the device is alive and itself.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdCheck {
    /// Register name.
    pub register: String,
    /// Expected value (after `mask`).
    pub value: u64,
    /// Bits compared (default: all).
    pub mask: Option<u64>,
}

/// One register.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    /// Name (unique, case-insensitive).
    pub name: String,
    /// Byte offset in BAR0 (aligned to `width`).
    pub offset: u64,
    /// 4 or 8 bytes.
    pub width: u64,
    /// What the hardware offers.
    pub access: Access,
    /// What a tenant may do (default: `access`).
    pub tenant: Option<Access>,
    /// Tenant state: teardown writes this value and checks it reads back.
    pub scrub: Option<u64>,
    /// What the register reads after the scrub write, when not the value written
    /// (e.g. edu's LIVENESS reads the inverse).
    pub scrub_reads: Option<u64>,
    /// Bits of the read-back the scrub check compares (default: all).
    pub scrub_mask: Option<u64>,
    /// Free text.
    #[serde(default)]
    pub doc: String,
}

impl Register {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.width
    }
    /// What a tenant may do.
    pub fn tenant(&self) -> Access {
        self.tenant.unwrap_or(self.access)
    }
}

/// A memory inside the device (not in BAR0), e.g. edu's DMA buffer; documentation
/// for payloads and reports.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Buffer {
    /// Name.
    pub name: String,
    /// Address in the device's own address space.
    pub device_address: u64,
    /// Size in bytes.
    pub size: u64,
    /// Free text.
    #[serde(default)]
    pub doc: String,
}

/// A device description.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceDesc {
    /// Device name.
    pub name: String,
    /// PCI vendor ID (checked against the device's config space).
    pub vendor: u16,
    /// PCI device ID (checked).
    pub device: u16,
    /// The real BAR0 size (checked against VFIO's region info).
    pub bar0_size: u64,
    /// The liveness/identity check teardown runs after the reset.
    pub id: IdCheck,
    /// Registers.
    #[serde(default, rename = "register")]
    pub registers: Vec<Register>,
    /// Device-internal memories.
    #[serde(default, rename = "buffer")]
    pub buffers: Vec<Buffer>,
    /// Where it was loaded from.
    #[serde(skip)]
    pub source: PathBuf,
}

/// Register names by offset, for alarms and policy counters of a described device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegisterNames(pub Vec<(u32, u32, String)>);

impl RegisterNames {
    /// The register covering byte `off`.
    pub fn name(&self, off: u32) -> Option<&str> {
        self.0
            .iter()
            .find(|(s, e, _)| (*s..*e).contains(&off))
            .map(|(_, _, n)| n.as_str())
    }
}

impl DeviceDesc {
    /// Load and validate a description file: a regular file of at most
    /// [`MAX_DESC_BYTES`], read with that bound.
    pub fn load(path: &Path) -> Result<DeviceDesc, DescError> {
        let file = path.display().to_string();
        let text =
            hilrig_device::secure::read_bounded(path, MAX_DESC_BYTES).map_err(|e| DescError {
                file: file.clone(),
                at: String::new(),
                reason: e.to_string(),
            })?;
        let mut d = DeviceDesc::parse(&text, &file)?;
        d.source = path.to_path_buf();
        Ok(d)
    }

    /// Parse and validate description text (`file` names it in errors).
    pub fn parse(text: &str, file: &str) -> Result<DeviceDesc, DescError> {
        let err = |at: String, reason: String| DescError {
            file: file.to_string(),
            at,
            reason,
        };
        let d: DeviceDesc = toml::from_str(text).map_err(|e| err(String::new(), e.to_string()))?;
        if d.bar0_size == 0 || !d.bar0_size.is_power_of_two() || d.bar0_size < 0x1000 {
            return Err(err(
                String::new(),
                format!(
                    "bar0_size {:#x} is not a power of two of at least 4 KiB",
                    d.bar0_size
                ),
            ));
        }
        let window = d.window();
        let mut seen: BTreeMap<String, u64> = BTreeMap::new();
        for r in &d.registers {
            let at = format!("register {}: ", r.name);
            if r.name.is_empty()
                || !r
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(err(at, "a name is 1+ of [A-Za-z0-9_]".into()));
            }
            if let Some(o) = seen.insert(r.name.to_ascii_uppercase(), r.offset) {
                return Err(err(at, format!("the name is also used at {o:#x}")));
            }
            if r.width != 4 && r.width != 8 {
                return Err(err(at, format!("width {} is not 4 or 8", r.width)));
            }
            if r.offset % r.width != 0 {
                return Err(err(
                    at,
                    format!("offset {:#x} is not aligned to its width", r.offset),
                ));
            }
            if r.offset.checked_add(r.width).is_none_or(|e| e > window) {
                return Err(err(
                    at,
                    format!(
                        "offset {:#x} is outside the guest's BAR0 window (0..{window:#x})",
                        r.offset
                    ),
                ));
            }
            if r.access == Access::None {
                return Err(err(at, "access none: leave the register out".into()));
            }
            if (r.scrub_reads.is_some() || r.scrub_mask.is_some()) && r.scrub.is_none() {
                return Err(err(at, "scrub_reads or scrub_mask without scrub".into()));
            }
            if let Some(v) = r.scrub {
                if !r.access.write() || !r.access.read() {
                    return Err(err(
                        at,
                        "scrub needs a register the hardware can write and read back".into(),
                    ));
                }
                if r.width == 4 && v > u64::from(u32::MAX) {
                    return Err(err(at, format!("scrub value {v:#x} is wider than 4 bytes")));
                }
            }
        }
        let mut regs: Vec<&Register> = d.registers.iter().collect();
        regs.sort_by_key(|r| r.offset);
        for pair in regs.windows(2) {
            if pair[1].offset < pair[0].end() {
                return Err(err(
                    format!("register {}: ", pair[0].name),
                    format!("overlaps register {}", pair[1].name),
                ));
            }
        }
        let id = d
            .register(&d.id.register)
            .ok_or_else(|| err("id: ".into(), format!("no register {}", d.id.register)))?;
        if !id.access.read() {
            return Err(err("id: ".into(), format!("{} is not readable", id.name)));
        }
        Ok(d)
    }

    /// How much of BAR0 the guest sees: `min(bar0_size, 64 KiB)`.
    pub fn window(&self) -> u64 {
        self.bar0_size.min(BAR0_SIZE)
    }

    /// A register by name (case-insensitive).
    pub fn register(&self, name: &str) -> Option<&Register> {
        self.registers
            .iter()
            .find(|r| r.name.eq_ignore_ascii_case(name.trim()))
    }

    /// Names by offset.
    pub fn names(&self) -> RegisterNames {
        RegisterNames(
            self.registers
                .iter()
                .map(|r| (r.offset as u32, r.end() as u32, r.name.clone()))
                .collect(),
        )
    }

    /// The default policy: in profile `tenant`, every access the tenant column
    /// forbids is dropped (reads return 0) with an alarm; profile `operator` has
    /// no rules.
    pub fn default_policy(&self) -> PolicyFile {
        let mut tenant = Vec::new();
        for r in &self.registers {
            let t = r.tenant();
            let deny_read = r.access.read() && !t.read();
            let deny_write = r.access.write() && !t.write();
            let access = match (deny_read, deny_write) {
                (true, true) => AccessKind::Both,
                (true, false) => AccessKind::Read,
                (false, true) => AccessKind::Write,
                (false, false) => continue,
            };
            tenant.push(RuleSpec {
                register: Some(r.name.clone()),
                access: Some(access),
                action: Some(Action::Drop),
                alarm: true,
                ..Default::default()
            });
        }
        PolicyFile {
            enforce: true,
            profile: BTreeMap::from([
                ("tenant".into(), tenant.into()),
                ("operator".into(), Vec::new().into()),
            ]),
            breach: None,
        }
    }

    /// Compile `profile` of `policy` (None: [`DeviceDesc::default_policy`]) for
    /// this device: register names resolve against the description, and the
    /// compiled profile names this device's registers in alarms.
    pub fn compile(&self, policy: Option<&Path>, profile: &str) -> Result<Profile, PolicyError> {
        let (mut file, source) = match policy {
            Some(p) => (PolicyFile::load(p)?, p.display().to_string()),
            None => (
                self.default_policy(),
                format!("<default policy of {}>", self.source.display()),
            ),
        };
        let window = self.window();
        for (pname, rules) in file.profile.iter_mut() {
            for (i, s) in rules.rules_mut().iter_mut().enumerate() {
                let at = |what: &str| PolicyError {
                    file: source.clone(),
                    rule: Some(format!("profile {pname} rule {} ({what})", i + 1)),
                    reason: String::new(),
                };
                if let Some(n) = s.register.take() {
                    let r = self.register(&n).ok_or_else(|| PolicyError {
                        reason: format!(
                            "{} has no register {n:?} (it has: {})",
                            self.name,
                            self.registers
                                .iter()
                                .map(|r| r.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        ..at(&n)
                    })?;
                    if s.offset.is_some() || s.range.is_some() {
                        return Err(PolicyError {
                            reason: "name exactly one of register, offset or range".into(),
                            ..at(&n)
                        });
                    }
                    s.range = Some([r.offset, r.end()]);
                }
                let end = s
                    .range
                    .map(|[_, e]| e)
                    .or(s.offset.map(|o| o.saturating_add(4)))
                    .unwrap_or(0);
                if end > window {
                    return Err(PolicyError {
                        reason: format!(
                            "reaches {end:#x}, past {}'s BAR0 window (0..{window:#x})",
                            self.name
                        ),
                        ..at("range")
                    });
                }
            }
        }
        let mut p = file.compile(profile, &source)?;
        let names = self.names();
        for rule in &mut p.rules {
            if let Some((_, _, n)) = names
                .0
                .iter()
                .find(|(s, e, _)| *s == rule.start && *e == rule.end)
            {
                rule.label = n.clone();
            }
        }
        p.names = Some(std::sync::Arc::new(names));
        Ok(p)
    }

    /// Whether the device answers as itself: the ID register, masked.
    pub fn check_id(&self, dev: &mut dyn Device) -> Result<(), DescCheckError> {
        let Some(r) = self.register(&self.id.register) else {
            return Err(DescCheckError::NoIdRegister(self.id.register.clone()));
        };
        let got = read(dev, r)?;
        let mask = self.id.mask.unwrap_or(u64::MAX);
        if got & mask != self.id.value & mask {
            return Err(DescCheckError::Id {
                register: r.name.clone(),
                got,
                want: self.id.value,
                mask,
            });
        }
        Ok(())
    }

    /// Scrub the tenant state the description names (registers with `scrub`):
    /// write each value, read it back. Returns the bytes scrubbed.
    pub fn scrub(&self, dev: &mut dyn Device) -> Result<u64, DescCheckError> {
        let mut bytes = 0;
        for r in self.registers.iter().filter(|r| r.scrub.is_some()) {
            let v = r.scrub.unwrap_or(0);
            write(dev, r, v)?;
            let got = read(dev, r)?;
            let want = r.scrub_reads.unwrap_or(v);
            let mask = r.scrub_mask.unwrap_or(u64::MAX);
            if got & mask != want & mask {
                return Err(DescCheckError::Residue {
                    register: r.name.clone(),
                    got,
                    want,
                });
            }
            bytes += r.width;
        }
        Ok(bytes)
    }
}

/// A described device failed a check.
#[derive(Debug, thiserror::Error)]
pub enum DescCheckError {
    /// The device access failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The ID check names a register the description lacks (validated at load).
    #[error("no ID register {0}")]
    NoIdRegister(String),
    /// The ID register reads wrong.
    #[error("{register} reads {got:#x}, not {want:#x} (mask {mask:#x})")]
    Id {
        /// Register.
        register: String,
        /// Read.
        got: u64,
        /// Expected.
        want: u64,
        /// Compared bits.
        mask: u64,
    },
    /// A scrubbed register does not read back what its scrub should leave.
    #[error("tenant state left in {register}: reads {got:#x} after the scrub, not {want:#x}")]
    Residue {
        /// Register.
        register: String,
        /// Read.
        got: u64,
        /// Expected.
        want: u64,
    },
}

fn read(dev: &mut dyn Device, r: &Register) -> Result<u64, DeviceError> {
    let mut b = [0u8; 8];
    let n = r.width as usize;
    dev.mmio_read(r.offset, &mut b[..n])?;
    Ok(u64::from_le_bytes(b))
}

fn write(dev: &mut dyn Device, r: &Register, v: u64) -> Result<(), DeviceError> {
    let n = r.width as usize;
    dev.mmio_write(r.offset, &v.to_le_bytes()[..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edu() -> DeviceDesc {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("devices/edu.toml");
        DeviceDesc::load(&path).expect("edu.toml loads")
    }

    #[test]
    fn edu_description_loads_and_matches_the_datasheet() {
        let d = edu();
        assert_eq!((d.vendor, d.device), (0x1234, 0x11e8));
        assert_eq!(d.bar0_size, 0x10_0000);
        assert_eq!(d.window(), 0x1_0000);
        let off = |n: &str| d.register(n).map(|r| (r.offset, r.width));
        assert_eq!(off("ID"), Some((0x00, 4)));
        assert_eq!(off("LIVENESS"), Some((0x04, 4)));
        assert_eq!(off("FACTORIAL"), Some((0x08, 4)));
        assert_eq!(off("STATUS"), Some((0x20, 4)));
        assert_eq!(off("IRQ_STATUS"), Some((0x24, 4)));
        assert_eq!(off("IRQ_RAISE"), Some((0x60, 4)));
        assert_eq!(off("IRQ_ACK"), Some((0x64, 4)));
        assert_eq!(off("DMA_SRC"), Some((0x80, 8)));
        assert_eq!(off("DMA_DST"), Some((0x88, 8)));
        assert_eq!(off("DMA_COUNT"), Some((0x90, 8)));
        assert_eq!(off("dma_cmd"), Some((0x98, 8)));
        assert_eq!(d.buffers[0].device_address, 0x40000);
        assert_eq!(d.buffers[0].size, 0x1000);
        assert_eq!(d.names().name(0x9c), Some("DMA_CMD"));
        assert_eq!(d.names().name(0x10), None);
    }

    #[test]
    fn edu_policy_names_its_registers() {
        let d = edu();
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("p.toml");
        std::fs::write(
            &p,
            "[[profile.tenant]]\nregister = \"IRQ_RAISE\"\naccess = \"write\"\naction = \"drop\"\nalarm = true\n",
        )
        .expect("write");
        let prof = d.compile(Some(&p), "tenant").expect("compiles");
        assert_eq!(prof.trapping_pages(), vec![0]);
        assert_eq!(prof.rules[0].label, "IRQ_RAISE");
        assert_eq!(prof.register_name(0x60), "IRQ_RAISE");
        let dec = prof.decide(0x60, true, 1);
        assert_eq!(dec.action, Action::Drop);
        assert!(dec.alarm);
        // Unknown names are refused with the file, the rule and what exists.
        std::fs::write(
            &p,
            "[[profile.tenant]]\nregister = \"HANG_TRIGGER\"\naccess = \"write\"\naction = \"drop\"\n",
        )
        .expect("write");
        let e = d.compile(Some(&p), "tenant").err().map(|e| e.to_string());
        let e = e.unwrap_or_default();
        assert!(
            e.contains("no register \"HANG_TRIGGER\"") && e.contains("IRQ_RAISE"),
            "{e}"
        );
        // The default policy lets a tenant use all of edu: nothing traps.
        let def = d.compile(None, "tenant").expect("default");
        assert!(def.trapping_pages().is_empty());
    }

    #[test]
    fn bad_descriptions_are_refused_with_where_and_why() {
        let base = "name = \"x\"\nvendor = 1\ndevice = 2\nbar0_size = 0x1000\nid = { register = \"ID\", value = 1 }\n";
        let reg = |s: &str| {
            format!("{base}[[register]]\nname = \"ID\"\noffset = 0\nwidth = 4\naccess = \"ro\"\n[[register]]\n{s}\n")
        };
        for (text, want) in [
            (base.replace("0x1000", "0x1800"), "power of two"),
            (base.replace("\"ID\"", "\"NOPE\""), "no register NOPE"),
            (
                reg("name = \"A\"\noffset = 2\nwidth = 4\naccess = \"rw\""),
                "not aligned",
            ),
            (
                reg("name = \"A\"\noffset = 0x1000\nwidth = 4\naccess = \"rw\""),
                "outside",
            ),
            (
                reg("name = \"A\"\noffset = 8\nwidth = 2\naccess = \"rw\""),
                "width 2",
            ),
            (
                reg("name = \"id\"\noffset = 8\nwidth = 4\naccess = \"rw\""),
                "also used",
            ),
            (
                reg("name = \"A\"\noffset = 0\nwidth = 8\naccess = \"rw\""),
                "overlaps",
            ),
            (
                reg("name = \"A\"\noffset = 8\nwidth = 4\naccess = \"wo\"\nscrub = 0"),
                "scrub needs",
            ),
            (
                reg("name = \"A\"\noffset = 8\nwidth = 4\naccess = \"rw\"\nscrub = 0x100000000"),
                "wider",
            ),
            (
                reg("name = \"A B\"\noffset = 8\nwidth = 4\naccess = \"rw\""),
                "name is",
            ),
            (
                reg("name = \"A\"\noffset = 0x7ffffffffffffffc\nwidth = 4\naccess = \"rw\""),
                "outside",
            ),
            (format!("{base}colour = 1\n"), "unknown field"),
        ] {
            let e = DeviceDesc::parse(&text, "d.toml")
                .err()
                .map(|e| e.to_string());
            let e = e.unwrap_or_default();
            assert!(
                e.starts_with("device description d.toml: ") && e.contains(want),
                "{want}: {e}"
            );
        }
    }

    #[test]
    fn a_fifo_or_huge_file_is_refused_unread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = dir.path().join("big.toml");
        let f = std::fs::File::create(&big).expect("create");
        f.set_len(MAX_DESC_BYTES + 1).expect("len");
        let e = DeviceDesc::load(&big)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("big.toml"), "{e}");
        let e = DeviceDesc::load(Path::new("/dev/zero"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("/dev/zero"), "{e}");
    }
}
