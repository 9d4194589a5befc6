//! The published BitNet b1.58 model families: each one's configuration as
//! its `config.json` gives it, how its checkpoint stores the BitLinear
//! weights, its vocabulary, special tokens and chat template, and the GGUF
//! architecture name bitnet.cpp's converter writes for it. Sources for
//! every value: docs/model-families.md.
//!
//! [`infer`] says which family a loaded model is, from its structure and
//! dimensions (a reduced-size model made by `bitnet synth --family` also
//! carries the family's name, which [`infer`] reads).

use crate::arch::Activation;
use crate::chat;
use crate::gguf::MetaValue;
use crate::hf::ScaleDirection;
use crate::model::{Model, ModelConfig, ModelSource};

/// How a family's checkpoint stores its BitLinear projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weights {
    /// uint8 `[out/4, in]`, four ternary codes per byte, and a
    /// `weight_scale` per projection (Transformers' BitNet integration).
    Packed(ScaleDirection),
    /// Full-precision master weights, made ternary (absmean) at load.
    Master,
}

/// The vocabulary a family's tokenizer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vocab {
    /// LLaMA-3's byte-level BPE (128256 tokens).
    Llama3,
    /// LLaMA-2's SentencePiece (32000) plus `<pad>` and `</line>`.
    Llama2Spm,
    /// Falcon3's byte-level BPE (131072 tokens).
    Falcon3,
}

/// A family's dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context: usize,
}

/// One published family.
#[derive(Clone, Debug)]
pub struct Family {
    /// The name `bitnet synth --family` takes and `bitnet inspect` prints.
    pub name: &'static str,
    /// The Hugging Face repository.
    pub repo: &'static str,
    /// `architectures[0]` in `config.json`.
    pub hf_arch: &'static str,
    /// `general.architecture` as bitnet.cpp's converter writes it.
    pub gguf_arch: &'static str,
    /// The published dimensions; `None` where this project could not read
    /// the family's `config.json` (Falcon-E).
    pub dims: Option<Dims>,
    /// The same structure at a size that runs instantly: the same head
    /// size and head ratios, rows that fit I2_S's and TQ's blocks, a
    /// vocabulary of at least 512 tokens.
    pub tiny: Dims,
    pub rope_theta: f32,
    pub norm_eps: f32,
    pub activation: Activation,
    pub tied: bool,
    pub sub_norms: bool,
    pub weights: Weights,
    pub vocab: Vocab,
    /// `config.json`'s `head_dim`, for the families that state it.
    pub states_head_dim: bool,
    pub bos: Option<&'static str>,
    pub eos: &'static str,
    /// The token that ends an assistant turn.
    pub end_of_turn: &'static str,
    pub add_bos: bool,
    pub chat_template: Option<&'static str>,
}

const BITNET_2B4T: Family = Family {
    name: "bitnet-2b4t",
    repo: "microsoft/bitnet-b1.58-2B-4T",
    hf_arch: "BitNetForCausalLM",
    gguf_arch: "bitnet-b1.58",
    dims: Some(Dims { hidden: 2560, layers: 30, heads: 20, kv_heads: 5, head_dim: 128, ffn: 6912, vocab: 128256, context: 4096 }),
    tiny: Dims { hidden: 256, layers: 2, heads: 4, kv_heads: 1, head_dim: 64, ffn: 768, vocab: 512, context: 4096 },
    rope_theta: 500000.0,
    norm_eps: 1e-5,
    activation: Activation::Relu2,
    tied: true,
    sub_norms: true,
    weights: Weights::Packed(ScaleDirection::Multiply),
    vocab: Vocab::Llama3,
    states_head_dim: false,
    bos: Some("<|begin_of_text|>"),
    eos: "<|end_of_text|>",
    end_of_turn: "<|eot_id|>",
    add_bos: true,
    chat_template: Some(chat::BITNET_2B4T_TEMPLATE),
};

const BITNET_LARGE: Family = Family {
    name: "bitnet-large",
    repo: "1bitLLM/bitnet_b1_58-large",
    hf_arch: "BitnetForCausalLM",
    gguf_arch: "bitnet",
    dims: Some(Dims { hidden: 1536, layers: 24, heads: 16, kv_heads: 16, head_dim: 96, ffn: 4096, vocab: 32002, context: 2048 }),
    tiny: Dims { hidden: 256, layers: 2, heads: 4, kv_heads: 4, head_dim: 64, ffn: 768, vocab: 514, context: 2048 },
    rope_theta: 10000.0,
    norm_eps: 1e-5,
    activation: Activation::Silu,
    tied: true,
    sub_norms: true,
    weights: Weights::Master,
    vocab: Vocab::Llama2Spm,
    states_head_dim: false,
    bos: Some("<s>"),
    eos: "</s>",
    end_of_turn: "</s>",
    add_bos: true,
    chat_template: None,
};

const LLAMA3_8B: Family = Family {
    name: "llama3-8b-1.58",
    repo: "HF1BitLLM/Llama3-8B-1.58-100B-tokens",
    hf_arch: "LlamaForCausalLM",
    gguf_arch: "llama",
    dims: Some(Dims { hidden: 4096, layers: 32, heads: 32, kv_heads: 8, head_dim: 128, ffn: 14336, vocab: 128256, context: 8192 }),
    tiny: Dims { hidden: 256, layers: 2, heads: 4, kv_heads: 1, head_dim: 64, ffn: 768, vocab: 512, context: 8192 },
    rope_theta: 500000.0,
    norm_eps: 1e-5,
    activation: Activation::Silu,
    tied: false,
    sub_norms: false,
    weights: Weights::Packed(ScaleDirection::Divide),
    vocab: Vocab::Llama3,
    states_head_dim: false,
    bos: Some("<|begin_of_text|>"),
    eos: "<|eot_id|>",
    end_of_turn: "<|eot_id|>",
    add_bos: true,
    chat_template: Some(chat::LLAMA3_8B_158_TEMPLATE),
};

const FALCON3_1B: Family = Family {
    name: "falcon3-1b",
    repo: "tiiuae/Falcon3-1B-Instruct-1.58bit",
    hf_arch: "LlamaForCausalLM",
    gguf_arch: "llama",
    dims: Some(Dims { hidden: 2048, layers: 18, heads: 8, kv_heads: 4, head_dim: 256, ffn: 8192, vocab: 131072, context: 8192 }),
    tiny: Dims { hidden: 512, layers: 2, heads: 2, kv_heads: 1, head_dim: 256, ffn: 1024, vocab: 512, context: 8192 },
    rope_theta: 1000042.0,
    norm_eps: 1e-6,
    activation: Activation::Silu,
    tied: false,
    sub_norms: false,
    weights: Weights::Packed(ScaleDirection::Divide),
    vocab: Vocab::Falcon3,
    states_head_dim: true,
    bos: None,
    eos: "<|endoftext|>",
    end_of_turn: "<|endoftext|>",
    add_bos: false,
    chat_template: Some(chat::FALCON3_TEMPLATE),
};

const FALCON_E_1B: Family = Family {
    name: "falcon-e-1b",
    repo: "tiiuae/Falcon-E-1B-Instruct",
    hf_arch: "LlamaForCausalLM",
    gguf_arch: "llama",
    dims: None,
    tiny: FALCON3_1B.tiny,
    chat_template: None,
    ..FALCON3_1B
};

/// Every family `--family` names, in bitnet.cpp's order.
pub const FAMILIES: [Family; 10] = [
    BITNET_2B4T,
    BITNET_LARGE,
    Family {
        name: "bitnet-3b",
        repo: "1bitLLM/bitnet_b1_58-3B",
        dims: Some(Dims { hidden: 3200, layers: 26, heads: 32, kv_heads: 32, head_dim: 100, ffn: 8640, vocab: 32002, context: 2048 }),
        // Its FFN rows are not whole I2_S blocks (8640 = 67.5 x 128): the
        // tiny shape keeps that (864 = 6.75 x 128).
        tiny: Dims { hidden: 256, layers: 2, heads: 4, kv_heads: 4, head_dim: 64, ffn: 864, vocab: 514, context: 2048 },
        ..BITNET_LARGE
    },
    LLAMA3_8B,
    FALCON3_1B,
    Family {
        name: "falcon3-3b",
        repo: "tiiuae/Falcon3-3B-Instruct-1.58bit",
        dims: Some(Dims { hidden: 3072, layers: 22, heads: 12, kv_heads: 4, head_dim: 256, ffn: 9216, vocab: 131072, context: 4096 }),
        tiny: Dims { hidden: 768, layers: 2, heads: 3, kv_heads: 1, head_dim: 256, ffn: 1536, vocab: 512, context: 4096 },
        ..FALCON3_1B
    },
    Family {
        name: "falcon3-7b",
        repo: "tiiuae/Falcon3-7B-Instruct-1.58bit",
        dims: Some(Dims { hidden: 3072, layers: 28, heads: 12, kv_heads: 4, head_dim: 256, ffn: 23040, vocab: 131072, context: 8192 }),
        tiny: Dims { hidden: 768, layers: 2, heads: 3, kv_heads: 1, head_dim: 256, ffn: 1536, vocab: 512, context: 8192 },
        ..FALCON3_1B
    },
    Family {
        name: "falcon3-10b",
        repo: "tiiuae/Falcon3-10B-Instruct-1.58bit",
        dims: Some(Dims { hidden: 3072, layers: 40, heads: 12, kv_heads: 4, head_dim: 256, ffn: 23040, vocab: 131072, context: 32768 }),
        tiny: Dims { hidden: 768, layers: 2, heads: 3, kv_heads: 1, head_dim: 256, ffn: 1536, vocab: 512, context: 32768 },
        ..FALCON3_1B
    },
    FALCON_E_1B,
    Family { name: "falcon-e-3b", repo: "tiiuae/Falcon-E-3B-Instruct", ..FALCON_E_1B },
];

pub fn by_name(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name.eq_ignore_ascii_case(name))
}

pub fn names() -> Vec<&'static str> {
    FAMILIES.iter().map(|f| f.name).collect()
}

impl Family {
    /// The dimensions `bitnet synth --size` asks for, or why there are none.
    pub fn dims_for(&self, full: bool) -> Result<Dims, String> {
        if !full {
            return Ok(self.tiny);
        }
        self.dims.ok_or_else(|| {
            format!(
                "{}: its config.json (dimensions, vocabulary, RoPE base) was not available to this project (docs/model-families.md), \
                 so there is no full-size shape to write; bitnet-rs reads Falcon-E checkpoints like Falcon3's (LlamaForCausalLM, \
                 quant_method bitnet), and --size tiny writes that structure",
                self.name
            )
        })
    }

    /// Whether a model has this family's structure (whatever its size).
    fn same_structure(&self, c: &ModelConfig) -> bool {
        c.bitlinear && c.sub_norms == self.sub_norms && c.activation == self.activation && c.tied_head == self.tied
    }

    fn same_dims(&self, c: &ModelConfig) -> bool {
        self.dims.is_some_and(|d| {
            (d.hidden, d.layers, d.heads, d.kv_heads, d.head_dim, d.ffn, d.vocab) == (c.hidden, c.layers, c.heads, c.kv_heads, c.head_dim, c.ffn, c.vocab)
        })
    }
}

/// How a family was recognized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    /// Structure and every published dimension agree.
    Exact,
    /// The structure agrees and the file names the family (a reduced-size
    /// model from `bitnet synth --family`, or a Falcon-E pre-tokenizer).
    Named,
}

/// Which published family `model` is, if any.
pub fn infer(model: &Model) -> Option<(&'static Family, Match)> {
    infer_from(&model.config, &hints(model))
}

/// [`infer`] from a configuration and the text that may name the family.
pub fn infer_from(c: &ModelConfig, hints: &str) -> Option<(&'static Family, Match)> {
    let candidates: Vec<&Family> = FAMILIES.iter().filter(|f| f.same_structure(c)).collect();
    if let Some(f) = candidates.iter().find(|f| f.same_dims(c)) {
        return Some((f, Match::Exact));
    }
    let hints = hints.to_lowercase();
    // Longest names first: falcon3-10b before falcon3-1b.
    let mut named: Vec<&&Family> = candidates.iter().filter(|f| hints.contains(f.name)).collect();
    named.sort_by_key(|f| std::cmp::Reverse(f.name.len()));
    if let Some(f) = named.first() {
        return Some((f, Match::Named));
    }
    if hints.contains("falcon_e") {
        let name = if c.layers >= 32 { "falcon-e-3b" } else { "falcon-e-1b" };
        return by_name(name).filter(|f| f.same_structure(c)).map(|f| (f, Match::Named));
    }
    None
}

/// Text that may name a family: the GGUF file's name and pre-tokenizer,
/// the HF config's `_name_or_path` and the folder's name (as the Hub's
/// `Falcon-E-1B-Instruct` is downloaded).
fn hints(model: &Model) -> String {
    match &model.source {
        ModelSource::Gguf(f) => {
            ["general.name", "general.basename", "tokenizer.ggml.pre"].iter().filter_map(|k| f.get(k).and_then(MetaValue::as_str)).collect::<Vec<_>>().join(" ")
        }
        ModelSource::Hf(hf) => {
            let folder = hf.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            format!("{} {folder}", hf.config["_name_or_path"].as_str().unwrap_or(""))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_tiny_shapes_are_valid() {
        let mut seen = std::collections::HashSet::new();
        for f in &FAMILIES {
            assert!(seen.insert(f.name), "{}", f.name);
            let t = f.tiny;
            assert!(t.vocab >= 512, "{}", f.name);
            assert_eq!(t.heads % t.kv_heads, 0, "{}", f.name);
            // I2_S and TQ rows, but where the published shape has none (bitnet-3b's FFN).
            let whole = |k: usize, full: Option<usize>| k.is_multiple_of(256) || full.is_some_and(|k| !k.is_multiple_of(128));
            assert!(whole(t.hidden, None) && whole(t.ffn, f.dims.map(|d| d.ffn)) && (t.heads * t.head_dim) % 256 == 0, "{}: I2_S and TQ rows", f.name);
            if let Some(d) = f.dims {
                assert_eq!(d.heads % d.kv_heads, 0, "{}", f.name);
                assert_eq!(t.head_dim * t.heads == t.hidden, d.head_dim * d.heads == d.hidden, "{}: the tiny shape keeps q = hidden or not", f.name);
            }
        }
        assert_eq!(by_name("bitnet-2b4t").unwrap().dims.unwrap().hidden, 2560);
        assert_eq!(by_name("FALCON3-7B").unwrap().name, "falcon3-7b");
        assert!(by_name("falcon-e-1b").unwrap().dims_for(true).unwrap_err().contains("config.json"));
    }

    fn config(f: &Family, d: Dims) -> ModelConfig {
        ModelConfig {
            arch: if f.sub_norms { crate::arch::Arch::BitNet } else { crate::arch::Arch::Llama },
            arch_name: f.gguf_arch.into(),
            hidden: d.hidden,
            layers: d.layers,
            heads: d.heads,
            kv_heads: d.kv_heads,
            head_dim: d.head_dim,
            ffn: d.ffn,
            vocab: d.vocab,
            context: d.context,
            rope_theta: f.rope_theta,
            rope_mode: bitnet_ir::RopeMode::Neox,
            norm_eps: f.norm_eps,
            activation: f.activation,
            tied_head: f.tied,
            bitlinear: true,
            sub_norms: f.sub_norms,
        }
    }

    #[test]
    fn published_shapes_are_recognized_exactly_and_reduced_ones_by_name() {
        for f in FAMILIES.iter().filter(|f| f.dims.is_some()) {
            let c = config(f, f.dims.unwrap());
            assert_eq!(infer_from(&c, "").map(|(g, m)| (g.name, m)), Some((f.name, Match::Exact)), "{}", f.name);
            let tiny = config(f, f.tiny);
            assert_eq!(infer_from(&tiny, "").map(|(g, _)| g.name), None, "{}: a small shape alone names no family", f.name);
            let hint = format!("bitnet-rs/synth-{}-tiny", f.name);
            assert_eq!(infer_from(&tiny, &hint).map(|(g, m)| (g.name, m)), Some((f.name, Match::Named)), "{}", f.name);
            // A float model of the same shape is not a BitNet family.
            assert_eq!(infer_from(&ModelConfig { bitlinear: false, ..c }, "").map(|(g, _)| g.name), None, "{}", f.name);
        }
        // Falcon-E's GGUF pre-tokenizer names it; its layer count, the size.
        let e = config(&FALCON_E_1B, Dims { hidden: 2048, layers: 32, heads: 8, kv_heads: 4, head_dim: 256, ffn: 8192, vocab: 65536, context: 2048 });
        assert_eq!(infer_from(&e, "falcon_e").map(|(g, _)| g.name), Some("falcon-e-3b"));
        // The wrong activation for the name is not that family.
        let wrong = ModelConfig { activation: Activation::Relu2, ..config(&FALCON3_1B, FALCON3_1B.tiny) };
        assert_eq!(infer_from(&wrong, "synth-falcon3-1b").map(|(g, _)| g.name), None);
    }
}
