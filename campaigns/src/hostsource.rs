//! Where the runner's hosts come from ([`HostSource`]): a rig inventory (or
//! anonymous simulated hosts), places reserved from a labgrid coordinator
//! ([`LabgridSource`], `campaign run --labgrid HOST:PORT`), or both
//! ([`MixedSource`], `--labgrid` with `--inventory`: the inventory's hosts plus
//! the places). Either way the runner gets [`HostSpec`]s and is otherwise
//! unchanged.

use crate::format::HostSpec;
use hilrig_rig::labgrid::{Coordinator, LabgridError, PlaceHost};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// A source of hosts for a run. Hosts it holds (reserved places) are given back
/// by [`HostSource::release`] (also on drop for [`LabgridSource`]).
pub trait HostSource {
    /// The hosts, and a VMM the source names (an inventory's `lab.vmm`).
    fn hosts(&mut self) -> crate::error::RunResult<(Vec<HostSpec>, Option<PathBuf>)>;
    /// Give back what [`HostSource::hosts`] took.
    fn release(&mut self) {}
}

/// The inventory's simulated hosts, or `n` anonymous simulated hosts.
pub struct InventorySource {
    /// The inventory (None: anonymous hosts).
    pub inventory: Option<PathBuf>,
    /// Anonymous hosts without an inventory.
    pub n: usize,
}

impl HostSource for InventorySource {
    fn hosts(&mut self) -> crate::error::RunResult<(Vec<HostSpec>, Option<PathBuf>)> {
        crate::runner::hosts_for(self.inventory.as_deref(), self.n)
    }
}

/// What to reserve from a labgrid coordinator.
#[derive(Debug, Clone)]
pub struct LabgridOptions {
    /// The coordinator, `HOST:PORT`.
    pub address: String,
    /// Our user name there (default `<hostname>/hilrig`).
    pub user: Option<String>,
    /// Tags every reserved place must carry (`key=value`).
    pub tags: BTreeMap<String, String>,
    /// How many places (parallel hosts).
    pub places: usize,
    /// How long to wait for each place: the coordinator allocating it, then its
    /// exporter publishing every resource its matches name (and marking them
    /// available); not in time: `LabgridError::NotPublished`, a CONFIG error.
    pub wait: Duration,
    /// The lab's labgrid config (SSH key and pinned host keys for the places'
    /// `NetworkService`, power readback); see rig/README.md. Without it a
    /// place that publishes an SSH service is refused.
    pub config: Option<PathBuf>,
}

/// Places reserved by tags from a labgrid coordinator and acquired; each becomes a
/// host named after its place, tagged `labgrid`, with each labgrid tag as `value`
/// and `key=value`. Released (and the reservations cancelled) on
/// [`HostSource::release`] or drop. Places acquired by someone else are never
/// touched (see `hilrig_rig::labgrid`).
pub struct LabgridSource {
    opts: LabgridOptions,
    coord: Option<Coordinator>,
    held: Vec<(String, String)>,
    /// The places' resources as mapped for the rig's drivers.
    pub mapped: Vec<PlaceHost>,
    /// The places as a rig inventory (power, consoles and OOB over RFC 2217, SSH):
    /// set by [`HostSource::hosts`].
    pub inventory: Option<hilrig_rig::Inventory>,
}

impl LabgridSource {
    /// A source for `opts` (nothing is contacted before [`HostSource::hosts`]).
    pub fn new(opts: LabgridOptions) -> LabgridSource {
        LabgridSource {
            opts,
            coord: None,
            held: Vec::new(),
            mapped: Vec::new(),
            inventory: None,
        }
    }

    fn user(&self) -> String {
        self.opts.user.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            format!(
                "{}/hilrig",
                if host.is_empty() { "localhost" } else { &host }
            )
        })
    }

    fn take(&mut self) -> Result<Vec<HostSpec>, LabgridError> {
        let user = self.user();
        let cfg = match &self.opts.config {
            Some(p) => hilrig_rig::labgrid::LabgridConfig::load(p)?,
            None => hilrig_rig::labgrid::LabgridConfig::default(),
        };
        let mut c = Coordinator::connect(&self.opts.address, &user, Duration::from_secs(10))?;
        let mut hosts = Vec::new();
        for _ in 0..self.opts.places.max(1) {
            let t0 = std::time::Instant::now();
            let r = c.reserve(&self.opts.tags, self.opts.wait)?;
            // Held from here: released/cancelled even if acquiring fails.
            self.held.push((r.place.clone(), r.token.clone()));
            c.acquire(&r.place)?;
            // The rest of the place's wait: its exporter may not have published
            // everything yet (or only does once the place is acquired).
            c.wait_published(&r.place, self.opts.wait.saturating_sub(t0.elapsed()))?;
            let h = c.host(&r.place)?;
            // The place as rig drivers: its SSH service is how the runner reaches
            // it (the same path as an inventory's `[host.ssh]`).
            let inv = hilrig_rig::labgrid::places_inventory(
                &self.opts.address,
                std::slice::from_ref(&h),
                &cfg,
            )?;
            let ih = inv.hosts.first();
            let ssh = ih.and_then(|x| x.ssh.clone());
            let mut tags = vec!["labgrid".to_string()];
            for (k, v) in &h.tags {
                tags.push(v.clone());
                tags.push(format!("{k}={v}"));
            }
            hosts.push(HostSpec {
                name: r.place.clone(),
                tags,
                backends: crate::format::BACKENDS.to_vec(),
                // As an inventory's host: a place reached over SSH takes `fpga`
                // cases only with a board of its own (else they would look for
                // the simulated board here and fail as INFRA).
                fpga: crate::format::FpgaTarget::of_inventory(
                    ih.map_or("", |x| x.device.as_str()),
                    ssh.is_some(),
                ),
                // The place's own device (the labgrid config's `[device.PLACE]`):
                // its serial and width, its state on the host, read through the
                // place's `oob` port and console.
                counter_width: ih.map_or(64, |x| {
                    if x.sim.serial.is_some() {
                        x.sim.counter_width
                    } else {
                        64
                    }
                }),
                serial: ih.and_then(|x| x.sim.serial).unwrap_or(1),
                // No NetworkService: a local simulated host named after the place.
                ssh,
                device: ih.and_then(crate::format::HostDevice::of_inventory),
            });
            self.mapped.push(h);
        }
        self.inventory = Some(hilrig_rig::labgrid::places_inventory(
            &self.opts.address,
            &self.mapped,
            &cfg,
        )?);
        self.coord = Some(c);
        Ok(hosts)
    }
}

impl HostSource for LabgridSource {
    fn hosts(&mut self) -> crate::error::RunResult<(Vec<HostSpec>, Option<PathBuf>)> {
        match self.take() {
            Ok(h) => Ok((h, None)),
            Err(e) => {
                self.release();
                Err(crate::error::RunError::Labgrid {
                    address: self.opts.address.clone(),
                    source: e,
                })
            }
        }
    }

    fn release(&mut self) {
        use hilrig_rig::ErrorKind;
        // (place, reservation, place released, reservation cancelled)
        let mut left: Vec<(String, String, bool, bool)> = std::mem::take(&mut self.held)
            .into_iter()
            .map(|(p, t)| (p, t, false, false))
            .collect();
        // The connection the places were taken on may have broken during the
        // run (a coordinator restart, a dropped TCP session): a transport
        // failure is retried once on a fresh connection.
        for round in 0..2 {
            if left.iter().all(|(_, _, p, t)| *p && *t) {
                return;
            }
            if round == 1 || self.coord.is_none() {
                match Coordinator::connect(
                    &self.opts.address,
                    &self.user(),
                    Duration::from_secs(10),
                ) {
                    Ok(c) => self.coord = Some(c),
                    Err(e) => {
                        tracing::warn!("labgrid: releasing {left:?}: {e}");
                        return;
                    }
                }
            }
            let Some(c) = self.coord.as_mut() else {
                return;
            };
            let transport = |e: &LabgridError| {
                e.kind() == ErrorKind::Infra && !matches!(e, LabgridError::NotAcquired(_))
            };
            'items: for (place, token, released, cancelled) in left.iter_mut() {
                if !*released {
                    match c.release(place) {
                        Ok(()) | Err(LabgridError::NotAcquired(_)) => {}
                        Err(e) if transport(&e) && round == 0 => {
                            tracing::info!("labgrid: releasing place {place}: {e}; reconnecting");
                            break 'items;
                        }
                        Err(e) => tracing::warn!("labgrid: releasing place {place}: {e}"),
                    }
                    *released = true;
                }
                if !*cancelled {
                    match c.cancel(token) {
                        Ok(()) => {}
                        Err(e) if transport(&e) && round == 0 => {
                            tracing::info!(
                                "labgrid: cancelling reservation {token}: {e}; reconnecting"
                            );
                            break 'items;
                        }
                        Err(e) => tracing::warn!("labgrid: cancelling reservation {token}: {e}"),
                    }
                    *cancelled = true;
                }
            }
        }
    }
}

/// `--inventory` together with `--labgrid`: the inventory's hosts (e.g. the local
/// host that runs the cases a place cannot: `crate::format::needs_local`) plus the
/// places reserved from the coordinator. Names must not clash: a host and a place
/// of the same name is [`crate::error::RunError::HostNameClash`] (CONFIG; the
/// places are released).
pub struct MixedSource<'a> {
    /// The inventory's hosts.
    pub inventory: InventorySource,
    /// The reserved places (held by the caller: they stay reserved until it
    /// releases or drops them).
    pub labgrid: &'a mut LabgridSource,
}

impl HostSource for MixedSource<'_> {
    fn hosts(&mut self) -> crate::error::RunResult<(Vec<HostSpec>, Option<PathBuf>)> {
        // The inventory first: a bad inventory reserves nothing.
        let (mut hosts, vmm) = self.inventory.hosts()?;
        let (places, _) = self.labgrid.hosts()?;
        if let Some(p) = places
            .iter()
            .find(|p| hosts.iter().any(|h| h.name == p.name))
        {
            let name = p.name.clone();
            self.labgrid.release();
            return Err(crate::error::RunError::HostNameClash {
                name,
                inventory: self.inventory.inventory.clone().unwrap_or_default(),
                address: self.labgrid.opts.address.clone(),
            });
        }
        hosts.extend(places);
        Ok((hosts, vmm))
    }

    fn release(&mut self) {
        self.labgrid.release();
    }
}

impl Drop for LabgridSource {
    fn drop(&mut self) {
        self.release();
    }
}
