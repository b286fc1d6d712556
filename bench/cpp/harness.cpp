// The bare Verilator harness of `hilrig bench rtl`: the same device_core.v, driven
// by a plain C++ loop (clock toggled; SCRATCH written and read back through the
// bus). Usage: harness SECONDS SCRATCH_BYTE_OFFSET. Prints `key value` lines.
#include "Vtop.h"
#include "verilated.h"
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

static Vtop* top;

static inline void tick() {
    top->clock = 1;
    top->eval();
    top->clock = 0;
    top->eval();
}

int main(int argc, char** argv) {
    double secs = argc > 1 ? atof(argv[1]) : 1.0;
    uint32_t scratch = argc > 2 ? (uint32_t)strtoul(argv[2], nullptr, 0) : 0x10;
    VerilatedContext ctx;
    top = new Vtop(&ctx, "top");
    top->uart_rx = 1;
    top->oob_tx_ready = 1;
    top->clock = 0;
    top->eval();
    using clk = std::chrono::steady_clock;
    auto elapsed = [](clk::time_point t0) {
        return std::chrono::duration<double>(clk::now() - t0).count();
    };

    uint64_t n = 0;
    auto t0 = clk::now();
    double el;
    do {
        for (int i = 0; i < 1024; i++) tick();
        n += 1024;
    } while ((el = elapsed(t0)) < secs);
    printf("idle_cycles_per_s %.1f\n", n / el);

    uint64_t ops = 0, bad = 0, i = 0;
    t0 = clk::now();
    do {
        for (int k = 0; k < 256; k++, i++) {
            while (!top->ready) tick();
            top->strobe = 1;
            top->addr = scratch >> 2;
            top->we = 1;
            top->wdata = (uint32_t)i;
            top->be = 0xf;
            tick();
            top->strobe = 0;
            tick();
            while (!top->ready) tick();
            top->strobe = 1;
            top->we = 0;
            tick();
            uint32_t v = top->rdata;
            top->strobe = 0;
            tick();
            if (v != (uint32_t)i) bad++;
            ops += 2;
        }
    } while ((el = elapsed(t0)) < secs);
    printf("mmio_ops_per_s %.1f\n", ops / el);
    printf("mismatches %llu\n", (unsigned long long)bad);
    top->final();
    delete top;
    return bad ? 1 : 0;
}
