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
//! digit. AVX-512 VNNI needs no digits at all (see `vnni_dots`). Either
//! costs more instructions than the 2-bit packing's shift and mask, for
//! 20% fewer bytes: faster only where decode waits on memory and the
//! cores have cycles to spare, which the autotuner measures.

use super::ternary::{QuantActs, CHUNK_BYTES};

/// Weights in one 32-byte chunk.
pub const CHUNK: usize = 160;

/// The byte holding five codes (each 0, 1 or 2), digit 0 the most significant.
pub fn encode(codes: [u8; 5]) -> u8 {
    let v = codes.iter().fold(0u32, |v, &c| {
        debug_assert!(c < 3, "a ternary code is 0, 1 or 2");
        v * 3 + c as u32
    });
    from_number(v)
}

/// The byte of the base-3 number `v` (0..243) of five codes.
#[inline(always)]
pub fn from_number(v: u32) -> u8 {
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
    use super::{DigitActs, CHUNK, CHUNK_BYTES};
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

    /// [`avx2_dots`] on AVX-512 VNNI, without unpacking digits: with
    /// `tᵢ = ⌊q·3ⁱ⁺¹/256⌋` (one `pmulhuw` of the zero-extended bytes),
    /// digit `i` is `tᵢ − 3·tᵢ₋₁`, so `Σᵢ digitᵢ·xᵢ = Σᵢ tᵢ·(xᵢ − 3·xᵢ₊₁)`:
    /// the activations of [`DigitActs`] meet the `tᵢ` in `vpdpwssd` (16-bit
    /// products, wrapping 32-bit sums that end exact). Per chunk and row: a
    /// widening load, then five multiplies and five dot steps a token.
    pub(in super::super) fn vnni_dots(rows: usize, step: usize, tile: &[u8], chunks: usize, y: &DigitActs, tok: usize, out: &mut [[i32; 4]; 4]) {
        assert!(tile.len() == chunks * rows * CHUNK_BYTES && y.kp >= chunks * CHUNK && tok + step <= y.tokens(), "base3 vnni dots: mismatched operands");
        let ys: [*const i16; 4] = std::array::from_fn(|j| y.row(tok + j.min(step - 1)).as_ptr());
        // SAFETY: `matmul` checked that the CPU has AVX-512 F, BW and VNNI;
        // the lengths are checked above.
        unsafe { for_tile_shape!(rows, step, run_vnni(tile, chunks, &ys, out)) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn run_vnni<const R: usize, const T: usize>(tile: &[u8], chunks: usize, ys: &[*const i16; 4], out: &mut [[i32; 4]; 4]) {
        // 3ⁱ⁺¹·256: `pmulhuw` of q by it is ⌊q·3ⁱ⁺¹/256⌋.
        let mut pow = [_mm512_setzero_si512(); 5];
        for (i, p) in pow.iter_mut().enumerate() {
            *p = _mm512_set1_epi16((3u16.pow(i as u32 + 1) * 256) as i16);
        }
        let mut acc = [[_mm512_setzero_si512(); T]; R];
        let w = tile.as_ptr();
        for c in 0..chunks {
            prefetch_ahead(w, c, R);
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let q = _mm512_cvtepu8_epi16(_mm256_loadu_si256(w.add((c * R + r) * CHUNK_BYTES) as *const __m256i));
                for (i, p) in pow.iter().enumerate() {
                    let t = _mm512_mulhi_epu16(q, *p);
                    for (a, y) in acc_r.iter_mut().zip(ys) {
                        *a = _mm512_dpwssd_epi32(*a, t, _mm512_loadu_si512(y.add(c * CHUNK + 32 * i) as *const __m512i));
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
    /// Whether [`vbmi_dots`] runs tiles of `rows` here: pairs of rows, on a
    /// CPU with AVX-512 VBMI and VL (Ice Lake, Zen 4 and later; the
    /// unpacked GEMM's tail is a 256-bit `vpdpbusd`).
    pub(in super::super) fn has_vbmi_kernel(rows: usize) -> bool {
        rows >= 2 && is_x86_feature_detected!("avx512vbmi") && is_x86_feature_detected!("avx512vl")
    }

    /// `T[i][q]`: digit `i` of byte `q`, which [`LOW_FOUR`] is made of.
    static DIGITS: [[u8; 256]; 5] = {
        let mut t = [[0u8; 256]; 5];
        let mut q = 0;
        while q < 256 {
            let mut i = 0;
            let mut m = q as u8;
            while i < 5 {
                t[i][q] = ((m as u16 * 3) >> 8) as u8;
                m = m.wrapping_mul(3);
                i += 1;
            }
            q += 1;
        }
        t
    };

    /// [`avx2_dots`] on AVX-512 VBMI and VNNI, for tiles of 2 or 4 rows:
    /// one 64-byte load is a chunk of two rows. One lookup (two `vpermi2b`
    /// of 128 entries, the byte's top bit choosing which one writes) turns
    /// each byte into its digits 1–4 as 2-bit fields, which are masked in
    /// place as the 2-bit packing's decode kernel masks them (`super::super::vnni`:
    /// each field's codes scaled by 64, 16, 4 or 1, summed apart and divided
    /// back exactly); digit 0 is two compares ([`top_digit`]). `vpdpbusd`
    /// meets each digit with the chunk's 32 activations of that digit in
    /// both halves: the low half's sums are the first row's, the high
    /// half's the second's. Two shuffles for 320 weights (a lookup for
    /// digit 4 as well took four).
    pub(in super::super) fn vbmi_dots(rows: usize, step: usize, tile: &[u8], chunks: usize, x: &QuantActs, tok: usize, out: &mut [[i32; 4]; 4]) {
        assert!(
            has_vbmi_kernel(rows) && tile.len() == chunks * rows * CHUNK_BYTES && x.kp >= chunks * CHUNK && tok + step <= x.tokens(),
            "base3 vbmi dots: mismatched operands"
        );
        let xs = x.step_rows(tok, step);
        // SAFETY: the CPU has AVX-512 VBMI (checked above), F, BW and VNNI
        // (`matmul` checked); the lengths are checked above.
        unsafe {
            // Two tokens at most a pass: each takes four accumulators a pair.
            for j0 in (0..step).step_by(2) {
                match (rows, step - j0) {
                    (2, 1) => run_vbmi::<1, 1>(tile, chunks, &xs[j0..], j0, out),
                    (2, _) => run_vbmi::<1, 2>(tile, chunks, &xs[j0..], j0, out),
                    (4, 1) => run_vbmi::<2, 1>(tile, chunks, &xs[j0..], j0, out),
                    (4, _) => run_vbmi::<2, 2>(tile, chunks, &xs[j0..], j0, out),
                    _ => unreachable!("checked above; tiles are validated"),
                }
            }
        }
    }

    /// One token's sums for a run of whole tiles of `rows` rows (2 or 4),
    /// `sums.len() / rows` of them, from `tiles` (their bytes, one after
    /// another), as [`vbmi_dots`] gives each: the loop over the tiles inside
    /// the kernel (see `super::super::vnni::run_sums`).
    pub(in super::super) fn vbmi_run_sums(rows: usize, tiles: &[u8], chunks: usize, x: &QuantActs, sums: &mut [i32]) {
        assert!(
            has_vbmi_kernel(rows)
                && sums.len().is_multiple_of(rows)
                && tiles.len() == sums.len() / rows * chunks * rows * CHUNK_BYTES
                && x.kp >= chunks * CHUNK
                && x.tokens() >= 1,
            "base3 vbmi run sums: mismatched operands"
        );
        let xs = x.step_rows(0, 1);
        // SAFETY: the CPU has AVX-512 VBMI (checked above), F, BW and VNNI
        // (`matmul` checked); the lengths are checked above.
        unsafe {
            match rows {
                2 => vbmi_tiles::<1>(tiles, chunks, &xs, sums),
                _ => vbmi_tiles::<2>(tiles, chunks, &xs, sums),
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
    unsafe fn vbmi_tiles<const P: usize>(tiles: &[u8], chunks: usize, xs: &[*const i8; 4], sums: &mut [i32]) {
        let tile_bytes = chunks * 2 * P * CHUNK_BYTES;
        for (t, sums) in sums.chunks_exact_mut(2 * P).enumerate() {
            let mut out = [[0; 4]; 4];
            run_vbmi::<P, 1>(&tiles[t * tile_bytes..(t + 1) * tile_bytes], chunks, xs, 0, &mut out);
            for (s, row) in sums.iter_mut().zip(&out) {
                *s = row[0];
            }
        }
    }

    /// Prefill's unpacking on AVX-512 VBMI: a tile's codes one per byte,
    /// row after row (`rows × chunks · 160` bytes), looked up as
    /// [`vbmi_dots`] does, once for all the tokens [`vnni_unpacked_dots`]
    /// then meets them with.
    pub(in super::super) fn vbmi_unpack(rows: usize, tile: &[u8], chunks: usize, codes: &mut super::super::lines::LineVec<u8>) {
        assert!(has_vbmi_kernel(rows) && tile.len() == chunks * rows * CHUNK_BYTES, "base3 vbmi unpack: mismatched operands");
        codes.resize(rows * chunks * CHUNK, 0);
        // SAFETY: the CPU has AVX-512 VBMI (checked above) and F, BW
        // (`matmul` checked VNNI's); both lengths are set above.
        unsafe { unpack_vbmi(rows, tile, chunks, codes) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    unsafe fn unpack_vbmi(rows: usize, tile: &[u8], chunks: usize, codes: &mut [u8]) {
        let four = quarters(&LOW_FOUR);
        let three = _mm512_set1_epi8(3);
        let (src, dst, kp) = (tile.as_ptr(), codes.as_mut_ptr(), chunks * CHUNK);
        for c in 0..chunks {
            // The weights come from memory here, once a step: as the decode kernels do.
            prefetch_ahead(src, c, rows);
            for p in 0..rows / 2 {
                let q = _mm512_loadu_si512(src.add((c * rows + 2 * p) * CHUNK_BYTES) as *const __m512i);
                // Digit 0 from two compares, 1-4 from one lookup's 2-bit
                // fields (shifted in 16-bit lanes: the mask drops the
                // neighbour's bits).
                let fields = lookup(&four, q);
                let digits = [
                    top_digit(q),
                    _mm512_and_si512(_mm512_srli_epi16::<6>(fields), three),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(fields), three),
                    _mm512_and_si512(_mm512_srli_epi16::<2>(fields), three),
                    _mm512_and_si512(fields, three),
                ];
                for (i, d) in digits.into_iter().enumerate() {
                    let at = dst.add(2 * p * kp + c * CHUNK + 32 * i);
                    _mm256_storeu_si256(at as *mut __m256i, _mm512_castsi512_si256(d));
                    _mm256_storeu_si256(at.add(kp) as *mut __m256i, _mm512_extracti64x4_epi64::<1>(d));
                }
            }
        }
    }

    /// A 256-byte table as four registers.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn quarters(t: &[u8; 256]) -> [__m512i; 4] {
        std::array::from_fn(|h| _mm512_loadu_si512(t.as_ptr().add(64 * h) as *const __m512i))
    }

    /// Digits 1–4 of each byte as 2-bit fields, digit 1 in the top two bits
    /// (the 2-bit packing's order): the one lookup the VBMI kernels make
    /// (digit 0 is [`top_digit`]).
    static LOW_FOUR: [u8; 256] = {
        let mut t = [0u8; 256];
        let mut q = 0;
        while q < 256 {
            t[q] = DIGITS[1][q] << 6 | DIGITS[2][q] << 4 | DIGITS[3][q] << 2 | DIGITS[4][q];
            q += 1;
        }
        t
    };

    /// Prefill from [`vbmi_unpack`]'s codes: `vpdpbusd` on 64 codes of a
    /// row at a time, against `step` (2 or 4) tokens.
    pub(in super::super) fn vnni_unpacked_dots(rows: usize, step: usize, codes: &[u8], chunks: usize, x: &QuantActs, tok: usize, out: &mut [[i32; 4]; 4]) {
        let kp = chunks * CHUNK;
        assert!(codes.len() == rows * kp && x.kp >= kp && tok + step <= x.tokens(), "base3 unpacked dots: mismatched operands");
        let xs = x.step_rows(tok, step);
        // SAFETY: `vbmi_unpack` made the codes, so the CPU has AVX-512 VBMI
        // and VL (`has_vbmi_kernel`), F, BW and VNNI; lengths are checked above.
        unsafe {
            match (rows, step) {
                (2, 2) => gemm_vnni::<2, 2>(codes, kp, &xs, out),
                (2, 4) => gemm_vnni::<2, 4>(codes, kp, &xs, out),
                (4, 2) => gemm_vnni::<4, 2>(codes, kp, &xs, out),
                (4, 4) => gemm_vnni::<4, 4>(codes, kp, &xs, out),
                _ => unreachable!("one token reads packed codes; one row has no VBMI unpacking"),
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl")]
    unsafe fn gemm_vnni<const R: usize, const T: usize>(codes: &[u8], kp: usize, xs: &[*const i8; 4], out: &mut [[i32; 4]; 4]) {
        let w = codes.as_ptr();
        let mut acc = [[_mm512_setzero_si512(); T]; R];
        let full = kp / 64;
        for b in 0..full {
            let mut x = [_mm512_setzero_si512(); T];
            for (xj, p) in x.iter_mut().zip(xs) {
                *xj = _mm512_loadu_si512(p.add(64 * b) as *const __m512i);
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let cv = _mm512_loadu_si512(w.add(r * kp + 64 * b) as *const __m512i);
                for (a, xj) in acc_r.iter_mut().zip(&x) {
                    *a = _mm512_dpbusd_epi32(*a, cv, *xj);
                }
            }
        }
        // An odd number of chunks leaves 32 codes a row.
        let mut tail = [[_mm256_setzero_si256(); T]; R];
        if !kp.is_multiple_of(64) {
            for (r, tail_r) in tail.iter_mut().enumerate() {
                let cv = _mm256_loadu_si256(w.add(r * kp + 64 * full) as *const __m256i);
                for (a, p) in tail_r.iter_mut().zip(xs) {
                    *a = _mm256_dpbusd_epi32(*a, cv, _mm256_loadu_si256(p.add(64 * full) as *const __m256i));
                }
            }
        }
        for r in 0..R {
            for j in 0..T {
                out[r][j] = _mm512_reduce_add_epi32(acc[r][j]) + hsum(tail[r][j]);
            }
        }
    }

    /// `P` pairs of rows against `T` tokens (one or two), their results in
    /// `out[r][j0..j0 + T]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
    #[inline]
    unsafe fn run_vbmi<const P: usize, const T: usize>(tile: &[u8], chunks: usize, xs: &[*const i8], j0: usize, out: &mut [[i32; 4]; 4]) {
        let four = quarters(&LOW_FOUR);
        // Field f of LOW_FOUR's bytes is digit f + 1.
        let masks = super::super::vnni::field_masks();
        let mut acc = [[[_mm512_setzero_si512(); 4]; T]; P];
        // Digit 0's sums, apart (scaled by 1, as the last field's): they
        // join that field's sums at the end.
        let mut top = [[_mm512_setzero_si512(); T]; P];
        let w = tile.as_ptr();
        for c in 0..chunks {
            prefetch_ahead(w, c, 2 * P);
            // Each digit's 32 activations, in both halves: once for every pair.
            let x: [[__m512i; 5]; T] =
                std::array::from_fn(|j| std::array::from_fn(|i| _mm512_broadcast_i64x4(_mm256_loadu_si256(xs[j].add(c * CHUNK + 32 * i) as *const __m256i))));
            for p in 0..P {
                let q = _mm512_loadu_si512(w.add((c * 2 * P + 2 * p) * CHUNK_BYTES) as *const __m512i);
                let fields = lookup(&four, q);
                for (i, m) in masks.iter().enumerate() {
                    let codes = _mm512_and_si512(fields, *m);
                    for (a, xj) in acc[p].iter_mut().zip(&x) {
                        a[i] = _mm512_dpbusd_epi32(a[i], codes, xj[i + 1]);
                    }
                }
                let codes = top_digit(q);
                for (a, xj) in top[p].iter_mut().zip(&x) {
                    *a = _mm512_dpbusd_epi32(*a, codes, xj[0]);
                }
            }
        }
        for (acc_p, top_p) in acc.iter_mut().zip(&top) {
            for (a, t) in acc_p.iter_mut().zip(top_p) {
                a[3] = _mm512_add_epi32(a[3], *t);
            }
        }
        super::super::vnni::store_pairs(&acc, out, j0);
    }

    /// Digit 0 of each byte `q` without a lookup: `⌊3q / 256⌋`, which is 1
    /// from `q = 86` and 2 from `q = 171`.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn top_digit(q: __m512i) -> __m512i {
        let one = _mm512_cmpge_epu8_mask(q, _mm512_set1_epi8(86));
        let two = _mm512_cmpge_epu8_mask(q, _mm512_set1_epi8(171u8 as i8));
        _mm512_mask_mov_epi8(_mm512_maskz_mov_epi8(one, _mm512_set1_epi8(1)), two, _mm512_set1_epi8(2))
    }

    /// The VBMI kernels' decode of 64 bytes: digit 0 from [`top_digit`],
    /// digits 1–4 from [`LOW_FOUR`]'s lookup, for the tests to compare
    /// with [`super::decode`] on every byte. `None` without VBMI.
    #[cfg(test)]
    pub(super) fn vbmi_digits(q: &[u8; 64]) -> Option<[[u8; 64]; 5]> {
        if !(has_vbmi_kernel(2) && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")) {
            return None;
        }
        // SAFETY: the CPU has AVX-512 F, BW and VBMI (checked above).
        unsafe {
            let v = _mm512_loadu_si512(q.as_ptr() as *const __m512i);
            let fields = lookup(&quarters(&LOW_FOUR), v);
            let mut out = [[0u8; 64]; 5];
            _mm512_storeu_si512(out[0].as_mut_ptr() as *mut __m512i, top_digit(v));
            let mut f = [0u8; 64];
            _mm512_storeu_si512(f.as_mut_ptr() as *mut __m512i, fields);
            for (i, digit) in out.iter_mut().enumerate().skip(1) {
                *digit = f.map(|b| b >> (2 * (4 - i)) & 3);
            }
            Some(out)
        }
    }

    /// `table[q]` for each byte `q`: two `vpermi2b`, each of 128 entries,
    /// the second looking up only where the first did not (the byte's top
    /// bit clear), where the first left `q` itself in place.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    #[inline]
    unsafe fn lookup(table: &[__m512i; 4], q: __m512i) -> __m512i {
        let high = _mm512_movepi8_mask(q);
        let upper = _mm512_mask2_permutex2var_epi8(table[2], q, high, table[3]);
        _mm512_mask2_permutex2var_epi8(table[0], upper, !high, table[1])
    }
}

/// Activations as the VNNI kernel reads them: per chunk and digit `i`,
/// `xᵢ − 3·xᵢ₊₁` as i16 (`xᵢ` the chunk's 32 activations that digit `i`
/// meets; the last digit's are its own). Made once per product, for all
/// of its rows.
pub struct DigitActs {
    kp: usize,
    y: Vec<i16>,
}

impl DigitActs {
    /// The first `kp` (whole chunks) of each token's activations.
    pub fn new(x: &QuantActs, kp: usize) -> DigitActs {
        assert!(kp.is_multiple_of(CHUNK) && kp <= x.kp, "digit activations: {kp} is not whole chunks of the activations");
        let mut y = vec![0i16; x.tokens() * kp];
        for (t, ys) in y.chunks_exact_mut(kp).enumerate() {
            for (xc, yc) in x.row(t)[..kp].chunks_exact(CHUNK).zip(ys.chunks_exact_mut(CHUNK)) {
                for (i, yi) in yc.chunks_exact_mut(32).enumerate() {
                    for (j, v) in yi.iter_mut().enumerate() {
                        let next = xc.get(32 * (i + 1) + j).map_or(0, |&n| n as i16);
                        *v = xc[32 * i + j] as i16 - 3 * next;
                    }
                }
            }
        }
        DigitActs { kp, y }
    }

    fn tokens(&self) -> usize {
        self.y.len() / self.kp
    }

    fn row(&self, t: usize) -> &[i16] {
        &self.y[t * self.kp..(t + 1) * self.kp]
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

    /// The VBMI kernels' compares and lookup read every byte, encodable or
    /// not, as the reference [`decode`] does.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vbmi_decode_matches_the_reference_on_every_byte() {
        for block in 0..4u8 {
            let q: [u8; 64] = std::array::from_fn(|j| 64 * block + j as u8);
            let Some(digits) = vbmi_digits(&q) else {
                eprintln!("skipped: this CPU has no AVX-512 VBMI");
                return;
            };
            for (j, &b) in q.iter().enumerate() {
                for (i, d) in digits.iter().enumerate() {
                    assert_eq!(d[j], decode(b, i), "byte {b}, digit {i}");
                }
            }
        }
    }
}
