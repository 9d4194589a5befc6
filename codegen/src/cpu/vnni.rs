//! Ternary dot kernels for AVX-512 VNNI. `vpdpbusd` multiplies unsigned
//! bytes by signed bytes and adds each four products into a 32-bit lane:
//! one instruction for what AVX2 does with `pmaddubsw`, `paddw` and
//! `pmaddwd`, on twice the width. A row's 32 packed bytes (one chunk of
//! 128 weights, four 2-bit fields per byte; the layout of [`super::ternary`])
//! go into both halves of a 512-bit register, shifted by 6 in the low half
//! and 4 in the high one (fields 0 and 1: weights 0–63), then by 2 and 0
//! (weights 64–127), and masked to one code per byte: each register then
//! meets 64 consecutive activations. The sums are of codes (0, 1, 2) times
//! activations, as every ternary kernel's are; the caller subtracts `Σx`.
//!
//! The default where the CPU has it ([`super::Isa::best`]); the kernel
//! tests compare it with the reference on every CPU that has it.

use super::ternary::{for_tile_shape, prefetch_ahead, QuantActs, CHUNK, CHUNK_BYTES};
use std::arch::x86_64::*;

/// `out[r][j]` = row `r` of the tile · token `tok + j`, for `rows × step`.
pub(super) fn dots(rows: usize, step: usize, tile: &[u8], chunks: usize, x: &QuantActs, tok: usize, out: &mut [[i32; 4]; 4]) {
    assert!(tile.len() == chunks * rows * CHUNK_BYTES && x.kp >= chunks * CHUNK && tok + step <= x.tokens(), "vnni dots: mismatched operands");
    let xs = x.step_rows(tok, step);
    // SAFETY: `matmul` checked that the CPU has AVX-512 F, BW and VNNI;
    // the lengths are checked above.
    unsafe { for_tile_shape!(rows, step, run(tile, chunks, &xs, out)) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn run<const R: usize, const T: usize>(tile: &[u8], chunks: usize, xs: &[*const i8; 4], out: &mut [[i32; 4]; 4]) {
    let mask = _mm512_set1_epi8(3);
    // Shift counts per 16-bit lane: fields 0 | 1, then fields 2 | 3.
    let low_fields = _mm512_inserti64x4::<1>(_mm512_set1_epi16(6), _mm256_set1_epi16(4));
    let high_fields = _mm512_inserti64x4::<1>(_mm512_set1_epi16(2), _mm256_set1_epi16(0));
    let mut acc = [[_mm512_setzero_si512(); T]; R];
    let w = tile.as_ptr();
    for c in 0..chunks {
        prefetch_ahead(w, c, R);
        // Each token's 128 activations, loaded once for all the tile's rows.
        let x: [[__m512i; 2]; T] = std::array::from_fn(|j| {
            let xp = xs[j].add(c * CHUNK);
            [_mm512_loadu_si512(xp as *const __m512i), _mm512_loadu_si512(xp.add(64) as *const __m512i)]
        });
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let packed = _mm512_broadcast_i64x4(_mm256_loadu_si256(w.add((c * R + r) * CHUNK_BYTES) as *const __m256i));
            let codes_lo = _mm512_and_si512(_mm512_srlv_epi16(packed, low_fields), mask);
            let codes_hi = _mm512_and_si512(_mm512_srlv_epi16(packed, high_fields), mask);
            for (a, x) in acc_r.iter_mut().zip(&x) {
                *a = _mm512_dpbusd_epi32(*a, codes_lo, x[0]);
                *a = _mm512_dpbusd_epi32(*a, codes_hi, x[1]);
            }
        }
    }
    for r in 0..R {
        for j in 0..T {
            out[r][j] = _mm512_reduce_add_epi32(acc[r][j]);
        }
    }
}
