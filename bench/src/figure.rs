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
