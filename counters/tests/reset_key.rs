//! The OOB reset key handed to the counters service at enrolment (issue 16.7): taken
//! from the key file `device init` writes, stored sealed, given back by serial to
//! whoever needs the keyed physical reset; never printed, never in `status`,
//! history or exports, and the database file is owner-only.

mod common;
use clap::Parser;
use common::*;
use hilrig_counters::service::Enrollment;
use hilrig_counters::source::CounterSource;
use hilrig_counters::store::Val;
use hilrig_counters::{run, CountersCmd, Error};
use hilrig_device::oob::{Request, Response};
use hilrig_device::{Model, NvState};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// A device with a random reset key, the key written to `STATE.reset-key` as
/// `hilrig device init` does.
fn device_with_key_file(dir: &Path, serial: u64) -> (PathBuf, PathBuf, [u8; 32]) {
    std::fs::create_dir_all(dir).unwrap();
    let p = make_device(dir, serial, 8);
    let mut nv = NvState::load(&p).unwrap();
    nv.reset_key = hilrig_device::secure::random_key().unwrap();
    nv.save(&p).unwrap();
    let kf = hilrig_device::secure::reset_key_path(&p);
    hilrig_device::secure::write_reset_key_file(&kf, &nv.reset_key).unwrap();
    (p, kf, nv.reset_key)
}

fn enrol(s: &mut hilrig_counters::Service, p: &Path, serial: u64, rk: &[u8; 32]) {
    s.enroll_with_reset_key(&enrollment(p, serial), false, rk)
        .unwrap();
}

#[test]
fn a_reset_with_the_key_from_the_service_works_and_a_wrong_or_absent_key_is_refused() {
    each_backend("reset_key_roundtrip", |s, dir| {
        let (p, kf, rk) = device_with_key_file(dir, 0x5e1);
        let from_file = hilrig_device::secure::read_reset_key_file(&kf).unwrap();
        assert_eq!(from_file, rk);
        enrol(s, &p, 0x5e1, &from_file);
        assert!(s.has_reset_key(0x5e1).unwrap());
        // The key comes back by serial and the device accepts it.
        let got = s.reset_key(0x5e1).unwrap();
        assert_eq!(got, rk);
        match source(&p).request(&Request::PhysicalReset(got)).unwrap() {
            Response::ResetDone { epoch } => assert_eq!(epoch, 1),
            other => panic!("{other:?}"),
        }
        // A wrong key (one bit off, or the serial-derived development key) is
        // refused by the device: the epoch does not move.
        let mut wrong = got;
        wrong[0] ^= 1;
        for k in [wrong, hilrig_device::state::dev_keys(0x5e1).1] {
            let r = source(&p).request(&Request::PhysicalReset(k));
            assert!(
                !matches!(r, Ok(Response::ResetDone { .. })),
                "a wrong key reset the device: {r:?}"
            );
        }
        assert_eq!(NvState::load(&p).unwrap().epoch, 1);
        // No key stored for a device: a clear error, no key.
        let (q, _, _) = device_with_key_file(&dir.join("q"), 0x5e2);
        let obs = source(&q).observe().unwrap();
        s.enroll(
            &Enrollment {
                serial: 0x5e2,
                host: "h".into(),
                rack: "r".into(),
                expected: obs.as_expected(),
            },
            false,
        )
        .unwrap();
        assert!(!s.has_reset_key(0x5e2).unwrap());
        let e = s.reset_key(0x5e2).unwrap_err();
        assert!(matches!(e, Error::NoResetKey(_)), "{e}");
        assert!(e.to_string().contains("--reset-key-file"), "{e}");
        // Not enrolled at all: refused to store one.
        assert!(matches!(
            s.set_reset_key(0x5e3, &rk).unwrap_err(),
            Error::UnknownDevice(_)
        ));
        // A sealed key copied onto another device's row does not open (bound to
        // the serial), nor does an edited one.
        s.set_reset_key(0x5e2, &[9u8; 32]).unwrap();
        let rows = s
            .db_mut()
            .query(
                "SELECT sealed, at, mac FROM reset_keys WHERE serial = $1",
                &[Val::from("0x5e1")],
            )
            .unwrap();
        let sealed = rows[0][0].text("sealed").unwrap();
        s.db_mut()
            .exec(
                "UPDATE reset_keys SET sealed = $1 WHERE serial = $2",
                &[Val::Text(sealed.clone()), Val::from("0x5e2")],
            )
            .unwrap();
        let e = s.reset_key(0x5e2).unwrap_err().to_string();
        assert!(
            e.contains("MAC mismatch") || e.contains("does not open"),
            "{e}"
        );
        // The error never quotes the key.
        assert!(!e.contains(&hex::encode(rk)), "{e}");
    });
}

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
fn enrolment_takes_the_key_file_and_conformance_takes_the_key_from_the_service() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db").display().to_string();
    let key = dir.path().join("k").display().to_string();
    let (p, kf, rk) = device_with_key_file(dir.path(), 0x7a);
    let c = ["--db", db.as_str(), "--key", key.as_str()];
    let with =
        |a: &[&str]| -> Vec<String> { a.iter().chain(c.iter()).map(|s| s.to_string()).collect() };
    let go2 = |a: &[&str]| {
        let v = with(a);
        let r: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
        go(&r)
    };
    assert_eq!(go2(&["init"]).unwrap(), ExitCode::SUCCESS);
    // The database holds sealed secrets: owner-only.
    let mode = std::fs::metadata(&db).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "database file mode");
    // A key on the command line is refused, pointing to the file flags.
    let hexkey = hex::encode(rk);
    let e = go(&[
        "conformance",
        "--target",
        &format!("model:{}", p.display()),
        "--reset-key",
        &hexkey,
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("--reset-key-file"), "{e}");
    assert!(!e.contains(&hexkey), "{e}");
    // A key file others can read is refused at enrolment, naming the file.
    std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let src = format!("model:{}", p.display());
    let e = go2(&["enroll", "0x7a", "--source", &src])
        .unwrap_err()
        .to_string();
    assert!(e.contains("reset-key") && e.contains("0644"), "{e}");
    std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Enrolment with --source model:STATE takes STATE.reset-key by default.
    assert_eq!(
        go2(&["enroll", "0x7a", "--source", &src]).unwrap(),
        ExitCode::SUCCESS
    );
    // The conformance suite's reset properties run with the key from the service.
    assert_eq!(
        go2(&[
            "conformance",
            "--target",
            &src,
            "--burn-fuse",
            "--reset-key-from-service",
            "0x7a",
        ])
        .unwrap(),
        ExitCode::SUCCESS
    );
    assert!(
        NvState::load(&p).unwrap().epoch >= 1,
        "keyed resets happened"
    );
    // Status, history and the database file never hold the key in the clear.
    let mut s = hilrig_counters::Service::open(
        &db,
        hilrig_counters::mac::Key::load(Path::new(&key)).unwrap(),
    )
    .unwrap();
    let status = serde_json::to_string(&s.devices().unwrap()).unwrap();
    let history = serde_json::to_string(&s.history(None, 100).unwrap()).unwrap();
    for (what, text) in [("status", &status), ("history", &history)] {
        assert!(!text.contains(&hexkey), "{what} shows the reset key");
    }
    assert_eq!(s.reset_key(0x7a).unwrap(), rk);
    drop(s);
    let mut files = vec![PathBuf::from(&db)];
    for suffix in ["-wal", "-shm"] {
        files.push(PathBuf::from(format!("{db}{suffix}")));
    }
    for f in files.iter().filter(|f| f.exists()) {
        let bytes = std::fs::read(f).unwrap();
        assert!(
            !bytes.windows(32).any(|w| w == rk),
            "{} holds the raw reset key",
            f.display()
        );
        let text = String::from_utf8_lossy(&bytes).to_lowercase();
        assert!(
            !text.contains(&hexkey),
            "{} holds the hex reset key",
            f.display()
        );
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    // Bulk enrolment names the key file per line (relative to the list).
    let (q, qkf, qrk) = device_with_key_file(&dir.path().join("q"), 0x7b);
    let nv = NvState::load(&q).unwrap();
    let hs: Vec<String> = hilrig_device::Region::ALL
        .iter()
        .map(|r| {
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                &nv.flash[*r as usize],
            ))
        })
        .collect();
    let list = dir.path().join("list.jsonl");
    std::fs::write(
        &list,
        format!(
            "{{\"serial\": \"0x7b\", \"counters\": [0,0,0], \"hashes\": {{\"vbios\": \"{}\", \"firmware\": \"{}\", \"config\": \"{}\"}}, \"reset_key_file\": \"{}\"}}\n",
            hs[0],
            hs[1],
            hs[2],
            qkf.strip_prefix(dir.path()).unwrap().display()
        ),
    )
    .unwrap();
    assert_eq!(
        go2(&["enroll", "--from", list.to_str().unwrap()]).unwrap(),
        ExitCode::SUCCESS
    );
    let mut s = hilrig_counters::Service::open(
        &db,
        hilrig_counters::mac::Key::load(Path::new(&key)).unwrap(),
    )
    .unwrap();
    assert_eq!(s.reset_key(0x7b).unwrap(), qrk);
    let _ = Model::open(&q).unwrap();
}
