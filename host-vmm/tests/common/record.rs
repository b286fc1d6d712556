//! A record of applied patch versions for a patchable test VMM
//! (`#[path = "common/record.rs"] mod record;`): a VMM given `--patch-pubkey`
//! refuses to start without `--patch-record` and `--patch-record-key`.

use std::ffi::OsString;
use std::path::Path;

/// `--patch-record DIR/NAME/applied.json --patch-record-key DIR/NAME.key`, the key
/// made fresh (0600) outside the record's own directory (which a jailed VMM gets
/// writable). Each VMM its own `name`: a record remembers the versions applied.
pub fn args(dir: &Path, name: &str) -> [OsString; 4] {
    let key = dir.join(format!("{name}.key"));
    hilrig_counters::mac::Key::init(&key).expect("patch record key");
    let own = dir.join(name);
    std::fs::create_dir_all(&own).expect("patch record directory");
    [
        "--patch-record".into(),
        own.join("applied.json").into(),
        "--patch-record-key".into(),
        key.into(),
    ]
}
