//! What the exports do, in safe Rust over bytes and strings (so the host's
//! `cargo test` covers it): models and generations kept by handle, requests
//! and answers as JSON.

use bitnet_frontends::chat::{self, Message};
use bitnet_frontends::gguf::GgufFile;
use bitnet_frontends::model::{Model, ModelError};
use bitnet_runtime::{BackendKind, Engine, EngineOptions, GenerateOptions, KvType, LoadOptions, OutputFormat, SamplerConfig, TextGeneration};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

/// A handle: an index into a table, plus one (0 is never a handle).
pub type Handle = u32;

/// The models and generations alive in this instance.
///
/// ```
/// let mut s = bitnet_wasm::api::State::default();
/// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/models/stories260K/stories260K.gguf");
/// let model = s.load(std::fs::read(path)?, br#"{"context": 64}"#)?;
/// let g = s.start(model, br#"{"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}"#)?;
/// assert!(s.finish(g)?.contains(r#""text":", there was a little""#));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Default)]
pub struct State {
    models: Vec<Option<Arc<Engine>>>,
    generations: Vec<Option<Generation>>,
}

struct Generation {
    text: TextGeneration,
    prompt_tokens: usize,
    max_tokens: usize,
    context: usize,
    /// The trailing text was handed out (a stream ran to its end).
    tail_taken: bool,
}

/// How to load a model: all optional.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    /// Positions each sequence may hold [default: the model's training context].
    context: Option<usize>,
    /// Generations that may be open at once: with the context, it sizes the
    /// KV cache [default 1].
    parallel: Option<usize>,
    /// A built-in template's name (`chatml`, `llama3`, ...) or a Jinja template's text,
    /// used instead of the model's own.
    chat_template: Option<String>,
    /// How the KV cache holds keys and values: `f32` [default] or `f16`
    /// (half the memory, lossy).
    cache_type: Option<String>,
}

/// One generation: exactly one of `prompt` (text; BOS added as the model
/// asks), `prompt_ids` (used verbatim) and `messages` (rendered with the chat
/// template). Sampling defaults are the CLI's; `temperature: 0` is greedy.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    prompt: Option<String>,
    prompt_ids: Option<Vec<u32>>,
    messages: Option<Vec<MessageIn>>,
    #[serde(default = "defaults::max_tokens")]
    max_tokens: usize,
    #[serde(default = "defaults::temperature")]
    temperature: f32,
    #[serde(default = "defaults::top_k")]
    top_k: usize,
    #[serde(default = "defaults::top_p")]
    top_p: f32,
    #[serde(default = "defaults::min_p")]
    min_p: f32,
    #[serde(default = "defaults::repeat_penalty")]
    repeat_penalty: f32,
    seed: Option<u64>,
    #[serde(default)]
    stop: Stops,
    #[serde(default)]
    ignore_eos: bool,
    /// Token id to a bias added to its logit (OpenAI's `logit_bias`).
    #[serde(default)]
    logit_bias: std::collections::BTreeMap<u32, f32>,
    /// OpenAI's `response_format`: `json_object`, or `json_schema` with its schema.
    response_format: Option<serde_json::Value>,
    /// A GBNF grammar, as llama.cpp's (generation starts at its `root` rule).
    grammar: Option<String>,
}

mod defaults {
    use bitnet_runtime::SamplerConfig;
    pub fn max_tokens() -> usize {
        128
    }
    pub fn temperature() -> f32 {
        SamplerConfig::default().temperature
    }
    pub fn top_k() -> usize {
        SamplerConfig::default().top_k
    }
    pub fn top_p() -> f32 {
        SamplerConfig::default().top_p
    }
    pub fn min_p() -> f32 {
        SamplerConfig::default().min_p
    }
    pub fn repeat_penalty() -> f32 {
        SamplerConfig::default().repeat_penalty
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageIn {
    role: String,
    content: String,
}

/// `stop`: a string or a list of them.
#[derive(Default, Deserialize)]
#[serde(untagged)]
enum Stops {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Stops {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stops::None => Vec::new(),
            Stops::One(s) => vec![s],
            Stops::Many(v) => v,
        }
    }
}

fn parse<'a, T: Deserialize<'a>>(what: &str, json: &'a [u8]) -> Result<T, String> {
    serde_json::from_slice(json).map_err(|e| format!("bad {what} (JSON): {e}"))
}

fn slot<T>(table: &mut Vec<Option<T>>, value: T) -> Handle {
    match table.iter().position(Option::is_none) {
        Some(i) => {
            table[i] = Some(value);
            i as Handle + 1
        }
        None => {
            table.push(Some(value));
            table.len() as Handle
        }
    }
}

fn get<'a, T>(table: &'a mut [Option<T>], h: Handle, what: &str) -> Result<&'a mut T, String> {
    (h as usize).checked_sub(1).and_then(|i| table.get_mut(i)).and_then(Option::as_mut).ok_or_else(|| format!("no {what} with handle {h} (closed already?)"))
}

fn take<T>(table: &mut [Option<T>], h: Handle, what: &str) -> Result<T, String> {
    (h as usize).checked_sub(1).and_then(|i| table.get_mut(i)).and_then(Option::take).ok_or_else(|| format!("no {what} with handle {h} (closed already?)"))
}

impl State {
    /// Loads a GGUF file's bytes (taken, not copied) with `options` (a
    /// [`LoadRequest`] as JSON; empty for the defaults).
    pub fn load(&mut self, bytes: Vec<u8>, options: &[u8]) -> Result<Handle, String> {
        let t0 = Instant::now();
        let req: LoadRequest = if options.is_empty() { LoadRequest::default() } else { parse("load options", options)? };
        let kv_type = req.cache_type.as_deref().map_or(Ok(KvType::default()), str::parse)?;
        let chat_template = match req.chat_template {
            Some(t) if chat::BUILTIN_TEMPLATES.iter().any(|(n, _)| *n == t) => Some(chat::template_named(&t).map_err(|e| e.to_string())?),
            other => other,
        };
        let file = GgufFile::from_vec(bytes).map_err(|e| format!("not a model this engine reads: {}", ModelError::Gguf(e)))?;
        let model = Model::from_file(file).map_err(|e| format!("not a model this engine reads: {e}"))?;
        let load = LoadOptions { threads: 1, backend: BackendKind::Interp, context: req.context, ..LoadOptions::default() };
        let opts = EngineOptions { load, parallel: req.parallel.unwrap_or(1).max(1), chat_template, kv_type, ..EngineOptions::default() };
        let engine = Engine::from_model(model, &opts, t0).map_err(|e| e.to_string())?;
        Ok(slot(&mut self.models, Arc::new(engine)))
    }

    /// Frees a model; generations still running on it keep it alive until they end.
    pub fn close(&mut self, model: Handle) -> Result<(), String> {
        take(&mut self.models, model, "model").map(drop)
    }

    fn model(&mut self, h: Handle) -> Result<Arc<Engine>, String> {
        get(&mut self.models, h, "model").cloned()
    }

    /// The model's architecture and hyper-parameters, as JSON.
    pub fn info(&mut self, model: Handle) -> Result<String, String> {
        let e = self.model(model)?;
        let c = &e.model.config;
        Ok(json!({
            "architecture": c.arch_name, "hidden": c.hidden, "layers": c.layers, "heads": c.heads,
            "kv_heads": c.kv_heads, "head_dim": c.head_dim, "ffn": c.ffn, "vocab": c.vocab,
            "context_train": c.context, "context": e.context, "tied_head": c.tied_head,
            "bitlinear": c.bitlinear, "backend": e.backend_kind().name(), "load_ms": e.load_ms,
            "chat_template": e.chat_template.is_some(), "cache_type": e.kv_type().name(),
        })
        .to_string())
    }

    /// `text`'s ids as a JSON list; `special`: special-token text becomes those tokens.
    pub fn tokenize(&mut self, model: Handle, text: &str, add_bos: bool, special: bool) -> Result<String, String> {
        let ids = self.model(model)?.tokenizer.encode(text, add_bos, special).map_err(|e| e.to_string())?;
        Ok(serde_json::to_string(&ids).expect("a list of numbers"))
    }

    /// The text of a JSON list of ids.
    pub fn detokenize(&mut self, model: Handle, ids: &[u8]) -> Result<String, String> {
        let e = self.model(model)?;
        let ids: Vec<u32> = parse("id list", ids)?;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= e.vocab()) {
            return Err(format!("token id {bad} is outside the vocabulary of {}", e.vocab()));
        }
        Ok(e.tokenizer.decode_text(&ids))
    }

    /// Starts a generation ([`GenerateRequest`] as JSON); nothing is
    /// computed until [`State::next`] or [`State::finish`].
    pub fn start(&mut self, model: Handle, request: &[u8]) -> Result<Handle, String> {
        let e = self.model(model)?;
        let r: GenerateRequest = parse("generate request", request)?;
        let ids = match (r.prompt, r.prompt_ids, r.messages) {
            (Some(text), None, None) => e.tokenizer.encode(&text, e.tokenizer.add_bos, false).map_err(|e| e.to_string())?,
            (None, Some(ids), None) => ids,
            (None, None, Some(m)) => {
                let messages: Vec<Message> = m.into_iter().map(|m| Message { role: m.role, content: m.content }).collect();
                e.chat_ids(&messages).map_err(|e| e.to_string())?
            }
            _ => return Err("give exactly one of prompt, prompt_ids and messages".into()),
        };
        let seed = r.seed.unwrap_or_else(SamplerConfig::clock_seed);
        let sampler = SamplerConfig {
            temperature: r.temperature,
            top_k: r.top_k,
            top_p: r.top_p,
            min_p: r.min_p,
            repeat_penalty: r.repeat_penalty,
            logit_bias: r.logit_bias.into_iter().collect(),
            format: match (r.response_format.as_ref().map(OutputFormat::from_response_format).transpose()?.flatten(), r.grammar) {
                (Some(_), Some(_)) => return Err("give response_format or grammar, not both".into()),
                (None, Some(g)) => Some(OutputFormat::Grammar(g)),
                (f, None) => f,
            },
            seed,
            ..SamplerConfig::default()
        };
        sampler.check().map_err(|e| e.to_string())?;
        let opts = GenerateOptions { n_predict: r.max_tokens, ignore_eos: r.ignore_eos, sampler, dump_logits: false };
        let context = e.context;
        let text = TextGeneration::start(e, &ids, &opts, r.stop.into_vec()).map_err(|e| e.to_string())?;
        Ok(slot(&mut self.generations, Generation { text, prompt_tokens: ids.len(), max_tokens: r.max_tokens, context, tail_taken: false }))
    }

    /// One step: `Some(text that became printable)`, possibly empty, or
    /// `None` once the generation is over. The first `None` hands out the
    /// trailing text as `Some` once more, so a stream's pieces add up to
    /// the whole text.
    pub fn next(&mut self, generation: Handle) -> Result<Option<String>, String> {
        let g = get(&mut self.generations, generation, "generation")?;
        match g.text.next_piece().map_err(|e| e.to_string())? {
            Some(piece) => Ok(Some(piece)),
            None if g.tail_taken => Ok(None),
            None => {
                g.tail_taken = true;
                Ok(Some(g.text.rest()))
            }
        }
    }

    /// Runs a generation to its end and frees it: `{text, ids,
    /// finish_reason, usage}` as JSON (the text is `bitnet run`'s for the
    /// same prompt and settings).
    pub fn finish(&mut self, generation: Handle) -> Result<String, String> {
        let g = take(&mut self.generations, generation, "generation")?;
        let (max, context, prompt_tokens) = (g.max_tokens, g.context, g.prompt_tokens);
        let (text, ids) = g.text.finish(|t| t.next_piece()).map_err(|e| e.to_string())?;
        // As OpenAI's: `length` when the token limit or the context ended it.
        let reason = if ids.len() >= max || prompt_tokens + ids.len() >= context { "length" } else { "stop" };
        Ok(json!({
            "text": text, "ids": ids, "finish_reason": reason,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": ids.len(), "total_tokens": prompt_tokens + ids.len()},
        })
        .to_string())
    }

    /// Drops a generation before its end (its cache is freed).
    pub fn cancel(&mut self, generation: Handle) -> Result<(), String> {
        take(&mut self.generations, generation, "generation").map(drop)
    }
}
