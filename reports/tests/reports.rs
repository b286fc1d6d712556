//! Model, JUnit, JSON, HTML, diff and CLI tests on generated sample runs.

use hilrig_reports::*;
use quick_xml::events::Event;
use quick_xml::Reader;
use std::collections::BTreeMap;
use std::path::Path;

fn run_with_all_outcomes() -> Run {
    let run = sample_run(7);
    for o in Outcome::ALL {
        assert!(run.cases.iter().any(|c| c.outcome == o), "sample lacks {o}");
    }
    run
}

#[test]
fn sample_is_deterministic_and_valid() {
    let a = sample_run(3);
    assert!(a == sample_run(3));
    assert!(a != sample_run(4));
    a.validate().unwrap();
    assert_eq!(a.cases.len(), 40);
    // Same ids for every seed, so seeds diff meaningfully.
    let ids = |r: &Run| r.cases.iter().map(|c| c.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&a), ids(&sample_run(99)));
    // Realistic metrics are present.
    assert!(a.cases.iter().any(|c| !c.metrics.blackouts_us.is_empty()));
    assert!(a
        .cases
        .iter()
        .any(|c| c.metrics.trap_latency.histogram.is_some()));
    assert!(a
        .cases
        .iter()
        .any(|c| !c.metrics.trap_latency.samples_us.is_empty()));
    assert!(a.cases.iter().any(|c| c.metrics.counters.len() > 1));
}

#[test]
fn run_json_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("run.json");
    let run = sample_run(1);
    run.save(&p).unwrap();
    assert!(Run::load(&p).unwrap() == run, "run.json round trip");
}

#[test]
fn non_finite_samples_survive_a_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("run.json");
    let mut run = sample_run(1);
    run.cases[0].metrics.blackouts_us = vec![120.0, f64::NAN, f64::INFINITY];
    run.cases[0].metrics.trap_latency.samples_us.push(f64::NAN);
    run.save(&p).unwrap();
    let back = Run::load(&p).unwrap();
    let b = &back.cases[0].metrics.blackouts_us;
    assert_eq!(b.len(), 3);
    assert_eq!(b[0], 120.0);
    assert!(b[1].is_nan() && b[2].is_nan());
    let html = to_html(&back, None, None, &HtmlOptions::default());
    for bad in ["NaN", "\"inf\"", "\"-inf\"", ">inf<", " inf "] {
        if let Some(i) = html.find(bad) {
            panic!("{bad} in html: {}", &html[i.saturating_sub(200)..i + 50]);
        }
    }
    to_json(&back, None).unwrap();
}

#[test]
fn old_minimal_run_loads_with_defaults() {
    let text = r#"{"id":"r1","campaign":"smoke","started_ms":1,"finished_ms":2,
        "cases":[{"id":"a/model/tenant@sim","attack":"a","backend":"model","profile":"tenant",
                  "host":"sim-01","outcome":"pass","duration_ms":5,
                  "artifacts":[{"kind":"pcap","path":"x.pcap"}]}]}"#;
    let run = Run::from_json(text, Path::new("mem.json")).unwrap();
    assert_eq!(run.schema, SCHEMA_VERSION);
    assert_eq!(run.cases[0].metrics, Metrics::default());
    // Unknown artifact kinds from a newer runner read as `other`.
    assert_eq!(run.cases[0].artifacts[0].kind, ArtifactKind::Other);
}

#[test]
fn bad_input_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken-run.json");
    std::fs::write(&p, "{\n  \"id\": \"x\",\n  \"campaign\": 5\n}").unwrap();
    let e = Run::load(&p).unwrap_err().to_string();
    assert!(e.contains("broken-run.json"), "{e}");
    assert!(e.contains("line 3"), "{e}");

    std::fs::write(&p, r#"{"schema": 99, "id": "x"}"#).unwrap();
    let e = Run::load(&p).unwrap_err().to_string();
    assert!(e.contains("broken-run.json") && e.contains("99"), "{e}");

    let mut run = sample_run(1);
    let dup = run.cases[0].clone();
    run.cases.push(dup);
    std::fs::write(&p, serde_json::to_string(&run).unwrap()).unwrap();
    let e = Run::load(&p).unwrap_err().to_string();
    assert!(e.contains("broken-run.json") && e.contains("twice"), "{e}");

    let e = Run::load(&dir.path().join("missing.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.json"), "{e}");
}

/// Parse JUnit XML back: root attributes, and per testcase the child verdict
/// elements with their `type`, plus properties.
#[derive(Debug, Default)]
struct Parsed {
    root: BTreeMap<String, String>,
    suites: usize,
    testcases: usize,
    /// element name (+ "/" + type) -> count, for children of testcases.
    verdicts: BTreeMap<String, usize>,
    flaky_props: usize,
    texts: String,
}

fn parse_junit(xml: &str) -> Parsed {
    let mut r = Reader::from_str(xml);
    let mut p = Parsed::default();
    let mut stack: Vec<String> = vec![];
    loop {
        let ev = r.read_event().expect("well-formed XML");
        let (e, is_empty) = match &ev {
            Event::Start(e) => (Some(e.clone()), false),
            Event::Empty(e) => (Some(e.clone()), true),
            Event::End(_) => {
                stack.pop();
                continue;
            }
            Event::Text(t) => {
                p.texts.push_str(&t.decode().unwrap());
                continue;
            }
            Event::GeneralRef(g) => {
                p.texts.push('&');
                p.texts.push_str(&g.decode().unwrap());
                p.texts.push(';');
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        let e = e.unwrap();
        let name = String::from_utf8(e.name().as_ref().to_vec()).unwrap();
        let attr = |k: &str| -> Option<String> {
            e.try_get_attribute(k).unwrap().map(|a| {
                a.normalized_value(quick_xml::XmlVersion::Explicit1_0)
                    .unwrap()
                    .into_owned()
            })
        };
        let parent = stack.last().cloned().unwrap_or_default();
        match name.as_str() {
            "testsuites" => {
                for k in [
                    "tests",
                    "failures",
                    "errors",
                    "skipped",
                    "time",
                    "timestamp",
                ] {
                    p.root.insert(k.into(), attr(k).unwrap_or_default());
                }
            }
            "testsuite" => p.suites += 1,
            "testcase" => {
                p.testcases += 1;
                assert!(attr("classname").is_some() && attr("name").is_some());
                let t: f64 = attr("time").unwrap().parse().unwrap();
                assert!(t >= 0.0);
            }
            "failure" | "error" | "skipped" | "flakyFailure" | "flakyError"
                if parent == "testcase" =>
            {
                let key = match attr("type") {
                    Some(t) => format!("{name}/{t}"),
                    None => name.clone(),
                };
                *p.verdicts.entry(key).or_default() += 1;
            }
            "property"
                if stack.iter().rev().nth(1).map(String::as_str) == Some("testcase")
                    && attr("name").as_deref() == Some("flaky") =>
            {
                assert_eq!(attr("value").as_deref(), Some("true"));
                p.flaky_props += 1;
            }
            _ => {}
        }
        if !is_empty {
            stack.push(name);
        }
    }
    p
}

#[test]
fn junit_parses_back_with_the_right_counts() {
    let run = run_with_all_outcomes();
    let xml = to_junit(&run).unwrap();
    let c = run.counts();
    let p = parse_junit(&xml);
    assert_eq!(p.testcases, c.total);
    assert_eq!(p.suites, 2, "one suite per backend");
    assert_eq!(p.root["tests"], c.total.to_string());
    assert_eq!(p.root["failures"], (c.fail + c.timeout).to_string());
    assert_eq!(p.root["errors"], c.infra.to_string());
    assert_eq!(p.root["skipped"], c.skipped.to_string());
    assert!(!p.root["timestamp"].ends_with('Z') && p.root["timestamp"].contains('T'));
    assert_eq!(p.verdicts.get("failure/fail").copied().unwrap_or(0), c.fail);
    assert_eq!(
        p.verdicts.get("failure/timeout").copied().unwrap_or(0),
        c.timeout
    );
    assert_eq!(
        p.verdicts.get("error/infrastructure").copied().unwrap_or(0),
        c.infra
    );
    assert_eq!(p.verdicts.get("skipped").copied().unwrap_or(0), c.skipped);
    assert_eq!(p.flaky_props, c.flaky);
    let failed_attempts_of_flaky: usize = run
        .cases
        .iter()
        .filter(|x| x.outcome == Outcome::Flaky)
        .map(|x| {
            x.attempts
                .iter()
                .filter(|a| !a.outcome.is_success())
                .count()
        })
        .sum();
    assert_eq!(
        p.verdicts.get("flakyFailure/fail").copied().unwrap_or(0),
        failed_attempts_of_flaky
    );
    assert!(p.texts.contains("FLAKY: passed after"));
}

#[test]
fn junit_escapes_hostile_text() {
    let mut run = sample_run(2);
    let c = &mut run.cases[0];
    c.outcome = Outcome::Fail;
    c.message = "<script>alert(\"x\")</script> & ]]> \u{1b}[31mred\u{1b}[0m \u{0}nul\nline2".into();
    c.attack = "a<b>&\"c'".into();
    let xml = to_junit(&run).unwrap();
    assert!(!xml.contains("<script>"));
    assert!(!xml.contains('\u{1b}') && !xml.contains('\u{0}'));
    let p = parse_junit(&xml);
    assert_eq!(p.testcases, run.cases.len());
    assert!(p.texts.contains(" red nul"), "{}", p.texts);
    assert!(!p.texts.contains("[31m"), "ANSI colours stripped");
    // Without ANSI sequences, forbidden characters stay visible as text.
    run.cases[0].message = "nul\u{0}here".into();
    let p = parse_junit(&to_junit(&run).unwrap());
    assert!(p.texts.contains("nul\\x00here"), "{}", p.texts);
}

#[test]
fn empty_run_renders_everything() {
    let run = Run {
        schema: SCHEMA_VERSION,
        id: "empty".into(),
        campaign: "smoke".into(),
        started_ms: 0,
        finished_ms: 0,
        hosts: vec![],
        cases: vec![],
    };
    let xml = to_junit(&run).unwrap();
    let p = parse_junit(&xml);
    assert_eq!(p.testcases, 0);
    assert_eq!(p.root["tests"], "0");
    let html = to_html(&run, None, None, &HtmlOptions::default());
    assert!(html.contains("no data"));
    let j: serde_json::Value = serde_json::from_str(&to_json(&run, None).unwrap()).unwrap();
    assert_eq!(j["summary"]["counts"]["total"], 0);
    // A case that ran but recorded no metrics at all.
    let mut one = sample_run(1);
    one.cases.truncate(1);
    one.cases[0].metrics = Metrics::default();
    let html = to_html(
        &one,
        Some(&diff(&run, &one)),
        Some(&run),
        &HtmlOptions::default(),
    );
    assert!(html.matches("no data").count() >= 4, "{html}");
}

#[test]
fn json_report_has_summary_and_run() {
    let prev = sample_run(5);
    let run = sample_run(6);
    let d = diff(&prev, &run);
    let text = to_json(&run, Some(&d)).unwrap();
    let rep: JsonReport = serde_json::from_str(&text).unwrap();
    assert!(rep.run == run, "run inside report.json");
    assert_eq!(rep.summary.counts, run.counts());
    assert_eq!(rep.diff.as_ref(), Some(&d));
    let s = rep.summary.trap_latency_us.expect("latency summary");
    assert!(s.median > 5.0 && s.median < 40.0, "{s:?}");
    assert!(s.p99 >= s.median);
    assert!(rep.summary.blackout_us.is_some());
    assert_eq!(rep.summary.hosts.len(), 4);
}

fn set(run: &mut Run, id: &str, o: Outcome) {
    run.cases.iter_mut().find(|c| c.id == id).unwrap().outcome = o;
}

#[test]
fn diff_classifies_by_case_id() {
    let mut prev = sample_run(1);
    for c in &mut prev.cases {
        c.outcome = Outcome::Pass;
    }
    let mut cur = prev.clone();
    cur.id = "next".into();
    let ids: Vec<String> = prev.cases.iter().map(|c| c.id.clone()).collect();
    set(&mut prev, &ids[1], Outcome::Fail); // fixed
    set(&mut prev, &ids[2], Outcome::Fail); // still failing
    set(&mut cur, &ids[2], Outcome::Timeout);
    set(&mut cur, &ids[3], Outcome::Fail); // new failure
    set(&mut cur, &ids[4], Outcome::Flaky);
    set(&mut cur, &ids[5], Outcome::Infra);
    set(&mut prev, &ids[6], Outcome::Infra); // infra -> fail: a new failure
    set(&mut cur, &ids[6], Outcome::Fail);
    cur.cases.retain(|c| c.id != ids[7]); // removed
    let mut added = cur.cases[0].clone();
    added.id = "new-attack/model/tenant@sim".into();
    added.outcome = Outcome::Fail;
    cur.cases.push(added);

    let d = diff(&prev, &cur);
    let ids_of = |v: &[CaseChange]| v.iter().map(|c| c.id.clone()).collect::<Vec<_>>();
    let mut nf = ids_of(&d.new_failures);
    nf.sort();
    let mut want = vec![
        ids[3].clone(),
        ids[6].clone(),
        "new-attack/model/tenant@sim".to_string(),
    ];
    want.sort();
    assert_eq!(nf, want);
    assert_eq!(ids_of(&d.fixed), vec![ids[1].clone()]);
    assert_eq!(ids_of(&d.still_failing), vec![ids[2].clone()]);
    assert_eq!(d.still_failing[0].prev, Some(Outcome::Fail));
    assert_eq!(d.still_failing[0].cur, Some(Outcome::Timeout));
    assert_eq!(ids_of(&d.flaky), vec![ids[4].clone()]);
    assert_eq!(ids_of(&d.infra), vec![ids[5].clone()]);
    assert_eq!(ids_of(&d.removed), vec![ids[7].clone()]);
    assert_eq!(
        ids_of(&d.added),
        vec!["new-attack/model/tenant@sim".to_string()]
    );
    assert!(d.same_campaign);
    assert!(!d.no_regressions());
    // Flake rates: the flaky case's host has a non-zero rate, previous rate 0.
    let host = &cur.case(&ids[4]).unwrap().host;
    let hf = d.host_flake_rates.iter().find(|h| &h.host == host).unwrap();
    assert!(hf.flaky == 1 && hf.rate > 0.0 && hf.prev_rate == Some(0.0));
    // A run against itself: nothing new, nothing fixed.
    let same = diff(&cur, &cur);
    assert!(same.new_failures.is_empty() && same.fixed.is_empty());
}

#[test]
fn html_is_self_contained_and_escaped() {
    let prev = sample_run(11);
    let mut run = run_with_all_outcomes();
    run.cases[0].message = "<script>alert('x')</script><img src=x onerror=alert(1)>".into();
    run.cases[0].artifacts.push(Artifact {
        kind: ArtifactKind::Other,
        path: "javascript:alert(1)".into(),
    });
    let d = diff(&prev, &run);
    let html = to_html(&run, Some(&d), Some(&prev), &HtmlOptions::default());
    assert!(
        !html.to_lowercase().contains("<script"),
        "no script element"
    );
    assert!(!html.contains("<img"));
    assert!(html.contains("&lt;script&gt;alert("));
    assert!(!html.contains("href=\"javascript:"));
    for external in ["http://", "https://", "src=\"", "@import", "url("] {
        let hits: Vec<_> = html.match_indices(external).collect();
        // The only URL allowed is the SVG namespace.
        assert!(
            hits.iter()
                .all(|(i, _)| html[*i..].starts_with("http://www.w3.org/2000/svg")),
            "external reference {external} in page"
        );
    }
    assert!(html.contains(r#"id="summary""#));
    assert!(html.contains(r#"id="diff""#));
    assert!(html.matches("<svg").count() >= 4 + 3);
    assert!(html.contains("Counters on sim-01"));
    assert!(html.contains("MMIO trap latency"));
    assert!(html.contains("Live-patch blackouts"));
    assert!(html.contains("Teardown times"));
    assert!(html.contains("Per-host flake rates"));
    assert!(html.contains(r#"href="cases/"#));
    assert!(!html.contains("NaN"));
}

#[test]
fn write_reports_writes_three_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out/nested");
    let run = sample_run(8);
    let prev = sample_run(9);
    let p = write_reports(&run, Some(&prev), &out).unwrap();
    for f in [&p.junit, &p.json, &p.html] {
        assert!(f.starts_with(&out));
        assert!(
            std::fs::metadata(f).unwrap().len() > 1000,
            "{}",
            f.display()
        );
    }
    // No temporary files left behind.
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    cmd: ReportCmd,
}

fn cli(args: &[&str]) -> anyhow::Result<std::process::ExitCode> {
    use clap::Parser;
    let mut v = vec!["report"];
    v.extend_from_slice(args);
    run(Cli::try_parse_from(v)?.cmd)
}

#[test]
fn cli_reads_runs_and_sets_exit_code() {
    use std::process::ExitCode;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Sample mode writes the runs and the reports.
    let code = cli(&[
        "--sample",
        "7",
        "--prev-sample",
        "6",
        "-o",
        d.to_str().unwrap(),
    ])
    .unwrap();
    assert_eq!(code, ExitCode::from(1), "sample 7 has failures");
    assert!(d.join("run.json").exists() && d.join("report.html").exists());

    // File mode with the output elsewhere: links point back to the run dir.
    let out = d.join("elsewhere");
    let code = cli(&[
        d.join("run.json").to_str().unwrap(),
        "--prev",
        d.join("prev-run.json").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--exit-zero",
    ])
    .unwrap();
    assert_eq!(code, ExitCode::SUCCESS);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.contains(r#"href="../cases/"#),
        "links lead back to the run dir"
    );

    // A green run exits 0.
    let mut green = sample_run(1);
    green.cases.retain(|c| c.outcome.is_success());
    green.save(&d.join("green.json")).unwrap();
    assert_eq!(
        cli(&[d.join("green.json").to_str().unwrap()]).unwrap(),
        ExitCode::SUCCESS
    );

    // Bad input: an error naming the file.
    std::fs::write(d.join("bad.json"), "not json").unwrap();
    let e = cli(&[d.join("bad.json").to_str().unwrap()]).unwrap_err();
    assert!(format!("{e:#}").contains("bad.json"));
    assert!(cli(&[]).is_err(), "a run file or --sample is required");
}
