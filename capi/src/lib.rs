//! The C API: opaque engine and sequence handles over the runtime's
//! [`Engine`] and [`TextGeneration`]. Every function catches panics (none
//! unwinds into C) and reports failure as a [`BitnetStatus`], with the
//! message in a thread-local string that [`bitnet_last_error`] returns.
//!
//! From C, see `capi/include/bitnet.h` and `examples/c/main.c`. The same
//! calls from Rust, through the `rlib` (open, tokenize, close; a bad call
//! is a status, never a crash):
//!
//! ```
//! use bitnet_capi::*;
//! use std::ffi::CString;
//!
//! let path = CString::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/models/stories260K/stories260K.gguf")).unwrap();
//! let options = BitnetEngineOptions::default(); // C: bitnet_engine_options_default()
//! let mut engine = std::ptr::null_mut();
//! assert!(matches!(bitnet_engine_open(path.as_ptr(), &options, &mut engine), BitnetStatus::Ok));
//! let text = CString::new("Once upon a time").unwrap();
//! let (mut ids, mut n) = ([0u32; 16], 0usize);
//! assert!(matches!(bitnet_tokenize(engine, text.as_ptr(), true, ids.as_mut_ptr(), ids.len(), &mut n), BitnetStatus::Ok));
//! assert_eq!(&ids[..n], [1, 403, 407, 261, 378]);
//! // Too small a buffer: a status and the size needed.
//! assert!(matches!(bitnet_tokenize(engine, text.as_ptr(), true, ids.as_mut_ptr(), 2, &mut n), BitnetStatus::BufferTooSmall));
//! assert_eq!(n, 5);
//! bitnet_engine_close(engine);
//! ```

// The functions are the C boundary: they check their pointers for null and
// the header says what they need of the caller's; Rust calls them only in
// tests. Marking them `unsafe` would change nothing for C.
#![allow(clippy::not_unsafe_ptr_arg_deref)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod versioned;

use bitnet_codegen::cpu::ternary::Packing;
use bitnet_codegen::schedule::{HeadQuant, Pinned};
use bitnet_runtime::{
    BackendKind, Device, Engine, EngineOptions, GenerateOptions, KvType, LoadOptions, OutputFormat, RuntimeError, SamplerConfig, TextGeneration,
};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::mem::offset_of;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use versioned::Versioned;

/// What a call returns: 0 on success.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitnetStatus {
    Ok = 0,
    /// A null pointer, a bad option, text that is not UTF-8, an id outside
    /// the vocabulary.
    InvalidArgument = 1,
    /// The model file or folder cannot be read, or is not a model.
    ModelLoad = 2,
    /// The prompt does not fit the context, or the KV budget is full.
    ContextFull = 3,
    /// A caller's buffer is too small; the size needed is reported.
    BufferTooSmall = 4,
    /// Anything else the engine reported.
    Runtime = 5,
    /// A bug: a panic inside the library, caught at the boundary.
    Internal = 6,
}

/// How to open an engine. Fill it with `bitnet_engine_options_default()`
/// (an inline function of this header: it passes the struct's size as this
/// header declares it to `bitnet_engine_options_init`). New options are
/// added at the end: a library newer than the caller's header gives the
/// options the caller's struct lacks their defaults; an older one refuses a
/// struct longer than its own. (Callers built against a header from before
/// `struct_size` existed must be rebuilt.) Every `bool` field is listed in
/// its `Versioned::BOOLS`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BitnetEngineOptions {
    /// `sizeof(BitnetEngineOptions)` as the caller's header declares it.
    pub struct_size: u32,
    /// Threads; 0: every core (as the CLI).
    pub threads: u32,
    /// Context size per sequence; 0: the model's.
    pub context: u32,
    /// Sequences expected at once: with the context, sizes the KV cache.
    pub parallel: u32,
    /// Quantize the output head to int8 at load (lossy, faster decode).
    pub head_q8: bool,
    /// Ignore the tuning database (default tiles).
    pub no_tune: bool,
    /// Run on the reference interpreter instead of compiled kernels.
    pub interpreter: bool,
    /// Quantize the output head to 4-bit groups of 32 at load (lossier than
    /// `head_q8`, fewer bytes; not with it).
    pub head_q4: bool,
    /// How the ternary weights are packed: `BITNET_PACKING_AUTO`,
    /// `BITNET_PACKING_2BIT` or `BITNET_PACKING_1_6BIT`.
    pub packing: u32,
    /// How the KV cache holds keys and values: `BITNET_CACHE_F32` or
    /// `BITNET_CACHE_F16` (half the memory, lossy; the CPU only).
    pub cache_type: u32,
}

/// `BitnetEngineOptions::packing`: the tuning database's choice, else this
/// machine's calibration's (as the CLI without `--packing`).
pub const BITNET_PACKING_AUTO: u32 = 0;
/// Four ternary codes a byte.
pub const BITNET_PACKING_2BIT: u32 = 2;
/// Five ternary codes a byte: 20% fewer bytes, more work to unpack; the
/// same results.
pub const BITNET_PACKING_1_6BIT: u32 = 16;

/// `BitnetEngineOptions::cache_type`: keys and values as computed.
pub const BITNET_CACHE_F32: u32 = 0;
/// `BitnetEngineOptions::cache_type`: keys and values rounded to f16.
pub const BITNET_CACHE_F16: u32 = 1;

/// How a sequence samples. Fill it with `bitnet_sampling_default()` (the
/// CLI's defaults; temperature 0 is greedy), which sets `struct_size` as
/// for `BitnetEngineOptions`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BitnetSampling {
    /// `sizeof(BitnetSampling)` as the caller's header declares it.
    pub struct_size: u32,
    pub temperature: f32,
    /// 0: every token.
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    /// 1.0: off.
    pub repeat_penalty: f32,
    pub seed: u64,
    /// Go on past the end-of-generation token.
    pub ignore_eos: bool,
    /// Unused and never read: the struct has no implicit padding, so that
    /// an option added later takes bytes of its own.
    pub reserved: [u8; 7],
}

// SAFETY: repr(C), `struct_size` first, no padding (the test below), its
// bools listed, every other field an integer; the sizes fit (below).
unsafe impl Versioned for BitnetEngineOptions {
    const NAME: &'static str = "BitnetEngineOptions";
    const DEFAULT_FN: &'static str = "bitnet_engine_options_default";
    /// A release that adds options appends its size here.
    const RELEASED: &'static [usize] = &[28];
    const BOOLS: &'static [usize] = &[
        offset_of!(BitnetEngineOptions, head_q8),
        offset_of!(BitnetEngineOptions, no_tune),
        offset_of!(BitnetEngineOptions, interpreter),
        offset_of!(BitnetEngineOptions, head_q4),
    ];

    fn defaults() -> Self {
        BitnetEngineOptions::default()
    }
}

// SAFETY: as for BitnetEngineOptions.
unsafe impl Versioned for BitnetSampling {
    const NAME: &'static str = "BitnetSampling";
    const DEFAULT_FN: &'static str = "bitnet_sampling_default";
    const RELEASED: &'static [usize] = &[40];
    const BOOLS: &'static [usize] = &[offset_of!(BitnetSampling, ignore_eos)];

    fn defaults() -> Self {
        BitnetSampling::default()
    }
}

const _: () = assert!(versioned::releases_fit(BitnetEngineOptions::RELEASED, size_of::<BitnetEngineOptions>()));
const _: () = assert!(versioned::releases_fit(BitnetSampling::RELEASED, size_of::<BitnetSampling>()));

/// A loaded model. Opaque.
pub struct BitnetEngine {
    engine: Arc<Engine>,
}

/// One conversation's sampling settings (and, while a generation runs, its
/// place in the KV cache). Opaque.
pub struct BitnetSequence {
    engine: Arc<Engine>,
    sampling: BitnetSampling,
    /// What `bitnet_sequence_set_logit_bias`,
    /// `bitnet_sequence_set_json_schema` and `bitnet_sequence_set_grammar`
    /// add to `sampling`.
    logit_bias: Vec<(u32, f32)>,
    format: Option<OutputFormat>,
}

/// A bias added to one token's logit before sampling (OpenAI's and
/// llama.cpp's `logit_bias`); `-INFINITY` bans the token.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BitnetLogitBias {
    pub token: u32,
    pub bias: f32,
}

/// Called with each piece of generated text (UTF-8, `len` bytes, not
/// NUL-terminated) and the caller's `user` pointer; return non-zero to stop.
pub type BitnetPieceCallback = Option<extern "C" fn(piece: *const c_char, len: usize, user: *mut c_void) -> c_int>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// A failure: its status and message.
struct Failure(BitnetStatus, String);

impl From<RuntimeError> for Failure {
    fn from(e: RuntimeError) -> Failure {
        let status = match &e {
            RuntimeError::Model(_) | RuntimeError::Tokenizer(_) | RuntimeError::Artifact(_) => BitnetStatus::ModelLoad,
            RuntimeError::KvFull(_) | RuntimeError::TooLong(_) => BitnetStatus::ContextFull,
            RuntimeError::Input(_) | RuntimeError::Chat(_) => BitnetStatus::InvalidArgument,
            RuntimeError::Eval(_) | RuntimeError::Compile(_) => BitnetStatus::Runtime,
        };
        Failure(status, e.to_string())
    }
}

fn invalid(msg: impl Into<String>) -> Failure {
    Failure(BitnetStatus::InvalidArgument, msg.into())
}

/// Runs `f`, turning an error or a panic into a status and the message.
fn guard(f: impl FnOnce() -> Result<(), Failure>) -> BitnetStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => BitnetStatus::Ok,
        Ok(Err(Failure(status, msg))) => {
            set_error(&msg);
            status
        }
        Err(panic) => {
            let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default();
            set_error(&format!("internal error (a bug in bitnet-rs): {what}"));
            BitnetStatus::Internal
        }
    }
}

fn nonnull<'a, T>(p: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: the caller passes a pointer from this library (or null).
    unsafe { p.as_ref() }.ok_or_else(|| invalid(format!("{what} is null")))
}

fn text<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(invalid(format!("{what} is null")));
    }
    // SAFETY: the caller passes a NUL-terminated string.
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|_| invalid(format!("{what} is not UTF-8")))
}

fn slice<'a, T>(p: *const T, n: usize, what: &str) -> Result<&'a [T], Failure> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(invalid(format!("{what} is null")));
    }
    // SAFETY: the caller passes `n` readable elements.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// Copies `src` into the caller's buffer, reporting the length in `*n`
/// (also when the buffer is too small).
fn copy_out<T: Copy>(src: &[T], out: *mut T, cap: usize, n: *mut usize, what: &str) -> Result<(), Failure> {
    if !n.is_null() {
        // SAFETY: the caller passes a writable size_t or null.
        unsafe { *n = src.len() };
    }
    if src.len() > cap {
        return Err(Failure(BitnetStatus::BufferTooSmall, format!("{what} needs room for {} elements; the buffer holds {cap}", src.len())));
    }
    if !src.is_empty() {
        if out.is_null() {
            return Err(invalid(format!("{what} buffer is null")));
        }
        // SAFETY: the caller passes `cap` >= `src.len()` writable elements.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), out, src.len()) };
    }
    Ok(())
}

/// The library's version, e.g. "0.1.0" (static, never freed).
#[no_mangle]
pub extern "C" fn bitnet_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of this thread's last failed call ("" if none); valid
/// until this thread's next call into the library.
#[no_mangle]
pub extern "C" fn bitnet_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The defaults: every core, the model's context, 4 sequences, tuned.
impl Default for BitnetEngineOptions {
    fn default() -> Self {
        BitnetEngineOptions {
            struct_size: size_of::<BitnetEngineOptions>() as u32,
            threads: 0,
            context: 0,
            parallel: 4,
            head_q8: false,
            no_tune: false,
            interpreter: false,
            head_q4: false,
            packing: BITNET_PACKING_AUTO,
            cache_type: BITNET_CACHE_F32,
        }
    }
}

/// The CLI's sampling defaults (llama.cpp's), seed 0.
impl Default for BitnetSampling {
    fn default() -> Self {
        let d = SamplerConfig::default();
        BitnetSampling {
            struct_size: size_of::<BitnetSampling>() as u32,
            temperature: d.temperature,
            top_k: d.top_k as u32,
            top_p: d.top_p,
            min_p: d.min_p,
            repeat_penalty: d.repeat_penalty,
            seed: 0,
            ignore_eos: false,
            reserved: [0; 7],
        }
    }
}

/// Fills `*options`, a struct of `size` bytes, with the defaults (every
/// core, the model's context, 4 sequences, tuned) and sets its
/// `struct_size`. Called by the header's `bitnet_engine_options_default()`
/// with `sizeof(BitnetEngineOptions)`; a size no release of the library
/// had (a header newer than the library) is `InvalidArgument`, but
/// `struct_size` is still written, so that `bitnet_engine_open` refuses
/// the struct with the same message (`_default()` ignores the status).
#[no_mangle]
pub extern "C" fn bitnet_engine_options_init(options: *mut BitnetEngineOptions, size: usize) -> BitnetStatus {
    guard(|| fill(options, size, "options"))
}

/// Fills `*sampling`, a struct of `size` bytes, with the CLI's sampling
/// defaults (llama.cpp's), seed 0, as `bitnet_engine_options_init` does.
#[no_mangle]
pub extern "C" fn bitnet_sampling_init(sampling: *mut BitnetSampling, size: usize) -> BitnetStatus {
    guard(|| fill(sampling, size, "sampling"))
}

/// The `_init` functions: `*p`, a caller's struct of `size` bytes, filled.
fn fill<T: Versioned>(p: *mut T, size: usize, what: &str) -> Result<(), Failure> {
    if p.is_null() {
        return Err(invalid(format!("{what} is null")));
    }
    // SAFETY: non-null; the caller's struct is `size` bytes.
    unsafe { versioned::init(p, size) }.map_err(invalid)
}

/// A caller's struct as this library's, or the defaults for null.
fn read_or_default<T: Versioned>(p: *const T) -> Result<T, Failure> {
    if p.is_null() {
        return Ok(T::defaults());
    }
    // SAFETY: non-null and, as `bitnet.h` says, filled by its `_init`, so
    // readable for its struct_size.
    unsafe { versioned::read(p) }.map_err(invalid)
}

/// Opens a GGUF file, a Hugging Face folder or a `.bnx` artifact.
/// `options` may be null (the defaults). On success `*out` holds the
/// engine, to be closed with `bitnet_engine_close`.
#[no_mangle]
pub extern "C" fn bitnet_engine_open(path: *const c_char, options: *const BitnetEngineOptions, out: *mut *mut BitnetEngine) -> BitnetStatus {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is null"));
        }
        // SAFETY: checked non-null; the caller passes a writable pointer.
        unsafe { *out = std::ptr::null_mut() };
        let path = PathBuf::from(text(path, "path")?);
        let o = read_or_default(options)?;
        let threads = if o.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { o.threads as usize };
        let backend = if o.interpreter { BackendKind::Interp } else { BackendKind::Compiled };
        let packing = match o.packing {
            BITNET_PACKING_AUTO => None,
            BITNET_PACKING_2BIT => Some(Packing::Bits2),
            BITNET_PACKING_1_6BIT => Some(Packing::Base3),
            p => return Err(invalid(format!("packing {p}: one of BITNET_PACKING_AUTO (0), BITNET_PACKING_2BIT (2), BITNET_PACKING_1_6BIT (16)"))),
        };
        let kv_type = match o.cache_type {
            BITNET_CACHE_F32 => KvType::F32,
            BITNET_CACHE_F16 => KvType::F16,
            t => return Err(invalid(format!("cache_type {t}: one of BITNET_CACHE_F32 (0), BITNET_CACHE_F16 (1)"))),
        };
        let head = match (o.head_q8, o.head_q4) {
            (true, true) => return Err(invalid("head_q8 and head_q4 are two quantizations of one head: choose one")),
            (true, false) => HeadQuant::Q8,
            (false, true) => HeadQuant::Q4,
            (false, false) => HeadQuant::Stored,
        };
        if o.interpreter && (head != HeadQuant::Stored || packing.is_some()) {
            return Err(invalid("head_q8, head_q4 and packing pick compiled kernels: they need the compiled backend"));
        }
        let pinned = Pinned { head, packing, ..Default::default() };
        let load = LoadOptions { threads, context: (o.context > 0).then_some(o.context as usize), backend, device: Device::Cpu, pinned, tuning: !o.no_tune };
        let opts = EngineOptions { load, parallel: o.parallel.max(1) as usize, kv_type, ..EngineOptions::default() };
        let engine = Engine::open(&path, &opts).map_err(|e| Failure(BitnetStatus::ModelLoad, format!("loading {}: {e}", path.display())))?;
        let handle = Box::new(BitnetEngine { engine: Arc::new(engine) });
        // SAFETY: as above.
        unsafe { *out = Box::into_raw(handle) };
        Ok(())
    })
}

/// Closes an engine (null is ignored). Sequences still open keep the model
/// until they are freed.
#[no_mangle]
pub extern "C" fn bitnet_engine_close(engine: *mut BitnetEngine) {
    if !engine.is_null() {
        // SAFETY: a pointer from bitnet_engine_open, closed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(engine) })));
    }
}

/// Vocabulary size (0 for a null engine).
#[no_mangle]
pub extern "C" fn bitnet_vocab_size(engine: *const BitnetEngine) -> usize {
    // SAFETY: a pointer from bitnet_engine_open or null.
    unsafe { engine.as_ref() }.map_or(0, |e| e.engine.vocab())
}

/// Positions a sequence may hold (0 for a null engine).
#[no_mangle]
pub extern "C" fn bitnet_context_size(engine: *const BitnetEngine) -> usize {
    // SAFETY: as above.
    unsafe { engine.as_ref() }.map_or(0, |e| e.engine.context)
}

/// Text to token ids (BOS first when `add_bos` and the model asks for
/// one). Writes up to `cap` ids to `ids` and their count to `*n_ids`; with
/// too small a buffer, returns BUFFER_TOO_SMALL and the count needed.
#[no_mangle]
pub extern "C" fn bitnet_tokenize(
    engine: *const BitnetEngine,
    text_: *const c_char,
    add_bos: bool,
    ids: *mut u32,
    cap: usize,
    n_ids: *mut usize,
) -> BitnetStatus {
    guard(|| {
        let e = &nonnull(engine, "engine")?.engine;
        let tok = &e.tokenizer;
        let v = tok.encode(text(text_, "text")?, add_bos && tok.add_bos, false).map_err(|e| invalid(e.to_string()))?;
        copy_out(&v, ids, cap, n_ids, "the ids")
    })
}

/// Token ids to text: writes up to `cap` bytes and a NUL to `out`
/// (`cap` counts the NUL) and the text's length to `*len`; with too small
/// a buffer, returns BUFFER_TOO_SMALL and the length needed (without NUL).
#[no_mangle]
pub extern "C" fn bitnet_detokenize(engine: *const BitnetEngine, ids: *const u32, n_ids: usize, out: *mut c_char, cap: usize, len: *mut usize) -> BitnetStatus {
    guard(|| {
        let e = &nonnull(engine, "engine")?.engine;
        let ids = slice(ids, n_ids, "ids")?;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= e.vocab()) {
            return Err(invalid(format!("token id {bad} is outside the vocabulary of {}", e.vocab())));
        }
        let mut bytes = e.tokenizer.decode_text(ids).into_bytes();
        if !len.is_null() {
            // SAFETY: the caller passes a writable size_t or null.
            unsafe { *len = bytes.len() };
        }
        bytes.push(0);
        copy_out(&bytes, out.cast::<u8>(), cap, std::ptr::null_mut(), "the text")
    })
}

/// A new sequence on `engine` that samples as `sampling` says (null: the
/// defaults). Free it with `bitnet_sequence_free`.
#[no_mangle]
pub extern "C" fn bitnet_sequence_new(engine: *const BitnetEngine, sampling: *const BitnetSampling, out: *mut *mut BitnetSequence) -> BitnetStatus {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is null"));
        }
        let e = nonnull(engine, "engine")?.engine.clone();
        let s = read_or_default(sampling)?;
        sampler(&s).check().map_err(|e| invalid(e.to_string()))?;
        // SAFETY: checked non-null; the caller passes a writable pointer.
        unsafe { *out = Box::into_raw(Box::new(BitnetSequence { engine: e, sampling: s, logit_bias: Vec::new(), format: None })) };
        Ok(())
    })
}

/// Frees a sequence (null is ignored).
#[no_mangle]
pub extern "C" fn bitnet_sequence_free(seq: *mut BitnetSequence) {
    if !seq.is_null() {
        // SAFETY: a pointer from bitnet_sequence_new, freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(seq) })));
    }
}

/// Sets the sequence's logit biases (`n` of them at `biases`; 0 clears
/// them) for its next generations: each token must be in the vocabulary,
/// each bias a number or `-INFINITY`.
#[no_mangle]
pub extern "C" fn bitnet_sequence_set_logit_bias(seq: *mut BitnetSequence, biases: *const BitnetLogitBias, n: usize) -> BitnetStatus {
    guard(|| {
        // SAFETY: a pointer from bitnet_sequence_new (or null), used by one thread at a time.
        let seq = unsafe { seq.as_mut() }.ok_or_else(|| invalid("sequence is null"))?;
        let logit_bias: Vec<(u32, f32)> = slice(biases, n, "biases")?.iter().map(|b| (b.token, b.bias)).collect();
        let config = SamplerConfig { logit_bias, ..sampler(&seq.sampling) };
        seq.engine.check_sampler(&config)?;
        seq.logit_bias = config.logit_bias;
        Ok(())
    })
}

/// Holds the sequence's next generations to a JSON schema (UTF-8 JSON,
/// NUL-terminated; `"{}"`: any JSON value; null: free text again), as
/// `bitnet run --json-schema` does: a generation ends when its document
/// does. A schema that is not JSON or does not compile is
/// `InvalidArgument`.
#[no_mangle]
pub extern "C" fn bitnet_sequence_set_json_schema(seq: *mut BitnetSequence, schema: *const c_char) -> BitnetStatus {
    guard(|| {
        // SAFETY: as in bitnet_sequence_set_logit_bias.
        let seq = unsafe { seq.as_mut() }.ok_or_else(|| invalid("sequence is null"))?;
        if schema.is_null() {
            seq.format = None;
            return Ok(());
        }
        let value: serde_json::Value = serde_json::from_str(text(schema, "schema")?).map_err(|e| invalid(format!("the schema is not JSON: {e}")))?;
        seq.hold_to(OutputFormat::JsonSchema(value))
    })
}

/// Holds the sequence's next generations to a GBNF grammar (UTF-8,
/// NUL-terminated; generation starts at its `root` rule; opening with
/// `%llguidance`, llguidance's Lark syntax; null: free text again), as
/// `bitnet run --grammar` does: a generation ends when its sentence does.
/// A grammar that does not compile is `InvalidArgument`, its message
/// naming the line.
#[no_mangle]
pub extern "C" fn bitnet_sequence_set_grammar(seq: *mut BitnetSequence, grammar: *const c_char) -> BitnetStatus {
    guard(|| {
        // SAFETY: as in bitnet_sequence_set_logit_bias.
        let seq = unsafe { seq.as_mut() }.ok_or_else(|| invalid("sequence is null"))?;
        if grammar.is_null() {
            seq.format = None;
            return Ok(());
        }
        seq.hold_to(OutputFormat::Grammar(text(grammar, "grammar")?.to_string()))
    })
}

impl BitnetSequence {
    /// Holds the next generations to `format`, once it compiles.
    fn hold_to(&mut self, format: OutputFormat) -> Result<(), Failure> {
        let config = SamplerConfig { format: Some(format), ..sampler(&self.sampling) };
        self.engine.sampler(config.clone())?;
        self.format = config.format;
        Ok(())
    }

    fn options(&self, max_tokens: usize, dump_logits: bool) -> GenerateOptions {
        let sampler = SamplerConfig { logit_bias: self.logit_bias.clone(), format: self.format.clone(), ..sampler(&self.sampling) };
        GenerateOptions { n_predict: max_tokens, ignore_eos: self.sampling.ignore_eos, sampler, dump_logits }
    }
}

/// The runtime's sampler settings for a C caller's.
fn sampler(s: &BitnetSampling) -> SamplerConfig {
    SamplerConfig {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: s.top_p,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        seed: s.seed,
        ..SamplerConfig::default()
    }
}

/// Generates up to `max_tokens` after `prompt` (ids used verbatim, as
/// `bitnet run --prompt-ids`), calling `on_piece` with each piece of text
/// as it becomes printable (null: no calls); a non-zero return stops the
/// generation (still BITNET_STATUS_OK). The generated ids go to `ids`
/// (null: not wanted; else room for `cap`, count in `*n_ids`).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "C" fn bitnet_generate(
    seq: *mut BitnetSequence,
    prompt: *const u32,
    n_prompt: usize,
    max_tokens: usize,
    on_piece: BitnetPieceCallback,
    user: *mut c_void,
    ids: *mut u32,
    cap: usize,
    n_ids: *mut usize,
) -> BitnetStatus {
    guard(|| {
        let seq = nonnull(seq.cast_const(), "sequence")?;
        let prompt = slice(prompt, n_prompt, "prompt")?;
        let mut g = TextGeneration::start(seq.engine.clone(), prompt, &seq.options(max_tokens, false), Vec::new())?;
        let send = |piece: &str| on_piece.is_some_and(|f| !piece.is_empty() && f(piece.as_ptr().cast(), piece.len(), user) != 0);
        let mut stopped = false;
        while let Some(piece) = g.next_piece()? {
            if send(&piece) {
                stopped = true;
                break;
            }
        }
        if !stopped {
            send(&g.rest());
        }
        if ids.is_null() {
            if !n_ids.is_null() {
                // SAFETY: the caller passes a writable size_t or null.
                unsafe { *n_ids = g.generated().len() };
            }
            return Ok(());
        }
        copy_out(g.generated(), ids, cap, n_ids, "the generated ids")
    })
}

/// The logits at every position of `ids` (used verbatim): `n_ids` rows of
/// `bitnet_vocab_size` floats into `out`, which holds `cap` floats.
#[no_mangle]
pub extern "C" fn bitnet_logits(seq: *mut BitnetSequence, ids: *const u32, n_ids: usize, out: *mut f32, cap: usize) -> BitnetStatus {
    guard(|| {
        let seq = nonnull(seq.cast_const(), "sequence")?;
        let ids = slice(ids, n_ids, "ids")?;
        let mut g = TextGeneration::start(seq.engine.clone(), ids, &seq.options(1, true), Vec::new())?;
        g.evaluate()?;
        copy_out(g.sequence().logits(), out, cap, std::ptr::null_mut(), "the logits")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The structs' sizes are those the header's releases declare, with no
    /// implicit padding (capi/src/versioned.rs): the fields' sizes add up.
    #[test]
    fn the_option_structs_have_no_padding() {
        assert_eq!(size_of::<BitnetEngineOptions>(), 6 * 4 + 4);
        assert_eq!(size_of::<BitnetEngineOptions>(), offset_of!(BitnetEngineOptions, cache_type) + 4);
        assert_eq!(size_of::<BitnetSampling>(), 6 * 4 + 8 + 1 + 7);
        assert_eq!(size_of::<BitnetSampling>(), offset_of!(BitnetSampling, reserved) + 7);
        assert_eq!(offset_of!(BitnetSampling, seed), 24);
        // Releases grow (checked at compile time) and none is forgotten.
        assert_eq!((BitnetEngineOptions::RELEASED[0], BitnetSampling::RELEASED[0]), (28, 40), "the first releases' sizes");
    }
}
