// The C ABI of a verilated device core (hilrig-verilator; `common.inc` is
// prepended). Built into a shared
// library together with the model Verilator generates from device_core.v; loaded
// by the Rust side with libloading. No function here trusts a pointer it was not
// given by hv_new, and none of them exits or throws on any argument.
#ifdef HV_TRACE
// A trace build (verilator --trace): a VCD of the last cycles, in windows.
#include "verilated_vcd_c.h"
#include <cstdio>
#include <string>
#endif

// Bump when the ABI below changes: the loader refuses a library of another version.
#define HV_ABI_VERSION 2u

struct HvCore {
    VerilatedContext* ctx;
    Vtop* top;
#ifdef HV_TRACE
    VerilatedVcdC* vcd = nullptr;
    uint64_t cyc = 0;     // cycles since hv_new
    uint64_t window = 0;  // cycles a file
    uint64_t start = 0;   // first cycle in the current file
    std::string path;     // current window; the one before is path + ".prev.vcd"
#endif
};

// Ports, by number (hilrig_verilator::ffi::Port).
enum HvPort : uint32_t {
    P_RESET = 0, P_STROBE, P_ADDR, P_WE, P_WDATA, P_BE, P_ROM_SEL, P_PERSIST_ACK,
    P_PERSIST_NAK, P_NV_LOAD, P_NV_CTR0_LO_IN, P_NV_CTR0_HI_IN, P_NV_CTR1_LO_IN,
    P_NV_CTR1_HI_IN, P_NV_CTR2_LO_IN, P_NV_CTR2_HI_IN, P_NV_CNT0_IN, P_NV_CNT1_IN,
    P_NV_CNT2_IN, P_NV_MASTER_IN, P_NV_FUSE_IN, P_NV_EPOCH_IN, P_OOB_RX_DATA,
    P_OOB_RX_VALID, P_OOB_RX_END, P_OOB_TX_READY, P_OOB_UART, P_UART_RX,
    // outputs
    P_READY = 64, P_ACK, P_RDATA, P_BUSY, P_PERSIST_REQ, P_NV_CTR0_LO, P_NV_CTR0_HI,
    P_NV_CTR1_LO, P_NV_CTR1_HI, P_NV_CTR2_LO, P_NV_CTR2_HI, P_NV_MASTER, P_NV_FUSE,
    P_NV_EPOCH, P_HUNG_OUT, P_OOB_TX_DATA, P_OOB_TX_VALID, P_UART_TX,
};

static inline uint64_t mask(uint64_t v, unsigned bits) {
    return bits >= 64 ? v : (v & ((1ull << bits) - 1));
}

// One clock period is 10 ns in the VCD (as the rtl backend's): 10,000 ps.
static inline void tick1(HvCore* c) {
    Vtop* t = c->top;
    t->clock = 1;
    t->eval();
#ifdef HV_TRACE
    if (c->vcd) c->vcd->dump(c->cyc * 10000);
#endif
    t->clock = 0;
    t->eval();
#ifdef HV_TRACE
    if (c->vcd) {
        c->vcd->dump(c->cyc * 10000 + 5000);
        c->cyc++;
        if (c->cyc - c->start >= c->window) {
            c->vcd->close();
            std::string prev = c->path + ".prev.vcd";
            std::rename(c->path.c_str(), prev.c_str());
            c->vcd->open(c->path.c_str());
            c->start = c->cyc;
        }
    } else {
        c->cyc++;
    }
#endif
}


extern "C" {

uint32_t hv_abi_version(void) { return HV_ABI_VERSION; }

// A new core with every RAM and register at its initial value (initial blocks
// run), clock low. Null if allocation failed.
void* hv_new(void) {
    HvCore* c = new (std::nothrow) HvCore;
    if (!c) return nullptr;
    if (!new_model(c)) { delete c; return nullptr; }
    c->top->clock = 0;
    c->top->eval();
    return c;
}

void hv_free(void* h) {
    if (!h) return;
    HvCore* c = static_cast<HvCore*>(h);
#ifdef HV_TRACE
    if (c->vcd) {
        c->vcd->close();
        delete c->vcd;
    }
#endif
    free_model(c);
    delete c;
}

// Set an input port (value truncated to the port's width). Returns 0, or 1 for
// an unknown port.
uint32_t hv_set(void* h, uint32_t port, uint64_t v) {
    Vtop* t = static_cast<HvCore*>(h)->top;
    switch (port) {
    case P_RESET: t->reset = mask(v, 1); break;
    case P_STROBE: t->strobe = mask(v, 1); break;
    case P_ADDR: t->addr = mask(v, 18); break;
    case P_WE: t->we = mask(v, 1); break;
    case P_WDATA: t->wdata = mask(v, 32); break;
    case P_BE: t->be = mask(v, 4); break;
    case P_ROM_SEL: t->rom_sel = mask(v, 1); break;
    case P_PERSIST_ACK: t->persist_ack = mask(v, 1); break;
    case P_PERSIST_NAK: t->persist_nak = mask(v, 1); break;
    case P_NV_LOAD: t->nv_load = mask(v, 1); break;
    case P_NV_CTR0_LO_IN: t->nv_ctr0_lo_in = mask(v, 32); break;
    case P_NV_CTR0_HI_IN: t->nv_ctr0_hi_in = mask(v, 32); break;
    case P_NV_CTR1_LO_IN: t->nv_ctr1_lo_in = mask(v, 32); break;
    case P_NV_CTR1_HI_IN: t->nv_ctr1_hi_in = mask(v, 32); break;
    case P_NV_CTR2_LO_IN: t->nv_ctr2_lo_in = mask(v, 32); break;
    case P_NV_CTR2_HI_IN: t->nv_ctr2_hi_in = mask(v, 32); break;
    case P_NV_CNT0_IN: t->nv_cnt0_in = mask(v, 8); break;
    case P_NV_CNT1_IN: t->nv_cnt1_in = mask(v, 8); break;
    case P_NV_CNT2_IN: t->nv_cnt2_in = mask(v, 8); break;
    case P_NV_MASTER_IN: t->nv_master_in = mask(v, 32); break;
    case P_NV_FUSE_IN: t->nv_fuse_in = mask(v, 1); break;
    case P_NV_EPOCH_IN: t->nv_epoch_in = mask(v, 32); break;
    case P_OOB_RX_DATA: t->oob_rx_data = mask(v, 8); break;
    case P_OOB_RX_VALID: t->oob_rx_valid = mask(v, 1); break;
    case P_OOB_RX_END: t->oob_rx_end = mask(v, 1); break;
    case P_OOB_TX_READY: t->oob_tx_ready = mask(v, 1); break;
    case P_OOB_UART: t->oob_uart = mask(v, 1); break;
    case P_UART_RX: t->uart_rx = mask(v, 1); break;
    default: return 1;
    }
    return 0;
}

// Read a port (inputs too). Unknown ports read as all-ones.
uint64_t hv_get(void* h, uint32_t port) {
    Vtop* t = static_cast<HvCore*>(h)->top;
    switch (port) {
    case P_RESET: return t->reset;
    case P_STROBE: return t->strobe;
    case P_OOB_UART: return t->oob_uart;
    case P_UART_RX: return t->uart_rx;
    case P_READY: return t->ready;
    case P_ACK: return t->ack;
    case P_RDATA: return t->rdata;
    case P_BUSY: return t->busy;
    case P_PERSIST_REQ: return t->persist_req;
    case P_NV_CTR0_LO: return t->nv_ctr0_lo;
    case P_NV_CTR0_HI: return t->nv_ctr0_hi;
    case P_NV_CTR1_LO: return t->nv_ctr1_lo;
    case P_NV_CTR1_HI: return t->nv_ctr1_hi;
    case P_NV_CTR2_LO: return t->nv_ctr2_lo;
    case P_NV_CTR2_HI: return t->nv_ctr2_hi;
    case P_NV_MASTER: return t->nv_master;
    case P_NV_FUSE: return t->nv_fuse;
    case P_NV_EPOCH: return t->nv_epoch;
    case P_HUNG_OUT: return t->hung_out;
    case P_OOB_TX_DATA: return t->oob_tx_data;
    case P_OOB_TX_VALID: return t->oob_tx_valid;
    case P_UART_TX: return t->uart_tx;
    default: return ~0ull;
    }
}

// Settle the logic after inputs moved (no clock edge).
void hv_eval(void* h) { static_cast<HvCore*>(h)->top->eval(); }

// n clock cycles: rising edge (inputs settle first), falling edge.
void hv_tick(void* h, uint64_t n) {
    HvCore* c = static_cast<HvCore*>(h);
    for (uint64_t i = 0; i < n; i++) tick1(c);
}

// Run until `ready` or `persist_req`, at most `max` cycles. Returns 0 (ready),
// 1 (persist_req raised, not ready), 2 (neither within max); *ran = cycles run.
uint32_t hv_run_until_ready(void* h, uint64_t max, uint64_t* ran) {
    HvCore* c = static_cast<HvCore*>(h);
    Vtop* t = c->top;
    uint64_t n = 0;
    uint32_t r;
    for (;;) {
        if (t->ready) { r = 0; break; }
        if (t->persist_req) { r = 1; break; }
        if (n >= max) { r = 2; break; }
        tick1(c);
        n++;
    }
    if (ran) *ran = n;
    return r;
}

// One bus access while ready: strobe for one rising edge, take ack/rdata, one
// more cycle. Returns 0 (done, *rdata set), 1 (the core was not ready: nothing
// done), 2 (no ack). Two cycles when it returns 0 or 2.
uint32_t hv_access(void* h, uint32_t rom, uint32_t addr, uint32_t we, uint32_t wdata,
                   uint32_t be, uint32_t* rdata) {
    HvCore* c = static_cast<HvCore*>(h);
    Vtop* t = c->top;
    if (!t->ready) return 1;
    t->strobe = 1;
    t->addr = (addr >> 2) & 0x3ffff;
    t->we = we ? 1 : 0;
    t->wdata = wdata;
    t->be = be & 0xf;
    t->rom_sel = rom ? 1 : 0;
    tick1(c);
    t->strobe = 0;
    t->rom_sel = 0;
    uint32_t ok = t->ack;
    uint32_t v = t->rdata;
    tick1(c);
    if (!ok) return 2;
    if (rdata) *rdata = v;
    return 0;
}

// The word RAMs that hold nonvolatile state: 0..2 flash regions, 3 DEVICE_KEY,
// 4 the OOB reset key.
// Copy min(n, size) words into (write != 0) or out of RAM `which`; returns the
// RAM's size in words, or -1 for an unknown RAM. `words` may be null (size only).
int64_t hv_mem(void* h, uint32_t which, uint32_t write, uint32_t* words, uint64_t n) {
    Vtop___024root* r = static_cast<HvCore*>(h)->top->rootp;
    switch (which) {
    case 0: return mem_io(r->top__DOT__flash0__DOT__mem, write, words, n);
    case 1: return mem_io(r->top__DOT__flash1__DOT__mem, write, words, n);
    case 2: return mem_io(r->top__DOT__flash2__DOT__mem, write, words, n);
    case 3: return mem_io(r->top__DOT__keys__DOT__mem, write, words, n);
    case 4: return mem_io(r->top__DOT__oob__DOT__rkey__DOT__mem, write, words, n);
    default: return -1;
    }
}

// Record a VCD of the last `window` to 2 x `window` cycles: the current window in
// `path`, the one before in `path`.prev.vcd. Returns 0, 1 (not a trace build) or
// 2 (the file could not be opened).
uint32_t hv_trace_start(void* h, const char* path, uint64_t window) {
#ifdef HV_TRACE
    HvCore* c = static_cast<HvCore*>(h);
    if (!path) return 2;
    if (!c->vcd) {
        c->ctx->traceEverOn(true);
        c->vcd = new (std::nothrow) VerilatedVcdC;
        if (!c->vcd) return 2;
        c->top->trace(c->vcd, 99);
    } else {
        c->vcd->close();
    }
    c->path = path;
    c->window = window ? window : 1;
    c->start = c->cyc;
    c->vcd->open(path);
    return c->vcd->isOpen() ? 0 : 2;
#else
    (void)h;
    (void)path;
    (void)window;
    return 1;
#endif
}

// Write out what the VCD writer buffers.
void hv_trace_flush(void* h) {
#ifdef HV_TRACE
    HvCore* c = static_cast<HvCore*>(h);
    if (c->vcd) c->vcd->flush();
#else
    (void)h;
#endif
}

}  // extern "C"
