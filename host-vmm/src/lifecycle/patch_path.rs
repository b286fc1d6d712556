//! The patching path's own code, measured as it sits in memory (issue 21.2).
//!
//! The functions that verify and apply patches are placed in one linker section,
//! `hilrig_patch_text` ([`hilrig_fw::bundle::PATCH_PATH_SECTION`]), whose bounds the
//! linker gives as `__start_hilrig_patch_text` / `__stop_hilrig_patch_text`. A bundle
//! manifest carries the SHA-256 of that section of its target build
//! (`hilrig fw bundle` reads it from the executable; `hilrig vm measure-patch-path`
//! prints the running binary's); after the signature check and before anything is
//! applied, the VMM hashes its own mapped section and refuses the patch on a mismatch,
//! so patch code altered in memory (or a bundle made for other patch code) is caught.
//! What it covers: the functions marked `#[link_section = "hilrig_patch_text"]`
//! (bundle checks, module preparation and commit, the module swap); the library code
//! they call (sha2, ed25519) is covered by the build hash of the executable file.

use sha2::{Digest, Sha256};

extern "C" {
    #[link_name = "__start_hilrig_patch_text"]
    static PATCH_TEXT_START: u8;
    #[link_name = "__stop_hilrig_patch_text"]
    static PATCH_TEXT_STOP: u8;
}

/// A function kept in the section so it is never empty and so tests can alter mapped
/// patch-path code without running it.
#[link_section = "hilrig_patch_text"]
#[inline(never)]
pub fn patch_path_canary() -> u64 {
    std::hint::black_box(0x6869_6c72_6967_7061)
}

/// The mapped patching code.
pub fn mapped_patch_path() -> &'static [u8] {
    std::hint::black_box(patch_path_canary as *const ());
    // SAFETY: the linker defines both symbols around the (read-only, executable,
    // always mapped) section; start <= stop.
    unsafe {
        let start = std::ptr::addr_of!(PATCH_TEXT_START);
        let stop = std::ptr::addr_of!(PATCH_TEXT_STOP);
        let len = (stop as usize).saturating_sub(start as usize);
        std::slice::from_raw_parts(start, len)
    }
}

/// SHA-256 of the patching code as mapped now.
#[link_section = "hilrig_patch_text"]
#[inline(never)]
pub fn measure_patch_path() -> [u8; 32] {
    Sha256::digest(mapped_patch_path()).into()
}

/// Test hook (debug builds only): flip one byte of the canary function's mapped code
/// (call twice to restore), through mprotect.
#[cfg(debug_assertions)]
pub fn tamper_mapped_patch_path() -> std::io::Result<()> {
    let addr = patch_path_canary as *const () as usize;
    let page = addr & !4095;
    let prot = |p| {
        // SAFETY: the page of our own code that holds the canary; the bytes changed
        // belong to a function nothing calls while they are altered.
        if unsafe { libc::mprotect(page as *mut libc::c_void, 4096, p) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    prot(libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC)?;
    // SAFETY: writable now (above); a single byte inside the canary.
    unsafe {
        let p = (addr + 1) as *mut u8;
        p.write_volatile(p.read_volatile() ^ 0x40);
    }
    prot(libc::PROT_READ | libc::PROT_EXEC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_found_and_the_file_agrees_with_memory() {
        assert!(
            mapped_patch_path().len() > 64,
            "the section holds the patch code"
        );
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let from_file = hilrig_fw::bundle::patch_path_sha256_of_elf(&exe).unwrap();
        assert_eq!(
            from_file,
            measure_patch_path(),
            "what the bundler computes from the build is what the VMM measures"
        );
    }
}
