//! A cheap clock for timing every trapped access: the TSC (about 10 ns a read here,
//! against about 30 ns for `Instant::now`), converted to nanoseconds with a rate
//! calibrated once against `Instant`. The kernel's clocksource is the TSC on the
//! machines this runs on (constant and synchronised across CPUs); where
//! calibration finds no usable TSC, `Instant` is used instead.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A point in time for [`ns_since`].
#[derive(Debug, Clone, Copy)]
pub struct Tick(u64);

/// Nanoseconds per TSC tick, as a 32.32 fixed-point number (0: no usable TSC).
fn ns_per_tick_q32() -> u64 {
    static RATE: OnceLock<u64> = OnceLock::new();
    *RATE.get_or_init(calibrate_rate)
}

/// A reading of both clocks: `Instant` bracketed by two TSC reads, so a thread
/// preempted between them is seen (a wide bracket) instead of skewing the rate.
fn paired() -> (Instant, u64, u64) {
    let a = tsc();
    let i = Instant::now();
    let b = tsc();
    (i, a.wrapping_add(b.wrapping_sub(a) / 2), b.wrapping_sub(a))
}

/// Windows whose rates are compared, and the most a bracket may span (ticks; a
/// few microseconds at any TSC rate) to count.
const WINDOWS: usize = 3;
const MAX_BRACKET: u64 = 20_000;

/// The rate from the median of [`WINDOWS`] windows of 0.3 ms whose end readings
/// were not preempted (up to 4 × as many tries); 0 (use `Instant`) when the TSC
/// does not advance or no window is clean. About 1 ms once a process (as the
/// single 1 ms window it replaced).
fn calibrate_rate() -> u64 {
    let mut rates = [0u64; WINDOWS];
    let mut n = 0;
    for _ in 0..4 * WINDOWS {
        if n == WINDOWS {
            break;
        }
        let (i0, c0, w0) = paired();
        std::thread::sleep(Duration::from_micros(300));
        let (i1, c1, w1) = paired();
        let (dt, dc) = (i1.duration_since(i0).as_nanos(), c1.wrapping_sub(c0));
        if w0 > MAX_BRACKET || w1 > MAX_BRACKET || dc == 0 || dt == 0 {
            continue;
        }
        rates[n] = u64::try_from((dt << 32) / u128::from(dc)).unwrap_or(0);
        n += 1;
    }
    if n == 0 {
        return 0;
    }
    let got = &mut rates[..n];
    got.sort_unstable();
    got[n / 2]
}

#[inline]
fn tsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: RDTSC has no preconditions; it reads the time-stamp counter.
    unsafe {
        core::arch::x86_64::_rdtsc()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0
    }
}

/// Calibrate now (once a process; about 1 ms) rather than on the first timed
/// access.
pub fn calibrate() {
    ns_per_tick_q32();
    origin();
}

/// The process-wide origin for the `Instant` fallback.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Now.
#[inline]
pub fn now() -> Tick {
    if ns_per_tick_q32() != 0 {
        Tick(tsc())
    } else {
        Tick(u64::try_from(origin().elapsed().as_nanos()).unwrap_or(u64::MAX))
    }
}

/// Nanoseconds since `t`.
#[inline]
pub fn ns_since(t: Tick) -> u64 {
    let q = ns_per_tick_q32();
    if q != 0 {
        let d = u128::from(tsc().wrapping_sub(t.0));
        u64::try_from((d * u128::from(q)) >> 32).unwrap_or(u64::MAX)
    } else {
        u64::try_from(origin().elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_sub(t.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_agree_with_instant() {
        let t = now();
        let i = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        let (ns, want) = (ns_since(t), i.elapsed().as_nanos() as u64);
        // Within 10% (the calibration takes the median of three 0.3 ms windows whose
        // end readings are bracketed, so a preempted reading cannot skew it).
        assert!(
            ns.abs_diff(want) < want / 10,
            "ticks say {ns} ns, Instant says {want} ns"
        );
    }
}
