//! The versioned module table: the VMM's patchable components.
//!
//! Each component (`policy`: the MMIO policy rules, a data module; `device-handler`:
//! native device handler routines, a `cdylib` with the C ABI below) lives in a
//! [`Slot`]. Callers go through the slot ([`Slot::call`]), never hold the module
//! itself. Replacing a module ([`Slot::replace`]) invalidates the old one:
//! - a call that was in flight in the old module when it was replaced gets an
//!   injected retry error ([`CallError::Retry`]) and is re-dispatched through the
//!   table, landing in the new module (so module calls must be pure decisions: the
//!   VMM acts on their results, not the module);
//! - a [`Handle`] kept from before the swap is stale: calling it returns
//!   [`CallError::Stale`] and raises an alarm rather than running old code.
//!
//! ## Native module C ABI (version 1)
//!
//! A module is a shared library exporting
//! `const HilrigModuleV1 *hilrig_module_v1(void)`:
//!
//! ```c
//! struct HilrigModuleV1 {
//!     uint32_t abi;          // HILRIG_MODULE_ABI = 1
//!     uint64_t version;      // must equal the bundle manifest's version
//!     const char *name;      // NUL-terminated; must equal the component name
//!     // Called for each allowed register-sized part of a trapped access.
//!     // word: 4-aligned BAR0 offset; is_write: 0/1; *value: the value written, or
//!     // for reads the value to return when the module completes the access.
//!     // Returns 0 PASS (forward to the device, a write with *value), 1 COMPLETE
//!     // (the module emulated it: a read returns *value, a write is consumed),
//!     // negative: error (the access is dropped and an alarm raised).
//!     int32_t (*on_access)(uint32_t word, uint32_t is_write, uint32_t *value);
//! };
//! ```
//!
//! Libraries are loaded only after their file's SHA-256 matched the signed manifest
//! (see `patch`), and are never unloaded while the VMM runs (a stale handle must be
//! able to fail safely, not jump into unmapped code).

use std::ffi::{c_char, CStr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// The native module ABI this VMM speaks.
pub const HILRIG_MODULE_ABI: u32 = 1;
/// The symbol a native module exports.
pub const MODULE_SYMBOL: &[u8] = b"hilrig_module_v1\0";

/// The C struct a native module returns.
#[repr(C)]
pub struct HilrigModuleV1 {
    /// ABI version.
    pub abi: u32,
    /// Module version.
    pub version: u64,
    /// Component name.
    pub name: *const c_char,
    /// The access hook.
    pub on_access: extern "C" fn(word: u32, is_write: u32, value: *mut u32) -> i32,
}

/// What a device handler decided for one access part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerAction {
    /// Forward to the device (a write with this value).
    Pass(u32),
    /// Emulated: a read returns this value; a write is consumed.
    Complete(u32),
}

/// Why a module call did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The module was replaced while the call was in flight; re-dispatch.
    #[error("module {component} v{version} was replaced during the call; retry")]
    Retry {
        /// Component.
        component: String,
        /// The replaced version.
        version: u64,
    },
    /// A handle from before a swap was used.
    #[error("stale handle to {component} v{version} (invalidated; current is v{current})")]
    Stale {
        /// Component.
        component: String,
        /// The handle's version.
        version: u64,
        /// The current version.
        current: u64,
    },
    /// The module itself reported an error.
    #[error("module {component} v{version} returned error {code}")]
    Module {
        /// Component.
        component: String,
        /// Version.
        version: u64,
        /// Its code.
        code: i32,
    },
    /// Still being replaced after several retries.
    #[error("module {component} kept changing during {tries} retries")]
    Unstable {
        /// Component.
        component: String,
        /// Retries made.
        tries: u32,
    },
}

/// Why a native module could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// dlopen or symbol lookup failed.
    #[error("loading module {path}: {detail}")]
    Load {
        /// The file.
        path: String,
        /// What failed.
        detail: String,
    },
    /// The module's self-description does not match.
    #[error("module {path}: {detail}")]
    Mismatch {
        /// The file.
        path: String,
        /// What differs.
        detail: String,
    },
}

/// A loaded native device-handler module.
pub struct NativeHandler {
    // Keeps the code mapped for as long as any handle could reach it.
    _lib: Arc<libloading::Library>,
    // The sealed memfd the library was loaded from (after `_lib`: dropped after it).
    _sealed: Option<Arc<super::sealed::SealedModule>>,
    on_access: extern "C" fn(u32, u32, *mut u32) -> i32,
    /// Its version.
    pub version: u64,
}

impl std::fmt::Debug for NativeHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeHandler")
            .field("version", &self.version)
            .finish()
    }
}

impl NativeHandler {
    /// Load a module file and check its ABI, name and version against what the signed
    /// manifest promised. The caller has already checked the file's SHA-256.
    pub fn load(path: &Path, component: &str, version: u64) -> Result<NativeHandler, LoadError> {
        let p = path.display().to_string();
        // SAFETY: loading runs the library's initialisers. Only libraries whose SHA-256
        // matched a manifest signed by a trusted patch authority reach this point.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| LoadError::Load {
            path: p.clone(),
            detail: e.to_string(),
        })?;
        // SAFETY: the symbol's type is fixed by the ABI above.
        let desc = unsafe {
            let f: libloading::Symbol<'_, extern "C" fn() -> *const HilrigModuleV1> =
                lib.get(MODULE_SYMBOL).map_err(|e| LoadError::Load {
                    path: p.clone(),
                    detail: format!("no hilrig_module_v1 symbol: {e}"),
                })?;
            f()
        };
        if desc.is_null() {
            return Err(LoadError::Mismatch {
                path: p,
                detail: "hilrig_module_v1() returned NULL".into(),
            });
        }
        // SAFETY: non-null, points to the module's static descriptor.
        let d = unsafe { &*desc };
        if d.abi != HILRIG_MODULE_ABI {
            return Err(LoadError::Mismatch {
                path: p,
                detail: format!("ABI {} (this VMM speaks {HILRIG_MODULE_ABI})", d.abi),
            });
        }
        let name = if d.name.is_null() {
            String::new()
        } else {
            // SAFETY: the ABI requires a NUL-terminated static string.
            unsafe { CStr::from_ptr(d.name) }
                .to_string_lossy()
                .into_owned()
        };
        if name != component || d.version != version {
            return Err(LoadError::Mismatch {
                path: p,
                detail: format!(
                    "declares {name:?} v{}, the manifest says {component:?} v{version}",
                    d.version
                ),
            });
        }
        Ok(NativeHandler {
            on_access: d.on_access,
            _lib: Arc::new(lib),
            _sealed: None,
            version,
        })
    }

    /// Load a module from its sealed memfd ([`super::sealed::SealedModule`]): the
    /// bytes whose hash was checked are the bytes loaded. The memfd is kept open as
    /// long as the library is loaded.
    pub fn load_sealed(
        module: super::sealed::SealedModule,
        component: &str,
        version: u64,
    ) -> Result<NativeHandler, LoadError> {
        let mut h = NativeHandler::load(&module.path(), component, version)?;
        h._sealed = Some(Arc::new(module));
        Ok(h)
    }

    /// Call the module's access hook.
    pub fn on_access(&self, word: u32, write: bool, value: u32) -> Result<HandlerAction, i32> {
        let mut v = value;
        match (self.on_access)(word, write as u32, &mut v) {
            0 => Ok(HandlerAction::Pass(v)),
            1 => Ok(HandlerAction::Complete(v)),
            c => Err(c),
        }
    }
}

/// One installed version of a component.
#[derive(Debug)]
pub struct Installed<T> {
    /// The module.
    pub module: T,
    /// Its version.
    pub version: u64,
    valid: AtomicBool,
}

/// A patchable component's slot in the table.
pub struct Slot<T> {
    name: String,
    current: RwLock<Arc<Installed<T>>>,
    /// The installed version, readable without the lock (the hot trap path asks
    /// whether any device handler is installed on every access).
    version: AtomicU64,
    stale_calls: AtomicU64,
    retries: AtomicU64,
    alarm: Box<dyn Fn(&CallError) + Send + Sync>,
}

/// A reference to one installed version, for callers that keep one. Calling it after
/// the version was replaced fails with [`CallError::Stale`] and raises an alarm.
pub struct Handle<T> {
    slot: Arc<Slot<T>>,
    installed: Arc<Installed<T>>,
}

impl<T> Slot<T> {
    /// A slot holding `module` at `version`; `alarm` is told of stale-handle calls.
    pub fn new(
        name: &str,
        module: T,
        version: u64,
        alarm: Box<dyn Fn(&CallError) + Send + Sync>,
    ) -> Arc<Slot<T>> {
        Arc::new(Slot {
            name: name.to_string(),
            current: RwLock::new(Arc::new(Installed {
                module,
                version,
                valid: AtomicBool::new(true),
            })),
            version: AtomicU64::new(version),
            stale_calls: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            alarm,
        })
    }

    /// Component name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn load(&self) -> Arc<Installed<T>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The installed version.
    #[inline]
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// A handle to the current version.
    pub fn handle(self: &Arc<Self>) -> Handle<T> {
        Handle {
            slot: self.clone(),
            installed: self.load(),
        }
    }

    /// Replace the module (the caller checked the version is newer and quiesced the
    /// vCPUs). The old version is invalidated. Returns the old version number.
    pub fn replace(&self, module: T, version: u64) -> u64 {
        let new = Arc::new(Installed {
            module,
            version,
            valid: AtomicBool::new(true),
        });
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        let old = std::mem::replace(&mut *cur, new);
        self.version.store(version, Ordering::Release);
        drop(cur);
        old.valid.store(false, Ordering::Release);
        old.version
    }

    /// Call the current module. If it is replaced while `f` runs, `f`'s result is
    /// discarded (the injected retry) and the call is re-dispatched to the new module.
    pub fn call<R>(&self, f: impl Fn(&T) -> R) -> Result<R, CallError> {
        for _ in 0..8 {
            let m = self.load();
            let r = f(&m.module);
            if m.valid.load(Ordering::Acquire) {
                return Ok(r);
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
        }
        Err(CallError::Unstable {
            component: self.name.clone(),
            tries: 8,
        })
    }

    /// Calls re-dispatched because their module was replaced mid-call.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Calls through stale handles.
    pub fn stale_calls(&self) -> u64 {
        self.stale_calls.load(Ordering::Relaxed)
    }
}

impl<T> Handle<T> {
    /// Call this handle's version, if it is still the installed one.
    pub fn call<R>(&self, f: impl FnOnce(&T) -> R) -> Result<R, CallError> {
        if !self.installed.valid.load(Ordering::Acquire) {
            let e = CallError::Stale {
                component: self.slot.name.clone(),
                version: self.installed.version,
                current: self.slot.version(),
            };
            self.slot.stale_calls.fetch_add(1, Ordering::Relaxed);
            (self.slot.alarm)(&e);
            return Err(e);
        }
        Ok(f(&self.installed.module))
    }

    /// The version this handle refers to.
    pub fn version(&self) -> u64 {
        self.installed.version
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Build the demo handler module (modules/demo_handler.rs) at `version` into `dir`
    /// with rustc; returns the library path.
    pub fn build_demo_module(
        dir: &Path,
        version: u64,
        version_reg_value: u32,
    ) -> std::path::PathBuf {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("modules/demo_handler.rs");
        let out = dir.join(format!("libdemo_v{version}.so"));
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
        let st = std::process::Command::new(rustc)
            .args([
                "--edition=2021",
                "--crate-type=cdylib",
                "-O",
                "--crate-name",
                "demo_handler",
            ])
            .env("DEMO_VERSION", version.to_string())
            .env("DEMO_VERSION_REG", format!("{version_reg_value:#x}"))
            .arg("-o")
            .arg(&out)
            .arg(&src)
            .status()
            .expect("run rustc");
        assert!(st.success(), "building the demo module");
        out
    }

    #[test]
    fn native_module_loads_checks_and_runs() {
        let d = tempfile::tempdir().unwrap();
        let lib = build_demo_module(d.path(), 2, 0x0001_0002);
        let h = NativeHandler::load(&lib, "device-handler", 2).unwrap();
        let version = hilrig_device::Reg::Version.offset();
        assert_eq!(
            h.on_access(version, false, 0),
            Ok(HandlerAction::Complete(0x0001_0002))
        );
        assert_eq!(h.on_access(0x10, true, 5), Ok(HandlerAction::Pass(5)));
        let e = NativeHandler::load(&lib, "device-handler", 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("declares \"device-handler\" v2"), "{e}");
        let e = NativeHandler::load(&lib, "policy", 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("manifest says \"policy\""), "{e}");
        let not_a_lib = d.path().join("x.so");
        std::fs::write(&not_a_lib, b"nope").unwrap();
        assert!(NativeHandler::load(&not_a_lib, "device-handler", 1).is_err());
    }

    #[test]
    fn in_flight_call_retries_into_the_new_module_and_stale_handles_alarm() {
        let alarms = Arc::new(Mutex::new(Vec::new()));
        let a2 = alarms.clone();
        let slot = Slot::new(
            "policy",
            "old",
            1,
            Box::new(move |e: &CallError| a2.lock().unwrap().push(e.to_string())),
        );
        let handle = slot.handle();
        assert_eq!(handle.call(|m| *m), Ok("old"));
        // A call in flight when the swap happens lands in the new module.
        let entered = Arc::new(std::sync::Barrier::new(2));
        let proceed = Arc::new(std::sync::Barrier::new(2));
        let (s2, e2, p2) = (slot.clone(), entered.clone(), proceed.clone());
        let first = Arc::new(AtomicBool::new(true));
        let t = std::thread::spawn(move || {
            s2.call(|m| {
                if first.swap(false, Ordering::SeqCst) {
                    e2.wait();
                    p2.wait();
                }
                *m
            })
        });
        entered.wait();
        assert_eq!(slot.replace("new", 2), 1);
        proceed.wait();
        assert_eq!(t.join().unwrap(), Ok("new"));
        assert_eq!(slot.retries(), 1);
        // The old handle is stale: error + alarm, never old code.
        let e = handle.call(|m| *m).unwrap_err();
        assert!(
            matches!(
                e,
                CallError::Stale {
                    version: 1,
                    current: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(slot.stale_calls(), 1);
        assert_eq!(alarms.lock().unwrap().len(), 1);
        assert_eq!(slot.handle().call(|m| *m), Ok("new"));
    }
}
