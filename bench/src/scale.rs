//! `hilrig bench lab-scale`: campaign scale-out over PostgreSQL — cases/min of one
//! runner process vs three runner processes sharing one run (`campaign run
//! --join`), each runner with one simulated host, against one PostgreSQL server, in
//! the same bench run. PostgreSQL: `HILRIG_TEST_PG`, else `scripts/pg-start` (from
//! the source tree, stopped afterwards).

use crate::figure::Figure;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// The campaign both configurations run: short single-step cases on the model.
const CAMPAIGN: &str = r#"
name = "lab-scale"
[defaults]
retries = 0
infra_retries = 1
case_timeout = "60s"
step_timeout = "20s"
[[case]]
attacks = ["attack-hang", "attack-key-read", "attack-rep-movs-write", "attack-xchg", "attack-lock-rmw", "attack-mov-widths", "pci-enum"]
backends = ["model"]
profiles = ["tenant", "operator"]
"#;

struct Pg {
    url: String,
    dir: Option<String>,
}

impl Drop for Pg {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            let _ = Command::new("scripts/pg-stop").arg(d).status();
        }
    }
}

fn postgres() -> Result<Pg> {
    if let Some(url) = std::env::var("HILRIG_TEST_PG")
        .ok()
        .filter(|s| !s.is_empty())
    {
        return Ok(Pg { url, dir: None });
    }
    let out = Command::new("scripts/pg-start")
        .output()
        .context("bench lab-scale needs PostgreSQL: HILRIG_TEST_PG not set and scripts/pg-start (run from the source tree) could not be started")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    if !out.status.success() || lines.len() < 2 {
        bail!(
            "bench lab-scale needs PostgreSQL: scripts/pg-start failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(Pg {
        url: lines[0].to_string(),
        dir: Some(lines[lines.len() - 1].to_string()),
    })
}

/// Run the campaign with `runners` processes of `hosts` hosts each sharing run
/// `run`; (cases, wall seconds).
fn shared_run(
    exe: &Path,
    dir: &Path,
    url: &str,
    run: &str,
    runners: usize,
    hosts: usize,
) -> Result<(usize, f64)> {
    let file = dir.join("lab-scale.toml");
    let t = Instant::now();
    let kids = (0..runners)
        .map(|i| {
            Command::new(exe)
                .args(["campaign", "run"])
                .arg(&file)
                .args(["--hosts", &hosts.to_string(), "--db", url, "--join", run])
                .args(["--runner-name", &format!("bench-{i}")])
                .arg("--out")
                .arg(dir.join(format!("out-{run}-{i}")))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting runner {i} ({})", exe.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    for (i, mut k) in kids.into_iter().enumerate() {
        let s = k.wait()?;
        if !s.success() {
            bail!("runner {i} of {run} exited {s} (not every case passed)");
        }
    }
    let wall = t.elapsed().as_secs_f64();
    let mut store = hilrig_campaigns::store::Store::open(Path::new(url))?;
    let cases = store.cases(run)?;
    if let Some(c) = cases
        .iter()
        .find(|c| c.outcome != hilrig_reports::Outcome::Pass)
    {
        bail!("{run}: case {} ended {}: {}", c.id, c.outcome, c.message);
    }
    Ok((cases.len(), wall))
}

/// The scale-out rows (also for `bench lab` once it exists).
pub fn bench_lab_scale() -> Result<Vec<Figure>> {
    let pg = postgres()?;
    let exe = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("lab-scale.toml"), CAMPAIGN)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tag = format!("{}-{nanos}", std::process::id());
    let per_min = |(n, s): (usize, f64)| n as f64 / s * 60.0;
    let one = shared_run(&exe, dir.path(), &pg.url, &format!("scale1-{tag}"), 1, 1)?;
    let three = shared_run(&exe, dir.path(), &pg.url, &format!("scale3-{tag}"), 3, 1)?;
    let local3 = shared_run(&exe, dir.path(), &pg.url, &format!("local3-{tag}"), 1, 3)?;
    let cases = one.0;
    Ok(vec![
        Figure::new(
            format!("1 runner x 1 host, {cases} cases, one PostgreSQL (baseline)"),
            per_min(one),
            "cases/min",
        ),
        Figure::new(
            "3 runner processes x 1 host sharing the run (--join)",
            per_min(three),
            "cases/min",
        )
        .vs(0),
        Figure::new(
            "1 runner x 3 hosts (same parallelism in one process)",
            per_min(local3),
            "cases/min",
        )
        .vs(0),
    ])
}
