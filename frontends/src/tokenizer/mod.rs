//! Tokenizers: from GGUF metadata (`gpt2` byte-level BPE with the
//! `llama-bpe` or `gpt-2` pre-tokenizer, `llama` SentencePiece) or from a
//! Hugging Face `tokenizer.json`.
//!
//! Special tokens are split out of the text here, before the model sees it,
//! as llama.cpp does: user-defined tokens always, control tokens (BOS, EOS,
//! `<|eot_id|>`, ...) only when `parse_special` is set (chat mode). So a
//! prompt that merely contains the text `<|eot_id|>` stays text.

pub mod bytelevel;
mod spm;

use crate::gguf::{GgufFile, MetaValue};
use spm::Spm;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::SplitDelimiterBehavior;

/// The LLaMA-3 split regex (`tokenizer.ggml.pre = llama-bpe`).
/// Falcon3's (and Falcon-E's) pre-tokenizer: three patterns in turn, each
/// splitting the pieces of the one before; punctuation runs, then
/// GPT-2-style words, then single digits (the `Punctuation`, `ByteLevel`
/// and `Digits` steps of a Falcon tokenizer.json). llama.cpp does not do
/// this: its `llama-vocab.cpp` reads `falcon3` (and ik_llama.cpp
/// `falcon_e`) as the LLaMA-3 split (docs/model-families.md).
pub const FALCON3_PATTERNS: [&str; 3] = [r"[\p{P}\$\+<=>\^~\|`]+", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)", r"[0-9]"];

pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_gguf(v: i64) -> TokenType {
        match v {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Normal,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("tokenizer: {0}")]
pub struct TokenizerError(pub String);

fn terr<T>(msg: impl Into<String>) -> Result<T, TokenizerError> {
    Err(TokenizerError(msg.into()))
}

enum Engine {
    /// Byte-level BPE (GGUF `gpt2`), without added tokens.
    Bpe(Box<tokenizers::Tokenizer>),
    Spm(Spm),
    /// A `tokenizer.json`: `plain` has no added tokens (for encoding text),
    /// `full` decodes.
    Hf {
        plain: Box<tokenizers::Tokenizer>,
        full: Box<tokenizers::Tokenizer>,
    },
}

pub struct Tokenizer {
    engine: Engine,
    /// Token text as stored.
    pieces: Vec<String>,
    types: Vec<TokenType>,
    /// Control, user-defined and unknown tokens, longest first.
    specials: Vec<(String, u32, TokenType)>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    /// Whether the model expects BOS at the start of a prompt.
    pub add_bos: bool,
    add_space_prefix: bool,
    pub chat_template: Option<String>,
    /// A short description for `inspect`.
    pub kind: String,
}

/// A metadata array whose every element `get` can read, or `None` if the
/// key is absent.
fn meta_array<'a, T>(f: &'a GgufFile, key: &str, kind: &str, get: impl Fn(&'a MetaValue) -> Option<T>) -> Result<Option<Vec<T>>, TokenizerError> {
    match f.get(key) {
        None => Ok(None),
        Some(MetaValue::Array(_, items)) => {
            items.iter().map(|v| get(v).ok_or_else(|| TokenizerError(format!("{key} holds a non-{kind}")))).collect::<Result<Vec<_>, _>>().map(Some)
        }
        Some(_) => terr(format!("{key} is not an array")),
    }
}

/// The byte of a byte-fallback piece such as `<0x0A>`.
fn byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() == 2 {
        u8::from_str_radix(hex, 16).ok()
    } else {
        None
    }
}

/// Whether a tokenizer.json's decoder maps pieces through GPT-2's
/// byte-level alphabet (LLaMA-3's, Falcon3's), not SentencePiece's `▁`.
fn decodes_byte_level(decoder: Option<&tokenizers::DecoderWrapper>) -> bool {
    match decoder {
        Some(tokenizers::DecoderWrapper::ByteLevel(_)) => true,
        Some(tokenizers::DecoderWrapper::Sequence(s)) => s.get_decoders().iter().any(|d| decodes_byte_level(Some(d))),
        _ => false,
    }
}

fn str_array<'a>(f: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>, TokenizerError> {
    meta_array(f, key, "string", MetaValue::as_str)
}

fn num_array(f: &GgufFile, key: &str) -> Result<Option<Vec<f64>>, TokenizerError> {
    meta_array(f, key, "number", MetaValue::as_f64)
}

/// `patterns`: split patterns applied in turn before the byte-level
/// mapping; none means GPT-2's own. `ignore_merges`: a whole piece that is
/// in the vocabulary is one token (LLaMA-3).
fn byte_level_bpe(pieces: &[String], merges: &[&str], patterns: &[&str], ignore_merges: bool) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let vocab: Vocab = pieces.iter().enumerate().map(|(i, p)| (p.clone(), i as u32)).collect();
    let merges = merges
        .iter()
        .map(|m| match m.char_indices().skip(1).find(|&(_, c)| c == ' ') {
            Some((i, _)) => Ok((m[..i].to_string(), m[i + 1..].to_string())),
            None => terr(format!("merge {m:?} is not two tokens")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).ignore_merges(ignore_merges).build().map_err(|e| TokenizerError(format!("building BPE: {e}")))?;
    let mut t = tokenizers::Tokenizer::new(bpe);
    if patterns.is_empty() {
        t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    } else {
        let mut steps = Vec::new();
        for p in patterns {
            let split = Split::new(SplitPattern::Regex(p.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| TokenizerError(format!("pre-tokenizer regex: {e}")))?;
            steps.push(split.into());
        }
        steps.push(ByteLevel::new(false, true, false).into());
        t.with_pre_tokenizer(Some(Sequence::new(steps)));
    }
    Ok(t)
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf(f: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let Some(model) = f.get("tokenizer.ggml.model").and_then(MetaValue::as_str) else {
            return terr("the file has no tokenizer (tokenizer.ggml.model is missing)");
        };
        let Some(pieces) = str_array(f, "tokenizer.ggml.tokens")? else { return terr("tokenizer.ggml.tokens is missing") };
        let pieces: Vec<String> = pieces.into_iter().map(String::from).collect();
        let n = pieces.len();
        let types: Vec<TokenType> = match num_array(f, "tokenizer.ggml.token_type")? {
            Some(t) if t.len() == n => t.into_iter().map(|v| TokenType::from_gguf(v as i64)).collect(),
            Some(t) => return terr(format!("{} token types for {n} tokens", t.len())),
            None => vec![TokenType::Normal; n],
        };
        let id = |key: &str| -> Result<Option<u32>, TokenizerError> {
            match f.get(key).map(|v| v.as_u64()) {
                None => Ok(None),
                Some(Some(v)) if (v as usize) < n => Ok(Some(v as u32)),
                Some(v) => terr(format!("{key} = {v:?} is not a token id below {n}")),
            }
        };
        let flag = |key: &str| f.get(key).and_then(MetaValue::as_bool);
        let (engine, kind, bos_default, eos_default, add_bos_default, space_prefix) = match model {
            "gpt2" => {
                let pre = f.get("tokenizer.ggml.pre").and_then(MetaValue::as_str).unwrap_or("default");
                let (patterns, llama3): (&[&str], bool) = match pre {
                    "llama-bpe" | "llama3" | "llama-v3" => (&[LLAMA3_PATTERN], true),
                    "falcon3" | "falcon_e" => (&FALCON3_PATTERNS, false),
                    "gpt-2" | "gpt2" | "default" => (&[], false),
                    other => return terr(format!("pre-tokenizer {other:?} is not supported (llama-bpe, falcon3, falcon_e and gpt-2 are)")),
                };
                let merges = str_array(f, "tokenizer.ggml.merges")?.unwrap_or_default();
                let t = byte_level_bpe(&pieces, &merges, patterns, llama3)?;
                let add_bos = llama3;
                (Engine::Bpe(Box::new(t)), format!("byte-level BPE ({pre}), {n} tokens, {} merges", merges.len()), None, None, add_bos, false)
            }
            "llama" => {
                let scores = match num_array(f, "tokenizer.ggml.scores")? {
                    Some(s) if s.len() == n => s.into_iter().map(|v| v as f32).collect(),
                    Some(s) => return terr(format!("{} scores for {n} tokens", s.len())),
                    None => vec![0.0; n],
                };
                let ids = pieces.iter().enumerate().map(|(i, p)| (p.clone(), i as u32)).collect();
                (Engine::Spm(Spm { ids, scores }), format!("SentencePiece, {n} tokens"), Some(1), Some(2), true, true)
            }
            other => return terr(format!("tokenizer model {other:?} is not supported (gpt2 and llama are)")),
        };
        let bos = id("tokenizer.ggml.bos_token_id")?.or(bos_default.filter(|&b| (b as usize) < n));
        let eos = id("tokenizer.ggml.eos_token_id")?.or(eos_default.filter(|&b| (b as usize) < n));
        let eot = id("tokenizer.ggml.eot_token_id")?.or_else(|| pieces.iter().position(|p| p == "<|eot_id|>" || p == "<|im_end|>").map(|i| i as u32));
        let mut t = Tokenizer {
            engine,
            specials: Vec::new(),
            bos,
            eos,
            eot,
            add_bos: flag("tokenizer.ggml.add_bos_token").unwrap_or(add_bos_default),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix").unwrap_or(space_prefix),
            chat_template: f.get("tokenizer.chat_template").and_then(MetaValue::as_str).map(String::from),
            kind,
            pieces,
            types,
        };
        t.collect_specials();
        Ok(t)
    }

    /// Loads a Hugging Face `tokenizer.json`; `tokenizer_config.json` next
    /// to it, if present, gives BOS/EOS and the chat template.
    pub fn from_hf_file(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let full = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError(format!("{}: {e}", path.display())))?;
        let mut plain = tokenizers::Tokenizer::new(full.get_model().clone());
        plain.with_normalizer(full.get_normalizer().cloned());
        plain.with_pre_tokenizer(full.get_pre_tokenizer().cloned());
        let n = full.get_vocab_size(true);
        let mut pieces = vec![String::new(); n];
        let mut types = vec![TokenType::Normal; n];
        for (piece, id) in full.get_vocab(true) {
            if let Some(p) = pieces.get_mut(id as usize) {
                *p = piece;
            }
        }
        for (id, tok) in full.get_added_tokens_decoder() {
            if let Some(t) = types.get_mut(id as usize) {
                *t = if tok.special { TokenType::Control } else { TokenType::UserDefined };
            }
        }
        let json = read_json(path).unwrap_or(serde_json::Value::Null);
        let config = read_json(&path.with_file_name("tokenizer_config.json")).unwrap_or(serde_json::Value::Null);
        let (bos, eos, add_bos) = hf_specials(&json, &config, |s| full.token_to_id(s));
        let eot = full.token_to_id("<|eot_id|>").or_else(|| full.token_to_id("<|im_end|>"));
        let mut t = Tokenizer {
            kind: format!("Hugging Face tokenizer.json, {n} tokens"),
            engine: Engine::Hf { plain: Box::new(plain), full: Box::new(full) },
            pieces,
            types,
            specials: Vec::new(),
            bos,
            eos,
            eot,
            add_bos,
            add_space_prefix: false,
            chat_template: config["chat_template"].as_str().map(String::from),
        };
        t.collect_specials();
        Ok(t)
    }

    /// Takes end-of-generation ids from a `generation_config.json`
    /// (`eos_token_id`, a number or a list such as LLaMA-3's [128001, 128009]).
    pub fn add_generation_config(&mut self, path: &Path) {
        let Ok(j) = read_json(path) else { return };
        let ids: Vec<u32> = match &j["eos_token_id"] {
            serde_json::Value::Number(n) => n.as_u64().map(|v| v as u32).into_iter().collect(),
            serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_u64().map(|v| v as u32)).collect(),
            _ => Vec::new(),
        };
        for id in ids.into_iter().filter(|&i| (i as usize) < self.pieces.len()) {
            if self.eos.is_none() {
                self.eos = Some(id);
            } else if self.eos != Some(id) && self.eot.is_none() {
                self.eot = Some(id);
            }
        }
    }

    fn collect_specials(&mut self) {
        self.specials = (0..self.pieces.len())
            .filter(|&i| matches!(self.types[i], TokenType::Control | TokenType::UserDefined | TokenType::Unknown))
            .filter(|&i| !self.pieces[i].is_empty())
            .map(|i| (self.pieces[i].clone(), i as u32, self.types[i]))
            .collect();
        self.specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    /// End of generation: EOS or end of turn.
    pub fn is_eog(&self, id: u32) -> bool {
        Some(id) == self.eos || Some(id) == self.eot
    }

    /// Text to ids. `add_bos` prepends BOS if the model has one;
    /// `parse_special` lets control-token text become control tokens.
    pub fn encode(&self, text: &str, add_bos: bool, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::new();
        if add_bos {
            if let Some(b) = self.bos {
                out.push(b);
            }
        }
        // llama.cpp prefixes a space at the start and after every special token.
        let mut after_special = true;
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    after_special = true;
                }
                Fragment::Text(s) => {
                    self.encode_text(s, after_special, &mut out)?;
                    after_special = false;
                }
            }
        }
        Ok(out)
    }

    fn encode_text(&self, s: &str, after_special: bool, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        match &self.engine {
            Engine::Spm(spm) => {
                let mut text = String::new();
                if self.add_space_prefix && after_special {
                    text.push(' ');
                }
                text.push_str(s);
                spm.encode(&text.replace(' ', "\u{2581}"), out);
            }
            Engine::Bpe(t) | Engine::Hf { plain: t, .. } => {
                let enc = t.encode_fast(s, false).map_err(|e| TokenizerError(e.to_string()))?;
                out.extend_from_slice(enc.get_ids());
            }
        }
        Ok(())
    }

    /// Splits out special tokens, leftmost first, longest token first.
    fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut frags = if text.is_empty() { Vec::new() } else { vec![Fragment::Text(text)] };
        for (piece, id, ty) in &self.specials {
            if !parse_special && *ty != TokenType::UserDefined {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                let Fragment::Text(mut s) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(i) = s.find(piece.as_str()) {
                    if i > 0 {
                        next.push(Fragment::Text(&s[..i]));
                    }
                    next.push(Fragment::Token(*id));
                    s = &s[i + piece.len()..];
                }
                if !s.is_empty() {
                    next.push(Fragment::Text(s));
                }
            }
            frags = next;
        }
        frags
    }

    /// The bytes a token stands for when printed; control tokens print
    /// nothing.
    pub fn token_bytes(&self, id: u32, out: &mut Vec<u8>) {
        let Some(piece) = self.pieces.get(id as usize) else { return };
        match self.types[id as usize] {
            TokenType::Control | TokenType::Unknown | TokenType::Unused => {}
            TokenType::UserDefined => out.extend_from_slice(piece.as_bytes()),
            TokenType::Byte => match byte_piece(piece) {
                Some(b) => out.push(b),
                None => out.extend_from_slice(piece.as_bytes()),
            },
            TokenType::Normal => match &self.engine {
                Engine::Bpe(_) => bytelevel::decode(piece, out),
                Engine::Hf { full, .. } if decodes_byte_level(full.get_decoder()) => bytelevel::decode(piece, out),
                // SentencePiece's pieces, as GGUF stores them or as a
                // tokenizer.json with byte fallback does.
                Engine::Spm(_) | Engine::Hf { .. } => match byte_piece(piece) {
                    Some(b) => out.push(b),
                    None => out.extend_from_slice(piece.replace('\u{2581}', " ").as_bytes()),
                },
            },
        }
    }

    /// Ids to text, as a continuation: nothing is stripped from the front.
    /// `context` (the token before `ids`, if any) lets decoders that depend
    /// on the previous token (Hugging Face's) get spaces right.
    pub fn decode(&self, context: Option<u32>, ids: &[u32]) -> String {
        self.decode_after(context.as_slice(), ids)
    }

    /// [`Tokenizer::decode`] after several tokens of context: Hugging Face's
    /// decoders see them all, so a context that ends inside a character
    /// still decodes to whole characters before `ids` begin.
    pub fn decode_after(&self, context: &[u32], ids: &[u32]) -> String {
        match &self.engine {
            Engine::Hf { full, .. } => {
                let before = full.decode(context, true).unwrap_or_default();
                let all: Vec<u32> = context.iter().chain(ids).copied().collect();
                let text = full.decode(&all, true).unwrap_or_default();
                // A context that ends inside a character decoded to U+FFFD
                // alone; the character it begins is then the text's.
                let rest = text.strip_prefix(before.as_str()).or_else(|| text.strip_prefix(before.trim_end_matches('\u{FFFD}')));
                rest.unwrap_or(&text).to_string()
            }
            _ => {
                let mut bytes = Vec::new();
                for &id in ids {
                    self.token_bytes(id, &mut bytes);
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
        }
    }

    /// Ids to text as llama.cpp's detokenizer prints a whole prompt: BOS
    /// dropped and, for SentencePiece, one leading space removed.
    pub fn decode_text(&self, ids: &[u32]) -> String {
        let ids = match ids.first() {
            Some(&b) if Some(b) == self.bos => &ids[1..],
            _ => ids,
        };
        match &self.engine {
            Engine::Hf { full, .. } => full.decode(ids, true).unwrap_or_default(),
            _ => {
                let s = self.decode(None, ids);
                match s.strip_prefix(' ') {
                    Some(rest) if self.add_space_prefix => rest.to_string(),
                    _ => s,
                }
            }
        }
    }

    /// The ids of special tokens by their text (for chat templates).
    pub fn special_ids(&self) -> HashMap<&str, u32> {
        self.specials.iter().map(|(p, id, _)| (p.as_str(), *id)).collect()
    }
}

fn read_json(p: &Path) -> Result<serde_json::Value, TokenizerError> {
    let s = std::fs::read_to_string(p).map_err(|e| TokenizerError(format!("{}: {e}", p.display())))?;
    serde_json::from_str(&s).map_err(|e| TokenizerError(format!("{}: {e}", p.display())))
}

/// BOS, EOS and whether to add BOS, for a Hugging Face tokenizer:
/// `tokenizer_config.json` when it says, else the special token that the
/// `tokenizer.json` post-processor puts first, else the usual names.
fn hf_specials(json: &serde_json::Value, config: &serde_json::Value, id: impl Fn(&str) -> Option<u32>) -> (Option<u32>, Option<u32>, bool) {
    let named = |key: &str| {
        let v = &config[key];
        v.as_str().or_else(|| v["content"].as_str()).and_then(&id)
    };
    let template_bos = json["post_processor"]["single"][0]["SpecialToken"]["id"].as_str().and_then(&id);
    let bos = named("bos_token").or(template_bos).or_else(|| id("<s>")).or_else(|| id("<|begin_of_text|>"));
    let eos = named("eos_token").or_else(|| id("</s>")).or_else(|| id("<|end_of_text|>"));
    let add_bos = config["add_bos_token"].as_bool().unwrap_or(template_bos.is_some());
    (bos, eos, add_bos)
}

enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

/// Turns generated ids into text as they arrive, holding back bytes that
/// do not yet form whole UTF-8 characters. Each push decodes only the ids
/// not yet printed (with the last printed piece's as context), so a stream
/// of n tokens costs O(n), not O(n²).
pub struct TextStream {
    tokenizer: std::sync::Arc<Tokenizer>,
    /// The tokens of the last printed piece (at first, the last prompt
    /// token), so that the pending ones decode as their continuation.
    context: Vec<u32>,
    pending: Vec<u32>,
}

impl TextStream {
    /// `context` is the token before the first streamed one (the last
    /// prompt token), if any.
    pub fn new(tokenizer: std::sync::Arc<Tokenizer>, context: Option<u32>) -> Self {
        TextStream { tokenizer, context: context.into_iter().collect(), pending: Vec::new() }
    }

    /// Adds a token; returns the text that became printable.
    pub fn push(&mut self, id: u32) -> String {
        self.pending.push(id);
        let text = self.tokenizer.decode_after(&self.context, &self.pending);
        // Bytes that complete no character yet, or end in one's first
        // bytes: wait for the rest.
        if text.is_empty() || text.ends_with('\u{FFFD}') {
            return String::new();
        }
        self.printed(text)
    }

    /// Whatever is left, printable or not.
    pub fn finish(&mut self) -> String {
        let text = self.tokenizer.decode_after(&self.context, &self.pending);
        self.printed(text)
    }

    /// The pending tokens' text has been printed: they become the context.
    fn printed(&mut self, text: String) -> String {
        if !self.pending.is_empty() {
            std::mem::swap(&mut self.context, &mut self.pending);
            self.pending.clear();
        }
        text
    }
}

/// The pieces of a vocabulary in GGUF's terms, for moving tokenizers
/// between formats.
#[derive(Clone, Debug, Default)]
pub struct VocabParts {
    /// `gpt2` (byte-level BPE) or `llama` (SentencePiece).
    pub model: String,
    /// Pre-tokenizer name (`llama-bpe`, `gpt-2`), for `gpt2`.
    pub pre: String,
    pub tokens: Vec<String>,
    /// GGUF token types (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte).
    pub types: Vec<i32>,
    pub scores: Vec<f32>,
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

impl VocabParts {
    /// Reads a Hugging Face `tokenizer.json` (and `tokenizer_config.json`
    /// beside it): byte-level BPE becomes `gpt2`; BPE with byte fallback and
    /// `▁` spaces (SentencePiece converted by transformers) becomes `llama`,
    /// scored by id (SentencePiece vocabularies are ordered by score).
    pub fn from_hf(path: &Path) -> Result<VocabParts, TokenizerError> {
        let config = read_json(&path.with_file_name("tokenizer_config.json")).unwrap_or(serde_json::Value::Null);
        Self::from_hf_json(&read_json(path)?, &config)
    }

    /// [`VocabParts::from_hf`] on the two files' contents.
    pub fn from_hf_json(j: &serde_json::Value, config: &serde_json::Value) -> Result<VocabParts, TokenizerError> {
        let model = &j["model"];
        if model["type"].as_str() != Some("BPE") {
            return terr(format!("tokenizer.json model {:?} is not supported (BPE is)", model["type"]));
        }
        let vocab = model["vocab"].as_object().ok_or_else(|| TokenizerError("tokenizer.json has no model.vocab".into()))?;
        let mut by_id: Vec<(u32, String, i32)> = vocab.iter().filter_map(|(k, v)| Some((v.as_u64()? as u32, k.clone(), 1))).collect();
        let added: Vec<(u32, String, bool)> = j["added_tokens"]
            .as_array()
            .map(|a| {
                a.iter().filter_map(|t| Some((t["id"].as_u64()? as u32, t["content"].as_str()?.to_string(), t["special"].as_bool().unwrap_or(false)))).collect()
            })
            .unwrap_or_default();
        for (id, content, special) in &added {
            let ty = if *special { 3 } else { 4 };
            match by_id.iter_mut().find(|e| e.0 == *id) {
                Some(e) => e.2 = ty,
                None => by_id.push((*id, content.clone(), ty)),
            }
        }
        by_id.sort();
        let n = by_id.last().map_or(0, |e| e.0 as usize + 1);
        let mut tokens = vec![String::new(); n];
        let mut types = vec![5; n]; // unused, for holes
        for (id, piece, ty) in by_id {
            tokens[id as usize] = piece;
            types[id as usize] = ty;
        }
        let merges: Vec<String> = model["merges"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter_map(|x| match x {
                        serde_json::Value::String(s) => Some(s.clone()),
                        serde_json::Value::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let spm = model["byte_fallback"].as_bool() == Some(true);
        let (bos, eos, add_bos) = hf_specials(j, config, |s| tokens.iter().position(|t| t == s).map(|i| i as u32));
        let mut parts = VocabParts {
            bos,
            eos,
            add_bos,
            eot: tokens.iter().position(|t| t == "<|eot_id|>").map(|i| i as u32),
            chat_template: config["chat_template"].as_str().map(String::from),
            ..Default::default()
        };
        if spm {
            for (i, t) in tokens.iter().enumerate() {
                if t.starts_with("<0x") && t.len() == 6 && types[i] == 1 {
                    types[i] = 6;
                }
            }
            if let Some(u) = model["unk_token"].as_str().and_then(|u| tokens.iter().position(|t| t == u)) {
                types[u] = 2;
            }
            for id in [parts.bos, parts.eos].into_iter().flatten() {
                types[id as usize] = 3;
            }
            parts.model = "llama".into();
            parts.scores = (0..n).map(|i| -(i as f32)).collect();
        } else {
            let regex = j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"].as_str();
            parts.model = "gpt2".into();
            parts.pre = match regex {
                Some(LLAMA3_PATTERN) => "llama-bpe",
                Some(r) if r == FALCON3_PATTERNS[0] => "falcon3",
                _ => "gpt-2",
            }
            .into();
        }
        parts.tokens = tokens;
        parts.types = types;
        parts.merges = merges;
        Ok(parts)
    }

    /// Reads the `tokenizer.*` keys of a GGUF file.
    pub fn from_gguf(f: &GgufFile) -> Result<VocabParts, TokenizerError> {
        let s = |k: &str| f.get(k).and_then(MetaValue::as_str).map(String::from);
        let id = |k: &str| f.get(k).and_then(MetaValue::as_u64).map(|v| v as u32);
        Ok(VocabParts {
            model: s("tokenizer.ggml.model").ok_or_else(|| TokenizerError("no tokenizer.ggml.model".into()))?,
            pre: s("tokenizer.ggml.pre").unwrap_or_default(),
            tokens: str_array(f, "tokenizer.ggml.tokens")?.unwrap_or_default().into_iter().map(String::from).collect(),
            types: num_array(f, "tokenizer.ggml.token_type")?.unwrap_or_default().into_iter().map(|v| v as i32).collect(),
            scores: num_array(f, "tokenizer.ggml.scores")?.unwrap_or_default().into_iter().map(|v| v as f32).collect(),
            merges: str_array(f, "tokenizer.ggml.merges")?.unwrap_or_default().into_iter().map(String::from).collect(),
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            eot: id("tokenizer.ggml.eot_token_id"),
            add_bos: f.get("tokenizer.ggml.add_bos_token").and_then(MetaValue::as_bool).unwrap_or(false),
            chat_template: s("tokenizer.chat_template"),
        })
    }

    /// The GGUF metadata entries for this vocabulary.
    pub fn to_gguf(&self) -> Vec<(String, MetaValue)> {
        use crate::gguf::MetaType;
        let strings = |v: &[String]| MetaValue::Array(MetaType::String, v.iter().cloned().map(MetaValue::String).collect());
        let mut m = vec![
            ("tokenizer.ggml.model".to_string(), MetaValue::String(self.model.clone())),
            ("tokenizer.ggml.tokens".into(), strings(&self.tokens)),
            ("tokenizer.ggml.token_type".into(), MetaValue::Array(MetaType::I32, self.types.iter().map(|&t| MetaValue::I32(t)).collect())),
        ];
        if self.model == "gpt2" {
            m.push(("tokenizer.ggml.pre".into(), MetaValue::String(self.pre.clone())));
            m.push(("tokenizer.ggml.merges".into(), strings(&self.merges)));
        } else {
            m.push(("tokenizer.ggml.scores".into(), MetaValue::Array(MetaType::F32, self.scores.iter().map(|&s| MetaValue::F32(s)).collect())));
            m.push(("tokenizer.ggml.add_space_prefix".into(), MetaValue::Bool(true)));
        }
        for (k, v) in [("bos", self.bos), ("eos", self.eos), ("eot", self.eot)] {
            if let Some(v) = v {
                m.push((format!("tokenizer.ggml.{k}_token_id"), MetaValue::U32(v)));
            }
        }
        m.push(("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(self.add_bos)));
        if let Some(t) = &self.chat_template {
            m.push(("tokenizer.chat_template".into(), MetaValue::String(t.clone())));
        }
        m
    }

    /// Writes a byte-level BPE vocabulary as `tokenizer.json` and
    /// `tokenizer_config.json` into `dir`.
    pub fn write_hf(&self, dir: &Path) -> Result<(), TokenizerError> {
        let spm = match self.model.as_str() {
            "gpt2" => false,
            "llama" => true,
            other => return terr(format!("a {other:?} vocabulary cannot be written as tokenizer.json (gpt2 and llama can)")),
        };
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (i, (t, ty)) in self.tokens.iter().zip(&self.types).enumerate() {
            if *ty == 3 || *ty == 4 {
                added.push(serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": *ty == 3}));
            }
            vocab.insert(t.clone(), serde_json::json!(i));
        }
        let patterns: &[&str] = match self.pre.as_str() {
            "llama-bpe" => &[LLAMA3_PATTERN],
            "falcon3" | "falcon_e" => &FALCON3_PATTERNS,
            _ => &[],
        };
        let split = if !patterns.is_empty() {
            let mut steps: Vec<serde_json::Value> =
                patterns.iter().map(|p| serde_json::json!({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": false})).collect();
            steps.push(serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));
            serde_json::json!({"type": "Sequence", "pretokenizers": steps})
        } else {
            serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
        };
        let merges: Vec<serde_json::Value> = self.merges.iter().map(|m| serde_json::json!(m)).collect();
        // SentencePiece as transformers converts it: BPE over `▁`-spaced text
        // with byte fallback, ids in score order.
        let j = if spm {
            serde_json::json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
                "pre_tokenizer": null, "post_processor": null,
                "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
                "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null, "end_of_word_suffix": null,
                          "fuse_unk": true, "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges}
            })
        } else {
            serde_json::json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": null, "pre_tokenizer": split, "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                          "fuse_unk": false, "byte_fallback": false, "ignore_merges": self.pre == "llama-bpe", "vocab": vocab, "merges": merges}
            })
        };
        let piece = |id: Option<u32>| id.and_then(|i| self.tokens.get(i as usize)).cloned();
        let config = serde_json::json!({
            "bos_token": piece(self.bos), "eos_token": piece(self.eos), "add_bos_token": self.add_bos,
            "chat_template": self.chat_template, "tokenizer_class": "PreTrainedTokenizerFast"
        });
        let write = |name: &str, v: &serde_json::Value| {
            std::fs::write(dir.join(name), v.to_string()).map_err(|e| TokenizerError(format!("{}: {e}", dir.join(name).display())))
        };
        write("tokenizer.json", &j)?;
        write("tokenizer_config.json", &config)
    }
}
