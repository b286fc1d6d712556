//! Fleet rollout of a patch bundle: the rig acts as the patch authority for many VMMs.
//! Canary hosts first, then waves; every host's result and blackout is recorded.
//! A host whose VMM build (from its `status`) is not the build the bundle targets is
//! skipped and listed as not applicable; the rollout stops at the first refusal or
//! failure of a host the bundle applies to, and reports which hosts run which version.

use hilrig_vmm_api::control::{self, ControlError, ModuleVersions, Reply, Request, Response};
use serde::Serialize;
use std::path::Path;
use std::time::Duration;

/// One VMM to patch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    /// Host name (from the inventory) or the socket path.
    pub name: String,
    /// Its control socket.
    pub socket: std::path::PathBuf,
}

/// How a host's patch went.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum HostOutcome {
    /// Applied.
    Applied {
        /// Component.
        component: String,
        /// Version before.
        from: u64,
        /// Version after.
        to: u64,
        /// Blackout in microseconds.
        blackout_us: u64,
    },
    /// The VMM refused the patch (bad signature, wrong build, not newer...).
    Refused {
        /// Its reason.
        reason: String,
    },
    /// The VMM could not be reached or answered nonsense: an infrastructure fault.
    Failed {
        /// What went wrong.
        reason: String,
    },
    /// Not attempted: the rollout stopped before this host's wave.
    Skipped,
    /// Not attempted: the bundle does not apply to this host (another VMM build).
    NotApplicable {
        /// Why.
        reason: String,
    },
}

/// One host's line in the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostReport {
    /// The host.
    pub target: Target,
    /// Wave number (0 = canary).
    pub wave: usize,
    /// Outcome.
    pub outcome: HostOutcome,
    /// Installed versions after the rollout, from the host's status (None: unreachable).
    pub versions: Option<ModuleVersions>,
}

/// The rollout report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Per host, in rollout order.
    pub hosts: Vec<HostReport>,
    /// Whether every host the bundle applies to applied the patch.
    pub complete: bool,
    /// Hosts skipped because the bundle does not apply to them.
    pub not_applicable: Vec<String>,
    /// Why the rollout stopped, if it did.
    pub stopped: Option<String>,
}

/// Split `n` hosts into waves: `canary` first, then waves of `wave` hosts.
pub fn waves(n: usize, canary: usize, wave: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut at = canary.min(n);
    if at > 0 {
        out.push(0..at);
    }
    let wave = wave.max(1);
    while at < n {
        let end = (at + wave).min(n);
        out.push(at..end);
        at = end;
    }
    out
}

/// What talks to one VMM (the control socket in production; fakes in tests).
pub trait Fleet {
    /// Apply the bundle: the VMM's response, or why none came back.
    fn patch(&self, t: &Target, bundle: &Path) -> Result<Response, ControlError>;
    /// Installed versions.
    fn status(&self, t: &Target) -> Result<ModuleVersions, ControlError>;
    /// The VMM build the host runs (SHA-256 hex, from its `status`); None: unknown
    /// (then the bundle is tried, and the VMM itself refuses another build).
    fn build(&self, _t: &Target) -> Result<Option<String>, ControlError> {
        Ok(None)
    }
}

/// The production fleet: VMM control sockets.
pub struct Sockets {
    /// Per-request timeout.
    pub timeout: Duration,
}

impl Fleet for Sockets {
    fn patch(&self, t: &Target, bundle: &Path) -> Result<Response, ControlError> {
        let req = Request::Patch {
            bundle: bundle.to_path_buf(),
        };
        control::request(&t.socket, &req, self.timeout)
    }
    fn status(&self, t: &Target) -> Result<ModuleVersions, ControlError> {
        Ok(self.vm_status(t)?.versions)
    }
    fn build(&self, t: &Target) -> Result<Option<String>, ControlError> {
        Ok(self.vm_status(t)?.build)
    }
}

impl Sockets {
    fn vm_status(&self, t: &Target) -> Result<control::VmStatus, ControlError> {
        match control::request(&t.socket, &Request::Status {}, self.timeout)? {
            Ok(Reply::Status(s)) => Ok(s),
            Ok(_) => Err(ControlError::Mismatch {
                path: t.socket.clone(),
                op: "status",
                got: "another reply".into(),
            }),
            Err(e) => Err(ControlError::Io {
                path: t.socket.clone(),
                source: std::io::Error::other(e.0),
            }),
        }
    }
}

fn outcome(reply: Result<Response, ControlError>) -> HostOutcome {
    match reply {
        Err(e) => HostOutcome::Failed {
            reason: e.to_string(),
        },
        Ok(Ok(Reply::Patch(ev))) => match ev.blackout_us {
            Some(blackout_us) => HostOutcome::Applied {
                component: ev.component,
                from: ev.from,
                to: ev.to,
                blackout_us,
            },
            None => HostOutcome::Failed {
                reason: "the patch was applied while an operator held the VM paused: no blackout measured".into(),
            },
        },
        Ok(Ok(other)) => HostOutcome::Failed {
            reason: format!("a patch answered with {other:?}"),
        },
        Ok(Err(reason)) => HostOutcome::Refused { reason: reason.0 },
    }
}

/// Roll `bundle` out over `targets`: `canary` hosts first, then waves of `wave`.
/// Stops at the first refused or failed host; then reads every host's versions.
pub fn rollout(
    fleet: &dyn Fleet,
    targets: &[Target],
    bundle: &Path,
    canary: usize,
    wave: usize,
) -> Report {
    let mut hosts: Vec<HostReport> = targets
        .iter()
        .map(|t| HostReport {
            target: t.clone(),
            wave: 0,
            outcome: HostOutcome::Skipped,
            versions: None,
        })
        .collect();
    let mut stopped = None;
    let target_build = bundle_target(bundle);
    let mut not_applicable = Vec::new();
    'waves: for (w, range) in waves(targets.len(), canary, wave).into_iter().enumerate() {
        for i in range.clone() {
            hosts[i].wave = w;
        }
        for i in range {
            if let (Some(want), Ok(Some(have))) = (&target_build, fleet.build(&targets[i])) {
                if !want.eq_ignore_ascii_case(&have) {
                    hosts[i].outcome = HostOutcome::NotApplicable {
                        reason: format!("runs VMM build {have}; the bundle targets {want}"),
                    };
                    not_applicable.push(targets[i].name.clone());
                    continue;
                }
            }
            let o = outcome(fleet.patch(&targets[i], bundle));
            let bad = !matches!(o, HostOutcome::Applied { .. });
            hosts[i].outcome = o;
            if bad {
                stopped = Some(format!(
                    "{} in wave {w}: {}",
                    targets[i].name,
                    match &hosts[i].outcome {
                        HostOutcome::Refused { reason } => format!("refused: {reason}"),
                        HostOutcome::Failed { reason } => format!("failed: {reason}"),
                        _ => String::new(),
                    }
                ));
                break 'waves;
            }
        }
    }
    for h in &mut hosts {
        h.versions = fleet.status(&h.target).ok();
    }
    let complete = hosts.iter().all(|h| {
        matches!(
            h.outcome,
            HostOutcome::Applied { .. } | HostOutcome::NotApplicable { .. }
        )
    });
    Report {
        hosts,
        complete,
        not_applicable,
        stopped,
    }
}

/// The VMM build a bundle file targets (hex), if the file reads and parses.
fn bundle_target(bundle: &Path) -> Option<String> {
    let text_limit =
        hilrig_fw::bundle::MAX_PAYLOADS as u64 + hilrig_fw::bundle::MAX_MANIFEST as u64;
    let f = std::fs::File::open(bundle).ok()?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(f, text_limit), &mut bytes).ok()?;
    let b = hilrig_fw::bundle::parse(&bytes).ok()?;
    Some(b.manifest.target_vmm_sha256.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hilrig_vmm_api::PatchEvent;
    use std::sync::Mutex;

    struct Fake {
        bad: &'static str,
        other_build: Vec<&'static str>,
        log: Mutex<Vec<String>>,
    }
    impl Fleet for Fake {
        fn patch(&self, t: &Target, _: &Path) -> Result<Response, ControlError> {
            self.log.lock().unwrap().push(t.name.clone());
            if t.name == self.bad {
                return Ok(Err("wrong build".into()));
            }
            Ok(Ok(Reply::Patch(PatchEvent {
                component: "policy".into(),
                from: 1,
                to: 2,
                blackout_us: Some(80),
                ..Default::default()
            })))
        }
        fn status(&self, t: &Target) -> Result<ModuleVersions, ControlError> {
            let patched = self.log.lock().unwrap().contains(&t.name) && t.name != self.bad;
            Ok(ModuleVersions {
                policy: if patched { 2 } else { 1 },
                device_handler: 0,
            })
        }
        fn build(&self, t: &Target) -> Result<Option<String>, ControlError> {
            Ok(Some(if self.other_build.contains(&t.name.as_str()) {
                hex::encode([0xee; 32])
            } else {
                hex::encode(BUILD)
            }))
        }
    }

    const BUILD: [u8; 32] = [0xb1; 32];

    fn bundle_file(dir: &Path) -> std::path::PathBuf {
        let b = hilrig_fw::bundle::build(
            &hilrig_fw::bundle::BundleSpec {
                component: "policy",
                version: 2,
                target_vmm_sha256: BUILD,
                payloads: vec![("rules.toml".into(), b"".to_vec())],
                encrypt_to: None,
                patch_path_sha256: Some([1; 32]),
            },
            &ed25519_dalek::SigningKey::from_bytes(&[3; 32]),
        )
        .unwrap();
        let p = dir.join("p.bundle");
        std::fs::write(&p, b).unwrap();
        p
    }

    /// Issue 21.3: hosts running another build are skipped and listed; the rollout
    /// halts only on a refusal by a host the bundle applies to.
    #[test]
    fn hosts_of_another_build_are_skipped_not_a_halt() {
        let d = tempfile::tempdir().unwrap();
        let b = bundle_file(d.path());
        let f = Fake {
            bad: "none",
            other_build: vec!["h1", "h2"],
            log: Mutex::new(vec![]),
        };
        let r = rollout(&f, &targets(5), &b, 1, 2);
        assert_eq!(*f.log.lock().unwrap(), vec!["h0", "h3", "h4"]);
        assert!(r.complete, "{r:?}");
        assert!(r.stopped.is_none());
        assert_eq!(r.not_applicable, vec!["h1", "h2"]);
        assert!(
            matches!(r.hosts[1].outcome, HostOutcome::NotApplicable { ref reason } if reason.contains("targets"))
        );
        // A refusal by an applicable host still halts.
        let f = Fake {
            bad: "h3",
            other_build: vec!["h1"],
            log: Mutex::new(vec![]),
        };
        let r = rollout(&f, &targets(5), &b, 1, 2);
        assert!(!r.complete);
        assert!(r.stopped.as_deref().unwrap().starts_with("h3"));
        assert_eq!(r.hosts[4].outcome, HostOutcome::Skipped);
    }

    fn targets(n: usize) -> Vec<Target> {
        (0..n)
            .map(|i| Target {
                name: format!("h{i}"),
                socket: format!("/run/h{i}.sock").into(),
            })
            .collect()
    }

    #[test]
    fn wave_split() {
        assert_eq!(waves(7, 1, 3), vec![0..1, 1..4, 4..7]);
        assert_eq!(waves(2, 5, 3), vec![0..2]);
        assert_eq!(waves(3, 0, 0), vec![0..1, 1..2, 2..3]);
        assert!(waves(0, 1, 1).is_empty());
    }

    #[test]
    fn stops_at_the_first_refusal_and_reports_versions() {
        let f = Fake {
            bad: "h3",
            other_build: vec![],
            log: Mutex::new(vec![]),
        };
        let r = rollout(&f, &targets(6), Path::new("b"), 1, 2);
        assert_eq!(*f.log.lock().unwrap(), vec!["h0", "h1", "h2", "h3"]);
        assert!(!r.complete);
        assert!(r
            .stopped
            .as_deref()
            .unwrap()
            .starts_with("h3 in wave 2: refused: wrong build"));
        assert_eq!(r.hosts[4].outcome, HostOutcome::Skipped);
        assert_eq!(r.hosts[0].versions.map(|v| v.policy), Some(2));
        assert_eq!(r.hosts[5].versions.map(|v| v.policy), Some(1));
        let f = Fake {
            bad: "none",
            other_build: vec![],
            log: Mutex::new(vec![]),
        };
        assert!(rollout(&f, &targets(4), Path::new("b"), 1, 2).complete);
    }
}
