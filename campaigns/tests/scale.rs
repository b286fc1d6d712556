//! Scale-out over PostgreSQL: several runner processes share one campaign run
//! through the results store (`claim`), one of them SIGKILLed mid-way; every case
//! is accounted for exactly once. Needs PostgreSQL: `HILRIG_TEST_PG`, else a
//! throwaway server from `scripts/pg-start`; says SKIPPED loudly without one.

use hilrig_campaigns::claim::{ClaimError, ClaimQueue};
use hilrig_campaigns::runner::{run_campaign, safe_id, RunOptions};
use hilrig_campaigns::store::Store;
use hilrig_campaigns::HostSpec;
use hilrig_reports::{CaseResult, Outcome};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The stand-in VMM reads the run's binding from its flags (VM id, teardown nonce,
/// the device serial from the state file) and echoes it in its teardown record, as
/// the real VMM does: the runner refuses a record of another run.
const BIND: &str = r#"VMID=; NONCE=; STATE=; prev=
for a in "$@"; do case "$prev" in --vm-id) VMID=$a;; --teardown-nonce) NONCE=$a;; --device-state) STATE=$a;; esac; prev=$a; done
SERIAL=$(od -An -tu8 -j23 -N8 "$STATE" 2>/dev/null | tr -d ' '); SERIAL=${SERIAL:-0}
"#;

/// A verdict line as the real VMM prints it (as in tests/runner.rs).
const PASS_JSON: &str = r#"{"payload":"attack-hang","device":"model","verdict":"PASS","passed":true,"exit_status":0,"policy":{"alarms":1,"per_register":{"HANG_TRIGGER":1}},"teardown":{"vm":"'"$VMID"'","serial":'"$SERIAL"',"nonce":"'"$NONCE"'","started_unix":0,"steps":[],"complete":true,"total_micros":10,"guest_bytes_scrubbed":0,"device_bytes_scrubbed":0,"counters":null,"verdict":{"verdict":"trusted","handoff_ok":true,"reasons":[]},"signer":"","signature":""}}"#;

/// A PostgreSQL server for the test: `HILRIG_TEST_PG`, or one started with
/// `scripts/pg-start` (stopped on drop).
struct Pg {
    url: String,
    dir: Option<String>,
}

impl Drop for Pg {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            let _ = Command::new(scripts().join("pg-stop")).arg(d).status();
        }
    }
}

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts")
}

fn pg(test: &str) -> Option<Pg> {
    if let Some(url) = hilrig_db::test_server().unwrap_or_else(|e| panic!("{e}")) {
        return Some(Pg { url, dir: None });
    }
    let out = Command::new(scripts().join("pg-start")).output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let lines: Vec<&str> = text.lines().collect();
            match (lines.first(), lines.last()) {
                (Some(u), Some(d)) if lines.len() >= 2 => Some(Pg {
                    url: u.to_string(),
                    dir: Some(d.to_string()),
                }),
                _ => {
                    eprintln!("SKIPPED {test}: scripts/pg-start printed {text:?}");
                    None
                }
            }
        }
        Ok(o) => {
            eprintln!(
                "SKIPPED {test}: HILRIG_TEST_PG not set and scripts/pg-start failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: HILRIG_TEST_PG not set and scripts/pg-start: {e}");
            None
        }
    }
}

fn unique(prefix: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// Six cases of `attack-hang` (three backends, two profiles).
const CAMPAIGN: &str = r#"
name = "scale"
[defaults]
retries = 0
infra_retries = 2
case_timeout = "120s"
campaign_timeout = "10m"
[[case]]
attacks = ["attack-hang"]
backends = ["model", "rtl", "lockstep"]
profiles = ["tenant", "operator"]
"#;

/// The runner half of `three_runners_one_killed_every_case_once`: only runs when
/// the parent test re-executes this binary with `HILRIG_TEST_SCALE_DIR` set.
#[test]
fn child_scale_runner() {
    let Some(dir) = std::env::var_os("HILRIG_TEST_SCALE_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let me = env("HILRIG_TEST_RUNNER");
    let mut o = RunOptions::new(dir.join("c.toml"));
    o.out_dir = dir.join(format!("out-{me}"));
    o.vmm = Some(dir.join("fake-vmm"));
    o.progress = Some(false);
    o.hosts = 2;
    o.db = Some(PathBuf::from(env("HILRIG_TEST_SCALE_DB")));
    o.join = Some(env("HILRIG_TEST_SCALE_RUN"));
    o.claimant = Some(me);
    o.claim_ttl = Duration::from_secs(2);
    let s = run_campaign(o).expect("the runner finishes the shared run");
    assert_eq!(s.run.cases.len(), 6, "{:?}", s.run.cases);
}

fn spawn_runner(dir: &Path, url: &str, run: &str, name: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_scale_runner", "--nocapture"])
        .env("HILRIG_TEST_SCALE_DIR", dir)
        .env("HILRIG_TEST_SCALE_DB", url)
        .env("HILRIG_TEST_SCALE_RUN", run)
        .env("HILRIG_TEST_RUNNER", name)
        .stdout(std::fs::File::create(dir.join(format!("{name}.out"))).unwrap())
        .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap())
        .spawn()
        .unwrap()
}

fn log_lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn three_runners_one_killed_every_case_once() {
    let Some(pg) = pg("three_runners_one_killed_every_case_once") else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    std::fs::write(dir.join("c.toml"), CAMPAIGN).unwrap();
    let log = dir.join("vmm.log");
    // Each VMM logs which runner started it and for what; runner r2's VMMs hang
    // (so r2 surely holds claims when it is killed), the others pass.
    let vmm = dir.join("fake-vmm");
    std::fs::write(
        &vmm,
        format!(
            "#!/bin/sh\n{BIND}echo \"$HILRIG_TEST_RUNNER $*\" >> {log}\n\
             if [ \"$HILRIG_TEST_RUNNER\" = r2 ]; then exec sleep 600; fi\n\
             sleep 0.2\necho '{PASS_JSON}'\n",
            log = log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = unique("scale");
    let mut kids: BTreeMap<&str, Child> = ["r1", "r2", "r3"]
        .into_iter()
        .map(|n| (n, spawn_runner(dir, &pg.url, &run, n)))
        .collect();
    let stop_all = |kids: &mut BTreeMap<&str, Child>| {
        for k in kids.values_mut() {
            let _ = k.kill();
            let _ = k.wait();
        }
    };
    // Kill r2 once both of its hosts run a case (it holds two claims).
    let t0 = Instant::now();
    while log_lines(&log)
        .iter()
        .filter(|l| l.starts_with("r2 "))
        .count()
        < 2
    {
        if t0.elapsed() > Duration::from_secs(120) {
            stop_all(&mut kids);
            panic!("runner r2 never started two cases: {:?}", log_lines(&log));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut r2 = kids.remove("r2").unwrap();
    r2.kill().unwrap(); // SIGKILL: no destructor, no release of its claims
    r2.wait().unwrap();
    // The survivors take r2's cases over once its claims expire, and finish.
    let t0 = Instant::now();
    let mut status = BTreeMap::new();
    while status.len() < 2 {
        for (n, k) in kids.iter_mut() {
            if let Some(s) = k.try_wait().unwrap() {
                status.insert(*n, s);
            }
        }
        if t0.elapsed() > Duration::from_secs(180) {
            stop_all(&mut kids);
            panic!(
                "the surviving runners did not finish: r1 {} r3 {}",
                std::fs::read_to_string(dir.join("r1.err")).unwrap_or_default(),
                std::fs::read_to_string(dir.join("r3.err")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (n, s) in &status {
        assert!(
            s.success(),
            "runner {n} failed: {}",
            std::fs::read_to_string(dir.join(format!("{n}.err"))).unwrap_or_default()
        );
    }

    let campaign = hilrig_campaigns::load(&dir.join("c.toml"), &HostSpec::sim(2)).unwrap();
    let ids: BTreeSet<String> = campaign.cases.iter().map(|c| c.id.clone()).collect();
    assert_eq!(ids.len(), 6);
    let mut store = Store::open(Path::new(&pg.url)).unwrap();
    let stored: Vec<CaseResult> = store.cases(&run).unwrap();
    let stored_ids: Vec<&str> = stored.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(stored.len(), 6, "each case stored once: {stored_ids:?}");
    assert_eq!(
        stored_ids
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>(),
        ids
    );
    let mut q = ClaimQueue::open(&pg.url).unwrap();
    let rows = q.list(&run).unwrap();
    assert_eq!(rows.len(), 6);
    for r in &rows {
        assert_eq!(r.state, "done", "{}", r.case_id);
        assert_ne!(
            r.claimant.as_deref(),
            Some("r2"),
            "{} finished by the killed runner",
            r.case_id
        );
    }
    let lines = log_lines(&log);
    let mut taken_over = 0;
    for c in &stored {
        assert_eq!(c.outcome, Outcome::Pass, "{}: {}", c.id, c.message);
        let needle = format!("{}/", safe_id(&c.id));
        let by = |r: &str| {
            lines
                .iter()
                .filter(|l| l.starts_with(&format!("{r} ")) && l.contains(&needle))
                .count()
        };
        let lost: Vec<_> = c
            .attempts
            .iter()
            .filter(|a| a.host.starts_with("runner "))
            .collect();
        let ran: Vec<_> = c
            .attempts
            .iter()
            .filter(|a| !a.host.starts_with("runner "))
            .collect();
        // Every VMM a live runner started is an attempt of the stored result.
        assert_eq!(by("r1") + by("r3"), ran.len(), "{}: {lines:?}", c.id);
        assert_eq!(ran.len(), 1, "{}: ran once ({:?})", c.id, c.attempts);
        // A case r2 started comes back as an INFRA attempt naming r2.
        assert_eq!(by("r2"), lost.len(), "{}: {:?}", c.id, c.attempts);
        for a in &lost {
            assert_eq!(a.outcome, Outcome::Infra);
            assert!(
                a.host == "runner r2" && a.message.contains("expired"),
                "{a:?}"
            );
        }
        taken_over += lost.len();
    }
    assert_eq!(taken_over, 2, "both of r2's cases were taken over");
}

#[test]
fn concurrent_claims_never_share_a_case() {
    let Some(pg) = pg("concurrent_claims_never_share_a_case") else {
        return;
    };
    let run = unique("claims");
    let mut store = Store::open(Path::new(&pg.url)).unwrap();
    store
        .create_run(
            &hilrig_campaigns::store::RunRow {
                id: run.clone(),
                campaign: "claims".into(),
                file: "-".into(),
                run_dir: "-".into(),
                started_ms: 0,
                finished_ms: None,
            },
            &[],
        )
        .unwrap();
    let ids: Vec<String> = (0..60).map(|i| format!("case-{i}")).collect();
    ClaimQueue::open(&pg.url)
        .unwrap()
        .enqueue(&run, &ids)
        .unwrap();
    let got: Vec<Vec<String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|w| {
                let (url, run) = (pg.url.clone(), run.clone());
                s.spawn(move || {
                    let mut q = ClaimQueue::open(&url).unwrap();
                    let mut mine = Vec::new();
                    let who = format!("w{w}");
                    while let Some(c) = q.claim(&run, &who, Duration::from_secs(600)).unwrap() {
                        assert!(c.lost.is_empty());
                        mine.push(c.case_id);
                    }
                    mine
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all: Vec<&String> = got.iter().flatten().collect();
    let set: BTreeSet<&String> = all.iter().copied().collect();
    assert_eq!(all.len(), 60, "every case claimed once: {got:?}");
    assert_eq!(set.len(), 60, "no case claimed twice: {got:?}");
    let st = ClaimQueue::open(&pg.url).unwrap().state(&run).unwrap();
    assert_eq!((st.queued, st.claimed), (0, 60));
}

#[test]
fn a_stale_claimant_cannot_renew_or_store_after_takeover() {
    let Some(pg) = pg("a_stale_claimant_cannot_renew_or_store_after_takeover") else {
        return;
    };
    let run = unique("stale");
    let mut store = Store::open(Path::new(&pg.url)).unwrap();
    store
        .create_run(
            &hilrig_campaigns::store::RunRow {
                id: run.clone(),
                campaign: "stale".into(),
                file: "-".into(),
                run_dir: "-".into(),
                started_ms: 0,
                finished_ms: None,
            },
            &[],
        )
        .unwrap();
    let mut a = ClaimQueue::open(&pg.url).unwrap();
    let mut b = ClaimQueue::open(&pg.url).unwrap();
    a.enqueue(&run, &["c1".to_string()]).unwrap();
    let ca = a
        .claim(&run, "a", Duration::from_millis(1))
        .unwrap()
        .unwrap();
    // Wait (bounded) until a's lease has expired on the server's clock.
    let t0 = Instant::now();
    let cb = loop {
        if let Some(c) = b.claim(&run, "b", Duration::from_secs(600)).unwrap() {
            break c;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "never expired");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(cb.case_id, "c1");
    assert_eq!(cb.lost, vec!["a".to_string()], "a's lost claim is recorded");
    assert!(cb.generation > ca.generation);
    let result = |who: &str| CaseResult {
        id: "c1".into(),
        attack: "attack-hang".into(),
        backend: "model".into(),
        profile: "tenant".into(),
        host_tag: "sim".into(),
        host: who.into(),
        outcome: Outcome::Pass,
        duration_ms: 1,
        attempts: Vec::new(),
        message: String::new(),
        expected: String::new(),
        observed: String::new(),
        metrics: Default::default(),
        artifacts: Vec::new(),
    };
    assert!(!a.renew(&ca, "a", Duration::from_secs(60)).unwrap());
    assert!(
        !a.complete(&ca, "a", &result("a")).unwrap(),
        "stale result stored"
    );
    assert!(store.cases(&run).unwrap().is_empty());
    // The result of another case is refused for this claim.
    let mut other = result("b");
    other.id = "c2".into();
    assert!(matches!(
        b.complete(&cb, "b", &other),
        Err(ClaimError::Data { .. })
    ));
    assert!(b.renew(&cb, "b", Duration::from_secs(60)).unwrap());
    assert!(b.complete(&cb, "b", &result("b")).unwrap());
    assert!(!b.complete(&cb, "b", &result("b")).unwrap(), "stored twice");
    let stored = store.cases(&run).unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].host, "b");
    assert!(b.state(&run).unwrap().finished());
}

#[test]
fn joining_needs_postgresql_and_a_safe_run_id() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("c.toml"), CAMPAIGN).unwrap();
    let mut o = RunOptions::new(t.path().join("c.toml"));
    o.out_dir = t.path().join("out");
    o.vmm = Some(t.path().join("no-vmm"));
    o.progress = Some(false);
    o.join = Some("shared".into());
    let e = run_campaign(o.clone()).unwrap_err().to_string();
    assert!(
        e.contains("needs a PostgreSQL store") && e.contains("single runner"),
        "{e}"
    );
    let Some(pg) = pg("joining_needs_postgresql_and_a_safe_run_id") else {
        return;
    };
    o.db = Some(PathBuf::from(&pg.url));
    for bad in ["../escape", "", ".hidden", "a/b", &"x".repeat(65)] {
        o.join = Some(bad.to_string());
        let e = run_campaign(o.clone()).unwrap_err().to_string();
        assert!(
            e.contains("run id") && e.contains("names the run directory"),
            "{bad:?}: {e}"
        );
    }
    assert!(!t.path().join("escape").exists());
}
