//! The bodies of the fuzz targets: one function per input surface that
//! strangers can hand bitnet-rs. Each takes arbitrary bytes, must never
//! panic, hang or allocate beyond a bound set by the input's size, and
//! asserts what must hold of whatever the parsers accept.
//!
//! `fuzz/` (cargo-fuzz, libFuzzer) calls them with mutated inputs; the
//! tests of this crate replay every seed under `fuzz/seeds/<target>/` and
//! every input that ever crashed under `fuzz/regressions/<target>/`, so a
//! crash once found stays fixed without a fuzzer.
//!
//! ```
//! use bitnet_fuzzing::{join_parts, split_parts, target};
//!
//! // A multi-file input (an HF folder, a template and its messages) is one
//! // byte string with its parts kept apart by a separator line.
//! let input = join_parts(&[b"{\"model_type\": \"llama\"}", b"not safetensors"]);
//! assert_eq!(split_parts(&input, 3), vec![&b"{\"model_type\": \"llama\"}"[..], &b"not safetensors"[..]]);
//!
//! // A target takes any bytes: garbage is an error inside it, never a panic.
//! let gguf = target("gguf").expect("a target of that name");
//! gguf(b"GGUF\x03\x00\x00\x00 and then nothing sensible");
//! let tuning_db = target("tuning_db").unwrap();
//! tuning_db(b"{\"not\": \"a record\"}\n\xff\xfe");
//! assert!(target("no such target").is_none());
//! ```

mod inputs;
mod targets;

pub use inputs::{join_parts, split_parts, PART_SEPARATOR};
pub use targets::*;

use std::path::PathBuf;

/// A fuzz target: bytes in, a panic on any failure.
pub type Target = fn(&[u8]);

/// Every target, by its name under `fuzz/fuzz_targets`, `fuzz/seeds` and
/// `fuzz/regressions`.
pub const TARGETS: [(&str, Target); 9] = [
    ("gguf", gguf),
    ("model", model),
    ("hf", hf),
    ("artifact", artifact),
    ("tokenizer", tokenizer),
    ("chat_template", chat_template),
    ("tuning_db", tuning_db),
    ("openai_request", openai_request),
    ("gbnf", gbnf),
];

/// The target of that name.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// The repository's `testdata/` (or `BITNET_DATA`).
pub fn testdata() -> PathBuf {
    std::env::var_os("BITNET_DATA").map_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata")), PathBuf::from)
}

/// The repository's `fuzz/` folder.
pub fn fuzz_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz"))
}

/// A file in this thread's scratch folder, for targets whose input must be
/// a file or a folder (models are opened by path, as users open them).
pub fn scratch(name: &str) -> PathBuf {
    thread_local! {
        static DIR: PathBuf = {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let d = std::env::temp_dir().join(format!("bitnet-fuzz-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&d).expect("creating the fuzz scratch folder");
            d
        };
    }
    DIR.with(|d| d.join(name))
}
