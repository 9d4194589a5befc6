//! Output held to a JSON schema (structured outputs, OpenAI's
//! `response_format`) or a grammar (llama.cpp's GBNF): llguidance compiles
//! it against the model's vocabulary and gives, before each token, the set
//! of tokens that keep the text a prefix of a valid document; the sampler
//! draws only from it, and the end-of-generation token only once the
//! document is complete.

use bitnet_frontends::tokenizer::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::sync::Arc;

/// What the generated text must be.
#[derive(Clone, Debug, PartialEq)]
pub enum OutputFormat {
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// A JSON document valid under this schema (OpenAI's `json_schema`).
    JsonSchema(Value),
    /// Text of a grammar in llama.cpp's GBNF (generation starts at its
    /// `root` rule), or, opening with `%llguidance`, in llguidance's Lark
    /// syntax as llama.cpp takes it.
    Grammar(String),
}

impl OutputFormat {
    /// OpenAI's `response_format` object: `None` for `{"type": "text"}`,
    /// the schema of `{"type": "json_schema", "json_schema": {"schema": ...}}`.
    pub fn from_response_format(v: &Value) -> Result<Option<OutputFormat>, String> {
        match v.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(OutputFormat::JsonObject)),
            Some("json_schema") => match v.get("json_schema").and_then(|s| s.get("schema")) {
                Some(schema) if schema.is_object() || schema.is_boolean() => Ok(Some(OutputFormat::JsonSchema(schema.clone()))),
                _ => Err("a json_schema response format needs {\"json_schema\": {\"schema\": {...}}}".into()),
            },
            Some(other) => Err(format!("unknown response format type {other:?}: one of text, json_object, json_schema")),
            None => Err("a response format needs a \"type\": text, json_object or json_schema".into()),
        }
    }

    /// What the format is, for messages.
    fn what(&self) -> &'static str {
        match self {
            OutputFormat::JsonObject | OutputFormat::JsonSchema(_) => "the JSON schema",
            OutputFormat::Grammar(_) => "the grammar",
        }
    }

    /// What llguidance compiles. A schema's JSON is written compactly, as
    /// on one line (no free whitespace between tokens for a model to loop
    /// on), unless the schema sets its own `x-guidance` options.
    fn grammar(&self) -> Result<TopLevelGrammar, String> {
        let mut schema = match self {
            OutputFormat::JsonObject => json!({ "type": "object" }),
            OutputFormat::JsonSchema(s) => s.clone(),
            OutputFormat::Grammar(g) if g.trim_start().starts_with("%llguidance") => return Ok(TopLevelGrammar::from_lark(g.clone())),
            OutputFormat::Grammar(g) => return crate::gbnf::to_lark(g).map(TopLevelGrammar::from_lark),
        };
        if let Some(o) = schema.as_object_mut() {
            o.entry("x-guidance").or_insert_with(|| json!({ "whitespace_flexible": false }));
        }
        Ok(TopLevelGrammar::from_json_schema(schema))
    }
}

/// A model's vocabulary indexed for grammars (a byte trie of its tokens),
/// made once per engine, when the first constrained generation asks.
pub struct Grammars {
    factory: ParserFactory,
    eos: u32,
}

impl Grammars {
    /// Indexes `vocab` tokens (the width of the logits; ids past the
    /// tokenizer's are never allowed). Tokens that print nothing (control
    /// tokens) are marked special, so no grammar spells them as text.
    pub fn new(tokenizer: &Tokenizer, vocab: usize) -> Result<Grammars, String> {
        let known = |t: Option<u32>| t.filter(|&t| (t as usize) < vocab);
        let eos = known(tokenizer.eos).or(known(tokenizer.eot));
        let eos = eos.ok_or("the model names no end-of-generation token, which constrained output needs to end")?;
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| {
                let mut bytes = Vec::new();
                tokenizer.token_bytes(id, &mut bytes);
                if bytes.is_empty() {
                    bytes.push(TokTrie::SPECIAL_TOKEN_MARKER);
                    bytes.extend_from_slice(format!("<[{id}]>").as_bytes());
                }
                bytes
            })
            .collect();
        let info = TokRxInfo::new(vocab as u32, eos);
        let env = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let mut factory = ParserFactory::new_simple(&(env as llguidance::toktrie::TokEnv)).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Grammars { factory, eos })
    }

    /// A generation's matcher for `format`, or why the format does not
    /// compile (where panics unwind, a schema that makes the compiler
    /// panic is one that does not).
    pub fn matcher(&self, format: &OutputFormat) -> Result<Constrained, String> {
        let what = format.what();
        let grammar = format.grammar().map_err(|e| format!("{what} does not compile: {e}"))?;
        let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.factory.create_parser(grammar)));
        let parser = parser.map_err(|_| format!("{what} does not compile: the compiler failed on it"))?;
        let matcher = Matcher::new(parser);
        match matcher.get_error() {
            Some(e) => Err(format!("{what} does not compile: {e}")),
            None => Ok(Constrained { matcher, eos: self.eos }),
        }
    }
}

/// One generation's place in its grammar.
pub struct Constrained {
    matcher: Matcher,
    eos: u32,
}

impl Clone for Constrained {
    /// The same place in the grammar, with caches of its own: the copy
    /// goes on independently (and on another thread, if it likes).
    fn clone(&self) -> Constrained {
        Constrained { matcher: self.matcher.deep_clone(), eos: self.eos }
    }
}

impl Constrained {
    /// Sets the logit of every token the grammar does not allow next to
    /// `-inf`. Once the document is complete only the end-of-generation
    /// token is left; should the grammar fail, only it is, too. Where no
    /// allowed token has a finite logit (a bias of `-inf` on each), the
    /// end-of-generation token gets 0: the generation ends rather than
    /// draw a token the grammar forbids.
    pub fn mask(&mut self, logits: &mut [f32]) {
        match self.matcher.compute_mask_or_eos() {
            Ok(allowed) => {
                for (t, l) in logits.iter_mut().enumerate() {
                    if !allowed.is_allowed(t as u32) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            Err(_) => {
                for (t, l) in logits.iter_mut().enumerate() {
                    if t as u32 != self.eos {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
        if !logits.iter().any(|l| l.is_finite()) {
            if let Some(l) = logits.get_mut(self.eos as usize) {
                *l = 0.0;
            }
        }
    }

    /// Moves past the token drawn. A token past the end (a generation that
    /// ignores end-of-generation tokens) changes nothing.
    pub fn advance(&mut self, token: u32) {
        if !self.matcher.is_stopped() {
            // A token the grammar refuses (only ever the forced end) stops it.
            let _ = self.matcher.consume_token(token);
        }
    }
}
