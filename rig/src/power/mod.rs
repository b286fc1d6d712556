//! Power drivers. Every action is read back: [`Power`] asks the backend for a
//! state, then polls the backend's status until it shows that state (within the
//! driver's settle time), retrying the action a bounded number of times, and
//! fails with an error naming the host and driver otherwise. Nothing is ever
//! assumed "on".

pub mod command;
pub mod pdudaemon;
pub mod relay;

use crate::error::RigError;
use std::time::{Duration, Instant};

/// A power state as read back from the hardware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerState {
    /// Powered.
    On,
    /// Not powered.
    Off,
}

impl std::fmt::Display for PowerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PowerState::On => "on",
            PowerState::Off => "off",
        })
    }
}

/// Reset levels, gentlest first (see [`Power::recover`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetLevel {
    /// OS-level/ACPI reset: the host restarts cleanly.
    Soft,
    /// Reset line: the host restarts at once, power stays on.
    Hard,
}

/// What went wrong in a power driver, without the host and driver ([`Power`] adds
/// them).
#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    /// An external command failed.
    #[error(transparent)]
    Shell(#[from] ShellError),
    /// A status command's output shows no single state.
    #[error(transparent)]
    StatusOutput(#[from] StatusOutputError),
    /// The relay board's status reply is not a status.
    #[error(transparent)]
    Relay(#[from] relay::ReplyError),
    /// A serial port could not be opened.
    #[error("cannot open {port}: {source}")]
    OpenPort {
        /// The port.
        port: String,
        /// Why.
        source: serialport::Error,
    },
    /// Reading or writing a serial port failed.
    #[error("{what} {port}: {source}")]
    PortIo {
        /// `reading` or `writing to`.
        what: &'static str,
        /// The port.
        port: String,
        /// Why.
        source: std::io::Error,
    },
    /// The relay board did not answer a status query.
    #[error("no status reply from the relay board on {port} within {timeout:?}")]
    NoReply {
        /// The port.
        port: String,
        /// How long it was given.
        timeout: Duration,
    },
    /// An HTTP request failed (pdudaemon).
    #[error(transparent)]
    Http(#[from] pdudaemon::HttpError),
    /// pdudaemon refused a request.
    #[error("pdudaemon at {url} answered {code} to {action}: {body}")]
    Refused {
        /// pdudaemon's URL.
        url: String,
        /// The HTTP status.
        code: u16,
        /// on, off or reboot.
        action: String,
        /// The start of pdudaemon's answer.
        body: String,
    },
    /// A simulated host failed (see `sim::SimPower`).
    #[error("{0}")]
    Sim(String),
}

/// A power driver's settings are not usable (checked when the driver is built).
#[derive(Debug, thiserror::Error)]
pub enum DriverConfigError {
    /// A status pattern is not a regular expression.
    #[error("pattern {pattern:?}: {source}")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// Why.
        source: Box<regex::Error>,
    },
    /// pdudaemon's URL is not usable.
    #[error(transparent)]
    Url(#[from] pdudaemon::UrlError),
}

/// Compile a status pattern of a driver's settings.
pub(crate) fn pattern(p: &str) -> Result<regex::Regex, DriverConfigError> {
    regex::Regex::new(p).map_err(|e| DriverConfigError::Pattern {
        pattern: p.to_string(),
        source: Box::new(e),
    })
}

/// An external command ([`run_shell`]) failed.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// It could not be started.
    #[error("cannot run `{cmd}`: {source}")]
    Spawn {
        /// The command.
        cmd: String,
        /// Why.
        source: std::io::Error,
    },
    /// It ran past its timeout and was killed.
    #[error("`{cmd}` timed out after {timeout:?} (killed)")]
    Timeout {
        /// The command.
        cmd: String,
        /// The timeout.
        timeout: Duration,
    },
    /// Waiting for it failed.
    #[error("waiting for `{cmd}`: {source}")]
    Wait {
        /// The command.
        cmd: String,
        /// Why.
        source: std::io::Error,
    },
    /// It exited unsuccessfully.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed {
        /// The command.
        cmd: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The start of its stderr.
        stderr: String,
    },
}

/// A status command's output matches both or neither of the on/off patterns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusOutputError {
    /// Both patterns match.
    #[error("status output matches both on and off patterns: {0:?}")]
    Both(String),
    /// Neither matches.
    #[error("status output matches neither on nor off pattern: {0:?}")]
    Neither(String),
}

/// A requested state did not show in the readback.
#[derive(Debug, thiserror::Error)]
enum ReadbackError {
    #[error("asked for {want}, read back {got}")]
    Mismatch { want: PowerState, got: PowerState },
    #[error("asked for {want}, readback failed: {source}")]
    Failed {
        want: PowerState,
        source: PowerError,
    },
}

/// What a power driver does; raw, without readback (that is [`Power`]'s job).
/// Errors do not name the host and driver; [`Power`] adds them.
pub trait PowerBackend: Send {
    /// The driver's inventory name (`sim`, `serial-relay`, ...).
    fn driver(&self) -> &'static str;
    /// Ask for a state.
    fn set(&mut self, state: PowerState) -> Result<(), PowerError>;
    /// Read the state back from the hardware.
    fn status(&mut self) -> Result<PowerState, PowerError>;
    /// Reset without removing power; `Ok(false)` when the hardware cannot.
    fn reset(&mut self, level: ResetLevel) -> Result<bool, PowerError> {
        let _ = level;
        Ok(false)
    }
    /// A native power cycle (e.g. a vendor tool's `cycle`), if the driver has
    /// one; `None` makes [`Power::cycle`] do off + on.
    fn cycle(&mut self) -> Option<Result<(), PowerError>> {
        None
    }
    /// How long a requested state may take to show in the readback.
    fn settle(&self) -> Duration {
        Duration::from_secs(5)
    }
    /// Attempts per action.
    fn retries(&self) -> u32 {
        3
    }
}

/// A host's power, with readback, bounded retries and escalation.
pub struct Power {
    host: String,
    backend: Box<dyn PowerBackend>,
    /// Time between power off and on in a cycle.
    pub off_time: Duration,
}

impl Power {
    /// Wrap a backend for `host`.
    pub fn new(host: &str, backend: Box<dyn PowerBackend>) -> Power {
        Power {
            host: host.to_string(),
            backend,
            off_time: Duration::from_millis(200),
        }
    }

    fn label(&self) -> String {
        format!("power/{}", self.backend.driver())
    }

    fn fail(&self, detail: impl Into<String>) -> RigError {
        RigError::driver(&self.host, &self.label(), detail)
    }

    /// Read the state back.
    pub fn status(&mut self) -> Result<PowerState, RigError> {
        self.backend.status().map_err(|e| self.fail(e.to_string()))
    }

    /// Switch to `want` and read it back; retried up to the driver's bound.
    pub fn set(&mut self, want: PowerState) -> Result<(), RigError> {
        let attempts = self.backend.retries().max(1);
        let mut last = String::new();
        for attempt in 1..=attempts {
            if let Err(e) = self.backend.set(want) {
                last = format!("switching {want} failed: {e}");
                tracing::warn!(host = %self.host, driver = self.backend.driver(), attempt, "{last}");
                continue;
            }
            match self.wait_for(want) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last = e.to_string();
                    tracing::warn!(host = %self.host, driver = self.backend.driver(), attempt, "{last}");
                }
            }
        }
        Err(self.fail(format!("{last} (after {attempts} attempts)")))
    }

    fn wait_for(&mut self, want: PowerState) -> Result<(), ReadbackError> {
        let deadline = Instant::now() + self.backend.settle();
        loop {
            let got = self.backend.status();
            match &got {
                Ok(s) if *s == want => return Ok(()),
                _ if Instant::now() >= deadline => {
                    return Err(match got {
                        Ok(got) => ReadbackError::Mismatch { want, got },
                        Err(source) => ReadbackError::Failed { want, source },
                    })
                }
                // A readback error may be transient only while settling; the last
                // one is reported.
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Power on (read back).
    pub fn on(&mut self) -> Result<(), RigError> {
        self.set(PowerState::On)
    }

    /// Power off (read back).
    pub fn off(&mut self) -> Result<(), RigError> {
        self.set(PowerState::Off)
    }

    /// Off, wait [`Power::off_time`], on; both read back. A driver's native cycle
    /// is used when it has one (then the final state is read back as on).
    pub fn cycle(&mut self) -> Result<(), RigError> {
        if let Some(r) = self.backend.cycle() {
            r.map_err(|e| self.fail(format!("cycle failed: {e}")))?;
            return self
                .wait_for(PowerState::On)
                .map_err(|e| self.fail(format!("after cycle: {e}")));
        }
        self.off()?;
        std::thread::sleep(self.off_time);
        self.on()
    }

    /// The driver's own reset at `level`, if it has one: `Ok(false)` when it
    /// cannot (no reset line, no reset command).
    pub fn reset(&mut self, level: ResetLevel) -> Result<bool, RigError> {
        self.backend
            .reset(level)
            .map_err(|e| self.fail(format!("{level:?} reset failed: {e}")))
    }

    /// Bring a wedged host back, escalating: soft reset -> hard reset -> power
    /// cycle. `alive` says whether the host answers again after a step (e.g. the
    /// console shows a boot banner, the OOB port answers). Returns the step that
    /// worked.
    pub fn recover(&mut self, alive: &mut dyn FnMut() -> bool) -> Result<&'static str, RigError> {
        let mut tried = Vec::new();
        for (level, name) in [
            (ResetLevel::Soft, "soft reset"),
            (ResetLevel::Hard, "hard reset"),
        ] {
            match self.backend.reset(level) {
                Ok(true) => {
                    tried.push(name);
                    if alive() {
                        return Ok(name);
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(host = %self.host, "{name} failed: {e}");
                    tried.push(name);
                }
            }
        }
        self.cycle()?;
        tried.push("power cycle");
        if alive() {
            return Ok("power cycle");
        }
        Err(self.fail(format!(
            "host does not come back after {}",
            tried.join(" -> ")
        )))
    }
}

/// Run `cmd` with `sh -c`, killing it after `timeout`. Returns stdout on exit
/// status 0; otherwise a description with the status and stderr.
pub fn run_shell(cmd: &str, timeout: Duration) -> Result<String, ShellError> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ShellError::Spawn {
            cmd: cmd.to_string(),
            source,
        })?;
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = err.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ShellError::Timeout {
                    cmd: cmd.to_string(),
                    timeout,
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(source) => {
                return Err(ShellError::Wait {
                    cmd: cmd.to_string(),
                    source,
                })
            }
        }
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        Err(ShellError::Failed {
            cmd: cmd.to_string(),
            status,
            stderr: stderr.trim().chars().take(400).collect(),
        })
    }
}

/// Decide a state from a status command's output.
pub fn parse_status(
    out: &str,
    on: &regex::Regex,
    off: &regex::Regex,
) -> Result<PowerState, StatusOutputError> {
    match (on.is_match(out), off.is_match(out)) {
        (true, false) => Ok(PowerState::On),
        (false, true) => Ok(PowerState::Off),
        (true, true) => Err(StatusOutputError::Both(out.trim().to_string())),
        (false, false) => Err(StatusOutputError::Neither(out.trim().to_string())),
    }
}

/// Substitute `{host}`, `{port}`, `{pdu}` in a command template.
pub fn substitute(template: &str, host: &str, port: &str, pdu: &str) -> String {
    template
        .replace("{host}", host)
        .replace("{port}", port)
        .replace("{pdu}", pdu)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Flaky {
        state: PowerState,
        ignore_sets: u32,
        sets: u32,
    }
    impl PowerBackend for Flaky {
        fn driver(&self) -> &'static str {
            "flaky"
        }
        fn set(&mut self, s: PowerState) -> Result<(), PowerError> {
            self.sets += 1;
            if self.sets > self.ignore_sets {
                self.state = s;
            }
            Ok(())
        }
        fn status(&mut self) -> Result<PowerState, PowerError> {
            Ok(self.state)
        }
        fn settle(&self) -> Duration {
            Duration::ZERO
        }
    }

    #[test]
    fn readback_retries_then_fails_naming_host_and_driver() {
        let mut p = Power::new(
            "h1",
            Box::new(Flaky {
                state: PowerState::Off,
                ignore_sets: 2,
                sets: 0,
            }),
        );
        p.on().unwrap();
        assert_eq!(p.status().unwrap(), PowerState::On);

        let mut p = Power::new(
            "h2",
            Box::new(Flaky {
                state: PowerState::Off,
                ignore_sets: 100,
                sets: 0,
            }),
        );
        let e = p.on().unwrap_err();
        assert!(e.is_infra());
        let s = e.to_string();
        assert!(
            s.contains("h2") && s.contains("power/flaky") && s.contains("read back off"),
            "{s}"
        );
    }

    #[test]
    fn escalation_ends_in_power_cycle() {
        let mut p = Power::new(
            "h3",
            Box::new(Flaky {
                state: PowerState::On,
                ignore_sets: 0,
                sets: 0,
            }),
        );
        p.off_time = Duration::ZERO;
        let mut calls = 0;
        assert_eq!(
            p.recover(&mut || {
                calls += 1;
                true
            })
            .unwrap(),
            "power cycle"
        );
        assert_eq!(calls, 1);
        assert!(p.recover(&mut || false).is_err());
    }

    #[test]
    fn status_parsing() {
        let on = regex::Regex::new(r"(?i)\bon\b").unwrap();
        let off = regex::Regex::new(r"(?i)\boff\b").unwrap();
        assert_eq!(
            parse_status("Chassis Power is on\n", &on, &off),
            Ok(PowerState::On)
        );
        assert_eq!(parse_status("OFF", &on, &off), Ok(PowerState::Off));
        assert!(parse_status("on off", &on, &off).is_err());
        assert!(parse_status("garbage", &on, &off).is_err());
    }

    #[test]
    fn shell_runner_checks_exit_and_timeout() {
        assert_eq!(
            run_shell("echo hi", Duration::from_secs(5)).unwrap(),
            "hi\n"
        );
        let e = run_shell("echo nope >&2; exit 3", Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, ShellError::Failed { .. }), "{e}");
        let e = e.to_string();
        assert!(e.contains("nope") && e.contains('3'), "{e}");
        let e = run_shell("sleep 5", Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, ShellError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("timed out"), "{e}");
    }
}
