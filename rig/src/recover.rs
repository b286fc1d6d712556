//! Bringing a wedged SSH host back (LAVA's "the device is bad, reset it"): a host
//! whose VMM step timed out or whose SSH stopped answering is recovered in steps,
//! each followed by a bounded liveness check (SSH reachable and the runner's build
//! answers `--version`):
//!
//! 1. **soft**: kill the host's VMMs over SSH (every attempt directory's `.pid`);
//! 2. **hard**: the power driver's hard reset when it has one, else kill every
//!    process of the host's SSH user (over SSH);
//! 3. **power cycle** through the host's power driver (read back), then wait
//!    (bounded) for SSH and `hilrig --version`.
//!
//! Only a host that does not come back is an error ([`RecoverError::NotBack`]),
//! naming every step tried and the last reason: the runner takes it offline with it.

use crate::power::{Power, ResetLevel};
use crate::remote::{shell_quote, RemoteError, Ssh};
use std::time::{Duration, Instant};

/// How long each step may take.
#[derive(Debug, Clone, Copy)]
pub struct RecoverOptions {
    /// Bound on each SSH command (kill, liveness check).
    pub ssh_timeout: Duration,
    /// How long to wait for SSH and `--version` after the power cycle.
    pub wait: Duration,
}

impl Default for RecoverOptions {
    fn default() -> Self {
        RecoverOptions {
            ssh_timeout: Duration::from_secs(10),
            wait: Duration::from_secs(60),
        }
    }
}

/// The step that brought the host back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovered {
    /// It answered after its VMMs were killed over SSH.
    Soft,
    /// It answered after the hard reset (the driver's, or its user's processes killed).
    Hard,
    /// It answered after a power cycle through its power driver.
    PowerCycle,
}

impl std::fmt::Display for Recovered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Recovered::Soft => "soft (VMM killed over SSH)",
            Recovered::Hard => "hard reset",
            Recovered::PowerCycle => "power cycle",
        })
    }
}

/// Why a host could not be recovered.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// Every step was tried; the host does not answer.
    #[error("host `{host}` does not come back after {tried}: {last}")]
    NotBack {
        /// The host.
        host: String,
        /// The steps tried, `a -> b -> c`.
        tried: String,
        /// The last reason (the liveness check's or the power driver's error).
        last: String,
    },
}

/// Soft step's remote command: SIGKILL every VMM an attempt started under
/// `workdir/att/` (the step shell keeps its pid in `.pid`).
pub fn kill_vmms_line(workdir: &str) -> String {
    let att = shell_quote(&format!("{}/att", workdir.trim_end_matches('/')));
    format!(
        "for p in {att}/*/.pid; do [ -f \"$p\" ] && kill -KILL \"$(cat \"$p\")\" 2>/dev/null; done; true"
    )
}

/// Hard step without a driver reset: SIGKILL every process of the SSH user (this
/// session included, so the command's own exit status means nothing).
pub const KILL_USER_LINE: &str = "kill -KILL -1 2>/dev/null; true";

/// Recover `ssh`'s host (see the module doc). `hilrig` is the path of the
/// runner's build there; `power` the host's power driver (`None`: no power
/// control, so only the SSH steps are tried).
pub fn recover_host(
    ssh: &Ssh,
    hilrig: &str,
    mut power: Option<Power>,
    opts: RecoverOptions,
) -> Result<Recovered, RecoverError> {
    let host = ssh.host().to_string();
    let mut tried: Vec<&str> = Vec::new();
    let alive = |what: &str| -> Result<(), RemoteError> {
        // A hung master connection must not make every later command hang.
        ssh.close_master(opts.ssh_timeout);
        ssh.alive_within(hilrig, opts.ssh_timeout)
            .map(|v| tracing::info!("host {host}: answers after {what}: {v}"))
    };
    // 1. soft
    tried.push("soft (kill the VMM over SSH)");
    let mut last = match ssh.sh_within(&kill_vmms_line(&ssh.spec().workdir), opts.ssh_timeout) {
        Ok(_) => match alive("the soft step") {
            Ok(()) => return Ok(Recovered::Soft),
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    };
    tracing::warn!("host {host}: soft recovery failed: {last}");
    // 2. hard
    let driver_reset = match power.as_mut() {
        Some(p) => match p.reset(ResetLevel::Hard) {
            Ok(done) => done,
            Err(e) => {
                // Counted as tried; the liveness check below says what is left.
                tracing::warn!("host {host}: hard reset through the power driver: {e}");
                true
            }
        },
        None => false,
    };
    if driver_reset {
        tried.push("hard reset (power driver)");
    } else {
        tried.push("hard (kill the host user's processes over SSH)");
        // Its exit status is that of a killed session: only reachability counts.
        let _ = ssh.sh_within(KILL_USER_LINE, opts.ssh_timeout);
    }
    match alive("the hard step") {
        Ok(()) => return Ok(Recovered::Hard),
        Err(e) => last = e.to_string(),
    }
    tracing::warn!("host {host}: hard recovery failed: {last}");
    // 3. power cycle, then wait
    let Some(p) = power.as_mut() else {
        return Err(RecoverError::NotBack {
            host,
            tried: tried.join(" -> ") + " (no power driver to cycle)",
            last,
        });
    };
    tried.push("power cycle");
    if let Err(e) = p.cycle() {
        return Err(RecoverError::NotBack {
            host,
            tried: tried.join(" -> "),
            last: e.to_string(),
        });
    }
    let deadline = Instant::now() + opts.wait;
    loop {
        match alive("the power cycle") {
            Ok(()) => return Ok(Recovered::PowerCycle),
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(RecoverError::NotBack {
                host,
                tried: format!("{} (waited {:?})", tried.join(" -> "), opts.wait),
                last,
            });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_line_quotes_the_workdir() {
        let l = kill_vmms_line("/w/it's here/");
        assert!(
            l.starts_with("for p in '/w/it'\\''s here/att'/*/.pid;"),
            "{l}"
        );
    }
}
