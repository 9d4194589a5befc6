//! `Q8_0`: 32 int8 values with one f16 scale.

use super::{f16_at, nearest, put_f16, FloatBlock, QuantBlock};
use half::f16;

#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

impl QuantBlock for BlockQ8_0 {
    const ELEMS: usize = 32;
    const BYTES: usize = 34;
    #[inline]
    fn read(b: &[u8]) -> Self {
        let mut qs = [0i8; 32];
        for (q, &v) in qs.iter_mut().zip(&b[2..34]) {
            *q = v as i8;
        }
        BlockQ8_0 { d: f16::from_f32(f16_at(b, 0)), qs }
    }
    fn write(&self, out: &mut [u8]) {
        put_f16(out, 0, self.d.to_f32());
        for (o, &q) in out[2..34].iter_mut().zip(&self.qs) {
            *o = q as u8;
        }
    }
}

impl FloatBlock for BlockQ8_0 {
    #[inline]
    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = q as f32 * d;
        }
    }
    fn quantize(x: &[f32]) -> Self {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; 32];
        for (q, &v) in qs.iter_mut().zip(x) {
            *q = nearest(v * id).clamp(-127, 127) as i8;
        }
        BlockQ8_0 { d: f16::from_f32(d), qs }
    }
}
