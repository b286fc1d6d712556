//! Attacks from the guest side of the VMM and on its request parser (DESIGN §6,
//! guest → VMM; issue 16 items 5, 6, 9; issue 21 item 6). Each test names the attack
//! and shows it gets nothing. Tests that boot a VM skip loudly without /dev/kvm.

use hilrig_device::regmap::{Reg, BUFFER_BASE};
use hilrig_vmm::api::control::{parse_request, RequestError, MAX_LINE};
use hilrig_vmm::attacks;
use hilrig_vmm::policy::engine::AlarmConfig;
use hilrig_vmm::policy::{load_profile, PolicyFile, Profile};
use hilrig_vmm::{
    kvm_available, open_backend, Console, DeviceSpec, RunReport, Verdict, Vm, VmConfig,
};
use proptest::prelude::*;
use std::sync::Arc;
use std::time::Duration;

fn compile(text: &str, profile: &str) -> Profile {
    PolicyFile::parse(text, "hostile.toml")
        .expect("parse")
        .compile(profile, "hostile.toml")
        .expect("compile")
}

fn run(name: &str, code: Vec<u8>, p: Arc<Profile>) -> RunReport {
    let cfg = VmConfig {
        vcpus: 1,
        mem_size: 16 << 20,
        payload: code,
        payload_name: name.into(),
        timeout: Duration::from_secs(30),
        console: Console::Capture,
        policy: Some(p),
        alarms: AlarmConfig {
            capture: true,
            ..AlarmConfig::default()
        },
        ..VmConfig::default()
    };
    let backend = open_backend(&DeviceSpec::Model, None).expect("backend");
    Vm::new(cfg, backend).expect("vm").run().expect("run")
}

/// The factory key of the model the tests run on.
fn device_key() -> Vec<u32> {
    let mut d = open_backend(&DeviceSpec::Model, None)
        .expect("model")
        .device;
    (0..8)
        .map(|i| d.read32(Reg::DeviceKey.offset() + 4 * i).expect("key"))
        .collect()
}

/// Attack (issue 16 item 6): a policy with one rule on the key page — it drops
/// writes to DEVICE_KEY[0] — used to leave every other key word readable (fail
/// open). Now the rest of the trapped page is denied by default, with alarms (rule
/// 0), and the guest sees no key word.
#[test]
fn a_one_rule_policy_leaves_no_key_word_readable() {
    if !kvm_available() {
        return;
    }
    let one =
        "[[profile.t]]\nregister = \"DEVICE_KEY[0]\"\naccess = \"write\"\naction = \"drop\"\n";
    let p = Arc::new(compile(one, "t"));
    let code = attacks::attack("attack-key-read")
        .expect("listed")
        .expect("asm");
    let r = run("attack-key-read", code, p);
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.verdict);
    let key = device_key();
    for v in &r.results {
        assert!(
            *v == 0 || !key.contains(v),
            "key word {v:#x} reached the guest: {:?}",
            r.results
        );
    }
    let pol = r.policy.expect("policy");
    assert!(pol.default_deny);
    assert!(pol.alarms_on("DEVICE_KEY[1]") > 0, "{pol:?}");
    assert!(
        pol.captured.iter().all(|a| a.rule == 0),
        "{:?}",
        pol.captured
    );
    // The same profile with `default = "allow"` is the old behaviour, said explicitly.
    let open = "[profile.t]\ndefault = \"allow\"\n[[profile.t.rules]]\nregister = \"DEVICE_KEY[0]\"\naccess = \"write\"\naction = \"drop\"\n";
    let code = attacks::attack("attack-key-read")
        .expect("listed")
        .expect("asm");
    let r = run("attack-key-read", code, Arc::new(compile(open, "t")));
    assert!(
        r.results.iter().any(|v| key.contains(v) && *v != 0),
        "{:?}",
        r.results
    );
    assert!(!r.policy.expect("policy").default_deny);
}

/// MMIO restriction ON/OFF (issue 21 item 6): with enforcement off a page with rules
/// is mapped straight through like a page without rules — no MMIO exit at all for
/// the rule's register — and the run summary says which pages. On the same page
/// with enforcement on every write traps.
#[test]
fn enforcement_off_maps_rule_pages_straight_through() {
    if !kvm_available() {
        return;
    }
    let off = BUFFER_BASE; // the first data-buffer page: the model offers its memory
    let rules = format!(
        "[[profile.lab.rules]]\nrange = [{off:#x}, {:#x}]\naccess = \"write\"\naction = \"drop\"\nalarm = true\n",
        off + 4
    );
    let writes = 40;
    let mut seen = Vec::new();
    for (how, text) in [
        ("on", format!("[profile.lab]\n{rules}")),
        (
            "off (profile)",
            format!("[profile.lab]\nenforce = \"off\"\n{rules}"),
        ),
        (
            "off (file)",
            format!("enforce = false\n[profile.lab]\n{rules}"),
        ),
    ] {
        let p = Arc::new(compile(&text, "lab"));
        let code = hilrig_vmm::payload::mmio_loop(writes, off).expect("asm");
        let r = run("mmio-loop", code, p);
        assert_eq!(r.verdict, Verdict::Pass, "{how}: {}", r.verdict);
        let pol = r.policy.expect("policy");
        seen.push((
            how,
            r.exits.mmio_write,
            pol.untrapped_rule_pages.clone(),
            pol.alarms,
        ));
    }
    assert_eq!(
        seen[0].1, writes,
        "enforcement on: every write traps: {seen:?}"
    );
    assert_eq!(seen[0].3, writes);
    assert!(seen[0].2.is_empty());
    for s in &seen[1..] {
        assert_eq!(s.1, 0, "enforcement off: no MMIO exit: {seen:?}");
        assert_eq!(s.2, vec![(off / 0x1000)], "reported untrapped: {seen:?}");
        assert_eq!(s.3, 0);
    }
    // The CLI switch overrides the profile, as the cli's load_policy does.
    let mut p = load_profile(None, "tenant").expect("tenant");
    p.enforce = false;
    assert!(p.trapping_pages().is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    /// The control request parser (issue 16 item 5) on random bytes: never panics,
    /// refuses anything over the line limit before parsing, and what it accepts
    /// re-encodes to the same request. (The cargo-fuzz target `control_request` in
    /// host-vmm/fuzz does the same, coverage-guided.)
    #[test]
    fn control_requests_from_random_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        op in prop::sample::select(vec!["status", "pause", "resume", "quiesce", "patch", "teardown", "metrics", "nope"]),
        junk in "[ -~]{0,40}",
    ) {
        for line in [
            bytes.clone(),
            format!("{{\"op\":\"{op}\"{junk}").into_bytes(),
            format!("  {{\"op\":\"{op}\",\"bundle\":\"{}\"}}\n", junk.replace(['"', '\\'], "")).into_bytes(),
        ] {
            match parse_request(&line) {
                Ok(Some(req)) => {
                    let back = parse_request(req.to_line().as_bytes());
                    prop_assert_eq!(back.ok().flatten(), Some(req));
                }
                Ok(None) => prop_assert!(String::from_utf8_lossy(&line).trim().is_empty()),
                Err(RequestError::TooLong(_)) => prop_assert!(false, "short line refused as long"),
                Err(RequestError::Bad(_)) => {}
            }
        }
    }
}

/// Oversized request lines are refused by length, before any parsing.
#[test]
fn oversized_control_requests_are_refused_by_length() {
    let mut big = b"{\"op\":\"status\"".to_vec();
    big.resize(MAX_LINE + 1, b' ');
    assert!(matches!(parse_request(&big), Err(RequestError::TooLong(n)) if n == MAX_LINE + 1));
    let mut deep = "[".repeat(MAX_LINE / 2).into_bytes();
    deep.truncate(MAX_LINE);
    assert!(matches!(parse_request(&deep), Err(RequestError::Bad(_))));
}

/// Attack (issue 16 item 6): a validly signed policy patch with one rule — a drop of
/// SCRATCH[0] writes — replaces the tenant's rules and leaves the device key
/// readable and the flash writable. A patch that widens the running policy is
/// refused unless its signed manifest declares `widens = true` *and* the VMM was
/// started with `--allow-policy-widening`; a narrowing patch needs neither.
#[test]
fn a_signed_one_rule_policy_patch_that_widens_is_refused() {
    use ed25519_dalek::SigningKey;
    use hilrig_fw::bundle::{self, BuildOptions, BundleSpec};
    use hilrig_vmm::lifecycle::patch::{commit, ModuleTable, PatchAuthority, PatchError, POLICY};
    const BUILD: [u8; 32] = [7; 32];
    let key = SigningKey::from_bytes(&[1; 32]);
    let dir = tempfile::tempdir().expect("tmp");
    let authority = |allow_widening| PatchAuthority {
        trusted: vec![key.verifying_key()],
        decrypt_key: None,
        build_sha256: BUILD,
        module_dir: dir.path().join("modules"),
        allow_widening,
    };
    let signed = |version, rules: &str, widens| {
        bundle::build_with(
            &BundleSpec {
                component: POLICY,
                version,
                target_vmm_sha256: BUILD,
                payloads: vec![("rules.toml".into(), rules.as_bytes().to_vec())],
                encrypt_to: None,
            },
            &key,
            BuildOptions { widens },
        )
        .expect("bundle")
    };
    let table = || {
        ModuleTable::new(
            Some(Arc::new(load_profile(None, "tenant").expect("tenant"))),
            |_| {},
        )
    };
    let one = "[profile.tenant]\ndefault = \"allow\"\n[[profile.tenant.rules]]\nregister = \"SCRATCH[0]\"\naccess = \"write\"\naction = \"drop\"\n";
    let t = table();
    for (allow, declared, what) in [
        (
            false,
            false,
            "the signed manifest does not declare widens = true",
        ),
        (
            false,
            true,
            "this VMM was not started with --allow-policy-widening",
        ),
        (
            true,
            false,
            "the signed manifest does not declare widens = true",
        ),
    ] {
        let e = authority(allow)
            .prepare(&signed(2, one, declared), &t, "tenant")
            .err()
            .expect("refused");
        assert!(matches!(e, PatchError::Widens { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("widens the running policy") && msg.contains(what),
            "{msg}"
        );
        assert_eq!(t.policy.version(), 1, "a refused patch changed nothing");
    }
    // Declared and allowed: applies (the operator's explicit choice).
    let p = authority(true)
        .prepare(&signed(2, one, true), &t, "tenant")
        .expect("declared and allowed");
    assert_eq!(commit(&t, p), (POLICY, 1, 2));
    // A narrowing patch (the tenant's rules plus one more drop) needs no declaration.
    let narrower = format!(
        "{}[[profile.tenant]]\nregister = \"SCRATCH[0]\"\naccess = \"write\"\naction = \"drop\"\n",
        hilrig_vmm::policy::default_policy_toml()
    );
    let t = table();
    let p = authority(false)
        .prepare(&signed(2, &narrower, false), &t, "tenant")
        .expect("narrower");
    assert_eq!(commit(&t, p), (POLICY, 1, 2));
}
