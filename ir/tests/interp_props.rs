//! Property tests: each interpreter op against its formula, written again
//! here directly (in f64 where that is simpler), on random shapes.

use bitnet_ir::interp::{Interpreter, KvCache, Tensor};
use bitnet_ir::{quant, ActQuant, BinaryOp, DType, Dim, Epilogue, Graph, Op, RopeMode, TensorType, UnaryOp, Value};
use proptest::prelude::*;
use std::collections::HashMap;

type Weights = HashMap<String, (DType, Vec<usize>, Vec<u8>)>;

fn weight(g: &mut Graph, w: &mut Weights, name: &str, dtype: DType, shape: &[usize], values: &[f32]) -> Value {
    w.insert(name.into(), (dtype, shape.to_vec(), quant::quantize(dtype, values)));
    g.leaf(Op::Weight { name: name.into() }, TensorType::fixed(dtype, shape))
}

fn input(g: &mut Graph, name: &str, dtype: DType, cols: Option<usize>) -> Value {
    let shape = match cols {
        Some(c) => vec![Dim::Seq, Dim::Const(c)],
        None => vec![Dim::Seq],
    };
    g.leaf(Op::Input { name: name.into() }, TensorType::new(dtype, shape))
}

fn run(g: &Graph, w: &Weights, inputs: &[(&str, Tensor)]) -> Vec<f32> {
    let mut out = Interpreter::new(w, 2).eval(g, inputs, &mut KvCache::new()).unwrap();
    out.pop().unwrap().as_f32().unwrap().to_vec()
}

fn matrix(rows: usize, cols: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-4.0f32..4.0, rows * cols)
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn rms_norm_matches_formula((s, n, x, w) in (1usize..5, 1usize..70).prop_flat_map(|(s, n)| (Just(s), Just(n), matrix(s, n), matrix(1, n)))) {
        let mut g = Graph::new("t");
        let mut ws = Weights::new();
        let xi = input(&mut g, "x", DType::F32, Some(n));
        let wv = weight(&mut g, &mut ws, "w", DType::F32, &[n], &w);
        let y = g.add(Op::RmsNorm { eps: 1e-5 }, &[xi, wv]).unwrap();
        g.outputs.push(y);
        let got = run(&g, &ws, &[("x", Tensor::f32(vec![s, n], x.clone()))]);
        for r in 0..s {
            let row = &x[r * n..(r + 1) * n];
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64;
            for i in 0..n {
                let want = row[i] as f64 / (ms + 1e-5).sqrt() * w[i] as f64;
                prop_assert!(close(got[r * n + i] as f64, want, 1e-5), "{} vs {}", got[r * n + i], want);
            }
        }
    }

    #[test]
    fn ternary_matmul_is_the_integer_formula(
        (s, n, kb, x, codes, scale_bits) in (1usize..4, 1usize..6, 1usize..4).prop_flat_map(|(s, n, kb)| {
            (Just(s), Just(n), Just(kb), matrix(s, kb * 256), prop::collection::vec(-1i8..=1, n * kb * 256), 1u16..0x3c00)
        }),
        dtype in prop::sample::select(vec![DType::I2S, DType::TQ2_0, DType::TQ1_0]),
    ) {
        let k = kb * 256;
        let beta = half::f16::from_bits(scale_bits).to_f32();
        let values: Vec<f32> = codes.iter().map(|&c| c as f32 * beta).collect();
        let mut g = Graph::new("t");
        let mut ws = Weights::new();
        let xi = input(&mut g, "x", DType::F32, Some(k));
        let q = g.add(Op::QuantizeAct { scheme: ActQuant::PerToken }, &[xi]).unwrap();
        let wv = weight(&mut g, &mut ws, "w", dtype, &[n, k], &values);
        let y = g.add(Op::TernaryMatMul(Epilogue::NONE), &[q, wv]).unwrap();
        g.outputs.push(y);
        let got = run(&g, &ws, &[("x", Tensor::f32(vec![s, k], x.clone()))]);
        for r in 0..s {
            let row = &x[r * k..(r + 1) * k];
            let gamma = 127.0 / row.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-5);
            let xq: Vec<i64> = row.iter().map(|&v| (v * gamma).round().clamp(-128.0, 127.0) as i64).collect();
            for o in 0..n {
                let dot: i64 = codes[o * k..(o + 1) * k].iter().zip(&xq).map(|(&c, &v)| c as i64 * v).sum();
                let want = dot as f64 * beta as f64 / gamma as f64;
                prop_assert!(close(got[r * n + o] as f64, want, 1e-5), "{dtype}: {} vs {want}", got[r * n + o]);
            }
        }
    }

    #[test]
    fn matmul_matches_f64_dot(
        (s, n, k, x, w) in (1usize..4, 1usize..9, 1usize..90).prop_flat_map(|(s, n, k)| (Just(s), Just(n), Just(k), matrix(s, k), matrix(n, k))),
        dtype in prop::sample::select(vec![DType::F32, DType::F16, DType::BF16]),
        int8 in any::<bool>(),
    ) {
        let mut g = Graph::new("t");
        let mut ws = Weights::new();
        let xi = input(&mut g, "x", DType::F32, Some(k));
        let lhs = if int8 { g.add(Op::QuantizeAct { scheme: ActQuant::PerToken }, &[xi]).unwrap() } else { xi };
        let wv = weight(&mut g, &mut ws, "w", dtype, &[n, k], &w);
        let y = g.add(Op::MatMul, &[lhs, wv]).unwrap();
        g.outputs.push(y);
        let got = run(&g, &ws, &[("x", Tensor::f32(vec![s, k], x.clone()))]);
        // The stored weight is what the file holds: round it the same way.
        let mut stored = vec![0f32; n * k];
        quant::RowView { dtype, bytes: &quant::quantize(dtype, &w), tensor_scale: 1.0 }.dequantize(&mut stored);
        for r in 0..s {
            let row = &x[r * k..(r + 1) * k];
            let (lhs, div): (Vec<f64>, f64) = if int8 {
                let gamma = 127.0 / row.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-5);
                (row.iter().map(|&v| (v * gamma).round().clamp(-128.0, 127.0) as f64).collect(), gamma as f64)
            } else {
                (row.iter().map(|&v| v as f64).collect(), 1.0)
            };
            for o in 0..n {
                let wr = &stored[o * k..(o + 1) * k];
                let want = lhs.iter().zip(wr).map(|(a, &b)| a * b as f64).sum::<f64>() / div;
                let scale = lhs.iter().zip(wr).map(|(a, &b)| (a * b as f64).abs()).sum::<f64>() / div;
                prop_assert!((got[r * n + o] as f64 - want).abs() <= 1e-5 * (1.0 + scale), "{} vs {want}", got[r * n + o]);
            }
        }
    }

    #[test]
    fn q8k_ternary_matmul_is_llama_cpps_block_formula(
        (n, kb, x, codes) in (1usize..5, 1usize..4).prop_flat_map(|(n, kb)| (Just(n), Just(kb), matrix(2, kb * 256), prop::collection::vec(-1i8..=1, n * kb * 256))),
    ) {
        let k = kb * 256;
        let values: Vec<f32> = codes.iter().map(|&c| c as f32 * 0.5).collect();
        let mut g = Graph::new("t");
        let mut ws = Weights::new();
        let xi = input(&mut g, "x", DType::F32, Some(k));
        let q = g.add(Op::QuantizeAct { scheme: ActQuant::Q8K }, &[xi]).unwrap();
        let wv = weight(&mut g, &mut ws, "w", DType::TQ2_0, &[n, k], &values);
        let y = g.add(Op::TernaryMatMul(Epilogue::NONE), &[q, wv]).unwrap();
        g.outputs.push(y);
        let got = run(&g, &ws, &[("x", Tensor::f32(vec![2, k], x.clone()))]);
        for r in 0..2 {
            for o in 0..n {
                let mut want = 0f64;
                for b in 0..kb {
                    let xb = &x[r * k + b * 256..][..256];
                    let max = xb.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                    let iscale = -127.0 / max;
                    let sumi: i64 = xb.iter().zip(&codes[o * k + b * 256..][..256]).map(|(&v, &c)| ((iscale * v).round_ties_even().min(127.0) as i64) * c as i64).sum();
                    want += sumi as f64 * 0.5 / iscale as f64;
                }
                prop_assert!(close(got[r * n + o] as f64, want, 1e-5), "{} vs {want}", got[r * n + o]);
            }
        }
    }

    #[test]
    fn quantize_act_is_within_half_a_step(x in matrix(1, 300)) {
        let (q, gamma) = bitnet_ir::interp::kernels::quantize_act(&x, 300);
        let g = gamma[0];
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        if amax > 1e-5 {
            prop_assert_eq!(q.iter().map(|v| v.unsigned_abs()).max().unwrap(), 127);
        }
        for (qi, xi) in q.iter().zip(&x) {
            prop_assert!((*qi as f32 / g - xi).abs() <= 0.5 / g * 1.0001);
        }
    }

    #[test]
    fn rope_matches_the_rotation_formula(
        (heads, half_dim, x, pos) in (1usize..4, 1usize..9).prop_flat_map(|(h, d)| (Just(h), Just(d), matrix(3, h * 2 * d), prop::collection::vec(0i32..200, 3))),
        neox in any::<bool>(),
    ) {
        let d = 2 * half_dim;
        let mode = if neox { RopeMode::Neox } else { RopeMode::Interleaved };
        let mut y = x.clone();
        bitnet_ir::interp::kernels::rope(&mut y, heads * d, &pos, mode, 10000.0, d);
        for (r, &p) in pos.iter().enumerate() {
            for h in 0..heads {
                for i in 0..half_dim {
                    let (a, b) = if neox { (i, i + half_dim) } else { (2 * i, 2 * i + 1) };
                    let base = r * heads * d + h * d;
                    let angle = p as f64 * 10000f64.powf(-2.0 * i as f64 / d as f64);
                    let (x0, x1) = (x[base + a] as f64, x[base + b] as f64);
                    prop_assert!((y[base + a] as f64 - (x0 * angle.cos() - x1 * angle.sin())).abs() < 2e-3);
                    prop_assert!((y[base + b] as f64 - (x0 * angle.sin() + x1 * angle.cos())).abs() < 2e-3);
                }
            }
        }
    }

    #[test]
    fn attention_matches_softmax_formula_and_caches_incrementally(
        (s, kv, group, hd, q, k, v) in (1usize..6, 1usize..3, 1usize..3, 1usize..6).prop_flat_map(|(s, kv, group, hd)| {
            (Just(s), Just(kv), Just(group), Just(hd), matrix(s, kv * group * hd), matrix(s, kv * hd), matrix(s, kv * hd))
        }),
    ) {
        let heads = kv * group;
        let mut g = Graph::new("t");
        let qi = input(&mut g, "q", DType::F32, Some(heads * hd));
        let ki = input(&mut g, "k", DType::F32, Some(kv * hd));
        let vi = input(&mut g, "v", DType::F32, Some(kv * hd));
        let pi = input(&mut g, "positions", DType::I32, None);
        let y = g.add(Op::Attention { layer: 0, heads, kv_heads: kv, head_dim: hd }, &[qi, ki, vi, pi]).unwrap();
        g.outputs.push(y);
        let ws = Weights::new();
        let interp = Interpreter::new(&ws, 1);
        let rows = |m: &[f32], w: usize, a: usize, b: usize| Tensor::f32(vec![b - a, w], m[a * w..b * w].to_vec());
        let all = |a: usize, b: usize, cache: &mut KvCache| {
            let inputs = [("q", rows(&q, heads * hd, a, b)), ("k", rows(&k, kv * hd, a, b)), ("v", rows(&v, kv * hd, a, b)), ("positions", Tensor::ids((a as i32..b as i32).collect()))];
            interp.eval(&g, &inputs, cache).unwrap().pop().unwrap().as_f32().unwrap().to_vec()
        };
        let at_once = all(0, s, &mut KvCache::new());
        let mut cache = KvCache::new();
        let stepwise: Vec<f32> = (0..s).flat_map(|i| all(i, i + 1, &mut cache)).collect();
        prop_assert_eq!(&at_once, &stepwise);
        for i in 0..s {
            for h in 0..heads {
                let kh = h / group;
                let qv = &q[i * heads * hd + h * hd..][..hd];
                let scores: Vec<f64> = (0..=i).map(|j| qv.iter().zip(&k[j * kv * hd + kh * hd..][..hd]).map(|(a, b)| (*a * *b) as f64).sum::<f64>() / (hd as f64).sqrt()).collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for dd in 0..hd {
                    let want: f64 = (0..=i).map(|j| (scores[j] - m).exp() / z * v[j * kv * hd + kh * hd + dd] as f64).sum();
                    prop_assert!((at_once[i * heads * hd + h * hd + dd] as f64 - want).abs() < 1e-4);
                }
            }
        }
    }

    #[test]
    fn elementwise_ops_and_softmax((s, n, a, b) in (1usize..4, 1usize..40).prop_flat_map(|(s, n)| (Just(s), Just(n), matrix(s, n), matrix(1, n)))) {
        for u in UnaryOp::ALL {
            for (x, y) in a.iter().map(|&x| (x, bitnet_ir::interp::kernels::unary(u, x))) {
                let x = x as f64;
                let want = match u {
                    UnaryOp::Silu => x / (1.0 + (-x).exp()),
                    UnaryOp::Relu => x.max(0.0),
                    UnaryOp::Square => x * x,
                    UnaryOp::Exp => x.exp(),
                    UnaryOp::Neg => -x,
                };
                prop_assert!(close(y as f64, want, 1e-5), "{u:?}({x}) = {y}, want {want}");
            }
        }
        // A row operand broadcasts over every row.
        let mut g = Graph::new("t");
        let mut ws = Weights::new();
        let xi = input(&mut g, "x", DType::F32, Some(n));
        let bw = weight(&mut g, &mut ws, "b", DType::F32, &[n], &b);
        let y = g.add(Op::Binary(BinaryOp::Sub), &[xi, bw]).unwrap();
        let sm = g.add(Op::Softmax, &[y]).unwrap();
        g.outputs.push(sm);
        let got = run(&g, &ws, &[("x", Tensor::f32(vec![s, n], a.clone()))]);
        for r in 0..s {
            let row: Vec<f64> = (0..n).map(|i| (a[r * n + i] - b[i]) as f64).collect();
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
            for i in 0..n {
                prop_assert!((got[r * n + i] as f64 - (row[i] - m).exp() / z).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn embed_returns_dequantized_rows(ids in prop::collection::vec(0i32..40, 1..6), dtype in prop::sample::select(vec![DType::F16, DType::Q8_0, DType::Q6K, DType::Q4K])) {
        let vals: Vec<f32> = (0..40 * 256).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        let mut g = Graph::new("t");
        let mut ws = Weights::new();
        let table = weight(&mut g, &mut ws, "e", dtype, &[40, 256], &vals);
        let ti = input(&mut g, "tokens", DType::I32, None);
        let y = g.add(Op::Embed, &[table, ti]).unwrap();
        g.outputs.push(y);
        let got = run(&g, &ws, &[("tokens", Tensor::ids(ids.clone()))]);
        let bytes = &ws["e"].2;
        let row_bytes = bytes.len() / 40;
        for (r, &id) in ids.iter().enumerate() {
            let mut want = vec![0f32; 256];
            quant::RowView { dtype, bytes: &bytes[id as usize * row_bytes..][..row_bytes], tensor_scale: 1.0 }.dequantize(&mut want);
            prop_assert_eq!(&got[r * 256..(r + 1) * 256], &want[..]);
        }
    }
}
