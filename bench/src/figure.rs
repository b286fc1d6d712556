//! Benchmark figures, shared by every crate's `hilrig bench` entry: each figure may
//! name a baseline figure measured in the same run, and is printed with the ratio.

use std::time::{Duration, Instant};

/// One measured figure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figure {
    /// What was measured.
    pub name: String,
    /// The value.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
    /// Index (in the same list) of the figure this one is compared with, if any.
    pub baseline: Option<usize>,
    /// The target, in words, if the issue names one.
    pub target: Option<String>,
}

impl Figure {
    /// A figure without baseline or target.
    pub fn new(name: impl Into<String>, value: f64, unit: &'static str) -> Figure {
        Figure {
            name: name.into(),
            value,
            unit,
            baseline: None,
            target: None,
        }
    }

    /// Compare with the figure at index `i`.
    pub fn vs(mut self, i: usize) -> Figure {
        self.baseline = Some(i);
        self
    }

    /// Attach a target.
    pub fn target(mut self, t: impl Into<String>) -> Figure {
        self.target = Some(t.into());
        self
    }
}

/// Run `op(i)` in batches of `batch` until `budget` is spent; returns calls per second.
pub fn rate(budget: Duration, batch: u64, mut op: impl FnMut(u64)) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for i in 0..batch {
            op(n + i);
        }
        n += batch;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Paired rounds against a baseline measured in the same run: `rounds` rounds, each
/// running every arm once — `arms[0]` is the baseline — in an order that alternates
/// from round to round (forward, then backward), so drift in the machine's speed
/// over the run (a neighbour's burst, a host under shared paging) hits an arm and
/// the baseline of the same round alike. Returns one rate per arm: the baseline's
/// median, and for every other arm the baseline's median times the median of its
/// per-round ratios to the baseline, so the printed ratio is that median.
pub fn paired_rounds<E>(
    rounds: usize,
    arms: &mut [&mut dyn FnMut() -> Result<f64, E>],
) -> Result<Vec<f64>, E> {
    let k = arms.len();
    let mut rates = vec![Vec::with_capacity(rounds); k];
    for r in 0..rounds.max(1) {
        for j in 0..k {
            let i = if r % 2 == 0 { j } else { k - 1 - j };
            rates[i].push(arms[i]()?);
        }
    }
    let base = median(&rates[0]);
    Ok((0..k)
        .map(|i| {
            if i == 0 {
                return base;
            }
            let ratios: Vec<f64> = rates[i]
                .iter()
                .zip(&rates[0])
                .map(|(a, b)| if *b > 0.0 { a / b } else { 0.0 })
                .collect();
            base * median(&ratios)
        })
        .collect())
}

/// The median of `v` (NaN for none).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_rounds_report_the_median_ratio_and_alternate_the_order() {
        let order = std::cell::RefCell::new(Vec::new());
        let mut n = 0.0;
        // The baseline drifts 100, 200, 300 ...; the arm is always 0.9 of the
        // round's baseline but one round it is hit by a burst (0.1).
        let mut base = || {
            order.borrow_mut().push(0);
            n += 100.0;
            Ok::<f64, ()>(n)
        };
        let mut round = 0;
        let mut arm = || {
            order.borrow_mut().push(1);
            round += 1;
            Ok::<f64, ()>(if round == 2 {
                0.1
            } else {
                0.9 * 100.0 * round as f64
            })
        };
        let out = paired_rounds(3, &mut [&mut base, &mut arm]).unwrap();
        assert_eq!(out[0], 200.0);
        assert!((out[1] / out[0] - 0.9).abs() < 1e-9, "{out:?}");
        assert_eq!(*order.borrow(), vec![0, 1, 1, 0, 0, 1]);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[3.0, 1.0, 2.0, 4.0]), 2.5);
    }
}
