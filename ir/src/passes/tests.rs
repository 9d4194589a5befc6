use super::*;
use crate::interp::{Interpreter, KvCache, Tensor};
use crate::{quant, ActQuant, BinaryOp, DType, Dim, Epilogue, GateAct, RopeMode, TensorType, UnaryOp};
use std::collections::HashMap;

type Weights = HashMap<String, (DType, Vec<usize>, Vec<u8>)>;

fn pseudo(seed: u32, n: usize) -> Vec<f32> {
    (0..n).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed * 97) >> 8) % 1000) as f32 / 500.0 - 1.0).collect()
}

/// One BitNet block as the frontend writes it, over `k` hidden units.
fn block(k: usize, ffn: usize) -> (Graph, Weights) {
    let mut g = Graph::new("block");
    let mut w = Weights::new();
    fn weight(g: &mut Graph, w: &mut Weights, name: &str, dtype: DType, shape: &[usize]) -> Value {
        let n: usize = shape.iter().product();
        let mut v = pseudo(name.len() as u32 + shape[0] as u32, n);
        if dtype.is_ternary() {
            v.iter_mut().for_each(|x| *x = x.round() * 0.5);
        }
        w.insert(name.into(), (dtype, shape.to_vec(), quant::quantize(dtype, &v)));
        g.leaf(Op::Weight { name: name.into() }, TensorType::fixed(dtype, shape))
    }
    let x = g.leaf(Op::Input { name: "x".into() }, TensorType::new(DType::F32, [Dim::Seq, Dim::Const(k)]));
    let positions = g.leaf(Op::Input { name: "positions".into() }, TensorType::new(DType::I32, [Dim::Seq]));
    let norm = weight(&mut g, &mut w, "norm", DType::F32, &[k]);
    let a = g.add(Op::RmsNorm { eps: 1e-5 }, &[x, norm]).unwrap();
    let aq = g.add(Op::QuantizeAct { scheme: ActQuant::PerToken }, &[a]).unwrap();
    let proj = |g: &mut Graph, w: &mut Weights, name: &str, xq: Value, n: usize, kk: usize, scaled: bool| {
        let wv = weight(g, w, name, DType::TQ2_0, &[n, kk]);
        let y = g.add(Op::TernaryMatMul(Epilogue::NONE), &[xq, wv]).unwrap();
        if !scaled {
            return y;
        }
        let s = weight(g, w, &format!("{name}.scale"), DType::F32, &[1]);
        g.add(Op::Binary(BinaryOp::Mul), &[y, s]).unwrap()
    };
    let q = proj(&mut g, &mut w, "q", aq, k, k, true);
    let kk = proj(&mut g, &mut w, "k", aq, k, k, false);
    let v = proj(&mut g, &mut w, "v", aq, k, k, true);
    let q = g.add(Op::Rope { mode: RopeMode::Neox, theta: 10000.0, head_dim: 64 }, &[q, positions]).unwrap();
    let kk = g.add(Op::Rope { mode: RopeMode::Neox, theta: 10000.0, head_dim: 64 }, &[kk, positions]).unwrap();
    let o = g.add(Op::Attention { layer: 0, heads: k / 64, kv_heads: k / 64, head_dim: 64 }, &[q, kk, v, positions]).unwrap();
    let oq = g.add(Op::QuantizeAct { scheme: ActQuant::PerToken }, &[o]).unwrap();
    let o = proj(&mut g, &mut w, "o", oq, k, k, true);
    let h = g.add(Op::Binary(BinaryOp::Add), &[x, o]).unwrap();
    let norm2 = weight(&mut g, &mut w, "norm", DType::F32, &[k]); // read twice: merged
    let f = g.add(Op::RmsNorm { eps: 1e-5 }, &[h, norm2]).unwrap();
    let fq = g.add(Op::QuantizeAct { scheme: ActQuant::PerToken }, &[f]).unwrap();
    let gate = proj(&mut g, &mut w, "gate", fq, ffn, k, false);
    let up = proj(&mut g, &mut w, "up", fq, ffn, k, false);
    let r = g.add(Op::Unary(UnaryOp::Relu), &[gate]).unwrap();
    let r2 = g.add(Op::Unary(UnaryOp::Square), &[r]).unwrap();
    let m = g.add(Op::Binary(BinaryOp::Mul), &[up, r2]).unwrap();
    let _dead = g.add(Op::Unary(UnaryOp::Exp), &[m]).unwrap();
    let mq = g.add(Op::QuantizeAct { scheme: ActQuant::PerToken }, &[m]).unwrap();
    let down = proj(&mut g, &mut w, "down", mq, k, ffn, false);
    let y = g.add(Op::Binary(BinaryOp::Add), &[down, h]).unwrap();
    g.outputs.push(y);
    (g, w)
}

fn eval(g: &Graph, w: &Weights, s: usize, k: usize) -> Vec<f32> {
    let inputs = [("x", Tensor::f32(vec![s, k], pseudo(7, s * k))), ("positions", Tensor::ids((0..s as i32).collect()))];
    let mut out = Interpreter::new(w, 2).eval(g, &inputs, &mut KvCache::new()).unwrap();
    out.pop().unwrap().as_f32().unwrap().to_vec()
}

fn count(g: &Graph, f: impl Fn(&Op) -> bool) -> usize {
    g.nodes.iter().filter(|n| f(&n.op)).count()
}

#[test]
fn the_pipeline_fuses_a_bitnet_block_and_keeps_its_results_bit_for_bit() {
    let (g, w) = block(256, 512);
    let opt = optimize(g.clone(), None).unwrap();
    assert_eq!(count(&opt, |o| matches!(o, Op::RmsNorm { .. } | Op::QuantizeAct { .. })), 2, "{opt}"); // no norm before these two
    assert_eq!(count(&opt, |o| matches!(o, Op::RmsNormQuant { .. })), 2, "{opt}");
    assert_eq!(count(&opt, |o| *o == Op::TernaryGlu { act: GateAct::Relu2, epilogue: Epilogue::NONE }), 1, "{opt}");
    assert_eq!(count(&opt, |o| matches!(o, Op::Glu { .. })), 0, "{opt}");
    assert_eq!(count(&opt, |o| matches!(o, Op::Binary(_) | Op::Unary(_))), 0, "{opt}");
    assert_eq!(count(&opt, |o| *o == Op::TernaryMatMul(Epilogue { scale: true, residual: true })), 1, "{opt}");
    assert_eq!(count(&opt, |o| *o == Op::TernaryMatMul(Epilogue { scale: false, residual: true })), 1, "{opt}");
    assert_eq!(count(&opt, |o| matches!(o, Op::Weight { name } if name == "norm")), 1, "{opt}");
    for s in [1, 3] {
        assert_eq!(eval(&g, &w, s, 256), eval(&opt, &w, s, 256), "seq {s}");
    }
    // The optimized graph prints and parses back.
    assert_eq!(crate::parse(&opt.to_string()).unwrap(), opt);
}

#[test]
fn stopping_after_a_pass_leaves_the_later_ones_undone() {
    let (g, _) = block(128, 128);
    let canon = optimize(g.clone(), Some("canonicalize")).unwrap();
    assert_eq!(count(&canon, |o| matches!(o, Op::RmsNormQuant { .. } | Op::Glu { .. })), 0);
    assert_eq!(count(&canon, |o| *o == Op::Unary(UnaryOp::Exp)), 0, "dead node kept");
    let spec = optimize(g.clone(), Some("specialize-ternary")).unwrap();
    assert_eq!(count(&spec, |o| matches!(o, Op::TernaryMatMul(e) if e.scale)), 3);
    assert_eq!(count(&spec, |o| matches!(o, Op::Glu { .. })), 0);
    let err = optimize(g, Some("fusion")).unwrap_err().to_string();
    assert!(err.contains("canonicalize, specialize-ternary, fuse, fuse-projections"), "{err}");
}

#[test]
fn a_shared_producer_is_not_fused() {
    let mut g = Graph::new("t");
    let x = g.leaf(Op::Input { name: "x".into() }, TensorType::new(DType::F32, [Dim::Seq, Dim::Const(8)]));
    let s = g.add(Op::Unary(UnaryOp::Silu), &[x]).unwrap();
    let m = g.add(Op::Binary(BinaryOp::Mul), &[s, x]).unwrap();
    let both = g.add(Op::Binary(BinaryOp::Add), &[m, s]).unwrap();
    g.outputs.push(both);
    let opt = optimize(g.clone(), None).unwrap();
    assert_eq!(opt, g);
}

/// Gate and up products become one `ternary_glu` only when they read the
/// same activation with the same epilogue; either way the results keep
/// every bit.
#[test]
fn gate_and_up_merge_only_when_they_match() {
    let (k, n) = (256, 96);
    for (gate_scaled, up_scaled, same_x) in [(true, true, true), (false, false, true), (true, false, true), (false, false, false)] {
        let mut g = Graph::new("t");
        let mut w = Weights::new();
        let x = g.leaf(Op::Input { name: "x".into() }, TensorType::new(DType::F32, [Dim::Seq, Dim::Const(k)]));
        let xq = g.add(Op::QuantizeAct { scheme: ActQuant::PerToken }, &[x]).unwrap();
        let xq2 = if same_x {
            xq
        } else {
            let x2 = g.leaf(Op::Input { name: "x2".into() }, TensorType::new(DType::F32, [Dim::Seq, Dim::Const(k)]));
            g.add(Op::QuantizeAct { scheme: ActQuant::PerToken }, &[x2]).unwrap()
        };
        let mut proj = |g: &mut Graph, name: &str, xq: Value, scaled: bool| {
            let v: Vec<f32> = pseudo(name.len() as u32, n * k).iter().map(|x| x.round() * 0.25).collect();
            w.insert(name.into(), (DType::TQ2_0, vec![n, k], quant::quantize(DType::TQ2_0, &v)));
            let wv = g.leaf(Op::Weight { name: name.into() }, TensorType::fixed(DType::TQ2_0, &[n, k]));
            let y = g.add(Op::TernaryMatMul(Epilogue::NONE), &[xq, wv]).unwrap();
            if !scaled {
                return y;
            }
            w.insert(format!("{name}.s"), (DType::F32, vec![1], quant::quantize(DType::F32, &[0.75 + name.len() as f32])));
            let s = g.leaf(Op::Weight { name: format!("{name}.s") }, TensorType::fixed(DType::F32, &[1]));
            g.add(Op::Binary(BinaryOp::Mul), &[y, s]).unwrap()
        };
        let gate = proj(&mut g, "gate", xq, gate_scaled);
        let up = proj(&mut g, "up", xq2, up_scaled);
        let a = g.add(Op::Unary(UnaryOp::Silu), &[gate]).unwrap();
        let y = g.add(Op::Binary(BinaryOp::Mul), &[a, up]).unwrap();
        g.outputs.push(y);
        let opt = optimize(g.clone(), None).unwrap();
        let merged = count(&opt, |o| matches!(o, Op::TernaryGlu { act: GateAct::Silu, epilogue } if epilogue.scale == gate_scaled));
        assert_eq!(merged, (gate_scaled == up_scaled && same_x) as usize, "{opt}");
        let inputs = [("x", Tensor::f32(vec![3, k], pseudo(5, 3 * k))), ("x2", Tensor::f32(vec![3, k], pseudo(6, 3 * k)))];
        let run = |g: &Graph| Interpreter::new(&w, 1).eval(g, &inputs, &mut KvCache::new()).unwrap().pop().unwrap().as_f32().unwrap().to_vec();
        assert_eq!(run(&g), run(&opt));
        assert_eq!(crate::parse(&opt.to_string()).unwrap(), opt);
    }
}

/// Products of one activation with one epilogue (q, k and v) become one
/// `ternary_cat` read back through slices, every bit kept; a product read
/// before the last of them stays alone.
#[test]
fn projections_of_one_activation_are_put_side_by_side() {
    let k = 256;
    for read_early in [false, true] {
        let mut g = Graph::new("t");
        let mut w = Weights::new();
        let x = g.leaf(Op::Input { name: "x".into() }, TensorType::new(DType::F32, [Dim::Seq, Dim::Const(k)]));
        let xq = g.add(Op::QuantizeAct { scheme: ActQuant::PerToken }, &[x]).unwrap();
        let mut outputs = Vec::new();
        for (i, n) in [96usize, 32, 36].into_iter().enumerate() {
            let name = format!("p{i}");
            let v: Vec<f32> = pseudo(i as u32 + 3, n * k).iter().map(|x| x.round() * 0.25).collect();
            w.insert(name.clone(), (DType::TQ2_0, vec![n, k], quant::quantize(DType::TQ2_0, &v)));
            w.insert(format!("{name}.s"), (DType::F32, vec![1], quant::quantize(DType::F32, &[0.5 + i as f32])));
            let wv = g.leaf(Op::Weight { name: name.clone() }, TensorType::fixed(DType::TQ2_0, &[n, k]));
            let s = g.leaf(Op::Weight { name: format!("{name}.s") }, TensorType::fixed(DType::F32, &[1]));
            let y = g.add(Op::TernaryMatMul(Epilogue::NONE), &[xq, wv]).unwrap();
            let y = g.add(Op::Binary(BinaryOp::Mul), &[y, s]).unwrap();
            outputs.push(if read_early && i == 0 { g.add(Op::Unary(UnaryOp::Neg), &[y]).unwrap() } else { y });
        }
        g.outputs = outputs;
        let opt = optimize(g.clone(), None).unwrap();
        let parts = if read_early { 2 } else { 3 };
        let cat = Op::TernaryCat { parts, epilogue: Epilogue { scale: true, residual: false } };
        assert_eq!(count(&opt, |o| *o == cat), 1, "{opt}");
        assert_eq!(count(&opt, |o| matches!(o, Op::Slice { .. })), parts, "{opt}");
        assert_eq!(count(&opt, |o| matches!(o, Op::TernaryMatMul(_))), 3 - parts, "{opt}");
        let inputs = [("x", Tensor::f32(vec![3, k], pseudo(5, 3 * k)))];
        let run = |g: &Graph| -> Vec<Vec<f32>> {
            let out = Interpreter::new(&w, 1).eval(g, &inputs, &mut KvCache::new()).unwrap();
            out.iter().map(|t| t.as_f32().unwrap().to_vec()).collect()
        };
        assert_eq!(run(&g), run(&opt));
        assert_eq!(crate::parse(&opt.to_string()).unwrap(), opt);
    }
}
