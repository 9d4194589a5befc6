//! Ternary dot kernels. One function per tile shape (rows × tokens), with the tile's loops
//! unrolled. Each takes a tile of packed codes (the layout of
//! [`super::ternary`]) and `tokens` activation rows, and writes the
//! `rows × tokens` integer dot products of codes and activations, as
//! [`super::ternary`]'s other kernels do; the caller subtracts `Σx`.
//!
//! Per chunk of 128 weights and each of its four 2-bit fields, the codes
//! are shifted down and masked (`psrlw`, `pand`), multiplied with the
//! activations as unsigned × signed bytes (`pmaddubsw`), summed in 16 bits
//! (at most 8 × 2 × 2 × 127, so no overflow), then widened once per chunk
//! (`pmaddwd` with ones) into 32-bit accumulators. Cranelift's x86-64
//! vectors are 128 bits wide, so this is a candidate the autotuner weighs
//! against the 256-bit native kernels, not a replacement for them.
//!
//! Hosts without a `pmaddubsw` lowering (aarch64) get the [`Lowering::Widening`]
//! form: bytes widened to 16 bits, multiplied, summed in two 16-bit halves
//! and widened per chunk. The same integers; the tests run both forms here.

use super::{begin, define_all, emit_loop, end, host_isa, ModuleBox};
use cranelift_codegen::ir;
use cranelift_codegen::ir::{types, AbiParam, Function, InstBuilder, MemFlagsData, Signature, Value};
use cranelift_codegen::isa::TargetFrontendConfig;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Module};
use std::sync::OnceLock;

/// `dots(tile, chunks, xs, out)`: `xs` points at `tokens` activation row
/// pointers; `out[r * 4 + j]` receives row `r` · token `j`.
pub type DotsFn = unsafe extern "C" fn(tile: *const u8, chunks: usize, xs: *const *const i8, out: *mut i32);

/// The generated kernels, one per (rows, tokens) in 1, 2, 4.
pub struct TernaryJit {
    fns: [[DotsFn; 3]; 3],
    /// Keeps the code alive.
    _module: ModuleBox,
}

fn slot(n: usize) -> usize {
    match n {
        1 => 0,
        2 => 1,
        _ => 2,
    }
}

impl TernaryJit {
    /// The kernels, compiled on first use; an error says why this host
    /// cannot have them.
    pub fn get() -> Result<&'static TernaryJit, String> {
        static JIT: OnceLock<Result<TernaryJit, String>> = OnceLock::new();
        JIT.get_or_init(TernaryJit::compile).as_ref().map_err(Clone::clone)
    }

    pub fn dots(&self, rows: usize, tokens: usize) -> DotsFn {
        self.fns[slot(rows)][slot(tokens)]
    }

    fn compile() -> Result<TernaryJit, String> {
        let isa = host_isa()?;
        let lowering = if isa.has_x86_pmaddubsw_lowering() { Lowering::Pmaddubsw } else { Lowering::Widening };
        Self::compile_as(lowering)
    }

    fn compile_as(lowering: Lowering) -> Result<TernaryJit, String> {
        let isa = host_isa()?;
        let mut module = JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()));
        let config = module.target_config();
        let ptr = config.pointer_type();
        let mut sig = Signature::new(config.default_call_conv);
        sig.params.extend([AbiParam::new(ptr); 4]);
        let shapes: Vec<(usize, usize)> = [1, 2, 4].into_iter().flat_map(|r| [1, 2, 4].map(|t| (r, t))).collect();
        let fns: Vec<_> = shapes.iter().map(|(r, t)| (format!("ternary_dots_r{r}_t{t}"), sig.clone())).collect();
        let code = define_all(&mut module, &fns, |i, _, func, fbc| build_dots(func, fbc, config, shapes[i], lowering))?;
        // SAFETY: every function was built with exactly this signature.
        let f = |i: usize| unsafe { std::mem::transmute::<*const u8, DotsFn>(code[i]) };
        let fns = [[f(0), f(1), f(2)], [f(3), f(4), f(5)], [f(6), f(7), f(8)]];
        Ok(TernaryJit { fns, _module: ModuleBox(module) })
    }
}

/// How codes times activations become 16-bit sums.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Lowering {
    /// x86's `pmaddubsw`: sixteen products, summed in adjacent pairs.
    Pmaddubsw,
    /// Any host: both widened to 16 bits and multiplied, low and high
    /// halves summed apart.
    Widening,
}

/// Emits the body of one (rows, tokens) kernel.
fn build_dots(func: &mut Function, fbc: &mut FunctionBuilderContext, config: TargetFrontendConfig, (rows, tokens): (usize, usize), lowering: Lowering) {
    let ptr = config.pointer_type();
    let mut b = FunctionBuilder::new(func, fbc);
    let params = begin(&mut b);
    let (tile, chunks, xs, out) = (params[0], params[1], params[2], params[3]);
    // Weights are read-only and never trap here, so Cranelift may move
    // their loads; nothing is assumed aligned.
    let plain = MemFlagsData::new().with_notrap();
    let weights = plain.with_readonly().with_can_move();
    let little = MemFlagsData::new().with_endianness(ir::Endianness::Little);
    let x: Vec<Value> = (0..tokens).map(|j| b.ins().load(ptr, plain, xs, (8 * j) as i32)).collect();
    let zero = b.ins().iconst(types::I32, 0);
    let zero4 = b.ins().splat(types::I32X4, zero);
    let acc: Vec<Variable> = (0..rows * tokens)
        .map(|_| {
            let v = b.declare_var(types::I32X4);
            b.def_var(v, zero4);
            v
        })
        .collect();
    let c0 = b.ins().iconst(ptr, 0);
    emit_loop(&mut b, ptr, c0, chunks, 1, |b, c| {
        let mask_byte = b.ins().iconst(types::I16, 0x0303);
        let mask = b.ins().splat(types::I16X8, mask_byte);
        // This chunk's rows start at tile + c · rows · 32.
        let row_bytes = b.ins().imul_imm_u(c, (rows * 32) as i64);
        let chunk_base = b.ins().iadd(tile, row_bytes);
        let x_off = b.ins().imul_imm_u(c, 128);
        let x_base: Vec<Value> = x.iter().map(|&p| b.ins().iadd(p, x_off)).collect();
        for r in 0..rows {
            let packed: Vec<Value> = (0..2).map(|h| b.ins().load(types::I8X16, weights, chunk_base, (r * 32 + 16 * h) as i32)).collect();
            // Per token, its 16-bit sums: one vector (pmaddubsw) or two (widening).
            let mut sums: Vec<Vec<Value>> = vec![Vec::new(); tokens];
            for field in 0..4 {
                for (h, &p) in packed.iter().enumerate() {
                    let wide = b.ins().bitcast(types::I16X8, little, p);
                    let shift = b.ins().iconst(types::I32, (6 - 2 * field) as i64);
                    let shifted = b.ins().ushr(wide, shift);
                    let masked = b.ins().band(shifted, mask);
                    let codes = b.ins().bitcast(types::I8X16, little, masked);
                    for (j, sum) in sums.iter_mut().enumerate() {
                        let xv = b.ins().load(types::I8X16, plain, x_base[j], (32 * field + 16 * h) as i32);
                        let prods = match lowering {
                            Lowering::Pmaddubsw => vec![b.ins().x86_pmaddubsw(xv, codes)],
                            Lowering::Widening => {
                                let (xl, xh) = (b.ins().swiden_low(xv), b.ins().swiden_high(xv));
                                let (cl, ch) = (b.ins().uwiden_low(codes), b.ins().uwiden_high(codes));
                                vec![b.ins().imul(xl, cl), b.ins().imul(xh, ch)]
                            }
                        };
                        if sum.is_empty() {
                            *sum = prods;
                        } else {
                            for (s, p) in sum.iter_mut().zip(prods) {
                                *s = b.ins().iadd(*s, p);
                            }
                        }
                    }
                }
            }
            for (j, sum) in sums.into_iter().enumerate() {
                let mut a = b.use_var(acc[r * tokens + j]);
                for s in sum {
                    let (lo, hi) = (b.ins().swiden_low(s), b.ins().swiden_high(s));
                    let widened = match lowering {
                        Lowering::Pmaddubsw => b.ins().iadd_pairwise(lo, hi),
                        Lowering::Widening => b.ins().iadd(lo, hi),
                    };
                    a = b.ins().iadd(a, widened);
                }
                b.def_var(acc[r * tokens + j], a);
            }
        }
    });
    for r in 0..rows {
        for j in 0..tokens {
            let a = b.use_var(acc[r * tokens + j]);
            let lanes: Vec<Value> = (0..4).map(|l| b.ins().extractlane(a, l as u8)).collect();
            let s01 = b.ins().iadd(lanes[0], lanes[1]);
            let s23 = b.ins().iadd(lanes[2], lanes[3]);
            let s = b.ins().iadd(s01, s23);
            b.ins().store(plain, s, out, ((r * 4 + j) * 4) as i32);
        }
    }
    end(b, config);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a plain sum over the same layout, every tile shape, both
    /// lowerings (the widening one is what hosts without `pmaddubsw` get).
    #[test]
    fn generated_kernels_compute_exact_dots() {
        let native = host_isa().expect("Cranelift supports the hosts CI runs on").has_x86_pmaddubsw_lowering();
        for lowering in [Lowering::Pmaddubsw, Lowering::Widening].into_iter().filter(|&l| native || l == Lowering::Widening) {
            let jit = TernaryJit::compile_as(lowering).expect("generated");
            exact_dots(&jit, lowering);
        }
    }

    fn exact_dots(jit: &TernaryJit, lowering: Lowering) {
        let chunks = 3;
        for rows in [1, 2, 4] {
            for tokens in [1, 2, 4] {
                let tile: Vec<u8> = (0..rows * chunks * 32).map(|i| (0..4).fold(0u8, |byte, f| byte << 2 | ((i * 7 + f * 5 + i / 3) % 3) as u8)).collect();
                let xs: Vec<Vec<i8>> =
                    (0..tokens).map(|j| (0..chunks * 128).map(|i| ((i * 37 + j * 11) % 255) as i32 as i8).map(|v| v.max(-127)).collect()).collect();
                let ptrs: Vec<*const i8> = xs.iter().map(|x| x.as_ptr()).collect();
                let mut out = [0i32; 16];
                // SAFETY: the tile holds rows × chunks × 32 bytes, each
                // token chunks × 128 int8, `out` rows × tokens ≤ 16 sums.
                unsafe { jit.dots(rows, tokens)(tile.as_ptr(), chunks, ptrs.as_ptr(), out.as_mut_ptr()) };
                for r in 0..rows {
                    for (j, x) in xs.iter().enumerate() {
                        let mut want = 0i32;
                        for c in 0..chunks {
                            for b in 0..32 {
                                let byte = tile[(c * rows + r) * 32 + b];
                                for f in 0..4 {
                                    want += ((byte >> (6 - 2 * f)) & 3) as i32 * x[c * 128 + 32 * f + b] as i32;
                                }
                            }
                        }
                        assert_eq!(out[r * 4 + j], want, "{lowering:?} rows {rows} tokens {tokens}: row {r} token {j}");
                    }
                }
            }
        }
    }
}
