//! Dot products and f16 rows, generated: what the float matrix products
//! (the output head, the projections of non-ternary models), the int8 head
//! (`--head q8`) and the embedding lookup need.
//!
//! - `dot_f32`, `dot_f16`: four accumulators of four lanes, summed across
//!   at the end, then the last `n mod 4` products in order; f16 is widened
//!   in registers (below). Plain multiplies and adds, no fused ones, so the
//!   same code runs on any host; the order differs from the interpreter's,
//!   so the tests hold them to the float budget.
//! - `dot_i8`: bytes widened to 16 bits, multiplied (a product of two
//!   int8 fits), widened to 32 and summed: exact, whatever the order.
//! - `dot_q4` (`--head q4`): a group's 16 bytes split into their nibbles,
//!   less 8, then as `dot_i8` to four exact i32 lanes, converted, scaled by
//!   the group's f32 scale and accumulated in four f32 lanes, summed across
//!   at the end.
//! - f16 → f32 without F16C: the 15 magnitude bits shifted into an f32's
//!   place and multiplied by 2¹¹² (exact for normal and subnormal halves),
//!   infinities and NaNs given the all-ones exponent (an OR, the scaling
//!   having kept their mantissa), the sign put back:
//!   the same bits as `half::f16::to_f32` for every finite and infinite
//!   value.

use super::{at, begin, define_all, emit_loop, host_isa, ModuleBox};
use cranelift_codegen::ir::{condcodes::IntCC, types, AbiParam, Function, InstBuilder, MemFlagsData, Signature, Type, Value};
use cranelift_codegen::isa::TargetFrontendConfig;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Module};
use std::sync::OnceLock;

type DotF32Fn = unsafe extern "C" fn(a: *const f32, b: *const u8, n: usize) -> f32;
type DotI8Fn = unsafe extern "C" fn(a: *const i8, b: *const i8, n: usize) -> i32;
type RowFn = unsafe extern "C" fn(src: *const u8, out: *mut f32, n: usize);
type DotQ4Fn = unsafe extern "C" fn(q: *const u8, d: *const f32, x: *const i8, groups: usize) -> f32;

pub struct DotJit {
    dot_f32: DotF32Fn,
    dot_f16: DotF32Fn,
    dot_i8: DotI8Fn,
    dot_q4: DotQ4Fn,
    f16_row: RowFn,
    _module: ModuleBox,
}

/// Which kind of function to generate.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    DotF32,
    DotF16,
    DotI8,
    DotQ4,
    F16Row,
}

impl DotJit {
    pub fn get() -> Result<&'static DotJit, String> {
        static JIT: OnceLock<Result<DotJit, String>> = OnceLock::new();
        JIT.get_or_init(DotJit::compile).as_ref().map_err(Clone::clone)
    }

    /// `Σ a·b`.
    pub fn dot(&self, a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        // SAFETY: both are valid for `n` values.
        unsafe { (self.dot_f32)(a.as_ptr(), b.as_ptr() as *const u8, n) }
    }

    /// `Σ a·b` with `b` as f16 bytes.
    pub fn dot_f16(&self, a: &[f32], b: &[u8]) -> f32 {
        let n = a.len().min(b.len() / 2);
        // SAFETY: `a` holds `n` values, `b` `2n` bytes.
        unsafe { (self.dot_f16)(a.as_ptr(), b.as_ptr(), n) }
    }

    /// `Σ a·b` of int8 values, exactly.
    pub fn dot_i8(&self, a: &[i8], b: &[i8]) -> i32 {
        let n = a.len().min(b.len());
        // SAFETY: both are valid for `n` values.
        unsafe { (self.dot_i8)(a.as_ptr(), b.as_ptr(), n) }
    }

    /// `Σ_g d_g · Σ_j q_gj x_gj` over the groups of one 4-bit row, as
    /// [`crate::cpu::int4::reference_dot`].
    pub fn dot_q4(&self, q: &[u8], d: &[f32], x: &[i8]) -> f32 {
        let groups = d.len().min(q.len() / 16).min(x.len() / 32);
        // SAFETY: `q` holds 16 bytes a group, `x` 32 values, `d` one scale.
        unsafe { (self.dot_q4)(q.as_ptr(), d.as_ptr(), x.as_ptr(), groups) }
    }

    /// f16 bytes to f32.
    pub fn f16_to_f32(&self, src: &[u8], out: &mut [f32]) {
        let n = out.len().min(src.len() / 2);
        // SAFETY: `src` holds `2n` bytes, `out` `n` values.
        unsafe { (self.f16_row)(src.as_ptr(), out.as_mut_ptr(), n) }
    }

    fn compile() -> Result<DotJit, String> {
        let mut module = JITModule::new(JITBuilder::with_isa(host_isa()?, default_libcall_names()));
        let config = module.target_config();
        let ptr = config.pointer_type();
        let sig = |params: usize, ret: Option<Type>| {
            let mut s = Signature::new(config.default_call_conv);
            s.params.extend(std::iter::repeat_n(AbiParam::new(ptr), params));
            s.returns.extend(ret.map(AbiParam::new));
            s
        };
        let kinds = [Kind::DotF32, Kind::DotF16, Kind::DotI8, Kind::DotQ4, Kind::F16Row];
        let fns = [
            ("dot_f32".to_string(), sig(3, Some(types::F32))),
            ("dot_f16".to_string(), sig(3, Some(types::F32))),
            ("dot_i8".to_string(), sig(3, Some(types::I32))),
            ("dot_q4".to_string(), sig(4, Some(types::F32))),
            ("f16_row".to_string(), sig(3, None)),
        ];
        let code = define_all(&mut module, &fns, |i, _, func, fbc| build(func, fbc, config, kinds[i]))?;
        // SAFETY: each was built with the signature of its field.
        unsafe {
            Ok(DotJit {
                dot_f32: std::mem::transmute::<*const u8, DotF32Fn>(code[0]),
                dot_f16: std::mem::transmute::<*const u8, DotF32Fn>(code[1]),
                dot_i8: std::mem::transmute::<*const u8, DotI8Fn>(code[2]),
                dot_q4: std::mem::transmute::<*const u8, DotQ4Fn>(code[3]),
                f16_row: std::mem::transmute::<*const u8, RowFn>(code[4]),
                _module: ModuleBox(module),
            })
        }
    }
}

fn build(func: &mut Function, fbc: &mut FunctionBuilderContext, config: TargetFrontendConfig, kind: Kind) {
    let ptr = config.pointer_type();
    let mut b = FunctionBuilder::new(func, fbc);
    let p = begin(&mut b);
    let (a, w, n) = (p[0], p[1], p[2]);
    let zero = b.ins().iconst(ptr, 0);
    match kind {
        Kind::F16Row => {
            let flags = MemFlagsData::new().with_notrap();
            let vec_end = b.ins().band_imm_s(n, !3);
            let mut start = zero;
            for ty in [types::F32X4, types::F32] {
                let (end, step) = if ty.is_vector() { (vec_end, 4) } else { (n, 1) };
                start = emit_loop(&mut b, ptr, start, end, step, |b, i| {
                    let src = at(b, a, i, 1);
                    let v = emit_f16(b, ty, src);
                    let dst = at(b, w, i, 2);
                    b.ins().store(flags, v, dst, 0);
                });
            }
            b.ins().return_(&[]);
        }
        Kind::DotI8 => {
            let s = emit_dot_i8(&mut b, ptr, a, w, n);
            b.ins().return_(&[s]);
        }
        Kind::DotQ4 => {
            let s = emit_dot_q4(&mut b, ptr, [p[0], p[1], p[2]], p[3]);
            b.ins().return_(&[s]);
        }
        Kind::DotF32 | Kind::DotF16 => {
            let s = emit_dot_f32(&mut b, ptr, a, w, n, kind == Kind::DotF16);
            b.ins().return_(&[s]);
        }
    }
    b.seal_all_blocks();
    b.finalize(config);
}

fn splat_i32(b: &mut FunctionBuilder, ty: Type, v: i64) -> Value {
    let c = b.ins().iconst(types::I32, v);
    if ty.is_vector() {
        b.ins().splat(ty, c)
    } else {
        c
    }
}

/// The f16 values at `src` (four for a vector `ty`, else one) as f32; see
/// the module's notes.
pub(super) fn emit_f16(b: &mut FunctionBuilder, ty: Type, src: Value) -> Value {
    let flags = MemFlagsData::new().with_notrap().with_readonly();
    let int = if ty.is_vector() { types::I32X4 } else { types::I32 };
    let h = if ty.is_vector() { b.ins().uload16x4(flags, src, 0) } else { b.ins().uload16(types::I32, flags, src, 0) };
    let mask = splat_i32(b, int, 0x7fff);
    let mag = b.ins().band(h, mask);
    let sign_bit = splat_i32(b, int, 0x8000);
    let sign = b.ins().band(h, sign_bit);
    let sign = b.ins().ishl_imm_u(sign, 16);
    let bits = b.ins().ishl_imm_u(mag, 13);
    let scaled = b.ins().bitcast(ty, MemFlagsData::new(), bits);
    let c = b.ins().f32const(f32::from_bits(0x7780_0000)); // 2¹¹²
    let c = if ty.is_vector() { b.ins().splat(ty, c) } else { c };
    let scaled = b.ins().fmul(scaled, c);
    let scaled = b.ins().bitcast(int, MemFlagsData::new(), scaled);
    // Infinities and NaNs: the scaling left their mantissa in place (a
    // normal number times a power of two); set the exponent to all ones.
    // `mag` is at most 0x7fff, so a signed comparison does.
    let below_inf = splat_i32(b, int, 0x7bff);
    let special = b.ins().icmp(IntCC::SignedGreaterThan, mag, below_inf);
    let exp_ones = splat_i32(b, int, 0x7f80_0000);
    let ones = if ty.is_vector() {
        b.ins().band(special, exp_ones)
    } else {
        let none = b.ins().iconst(types::I32, 0);
        b.ins().select(special, exp_ones, none)
    };
    let v = b.ins().bor(scaled, ones);
    let v = b.ins().bor(v, sign);
    b.ins().bitcast(ty, MemFlagsData::new(), v)
}

/// `Σ a·w` over `n` f32 (`w` as f16 when `half`); see the module's notes.
pub(super) fn emit_dot_f32(b: &mut FunctionBuilder, ptr: Type, a: Value, w: Value, n: Value, half: bool) -> Value {
    let flags = MemFlagsData::new().with_notrap().with_readonly();
    let wshift = if half { 1 } else { 2 };
    let load = |b: &mut FunctionBuilder, ty: Type, i: Value| {
        let pa = at(b, a, i, 2);
        let x = b.ins().load(ty, flags, pa, 0);
        let pw = at(b, w, i, wshift);
        let y = if half { emit_f16(b, ty, pw) } else { b.ins().load(ty, flags, pw, 0) };
        b.ins().fmul(x, y)
    };
    let zero = b.ins().iconst(ptr, 0);
    let z = b.ins().f32const(0.0);
    let zv = b.ins().splat(types::F32X4, z);
    let accs: [Variable; 4] = std::array::from_fn(|_| {
        let v = b.declare_var(types::F32X4);
        b.def_var(v, zv);
        v
    });
    let end16 = b.ins().band_imm_s(n, !15);
    let i = emit_loop(b, ptr, zero, end16, 16, |b, i| {
        for (j, &acc) in accs.iter().enumerate() {
            let ij = b.ins().iadd_imm_u(i, 4 * j as i64);
            let p = load(b, types::F32X4, ij);
            let s = b.use_var(acc);
            let s = b.ins().fadd(s, p);
            b.def_var(acc, s);
        }
    });
    let end4 = b.ins().band_imm_s(n, !3);
    let i = emit_loop(b, ptr, i, end4, 4, |b, i| {
        let p = load(b, types::F32X4, i);
        let s = b.use_var(accs[0]);
        let s = b.ins().fadd(s, p);
        b.def_var(accs[0], s);
    });
    let v: Vec<Value> = accs.iter().map(|&acc| b.use_var(acc)).collect();
    let (s01, s23) = (b.ins().fadd(v[0], v[1]), b.ins().fadd(v[2], v[3]));
    let v = b.ins().fadd(s01, s23);
    let total = b.declare_var(types::F32);
    let mut s = b.ins().extractlane(v, 0);
    for lane in 1..4 {
        let x = b.ins().extractlane(v, lane);
        s = b.ins().fadd(s, x);
    }
    b.def_var(total, s);
    emit_loop(b, ptr, i, n, 1, |b, i| {
        let p = load(b, types::F32, i);
        let s = b.use_var(total);
        let s = b.ins().fadd(s, p);
        b.def_var(total, s);
    });
    b.use_var(total)
}

/// `Σ a·w` over `n` int8 values, exactly; see the module's notes.
fn emit_dot_i8(b: &mut FunctionBuilder, ptr: Type, a: Value, w: Value, n: Value) -> Value {
    let flags = MemFlagsData::new().with_notrap().with_readonly();
    let zero = b.ins().iconst(ptr, 0);
    let z = b.ins().iconst(types::I32, 0);
    let zv = b.ins().splat(types::I32X4, z);
    let accs: [Variable; 4] = std::array::from_fn(|_| {
        let v = b.declare_var(types::I32X4);
        b.def_var(v, zv);
        v
    });
    let end16 = b.ins().band_imm_s(n, !15);
    let i = emit_loop(b, ptr, zero, end16, 16, |b, i| {
        let (pa, pw) = (b.ins().iadd(a, i), b.ins().iadd(w, i));
        let x = b.ins().load(types::I8X16, flags, pa, 0);
        let y = b.ins().load(types::I8X16, flags, pw, 0);
        for (&acc, part) in accs.iter().zip(emit_widened_products(b, x, y)) {
            let s = b.use_var(acc);
            let s = b.ins().iadd(s, part);
            b.def_var(acc, s);
        }
    });
    let v: Vec<Value> = accs.iter().map(|&acc| b.use_var(acc)).collect();
    let (s01, s23) = (b.ins().iadd(v[0], v[1]), b.ins().iadd(v[2], v[3]));
    let v = b.ins().iadd(s01, s23);
    let total = b.declare_var(types::I32);
    let mut s = b.ins().extractlane(v, 0);
    for lane in 1..4 {
        let x = b.ins().extractlane(v, lane);
        s = b.ins().iadd(s, x);
    }
    b.def_var(total, s);
    emit_loop(b, ptr, i, n, 1, |b, i| {
        let (pa, pw) = (b.ins().iadd(a, i), b.ins().iadd(w, i));
        let x = b.ins().sload8(types::I32, flags, pa, 0);
        let y = b.ins().sload8(types::I32, flags, pw, 0);
        let p = b.ins().imul(x, y);
        let s = b.use_var(total);
        let s = b.ins().iadd(s, p);
        b.def_var(total, s);
    });
    b.use_var(total)
}

/// Exact products of two int8 vectors, widened to four i32 lanes (their
/// sum is the dot product).
fn emit_widened_products(b: &mut FunctionBuilder, x: Value, y: Value) -> [Value; 4] {
    let (xl, xh) = (b.ins().swiden_low(x), b.ins().swiden_high(x));
    let (yl, yh) = (b.ins().swiden_low(y), b.ins().swiden_high(y));
    let (pl, ph) = (b.ins().imul(xl, yl), b.ins().imul(xh, yh));
    [b.ins().swiden_low(pl), b.ins().swiden_high(pl), b.ins().swiden_low(ph), b.ins().swiden_high(ph)]
}

/// `Σ_g d_g · Σ_j q_gj x_gj` over `groups` groups of 32 (`q` 16 bytes a
/// group, low nibbles the values 0..16, high ones 16..32, each `q + 8`; `d`
/// f32; `x` int8); see the module's notes.
fn emit_dot_q4(b: &mut FunctionBuilder, ptr: Type, [q, d, x]: [Value; 3], groups: Value) -> Value {
    let flags = MemFlagsData::new().with_notrap().with_readonly();
    let zero = b.ins().iconst(ptr, 0);
    let zf = b.ins().f32const(0.0);
    let zfv = b.ins().splat(types::F32X4, zf);
    let acc = b.declare_var(types::F32X4);
    b.def_var(acc, zfv);
    let m = b.ins().iconst(types::I8, 0x0F);
    let mask = b.ins().splat(types::I8X16, m);
    let e = b.ins().iconst(types::I8, 8);
    let eight = b.ins().splat(types::I8X16, e);
    emit_loop(b, ptr, zero, groups, 1, |b, g| {
        let (pq, px, pd) = (at(b, q, g, 4), at(b, x, g, 5), at(b, d, g, 2));
        let bytes = b.ins().load(types::I8X16, flags, pq, 0);
        let lo = b.ins().band(bytes, mask);
        let hi = b.ins().ushr_imm_u(bytes, 4);
        let hi = b.ins().band(hi, mask);
        let (lo, hi) = (b.ins().isub(lo, eight), b.ins().isub(hi, eight));
        let (xl, xh) = (b.ins().load(types::I8X16, flags, px, 0), b.ins().load(types::I8X16, flags, px, 16));
        let mut parts = emit_widened_products(b, lo, xl).into_iter().chain(emit_widened_products(b, hi, xh));
        let first = parts.next().expect("eight parts");
        let sum = parts.fold(first, |s, p| b.ins().iadd(s, p));
        let sum = b.ins().fcvt_from_sint(types::F32X4, sum);
        let scale = b.ins().load(types::F32, flags, pd, 0);
        let scale = b.ins().splat(types::F32X4, scale);
        let scaled = b.ins().fmul(sum, scale);
        let a = b.use_var(acc);
        let a = b.ins().fadd(a, scaled);
        b.def_var(acc, a);
    });
    let v = b.use_var(acc);
    let mut s = b.ins().extractlane(v, 0);
    for lane in 1..4 {
        let x = b.ins().extractlane(v, lane);
        s = b.ins().fadd(s, x);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn jit() -> &'static DotJit {
        DotJit::get().expect("Cranelift supports the hosts CI runs on")
    }

    /// Every one of the 65536 halves widens to `half`'s f32, bit for bit
    /// (NaNs to a NaN), four lanes at a time and one at a time.
    #[test]
    fn every_half_widens_as_the_half_crate_does() {
        let all: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
        for len in [65536usize, 65535] {
            let mut out = vec![0f32; len];
            jit().f16_to_f32(&all[..2 * len], &mut out);
            for (h, &got) in out.iter().enumerate() {
                let want = f16::from_bits(h as u16).to_f32();
                assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{h:#06x}: {got} not {want}");
            }
        }
    }

    /// Float dot products within the budget of the plain sum, int8 exactly,
    /// on awkward lengths.
    #[test]
    fn dots_match_the_plain_sums() {
        for n in [0usize, 1, 3, 15, 17, 783, 2560 + 32] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| f16::from_f32((i as f32 * 0.11).cos()).to_f32()).collect();
            let b16: Vec<u8> = b.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect();
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let budget = 1e-5 * (1.0 + a.iter().zip(&b).map(|(x, y)| (x * y).abs() as f64).sum::<f64>());
            for got in [jit().dot(&a, &b), jit().dot_f16(&a, &b16)] {
                assert!((got as f64 - want).abs() <= budget, "n {n}: {got} not {want}");
            }
            let qa: Vec<i8> = (0..n).map(|i| ((i * 37 % 256) as i32 - 128) as i8).collect();
            let qb: Vec<i8> = (0..n).map(|i| ((i * 91 % 255) as i32 - 127) as i8).collect();
            assert_eq!(jit().dot_i8(&qa, &qb), qa.iter().zip(&qb).map(|(&x, &y)| x as i32 * y as i32).sum::<i32>(), "n {n}");
        }
    }
}
