//! Whether a sandbox or jail test can run here (`#[path = "common/skip.rs"] mod skip;`).

use std::io::Write;

/// Whether `test` can run: /dev/kvm opens, and we are root when `root`. If not,
/// it prints `SKIPPED <test>: needs ...` straight to standard error (not through
/// the test harness's capture, which hides a passing test's output) and returns
/// false; in CI (`CI=true`), which has both, it fails the test instead.
pub fn runnable(test: &str, root: bool) -> bool {
    let mut missing = Vec::new();
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if kvm.is_err() {
        missing.push("/dev/kvm");
    }
    // SAFETY: geteuid has no preconditions.
    if root && unsafe { libc::geteuid() } != 0 {
        missing.push("root");
    }
    skipped(test, &missing)
}

/// Whether `test` can run: we are root (to plant files as, or for, another user).
/// As [`runnable`] otherwise.
#[allow(dead_code)] // not every test file has root-only tests
pub fn rooted(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    skipped(test, if root { &[] } else { &["root"] })
}

/// True when nothing is `missing`; else says SKIPPED (or fails in CI) as
/// [`runnable`] does.
fn skipped(test: &str, missing: &[&str]) -> bool {
    if missing.is_empty() {
        return true;
    }
    let msg = format!("SKIPPED {test}: needs {}", missing.join(" and "));
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}; CI (CI=true) has both, so this is a failure, not a skip");
    }
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
    false
}
