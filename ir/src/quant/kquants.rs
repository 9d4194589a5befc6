//! The k-quants that BitNet GGUF files use for the token embedding / tied
//! head: `Q4_K` (llama-quantize's default for the TQ types) and `Q6_K`.
//! Super-blocks of 256 values. The quantizers are simple (no iterative
//! search) but produce valid blocks that any reader decodes identically.

use super::{f16_at, nearest, put_f16, FloatBlock, QuantBlock};
use half::f16;

const QK_K: usize = 256;

/// `Q4_K`: 8 sub-blocks of 32 with 6-bit scales and mins, 4-bit values.
/// `x = d * sc * q - dmin * m`.
#[repr(C)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; 128],
}
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);

impl BlockQ4K {
    /// Sub-block `j`'s (0..8) 6-bit scale and min from a block's `scales`
    /// bytes: its values are `d · scale · q − dmin · min`.
    #[inline]
    pub fn scale_min(scales: &[u8; 12], j: usize) -> (u8, u8) {
        scale_min_k4(j, scales)
    }
}

/// The 6-bit scale and min of sub-block `j` (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

fn pack_scale_min_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            q[j] |= sc[j] & 63;
            q[j + 4] |= m[j] & 63;
        } else {
            q[j + 4] |= (sc[j] & 0xF) | ((m[j] & 0xF) << 4);
            q[j - 4] |= (sc[j] >> 4) << 6;
            q[j] |= (m[j] >> 4) << 6;
        }
    }
    q
}

impl QuantBlock for BlockQ4K {
    const ELEMS: usize = QK_K;
    const BYTES: usize = 144;
    #[inline]
    fn read(b: &[u8]) -> Self {
        BlockQ4K { d: f16::from_f32(f16_at(b, 0)), dmin: f16::from_f32(f16_at(b, 2)), scales: b[4..16].try_into().unwrap(), qs: b[16..144].try_into().unwrap() }
    }
    fn write(&self, out: &mut [u8]) {
        put_f16(out, 0, self.d.to_f32());
        put_f16(out, 2, self.dmin.to_f32());
        out[4..16].copy_from_slice(&self.scales);
        out[16..144].copy_from_slice(&self.qs);
    }
}

impl FloatBlock for BlockQ4K {
    #[inline]
    fn dequantize(&self, out: &mut [f32]) {
        let (d, dmin) = (self.d.to_f32(), self.dmin.to_f32());
        // Each 64 outputs use 32 bytes: low nibbles first, then high nibbles.
        for chunk in 0..4 {
            let q = &self.qs[chunk * 32..chunk * 32 + 32];
            let (sc1, m1) = scale_min_k4(2 * chunk, &self.scales);
            let (sc2, m2) = scale_min_k4(2 * chunk + 1, &self.scales);
            let y = &mut out[chunk * 64..chunk * 64 + 64];
            for l in 0..32 {
                y[l] = d * sc1 as f32 * (q[l] & 0xF) as f32 - dmin * m1 as f32;
                y[l + 32] = d * sc2 as f32 * (q[l] >> 4) as f32 - dmin * m2 as f32;
            }
        }
    }
    fn quantize(x: &[f32]) -> Self {
        // Per sub-block: min (<= 0) and range, then 6-bit scales of both.
        let mut scale = [0f32; 8];
        let mut min = [0f32; 8];
        for j in 0..8 {
            let s = &x[j * 32..j * 32 + 32];
            let lo = s.iter().fold(f32::INFINITY, |a, &v| a.min(v)).min(0.0);
            let hi = s.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            scale[j] = (hi - lo) / 15.0;
            min[j] = -lo;
        }
        let max_scale = scale.iter().fold(0f32, |a, &v| a.max(v));
        let max_min = min.iter().fold(0f32, |a, &v| a.max(v));
        let d = f16::from_f32(max_scale / 63.0);
        let dmin = f16::from_f32(max_min / 63.0);
        let (df, dminf) = (d.to_f32(), dmin.to_f32());
        let mut sc = [0u8; 8];
        let mut m = [0u8; 8];
        for j in 0..8 {
            sc[j] = if df > 0.0 { nearest(scale[j] / df).clamp(0, 63) as u8 } else { 0 };
            m[j] = if dminf > 0.0 { nearest(min[j] / dminf).clamp(0, 63) as u8 } else { 0 };
        }
        let mut qs = [0u8; 128];
        for j in 0..8 {
            let step = df * sc[j] as f32;
            let offset = dminf * m[j] as f32;
            for l in 0..32 {
                let q = if step > 0.0 { nearest((x[j * 32 + l] + offset) / step).clamp(0, 15) as u8 } else { 0 };
                let byte = &mut qs[(j / 2) * 32 + l];
                *byte |= if j % 2 == 0 { q } else { q << 4 };
            }
        }
        BlockQ4K { d, dmin, scales: pack_scale_min_k4(&sc, &m), qs }
    }
}

/// `Q6_K`: 16 sub-blocks of 16 with int8 scales, 6-bit values stored as
/// 4 low bits (`ql`) and 2 high bits (`qh`). `x = d * sc * (q - 32)`.
#[repr(C)]
pub struct BlockQ6K {
    pub ql: [u8; 128],
    pub qh: [u8; 64],
    pub scales: [i8; 16],
    pub d: f16,
}
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);

impl QuantBlock for BlockQ6K {
    const ELEMS: usize = QK_K;
    const BYTES: usize = 210;
    #[inline]
    fn read(b: &[u8]) -> Self {
        let mut scales = [0i8; 16];
        for (s, &v) in scales.iter_mut().zip(&b[192..208]) {
            *s = v as i8;
        }
        BlockQ6K { ql: b[0..128].try_into().unwrap(), qh: b[128..192].try_into().unwrap(), scales, d: f16::from_f32(f16_at(b, 208)) }
    }
    fn write(&self, out: &mut [u8]) {
        out[0..128].copy_from_slice(&self.ql);
        out[128..192].copy_from_slice(&self.qh);
        for (o, &s) in out[192..208].iter_mut().zip(&self.scales) {
            *o = s as u8;
        }
        put_f16(out, 208, self.d.to_f32());
    }
}

/// Where element `i` (0..256) of a Q6_K block lives: (ql byte, ql shift,
/// qh byte, qh shift, scale index). Mirrors ggml's dequantize loop: two
/// halves of 128; in each, 32 lanes `l` produce elements l, l+32, l+64, l+96.
fn q6k_position(i: usize) -> (usize, u32, usize, u32, usize) {
    let half = i / 128;
    let r = i % 128;
    let (quarter, l) = (r / 32, r % 32);
    let ql = half * 64 + l + if quarter % 2 == 1 { 32 } else { 0 };
    let ql_shift = if quarter >= 2 { 4 } else { 0 };
    let qh = half * 32 + l;
    let qh_shift = 2 * quarter as u32;
    let scale = half * 8 + l / 16 + 2 * quarter;
    (ql, ql_shift, qh, qh_shift, scale)
}

impl FloatBlock for BlockQ6K {
    #[inline]
    fn dequantize(&self, out: &mut [f32]) {
        // `q6k_position`'s layout as loops with no division inside (a loop
        // the compiler vectorizes: a quantized head is dequantized a row per
        // token); `dequantized_by_position` in the tests holds it to it.
        let d = self.d.to_f32();
        for half in 0..2 {
            let (ql, qh) = (&self.ql[64 * half..][..64], &self.qh[32 * half..][..32]);
            for quarter in 0..4 {
                let (from, shift) = (32 * (quarter % 2), 4 * (quarter / 2));
                for sub in 0..2 {
                    let step = d * self.scales[8 * half + 2 * quarter + sub] as f32;
                    let y = &mut out[128 * half + 32 * quarter + 16 * sub..][..16];
                    for (l, y) in (16 * sub..16 * sub + 16).zip(y) {
                        let q = ((ql[from + l] >> shift) & 0xF) | (((qh[l] >> (2 * quarter)) & 3) << 4);
                        *y = step * (q as i32 - 32) as f32;
                    }
                }
            }
        }
    }
    fn quantize(x: &[f32]) -> Self {
        let mut sub = [0f32; 16];
        for (j, s) in sub.iter_mut().enumerate() {
            *s = x[j * 16..j * 16 + 16].iter().fold(0f32, |m, v| m.max(v.abs())) / 31.0;
        }
        let max_sub = sub.iter().fold(0f32, |m, &v| m.max(v));
        let d = f16::from_f32(max_sub / 127.0);
        let df = d.to_f32();
        let mut scales = [0i8; 16];
        for (sc, &s) in scales.iter_mut().zip(&sub) {
            *sc = if df > 0.0 { nearest(s / df).clamp(-128, 127) as i8 } else { 0 };
        }
        let mut block = BlockQ6K { ql: [0; 128], qh: [0; 64], scales, d };
        for (i, &v) in x.iter().enumerate().take(QK_K) {
            let (ql, qls, qh, qhs, s) = q6k_position(i);
            let step = df * block.scales[s] as f32;
            let q = if step != 0.0 { nearest(v / step).clamp(-32, 31) } else { 0 } + 32;
            block.ql[ql] |= ((q as u8) & 0xF) << qls;
            block.qh[qh] |= ((q as u8) >> 4) << qhs;
        }
        block
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Element `i` of a Q6_K block as its documented layout places it.
    fn dequantized_by_position(b: &BlockQ6K, i: usize) -> f32 {
        let (ql, qls, qh, qhs, s) = q6k_position(i);
        let q = ((b.ql[ql] >> qls) & 0xF) | (((b.qh[qh] >> qhs) & 3) << 4);
        b.d.to_f32() * b.scales[s] as f32 * (q as i32 - 32) as f32
    }

    /// The loops of `dequantize` read every element where the layout puts
    /// it, for blocks of arbitrary bytes.
    #[test]
    fn q6k_dequantize_follows_the_layout() {
        let mut seed = 7u64;
        let mut byte = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 56) as u8
        };
        for _ in 0..20 {
            let b = BlockQ6K {
                ql: std::array::from_fn(|_| byte()),
                qh: std::array::from_fn(|_| byte()),
                scales: std::array::from_fn(|_| byte() as i8),
                d: f16::from_f32(0.01 + byte() as f32 / 1000.0),
            };
            let mut out = [0f32; QK_K];
            b.dequantize(&mut out);
            for (i, &v) in out.iter().enumerate() {
                assert_eq!(v.to_bits(), dequantized_by_position(&b, i).to_bits(), "element {i}");
            }
        }
    }
}
