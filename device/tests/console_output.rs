//! A VMM's console output (`secure::open_console_output`): a terminal is written as
//! it is, directly or through the symlink a lab configures (`console.tty`,
//! `/dev/serial/by-id/...`); a symlink to anything else, or a character device that
//! is not a terminal, is refused, and a regular file is opened as an output file.

use hilrig_device::secure::{open_console_output, SecureFileError};
use std::io::{Read, Write};
use std::os::fd::FromRawFd;

/// A pty pair: the controller side as a File and the terminal's path.
fn pty() -> (std::fs::File, std::path::PathBuf) {
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

#[test]
fn a_terminal_through_a_symlink_is_written_and_anything_else_behind_one_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (mut controller, tty) = pty();
    // The lab's link to its console line: accepted, written as it is.
    let link = d.path().join("console.tty");
    std::os::unix::fs::symlink(&tty, &link).unwrap();
    let mut f = open_console_output(&link).unwrap();
    f.write_all(b"hello\n").unwrap();
    let mut got = [0u8; 16];
    let n = controller.read(&mut got).unwrap();
    assert!(got[..n].starts_with(b"hello"), "{:?}", &got[..n]);
    // The terminal itself, by its own path: the same.
    open_console_output(&tty).unwrap();
    // A symlink planted to a regular file (root's, say): refused, not truncated.
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    let planted = d.path().join("planted.log");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let e = open_console_output(&planted).unwrap_err();
    assert!(matches!(e, SecureFileError::NotRegular { .. }), "{e}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    // A character device that is not a terminal, directly or behind a link.
    let null = d.path().join("null.tty");
    std::os::unix::fs::symlink("/dev/null", &null).unwrap();
    for p in [std::path::Path::new("/dev/null"), null.as_path()] {
        let e = open_console_output(p).unwrap_err();
        assert!(e.to_string().contains("not a terminal"), "{e}");
    }
    // A terminal another user holds, behind a link: refused (they would read the
    // console).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let (_c2, theirs) = pty();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let to_theirs = d.path().join("theirs.tty");
        std::os::unix::fs::symlink(&theirs, &to_theirs).unwrap();
        let e = open_console_output(&to_theirs).unwrap_err();
        assert!(e.to_string().contains("65534"), "{e}");
    }
    // A plain file: created (or truncated) as an output file.
    let plain = d.path().join("console.txt");
    std::fs::write(&plain, b"old").unwrap();
    open_console_output(&plain)
        .unwrap()
        .write_all(b"new")
        .unwrap();
    assert_eq!(std::fs::read(&plain).unwrap(), b"new");
}
