//! JUnit XML in the dialect Jenkins (junit plugin), GitLab and most CI systems read.
//!
//! Mapping (see also README.md):
//!
//! | outcome  | JUnit                                                                 |
//! |----------|-----------------------------------------------------------------------|
//! | PASS     | `<testcase>` with no child verdict                                    |
//! | FAIL     | `<failure type="fail" message=…>` (counted in `failures`)            |
//! | TIMEOUT  | `<failure type="timeout" message=…>` (counted in `failures`)         |
//! | INFRA    | `<error type="infrastructure" message=…>` (counted in `errors`)       |
//! | FLAKY    | passes; `<properties>` `flaky=true`, `attempts=N`; one `<flakyFailure>` per failed attempt (Maven Surefire convention); `<system-out>` starts with `FLAKY:` |
//! | SKIPPED  | `<skipped message=…/>` (counted in `skipped`)                         |
//!
//! One `<testsuite>` per device backend, named `<campaign>.<backend>`, under one
//! `<testsuites>` root. `classname` = `<campaign>.<backend>.<profile>`,
//! `name` = `<attack>@<host_tag>`, `time` in seconds. Every testcase's
//! `<system-out>` carries expected/observed, host, attempts and artifact paths.
//! ANSI colour sequences from consoles are removed; other characters XML 1.0
//! forbids are written as `\x00`-style text.

use crate::error::{Error, Result};
use crate::model::{CaseResult, Outcome, Run};
use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};
use quick_xml::Writer;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Text fit for XML and HTML: ANSI escape sequences (console colours) removed,
/// then characters XML 1.0 forbids written as `\xNN`.
pub fn clean_text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\u{1b}') {
        xml_safe(&strip_ansi_escapes::strip_str(s))
            .into_owned()
            .into()
    } else {
        xml_safe(s)
    }
}

/// Replace characters that XML 1.0 does not allow, even escaped, by `\xNN` text.
pub fn xml_safe(s: &str) -> std::borrow::Cow<'_, str> {
    fn ok(c: char) -> bool {
        matches!(c, '\t' | '\n' | '\r')
            || ((' '..='\u{D7FF}').contains(&c) && c != '\u{7f}')
            || ('\u{E000}'..='\u{FFFD}').contains(&c)
            || c >= '\u{10000}'
    }
    if s.chars().all(ok) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if ok(c) {
            out.push(c);
        } else {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
    }
    out.into()
}

/// One line, at most `max` characters, for an attribute (attribute values lose
/// their newlines when read back, so full text goes into the element body).
fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    let flat = clean_text(&flat).into_owned();
    if flat.chars().count() > max {
        let mut t: String = flat.chars().take(max).collect();
        t.push('…');
        t
    } else {
        flat
    }
}

fn secs(ms: u64) -> String {
    format!("{:.3}", ms as f64 / 1000.0)
}

/// `2026-11-21T02:00:00` (UTC; the JUnit schema's timestamp has no zone).
pub(crate) fn junit_timestamp(unix_ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .trim_end_matches('Z')
        .to_string()
}

fn sanitize_class_part(s: &str) -> String {
    // Dots separate package and class in Jenkins; keep them out of the parts.
    s.chars()
        .map(|c| {
            if c == '.' || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

struct Xml {
    w: Writer<Vec<u8>>,
}

type IoResult = std::io::Result<()>;

impl Xml {
    fn start(&mut self, name: &str, attrs: &[(&str, &str)]) -> IoResult {
        let mut e = BytesStart::new(name);
        for (k, v) in attrs {
            e.push_attribute((*k, clean_text(v).as_ref()));
        }
        self.w.write_event(Event::Start(e))
    }
    fn empty(&mut self, name: &str, attrs: &[(&str, &str)]) -> IoResult {
        let mut e = BytesStart::new(name);
        for (k, v) in attrs {
            e.push_attribute((*k, clean_text(v).as_ref()));
        }
        self.w.write_event(Event::Empty(e))
    }
    fn end(&mut self, name: &str) -> IoResult {
        self.w.write_event(Event::End(BytesEnd::new(name)))
    }
    fn text_elem(&mut self, name: &str, attrs: &[(&str, &str)], text: &str) -> IoResult {
        if text.is_empty() {
            return self.empty(name, attrs);
        }
        self.start(name, attrs)?;
        self.w
            .write_event(Event::Text(BytesText::new(clean_text(text).as_ref())))?;
        self.end(name)
    }
}

fn attempts_text(case: &CaseResult) -> String {
    let mut s = String::new();
    for (i, a) in case.attempts.iter().enumerate() {
        let _ = writeln!(
            s,
            "attempt {}: {} on {} in {} s{}{}",
            i + 1,
            a.outcome,
            a.host,
            secs(a.duration_ms),
            if a.message.is_empty() { "" } else { ": " },
            a.message
        );
    }
    s
}

fn system_out(case: &CaseResult) -> String {
    let mut s = String::new();
    if case.outcome == Outcome::Flaky {
        let failed = case
            .attempts
            .iter()
            .filter(|a| !a.outcome.is_success())
            .count();
        let _ = writeln!(
            s,
            "FLAKY: passed after {failed} failed attempt(s) of {}",
            case.attempts.len()
        );
    }
    let _ = writeln!(s, "case: {}", case.id);
    let _ = writeln!(s, "outcome: {}", case.outcome);
    let _ = writeln!(s, "host: {}", case.host);
    if !case.expected.is_empty() {
        let _ = writeln!(s, "expected: {}", case.expected);
    }
    if !case.observed.is_empty() {
        let _ = writeln!(s, "observed: {}", case.observed);
    }
    if !case.message.is_empty() {
        let _ = writeln!(s, "message: {}", case.message);
    }
    let _ = writeln!(s, "alarms: {}", case.metrics.alarms);
    s.push_str(&attempts_text(case));
    for a in &case.artifacts {
        let _ = writeln!(s, "artifact {}: {}", a.kind.as_str(), a.path);
    }
    s
}

fn verdict_body(case: &CaseResult) -> String {
    let mut s = String::new();
    if !case.message.is_empty() {
        let _ = writeln!(s, "{}", case.message);
    }
    if !case.expected.is_empty() || !case.observed.is_empty() {
        let _ = writeln!(s, "expected: {}", case.expected);
        let _ = writeln!(s, "observed: {}", case.observed);
    }
    s.push_str(&attempts_text(case));
    s
}

fn write_case(x: &mut Xml, campaign: &str, case: &CaseResult) -> IoResult {
    let classname = format!(
        "{}.{}.{}",
        sanitize_class_part(campaign),
        sanitize_class_part(&case.backend),
        sanitize_class_part(&case.profile)
    );
    let name = if case.host_tag.is_empty() {
        case.attack.clone()
    } else {
        format!("{}@{}", case.attack, case.host_tag)
    };
    let time = secs(case.duration_ms);
    x.start(
        "testcase",
        &[("classname", &classname), ("name", &name), ("time", &time)],
    )?;
    let msg = one_line(&case.message, 300);
    match case.outcome {
        Outcome::Pass => {}
        Outcome::Fail => x.text_elem(
            "failure",
            &[("type", "fail"), ("message", &msg)],
            &verdict_body(case),
        )?,
        Outcome::Timeout => x.text_elem(
            "failure",
            &[("type", "timeout"), ("message", &msg)],
            &verdict_body(case),
        )?,
        Outcome::Infra => x.text_elem(
            "error",
            &[("type", "infrastructure"), ("message", &msg)],
            &verdict_body(case),
        )?,
        Outcome::Skipped => x.empty("skipped", &[("message", &msg)])?,
        Outcome::Flaky => {
            let n = case.attempts.len().to_string();
            x.start("properties", &[])?;
            x.empty("property", &[("name", "flaky"), ("value", "true")])?;
            x.empty("property", &[("name", "attempts"), ("value", &n)])?;
            x.end("properties")?;
            for a in case.attempts.iter().filter(|a| !a.outcome.is_success()) {
                let elem = if a.outcome == Outcome::Infra {
                    "flakyError"
                } else {
                    "flakyFailure"
                };
                x.text_elem(
                    elem,
                    &[
                        ("message", &one_line(&a.message, 300)),
                        ("type", a.outcome.as_str()),
                    ],
                    &format!("on {}: {}", a.host, a.message),
                )?;
            }
        }
    }
    x.text_elem("system-out", &[], &system_out(case))?;
    x.end("testcase")
}

#[derive(Default)]
struct Tally {
    tests: usize,
    failures: usize,
    errors: usize,
    skipped: usize,
    ms: u64,
}

impl Tally {
    fn add(&mut self, c: &CaseResult) {
        self.tests += 1;
        self.ms += c.duration_ms;
        match c.outcome {
            Outcome::Fail | Outcome::Timeout => self.failures += 1,
            Outcome::Infra => self.errors += 1,
            Outcome::Skipped => self.skipped += 1,
            Outcome::Pass | Outcome::Flaky => {}
        }
    }
    fn attrs(&self) -> [(&'static str, String); 5] {
        [
            ("tests", self.tests.to_string()),
            ("failures", self.failures.to_string()),
            ("errors", self.errors.to_string()),
            ("skipped", self.skipped.to_string()),
            ("time", secs(self.ms)),
        ]
    }
}

/// Render a run as JUnit XML.
pub fn to_junit(run: &Run) -> Result<String> {
    let enc = |e: std::io::Error| Error::Encode {
        what: "JUnit XML",
        reason: e.to_string(),
    };
    let mut by_backend: BTreeMap<&str, Vec<&CaseResult>> = BTreeMap::new();
    let mut total = Tally::default();
    for c in &run.cases {
        by_backend.entry(&c.backend).or_default().push(c);
        total.add(c);
    }
    // The root's time is the run's wall time, not the sum of cases (hosts run in parallel).
    total.ms = run.duration_ms();
    let mut x = Xml {
        w: Writer::new_with_indent(Vec::new(), b' ', 2),
    };
    let ts = junit_timestamp(run.started_ms);
    (|| -> IoResult {
        x.w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))?;
        let mut root: Vec<(&str, String)> = vec![("name", format!("{} {}", run.campaign, run.id))];
        root.extend(total.attrs());
        root.push(("timestamp", ts.clone()));
        let root_ref: Vec<(&str, &str)> = root.iter().map(|(k, v)| (*k, v.as_str())).collect();
        x.start("testsuites", &root_ref)?;
        for (i, (backend, cases)) in by_backend.iter().enumerate() {
            let mut t = Tally::default();
            for c in cases {
                t.add(c);
            }
            // The suites of a run run side by side on the same hosts: a suite's
            // wall time is the run's, not the sum of its cases.
            t.ms = run.duration_ms();
            // The hosts its cases ran on (JUnit's `hostname`).
            let mut ran_on: Vec<&str> = cases
                .iter()
                .map(|c| c.host.as_str())
                .filter(|h| !h.is_empty())
                .collect();
            ran_on.sort_unstable();
            ran_on.dedup();
            let hostname = if ran_on.is_empty() {
                "unknown".to_string()
            } else {
                ran_on.join(",")
            };
            let mut attrs: Vec<(&str, String)> = vec![
                (
                    "name",
                    format!(
                        "{}.{}",
                        sanitize_class_part(&run.campaign),
                        sanitize_class_part(backend)
                    ),
                ),
                ("id", i.to_string()),
            ];
            attrs.extend(t.attrs());
            attrs.push(("timestamp", ts.clone()));
            attrs.push(("hostname", hostname));
            let attrs_ref: Vec<(&str, &str)> =
                attrs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            x.start("testsuite", &attrs_ref)?;
            let hosts: Vec<&str> = run.hosts.iter().map(|h| h.name.as_str()).collect();
            x.start("properties", &[])?;
            x.empty("property", &[("name", "run"), ("value", &run.id)])?;
            x.empty(
                "property",
                &[("name", "campaign"), ("value", &run.campaign)],
            )?;
            x.empty("property", &[("name", "backend"), ("value", backend)])?;
            x.empty(
                "property",
                &[("name", "hosts"), ("value", &hosts.join(","))],
            )?;
            x.end("properties")?;
            for c in cases {
                write_case(&mut x, &run.campaign, c)?;
            }
            x.end("testsuite")?;
        }
        x.end("testsuites")
    })()
    .map_err(enc)?;
    let mut bytes = x.w.into_inner();
    bytes.push(b'\n');
    String::from_utf8(bytes).map_err(|e| Error::Encode {
        what: "JUnit XML",
        reason: e.to_string(),
    })
}
