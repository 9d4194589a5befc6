//! The 1.6-bit ternary packing ([`super::ternary::Packing::Base3`]): five
//! codes a byte, and its AVX2 and AVX-512 VNNI dot kernels.
//!
//! Encoding (TQ1_0's). Five codes `c₀..c₄` (each 0, 1 or 2) are the base-3
//! number `v = Σ cᵢ·3⁴⁻ⁱ` (0..242), stored as `q = ⌈256·v / 243⌉`: `q/256`
//! is `v/243` rounded up, so multiplying by `3ⁱ` modulo 256 shifts digit
//! `i` to the top and `(m · 3) >> 8` reads it: `cᵢ = ((q·3ⁱ mod 256) · 3) >> 8`.
//! A chunk is 32 bytes, 160 weights: byte `j` holds weights `j + 32·i` as
//! digit `i`, so one digit of all 32 bytes is 32 consecutive codes.
//!
//! In registers, x86 has no byte multiply: each 16-bit lane's two bytes
//! are moved to its high byte in turn (the even byte shifted up, the odd
//! one masked), where `pmullw` by `3ⁱ` leaves `(q·3ⁱ mod 256) << 8` and
//! `pmulhuw` by 3 (by 768 for the odd byte, kept in the high byte) reads the
//! digit. That is six instructions a digit against the 2-bit packing's
//! two, for 20% fewer bytes: faster only where decode waits on memory and
//! the cores have cycles to spare, which the autotuner measures.

use super::ternary::CHUNK_BYTES;

/// Weights in one 32-byte chunk.
pub const CHUNK: usize = 160;

/// The byte holding five codes (each 0, 1 or 2), digit 0 the most significant.
pub fn encode(codes: [u8; 5]) -> u8 {
    let v = codes.iter().fold(0u32, |v, &c| {
        debug_assert!(c < 3, "a ternary code is 0, 1 or 2");
        v * 3 + c as u32
    });
    (v * 256).div_ceil(243) as u8
}

/// Digit `i` (0..5) of a byte [`encode`] wrote: the reference of every kernel.
pub fn decode(q: u8, i: usize) -> u8 {
    let m = q.wrapping_mul(3u8.pow(i as u32));
    ((m as u16 * 3) >> 8) as u8
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::*;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::ternary::{for_tile_shape, prefetch_ahead, QuantActs};
    use super::{CHUNK, CHUNK_BYTES};
    use std::arch::x86_64::*;

    /// `3ⁱ` for digit `i`, as 16-bit multipliers.
    const POW3: [i16; 5] = [1, 3, 9, 27, 81];

    /// The five digits of 32 packed bytes, each as 32 codes one per byte.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn digits_avx2(b: __m256i) -> [__m256i; 5] {
        let high = _mm256_set1_epi16(0xff00u16 as i16);
        let (three, three_high) = (_mm256_set1_epi16(3), _mm256_set1_epi16(768));
        let even = _mm256_slli_epi16::<8>(b);
        let odd = _mm256_and_si256(b, high);
        let mut out = [_mm256_setzero_si256(); 5];
        for (i, o) in out.iter_mut().enumerate() {
            let p = _mm256_set1_epi16(POW3[i]);
            let e = _mm256_mulhi_epu16(_mm256_mullo_epi16(even, p), three);
            let d = _mm256_and_si256(_mm256_mulhi_epu16(_mm256_mullo_epi16(odd, p), three_high), high);
            *o = _mm256_or_si256(e, d);
        }
        out
    }

    /// `out[r][j]` = row `r` of the tile · token `tok + j` (codes times
    /// activations, as every ternary kernel's sums are), on AVX2.
    pub(in super::super) fn avx2_dots(rows: usize, step: usize, tile: &[u8], chunks: usize, x: &QuantActs, tok: usize, out: &mut [[i32; 4]; 4]) {
        assert!(tile.len() == chunks * rows * CHUNK_BYTES && x.kp >= chunks * CHUNK && tok + step <= x.tokens(), "base3 dots: mismatched operands");
        let xs = x.step_rows(tok, step);
        // SAFETY: `matmul` checked that the CPU has AVX2; the lengths are checked above.
        unsafe { for_tile_shape!(rows, step, run_avx2(tile, chunks, &xs, out)) }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2<const R: usize, const T: usize>(tile: &[u8], chunks: usize, xs: &[*const i8; 4], out: &mut [[i32; 4]; 4]) {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); T]; R];
        let w = tile.as_ptr();
        for c in 0..chunks {
            prefetch_ahead(w, c, R);
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let codes = digits_avx2(_mm256_loadu_si256(w.add((c * R + r) * CHUNK_BYTES) as *const __m256i));
                for (j, a) in acc_r.iter_mut().enumerate() {
                    let xp = xs[j].add(c * CHUNK) as *const __m256i;
                    // |each| ≤ 2·2·128 = 512, five of them ≤ 2560: no i16 overflow.
                    let mut s = _mm256_maddubs_epi16(codes[0], _mm256_loadu_si256(xp));
                    for (i, &code) in codes.iter().enumerate().skip(1) {
                        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(code, _mm256_loadu_si256(xp.add(i))));
                    }
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(s, ones));
                }
            }
        }
        for r in 0..R {
            for j in 0..T {
                out[r][j] = hsum(acc[r][j]);
            }
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn hsum(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_hadd_epi32(s, s);
        _mm_cvtsi128_si32(_mm_hadd_epi32(s, s))
    }

    /// A tile's codes one per byte, in the order the unpacked prefill
    /// kernel reads (`ternary::avx2::unpack`): chunk by chunk, digit by
    /// digit, each digit's rows one after the other.
    ///
    /// # Safety
    /// The CPU has AVX2; `codes` holds five bytes for each of `tile`'s,
    /// which holds `chunks × rows` chunks.
    #[target_feature(enable = "avx2")]
    pub(in super::super) unsafe fn unpack_avx2(rows: usize, tile: &[u8], chunks: usize, codes: &mut [u8]) {
        debug_assert!(tile.len() == chunks * rows * CHUNK_BYTES && codes.len() == 5 * tile.len());
        let (src, dst) = (tile.as_ptr(), codes.as_mut_ptr());
        for c in 0..chunks {
            for r in 0..rows {
                let digits = digits_avx2(_mm256_loadu_si256(src.add((c * rows + r) * CHUNK_BYTES) as *const __m256i));
                for (i, d) in digits.into_iter().enumerate() {
                    _mm256_storeu_si256(dst.add(((c * 5 + i) * rows + r) * CHUNK_BYTES) as *mut __m256i, d);
                }
            }
        }
    }

    /// [`avx2_dots`] on AVX-512 VNNI: a row's 32 bytes go into both halves
    /// of a register, and each half yields another digit (0 | 1, 2 | 3,
    /// then 4 against activations whose high half is zero), so that each
    /// `vpdpbusd` meets 64 consecutive activations.
    pub(in super::super) fn vnni_dots(rows: usize, step: usize, tile: &[u8], chunks: usize, x: &QuantActs, tok: usize, out: &mut [[i32; 4]; 4]) {
        assert!(tile.len() == chunks * rows * CHUNK_BYTES && x.kp >= chunks * CHUNK && tok + step <= x.tokens(), "base3 vnni dots: mismatched operands");
        let xs = x.step_rows(tok, step);
        // SAFETY: `matmul` checked that the CPU has AVX-512 F, BW and VNNI;
        // the lengths are checked above.
        unsafe { for_tile_shape!(rows, step, run_vnni(tile, chunks, &xs, out)) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn run_vnni<const R: usize, const T: usize>(tile: &[u8], chunks: usize, xs: &[*const i8; 4], out: &mut [[i32; 4]; 4]) {
        let high = _mm512_set1_epi16(0xff00u16 as i16);
        let (three, three_high) = (_mm512_set1_epi16(3), _mm512_set1_epi16(768));
        let halves = |lo: i16, hi: i16| _mm512_inserti64x4::<1>(_mm512_set1_epi16(lo), _mm256_set1_epi16(hi));
        let pow = [halves(POW3[0], POW3[1]), halves(POW3[2], POW3[3]), _mm512_set1_epi16(POW3[4])];
        let mut acc = [[_mm512_setzero_si512(); T]; R];
        let w = tile.as_ptr();
        for c in 0..chunks {
            prefetch_ahead(w, c, R);
            // Each token's 160 activations, the last 32 zero-extended.
            let mut x = [[_mm512_setzero_si512(); 3]; T];
            for (j, xj) in x.iter_mut().enumerate() {
                let xp = xs[j].add(c * CHUNK);
                *xj = [
                    _mm512_loadu_si512(xp as *const __m512i),
                    _mm512_loadu_si512(xp.add(64) as *const __m512i),
                    _mm512_zextsi256_si512(_mm256_loadu_si256(xp.add(128) as *const __m256i)),
                ];
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let packed = _mm512_broadcast_i64x4(_mm256_loadu_si256(w.add((c * R + r) * CHUNK_BYTES) as *const __m256i));
                let even = _mm512_slli_epi16::<8>(packed);
                let odd = _mm512_and_si512(packed, high);
                for (p, pow) in pow.iter().enumerate() {
                    let e = _mm512_mulhi_epu16(_mm512_mullo_epi16(even, *pow), three);
                    let d = _mm512_and_si512(_mm512_mulhi_epu16(_mm512_mullo_epi16(odd, *pow), three_high), high);
                    let codes = _mm512_or_si512(e, d);
                    for (a, xj) in acc_r.iter_mut().zip(&x) {
                        *a = _mm512_dpbusd_epi32(*a, codes, xj[p]);
                    }
                }
            }
        }
        for r in 0..R {
            for j in 0..T {
                out[r][j] = _mm512_reduce_add_epi32(acc[r][j]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every one of the 243 code quintuples survives encoding.
    #[test]
    fn every_byte_decodes_to_its_codes() {
        for v in 0..243u32 {
            let codes: [u8; 5] = std::array::from_fn(|i| (v / 3u32.pow(4 - i as u32) % 3) as u8);
            let q = encode(codes);
            assert_eq!(std::array::from_fn::<u8, 5, _>(|i| decode(q, i)), codes, "v = {v}, q = {q}");
        }
    }
}
