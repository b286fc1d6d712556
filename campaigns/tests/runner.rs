//! The runner end to end: classification (PASS, FAIL, INFRA, TIMEOUT, FLAKY) with
//! stand-in VMMs (shell scripts: no KVM needed), resume, and the real smoke
//! campaign (needs /dev/kvm and the built hilrig-vmm; skips loudly otherwise).

use hilrig_campaigns::runner::{run_campaign, RunOptions};
use hilrig_campaigns::store::{RunRow, Store};
use hilrig_reports::{CaseResult, Outcome};
use std::path::{Path, PathBuf};

use hilrig_campaigns::testkit::{FAIL_JSON, PASS_JSON};

/// Write an executable stand-in VMM running `body` (sh; "$@" are the VMM flags).
fn fake_vmm(dir: &Path, body: &str) -> PathBuf {
    hilrig_campaigns::testkit::stand_in_vmm(dir, body).unwrap()
}

fn campaign(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("c.toml");
    std::fs::write(&p, body).unwrap();
    p
}

const ONE_CASE: &str = r#"
name = "t"
[defaults]
retries = 1
infra_retries = 2
case_timeout = "2s"
[[case]]
attacks = ["attack-hang"]
"#;

fn opts(dir: &Path, file: PathBuf, vmm: PathBuf) -> RunOptions {
    let mut o = RunOptions::new(file);
    o.out_dir = dir.join("out");
    o.vmm = Some(vmm);
    o.progress = Some(false);
    o
}

fn only(s: &hilrig_campaigns::RunSummary) -> &CaseResult {
    assert_eq!(s.run.cases.len(), 1, "{:?}", s.run.cases);
    &s.run.cases[0]
}

#[test]
fn pass_and_fail_are_told_apart() {
    let t = tempfile::tempdir().unwrap();
    let c = campaign(t.path(), ONE_CASE);
    let v = fake_vmm(t.path(), &format!("echo '{PASS_JSON}'"));
    let s = run_campaign(opts(t.path(), c.clone(), v)).unwrap();
    assert_eq!(only(&s).outcome, Outcome::Pass, "{:?}", only(&s));
    assert_eq!(s.exit_status(), 0);
    assert!(s.report_html.is_file());

    let v = fake_vmm(t.path(), &format!("echo '{FAIL_JSON}'; exit 1"));
    let s = run_campaign(opts(t.path(), c, v)).unwrap();
    let case = only(&s);
    assert_eq!(case.outcome, Outcome::Fail);
    assert_eq!(case.attempts.len(), 2, "retried once: {case:?}");
    assert!(case.message.contains("exit status 1"), "{}", case.message);
    assert!(case.message.contains("no alarm"), "{}", case.message);
    assert_eq!(s.exit_status(), 1);
}

#[test]
fn infra_is_retried_on_other_hosts() {
    let t = tempfile::tempdir().unwrap();
    let c = campaign(t.path(), ONE_CASE);
    let v = fake_vmm(t.path(), "echo booting >&2; kill -9 $$");
    let mut o = opts(t.path(), c, v);
    o.hosts = 3;
    let s = run_campaign(o).unwrap();
    let case = only(&s);
    assert_eq!(case.outcome, Outcome::Infra);
    assert_eq!(case.attempts.len(), 3, "1 + 2 infra retries: {case:?}");
    assert!(case.attempts.iter().all(|a| a.outcome == Outcome::Infra));
    let hosts: std::collections::BTreeSet<&str> =
        case.attempts.iter().map(|a| a.host.as_str()).collect();
    assert_eq!(hosts.len(), 3, "each retry on another host: {case:?}");
    assert_eq!(s.exit_status(), 3, "INFRA is not a test failure");
}

/// A setup error (the VMM binary missing, or not executable) is CONFIG: not
/// retried as INFRA on every host, the case SKIPPED, the run exits 2.
#[test]
fn missing_vmm_is_config_not_retried() {
    let t = tempfile::tempdir().unwrap();
    let not_exec = t.path().join("not-executable");
    std::fs::write(&not_exec, "#!/bin/sh\n").unwrap();
    for vmm in [t.path().join("no-such-vmm"), not_exec] {
        let c = campaign(t.path(), ONE_CASE);
        let mut o = opts(t.path(), c, vmm.clone());
        o.hosts = 3;
        let s = run_campaign(o).unwrap();
        let case = only(&s);
        assert_eq!(case.outcome, Outcome::Skipped, "{case:?}");
        assert_eq!(
            case.attempts.len(),
            1,
            "a setup error is not retried: {case:?}"
        );
        assert!(case.message.starts_with("CONFIG: "), "{}", case.message);
        assert!(
            case.message.contains(&vmm.display().to_string()),
            "{}",
            case.message
        );
        assert_eq!(s.config_errors.len(), 1, "{:?}", s.config_errors);
        assert_eq!(s.exit_status(), 2, "a setup error exits 2");
    }
}

#[test]
fn vmm_killed_mid_case_is_infra_not_fail() {
    let t = tempfile::tempdir().unwrap();
    let c = campaign(t.path(), ONE_CASE);
    let v = fake_vmm(t.path(), "echo booting >&2; kill -9 $$");
    let s = run_campaign(opts(t.path(), c, v)).unwrap();
    let case = only(&s);
    assert_eq!(case.outcome, Outcome::Infra, "{case:?}");
    assert!(case.message.contains("no verdict"), "{}", case.message);
    // A VMM that exits without its JSON (a crash) is INFRA too.
    let c = campaign(t.path(), ONE_CASE);
    let v = fake_vmm(t.path(), "echo 'thread main panicked' >&2; exit 101");
    let s = run_campaign(opts(t.path(), c, v)).unwrap();
    assert_eq!(only(&s).outcome, Outcome::Infra);
    assert!(
        only(&s).message.contains("panicked"),
        "{}",
        only(&s).message
    );
}

#[test]
fn hung_vmm_is_killed_as_timeout() {
    let t = tempfile::tempdir().unwrap();
    let c = campaign(t.path(), &ONE_CASE.replace("retries = 1", "retries = 0"));
    let v = fake_vmm(t.path(), "exec sleep 600");
    let s = run_campaign(opts(t.path(), c, v)).unwrap();
    let case = only(&s);
    assert_eq!(case.outcome, Outcome::Timeout, "{case:?}");
    assert!(case.message.contains("killed"), "{}", case.message);
    assert_eq!(s.exit_status(), 1);
}

#[test]
fn fail_then_pass_is_flaky() {
    let t = tempfile::tempdir().unwrap();
    let c = campaign(t.path(), ONE_CASE);
    let marker = t.path().join("ran-once");
    let v = fake_vmm(
        t.path(),
        &format!(
            "if [ -e {m} ]; then echo '{PASS_JSON}'; else touch {m}; echo '{FAIL_JSON}'; exit 1; fi",
            m = marker.display()
        ),
    );
    let s = run_campaign(opts(t.path(), c, v)).unwrap();
    let case = only(&s);
    assert_eq!(case.outcome, Outcome::Flaky, "{case:?}");
    assert_eq!(case.attempts[0].outcome, Outcome::Fail);
    assert_eq!(case.attempts[1].outcome, Outcome::Pass);
    assert_eq!(s.exit_status(), 0, "FLAKY does not fail the job");
    assert_eq!(s.counts.flaky, 1);
}

#[test]
fn resume_skips_finished_cases_and_keeps_them() {
    let t = tempfile::tempdir().unwrap();
    let c = campaign(
        t.path(),
        "name = \"t\"\n[[case]]\nattacks = [\"attack-hang\", \"attack-key-read\", \"attack-xchg\"]\n",
    );
    let out = t.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    // A runner that died after finishing one case.
    let mut store = Store::open(&out.join("results.sqlite")).unwrap();
    let id = "t-killed";
    store
        .create_run(
            &RunRow {
                id: id.into(),
                campaign: "t".into(),
                file: c.to_string_lossy().into(),
                run_dir: out.join(id).to_string_lossy().into(),
                started_ms: 1,
                finished_ms: None,
            },
            &[],
        )
        .unwrap();
    let kept = CaseResult {
        id: "attack-key-read/model/tenant@sim".into(),
        attack: "attack-key-read".into(),
        backend: "model".into(),
        profile: "tenant".into(),
        host_tag: "sim".into(),
        host: "sim-9".into(),
        outcome: Outcome::Pass,
        attempts: vec![],
        duration_ms: 5,
        message: "from before the kill".into(),
        expected: String::new(),
        observed: String::new(),
        metrics: Default::default(),
        artifacts: vec![],
    };
    store.put_case(id, &kept).unwrap();
    drop(store);
    let log = t.path().join("calls.log");
    let v = fake_vmm(
        t.path(),
        &format!("echo \"$@\" >> {}; echo '{PASS_JSON}'", log.display()),
    );
    let mut o = opts(t.path(), c, v);
    o.resume = Some(id.into());
    let s = run_campaign(o).unwrap();
    assert_eq!(s.run_id, id);
    assert_eq!(s.run.cases.len(), 3);
    let calls = std::fs::read_to_string(&log).unwrap();
    assert!(
        !calls.contains("attack-key-read"),
        "finished case re-run: {calls}"
    );
    assert!(calls.contains("attack-hang") && calls.contains("attack-xchg"));
    let k = s.run.cases.iter().find(|c| c.id == kept.id).unwrap();
    assert_eq!(k.message, "from before the kill");
    assert!(s.run.cases.iter().all(|c| c.outcome == Outcome::Pass));
    // The store knows the run finished; resuming it again runs nothing.
    let mut store = Store::open(&t.path().join("out/results.sqlite")).unwrap();
    assert!(store.run(id).unwrap().unwrap().finished_ms.is_some());
}

/// Issue 19: `--resume` of a run that had finished rewrote its end (9 s became
/// 267.6 s) and its rate (28484 cases/min from the cases finished before).
#[test]
fn resuming_a_finished_run_keeps_its_duration_and_rate() {
    let t = tempfile::tempdir().unwrap();
    let c = campaign(t.path(), ONE_CASE);
    let v = fake_vmm(t.path(), &format!("echo '{PASS_JSON}'"));
    let first = run_campaign(opts(t.path(), c.clone(), v.clone())).unwrap();
    let mut store = Store::open(&t.path().join("out/results.sqlite")).unwrap();
    let before = store.run(&first.run_id).unwrap().unwrap();
    let end = before.finished_ms.expect("finished");
    drop(store);
    // Later: resume it; nothing is left to run.
    std::thread::sleep(std::time::Duration::from_millis(30));
    let mut o = opts(t.path(), c, v);
    o.resume = Some(first.run_id.clone());
    let again = run_campaign(o).unwrap();
    assert_eq!(again.ran_now, 0);
    assert_eq!(again.run.finished_ms, end, "the report's end is the run's");
    assert_eq!(again.run.duration_ms(), first.run.duration_ms());
    let mut store = Store::open(&t.path().join("out/results.sqlite")).unwrap();
    assert_eq!(
        store.run(&first.run_id).unwrap().unwrap().finished_ms,
        Some(end),
        "the stored end is unchanged"
    );
}

#[test]
fn second_run_is_diffed_against_the_first() {
    let t = tempfile::tempdir().unwrap();
    let c = campaign(t.path(), ONE_CASE);
    let v = fake_vmm(t.path(), &format!("echo '{PASS_JSON}'"));
    let first = run_campaign(opts(t.path(), c.clone(), v.clone())).unwrap();
    let second = run_campaign(opts(t.path(), c, v)).unwrap();
    assert_ne!(first.run_id, second.run_id);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(second.run_dir.join("report.json")).unwrap())
            .unwrap();
    let diff = json["diff"].to_string();
    assert!(
        diff.contains(&first.run_id),
        "no diff against the previous run: {diff}"
    );
}

fn kvm_and_vmm() -> Option<PathBuf> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("SKIPPED: /dev/kvm not available");
        return None;
    }
    match hilrig_rig::sim::find_vmm(None) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("SKIPPED: hilrig-vmm not built ({e}); cargo build -p hilrig-vmm");
            None
        }
    }
}

/// Count `<testcase>`s and `<failure>`s in a JUnit file (and check it parses).
fn junit_counts(path: &Path) -> (usize, usize, String) {
    use quick_xml::events::Event;
    let text = std::fs::read_to_string(path).unwrap();
    let mut r = quick_xml::Reader::from_str(&text);
    let (mut cases, mut failures) = (0, 0);
    let mut tests_attr = String::new();
    loop {
        match r.read_event().expect("junit.xml parses") {
            Event::Start(e) | Event::Empty(e) => match e.name().as_ref() {
                b"testcase" => cases += 1,
                b"failure" | b"error" => failures += 1,
                b"testsuites" => {
                    for a in e.attributes().flatten() {
                        if a.key.as_ref() == b"tests" {
                            tests_attr = String::from_utf8_lossy(&a.value).into_owned();
                        }
                    }
                }
                _ => {}
            },
            Event::Eof => break,
            _ => {}
        }
    }
    (cases, failures, tests_attr)
}

#[test]
fn smoke_campaign_end_to_end() {
    let Some(vmm) = kvm_and_vmm() else { return };
    let t = tempfile::tempdir().unwrap();
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("smoke.toml");
    let s = run_campaign(opts(t.path(), file, vmm)).unwrap();
    for c in &s.run.cases {
        assert_eq!(c.outcome, Outcome::Pass, "{}: {}", c.id, c.message);
        assert!(!c.artifacts.is_empty(), "{}: no artifacts", c.id);
        for a in &c.artifacts {
            assert!(s.run_dir.join(&a.path).is_file(), "{}: {}", c.id, a.path);
        }
    }
    assert!(s.run.cases.iter().any(|c| c.backend == "rtl"));
    let refused = s
        .run
        .cases
        .iter()
        .find(|c| c.attack == "vbios-overwrite")
        .unwrap();
    assert!(refused.observed.contains("exit 10"), "{}", refused.observed);
    let op = s
        .run
        .cases
        .iter()
        .find(|c| c.id == "attack-flash-program/model/operator@sim")
        .unwrap();
    assert!(op.observed.contains("firmware+1"), "{}", op.observed);
    assert!(
        op.observed.contains("service verdict quarantined"),
        "{}",
        op.observed
    );
    assert_eq!(s.exit_status(), 0);
    let (cases, failures, tests) = junit_counts(&s.junit);
    assert_eq!(cases, s.run.cases.len());
    assert_eq!(failures, 0);
    assert_eq!(tests, s.run.cases.len().to_string());
    assert!(s.report_html.is_file());
}

#[test]
fn verilator_cases_run_on_the_verilated_core() {
    let Some(vmm) = kvm_and_vmm() else { return };
    if !hilrig_verilator::available("verilator_cases_run_on_the_verilated_core") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let c = campaign(
        t.path(),
        "name = \"v\"\n[[case]]\nattacks = [\"attack-hang\", \"pci-enum\", \"attack-key-read\"]\nbackends = [\"verilator\"]\n",
    );
    let s = run_campaign(opts(t.path(), c, vmm)).unwrap();
    assert_eq!(s.run.cases.len(), 3);
    for c in &s.run.cases {
        assert_eq!(c.backend, "verilator");
        assert_eq!(c.outcome, Outcome::Pass, "{}: {}", c.id, c.message);
    }
    assert_eq!(s.exit_status(), 0);
}

#[test]
fn a_broken_host_is_retried_around_and_marked_unhealthy() {
    let t = tempfile::tempdir().unwrap();
    let c = campaign(
        t.path(),
        "name = \"t\"\n[defaults]\ninfra_retries = 2\n[[case]]\nattacks = [\"@restricted\"]\n",
    );
    // Host sim-1's VMM dies without a verdict (the attempt directory names the host).
    let v = fake_vmm(
        t.path(),
        &format!("case \"$*\" in *-sim-1/*) kill -9 $$;; esac; echo '{PASS_JSON}'"),
    );
    let s = run_campaign(opts(t.path(), c, v)).unwrap();
    for c in &s.run.cases {
        assert_eq!(c.outcome, Outcome::Pass, "{c:?}");
        assert_eq!(c.host, "sim-2");
    }
    let on_bad: usize = s
        .run
        .cases
        .iter()
        .flat_map(|c| &c.attempts)
        .filter(|a| a.host == "sim-1")
        .count();
    assert!(
        on_bad <= hilrig_campaigns::runner::UNHEALTHY_AFTER as usize + 1,
        "kept using the broken host: {on_bad} attempts"
    );
    assert_eq!(s.unhealthy_hosts, vec!["sim-1".to_string()]);
    assert_eq!(s.exit_status(), 0);
}

#[test]
fn main_job_runs_the_embedded_smoke_campaign() {
    if kvm_and_vmm().is_none() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let code = hilrig_campaigns::main_job(Some(t.path())).unwrap();
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    let runs: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("smoke-"))
        .collect();
    assert_eq!(runs.len(), 1);
    assert!(runs[0].path().join("report.html").is_file());
    assert!(t.path().join("results.sqlite").is_file());
}

#[test]
fn cli_validate_refuses_a_bad_file() {
    use hilrig_campaigns::CampaignCmd;
    let t = tempfile::tempdir().unwrap();
    let bad = campaign(
        t.path(),
        "name = \"t\"\n[[case]]\nattacks = [\"attack-nope\"]\n",
    );
    let e = hilrig_campaigns::run(CampaignCmd::Validate {
        file: bad.clone(),
        hosts: 2,
        inventory: None,
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(&bad.display().to_string())
            && e.contains("case[0]")
            && e.contains("attack-nope"),
        "{e}"
    );
    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("nightly.toml");
    hilrig_campaigns::run(CampaignCmd::Validate {
        file: good,
        hosts: 2,
        inventory: None,
    })
    .unwrap();
    // Running refuses the same file before touching the VMM or the out dir.
    let mut o = opts(t.path(), bad, t.path().join("no-vmm"));
    o.out_dir = t.path().join("never");
    assert!(run_campaign(o).is_err());
    assert!(!t.path().join("never").exists());
}

#[test]
fn inventory_hosts_and_tags_are_used() {
    let t = tempfile::tempdir().unwrap();
    let inv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rig/inventory/sim.toml");
    let c = campaign(
        t.path(),
        "name = \"t\"\n[[case]]\nattacks = [\"attack-hang\"]\ntags = [\"small-budget\"]\n",
    );
    let v = fake_vmm(t.path(), &format!("echo '{PASS_JSON}'"));
    let mut o = opts(t.path(), c, v);
    o.inventory = Some(inv.clone());
    let s = run_campaign(o).unwrap();
    let case = only(&s);
    assert_eq!(case.id, "attack-hang/model/tenant@small-budget");
    assert_eq!(case.host, "sim-3", "only sim-3 has the tag");
    let state = std::fs::read_dir(
        s.run_dir
            .join("cases")
            .join(hilrig_campaigns::runner::safe_id(&case.id)),
    )
    .unwrap()
    .flatten()
    .next()
    .unwrap()
    .path()
    .join("state.bin");
    let nv = hilrig_device::state::NvState::load(&state).unwrap();
    assert_eq!(nv.config.counter_width, 4, "the inventory's device config");
    assert_eq!(nv.serial, 1003);
    // A tag no inventory host has is refused before anything runs.
    let bad = campaign(
        t.path(),
        "name = \"t\"\n[[case]]\nattacks = [\"attack-hang\"]\ntags = [\"ice40\"]\n",
    );
    let e = hilrig_campaigns::runner::validate(&bad, Some(&inv), 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown host tag `ice40`"), "{e}");
}

/// The runner half of `killed_runner_resumes`: only does something when the parent
/// test re-executes this binary with `HILRIG_TEST_CHILD_DIR` set.
#[test]
fn child_runner_for_kill_test() {
    let Some(dir) = std::env::var_os("HILRIG_TEST_CHILD_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let mut o = opts(&dir, dir.join("c.toml"), dir.join("fake-vmm"));
    o.hosts = 3;
    let _ = run_campaign(o);
}

#[test]
fn killed_runner_resumes_without_losing_finished_cases() {
    let t = tempfile::tempdir().unwrap();
    campaign(
        t.path(),
        "name = \"t\"\n[defaults]\ncase_timeout = \"600s\"\n[[case]]\nattacks = [\"attack-hang\", \"attack-key-read\", \"attack-xchg\"]\n",
    );
    let release = t.path().join("release");
    // attack-hang passes at once; the others block until released, the test
    // directory is gone, or 30 s passed.
    fake_vmm(
        t.path(),
        &format!(
            "case \"$*\" in *attack-hang*) echo '{PASS_JSON}'; exit 0;; esac\n\
             i=0; while [ ! -e {r} ] && [ -e {c} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\n\
             echo '{PASS_JSON}'",
            r = release.display(),
            c = t.path().join("c.toml").display()
        ),
    );
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_runner_for_kill_test", "--nocapture"])
        .env("HILRIG_TEST_CHILD_DIR", t.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let db = t.path().join("out/results.sqlite");
    let mut run_id = None;
    for _ in 0..600 {
        if db.exists() {
            if let Ok(mut store) = Store::open(&db) {
                if let Some(r) = store
                    .runs(Some("t"))
                    .ok()
                    .and_then(|r| r.into_iter().next())
                {
                    if store.cases(&r.id).map(|c| c.len()).unwrap_or(0) >= 1 {
                        run_id = Some(r.id);
                        break;
                    }
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::write(&release, b"").unwrap();
    let run_id = run_id.expect("the runner stored a finished case");
    let mut store = Store::open(&db).unwrap();
    let row = store.run(&run_id).unwrap().unwrap();
    assert!(row.finished_ms.is_none(), "killed before finishing");
    let before = store.cases(&run_id).unwrap();
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].id, "attack-hang/model/tenant@sim");
    drop(store);
    // Resume with a VMM that logs what it runs.
    let log = t.path().join("calls.log");
    let v = fake_vmm(
        t.path(),
        &format!("echo \"$@\" >> {}; echo '{PASS_JSON}'", log.display()),
    );
    let mut o = opts(t.path(), t.path().join("c.toml"), v);
    o.resume = Some(run_id.clone());
    let s = run_campaign(o).unwrap();
    assert_eq!(s.run.cases.len(), 3);
    assert!(s.run.cases.iter().all(|c| c.outcome == Outcome::Pass));
    let calls = std::fs::read_to_string(&log).unwrap();
    assert!(
        !calls.contains("attack-hang"),
        "finished case re-run: {calls}"
    );
    assert_eq!(calls.lines().count(), 2);
    let kept = s
        .run
        .cases
        .iter()
        .find(|c| c.attack == "attack-hang")
        .unwrap();
    assert_eq!(kept, &before[0], "the stored result is kept as it was");
}

/// Whether process `pid` is gone (or a zombie waiting to be reaped).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn killed_runner_takes_its_vmms_down() {
    let t = tempfile::tempdir().unwrap();
    campaign(
        t.path(),
        "name = \"t\"\n[defaults]\ncase_timeout = \"600s\"\n[[case]]\nattacks = [\"attack-hang\", \"attack-key-read\"]\n",
    );
    let pids = t.path().join("pids");
    std::fs::create_dir_all(&pids).unwrap();
    // Each VMM records its pid and becomes a long sleep (same process: exec).
    fake_vmm(
        t.path(),
        &format!("echo $$ > {}/$$; exec sleep 600", pids.display()),
    );
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_runner_for_kill_test", "--nocapture"])
        .env("HILRIG_TEST_CHILD_DIR", t.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let read_pids = || -> Vec<u32> {
        std::fs::read_dir(&pids)
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
            .collect()
    };
    let t0 = std::time::Instant::now();
    while read_pids().len() < 2 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "the runner never started its VMMs"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let vmms = read_pids();
    assert!(
        vmms.iter().all(|p| !gone(*p)),
        "VMMs running before the kill"
    );
    child.kill().unwrap(); // SIGKILL: no destructor, no kill_on_drop runs
    child.wait().unwrap();
    let t0 = std::time::Instant::now();
    let mut left: Vec<u32> = vmms.clone();
    while !left.is_empty() && t0.elapsed() < std::time::Duration::from_secs(10) {
        left.retain(|p| !gone(*p));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for p in &left {
        // Clean up what this test started before failing.
        unsafe {
            libc::kill(*p as i32, libc::SIGKILL);
        }
    }
    assert!(
        left.is_empty(),
        "VMMs {left:?} outlived the SIGKILLed runner"
    );
}

/// The multi-step attacks on the real VMM: rollback (registers, OOB, state file),
/// power cut, fuse, live patching, bad bundles, fleet rollout; their measurements
/// reach the results store; a wrong expectation on the rollback is a FAIL.
#[test]
fn scenario_attacks_end_to_end() {
    let Some(vmm) = kvm_and_vmm() else { return };
    let t = tempfile::tempdir().unwrap();
    let c = campaign(
        t.path(),
        r#"
name = "scen"
[defaults]
case_timeout = "120s"
step_timeout = "60s"
[[case]]
attacks = ["@rollback", "@power", "@fuse", "@patch"]
profiles = ["operator"]
[[case]]
attacks = ["rollback-registers"]
profiles = ["tenant"]
# Wrong on purpose: restoring the old state file IS a rollback.
[[case]]
attacks = ["rollback-state-file"]
profiles = ["tenant"]
enforce = false
expect = { service_verdict = "trusted" }
"#,
    );
    let mut o = opts(t.path(), c, vmm);
    o.hosts = 2;
    let s = run_campaign(o).unwrap();
    let get = |id: &str| {
        s.run
            .cases
            .iter()
            .find(|c| c.id == id)
            .unwrap_or_else(|| panic!("{id} missing"))
    };
    for c in &s.run.cases {
        if c.profile != "tenant+enforce-off" {
            assert_eq!(
                c.outcome,
                Outcome::Pass,
                "{}: {} | {}",
                c.id,
                c.message,
                c.observed
            );
        }
    }
    let wrong = get("rollback-state-file/model/tenant+enforce-off@sim");
    assert_eq!(wrong.outcome, Outcome::Fail);
    assert!(
        wrong.message.contains("verdict rolled-back") && wrong.message.contains("expected trusted"),
        "{}",
        wrong.message
    );
    let rb = get("rollback-state-file/model/operator@sim");
    assert!(
        rb.observed.contains("service verdict rolled-back"),
        "{}",
        rb.observed
    );
    assert!(rb.metrics.counters.len() >= 4, "a reading per step");
    let regs = get("rollback-registers/model/operator@sim");
    assert!(
        regs.observed.contains("counters page unchanged"),
        "{}",
        regs.observed
    );
    let oob = get("rollback-oob/model/operator@sim");
    assert!(
        oob.observed
            .contains("11 forged/malformed OOB requests refused (7 on the model device's port, 4 over the rig's OOB PTY)"),
        "{}",
        oob.observed
    );
    let cut = get("power-cut-program/model/operator@sim");
    assert!(cut.observed.contains("power cut after"), "{}", cut.observed);
    assert!(
        cut.observed.contains("service verdict needs-reflash"),
        "{}",
        cut.observed
    );
    let fuse = get("fuse-exhaustion/model/operator@sim");
    assert!(fuse.observed.contains("fuse blown"), "{}", fuse.observed);
    assert!(
        fuse.observed.contains("service verdict locked"),
        "{}",
        fuse.observed
    );
    let storm = get("patch-under-storm/model/operator@sim");
    assert_eq!(
        storm.metrics.blackouts_us.len(),
        1,
        "one patch: {:?}",
        storm.metrics
    );
    assert!(storm.metrics.blackouts_us[0] > 0.0);
    assert!(!storm.metrics.trap_latency.samples_us.is_empty());
    assert!(!storm.metrics.teardown_us.is_empty());
    let bad = get("patch-bad-bundles/model/operator@sim");
    for w in [
        "not a trusted key",
        "targets VMM build",
        "not newer",
        "truncated",
    ] {
        assert!(bad.observed.contains(w), "{w}: {}", bad.observed);
    }
    let roll = get("patch-rollout-bad-host/model/operator@sim");
    assert!(
        roll.observed.contains("stopped at fleet-2 in wave 1"),
        "{}",
        roll.observed
    );
    assert_eq!(roll.metrics.blackouts_us.len(), 2, "two hosts patched");
    // What the store kept is what the reports got.
    let mut store = Store::open(&t.path().join("out/results.sqlite")).unwrap();
    let stored = store.cases(&s.run_id).unwrap();
    let st = stored.iter().find(|c| c.id == storm.id).unwrap();
    assert_eq!(st.metrics, storm.metrics);
    assert_eq!(
        store.samples(&s.run_id, &storm.id, "blackout_us").unwrap(),
        storm.metrics.blackouts_us
    );
    assert_eq!(
        store
            .samples(&s.run_id, &roll.id, "teardown_us")
            .unwrap()
            .len(),
        4,
        "the fleet's four teardowns"
    );
    let html = std::fs::read_to_string(&s.report_html).unwrap();
    assert!(html.contains("<svg"), "plots in the report");
}

#[test]
fn results_store_on_postgresql() {
    let Some(url) = hilrig_db::test_server().unwrap_or_else(|e| panic!("{e}")) else {
        eprintln!("SKIPPED results_store_on_postgresql: HILRIG_TEST_PG not set");
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let name = format!(
        "pg_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let c = campaign(
        t.path(),
        &format!("name = \"{name}\"\n[[case]]\nattacks = [\"attack-hang\", \"attack-key-read\"]\n"),
    );
    let v = fake_vmm(t.path(), &format!("echo '{PASS_JSON}'"));
    let mut o = opts(t.path(), c.clone(), v.clone());
    o.db = Some(PathBuf::from(&url));
    let s1 = run_campaign(o).unwrap();
    assert_eq!(s1.counts.pass, 2);
    assert!(
        !t.path().join("out/results.sqlite").exists(),
        "PostgreSQL named: no SQLite file"
    );
    let mut store = Store::open(Path::new(&url)).unwrap();
    assert_eq!(store.kind(), "postgresql");
    let runs = store.runs(Some(&name)).unwrap();
    assert_eq!(runs.len(), 1);
    assert!(runs[0].finished_ms.is_some());
    let mut cases = store.cases(&s1.run_id).unwrap();
    cases.sort_by(|a, b| a.id.cmp(&b.id));
    let mut want = s1.run.cases.clone();
    want.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(cases, want);
    assert_eq!(
        store
            .samples(&s1.run_id, "attack-hang/model/tenant@sim", "teardown_us")
            .unwrap(),
        vec![10.0]
    );
    // A second run is diffed against the first, from the same database.
    let mut o = opts(t.path(), c, v);
    o.db = Some(PathBuf::from(&url));
    let s2 = run_campaign(o).unwrap();
    let prev = store
        .previous_run(&name, &s2.run_id, s2.run.started_ms)
        .unwrap()
        .expect("the first run");
    assert_eq!(prev.id, s1.run_id);
    assert_eq!(store.runs(Some(&name)).unwrap()[0].id, s2.run_id);
    // Resuming a run stored in PostgreSQL runs nothing already finished.
    let log = t.path().join("calls.log");
    let v = fake_vmm(
        t.path(),
        &format!("echo \"$@\" >> {}; echo '{PASS_JSON}'", log.display()),
    );
    let mut o = opts(t.path(), t.path().join("c.toml"), v);
    o.db = Some(PathBuf::from(&url));
    o.resume = Some(s2.run_id.clone());
    let s3 = run_campaign(o).unwrap();
    assert_eq!(s3.run.cases.len(), 2);
    assert!(!log.exists(), "finished cases re-run");
}

#[test]
fn exclusive_cases_run_alone_on_the_machine() {
    let run = |exclusive: bool| -> usize {
        let t = tempfile::tempdir().unwrap();
        let c = campaign(
            t.path(),
            &format!(
                "name = \"t\"\n[[case]]\nattacks = [\"attack-hang\", \"attack-key-read\", \"attack-xchg\", \"attack-lock-rmw\"]\nexclusive = {exclusive}\n"
            ),
        );
        let busy = t.path().join("busy");
        let overlaps = t.path().join("overlaps");
        let v = fake_vmm(
            t.path(),
            &format!(
                "if ! mkdir {b} 2>/dev/null; then echo x >> {o}; sleep 0.2; else sleep 0.2; rmdir {b}; fi; echo '{PASS_JSON}'",
                b = busy.display(),
                o = overlaps.display()
            ),
        );
        let mut o = opts(t.path(), c, v);
        o.hosts = 2;
        let s = run_campaign(o).unwrap();
        assert_eq!(s.counts.pass, 4, "{:?}", s.run.cases);
        std::fs::read_to_string(&overlaps)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    assert_eq!(run(true), 0, "exclusive attempts overlapped");
    assert!(run(false) > 0, "2 hosts never ran 2 cases at once");
}

/// A host leased by someone else (in the run's results database) is not used;
/// the run leases its hosts while it runs and gives them back at the end.
#[test]
fn hosts_leased_by_others_are_not_used() {
    let t = tempfile::tempdir().unwrap();
    let c = campaign(t.path(), ONE_CASE);
    let v = fake_vmm(t.path(), &format!("echo '{PASS_JSON}'"));
    let mut o = opts(t.path(), c, v);
    o.hosts = 2;
    std::fs::create_dir_all(&o.out_dir).unwrap();
    let db = o.out_dir.join("results.sqlite");
    let leases = hilrig_rig::lease::LeaseStore::open(&db.to_string_lossy()).unwrap();
    leases
        .acquire("sim-1", "alice", std::time::Duration::from_secs(600))
        .unwrap();
    let s = run_campaign(o).unwrap();
    let case = only(&s);
    assert_eq!(case.outcome, Outcome::Pass, "{case:?}");
    assert_eq!(case.host, "sim-2", "alice's host was used: {case:?}");
    assert!(s
        .offline_hosts
        .iter()
        .any(|(h, why)| h == "sim-1" && why.contains("alice")));
    let rows = leases.list().unwrap();
    let held: Vec<_> = rows.iter().filter(|r| r.active).collect();
    assert_eq!(held.len(), 1, "only alice's lease is left: {rows:?}");
    assert_eq!(held[0].holder, "alice");
}

/// Every artifact a case lists exists and holds something: a VMM that writes
/// nothing to the console (or no alarms) leaves no empty file behind (the
/// reports listed "console" links to empty files for most cases).
#[test]
fn listed_artifacts_are_never_empty_files() {
    let t = tempfile::tempdir().unwrap();
    let c = campaign(t.path(), ONE_CASE);
    // Like the real VMM with a silent payload: creates its console and alarm
    // files, writes nothing to them, prints its summary.
    let v = fake_vmm(
        t.path(),
        &format!(
            "while [ $# -gt 0 ]; do case \"$1\" in --console|--alarms) : > \"$2\";; esac; shift; done\n\
             echo '{FAIL_JSON}'; echo oops >&2; exit 1"
        ),
    );
    let s = run_campaign(opts(t.path(), c, v)).unwrap();
    let case = only(&s);
    let mut listed = 0;
    for a in &case.artifacts {
        let p = s.run_dir.join(&a.path);
        let len = std::fs::metadata(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .len();
        assert!(len > 0, "{} is listed but empty", p.display());
        listed += 1;
    }
    assert!(listed >= 2, "the summary and stderr are kept: {case:?}");
}
