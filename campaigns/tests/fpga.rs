//! The `fpga` backend in campaigns, end to end on `hilrig fpga serve-sim` (the
//! board top's RTL behind two PTYs, opened through serialport as a board's
//! USB-serial ports): cases pass with counters read out of band; a host whose
//! inventory names a board (`device = "fpga=PORT,oob=PORT"`) gets it, made fresh
//! with the keyed OOB PHYSICAL_RESET between attempts; a board whose ports close
//! mid-case is INFRA, never a device FAIL. Needs /dev/kvm and the built `hilrig`
//! binary (`cargo build -p hilrig`); says SKIPPED otherwise.

use hilrig_campaigns::runner::{run_campaign, RunOptions};
use hilrig_reports::Outcome;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The VMM and the `hilrig` executable (for `fpga serve-sim`), or why not.
fn tools(test: &str) -> Option<(PathBuf, PathBuf)> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("SKIPPED {test}: /dev/kvm not available");
        return None;
    }
    let vmm = match hilrig_rig::sim::find_vmm(None) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("SKIPPED {test}: no VMM built ({e}); cargo build -p hilrig");
            return None;
        }
    };
    match hilrig_campaigns::board::find_hilrig(None, &vmm) {
        Some(h) => Some((vmm, h)),
        None => {
            eprintln!(
                "SKIPPED {test}: no `hilrig` binary beside {} for `fpga serve-sim`; cargo build -p hilrig",
                vmm.display()
            );
            None
        }
    }
}

/// `hilrig fpga serve-sim` (width 16, `serial`) standing in for a board's
/// USB-serial ports: the process, its bridge port and its OOB port.
fn serve_sim(hilrig: &Path, serial: u64) -> (std::process::Child, String, String) {
    let mut sim = Command::new(hilrig)
        .args(["fpga", "serve-sim", "--width", "16", "--serial"])
        .arg(serial.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(sim.stdout.take().unwrap()).lines();
    let mut next = |want: &str| {
        let l = lines.next().unwrap().unwrap();
        l.strip_prefix(want).unwrap().to_string()
    };
    let host = next("host ");
    let oob = next("oob ");
    (sim, host, oob)
}

fn opts(dir: &Path, body: &str, vmm: PathBuf) -> RunOptions {
    let file = dir.join("c.toml");
    std::fs::write(&file, body).unwrap();
    let mut o = RunOptions::new(file);
    o.out_dir = dir.join("out");
    o.vmm = Some(vmm);
    o.progress = Some(false);
    o.hosts = 2;
    o
}

/// Blocked tenant attacks, an operator's counted (and quarantined) flash program,
/// the counters-page rollback attempts, forged OOB requests on the board's own OOB
/// port and fuse exhaustion (serve-sim started with width 4): every expectation
/// from counters and hashes read out of band.
#[test]
fn fpga_cases_pass_on_serve_sim() {
    let Some((vmm, _)) = tools("fpga_cases_pass_on_serve_sim") else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let body = r#"
name = "fpga"
[defaults]
retries = 0
case_timeout = "240s"
step_timeout = "120s"
[[case]]
attacks = ["attack-key-read"]
backends = ["fpga"]
[[case]]
attacks = ["attack-flash-program"]
backends = ["fpga"]
profiles = ["operator"]
expect = { counter_delta = { firmware = 1, master = 1 }, service_verdict = "quarantined" }
[[case]]
attacks = ["rollback-oob", "fuse-exhaustion"]
backends = ["fpga"]
profiles = ["operator"]
"#;
    let s = run_campaign(opts(t.path(), body, vmm)).unwrap();
    assert_eq!(s.run.cases.len(), 4);
    for c in &s.run.cases {
        assert_eq!(c.backend, "fpga");
        assert_eq!(
            c.outcome,
            Outcome::Pass,
            "{}: {} ({})",
            c.id,
            c.message,
            c.observed
        );
    }
    let op = s
        .run
        .cases
        .iter()
        .find(|c| c.id == "attack-flash-program/fpga/operator@sim")
        .unwrap();
    assert!(op.observed.contains("firmware+1"), "{}", op.observed);
    let oob = s
        .run
        .cases
        .iter()
        .find(|c| c.attack == "rollback-oob")
        .unwrap();
    assert!(
        oob.observed.contains("refused on the board's OOB port"),
        "{}",
        oob.observed
    );
    let fuse = s
        .run
        .cases
        .iter()
        .find(|c| c.attack == "fuse-exhaustion")
        .unwrap();
    assert!(fuse.observed.contains("fuse blown"), "{}", fuse.observed);
    assert_eq!(s.exit_status(), 0);
}

/// serve-sim stops (`--seconds 4`) while the case runs: its PTYs close under the
/// VMM of the first of two steps (`teardown-residue`). The VMM still ends with a
/// verdict (its device failed), which alone would fail the case ("step 0 ended
/// ..., expected pass"), but the runner finds the board gone: INFRA, naming the
/// transport, never FAIL.
#[test]
fn a_board_closed_mid_case_is_infra_not_fail() {
    let Some((vmm, _)) = tools("a_board_closed_mid_case_is_infra_not_fail") else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let body = r#"
name = "fpga-broken"
[defaults]
retries = 0
infra_retries = 0
case_timeout = "240s"
step_timeout = "120s"
[[case]]
attacks = ["teardown-residue"]
backends = ["fpga"]
"#;
    let mut o = opts(t.path(), body, vmm);
    o.hosts = 1;
    o.fpga_sim_args = vec!["--seconds".into(), "4".into()];
    let s = run_campaign(o).unwrap();
    let c = &s.run.cases[0];
    assert_eq!(c.outcome, Outcome::Infra, "{}: {}", c.id, c.message);
    assert!(
        c.message.contains("transport") || c.message.contains("serve-sim"),
        "{}",
        c.message
    );
    assert_eq!(s.exit_status(), 3);
}

/// A host whose inventory names a board: the runner uses its ports (here a
/// serve-sim the test started, standing in for the board's USB-serial ports),
/// never starts a simulation of its own, and before each attempt makes the board
/// fresh with the keyed OOB PHYSICAL_RESET: the second repeat (one counted, locked
/// PROGRAM; the counters page written over) again sees FIRMWARE +1 from cleared
/// counters and the service's `accepted-update`.
#[test]
fn an_inventory_board_is_used_and_reset_between_attempts() {
    let Some((vmm, hilrig)) = tools("an_inventory_board_is_used_and_reset_between_attempts") else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let (mut sim, host, oob) = serve_sim(&hilrig, 4242);
    let inv = t.path().join("inv.toml");
    std::fs::write(
        &inv,
        format!(
            r#"
[lab]
name = "board"
workdir = "{w}"
[[host]]
name = "bench-1"
tags = ["board"]
device = "fpga={host},oob={oob}"
[host.sim]
counter_width = 16
serial = 4242
[host.power]
driver = "sim"
"#,
            w = t.path().join("work").display()
        ),
    )
    .unwrap();
    let body = r#"
name = "board"
[defaults]
retries = 0
infra_retries = 0
case_timeout = "240s"
step_timeout = "120s"
tags = ["board"]
[[case]]
attacks = ["rollback-registers"]
backends = ["fpga"]
profiles = ["operator"]
repeats = 2
"#;
    let mut o = opts(t.path(), body, vmm);
    o.inventory = Some(inv);
    // Any serve-sim the runner started would fail: the board must be the host's.
    o.fpga_sim = Some(t.path().join("no-such-hilrig"));
    let s = run_campaign(o);
    let _ = sim.kill();
    let _ = sim.wait();
    let s = s.unwrap();
    let c = &s.run.cases[0];
    assert_eq!(
        c.outcome,
        Outcome::Pass,
        "{}: {} ({})",
        c.id,
        c.message,
        c.observed
    );
    assert_eq!(c.attempts.len(), 2);
    assert_eq!(c.host, "bench-1");
    // The last attempt started from cleared counters (the reset), not from +1.
    let first = c.metrics.counters.first().unwrap();
    assert_eq!(first.regions["firmware"], 0, "{:?}", c.metrics.counters);
}

/// The OOB relay a lab host's VMM reads its board through (`hilrig fpga
/// relay-oob`, here run locally instead of over SSH): a request written to the
/// relay's PTY is answered by the board on the controller's end (serve-sim's OOB
/// port). Adversarial: the host cannot reset the board through it (a keyed
/// PHYSICAL_RESET is refused there without an answer, EPOCH unchanged,
/// recorded); a board port
/// that never answers gets no made-up answer through the relay (the client times
/// out) and the fault is recorded for the runner (which makes the step INFRA).
#[test]
fn the_oob_relay_answers_from_the_board_and_makes_nothing_up() {
    use hilrig_counters::source::{CounterSource, SerialSource};
    use hilrig_device::oob::Request;
    let Some((_, hilrig)) = tools("the_oob_relay_answers_from_the_board_and_makes_nothing_up")
    else {
        return;
    };
    let relay_cmd = || {
        let mut c = Command::new(&hilrig);
        c.args(["fpga", "relay-oob", "--seconds", "60"]);
        c
    };
    let (mut sim, _, oob) = serve_sim(&hilrig, 4243);
    let baud = hilrig_vmm_api::spec::FPGA_BAUD;
    let timeout = std::time::Duration::from_secs(4);
    let relay = hilrig_campaigns::board::relay(&oob, baud, relay_cmd()).unwrap();
    let mut client = SerialSource::open(&relay.host_path, baud, timeout).unwrap();
    let id = client.request(&Request::Identify);
    let counters = client.counters();
    // Reads only: the board's own reset key, sent from the host, never reaches it.
    let (_, key) = hilrig_device::state::dev_keys(4243);
    let reset = client.request(&Request::PhysicalReset(key));
    let epoch = client.counters().map(|c| c.epoch);
    drop(client);
    let faults = relay.finish();
    let _ = sim.kill();
    let _ = sim.wait();
    match id {
        Ok(hilrig_device::oob::Response::Identity { serial, width, .. }) => {
            assert_eq!((serial, width), (4243, 16))
        }
        other => panic!("IDENTIFY through the relay: {other:?}"),
    }
    let before = counters.unwrap();
    assert_eq!(before.counters, [0, 0, 0]);
    assert!(reset.is_err(), "an answer made up for a reset: {reset:?}");
    assert_eq!(
        epoch.unwrap(),
        before.epoch,
        "the relay let a reset through"
    );
    assert!(faults.iter().any(|f| f.contains("refused")), "{faults:?}");

    // A board OOB port nobody answers on.
    let dead = hilrig_device::oob::PtyServer::new().unwrap();
    let relay = hilrig_campaigns::board::relay(dead.path(), baud, relay_cmd()).unwrap();
    let mut client = SerialSource::open(&relay.host_path, baud, timeout).unwrap();
    let got = client.request(&Request::Identify);
    assert!(
        got.is_err(),
        "an answer through the relay from a dead port: {got:?}"
    );
    drop(client);
    let faults = relay.finish();
    assert!(faults.iter().any(|f| f.contains("no answer")), "{faults:?}");
}
