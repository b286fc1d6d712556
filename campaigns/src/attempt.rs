//! One attempt of a case: the attack's steps in order on one device state file —
//! VMM runs (built-in or generated payloads), state snapshots and restores, counters
//! service verifies and update intents, forged OOB requests, a power cut in the
//! middle of a program sequence, live patches through the control socket and a
//! fleet rollout — then the expectations checked against what was observed.

use crate::attacks::{Gen, Setup, Step, StepKind, StepVm};
use crate::board::BoardSession;
use crate::format::{Backend, Case, FpgaTarget, HostDevice, HostSpec};
use crate::runner::{
    check_observed, prepare_state, reading, reading_of, rel, AttemptResult, Observed,
};
use crate::scenario;
use hilrig_counters::source::CounterSource;
use hilrig_device::state::NvState;
use hilrig_device::Region;
use hilrig_reports::{Artifact, ArtifactKind, Outcome};
use hilrig_rig::remote::{shell_quote, Ssh};
use hilrig_vmm_api::control::{Metrics, Reply, Request, Response, VmState};
use hilrig_vmm_api::{ExitStatus, RunSummary, VmSpec};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// How long a VMM may take to put up its control socket.
const SOCKET_WAIT: Duration = Duration::from_secs(20);
/// Per control request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(20);
/// Bare quiesces after the storm's patch (more blackout samples).
const QUIESCES: usize = 5;
/// VMMs of the rollout fleet, and the one that does not trust the signing key.
const FLEET: usize = 4;
const BAD_HOST: usize = 2;

/// An attempt ended early (boxed: it is large and travels through many `?`).
type Stop = Box<AttemptResult>;
type StepOut = Result<RunSummary, Stop>;

/// The step's summary if its teardown record (when it has one) belongs to this run
/// (`binding`: the VM id and nonce the runner gave it, the device's serial); a record
/// replayed from another run, or about another device, fails the step.
pub(crate) fn bound_record(
    k: usize,
    label: &str,
    summary: RunSummary,
    binding: &hilrig_vmm_api::RunBinding,
) -> StepOut {
    if let Some(t) = &summary.teardown {
        t.check_binding(binding)
            .map_err(|e| fail(Outcome::Fail, format!("step {k} ({label}): {e}")))?;
    }
    Ok(summary)
}

/// A teardown record a control-socket `teardown` request answered with (patch,
/// rollout and detach steps driven by the runner): it must belong to this run
/// (`binding`), as a VMM-exit record must ([`bound_record`]); one replayed from
/// another run fails the step.
pub(crate) fn socket_record(
    k: usize,
    label: &str,
    rec: &hilrig_vmm_api::TeardownRecord,
    binding: &hilrig_vmm_api::RunBinding,
) -> Result<(), Stop> {
    rec.check_binding(binding).map_err(|e| {
        fail(
            Outcome::Fail,
            format!("step {k} ({label}): the control socket's teardown record: {e}"),
        )
    })
}

/// Give a VMM's spec the run's binding: its VM id and teardown nonce (the serial
/// is the device's own).
pub(crate) fn bind_spec(s: &mut VmSpec, b: &hilrig_vmm_api::RunBinding) {
    s.teardown_nonce = Some(b.nonce);
    s.vm_id = Some(b.vm.clone());
}

fn fail(o: Outcome, msg: impl std::fmt::Display) -> Stop {
    Box::new(AttemptResult {
        outcome: o,
        message: msg.to_string(),
        observed: String::new(),
        metrics: Default::default(),
        artifacts: Vec::new(),
    })
}

/// Whether VMMs can be jailed (`--jail` needs root). Logged once when not.
pub fn jail_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    static ONCE: std::sync::Once = std::sync::Once::new();
    if !root {
        ONCE.call_once(|| {
            tracing::warn!("not root: VMMs run without --jail (the jail needs root)");
        });
    }
    root
}

fn synthetic() -> RunSummary {
    RunSummary::synthetic("rig step")
}

/// Make `cmd`'s child die with the runner: SIGKILL on the runner's death
/// (PR_SET_PDEATHSIG), checked against a runner that died before the child got
/// there; and killed when the handle is dropped.
pub fn die_with_runner(cmd: &mut tokio::process::Command) {
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                libc::_exit(70);
            }
            Ok(())
        });
    }
    cmd.kill_on_drop(true);
}

struct Att<'a> {
    case: &'a Case,
    host: &'a HostSpec,
    vmm: &'a Path,
    vmm_args: &'a [String],
    run_dir: &'a Path,
    dir: &'a Path,
    state: PathBuf,
    deadline: Instant,
    artifacts: Vec<Artifact>,
    seen: Observed,
    /// A short directory for control sockets (a unix socket path must fit 108 bytes;
    /// attempt directories are deep).
    sockets: Option<tempfile::TempDir>,
    /// The host over SSH (`None`: this machine).
    remote: Option<Remote>,
    /// The `fpga` backend's board (a host's, or serve-sim's): the device is there,
    /// read out of band; `state` is not used.
    board: Option<BoardSession>,
    /// An SSH host's own device: its state file stays on the host, read out of
    /// band through its OOB port; `state` keeps the state the rig prepared.
    dev: Option<HostDevice>,
}

/// The host's OOB port, opened through the rig's OOB driver (serial, RFC 2217
/// or raw TCP); a transport fault there is INFRA, never the device's.
fn host_oob(host: &str, d: &HostDevice) -> Result<hilrig_rig::oob::OobPort, Stop> {
    hilrig_rig::oob::OobPort::open(host, &d.oob).map_err(|e| {
        fail(
            Outcome::Infra,
            format!("the host's OOB line failed, not the device: {e}"),
        )
    })
}

/// An OOB read of the host's device; a fault is INFRA.
fn oob_read<T>(
    host: &str,
    d: &HostDevice,
    f: impl FnOnce(&mut hilrig_rig::oob::OobPort) -> Result<T, hilrig_counters::Error>,
) -> Result<T, Stop> {
    let mut src = host_oob(host, d)?;
    f(&mut src).map_err(|e| {
        fail(
            Outcome::Infra,
            format!("the host's OOB line failed, not the device: {e}"),
        )
    })
}

/// Put the state the rig prepared for the case in place on the host (its
/// device's state file, atomically; its kept buffers gone, as at power-on):
/// one staging request through the host's standing step agent (no process
/// started there), or a shell over SSH for a build without the agent.
async fn install_device(
    r: &Remote,
    d: &HostDevice,
    state: &Path,
    within: Duration,
) -> Result<(), Stop> {
    use hilrig_rig::remote::{StepError, StepRequest};
    let bytes = std::fs::read(state)
        .map_err(|e| fail(Outcome::Infra, format!("reading {}: {e}", state.display())))?;
    let buffers = hilrig_device::model::buffers_path(Path::new(&d.state))
        .to_string_lossy()
        .into_owned();
    let infra = |e: &dyn std::fmt::Display| {
        fail(
            Outcome::Infra,
            format!("putting the case's device state on the host: {e}"),
        )
    };
    if d.state.starts_with('/') {
        let req = StepRequest {
            dir: format!("{}-install", r.dir),
            puts: vec![(d.state.clone(), bytes.clone())],
            remove: vec![buffers.clone()],
            stage_only: true,
            ..StepRequest::default()
        };
        let (ssh, hilrig) = (r.ssh.clone(), r.hilrig.clone());
        let out = tokio::task::spawn_blocking(move || ssh.step(&hilrig, &req, within))
            .await
            .map_err(|e| infra(&e))?;
        match out {
            Ok(s) if s.code == 0 => return Ok(()),
            Ok(s) => return Err(infra(&format!("the step agent answered exit {}", s.code))),
            Err(StepError::Unsupported { .. }) => {}
            Err(e) => return Err(infra(&e)),
        }
    }
    let (p, b) = (shell_quote(&d.state), shell_quote(&buffers));
    let line = format!(
        "set -e; umask 077; t=$(mktemp {p}.XXXXXX); cat > \"$t\"; mv -f \"$t\" {p}; rm -f {b}"
    );
    let ssh = r.ssh.clone();
    blocking(move || ssh.sh(&line, Some(&bytes)).map(|_| ()))
        .await
        .map_err(|e| infra(&e))
}

/// One VMM step on a remote host: the host, the step's directory there, the
/// files fetched back and the command.
struct StepCall<'a> {
    r: &'a Remote,
    rdir: &'a str,
    files: &'a [String],
    argv: &'a [String],
}

/// Where an attempt's VMM runs: on a host reached over SSH, the build there and
/// the attempt's directory there.
#[derive(Debug, Clone)]
pub struct Remote {
    /// The connection.
    pub ssh: Arc<Ssh>,
    /// The runner's build on the host (made identical by hash).
    pub hilrig: String,
    /// The attempt's directory on the host.
    pub dir: String,
}

/// Where an attempt runs.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    /// The VMM executable (local path).
    pub vmm: &'a Path,
    /// Arguments before the VMM's own (`vm run` for `hilrig`).
    pub vmm_args: &'a [String],
    /// The host's SSH connection and the copy of `vmm` there, if remote.
    pub remote: Option<(Arc<Ssh>, String)>,
    /// The `hilrig` executable whose `fpga serve-sim` simulates a board for an
    /// `fpga` case on a host without one (`None`: the VMM if it is `hilrig`, else
    /// `hilrig` beside it; see [`crate::board::find_hilrig`]).
    pub fpga_sim: Option<&'a Path>,
    /// Arguments appended to `hilrig fpga serve-sim` (e.g. `--engine verilator`).
    pub fpga_sim_args: &'a [String],
    /// Whom the provisioning gate pages about a locked or quarantined device it
    /// refuses (the inventory's `[counters]` `page`/`webhook`); `None`: nobody.
    pub pager: Option<&'a hilrig_counters::remediate::Pager>,
}

impl Att<'_> {
    fn socket(&mut self, name: &str) -> Result<PathBuf, Stop> {
        if self.sockets.is_none() {
            let d = tempfile::Builder::new()
                .prefix("hilrig-ctl-")
                .tempdir()
                .map_err(|e| fail(Outcome::Infra, format!("socket directory: {e}")))?;
            self.sockets = Some(d);
        }
        let d = self
            .sockets
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .unwrap_or_default();
        Ok(d.join(format!("{name}.sock")))
    }

    /// Kill a driven VMM that failed a check and keep its stderr.
    async fn abandon(
        &mut self,
        k: usize,
        label: &str,
        child: &mut tokio::process::Child,
        err: Pipe,
    ) {
        let _ = child.start_kill();
        let _ = child.wait().await;
        let p = self.file(k, label, "stderr.txt");
        let _ = std::fs::write(&p, err.await.unwrap_or_default());
        self.keep(&p, ArtifactKind::Other);
        let c = self.file(k, label, "console.txt");
        self.keep(&c, ArtifactKind::Console);
    }

    fn file(&self, k: usize, label: &str, name: &str) -> PathBuf {
        self.dir.join(format!("{k}-{label}-{name}"))
    }

    /// A fresh record of applied patch versions and its 0600 MAC key, for a
    /// patchable VMM (`--patch-record`, `--patch-record-key`: the VMM refuses
    /// `--patch-pubkey` without them). The record sits in a 0700 directory of its
    /// own, the key beside that directory: a jailed VMM gets the record's directory
    /// writable, and must not find the key (it could forge records) there.
    fn patch_record(&self, k: usize, label: &str) -> Result<(PathBuf, PathBuf), Stop> {
        let key = self.file(k, label, "patch-record.key");
        hilrig_counters::mac::Key::init(&key).map_err(|e| fail(Outcome::Infra, e))?;
        let dir = self.file(k, label, "patch-record");
        hilrig_device::secure::ensure_private_dir(&dir).map_err(|e| fail(Outcome::Infra, e))?;
        Ok((dir.join("applied.json"), key))
    }

    /// Record `p` as an artifact of the case. An empty file is removed instead:
    /// it holds nothing (a payload that printed nothing, a VMM with no alarms),
    /// and a report listing empty consoles hides the ones that matter.
    fn keep(&mut self, p: &Path, kind: ArtifactKind) {
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_file() && m.len() == 0 => {
                let _ = std::fs::remove_file(p);
                return;
            }
            Ok(_) => {}
            Err(_) => return,
        }
        if !self
            .artifacts
            .iter()
            .any(|a| a.path == rel(self.run_dir, p))
        {
            self.artifacts.push(Artifact {
                kind,
                path: rel(self.run_dir, p),
            });
        }
    }

    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// The VMM run of step `k` (`label` names its files) on `state`: the case's
    /// device, profile and timeouts, the step's settings, then `tweak`.
    fn spec(
        &self,
        k: usize,
        label: &str,
        payload: &Path,
        vm: StepVm,
        state: &Path,
        tweak: impl FnOnce(&mut VmSpec),
    ) -> VmSpec {
        let mut spec = VmSpec {
            payload: payload.to_string_lossy().into_owned(),
            device: match &self.board {
                Some(b) => hilrig_vmm_api::DeviceSpec::Fpga {
                    port: b.port.clone(),
                    oob: Some(b.oob.clone()),
                    baud: b.baud,
                },
                None => self
                    .case
                    .backend
                    .in_process()
                    .unwrap_or(hilrig_device::BackendKind::Model)
                    .into(),
            },
            // A board keeps its own nonvolatile state.
            device_state: self.board.is_none().then(|| state.to_path_buf()),
            profile: self.case.profile.clone(),
            enforce: Some(self.case.enforce),
            alarms: Some(self.file(k, label, "alarms.jsonl")),
            console: Some(self.file(k, label, "console.txt")),
            timeout: self.case.step_timeout.max(Duration::from_millis(1)),
            json: true,
            ..VmSpec::default()
        };
        vm.apply(&mut spec);
        if spec.teardown_on_exit {
            spec.teardown_record = Some(self.file(k, label, "teardown.json"));
        }
        // Every VMM runs jailed and unprivileged when the runner can jail it (root,
        // on this machine; a remote host's VMM runs as its SSH user, unjailed).
        // (The in-process backends only: hilrig_vmm_api::DeviceSpec::jailable.)
        if spec.device.jailable() && self.remote.is_none() && jail_available() {
            spec.jail = Some(self.file(k, label, "jail"));
        }
        tweak(&mut spec);
        spec
    }

    /// The VMM command running `spec`.
    fn command(&self, spec: &VmSpec) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(self.vmm);
        cmd.args(self.vmm_args)
            .args(spec.to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_runner(&mut cmd);
        cmd
    }

    /// Keep a finished VMM's output and read its verdict JSON.
    fn collect(&mut self, k: usize, label: &str, out: std::process::Output) -> StepOut {
        let json_path = self.file(k, label, "vmm.json");
        let stderr_path = self.file(k, label, "stderr.txt");
        let _ = std::fs::write(&json_path, &out.stdout);
        let _ = std::fs::write(&stderr_path, &out.stderr);
        for (name, kind) in [
            ("vmm.json", ArtifactKind::Other),
            ("stderr.txt", ArtifactKind::Other),
            ("console.txt", ArtifactKind::Console),
            ("alarms.jsonl", ArtifactKind::Alarms),
            ("teardown.json", ArtifactKind::Teardown),
        ] {
            let p = self.file(k, label, name);
            self.keep(&p, kind);
        }
        let stderr_tail = {
            let s = String::from_utf8_lossy(&out.stderr);
            let t: Vec<&str> = s.lines().rev().take(3).collect();
            t.into_iter().rev().collect::<Vec<_>>().join(" | ")
        };
        let Some(code) = out.status.code() else {
            return Err(fail(
                Outcome::Infra,
                format!(
                    "step {k} ({label}): the VMM died with no verdict ({}); {stderr_tail}",
                    out.status
                ),
            ));
        };
        match RunSummary::from_output(&out.stdout) {
            Ok(summary) if i32::from(summary.exit_status.code()) == code => {
                self.note_vmm(&summary);
                Ok(summary)
            }
            Ok(summary) => Err(fail(
                Outcome::Infra,
                format!(
                    "step {k} ({label}): the VMM exited {code} but its summary says {}; {stderr_tail}",
                    summary.exit_status
                ),
            )),
            Err(e) => Err(fail(
                Outcome::Infra,
                format!("step {k} ({label}): the VMM exited {code}: {e}; {stderr_tail}"),
            )),
        }
    }

    /// Blackouts and teardown times of a VMM's JSON.
    fn note_vmm(&mut self, summary: &RunSummary) {
        for p in &summary.patches {
            if let Some(us) = p.blackout_us {
                self.seen.patch_blackouts_us.push(us as f64);
            }
        }
        if let Some(t) = &summary.teardown {
            self.seen.teardown_us.push(t.total_micros as f64);
        }
        self.seen.add_trap_latency(summary);
        self.seen.add_counters_verdicts(summary);
    }

    /// A fresh binding for a VMM this step starts as `name`: a random nonce, a VM id
    /// naming the case, step and VMM, and the serial of the device in `state`
    /// (set on the VMM's spec with [`bind_spec`]; its teardown records, over the
    /// control socket and in its summary, must carry all three).
    fn binding(
        &mut self,
        k: usize,
        name: &str,
        state: &Path,
    ) -> Result<hilrig_vmm_api::RunBinding, Stop> {
        let serial = NvState::load(state)
            .map_err(|e| fail(Outcome::Infra, format!("reading {}: {e}", state.display())))?
            .serial;
        let nonce = hilrig_vmm_api::Nonce::random()
            .map_err(|e| fail(Outcome::Infra, format!("a random teardown nonce: {e}")))?;
        Ok(hilrig_vmm_api::RunBinding {
            vm: format!("{}-{k}-{name}", self.case.id),
            serial,
            nonce,
        })
    }

    /// Run a VMM to its end within the case deadline. A step that tears down gets a
    /// VM id and a fresh nonce, and its teardown record must carry them and the
    /// device's serial ([`bound_record`]): a record of another run is refused.
    async fn run_vmm(&mut self, k: usize, label: &str, payload: &Path, vm: StepVm) -> StepOut {
        let state = self.state.clone();
        let serial = match &self.board {
            Some(b) => b.serial,
            None => self.load()?.serial,
        };
        let nonce = hilrig_vmm_api::Nonce::random()
            .map_err(|e| fail(Outcome::Infra, format!("a random teardown nonce: {e}")))?;
        let vm_id = format!("{}-{k}-{label}", self.case.id);
        let spec = self.spec(k, label, payload, vm, &state, |s| {
            s.teardown_nonce = Some(nonce);
            s.vm_id = Some(vm_id.clone());
        });
        let binding = hilrig_vmm_api::RunBinding {
            vm: vm_id,
            serial,
            nonce,
        };
        let out = self.run_vmm_spec(k, label, spec).await?;
        bound_record(k, label, out, &binding)
    }

    async fn run_vmm_spec(&mut self, k: usize, label: &str, spec: VmSpec) -> StepOut {
        if let Some(r) = self.remote.clone() {
            if self.board.is_some() {
                return self.run_remote_board(k, label, spec, r).await;
            }
            return self.run_remote(k, label, spec, r).await;
        }
        let mut cmd = self.command(&spec);
        let child = cmd.spawn().map_err(|e| spawn_error(self.vmm, e))?;
        match tokio::time::timeout(self.left(), child.wait_with_output()).await {
            Err(_) => {
                // A VMM stuck retrying a dead board is the transport's fault.
                self.board_check(k, label, &Ok(synthetic()), "")?;
                Err(fail(
                    Outcome::Timeout,
                    format!(
                        "step {k} ({label}) still running after the case timeout of {:?}: killed",
                        self.case.timeout
                    ),
                ))
            }
            Ok(Err(e)) => Err(fail(
                Outcome::Infra,
                format!("waiting for {}: {e}", self.vmm.display()),
            )),
            Ok(Ok(out)) => {
                let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                let r = self.collect(k, label, out);
                self.board_check(k, label, &r, &stderr)?;
                r
            }
        }
    }

    /// A VMM step on a lab host's board: the board's bridge port is on the host
    /// (`fpga=PORT`), its OOB port on the controller, lent to the VMM for the
    /// step through the host's `hilrig fpga relay-oob` ([`crate::board::relay`]);
    /// then the board checked as after a local step ([`Att::board_check`]).
    async fn run_remote_board(
        &mut self,
        k: usize,
        label: &str,
        mut spec: VmSpec,
        r: Remote,
    ) -> StepOut {
        let Some(b) = &self.board else {
            return Err(fail(Outcome::Infra, "no board"));
        };
        let mut argv = vec![r.hilrig.clone(), "fpga".into(), "relay-oob".into()];
        argv.extend([
            "--seconds".into(),
            (self.left() + Duration::from_secs(60))
                .as_secs()
                .to_string(),
        ]);
        let cmd = r.ssh.command(&argv);
        let (port, baud) = (b.port.clone(), b.baud);
        // The session: a short-lived blocking start (SSH, the relay's first line).
        let oob = b.oob.clone();
        let started = tokio::task::spawn_blocking(move || crate::board::relay(&oob, baud, cmd))
            .await
            .map_err(|e| fail(Outcome::Infra, format!("relay task: {e}")))?;
        let relay = started.map_err(|e| {
            fail(
                Outcome::Infra,
                format!("step {k} ({label}): the board's transport failed, not the device: {e}"),
            )
        })?;
        spec.device = hilrig_vmm_api::DeviceSpec::Fpga {
            port,
            oob: Some(relay.host_path.clone()),
            baud,
        };
        let r = self.run_remote(k, label, spec, r).await;
        let faults = relay.finish();
        let stderr = std::fs::read_to_string(self.file(k, label, "stderr.txt")).unwrap_or_default();
        self.board_check(k, label, &r, &stderr)?;
        if !faults.is_empty() {
            // The VMM's OOB reads found no answer on the controller's end: its
            // teardown record is the transport's, not the device's.
            return Err(fail(
                Outcome::Infra,
                format!(
                    "step {k} ({label}): the board's OOB line failed, not the device: {}",
                    faults.join("; ")
                ),
            ));
        }
        r
    }

    /// After a VMM step on a board: a transport fault (the VMM says its device
    /// transport failed, serve-sim ended, the OOB port no longer answers) is
    /// INFRA, whatever verdict the guest reached without its device.
    fn board_check(
        &mut self,
        k: usize,
        label: &str,
        r: &StepOut,
        stderr: &str,
    ) -> Result<(), Stop> {
        let Some(b) = &mut self.board else {
            return Ok(());
        };
        let infra = |why: String| {
            fail(
                Outcome::Infra,
                format!("step {k} ({label}): the board's transport failed, not the device: {why}"),
            )
        };
        b.alive().map_err(|e| infra(e.to_string()))?;
        let said = match r {
            Ok(s) => format!("{} {stderr}", s.verdict),
            Err(_) => stderr.to_string(),
        };
        if let Some(at) = said.find("device transport") {
            let line = said[at..].lines().next().unwrap_or_default();
            return Err(infra(line.to_string()));
        }
        Ok(())
    }

    /// The device's state for generated payloads: the state file, or the
    /// board's state as the rig brought it up (keys, geometry).
    fn nv(&self) -> Result<NvState, Stop> {
        match &self.board {
            Some(b) => Ok(b.factory.clone()),
            None => self.load(),
        }
    }

    /// A counter reading now (out of band on a board; a failure there is INFRA).
    fn read_now(&mut self) -> Result<Option<hilrig_reports::CounterReading>, Stop> {
        match &mut self.board {
            Some(b) => b
                .counters()
                .map(|c| Some(reading_of(&c)))
                .map_err(|e| fail(Outcome::Infra, format!("the board's transport failed: {e}"))),
            None => match &self.dev {
                Some(d) => {
                    oob_read(&self.host.name, d, |s| s.counters()).map(|c| Some(reading_of(&c)))
                }
                None => Ok(NvState::load(&self.state).ok().map(|nv| reading(&nv))),
            },
        }
    }

    /// Run `spec` on the remote host in one round trip through its step agent
    /// ([`hilrig_rig::remote::Ssh::step`]; a build without one:
    /// [`hilrig_rig::remote::STEP_SH`]): the device state and a generated payload
    /// staged there, `hilrig vm run` started (its pid kept, so a timeout kills it
    /// there), then its `--json` summary, stderr, the state, console, alarms and
    /// teardown record sent back and the step's directory removed.
    async fn run_remote(&mut self, k: usize, label: &str, spec: VmSpec, r: Remote) -> StepOut {
        use hilrig_rig::remote::StepRequest;
        let infra = |m: String| fail(Outcome::Infra, format!("step {k} ({label}): {m}"));
        let rdir = format!("{}-{k}", r.dir);
        let rpath = |local: &Path| -> String {
            let name = local
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("{rdir}/{name}")
        };
        let mut rs = spec.clone();
        let mut puts: Vec<(String, Vec<u8>)> = Vec::new();
        let mut fetch: Vec<(String, PathBuf)> = Vec::new();
        // The host's own device: its state file stays there. Otherwise the state
        // goes there and comes back with the step.
        match (&self.dev, &self.board) {
            (Some(d), _) => rs.device_state = Some(PathBuf::from(&d.state)),
            // A board keeps its own state.
            (None, Some(_)) => rs.device_state = None,
            (None, None) => {
                let state_r = rpath(&self.state);
                let state_bytes = std::fs::read(&self.state)
                    .map_err(|e| infra(format!("reading {}: {e}", self.state.display())))?;
                puts.push((state_r.clone(), state_bytes));
                rs.device_state = Some(PathBuf::from(&state_r));
                fetch.push((state_r, self.state.clone()));
            }
        }
        // The host's console line: the VMM writes its tty, the controller
        // captures the other end through the rig's console driver.
        let line = self.dev.as_ref().and_then(|d| d.console.clone());
        let mut capture_to = None;
        if let Some(c) = &line {
            capture_to = c.wire(&mut rs);
        }
        let payload = Path::new(&spec.payload);
        if payload.is_absolute() && payload.is_file() {
            let b = std::fs::read(payload)
                .map_err(|e| infra(format!("reading {}: {e}", payload.display())))?;
            let p = rpath(payload);
            puts.push((p.clone(), b));
            rs.payload = p;
        }
        let mut fetched = vec![&mut rs.alarms, &mut rs.teardown_record];
        if line.is_none() {
            fetched.push(&mut rs.console);
        }
        for f in fetched {
            if let Some(local) = f.take() {
                let p = rpath(&local);
                fetch.push((p.clone(), local));
                *f = Some(PathBuf::from(p));
            }
        }
        let mut cmd_argv: Vec<String> = vec![r.hilrig.clone()];
        cmd_argv.extend(self.vmm_args.iter().cloned());
        cmd_argv.extend(
            rs.to_args()
                .into_iter()
                .map(|a| a.to_string_lossy().into_owned()),
        );
        let remote_files: Vec<String> = fetch.iter().map(|(p, _)| p.clone()).collect();
        // The host's step agent first: one framed request and reply over a
        // standing session; a build without it goes through STEP_SH.
        let mut req = StepRequest {
            dir: rdir.clone(),
            argv: cmd_argv.clone(),
            puts: std::mem::take(&mut puts),
            fetch: remote_files.clone(),
            ..StepRequest::default()
        };
        // The console capture ends at a fresh marker the step agent writes on
        // the line once the VMM has exited: everything the VMM wrote is ahead of
        // it on the line, and nothing the guest prints can end the capture early.
        let capture = match (&line, &capture_to) {
            (Some(c), Some(to)) => {
                let nonce = hilrig_vmm_api::Nonce::random()
                    .map_err(|e| infra(format!("a console end marker: {e}")))?;
                let marker = format!("HILRIG-CONSOLE-END-{nonce}").into_bytes();
                if c.tty.starts_with('/') {
                    req.marks.push((c.tty.clone(), marker.clone()));
                }
                Some(
                    hilrig_rig::console::Capture::start_until(
                        &self.host.name,
                        &c.name,
                        c.source.clone(),
                        to,
                        &marker,
                    )
                    .map_err(|e| infra(format!("the host's console line: {e}")))?,
                )
            }
            _ => None,
        };
        let marked = !req.marks.is_empty();
        let call = StepCall {
            r: &r,
            rdir: &rdir,
            files: &remote_files,
            argv: &cmd_argv,
        };
        let step = self.remote_step(k, label, &call, req).await;
        if let Some(c) = capture {
            // The line's last bytes still on their way through it: up to the
            // marker when the agent wrote one, else a settle.
            let marked = marked && matches!(step, Ok((_, true)));
            let wait = if marked {
                CONSOLE_END_WAIT
            } else {
                CONSOLE_SETTLE
            };
            let stopped = tokio::task::spawn_blocking(move || c.finish(wait)).await;
            if step.is_ok() {
                match stopped {
                    Ok(Ok((_, seen))) => {
                        if marked && !seen {
                            let m = format!(
                                "step {k} ({label}): no console end marker within {CONSOLE_END_WAIT:?}: the console may be cut short"
                            );
                            tracing::warn!("host {}: {m}", self.host.name);
                            self.seen.notes.push(m);
                        }
                    }
                    Ok(Err(e)) => return Err(infra(format!("the host's console line: {e}"))),
                    Err(e) => return Err(infra(format!("console task: {e}"))),
                }
            }
        }
        let (step, _) = step?;
        for ((_, local), body) in fetch.iter().zip(&step.files) {
            if let Some(b) = body {
                std::fs::write(local, b)
                    .map_err(|e| infra(format!("writing {}: {e}", local.display())))?;
            }
        }
        use std::os::unix::process::ExitStatusExt;
        // The shell's view: 128+n is the VMM killed by signal n.
        let raw = if step.code > 128 {
            step.code - 128
        } else {
            step.code << 8
        };
        let vm_out = std::process::Output {
            status: std::process::ExitStatus::from_raw(raw),
            stdout: step.stdout,
            stderr: step.stderr,
        };
        self.collect(k, label, vm_out)
    }

    /// One step on the host through its step agent, or [`Att::run_step_sh`] for a
    /// build without one; whether the agent ran it (and wrote the request's marks).
    async fn remote_step(
        &mut self,
        k: usize,
        label: &str,
        call: &StepCall<'_>,
        req: hilrig_rig::remote::StepRequest,
    ) -> Result<(hilrig_rig::remote::StepOutput, bool), Stop> {
        use hilrig_rig::remote::StepError;
        let r = call.r;
        let infra = |m: String| fail(Outcome::Infra, format!("step {k} ({label}): {m}"));
        let (ssh, hilrig, left) = (r.ssh.clone(), r.hilrig.clone(), self.left());
        let agent = tokio::task::spawn_blocking(move || {
            let out = ssh.step(&hilrig, &req, left);
            (out, req)
        })
        .await
        .map_err(|e| infra(format!("step task: {e}")))?;
        match agent {
            (Ok(s), _) => Ok((s, true)),
            (Err(StepError::Unsupported { .. }), req) => self
                .run_step_sh(k, label, call, &req.puts)
                .await
                .map(|s| (s, false)),
            (Err(StepError::Timeout { .. }), _) => Err(fail(
                Outcome::Timeout,
                format!(
                    "step {k} ({label}) still running on {} after the case timeout of {:?}: killed",
                    self.host.name, self.case.timeout
                ),
            )),
            (Err(e), _) => Err(infra(e.to_string())),
        }
    }

    /// One step through [`hilrig_rig::remote::STEP_SH`] (a build without the
    /// step agent): its own SSH round trip.
    async fn run_step_sh(
        &mut self,
        k: usize,
        label: &str,
        call: &StepCall<'_>,
        puts: &[(String, Vec<u8>)],
    ) -> Result<hilrig_rig::remote::StepOutput, Stop> {
        let (r, rdir, remote_files, cmd_argv) = (call.r, call.rdir, call.files, call.argv);
        use hilrig_rig::remote::{parse_step, stage_input, step_argv};
        let infra = |m: String| fail(Outcome::Infra, format!("step {k} ({label}): {m}"));
        let argv = step_argv(rdir, remote_files, cmd_argv);
        let mut cmd = tokio::process::Command::from(r.ssh.command(&argv));
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_runner(&mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(|e| infra(format!("starting ssh: {e}")))?;
        let input = stage_input(puts);
        let stdin = child.stdin.take();
        let feeder = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            if let Some(mut w) = stdin {
                let _ = w.write_all(&input).await;
            }
        });
        let out = match tokio::time::timeout(self.left(), child.wait_with_output()).await {
            Err(_) => {
                let ssh = r.ssh.clone();
                let d = shell_quote(rdir);
                let kill = format!("kill -KILL $(cat {d}/.pid) 2>/dev/null; rm -rf {d}; true");
                // Bounded: a wedged host must not hang the runner. A host that
                // cannot be reached to kill its VMM is an infrastructure fault
                // (the runner then recovers it), not the case's timeout.
                if let Err(e) =
                    blocking(move || ssh.sh_within(&kill, KILL_TIMEOUT).map(|_| ())).await
                {
                    return Err(infra(format!(
                        "still running on {} after the case timeout of {:?}, and the VMM could not be killed there (host wedged?): {e}",
                        self.host.name, self.case.timeout
                    )));
                }
                return Err(fail(
                    Outcome::Timeout,
                    format!(
                        "step {k} ({label}) still running on {} after the case timeout of {:?}: killed",
                        self.host.name, self.case.timeout
                    ),
                ));
            }
            Ok(Err(e)) => return Err(infra(format!("waiting for ssh: {e}"))),
            Ok(Ok(out)) => out,
        };
        let _ = feeder.await;
        match (
            out.status.code(),
            parse_step(&out.stdout, remote_files.len()),
        ) {
            (Some(0), Ok(s)) => Ok(s),
            (code, parsed) => {
                let why = match parsed {
                    Err(e) => e.to_string(),
                    Ok(_) => format!("exit {code:?}"),
                };
                Err(infra(format!(
                    "ssh to {} failed ({why}): {}",
                    self.host.name,
                    String::from_utf8_lossy(&out.stderr).trim()
                )))
            }
        }
    }

    fn load(&self) -> Result<NvState, Stop> {
        NvState::load(&self.state)
            .map_err(|e| fail(Outcome::Infra, format!("reading the device state: {e}")))
    }

    async fn step(&mut self, k: usize, step: &Step) -> StepOut {
        let label = step.payload;
        match step.kind {
            StepKind::Vmm => self.run_vmm(k, label, label.as_ref(), step.vm).await,
            StepKind::Gen(g) => {
                let nv = self.nv()?;
                let bin = self.file(k, label, "payload.bin");
                let code = scenario::payload(g, &nv).map_err(|e| fail(Outcome::Infra, e))?;
                std::fs::write(&bin, code)
                    .map_err(|e| fail(Outcome::Infra, format!("writing {}: {e}", bin.display())))?;
                let summary = self.run_vmm(k, label, &bin, step.vm).await?;
                if summary.exit_status == ExitStatus::Pass {
                    let results: Vec<u64> = summary.results.iter().map(|&r| u64::from(r)).collect();
                    let s = scenario::check_results(g, &results, nv.config.counter_width)
                        .map_err(|e| fail(Outcome::Fail, format!("step {k} ({label}): {e}")))?;
                    if !s.is_empty() {
                        self.seen.notes.push(s);
                    }
                }
                Ok(summary)
            }
            StepKind::Snapshot | StepKind::Restore if self.dev.is_some() => {
                self.host_snapshot(step.kind == StepKind::Restore).await
            }
            StepKind::Snapshot => {
                let snap = self.dir.join("snapshot.bin");
                std::fs::copy(&self.state, &snap)
                    .map_err(|e| fail(Outcome::Infra, format!("snapshot: {e}")))?;
                self.seen.notes.push("state snapshot taken".into());
                Ok(synthetic())
            }
            StepKind::Restore => {
                let snap = self.dir.join("snapshot.bin");
                let nv = NvState::load(&snap)
                    .map_err(|e| fail(Outcome::Infra, format!("reading the snapshot: {e}")))?;
                // The attack: the old state put back in place, as a file copy would.
                nv.save(&self.state)
                    .map_err(|e| fail(Outcome::Infra, format!("restoring the snapshot: {e}")))?;
                self.seen.notes.push("old state file restored".into());
                Ok(synthetic())
            }
            StepKind::Verify(want) => {
                let (v, why) = match (&self.board, &self.dev) {
                    (Some(b), _) => {
                        let mut src = b.source().map_err(|e| fail(Outcome::Infra, e))?;
                        crate::attest::verdict_from(self.dir, b.serial, &mut src)
                    }
                    (None, Some(d)) => crate::attest::verdict_from(
                        self.dir,
                        self.host.serial,
                        &mut host_oob(&self.host.name, d)?,
                    ),
                    (None, None) => crate::attest::verdict_after(self.dir, &self.state, self.host),
                }
                .map_err(|e| fail(Outcome::Infra, e.to_string()))?;
                if v != want {
                    return Err(fail(
                        Outcome::Fail,
                        format!("step {k} ({label}): counters service said {v} ({why}), expected {want}"),
                    ));
                }
                self.seen.notes.push(format!("service {v} after step {k}"));
                Ok(synthetic())
            }
            StepKind::OobForge if self.board.is_some() || self.dev.is_some() => {
                self.oob_forge_board(k, label).await
            }
            StepKind::OobForge => {
                let backend = self
                    .case
                    .backend
                    .in_process()
                    .unwrap_or(hilrig_device::BackendKind::Model);
                let state = self.state.clone();
                let r = tokio::task::spawn_blocking(move || {
                    let direct = scenario::oob_forge(backend, &state)?;
                    let pty = scenario::oob_forge_pty(&state)?;
                    Ok::<_, scenario::ScenarioError>((direct, pty))
                })
                .await
                .map_err(|e| fail(Outcome::Infra, format!("OOB task: {e}")))?;
                let (direct, pty) =
                    r.map_err(|e| fail(Outcome::Fail, format!("step {k} ({label}): {e}")))?;
                let log = self.file(k, label, "oob.txt");
                let _ = std::fs::write(
                    &log,
                    [direct.clone(), pty.clone()].concat().join("\n") + "\n",
                );
                self.keep(&log, ArtifactKind::Oob);
                self.seen.notes.push(format!(
                    "{} forged/malformed OOB requests refused ({} on the {} device's port, {} over the rig's OOB PTY)",
                    direct.len() + pty.len(),
                    direct.len(),
                    self.case.backend,
                    pty.len()
                ));
                Ok(synthetic())
            }
            StepKind::BeginUpdate(Gen::ProgramSeq(n)) => {
                let nv = self.load()?;
                let image =
                    scenario::program_image(&nv, n, n).map_err(|e| fail(Outcome::Infra, e))?;
                let s = crate::attest::begin_update(self.dir, self.host, Region::Firmware, &image)
                    .map_err(|e| fail(Outcome::Infra, e.to_string()))?;
                self.seen.notes.push(s);
                Ok(synthetic())
            }
            StepKind::BeginUpdate(g) => Err(fail(
                Outcome::Infra,
                format!("begin-update of {g:?}: only program sequences have a target image"),
            )),
            StepKind::PowerCut {
                gen: Gen::ProgramSeq(n),
                cut_after,
            } => self.power_cut(k, label, n, cut_after).await,
            StepKind::PowerCut { gen, .. } => Err(fail(
                Outcome::Infra,
                format!("power cut during {gen:?}: only program sequences announce their steps"),
            )),
            StepKind::PatchStorm => self.patch_storm(k, label, false).await,
            StepKind::BadBundles => self.patch_storm(k, label, true).await,
            StepKind::Rollout => self.rollout(k, label).await,
        }
    }

    /// The rollback attack on a host's own device: the state file copied aside
    /// there (`restore`: the copy put back in place, as a file copy would).
    async fn host_snapshot(&mut self, restore: bool) -> StepOut {
        let (Some(d), Some(r)) = (&self.dev, &self.remote) else {
            return Err(fail(Outcome::Infra, "no host device"));
        };
        let (p, snap) = (
            shell_quote(&d.state),
            shell_quote(&format!("{}.snapshot", d.state)),
        );
        let line = if restore {
            format!("set -e; t=$(mktemp {p}.XXXXXX); cat {snap} > \"$t\"; mv -f \"$t\" {p}")
        } else {
            format!("set -e; umask 077; cat {p} > {snap}")
        };
        let ssh = r.ssh.clone();
        blocking(move || ssh.sh_within(&line, KILL_TIMEOUT).map(|_| ()))
            .await
            .map_err(|e| fail(Outcome::Infra, format!("the host's state file: {e}")))?;
        self.seen.notes.push(
            if restore {
                "old state file restored on the host"
            } else {
                "state snapshot taken on the host"
            }
            .into(),
        );
        Ok(synthetic())
    }

    /// Forged and malformed OOB requests on the board's OOB port (serialport, as
    /// the rig reaches it); a port that stops answering is INFRA.
    async fn oob_forge_board(&mut self, k: usize, label: &str) -> StepOut {
        let (spec, nv) = match (&self.board, &self.dev) {
            (Some(b), _) => (
                hilrig_rig::inventory::OobSpec::Serial {
                    path: b.oob.clone(),
                    baud: b.baud,
                    timeout_ms: 3000,
                },
                b.factory.clone(),
            ),
            (None, Some(d)) => (d.oob.clone(), self.load()?),
            (None, None) => return Err(fail(Outcome::Infra, "no board")),
        };
        let host = self.host.name.clone();
        let r = tokio::task::spawn_blocking(move || scenario::oob_forge_port(&host, &spec, &nv))
            .await
            .map_err(|e| fail(Outcome::Infra, format!("OOB task: {e}")))?;
        let obs = match r {
            Ok(o) => o,
            Err(e) => {
                // A board that stopped answering is a transport fault, not a finding.
                self.board_check(k, label, &Ok(synthetic()), "")?;
                if let Some(d) = &self.dev {
                    oob_read(&self.host.name, d, |s| s.counters())?;
                }
                let o = match e {
                    scenario::ScenarioError::Setup(_) => Outcome::Infra,
                    _ => Outcome::Fail,
                };
                return Err(fail(o, format!("step {k} ({label}): {e}")));
            }
        };
        let log = self.file(k, label, "oob.txt");
        let _ = std::fs::write(&log, obs.join("\n") + "\n");
        self.keep(&log, ArtifactKind::Oob);
        self.seen.notes.push(format!(
            "{} forged/malformed OOB requests refused on the {}'s OOB port",
            obs.len(),
            if self.board.is_some() {
                "board"
            } else {
                "host"
            }
        ));
        Ok(synthetic())
    }

    /// The program sequence, power cut (SIGKILL) once the guest has announced
    /// `cut_after` finished PROGRAMs; then the state file must account for every
    /// PROGRAM the flash shows (and every one announced), MASTER with it.
    async fn power_cut(&mut self, k: usize, label: &str, n: u32, cut_after: u32) -> StepOut {
        let before = self.load()?;
        let bin = self.file(k, label, "payload.bin");
        let code =
            scenario::payload(Gen::ProgramSeq(n), &before).map_err(|e| fail(Outcome::Infra, e))?;
        std::fs::write(&bin, code)
            .map_err(|e| fail(Outcome::Infra, format!("writing {}: {e}", bin.display())))?;
        let images: Vec<Vec<u8>> = (0..=n)
            .map(|i| scenario::program_image(&before, n, i))
            .collect::<Result<_, _>>()
            .map_err(|e| fail(Outcome::Infra, e))?;
        let state = self.state.clone();
        let console = self.file(k, label, "console.txt");
        let spec = self.spec(k, label, &bin, StepVm::default(), &state, |_| {});
        let mut cmd = self.command(&spec);
        let mut child = cmd.spawn().map_err(|e| spawn_error(self.vmm, e))?;
        let markers = |p: &Path| {
            std::fs::read_to_string(p)
                .map(|s| s.lines().filter(|l| l.starts_with('P')).count() as u32)
                .unwrap_or(0)
        };
        let cut = loop {
            if markers(&console) >= cut_after {
                break true;
            }
            if let Ok(Some(_)) = child.try_wait() {
                break false;
            }
            if Instant::now() >= self.deadline {
                return Err(fail(
                    Outcome::Timeout,
                    format!("step {k} ({label}): the guest never reached step {cut_after}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        // Power off: the simulated host's VMM is killed, as the rig's sim power driver does.
        let _ = child.start_kill();
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| fail(Outcome::Infra, format!("waiting for the VMM: {e}")))?;
        let _ = std::fs::write(self.file(k, label, "stderr.txt"), &out.stderr);
        self.keep(&console, ArtifactKind::Console);
        if !cut {
            return Err(fail(
                Outcome::Infra,
                format!(
                    "step {k} ({label}): the VMM ended ({}) before the rig could cut power",
                    out.status
                ),
            ));
        }
        let announced = markers(&console);
        let after = self.load()?;
        let fw = &after.flash[Region::Firmware as usize];
        let Some(acted) = images.iter().position(|im| im == fw) else {
            return Err(fail(
                Outcome::Fail,
                format!("step {k} ({label}): after the cut FIRMWARE is none of the sequence's states (torn write)"),
            ));
        };
        let acted = acted as u32;
        let c = |nv: &NvState| nv.counter(Region::Firmware);
        let counted = c(&after).saturating_sub(c(&before));
        let master = after.master.saturating_sub(before.master);
        let mut bad = Vec::new();
        if counted < acted {
            bad.push(format!(
                "UNDERCOUNT: {acted} PROGRAMs reached the flash but the counter moved {counted}"
            ));
        }
        if counted < announced {
            bad.push(format!("UNDERCOUNT: the guest finished {announced} PROGRAMs but the counter moved {counted}"));
        }
        if counted > n {
            bad.push(format!("the counter moved {counted} for {n} PROGRAMs"));
        }
        if master != counted {
            bad.push(format!(
                "MASTER moved {master}, the FIRMWARE counter {counted}"
            ));
        }
        if acted >= n {
            return Err(fail(
                Outcome::Infra,
                format!("step {k} ({label}): the cut came after the whole sequence ({acted}/{n} PROGRAMs)"),
            ));
        }
        if !bad.is_empty() {
            return Err(fail(
                Outcome::Fail,
                format!("step {k} ({label}): {}", bad.join("; ")),
            ));
        }
        self.seen.notes.push(format!(
            "power cut after {announced}/{n} PROGRAMs announced: {acted} reached the flash, {counted} counted"
        ));
        Ok(synthetic())
    }

    async fn wait_socket(
        &self,
        sock: &Path,
        child: &mut tokio::process::Child,
    ) -> Result<(), Stop> {
        let t0 = Instant::now();
        while !sock.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(fail(
                    Outcome::Infra,
                    format!("the VMM ended ({st}) before its control socket appeared"),
                ));
            }
            if t0.elapsed() > SOCKET_WAIT || Instant::now() >= self.deadline {
                return Err(fail(
                    Outcome::Infra,
                    format!("control socket {} never appeared", sock.display()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// A storm guest with a control socket; then a good patch and quiesces
    /// (`bad` = false) or every kind of bad bundle (`bad` = true); then teardown
    /// over the socket.
    async fn patch_storm(&mut self, k: usize, label: &str, bad: bool) -> StepOut {
        let prefix = self.dir.join("patch-signer");
        let pubkey = scenario::keygen(&prefix).map_err(|e| fail(Outcome::Infra, e))?;
        let build = hash_vmm(self.vmm).await?;
        let good = self.dir.join("policy-v2.bundle");
        let good_bytes = scenario::write_bundle(&prefix, 2, build, &good)
            .map_err(|e| fail(Outcome::Infra, e))?;
        let sock = self.socket(label)?;
        let record = self.file(k, label, "teardown.json");
        let (applied, applied_key) = self.patch_record(k, label)?;
        let state = self.state.clone();
        let binding = self.binding(k, label, &state)?;
        let spec = self.spec(k, label, "storm".as_ref(), StepVm::default(), &state, |s| {
            s.vcpus = STORM_VCPUS as u8;
            s.control = Some(sock.clone());
            s.patch_pubkeys = vec![pubkey];
            s.patch_record = Some(applied);
            s.patch_record_key = Some(applied_key);
            s.teardown_record = Some(record);
            bind_spec(s, &binding);
        });
        let mut cmd = self.command(&spec);
        let mut child = cmd.spawn().map_err(|e| spawn_error(self.vmm, e))?;
        let (out_task, err_task) = drain(&mut child);
        let left = self.left();
        let case_timeout = self.case.timeout;
        let driven = async {
            self.wait_socket(&sock, &mut child).await?;
            settle(&sock).await?;
            let mut notes = Vec::new();
            if !bad {
                let lat = trap_windows(&sock, STORM_VCPUS).await?;
                notes.push(format!(
                    "trap path under the storm: {:.1} us per trapped access (median of {} windows)",
                    median(&lat),
                    lat.len()
                ));
                self.seen.trap_latency_us.extend(lat);
            }
            if bad {
                notes.extend(self.bad_bundles(&sock, &prefix, build, &good_bytes).await?);
            } else {
                let ev = match ask(&sock, Request::Patch { bundle: good }).await? {
                    Ok(Reply::Patch(ev)) if ev.to == 2 => ev,
                    other => {
                        return Err(fail(
                            Outcome::Fail,
                            format!("the signed patch was not applied: {other:?}"),
                        ))
                    }
                };
                notes.push(format!(
                    "patch policy {} -> {} in {} us blackout",
                    ev.from,
                    ev.to,
                    ev.blackout_us
                        .map_or("(held)".to_string(), |b| b.to_string())
                ));
                for _ in 0..QUIESCES {
                    // Bare quiesces: recorded apart from patch blackouts (not bounded).
                    match ask(&sock, Request::Quiesce {}).await? {
                        Ok(Reply::Quiesce(q)) if q.blackout_us.is_some() => self
                            .seen
                            .quiesce_blackouts_us
                            .push(q.blackout_us.unwrap_or(0) as f64),
                        other => {
                            return Err(fail(Outcome::Fail, format!("quiesce failed: {other:?}")))
                        }
                    }
                }
                // The new rules are in force: the storm's SCRATCH writes now alarm.
                let t0 = Instant::now();
                loop {
                    let m = metrics(&sock).await?;
                    let alarms = m.policy.as_ref().map_or(0, |p| p.alarms);
                    if alarms > 0 {
                        notes.push(format!(
                            "patched rules in force: {alarms} alarms, {} blackouts (max {} us)",
                            m.blackouts.count, m.blackouts.max_us
                        ));
                        break;
                    }
                    if t0.elapsed() > Duration::from_secs(10) {
                        return Err(fail(
                            Outcome::Fail,
                            format!("the patched rules never raised an alarm: {m:?}"),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            match ask(&sock, Request::Teardown {}).await? {
                // The record the socket hands back is this run's.
                Ok(Reply::Teardown(rec)) => socket_record(k, label, &rec, &binding)?,
                other => {
                    return Err(fail(
                        Outcome::Fail,
                        format!("teardown over the control socket failed: {other:?}"),
                    ))
                }
            }
            Ok(notes)
        };
        let notes = match tokio::time::timeout(left, driven).await {
            Err(_) => {
                return Err(fail(
                    Outcome::Timeout,
                    format!("step {k} ({label}) still running after the case timeout of {case_timeout:?}: killed"),
                ))
            }
            Ok(Err(e)) => {
                self.abandon(k, label, &mut child, err_task).await;
                return Err(e);
            }
            Ok(Ok(n)) => n,
        };
        self.seen.notes.extend(notes);
        let status = match tokio::time::timeout(self.left(), child.wait()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(fail(Outcome::Infra, format!("waiting for the VMM: {e}"))),
            Err(_) => {
                return Err(fail(
                    Outcome::Timeout,
                    "the VMM did not end after its teardown",
                ))
            }
        };
        let out = std::process::Output {
            status,
            stdout: out_task.await.unwrap_or_default(),
            stderr: err_task.await.unwrap_or_default(),
        };
        let summary = self.collect(k, label, out)?;
        bound_record(k, label, summary, &binding)
    }

    async fn bad_bundles(
        &mut self,
        sock: &Path,
        prefix: &Path,
        build: [u8; 32],
        good: &[u8],
    ) -> Result<Vec<String>, Stop> {
        let d = self.dir;
        let infra = |e: scenario::ScenarioError| fail(Outcome::Infra, e);
        let foreign = d.join("foreign-signer");
        scenario::keygen(&foreign).map_err(infra)?;
        let mut other_build = build;
        other_build[0] ^= 0xff;
        let mut tampered = good.to_vec();
        let n = tampered.len();
        if n > 3 {
            tampered[n - 3] ^= 1;
        }
        let write = |name: &str, b: &[u8]| -> Result<PathBuf, Stop> {
            let p = d.join(name);
            std::fs::write(&p, b)
                .map_err(|e| fail(Outcome::Infra, format!("{}: {e}", p.display())))?;
            Ok(p)
        };
        let bundle = |name: &str, pre: &Path, version: u64, b: [u8; 32]| {
            let p = d.join(name);
            scenario::write_bundle(pre, version, b, &p)
                .map(|_| p)
                .map_err(|e| fail(Outcome::Infra, e))
        };
        let cases: Vec<(&str, PathBuf, &str)> = vec![
            (
                "bad signature",
                bundle("bad-signature.bundle", &foreign, 2, build)?,
                "not a trusted key",
            ),
            (
                "tampered payload",
                write("tampered.bundle", &tampered)?,
                "SHA-256 does not match",
            ),
            (
                "wrong build",
                bundle("wrong-build.bundle", prefix, 2, other_build)?,
                "targets VMM build",
            ),
            (
                "same version",
                bundle("same-version.bundle", prefix, 1, build)?,
                "not newer",
            ),
            (
                "downgrade",
                bundle("downgrade.bundle", prefix, 0, build)?,
                "not newer",
            ),
            (
                "truncated",
                write("truncated.bundle", &good[..good.len() / 2])?,
                "truncated",
            ),
        ];
        let mut notes = Vec::new();
        let mut bad = Vec::new();
        for (what, path, want) in cases {
            match ask(sock, Request::Patch { bundle: path }).await? {
                Err(err) if err.contains(want) => notes.push(format!("{what}: refused ({want})")),
                other => bad.push(format!(
                    "{what}: {other:?} (expected a refusal with `{want}`)"
                )),
            }
            match ask(sock, Request::Status {}).await? {
                Ok(Reply::Status(st))
                    if st.state == VmState::Running && st.versions.policy == 1 => {}
                other => bad.push(format!(
                    "after the {what} bundle the VM is not serving unchanged: {other:?}"
                )),
            }
        }
        let m0 = metrics(sock).await?;
        if m0.blackouts.count != 0 {
            bad.push(format!("a refused patch paused the VM: {:?}", m0.blackouts));
        }
        let t0 = Instant::now();
        loop {
            let m = metrics(sock).await?;
            if m.parts() > m0.parts() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bad.push("the guest stopped making progress after the bad bundles".into());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if bad.is_empty() {
            Ok(notes)
        } else {
            Err(fail(Outcome::Fail, bad.join("; ")))
        }
    }

    /// A fleet of VMMs, host [`BAD_HOST`] not trusting the signer; rollout canary
    /// 1, waves of 2: stops at the bad host, earlier hosts patched, later untouched.
    async fn rollout(&mut self, k: usize, label: &str) -> StepOut {
        let prefix = self.dir.join("patch-signer");
        let pubkey = scenario::keygen(&prefix).map_err(|e| fail(Outcome::Infra, e))?;
        let other = scenario::keygen(&self.dir.join("other-signer"))
            .map_err(|e| fail(Outcome::Infra, e))?;
        let build = hash_vmm(self.vmm).await?;
        let bundle = self.dir.join("policy-v2.bundle");
        scenario::write_bundle(&prefix, 2, build, &bundle).map_err(|e| fail(Outcome::Infra, e))?;
        let mut children = Vec::new();
        let mut targets = Vec::new();
        let mut bindings = Vec::new();
        for i in 0..FLEET {
            let name = format!("fleet-{i}");
            let state = self.dir.join(format!("{name}.state"));
            prepare_state(Setup::Factory, self.host, &state)
                .map_err(|e| fail(Outcome::Infra, e))?;
            let sock = self.socket(&name)?;
            let key = if i == BAD_HOST { &other } else { &pubkey };
            let binding = self.binding(k, &name, &state)?;
            // Each host its own record of applied versions.
            let (applied, applied_key) = self.patch_record(k, &name)?;
            let spec = self.spec(k, &name, "spin".as_ref(), StepVm::default(), &state, |s| {
                s.control = Some(sock.clone());
                s.patch_pubkeys = vec![key.clone()];
                s.patch_record = Some(applied);
                s.patch_record_key = Some(applied_key);
                bind_spec(s, &binding);
            });
            bindings.push(binding);
            let mut cmd = self.command(&spec);
            let mut child = cmd.spawn().map_err(|e| spawn_error(self.vmm, e))?;
            let pipes = drain(&mut child);
            children.push((name.clone(), child, pipes));
            targets.push(hilrig_rig::rollout::Target { name, socket: sock });
        }
        let mut up = Ok(());
        for ((_, child, _), t) in children.iter_mut().zip(&targets) {
            up = self.wait_socket(&t.socket, child).await;
            if up.is_err() {
                break;
            }
        }
        if let Err(e) = up {
            for (name, mut child, (_, err)) in children {
                self.abandon(k, &name, &mut child, err).await;
            }
            return Err(e);
        }
        let ts = targets.clone();
        let b = bundle.clone();
        let report = tokio::task::spawn_blocking(move || {
            hilrig_rig::rollout::rollout(
                &hilrig_rig::rollout::Sockets {
                    timeout: CONTROL_TIMEOUT,
                },
                &ts,
                &b,
                1,
                2,
            )
        })
        .await
        .map_err(|e| fail(Outcome::Infra, format!("rollout task: {e}")))?;
        let rpath = self.file(k, label, "rollout.json");
        let _ = std::fs::write(
            &rpath,
            serde_json::to_vec_pretty(&report).unwrap_or_default(),
        );
        self.keep(&rpath, ArtifactKind::Other);
        use hilrig_rig::rollout::HostOutcome;
        let mut bad = Vec::new();
        let bad_name = &targets[BAD_HOST].name;
        if report.complete {
            bad.push("the rollout says complete although a host refused".into());
        }
        match &report.stopped {
            Some(s) if s.starts_with(&format!("{bad_name} in wave 1: refused")) => {}
            other => bad.push(format!(
                "rollout stopped {other:?}, expected at {bad_name} in wave 1"
            )),
        }
        for (i, h) in report.hosts.iter().enumerate() {
            let v = h.versions.map(|v| v.policy);
            let (ok, want_v) = match (&h.outcome, i) {
                // (Its blackout is taken from the VMM's own JSON at teardown.)
                (HostOutcome::Applied { .. }, i) if i < BAD_HOST => (true, 2),
                (HostOutcome::Refused { reason }, i) if i == BAD_HOST => {
                    (reason.contains("not a trusted key"), 1)
                }
                (HostOutcome::Skipped, i) if i > BAD_HOST => (true, 1),
                _ => (false, 0),
            };
            if !ok || v != Some(want_v) {
                bad.push(format!(
                    "{} (wave {}): {:?}, policy version {v:?}, expected version {want_v}",
                    h.target.name, h.wave, h.outcome
                ));
            }
        }
        // Tear the fleet down.
        for (((name, mut child, (o, e)), t), binding) in
            children.into_iter().zip(&targets).zip(&bindings)
        {
            match ask(&t.socket, Request::Teardown {}).await {
                Ok(Ok(Reply::Teardown(rec))) => {
                    if let Err(e) = socket_record(k, &name, &rec, binding) {
                        bad.push(e.message);
                    }
                }
                Ok(r) => bad.push(format!("{name}: teardown refused: {r:?}")),
                Err(e) => bad.push(format!("{name}: teardown: {}", e.message)),
            }
            let status = match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
                Ok(Ok(s)) => s,
                _ => {
                    let _ = child.start_kill();
                    match child.wait().await {
                        Ok(s) => s,
                        Err(e) => return Err(fail(Outcome::Infra, format!("{name}: {e}"))),
                    }
                }
            };
            let out = std::process::Output {
                status,
                stdout: o.await.unwrap_or_default(),
                stderr: e.await.unwrap_or_default(),
            };
            match self
                .collect(k, &name, out)
                .and_then(|sm| bound_record(k, &name, sm, binding))
            {
                Err(e) => bad.push(format!("{name}: {}", e.message)),
                Ok(summary) => {
                    let complete = summary.teardown.as_ref().map(|t| t.complete);
                    if summary.exit_status != ExitStatus::Stopped || complete != Some(true) {
                        bad.push(format!(
                            "{name}: ended {} ({}) after its teardown, teardown complete = {complete:?}",
                            summary.exit_status, summary.verdict
                        ));
                    }
                }
            }
        }
        if !bad.is_empty() {
            return Err(fail(
                Outcome::Fail,
                format!("step {k} ({label}): {}", bad.join("; ")),
            ));
        }
        self.seen.notes.push(format!(
            "rollout stopped at {bad_name} in wave 1; {BAD_HOST} hosts patched, {} untouched",
            FLEET - BAD_HOST - 1
        ));
        Ok(synthetic())
    }
}

type Pipe = tokio::task::JoinHandle<Vec<u8>>;

/// Prefix of an attempt message that is a setup (configuration) error: not
/// retried as INFRA, the case is SKIPPED and the run exits 2.
pub const CONFIG_PREFIX: &str = "CONFIG: ";

/// A VMM that cannot be started: missing or not executable is a setup error
/// (CONFIG), anything else an infrastructure fault.
fn spawn_error(vmm: &Path, e: std::io::Error) -> Stop {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::NotFound | K::PermissionDenied => fail(
            Outcome::Skipped,
            format!(
                "{CONFIG_PREFIX}the VMM {} cannot be run: {e}",
                vmm.display()
            ),
        ),
        _ => fail(Outcome::Infra, format!("spawning {}: {e}", vmm.display())),
    }
}

/// Longest wait for the console end marker after a remote step (it follows the
/// VMM's last byte on the line; a real serial line at a low baud rate may take a
/// while to carry what was still queued).
const CONSOLE_END_WAIT: Duration = Duration::from_secs(3);
/// The console's settle after a remote step without a marker (a build without
/// the step agent, or a step that failed).
const CONSOLE_SETTLE: Duration = Duration::from_millis(100);

/// Bound on killing a timed-out VMM on a remote host over SSH.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why blocking remote work failed.
#[derive(Debug, thiserror::Error)]
enum BlockingError {
    #[error(transparent)]
    Remote(#[from] hilrig_rig::remote::RemoteError),
    #[error("task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Run blocking remote work off the tokio workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, hilrig_rig::remote::RemoteError> + Send + 'static,
) -> Result<T, BlockingError> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

/// Read a child's stdout and stderr to their ends in the background.
fn drain(child: &mut tokio::process::Child) -> (Pipe, Pipe) {
    fn read<R: tokio::io::AsyncRead + Unpin + Send + 'static>(r: Option<R>) -> Pipe {
        tokio::spawn(async move {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf).await;
            }
            buf
        })
    }
    (read(child.stdout.take()), read(child.stderr.take()))
}

/// One control request: the VMM's response (a reply or its refusal); no
/// well-formed response at all is an infrastructure fault.
async fn ask(sock: &Path, req: Request) -> Result<Response, Stop> {
    let s = sock.to_path_buf();
    let op = req.op();
    tokio::task::spawn_blocking(move || hilrig_vmm_api::control::request(&s, &req, CONTROL_TIMEOUT))
        .await
        .map_err(|e| fail(Outcome::Infra, format!("control task: {e}")))?
        .map_err(|e| fail(Outcome::Infra, format!("{op}: {e}")))
}

/// The VMM's metrics (a refusal is an infrastructure fault).
async fn metrics(sock: &Path) -> Result<Metrics, Stop> {
    match ask(sock, Request::Metrics {}).await? {
        Ok(Reply::Metrics(m)) => Ok(*m),
        other => Err(fail(
            Outcome::Infra,
            format!("metrics from {}: {other:?}", sock.display()),
        )),
    }
}

/// vCPUs of the storm guest.
const STORM_VCPUS: u32 = 2;
/// Windows sampled for the trap latency, and their length.
const TRAP_WINDOWS: usize = 10;
const TRAP_WINDOW: Duration = Duration::from_millis(40);

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

/// The trapped-MMIO round trip under the storm, one sample per window: window
/// time x vCPUs / trapped accesses decided in it (every storm access traps, and
/// each vCPU does nothing else), from the control socket's policy counters.
async fn trap_windows(sock: &Path, vcpus: u32) -> Result<Vec<f64>, Stop> {
    let mut out = Vec::new();
    let mut prev = (Instant::now(), metrics(sock).await?.parts());
    for _ in 0..TRAP_WINDOWS {
        tokio::time::sleep(TRAP_WINDOW).await;
        let now = (Instant::now(), metrics(sock).await?.parts());
        let n = now.1.saturating_sub(prev.1);
        if n > 0 {
            let us = (now.0 - prev.0).as_secs_f64() * 1e6 * f64::from(vcpus) / n as f64;
            out.push(us);
        }
        prev = now;
    }
    Ok(out)
}

/// Wait until the guest makes progress (decided accesses keep coming).
async fn settle(sock: &Path) -> Result<(), Stop> {
    let t0 = Instant::now();
    loop {
        let m = metrics(sock).await?;
        if m.parts() > 20 {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(20) {
            return Err(fail(
                Outcome::Infra,
                format!("the guest made no progress: {m:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn hash_vmm(vmm: &Path) -> Result<[u8; 32], Stop> {
    let p = vmm.to_path_buf();
    tokio::task::spawn_blocking(move || scenario::file_sha256(&p))
        .await
        .map_err(|e| fail(Outcome::Infra, format!("hash task: {e}")))?
        .map_err(|e| fail(Outcome::Infra, format!("hashing the VMM build: {e}")))
}

/// Run one attempt of `case` on `host` (this machine) in `dir` (inside `run_dir`).
pub async fn run_attempt(
    case: &Case,
    host: &HostSpec,
    vmm: &Path,
    vmm_args: &[String],
    run_dir: &Path,
    dir: &Path,
) -> AttemptResult {
    let t = Target {
        vmm,
        vmm_args,
        remote: None,
        fpga_sim: None,
        fpga_sim_args: &[],
        pager: None,
    };
    run_attempt_on(case, host, &t, run_dir, dir).await
}

/// Run one attempt of `case` on `host` through `target` (this machine, or the
/// host over SSH) in `dir` (inside `run_dir`; on a remote host in the same
/// relative place under its work directory, removed afterwards).
pub async fn run_attempt_on(
    case: &Case,
    host: &HostSpec,
    target: &Target<'_>,
    run_dir: &Path,
    dir: &Path,
) -> AttemptResult {
    let remote = match (&target.remote, &host.ssh) {
        (Some((ssh, hilrig)), Some(spec)) => {
            let run = run_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into());
            // One flat directory per step (`<dir>-<k>`), removed by the step itself.
            Some(Remote {
                ssh: ssh.clone(),
                hilrig: hilrig.clone(),
                dir: format!(
                    "{}/att/{run}__{}",
                    spec.workdir.trim_end_matches('/'),
                    rel(run_dir, dir).replace('/', "_")
                ),
            })
        }
        _ => None,
    };
    if case.backend == Backend::Fpga {
        if let Err(e) = std::fs::create_dir_all(dir) {
            return *fail(Outcome::Infra, format!("creating {}: {e}", dir.display()));
        }
        let board = match fpga_device(case, host, target, dir).await {
            Ok(b) => b,
            Err(e) => return *e,
        };
        return attempt_inner(case, host, target, run_dir, dir, remote, Some(board)).await;
    }
    attempt_inner(case, host, target, run_dir, dir, remote, None).await
}

/// The device of an `fpga` attempt, fresh and enrolled: the host's board after
/// the keyed OOB PHYSICAL_RESET (enrolled from what its OOB port then reads), or
/// a new `hilrig fpga serve-sim` (enrolled from the state the rig configured it
/// with); then the provisioning gate, read out of band.
async fn fpga_device(
    case: &Case,
    host: &HostSpec,
    target: &Target<'_>,
    dir: &Path,
) -> Result<BoardSession, Stop> {
    let width = match case.attack.setup {
        Setup::Width(w) => w,
        _ => host.counter_width,
    };
    let (host_c, dir_p, case_timeout) = (host.clone(), dir.to_path_buf(), case.timeout);
    let pager = target.pager.cloned();
    let sim = match &host.fpga {
        FpgaTarget::Unavailable(why) => {
            return Err(fail(
                Outcome::Skipped,
                format!("{CONFIG_PREFIX}host {} cannot run fpga: {why}", host.name),
            ))
        }
        // A lab host's board: its OOB port is lent to the host's VMM through
        // `hilrig fpga relay-oob`, so the build there must be `hilrig` itself (as
        // `hilrig campaign run` runs it), not a bare VMM. Checked before the
        // board is touched.
        FpgaTarget::Board(_)
            if host.ssh.is_some() && hilrig_rig::sim::vmm_prefix(target.vmm).is_empty() =>
        {
            return Err(fail(
                Outcome::Skipped,
                format!(
                    "{CONFIG_PREFIX}host {} has a board: its OOB port is lent to the host through `hilrig fpga relay-oob`, so the VMM must be `hilrig` itself, not {}",
                    host.name,
                    target.vmm.display()
                ),
            ));
        }
        FpgaTarget::Board(_) => None,
        FpgaTarget::Sim => {
            let Some(h) = crate::board::find_hilrig(target.fpga_sim, target.vmm) else {
                return Err(fail(
                    Outcome::Skipped,
                    format!(
                        "{CONFIG_PREFIX}no `hilrig` executable to run `fpga serve-sim` (none beside the VMM {}; RunOptions::fpga_sim)",
                        target.vmm.display()
                    ),
                ));
            };
            Some((h, target.fpga_sim_args.to_vec()))
        }
    };
    tokio::task::spawn_blocking(move || -> Result<BoardSession, Stop> {
        let infra =
            |what: &str, e: &dyn std::fmt::Display| fail(Outcome::Infra, format!("{what}: {e}"));
        let (mut b, expected) = match (&host_c.fpga, sim) {
            (FpgaTarget::Board(board), _) => {
                let mut b = BoardSession::open_board(board, width)
                    .map_err(|e| infra("preparing the board", &e))?;
                let exp = b.observe().map_err(|e| infra("reading the board", &e))?;
                (b, exp)
            }
            (_, Some((h, args))) => {
                if !h.is_file() {
                    return Err(fail(
                        Outcome::Skipped,
                        format!(
                            "{CONFIG_PREFIX}{} (for `fpga serve-sim`) does not exist",
                            h.display()
                        ),
                    ));
                }
                let life = case_timeout + Duration::from_secs(60);
                let b = BoardSession::start_sim(
                    &h,
                    &args,
                    width,
                    host_c.serial,
                    life,
                    &dir_p.join("serve-sim.txt"),
                )
                .map_err(|e| infra("the simulated board", &e))?;
                let exp = crate::attest::observation_of(&b.factory)
                    .map_err(|e| infra("the simulated board's factory state", &e))?;
                (b, exp)
            }
            _ => return Err(fail(Outcome::Infra, "no board")),
        };
        crate::attest::enroll_observation(&dir_p, &host_c, b.serial, &expected)
            .map_err(|e| infra("enrolling the device", &e))?;
        let mut src = b.source().map_err(|e| infra("provisioning", &e))?;
        crate::attest::provision_from_paging(&dir_p, b.serial, &mut src, pager.as_ref())
            .map_err(|e| infra("provisioning", &e))?;
        drop(src);
        b.alive().map_err(|e| infra("the board", &e))?;
        Ok(b)
    })
    .await
    .map_err(|e| fail(Outcome::Infra, format!("board task: {e}")))?
}

#[allow(clippy::too_many_arguments)]
async fn attempt_inner(
    case: &Case,
    host: &HostSpec,
    target: &Target<'_>,
    run_dir: &Path,
    dir: &Path,
    remote: Option<Remote>,
    board: Option<BoardSession>,
) -> AttemptResult {
    if let Err(e) = std::fs::create_dir_all(dir) {
        return *fail(Outcome::Infra, format!("creating {}: {e}", dir.display()));
    }
    let state = dir.join("state.bin");
    let mut board = board;
    // An SSH host's own device (an fpga case uses its board instead).
    let dev = match (&remote, &board) {
        (Some(_), None) => host.device.clone(),
        _ => None,
    };
    let before = match (&mut board, &dev, &remote) {
        (Some(b), _, _) => match b.observe() {
            Ok(o) => o,
            Err(e) => return *fail(Outcome::Infra, format!("reading the board: {e}")),
        },
        // The case's device prepared here and put in place on the host; from
        // then on it is read only through the host's OOB port.
        (None, Some(d), Some(r)) => {
            let nv = match prepare_state(case.attack.setup, host, &state) {
                Ok(nv) => nv,
                Err(e) => return *fail(Outcome::Infra, e),
            };
            // One open of the host's OOB port for the case's start (opened
            // exclusively: one opener at a time). The line reaches this host's
            // device (a PTY path whose server died may name another device's
            // line by now).
            let mut src = match host_oob(&host.name, d) {
                Ok(s) => s,
                Err(e) => return *e,
            };
            match src.request(&hilrig_device::oob::Request::Identify) {
                Ok(hilrig_device::oob::Response::Identity { serial, .. })
                    if serial == host.serial => {}
                Ok(other) => {
                    return *fail(
                        Outcome::Infra,
                        format!(
                            "the host's OOB line failed, not the device: {} answered IDENTIFY with {other:?}, expected serial {}",
                            hilrig_rig::oob::describe(&d.oob),
                            host.serial
                        ),
                    )
                }
                Err(e) => {
                    return *fail(
                        Outcome::Infra,
                        format!("the host's OOB line failed, not the device: {e}"),
                    )
                }
            }
            if let Err(e) = install_device(r, d, &state, case.timeout).await {
                return *e;
            }
            if let Err(e) = crate::attest::enroll(dir, host, &nv) {
                return *fail(Outcome::Infra, format!("enrolling the device: {e}"));
            }
            // The provisioning gate reads the device out of band; what it read
            // is the device as the case starts on it.
            let gate = crate::attest::provision_observed(dir, host.serial, &mut src, target.pager);
            drop(src);
            match gate {
                Ok(Some(o)) => o,
                Ok(None) => match oob_read(&host.name, d, |s| s.observe()) {
                    Ok(o) => o,
                    Err(e) => return *e,
                },
                Err(e) => return *fail(Outcome::Infra, format!("provisioning: {e}")),
            }
        }
        _ => {
            let nv = match prepare_state(case.attack.setup, host, &state) {
                Ok(nv) => nv,
                Err(e) => return *fail(Outcome::Infra, e),
            };
            if let Err(e) = crate::attest::enroll(dir, host, &nv) {
                return *fail(Outcome::Infra, format!("enrolling the device: {e}"));
            }
            if let Err(e) = crate::attest::provision_paging(dir, &state, host, target.pager) {
                return *fail(Outcome::Infra, format!("provisioning: {e}"));
            }
            match crate::attest::observation_of(&nv) {
                Ok(o) => o,
                Err(e) => return *fail(Outcome::Infra, e),
            }
        }
    };
    let mut att = Att {
        case,
        host,
        vmm: target.vmm,
        vmm_args: target.vmm_args,
        run_dir,
        dir,
        state,
        deadline: Instant::now() + case.timeout,
        artifacts: Vec::new(),
        seen: Observed::default(),
        sockets: None,
        remote,
        board,
        dev,
    };
    att.seen.readings.push(reading_of(&before.report));
    let n = case.attack.steps.len();
    let mut last: Option<RunSummary> = None;
    // An SSH host's device after its last step: its reading is the one the
    // service's verdict takes after the case (one OOB read, not two).
    let after_reads = att.board.is_none() && att.dev.is_some();
    for (k, step) in case.attack.steps.iter().enumerate() {
        let mut r = att.step(k, step).await;
        let reading = if after_reads && k + 1 == n && r.is_ok() {
            Ok(None)
        } else {
            att.read_now()
        };
        match reading {
            Ok(Some(x)) => att.seen.readings.push(x),
            Ok(None) => {}
            // The board stopped answering: whatever the step saw, a transport fault.
            Err(mut e) => {
                if let Err(step) = &r {
                    e.message = format!("{} (step {k} had ended: {})", e.message, step.message);
                }
                r = Err(e)
            }
        }
        let summary = match r {
            Ok(x) => x,
            Err(e) => {
                let mut e = *e;
                e.artifacts = std::mem::take(&mut att.artifacts);
                e.metrics = att.seen.metrics(0);
                return e;
            }
        };
        if k + 1 < n && summary.exit_status != ExitStatus::Pass {
            let mut r = *fail(
                Outcome::Fail,
                format!(
                    "step {k} ({}) ended {} (exit {}), expected pass",
                    step.payload, summary.verdict, summary.exit_status
                ),
            );
            r.artifacts = att.artifacts;
            return r;
        }
        last = Some(summary);
    }
    let Some(summary) = last else {
        return *fail(Outcome::Infra, "the attack has no steps");
    };
    // The device after the case and the service's verdict on it: read out of
    // band (an SSH host's device: one open of its OOB port, the verdict's own
    // reading as the after one).
    let read = match (&mut att.board, &att.dev) {
        (Some(b), _) => b
            .observe()
            .map_err(|e| format!("reading the board after the case: {e}"))
            .and_then(|after| {
                b.source()
                    .map_err(|e| crate::attest::AttestError::Prepared {
                        detail: e.to_string(),
                    })
                    .and_then(|mut src| crate::attest::verdict_from(dir, b.serial, &mut src))
                    .map(|v| (after, v))
                    .map_err(|e| e.to_string())
            }),
        (None, Some(d)) => host_oob(&host.name, d)
            .map_err(|e| e.message)
            .and_then(|mut src| {
                let (v, why, obs) = crate::attest::verdict_observed(dir, host.serial, &mut src)
                    .map_err(|e| {
                        format!("the service's verdict after the case, read through the host's OOB line: {e}")
                    })?;
                drop(src);
                let after = match obs {
                    Some(o) => o,
                    None => oob_read(&host.name, d, |s| s.observe()).map_err(|e| e.message)?,
                };
                Ok((after, (v, why)))
            })
            .inspect(|(after, _)| att.seen.readings.push(reading_of(&after.report))),
        (None, None) => NvState::load(&att.state)
            .map_err(|e| format!("reading the device state after the case: {e}"))
            .and_then(|nv| crate::attest::observation_of(&nv).map_err(|e| e.to_string()))
            .and_then(|after| {
                crate::attest::verdict_after(dir, &att.state, host)
                    .map(|v| (after, v))
                    .map_err(|e| e.to_string())
            }),
    };
    let (after, service) = match read {
        Ok(x) => x,
        Err(e) => {
            let mut r = *fail(Outcome::Infra, e);
            r.artifacts = att.artifacts;
            return r;
        }
    };
    let mut r = check_observed(case, &summary, &before, &after, Some(&service), &att.seen);
    r.artifacts = att.artifacts;
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use hilrig_vmm_api::{Nonce, RunBinding, TeardownRecord};

    fn with_record(vm: &str, serial: u64, nonce: Nonce) -> RunSummary {
        let rec = TeardownRecord {
            vm: vm.into(),
            serial: Some(serial),
            nonce: Some(nonce),
            started_unix: 0,
            steps: Vec::new(),
            complete: true,
            total_micros: 1,
            guest_bytes_scrubbed: 0,
            device_bytes_scrubbed: 0,
            counters: None,
            verdict: None,
            trigger: None,
            detached: false,
            signer: String::new(),
            signature: String::new(),
        };
        RunSummary {
            teardown: Some(rec),
            ..RunSummary::synthetic("canary-scan")
        }
    }

    #[test]
    fn a_teardown_record_replayed_from_another_run_fails_the_step() {
        let run = RunBinding {
            vm: "residue-0-canary-write".into(),
            serial: 9,
            nonce: Nonce::random().unwrap(),
        };
        // A complete, clean record of an earlier run of the same case and device.
        let replayed = with_record(&run.vm, 9, Nonce::random().unwrap());
        let e = bound_record(0, "canary-write", replayed, &run).unwrap_err();
        assert_eq!(e.outcome, Outcome::Fail);
        assert!(e.message.contains("nonce"), "{}", e.message);
        // Another device's record.
        let other = with_record(&run.vm, 10, run.nonce);
        assert!(bound_record(0, "canary-write", other, &run).is_err());
        // This run's own record, and a step without teardown, pass.
        assert!(bound_record(0, "canary-write", with_record(&run.vm, 9, run.nonce), &run).is_ok());
        assert!(bound_record(0, "x", RunSummary::synthetic("x"), &run).is_ok());
    }

    #[test]
    fn a_control_socket_teardown_record_of_another_run_fails_the_step() {
        let run = RunBinding {
            vm: "patch-0-storm".into(),
            serial: 9,
            nonce: Nonce::random().unwrap(),
        };
        let rec =
            |vm: &str, serial, nonce| with_record(vm, serial, nonce).teardown.expect("a record");
        // Replayed from another run (another nonce), another device, another VM,
        // a record with no binding at all: each fails the step, naming the field.
        for (r, field) in [
            (rec(&run.vm, 9, Nonce::random().unwrap()), "nonce"),
            (rec(&run.vm, 10, run.nonce), "serial"),
            (rec("patch-0-fleet-1", 9, run.nonce), "vm"),
        ] {
            let e = socket_record(0, "storm", &r, &run).unwrap_err();
            assert_eq!(e.outcome, Outcome::Fail);
            assert!(
                e.message.contains("control socket") && e.message.contains(field),
                "{}",
                e.message
            );
        }
        let mut unbound = rec(&run.vm, 9, run.nonce);
        unbound.nonce = None;
        assert!(socket_record(0, "storm", &unbound, &run).is_err());
        // This run's own record passes.
        assert!(socket_record(0, "storm", &rec(&run.vm, 9, run.nonce), &run).is_ok());
    }
}
