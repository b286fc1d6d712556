//! A pty pair for console tests (`#[path = "common/pty.rs"] mod pty;`; the
//! VMM's hostile tests include this same file).

use std::os::fd::FromRawFd;

/// A pty pair: the controller side as a File and the terminal's path.
pub fn pty() -> (std::fs::File, std::path::PathBuf) {
    // SAFETY: posix_openpt/grantpt/unlockpt/ptsname_r on a descriptor we own.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(m >= 0);
        assert_eq!(libc::grantpt(m), 0);
        assert_eq!(libc::unlockpt(m), 0);
        let mut buf = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(m, buf.as_mut_ptr(), buf.len()), 0);
        let name = std::ffi::CStr::from_ptr(buf.as_ptr())
            .to_str()
            .unwrap()
            .to_string();
        (std::fs::File::from_raw_fd(m), name.into())
    }
}
