//! The "network client → lab service" boundary (DESIGN §6), tested as an outside
//! tester would: a real server on loopback, raw HTTP/1.1, hostile clients. Each
//! test names the attack; each asserts the refusal, that nothing was written,
//! and that the server keeps serving.

mod common;

use common::*;
use hilrig_campaigns::store::Store;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

const CAMPAIGN: &str = "name = \"q\"\n[[case]]\nattacks = [\"attack-hang\"]\n";
const JSON: &str = "Content-Type: application/json";
const FORM: &str = "Content-Type: application/x-www-form-urlencoded";

fn token(s: &Server, name: &str) -> String {
    hilrig_serve::auth::add_token(&s.db, name).unwrap()
}

fn count(db: &str, table: &str) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

/// Whether the server closed `s` within `limit` (EOF or reset), reading what
/// it sends meanwhile.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Attack: slowloris. A client that sends half a request's headers and then
/// nothing, or connects and sends nothing at all, must lose its connection
/// after the header timeout (axum::serve sets no timer: it was held for ever).
#[test]
fn a_client_that_never_finishes_its_headers_is_dropped() {
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    fill(t.path(), &db, 1);
    let s = start_with(&db, |st| st.header_timeout = Duration::from_millis(300));
    let mut trickle = TcpStream::connect(s.addr).unwrap();
    trickle
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        .unwrap();
    let mut silent = TcpStream::connect(s.addr).unwrap();
    let t0 = Instant::now();
    assert!(
        closed_within(&mut trickle, Duration::from_secs(5)),
        "a half-sent request held its connection for 5 s"
    );
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)),
        "a silent connection held for 5 s"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    // A client that is merely slow between requests is not the same thing: a
    // whole request is answered.
    assert_eq!(get(s.addr, "/").status, 200);
}

/// Attack: connection exhaustion. Idle connections must not each
/// take a descriptor and a task in the server: at most `max_connections` are
/// accepted at once, and the server serves again once they go.
#[test]
fn idle_connections_beyond_the_cap_are_not_taken() {
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    fill(t.path(), &db, 1);
    let s = start_with(&db, |st| {
        st.header_timeout = Duration::from_secs(30);
        st.max_connections = 8;
    });
    assert_eq!(get(s.addr, "/").status, 200);
    std::thread::sleep(Duration::from_millis(200));
    let before = open_fds();
    let idle: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(s.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    let grown = open_fds() - before;
    // 40 client ends (this process) + what the server accepted.
    assert!(
        grown <= 40 + 8 + 4,
        "the server accepted {} of 40 idle connections (cap 8)",
        grown.saturating_sub(40)
    );
    drop(idle);
    let t0 = Instant::now();
    let r = get(s.addr, "/api/runs");
    assert_eq!(r.status, 200);
    assert!(t0.elapsed() < Duration::from_secs(10));
}

/// Attack: writes without a valid token, with the token anywhere but the
/// `Authorization: Bearer` header (or the form body), a replaced (revoked)
/// token, near-miss tokens. Every write route; nothing is written.
#[test]
fn every_write_route_refuses_missing_misplaced_wrong_and_revoked_tokens() {
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    fill(t.path(), &db, 1);
    let s = start(&db, 50);
    let old = token(&s, "mallory");
    let good = token(&s, "alice");
    let revoked = token(&s, "alice-old");
    // Replacing a user's token revokes the old one.
    let _ = old;
    let replaced = token(&s, "mallory");
    assert_ne!(replaced, old);
    // A queue entry to try cancelling.
    let auth = format!("Authorization: Bearer {good}");
    let body = serde_json::json!({ "campaign": CAMPAIGN }).to_string();
    let r = req(s.addr, "POST", "/api/campaigns", &[JSON, &auth], &body);
    assert_eq!(r.status, 201, "{}", r.body);
    let id = serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["id"]
        .as_i64()
        .unwrap();
    let _ = revoked;
    let queued = count(&db, "lab_queue");
    let hook = serde_json::json!({
        "campaign": "nightly", "url": "http://127.0.0.1:9/h", "secret": "0123456789abcdef0"
    })
    .to_string();
    let near: String = {
        let mut t = good.clone();
        t.pop();
        t.push(if good.ends_with('0') { '1' } else { '0' });
        t
    };
    let bad_headers: Vec<String> = vec![
        String::new(),
        "Authorization: Bearer".into(),
        "Authorization: Bearer ".into(),
        format!("Authorization: Bearer {old}"),
        format!("Authorization: Bearer {near}"),
        format!("Authorization: Bearer {good}x"),
        format!("Authorization: Bearer {}", &good[..good.len() - 1]),
        format!("Authorization: Bearer {}", good.to_uppercase()),
        format!("Authorization: Basic {good}"),
        format!("Authorization: {good}"),
        format!("Authorization: Bearer hlr_{}", "0".repeat(64)),
        format!("Authorization: Bearer {}", "hlr_".repeat(200)),
        format!("X-Api-Token: {good}"),
        format!("Cookie: token={good}"),
        format!("Authorization: Bearer {good}\u{0}"),
    ];
    let writes = [
        ("/api/campaigns".to_string(), body.clone()),
        (format!("/api/queue/{id}/cancel"), String::new()),
        ("/api/webhooks".to_string(), hook.clone()),
    ];
    for (path, b) in &writes {
        for h in &bad_headers {
            let mut hs = vec![JSON];
            if !h.is_empty() {
                hs.push(h);
            }
            let r = req(s.addr, "POST", path, &hs, b);
            assert!(
                r.status == 401 || r.status == 400,
                "{path} with {h:?}: {} {}",
                r.status,
                r.body
            );
            assert!(!r.body.contains(&good), "the token echoed back");
        }
        // The token in the query string is not a credential.
        for q in ["token", "access_token", "auth"] {
            let r = req(s.addr, "POST", &format!("{path}?{q}={good}"), &[JSON], b);
            assert_eq!(r.status, 401, "{path}?{q}=: {}", r.body);
        }
    }
    // Form routes: the token in the body, this server's Origin; a token in the
    // query string, or another origin, or a look-alike origin, is refused.
    let origin = format!("Origin: http://{}", s.addr);
    let form = format!("campaign={}&token={}", enc(CAMPAIGN), enc(&good));
    let cancel_form = format!("token={}", enc(&good));
    for (path, f) in [
        ("/queue".to_string(), form.clone()),
        (format!("/queue/{id}/cancel"), cancel_form.clone()),
    ] {
        for h in [
            "Origin: http://evil.example".to_string(),
            "Origin: null".to_string(),
            format!("Origin: http://{}.evil.example", s.addr),
            format!("Origin: http://evil.example/{}", s.addr),
            format!("Origin: http://{}@evil.example", s.addr),
            format!("Referer: http://evil.example/http://{}/", s.addr),
            String::new(),
        ] {
            let mut hs = vec![FORM];
            if !h.is_empty() {
                hs.push(&h);
            }
            let r = req(s.addr, "POST", &path, &hs, &f);
            assert_eq!(r.status, 403, "{path} with {h:?}: {}", r.body);
        }
        for t in [old.as_str(), near.as_str(), "", "hlr_"] {
            let f = f.replace(&enc(&good), &enc(t));
            let r = req(s.addr, "POST", &path, &[FORM, &origin], &f);
            assert!(
                r.status == 401 || r.status == 422 || r.status == 400,
                "{path} with token {t:?}: {} {}",
                r.status,
                r.body
            );
        }
        let without = f.replace(&format!("token={}", enc(&good)), "x=1");
        let r = req(
            s.addr,
            "POST",
            &format!("{path}?token={}", enc(&good)),
            &[FORM, &origin],
            &without,
        );
        assert!(
            r.status == 422 || r.status == 400 || r.status == 401,
            "{path}?token=: {} {}",
            r.status,
            r.body
        );
    }
    assert_eq!(count(&db, "lab_queue"), queued, "nothing queued");
    assert_eq!(count(&db, "lab_webhooks"), 0, "no webhook stored");
    let q = get(s.addr, "/api/queue");
    assert!(q.body.contains("\"queued\""), "not cancelled: {}", q.body);
    // The replaced token of mallory works, the old one did not (above).
    let r = req(
        s.addr,
        "POST",
        &format!("/api/queue/{id}/cancel"),
        &[&format!("Authorization: Bearer {replaced}")],
        "",
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Attack: SQL metacharacters in every path and query parameter and in the
/// stored fields of every write. Data, never SQL; never a 500; tables intact.
#[test]
fn sql_metacharacters_in_every_parameter_and_field_are_data() {
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    let runs = fill(t.path(), &db, 2);
    let s = start(&db, 50);
    let good = token(&s, "alice");
    let auth = format!("Authorization: Bearer {good}");
    let evils = [
        "' OR '1'='1",
        "x'); DROP TABLE runs; --",
        "\" OR \"\"=\"",
        "1; DELETE FROM cases",
        "%' --",
        "\\'; SELECT 1; --",
        "$1",
        "?",
        "NULL",
    ];
    for e in evils {
        let x = enc(e);
        for path in [
            format!("/runs/{x}"),
            format!("/runs/{x}/artifacts/console.txt"),
            format!("/campaigns/{x}"),
            format!("/hosts/{x}"),
            format!("/api/runs/{x}"),
            format!("/api/history?case={x}"),
            format!("/history?case={x}"),
            format!("/?campaign={x}"),
            format!("/api/runs?campaign={x}"),
            format!("/api/runs?limit={x}"),
            format!("/history?case=a&nights={x}"),
        ] {
            let r = get(s.addr, &path);
            assert!(
                r.status == 200 || r.status == 400 || r.status == 404,
                "{path}: {} {}",
                r.status,
                r.body
            );
        }
        let r = req(
            s.addr,
            "POST",
            &format!("/api/queue/{x}/cancel"),
            &[&auth],
            "",
        );
        assert_eq!(r.status, 400, "cancel {e:?}: {}", r.body);
        // Stored fields: a webhook's campaign name, a submitted campaign.
        let hook = serde_json::json!({
            "campaign": e, "url": "http://127.0.0.1:9/h", "secret": "0123456789abcdef0"
        })
        .to_string();
        let r = req(s.addr, "POST", "/api/webhooks", &[JSON, &auth], &hook);
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let c = rusqlite::Connection::open(&db).unwrap();
    let stored: Vec<String> = c
        .prepare("SELECT campaign FROM lab_webhooks ORDER BY campaign")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut want: Vec<String> = evils.iter().map(|e| e.to_string()).collect();
    want.sort();
    assert_eq!(stored, want, "stored verbatim");
    // Huge numbers: clamped, not a 500 or an overflow.
    for p in [
        "/api/runs?offset=18446744073709551615",
        "/api/runs?limit=18446744073709551615",
        "/?offset=18446744073709551615&limit=18446744073709551615",
        "/history?case=x&nights=18446744073709551615",
        "/api/runs?offset=-1",
        "/api/queue/99999999999999999999999/cancel",
    ] {
        let r = get(s.addr, p);
        assert!(r.status < 500, "{p}: {} {}", r.status, r.body);
    }
    let l: serde_json::Value = serde_json::from_str(&get(s.addr, "/api/runs").body).unwrap();
    assert_eq!(l.as_array().unwrap().len(), runs.len(), "tables intact");
    assert_eq!(count(&db, "cases") as usize, runs[0].cases.len() * 2);
}

/// Attack: oversized bodies, headers and URIs, malformed and deeply nested
/// JSON. Each refused with a 4xx (a JSON error on the API), the server serving
/// on; nothing queued.
#[test]
fn oversized_and_malformed_requests_are_refused_and_the_server_serves_on() {
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    fill(t.path(), &db, 1);
    let s = start(&db, 50);
    let good = token(&s, "alice");
    let auth = format!("Authorization: Bearer {good}");
    // A 3 MiB body: past the extractor's limit (and the campaign's 1 MiB).
    let big = serde_json::json!({ "campaign": "#".repeat(3 << 20) }).to_string();
    let r = req(s.addr, "POST", "/api/campaigns", &[JSON, &auth], &big);
    assert!(r.status == 413 || r.status == 400, "{}", r.status);
    let r = req(s.addr, "POST", "/api/campaigns", &[JSON], &big);
    assert!(r.status == 401 || r.status == 413, "{}", r.status);
    // Just over the campaign bound, under the body bound: a clear 400.
    let over = serde_json::json!({ "campaign": "#".repeat((1 << 20) + 1) }).to_string();
    let r = req(s.addr, "POST", "/api/campaigns", &[JSON, &auth], &over);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("at most"), "{}", r.body);
    // Malformed JSON: 400 with a JSON error naming the problem.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    for b in [
        "{",
        "[]",
        "null",
        "{\"campaign\": 3}",
        "{\"campaign\": \"x\", \"campaign\": \"y\"}",
        "{\"campaign\": \"\\ud800\"}",
        deep.as_str(),
        "\u{feff}{\"campaign\": \"x\"}",
    ] {
        let r = req(s.addr, "POST", "/api/campaigns", &[JSON, &auth], b);
        assert_eq!(r.status, 400, "{b:.40}: {} {}", r.status, r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("a JSON error");
        assert_eq!(v["status"], 400);
    }
    let r = req(s.addr, "POST", "/api/campaigns", &[&auth], &big[..100]);
    assert!(r.status == 400 || r.status == 415, "{}", r.status);
    // A 1 MiB header, a 200 KiB URI, 10,000 headers: refused or closed.
    let long = format!("X-Big: {}", "a".repeat(1 << 20));
    let r = req(s.addr, "GET", "/", &[&long], "");
    assert!(
        r.status == 431 || r.status == 400 || r.status == 0,
        "{}",
        r.status
    );
    let r = get(s.addr, &format!("/history?case={}", "a".repeat(200 << 10)));
    assert!(r.status >= 400 || r.status == 0, "{}", r.status);
    let many: Vec<String> = (0..10_000).map(|i| format!("X-{i}: v")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let r = req(s.addr, "GET", "/", &many, "");
    assert!(
        r.status == 431 || r.status == 400 || r.status == 0,
        "{}",
        r.status
    );
    // A body that never arrives: bounded by the peer closing, not held.
    assert_eq!(count(&db, "lab_queue"), 0, "nothing queued");
    assert_eq!(get(s.addr, "/").status, 200, "still serving");
}

/// A run whose every name a test controls.
fn hostile_run(dir: &Path, db: &str) -> hilrig_reports::Run {
    let mut run = hilrig_reports::sample_run(1);
    run.campaign = "<script>alert('campaign')</script>".into();
    for (i, h) in run.hosts.iter_mut().enumerate() {
        h.name = format!("<img src=x onerror=alert({i})>");
    }
    let host = run.hosts[0].name.clone();
    for c in run.cases.iter_mut() {
        c.id = format!("{}\"><script>alert(1)</script>", c.id);
        c.host = host.clone();
        c.message = "</pre><script>alert('msg')</script>".into();
        for a in c.attempts.iter_mut() {
            a.host = host.clone();
            a.message = "<svg onload=alert(2)>".into();
        }
    }
    let mut store = Store::open(Path::new(db)).unwrap();
    let run_dir = dir.join(&run.id);
    for c in &run.cases {
        for a in &c.artifacts {
            let p = run_dir.join(&a.path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, "<script>alert('console')</script>\n").unwrap();
        }
    }
    put_run(&mut store, &run, &run_dir);
    run
}

/// Attack: stored HTML. A campaign, host, case id, message and console line
/// that are markup are shown as text on every page.
#[test]
fn stored_markup_is_text_on_every_page() {
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    let run = hostile_run(t.path(), &db);
    let s = start(&db, 50);
    let case = &run.cases[0].id;
    let pages = [
        "/".to_string(),
        format!("/runs/{}", enc(&run.id)),
        format!("/history?case={}", enc(case)),
        format!("/campaigns/{}", enc(&run.campaign)),
        "/hosts".to_string(),
        format!("/hosts/{}", enc(&run.hosts[0].name)),
    ];
    for p in &pages {
        let r = get(s.addr, p);
        assert_eq!(r.status, 200, "{p}: {}", r.body);
        for raw in [
            "<script>alert",
            "<img src=x",
            "<svg onload",
            "\"><script",
            "</pre><script",
        ] {
            assert!(
                !r.body.contains(raw),
                "{p}: raw {raw:?} in the page: …{}…",
                r.body
                    .find(raw)
                    .map(|i| &r.body[i.saturating_sub(80)..(i + 80).min(r.body.len())])
                    .unwrap_or("")
            );
        }
        let csp = r.header("content-security-policy").unwrap_or_default();
        assert!(csp.contains("script-src 'self'"), "{p}: {csp}");
    }
    // The error page echoes what was asked for: as text.
    let r = get(
        s.addr,
        &format!("/runs/{}", enc("<script>alert(9)</script>")),
    );
    assert_eq!(r.status, 404);
    assert!(!r.body.contains("<script>alert"), "{}", r.body);
}

/// Attack: crafted artifact names: CR/LF (header injection), an `.html`
/// artifact (served as markup?), a FIFO in the run directory (a server thread
/// waiting on it), a thousand path components.
#[test]
fn crafted_artifact_names_inject_nothing_and_a_fifo_is_not_waited_on() {
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    let runs = fill(t.path(), &db, 1);
    let s = start(&db, 50);
    let run = &runs[0];
    let dir = t.path().join(&run.id);
    std::fs::write(dir.join("page.html"), "<script>alert(1)</script>").unwrap();
    std::fs::write(dir.join("page.svg"), "<svg onload=alert(1)/>").unwrap();
    let fifo = dir.join("pipe.txt");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid path string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let base = format!("/runs/{}/artifacts", enc(&run.id));
    for name in ["page.html", "page.svg"] {
        let r = get(s.addr, &format!("{base}/{name}"));
        assert_eq!(r.status, 200);
        let ct = r.header("content-type").unwrap_or_default();
        assert!(!ct.contains("html") && !ct.contains("svg"), "{name}: {ct}");
        assert!(r
            .header("content-security-policy")
            .unwrap_or_default()
            .contains("sandbox"));
        assert_eq!(
            r.header("x-content-type-options").as_deref(),
            Some("nosniff")
        );
    }
    for evil in [
        "x%0d%0aSet-Cookie:%20a=1",
        "x.txt%0d%0aContent-Type:%20text/html",
        "%0d%0a%0d%0a<script>",
    ] {
        let r = get(s.addr, &format!("{base}/{evil}"));
        assert!(r.status == 400 || r.status == 404, "{evil}: {}", r.status);
        assert!(r.header("set-cookie").is_none(), "{evil}: {}", r.head);
        assert!(!r.body.contains("<script>"), "{evil}: {}", r.body);
    }
    let t0 = Instant::now();
    let r = get(s.addr, &format!("{base}/pipe.txt"));
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.body.contains("not a regular file"), "{}", r.body);
    assert!(t0.elapsed() < Duration::from_secs(5), "waited on a FIFO");
    let deep = vec!["a"; 1000].join("/");
    let r = get(s.addr, &format!("{base}/{deep}"));
    assert!(r.status == 400 || r.status == 404, "{}", r.status);
    assert_eq!(get(s.addr, "/").status, 200);
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Attack: a flood of requests (reads, refused writes, 404s, refused
/// artifacts). Memory must level off, not grow with the request count.
#[test]
fn a_request_flood_does_not_grow_memory() {
    let t = tempfile::tempdir().unwrap();
    let db = tmp_db(t.path());
    fill(t.path(), &db, 2);
    let s = start(&db, 50);
    let round = |n: usize| {
        for i in 0..n {
            let r = match i % 4 {
                0 => get(s.addr, "/api/runs"),
                1 => req(s.addr, "POST", "/api/campaigns", &[JSON], "{}"),
                2 => get(s.addr, &format!("/runs/nope-{i}")),
                _ => get(s.addr, &format!("/runs/x/artifacts/..%2f{i}")),
            };
            assert!(r.status > 0 && r.status < 500, "{}", r.status);
        }
    };
    round(600);
    let warm = rss_kib();
    round(2400);
    let after = rss_kib();
    assert!(
        after < warm + 16 * 1024,
        "RSS grew from {warm} KiB to {after} KiB over 2,400 requests"
    );
}
