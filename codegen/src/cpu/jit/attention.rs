//! One query head's causal attention over its KV head's cache, generated:
//! each key's score (a dot product as `dot_f32` computes it, times the
//! scale), the softmax of the scores in place (as the elementwise softmax,
//! the interpreter's bits), then the weighted sum of the value rows, each
//! output value summed over the keys in order, four columns at a time.
//! Only the dot products are summed in another order than the
//! interpreter's, so the tests hold the result to the float budget.

use super::dot::emit_dot_f32;
use super::elementwise::emit_softmax;
use super::{at, begin, define_all, emit_loop, end, host_isa, ModuleBox};
use cranelift_codegen::ir::{types, AbiParam, Function, InstBuilder, MemFlagsData, Signature};
use cranelift_codegen::isa::TargetFrontendConfig;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Module};
use std::sync::OnceLock;

/// `head(q, keys, values, n_keys, d, scale, scores, out)`.
type HeadFn = unsafe extern "C" fn(q: *const f32, keys: *const f32, values: *const f32, n_keys: usize, d: usize, scale: f32, scores: *mut f32, out: *mut f32);

pub struct AttentionJit {
    head: HeadFn,
    _module: ModuleBox,
}

impl AttentionJit {
    pub fn get() -> Result<&'static AttentionJit, String> {
        static JIT: OnceLock<Result<AttentionJit, String>> = OnceLock::new();
        JIT.get_or_init(AttentionJit::compile).as_ref().map_err(Clone::clone)
    }

    /// Query `q` (`d` values) over `keys` and `values` (`d` a position)
    /// into `out`; `scores` is scratch.
    pub fn head(&self, q: &[f32], keys: &[f32], values: &[f32], scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
        let d = q.len();
        let n_keys = keys.len() / d.max(1);
        assert!(d > 0 && out.len() == d && values.len() == keys.len() && keys.len() == n_keys * d, "attention: mismatched head");
        scores.resize(n_keys, 0.0);
        // SAFETY: every pointer is valid for the lengths checked above.
        unsafe { (self.head)(q.as_ptr(), keys.as_ptr(), values.as_ptr(), n_keys, d, scale, scores.as_mut_ptr(), out.as_mut_ptr()) }
    }

    fn compile() -> Result<AttentionJit, String> {
        let mut module = JITModule::new(JITBuilder::with_isa(host_isa()?, default_libcall_names()));
        let config = module.target_config();
        let ptr = config.pointer_type();
        let mut sig = Signature::new(config.default_call_conv);
        sig.params.extend([AbiParam::new(ptr); 5]);
        sig.params.push(AbiParam::new(types::F32));
        sig.params.extend([AbiParam::new(ptr); 2]);
        let code = define_all(&mut module, &[("attention_head".into(), sig)], |_, _, func, fbc| build(func, fbc, config))?;
        // SAFETY: built with the HeadFn signature.
        let head = unsafe { std::mem::transmute::<*const u8, HeadFn>(code[0]) };
        Ok(AttentionJit { head, _module: ModuleBox(module) })
    }
}

fn build(func: &mut Function, fbc: &mut FunctionBuilderContext, config: TargetFrontendConfig) {
    let ptr = config.pointer_type();
    let mut b = FunctionBuilder::new(func, fbc);
    let p = begin(&mut b);
    let (q, keys, values, n_keys, d, scale, scores, out) = (p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
    let flags = MemFlagsData::new().with_notrap();
    let zero = b.ins().iconst(ptr, 0);
    let row_bytes = b.ins().ishl_imm_u(d, 2);
    emit_loop(&mut b, ptr, zero, n_keys, 1, |b, t| {
        let off = b.ins().imul(t, row_bytes);
        let key = b.ins().iadd(keys, off);
        let dot = emit_dot_f32(b, ptr, q, key, d, false);
        let score = b.ins().fmul(dot, scale);
        let sa = at(b, scores, t, 2);
        b.ins().store(flags, score, sa, 0);
    });
    emit_softmax(&mut b, ptr, scores, n_keys);
    let d4 = b.ins().band_imm_s(d, !3);
    let mut from = zero;
    for ty in [types::F32X4, types::F32] {
        let (to, step) = if ty.is_vector() { (d4, 4) } else { (d, 1) };
        from = emit_loop(&mut b, ptr, from, to, step, |b, j| {
            let z = b.ins().f32const(0.0);
            let z = if ty.is_vector() { b.ins().splat(ty, z) } else { z };
            let acc = b.declare_var(ty);
            b.def_var(acc, z);
            let col = b.ins().ishl_imm_u(j, 2);
            let col = b.ins().iadd(values, col);
            emit_loop(b, ptr, zero, n_keys, 1, |b, t| {
                let sa = at(b, scores, t, 2);
                let w = b.ins().load(types::F32, flags, sa, 0);
                let w = if ty.is_vector() { b.ins().splat(ty, w) } else { w };
                let off = b.ins().imul(t, row_bytes);
                let va = b.ins().iadd(col, off);
                let v = b.ins().load(ty, flags, va, 0);
                let wv = b.ins().fmul(w, v);
                let s = b.use_var(acc);
                let s = b.ins().fadd(s, wv);
                b.def_var(acc, s);
            });
            let oa = at(b, out, j, 2);
            let s = b.use_var(acc);
            b.ins().store(flags, s, oa, 0);
        });
    }
    end(b, config);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnet_ir::interp::kernels;

    /// Against the interpreter's loop on awkward head sizes and cache
    /// lengths: within the float budget of the dot products.
    #[test]
    fn generated_attention_head_matches_the_interpreter() {
        let jit = AttentionJit::get().expect("Cranelift supports the hosts CI runs on");
        let mut scores = Vec::new();
        for d in [1usize, 3, 8, 17, 128] {
            for n in [1usize, 2, 5, 300] {
                let f = |len: usize, seed: f32| -> Vec<f32> { (0..len).map(|i| (i as f32 * seed).sin()).collect() };
                let (q, keys, values) = (f(d, 0.37), f(n * d, 0.11), f(n * d, 0.23));
                let scale = 1.0 / (d as f32).sqrt();
                let mut want_scores: Vec<f32> = keys.chunks_exact(d).map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale).collect();
                kernels::softmax(&mut want_scores);
                let mut want = vec![0f32; d];
                for (w, v) in want_scores.iter().zip(values.chunks_exact(d)) {
                    want.iter_mut().zip(v).for_each(|(o, &v)| *o += w * v);
                }
                let mut got = vec![0f32; d];
                jit.head(&q, &keys, &values, scale, &mut scores, &mut got);
                for j in 0..d {
                    assert!((got[j] - want[j]).abs() <= 1e-5 * (1.0 + want[j].abs()), "d {d} n {n} at {j}: {} not {}", got[j], want[j]);
                }
            }
        }
    }
}
