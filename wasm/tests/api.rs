//! The WebAssembly module's API on the host (the same code as in the .wasm
//! file; `scripts/wasm.sh` runs it as WebAssembly in Node.js).

use bitnet_wasm::api::State;

const STORIES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/models/stories260K/stories260K.gguf");
const KNOWN: [u32; 20] = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292];

fn loaded() -> (State, u32) {
    let mut s = State::default();
    let m = s.load(std::fs::read(STORIES).unwrap(), b"").unwrap();
    (s, m)
}

#[test]
fn greedy_ids_are_the_known_continuation() {
    let (mut s, m) = loaded();
    let g = s.start(m, br#"{"prompt_ids": [1, 403, 407, 261, 378], "max_tokens": 20, "temperature": 0}"#).unwrap();
    let done: serde_json::Value = serde_json::from_str(&s.finish(g).unwrap()).unwrap();
    assert_eq!(done["ids"], serde_json::json!(KNOWN));
    assert_eq!(done["finish_reason"], "length");
    assert!(s.finish(g).unwrap_err().contains("no generation with handle"));
}

#[test]
fn streamed_pieces_add_up_to_the_finished_text() {
    let (mut s, m) = loaded();
    let req = br#"{"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}"#;
    let g = s.start(m, req).unwrap();
    let mut text = String::new();
    while let Some(piece) = s.next(g).unwrap() {
        text += &piece;
    }
    s.cancel(g).unwrap();
    let again = s.start(m, req).unwrap();
    let whole: serde_json::Value = serde_json::from_str(&s.finish(again).unwrap()).unwrap();
    assert_eq!(whole["text"], text.as_str());
    assert!(text.starts_with(", there was a little"), "{text:?}");
}

/// An f16 KV cache keeps the greedy continuation on this model and says so.
#[test]
fn an_f16_cache_is_an_option() {
    let mut s = State::default();
    let m = s.load(std::fs::read(STORIES).unwrap(), br#"{"cache_type": "f16"}"#).unwrap();
    let info: serde_json::Value = serde_json::from_str(&s.info(m).unwrap()).unwrap();
    assert_eq!(info["cache_type"], "f16");
    let g = s.start(m, br#"{"prompt_ids": [1, 403, 407, 261, 378], "max_tokens": 20, "temperature": 0}"#).unwrap();
    let done: serde_json::Value = serde_json::from_str(&s.finish(g).unwrap()).unwrap();
    assert_eq!(done["ids"], serde_json::json!(KNOWN));
    let (mut s, m) = loaded();
    let info: serde_json::Value = serde_json::from_str(&s.info(m).unwrap()).unwrap();
    assert_eq!(info["cache_type"], "f32");
}

#[test]
fn logit_biases_force_and_ban_tokens() {
    let (mut s, m) = loaded();
    let ids = |s: &mut State, req: &[u8]| {
        let g = s.start(m, req).unwrap();
        serde_json::from_str::<serde_json::Value>(&s.finish(g).unwrap()).unwrap()["ids"].clone()
    };
    let forced = ids(&mut s, br#"{"prompt_ids": [1, 403, 407, 261, 378], "max_tokens": 4, "temperature": 0, "logit_bias": {"300": 100}}"#);
    assert_eq!(forced, serde_json::json!([300, 300, 300, 300]));
    let banned = ids(&mut s, br#"{"prompt_ids": [1, 403, 407, 261, 378], "max_tokens": 4, "temperature": 0, "logit_bias": {"432": -100}}"#);
    assert_ne!(banned[0], KNOWN[0]);
    let e = s.start(m, br#"{"prompt": "a", "logit_bias": {"512": 1}}"#).unwrap_err();
    assert!(e.contains("token id 512 is outside the vocabulary of 512"), "{e}");
}

#[test]
fn a_response_format_holds_the_text_to_its_schema() {
    let (mut s, m) = loaded();
    let req = br#"{"prompt": "Once", "max_tokens": 64, "seed": 3, "response_format": {"type": "json_schema", "json_schema": {"schema":
        {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false}}}}"#;
    let g = s.start(m, req).unwrap();
    let done: serde_json::Value = serde_json::from_str(&s.finish(g).unwrap()).unwrap();
    let doc: serde_json::Value = serde_json::from_str(done["text"].as_str().unwrap()).unwrap();
    assert!(doc["ok"].is_boolean(), "{done}");
    assert_eq!(done["finish_reason"], "stop");
    let e = s.start(m, br#"{"prompt": "a", "response_format": {"type": "yaml"}}"#).unwrap_err();
    assert!(e.contains("unknown response format type"), "{e}");
}

#[test]
fn bad_input_is_a_message() {
    let mut s = State::default();
    assert!(s.load(b"GGUF but no more".to_vec(), b"").unwrap_err().contains("not a model this engine reads"));
    assert!(s.load(std::fs::read(STORIES).unwrap(), b"{\"context\": \"big\"}").unwrap_err().contains("bad load options"));
    assert!(s.load(std::fs::read(STORIES).unwrap(), b"{\"cache_type\": \"q8\"}").unwrap_err().contains("unknown KV cache type \"q8\": one of f32, f16"));
    let m = s.load(std::fs::read(STORIES).unwrap(), b"{\"parallel\": 2}").unwrap();
    assert!(s.start(m, b"{").unwrap_err().contains("bad generate request"));
    assert!(s.start(m, br#"{"prompt": "a", "top_p": 2}"#).unwrap_err().contains("top_p = 2 is out of range"));
    assert!(s.detokenize(m, b"[1, 70000]").unwrap_err().contains("outside the vocabulary"));
    assert!(s.info(m + 1).unwrap_err().contains("no model with handle"));
    s.close(m).unwrap();
    assert!(s.close(m).is_err());
}
