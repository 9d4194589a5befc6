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
        let mut scale = vec![0u16; n * kp / GROUP];
        // A 2B model's head is 328M weights: its rows split over the cores.
        let workers = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n.div_ceil(64)).max(1);
        let per = n.div_ceil(workers);
        // Written where the kernels will read it (see `Blob::build`).
        let q = Blob::build(n * kp / 2, |q| {
            q.fill(0x88);
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
        });
        Int4Rows { n, k, kp, q, scale: scale.into() }
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
    assert!(isa.available(), "int4 matmul: {} is not available on this CPU", isa.name());
    #[cfg(target_arch = "x86_64")]
    if let Some(kernel) = blocks::Kernel::for_isa(isa) {
        return matmul_blocks(pool, kernel, w, x, out);
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

/// [`matmul`] with the x86 block kernels: [`blocks::ROWS`] rows at a time
/// against up to four tokens (two with AVX2), their activations arranged
/// once per call ([`blocks::Acts`]).
#[cfg(target_arch = "x86_64")]
fn matmul_blocks(pool: &Pool, kernel: blocks::Kernel, w: &Int4Rows, x: &QuantActs, out: &mut [f32]) {
    let acts: Vec<blocks::Acts> = (0..x.tokens()).map(|t| blocks::Acts::new(kernel, &x.row(t)[..w.kp])).collect();
    let dst = SharedMut(out.as_mut_ptr());
    let row_blocks = Chunks::new(w.n.div_ceil(blocks::ROWS), pool.threads());
    pool.run_sized(x.tokens() * w.n * w.kp / 2, &|_, _| {
        for b in std::iter::from_fn(|| row_blocks.next()).flatten() {
            let r0 = b * blocks::ROWS;
            let m = blocks::ROWS.min(w.n - r0);
            // Past the last row, the last row again (computed, not stored).
            let rows = std::array::from_fn(|j| w.row(r0 + j.min(m - 1)));
            let mut t = 0;
            while t < acts.len() {
                let done = kernel.dot_rows(rows, &acts[t..], |i, j, v| {
                    if j < m {
                        // SAFETY: rows r0..r0 + m belong to this worker alone.
                        unsafe { *dst.ptr().add((t + i) * w.n + r0 + j) = v / x.gamma[t + i] };
                    }
                });
                t += done;
            }
        }
    });
}

fn bytes_of(d: &[u16]) -> &[u8] {
    // SAFETY: u16 has no padding and a stricter alignment than u8; the
    // slice covers the same bytes.
    unsafe { std::slice::from_raw_parts(d.as_ptr().cast(), d.len() * 2) }
}

/// `Σ_g d_g · Σ_j q_gj x_gj` over the groups of one row (`q` packed as in
/// [`Int4Rows`], `d` its scales in f32, `x` int8 of at least 32 a group):
/// the row at a time of Cranelift's kernel and the reference (AVX2 and
/// AVX-512 VNNI read four rows at a time: [`blocks`]).
pub fn dot(isa: Isa, q: &[u8], d: &[f32], x: &[i8]) -> f32 {
    assert!(q.len() >= d.len() * GROUP / 2 && x.len() >= d.len() * GROUP, "int4 dot: short operands");
    match isa {
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
mod blocks;

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
