//! `hilrig bench serve`: a generated store of N nights x M cases (1,000 x 100
//! by default, with their sample rows), served on loopback. Figures: median
//! server time of the runs index and of a case-history page, and the API's case
//! history at a fixed 500 requests/s (achieved rate, p99). Baseline in the same
//! run: the round trip of a static response on the same server (the HTTP floor).
//! SQLite always; PostgreSQL too when a URL is given ($HILRIG_TEST_PG).

use crate::figure::Figure;
use hilrig_campaigns::store::{RunRow, Store};
use hilrig_reports::{sample_run, CaseResult, Run};
use hilrig_serve::db::Db;
use hilrig_serve::server::AppState;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What to generate and measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Nights (runs).
    pub nights: usize,
    /// Cases per night.
    pub cases: usize,
    /// Requests per page figure.
    pub page_requests: usize,
    /// Rate of the API load, requests/s.
    pub rate: f64,
    /// How long the API load runs.
    pub load_time: Duration,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            nights: 1000,
            cases: 100,
            page_requests: 40,
            rate: 500.0,
            load_time: Duration::from_secs(4),
        }
    }
}

/// The cases of night `k`: the sample campaign's cases widened to `n` ids, with
/// small metrics (a few samples each) and the sample's outcomes varying by night.
pub fn night(k: usize, n: usize) -> Run {
    let mut run = sample_run(k as u64 + 1);
    // Unique per process: a PostgreSQL store may already hold an earlier bench.
    run.id = format!("bench-{}-{k:05}", std::process::id());
    run.started_ms = 1_700_000_000_000 + k as u64 * 86_400_000;
    run.finished_ms = run.started_ms + 3_600_000;
    let base = run.cases.clone();
    run.cases = (0..n)
        .map(|i| {
            let mut c: CaseResult = base[i % base.len()].clone();
            c.id = format!("{}#{}", c.id, i / base.len());
            let m = &mut c.metrics;
            m.trap_latency.samples_us.truncate(3);
            m.trap_latency.histogram = None;
            m.blackouts_us.truncate(2);
            m.counters.truncate(2);
            c
        })
        .collect();
    run
}

fn fill(spec: &str, o: &BenchOptions) -> Result<String, hilrig_serve::ServeError> {
    let mut s = Store::open(Path::new(spec))?;
    for k in 0..o.nights {
        let run = night(k, o.cases);
        s.create_run(
            &RunRow {
                id: run.id.clone(),
                campaign: run.campaign.clone(),
                file: "bench.toml".into(),
                run_dir: "/nonexistent".into(),
                started_ms: run.started_ms,
                finished_ms: None,
            },
            &run.hosts,
        )?;
        s.put_cases_bulk(&run.id, &run.cases)?;
        s.finish_run(&run.id, run.finished_ms)?;
    }
    Ok(night(0, o.cases).cases[0].id.clone())
}

async fn get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, usize)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::with_capacity(64 * 1024);
    s.read_to_end(&mut buf).await?;
    let status = std::str::from_utf8(&buf[..buf.len().min(12)])
        .ok()
        .and_then(|h| h.get(9..12))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, buf.len()))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn pct(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

async fn timed(
    addr: std::net::SocketAddr,
    path: &str,
    n: usize,
) -> Result<f64, hilrig_serve::ServeError> {
    let mut t = vec![];
    // One warm-up request (page caches, prepared statements).
    let _ = get(addr, path).await;
    for _ in 0..n {
        let s = Instant::now();
        let (st, _) = get(addr, path)
            .await
            .map_err(|source| hilrig_serve::ServeError::Io {
                what: format!("GET {path}"),
                source,
            })?;
        if st != 200 {
            return Err(hilrig_serve::ServeError::BadRequest(format!(
                "GET {path}: HTTP {st}"
            )));
        }
        t.push(s.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(median(t))
}

/// Open-loop load: a request every 1/rate s, each on its own connection;
/// latency from its scheduled time. Returns (achieved req/s, p50, p99 ms, errors).
async fn load(
    addr: std::net::SocketAddr,
    path: &str,
    rate: f64,
    time: Duration,
) -> (f64, f64, f64, usize) {
    let n = (rate * time.as_secs_f64()) as usize;
    let start = tokio::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let at = start + Duration::from_secs_f64(i as f64 / rate);
        let p = path.to_string();
        set.spawn(async move {
            tokio::time::sleep_until(at).await;
            let r = get(addr, &p).await;
            (
                r.map(|x| x.0 == 200).unwrap_or(false),
                at.elapsed().as_secs_f64() * 1000.0,
            )
        });
    }
    let mut lat = vec![];
    let mut errors = 0;
    while let Some(r) = set.join_next().await {
        match r {
            Ok((true, ms)) => lat.push(ms),
            _ => errors += 1,
        }
    }
    let wall = start.elapsed().as_secs_f64();
    (
        n as f64 / wall,
        pct(lat.clone(), 0.5),
        pct(lat, 0.99),
        errors,
    )
}

fn measure(
    spec: &str,
    label: &str,
    o: &BenchOptions,
    figures: &mut Vec<Figure>,
) -> Result<(), hilrig_serve::ServeError> {
    let t0 = Instant::now();
    let case = fill(spec, o)?;
    eprintln!(
        "bench serve: {label}: {} nights x {} cases generated in {:.1} s",
        o.nights,
        o.cases,
        t0.elapsed().as_secs_f64()
    );
    let db = Db::open(spec, 8)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| hilrig_serve::ServeError::Io {
            what: "runtime".into(),
            source,
        })?;
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|source| hilrig_serve::ServeError::Io {
                what: "bind".into(),
                source,
            })?;
        let addr = l
            .local_addr()
            .map_err(|source| hilrig_serve::ServeError::Io {
                what: "addr".into(),
                source,
            })?;
        tokio::spawn(hilrig_serve::server::serve(l, AppState::new(db)));
        let hist = format!("/history?case={}", hilrig_serve::pages::enc(&case));
        let api = format!("/api/history?case={}", hilrig_serve::pages::enc(&case));
        let floor = timed(addr, "/static/live.js", o.page_requests).await?;
        let b = figures.len();
        figures.push(Figure::new(
            format!("{label}: static response round trip (baseline)"),
            floor,
            "ms",
        ));
        let idx = timed(addr, "/", o.page_requests).await?;
        figures.push(
            Figure::new(format!("{label}: runs index page, median"), idx, "ms")
                .vs(b)
                .target("< 100 ms"),
        );
        let h = timed(addr, &hist, o.page_requests).await?;
        figures.push(
            Figure::new(
                format!("{label}: case history page (30 nights), median"),
                h,
                "ms",
            )
            .vs(b)
            .target("< 100 ms"),
        );
        let h1000 = timed(
            addr,
            &format!("{hist}&nights=1000"),
            o.page_requests.min(10),
        )
        .await?;
        figures.push(
            Figure::new(
                format!("{label}: case history page (1000 nights), median"),
                h1000,
                "ms",
            )
            .vs(b),
        );
        let (got, p50, p99, errors) = load(addr, &api, o.rate, o.load_time).await;
        figures.push(
            Figure::new(
                format!("{label}: API case history, achieved rate"),
                got,
                "req/s",
            )
            .target(format!("{} req/s", o.rate)),
        );
        figures.push(
            Figure::new(
                format!("{label}: API case history p50 at that rate"),
                p50,
                "ms",
            )
            .vs(b),
        );
        figures.push(
            Figure::new(
                format!("{label}: API case history p99 at that rate"),
                p99,
                "ms",
            )
            .vs(b)
            .target("< 50 ms"),
        );
        figures.push(Figure::new(
            format!("{label}: API requests failed"),
            errors as f64,
            "req",
        ));
        Ok::<(), hilrig_serve::ServeError>(())
    })
}

/// Run the bench: SQLite in a temporary directory, then PostgreSQL at `pg`
/// (an empty database is best: the bench adds 1,000 runs) when given.
pub fn bench_serve(
    o: &BenchOptions,
    pg: Option<&str>,
) -> Result<Vec<Figure>, hilrig_serve::ServeError> {
    let dir = std::env::temp_dir().join(format!("hilrig-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| hilrig_serve::ServeError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    let spec = dir.join("results.sqlite").to_string_lossy().into_owned();
    let mut figures = vec![];
    let r = measure(&spec, "sqlite", o, &mut figures);
    let _ = std::fs::remove_dir_all(&dir);
    r?;
    match pg {
        Some(url) => measure(url, "postgresql", o, &mut figures)?,
        None => eprintln!("bench serve: SKIPPED the PostgreSQL rows: HILRIG_TEST_PG not set"),
    }
    Ok(figures)
}
