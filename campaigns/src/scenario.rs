//! The pieces of the multi-step attacks that are not "run the VMM with a built-in
//! payload": generated guest payloads (from the device state they will run on), the
//! reference images a program sequence produces (computed by the behavioural model,
//! the device's own semantics), forged OOB requests, patch bundles and keys.

use crate::attacks::Gen;
use hilrig_device::model::ops;
use hilrig_device::oob::{self, Request, Response};
use hilrig_device::{Device, Model, NvState, Region};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why a scenario step could not be done, or what it found wrong.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The generated payload could not be built.
    #[error(transparent)]
    Guest(#[from] hilrig_guest::GuestError),
    /// The rig could not do the step (a file, the model, a port): infrastructure.
    #[error("{0}")]
    Setup(String),
    /// The device or guest did not behave: one finding.
    #[error("{0}")]
    Finding(String),
    /// The device or guest did not behave: every finding.
    #[error("{}", .0.join("; "))]
    Findings(Vec<String>),
}

type R<T> = Result<T, ScenarioError>;

pub use hilrig_guest::scenario::{payload, program_words, COUNTER_PAGE_WORDS, STEP_DELAY_READS};

/// The FIRMWARE image after the first `k` PROGRAMs of [`Gen::ProgramSeq`]`(n)` on
/// `nv`, as the behavioural model computes it.
pub fn program_image(nv: &NvState, n: u32, k: u32) -> R<Vec<u8>> {
    let words = program_words(nv, n)?;
    let mut m = Model::new(nv.clone()).map_err(|e| ScenarioError::Setup(format!("model: {e}")))?;
    let d: &mut dyn Device = &mut m;
    ops::unlock(d).map_err(|e| ScenarioError::Setup(format!("model: {e}")))?;
    for addr in words.iter().take(k as usize) {
        let r = ops::program(d, Region::Firmware, *addr, 0, &[0; 4])
            .map_err(|e| ScenarioError::Setup(format!("model: {e}")))?;
        if !r.done() {
            return Err(ScenarioError::Finding(format!(
                "model refused PROGRAM at {addr:#x}: status {:#x}",
                r.status
            )));
        }
    }
    Ok(m.nv().flash[Region::Firmware as usize].clone())
}

/// What the guest's results must show for `gen` (the payload's own report).
pub fn check_results(gen: Gen, results: &[u64], width: u8) -> R<String> {
    match gen {
        Gen::CounterWrites => {
            let n = COUNTER_PAGE_WORDS as usize;
            if results.len() < 2 * n {
                return Err(ScenarioError::Finding(format!(
                    "the guest reported {} words, expected {} (the counters page before and after)",
                    results.len(),
                    2 * n
                )));
            }
            let (before, after) = (&results[..n], &results[n..2 * n]);
            if before != after {
                return Err(ScenarioError::Finding(format!(
                    "the counters page changed under the guest's writes: {before:x?} -> {after:x?}"
                )));
            }
            Ok(format!("guest saw the counters page unchanged {before:x?}"))
        }
        Gen::FuseBurn(_) => {
            let [status, fuse, slots, master] = results else {
                return Err(ScenarioError::Finding(format!(
                    "the guest reported {results:x?}, expected FLASH_STATUS, FUSE, SLOTS_LEFT, MASTER"
                )));
            };
            let refused = u64::from(hilrig_device::regmap::FLASH_STATUS_REFUSED_FUSE);
            let mut bad = Vec::new();
            if status & refused == 0 {
                bad.push(format!(
                    "the unlocked PROGRAM after the fuse blew ended FLASH_STATUS {status:#x}, not REFUSED_FUSE"
                ));
            }
            if *fuse != 1 {
                bad.push(format!("FUSE reads {fuse}, expected 1"));
            }
            if *slots != 0 {
                bad.push(format!("SLOTS_LEFT reads {slots}, expected 0"));
            }
            if *master != u64::from(width) {
                bad.push(format!(
                    "MASTER reads {master}, expected {width} (the width: later attempts are not counted)"
                ));
            }
            if bad.is_empty() {
                Ok(format!(
                    "guest saw FLASH_STATUS {status:#x} (fuse refused), FUSE 1, SLOTS_LEFT 0, MASTER {master}"
                ))
            } else {
                Err(ScenarioError::Findings(bad))
            }
        }
        _ => Ok(String::new()),
    }
}

/// Forged and malformed requests on the OOB port of the device in `state`
/// (opened with `backend`): every one must get an error frame, no counter, fuse or
/// epoch may move. The observations, or why the device failed.
pub fn oob_forge(backend: hilrig_device::BackendKind, state: &Path) -> R<Vec<String>> {
    let spec = hilrig_vmm::DeviceSpec::from(backend);
    let mut b = hilrig_vmm::open_backend(&spec, Some(state))
        .map_err(|e| ScenarioError::Setup(format!("opening the {backend} device: {e}")))?;
    let dev: &mut dyn Device = b.device.as_mut();
    let before = oob::read_counters(dev)
        .map_err(|e| ScenarioError::Setup(format!("reading counters: {e}")))?;
    let nv = NvState::load(state)
        .map_err(|e| ScenarioError::Setup(format!("reading the state: {e}")))?;
    let frames = forged_frames(&nv);
    let mut obs = Vec::new();
    let mut bad = Vec::new();
    for (what, f) in &frames {
        match dev.oob(f) {
            Ok(reply) => match oob::decode_response(&reply) {
                Ok((_, Response::Error { code, .. })) => {
                    obs.push(format!("{what}: refused ({code:?})"))
                }
                Ok((_, other)) => bad.push(format!("{what}: answered {other:?}, not an error")),
                Err(e) => bad.push(format!("{what}: undecodable reply ({e})")),
            },
            Err(e) => bad.push(format!("{what}: no error frame ({e})")),
        }
        let now = oob::read_counters(dev)
            .map_err(|e| ScenarioError::Setup(format!("reading counters: {e}")))?;
        if now != before {
            bad.push(format!("after {what}: counters {before:?} -> {now:?}"));
        }
    }
    if bad.is_empty() {
        Ok(obs)
    } else {
        Err(ScenarioError::Findings(bad))
    }
}

/// Forged and malformed OOB frames for the device `nv` describes (its keys): keyed
/// resets with wrong keys, bad CRCs, an unknown command, a short key.
fn forged_frames(nv: &NvState) -> Vec<(&'static str, Vec<u8>)> {
    let (_, other_key) = hilrig_device::state::dev_keys(nv.serial.wrapping_add(1));
    let mut one_bit = nv.reset_key;
    one_bit[31] ^= 1;
    let good_read = oob::encode_request(7, &Request::ReadCounters);
    let mut bad_crc = good_read.clone();
    if let Some(last) = bad_crc.last_mut() {
        *last ^= 0x55;
    }
    let mut forged_crc = oob::encode_request(8, &Request::PhysicalReset([0; 32]));
    if let Some(last) = forged_crc.last_mut() {
        *last ^= 1;
    }
    let frames: Vec<(&str, Vec<u8>)> = vec![
        (
            "PHYSICAL_RESET with an all-zero key",
            oob::encode_request(1, &Request::PhysicalReset([0; 32])),
        ),
        (
            "PHYSICAL_RESET with another device's key",
            oob::encode_request(2, &Request::PhysicalReset(other_key)),
        ),
        (
            "PHYSICAL_RESET with the key one bit off",
            oob::encode_request(3, &Request::PhysicalReset(one_bit)),
        ),
        ("READ_COUNTERS with a bad CRC", bad_crc),
        ("PHYSICAL_RESET (zero key) with a bad CRC", forged_crc),
        ("an unknown command", oob::frame(4, 0x7e, &[0; 4])),
        (
            "PHYSICAL_RESET with a short key",
            oob::frame(5, oob::cmd::PHYSICAL_RESET, &[0xa5; 16]),
        ),
    ];
    frames
}

/// Read one frame from a byte stream within `timeout`.
pub(crate) fn read_frame(
    port: &mut dyn hilrig_rig::oob::Transport,
    timeout: Duration,
) -> R<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut reader = oob::FrameReader::default();
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        let n = match port.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                0
            }
            Err(e) => return Err(ScenarioError::Finding(format!("reading the OOB port: {e}"))),
        };
        for &b in &buf[..n] {
            if let Some(oob::StreamEvent::Frame(f)) = reader.push(b) {
                return Ok(f);
            }
        }
    }
    Err(ScenarioError::Finding(format!(
        "no answer on the OOB port within {timeout:?}"
    )))
}

/// The same forgeries over the rig's OOB path: the device's OOB UART as the rig
/// serves a simulated host's (`hilrig_rig::sim::serve_state_oob`: a PTY opened
/// through the serialport code real UARTs use, 115200 8N1), plus what only a byte
/// stream carries: garbage before a forged frame, an oversized frame, a frame cut
/// short (answered after the inter-byte timeout). Counters read back over the
/// same port after each.
pub fn oob_forge_pty(state: &Path) -> R<Vec<String>> {
    let path =
        hilrig_rig::sim::serve_state_oob(state).map_err(|e| ScenarioError::Setup(e.to_string()))?;
    let spec = hilrig_rig::inventory::OobSpec::Serial {
        path,
        baud: oob::DEFAULT_BAUD,
        timeout_ms: 3000,
    };
    let r = NvState::load(state)
        .map_err(|e| ScenarioError::Setup(format!("reading the state: {e}")))
        .and_then(|nv| forge_on("sim", &spec, &nv, Vec::new()));
    hilrig_rig::sim::stop_state_oob(state);
    r
}

/// Every forgery of [`oob_forge`] and [`oob_forge_pty`] on a device's OOB port
/// as the rig's OOB driver reaches it (`spec`: a board's UART or serve-sim's
/// PTY, or an SSH host's serial or network OOB port of `host`): each must be
/// answered with an error frame, the counters (read back over the same port)
/// must not move. `nv`: the device's state as the rig brought it up (its keys).
pub fn oob_forge_port(
    host: &str,
    spec: &hilrig_rig::inventory::OobSpec,
    nv: &NvState,
) -> R<Vec<String>> {
    forge_on(host, spec, nv, forged_frames(nv))
}

fn forge_on(
    host: &str,
    spec: &hilrig_rig::inventory::OobSpec,
    nv: &NvState,
    frames: Vec<(&'static str, Vec<u8>)>,
) -> R<Vec<String>> {
    let timeout = Duration::from_secs(3);
    let (mut port, _, _) = hilrig_rig::oob::open_transport(host, spec)
        .map_err(|e| ScenarioError::Setup(format!("opening the OOB port: {e}")))?;
    let counters = |port: &mut dyn hilrig_rig::oob::Transport, seq: u8| -> R<oob::CounterReport> {
        port.write_all(&oob::encode_request(seq, &Request::ReadCounters))
            .map_err(|e| ScenarioError::Setup(format!("writing the OOB port: {e}")))?;
        match oob::decode_response(&read_frame(port, timeout)?) {
            Ok((_, Response::Counters(c))) => Ok(c),
            other => Err(ScenarioError::Finding(format!(
                "READ_COUNTERS answered {other:?}"
            ))),
        }
    };
    let before = counters(port.as_mut(), 0x40)?;
    let (_, other_key) = hilrig_device::state::dev_keys(nv.serial.wrapping_add(1));
    let mut garbage_then_forged = b"\x00\xffAT+RESET\r\n".to_vec();
    garbage_then_forged.extend(oob::encode_request(
        0x41,
        &Request::PhysicalReset(other_key),
    ));
    let mut bad_crc = oob::encode_request(0x42, &Request::PhysicalReset([0; 32]));
    if let Some(last) = bad_crc.last_mut() {
        *last ^= 1;
    }
    let full = oob::encode_request(0x43, &Request::PhysicalReset([0; 32]));
    let mut streams: Vec<(&str, Vec<u8>)> = frames;
    streams.extend([
        (
            "garbage, then PHYSICAL_RESET with another device's key",
            garbage_then_forged,
        ),
        ("PHYSICAL_RESET (zero key) with a bad CRC", bad_crc),
        (
            "a frame announcing a 200-byte payload",
            vec![oob::SYNC, 200, 0x44, oob::cmd::PHYSICAL_RESET],
        ),
        ("PHYSICAL_RESET cut short", full[..full.len() / 2].to_vec()),
    ]);
    let (mut obs, mut bad) = (Vec::new(), Vec::new());
    for (i, (what, bytes)) in streams.iter().enumerate() {
        port.write_all(bytes)
            .map_err(|e| ScenarioError::Setup(format!("writing the OOB port: {e}")))?;
        match read_frame(port.as_mut(), timeout).map(|f| oob::decode_response(&f)) {
            Ok(Ok((_, Response::Error { code, .. }))) => {
                obs.push(format!("{what} (over the serial port): refused ({code:?})"))
            }
            Ok(other) => bad.push(format!(
                "{what} (over the serial port): answered {other:?}, not an error"
            )),
            Err(e) => bad.push(format!("{what} (over the serial port): {e}")),
        }
        let now = counters(port.as_mut(), 0x50u8.wrapping_add(i as u8))?;
        if now != before {
            bad.push(format!(
                "after {what} (over the serial port): counters {before:?} -> {now:?}"
            ));
        }
    }
    if bad.is_empty() {
        Ok(obs)
    } else {
        Err(ScenarioError::Findings(bad))
    }
}

/// Patching-code references of the VMM builds hashed by [`file_sha256`], by build hash.
static PATCH_PATHS: Mutex<BTreeMap<[u8; 32], [u8; 32]>> = Mutex::new(BTreeMap::new());

/// SHA-256 of a file (the VMM executable a bundle targets), cached per path; a VMM
/// build's patching-code reference is recorded on the way for [`write_bundle`].
pub fn file_sha256(path: &Path) -> R<[u8; 32]> {
    static CACHE: Mutex<BTreeMap<PathBuf, [u8; 32]>> = Mutex::new(BTreeMap::new());
    let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if let Some(h) = CACHE.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(*h);
    }
    let bytes =
        std::fs::read(&key).map_err(|e| ScenarioError::Setup(format!("{}: {e}", key.display())))?;
    let h: [u8; 32] = Sha256::digest(&bytes).into();
    // The build's patching-code reference (issue 21.2), for the bundles made for it.
    if let Ok(pp) = hilrig_fw::bundle::patch_path_sha256_of_elf(&bytes) {
        PATCH_PATHS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(h, pp);
    }
    CACHE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, h);
    Ok(h)
}

/// The default tenant policy plus writes to SCRATCH[0] and SCRATCH[1] dropped with
/// an alarm: what the storm's patch installs (its effect is visible as alarms).
pub fn policy_v2() -> Vec<u8> {
    let mut t = hilrig_vmm::policy::default_policy_toml();
    for i in 0..2 {
        t.push_str(&format!(
            "\n[[profile.tenant]]\nregister = \"SCRATCH[{i}]\"\naccess = \"write\"\naction = \"drop\"\nalarm = true\n\n[[profile.operator]]\nregister = \"SCRATCH[{i}]\"\naccess = \"write\"\naction = \"drop\"\nalarm = true\n"
        ));
    }
    t.into_bytes()
}

/// A policy bundle of `version` for the VMM build `build`, signed with the key
/// `<prefix>.key`; written to `out`.
pub fn write_bundle(prefix: &Path, version: u64, build: [u8; 32], out: &Path) -> R<Vec<u8>> {
    let key = hilrig_fw::keys::signing_key(&hilrig_fw::keys::with_ext(prefix, "key"))
        .map_err(|e| ScenarioError::Setup(format!("signing key: {e}")))?;
    let b = hilrig_fw::bundle::build(
        &hilrig_fw::bundle::BundleSpec {
            component: "policy",
            version,
            target_vmm_sha256: build,
            payloads: vec![("policy.toml".to_string(), policy_v2())],
            encrypt_to: None,
            patch_path_sha256: PATCH_PATHS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&build)
                .copied(),
        },
        &key,
    )
    .map_err(|e| ScenarioError::Setup(format!("building the bundle: {e}")))?;
    std::fs::write(out, &b).map_err(|e| ScenarioError::Setup(format!("{}: {e}", out.display())))?;
    Ok(b)
}

/// A signing key pair `<prefix>.key` / `<prefix>.pub`.
pub fn keygen(prefix: &Path) -> R<PathBuf> {
    hilrig_fw::keys::keygen_sign(prefix)
        .map_err(|e| ScenarioError::Setup(format!("patch key: {e}")))?;
    Ok(hilrig_fw::keys::with_ext(prefix, "pub"))
}

/// SHA-256 hex of bytes.
pub fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn factory(width: u8) -> NvState {
        hilrig_fw::factory::device(hilrig_device::DeviceConfig::with_width(width), 1).unwrap()
    }

    #[test]
    fn generated_payloads_assemble() {
        let nv = factory(64);
        for g in [
            Gen::FlashAttempts(2),
            Gen::CounterWrites,
            Gen::ProgramSeq(12),
            Gen::FuseBurn(6),
        ] {
            assert!(payload(g, &nv).unwrap().len() > 50, "{g:?}");
        }
    }

    #[test]
    fn program_images_step_by_step() {
        let nv = factory(64);
        let images: Vec<Vec<u8>> = (0..=4).map(|k| program_image(&nv, 4, k).unwrap()).collect();
        assert_eq!(images[0], nv.flash[Region::Firmware as usize]);
        for k in 1..=4 {
            assert_ne!(images[k], images[k - 1], "step {k} changed nothing");
        }
    }

    #[test]
    fn forged_oob_requests_are_refused_by_the_model() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("s.bin");
        let mut nv = factory(64);
        nv.count_attempt(Region::Firmware);
        nv.save(&state).unwrap();
        let obs = oob_forge(hilrig_device::BackendKind::Model, &state).unwrap();
        assert_eq!(obs.len(), 7, "{obs:?}");
        assert_eq!(NvState::load(&state).unwrap().counter_values(), [0, 1, 0]);
        let obs = oob_forge_pty(&state).unwrap();
        assert_eq!(obs.len(), 4, "{obs:?}");
        assert!(
            obs[3].contains("cut short") && obs[3].contains("Truncated"),
            "{obs:?}"
        );
        assert_eq!(NvState::load(&state).unwrap().counter_values(), [0, 1, 0]);
    }

    #[test]
    fn results_checks_catch_a_moved_counter() {
        let mut r = vec![0, 1, 0, 1, 0, 63, 64, 0];
        r.extend([0, 0, 0, 1, 0, 63, 64, 0]);
        assert!(check_results(Gen::CounterWrites, &r, 64).is_err());
        r[9] = 1;
        assert!(check_results(Gen::CounterWrites, &r, 64).is_ok());
        assert!(check_results(Gen::FuseBurn(6), &[0x8, 1, 0, 4], 4).is_ok());
        assert!(check_results(Gen::FuseBurn(6), &[0x2, 1, 0, 4], 4).is_err());
    }
}
