//! The C API from C and from Rust: the committed header is what cbindgen
//! generates; examples/c/main.c, built with the system C compiler against
//! the shared library, prints stories260K's known continuation, also under
//! valgrind with no errors and no leaks; bad files, bad arguments and small
//! buffers come back as status codes with messages.

use bitnet_capi::*;
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;

const KNOWN: [u32; 20] = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292];

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn stories() -> PathBuf {
    manifest().join("../testdata/models/stories260K/stories260K.gguf")
}

/// The directory holding this profile's `libbitnet_capi.so`.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

fn tool(name: &str) -> bool {
    let found = Command::new("sh").args(["-c", &format!("command -v {name}")]).output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var_os("BITNET_REQUIRE_TOOLS").is_none(), "{name} is not installed");
        eprintln!("skipped: {name} is not installed");
    }
    found
}

#[test]
fn the_committed_header_is_what_cbindgen_generates() {
    let config = cbindgen::Config::from_file(manifest().join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new().with_config(config).with_src(manifest().join("src/lib.rs")).generate().expect("cbindgen").write(&mut generated);
    let path = manifest().join("include/bitnet.h");
    if std::env::var_os("BITNET_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(committed == generated, "capi/include/bitnet.h is out of date: run BITNET_UPDATE_HEADER=1 cargo test -p bitnet-capi and commit it");
}

/// Builds examples/c/main.c against the shared library.
fn example() -> PathBuf {
    let out = std::env::temp_dir().join(format!("bitnet-capi-example-{}", std::process::id()));
    let lib = lib_dir();
    // `cargo test` builds the crate as an rlib only; build the shared
    // library (a no-op when it is up to date).
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args(["build", "--lib", "-p", "bitnet-capi"]);
    if lib.file_name().is_some_and(|n| n == "release") {
        cargo.arg("--release");
    }
    let o = cargo.output().expect("running cargo");
    assert!(o.status.success(), "cargo build -p bitnet-capi: {}", String::from_utf8_lossy(&o.stderr));
    assert!(lib.join("libbitnet_capi.so").exists(), "no libbitnet_capi.so in {}", lib.display());
    let o = Command::new("cc")
        .arg(manifest().join("../examples/c/main.c"))
        .arg("-I")
        .arg(manifest().join("include"))
        .arg("-L")
        .arg(&lib)
        .args(["-lbitnet_capi", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .output()
        .expect("running cc");
    assert!(o.status.success(), "cc: {}", String::from_utf8_lossy(&o.stderr));
    out
}

fn known_ids_line() -> String {
    KNOWN.iter().map(|i| format!(" {i}")).collect()
}

#[test]
fn the_c_example_prints_the_known_continuation() {
    if !tool("cc") {
        return;
    }
    let exe = example();
    let o = Command::new(&exe).arg(stories()).arg("20").output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.starts_with("Once upon a time, there was a little girl named Lily"), "{out}");
    assert!(err.contains("20 ids in") && err.contains(&known_ids_line()), "{err}");

    // A garbage file: status 2 (model load) and a message that names it.
    let bad = std::env::temp_dir().join(format!("bitnet-capi-bad-{}.gguf", std::process::id()));
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00not a model").unwrap();
    let o = Command::new(&exe).arg(&bad).output().unwrap();
    assert_eq!(o.status.code(), Some(BitnetStatus::ModelLoad as i32));
    assert!(String::from_utf8_lossy(&o.stderr).contains("error 2: loading"), "{}", String::from_utf8_lossy(&o.stderr));

    if tool("valgrind") {
        let o = Command::new("valgrind")
            .args(["--leak-check=full", "--errors-for-leak-kinds=definite,indirect", "--error-exitcode=99", "-q"])
            .arg(&exe)
            .arg(stories())
            .arg("20")
            .output()
            .unwrap();
        let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "valgrind found errors or leaks:\n{err}");
        assert!(out.starts_with("Once upon a time, there was a little girl named Lily") && err.contains(&known_ids_line()), "{out}\n{err}");
    }
    let _ = std::fs::remove_file(bad);
    let _ = std::fs::remove_file(exe);
}

/// A piece callback that appends to the `Vec<u8>` at `user`.
extern "C" fn collect(piece: *const std::ffi::c_char, len: usize, user: *mut std::ffi::c_void) -> std::ffi::c_int {
    // SAFETY: the test passes a Vec<u8> as `user`; the library passes `len` bytes.
    unsafe { (*user.cast::<Vec<u8>>()).extend_from_slice(std::slice::from_raw_parts(piece.cast::<u8>(), len)) };
    0
}

fn last_error() -> String {
    // SAFETY: the library returns a NUL-terminated string.
    unsafe { CStr::from_ptr(bitnet_last_error()) }.to_string_lossy().into_owned()
}

/// The logits of every position of `prompt` (512 a position, stories260K's
/// vocabulary) on an engine opened with `options`, closed after.
fn prompt_logits(path: &CStr, options: &BitnetEngineOptions, sampling: &BitnetSampling, prompt: &[u32]) -> Vec<f32> {
    let (mut engine, mut seq) = (std::ptr::null_mut(), std::ptr::null_mut());
    assert_eq!(bitnet_engine_open(path.as_ptr(), options, &mut engine), BitnetStatus::Ok, "{}", last_error());
    assert_eq!(bitnet_sequence_new(engine, sampling, &mut seq), BitnetStatus::Ok);
    let mut logits = vec![0f32; prompt.len() * 512];
    assert_eq!(bitnet_logits(seq, prompt.as_ptr(), prompt.len(), logits.as_mut_ptr(), logits.len()), BitnetStatus::Ok);
    bitnet_sequence_free(seq);
    bitnet_engine_close(engine);
    logits
}

#[test]
fn bad_arguments_and_small_buffers_are_status_codes() {
    let path = CString::new(stories().to_str().unwrap()).unwrap();
    let mut engine = std::ptr::null_mut();
    let opts = BitnetEngineOptions { threads: 1, ..BitnetEngineOptions::default() };
    assert_eq!(bitnet_engine_open(path.as_ptr(), &opts, &mut engine), BitnetStatus::Ok);
    assert_eq!(bitnet_vocab_size(engine), 512);

    let text = CString::new("Once upon a time").unwrap();
    let (mut ids, mut n) = ([0u32; 2], 0usize);
    assert_eq!(bitnet_tokenize(engine, text.as_ptr(), true, ids.as_mut_ptr(), ids.len(), &mut n), BitnetStatus::BufferTooSmall);
    assert_eq!(n, 5);
    assert!(last_error().contains("room for 5"), "{}", last_error());
    let mut ids = [0u32; 8];
    assert_eq!(bitnet_tokenize(engine, text.as_ptr(), true, ids.as_mut_ptr(), ids.len(), &mut n), BitnetStatus::Ok);
    assert_eq!(&ids[..n], &[1, 403, 407, 261, 378]);

    let (mut buf, mut len) = ([0u8; 64], 0usize);
    assert_eq!(bitnet_detokenize(engine, [9999u32].as_ptr(), 1, buf.as_mut_ptr().cast(), buf.len(), &mut len), BitnetStatus::InvalidArgument);
    assert!(last_error().contains("outside the vocabulary"));
    assert_eq!(bitnet_detokenize(engine, ids.as_ptr(), 5, buf.as_mut_ptr().cast(), 4, &mut len), BitnetStatus::BufferTooSmall);
    assert_eq!(bitnet_tokenize(std::ptr::null(), text.as_ptr(), true, ids.as_mut_ptr(), 8, &mut n), BitnetStatus::InvalidArgument);
    assert!(last_error().contains("engine is null"));

    let mut s = BitnetSampling { repeat_penalty: 0.0, ..BitnetSampling::default() };
    let mut seq = std::ptr::null_mut();
    assert_eq!(bitnet_sequence_new(engine, &s, &mut seq), BitnetStatus::InvalidArgument);
    assert!(last_error().contains("repeat_penalty = 0 is out of range: it must be > 0"), "{}", last_error());
    assert!(seq.is_null());
    assert_eq!(bitnet_sampling_init(&mut s, size_of::<BitnetSampling>()), BitnetStatus::Ok);
    assert_eq!((s.struct_size as usize, s.repeat_penalty), (size_of::<BitnetSampling>(), 1.0));
    s.struct_size = 3;
    assert_eq!(bitnet_sequence_new(engine, &s, &mut seq), BitnetStatus::InvalidArgument);
    assert!(seq.is_null() && last_error().contains("BitnetSampling.struct_size is 3"), "{}", last_error());
    let mut bytes = [0u8; 40];
    assert_eq!(size_of::<BitnetSampling>(), bytes.len());
    assert_eq!(bitnet_sampling_init(bytes.as_mut_ptr().cast(), bytes.len()), BitnetStatus::Ok);
    bytes[std::mem::offset_of!(BitnetSampling, ignore_eos)] = 2;
    assert_eq!(bitnet_sequence_new(engine, bytes.as_ptr().cast(), &mut seq), BitnetStatus::InvalidArgument);
    assert!(seq.is_null() && last_error().contains("the bool at byte 32 holds 2"), "{}", last_error());
    s = BitnetSampling::default();
    s.temperature = 0.0;
    assert_eq!(bitnet_sequence_new(engine, &s, &mut seq), BitnetStatus::Ok);
    // The engine may close first: the sequence keeps the model.
    bitnet_engine_close(engine);
    let mut out = [0u32; 20];
    let prompt = [1u32, 403, 407, 261, 378];
    assert_eq!(bitnet_generate(seq, prompt.as_ptr(), 5, 20, None, std::ptr::null_mut(), out.as_mut_ptr(), 20, &mut n), BitnetStatus::Ok);
    assert_eq!(&out[..n], &KNOWN);
    // Logit biases: +100 forces token 300 every step; a token outside
    // the vocabulary or a NaN is refused and leaves the biases as they were.
    let force = [BitnetLogitBias { token: 300, bias: 100.0 }];
    assert_eq!(bitnet_sequence_set_logit_bias(seq, force.as_ptr(), 1), BitnetStatus::Ok);
    let outside = [BitnetLogitBias { token: 512, bias: 1.0 }];
    assert_eq!(bitnet_sequence_set_logit_bias(seq, outside.as_ptr(), 1), BitnetStatus::InvalidArgument);
    assert!(last_error().contains("token id 512 is outside the vocabulary of 512"), "{}", last_error());
    let nan = [BitnetLogitBias { token: 3, bias: f32::NAN }];
    assert_eq!(bitnet_sequence_set_logit_bias(seq, nan.as_ptr(), 1), BitnetStatus::InvalidArgument);
    assert_eq!(bitnet_sequence_set_logit_bias(seq, std::ptr::null(), 2), BitnetStatus::InvalidArgument);
    assert_eq!(bitnet_generate(seq, prompt.as_ptr(), 5, 4, None, std::ptr::null_mut(), out.as_mut_ptr(), 20, &mut n), BitnetStatus::Ok);
    assert_eq!(&out[..n], &[300; 4]);
    assert_eq!(bitnet_sequence_set_logit_bias(seq, std::ptr::null(), 0), BitnetStatus::Ok);
    // A JSON schema holds the text; null lets it go free again.
    let schema = CString::new(r#"{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false}"#).unwrap();
    assert_eq!(bitnet_sequence_set_json_schema(seq, schema.as_ptr()), BitnetStatus::Ok);
    let mut text = Vec::<u8>::new();
    let user = (&mut text as *mut Vec<u8>).cast();
    assert_eq!(bitnet_generate(seq, prompt.as_ptr(), 5, 40, Some(collect), user, out.as_mut_ptr(), 20, &mut n), BitnetStatus::Ok);
    let doc: serde_json::Value = serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(&text)));
    assert!(doc["ok"].is_boolean() && n < 20, "{doc}, {n} tokens");
    for bad in [r#"{"type": "bogus"}"#, "{oops"] {
        let bad = CString::new(bad).unwrap();
        assert_eq!(bitnet_sequence_set_json_schema(seq, bad.as_ptr()), BitnetStatus::InvalidArgument);
    }
    assert!(last_error().contains("the schema is not JSON"), "{}", last_error());
    assert_eq!(bitnet_sequence_set_json_schema(seq, std::ptr::null()), BitnetStatus::Ok);
    // A GBNF grammar, the same way.
    let grammar = CString::new("root ::= (\"yes\" | \"no\") \"!\"").unwrap();
    assert_eq!(bitnet_sequence_set_grammar(seq, grammar.as_ptr()), BitnetStatus::Ok);
    text.clear();
    let user = (&mut text as *mut Vec<u8>).cast();
    assert_eq!(bitnet_generate(seq, prompt.as_ptr(), 5, 40, Some(collect), user, out.as_mut_ptr(), 20, &mut n), BitnetStatus::Ok);
    assert!(text == b"yes!" || text == b"no!", "{:?}", String::from_utf8_lossy(&text));
    let bad = CString::new("root ::= maybe").unwrap();
    assert_eq!(bitnet_sequence_set_grammar(seq, bad.as_ptr()), BitnetStatus::InvalidArgument);
    assert!(last_error().contains("rule maybe is used but never defined"), "{}", last_error());
    assert_eq!(bitnet_sequence_set_grammar(seq, std::ptr::null()), BitnetStatus::Ok);
    assert_eq!(bitnet_generate(seq, prompt.as_ptr(), 5, 20, None, std::ptr::null_mut(), out.as_mut_ptr(), 20, &mut n), BitnetStatus::Ok);
    assert_eq!(&out[..n], &KNOWN, "free text again");
    let long = vec![1u32; 5000];
    assert_eq!(bitnet_generate(seq, long.as_ptr(), long.len(), 4, None, std::ptr::null_mut(), std::ptr::null_mut(), 0, &mut n), BitnetStatus::ContextFull);
    let mut logits = vec![0f32; 5 * 512];
    assert_eq!(bitnet_logits(seq, prompt.as_ptr(), 5, logits.as_mut_ptr(), logits.len() - 1), BitnetStatus::BufferTooSmall);
    assert_eq!(bitnet_logits(seq, prompt.as_ptr(), 5, logits.as_mut_ptr(), logits.len()), BitnetStatus::Ok);
    let last = &logits[4 * 512..];
    let argmax = (0..512).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap();
    assert_eq!(argmax as u32, KNOWN[0]);
    bitnet_sequence_free(seq);

    // The head quantized to 4 bits keeps the greedy first token here; the
    // packing (moot for this float model) is checked, as are mixed-up options.
    let mut q4 = BitnetEngineOptions::default();
    (q4.threads, q4.head_q4, q4.packing) = (1, true, BITNET_PACKING_1_6BIT);
    let q4_logits = prompt_logits(&path, &q4, &s, &prompt);
    assert!(q4_logits != logits, "a 4-bit head changes the logits a little");
    let cos = |a: &[f32], b: &[f32]| {
        a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() / (a.iter().map(|x| x * x).sum::<f32>() * b.iter().map(|x| x * x).sum::<f32>()).sqrt()
    };
    assert!(cos(&q4_logits[4 * 512..], last) > 0.99, "{}", cos(&q4_logits[4 * 512..], last));

    // An f16 KV cache rounds keys and values: the logits move by little.
    let mut f16 = BitnetEngineOptions::default();
    (f16.threads, f16.cache_type) = (1, BITNET_CACHE_F16);
    let f16_logits = prompt_logits(&path, &f16, &s, &prompt);
    assert!(f16_logits != logits, "an f16 cache rounds");
    let most = f16_logits.iter().zip(&logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(most < 0.05, "{most}");
    for (bad, why) in [
        ((true, true, BITNET_PACKING_AUTO, false, BITNET_CACHE_F32), "choose one"),
        ((false, false, 7, false, BITNET_CACHE_F32), "packing 7"),
        ((false, false, BITNET_PACKING_2BIT, true, BITNET_CACHE_F32), "compiled backend"),
        ((false, false, BITNET_PACKING_AUTO, false, 2), "cache_type 2"),
    ] {
        let mut o = BitnetEngineOptions::default();
        (o.head_q8, o.head_q4, o.packing, o.interpreter, o.cache_type) = bad;
        assert_eq!(bitnet_engine_open(path.as_ptr(), &o, &mut engine), BitnetStatus::InvalidArgument);
        assert!(engine.is_null() && last_error().contains(why), "{}", last_error());
    }

    // The init functions fill a struct of the caller's size; one never
    // filled, or from a header newer than the library, is refused.
    let mut o = BitnetEngineOptions { struct_size: 0, threads: 9, ..BitnetEngineOptions::default() };
    assert_eq!(bitnet_engine_options_init(&mut o, size_of::<BitnetEngineOptions>()), BitnetStatus::Ok);
    assert_eq!((o.struct_size as usize, o.threads, o.parallel), (size_of::<BitnetEngineOptions>(), 0, 4));
    o.struct_size = 0;
    assert_eq!(bitnet_engine_open(path.as_ptr(), &o, &mut engine), BitnetStatus::InvalidArgument);
    assert!(engine.is_null() && last_error().contains("fill the struct with bitnet_engine_options_default()"), "{}", last_error());
    #[repr(C)]
    struct Newer {
        options: BitnetEngineOptions,
        later_option: u64,
    }
    let mut newer = Newer { options: BitnetEngineOptions::default(), later_option: 1 };
    let whole = std::ptr::addr_of_mut!(newer).cast::<BitnetEngineOptions>();
    assert_eq!(bitnet_engine_options_init(whole, size_of::<Newer>()), BitnetStatus::InvalidArgument);
    assert!(last_error().contains("newer bitnet.h"), "{}", last_error());
    assert_eq!((newer.options.struct_size as usize, newer.options.parallel, newer.later_option), (size_of::<Newer>(), 4, 1));
    let whole = std::ptr::addr_of!(newer).cast::<BitnetEngineOptions>();
    assert_eq!(bitnet_engine_open(path.as_ptr(), whole, &mut engine), BitnetStatus::InvalidArgument);
    assert!(engine.is_null() && last_error().contains("newer bitnet.h"), "{}", last_error());
    assert_eq!(bitnet_engine_options_init(std::ptr::null_mut(), 28), BitnetStatus::InvalidArgument);
    // A bool byte that is not 0 or 1 is refused, in every bool field.
    let bools = [
        std::mem::offset_of!(BitnetEngineOptions, head_q8),
        std::mem::offset_of!(BitnetEngineOptions, no_tune),
        std::mem::offset_of!(BitnetEngineOptions, interpreter),
        std::mem::offset_of!(BitnetEngineOptions, head_q4),
    ];
    for at in bools {
        let mut bytes = [0u8; 28];
        assert_eq!(size_of::<BitnetEngineOptions>(), bytes.len());
        assert_eq!(bitnet_engine_options_init(bytes.as_mut_ptr().cast(), bytes.len()), BitnetStatus::Ok);
        bytes[at] = 2;
        assert_eq!(bitnet_engine_open(path.as_ptr(), bytes.as_ptr().cast(), &mut engine), BitnetStatus::InvalidArgument);
        assert!(engine.is_null() && last_error().contains(&format!("the bool at byte {at} holds 2")), "{}", last_error());
    }

    let missing = CString::new("/no/such/model.gguf").unwrap();
    assert_eq!(bitnet_engine_open(missing.as_ptr(), std::ptr::null(), &mut engine), BitnetStatus::ModelLoad);
    assert!(engine.is_null() && last_error().contains("/no/such/model.gguf"));
    // SAFETY: a static NUL-terminated string.
    assert_eq!(unsafe { CStr::from_ptr(bitnet_version()) }.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}
