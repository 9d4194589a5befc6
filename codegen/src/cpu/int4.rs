//! A 4-bit output head (`--head q4`): weights quantized when the model is
//! loaded in groups of 32 with one f16 scale a group (4.5 bits a weight,
//! as llama.cpp's Q4_0), activations to int8 per token, integer dot
//! products a group, scaled and summed in f32. A quarter of the bytes of
//! an f16 head, which is half of what a 2B model's decode step reads.
//! Lossy: `bitnet perplexity --kl-divergence` measures what it costs.

use super::blob::Blob;
use super::pool::{Chunks, Pool, SharedMut};
use super::ternary::{QuantActs, CHUNK};
use super::{float, Isa};
use bitnet_ir::interp::WeightView;

/// Weights a group: one scale each.
pub const GROUP: usize = 32;

/// `[n, k]` weights, each row padded with zeros to `kp` (a multiple of
/// [`CHUNK`], as the activations are): per group of 32, 16 bytes whose low
/// nibbles are values 0..16 and high nibbles values 16..32, each stored as
/// `q + 8` for `q` in −8..=7, and an f16 scale `d`: the weight is `d·q`.
pub struct Int4Rows {
    pub n: usize,
    pub k: usize,
    pub kp: usize,
    pub q: Blob<u8>,
    /// f16 bits, `kp / 32` a row.
    pub scale: Blob<u16>,
}

impl Int4Rows {
    /// Each group of 32 to 4 bits: `d = m / −8` for the value `m` of
    /// largest magnitude (so it is stored exactly, as −8), `q = round(w / d)`.
    pub fn quantize(w: &WeightView) -> Int4Rows {
        let (n, k) = (w.rows(), w.row_len());
        let kp = k.div_ceil(CHUNK) * CHUNK;
        let mut q = vec![0x88u8; n * kp / 2];
        let mut scale = vec![0u16; n * kp / GROUP];
        // A 2B model's head is 328M weights: its rows split over the cores.
        let workers = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n.div_ceil(64)).max(1);
        let per = n.div_ceil(workers);
        std::thread::scope(|scope| {
            for (i, (qs, ss)) in q.chunks_mut(per * kp / 2).zip(scale.chunks_mut(per * kp / GROUP)).enumerate() {
                scope.spawn(move || {
                    let mut row = vec![0f32; kp];
                    for (j, (qr, sr)) in qs.chunks_exact_mut(kp / 2).zip(ss.chunks_exact_mut(kp / GROUP)).enumerate() {
                        float::row_f32(Isa::best(), w, i * per + j, &mut row[..k]);
                        quantize_row(&row, qr, sr);
                    }
                });
            }
        });
        Int4Rows { n, k, kp, q: q.into(), scale: scale.into() }
    }

    /// Rows stored earlier (an artifact), checked against the shape.
    pub fn from_parts(n: usize, k: usize, q: Blob<u8>, scale: Blob<u16>) -> Result<Int4Rows, String> {
        let kp = k.div_ceil(CHUNK) * CHUNK;
        if n == 0 || k == 0 || q.len() != n * kp / 2 || scale.len() != n * kp / GROUP {
            return Err(format!("4-bit rows [{n}, {k}] need {} bytes and {} scales, got {} and {}", n * kp / 2, n * kp / GROUP, q.len(), scale.len()));
        }
        Ok(Int4Rows { n, k, kp, q, scale })
    }

    pub fn bytes(&self) -> usize {
        self.q.len() + self.scale.len() * 2
    }

    /// Row `r`'s values, as the kernels see them (for tests and checks).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let (q, d) = self.row(r);
        let mut out = vec![0f32; self.kp];
        for (g, &s) in d.iter().enumerate() {
            let s = half::f16::from_bits(s).to_f32();
            for j in 0..GROUP / 2 {
                let b = q[g * GROUP / 2 + j];
                out[g * GROUP + j] = s * ((b & 15) as i32 - 8) as f32;
                out[g * GROUP + j + GROUP / 2] = s * ((b >> 4) as i32 - 8) as f32;
            }
        }
        out.truncate(self.k);
        out
    }

    fn row(&self, r: usize) -> (&[u8], &[u16]) {
        (&self.q[r * self.kp / 2..(r + 1) * self.kp / 2], &self.scale[r * self.kp / GROUP..(r + 1) * self.kp / GROUP])
    }
}

/// One row (zero-padded to a multiple of 32) to nibbles and f16 scales.
fn quantize_row(row: &[f32], q: &mut [u8], scale: &mut [u16]) {
    for ((vals, bytes), s) in row.chunks_exact(GROUP).zip(q.chunks_exact_mut(GROUP / 2)).zip(scale) {
        let m = vals.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = half::f16::from_f32(m / -8.0);
        *s = d.to_bits();
        let inv = if d.to_f32() != 0.0 { 1.0 / d.to_f32() } else { 0.0 };
        let code = |v: f32| ((v * inv).round().clamp(-8.0, 7.0) as i32 + 8) as u8;
        for (j, b) in bytes.iter_mut().enumerate() {
            *b = code(vals[j]) | code(vals[j + GROUP / 2]) << 4;
        }
    }
}

/// `out[t, r] = (x_t · w_r) / γ_t`, rows split over the workers.
pub fn matmul(pool: &Pool, isa: Isa, w: &Int4Rows, x: &QuantActs, out: &mut [f32]) {
    assert!(x.kp >= w.kp && out.len() == x.tokens() * w.n, "int4 matmul: mismatched operands");
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni {
        return matmul_wide(pool, w, x, out);
    }
    let dst = SharedMut(out.as_mut_ptr());
    let chunks = Chunks::new(w.n, pool.threads());
    pool.run_sized(x.tokens() * w.n * w.kp / 2, &|_, _| {
        let mut scales = vec![0f32; w.kp / GROUP];
        for r in std::iter::from_fn(|| chunks.next()).flatten() {
            let (q, d) = w.row(r);
            float::f16_to_f32(isa, bytes_of(d), &mut scales);
            for t in 0..x.tokens() {
                let v = dot(isa, q, &scales, &x.row(t)[..w.kp]);
                // SAFETY: row r belongs to this worker alone.
                unsafe { *dst.ptr().add(t * w.n + r) = v / x.gamma[t] };
            }
        }
    });
}

/// [`matmul`] with AVX-512 VNNI: [`vnni::ROWS`] rows at a time against up
/// to four tokens' activations, arranged once per call ([`vnni::Acts`]).
#[cfg(target_arch = "x86_64")]
fn matmul_wide(pool: &Pool, w: &Int4Rows, x: &QuantActs, out: &mut [f32]) {
    let acts: Vec<vnni::Acts> = (0..x.tokens()).map(|t| vnni::Acts::new(&x.row(t)[..w.kp])).collect();
    let dst = SharedMut(out.as_mut_ptr());
    let blocks = Chunks::new(w.n.div_ceil(vnni::ROWS), pool.threads());
    pool.run_sized(x.tokens() * w.n * w.kp / 2, &|_, _| {
        for b in std::iter::from_fn(|| blocks.next()).flatten() {
            let r0 = b * vnni::ROWS;
            let m = vnni::ROWS.min(w.n - r0);
            // Past the last row, the last row again (computed, not stored).
            let rows = std::array::from_fn(|j| w.row(r0 + j.min(m - 1)));
            // Four tokens a pass where there are, then two, then one: the
            // rows are unpacked once a pass.
            let mut t = 0;
            while t < acts.len() {
                let put = |i: usize, j: usize, v: f32| {
                    if j < m {
                        // SAFETY: rows r0..r0 + m belong to this worker alone.
                        unsafe { *dst.ptr().add((t + i) * w.n + r0 + j) = v / x.gamma[t + i] };
                    }
                };
                // SAFETY: Isa::Avx512Vnni is only chosen where available()
                // found AVX-512 F/BW/VNNI; every row holds kp / 2 bytes and
                // kp / 32 scales, every token's activations kp values.
                t += unsafe {
                    match acts.len() - t {
                        4.. => pass::<4>(rows, &acts[t..], put),
                        2 | 3 => pass::<2>(rows, &acts[t..], put),
                        _ => pass::<1>(rows, &acts[t..], put),
                    }
                };
            }
        }
    });
}

/// The first `T` tokens of `acts` against a block of rows, each value
/// handed to `put(token, row, value)`; returns `T`.
///
/// # Safety
/// As [`vnni::dot_rows`].
#[cfg(target_arch = "x86_64")]
unsafe fn pass<const T: usize>(rows: [(&[u8], &[u16]); vnni::ROWS], acts: &[vnni::Acts], mut put: impl FnMut(usize, usize, f32)) -> usize {
    let v = vnni::dot_rows::<T>(rows, std::array::from_fn(|i| &acts[i]));
    for (j, row) in v.iter().enumerate() {
        for (i, &v) in row.iter().enumerate() {
            put(i, j, v);
        }
    }
    T
}

fn bytes_of(d: &[u16]) -> &[u8] {
    // SAFETY: u16 has no padding and a stricter alignment than u8; the
    // slice covers the same bytes.
    unsafe { std::slice::from_raw_parts(d.as_ptr().cast(), d.len() * 2) }
}

/// `Σ_g d_g · Σ_j q_gj x_gj` over the groups of one row (`q` packed as in
/// [`Int4Rows`], `d` its scales in f32, `x` int8 of at least 32 a group).
/// A row at a time; [`matmul`] on AVX-512 VNNI reads four rows at a time.
pub fn dot(isa: Isa, q: &[u8], d: &[f32], x: &[i8]) -> f32 {
    assert!(q.len() >= d.len() * GROUP / 2 && x.len() >= d.len() * GROUP, "int4 dot: short operands");
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2/FMA checked by available() (AVX-512 VNNI includes
        // them); lengths above.
        Isa::Avx2 | Isa::Avx512Vnni => unsafe { avx2::dot(q, d, x) },
        Isa::Cranelift => super::jit::DotJit::get().expect("Isa::Cranelift is available").dot_q4(q, d, x),
        _ => reference_dot(q, d, x),
    }
}

/// The plain form every other kernel is checked against.
pub fn reference_dot(q: &[u8], d: &[f32], x: &[i8]) -> f32 {
    let mut acc = 0f32;
    for (g, &s) in d.iter().enumerate() {
        let mut sum = 0i32;
        for j in 0..GROUP / 2 {
            let b = q[g * GROUP / 2 + j];
            sum += ((b & 15) as i32 - 8) * x[g * GROUP + j] as i32;
            sum += ((b >> 4) as i32 - 8) * x[g * GROUP + GROUP / 2 + j] as i32;
        }
        acc += s * sum as f32;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::GROUP;
    use std::arch::x86_64::*;

    /// A group at a time: the nibbles widened to 32 signed bytes, then
    /// `pmaddubsw` on |q| and x with q's sign (|q| ≤ 8, so pairs stay far
    /// below 2¹⁵), summed to eight i32 lanes, scaled and accumulated in f32.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(q: &[u8], d: &[f32], x: &[i8]) -> f32 {
        let (mask, eight, ones) = (_mm_set1_epi8(0x0F), _mm256_set1_epi8(8), _mm256_set1_epi16(1));
        let mut acc = [_mm256_setzero_ps(); 2];
        for (g, &s) in d.iter().enumerate() {
            let pq = q.as_ptr().add(g * GROUP / 2);
            _mm_prefetch::<_MM_HINT_T0>(pq.wrapping_add(512) as *const i8);
            let b = _mm_loadu_si128(pq as *const __m128i);
            let lo = _mm_and_si128(b, mask);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(b), mask);
            let w = _mm256_sub_epi8(_mm256_set_m128i(hi, lo), eight);
            let xv = _mm256_loadu_si256(x.as_ptr().add(g * GROUP) as *const __m256i);
            let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
            let sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
            acc[g & 1] = _mm256_fmadd_ps(_mm256_set1_ps(s), sum, acc[g & 1]);
        }
        let v = _mm256_add_ps(acc[0], acc[1]);
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)))
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::GROUP;
    use std::arch::x86_64::*;

    /// Rows a call of [`dot_rows`].
    pub const ROWS: usize = 4;
    /// Weights a pair of groups: one 512-bit product.
    const PAIR: usize = 2 * GROUP;
    /// How many blocks of rows ahead the kernel prefetches.
    const AHEAD: usize = 2;
    /// Each i32 lane's group within a pair (see [`Acts`]).
    const LANE_GROUP: [i32; 16] = [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1];

    /// One token's int8 activations in the order the kernel unpacks a
    /// pair of groups' 32 bytes into: their low nibbles (values 0..16 of
    /// both groups), then their high nibbles (values 16..32), so each 64
    /// values have their middle 16 swapped. With them, each 32-bit lane's
    /// `−8·Σx`: the products are of the stored `q + 8`, and this puts the
    /// 8 back once per token instead of once per row.
    pub struct Acts {
        x: Vec<i8>,
        minus_8x: Vec<i32>,
    }

    impl Acts {
        pub fn new(x: &[i8]) -> Acts {
            assert!(x.len() % PAIR == 0, "int4 activations come in pairs of groups");
            let mut ordered = Vec::with_capacity(x.len());
            for pair in x.chunks_exact(PAIR) {
                for block in [0, 2, 1, 3] {
                    ordered.extend_from_slice(&pair[16 * block..16 * (block + 1)]);
                }
            }
            let minus_8x = ordered.chunks_exact(4).map(|l| -8 * l.iter().map(|&v| v as i32).sum::<i32>()).collect();
            Acts { x: ordered, minus_8x }
        }
    }

    /// [`super::reference_dot`] for [`ROWS`] rows (`q`, f16 scales) and
    /// `T` tokens at once: per pair of groups, a row's 32 bytes broadcast
    /// to both halves of a register, shifted by 0 and 4 and masked to
    /// nibbles, and its scales permuted to their lanes (16 scales converted
    /// at a time), once for all `T` tokens; per token one `vpdpbusd` onto
    /// its `−8·Σx` lanes, converted, scaled and accumulated.
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI; each row holds `x.len() / 2` bytes and
    /// `x.len() / 32` scales, for the `x` of every token, all one length.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn dot_rows<const T: usize>(rows: [(&[u8], &[u16]); ROWS], acts: [&Acts; T]) -> [[f32; T]; ROWS] {
        let pairs = acts[0].x.len() / PAIR;
        debug_assert!(acts.iter().all(|a| a.x.len() == PAIR * pairs));
        debug_assert!(rows.iter().all(|(q, d)| q.len() >= pairs * GROUP && d.len() >= 2 * pairs));
        let mask = _mm512_set1_epi8(0x0F);
        let shift = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(4));
        let lane_group = _mm512_loadu_si512(LANE_GROUP.as_ptr().cast());
        let mut acc = [[_mm512_setzero_ps(); T]; ROWS];
        let ahead = rows[0].0.as_ptr().wrapping_add(AHEAD * ROWS * GROUP * pairs);
        let scales_ahead = rows[0].1.as_ptr().cast::<u8>().wrapping_add(AHEAD * ROWS * 4 * pairs);
        let mut p = 0;
        while p < pairs {
            // Up to eight pairs: sixteen scales, one conversion a row.
            let n = (pairs - p).min(8);
            let mut scales = [_mm512_setzero_ps(); ROWS];
            for (s, (_, d)) in scales.iter_mut().zip(&rows) {
                let d = d.as_ptr().add(2 * p);
                let h = if n == 8 {
                    _mm256_loadu_si256(d.cast())
                } else {
                    let mut h = [0u16; 16];
                    std::ptr::copy_nonoverlapping(d, h.as_mut_ptr(), 2 * n);
                    _mm256_loadu_si256(h.as_ptr().cast())
                };
                *s = _mm512_cvtph_ps(h);
            }
            for j in 0..n {
                let at = p + j;
                let scale_of = _mm512_add_epi32(lane_group, _mm512_set1_epi32(2 * j as i32));
                // The rows of a block are contiguous: fetch the block
                // AHEAD blocks on, two lines a step (a row's stream alone
                // is too short for the hardware prefetcher).
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(2 * 64 * at).cast());
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(2 * 64 * at + 64).cast());
                if 64 * at < ROWS * 4 * pairs {
                    _mm_prefetch::<_MM_HINT_T0>(scales_ahead.wrapping_add(64 * at).cast());
                }
                for (r, ((q, _), acc)) in rows.iter().zip(&mut acc).enumerate() {
                    let pq = q.as_ptr().add(GROUP * at);
                    let b = _mm512_broadcast_i64x4(_mm256_loadu_si256(pq.cast()));
                    let w = _mm512_and_si512(_mm512_srlv_epi16(b, shift), mask);
                    let scale = _mm512_permutexvar_ps(scale_of, scales[r]);
                    for (acc, a) in acc.iter_mut().zip(&acts) {
                        let xv = _mm512_loadu_si512(a.x.as_ptr().add(PAIR * at).cast());
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnet_ir::DType;

    #[test]
    fn quantize_keeps_the_largest_value_of_each_group_exactly() {
        let k = 40;
        let vals: Vec<f32> = (0..2 * k).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.25).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let w = WeightView { dtype: DType::F32, shape: vec![2, k], data: &bytes };
        let q = Int4Rows::quantize(&w);
        assert_eq!((q.kp, q.bytes()), (128, 2 * 64 + 2 * 4 * 2));
        for r in 0..2 {
            let got = q.dequantize_row(r);
            for (g, (want, got)) in vals[r * k..(r + 1) * k].chunks(GROUP).zip(got.chunks(GROUP)).enumerate() {
                let m = want.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = (m / 8.0).abs();
                for (a, b) in want.iter().zip(got) {
                    // Half a step, or up to a step for a value that would be
                    // +8 (the range is -8..=7, -8 being the largest).
                    let bound = if (a / (m / -8.0)).round() > 7.0 { d } else { d / 2.0 };
                    assert!((a - b).abs() <= bound + 1e-3 * d, "row {r} group {g}: {a} became {b} (step {d})");
                }
                assert!(got.iter().any(|&v| (v - m).abs() < 1e-3 * m.abs()), "row {r} group {g}: {m} not kept");
            }
        }
    }
}
