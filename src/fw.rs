//! `hilrig fw`: firmware images, patch bundles and keys.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use hilrig_fw::{bundle, image, keys, vbios};
use sha2::Digest;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum FwCmd {
    /// Generate a key pair: PREFIX.key (secret, mode 0600) and PREFIX.pub.
    Keygen {
        /// Path prefix of the two files.
        prefix: PathBuf,
        /// An X25519 key pair for bundle encryption instead of an Ed25519 signing pair.
        #[arg(long)]
        encryption: bool,
    },
    /// Sign a payload into a flash image for the firmware or config region.
    Sign {
        /// Ed25519 secret key file.
        #[arg(long)]
        key: PathBuf,
        /// firmware or config.
        #[arg(long)]
        region: String,
        /// Image version.
        #[arg(long)]
        version: u32,
        /// Output image file.
        #[arg(short, long)]
        output: PathBuf,
        /// The payload.
        payload: PathBuf,
    },
    /// Verify a flash image or patch bundle against trusted public keys (or validate a ROM).
    Verify {
        /// Trusted Ed25519 public key files (repeatable).
        #[arg(long = "pubkey")]
        pubkeys: Vec<PathBuf>,
        /// X25519 secret key to decrypt an encrypted bundle's payloads.
        #[arg(long)]
        decrypt_key: Option<PathBuf>,
        /// The file.
        file: PathBuf,
    },
    /// Parse any firmware file (ROM, flash image, bundle) and print what it holds.
    Inspect {
        /// The file.
        file: PathBuf,
    },
    /// Build a VBIOS (PCI expansion ROM) for the reference device.
    BuildVbios {
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
        /// Revision level of the code.
        #[arg(long, default_value_t = 1)]
        revision: u16,
        /// A file whose bytes become the ROM's payload.
        #[arg(long)]
        payload: Option<PathBuf>,
    },
    /// Build a signed patch bundle for live patching.
    Bundle {
        /// Ed25519 secret key file of the patch authority.
        #[arg(long)]
        key: PathBuf,
        /// Component in the VMM's module table.
        #[arg(long)]
        component: String,
        /// Component version.
        #[arg(long)]
        version: u64,
        /// SHA-256 (hex) of the target VMM executable...
        #[arg(long, conflicts_with = "target_vmm_file")]
        target_vmm: Option<String>,
        /// ...or the target VMM executable itself (its build hash and the hash of its
        /// patching code are both read from it).
        #[arg(long)]
        target_vmm_file: Option<PathBuf>,
        /// SHA-256 (hex) of the target VMM's patching code, as `hilrig vm
        /// measure-patch-path` prints it (needed with --target-vmm).
        #[arg(long, conflicts_with = "target_vmm_file")]
        patch_path: Option<String>,
        /// Encrypt the payloads to this X25519 public key file.
        #[arg(long)]
        encrypt_to: Option<PathBuf>,
        /// Output bundle file.
        #[arg(short, long)]
        output: PathBuf,
        /// Payload files (named by their file names in the bundle).
        #[arg(required = true)]
        payloads: Vec<PathBuf>,
    },
}

/// Largest firmware file read: a bundle's header, largest manifest, signature
/// and payloads (images and ROMs are far smaller).
pub const MAX_FW_FILE: u64 = (12 + bundle::MAX_MANIFEST + 64 + bundle::MAX_PAYLOADS) as u64;

fn read(p: &Path) -> Result<Vec<u8>> {
    read_bounded(p, MAX_FW_FILE)
}

/// Read the regular file `p`, at most `limit` bytes: opened without blocking and
/// checked on the descriptor (a FIFO is refused, never waited on; `/dev/zero` and
/// other devices are refused, never read), the read itself bounded (a file that
/// grows past `limit` is refused, not read whole).
pub fn read_bounded(p: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(p)
        .with_context(|| format!("reading {}", p.display()))?;
    let meta = f
        .metadata()
        .with_context(|| format!("reading {}", p.display()))?;
    if !meta.is_file() {
        bail!(
            "{}: not a regular file ({:?}); refused without reading it",
            p.display(),
            meta.file_type()
        );
    }
    if meta.len() > limit {
        bail!(
            "{}: {} bytes, at most {limit}; refused without reading it",
            p.display(),
            meta.len()
        );
    }
    let mut b = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut b)
        .with_context(|| format!("reading {}", p.display()))?;
    if b.len() as u64 > limit {
        bail!(
            "{}: more than {limit} bytes (it grew while read); refused",
            p.display()
        );
    }
    Ok(b)
}

fn write_new(p: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(p)
        .with_context(|| {
            format!(
                "creating {} (refusing to replace an existing file)",
                p.display()
            )
        })?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", p.display()))
}

enum Kind {
    Rom,
    Image,
    Bundle,
}

fn kind_of(p: &Path, b: &[u8]) -> Result<Kind> {
    match b.get(..4) {
        Some(m) if m == image::MAGIC => Ok(Kind::Image),
        Some(m) if m == bundle::MAGIC => Ok(Kind::Bundle),
        Some([0x55, 0xAA, ..]) => Ok(Kind::Rom),
        _ => bail!(
            "{}: not a firmware file (no expansion-ROM 55aa, HRFW image or HRPB bundle magic at offset 0)",
            p.display()
        ),
    }
}

pub fn run(cmd: FwCmd) -> Result<()> {
    match cmd {
        FwCmd::Keygen { prefix, encryption } => {
            let public = if encryption {
                keys::keygen_box(&prefix)?
            } else {
                keys::keygen_sign(&prefix)?.to_bytes()
            };
            println!(
                "wrote {} and {} (public key {})",
                keys::with_ext(&prefix, "key").display(),
                keys::with_ext(&prefix, "pub").display(),
                hex::encode(public)
            );
        }
        FwCmd::Sign {
            key,
            region,
            version,
            output,
            payload,
        } => {
            let r = hilrig_device::Region::parse(&region)
                .with_context(|| format!("unknown region {region:?}; use firmware or config"))?;
            let img = image::build(r, version, &read(&payload)?, &keys::signing_key(&key)?)?;
            write_new(&output, &img)?;
            println!(
                "wrote {} ({} bytes, {r} v{version})",
                output.display(),
                img.len()
            );
        }
        FwCmd::Verify {
            pubkeys,
            decrypt_key,
            file,
        } => {
            let b = read(&file)?;
            let trusted = pubkeys
                .iter()
                .map(|p| keys::verifying_key(p))
                .collect::<Result<Vec<_>, _>>()?;
            let at = || format!("{}", file.display());
            match kind_of(&file, &b)? {
                Kind::Rom => {
                    vbios::parse(&b).with_context(at)?;
                    println!(
                        "{}: valid expansion ROM (ROMs carry no signature)",
                        file.display()
                    );
                }
                Kind::Image => {
                    if trusted.is_empty() {
                        bail!("verifying a flash image needs at least one --pubkey");
                    }
                    let img = image::parse(&b).with_context(at)?;
                    img.verify(&trusted).with_context(at)?;
                    println!(
                        "{}: signature OK ({} v{}, signer {})",
                        file.display(),
                        img.region,
                        img.version,
                        img.signer
                    );
                }
                Kind::Bundle => {
                    if trusted.is_empty() {
                        bail!("verifying a bundle needs at least one --pubkey");
                    }
                    let bun = bundle::parse(&b).with_context(at)?;
                    bun.verify(&trusted).with_context(at)?;
                    let sk = decrypt_key
                        .map(|p| keys::read_key(&p, keys::KeyKind::BoxSecret))
                        .transpose()?;
                    let payloads = if bun.manifest.encryption.is_some() && sk.is_none() {
                        println!("(encrypted payloads not checked: pass --decrypt-key)");
                        0
                    } else {
                        bun.payloads(sk.as_ref()).with_context(at)?.len()
                    };
                    println!(
                        "{}: signature OK ({} v{}, {payloads} payloads checked)",
                        file.display(),
                        bun.manifest.component,
                        bun.manifest.version
                    );
                }
            }
        }
        FwCmd::Inspect { file } => {
            let b = read(&file)?;
            let at = || format!("{}", file.display());
            let json = match kind_of(&file, &b)? {
                Kind::Rom => {
                    serde_json::json!({"kind": "expansion-rom", "images": vbios::parse(&b).with_context(at)?})
                }
                Kind::Image => {
                    serde_json::json!({"kind": "flash-image", "image": image::parse(&b).with_context(at)?})
                }
                Kind::Bundle => {
                    serde_json::json!({"kind": "patch-bundle", "manifest": bundle::parse(&b).with_context(at)?.manifest})
                }
            };
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        FwCmd::BuildVbios {
            output,
            revision,
            payload,
        } => {
            let p = match payload {
                Some(f) => read(&f)?,
                None => hilrig_fw::factory::FACTORY_VBIOS_PAYLOAD.to_vec(),
            };
            let rom = vbios::build(&vbios::VbiosSpec::reference(revision, &p))?;
            write_new(&output, &rom)?;
            println!("wrote {} ({} bytes)", output.display(), rom.len());
        }
        FwCmd::Bundle {
            key,
            component,
            version,
            target_vmm,
            target_vmm_file,
            patch_path,
            encrypt_to,
            output,
            payloads,
        } => {
            let hex32 = |h: &str, what: &str| -> Result<[u8; 32]> {
                hex::decode(h.trim())
                    .ok()
                    .and_then(|v| v.try_into().ok())
                    .with_context(|| format!("{what} must be 64 hex digits (a SHA-256)"))
            };
            let (target, patch_path): ([u8; 32], [u8; 32]) =
                match (target_vmm, target_vmm_file, patch_path) {
                    (Some(h), None, Some(pp)) => {
                        (hex32(&h, "--target-vmm")?, hex32(&pp, "--patch-path")?)
                    }
                    (Some(_), None, None) => bail!(
                        "--target-vmm needs --patch-path (run `hilrig vm measure-patch-path` with that build), or give --target-vmm-file"
                    ),
                    (None, Some(f), _) => {
                        let exe = read(&f)?;
                        let pp = bundle::patch_path_sha256_of_elf(&exe)
                            .with_context(|| format!("{}", f.display()))?;
                        (sha2::Sha256::digest(&exe).into(), pp)
                    }
                    _ => bail!(
                        "give the target VMM as --target-vmm HEX --patch-path HEX or --target-vmm-file PATH"
                    ),
                };
            let mut pl = Vec::new();
            for p in &payloads {
                let name = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .with_context(|| format!("{}: no UTF-8 file name", p.display()))?;
                pl.push((name.to_string(), read(p)?));
            }
            let encrypt_to = encrypt_to
                .map(|p| keys::read_key(&p, keys::KeyKind::BoxPublic))
                .transpose()?;
            let b = bundle::build(
                &bundle::BundleSpec {
                    component: &component,
                    version,
                    target_vmm_sha256: target,
                    payloads: pl,
                    encrypt_to,
                    patch_path_sha256: Some(patch_path),
                },
                &keys::signing_key(&key)?,
            )?;
            write_new(&output, &b)?;
            println!(
                "wrote {} ({} bytes, {component} v{version})",
                output.display(),
                b.len()
            );
        }
    }
    Ok(())
}
