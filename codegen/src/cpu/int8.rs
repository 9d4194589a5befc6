//! An int8 output head: weights quantized per row when the model is
//! loaded (`--head q8`), activations per token, integer dot products.
//! Half the bytes of an f16 head, which is read once per generated token
//! and outweighs all ternary layers of a 2B model together. Lossy: its
//! logits are compared with the stored head's in the tests and docs.

use super::blob::Blob;
use super::pool::{Chunks, Pool, SharedMut};
use super::ternary::{QuantActs, CHUNK};
use super::{float, Isa};
use bitnet_ir::interp::WeightView;

/// `[n, k]` int8 rows, each padded with zeros to `kp`, with one scale each.
pub struct Int8Rows {
    pub n: usize,
    pub k: usize,
    pub kp: usize,
    pub q: Blob<i8>,
    pub scale: Blob<f32>,
}

impl Int8Rows {
    /// Each row to int8: scale = max|w| / 127, q = round(w / scale).
    pub fn quantize(w: &WeightView) -> Int8Rows {
        let (n, k) = (w.rows(), w.row_len());
        let kp = k.div_ceil(CHUNK) * CHUNK;
        let mut scale = vec![0f32; n];
        let mut row = vec![0f32; k];
        // Written where the kernels will read it (see `Blob::build`).
        let q = Blob::build(n * kp, |q| {
            for r in 0..n {
                float::row_f32(Isa::best(), w, r, &mut row);
                let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
                for (o, &v) in q[r * kp..r * kp + k].iter_mut().zip(&row) {
                    *o = (v / s).round().clamp(-127.0, 127.0) as i8;
                }
                scale[r] = s;
            }
        });
        Int8Rows { n, k, kp, q, scale: scale.into() }
    }

    /// Rows stored earlier (an artifact), checked against the shape.
    pub fn from_parts(n: usize, k: usize, q: Blob<i8>, scale: Blob<f32>) -> Result<Int8Rows, String> {
        let kp = k.div_ceil(CHUNK) * CHUNK;
        if n == 0 || k == 0 || q.len() != n * kp || scale.len() != n {
            return Err(format!("int8 rows [{n}, {k}] need {} values and {n} scales, got {} and {}", n * kp, q.len(), scale.len()));
        }
        Ok(Int8Rows { n, k, kp, q, scale })
    }

    pub fn bytes(&self) -> usize {
        self.q.len() + self.scale.len() * 4
    }
}

/// `out[t, r] = (x_t · w_r) · scale_r / γ_t`, rows split over the workers.
pub fn matmul(pool: &Pool, isa: Isa, w: &Int8Rows, x: &QuantActs, out: &mut [f32]) {
    assert!(x.kp >= w.kp && out.len() == x.tokens() * w.n, "int8 matmul: mismatched operands");
    let dst = SharedMut(out.as_mut_ptr());
    let chunks = Chunks::new(w.n, pool.threads());
    pool.run_sized(x.tokens() * w.n * w.kp, &|_, _| {
        for r in std::iter::from_fn(|| chunks.next()).flatten() {
            let wr = &w.q[r * w.kp..(r + 1) * w.kp];
            for t in 0..x.tokens() {
                let d = dot(isa, wr, &x.row(t)[..w.kp]);
                // SAFETY: row r belongs to this worker alone.
                unsafe { *dst.ptr().add(t * w.n + r) = d as f32 * w.scale[r] / x.gamma[t] };
            }
        }
    });
}

/// `Σ a·b` of int8 vectors whose length is a multiple of 128, exactly.
pub fn dot(isa: Isa, a: &[i8], b: &[i8]) -> i32 {
    match isa.float_kernels() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 checked by available(); the kernel reads the first
        // min(a.len(), b.len()) rounded down to 128 elements of each.
        Isa::Avx2 => unsafe { avx2::dot(a, b) },
        Isa::Cranelift => super::jit::DotJit::get().expect("Isa::Cranelift is available").dot_i8(a, b),
        _ => reference_dot(a, b),
    }
}

pub fn reference_dot(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `pmaddubsw` multiplies unsigned by signed bytes: feed it |a| and b
    /// with a's sign. Neither side is −128, so pairs stay below 2¹⁵.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot(a: &[i8], b: &[i8]) -> i32 {
        let n = a.len().min(b.len()) / 128 * 128;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_si256(); 4];
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut i = 0;
        while i < n {
            // On into the next rows: a worker's rows are contiguous. (On a
            // 2-core Intel Xeon VM the 2B4T q8 head took 14.9 ms a token
            // prefetching 1 KB ahead into L1, 12.3 with 4 KB.)
            super::super::prefetch_stream::<2>(pa.wrapping_add(i) as *const u8);
            for (j, acc) in acc.iter_mut().enumerate() {
                let va = _mm256_loadu_si256(pa.add(i + 32 * j) as *const __m256i);
                let vb = _mm256_loadu_si256(pb.add(i + 32 * j) as *const __m256i);
                let p = _mm256_maddubs_epi16(_mm256_sign_epi8(va, va), _mm256_sign_epi8(vb, va));
                *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(p, ones));
            }
            i += 128;
        }
        let v = _mm256_add_epi32(_mm256_add_epi32(acc[0], acc[1]), _mm256_add_epi32(acc[2], acc[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_hadd_epi32(s, s);
        _mm_cvtsi128_si32(_mm_hadd_epi32(s, s))
    }
}
