//! The "bundle / image → VMM" boundary at the operator's tools (DESIGN §6:
//! bounded reads): `hilrig fw verify|inspect` and `hilrig device flash` given a
//! FIFO, a device or a file larger than anything they accept must refuse it
//! without waiting on it or reading it whole, naming the file.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Run `hilrig args` for at most `limit`: (exit code, stderr), or None when it had
/// to be killed (it waited or read for ever).
fn hilrig_within(args: &[&str], limit: Duration) -> Option<(i32, String)> {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hilrig"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            let mut e = String::new();
            std::io::Read::read_to_string(&mut c.stderr.take().unwrap(), &mut e).unwrap();
            return Some((st.code().unwrap_or(-1), e));
        }
        if t0.elapsed() > limit {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn fifo(path: &Path) {
    let c = std::ffi::CString::new(p(path)).unwrap();
    // SAFETY: a valid path string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Attack: a FIFO given as a firmware file (a writer that never comes) and
/// `/dev/zero` (endless). Refused at once, naming the file; `std::fs::read`
/// waited on the FIFO for ever and would read `/dev/zero` until memory ran out.
#[test]
fn fw_verify_and_inspect_refuse_a_fifo_or_a_device_without_reading() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("image.fifo");
    fifo(&f);
    let key = d.path().join("k");
    let out = hilrig_within(&["fw", "keygen", p(&key)], Duration::from_secs(30)).unwrap();
    assert_eq!(out.0, 0, "{}", out.1);
    let pubkey = d.path().join("k.pub");
    for file in [p(&f), "/dev/zero"] {
        for args in [
            vec!["fw", "inspect", file],
            vec!["fw", "verify", "--pubkey", p(&pubkey), file],
        ] {
            let (code, err) = hilrig_within(&args, Duration::from_secs(10))
                .unwrap_or_else(|| panic!("{args:?} waited or read for ever"));
            assert_ne!(code, 0, "{args:?}");
            assert!(
                err.contains(file) && err.contains("not a regular file"),
                "{args:?}: {err}"
            );
        }
    }
}

/// Attack: a firmware file larger than the largest bundle (sparse, so the test
/// costs nothing): refused from its size, before any read.
#[test]
fn fw_inspect_refuses_a_file_larger_than_any_bundle_before_reading_it() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("huge.bin");
    let file = std::fs::File::create(&f).unwrap();
    file.set_len(1 << 40).unwrap();
    let t0 = Instant::now();
    let (code, err) = hilrig_within(&["fw", "inspect", p(&f)], Duration::from_secs(10))
        .expect("read a 1 TiB file");
    assert_ne!(code, 0);
    assert!(err.contains("huge.bin") && err.contains("at most"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10));
}

/// Attack: `hilrig device flash` given a FIFO, `/dev/zero` or a file larger than
/// the region as the image: refused without waiting or reading more than the
/// region holds, the device state untouched.
#[test]
fn device_flash_refuses_an_endless_or_oversized_image_without_reading_it_whole() {
    let d = tempfile::tempdir().unwrap();
    let st = d.path().join("d.state");
    let out = hilrig_within(&["device", "init", p(&st)], Duration::from_secs(30)).unwrap();
    assert_eq!(out.0, 0, "{}", out.1);
    let before = std::fs::read(&st).unwrap();
    let f = d.path().join("img.fifo");
    fifo(&f);
    let big = d.path().join("big.img");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    for img in [p(&f), "/dev/zero", p(&big)] {
        let args = ["device", "flash", p(&st), "--region", "firmware", img];
        let (code, err) = hilrig_within(&args, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("flash of {img} waited or read for ever"));
        assert_ne!(code, 0, "{img}");
        assert!(
            err.contains(img) && err.contains("firmware"),
            "{img}: {err}"
        );
    }
    assert_eq!(std::fs::read(&st).unwrap(), before, "state untouched");
}
