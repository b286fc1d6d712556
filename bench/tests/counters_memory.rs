//! `status` and `master` keep peak memory flat however many devices, measured with
//! the counters benchmark's child-process RSS probe (moved from counters/tests/scale.rs).

use clap::Parser;
use hilrig_counters::decide::Expected;
use hilrig_counters::service::{Enrollment, Service};
use hilrig_counters::{run, CountersCmd};
use std::path::Path;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: CountersCmd,
}

fn go(args: &[String]) -> anyhow::Result<std::process::ExitCode> {
    let mut v = vec!["counters".to_string()];
    v.extend_from_slice(args);
    run(Cli::try_parse_from(v)?.cmd)
}

fn enrollments(from: u64, to: u64) -> Vec<Enrollment> {
    (from..to)
        .map(|i| {
            let mut hashes = [[0u8; 32]; 3];
            for (r, h) in hashes.iter_mut().enumerate() {
                h[..8].copy_from_slice(&i.to_le_bytes());
                h[8] = r as u8;
            }
            Enrollment {
                serial: 0x7000_0000 + i,
                host: format!("host-{}", i / 4),
                rack: format!("rack-{}", (i * 7) % 13),
                expected: Expected {
                    counters: [(i % 3) as u32, 1, 0],
                    master: (i % 3) as u32 + 1,
                    epoch: 0,
                    hashes,
                },
            }
        })
        .collect()
}

/// The child side of `status_and_master_memory_is_flat`: one `hilrig counters`
/// command, its arguments in $HILRIG_SCALE_CHILD (tab-separated).
#[test]
fn scale_child() {
    let Ok(args) = std::env::var("HILRIG_SCALE_CHILD") else {
        return;
    };
    let v: Vec<String> = args.split('\t').map(String::from).collect();
    let code = go(&v).unwrap();
    assert_eq!(code, std::process::ExitCode::SUCCESS);
}

fn measured(dir: &Path, args: &[&str]) -> f64 {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "scale_child", "--nocapture", "--test-threads=1"])
        .env("HILRIG_SCALE_CHILD", args.join("\t"));
    let (_, rss) =
        hilrig_bench::counters::run_measured(&mut cmd, &dir.join("child.stderr")).unwrap();
    rss
}

#[test]
fn status_and_master_memory_is_flat() {
    if std::env::var("HILRIG_SCALE_CHILD").is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let keyf = dir.path().join("k");
    hilrig_counters::mac::Key::init(&keyf).unwrap();
    let key = hilrig_counters::mac::Key::load(&keyf).unwrap();
    let dbs = db.display().to_string();
    let ks = keyf.display().to_string();
    let mut s = Service::open(&dbs, key).unwrap();
    let list = enrollments(0, 60_000);
    s.enroll_many(&list[..1000]).unwrap();
    let rss = |what: &[&str]| {
        let mut a: Vec<&str> = what.to_vec();
        a.extend(["--db", &dbs, "--key", &ks]);
        measured(dir.path(), &a)
    };
    let small = [
        rss(&["status"]),
        rss(&["status", "--json"]),
        rss(&["master", "--by", "rack"]),
        rss(&["master", "--by", "host", "--json"]),
    ];
    for chunk in list[1000..].chunks(5000) {
        s.enroll_many(chunk).unwrap();
    }
    drop(s);
    let big = [
        rss(&["status"]),
        rss(&["status", "--json"]),
        rss(&["master", "--by", "rack"]),
        rss(&["master", "--by", "host", "--json"]),
    ];
    eprintln!("peak RSS MiB at 1,000 devices {small:?}, at 60,000 {big:?}");
    for (a, b) in small.iter().zip(big) {
        // Holding 60,000 rows takes ~100 MiB; streaming keeps the growth to the
        // database's small page cache.
        assert!(
            b - a < 16.0,
            "peak RSS grew from {a:.1} to {b:.1} MiB between 1,000 and 60,000 devices"
        );
    }
}
