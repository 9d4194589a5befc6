//! Output held to a JSON schema (`SamplerConfig::format`): whatever the
//! sampling, the text is a document the schema accepts, and it ends when
//! the document does.

mod common;

use bitnet_runtime::{Engine, EngineOptions, GenerateOptions, LoadOptions, OutputFormat, RuntimeError, SamplerConfig, StopReason};
use common::*;
use serde_json::{json, Value};
use std::sync::Arc;

fn stories_engine() -> Arc<Engine> {
    let load = LoadOptions { threads: 2, ..Default::default() };
    Arc::new(Engine::open(&stories(), &EngineOptions { load, parallel: 2, ..Default::default() }).unwrap())
}

/// The text generated after "Once upon a time" with `format`, and why it stopped.
fn generate(e: &Engine, format: OutputFormat, sampler: SamplerConfig, n: usize) -> Result<(String, StopReason), RuntimeError> {
    let prompt = e.tokenizer.encode("Once upon a time", true, false).unwrap();
    let opts = GenerateOptions { n_predict: n, ignore_eos: false, sampler: SamplerConfig { format: Some(format), ..sampler }, dump_logits: false };
    let mut seq = e.new_sequence(SamplerConfig::default())?;
    let g = e.generate(&mut seq, &prompt, &opts, |_| {})?;
    let ids: Vec<u32> = g.generated_ids.iter().copied().filter(|&t| !e.tokenizer.is_eog(t)).collect();
    Ok((e.tokenizer.decode(prompt.last().copied(), &ids), g.stop))
}

/// A schema every part of which is bounded, so that each generation ends.
fn card() -> Value {
    json!({
        "type": "object",
        "properties": {
            "mood": { "enum": ["happy", "sad", "brave"] },
            "age": { "type": "integer", "minimum": 1, "maximum": 9 },
            "friend": { "type": "boolean" },
            "name": { "type": "string", "minLength": 1, "maxLength": 6 }
        },
        "required": ["mood", "age", "friend", "name"],
        "additionalProperties": false
    })
}

#[test]
fn every_sample_is_a_document_of_the_schema() {
    let e = stories_engine();
    let mut texts = std::collections::HashSet::new();
    for seed in 0..6 {
        let sampler = SamplerConfig { temperature: 1.5, top_k: 0, top_p: 1.0, min_p: 0.0, seed, ..SamplerConfig::default() };
        let (text, stop) = generate(&e, OutputFormat::JsonSchema(card()), sampler, 200).unwrap();
        assert_eq!(stop, StopReason::EndOfGeneration, "the document ends the generation: {text:?}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|err| panic!("{text:?}: {err}"));
        assert!(["happy", "sad", "brave"].contains(&v["mood"].as_str().unwrap()), "{v}");
        assert!((1..=9).contains(&v["age"].as_i64().unwrap()) && v["friend"].is_boolean(), "{v}");
        assert!((1..=6).contains(&v["name"].as_str().unwrap().chars().count()), "{v}");
        assert_eq!(v.as_object().unwrap().len(), 4);
        assert!(!text.contains(": ") && !text.contains('\n'), "compact JSON: {text:?}");
        texts.insert(text);
    }
    assert!(texts.len() > 1, "the draws differ: {texts:?}");
    let (greedy, _) = generate(&e, OutputFormat::JsonSchema(card()), SamplerConfig::greedy(), 200).unwrap();
    assert!(serde_json::from_str::<Value>(&greedy).is_ok(), "{greedy:?}");
}

#[test]
fn a_json_object_is_an_object_or_its_beginning() {
    let e = stories_engine();
    for seed in 0..4 {
        let sampler = SamplerConfig { seed, ..SamplerConfig::default() };
        let (text, stop) = generate(&e, OutputFormat::JsonObject, sampler, 48).unwrap();
        assert!(text.starts_with('{'), "{text:?}");
        match stop {
            StopReason::EndOfGeneration => assert!(serde_json::from_str::<Value>(&text).unwrap().is_object(), "{text:?}"),
            // Cut off by the token budget: what came is the start of one.
            _ => assert!(matches!(serde_json::from_str::<Value>(&text), Err(e) if e.is_eof()), "{text:?}"),
        }
    }
}

/// With every token the grammar allows banned (here the end, once the
/// document is complete), the generation ends: it never draws a token the
/// grammar forbids.
#[test]
fn banned_allowed_tokens_end_the_generation_rather_than_break_the_document() {
    let e = stories_engine();
    let eos = e.tokenizer.eos.unwrap();
    for seed in 0..3 {
        let sampler = SamplerConfig { seed, logit_bias: vec![(eos, f32::NEG_INFINITY)], ..SamplerConfig::default() };
        let (text, stop) = generate(&e, OutputFormat::JsonSchema(json!({"enum": ["yes", "no"]})), sampler, 40).unwrap();
        assert!(text == "\"yes\"" || text == "\"no\"", "{text:?}");
        assert_eq!(stop, StopReason::EndOfGeneration);
    }
}

#[test]
fn response_formats_parse_as_openai_spells_them() {
    let parse = |v: Value| OutputFormat::from_response_format(&v);
    assert_eq!(parse(json!({"type": "text"})), Ok(None));
    assert_eq!(parse(json!({"type": "json_object"})), Ok(Some(OutputFormat::JsonObject)));
    let schema = json!({"type": "json_schema", "json_schema": {"name": "card", "strict": true, "schema": card()}});
    assert_eq!(parse(schema), Ok(Some(OutputFormat::JsonSchema(card()))));
    assert!(parse(json!({"type": "json_schema", "json_schema": {"name": "card"}})).unwrap_err().contains("needs"));
    assert!(parse(json!({"type": "yaml"})).unwrap_err().contains("unknown response format type \"yaml\""));
    assert!(parse(json!({})).unwrap_err().contains("needs a \"type\""));
}

#[test]
fn a_schema_that_does_not_compile_is_refused_before_generating() {
    let e = stories_engine();
    assert!(e.new_sequence(SamplerConfig { format: Some(OutputFormat::JsonSchema(json!({"type": "nonsense"}))), ..SamplerConfig::default() }).is_err());
    for bad in [json!({"type": "nonsense"}), json!({"type": "integer", "minimum": 5, "maximum": 1})] {
        let err = generate(&e, OutputFormat::JsonSchema(bad.clone()), SamplerConfig::greedy(), 8).unwrap_err();
        assert!(matches!(&err, RuntimeError::Input(m) if m.starts_with("the JSON schema does not compile: ")), "{bad}: {err}");
    }
}

/// A GBNF grammar (llama.cpp's `--grammar`), written here, not copied.
const LIST_GBNF: &str = r#"
# A short list of animals, each with a color, then a period.
root   ::= item ( ", " item ){0,2} "."
item   ::= color " " animal
color  ::= "red" | "blue" | [a-z]{3,5}
animal ::= ( "cat" | "dog" | "bird" ) "s"?
"#;

fn is_list(text: &str) -> bool {
    let Some(body) = text.strip_suffix('.') else { return false };
    let items: Vec<&str> = body.split(", ").collect();
    (1..=3).contains(&items.len())
        && items.iter().all(|item| {
            let Some((color, animal)) = item.split_once(' ') else { return false };
            let color_ok = (3..=5).contains(&color.len()) && color.bytes().all(|b| b.is_ascii_lowercase());
            color_ok && ["cat", "dog", "bird", "cats", "dogs", "birds"].contains(&animal)
        })
}

#[test]
fn every_sample_is_a_sentence_of_the_gbnf_grammar() {
    let e = stories_engine();
    let mut texts = std::collections::HashSet::new();
    for seed in 0..6 {
        let sampler = SamplerConfig { temperature: 1.5, top_k: 0, top_p: 1.0, min_p: 0.0, seed, ..SamplerConfig::default() };
        let (text, stop) = generate(&e, OutputFormat::Grammar(LIST_GBNF.into()), sampler, 60).unwrap();
        assert_eq!(stop, StopReason::EndOfGeneration, "the sentence ends the generation: {text:?}");
        assert!(is_list(&text), "{text:?}");
        texts.insert(text);
    }
    assert!(texts.len() > 1, "the draws differ: {texts:?}");
    // llama.cpp's way to give llguidance's own syntax.
    let lark = "%llguidance {}\nstart: \"Yes\" | \"No\"\n";
    let (text, stop) = generate(&e, OutputFormat::Grammar(lark.into()), SamplerConfig::greedy(), 8).unwrap();
    assert!((text == "Yes" || text == "No") && stop == StopReason::EndOfGeneration, "{text:?}");
}

#[test]
fn a_grammar_that_does_not_compile_is_refused_with_its_line() {
    let e = stories_engine();
    for (bad, want) in [("root ::= item\n", "rule item is used but never defined"), ("root ::= \"a\"\nx ::= [z-a]\n", "line 2")] {
        let err = generate(&e, OutputFormat::Grammar(bad.into()), SamplerConfig::greedy(), 8).unwrap_err();
        assert!(matches!(&err, RuntimeError::Input(m) if m.starts_with("the grammar does not compile: ") && m.contains(want)), "{bad:?}: {err}");
    }
}

/// `bitnet run --grammar-file`, `--grammar` and `-j` as llama.cpp's: the
/// text is a sentence of the grammar; one that does not compile is the
/// error before any output.
#[test]
fn the_cli_holds_run_to_a_grammar_or_schema() {
    let dir = tmp_dir("structured-cli");
    let file = dir.join("list.gbnf");
    std::fs::write(&file, LIST_GBNF).unwrap();
    let model = stories();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "-m", model.to_str().unwrap(), "-p", "Once upon a time", "-n", "80", "--temp", "1.2", "-s", "4", "--json"];
        args.extend(extra);
        bitnet(&args)
    };
    let text = |o: &std::process::Output| {
        assert!(o.status.success(), "{}", stderr(o));
        serde_json::from_str::<Value>(&stdout(o)).unwrap()["text"].as_str().unwrap().to_string()
    };
    let listed = text(&run(&["--grammar-file", file.to_str().unwrap()]));
    assert!(is_list(&listed), "{listed:?}");
    let yes_no = text(&run(&["--grammar", r#"root ::= "Yes" | "No""#]));
    assert!(yes_no == "Yes" || yes_no == "No", "{yes_no:?}");
    let doc = text(&run(&["-j", r#"{"enum": ["up", "down"]}"#]));
    assert!(doc == "\"up\"" || doc == "\"down\"", "{doc:?}");
    let bad = run(&["--grammar", "root ::= [a-"]);
    assert!(!bad.status.success() && stdout(&bad).is_empty(), "{}", stdout(&bad));
    assert!(stderr(&bad).contains("the grammar does not compile: line 1: a character class is not closed"), "{}", stderr(&bad));
    let both = run(&["--grammar", "root ::= \"a\"", "-j", "{}"]);
    assert!(!both.status.success() && stderr(&both).contains("cannot be used with"), "{}", stderr(&both));
}
