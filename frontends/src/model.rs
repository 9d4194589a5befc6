//! A model file opened for running: its hyper-parameters, its weights
//! (memory-mapped, served to the interpreter by name) and its IR graph.

use crate::arch::{self, Activation, Arch, GraphOptions, Logits};
use crate::gguf::{GgufError, GgufFile, MetaValue};
use crate::hf::{self, HfFolder};
use crate::tokenizer::{Tokenizer, TokenizerError};
use bitnet_ir::interp::{WeightSource, WeightView};
use bitnet_ir::DType;
use bitnet_ir::{Graph, RopeMode};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T, ModelError> {
    Err(ModelError::Invalid(msg.into()))
}

/// Hyper-parameters, read from `<arch>.*` keys.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    /// The architecture name as the file gives it.
    pub arch_name: String,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context: usize,
    pub rope_theta: f32,
    pub rope_mode: RopeMode,
    pub norm_eps: f32,
    pub activation: Activation,
    /// True when the head is `token_embd` (no `output.weight`).
    pub tied_head: bool,
    /// The projections are BitLinear: ternary weights, inputs quantized per
    /// token to int8 (every BitNet b1.58 model, whatever its arch name).
    pub bitlinear: bool,
    /// RMS norms before `o_proj` and `down_proj` (`attn_sub_norm`,
    /// `ffn_sub_norm`): 2B4T and the 1bitLLM models have them; the
    /// `LlamaForCausalLM` checkpoints (Falcon3, Llama3-8B-1.58) do not.
    pub sub_norms: bool,
}

/// Where a model came from.
pub enum ModelSource {
    Gguf(GgufFile),
    Hf(HfFolder),
}

/// Where a tensor's bytes are.
pub(crate) enum TensorData {
    /// Tensor `i` of the GGUF file.
    Gguf(usize),
    /// A byte range of an HF shard.
    Hf { shard: usize, start: usize, end: usize },
    /// Converted at load (HF ternary projections).
    Owned(Vec<u8>),
}

/// A tensor of the model under its GGUF name, row-major shape.
pub struct ModelTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub(crate) data: TensorData,
}

impl ModelConfig {
    /// The `<arch>.*` hyper-parameter keys that llama.cpp and this reader use.
    pub fn gguf_metadata(&self, arch: &str) -> Vec<(String, MetaValue)> {
        let mut m: Vec<(String, MetaValue)> = [
            ("vocab_size", self.vocab),
            ("context_length", self.context),
            ("embedding_length", self.hidden),
            ("block_count", self.layers),
            ("feed_forward_length", self.ffn),
            ("attention.head_count", self.heads),
            ("attention.head_count_kv", self.kv_heads),
            ("rope.dimension_count", self.head_dim),
            ("attention.key_length", self.head_dim),
            ("attention.value_length", self.head_dim),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{arch}.{k}"), MetaValue::U32(v as u32)))
        .collect();
        m.push((format!("{arch}.rope.freq_base"), MetaValue::F32(self.rope_theta)));
        m.push((format!("{arch}.attention.layer_norm_rms_epsilon"), MetaValue::F32(self.norm_eps)));
        m
    }
}

pub struct Model {
    pub source: ModelSource,
    pub config: ModelConfig,
    pub tensors: Vec<ModelTensor>,
    index: HashMap<String, usize>,
}

fn get_usize(f: &GgufFile, key: &str) -> Result<Option<usize>, ModelError> {
    match f.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) => usize::try_from(n).map(Some).map_err(|_| ModelError::Invalid(format!("{key} = {n} is too large"))),
            None => invalid(format!("{key} should be an integer, got {v}")),
        },
    }
}

fn get_f32(f: &GgufFile, key: &str) -> Result<Option<f32>, ModelError> {
    match f.get(key) {
        None => Ok(None),
        Some(v) => v.as_f64().map(|x| Some(x as f32)).ok_or_else(|| ModelError::Invalid(format!("{key} should be a number, got {v}"))),
    }
}

impl Model {
    /// Opens a GGUF file or a Hugging Face model folder.
    pub fn open(path: &Path) -> Result<Model, ModelError> {
        if path.is_dir() {
            let hf = HfFolder::open(path)?;
            let config = hf::read_config(&hf)?;
            let tensors = hf::tensors(&hf, &config)?;
            return Ok(Self::with_tensors(ModelSource::Hf(hf), config, tensors));
        }
        let file = GgufFile::open(path).map_err(|e| match e {
            GgufError::Io(io) => ModelError::Invalid(format!("cannot read {}: {io}", path.display())),
            other => ModelError::Gguf(other),
        })?;
        Self::from_file(file)
    }

    pub fn from_file(file: GgufFile) -> Result<Model, ModelError> {
        let config = read_config(&file)?;
        let tensors = file
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| ModelTensor { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone(), data: TensorData::Gguf(i) })
            .collect();
        Ok(Self::with_tensors(ModelSource::Gguf(file), config, tensors))
    }

    fn with_tensors(source: ModelSource, config: ModelConfig, tensors: Vec<ModelTensor>) -> Model {
        let index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Model { source, config, tensors, index }
    }

    /// The GGUF file, for a model read from one.
    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.source {
            ModelSource::Gguf(f) => Some(f),
            ModelSource::Hf(_) => None,
        }
    }

    /// The model's tokenizer: from GGUF metadata or `tokenizer.json`.
    pub fn tokenizer(&self) -> Result<Tokenizer, TokenizerError> {
        match &self.source {
            ModelSource::Gguf(f) => Tokenizer::from_gguf(f),
            ModelSource::Hf(hf) => {
                let json = hf.dir.join("tokenizer.json");
                if !json.exists() && hf.dir.join("tokenizer.model").exists() {
                    return Err(TokenizerError(format!(
                        "{} has tokenizer.model (SentencePiece) but no tokenizer.json, which is what bitnet-rs reads; \
                         write one with transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)",
                        hf.dir.display()
                    )));
                }
                let mut t = Tokenizer::from_hf_file(&json)?;
                t.add_generation_config(&hf.dir.join("generation_config.json"));
                Ok(t)
            }
        }
    }

    pub fn tensor(&self, name: &str) -> Option<&ModelTensor> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor.
    pub fn data<'a>(&'a self, t: &'a ModelTensor) -> &'a [u8] {
        match (&t.data, &self.source) {
            (TensorData::Gguf(i), ModelSource::Gguf(f)) => f.data(&f.tensors[*i]),
            (TensorData::Hf { shard, start, end }, ModelSource::Hf(hf)) => &hf.shards[*shard][*start..*end],
            (TensorData::Owned(v), _) => v,
            _ => unreachable!("tensor data and model source always match"),
        }
    }

    /// The IR graph: logits for every position (`all_logits`) or only the last.
    pub fn graph(&self, all_logits: bool) -> Result<Graph, ModelError> {
        let logits = if all_logits { Logits::All } else { Logits::Last };
        self.graph_with(&GraphOptions { logits, ..Default::default() })
    }

    /// The graph of a batched step: the rows of several sequences side by
    /// side (inputs `tokens` and `positions`), logits for the rows that
    /// `out_rows` names.
    pub fn step_graph(&self) -> Result<Graph, ModelError> {
        self.graph_with(&GraphOptions { logits: Logits::Picked, ..Default::default() })
    }

    pub fn graph_with(&self, opts: &GraphOptions) -> Result<Graph, ModelError> {
        arch::build_graph(self, opts)
    }

    pub(crate) fn tensor_shape(&self, name: &str) -> Option<(DType, &[usize])> {
        self.tensor(name).map(|t| (t.dtype, t.shape.as_slice()))
    }
}

impl WeightSource for Model {
    fn weight(&self, name: &str) -> Option<WeightView<'_>> {
        let t = self.tensor(name)?;
        Some(WeightView { dtype: t.dtype, shape: t.shape.clone(), data: self.data(t) })
    }

    fn release(&self, name: &str) {
        if let (Some(ModelTensor { data: TensorData::Gguf(i), .. }), ModelSource::Gguf(f)) = (self.tensor(name), &self.source) {
            f.release(&f.tensors[*i]);
        }
    }
}

fn read_config(f: &GgufFile) -> Result<ModelConfig, ModelError> {
    if f.tensors.is_empty() {
        return invalid("this is a vocabulary-only file (no tensors): it can be tokenized with and inspected, not run");
    }
    let Some(arch_name) = f.get("general.architecture").and_then(MetaValue::as_str) else {
        return invalid("general.architecture is missing");
    };
    let arch_name = arch_name.to_string();
    let Some(arch) = Arch::from_name(&arch_name) else {
        return invalid(format!("architecture {arch_name:?} is not supported (supported: llama, bitnet, bitnet-b1.58, bitnet-25)"));
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let need = |k: &str| -> Result<usize, ModelError> { get_usize(f, &key(k))?.ok_or_else(|| ModelError::Invalid(format!("metadata {} is missing", key(k)))) };
    let hidden = need("embedding_length")?;
    let layers = need("block_count")?;
    let heads = need("attention.head_count")?;
    let kv_heads = get_usize(f, &key("attention.head_count_kv"))?.unwrap_or(heads);
    let ffn = need("feed_forward_length")?;
    let context = get_usize(f, &key("context_length"))?.unwrap_or(2048);
    let rope_theta = get_f32(f, &key("rope.freq_base"))?.unwrap_or(10000.0);
    let norm_eps = get_f32(f, &key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5);
    let embd = f.tensor("token_embd.weight").map(|t| t.shape.clone());
    let vocab = match (get_usize(f, &key("vocab_size"))?, &embd) {
        (Some(v), _) => v,
        (None, Some(s)) if s.len() == 2 => s[0],
        _ => return invalid("cannot tell the vocabulary size: no vocab_size key and no 2-d token_embd.weight"),
    };
    let sane = |what: &str, v: usize, max: usize| -> Result<(), ModelError> {
        if v == 0 || v > max {
            return invalid(format!("{what} = {v} is out of range (1..={max})"));
        }
        Ok(())
    };
    sane("embedding_length", hidden, 1 << 16)?;
    sane("block_count", layers, 1024)?;
    sane("attention.head_count", heads, 1024)?;
    sane("attention.head_count_kv", kv_heads, heads)?;
    sane("feed_forward_length", ffn, 1 << 18)?;
    sane("vocab size", vocab, 1 << 22)?;
    sane("context_length", context, 1 << 24)?;
    if heads % kv_heads != 0 {
        return invalid(format!("{heads} heads / {kv_heads} kv heads do not divide evenly"));
    }
    // An explicit head size (Falcon3's 256) wins over hidden / heads.
    let head_dim = match get_usize(f, &key("attention.key_length"))? {
        Some(d) => d,
        None if hidden % heads == 0 => hidden / heads,
        None => return invalid(format!("{hidden} hidden / {heads} heads do not divide evenly and {} is missing", key("attention.key_length"))),
    };
    sane("attention.key_length", head_dim, 1 << 12)?;
    if let Some(v) = get_usize(f, &key("attention.value_length"))?.filter(|&v| v != head_dim) {
        return invalid(format!("{} = {v} differs from the key length {head_dim}, which this engine does not support", key("attention.value_length")));
    }
    if head_dim % 2 != 0 {
        return invalid(format!("head dim {head_dim} is odd; RoPE needs pairs"));
    }
    let activation = match [key("hidden_activation"), key("hidden_act")].iter().find_map(|k| f.get(k)) {
        Some(v) => match v.as_str().and_then(Activation::from_name) {
            Some(a) => a,
            None => return invalid(format!("unknown hidden activation {v}")),
        },
        None => arch.default_activation(),
    };
    Ok(ModelConfig {
        arch,
        arch_name,
        hidden,
        layers,
        heads,
        kv_heads,
        head_dim,
        ffn,
        vocab,
        context,
        rope_theta,
        rope_mode: arch.rope_mode(),
        norm_eps,
        activation,
        tied_head: f.tensor("output.weight").is_none(),
        // bitnet.cpp writes the LlamaForCausalLM BitNet checkpoints (Falcon3,
        // Falcon-E, Llama3-8B-1.58) as `llama` with ternary projections.
        bitlinear: arch.is_bitnet() || ternary_projections(f),
        sub_norms: arch.is_bitnet(),
    })
}

/// True when the first layer's projections are stored in a ternary type
/// (or packed for the compiled kernels, in an artifact).
fn ternary_projections(f: &GgufFile) -> bool {
    f.tensors.iter().any(|t| t.name.starts_with("blk.0.attn_q.weight") && (t.dtype.is_ternary() || t.name.ends_with("#packed")))
}
