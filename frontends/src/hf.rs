//! Hugging Face model folders: `config.json`, one or several
//! `*.safetensors` (with `model.safetensors.index.json`), `tokenizer.json`
//! and `tokenizer_config.json`, memory-mapped.
//!
//! | `architectures[0]` | weights | becomes |
//! |---|---|---|
//! | `BitNetForCausalLM` (microsoft/bitnet-b1.58-2B-4T) | packed uint8 `[out/4, in]` + `weight_scale` | arch `bitnet-b1.58`, I2_S in memory |
//! | the same, `-bf16` variant | bf16 master weights | quantized at load with absmean |
//! | `BitnetForCausalLM` (1bitLLM `bitnet_b1_58-*`) | f16 master weights, SiLU | arch `bitnet`, absmean |
//! | `LlamaForCausalLM` + `quantization_config.quant_method: bitnet` (Falcon3-1.58bit, Falcon-E, Llama3-8B-1.58) | packed uint8 + divided `weight_scale`, untied float `lm_head` | arch `llama`, BitLinear without sub-norms |
//! | `LlamaForCausalLM` | float | arch `llama`, weights mapped as they are |
//!
//! Settings outside what the engine implements (`rope_scaling`, biases,
//! `use_rms_norm`, other quantization methods) are refused by key.
//!
//! HF checkpoints keep q/k rows in their original order and apply RoPE by
//! rotating halves, so every HF model runs with NEOX RoPE here (GGUF
//! `llama` files instead carry rows that the converter permuted).
//!
//! Packed ternary weights: bits 2i..2i+1 of `packed[r, c]` hold the code
//! (value + 1) of row `i·(out/4) + r`, column `c`. The scale's direction is
//! read from `quantization_config.linear_class`: transformers' `BitLinear`
//! divides by `weight_scale` (it stores 1/β), `autobitlinear` multiplies.

use crate::arch::{Activation, Arch};
use crate::model::{invalid, ModelConfig, ModelError, ModelTensor, TensorData};
use bitnet_ir::{quant, DType, RopeMode};
use safetensors::Dtype;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// A tensor found in a safetensors shard.
#[derive(Clone, Debug)]
pub struct HfTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub shard: usize,
    /// Absolute byte range in the shard file.
    pub start: usize,
    pub end: usize,
}

pub struct HfFolder {
    pub dir: PathBuf,
    pub config: serde_json::Value,
    pub shards: Vec<memmap2::Mmap>,
    pub tensors: HashMap<String, HfTensor>,
}

impl HfFolder {
    pub fn open(dir: &Path) -> Result<HfFolder, ModelError> {
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).map_err(|e| ModelError::Invalid(format!("{}: {e}", dir.join(name).display())));
        let config: serde_json::Value = serde_json::from_str(&read("config.json")?).map_err(|e| ModelError::Invalid(format!("config.json: {e}")))?;
        let files: Vec<String> = if dir.join("model.safetensors.index.json").exists() {
            let index: serde_json::Value =
                serde_json::from_str(&read("model.safetensors.index.json")?).map_err(|e| ModelError::Invalid(format!("model.safetensors.index.json: {e}")))?;
            let map = index["weight_map"].as_object().ok_or_else(|| ModelError::Invalid("model.safetensors.index.json has no weight_map".into()))?;
            map.values().filter_map(|v| v.as_str().map(String::from)).collect::<BTreeSet<_>>().into_iter().collect()
        } else {
            vec!["model.safetensors".into()]
        };
        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            if f.contains('/') || f.contains("..") {
                return invalid(format!("shard name {f:?} points outside the folder"));
            }
            let path = dir.join(f);
            let file = std::fs::File::open(&path).map_err(|e| ModelError::Invalid(format!("{}: {e}", path.display())))?;
            // SAFETY: read-only map of a file we do not modify.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::Invalid(format!("{}: {e}", path.display())))?;
            let (header, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| ModelError::Invalid(format!("{}: {e:?}", path.display())))?;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                tensors.insert(name, HfTensor { dtype: info.dtype, shape: info.shape.clone(), shard: i, start: 8 + header + s, end: 8 + header + e });
            }
            shards.push(map);
        }
        Ok(HfFolder { dir: dir.to_path_buf(), config, shards, tensors })
    }

    pub fn bytes(&self, t: &HfTensor) -> &[u8] {
        &self.shards[t.shard][t.start..t.end]
    }

    fn get(&self, name: &str) -> Option<&HfTensor> {
        self.tensors.get(name)
    }
}

fn cfg_usize(c: &serde_json::Value, key: &str) -> Result<Option<usize>, ModelError> {
    match &c[key] {
        serde_json::Value::Null => Ok(None),
        v => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| ModelError::Invalid(format!("config.json: {key} should be a non-negative integer, got {v}"))),
    }
}

/// How a packed projection's `weight_scale` relates to β.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleDirection {
    /// transformers' `BitLinear`: y = x·W / weight_scale (the file holds 1/β).
    Divide,
    /// `AutoBitLinear`: y = x·W · weight_scale.
    Multiply,
}

pub fn scale_direction(config: &serde_json::Value) -> ScaleDirection {
    match config["quantization_config"]["linear_class"].as_str() {
        Some(c) if c.eq_ignore_ascii_case("autobitlinear") => ScaleDirection::Multiply,
        _ => ScaleDirection::Divide,
    }
}

/// Checks `quantization_config` (Transformers' `BitNetQuantConfig`): true
/// when it makes the projections BitLinear, false without one. Values this
/// engine does not implement are refused by their key.
fn bitnet_quantization(c: &serde_json::Value) -> Result<bool, ModelError> {
    let q = &c["quantization_config"];
    if q.is_null() {
        return Ok(false);
    }
    let key = |k: &str| q[k].as_str();
    match key("quant_method") {
        Some("bitnet") => {}
        Some(m) => return invalid(format!("config.json: quantization_config.quant_method {m:?} is not supported (only \"bitnet\" is)")),
        None => return invalid("config.json: quantization_config has no quant_method"),
    }
    if let Some(class) = key("linear_class").filter(|c| !["bitlinear", "autobitlinear"].iter().any(|k| c.eq_ignore_ascii_case(k))) {
        return invalid(format!("config.json: quantization_config.linear_class {class:?} is not supported (bitlinear, autobitlinear)"));
    }
    if let Some(mode) = key("quantization_mode").filter(|m| !matches!(*m, "offline" | "online")) {
        return invalid(format!("config.json: quantization_config.quantization_mode {mode:?} is not supported (offline, online)"));
    }
    if q["use_rms_norm"].as_bool() == Some(true) {
        return invalid("config.json: quantization_config.use_rms_norm = true (an RMSNorm inside every BitLinear) is not supported");
    }
    for m in q["modules_to_not_convert"].as_array().into_iter().flatten() {
        if m.as_str() != Some("lm_head") {
            return invalid(format!("config.json: quantization_config.modules_to_not_convert lists {m}; only lm_head may stay in full precision here"));
        }
    }
    Ok(true)
}

pub(crate) fn read_config(hf: &HfFolder) -> Result<ModelConfig, ModelError> {
    let c = &hf.config;
    let arch_name = c["architectures"][0].as_str().unwrap_or("").to_string();
    // BitNetForCausalLM (2B4T) and BitnetForCausalLM (1bitLLM) have sub-norms;
    // LlamaForCausalLM is BitLinear when quantization_config says bitnet
    // (Falcon3, Falcon-E, Llama3-8B-1.58) and a plain float model otherwise.
    let (arch, sub_norms) = match arch_name.as_str() {
        "BitNetForCausalLM" => (Arch::BitNetB158, true),
        "BitnetForCausalLM" => (Arch::BitNet, true),
        "LlamaForCausalLM" => (Arch::Llama, false),
        "" => return invalid("config.json has no architectures entry"),
        other => return invalid(format!("Hugging Face architecture {other} is not supported (BitNetForCausalLM, BitnetForCausalLM, LlamaForCausalLM are)")),
    };
    let bitlinear = bitnet_quantization(c)? || arch.is_bitnet();
    for k in ["rope_scaling", "sliding_window"] {
        if !c[k].is_null() {
            return invalid(format!("config.json: {k} = {} is not supported", c[k]));
        }
    }
    for k in ["attention_bias", "mlp_bias"] {
        if c[k].as_bool() == Some(true) {
            return invalid(format!("config.json: {k} = true is not supported (no BitNet b1.58 model has biases)"));
        }
    }
    if let Some(b) = hf.tensors.keys().find(|n| n.ends_with(".bias")) {
        return invalid(format!("tensor {b}: bias terms are not supported"));
    }
    let need = |k: &str| cfg_usize(c, k)?.ok_or_else(|| ModelError::Invalid(format!("config.json: {k} is missing")));
    let hidden = need("hidden_size")?;
    let layers = need("num_hidden_layers")?;
    let heads = need("num_attention_heads")?;
    let kv_heads = cfg_usize(c, "num_key_value_heads")?.unwrap_or(heads);
    let ffn = need("intermediate_size")?;
    let embed = hf.get("model.embed_tokens.weight").ok_or_else(|| ModelError::Invalid("model.embed_tokens.weight is missing".into()))?;
    let vocab = embed.shape.first().copied().unwrap_or(0);
    let activation = match c["hidden_act"].as_str() {
        Some(a) => Activation::from_name(a).ok_or_else(|| ModelError::Invalid(format!("config.json: hidden_act {a:?} is not supported (silu, relu2)")))?,
        None => arch.default_activation(),
    };
    if hidden == 0 || heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return invalid(format!("config.json: hidden {hidden}, heads {heads}, kv heads {kv_heads} do not divide evenly"));
    }
    // Falcon3 states head_dim (256); others imply hidden / heads.
    let head_dim = match cfg_usize(c, "head_dim")? {
        Some(d) => d,
        None if hidden % heads == 0 => hidden / heads,
        None => return invalid(format!("config.json: hidden {hidden} / heads {heads} do not divide evenly and head_dim is missing")),
    };
    if head_dim == 0 || head_dim % 2 != 0 || head_dim > 4096 {
        return invalid(format!("config.json: head_dim {head_dim} must be even, 2..=4096 (RoPE rotates pairs)"));
    }
    Ok(ModelConfig {
        arch,
        arch_name: arch_name.clone(),
        hidden,
        layers,
        heads,
        kv_heads,
        head_dim,
        ffn,
        vocab,
        context: cfg_usize(c, "max_position_embeddings")?.unwrap_or(2048),
        rope_theta: c["rope_theta"].as_f64().unwrap_or(10000.0) as f32,
        rope_mode: RopeMode::Neox,
        norm_eps: c["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32,
        activation,
        tied_head: c["tie_word_embeddings"].as_bool().unwrap_or(false) || hf.get("lm_head.weight").is_none(),
        bitlinear,
        sub_norms,
    })
}

/// HF name → GGUF name, for the names this reader knows.
fn gguf_name(hf: &str) -> Option<String> {
    let fixed = [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"), ("lm_head.weight", "output.weight")];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let part = match rest {
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "self_attn.attn_sub_norm.weight" | "self_attn.inner_attn_ln.weight" => "attn_sub_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        "mlp.ffn_sub_norm.weight" | "mlp.ffn_layernorm.weight" => "ffn_sub_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}.weight"))
}

fn is_projection(gguf: &str) -> bool {
    ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"].iter().any(|p| gguf.ends_with(&format!(".{p}.weight")))
}

fn float_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// A scalar tensor (any float type) as f32.
fn scalar(hf: &HfFolder, t: &HfTensor) -> Option<f32> {
    let b = hf.bytes(t);
    match t.dtype {
        Dtype::F32 if b.len() >= 4 => Some(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Dtype::F16 if b.len() >= 2 => Some(half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        Dtype::BF16 if b.len() >= 2 => Some(half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        _ => None,
    }
}

/// Unpacks `[out/4, in]` uint8 codes into row-major ternary values.
pub fn unpack_ternary(packed: &[u8], out: usize, k: usize) -> Vec<i8> {
    let q = out / 4;
    let mut codes = vec![0i8; out * k];
    for r in 0..q {
        for c in 0..k {
            let byte = packed[r * k + c];
            for i in 0..4 {
                codes[(i * q + r) * k + c] = ((byte >> (2 * i)) & 3) as i8 - 1;
            }
        }
    }
    codes
}

/// Packs row-major ternary values into `[out/4, in]` uint8 (the inverse of
/// [`unpack_ternary`]).
pub fn pack_ternary(codes: &[i8], out: usize, k: usize) -> Vec<u8> {
    let q = out / 4;
    let mut packed = vec![0u8; q * k];
    for r in 0..q {
        for c in 0..k {
            for i in 0..4 {
                packed[r * k + c] |= ((codes[(i * q + r) * k + c] + 1) as u8) << (2 * i);
            }
        }
    }
    packed
}

/// BitNet's absmean quantization of master weights: β = mean|W|,
/// W_t = clamp(round(W / β), -1, 1).
pub fn absmean(w: &[f32]) -> (Vec<i8>, f32) {
    let beta = (w.iter().map(|v| v.abs() as f64).sum::<f64>() / w.len().max(1) as f64).max(1e-5) as f32;
    (w.iter().map(|&v| (v / beta).round().clamp(-1.0, 1.0) as i8).collect(), beta)
}

/// The tensors of an HF folder under GGUF names, each borrowed from a
/// shard or, for ternary projections, converted to I2_S in memory.
pub(crate) fn tensors(hf: &HfFolder, config: &ModelConfig) -> Result<Vec<ModelTensor>, ModelError> {
    let direction = scale_direction(&hf.config);
    let mut out = Vec::new();
    let mut names: Vec<&String> = hf.tensors.keys().collect();
    names.sort();
    for name in names {
        let t = &hf.tensors[name];
        if name.ends_with(".weight_scale") || name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        let Some(g) = gguf_name(name) else { continue };
        let bitlinear = config.bitlinear && is_projection(&g);
        if bitlinear {
            let (codes, beta, n, k) = match (t.dtype, t.shape.as_slice()) {
                (Dtype::U8, &[q, k]) => {
                    let scale_name = name.replace(".weight", ".weight_scale");
                    let ws = hf
                        .get(&scale_name)
                        .and_then(|s| scalar(hf, s))
                        .ok_or_else(|| ModelError::Invalid(format!("{scale_name} is missing or not a float")))?;
                    if !(ws.is_finite() && ws > 0.0) {
                        return invalid(format!("{scale_name} = {ws} is not a positive scale"));
                    }
                    let beta = match direction {
                        ScaleDirection::Divide => 1.0 / ws,
                        ScaleDirection::Multiply => ws,
                    };
                    (unpack_ternary(hf.bytes(t), 4 * q, k), beta, 4 * q, k)
                }
                (d, &[n, k]) if float_dtype(d).is_some() => {
                    let mut w = vec![0f32; n * k];
                    quant::RowView { dtype: float_dtype(d).unwrap(), bytes: hf.bytes(t), tensor_scale: 1.0 }.dequantize(&mut w);
                    let (codes, beta) = absmean(&w);
                    (codes, beta, n, k)
                }
                (d, s) => return invalid(format!("{name}: {d:?} {s:?} is not a BitLinear weight (packed uint8 or float)")),
            };
            // Rows that are not whole I2_S blocks (bitnet_b1_58-3B's FFN of
            // 8640) are padded with zero weights in memory.
            out.push(ModelTensor { name: g, dtype: DType::I2S, shape: vec![n, k], data: TensorData::Owned(quant::pack_i2s_rows(&codes, k, beta)) });
        } else {
            let Some(dtype) = float_dtype(t.dtype) else {
                return invalid(format!("{name}: type {:?} is not supported here", t.dtype));
            };
            if dtype.bytes_for(t.shape.iter().product()) != Some(t.end - t.start) {
                return invalid(format!("{name}: {} bytes do not fit shape {:?}", t.end - t.start, t.shape));
            }
            out.push(ModelTensor { name: g, dtype, shape: t.shape.clone(), data: TensorData::Hf { shard: t.shard, start: t.start, end: t.end } });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_puts_row_groups_in_bit_pairs() {
        // out = 8 rows, k = 3: packed[r, c] holds rows r and r + 2, r + 4, r + 6.
        let codes: Vec<i8> = (0..24).map(|i| [(-1i8), 0, 1][(i * 7 % 5) % 3]).collect();
        let packed = pack_ternary(&codes, 8, 3);
        assert_eq!(packed.len(), 2 * 3);
        assert_eq!(unpack_ternary(&packed, 8, 3), codes);
        let (r, c, i) = (1, 2, 3); // row i·(out/4) + r = 7, column 2
        assert_eq!(((packed[r * 3 + c] >> (2 * i)) & 3) as i8 - 1, codes[7 * 3 + 2]);
    }

    #[test]
    fn absmean_quantizes_master_weights() {
        let w = [0.5f32, -0.1, 0.02, -0.9, 0.0, 0.3];
        let (codes, beta) = absmean(&w);
        let mean = w.iter().map(|v| v.abs()).sum::<f32>() / 6.0;
        assert!((beta - mean).abs() < 1e-6);
        assert_eq!(codes, vec![1, 0, 0, -1, 0, 1]);
    }
}
