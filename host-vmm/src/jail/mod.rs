//! The VMM's jail (issue 16 item 1; the model is Firecracker's jailer).
//!
//! `hilrig vm run --jail DIR` ([`enter`]), run as root, before the VM is created:
//!
//! 1. new mount, IPC, network and PID namespaces (`unshare`), then `fork`: the
//!    parent only waits and exits with the child's status (a SIGKILL of the parent
//!    kills the child: `PR_SET_PDEATHSIG`); the child is PID 1 of its namespace;
//! 2. a cgroup v2 group with `memory.max` and `pids.max` where the hierarchy is
//!    writable and has those controllers (otherwise skipped, with the reason in the
//!    run summary's `sandbox.notes`);
//! 3. a fresh tmpfs at `DIR/root` holding only `/dev/kvm`, `/dev/null`,
//!    `/dev/urandom`, a new `/proc`, and bind mounts of what the VMM needs at their
//!    own absolute paths: the files it writes in place (console, alarms: each file
//!    bound by itself, made by the launcher first, so a jailed VMM cannot create or
//!    change anything else in their directory, such as another VMM's console),
//!    the directories it writes in by creating and renaming (device state,
//!    teardown record, control socket, SQLite counters database: give each VMM
//!    its own, as the rig does) and the files it reads later (counters MAC key).
//!    The binds are id-mapped (host uid 0 is the jail's uid) so the unprivileged
//!    VMM owns what root owns outside and what it creates is root's outside; where
//!    the filesystem cannot id-map, a plain bind is used and noted;
//! 4. `pivot_root` into it (the old root detached), the root tmpfs remounted
//!    read-only;
//! 5. every fd inherited from the caller but 0, 1, 2 closed (the device backend,
//!    opened before the jail so that it may use tools and device nodes the jail
//!    lacks, keeps its own), the uid/gid dropped
//!    (default 65534 and the `kvm` group; no supplementary groups, no
//!    capabilities), NoNewPrivs.
//!
//! The payload, policy, keys and the device backend (with its measured VBIOS) are
//! opened before (as the caller); the VM is created and run jailed. The fork
//! leaves threads behind: a backend that runs a thread of its own (the simulated
//! FPGA board) does not work jailed.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;

static NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Record something the jail could not apply (and why); it goes into the run summary.
pub fn note(s: impl Into<String>) {
    let s = s.into();
    tracing::warn!("jail: {s}");
    NOTES.lock().unwrap_or_else(|p| p.into_inner()).push(s);
}

/// What the jail recorded so far.
pub fn notes() -> Vec<String> {
    NOTES.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The environment variable naming a file the VMM tries to open once set up
/// (jailed or not) and reports on standard error: a test hook showing what a
/// compromised VMM could reach.
pub const PROBE_ENV: &str = "HILRIG_VMM_JAIL_PROBE";

/// As [`PROBE_ENV`], for writing: the VMM opens the file named (created if
/// missing, appended to) and writes a line to it.
pub const PROBE_WRITE_ENV: &str = "HILRIG_VMM_JAIL_PROBE_WRITE";

/// Run the probes ([`PROBE_ENV`], [`PROBE_WRITE_ENV`]) if asked: each prints
/// `jail probe: open PATH: ok` (`write PATH`) or the error.
pub fn probe_from_env() {
    if let Some(p) = std::env::var_os(PROBE_ENV) {
        let path = PathBuf::from(p);
        match std::fs::File::open(&path) {
            Ok(_) => eprintln!("jail probe: open {}: ok", path.display()),
            Err(e) => eprintln!("jail probe: open {}: {e}", path.display()),
        }
    }
    if let Some(p) = std::env::var_os(PROBE_WRITE_ENV) {
        use std::io::Write;
        let path = PathBuf::from(p);
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"written by the jail probe\n"));
        match r {
            Ok(()) => eprintln!("jail probe: write {}: ok", path.display()),
            Err(e) => eprintln!("jail probe: write {}: {e}", path.display()),
        }
    }
}

/// The fds open in this process (from /proc/self/fd), but 0, 1 and 2.
pub fn open_fds() -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .filter(|&fd| fd > 2)
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    // The directory fd read_dir used is closed again by now: drop what is no longer
    // open.
    // SAFETY: fcntl(F_GETFD) only queries.
    v.retain(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0);
    v
}

/// Default uid of a jailed VMM (nobody).
pub const DEFAULT_UID: u32 = 65534;
/// Default memory limit of the jail's cgroup.
pub const DEFAULT_MEMORY_MAX: u64 = 4 << 30;
/// Default task limit of the jail's cgroup.
pub const DEFAULT_PIDS_MAX: u64 = 256;

/// Why the jail could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A step failed.
    #[error("jail {dir}: {what}: {source}")]
    Step {
        /// The jail directory.
        dir: PathBuf,
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The jail cannot be used as asked.
    #[error("jail {dir}: {reason}")]
    Refused {
        /// The jail directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
}

/// What to jail the VMM with.
#[derive(Debug, Clone)]
pub struct JailSpec {
    /// The jail directory (the root is `DIR/root`).
    pub dir: PathBuf,
    /// uid to run as.
    pub uid: u32,
    /// gid to run as.
    pub gid: u32,
    /// Directories the VMM writes in by creating or renaming files (bound
    /// read-write), absolute.
    pub rw_dirs: Vec<PathBuf>,
    /// Files the VMM writes in place (console, alarms): each bound read-write by
    /// itself (not its directory), absolute; they must exist (the launcher makes
    /// them). A symlink is bound as it is, never followed.
    pub rw_files: Vec<PathBuf>,
    /// Files the VMM reads after the jail is entered (bound read-only), absolute.
    pub ro_files: Vec<PathBuf>,
    /// Directories the VMM reads after the jail is entered (bound read-only),
    /// absolute: the `--patch-source` directory its poller lists and reads.
    pub ro_dirs: Vec<PathBuf>,
    /// The fds inherited from the caller ([`open_fds`] at start): closed in the
    /// jail. Fds opened since (the device backend's) stay.
    pub close_fds: Vec<i32>,
    /// cgroup memory.max.
    pub memory_max: u64,
    /// cgroup pids.max.
    pub pids_max: u64,
}

/// Which side of the fork returned.
#[derive(Debug)]
pub enum Entered {
    /// The caller's process: the jailed VMM has ended with this status.
    Parent(ExitCode),
    /// The jailed process: go on setting up and running the VM.
    Child,
}

/// The gid of the `kvm` group, if there is one.
pub fn kvm_gid() -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == "kvm").then_some(())?;
        f.next()?;
        f.next()?.parse().ok()
    })
}

fn cstr(p: &Path) -> std::io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other)
}

fn check(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn check_long(r: libc::c_long) -> std::io::Result<libc::c_long> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn mount(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> std::io::Result<()> {
    let c = |s: Option<&str>| s.map(|s| CString::new(s).map_err(std::io::Error::other));
    let src = c(src).transpose()?;
    let fstype = c(fstype).transpose()?;
    let data = c(data).transpose()?;
    let t = cstr(target)?;
    let p = |o: &Option<CString>| o.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: valid NUL-terminated strings or NULL.
    check(unsafe {
        libc::mount(
            p(&src),
            t.as_ptr(),
            p(&fstype),
            flags,
            p(&data) as *const libc::c_void,
        )
    })
    .map(|_| ())
}

/// A user namespace whose uid/gid maps put host id 0 at `uid`/`gid`: used to
/// id-map the bind mounts. Made by a helper child that waits until the namespace
/// file is open.
fn idmap_userns(uid: u32, gid: u32) -> std::io::Result<OwnedFd> {
    let mut ready = [0; 2];
    let mut done = [0; 2];
    // SAFETY: pipe2 on arrays of two fds.
    check(unsafe { libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: as above.
    check(unsafe { libc::pipe2(done.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: the process is single-threaded here; the child only makes
    // async-signal-safe calls and _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: async-signal-safe calls only.
        unsafe {
            // Only the parent may hold the write end of `done`, or EOF never comes.
            libc::close(done[1]);
            libc::close(ready[0]);
            let ok: u8 = (libc::unshare(libc::CLONE_NEWUSER) == 0) as u8;
            libc::write(ready[1], &ok as *const u8 as *const libc::c_void, 1);
            let mut b = 0u8;
            libc::read(done[0], &mut b as *mut u8 as *mut libc::c_void, 1);
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copies of the child's ends.
    unsafe {
        libc::close(ready[1]);
        libc::close(done[0]);
    }
    let result = (|| {
        check(pid)?;
        let mut ok = 0u8;
        // SAFETY: reading one byte into a valid buffer.
        let n = unsafe { libc::read(ready[0], &mut ok as *mut u8 as *mut libc::c_void, 1) };
        if n != 1 || ok != 1 {
            return Err(std::io::Error::other(
                "the helper could not create a user namespace",
            ));
        }
        std::fs::write(format!("/proc/{pid}/uid_map"), format!("0 {uid} 1\n"))?;
        std::fs::write(format!("/proc/{pid}/gid_map"), format!("0 {gid} 1\n"))?;
        let f = std::fs::File::open(format!("/proc/{pid}/ns/user"))?;
        Ok(OwnedFd::from(f))
    })();
    // SAFETY: closing our ends lets the helper exit; we reap it.
    unsafe {
        libc::close(ready[0]);
        libc::close(done[1]);
        if pid > 0 {
            let mut st = 0;
            libc::waitpid(pid, &mut st, 0);
        }
    }
    result
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// Bind `src` (not the mounts below it: a jail root inside a bound directory
/// does not reappear in the jail) at `target`, id-mapped through `userns` when given; read-only if `ro`.
/// With `nofollow` a symlink at `src` is bound itself, not where it leads.
fn bind(
    src: &Path,
    target: &Path,
    ro: bool,
    nofollow: bool,
    userns: Option<&OwnedFd>,
) -> std::io::Result<()> {
    let s = cstr(src)?;
    let nofollow = if nofollow {
        libc::AT_SYMLINK_NOFOLLOW as libc::c_uint
    } else {
        0
    };
    // SAFETY: open_tree with a valid path; the returned fd is owned below.
    let fd = check_long(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            s.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | nofollow,
        )
    })?;
    // SAFETY: a fresh fd nobody else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let mut attr = MountAttr {
        attr_set: MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | if ro { MOUNT_ATTR_RDONLY } else { 0 },
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    if let Some(ns) = userns {
        attr.attr_set |= MOUNT_ATTR_IDMAP;
        attr.userns_fd = ns.as_raw_fd() as u64;
    }
    let empty = c"";
    // SAFETY: mount_setattr on our detached tree with a valid attr struct.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &mut attr as *mut MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    let t = cstr(target)?;
    // SAFETY: move_mount of our detached tree onto a valid path.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })?;
    Ok(())
}

/// Under `root`, the path `abs` (absolute) maps to.
fn inside(root: &Path, abs: &Path) -> PathBuf {
    root.join(abs.strip_prefix("/").unwrap_or(abs))
}

/// The cgroup v2 hierarchy, if mounted (pure v2 or the hybrid `unified` mount).
fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, at, ty) = (f.next()?, f.next()?, f.next()?);
        (ty == "cgroup2").then(|| PathBuf::from(at))
    })
}

/// Put this process into a new cgroup v2 group with memory and task limits; the
/// group's path is returned (for removal) or why it was skipped is noted.
fn cgroup(spec: &JailSpec, id: &str) -> Option<PathBuf> {
    let Some(root) = cgroup2_root() else {
        note("cgroup limits not applied: no cgroup v2 hierarchy is mounted");
        return None;
    };
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let have: Vec<&str> = controllers.split_whitespace().collect();
    if !(have.contains(&"memory") && have.contains(&"pids")) {
        note(format!(
            "cgroup limits not applied: the cgroup v2 hierarchy at {} has no memory/pids controllers (it has: {})",
            root.display(),
            if have.is_empty() { "none".to_string() } else { have.join(" ") }
        ));
        return None;
    }
    let dir = root.join(format!("hilrig-vmm-{id}"));
    let r = (|| -> std::io::Result<()> {
        std::fs::write(root.join("cgroup.subtree_control"), "+memory +pids")?;
        std::fs::create_dir(&dir)?;
        std::fs::write(dir.join("memory.max"), spec.memory_max.to_string())?;
        std::fs::write(dir.join("pids.max"), spec.pids_max.to_string())?;
        std::fs::write(dir.join("cgroup.procs"), "0")?;
        Ok(())
    })();
    match r {
        Ok(()) => Some(dir),
        Err(e) => {
            note(format!(
                "cgroup limits not applied: {} is not writable: {e}",
                root.display()
            ));
            let _ = std::fs::remove_dir(&dir);
            None
        }
    }
}

/// Jail the calling process as `spec` says (see the module doc). Call it while the
/// process is single-threaded. Returns [`Entered::Child`] in the jailed process and
/// [`Entered::Parent`] with the child's status in the caller.
pub fn enter(spec: &JailSpec) -> Result<Entered, JailError> {
    let dir = spec.dir.clone();
    let step = |what: &str| {
        let dir = dir.clone();
        let what = what.to_string();
        move |source| JailError::Step { dir, what, source }
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::Refused {
            dir,
            reason: "--jail needs root (it mounts, pivots and drops to an unprivileged uid)".into(),
        });
    }
    hilrig_device::secure::ensure_private_dir(&spec.dir).map_err(|e| JailError::Refused {
        dir: dir.clone(),
        reason: e.to_string(),
    })?;
    let root = spec.dir.join("root");
    match std::fs::symlink_metadata(&root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(JailError::Refused {
                dir,
                reason: format!("{} exists and is not a directory", root.display()),
            })
        }
        Err(_) => std::fs::create_dir(&root).map_err(step("creating the root mount point"))?,
    }
    let userns = match idmap_userns(spec.uid, spec.gid) {
        Ok(fd) => Some(fd),
        Err(e) => {
            note(format!("bind mounts not id-mapped: {e}"));
            None
        }
    };
    // The child is PID 1 of a new PID namespace; it makes its own mount, IPC and
    // network namespaces (so the pivot never moves the waiting parent's root).
    // SAFETY: unshare with a namespace flag only.
    check(unsafe { libc::unshare(libc::CLONE_NEWPID) }).map_err(step("unshare(pid)"))?;
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: single-threaded (the caller's contract); the child goes on in Rust.
    let pid = check(unsafe { libc::fork() }).map_err(step("fork"))?;
    if pid > 0 {
        drop(userns);
        let mut st = 0;
        loop {
            // SAFETY: waiting for our child.
            let r = unsafe { libc::waitpid(pid, &mut st, 0) };
            if r == pid {
                break;
            }
            if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return Err(step("waiting for the jailed VMM")(
                    std::io::Error::last_os_error(),
                ));
            }
        }
        let code = if libc::WIFEXITED(st) {
            libc::WEXITSTATUS(st) as u8
        } else if libc::WIFSIGNALED(st) {
            let sig = libc::WTERMSIG(st);
            eprintln!("hilrig-vmm: the jailed VMM was killed by signal {sig}");
            (128 + sig).min(255) as u8
        } else {
            8
        };
        if let Some(cg) = cgroup2_root() {
            let _ = std::fs::remove_dir(cg.join(format!("hilrig-vmm-{pid}")));
        }
        return Ok(Entered::Parent(ExitCode::from(code)));
    }
    // The jailed child.
    // SAFETY: prctl has no memory preconditions. (No getppid() check for a parent
    // that died first: it is 0 in a new PID namespace.)
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    // SAFETY: unshare with namespace flags only.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWNET) })
        .map_err(step("unshare(mount, ipc, net)"))?;
    let id = parent_child_id(parent);
    let _cg = cgroup(spec, &id);
    build_root(spec, &root, userns.as_ref()).map_err(step("building the root"))?;
    drop(userns);
    pivot(&root).map_err(step("pivot_root"))?;
    drop_privileges(spec).map_err(step("dropping privileges"))?;
    Ok(Entered::Child)
}

/// A name for the child's cgroup that the parent can find: the child's pid in the
/// parent's namespace, read from /proc/self/status (NSpid) before the new /proc.
fn parent_child_id(parent: libc::pid_t) -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("NSpid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_else(|| format!("child-of-{parent}"))
}

fn build_root(spec: &JailSpec, root: &Path, userns: Option<&OwnedFd>) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    // Nothing we mount propagates back out.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    mount(
        Some("hilrig-jail"),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID,
        Some("mode=0755,size=16m"),
    )?;
    let mkdirs = |p: &Path| {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(p)
    };
    mkdirs(&root.join("dev"))?;
    mkdirs(&root.join("proc"))?;
    mkdirs(&root.join("tmp"))?;
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    for (name, major, minor, mode, group_only) in [
        ("kvm", 10u32, 232u32, 0o660, true),
        ("null", 1, 3, 0o666, false),
        ("urandom", 1, 9, 0o666, false),
        ("zero", 1, 5, 0o666, false),
    ] {
        let p = cstr(&root.join("dev").join(name))?;
        // SAFETY: mknod/chown/chmod on a path we just made under our tmpfs.
        unsafe {
            check(libc::mknod(
                p.as_ptr(),
                libc::S_IFCHR | mode,
                libc::makedev(major, minor),
            ))?;
            check(libc::chmod(p.as_ptr(), mode))?;
            if group_only {
                check(libc::chown(p.as_ptr(), 0, spec.gid))?;
            }
        }
    }
    // Directories, shortest first (a nested one lands inside its parent's bind,
    // where it already exists): [`bind_plan`].
    let plan = bind_plan(&spec.rw_dirs, &spec.ro_dirs);
    for (d, ro) in &plan {
        let t = inside(root, d);
        mkdirs(&t)?;
        bind_or_plain(d, &t, *ro, false, userns)?;
    }
    // Files, each by itself: a writable one unless a writable directory bind
    // already shows it, a read-only one unless any directory bind does.
    for (files, ro) in [(&spec.rw_files, false), (&spec.ro_files, true)] {
        for f in files {
            if !plan
                .iter()
                .any(|(d, d_ro)| f.starts_with(d) && (ro || !d_ro))
            {
                bind_file(f, root, ro, userns)?;
            }
        }
    }
    mount(
        Some("proc"),
        &root.join("proc"),
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    Ok(())
}

/// Bind the file `f` (absolute) at its own path under `root`: an empty file made
/// there as the mount point (in the jail's tmpfs, or already there in a directory
/// bind), then `f` bound onto it. A writable file's symlink is bound as it is, not
/// followed.
fn bind_file(f: &Path, root: &Path, ro: bool, userns: Option<&OwnedFd>) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let t = inside(root, f);
    if let Some(p) = t.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(p)?;
    }
    if std::fs::symlink_metadata(&t).is_err() {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&t)?;
    }
    bind_or_plain(f, &t, ro, !ro, userns)
}

/// The directory binds of a jail, in order: every directory (read-only or not),
/// shortest path first, so a nested one lands inside its parent's bind. A
/// directory already visible through an earlier bind is left out, unless it must
/// be writable and that bind is read-only (a writable directory under the
/// read-only patch source still gets its own read-write bind, on top).
fn bind_plan(rw: &[PathBuf], ro: &[PathBuf]) -> Vec<(PathBuf, bool)> {
    let mut all: Vec<(PathBuf, bool)> = rw
        .iter()
        .map(|d| (d.clone(), false))
        .chain(ro.iter().map(|d| (d.clone(), true)))
        .collect();
    // Shortest first; at equal paths the writable one first (it serves both).
    all.sort_by(|a, b| {
        (a.0.components().count(), &a.0, a.1).cmp(&(b.0.components().count(), &b.0, b.1))
    });
    let mut plan: Vec<(PathBuf, bool)> = Vec::new();
    for (d, ro) in all {
        let covered = plan
            .iter()
            .any(|(b, b_ro)| d.starts_with(b) && (ro || !b_ro));
        if !covered {
            plan.push((d, ro));
        }
    }
    plan
}

fn bind_or_plain(
    src: &Path,
    t: &Path,
    ro: bool,
    nofollow: bool,
    userns: Option<&OwnedFd>,
) -> std::io::Result<()> {
    match bind(src, t, ro, nofollow, userns) {
        Ok(()) => Ok(()),
        Err(e) if userns.is_some() => {
            note(format!(
                "{} bound without id-mapping ({e}): the jailed uid needs access to it",
                src.display()
            ));
            bind(src, t, ro, nofollow, None)
        }
        Err(e) => Err(e),
    }
}

fn pivot(root: &Path) -> std::io::Result<()> {
    std::env::set_current_dir(root)?;
    let dot = c".";
    // SAFETY: pivot_root(".", ".") then detach the old root stacked on top.
    unsafe {
        check_long(libc::syscall(
            libc::SYS_pivot_root,
            dot.as_ptr(),
            dot.as_ptr(),
        ))?;
        check(libc::umount2(dot.as_ptr(), libc::MNT_DETACH))?;
    }
    std::env::set_current_dir("/")?;
    // The root itself read-only (its /tmp too); the binds keep their own modes.
    if let Err(e) = mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID,
        None,
    ) {
        note(format!("the jail root stays writable: {e}"));
    }
    Ok(())
}

/// The uid that launched a jailed VMM (before it dropped to the jail's uid);
/// `u32::MAX` when not jailed.
static LAUNCHER_UID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);

/// Who may use this VMM's control socket besides root: the uid that launched it
/// (a jailed VMM's own uid is shared by every jail and by other unprivileged
/// processes, so it must not count), or the current uid when not jailed.
pub fn control_owner() -> u32 {
    match LAUNCHER_UID.load(std::sync::atomic::Ordering::Acquire) {
        // SAFETY: geteuid has no preconditions.
        u32::MAX => unsafe { libc::geteuid() },
        uid => uid,
    }
}

fn drop_privileges(spec: &JailSpec) -> std::io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    LAUNCHER_UID.store(
        unsafe { libc::geteuid() },
        std::sync::atomic::Ordering::Release,
    );
    // SAFETY: plain system calls on ids and fds; nothing borrowed.
    unsafe {
        // Every inherited fd but standard input, output and error.
        for &fd in &spec.close_fds {
            if fd > 2 {
                libc::close(fd);
            }
        }
        let groups = [spec.gid];
        check(libc::setgroups(1, groups.as_ptr()))?;
        check(libc::setresgid(spec.gid, spec.gid, spec.gid))?;
        check(libc::setresuid(spec.uid, spec.uid, spec.uid))?;
        // The id change cleared the parent-death signal: set it again, so killing
        // the waiting parent (a power cut) kills the VMM at once.
        check(libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        // The kernel cleared the capabilities with the uid change; check.
        let mut hdr = [0x2008_0522u32, 0];
        let mut data = [0u32; 6];
        if libc::syscall(libc::SYS_capget, hdr.as_mut_ptr(), data.as_mut_ptr()) == 0
            && data.iter().any(|&c| c != 0)
        {
            return Err(std::io::Error::other(
                "capabilities survived the uid change",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_go_shortest_first_and_a_writable_dir_under_a_read_only_one_keeps_its_own() {
        let p = |s: &str| PathBuf::from(s);
        let plan = bind_plan(
            &[
                p("/w/out/dev"),
                p("/w/out"),
                p("/src/bundles/logs"),
                p("/w/out"),
            ],
            &[p("/src/bundles"), p("/w/out/ro"), p("/w/out")],
        );
        assert_eq!(
            plan,
            vec![
                (p("/src/bundles"), true),
                (p("/w/out"), false),
                (p("/src/bundles/logs"), false),
            ]
        );
    }

    #[test]
    fn paths_map_under_the_root() {
        assert_eq!(
            inside(Path::new("/j/root"), Path::new("/var/lib/x")),
            PathBuf::from("/j/root/var/lib/x")
        );
    }
}
