//! A queued campaign taken by a worker, run with a stand-in VMM, and its
//! webhook delivered to a local axum receiver: retried with backoff through
//! two failures, signed with HMAC-SHA256.

mod common;
use common::*;
use hilrig_campaigns::store::{Store, WebhookRow};
use hilrig_serve::webhook::{verify, Notice, Retry, SIGNATURE_HEADER};
use hilrig_serve::worker::{take_one, WorkerOptions};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hilrig_campaigns::testkit::{stand_in_vmm, FAIL_JSON};

#[derive(Default)]
struct Seen {
    calls: u32,
    got: Vec<(String, Vec<u8>)>,
}

fn receiver(
    fail_first: u32,
) -> (
    std::net::SocketAddr,
    Arc<Mutex<Seen>>,
    tokio::runtime::Runtime,
) {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode};
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s2 = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |h: HeaderMap, body: Bytes| {
            let seen = s2.clone();
            async move {
                let mut s = seen.lock().unwrap();
                s.calls += 1;
                if s.calls <= fail_first {
                    return StatusCode::INTERNAL_SERVER_ERROR;
                }
                let sig = h
                    .get(SIGNATURE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                s.got.push((sig, body.to_vec()));
                StatusCode::NO_CONTENT
            }
        }),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let l = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = l.local_addr().unwrap();
    rt.spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (addr, seen, rt)
}

#[test]
fn a_worker_runs_the_queued_campaign_and_signs_its_webhook() {
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    let vmm = stand_in_vmm(t.path(), &format!("echo '{FAIL_JSON}'; exit 1")).unwrap();
    let (addr, seen, _rt) = receiver(2);
    let secret = "a-secret-of-some-length";
    let mut st = Store::open(Path::new(&db)).unwrap();
    st.webhook_put(&WebhookRow {
        campaign: "q".into(),
        url: format!("http://{addr}/hook"),
        secret: secret.into(),
    })
    .unwrap();
    let id = st
        .enqueue(
            "q",
            "name = \"q\"\n[defaults]\nretries = 0\n[[case]]\nattacks = [\"attack-hang\"]\n",
            "alice",
        )
        .unwrap();
    drop(st);
    let dbh = hilrig_serve::Db::open(&db, 1).unwrap();
    let o = WorkerOptions {
        out_dir: t.path().join("out"),
        hosts: 1,
        vmm: Some(vmm),
        vmm_args: vec![],
        name: "w1".into(),
        retry: Retry {
            attempts: 4,
            first: Duration::from_millis(10),
            max: Duration::from_millis(40),
            timeout: Duration::from_secs(5),
        },
    };
    let took = take_one(&dbh, &o).unwrap().expect("a queued campaign");
    assert_eq!(took.queue_id, id);
    assert_eq!(took.state, "done", "{}", took.message);
    let run_id = took.run_id.clone().unwrap();
    assert_eq!(took.webhooks.len(), 1);
    assert_eq!(took.webhooks[0].1, Ok(3), "delivered on the third attempt");
    let s = seen.lock().unwrap();
    assert_eq!(s.calls, 3);
    let (sig, body) = &s.got[0];
    assert!(verify(secret, body, sig), "signature {sig}");
    assert!(!verify("another-secret-value", body, sig));
    let n: Notice = serde_json::from_slice(body).unwrap();
    assert_eq!(n.run_id, run_id);
    assert_eq!(
        n.new_failures,
        vec!["attack-hang/model/tenant@sim".to_string()]
    );
    // The queue entry knows its run; the queue is empty now.
    let q = dbh.blocking(|s| s.queue_entry(id)).unwrap().unwrap();
    assert_eq!(q.state, "done");
    assert_eq!(q.run_id.as_deref(), Some(run_id.as_str()));
    assert!(take_one(&dbh, &o).unwrap().is_none());
}

#[test]
fn an_unreachable_webhook_gives_up_after_its_attempts() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A port nobody listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let r = rt.block_on(hilrig_serve::webhook::deliver(
        &format!("http://{addr}/x"),
        "k",
        b"{}",
        Retry {
            attempts: 3,
            first: Duration::from_millis(5),
            max: Duration::from_millis(10),
            timeout: Duration::from_secs(2),
        },
    ));
    let e = r.unwrap_err().to_string();
    assert!(e.contains("3 attempt(s) failed"), "{e}");
}

/// A campaign cancelled while it runs: the worker sees `cancel-requested`, the
/// runner starts no further case, the rest end SKIPPED and the queue entry
/// ends `cancelled` with the run kept. (Before the runner had a stop hook, all
/// five cases ran and the entry ended `done`.)
#[test]
fn a_running_campaign_is_cancelled_between_cases() {
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    let starts = t.path().join("starts");
    std::fs::create_dir(&starts).unwrap();
    // Each start leaves a file, then the case takes a while.
    let vmm = stand_in_vmm(
        t.path(),
        &format!(
            "mktemp -p {} >/dev/null\nsleep 1\necho '{FAIL_JSON}'; exit 1",
            starts.display()
        ),
    )
    .unwrap();
    let mut st = Store::open(Path::new(&db)).unwrap();
    let id = st
        .enqueue(
            "c",
            "name = \"c\"\n[defaults]\nretries = 0\nrepeats = 1\n[[case]]\nattacks = [\"attack-hang\", \"attack-key-read\", \"attack-xchg\", \"attack-lock-rmw\", \"pci-enum\"]\n",
            "alice",
        )
        .unwrap();
    drop(st);
    let dbh = hilrig_serve::Db::open(&db, 1).unwrap();
    let o = WorkerOptions {
        out_dir: t.path().join("out"),
        hosts: 1,
        vmm: Some(vmm),
        vmm_args: vec![],
        name: "w1".into(),
        retry: Retry {
            attempts: 1,
            first: Duration::from_millis(10),
            max: Duration::from_millis(10),
            timeout: Duration::from_secs(1),
        },
    };
    let worker = {
        let (dbh, o) = (dbh.clone(), o.clone());
        std::thread::spawn(move || take_one(&dbh, &o))
    };
    // Wait until the first case has started, then cancel over the store (what
    // the API and the form call).
    let t0 = std::time::Instant::now();
    while std::fs::read_dir(&starts).unwrap().count() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no case started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let state = dbh.blocking(move |s| s.queue_cancel(id)).unwrap();
    assert_eq!(state.as_deref(), Some("cancel-requested"));
    let took = worker
        .join()
        .unwrap()
        .unwrap()
        .expect("the queued campaign");
    assert_eq!(took.state, "cancelled", "{}", took.message);
    let started = std::fs::read_dir(&starts).unwrap().count();
    assert!(started < 5, "{started} of 5 cases started after the cancel");
    let q = dbh.blocking(move |s| s.queue_entry(id)).unwrap().unwrap();
    assert_eq!(q.state, "cancelled");
    let run_id = q.run_id.expect("the run is kept");
    let cases = dbh.blocking(move |s| s.cases(&run_id)).unwrap();
    assert_eq!(cases.len(), 5, "every case accounted for");
    let skipped = cases
        .iter()
        .filter(|c| c.outcome == hilrig_reports::Outcome::Skipped)
        .count();
    assert_eq!(skipped, 5 - started, "the cases not started are SKIPPED");
    assert!(cases
        .iter()
        .any(|c| format!("{:?}", c).contains("run cancelled")));
}
