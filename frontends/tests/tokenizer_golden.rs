//! llama.cpp's golden tokenizer cases, on the real vocabularies in
//! `testdata/` (these tests fail, not skip, when it is missing).

use bitnet_frontends::gguf::GgufFile;
use bitnet_frontends::tokenizer::Tokenizer;
use std::path::PathBuf;

fn data(rel: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata").join(rel);
    assert!(p.exists(), "test data {} is missing (testdata/ is part of the repository)", p.display());
    p
}

fn cases(vocab: &str) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(data(&format!("tokenizers/llama-cpp-vocab/{vocab}.inp"))).unwrap();
    let out = std::fs::read_to_string(data(&format!("tokenizers/llama-cpp-vocab/{vocab}.out"))).unwrap();
    let mut texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    if texts.last() == Some(&"") {
        texts.pop();
    }
    let ids: Vec<Vec<u32>> = out.lines().map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect()).collect();
    assert_eq!(texts.len(), ids.len(), "{vocab}: inputs and outputs differ in count");
    texts.into_iter().map(String::from).zip(ids).collect()
}

fn gguf_tokenizer(vocab: &str) -> Tokenizer {
    let f = GgufFile::open(&data(&format!("tokenizers/llama-cpp-vocab/{vocab}"))).unwrap();
    Tokenizer::from_gguf(&f).unwrap()
}

fn check(vocab: &str) {
    let t = gguf_tokenizer(vocab);
    let mut failures = Vec::new();
    for (text, want) in cases(vocab) {
        let got = t.encode(&text, false, false).unwrap();
        if got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{vocab}: {} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn llama_bpe_golden() {
    check("ggml-vocab-llama-bpe.gguf");
}

#[test]
fn llama_spm_golden() {
    check("ggml-vocab-llama-spm.gguf");
}

#[test]
fn gpt2_golden() {
    check("ggml-vocab-gpt-2.gguf");
}

#[test]
fn llama3_tokenizer_json_agrees_with_the_gguf_vocabulary() {
    let hf = Tokenizer::from_hf_file(&data("tokenizers/llama3-hf/tokenizer.json")).unwrap();
    for (text, want) in cases("ggml-vocab-llama-bpe.gguf") {
        assert_eq!(hf.encode(&text, false, false).unwrap(), want, "{text:?}");
    }
    assert_eq!(hf.encode("Hello world", false, false).unwrap(), vec![9906, 1917]);
    assert_eq!(hf.bos, Some(128000));
}

#[test]
fn encode_then_decode_round_trips() {
    for vocab in ["ggml-vocab-llama-bpe.gguf", "ggml-vocab-gpt-2.gguf", "ggml-vocab-llama-spm.gguf"] {
        let t = gguf_tokenizer(vocab);
        for (text, _) in cases(vocab) {
            let ids = t.encode(&text, true, false).unwrap();
            assert_eq!(t.decode_text(&ids), text, "{vocab}");
        }
    }
    let hf = Tokenizer::from_hf_file(&data("tokenizers/llama3-hf/tokenizer.json")).unwrap();
    for (text, _) in cases("ggml-vocab-llama-bpe.gguf") {
        let ids = hf.encode(&text, false, false).unwrap();
        assert_eq!(hf.decode_text(&ids), text);
    }
}

/// Each token's bytes (what constrained decoding matches grammars
/// against) add up to the text, for a byte-level tokenizer.json and a
/// SentencePiece one with byte fallback.
#[test]
fn token_bytes_spell_the_text_for_tokenizer_json_files() {
    let bytes = |t: &Tokenizer, ids: &[u32]| {
        let mut out = Vec::new();
        ids.iter().for_each(|&id| t.token_bytes(id, &mut out));
        String::from_utf8(out).unwrap()
    };
    let hf = Tokenizer::from_hf_file(&data("tokenizers/llama3-hf/tokenizer.json")).unwrap();
    for (text, _) in cases("ggml-vocab-llama-bpe.gguf") {
        assert_eq!(bytes(&hf, &hf.encode(&text, false, false).unwrap()), text);
    }
    let spm = Tokenizer::from_hf_file(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/models/stories260K/hf/tokenizer.json"))).unwrap();
    let text = "Once upon a time, Lily saw 3 cats.\nThe café was über nice!";
    let ids = spm.encode(text, false, false).unwrap();
    assert!(ids.iter().any(|&id| spm.piece(id).is_some_and(|p| p.starts_with("<0x"))), "the text needs byte fallback");
    assert_eq!(bytes(&spm, &ids).strip_prefix(' ').unwrap(), text, "the pieces' leading ▁ is a space");
}

#[test]
fn special_token_text_is_special_only_when_asked() {
    let t = gguf_tokenizer("ggml-vocab-llama-bpe.gguf");
    let text = "<|start_header_id|>user<|end_header_id|>";
    let plain = t.encode(text, false, false).unwrap();
    assert!(plain.len() > 3 && plain.iter().all(|&id| id < 128000), "{plain:?}");
    let special = t.encode(text, false, true).unwrap();
    assert_eq!(special, vec![128006, 882, 128007]);
    assert!(t.is_eog(128009), "<|eot_id|> ends a turn");
}

/// GPT-2's vocabulary under another pre-tokenizer name.
fn gpt2_vocab_as(pre: &str) -> Tokenizer {
    use bitnet_frontends::gguf::GgufWriter;
    use bitnet_frontends::tokenizer::VocabParts;
    let f = GgufFile::open(&data("tokenizers/llama-cpp-vocab/ggml-vocab-gpt-2.gguf")).unwrap();
    let mut parts = VocabParts::from_gguf(&f).unwrap();
    parts.pre = pre.into();
    let mut w = GgufWriter::new();
    for (k, v) in parts.to_gguf() {
        w.set(&k, v);
    }
    let path = std::env::temp_dir().join(format!("bitnet-vocab-{pre}-{}.gguf", std::process::id()));
    w.write_file(&path, |_| unreachable!("no tensors")).unwrap();
    let t = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    t
}

#[test]
fn falcon3_pre_tokenizer_splits_punctuation_then_words_then_single_digits() {
    let pieces = |t: &Tokenizer, text: &str| -> Vec<String> {
        t.encode(text, false, false).unwrap().iter().map(|&i| t.piece(i).unwrap().replace('\u{120}', " ")).collect()
    };
    let (falcon3, gpt2) = (gpt2_vocab_as("falcon3"), gpt2_vocab_as("gpt-2"));
    // Digits one by one (GPT-2 keeps a number whole where its merges allow).
    assert_eq!(pieces(&falcon3, "year 2024"), ["year", " ", "2", "0", "2", "4"]);
    assert!(pieces(&gpt2, "year 2024").len() < 6, "{:?}", pieces(&gpt2, "year 2024"));
    // Punctuation is split off first, so the apostrophe of "'t" stands alone.
    assert_eq!(pieces(&falcon3, "don't"), ["don", "'", "t"]);
    assert_eq!(pieces(&gpt2, "don't"), ["don", "'t"]);
    assert_eq!(pieces(&gpt2_vocab_as("falcon_e"), "don't 42"), pieces(&falcon3, "don't 42"));
}

/// Streaming the ids of every golden text one at a time (after a context
/// token, and after none) prints exactly their decoded text, and holds back
/// nothing once a character is whole.
#[test]
fn streamed_text_equals_the_decoded_text() {
    use bitnet_frontends::tokenizer::TextStream;
    use std::sync::Arc;
    let hf = Arc::new(Tokenizer::from_hf_file(&data("tokenizers/llama3-hf/tokenizer.json")).unwrap());
    let vocabs = ["ggml-vocab-llama-bpe.gguf", "ggml-vocab-llama-spm.gguf", "ggml-vocab-gpt-2.gguf"];
    let mut all: Vec<(String, Arc<Tokenizer>, Vec<String>)> =
        vocabs.iter().map(|v| (v.to_string(), Arc::new(gguf_tokenizer(v)), cases(v).into_iter().map(|c| c.0).collect())).collect();
    all.push(("llama3 tokenizer.json".into(), hf, cases("ggml-vocab-llama-bpe.gguf").into_iter().map(|c| c.0).collect()));
    let mut streamed_tokens = 0;
    for (name, tok, texts) in &all {
        for text in texts.iter().map(String::as_str).chain(["héllo wörld 🦙🦙 漢字 \u{1F600}"]) {
            let ids = tok.encode(text, false, false).unwrap();
            for context in [None, ids.first().copied()] {
                let ids = if context.is_some() { &ids[1..] } else { &ids[..] };
                // (A context token may end inside a character, whose rest
                // then decodes to U+FFFD, streamed or not.)
                let whole = tok.decode(context, ids);
                let mut stream = TextStream::new(tok.clone(), context);
                let mut printed = String::new();
                for &id in ids {
                    let piece = stream.push(id);
                    assert!(!piece.contains('\u{FFFD}') || whole.contains('\u{FFFD}'), "{name}: {text:?}: a partial character printed");
                    printed += &piece;
                }
                let rest = stream.finish();
                assert!(rest.is_empty(), "{name}: {text:?}: {rest:?} held back to the end");
                assert_eq!(printed, whole, "{name}: {text:?} streamed after {context:?}");
                streamed_tokens += ids.len();
            }
        }
    }
    assert!(streamed_tokens > 1000, "only {streamed_tokens} tokens streamed");
}
