//! The `hilrig counters` subcommands, parsed as the `hilrig` binary parses them.

mod common;
use clap::Parser;
use common::*;
use hilrig_counters::{run, CountersCmd};
use hilrig_device::Region;
use std::process::ExitCode;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: CountersCmd,
}

fn go(args: &[&str]) -> anyhow::Result<ExitCode> {
    let mut v = vec!["counters"];
    v.extend_from_slice(args);
    run(Cli::try_parse_from(v)?.cmd)
}

#[test]
fn init_enroll_catalog_verify_history() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db").display().to_string();
    let key = dir.path().join("k").display().to_string();
    let c = ["--db", db.as_str(), "--key", key.as_str()];
    let with =
        |a: &[&str]| -> Vec<String> { a.iter().chain(c.iter()).map(|s| s.to_string()).collect() };
    let go2 = |a: &[&str]| {
        let v = with(a);
        let r: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
        go(&r)
    };
    // No key yet: a clear error.
    let e = go2(&["status"]).unwrap_err().to_string();
    assert!(e.contains("init"), "{e}");
    assert_eq!(go2(&["init"]).unwrap(), ExitCode::SUCCESS);
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(go2(&["init"]).unwrap(), ExitCode::SUCCESS, "idempotent");
    let p = make_device(dir.path(), 0x77, 32);
    let src = format!("model:{}", p.display());
    assert_eq!(
        go2(&["enroll", "0x77", "--host", "h1", "--rack", "r1", "--source", &src]).unwrap(),
        ExitCode::SUCCESS
    );
    let e = go2(&["enroll", "0x77", "--source", &src])
        .unwrap_err()
        .to_string();
    assert!(e.contains("already enrolled"), "{e}");
    let e = go2(&["enroll", "0x78", "--counters", "1,2", "--hash", "vbios=00"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("three numbers"), "{e}");
    let e = go2(&[
        "catalog",
        "add",
        "--region",
        "firmware",
        "abc",
        "--approved-by",
        "a",
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("64"), "{e}");
    let e = go2(&[
        "catalog",
        "add",
        "--region",
        "flash",
        &"a".repeat(64),
        "--approved-by",
        "a",
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("unknown region"), "{e}");
    assert_eq!(
        go2(&["verify", "0x77", "--source", &src]).unwrap(),
        ExitCode::SUCCESS
    );
    assert_eq!(
        go2(&["verify", "0x77", "--source", &src, "--json"]).unwrap(),
        ExitCode::SUCCESS
    );
    // An unknown image: exit 1 (not trusted).
    flash(&p, Region::Config, &image(4, 64));
    assert_eq!(
        go2(&["verify", "0x77", "--source", &src]).unwrap(),
        ExitCode::from(1)
    );
    // A source that cannot be opened (a typo): a usage error, nothing written.
    let history_rows = |db: &str| {
        rusqlite::Connection::open(db)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM history", [], |r| r.get::<_, i64>(0))
            .unwrap()
    };
    let before = history_rows(&db);
    for bad in [
        "model:/nonexistent/x.state",
        "serial:/dev/ttyNOPE0",
        "/dev/ttyNOPE1",
        "modle:x",
    ] {
        let e = go2(&["verify", "0x77", "--source", bad])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nothing was recorded") || e.contains("use model:"),
            "{bad}: {e}"
        );
    }
    assert_eq!(history_rows(&db), before, "a typo changed the database");
    let h = image_hash(Region::Config, &image(4, 64));
    assert_eq!(
        go2(&[
            "catalog",
            "add",
            "--region",
            "config",
            &h,
            "--approved-by",
            "alice",
            "--version",
            "c2"
        ])
        .unwrap(),
        ExitCode::SUCCESS
    );
    assert_eq!(go2(&["catalog", "list"]).unwrap(), ExitCode::SUCCESS);
    assert_eq!(
        go2(&["verify", "0x77", "--source", &src]).unwrap(),
        ExitCode::SUCCESS
    );
    assert_eq!(go2(&["history", "0x77"]).unwrap(), ExitCode::SUCCESS);
    assert_eq!(go2(&["status"]).unwrap(), ExitCode::SUCCESS);
    assert_eq!(
        go2(&["master", "--by", "rack", "--json"]).unwrap(),
        ExitCode::SUCCESS
    );
    assert!(go2(&["master", "--by", "row"]).is_err());
    let id_out = go2(&["begin-update", "0x77", "--region", "config", "--hash", &h]).unwrap();
    assert_eq!(id_out, ExitCode::SUCCESS);
    assert_eq!(
        go2(&[
            "cross-check",
            "0x77",
            "--start-master",
            "0",
            "--vmm-attempts",
            "0",
            "--source",
            &src
        ])
        .unwrap(),
        ExitCode::from(1),
        "the device counted attempts the VMM never saw"
    );
    // Conformance on a fresh model.
    let q = make_device(dir.path(), 0x79, 24);
    let kf = dir.path().join("q.reset-key");
    hilrig_device::secure::write_reset_key_file(
        &kf,
        &hilrig_device::NvState::load(&q).unwrap().reset_key,
    )
    .unwrap();
    assert_eq!(
        go(&[
            "conformance",
            "--target",
            &format!("model:{}", q.display()),
            "--burn-fuse",
            "--reset-key-file",
            kf.to_str().unwrap(),
        ])
        .unwrap(),
        ExitCode::SUCCESS
    );
}

#[test]
fn times_print_as_rfc3339() {
    assert_eq!(hilrig_counters::cli::fmt_ms(0), "never");
    assert_eq!(hilrig_counters::cli::fmt_ms(1), "1970-01-01T00:00:00.001Z");
    assert_eq!(
        hilrig_counters::cli::fmt_ms(1_709_210_096_789),
        "2024-02-29T12:34:56.789Z"
    );
}
