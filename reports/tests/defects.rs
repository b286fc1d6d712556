//! Issue 19's report defects, one test each (each fails on the code before its fix).

use hilrig_reports::*;
use std::collections::BTreeMap;

/// The `<svg>` whose title starts with `title`.
fn chart<'a>(html: &'a str, title: &str) -> &'a str {
    let at = html
        .find(&format!("aria-label=\"{title}"))
        .unwrap_or_else(|| panic!("no chart {title:?}"));
    let start = html[..at].rfind("<svg").expect("svg start");
    let end = at + html[at..].find("</svg>").expect("svg end");
    &html[start..end]
}

fn case(id: &str, host: &str, readings: &[(u64, u64)]) -> CaseResult {
    let mut c = sample_run(1).cases[0].clone();
    c.id = id.into();
    c.host = host.into();
    c.metrics = Metrics::default();
    c.metrics.counters = readings
        .iter()
        .map(|&(t_ms, v)| CounterReading {
            t_ms,
            regions: BTreeMap::from([("firmware".to_string(), v)]),
            master: v,
        })
        .collect();
    c
}

fn two_fresh_devices() -> Run {
    let mut run = sample_run(1);
    run.started_ms = 1_000_000;
    run.finished_ms = 1_030_000;
    // Two cases on one host, each from a fresh state file: 0 → 4, then 0 → 4.
    run.cases = vec![
        case("a/model/tenant@sim", "h", &[(1_001_000, 0), (1_005_000, 4)]),
        case("b/model/tenant@sim", "h", &[(1_010_000, 0), (1_014_000, 4)]),
    ];
    run
}

#[test]
fn counters_plot_breaks_between_cases_instead_of_dropping_to_zero() {
    let run = two_fresh_devices();
    let html = to_html(&run, None, None, &HtmlOptions::default());
    let svg = chart(&html, "Counters on h");
    let paths: Vec<&str> = svg
        .split("<path d=\"")
        .skip(1)
        .map(|p| &p[..p.find('"').unwrap()])
        .collect();
    assert_eq!(paths.len(), 2, "firmware and master: {paths:?}");
    for d in paths {
        assert_eq!(
            d.matches('M').count(),
            2,
            "one stretch per case, no line from 4 down to the next case's 0: {d}"
        );
    }
}

#[test]
fn counters_plot_x_ticks_read_differently() {
    let run = two_fresh_devices();
    let html = to_html(&run, None, None, &HtmlOptions::default());
    let svg = chart(&html, "Counters on h");
    // x tick labels are the middle-anchored grey texts.
    let labels: Vec<&str> = svg
        .split(r##"text-anchor="middle" fill="#555">"##)
        .skip(1)
        .map(|p| &p[..p.find('<').unwrap()])
        .collect();
    assert!(labels.len() >= 3, "{labels:?}");
    let mut uniq = labels.clone();
    uniq.sort_unstable();
    uniq.dedup();
    assert_eq!(uniq.len(), labels.len(), "repeated tick labels: {labels:?}");
    assert!(svg.contains("seconds since run start"), "a 14 s span in s");
    // And tick labels on their own never repeat for small steps.
    let t = svg::nice_ticks(0.0, 0.05, 7);
    let l = svg::tick_labels(&t);
    let mut u = l.clone();
    u.dedup();
    assert_eq!(u, l, "{l:?}");
}

#[test]
fn trap_latency_histogram_is_log_scale_and_keeps_the_slow_backend() {
    let mut run = sample_run(1);
    run.cases.truncate(2);
    run.cases[0].backend = "model".into();
    run.cases[0].metrics.trap_latency = Latency {
        samples_us: (0..2000).map(|i| 4.0 + (i % 10) as f64 * 0.3).collect(),
        histogram: None,
    };
    run.cases[1].backend = "rtl".into();
    run.cases[1].metrics.trap_latency = Latency {
        samples_us: vec![400.0, 420.0, 450.0, 600.0, 2500.0],
        histogram: None,
    };
    let html = to_html(&run, None, None, &HtmlOptions::default());
    let svg = chart(&html, "MMIO trap latency");
    assert!(svg.contains("log scale"), "axis says log scale");
    // The rtl samples are drawn in their own bins, not lumped into an overflow bin.
    assert!(svg.contains("<title>rtl: "), "rtl bars drawn");
    assert!(!svg.contains("and above"), "nothing clipped away");
    // Powers of ten as ticks.
    for t in [">10<", ">100<", ">1000<"] {
        assert!(svg.contains(t), "tick {t}");
    }
}

#[test]
fn blackout_plot_draws_the_1_ms_bound() {
    let run = sample_run(7);
    assert!(run.cases.iter().any(|c| !c.metrics.blackouts_us.is_empty()));
    let html = to_html(&run, None, None, &HtmlOptions::default());
    let svg = chart(&html, "Live-patch blackouts");
    assert!(svg.contains("1 ms bound 1000"), "bound line labelled");
}

#[test]
fn teardown_plot_counts_samples_as_the_summary_does() {
    let mut run = sample_run(7);
    // One case with two VMM runs (two teardowns): 1 more sample than cases.
    let k = run
        .cases
        .iter()
        .position(|c| !c.metrics.teardown_us.is_empty())
        .unwrap();
    run.cases[k].metrics.teardown_us.push(30_000.0);
    let n: usize = run.cases.iter().map(|c| c.metrics.teardown_us.len()).sum();
    let html = to_html(&run, None, None, &HtmlOptions::default());
    let summary = RunSummary::of(&run, None);
    assert_eq!(summary.teardown_us.unwrap().count as usize, n);
    let svg = chart(&html, "Teardown times");
    assert!(
        svg.contains(&format!("{n} samples from")),
        "the plot counts {n} samples like the summary"
    );
}

#[test]
fn new_failure_rows_link_to_their_case() {
    let prev = sample_run(11);
    let run = sample_run(7);
    let d = diff(&prev, &run);
    assert!(!d.new_failures.is_empty());
    let html = to_html(&run, Some(&d), Some(&prev), &HtmlOptions::default());
    let sec = &html[html.find(r#"id="new-failures""#).unwrap()..];
    let sec = &sec[..sec.find("</table>").unwrap()];
    for f in &d.new_failures {
        let anchor = hilrig_reports::html::case_anchor(&f.id);
        assert!(sec.contains(&format!("href=\"#{anchor}\"")), "{}", f.id);
        assert!(html.contains(&format!("id=\"{anchor}\"")), "target row");
    }
}

#[test]
fn artifact_links_name_their_files() {
    let run = sample_run(7);
    let html = to_html(&run, None, None, &HtmlOptions::default());
    assert!(html.contains(">console.log</a>"));
    assert!(html.contains(">teardown.json</a>"));
    assert!(!html.contains(">other</a>") && !html.contains(">console</a>"));
}

#[test]
fn empty_artifacts_are_marked_not_linked() {
    let dir = tempfile::tempdir().unwrap();
    let run = sample_run(7);
    let c = run.cases.iter().find(|c| !c.artifacts.is_empty()).unwrap();
    for (i, a) in c.artifacts.iter().enumerate() {
        let p = dir.path().join(&a.path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, if i == 0 { "" } else { "something" }).unwrap();
    }
    let paths = write_reports(&run, None, dir.path()).unwrap();
    let html = std::fs::read_to_string(paths.html).unwrap();
    let empty = &c.artifacts[0];
    assert!(html.contains(&format!(
        "{} (empty)",
        hilrig_reports::html::artifact_label(empty)
    )));
    assert!(!html.contains(&format!("href=\"{}\"", empty.path)));
    assert!(html.contains(&format!("href=\"{}\"", c.artifacts[1].path)));
}

#[test]
fn report_json_is_read_as_its_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = sample_run(7);
    let paths = write_reports(&run, None, dir.path()).unwrap();
    let back = Run::load(&paths.json).expect("report.json reads as its run");
    assert!(back == run);
    // And `hilrig report <dir>/report.json` works.
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        cmd: ReportCmd,
    }
    use clap::Parser;
    let cmd = Cli::try_parse_from(["report", paths.json.to_str().unwrap(), "--exit-zero"])
        .unwrap()
        .cmd;
    assert_eq!(run_cli(cmd), std::process::ExitCode::SUCCESS);
}

fn run_cli(cmd: ReportCmd) -> std::process::ExitCode {
    hilrig_reports::run(cmd).expect("hilrig report on report.json")
}

#[test]
fn junit_suites_carry_wall_time_and_hostname() {
    let run = sample_run(7);
    let xml = to_junit(&run).unwrap();
    let wall = format!("time=\"{:.3}\"", run.duration_ms() as f64 / 1000.0);
    let suites: Vec<&str> = xml
        .split("<testsuite ")
        .skip(1)
        .map(|s| &s[..s.find('>').unwrap()])
        .collect();
    assert!(!suites.is_empty());
    for s in suites {
        assert!(s.contains(&wall), "suite time is the run's wall time: {s}");
        let host = &s[s.find("hostname=\"").expect("hostname") + 10..];
        assert!(host.contains("sim-0"), "the hosts the suite ran on: {s}");
    }
}
