//! Places as rig hosts: a [`PlaceHost`] (the resources of a place) plus the
//! lab-wide [`LabgridConfig`] (what labgrid does not publish: the runner's SSH
//! key and pinned host keys, how to read a PDU outlet back) become an ordinary
//! rig [`Inventory`], so power, consoles, OOB and SSH go through the same drivers
//! as an inventory file's hosts:
//!
//! | labgrid resource | rig driver |
//! |---|---|
//! | `NetworkPowerPort` model `pdudaemon` | `pdudaemon` (readback: `[power] status_command`) |
//! | `NetworkPowerPort` any model, with `[power] on/off/status` | `command` (`{host}` = place, `{port}` = index) |
//! | `NetworkSerialPort` (not `oob`) | console driver `rfc2217` (or raw TCP) |
//! | `NetworkSerialPort` named `oob` | OOB driver `rfc2217` |
//! | `NetworkService` | `[host.ssh]`: address, port, username + `[ssh]` of the config |
//! | (config `[device.PLACE]`) | `[host.sim]` state, serial, counter_width + `[host.ssh] console`: the host's own device, read through the `oob` port, console captured through the first other `NetworkSerialPort` |
//!
//! The inventory is built as TOML and parsed by [`Inventory::parse`], so a place
//! gets exactly the validation of an inventory file; errors name
//! `labgrid://HOST:PORT` and the place.

use super::PlaceHost;
use crate::error::RigError;
use crate::inventory::Inventory;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Largest labgrid config file read (bytes).
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024;

/// What a lab tells hilrig about its labgrid places besides their resources
/// (`--labgrid-config FILE`, TOML). Relative paths are relative to the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabgridConfig {
    /// How the runner logs in to a place's `NetworkService`.
    #[serde(default)]
    pub ssh: Option<LabgridSsh>,
    /// How power is read back.
    #[serde(default)]
    pub power: LabgridPower,
    /// OOB reply timeout, ms (default 1000).
    #[serde(default)]
    pub oob_timeout_ms: Option<u64>,
    /// Each place's own device (`[device.PLACE]`), which labgrid does not
    /// describe: its state file on the host, its serial number (checked over
    /// the OOB port before each use), and the tty its VMM writes the console to.
    #[serde(default)]
    pub device: std::collections::BTreeMap<String, LabgridDevice>,
}

/// `[device.PLACE]` of a labgrid config: the device of a place whose host keeps
/// it (its counters read through the place's `oob` NetworkSerialPort, its
/// console captured through the place's first other NetworkSerialPort).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabgridDevice {
    /// The device state file on the host (relative: under `[ssh] workdir`).
    pub state: String,
    /// The device's serial number (IDENTIFY over the OOB port must answer it).
    pub serial: u64,
    /// Its counter width (default 16, as an inventory's `[host.sim]`).
    #[serde(default)]
    pub counter_width: Option<u8>,
    /// The tty on the host the VMM writes its console to, wired to the place's
    /// console NetworkSerialPort (relative: under `[ssh] workdir`). Without it
    /// the console is a file fetched back with each step.
    #[serde(default)]
    pub console: Option<String>,
    /// Who owns `console` on the host (the exporter's or ser2net's user, a name
    /// or a uid): `[host.ssh] console_owner`.
    #[serde(default)]
    pub console_owner: Option<hilrig_vmm_api::ConsoleOwner>,
}

/// `path` on a host: absolute as given, else under `workdir`.
fn on_host(workdir: &str, path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{path}", workdir.trim_end_matches('/'))
    }
}

/// `[ssh]` of a labgrid config: the runner's side of every place's SSH service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabgridSsh {
    /// Private key (key authentication only).
    pub identity: PathBuf,
    /// The pinned known_hosts holding the places' host keys.
    pub known_hosts: PathBuf,
    /// Work directory on the hosts (absolute); `{user}` is replaced by the
    /// place's `NetworkService` user name (hosts whose users each own their
    /// own directory, e.g. `/home/{user}/hilrig`).
    pub workdir: String,
    /// Where the runner's build is kept there (default `<workdir>/bin/hilrig`;
    /// `{user}` as in `workdir`).
    #[serde(default)]
    pub hilrig: Option<String>,
    /// Seconds to wait for a connection.
    #[serde(default)]
    pub connect_timeout_s: Option<u32>,
}

/// `[power]` of a labgrid config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabgridPower {
    /// For `pdudaemon` power ports: the command reading the outlet back
    /// (`{host}` = place, `{pdu}`, `{port}` = index).
    #[serde(default)]
    pub status_command: Option<String>,
    /// Power commands for any power port model (`{host}`, `{port}`): all three
    /// together, or none.
    #[serde(default)]
    pub on: Option<String>,
    /// See `on`.
    #[serde(default)]
    pub off: Option<String>,
    /// See `on`.
    #[serde(default)]
    pub status: Option<String>,
    /// Regex meaning "on" in the status output.
    #[serde(default)]
    pub on_pattern: Option<String>,
    /// Regex meaning "off" in the status output.
    #[serde(default)]
    pub off_pattern: Option<String>,
    /// How long a state may take to show in the readback, ms.
    #[serde(default)]
    pub settle_ms: Option<u64>,
}

impl LabgridConfig {
    /// Read a config file (a regular file of at most [`MAX_CONFIG_BYTES`]).
    pub fn load(path: &Path) -> Result<LabgridConfig, RigError> {
        let err = |detail: String| RigError::Inventory {
            file: path.to_path_buf(),
            host: None,
            driver: Some("labgrid".into()),
            detail,
        };
        let text = hilrig_device::secure::read_bounded(path, MAX_CONFIG_BYTES)
            .map_err(|e| err(format!("cannot read: {e}")))?;
        let mut c: LabgridConfig = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(s) = &mut c.ssh {
            for p in [&mut s.identity, &mut s.known_hosts] {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        let p = &c.power;
        let n = [&p.on, &p.off, &p.status]
            .iter()
            .filter(|x| x.is_some())
            .count();
        if n != 0 && n != 3 {
            return Err(err("[power]: give on, off and status together".into()));
        }
        for (place, d) in &c.device {
            let paths = std::iter::once(&d.state).chain(d.console.as_ref());
            for p in paths {
                if p.trim().is_empty() || p.contains('\0') || p.contains('\n') {
                    return Err(err(format!("[device.{place}]: bad path {p:?}")));
                }
                if !p.starts_with('/') && c.ssh.is_none() {
                    return Err(err(format!(
                        "[device.{place}]: {p:?} is relative but there is no [ssh] workdir"
                    )));
                }
            }
        }
        Ok(c)
    }
}

fn s(v: impl Into<String>) -> toml::Value {
    toml::Value::String(v.into())
}

/// `sh` commands that fail with `why` (a place whose power cannot be driven: any
/// power action is an error naming the place, never a silent success).
fn failing(why: &str) -> String {
    format!("echo {} >&2; exit 1", crate::remote::shell_quote(why))
}

/// The TOML `[[host]]` table of one place.
pub fn host_table(h: &PlaceHost, cfg: &LabgridConfig) -> toml::Table {
    let mut t = toml::Table::new();
    t.insert("name".into(), s(&h.place));
    let mut tags = vec![s("labgrid")];
    for (k, v) in &h.tags {
        tags.push(s(v));
        tags.push(s(format!("{k}={v}")));
    }
    t.insert("tags".into(), toml::Value::Array(tags));
    if let Some(d) = h.tags.get("device") {
        if matches!(d.as_str(), "model" | "rtl" | "lockstep") {
            t.insert("device".into(), s(d));
        }
    }
    let mut power = toml::Table::new();
    let pc = &cfg.power;
    let patterns = |power: &mut toml::Table| {
        if let Some(p) = &pc.on_pattern {
            power.insert("on_pattern".into(), s(p));
        }
        if let Some(p) = &pc.off_pattern {
            power.insert("off_pattern".into(), s(p));
        }
        if let Some(ms) = pc.settle_ms {
            power.insert(
                "settle_ms".into(),
                toml::Value::Integer(i64::try_from(ms).unwrap_or(i64::MAX)),
            );
        }
    };
    match (&h.power, h.power.as_ref().and_then(|p| p.pdudaemon())) {
        (Some(_), Some((url, pdu, port))) if pc.status_command.is_some() => {
            power.insert("driver".into(), s("pdudaemon"));
            power.insert("url".into(), s(url));
            power.insert("pdu".into(), s(pdu));
            power.insert("port".into(), s(port));
            power.insert(
                "status_command".into(),
                s(pc.status_command.clone().unwrap_or_default()),
            );
            patterns(&mut power);
        }
        (Some(p), _) if pc.on.is_some() => {
            power.insert("driver".into(), s("command"));
            power.insert("on".into(), s(pc.on.clone().unwrap_or_default()));
            power.insert("off".into(), s(pc.off.clone().unwrap_or_default()));
            power.insert("status".into(), s(pc.status.clone().unwrap_or_default()));
            power.insert("port".into(), s(&p.index));
            patterns(&mut power);
        }
        (p, _) => {
            let why = match p {
                None => format!("labgrid place {}: no NetworkPowerPort", h.place),
                Some(p) if p.model == "pdudaemon" => format!(
                    "labgrid place {}: pdudaemon power port {} {} cannot be read back \
                     (set [power] status_command in the labgrid config)",
                    h.place, p.host, p.index
                ),
                Some(p) => format!(
                    "labgrid place {}: power model {} is driven by hilrig only through \
                     [power] on/off/status commands in the labgrid config",
                    h.place, p.model
                ),
            };
            power.insert("driver".into(), s("command"));
            for k in ["on", "off", "status"] {
                power.insert(k.into(), s(failing(&why)));
            }
        }
    }
    t.insert("power".into(), toml::Value::Table(power));
    let consoles: Vec<toml::Value> = h
        .consoles
        .iter()
        .map(|c| {
            let mut ct = toml::Table::new();
            ct.insert("name".into(), s(&c.name));
            ct.insert("driver".into(), s("rfc2217"));
            ct.insert("host".into(), s(&c.host));
            ct.insert("port".into(), toml::Value::Integer(c.port.into()));
            ct.insert("baud".into(), toml::Value::Integer(c.speed.into()));
            ct.insert("raw".into(), toml::Value::Boolean(c.protocol == "raw"));
            toml::Value::Table(ct)
        })
        .collect();
    if !consoles.is_empty() {
        t.insert("console".into(), toml::Value::Array(consoles));
    }
    if let Some(o) = &h.oob {
        let mut ot = toml::Table::new();
        ot.insert("driver".into(), s("rfc2217"));
        ot.insert("host".into(), s(&o.host));
        ot.insert("port".into(), toml::Value::Integer(o.port.into()));
        ot.insert("baud".into(), toml::Value::Integer(o.speed.into()));
        ot.insert("raw".into(), toml::Value::Boolean(o.protocol == "raw"));
        if let Some(ms) = cfg.oob_timeout_ms {
            ot.insert(
                "timeout_ms".into(),
                toml::Value::Integer(i64::try_from(ms).unwrap_or(i64::MAX)),
            );
        }
        t.insert("oob".into(), toml::Value::Table(ot));
    }
    if let (Some(svc), Some(c)) = (&h.ssh, &cfg.ssh) {
        let mut st = toml::Table::new();
        st.insert("address".into(), s(&svc.address));
        st.insert("port".into(), toml::Value::Integer(svc.port.into()));
        st.insert("user".into(), s(&svc.username));
        st.insert("identity".into(), s(c.identity.display().to_string()));
        st.insert("known_hosts".into(), s(c.known_hosts.display().to_string()));
        let for_user = |p: &str| p.replace("{user}", &svc.username);
        st.insert("workdir".into(), s(for_user(&c.workdir)));
        if let Some(p) = &c.hilrig {
            st.insert("hilrig".into(), s(for_user(p)));
        }
        if let Some(n) = c.connect_timeout_s {
            st.insert("connect_timeout_s".into(), toml::Value::Integer(n.into()));
        }
        if let Some(d) = cfg.device.get(&h.place) {
            if let Some(tty) = &d.console {
                st.insert("console".into(), s(on_host(&c.workdir, tty)));
            }
            match &d.console_owner {
                Some(hilrig_vmm_api::ConsoleOwner::Uid(u)) => {
                    st.insert("console_owner".into(), toml::Value::Integer((*u).into()));
                }
                Some(o) => {
                    st.insert("console_owner".into(), s(o.to_string()));
                }
                None => {}
            }
        }
        t.insert("ssh".into(), toml::Value::Table(st));
    }
    if let Some(d) = cfg.device.get(&h.place) {
        let workdir = cfg.ssh.as_ref().map(|c| c.workdir.as_str()).unwrap_or("/");
        let mut sim = toml::Table::new();
        sim.insert("state".into(), s(on_host(workdir, &d.state)));
        sim.insert(
            "serial".into(),
            toml::Value::Integer(i64::try_from(d.serial).unwrap_or(i64::MAX)),
        );
        if let Some(w) = d.counter_width {
            sim.insert("counter_width".into(), toml::Value::Integer(w.into()));
        }
        t.insert("sim".into(), toml::Value::Table(sim));
    }
    t
}

/// The places as a rig inventory (validated like an inventory file, named
/// `labgrid://ADDR`). A place that publishes an SSH service when the config has
/// no `[ssh]` is refused: hilrig would otherwise run its cases on this machine.
pub fn places_inventory(
    addr: &str,
    places: &[PlaceHost],
    cfg: &LabgridConfig,
) -> Result<Inventory, RigError> {
    let file = PathBuf::from(format!("labgrid://{addr}"));
    let mut hosts = Vec::new();
    for h in places {
        if h.ssh.is_some() && cfg.ssh.is_none() {
            return Err(RigError::Inventory {
                file,
                host: Some(h.place.clone()),
                driver: Some("ssh".into()),
                detail: "the place publishes a NetworkService (SSH) but the labgrid config has \
                         no [ssh] (identity, known_hosts, workdir)"
                    .into(),
            });
        }
        hosts.push(toml::Value::Table(host_table(h, cfg)));
    }
    let mut root = toml::Table::new();
    root.insert("host".into(), toml::Value::Array(hosts));
    let text = toml::to_string(&root).map_err(|e| RigError::Inventory {
        file: file.clone(),
        host: None,
        driver: Some("labgrid".into()),
        detail: e.to_string(),
    })?;
    Inventory::parse(&text, &file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{ConsoleDriver, OobSpec, PowerSpec};
    use crate::labgrid::{NetSerial, PowerPort, SshService};

    fn place() -> PlaceHost {
        PlaceHost {
            place: "lab-1".into(),
            tags: [("hilrig".to_string(), "sim".to_string())].into(),
            power: Some(PowerPort {
                model: "pdudaemon".into(),
                host: "http://127.0.0.1:16421/pdu-a".into(),
                index: "3".into(),
            }),
            consoles: vec![NetSerial {
                name: "NetworkSerialPort".into(),
                host: "127.0.0.1".into(),
                port: 40001,
                speed: 115_200,
                protocol: "rfc2217".into(),
            }],
            oob: Some(NetSerial {
                name: "oob".into(),
                host: "127.0.0.1".into(),
                port: 40002,
                speed: 115_200,
                protocol: "raw".into(),
            }),
            ssh: Some(SshService {
                address: "127.0.0.11".into(),
                username: "hls-1".into(),
                port: 2222,
            }),
        }
    }

    #[test]
    fn a_place_maps_to_rig_drivers() {
        let cfg = LabgridConfig {
            ssh: Some(LabgridSsh {
                identity: "/k/id".into(),
                known_hosts: "/k/kh".into(),
                workdir: "/w".into(),
                hilrig: None,
                connect_timeout_s: None,
            }),
            power: LabgridPower {
                status_command: Some("cat /s/{port}".into()),
                ..Default::default()
            },
            oob_timeout_ms: None,
            device: [(
                "lab-1".to_string(),
                LabgridDevice {
                    state: "device.state".into(),
                    serial: 2001,
                    counter_width: None,
                    console: Some("/dev/pts/9".into()),
                    console_owner: Some(hilrig_vmm_api::ConsoleOwner::User("ser2net".into())),
                },
            )]
            .into(),
        };
        let inv = places_inventory("127.0.0.1:1", &[place()], &cfg).unwrap();
        let h = inv.host("lab-1").unwrap();
        assert!(h.tags.contains("hilrig=sim") && h.tags.contains("labgrid"));
        match &h.power {
            PowerSpec::Pdudaemon { url, pdu, port, .. } => {
                assert_eq!(
                    (url.as_str(), pdu.as_str(), port.as_str()),
                    ("http://127.0.0.1:16421", "pdu-a", "3")
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            &h.consoles[0].driver,
            ConsoleDriver::Rfc2217 {
                port: 40001,
                raw: false,
                ..
            }
        ));
        assert!(matches!(
            &h.oob,
            Some(OobSpec::Rfc2217 {
                port: 40002,
                raw: true,
                ..
            })
        ));
        let ssh = h.ssh.as_ref().unwrap();
        assert_eq!(
            (ssh.address.as_str(), ssh.port, ssh.user.as_str()),
            ("127.0.0.11", 2222, "hls-1")
        );
        // The place's own device ([device.lab-1]): state under the workdir,
        // serial, the VMM's console tty.
        assert_eq!(
            h.sim.state.as_deref(),
            Some(std::path::Path::new("/w/device.state"))
        );
        assert_eq!((h.sim.serial, h.sim.counter_width), (Some(2001), 16));
        assert_eq!(ssh.console.as_deref(), Some("/dev/pts/9"));
        assert_eq!(
            ssh.console_owner,
            Some(hilrig_vmm_api::ConsoleOwner::User("ser2net".into()))
        );
    }

    #[test]
    fn device_sections_are_checked_when_loaded() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("lg.toml");
        for (bad, why) in [
            (
                "[device.p]\nstate = \"s\"\nserial = 1\n",
                "no [ssh] workdir",
            ),
            ("[device.p]\nstate = \"\"\nserial = 1\n", "bad path"),
            ("[device.p]\nstate = \"/s\"\n", "serial"),
            ("[device.p]\nstate = \"/s\"\nserial = 1\nfoo = 2\n", "foo"),
        ] {
            std::fs::write(&f, bad).unwrap();
            let e = LabgridConfig::load(&f).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        std::fs::write(&f, "[device.p]\nstate = \"/s\"\nserial = 1\n").unwrap();
        assert_eq!(LabgridConfig::load(&f).unwrap().device["p"].serial, 1);
    }

    #[test]
    fn unusable_places_are_clear_errors_or_failing_drivers() {
        // SSH published, no [ssh] configured: refused (never run locally).
        let e = places_inventory("127.0.0.1:1", &[place()], &LabgridConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("labgrid://127.0.0.1:1") && e.contains("lab-1") && e.contains("[ssh]"),
            "{e}"
        );
        // A pdudaemon port without a readback: power fails with the reason.
        let mut p = place();
        p.ssh = None;
        let inv = places_inventory("127.0.0.1:1", &[p.clone()], &LabgridConfig::default()).unwrap();
        match &inv.host("lab-1").unwrap().power {
            PowerSpec::Command { status, .. } => {
                assert!(
                    status.contains("status_command") && status.contains("exit 1"),
                    "{status}"
                )
            }
            other => panic!("{other:?}"),
        }
        // A place name hilrig cannot use as a host name.
        p.place = "../x".into();
        let e = places_inventory("127.0.0.1:1", &[p], &LabgridConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("labgrid://"), "{e}");
    }

    #[test]
    fn workdir_and_build_per_service_user() {
        let cfg = |workdir: &str| LabgridConfig {
            ssh: Some(LabgridSsh {
                identity: "/k/id".into(),
                known_hosts: "/k/kh".into(),
                workdir: workdir.into(),
                hilrig: Some("/opt/{user}/hilrig".into()),
                connect_timeout_s: None,
            }),
            ..Default::default()
        };
        let inv = places_inventory("127.0.0.1:1", &[place()], &cfg("/home/{user}/w")).unwrap();
        let ssh = inv.host("lab-1").unwrap().ssh.clone().unwrap();
        assert_eq!(ssh.workdir, "/home/hls-1/w");
        assert_eq!(ssh.hilrig.as_deref(), Some("/opt/hls-1/hilrig"));
        // A user name that would climb out of the directory is refused.
        let mut p = place();
        if let Some(svc) = p.ssh.as_mut() {
            svc.username = "..".into();
        }
        let e = places_inventory("127.0.0.1:1", &[p], &cfg("/home/{user}/w"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lab-1"), "{e}");
    }
}
