// The CUDA C the kernels use, for the host: every CUDA thread of a block
// is a fiber here, `__syncthreads` a barrier of the block, a warp shuffle
// (and the tensor cores' `mma`) an exchange through memory between
// barriers of the warp. Blocks run one after another, so `__shared__`
// variables are plain statics. Slow, and exact where the GPU is: for
// testing the generated kernels on a machine without a GPU.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <math.h>
#include <memory>
#include <stdexcept>
#include <ucontext.h>
#include <vector>

#define BITNET_EMULATOR 1
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };

namespace emu {
static dim3 tid, bid, bdim, gdim;
// Whether a launch's blocks run first to last (else last to first).
static bool forward = false;

// Each CUDA thread of a block is a fiber (a ucontext with a stack of its
// own) on the one host thread; a fiber runs until it waits at a barrier
// or returns, then the next one runs.
struct Fiber {
    ucontext_t ctx;
    char* stack = nullptr;
    bool done = false;
};
static ucontext_t scheduler;
static std::vector<Fiber> fibers;
static unsigned current;
// Barriers released and fibers finished: a pass over the fibers that
// changes neither is a deadlock.
static uint64_t progress;
static const std::function<void()>* body;
static bool failed;
constexpr size_t STACK = 256 * 1024;
static struct FreeStacks {
    ~FreeStacks() { for (auto& f : fibers) std::free(f.stack); }
} free_stacks;

inline void yield() { swapcontext(&fibers[current].ctx, &scheduler); }

// A barrier that threads leave for good when they exit (as a CUDA thread
// that returns stops counting for `__syncthreads`).
class Barrier {
    int expected, arrived = 0;
    uint64_t phase = 0;
    void release() { arrived = 0; phase++; progress++; }

public:
    explicit Barrier(int threads) : expected(threads) {}
    void arrive_and_wait() {
        uint64_t p = phase;
        if (++arrived == expected) release();
        else while (phase == p) yield();
    }
    void arrive_and_drop() {
        if (--expected > 0 && arrived == expected) release();
    }
};
struct Warp {
    Barrier bar;
    uint64_t slot[32];
    uint32_t a[32][4], b[32][2];
    explicit Warp(int lanes) : bar(lanes) {}
};
struct Block {
    Barrier all;
    std::vector<std::unique_ptr<Warp>> warps;
    explicit Block(int threads) : all(threads) {}
};
static Block* block = nullptr;

inline Warp& warp() { return *block->warps[tid.x >> 5]; }

inline void entry() {
    try {
        (*body)();
    } catch (...) {
        failed = true;
    }
    // An exited thread no longer holds back its warp or block.
    warp().bar.arrive_and_drop();
    block->all.arrive_and_drop();
    fibers[current].done = true;
    progress++;
}

// Runs `kernel` on every thread of every block of the grid, the blocks
// one after another, the last first (or, `forward`, the first first): a
// GPU runs them in no order, and a block reading what a block after it
// writes in the same launch (a race there) then reads what the other
// order would not. Returns 0, -1 when a thread trapped, -2 when the
// block's threads deadlocked (a barrier some never reach).
inline int run(dim3 grid, unsigned threads, const std::function<void()>& kernel) {
    bdim = dim3{threads, 1, 1};
    gdim = grid;
    body = &kernel;
    failed = false;
    if (fibers.size() < threads) fibers.resize(threads);
    for (unsigned t = 0; t < threads; t++)
        if (!fibers[t].stack) fibers[t].stack = (char*)std::malloc(STACK);
    const size_t blocks = (size_t)grid.x * grid.y * grid.z;
    for (size_t i = 0; i < blocks; i++) {
        size_t at = forward ? i : blocks - 1 - i;
        bid = dim3{unsigned(at % grid.x), unsigned(at / grid.x % grid.y), unsigned(at / grid.x / grid.y)};
        Block b((int)threads);
        for (unsigned w = 0; w < threads; w += 32) b.warps.push_back(std::make_unique<Warp>((int)std::min(32u, threads - w)));
        block = &b;
        for (unsigned t = 0; t < threads; t++) {
            Fiber& f = fibers[t];
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack;
            f.ctx.uc_stack.ss_size = STACK;
            f.ctx.uc_link = &scheduler;
            makecontext(&f.ctx, entry, 0);
            f.done = false;
        }
        for (bool live = true; live;) {
            live = false;
            uint64_t before = progress;
            for (unsigned t = 0; t < threads; t++) {
                if (fibers[t].done) continue;
                current = t;
                tid = dim3{t, 0, 0};
                swapcontext(&scheduler, &fibers[t].ctx);
                live |= !fibers[t].done;
            }
            if (live && progress == before) {
                block = nullptr;
                return -2;
            }
        }
        block = nullptr;
        if (failed) return -1;
    }
    return 0;
}
}  // namespace emu

#define threadIdx (emu::tid)
#define blockIdx (emu::bid)
#define blockDim (emu::bdim)
#define gridDim (emu::gdim)

inline void __syncthreads() { emu::block->all.arrive_and_wait(); }
[[noreturn]] inline void __trap() { throw std::runtime_error("__trap"); }
// Blocks run one after another and a thread runs until it waits at a
// barrier, so a plain add is atomic here and memory needs no fence.
inline int atomicAdd(int* p, int v) { int old = *p; *p = old + v; return old; }
inline void __threadfence() {}

template <typename T> inline T __shfl_xor_sync(unsigned, T v, int mask) {
    static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
    emu::Warp& w = emu::warp();
    int lane = threadIdx.x & 31;
    w.bar.arrive_and_wait();  // everyone has read the last exchange
    std::memcpy(&w.slot[lane], &v, sizeof(T));
    w.bar.arrive_and_wait();
    T r;
    std::memcpy(&r, &w.slot[lane ^ mask], sizeof(T));
    return r;
}

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }

inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; i++) c += (int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
    return c;
}

inline float emu_f16_bits(unsigned short h) { _Float16 x; std::memcpy(&x, &h, 2); return (float)x; }
inline unsigned short emu_f16_round(float f) { _Float16 x = (_Float16)f; unsigned short h; std::memcpy(&h, &x, 2); return h; }

// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 as the PTX ISA lays out
// its fragments: lane = 4 · group + t; A's register r holds row
// `group + 8·(r & 1)`, columns `4t + 16·(r >> 1) ..+4`; B's register r
// holds rows `4t + 16r ..+4` of column `group`; D's value i is row
// `group + 8·(i >> 1)`, column `2t + (i & 1)`.
inline void emu_mma_s8(int* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    emu::Warp& w = emu::warp();
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    w.bar.arrive_and_wait();
    w.a[lane][0] = a0; w.a[lane][1] = a1; w.a[lane][2] = a2; w.a[lane][3] = a3;
    w.b[lane][0] = b0; w.b[lane][1] = b1;
    w.bar.arrive_and_wait();
    auto byte = [](uint32_t word, int k) { return (int)(int8_t)(word >> (8 * (k & 3))); };
    for (int i = 0; i < 4; i++) {
        int row = g + 8 * (i >> 1), col = 2 * t + (i & 1), sum = 0;
        for (int k = 0; k < 32; k++) {
            int a = byte(w.a[(row & 7) * 4 + ((k & 15) >> 2)][(row >> 3) + 2 * (k >> 4)], k);
            int b = byte(w.b[col * 4 + ((k & 15) >> 2)][k >> 4], k);
            sum += a * b;
        }
        d[i] += sum;
    }
}
