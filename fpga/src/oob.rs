//! The OOB protocol engine in RTL: the framed request/response protocol of
//! `hilrig_device::oob` (frame `A5 | len | seq | cmd | payload | crc16-le`,
//! CRC-16/CCITT-FALSE over `len..payload`) on a byte stream.
//!
//! Byte interface:
//! - requests: `rx_data` with `rx_valid` (one byte per cycle at most), then
//!   `rx_end` (the request is complete: the caller delimits it, or the core's
//!   UART idle timer does after two character times of silence). A request is
//!   judged as a whole, exactly as `hilrig_device::oob::serve` judges a frame:
//!   bad sync, truncated, oversized (length byte above 64 or more bytes than
//!   announced), bad CRC, unknown command, bad length, bad key, bad region;
//! - responses: `tx_data` while `tx_valid`, one byte taken per cycle `tx_ready`
//!   is high; the engine accepts no request bytes until the response is out.
//!
//! The CRC is computed as bytes stream in and out (one byte a cycle); the
//! PHYSICAL_RESET key is compared byte by byte against the reset-key RAM as it
//! arrives (no early exit: every byte is compared). A good PHYSICAL_RESET raises
//! `pr_req` until the core answers `pr_ok` (done and persisted) or `pr_fail`
//! (could not persist: nothing changed, an `Internal` error frame).
//!
//! A good READ_HASH raises `hash_req`; once the core grants the flash read port
//! (`hash_grant`), the SHA-256 unit ([`crate::sha`]) hashes the region from its block
//! RAM (`hash_raddr`, `hash_rdata`) and the digest is sent.

use crate::bram::Bram;
use crate::sha::Sha256Unit;
use hilrig_device::oob::{MAX_PAYLOAD, SYNC};
use hilrig_device::regmap::{DEVICE_ID_VALUE, DEVICE_VERSION_VALUE};
use rust_hdl::prelude::*;

/// One byte of CRC-16/CCITT-FALSE (poly 0x1021, MSB first), combinational: the
/// byte-wise closed form (XORs of shifted copies, no adders), simulated as plain
/// integer arithmetic and written out as hand-made Verilog.
pub struct Crc16Step {
    /// CRC before the byte.
    pub crc_in: Signal<In, Bits<16>>,
    /// The byte.
    pub data_in: Signal<In, Bits<8>>,
    /// CRC after the byte.
    pub crc_out: Signal<Out, Bits<16>>,
    /// Simulation only: the last evaluation changed nothing (see `crate::sim`).
    _quiet: bool,
}

crate::sim_block!(gated(_quiet) impl[] Crc16Step, Crc16Step {
    crc_in: input,
    data_in: input,
    crc_out: output,
    _quiet: skip,
});

impl Default for Crc16Step {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc16Step {
    /// The step.
    pub fn new() -> Crc16Step {
        Crc16Step {
            crc_in: Default::default(),
            data_in: Default::default(),
            crc_out: Default::default(),
            _quiet: false,
        }
    }
}

/// CRC-16/CCITT-FALSE of one more byte: `x = (crc >> 8) ^ b; x ^= x >> 4;
/// crc = (crc << 8) ^ (x << 12) ^ (x << 5) ^ x`.
pub fn crc16_step(crc: u16, b: u8) -> u16 {
    let mut x = ((crc >> 8) as u8) ^ b;
    x ^= x >> 4;
    let x = x as u16;
    (crc << 8) ^ (x << 12) ^ (x << 5) ^ x
}

impl Logic for Crc16Step {
    fn update(&mut self) {
        let c = crc16_step(
            self.crc_in.val().to_u32() as u16,
            self.data_in.val().to_u32() as u8,
        );
        self.crc_out.next = (c as u64).into();
    }

    fn connect(&mut self) {
        self.crc_out.connect();
    }

    fn hdl(&self) -> Verilog {
        Verilog::Custom(
            "\
wire [7:0] x0 = crc_in[15:8] ^ data_in;
wire [7:0] x = x0 ^ {4'b0, x0[7:4]};
always @(*) crc_out = {crc_in[7:0], 8'b0} ^ {x[3:0], 12'b0} ^ {3'b0, x, 5'b0} ^ {8'b0, x};
"
            .into(),
        )
    }
}

/// Engine states.
#[derive(Copy, Clone, PartialEq, Debug, LogicState)]
pub enum OobState {
    /// Receiving a request.
    Rx,
    /// A good PHYSICAL_RESET waits for the core.
    Reset,
    /// Sending the response.
    Tx,
    /// A good READ_HASH: waits for the core to hand over the flash read port, then
    /// hashes the region.
    Hash,
}

/// Response kinds (`rtype`): 0 error, 1 IDENTIFY, 2 READ_COUNTERS, 3 READ_HASH,
/// 4 PHYSICAL_RESET.
/// Codes are written as literals in `update` (the Verilog has no Rust constants);
/// `tests::literals_match_the_protocol` ties them to `hilrig_device::oob`.
/// The OOB protocol engine.
pub struct OobEngine {
    /// Clock.
    pub clock: Signal<In, Clock>,
    /// Request byte.
    pub rx_data: Signal<In, Bits<8>>,
    /// `rx_data` holds a byte.
    pub rx_valid: Signal<In, Bit>,
    /// The request is complete: answer it.
    pub rx_end: Signal<In, Bit>,
    /// Response byte.
    pub tx_data: Signal<Out, Bits<8>>,
    /// `tx_data` holds a byte.
    pub tx_valid: Signal<Out, Bit>,
    /// The byte is taken this cycle.
    pub tx_ready: Signal<In, Bit>,
    /// Bytes of a request are held (for the UART idle timer).
    pub pending: Signal<Out, Bit>,
    /// Region counter values (bits set).
    pub cnt0: Signal<In, Bits<8>>,
    /// FIRMWARE counter.
    pub cnt1: Signal<In, Bits<8>>,
    /// CONFIG counter.
    pub cnt2: Signal<In, Bits<8>>,
    /// MASTER.
    pub master: Signal<In, Bits<32>>,
    /// Fuse.
    pub fuse: Signal<In, Bit>,
    /// SLOTS_LEFT.
    pub slots: Signal<In, Bits<32>>,
    /// EPOCH.
    pub epoch: Signal<In, Bits<32>>,
    /// A good PHYSICAL_RESET asks the core to act.
    pub pr_req: Signal<Out, Bit>,
    /// The core did it (and it is durable); `epoch` is the new EPOCH.
    pub pr_ok: Signal<In, Bit>,
    /// The core could not persist it: nothing changed.
    pub pr_fail: Signal<In, Bit>,
    /// The OOB reset key, 8 words (little-endian bytes), loaded at configuration.
    pub rkey: Bram<3>,
    /// The CRC step.
    pub crc16: Crc16Step,
    /// SHA-256 of a region (READ_HASH).
    pub sha: Sha256Unit,
    /// A good READ_HASH asks the core for the flash read port.
    pub hash_req: Signal<Out, Bit>,
    /// The core granted it (the flash read port follows `hash_raddr`).
    pub hash_grant: Signal<In, Bit>,
    /// The region to hash.
    pub hash_region: Signal<Out, Bits<2>>,
    /// Flash word address.
    pub hash_raddr: Signal<Out, Bits<18>>,
    /// The region RAM's read data.
    pub hash_rdata: Signal<In, Bits<32>>,

    st: DFF<OobState>,
    cnt: DFF<Bits<8>>,
    len: DFF<Bits<8>>,
    seq: DFF<Bits<8>>,
    rcmd_in: DFF<Bits<8>>,
    arg: DFF<Bits<8>>,
    sync_bad: DFF<Bit>,
    crc: DFFWithInit<Bits<16>>,
    rcrc_lo: DFF<Bits<8>>,
    rcrc_hi: DFF<Bits<8>>,
    kbad: DFF<Bit>,
    kword: DFF<Bits<3>>,
    klane: DFF<Bits<2>>,
    rtype: DFF<Bits<3>>,
    rcmd: DFF<Bits<8>>,
    rlen: DFF<Bits<8>>,
    ecode: DFF<Bits<8>>,
    ereq: DFF<Bits<8>>,
    ti: DFF<Bits<8>>,
    hstarted: DFF<Bit>,
    /// The flash read port was granted last cycle (its read data is valid now).
    gprev: DFF<Bit>,

    want: Signal<Local, Bits<8>>,
    body_end: Signal<Local, Bits<8>>,
    kbyte: Signal<Local, Bits<8>>,
    kw_next: Signal<Local, Bits<3>>,
    tbyte: Signal<Local, Bits<8>>,
    p: Signal<Local, Bits<8>>,
    w: Signal<Local, Bits<32>>,
    lane: Signal<Local, Bits<2>>,
    crc_lo: Signal<Local, Bits<8>>,
    crc_hi: Signal<Local, Bits<8>>,
    cbyte: Signal<Local, Bits<8>>,
    nw: Signal<Local, Bits<20>>,

    k_sync: Constant<Bits<8>>,
    k_max: Constant<Bits<8>>,
    k_id: Constant<Bits<32>>,
    k_version: Constant<Bits<32>>,
    k_serial_lo: Constant<Bits<32>>,
    k_serial_hi: Constant<Bits<32>>,
    k_width: Constant<Bits<8>>,
    k_words0: Constant<Bits<20>>,
    k_words1: Constant<Bits<20>>,
    k_words2: Constant<Bits<20>>,
    /// Simulation only: the last evaluation changed nothing (see `crate::sim`).
    _quiet: bool,
}

crate::sim_block!(gated(_quiet) impl[] OobEngine, OobEngine {
    clock: clock,
    rx_data: input,
    rx_valid: input,
    rx_end: input,
    tx_data: output,
    tx_valid: output,
    tx_ready: input,
    pending: output,
    cnt0: input,
    cnt1: input,
    cnt2: input,
    master: input,
    fuse: input,
    slots: input,
    epoch: input,
    pr_req: output,
    pr_ok: input,
    pr_fail: input,
    rkey: block,
    crc16: block,
    sha: block,
    hash_req: output,
    hash_grant: input,
    hash_region: output,
    hash_raddr: output,
    hash_rdata: input,
    st: dff,
    cnt: dff,
    len: dff,
    seq: dff,
    rcmd_in: dff,
    arg: dff,
    sync_bad: dff,
    crc: block,
    rcrc_lo: dff,
    rcrc_hi: dff,
    kbad: dff,
    kword: dff,
    klane: dff,
    rtype: dff,
    rcmd: dff,
    rlen: dff,
    ecode: dff,
    ereq: dff,
    ti: dff,
    hstarted: dff,
    gprev: dff,
    want: local,
    body_end: local,
    kbyte: local,
    kw_next: local,
    tbyte: local,
    p: local,
    w: local,
    lane: local,
    crc_lo: local,
    crc_hi: local,
    cbyte: local,
    nw: local,
    k_sync: konst,
    k_max: konst,
    k_id: konst,
    k_version: konst,
    k_serial_lo: konst,
    k_serial_hi: konst,
    k_width: konst,
    k_words0: konst,
    k_words1: konst,
    k_words2: konst,
    _quiet: skip,
});

fn k8(v: u64) -> Constant<Bits<8>> {
    Constant::new(v.into())
}
fn k32(v: u64) -> Constant<Bits<32>> {
    Constant::new(v.into())
}

impl OobEngine {
    /// The engine for a device of counter width `width`, serial `serial` and region
    /// sizes `region_sizes` (bytes).
    pub fn new(width: u8, serial: u64, region_sizes: [u32; 3]) -> OobEngine {
        let kw = |i: usize| Constant::new(((region_sizes[i] / 4) as u64).into());
        OobEngine {
            _quiet: false,
            clock: Default::default(),
            rx_data: Default::default(),
            rx_valid: Default::default(),
            rx_end: Default::default(),
            tx_data: Default::default(),
            tx_valid: Default::default(),
            tx_ready: Default::default(),
            pending: Default::default(),
            cnt0: Default::default(),
            cnt1: Default::default(),
            cnt2: Default::default(),
            master: Default::default(),
            fuse: Default::default(),
            slots: Default::default(),
            epoch: Default::default(),
            pr_req: Default::default(),
            pr_ok: Default::default(),
            pr_fail: Default::default(),
            rkey: Bram::new(8),
            crc16: Crc16Step::new(),
            sha: Sha256Unit::new(),
            hash_req: Default::default(),
            hash_grant: Default::default(),
            hash_region: Default::default(),
            hash_raddr: Default::default(),
            hash_rdata: Default::default(),
            hstarted: Default::default(),
            gprev: Default::default(),
            st: Default::default(),
            cnt: Default::default(),
            len: Default::default(),
            seq: Default::default(),
            rcmd_in: Default::default(),
            arg: Default::default(),
            sync_bad: Default::default(),
            crc: DFFWithInit::new(0xffffu64.into()),
            rcrc_lo: Default::default(),
            rcrc_hi: Default::default(),
            kbad: Default::default(),
            kword: Default::default(),
            klane: Default::default(),
            rtype: Default::default(),
            rcmd: Default::default(),
            rlen: Default::default(),
            ecode: Default::default(),
            ereq: Default::default(),
            ti: Default::default(),
            want: Default::default(),
            body_end: Default::default(),
            kbyte: Default::default(),
            kw_next: Default::default(),
            tbyte: Default::default(),
            p: Default::default(),
            w: Default::default(),
            lane: Default::default(),
            crc_lo: Default::default(),
            crc_hi: Default::default(),
            cbyte: Default::default(),
            nw: Default::default(),
            k_sync: k8(SYNC as u64),
            k_max: k8(MAX_PAYLOAD as u64),
            k_id: k32(DEVICE_ID_VALUE as u64),
            k_version: k32(DEVICE_VERSION_VALUE as u64),
            k_serial_lo: k32(serial & 0xffff_ffff),
            k_serial_hi: k32(serial >> 32),
            k_width: k8(width as u64),
            k_words0: kw(0),
            k_words1: kw(1),
            k_words2: kw(2),
        }
    }

    /// Load the OOB reset key.
    pub fn load_key(&mut self, key: &[u8; 32]) {
        self.rkey.load_bytes(key);
    }
}

impl Logic for OobEngine {
    #[hdl_gen]
    fn update(&mut self) {
        dff_setup!(
            self, clock, st, cnt, len, seq, rcmd_in, arg, sync_bad, crc, rcrc_lo, rcrc_hi, kbad,
            kword, klane, rtype, rcmd, rlen, ecode, ereq, ti, hstarted, gprev
        );
        clock!(self, clock, rkey, sha);

        // Defaults.
        self.tx_valid.next = false;
        self.tx_data.next = 0.into();
        self.pr_req.next = false;
        self.pending.next = (self.st.q.val() == OobState::Rx) & (self.cnt.q.val() != 0);
        self.want.next = self.len.q.val() + 6;
        self.body_end.next = self.len.q.val() + 4;
        self.crc16.crc_in.next = self.crc.q.val();
        self.cbyte.next = self.rx_data.val();
        self.kw_next.next = self.kword.q.val();
        self.kbyte.next = bit_cast::<8, 32>(self.rkey.rdata.val());
        self.tbyte.next = 0.into();
        self.p.next = self.ti.q.val() - 4;
        self.w.next = 0.into();
        self.lane.next = 0.into();
        self.crc_lo.next = bit_cast::<8, 16>(self.crc.q.val());
        self.crc_hi.next = 0.into();
        self.rkey.waddr.next = 0.into();
        self.rkey.wdata.next = 0.into();
        self.rkey.wbe.next = 0.into();
        self.rkey.we.next = false;
        self.hash_req.next = false;
        self.hash_region.next = bit_cast::<2, 8>(self.arg.q.val());
        self.hash_raddr.next = self.sha.raddr.val();
        self.sha.rdata.next = self.hash_rdata.val();
        // The core may take the flash port back mid-hash (a host reset moves it to
        // Idle): the unit stalls until the port has been back for a cycle.
        self.gprev.d.next = self.hash_grant.val();
        self.sha.en.next = self.hash_grant.val() & self.gprev.q.val();
        self.sha.start.next = false;
        self.sha.dsel.next = bit_cast::<5, 8>(self.p.val() - 1);
        self.nw.next = self.k_words0.val();
        if self.arg.q.val() == 1 {
            self.nw.next = self.k_words1.val();
        }
        if self.arg.q.val() == 2 {
            self.nw.next = self.k_words2.val();
        }

        match self.st.q.val() {
            OobState::Rx => {
                if self.rx_valid.val() {
                    if self.cnt.q.val() != 255 {
                        self.cnt.d.next = self.cnt.q.val() + 1;
                    }
                    if self.cnt.q.val() == 0 {
                        self.sync_bad.d.next = self.rx_data.val() != self.k_sync.val();
                    }
                    if self.cnt.q.val() == 1 {
                        self.len.d.next = self.rx_data.val();
                    }
                    if self.cnt.q.val() == 2 {
                        self.seq.d.next = self.rx_data.val();
                    }
                    if self.cnt.q.val() == 3 {
                        self.rcmd_in.d.next = self.rx_data.val();
                    }
                    if self.cnt.q.val() == 4 {
                        self.arg.d.next = self.rx_data.val();
                    }
                    // CRC over len..payload.
                    if (self.cnt.q.val() != 0) & (self.cnt.q.val() < self.body_end.val()) {
                        self.crc.d.next = self.crc16.crc_out.val();
                    }
                    if self.cnt.q.val() == self.body_end.val() {
                        self.rcrc_lo.d.next = self.rx_data.val();
                    }
                    if self.cnt.q.val() == self.len.q.val() + 5 {
                        self.rcrc_hi.d.next = self.rx_data.val();
                    }
                    // Key bytes (payload 0..32), each compared, no early exit.
                    if (self.cnt.q.val() >= 4) & (self.cnt.q.val() < 36) {
                        match self.klane.q.val().index() {
                            0 => self.kbyte.next = bit_cast::<8, 32>(self.rkey.rdata.val()),
                            1 => self.kbyte.next = bit_cast::<8, 32>(self.rkey.rdata.val() >> 8),
                            2 => self.kbyte.next = bit_cast::<8, 32>(self.rkey.rdata.val() >> 16),
                            _ => self.kbyte.next = bit_cast::<8, 32>(self.rkey.rdata.val() >> 24),
                        }
                        if self.rx_data.val() != self.kbyte.val() {
                            self.kbad.d.next = true;
                        }
                        self.klane.d.next = self.klane.q.val() + 1;
                        if self.klane.q.val() == 3 {
                            self.kw_next.next = self.kword.q.val() + 1;
                        }
                    }
                }
                self.kword.d.next = self.kw_next.val();
                if self.rx_end.val() {
                    // Judge the request, in the order of `oob::parse_frame` and
                    // `oob::decode_request`.
                    self.st.d.next = OobState::Tx;
                    self.ti.d.next = 0.into();
                    self.crc.d.next = 0xffff.into();
                    self.rtype.d.next = 0.into();
                    self.rcmd.d.next = 0xff.into();
                    self.rlen.d.next = 2.into();
                    self.ereq.d.next = self.rcmd_in.q.val();
                    self.crc_hi.next = bit_cast::<8, 16>(self.crc.q.val() >> 8);
                    if (self.cnt.q.val() == 0) | self.sync_bad.q.val() {
                        self.ecode.d.next = 1.into();
                        self.ereq.d.next = 0.into();
                        self.seq.d.next = 0.into();
                    } else if self.cnt.q.val() < 2 {
                        self.ecode.d.next = 3.into();
                    } else if self.len.q.val() > self.k_max.val() {
                        self.ecode.d.next = 4.into();
                    } else if self.cnt.q.val() < self.want.val() {
                        self.ecode.d.next = 3.into();
                    } else if self.cnt.q.val() > self.want.val() {
                        self.ecode.d.next = 4.into();
                    } else if (self.crc_lo.val() != self.rcrc_lo.q.val())
                        | (self.crc_hi.val() != self.rcrc_hi.q.val())
                    {
                        self.ecode.d.next = 2.into();
                    } else if self.rcmd_in.q.val() == 1 {
                        self.ecode.d.next = 6.into();
                        if self.len.q.val() == 0 {
                            self.rtype.d.next = 1.into();
                            self.rcmd.d.next = 0x81.into();
                            self.rlen.d.next = 17.into();
                        }
                    } else if self.rcmd_in.q.val() == 2 {
                        self.ecode.d.next = 6.into();
                        if self.len.q.val() == 0 {
                            self.rtype.d.next = 2.into();
                            self.rcmd.d.next = 0x82.into();
                            self.rlen.d.next = 26.into();
                        }
                    } else if self.rcmd_in.q.val() == 3 {
                        if self.len.q.val() != 1 {
                            self.ecode.d.next = 6.into();
                        } else if self.arg.q.val() > 2 {
                            self.ecode.d.next = 8.into();
                        } else {
                            self.st.d.next = OobState::Hash;
                        }
                    } else if self.rcmd_in.q.val() == 4 {
                        if self.len.q.val() != 32 {
                            self.ecode.d.next = 6.into();
                        } else if self.kbad.q.val() {
                            self.ecode.d.next = 7.into();
                        } else {
                            self.st.d.next = OobState::Reset;
                        }
                    } else {
                        self.ecode.d.next = 5.into();
                    }
                }
            }
            OobState::Reset => {
                self.pr_req.next = true;
                if self.pr_ok.val() {
                    self.st.d.next = OobState::Tx;
                    self.rtype.d.next = 4.into();
                    self.rcmd.d.next = 0x84.into();
                    self.rlen.d.next = 4.into();
                }
                if self.pr_fail.val() {
                    self.st.d.next = OobState::Tx;
                    self.ecode.d.next = 9.into();
                    self.ereq.d.next = 4.into();
                }
            }
            OobState::Hash => {
                self.hash_req.next = true;
                if self.hash_grant.val() & !self.hstarted.q.val() {
                    self.sha.start.next = true;
                    self.hstarted.d.next = true;
                }
                if self.sha.done.val() {
                    self.hstarted.d.next = false;
                    self.st.d.next = OobState::Tx;
                    self.rtype.d.next = 3.into();
                    self.rcmd.d.next = 0x83.into();
                    self.rlen.d.next = 33.into();
                }
            }
            OobState::Tx => {
                self.tx_valid.next = true;
                // The payload byte `p`: a byte `lane` of the word `w`.
                match self.rtype.q.val().index() {
                    1 => {
                        if self.p.val() < 4 {
                            self.w.next = self.k_id.val();
                            self.lane.next = bit_cast::<2, 8>(self.p.val());
                        } else if self.p.val() < 8 {
                            self.w.next = self.k_version.val();
                            self.lane.next = bit_cast::<2, 8>(self.p.val());
                        } else if self.p.val() < 12 {
                            self.w.next = self.k_serial_lo.val();
                            self.lane.next = bit_cast::<2, 8>(self.p.val());
                        } else if self.p.val() < 16 {
                            self.w.next = self.k_serial_hi.val();
                            self.lane.next = bit_cast::<2, 8>(self.p.val());
                        } else {
                            self.w.next = bit_cast::<32, 8>(self.k_width.val());
                        }
                    }
                    2 => {
                        if self.p.val() < 4 {
                            self.w.next = bit_cast::<32, 8>(self.cnt0.val());
                            self.lane.next = bit_cast::<2, 8>(self.p.val());
                        } else if self.p.val() < 8 {
                            self.w.next = bit_cast::<32, 8>(self.cnt1.val());
                            self.lane.next = bit_cast::<2, 8>(self.p.val());
                        } else if self.p.val() < 12 {
                            self.w.next = bit_cast::<32, 8>(self.cnt2.val());
                            self.lane.next = bit_cast::<2, 8>(self.p.val());
                        } else if self.p.val() < 16 {
                            self.w.next = self.master.val();
                            self.lane.next = bit_cast::<2, 8>(self.p.val());
                        } else if self.p.val() == 16 {
                            if self.fuse.val() {
                                self.w.next = 1.into();
                            }
                        } else if self.p.val() < 21 {
                            self.w.next = self.slots.val();
                            self.lane.next = bit_cast::<2, 8>(self.p.val() - 1);
                        } else if self.p.val() == 21 {
                            self.w.next = bit_cast::<32, 8>(self.k_width.val());
                        } else {
                            self.w.next = self.epoch.val();
                            self.lane.next = bit_cast::<2, 8>(self.p.val() - 2);
                        }
                    }
                    3 => {
                        self.w.next = bit_cast::<32, 8>(self.arg.q.val());
                    }
                    4 => {
                        self.w.next = self.epoch.val();
                        self.lane.next = bit_cast::<2, 8>(self.p.val());
                    }
                    _ => {
                        if self.p.val() == 0 {
                            self.w.next = bit_cast::<32, 8>(self.ecode.q.val());
                        } else {
                            self.w.next = bit_cast::<32, 8>(self.ereq.q.val());
                        }
                    }
                }
                if self.ti.q.val() == 0 {
                    self.tbyte.next = self.k_sync.val();
                } else if self.ti.q.val() == 1 {
                    self.tbyte.next = self.rlen.q.val();
                } else if self.ti.q.val() == 2 {
                    self.tbyte.next = self.seq.q.val();
                } else if self.ti.q.val() == 3 {
                    self.tbyte.next = self.rcmd.q.val();
                } else if (self.ti.q.val() < self.rlen.q.val() + 4)
                    & (self.rtype.q.val() == 3)
                    & (self.p.val() != 0)
                {
                    self.tbyte.next = self.sha.dbyte.val();
                } else if self.ti.q.val() < self.rlen.q.val() + 4 {
                    match self.lane.val().index() {
                        0 => self.tbyte.next = bit_cast::<8, 32>(self.w.val()),
                        1 => self.tbyte.next = bit_cast::<8, 32>(self.w.val() >> 8),
                        2 => self.tbyte.next = bit_cast::<8, 32>(self.w.val() >> 16),
                        _ => self.tbyte.next = bit_cast::<8, 32>(self.w.val() >> 24),
                    }
                } else if self.ti.q.val() == self.rlen.q.val() + 4 {
                    self.tbyte.next = self.crc_lo.val();
                } else {
                    self.tbyte.next = bit_cast::<8, 16>(self.crc.q.val() >> 8);
                }
                self.tx_data.next = self.tbyte.val();
                self.cbyte.next = self.tbyte.val();
                if self.tx_ready.val() {
                    self.ti.d.next = self.ti.q.val() + 1;
                    if (self.ti.q.val() != 0) & (self.ti.q.val() < self.rlen.q.val() + 4) {
                        self.crc.d.next = self.crc16.crc_out.val();
                    }
                    if self.ti.q.val() == self.rlen.q.val() + 5 {
                        // Done: ready for the next request.
                        self.st.d.next = OobState::Rx;
                        self.cnt.d.next = 0.into();
                        self.len.d.next = 0.into();
                        self.seq.d.next = 0.into();
                        self.rcmd_in.d.next = 0.into();
                        self.arg.d.next = 0.into();
                        self.sync_bad.d.next = false;
                        self.crc.d.next = 0xffff.into();
                        self.kbad.d.next = false;
                        self.kword.d.next = 0.into();
                        self.klane.d.next = 0.into();
                    }
                }
            }
        }
        self.rkey.raddr.next = self.kw_next.val();
        // Sub-block inputs are assigned once a pass (see `DeviceCore`'s `o_*`).
        self.crc16.data_in.next = self.cbyte.val();
        self.sha.nwords.next = self.nw.val();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_step_is_ccitt_false() {
        let mut x = 0x1234_5678u32;
        for len in 0..64 {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let c = data.iter().fold(0xffff, |c, &b| crc16_step(c, b));
            assert_eq!(c, hilrig_device::oob::crc16(&data), "{data:02x?}");
        }
        // The block computes the same as the function.
        let mut s = Crc16Step::new();
        s.connect_all();
        s.crc_in.next = 0xbeefu64.into();
        s.data_in.next = 0x5au64.into();
        s.update_all();
        s.update_all();
        assert_eq!(s.crc_out.val().to_u32() as u16, crc16_step(0xbeef, 0x5a));
    }
}
