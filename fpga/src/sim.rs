//! Hand-written `Block` implementations for the simulated blocks (`sim_block!`).
//!
//! rust-hdl's `#[derive(LogicBlock)]` settles a circuit by running passes until no
//! signal changed. Two facts about synchronous logic let the `rtl` backend run far
//! fewer and cheaper passes, with the same results:
//!
//! - a signal read only on clock edges (a register's `d`, a block RAM's address and
//!   write ports) changing does not call for another pass: nothing combinational
//!   reads it, and the next edge reads its settled value. A register counts as
//!   changed when its clock or its `q` did;
//! - a block whose last evaluation changed nothing, and whose inputs have not moved
//!   since, would change nothing again: a *gated* block skips the evaluation.
//!   (Moving its clocks from outside, as `clock_to` does, opens the gate.)
//!
//! The Verilog is unchanged: `accept` visits every field in declaration order,
//! exactly as the derive does. Each invocation lists every field of the struct (a
//! destructuring pattern without `..` makes a missing one a compile error).

use rust_hdl::prelude::*;
use std::ops::BitXor;

/// Moving the clock on a block's registers from outside, without evaluation passes.
pub trait Clocked {
    /// Move the clock to `clk` on every register and RAM of the block at once.
    ///
    /// Rising edge: fanned out before the settle, every register sees the edge in
    /// the first pass (instead of one level of sub-blocks per pass) and latches the
    /// settled values, as in hardware. With `silent` (the caller knows the edge
    /// changes nothing: `edge_is_noop`), no register sees it at all. A gated block
    /// whose last evaluation changed nothing checks that for itself and stays
    /// quiet. Falling edge: every register acts on the rising edge, so on a settled
    /// circuit it moves the clock wires and nothing else.
    fn clock_to(&mut self, clk: bool, silent: bool);
    /// Whether a rising edge now would change nothing: every register would latch
    /// the value it holds and no RAM would be written or read anew.
    fn edge_is_noop(&self) -> bool;
}

/// Move one clock wire; silently (no edge seen) for falling edges and when asked.
#[inline]
pub fn move_clock(s: &mut Signal<In, Clock>, clk: bool, silent: bool) {
    s.next = Clock { clk };
    s.update_all();
    if silent || !clk {
        // Clears `changed`: `pos_edge` is false while the value stays moved.
        s.update_all();
    }
}

impl<T: Synth + BitXor<Output = T>> Clocked for DFFWithInit<T> {
    fn clock_to(&mut self, clk: bool, silent: bool) {
        move_clock(&mut self.clock, clk, silent);
        move_clock(&mut self.dff.clock, clk, silent);
    }
    fn edge_is_noop(&self) -> bool {
        self.dff.d.val() == self.dff.q.val()
    }
}

/// Implement `Block` (and [`Clocked`]) for a struct from its fields and their kinds:
/// `clock` (the clock input), `input` (an input port), `edge` (an input read only on clock edges), `output`,
/// `local`, `dff` (a `DFF`; a `DFFWithInit` reads its `d` combinationally and is a
/// `block`), `konst` (a `Constant`), `block` (a
/// sub-block), `skip` (not a circuit element: simulation-only state).
/// `gated(field)`: skip evaluations while quiet (see the module docs);
/// `manual_clocked`: the block implements [`Clocked`] itself.
///
/// Exported (`hilrig_fpga::sim_block!`) for blocks of other crates built on the
/// core, e.g. the board's host bridge. The invoking scope needs
/// `rust_hdl::prelude::*`.
#[macro_export]
macro_rules! sim_block {
    (@changed $s:ident . $f:ident input) => { $s.$f.has_changed() };
    (@changed $s:ident . $f:ident clock) => { $s.$f.has_changed() };
    (@changed $s:ident . $f:ident edge) => { false };
    (@changed $s:ident . $f:ident output) => { $s.$f.has_changed() };
    (@changed $s:ident . $f:ident local) => { $s.$f.has_changed() };
    (@changed $s:ident . $f:ident dff) => { $s.$f.clock.has_changed() || $s.$f.q.has_changed() };
    (@changed $s:ident . $f:ident konst) => { false };
    (@changed $s:ident . $f:ident block) => { $s.$f.has_changed() };
    (@changed $s:ident . $f:ident skip) => { false };
    (@inside $s:ident . $f:ident output) => { false };
    (@inside $s:ident . $f:ident $k:ident) => { $crate::sim_block!(@changed $s.$f $k) };
    (@steady $s:ident . $f:ident input) => { $s.$f.next == $s.$f.val() };
    (@steady $s:ident . $f:ident clock) => { $s.$f.next == $s.$f.val() };
    (@steady $s:ident . $f:ident edge) => { $s.$f.next == $s.$f.val() };
    (@steady $s:ident . $f:ident $k:ident) => { true };
    (@visit $s:ident . $f:ident skip; $($t:tt)*) => {};
    (@move $s:ident . $f:ident input) => { $s.$f.update_all(); };
    (@move $s:ident . $f:ident edge) => { $s.$f.update_all(); };
    (@move $s:ident . $f:ident $k:ident) => {};
    (@clk $s:ident . $f:ident clock, $c:ident, $q:ident) => { $crate::sim::move_clock(&mut $s.$f, $c, $q); };
    (@clk $s:ident . $f:ident dff, $c:ident, $q:ident) => { $crate::sim::move_clock(&mut $s.$f.clock, $c, $q); };
    (@clk $s:ident . $f:ident block, $c:ident, $q:ident) => { $crate::sim::Clocked::clock_to(&mut $s.$f, $c, $q); };
    (@clk $s:ident . $f:ident $k:ident, $c:ident, $q:ident) => {};
    (@noop $s:ident . $f:ident dff) => { $s.$f.d.val() == $s.$f.q.val() };
    (@noop $s:ident . $f:ident block) => { $crate::sim::Clocked::edge_is_noop(&$s.$f) };
    (@noop $s:ident . $f:ident $k:ident) => { true };
    (@visit $s:ident . $f:ident $k:ident; $m:ident $($a:expr),*) => { $s.$f.$m($($a),*); };
    (@common [$($g:tt)*] $ty:ty, $name:ident { $($f:ident : $k:ident),* $(,)? }) => {
        impl<$($g)*> $ty {
            /// Whether the last pass changed anything inside the block that calls for
            /// another pass, not counting its outputs (a top-level block's outputs are
            /// read by nothing in the circuit).
            #[allow(dead_code)]
            pub fn changed_within(&self) -> bool {
                false $(|| $crate::sim_block!(@inside self.$f $k))*
            }
            /// Move the input ports (all but the clock) to the values set on them, so
            /// that the next evaluation pass already sees them (otherwise the block's
            /// logic runs once on the old inputs before they move).
            #[allow(dead_code)]
            pub fn move_inputs(&mut self) {
                $($crate::sim_block!(@move self.$f $k);)*
            }
            #[allow(dead_code, clippy::needless_pass_by_value)]
            fn exhaustive_field_list(x: $ty) {
                let $name { $($f: _),* } = x;
            }
        }
    };
    (manual_clocked impl[$($g:tt)*] $ty:ty, $name:ident { $($f:ident : $k:ident),* $(,)? }) => {
        impl<$($g)*> Block for $ty {
            fn connect_all(&mut self) {
                self.connect();
                $($crate::sim_block!(@visit self.$f $k; connect_all);)*
            }
            fn update_all(&mut self) {
                self.update();
                $($crate::sim_block!(@visit self.$f $k; update_all);)*
            }
            fn has_changed(&self) -> bool {
                false $(|| $crate::sim_block!(@changed self.$f $k))*
            }
            fn accept(&self, name: &str, probe: &mut dyn Probe) {
                probe.visit_start_scope(name, self);
                $($crate::sim_block!(@visit self.$f $k; accept stringify!($f), probe);)*
                probe.visit_end_scope(name, self);
            }
        }
        $crate::sim_block!(@common [$($g)*] $ty, $name { $($f: $k),* });
    };
    (impl[$($g:tt)*] $ty:ty, $name:ident { $($f:ident : $k:ident),* $(,)? }) => {
        impl<$($g)*> Block for $ty {
            fn connect_all(&mut self) {
                self.connect();
                $($crate::sim_block!(@visit self.$f $k; connect_all);)*
            }
            fn update_all(&mut self) {
                self.update();
                $($crate::sim_block!(@visit self.$f $k; update_all);)*
            }
            fn has_changed(&self) -> bool {
                false $(|| $crate::sim_block!(@changed self.$f $k))*
            }
            fn accept(&self, name: &str, probe: &mut dyn Probe) {
                probe.visit_start_scope(name, self);
                $($crate::sim_block!(@visit self.$f $k; accept stringify!($f), probe);)*
                probe.visit_end_scope(name, self);
            }
        }
        impl<$($g)*> $crate::sim::Clocked for $ty {
            fn clock_to(&mut self, clk: bool, silent: bool) {
                $($crate::sim_block!(@clk self.$f $k, clk, silent);)*
            }
            fn edge_is_noop(&self) -> bool {
                true $(&& $crate::sim_block!(@noop self.$f $k))*
            }
        }
        $crate::sim_block!(@common [$($g)*] $ty, $name { $($f: $k),* });
    };
    (gated($q:ident) impl[$($g:tt)*] $ty:ty, $name:ident { $($f:ident : $k:ident),* $(,)? }) => {
        impl<$($g)*> Block for $ty {
            fn connect_all(&mut self) {
                self.connect();
                $($crate::sim_block!(@visit self.$f $k; connect_all);)*
            }
            fn update_all(&mut self) {
                if self.$q $(&& $crate::sim_block!(@steady self.$f $k))* {
                    return;
                }
                self.update();
                $($crate::sim_block!(@visit self.$f $k; update_all);)*
                self.$q = !self.has_changed();
            }
            fn has_changed(&self) -> bool {
                false $(|| $crate::sim_block!(@changed self.$f $k))*
            }
            fn accept(&self, name: &str, probe: &mut dyn Probe) {
                probe.visit_start_scope(name, self);
                $($crate::sim_block!(@visit self.$f $k; accept stringify!($f), probe);)*
                probe.visit_end_scope(name, self);
            }
        }
        impl<$($g)*> $crate::sim::Clocked for $ty {
            fn clock_to(&mut self, clk: bool, silent: bool) {
                let silent = silent || (clk && self.$q && self.edge_is_noop());
                if clk && !silent {
                    self.$q = false;
                }
                $($crate::sim_block!(@clk self.$f $k, clk, silent);)*
            }
            fn edge_is_noop(&self) -> bool {
                true $(&& $crate::sim_block!(@noop self.$f $k))*
            }
        }
        $crate::sim_block!(@common [$($g)*] $ty, $name { $($f: $k),* });
    };
}
