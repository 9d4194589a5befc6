//! The graph's other kernels: norms with activation quantization, RoPE
//! and elementwise ops, all writing into buffers the caller owns (attention
//! has its own module). Their arithmetic is the interpreter's, in the same
//! order, so their results are identical to it; only the work is spread
//! over threads and fused passes. Each takes the [`Isa`] to run: native
//! code, or with [`Isa::Cranelift`] the kernels generated in [`super::jit`].

use super::pool::{share, Pool, SharedMut};
use super::ternary::QuantActs;
use super::{jit, vmath, Isa};
use bitnet_ir::interp::kernels::{self, inv_rms};
use bitnet_ir::{BinaryOp, GateAct, RopeMode};

pub fn rms_norm(isa: Isa, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let k = w.len();
    if isa == Isa::Cranelift {
        let jit = jit::NormQuantJit::get().expect("Isa::Cranelift is available");
        return out.chunks_exact_mut(k).zip(x.chunks_exact(k)).for_each(|(o, xr)| jit.norm(xr, w, eps, o));
    }
    for (o, xr) in out.chunks_exact_mut(k).zip(x.chunks_exact(k)) {
        let s = inv_rms(xr, eps);
        for ((o, &v), &g) in o.iter_mut().zip(xr).zip(w) {
            *o = v * s * g;
        }
    }
}

/// BitNet's per-token quantization of rows of `k` into `out`, with each
/// row's `Σ q`; normalized first by `norm = (w, eps)` when given.
pub fn quantize_rows(x: &[f32], k: usize, norm: Option<(&[f32], f32)>, out: &mut QuantActs) {
    let s = x.len() / k.max(1);
    out.resize(s, k);
    quantize_tokens(Isa::best(), x, k, norm, RowsOut::of(out), 0..s);
}

/// [`quantize_rows`] in `isa`'s code, with the tokens shared among the
/// pool's workers (prefill); each row's arithmetic is the same whoever
/// does it.
pub fn quantize_rows_on(pool: &Pool, isa: Isa, x: &[f32], k: usize, norm: Option<(&[f32], f32)>, out: &mut QuantActs) {
    assert!(isa.available(), "quantize rows: {} is not available on this CPU", isa.name());
    let s = x.len() / k.max(1);
    out.resize(s, k);
    let rows = RowsOut::of(out);
    if s < 2 {
        return quantize_tokens(isa, x, k, norm, rows, 0..s);
    }
    pool.run(&|me, workers| quantize_tokens(isa, x, k, norm, rows, share(s, me, workers)));
}

/// Where the rows of a [`QuantActs`] go, for workers writing disjoint rows.
#[derive(Clone, Copy)]
struct RowsOut {
    q: SharedMut<i8>,
    gamma: SharedMut<f32>,
    sum: SharedMut<i32>,
    kp: usize,
}

impl RowsOut {
    fn of(a: &mut QuantActs) -> RowsOut {
        RowsOut { q: SharedMut(a.q.as_mut_ptr()), gamma: SharedMut(a.gamma.as_mut_ptr()), sum: SharedMut(a.sum.as_mut_ptr()), kp: a.kp }
    }
}

fn quantize_tokens(isa: Isa, x: &[f32], k: usize, norm: Option<(&[f32], f32)>, out: RowsOut, tokens: std::ops::Range<usize>) {
    // The normalized row, kept by each thread between calls. Allocating
    // and clearing a fresh one, with `QuantActs::resize` clearing its whole
    // buffer, took 6-9% of a row's time together (criterion's
    // elementwise/rms_norm_quant), paid on every call of a decode step.
    thread_local! {
        static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    ROW.with_borrow_mut(|row| {
        if row.len() < k {
            row.resize(k, 0.0);
        }
        quantize_tokens_into(isa, x, k, norm, out, tokens, &mut row[..k]);
    });
}

fn quantize_tokens_into(isa: Isa, x: &[f32], k: usize, norm: Option<(&[f32], f32)>, out: RowsOut, tokens: std::ops::Range<usize>, row: &mut [f32]) {
    let generated = (isa == Isa::Cranelift).then(|| jit::NormQuantJit::get().expect("Isa::Cranelift is available"));
    for t in tokens {
        let xr = &x[t * k..(t + 1) * k];
        // SAFETY: `out` was sized for every token, and row t belongs to
        // this caller alone.
        let q = unsafe { std::slice::from_raw_parts_mut(out.q.ptr().add(t * out.kp), k) };
        let (g, sum) = match generated {
            Some(jit) => jit.row(xr, norm, row, q),
            None => quantize_token(xr, norm, row, q, isa),
        };
        // SAFETY: gamma and sum hold one entry per token, and entry t is
        // written by this caller alone (tokens are split between workers).
        unsafe {
            *out.gamma.ptr().add(t) = g;
            *out.sum.ptr().add(t) = sum;
        }
    }
}

/// One token: the norm when there is one, then γ = 127 / max|x| (the max
/// at least 1e-5), q = clamp(round(γx), −128, 127), and Σq. On AVX-512
/// (`Isa::Avx512Vnni`) or AVX2 the same code is compiled for those
/// vectors, sixteen or eight lanes wide: [`quantize_plain`] is inlined
/// into each, so its arithmetic, and the order of it, do not change.
fn quantize_token(x: &[f32], norm: Option<(&[f32], f32)>, row: &mut [f32], q: &mut [i8], isa: Isa) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the caller checked that this CPU has AVX-512 F and BW
        // (part of Isa::Avx512Vnni's check).
        Isa::Avx512Vnni => return unsafe { wide::avx512(x, norm, row, q) },
        // SAFETY: the caller checked that this CPU has AVX2.
        Isa::Avx2 => return unsafe { wide::avx2(x, norm, row, q) },
        _ => {}
    }
    let _ = isa;
    quantize_plain(x, norm, row, q)
}

#[cfg(target_arch = "x86_64")]
mod wide {
    use super::quantize_plain;

    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    pub(super) unsafe fn avx512(x: &[f32], norm: Option<(&[f32], f32)>, row: &mut [f32], q: &mut [i8]) -> (f32, i32) {
        quantize_plain(x, norm, row, q)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2(x: &[f32], norm: Option<(&[f32], f32)>, row: &mut [f32], q: &mut [i8]) -> (f32, i32) {
        quantize_plain(x, norm, row, q)
    }
}

#[inline(always)]
fn quantize_plain(x: &[f32], norm: Option<(&[f32], f32)>, row: &mut [f32], q: &mut [i8]) -> (f32, i32) {
    let row = match norm {
        Some((w, eps)) => {
            let scale = inv_rms(x, eps);
            for ((o, &v), &g) in row.iter_mut().zip(x).zip(w) {
                *o = v * scale * g;
            }
            &*row
        }
        None => x,
    };
    // max is exact in any order: 32 lanes, so that it vectorizes into
    // chains that do not wait on each other (two of AVX-512's sixteen
    // lanes, four of AVX2's eight; one chain took a third of the row's
    // time, each `max` waiting on the last).
    let mut lanes = [0f32; 32];
    let mut chunks = row.chunks_exact(32);
    for c in &mut chunks {
        for (m, v) in lanes.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    for (m, v) in lanes.iter_mut().zip(chunks.remainder()) {
        *m = m.max(v.abs());
    }
    let amax = lanes.iter().fold(0f32, |m, &v| m.max(v)).max(1e-5);
    let g = 127.0 / amax;
    let mut sum = 0i32;
    for (o, &v) in q.iter_mut().zip(row) {
        let y = round_half_away(v * g).clamp(-128.0, 127.0);
        // `y as i8` (NaN to 0), in steps that vectorize: an integer-valued
        // |y| ≤ 2²² plus 1.5·2²³ holds y in its low mantissa bits.
        let y = if y.is_nan() { 0.0 } else { y };
        let qi = (y + 12_582_912.0).to_bits() as i32 - 0x4b40_0000;
        *o = qi as i8;
        sum += qi;
    }
    (g, sum)
}

/// `f32::round` (halves away from zero) without the libm call, so that it
/// vectorizes: the fraction `y − trunc(y)` is exact.
#[inline(always)]
fn round_half_away(y: f32) -> f32 {
    let t = y.trunc();
    if (y - t).abs() >= 0.5 {
        t + 1f32.copysign(y)
    } else {
        t
    }
}

#[allow(clippy::too_many_arguments)]
pub fn rope(isa: Isa, x: &[f32], out: &mut [f32], row: usize, positions: &[i32], mode: RopeMode, theta: f32, head_dim: usize) {
    if isa == Isa::Cranelift {
        let jit = jit::RopeJit::get().expect("Isa::Cranelift is available");
        let mut tables = jit::RopeTables::default();
        for ((o, xr), &p) in out.chunks_exact_mut(row).zip(x.chunks_exact(row)).zip(positions) {
            tables.fill(p, theta, head_dim, mode);
            jit.token(mode, xr, o, head_dim, &tables);
        }
        return;
    }
    out.copy_from_slice(x);
    kernels::rope(out, row, positions, mode, theta, head_dim);
}

/// [`rope`] with the tokens shared among the pool's workers.
#[allow(clippy::too_many_arguments)]
pub fn rope_on(pool: &Pool, isa: Isa, x: &[f32], out: &mut [f32], row: usize, positions: &[i32], mode: RopeMode, theta: f32, head_dim: usize) {
    if positions.len() < 2 {
        return rope(isa, x, out, row, positions, mode, theta, head_dim);
    }
    let dst = SharedMut(out.as_mut_ptr());
    pool.run(&|me, workers| {
        let tokens = share(positions.len(), me, workers);
        // SAFETY: each worker writes the rows of its own tokens.
        let o = unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(tokens.start * row), tokens.len() * row) };
        rope(isa, &x[tokens.start * row..tokens.end * row], o, row, &positions[tokens], mode, theta, head_dim);
    });
}

pub fn glu(act: GateAct, gate: &[f32], up: &[f32], out: &mut [f32]) {
    vmath::glu(Isa::best(), act, gate, up, out)
}

/// [`glu`] in `isa`'s code, with the values shared among the pool's
/// workers when there are enough of them to be worth it (prefill).
pub fn glu_on(pool: &Pool, isa: Isa, act: GateAct, gate: &[f32], up: &[f32], out: &mut [f32]) {
    split_on(pool, out, |r, o| vmath::glu(isa, act, &gate[r.clone()], &up[r], o));
}

/// `out = x ∘ y`, `y` repeated along `x` when shorter (a row, a scalar).
pub fn binary_on(pool: &Pool, isa: Isa, op: BinaryOp, x: &[f32], y: &[f32], out: &mut [f32]) {
    assert!(x.len() == out.len() && !y.is_empty() && x.len().is_multiple_of(y.len()), "{}: operands do not fit", op.name());
    if isa == Isa::Cranelift && y.len() == x.len() {
        let jit = jit::ElementwiseJit::get().expect("Isa::Cranelift is available");
        return split_on(pool, out, |r, o| jit.binary(op, &x[r.clone()], &y[r], o));
    }
    out.iter_mut().zip(x).enumerate().for_each(|(i, (o, &a))| *o = kernels::binary(op, a, y[i % y.len()]));
}

/// `f(range, out[range])` over all of `out`, in stretches shared among the
/// pool's workers when there are enough values to be worth it.
fn split_on(pool: &Pool, out: &mut [f32], f: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync) {
    let n = out.len();
    if n < 1 << 12 {
        return f(0..n, out);
    }
    let dst = SharedMut(out.as_mut_ptr());
    pool.run(&|me, workers| {
        let r = share(n, me, workers);
        // SAFETY: each worker writes its own stretch of the output.
        let o = unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(r.start), r.len()) };
        f(r, o);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnet_ir::interp::{Interpreter, KvCache, Tensor};
    use bitnet_ir::{ActQuant, DType, Dim, Graph, Op, TensorType};
    use std::collections::HashMap;

    #[test]
    fn rounding_without_libm_is_f32_round() {
        let mut values =
            vec![0.5f32, -0.5, 1.5, -1.5, 2.5, 0.49999997, -0.49999997, 126.5, -127.5, 8388607.5, 8388609.0, 1e30, -0.0, f32::INFINITY, f32::NEG_INFINITY];
        values.extend((0..100_000).map(|i| (i as f32 - 50_000.0) * 0.013_7));
        values.extend((0..1000).map(|i| i as f32 * 0.5 - 250.0));
        for v in values {
            assert_eq!(round_half_away(v).to_bits(), v.round().to_bits(), "{v}");
        }
        assert!(round_half_away(f32::NAN).is_nan());
    }

    /// Both compilations of the per-token quantization give the
    /// interpreter's `rms_norm` + `quantize_act`, bit for bit, on awkward
    /// row lengths.
    #[test]
    fn token_quantization_matches_the_interpreter() {
        let special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.5, -0.5];
        for (k, with_special) in [1usize, 3, 7, 8, 9, 783, 2592].into_iter().flat_map(|k| [(k, false), (k, true)]) {
            let x: Vec<f32> = (0..2 * k)
                .map(|i| ((i as u32).wrapping_mul(2654435761) >> 20) as f32 / 97.0 - 21.0)
                .map(|v| if v.fract() == 0.0 { v + 0.5 } else { v })
                .enumerate()
                .map(|(i, v)| if with_special && i % 5 == 2 { special[i / 5 % special.len()] } else { v })
                .collect();
            let w: Vec<f32> = (0..k).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
            let mut g = Graph::new("q");
            let xi = g.leaf(Op::Input { name: "x".into() }, TensorType::new(DType::F32, [Dim::Seq, Dim::Const(k)]));
            let wi = g.leaf(Op::Weight { name: "w".into() }, TensorType::fixed(DType::F32, &[k]));
            let y = g.add(Op::RmsNormQuant { eps: 1e-5, scheme: ActQuant::PerToken }, &[xi, wi]).unwrap();
            g.outputs.push(y);
            let ws: HashMap<String, (DType, Vec<usize>, Vec<u8>)> =
                [("w".to_string(), (DType::F32, vec![k], w.iter().flat_map(|v| v.to_le_bytes()).collect()))].into();
            let want = Interpreter::new(&ws, 1).eval(&g, &[("x", Tensor::f32(vec![2, k], x.clone()))], &mut KvCache::new()).unwrap().pop().unwrap();
            let Tensor::Q8Row { q: want_q, gamma: want_g, .. } = want else { panic!("q8_row expected") };
            for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni].into_iter().filter(|i| i.available()) {
                let mut row = vec![0f32; k];
                for t in 0..2 {
                    let mut q = vec![0i8; k];
                    let (gamma, sum) = quantize_token(&x[t * k..(t + 1) * k], Some((&w, 1e-5)), &mut row, &mut q, isa);
                    assert_eq!(q, want_q[t * k..(t + 1) * k], "k {k} token {t} {isa:?} special {with_special}");
                    assert_eq!(gamma.to_bits(), want_g[t].to_bits(), "k {k} token {t} {isa:?} special {with_special}");
                    assert_eq!(sum, q.iter().map(|&v| v as i32).sum::<i32>());
                }
            }
        }
    }
}
