// The C ABI of a verilated board top (hilrig-verilator `board`): the Verilog that
// goes on the FPGA (device core + host bridge + OOB UART + LEDs + power-on reset),
// driven pin by pin. Built into a shared library with the model Verilator makes
// from board_top.v (`common.inc` is prepended); loaded by the Rust side with
// libloading. No function here trusts a pointer it was not given by hb_new, and
// none exits or throws.

// Bump when the ABI below changes: the loader refuses a library of another version.
#define HB_ABI_VERSION 1u

struct HbBoard {
    VerilatedContext* ctx;
    Vtop* top;
};

// The outputs after a cycle, packed: bit 0 uart_tx, 1 oob_tx, 8..15 leds,
// 16 bridge idle, 17 bridge receiving, 18 core busy.
static inline uint32_t outputs(Vtop* t) {
    Vtop___024root* r = t->rootp;
    return (uint32_t)(t->uart_tx & 1) | ((uint32_t)(t->oob_tx & 1) << 1) |
           ((uint32_t)(t->leds & 0xff) << 8) |
           ((uint32_t)(r->top__DOT__bridge__DOT__idle & 1) << 16) |
           ((uint32_t)(r->top__DOT__bridge__DOT__receiving & 1) << 17) |
           ((uint32_t)(r->top__DOT__core__DOT__busy & 1) << 18);
}


extern "C" {

uint32_t hb_abi_version(void) { return HB_ABI_VERSION; }

// A new board: RAMs and registers at their initial values, clock low, both
// receive pins idle (high). Null if allocation failed.
void* hb_new(void) {
    HbBoard* b = new (std::nothrow) HbBoard;
    if (!b) return nullptr;
    if (!new_model(b)) { delete b; return nullptr; }
    b->top->clock = 0;
    b->top->uart_rx = 1;
    b->top->oob_rx = 1;
    b->top->eval();
    return b;
}

void hb_free(void* h) {
    if (!h) return;
    HbBoard* b = static_cast<HbBoard*>(h);
    free_model(b);
    delete b;
}

// The packed outputs now (see `outputs`).
uint32_t hb_outputs(void* h) { return outputs(static_cast<HbBoard*>(h)->top); }

// One clock cycle with the receive pins set first (bit 0 uart_rx, bit 1 oob_rx):
// the moved pins settle in Verilator's input stage before the rising edge, then
// the falling edge. Returns the packed outputs after it.
uint32_t hb_cycle(void* h, uint32_t pins) {
    Vtop* t = static_cast<HbBoard*>(h)->top;
    t->uart_rx = pins & 1;
    t->oob_rx = (pins >> 1) & 1;
    t->clock = 1;
    t->eval();
    t->clock = 0;
    t->eval();
    return outputs(t);
}

// The word RAMs the bitstream initialises: 0..2 flash regions, 3 DEVICE_KEY, 4 the
// OOB reset key. Copy min(n, size) words into (write != 0) or out of RAM `which`;
// returns the RAM's size in words, or -1 for an unknown RAM. `words` may be null.
int64_t hb_mem(void* h, uint32_t which, uint32_t write, uint32_t* words, uint64_t n) {
    Vtop___024root* r = static_cast<HbBoard*>(h)->top->rootp;
    switch (which) {
    case 0: return mem_io(r->top__DOT__core__DOT__flash0__DOT__mem, write, words, n);
    case 1: return mem_io(r->top__DOT__core__DOT__flash1__DOT__mem, write, words, n);
    case 2: return mem_io(r->top__DOT__core__DOT__flash2__DOT__mem, write, words, n);
    case 3: return mem_io(r->top__DOT__core__DOT__keys__DOT__mem, write, words, n);
    case 4: return mem_io(r->top__DOT__core__DOT__oob__DOT__rkey__DOT__mem, write, words, n);
    default: return -1;
    }
}

}  // extern "C"
