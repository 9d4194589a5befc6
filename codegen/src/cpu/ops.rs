//! The graph's other kernels: norms with activation quantization,
//! attention over the KV cache, RoPE and elementwise ops, all writing into
//! buffers the caller owns. Their arithmetic is the interpreter's, in the
//! same order, so their results are identical to it (attention's dot
//! products excepted: they are vectorized, so summed in another order);
//! only the work is spread over threads and fused passes.

use super::float;
use super::pool::{share, Pool, SharedMut};
use super::ternary::QuantActs;
use bitnet_ir::interp::{kernels, EvalError, KvCache};
use bitnet_ir::{GateAct, RopeMode};

/// `1 / sqrt(mean(x²) + eps)`, as the interpreter's `rms_norm` computes it.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let mean_sq = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len() as f64;
    1.0 / ((mean_sq as f32) + eps).sqrt()
}

pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let k = w.len();
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
    quantize_tokens(x, k, norm, RowsOut::of(out), 0..s);
}

/// [`quantize_rows`] with the tokens shared among the pool's workers
/// (prefill); each row's arithmetic is the same whoever does it.
pub fn quantize_rows_on(pool: &Pool, x: &[f32], k: usize, norm: Option<(&[f32], f32)>, out: &mut QuantActs) {
    let s = x.len() / k.max(1);
    if s < 2 {
        return quantize_rows(x, k, norm, out);
    }
    out.resize(s, k);
    let rows = RowsOut::of(out);
    pool.run(&|me, workers| quantize_tokens(x, k, norm, rows, share(s, me, workers)));
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

fn quantize_tokens(x: &[f32], k: usize, norm: Option<(&[f32], f32)>, out: RowsOut, tokens: std::ops::Range<usize>) {
    let mut row = vec![0f32; k];
    for t in tokens {
        let xr = &x[t * k..(t + 1) * k];
        match norm {
            Some((w, eps)) => {
                let scale = inv_rms(xr, eps);
                for ((o, &v), &g) in row.iter_mut().zip(xr).zip(w) {
                    *o = v * scale * g;
                }
            }
            None => row.copy_from_slice(xr),
        }
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-5);
        let g = 127.0 / amax;
        // SAFETY: `out` was sized for every token, and row t belongs to
        // this caller alone.
        let q = unsafe { std::slice::from_raw_parts_mut(out.q.ptr().add(t * out.kp), k) };
        let mut sum = 0i32;
        for (o, &v) in q.iter_mut().zip(&row) {
            *o = (v * g).round().clamp(-128.0, 127.0) as i8;
            sum += *o as i32;
        }
        unsafe {
            *out.gamma.ptr().add(t) = g;
            *out.sum.ptr().add(t) = sum;
        }
    }
}

pub fn rope(x: &[f32], out: &mut [f32], row: usize, positions: &[i32], mode: RopeMode, theta: f32, head_dim: usize) {
    out.copy_from_slice(x);
    kernels::rope(out, row, positions, mode, theta, head_dim);
}

/// [`rope`] with the tokens shared among the pool's workers.
#[allow(clippy::too_many_arguments)]
pub fn rope_on(pool: &Pool, x: &[f32], out: &mut [f32], row: usize, positions: &[i32], mode: RopeMode, theta: f32, head_dim: usize) {
    if positions.len() < 2 {
        return rope(x, out, row, positions, mode, theta, head_dim);
    }
    let dst = SharedMut(out.as_mut_ptr());
    pool.run(&|me, workers| {
        let tokens = share(positions.len(), me, workers);
        // SAFETY: each worker writes the rows of its own tokens.
        let o = unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(tokens.start * row), tokens.len() * row) };
        rope(&x[tokens.start * row..tokens.end * row], o, row, &positions[tokens], mode, theta, head_dim);
    });
}

pub fn glu(act: GateAct, gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = kernels::glu(act, g, u);
    }
}

/// [`glu`] with the values shared among the pool's workers when there are
/// enough of them to be worth it (prefill).
pub fn glu_on(pool: &Pool, act: GateAct, gate: &[f32], up: &[f32], out: &mut [f32]) {
    if out.len() < 1 << 12 {
        return glu(act, gate, up, out);
    }
    let n = out.len();
    let dst = SharedMut(out.as_mut_ptr());
    pool.run(&|me, workers| {
        let r = share(n, me, workers);
        // SAFETY: each worker writes its own stretch of the output.
        let o = unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(r.start), r.len()) };
        glu(act, &gate[r.clone()], &up[r], o);
    });
}

/// Shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub layer: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Stores `k` and `v` at `positions`, then each query attends causally to
/// the cache; the (token, head) pairs are split over the workers.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    pool: &Pool,
    a: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    positions: &[i32],
    kv: &mut KvCache,
    out: &mut [f32],
) -> Result<(), EvalError> {
    let d = a.head_dim;
    let kv_row = a.kv_heads * d;
    kv.store(a.layer, kv_row, positions, k, v)?;
    let (keys, values) = kv.layer_rows(a.layer);
    let scale = 1.0 / (d as f32).sqrt();
    let group = a.heads / a.kv_heads;
    let pairs = positions.len() * a.heads;
    let dst = SharedMut(out.as_mut_ptr());
    let isa = super::Isa::best();
    pool.run(&|me, workers| {
        let mut scores = Vec::new();
        for pair in share(pairs, me, workers) {
            let (i, h) = (pair / a.heads, pair % a.heads);
            let n_keys = positions[i] as usize + 1;
            let kvh = h / group;
            let qh = &q[(i * a.heads + h) * d..][..d];
            scores.clear();
            scores.extend((0..n_keys).map(|t| float::dot(isa, qh, &keys[t * kv_row + kvh * d..][..d]) * scale));
            kernels::softmax(&mut scores);
            // SAFETY: each (token, head) pair's output belongs to one worker.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.ptr().add((i * a.heads + h) * d), d) };
            o.fill(0.0);
            for (t, &w) in scores.iter().enumerate() {
                let vt = &values[t * kv_row + kvh * d..][..d];
                for (oj, &vj) in o.iter_mut().zip(vt) {
                    *oj += w * vj;
                }
            }
        }
    });
    Ok(())
}
