//! labgrid as the lab's reservation engine (issue 17 item 4): a client of a labgrid
//! coordinator (labgrid >= 24, gRPC; `rig/proto/labgrid-coordinator.proto`).
//!
//! A [`Coordinator`] opens a client session (the `ClientStream` with the user name
//! the coordinator knows us by, subscribed to places and resources) and, on the
//! same connection, reserves places by tags (`CreateReservation` /
//! `PollReservation`), acquires and releases them (`AcquirePlace` /
//! `ReleasePlace`), and maps a place's resources to what hilrig drives
//! ([`PlaceHost`]: `NetworkPowerPort` -> power, `NetworkSerialPort` -> consoles and
//! the OOB port (the one named `oob`), `NetworkService` -> the host's SSH address).
//!
//! A place acquired by someone else is never touched: [`Coordinator::acquire`] and
//! [`Coordinator::release`] read the place first and refuse with
//! [`LabgridError::AcquiredByOther`] without sending anything that changes it, and
//! releases carry `fromuser` so the coordinator itself ignores a release of a
//! place that changed hands in between.
//!
//! The client is blocking (it owns a small tokio runtime): do not create or drop
//! it on a tokio worker thread.

pub mod map;
pub use map::{places_inventory, LabgridConfig, LabgridPower, LabgridSsh};

pub mod proto {
    //! Generated from `rig/proto/labgrid-coordinator.proto`.
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("labgrid");
}

use proto::coordinator_client::CoordinatorClient;
use proto::{client_in_message, map_value, subscribe, update_response};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Errors of the labgrid client.
#[derive(Debug, thiserror::Error)]
pub enum LabgridError {
    /// `--labgrid` is not `HOST:PORT`.
    #[error("labgrid coordinator address {0:?}: expected HOST:PORT (e.g. 127.0.0.1:20408)")]
    BadAddress(String),
    /// The coordinator could not be reached.
    #[error("labgrid coordinator {addr}: {what}: {detail}")]
    Connect {
        /// Address.
        addr: String,
        /// What was being done.
        what: String,
        /// Cause.
        detail: String,
    },
    /// A call failed.
    #[error("labgrid coordinator {addr}: {call}: {status}")]
    Call {
        /// Address.
        addr: String,
        /// The call (with its place).
        call: String,
        /// The gRPC status.
        status: Box<tonic::Status>,
    },
    /// A call or the session did not answer in time.
    #[error("labgrid coordinator {addr}: {what}: no answer within {after:?}")]
    Timeout {
        /// Address.
        addr: String,
        /// What was waited for.
        what: String,
        /// How long.
        after: Duration,
    },
    /// The place does not exist.
    #[error("labgrid place `{0}` does not exist")]
    NoPlace(String),
    /// No place carries the tags a reservation asks for (a typo, a place not
    /// created or tagged yet): nothing to wait for.
    #[error("no labgrid place carries the tags {filter} (places: {places})")]
    NoTaggedPlace {
        /// The tag filter (`k=v ...`).
        filter: String,
        /// The places there are, with their tags.
        places: String,
    },
    /// The place is held by another user: hilrig does not touch it.
    #[error("labgrid place `{place}` is acquired by {by}, not by us ({us}): left alone")]
    AcquiredByOther {
        /// The place.
        place: String,
        /// Its holder.
        by: String,
        /// Our user name.
        us: String,
    },
    /// The place is not acquired by us (release).
    #[error("labgrid place `{0}` is not acquired")]
    NotAcquired(String),
    /// A reservation ended without a place.
    #[error("labgrid reservation {token} ({filter}): {state}")]
    Reservation {
        /// Token.
        token: String,
        /// The tag filter.
        filter: String,
        /// What happened (expired, invalid, no place in time).
        state: String,
    },
    /// A resource of a place does not make sense for hilrig.
    #[error("labgrid place `{place}`: resource {resource}: {what}")]
    Resource {
        /// The place.
        place: String,
        /// `exporter/group/class/name`.
        resource: String,
        /// What is wrong.
        what: String,
    },
    /// The place's resources were not all published and available in time
    /// (`--labgrid-wait`). When a match was never satisfied by anything this
    /// session saw published, the exporter is not running or serves something
    /// else than the place's matches name: a setup error (CONFIG). When the
    /// exporter publishes them but cannot serve them now (not available, no
    /// TCP port), or withdrew resources this session saw (it crashed or was
    /// stopped): the lab's fault (`lab_fault`, INFRA).
    #[error(
        "labgrid place `{place}`: not published by its exporter within {after:?}: {}{}",
        .missing.join(", "),
        if *.lab_fault { " (the exporter published them before, or cannot serve them now: the lab's fault)" } else { " (never seen published in this session: check the place's matches and the exporter's config; an exporter that went down before this session started looks the same)" }
    )]
    NotPublished {
        /// The place.
        place: String,
        /// What is missing: a match no published resource satisfies
        /// (`exporter/group/class[/name]: not published`, `... withdrawn` when
        /// it was published earlier in the session), or a matched resource
        /// that is not available (`exporter/group/class/name: not available`).
        missing: Vec<String>,
        /// How long was waited.
        after: Duration,
        /// Every missing item is one the exporter published (now withdrawn,
        /// not available, or without its port): INFRA, not CONFIG.
        lab_fault: bool,
    },
    /// The client runtime could not start.
    #[error("labgrid client runtime: {0}")]
    Runtime(std::io::Error),
    /// A place could not be turned into rig drivers, or the labgrid config is bad.
    #[error(transparent)]
    Rig(Box<crate::error::RigError>),
}

impl From<crate::error::RigError> for LabgridError {
    fn from(e: crate::error::RigError) -> LabgridError {
        LabgridError::Rig(Box::new(e))
    }
}

impl LabgridError {
    /// The class of this error, as a runner treats it: a place that does not
    /// exist, whose resources are not published or make no sense, or a bad
    /// address or config is [`ErrorKind::Config`](crate::error::ErrorKind::Config);
    /// a place acquired by someone else is `Busy`; the rest (the coordinator
    /// unreachable or failing) is `Infra`.
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            LabgridError::BadAddress(_)
            | LabgridError::NoPlace(_)
            | LabgridError::NoTaggedPlace { .. }
            | LabgridError::NotPublished {
                lab_fault: false, ..
            }
            | LabgridError::Resource { .. } => ErrorKind::Config,
            LabgridError::NotPublished {
                lab_fault: true, ..
            } => ErrorKind::Infra,
            LabgridError::AcquiredByOther { .. } => ErrorKind::Busy,
            LabgridError::Rig(e) => e.kind(),
            LabgridError::Connect { .. }
            | LabgridError::Call { .. }
            | LabgridError::Timeout { .. }
            | LabgridError::NotAcquired(_)
            | LabgridError::Reservation { .. }
            | LabgridError::Runtime(_) => ErrorKind::Infra,
        }
    }
}

type Result<T> = std::result::Result<T, LabgridError>;

/// Check `HOST:PORT` (host: a name or IPv4 address, or `[v6]`; port 1-65535).
pub fn check_address(addr: &str) -> Result<()> {
    let bad = || LabgridError::BadAddress(addr.chars().take(100).collect());
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    };
    if port == 0 || !host_ok {
        return Err(bad());
    }
    Ok(())
}

/// labgrid's reservation states (`ReservationState` of labgrid's coordinator).
pub mod reservation_state {
    /// Waiting for a place.
    pub const WAITING: i32 = 0;
    /// A place is allocated to it.
    pub const ALLOCATED: i32 = 1;
    /// Its place was acquired.
    pub const ACQUIRED: i32 = 2;
    /// Expired (not polled in time).
    pub const EXPIRED: i32 = 3;
    /// Invalid (its place was deleted).
    pub const INVALID: i32 = 4;
}

/// What the session has seen.
#[derive(Default)]
struct View {
    resources: BTreeMap<(String, String, String), proto::Resource>,
    /// Resources this session saw published and then deleted (their exporter
    /// went away or unpublished them); published again: no longer listed.
    withdrawn: BTreeMap<(String, String, String), proto::Resource>,
    synced: u64,
    closed: Option<String>,
}

/// A connected labgrid client session.
pub struct Coordinator {
    rt: tokio::runtime::Runtime,
    client: CoordinatorClient<tonic::transport::Channel>,
    tx: tokio::sync::mpsc::Sender<proto::ClientInMessage>,
    view: Arc<Mutex<View>>,
    addr: String,
    user: String,
    timeout: Duration,
    sync_id: u64,
}

/// A granted reservation.
#[derive(Debug, Clone, PartialEq)]
pub struct Reserved {
    /// The reservation token (cancel it when done).
    pub token: String,
    /// The allocated place.
    pub place: String,
}

/// A power port of a place (`NetworkPowerPort`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PowerPort {
    /// labgrid's power model (`pdudaemon`, `gude`, ...).
    pub model: String,
    /// The PDU host (for `pdudaemon`: `http://HOST:PORT/PDU`).
    pub host: String,
    /// The outlet.
    pub index: String,
}

impl PowerPort {
    /// For labgrid's `pdudaemon` model: pdudaemon's base URL, the PDU name and the
    /// outlet (the rig's `pdudaemon` power driver). `None` for other models.
    pub fn pdudaemon(&self) -> Option<(String, String, String)> {
        if self.model != "pdudaemon" {
            return None;
        }
        let rest = self.host.strip_prefix("http://")?;
        let (hostport, pdu) = rest.split_once('/')?;
        if hostport.is_empty() || pdu.is_empty() || pdu.contains('/') {
            return None;
        }
        Some((
            format!("http://{hostport}"),
            pdu.to_string(),
            self.index.clone(),
        ))
    }
}

/// A serial port of a place served over the network (`NetworkSerialPort`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSerial {
    /// The resource name (`oob` is the OOB port; the rest are consoles).
    pub name: String,
    /// Host.
    pub host: String,
    /// TCP port. 0 only in a listing of a place nobody holds ([`place_listing`]):
    /// labgrid's exporter starts ser2net, and publishes its port, only while
    /// the place is acquired.
    pub port: u16,
    /// Baud rate.
    pub speed: u32,
    /// `rfc2217` (default) or `raw`.
    pub protocol: String,
}

/// The SSH address of a place's host (`NetworkService`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshService {
    /// Address.
    pub address: String,
    /// User.
    pub username: String,
    /// Port (default 22).
    pub port: u16,
}

/// A place mapped to what hilrig drives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceHost {
    /// The place (the host's name).
    pub place: String,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
    /// Power.
    pub power: Option<PowerPort>,
    /// Consoles.
    pub consoles: Vec<NetSerial>,
    /// The OOB port.
    pub oob: Option<NetSerial>,
    /// SSH.
    pub ssh: Option<SshService>,
}

/// True when `place` satisfies a reservation filter of `tags`, as labgrid's
/// scheduler matches one: each `k=v` is a tag of the place, or `name=` its name.
pub fn carries(place: &proto::Place, tags: &BTreeMap<String, String>) -> bool {
    tags.iter()
        .all(|(k, v)| place.tags.get(k) == Some(v) || (k == "name" && place.name == *v))
}

/// Who holds `place` (`None`: free; the coordinator sends an empty string for a
/// free place).
pub fn holder(place: &proto::Place) -> Option<&str> {
    place.acquired.as_deref().filter(|s| !s.is_empty())
}

/// The user name labgrid-client would use here: `LG_HOSTNAME` (else the host
/// name) `/` `LG_USERNAME` (else `$USER`), so a place acquired with
/// labgrid-client by the same person counts as ours.
pub fn default_user() -> String {
    let env = |k: &str| std::env::var(k).ok().filter(|s| !s.is_empty());
    let host = env("LG_HOSTNAME").unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "localhost".into())
    });
    let user = env("LG_USERNAME")
        .or_else(|| env("USER"))
        .unwrap_or_else(|| "hilrig".into());
    format!("{host}/{user}")
}

/// fnmatch-style `*` / `?` match (labgrid's place match patterns).
pub fn glob(pattern: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), s.chars().collect());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

fn param_str(r: &proto::Resource, key: &str) -> Option<String> {
    match r.params.get(key)?.kind.as_ref()? {
        map_value::Kind::StringValue(s) => Some(s.clone()),
        map_value::Kind::IntValue(i) => Some(i.to_string()),
        map_value::Kind::UintValue(u) => Some(u.to_string()),
        map_value::Kind::FloatValue(f) => Some(f.to_string()),
        map_value::Kind::BoolValue(b) => Some(b.to_string()),
    }
}

fn param_int(r: &proto::Resource, key: &str) -> Option<i128> {
    match r.params.get(key)?.kind.as_ref()? {
        map_value::Kind::IntValue(i) => Some(i128::from(*i)),
        map_value::Kind::UintValue(u) => Some(i128::from(*u)),
        map_value::Kind::StringValue(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn matches(
    m: &proto::ResourceMatch,
    (exporter, group, name): &(String, String, String),
    r: &proto::Resource,
) -> bool {
    glob(&m.exporter, exporter)
        && glob(&m.group, group)
        && glob(&m.cls, &r.cls)
        && m.name.as_deref().is_none_or(|n| glob(n, name))
}

/// What `place` still lacks among `resources`: each of its matches that no
/// published resource satisfies (`exporter/group/class[/name]: not published`),
/// and each matched resource that is not available (`avail` false:
/// `exporter/group/class/name: not available`). Empty: every resource the
/// place's matches name is published and available. A place without matches
/// lacks nothing.
pub fn missing(
    place: &proto::Place,
    resources: &BTreeMap<(String, String, String), proto::Resource>,
) -> Vec<String> {
    let mut out = Vec::new();
    for m in &place.matches {
        let mut any = false;
        for (k, r) in resources {
            if matches(m, k, r) {
                any = true;
                if !r.avail {
                    out.push(format!("{}/{}/{}/{}: not available", k.0, k.1, r.cls, k.2));
                } else if holder(place).is_some()
                    && r.cls == "NetworkSerialPort"
                    && param_int(r, "port").is_none()
                {
                    // Acquired, but its exporter has not started ser2net (and
                    // published the port) yet.
                    out.push(format!(
                        "{}/{}/{}/{}: no TCP port served yet",
                        k.0, k.1, r.cls, k.2
                    ));
                }
            }
        }
        if !any {
            let name = m
                .name
                .as_deref()
                .map(|n| format!("/{n}"))
                .unwrap_or_default();
            out.push(format!(
                "{}/{}/{}{name}: not published",
                m.exporter, m.group, m.cls
            ));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Map the resources matched by `place` to a [`PlaceHost`].
pub fn place_host(
    place: &proto::Place,
    resources: &BTreeMap<(String, String, String), proto::Resource>,
) -> Result<PlaceHost> {
    map_place(place, resources, false)
}

/// [`place_host`] for a listing: a `NetworkSerialPort` without a TCP port (a
/// place nobody holds: its exporter serves the port only while the place is
/// acquired) is listed with port 0, not refused.
pub fn place_listing(
    place: &proto::Place,
    resources: &BTreeMap<(String, String, String), proto::Resource>,
) -> Result<PlaceHost> {
    map_place(place, resources, true)
}

fn map_place(
    place: &proto::Place,
    resources: &BTreeMap<(String, String, String), proto::Resource>,
    listing: bool,
) -> Result<PlaceHost> {
    let mut h = PlaceHost {
        place: place.name.clone(),
        tags: place.tags.clone().into_iter().collect(),
        power: None,
        consoles: Vec::new(),
        oob: None,
        ssh: None,
    };
    for (key, r) in resources {
        if !place.matches.iter().any(|m| matches(m, key, r)) {
            continue;
        }
        let (exporter, group, name) = key;
        let rid = format!("{exporter}/{group}/{}/{name}", r.cls);
        let bad = |what: String| LabgridError::Resource {
            place: place.name.clone(),
            resource: rid.clone(),
            what,
        };
        let need = |k: &str| param_str(r, k).ok_or_else(|| bad(format!("missing `{k}`")));
        match r.cls.as_str() {
            "NetworkPowerPort" => {
                if h.power.is_some() {
                    return Err(bad("a second power port (one per place)".into()));
                }
                h.power = Some(PowerPort {
                    model: need("model")?,
                    host: need("host")?,
                    index: need("index")?,
                });
            }
            "NetworkSerialPort" => {
                let port = match param_int(r, "port") {
                    None if listing
                        && !r.params.get("port").is_some_and(|v| {
                            matches!(v.kind, Some(map_value::Kind::StringValue(_)))
                        }) =>
                    {
                        0
                    }
                    p => p
                        .and_then(|p| u16::try_from(p).ok())
                        .filter(|p| *p > 0)
                        .ok_or_else(|| bad("`port` missing or not a TCP port".into()))?,
                };
                let speed = match param_int(r, "speed") {
                    None => 115_200,
                    Some(s) => u32::try_from(s)
                        .ok()
                        .filter(|s| *s > 0)
                        .ok_or_else(|| bad(format!("bad `speed` {s}")))?,
                };
                let protocol = param_str(r, "protocol").unwrap_or_else(|| "rfc2217".into());
                if protocol != "rfc2217" && protocol != "raw" {
                    return Err(bad(format!("unknown protocol {protocol:?}")));
                }
                let s = NetSerial {
                    name: name.clone(),
                    host: need("host")?,
                    port,
                    speed,
                    protocol,
                };
                if name == "oob" {
                    h.oob = Some(s);
                } else {
                    h.consoles.push(s);
                }
            }
            "NetworkService" => {
                let port = match param_int(r, "port") {
                    None => 22,
                    Some(p) => u16::try_from(p)
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| bad(format!("bad `port` {p}")))?,
                };
                h.ssh = Some(SshService {
                    address: need("address")?,
                    username: need("username")?,
                    port,
                });
            }
            _ => {} // other resources are not hilrig's business
        }
    }
    Ok(h)
}

impl Coordinator {
    /// Connect to the coordinator at `addr` (`HOST:PORT`) as `user` (labgrid's
    /// convention: `<hostname>/<user>`), with `timeout` for each call.
    pub fn connect(addr: &str, user: &str, timeout: Duration) -> Result<Coordinator> {
        check_address(addr)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(LabgridError::Runtime)?;
        let conn = |what: &str, detail: String| LabgridError::Connect {
            addr: addr.to_string(),
            what: what.to_string(),
            detail,
        };
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| conn("address", e.to_string()))?
            .connect_timeout(timeout);
        let channel = rt
            .block_on(async { tokio::time::timeout(timeout, endpoint.connect()).await })
            .map_err(|_| LabgridError::Timeout {
                addr: addr.to_string(),
                what: "connecting".into(),
                after: timeout,
            })?
            .map_err(|e| conn("connecting", format!("{e:?}")))?;
        let mut client = CoordinatorClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let startup = proto::ClientInMessage {
            kind: Some(client_in_message::Kind::Startup(proto::StartupDone {
                version: format!("hilrig {}", env!("CARGO_PKG_VERSION")),
                name: user.to_string(),
            })),
        };
        let sub = |k| proto::ClientInMessage {
            kind: Some(client_in_message::Kind::Subscribe(proto::Subscribe {
                is_unsubscribe: None,
                kind: Some(k),
            })),
        };
        // A sync among the first messages: the coordinator answers (and so sends
        // the stream's headers) even when it has nothing else to say yet.
        let first_sync = proto::ClientInMessage {
            kind: Some(client_in_message::Kind::Sync(proto::Sync { id: 1 })),
        };
        for m in [
            startup,
            sub(subscribe::Kind::AllResources(true)),
            first_sync,
        ] {
            tx.try_send(m)
                .map_err(|e| conn("opening the session", e.to_string()))?;
        }
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let resp = rt
            .block_on(async { tokio::time::timeout(timeout, client.client_stream(stream)).await })
            .map_err(|_| LabgridError::Timeout {
                addr: addr.to_string(),
                what: "opening the session".into(),
                after: timeout,
            })?
            .map_err(|s| LabgridError::Call {
                addr: addr.to_string(),
                call: "ClientStream".into(),
                status: Box::new(s),
            })?;
        let mut inbound = resp.into_inner();
        let view = Arc::new(Mutex::new(View::default()));
        let v = view.clone();
        rt.spawn(async move {
            let end = loop {
                match inbound.message().await {
                    Ok(Some(msg)) => {
                        let mut v = v.lock().unwrap_or_else(|p| p.into_inner());
                        for u in msg.updates {
                            match u.kind {
                                Some(update_response::Kind::Resource(r)) => {
                                    if let Some(p) = &r.path {
                                        let key = (
                                            p.exporter_name.clone().unwrap_or_default(),
                                            p.group_name.clone(),
                                            p.resource_name.clone(),
                                        );
                                        v.withdrawn.remove(&key);
                                        v.resources.insert(key, r);
                                    }
                                }
                                Some(update_response::Kind::DelResource(p)) => {
                                    let key = (
                                        p.exporter_name.unwrap_or_default(),
                                        p.group_name,
                                        p.resource_name,
                                    );
                                    if let Some(r) = v.resources.remove(&key) {
                                        v.withdrawn.insert(key, r);
                                    }
                                }
                                _ => {}
                            }
                        }
                        if let Some(s) = msg.sync {
                            v.synced = v.synced.max(s.id);
                        }
                    }
                    Ok(None) => break "the coordinator closed the session".to_string(),
                    Err(s) => break format!("session: {s}"),
                }
            };
            v.lock().unwrap_or_else(|p| p.into_inner()).closed = Some(end);
        });
        let mut c = Coordinator {
            rt,
            client,
            tx,
            view,
            addr: addr.to_string(),
            user: user.to_string(),
            timeout,
            sync_id: 1,
        };
        // The coordinator has our session (and sent the resources) once it
        // answers a sync.
        c.sync()?;
        Ok(c)
    }

    /// How many resources the session has seen published.
    pub fn resource_count(&self) -> usize {
        self.view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .resources
            .len()
    }

    /// Our user name at the coordinator.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Round trip on the session: every update sent before is in the view.
    pub fn sync(&mut self) -> Result<()> {
        self.sync_id += 1;
        let id = self.sync_id;
        let msg = proto::ClientInMessage {
            kind: Some(client_in_message::Kind::Sync(proto::Sync { id })),
        };
        let (tx, t) = (self.tx.clone(), self.timeout);
        let sent = self
            .rt
            .block_on(async { tokio::time::timeout(t, tx.send(msg)).await });
        if !matches!(sent, Ok(Ok(()))) {
            return Err(self.closed_or("sending a sync"));
        }
        let t0 = Instant::now();
        loop {
            {
                let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
                if v.synced >= id {
                    return Ok(());
                }
                if let Some(why) = &v.closed {
                    return Err(LabgridError::Connect {
                        addr: self.addr.clone(),
                        what: "session".into(),
                        detail: why.clone(),
                    });
                }
            }
            if t0.elapsed() > self.timeout {
                return Err(LabgridError::Timeout {
                    addr: self.addr.clone(),
                    what: "session sync".into(),
                    after: self.timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn closed_or(&self, what: &str) -> LabgridError {
        let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        LabgridError::Connect {
            addr: self.addr.clone(),
            what: what.into(),
            detail: v
                .closed
                .clone()
                .unwrap_or_else(|| "session stream gone".into()),
        }
    }

    fn call<T, F>(&mut self, call: String, f: F) -> Result<T>
    where
        F: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let t = self.timeout;
        match self.rt.block_on(async { tokio::time::timeout(t, f).await }) {
            Err(_) => Err(LabgridError::Timeout {
                addr: self.addr.clone(),
                what: call,
                after: t,
            }),
            Ok(Err(status)) => Err(LabgridError::Call {
                addr: self.addr.clone(),
                call,
                status: Box::new(status),
            }),
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }

    /// Every place.
    pub fn places(&mut self) -> Result<Vec<proto::Place>> {
        let mut c = self.client.clone();
        Ok(self
            .call("GetPlaces".into(), async move {
                c.get_places(proto::GetPlacesRequest {}).await
            })?
            .places)
    }

    /// The place `name`.
    pub fn place(&mut self, name: &str) -> Result<proto::Place> {
        self.places()?
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| LabgridError::NoPlace(name.to_string()))
    }

    fn refuse_foreign(&self, p: &proto::Place) -> Result<()> {
        match holder(p) {
            Some(by) if by != self.user => Err(LabgridError::AcquiredByOther {
                place: p.name.clone(),
                by: by.to_string(),
                us: self.user.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Acquire the place `name`. Already ours: nothing to do. Acquired by someone
    /// else: [`LabgridError::AcquiredByOther`], and nothing is sent.
    pub fn acquire(&mut self, name: &str) -> Result<()> {
        let p = self.place(name)?;
        self.refuse_foreign(&p)?;
        if holder(&p).is_some() {
            return Ok(());
        }
        let mut c = self.client.clone();
        let req = proto::AcquirePlaceRequest {
            placename: name.to_string(),
        };
        match self.call(format!("AcquirePlace {name}"), async move {
            c.acquire_place(req).await
        }) {
            Ok(_) => Ok(()),
            Err(e) => {
                // Taken in between: say by whom.
                if let Ok(p) = self.place(name) {
                    self.refuse_foreign(&p)?;
                }
                Err(e)
            }
        }
    }

    /// Release the place `name`, ours. Acquired by someone else:
    /// [`LabgridError::AcquiredByOther`], and nothing is sent; the release names
    /// us (`fromuser`), so the coordinator ignores it if the place changed hands.
    pub fn release(&mut self, name: &str) -> Result<()> {
        let p = self.place(name)?;
        self.refuse_foreign(&p)?;
        if holder(&p).is_none() {
            return Err(LabgridError::NotAcquired(name.to_string()));
        }
        let mut c = self.client.clone();
        let req = proto::ReleasePlaceRequest {
            placename: name.to_string(),
            fromuser: Some(self.user.clone()),
        };
        self.call(format!("ReleasePlace {name}"), async move {
            c.release_place(req).await
        })?;
        Ok(())
    }

    /// Reserve a place whose tags include `tags`; wait up to `wait` for the
    /// coordinator to allocate one (polling the reservation, which also keeps it
    /// alive). Not allocated in time: the reservation is cancelled and an error
    /// returned (INFRA: the places are busy). No place carries the tags at all:
    /// [`LabgridError::NoTaggedPlace`] at once (CONFIG), nothing reserved.
    pub fn reserve(&mut self, tags: &BTreeMap<String, String>, wait: Duration) -> Result<Reserved> {
        let filter = tags
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        // A filter no place satisfies waits forever in labgrid: a setup error.
        let places = self.places()?;
        if !places.iter().any(|p| carries(p, tags)) {
            return Err(LabgridError::NoTaggedPlace {
                filter,
                places: places
                    .iter()
                    .map(|p| {
                        let t: Vec<String> =
                            p.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        format!("{} [{}]", p.name, t.join(" "))
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let mut c = self.client.clone();
        let req = proto::CreateReservationRequest {
            filters: [(
                "main".to_string(),
                proto::reservation::Filter {
                    filter: tags.clone().into_iter().collect(),
                },
            )]
            .into_iter()
            .collect(),
            prio: 0.0,
        };
        let r = self
            .call(format!("CreateReservation {filter}"), async move {
                c.create_reservation(req).await
            })?
            .reservation
            .ok_or_else(|| LabgridError::Reservation {
                token: String::new(),
                filter: filter.clone(),
                state: "the coordinator returned no reservation".into(),
            })?;
        let token = r.token.clone();
        let t0 = Instant::now();
        let mut cur = r;
        loop {
            match cur.state {
                reservation_state::ALLOCATED | reservation_state::ACQUIRED => {
                    if let Some(place) = cur.allocations.get("main") {
                        return Ok(Reserved {
                            token,
                            place: place.clone(),
                        });
                    }
                }
                reservation_state::EXPIRED | reservation_state::INVALID => {
                    return Err(LabgridError::Reservation {
                        token,
                        filter,
                        state: if cur.state == reservation_state::EXPIRED {
                            "expired".into()
                        } else {
                            "invalid (its place was deleted)".into()
                        },
                    });
                }
                _ => {}
            }
            if t0.elapsed() > wait {
                let _ = self.cancel(&token);
                return Err(LabgridError::Reservation {
                    token,
                    filter,
                    state: format!("no place allocated within {wait:?} (cancelled)"),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
            let mut c = self.client.clone();
            let req = proto::PollReservationRequest {
                token: token.clone(),
            };
            cur = self
                .call(format!("PollReservation {token}"), async move {
                    c.poll_reservation(req).await
                })?
                .reservation
                .ok_or_else(|| LabgridError::Reservation {
                    token: token.clone(),
                    filter: filter.clone(),
                    state: "the coordinator returned no reservation".into(),
                })?;
        }
    }

    /// Cancel the reservation `token`.
    pub fn cancel(&mut self, token: &str) -> Result<()> {
        let mut c = self.client.clone();
        let req = proto::CancelReservationRequest {
            token: token.to_string(),
        };
        self.call(format!("CancelReservation {token}"), async move {
            c.cancel_reservation(req).await
        })?;
        Ok(())
    }

    /// Wait up to `wait` (polling the coordinator) until every resource the
    /// matches of the place `name` name is published and available (see
    /// [`missing`]). Zero: look once. Not in time:
    /// [`LabgridError::NotPublished`] naming the place and what is still missing.
    pub fn wait_published(&mut self, name: &str, wait: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            self.sync()?;
            let p = self.place(name)?;
            let (lacking, never) = {
                let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
                let lacking = missing(&p, &v.resources);
                // What is not published now but was earlier in this session.
                let mut seen = v.resources.clone();
                seen.extend(v.withdrawn.iter().map(|(k, r)| (k.clone(), r.clone())));
                let never: Vec<String> = missing(&p, &seen)
                    .into_iter()
                    .filter(|m| m.ends_with(": not published"))
                    .collect();
                let lacking: Vec<String> = lacking
                    .into_iter()
                    .map(|m| match m.strip_suffix(": not published") {
                        Some(k) if !never.contains(&m) => format!("{k}: withdrawn"),
                        _ => m,
                    })
                    .collect();
                (lacking, never)
            };
            if lacking.is_empty() {
                return Ok(());
            }
            let waited = t0.elapsed();
            if waited >= wait {
                return Err(LabgridError::NotPublished {
                    place: name.to_string(),
                    missing: lacking,
                    after: wait,
                    lab_fault: never.is_empty(),
                });
            }
            std::thread::sleep((wait - waited).min(Duration::from_millis(200)));
        }
    }

    /// The place `name` mapped to hilrig's drivers (resources as last published
    /// by the exporters, after a sync).
    pub fn host(&mut self, name: &str) -> Result<PlaceHost> {
        self.sync()?;
        let p = self.place(name)?;
        let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        place_host(&p, &v.resources)
    }

    /// [`Coordinator::host`] for a listing ([`place_listing`]: serial ports not
    /// served yet are port 0).
    pub fn listing(&mut self, name: &str) -> Result<PlaceHost> {
        self.sync()?;
        let p = self.place(name)?;
        let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        place_listing(&p, &v.resources)
    }
}

/// `hilrig rig --labgrid ADDR check`: probe the drivers of `places` (as the
/// coordinator listed them). A place acquired by someone else is not probed
/// (returned as `(place, holder)`, left alone). A place that cannot be used as
/// it stands (its exporter never published within `wait` — one deadline for
/// all —, a resource that makes no sense, a mapping the labgrid config
/// refuses) is an UNHEALTHY row naming the reason's class
/// (`CONFIG: ...`), and the other places are still checked. The coordinator
/// failing stops the check (its error).
pub fn check_places(
    c: &mut Coordinator,
    addr: &str,
    cfg: &LabgridConfig,
    places: Vec<proto::Place>,
    wait: Duration,
) -> Result<(crate::rig::HealthTable, Vec<(String, String)>)> {
    use crate::error::ErrorKind;
    use crate::rig::{HostHealth, Probe};
    let t0 = Instant::now();
    let (mut usable, mut unusable, mut foreign) = (Vec::new(), Vec::new(), Vec::new());
    let mut order = Vec::new();
    for p in places {
        if let Some(by) = holder(&p).filter(|by| *by != c.user()) {
            foreign.push((p.name.clone(), by.to_string()));
            continue;
        }
        order.push(p.name.clone());
        let mapped = c
            .wait_published(&p.name, wait.saturating_sub(t0.elapsed()))
            .and_then(|()| c.host(&p.name))
            .and_then(|h| Ok(places_inventory(addr, std::slice::from_ref(&h), cfg).map(|_| h)?));
        match mapped {
            Ok(h) => usable.push(h),
            // A place that cannot be used is a row (its exporter's resources
            // not published or withdrawn included); the coordinator failing
            // stops the check.
            Err(e)
                if e.kind() != ErrorKind::Infra
                    || matches!(e, LabgridError::NotPublished { .. }) =>
            {
                let class = match e.kind() {
                    ErrorKind::Busy => "BUSY",
                    ErrorKind::Infra => "INFRA",
                    _ => "CONFIG",
                };
                unusable.push(HostHealth {
                    host: p.name.clone(),
                    probes: vec![Probe::bad("place", "labgrid", format!("{class}: {e}"))],
                });
            }
            Err(e) => return Err(e),
        }
    }
    let mut rows = crate::rig::Rig::new(places_inventory(addr, &usable, cfg)?)
        .check()
        .rows;
    rows.append(&mut unusable);
    // The places' order, as the coordinator listed them.
    rows.sort_by_key(|r| order.iter().position(|n| *n == r.host));
    Ok((crate::rig::HealthTable { rows }, foreign))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        for ok in ["127.0.0.1:20408", "coord.lab:1", "[::1]:20408"] {
            assert!(check_address(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "host", ":1", "h:0", "h:65536", "h:x", "a/b:1", "[zz]:1", "h :1",
        ] {
            assert!(
                matches!(check_address(bad), Err(LabgridError::BadAddress(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_place_carries_its_tags_and_its_name() {
        let p = proto::Place {
            name: "rack-a".into(),
            tags: [("hilrig".to_string(), "sim".to_string())].into(),
            ..Default::default()
        };
        let f = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(carries(&p, &f(&[])));
        assert!(carries(&p, &f(&[("hilrig", "sim")])));
        assert!(carries(&p, &f(&[("hilrig", "sim"), ("name", "rack-a")])));
        assert!(!carries(&p, &f(&[("hilrig", "x86")])));
        assert!(!carries(&p, &f(&[("name", "rack-b")])));
        assert!(!carries(&p, &f(&[("hilrig", "sim"), ("board", "x")])));
    }

    #[test]
    fn globs() {
        assert!(glob("*", "anything"));
        assert!(glob("exp1", "exp1"));
        assert!(!glob("exp1", "exp10"));
        assert!(glob("exp?", "exp1"));
        assert!(glob("lab-*-b", "lab-3-b"));
        assert!(!glob("lab-*-b", "lab-3-c"));
    }

    #[test]
    fn pdudaemon_urls() {
        let p = |host: &str| PowerPort {
            model: "pdudaemon".into(),
            host: host.into(),
            index: "3".into(),
        };
        assert_eq!(
            p("http://127.0.0.1:16421/pdu-a").pdudaemon(),
            Some(("http://127.0.0.1:16421".into(), "pdu-a".into(), "3".into()))
        );
        for bad in [
            "127.0.0.1/pdu",
            "http://h",
            "http:///pdu",
            "http://h/",
            "http://h/a/b",
        ] {
            assert_eq!(p(bad).pdudaemon(), None, "{bad}");
        }
    }

    fn res(cls: &str, params: &[(&str, map_value::Kind)]) -> proto::Resource {
        proto::Resource {
            path: None,
            cls: cls.into(),
            params: params
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        proto::MapValue {
                            kind: Some(v.clone()),
                        },
                    )
                })
                .collect(),
            extra: Default::default(),
            acquired: String::new(),
            avail: true,
        }
    }

    /// Place `p` matching every resource of exporter `e`, group `g`.
    fn place_matching_e_g() -> proto::Place {
        proto::Place {
            name: "p".into(),
            matches: vec![proto::ResourceMatch {
                exporter: "e".into(),
                group: "g".into(),
                cls: "*".into(),
                name: None,
                rename: None,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn hostile_resources_are_errors_naming_place_and_resource() {
        use map_value::Kind::{IntValue, StringValue};
        let place = place_matching_e_g();
        let one = |r: proto::Resource| {
            let mut m = BTreeMap::new();
            m.insert(("e".into(), "g".into(), "x".into()), r);
            place_host(&place, &m)
        };
        for (r, want) in [
            (
                res("NetworkSerialPort", &[("host", StringValue("h".into()))]),
                "`port`",
            ),
            (
                res(
                    "NetworkSerialPort",
                    &[("host", StringValue("h".into())), ("port", IntValue(70000))],
                ),
                "`port`",
            ),
            (
                res(
                    "NetworkSerialPort",
                    &[
                        ("host", StringValue("h".into())),
                        ("port", IntValue(1)),
                        ("speed", IntValue(-5)),
                    ],
                ),
                "speed",
            ),
            (
                res(
                    "NetworkSerialPort",
                    &[
                        ("host", StringValue("h".into())),
                        ("port", IntValue(1)),
                        ("protocol", StringValue("telnet".into())),
                    ],
                ),
                "protocol",
            ),
            (
                res("NetworkService", &[("address", StringValue("a".into()))]),
                "`username`",
            ),
            (res("NetworkPowerPort", &[]), "`model`"),
        ] {
            let e = one(r).unwrap_err().to_string();
            assert!(
                e.contains("place `p`") && e.contains("e/g/") && e.contains(want),
                "{e}"
            );
        }
    }

    #[test]
    fn missing_names_unmatched_matches_and_unavailable_resources() {
        let m = |group: &str, cls: &str, name: Option<&str>| proto::ResourceMatch {
            exporter: "e".into(),
            group: group.into(),
            cls: cls.into(),
            name: name.map(Into::into),
            rename: None,
        };
        let place = proto::Place {
            name: "p".into(),
            matches: vec![
                m("g", "NetworkPowerPort", None),
                m("g", "NetworkSerialPort", Some("oob")),
                m("h", "*", None),
            ],
            ..Default::default()
        };
        let key = |g: &str, n: &str| ("e".to_string(), g.to_string(), n.to_string());
        let mut rs = BTreeMap::new();
        // Nothing published: each match named.
        assert_eq!(
            missing(&place, &rs),
            [
                "e/g/NetworkPowerPort: not published",
                "e/g/NetworkSerialPort/oob: not published",
                "e/h/*: not published",
            ]
        );
        rs.insert(key("g", "NetworkPowerPort"), res("NetworkPowerPort", &[]));
        rs.insert(key("g", "console"), res("NetworkSerialPort", &[]));
        let mut oob = res("NetworkSerialPort", &[]);
        oob.avail = false;
        rs.insert(key("g", "oob"), oob);
        rs.insert(key("h", "x"), res("NetworkService", &[]));
        // Published but not available: named as such (a console does not
        // satisfy the `oob` match).
        assert_eq!(
            missing(&place, &rs),
            ["e/g/NetworkSerialPort/oob: not available"]
        );
        if let Some(r) = rs.get_mut(&key("g", "oob")) {
            r.avail = true;
        }
        assert!(missing(&place, &rs).is_empty());
        // Acquired, its serial ports without TCP ports (ser2net not started
        // by the exporter yet): still missing, named.
        let held = proto::Place {
            acquired: Some("host/me".into()),
            ..place.clone()
        };
        assert_eq!(
            missing(&held, &rs),
            ["e/g/NetworkSerialPort/oob: no TCP port served yet"]
        );
        if let Some(r) = rs.get_mut(&key("g", "oob")) {
            *r = res(
                "NetworkSerialPort",
                &[("port", map_value::Kind::IntValue(4001))],
            );
        }
        assert!(missing(&held, &rs).is_empty());
        // A resource of another group never satisfies a match.
        rs.remove(&key("h", "x"));
        rs.insert(key("hh", "x"), res("NetworkService", &[]));
        assert_eq!(missing(&place, &rs), ["e/h/*: not published"]);
        // A place without matches lacks nothing.
        assert!(missing(&proto::Place::default(), &rs).is_empty());
    }

    /// A place nobody holds: its exporter publishes its serial ports without
    /// TCP ports (ser2net runs only while the place is acquired). A listing
    /// shows it (port 0); the drivers' mapping refuses it; a port that is not
    /// a port is refused by both.
    #[test]
    fn a_free_places_serial_ports_are_listed_before_they_are_served() {
        use map_value::Kind;
        let place = place_matching_e_g();
        let key = |n: &str| ("e".to_string(), "g".to_string(), n.to_string());
        let host = ("host", Kind::StringValue("127.0.0.1".into()));
        let mut rs = BTreeMap::new();
        rs.insert(
            key("oob"),
            res("NetworkSerialPort", std::slice::from_ref(&host)),
        );
        rs.insert(
            key("console"),
            res("NetworkSerialPort", std::slice::from_ref(&host)),
        );
        let listed = place_listing(&place, &rs).expect("listed");
        assert_eq!(listed.oob.as_ref().map(|s| s.port), Some(0));
        assert_eq!(listed.consoles.len(), 1);
        assert!(place_host(&place, &rs).is_err(), "mapped without a port");
        rs.insert(
            key("oob"),
            res(
                "NetworkSerialPort",
                &[host.clone(), ("port", Kind::StringValue("x".into()))],
            ),
        );
        assert!(place_listing(&place, &rs).is_err());
    }
}
