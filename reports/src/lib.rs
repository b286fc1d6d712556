//! `hilrig-reports`: the results model of a campaign run and the reports rendered
//! from it — JUnit XML for CI, JSON, one self-contained HTML page with inline SVG
//! plots — plus the run-to-run diff. See README.md.

pub mod cli;
pub mod diff;
pub mod error;
pub mod html;
pub mod json;
pub mod junit;
pub mod model;
pub mod sample;
pub mod stats;
pub mod svg;

pub use cli::{run, ReportCmd};
pub use diff::{diff, CaseChange, HostFlake, RunDiff};
pub use error::{Error, InvalidRun, Result};
pub use html::{to_html, HtmlOptions};
pub use json::{to_json, to_json_report, JsonReport, RunSummary};
pub use junit::to_junit;
pub use model::{
    Artifact, ArtifactKind, Attempt, CaseResult, CounterReading, Counts, Histogram, Host, Latency,
    Metrics, Outcome, Run, SCHEMA_VERSION,
};
pub use sample::sample_run;

use std::io::Write;
use std::path::{Path, PathBuf};

/// Where [`write_reports`] put its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportPaths {
    /// `junit.xml`.
    pub junit: PathBuf,
    /// `report.json`.
    pub json: PathBuf,
    /// `report.html`.
    pub html: PathBuf,
}

/// Write `junit.xml`, `report.json` and `report.html` into `out_dir` (created if
/// missing), diffing against `prev` when given. Artifact links in the HTML are
/// relative to `out_dir`, i.e. this assumes `out_dir` is the run directory; use
/// [`write_reports_with`] to point them elsewhere. Each file is written atomically.
pub fn write_reports(run: &Run, prev: Option<&Run>, out_dir: &Path) -> Result<ReportPaths> {
    write_reports_with(run, prev, out_dir, &HtmlOptions::default())
}

/// [`write_reports`] with HTML options.
pub fn write_reports_with(
    run: &Run,
    prev: Option<&Run>,
    out_dir: &Path,
    opts: &HtmlOptions,
) -> Result<ReportPaths> {
    std::fs::create_dir_all(out_dir).map_err(|source| Error::Io {
        what: "creating directory",
        path: out_dir.to_path_buf(),
        source,
    })?;
    let d = prev.map(|p| diff(p, run));
    // Empty artifact files (a guest that printed nothing) are listed, not linked.
    let mut opts = opts.clone();
    let run_dir = if opts.artifact_base.starts_with('/') {
        PathBuf::from(&opts.artifact_base)
    } else {
        out_dir.join(&opts.artifact_base)
    };
    for a in run.cases.iter().flat_map(|c| c.artifacts.iter()) {
        let p = if a.path.starts_with('/') {
            PathBuf::from(&a.path)
        } else {
            run_dir.join(&a.path)
        };
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_file() && m.len() == 0) {
            opts.empty_artifacts.insert(a.path.clone());
        }
    }
    let opts = &opts;
    let paths = ReportPaths {
        junit: out_dir.join("junit.xml"),
        json: out_dir.join("report.json"),
        html: out_dir.join("report.html"),
    };
    write_atomic(&paths.junit, to_junit(run)?.as_bytes())?;
    write_atomic(&paths.json, to_json(run, d.as_ref())?.as_bytes())?;
    write_atomic(&paths.html, to_html(run, d.as_ref(), prev, opts).as_bytes())?;
    Ok(paths)
}

/// Write `bytes` to `path` atomically: a temporary file with a random name in the
/// same directory, created `O_CREAT|O_EXCL` (a symlink planted at any name is never
/// followed) mode 0644, flushed and synced, renamed over `path`, directory synced.
/// A crash leaves the old file or the new one, never half of one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "report".into());
    let io = |what, source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let res = (|| {
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .tempfile_in(dir)?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    res.map_err(|e| io("writing", e))
}
