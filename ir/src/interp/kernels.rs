//! The meaning of each op, one plain function per op.

pub use super::math::exp;
use super::{eval_err, EvalError, KvElem, KvHead, KvStore, KvView, Slot, Tensor, WeightView};
use crate::{ActQuant, BinaryOp, GateAct, Op, RopeMode, UnaryOp};

pub(super) fn run(op: &Op, args: &[&Slot], kv: &mut dyn KvStore, threads: usize) -> Result<Tensor, EvalError> {
    match op {
        Op::Input { .. } | Op::Weight { .. } => unreachable!("leaves are bound by the interpreter"),
        Op::Embed => embed(weight(args[0])?, ids(args[1])?),
        Op::RmsNorm { eps } => {
            let (shape, x) = f32s(args[0])?;
            Ok(Tensor::f32(shape.to_vec(), rms_norm(x, &floats(args[1])?, *eps)))
        }
        Op::QuantizeAct { scheme } => {
            let (shape, x) = f32s(args[0])?;
            Ok(quantize(shape, x, *scheme))
        }
        Op::RmsNormQuant { eps, scheme } => {
            let (shape, x) = f32s(args[0])?;
            Ok(quantize(shape, &rms_norm(x, &floats(args[1])?, *eps), *scheme))
        }
        Op::MatMul => matmul(args[0], weight(args[1])?, threads),
        Op::TernaryMatMul(e) => {
            let mut y = ternary_matmul(args[0], weight(args[1])?, threads)?;
            let Tensor::F32 { data, .. } = &mut y else { unreachable!() };
            let mut extra = args[2..].iter();
            if e.scale {
                let s = floats(extra.next().unwrap())?[0];
                data.iter_mut().for_each(|v| *v = binary(BinaryOp::Mul, *v, s));
            }
            if e.residual {
                let (_, r) = f32s(extra.next().unwrap())?;
                data.iter_mut().zip(r).for_each(|(v, &r)| *v = binary(BinaryOp::Add, r, *v));
            }
            Ok(y)
        }
        Op::TernaryGlu { act, epilogue } => {
            // Exactly the two products it replaces, then the gated unit.
            let (gate, up) = epilogue.glu_products(args);
            let gate = run(&Op::TernaryMatMul(*epilogue), &gate, kv, threads)?;
            let up = run(&Op::TernaryMatMul(*epilogue), &up, kv, threads)?;
            run(&Op::Glu { act: *act }, &[&Slot::Tensor(gate), &Slot::Tensor(up)], kv, threads)
        }
        Op::TernaryCat { epilogue, .. } => {
            // Exactly the products it replaces, side by side.
            let mut parts = Vec::new();
            for part in epilogue.cat_products(args) {
                let Tensor::F32 { shape, data } = run(&Op::TernaryMatMul(*epilogue), &part, kv, threads)? else { unreachable!() };
                parts.push((shape[1], data));
            }
            let (s, n) = (parts[0].1.len() / parts[0].0.max(1), parts.iter().map(|p| p.0).sum::<usize>());
            let mut y = Vec::with_capacity(s * n);
            for t in 0..s {
                for (w, data) in &parts {
                    y.extend_from_slice(&data[t * w..(t + 1) * w]);
                }
            }
            Ok(Tensor::f32(vec![s, n], y))
        }
        Op::Slice { start, len } => {
            let (shape, x) = f32s(args[0])?;
            Ok(Tensor::f32(vec![shape[0], *len], x.chunks_exact(shape[1]).flat_map(|r| &r[*start..start + len]).copied().collect()))
        }
        Op::Glu { act } => {
            let (shape, gate) = f32s(args[0])?;
            let (_, up) = f32s(args[1])?;
            Ok(Tensor::f32(shape.to_vec(), gate.iter().zip(up).map(|(&g, &u)| glu(*act, g, u)).collect()))
        }
        Op::Rope { mode, theta, head_dim } => {
            let (shape, x) = f32s(args[0])?;
            let mut y = x.to_vec();
            rope(&mut y, shape[1], ids(args[1])?, *mode, *theta, *head_dim);
            Ok(Tensor::f32(shape.to_vec(), y))
        }
        Op::Attention { layer, heads, kv_heads, head_dim } => {
            let (shape, q) = f32s(args[0])?;
            let (_, k) = f32s(args[1])?;
            let (_, v) = f32s(args[2])?;
            let y = attention(q, k, v, ids(args[3])?, kv, *layer, *heads, *kv_heads, *head_dim)?;
            Ok(Tensor::f32(shape.to_vec(), y))
        }
        Op::Unary(u) => {
            let (shape, x) = f32s(args[0])?;
            Ok(Tensor::f32(shape.to_vec(), x.iter().map(|&x| unary(*u, x)).collect()))
        }
        Op::Binary(b) => {
            let (shape, a) = f32s(args[0])?;
            let rhs = floats(args[1])?;
            let y = a.iter().enumerate().map(|(i, &x)| binary(*b, x, rhs[i % rhs.len()])).collect();
            Ok(Tensor::f32(shape.to_vec(), y))
        }
        Op::Softmax => {
            let (shape, x) = f32s(args[0])?;
            let mut y = x.to_vec();
            for row in y.chunks_exact_mut(*shape.last().unwrap()) {
                softmax(row);
            }
            Ok(Tensor::f32(shape.to_vec(), y))
        }
        Op::LastRow => {
            let (shape, x) = f32s(args[0])?;
            if shape[0] == 0 {
                return eval_err("last_row of an empty tensor");
            }
            Ok(Tensor::f32(vec![1, shape[1]], x[(shape[0] - 1) * shape[1]..].to_vec()))
        }
        Op::SelectRows => {
            let (shape, x) = f32s(args[0])?;
            let Slot::Tensor(Tensor::I32 { data: rows, .. }) = args[1] else { return eval_err("select_rows indices must be i32") };
            let mut y = Vec::with_capacity(rows.len() * shape[1]);
            for &r in rows {
                if r < 0 || r as usize >= shape[0] {
                    return eval_err(format!("select_rows: row {r} of {}", shape[0]));
                }
                y.extend_from_slice(&x[r as usize * shape[1]..][..shape[1]]);
            }
            Ok(Tensor::f32(vec![rows.len(), shape[1]], y))
        }
        Op::Cast { to } => {
            let (shape, x) = f32s(args[0])?;
            let y = match to {
                crate::DType::F16 => x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
                crate::DType::BF16 => x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect(),
                _ => x.to_vec(),
            };
            Ok(Tensor::f32(shape.to_vec(), y))
        }
    }
}

fn quantize(shape: &[usize], x: &[f32], scheme: ActQuant) -> Tensor {
    let (q, gamma, block) = match scheme {
        ActQuant::PerToken => {
            let (q, g) = quantize_act(x, shape[1]);
            (q, g, shape[1])
        }
        ActQuant::Q8K => {
            let (q, g) = quantize_q8k(x);
            (q, g, 256)
        }
    };
    Tensor::Q8Row { shape: shape.to_vec(), q, gamma, block }
}

fn weight<'a, 'w>(s: &'a Slot<'w>) -> Result<&'a WeightView<'w>, EvalError> {
    match s {
        Slot::Weight(w) => Ok(w),
        _ => eval_err("operand must be a stored weight"),
    }
}

fn f32s<'a>(s: &'a Slot) -> Result<(&'a [usize], &'a [f32]), EvalError> {
    match s {
        Slot::Tensor(Tensor::F32 { shape, data }) => Ok((shape, data)),
        _ => eval_err("operand must be an f32 tensor"),
    }
}

/// A float operand that may be either computed or stored.
fn floats(s: &Slot) -> Result<Vec<f32>, EvalError> {
    match s {
        Slot::Weight(w) => Ok(w.to_f32()),
        other => f32s(other).map(|(_, d)| d.to_vec()),
    }
}

fn ids<'a>(s: &'a Slot) -> Result<&'a [i32], EvalError> {
    match s {
        Slot::Tensor(Tensor::I32 { data, .. }) => Ok(data),
        _ => eval_err("operand must be an i32 tensor"),
    }
}

fn embed(table: &WeightView, ids: &[i32]) -> Result<Tensor, EvalError> {
    let h = table.row_len();
    let mut out = vec![0f32; ids.len() * h];
    for (o, &id) in out.chunks_exact_mut(h).zip(ids) {
        if id < 0 || id as usize >= table.rows() {
            return eval_err(format!("token id {id} is outside the vocabulary of {}", table.rows()));
        }
        table.row(id as usize).dequantize(o);
    }
    Ok(Tensor::f32(vec![ids.len(), h], out))
}

/// `x / sqrt(mean(x²) + eps) * w`, per row.
/// `Σ x²` in f64 (each square exact), in eight interleaved partial sums
/// (element i into sum i mod 8, in order), then those eight in order: an
/// order that vector code follows exactly, where one running sum would
/// wait on each addition in turn.
#[inline(always)]
pub fn sum_squares(x: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += (v as f64) * (v as f64);
        }
    }
    for (l, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *l += (v as f64) * (v as f64);
    }
    lanes.iter().fold(0.0, |s, &l| s + l)
}

/// `1 / sqrt(mean(x²) + eps)`, RMSNorm's scale for one row.
#[inline(always)]
pub fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let mean_sq = sum_squares(x) / x.len() as f64;
    1.0 / ((mean_sq as f32) + eps).sqrt()
}

pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    let mut y = vec![0f32; x.len()];
    for (yr, xr) in y.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
        let scale = inv_rms(xr, eps);
        for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
            *o = v * scale * g;
        }
    }
    y
}

/// BitNet's activation quantization, per row of `k`: γ = 127 / max|x|
/// (max|x| clamped to at least 1e-5), q = clamp(round(γx), -128, 127).
pub fn quantize_act(x: &[f32], k: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; x.len()];
    let mut gamma = Vec::with_capacity(x.len() / k.max(1));
    for (qr, xr) in q.chunks_exact_mut(k).zip(x.chunks_exact(k)) {
        let amax = xr.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-5);
        let g = 127.0 / amax;
        for (o, &v) in qr.iter_mut().zip(xr) {
            *o = (v * g).round().clamp(-128.0, 127.0) as i8;
        }
        gamma.push(g);
    }
    (q, gamma)
}

/// llama.cpp's `Q8_K` activation quantization, per block of 256: the
/// signed value of largest magnitude maps to -127; γ = -127 / that value;
/// q = min(127, round_half_even(γx)). An all-zero block has γ = ∞ (x = q/γ = 0).
pub fn quantize_q8k(x: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; x.len()];
    let mut gamma = Vec::with_capacity(x.len() / 256);
    for (qb, xb) in q.chunks_exact_mut(256).zip(x.chunks_exact(256)) {
        let mut max = 0f32;
        for &v in xb {
            if v.abs() > max.abs() {
                max = v;
            }
        }
        if max == 0.0 {
            gamma.push(f32::INFINITY);
            continue;
        }
        let g = -127.0 / max;
        for (o, &v) in qb.iter_mut().zip(xb) {
            *o = (g * v).round_ties_even().min(127.0) as i8;
        }
        gamma.push(g);
    }
    (q, gamma)
}

/// Runs `f(n, out_column)` for every output column `n` of an `[s, n]`
/// result, splitting the columns over threads. Each column is computed the
/// same way whatever the split, so results do not depend on `threads`.
fn by_columns(s: usize, n: usize, threads: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut cols = vec![0f32; s * n]; // column-major [n, s]
    let per = n.div_ceil(threads.max(1)).max(1);
    let run = |c: usize, chunk: &mut [f32]| {
        for (j, col) in chunk.chunks_exact_mut(s.max(1)).enumerate() {
            f(c * per + j, col);
        }
    };
    if per >= n {
        // One thread's work: no thread is started (none can be on wasm32).
        run(0, &mut cols);
    } else {
        std::thread::scope(|scope| {
            for (c, chunk) in cols.chunks_mut(per * s.max(1)).enumerate() {
                let run = &run;
                scope.spawn(move || run(c, chunk));
            }
        });
    }
    let mut out = vec![0f32; s * n];
    for j in 0..n {
        for i in 0..s {
            out[i * n + j] = cols[j * s + i];
        }
    }
    out
}

/// `x · wᵀ` with the weight dequantized to f32, one row at a time. With
/// int8 activations the product is divided by each row's γ.
fn matmul(x: &Slot, w: &WeightView, threads: usize) -> Result<Tensor, EvalError> {
    let (k, n) = (w.row_len(), w.rows());
    // Float activations are one block per row with γ = 1.
    let (s, xf, gamma, block): (usize, Vec<f32>, Vec<f32>, usize) = match x {
        Slot::Tensor(Tensor::F32 { shape, data }) => (shape[0], data.clone(), vec![1.0; shape[0]], k.max(1)),
        Slot::Tensor(Tensor::Q8Row { shape, q, gamma, block }) => (shape[0], q.iter().map(|&v| v as f32).collect(), gamma.clone(), *block),
        _ => return eval_err("matmul activations must be f32 or q8_row"),
    };
    let blocks_per_row = k.div_ceil(block);
    let out = by_columns(s, n, threads, |j, col| {
        let mut wr = vec![0f32; k];
        w.row(j).dequantize(&mut wr);
        for (i, o) in col.iter_mut().enumerate() {
            let xr = &xf[i * k..(i + 1) * k];
            let g = &gamma[i * blocks_per_row..(i + 1) * blocks_per_row];
            *o = if blocks_per_row == 1 {
                xr.iter().zip(&wr).map(|(a, b)| a * b).sum::<f32>() / g[0]
            } else {
                xr.chunks(block).zip(wr.chunks(block)).zip(g).map(|((xb, wb), gb)| xb.iter().zip(wb).map(|(a, b)| a * b).sum::<f32>() / gb).sum()
            };
        }
    });
    Ok(Tensor::f32(vec![s, n], out))
}

/// Integer dot products of ternary codes with int8 activations, over
/// chunks where both the weight scale and the activation scale are
/// constant, each times the weight scale and over the activation's γ.
/// With one γ per row (BitNet) the division happens once, at the end.
fn ternary_matmul(x: &Slot, w: &WeightView, threads: usize) -> Result<Tensor, EvalError> {
    let Slot::Tensor(Tensor::Q8Row { shape, q, gamma, block: act_block }) = x else {
        return eval_err("ternary_matmul activations must be q8_row");
    };
    let (s, k, n) = (shape[0], w.row_len(), w.rows());
    let act_blocks = k.div_ceil(*act_block);
    let out = by_columns(s, n, threads, |j, col| {
        let mut codes = vec![0i8; k];
        let mut scales = Vec::new();
        let w_block = w.row(j).ternary(&mut codes, &mut scales);
        let chunk = w_block.min(*act_block);
        for (i, o) in col.iter_mut().enumerate() {
            let xr = &q[i * k..(i + 1) * k];
            let g = &gamma[i * act_blocks..(i + 1) * act_blocks];
            let mut acc = 0f32;
            for (c, (cb, xb)) in codes.chunks(chunk).zip(xr.chunks(chunk)).enumerate() {
                let dot: i32 = cb.iter().zip(xb).map(|(&c, &v)| c as i32 * v as i32).sum();
                let d = scales[c * chunk / w_block];
                acc += if act_blocks == 1 { dot as f32 * d } else { dot as f32 * d / g[c * chunk / act_block] };
            }
            *o = if act_blocks == 1 { acc / g[0] } else { acc };
        }
    });
    Ok(Tensor::f32(vec![s, n], out))
}

/// Rotates each head's pairs by `position × θ^(-2i/d)`. The angle advances
/// by repeated multiplication, as ggml computes it.
pub fn rope(x: &mut [f32], row: usize, positions: &[i32], mode: RopeMode, theta: f32, d: usize) {
    let mut rotations = Vec::with_capacity(d / 2);
    for (r, &p) in x.chunks_exact_mut(row).zip(positions) {
        rope_rotations(p, theta, d, &mut rotations);
        for head in r.chunks_exact_mut(d) {
            for (i, &(sin, cos)) in rotations.iter().enumerate() {
                let (a, b) = match mode {
                    RopeMode::Interleaved => (2 * i, 2 * i + 1),
                    RopeMode::Neox => (i, i + d / 2),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    }
}

/// `(sin, cos)` of each pair's angle at position `p`: pair i turns by
/// p·θ^(−2i/d), the same in every head of the token.
pub fn rope_rotations(p: i32, theta: f32, d: usize, out: &mut Vec<(f32, f32)>) {
    let theta_scale = theta.powf(-2.0 / d as f32);
    out.clear();
    let mut angle = p as f32;
    for _ in 0..d / 2 {
        out.push(angle.sin_cos());
        angle *= theta_scale;
    }
}

pub fn softmax(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = exp(*v - max);
        sum += *v;
    }
    for v in row.iter_mut() {
        *v /= sum;
    }
}

#[allow(clippy::too_many_arguments)]
fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    positions: &[i32],
    kv: &mut dyn KvStore,
    layer: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
) -> Result<Vec<f32>, EvalError> {
    kv.store(layer, kv_heads, d, positions, k, v)?;
    let scale = 1.0 / (d as f32).sqrt();
    let group = heads / kv_heads;
    let mut out = vec![0f32; q.len()];
    for (i, &p) in positions.iter().enumerate() {
        let n_keys = p as usize + 1;
        for h in 0..heads {
            let o = &mut out[i * heads * d + h * d..][..d];
            let qh = &q[i * heads * d + h * d..][..d];
            match kv.head(layer, i, h / group) {
                head if head.held() < n_keys => return eval_err(format!("attention: position {p} is not in the cache")),
                KvView::F32(head) => attend(qh, &head, n_keys, scale, o),
                KvView::F16(head) => attend(qh, &head, n_keys, scale, o),
            }
        }
    }
    Ok(out)
}

/// One query head's attention over the first `n` positions of `head`,
/// added into `o` (zeros); each cached number is widened to f32 as read.
pub fn attend<E: KvElem>(q: &[f32], head: &KvHead<E>, n: usize, scale: f32, o: &mut [f32]) {
    let mut scores: Vec<f32> = (0..n).map(|t| q.iter().zip(head.key(t)).map(|(a, b)| a * b.to_f32()).sum::<f32>() * scale).collect();
    softmax(&mut scores);
    for (t, &w) in scores.iter().enumerate() {
        for (oj, vj) in o.iter_mut().zip(head.value(t)) {
            *oj += w * vj.to_f32();
        }
    }
}

pub fn unary(u: UnaryOp, x: f32) -> f32 {
    match u {
        UnaryOp::Silu => x / (1.0 + exp(-x)),
        UnaryOp::Relu => x.max(0.0),
        UnaryOp::Square => x * x,
        UnaryOp::Exp => exp(x),
        UnaryOp::Neg => -x,
    }
}

/// `act(gate) * up`, computed exactly as the unfused ops would.
pub fn glu(act: GateAct, gate: f32, up: f32) -> f32 {
    let a = match act {
        GateAct::Silu => unary(UnaryOp::Silu, gate),
        GateAct::Relu2 => unary(UnaryOp::Square, unary(UnaryOp::Relu, gate)),
    };
    a * up
}

pub fn binary(b: BinaryOp, x: f32, y: f32) -> f32 {
    match b {
        BinaryOp::Add => x + y,
        BinaryOp::Sub => x - y,
        BinaryOp::Mul => x * y,
        BinaryOp::Div => x / y,
    }
}
