//! Seeded crash points for the crash-consistency test: with `HILRIG_CRASH_AT=N` in
//! the environment, the process aborts at the N-th instrumented point it reaches
//! (counting from 1). Without it, points only count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Environment variable naming the crash point.
pub const ENV: &str = "HILRIG_CRASH_AT";

static HIT: AtomicU64 = AtomicU64::new(0);
static AT: OnceLock<Option<u64>> = OnceLock::new();

/// An instrumented point named `name`.
#[inline]
pub fn point(name: &str) {
    let at = *AT.get_or_init(|| std::env::var(ENV).ok().and_then(|v| v.parse().ok()));
    let n = HIT.fetch_add(1, Ordering::Relaxed) + 1;
    if at == Some(n) {
        eprintln!("crash point {n} ({name}): aborting");
        std::process::abort();
    }
}

/// Points reached so far in this process.
pub fn hits() -> u64 {
    HIT.load(Ordering::Relaxed)
}
