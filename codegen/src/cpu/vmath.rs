//! The interpreter's scalar math (`bitnet_ir::interp::math`) eight lanes
//! at a time (with [`Isa::Cranelift`], the generated four-lane kernels), bit for bit: the same IEEE steps in the same order, so
//! the gated units (SiLU, relu²) and softmax on AVX2 give exactly what
//! the interpreter gives.

use super::Isa;
use bitnet_ir::interp::kernels;
use bitnet_ir::GateAct;

/// `act(gate) · up` for four values, as [`kernels::glu`] computes each.
#[inline]
pub fn glu4(isa: Isa, act: GateAct, gate: [f32; 4], up: [f32; 4]) -> [f32; 4] {
    match isa.float_kernels() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller runs AVX2 kernels only where the CPU has AVX2.
        Isa::Avx2 => unsafe { avx2::glu4(act, gate, up) },
        Isa::Cranelift => {
            let mut out = [0f32; 4];
            elementwise().glu(act, &gate, &up, &mut out);
            out
        }
        _ => std::array::from_fn(|i| kernels::glu(act, gate[i], up[i])),
    }
}

/// `out = act(gate) · up`, as [`kernels::glu`] computes each value.
pub fn glu(isa: Isa, act: GateAct, gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len(), "glu: operands differ in length");
    match isa.float_kernels() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; the lengths are checked.
        Isa::Avx2 => unsafe { avx2::glu(act, gate, up, out) },
        Isa::Cranelift => elementwise().glu(act, gate, up, out),
        _ => out.iter_mut().zip(gate).zip(up).for_each(|((o, &g), &u)| *o = kernels::glu(act, g, u)),
    }
}

/// [`kernels::softmax`] of one row, in place.
pub fn softmax(isa: Isa, row: &mut [f32]) {
    match isa.float_kernels() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { avx2::softmax(row) },
        Isa::Cranelift => elementwise().softmax(row),
        _ => kernels::softmax(row),
    }
}

/// The generated kernels, the same bits as the ones here.
fn elementwise() -> &'static super::jit::ElementwiseJit {
    super::jit::ElementwiseJit::get().expect("Isa::Cranelift is available")
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use bitnet_ir::interp::{kernels, math};
    use bitnet_ir::GateAct;
    use std::arch::x86_64::*;

    /// [`math::exp`] in eight lanes.
    #[target_feature(enable = "avx2")]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        let xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(math::CLAMP.0)), _mm256_set1_ps(math::CLAMP.1));
        let n = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)), _mm256_set1_ps(0.5)));
        let r = _mm256_sub_ps(xc, _mm256_mul_ps(n, _mm256_set1_ps(math::LN2_HI)));
        let r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(math::LN2_LO)));
        let mut p = _mm256_set1_ps(math::POLY[0]);
        for &c in &math::POLY[1..] {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r), _mm256_set1_ps(1.0));
        let n = _mm256_cvtps_epi32(n);
        let half = _mm256_srai_epi32::<1>(n);
        let pow2 = |k: __m256i| _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(k, _mm256_set1_epi32(127))));
        let e = _mm256_mul_ps(_mm256_mul_ps(y, pow2(half)), pow2(_mm256_sub_epi32(n, half)));
        _mm256_blendv_ps(e, x, nan)
    }

    /// `act(x) · u` as the interpreter has it: SiLU `x / (1 + exp(−x))`;
    /// relu² `(x > 0 ? x : 0)²` (a comparison, so NaN gives 0 as
    /// `f32::max` does; the square makes the sign of a zero moot).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) unsafe fn glu8(act: GateAct, x: __m256, u: __m256) -> __m256 {
        let a = match act {
            GateAct::Silu => {
                let neg = _mm256_xor_ps(x, _mm256_set1_ps(-0.0));
                _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), exp8(neg)))
            }
            GateAct::Relu2 => {
                let r = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_setzero_ps()), x);
                _mm256_mul_ps(r, r)
            }
        };
        _mm256_mul_ps(a, u)
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn glu4(act: GateAct, g: [f32; 4], u: [f32; 4]) -> [f32; 4] {
        let wide = |v: [f32; 4]| _mm256_castps128_ps256(_mm_loadu_ps(v.as_ptr()));
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), _mm256_castps256_ps128(glu8(act, wide(g), wide(u))));
        out
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn glu(act: GateAct, g: &[f32], u: &[f32], out: &mut [f32]) {
        let n = out.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            let v = glu8(act, _mm256_loadu_ps(g.as_ptr().add(i)), _mm256_loadu_ps(u.as_ptr().add(i)));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
        }
        for i in n..out.len() {
            out[i] = kernels::glu(act, g[i], u[i]);
        }
    }

    /// The interpreter's softmax: the maximum (the same in any order), the
    /// exponentials eight at a time, their sum in order, the divisions.
    #[target_feature(enable = "avx2")]
    pub unsafe fn softmax(row: &mut [f32]) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let n = row.len() / 8 * 8;
        let m8 = _mm256_set1_ps(max);
        for i in (0..n).step_by(8) {
            let p = row.as_mut_ptr().add(i);
            _mm256_storeu_ps(p, exp8(_mm256_sub_ps(_mm256_loadu_ps(p), m8)));
        }
        for v in &mut row[n..] {
            *v = math::exp(*v - max);
        }
        let sum = row.iter().fold(0f32, |s, &v| s + v);
        let s8 = _mm256_set1_ps(sum);
        for i in (0..n).step_by(8) {
            let p = row.as_mut_ptr().add(i);
            _mm256_storeu_ps(p, _mm256_div_ps(_mm256_loadu_ps(p), s8));
        }
        for v in &mut row[n..] {
            *v /= sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnet_ir::interp::math;

    fn inputs() -> Vec<f32> {
        let mut v = vec![0.0, -0.0, 1.0, -1.0, 88.72, 88.73, 89.0, 1e9, -87.3, -87.4, -100.0, -103.9, -104.0, -1e9, f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
        v.extend((0..200_000).map(|i| (i as f32 - 100_000.0) * 0.001_1));
        v.extend((0..20_000).map(|i| f32::from_bits((i as u32).wrapping_mul(2654435761))));
        v
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp8_is_the_scalar_exp() {
        use std::arch::x86_64::*;
        if !Isa::Avx2.available() {
            return eprintln!("skipped: no AVX2");
        }
        for c in inputs().chunks(8) {
            let mut x = [0f32; 8];
            x[..c.len()].copy_from_slice(c);
            let mut got = [0f32; 8];
            // SAFETY: AVX2 checked above; x and got hold 8 floats each.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), avx2::exp8(_mm256_loadu_ps(x.as_ptr()))) };
            for (g, x) in got.iter().zip(x) {
                let want = math::exp(x);
                assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "exp({x}): {g} vs {want}");
            }
        }
    }

    /// Both ISAs give the interpreter's bits, on awkward lengths.
    #[test]
    fn glu_and_softmax_are_the_interpreters() {
        let xs = inputs();
        let ups: Vec<f32> = xs.iter().map(|v| v.sin() * 3.0).collect();
        for isa in [Isa::Scalar, Isa::Avx2].into_iter().filter(|i| i.available()) {
            for n in [1usize, 3, 4, 8, 13, 783, 2592] {
                for (g, u) in xs.chunks(n).zip(ups.chunks(n)).take(40) {
                    for act in [GateAct::Silu, GateAct::Relu2] {
                        let mut out = vec![0f32; g.len()];
                        glu(isa, act, g, u, &mut out);
                        for (i, o) in out.iter().enumerate() {
                            let want = kernels::glu(act, g[i], u[i]);
                            assert!(o.to_bits() == want.to_bits() || (o.is_nan() && want.is_nan()), "{isa:?} {act:?} {}: {o} vs {want}", g[i]);
                        }
                        if g.len() == 4 {
                            let four = glu4(isa, act, g.try_into().unwrap(), u.try_into().unwrap());
                            assert_eq!(four.map(f32::to_bits), [0, 1, 2, 3].map(|i| kernels::glu(act, g[i], u[i]).to_bits()));
                        }
                    }
                    let finite: Vec<f32> = g.iter().map(|v| if v.is_finite() { v.clamp(-300.0, 300.0) } else { 1.0 }).collect();
                    let (mut want, mut got) = (finite.clone(), finite);
                    kernels::softmax(&mut want);
                    softmax(isa, &mut got);
                    assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{isa:?} n {n}");
                }
            }
        }
    }
}
