//! `hilrig bench lab-scale`: campaign scale-out over PostgreSQL — cases/min of one
//! runner process vs three runner processes sharing one run (`campaign run
//! --join`), each runner with one simulated host, against one PostgreSQL server, in
//! the same bench run. PostgreSQL: `HILRIG_TEST_PG`, else `scripts/pg-start` (from
//! the source tree, stopped afterwards).

use crate::figure::Figure;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// The campaign both configurations run: short single-step cases on the model.
const CAMPAIGN: &str = r#"
name = "lab-scale"
[defaults]
retries = 0
infra_retries = 1
case_timeout = "60s"
step_timeout = "20s"
[[case]]
attacks = ["attack-hang", "attack-key-read", "attack-rep-movs-write", "attack-xchg", "attack-lock-rmw", "attack-mov-widths", "pci-enum"]
backends = ["model"]
profiles = ["tenant", "operator"]
"#;

struct Pg {
    url: String,
    dir: Option<String>,
}

impl Drop for Pg {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            let _ = Command::new("scripts/pg-stop").arg(d).status();
        }
    }
}

fn postgres() -> Result<Pg> {
    if let Some(url) = std::env::var("HILRIG_TEST_PG")
        .ok()
        .filter(|s| !s.is_empty())
    {
        return Ok(Pg { url, dir: None });
    }
    let out = Command::new("scripts/pg-start")
        .output()
        .context("bench lab-scale needs PostgreSQL: HILRIG_TEST_PG not set and scripts/pg-start (run from the source tree) could not be started")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    if !out.status.success() || lines.len() < 2 {
        bail!(
            "bench lab-scale needs PostgreSQL: scripts/pg-start failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(Pg {
        url: lines[0].to_string(),
        dir: Some(lines[lines.len() - 1].to_string()),
    })
}

/// Run the campaign with `runners` processes of `hosts` hosts each sharing run
/// `run`; (cases, wall seconds).
fn shared_run(
    exe: &Path,
    dir: &Path,
    url: &str,
    run: &str,
    runners: usize,
    hosts: usize,
) -> Result<(usize, f64)> {
    let file = dir.join("lab-scale.toml");
    let t = Instant::now();
    let kids = (0..runners)
        .map(|i| {
            Command::new(exe)
                .args(["campaign", "run"])
                .arg(&file)
                .args(["--hosts", &hosts.to_string(), "--db", url, "--join", run])
                .args(["--runner-name", &format!("bench-{i}")])
                .arg("--out")
                .arg(dir.join(format!("out-{run}-{i}")))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting runner {i} ({})", exe.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    for (i, mut k) in kids.into_iter().enumerate() {
        let s = k.wait()?;
        if !s.success() {
            bail!("runner {i} of {run} exited {s} (not every case passed)");
        }
    }
    let wall = t.elapsed().as_secs_f64();
    let mut store = hilrig_campaigns::store::Store::open(Path::new(url))?;
    let cases = store.cases(run)?;
    if let Some(c) = cases
        .iter()
        .find(|c| c.outcome != hilrig_reports::Outcome::Pass)
    {
        bail!("{run}: case {} ended {}: {}", c.id, c.outcome, c.message);
    }
    Ok((cases.len(), wall))
}

/// The scale-out rows (also for `bench lab` once it exists).
pub fn bench_lab_scale() -> Result<Vec<Figure>> {
    let pg = postgres()?;
    let exe = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("lab-scale.toml"), CAMPAIGN)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tag = format!("{}-{nanos}", std::process::id());
    let per_min = |(n, s): (usize, f64)| n as f64 / s * 60.0;
    let one = shared_run(&exe, dir.path(), &pg.url, &format!("scale1-{tag}"), 1, 1)?;
    let three = shared_run(&exe, dir.path(), &pg.url, &format!("scale3-{tag}"), 3, 1)?;
    let local3 = shared_run(&exe, dir.path(), &pg.url, &format!("local3-{tag}"), 1, 3)?;
    let cases = one.0;
    Ok(vec![
        Figure::new(
            format!("1 runner x 1 host, {cases} cases, one PostgreSQL (baseline)"),
            per_min(one),
            "cases/min",
        ),
        Figure::new(
            "3 runner processes x 1 host sharing the run (--join)",
            per_min(three),
            "cases/min",
        )
        .vs(0),
        Figure::new(
            "1 runner x 3 hosts (same parallelism in one process)",
            per_min(local3),
            "cases/min",
        )
        .vs(0),
    ])
}

/// CPU seconds and resident bytes of process `pid` from /proc (`None`: gone).
/// CPU from `schedstat` (nanoseconds; the ssh processes are single-threaded);
/// this process's own from `getrusage` (every thread, microseconds).
fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let cpu = if pid == std::process::id() {
        // SAFETY: getrusage fills the struct we pass.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(u.ru_utime) + tv(u.ru_stime)
    } else {
        let s = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
        s.split_whitespace().next()?.parse::<f64>().ok()? / 1e9
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some((cpu, rss_kb * 1024))
}

/// The pid of the ControlMaster of `ssh` (`ssh -O check`).
fn master_pid(ssh: &hilrig_rig::remote::Ssh) -> Option<u32> {
    let out = Command::new("ssh")
        .args(ssh.options())
        .args(["-O", "check"])
        .arg(&ssh.spec().address)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    let at = text.find("pid=")? + 4;
    text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .ok()
}

/// What the controller spent keeping `hosts` idle guests running for `window`.
struct Idle {
    hosts: usize,
    /// Controller CPU seconds in the window: this process, the step agents'
    /// ssh clients and the hosts' ssh master connections.
    cpu_s: f64,
    /// Resident bytes in the window: this process plus those ssh processes.
    rss: u64,
    window: f64,
}

/// Run an idle guest (the rig's idle payload, `vm run --timeout window`) on each
/// of `ssh` through its step agent, all at once; measure the controller's CPU
/// over the window and its resident memory in the middle of it.
fn idle_window(
    ssh: &[std::sync::Arc<hilrig_rig::remote::Ssh>],
    builds: &[String],
    window: std::time::Duration,
) -> Result<Idle> {
    use hilrig_rig::remote::StepRequest;
    let payload = hilrig_rig::sim::idle_payload()?;
    // Start every agent first (not part of the window).
    for (s, b) in ssh.iter().zip(builds) {
        let req = StepRequest {
            dir: format!("{}/bench-warm", s.spec().workdir),
            argv: vec!["true".into()],
            ..StepRequest::default()
        };
        s.step(b, &req, std::time::Duration::from_secs(60))
            .map_err(|e| anyhow::anyhow!("warming the step agent: {e}"))?;
    }
    let mut pids: Vec<u32> = Vec::new();
    for s in ssh {
        pids.extend(master_pid(s));
        pids.extend(s.agent_pid());
    }
    let usage = |pids: &[u32]| -> (f64, u64) {
        let mine = proc_usage(std::process::id()).unwrap_or((0.0, 0));
        pids.iter()
            .filter_map(|&p| proc_usage(p))
            .fold(mine, |a, b| (a.0 + b.0, a.1 + b.1))
    };
    let (cpu0, _) = usage(&pids);
    let t = Instant::now();
    let kids: Vec<_> = ssh
        .iter()
        .zip(builds)
        .map(|(s, b)| {
            let (s, b, payload) = (s.clone(), b.clone(), payload.clone());
            let build = b.clone();
            std::thread::spawn(move || {
                let dir = format!("{}/bench-idle", s.spec().workdir);
                let spec = hilrig_vmm_api::VmSpec {
                    payload: format!("{dir}/idle.bin"),
                    device_state: Some(format!("{dir}/state.bin").into()),
                    timeout: window,
                    json: true,
                    ..hilrig_vmm_api::VmSpec::default()
                };
                // The guests spin on `pause`: niced, so the controller is measured,
                // not starved.
                let mut argv = vec![
                    "nice".into(),
                    "-n".into(),
                    "19".into(),
                    b,
                    "vm".into(),
                    "run".into(),
                ];
                argv.extend(
                    spec.to_args()
                        .into_iter()
                        .map(|a| a.to_string_lossy().into_owned()),
                );
                let req = StepRequest {
                    dir: dir.clone(),
                    argv,
                    puts: vec![(format!("{dir}/idle.bin"), payload)],
                    ..StepRequest::default()
                };
                s.step(&build, &req, window + std::time::Duration::from_secs(60))
            })
        })
        .collect();
    std::thread::sleep(window / 2);
    let (_, rss) = usage(&pids);
    let mut failures = Vec::new();
    for k in kids {
        match k.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => failures.push(e.to_string()),
            Err(_) => failures.push("a step thread panicked".into()),
        }
    }
    let (cpu1, _) = usage(&pids);
    if !failures.is_empty() {
        bail!("idle guests: {}", failures.join("; "));
    }
    Ok(Idle {
        hosts: ssh.len(),
        cpu_s: cpu1 - cpu0,
        rss,
        window: t.elapsed().as_secs_f64(),
    })
}

/// `hilrig bench lab-hosts`: `HILRIG_BENCH_HOSTS` (default 32) simulated SSH
/// hosts (`scripts/sim-lab`, one sshd each, sharing one copy of this build) each
/// running an idle guest through its step agent for the window, against 1 host in
/// the same run: controller CPU per host-hour and controller memory per host.
pub fn bench_lab_hosts(window: std::time::Duration) -> Result<Vec<Figure>> {
    let n: usize = std::env::var("HILRIG_BENCH_HOSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 2)
        .unwrap_or(32);
    let exe = std::env::current_exe()?;
    let lab = match hilrig_rig::simlab::SimLab::start_with_build(n, Some(&exe)) {
        Ok(l) => l,
        Err(hilrig_rig::simlab::LabError::Skipped(why)) => {
            bail!("SKIPPED: bench lab-hosts: {why}")
        }
        Err(e) => bail!("bench lab-hosts: {n} simulated hosts: {e}"),
    };
    let inv = hilrig_rig::Inventory::load(&lab.inventory)?;
    let mut ssh = Vec::new();
    let mut builds = Vec::new();
    for h in inv.hosts.iter().filter(|h| h.ssh.is_some()) {
        let s = match hilrig_rig::remote::Remote::of(h)? {
            hilrig_rig::remote::Remote::Ssh(s) => std::sync::Arc::new(*s),
            hilrig_rig::remote::Remote::Local => continue,
        };
        builds.push(
            s.ensure_hilrig(&exe)
                .with_context(|| format!("host {}", h.name))?,
        );
        ssh.push(s);
    }
    if ssh.len() != n {
        bail!(
            "bench lab-hosts: {} SSH hosts in the lab, wanted {n}",
            ssh.len()
        );
    }
    let one = idle_window(&ssh[..1], &builds[..1], window)?;
    let all = idle_window(&ssh, &builds, window)?;
    let per_host_hour = |i: &Idle| i.cpu_s / (i.hosts as f64 * i.window / 3600.0);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let w = window.as_secs_f64();
    Ok(vec![
        Figure::new(
            format!("1 SSH host, idle guest {w:.0} s: controller CPU (baseline)"),
            per_host_hour(&one),
            "s/host-h",
        ),
        Figure::new(
            format!("{n} SSH hosts, idle guests {w:.0} s: controller CPU"),
            per_host_hour(&all),
            "s/host-h",
        )
        .vs(0),
        Figure::new(
            "1 SSH host: controller RSS per host (process + ssh) (baseline)",
            mib(one.rss / one.hosts as u64),
            "MiB",
        ),
        Figure::new(
            format!("{n} SSH hosts: controller RSS per host (process + ssh)"),
            mib(all.rss / all.hosts as u64),
            "MiB",
        )
        .vs(2),
        Figure::new(
            format!("{n} SSH hosts: controller RSS added per host over 1 host"),
            mib(all.rss.saturating_sub(one.rss) / (n as u64 - 1)),
            "MiB",
        )
        .vs(2),
    ])
}
