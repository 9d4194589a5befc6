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
//! Tiles of an even number of rows and one or two tokens (decode) go
//! another way, with fewer instructions a byte: one 512-bit load holds the
//! same chunk of two rows (the layout keeps a tile's rows of a chunk side
//! by side), and each field is masked in place, unshifted, so that its codes
//! meet their activations scaled by 64, 16, 4 or 1. Each field then sums
//! into an accumulator of its own, divided back (exactly: every term is a
//! multiple) when the tile is done; a lane adds at most 4 · 128 · 128 a
//! chunk, so rows of up to four million weights stay inside i32. A mask
//! and a `vpdpbusd` per field and one load: 4.5 instructions for 128
//! weights, where shifting takes seven. Decode reads the weights once, so
//! this is the kernel that decides how close a decode step comes to the
//! memory's speed.
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
    unsafe {
        match (rows, step) {
            (2, 1) => row_pairs::<1, 1>(tile, chunks, &xs, out),
            (2, 2) => row_pairs::<1, 2>(tile, chunks, &xs, out),
            (4, 1) => row_pairs::<2, 1>(tile, chunks, &xs, out),
            (4, 2) => row_pairs::<2, 2>(tile, chunks, &xs, out),
            _ => for_tile_shape!(rows, step, run(tile, chunks, &xs, out)),
        }
    }
}

/// `P` pairs of rows against `T` tokens, each field's codes masked in place
/// (see the module's notes).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn row_pairs<const P: usize, const T: usize>(tile: &[u8], chunks: usize, xs: &[*const i8; 4], out: &mut [[i32; 4]; 4]) {
    let masks = field_masks();
    let mut acc = [[[_mm512_setzero_si512(); 4]; T]; P];
    let w = tile.as_ptr();
    for c in 0..chunks {
        prefetch_ahead(w, c, 2 * P);
        // Each field's 32 activations, in both halves: once for every pair.
        let x: [[__m512i; 4]; T] =
            std::array::from_fn(|j| std::array::from_fn(|f| _mm512_broadcast_i64x4(_mm256_loadu_si256(xs[j].add(c * CHUNK + 32 * f) as *const __m256i))));
        for (p, acc_p) in acc.iter_mut().enumerate() {
            let packed = _mm512_loadu_si512(w.add((c * 2 * P + 2 * p) * CHUNK_BYTES) as *const __m512i);
            for f in 0..4 {
                let codes = _mm512_and_si512(packed, masks[f]);
                for (a, x) in acc_p.iter_mut().zip(&x) {
                    a[f] = _mm512_dpbusd_epi32(a[f], codes, x[f]);
                }
            }
        }
    }
    store_pairs(&acc, out, 0);
}

/// One token's sums for a run of whole tiles of `rows` rows (2 or 4),
/// `sums.len() / rows` of them, from `tiles` (their bytes, one after
/// another): [`row_pairs`] for each, the loop over the tiles inside the
/// kernel, so that nothing but the stores of each tile's sums comes
/// between one tile's weights and the next's.
pub(super) fn run_sums(rows: usize, tiles: &[u8], chunks: usize, x: &QuantActs, sums: &mut [i32]) {
    assert!(
        matches!(rows, 2 | 4)
            && tiles.len() == sums.len() / rows * chunks * rows * CHUNK_BYTES
            && sums.len().is_multiple_of(rows)
            && x.kp >= chunks * CHUNK
            && x.tokens() >= 1,
        "vnni run_sums: mismatched operands"
    );
    let xs = x.step_rows(0, 1);
    // SAFETY: `matmul` checked that the CPU has AVX-512 F, BW and VNNI;
    // the lengths are checked above.
    unsafe {
        match rows {
            2 => pairs_run::<1>(tiles, chunks, &xs, sums),
            _ => pairs_run::<2>(tiles, chunks, &xs, sums),
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn pairs_run<const P: usize>(tiles: &[u8], chunks: usize, xs: &[*const i8; 4], sums: &mut [i32]) {
    let tile_bytes = chunks * 2 * P * CHUNK_BYTES;
    for (t, sums) in sums.chunks_exact_mut(2 * P).enumerate() {
        let mut out = [[0; 4]; 4];
        row_pairs::<P, 1>(&tiles[t * tile_bytes..(t + 1) * tile_bytes], chunks, xs, &mut out);
        for (s, row) in sums.iter_mut().zip(&out) {
            *s = row[0];
        }
    }
}

/// The sums of `P` pairs of rows' field accumulators against `T` tokens,
/// token `j`'s into `out[row][j0 + j]`: two pairs (four rows) in one fold,
/// one pair on its own.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn store_pairs<const P: usize, const T: usize>(acc: &[[[__m512i; 4]; T]; P], out: &mut [[i32; 4]; 4], j0: usize) {
    if P == 2 {
        for j in 0..T {
            let four = two_pair_sums(&acc[0][j], &acc[P - 1][j]);
            for (row, v) in out.iter_mut().zip(four) {
                row[j0 + j] = v;
            }
        }
        return;
    }
    for (p, acc_p) in acc.iter().enumerate() {
        for (j, fields) in acc_p.iter().enumerate() {
            [out[2 * p][j0 + j], out[2 * p + 1][j0 + j]] = pair_sums(fields);
        }
    }
}

/// The mask of each 2-bit field in place: field `f` (weights `32f..32f + 32`
/// of a chunk) is bits `7-2f:6-2f` of a byte.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn field_masks() -> [__m512i; 4] {
    std::array::from_fn(|f| _mm512_set1_epi8((0xC0u8 >> (2 * f)) as i8))
}

/// A pair of rows' two sums from its four field accumulators (scaled by
/// 64, 16, 4 and 1, divided back exactly): the low half's lanes are the
/// first row's, the high half's the second's.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pair_sums(fields: &[__m512i; 4]) -> [i32; 2] {
    let sums = unscaled(fields);
    [_mm512_mask_reduce_add_epi32(0x00FF, sums), _mm512_mask_reduce_add_epi32(0xFF00, sums)]
}

/// Two pairs of rows' four sums (rows 0 and 1 from `a`, 2 and 3 from `b`),
/// as [`pair_sums`] gives them, with the lanes of both added across at
/// once: 12 instructions where two `pair_sums` take about 40.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn two_pair_sums(a: &[__m512i; 4], b: &[__m512i; 4]) -> [i32; 4] {
    let (a, b) = (unscaled(a), unscaled(b));
    // 128-bit lanes: partial sums of rows 0, 1, 2 and 3.
    let rows = _mm512_add_epi32(_mm512_shuffle_i32x4::<0x88>(a, b), _mm512_shuffle_i32x4::<0xDD>(a, b));
    let rows = _mm512_add_epi32(rows, _mm512_shuffle_epi32::<0x4E>(rows));
    let rows = _mm512_add_epi32(rows, _mm512_shuffle_epi32::<0xB1>(rows));
    let mut out = [0i32; 4];
    _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, _mm512_castsi512_si128(_mm512_maskz_compress_epi32(0x1111, rows)));
    out
}

/// A pair's four field accumulators, each divided back by its scale and
/// added: the first row's partial sums in the low half, the second's in
/// the high one.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn unscaled([a0, a1, a2, a3]: &[__m512i; 4]) -> __m512i {
    _mm512_add_epi32(_mm512_add_epi32(_mm512_srai_epi32::<6>(*a0), _mm512_srai_epi32::<4>(*a1)), _mm512_add_epi32(_mm512_srai_epi32::<2>(*a2), *a3))
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
    if R == 4 && T == 4 {
        // Lane 4r + j is out[r][j]: the tile's sums in one store (which the
        // epilogue's one load then takes straight from the store buffer).
        _mm512_storeu_si512(out.as_mut_ptr() as *mut __m512i, sums_of_16(std::array::from_fn(|i| acc[i / 4][i % 4])));
        return;
    }
    for r in 0..R {
        for j in 0..T {
            out[r][j] = _mm512_reduce_add_epi32(acc[r][j]);
        }
    }
}

/// Lane `i` of the result is the sum of `a[i]`'s sixteen lanes: the sums
/// of a 4 × 4 tile in one register, added pairwise as a transpose goes
/// (45 instructions, where sixteen reductions take about 150).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn sums_of_16(a: [__m512i; 16]) -> __m512i {
    let fold = |x: __m512i, y: __m512i| _mm512_add_epi32(_mm512_unpacklo_epi32(x, y), _mm512_unpackhi_epi32(x, y));
    // Each 128-bit lane of `pairs[i]` holds partial sums of a[2i], a[2i + 1], a[2i], a[2i + 1].
    let pairs: [__m512i; 8] = std::array::from_fn(|i| fold(a[2 * i], a[2 * i + 1]));
    let fold = |x: __m512i, y: __m512i| _mm512_add_epi32(_mm512_unpacklo_epi64(x, y), _mm512_unpackhi_epi64(x, y));
    // Each 128-bit lane of `quads[i]` holds partial sums of a[4i..4i + 4].
    let quads: [__m512i; 4] = std::array::from_fn(|i| fold(pairs[2 * i], pairs[2 * i + 1]));
    // Then the four 128-bit lanes of each are added across.
    let fold = |x: __m512i, y: __m512i| _mm512_add_epi32(_mm512_shuffle_i32x4::<0x88>(x, y), _mm512_shuffle_i32x4::<0xDD>(x, y));
    fold(fold(quads[0], quads[1]), fold(quads[2], quads[3]))
}
