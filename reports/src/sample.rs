//! A deterministic sample run with realistic metrics, for tests and demos
//! (`hilrig report --sample`). Same case ids for every seed, so two seeds diff
//! meaningfully; every outcome appears at least once.

use crate::model::{
    Artifact, ArtifactKind, Attempt, CaseResult, CounterReading, Histogram, Host, Latency, Metrics,
    Outcome, Run, SCHEMA_VERSION,
};
use std::collections::BTreeMap;

const ATTACKS: [(&str, &str); 10] = [
    ("flash-program-locked", "blocked+alarm, counter +1"),
    ("flash-erase-bad-key", "blocked+alarm, counter +1"),
    ("hang-trigger-write", "dropped+alarm, device responsive"),
    ("device-key-read", "read 0x0+alarm"),
    ("soft-reset-write", "dropped+alarm"),
    ("state-file-rollback", "verdict quarantined"),
    ("scratch-leak-after-teardown", "next tenant reads zeros"),
    ("live-patch-under-load", "blackout < 1000 us, no lost exits"),
    ("rep-movs-straddle", "per-register decision, alarm"),
    ("avx-store-straddle", "per-register decision, alarm"),
];
const BACKENDS: [&str; 2] = ["model", "rtl"];
const HOSTS: [(&str, &str, bool); 4] = [
    ("sim-01", "sim", true),
    ("sim-02", "sim", true),
    ("rack1-h03", "ice40", false),
    ("rack1-h04", "ice40", false),
];
const REGIONS: [&str; 3] = ["vbios", "firmware", "config"];

/// Standard normal sample (Box–Muller).
fn normal(rng: &mut fastrand::Rng) -> f64 {
    let u1 = rng.f64().max(1e-12);
    let u2 = rng.f64();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Log-normal sample with the given median and spread (sigma of the log),
/// at nanosecond resolution (as the runner measures).
fn lognormal(rng: &mut fastrand::Rng, median: f64, sigma: f64) -> f64 {
    (median * (sigma * normal(rng)).exp() * 1000.0).round() / 1000.0
}

fn pick_outcome(rng: &mut fastrand::Rng) -> Outcome {
    match rng.u32(0..100) {
        0..=74 => Outcome::Pass,
        75..=82 => Outcome::Fail,
        83..=89 => Outcome::Flaky,
        90..=93 => Outcome::Infra,
        94..=96 => Outcome::Timeout,
        _ => Outcome::Skipped,
    }
}

fn slug(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A sample run of campaign `nightly` on two simulated and two FPGA hosts:
/// 10 attacks x {model, rtl} x tenant x {sim, ice40} = 40 cases.
pub fn sample_run(seed: u64) -> Run {
    let mut rng = fastrand::Rng::with_seed(seed);
    let started_ms = 1_795_000_000_000 + seed * 86_400_000;
    let mut grid = vec![];
    for (attack, expected) in ATTACKS {
        for backend in BACKENDS {
            for tag in ["sim", "ice40"] {
                grid.push((attack, expected, backend, tag));
            }
        }
    }
    let n = grid.len();
    let mut forced = BTreeMap::new();
    for (k, o) in Outcome::ALL.iter().enumerate() {
        forced.insert((seed as usize + k * 7) % n, *o);
    }
    // Per host: its clock and its device's counters.
    let mut clock: BTreeMap<&str, u64> = HOSTS
        .iter()
        .enumerate()
        .map(|(i, h)| (h.0, started_ms + i as u64 * 1500))
        .collect();
    let mut counters: BTreeMap<&str, (BTreeMap<String, u64>, u64)> = HOSTS
        .iter()
        .map(|h| {
            let regions = REGIONS.iter().map(|r| (r.to_string(), 2)).collect();
            (h.0, (regions, 6))
        })
        .collect();
    let mut cases = vec![];
    for (i, (attack, expected, backend, tag)) in grid.into_iter().enumerate() {
        let outcome = forced
            .get(&i)
            .copied()
            .unwrap_or_else(|| pick_outcome(&mut rng));
        let hosts_for_tag: Vec<&str> = HOSTS.iter().filter(|h| h.1 == tag).map(|h| h.0).collect();
        let host = hosts_for_tag[rng.usize(0..hosts_for_tag.len())];
        let other = hosts_for_tag
            .iter()
            .copied()
            .find(|h| *h != host)
            .unwrap_or(host);
        let id = CaseResult::make_id(attack, backend, "tenant", tag);
        let base_ms = match backend {
            "rtl" => 9_000 + rng.u64(0..6_000),
            _ => 1_500 + rng.u64(0..2_000),
        };
        let mut attempts = vec![];
        let mut message = String::new();
        let observed;
        match outcome {
            Outcome::Pass => {
                attempts.push(Attempt {
                    outcome,
                    host: host.into(),
                    duration_ms: base_ms,
                    message: String::new(),
                    build: None,
                });
                observed = expected.to_string();
            }
            Outcome::Fail => {
                message = match attack {
                    "device-key-read" => {
                        "tenant read DEVICE_KEY[0] = 0x5e3c9a11 (expected 0x0); alarm raised at rip=0x10_4a2 `mov eax, [rdi+0x3000]`".into()
                    }
                    "scratch-leak-after-teardown" => {
                        "next tenant read SCRATCH[3] = 0xdeadbeef after teardown; console said: <script>alert('pwn')</script> & \"quoted\"".into()
                    }
                    _ => format!("expected {expected}; counter delta 0 (attempt not counted) \u{1b}[31mFAIL\u{1b}[0m"),
                };
                observed = "allowed, no alarm".into();
                attempts.push(Attempt {
                    outcome,
                    host: host.into(),
                    duration_ms: base_ms,
                    message: message.clone(),
                    build: None,
                });
            }
            Outcome::Flaky => {
                let fails = 1 + rng.u32(0..2);
                for k in 0..fails {
                    attempts.push(Attempt {
                        outcome: Outcome::Fail,
                        host: host.into(),
                        duration_ms: base_ms,
                        message: format!("attempt {}: alarm not seen within 500 ms", k + 1),
                        build: None,
                    });
                }
                attempts.push(Attempt {
                    outcome: Outcome::Pass,
                    host: host.into(),
                    duration_ms: base_ms,
                    message: String::new(),
                    build: None,
                });
                message = format!("passed on attempt {}", fails + 1);
                observed = expected.to_string();
            }
            Outcome::Infra => {
                for (k, h) in [host, other, host].into_iter().enumerate() {
                    attempts.push(Attempt {
                        outcome: Outcome::Infra,
                        host: h.into(),
                        duration_ms: 30_000,
                        message: match k {
                            0 => format!("{h}: PDU outlet 7 did not report ON after power-on"),
                            1 => format!("{h}: no console output within 20 s of power-on"),
                            _ => format!("{h}: lease expired while booting hilrig-vmm"),
                        },
                        build: None,
                    });
                }
                message = "infrastructure fault on all 3 attempts".into();
                observed = "not run".into();
            }
            Outcome::Timeout => {
                attempts.push(Attempt {
                    outcome,
                    host: host.into(),
                    duration_ms: 120_000,
                    message: "guest did not write the test-exit port within 120 s".into(),
                    build: None,
                });
                message = "timed out after 120 s".into();
                observed = "no verdict".into();
            }
            Outcome::Skipped => {
                message = format!("no host with tag {tag} offers backend {backend}");
                observed = String::new();
            }
        }
        let duration_ms: u64 = attempts.iter().map(|a| a.duration_ms).sum();

        // Metrics, only for cases that ran on a device.
        let mut metrics = Metrics::default();
        let mut artifacts = vec![];
        if !attempts.is_empty() && outcome != Outcome::Infra {
            let t0 = *clock.get(host).unwrap_or(&started_ms);
            let (regions, master) = counters.entry(host).or_default();
            let flash_region = match attack {
                "flash-program-locked" => Some("firmware"),
                "flash-erase-bad-key" => Some("vbios"),
                "state-file-rollback" => Some("config"),
                _ => None,
            };
            let steps = 4u64;
            for s in 0..=steps {
                if s > 0 {
                    if let Some(r) = flash_region {
                        let inc = 1 + rng.u64(0..2);
                        *regions.entry(r.into()).or_default() += inc;
                        *master += inc;
                    }
                }
                metrics.counters.push(CounterReading {
                    t_ms: t0 + duration_ms * s / steps,
                    regions: regions.clone(),
                    master: *master,
                });
            }
            let median = if backend == "rtl" { 31.0 } else { 8.6 };
            let samples: Vec<f64> = (0..300)
                .map(|_| lognormal(&mut rng, median, 0.25))
                .collect();
            metrics.trap_latency = if backend == "rtl" && tag == "ice40" {
                // A busy FPGA host sends a pre-binned histogram.
                let edges: Vec<f64> = (0..=20).map(|k| 10.0 + 4.0 * k as f64).collect();
                let mut counts = vec![0u64; 20];
                for s in &samples {
                    let b = ((s - 10.0) / 4.0).floor();
                    if (0.0..20.0).contains(&b) {
                        counts[b as usize] += 1;
                    }
                }
                Latency {
                    samples_us: vec![],
                    histogram: Some(Histogram {
                        edges_us: edges,
                        counts,
                    }),
                }
            } else {
                Latency {
                    samples_us: samples,
                    histogram: None,
                }
            };
            if attack == "live-patch-under-load" {
                let k = 8 + rng.usize(0..12);
                metrics.blackouts_us = (0..k)
                    .map(|_| {
                        if rng.u32(0..30) == 0 {
                            850.0 + rng.u32(0..400_000) as f64 / 1000.0
                        } else {
                            lognormal(&mut rng, 210.0, 0.3)
                        }
                    })
                    .collect();
            }
            metrics.teardown_us = vec![lognormal(&mut rng, 26_000.0, 0.2)];
            metrics.alarms = match attack {
                "scratch-leak-after-teardown" | "live-patch-under-load" => 0,
                _ if outcome == Outcome::Fail => 0,
                _ => 1 + rng.u64(0..4),
            };
            let dir = format!("cases/{}", slug(&id));
            artifacts.push(Artifact {
                kind: ArtifactKind::Console,
                path: format!("{dir}/console.log"),
            });
            artifacts.push(Artifact {
                kind: ArtifactKind::Alarms,
                path: format!("{dir}/alarms.jsonl"),
            });
            artifacts.push(Artifact {
                kind: ArtifactKind::Oob,
                path: format!("{dir}/oob.jsonl"),
            });
            artifacts.push(Artifact {
                kind: ArtifactKind::Teardown,
                path: format!("{dir}/teardown.json"),
            });
            if backend == "rtl" && outcome == Outcome::Fail {
                artifacts.push(Artifact {
                    kind: ArtifactKind::Vcd,
                    path: format!("{dir}/divergence.vcd"),
                });
            }
            if let Some(c) = clock.get_mut(host) {
                *c += duration_ms + 2_000;
            }
        }
        cases.push(CaseResult {
            id,
            attack: attack.into(),
            backend: backend.into(),
            profile: "tenant".into(),
            host_tag: tag.into(),
            host: host.into(),
            outcome,
            attempts,
            duration_ms,
            message,
            expected: expected.into(),
            observed,
            metrics,
            artifacts,
        });
    }
    let finished_ms = clock.values().copied().max().unwrap_or(started_ms) + 5_000;
    Run {
        schema: SCHEMA_VERSION,
        id: format!("nightly-{seed:04}"),
        campaign: "nightly".into(),
        started_ms,
        finished_ms,
        hosts: HOSTS
            .iter()
            .map(|(name, tag, sim)| Host {
                name: name.to_string(),
                tags: vec![tag.to_string()],
                simulated: *sim,
            })
            .collect(),
        cases,
    }
}
