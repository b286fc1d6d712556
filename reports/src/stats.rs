//! Small statistics over samples: percentiles and re-binning for the plots.

use crate::model::Run;
use serde::{Deserialize, Serialize};

/// Summary statistics of a sample set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Number of samples.
    pub count: u64,
    /// Smallest.
    pub min: f64,
    /// Median (nearest rank).
    pub median: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

impl Summary {
    /// Summarise raw samples; `None` when there are no finite ones.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let pts: Vec<(f64, u64)> = samples.iter().map(|&v| (v, 1)).collect();
        Summary::weighted(pts)
    }

    /// Summarise `(value, weight)` points; `None` when the total weight is 0.
    pub fn weighted(mut pts: Vec<(f64, u64)>) -> Option<Summary> {
        pts.retain(|(v, w)| v.is_finite() && *w > 0);
        if pts.is_empty() {
            return None;
        }
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let count: u64 = pts.iter().map(|p| p.1).sum();
        let sum: f64 = pts.iter().map(|(v, w)| v * *w as f64).sum();
        let rank = |q: f64| -> f64 {
            // Nearest rank: the smallest value with cumulative weight >= q * count.
            let target = ((q * count as f64).ceil() as u64).clamp(1, count);
            let mut acc = 0;
            for (v, w) in &pts {
                acc += w;
                if acc >= target {
                    return *v;
                }
            }
            pts[pts.len() - 1].0
        };
        Some(Summary {
            count,
            min: pts[0].0,
            median: rank(0.5),
            p99: rank(0.99),
            max: pts[pts.len() - 1].0,
            mean: sum / count as f64,
        })
    }
}

/// Trap latencies of a whole run: raw samples plus pre-binned buckets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergedLatency {
    /// Raw samples, µs.
    pub samples: Vec<f64>,
    /// `(lo, hi, count)` buckets from histograms, µs.
    pub buckets: Vec<(f64, f64, u64)>,
}

impl MergedLatency {
    /// Total samples.
    pub fn count(&self) -> u64 {
        self.samples.len() as u64 + self.buckets.iter().map(|b| b.2).sum::<u64>()
    }

    /// Weighted points (bucket counts at bucket midpoints).
    fn points(&self) -> Vec<(f64, u64)> {
        self.samples
            .iter()
            .map(|&v| (v, 1))
            .chain(self.buckets.iter().map(|&(lo, hi, c)| ((lo + hi) / 2.0, c)))
            .collect()
    }

    /// Summary (bucketed samples counted at their bucket's midpoint).
    pub fn summary(&self) -> Option<Summary> {
        Summary::weighted(self.points())
    }

    /// Re-bin everything into `n` equal bins (see [`rebin_groups`]).
    /// Returns `(edges, counts, overflowed)`; empty when there is no data.
    pub fn rebin(&self, n: usize) -> (Vec<f64>, Vec<f64>, bool) {
        match rebin_groups(&[(String::new(), self)], n) {
            Some(mut b) => (b.edges, b.groups.remove(0).1, b.overflow),
            None => (vec![], vec![], false),
        }
    }

    /// Everything in one set.
    pub fn merge<'a>(all: impl IntoIterator<Item = &'a MergedLatency>) -> MergedLatency {
        let mut m = MergedLatency::default();
        for x in all {
            m.samples.extend(&x.samples);
            m.buckets.extend(&x.buckets);
        }
        m
    }
}

/// Smallest value put on a log axis, µs (zero and negative samples land here).
pub const LOG_FLOOR_US: f64 = 0.01;

/// [`rebin_groups`] in log10 space: `n` bins of equal width in log10 of the
/// value, so the fast bulk and the slow tail (the rtl backend, outliers) both
/// show. The returned edges are log10 values (draw with `svg::histogram_log10`).
pub fn rebin_groups_log10(groups: &[(String, &MergedLatency)], n: usize) -> Option<Binned> {
    let lg = |v: f64| v.max(LOG_FLOOR_US).log10();
    let logged: Vec<(String, MergedLatency)> = groups
        .iter()
        .map(|(name, m)| {
            (
                name.clone(),
                MergedLatency {
                    samples: m.samples.iter().map(|v| lg(*v)).collect(),
                    buckets: m
                        .buckets
                        .iter()
                        .map(|&(lo, hi, c)| (lg(lo), lg(hi), c))
                        .collect(),
                },
            )
        })
        .collect();
    let refs: Vec<(String, &MergedLatency)> = logged.iter().map(|(k, v)| (k.clone(), v)).collect();
    rebin_all(&refs, n)
}

/// Several sample sets binned on common edges.
#[derive(Debug, Clone, PartialEq)]
pub struct Binned {
    /// `n + 1` ascending edges.
    pub edges: Vec<f64>,
    /// Per group, `n` (fractional) counts.
    pub groups: Vec<(String, Vec<f64>)>,
    /// Some samples lie above the last edge and were counted in the last bin.
    pub overflow: bool,
}

/// Nearest-rank quantile of weighted points.
fn quantile(pts: &[(f64, u64)], q: f64) -> Option<f64> {
    let mut p: Vec<(f64, u64)> = pts.to_vec();
    p.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: u64 = p.iter().map(|x| x.1).sum();
    if total == 0 {
        return None;
    }
    let target = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut acc = 0;
    for (x, w) in &p {
        acc += w;
        if acc >= target {
            return Some(*x);
        }
    }
    p.last().map(|x| x.0)
}

/// Bin several sample sets into `n` equal bins on common edges, from the
/// smallest value to the 99.5th percentile of all of them; values above land in
/// the last bin (an overflow bin), values below in the first. Pre-binned
/// buckets are spread over the bins they overlap in proportion (a uniform
/// density within a bucket), so coarse input does not make spikes.
/// `None` when there is no data at all.
pub fn rebin_groups(groups: &[(String, &MergedLatency)], n: usize) -> Option<Binned> {
    rebin_clipped(groups, n, true)
}

/// Like [`rebin_groups`] over the whole range: nothing clipped into an overflow bin.
fn rebin_all(groups: &[(String, &MergedLatency)], n: usize) -> Option<Binned> {
    rebin_clipped(groups, n, false)
}

fn rebin_clipped(groups: &[(String, &MergedLatency)], n: usize, clip: bool) -> Option<Binned> {
    let all = MergedLatency::merge(groups.iter().map(|g| g.1));
    // For the range, a bucket counts at its upper edge: its samples may reach it.
    let pts: Vec<(f64, u64)> = all
        .samples
        .iter()
        .map(|&v| (v, 1))
        .chain(all.buckets.iter().map(|&(_, hi, c)| (hi, c)))
        .filter(|(v, w)| v.is_finite() && *w > 0)
        .collect();
    let lo_all = all
        .samples
        .iter()
        .copied()
        .chain(all.buckets.iter().map(|b| b.0))
        .filter(|v| v.is_finite())
        .fold(f64::INFINITY, f64::min);
    let hi_q = quantile(&pts, 0.995)?;
    let max = pts.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let lo = lo_all.min(hi_q);
    // A little headroom so the p99.5 sample itself is not the overflow bin.
    let mut hi = if !clip {
        max
    } else if max > hi_q {
        hi_q * 1.02
    } else {
        hi_q
    };
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let n = n.max(1);
    let width = (hi - lo) / n as f64;
    let edges: Vec<f64> = (0..=n).map(|i| lo + width * i as f64).collect();
    let bin = |v: f64| -> usize { (((v - lo) / width).floor().max(0.0) as usize).min(n - 1) };
    let mut overflow = false;
    let mut out = vec![];
    for (name, m) in groups {
        let mut counts = vec![0f64; n];
        for &v in m.samples.iter().filter(|v| v.is_finite()) {
            overflow |= v > hi;
            counts[bin(v)] += 1.0;
        }
        for &(blo, bhi, c) in &m.buckets {
            if c == 0 || !blo.is_finite() || !bhi.is_finite() {
                continue;
            }
            if bhi <= blo {
                counts[bin(blo)] += c as f64;
                continue;
            }
            let c = c as f64;
            // Parts outside [lo, hi] go to the end bins.
            if blo < lo {
                counts[0] += c * ((bhi.min(lo) - blo) / (bhi - blo));
            }
            if bhi > hi {
                overflow = true;
                counts[n - 1] += c * ((bhi - blo.max(hi)) / (bhi - blo));
            }
            let (a, b) = (blo.max(lo), bhi.min(hi));
            if b > a {
                let (ia, ib) = (bin(a), bin(b - width * 1e-9));
                for (i, slot) in counts.iter_mut().enumerate().take(ib + 1).skip(ia) {
                    let overlap = (edges[i + 1].min(b) - edges[i].max(a)).max(0.0);
                    *slot += c * overlap / (bhi - blo);
                }
            }
        }
        out.push((name.clone(), counts));
    }
    Some(Binned {
        edges,
        groups: out,
        overflow,
    })
}

/// Trap latencies of a run per device backend.
pub fn trap_latency_by_backend(run: &Run) -> std::collections::BTreeMap<String, MergedLatency> {
    let mut m: std::collections::BTreeMap<String, MergedLatency> = Default::default();
    for c in &run.cases {
        let l = &c.metrics.trap_latency;
        if l.count() == 0 {
            continue;
        }
        let e = m.entry(c.backend.clone()).or_default();
        e.samples.extend(l.samples_us.iter().copied());
        if let Some(h) = &l.histogram {
            e.buckets.extend(h.buckets());
        }
    }
    m
}

/// All trap latencies of a run.
pub fn merged_trap_latency(run: &Run) -> MergedLatency {
    let mut m = MergedLatency::default();
    for c in &run.cases {
        let l = &c.metrics.trap_latency;
        m.samples.extend(l.samples_us.iter().copied());
        if let Some(h) = &l.histogram {
            m.buckets.extend(h.buckets());
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(|i| i as f64).collect();
        let s = Summary::of(&v).unwrap();
        assert_eq!(s.count, 100);
        assert_eq!(s.median, 50.0);
        assert_eq!(s.p99, 99.0);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.max, 100.0);
        assert!((s.mean - 50.5).abs() < 1e-9);
    }

    #[test]
    fn empty_and_nan_give_none() {
        assert!(Summary::of(&[]).is_none());
        assert!(Summary::of(&[f64::NAN]).is_none());
        let (e, c, _) = MergedLatency::default().rebin(10);
        assert!(e.is_empty() && c.is_empty());
    }

    #[test]
    fn rebin_keeps_every_sample() {
        let m = MergedLatency {
            samples: vec![1.0, 2.0, 3.0, 1000.0],
            buckets: vec![(10.0, 20.0, 5)],
        };
        let (e, c, _) = m.rebin(8);
        assert_eq!(e.len(), 9);
        assert!((c.iter().sum::<f64>() - 9.0).abs() < 1e-9, "{c:?}");
        // A single value still gives a sensible bin.
        let one = MergedLatency {
            samples: vec![7.0],
            buckets: vec![],
        };
        let (_, c, _) = one.rebin(4);
        assert!((c.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        // A coarse bucket spreads evenly over the fine bins it covers.
        let coarse = MergedLatency {
            samples: vec![0.0, 40.0],
            buckets: vec![(0.0, 40.0, 400)],
        };
        let (_, c, _) = coarse.rebin(4);
        assert!((c.iter().sum::<f64>() - 402.0).abs() < 1e-6, "{c:?}");
        assert!(c.iter().all(|x| (*x - 100.0).abs() < 2.0), "{c:?}");
    }
}
