//! A 32-bit counter: the step-0 yardstick for rust-hdl simulation speed, driven
//! directly (set inputs, settle, toggle the clock) and through `simple_sim!`.

use rust_hdl::prelude::*;
use std::time::Instant;

/// A free-running 32-bit counter with an enable.
#[derive(LogicBlock, Default)]
pub struct Counter32 {
    /// Clock.
    pub clock: Signal<In, Clock>,
    /// Count when high.
    pub enable: Signal<In, Bit>,
    /// The count.
    pub count: Signal<Out, Bits<32>>,
    cnt: DFF<Bits<32>>,
}

impl Logic for Counter32 {
    #[hdl_gen]
    fn update(&mut self) {
        dff_setup!(self, clock, cnt);
        if self.enable.val() {
            self.cnt.d.next = self.cnt.q.val() + 1;
        }
        self.count.next = self.cnt.q.val();
    }
}

/// Settle a circuit: propagate until nothing changes. Returns the number of passes.
#[inline]
pub fn settle<B: Block>(b: &mut B) -> usize {
    let mut n = 0;
    loop {
        b.update_all();
        n += 1;
        if !b.has_changed() {
            return n;
        }
    }
}

/// Drive the counter directly for `cycles` clock cycles; returns (final count, cycles/s).
pub fn drive_counter(cycles: u64) -> (u32, f64) {
    let mut c = Counter32::default();
    c.connect_all();
    c.enable.next = true;
    settle(&mut c);
    let t = Instant::now();
    for _ in 0..cycles {
        c.clock.next = Clock { clk: true };
        settle(&mut c);
        c.clock.next = Clock { clk: false };
        settle(&mut c);
    }
    let rate = cycles as f64 / t.elapsed().as_secs_f64();
    (c.count.val().to_u64() as u32, rate)
}

/// Run the counter under `simple_sim!` for `cycles` clock cycles; returns cycles/s.
pub fn simple_sim_counter(cycles: u64) -> f64 {
    let mut sim = simple_sim!(Counter32, clock, 100_000_000, ep, {
        let mut x = ep.init()?;
        x.enable.next = true;
        wait_clock_cycles!(ep, clock, x, cycles);
        ep.done(x)
    });
    let t = Instant::now();
    let ok = sim
        .run(Box::new(Counter32::default()), (cycles + 10) * 10_000)
        .is_ok();
    let rate = cycles as f64 / t.elapsed().as_secs_f64();
    if ok {
        rate
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_counts_in_both_harnesses() {
        let (n, r) = drive_counter(1000);
        assert_eq!(n, 1000);
        assert!(r > 0.0);
        assert!(simple_sim_counter(100) > 0.0);
    }
}
