//! Hugging Face folders and `bitnet convert`: round trips keep ternary
//! values, scales and logits.

mod common;
use bitnet_frontends::arch::Activation;
use bitnet_frontends::convert::{convert, ConvertOptions};
use bitnet_frontends::gguf::{GgufFile, MetaValue};
use bitnet_frontends::model::Model;
use bitnet_frontends::synth::{self, ScaleDirection};
use bitnet_ir::interp::{Interpreter, KvCache, Tensor, WeightSource};
use bitnet_ir::DType;
use bitnet_runtime::{GenerateOptions, LoadOptions, SamplerConfig, Session};
use common::*;
use std::path::{Path, PathBuf};

const TOKENS: [u32; 6] = [256, 72, 105, 33, 32, 119];

fn logits(path: &Path) -> Vec<f32> {
    let model = Model::open(path).unwrap();
    let g = model.graph(true).unwrap();
    let inputs = [("tokens", Tensor::ids(TOKENS.iter().map(|&t| t as i32).collect())), ("positions", Tensor::ids((0..TOKENS.len() as i32).collect()))];
    let mut out = Interpreter::new(&model, 2).eval(&g, &inputs, &mut KvCache::new()).unwrap();
    out.pop().unwrap().as_f32().unwrap().to_vec()
}

fn hf_folder(dir: &Path, act: Activation, direction: ScaleDirection) -> PathBuf {
    let p = dir.join(format!("hf-{}-{direction:?}", act.name()));
    synth::write_hf(&small_spec(DType::I2S, act), None, &p, direction, |_, _| {}).unwrap();
    p
}

fn codes(model: &Model, name: &str) -> (Vec<i8>, f32) {
    let w = model.weight(name).unwrap();
    let (n, k) = (w.rows(), w.row_len());
    let mut all = vec![0i8; n * k];
    let mut scales = Vec::new();
    for r in 0..n {
        w.row(r).ternary(&mut all[r * k..(r + 1) * k], &mut scales);
    }
    let extra = model.weight(&name.replace(".weight", ".scale")).map_or(1.0, |s| s.to_f32()[0]);
    (all, scales[0] * extra)
}

fn to(src: &Path, dst: PathBuf, t: DType) -> PathBuf {
    convert(&Model::open(src).unwrap(), &ConvertOptions { weight_type: t, head_type: None }, &dst, |_, _| {}).unwrap();
    dst
}

#[test]
fn hf_folder_converts_to_every_type_with_the_same_values_and_logits() {
    let dir = tmp_dir("convert-hf");
    let folder = hf_folder(&dir, Activation::Relu2, ScaleDirection::Divide);
    let direct = logits(&folder);
    let m0 = Model::open(&folder).unwrap();
    assert_eq!(m0.config.activation, Activation::Relu2);
    for t in [DType::I2S, DType::TQ2_0, DType::TQ1_0, DType::F32] {
        let out = to(&folder, dir.join(format!("m-{}.gguf", t.name())), t);
        let m = Model::open(&out).unwrap();
        assert_eq!(m.config.activation, Activation::Relu2, "{t}: the activation survives conversion");
        if t.is_ternary() {
            for name in ["blk.0.attn_q.weight", "blk.2.ffn_down.weight"] {
                assert_eq!(codes(&m, name), codes(&m0, name), "{t}: {name}");
            }
        }
        let l = logits(&out);
        let (cos, diff) = (cosine(&l, &direct), max_abs_diff(&l, &direct));
        assert!(cos > 0.99999 && diff < 1e-3, "{t}: cosine {cos}, max diff {diff}");
    }
}

#[test]
fn both_weight_scale_directions_read_the_same_model() {
    let dir = tmp_dir("convert-direction");
    let a = logits(&hf_folder(&dir, Activation::Silu, ScaleDirection::Divide));
    let b = logits(&hf_folder(&dir, Activation::Silu, ScaleDirection::Multiply));
    // The two files hold bf16(1/β) and bf16(β): the same β up to bf16 rounding.
    assert!(cosine(&a, &b) > 0.999, "{}", cosine(&a, &b));
    // Reading a BitLinear file as AutoBitLinear (the wrong direction) is visibly wrong.
    let p = dir.join("hf-silu-Divide");
    let cfg = std::fs::read_to_string(p.join("config.json")).unwrap().replace("\"bitlinear\"", "\"autobitlinear\"");
    std::fs::write(p.join("config.json"), cfg).unwrap();
    let wrong = logits(&p);
    assert!(cosine(&a, &wrong) < 0.99, "{}", cosine(&a, &wrong));
}

#[test]
fn i2s_to_tq2_0_and_back_is_byte_identical() {
    let dir = tmp_dir("convert-i2s");
    let src = dir.join("src-i2_s.gguf");
    write_synth(&small_spec(DType::I2S, Activation::Relu2), &src);
    let tq = to(&src, dir.join("tq2_0.gguf"), DType::TQ2_0);
    let back = to(&tq, dir.join("back-i2_s.gguf"), DType::I2S);
    let (a, b) = (GgufFile::open(&src).unwrap(), GgufFile::open(&back).unwrap());
    for t in a.tensors.iter().filter(|t| t.dtype == DType::I2S) {
        assert_eq!(a.data(t), b.data(b.tensor(&t.name).unwrap()), "{}", t.name);
    }
    // The TQ2_0 file keeps β exactly: blocks with d = 1, β in the scale tensor.
    let m = Model::open(&tq).unwrap();
    let beta = m.weight("blk.1.attn_v.scale").unwrap().to_f32()[0];
    assert_eq!(beta, codes(&Model::open(&src).unwrap(), "blk.1.attn_v.weight").1);
    let (a, b) = (logits(&src), logits(&tq));
    assert!(cosine(&a, &b) > 0.99999 && max_abs_diff(&a, &b) < 1e-4, "{} {}", cosine(&a, &b), max_abs_diff(&a, &b));
    // Arch names follow the target engine.
    let arch = |p: &Path| GgufFile::open(p).unwrap().get("general.architecture").and_then(MetaValue::as_str).unwrap().to_string();
    assert_eq!(arch(&back), "bitnet-b1.58");
    assert_eq!(arch(&tq), "bitnet");
    assert_eq!(GgufFile::open(&tq).unwrap().get("bitnet.hidden_activation"), Some(&MetaValue::String("relu2".into())));
}

#[test]
fn stories_hf_folder_runs_and_converts() {
    let hf = data("models/stories260K/hf");
    let expected = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292];
    let greedy = |p: &Path| {
        let mut s = Session::load(p, &LoadOptions { threads: 2, ..Default::default() }).unwrap();
        let opts = GenerateOptions { n_predict: 20, ignore_eos: true, sampler: SamplerConfig::greedy(), dump_logits: false };
        s.generate(&[1, 403, 407, 261, 378], &opts, |_| {}).unwrap().generated_ids
    };
    assert_eq!(greedy(&hf), expected, "the HF folder (rotate-half RoPE on unpermuted rows)");
    let dir = tmp_dir("convert-stories");
    let gguf = to(&hf, dir.join("stories-f32.gguf"), DType::F32);
    assert_eq!(greedy(&gguf), expected, "the converted GGUF (q/k rows permuted for interleaved RoPE)");
    let original = Session::load(&stories(), &LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let converted = Session::load(&gguf, &LoadOptions { threads: 1, ..Default::default() }).unwrap();
    for text in ["Once upon a time, Lily", "  spaces  and\nnewlines", "unknown: 漢字"] {
        let a = original.tokenizer.encode(text, true, false).unwrap();
        assert_eq!(converted.tokenizer.encode(text, true, false).unwrap(), a, "{text:?}");
    }
    let e = convert(&Model::open(&hf).unwrap(), &ConvertOptions { weight_type: DType::TQ2_0, head_type: None }, &dir.join("x.gguf"), |_, _| {}).unwrap_err();
    assert!(e.contains("not a ternary model"), "{e}");
    assert!(!dir.join("x.gguf").exists());
}
