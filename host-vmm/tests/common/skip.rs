//! Whether a test that needs /dev/kvm or root can run here
//! (`#[path = "common/skip.rs"] mod skip;` at the test crate's root; the
//! workspace's and the bench's KVM tests include this same file). A test that
//! cannot run says `SKIPPED <test>: needs ...` where it is seen, and fails in
//! CI (`CI=true`), never returns quietly.

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

/// The enclosing function's path, e.g. `kvm::a_vm_boots`: the test's name for
/// [`runnable`]'s message.
#[allow(unused_macros)] // not every test file uses it
macro_rules! test_name {
    () => {{
        fn here() {}
        let n = std::any::type_name_of_val(&here);
        n.strip_suffix("::here").unwrap_or(n)
    }};
}

/// `skip::kvm!()`: whether the enclosing test can run, i.e. /dev/kvm opens
/// ([`runnable`] named after the test: SKIPPED where it cannot, a failure in CI).
#[allow(unused_macros)] // not every test file uses it
macro_rules! kvm {
    () => {
        crate::skip::runnable(crate::skip::test_name!(), false)
    };
}
#[allow(unused_imports)] // not every test file uses both
pub(crate) use {kvm, test_name};

/// True when nothing is `missing`; else says SKIPPED (or fails in CI) as
/// [`runnable`] does.
fn skipped(test: &str, missing: &[&str]) -> bool {
    if missing.is_empty() {
        return true;
    }
    let msg = format!("SKIPPED {test}: needs {}", missing.join(" and "));
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}; CI (CI=true) has it, so this is a failure, not a skip");
    }
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
    false
}
