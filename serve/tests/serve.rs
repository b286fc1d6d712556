//! The lab service end to end over a real SQLite store and real HTTP on loopback.

mod common;
use common::*;
use hilrig_campaigns::store::Store;
use hilrig_reports::Outcome;
use std::path::Path;

#[test]
fn index_run_history_trends_and_hosts_pages_render() {
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    let runs = fill(t.path(), &db, 4);
    let s = start(&db, 50);
    let idx = get(s.addr, "/");
    assert_eq!(idx.status, 200, "{}", idx.body);
    for r in &runs {
        assert!(idx.body.contains(&r.id), "index lists {}", r.id);
    }
    assert!(idx
        .header("content-security-policy")
        .unwrap()
        .contains("script-src 'self'"));
    let newest = runs.last().unwrap();
    let page = get(s.addr, &format!("/runs/{}", enc(&newest.id)));
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("Compared with the previous run"),
        "diffed"
    );
    assert!(
        page.body.contains("/history?case="),
        "cases link to their history"
    );
    assert!(page
        .body
        .contains(&format!("/runs/{}/artifacts/", enc(&newest.id))));
    let case = &newest.cases[0].id;
    let h = get(s.addr, &format!("/history?case={}", enc(case)));
    assert_eq!(h.status, 200, "{}", h.body);
    assert!(h.body.contains(r#"id="strip""#) && h.body.contains("Flake rate"));
    assert_eq!(h.body.matches("<tr><td>").count(), 4, "one row per night");
    let tr = get(s.addr, &format!("/campaigns/{}", enc(&newest.campaign)));
    assert_eq!(tr.status, 200);
    assert!(tr.body.contains("Pass rate") && tr.body.contains("Teardown time p50"));
    let hosts = get(s.addr, "/hosts");
    assert_eq!(hosts.status, 200);
    assert!(hosts.body.contains("sim-01"));
    let host = get(s.addr, "/hosts/sim-01");
    assert_eq!(host.status, 200, "{}", host.body);
    assert!(host.body.contains("last line"), "last console lines");
    assert!(host.body.contains("INFRA history"));
    assert_eq!(get(s.addr, "/runs/nope").status, 404);
    assert_eq!(get(s.addr, "/history?case=nope").status, 404);
}

#[test]
fn the_api_and_the_page_give_the_same_history_as_the_function() {
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    let runs = fill(t.path(), &db, 5);
    let s = start(&db, 50);
    // A case that fails on some night.
    let case = runs
        .iter()
        .flat_map(|r| r.cases.iter())
        .find(|c| c.outcome == Outcome::Fail)
        .unwrap()
        .id
        .clone();
    let want =
        s.db.blocking(|st| hilrig_serve::case_history(st, &case, 3))
            .unwrap();
    assert_eq!(want.nights.len(), 3);
    let api = get(
        s.addr,
        &format!("/api/history?case={}&nights=3", enc(&case)),
    );
    assert_eq!(api.status, 200, "{}", api.body);
    let got: serde_json::Value = serde_json::from_str(&api.body).unwrap();
    assert_eq!(got, serde_json::to_value(&want).unwrap());
    let page = get(s.addr, &format!("/history?case={}&nights=3", enc(&case)));
    let mut at = 0;
    for n in &want.nights {
        let i = page.body[at..].find(&format!(">{}</a></td><td>", n.run_id));
        assert!(
            i.is_some(),
            "page has {} after the previous night",
            n.run_id
        );
        at += i.unwrap();
    }
    // The OpenAPI document is served and names every route.
    let doc = get(s.addr, "/api/openapi.json");
    let v: serde_json::Value = serde_json::from_str(&doc.body).unwrap();
    for p in [
        "/api/runs",
        "/api/runs/{id}",
        "/api/history",
        "/api/queue",
        "/api/campaigns",
        "/api/queue/{id}/cancel",
        "/api/webhooks",
    ] {
        assert!(v["paths"].get(p).is_some(), "{p}");
    }
    let list = get(s.addr, "/api/runs?limit=2");
    let l: serde_json::Value = serde_json::from_str(&list.body).unwrap();
    assert_eq!(l.as_array().unwrap().len(), 2);
    let one = get(s.addr, &format!("/api/runs/{}", enc(&runs[0].id)));
    let o: serde_json::Value = serde_json::from_str(&one.body).unwrap();
    assert_eq!(o["run"]["id"], runs[0].id.as_str());
}

#[test]
fn artifacts_cannot_leave_the_run_directory() {
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    let runs = fill(t.path(), &db, 1);
    let s = start(&db, 50);
    let run = &runs[0];
    let run_dir = t.path().join(&run.id);
    let secret = t.path().join("secret.txt");
    std::fs::write(&secret, "TOP SECRET").unwrap();
    std::os::unix::fs::symlink(&secret, run_dir.join("link.txt")).unwrap();
    std::os::unix::fs::symlink(t.path(), run_dir.join("up")).unwrap();
    let a = &run
        .cases
        .iter()
        .find(|c| !c.artifacts.is_empty())
        .unwrap()
        .artifacts[0];
    let base = format!("/runs/{}/artifacts", enc(&run.id));
    let ok = get(s.addr, &format!("{base}/{}", a.path));
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(ok.body.contains("last line"));
    assert_eq!(
        ok.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    for evil in [
        "../secret.txt",
        "..%2fsecret.txt",
        "%2e%2e/secret.txt",
        "%2e%2e%2fsecret.txt",
        "cases/../../secret.txt",
        "%2fetc%2fpasswd",
        "/etc/passwd",
        "link.txt",
        "up/secret.txt",
        "cases/%00x",
        "cases//x",
        "..%5csecret.txt",
    ] {
        let r = get(s.addr, &format!("{base}/{evil}"));
        assert!(
            !r.body.contains("TOP SECRET") && !r.body.contains("root:"),
            "{evil} leaked: {}",
            r.body
        );
        assert!(r.status == 400 || r.status == 404, "{evil}: {}", r.status);
    }
    // The opener on its own, too.
    assert!(hilrig_serve::artifacts::open(&run_dir, "link.txt").is_err());
    assert!(hilrig_serve::artifacts::open(&run_dir, "up/secret.txt").is_err());
    assert!(
        hilrig_serve::artifacts::open(&run_dir, "cases").is_err(),
        "a directory"
    );
}

fn token(s: &Server, name: &str) -> String {
    hilrig_serve::auth::add_token(&s.db, name).unwrap()
}

const CAMPAIGN: &str = "name = \"q\"\n[[case]]\nattacks = [\"attack-hang\"]\n";

#[test]
fn writes_need_a_token_and_forms_need_this_origin() {
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    fill(t.path(), &db, 1);
    let s = start(&db, 50);
    let tok = token(&s, "alice");
    let body = serde_json::json!({ "campaign": CAMPAIGN }).to_string();
    let ct = "Content-Type: application/json";
    let r = req(s.addr, "POST", "/api/campaigns", &[ct], &body);
    assert_eq!(r.status, 401, "{}", r.body);
    let r = req(
        s.addr,
        "POST",
        "/api/campaigns",
        &[ct, "Authorization: Bearer hlr_00"],
        &body,
    );
    assert_eq!(r.status, 401);
    let auth = format!("Authorization: Bearer {tok}");
    let r = req(s.addr, "POST", "/api/campaigns", &[ct, &auth], &body);
    assert_eq!(r.status, 201, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["submitted_by"], "alice");
    let id = v["id"].as_i64().unwrap();
    // Not a campaign: a clear 400.
    let bad = serde_json::json!({ "campaign": "name = 3" }).to_string();
    let r = req(s.addr, "POST", "/api/campaigns", &[ct, &auth], &bad);
    assert_eq!(r.status, 400, "{}", r.body);
    // The token is stored hashed only.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let stored: String = conn
        .query_row(
            "SELECT token_sha256 FROM lab_tokens WHERE name = 'alice'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_ne!(stored, tok);
    assert_eq!(stored, hilrig_serve::auth::token_hash(&tok));
    // Forms: the token in the body and the Origin of this server.
    let form = format!("campaign={}&token={}", enc(CAMPAIGN), enc(&tok));
    let fct = "Content-Type: application/x-www-form-urlencoded";
    let r = req(
        s.addr,
        "POST",
        "/queue",
        &[fct, "Origin: http://evil.example"],
        &form,
    );
    assert_eq!(r.status, 403, "cross-site form post: {}", r.body);
    let r = req(s.addr, "POST", "/queue", &[fct], &form);
    assert_eq!(r.status, 403, "no Origin or Referer");
    let origin = format!("Origin: http://{}", s.addr);
    let r = req(s.addr, "POST", "/queue", &[fct, &origin], &form);
    assert_eq!(r.status, 303, "{}", r.body);
    let wrong = format!("campaign={}&token=hlr_nope", enc(CAMPAIGN));
    let r = req(s.addr, "POST", "/queue", &[fct, &origin], &wrong);
    assert_eq!(r.status, 401);
    // Cancel: token needed.
    let r = req(s.addr, "POST", &format!("/api/queue/{id}/cancel"), &[], "");
    assert_eq!(r.status, 401);
    let r = req(
        s.addr,
        "POST",
        &format!("/api/queue/{id}/cancel"),
        &[&auth],
        "",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("cancelled"));
    let r = req(
        s.addr,
        "POST",
        &format!("/api/queue/{id}/cancel"),
        &[&auth],
        "",
    );
    assert_eq!(r.status, 404, "already cancelled");
    let q = get(s.addr, "/api/queue");
    let q: serde_json::Value = serde_json::from_str(&q.body).unwrap();
    assert_eq!(q.as_array().unwrap().len(), 2);
}

#[test]
fn sql_in_parameters_is_only_data() {
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    fill(t.path(), &db, 2);
    let s = start(&db, 50);
    for evil in ["' OR 1=1 --", "x'; DROP TABLE cases; --", "\" OR \"\"=\""] {
        let r = get(s.addr, &format!("/api/history?case={}", enc(evil)));
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["nights"].as_array().unwrap().len(), 0, "{evil}");
        assert_eq!(
            get(s.addr, &format!("/?campaign={}", enc(evil))).status,
            200
        );
        assert_eq!(get(s.addr, &format!("/runs/{}", enc(evil))).status, 404);
    }
    let l: serde_json::Value = serde_json::from_str(&get(s.addr, "/api/runs").body).unwrap();
    assert_eq!(l.as_array().unwrap().len(), 2, "tables intact");
}

#[test]
fn the_queue_hands_each_campaign_to_one_worker() {
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    let mut st = Store::open(Path::new(&db)).unwrap();
    let a = st.enqueue("q", CAMPAIGN, "alice").unwrap();
    let b = st.enqueue("q", CAMPAIGN, "bob").unwrap();
    let c = st.enqueue("q", CAMPAIGN, "carol").unwrap();
    assert_eq!(st.queue_cancel(b).unwrap().as_deref(), Some("cancelled"));
    let mut other = Store::open(Path::new(&db)).unwrap();
    let t1 = st.queue_take("w1").unwrap().unwrap();
    let t2 = other.queue_take("w2").unwrap().unwrap();
    assert_eq!(
        (t1.id, t2.id),
        (a, c),
        "oldest first, the cancelled one skipped"
    );
    assert!(st.queue_take("w1").unwrap().is_none());
    assert_eq!(
        st.queue_cancel(a).unwrap().as_deref(),
        Some("cancel-requested"),
        "a running entry is asked to stop"
    );
}

#[test]
fn a_store_from_before_the_lab_tables_opens_and_serves() {
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    // The schema as it was before issue 19, with one run.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "CREATE TABLE runs (id TEXT PRIMARY KEY, campaign TEXT NOT NULL, file TEXT NOT NULL,
            run_dir TEXT NOT NULL, started_ms INTEGER NOT NULL, finished_ms INTEGER,
            hosts TEXT NOT NULL DEFAULT '[]');
         CREATE TABLE cases (run_id TEXT NOT NULL REFERENCES runs(id), case_id TEXT NOT NULL,
            outcome TEXT NOT NULL, result TEXT NOT NULL, PRIMARY KEY (run_id, case_id));
         CREATE TABLE samples (run_id TEXT NOT NULL, case_id TEXT NOT NULL, kind TEXT NOT NULL,
            seq INTEGER NOT NULL, value REAL NOT NULL, PRIMARY KEY (run_id, case_id, kind, seq));",
    )
    .unwrap();
    let run = hilrig_reports::sample_run(3);
    conn.execute(
        "INSERT INTO runs (id, campaign, file, run_dir, started_ms, finished_ms) VALUES (?1, 'nightly', 'n.toml', '/nonexistent', 1, 2)",
        [&run.id],
    )
    .unwrap();
    let c = &run.cases[0];
    conn.execute(
        "INSERT INTO cases (run_id, case_id, outcome, result) VALUES (?1, ?2, ?3, ?4)",
        [
            &run.id,
            &c.id,
            &c.outcome.as_str().to_string(),
            &serde_json::to_string(c).unwrap(),
        ],
    )
    .unwrap();
    drop(conn);
    let s = start(&db, 50);
    assert!(get(s.addr, "/").body.contains(&run.id));
    let h = get(s.addr, &format!("/api/history?case={}", enc(&c.id)));
    let v: serde_json::Value = serde_json::from_str(&h.body).unwrap();
    assert_eq!(v["nights"].as_array().unwrap().len(), 1);
}

#[test]
fn a_running_run_streams_its_cases_and_its_end() {
    use std::io::{BufRead, BufReader, Write};
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    let run = hilrig_reports::sample_run(5);
    let mut st = Store::open(Path::new(&db)).unwrap();
    st.create_run(
        &hilrig_campaigns::store::RunRow {
            id: run.id.clone(),
            campaign: run.campaign.clone(),
            file: "n.toml".into(),
            run_dir: t.path().to_string_lossy().into(),
            started_ms: run.started_ms,
            finished_ms: None,
        },
        &run.hosts,
    )
    .unwrap();
    st.put_case(&run.id, &run.cases[0]).unwrap();
    let s = start(&db, 20);
    let page = get(s.addr, &format!("/runs/{}", enc(&run.id)));
    assert!(page.body.contains("live-status") && page.body.contains("/static/live.js"));
    assert!(page.body.contains("events?seen=1"));
    let js = get(s.addr, "/static/live.js");
    assert!(js.body.contains("EventSource"));
    let mut sock = std::net::TcpStream::connect(s.addr).unwrap();
    write!(
        sock,
        "GET /runs/{}/events?seen=1 HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n",
        enc(&run.id)
    )
    .unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut r = BufReader::new(sock);
    st.put_case(&run.id, &run.cases[1]).unwrap();
    let mut seen = String::new();
    let mut line = String::new();
    while !seen.contains(&run.cases[1].id) {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "stream ended: {seen}");
        seen.push_str(&line);
    }
    assert!(seen.contains("event: case"));
    assert!(
        !seen.contains(&format!("\"{}\"", run.cases[0].id)),
        "seen=1 skips the first"
    );
    st.finish_run(&run.id, run.finished_ms).unwrap();
    while !seen.contains("event: end") {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "stream ended: {seen}");
        seen.push_str(&line);
    }
}

/// The host pages show the device state the runner recorded (offline with its
/// reason until an operator brings the host back), not a "not stored" note.
#[test]
fn host_pages_show_the_recorded_health_state() {
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    fill(t.path(), &db, 2);
    let states = hilrig_rig::hoststate::HostStates::open(&db).unwrap();
    states
        .set_offline("sim-01", "health check: ssh: connection refused")
        .unwrap();
    let s = start(&db, 50);
    let host = get(s.addr, "/hosts/sim-01");
    assert_eq!(host.status, 200, "{}", host.body);
    assert!(host.body.contains(">offline</span>"), "{}", host.body);
    assert!(host.body.contains("ssh: connection refused"));
    let list = get(s.addr, "/hosts");
    assert!(list.body.contains("<th>Health</th>") && list.body.contains(">offline</span>"));
    // Brought back: online, with the operator's words.
    states
        .set_online("sim-01", "operator: cable replaced")
        .unwrap();
    let host = get(s.addr, "/hosts/sim-01");
    assert!(!host.body.contains(">offline</span>"), "{}", host.body);
    assert!(host.body.contains("operator: cable replaced"));
}

/// The history names the builds either side of a change (from the attempts'
/// recorded build), and the trends plot the counters-service verdicts per
/// night (from the cases' metrics).
#[test]
fn history_names_builds_and_trends_plot_counters_verdicts() {
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    let runs = fill(t.path(), &db, 2);
    let (old, new) = (&runs[0], &runs[1]);
    let id = old.cases[0].id.clone();
    let mut st = Store::open(Path::new(&db)).unwrap();
    for (run, outcome, build) in [(old, Outcome::Pass, "a"), (new, Outcome::Fail, "b")] {
        let mut c = run
            .cases
            .iter()
            .find(|c| c.id == id)
            .expect("the case every night")
            .clone();
        c.outcome = outcome;
        for a in &mut c.attempts {
            a.build = Some(build.repeat(64));
        }
        if c.attempts.is_empty() {
            c.attempts.push(hilrig_reports::Attempt {
                outcome,
                host: "sim-01".into(),
                duration_ms: 1,
                message: String::new(),
                build: Some(build.repeat(64)),
            });
        }
        c.metrics.counters_verdicts.insert("trusted".into(), 3);
        if outcome == Outcome::Fail {
            c.metrics.counters_verdicts.insert("rolled-back".into(), 1);
        }
        st.put_case(&run.id, &c).unwrap();
    }
    drop(st);
    let s = start(&db, 50);
    let h = get(s.addr, &format!("/history?case={}", enc(&id)));
    assert_eq!(h.status, 200, "{}", h.body);
    assert!(
        h.body.contains(&format!(
            r#"<span id="builds"><code>{}</code> (last good) → <code>{}</code> (first failing)</span>"#,
            "a".repeat(12),
            "b".repeat(12)
        )),
        "{}",
        h.body
    );
    let tr = get(s.addr, &format!("/campaigns/{}", enc(&new.campaign)));
    assert_eq!(tr.status, 200);
    assert!(
        tr.body.contains("Counters-service verdicts per night"),
        "{}",
        tr.body
    );
    assert!(
        tr.body
            .contains(r#"<span class="bad">rolled-back</span> 1"#),
        "{}",
        tr.body
    );
    // The API carries the builds too.
    let api = get(s.addr, &format!("/api/history?case={}", enc(&id)));
    assert!(api.body.contains(&"b".repeat(64)), "{}", api.body);
}
