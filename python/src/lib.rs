//! Python bindings (import name `bitnet`): `bitnet.Model` over the
//! runtime's [`Engine`], one [`Sequence`] per call. The GIL is released
//! while the engine computes, so several Python threads may use one model
//! at once; signals are checked between tokens, so Ctrl-C stops a long
//! generation (and dropping its sequence frees its cache).

use bitnet_codegen::cpu::ternary::Packing;
use bitnet_codegen::cpu::Isa;
use bitnet_codegen::schedule::{HeadQuant, Pinned};
use bitnet_frontends::chat::{template_named, Message};
use bitnet_runtime::{
    BackendKind, Device, Engine, EngineOptions, GenerateOptions, KvType, LoadOptions, OutputFormat, RuntimeError, SamplerConfig, TextGeneration,
};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyStopIteration};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

create_exception!(_bitnet, BitnetError, PyException, "Every error of bitnet-rs.");
create_exception!(_bitnet, ModelLoadError, BitnetError, "A model file or folder that cannot be read, or a bad artifact.");
create_exception!(_bitnet, InvalidArgumentError, BitnetError, "An argument out of range or of the wrong kind.");
create_exception!(_bitnet, ContextFullError, BitnetError, "The prompt does not fit the context, or the KV budget is full.");

fn runtime_error(e: RuntimeError) -> PyErr {
    let msg = e.to_string();
    match e {
        RuntimeError::Model(_) | RuntimeError::Tokenizer(_) | RuntimeError::Artifact(_) => ModelLoadError::new_err(msg),
        RuntimeError::KvFull(_) | RuntimeError::TooLong(_) => ContextFullError::new_err(msg),
        RuntimeError::Input(_) | RuntimeError::Chat(_) => InvalidArgumentError::new_err(msg),
        RuntimeError::Eval(_) | RuntimeError::Compile(_) => BitnetError::new_err(msg),
    }
}

fn invalid(msg: impl Into<String>) -> PyErr {
    InvalidArgumentError::new_err(msg.into())
}

/// The engine options from `Model(...)`'s keywords, with the CLI's defaults.
struct OpenArgs {
    device: String,
    threads: Option<usize>,
    head: String,
    tune: bool,
    context: Option<usize>,
    backend: String,
    isa: Option<String>,
    packing: Option<String>,
    chat_template: Option<String>,
    parallel: usize,
    kv_budget: Option<usize>,
    cache_type: String,
}

/// `Model(...)`'s defaults (its signature says them again, for Python).
impl Default for OpenArgs {
    fn default() -> OpenArgs {
        OpenArgs {
            device: "cpu".into(),
            threads: None,
            head: "stored".into(),
            tune: true,
            context: None,
            backend: "compiled".into(),
            isa: None,
            packing: None,
            chat_template: None,
            parallel: 4,
            kv_budget: None,
            cache_type: "f32".into(),
        }
    }
}

impl OpenArgs {
    fn options(&self) -> PyResult<EngineOptions> {
        let threads = match self.threads {
            Some(0) => return Err(invalid("threads must be at least 1")),
            Some(t) => t,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let backend = match self.backend.as_str() {
            "compiled" => BackendKind::Compiled,
            "interp" => BackendKind::Interp,
            b => return Err(invalid(format!("backend {b:?}: one of \"compiled\", \"interp\""))),
        };
        let device = match self.device.as_str() {
            "cpu" => Device::Cpu,
            "cuda" => Device::Cuda,
            d => return Err(invalid(format!("device {d:?}: one of \"cpu\", \"cuda\""))),
        };
        // The parse errors name what was asked for and list the names.
        let head = self.head.parse::<HeadQuant>().map_err(invalid)?;
        let isa = self.isa.as_deref().map(|s| s.parse::<Isa>().and_then(Isa::require)).transpose().map_err(invalid)?;
        let packing = self.packing.as_deref().map(str::parse::<Packing>).transpose().map_err(invalid)?;
        if backend == BackendKind::Interp && (head != HeadQuant::Stored || isa.is_some() || packing.is_some()) {
            return Err(invalid("a quantized head, isa and packing pick compiled kernels: they need backend=\"compiled\""));
        }
        if device == Device::Cuda && packing == Some(Packing::Base3) {
            return Err(invalid("packing \"1.6bit\": the CUDA kernels read 2-bit weights"));
        }
        if self.parallel == 0 {
            return Err(invalid("parallel must be at least 1"));
        }
        let chat_template = self.chat_template.as_deref().map(template_named).transpose().map_err(|e| invalid(e.to_string()))?;
        let pinned = Pinned { head, isa, packing, ..Default::default() };
        let load = LoadOptions { threads, context: self.context, backend, device, pinned, tuning: self.tune };
        let kv_type = self.cache_type.parse::<KvType>().map_err(invalid)?;
        Ok(EngineOptions { load, parallel: self.parallel, kv_budget: self.kv_budget, kv_type, chat_template })
    }
}

fn open(py: Python<'_>, path: &std::path::Path, args: &OpenArgs) -> PyResult<Engine> {
    let opts = args.options()?;
    py.detach(|| Engine::open(path, &opts)).map_err(|e| ModelLoadError::new_err(format!("loading {}: {e}", path.display())))
}

/// Sampling settings, with the CLI's defaults (llama.cpp's).
#[derive(Clone)]
struct Sampling {
    config: SamplerConfig,
    max_tokens: usize,
    stop: Vec<String>,
    ignore_eos: bool,
}

#[allow(clippy::too_many_arguments)]
fn sampling(
    max_tokens: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repeat_penalty: f32,
    seed: Option<u64>,
    stop: Option<Vec<String>>,
    ignore_eos: bool,
    logit_bias: Option<HashMap<u32, f32>>,
    response_format: Option<&Bound<'_, PyAny>>,
    grammar: Option<String>,
) -> PyResult<Sampling> {
    let seed = seed.unwrap_or_else(SamplerConfig::clock_seed);
    let mut logit_bias: Vec<(u32, f32)> = logit_bias.into_iter().flatten().collect();
    logit_bias.sort_by_key(|&(t, _)| t);
    let format = match (response_format.map(output_format).transpose()?.flatten(), grammar) {
        (Some(_), Some(_)) => return Err(invalid("give response_format or grammar, not both")),
        (None, Some(g)) => Some(OutputFormat::Grammar(g)),
        (f, None) => f,
    };
    let config = SamplerConfig { temperature, top_k, top_p, min_p, repeat_penalty, logit_bias, format, seed, ..SamplerConfig::default() };
    config.check().map_err(|e| invalid(e.to_string()))?;
    Ok(Sampling { config, max_tokens, stop: stop.unwrap_or_default(), ignore_eos })
}

/// OpenAI's `response_format` (a dict, as JSON): `None` for plain text.
fn output_format(v: &Bound<'_, PyAny>) -> PyResult<Option<OutputFormat>> {
    let json: String = v.py().import("json")?.call_method1("dumps", (v,))?.extract()?;
    let value: serde_json::Value = serde_json::from_str(&json).map_err(|e| invalid(format!("response_format: {e}")))?;
    OutputFormat::from_response_format(&value).map_err(|e| invalid(format!("response_format: {e}")))
}

/// Starts a generation (the prompt used verbatim).
fn start(engine: Arc<Engine>, prompt: &[u32], s: &Sampling) -> PyResult<TextGeneration> {
    let opts = GenerateOptions { n_predict: s.max_tokens, ignore_eos: s.ignore_eos, sampler: s.config.clone(), dump_logits: false };
    TextGeneration::start(engine, prompt, &opts, s.stop.clone()).map_err(runtime_error)
}

/// One step without the GIL, then a check for Ctrl-C.
fn step(py: Python<'_>, g: &mut TextGeneration) -> PyResult<Option<String>> {
    let piece = py.detach(|| g.next_piece()).map_err(runtime_error)?;
    py.check_signals()?;
    Ok(piece)
}

/// Runs a generation to the end: its text and ids.
fn run(py: Python<'_>, g: TextGeneration) -> PyResult<(String, Vec<u32>)> {
    g.finish(|g| step(py, g))
}

/// A loaded model: a GGUF file, a Hugging Face folder or a `.bnx` artifact
/// from `bitnet compile`.
#[pyclass(module = "bitnet", frozen)]
struct Model {
    engine: RwLock<Option<Arc<Engine>>>,
    path: PathBuf,
}

impl Model {
    fn engine(&self) -> PyResult<Arc<Engine>> {
        self.engine.read().unwrap_or_else(|e| e.into_inner()).clone().ok_or_else(|| BitnetError::new_err("the model is closed"))
    }

    fn text_ids(&self, engine: &Engine, prompt: &str) -> PyResult<Vec<u32>> {
        let tok = &engine.tokenizer;
        tok.encode(prompt, tok.add_bos, false).map_err(|e| invalid(e.to_string()))
    }
}

fn messages(list: &Bound<'_, PyList>) -> PyResult<Vec<Message>> {
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let d = m.cast::<PyDict>().map_err(|_| invalid(format!("messages[{i}] is not a dict with role and content")))?;
        let get = |k: &str| -> PyResult<String> {
            d.get_item(k)?
                .ok_or_else(|| invalid(format!("messages[{i}] has no {k:?}")))?
                .extract::<String>()
                .map_err(|_| invalid(format!("messages[{i}][{k:?}] is not a string")))
        };
        let role = get("role")?;
        let role = match role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            r => return Err(invalid(format!("messages[{i}]: role {r:?}; one of system, user, assistant"))),
        };
        out.push(Message::new(role, &get("content")?));
    }
    if out.is_empty() {
        return Err(invalid("messages is empty"));
    }
    Ok(out)
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (path, *, device = "cpu".to_string(), threads = None, head = "stored".to_string(), tune = true, context = None, backend = "compiled".to_string(), isa = None, packing = None, chat_template = None, parallel = 4, kv_budget = None, cache_type = "f32".to_string()))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        device: String,
        threads: Option<usize>,
        head: String,
        tune: bool,
        context: Option<usize>,
        backend: String,
        isa: Option<String>,
        packing: Option<String>,
        chat_template: Option<String>,
        parallel: usize,
        kv_budget: Option<usize>,
        cache_type: String,
    ) -> PyResult<Model> {
        let args = OpenArgs { device, threads, head, tune, context, backend, isa, packing, chat_template, parallel, kv_budget, cache_type };
        let engine = open(py, &path, &args)?;
        Ok(Model { engine: RwLock::new(Some(Arc::new(engine))), path })
    }

    /// Frees the model (once running calls finish); later calls raise
    /// `BitnetError`.
    fn close(&self) {
        self.engine.write().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close();
        false
    }

    fn __repr__(&self) -> String {
        let state = if self.engine.read().map(|e| e.is_some()).unwrap_or(false) { "" } else { ", closed" };
        format!("bitnet.Model({:?}{state})", self.path.display().to_string())
    }

    /// Generates text after `prompt` (BOS added as the model asks, as
    /// `bitnet run -p`); the text is exactly `bitnet run --json`'s.
    #[pyo3(signature = (prompt, *, max_tokens = 128, temperature = 0.8, top_k = 40, top_p = 0.95, min_p = 0.05, repeat_penalty = 1.0, seed = None, stop = None, ignore_eos = false, logit_bias = None, response_format = None, grammar = None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: &str,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        seed: Option<u64>,
        stop: Option<Vec<String>>,
        ignore_eos: bool,
        logit_bias: Option<HashMap<u32, f32>>,
        response_format: Option<&Bound<'_, PyAny>>,
        grammar: Option<String>,
    ) -> PyResult<String> {
        let s = sampling(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, stop, ignore_eos, logit_bias, response_format, grammar)?;
        let engine = self.engine()?;
        let ids = self.text_ids(&engine, prompt)?;
        Ok(run(py, start(engine, &ids, &s)?)?.0)
    }

    /// Generates after `prompt_ids`, used verbatim (no BOS added, as
    /// `bitnet run --prompt-ids`); returns the generated ids.
    #[pyo3(signature = (prompt_ids, *, max_tokens = 128, temperature = 0.8, top_k = 40, top_p = 0.95, min_p = 0.05, repeat_penalty = 1.0, seed = None, stop = None, ignore_eos = false, logit_bias = None, response_format = None, grammar = None))]
    #[allow(clippy::too_many_arguments)]
    fn generate_ids(
        &self,
        py: Python<'_>,
        prompt_ids: Vec<u32>,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        seed: Option<u64>,
        stop: Option<Vec<String>>,
        ignore_eos: bool,
        logit_bias: Option<HashMap<u32, f32>>,
        response_format: Option<&Bound<'_, PyAny>>,
        grammar: Option<String>,
    ) -> PyResult<Vec<u32>> {
        let s = sampling(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, stop, ignore_eos, logit_bias, response_format, grammar)?;
        Ok(run(py, start(self.engine()?, &prompt_ids, &s)?)?.1)
    }

    /// Like `generate`, as an iterator of text pieces as they are made.
    #[pyo3(signature = (prompt, *, max_tokens = 128, temperature = 0.8, top_k = 40, top_p = 0.95, min_p = 0.05, repeat_penalty = 1.0, seed = None, stop = None, ignore_eos = false, logit_bias = None, response_format = None, grammar = None))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        prompt: &str,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        seed: Option<u64>,
        stop: Option<Vec<String>>,
        ignore_eos: bool,
        logit_bias: Option<HashMap<u32, f32>>,
        response_format: Option<&Bound<'_, PyAny>>,
        grammar: Option<String>,
    ) -> PyResult<Stream> {
        let s = sampling(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, stop, ignore_eos, logit_bias, response_format, grammar)?;
        let engine = self.engine()?;
        let ids = self.text_ids(&engine, prompt)?;
        Ok(Stream { run: Mutex::new(Some(start(engine, &ids, &s)?)) })
    }

    /// The assistant's answer to `messages` (dicts with `role` and
    /// `content`), rendered with the chat template.
    #[pyo3(signature = (messages, *, max_tokens = 128, temperature = 0.8, top_k = 40, top_p = 0.95, min_p = 0.05, repeat_penalty = 1.0, seed = None, stop = None, logit_bias = None, response_format = None, grammar = None))]
    #[allow(clippy::too_many_arguments)]
    fn chat(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyList>,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        seed: Option<u64>,
        stop: Option<Vec<String>>,
        logit_bias: Option<HashMap<u32, f32>>,
        response_format: Option<&Bound<'_, PyAny>>,
        grammar: Option<String>,
    ) -> PyResult<String> {
        let s = sampling(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, stop, false, logit_bias, response_format, grammar)?;
        let msgs = self::messages(messages)?;
        let engine = self.engine()?;
        let ids = engine.chat_ids(&msgs).map_err(runtime_error)?;
        Ok(run(py, start(engine, &ids, &s)?)?.0)
    }

    /// Text to ids; BOS first when `add_bos` and the model asks for one.
    #[pyo3(signature = (text, add_bos = true))]
    fn tokenize(&self, text: &str, add_bos: bool) -> PyResult<Vec<u32>> {
        let engine = self.engine()?;
        let tok = &engine.tokenizer;
        tok.encode(text, add_bos && tok.add_bos, false).map_err(|e| invalid(e.to_string()))
    }

    /// Ids to text.
    fn detokenize(&self, ids: Vec<u32>) -> PyResult<String> {
        let engine = self.engine()?;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= engine.vocab()) {
            return Err(invalid(format!("token id {bad} is outside the vocabulary of {}", engine.vocab())));
        }
        Ok(engine.tokenizer.decode_text(&ids))
    }

    /// The logits at every position of `ids` (used verbatim), float32
    /// `[len(ids), vocab]`, as `bitnet run --dump-logits` writes them.
    fn logits<'py>(&self, py: Python<'py>, ids: Vec<u32>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let engine = self.engine()?;
        let opts = GenerateOptions { n_predict: 1, ignore_eos: false, sampler: SamplerConfig::greedy(), dump_logits: true };
        // Checks the ids and the context as a generation would.
        let mut g = TextGeneration::start(engine.clone(), &ids, &opts, Vec::new()).map_err(runtime_error)?;
        py.detach(|| g.evaluate()).map_err(runtime_error)?;
        let rows = Array2::from_shape_vec((ids.len(), engine.vocab()), g.sequence().logits().to_vec())
            .map_err(|e| BitnetError::new_err(format!("logits of an unexpected shape: {e}")))?;
        Ok(rows.into_pyarray(py))
    }

    /// The model: architecture, hyper-parameters, tensor types, and how it runs.
    #[getter]
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let engine = self.engine()?;
        let c = &engine.model.config;
        let d = PyDict::new(py);
        d.set_item("path", self.path.display().to_string())?;
        d.set_item("architecture", &c.arch_name)?;
        d.set_item("hidden", c.hidden)?;
        d.set_item("layers", c.layers)?;
        d.set_item("heads", c.heads)?;
        d.set_item("kv_heads", c.kv_heads)?;
        d.set_item("head_dim", c.head_dim)?;
        d.set_item("ffn", c.ffn)?;
        d.set_item("vocab", c.vocab)?;
        d.set_item("context_train", c.context)?;
        d.set_item("context", engine.context)?;
        d.set_item("rope_theta", shortest(c.rope_theta))?;
        d.set_item("norm_eps", shortest(c.norm_eps))?;
        d.set_item("activation", format!("{:?}", c.activation).to_lowercase())?;
        d.set_item("tied_head", c.tied_head)?;
        d.set_item("bitlinear", c.bitlinear)?;
        d.set_item("sub_norms", c.sub_norms)?;
        d.set_item("family", bitnet_frontends::family::infer(&engine.model).map(|(f, _)| f.name))?;
        let types = PyDict::new(py);
        for t in &engine.model.tensors {
            let name = t.dtype.name();
            let n: usize = types.get_item(name)?.map(|v| v.extract()).transpose()?.unwrap_or(0);
            types.set_item(name, n + 1)?;
        }
        d.set_item("tensor_types", types)?;
        d.set_item("backend", format!("{:?}", engine.backend_kind()).to_lowercase())?;
        d.set_item("device", engine.device().name())?;
        d.set_item("threads", engine.threads)?;
        d.set_item("has_chat_template", engine.chat_template.is_some())?;
        Ok(d)
    }

    /// Vocabulary size.
    #[getter]
    fn n_vocab(&self) -> PyResult<usize> {
        Ok(self.engine()?.vocab())
    }

    /// Positions a sequence may hold.
    #[getter]
    fn n_ctx(&self) -> PyResult<usize> {
        Ok(self.engine()?.context)
    }
}

/// Text pieces of one generation, as they are made. Dropping it (or
/// breaking out of the loop) ends the generation and frees its cache.
#[pyclass(module = "bitnet")]
struct Stream {
    run: Mutex<Option<TextGeneration>>,
}

#[pymethods]
impl Stream {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<String> {
        let mut guard = self.run.lock().unwrap_or_else(|e| e.into_inner());
        let Some(run) = guard.as_mut() else {
            return Err(PyStopIteration::new_err(()));
        };
        loop {
            match step(py, run) {
                Ok(Some(piece)) if piece.is_empty() => continue,
                Ok(Some(piece)) => return Ok(piece),
                Ok(None) => {
                    let rest = run.rest();
                    *guard = None;
                    return if rest.is_empty() { Err(PyStopIteration::new_err(())) } else { Ok(rest) };
                }
                Err(e) => {
                    *guard = None;
                    return Err(e);
                }
            }
        }
    }

    /// Ends the generation now.
    fn close(&self) {
        self.run.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Compiles `src` (a GGUF file or a Hugging Face folder) to a tuned `.bnx`
/// artifact at `out`, as `bitnet compile`; returns its size and tensors.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (src, out, *, threads = None, head = "stored".to_string(), tune = true, context = None, isa = None, packing = None))]
fn compile<'py>(
    py: Python<'py>,
    src: PathBuf,
    out: PathBuf,
    threads: Option<usize>,
    head: String,
    tune: bool,
    context: Option<usize>,
    isa: Option<String>,
    packing: Option<String>,
) -> PyResult<Bound<'py, PyDict>> {
    let args = OpenArgs { threads, head, tune, context, isa, packing, parallel: 1, ..OpenArgs::default() };
    let engine = open(py, &src, &args)?;
    let report = py.detach(|| engine.write_artifact(&out, &src)).map_err(runtime_error)?;
    let d = PyDict::new(py);
    d.set_item("path", out.display().to_string())?;
    d.set_item("bytes", report.bytes)?;
    d.set_item("tensors", report.tensors)?;
    Ok(d)
}

#[pymodule]
fn _bitnet(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Model>()?;
    m.add_class::<Stream>()?;
    m.add_function(wrap_pyfunction!(compile, m)?)?;
    m.add("BitnetError", py.get_type::<BitnetError>())?;
    m.add("ModelLoadError", py.get_type::<ModelLoadError>())?;
    m.add("InvalidArgumentError", py.get_type::<InvalidArgumentError>())?;
    m.add("ContextFullError", py.get_type::<ContextFullError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

/// An f32 as the f64 with the same shortest decimal form (1e-5, not
/// 9.999999747378752e-06).
fn shortest(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}
