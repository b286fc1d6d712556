//! Remediation enforced (issue 21 item 4): a needs-reflash or recoverably
//! quarantined device gets exactly the regions whose counters rose reflashed from
//! catalog images through the authorised-update path; a locked or held device
//! pages a human (a command, or a webhook signed with HMAC-SHA256 — a real local
//! HTTP listener here). Real model devices and real databases.

mod common;
use common::*;
use hilrig_counters::decide::DeviceState;
use hilrig_counters::remediate::{self, ImageFile, Outcome, Pager};
use hilrig_counters::service::Service;
use hilrig_counters::source::CounterSource;
use hilrig_counters::{Error, Verdict};
use hilrig_device::model::ops;
use hilrig_device::{Model, Region};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

fn enroll_from(s: &mut Service, p: &Path, serial: u64) {
    common::enroll_from(s, p, serial);
    assert!(s.verify(serial, &mut source(p)).unwrap().trusted());
}

fn image_file(dir: &Path, name: &str, region: Region, bytes: &[u8]) -> ImageFile {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    ImageFile::read(region, &p).unwrap()
}

fn counters(p: &Path) -> [u32; 3] {
    source(p).counters().unwrap().counters
}

#[test]
fn needs_reflash_reflashes_exactly_the_regions_whose_counters_rose() {
    each_backend("remediate_reflash", |s, dir| {
        let serial = 0x61;
        let p = make_device(dir, serial, 16);
        flash(&p, Region::Firmware, &image(1, 3000));
        enroll_from(s, &p, serial);
        // An authorised firmware update, interrupted after the erase: needs-reflash.
        let img = image(3, 3000);
        let f = image_file(dir, "fw.bin", Region::Firmware, &img);
        assert_eq!(hex::encode(f.hash), image_hash(Region::Firmware, &img));
        s.catalog_add(Region::Firmware, &hex::encode(f.hash), "fw-3", "alice")
            .unwrap();
        s.begin_update(serial, Region::Firmware, &hex::encode(f.hash))
            .unwrap();
        {
            let mut m = Model::open(&p).unwrap();
            ops::unlock(&mut m).unwrap();
            ops::erase(&mut m, Region::Firmware).unwrap();
        }
        let r = s.verify(serial, &mut source(&p)).unwrap();
        assert_eq!(
            r.decision.state,
            DeviceState::NeedsReflash,
            "{:?}",
            r.decision
        );
        let before = counters(&p);
        // A catalog image offered for config too: it must not be touched (its
        // counter did not rise).
        let cfg = image(4, 100);
        let c = image_file(dir, "cfg.bin", Region::Config, &cfg);
        s.catalog_add(Region::Config, &hex::encode(c.hash), "cfg-4", "alice")
            .unwrap();
        let mut m = Model::open(&p).unwrap();
        let out = remediate::remediate(s, serial, &mut m, "model", &[c, f], None).unwrap();
        drop(m);
        match out {
            Outcome::Reflashed {
                regions, report, ..
            } => {
                assert_eq!(regions, vec!["firmware".to_string()]);
                assert!(report.trusted(), "{:?}", report.decision);
                assert_eq!(report.decision.verdict, Verdict::AcceptedUpdate);
            }
            other => panic!("not reflashed: {other:?}"),
        }
        let after = counters(&p);
        assert_eq!(after[0], before[0], "vbios untouched");
        assert_eq!(after[2], before[2], "config untouched");
        assert!(
            after[1] > before[1],
            "firmware reflashed (attempts counted)"
        );
        assert_eq!(
            hex::encode(source(&p).hash(Region::Firmware).unwrap()),
            image_hash(Region::Firmware, &img)
        );
        assert!(s.verify(serial, &mut source(&p)).unwrap().trusted());
    });
}

#[test]
fn an_unauthorised_image_is_reflashed_from_the_catalog_and_no_other_region() {
    each_backend("remediate_unauthorised", |s, dir| {
        let serial = 0x62;
        let p = make_device(dir, serial, 16);
        // Enrol with a catalog config image in place.
        let good = image(5, 200);
        let g = image_file(dir, "cfg-good.bin", Region::Config, &good);
        flash(&p, Region::Config, &good);
        s.catalog_add(Region::Config, &hex::encode(g.hash), "cfg-5", "bob")
            .unwrap();
        enroll_from(s, &p, serial);
        // Someone flashes an image that is not in the catalog: quarantined
        // (recoverable by reflash).
        flash(&p, Region::Config, &image(9, 200));
        let r = s.verify(serial, &mut source(&p)).unwrap();
        assert_eq!(r.decision.verdict, Verdict::Quarantined, "{:?}", r.decision);
        assert!(r.decision.recoverable);
        // No image offered for the region: refused, saying which.
        let mut m = Model::open(&p).unwrap();
        match remediate::remediate(s, serial, &mut m, "model", &[], None) {
            Err(Error::Update { detail, .. }) => assert!(detail.contains("config"), "{detail}"),
            other => panic!("{other:?}"),
        }
        // An image offered that is not in the catalog is not used either.
        let rogue = image_file(dir, "rogue.bin", Region::Config, &image(9, 200));
        assert!(remediate::remediate(s, serial, &mut m, "model", &[rogue], None).is_err());
        let before = counters(&p);
        let out = remediate::remediate(s, serial, &mut m, "model", &[g], None).unwrap();
        drop(m);
        assert!(
            matches!(out, Outcome::Reflashed { ref regions, .. } if regions == &["config"]),
            "{out:?}"
        );
        let after = counters(&p);
        assert_eq!((after[0], after[1]), (before[0], before[1]));
        assert!(s.verify(serial, &mut source(&p)).unwrap().trusted());
    });
}

/// Burn a device's budget on one region until the fuse blows.
fn burn(p: &Path) {
    let mut m = Model::open(p).unwrap();
    for _ in 0..8 {
        ops::erase(&mut m, Region::Vbios).unwrap();
    }
}

#[test]
fn a_locked_device_pages_a_human_through_a_signed_webhook() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Service::open(&dir.path().join("c.db").display().to_string(), key()).unwrap();
    let serial = 0x63;
    let p = make_device(dir.path(), serial, 4);
    enroll_from(&mut s, &p, serial);
    burn(&p);
    // A local HTTP listener: reads one request, answers 200.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/page", l.local_addr().unwrap());
    let srv = std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push(line.trim_end().to_string());
        }
        let len: usize = head
            .iter()
            .find_map(|h| h.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        (&c).write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        (head, body)
    });
    let hook_key = b"webhook secret".to_vec();
    let pager = Pager::Webhook {
        url,
        key: hook_key.clone(),
    };
    let mut m = Model::open(&p).unwrap();
    let out = remediate::remediate(&mut s, serial, &mut m, "model", &[], Some(&pager)).unwrap();
    let (head, body) = srv.join().unwrap();
    assert!(head[0].starts_with("POST /page HTTP/1.1"), "{head:?}");
    let sig = head
        .iter()
        .find_map(|h| h.strip_prefix("X-Hilrig-Signature: sha256="))
        .expect("signature header");
    assert_eq!(sig, remediate::sign(&hook_key, &body));
    assert_ne!(sig, remediate::sign(b"another key", &body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["serial"], "0x63");
    assert_eq!(v["verdict"], "locked");
    assert_eq!(v["observed"]["report"]["fuse"], true, "evidence: {v}");
    assert!(matches!(out, Outcome::Paged { .. }));
    // No pager: an error saying a human must act.
    match remediate::remediate(&mut s, serial, &mut m, "model", &[], None) {
        Err(Error::Update { detail, .. }) => assert!(detail.contains("no pager"), "{detail}"),
        other => panic!("{other:?}"),
    }
    // A webhook that answers 500 is a failed page.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", l.local_addr().unwrap());
    let srv = std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = (&c).read(&mut buf);
        let _ = (&c).write_all(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n");
    });
    let bad = Pager::Webhook { url, key: hook_key };
    assert!(matches!(
        remediate::remediate(&mut s, serial, &mut m, "model", &[], Some(&bad)),
        Err(Error::Page { .. })
    ));
    srv.join().unwrap();
}

#[test]
fn a_held_device_pages_through_the_inventory_command() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Service::open(&dir.path().join("c.db").display().to_string(), key()).unwrap();
    let serial = 0x64;
    let p = make_device(dir.path(), serial, 16);
    enroll_from(&mut s, &p, serial);
    // Counters rose with no intent, in a service that requires one: held for review.
    {
        let mut m = Model::open(&p).unwrap();
        ops::erase(&mut m, Region::Firmware).unwrap();
    }
    s.require_intents = true;
    let r = s.verify(serial, &mut source(&p)).unwrap();
    assert_eq!(r.decision.state, DeviceState::NeedsReview);
    s.require_intents = false;
    let script = dir.path().join("page.sh");
    let out_file = dir.path().join("paged.json");
    std::fs::write(
        &script,
        "#!/bin/sh\nprintf '%s %s\\n' \"$HILRIG_PAGE_SERIAL\" \"$HILRIG_PAGE_VERDICT\" > \"$1.env\"\ncat > \"$1\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
    let pager = Pager::Command(vec![
        script.display().to_string(),
        out_file.display().to_string(),
    ]);
    let mut m = Model::open(&p).unwrap();
    let out = remediate::remediate(&mut s, serial, &mut m, "model", &[], Some(&pager)).unwrap();
    assert!(matches!(out, Outcome::Paged { .. }), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
    assert_eq!(v["state"], "needs-review");
    assert_eq!(
        std::fs::read_to_string(format!("{}.env", out_file.display())).unwrap(),
        "0x64 changed\n"
    );
    // Still held, not re-baselined by the remediation's verify.
    assert!(!s.device(serial).unwrap().hold.is_empty());
}
