//! The engine: one loaded model serving many sequences.
//!
//! An [`Engine`] holds what every conversation shares (the mapped weights,
//! the tokenizer and chat template, the backend and the paged KV cache)
//! and is `Send + Sync`, meant to live behind an `Arc`. A [`Sequence`] is
//! one conversation: its tokens, its block table in the cache and its
//! sampler. [`Engine::step`] evaluates what each of a batch of sequences
//! has pending in one pass over the weights: every row is a token of some
//! sequence, and attention reads each row's own blocks.
//!
//! Blocks come from a budget ([`KvBlocks`]); a sequence that starts with
//! tokens another has computed (a shared system prompt, the earlier turns
//! of a conversation sent again) takes those blocks instead of computing
//! them. Dropping a sequence gives its blocks back.

#[cfg(feature = "native")]
use crate::artifact::{self, Artifact, Header};
#[cfg(feature = "native")]
use crate::backend::CudaBackend;
use crate::backend::{Backend, BackendKind, Device, InterpBackend, KernelTimes, LoadOptions, StepRows};
use crate::constraint::Grammars;
#[cfg(feature = "native")]
use crate::cuda::CudaModel;
use crate::error::RuntimeError;
use crate::kv::{KvBlocks, KvUsage, BLOCK_POSITIONS};
#[cfg(feature = "native")]
use crate::lowering;
use crate::sampler::{Sampler, SamplerConfig};
#[cfg(feature = "native")]
use bitnet_codegen::schedule::{HeadQuant, Schedule};
use bitnet_frontends::chat::{self, Message};
use bitnet_frontends::model::Model;
use bitnet_frontends::tokenizer::Tokenizer;
use bitnet_ir::interp::{EvalError, Interpreter, KvPages, KvType};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub load: LoadOptions,
    /// Sequences expected at once: with the context, it sizes the default
    /// KV budget.
    pub parallel: usize,
    /// Bytes of KV cache for all sequences together [default: room for
    /// `parallel` full contexts].
    pub kv_budget: Option<usize>,
    /// How the KV cache holds keys and values: f32, or f16 (half the
    /// bytes, rounded; CPU only).
    pub kv_type: KvType,
    /// A chat template (Jinja) to use instead of the model's own, or for a
    /// model without one.
    pub chat_template: Option<String>,
}

impl EngineOptions {
    /// Refuses what no backend can do, before any loading.
    fn check(&self) -> Result<(), RuntimeError> {
        if self.kv_type != KvType::F32 && self.load.device != Device::Cpu {
            return RuntimeError::input(format!("an {} KV cache is for the CPU: the CUDA kernels keep f32 keys and values", self.kv_type.name()));
        }
        Ok(())
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { load: LoadOptions::default(), parallel: 1, kv_budget: None, kv_type: KvType::F32, chat_template: None }
    }
}

/// What a step changes: taken under one lock, so that steps run one at a
/// time while sequences are made, fed and dropped concurrently.
struct Stepper {
    backend: Box<dyn Backend>,
    /// The blocks' contents, unless the backend keeps them (on a GPU).
    pages: KvPages,
}

pub struct Engine {
    pub model: Model,
    /// Shared so that text can be decoded while the engine generates.
    pub tokenizer: Arc<Tokenizer>,
    /// Positions each sequence may hold.
    pub context: usize,
    pub threads: usize,
    pub load_ms: f64,
    /// Things the user should know about what was loaded (e.g. an artifact
    /// compiled on another CPU).
    pub warnings: Vec<String>,
    /// The header of the artifact this engine runs, if it runs one.
    #[cfg(feature = "native")]
    pub artifact: Option<Header>,
    /// The chat template: `EngineOptions::chat_template`, else the model's.
    pub chat_template: Option<String>,
    kind: BackendKind,
    device: Device,
    kv_type: KvType,
    stepper: Mutex<Stepper>,
    blocks: Arc<KvBlocks>,
    /// Sequences of concurrent [`Engine::step_one`] callers, stepped together.
    combine: Mutex<Combine>,
    combined: Condvar,
    /// Steps evaluated (batches count once).
    steps: AtomicU64,
    /// The vocabulary indexed for constrained output, on first use.
    grammars: OnceLock<Result<Grammars, String>>,
}

/// The sequences waiting for the next combined step, and the results of
/// the last ones until their callers take them.
#[derive(Default)]
struct Combine {
    waiting: Vec<WaitingSequence>,
    done: HashMap<u64, Result<(), RuntimeError>>,
    stepping: bool,
}

/// A `&mut Sequence` whose caller is blocked in [`Engine::step_one`]
/// until its result is posted.
struct WaitingSequence(*mut Sequence);

// SAFETY: the pointer is only dereferenced by the one thread stepping the
// batch, while the sequence's owner waits for its result (see step_one).
unsafe impl Send for WaitingSequence {}

// An engine is shared between threads; a sequence moves between them.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    const fn movable<T: Send>() {}
    shared::<Engine>();
    movable::<Sequence>();
};

static NEXT_SEQUENCE: AtomicU64 = AtomicU64::new(1);

impl Engine {
    /// Loads a model file or folder (compiled in memory for the compiled
    /// backend) or a `.bnx` artifact (mapped, ready to run).
    pub fn open(path: &Path, opts: &EngineOptions) -> Result<Engine, RuntimeError> {
        let t0 = Instant::now();
        opts.check()?;
        #[cfg(feature = "native")]
        if artifact::is_artifact(path) {
            let (model, backend, warnings, header) = open_artifact(path, &opts.load)?;
            let mut engine = Engine::assemble(model, backend, warnings, opts, t0)?;
            engine.artifact = Some(header);
            return Ok(engine);
        }
        Engine::from_model(Model::open(path)?, opts, t0)
    }

    /// Serves a model already in memory (e.g. parsed from bytes with
    /// [`Model::from_file`]), compiled as [`Engine::open`] would compile it
    /// from a file; `t0` is when loading began (for `load_ms`).
    pub fn from_model(model: Model, opts: &EngineOptions, t0: Instant) -> Result<Engine, RuntimeError> {
        opts.check()?;
        let mut warnings = Vec::new();
        let backend = backend_for(&model, &opts.load, opts.parallel, &mut warnings)?;
        Engine::assemble(model, backend, warnings, opts, t0)
    }

    fn assemble(model: Model, mut backend: Box<dyn Backend>, warnings: Vec<String>, opts: &EngineOptions, t0: Instant) -> Result<Engine, RuntimeError> {
        let context = opts.load.context.unwrap_or(model.config.context).max(1);
        let c = &model.config;
        let block_bytes = KvPages::bytes_per_block(c.layers, c.kv_heads, c.head_dim, BLOCK_POSITIONS, opts.kv_type);
        let blocks = match opts.kv_budget {
            Some(bytes) if bytes < block_bytes => {
                return RuntimeError::input(format!(
                    "a KV budget of {bytes} bytes holds no block of {BLOCK_POSITIONS} positions ({block_bytes} bytes for this model)"
                ))
            }
            Some(bytes) => bytes / block_bytes,
            None => opts.parallel.max(1) * context.div_ceil(BLOCK_POSITIONS),
        };
        let on_device = backend.own_kv_blocks(blocks)?;
        let pages = KvPages::new(c.layers, c.kv_heads, c.head_dim, BLOCK_POSITIONS, if on_device { 0 } else { blocks }, opts.kv_type);
        let tokenizer = model.tokenizer()?;
        Ok(Engine {
            chat_template: opts.chat_template.clone().or_else(|| tokenizer.chat_template.clone()),
            tokenizer: Arc::new(tokenizer),
            context,
            threads: opts.load.threads.max(1),
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            warnings,
            #[cfg(feature = "native")]
            artifact: None,
            kind: backend.kind(),
            device: backend.device(),
            kv_type: pages.kv_type(),
            stepper: Mutex::new(Stepper { backend, pages }),
            blocks: Arc::new(KvBlocks::new(blocks, block_bytes)),
            combine: Mutex::default(),
            combined: Condvar::new(),
            steps: AtomicU64::new(0),
            grammars: OnceLock::new(),
            model,
        })
    }

    /// The vocabulary indexed for constrained output (made on first use).
    pub fn grammars(&self) -> Result<&Grammars, RuntimeError> {
        let g = self.grammars.get_or_init(|| Grammars::new(&self.tokenizer, self.vocab()));
        g.as_ref().map_err(|e| RuntimeError::Input(e.clone()))
    }

    pub fn vocab(&self) -> usize {
        self.model.config.vocab
    }

    pub fn backend_kind(&self) -> BackendKind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// How the KV cache holds keys and values.
    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// The backend, for inspection (its graph, schedule, GPU): waits for
    /// any step in flight.
    pub fn with_backend<R>(&self, f: impl FnOnce(&mut dyn Backend) -> R) -> R {
        f(&mut *self.lock().backend)
    }

    /// The graph the backend evaluates, in its text form.
    pub fn graph_text(&self) -> String {
        self.with_backend(|b| b.graph().to_string())
    }

    /// The compiled CPU plan's schedule (tiles and ISA per kernel); `None`
    /// for other backends.
    #[cfg(feature = "native")]
    pub fn schedule(&self) -> Option<Schedule> {
        self.with_backend(|b| b.as_compiled().map(|c| c.schedule().clone()))
    }

    /// Writes the compiled CPU plan and its prepared weights to a `.bnx`
    /// artifact (see [`artifact::write`]); `source` is the model's path.
    #[cfg(feature = "native")]
    pub fn write_artifact(&self, out: &Path, source: &Path) -> Result<artifact::WriteReport, RuntimeError> {
        self.with_backend(|b| match b.as_compiled() {
            Some(c) => artifact::write(out, source, &self.model, c),
            None => RuntimeError::input("only the compiled CPU backend writes artifacts this way"),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Stepper> {
        self.stepper.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How much of the KV budget is in use.
    pub fn kv_usage(&self) -> KvUsage {
        self.blocks.usage()
    }

    /// Forgets every cached prefix no sequence holds.
    pub fn clear_prefix_cache(&self) {
        self.blocks.clear_cache();
    }

    /// Whether `sampler`'s settings are in range and its logit biases name
    /// tokens of this model's vocabulary (its output format is compiled
    /// when a sampler is made: [`Engine::sampler`]).
    pub fn check_sampler(&self, sampler: &SamplerConfig) -> Result<(), RuntimeError> {
        sampler.check().map_err(|e| RuntimeError::Input(e.to_string()))?;
        match sampler.bias_outside(self.vocab()) {
            Some(t) => RuntimeError::input(format!("logit_bias: token id {t} is outside the vocabulary of {}", self.vocab())),
            None => Ok(()),
        }
    }

    /// A sampler with `config`, checked ([`Engine::check_sampler`]) and
    /// its output format compiled against this model's vocabulary.
    pub fn sampler(&self, config: SamplerConfig) -> Result<Sampler, RuntimeError> {
        self.check_sampler(&config)?;
        let constrained = match &config.format {
            Some(f) => Some(self.grammars()?.matcher(f).map_err(RuntimeError::Input)?),
            None => None,
        };
        Ok(Sampler::constrained(config, constrained))
    }

    /// A sequence that samples with `sampler` (see [`Engine::sampler`]).
    pub fn new_sequence(&self, sampler: SamplerConfig) -> Result<Sequence, RuntimeError> {
        Ok(self.sequence_with(self.sampler(sampler)?))
    }

    /// A sequence that samples with `sampler`.
    pub fn sequence_with(&self, sampler: Sampler) -> Sequence {
        Sequence {
            id: NEXT_SEQUENCE.fetch_add(1, Ordering::Relaxed),
            blocks: self.blocks.clone(),
            vocab: self.vocab(),
            table: Vec::new(),
            tokens: Vec::new(),
            pending: Vec::new(),
            logits: Vec::new(),
            registered: 0,
            cached: 0,
            sampler,
            keep_all_logits: false,
            wait_for_kv: false,
        }
    }

    /// The ids of a conversation rendered with the model's chat template,
    /// special-token text parsed as special tokens. BOS is added when the
    /// tokenizer asks for it and the template did not write it.
    pub fn chat_ids(&self, messages: &[Message]) -> Result<Vec<u32>, RuntimeError> {
        let tok = &self.tokenizer;
        let Some(template) = self.chat_template.as_deref() else {
            let names: Vec<&str> = chat::BUILTIN_TEMPLATES.iter().map(|(n, _)| *n).collect();
            return RuntimeError::input(format!(
                "this model has no chat template (tokenizer.chat_template); name one with --chat-template ({} or a Jinja file)",
                names.join(", ")
            ));
        };
        let text_of = |id: Option<u32>| id.and_then(|i| tok.piece(i)).unwrap_or("").to_string();
        let (bos, eos) = (text_of(tok.bos), text_of(tok.eos));
        let rendered = chat::render(template, messages, true, &bos, &eos)?;
        let add_bos = tok.add_bos && (bos.is_empty() || !rendered.starts_with(&bos));
        Ok(tok.encode(&rendered, add_bos, true)?)
    }

    /// Evaluates what each sequence has pending, all in one step; each
    /// gets the logits it asked for, or its own error. A sequence with
    /// nothing pending is left as it is. One sequence's bad tokens or full
    /// budget fail that sequence only.
    pub fn step(&self, seqs: &mut [&mut Sequence]) -> Vec<Result<(), RuntimeError>> {
        self.step_timed(seqs, None)
    }

    /// Steps one sequence. Callers on other threads that step at the same
    /// time are batched into one step: one of them (the first to find no
    /// step running) steps every sequence waiting, the others wait for
    /// their results. So many threads each generating on their own
    /// sequence (the language bindings) share steps as the server does.
    pub fn step_one(&self, seq: &mut Sequence) -> Result<(), RuntimeError> {
        let id = seq.id;
        let lock = || self.combine.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = lock();
        c.waiting.push(WaitingSequence(seq));
        loop {
            if let Some(r) = c.done.remove(&id) {
                return r;
            }
            if c.stepping {
                c = self.combined.wait(c).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            c.stepping = true;
            let batch = std::mem::take(&mut c.waiting);
            drop(c);
            // SAFETY: each pointer comes from a `&mut Sequence` whose
            // caller is blocked in this function until its result is in
            // `done`, touching the sequence no more; ids are unique, so no
            // sequence is in the batch twice.
            let mut seqs: Vec<&mut Sequence> = batch.iter().map(|w| unsafe { &mut *w.0 }).collect();
            let ids: Vec<u64> = seqs.iter().map(|s| s.id).collect();
            let results = catch_unwind(AssertUnwindSafe(|| self.step(&mut seqs)));
            drop(seqs);
            c = lock();
            c.stepping = false;
            match results {
                Ok(results) => c.done.extend(ids.into_iter().zip(results)),
                Err(_) => c.done.extend(ids.into_iter().map(|i| (i, RuntimeError::input("internal error: a step panicked")))),
            }
            self.combined.notify_all();
        }
    }

    /// Steps evaluated so far (a batch counts once).
    pub fn steps_taken(&self) -> u64 {
        self.steps.load(Ordering::Relaxed)
    }

    /// Steps one sequence and times each kernel: milliseconds and calls
    /// per kernel family, slowest first. Compiled backends only.
    pub fn profile(&self, seq: &mut Sequence) -> Result<KernelTimes, RuntimeError> {
        self.profile_step(&mut [seq])
    }

    /// Steps a batch of sequences and times each kernel; the first
    /// sequence's error, if any.
    pub fn profile_step(&self, seqs: &mut [&mut Sequence]) -> Result<KernelTimes, RuntimeError> {
        if self.kind != BackendKind::Compiled {
            return RuntimeError::input("kernel timings need the compiled backend (--backend compiled)");
        }
        let mut times = KernelTimes::default();
        self.step_timed(seqs, Some(&mut times)).into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok(times)
    }

    fn step_timed(&self, seqs: &mut [&mut Sequence], times: Option<&mut KernelTimes>) -> Vec<Result<(), RuntimeError>> {
        let mut results: Vec<Result<(), RuntimeError>> = seqs.iter().map(|_| Ok(())).collect();
        let mut ready = Vec::new();
        for (i, s) in seqs.iter_mut().enumerate() {
            if s.pending.is_empty() {
                continue;
            }
            match self.admit(s) {
                Ok(()) => ready.push(i),
                Err(e) => {
                    s.pending.clear();
                    results[i] = Err(e);
                }
            }
        }
        if !ready.is_empty() {
            self.steps.fetch_add(1, Ordering::Relaxed);
            self.run(seqs, &ready, &mut results, times);
        }
        results
    }

    /// Checks a sequence's pending tokens and gives it the blocks they
    /// need: from the prefix cache first, then from the budget.
    fn admit(&self, s: &mut Sequence) -> Result<(), RuntimeError> {
        if !Arc::ptr_eq(&s.blocks, &self.blocks) {
            return RuntimeError::input("this sequence belongs to another engine");
        }
        if let Some(&bad) = s.pending.iter().find(|&&t| t as usize >= self.vocab()) {
            return RuntimeError::input(format!("token id {bad} is outside the model's vocabulary of {}", self.vocab()));
        }
        let (held, more) = (s.tokens.len(), s.pending.len());
        if held + more > self.context {
            return RuntimeError::input(format!("{more} tokens do not fit in the context: {held} already used of {} (raise it with -c)", self.context));
        }
        if s.table.is_empty() {
            // At least one token is computed, for its logits.
            // (A copy: the sequence lends itself to take_prefix too.)
            let prompt: Vec<u32> = s.pending[..more - 1].to_vec();
            let n = self.take_prefix(s, &prompt);
            s.pending.drain(..n);
        }
        let need = (s.tokens.len() + s.pending.len()).div_ceil(BLOCK_POSITIONS).saturating_sub(s.table.len());
        if need > 0 {
            s.table.extend(self.blocks.allocate(need, s.wait_for_kv)?);
        }
        Ok(())
    }

    /// Gives an empty sequence the cached blocks that hold the longest run
    /// of whole blocks `prompt` starts with; returns the tokens they hold
    /// (now the sequence's tokens). The caller feeds the rest: a scheduler
    /// that feeds a long prompt in chunks calls this first with all of it.
    pub fn reuse_prefix(&self, seq: &mut Sequence, prompt: &[u32]) -> usize {
        if !seq.table.is_empty() || !seq.tokens.is_empty() || !Arc::ptr_eq(&seq.blocks, &self.blocks) {
            return 0;
        }
        self.take_prefix(seq, &prompt[..prompt.len().saturating_sub(1)])
    }

    fn take_prefix(&self, s: &mut Sequence, tokens: &[u32]) -> usize {
        let found = self.blocks.lookup(tokens);
        let n = found.len() * BLOCK_POSITIONS;
        s.tokens.extend_from_slice(&tokens[..n]);
        (s.table, s.registered, s.cached) = (found, n / BLOCK_POSITIONS, n);
        n
    }

    /// One backend step over the pending rows of `seqs[ready]`.
    fn run(&self, seqs: &mut [&mut Sequence], ready: &[usize], results: &mut [Result<(), RuntimeError>], times: Option<&mut KernelTimes>) {
        let mut st = self.lock();
        let Stepper { backend, pages } = &mut *st;
        let (mut tokens, mut positions, mut out_rows, mut tables, mut held, mut outs) = (vec![], vec![], vec![], vec![], vec![], vec![]);
        for &i in ready {
            let s = &seqs[i];
            let (start, n, base) = (s.tokens.len(), s.pending.len(), tokens.len() as i32);
            tokens.extend(s.pending.iter().map(|&t| t as i32));
            positions.extend((start..start + n).map(|p| p as i32));
            tables.extend(std::iter::repeat_n(s.table.as_slice(), n));
            held.extend(std::iter::repeat_n(start + n, n));
            let picked = if s.keep_all_logits { n } else { 1 };
            out_rows.extend(base + (n - picked) as i32..base + n as i32);
            outs.push(picked);
        }
        let rows = StepRows { tokens: &tokens, positions: &positions, out_rows: &out_rows };
        let out = backend.step(&self.model, &rows, &mut pages.rows(&tables, &held), times);
        drop(tables);
        drop(st);
        let vocab = self.vocab();
        match out {
            Ok(logits) if logits.len() == out_rows.len() * vocab => {
                let mut at = 0;
                for (&i, picked) in ready.iter().zip(outs) {
                    let s = &mut *seqs[i];
                    s.logits.clear();
                    s.logits.extend_from_slice(&logits[at..at + picked * vocab]);
                    at += picked * vocab;
                    s.tokens.append(&mut s.pending);
                    s.registered = self.blocks.register(&s.table, &s.tokens, s.registered);
                }
            }
            other => {
                let msg = match other {
                    Err(e) => e.to_string(),
                    Ok(l) => format!("the backend returned {} logits for {} rows of {vocab}", l.len(), out_rows.len()),
                };
                for &i in ready {
                    seqs[i].pending.clear();
                    results[i] = Err(EvalError(msg.clone()).into());
                }
            }
        }
    }
}

/// The backend `opts` ask for, for a model file or folder, stepping up to
/// `parallel` sequences at once.
fn backend_for(model: &Model, opts: &LoadOptions, parallel: usize, warnings: &mut Vec<String>) -> Result<Box<dyn Backend>, RuntimeError> {
    let step = model.step_graph()?;
    Interpreter::new(model, 1).check_weights(&step)?;
    Ok(match (opts.backend, opts.device) {
        (BackendKind::Interp, Device::Cpu) => Box::new(InterpBackend { graph: step, threads: opts.threads.max(1) }),
        (BackendKind::Interp, Device::Cuda) => return RuntimeError::input("--backend interp runs on the CPU only; drop it to run compiled code on the GPU"),
        #[cfg(feature = "native")]
        (BackendKind::Compiled, Device::Cpu) => Box::new(lowering::compile_cpu(model, &step, opts, parallel, warnings)?),
        #[cfg(feature = "native")]
        (BackendKind::Compiled, Device::Cuda) => {
            let context = opts.context.unwrap_or(model.config.context).max(1);
            Box::new(CudaBackend(lowering::compile_cuda(model, opts, context, warnings)?))
        }
        #[cfg(not(feature = "native"))]
        (BackendKind::Compiled, _) => {
            let _ = warnings;
            return RuntimeError::input("this build has the reference interpreter only (bitnet-runtime without its `native` feature); use the interp backend");
        }
    })
}

/// A `.bnx` artifact's model, its backend, warnings and header.
#[cfg(feature = "native")]
type OpenedArtifact = (Model, Box<dyn Backend>, Vec<String>, Header);

#[cfg(feature = "native")]
fn open_artifact(path: &Path, opts: &LoadOptions) -> Result<OpenedArtifact, RuntimeError> {
    let a = Artifact::open(path)?;
    let h = &a.header;
    let artifact_err = |msg: String| Err(RuntimeError::Artifact(format!("{}: {msg}", path.display())));
    match (h.target.device.as_str(), opts.device) {
        ("cuda", Device::Cpu) => {
            return artifact_err(format!(
                "this artifact holds CUDA kernels ({}); run it with --device cuda, or compile {} for the CPU (bitnet compile -m {} -o FILE.bnx)",
                h.target.description, h.source.path, h.source.path
            ))
        }
        ("cuda", Device::Cuda) => {}
        (_, Device::Cuda) => {
            return artifact_err(format!("this artifact holds CPU code; compile {} with --device cuda, or run that model with --device cuda", h.source.path))
        }
        _ => {}
    }
    if opts.backend == BackendKind::Interp {
        return artifact_err(format!("an artifact holds compiled code only; run the interpreter on its source model ({})", h.source.path));
    }
    if opts.device == Device::Cuda && (opts.pinned.head != HeadQuant::Stored || opts.pinned.ternary.is_some() || opts.pinned.isa.is_some()) {
        return artifact_err("a CUDA artifact runs its compiled kernels as they are; drop --head and tile options".into());
    }
    if opts.pinned.head != HeadQuant::Stored && h.head != opts.pinned.head.name() {
        return artifact_err("--head is fixed when the artifact is compiled (bitnet compile --head ...); run it without".into());
    }
    if opts.pinned.ternary.is_some() || opts.pinned.isa.is_some() {
        return artifact_err(format!(
            "its kernels and tiles were chosen when it was compiled; run it without --isa, or compile it again with it (bitnet compile -m {} --isa ISA -o FILE.bnx)",
            h.source.path
        ));
    }
    let warnings = a.check_target(path)?;
    let header = a.header.clone();
    let backend: Box<dyn Backend> = if opts.device == Device::Cuda {
        let (step, ptx, packed) = a.cuda(path)?;
        let context = opts.context.unwrap_or(a.model.config.context).max(1);
        let cuda = CudaModel::new(&a.model, packed, step, Some(ptx), context).map_err(|e| RuntimeError::Artifact(format!("{}: {}", path.display(), e.0)))?;
        Box::new(CudaBackend(cuda))
    } else {
        Box::new(a.compiled(path, opts.threads)?)
    };
    Ok((a.model, backend, warnings, header))
}

/// One conversation: its tokens, its blocks in the engine's KV cache, the
/// logits of its last step and its sampler. Made by
/// [`Engine::new_sequence`]; dropping it gives its blocks back.
pub struct Sequence {
    id: u64,
    blocks: Arc<KvBlocks>,
    vocab: usize,
    /// Its blocks, in position order.
    table: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    tokens: Vec<u32>,
    /// Tokens fed and not yet evaluated.
    pending: Vec<u32>,
    logits: Vec<f32>,
    /// Leading full blocks registered in the prefix cache.
    registered: usize,
    /// Tokens taken from the prefix cache rather than computed.
    cached: usize,
    pub sampler: Sampler,
    /// Keep every evaluated position's logits, not just the last.
    pub keep_all_logits: bool,
    /// When the KV budget is full, wait for other sequences to give blocks
    /// back instead of failing.
    pub wait_for_kv: bool,
}

impl Sequence {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Tokens whose keys and values are in the cache, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Tokens fed and not yet evaluated.
    pub fn pending(&self) -> &[u32] {
        &self.pending
    }

    /// Tokens the last steps took from the prefix cache instead of computing.
    pub fn cached_tokens(&self) -> usize {
        self.cached
    }

    /// The logits of the last step: one row of `vocab` per token it
    /// evaluated (with `keep_all_logits`), else the last token's.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// The last evaluated token's logits.
    pub fn last_logits(&self) -> Option<&[f32]> {
        self.logits.len().checked_sub(self.vocab).map(|at| &self.logits[at..])
    }

    /// Adds tokens to evaluate in the next step.
    pub fn feed(&mut self, ids: &[u32]) {
        self.pending.extend_from_slice(ids);
    }

    /// Makes `ids` this sequence's whole prompt: keeps the cached tokens it
    /// starts with, forgets the rest, and feeds what is left (at least one
    /// token, whose logits the next step gives).
    pub fn prompt(&mut self, ids: &[u32]) {
        let held = self.keep_common_prefix(ids);
        self.feed(&ids[held..]);
    }

    /// Keeps the cached tokens `ids` starts with (leaving at least one of
    /// `ids` to evaluate) and forgets the rest: a conversation's next turn
    /// evaluates only what it adds. Returns the tokens kept.
    pub fn keep_common_prefix(&mut self, ids: &[u32]) -> usize {
        let common = self.tokens.iter().zip(ids).take_while(|(a, b)| a == b).count().min(ids.len().saturating_sub(1));
        self.truncate(common);
        self.tokens.len()
    }

    /// Forgets every position after the first `n` (and anything pending).
    /// A block shared with another sequence is never written again: if
    /// position `n` falls inside one, the positions of that block before
    /// `n` are forgotten too and computed again.
    pub fn truncate(&mut self, n: usize) {
        self.pending.clear();
        let mut n = n.min(self.tokens.len());
        let keep = n.div_ceil(BLOCK_POSITIONS).min(self.table.len());
        self.blocks.release(&self.table[keep..]);
        self.table.truncate(keep);
        self.registered = self.registered.min(n / BLOCK_POSITIONS);
        if !n.is_multiple_of(BLOCK_POSITIONS) && keep > 0 {
            let b = self.table[keep - 1];
            if self.blocks.holders(b) > 1 {
                self.blocks.release(&[b]);
                self.table.truncate(keep - 1);
                n = (keep - 1) * BLOCK_POSITIONS;
            } else {
                self.blocks.unregister(b);
            }
        }
        self.tokens.truncate(n);
        self.cached = self.cached.min(n);
    }

    /// Forgets everything, giving every block back.
    pub fn clear(&mut self) {
        self.truncate(0);
        self.logits.clear();
    }

    /// A token drawn from the last step's logits, the history being the
    /// tokens evaluated so far; `None` before any step.
    pub fn sample(&mut self) -> Option<u32> {
        let at = self.logits.len().checked_sub(self.vocab)?;
        Some(self.sampler.sample(&self.logits[at..], &self.tokens))
    }
}

impl Drop for Sequence {
    fn drop(&mut self) {
        self.blocks.release(&self.table);
    }
}
