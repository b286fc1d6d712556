//! Seccomp filters per thread kind and a landlock write confinement (issue 16 item 2).
//!
//! Each thread installs the allow-list of its kind once its set-up is done (the model:
//! Firecracker's per-thread filters and cloud-hypervisor's `seccomp_filters.rs`):
//!
//! | kind | where installed | what it may do |
//! |---|---|---|
//! | [`ThreadKind::Vcpu`] | first thing in the vCPU loop | KVM ioctls, memory, futexes, kicks (tgkill), time, the device backend's I/O (state file writes, VFIO pread/pwrite) |
//! | [`ThreadKind::Control`] | first thing in the control socket thread (its connection threads inherit it) | the vCPU list plus accept/peer credentials, thread creation, opening bundles, memfd sealing and dlopen, teardown (mincore) |
//! | [`ThreadKind::Main`] | after the vCPU and control threads are started | the control list without accept/thread creation: watchdog, teardown, report |
//!
//! The device backends run on the vCPU threads (model, rtl, lockstep, verilator are
//! in-process; VFIO forwards with pread/pwrite), so the vCPU list is the backend's too.
//!
//! A syscall outside the list raises SIGSYS (`SeccompAction::Trap`); the handler
//! writes `SECCOMP VIOLATION: thread <kind> made forbidden syscall <nr>` on standard
//! error and ends the process with [`SECCOMP_EXIT`] ([`ExitStatus::SeccompViolation`]).
//! Installing a filter sets NoNewPrivs. Nothing anywhere may execve, fork a process,
//! ptrace, mount, change ids, load kernel modules or BPF, or (unless a PostgreSQL
//! counters service is configured) create sockets.
//!
//! Landlock (best effort, where the kernel has it): before the threads start, the
//! VMM may only create, write, rename or remove files beneath the directories its
//! outputs live in, and may execute nothing.

use hilrig_vmm_api::ExitStatus;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// The process exit status after a seccomp violation.
pub const SECCOMP_EXIT: i32 = ExitStatus::SeccompViolation as i32;

/// The kinds of VMM thread, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ThreadKind {
    /// The VMM's main thread: watchdog, teardown on exit, the report.
    Main = 1,
    /// A vCPU thread (and the device backend it calls).
    Vcpu = 2,
    /// The control socket's accept thread and its connection threads.
    Control = 3,
}

impl ThreadKind {
    /// Its name in verdicts.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "vmm-main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Control => "vmm-control",
        }
    }
}

/// How a VM run is sandboxed ([`crate::Vm::sandbox`]).
#[derive(Debug, Clone, Default)]
pub struct Sandbox {
    /// Install the per-thread seccomp filters.
    pub seccomp: bool,
    /// The counters service is reached over the network (PostgreSQL): main and
    /// control may create and connect sockets.
    pub network: bool,
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused the filter.
    #[error("seccomp filter for {kind}: {detail}")]
    Filter {
        /// Thread kind.
        kind: &'static str,
        /// What failed.
        detail: String,
    },
    /// Installing the SIGSYS handler failed.
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    /// Landlock failed (other than by being unavailable).
    #[error("landlock: {0}")]
    Landlock(String),
}

thread_local! {
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// Syscalls every kind needs: memory, futexes, time, signals, the VMM's own files.
const BASE: &[libc::c_long] = &[
    // Device backends on a vCPU thread wait on their transport (the fpga
    // backend's serial port, an OOB PTY) with poll.
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_ioctl,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    libc::SYS_getrandom,
    libc::SYS_sched_getaffinity,
    libc::SYS_rseq,
    // The device state file (atomic writes: O_EXCL temporary, fsync, rename) and
    // the alarm file.
    libc::SYS_openat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_fchmod,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
];

/// Main and control besides [`BASE`]: teardown (mincore), teardown records and the
/// counters database (SQLite), the report.
const MAIN: &[libc::c_long] = &[
    // abort() (e.g. a C++ backend's std::terminate at exit) resets SIGABRT.
    libc::SYS_rt_sigaction,
    libc::SYS_mincore,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_getcwd,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fallocate,
    libc::SYS_fchown,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_uname,
    libc::SYS_prlimit64,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_utimensat,
    // Teardown scrubs guest RAM on worker threads (main, or control when a
    // request tears down).
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_prctl,
];

/// The control thread besides [`MAIN`]: connections (accept, peer credentials,
/// timeouts), one thread per connection, patches (memfd, seals, dlopen).
const CONTROL: &[libc::c_long] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_prctl,
    libc::SYS_memfd_create,
    libc::SYS_rt_sigaction,
];

/// With a network counters service (PostgreSQL), main and control.
const NETWORK: &[libc::c_long] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_shutdown,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
];

/// The syscalls `kind` may make.
pub fn allowed(kind: ThreadKind, network: bool) -> Vec<libc::c_long> {
    let mut v: Vec<libc::c_long> = BASE.to_vec();
    if kind != ThreadKind::Vcpu {
        v.extend_from_slice(MAIN);
        if network {
            v.extend_from_slice(NETWORK);
        }
    }
    if kind == ThreadKind::Control {
        v.extend_from_slice(CONTROL);
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// The compiled filter of `kind`.
pub fn filter(kind: ThreadKind, network: bool) -> Result<BpfProgram, SeccompError> {
    let bad = |e: &dyn std::fmt::Display| SeccompError::Filter {
        kind: kind.name(),
        detail: e.to_string(),
    };
    let rules: BTreeMap<i64, Vec<SeccompRule>> = allowed(kind, network)
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| bad(&e))?;
    BpfProgram::try_from(f).map_err(|e| bad(&e))
}

/// Install `kind`'s filter on the calling thread (sets NoNewPrivs). The SIGSYS
/// handler is installed first (once per process).
pub fn install(kind: ThreadKind, network: bool) -> Result<(), SeccompError> {
    install_sigsys_handler()?;
    let prog = filter(kind, network)?;
    KIND.with(|k| k.set(kind as u8));
    seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Filter {
        kind: kind.name(),
        detail: e.to_string(),
    })
}

static HANDLER: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();

fn install_sigsys_handler() -> Result<(), SeccompError> {
    let r = HANDLER.get_or_init(|| {
        // SAFETY: a zeroed sigaction with our handler; the handler only calls
        // async-signal-safe functions (write, _exit).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = sigsys_handler as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
        }
        Ok(())
    });
    r.map_err(|e| SeccompError::Handler(std::io::Error::from_raw_os_error(e)))
}

/// Append `n` in decimal to `buf` at `at`; returns the new end.
fn put_num(buf: &mut [u8], mut at: usize, n: i64) -> usize {
    let mut digits = [0u8; 20];
    let mut v = n.unsigned_abs();
    let mut i = 0;
    loop {
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        i += 1;
        if v == 0 || i == digits.len() {
            break;
        }
    }
    if n < 0 && at < buf.len() {
        buf[at] = b'-';
        at += 1;
    }
    while i > 0 && at < buf.len() {
        i -= 1;
        buf[at] = digits[i];
        at += 1;
    }
    at
}

fn put(buf: &mut [u8], at: usize, s: &[u8]) -> usize {
    let n = s.len().min(buf.len() - at);
    buf[at..at + n].copy_from_slice(&s[..n]);
    at + n
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // siginfo for SIGSYS: si_call_addr at +16, si_syscall (int) at +24.
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers; the
        // SIGSYS layout puts si_syscall at offset 24 on x86-64.
        unsafe { *((info as *const u8).add(24) as *const i32) as i64 }
    };
    let kind = KIND.with(|k| k.get());
    let kind = match kind {
        1 => ThreadKind::Main.name(),
        2 => ThreadKind::Vcpu.name(),
        3 => ThreadKind::Control.name(),
        _ => "unknown",
    };
    let mut buf = [0u8; 256];
    let mut at = put(&mut buf, 0, b"hilrig-vmm: SECCOMP VIOLATION: thread kind ");
    at = put(&mut buf, at, kind.as_bytes());
    at = put(&mut buf, at, b" made forbidden syscall ");
    at = put_num(&mut buf, at, nr);
    at = put(&mut buf, at, b"; the VMM is killed (exit status ");
    at = put_num(&mut buf, at, SECCOMP_EXIT as i64);
    at = put(&mut buf, at, b")\n");
    // SAFETY: write and _exit are async-signal-safe and in every allow-list.
    unsafe {
        libc::write(2, buf.as_ptr() as *const libc::c_void, at);
        libc::_exit(SECCOMP_EXIT);
    }
}

/// Whether the guest-triggered seccomp probe ([`probe`]) is armed: tests only
/// (`HILRIG_VMM_SECCOMP_PROBE=1` in the VMM's environment).
pub static PROBE_ARMED: AtomicBool = AtomicBool::new(false);

/// The value a guest writes to the debug port (0xf5, 2 bytes) to fire the probe.
pub const PROBE_MAGIC: u16 = 0x5ecc;

/// The environment variable that arms the probe.
pub const PROBE_ENV: &str = "HILRIG_VMM_SECCOMP_PROBE";

/// Arm the probe if the environment says so.
pub fn arm_probe_from_env() {
    if std::env::var(PROBE_ENV).is_ok_and(|v| v == "1") {
        tracing::warn!("{PROBE_ENV}=1: the guest can make this VMM call a forbidden syscall");
        PROBE_ARMED.store(true, Ordering::Release);
    }
}

/// Test hook: what a compromised vCPU thread would do — open a network socket.
/// Under the vCPU filter this kills the VMM; without it, the socket is closed.
pub fn probe() {
    if !PROBE_ARMED.load(Ordering::Acquire) {
        return;
    }
    tracing::warn!("seccomp probe: the vCPU thread calls socket(2)");
    // SAFETY: socket(2) with constant arguments; the fd is closed at once.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd >= 0 {
            libc::close(fd);
        }
    }
}

/// Confine the calling thread and every thread it starts afterwards with landlock:
/// files may be created, written, truncated, renamed or removed only beneath
/// `dirs`, and nothing may be executed. Best effort: returns what the kernel
/// enforced ("full", "partial", "not enforced: ...").
pub fn landlock(dirs: &[PathBuf]) -> Result<String, SeccompError> {
    use landlock::{
        AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, ABI,
    };
    let abi = ABI::V3;
    let write = AccessFs::from_write(abi);
    let err = |e: &dyn std::fmt::Display| SeccompError::Landlock(e.to_string());
    let mut rs = Ruleset::default()
        .handle_access(write | AccessFs::Execute)
        .map_err(|e| err(&e))?
        .create()
        .map_err(|e| err(&e))?;
    for d in dirs {
        let fd = PathFd::new(d).map_err(|e| err(&format!("{}: {e}", d.display())))?;
        rs = rs
            .add_rule(PathBeneath::new(fd, write))
            .map_err(|e| err(&e))?;
    }
    let st = rs.restrict_self().map_err(|e| err(&e))?;
    Ok(match st.ruleset {
        RulesetStatus::FullyEnforced => "fully enforced".into(),
        RulesetStatus::PartiallyEnforced => "partially enforced".into(),
        RulesetStatus::NotEnforced => "not enforced (the kernel has no landlock)".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_and_forbids_the_dangerous_calls() {
        for kind in [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Control] {
            for net in [false, true] {
                filter(kind, net).unwrap();
                let a = allowed(kind, net);
                for nr in [
                    libc::SYS_execve,
                    libc::SYS_execveat,
                    libc::SYS_fork,
                    libc::SYS_vfork,
                    libc::SYS_ptrace,
                    libc::SYS_mount,
                    libc::SYS_setuid,
                    libc::SYS_init_module,
                    libc::SYS_bpf,
                    libc::SYS_unshare,
                ] {
                    assert!(!a.contains(&nr), "{kind:?} allows {nr}");
                }
                assert_eq!(
                    a.contains(&libc::SYS_socket),
                    net && kind != ThreadKind::Vcpu
                );
            }
        }
        assert!(!allowed(ThreadKind::Vcpu, true).contains(&libc::SYS_clone));
        // Main may start threads (teardown scrubs RAM in parallel) but never fork
        // or exec.
        for nr in [
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_execve,
            libc::SYS_execveat,
        ] {
            assert!(!allowed(ThreadKind::Main, false).contains(&nr), "{nr}");
        }
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        let mut b = [0u8; 32];
        let n = put_num(&mut b, 0, 41);
        assert_eq!(&b[..n], b"41");
        let n = put_num(&mut b, 0, -1);
        assert_eq!(&b[..n], b"-1");
    }
}
