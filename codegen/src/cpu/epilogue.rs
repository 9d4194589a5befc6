//! What happens to the ternary products' integer sums on their way out:
//! `((dot − Σx) · β) / γ`, then the node's scale and residual. [`finish`]
//! is the interpreter's arithmetic for one token and four rows;
//! [`finish_block`] does a kernel call's whole block of up to four tokens,
//! on AVX-512 as one register where the block is whole (sixteen lanes, one
//! division, where four tokens one at a time took about a hundred
//! instructions). On AVX2, [`finish_blocks`] finishes a pair of tokens as
//! one register, and a gated unit's epilogue ([`finish_glu_blocks`])
//! finishes many pairs before their units, so that the units' long chains
//! overlap. All of them take the same IEEE steps in the same
//! order, so the same bits.

use super::ternary::{PackedTernary, QuantActs};
use super::{vmath, Isa};
use bitnet_ir::GateAct;

/// What happens to each result: `((dot · β) / γ) · scale + residual`.
#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    pub scale: Option<f32>,
    /// `[tokens, n]`, added last.
    pub residual: Option<&'a [f32]>,
}

/// The epilogue of one token `t`'s results for the rows `n..n + 4` of a
/// tile (`dots[r]` for row `n + r`; rows past the matrix are computed and
/// dropped). Four lanes at a time, so that the compiler keeps them in one
/// vector (a scalar loop waited on each division in turn); each lane is
/// the interpreter's arithmetic, IEEE division included.
#[inline(always)]
pub fn finish(dots: [i32; 4], x: &QuantActs, t: usize, w: &PackedTernary, ep: &Epilogue, n: usize) -> [f32; 4] {
    let (sum, gamma) = (x.sum[t], x.gamma[t]);
    let mut v = [0f32; 4];
    for r in 0..4 {
        v[r] = ((dots[r] - sum) as f32 * w.scale) / gamma;
    }
    if let Some(s) = ep.scale {
        for v in &mut v {
            *v *= s;
        }
    }
    if let Some(res) = ep.residual {
        let at = t * w.n + n;
        let add: [f32; 4] = match res.get(at..at + 4) {
            Some(four) if w.n - n >= 4 => four.try_into().expect("four values"),
            _ => std::array::from_fn(|r| if n + r < w.n { res[at + r] } else { 0.0 }),
        };
        for r in 0..4 {
            v[r] += add[r];
        }
    }
    v
}

/// The epilogue of a kernel call's block: `dots[r][j]` for row `n + r` and
/// token `tok + j`, `j < step`; the results by token (`[j][r]`, as they
/// are stored), each lane as [`finish`] computes it. Lanes of tokens past
/// `step` are left zero.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn finish_block(isa: Isa, dots: &[[i32; 4]; 4], step: usize, x: &QuantActs, tok: usize, w: &PackedTernary, ep: &Epilogue, n: usize) -> [[f32; 4]; 4] {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni && step == 4 && w.n - n >= 4 {
        // SAFETY: the ISA is only chosen where the CPU has AVX-512 F; the
        // block is whole (four tokens, four rows that exist).
        return unsafe { avx512::whole_block(dots, x, tok, w, ep, n) };
    }
    let _ = isa;
    let mut out = [[0f32; 4]; 4];
    for (j, o) in out.iter_mut().enumerate().take(step) {
        *o = finish(std::array::from_fn(|r| dots[r][j]), x, tok + j, w, ep, n);
    }
    out
}

/// One kernel call's place, rows `n..n + 4` of a tile against tokens
/// `tok..tok + tokens`, and where its results go: token `tok + j`'s `len`
/// values (the tile's rows that exist) at `first + j · stride`.
pub(super) struct Block {
    pub(super) tok: usize,
    pub(super) tokens: usize,
    pub(super) n: usize,
    pub(super) first: *mut f32,
    pub(super) stride: usize,
    pub(super) len: usize,
}

impl Block {
    /// Token `tok + j`'s results, `j < tokens`, by tile row.
    pub(super) fn store(&mut self, by_token: &[[f32; 4]; 4]) {
        for (j, &v) in by_token.iter().enumerate().take(self.tokens) {
            // SAFETY: the products make each block of a tile's rows and
            // tokens inside `out` and hand it to one worker alone.
            store(unsafe { std::slice::from_raw_parts_mut(self.first.add(j * self.stride), self.len) }, v);
        }
    }
}

/// Finishes and stores each `(dots, block)` of a tile: [`finish_block`],
/// on AVX2 two tokens at a time where it can (the same bits).
pub(super) fn finish_blocks<'a>(isa: Isa, x: &QuantActs, w: &PackedTernary, ep: &Epilogue, blocks: impl Iterator<Item = (&'a [[i32; 4]; 4], Block)>) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        // SAFETY: Isa::Avx2 is only chosen where the CPU has AVX2.
        return unsafe { avx2::blocks(x, w, ep, blocks) };
    }
    for (dots, mut block) in blocks {
        block.store(&finish_block(isa, dots, block.tokens, x, block.tok, w, ep, block.n));
    }
}

/// A gated unit of two products, `act(gate) · up`: each matrix with the
/// epilogue that finishes its sums.
#[derive(Clone, Copy)]
pub(super) struct GluUnit<'a> {
    pub(super) act: GateAct,
    pub(super) gate: (&'a PackedTernary, &'a Epilogue<'a>),
    pub(super) up: (&'a PackedTernary, &'a Epilogue<'a>),
}

/// One kernel call's sums of a gated unit's gate and up, and its block.
pub(super) type GluSums<'a> = (&'a [[i32; 4]; 4], &'a [[i32; 4]; 4], Block);

/// Finishes and stores each block of a tile of a gated unit's products:
/// `act(gate) · up` of [`finish_block`]'s results. On AVX2 many pairs of
/// tokens at once, each pair as one register from the sums to the unit;
/// the bits are the same.
pub(super) fn finish_glu_blocks<'a>(isa: Isa, unit: GluUnit, x: &QuantActs, blocks: impl Iterator<Item = GluSums<'a>>) {
    // AVX-512 VNNI keeps its sixteen-lane blocks: the batch was measured
    // on an AVX2-only CPU alone.
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        // SAFETY: Isa::Avx2 is only chosen where the CPU has AVX2.
        return unsafe { avx2::glu_blocks(unit, x, blocks) };
    }
    for (g, u, mut block) in blocks {
        block.store(&finish_glu_block(isa, &unit, (g, u), &block, x));
    }
}

/// One block of [`finish_glu_blocks`], by token.
#[inline(always)]
fn finish_glu_block(isa: Isa, unit: &GluUnit, (g, u): (&[[i32; 4]; 4], &[[i32; 4]; 4]), block: &Block, x: &QuantActs) -> [[f32; 4]; 4] {
    let (step, tok, n, act) = (block.tokens, block.tok, block.n, unit.act);
    let g = finish_block(isa, g, step, x, tok, unit.gate.0, unit.gate.1, n);
    let u = finish_block(isa, u, step, x, tok, unit.up.0, unit.up.1, n);
    let mut v = [[0f32; 4]; 4];
    match step {
        1 => v[0] = vmath::glu4(isa, act, g[0], u[0]),
        _ => vmath::glu(isa, act, g[..step].as_flattened(), u[..step].as_flattened(), v[..step].as_flattened_mut()),
    }
    v
}

/// [`finish`] of one token `t`'s sums for a run of rows `n..n + out.len()`
/// (`sums[i]` for row `n + i`; any past `out.len()` are ignored): a run of
/// tiles' epilogues at once, the rows in the vector's lanes (sixteen on
/// AVX-512, eight on AVX2: the same code compiled for each). Each lane is
/// [`finish`]'s arithmetic in its order, so the bits are the same.
#[allow(clippy::too_many_arguments)]
pub fn finish_rows(isa: Isa, sums: &[i32], x: &QuantActs, t: usize, w: &PackedTernary, ep: &Epilogue, n: usize, out: &mut [f32]) {
    let residual = ep.residual.map(|r| &r[t * w.n + n..t * w.n + n + out.len()]);
    let run = RowRun { sums: &sums[..out.len()], sum: x.sum[t], gamma: x.gamma[t], beta: w.scale, scale: ep.scale, residual };
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: Isa::Avx512Vnni is only chosen where the CPU has AVX-512 F.
        Isa::Avx512Vnni => return unsafe { wide::avx512(run, out) },
        // SAFETY: Isa::Avx2 is only chosen where the CPU has AVX2.
        Isa::Avx2 => return unsafe { wide::avx2(run, out) },
        _ => {}
    }
    let _ = isa;
    finish_plain(run, out)
}

/// What [`finish_rows`] finishes: the sums, the token's `Σx` and γ, the
/// matrix's β, and the epilogue's scale and residual (the run's own rows).
#[derive(Clone, Copy)]
struct RowRun<'a> {
    sums: &'a [i32],
    sum: i32,
    gamma: f32,
    beta: f32,
    scale: Option<f32>,
    residual: Option<&'a [f32]>,
}

/// [`finish_rows`]' loop, one per epilogue so that each vectorizes.
#[inline(always)]
fn finish_plain(run: RowRun, out: &mut [f32]) {
    let RowRun { sums, sum, gamma, beta, .. } = run;
    let base = |d: i32| ((d - sum) as f32 * beta) / gamma;
    let rows = out.iter_mut().zip(sums);
    match (run.scale, run.residual) {
        (None, None) => rows.for_each(|(o, &d)| *o = base(d)),
        (Some(s), None) => rows.for_each(|(o, &d)| *o = base(d) * s),
        (None, Some(res)) => rows.zip(res).for_each(|((o, &d), &r)| *o = base(d) + r),
        (Some(s), Some(res)) => rows.zip(res).for_each(|((o, &d), &r)| *o = base(d) * s + r),
    }
}

#[cfg(target_arch = "x86_64")]
mod wide {
    use super::{finish_plain, RowRun};

    #[target_feature(enable = "avx512f,avx2")]
    pub(super) unsafe fn avx512(run: RowRun, out: &mut [f32]) {
        finish_plain(run, out)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2(run: RowRun, out: &mut [f32]) {
        finish_plain(run, out)
    }
}

/// Writes a tile's four results, or those of its rows that exist: a
/// fixed-size store where all four do (a slice of run-time length would
/// be a call to `memcpy` per tile and token).
#[inline(always)]
pub fn store(out: &mut [f32], v: [f32; 4]) {
    match <&mut [f32; 4]>::try_from(&mut *out) {
        Ok(four) => *four = v,
        Err(_) => out.copy_from_slice(&v[..out.len()]),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Epilogue, PackedTernary, QuantActs};
    use std::arch::x86_64::*;

    /// [`super::finish`] of four tokens at once: lane `4r + j` (row `r`,
    /// token `j`, as the kernels leave them) until the transpose, lane
    /// `4j + r` after it, where the residual is added and the results stored.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; `tok + 4 ≤ x.tokens()` and `n + 4 ≤ w.n`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn whole_block(dots: &[[i32; 4]; 4], x: &QuantActs, tok: usize, w: &PackedTernary, ep: &Epilogue, n: usize) -> [[f32; 4]; 4] {
        let sums = &x.sum[tok..tok + 4];
        let gammas = &x.gamma[tok..tok + 4];
        let d = _mm512_loadu_si512(dots.as_ptr() as *const __m512i);
        let sum = _mm512_broadcast_i32x4(_mm_loadu_si128(sums.as_ptr() as *const __m128i));
        let gamma = _mm512_broadcast_f32x4(_mm_loadu_ps(gammas.as_ptr()));
        let mut v = _mm512_div_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d, sum)), _mm512_set1_ps(w.scale)), gamma);
        if let Some(s) = ep.scale {
            v = _mm512_mul_ps(v, _mm512_set1_ps(s));
        }
        v = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), v);
        if let Some(res) = ep.residual {
            let row = |j: usize| {
                let at = (tok + j) * w.n + n;
                _mm_loadu_ps(res[at..at + 4].as_ptr())
            };
            let low = _mm512_insertf32x4::<1>(_mm512_castps128_ps512(row(0)), row(1));
            let all = _mm512_insertf32x4::<3>(_mm512_insertf32x4::<2>(low, row(2)), row(3));
            v = _mm512_add_ps(v, all);
        }
        let mut out = [[0f32; 4]; 4];
        _mm512_storeu_ps(out.as_mut_ptr() as *mut f32, v);
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::vmath;
    use super::super::Isa;
    use super::{finish_glu_block, Block, Epilogue, GluSums, GluUnit, PackedTernary, QuantActs};
    use std::arch::x86_64::*;

    /// [`super::finish`] of tokens `tok + j` and `tok + j + 1` (`j` 0 or 2)
    /// of a block, eight lanes, by token (`[j][r]`). The sums enter with
    /// rows 0 and 2 in the low half and rows 1 and 3 in the high one
    /// (`j0 j1 j0 j1`, so that a token's `Σx` and γ repeat every two
    /// lanes); the permutation to token order comes before the residual.
    ///
    /// # Safety
    /// The CPU has AVX2 (and `tok + j + 2 ≤ x.tokens()`, `n + 4 ≤ w.n`,
    /// which the indexing checks). Only called from AVX2 functions, into
    /// which it inlines (a function of its own, even one compiled for
    /// AVX2, cost a call and a trip through memory each time).
    #[inline(always)]
    unsafe fn finish_pair(dots: &[[i32; 4]; 4], j: usize, x: &QuantActs, tok: usize, w: &PackedTernary, ep: &Epilogue, n: usize) -> __m256 {
        debug_assert!(j == 0 || j == 2, "a pair starts at token 0 or 2 of a block");
        let rows01 = _mm256_loadu_si256(dots.as_ptr() as *const __m256i);
        let rows23 = _mm256_loadu_si256(dots[2..].as_ptr() as *const __m256i);
        let d = if j == 0 { _mm256_unpacklo_epi64(rows01, rows23) } else { _mm256_unpackhi_epi64(rows01, rows23) };
        let (t0, t1) = (tok + j, tok + j + 1);
        let (s0, s1, g0, g1) = (x.sum[t0], x.sum[t1], x.gamma[t0], x.gamma[t1]);
        let sum = _mm256_setr_epi32(s0, s1, s0, s1, s0, s1, s0, s1);
        let gamma = _mm256_setr_ps(g0, g1, g0, g1, g0, g1, g0, g1);
        let mut v = _mm256_div_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(d, sum)), _mm256_set1_ps(w.scale)), gamma);
        if let Some(s) = ep.scale {
            v = _mm256_mul_ps(v, _mm256_set1_ps(s));
        }
        v = _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 4, 2, 6, 1, 5, 3, 7));
        if let Some(res) = ep.residual {
            let row = |t: usize| _mm_loadu_ps(res[t * w.n + n..t * w.n + n + 4].as_ptr());
            v = _mm256_add_ps(v, _mm256_set_m128(row(t1), row(t0)));
        }
        v
    }

    /// Whether a block goes in pairs of tokens as eight lanes: four rows
    /// that exist, an even number of tokens.
    fn in_pairs(block: &Block) -> bool {
        block.tokens.is_multiple_of(2) && block.len == 4
    }

    /// Stores a pair's results: the first token's four at `first`, the
    /// second's `stride` further.
    ///
    /// # Safety
    /// The CPU has AVX2; the products make each block of a tile's rows and
    /// tokens inside `out`, four rows of two tokens here, and hand it to
    /// one worker alone.
    #[inline(always)]
    unsafe fn store_pair(v: __m256, first: *mut f32, stride: usize) {
        _mm_storeu_ps(first, _mm256_castps256_ps128(v));
        _mm_storeu_ps(first.add(stride), _mm256_extractf128_ps::<1>(v));
    }

    /// [`super::finish_blocks`] on AVX2: pairs of tokens of four rows that
    /// exist as eight lanes, where [`super::finish_block`] takes each
    /// token's four; other blocks (one token, tiles of one or two rows, a
    /// matrix's last rows) as it does.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn blocks<'a>(x: &QuantActs, w: &PackedTernary, ep: &Epilogue, blocks: impl Iterator<Item = (&'a [[i32; 4]; 4], Block)>) {
        for (dots, mut block) in blocks {
            if !in_pairs(&block) {
                block.store(&super::finish_block(Isa::Avx2, dots, block.tokens, x, block.tok, w, ep, block.n));
                continue;
            }
            for j in (0..block.tokens).step_by(2) {
                store_pair(finish_pair(dots, j, x, block.tok, w, ep, block.n), block.first.add(j * block.stride), block.stride);
            }
        }
    }

    /// Pairs of tokens that [`glu_blocks`] finishes before their gated
    /// units: each unit is a long chain of dependent steps (a division,
    /// the exponential, another division), and with one block's pair at a
    /// time the chains did not overlap. Finishing a tile's blocks one at a
    /// time took about 11% of a `[6912, 2560]` gated unit on 128 tokens,
    /// eight at a time about 3.5% (docs/performance.md, session of 2026-12-07,
    /// twenty-second).
    const BATCH: usize = 8;

    /// [`super::finish_glu_blocks`] on AVX2: pairs of tokens of four rows
    /// that exist [`BATCH`] at a time, each as eight lanes; other blocks
    /// (one token, tiles of one or two rows, a matrix's last rows) one at
    /// a time.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn glu_blocks<'a>(unit: GluUnit, x: &QuantActs, blocks: impl Iterator<Item = GluSums<'a>>) {
        let GluUnit { act, gate, up } = unit;
        let (mut gs, mut us) = ([_mm256_setzero_ps(); BATCH], [_mm256_setzero_ps(); BATCH]);
        // Where each pair's two tokens' results go: the first's, and the
        // distance to the second's.
        let mut dst = [(std::ptr::null_mut::<f32>(), 0usize); BATCH];
        let mut pending = 0;
        let flush = |gs: &[__m256; BATCH], us: &[__m256; BATCH], dst: &[(*mut f32, usize); BATCH], pending: usize| {
            for i in 0..pending {
                let (first, stride) = dst[i];
                store_pair(vmath::avx2::glu8(act, gs[i], us[i]), first, stride);
            }
        };
        for (g, u, mut block) in blocks {
            if !in_pairs(&block) {
                block.store(&finish_glu_block(Isa::Avx2, &unit, (g, u), &block, x));
                continue;
            }
            for j in (0..block.tokens).step_by(2) {
                gs[pending] = finish_pair(g, j, x, block.tok, gate.0, gate.1, block.n);
                us[pending] = finish_pair(u, j, x, block.tok, up.0, up.1, block.n);
                dst[pending] = (block.first.add(j * block.stride), block.stride);
                pending += 1;
                if pending == BATCH {
                    flush(&gs, &us, &dst, pending);
                    pending = 0;
                }
            }
        }
        flush(&gs, &us, &dst, pending);
    }
}
