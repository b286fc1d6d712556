//! A VMM's console output (`secure::open_console_output`): a terminal is written as
//! it is, directly or through the symlink a lab configures (`console.tty`,
//! `/dev/serial/by-id/...`); a symlink to anything else, or a character device that
//! is not a terminal, is refused, and a regular file is opened as an output file.

#[path = "common/pty.rs"]
mod pty;
use hilrig_device::secure::{open_console_output, SecureFileError};
use pty::pty;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Whether we are root (to chown a pty to another user). Without root the test
/// says so on the terminal (not through the test harness's capture); in CI
/// (`CI=true`, run as root) a missing root is a failure, not a skip.
fn rooted(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let msg = format!("SKIPPED {test}: needs root to give a pty to another user");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} (CI=true: CI runs as root, so this is a failure)");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
    false
}

#[test]
fn a_terminal_through_a_symlink_is_written_and_anything_else_behind_one_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (mut controller, tty) = pty();
    // The lab's link to its console line: accepted, written as it is.
    let link = d.path().join("console.tty");
    std::os::unix::fs::symlink(&tty, &link).unwrap();
    let mut f = open_console_output(&link, &[]).unwrap();
    f.write_all(b"hello\n").unwrap();
    let mut got = [0u8; 16];
    let n = controller.read(&mut got).unwrap();
    assert!(got[..n].starts_with(b"hello"), "{:?}", &got[..n]);
    // The terminal itself, by its own path: the same.
    open_console_output(&tty, &[]).unwrap();
    // A symlink planted to a regular file (root's, say): refused, not truncated.
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    let planted = d.path().join("planted.log");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let e = open_console_output(&planted, &[]).unwrap_err();
    assert!(matches!(e, SecureFileError::NotRegular { .. }), "{e}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    // A character device that is not a terminal, directly or behind a link.
    let null = d.path().join("null.tty");
    std::os::unix::fs::symlink("/dev/null", &null).unwrap();
    for p in [std::path::Path::new("/dev/null"), null.as_path()] {
        let e = open_console_output(p, &[]).unwrap_err();
        assert!(e.to_string().contains("not a terminal"), "{e}");
    }
    // A plain file: created (or truncated) as an output file.
    let plain = d.path().join("console.txt");
    std::fs::write(&plain, b"old").unwrap();
    open_console_output(&plain, &[])
        .unwrap()
        .write_all(b"new")
        .unwrap();
    assert_eq!(std::fs::read(&plain).unwrap(), b"new");
}

/// A directory of ours with `mode`.
fn dir(parent: &Path, name: &str, mode: u32) -> PathBuf {
    let p = parent.join(name);
    std::fs::create_dir(&p).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

#[test]
fn a_later_link_of_the_console_chain_in_a_directory_others_can_write_is_refused() {
    // Attack: the console path is a link in our own 0700 directory, but it leads to
    // a second link in a directory others can write (0777, not sticky): they
    // replace that second link with one to a terminal of theirs and read the
    // console. Only the first link's directories were checked.
    let d = tempfile::tempdir().unwrap();
    let (_controller, tty) = pty();
    let mine = dir(d.path(), "mine", 0o700);
    let open = dir(d.path(), "open", 0o777);
    let second = open.join("next.tty");
    std::os::unix::fs::symlink(&tty, &second).unwrap();
    let first = mine.join("console.tty");
    std::os::unix::fs::symlink(&second, &first).unwrap();
    let e = open_console_output(&first, &[]).unwrap_err();
    assert!(
        matches!(&e, SecureFileError::UnsafeDir { path, .. } if path == &open),
        "{e}"
    );
    // A relative link out of our directory into theirs: the same.
    let rel = mine.join("relative.tty");
    std::os::unix::fs::symlink("../open/next.tty", &rel).unwrap();
    let e = open_console_output(&rel, &[]).unwrap_err();
    assert!(
        matches!(&e, SecureFileError::UnsafeDir { reason, .. } if reason.contains("writable by group or others")),
        "{e}"
    );
    // Negative control: the same two links with the second in a directory of ours
    // (as /dev/serial/by-id is root's) lead to the terminal, written as it is.
    let ours = dir(d.path(), "ours", 0o755);
    let second = ours.join("next.tty");
    std::os::unix::fs::symlink(&tty, &second).unwrap();
    let good = mine.join("good.tty");
    std::os::unix::fs::symlink("../ours/next.tty", &good).unwrap();
    open_console_output(&good, &[]).unwrap();
}

#[test]
fn a_console_link_chain_longer_than_the_limit_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (_controller, tty) = pty();
    let mut to = tty.clone();
    for i in 0..hilrig_device::secure::MAX_CONSOLE_LINKS + 1 {
        let link = d.path().join(format!("l{i}"));
        std::os::unix::fs::symlink(&to, &link).unwrap();
        to = link;
    }
    let e = open_console_output(&to, &[]).unwrap_err();
    assert!(matches!(e, SecureFileError::TooManyLinks { .. }), "{e}");
    // Negative control: the limit itself is followed.
    let at_limit = d
        .path()
        .join(format!("l{}", hilrig_device::secure::MAX_CONSOLE_LINKS - 1));
    open_console_output(&at_limit, &[]).unwrap();
}

#[test]
fn a_console_services_pty_is_accepted_when_its_owner_is_named_and_no_other_users() {
    // The lab's console service (ser2net, a labgrid exporter) runs as its own user
    // and holds the pty it serves: written to when that uid is named
    // (`--console-owner`); a terminal of any other user (a pty number an attacker
    // grabbed after the service's closed) is refused.
    if !rooted("a_console_services_pty_is_accepted_when_its_owner_is_named_and_no_other_users") {
        return;
    }
    const SERVICE: u32 = 65533;
    const OTHER: u32 = 65534;
    let d = tempfile::tempdir().unwrap();
    let (mut controller, served) = pty();
    std::os::unix::fs::chown(&served, Some(SERVICE), None).unwrap();
    let link = d.path().join("console.tty");
    std::os::unix::fs::symlink(&served, &link).unwrap();
    // Not named: refused.
    let e = open_console_output(&link, &[]).unwrap_err();
    assert!(
        matches!(e, SecureFileError::ForeignOwner { owner: SERVICE, .. }),
        "{e}"
    );
    // Named: written.
    let mut f = open_console_output(&link, &[SERVICE]).unwrap();
    f.write_all(b"served\n").unwrap();
    let mut got = [0u8; 16];
    let n = controller.read(&mut got).unwrap();
    assert!(got[..n].starts_with(b"served"), "{:?}", &got[..n]);
    // Another user's terminal: refused whoever else is named.
    let (_c2, theirs) = pty();
    std::os::unix::fs::chown(&theirs, Some(OTHER), Some(OTHER)).unwrap();
    let to_theirs = d.path().join("theirs.tty");
    std::os::unix::fs::symlink(&theirs, &to_theirs).unwrap();
    let e = open_console_output(&to_theirs, &[SERVICE]).unwrap_err();
    assert!(e.to_string().contains("65534"), "{e}");
    // A named owner does not make a link in a directory others can write safe.
    let open = dir(d.path(), "open", 0o777);
    let planted = open.join("console.tty");
    std::os::unix::fs::symlink(&served, &planted).unwrap();
    let e = open_console_output(&planted, &[SERVICE]).unwrap_err();
    assert!(matches!(e, SecureFileError::UnsafeDir { .. }), "{e}");
}

#[test]
fn another_users_link_in_a_sticky_directory_on_the_console_chain_is_refused() {
    // Attack: our console link leads through a link in a sticky directory others
    // can write (/tmp-like, 1777: it passes the directory check). That second link
    // belongs to another user, who can point it at any terminal (read_link does not
    // apply the kernel's protected_symlinks rule): refused unless its owner is named.
    if !rooted("another_users_link_in_a_sticky_directory_on_the_console_chain_is_refused") {
        return;
    }
    const OTHER: u32 = 65534;
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_controller, tty) = pty();
    let sticky = dir(d.path(), "sticky", 0o1777);
    let theirs = sticky.join("theirs.tty");
    std::os::unix::fs::symlink(&tty, &theirs).unwrap();
    std::os::unix::fs::lchown(&theirs, Some(OTHER), Some(OTHER)).unwrap();
    let mine = dir(d.path(), "mine", 0o700);
    let first = mine.join("console.tty");
    std::os::unix::fs::symlink(&theirs, &first).unwrap();
    let e = open_console_output(&first, &[]).unwrap_err();
    assert!(
        matches!(&e, SecureFileError::ForeignOwner { owner: OTHER, path, .. } if path == &theirs),
        "{e}"
    );
    // Named as a console service, its link is followed.
    open_console_output(&first, &[OTHER]).unwrap();
    // Negative control: our own link in the same sticky directory (nobody else may
    // replace it there) leads to the terminal.
    let ours = sticky.join("ours.tty");
    std::os::unix::fs::symlink(&tty, &ours).unwrap();
    let good = mine.join("good.tty");
    std::os::unix::fs::symlink(&ours, &good).unwrap();
    open_console_output(&good, &[]).unwrap();
}
