//! SHA-256 of a flash region, iterative: one round a cycle, 65 cycles a 64-byte
//! block (64 rounds and the add into H, which also starts the next block), plus one
//! cycle to start. The message is read from a block RAM of 32-bit words holding
//! little-endian bytes (`raddr`, registered `rdata`); the padding (0x80, zeros,
//! 64-bit bit length) is generated from `nwords`, so the region is hashed exactly as
//! `sha2::Sha256::digest` hashes its bytes.
//!
//! Like [`crate::bram::Bram`], the block is written twice: the simulation in plain
//! Rust on `u32`s (rust-hdl's shifts and rotates are slow in simulation), and the
//! Verilog by hand (`hdl`); `tests/verilog.rs` runs a READ_HASH on the generated
//! Verilog under Icarus and checks its response against the simulation's.

use rust_hdl::prelude::*;

const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

const IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// Cycles to hash a region of `bytes` bytes (a multiple of 4): from the edge that
/// samples `start` to the one that raises `done`, both counted.
pub fn hash_cycles(bytes: u32) -> u64 {
    let n = (bytes / 4) as u64;
    let blocks = (n + 18) / 16;
    2 + 65 * blocks
}

#[derive(Clone, Default)]
struct ShaRegs {
    st: u8,
    t: u32,
    base: u32,
    h: [u32; 8],
    v: [u32; 8],
    w: [u32; 16],
    done: bool,
    /// The address whose word the next step consumes (the one presented in the
    /// cycle before the last step): presented again while stalled, so that the
    /// word is in the RAM's output register when the unit is enabled again.
    need: u32,
}

impl ShaRegs {
    /// The read address for the word the step after the next one consumes.
    fn ahead(&self) -> u32 {
        match self.st {
            2 => self.base + self.t + 1,
            3 => self.base + 16,
            _ => self.base,
        }
    }
}

/// The SHA-256 unit.
#[derive(LogicBlock)]
pub struct Sha256Unit {
    /// Clock.
    pub clock: Signal<In, Clock>,
    /// Start hashing (while idle).
    pub start: Signal<In, Bit>,
    /// Step (while hashing): low stalls the unit, e.g. while the message RAM's read
    /// port is lent to someone else. `rdata` must hold the word at `raddr` as of the
    /// edge `en` is high on, so it goes high one cycle after the port comes back.
    pub en: Signal<In, Bit>,
    /// Message length in 32-bit words (sampled throughout: hold it).
    pub nwords: Signal<In, Bits<20>>,
    /// Message RAM read address.
    pub raddr: Signal<Out, Bits<18>>,
    /// Message RAM read data (registered RAM: the word at last cycle's `raddr`).
    pub rdata: Signal<In, Bits<32>>,
    /// High for one cycle when the digest is ready.
    pub done: Signal<Out, Bit>,
    /// Hashing.
    pub busy: Signal<Out, Bit>,
    /// Digest byte select (0..32, in output order).
    pub dsel: Signal<In, Bits<5>>,
    /// Digest byte `dsel`.
    pub dbyte: Signal<Out, Bits<8>>,
    _r: ShaRegs,
}

impl Default for Sha256Unit {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256Unit {
    /// The unit, idle.
    pub fn new() -> Sha256Unit {
        Sha256Unit {
            clock: Default::default(),
            start: Default::default(),
            en: Default::default(),
            nwords: Default::default(),
            raddr: Default::default(),
            rdata: Default::default(),
            done: Default::default(),
            busy: Default::default(),
            dsel: Default::default(),
            dbyte: Default::default(),
            _r: ShaRegs::default(),
        }
    }

    fn step(&mut self) {
        let nwords = self.nwords.val().to_u32();
        let total = (nwords + 18) & !15;
        let rdata = self.rdata.val().to_u32();
        let start = self.start.val();
        let r = &mut self._r;
        r.done = false;
        match r.st {
            0 => {
                if start {
                    r.h = IV;
                    r.base = 0;
                    r.st = 1;
                }
            }
            1 => {
                r.v = r.h;
                r.t = 0;
                r.st = 2;
            }
            2 => {
                let t = r.t;
                let widx = r.base + t;
                let m = if widx < nwords {
                    rdata.swap_bytes()
                } else if widx == nwords {
                    0x8000_0000
                } else if widx == total - 1 {
                    nwords << 5
                } else {
                    0
                };
                let w = &r.w;
                let s0 = w[1].rotate_right(7) ^ w[1].rotate_right(18) ^ (w[1] >> 3);
                let s1 = w[14].rotate_right(17) ^ w[14].rotate_right(19) ^ (w[14] >> 10);
                let wt = if t < 16 {
                    m
                } else {
                    s1.wrapping_add(w[9]).wrapping_add(s0).wrapping_add(w[0])
                };
                let [a, b, c, d, e, f, g, h] = r.v;
                let big_s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
                let ch = (e & f) ^ (!e & g);
                let t1 = h
                    .wrapping_add(big_s1)
                    .wrapping_add(ch)
                    .wrapping_add(K[t as usize])
                    .wrapping_add(wt);
                let big_s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
                let maj = (a & b) ^ (a & c) ^ (b & c);
                let t2 = big_s0.wrapping_add(maj);
                r.v = [t1.wrapping_add(t2), a, b, c, d.wrapping_add(t1), e, f, g];
                r.w.copy_within(1.., 0);
                r.w[15] = wt;
                r.t = (t + 1) & 63;
                if t == 63 {
                    r.st = 3;
                }
            }
            _ => {
                for i in 0..8 {
                    r.h[i] = r.h[i].wrapping_add(r.v[i]);
                }
                r.v = r.h;
                r.t = 0;
                r.base = (r.base + 16) & 0xf_ffff;
                if r.base == total {
                    r.st = 0;
                    r.done = true;
                } else {
                    r.st = 2;
                }
            }
        }
    }
}

impl crate::sim::Clocked for Sha256Unit {
    fn clock_to(&mut self, clk: bool, silent: bool) {
        crate::sim::move_clock(&mut self.clock, clk, silent);
    }
    fn edge_is_noop(&self) -> bool {
        // Idle, no digest to retire, not started, `need` current: an edge would
        // change nothing.
        let r = &self._r;
        r.st == 0 && !r.done && !self.start.val() && r.need == r.ahead()
    }
}

impl Logic for Sha256Unit {
    fn update(&mut self) {
        if self.clock.pos_edge() {
            if self._r.st == 0 || self.en.val() {
                let a = self._r.ahead();
                self.step();
                self._r.need = a;
            } else {
                self._r.done = false;
            }
        }
        let r = &self._r;
        let a = if self.en.val() { r.ahead() } else { r.need };
        self.raddr.next = ((a & 0x3_ffff) as u64).into();
        self.done.next = r.done;
        self.busy.next = r.st != 0;
        let i = self.dsel.val().index();
        self.dbyte.next = ((r.h[i / 4] >> (8 * (3 - i % 4)) & 0xff) as u64).into();
    }

    fn connect(&mut self) {
        self.raddr.connect();
        self.done.connect();
        self.busy.connect();
        self.dbyte.connect();
    }

    fn hdl(&self) -> Verilog {
        let mut v = String::new();
        let regs = |p: &str, n: usize| -> String {
            (0..n)
                .map(|i| format!("{p}{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        v.push_str("reg [1:0] st = 0;\nreg [5:0] t = 0;\nreg [19:0] base = 0;\nreg done_r = 0;\nreg [19:0] need = 0;\nreg [19:0] ra;\n");
        v.push_str(&format!("reg [31:0] {};\n", regs("h", 8)));
        v.push_str(&format!("reg [31:0] {};\n", regs("v", 8)));
        v.push_str(&format!("reg [31:0] {};\n", regs("w", 16)));
        v.push_str("initial begin\n");
        for i in 0..8 {
            v.push_str(&format!("   h{i} = 0; v{i} = 0;\n"));
        }
        for i in 0..16 {
            v.push_str(&format!("   w{i} = 0;\n"));
        }
        v.push_str("end\n");
        v.push_str(
            "\
wire [19:0] total = (nwords + 20'd18) & ~20'd15;
wire [19:0] widx = base + {14'd0, t};
reg [31:0] m;
always @(*) begin
   if (widx < nwords) m = {rdata[7:0], rdata[15:8], rdata[23:16], rdata[31:24]};
   else if (widx == nwords) m = 32'h80000000;
   else if (widx == total - 20'd1) m = {7'd0, nwords, 5'd0};
   else m = 32'h0;
end
wire [31:0] s0w = {w1[6:0], w1[31:7]} ^ {w1[17:0], w1[31:18]} ^ {3'd0, w1[31:3]};
wire [31:0] s1w = {w14[16:0], w14[31:17]} ^ {w14[18:0], w14[31:19]} ^ {10'd0, w14[31:10]};
wire [31:0] wt = (t < 6'd16) ? m : s1w + w9 + s0w + w0;
reg [31:0] k;
always @(*) begin
   case (t)
",
        );
        for (i, k) in K.iter().enumerate() {
            v.push_str(&format!("      6'd{i}: k = 32'h{k:08x};\n"));
        }
        v.push_str(
            "\
      default: k = 32'h0;
   endcase
end
wire [31:0] bs1 = {v4[5:0], v4[31:6]} ^ {v4[10:0], v4[31:11]} ^ {v4[24:0], v4[31:25]};
wire [31:0] ch = (v4 & v5) ^ (~v4 & v6);
wire [31:0] t1 = v7 + bs1 + ch + k + wt;
wire [31:0] bs0 = {v0[1:0], v0[31:2]} ^ {v0[12:0], v0[31:13]} ^ {v0[21:0], v0[31:22]};
wire [31:0] maj = (v0 & v1) ^ (v0 & v2) ^ (v1 & v2);
wire [31:0] t2 = bs0 + maj;
always @(posedge clock) begin
   done_r <= 1'b0;
   if (st == 2'd0 || en) begin
   need <= ra;
   case (st)
   2'd0: if (start) begin
",
        );
        for (i, iv) in IV.iter().enumerate() {
            v.push_str(&format!("         h{i} <= 32'h{iv:08x};\n"));
        }
        v.push_str("         base <= 20'd0; st <= 2'd1;\n      end\n   2'd1: begin\n");
        for i in 0..8 {
            v.push_str(&format!("         v{i} <= h{i};\n"));
        }
        v.push_str("         t <= 6'd0; st <= 2'd2;\n      end\n   2'd2: begin\n");
        for i in 0..15 {
            v.push_str(&format!("         w{i} <= w{};\n", i + 1));
        }
        v.push_str(
            "\
         w15 <= wt;
         v0 <= t1 + t2; v1 <= v0; v2 <= v1; v3 <= v2;
         v4 <= v3 + t1; v5 <= v4; v6 <= v5; v7 <= v6;
         t <= t + 6'd1;
         if (t == 6'd63) st <= 2'd3;
      end
   default: begin
",
        );
        for i in 0..8 {
            v.push_str(&format!(
                "         h{i} <= h{i} + v{i}; v{i} <= h{i} + v{i};\n"
            ));
        }
        v.push_str(
            "\
         t <= 6'd0;
         base <= base + 20'd16;
         if (base + 20'd16 == total) begin st <= 2'd0; done_r <= 1'b1; end
         else st <= 2'd2;
      end
   endcase
   end
end
always @(*) begin
   case (st)
      2'd2: ra = base + {14'd0, t} + 20'd1;
      2'd3: ra = base + 20'd16;
      default: ra = base;
   endcase
   raddr = en ? ra[17:0] : need[17:0];
   done = done_r;
   busy = st != 2'd0;
   case (dsel)
",
        );
        for i in 0..32 {
            let hi = 31 - 8 * (i % 4);
            v.push_str(&format!(
                "      5'd{i}: dbyte = h{}[{hi}:{}];\n",
                i / 4,
                hi - 7
            ));
        }
        v.push_str("      default: dbyte = 8'h0;\n   endcase\nend\n");
        Verilog::Custom(v)
    }

    fn timing(&self) -> Vec<TimingInfo> {
        vec![TimingInfo {
            name: "sha256".into(),
            clock: "clock".into(),
            inputs: vec![
                "start".into(),
                "nwords".into(),
                "rdata".into(),
                "dsel".into(),
            ],
            outputs: vec!["raddr".into(), "done".into(), "busy".into(), "dbyte".into()],
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bram::Bram;
    use crate::counter::settle;

    #[derive(LogicBlock)]
    struct Bench {
        clock: Signal<In, Clock>,
        start: Signal<In, Bit>,
        dsel: Signal<In, Bits<5>>,
        sha: Sha256Unit,
        ram: Bram<18>,
        k_n: Constant<Bits<20>>,
    }

    impl Logic for Bench {
        #[hdl_gen]
        fn update(&mut self) {
            clock!(self, clock, sha, ram);
            self.sha.start.next = self.start.val();
            self.sha.en.next = true;
            self.sha.nwords.next = self.k_n.val();
            self.sha.dsel.next = self.dsel.val();
            self.ram.raddr.next = self.sha.raddr.val();
            self.sha.rdata.next = self.ram.rdata.val();
            self.ram.waddr.next = 0.into();
            self.ram.wdata.next = 0.into();
            self.ram.wbe.next = 0.into();
            self.ram.we.next = false;
        }
    }

    fn hash(data: &[u8]) -> ([u8; 32], u64) {
        let mut b = Bench {
            clock: Default::default(),
            start: Default::default(),
            dsel: Default::default(),
            sha: Sha256Unit::new(),
            ram: Bram::new(data.len() / 4),
            k_n: Constant::new(((data.len() / 4) as u64).into()),
        };
        b.ram.load_bytes(data);
        b.connect_all();
        let tick = |b: &mut Bench| {
            b.clock.next = Clock { clk: true };
            settle(b);
            b.clock.next = Clock { clk: false };
            settle(b);
        };
        settle(&mut b);
        b.start.next = true;
        tick(&mut b);
        b.start.next = false;
        let mut n = 1;
        while !b.sha.done.val() {
            tick(&mut b);
            n += 1;
            assert!(n < 1_000_000);
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            b.dsel.next = (i as u64).into();
            settle(&mut b);
            *o = b.sha.dbyte.val().to_u32() as u8;
        }
        (out, n)
    }

    #[test]
    fn digests_match_sha2_at_padding_edges() {
        use hilrig_device::state::NvState;
        for words in [1usize, 4, 12, 13, 14, 15, 16, 17, 29, 30, 64, 256] {
            let data: Vec<u8> = (0..words * 4).map(|i| (i * 7 + words) as u8).collect();
            let (got, n) = hash(&data);
            let mut nv =
                NvState::factory(hilrig_device::state::DeviceConfig::default(), 1).unwrap();
            nv.flash[2] = data.clone();
            let want = nv.region_hash(hilrig_device::regmap::Region::Config);
            assert_eq!(got, want, "{words} words");
            assert_eq!(n, hash_cycles(4 * words as u32), "{words} words");
        }
    }

    #[test]
    fn sha_generates_verilog() {
        let mut u = Sha256Unit::new();
        u.connect_all();
        let v = generate_verilog(&u);
        assert!(v.contains("32'h428a2f98"));
    }
}
