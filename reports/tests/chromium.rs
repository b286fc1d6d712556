//! Render report.html in headless Chromium: the DOM must hold the summary and the
//! SVG plots, and a screenshot must come out as a real PNG. Skips loudly when
//! Chromium is not installed (Debian package `chromium`).
//!
//! `HILRIG_REPORT_SCREENSHOT=/path/x.png` keeps a copy of the screenshot.

use hilrig_reports::{sample_run, write_reports};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// Run Chromium headless with `extra` args on `url`; returns stdout. Kills it
/// after `limit` (a wedged browser must not hang the test suite).
fn run_chromium(bin: &Path, profile: &Path, extra: &[&str], url: &str, limit: Duration) -> String {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(url)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start chromium");
    // Read stdout on a thread so a big DOM cannot fill the pipe and stall it.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait chromium") {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    assert!(status.success(), "chromium failed: {status}\n{stderr}");
    stdout
}

/// Width and height from a PNG's IHDR chunk.
fn png_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    const SIG: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    if bytes.len() < 24 || bytes[..8] != SIG || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes(bytes[16..20].try_into().ok()?);
    let h = u32::from_be_bytes(bytes[20..24].try_into().ok()?);
    Some((w, h))
}

#[test]
fn report_renders_in_headless_chromium() {
    let Some(bin) = chromium() else {
        eprintln!("\n==============================================");
        eprintln!("SKIPPED: chromium not installed (apt-get install chromium)");
        eprintln!("==============================================\n");
        println!("SKIPPED: chromium not installed");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("report");
    let mut run = sample_run(7);
    run.cases[0].message = "<script>document.title='pwned'</script>".into();
    let prev = sample_run(6);
    let paths = write_reports(&run, Some(&prev), &out).expect("write reports");
    let url = format!("file://{}", paths.html.display());
    let limit = Duration::from_secs(90);

    let dom = run_chromium(&bin, &dir.path().join("p1"), &["--dump-dom"], &url, limit);
    assert!(
        dom.contains(r#"id="summary""#),
        "summary in the rendered DOM"
    );
    assert!(dom.contains("<svg"), "an SVG plot in the rendered DOM");
    assert!(dom.contains("MMIO trap latency"));
    assert!(dom.contains(r#"id="diff""#));
    // The hostile message is shown as text: no script element, title unchanged.
    assert!(!dom.to_lowercase().contains("<script"), "no script element");
    assert!(
        dom.contains("<title>hilrig report: "),
        "title not rewritten"
    );
    assert!(dom.contains("&lt;script&gt;"));

    let png = dir.path().join("shot.png");
    run_chromium(
        &bin,
        &dir.path().join("p2"),
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1280,2000",
        ],
        &url,
        limit,
    );
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert!(
        bytes.len() > 30_000,
        "screenshot too small: {} bytes",
        bytes.len()
    );
    let (w, h) = png_dimensions(&bytes).expect("a PNG");
    assert!(w >= 1000 && h >= 1500, "screenshot {w}x{h}");
    if let Some(keep) = std::env::var_os("HILRIG_REPORT_SCREENSHOT") {
        std::fs::copy(&png, keep).expect("keep screenshot");
    }
    eprintln!(
        "chromium rendered report.html: {w}x{h} PNG, {} bytes",
        bytes.len()
    );
}
