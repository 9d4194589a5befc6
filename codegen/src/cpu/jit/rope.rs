//! RoPE, generated: the rotation of one token's heads, four lanes at a
//! time. The angles are the interpreter's (`kernels::rope_rotations`,
//! computed once per token by the caller); the generated code applies them.
//!
//! Both pairings are written as one formula over a token's row,
//! `out[j] = x[j]·C[j] + x[partner(j)]·S[j]`, with tables `C` (each pair's
//! cosine at both of its places) and `S` (−sine at the pair's first place,
//! +sine at its second). The partner is the neighbour (interleaved: a lane
//! swap within the vector) or the value half a head away (neox). Since
//! `a + b·(−s)` is `a − b·s` exactly and addition commutes, this is the
//! interpreter's `x₀cos − x₁sin`, `x₀sin + x₁cos` bit for bit.

use super::{at, begin, define_all, emit_loop, end, host_isa, ModuleBox};
use bitnet_ir::interp::kernels;
use bitnet_ir::RopeMode;
use cranelift_codegen::ir::{types, AbiParam, ConstantData, Endianness, Function, InstBuilder, MemFlagsData, Signature, Value};
use cranelift_codegen::isa::TargetFrontendConfig;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Module};
use std::sync::OnceLock;

/// `rope(x, out, heads, d, c, s)`: one token's `heads × d` values.
type RopeFn = unsafe extern "C" fn(x: *const f32, out: *mut f32, heads: usize, d: usize, c: *const f32, s: *const f32);

pub struct RopeJit {
    interleaved: RopeFn,
    neox: RopeFn,
    _module: ModuleBox,
}

/// A token's rotation tables, `C` and `S` of the module's notes.
#[derive(Default)]
pub struct RopeTables {
    rotations: Vec<(f32, f32)>,
    c: Vec<f32>,
    s: Vec<f32>,
}

impl RopeTables {
    /// The tables for position `p` of a head of `d`.
    pub fn fill(&mut self, p: i32, theta: f32, d: usize, mode: RopeMode) {
        kernels::rope_rotations(p, theta, d, &mut self.rotations);
        self.c.resize(d, 0.0);
        self.s.resize(d, 0.0);
        for (i, &(sin, cos)) in self.rotations.iter().enumerate() {
            let (a, b) = match mode {
                RopeMode::Interleaved => (2 * i, 2 * i + 1),
                RopeMode::Neox => (i, i + d / 2),
            };
            (self.c[a], self.c[b], self.s[a], self.s[b]) = (cos, cos, -sin, sin);
        }
    }
}

impl RopeJit {
    pub fn get() -> Result<&'static RopeJit, String> {
        static JIT: OnceLock<Result<RopeJit, String>> = OnceLock::new();
        JIT.get_or_init(RopeJit::compile).as_ref().map_err(Clone::clone)
    }

    /// Rotates one token's heads of `d` (`x`, into `out`) by `tables`.
    pub fn token(&self, mode: RopeMode, x: &[f32], out: &mut [f32], d: usize, tables: &RopeTables) {
        assert!(d >= 2 && d.is_multiple_of(2) && x.len().is_multiple_of(d) && out.len() == x.len(), "rope: {} values are not heads of {d}", x.len());
        assert!(tables.c.len() == d && tables.s.len() == d, "rope: tables for another head size");
        let f = match mode {
            RopeMode::Interleaved => self.interleaved,
            RopeMode::Neox => self.neox,
        };
        // SAFETY: x and out hold `heads × d` values, the tables `d` each.
        unsafe { f(x.as_ptr(), out.as_mut_ptr(), x.len() / d, d, tables.c.as_ptr(), tables.s.as_ptr()) }
    }

    fn compile() -> Result<RopeJit, String> {
        let mut module = JITModule::new(JITBuilder::with_isa(host_isa()?, default_libcall_names()));
        let config = module.target_config();
        let ptr = config.pointer_type();
        let mut sig = Signature::new(config.default_call_conv);
        sig.params.extend([AbiParam::new(ptr); 6]);
        let modes = [RopeMode::Interleaved, RopeMode::Neox];
        let fns: Vec<_> = modes.iter().map(|m| (format!("rope_{m:?}").to_lowercase(), sig.clone())).collect();
        let code = define_all(&mut module, &fns, |i, _, func, fbc| build(func, fbc, config, modes[i]))?;
        // SAFETY: both were built with the RopeFn signature.
        let f = |i: usize| unsafe { std::mem::transmute::<*const u8, RopeFn>(code[i]) };
        Ok(RopeJit { interleaved: f(0), neox: f(1), _module: ModuleBox(module) })
    }
}

/// Where a value's partner is, within one stretch of a head.
#[derive(Clone, Copy)]
enum Partner {
    /// The other value of its adjacent pair.
    Neighbour,
    /// Half a head later.
    Later,
    /// Half a head earlier.
    Earlier,
}

fn build(func: &mut Function, fbc: &mut FunctionBuilderContext, config: TargetFrontendConfig, mode: RopeMode) {
    let ptr = config.pointer_type();
    let mut b = FunctionBuilder::new(func, fbc);
    let p = begin(&mut b);
    let (x, out, heads, d, c, s) = (p[0], p[1], p[2], p[3], p[4], p[5]);
    let flags = MemFlagsData::new().with_notrap();
    let zero = b.ins().iconst(ptr, 0);
    let half = b.ins().ushr_imm_u(d, 1);
    // The lanes of each adjacent pair swapped, as bytes.
    let swap: Vec<u8> = [1u8, 0, 3, 2].iter().flat_map(|&l| (0..4).map(move |i| 4 * l + i)).collect();
    let swap = b.func.dfg.immediates.push(ConstantData::from(swap));
    emit_loop(&mut b, ptr, zero, heads, 1, |b, h| {
        let base = b.ins().imul(h, d);
        let (xh, oh) = (at(b, x, base, 2), at(b, out, base, 2));
        let stretches = match mode {
            RopeMode::Interleaved => vec![(zero, d, Partner::Neighbour)],
            RopeMode::Neox => vec![(zero, half, Partner::Later), (half, d, Partner::Earlier)],
        };
        for (start, stop, partner) in stretches {
            let len = b.ins().isub(stop, start);
            let len4 = b.ins().band_imm_s(len, !3);
            let vec_end = b.ins().iadd(start, len4);
            let mut from = start;
            for ty in [types::F32X4, types::F32] {
                let (to, step) = if ty.is_vector() { (vec_end, 4) } else { (stop, 1) };
                from = emit_loop(b, ptr, from, to, step, |b, j| {
                    let xa = at(b, xh, j, 2);
                    let v = b.ins().load(ty, flags, xa, 0);
                    let other = match partner {
                        Partner::Neighbour if ty.is_vector() => {
                            let le = MemFlagsData::new().with_endianness(Endianness::Little);
                            let bytes = b.ins().bitcast(types::I8X16, le, v);
                            let swapped = b.ins().shuffle(bytes, bytes, swap);
                            b.ins().bitcast(ty, le, swapped)
                        }
                        _ => {
                            let k = match partner {
                                Partner::Neighbour => b.ins().bxor_imm_u(j, 1),
                                Partner::Later => b.ins().iadd(j, half),
                                Partner::Earlier => b.ins().isub(j, half),
                            };
                            let pa = at(b, xh, k, 2);
                            b.ins().load(ty, flags, pa, 0)
                        }
                    };
                    let (ca, sa) = (at(b, c, j, 2), at(b, s, j, 2));
                    let cv = b.ins().load(ty, flags, ca, 0);
                    let sv = b.ins().load(ty, flags, sa, 0);
                    let r = rotate(b, v, cv, other, sv);
                    let oa = at(b, oh, j, 2);
                    b.ins().store(flags, r, oa, 0);
                });
            }
        }
    });
    end(b, config);
}

/// `x·c + other·s`.
fn rotate(b: &mut FunctionBuilder, x: Value, c: Value, other: Value, s: Value) -> Value {
    let xc = b.ins().fmul(x, c);
    let os = b.ins().fmul(other, s);
    b.ins().fadd(xc, os)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit for bit the interpreter's RoPE, both pairings, on head sizes
    /// that leave tails (2, 6, 10, 18) and full ones, at far positions.
    #[test]
    fn generated_rope_is_the_interpreter_s_bit_for_bit() {
        let jit = RopeJit::get().expect("Cranelift supports the hosts CI runs on");
        let mut tables = RopeTables::default();
        for d in [2usize, 6, 8, 10, 18, 64, 128] {
            for heads in [1usize, 3] {
                let x: Vec<f32> = (0..heads * d).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
                for mode in [RopeMode::Interleaved, RopeMode::Neox] {
                    for p in [0, 1, 17, 4095] {
                        let mut want = x.clone();
                        kernels::rope(&mut want, heads * d, &[p], mode, 10000.0, d);
                        tables.fill(p, 10000.0, d, mode);
                        let mut got = vec![0f32; x.len()];
                        jit.token(mode, &x, &mut got, d, &tables);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&got), bits(&want), "d {d} heads {heads} {mode:?} position {p}");
                    }
                }
            }
        }
    }
}
