//! Leases: runners competing for one host never hold it together; a SIGKILLed
//! runner's lease is taken over after it expires. SQLite always; PostgreSQL when
//! HILRIG_TEST_PG names a server.

use hilrig_rig::lease::{Heartbeat, LeaseStore};
use hilrig_rig::RigError;
use std::io::BufRead;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "HILRIG_RIG_LEASE_CHILD";

fn pg() -> Option<String> {
    hilrig_db::test_server().unwrap_or_else(|e| panic!("{e}"))
}

fn unique(prefix: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{n}", std::process::id())
}

fn compete(spec: &str, host: &str) {
    let inside = Arc::new(AtomicU32::new(0));
    let max_inside = Arc::new(AtomicU32::new(0));
    let wins = Arc::new(AtomicU32::new(0));
    std::thread::scope(|s| {
        for r in 0..4 {
            let (inside, max_inside, wins) = (inside.clone(), max_inside.clone(), wins.clone());
            s.spawn(move || {
                // Each runner has its own connection, as separate processes would.
                let store = LeaseStore::open(spec).unwrap();
                let me = format!("runner-{r}");
                let mut mine = 0;
                let deadline = Instant::now() + Duration::from_secs(60);
                while mine < 5 {
                    assert!(Instant::now() < deadline, "{me} never got the host");
                    match store.acquire(host, &me, Duration::from_secs(30)) {
                        Ok(lease) => {
                            let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                            max_inside.fetch_max(n, Ordering::SeqCst);
                            // The database agrees on who holds it.
                            let row = store
                                .list()
                                .unwrap()
                                .into_iter()
                                .find(|r| r.host == host)
                                .unwrap();
                            assert_eq!(row.holder, me);
                            assert!(row.active);
                            std::thread::sleep(Duration::from_millis(5));
                            inside.fetch_sub(1, Ordering::SeqCst);
                            store.release(&lease).unwrap();
                            mine += 1;
                            wins.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(RigError::Leased { holder, .. }) => {
                            assert_ne!(holder, me);
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => panic!("{me}: {e}"),
                    }
                }
            });
        }
    });
    assert_eq!(max_inside.load(Ordering::SeqCst), 1);
    assert_eq!(wins.load(Ordering::SeqCst), 20);
}

#[test]
fn sqlite_runners_never_hold_a_host_together() {
    let d = tempfile::tempdir().unwrap();
    compete(d.path().join("l.db").to_str().unwrap(), "sim-1");
}

#[test]
fn pg_runners_never_hold_a_host_together() {
    let Some(url) = pg() else {
        eprintln!("SKIPPED: pg_runners_never_hold_a_host_together: HILRIG_TEST_PG not set");
        return;
    };
    compete(&url, &unique("pg-compete"));
}

/// Not a test by itself: the child process of the takeover tests. With
/// HILRIG_RIG_LEASE_CHILD="spec|host|ttl_ms" it takes the lease, says so, keeps
/// it alive by heartbeat and waits to be killed.
#[test]
fn lease_child_process() {
    let Ok(v) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = v.split('|').collect();
    let (spec, host, ttl) = (
        parts[0],
        parts[1],
        Duration::from_millis(parts[2].parse().unwrap()),
    );
    let store = Arc::new(LeaseStore::open(spec).unwrap());
    let lease = store.acquire(host, "child-runner", ttl).unwrap();
    let _hb = Heartbeat::start(store, lease.clone(), ttl);
    println!("ACQUIRED {}", lease.generation);
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn killed_runner_is_taken_over(spec: &str, host: &str) {
    let ttl_ms = 1500;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "lease_child_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{spec}|{host}|{ttl_ms}"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(out).lines();
    let child_gen: i64 = loop {
        let l = lines
            .next()
            .expect("child exited before acquiring")
            .unwrap();
        // libtest prints "test lease_child_process ... " on the same line.
        if let Some(i) = l.find("ACQUIRED ") {
            break l[i + 9..].trim().parse().unwrap();
        }
    };
    let store = LeaseStore::open(spec).unwrap();
    // While the child lives (its heartbeat renews), the lease is its own, beyond
    // several TTLs.
    let hold_until = Instant::now() + Duration::from_millis(3 * ttl_ms);
    while Instant::now() < hold_until {
        match store.acquire(host, "parent-runner", Duration::from_secs(30)) {
            Err(RigError::Leased { holder, .. }) => assert_eq!(holder, "child-runner"),
            other => panic!("the parent got a live runner's host: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Nobody released it: the row still names the dead child.
    let row = store
        .list()
        .unwrap()
        .into_iter()
        .find(|r| r.host == host)
        .unwrap();
    assert_eq!(row.holder, "child-runner");
    let deadline = Instant::now() + Duration::from_secs(60);
    let lease = loop {
        match store.acquire(host, "parent-runner", Duration::from_secs(30)) {
            Ok(l) => break l,
            Err(RigError::Leased { holder, .. }) => {
                assert_eq!(holder, "child-runner");
                assert!(
                    Instant::now() < deadline,
                    "the dead runner's lease never expired"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(lease.generation, child_gen + 1);
    store.release(&lease).unwrap();
}

#[test]
fn sqlite_killed_runner_lease_is_taken_over_after_expiry() {
    let d = tempfile::tempdir().unwrap();
    killed_runner_is_taken_over(d.path().join("l.db").to_str().unwrap(), "sim-2");
}

#[test]
fn pg_killed_runner_lease_is_taken_over_after_expiry() {
    let Some(url) = pg() else {
        eprintln!(
            "SKIPPED: pg_killed_runner_lease_is_taken_over_after_expiry: HILRIG_TEST_PG not set"
        );
        return;
    };
    killed_runner_is_taken_over(&url, &unique("pg-takeover"));
}

#[test]
fn a_lost_lease_is_noticed_by_the_heartbeat() {
    let d = tempfile::tempdir().unwrap();
    let spec = d.path().join("l.db");
    let store = Arc::new(LeaseStore::open(spec.to_str().unwrap()).unwrap());
    let lease = store.acquire("h", "a", Duration::from_secs(30)).unwrap();
    let hb = Heartbeat::start(store.clone(), lease.clone(), Duration::from_millis(300));
    // Someone forcibly releases it and takes it over.
    assert!(store.release_host("h", "a", None).unwrap());
    store.acquire("h", "b", Duration::from_secs(30)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while hb.lost().is_none() {
        assert!(Instant::now() < deadline, "the heartbeat never noticed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(hb.lost().unwrap().contains("lost"));
}

fn spread(spec: &str, hosts: &[String]) {
    // Three runners asking for "any host" get three different ones.
    let names: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let got: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|r| {
                let names = names.clone();
                s.spawn(move || {
                    let store = LeaseStore::open(spec).unwrap();
                    store
                        .acquire_any(&names, &format!("r{r}"), Duration::from_secs(30))
                        .unwrap()
                        .expect("a free host")
                        .host
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut sorted = got.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 3, "{got:?}");
    let store = LeaseStore::open(spec).unwrap();
    assert!(store
        .acquire_any(&names, "r4", Duration::from_secs(30))
        .unwrap()
        .is_none());
}

#[test]
fn sqlite_acquire_any_hands_out_distinct_hosts() {
    let d = tempfile::tempdir().unwrap();
    let hosts: Vec<String> = (1..=3).map(|i| format!("h{i}")).collect();
    spread(d.path().join("l.db").to_str().unwrap(), &hosts);
}

#[test]
fn pg_acquire_any_hands_out_distinct_hosts() {
    let Some(url) = pg() else {
        eprintln!("SKIPPED: pg_acquire_any_hands_out_distinct_hosts: HILRIG_TEST_PG not set");
        return;
    };
    let base = unique("pg-any");
    let hosts: Vec<String> = (1..=3).map(|i| format!("{base}-{i}")).collect();
    spread(&url, &hosts);
}

#[test]
fn unhealthy_hosts_are_never_leased_for_work() {
    use hilrig_rig::rig::{HealthTable, HostHealth, Probe};
    let d = tempfile::tempdir().unwrap();
    let inv = d.path().join("lab.toml");
    std::fs::write(
        &inv,
        "[[host]]\nname = \"a\"\ntags = [\"x\"]\n[host.power]\ndriver = \"sim\"\n\
         [[host]]\nname = \"b\"\ntags = [\"x\"]\n[host.power]\ndriver = \"sim\"\n\
         [[host]]\nname = \"c\"\ntags = [\"y\"]\n[host.power]\ndriver = \"sim\"\n",
    )
    .unwrap();
    let rig = hilrig_rig::Rig::load(&inv).unwrap();
    let row = |h: &str, ok: bool| HostHealth {
        host: h.into(),
        probes: vec![Probe {
            what: "power".into(),
            driver: "sim".into(),
            ok,
            detail: String::new(),
        }],
    };
    let health = HealthTable {
        rows: vec![row("a", false), row("b", true), row("c", true)],
    };
    let store = LeaseStore::open(d.path().join("l.db").to_str().unwrap()).unwrap();
    let ttl = Duration::from_secs(30);
    let l = rig
        .lease_host(&health, &["x"], &store, "r1", ttl)
        .unwrap()
        .unwrap();
    assert_eq!(l.host, "b");
    assert!(rig
        .lease_host(&health, &["x"], &store, "r2", ttl)
        .unwrap()
        .is_none());
}
