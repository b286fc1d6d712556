//! `pdudaemon`: power through a pdudaemon instance's HTTP API.
//!
//! Requests: `GET {url}/power/control/{on|off|reboot}?hostname={pdu}&port={port}[&delay=N]`.
//! pdudaemon answers as soon as the request is *queued* and runs the PDU driver
//! later; it has no status endpoint. So every action is read back with the host's
//! `status_command` (e.g. `snmpget` of the outlet, a vendor CLI, or for
//! pdudaemon's `localcmdline` driver a file the command writes), polled until it
//! shows the requested state or `settle_ms` passes. A non-2xx answer is an error
//! with pdudaemon's body in it.

use super::{parse_status, run_shell, substitute, PowerBackend, PowerState};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Split `http://host:port[/prefix]` into (host, port, prefix without trailing slash).
pub fn parse_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("url `{url}`: only http:// is supported"))?;
    let (hostport, prefix) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("url `{url}`: bad port `{p}`"))?,
        ),
        None => (hostport, 16421),
    };
    if host.is_empty() {
        return Err(format!("url `{url}`: no host"));
    }
    Ok((host.to_string(), port, prefix.to_string()))
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A blocking HTTP/1.1 GET; returns (status code, body).
pub fn http_get(
    url: &str,
    path_and_query: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let (host, port, prefix) = parse_url(url)?;
    let addr = format!("{host}:{port}");
    let addrs: Vec<_> = std::net::ToSocketAddrs::to_socket_addrs(&addr)
        .map_err(|e| format!("resolving {addr}: {e}"))?
        .collect();
    let sa = addrs.first().ok_or_else(|| format!("{addr}: no address"))?;
    let mut s = TcpStream::connect_timeout(sa, timeout)
        .map_err(|e| format!("connecting to pdudaemon at {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    let req = format!(
        "GET {prefix}{path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: hilrig-rig\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("sending to {addr}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("reading from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| {
            format!(
                "{addr}: not an HTTP response: {:?}",
                head.chars().take(80).collect::<String>()
            )
        })?;
    Ok((code, body.to_string()))
}

/// The pdudaemon driver.
pub struct PdudaemonPower {
    host: String,
    url: String,
    pdu: String,
    port: String,
    delay: Option<u32>,
    status_command: String,
    on_re: regex::Regex,
    off_re: regex::Regex,
    timeout: Duration,
    settle: Duration,
    retries: u32,
}

/// Settings (the inventory's `driver = "pdudaemon"` section).
#[derive(Debug, Clone)]
pub struct PdudaemonConfig {
    /// Base URL.
    pub url: String,
    /// PDU name in pdudaemon's config.
    pub pdu: String,
    /// Outlet.
    pub port: String,
    /// Reboot delay.
    pub delay: Option<u32>,
    /// Readback command template.
    pub status_command: String,
    /// On regex.
    pub on_pattern: String,
    /// Off regex.
    pub off_pattern: String,
    /// HTTP/command timeout.
    pub timeout: Duration,
    /// Readback settle time.
    pub settle: Duration,
    /// Attempts.
    pub retries: u32,
}

impl PdudaemonPower {
    /// Build for `host`.
    pub fn new(host: &str, c: PdudaemonConfig) -> Result<PdudaemonPower, String> {
        parse_url(&c.url)?;
        let re = |p: &str| regex::Regex::new(p).map_err(|e| format!("pattern {p:?}: {e}"));
        Ok(PdudaemonPower {
            host: host.to_string(),
            on_re: re(&c.on_pattern)?,
            off_re: re(&c.off_pattern)?,
            url: c.url,
            pdu: c.pdu,
            port: c.port,
            delay: c.delay,
            status_command: c.status_command,
            timeout: c.timeout,
            settle: c.settle,
            retries: c.retries,
        })
    }

    /// Queue `on`, `off` or `reboot` with pdudaemon.
    pub fn request(&self, action: &str) -> Result<(), String> {
        let mut q = format!(
            "/power/control/{action}?hostname={}&port={}",
            encode(&self.pdu),
            encode(&self.port)
        );
        if let Some(d) = self.delay {
            q.push_str(&format!("&delay={d}"));
        }
        let (code, body) = http_get(&self.url, &q, self.timeout)?;
        if (200..300).contains(&code) {
            Ok(())
        } else {
            Err(format!(
                "pdudaemon at {} answered {code} to {action}: {}",
                self.url,
                body.trim().chars().take(200).collect::<String>()
            ))
        }
    }
}

impl PowerBackend for PdudaemonPower {
    fn driver(&self) -> &'static str {
        "pdudaemon"
    }

    fn set(&mut self, state: PowerState) -> Result<(), String> {
        self.request(match state {
            PowerState::On => "on",
            PowerState::Off => "off",
        })
    }

    fn status(&mut self) -> Result<PowerState, String> {
        let cmd = substitute(&self.status_command, &self.host, &self.port, &self.pdu);
        let out = run_shell(&cmd, self.timeout)?;
        parse_status(&out, &self.on_re, &self.off_re)
    }

    fn settle(&self) -> Duration {
        self.settle
    }

    fn retries(&self) -> u32 {
        self.retries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:1234").unwrap(),
            ("127.0.0.1".into(), 1234, "".into())
        );
        assert_eq!(
            parse_url("http://pdu.lab/api/").unwrap(),
            ("pdu.lab".into(), 16421, "/api".into())
        );
        assert!(parse_url("https://x").is_err());
        assert!(parse_url("http://x:port").is_err());
        assert_eq!(encode("a b&c"), "a%20b%26c");
    }
}
