//! Live patches: a signed bundle (hilrig_fw::bundle) is verified completely BEFORE
//! anything is touched — signature by a trusted patch authority, every payload's
//! SHA-256, the target VMM build (SHA-256 of the running executable), a component this
//! VMM has, a version newer than the installed one — and turned into a ready module
//! ([`Prepared`]). Only then does the VMM quiesce its vCPUs and [`commit`] the swap,
//! which is a pointer exchange. A refused patch leaves the VM running and unchanged.

use crate::lifecycle::modules::{LoadError, NativeHandler, Slot};
use crate::policy::engine::{PolicyModule, PolicySlot};
use crate::policy::{PolicyError, PolicyFile, Profile};
use ed25519_dalek::VerifyingKey;
use hilrig_fw::bundle::{self, BundleError};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Arc;

/// Component name of the policy rules (a data module).
pub use crate::modtable::POLICY;
/// Component name of the native device handler routines.
pub const DEVICE_HANDLER: &str = "device-handler";

/// Why a patch was refused. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The bundle's framing, signature or payloads are bad.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The manifest carries no reference hash of the patching code.
    #[error("the bundle carries no reference hash of the VMM's patching code (patch_path_sha256); rebuild it with `hilrig fw bundle --target-vmm-file`")]
    NoPatchPathReference,
    /// The patching code in memory is not the code the bundle was made for.
    #[error(
        "the VMM's patching code in memory hashes to {running}, the bundle expects {want}: refused"
    )]
    PatchPathMismatch {
        /// The manifest's reference.
        want: String,
        /// What the mapped code hashes to.
        running: String,
    },
    /// Built for another VMM.
    #[error("the bundle targets VMM build {want}, this VMM is {running}")]
    WrongBuild {
        /// Target in the manifest.
        want: String,
        /// The running build.
        running: String,
    },
    /// Same or older version.
    #[error("{component} v{offered} is not newer than the installed v{installed}")]
    NotNewer {
        /// Component.
        component: String,
        /// Installed version.
        installed: u64,
        /// Offered version.
        offered: u64,
    },
    /// Not newer than a version applied on this host before (the patch record).
    #[error("{component} v{offered} is not newer than v{applied}, applied on this host before (patch record): a downgrade, refused")]
    Downgrade {
        /// Component.
        component: String,
        /// Applied before.
        applied: u64,
        /// Offered version.
        offered: u64,
    },
    /// A policy that lets through what the running one keeps from the device,
    /// without both the manifest's `widens` and the VMM's `--allow-policy-widening`.
    #[error("{component} v{offered} widens the running policy ({why}); refused: {}", if *declared { "this VMM was not started with --allow-policy-widening" } else { "the signed manifest does not declare widens = true" })]
    Widens {
        /// Component.
        component: String,
        /// Offered version.
        offered: u64,
        /// The first access it would let through.
        why: String,
        /// Whether the manifest declared it.
        declared: bool,
    },
    /// Not a component of this VMM.
    #[error("unknown component {0:?} (this VMM patches \"policy\" and \"device-handler\")")]
    UnknownComponent(String),
    /// The payloads are not what the component needs.
    #[error("{component} bundle: {reason}")]
    Payload {
        /// Component.
        component: String,
        /// What is wrong.
        reason: String,
    },
    /// The policy payload does not compile.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The native module does not load.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The native module could not be put in a sealed memfd, or its sealed bytes
    /// do not hash to the manifest's SHA-256.
    #[error(transparent)]
    Sealed(#[from] super::sealed::SealError),
    /// Writing the module file.
    #[error("module directory {path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Error.
        source: std::io::Error,
    },
}

/// The patchable components.
pub struct ModuleTable {
    /// The MMIO policy module: the compiled rules and their shadow store (None:
    /// the VM runs without a policy engine, v0). The VM's policy engine decides
    /// every trapped access through this slot.
    pub policy: Arc<PolicySlot>,
    /// The native device handler (None: no handler installed, v0).
    pub handler: Arc<Slot<Option<NativeHandler>>>,
}

impl ModuleTable {
    /// A table with `profile` as policy v1 (v0 when None) and no device handler (v0).
    pub fn new(
        profile: Option<Arc<Profile>>,
        alarm: impl Fn(&crate::lifecycle::modules::CallError) + Send + Sync + Clone + 'static,
    ) -> ModuleTable {
        let v = profile.is_some() as u64;
        let module = profile.map(|p| Arc::new(PolicyModule::new(p)));
        ModuleTable {
            policy: Slot::new(POLICY, module, v, Box::new(alarm.clone())),
            handler: Slot::new(DEVICE_HANDLER, None, 0, Box::new(alarm)),
        }
    }

    /// A table whose policy slot is `policy` (the VM's policy engine's; None: no
    /// policy, v0) and no device handler (v0).
    pub fn with_policy(
        policy: Option<Arc<PolicySlot>>,
        alarm: impl Fn(&crate::lifecycle::modules::CallError) + Send + Sync + Clone + 'static,
    ) -> ModuleTable {
        ModuleTable {
            policy: policy.unwrap_or_else(|| Slot::new(POLICY, None, 0, Box::new(alarm.clone()))),
            handler: Slot::new(DEVICE_HANDLER, None, 0, Box::new(alarm)),
        }
    }

    /// Installed version of `component`.
    pub fn version(&self, component: &str) -> Option<u64> {
        match component {
            POLICY => Some(self.policy.version()),
            DEVICE_HANDLER => Some(self.handler.version()),
            _ => None,
        }
    }

    /// (component, version) of everything installed.
    pub fn versions(&self) -> Vec<(&'static str, u64)> {
        vec![
            (POLICY, self.policy.version()),
            (DEVICE_HANDLER, self.handler.version()),
        ]
    }
}

/// A verified patch, ready to swap in.
pub enum Prepared {
    /// New policy rules.
    Policy {
        /// Version.
        version: u64,
        /// Compiled profile.
        profile: Profile,
    },
    /// A new native device handler.
    Handler {
        /// Version.
        version: u64,
        /// Loaded module.
        handler: NativeHandler,
    },
}

impl Prepared {
    /// Component name.
    pub fn component(&self) -> &'static str {
        match self {
            Prepared::Policy { .. } => POLICY,
            Prepared::Handler { .. } => DEVICE_HANDLER,
        }
    }
    /// Version.
    pub fn version(&self) -> u64 {
        match self {
            Prepared::Policy { version, .. } | Prepared::Handler { version, .. } => *version,
        }
    }
}

/// What a VMM trusts and is.
#[derive(Debug, Clone)]
pub struct PatchAuthority {
    /// Trusted patch-authority keys.
    pub trusted: Vec<VerifyingKey>,
    /// X25519 secret for encrypted bundles.
    pub decrypt_key: Option<[u8; 32]>,
    /// SHA-256 of the running VMM executable.
    pub build_sha256: [u8; 32],
    /// Unused: native modules are loaded from sealed memfds
    /// ([`super::sealed::SealedModule`]), never from a file in a directory. Kept so
    /// that existing callers still compile.
    pub module_dir: PathBuf,
    /// Versions applied on this host before (`--patch-record`): a bundle must be newer.
    pub applied: Option<Arc<crate::lifecycle::applied::AppliedVersions>>,
    /// Apply policy patches that widen the running policy when their manifest
    /// declares it (`--allow-policy-widening`); refused otherwise.
    pub allow_widening: bool,
}

/// SHA-256 of the running executable.
pub fn running_build_sha256() -> std::io::Result<[u8; 32]> {
    let mut f = std::fs::File::open("/proc/self/exe")?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize().into())
}

impl PatchAuthority {
    /// Verify `bundle` completely and build the module it carries. `profile` is the
    /// profile name to compile a policy payload for. Touches nothing in `table`.
    /// Right after the signature check the VMM hashes its own mapped patching code
    /// (`patch_path`) and refuses on a mismatch with the manifest's reference.
    #[link_section = "hilrig_patch_text"]
    #[inline(never)]
    pub fn prepare(
        &self,
        bytes: &[u8],
        table: &ModuleTable,
        profile: &str,
    ) -> Result<Prepared, PatchError> {
        let b = bundle::parse(bytes)?;
        b.verify(&self.trusted)?;
        let m = &b.manifest;
        let target = b.target_vmm_sha256().unwrap_or_default();
        if target != self.build_sha256 {
            return Err(PatchError::WrongBuild {
                want: m.target_vmm_sha256.clone(),
                running: hex::encode(self.build_sha256),
            });
        }
        let want = b
            .patch_path_sha256()
            .ok_or(PatchError::NoPatchPathReference)?;
        let running = crate::lifecycle::patch_path::measure_patch_path();
        if want != running {
            return Err(PatchError::PatchPathMismatch {
                want: hex::encode(want),
                running: hex::encode(running),
            });
        }
        let installed = table
            .version(&m.component)
            .ok_or_else(|| PatchError::UnknownComponent(m.component.clone()))?;
        if m.version <= installed {
            return Err(PatchError::NotNewer {
                component: m.component.clone(),
                installed,
                offered: m.version,
            });
        }
        if let Some(a) = &self.applied {
            let applied = a.applied(&m.component);
            if m.version <= applied {
                return Err(PatchError::Downgrade {
                    component: m.component.clone(),
                    applied,
                    offered: m.version,
                });
            }
        }
        let payloads = b.payloads(self.decrypt_key.as_ref())?;
        let bad = |reason: String| PatchError::Payload {
            component: m.component.clone(),
            reason,
        };
        if payloads.len() != 1 {
            return Err(bad(format!(
                "{} payloads; exactly one is expected",
                payloads.len()
            )));
        }
        let (name, data) = &payloads[0];
        match m.component.as_str() {
            POLICY => {
                let text = std::str::from_utf8(data)
                    .map_err(|_| bad(format!("{name} is not UTF-8 TOML")))?;
                let file = format!("bundle {} v{} payload {name}", m.component, m.version);
                let profile = PolicyFile::parse(text, &file)?.compile(profile, &file)?;
                // Fail closed: a patch may narrow the policy freely; widening it
                // needs the signed manifest to say so and the VMM to allow it.
                let running = table
                    .policy
                    .call(|p| p.as_ref().map(|m| m.profile.clone()))
                    .ok()
                    .flatten();
                if let Some(why) = running.and_then(|r| r.widened_by(&profile)) {
                    if !(m.widens && self.allow_widening) {
                        return Err(PatchError::Widens {
                            component: m.component.clone(),
                            offered: m.version,
                            why,
                            declared: m.widens,
                        });
                    }
                    tracing::warn!(
                        version = m.version,
                        "policy patch widens the policy ({why}): declared and allowed"
                    );
                }
                Ok(Prepared::Policy {
                    version: m.version,
                    profile,
                })
            }
            DEVICE_HANDLER => {
                let want = m.payloads[0].sha256.to_ascii_lowercase();
                // Loaded from a sealed memfd: no path a local user could swap
                // between the hash check and dlopen.
                let sealed = super::sealed::SealedModule::new(name, data, &want)?;
                let handler = NativeHandler::load_sealed(sealed, DEVICE_HANDLER, m.version)?;
                Ok(Prepared::Handler {
                    version: m.version,
                    handler,
                })
            }
            other => Err(PatchError::UnknownComponent(other.to_string())),
        }
    }
}

/// Swap a prepared module in. Call with every vCPU parked. Returns (component, old
/// version, new version).
#[link_section = "hilrig_patch_text"]
#[inline(never)]
pub fn commit(table: &ModuleTable, p: Prepared) -> (&'static str, u64, u64) {
    match p {
        Prepared::Policy { version, profile } => (
            POLICY,
            table.policy.replace(
                Some(Arc::new(PolicyModule::new(Arc::new(profile)))),
                version,
            ),
            version,
        ),
        Prepared::Handler { version, handler } => (
            DEVICE_HANDLER,
            table.handler.replace(Some(handler), version),
            version,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::load_profile;
    use ed25519_dalek::SigningKey;
    use std::path::Path;

    const BUILD: [u8; 32] = [7; 32];

    fn table() -> ModuleTable {
        ModuleTable::new(
            Some(Arc::new(load_profile(None, "tenant").unwrap())),
            |_| {},
        )
    }

    fn authority(dir: &Path) -> PatchAuthority {
        PatchAuthority {
            trusted: vec![SigningKey::from_bytes(&[1; 32]).verifying_key()],
            decrypt_key: None,
            build_sha256: BUILD,
            module_dir: dir.join("modules"),
            applied: None,
            allow_widening: false,
        }
    }

    fn bundle(
        component: &str,
        version: u64,
        payload: (&str, Vec<u8>),
        key: u8,
        build: [u8; 32],
    ) -> Vec<u8> {
        bundle::build(
            &bundle::BundleSpec {
                component,
                version,
                target_vmm_sha256: build,
                payloads: vec![(payload.0.to_string(), payload.1)],
                encrypt_to: None,
                patch_path_sha256: Some(crate::lifecycle::patch_path::measure_patch_path()),
            },
            &SigningKey::from_bytes(&[key; 32]),
        )
        .unwrap()
    }

    /// The built-in tenant rules plus one more drop: narrower than the running
    /// policy, so applied without a widening declaration.
    fn narrower() -> String {
        format!("{}{RULES}", crate::policy::default_policy_toml())
    }

    const RULES: &str = "[[profile.tenant]]\nregister = \"SCRATCH[0]\"\naccess = \"write\"\naction = \"drop\"\nalarm = true\n";

    #[test]
    fn policy_patch_applies_and_bad_bundles_are_refused_unchanged() {
        let d = tempfile::tempdir().unwrap();
        let (t, a) = (table(), authority(d.path()));
        // The built-in tenant rules plus one more drop: narrower, so no declaration
        // is needed.
        let narrower = format!("{}{RULES}", crate::policy::default_policy_toml());
        let good = bundle(POLICY, 2, ("rules.toml", narrower.into()), 1, BUILD);
        let mut truncated = good.clone();
        truncated.truncate(good.len() - 3);
        let mut tampered = good.clone();
        let n = tampered.len();
        tampered[n - 2] ^= 1;
        for (b, want) in [
            (bundle(POLICY, 2, ("rules.toml", RULES.into()), 9, BUILD), "not a trusted key"),
            (bundle(POLICY, 2, ("rules.toml", RULES.into()), 1, [8; 32]), "targets VMM build"),
            (bundle(POLICY, 1, ("rules.toml", RULES.into()), 1, BUILD), "not newer than the installed v1"),
            (bundle("gpu", 5, ("x", vec![1]), 1, BUILD), "unknown component"),
            (bundle(POLICY, 2, ("rules.toml", b"[[profile.tenant]]\nregister = \"NOPE\"\naccess = \"read\"\naction = \"drop\"".to_vec()), 1, BUILD), "unknown register"),
            (bundle(POLICY, 2, ("rules.toml", RULES.into()), 1, BUILD), "widens the running policy"),
            (truncated, "truncated"),
            (tampered, "SHA-256 does not match"),
        ] {
            let e = a.prepare(&b, &t, "tenant").err().expect(want).to_string();
            assert!(e.contains(want), "wanted {want:?}: {e}");
            assert_eq!(t.policy.version(), 1, "a refused patch changed nothing");
        }
        let p = a.prepare(&good, &t, "tenant").unwrap();
        assert_eq!(commit(&t, p), (POLICY, 1, 2));
        let scratch0 = hilrig_device::Reg::Scratch.offset();
        let action = t
            .policy
            .call(|p| {
                p.as_ref()
                    .map(|p| p.profile.decide(scratch0, true, 0).action)
            })
            .unwrap();
        assert_eq!(action, Some(crate::policy::Action::Drop));
        // The same bundle again is now "not newer".
        assert!(a
            .prepare(&good, &t, "tenant")
            .err()
            .unwrap()
            .to_string()
            .contains("not newer"));
    }

    #[test]
    fn native_handler_patch_loads_after_hash_check() {
        let d = tempfile::tempdir().unwrap();
        let (t, a) = (table(), authority(d.path()));
        let lib = crate::lifecycle::modules::tests::build_demo_module(d.path(), 3, 0x0001_0003);
        let so = std::fs::read(&lib).unwrap();
        let b = bundle(DEVICE_HANDLER, 3, ("libdemo.so", so), 1, BUILD);
        let p = a.prepare(&b, &t, "tenant").unwrap();
        assert_eq!(commit(&t, p), (DEVICE_HANDLER, 0, 3));
        let v = t
            .handler
            .call(|h| {
                h.as_ref()
                    .map(|h| h.on_access(hilrig_device::Reg::Version.offset(), false, 0))
            })
            .unwrap();
        assert_eq!(
            v,
            Some(Ok(crate::lifecycle::modules::HandlerAction::Complete(
                0x0001_0003
            )))
        );
        // A bundle whose manifest says v4 but whose library declares v3 is refused.
        let so = std::fs::read(&lib).unwrap();
        let b = bundle(DEVICE_HANDLER, 4, ("libdemo.so", so), 1, BUILD);
        let e = a.prepare(&b, &t, "tenant").err().unwrap().to_string();
        assert!(e.contains("declares \"device-handler\" v3"), "{e}");
        assert_eq!(t.handler.version(), 3);
    }

    /// Issue 21.2: patching code altered in memory, or a bundle made for other
    /// patching code (or none), is refused after the signature check.
    #[test]
    fn altered_patching_code_or_reference_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let (t, a) = (table(), authority(d.path()));
        let good = bundle(POLICY, 2, ("rules.toml", narrower().into()), 1, BUILD);
        let spec = |pp| bundle::BundleSpec {
            component: POLICY,
            version: 2,
            target_vmm_sha256: BUILD,
            payloads: vec![("rules.toml".into(), narrower().into())],
            encrypt_to: None,
            patch_path_sha256: pp,
        };
        let key = SigningKey::from_bytes(&[1; 32]);
        let mut wrong = crate::lifecycle::patch_path::measure_patch_path();
        wrong[0] ^= 1;
        for (pp, want) in [
            (Some(wrong), "patching code in memory hashes to"),
            (None, "no reference hash of the VMM's patching code"),
        ] {
            let b = bundle::build(&spec(pp), &key).unwrap();
            let e = a.prepare(&b, &t, "tenant").err().expect(want).to_string();
            assert!(e.contains(want), "{e}");
        }
        // The code itself altered in memory: refused; restored: accepted.
        crate::lifecycle::patch_path::tamper_mapped_patch_path().unwrap();
        let e = a
            .prepare(&good, &t, "tenant")
            .err()
            .expect("tampered")
            .to_string();
        assert!(e.contains("patching code in memory hashes to"), "{e}");
        assert_eq!(t.policy.version(), 1);
        crate::lifecycle::patch_path::tamper_mapped_patch_path().unwrap();
        assert!(a.prepare(&good, &t, "tenant").is_ok());
    }

    /// Issue 16.6: a restarted VMM (a fresh table at v1) refuses a bundle older than
    /// one applied on this host before.
    #[test]
    fn a_restarted_vmm_refuses_a_downgrade_from_its_patch_record() {
        use crate::lifecycle::applied::AppliedVersions;
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("k");
        hilrig_counters::mac::Key::init(&key).unwrap();
        let rec = d.path().join("applied.json");
        let mut a = authority(d.path());
        a.applied = Some(Arc::new(AppliedVersions::open(&rec, &key, "h").unwrap()));
        let t = table();
        let v3 = bundle(POLICY, 3, ("rules.toml", narrower().into()), 1, BUILD);
        let p = a.prepare(&v3, &t, "tenant").unwrap();
        a.applied.as_ref().unwrap().record(POLICY, 3).unwrap();
        commit(&t, p);
        // Restart: a new table (policy v1) and the record read back (the old
        // VMM's hold on the record gone first).
        let t = table();
        a.applied = None;
        a.applied = Some(Arc::new(AppliedVersions::open(&rec, &key, "h").unwrap()));
        for v in [2, 3] {
            let b = bundle(POLICY, v, ("rules.toml", narrower().into()), 1, BUILD);
            let e = a
                .prepare(&b, &t, "tenant")
                .err()
                .expect("downgrade")
                .to_string();
            assert!(e.contains("applied on this host before"), "{e}");
        }
        let v4 = bundle(POLICY, 4, ("rules.toml", narrower().into()), 1, BUILD);
        assert!(a.prepare(&v4, &t, "tenant").is_ok());
        // Without the record the same VMM would have taken v2: the record is the fix.
        a.applied = None;
        let v2 = bundle(POLICY, 2, ("rules.toml", narrower().into()), 1, BUILD);
        assert!(a.prepare(&v2, &t, "tenant").is_ok());
    }

    #[test]
    fn running_build_hash_is_stable() {
        assert_eq!(
            running_build_sha256().unwrap(),
            running_build_sha256().unwrap()
        );
    }
}
