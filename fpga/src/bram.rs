//! A single-clock block RAM of 32-bit words with byte enables: one registered read
//! port and one write port (read-first). Sized at elaboration; the simulation keeps
//! its contents in a plain vector that the backend loads and reads back (the
//! equivalent of `$readmemh` at configuration and a readback port).

use rust_hdl::prelude::*;

/// Block RAM with `2^A` addressable words, of which `words()` exist.
pub struct Bram<const A: usize> {
    /// Clock.
    pub clock: Signal<In, Clock>,
    /// Read address (word index).
    pub raddr: Signal<In, Bits<A>>,
    /// Read data, registered: `mem[raddr]` as of the last rising edge.
    pub rdata: Signal<Out, Bits<32>>,
    /// Write address (word index).
    pub waddr: Signal<In, Bits<A>>,
    /// Write data.
    pub wdata: Signal<In, Bits<32>>,
    /// Byte enables of the write.
    pub wbe: Signal<In, Bits<4>>,
    /// Write enable.
    pub we: Signal<In, Bit>,
    _mem: Vec<u32>,
}

crate::sim_block!(manual_clocked impl[const A: usize] Bram<A>, Bram {
    clock: clock,
    raddr: edge,
    rdata: output,
    waddr: edge,
    wdata: edge,
    wbe: edge,
    we: edge,
    _mem: skip,
});

impl<const A: usize> Bram<A> {
    /// A RAM of `words` words (at most `2^A`), all zero.
    pub fn new(words: usize) -> Bram<A> {
        assert!(words <= 1 << A, "{words} words do not fit {A} address bits");
        Bram {
            clock: Default::default(),
            raddr: Default::default(),
            rdata: Default::default(),
            waddr: Default::default(),
            wdata: Default::default(),
            wbe: Default::default(),
            we: Default::default(),
            _mem: vec![0; words],
        }
    }

    /// Number of words.
    pub fn words(&self) -> usize {
        self._mem.len()
    }

    /// The contents.
    pub fn contents(&self) -> &[u32] {
        &self._mem
    }

    /// Load the contents from little-endian bytes (length 4 x words).
    pub fn load_bytes(&mut self, bytes: &[u8]) {
        for (w, c) in self._mem.iter_mut().zip(bytes.chunks_exact(4)) {
            *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }

    /// The contents as little-endian bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self._mem.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Copy the contents as little-endian bytes into `out` (length 4 x words).
    pub fn copy_to(&self, out: &mut [u8]) {
        for (w, c) in self._mem.iter().zip(out.chunks_exact_mut(4)) {
            c.copy_from_slice(&w.to_le_bytes());
        }
    }
}

impl<const A: usize> crate::sim::Clocked for Bram<A> {
    fn clock_to(&mut self, clk: bool, silent: bool) {
        crate::sim::move_clock(&mut self.clock, clk, silent);
    }
    fn edge_is_noop(&self) -> bool {
        let r = self.raddr.val().index();
        !self.we.val() && self.rdata.val().to_u32() == self._mem.get(r).copied().unwrap_or(0)
    }
}

impl<const A: usize> Logic for Bram<A> {
    fn update(&mut self) {
        if self.clock.pos_edge() {
            let r = self.raddr.val().index();
            self.rdata.next = (self._mem.get(r).copied().unwrap_or(0) as u64).into();
            if self.we.val() {
                let w = self.waddr.val().index();
                if let Some(slot) = self._mem.get_mut(w) {
                    let be = self.wbe.val().index();
                    let mut m = 0u32;
                    for i in 0..4 {
                        if be & (1 << i) != 0 {
                            m |= 0xff << (8 * i);
                        }
                    }
                    let d = self.wdata.val().to_u32();
                    *slot = (*slot & !m) | (d & m);
                }
            }
        }
    }

    fn connect(&mut self) {
        self.rdata.connect();
    }

    fn hdl(&self) -> Verilog {
        // Initial contents: zero, then the words that are not (configuration-time
        // contents, e.g. erased flash or provisioned keys).
        let mut init = format!(
            "integer i;\ninitial begin\n   for (i = 0; i < {n}; i = i + 1) mem[i] = 32'h0;\n",
            n = self._mem.len()
        );
        for (i, w) in self._mem.iter().enumerate() {
            if *w != 0 {
                init.push_str(&format!("   mem[{i}] = 32'h{w:08x};\n"));
            }
        }
        init.push_str("end\n");
        Verilog::Custom(format!(
            "\
reg [31:0] mem [0:{last}];

{init}
always @(posedge clock) begin
   rdata <= mem[raddr];
   if (we) begin
      if (wbe[0]) mem[waddr][7:0] <= wdata[7:0];
      if (wbe[1]) mem[waddr][15:8] <= wdata[15:8];
      if (wbe[2]) mem[waddr][23:16] <= wdata[23:16];
      if (wbe[3]) mem[waddr][31:24] <= wdata[31:24];
   end
end
",
            last = self._mem.len().max(1) - 1
        ))
    }

    fn timing(&self) -> Vec<TimingInfo> {
        vec![
            TimingInfo {
                name: "bram_read".into(),
                clock: "clock".into(),
                inputs: vec!["raddr".into()],
                outputs: vec!["rdata".into()],
            },
            TimingInfo {
                name: "bram_write".into(),
                clock: "clock".into(),
                inputs: vec!["waddr".into(), "wdata".into(), "wbe".into(), "we".into()],
                outputs: vec![],
            },
        ]
    }
}
