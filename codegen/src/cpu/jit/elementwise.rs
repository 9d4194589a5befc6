//! Elementwise kernels, generated per operation, four lanes at a time and
//! then one at a time. Each computes exactly what the interpreter computes,
//! operation for operation, so the results are bit-identical to it:
//! - the FFN's gated unit `act(gate) · up`: relu² `(g > 0 ? g : 0)²· u` (a
//!   comparison, so NaN gives 0 as `f32::max` does); SiLU
//!   `(g / (1 + exp(−g))) · u`, with the interpreter's own `exp`
//!   (`bitnet_ir::interp::math`) generated inline, step for step;
//! - the binary ops (`add`, `sub`, `mul`, `div`) of two rows of one length;
//! - softmax of a row: the maximum by comparisons (NaN passed over, as
//!   `f32::max` does), `exp(x − max)` four lanes at a time but summed one
//!   lane after another in the interpreter's order, then the division.

use super::{at, begin, define_all, emit_loop, end, host_isa, ModuleBox};
use bitnet_ir::interp::math;
use bitnet_ir::{BinaryOp, GateAct};
use cranelift_codegen::ir::{condcodes::FloatCC, types, AbiParam, Function, InstBuilder, MemFlagsData, Signature, Type, Value};
use cranelift_codegen::isa::TargetFrontendConfig;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Module};
use std::sync::OnceLock;

/// `f(a, b, out, n)`: `out[i] = a[i] ∘ b[i]`.
pub type PairFn = unsafe extern "C" fn(a: *const f32, b: *const f32, out: *mut f32, n: usize);
/// `softmax(row, n)`, in place.
pub type RowFn = unsafe extern "C" fn(row: *mut f32, n: usize);

/// The operations, in the order their functions are defined.
const PAIRS: [Pair; 6] = [
    Pair::Glu(GateAct::Relu2),
    Pair::Glu(GateAct::Silu),
    Pair::Binary(BinaryOp::Add),
    Pair::Binary(BinaryOp::Sub),
    Pair::Binary(BinaryOp::Mul),
    Pair::Binary(BinaryOp::Div),
];

#[derive(Clone, Copy, PartialEq)]
enum Pair {
    Glu(GateAct),
    Binary(BinaryOp),
}

impl Pair {
    fn name(self) -> String {
        match self {
            Pair::Glu(a) => format!("glu_{}", a.name()),
            Pair::Binary(b) => b.name().to_string(),
        }
    }
}

pub struct ElementwiseJit {
    pairs: Vec<PairFn>,
    softmax: RowFn,
    _module: ModuleBox,
}

impl ElementwiseJit {
    /// The kernels, compiled on first use.
    pub fn get() -> Result<&'static ElementwiseJit, String> {
        static JIT: OnceLock<Result<ElementwiseJit, String>> = OnceLock::new();
        JIT.get_or_init(ElementwiseJit::compile).as_ref().map_err(Clone::clone)
    }

    /// `out[i] = act(gate[i]) · up[i]`.
    pub fn glu(&self, act: GateAct, gate: &[f32], up: &[f32], out: &mut [f32]) {
        self.pair(Pair::Glu(act), gate, up, out)
    }

    /// `out[i] = a[i] ∘ b[i]`.
    pub fn binary(&self, op: BinaryOp, a: &[f32], b: &[f32], out: &mut [f32]) {
        self.pair(Pair::Binary(op), a, b, out)
    }

    /// [`bitnet_ir::interp::kernels::softmax`] of `row`, in place.
    pub fn softmax(&self, row: &mut [f32]) {
        // SAFETY: the pointer is valid for `row.len()` values.
        unsafe { (self.softmax)(row.as_mut_ptr(), row.len()) }
    }

    fn pair(&self, op: Pair, a: &[f32], b: &[f32], out: &mut [f32]) {
        let n = out.len().min(a.len()).min(b.len());
        let f = self.pairs[PAIRS.iter().position(|&p| p == op).expect("every pair has a function")];
        // SAFETY: each pointer is valid for `n` values.
        unsafe { f(a.as_ptr(), b.as_ptr(), out.as_mut_ptr(), n) }
    }

    fn compile() -> Result<ElementwiseJit, String> {
        let mut module = JITModule::new(JITBuilder::with_isa(host_isa()?, default_libcall_names()));
        let config = module.target_config();
        let ptr = config.pointer_type();
        let mut pair_sig = Signature::new(config.default_call_conv);
        pair_sig.params.extend([AbiParam::new(ptr); 4]);
        let mut row_sig = Signature::new(config.default_call_conv);
        row_sig.params.extend([AbiParam::new(ptr); 2]);
        let mut fns: Vec<_> = PAIRS.iter().map(|p| (p.name(), pair_sig.clone())).collect();
        fns.push(("softmax".into(), row_sig));
        let code = define_all(&mut module, &fns, |i, _, func, fbc| match PAIRS.get(i) {
            Some(&op) => build_pair(func, fbc, config, op),
            None => build_softmax(func, fbc, config),
        })?;
        // SAFETY: each function was built with the signature named for it.
        let pairs = code[..PAIRS.len()].iter().map(|&c| unsafe { std::mem::transmute::<*const u8, PairFn>(c) }).collect();
        // SAFETY: as above: softmax was built with RowFn's signature.
        let softmax = unsafe { std::mem::transmute::<*const u8, RowFn>(code[PAIRS.len()]) };
        Ok(ElementwiseJit { pairs, softmax, _module: ModuleBox(module) })
    }
}

/// A loop over `n` values, four at a time, then one at a time.
fn build_pair(func: &mut Function, fbc: &mut FunctionBuilderContext, config: TargetFrontendConfig, op: Pair) {
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
            let (ga, ua, po) = (b.ins().iadd(gate, off), b.ins().iadd(up, off), b.ins().iadd(out, off));
            let g = b.ins().load(ty, flags, ga, 0);
            let u = b.ins().load(ty, flags, ua, 0);
            let a = match op {
                Pair::Binary(o) => {
                    let v = match o {
                        BinaryOp::Add => b.ins().fadd(g, u),
                        BinaryOp::Sub => b.ins().fsub(g, u),
                        BinaryOp::Mul => b.ins().fmul(g, u),
                        BinaryOp::Div => b.ins().fdiv(g, u),
                    };
                    b.ins().store(flags, v, po, 0);
                    return;
                }
                Pair::Glu(GateAct::Relu2) => {
                    let z = constant(b, ty, 0.0);
                    let pos = b.ins().fcmp(FloatCC::GreaterThan, g, z);
                    let r = choose(b, ty, pos, g, z);
                    b.ins().fmul(r, r)
                }
                Pair::Glu(GateAct::Silu) => {
                    let neg = b.ins().fneg(g);
                    let e = emit_exp(b, ty, neg);
                    let one = constant(b, ty, 1.0);
                    let d = b.ins().fadd(one, e);
                    b.ins().fdiv(g, d)
                }
            };
            let v = b.ins().fmul(a, u);
            b.ins().store(flags, v, po, 0);
        });
    }
    end(b, config);
}

fn build_softmax(func: &mut Function, fbc: &mut FunctionBuilderContext, config: TargetFrontendConfig) {
    let ptr = config.pointer_type();
    let mut b = FunctionBuilder::new(func, fbc);
    let p = begin(&mut b);
    emit_softmax(&mut b, ptr, p[0], p[1]);
    end(b, config);
}

/// Softmax of the `n` floats at `row`, in place, as the module's notes say.
pub(super) fn emit_softmax(b: &mut FunctionBuilder, ptr: Type, row: Value, n: Value) {
    let flags = MemFlagsData::new().with_notrap();
    let zero = b.ins().iconst(ptr, 0);
    let vec_end = b.ins().band_imm_s(n, !3);
    let var = |b: &mut FunctionBuilder, v: f32| -> Variable {
        let x = b.declare_var(types::F32);
        let c = b.ins().f32const(v);
        b.def_var(x, c);
        x
    };
    let max = var(b, f32::NEG_INFINITY);
    emit_loop(b, ptr, zero, n, 1, |b, i| {
        let a = at(b, row, i, 2);
        let v = b.ins().load(types::F32, flags, a, 0);
        let m = b.use_var(max);
        let gt = b.ins().fcmp(FloatCC::GreaterThan, v, m);
        let m = b.ins().select(gt, v, m);
        b.def_var(max, m);
    });
    let m = b.use_var(max);
    let sum = var(b, 0.0);
    let mut start = zero;
    for (width, ty) in [(4i64, types::F32X4), (1, types::F32)] {
        let end = if width == 4 { vec_end } else { n };
        let mv = if ty.is_vector() { b.ins().splat(ty, m) } else { m };
        start = emit_loop(b, ptr, start, end, width, |b, i| {
            let a = at(b, row, i, 2);
            let v = b.ins().load(ty, flags, a, 0);
            let d = b.ins().fsub(v, mv);
            let e = emit_exp(b, ty, d);
            b.ins().store(flags, e, a, 0);
            let mut s = b.use_var(sum);
            for lane in 0..width as u8 {
                let x = if ty.is_vector() { b.ins().extractlane(e, lane) } else { e };
                s = b.ins().fadd(s, x);
            }
            b.def_var(sum, s);
        });
    }
    let s = b.use_var(sum);
    let mut start = zero;
    for (width, ty) in [(4i64, types::F32X4), (1, types::F32)] {
        let end = if width == 4 { vec_end } else { n };
        let sv = if ty.is_vector() { b.ins().splat(ty, s) } else { s };
        start = emit_loop(b, ptr, start, end, width, |b, i| {
            let a = at(b, row, i, 2);
            let v = b.ins().load(ty, flags, a, 0);
            let q = b.ins().fdiv(v, sv);
            b.ins().store(flags, q, a, 0);
        });
    }
}

/// An f32 constant, in every lane when `ty` is a vector.
pub(super) fn constant(b: &mut FunctionBuilder, ty: Type, v: f32) -> Value {
    let c = b.ins().f32const(v);
    if ty.is_vector() {
        b.ins().splat(ty, c)
    } else {
        c
    }
}

/// `cond ? yes : no`, lane by lane for vectors (`cond` from an `fcmp`).
pub(super) fn choose(b: &mut FunctionBuilder, ty: Type, cond: Value, yes: Value, no: Value) -> Value {
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
pub(super) fn emit_exp(b: &mut FunctionBuilder, ty: Type, x: Value) -> Value {
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
        let jit = ElementwiseJit::get().expect("Cranelift supports the hosts CI runs on");
        let special = [0.0f32, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-40, -88.5, 89.0];
        for n in [0usize, 1, 3, 4, 783, 2560 + 32] {
            let gate: Vec<f32> = (0..n).map(|i| if i % 9 == 0 { special[i / 9 % special.len()] } else { (i as f32 * 0.37).sin() * 12.0 }).collect();
            let up: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
            for act in [GateAct::Relu2, GateAct::Silu] {
                let mut got = vec![7.0f32; n];
                jit.glu(act, &gate, &up, &mut got);
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

    /// The binary ops and softmax, bit for bit the interpreter's, on
    /// awkward lengths, with NaN and ±∞ among the values.
    #[test]
    fn generated_binary_ops_and_softmax_are_the_interpreter_s() {
        let jit = ElementwiseJit::get().expect("Cranelift supports the hosts CI runs on");
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        for n in [1usize, 3, 4, 783, 2560 + 32] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 40.0).collect();
            let mut b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
            b[n / 2] = if n > 3 { f32::NAN } else { 0.0 };
            for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div] {
                let mut got = vec![7.0f32; n];
                jit.binary(op, &a, &b, &mut got);
                for i in 0..n {
                    let want = bitnet_ir::interp::kernels::binary(op, a[i], b[i]);
                    assert!(same(got[i], want), "{op:?} n {n} at {i}: {} not {want}", got[i]);
                }
            }
            for special in [None, Some(f32::NAN), Some(f32::INFINITY), Some(f32::NEG_INFINITY)] {
                let mut row = a.clone();
                if let Some(v) = special {
                    row[n - 1] = v;
                }
                let mut want = row.clone();
                bitnet_ir::interp::kernels::softmax(&mut want);
                jit.softmax(&mut row);
                for i in 0..n {
                    assert!(same(row[i], want[i]), "softmax n {n} {special:?} at {i}: {} not {}", row[i], want[i]);
                }
            }
        }
    }
}
