//! The service at scale: `status` and `master` stream (memory flat however many
//! devices), and bulk enrolment from a file.

mod common;
use clap::Parser;
use common::*;
use hilrig_counters::decide::Expected;
use hilrig_counters::service::{Enrollment, GroupBy, Service};
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

fn sha(i: u64, r: u8) -> String {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&i.to_le_bytes());
    h[8] = r;
    hex::encode(h)
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

fn populate(s: &mut Service, n: u64) {
    let list = enrollments(0, n);
    for chunk in list.chunks(5000) {
        s.enroll_many(chunk).unwrap();
    }
}

#[test]
fn status_and_master_stream_every_device_in_order() {
    each_backend("stream", |s, _| {
        // More than one PostgreSQL fetch (STREAM_BATCH rows) and than one group.
        let n = 2 * hilrig_counters::store::STREAM_BATCH as u64 + 345;
        populate(s, n);
        let mut seen = Vec::new();
        s.devices_each(|d, ok| {
            assert!(ok, "{} fails its MAC", d.serial);
            seen.push(d.serial);
            Ok(())
        })
        .unwrap();
        let mut want: Vec<String> = (0..n).map(|i| format!("{:#x}", 0x7000_0000 + i)).collect();
        want.sort();
        assert_eq!(seen, want);
        // Streamed groups: each group once, with every device and the right sum.
        let mut groups = Vec::new();
        s.master_sums_each(GroupBy::Rack, |g| {
            groups.push(g);
            Ok(())
        })
        .unwrap();
        assert_eq!(groups.len(), 13, "one group per rack, each once");
        let mut names: Vec<&str> = groups.iter().map(|g| g.group.as_str()).collect();
        names.dedup();
        assert_eq!(names.len(), 13);
        let total: u64 = groups.iter().map(|g| g.master).sum();
        let want_total: u64 = (0..n).map(|i| i % 3 + 1).sum();
        assert_eq!(total, want_total);
        assert_eq!(
            groups.iter().map(|g| g.devices.len() as u64).sum::<u64>(),
            n
        );
        // The collected forms agree with the streamed ones.
        assert_eq!(s.devices().unwrap().len() as u64, n);
        assert_eq!(s.master_sums(GroupBy::Rack).unwrap().len(), 13);
        // An error from the consumer stops the scan and is returned.
        let mut calls = 0;
        let r = s.devices_each(|_, _| {
            calls += 1;
            Err(hilrig_counters::Error::Input("stop".into()))
        });
        assert!(r.is_err());
        assert_eq!(calls, 1);
    });
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn json_line(i: u64) -> String {
    format!(
        r#"{{"serial": "{:#x}", "host": "h{i}", "rack": "r1", "counters": [0, 1, {i}], "epoch": 0, "hashes": {{"vbios": "{}", "firmware": "{}", "config": "{}"}}}}"#,
        0x9000 + i,
        sha(i, 0),
        sha(i, 1),
        sha(i, 2)
    )
}

fn csv_line(i: u64) -> String {
    format!(
        "{:#x},h{i},r2,1,0,{i},,0,{},{},{}",
        0xa000 + i,
        sha(i, 0),
        sha(i, 1),
        sha(i, 2)
    )
}

fn device_count(s: &mut Service) -> usize {
    s.devices().unwrap().len()
}

#[test]
fn bulk_enroll_from_json_lines_and_csv() {
    each_backend("bulk", |s, dir| {
        let mut text = String::from("# devices of rack r1\n");
        for i in 0..23 {
            text.push_str(&json_line(i));
            text.push('\n');
        }
        let f = write(dir, "devs.jsonl", &text);
        // Batches of 5: several transactions.
        let n = hilrig_counters::bulk::enroll_file(s, Path::new(&f), 5).unwrap();
        assert_eq!(n, 23);
        let d = s.device(0x9000 + 7).unwrap();
        assert_eq!(d.expected.counters, [0, 1, 7]);
        assert_eq!(d.expected.master, 8);
        assert_eq!(d.host, "h7");
        let mut text = String::from(
            "serial,host,rack,c_vbios,c_firmware,c_config,master,epoch,h_vbios,h_firmware,h_config\r\n",
        );
        for i in 0..9 {
            text.push_str(&csv_line(i));
            text.push_str("\r\n");
        }
        let f = write(dir, "devs.csv", &text);
        assert_eq!(
            hilrig_counters::bulk::enroll_file(s, Path::new(&f), 4).unwrap(),
            9
        );
        let d = s.device(0xa000 + 5).unwrap();
        assert_eq!(d.expected.counters, [1, 0, 5]);
        assert_eq!(d.expected.master, 6);
        assert_eq!(d.rack, "r2");
        assert_eq!(device_count(s), 32);
    });
}

#[test]
fn bulk_enroll_bad_files_name_the_line_and_write_nothing() {
    each_backend("bulkbad", |s, dir| {
        let good: Vec<String> = (0..12).map(json_line).collect();
        let cases: Vec<(&str, String, &str)> = vec![
            (
                "bad hash",
                good.join("\n").replace(&sha(9, 1), "abc"),
                ":10: firmware hash",
            ),
            (
                "unknown field",
                {
                    let mut g = good.clone();
                    g[3] = g[3].replacen('{', r#"{"colour": "red", "#, 1);
                    g.join("\n")
                },
                ":4: JSON",
            ),
            (
                "csv fields",
                format!("{}\n{}\n0x1,h,r,1,2\n", csv_line(1), csv_line(2)),
                ":3: CSV: 5 fields",
            ),
            (
                "csv number",
                format!(
                    "{}\n{}\n",
                    csv_line(1),
                    csv_line(2).replace(",h2,r2,1,", ",h2,r2,x,")
                ),
                ":2: c_vbios \"x\"",
            ),
            (
                "serial",
                format!("{}\n", json_line(1).replace("0x9001", "0xzz")),
                ":1: serial",
            ),
            (
                "long line",
                format!("{}\n{}\n", good[0], "x".repeat(10_000)),
                ":2: line longer than 4096 bytes",
            ),
            (
                "not utf-8",
                format!("{}\n\u{fffd}", good[0]).replace('\u{fffd}', "\u{0}"),
                ":2:",
            ),
            (
                "control char host",
                json_line(1).replace("\"h1\"", "\"h\\u0007\""),
                ":1: host",
            ),
        ];
        for (what, text, want) in cases {
            let f = write(dir, "bad.txt", &text);
            let e = hilrig_counters::bulk::enroll_file(s, Path::new(&f), 5)
                .expect_err(what)
                .to_string();
            assert!(e.contains(&format!("bad.txt{want}")), "{what}: {e}");
            assert_eq!(device_count(s), 0, "{what}: something was enrolled");
        }
        // Bytes that are not UTF-8 at all.
        let p = dir.join("bin.txt");
        let mut b = good[0].clone().into_bytes();
        b.extend_from_slice(b"\n\xff\xfe\n");
        std::fs::write(&p, b).unwrap();
        let e = hilrig_counters::bulk::enroll_file(s, &p, 5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bin.txt:2: not UTF-8"), "{e}");
        // Not a regular file.
        let e = hilrig_counters::bulk::enroll_file(s, dir, 5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        assert_eq!(device_count(s), 0);
    });
}

#[test]
fn bulk_enroll_stops_at_a_duplicate_and_names_it() {
    each_backend("bulkdup", |s, dir| {
        let mut lines: Vec<String> = (0..12).map(json_line).collect();
        // Line 9 repeats the device of line 2.
        lines[8] = json_line(1);
        let f = write(dir, "dup.jsonl", &lines.join("\n"));
        let e = hilrig_counters::bulk::enroll_file(s, Path::new(&f), 5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("already enrolled"), "{e}");
        assert!(e.contains("5 devices enrolled by earlier batches"), "{e}");
        assert!(e.contains("none of lines 6-10"), "{e}");
        // The first batch stays committed, the failing one wrote nothing.
        assert_eq!(device_count(s), 5);
    });
}

#[test]
fn bulk_enroll_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db").display().to_string();
    let key = dir.path().join("k").display().to_string();
    let c = |a: &[&str]| -> Vec<String> {
        a.iter()
            .map(|s| s.to_string())
            .chain(["--db".into(), db.clone(), "--key".into(), key.clone()])
            .collect()
    };
    go(&c(&["init"])).unwrap();
    let text: Vec<String> = (0..7).map(csv_line).collect();
    let f = write(dir.path(), "d.csv", &text.join("\n"));
    assert_eq!(
        go(&c(&["enroll", "--from", &f])).unwrap(),
        std::process::ExitCode::SUCCESS
    );
    // SERIAL and --from together are a usage error.
    assert!(go(&c(&["enroll", "0x5", "--from", &f])).is_err());
    // Neither: a usage error too.
    assert!(go(&c(&["enroll"])).is_err());
    let mut s = Service::open(
        &db,
        hilrig_counters::mac::Key::load(Path::new(&key)).unwrap(),
    )
    .unwrap();
    assert_eq!(device_count(&mut s), 7);
}
