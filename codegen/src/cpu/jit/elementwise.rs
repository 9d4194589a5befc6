//! The gated activation `act(gate) · up` of the FFN, generated per
//! activation: squared ReLU four lanes at a time, SiLU one value at a time
//! through `exp` (Cranelift has no vector `exp`; the JIT calls a Rust
//! shim). Both compute exactly what the interpreter computes, operation
//! for operation, so the results are bit-identical to it:
//! - relu²: `(g > 0 ? g : 0)²· u` (a comparison, so NaN gives 0 as `f32::max` does);
//! - SiLU: `(g / (1 + exp(−g))) · u`.

use super::{begin, define_all, emit_loop, end, host_isa, ModuleBox};
use bitnet_ir::GateAct;
use cranelift_codegen::ir::{condcodes::FloatCC, types, AbiParam, Function, InstBuilder, MemFlagsData, Signature};
use cranelift_codegen::isa::TargetFrontendConfig;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Linkage, Module};
use std::sync::OnceLock;

/// `glu(gate, up, out, n)`.
pub type GluFn = unsafe extern "C" fn(gate: *const f32, up: *const f32, out: *mut f32, n: usize);

pub struct GluJit {
    relu2: GluFn,
    silu: GluFn,
    _module: ModuleBox,
}

extern "C" fn expf_shim(x: f32) -> f32 {
    x.exp()
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
        let mut jb = JITBuilder::with_isa(host_isa()?, default_libcall_names());
        jb.symbol("bitnet_expf", expf_shim as *const u8);
        let mut module = JITModule::new(jb);
        let config = module.target_config();
        let ptr = config.pointer_type();
        let mut exp_sig = Signature::new(config.default_call_conv);
        exp_sig.params.push(AbiParam::new(types::F32));
        exp_sig.returns.push(AbiParam::new(types::F32));
        let expf = module.declare_function("bitnet_expf", Linkage::Import, &exp_sig).map_err(|e| e.to_string())?;
        let mut sig = Signature::new(config.default_call_conv);
        sig.params.extend([AbiParam::new(ptr); 4]);
        let acts = [GateAct::Relu2, GateAct::Silu];
        let fns: Vec<_> = acts.iter().map(|a| (format!("glu_{}", a.name()), sig.clone())).collect();
        let code = define_all(&mut module, &fns, |i, module, func, fbc| {
            let exp_ref = module.declare_func_in_func(expf, func);
            build(func, fbc, config, acts[i], exp_ref);
        })?;
        // SAFETY: both functions were built with the GluFn signature.
        let f = |i: usize| unsafe { std::mem::transmute::<*const u8, GluFn>(code[i]) };
        Ok(GluJit { relu2: f(0), silu: f(1), _module: ModuleBox(module) })
    }
}

/// A loop over `n` values, `step` at a time, then one at a time.
fn build(func: &mut Function, fbc: &mut FunctionBuilderContext, config: TargetFrontendConfig, act: GateAct, expf: cranelift_codegen::ir::FuncRef) {
    let ptr = config.pointer_type();
    let mut b = FunctionBuilder::new(func, fbc);
    let p = begin(&mut b);
    let (gate, up, out, n) = (p[0], p[1], p[2], p[3]);
    let flags = MemFlagsData::new().with_notrap();
    let zero = b.ins().f32const(0.0);
    let one = b.ins().f32const(1.0);
    let step = if act == GateAct::Relu2 { 4 } else { 1 };
    // Vector part (relu² only), then the scalar rest.
    let vec_end = b.ins().band_imm_s(n, !(step as i64 - 1));
    let i0 = b.ins().iconst(ptr, 0);
    let mut start = i0;
    let lanes = [(4usize, types::F32X4), (1, types::F32)];
    for &(width, ty) in if step == 4 { &lanes[..] } else { &lanes[1..] } {
        let end = if width == 4 { vec_end } else { n };
        start = emit_loop(&mut b, ptr, start, end, width as i64, |b, i| {
            let off = b.ins().ishl_imm_u(i, 2);
            let (gp, upp, op) = (b.ins().iadd(gate, off), b.ins().iadd(up, off), b.ins().iadd(out, off));
            let g = b.ins().load(ty, flags, gp, 0);
            let u = b.ins().load(ty, flags, upp, 0);
            let a = match act {
                GateAct::Relu2 => {
                    let z = if width == 4 { b.ins().splat(ty, zero) } else { zero };
                    let pos = b.ins().fcmp(FloatCC::GreaterThan, g, z);
                    let r = if width == 4 {
                        let mask = b.ins().bitcast(ty, MemFlagsData::new(), pos);
                        b.ins().bitselect(mask, g, z)
                    } else {
                        b.ins().select(pos, g, z)
                    };
                    b.ins().fmul(r, r)
                }
                GateAct::Silu => {
                    let neg = b.ins().fneg(g);
                    let call = b.ins().call(expf, &[neg]);
                    let e = b.inst_results(call)[0];
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
