//! The 4-bit head's x86 kernels: [`ROWS`] rows (one contiguous block of
//! the row-major layout) against up to four tokens at a time. Each row's
//! bytes are unpacked to nibbles and its scales brought to their lanes once
//! for all the tokens of a pass; per token one integer product (`vpdpbusd`
//! onto lanes that start at `−8·Σx`; on AVX2 two `pmaddubsw`, a `paddw`
//! and a `pmaddwd`, then `−8·Σx` added), converted, scaled and accumulated
//! in f32 (the bytes hold `q + 8`: [`Acts`] takes the 8 off once per
//! token, not once per row). Both are checked
//! against [`super::reference_dot`] through `matmul` (tests/kernels.rs).

use super::GROUP;
use crate::cpu::Isa;
use std::arch::x86_64::*;

/// Rows a pass.
pub const ROWS: usize = 4;
/// How many blocks of rows ahead the kernels prefetch: a row's own stream
/// (1280 bytes in 2B4T's head) is too short for the hardware prefetcher.
const AHEAD: usize = 2;

/// Which block kernel: the ISAs with one.
#[derive(Clone, Copy, PartialEq)]
pub enum Kernel {
    Avx2,
    Avx512Vnni,
}

impl Kernel {
    pub fn for_isa(isa: Isa) -> Option<Kernel> {
        match isa {
            Isa::Avx2 => Some(Kernel::Avx2),
            Isa::Avx512Vnni => Some(Kernel::Avx512Vnni),
            _ => None,
        }
    }

    /// The first of `acts` (up to four with AVX-512's 32 registers, two
    /// with AVX2's 16) against a block of rows, each value handed to
    /// `put(token, row, value)`; returns how many tokens it took.
    pub fn dot_rows(self, rows: [(&[u8], &[u16]); ROWS], acts: &[Acts], put: impl FnMut(usize, usize, f32)) -> usize {
        let most = if self == Kernel::Avx512Vnni { 4 } else { 2 };
        // The tokens this pass takes (checking all of them on every pass
        // would be quadratic in a long prompt's logits).
        let acts = &acts[..acts.len().min(most)];
        let kp = acts[0].x.len();
        assert!(
            acts.iter().all(|a| a.kernel == self && a.x.len() == kp) && rows.iter().all(|(q, d)| q.len() >= kp / 2 && d.len() >= kp / GROUP),
            "int4 blocks: mismatched operands"
        );
        // SAFETY: a Kernel comes from an Isa, chosen only where available()
        // found its features (AVX-512 F/BW/VNNI, or AVX2/FMA/F16C); every
        // row holds kp / 2 bytes and kp / 32 scales (checked above).
        unsafe {
            match (self, acts.len()) {
                (Kernel::Avx512Vnni, 4) => emit(vnni::<4>(rows, std::array::from_fn(|i| &acts[i])), put),
                (Kernel::Avx512Vnni, 2 | 3) => emit(vnni::<2>(rows, std::array::from_fn(|i| &acts[i])), put),
                (Kernel::Avx512Vnni, _) => emit(vnni::<1>(rows, [&acts[0]]), put),
                (Kernel::Avx2, 2) => emit(avx2::<2>(rows, std::array::from_fn(|i| &acts[i])), put),
                (Kernel::Avx2, _) => emit(avx2::<1>(rows, [&acts[0]]), put),
            }
        }
    }
}

fn emit<const T: usize>(v: [[f32; T]; ROWS], mut put: impl FnMut(usize, usize, f32)) -> usize {
    for (j, row) in v.iter().enumerate() {
        for (i, &v) in row.iter().enumerate() {
            put(i, j, v);
        }
    }
    T
}

/// One token's int8 activations in the order the kernels unpack a row's
/// bytes, and each 32-bit lane's `−8·Σx`.
///
/// Both kernels unpack a pair of groups' 32 bytes to both groups' low
/// nibbles (values 0..16 of each), then both groups' high ones (16..32):
/// each 64 activations have their middle 16 swapped. A 32-bit lane of
/// AVX-512's `vpdpbusd` sums 4 of these; a lane of AVX2's `pmaddwd` sums 4
/// low-nibble activations and the 4 high-nibble ones 32 later (AVX-512's
/// lanes `i` and `i + 8` of the pair).
pub struct Acts {
    kernel: Kernel,
    x: Vec<i8>,
    minus_8x: Vec<i32>,
}

impl Acts {
    pub fn new(kernel: Kernel, x: &[i8]) -> Acts {
        assert!(x.len().is_multiple_of(2 * GROUP), "int4 activations come in pairs of groups");
        let x: Vec<i8> = x.chunks_exact(2 * GROUP).flat_map(|pair| [0, 2, 1, 3].map(|b| &pair[16 * b..16 * (b + 1)])).flatten().copied().collect();
        let fours = x.chunks_exact(4).map(|l| -8 * l.iter().map(|&v| v as i32).sum::<i32>());
        let minus_8x = match kernel {
            Kernel::Avx512Vnni => fours.collect(),
            Kernel::Avx2 => {
                let fours: Vec<i32> = fours.collect();
                fours.chunks_exact(16).flat_map(|pair| (0..8).map(move |i| pair[i] + pair[i + 8])).collect()
            }
        };
        Acts { kernel, x, minus_8x }
    }
}

/// `n` f16 scales from `d` (at most 16; past `n`, zeros) as 16-bit lanes.
#[target_feature(enable = "avx2")]
unsafe fn scale_bits(d: *const u16, n: usize) -> __m256i {
    if n == 16 {
        return _mm256_loadu_si256(d.cast());
    }
    let mut h = [0u16; 16];
    std::ptr::copy_nonoverlapping(d, h.as_mut_ptr(), n);
    _mm256_loadu_si256(h.as_ptr().cast())
}

/// Each i32 lane's group within an AVX-512 pair (see [`Acts`]).
const LANE_GROUP: [i32; 16] = [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1];

/// AVX-512: per pair of groups, a row's 32 bytes broadcast to both halves
/// of a register, shifted by 0 and 4 and masked to nibbles, and its scales
/// permuted to their lanes (16 scales converted at a time); per token one
/// `vpdpbusd`.
// Not inlined into the dispatch: with all five instances in one function
// the eight-token head ran 13% slower (register pressure).
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
unsafe fn vnni<const T: usize>(rows: [(&[u8], &[u16]); ROWS], acts: [&Acts; T]) -> [[f32; T]; ROWS] {
    let pairs = acts[0].x.len() / (2 * GROUP);
    let mask = _mm512_set1_epi8(0x0F);
    let shift = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(4));
    let lane_group = _mm512_loadu_si512(LANE_GROUP.as_ptr().cast());
    let mut acc = [[_mm512_setzero_ps(); T]; ROWS];
    // The rows of a block are contiguous: two lines of the block AHEAD on a
    // pair, and a line of its scales while they last.
    let ahead = rows[0].0.as_ptr().wrapping_add(AHEAD * ROWS * GROUP * pairs);
    let scales_ahead = rows[0].1.as_ptr().cast::<u8>().wrapping_add(AHEAD * ROWS * 4 * pairs);
    let mut p = 0;
    while p < pairs {
        let n = (pairs - p).min(8);
        let scales = rows.map(|(_, d)| _mm512_cvtph_ps(scale_bits(d.as_ptr().add(2 * p), 2 * n)));
        for j in 0..n {
            let at = p + j;
            let scale_of = _mm512_add_epi32(lane_group, _mm512_set1_epi32(2 * j as i32));
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(128 * at).cast());
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(128 * at + 64).cast());
            if 64 * at < ROWS * 4 * pairs {
                _mm_prefetch::<_MM_HINT_T0>(scales_ahead.wrapping_add(64 * at).cast());
            }
            for (r, ((q, _), acc)) in rows.iter().zip(&mut acc).enumerate() {
                let b = _mm512_broadcast_i64x4(_mm256_loadu_si256(q.as_ptr().add(GROUP * at).cast()));
                let w = _mm512_and_si512(_mm512_srlv_epi16(b, shift), mask);
                let scale = _mm512_permutexvar_ps(scale_of, scales[r]);
                for (acc, a) in acc.iter_mut().zip(&acts) {
                    let xv = _mm512_loadu_si512(a.x.as_ptr().add(2 * GROUP * at).cast());
                    let minus_8x = _mm512_loadu_si512(a.minus_8x.as_ptr().add(16 * at).cast());
                    let sums = _mm512_dpbusd_epi32(minus_8x, w, xv);
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, *acc);
                }
            }
        }
        p += n;
    }
    acc.map(|a| a.map(|a| _mm512_reduce_add_ps(a)))
}

/// AVX2: per pair of groups, a row's 32 bytes masked to their low nibbles
/// and shifted and masked to their high ones (both groups at once, in the
/// order [`Acts`] puts the activations), and the pair's scales as one
/// register (built for 8 pairs at a time); per token two `pmaddubsw`
/// (nibbles are unsigned, so no sign games) added as i16 (at most
/// 4·15·128 in magnitude), one `pmaddwd` to eight i32 lanes, four a group.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2<const T: usize>(rows: [(&[u8], &[u16]); ROWS], acts: [&Acts; T]) -> [[f32; T]; ROWS] {
    let pairs = acts[0].x.len() / (2 * GROUP);
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); T]; ROWS];
    let ahead = rows[0].0.as_ptr().wrapping_add(AHEAD * ROWS * GROUP * pairs);
    let scales_ahead = rows[0].1.as_ptr().cast::<u8>().wrapping_add(AHEAD * ROWS * 4 * pairs);
    // Each row's scales for 8 pairs: pair j's groups' in lanes 0..4, 4..8.
    let mut scales = [[_mm256_setzero_ps(); 8]; ROWS];
    let mut p = 0;
    while p < pairs {
        let n = (pairs - p).min(8);
        for (s, (_, d)) in scales.iter_mut().zip(&rows) {
            let h = scale_bits(d.as_ptr().add(2 * p), 2 * n);
            let halves = [_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h))];
            for (j, s) in s.iter_mut().enumerate().take(n) {
                let g = 2 * (j as i32 % 4);
                *s = _mm256_permutevar8x32_ps(halves[j / 4], _mm256_setr_epi32(g, g, g, g, g + 1, g + 1, g + 1, g + 1));
            }
        }
        for (j, at) in (p..p + n).enumerate() {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(128 * at).cast());
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(128 * at + 64).cast());
            if 64 * at < ROWS * 4 * pairs {
                _mm_prefetch::<_MM_HINT_T0>(scales_ahead.wrapping_add(64 * at).cast());
            }
            for (r, ((q, _), acc)) in rows.iter().zip(&mut acc).enumerate() {
                let b = _mm256_loadu_si256(q.as_ptr().add(GROUP * at).cast());
                let lo = _mm256_and_si256(b, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(b), mask);
                for (acc, a) in acc.iter_mut().zip(&acts) {
                    let x = a.x.as_ptr().add(2 * GROUP * at);
                    let products = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, _mm256_loadu_si256(x.cast())),
                        _mm256_maddubs_epi16(hi, _mm256_loadu_si256(x.add(GROUP).cast())),
                    );
                    let minus_8x = _mm256_loadu_si256(a.minus_8x.as_ptr().add(8 * at).cast());
                    let sums = _mm256_add_epi32(_mm256_madd_epi16(products, ones), minus_8x);
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scales[r][j], *acc);
                }
            }
        }
        p += n;
    }
    acc.map(|a| a.map(|a| hsum(a)))
}

#[target_feature(enable = "avx2")]
unsafe fn hsum(v: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)))
}
