//! Inline SVG plots, generated as text: line charts, histograms and dot plots.
//! Every chart handles empty input by drawing a "no data" panel.

use crate::stats::Summary;
use std::fmt::Write as _;

const W: f64 = 600.0;
const H: f64 = 270.0;
const ML: f64 = 62.0; // left margin (y labels)
const MR: f64 = 16.0;
const MT: f64 = 30.0; // title
const MB: f64 = 44.0; // x labels + axis title

/// A palette that stays readable for common colour-vision deficiencies.
pub const PALETTE: [&str; 8] = [
    "#0072b2", "#e69f00", "#009e73", "#cc3311", "#56b4e9", "#aa4499", "#666666", "#b8860b",
];

/// Escape text for SVG/HTML content or attributes.
pub fn esc(s: &str) -> String {
    let safe = crate::junit::clean_text(s);
    quick_xml::escape::escape(safe.as_ref()).into_owned()
}

/// A named line.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend name.
    pub name: String,
    /// `(x, y)` points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// Round numbers for axis ticks covering `[lo, hi]`, about `n` of them.
pub fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return vec![lo];
    }
    let raw = (hi - lo) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let start = (lo / step).ceil() * step;
    let mut t = vec![];
    let mut v = start;
    while v <= hi + step * 1e-9 && t.len() < 50 {
        t.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    t
}

/// Compact number: 12, 3.5, 0.25, 12.5k, 3.1M.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Decimals needed to tell ticks `step` apart (0 for whole steps).
fn tick_decimals(step: f64) -> usize {
    if !(step.is_finite() && step > 0.0) || step >= 1.0 {
        return 0;
    }
    let mut d = 0;
    while d < 12 {
        let scaled = step * 10f64.powi(d as i32);
        if (scaled - scaled.round()).abs() < 1e-6 * scaled.max(1.0) {
            break;
        }
        d += 1;
    }
    d
}

/// Labels for a row of ticks: compact for whole numbers, otherwise with as many
/// decimals as the step needs, so no two ticks read the same.
pub fn tick_labels(ticks: &[f64]) -> Vec<String> {
    let step = ticks
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(f64::INFINITY, f64::min);
    if !step.is_finite() || step >= 1.0 {
        return ticks.iter().map(|t| fmt_num(*t)).collect();
    }
    let d = tick_decimals(step);
    ticks.iter().map(|t| format!("{t:.d$}")).collect()
}

/// How the x axis maps values: linear, or values already in log10 space
/// (labelled with their real value at each power of ten).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XScale {
    Linear,
    Log10,
}

struct Frame {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        ML + (x - self.x0) / (self.x1 - self.x0) * (W - ML - MR)
    }
    fn py(&self, y: f64) -> f64 {
        H - MB - (y - self.y0) / (self.y1 - self.y0) * (H - MT - MB)
    }
}

fn open(s: &mut String, title: &str, class: &str) {
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" class="plot {class}" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{t}" font-family="system-ui, sans-serif" font-size="11"><title>{t}</title><rect x="0" y="0" width="{W}" height="{H}" fill="#fff"/><text x="{ML}" y="18" font-size="13" font-weight="600" fill="#222">{t}</text>"##,
        t = esc(title)
    );
}

/// A "no data" panel with the chart's title.
pub fn no_data(title: &str, why: &str) -> String {
    let mut s = String::new();
    open(&mut s, title, "nodata");
    let _ = write!(
        s,
        r##"<rect x="{ML}" y="{MT}" width="{w}" height="{h}" fill="#f6f6f6" stroke="#ddd"/><text x="{cx}" y="{cy}" text-anchor="middle" fill="#888" font-size="14">no data</text><text x="{cx}" y="{cy2}" text-anchor="middle" fill="#aaa">{why}</text></svg>"##,
        w = W - ML - MR,
        h = H - MT - MB,
        cx = (ML + W - MR) / 2.0,
        cy = (MT + H - MB) / 2.0,
        cy2 = (MT + H - MB) / 2.0 + 18.0,
        why = esc(why)
    );
    s
}

fn axes(s: &mut String, f: &Frame, x_label: &str, y_label: &str, x_ticks: bool) {
    axes_scaled(s, f, x_label, y_label, x_ticks.then_some(XScale::Linear));
}

fn axes_scaled(s: &mut String, f: &Frame, x_label: &str, y_label: &str, x: Option<XScale>) {
    // Grid + y ticks.
    let yt = nice_ticks(f.y0, f.y1, 5);
    for (t, l) in yt.iter().zip(tick_labels(&yt)) {
        let y = f.py(*t);
        let _ = write!(
            s,
            r##"<line x1="{ML}" x2="{x2}" y1="{y:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{tx}" y="{ty:.1}" text-anchor="end" fill="#555">{l}</text>"##,
            x2 = W - MR,
            tx = ML - 6.0,
            ty = y + 4.0,
        );
    }
    let xt: Vec<(f64, String)> = match x {
        None => vec![],
        Some(XScale::Linear) => {
            let t = nice_ticks(f.x0, f.x1, 7);
            let l = tick_labels(&t);
            t.into_iter().zip(l).collect()
        }
        Some(XScale::Log10) => {
            let (a, b) = (f.x0.ceil() as i32, f.x1.floor() as i32);
            (a..=b.max(a))
                .filter(|e| (*e as f64) <= f.x1 + 1e-9)
                .map(|e| (e as f64, fmt_num(10f64.powi(e))))
                .collect()
        }
    };
    {
        for (t, l) in xt {
            let x = f.px(t);
            let _ = write!(
                s,
                r##"<line x1="{x:.1}" x2="{x:.1}" y1="{y1}" y2="{y2}" stroke="#999"/><text x="{x:.1}" y="{ty}" text-anchor="middle" fill="#555">{l}</text>"##,
                y1 = H - MB,
                y2 = H - MB + 4.0,
                ty = H - MB + 16.0,
            );
        }
    }
    let _ = write!(
        s,
        r##"<line x1="{ML}" x2="{x2}" y1="{yb}" y2="{yb}" stroke="#444"/><line x1="{ML}" x2="{ML}" y1="{MT}" y2="{yb}" stroke="#444"/><text x="{cx}" y="{xl}" text-anchor="middle" fill="#333">{xlab}</text><text transform="translate(14 {cy}) rotate(-90)" text-anchor="middle" fill="#333">{ylab}</text>"##,
        x2 = W - MR,
        yb = H - MB,
        cx = (ML + W - MR) / 2.0,
        xl = H - 8.0,
        cy = (MT + H - MB) / 2.0,
        xlab = esc(x_label),
        ylab = esc(y_label)
    );
}

fn legend(s: &mut String, names: &[(String, &str)]) {
    let mut x = W - MR;
    for (name, color) in names.iter().rev() {
        let w = 14.0 + 6.5 * name.chars().count() as f64;
        x -= w + 8.0;
        let _ = write!(
            s,
            r##"<rect x="{x:.1}" y="9" width="10" height="10" fill="{color}"/><text x="{tx:.1}" y="18" fill="#333">{n}</text>"##,
            tx = x + 14.0,
            n = esc(name)
        );
    }
}

/// Line chart; `step` draws a step function (counter values hold until the next reading).
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    step: bool,
) -> String {
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    let mut any = false;
    for &(x, y) in pts {
        any = true;
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !any {
        return no_data(title, "no readings");
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    // Counters start from 0 upward; keep 0 in view unless the values are far from it.
    if y0 > 0.0 && y0 < (y1 - y0) * 3.0 {
        y0 = 0.0;
    }
    let pad = ((y1 - y0) * 0.08).max(1.0);
    y1 += pad;
    if y0 != 0.0 {
        y0 -= pad;
    }
    let f = Frame { x0, x1, y0, y1 };
    let mut s = String::new();
    open(&mut s, title, "line");
    axes(&mut s, &f, x_label, y_label, true);
    let mut names = vec![];
    for (i, se) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        names.push((se.name.clone(), color));
        let mut d = String::new();
        let mut last: Option<(f64, f64)> = None;
        for &(x, y) in &se.points {
            // A non-finite point breaks the line (e.g. a fresh device per case).
            if !(x.is_finite() && y.is_finite()) {
                last = None;
                continue;
            }
            let (px, py) = (f.px(x), f.py(y));
            match last {
                None => {
                    let _ = write!(d, "M{px:.1},{py:.1}");
                }
                Some((_, ly)) if step => {
                    let _ = write!(d, " H{px:.1} V{py:.1}");
                    let _ = ly;
                }
                Some(_) => {
                    let _ = write!(d, " L{px:.1},{py:.1}");
                }
            }
            last = Some((px, py));
        }
        let dash = if i % 2 == 1 {
            r#" stroke-dasharray="6 3""#
        } else {
            ""
        };
        let _ = write!(
            s,
            r#"<path d="{d}" fill="none" stroke="{color}" stroke-width="2"{dash}><title>{n}</title></path>"#,
            n = esc(&se.name)
        );
        if let Some((px, py)) = last {
            let _ = write!(
                s,
                r#"<circle cx="{px:.1}" cy="{py:.1}" r="3" fill="{color}"/>"#
            );
        }
    }
    legend(&mut s, &names);
    s.push_str("</svg>");
    s
}

/// Stacked histogram: per group (e.g. per backend) counts on common `edges`,
/// with optional vertical marker lines (e.g. median, p99). `overflow` marks the
/// last bin as "and above".
pub fn histogram(
    title: &str,
    x_label: &str,
    edges: &[f64],
    groups: &[(String, Vec<f64>)],
    overflow: bool,
    markers: &[Marker],
) -> String {
    histogram_scaled(
        title,
        x_label,
        edges,
        groups,
        overflow,
        markers,
        XScale::Linear,
    )
}

/// [`histogram`] on a logarithmic x axis: `edges` are log10 of the values
/// (e.g. from [`crate::stats::rebin_groups_log10`]); markers carry real values.
/// Ticks sit at powers of ten and read as real values.
pub fn histogram_log10(
    title: &str,
    x_label: &str,
    log_edges: &[f64],
    groups: &[(String, Vec<f64>)],
    overflow: bool,
    markers: &[Marker],
) -> String {
    let markers: Vec<Marker> = markers
        .iter()
        .filter(|m| m.value > 0.0)
        .map(|m| Marker {
            label: format!("{} {}", m.label, fmt_num(m.value)),
            value: m.value.log10(),
            color: m.color,
        })
        .collect();
    histogram_scaled(
        title,
        x_label,
        log_edges,
        groups,
        overflow,
        &markers,
        XScale::Log10,
    )
}

fn histogram_scaled(
    title: &str,
    x_label: &str,
    edges: &[f64],
    groups: &[(String, Vec<f64>)],
    overflow: bool,
    markers: &[Marker],
    scale: XScale,
) -> String {
    let real = |v: f64| match scale {
        XScale::Linear => v,
        XScale::Log10 => 10f64.powf(v),
    };
    let n = edges.len().saturating_sub(1);
    let ok = n > 0 && groups.iter().all(|g| g.1.len() == n);
    let totals: Vec<f64> = (0..n)
        .map(|i| groups.iter().map(|g| g.1[i].max(0.0)).sum())
        .collect();
    if !ok || groups.is_empty() || totals.iter().all(|t| *t <= 0.0) {
        return no_data(title, "no samples");
    }
    let ymax = totals.iter().copied().fold(0.0, f64::max);
    let f = Frame {
        x0: edges[0],
        x1: edges[n],
        y0: 0.0,
        y1: ymax * 1.1,
    };
    let mut s = String::new();
    open(&mut s, title, "hist");
    axes_scaled(&mut s, &f, x_label, "samples", Some(scale));
    let mut names = vec![];
    for i in 0..n {
        let (xa, xb) = (f.px(edges[i]), f.px(edges[i + 1]));
        let mut base = 0.0;
        let last = overflow && i == n - 1;
        for (gi, (name, counts)) in groups.iter().enumerate() {
            let c = counts[i].max(0.0);
            if c <= 0.0 {
                continue;
            }
            let (ya, yb) = (f.py(base), f.py(base + c));
            base += c;
            let _ = write!(
                s,
                r##"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="{fill}"{op}><title>{g}{lo}–{hi}{more} µs: {c}</title></rect>"##,
                x = xa + 0.5,
                y = yb,
                w = (xb - xa - 1.0).max(0.5),
                h = (ya - yb).max(0.0),
                fill = PALETTE[gi % PALETTE.len()],
                op = if last { r#" fill-opacity="0.45""# } else { "" },
                g = if name.is_empty() {
                    String::new()
                } else {
                    format!("{}: ", esc(name))
                },
                lo = fmt_num(real(edges[i])),
                hi = fmt_num(real(edges[i + 1])),
                more = if last { " and above" } else { "" },
                c = fmt_num(c.round()),
            );
        }
    }
    if groups.len() > 1 || !groups[0].0.is_empty() {
        for (gi, (name, _)) in groups.iter().enumerate() {
            names.push((name.clone(), PALETTE[gi % PALETTE.len()]));
        }
        legend(&mut s, &names);
    }
    marker_lines_labelled(&mut s, &f, markers, true, scale == XScale::Linear);
    s.push_str("</svg>");
    s
}

/// A labelled reference line on a chart.
#[derive(Debug, Clone)]
pub struct Marker {
    /// Label, e.g. `p99`.
    pub label: String,
    /// Position on the value axis.
    pub value: f64,
    /// Colour (CSS).
    pub color: &'static str,
}

impl Marker {
    /// A marker.
    pub fn new(label: impl Into<String>, value: f64, color: &'static str) -> Marker {
        Marker {
            label: label.into(),
            value,
            color,
        }
    }
}

fn marker_lines(s: &mut String, f: &Frame, markers: &[Marker], vertical: bool) {
    marker_lines_labelled(s, f, markers, vertical, true)
}

/// `with_value`: append the marker's value to its label (off when the label
/// already carries it, as on a log axis).
fn marker_lines_labelled(
    s: &mut String,
    f: &Frame,
    markers: &[Marker],
    vertical: bool,
    with_value: bool,
) {
    for (k, m) in markers.iter().enumerate() {
        let (name, v, color) = (&m.label, &m.value, m.color);
        if !v.is_finite() {
            continue;
        }
        let label = if with_value {
            format!("{name} {}", fmt_num(*v))
        } else {
            name.clone()
        };
        if vertical {
            if *v < f.x0 || *v > f.x1 {
                continue;
            }
            let x = f.px(*v);
            let right = x > W - MR - 7.0 * label.chars().count() as f64 - 8.0;
            let _ = write!(
                s,
                r#"<line x1="{x:.1}" x2="{x:.1}" y1="{MT}" y2="{yb}" stroke="{color}" stroke-dasharray="4 3" stroke-width="1.5"/><text x="{tx:.1}" y="{ty:.1}" fill="{color}" text-anchor="{anchor}">{l}</text>"#,
                yb = H - MB,
                // Near the right edge the label goes to the left of its line.
                tx = if right { x - 4.0 } else { x + 4.0 },
                anchor = if right { "end" } else { "start" },
                ty = MT + 12.0 + 13.0 * k as f64,
                l = esc(&label)
            );
        } else {
            if *v < f.y0 || *v > f.y1 {
                continue;
            }
            let y = f.py(*v);
            let _ = write!(
                s,
                r#"<line x1="{ML}" x2="{x2}" y1="{y:.1}" y2="{y:.1}" stroke="{color}" stroke-dasharray="4 3" stroke-width="1.5"/><text x="{tx}" y="{ty:.1}" text-anchor="end" fill="{color}">{l}</text>"#,
                x2 = W - MR,
                tx = W - MR - 2.0 - 110.0 * k as f64,
                ty = y - 3.0,
                l = esc(&label)
            );
        }
    }
}

/// Dot plot: one column per group (e.g. per case), each sample a dot, with
/// horizontal median and p99 lines over all samples and an optional bound line.
pub fn dot_plot(
    title: &str,
    group_noun: &str,
    y_label: &str,
    groups: &[(String, Vec<f64>)],
    bound: Option<(&str, f64)>,
) -> String {
    let all: Vec<f64> = groups
        .iter()
        .flat_map(|g| g.1.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    let Some(sum) = Summary::of(&all) else {
        return no_data(title, "no samples");
    };
    let mut y1 = sum.max;
    if let Some((_, b)) = bound {
        if b.is_finite() {
            y1 = y1.max(b);
        }
    }
    let f = Frame {
        x0: 0.0,
        x1: groups.len().max(1) as f64,
        y0: 0.0,
        y1: y1 * 1.1 + f64::EPSILON,
    };
    let mut s = String::new();
    open(&mut s, title, "dots");
    let x_label = if groups.len() == 1 {
        format!("{} ({} samples)", groups[0].0, all.len())
    } else {
        format!(
            "{} samples from {} {group_noun} (hover a dot for details)",
            all.len(),
            groups.len()
        )
    };
    axes(&mut s, &f, &x_label, y_label, false);
    for (gi, (name, vals)) in groups.iter().enumerate() {
        let n = vals.len().max(1) as f64;
        for (k, &v) in vals.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            // Spread the dots of a group across 60% of its column.
            let jitter = if vals.len() > 1 {
                (k as f64 / (n - 1.0) - 0.5) * 0.6
            } else {
                0.0
            };
            let x = f.px(gi as f64 + 0.5 + jitter);
            let over = bound.is_some_and(|(_, b)| v > b);
            let _ = write!(
                s,
                r##"<circle cx="{x:.1}" cy="{y:.1}" r="3.2" fill="{c}" fill-opacity="0.75"><title>{t}: {v} {u}</title></circle>"##,
                y = f.py(v),
                c = if over { "#cc3311" } else { PALETTE[0] },
                t = esc(name),
                v = fmt_num(v),
                u = esc(y_label),
            );
        }
    }
    let mut markers = vec![
        Marker::new("median", sum.median, "#cc3311"),
        Marker::new("p99", sum.p99, "#aa4499"),
    ];
    if let Some((label, v)) = bound {
        markers.push(Marker::new(label, v, "#009e73"));
    }
    marker_lines(&mut s, &f, &markers, false);
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(
            nice_ticks(0.0, 10.0, 5),
            vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
        assert_eq!(nice_ticks(3.0, 3.0, 5), vec![3.0]);
        assert!(nice_ticks(0.0, 1e9, 5).len() <= 12);
    }

    #[test]
    fn empty_inputs_say_no_data() {
        assert!(line_chart("c", "x", "y", &[], true).contains("no data"));
        let empty = Series {
            name: "m".into(),
            points: vec![],
        };
        assert!(line_chart("c", "x", "y", &[empty], true).contains("no data"));
        assert!(histogram("h", "µs", &[], &[], false, &[]).contains("no data"));
        let zero = vec![("model".to_string(), vec![0.0])];
        assert!(histogram("h", "µs", &[0.0, 1.0], &zero, false, &[]).contains("no data"));
        let bad = vec![("model".to_string(), vec![1.0, 2.0])];
        assert!(histogram("h", "µs", &[0.0, 1.0], &bad, false, &[]).contains("no data"));
        assert!(dot_plot("d", "cases", "µs", &[], None).contains("no data"));
        assert!(
            dot_plot("d", "cases", "µs", &[("a".into(), vec![f64::NAN])], None).contains("no data")
        );
    }

    #[test]
    fn titles_are_escaped() {
        let s = no_data("<script>x</script>", "a&b");
        assert!(!s.contains("<script>"));
        assert!(s.contains("&lt;script&gt;"));
        assert!(s.contains("a&amp;b"));
    }

    #[test]
    fn single_point_and_constant_series_draw() {
        let s = Series {
            name: "master".into(),
            points: vec![(5.0, 7.0)],
        };
        let svg = line_chart("c", "x", "y", &[s], true);
        assert!(svg.contains("<path"));
        assert!(!svg.contains("NaN"));
        let d = dot_plot("d", "cases", "µs", &[("a".into(), vec![0.0, 0.0])], None);
        assert!(!d.contains("NaN") && !d.contains("inf"));
    }
}
