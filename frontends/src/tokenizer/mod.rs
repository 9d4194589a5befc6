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
    Hf { plain: Box<tokenizers::Tokenizer>, full: Box<tokenizers::Tokenizer> },
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

fn str_array<'a>(f: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>, TokenizerError> {
    match f.get(key) {
        None => Ok(None),
        Some(MetaValue::Array(_, items)) => items
            .iter()
            .map(|v| v.as_str().ok_or_else(|| TokenizerError(format!("{key} holds a non-string"))))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => terr(format!("{key} is not an array")),
    }
}

fn num_array(f: &GgufFile, key: &str) -> Result<Option<Vec<f64>>, TokenizerError> {
    match f.get(key) {
        None => Ok(None),
        Some(MetaValue::Array(_, items)) => items
            .iter()
            .map(|v| v.as_f64().ok_or_else(|| TokenizerError(format!("{key} holds a non-number"))))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => terr(format!("{key} is not an array")),
    }
}

fn byte_level_bpe(pieces: &[String], merges: &[&str], pattern: Option<&str>) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let vocab: Vocab = pieces.iter().enumerate().map(|(i, p)| (p.clone(), i as u32)).collect();
    let merges = merges
        .iter()
        .map(|m| match m.char_indices().skip(1).find(|&(_, c)| c == ' ') {
            Some((i, _)) => Ok((m[..i].to_string(), m[i + 1..].to_string())),
            None => terr(format!("merge {m:?} is not two tokens")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pattern.is_some())
        .build()
        .map_err(|e| TokenizerError(format!("building BPE: {e}")))?;
    let mut t = tokenizers::Tokenizer::new(bpe);
    match pattern {
        Some(p) => {
            let split = Split::new(SplitPattern::Regex(p.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| TokenizerError(format!("pre-tokenizer regex: {e}")))?;
            t.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()])));
        }
        None => {
            t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
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
                let pattern = match pre {
                    "llama-bpe" | "llama3" | "llama-v3" | "falcon3" => Some(LLAMA3_PATTERN),
                    "gpt-2" | "gpt2" | "default" => None,
                    other => return terr(format!("pre-tokenizer {other:?} is not supported (llama-bpe and gpt-2 are)")),
                };
                let merges = str_array(f, "tokenizer.ggml.merges")?.unwrap_or_default();
                let t = byte_level_bpe(&pieces, &merges, pattern)?;
                let add_bos = pattern.is_some();
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
        let config: serde_json::Value = std::fs::read_to_string(path.with_file_name("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null);
        let token_of = |key: &str| -> Option<u32> {
            let v = &config[key];
            let s = v.as_str().or_else(|| v["content"].as_str())?;
            full.token_to_id(s)
        };
        let eot = full.token_to_id("<|eot_id|>").or_else(|| full.token_to_id("<|im_end|>"));
        let bos = token_of("bos_token");
        let eos = token_of("eos_token");
        let mut t = Tokenizer {
            kind: format!("Hugging Face tokenizer.json, {n} tokens"),
            engine: Engine::Hf { plain: Box::new(plain), full: Box::new(full) },
            pieces,
            types,
            specials: Vec::new(),
            bos,
            eos,
            eot,
            add_bos: config["add_bos_token"].as_bool().unwrap_or(bos.is_some()),
            add_space_prefix: false,
            chat_template: config["chat_template"].as_str().map(String::from),
        };
        t.collect_specials();
        Ok(t)
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
            TokenType::Byte => match u8::from_str_radix(piece.trim_start_matches("<0x").trim_end_matches('>'), 16) {
                Ok(b) if piece.starts_with("<0x") => out.push(b),
                _ => out.extend_from_slice(piece.as_bytes()),
            },
            TokenType::Normal => match &self.engine {
                Engine::Spm(_) => out.extend_from_slice(piece.replace('\u{2581}', " ").as_bytes()),
                Engine::Bpe(_) => bytelevel::decode(piece, out),
                Engine::Hf { .. } => unreachable!("HF tokenizers decode through their decoder"),
            },
        }
    }

    /// Ids to text, as a continuation: nothing is stripped from the front.
    /// `context` (the token before `ids`, if any) lets decoders that depend
    /// on the previous token (Hugging Face's) get spaces right.
    pub fn decode(&self, context: Option<u32>, ids: &[u32]) -> String {
        match &self.engine {
            Engine::Hf { full, .. } => {
                let mut all: Vec<u32> = context.into_iter().collect();
                let skip = full.decode(&all, true).unwrap_or_default().len();
                all.extend_from_slice(ids);
                let text = full.decode(&all, true).unwrap_or_default();
                text.get(skip..).unwrap_or(&text).to_string()
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

enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

/// Turns generated ids into text as they arrive, holding back bytes that
/// do not yet form whole UTF-8 characters.
pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    context: Option<u32>,
    ids: Vec<u32>,
    printed: usize,
}

impl<'t> TextStream<'t> {
    /// `context` is the token before the first streamed one (the last
    /// prompt token), if any.
    pub fn new(tokenizer: &'t Tokenizer, context: Option<u32>) -> Self {
        TextStream { tokenizer, context, ids: Vec::new(), printed: 0 }
    }

    /// Adds a token; returns the text that became printable.
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let text = self.tokenizer.decode(self.context, &self.ids);
        if text.ends_with('\u{FFFD}') {
            return String::new();
        }
        self.take(text)
    }

    /// Whatever is left, printable or not.
    pub fn finish(&mut self) -> String {
        let text = self.tokenizer.decode(self.context, &self.ids);
        self.take(text)
    }

    fn take(&mut self, text: String) -> String {
        let new = text.get(self.printed..).unwrap_or("").to_string();
        self.printed = text.len().max(self.printed);
        new
    }
}
