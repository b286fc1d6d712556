//! `hilrig report`: the command-line edge (anyhow lives here only).

use crate::model::Run;
use crate::{write_reports_with, HtmlOptions};
use anyhow::{Context, Result};
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

/// `hilrig report <run.json> [--prev <run.json>] [-o DIR]`
#[derive(Debug, Clone, clap::Args)]
pub struct ReportCmd {
    /// The run result (run.json) written by the runner.
    #[arg(required_unless_present = "sample")]
    pub run: Option<PathBuf>,
    /// The previous run of the same campaign, to diff against.
    #[arg(long)]
    pub prev: Option<PathBuf>,
    /// Output directory for junit.xml, report.json, report.html
    /// (default: the run file's directory, so artifact links resolve).
    #[arg(short = 'o', long = "out")]
    pub out: Option<PathBuf>,
    /// Exit 0 whenever the reports were written, even if the run is red.
    #[arg(long)]
    pub exit_zero: bool,
    /// Demo: write a generated sample run (and its reports) with this seed
    /// instead of reading one; with --prev-sample, diff against another seed.
    #[arg(long, conflicts_with = "run")]
    pub sample: Option<u64>,
    /// Demo: seed of a generated previous run (with --sample).
    #[arg(long, requires = "sample", conflicts_with = "prev")]
    pub prev_sample: Option<u64>,
}

/// Path from directory `from` to directory `to`, both existing (`""` if equal).
fn relative_dir(from: &Path, to: &Path) -> Option<String> {
    let from = from.canonicalize().ok()?;
    let to = to.canonicalize().ok()?;
    let a: Vec<Component> = from.components().collect();
    let b: Vec<Component> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = vec!["..".into(); a.len() - common];
    parts.extend(
        b[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    Some(parts.join("/"))
}

/// Run the command. Exit code: 0 = reports written and the run is green (or
/// `--exit-zero`); 1 = reports written, the run has FAIL, TIMEOUT or INFRA cases.
/// Errors (bad input, unwritable output) are returned for the caller to print (exit 2).
pub fn run(cmd: ReportCmd) -> Result<ExitCode> {
    let (run, run_dir, prev) = if let Some(seed) = cmd.sample {
        let out = cmd
            .out
            .clone()
            .context("--sample needs -o DIR to write the sample run into")?;
        std::fs::create_dir_all(&out)
            .with_context(|| format!("creating directory {}", out.display()))?;
        let run = crate::sample_run(seed);
        run.save(&out.join("run.json"))?;
        let prev = cmd.prev_sample.map(crate::sample_run);
        if let Some(p) = &prev {
            p.save(&out.join("prev-run.json"))?;
        }
        (run, out, prev)
    } else {
        let path = cmd
            .run
            .clone()
            .context("give a run file (run.json) or --sample SEED")?;
        let run = Run::load(&path)?;
        let prev = match &cmd.prev {
            Some(p) => Some(Run::load(p)?),
            None => None,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (run, dir, prev)
    };
    if let Some(p) = &prev {
        if p.campaign != run.campaign {
            eprintln!(
                "warning: previous run {} is of campaign {:?}, this one of {:?}; diffing anyway",
                p.id, p.campaign, run.campaign
            );
        }
    }
    let out = cmd.out.clone().unwrap_or_else(|| run_dir.clone());
    std::fs::create_dir_all(&out)
        .with_context(|| format!("creating directory {}", out.display()))?;
    let opts = HtmlOptions {
        artifact_base: relative_dir(&out, &run_dir).unwrap_or_default(),
        ..HtmlOptions::default()
    };
    let paths = write_reports_with(&run, prev.as_ref(), &out, &opts)?;
    let c = run.counts();
    println!(
        "{} {}: {} cases: {} pass, {} fail, {} timeout, {} infra, {} flaky, {} skipped",
        run.campaign, run.id, c.total, c.pass, c.fail, c.timeout, c.infra, c.flaky, c.skipped
    );
    if let Some(p) = &prev {
        let d = crate::diff(p, &run);
        println!(
            "since {}: {} new failure(s), {} fixed, {} still failing",
            p.id,
            d.new_failures.len(),
            d.fixed.len(),
            d.still_failing.len()
        );
    }
    println!("{}", paths.junit.display());
    println!("{}", paths.json.display());
    println!("{}", paths.html.display());
    Ok(if run.is_green() || cmd.exit_zero {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_dirs() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a/out");
        let b = t.path().join("runs/r1");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        assert_eq!(relative_dir(&a, &b).unwrap(), "../../runs/r1");
        assert_eq!(relative_dir(&b, &b).unwrap(), "");
    }
}
