//! Leases enforced: power, console and OOB actions on a host leased by someone
//! else are refused (forced only with a reason), unknown hosts cannot be leased,
//! and who holds a host (until when, as a time) can be asked.

mod common;

use hilrig_rig::error::RigError;
use hilrig_rig::lease::{LeaseGuard, LeaseStore};
use hilrig_rig::{Inventory, Rig};
use std::time::Duration;

fn rig_as(inv: &std::path::Path, db: &str, holder: &str, force: Option<&str>) -> Rig {
    Rig::load(inv).unwrap().with_leases(LeaseGuard {
        store: LeaseStore::open(db).unwrap(),
        holder: holder.into(),
        force: force.map(str::to_string),
    })
}

#[test]
fn actions_on_a_host_leased_by_someone_else_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let inv = common::sim_inventory(t.path(), 2, 16);
    let db = t
        .path()
        .join("leases.sqlite")
        .to_string_lossy()
        .into_owned();
    let store = LeaseStore::open(&db).unwrap();
    store
        .acquire("sim-1", "alice", Duration::from_secs(600))
        .unwrap();

    let bob = rig_as(&inv, &db, "bob", None);
    let leased = |r: Result<(), RigError>, what: &str| match r {
        Err(RigError::Leased { holder, host, .. }) => {
            assert_eq!(
                (holder.as_str(), host.as_str()),
                ("alice", "sim-1"),
                "{what}"
            )
        }
        other => panic!("{what} on alice's host: {other:?}"),
    };
    leased(bob.power("sim-1").map(|_| ()), "power");
    leased(bob.console_source("sim-1", "com1").map(|_| ()), "console");
    leased(bob.read_counters("sim-1").map(|_| ()), "oob");
    leased(bob.identify("sim-1").map(|_| ()), "oob identify");
    // The message says until when, as a time.
    let e = bob.power("sim-1").err().unwrap().to_string();
    assert!(e.contains("leased by `alice` until 20"), "{e}");
    // A host nobody holds, and the holder herself: allowed.
    bob.power("sim-2").expect("free host");
    let alice = rig_as(&inv, &db, "alice", None);
    alice.power("sim-1").expect("the holder");
    alice.console_source("sim-1", "com1").expect("the holder");
    // Forced with a reason: allowed (and logged); an empty reason is no reason.
    rig_as(&inv, &db, "bob", Some("alice is on holiday, ticket 42"))
        .power("sim-1")
        .expect("forced");
    leased(
        rig_as(&inv, &db, "bob", Some("  "))
            .power("sim-1")
            .map(|_| ()),
        "power forced without a reason",
    );
    // Released: free again.
    store.release_host("sim-1", "alice", None).unwrap();
    bob.power("sim-1").expect("released host");
}

#[test]
fn unknown_hosts_cannot_be_leased_and_who_holds_what() {
    let t = tempfile::tempdir().unwrap();
    let inv_path = common::sim_inventory(t.path(), 1, 16);
    let inv = Inventory::load(&inv_path).unwrap();
    let db = t
        .path()
        .join("leases.sqlite")
        .to_string_lossy()
        .into_owned();
    let store = LeaseStore::open(&db).unwrap();
    match store.acquire_known(&inv, "sim-9", "me", Duration::from_secs(60)) {
        Err(RigError::UnknownHost { host, .. }) => assert_eq!(host, "sim-9"),
        other => panic!("an unknown host was leased: {other:?}"),
    }
    assert!(
        store.list().unwrap().is_empty(),
        "no row for an unknown host"
    );
    assert_eq!(store.who("sim-1").unwrap(), None);
    let l = store
        .acquire_known(&inv, "sim-1", "me", Duration::from_secs(60))
        .unwrap();
    let w = store.who("sim-1").unwrap().expect("held");
    assert_eq!(w.holder, "me");
    assert_eq!(w.expires_unix_ms, l.expires_unix_ms);
    let shown = hilrig_rig::lease::format_unix_ms(w.expires_unix_ms);
    assert!(shown.starts_with("20") && shown.ends_with('Z'), "{shown}");
}
