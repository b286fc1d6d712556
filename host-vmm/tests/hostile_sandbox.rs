//! The VMM's confinement (issue 16 items 1 and 2): seccomp filters per thread kind,
//! NoNewPrivs, landlock, and the jail. Each test boots the `hilrig-vmm` binary and
//! skips loudly without /dev/kvm (or root, for the jail): `skip::runnable`, which
//! fails instead in CI.

#[path = "../../device/tests/common/pty.rs"]
mod pty;
#[path = "common/record.rs"]
mod record;
#[path = "common/skip.rs"]
mod skip;
use hilrig_vmm::payload::Payload;
use iced_x86::code_asm::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_hilrig-vmm");

/// A guest that writes the seccomp probe's magic to the debug port (the vCPU thread
/// then calls socket(2) when the probe is armed), prints and passes.
fn probe_payload(dir: &Path) -> String {
    let mut p = Payload::new().unwrap();
    p.park_secondaries().unwrap();
    p.a.mov(dx, 0xf5u32).unwrap();
    p.a.mov(ax, u32::from(hilrig_vmm::seccomp::PROBE_MAGIC))
        .unwrap();
    p.a.out(dx, ax).unwrap();
    p.print("survived the probe\n").unwrap();
    p.report(0).unwrap();
    let path = dir.join("probe.bin");
    std::fs::write(&path, p.build().unwrap()).unwrap();
    path.to_string_lossy().into_owned()
}

fn run(args: &[&str], probe: bool) -> (i32, String, String) {
    let mut c = Command::new(VMM);
    c.args(args);
    if probe {
        c.env(hilrig_vmm::seccomp::PROBE_ENV, "1");
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_forbidden_syscall_from_a_vcpu_thread_kills_the_vmm() {
    // Attack: code running on a vCPU thread (a guest escape) opens a socket.
    if !skip::runnable(
        "a_forbidden_syscall_from_a_vcpu_thread_kills_the_vmm",
        false,
    ) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let payload = probe_payload(d.path());
    let (code, out, err) = run(&["--payload", &payload], true);
    assert_eq!(code, 11, "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains("SECCOMP VIOLATION: thread kind vcpu made forbidden syscall 41"),
        "{err}"
    );
    assert!(!out.contains("survived the probe"), "{out}");
    assert_eq!(
        hilrig_vmm::api::ExitStatus::from_code(code),
        Some(hilrig_vmm::api::ExitStatus::SeccompViolation)
    );
    // Negative control: the same guest and probe with the filters off survives,
    // and the summary says the filters were off.
    let (code, out, err) = run(&["--payload", &payload, "--seccomp", "off", "--json"], true);
    assert_eq!(code, 0, "{err}");
    let s = hilrig_vmm::api::RunSummary::from_output(out.as_bytes()).unwrap();
    let sb = s.sandbox.unwrap();
    assert!(!sb.seccomp, "{sb:?}");
    assert!(err.contains("survived the probe"), "{err}");
    // Filters on, probe not armed: the guest's write is only a debug write.
    let (code, _, err) = run(&["--payload", &payload], false);
    assert_eq!(code, 0, "{err}");
}

fn status_of(pid: u32, task: &str) -> Option<(String, String)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{task}/status")).ok()?;
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .map(|l| l[k.len()..].trim().to_string())
            .unwrap_or_default()
    };
    Some((field("Seccomp:"), field("NoNewPrivs:")))
}

#[test]
fn a_running_vmm_shows_seccomp_2_and_no_new_privs_on_every_thread() {
    if !skip::runnable(
        "a_running_vmm_shows_seccomp_2_and_no_new_privs_on_every_thread",
        false,
    ) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("vmm.sock");
    // A pull-mode patch source and a `[breach]` table: their watcher threads start
    // before the main thread's filter and must install their own.
    let policy = d.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "{}\n[breach]\naction = \"teardown\"\n[[breach.alarms]]\nregister = \"HANG_TRIGGER\"\ncount = 3\nwithin = \"30s\"\n",
            hilrig_vmm::policy::default_policy_toml()
        ),
    )
    .unwrap();
    let bundles = d.path().join("bundles");
    std::fs::create_dir(&bundles).unwrap();
    let authority = d.path().join("authority.pub");
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    hilrig_fw::keys::write_key(
        &authority,
        hilrig_fw::keys::KeyKind::SignPublic,
        key.verifying_key().as_bytes(),
    )
    .unwrap();
    let mut child = Command::new(VMM)
        .args(["--payload", "spin", "--vcpus", "2", "--timeout", "30s"])
        .arg("--policy")
        .arg(&policy)
        .args(["--profile", "tenant"])
        .arg("--patch-source")
        .arg(&bundles)
        .arg("--patch-pubkey")
        .arg(&authority)
        .args(record::args(d.path(), "applied"))
        .arg("--control")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Wait (not a timing assertion) until the main thread has its filter.
    let t = Instant::now();
    let mut main = None;
    while t.elapsed() < Duration::from_secs(20) {
        main = status_of(pid, &pid.to_string());
        if main.as_ref().is_some_and(|m| m.0 == "2") && sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every thread installs its own filter as it starts (a vCPU thread first
    // thing, before its first KVM_RUN): wait (bounded, not a timing assertion)
    // until each has, then look; a thread that never does still shows 0.
    type Statuses = Vec<(String, Option<(String, String)>)>;
    let snapshot = || -> (Vec<String>, Statuses) {
        let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let statuses = tasks
            .iter()
            .map(|t| {
                let name = std::fs::read_to_string(format!("/proc/{pid}/task/{t}/comm"))
                    .unwrap_or_default();
                (format!("{t} ({})", name.trim()), status_of(pid, t))
            })
            .collect();
        (tasks, statuses)
    };
    let t = Instant::now();
    let (mut tasks, mut statuses) = snapshot();
    while t.elapsed() < Duration::from_secs(10)
        && statuses
            .iter()
            .any(|(_, s)| s.as_ref().is_some_and(|s| s.0 != "2"))
    {
        std::thread::sleep(Duration::from_millis(20));
        (tasks, statuses) = snapshot();
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        main,
        Some(("2".to_string(), "1".to_string())),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // main, the control thread, two vCPUs, the patch source and the breach watcher.
    assert!(tasks.len() >= 6, "{tasks:?}");
    for (t, s) in statuses {
        if let Some(s) = s {
            assert_eq!(s, ("2".to_string(), "1".to_string()), "task {t}");
        }
    }
}

#[test]
fn a_jailed_vmm_runs_unprivileged_and_cannot_open_files_outside_its_root() {
    // Attack: a compromised VMM reads host secrets (here a root-only file next to
    // the VMM's own work directory, and /etc/shadow).
    if !skip::runnable(
        "a_jailed_vmm_runs_unprivileged_and_cannot_open_files_outside_its_root",
        true,
    ) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let work = d.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let secret = d.path().join("secret.key");
    std::fs::write(&secret, "host secret").unwrap();
    let args_for = |jail: bool| {
        let mut a: Vec<String> = vec![
            "--payload".into(),
            "pci-enum".into(),
            "--json".into(),
            "--device-state".into(),
            work.join("dev.state").to_string_lossy().into_owned(),
            "--console".into(),
            work.join("console.txt").to_string_lossy().into_owned(),
            "--teardown-record".into(),
            work.join("teardown.json").to_string_lossy().into_owned(),
        ];
        if jail {
            a.push("--jail".into());
            a.push(d.path().join("jail").to_string_lossy().into_owned());
        }
        a
    };
    for (path, jail) in [
        (secret.clone(), true),
        (PathBuf::from("/etc/shadow"), true),
        (secret.clone(), false),
    ] {
        let out = Command::new(VMM)
            .args(args_for(jail))
            .env(hilrig_vmm::jail::PROBE_ENV, &path)
            .output()
            .unwrap();
        let (_, line) = jail_probe_line(&out);
        if jail {
            assert!(line.contains("No such file or directory"), "{line}");
            let s = hilrig_vmm::api::RunSummary::from_output(&out.stdout).unwrap();
            let sb = s.sandbox.unwrap();
            assert_eq!((sb.uid, sb.seccomp), (65534, true), "{sb:?}");
            assert!(sb.jail.is_some(), "{sb:?}");
            // What the jailed VMM wrote is in the work directory, owned by root
            // (id-mapped), and the teardown ran.
            assert!(s.teardown.is_some_and(|t| t.complete));
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(work.join("teardown.json")).unwrap();
            assert_eq!(m.uid(), 0);
        } else {
            // Negative control: without the jail the same probe reads the file.
            assert!(line.ends_with(": ok"), "{line}");
        }
    }
}

/// A VMM run that exited 0: its stderr and the jail probe's line in it.
fn jail_probe_line(out: &std::process::Output) -> (String, String) {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("jail probe: "))
        .unwrap_or_else(|| panic!("no probe line: {err}"))
        .to_string();
    (err, line)
}

/// A jailed VMM's pull-mode patch source is bound read-only into its jail: its
/// poller can list and read the bundles dropped there (before, the directory did not
/// exist inside the jail and the poller, seeing nothing, applied nothing, silently).
/// The jail probe opens a bundle in it as the jailed VMM; the negative control is
/// the same file in a sibling directory the VMM was not given.
#[test]
fn a_jailed_vmm_can_read_its_patch_source_and_nothing_beside_it() {
    if !skip::runnable(
        "a_jailed_vmm_can_read_its_patch_source_and_nothing_beside_it",
        true,
    ) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let work = d.path().join("work");
    let bundles = d.path().join("bundles");
    let beside = d.path().join("beside");
    for dir in [&work, &bundles, &beside] {
        std::fs::create_dir(dir).unwrap();
    }
    std::fs::write(bundles.join("next.bundle"), b"not checked by the probe").unwrap();
    std::fs::write(beside.join("next.bundle"), b"not given to the VMM").unwrap();
    let authority = d.path().join("authority.pub");
    let key = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
    hilrig_fw::keys::write_key(
        &authority,
        hilrig_fw::keys::KeyKind::SignPublic,
        key.verifying_key().as_bytes(),
    )
    .unwrap();
    for (probe, readable) in [
        (bundles.join("next.bundle"), true),
        (beside.join("next.bundle"), false),
    ] {
        let out = Command::new(VMM)
            .args(["--payload", "pci-enum", "--json"])
            .arg("--device-state")
            .arg(work.join("dev.state"))
            .arg("--patch-source")
            .arg(&bundles)
            .arg("--patch-pubkey")
            .arg(&authority)
            .args(record::args(&work, &format!("applied-{readable}")))
            .arg("--jail")
            .arg(d.path().join("jail"))
            .env(hilrig_vmm::jail::PROBE_ENV, &probe)
            .output()
            .unwrap();
        let (err, line) = jail_probe_line(&out);
        if readable {
            assert!(line.ends_with(": ok"), "{line}");
            assert!(
                !err.contains("patch source: cannot list"),
                "the poller could not list its directory: {err}"
            );
        } else {
            assert!(line.contains("No such file or directory"), "{line}");
        }
    }
}

/// Send one JSON line to the control socket at `sock` as `uid` and return the
/// reply line. No interpreter needed: the child of the fork connects once it
/// runs as `uid` (`pre_exec` runs after std's setgid/setuid), writes the reply
/// to its standard output and then execs `/bin/sh -c :`.
fn request_as(uid: u32, sock: &Path, line: &str) -> String {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::CommandExt;
    let sock = sock.to_path_buf();
    let msg = format!("{line}\n").into_bytes();
    let mut c = Command::new("/bin/sh");
    c.args(["-c", ":"]).uid(uid).gid(uid);
    // SAFETY: between fork and exec the closure only makes system calls
    // (socket, connect, write, read) on buffers made before the fork, and
    // allocates nothing.
    unsafe {
        c.pre_exec(move || {
            let say = |b: &[u8]| {
                libc::write(1, b.as_ptr().cast(), b.len());
            };
            let Ok(mut s) = UnixStream::connect(&sock) else {
                say(b"connect: refused\n");
                return Ok(());
            };
            if s.write_all(&msg).is_err() {
                say(b"write: failed\n");
                return Ok(());
            }
            let mut buf = [0u8; 4096];
            let mut n = 0;
            while n < buf.len() {
                match s.read(&mut buf[n..]) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => {
                        n += k;
                        if buf[..n].contains(&b'\n') {
                            break;
                        }
                    }
                }
            }
            say(&buf[..n]);
            Ok(())
        });
    }
    let out = c.output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn another_process_running_as_the_jail_uid_cannot_use_a_jailed_vmms_control_socket() {
    // Attack: every jailed VMM runs as uid 65534 (nobody), as do other unprivileged
    // processes and every other jail. Where the socket is reachable as that uid (a
    // directory shared by two jails' id-mapped binds, or a plain bind where the
    // filesystem cannot id-map: simulated here by handing the socket file to 65534),
    // such a process passed the peer check (the VMM's own uid) and could tear down,
    // pause or detach another tenant's VM.
    if !skip::runnable(
        "another_process_running_as_the_jail_uid_cannot_use_a_jailed_vmms_control_socket",
        true,
    ) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let work = d.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = work.join("vm.sock");
    let mut child = Command::new(VMM)
        .args(["--payload", "spin", "--timeout", "30s", "--control"])
        .arg(&sock)
        .arg("--jail")
        .arg(d.path().join("jail"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(sock.exists(), "the jailed VMM never bound its socket");
    std::os::unix::fs::chown(&sock, Some(65534), Some(65534)).unwrap();
    let reply = request_as(65534, &sock, r#"{"op":"teardown"}"#);
    // Negative control: root (the launcher) is answered, and ends the run.
    let root = request_as(0, &sock, r#"{"op":"teardown"}"#);
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(
        reply.contains("permission denied: uid 65534"),
        "{reply}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(root.contains(r#""ok":true,"op":"teardown""#), "{root}");
}

#[test]
fn a_jailed_vmm_cannot_create_or_change_files_beside_its_console_and_alarms() {
    // Attack: two VMMs keep their consoles and alarm logs in one directory. The
    // jail bound that directory read-write into each, so a compromised jailed VMM
    // could rewrite the other's console (erase what its guest did) or plant files
    // there. Now only its own two files are bound. The write probe runs as the
    // jailed VMM once the jail is set up.
    if !skip::runnable(
        "a_jailed_vmm_cannot_create_or_change_files_beside_its_console_and_alarms",
        true,
    ) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let work = d.path().join("work");
    let logs = d.path().join("logs");
    for dir in [&work, &logs] {
        std::fs::create_dir(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let others = logs.join("other-vm.console");
    std::fs::write(&others, "the other VM's console\n").unwrap();
    std::fs::set_permissions(&others, std::fs::Permissions::from_mode(0o600)).unwrap();
    let console = logs.join("vm.console");
    let alarms = logs.join("vm.alarms");
    let planted = logs.join("planted");
    for (probe, allowed) in [
        (others.clone(), false),
        (planted.clone(), false),
        (console.clone(), true),
        (alarms.clone(), true),
    ] {
        let out = Command::new(VMM)
            .args(["--payload", "hello", "--json"])
            .arg("--device-state")
            .arg(work.join("dev.state"))
            .arg("--console")
            .arg(&console)
            .arg("--alarms")
            .arg(&alarms)
            .arg("--jail")
            .arg(d.path().join("jail"))
            .env(hilrig_vmm::jail::PROBE_WRITE_ENV, &probe)
            .output()
            .unwrap();
        let (err, line) = jail_probe_line(&out);
        if allowed {
            // Negative control: its own files are writable in the jail.
            assert!(line.ends_with(": ok"), "{line}");
        } else {
            assert!(!line.ends_with(": ok"), "{line}\n{err}");
        }
        // The VMM's own console was written (after the probe), whatever the probe.
        let own = std::fs::read_to_string(&console).unwrap();
        assert!(!own.is_empty() && !own.contains("jail probe"), "{own}");
    }
    assert_eq!(
        std::fs::read_to_string(&others).unwrap(),
        "the other VM's console\n"
    );
    assert!(!planted.exists());
}

#[test]
fn a_terminal_console_for_a_jailed_vmm_is_refused_saying_why() {
    // A terminal is not reachable inside the jail (no device nodes there): the
    // launcher says so at start, rather than blaming the terminal's owner or
    // binding a link whose target the jail cannot see.
    if !skip::runnable(
        "a_terminal_console_for_a_jailed_vmm_is_refused_saying_why",
        true,
    ) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (_controller, tty) = pty::pty();
    let out = Command::new(VMM)
        .args(["--payload", "hello"])
        .arg("--console")
        .arg(&tty)
        .arg("--jail")
        .arg(d.path().join("jail"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("a terminal cannot be a jailed VMM's console"),
        "{err}"
    );
}
