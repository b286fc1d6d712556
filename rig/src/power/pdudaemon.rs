//! `pdudaemon`: power through a pdudaemon instance's HTTP API.
//!
//! Requests: `GET {url}/power/control/{on|off|reboot}?hostname={pdu}&port={port}[&delay=N]`.
//! pdudaemon answers as soon as the request is *queued* and runs the PDU driver
//! later; it has no status endpoint. So every action is read back with the host's
//! `status_command` (e.g. `snmpget` of the outlet, a vendor CLI, or for
//! pdudaemon's `localcmdline` driver a file the command writes), polled until it
//! shows the requested state or `settle_ms` passes. A non-2xx answer is an error
//! with pdudaemon's body in it.

use super::{
    parse_status, pattern, run_shell, substitute, DriverConfigError, PowerBackend, PowerError,
    PowerState,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A pdudaemon URL that is not `http://host[:port][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not http://.
    #[error("url `{0}`: only http:// is supported")]
    Scheme(String),
    /// The port is not a number.
    #[error("url `{url}`: bad port `{port}`")]
    Port {
        /// The URL.
        url: String,
        /// The port part.
        port: String,
    },
    /// No host.
    #[error("url `{0}`: no host")]
    NoHost(String),
}

/// A blocking HTTP GET failed. Each variant names the address.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is not usable.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The address could not be resolved.
    #[error("resolving {addr}: {source}")]
    Resolve {
        /// host:port.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// It resolved to nothing.
    #[error("{0}: no address")]
    NoAddress(String),
    /// Connecting, sending or reading failed.
    #[error("{what} {addr}: {source}")]
    Io {
        /// `connecting to pdudaemon at`, `sending to` or `reading from`.
        what: &'static str,
        /// host:port.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The answer is not HTTP.
    #[error("{addr}: not an HTTP response: {head:?}")]
    NotHttp {
        /// host:port.
        addr: String,
        /// The start of the answer.
        head: String,
    },
}

/// Split `http://host:port[/prefix]` into (host, port, prefix without trailing slash).
pub fn parse_url(url: &str) -> Result<(String, u16, String), UrlError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| UrlError::Scheme(url.to_string()))?;
    let (hostport, prefix) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>().map_err(|_| UrlError::Port {
                url: url.to_string(),
                port: p.to_string(),
            })?,
        ),
        None => (hostport, 16421),
    };
    if host.is_empty() {
        return Err(UrlError::NoHost(url.to_string()));
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
) -> Result<(u16, String), HttpError> {
    let (host, port, prefix) = parse_url(url)?;
    let addr = format!("{host}:{port}");
    let io = |what: &'static str, addr: &str| {
        let addr = addr.to_string();
        move |source| HttpError::Io { what, addr, source }
    };
    let addrs: Vec<_> = std::net::ToSocketAddrs::to_socket_addrs(&addr)
        .map_err(|source| HttpError::Resolve {
            addr: addr.clone(),
            source,
        })?
        .collect();
    let sa = addrs
        .first()
        .ok_or_else(|| HttpError::NoAddress(addr.clone()))?;
    let mut s =
        TcpStream::connect_timeout(sa, timeout).map_err(io("connecting to pdudaemon at", &addr))?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    let req = format!(
        "GET {prefix}{path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: hilrig-rig\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .map_err(io("sending to", &addr))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(io("reading from", &addr))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| HttpError::NotHttp {
            addr: addr.clone(),
            head: head.chars().take(80).collect(),
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
    pub fn new(host: &str, c: PdudaemonConfig) -> Result<PdudaemonPower, DriverConfigError> {
        parse_url(&c.url)?;
        let re = pattern;
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
    pub fn request(&self, action: &str) -> Result<(), PowerError> {
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
            Err(PowerError::Refused {
                url: self.url.clone(),
                code,
                action: action.to_string(),
                body: body.trim().chars().take(200).collect(),
            })
        }
    }
}

impl PowerBackend for PdudaemonPower {
    fn driver(&self) -> &'static str {
        "pdudaemon"
    }

    fn set(&mut self, state: PowerState) -> Result<(), PowerError> {
        self.request(match state {
            PowerState::On => "on",
            PowerState::Off => "off",
        })
    }

    fn status(&mut self) -> Result<PowerState, PowerError> {
        let cmd = substitute(&self.status_command, &self.host, &self.port, &self.pdu);
        let out = run_shell(&cmd, self.timeout)?;
        Ok(parse_status(&out, &self.on_re, &self.off_re)?)
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
