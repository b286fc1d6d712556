//! `command`: external on/off/status(/cycle/reset) commands, e.g. ipmitool or a
//! vendor PDU tool. Templates are run with `sh -c` after substituting `{host}` and
//! `{port}`; a non-zero exit or a timeout is an error; the state is parsed from
//! the status command's standard output with the on/off regexes.

use super::{
    parse_status, pattern, run_shell, substitute, DriverConfigError, PowerBackend, PowerError,
    PowerState, ResetLevel, ShellError,
};
use std::time::Duration;

/// The command driver.
pub struct CommandPower {
    host: String,
    port: String,
    on: String,
    off: String,
    status: String,
    cycle: Option<String>,
    soft_reset: Option<String>,
    hard_reset: Option<String>,
    on_re: regex::Regex,
    off_re: regex::Regex,
    timeout: Duration,
    settle: Duration,
    retries: u32,
}

/// Its settings (mirrors the inventory's `driver = "command"` section).
#[derive(Debug, Clone)]
pub struct CommandConfig {
    /// On template.
    pub on: String,
    /// Off template.
    pub off: String,
    /// Status template.
    pub status: String,
    /// Native cycle template (else off + on).
    pub cycle: Option<String>,
    /// Soft reset template.
    pub soft_reset: Option<String>,
    /// Hard reset template.
    pub hard_reset: Option<String>,
    /// `{port}` value.
    pub port: Option<String>,
    /// On regex.
    pub on_pattern: String,
    /// Off regex.
    pub off_pattern: String,
    /// Per-command timeout.
    pub timeout: Duration,
    /// Readback settle time.
    pub settle: Duration,
    /// Attempts.
    pub retries: u32,
}

impl CommandPower {
    /// Build for `host`; bad regexes are refused.
    pub fn new(host: &str, c: CommandConfig) -> Result<CommandPower, DriverConfigError> {
        let re = pattern;
        Ok(CommandPower {
            host: host.to_string(),
            port: c.port.unwrap_or_default(),
            on: c.on,
            off: c.off,
            status: c.status,
            cycle: c.cycle,
            soft_reset: c.soft_reset,
            hard_reset: c.hard_reset,
            on_re: re(&c.on_pattern)?,
            off_re: re(&c.off_pattern)?,
            timeout: c.timeout,
            settle: c.settle,
            retries: c.retries,
        })
    }

    fn run(&self, template: &str) -> Result<String, ShellError> {
        run_shell(
            &substitute(template, &self.host, &self.port, ""),
            self.timeout,
        )
    }
}

impl PowerBackend for CommandPower {
    fn driver(&self) -> &'static str {
        "command"
    }

    fn set(&mut self, state: PowerState) -> Result<(), PowerError> {
        let t = match state {
            PowerState::On => &self.on,
            PowerState::Off => &self.off,
        };
        Ok(self.run(t).map(|_| ())?)
    }

    fn status(&mut self) -> Result<PowerState, PowerError> {
        let out = self.run(&self.status)?;
        Ok(parse_status(&out, &self.on_re, &self.off_re)?)
    }

    fn cycle(&mut self) -> Option<Result<(), PowerError>> {
        let t = self.cycle.clone()?;
        Some(self.run(&t).map(|_| ()).map_err(PowerError::from))
    }

    fn reset(&mut self, level: ResetLevel) -> Result<bool, PowerError> {
        let t = match level {
            ResetLevel::Soft => &self.soft_reset,
            ResetLevel::Hard => &self.hard_reset,
        };
        match t {
            Some(t) => Ok(self.run(t).map(|_| true)?),
            None => Ok(false),
        }
    }

    fn settle(&self) -> Duration {
        self.settle
    }

    fn retries(&self) -> u32 {
        self.retries
    }
}
