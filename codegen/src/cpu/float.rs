//! Float matrix products `x · wᵀ` with f32 activations: the output head
//! (f16 as stored, or f32) and the projections of non-ternary models.
//! Other stored types are dequantized a row at a time, except that one
//! token meets Q4_K and Q6_K rows (GGUF heads) in place.

use super::pool::{Chunks, Pool, SharedMut};
use super::Isa;
use bitnet_ir::interp::WeightView;
use bitnet_ir::DType;

/// `out[t, n] = x[t] · w[n]` for `s` tokens, rows split over the workers.
pub fn matmul(pool: &Pool, isa: Isa, w: &WeightView, x: &[f32], out: &mut [f32]) {
    let (n, k) = (w.rows(), w.row_len());
    let s = x.len() / k.max(1);
    assert!(out.len() == s * n && x.len() == s * k, "float matmul: mismatched operands");
    // The kernels below take this for granted (as every product checks).
    assert!(isa.available(), "float matmul: {} is not available on this CPU", isa.name());
    // A batch of f16 rows (many sequences' heads): each weight is read
    // once, converted once per block of tokens, and used for all of them
    // in registers.
    #[cfg(target_arch = "x86_64")]
    if w.dtype == DType::F16 && s >= 4 && isa.float_kernels() == Isa::Avx2 {
        return batched_f16(pool, isa, w, x, out);
    }
    let dst = SharedMut(out.as_mut_ptr());
    let row_bytes = w.dtype.bytes_for(k).unwrap_or(0);
    let chunks = Chunks::new(n, pool.threads());
    pool.run_sized(s * n * k, &|_, _| {
        let mut scratch = vec![0f32; k];
        for r in std::iter::from_fn(|| chunks.next()).flatten() {
            let row = if w.dtype == DType::F16 && s == 1 {
                Row::F16(&w.data[r * row_bytes..(r + 1) * row_bytes])
            } else if cfg!(target_arch = "x86_64") && matches!(w.dtype, DType::Q4K | DType::Q6K) && s == 1 && isa.float_kernels() == Isa::Avx2 {
                Row::KQuant(w.dtype, w.row(r).bytes)
            } else if let Some(values) = f32_row(w, r, k) {
                Row::F32(values)
            } else {
                row_f32(isa, w, r, &mut scratch);
                Row::F32(&scratch)
            };
            for t in 0..s {
                let xt = &x[t * k..(t + 1) * k];
                let v = match row {
                    Row::F16(bytes) => dot_f16(isa, xt, bytes),
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: AVX2/FMA/F16C checked by available(), as
                    // the row was chosen (Isa::Avx2 float kernels).
                    Row::KQuant(dtype, bytes) => unsafe {
                        if dtype == DType::Q6K {
                            avx2::dot_q6k(xt, bytes)
                        } else {
                            avx2::dot_q4k(xt, bytes)
                        }
                    },
                    #[cfg(not(target_arch = "x86_64"))]
                    Row::KQuant(..) => unreachable!("k-quant rows are read in place only on x86"),
                    Row::F32(values) => dot(isa, xt, values),
                };
                // SAFETY: row r belongs to this worker alone.
                unsafe { *dst.ptr().add(t * n + r) = v };
            }
        }
    });
}

/// Rows of f16 weights that a batched product takes as one panel: their
/// accumulators stay in L1 while the panel's rows pass each k-block.
#[cfg(target_arch = "x86_64")]
const PANEL_ROWS: usize = 24;

/// Weights of a row a batched product takes at a time: eight tokens'
/// activations of one block (16 KB) stay in L1 while a panel's rows meet
/// them, where a whole row's (80 KB for the 2B4T head) would be read from
/// L2 for every row (the 8-token 2B4T head: 38 ms a step streaming
/// whole rows, about half the FMA's speed even with the rows in cache).
#[cfg(target_arch = "x86_64")]
const K_BLOCK: usize = 512;

/// One group's accumulators in a panel: up to three rows by eight tokens,
/// sixteen lanes each (AVX2 uses the first eight).
#[cfg(target_arch = "x86_64")]
type GroupAcc = [[[f32; 16]; 8]; 3];

/// `out[t, n] = x[t] · w[n]` for `s ≥ 4` tokens and f16 rows: panels of
/// [`PANEL_ROWS`] rows, each met by blocks of eight tokens (four on AVX2)
/// a [`K_BLOCK`] of weights at a time, the rows three (two) at a time;
/// each weight is converted once a block of tokens. Tokens past the last
/// full block take one dot product each.
#[cfg(target_arch = "x86_64")]
fn batched_f16(pool: &Pool, isa: Isa, w: &WeightView, x: &[f32], out: &mut [f32]) {
    let (n, k) = (w.rows(), w.row_len());
    let s = x.len() / k;
    let dst = SharedMut(out.as_mut_ptr());
    let row_bytes = 2 * k;
    let chunks = Chunks::new(n, pool.threads());
    let wide = isa == Isa::Avx512Vnni;
    pool.run_sized(s * n * k, &|_, _| {
        let mut acc: Vec<GroupAcc> = vec![[[[0.0; 16]; 8]; 3]; PANEL_ROWS.div_ceil(2)];
        while let Some(rows) = chunks.next() {
            for start in rows.clone().step_by(PANEL_ROWS) {
                let panel = Panel { w: &w.data[..n * row_bytes], row_bytes, rows: start..(start + PANEL_ROWS).min(rows.end), wide };
                // SAFETY: the panel's rows belong to this worker alone.
                let put = |t: usize, r: usize, v: f32| unsafe { *dst.ptr().add(t * n + r) = v };
                let mut t = 0;
                while wide && s - t >= 8 {
                    panel.tokens::<8>(x, t, &mut acc, put);
                    t += 8;
                }
                while s - t >= 4 {
                    panel.tokens::<4>(x, t, &mut acc, put);
                    t += 4;
                }
                for t in t..s {
                    for r in panel.rows.clone() {
                        put(t, r, dot_f16(isa, &x[t * k..(t + 1) * k], &panel.w[r * row_bytes..(r + 1) * row_bytes]));
                    }
                }
            }
        }
    });
}

/// Rows `rows` of an f16 matrix `w`, read [`Panel::per`] rows side by side.
#[cfg(target_arch = "x86_64")]
struct Panel<'a> {
    w: &'a [u8],
    row_bytes: usize,
    rows: std::ops::Range<usize>,
    /// AVX-512's kernels (else AVX2's).
    wide: bool,
}

#[cfg(target_arch = "x86_64")]
impl Panel<'_> {
    /// Rows a kernel call reads side by side: three with AVX-512's 32
    /// registers, two with AVX2's 16.
    fn per(&self) -> usize {
        if self.wide {
            3
        } else {
            2
        }
    }

    /// `put(t0 + i, r, x[t0 + i] · w[r])` for the panel's rows and `T`
    /// tokens (4 or 8: 8 only with AVX-512's 32 registers).
    fn tokens<const T: usize>(&self, x: &[f32], t0: usize, acc: &mut [GroupAcc], put: impl Fn(usize, usize, f32)) {
        let k = self.row_bytes / 2;
        // The lanes' part of each row; the rest is added in order at the end.
        let lanes = k / 16 * 16;
        let per = self.per();
        let groups = self.rows.clone().step_by(per).map(|r| r..(r + per).min(self.rows.end));
        assert!(self.rows.len().div_ceil(per) <= acc.len(), "f16 panel: more row groups than accumulators");
        for a in acc.iter_mut() {
            *a = [[[0.0; 16]; 8]; 3];
        }
        for kb in (0..lanes).step_by(K_BLOCK) {
            let block = kb..(kb + K_BLOCK).min(lanes);
            // Prefetch the rows' next block, or past the last one the same
            // offsets of the next panel's rows (those this worker most
            // likely reads next).
            let ahead = if block.end < lanes { 2 * K_BLOCK } else { PANEL_ROWS * self.row_bytes - 2 * kb };
            let xs: [&[f32]; T] = std::array::from_fn(|i| &x[(t0 + i) * k..][block.clone()]);
            for (rows, acc) in groups.clone().zip(acc.iter_mut()) {
                let ws: [&[u8]; 3] = std::array::from_fn(|j| &self.w[(rows.start + j.min(rows.len() - 1)) * self.row_bytes..][2 * block.start..2 * block.end]);
                block_f16::<T>(self.wide, &ws[..rows.len()], xs, ahead, acc);
            }
        }
        for (rows, acc) in groups.zip(acc.iter()) {
            for (j, r) in rows.enumerate() {
                let row = &self.w[r * self.row_bytes..(r + 1) * self.row_bytes];
                for (i, lane_acc) in acc[j][..T].iter().enumerate() {
                    let xt = &x[(t0 + i) * k..(t0 + i + 1) * k];
                    // Each lane adds its products in the order of a whole
                    // row's pass, and the tail after the lanes' sum: the
                    // bits of a kernel that keeps the accumulators in
                    // registers for the whole row.
                    let v = (lanes..k).fold(sum16(self.wide, lane_acc), |v, c| v + xt[c] * half::f16::from_le_bytes([row[2 * c], row[2 * c + 1]]).to_f32());
                    put(t0 + i, r, v);
                }
            }
        }
    }
}

/// Adds `x[i] · w[j]` over one k-block into `acc[j][i]`'s lanes, for up to
/// three f16 rows `w` (two on AVX2) and `T` tokens, whose lengths are a
/// multiple of 16; prefetches each row `ahead` bytes on.
#[cfg(target_arch = "x86_64")]
fn block_f16<const T: usize>(wide: bool, w: &[&[u8]], x: [&[f32]; T], ahead: usize, acc: &mut GroupAcc) {
    let n = x[0].len();
    assert!(n.is_multiple_of(16) && w.iter().all(|w| w.len() == 2 * n) && x.iter().all(|x| x.len() == n), "f16 block: mismatched operands");
    // SAFETY: the caller checked AVX2 (and, with `wide`, AVX-512F: part of
    // Isa::Avx512Vnni's check); the lengths are checked above.
    unsafe {
        match (wide, w.len()) {
            (true, 3) => avx512::dot_f16_block::<3, T>([w[0], w[1], w[2]], x, ahead, acc),
            (true, 2) => avx512::dot_f16_block::<2, T>([w[0], w[1]], x, ahead, acc),
            (true, _) => avx512::dot_f16_block::<1, T>([w[0]], x, ahead, acc),
            (false, 2) => avx2::dot_f16_block::<2, T>([w[0], w[1]], x, ahead, acc),
            (false, 1) => avx2::dot_f16_block::<1, T>([w[0]], x, ahead, acc),
            _ => unreachable!("AVX2 reads at most two f16 rows side by side"),
        }
    }
}

/// The sum of one accumulator's lanes (the first eight on AVX2, where the
/// rest stay zero).
#[cfg(target_arch = "x86_64")]
fn sum16(wide: bool, lanes: &[f32; 16]) -> f32 {
    // SAFETY: as in block_f16.
    unsafe {
        if wide {
            avx512::sum16(lanes)
        } else {
            avx2::sum8(lanes)
        }
    }
}

/// One weight row as a token's dot product reads it.
#[derive(Clone, Copy)]
enum Row<'a> {
    /// f16 bytes, converted within the dot product (one token: converting
    /// the row first would cost a pass more).
    F16(&'a [u8]),
    /// f32 values: read in place, or converted into a scratch row.
    F32(&'a [f32]),
    /// Q4_K or Q6_K blocks, dequantized within the dot product (one
    /// token, AVX2).
    KQuant(DType, &'a [u8]),
}

/// Row `r` of an f32 matrix read in place, where its bytes are aligned
/// for f32 (a mapped file's tensors are): no copy a row.
fn f32_row<'a>(w: &WeightView<'a>, r: usize, k: usize) -> Option<&'a [f32]> {
    if w.dtype != DType::F32 || cfg!(target_endian = "big") {
        return None;
    }
    let bytes = w.data.get(r * 4 * k..(r + 1) * 4 * k)?;
    // SAFETY: align_to returns only the aligned middle as f32, which has no
    // invalid bit patterns; the bytes are little-endian f32 (checked above).
    let (before, row, after) = unsafe { bytes.align_to::<f32>() };
    (before.is_empty() && after.is_empty()).then_some(row)
}

/// Row `r` of `w` as f32.
pub fn row_f32(isa: Isa, w: &WeightView, r: usize, out: &mut [f32]) {
    let k = out.len();
    match w.dtype {
        DType::F16 => f16_to_f32(isa, &w.data[r * 2 * k..(r + 1) * 2 * k], out),
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(w.data[r * 4 * k..(r + 1) * 4 * k].chunks_exact(4)) {
                *o = f32::from_le_bytes(b.try_into().unwrap());
            }
        }
        _ => match isa.float_kernels() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2/FMA/F16C checked by available().
            Isa::Avx2 => unsafe { avx2::dequantize(w, r, out) },
            _ => w.row(r).dequantize(out),
        },
    }
}

/// `Σ a·b`.
pub fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    match isa.float_kernels() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an Isa is only chosen where available() found AVX2 and
        // FMA; the kernel reads min(a.len(), b.len()) elements of each.
        Isa::Avx2 => unsafe { avx2::dot(a, b) },
        Isa::Cranelift => generated().dot(a, b),
        _ => reference_dot(a, b),
    }
}

/// `Σ a·b` with `b` stored as f16 bytes. On AVX-512 sixteen lanes wide,
/// with AVX2's sums (the same bits): one token's head reads its rows about
/// 4% faster with half the instructions a cache line (docs/performance.md,
/// session of 2026-12-06, nineteenth).
pub fn dot_f16(isa: Isa, a: &[f32], b: &[u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni {
        // SAFETY: Isa::Avx512Vnni is only chosen where the CPU has AVX-512
        // F as well as AVX2, FMA and F16C (`available`); the kernel reads
        // min(a.len(), b.len() / 2) elements.
        return unsafe { avx512::dot_f16(a, b) };
    }
    match isa.float_kernels() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2/F16C checked by available(); the kernel reads
        // min(a.len(), b.len() / 2) elements.
        Isa::Avx2 => unsafe { avx2::dot_f16(a, b) },
        Isa::Cranelift => generated().dot_f16(a, b),
        _ => a.iter().zip(b.chunks_exact(2)).map(|(&x, h)| x * half::f16::from_le_bytes([h[0], h[1]]).to_f32()).sum(),
    }
}

pub fn f16_to_f32(isa: Isa, src: &[u8], out: &mut [f32]) {
    match isa.float_kernels() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2/F16C checked by available(); the kernel converts
        // min(out.len(), src.len() / 2) elements.
        Isa::Avx2 => unsafe { avx2::f16_to_f32(src, out) },
        Isa::Cranelift => generated().f16_to_f32(src, out),
        _ => {
            for (o, h) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([h[0], h[1]]).to_f32();
            }
        }
    }
}

fn generated() -> &'static super::jit::DotJit {
    super::jit::DotJit::get().expect("Isa::Cranelift is available")
}

/// The plain dot product, in order (the interpreter's).
pub fn reference_dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// How far ahead one token's Q4_K and Q6_K dots prefetch their rows into
/// L2, in bytes: they compute little per byte, so they must cover the
/// DRAM's whole latency (the 2B4T f16 head, when it prefetched so: 35-37 ms
/// a token with 1 KB, 29-36 with 2 KB; it now prefetches as the ternary
/// kernels do, [`super::prefetch_stream`]).
#[cfg(target_arch = "x86_64")]
const PREFETCH_ONE_TOKEN: usize = super::STREAM_PREFETCH;

/// Prefetches the line at `at` into L2: at the DRAM's speed the L1's miss
/// buffers are the limit (13% faster than into L1 on the 8-token head).
/// Near a row's end the address runs on into the next row, or wherever
/// the caller reads next; an address past the matrix is harmless.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(at: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T2};
    // SAFETY: a prefetch reads nothing and cannot fault.
    unsafe { _mm_prefetch::<_MM_HINT_T2>(at as *const i8) };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// [`super::avx2::dot_f16_block`] sixteen lanes wide: `R·T` of the 32
    /// registers accumulate, each token's activations are loaded once per
    /// 16 weights and used for all `R` rows.
    #[target_feature(enable = "avx512f,f16c,fma,avx2")]
    pub unsafe fn dot_f16_block<const R: usize, const T: usize>(w: [&[u8]; R], x: [&[f32]; T], ahead: usize, acc: &mut super::GroupAcc) {
        let n = x[0].len();
        let mut a: [[__m512; T]; R] = std::array::from_fn(|r| std::array::from_fn(|t| _mm512_loadu_ps(acc[r][t].as_ptr())));
        let mut i = 0;
        while i < n {
            let wv: [__m512; R] = std::array::from_fn(|r| {
                super::prefetch(w[r].as_ptr().wrapping_add(2 * i + ahead));
                _mm512_cvtph_ps(_mm256_loadu_si256(w[r].as_ptr().add(2 * i) as *const __m256i))
            });
            for t in 0..T {
                let xv = _mm512_loadu_ps(x[t].as_ptr().add(i));
                for r in 0..R {
                    a[r][t] = _mm512_fmadd_ps(xv, wv[r], a[r][t]);
                }
            }
            i += 16;
        }
        for (acc, a) in acc.iter_mut().zip(&a) {
            for (acc, a) in acc.iter_mut().zip(a) {
                _mm512_storeu_ps(acc.as_mut_ptr(), *a);
            }
        }
    }

    /// [`super::avx2::dot_f16`] sixteen lanes wide, with the same sums:
    /// its four accumulators of eight lanes are the halves of two
    /// registers here, each lane meeting the same values in the same
    /// order, and added up as there.
    #[target_feature(enable = "avx512f,f16c,fma,avx2")]
    pub unsafe fn dot_f16(a: &[f32], b: &[u8]) -> f32 {
        let n = a.len().min(b.len() / 2);
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let load = |i: usize| _mm512_cvtph_ps(_mm256_loadu_si256(pb.add(2 * i) as *const __m256i));
        // Lanes 0-7 of acc01 are AVX2's acc[0], 8-15 its acc[1].
        let (mut acc01, mut acc23) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 32 <= n {
            super::super::prefetch_stream::<1>(pb.wrapping_add(2 * i));
            acc01 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), load(i), acc01);
            acc23 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 16)), load(i + 16), acc23);
            i += 32;
        }
        let half8 = |v: __m512, hi: bool| if hi { _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))) } else { _mm512_castps512_ps256(v) };
        let mut acc0 = half8(acc01, false);
        while i + 8 <= n {
            let w = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(2 * i) as *const __m128i));
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), w, acc0);
            i += 8;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc0, half8(acc01, true)), _mm256_add_ps(half8(acc23, false), half8(acc23, true)));
        let mut s = super::avx2::hsum(sum);
        while i < n {
            s += a[i] * half::f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32();
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn sum16(lanes: &[f32; 16]) -> f32 {
        _mm512_reduce_add_ps(_mm512_loadu_ps(lanes.as_ptr()))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use bitnet_ir::interp::WeightView;
    use bitnet_ir::quant::{dequantize_blocks, BlockQ4K, BlockQ6K, BlockQ8_0, QuantBlock};
    use bitnet_ir::DType;
    use std::arch::x86_64::*;

    /// Row `r` of a block-quantized `w` dequantized by the IR's own code
    /// (the reference: the same values, bit for bit), inlined here to be
    /// vectorized with AVX2 rather than the baseline's SSE2.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dequantize(w: &WeightView, r: usize, out: &mut [f32]) {
        let row = w.row(r);
        match row.dtype {
            DType::Q6K => dequantize_blocks::<BlockQ6K>(row.bytes, out),
            DType::Q4K => dequantize_blocks::<BlockQ4K>(row.bytes, out),
            DType::Q8_0 => dequantize_blocks::<BlockQ8_0>(row.bytes, out),
            _ => row.dequantize(out),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// Four independent accumulators of eight lanes, then the tail in order.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8 * j)), _mm256_loadu_ps(pb.add(i + 8 * j)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        while i < n {
            s += a[i] * b[i];
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(a: &[f32], b: &[u8]) -> f32 {
        let n = a.len().min(b.len() / 2);
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let load = |i: usize| _mm256_cvtph_ps(_mm_loadu_si128(pb.add(2 * i) as *const __m128i));
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            // One cache line a pass; past the row's end into the next
            // row, which a worker's contiguous rows read next.
            super::super::prefetch_stream::<1>(pb.wrapping_add(2 * i));
            for (j, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8 * j)), load(i + 8 * j), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), load(i), acc[0]);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        while i < n {
            s += a[i] * half::f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32();
            i += 1;
        }
        s
    }

    /// `Σ a·w` for a row `w` of Q6_K blocks, each weight dequantized in
    /// registers to the value `BlockQ6K::dequantize` gives it (the 6-bit
    /// code less 32, times its sub-block's `d · scale`: exact in f32) and
    /// multiplied in f32, so one token reads the row's 210 bytes a 256
    /// values and nothing else. Whole blocks only (rows are).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q6k(a: &[f32], w: &[u8]) -> f32 {
        let blocks = (a.len() / BlockQ6K::ELEMS).min(w.len() / BlockQ6K::BYTES);
        debug_assert!(a.len() == w.len() / BlockQ6K::BYTES * BlockQ6K::ELEMS, "q6_k dot: whole blocks");
        let (low, two_bits, thirty_two) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3), _mm256_set1_epi8(32));
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..blocks {
            let blk = w.as_ptr().add(b * BlockQ6K::BYTES);
            prefetch_block(blk, BlockQ6K::BYTES);
            // ql[128], qh[64], scales[16] (i8), d (f16): BlockQ6K's bytes.
            let (scales, d) = (blk.add(192) as *const i8, f16_bits_at(blk.add(208)));
            let x = a.as_ptr().add(b * BlockQ6K::ELEMS);
            for half in 0..2 {
                let ql = [0, 32].map(|o| _mm256_loadu_si256(blk.add(64 * half + o) as *const __m256i));
                let qh = _mm256_loadu_si256(blk.add(128 + 32 * half) as *const __m256i);
                for quarter in 0..4 {
                    let src = ql[quarter % 2];
                    let nibble = _mm256_and_si256(if quarter < 2 { src } else { _mm256_srli_epi16::<4>(src) }, low);
                    let high = _mm256_and_si256(shift_right(qh, 2 * quarter as i32), two_bits);
                    let q = _mm256_sub_epi8(_mm256_or_si256(nibble, _mm256_slli_epi16::<4>(high)), thirty_two);
                    for sub in 0..2 {
                        let step = _mm256_set1_ps(d * *scales.add(8 * half + 2 * quarter + sub) as f32);
                        let codes = if sub == 0 { _mm256_castsi256_si128(q) } else { _mm256_extracti128_si256::<1>(q) };
                        let at = x.add(128 * half + 32 * quarter + 16 * sub);
                        for (e, codes) in [codes, _mm_srli_si128::<8>(codes)].into_iter().enumerate() {
                            let weights = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes)), step);
                            let acc = &mut acc[2 * sub + e];
                            *acc = _mm256_fmadd_ps(weights, _mm256_loadu_ps(at.add(8 * e)), *acc);
                        }
                    }
                }
            }
        }
        hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
    }

    /// `Σ a·w` for a row `w` of Q4_K blocks, each weight made in registers
    /// as `BlockQ4K::dequantize` makes it (`d·scale·q`, exact, less
    /// `dmin·min`: one rounding either way) and multiplied in f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4k(a: &[f32], w: &[u8]) -> f32 {
        debug_assert!(a.len() == w.len() / BlockQ4K::BYTES * BlockQ4K::ELEMS, "q4_k dot: whole blocks");
        let blocks = (a.len() / BlockQ4K::ELEMS).min(w.len() / BlockQ4K::BYTES);
        let low = _mm_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..blocks {
            // d, dmin (f16), scales[12], qs[128]: BlockQ4K's bytes.
            let blk = w.as_ptr().add(b * BlockQ4K::BYTES);
            prefetch_block(blk, BlockQ4K::BYTES);
            let (d, dmin) = (f16_bits_at(blk), f16_bits_at(blk.add(2)));
            let scales = &*(blk.add(4) as *const [u8; 12]);
            let qs = blk.add(16);
            let x = a.as_ptr().add(b * BlockQ4K::ELEMS);
            // Each 64 values: 32 bytes, their low nibbles then their high ones.
            for chunk in 0..4 {
                for (high, j) in [(false, 2 * chunk), (true, 2 * chunk + 1)] {
                    let (scale, min) = BlockQ4K::scale_min(scales, j);
                    let (step, offset) = (_mm256_set1_ps(d * scale as f32), _mm256_set1_ps(dmin * min as f32));
                    for half in 0..2 {
                        let bytes = _mm_loadu_si128(qs.add(32 * chunk + 16 * half) as *const __m128i);
                        let q = _mm_and_si128(if high { _mm_srli_epi16::<4>(bytes) } else { bytes }, low);
                        let at = x.add(64 * chunk + 32 * high as usize + 16 * half);
                        for (e, q) in [q, _mm_srli_si128::<8>(q)].into_iter().enumerate() {
                            let weights = _mm256_sub_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q)), step), offset);
                            let acc = &mut acc[2 * half + e];
                            *acc = _mm256_fmadd_ps(weights, _mm256_loadu_ps(at.add(8 * e)), *acc);
                        }
                    }
                }
            }
        }
        hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
    }

    /// Prefetches the `bytes` of the block that lies
    /// [`super::PREFETCH_ONE_TOKEN`] past `blk` (in this row or the next:
    /// a worker's rows are contiguous), into L2 (`prefetcht2`).
    #[inline(always)]
    fn prefetch_block(blk: *const u8, bytes: usize) {
        let ahead = blk.wrapping_add(super::PREFETCH_ONE_TOKEN);
        for line in (0..bytes).step_by(64) {
            // SAFETY: a prefetch reads nothing and cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_T2>(ahead.wrapping_add(line) as *const i8) };
        }
    }

    /// The f16 at `p` (little-endian, unaligned) as f32.
    #[target_feature(enable = "f16c")]
    #[inline]
    unsafe fn f16_bits_at(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// Each 16-bit lane of `v` shifted right by `n` bits (0, 2, 4 or 6).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn shift_right(v: __m256i, n: i32) -> __m256i {
        _mm256_srl_epi16(v, _mm_cvtsi32_si128(n))
    }

    /// `acc[j][i] += x[i] · w[j]` lane by lane for `R` rows of f16 bytes
    /// and `T` tokens over one k-block: each eight weights are converted
    /// once and used `T` times, `R·T` accumulators in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16_block<const R: usize, const T: usize>(w: [&[u8]; R], x: [&[f32]; T], ahead: usize, acc: &mut super::GroupAcc) {
        let n = x[0].len();
        let mut a: [[__m256; T]; R] = std::array::from_fn(|r| std::array::from_fn(|t| _mm256_loadu_ps(acc[r][t].as_ptr())));
        let mut i = 0;
        while i < n {
            let xs: [__m256; T] = std::array::from_fn(|t| _mm256_loadu_ps(x[t].as_ptr().add(i)));
            for (a, w) in a.iter_mut().zip(&w) {
                if i % 32 == 0 {
                    super::prefetch(w.as_ptr().wrapping_add(2 * i + ahead));
                }
                let wv = _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(2 * i) as *const __m128i));
                for (a, xv) in a.iter_mut().zip(&xs) {
                    *a = _mm256_fmadd_ps(*xv, wv, *a);
                }
            }
            i += 8;
        }
        for (acc, a) in acc.iter_mut().zip(&a) {
            for (acc, a) in acc.iter_mut().zip(a) {
                _mm256_storeu_ps(acc.as_mut_ptr(), *a);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sum8(lanes: &[f32; 16]) -> f32 {
        hsum(_mm256_loadu_ps(lanes.as_ptr()))
    }

    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn f16_to_f32(src: &[u8], out: &mut [f32]) {
        let n = out.len().min(src.len() / 2);
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().add(2 * i) as *const __m128i)));
            i += 8;
        }
        for j in i..n {
            out[j] = half::f16::from_le_bytes([src[2 * j], src[2 * j + 1]]).to_f32();
        }
    }
}
