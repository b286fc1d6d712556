//! Server-rendered pages. No JavaScript framework: plain HTML and inline SVG
//! (the report's plots); the only script is `/static/live.js`, which makes a
//! running run's page update from server-sent events.

use crate::history::CaseHistory;
use hilrig_campaigns::store::{QueueRow, RunIndexRow};
use hilrig_reports::html::{fmt_duration_ms, outcome_colors};
use hilrig_reports::svg::{self, esc, Series};
use hilrig_reports::{Outcome, Run, RunSummary};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Everything but RFC 3986's unreserved characters.
const COMPONENT: &percent_encoding::AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encode one URL component.
pub fn enc(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

/// Link to a run page.
pub fn run_href(id: &str) -> String {
    format!("/runs/{}", enc(id))
}

/// Link to a case history.
pub fn history_href(case: &str) -> String {
    format!("/history?case={}", enc(case))
}

/// Link to an artifact of a run.
pub fn artifact_href(run: &str, path: &str) -> String {
    let p: Vec<String> = path.split('/').map(enc).collect();
    format!("/runs/{}/artifacts/{}", enc(run), p.join("/"))
}

/// `2026-12-03 02:00 UTC`.
pub fn ts(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    let s = humantime::format_rfc3339_seconds(t).to_string();
    format!("{} UTC", s.replace('T', " ").trim_end_matches('Z'))
}

/// The pages' Content-Security-Policy: scripts only from this server.
pub const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

const CSS: &str = r#"
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
nav{padding:10px 24px;background:#263238}nav a{color:#fff;margin-right:18px;text-decoration:none;font-weight:600}
main{padding:8px 24px 40px}h1{font-size:22px}h2{font-size:17px;border-bottom:2px solid #e3e3e3}
table.grid{border-collapse:collapse;background:#fff}
table.grid th,table.grid td{border:1px solid #e0e0e0;padding:3px 7px;text-align:left;vertical-align:top}
table.grid th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;min-width:58px;text-align:center;font-weight:700;font-size:12px;padding:1px 6px;border-radius:3px}
.strip{display:flex;gap:2px;flex-wrap:wrap;margin:8px 0}.strip a{display:block;width:14px;height:24px;border-radius:2px}
.id,.msg{font-family:ui-monospace,Menlo,monospace;font-size:12px}.msg{white-space:pre-wrap;max-width:640px}
.muted{color:#777}.bad{color:#c62828;font-weight:600}.good{color:#1e7b34;font-weight:600}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:12px}
.plots svg{width:100%;height:auto;background:#fff;border:1px solid #e0e0e0}
pre.console{background:#111;color:#ddd;padding:8px;max-width:1000px;overflow:auto}
form.inline{display:inline}textarea{width:640px;height:140px;font-family:monospace}
"#;

/// A page around `body`.
pub fn layout(title: &str, body: &str, script: Option<&str>) -> String {
    let script = script
        .map(|s| format!(r#"<script src="{}" defer></script>"#, esc(s)))
        .unwrap_or_default();
    format!(
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>{t} · hilrig lab</title><style>{CSS}</style>{script}</head><body><nav><a href="/">Runs</a><a href="/hosts">Hosts</a><a href="/api/openapi.json">API</a></nav><main>{body}</main></body></html>"#,
        t = esc(title)
    )
}

/// An outcome badge.
pub fn badge(o: Outcome) -> String {
    let (bg, fg) = outcome_colors(o);
    format!(r#"<span class="badge o-{o}" style="background:{bg};color:{fg}">{o}</span>"#)
}

/// The runs index: runs newest first with counts and regressions (failing now,
/// not in the campaign's run before), the queue and a submit form.
pub fn index(
    rows: &[RunIndexRow],
    regressions: &BTreeMap<String, Vec<String>>,
    queue: &[QueueRow],
) -> String {
    let mut b = String::from("<h1>Runs</h1>");
    if rows.is_empty() {
        b.push_str(r#"<p class="muted">No runs in the store yet.</p>"#);
    }
    b.push_str(r#"<table class="grid" id="runs"><tr><th>Campaign</th><th>Run</th><th>Start</th><th>Duration</th>"#);
    for o in Outcome::ALL {
        let _ = write!(b, "<th>{o}</th>");
    }
    b.push_str("<th>Regressions</th></tr>");
    for r in rows {
        let dur = match r.run.finished_ms {
            Some(f) => fmt_duration_ms(f.saturating_sub(r.run.started_ms)),
            None => r#"<span class="bad">running</span>"#.into(),
        };
        let _ = write!(
            b,
            r#"<tr><td><a href="/campaigns/{ce}">{c}</a></td><td class="id"><a href="{href}">{id}</a></td><td>{st}</td><td>{dur}</td>"#,
            ce = enc(&r.run.campaign),
            c = esc(&r.run.campaign),
            href = esc(&run_href(&r.run.id)),
            id = esc(&r.run.id),
            st = ts(r.run.started_ms),
        );
        for o in Outcome::ALL {
            let n = r.counts.get(o.as_str()).copied().unwrap_or(0);
            if n > 0 && o != Outcome::Pass {
                let (bg, fg) = outcome_colors(o);
                let _ = write!(
                    b,
                    r#"<td class="num" style="background:{bg};color:{fg}">{n}</td>"#
                );
            } else {
                let _ = write!(b, r#"<td class="num">{n}</td>"#);
            }
        }
        let reg = regressions.get(&r.run.id).map(Vec::as_slice).unwrap_or(&[]);
        if reg.is_empty() {
            b.push_str("<td></td>");
        } else {
            let links: Vec<String> = reg
                .iter()
                .take(5)
                .map(|c| {
                    format!(
                        r#"<a class="id" href="{}">{}</a>"#,
                        esc(&history_href(c)),
                        esc(c)
                    )
                })
                .collect();
            let more = if reg.len() > 5 {
                format!(" … {} more", reg.len() - 5)
            } else {
                String::new()
            };
            let _ = write!(
                b,
                r#"<td><span class="bad">{}</span> {}{more}</td>"#,
                reg.len(),
                links.join(" ")
            );
        }
        b.push_str("</tr>");
    }
    b.push_str("</table>");
    b.push_str(&queue_section(queue));
    layout("Runs", &b, None)
}

fn queue_section(queue: &[QueueRow]) -> String {
    let mut b = String::from(r#"<h2 id="queue">Queue</h2>"#);
    if queue.is_empty() {
        b.push_str(r#"<p class="muted">Nothing queued.</p>"#);
    } else {
        b.push_str(r#"<table class="grid"><tr><th>#</th><th>Campaign</th><th>By</th><th>Submitted</th><th>State</th><th>Run</th><th></th></tr>"#);
        for q in queue {
            let run = q
                .run_id
                .as_ref()
                .map(|r| format!(r#"<a href="{}">{}</a>"#, esc(&run_href(r)), esc(r)))
                .unwrap_or_default();
            let cancel = if q.state == "queued" || q.state == "running" {
                format!(
                    r#"<form class="inline" method="post" action="/queue/{}/cancel"><input type="password" name="token" placeholder="API token" required><button>Cancel</button></form>"#,
                    q.id
                )
            } else {
                String::new()
            };
            let _ = write!(
                b,
                r#"<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{run}</td><td>{cancel}</td></tr>"#,
                q.id,
                esc(&q.campaign),
                esc(&q.submitted_by),
                ts(q.submitted_ms),
                esc(&q.state)
            );
        }
        b.push_str("</table>");
    }
    b.push_str(r#"<h2>Submit a campaign</h2><form method="post" action="/queue"><p><textarea name="campaign" placeholder="campaign file (TOML)" required></textarea></p><p><input type="password" name="token" placeholder="API token" required> <button>Queue</button></p></form>"#);
    b
}

/// A running run's page: the cases so far; `/static/live.js` adds rows as
/// they finish and reloads into the full report when the run ends.
pub fn live_run(run: &Run) -> String {
    let mut b = format!(
        r#"<h1>{c} — <span class="id">{id}</span></h1><p id="live-status" class="bad" data-events="{ev}">running since {st}: <span id="done">{n}</span> cases finished</p><table class="grid" id="live-cases"><tr><th>Outcome</th><th>Case</th><th>Host</th><th>Time</th><th>Message</th></tr>"#,
        c = esc(&run.campaign),
        id = esc(&run.id),
        ev = esc(&format!(
            "{}/events?seen={}",
            run_href(&run.id),
            run.cases.len()
        )),
        st = ts(run.started_ms),
        n = run.cases.len()
    );
    for c in &run.cases {
        let _ = write!(
            b,
            r#"<tr><td>{}</td><td class="id"><a href="{}">{}</a></td><td>{}</td><td class="num">{}</td><td class="msg">{}</td></tr>"#,
            badge(c.outcome),
            esc(&history_href(&c.id)),
            esc(&c.id),
            esc(&c.host),
            fmt_duration_ms(c.duration_ms),
            esc(&c.message)
        );
    }
    b.push_str("</table>");
    layout(
        &format!("{} (running)", run.id),
        &b,
        Some("/static/live.js"),
    )
}

/// The script of a live run page (served as `/static/live.js`).
pub const LIVE_JS: &str = r#"(function(){
var st=document.getElementById('live-status');if(!st)return;
var es=new EventSource(st.getAttribute('data-events'));
var colors={pass:['#1e7b34','#fff'],fail:['#c62828','#fff'],timeout:['#8e24aa','#fff'],infra:['#6d4c41','#fff'],flaky:['#f0a500','#222'],skipped:['#9e9e9e','#fff']};
function td(t){var d=document.createElement('td');d.textContent=t;return d;}
es.addEventListener('case',function(e){var c=JSON.parse(e.data);var tr=document.createElement('tr');
var b=document.createElement('span');b.className='badge o-'+c.outcome;b.textContent=c.outcome;var k=colors[c.outcome]||['#999','#fff'];b.style.background=k[0];b.style.color=k[1];
var t0=document.createElement('td');t0.appendChild(b);tr.appendChild(t0);
var t1=document.createElement('td');t1.className='id';var a=document.createElement('a');a.href='/history?case='+encodeURIComponent(c.id);a.textContent=c.id;t1.appendChild(a);tr.appendChild(t1);
tr.appendChild(td(c.host));tr.appendChild(td(c.duration_ms+' ms'));tr.appendChild(td(c.message));
document.getElementById('live-cases').appendChild(tr);document.getElementById('done').textContent=c.done;});
es.addEventListener('end',function(){es.close();st.textContent='finished; loading the report';location.reload();});
})();"#;

/// A case's history page.
pub fn history(h: &CaseHistory) -> String {
    let mut b = format!(
        r#"<h1>Case <span class="id">{}</span></h1><p>Last {} nights shown (of {} asked). Flake rate <b>{:.1} %</b>, failure rate <b>{:.1} %</b>.</p>"#,
        esc(&h.case_id),
        h.nights.len(),
        h.nights_asked,
        h.flake_rate * 100.0,
        h.fail_rate * 100.0
    );
    // The strip reads left to right, oldest to newest.
    b.push_str(r#"<div class="strip" id="strip">"#);
    for n in h.nights.iter().rev() {
        let (bg, _) = outcome_colors(n.outcome);
        let _ = write!(
            b,
            r#"<a href="{href}#{anchor}" style="background:{bg}" title="{t}: {o}"></a>"#,
            href = esc(&run_href(&n.run_id)),
            anchor = esc(&hilrig_reports::html::case_anchor(&h.case_id)),
            t = esc(&format!("{} {}", n.run_id, ts(n.started_ms))),
            o = n.outcome
        );
    }
    b.push_str("</div>");
    match &h.change {
        Some(c) => {
            let _ = write!(
                b,
                r#"<p id="change" class="bad">Failing since <a href="{}">{}</a> ({}).</p>"#,
                esc(&run_href(&c.first_bad.run_id)),
                esc(&c.first_bad.run_id),
                ts(c.first_bad.started_ms)
            );
            match &c.last_good {
                Some(g) => {
                    let _ = write!(
                        b,
                        r#"<p>Last good: <a href="{}">{}</a> ({}). Builds either side of the change: <span id="builds"><code>{}</code> (last good) → <code>{}</code> (first failing)</span>{}.</p>"#,
                        esc(&run_href(&g.run_id)),
                        esc(&g.run_id),
                        ts(g.started_ms),
                        esc(&short_build(g.build.as_deref())),
                        esc(&short_build(c.first_bad.build.as_deref())),
                        if g.build.is_some() && g.build == c.first_bad.build {
                            " — the same build: the change is not in hilrig (device, host or flake)"
                        } else {
                            ""
                        }
                    );
                }
                None => b.push_str("<p>It failed on every night shown.</p>"),
            }
        }
        None => b.push_str(r#"<p id="change" class="good">Not failing on the newest night.</p>"#),
    }
    b.push_str(r#"<table class="grid" id="nights"><tr><th>Night</th><th>Run</th><th>Outcome</th><th>Host</th><th>Build</th><th>Attempts</th><th>Time</th><th>Message</th><th>Artifacts</th></tr>"#);
    for n in &h.nights {
        let arts: Vec<String> = n
            .artifacts
            .iter()
            .map(|a| {
                format!(
                    r#"<a href="{}" title="{}">{}</a>"#,
                    esc(&artifact_href(&n.run_id, &a.path)),
                    a.kind.as_str(),
                    esc(&hilrig_reports::html::artifact_label(a))
                )
            })
            .collect();
        let _ = write!(
            b,
            r#"<tr><td>{}</td><td class="id"><a href="{}">{}</a></td><td>{}</td><td>{}</td><td class="id" title="{}">{}</td><td class="num">{}</td><td class="num">{}</td><td class="msg">{}</td><td>{}</td></tr>"#,
            ts(n.started_ms),
            esc(&run_href(&n.run_id)),
            esc(&n.run_id),
            badge(n.outcome),
            esc(&n.host),
            esc(n.build.as_deref().unwrap_or("")),
            esc(&short_build(n.build.as_deref())),
            n.attempts,
            fmt_duration_ms(n.duration_ms),
            esc(&n.message),
            arts.join(" ")
        );
    }
    b.push_str("</table>");
    layout(&format!("history of {}", h.case_id), &b, None)
}

/// The counters-service verdicts of a run's cases, summed.
fn run_verdicts(r: &Run) -> std::collections::BTreeMap<String, u64> {
    let mut m = std::collections::BTreeMap::new();
    for c in &r.cases {
        for (k, n) in &c.metrics.counters_verdicts {
            *m.entry(k.clone()).or_insert(0) += n;
        }
    }
    m
}

/// A build's first 12 hex digits (git's short-hash habit), or `unknown`.
fn short_build(b: Option<&str>) -> String {
    match b {
        Some(b) => b.chars().take(12).collect(),
        None => "unknown".into(),
    }
}

/// Trends of a campaign over its runs (oldest to newest).
pub fn trends(campaign: &str, runs: &[Run]) -> String {
    let mut b = format!(
        r#"<h1>Trends: {}</h1><p>The last {} runs.</p><div class="plots">"#,
        esc(campaign),
        runs.len()
    );
    let sums: Vec<RunSummary> = runs.iter().map(|r| RunSummary::of(r, None)).collect();
    let x = |i: usize| i as f64;
    let pass: Vec<(f64, f64)> = sums
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let ran = s.counts.total.saturating_sub(s.counts.skipped);
            let ok = s.counts.pass + s.counts.flaky;
            (
                x(i),
                if ran == 0 {
                    f64::NAN
                } else {
                    100.0 * ok as f64 / ran as f64
                },
            )
        })
        .collect();
    b.push_str(&svg::line_chart(
        "Pass rate (pass + flaky over cases run)",
        "run (oldest → newest)",
        "%",
        &[Series {
            name: "pass rate".into(),
            points: pass,
        }],
        false,
    ));
    type Pick = fn(&RunSummary) -> Option<hilrig_reports::stats::Summary>;
    let stats: [(&str, &str, Pick); 3] = [
        ("Live-patch blackout", "µs", |s| s.blackout_us),
        ("MMIO trap latency", "µs", |s| s.trap_latency_us),
        ("Teardown time", "µs", |s| s.teardown_us),
    ];
    for (title, unit, pick) in stats {
        let p50: Vec<(f64, f64)> = sums
            .iter()
            .enumerate()
            .map(|(i, s)| (x(i), pick(s).map_or(f64::NAN, |v| v.median)))
            .collect();
        let p99: Vec<(f64, f64)> = sums
            .iter()
            .enumerate()
            .map(|(i, s)| (x(i), pick(s).map_or(f64::NAN, |v| v.p99)))
            .collect();
        b.push_str(&svg::line_chart(
            &format!("{title} p50 / p99"),
            "run (oldest → newest)",
            unit,
            &[
                Series {
                    name: "p50".into(),
                    points: p50,
                },
                Series {
                    name: "p99".into(),
                    points: p99,
                },
            ],
            false,
        ));
    }
    // Counters-service verdicts per night (gate and teardown of every VMM run).
    let verdicts: Vec<std::collections::BTreeMap<String, u64>> =
        runs.iter().map(run_verdicts).collect();
    let mut names: Vec<String> = verdicts.iter().flat_map(|v| v.keys().cloned()).collect();
    names.sort();
    names.dedup();
    if !names.is_empty() {
        let series: Vec<Series> = names
            .iter()
            .map(|n| Series {
                name: n.clone(),
                points: verdicts
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (x(i), v.get(n).copied().unwrap_or(0) as f64))
                    .collect(),
            })
            .collect();
        b.push_str(&svg::line_chart(
            "Counters-service verdicts per night",
            "run (oldest → newest)",
            "verdicts",
            &series,
            false,
        ));
    }
    b.push_str("</div>");
    b.push_str(r#"<table class="grid" id="trend-runs"><tr><th>Run</th><th>Start</th><th>Cases</th><th>Pass rate</th><th>Counters verdicts</th></tr>"#);
    for ((r, s), v) in runs.iter().zip(&sums).zip(&verdicts).rev() {
        let ran = s.counts.total.saturating_sub(s.counts.skipped);
        let vtext = if v.is_empty() {
            r#"<span class="muted">none recorded</span>"#.to_string()
        } else {
            v.iter()
                .map(|(k, n)| {
                    let cls = if k == "trusted" || k == "accepted-update" {
                        "good"
                    } else {
                        "bad"
                    };
                    format!(r#"<span class="{cls}">{}</span> {n}"#, esc(k))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = write!(
            b,
            r#"<tr><td class="id"><a href="{}">{}</a></td><td>{}</td><td class="num">{}</td><td class="num">{}</td><td>{vtext}</td></tr>"#,
            esc(&run_href(&r.id)),
            esc(&r.id),
            ts(r.started_ms),
            s.counts.total,
            if ran == 0 {
                "—".to_string()
            } else {
                format!(
                    "{:.1} %",
                    100.0 * (s.counts.pass + s.counts.flaky) as f64 / ran as f64
                )
            }
        );
    }
    b.push_str("</table>");
    layout(&format!("trends of {campaign}"), &b, None)
}

/// What the host pages know of a host.
#[derive(Debug, Clone, Default)]
pub struct HostView {
    /// Host name.
    pub name: String,
    /// Attempts seen on it in the runs looked at: (run, case, outcome, message).
    pub attempts: Vec<(String, String, Outcome, String)>,
    /// Lease: (holder, active, expires unix ms), from the rig's lease table.
    pub lease: Option<(String, bool, i64)>,
    /// Where the lease table was looked for and why it was not read.
    pub lease_note: Option<String>,
    /// The last console lines: (run, path, lines).
    pub console: Option<(String, String, Vec<String>)>,
    /// The host's recorded device state (LAVA's Good/Bad: `online`/`offline`,
    /// reason, since), from the rig's host-state table in the same database.
    /// `None` with no note: never recorded, i.e. online.
    pub health: Option<hilrig_rig::hoststate::HostState>,
    /// Why the host-state table was not read (PostgreSQL store, unreadable).
    pub health_note: Option<String>,
}

/// The health cell/paragraph text of a host.
fn health_html(h: &HostView) -> String {
    match (&h.health, &h.health_note) {
        (Some(st), _) if !st.online() => format!(
            r#"<span class="bad">offline</span> since {}: {}"#,
            ts(st.since_unix_ms.max(0) as u64),
            esc(&st.reason)
        ),
        (Some(st), _) => format!(
            "online (since {}: {})",
            ts(st.since_unix_ms.max(0) as u64),
            esc(&st.reason)
        ),
        (None, Some(n)) => format!(r#"<span class="muted">{}</span>"#, esc(n)),
        (None, None) => "online (never taken offline)".into(),
    }
}

/// The hosts list.
pub fn hosts(list: &[HostView], runs_looked: usize) -> String {
    let mut b = format!(
        r#"<h1>Hosts</h1><p class="muted">From the last {runs_looked} runs in the store.</p><table class="grid"><tr><th>Host</th><th>Attempts</th><th>INFRA</th><th>Lease holder</th><th>Health</th></tr>"#
    );
    for h in list {
        let infra = h.attempts.iter().filter(|a| a.2 == Outcome::Infra).count();
        let lease = match &h.lease {
            Some((holder, true, _)) => esc(holder),
            Some((_, false, _)) => "free".into(),
            None => r#"<span class="muted">unknown</span>"#.into(),
        };
        let _ = write!(
            b,
            r#"<tr><td><a href="/hosts/{}">{}</a></td><td class="num">{}</td><td class="num">{}</td><td>{}</td><td>{}</td></tr>"#,
            enc(&h.name),
            esc(&h.name),
            h.attempts.len(),
            infra,
            lease,
            health_html(h)
        );
    }
    b.push_str("</table>");
    layout("Hosts", &b, None)
}

/// One host's page.
pub fn host(h: &HostView, runs_looked: usize) -> String {
    let mut b = format!(r#"<h1>Host {}</h1>"#, esc(&h.name));
    let _ = write!(b, "<p><b>Health:</b> {}</p>", health_html(h));
    match (&h.lease, &h.lease_note) {
        (Some((holder, active, exp)), _) => {
            let _ = write!(
                b,
                "<p><b>Lease:</b> {} (expires {})</p>",
                if *active {
                    format!("held by {}", esc(holder))
                } else {
                    format!("free (last holder {})", esc(holder))
                },
                ts((*exp).max(0) as u64)
            );
        }
        (None, Some(n)) => {
            let _ = write!(
                b,
                r#"<p><b>Lease:</b> <span class="muted">{}</span></p>"#,
                esc(n)
            );
        }
        (None, None) => {
            b.push_str(r#"<p><b>Lease:</b> <span class="muted">never leased</span></p>"#)
        }
    }
    match &h.console {
        Some((run, path, lines)) => {
            let _ = write!(
                b,
                r#"<h2>Last console lines</h2><p class="id"><a href="{}">{}</a></p><pre class="console">{}</pre>"#,
                esc(&artifact_href(run, path)),
                esc(path),
                esc(&lines.join("\n"))
            );
        }
        None => b.push_str(
            r#"<h2>Last console lines</h2><p class="muted">no non-empty console artifact</p>"#,
        ),
    }
    let infra: Vec<_> = h
        .attempts
        .iter()
        .filter(|a| a.2 == Outcome::Infra)
        .collect();
    let _ = write!(
        b,
        r#"<h2>INFRA history ({} of {} attempts in the last {runs_looked} runs)</h2>"#,
        infra.len(),
        h.attempts.len()
    );
    b.push_str(r#"<table class="grid"><tr><th>Run</th><th>Case</th><th>Message</th></tr>"#);
    for (run, case, _, msg) in infra {
        let _ = write!(
            b,
            r#"<tr><td class="id"><a href="{}">{}</a></td><td class="id"><a href="{}">{}</a></td><td class="msg">{}</td></tr>"#,
            esc(&run_href(run)),
            esc(run),
            esc(&history_href(case)),
            esc(case),
            esc(msg)
        );
    }
    b.push_str("</table>");
    layout(&format!("host {}", h.name), &b, None)
}

/// An error page.
pub fn error(status: u16, msg: &str) -> String {
    layout(
        "error",
        &format!(r#"<h1>{status}</h1><p class="msg">{}</p>"#, esc(msg)),
        None,
    )
}
