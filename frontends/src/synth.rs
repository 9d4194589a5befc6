//! Random-weight BitNet models, for tests and benchmarks: any shape
//! (including BitNet b1.58 2B4T's), any ternary format, either activation.
//!
//! The ternary codes and scales depend only on the seed and the tensor, not
//! on the output format, so the same model written as I2_S, TQ2_0, TQ1_0
//! and f32 holds bit-identical ternary values. Tensors are generated and
//! written one at a time: a 2B4T-shaped file never sits in memory whole.

use crate::arch::{Activation, Arch};
use crate::chat::LLAMA3_TEMPLATE;
use crate::family::{Family, Vocab, Weights};
use crate::gguf::{GgufError, GgufFile, GgufWriter, MetaValue};
use crate::model::ModelConfig;
use crate::tokenizer::{bytelevel, VocabParts};
use bitnet_ir::{quant, DType, RopeMode};
use rand::{Rng, SeedableRng};
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct SynthShape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub vocab: usize,
}

impl SynthShape {
    /// A small model that runs instantly.
    pub fn tiny() -> SynthShape {
        SynthShape { hidden: 256, layers: 4, heads: 8, kv_heads: 2, ffn: 768, vocab: 32000 }
    }
    /// BitNet b1.58 2B4T's shape.
    pub fn b2b4t() -> SynthShape {
        SynthShape { hidden: 2560, layers: 30, heads: 20, kv_heads: 5, ffn: 6912, vocab: 128256 }
    }
}

#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub shape: SynthShape,
    /// The type of the BitLinear weights: a ternary type, or f16/f32
    /// holding ternary values times the scale.
    pub weight_type: DType,
    pub head_type: DType,
    pub activation: Activation,
    pub seed: u64,
    pub context: usize,
    pub rope_theta: f32,
}

impl SynthSpec {
    /// The GGUF architecture name that carries the activation: llama.cpp's
    /// `bitnet` is SiLU, bitnet.cpp's `bitnet-b1.58` squared ReLU.
    pub fn arch_name(&self) -> &'static str {
        match self.activation {
            Activation::Silu => "bitnet",
            Activation::Relu2 => "bitnet-b1.58",
        }
    }

    /// Checks that every dimension fits the chosen types.
    pub fn validate(&self) -> Result<(), String> {
        let s = &self.shape;
        if !matches!(self.weight_type, DType::I2S | DType::TQ1_0 | DType::TQ2_0 | DType::F16 | DType::F32 | DType::BF16) {
            return Err(format!("--type {} is not a BitLinear weight type (i2_s, tq2_0, tq1_0, f16, bf16, f32)", self.weight_type));
        }
        if !self.head_type.is_weight() || self.head_type.is_ternary() {
            return Err(format!("--head-type {} is not an embedding type (f32, f16, bf16, q8_0, q6_k, q4_k)", self.head_type));
        }
        for (what, v) in [("hidden", s.hidden), ("layers", s.layers), ("heads", s.heads), ("kv-heads", s.kv_heads), ("ffn", s.ffn), ("vocab", s.vocab)] {
            if v == 0 {
                return Err(format!("--{what} must be positive"));
            }
        }
        if !s.hidden.is_multiple_of(s.heads) || !s.heads.is_multiple_of(s.kv_heads) || !(s.hidden / s.heads).is_multiple_of(2) {
            return Err(format!(
                "hidden {} / heads {} / kv-heads {}: heads must divide hidden into even head dims, kv-heads must divide heads",
                s.hidden, s.heads, s.kv_heads
            ));
        }
        let block = self.weight_type.block_elems();
        for (what, k) in [("hidden", s.hidden), ("ffn", s.ffn)] {
            if k % block != 0 {
                return Err(format!("--{what} {k} is not a multiple of {block}, which {} needs", self.weight_type));
            }
        }
        let hb = self.head_type.block_elems();
        if !s.hidden.is_multiple_of(hb) {
            return Err(format!("--hidden {} is not a multiple of {hb}, which head type {} needs", s.hidden, self.head_type));
        }
        Ok(())
    }
}

/// A projection's ternary codes and its scale β (an f16-exact value near
/// 1/sqrt(k), so every format stores it exactly).
pub fn ternary_weights(seed: u64, tensor: &str, n: usize, k: usize) -> (Vec<i8>, f32) {
    let mut rng = rng_for(seed, tensor);
    let codes = (0..n * k).map(|_| rng.random_range(-1i8..=1)).collect();
    let beta = half::f16::from_f32((1.0 / (k as f32).sqrt()) * rng.random_range(0.75..1.25)).to_f32();
    (codes, beta)
}

fn rng_for(seed: u64, tensor: &str) -> rand::rngs::StdRng {
    // FNV-1a of the name, mixed with the seed: each tensor has its own stream.
    let h = tensor.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    rand::rngs::StdRng::seed_from_u64(h ^ seed.wrapping_mul(0x9E3779B97F4A7C15))
}

fn normal(rng: &mut impl Rng) -> f32 {
    // Box–Muller.
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

#[derive(Clone, Copy)]
enum Gen {
    Ternary { n: usize, k: usize },
    Norm(usize),
    Embedding { vocab: usize, hidden: usize },
}

/// Which tensors a model has besides the projections.
#[derive(Clone, Copy, Debug)]
struct Structure {
    head_dim: usize,
    sub_norms: bool,
    tied: bool,
}

impl Structure {
    fn bitnet(s: &SynthShape) -> Structure {
        Structure { head_dim: s.hidden / s.heads, sub_norms: true, tied: true }
    }
}

fn tensor_plan(s: &SynthShape, st: Structure) -> Vec<(String, Gen)> {
    let (q, kv) = (s.heads * st.head_dim, s.kv_heads * st.head_dim);
    let mut t = vec![("token_embd.weight".to_string(), Gen::Embedding { vocab: s.vocab, hidden: s.hidden })];
    for l in 0..s.layers {
        let p = |n: &str| format!("blk.{l}.{n}.weight");
        t.push((p("attn_norm"), Gen::Norm(s.hidden)));
        t.push((p("attn_q"), Gen::Ternary { n: q, k: s.hidden }));
        t.push((p("attn_k"), Gen::Ternary { n: kv, k: s.hidden }));
        t.push((p("attn_v"), Gen::Ternary { n: kv, k: s.hidden }));
        if st.sub_norms {
            t.push((p("attn_sub_norm"), Gen::Norm(q)));
        }
        t.push((p("attn_output"), Gen::Ternary { n: s.hidden, k: q }));
        t.push((p("ffn_norm"), Gen::Norm(s.hidden)));
        t.push((p("ffn_gate"), Gen::Ternary { n: s.ffn, k: s.hidden }));
        t.push((p("ffn_up"), Gen::Ternary { n: s.ffn, k: s.hidden }));
        if st.sub_norms {
            t.push((p("ffn_sub_norm"), Gen::Norm(s.ffn)));
        }
        t.push((p("ffn_down"), Gen::Ternary { n: s.hidden, k: s.ffn }));
    }
    t.push(("output_norm.weight".into(), Gen::Norm(s.hidden)));
    if !st.tied {
        t.push(("output.weight".into(), Gen::Embedding { vocab: s.vocab, hidden: s.hidden }));
    }
    t
}

/// The vocabulary: `vocab_from`'s, or a built-in byte-level one (256 byte
/// tokens, LLaMA-3's special tokens, then filler tokens ` tok<N>`), padded
/// to `vocab` entries either way.
pub fn synth_vocab(vocab: usize, vocab_from: Option<&GgufFile>) -> Result<VocabParts, String> {
    let mut parts = match vocab_from {
        Some(f) => {
            let p = VocabParts::from_gguf(f).map_err(|e| format!("--vocab-from: {e}"))?;
            if p.tokens.is_empty() {
                return Err("--vocab-from: the file has no tokenizer.ggml.tokens".into());
            }
            p
        }
        None => {
            let specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"];
            let mut tokens: Vec<String> = (0..=255u8).map(|b| bytelevel::encode(&[b])).collect();
            tokens.extend(specials.iter().map(|s| s.to_string()));
            let filler = vocab.saturating_sub(tokens.len());
            tokens.extend((0..filler).map(|i| format!("\u{120}tok{i}")));
            let types = (0..tokens.len()).map(|i| if (256..256 + specials.len()).contains(&i) { 3 } else { 1 }).collect();
            VocabParts {
                model: "gpt2".into(),
                pre: "gpt-2".into(),
                tokens,
                types,
                bos: Some(256),
                eos: Some(257),
                eot: Some(260),
                add_bos: true,
                chat_template: Some(LLAMA3_TEMPLATE.into()),
                ..Default::default()
            }
        }
    };
    let n = parts.tokens.len();
    for i in n..vocab {
        parts.tokens.push(format!("<|synth_pad_{}|>", i - n));
        parts.types.push(3);
        if !parts.scores.is_empty() {
            parts.scores.push(0.0);
        }
    }
    Ok(parts)
}

/// Bytes of one weight in the file's type. Ternary projections are written
/// as their format's codes with the per-tensor β (TQ blocks carry it as
/// their scale); float types hold `code × β`.
fn tensor_bytes(spec: &SynthSpec, name: &str, gen: &Gen) -> Vec<u8> {
    match *gen {
        Gen::Ternary { n, k } => {
            let (codes, beta) = ternary_weights(spec.seed, name, n, k);
            match spec.weight_type {
                DType::I2S => quant::pack_i2s(&codes, beta),
                t if t.is_ternary() => quant::pack_ternary(t, &codes, &vec![beta; codes.len() / t.block_elems()]),
                t => quant::quantize(t, &codes.iter().map(|&c| c as f32 * beta).collect::<Vec<_>>()),
            }
        }
        Gen::Norm(n) => {
            let mut rng = rng_for(spec.seed, name);
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(0.8..1.2)).collect();
            quant::quantize(DType::F32, &v)
        }
        Gen::Embedding { vocab, hidden } => {
            let mut rng = rng_for(spec.seed, name);
            let v: Vec<f32> = (0..vocab * hidden).map(|_| normal(&mut rng)).collect();
            quant::quantize(spec.head_type, &v)
        }
    }
}

/// Writes the model to `path` (through a temporary file). `progress` is
/// called with (tensors done, tensors total).
pub fn write(spec: &SynthSpec, vocab_from: Option<&GgufFile>, path: &Path, mut progress: impl FnMut(usize, usize)) -> Result<(), String> {
    spec.validate()?;
    let mut spec = spec.clone();
    let mut w = GgufWriter::new();
    let arch = spec.arch_name();
    w.set("general.architecture", MetaValue::String(arch.into()));
    w.set("general.name", MetaValue::String(format!("bitnet-rs synthetic {}", spec.weight_type)));
    let parts = synth_vocab(spec.shape.vocab, vocab_from)?;
    spec.shape.vocab = parts.tokens.len();
    for (k, v) in parts.to_gguf() {
        w.set(&k, v);
    }
    let s = &spec.shape;
    let config = ModelConfig {
        arch: Arch::from_name(arch).expect("synth writes known architectures"),
        arch_name: arch.into(),
        hidden: s.hidden,
        layers: s.layers,
        heads: s.heads,
        kv_heads: s.kv_heads,
        head_dim: s.hidden / s.heads,
        ffn: s.ffn,
        vocab: s.vocab,
        context: spec.context,
        rope_theta: spec.rope_theta,
        rope_mode: RopeMode::Neox,
        norm_eps: 1e-5,
        activation: spec.activation,
        tied_head: true,
        bitlinear: true,
        sub_norms: true,
    };
    for (k, v) in config.gguf_metadata(arch) {
        w.set(&k, v);
    }
    let plan = tensor_plan(s, Structure::bitnet(s));
    for (name, gen) in &plan {
        let (dtype, shape) = match *gen {
            Gen::Ternary { n, k } => (spec.weight_type, vec![n, k]),
            Gen::Norm(n) => (DType::F32, vec![n]),
            Gen::Embedding { vocab, hidden } => (spec.head_type, vec![vocab, hidden]),
        };
        w.add_tensor(name, dtype, &shape);
    }
    let total = plan.len();
    w.write_file(path, |i| {
        progress(i, total);
        Ok(tensor_bytes(&spec, &plan[i].0, &plan[i].1))
    })
    .map_err(|e: GgufError| format!("writing {}: {e}", path.display()))?;
    progress(total, total);
    Ok(())
}

/// How a synthetic HF folder stores each projection's scale.
pub use crate::hf::ScaleDirection;

/// A Hugging Face checkpoint's layout: what `config.json` says and how the
/// tensors are stored and named.
struct HfLayout {
    architecture: &'static str,
    model_type: &'static str,
    weights: Weights,
    quantization_config: Option<serde_json::Value>,
    /// HF names of the attention and FFN sub-norms, if the model has them.
    sub_norm_names: Option<(&'static str, &'static str)>,
    structure: Structure,
    states_head_dim: bool,
    norm_eps: f32,
    /// `_name_or_path`.
    name: String,
    /// Round each β to a power of two, which bf16 `weight_scale` (as β or
    /// 1/β), f16 TQ block scales and f32 I2_S scales all hold exactly: then
    /// every format of the model computes the same numbers.
    exact_scales: bool,
}

fn quantization_config(direction: ScaleDirection) -> serde_json::Value {
    let linear_class = match direction {
        ScaleDirection::Divide => "bitlinear",
        ScaleDirection::Multiply => "autobitlinear",
    };
    serde_json::json!({"quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": "offline"})
}

/// Writes a random-weight Hugging Face folder in BitNet b1.58 2B4T's
/// layout (`BitNetForCausalLM`: packed uint8 `[out/4, in]` projections with
/// a bf16 `weight_scale` each, bf16 norms and embedding), with the same
/// ternary codes as [`write`] for the same spec.
pub fn write_hf(
    spec: &SynthSpec,
    vocab_from: Option<&GgufFile>,
    dir: &Path,
    direction: ScaleDirection,
    progress: impl FnMut(usize, usize),
) -> Result<(), String> {
    spec.validate()?;
    let layout = HfLayout {
        architecture: "BitNetForCausalLM",
        model_type: "bitnet",
        weights: Weights::Packed(direction),
        quantization_config: Some(quantization_config(direction)),
        sub_norm_names: Some(("self_attn.attn_sub_norm", "mlp.ffn_sub_norm")),
        structure: Structure::bitnet(&spec.shape),
        states_head_dim: false,
        norm_eps: 1e-5,
        name: "bitnet-rs synthetic".into(),
        exact_scales: false,
    };
    write_hf_layout(spec, &synth_vocab(spec.shape.vocab, vocab_from)?, &layout, dir, progress)
}

fn write_hf_layout(spec: &SynthSpec, parts: &VocabParts, layout: &HfLayout, dir: &Path, mut progress: impl FnMut(usize, usize)) -> Result<(), String> {
    use safetensors::{tensor::TensorView, Dtype};
    let s = &spec.shape;
    let st = layout.structure;
    if matches!(layout.weights, Weights::Packed(_)) && ![s.hidden, s.ffn, s.heads * st.head_dim, s.kv_heads * st.head_dim].iter().all(|n| n % 4 == 0) {
        return Err("packed HF weights need every projection's output size to be a multiple of 4".into());
    }
    let vocab = parts.tokens.len();
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let result = (|| -> Result<(), String> {
        let plan = tensor_plan(&SynthShape { vocab, ..s.clone() }, st);
        let mut data: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let bf16 = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect() };
        let f16 = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect() };
        // Master-weight checkpoints (1bitLLM) are f16 throughout, packed ones bf16.
        let (float, dtype) = match layout.weights {
            Weights::Master => (&f16 as &dyn Fn(&[f32]) -> Vec<u8>, Dtype::F16),
            Weights::Packed(_) => (&bf16 as &dyn Fn(&[f32]) -> Vec<u8>, Dtype::BF16),
        };
        for (i, (name, gen)) in plan.iter().enumerate() {
            progress(i, plan.len());
            let hf = hf_name(name, layout.sub_norm_names);
            match (*gen, layout.weights) {
                (Gen::Ternary { n, k }, Weights::Packed(direction)) => {
                    let (codes, beta) = ternary_weights(spec.seed, name, n, k);
                    let beta = if layout.exact_scales { beta.log2().round().exp2() } else { beta };
                    data.push((hf.clone(), Dtype::U8, vec![n / 4, k], crate::hf::pack_ternary(&codes, n, k)));
                    let ws = match direction {
                        ScaleDirection::Divide => 1.0 / beta,
                        ScaleDirection::Multiply => beta,
                    };
                    data.push((hf.replace(".weight", ".weight_scale"), Dtype::BF16, vec![1], bf16(&[ws])));
                }
                (Gen::Ternary { n, k }, Weights::Master) => {
                    let (codes, beta) = ternary_weights(spec.seed, name, n, k);
                    let beta = if layout.exact_scales { beta.log2().round().exp2() } else { beta };
                    let v: Vec<f32> = codes.iter().map(|&c| c as f32 * beta).collect();
                    data.push((hf, dtype, vec![n, k], float(&v)));
                }
                (Gen::Norm(n), _) => {
                    let mut rng = rng_for(spec.seed, name);
                    let v: Vec<f32> = (0..n).map(|_| rng.random_range(0.8..1.2)).collect();
                    data.push((hf, dtype, vec![n], float(&v)));
                }
                (Gen::Embedding { vocab, hidden }, _) => {
                    let mut rng = rng_for(spec.seed, name);
                    let v: Vec<f32> = (0..vocab * hidden).map(|_| normal(&mut rng)).collect();
                    data.push((hf, dtype, vec![vocab, hidden], float(&v)));
                }
            }
        }
        let views = data
            .iter()
            .map(|(n, d, shape, bytes)| Ok((n.clone(), TensorView::new(*d, shape.clone(), bytes).map_err(|e| format!("{n}: {e:?}"))?)))
            .collect::<Result<Vec<_>, String>>()?;
        safetensors::serialize_to_file(views, None, &tmp.join("model.safetensors")).map_err(|e| format!("writing safetensors: {e:?}"))?;
        let mut config = serde_json::json!({
            "_name_or_path": layout.name,
            "architectures": [layout.architecture],
            "model_type": layout.model_type,
            "hidden_size": s.hidden,
            "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads,
            "num_key_value_heads": s.kv_heads,
            "intermediate_size": s.ffn,
            "vocab_size": vocab,
            "max_position_embeddings": spec.context,
            "rope_theta": spec.rope_theta,
            "rope_scaling": null,
            "rms_norm_eps": layout.norm_eps,
            "hidden_act": spec.activation.name(),
            "tie_word_embeddings": st.tied,
            "attention_bias": false,
            "torch_dtype": if dtype == Dtype::F16 { "float16" } else { "bfloat16" },
            "bos_token_id": parts.bos,
            "eos_token_id": parts.eos,
        });
        if layout.states_head_dim {
            config["head_dim"] = st.head_dim.into();
        }
        if let Some(q) = &layout.quantization_config {
            config["quantization_config"] = q.clone();
        }
        std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).map_err(|e| e.to_string())?;
        parts.write_hf(&tmp).map_err(|e| e.to_string())?;
        progress(plan.len(), plan.len());
        Ok(())
    })();
    match result {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(dir);
            std::fs::rename(&tmp, dir).map_err(|e| format!("{}: {e}", dir.display()))
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// The HF name of a GGUF tensor name (the inverse of the reader's map).
fn hf_name(gguf: &str, sub_norms: Option<(&str, &str)>) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.").unwrap();
    let (layer, part) = rest.split_once('.').unwrap();
    let (attn_sub, ffn_sub) = sub_norms.unwrap_or(("", ""));
    let hf = match part.trim_end_matches(".weight") {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_sub_norm" => attn_sub,
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "ffn_sub_norm" => ffn_sub,
        other => unreachable!("no HF name for {other}"),
    };
    format!("model.layers.{layer}.{hf}.weight")
}

/// The output format of [`write_family`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FamilyFormat {
    /// The family's Hugging Face checkpoint layout.
    Hf,
    /// I2_S under the architecture name bitnet.cpp's converter writes.
    Gguf,
}

/// The LLaMA-2 SentencePiece vocabulary the repository has (stories260K's
/// 512 tokens), for the 1bitLLM families.
const LLAMA2_SPM_512: &str = include_str!("../../testdata/models/stories260K/hf/tokenizer.json");

/// A family's vocabulary with `vocab` entries: the family's special tokens
/// over a vocabulary the repository has, padded with filler tokens.
pub fn family_vocab(family: &Family, vocab: usize) -> Result<VocabParts, String> {
    let mut parts = match family.vocab {
        Vocab::Llama3 => VocabParts { pre: "llama-bpe".into(), ..synth_vocab(vocab, None)? },
        Vocab::Falcon3 => {
            let specials = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"];
            let mut tokens: Vec<String> = (0..=255u8).map(|b| bytelevel::encode(&[b])).collect();
            tokens.extend(specials.iter().map(|s| s.to_string()));
            let types = (0..tokens.len()).map(|i| if i >= 256 { 3 } else { 1 }).collect();
            VocabParts { model: "gpt2".into(), pre: "falcon3".into(), tokens, types, ..Default::default() }
        }
        Vocab::Llama2Spm => {
            let j: serde_json::Value = serde_json::from_str(LLAMA2_SPM_512).map_err(|e| e.to_string())?;
            let mut p = VocabParts::from_hf_json(&j, &serde_json::Value::Null).map_err(|e| e.to_string())?;
            for t in ["<pad>", "</line>"] {
                p.tokens.push(t.into());
                p.types.push(3);
                p.scores.push(0.0);
            }
            p
        }
    };
    let filler = vocab.saturating_sub(parts.tokens.len());
    for i in 0..filler {
        parts.tokens.push(if family.vocab == Vocab::Llama2Spm { format!("\u{2581}tok{i}") } else { format!("\u{120}tok{i}") });
        parts.types.push(1);
        if !parts.scores.is_empty() {
            parts.scores.push(-1e6 - i as f32);
        }
    }
    if parts.tokens.len() > vocab {
        return Err(format!("{}: the vocabulary has {} tokens, more than {vocab}", family.name, parts.tokens.len()));
    }
    let id = |t: &str| parts.tokens.iter().position(|p| p == t).map(|i| i as u32);
    parts.bos = family.bos.and_then(id);
    parts.eos = id(family.eos);
    parts.eot = id(family.end_of_turn);
    parts.add_bos = family.add_bos;
    parts.chat_template = family.chat_template.map(String::from);
    Ok(parts)
}

/// Writes a random-weight model with `family`'s published configuration
/// (`full`) or its structure at a small size, as the family's HF folder or
/// as an I2_S GGUF converted from one.
pub fn write_family(family: &Family, full: bool, format: FamilyFormat, seed: u64, out: &Path, mut progress: impl FnMut(usize, usize)) -> Result<(), String> {
    let d = family.dims_for(full)?;
    let shape = SynthShape { hidden: d.hidden, layers: d.layers, heads: d.heads, kv_heads: d.kv_heads, ffn: d.ffn, vocab: d.vocab };
    let spec = SynthSpec {
        shape,
        weight_type: DType::F16,
        head_type: DType::F16,
        activation: family.activation,
        seed,
        context: d.context,
        rope_theta: family.rope_theta,
    };
    let (architecture, model_type, sub_norm_names) = match (family.hf_arch, family.sub_norms) {
        ("BitNetForCausalLM", _) => ("BitNetForCausalLM", "bitnet", Some(("self_attn.attn_sub_norm", "mlp.ffn_sub_norm"))),
        ("BitnetForCausalLM", _) => ("BitnetForCausalLM", "llama", Some(("self_attn.inner_attn_ln", "mlp.ffn_layernorm"))),
        (_, false) => ("LlamaForCausalLM", "llama", None),
        (a, true) => return Err(format!("{}: no sub-norm names for {a}", family.name)),
    };
    let quantization_config = match (family.weights, architecture) {
        (Weights::Master, _) => None,
        (Weights::Packed(d), "BitNetForCausalLM") => Some(quantization_config(d)),
        // Transformers' default linear class (BitLinear, divided scales), as
        // onebitllms writes it for Falcon3 / Falcon-E / Llama3-8B-1.58.
        (Weights::Packed(_), _) => Some(serde_json::json!({"modules_to_not_convert": ["lm_head"], "quant_method": "bitnet"})),
    };
    let layout = HfLayout {
        architecture,
        model_type,
        weights: family.weights,
        quantization_config,
        sub_norm_names,
        structure: Structure { head_dim: d.head_dim, sub_norms: family.sub_norms, tied: family.tied },
        states_head_dim: family.states_head_dim,
        norm_eps: family.norm_eps,
        name: format!("bitnet-rs/synth-{}-{}", family.name, if full { "full" } else { "tiny" }),
        exact_scales: true,
    };
    let parts = family_vocab(family, d.vocab)?;
    match format {
        FamilyFormat::Hf => write_hf_layout(&spec, &parts, &layout, out, progress),
        FamilyFormat::Gguf => {
            let folder = out.with_extension(format!("hf-tmp{}", std::process::id()));
            // The HF folder is the first half of the work, the conversion the second.
            write_hf_layout(&spec, &parts, &layout, &folder, |i, n| progress(i, 2 * n))?;
            let converted = crate::model::Model::open(&folder).map_err(|e| e.to_string()).and_then(|m| {
                let opts = crate::convert::ConvertOptions { weight_type: DType::I2S, head_type: None };
                crate::convert::convert(&m, &opts, out, |i, n| progress(n + i, 2 * n))
            });
            let _ = std::fs::remove_dir_all(&folder);
            converted.map(|_| ())
        }
    }
}
