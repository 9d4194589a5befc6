//! The gated activation `act(gate) · up` of the FFN, generated per
//! activation, four lanes at a time and then one at a time. Both compute
//! exactly what the interpreter computes, operation for operation, so the
//! results are bit-identical to it:
//! - relu²: `(g > 0 ? g : 0)²· u` (a comparison, so NaN gives 0 as `f32::max` does);
//! - SiLU: `(g / (1 + exp(−g))) · u`, with the interpreter's own `exp`
//!   (`bitnet_ir::interp::math`) generated inline, step for step.

use super::{begin, define_all, emit_loop, end, host_isa, ModuleBox};
use bitnet_ir::interp::math;
use bitnet_ir::GateAct;
use cranelift_codegen::ir::{condcodes::FloatCC, types, AbiParam, Function, InstBuilder, MemFlagsData, Signature, Type, Value};
use cranelift_codegen::isa::TargetFrontendConfig;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Module};
use std::sync::OnceLock;

/// `glu(gate, up, out, n)`.
pub type GluFn = unsafe extern "C" fn(gate: *const f32, up: *const f32, out: *mut f32, n: usize);

pub struct GluJit {
    relu2: GluFn,
    silu: GluFn,
    _module: ModuleBox,
}

impl GluJit {
    /// The kernels, compiled on first use.
    pub fn get() -> Result<&'static GluJit, String> {
        static JIT: OnceLock<Result<GluJit, String>> = OnceLock::new();
        JIT.get_or_init(GluJit::compile).as_ref().map_err(Clone::clone)
    }

    /// `out[i] = act(gate[i]) · up[i]`.
    pub fn run(&self, act: GateAct, gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len().min(gate.len()).min(up.len());
        let f = match act {
            GateAct::Relu2 => self.relu2,
            GateAct::Silu => self.silu,
        };
        // SAFETY: each pointer is valid for `n` values.
        unsafe { f(gate.as_ptr(), up.as_ptr(), out.as_mut_ptr(), n) }
    }

    fn compile() -> Result<GluJit, String> {
        let mut module = JITModule::new(JITBuilder::with_isa(host_isa()?, default_libcall_names()));
        let config = module.target_config();
        let ptr = config.pointer_type();
        let mut sig = Signature::new(config.default_call_conv);
        sig.params.extend([AbiParam::new(ptr); 4]);
        let acts = [GateAct::Relu2, GateAct::Silu];
        let fns: Vec<_> = acts.iter().map(|a| (format!("glu_{}", a.name()), sig.clone())).collect();
        let code = define_all(&mut module, &fns, |i, _, func, fbc| build(func, fbc, config, acts[i]))?;
        // SAFETY: both functions were built with the GluFn signature.
        let f = |i: usize| unsafe { std::mem::transmute::<*const u8, GluFn>(code[i]) };
        Ok(GluJit { relu2: f(0), silu: f(1), _module: ModuleBox(module) })
    }
}

/// A loop over `n` values, four at a time, then one at a time.
fn build(func: &mut Function, fbc: &mut FunctionBuilderContext, config: TargetFrontendConfig, act: GateAct) {
    let ptr = config.pointer_type();
    let mut b = FunctionBuilder::new(func, fbc);
    let p = begin(&mut b);
    let (gate, up, out, n) = (p[0], p[1], p[2], p[3]);
    let flags = MemFlagsData::new().with_notrap();
    let vec_end = b.ins().band_imm_s(n, !3);
    let mut start = b.ins().iconst(ptr, 0);
    for (width, ty) in [(4i64, types::F32X4), (1, types::F32)] {
        let end = if width == 4 { vec_end } else { n };
        start = emit_loop(&mut b, ptr, start, end, width, |b, i| {
            let off = b.ins().ishl_imm_u(i, 2);
            let (gp, upp, op) = (b.ins().iadd(gate, off), b.ins().iadd(up, off), b.ins().iadd(out, off));
            let g = b.ins().load(ty, flags, gp, 0);
            let u = b.ins().load(ty, flags, upp, 0);
            let a = match act {
                GateAct::Relu2 => {
                    let z = constant(b, ty, 0.0);
                    let pos = b.ins().fcmp(FloatCC::GreaterThan, g, z);
                    let r = choose(b, ty, pos, g, z);
                    b.ins().fmul(r, r)
                }
                GateAct::Silu => {
                    let neg = b.ins().fneg(g);
                    let e = emit_exp(b, ty, neg);
                    let one = constant(b, ty, 1.0);
                    let d = b.ins().fadd(one, e);
                    b.ins().fdiv(g, d)
                }
            };
            let v = b.ins().fmul(a, u);
            b.ins().store(flags, v, op, 0);
        });
    }
    end(b, config);
}

/// An f32 constant, in every lane when `ty` is a vector.
fn constant(b: &mut FunctionBuilder, ty: Type, v: f32) -> Value {
    let c = b.ins().f32const(v);
    if ty.is_vector() {
        b.ins().splat(ty, c)
    } else {
        c
    }
}

/// `cond ? yes : no`, lane by lane for vectors (`cond` from an `fcmp`).
fn choose(b: &mut FunctionBuilder, ty: Type, cond: Value, yes: Value, no: Value) -> Value {
    if ty.is_vector() {
        let mask = b.ins().bitcast(ty, MemFlagsData::new(), cond);
        b.ins().bitselect(mask, yes, no)
    } else {
        b.ins().select(cond, yes, no)
    }
}

/// [`math::exp`] of `x`, step for step: clamp, `n = ⌊x·log₂e + ½⌋`, the
/// two-part reduction, the polynomial, two scalings by powers of two
/// built from their bits; NaN passes through.
fn emit_exp(b: &mut FunctionBuilder, ty: Type, x: Value) -> Value {
    let int = if ty.is_vector() { types::I32X4 } else { types::I32 };
    let (lo, hi) = (constant(b, ty, math::CLAMP.0), constant(b, ty, math::CLAMP.1));
    let xc = b.ins().fmax(x, lo);
    let xc = b.ins().fmin(xc, hi);
    let log2e = constant(b, ty, std::f32::consts::LOG2_E);
    let half = constant(b, ty, 0.5);
    let t = b.ins().fmul(xc, log2e);
    let t = b.ins().fadd(t, half);
    let n = b.ins().floor(t);
    let mut r = xc;
    for part in [math::LN2_HI, math::LN2_LO] {
        let c = constant(b, ty, part);
        let nc = b.ins().fmul(n, c);
        r = b.ins().fsub(r, nc);
    }
    let mut p = constant(b, ty, math::POLY[0]);
    for &coef in &math::POLY[1..] {
        let c = constant(b, ty, coef);
        let pr = b.ins().fmul(p, r);
        p = b.ins().fadd(pr, c);
    }
    let rr = b.ins().fmul(r, r);
    let y = b.ins().fmul(p, rr);
    let y = b.ins().fadd(y, r);
    let one = constant(b, ty, 1.0);
    let y = b.ins().fadd(y, one);
    let ni = b.ins().fcvt_to_sint_sat(int, n);
    let k1 = b.ins().sshr_imm_u(ni, 1);
    let k2 = b.ins().isub(ni, k1);
    let bias = b.ins().iconst(types::I32, 127);
    let bias = if ty.is_vector() { b.ins().splat(int, bias) } else { bias };
    let mut e = y;
    for k in [k1, k2] {
        let biased = b.ins().iadd(k, bias);
        let bits = b.ins().ishl_imm_u(biased, 23);
        let pow2 = b.ins().bitcast(ty, MemFlagsData::new(), bits);
        e = b.ins().fmul(e, pow2);
    }
    let nan = b.ins().fcmp(FloatCC::Unordered, x, x);
    choose(b, ty, nan, x, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit for bit the interpreter's `glu`, on awkward lengths and on the
    /// values where activations differ: zeros of both signs, NaN, ±∞.
    #[test]
    fn generated_glu_is_the_interpreter_s_bit_for_bit() {
        let jit = GluJit::get().expect("Cranelift supports the hosts CI runs on");
        let special = [0.0f32, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-40, -88.5, 89.0];
        for n in [0usize, 1, 3, 4, 783, 2560 + 32] {
            let gate: Vec<f32> = (0..n).map(|i| if i % 9 == 0 { special[i / 9 % special.len()] } else { (i as f32 * 0.37).sin() * 12.0 }).collect();
            let up: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
            for act in [GateAct::Relu2, GateAct::Silu] {
                let mut got = vec![7.0f32; n];
                jit.run(act, &gate, &up, &mut got);
                for i in 0..n {
                    let want = bitnet_ir::interp::kernels::glu(act, gate[i], up[i]);
                    assert!(
                        got[i].to_bits() == want.to_bits() || (got[i].is_nan() && want.is_nan()),
                        "{act:?} n {n} at {i}: gate {} gives {} not {}",
                        gate[i],
                        got[i],
                        want
                    );
                }
            }
        }
    }
}
