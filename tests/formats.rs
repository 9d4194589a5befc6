//! The same synthetic ternary model written as I2_S, TQ2_0, TQ1_0 and f32
//! holds bit-identical ternary values and gives the same logits; and those
//! logits match a second, straightforward implementation of the BitNet
//! block written here from the generator's own codes, for both activations.

mod common;
use bitnet_frontends::arch::Activation;
use bitnet_frontends::model::Model;
use bitnet_frontends::synth::{ternary_weights, SynthSpec};
use bitnet_ir::interp::{Interpreter, KvCache, Tensor, WeightSource};
use bitnet_ir::DType;
use common::*;

const TOKENS: [u32; 7] = [256, 72, 101, 108, 108, 111, 33];

fn interp_logits(model: &Model) -> Vec<f32> {
    let g = model.graph(true).unwrap();
    let n = TOKENS.len();
    let inputs = [("tokens", Tensor::ids(TOKENS.iter().map(|&t| t as i32).collect())), ("positions", Tensor::ids((0..n as i32).collect()))];
    let mut out = Interpreter::new(model, 2).eval(&g, &inputs, &mut KvCache::new()).unwrap();
    out.pop().unwrap().as_f32().unwrap().to_vec()
}

fn f32_tensor(model: &Model, name: &str) -> Vec<f32> {
    let w = model.weight(name).unwrap();
    match w.dtype {
        DType::F32 => w.data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        DType::F16 => w.data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => panic!("{name}: unexpected {other}"),
    }
}

/// BitNet forward pass over the whole sequence at once, in f64 where it
/// is convenient, from the generator's codes and the file's float tensors.
fn reference_logits(spec: &SynthSpec, model: &Model) -> Vec<f32> {
    let s = &spec.shape;
    let (h, hd, n) = (s.hidden, s.hidden / s.heads, TOKENS.len());
    let kvd = s.kv_heads * hd;
    let rms = |x: &[f64], w: &[f32]| -> Vec<f64> {
        x.chunks(w.len())
            .flat_map(|r| {
                let ms = r.iter().map(|v| v * v).sum::<f64>() / r.len() as f64;
                let inv = 1.0 / (ms + 1e-5).sqrt();
                r.iter().zip(w).map(move |(v, g)| v * inv * *g as f64).collect::<Vec<_>>()
            })
            .collect()
    };
    // BitLinear: per-token absmax int8, ternary codes, rescale by β/γ.
    let bitlinear = |x: &[f64], name: &str, out_dim: usize, in_dim: usize| -> Vec<f64> {
        let (codes, beta) = ternary_weights(spec.seed, name, out_dim, in_dim);
        let mut y = Vec::with_capacity(n * out_dim);
        for row in x.chunks(in_dim) {
            let amax = row.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-5);
            let gamma = 127.0 / amax as f32;
            let q: Vec<i64> = row.iter().map(|&v| ((v as f32 * gamma).round().clamp(-128.0, 127.0)) as i64).collect();
            for o in 0..out_dim {
                let dot: i64 = codes[o * in_dim..(o + 1) * in_dim].iter().zip(&q).map(|(&c, &v)| c as i64 * v).sum();
                y.push(dot as f64 * beta as f64 / gamma as f64);
            }
        }
        y
    };
    let rope = |x: &mut [f64], width: usize| {
        for (p, row) in x.chunks_mut(width).enumerate() {
            for head in row.chunks_mut(hd) {
                for i in 0..hd / 2 {
                    let angle = p as f64 * (spec.rope_theta as f64).powf(-2.0 * i as f64 / hd as f64);
                    let (a, b) = (head[i], head[i + hd / 2]);
                    head[i] = a * angle.cos() - b * angle.sin();
                    head[i + hd / 2] = a * angle.sin() + b * angle.cos();
                }
            }
        }
    };
    let embd = f32_tensor(model, "token_embd.weight");
    let mut x: Vec<f64> = TOKENS.iter().flat_map(|&t| embd[t as usize * h..(t as usize + 1) * h].iter().map(|&v| v as f64)).collect();
    for l in 0..s.layers {
        let w = |n: &str| f32_tensor(model, &format!("blk.{l}.{n}.weight"));
        let p = |n: &str| format!("blk.{l}.{n}.weight");
        let a = rms(&x, &w("attn_norm"));
        let mut q = bitlinear(&a, &p("attn_q"), s.heads * hd, h);
        let mut k = bitlinear(&a, &p("attn_k"), kvd, h);
        let v = bitlinear(&a, &p("attn_v"), kvd, h);
        rope(&mut q, s.heads * hd);
        rope(&mut k, kvd);
        let mut o = vec![0f64; n * s.heads * hd];
        for i in 0..n {
            for head in 0..s.heads {
                let kh = head / (s.heads / s.kv_heads);
                let qv = &q[i * s.heads * hd + head * hd..][..hd];
                let scores: Vec<f64> =
                    (0..=i).map(|j| qv.iter().zip(&k[j * kvd + kh * hd..][..hd]).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()).collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for d in 0..hd {
                        o[i * s.heads * hd + head * hd + d] += ej / z * v[j * kvd + kh * hd + d];
                    }
                }
            }
        }
        let o = rms(&o, &w("attn_sub_norm"));
        let o = bitlinear(&o, &p("attn_output"), h, s.heads * hd);
        let hres: Vec<f64> = x.iter().zip(&o).map(|(a, b)| a + b).collect();
        let f = rms(&hres, &w("ffn_norm"));
        let g = bitlinear(&f, &p("ffn_gate"), s.ffn, h);
        let u = bitlinear(&f, &p("ffn_up"), s.ffn, h);
        let m: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| match spec.activation {
                Activation::Silu => g / (1.0 + (-g).exp()) * u,
                Activation::Relu2 => g.max(0.0).powi(2) * u,
            })
            .collect();
        let m = rms(&m, &w("ffn_sub_norm"));
        let d = bitlinear(&m, &p("ffn_down"), h, s.ffn);
        x = hres.iter().zip(&d).map(|(a, b)| a + b).collect();
    }
    let y = rms(&x, &f32_tensor(model, "output_norm.weight"));
    let mut logits = Vec::new();
    for row in y.chunks(h) {
        for t in 0..s.vocab {
            logits.push(row.iter().zip(&embd[t * h..(t + 1) * h]).map(|(a, &b)| a * b as f64).sum::<f64>() as f32);
        }
    }
    logits
}

fn codes_of(model: &Model, name: &str) -> (Vec<i8>, Vec<f32>) {
    let w = model.weight(name).unwrap();
    let (rows, k) = (w.rows(), w.row_len());
    let mut all = Vec::new();
    let mut scales = Vec::new();
    for r in 0..rows {
        let mut codes = vec![0i8; k];
        if w.dtype.is_ternary() {
            let mut s = Vec::new();
            let block = w.row(r).ternary(&mut codes, &mut s);
            for (i, c) in codes.iter().enumerate() {
                scales.push(if *c == 0 { 0.0 } else { s[i / block] });
            }
        } else {
            // Float files hold code × β: recover both exactly.
            let mut f = vec![0f32; k];
            w.row(r).dequantize(&mut f);
            for (c, v) in codes.iter_mut().zip(&f) {
                *c = if *v > 0.0 {
                    1
                } else if *v < 0.0 {
                    -1
                } else {
                    0
                };
                scales.push(v.abs());
            }
        }
        all.extend(codes);
    }
    (all, scales)
}

fn check_activation(act: Activation) {
    let dir = tmp_dir(&format!("formats-{}", act.name()));
    let mut results = Vec::new();
    for t in [DType::I2S, DType::TQ2_0, DType::TQ1_0, DType::F32] {
        let spec = small_spec(t, act);
        let path = dir.join(format!("m-{}.gguf", t.name()));
        write_synth(&spec, &path);
        let model = Model::open(&path).unwrap();
        assert_eq!(model.config.activation, act);
        results.push((t, spec, model));
    }
    let (_, spec0, m0) = &results[0];
    let reference = reference_logits(spec0, m0);
    let base = interp_logits(m0);
    for (t, spec, model) in &results {
        for name in ["blk.0.attn_q.weight", "blk.2.ffn_down.weight", "blk.1.attn_v.weight"] {
            assert_eq!(codes_of(model, name), codes_of(m0, name), "{t}: ternary values of {name} differ from I2_S's");
        }
        let logits = interp_logits(model);
        let (cos, diff) = (cosine(&logits, &base), max_abs_diff(&logits, &base));
        eprintln!(
            "{act:?} {t}: vs i2_s cosine {cos:.9}, max diff {diff:e}; vs reference min cosine {:.9}",
            logits.chunks(spec.shape.vocab).zip(reference.chunks(spec.shape.vocab)).map(|(a, b)| cosine(a, b)).fold(1.0, f64::min)
        );
        assert!(cos > 0.99999 && diff < 2e-3, "{t} vs i2_s: cosine {cos}, max diff {diff}");
        let reference_here = reference_logits(spec, model);
        assert_eq!(reference_here, reference, "the reference depends only on the codes");
        let vocab = spec.shape.vocab;
        for (p, (a, b)) in logits.chunks(vocab).zip(reference.chunks(vocab)).enumerate() {
            let cos = cosine(a, b);
            assert!(cos > 0.9999, "{t}, {act:?}, position {p}: cosine {cos} against the reference");
            assert_eq!(bitnet_runtime::sampler::argmax(a), bitnet_runtime::sampler::argmax(b), "{t} position {p}: top-1 differs");
        }
    }
}

#[test]
fn formats_agree_with_squared_relu() {
    check_activation(Activation::Relu2);
}

#[test]
fn formats_agree_with_silu() {
    check_activation(Activation::Silu);
}

#[test]
fn the_reference_can_tell_the_activations_apart() {
    // Guard against a comparison that cannot fail: the relu² model's
    // logits must not match the reference computed with SiLU.
    let dir = tmp_dir("formats-guard");
    let spec = small_spec(DType::TQ2_0, Activation::Relu2);
    let path = dir.join("m.gguf");
    write_synth(&spec, &path);
    let model = Model::open(&path).unwrap();
    let wrong = SynthSpec { activation: Activation::Silu, ..spec.clone() };
    let cos = cosine(&interp_logits(&model), &reference_logits(&wrong, &model));
    assert!(cos < 0.99, "cosine {cos} against the wrong activation");
}
