//! bitnet-wasm: bitnet-rs compiled to WebAssembly (`wasm32-wasip1`) for
//! JavaScript: the GGUF reader, the tokenizer, chat templates and the
//! runtime's engine on its reference interpreter (portable scalar code, no
//! JIT, one thread). `js/bitnet.mjs` wraps it; `scripts/wasm.sh` builds it
//! and runs its tests in Node.js.
//!
//! The exports are a small C ABI over the module's memory. JavaScript
//! copies a model's bytes, a string or a JSON request into memory from
//! [`bitnet_alloc`] and calls a function; what a call returns (a JSON
//! value, a piece of text, or why it failed) waits in a result buffer read
//! through [`bitnet_result_ptr`] and [`bitnet_result_len`] until the next
//! call. Handles are positive; 0 (or a negative status) means the call
//! failed and the result holds the message. Nothing panics across the
//! boundary: the module is built with `panic = "abort"`, and every error
//! is a message.

pub mod api;

use api::{Handle, State};
use std::cell::RefCell;

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
    static RESULT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn set_result(bytes: impl Into<Vec<u8>>) {
    RESULT.with(|r| *r.borrow_mut() = bytes.into());
}

/// Runs `f` on the state; an error's message becomes the result.
fn with_state<T>(fail: T, f: impl FnOnce(&mut State) -> Result<T, String>) -> T {
    match STATE.with(|s| f(&mut s.borrow_mut())) {
        Ok(v) => v,
        Err(msg) => {
            set_result(msg);
            fail
        }
    }
}

/// A status: 0 with `text` as the result, or -1 with the message.
fn text_status(r: Result<String, String>) -> i32 {
    match r {
        Ok(text) => {
            set_result(text);
            0
        }
        Err(msg) => {
            set_result(msg);
            -1
        }
    }
}

/// # Safety
/// `ptr..ptr+len` must be memory this module handed out (or `len` 0).
unsafe fn bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if len == 0 {
        return &[];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

/// # Safety
/// As [`bytes`].
unsafe fn text<'a>(ptr: *const u8, len: usize) -> Result<&'a str, String> {
    // SAFETY: the caller's contract.
    std::str::from_utf8(unsafe { bytes(ptr, len) }).map_err(|e| format!("text is not UTF-8: {e}"))
}

/// `len` bytes for the caller to fill (null if they cannot be had).
#[unsafe(no_mangle)]
pub extern "C" fn bitnet_alloc(len: usize) -> *mut u8 {
    let mut v: Vec<u8> = Vec::new();
    if v.try_reserve_exact(len).is_err() {
        return std::ptr::null_mut();
    }
    v.resize(len, 0);
    let mut v = std::mem::ManuallyDrop::new(v.into_boxed_slice());
    v.as_mut_ptr()
}

/// Gives back memory from [`bitnet_alloc`] that no call took.
///
/// # Safety
/// `ptr` and `len` must come from one [`bitnet_alloc`] not yet freed or taken.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bitnet_free(ptr: *mut u8, len: usize) {
    if !ptr.is_null() {
        // SAFETY: a boxed slice of exactly `len` bytes made by bitnet_alloc.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len)) });
    }
}

/// The last call's result: its first byte ...
#[unsafe(no_mangle)]
pub extern "C" fn bitnet_result_ptr() -> *const u8 {
    RESULT.with(|r| r.borrow().as_ptr())
}

/// ... and its length.
#[unsafe(no_mangle)]
pub extern "C" fn bitnet_result_len() -> usize {
    RESULT.with(|r| r.borrow().len())
}

/// The crate's version, as the result; returns 0.
#[unsafe(no_mangle)]
pub extern "C" fn bitnet_version() -> i32 {
    text_status(Ok(env!("CARGO_PKG_VERSION").to_string()))
}

/// Loads a GGUF model from `bytes` (memory from [`bitnet_alloc`], taken
/// whether or not it loads) with `options` (JSON, or empty): a model handle.
///
/// # Safety
/// `bytes` as [`bitnet_free`]'s; `options` as [`bytes`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bitnet_model_load(bytes_ptr: *mut u8, bytes_len: usize, options_ptr: *const u8, options_len: usize) -> Handle {
    let model = if bytes_ptr.is_null() {
        Vec::new()
    } else {
        // SAFETY: a boxed slice of exactly `bytes_len` bytes made by bitnet_alloc, now ours.
        unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(bytes_ptr, bytes_len)) }.into_vec()
    };
    // SAFETY: the caller's contract.
    let options = unsafe { bytes(options_ptr, options_len) };
    with_state(0, |s| s.load(model, options))
}

/// Frees a model: 0, or -1 for an unknown handle.
#[unsafe(no_mangle)]
pub extern "C" fn bitnet_model_free(model: Handle) -> i32 {
    text_status(STATE.with(|s| s.borrow_mut().close(model)).map(|()| String::new()))
}

/// The model's hyper-parameters as JSON: 0, or -1.
#[unsafe(no_mangle)]
pub extern "C" fn bitnet_model_info(model: Handle) -> i32 {
    text_status(STATE.with(|s| s.borrow_mut().info(model)))
}

/// The ids of `text` as a JSON list: 0, or -1.
///
/// # Safety
/// `text` as [`bytes`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bitnet_tokenize(model: Handle, text_ptr: *const u8, text_len: usize, add_bos: bool, special: bool) -> i32 {
    // SAFETY: the caller's contract.
    let text = unsafe { text(text_ptr, text_len) };
    text_status(text.and_then(|t| STATE.with(|s| s.borrow_mut().tokenize(model, t, add_bos, special))))
}

/// The text of a JSON list of ids: 0, or -1.
///
/// # Safety
/// `ids` as [`bytes`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bitnet_detokenize(model: Handle, ids_ptr: *const u8, ids_len: usize) -> i32 {
    // SAFETY: the caller's contract.
    let ids = unsafe { bytes(ids_ptr, ids_len) };
    text_status(STATE.with(|s| s.borrow_mut().detokenize(model, ids)))
}

/// Starts a generation from a JSON request: a generation handle.
///
/// # Safety
/// `request` as [`bytes`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bitnet_generate_start(model: Handle, request_ptr: *const u8, request_len: usize) -> Handle {
    // SAFETY: the caller's contract.
    let request = unsafe { bytes(request_ptr, request_len) };
    with_state(0, |s| s.start(model, request))
}

/// One step: 1 with the new text as the result, 0 when the generation is
/// over, -1 on an error.
#[unsafe(no_mangle)]
pub extern "C" fn bitnet_generate_next(generation: Handle) -> i32 {
    match STATE.with(|s| s.borrow_mut().next(generation)) {
        Ok(Some(piece)) => {
            set_result(piece);
            1
        }
        Ok(None) => {
            set_result(Vec::new());
            0
        }
        Err(msg) => {
            set_result(msg);
            -1
        }
    }
}

/// Runs a generation to its end and frees it: 0 with `{text, ids,
/// finish_reason, usage}` as the result, or -1.
#[unsafe(no_mangle)]
pub extern "C" fn bitnet_generate_finish(generation: Handle) -> i32 {
    text_status(STATE.with(|s| s.borrow_mut().finish(generation)))
}

/// Drops a generation before its end: 0, or -1.
#[unsafe(no_mangle)]
pub extern "C" fn bitnet_generate_cancel(generation: Handle) -> i32 {
    text_status(STATE.with(|s| s.borrow_mut().cancel(generation)).map(|()| String::new()))
}

/// Debian's wasi-libc (2022) predates the pthread stubs that std for
/// `wasm32-wasip1` now links against; these are those stubs: attributes
/// are accepted, and starting a thread fails with `ENOTSUP`, so
/// `std::thread::spawn` returns an error instead of the module failing to
/// link. The engine runs on one thread here and starts none.
#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod no_threads {
    const ENOTSUP: i32 = 58;

    #[unsafe(no_mangle)]
    extern "C" fn pthread_attr_init(_attr: *mut u8) -> i32 {
        0
    }

    #[unsafe(no_mangle)]
    extern "C" fn pthread_attr_destroy(_attr: *mut u8) -> i32 {
        0
    }

    #[unsafe(no_mangle)]
    extern "C" fn pthread_attr_setstacksize(_attr: *mut u8, _size: usize) -> i32 {
        0
    }

    #[unsafe(no_mangle)]
    extern "C" fn pthread_create(_thread: *mut u8, _attr: *const u8, _start: *const u8, _arg: *mut u8) -> i32 {
        ENOTSUP
    }

    #[unsafe(no_mangle)]
    extern "C" fn pthread_detach(_thread: *mut u8) -> i32 {
        ENOTSUP
    }
}
