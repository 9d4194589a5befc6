//! One function per input surface. Each returns quietly on input that is
//! rejected with an error, and panics (which libFuzzer reports as a crash)
//! where something that must hold does not.

use crate::{scratch, split_parts, testdata};
use bitnet_autotune::db::Database;
use bitnet_codegen::cpu::Isa;
use bitnet_codegen::schedule::Pinned;
use bitnet_frontends::chat::{render, Message};
use bitnet_frontends::gguf::GgufFile;
use bitnet_frontends::model::Model;
use bitnet_frontends::tokenizer::{TextStream, Tokenizer, VocabParts};
use bitnet_runtime::{BackendKind, Engine, EngineOptions, LoadOptions, SamplerConfig};
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// The GGUF reader: whatever it accepts has every tensor's bytes inside
/// the file, of the size its type and shape say; metadata prints; the
/// tokenizer reader accepts or refuses it with an error.
pub fn gguf(data: &[u8]) {
    let Ok(f) = GgufFile::from_vec(data.to_vec()) else { return };
    for (key, value) in &f.metadata {
        std::hint::black_box(format!("{key} = {value}"));
    }
    for t in &f.tensors {
        assert_eq!(t.dtype.bytes_for(t.elems()), Some(t.size), "tensor {}: size does not match its type and shape", t.name);
        let bytes = f.data(t);
        assert_eq!(bytes.len(), t.size, "tensor {}: data slice", t.name);
        std::hint::black_box(bytes.iter().fold(0u8, |a, &b| a ^ b));
    }
    if let Ok(parts) = VocabParts::from_gguf(&f) {
        std::hint::black_box(parts.to_gguf());
    }
    let _ = Tokenizer::from_gguf(&f);
}

/// Positions each engine the fuzzers open holds: the KV cache a user asks
/// for (`-c`), so that only the file's size bounds what is allocated.
const CONTEXT: usize = 16;

fn engine_options(backend: BackendKind, isa: Option<Isa>) -> EngineOptions {
    EngineOptions {
        load: LoadOptions { threads: 1, backend, pinned: Pinned { isa, ..Pinned::default() }, context: Some(CONTEXT), tuning: false, ..LoadOptions::default() },
        ..EngineOptions::default()
    }
}

/// One step of a three-token prompt; the logits are finite or NaN, but
/// there is one row of the vocabulary's size.
fn step_once(engine: &Engine) {
    let vocab = engine.vocab() as u32;
    let mut seq = engine.new_sequence(SamplerConfig::default()).expect("a free-text sequence");
    seq.prompt(&[1 % vocab, 2 % vocab, 3 % vocab]);
    let results = engine.step(&mut [&mut seq]);
    assert_eq!(results.len(), 1);
    if results[0].is_ok() {
        assert_eq!(seq.last_logits().map(<[f32]>::len), Some(vocab as usize), "logits of the last prompt token");
        let _ = seq.sample();
    }
}

/// A small GGUF model (the seeds are synthetic ternary models) opened as a
/// user opens it and stepped once on the interpreter and on the compiled
/// backend with every ISA this CPU has.
pub fn model(data: &[u8]) {
    // Cheap refusals first: only files that parse as a model are written out.
    let Ok(f) = GgufFile::from_vec(data.to_vec()) else { return };
    if Model::from_file(f).is_err() {
        return;
    }
    let path = scratch("model.gguf");
    std::fs::write(&path, data).expect("writing the scratch model");
    let runs = [(BackendKind::Interp, None)].into_iter().chain(Isa::ALL.into_iter().filter(|i| i.available()).map(|i| (BackendKind::Compiled, Some(i))));
    for (backend, isa) in runs {
        if let Ok(engine) = Engine::open(&path, &engine_options(backend, isa)) {
            step_once(&engine);
        }
    }
}

/// A Hugging Face folder: `config.json`, `model.safetensors` and, if the
/// input has a third part, `model.safetensors.index.json` (its shards are
/// copies of the second part). The tokenizer is stories260K's, unmutated.
/// Opened as a model, its graph built and stepped on the interpreter.
pub fn hf(data: &[u8]) {
    static TOKENIZER: OnceLock<Vec<u8>> = OnceLock::new();
    let tokenizer =
        TOKENIZER.get_or_init(|| std::fs::read(testdata().join("models/stories260K/hf/tokenizer.json")).expect("testdata: stories260K tokenizer.json"));
    let parts = split_parts(data, 3);
    let dir = scratch("hf");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).expect("writing a scratch file");
    write("config.json", parts[0]);
    write("tokenizer.json", tokenizer);
    let weights = parts.get(1).copied().unwrap_or_default();
    write("model.safetensors", weights);
    if let Some(index) = parts.get(2) {
        write("model.safetensors.index.json", index);
        let shards: Vec<String> = serde_json::from_slice::<serde_json::Value>(index)
            .ok()
            .and_then(|v| v["weight_map"].as_object().map(|m| m.values().filter_map(|f| f.as_str().map(String::from)).collect()))
            .unwrap_or_default();
        for name in shards.iter().filter(|n| is_plain_file_name(n)).take(4) {
            write(name, weights);
        }
    }
    let Ok(engine) = Engine::open(&dir, &engine_options(BackendKind::Interp, None)) else { return };
    step_once(&engine);
}

fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 128
        && !name.contains(['/', '\\', '\0'])
        && name != "."
        && name != ".."
        && name != "config.json"
        && name != "tokenizer.json"
}

/// A compiled artifact (`.bnx`): loaded as `bitnet run` loads it, its
/// graph and schedule checked against its weights, then stepped once.
pub fn artifact(data: &[u8]) {
    if data.len() < 8 || &data[..8] != bitnet_runtime::artifact::MAGIC {
        return;
    }
    let path = scratch("model.bnx");
    std::fs::write(&path, data).expect("writing the scratch artifact");
    let Ok(engine) = Engine::open(&path, &engine_options(BackendKind::Compiled, None)) else { return };
    step_once(&engine);
}

/// The tokenizers of the test data: GPT-2 and LLaMA-3 byte-level BPE and
/// LLaMA's SentencePiece from GGUF vocabularies, LLaMA-3's `tokenizer.json`.
fn tokenizers() -> &'static [(&'static str, Arc<Tokenizer>)] {
    static ALL: OnceLock<Vec<(&'static str, Arc<Tokenizer>)>> = OnceLock::new();
    ALL.get_or_init(|| {
        let data = testdata();
        let gguf = |name: &str| {
            let f = GgufFile::open(&data.join("tokenizers/llama-cpp-vocab").join(name)).unwrap_or_else(|e| panic!("testdata {name}: {e}"));
            Arc::new(Tokenizer::from_gguf(&f).unwrap_or_else(|e| panic!("testdata {name}: {e}")))
        };
        let hf = |p: &Path| Arc::new(Tokenizer::from_hf_file(p).unwrap_or_else(|e| panic!("testdata {}: {e}", p.display())));
        vec![
            ("gpt-2", gguf("ggml-vocab-gpt-2.gguf")),
            ("llama-bpe", gguf("ggml-vocab-llama-bpe.gguf")),
            ("llama-spm", gguf("ggml-vocab-llama-spm.gguf")),
            ("llama3-hf", hf(&data.join("tokenizers/llama3-hf/tokenizer.json"))),
        ]
    })
}

/// Byte 0 picks a tokenizer, byte 1 the mode; the rest is text to encode
/// or little-endian ids to decode. Byte-level BPE encodes any text so that
/// it decodes back exactly; streamed text equals the whole decoded text.
pub fn tokenizer(data: &[u8]) {
    let [which, mode, rest @ ..] = data else { return };
    let all = tokenizers();
    let (name, tok) = &all[*which as usize % all.len()];
    let vocab = tok.vocab_size() as u32;
    if mode & 1 == 0 {
        let text = String::from_utf8_lossy(rest);
        let (add_bos, special) = (mode & 2 != 0, mode & 4 != 0);
        let Ok(ids) = tok.encode(&text, add_bos, special) else { return };
        assert!(ids.iter().all(|&i| i < vocab), "{name}: an id outside the vocabulary of {vocab}");
        if !add_bos && !special && *name != "llama-spm" {
            assert_eq!(tok.decode(None, &ids), text, "{name}: decode(encode(text)) must give the text back");
        }
        stream_matches(tok, &ids);
    } else {
        let ids: Vec<u32> = rest.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) % (vocab + 8)).collect();
        std::hint::black_box(tok.decode_text(&ids));
        let context = ids.first().copied().filter(|_| mode & 2 != 0);
        std::hint::black_box(tok.decode(context, &ids));
        if *name != "llama3-hf" {
            stream_matches(tok, &ids);
        }
    }
}

/// Streaming `ids` one at a time prints exactly the text they decode to.
fn stream_matches(tok: &Arc<Tokenizer>, ids: &[u32]) {
    let mut stream = TextStream::new(tok.clone(), None);
    let mut printed: String = ids.iter().map(|&id| stream.push(id)).collect();
    printed += &stream.finish();
    assert_eq!(printed, tok.decode(None, ids), "streamed text differs from the decoded text");
}

/// A chat template (the first part) and messages (the other parts, roles
/// in turn system, user, assistant, user, ...) through the renderer:
/// rendering ends in bounded time and output, with text or an error.
pub fn chat_template(data: &[u8]) {
    let parts = split_parts(data, 9);
    let Ok(template) = std::str::from_utf8(parts[0]) else { return };
    let roles = ["system", "user", "assistant", "user"];
    let messages: Vec<Message> = parts[1..].iter().enumerate().map(|(i, p)| Message::new(roles[i % roles.len()], &String::from_utf8_lossy(p))).collect();
    let add_generation_prompt = data.len() % 2 == 1;
    if let Ok(text) = render(template, &messages, add_generation_prompt, "<s>", "</s>") {
        let limit = bitnet_frontends::chat::output_limit(&messages);
        assert!(text.len() <= limit, "rendered {} bytes, over the limit of {limit}", text.len());
    }
}

/// A GBNF grammar (llama-server's `grammar`, `bitnet run --grammar`):
/// written again in Lark or refused with an error, never a panic; what is
/// written has `start` first and one rule a line, each named as Lark names
/// rules.
pub fn gbnf(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(lark) = bitnet_runtime::gbnf::to_lark(text) else { return };
    assert!(lark.starts_with("start: r") && lark.ends_with('\n'), "{lark:?}");
    for line in lark.lines() {
        let (name, body) = line.split_once(": ").unwrap_or_else(|| panic!("a line that is no rule: {line:?}"));
        let named =
            name.starts_with(|c: char| c.is_ascii_lowercase()) && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        assert!(named && !body.trim().is_empty(), "{line:?}");
    }
}

/// Loads what a target keeps between inputs (tokenizers, the server), so
/// that the first input is not timed with it.
pub fn warm_up(target: &str) {
    match target {
        "tokenizer" => {
            tokenizers();
        }
        "openai_request" => {
            server();
        }
        _ => {}
    }
}

/// The JSON-lines tuning database: read, looked up as the runtime looks
/// it up, rewritten (a corrupt file is moved aside) and read back the same.
pub fn tuning_db(data: &[u8]) {
    let path = scratch("tuning.jsonl");
    let _ = std::fs::remove_file(path.with_extension("jsonl.bad"));
    std::fs::write(&path, data).expect("writing the scratch database");
    let db = Database::at(&path);
    let first = db.load();
    for r in &first.records {
        let (tuned, _) = db.source(&r.fingerprint, r.threads);
        std::hint::black_box(tuned.contains(&r.key));
        let (cuda, _) = db.cuda_source(&r.fingerprint);
        std::hint::black_box(cuda.contains(&r.key));
    }
    if db.merge(&[]).is_ok() {
        let again = db.load();
        assert!(again.problems.is_empty(), "a rewritten database has problems: {:?}", again.problems);
        if first.is_usable() {
            assert_eq!(again.records, first.records, "records changed on a rewrite");
        }
    }
    if let Ok(dir) = std::fs::read_dir(path.parent().expect("scratch has a parent")) {
        for e in dir.flatten().filter(|e| e.file_name().to_string_lossy().contains(".bad-")) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The server's router on stories260K (with LLaMA-3's chat template) and
/// the runtime it answers from, made once.
struct Server {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let path = testdata().join("models/stories260K/stories260K.gguf");
        let mut opts = EngineOptions { chat_template: Some(bitnet_frontends::chat::LLAMA3_TEMPLATE.into()), ..engine_options(BackendKind::Compiled, None) };
        // Room for the seeds' prompts and a few dozen tokens: generation,
        // not parsing, is where a request's time goes.
        opts.load.context = Some(96);
        opts.parallel = 4;
        let engine = Arc::new(Engine::open(&path, &opts).expect("testdata: stories260K"));
        let mut config = bitnet_server::ServerConfig::new("stories");
        config.scheduler.max_queue = 1 << 16;
        let (router, _state) = bitnet_server::app(engine, config);
        Server { rt: tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime"), router }
    })
}

/// The server's router, as a client reaches it: byte 0 picks the endpoint,
/// the rest is the request body. Any answer but a server error (5xx other
/// than 503, a full queue) is fine; a 200 that is not a stream is JSON.
pub fn openai_request(data: &[u8]) {
    use axum::body::{to_bytes, Body};
    use axum::http::Request;
    use tower::ServiceExt;
    let server = server();
    let [which, body @ ..] = data else { return };
    let paths = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"];
    let path = paths[*which as usize % paths.len()];
    let request = Request::post(path).header("content-type", "application/json").body(Body::from(body.to_vec())).expect("a request");
    server.rt.block_on(async {
        let response = server.router.clone().oneshot(request).await.expect("the router answers");
        let status = response.status().as_u16();
        let stream = response.headers().get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let bytes = to_bytes(response.into_body(), usize::MAX).await.expect("the whole body");
        assert!(status < 500 || status == 503, "{path}: status {status}: {}", String::from_utf8_lossy(&bytes));
        if status == 200 && !stream {
            assert!(serde_json::from_slice::<serde_json::Value>(&bytes).is_ok(), "{path}: a 200 that is not JSON");
        }
    });
}
