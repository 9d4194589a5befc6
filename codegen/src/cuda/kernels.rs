//! CUDA C for each kernel family, specialized to its shapes and tiles.
//!
//! Every dimension known at compile time (rows, inner size, head layout,
//! the ternary weight scale) is written into the source as a constant, so
//! NVRTC unrolls and strength-reduces; only the token count `S` is a
//! run-time argument. Floats are written as their bits
//! (`__int_as_float(0x…)`), so a constant means exactly what the
//! interpreter's does. The sources use no CUDA headers: f16 and bf16 are
//! converted by hand (PTX `cvt`), so NVRTC needs nothing but itself.
//!
//! The arithmetic follows the interpreter's, operation for operation, and
//! the module is compiled with `--fmad=false` so that no multiply-add is
//! contracted: what differs from the CPU is the order of long sums
//! (reductions over warps), which the tests' float budgets cover.
//!
//! Calling convention, shared with the runtime: a kernel's parameters are
//! its operands in the node's order (an int8 activation operand is three
//! pointers: codes, γ, Σq), then any cache pointers, then its outputs
//! (again three for int8 activations), then `int S`.

use bitnet_ir::{GateAct, RopeMode, UnaryOp};
use std::fmt::Write;

/// Helpers every module starts with.
pub const PRELUDE: &str = r#"typedef unsigned int u32;
typedef signed char i8;
typedef unsigned short u16;
__device__ __forceinline__ float ld_f32(const float* p, size_t i) { return p[i]; }
#ifdef __CUDA_ARCH__
__device__ __forceinline__ float f16_bits(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
#else
__device__ __forceinline__ float f16_bits(u16 h) { return emu_f16_bits(h); }
#endif
__device__ __forceinline__ float bf16_bits(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ float ld_f16(const u16* p, size_t i) { return f16_bits(p[i]); }
__device__ __forceinline__ float ld_bf16(const u16* p, size_t i) { return bf16_bits(p[i]); }
#ifdef __CUDA_ARCH__
__device__ __forceinline__ float round_f16(float x) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x)); return ld_f16(&h, 0); }
#else
__device__ __forceinline__ float round_f16(float x) { return emu_f16_bits(emu_f16_round(x)); }
#endif
__device__ __forceinline__ float round_bf16(float x) {
    u32 b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return __uint_as_float(b | 0x00400000u);
    b += 0x7fffu + ((b >> 16) & 1u);
    return __uint_as_float(b & 0xffff0000u);
}
__device__ __forceinline__ float warp_sum(float v) { for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o); return v; }
__device__ __forceinline__ int warp_sum_i(int v) { for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o); return v; }
__device__ __forceinline__ double warp_sum_d(double v) { for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o); return v; }
__device__ __forceinline__ float warp_max(float v) { for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o)); return v; }
// Block-wide reductions for blocks of whole warps (at most 32 of them);
// every thread gets the result. `idle` is the reduction's neutral value.
template <typename T, typename W> __device__ __forceinline__ T block_reduce(T v, T idle, W warp) {
    __shared__ T part[32];
    v = warp(v);
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) part[w] = v;
    __syncthreads();
    v = lane < nw ? part[lane] : idle;
    return warp(v);
}
// D += A·B on the integer tensor cores (m16n8k32, s8 in, s32 out); sm_80+.
__device__ __forceinline__ void mma_s8(int* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#elif defined(BITNET_EMULATOR)
    emu_mma_s8(d, a0, a1, a2, a3, b0, b1);
#else
    __trap();
#endif
}
__device__ double block_sum_d(double v) { return block_reduce(v, 0.0, warp_sum_d); }
__device__ int block_sum_i(int v) { return block_reduce(v, 0, warp_sum_i); }
__device__ float block_max(float v) { return block_reduce(v, -__int_as_float(0x7f800000), warp_max); }
"#;

/// Threads per block of the row-wise kernels (norms, attention).
pub const ROW_BLOCK: u32 = 256;
/// Threads per block of elementwise kernels.
pub const ELEMENT_BLOCK: u32 = 256;

/// A float weight's element type as the kernels load it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FloatType {
    F32,
    F16,
    BF16,
}

impl FloatType {
    fn c_type(self) -> &'static str {
        match self {
            FloatType::F32 => "float",
            FloatType::F16 | FloatType::BF16 => "u16",
        }
    }
    fn load(self) -> &'static str {
        match self {
            FloatType::F32 => "ld_f32",
            FloatType::F16 => "ld_f16",
            FloatType::BF16 => "ld_bf16",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            FloatType::F32 => "f32",
            FloatType::F16 => "f16",
            FloatType::BF16 => "bf16",
        }
    }
}

/// An `f32` constant as CUDA C, bit for bit.
fn float(x: f32) -> String {
    format!("__int_as_float(0x{:08x})", x.to_bits())
}

/// `out[s, :] = table[ids[s], :]`. Grid: `S` blocks.
pub fn embed(ty: FloatType, vocab: usize, hidden: usize) -> String {
    let (t, ld) = (ty.c_type(), ty.load());
    format!(
        r#"(const {t}* table, const int* ids, float* out, int S) {{
    int id = ids[blockIdx.x];
    if (id < 0 || id >= {vocab}) return;
    for (int j = threadIdx.x; j < {hidden}; j += blockDim.x) out[(size_t)blockIdx.x * {hidden} + j] = {ld}(table, (size_t)id * {hidden} + j);
}}"#
    )
}

/// Threads per block of the norms: a row of the 2B4T shape (2560) is
/// then under three values a thread, kept in registers between passes.
pub const NORM_BLOCK: u32 = 1024;

/// Loads the block's row `xr` of `k` into the registers `v[]` (zeros past
/// `k`, `per` slots a thread); with `squares`, also sums their squares
/// into `acc`, in f64 as the interpreter sums them.
fn load_row(k: usize, per: usize, squares: bool) -> String {
    let (declare, add) = if squares { ("\n    double acc = 0.0;", "\n        acc += (double)v[u] * (double)v[u];") } else { ("", "") };
    format!(
        r#"float v[{per}];{declare}
    #pragma unroll
    for (int u = 0; u < {per}; u++) {{
        int j = threadIdx.x + u * {NORM_BLOCK};
        v[u] = j < {k} ? xr[j] : 0.0f;{add}
    }}"#
    )
}

/// [`load_row`], then `s = 1 / sqrt(mean(x²) + eps)`.
fn load_inv_rms(k: usize, per: usize, eps: f32) -> String {
    format!(
        r#"{load}
    acc = block_sum_d(acc);
    float s = 1.0f / sqrtf((float)(acc / {k}.0) + {eps});"#,
        load = load_row(k, per, true),
        eps = float(eps)
    )
}

/// `out = x / rms(x) * w` per row of `k`. Grid: `S` blocks of [`NORM_BLOCK`].
pub fn rms_norm(k: usize, eps: f32) -> String {
    let per = k.div_ceil(NORM_BLOCK as usize);
    format!(
        r#"(const float* x, const float* w, float* out, int S) {{
    const float* xr = x + (size_t)blockIdx.x * {k};
    {load}
    #pragma unroll
    for (int u = 0; u < {per}; u++) {{
        int j = threadIdx.x + u * {nb};
        if (j < {k}) out[(size_t)blockIdx.x * {k} + j] = v[u] * s * w[j];
    }}
}}"#,
        load = load_inv_rms(k, per, eps),
        nb = NORM_BLOCK
    )
}

/// BitNet's per-token int8 quantization of rows of `k` (padded with zero
/// codes to `kp`), normalized first when `norm` gives the RMSNorm's eps:
/// codes, γ = 127 / max|x|, and Σ codes per row. The row is read once,
/// into registers. Grid: `S` blocks of [`NORM_BLOCK`].
pub fn quantize_rows(k: usize, kp: usize, norm: Option<f32>) -> String {
    let per = kp.div_ceil(NORM_BLOCK as usize);
    let (params, load, value) = match norm {
        Some(eps) => ("const float* x, const float* w, ", load_inv_rms(k, per, eps), "v[u] * s * w[j]"),
        None => ("const float* x, ", load_row(k, per, false), "v[u]"),
    };
    format!(
        r#"({params}i8* q, float* gamma, int* qsum, int S) {{
    const float* xr = x + (size_t)blockIdx.x * {k};
    {load}
    float amax = 0.0f;
    #pragma unroll
    for (int u = 0; u < {per}; u++) {{
        int j = threadIdx.x + u * {nb};
        if (j < {k}) {{ v[u] = {value}; amax = fmaxf(amax, fabsf(v[u])); }}
    }}
    float g = 127.0f / fmaxf(block_max(amax), {tiny});
    int sum = 0;
    #pragma unroll
    for (int u = 0; u < {per}; u++) {{
        int j = threadIdx.x + u * {nb};
        if (j < {kp}) {{
            int c = j < {k} ? {code} : 0;
            q[(size_t)blockIdx.x * {kp} + j] = (i8)c;
            sum += c;
        }}
    }}
    sum = block_sum_i(sum);
    if (threadIdx.x == 0) {{ gamma[blockIdx.x] = g; qsum[blockIdx.x] = sum; }}
}}"#,
        nb = NORM_BLOCK,
        tiny = float(QUANT_TINY),
        code = quant_code("v[u] * g")
    )
}

/// The floor of max|x| in per-token quantization (as the CPU's).
const QUANT_TINY: f32 = 1e-5;

/// The int8 code of the scaled value `x` (`x · γ`), as a C expression.
fn quant_code(x: &str) -> String {
    format!("(int)fminf(fmaxf(roundf({x}), -128.0f), 127.0f)")
}

/// Tiles of the CUDA matrix products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct CudaTiles {
    /// Warps per block. Each computes one output row, or with `mma` a
    /// slice of 16 rows.
    pub warps: usize,
    /// Tokens computed per pass over the weights: per warp, or with `mma`
    /// per block (a multiple of 8).
    pub tokens: usize,
    /// Ternary products on the integer tensor cores (`mma.sync` s8,
    /// sm_80 and later), for prefill; else `dp4a` dot products.
    #[serde(default)]
    pub mma: bool,
}

impl CudaTiles {
    pub const WARPS: [usize; 4] = [1, 2, 4, 8];
    pub const TOKENS: [usize; 4] = [1, 2, 4, 8];
    pub const MMA_TOKENS: [usize; 3] = [16, 32, 64];
    pub const DEFAULT: CudaTiles = CudaTiles { warps: 4, tokens: 4, mma: false };
    /// Prefill's default on tensor-core GPUs.
    pub const MMA_DEFAULT: CudaTiles = CudaTiles { warps: 4, tokens: 32, mma: true };

    pub fn is_valid(&self) -> bool {
        let tokens: &[usize] = if self.mma { &Self::MMA_TOKENS } else { &Self::TOKENS };
        Self::WARPS.contains(&self.warps) && tokens.contains(&self.tokens)
    }

    pub fn block(&self) -> u32 {
        32 * self.warps as u32
    }

    /// Whether these tiles can run the product `key`: the tensor cores
    /// run ternary products only.
    pub fn fits(&self, key: &crate::schedule::WorkloadKey) -> bool {
        self.is_valid() && (!self.mma || key.is_ternary())
    }

    /// Output rows per block.
    pub fn rows(&self) -> usize {
        if self.mma {
            16 * self.warps
        } else {
            self.warps
        }
    }

    /// The blocks of a product of `n` output rows.
    pub fn grid(&self, n: usize) -> super::Grid {
        let blocks = n.div_ceil(self.rows()) as u32;
        if self.mma {
            super::Grid::RowsByTokens { blocks, tokens: self.tokens }
        } else {
            super::Grid::Fixed(blocks)
        }
    }
}

impl std::fmt::Display for CudaTiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let isa = if self.mma { "cuda-mma" } else { "cuda" };
        write!(f, "isa={isa} warps={} tokens={}", self.warps, self.tokens)
    }
}

/// Ternary products on the tensor cores: `mma.sync.m16n8k32` with the
/// weights' codes (0, 1, 2 as s8) as A and the int8 activations as B.
/// Warp `w` of block `(x, y)` computes rows `16 · (x · warps + w) ..+16`
/// for tokens `y · tokens ..+tokens`, one 16×8 accumulator per 8 tokens
/// and weight (`weights` gives each packed weight's C expression of a
/// row, as [`packed_row`]; `acc` of the second becomes `sum_up`). In a
/// packed 128-code chunk, byte `b` holds the codes of `k = b, b+32, b+64,
/// b+96` (bits 7:6 down to 1:0), so the fragment of a 32-wide step is one
/// shift and mask of two words per row:
/// words `t` and `t+4` give `k = 4t..4t+3` and `16+4t..` of that step,
/// as A's registers and B's both want them. The accumulators are exact
/// integers, so the result is the `dp4a` kernel's bit for bit; `finish`
/// sees `t`, `n`, `sum` (and `sum_up`).
/// Grid: `(ceil(n / (16 · warps)), ceil(S / tokens))` blocks of `32 · warps`.
fn mma_tiles(n: usize, kp: usize, tiles: CudaTiles, weights: &[&dyn Fn(&str) -> String], finish: &str) -> String {
    let nt = tiles.tokens / 8;
    let (mut declare, mut load, mut step, mut sums) = (String::new(), String::new(), String::new(), String::new());
    for (i, row) in weights.iter().enumerate() {
        let _ = writeln!(
            declare,
            "    int acc{i}[{nt}][4];\n    #pragma unroll\n    for (int j = 0; j < {nt}; j++) acc{i}[j][0] = acc{i}[j][1] = acc{i}[j][2] = acc{i}[j][3] = 0;\n    \
             const u32* rows_a{i} = {};\n    const u32* rows_b{i} = {};",
            row("ra"),
            row("rb")
        );
        let _ = writeln!(
            load,
            "        const u32* ra{i} = rows_a{i} + c * 8;\n        const u32* rb{i} = rows_b{i} + c * 8;\n        \
             u32 wa{i}0 = oka ? ra{i}[t4] : 0u, wa{i}1 = oka ? ra{i}[t4 + 4] : 0u, wb{i}0 = okb ? rb{i}[t4] : 0u, wb{i}1 = okb ? rb{i}[t4 + 4] : 0u;"
        );
        let _ = writeln!(
            step,
            "                mma_s8(acc{i}[j], (wa{i}0 >> sh) & 0x03030303u, (wb{i}0 >> sh) & 0x03030303u, (wa{i}1 >> sh) & 0x03030303u, (wb{i}1 >> sh) & 0x03030303u, b0, b1);"
        );
        let _ = writeln!(sums, "                int {} = acc{i}[j][r];", if i == 0 { "sum" } else { "sum_up" });
    }
    format!(
        r#"    int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    int row0 = (blockIdx.x * {warps} + (threadIdx.x >> 5)) * 16;
    int tok0 = blockIdx.y * {tokens};
    if (row0 >= {n}) return;
    int ra = row0 + g, rb = row0 + g + 8;
    bool oka = ra < {n}, okb = rb < {n};
{declare}    for (int c = 0; c < {chunks}; c++) {{
{load}        #pragma unroll
        for (int qq = 0; qq < 4; qq++) {{
            int sh = 6 - 2 * qq;
            #pragma unroll
            for (int j = 0; j < {nt}; j++) {{
                int tok = tok0 + j * 8 + g;
                u32 b0 = 0u, b1 = 0u;
                if (tok < S) {{
                    const u32* xr = (const u32*)q + (size_t)tok * {xw} + c * 32 + qq * 8;
                    b0 = xr[t4];
                    b1 = xr[t4 + 4];
                }}
{step}            }}
        }}
    }}
    #pragma unroll
    for (int j = 0; j < {nt}; j++) {{
        #pragma unroll
        for (int r = 0; r < 4; r++) {{
            int n = row0 + g + (r >> 1) * 8;
            int t = tok0 + j * 8 + 2 * t4 + (r & 1);
            if (n < {n} && t < S) {{
{sums}{finish}
            }}
        }}
    }}"#,
        warps = tiles.warps,
        tokens = tiles.tokens,
        chunks = kp / 128,
        xw = kp / 4
    )
}

/// The loop shared by both matrix products: warp `w` of the block takes
/// row `n`, its lanes stride over the row's `words`, and every `tokens`
/// tokens are reduced across the warp and finished by lane 0 (`finish`
/// sees `t`, `n` and the sum `acc`).
/// The per-token sums a warp keeps: their C type, their names (`acc`
/// becomes `sum` once reduced: `acc_up` → `sum_up`), and the warp
/// reduction that totals them.
struct Sums<'a> {
    ty: &'a str,
    names: &'a [&'a str],
    reduce: &'a str,
}

fn row_per_warp(n: usize, words: usize, tiles: CudaTiles, sums: Sums, body: &str, finish: &str) -> String {
    let tok = tiles.tokens;
    let (mut declare, mut reduced) = (String::new(), String::new());
    let Sums { ty, names, reduce } = sums;
    for a in names {
        let _ = writeln!(declare, "        {ty} {a}[{tok}];\n        #pragma unroll\n        for (int u = 0; u < {tok}; u++) {a}[u] = 0;");
        let _ = writeln!(reduced, "            {ty} {} = {reduce}({a}[u]);", a.replace("acc", "sum"));
    }
    let mut s = String::new();
    let _ = write!(
        s,
        r#"    int lane = threadIdx.x & 31;
    int n = blockIdx.x * {warps} + (threadIdx.x >> 5);
    if (n >= {n}) return;
    for (int t0 = 0; t0 < S; t0 += {tok}) {{
{declare}        for (int i = lane; i < {words}; i += 32) {{
{body}
        }}
        #pragma unroll
        for (int u = 0; u < {tok}; u++) {{
{reduced}            int t = t0 + u;
            if (lane == 0 && t < S) {{
{finish}
            }}
        }}
    }}"#,
        warps = tiles.warps
    );
    s
}

/// Where a ternary product's int8 activations come from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Acts {
    /// Quantized by the launch before it: `q`, `gamma` and `qsum`.
    Given,
    /// Those, and the f32 rows of `k` they are quantized from, `x` (and
    /// the RMSNorm's weight `xnorm` when `norm` gives its eps). A kernel
    /// that quantizes `here` runs one token: every block quantizes the row
    /// into its shared memory, as [`quantize_rows`] does, and reads that
    /// instead of `q`, `gamma` and `qsum` (so the launch that quantizes
    /// need not run). Others read `q`, `gamma` and `qsum`.
    Rows { k: usize, norm: Option<f32>, here: bool },
}

impl Acts {
    /// The kernel parameters for the f32 rows.
    fn params(self) -> &'static str {
        match self {
            Acts::Given => "",
            Acts::Rows { norm: Some(_), .. } => "const float* x, const float* xnorm, ",
            Acts::Rows { norm: None, .. } => "const float* x, ",
        }
    }

    /// A product's `code` after the quantization of its one token, where
    /// the kernel does it.
    fn wrap(self, kp: usize, code: &str) -> String {
        let Acts::Rows { k, norm, here: true } = self else { return code.to_string() };
        let (squares, value) = match norm {
            Some(eps) => (
                format!(
                    r#"double acc = 0.0;
        for (int j = threadIdx.x; j < {k}; j += blockDim.x) acc += (double)x[j] * (double)x[j];
        acc = block_sum_d(acc);
        float s = 1.0f / sqrtf((float)(acc / {k}.0) + {eps});"#,
                    eps = float(eps)
                ),
                "x[j] * s * xnorm[j]",
            ),
            None => (String::new(), "x[j]"),
        };
        format!(
            r#"    __shared__ __align__(16) i8 xq[{kp}];
    __shared__ float xq_gamma;
    __shared__ int xq_sum;
    {{
        {squares}
        float amax = 0.0f;
        for (int j = threadIdx.x; j < {k}; j += blockDim.x) amax = fmaxf(amax, fabsf({value}));
        float g = 127.0f / fmaxf(block_max(amax), {tiny});
        int sum = 0;
        for (int j = threadIdx.x; j < {kp}; j += blockDim.x) {{
            int c = j < {k} ? {code} : 0;
            xq[j] = (i8)c;
            sum += c;
        }}
        sum = block_sum_i(sum);
        if (threadIdx.x == 0) {{ xq_gamma = g; xq_sum = sum; }}
        __syncthreads();
    }}
    {{
    const int* q = (const int*)xq;
    const float* gamma = &xq_gamma;
    const int* qsum = &xq_sum;
{code_body}
    }}"#,
            tiny = float(QUANT_TINY),
            code = quant_code(&format!("{value} * g")),
            code_body = code
        )
    }
}

/// The epilogue of a ternary product, as in [`crate::cpu::ternary`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TernaryEpilogue {
    pub scale: bool,
    pub residual: bool,
}

/// `out[t, n] = ((Σ c·q − Σq) · β) / γ` (β, the weight's scale, follows the
/// weight pointer), then the epilogue, over the packed ternary layout of
/// `crate::cpu::ternary` with one row per tile. Each lane loads 16 bytes
/// of a row at a time (64 codes, four 32-bit words): in word `j` one shift
/// and mask give four consecutive codes, the int8 lanes `__dp4a`
/// multiplies with four activations, which sit at `base + j`, `+ 8`, `+ 16`
/// and `+ 24` (in 32-bit words) for the four shifts. Rows are padded to
/// 128 codes, so a row is always whole 16-byte pieces, and aligned.
/// Grid: `ceil(n / warps)` blocks of `32 · warps`.
pub fn ternary_matmul(n: usize, kp: usize, ep: TernaryEpilogue, acts: Acts, tiles: CudaTiles) -> String {
    let row = |r: &str| packed_row("w", r, kp);
    let body = ternary_body(&row, "acc", kp, tiles);
    let mut finish = String::from("                float v = ((float)(sum - qsum[t]) * beta) / gamma[t];\n");
    if ep.scale {
        finish += "                v *= scale[0];\n";
    }
    if ep.residual {
        finish += &format!("                v += residual[(size_t)t * {n} + n];\n");
    }
    finish += &format!("                out[(size_t)t * {n} + n] = v;");
    let mut params = format!("const u32* w, float beta, const int* q, const float* gamma, const int* qsum, {}", acts.params());
    if ep.scale {
        params += "const float* scale, ";
    }
    if ep.residual {
        params += "const float* residual, ";
    }
    let code = if tiles.mma {
        mma_tiles(n, kp, tiles, &[&row], &finish)
    } else {
        row_per_warp(n, kp / 64, tiles, Sums { ty: "int", names: &["acc"], reduce: "warp_sum_i" }, &body, &finish)
    };
    format!("({params}float* out, int S) {{\n{}\n}}", acts.wrap(kp, &code))
}

/// Where part `j` of a [`ternary_cat`] writes its results: rows of `width`
/// floats, from column `start` of each (its own value's rows, or its
/// columns of the cat's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Columns {
    pub width: usize,
    pub start: usize,
}

/// The products of one activation with several packed ternary weights
/// (q, k and v), as one product over their rows side by side: part `j`
/// has `rows[j]` rows, its weight `wj`, its `betaj` (and `scalej` when
/// `scale`), and writes `outj` as `outs[j]` says; each result is the one
/// [`ternary_matmul`] computes. Grid: that of a product of all the rows.
pub fn ternary_cat(rows: &[usize], kp: usize, scale: bool, outs: &[Columns], acts: Acts, tiles: CudaTiles) -> String {
    assert_eq!(rows.len(), outs.len(), "one output per part");
    let starts: Vec<usize> = rows.iter().scan(0, |s, &r| Some(std::mem::replace(s, *s + r))).collect();
    let n: usize = rows.iter().sum();
    let row = |r: &str| by_part(&starts, r, &|j, local| packed_row(&format!("w{j}"), &local, kp));
    let body = ternary_body(&row, "acc", kp, tiles);
    let mut finish = format!("                float v = ((float)(sum - qsum[t]) * {}) / gamma[t];\n", by_part(&starts, "n", &|j, _| format!("beta{j}")));
    if scale {
        finish += &format!("                v *= {};\n", by_part(&starts, "n", &|j, _| format!("scale{j}[0]")));
    }
    let at = by_part(&starts, "n", &|j, local| format!("&out{j}[(size_t)t * {} + {} + {local}]", outs[j].width, outs[j].start));
    finish += &format!("                *{at} = v;");
    let mut params = String::new();
    for j in 0..rows.len() {
        let _ = write!(params, "const u32* w{j}, float beta{j}, {}", if scale { format!("const float* scale{j}, ") } else { String::new() });
    }
    params += "const int* q, const float* gamma, const int* qsum, ";
    params += acts.params();
    for j in 0..rows.len() {
        let _ = write!(params, "float* out{j}, ");
    }
    let code = if tiles.mma {
        mma_tiles(n, kp, tiles, &[&row], &finish)
    } else {
        row_per_warp(n, kp / 64, tiles, Sums { ty: "int", names: &["acc"], reduce: "warp_sum_i" }, &body, &finish)
    };
    format!("({params}int S) {{\n{}\n}}", acts.wrap(kp, &code))
}

/// The C expression of row `r` of the packed ternary weight `w` (`const
/// u32*`, `kp / 16` words a row).
fn packed_row(w: &str, r: &str, kp: usize) -> String {
    format!("((const u32*){w} + (size_t)({r}) * {})", kp / 16)
}

/// A C expression that is `part(j, local)` for the part `j` that row `r`
/// falls in, of parts starting at rows `starts` (`local` is `r`'s row in
/// its part); rows past the end count as the last part's.
fn by_part(starts: &[usize], r: &str, part: &dyn Fn(usize, String) -> String) -> String {
    let last = starts.len() - 1;
    let local = |j: usize| if starts[j] == 0 { format!("({r})") } else { format!("(({r}) - {})", starts[j]) };
    let mut e = part(last, local(last));
    for j in (0..last).rev() {
        e = format!("(({r}) < {} ? {} : {e})", starts[j + 1], part(j, local(j)));
    }
    e
}

/// `out[t, n] = act(gate[t, n]) · up[t, n]` where gate and up are two
/// ternary products of the same activations, as [`ternary_matmul`] makes
/// them (each with its β, and its scale when `scale`): one warp computes
/// both rows `n`, so the two products never leave the registers.
pub fn ternary_glu(n: usize, kp: usize, act: GateAct, scale: bool, acts: Acts, tiles: CudaTiles) -> String {
    let (gate, up) = (|r: &str| packed_row("w", r, kp), |r: &str| packed_row("wu", r, kp));
    let body =
        format!("{{\n{}\n            }}\n            {{\n{}\n            }}", ternary_body(&gate, "acc", kp, tiles), ternary_body(&up, "acc_up", kp, tiles));
    let mut finish = String::from("                float g = ((float)(sum - qsum[t]) * beta) / gamma[t];\n");
    finish += "                float u = ((float)(sum_up - qsum[t]) * beta_up) / gamma[t];\n";
    if scale {
        finish += "                g *= scale[0];\n                u *= scale_up[0];\n";
    }
    let a = match act {
        GateAct::Silu => unary_expr(UnaryOp::Silu, "g"),
        GateAct::Relu2 => unary_expr(UnaryOp::Square, &unary_expr(UnaryOp::Relu, "g")),
    };
    finish += &format!("                out[(size_t)t * {n} + n] = {a} * u;");
    let scales = |suffix: &str| if scale { format!("const float* scale{suffix}, ") } else { String::new() };
    let params = format!(
        "const u32* w, float beta, {}const u32* wu, float beta_up, {}const int* q, const float* gamma, const int* qsum, {}",
        scales(""),
        scales("_up"),
        acts.params()
    );
    let code = if tiles.mma {
        mma_tiles(n, kp, tiles, &[&gate, &up], &finish)
    } else {
        row_per_warp(n, kp / 64, tiles, Sums { ty: "int", names: &["acc", "acc_up"], reduce: "warp_sum_i" }, &body, &finish)
    };
    format!("({params}float* out, int S) {{\n{}\n}}", acts.wrap(kp, &code))
}

/// One lane's step of a ternary row product: 16 bytes (64 codes) of
/// weight row `n`, whose address is the C expression `row("n")`, against
/// the same codes' activations of each token, into `acc[u]`.
fn ternary_body(row: &dyn Fn(&str) -> String, acc: &str, kp: usize, tiles: CudaTiles) -> String {
    format!(
        r#"            uint4 w4 = ((const uint4*){row})[i];
            int base = (i >> 1) * 32 + (i & 1) * 4;
            u32 wv[4] = {{w4.x, w4.y, w4.z, w4.w}};
            int c[4][4];
            #pragma unroll
            for (int j = 0; j < 4; j++) {{
                c[j][0] = (int)((wv[j] >> 6) & 0x03030303u);
                c[j][1] = (int)((wv[j] >> 4) & 0x03030303u);
                c[j][2] = (int)((wv[j] >> 2) & 0x03030303u);
                c[j][3] = (int)(wv[j] & 0x03030303u);
            }}
            #pragma unroll
            for (int u = 0; u < {tok}; u++) {{
                if (t0 + u < S) {{
                    const int4* xr = (const int4*)(q + (size_t)(t0 + u) * {xw} + base);
                    int4 x0 = xr[0], x1 = xr[2], x2 = xr[4], x3 = xr[6];
                    int xs[4][4] = {{{{x0.x, x1.x, x2.x, x3.x}}, {{x0.y, x1.y, x2.y, x3.y}}, {{x0.z, x1.z, x2.z, x3.z}}, {{x0.w, x1.w, x2.w, x3.w}}}};
                    #pragma unroll
                    for (int j = 0; j < 4; j++) {{
                        #pragma unroll
                        for (int h = 0; h < 4; h++) {acc}[u] = __dp4a(c[j][h], xs[j][h], {acc}[u]);
                    }}
                }}
            }}"#,
        row = row("n"),
        tok = tiles.tokens,
        xw = kp / 4
    )
}

/// `out[t, n] = (Σ w·q) · scale[n] / γ[t]`: a float weight quantized to
/// int8 per row when the model is loaded (`--head q8`, the CPU's
/// `cpu::int8` rows: `[n, kp]` codes and one scale a row) against int8
/// activations, as the CPU computes it. Each lane loads 16 bytes of a row
/// (16 codes, four `__dp4a`s a token).
/// Grid: `ceil(n / warps)` blocks of `32 · warps`.
pub fn int8_matmul(n: usize, kp: usize, tiles: CudaTiles) -> String {
    let pieces = kp / 16;
    let body = format!(
        r#"            int4 w4 = ((const int4*)w)[(size_t)n * {pieces} + i];
            #pragma unroll
            for (int u = 0; u < {tok}; u++) {{
                if (t0 + u < S) {{
                    int4 x4 = ((const int4*)(q + (size_t)(t0 + u) * {xw}))[i];
                    acc[u] = __dp4a(w4.x, x4.x, acc[u]);
                    acc[u] = __dp4a(w4.y, x4.y, acc[u]);
                    acc[u] = __dp4a(w4.z, x4.z, acc[u]);
                    acc[u] = __dp4a(w4.w, x4.w, acc[u]);
                }}
            }}"#,
        tok = tiles.tokens,
        xw = kp / 4
    );
    let finish = format!("                out[(size_t)t * {n} + n] = (float)sum * wscale[n] / gamma[t];");
    format!(
        "(const int* w, const float* wscale, const int* q, const float* gamma, const int* qsum, float* out, int S) {{\n{}\n}}",
        row_per_warp(n, pieces, tiles, Sums { ty: "int", names: &["acc"], reduce: "warp_sum_i" }, &body, &finish)
    )
}

/// `out[t, n] = x[t] · w[n]` for a float weight `[n, k]`, summed in f32.
/// Lanes load 16 bytes of the row at a time (8 f16/bf16 or 4 f32 values)
/// where the row length allows, else one value.
/// Grid: `ceil(n / warps)` blocks of `32 · warps`.
pub fn matmul(ty: FloatType, n: usize, k: usize, tiles: CudaTiles) -> String {
    let vw = match ty {
        FloatType::F16 | FloatType::BF16 if k.is_multiple_of(8) => 8,
        FloatType::F32 if k.is_multiple_of(4) => 4,
        _ => 1,
    };
    let tok = tiles.tokens;
    let body = if vw == 1 {
        format!(
            r#"            float wv = {ld}(w, (size_t)n * {k} + i);
            #pragma unroll
            for (int u = 0; u < {tok}; u++) if (t0 + u < S) acc[u] += wv * x[(size_t)(t0 + u) * {k} + i];"#,
            ld = ty.load()
        )
    } else {
        let unpack = match ty {
            FloatType::F32 => "float4 w4 = ((const float4*)w)[(size_t)n * PIECES + i];\n            float wv[4] = {w4.x, w4.y, w4.z, w4.w};".to_string(),
            _ => format!(
                "uint4 w4 = ((const uint4*)w)[(size_t)n * PIECES + i];\n            u32 hw[4] = {{w4.x, w4.y, w4.z, w4.w}};\n            float wv[8];\n            #pragma unroll\n            for (int j = 0; j < 4; j++) {{ wv[2 * j] = {cvt}((u16)(hw[j] & 0xffffu)); wv[2 * j + 1] = {cvt}((u16)(hw[j] >> 16)); }}",
                cvt = if ty == FloatType::F16 { "f16_bits" } else { "bf16_bits" }
            ),
        }
        .replace("PIECES", &(k / vw).to_string());
        format!(
            r#"            {unpack}
            #pragma unroll
            for (int u = 0; u < {tok}; u++) {{
                if (t0 + u < S) {{
                    const float4* xr = (const float4*)(x + (size_t)(t0 + u) * {k}) + i * {halves};
                    #pragma unroll
                    for (int h = 0; h < {halves}; h++) {{
                        float4 xv = xr[h];
                        acc[u] += wv[4 * h] * xv.x;
                        acc[u] += wv[4 * h + 1] * xv.y;
                        acc[u] += wv[4 * h + 2] * xv.z;
                        acc[u] += wv[4 * h + 3] * xv.w;
                    }}
                }}
            }}"#,
            halves = vw / 4
        )
    };
    let finish = format!("                out[(size_t)t * {n} + n] = sum;");
    format!(
        "(const {}* w, const float* x, float* out, int S) {{\n{}\n}}",
        ty.c_type(),
        row_per_warp(n, k / vw, tiles, Sums { ty: "float", names: &["acc"], reduce: "warp_sum" }, &body, &finish)
    )
}

/// The loop of RoPE over the pairs of a row of `row` floats at `xr`
/// (heads of `d`, position `pos`): angles `p · θ_scale^i` built by
/// repeated multiplication as the interpreter builds them; `store(a, v)`
/// writes rotated value `v` of index `a`.
fn rope_pairs(row: usize, d: usize, mode: RopeMode, theta: f32, xr: &str, pos: &str, store: &dyn Fn(&str, &str) -> String) -> String {
    let theta_scale = theta.powf(-2.0 / d as f32);
    let half = d / 2;
    let (a, b) = match mode {
        RopeMode::Interleaved => ("2 * i".to_string(), "2 * i + 1".to_string()),
        RopeMode::Neox => ("i".to_string(), format!("i + {half}")),
    };
    format!(
        r#"    for (int p = threadIdx.x; p < {pairs}; p += blockDim.x) {{
        int head = p / {half}, i = p % {half};
        float angle = (float)({pos});
        for (int j = 0; j < i; j++) angle *= {ts};
        float sn, cs;
        sincosf(angle, &sn, &cs);
        int a = head * {d} + {a}, b = head * {d} + {b};
        float x0 = {xr}[a], x1 = {xr}[b];
        {store_a};
        {store_b};
    }}"#,
        pairs = row / 2,
        ts = float(theta_scale),
        store_a = store("a", "x0 * cs - x1 * sn"),
        store_b = store("b", "x0 * sn + x1 * cs"),
    )
}

/// RoPE on rows of `row` floats (heads of `d`), as [`rope_pairs`].
/// Grid: `S` blocks; one thread per (head, pair).
pub fn rope(row: usize, d: usize, mode: RopeMode, theta: f32) -> String {
    let pairs = rope_pairs(row, d, mode, theta, "xr", "pos[blockIdx.x]", &|i, v| format!("o[{i}] = {v}"));
    format!(
        r#"(const float* x, const int* pos, float* out, int S) {{
    const float* xr = x + (size_t)blockIdx.x * {row};
    float* o = out + (size_t)blockIdx.x * {row};
{pairs}
}}"#
    )
}

/// The parameters of a kernel that reads the paged KV cache, before the
/// layer's key and value blocks: each row's block table (`width` blocks a
/// row, in position order) and the blocks in the pool.
const KV_PARAMS: &str = "const int* tables, int width, int blocks, ";

/// The C expression of the offset (in floats) of KV head `head`'s values
/// at position `pos` of row `row`'s sequence in a pool of blocks of
/// `1 << shift` positions, each KV head's blocks side by side
/// (`[kv_heads][blocks][positions][d]`, as the CPU's paged cache).
fn kv_offset(shift: u32, d: usize, head: &str, pos: &str, row: &str) -> String {
    format!(
        "(((((size_t)({head}) * blocks + (size_t)tables[(size_t)({row}) * width + (({pos}) >> {shift})]) << {shift}) + (({pos}) & {mask})) * {d})",
        mask = (1u32 << shift) - 1
    )
}

/// Writes the keys and values of the `S` tokens (`kv_heads` heads of `d`
/// each) into one layer's paged cache, each at its position in its own
/// sequence's blocks. Grid: `S` blocks.
pub fn kv_store(kv_heads: usize, d: usize, shift: u32) -> String {
    let kv_row = kv_heads * d;
    format!(
        r#"(const float* k, const float* v, const int* pos, {params}float* kc, float* vc, int S) {{
    int s = blockIdx.x, p = pos[s];
    for (int j = threadIdx.x; j < {kv_row}; j += blockDim.x) {{
        size_t at = {at} + j % {d};
        kc[at] = k[(size_t)s * {kv_row} + j];
        vc[at] = v[(size_t)s * {kv_row} + j];
    }}
}}"#,
        params = KV_PARAMS,
        at = kv_offset(shift, d, &format!("j / {d}"), "p", "s"),
    )
}

/// RoPE on the queries and keys of the `S` tokens and the keys and values
/// stored into one layer's paged cache, in one launch: the queries (`heads`
/// heads of `d`) to `q_out`, the rotated keys (`kv_heads` heads) and the
/// values straight into their blocks, as [`rope`] then [`kv_store`] compute
/// them. Grid: `S` blocks.
pub fn rope_kv_store(heads: usize, kv_heads: usize, d: usize, mode: RopeMode, theta: f32, shift: u32) -> String {
    let kv_row = kv_heads * d;
    let at = |j: &str| format!("{} + ({j}) % {d}", kv_offset(shift, d, &format!("({j}) / {d}"), "position", "s"));
    let q = rope_pairs(heads * d, d, mode, theta, "qr", "position", &|i, v| format!("qo[{i}] = {v}"));
    let k = rope_pairs(kv_row, d, mode, theta, "kr", "position", &|i, v| format!("kc[{}] = {v}", at(i)));
    format!(
        r#"(const float* q, const float* k, const float* v, const int* pos, {params}float* kc, float* vc, float* q_out, int S) {{
    int s = blockIdx.x, position = pos[s];
    const float* qr = q + (size_t)s * {q_row};
    const float* kr = k + (size_t)s * {kv_row};
    float* qo = q_out + (size_t)s * {q_row};
{q}
{k}
    for (int j = threadIdx.x; j < {kv_row}; j += blockDim.x) vc[{at_j}] = v[(size_t)s * {kv_row} + j];
}}"#,
        params = KV_PARAMS,
        q_row = heads * d,
        at_j = at("j"),
    )
}

/// Causal grouped-query attention of each (head, token) over the cached
/// positions `0..=pos` of its sequence (the paged cache of [`kv_store`]):
/// scores, softmax (as the interpreter's), the weighted sum of values.
/// Grid: `(heads, S)` blocks of [`ROW_BLOCK`].
///
/// A block takes its positions in chunks of `chunk`, whose scores sit in
/// static shared memory (so the context has no limit of its own), and
/// merges the chunks' softmax as it goes: a running max score, softmax
/// total and output, as flash attention keeps them. With one chunk in all
/// it is the plain softmax. Eight lanes make one score (each a strided
/// eighth of the head), so a warp scores four positions at a time with its
/// loads in flight together; for the weighted sum each warp takes every
/// eighth position and its lanes the head's dimensions, and the warps'
/// partial sums are added in shared memory. Only the order of these sums
/// differs from the interpreter's.
///
/// With `rope`, the kernel also takes the queries and keys before their
/// RoPE (`q_in`, `k_in`, after `pos`), which [`rope_kv_store`] rotates and
/// stores before it runs. A kernel that rotates `here` runs one token: each
/// block rotates its query head and its KV head's key into shared memory,
/// reads the token's own key and value from there and `v` (the cache holds
/// only the earlier positions it reads), and the first block of each KV
/// group stores them in the cache for the steps after; so the store
/// launch need not run.
///
/// `split` runs one token over `(heads, blocks)` blocks: a head's chunks
/// go to its `gridDim.y` blocks, a run of neighbouring chunks each, so that
/// a long context keeps every SM busy with a grid that does not grow with
/// it ([`DecodeSplit`]). Where more than one block has work, each leaves
/// its max score, softmax total and output in the `split` buffer (after
/// one int a head, a counter that is zero between launches:
/// `[heads][gridDim.y][d + 2]` floats, [`split_floats`]), and the last of
/// a head's blocks to finish combines them and resets the counter.
/// Kernels without `split` ignore the buffer.
pub fn attention(heads: usize, kv_heads: usize, d: usize, shift: u32, rope: Option<OwnRope>, chunk: usize, split: bool) -> String {
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let warps = ROW_BLOCK / 32;
    let key_at = kv_offset(shift, d, "kvh", "t", "s");
    let (mut params, mut query, mut key, mut value) =
        (String::from("const float* q, const float* k, const float* v, const int* pos, "), String::new(), format!("kc + {key_at}"), format!("vc + {key_at}"));
    params += match rope {
        Some(_) => "const float* q_in, const float* k_in, ",
        None => "",
    };
    params += KV_PARAMS;
    params += match rope {
        Some(OwnRope { here: true, .. }) => "float* kc, float* vc, ",
        _ => "const float* kc, const float* vc, ",
    };
    if let Some(OwnRope { mode, theta, here: true }) = rope {
        let own = |x: &str, to: &str| rope_pairs(d, d, mode, theta, x, "(keys - 1)", &|i, v| format!("{to}[{i}] = {v}"));
        let store = kv_offset(shift, d, "kvh", "keys - 1", "0");
        query = format!(
            r#"    __shared__ float q_own[{d}], k_own[{d}];
    const float* qi = q_in + (size_t)h * {d};
    const float* ki = k_in + (size_t)kvh * {d};
    const float* vi = v + (size_t)kvh * {d};
{rq}
{rk}
    __syncthreads();
    if (h % {group} == 0 && ends == keys) {{
        for (int j = threadIdx.x; j < {d}; j += blockDim.x) {{ kc[{store} + j] = k_own[j]; vc[{store} + j] = vi[j]; }}
    }}
    qh = q_own;
"#,
            rq = own("qi", "q_own"),
            rk = own("ki", "k_own"),
        );
        key = format!("(t == keys - 1 ? k_own : {key})");
        value = format!("(t == keys - 1 ? vi : {value})");
    }
    // Each (head, token)'s block over its positions in chunks of `p`; or,
    // split, one token's chunks over a head's blocks, a run of them each,
    // the last block of a head to finish adding their parts up.
    let p = chunk.max(1);
    let positions = if split {
        format!(
            r#"int h = blockIdx.x, s = 0;
    int keys = pos[0] + 1, chunks = (keys + {p} - 1) / {p};
    // The chunks shared out evenly over as many blocks as there are chunks,
    // or all of the head's.
    int splits = chunks < (int)gridDim.y ? chunks : (int)gridDim.y;
    if ((int)blockIdx.y >= splits) return;
    int begin = blockIdx.y * chunks / splits, end = (blockIdx.y + 1) * chunks / splits;"#
        )
    } else {
        format!(
            r#"int h = blockIdx.x, s = blockIdx.y;
    int keys = pos[s] + 1, chunks = (keys + {p} - 1) / {p};
    int splits = 1, begin = 0, end = chunks;"#
        )
    };
    let combine = if split {
        format!(
            r#"    // This block's share: its max score, its softmax total, its output.
    float* mine = split + {heads} + ((size_t)h * gridDim.y + blockIdx.y) * {w};
    for (int j = threadIdx.x; j < {d}; j += blockDim.x) mine[2 + j] = acc[j];
    if (threadIdx.x == 0) {{ mine[0] = top; mine[1] = mass; }}
    __threadfence();
    __syncthreads();
    __shared__ int last;
    if (threadIdx.x == 0) last = atomicAdd((int*)split + h, 1) == splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    volatile const float* all = split + {heads} + (size_t)h * gridDim.y * {w};
    float most = -__int_as_float(0x7f800000);
    for (int i = 0; i < splits; i++) most = fmaxf(most, all[i * {w}]);
    for (int j = threadIdx.x; j < {d}; j += blockDim.x) {{
        float sum = 0.0f, weights = 0.0f;
        for (int i = 0; i < splits; i++) {{
            float weight = expf(all[i * {w}] - most) * all[i * {w} + 1];
            sum += weight * all[i * {w} + 2 + j];
            weights += weight;
        }}
        out[(size_t)h * {d} + j] = sum / weights;
    }}
    if (threadIdx.x == 0) ((int*)split)[h] = 0;
"#,
            w = d + 2
        )
    } else {
        String::new()
    };
    format!(
        r#"({params}float* split, float* out, int S) {{
    __shared__ float score[{p}], acc[{d}];
    __shared__ float part[{warps}][{d}];
    {positions}
    int ends = end * {p} < keys ? end * {p} : keys;
    // The max score and softmax total of this block's chunks so far (their
    // output in acc).
    float top = -__int_as_float(0x7f800000), mass = 0.0f;
    const float* qh = q + ((size_t)s * {heads} + h) * {d};
    int kvh = h / {group};
{query}    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int sub = lane & 7;
    float qv[{per8}];
    #pragma unroll
    for (int i = 0; i < {per8}; i++) {{ int j = sub + 8 * i; qv[i] = j < {d} ? qh[j] : 0.0f; }}
    for (int chunk = begin; chunk < end; chunk++) {{
    int first = chunk * {p}, count = keys - first < {p} ? keys - first : {p};
    for (int i0 = 0; i0 < count; i0 += {warps} * 4) {{
        int i = i0 + warp * 4 + (lane >> 3), t = first + i;
        float dot = 0.0f;
        if (i < count) {{
            const float* kr = {key};
            #pragma unroll
            for (int c = 0; c < {per8}; c++) {{ int j = sub + 8 * c; if (j < {d}) dot += qv[c] * kr[j]; }}
        }}
        dot += __shfl_xor_sync(0xffffffffu, dot, 4);
        dot += __shfl_xor_sync(0xffffffffu, dot, 2);
        dot += __shfl_xor_sync(0xffffffffu, dot, 1);
        if (sub == 0 && i < count) score[i] = dot * {scale};
    }}
    __syncthreads();
    float m = -__int_as_float(0x7f800000);
    for (int i = threadIdx.x; i < count; i += blockDim.x) m = fmaxf(m, score[i]);
    m = block_max(m);
    double total = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) {{
        float e = expf(score[i] - m);
        score[i] = e;
        total += e;
    }}
    float sum = (float)block_sum_d(total);
    for (int i = threadIdx.x; i < count; i += blockDim.x) score[i] = score[i] / sum;
    __syncthreads();
    float o[{per32}];
    #pragma unroll
    for (int c = 0; c < {per32}; c++) o[c] = 0.0f;
    #pragma unroll 4
    for (int i = warp; i < count; i += {warps}) {{
        float p = score[i];
        int t = first + i;
        const float* vr = {value};
        #pragma unroll
        for (int c = 0; c < {per32}; c++) {{ int j = lane + 32 * c; if (j < {d}) o[c] += p * vr[j]; }}
    }}
    #pragma unroll
    for (int c = 0; c < {per32}; c++) {{ int j = lane + 32 * c; if (j < {d}) part[warp][j] = o[c]; }}
    __syncthreads();
    // This chunk's output, merged into the block's.
    for (int j = threadIdx.x; j < {d}; j += blockDim.x) {{
        float r = 0.0f;
        #pragma unroll
        for (int w = 0; w < {warps}; w++) r += part[w][j];
        if (chunk == begin) acc[j] = r;
        else {{
            float both = fmaxf(top, m), a = expf(top - both) * mass, b = expf(m - both) * sum;
            acc[j] = (a * acc[j] + b * r) / (a + b);
        }}
    }}
    if (chunk == begin) {{ top = m; mass = sum; }}
    else {{
        float both = fmaxf(top, m);
        mass = expf(top - both) * mass + expf(m - both) * sum;
        top = both;
    }}
    }}
    if (splits == 1) {{
        for (int j = threadIdx.x; j < {d}; j += blockDim.x) out[((size_t)s * {heads} + h) * {d} + j] = acc[j];
        return;
    }}
{combine}}}"#,
        scale = float(scale),
        per8 = d.div_ceil(8),
        per32 = d.div_ceil(32)
    )
}

/// The floats of the buffer that [`attention`] split over `splits` blocks
/// a head needs, for `heads` heads of `d`.
pub fn split_floats(heads: usize, d: usize, splits: usize) -> usize {
    heads + heads * splits * (d + 2)
}

/// How attention takes a head's positions: in chunks of `positions` (the
/// kernels' `chunk`, for one token and for many rows alike), and, for one
/// token, over at most `blocks` blocks a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DecodeSplit {
    pub positions: usize,
    pub blocks: usize,
}

impl DecodeSplit {
    /// Chunks of 256 positions, on at most 32 blocks a head: 640 blocks for
    /// 2B4T's 20 heads at 8K positions or more (the chunks shared out
    /// evenly), several waves of any GPU's SMs, and each block's scores in
    /// 1 KiB of shared memory.
    pub const DEFAULT: DecodeSplit = DecodeSplit { positions: 256, blocks: 32 };

    /// The blocks a head of a context of `context` positions is given.
    pub fn blocks_for(self, context: usize) -> usize {
        context.div_ceil(self.positions.max(1)).clamp(1, self.blocks.max(1))
    }
}

/// An attention whose queries' and keys' RoPE (`mode`, `theta`) is
/// another launch's or, `here`, its own (see [`attention`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OwnRope {
    pub mode: RopeMode,
    pub theta: f32,
    pub here: bool,
}

fn unary_expr(u: UnaryOp, x: &str) -> String {
    match u {
        UnaryOp::Silu => format!("({x} / (1.0f + expf(-{x})))"),
        UnaryOp::Relu => format!("fmaxf({x}, 0.0f)"),
        UnaryOp::Square => format!("({x} * {x})"),
        UnaryOp::Exp => format!("expf({x})"),
        UnaryOp::Neg => format!("(-{x})"),
    }
}

/// An elementwise kernel over `S · row` values: `expr` reads `a[i]` (and
/// `b[…]`). Grid: `ceil(S · row / ELEMENT_BLOCK)` blocks.
fn elementwise(params: &str, row: usize, expr: &str) -> String {
    format!(
        r#"({params}float* out, int S) {{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)S * {row}) return;
    out[i] = {expr};
}}"#
    )
}

/// `act(gate) * up`.
pub fn glu(act: GateAct, row: usize) -> String {
    let a = match act {
        GateAct::Silu => unary_expr(UnaryOp::Silu, "a[i]"),
        GateAct::Relu2 => unary_expr(UnaryOp::Square, &unary_expr(UnaryOp::Relu, "a[i]")),
    };
    elementwise("const float* a, const float* b, ", row, &format!("{a} * b[i]"))
}

pub fn unary(u: UnaryOp, row: usize) -> String {
    elementwise("const float* a, ", row, &unary_expr(u, "a[i]"))
}

/// `a op b` with `b` of `b_len` values repeated (the same shape, a row or
/// a scalar).
pub fn binary(op: bitnet_ir::BinaryOp, row: usize, b_len: Option<usize>) -> String {
    let sym = match op {
        bitnet_ir::BinaryOp::Add => "+",
        bitnet_ir::BinaryOp::Sub => "-",
        bitnet_ir::BinaryOp::Mul => "*",
        bitnet_ir::BinaryOp::Div => "/",
    };
    let bi = match b_len {
        Some(len) => format!("b[i % {len}]"),
        None => "b[i]".into(),
    };
    elementwise("const float* a, const float* b, ", row, &format!("a[i] {sym} {bi}"))
}

/// Rounds to `to` and back, as `Op::Cast` does.
pub fn cast(to: FloatType, row: usize) -> String {
    let expr = match to {
        FloatType::F32 => "a[i]",
        FloatType::F16 => "round_f16(a[i])",
        FloatType::BF16 => "round_bf16(a[i])",
    };
    elementwise("const float* a, ", row, expr)
}

/// The last of `S` rows. Grid: `ceil(row / ELEMENT_BLOCK)` blocks.
pub fn last_row(row: usize) -> String {
    format!(
        r#"(const float* a, float* out, int S) {{
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < {row}) out[j] = a[(size_t)(S - 1) * {row} + j];
}}"#
    )
}

/// Columns `start..start + len` of each of the `S` rows of `width` floats
/// of `a`, as `Op::Slice`. Grid: `S` blocks.
pub fn slice(width: usize, start: usize, len: usize) -> String {
    format!(
        r#"(const float* a, float* out, int S) {{
    const float* x = a + (size_t)blockIdx.x * {width} + {start};
    for (int j = threadIdx.x; j < {len}; j += blockDim.x) out[(size_t)blockIdx.x * {len} + j] = x[j];
}}"#
    )
}

/// Rows `rows[0..S]` of `a`, in that order (the rows of a step whose
/// logits are wanted). Grid: `S` blocks.
pub fn select_rows(row: usize) -> String {
    format!(
        r#"(const float* a, const int* rows, float* out, int S) {{
    const float* x = a + (size_t)rows[blockIdx.x] * {row};
    for (int j = threadIdx.x; j < {row}; j += blockDim.x) out[(size_t)blockIdx.x * {row} + j] = x[j];
}}"#
    )
}

/// Softmax of each row, as the interpreter's. Grid: `S` blocks.
pub fn softmax(row: usize) -> String {
    format!(
        r#"(const float* a, float* out, int S) {{
    const float* x = a + (size_t)blockIdx.x * {row};
    float* o = out + (size_t)blockIdx.x * {row};
    float m = -__int_as_float(0x7f800000);
    for (int j = threadIdx.x; j < {row}; j += blockDim.x) m = fmaxf(m, x[j]);
    m = block_max(m);
    double total = 0.0;
    for (int j = threadIdx.x; j < {row}; j += blockDim.x) {{ float e = expf(x[j] - m); o[j] = e; total += e; }}
    float sum = (float)block_sum_d(total);
    for (int j = threadIdx.x; j < {row}; j += blockDim.x) o[j] = o[j] / sum;
}}"#
    )
}
