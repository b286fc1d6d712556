//! One self-contained HTML page: no external resources, no JavaScript. All text
//! is escaped; a Content-Security-Policy forbids scripts outright as a second line
//! of defence (case messages carry console output and may contain anything).

use crate::diff::{host_flake_rates, CaseChange, HostFlake, RunDiff};
use crate::json::RunSummary;
use crate::model::{CaseResult, Outcome, Run};
use crate::stats::{rebin_groups_log10, trap_latency_by_backend, MergedLatency, Summary};
use crate::svg::{self, esc, Marker, Series};
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Options for the HTML page.
#[derive(Debug, Clone, Default)]
pub struct HtmlOptions {
    /// Prefix put before artifact paths in links (e.g. `../run-42/`), so the
    /// page works when written away from the run directory. Empty: the page sits
    /// in the run directory.
    pub artifact_base: String,
    /// Artifact paths (as in the run) found empty on disk: listed as `(empty)`
    /// without a link. [`crate::write_reports_with`] fills it from the run directory.
    pub empty_artifacts: std::collections::BTreeSet<String>,
    /// When set, each case id links to `{case_link_base}{percent-encoded id}`
    /// (the lab service's case history).
    pub case_link_base: Option<String>,
}

/// Colour of an outcome (background, text).
pub fn outcome_colors(o: Outcome) -> (&'static str, &'static str) {
    match o {
        Outcome::Pass => ("#1e7b34", "#fff"),
        Outcome::Fail => ("#c62828", "#fff"),
        Outcome::Timeout => ("#8e24aa", "#fff"),
        Outcome::Infra => ("#6d4c41", "#fff"),
        Outcome::Flaky => ("#f0a500", "#222"),
        Outcome::Skipped => ("#9e9e9e", "#fff"),
    }
}

/// Characters escaped in artifact links (paths keep their slashes).
const PATH_SET: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'\\')
    .add(b'\'');

/// The `href` for an artifact: percent-encoded, never a `javascript:` (or any
/// other scheme) URL — a first segment with a colon gets a `./` prefix.
pub fn artifact_href(base: &str, path: &str) -> String {
    let first = path.split('/').next().unwrap_or("");
    let path = if first.contains(':') {
        format!("./{path}")
    } else {
        path.to_string()
    };
    let full = if path.starts_with('/') || base.is_empty() {
        path
    } else {
        format!("{}/{}", base.trim_end_matches('/'), path)
    };
    utf8_percent_encode(&full, PATH_SET).to_string()
}

fn ts(unix_ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC")
}

/// `1 h 02 min`, `3 min 05 s`, `4.2 s`, `350 ms`.
pub fn fmt_duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    if s >= 3600 {
        format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else if ms >= 1000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{ms} ms")
    }
}

fn fmt_us(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.1} µs")
    }
}

fn badge(o: Outcome) -> String {
    let (bg, fg) = outcome_colors(o);
    format!(r#"<span class="badge" style="background:{bg};color:{fg}">{o}</span>"#)
}

const CSS: &str = r#"
:root{color-scheme:light}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{padding:18px 28px;background:#fff;border-bottom:1px solid #ddd;display:flex;align-items:center;gap:18px;flex-wrap:wrap}
header h1{font-size:22px;margin:0}
.status{font-weight:700;padding:4px 12px;border-radius:4px;color:#fff}
main{padding:8px 28px 40px}
section{margin:22px 0}
h2{font-size:18px;border-bottom:2px solid #e3e3e3;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}
.cards{display:flex;gap:10px;flex-wrap:wrap}
.card{min-width:92px;padding:8px 12px;border-radius:6px;color:#fff}
.card .n{font-size:26px;font-weight:700;display:block}
.card .l{font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.facts{border-collapse:collapse;margin-top:12px}
.facts th{text-align:left;padding:2px 14px 2px 0;color:#555;font-weight:600}
table.grid{border-collapse:collapse;width:100%;background:#fff}
table.grid th,table.grid td{border:1px solid #e0e0e0;padding:4px 7px;vertical-align:top;text-align:left}
table.grid th{background:#f0f0f0;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.badge{display:inline-block;min-width:62px;text-align:center;font-weight:700;font-size:12px;padding:1px 6px;border-radius:3px}
.msg{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;white-space:pre-wrap;word-break:break-word;max-width:520px}
.id{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
td.case,td.host{white-space:nowrap}
.muted{color:#777}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:14px}
.plots svg{width:100%;height:auto;border:1px solid #e0e0e0;border-radius:4px;background:#fff}
.warn{background:#fff4e5;border-left:4px solid #f0a500;padding:6px 10px}
.good{color:#1e7b34;font-weight:600}.bad{color:#c62828;font-weight:600}
details summary{cursor:pointer}
tr.o-fail td:first-child{border-left:4px solid #c62828}
tr.o-timeout td:first-child{border-left:4px solid #8e24aa}
tr.o-infra td:first-child{border-left:4px solid #6d4c41}
tr.o-flaky td:first-child{border-left:4px solid #f0a500}
a{color:#0b57d0}
"#;

/// Render the page. `prev` (the previous run) only supplies its start time to
/// the diff section; the comparison itself is `diff`.
pub fn to_html(
    run: &Run,
    diff: Option<&RunDiff>,
    prev: Option<&Run>,
    opts: &HtmlOptions,
) -> String {
    let summary = RunSummary::of(run, diff);
    let mut h = String::with_capacity(64 * 1024);
    let title = format!("{} — {}", run.campaign, run.id);
    let (status, status_bg) = if summary.green {
        ("GREEN", "#1e7b34")
    } else {
        ("RED", "#c62828")
    };
    let _ = write!(
        h,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>hilrig report: {t}</title><style>{CSS}</style></head><body>
<header><h1>hilrig · {t}</h1><span class="status" style="background:{status_bg}">{status}</span>"#,
        t = esc(&title)
    );
    if let Some(d) = diff {
        let (cls, text) = if d.new_failures.is_empty() {
            ("good", "no new failures".to_string())
        } else {
            ("bad", format!("{} new failure(s)", d.new_failures.len()))
        };
        let _ = write!(
            h,
            r#"<span class="{cls}">{text} since {p}</span>"#,
            p = esc(&d.prev_id)
        );
    }
    h.push_str("</header><main>\n");
    summary_section(&mut h, run, &summary);
    diff_section(&mut h, run, diff, prev);
    plots_section(&mut h, run);
    cases_section(&mut h, run, opts);
    let _ = writeln!(
        h,
        r#"<footer class="muted" style="padding:0 28px 20px">Generated by hilrig-reports {} from run schema {}.</footer></main></body></html>"#,
        env!("CARGO_PKG_VERSION"),
        run.schema
    );
    h
}

fn summary_section(h: &mut String, run: &Run, s: &RunSummary) {
    h.push_str(r#"<section id="summary"><h2>Summary</h2><div class="cards">"#);
    let (tb, tf) = ("#37474f", "#fff");
    let _ = write!(
        h,
        r#"<div class="card" style="background:{tb};color:{tf}"><span class="n">{}</span><span class="l">cases</span></div>"#,
        s.counts.total
    );
    for o in Outcome::ALL {
        let (bg, fg) = outcome_colors(o);
        let _ = write!(
            h,
            r#"<div class="card outcome-{k}" style="background:{bg};color:{fg}"><span class="n">{n}</span><span class="l">{k}</span></div>"#,
            k = o.as_str(),
            n = s.counts.get(o)
        );
    }
    h.push_str("</div><table class=\"facts\">");
    let fact = |h: &mut String, k: &str, v: String| {
        let _ = write!(h, "<tr><th>{}</th><td>{}</td></tr>", esc(k), v);
    };
    fact(h, "Campaign", esc(&run.campaign));
    fact(
        h,
        "Run",
        format!(r#"<span class="id">{}</span>"#, esc(&run.id)),
    );
    fact(
        h,
        "Time",
        format!(
            "{} → {} ({})",
            ts(run.started_ms),
            ts(run.finished_ms),
            fmt_duration_ms(run.duration_ms())
        ),
    );
    let hosts: Vec<String> = run
        .hosts
        .iter()
        .map(|host| {
            let mut t = esc(&host.name);
            let mut tags = host.tags.clone();
            if host.simulated {
                tags.push("simulated".into());
            }
            if !tags.is_empty() {
                let _ = write!(
                    t,
                    r#" <span class="muted">({})</span>"#,
                    esc(&tags.join(", "))
                );
            }
            t
        })
        .collect();
    fact(
        h,
        &format!("Hosts ({})", run.hosts.len()),
        if hosts.is_empty() {
            r#"<span class="muted">none listed</span>"#.into()
        } else {
            hosts.join(", ")
        },
    );
    fact(h, "Alarms", s.alarms.to_string());
    let stat = |x: &Option<Summary>| match x {
        Some(x) => format!(
            "median {} · p99 {} · max {} <span class=\"muted\">(n = {})</span>",
            fmt_us(x.median),
            fmt_us(x.p99),
            fmt_us(x.max),
            x.count
        ),
        None => r#"<span class="muted">no data</span>"#.into(),
    };
    fact(h, "MMIO trap latency", stat(&s.trap_latency_us));
    for (backend, sum) in &s.trap_latency_by_backend_us {
        fact(h, &format!("… on {backend}"), stat(&Some(*sum)));
    }
    fact(h, "Live-patch blackout", stat(&s.blackout_us));
    fact(h, "Teardown", stat(&s.teardown_us));
    h.push_str("</table></section>\n");
}

fn change_table(h: &mut String, title: &str, id: &str, rows: &[CaseChange], empty: &str) {
    change_table_linked(h, title, id, rows, empty, true)
}

/// `link`: the case ids link to their rows in the cases table (not for cases no
/// longer run, which have no row).
fn change_table_linked(
    h: &mut String,
    title: &str,
    id: &str,
    rows: &[CaseChange],
    empty: &str,
    link: bool,
) {
    let _ = write!(h, r#"<h3 id="{id}">{} ({})</h3>"#, esc(title), rows.len());
    if rows.is_empty() {
        let _ = write!(h, r#"<p class="muted">{}</p>"#, esc(empty));
        return;
    }
    h.push_str(
        r#"<table class="grid"><tr><th>Case</th><th>Before</th><th>Now</th><th>Message</th></tr>"#,
    );
    for r in rows {
        let b = |o: Option<Outcome>| o.map_or(r#"<span class="muted">—</span>"#.to_string(), badge);
        let _ = write!(
            h,
            r#"<tr><td class="id">{}</td><td>{}</td><td>{}</td><td class="msg">{}</td></tr>"#,
            if link {
                format!(
                    r##"<a href="#{}">{}</a>"##,
                    esc(&case_anchor(&r.id)),
                    esc(&r.id)
                )
            } else {
                esc(&r.id)
            },
            b(r.prev),
            b(r.cur),
            esc(&r.message)
        );
    }
    h.push_str("</table>");
}

fn flake_table(h: &mut String, rates: &[HostFlake], with_prev: bool) {
    h.push_str(r#"<h3 id="flake-rates">Per-host flake rates</h3>"#);
    if rates.is_empty() {
        h.push_str(r#"<p class="muted">no hosts</p>"#);
        return;
    }
    h.push_str(
        r#"<table class="grid"><tr><th>Host</th><th>Ran</th><th>Flaky</th><th>Flake rate</th>"#,
    );
    if with_prev {
        h.push_str("<th>Previous</th>");
    }
    h.push_str("<th>Infra attempts</th></tr>");
    for r in rates {
        let _ = write!(
            h,
            r#"<tr><td>{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{:.1} %</td>"#,
            esc(&r.host),
            r.ran,
            r.flaky,
            r.rate * 100.0
        );
        if with_prev {
            let cell = match r.prev_rate {
                Some(p) => {
                    let arrow = if r.rate > p + 1e-9 {
                        r#" <span class="bad">▲</span>"#
                    } else if r.rate + 1e-9 < p {
                        r#" <span class="good">▼</span>"#
                    } else {
                        ""
                    };
                    format!("{:.1} %{arrow}", p * 100.0)
                }
                None => r#"<span class="muted">new host</span>"#.into(),
            };
            let _ = write!(h, r#"<td class="num">{cell}</td>"#);
        }
        let _ = write!(h, r#"<td class="num">{}</td></tr>"#, r.infra_attempts);
    }
    h.push_str("</table>");
}

fn diff_section(h: &mut String, run: &Run, diff: Option<&RunDiff>, prev: Option<&Run>) {
    h.push_str(r#"<section id="diff"><h2>Compared with the previous run</h2>"#);
    let Some(d) = diff else {
        h.push_str(r#"<p class="muted">No previous run given: nothing to compare.</p>"#);
        flake_table(h, &host_flake_rates(run), false);
        h.push_str("</section>\n");
        return;
    };
    let when = prev
        .map(|p| format!(" (started {})", ts(p.started_ms)))
        .unwrap_or_default();
    let _ = write!(
        h,
        r#"<p>Previous run <span class="id">{}</span>{when}.</p>"#,
        esc(&d.prev_id)
    );
    if !d.same_campaign {
        h.push_str(r#"<p class="warn">The previous run is of a different campaign; the comparison may mislead.</p>"#);
    }
    change_table(
        h,
        "New failures",
        "new-failures",
        &d.new_failures,
        "none — nothing regressed",
    );
    change_table(h, "Fixed", "fixed", &d.fixed, "none");
    change_table(
        h,
        "Still failing",
        "still-failing",
        &d.still_failing,
        "none",
    );
    change_table(h, "Flaky", "flaky", &d.flaky, "none");
    change_table(h, "Infrastructure faults", "infra", &d.infra, "none");
    if !d.added.is_empty() {
        change_table(h, "New cases", "added", &d.added, "none");
    }
    if !d.removed.is_empty() {
        change_table_linked(
            h,
            "Cases no longer run",
            "removed",
            &d.removed,
            "none",
            false,
        );
    }
    flake_table(h, &d.host_flake_rates, true);
    h.push_str("</section>\n");
}

/// The live-patch blackout bound drawn on the blackout plot (DESIGN: 1 ms).
pub const BLACKOUT_BOUND_US: f64 = 1000.0;

/// The anchor of a case's row in the cases table (`#case-…`).
pub fn case_anchor(id: &str) -> String {
    format!(
        "case-{}",
        id.replace(|ch: char| !ch.is_ascii_alphanumeric(), "-")
    )
}

/// The text of an artifact link: its file name (kind in the title), so a row of
/// links reads `console.log alarms.json`, not `other other console`.
pub fn artifact_label(a: &crate::model::Artifact) -> String {
    let name = a
        .path
        .rsplit('/')
        .find(|p| !p.is_empty())
        .unwrap_or(a.path.as_str());
    if name.is_empty() {
        a.kind.as_str().to_string()
    } else {
        name.to_string()
    }
}

fn plots_section(h: &mut String, run: &Run) {
    h.push_str(r#"<section id="plots"><h2>Plots</h2><div class="plots">"#);
    // Counter timelines, one chart per host (its device's counters across the
    // run). Each case starts from its own state file, so each case is its own
    // stretch of line: the line breaks between cases instead of falling from
    // one case's counts to the next case's fresh zero (which reads as a rollback).
    let mut by_host: BTreeMap<&str, Vec<&CaseResult>> = BTreeMap::new();
    for c in &run.cases {
        if !c.metrics.counters.is_empty() {
            by_host.entry(c.host.as_str()).or_default().push(c);
        }
    }
    if by_host.is_empty() {
        h.push_str(&svg::no_data("Counters over the run", "no OOB readings"));
    }
    let t0 = run.started_ms as f64;
    let span_ms = run
        .cases
        .iter()
        .flat_map(|c| c.metrics.counters.iter())
        .map(|r| r.t_ms as f64 - t0)
        .fold(0.0, f64::max);
    let (unit_ms, unit) = if span_ms < 120_000.0 {
        (1000.0, "seconds since run start")
    } else {
        (60_000.0, "minutes since run start")
    };
    for (host, mut cases) in by_host {
        cases.sort_by_key(|c| c.metrics.counters.iter().map(|r| r.t_ms).min());
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        let mut master = vec![];
        for (k, c) in cases.iter().enumerate() {
            let mut readings: Vec<&crate::model::CounterReading> =
                c.metrics.counters.iter().collect();
            readings.sort_by_key(|r| r.t_ms);
            if k > 0 {
                // A break: the next case's device is a fresh one.
                for pts in series.values_mut() {
                    pts.push((f64::NAN, f64::NAN));
                }
                master.push((f64::NAN, f64::NAN));
            }
            for r in &readings {
                let x = (r.t_ms as f64 - t0) / unit_ms;
                for (region, v) in &r.regions {
                    series
                        .entry(region.clone())
                        .or_default()
                        .push((x, *v as f64));
                }
                master.push((x, r.master as f64));
            }
        }
        let mut list: Vec<Series> = series
            .into_iter()
            .map(|(name, points)| Series { name, points })
            .collect();
        list.push(Series {
            name: "master".into(),
            points: master,
        });
        h.push_str(&svg::line_chart(
            &format!("Counters on {host} (one stretch per case)"),
            unit,
            "counter value",
            &list,
            true,
        ));
    }
    // MMIO trap latency histogram, stacked by backend.
    let by_backend = trap_latency_by_backend(run);
    let all = MergedLatency::merge(by_backend.values());
    let groups: Vec<(String, &MergedLatency)> =
        by_backend.iter().map(|(k, v)| (k.clone(), v)).collect();
    // One p99 line per backend, in the backend's colour.
    let markers: Vec<Marker> = by_backend
        .iter()
        .enumerate()
        .filter_map(|(i, (name, m))| {
            m.summary().map(|s| {
                Marker::new(
                    format!("{name} p99"),
                    s.p99,
                    svg::PALETTE[i % svg::PALETTE.len()],
                )
            })
        })
        .collect();
    let title = format!("MMIO trap latency by backend (n = {})", all.count());
    // Log scale: the model's bulk sits at a few µs, the rtl's and the outliers
    // at hundreds to thousands; a linear axis squeezes those into nothing.
    h.push_str(&match rebin_groups_log10(&groups, 48) {
        Some(b) => svg::histogram_log10(
            &title,
            "µs per trapped access (log scale)",
            &b.edges,
            &b.groups,
            b.overflow,
            &markers,
        ),
        None => svg::no_data(&title, "no trapped accesses"),
    });
    // Blackouts and teardowns: dot plots per case.
    let groups = |f: &dyn Fn(&CaseResult) -> &Vec<f64>| -> Vec<(String, Vec<f64>)> {
        run.cases
            .iter()
            .filter(|c| !f(c).is_empty())
            .map(|c| (c.id.clone(), f(c).clone()))
            .collect()
    };
    h.push_str(&svg::dot_plot(
        "Live-patch blackouts (a case's own bound: its expected column)",
        "cases",
        "µs",
        &groups(&|c| &c.metrics.blackouts_us),
        Some(("1 ms bound", BLACKOUT_BOUND_US)),
    ));
    let teardown_ms: Vec<(String, Vec<f64>)> = groups(&|c| &c.metrics.teardown_us)
        .into_iter()
        .map(|(k, v)| (k, v.into_iter().map(|us| us / 1000.0).collect()))
        .collect();
    h.push_str(&svg::dot_plot(
        "Teardown times",
        "cases",
        "ms",
        &teardown_ms,
        None,
    ));
    h.push_str("</div></section>\n");
}

fn cases_section(h: &mut String, run: &Run, opts: &HtmlOptions) {
    let _ = write!(
        h,
        r#"<section id="cases"><h2>Cases ({})</h2><table class="grid"><tr><th>Outcome</th><th>Case</th><th>Host</th><th>Attempts</th><th>Time</th><th>Expected / observed</th><th>Message</th><th>Alarms</th><th>Artifacts</th></tr>"#,
        run.cases.len()
    );
    let order = |o: Outcome| Outcome::ALL.iter().position(|x| *x == o).unwrap_or(99);
    let mut cases: Vec<&CaseResult> = run.cases.iter().collect();
    cases.sort_by(|a, b| {
        order(a.outcome)
            .cmp(&order(b.outcome))
            .then_with(|| a.id.cmp(&b.id))
    });
    for c in cases {
        let id_html = match &opts.case_link_base {
            Some(base) => format!(
                r#"<a href="{}">{}</a>"#,
                esc(&format!(
                    "{base}{}",
                    percent_encoding::utf8_percent_encode(
                        &c.id,
                        percent_encoding::NON_ALPHANUMERIC
                    )
                )),
                esc(&c.id)
            ),
            None => esc(&c.id),
        };
        let _ = write!(
            h,
            r#"<tr class="o-{k}" id="{anchor}"><td>{b}</td><td class="case"><span class="id" title="{attack} · {backend} · {profile}">{id}</span></td><td class="host">{host}</td><td>"#,
            k = c.outcome.as_str(),
            anchor = esc(&case_anchor(&c.id)),
            b = badge(c.outcome),
            id = id_html,
            attack = esc(&c.attack),
            backend = esc(&c.backend),
            profile = esc(&c.profile),
            host = esc(&c.host),
        );
        if c.attempts.len() <= 1 {
            let _ = write!(h, "{}", c.attempts.len());
        } else {
            let _ = write!(h, "<details><summary>{}</summary><ol>", c.attempts.len());
            for a in &c.attempts {
                let _ = write!(
                    h,
                    r#"<li>{} on {} ({}){}</li>"#,
                    badge(a.outcome),
                    esc(&a.host),
                    fmt_duration_ms(a.duration_ms),
                    if a.message.is_empty() {
                        String::new()
                    } else {
                        format!(r#"<div class="msg">{}</div>"#, esc(&a.message))
                    }
                );
            }
            h.push_str("</ol></details>");
        }
        let _ = write!(
            h,
            r#"</td><td class="num">{}</td><td class="msg">{}{}</td><td class="msg">{}</td><td class="num">{}</td><td>"#,
            fmt_duration_ms(c.duration_ms),
            if c.expected.is_empty() {
                String::new()
            } else {
                format!("expected: {}", esc(&c.expected))
            },
            if c.observed.is_empty() || c.observed == c.expected {
                String::new()
            } else {
                format!("\nobserved: {}", esc(&c.observed))
            },
            esc(&c.message),
            c.metrics.alarms
        );
        let links: Vec<String> = c
            .artifacts
            .iter()
            .map(|a| {
                if opts.empty_artifacts.contains(&a.path) {
                    return format!(
                        r#"<span class="muted" title="{}: {} (empty file)">{} (empty)</span>"#,
                        a.kind.as_str(),
                        esc(&a.path),
                        esc(&artifact_label(a))
                    );
                }
                format!(
                    r#"<a href="{}" title="{}: {}">{}</a>"#,
                    esc(&artifact_href(&opts.artifact_base, &a.path)),
                    a.kind.as_str(),
                    esc(&a.path),
                    esc(&artifact_label(a))
                )
            })
            .collect();
        h.push_str(&links.join(" "));
        h.push_str("</td></tr>\n");
    }
    h.push_str("</table></section>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hrefs_are_safe() {
        assert_eq!(
            artifact_href("", "cases/a b/console.log"),
            "cases/a%20b/console.log"
        );
        assert_eq!(
            artifact_href("", "javascript:alert(1)"),
            "./javascript:alert(1)"
        );
        assert_eq!(artifact_href("../run", "x/y.vcd"), "../run/x/y.vcd");
        assert_eq!(artifact_href("../run", "/abs/y.vcd"), "/abs/y.vcd");
        assert!(!artifact_href("", "a\"><script>").contains('"'));
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_duration_ms(350), "350 ms");
        assert_eq!(fmt_duration_ms(4_200), "4.2 s");
        assert_eq!(fmt_duration_ms(185_000), "3 min 05 s");
        assert_eq!(fmt_duration_ms(3_720_000), "1 h 02 min");
    }
}
