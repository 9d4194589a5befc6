//! What happens to the ternary products' integer sums on their way out:
//! `((dot − Σx) · β) / γ`, then the node's scale and residual. [`finish`]
//! is the interpreter's arithmetic for one token and four rows;
//! [`finish_block`] does a kernel call's whole block of up to four tokens,
//! on AVX-512 as one register where the block is whole (sixteen lanes, one
//! division, where four tokens one at a time took about a hundred
//! instructions): the same IEEE steps in the same order, so the same bits.

use super::ternary::{PackedTernary, QuantActs};
use super::Isa;

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
