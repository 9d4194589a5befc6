//! Packed ternary layouts: llama.cpp's `TQ1_0` and `TQ2_0`, bitnet.cpp's
//! `I2_S`. Each stores codes for -1, 0, +1; the `TQ` types carry one f16
//! scale per 256 values, I2_S one f32 scale per tensor (after all blocks).

use super::{f16_at, put_f16, QuantBlock, TernaryBlock};
use half::f16;

/// `TQ2_0`: 256 values as 2-bit codes (value + 1), then an f16 scale.
/// Element `n` is in byte `32 * (n / 128) + n % 32` at bit `2 * ((n % 128) / 32)`.
#[repr(C)]
pub struct BlockTQ2_0 {
    pub qs: [u8; 64],
    pub d: f16,
}
const _: () = assert!(std::mem::size_of::<BlockTQ2_0>() == 66);

impl QuantBlock for BlockTQ2_0 {
    const ELEMS: usize = 256;
    const BYTES: usize = 66;
    fn read(b: &[u8]) -> Self {
        BlockTQ2_0 { qs: b[0..64].try_into().unwrap(), d: f16::from_f32(f16_at(b, 64)) }
    }
    fn write(&self, out: &mut [u8]) {
        out[0..64].copy_from_slice(&self.qs);
        put_f16(out, 64, self.d.to_f32());
    }
}

impl TernaryBlock for BlockTQ2_0 {
    fn codes(&self, out: &mut [i8]) -> f32 {
        for (n, o) in out.iter_mut().enumerate().take(256) {
            let byte = self.qs[32 * (n / 128) + n % 32];
            *o = ((byte >> (2 * ((n % 128) / 32))) & 3) as i8 - 1;
        }
        self.d.to_f32()
    }
    fn from_codes(codes: &[i8], scale: f32) -> Self {
        let mut qs = [0u8; 64];
        for (n, &c) in codes.iter().enumerate().take(256) {
            qs[32 * (n / 128) + n % 32] |= ((c + 1) as u8) << (2 * ((n % 128) / 32));
        }
        BlockTQ2_0 { qs, d: f16::from_f32(scale) }
    }
}

/// `TQ1_0`: 256 values as base-3 digits, five per byte in `qs` (48 bytes)
/// and four per byte in `qh` (4 bytes), then an f16 scale. A byte holds
/// `ceil(t * 256 / 243)` for the trit number `t` (most significant first),
/// so digit `k` is recovered as `((byte * 3^k) mod 256) * 3 >> 8`.
#[repr(C)]
pub struct BlockTQ1_0 {
    pub qs: [u8; 48],
    pub qh: [u8; 4],
    pub d: f16,
}
const _: () = assert!(std::mem::size_of::<BlockTQ1_0>() == 54);

const POW3: [u8; 5] = [1, 3, 9, 27, 81];

/// (byte index into qs ++ qh, digit index) of element `n`. The first 160
/// elements use qs[0..32] (element = digit * 32 + byte), the next 80 use
/// qs[32..48] (element = 160 + digit * 16 + byte), the last 16 use qh
/// (element = 240 + digit * 4 + byte).
fn tq1_position(n: usize) -> (usize, usize) {
    if n < 160 {
        (n % 32, n / 32)
    } else if n < 240 {
        (32 + (n - 160) % 16, (n - 160) / 16)
    } else {
        (48 + (n - 240) % 4, (n - 240) / 4)
    }
}

fn trit(byte: u8, digit: usize) -> i8 {
    let q = byte.wrapping_mul(POW3[digit]);
    (((q as u16) * 3) >> 8) as i8 - 1
}

impl QuantBlock for BlockTQ1_0 {
    const ELEMS: usize = 256;
    const BYTES: usize = 54;
    fn read(b: &[u8]) -> Self {
        BlockTQ1_0 { qs: b[0..48].try_into().unwrap(), qh: b[48..52].try_into().unwrap(), d: f16::from_f32(f16_at(b, 52)) }
    }
    fn write(&self, out: &mut [u8]) {
        out[0..48].copy_from_slice(&self.qs);
        out[48..52].copy_from_slice(&self.qh);
        put_f16(out, 52, self.d.to_f32());
    }
}

impl TernaryBlock for BlockTQ1_0 {
    fn codes(&self, out: &mut [i8]) -> f32 {
        for (n, o) in out.iter_mut().enumerate().take(256) {
            let (i, digit) = tq1_position(n);
            let byte = if i < 48 { self.qs[i] } else { self.qh[i - 48] };
            *o = trit(byte, digit);
        }
        self.d.to_f32()
    }
    fn from_codes(codes: &[i8], scale: f32) -> Self {
        // Accumulate each byte's trits, most significant first.
        let mut value = [0u16; 52];
        let mut digits = [0usize; 52];
        for (n, &c) in codes.iter().enumerate().take(256) {
            let (i, _) = tq1_position(n);
            value[i] = value[i] * 3 + (c + 1) as u16;
            digits[i] += 1;
        }
        let mut bytes = [0u8; 52];
        for i in 0..52 {
            let mut v = value[i];
            // qh bytes hold four trits; shift them to the top of five.
            for _ in digits[i]..5 {
                v *= 3;
            }
            bytes[i] = (v * 256).div_ceil(243) as u8;
        }
        BlockTQ1_0 { qs: bytes[0..48].try_into().unwrap(), qh: bytes[48..52].try_into().unwrap(), d: f16::from_f32(scale) }
    }
}

/// `I2_S` (bitnet.cpp, `quantize_i2_s` on x86): 128 values in 32 bytes, code = value + 1; byte `b`
/// holds elements b, b+32, b+64, b+96 in bits 7:6, 5:4, 3:2, 1:0. The
/// tensor's single f32 scale follows the last block (see [`super::pack_i2s`]).
#[repr(C)]
pub struct BlockI2S {
    pub qs: [u8; 32],
}
const _: () = assert!(std::mem::size_of::<BlockI2S>() == 32);

impl QuantBlock for BlockI2S {
    const ELEMS: usize = 128;
    const BYTES: usize = 32;
    fn read(b: &[u8]) -> Self {
        BlockI2S { qs: b[0..32].try_into().unwrap() }
    }
    fn write(&self, out: &mut [u8]) {
        out[0..32].copy_from_slice(&self.qs);
    }
}

impl BlockI2S {
    /// The codes of this block; the scale lives with the tensor.
    pub fn codes(&self, out: &mut [i8]) {
        for (n, o) in out.iter_mut().enumerate().take(128) {
            let shift = 6 - 2 * (n / 32);
            // Code 3 is unused; bitnet.cpp's dequantizer reads it as 0.
            *o = [-1, 0, 1, 0][((self.qs[n % 32] >> shift) & 3) as usize];
        }
    }
    pub fn from_codes(codes: &[i8], _scale: f32) -> Self {
        let mut qs = [0u8; 32];
        for (n, &c) in codes.iter().enumerate().take(128) {
            qs[n % 32] |= ((c + 1) as u8) << (6 - 2 * (n / 32));
        }
        BlockI2S { qs }
    }
}
