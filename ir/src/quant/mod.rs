//! Byte layouts of the block-quantized and packed ternary types, with a
//! plain scalar quantizer and dequantizer for each.
//!
//! Every block is a `#[repr(C)]` struct whose size is asserted at compile
//! time against the GGUF layout it mirrors. Blocks are read from and written
//! to little-endian bytes field by field, so nothing here depends on the
//! host's alignment or endianness.

mod kquants;
mod q8_0;
mod ternary;

pub use kquants::{BlockQ4K, BlockQ6K};
pub use q8_0::BlockQ8_0;
pub use ternary::{BlockI2S, BlockTQ1_0, BlockTQ2_0};

use crate::DType;
use half::{bf16, f16};

/// A fixed-size block of `ELEMS` values stored in `BYTES` bytes.
pub trait QuantBlock: Sized {
    const ELEMS: usize;
    const BYTES: usize;
    /// Reads a block from exactly `BYTES` bytes.
    fn read(b: &[u8]) -> Self;
    /// Writes the block into exactly `BYTES` bytes.
    fn write(&self, out: &mut [u8]);
}

/// Blocks that hold float data with their own scales.
pub trait FloatBlock: QuantBlock {
    fn dequantize(&self, out: &mut [f32]);
    fn quantize(x: &[f32]) -> Self;
}

/// Blocks of ternary codes (-1, 0, +1) with one scale per block.
pub trait TernaryBlock: QuantBlock {
    /// Writes the `ELEMS` codes and returns the block scale.
    fn codes(&self, out: &mut [i8]) -> f32;
    fn from_codes(codes: &[i8], scale: f32) -> Self;
}

pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

pub(crate) fn put_f16(out: &mut [u8], at: usize, v: f32) {
    out[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// `round(x)` with ties away from zero, as C's `roundf`.
pub(crate) fn nearest(x: f32) -> i32 {
    x.round() as i32
}

/// One row (or any run of whole blocks) of a stored tensor.
#[derive(Clone, Copy, Debug)]
pub struct RowView<'a> {
    pub dtype: DType,
    pub bytes: &'a [u8],
    /// The per-tensor scale of I2_S; 1.0 for every other type.
    pub tensor_scale: f32,
}

impl RowView<'_> {
    /// Dequantizes the row into `out` (whose length is the row length).
    pub fn dequantize(&self, out: &mut [f32]) {
        let b = self.bytes;
        match self.dtype {
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::Q8_0 => dequantize_blocks::<BlockQ8_0>(b, out),
            DType::Q4K => dequantize_blocks::<BlockQ4K>(b, out),
            DType::Q6K => dequantize_blocks::<BlockQ6K>(b, out),
            DType::TQ1_0 | DType::TQ2_0 | DType::I2S => {
                let mut codes = vec![0i8; out.len()];
                let mut scales = Vec::new();
                let block = self.ternary(&mut codes, &mut scales);
                for (i, (o, &c)) in out.iter_mut().zip(&codes).enumerate() {
                    *o = c as f32 * scales[i / block];
                }
            }
            DType::I8 | DType::I32 | DType::Q8Row => {
                unreachable!("{} is not a weight type", self.dtype)
            }
        }
    }

    /// Unpacks a ternary row into codes and per-block scales; returns the
    /// number of elements each scale covers.
    pub fn ternary(&self, codes: &mut [i8], scales: &mut Vec<f32>) -> usize {
        scales.clear();
        match self.dtype {
            DType::TQ1_0 => ternary_blocks::<BlockTQ1_0>(self.bytes, codes, scales),
            DType::TQ2_0 => ternary_blocks::<BlockTQ2_0>(self.bytes, codes, scales),
            DType::I2S => {
                // The last block of a row that is not whole blocks holds
                // zero weights past the row's end.
                let mut tail = [0i8; BlockI2S::ELEMS];
                for (blk, c) in self.bytes.chunks_exact(BlockI2S::BYTES).zip(codes.chunks_mut(BlockI2S::ELEMS)) {
                    if c.len() == BlockI2S::ELEMS {
                        BlockI2S::read(blk).codes(c);
                    } else {
                        BlockI2S::read(blk).codes(&mut tail);
                        c.copy_from_slice(&tail[..c.len()]);
                    }
                }
                scales.push(self.tensor_scale);
                codes.len().max(1)
            }
            other => unreachable!("{other} is not ternary"),
        }
    }
}

/// Blocks of `B` from `b` into `out`, whole blocks only. Inlined, so that
/// a caller compiled for wider vectors (the CPU backend's AVX2 float path)
/// vectorizes the blocks' own code with them.
#[inline(always)]
pub fn dequantize_blocks<B: FloatBlock>(b: &[u8], out: &mut [f32]) {
    for (blk, o) in b.chunks_exact(B::BYTES).zip(out.chunks_exact_mut(B::ELEMS)) {
        B::read(blk).dequantize(o);
    }
}

fn ternary_blocks<B: TernaryBlock>(b: &[u8], codes: &mut [i8], scales: &mut Vec<f32>) -> usize {
    for (blk, c) in b.chunks_exact(B::BYTES).zip(codes.chunks_exact_mut(B::ELEMS)) {
        scales.push(B::read(blk).codes(c));
    }
    B::ELEMS
}

/// Quantizes a whole tensor of `x.len()` values (a whole number of blocks)
/// into `dtype`'s stored bytes. Ternary types round `x / scale` to -1, 0, 1
/// where the scale is the block's (TQ) or the tensor's (I2_S) largest |x|:
/// exact for values that are already ternary times one scale.
pub fn quantize(dtype: DType, x: &[f32]) -> Vec<u8> {
    let n = x.len();
    let size = dtype.bytes_for(n).expect("quantize: not a whole number of blocks");
    let mut out = vec![0u8; size];
    match dtype {
        DType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        DType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
        DType::Q8_0 => quantize_blocks::<BlockQ8_0>(x, &mut out),
        DType::Q4K => quantize_blocks::<BlockQ4K>(x, &mut out),
        DType::Q6K => quantize_blocks::<BlockQ6K>(x, &mut out),
        DType::TQ1_0 => ternary_from_floats::<BlockTQ1_0>(x, &mut out),
        DType::TQ2_0 => ternary_from_floats::<BlockTQ2_0>(x, &mut out),
        DType::I2S => {
            let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let codes: Vec<i8> = x.iter().map(|&v| ternary_code(v, scale)).collect();
            return pack_i2s(&codes, scale);
        }
        DType::I8 | DType::I32 | DType::Q8Row => panic!("quantize: {dtype} is not a weight type"),
    }
    out
}

fn ternary_code(v: f32, scale: f32) -> i8 {
    if scale == 0.0 {
        0
    } else {
        nearest(v / scale).clamp(-1, 1) as i8
    }
}

fn quantize_blocks<B: FloatBlock>(x: &[f32], out: &mut [u8]) {
    for (xb, o) in x.chunks_exact(B::ELEMS).zip(out.chunks_exact_mut(B::BYTES)) {
        B::quantize(xb).write(o);
    }
}

fn ternary_from_floats<B: TernaryBlock>(x: &[f32], out: &mut [u8]) {
    let mut codes = vec![0i8; B::ELEMS];
    for (xb, o) in x.chunks_exact(B::ELEMS).zip(out.chunks_exact_mut(B::BYTES)) {
        let d = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (c, &v) in codes.iter_mut().zip(xb) {
            *c = ternary_code(v, d);
        }
        B::from_codes(&codes, d).write(o);
    }
}

/// Packs ternary codes with one scale per block of `B::ELEMS` (TQ types).
pub fn pack_ternary(dtype: DType, codes: &[i8], scales: &[f32]) -> Vec<u8> {
    match dtype {
        DType::TQ1_0 => pack_blocks::<BlockTQ1_0>(codes, scales),
        DType::TQ2_0 => pack_blocks::<BlockTQ2_0>(codes, scales),
        DType::I2S => pack_i2s(codes, scales[0]),
        other => panic!("pack_ternary: {other} is not ternary"),
    }
}

fn pack_blocks<B: TernaryBlock>(codes: &[i8], scales: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; codes.len() / B::ELEMS * B::BYTES];
    for ((c, o), &d) in codes.chunks_exact(B::ELEMS).zip(out.chunks_exact_mut(B::BYTES)).zip(scales) {
        B::from_codes(c, d).write(o);
    }
    out
}

/// I2_S: blocks of packed codes for the whole tensor, then one f32 scale,
/// padded to 32 bytes.
pub fn pack_i2s(codes: &[i8], scale: f32) -> Vec<u8> {
    let body = codes.len() / BlockI2S::ELEMS * BlockI2S::BYTES;
    let mut out = vec![0u8; body + 32];
    for (c, o) in codes.chunks_exact(BlockI2S::ELEMS).zip(out.chunks_exact_mut(BlockI2S::BYTES)) {
        BlockI2S::from_codes(c, scale).write(o);
    }
    out[body..body + 4].copy_from_slice(&scale.to_le_bytes());
    out
}

/// Packs `[rows, k]` ternary codes as I2_S with rows of whole blocks:
/// [`pack_i2s`] when `k` is a multiple of 128, else each row padded with
/// zero weights (see [`DType::row_bytes`]).
pub fn pack_i2s_rows(codes: &[i8], k: usize, scale: f32) -> Vec<u8> {
    let kp = k.div_ceil(BlockI2S::ELEMS) * BlockI2S::ELEMS;
    if kp == k {
        return pack_i2s(codes, scale);
    }
    let mut padded = vec![0i8; codes.len() / k * kp];
    for (row, out) in codes.chunks_exact(k).zip(padded.chunks_exact_mut(kp)) {
        out[..k].copy_from_slice(row);
    }
    pack_i2s(&padded, scale)
}

/// The per-tensor scale stored after `body` bytes of I2_S codes (`n / 4`
/// for `n` weights in rows of whole blocks).
pub fn i2s_scale(bytes: &[u8], body: usize) -> f32 {
    f32::from_le_bytes([bytes[body], bytes[body + 1], bytes[body + 2], bytes[body + 3]])
}

#[cfg(test)]
mod tests;
