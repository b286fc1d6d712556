//! Secure teardown of a tenant, in a fixed order where each step is checked before
//! the next: pause vCPUs → unmap the device from the guest → scrub guest memory →
//! scrub the device's tenant state (scratch registers, data buffers) → reset the
//! device (FLR) → read its counters out of band → get the counters service's verdict
//! → a teardown record (JSON) signed with the VMM's Ed25519 key.
//!
//! The steps are the VM's ([`TeardownOps`]); this module owns the order, the checks,
//! the timings and the record. A failed step stops the teardown there and says which:
//! the device is then not handed to anyone (fail closed).

use ed25519_dalek::SigningKey;
use hilrig_device::oob::CounterReport;
use std::time::{Duration, Instant};

pub use hilrig_vmm_api::teardown::{
    BreachTrigger, RecordError, StepRecord, TeardownRecord, VerdictSummary, DETACH_STEPS, STEPS,
};

/// Why a teardown step failed (the record carries its words).
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The vCPUs could be neither parked nor stopped in time.
    #[error("{why}; {running} vCPUs still running after stopping them")]
    Vcpus {
        /// Why parking failed.
        why: String,
        /// vCPUs still in their loops.
        running: usize,
    },
    /// The VMM could not change the guest's mappings.
    #[error(transparent)]
    Vmm(#[from] crate::VmmError),
    /// A device access failed.
    #[error(transparent)]
    Device(#[from] hilrig_device::DeviceError),
    /// Guest memory could not be scrubbed.
    #[error("guest memory at {addr:#x}: {source}")]
    GuestMemory {
        /// Start of the region.
        addr: usize,
        /// What went wrong.
        source: ScrubError,
    },
    /// Something of the tenant's is still readable after the scrub (the register
    /// table says what tenant state is and what it must read afterwards).
    #[error(transparent)]
    Residue(#[from] hilrig_device::device::ScrubError),
    /// The device did not come back from its reset.
    #[error("after FLR the ID register reads {got:#x}, not {want:#x}")]
    NotReset {
        /// ID read.
        got: u32,
        /// ID expected.
        want: u32,
    },
    /// The counters could not be read out of band.
    #[error("reading counters out of band: {0}")]
    Oob(#[from] hilrig_device::oob::OobError),
    /// A described device (not the reference device) failed its scrub or ID check.
    #[error(transparent)]
    Described(#[from] crate::policy::desc::DescCheckError),
    /// A described device has no out-of-band counters to read.
    #[error("{0} has no out-of-band counters (a described device, not the reference device)")]
    NoOobCounters(String),
    /// No counters were read, so there is nothing to decide on.
    #[error("no counters")]
    NoCounters,
    /// A test double's injected failure.
    #[error("{0} failed")]
    Injected(&'static str),
}

/// Why scrubbing a guest memory region failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    /// The region does not start on a page.
    #[error("guest memory region is not page-aligned")]
    Unaligned,
    /// A system call failed.
    #[error("{call}: {source}")]
    Sys {
        /// Which.
        call: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A byte read back non-zero.
    #[error("byte {0:#x} is not zero after scrubbing")]
    NotZero(usize),
    /// A page stayed resident after it was dropped.
    #[error("page {0} is still resident after MADV_DONTNEED")]
    Resident(usize),
}

/// What the VM provides for a teardown.
pub trait TeardownOps {
    /// Park every vCPU (bounded: a spinning or flooding guest is kicked out).
    fn pause(&mut self) -> Result<(), StepError>;
    /// Remove every guest mapping of the device (direct pages and traps).
    fn unmap_device(&mut self) -> Result<(), StepError>;
    /// Zero all guest memory and check it is zero; returns bytes scrubbed.
    fn scrub_guest_memory(&mut self) -> Result<u64, StepError>;
    /// Zero the device's tenant state (scratch, buffers) and check it; returns bytes.
    fn scrub_device_state(&mut self) -> Result<u64, StepError>;
    /// Function-level reset of the device, checked.
    fn reset_device(&mut self) -> Result<(), StepError>;
    /// Read the counters out of band.
    fn read_counters(&mut self) -> Result<CounterReport, StepError>;
    /// Ask the counters service for a verdict on these counters.
    fn verdict(&mut self, counters: &CounterReport) -> Result<VerdictSummary, StepError>;
    /// The device's serial, read out of band (IDENTIFY) for the record; None when the
    /// device has no OOB port or does not answer.
    fn device_serial(&mut self) -> Option<u64> {
        None
    }
}

/// Run the teardown. Always returns a signed record; `complete` says whether every
/// step succeeded (the failed step carries its error). The record names the VM
/// (`vm`), the device's serial and the run's `nonce`, under the signature, so a
/// checker can tell it from a record of another run ([`TeardownRecord::check_binding`]).
pub fn run(
    ops: &mut dyn TeardownOps,
    vm: &str,
    nonce: hilrig_vmm_api::Nonce,
    key: &SigningKey,
) -> TeardownRecord {
    run_with(ops, vm, nonce, key, false, None)
}

/// [`run`], or with `detach` the steps of a detach ([`DETACH_STEPS`]: guest memory is
/// not scrubbed, the guest keeps running); `trigger` is named in the record.
pub fn run_with(
    ops: &mut dyn TeardownOps,
    vm: &str,
    nonce: hilrig_vmm_api::Nonce,
    key: &SigningKey,
    detach: bool,
    trigger: Option<BreachTrigger>,
) -> TeardownRecord {
    let start = Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut r = TeardownRecord {
        vm: vm.to_string(),
        serial: None,
        nonce: Some(nonce),
        started_unix,
        steps: Vec::new(),
        complete: false,
        total_micros: 0,
        guest_bytes_scrubbed: 0,
        device_bytes_scrubbed: 0,
        counters: None,
        verdict: None,
        trigger,
        detached: detach,
        signer: hex::encode(key.verifying_key().as_bytes()),
        signature: String::new(),
    };
    let step = |r: &mut TeardownRecord,
                name: &str,
                f: &mut dyn FnMut(&mut TeardownRecord) -> Result<(), StepError>| {
        let t = Instant::now();
        let res = f(r);
        r.steps.push(StepRecord {
            step: name.to_string(),
            micros: micros(t.elapsed()),
            error: res.as_ref().err().map(|e| e.to_string()),
        });
        res.is_ok()
    };
    let ok = step(&mut r, STEPS[0], &mut |_| ops.pause())
        && step(&mut r, STEPS[1], &mut |_| ops.unmap_device())
        && (detach
            || step(&mut r, STEPS[2], &mut |r| {
                ops.scrub_guest_memory().map(|b| r.guest_bytes_scrubbed = b)
            }))
        && step(&mut r, STEPS[3], &mut |r| {
            ops.scrub_device_state()
                .map(|b| r.device_bytes_scrubbed = b)
        })
        && step(&mut r, STEPS[4], &mut |_| ops.reset_device())
        && step(&mut r, STEPS[5], &mut |r| {
            ops.read_counters().map(|c| r.counters = Some(c))
        })
        && step(&mut r, STEPS[6], &mut |r| {
            let c = r.counters.ok_or(StepError::NoCounters)?;
            ops.verdict(&c).map(|v| r.verdict = Some(v))
        });
    r.complete = ok;
    r.serial = ops.device_serial();
    r.total_micros = micros(start.elapsed());
    r.sign(key);
    r
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

/// Zero `len` bytes at `ptr` in one pass (memset speed: for large ranges the C
/// library's memset streams past the cache), then check: in every 4 KiB page the
/// first and last 64-byte lines and one rotating line read back as zero, and any
/// partial page at the end is read whole. A scrub that stopped short, skipped a page
/// or raced a writer fails the check; reading 3 of every 64 lines keeps the whole
/// scrub near memset bandwidth. Returns the offset of a byte that did not read back
/// as zero.
///
/// (Zeroing block by block with the check while a block is in the cache was tried
/// for issue 21.7: the cached stores ran at under half the streaming memset's
/// bandwidth, so the check stays a second pass.)
///
/// # Safety
/// `ptr..ptr+len` must be valid for writes and not concurrently used by anything that
/// expects its contents (the vCPUs are parked and the device unmapped).
pub unsafe fn scrub(ptr: *mut u8, len: usize) -> Result<(), usize> {
    const PAGE: usize = 4096;
    const LINE: usize = 64;
    // SAFETY: the caller guarantees the range.
    unsafe { std::ptr::write_bytes(ptr, 0, len) };
    // The check reads through a pointer the compiler cannot see through, so it
    // cannot answer the reads from the zeroing it just did.
    let rp = std::hint::black_box(ptr.cast_const());
    // OR of the 8 words of the line at `off` (a tight, branch-free loop the compiler
    // vectorises: the loads of many lines overlap, so the check runs at memory
    // bandwidth, not latency).
    let line = |off: usize| -> u64 {
        let mut a = 0u64;
        for i in 0..LINE / 8 {
            // SAFETY: off + LINE <= len (checked by the callers below).
            a |= unsafe { std::ptr::read_unaligned(rp.add(off + 8 * i) as *const u64) };
        }
        a
    };
    let full_pages = len / PAGE;
    let mut acc = 0u64;
    for p in 0..full_pages {
        let base = p * PAGE;
        acc |=
            line(base) | line(base + PAGE - LINE) | line(base + ((p * 37) % (PAGE / LINE)) * LINE);
    }
    let mut tail_bad = false;
    for off in full_pages * PAGE..len {
        // SAFETY: in range.
        tail_bad |= unsafe { *rp.add(off) } != 0;
    }
    if acc != 0 || tail_bad {
        // SAFETY: in range; only on failure, to name the byte.
        let all = unsafe { std::slice::from_raw_parts(rp, len) };
        return Err(all.iter().position(|&x| x != 0).unwrap_or(0));
    }
    Ok(())
}

/// Scrub a private anonymous mapping (guest RAM). Every page resident at the scrub
/// is zeroed and checked ([`scrub`]); every page that is not (never touched, or
/// swapped out) is dropped with MADV_DONTNEED, so it reads back as zero-fill, and is
/// checked non-resident afterwards. Returns the bytes explicitly zeroed. Large
/// ranges are split over up to 4 threads (page-aligned parts).
///
/// The zeroed pages stay mapped: handing 4 KiB pages back to the kernel costs 3-6
/// times the zeroing on this machine kind (issue 21.7), so they are returned when
/// the VM unmaps its memory at its end, after the teardown record. They hold only
/// zeros by then. A part whose resident pages are scattered (more than
/// [`MAX_DROP_RUNS`] non-resident runs) is dropped whole after zeroing instead: few
/// resident pages cost little to hand back, and it keeps the system calls bounded.
///
/// # Safety
/// As for [`scrub`]; `ptr` must be page-aligned and the start of a private anonymous
/// mapping of at least `len` bytes.
pub unsafe fn scrub_anonymous(ptr: *mut u8, len: usize) -> Result<u64, ScrubError> {
    const PAGE: usize = 4096;
    /// Below this a chunk is not worth a thread.
    const MIN_CHUNK: usize = 16 << 20;
    if ptr as usize % PAGE != 0 {
        return Err(ScrubError::Unaligned);
    }
    let t0 = std::time::Instant::now();
    // Zeroing scales with cores where one core does not saturate memory: split the
    // range into page-aligned chunks, one thread each (issue 21.7).
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
        .min(len / MIN_CHUNK)
        .max(1);
    let chunk = (len / threads).div_ceil(PAGE) * PAGE;
    let base = ptr as usize;
    let zeroed = if threads == 1 {
        // SAFETY: the caller's guarantees.
        unsafe { scrub_chunk(ptr, 0, len) }?
    } else {
        std::thread::scope(|s| {
            let parts: Vec<_> = (0..threads)
                .map(|t| {
                    let off = t * chunk;
                    let n = chunk.min(len.saturating_sub(off));
                    s.spawn(move || {
                        // SAFETY: disjoint page-aligned parts of the caller's mapping;
                        // nothing else touches it (the caller's guarantee).
                        unsafe { scrub_chunk(base as *mut u8, off, n) }
                    })
                })
                .collect();
            let mut total = 0u64;
            for p in parts {
                total += p.join().unwrap_or(Err(ScrubError::Sys {
                    call: "scrub thread",
                    source: std::io::Error::other("a scrub thread panicked"),
                }))?;
            }
            Ok::<u64, ScrubError>(total)
        })?
    };
    tracing::debug!(len, zeroed, threads, total = ?t0.elapsed(), "guest memory scrubbed");
    Ok(zeroed)
}

/// Most runs of non-resident pages a part drops one by one (else the whole part is
/// dropped after zeroing).
pub const MAX_DROP_RUNS: usize = 64;

fn mincore(ptr: *mut u8, len: usize, vec: &mut [u8]) -> Result<(), ScrubError> {
    // SAFETY: a valid mapping of len bytes (the callers'); vec has one byte per page.
    if unsafe { libc::mincore(ptr as *mut libc::c_void, len, vec.as_mut_ptr()) } != 0 {
        return Err(ScrubError::Sys {
            call: "mincore",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// MADV_DONTNEED `len` bytes at `ptr` (page-aligned, inside a private anonymous
/// mapping the caller owns).
fn drop_pages(ptr: *mut u8, len: usize) -> Result<(), ScrubError> {
    // SAFETY: dropping pages of the caller's private anonymous mapping; later reads
    // see zeros.
    if unsafe { libc::madvise(ptr as *mut libc::c_void, len, libc::MADV_DONTNEED) } != 0 {
        return Err(ScrubError::Sys {
            call: "madvise(DONTNEED)",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Runs of pages with residency `resident` in a mincore vector: (first, end).
fn runs(vec: &[u8], resident: bool) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < vec.len() && (vec[i] & 1 != 0) != resident {
            i += 1;
        }
        if i >= vec.len() {
            return None;
        }
        let start = i;
        while i < vec.len() && (vec[i] & 1 != 0) == resident {
            i += 1;
        }
        Some((start, i))
    })
}

/// One part of [`scrub_anonymous`]: `len` bytes at `ptr + off` (page-aligned): zero
/// and check its resident pages, drop the others and check they stay non-resident.
///
/// # Safety
/// As for [`scrub_anonymous`], for the part.
unsafe fn scrub_chunk(ptr: *mut u8, off: usize, len: usize) -> Result<u64, ScrubError> {
    const PAGE: usize = 4096;
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: inside the caller's mapping.
    let ptr = unsafe { ptr.add(off) };
    let pages = len.div_ceil(PAGE);
    let mut before = vec![0u8; pages];
    mincore(ptr, len, &mut before)?;
    let mut zeroed = 0u64;
    for (start, end) in runs(&before, true) {
        let o = start * PAGE;
        let n = (end * PAGE).min(len) - o;
        // SAFETY: inside the mapping (caller's guarantee).
        unsafe { scrub(ptr.add(o), n) }.map_err(|at| ScrubError::NotZero(off + o + at))?;
        zeroed += n as u64;
    }
    let holes = runs(&before, false).count();
    if holes == 0 {
        // Every page was resident and is zeroed and checked: nothing to drop.
        return Ok(zeroed);
    }
    if holes > MAX_DROP_RUNS {
        // Scattered: drop the whole part (zeroed pages included); then nothing of
        // it may be resident.
        drop_pages(ptr, len)?;
        let mut after = vec![0u8; pages];
        mincore(ptr, len, &mut after)?;
        if let Some(p) = after.iter().position(|&v| v & 1 != 0) {
            return Err(ScrubError::Resident(off / PAGE + p));
        }
        return Ok(zeroed);
    }
    for (start, end) in runs(&before, false) {
        let o = start * PAGE;
        let n = (end * PAGE).min(len) - o;
        // SAFETY: inside the mapping.
        drop_pages(unsafe { ptr.add(o) }, n)?;
    }
    // The proof for the pages not zeroed: still not resident (nothing faulted them
    // in with what a swap or anything else held), so they read as zero-fill.
    let mut after = vec![0u8; pages];
    mincore(ptr, len, &mut after)?;
    if let Some(p) = (0..pages).find(|&p| before[p] & 1 == 0 && after[p] & 1 != 0) {
        return Err(ScrubError::Resident(off / PAGE + p));
    }
    Ok(zeroed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fake {
        calls: Vec<&'static str>,
        fail: Option<&'static str>,
    }

    impl Fake {
        fn go(&mut self, s: &'static str) -> Result<(), StepError> {
            self.calls.push(s);
            if self.fail == Some(s) {
                Err(StepError::Injected(s))
            } else {
                Ok(())
            }
        }
    }

    impl TeardownOps for Fake {
        fn pause(&mut self) -> Result<(), StepError> {
            self.go("pause")
        }
        fn unmap_device(&mut self) -> Result<(), StepError> {
            self.go("unmap-device")
        }
        fn scrub_guest_memory(&mut self) -> Result<u64, StepError> {
            self.go("scrub-guest-memory").map(|_| 4096)
        }
        fn scrub_device_state(&mut self) -> Result<u64, StepError> {
            self.go("scrub-device-state").map(|_| 64)
        }
        fn reset_device(&mut self) -> Result<(), StepError> {
            self.go("reset-device")
        }
        fn read_counters(&mut self) -> Result<CounterReport, StepError> {
            self.go("read-counters").map(|_| CounterReport {
                counters: [1, 2, 3],
                master: 6,
                fuse: false,
                slots_left: 5,
                width: 8,
                epoch: 0,
            })
        }
        fn verdict(&mut self, _: &CounterReport) -> Result<VerdictSummary, StepError> {
            self.go("verdict").map(|_| VerdictSummary {
                verdict: hilrig_device::attest::Verdict::Trusted,
                handoff_ok: true,
                reasons: vec![],
            })
        }
        fn device_serial(&mut self) -> Option<u64> {
            Some(77)
        }
    }

    #[test]
    fn steps_run_in_order_and_the_record_is_signed() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let mut f = Fake::default();
        let nonce = hilrig_vmm_api::Nonce([9; 32]);
        let r = run(&mut f, "vm1", nonce, &key);
        assert_eq!(f.calls, STEPS.to_vec());
        assert_eq!(
            (r.vm.as_str(), r.serial, r.nonce),
            ("vm1", Some(77), Some(nonce))
        );
        assert!(r.complete);
        assert_eq!(
            (r.guest_bytes_scrubbed, r.device_bytes_scrubbed),
            (4096, 64)
        );
        assert_eq!(
            r.counters_verdict(),
            Some(hilrig_device::attest::Verdict::Trusted)
        );
        r.verify(&key.verifying_key()).unwrap();
        let mut t = r.clone();
        t.counters.as_mut().unwrap().master = 7;
        assert!(
            t.verify(&key.verifying_key()).is_err(),
            "a tampered record fails"
        );
        assert!(r
            .verify(&SigningKey::from_bytes(&[4; 32]).verifying_key())
            .is_err());
    }

    #[test]
    fn a_failed_step_stops_the_teardown_there() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let mut f = Fake {
            fail: Some("scrub-device-state"),
            ..Default::default()
        };
        let r = run(&mut f, "vm1", hilrig_vmm_api::Nonce([9; 32]), &key);
        assert_eq!(
            f.calls,
            STEPS[..4].to_vec(),
            "nothing after the failed step ran"
        );
        assert!(!r.complete);
        assert_eq!(
            r.steps.last().unwrap().error.as_deref(),
            Some("scrub-device-state failed")
        );
        assert!(r.verdict.is_none());
        r.verify(&key.verifying_key()).unwrap();
    }

    #[test]
    fn anonymous_scrub_zeroes_resident_pages_and_drops_the_rest() {
        let len = 64 << 20;
        let mut m = memmap2::MmapMut::map_anon(len).unwrap();
        // Touch a few scattered pages with a canary; most pages are never touched.
        for p in [0usize, 1, 7, 4096, 16383] {
            m[p * 4096 + 100] = 0xa5;
        }
        // SAFETY: our own anonymous mapping.
        let zeroed = unsafe { scrub_anonymous(m.as_mut_ptr(), len) }.unwrap();
        assert!(
            (5 * 4096..64 * 4096).contains(&zeroed),
            "only resident pages are zeroed: {zeroed}"
        );
        assert!(m.iter().step_by(97).all(|&b| b == 0));
        assert_eq!(m[7 * 4096 + 100], 0);
    }

    #[test]
    fn a_fully_touched_mapping_is_zeroed_and_left_for_the_unmap() {
        let len = 48 << 20;
        let mut m = memmap2::MmapMut::map_anon(len).unwrap();
        m.fill(0x5a);
        // SAFETY: our own anonymous mapping.
        let zeroed = unsafe { scrub_anonymous(m.as_mut_ptr(), len) }.unwrap();
        assert_eq!(zeroed, len as u64, "every resident page zeroed");
        assert!(m.iter().all(|&b| b == 0), "a byte of the canary is left");
    }

    #[test]
    fn scattered_resident_pages_are_zeroed_and_the_part_dropped_whole() {
        let len = 8 << 20;
        let mut m = memmap2::MmapMut::map_anon(len).unwrap();
        // Every other page: far more runs of non-resident pages than MAX_DROP_RUNS.
        for p in (0..len / 4096).step_by(2) {
            m[p * 4096 + 7] = 0xc3;
        }
        // SAFETY: our own anonymous mapping.
        unsafe { scrub_anonymous(m.as_mut_ptr(), len) }.unwrap();
        let mut v = vec![0u8; len / 4096];
        mincore(m.as_mut_ptr(), len, &mut v).unwrap();
        assert!(v.iter().all(|&r| r & 1 == 0), "dropped whole");
        assert!(m.iter().all(|&b| b == 0));
    }

    #[test]
    fn scrub_zeroes_and_checks() {
        let mut v = vec![0xabu8; 10_007];
        // SAFETY: our own buffer.
        assert_eq!(unsafe { scrub(v.as_mut_ptr().add(3), 10_000) }, Ok(()));
        assert!(v[3..10_003].iter().all(|&b| b == 0));
        assert_eq!(v[2], 0xab);
        assert_eq!(v[10_003], 0xab);
    }

    #[test]
    fn scrub_covers_every_block_and_the_partial_tail() {
        // Many pages, an unaligned start and a partial last page: every byte of
        // the range zeroed, nothing outside it touched.
        let len = (3 << 20) + 5 * 4096 + 123;
        let mut v = vec![0x5au8; len + 2];
        // SAFETY: our own buffer.
        assert_eq!(unsafe { scrub(v.as_mut_ptr().add(1), len) }, Ok(()));
        assert!(v[1..=len].iter().all(|&b| b == 0));
        assert_eq!((v[0], v[len + 1]), (0x5a, 0x5a));
    }
}
