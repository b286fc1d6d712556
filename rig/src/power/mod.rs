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

/// What a power driver does; raw, without readback (that is [`Power`]'s job).
/// Errors are plain descriptions; [`Power`] adds the host and driver.
pub trait PowerBackend: Send {
    /// The driver's inventory name (`sim`, `serial-relay`, ...).
    fn driver(&self) -> &'static str;
    /// Ask for a state.
    fn set(&mut self, state: PowerState) -> Result<(), String>;
    /// Read the state back from the hardware.
    fn status(&mut self) -> Result<PowerState, String>;
    /// Reset without removing power; `Ok(false)` when the hardware cannot.
    fn reset(&mut self, level: ResetLevel) -> Result<bool, String> {
        let _ = level;
        Ok(false)
    }
    /// A native power cycle (e.g. a vendor tool's `cycle`), if the driver has
    /// one; `None` makes [`Power::cycle`] do off + on.
    fn cycle(&mut self) -> Option<Result<(), String>> {
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
        self.backend.status().map_err(|e| self.fail(e))
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
                    last = e;
                    tracing::warn!(host = %self.host, driver = self.backend.driver(), attempt, "{last}");
                }
            }
        }
        Err(self.fail(format!("{last} (after {attempts} attempts)")))
    }

    fn wait_for(&mut self, want: PowerState) -> Result<(), String> {
        let deadline = Instant::now() + self.backend.settle();
        loop {
            let got = self.backend.status();
            match &got {
                Ok(s) if *s == want => return Ok(()),
                _ if Instant::now() >= deadline => {
                    return Err(match got {
                        Ok(s) => format!("asked for {want}, read back {s}"),
                        Err(e) => format!("asked for {want}, readback failed: {e}"),
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
pub fn run_shell(cmd: &str, timeout: Duration) -> Result<String, String> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `{cmd}`: {e}"))?;
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
                return Err(format!("`{cmd}` timed out after {timeout:?} (killed)"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("waiting for `{cmd}`: {e}")),
        }
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "`{cmd}` failed ({status}): {}",
            stderr.trim().chars().take(400).collect::<String>()
        ))
    }
}

/// Decide a state from a status command's output.
pub fn parse_status(
    out: &str,
    on: &regex::Regex,
    off: &regex::Regex,
) -> Result<PowerState, String> {
    match (on.is_match(out), off.is_match(out)) {
        (true, false) => Ok(PowerState::On),
        (false, true) => Ok(PowerState::Off),
        (true, true) => Err(format!(
            "status output matches both on and off patterns: {:?}",
            out.trim()
        )),
        (false, false) => Err(format!(
            "status output matches neither on nor off pattern: {:?}",
            out.trim()
        )),
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
        fn set(&mut self, s: PowerState) -> Result<(), String> {
            self.sets += 1;
            if self.sets > self.ignore_sets {
                self.state = s;
            }
            Ok(())
        }
        fn status(&mut self) -> Result<PowerState, String> {
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
        assert!(e.contains("nope") && e.contains('3'), "{e}");
        let e = run_shell("sleep 5", Duration::from_millis(100)).unwrap_err();
        assert!(e.contains("timed out"), "{e}");
    }
}
