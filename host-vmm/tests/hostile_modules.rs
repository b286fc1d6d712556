//! Attacks on native patch modules (issue 16 item 3): a local user swapping the
//! module file between the VMM's hash check and its dlopen. Modules are now loaded
//! from a sealed memfd, so there is no file to swap.

use ed25519_dalek::SigningKey;
use hilrig_vmm::lifecycle::patch::{commit, ModuleTable, PatchAuthority, DEVICE_HANDLER};
use hilrig_vmm::policy::load_profile;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const BUILD: [u8; 32] = [7; 32];

fn build_demo_module(dir: &Path, version: u64, reg: u32) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("modules/demo_handler.rs");
    let out = dir.join(format!("libdemo_v{version}_{reg:x}.so"));
    let st = std::process::Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args([
            "--edition=2021",
            "--crate-type=cdylib",
            "-O",
            "--crate-name",
            "demo_handler",
            "-o",
        ])
        .arg(&out)
        .arg(&src)
        .env("DEMO_VERSION", version.to_string())
        .env("DEMO_VERSION_REG", format!("{reg:#x}"))
        .status()
        .expect("rustc");
    assert!(st.success());
    out
}

/// Every fd of this process that links to a memfd named after a module.
fn module_memfds() -> Vec<PathBuf> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            std::fs::read_link(p)
                .map(|l| l.to_string_lossy().contains("memfd:hilrig-module-"))
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn a_module_swapped_after_the_hash_check_never_runs() {
    // Attack: the module was written to a directory, re-hashed, then dlopen()ed by
    // path; a local user who swaps the file in between gets code into the VMM.
    let d = tempfile::tempdir().unwrap();
    let genuine = std::fs::read(build_demo_module(d.path(), 3, 0x0001_0003)).unwrap();
    // The attacker's library: same ABI, name and version, different behaviour.
    let evil = std::fs::read(build_demo_module(d.path(), 3, 0x0bad_0bad)).unwrap();
    let module_dir = d.path().join("modules");
    let authority = PatchAuthority {
        trusted: vec![SigningKey::from_bytes(&[1; 32]).verifying_key()],
        decrypt_key: None,
        build_sha256: BUILD,
        module_dir: module_dir.clone(),
        applied: None,
        allow_widening: false,
    };
    let table = ModuleTable::new(
        Some(Arc::new(load_profile(None, "tenant").unwrap())),
        |_| {},
    );
    let bundle = hilrig_fw::bundle::build(
        &hilrig_fw::bundle::BundleSpec {
            component: DEVICE_HANDLER,
            version: 3,
            target_vmm_sha256: BUILD,
            payloads: vec![("libdemo.so".to_string(), genuine)],
            encrypt_to: None,
            patch_path_sha256: Some(hilrig_vmm::lifecycle::patch_path::measure_patch_path()),
        },
        &SigningKey::from_bytes(&[1; 32]),
    )
    .unwrap();
    let before: Vec<PathBuf> = module_memfds();
    let prepared = authority.prepare(&bundle, &table, "tenant").unwrap();

    // Nothing was written where a local user could reach it: no module directory,
    // no file loaded by path.
    assert!(
        !module_dir.exists() || std::fs::read_dir(&module_dir).unwrap().next().is_none(),
        "a module file was written to {}",
        module_dir.display()
    );
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let lib_lines: Vec<&str> = maps
        .lines()
        .filter(|l| l.contains("hilrig-module-libdemo.so"))
        .collect();
    assert!(
        !lib_lines.is_empty() && lib_lines.iter().all(|l| l.contains("/memfd:")),
        "the module is not mapped from a memfd: {lib_lines:?}"
    );

    // The attacker swaps what it can reach: the memfd itself, through /proc.
    let fds: Vec<PathBuf> = module_memfds()
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(fds.len(), 1, "one sealed memfd per loaded module: {fds:?}");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&fds[0])
        .unwrap();
    let e = std::io::Write::write_all(&mut f, &evil).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");

    // The genuine module runs.
    assert_eq!(commit(&table, prepared), (DEVICE_HANDLER, 0, 3));
    let v = table
        .handler
        .call(|h| {
            h.as_ref()
                .map(|h| h.on_access(hilrig_device::Reg::Version.offset(), false, 0))
        })
        .unwrap();
    assert_eq!(
        v,
        Some(Ok(hilrig_vmm::lifecycle::modules::HandlerAction::Complete(
            0x0001_0003
        )))
    );
}

/// Successive versions of a handler, each loaded from its own sealed memfd while
/// the one before is retired (its code PROT_NONE, kept loaded): each new version
/// answers as itself. Before the retired module's memfd was kept open, its fd
/// number was reused by the next memfd and dlopen("/proc/self/fd/N") handed back
/// the retired library: the new version's first call faulted as a stale call.
#[test]
fn successive_versions_each_load_their_own_code_after_a_retire() {
    use hilrig_vmm::lifecycle::modules::{HandlerAction, NativeHandler, Retire};
    use hilrig_vmm::lifecycle::sealed::SealedModule;
    use sha2::Digest;
    let d = tempfile::tempdir().unwrap();
    let mut prev: Option<NativeHandler> = None;
    for version in 2..6u64 {
        let reg = 0x0001_0000 + version as u32;
        let bytes = std::fs::read(build_demo_module(d.path(), version, reg)).unwrap();
        let sha = hex::encode(sha2::Sha256::digest(&bytes));
        let sealed = SealedModule::new("demo", &bytes, &sha).unwrap();
        let h = NativeHandler::load_sealed(sealed, "device-handler", version)
            .unwrap_or_else(|e| panic!("version {version}: {e}"));
        assert_eq!(
            h.on_access(0x4, false, 0),
            Ok(HandlerAction::Complete(reg)),
            "version {version} answers as itself"
        );
        if let Some(old) = prev.take() {
            old.retire().unwrap();
            drop(old);
        }
        prev = Some(h);
    }
}
