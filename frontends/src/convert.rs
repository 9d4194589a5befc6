//! `bitnet convert`: a model (GGUF file or HF folder) to a GGUF file for a
//! target engine.
//!
//! - BitLinear projections go to a ternary type (`i2_s` for bitnet.cpp,
//!   `tq2_0`/`tq1_0` for llama.cpp) or to f32/f16 values `code × β`.
//!   Ternary codes never change. Scales are kept exactly: I2_S holds one f32
//!   β per tensor; a TQ block holds an f16 scale, so a per-tensor β goes
//!   into TQ blocks as d = 1 plus the f32 `blk.N.<proj>.scale` tensor that
//!   llama.cpp multiplies in. Hence I2_S → TQ2_0 → I2_S is byte-identical.
//! - The architecture name is the one the target engine knows: bitnet.cpp
//!   reads `bitnet-b1.58` (squared ReLU) and `bitnet` (SiLU); upstream
//!   llama.cpp only `bitnet`, whose graph computes SiLU. A squared-ReLU
//!   model written for llama.cpp keeps `bitnet.hidden_activation = relu2`
//!   (bitnet-rs reads it) and the conversion warns that llama.cpp will not.
//! - `llama` models from HF folders get their q/k rows permuted into the
//!   interleaved RoPE order, as llama.cpp's converter does; BitLinear
//!   `llama` models (Falcon3, Llama3-8B-1.58) stay `llama`, as both
//!   converters write them, and since llama.cpp's `llama` graph applies no
//!   `.scale` tensors, their TQ blocks carry β itself (rounded to f16).
//! - The output is written to a temporary file and renamed at the end.

use crate::arch::{Activation, Arch};
use crate::gguf::{GgufWriter, MetaValue};
use crate::model::{Model, ModelSource};
use crate::tokenizer::VocabParts;
use bitnet_ir::interp::{WeightSource, WeightView};
use bitnet_ir::{quant, DType, RopeMode};
use std::path::Path;

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Type of the BitLinear projections (BitNet models) or of every
    /// matrix (plain models).
    pub weight_type: DType,
    /// Type of `token_embd` / `output` [default: as stored, f16 for HF bf16].
    pub head_type: Option<DType>,
}

const PROJECTIONS: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];

fn projection(name: &str) -> Option<String> {
    PROJECTIONS.iter().find(|p| name.ends_with(&format!(".{p}.weight"))).map(|_| name.trim_end_matches(".weight").to_string())
}

/// A ternary tensor as codes with one scale per block, times `extra`.
struct Ternary {
    codes: Vec<i8>,
    block: usize,
    scales: Vec<f32>,
    extra: f32,
}

impl Ternary {
    fn read(w: &WeightView, extra: f32, name: &str, warnings: &mut Vec<String>) -> Ternary {
        let (n, k) = (w.rows(), w.row_len());
        let mut codes = vec![0i8; n * k];
        let mut scales = Vec::new();
        if w.dtype.is_ternary() {
            let mut block = k;
            let mut row_scales = Vec::new();
            for r in 0..n {
                block = w.row(r).ternary(&mut codes[r * k..(r + 1) * k], &mut row_scales);
                scales.extend_from_slice(&row_scales);
            }
            return Ternary { codes, block, scales, extra };
        }
        // Float values: ternary times one β as written by converters, or
        // master weights, which are quantized with absmean.
        let values = w.to_f32();
        let beta = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let exact = beta > 0.0 && values.iter().all(|&v| v == 0.0 || (v.abs() - beta).abs() <= beta * 1e-3);
        let (codes, beta) = if exact {
            (values.iter().map(|&v| (v / beta).round() as i8).collect(), beta)
        } else {
            warnings.push(format!("{name}: float weights are not ternary; quantized with absmean"));
            crate::hf::absmean(&values)
        };
        Ternary { codes, block: n * k, scales: vec![beta], extra }
    }

    /// The one scale of every block that has a non-zero code, if they agree.
    fn uniform_scale(&self) -> Option<f32> {
        let mut d = None;
        for (c, &s) in self.codes.chunks(self.block).zip(&self.scales) {
            if c.iter().any(|&x| x != 0) {
                match d {
                    None => d = Some(s),
                    Some(prev) if prev != s => return None,
                    _ => {}
                }
            }
        }
        Some(d.unwrap_or(1.0))
    }

    /// Moves `extra` into the block scales.
    fn fold_extra(&mut self) {
        self.scales.iter_mut().for_each(|s| *s *= self.extra);
        self.extra = 1.0;
    }

    /// Permutes rows as [`permute_rows`] does, with their block scales when
    /// blocks lie within rows.
    fn permute_rows(&mut self, heads: usize, k: usize) {
        let rows = self.codes.len() / k;
        let order = row_permutation(rows, heads);
        let mut codes = vec![0i8; self.codes.len()];
        for (dst, &src) in order.iter().enumerate() {
            codes[dst * k..(dst + 1) * k].copy_from_slice(&self.codes[src * k..(src + 1) * k]);
        }
        self.codes = codes;
        if self.block <= k {
            let per_row = k / self.block;
            let scales = self.scales.clone();
            for (dst, &src) in order.iter().enumerate() {
                self.scales[dst * per_row..(dst + 1) * per_row].copy_from_slice(&scales[src * per_row..(src + 1) * per_row]);
            }
        }
    }

    fn values(&self) -> Vec<f32> {
        self.codes.iter().enumerate().map(|(i, &c)| c as f32 * self.scales[i / self.block] * self.extra).collect()
    }
}

/// The source row of each row when q/k rows go from HF's rotate-half
/// order to llama.cpp's interleaved order: within each head, row 2i ← i and
/// 2i+1 ← i + d/2.
fn row_permutation(rows: usize, heads: usize) -> Vec<usize> {
    let d = rows / heads;
    (0..rows).map(|r| (r / d) * d + if r % 2 == 0 { (r % d) / 2 } else { (r % d) / 2 + d / 2 }).collect()
}

fn permute_rows(data: &[f32], rows: usize, k: usize, heads: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for (dst, src) in row_permutation(rows, heads).into_iter().enumerate() {
        out[dst * k..(dst + 1) * k].copy_from_slice(&data[src * k..(src + 1) * k]);
    }
    out
}

enum Plan {
    /// A BitLinear projection to `weight_type`; `scale` says where its
    /// per-tensor scale goes for TQ types.
    Ternary { source: String, scale_extra: Option<String>, permute_heads: Option<usize> },
    /// The scale tensor that goes with the TQ projection written just before.
    Scale,
    /// A float tensor to `dtype`, q/k rows permuted for `heads` if set.
    Float { source: String, permute_heads: Option<usize> },
}

/// The metadata of a GGUF file holding `model` under the architecture name
/// `arch`: its hyper-parameters, FFN activation and tokenizer (padded to the
/// embedding's rows).
pub fn metadata(model: &Model, arch: &str) -> Result<Vec<(String, MetaValue)>, String> {
    let c = &model.config;
    let mut vocab = match &model.source {
        ModelSource::Gguf(f) => VocabParts::from_gguf(f),
        ModelSource::Hf(hf) => VocabParts::from_hf(&hf.dir.join("tokenizer.json")),
    }
    .map_err(|e| e.to_string())?;
    if vocab.tokens.len() > c.vocab {
        return Err(format!("the tokenizer has {} tokens but the embedding only {} rows", vocab.tokens.len(), c.vocab));
    }
    while vocab.tokens.len() < c.vocab {
        vocab.tokens.push(format!("<|pad_{}|>", vocab.tokens.len()));
        vocab.types.push(3);
        if !vocab.scores.is_empty() {
            vocab.scores.push(0.0);
        }
    }
    let mut m = vec![("general.architecture".to_string(), MetaValue::String(arch.into()))];
    let name = match &model.source {
        ModelSource::Gguf(f) => f.get("general.name").and_then(MetaValue::as_str).map(String::from),
        ModelSource::Hf(hf) => hf.config["_name_or_path"].as_str().map(String::from).or_else(|| hf.dir.file_name().map(|n| n.to_string_lossy().into_owned())),
    };
    m.push(("general.name".into(), MetaValue::String(name.unwrap_or_else(|| "converted by bitnet-rs".into()))));
    m.extend(c.gguf_metadata(arch));
    let default = Arch::from_name(arch).map_or(c.activation, Arch::default_activation);
    if c.activation != default || (arch == "bitnet" && c.activation == Activation::Relu2) {
        m.push((format!("{arch}.hidden_activation"), MetaValue::String(c.activation.name().into())));
    }
    m.extend(vocab.to_gguf());
    Ok(m)
}

/// Converts `model` to a GGUF file at `out`; returns warnings.
pub fn convert(model: &Model, opts: &ConvertOptions, out: &Path, mut progress: impl FnMut(usize, usize)) -> Result<Vec<String>, String> {
    let c = &model.config;
    let t = opts.weight_type;
    let bitnet = c.bitlinear;
    let mut warnings = Vec::new();
    if !bitnet && t.is_ternary() {
        return Err(format!("--type {t}: {} is not a ternary model; use f32, f16 or bf16", c.arch_name));
    }
    if !matches!(t, DType::I2S | DType::TQ1_0 | DType::TQ2_0 | DType::F32 | DType::F16 | DType::BF16) {
        return Err(format!("--type {t} is not a conversion target (i2_s, tq2_0, tq1_0, f32, f16, bf16)"));
    }
    if let Some(h) = opts.head_type {
        if h.is_ternary() || !h.is_weight() {
            return Err(format!("--head-type {h} is not an embedding type (f32, f16, bf16, q8_0, q6_k, q4_k)"));
        }
    }
    // The architecture name the target engine reads.
    let arch = match (c.arch, c.activation, t) {
        (Arch::Llama, ..) => "llama",
        (_, Activation::Relu2, DType::I2S) => "bitnet-b1.58",
        (_, Activation::Relu2, _) => {
            warnings.push(format!(
                "this model's FFN activation is squared ReLU; upstream llama.cpp's `bitnet` graph computes SiLU, so llama.cpp will run this {t} file with the wrong activation (bitnet-rs reads bitnet.hidden_activation and runs it right; bitnet.cpp reads --type i2_s files as bitnet-b1.58)"
            ));
            "bitnet"
        }
        _ => "bitnet",
    };
    let permute = c.arch == Arch::Llama && c.rope_mode == RopeMode::Neox;
    // llama.cpp's and bitnet.cpp's `llama` graphs apply no `.scale`
    // tensors: there β goes into the TQ blocks (as f16).
    let scale_tensors = arch != "llama";
    let mut w = GgufWriter::new();
    for (k, v) in metadata(model, arch)? {
        w.set(&k, v);
    }

    // The heads whose q/k rows are permuted for interleaved RoPE, checked
    // against the tensor's rows.
    let rope_heads = |name: &str, shape: &[usize]| -> Result<Option<usize>, String> {
        let heads = match name {
            n if permute && n.ends_with(".attn_q.weight") => c.heads,
            n if permute && n.ends_with(".attn_k.weight") => c.kv_heads,
            _ => return Ok(None),
        };
        if shape.first() != Some(&(heads * c.head_dim)) {
            return Err(format!("{name}: shape {shape:?} does not have {heads} heads of {} rows", c.head_dim));
        }
        Ok(Some(heads))
    };
    let mut plans = Vec::new();
    for tensor in &model.tensors {
        let name = &tensor.name;
        if name.ends_with(".scale") {
            continue; // folded into its projection
        }
        let is_head = name == "token_embd.weight" || name == "output.weight";
        match projection(name).filter(|_| bitnet) {
            Some(p) => {
                let scale_extra = model.tensor(&format!("{p}.scale")).map(|s| s.name.clone());
                let permute_heads = rope_heads(name, &tensor.shape)?;
                w.add_tensor(name, t, &tensor.shape);
                plans.push(Plan::Ternary { source: name.clone(), scale_extra: scale_extra.clone(), permute_heads });
                if t.is_ternary() && t != DType::I2S && scale_tensors {
                    w.add_tensor(&format!("{p}.scale"), DType::F32, &[1]);
                    plans.push(Plan::Scale);
                }
            }
            None => {
                let dtype = if tensor.shape.len() == 1 {
                    DType::F32
                } else if is_head {
                    opts.head_type.unwrap_or(match tensor.dtype {
                        DType::BF16 if matches!(model.source, ModelSource::Hf(_)) => DType::F16,
                        d if d.is_ternary() => DType::F16,
                        d => d,
                    })
                } else if t.is_ternary() {
                    tensor.dtype
                } else {
                    t
                };
                let permute_heads = rope_heads(name, &tensor.shape)?;
                w.add_tensor(name, dtype, &tensor.shape);
                plans.push(Plan::Float { source: name.clone(), permute_heads });
            }
        }
    }
    for (name, dtype, shape) in &w.tensors {
        let k = *shape.last().unwrap_or(&1);
        if k % dtype.block_elems() != 0 {
            let mut msg = format!("{name}: row length {k} is not a multiple of {}'s block of {}", dtype, dtype.block_elems());
            if dtype.is_ternary() {
                // bitnet_b1_58-3B's FFN of 8640: bitnet.cpp runs it only with
                // its TL1/TL2 kernels, llama.cpp's TQ types cannot hold it.
                msg += "; neither bitnet.cpp's I2_S nor llama.cpp's TQ types hold such rows. bitnet-rs runs the model from its Hugging Face folder, and `bitnet compile` makes an artifact of it";
            }
            return Err(msg);
        }
    }

    let total = plans.len();
    let tensors = w.tensors.clone();
    let mut warn_inner = Vec::new();
    // The per-tensor scale of the last ternary projection, for its TQ scale tensor.
    let mut last_scale = 1.0f32;
    let scalar = |name: &Option<String>| -> f32 { name.as_ref().and_then(|n| model.weight(n)).map_or(1.0, |s| s.to_f32()[0]) };
    w.write_file(out, |i| {
        progress(i, total);
        let (name, dtype, _) = &tensors[i];
        let bytes = match &plans[i] {
            Plan::Ternary { source, scale_extra, permute_heads } => {
                let mut tern = Ternary::read(&model.weight(source).unwrap(), scalar(scale_extra), source, &mut warn_inner);
                if let Some(h) = permute_heads {
                    tern.permute_rows(*h, tensors[i].2[1]);
                }
                if !scale_tensors {
                    tern.fold_extra();
                }
                last_scale = tern.uniform_scale().map_or(tern.extra, |d| d * tern.extra);
                match (dtype, tern.uniform_scale()) {
                    (DType::I2S, Some(d)) => quant::pack_i2s(&tern.codes, d * tern.extra),
                    (DType::I2S, None) => {
                        return Err(std::io::Error::other(format!("{name}: its blocks have different scales, which I2_S (one scale per tensor) cannot hold")))
                    }
                    (t, Some(d)) if t.is_ternary() => {
                        let block_scale = if scale_tensors { 1.0 } else { d * tern.extra };
                        quant::pack_ternary(*t, &tern.codes, &vec![block_scale; tern.codes.len() / t.block_elems()])
                    }
                    (t, None) if t.is_ternary() => {
                        let per = t.block_elems();
                        let scales: Vec<f32> = (0..tern.codes.len() / per).map(|b| tern.scales[b * per / tern.block]).collect();
                        quant::pack_ternary(*t, &tern.codes, &scales)
                    }
                    (t, _) => quant::quantize(*t, &tern.values()),
                }
            }
            Plan::Scale => last_scale.to_le_bytes().to_vec(),
            Plan::Float { source, permute_heads } => {
                let wv = model.weight(source).unwrap();
                if wv.dtype == *dtype && permute_heads.is_none() {
                    wv.data[..dtype.bytes_for(wv.elems()).unwrap()].to_vec()
                } else {
                    let mut v = wv.to_f32();
                    if let Some(h) = permute_heads {
                        v = permute_rows(&v, wv.rows(), wv.row_len(), *h);
                    }
                    quant::quantize(*dtype, &v)
                }
            }
        };
        Ok(bytes)
    })
    .map_err(|e| format!("writing {}: {e}", out.display()))?;
    progress(total, total);
    warnings.extend(warn_inner);
    Ok(warnings)
}
