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
            OutputFormat::Grammar(g) if g.trim_start().starts_with("%llguidance") => {
                return match g.lines().count() {
                    n if n > MAX_LARK_LINES => Err(format!("the grammar has {n} lines; at most {MAX_LARK_LINES} are taken")),
                    _ => Ok(TopLevelGrammar::from_lark(g.clone())),
                };
            }
            OutputFormat::Grammar(g) => return crate::gbnf::to_lark(g).map(TopLevelGrammar::from_lark),
        };
        if let Some(o) = schema.as_object_mut() {
            o.entry("x-guidance").or_insert_with(|| json!({ "whitespace_flexible": false }));
        }
        Ok(TopLevelGrammar::from_json_schema(schema))
    }
}

/// The stack the grammar compiler runs on: room for a chain of rules some
/// ten times [`crate::gbnf::MAX_RULES`] long (about 3 KiB a rule).
#[cfg(not(target_arch = "wasm32"))]
const COMPILE_STACK: usize = 64 << 20;

/// The most lines a grammar in llguidance's Lark syntax may have (one rule
/// a line at most, so a bound on how deep the compiler goes).
const MAX_LARK_LINES: usize = 4 * crate::gbnf::MAX_RULES;

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
        Grammars::from_words(&words, eos)
    }

    /// Indexes a vocabulary given as each token's bytes.
    fn from_words(words: &[Vec<u8>], eos: u32) -> Result<Grammars, String> {
        let info = TokRxInfo::new(words.len() as u32, eos);
        let env = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, words)));
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
        let compile = || std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.factory.create_parser(grammar)));
        // The compiler follows rule references depth first: a chain of a
        // thousand rules overflows a 2 MiB stack (tokio's blocking
        // threads', a C caller's). On a thread of its own, with room.
        #[cfg(not(target_arch = "wasm32"))]
        let parser = std::thread::scope(|s| {
            let compiler = std::thread::Builder::new().name("bitnet-grammar".into()).stack_size(COMPILE_STACK).spawn_scoped(s, compile);
            let compiler = compiler.map_err(|e| format!("{what} was not compiled: no thread for the compiler ({e})"))?;
            Ok::<_, String>(compiler.join().unwrap_or_else(Err))
        })?;
        #[cfg(target_arch = "wasm32")]
        let parser = compile();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary of the 256 bytes and an end token.
    fn bytes() -> Grammars {
        let mut words: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        words.push([&[TokTrie::SPECIAL_TOKEN_MARKER][..], b"<[end]>"].concat());
        Grammars::from_words(&words, 256).unwrap()
    }

    /// Whether `format` lets `text` be generated byte by byte and then end.
    fn generates(g: &Grammars, format: &OutputFormat, text: &str) -> bool {
        let mut c = g.matcher(format).unwrap();
        for &b in text.as_bytes().iter().chain([&0u8]) {
            let mut logits = vec![0f32; 257];
            c.mask(&mut logits);
            let t = if b == 0 { 256 } else { b as u32 };
            if !logits[t as usize].is_finite() {
                return false;
            }
            c.advance(t);
        }
        true
    }

    /// The longest chain of rules the converter takes compiles on the
    /// stack of a tokio blocking thread (2 MiB): the compiler has its own.
    #[test]
    fn a_long_chain_of_rules_compiles_on_a_small_stack() {
        let n = crate::gbnf::MAX_RULES;
        let mut gbnf = String::from("root ::= a0\n");
        for i in 0..n - 2 {
            gbnf += &format!("a{i} ::= a{}\n", i + 1);
        }
        gbnf += &format!("a{} ::= \"x\"\n", n - 2);
        let compiled = std::thread::Builder::new().stack_size(2 << 20).spawn(move || bytes().matcher(&OutputFormat::Grammar(gbnf)).map(drop)).unwrap();
        assert_eq!(compiled.join().unwrap(), Ok(()));
    }

    /// GBNF matches characters, not words: where a string and a class (or
    /// two strings) start alike, every sentence of the grammar can still
    /// be generated, as with llama.cpp.
    #[test]
    fn every_sentence_of_a_gbnf_grammar_can_be_generated() {
        let g = bytes();
        let list = OutputFormat::Grammar(
            "root ::= item (\", \" item){0,2} \".\"\nitem ::= color \" \" (\"cat\" | \"dog\") \"s\"?\ncolor ::= \"red\" | \"blue\" | [a-z]{3,5}\n".into(),
        );
        for ok in ["red cat.", "rex cats.", "blues dog, red cat.", "blue dogs, reddy cat, abc dog."] {
            assert!(generates(&g, &list, ok), "{ok:?}");
        }
        for bad in ["re cat.", "red cow.", "red cat", "toolong cat."] {
            assert!(!generates(&g, &list, bad), "{bad:?}");
        }
        let overlap = OutputFormat::Grammar(r#"root ::= ("a" | "ab") "bc" | "" "x"{0,2}"#.into());
        for ok in ["abc", "abbc", "", "x", "xx"] {
            assert!(generates(&g, &overlap, ok), "{ok:?}");
        }
    }
}
