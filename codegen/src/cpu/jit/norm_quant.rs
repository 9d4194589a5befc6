//! RMSNorm fused with BitNet's per-token activation quantization, one row
//! per call: the interpreter's arithmetic step for step, so the int8
//! values, γ and `Σ q` are bit-identical to it. Four f32 lanes at a time
//! (the sum of squares: its eight f64 partial sums as four pairs of
//! lanes), the last values one at a time.
//!
//! - `Σ x²` in f64, in the interpreter's order (`kernels::sum_squares`:
//!   eight partial sums, then those in order); `s = 1 / sqrt((Σ x² / k) as f32 + eps)`;
//!   `y = x · s · w` (skipped without a norm);
//! - `γ = 127 / max(max|y|, 1e-5)`, the maximum taken with comparisons so
//!   a NaN is passed over as `f32::max` passes it over;
//! - `q = clamp(round(γ·y), −128, 127)` with Rust's rounding (halves away
//!   from zero; Cranelift's `nearest` rounds them to even, so halves are
//!   found and fixed), and NaN → 0 as `as i8` does.

use super::{at, begin, define_all, emit_loop, end, host_isa, ModuleBox};
use cranelift_codegen::ir::{
    condcodes::{FloatCC, IntCC},
    types, AbiParam, ConstantData, Endianness, Function, InstBuilder, MemFlagsData, Signature, Type, Value,
};
use cranelift_codegen::isa::TargetFrontendConfig;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Module};
use std::sync::OnceLock;

/// `row(x, w, k, eps, y, q, out)`: `y` is scratch for `k` floats; `out`
/// receives γ (as f32 bits) then `Σ q`.
type RowFn = unsafe extern "C" fn(x: *const f32, w: *const f32, k: usize, eps: f32, y: *mut f32, q: *mut i8, out: *mut i32);

pub struct NormQuantJit {
    with_norm: RowFn,
    plain: RowFn,
    norm_only: RowFn,
    _module: ModuleBox,
}

impl NormQuantJit {
    pub fn get() -> Result<&'static NormQuantJit, String> {
        static JIT: OnceLock<Result<NormQuantJit, String>> = OnceLock::new();
        JIT.get_or_init(NormQuantJit::compile).as_ref().map_err(Clone::clone)
    }

    /// Quantizes row `x` (normalized by `norm = (w, eps)` first, if given)
    /// into `q`; returns (γ, Σ q). `scratch` holds `x.len()` floats.
    pub fn row(&self, x: &[f32], norm: Option<(&[f32], f32)>, scratch: &mut [f32], q: &mut [i8]) -> (f32, i32) {
        let k = x.len();
        assert!(scratch.len() >= k && q.len() >= k && norm.is_none_or(|(w, _)| w.len() == k), "norm_quant: mismatched rows");
        let mut out = [0i32; 2];
        let (f, w, eps) = match norm {
            Some((w, eps)) => (self.with_norm, w.as_ptr(), eps),
            None => (self.plain, std::ptr::null(), 0.0),
        };
        // SAFETY: every pointer is valid for `k` elements (checked above).
        unsafe { f(x.as_ptr(), w, k, eps, scratch.as_mut_ptr(), q.as_mut_ptr(), out.as_mut_ptr()) };
        (f32::from_bits(out[0] as u32), out[1])
    }

    /// The interpreter's `rms_norm` of row `x` into `out`, without quantizing.
    pub fn norm(&self, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let k = x.len();
        assert!(w.len() == k && out.len() == k, "rms_norm: mismatched rows");
        let mut unused = [0i32; 2];
        // SAFETY: x, w and out hold `k` values; q is not written.
        unsafe { (self.norm_only)(x.as_ptr(), w.as_ptr(), k, eps, out.as_mut_ptr(), std::ptr::null_mut(), unused.as_mut_ptr()) };
    }

    fn compile() -> Result<NormQuantJit, String> {
        let mut module = JITModule::new(JITBuilder::with_isa(host_isa()?, default_libcall_names()));
        let config = module.target_config();
        let ptr = config.pointer_type();
        let mut sig = Signature::new(config.default_call_conv);
        sig.params.extend([AbiParam::new(ptr), AbiParam::new(ptr), AbiParam::new(ptr), AbiParam::new(types::F32)]);
        sig.params.extend([AbiParam::new(ptr), AbiParam::new(ptr), AbiParam::new(ptr)]);
        let fns = [("rms_norm_quant_row".to_string(), sig.clone()), ("quantize_row".to_string(), sig.clone()), ("rms_norm_row".to_string(), sig)];
        let code = define_all(&mut module, &fns, |i, _, func, fbc| build(func, fbc, config, i != 1, i != 2))?;
        // SAFETY: all three were built with the RowFn signature.
        let f = |i: usize| unsafe { std::mem::transmute::<*const u8, RowFn>(code[i]) };
        Ok(NormQuantJit { with_norm: f(0), plain: f(1), norm_only: f(2), _module: ModuleBox(module) })
    }
}

/// The row function: normalize into `y` when `norm`, then quantize when `quantize`.
fn build(func: &mut Function, fbc: &mut FunctionBuilderContext, config: TargetFrontendConfig, norm: bool, quantize: bool) {
    let ptr = config.pointer_type();
    let mut b = FunctionBuilder::new(func, fbc);
    let p = begin(&mut b);
    let (x, w, k, eps, y, q, out) = (p[0], p[1], p[2], p[3], p[4], p[5], p[6]);
    let flags = MemFlagsData::new().with_notrap();
    let i0 = b.ins().iconst(ptr, 0);

    // y = x · s · w, or y = x.
    let src = if norm {
        // Σ x² in eight partial sums, element i into sum i mod 8, then those in order.
        let z = b.ins().f64const(0.0);
        let lanes: [Variable; 8] = std::array::from_fn(|_| {
            let l = b.declare_var(types::F64);
            b.def_var(l, z);
            l
        });
        let add_square = |b: &mut FunctionBuilder, lane: Variable, i: Value| {
            let a = at(b, x, i, 2);
            let v = b.ins().load(types::F32, flags, a, 0);
            let v = b.ins().fpromote(types::F64, v);
            let sq = b.ins().fmul(v, v);
            let s = b.use_var(lane);
            let s = b.ins().fadd(s, sq);
            b.def_var(lane, s);
        };
        // Eight at a time: the eight sums as four pairs of f64 lanes.
        let zv = b.ins().splat(types::F64X2, z);
        let pairs: [Variable; 4] = std::array::from_fn(|_| {
            let l = b.declare_var(types::F64X2);
            b.def_var(l, zv);
            l
        });
        let upper = b.func.dfg.immediates.push(ConstantData::from((8u8..16).chain(8..16).collect::<Vec<u8>>()));
        let k8 = b.ins().band_imm_s(k, !7);
        emit_loop(&mut b, ptr, i0, k8, 8, |b, i| {
            let a = at(b, x, i, 2);
            for half in 0..2 {
                let v = b.ins().load(types::F32X4, flags, a, 16 * half);
                let bytes = b.ins().bitcast(types::I8X16, little(), v);
                let hi = b.ins().shuffle(bytes, bytes, upper);
                let hi = b.ins().bitcast(types::F32X4, little(), hi);
                for (j, part) in [v, hi].into_iter().enumerate() {
                    let d = b.ins().fvpromote_low(part);
                    let sq = b.ins().fmul(d, d);
                    let pair = pairs[2 * half as usize + j];
                    let s = b.use_var(pair);
                    let s = b.ins().fadd(s, sq);
                    b.def_var(pair, s);
                }
            }
        });
        for (j, &lane) in lanes.iter().enumerate() {
            let pair = b.use_var(pairs[j / 2]);
            let v = b.ins().extractlane(pair, (j % 2) as u8);
            b.def_var(lane, v);
        }
        // The last k mod 8 elements, into sums 0, 1, ... in turn.
        for (tail, &lane) in lanes[..7].iter().enumerate() {
            let (body, next) = (b.create_block(), b.create_block());
            let j = b.ins().iadd_imm_u(k8, tail as i64);
            let more = b.ins().icmp(IntCC::UnsignedLessThan, j, k);
            b.ins().brif(more, body, &[], next, &[]);
            b.switch_to_block(body);
            add_square(&mut b, lane, j);
            b.ins().jump(next, &[]);
            b.switch_to_block(next);
        }
        let mut s = z;
        for &lane in &lanes {
            let l = b.use_var(lane);
            s = b.ins().fadd(s, l);
        }
        let kf = b.ins().fcvt_from_uint(types::F64, k);
        let mean = b.ins().fdiv(s, kf);
        let mean = b.ins().fdemote(types::F32, mean);
        let m = b.ins().fadd(mean, eps);
        let root = b.ins().sqrt(m);
        let one = b.ins().f32const(1.0);
        let scale = b.ins().fdiv(one, root);
        let k4 = b.ins().band_imm_s(k, !3);
        let mut from = i0;
        for ty in [types::F32X4, types::F32] {
            let (to, step) = if ty.is_vector() { (k4, 4) } else { (k, 1) };
            let sv = if ty.is_vector() { b.ins().splat(ty, scale) } else { scale };
            from = emit_loop(&mut b, ptr, from, to, step, |b, i| {
                let (xa, wa, ya) = (at(b, x, i, 2), at(b, w, i, 2), at(b, y, i, 2));
                let v = b.ins().load(ty, flags, xa, 0);
                let g = b.ins().load(ty, flags, wa, 0);
                let vs = b.ins().fmul(v, sv);
                let r = b.ins().fmul(vs, g);
                b.ins().store(flags, r, ya, 0);
            });
        }
        y
    } else {
        x
    };
    if !quantize {
        return end(b, config);
    }

    // γ = 127 / max(max|y|, 1e-5). A maximum by comparisons is the same
    // in any order (NaN never wins one), so four lanes, then across them.
    let k4 = b.ins().band_imm_s(k, !3);
    let z = b.ins().f32const(0.0);
    let zv = b.ins().splat(types::F32X4, z);
    let lane_max = b.declare_var(types::F32X4);
    b.def_var(lane_max, zv);
    let after = emit_loop(&mut b, ptr, i0, k4, 4, |b, i| {
        let a = at(b, src, i, 2);
        let v = b.ins().load(types::F32X4, flags, a, 0);
        let v = b.ins().fabs(v);
        let m = b.use_var(lane_max);
        let gt = b.ins().fcmp(FloatCC::GreaterThan, v, m);
        let gt = b.ins().bitcast(types::F32X4, MemFlagsData::new(), gt);
        let m = b.ins().bitselect(gt, v, m);
        b.def_var(lane_max, m);
    });
    let amax = b.declare_var(types::F32);
    b.def_var(amax, z);
    let keep_larger = |b: &mut FunctionBuilder, v: Value| {
        let m = b.use_var(amax);
        let gt = b.ins().fcmp(FloatCC::GreaterThan, v, m);
        let m = b.ins().select(gt, v, m);
        b.def_var(amax, m);
    };
    let lanes = b.use_var(lane_max);
    for l in 0..4 {
        let v = b.ins().extractlane(lanes, l);
        keep_larger(&mut b, v);
    }
    emit_loop(&mut b, ptr, after, k, 1, |b, i| {
        let a = at(b, src, i, 2);
        let v = b.ins().load(types::F32, flags, a, 0);
        let v = b.ins().fabs(v);
        keep_larger(b, v);
    });
    let m = b.use_var(amax);
    let floor = b.ins().f32const(1e-5);
    let gt = b.ins().fcmp(FloatCC::GreaterThan, m, floor);
    let m = b.ins().select(gt, m, floor);
    let c127 = b.ins().f32const(127.0);
    let gamma = b.ins().fdiv(c127, m);

    // q = clamp(round(γ·y), −128, 127); Σ q: four lanes, then the tail.
    let sum = b.declare_var(types::I32);
    let zi = b.ins().iconst(types::I32, 0);
    b.def_var(sum, zi);
    let lane_sum = b.declare_var(types::I32X4);
    let ziv = b.ins().splat(types::I32X4, zi);
    b.def_var(lane_sum, ziv);
    let mut from = i0;
    for ty in [types::F32X4, types::F32] {
        let (to, step) = if ty.is_vector() { (k4, 4) } else { (k, 1) };
        let int = if ty.is_vector() { types::I32X4 } else { types::I32 };
        let gv = if ty.is_vector() { b.ins().splat(ty, gamma) } else { gamma };
        from = emit_loop(&mut b, ptr, from, to, step, |b, i| {
            let a = at(b, src, i, 2);
            let v = b.ins().load(ty, flags, a, 0);
            let n = emit_quantize(b, ty, int, v, gv);
            let qa = b.ins().iadd(q, i);
            if ty.is_vector() {
                // Narrowed twice (the values fit), the low four bytes stored.
                let n16 = b.ins().snarrow(n, n);
                let n8 = b.ins().snarrow(n16, n16);
                let words = b.ins().bitcast(types::I32X4, little(), n8);
                let four = b.ins().extractlane(words, 0);
                b.ins().store(flags, four, qa, 0);
                let s = b.use_var(lane_sum);
                let s = b.ins().iadd(s, n);
                b.def_var(lane_sum, s);
            } else {
                let byte = b.ins().ireduce(types::I8, n);
                b.ins().store(flags, byte, qa, 0);
                let s = b.use_var(sum);
                let s = b.ins().iadd(s, n);
                b.def_var(sum, s);
            }
        });
    }
    let lanes = b.use_var(lane_sum);
    let mut total = b.use_var(sum);
    for l in 0..4 {
        let v = b.ins().extractlane(lanes, l);
        total = b.ins().iadd(total, v);
    }
    b.def_var(sum, total);
    let gbits = b.ins().bitcast(types::I32, MemFlagsData::new(), gamma);
    b.ins().store(flags, gbits, out, 0);
    let s = b.use_var(sum);
    b.ins().store(flags, s, out, 4);
    end(b, config);
}

/// `clamp(round(γ·v), −128, 127)` as `int` lanes: Rust's rounding (halves
/// away from zero; Cranelift's `nearest` rounds them to even, so halves
/// are found and fixed), NaN to 0 as `as i8` does.
fn emit_quantize(b: &mut FunctionBuilder, ty: Type, int: Type, v: Value, gamma: Value) -> Value {
    let splat = |b: &mut FunctionBuilder, x: Value, t: Type| if t.is_vector() { b.ins().splat(t, x) } else { x };
    let t = b.ins().fmul(v, gamma);
    let tr = b.ins().trunc(t);
    let frac = b.ins().fsub(t, tr);
    let frac = b.ins().fabs(frac);
    let half = b.ins().f32const(0.5);
    let half = splat(b, half, ty);
    let is_half = b.ins().fcmp(FloatCC::Equal, frac, half);
    let one = b.ins().f32const(1.0);
    let one = splat(b, one, ty);
    // ±1 with t's sign (x86 lowers no vector `fcopysign`: the sign bit, or'd in).
    let step = if ty.is_vector() {
        let bits = b.ins().bitcast(int, MemFlagsData::new(), t);
        let sign = b.ins().iconst(types::I32, i32::MIN as i64);
        let sign = b.ins().splat(int, sign);
        let sign = b.ins().band(bits, sign);
        let one_bits = b.ins().bitcast(int, MemFlagsData::new(), one);
        let step = b.ins().bor(sign, one_bits);
        b.ins().bitcast(ty, MemFlagsData::new(), step)
    } else {
        b.ins().fcopysign(one, t)
    };
    let away = b.ins().fadd(tr, step);
    let even = b.ins().nearest(t);
    let r = if ty.is_vector() {
        let mask = b.ins().bitcast(ty, MemFlagsData::new(), is_half);
        b.ins().bitselect(mask, away, even)
    } else {
        b.ins().select(is_half, away, even)
    };
    let n = b.ins().fcvt_to_sint_sat(int, r);
    let lo = b.ins().iconst(types::I32, -128);
    let lo = splat(b, lo, int);
    let hi = b.ins().iconst(types::I32, 127);
    let hi = splat(b, hi, int);
    let n = b.ins().smax(n, lo);
    b.ins().smin(n, hi)
}

/// Flags for bitcasts between vectors of different lanes.
fn little() -> MemFlagsData {
    MemFlagsData::new().with_endianness(Endianness::Little)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnet_ir::interp::kernels;

    /// Against the interpreter's `rms_norm` + `quantize_act`, bit for bit,
    /// on awkward lengths and values: halves, ties, zeros, NaN, ±∞.
    #[test]
    fn generated_norm_quant_is_the_interpreter_s_bit_for_bit() {
        let jit = NormQuantJit::get().expect("Cranelift supports the hosts CI runs on");
        let special = [0.5f32, -0.5, 2.5, -1.5, 0.0, -0.0, f32::NAN, 1e-30];
        for k in [1usize, 3, 128, 783, 2560 + 32] {
            for case in 0..3 {
                let x: Vec<f32> = (0..k)
                    .map(|i| match case {
                        0 => (i as f32 * 0.731).sin() * 5.0,
                        // γ = 1 exactly, so without a norm every x.5 is a tie to round.
                        1 if i == 0 => 127.0,
                        1 => (i % 40) as f32 / 2.0 - 10.0,
                        _ if i % 5 == 0 => special[i / 5 % special.len()],
                        _ => (i as f32).cos(),
                    })
                    .collect();
                let w: Vec<f32> = (0..k).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
                for norm in [false, true] {
                    let want_in = if norm { kernels::rms_norm(&x, &w, 1e-5) } else { x.clone() };
                    let (want_q, want_g) = kernels::quantize_act(&want_in, k);
                    let (mut scratch, mut q) = (vec![0f32; k], vec![0i8; k]);
                    let (g, sum) = jit.row(&x, norm.then_some((&w[..], 1e-5)), &mut scratch, &mut q);
                    assert_eq!(q, want_q, "k {k} case {case} norm {norm}");
                    assert_eq!(g.to_bits(), want_g[0].to_bits(), "k {k} case {case} norm {norm}");
                    assert_eq!(sum, want_q.iter().map(|&v| v as i32).sum::<i32>());
                }
                let mut y = vec![0f32; k];
                jit.norm(&x, &w, 1e-5, &mut y);
                let want = kernels::rms_norm(&x, &w, 1e-5);
                assert!(y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())), "rms_norm k {k} case {case}");
            }
        }
    }
}
