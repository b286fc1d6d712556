//! A demo device-handler module for hilrig-vmm's module table (C ABI version 2; see
//! `src/lifecycle/modules.rs`). It emulates reads of the VERSION register (returning
//! DEMO_VERSION_REG) and passes every other access through. Built with
//! DEMO_BLOCK_WORD=<offset>, a read of that word blocks until the VMM raises the
//! call's cancellation flag (a module swap), checking it at its one check point, and
//! then returns RETRY (2): the call is re-dispatched to the new module.
//!
//! Build (the version and the emulated VERSION value are fixed at compile time):
//!
//!     DEMO_VERSION=2 DEMO_VERSION_REG=0x00010002 \
//!       rustc --edition=2021 --crate-type=cdylib -O -o libdemo.so modules/demo_handler.rs
//!
//! then put it in a signed bundle: `hilrig fw bundle --component device-handler
//! --version 2 ... libdemo.so`.

use std::ffi::c_char;

const fn parse(s: &str) -> u64 {
    let b = s.as_bytes();
    let (mut i, radix) = if b.len() > 2 && b[0] == b'0' && (b[1] == b'x' || b[1] == b'X') {
        (2, 16)
    } else {
        (0, 10)
    };
    let mut v: u64 = 0;
    while i < b.len() {
        let c = b[i];
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => 0,
        };
        if c != b'_' {
            v = v * radix + d as u64;
        }
        i += 1;
    }
    v
}

const VERSION: u64 = match option_env!("DEMO_VERSION") {
    Some(s) => parse(s),
    None => 1,
};
const VERSION_REG: u32 = match option_env!("DEMO_VERSION_REG") {
    Some(s) => parse(s) as u32,
    None => 0x0001_0000,
};
const BLOCK_WORD: Option<u32> = match option_env!("DEMO_BLOCK_WORD") {
    Some(s) => Some(parse(s) as u32),
    None => None,
};
/// BAR0 offset of the VERSION register (docs/registers.md).
const VERSION_OFFSET: u32 = 0x4;

#[repr(C)]
pub struct HilrigModuleV1 {
    abi: u32,
    version: u64,
    name: *const c_char,
    on_access: extern "C" fn(u32, u32, *mut u32, *const u32) -> i32,
}

// The descriptor is immutable static data.
unsafe impl Sync for HilrigModuleV1 {}

extern "C" fn on_access(word: u32, is_write: u32, value: *mut u32, cancel: *const u32) -> i32 {
    if Some(word) == BLOCK_WORD && is_write == 0 && !cancel.is_null() {
        // The check point: wait here until the VMM cancels this call.
        // SAFETY: the VMM passes its live cancellation flag.
        while unsafe { std::ptr::read_volatile(cancel) } == 0 {
            std::thread::yield_now();
        }
        return 2;
    }
    if word == VERSION_OFFSET && is_write == 0 && !value.is_null() {
        // SAFETY: the VMM passes a valid pointer to its value slot.
        unsafe { *value = VERSION_REG };
        return 1;
    }
    0
}

static MODULE: HilrigModuleV1 = HilrigModuleV1 {
    abi: 2,
    version: VERSION,
    name: c"device-handler".as_ptr(),
    on_access,
};

#[no_mangle]
pub extern "C" fn hilrig_module_v1() -> *const HilrigModuleV1 {
    &MODULE
}
