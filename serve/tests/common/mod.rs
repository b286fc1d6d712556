//! Test helpers: a store filled with sample runs, a server on a free port, and
//! a raw HTTP/1.1 client (raw so that paths reach the server as written).
#![allow(dead_code)]

use hilrig_campaigns::store::{RunRow, Store};
use hilrig_reports::{sample_run, Run};
use hilrig_serve::{AppState, Db};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `n` nights of the sample campaign (seeds 1..=n, a day apart), each with a
/// run directory holding its artifacts (console logs with text).
pub fn fill(dir: &Path, db: &str, n: u64) -> Vec<Run> {
    let mut store = Store::open(Path::new(db)).unwrap();
    let mut runs = vec![];
    for seed in 1..=n {
        let run = sample_run(seed);
        let run_dir = dir.join(&run.id);
        for c in &run.cases {
            for a in &c.artifacts {
                let p = run_dir.join(&a.path);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, format!("console of {} night {seed}\nlast line\n", c.id))
                    .unwrap();
            }
        }
        put_run(&mut store, &run, &run_dir);
        runs.push(run);
    }
    runs
}

/// Record the finished `run` (its directory `run_dir`) in `store`.
pub fn put_run(store: &mut Store, run: &Run, run_dir: &Path) {
    store
        .create_run(
            &RunRow {
                id: run.id.clone(),
                campaign: run.campaign.clone(),
                file: "nightly.toml".into(),
                run_dir: run_dir.to_string_lossy().into(),
                started_ms: run.started_ms,
                finished_ms: None,
            },
            &run.hosts,
        )
        .unwrap();
    for c in &run.cases {
        store.put_case(&run.id, c).unwrap();
    }
    store.finish_run(&run.id, run.finished_ms).unwrap();
}

/// A server on 127.0.0.1:0 over `db`, in its own runtime thread.
pub struct Server {
    pub addr: SocketAddr,
    pub db: Arc<Db>,
    _rt: tokio::runtime::Runtime,
}

pub fn start(db: &str, poll_ms: u64) -> Server {
    start_with(db, |st| st.poll = std::time::Duration::from_millis(poll_ms))
}

/// A server whose state `f` adjusts (timeouts, connection cap).
pub fn start_with(db: &str, f: impl FnOnce(&mut AppState)) -> Server {
    let db = Db::open(db, 4).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut st = AppState::new(db.clone());
    f(&mut st);
    let l = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = l.local_addr().unwrap();
    rt.spawn(async move {
        let _ = hilrig_serve::serve(l, st).await;
    });
    Server { addr, db, _rt: rt }
}

/// A response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// One request; `extra` are header lines.
pub fn req(addr: SocketAddr, method: &str, path: &str, extra: &[&str], body: &str) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in extra {
        r.push_str(h);
        r.push_str("\r\n");
    }
    if !body.is_empty() || method == "POST" {
        r.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    r.push_str(body);
    s.write_all(r.as_bytes()).unwrap();
    let mut out = vec![];
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Resp {
        status,
        head: head.to_string(),
        body,
    }
}

fn dechunk(mut b: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = b.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        b = rest[n..].trim_start_matches("\r\n");
    }
    out
}

pub fn get(addr: SocketAddr, path: &str) -> Resp {
    req(addr, "GET", path, &[], "")
}

pub fn tmp_db(dir: &Path) -> String {
    dir.join("results.sqlite").to_string_lossy().into_owned()
}

pub fn enc(s: &str) -> String {
    hilrig_serve::pages::enc(s)
}

pub fn path_of(p: &Path) -> PathBuf {
    p.to_path_buf()
}
