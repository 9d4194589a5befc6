//! A loaded model ready to generate: weights, tokenizer, graphs, KV cache.

use crate::artifact::{self, Artifact, Header};
use crate::compiled::{CompiledModel, KernelTimes};
use crate::cuda::CudaModel;
use crate::sampler::{Sampler, SamplerConfig};
use bitnet_autotune::db::CudaTuned;
use bitnet_autotune::{Database, Tuned};
use bitnet_codegen::cuda::PhaseTiles;
use bitnet_codegen::schedule::{schedule, Pinned, Schedule, TileSource, Workload};
use bitnet_codegen::target::HostCpu;
use bitnet_frontends::model::{Model, ModelError};
use bitnet_frontends::tokenizer::{Tokenizer, TokenizerError};
use bitnet_ir::interp::{EvalError, Interpreter, KvCache, Tensor};
use bitnet_ir::passes;
use bitnet_ir::Graph;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error("{0}")]
    Input(String),
    #[error("compiling: {0}")]
    Compile(String),
    #[error("{0}")]
    Artifact(String),
}

/// What evaluates the graphs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// The reference interpreter, on the graphs as the frontend built them.
    Interp,
    /// Optimized, scheduled graphs on the native kernels.
    #[default]
    Compiled,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Interp => "interp",
            Backend::Compiled => "compiled",
        }
    }
}

/// Where the compiled graphs run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    /// The first NVIDIA GPU, through the CUDA driver.
    Cuda,
}

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub threads: usize,
    pub backend: Backend,
    pub device: Device,
    /// Tiles fixed by the user for every ternary matmul.
    pub pinned: Pinned,
    /// Context size; the model's training context when `None`.
    pub context: Option<usize>,
    /// Take tiles from the tuning database (measured by `bitnet autotune`
    /// on this machine for this thread count) where it has them.
    pub tuning: bool,
}

pub struct Session {
    pub model: Model,
    /// Shared so that text can be decoded while the session generates.
    pub tokenizer: Arc<Tokenizer>,
    graph_last: Graph,
    graph_all: Graph,
    compiled: Option<CompiledModel>,
    cuda: Option<CudaModel>,
    kv: KvCache,
    /// Tokens whose keys and values are in the cache, in order.
    tokens: Vec<u32>,
    pub threads: usize,
    pub context: usize,
    pub load_ms: f64,
    /// Things the user should know about what was loaded (e.g. an artifact
    /// compiled on another CPU).
    pub warnings: Vec<String>,
    /// The header of the artifact this session runs, if it runs one.
    pub artifact: Option<Header>,
}

impl Session {
    /// Loads a model file or folder (compiled in memory for the compiled
    /// backend) or a `.bnx` artifact (mapped, ready to run).
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Session, RuntimeError> {
        if artifact::is_artifact(path) {
            return Self::load_artifact(path, opts);
        }
        let t0 = Instant::now();
        let model = Model::open(path)?;
        let graph_last = model.graph(false)?;
        let graph_all = model.graph(true)?;
        Interpreter::new(&model, 1).check_weights(&graph_all)?;
        let context = opts.context.unwrap_or(model.config.context).max(1);
        let mut warnings = Vec::new();
        let (compiled, cuda) = match (opts.backend, opts.device) {
            (Backend::Interp, Device::Cpu) => (None, None),
            (Backend::Interp, Device::Cuda) => {
                return Err(RuntimeError::Input("--backend interp runs on the CPU only; drop it to run compiled code on the GPU".into()))
            }
            (Backend::Compiled, Device::Cpu) => (Some(compile(&model, &graph_last, &graph_all, opts, &mut warnings)?), None),
            (Backend::Compiled, Device::Cuda) => (None, Some(compile_cuda(&model, &graph_last, &graph_all, opts, context, &mut warnings)?)),
        };
        Self::assemble(model, (graph_last, graph_all), (compiled, cuda), opts, t0, warnings, None)
    }

    fn load_artifact(path: &Path, opts: &LoadOptions) -> Result<Session, RuntimeError> {
        let t0 = Instant::now();
        let a = Artifact::open(path)?;
        let fixed = |what: &str| {
            RuntimeError::Artifact(format!("{}: {what} is fixed when the artifact is compiled (bitnet compile {what} ...); run it without", path.display()))
        };
        match (a.header.target.device.as_str(), opts.device) {
            ("cuda", Device::Cuda) => return Self::load_cuda_artifact(path, a, opts, t0),
            ("cuda", Device::Cpu) => {
                return Err(RuntimeError::Artifact(format!(
                    "{}: this artifact holds CUDA kernels ({}); run it with --device cuda, or compile {} for the CPU (bitnet compile -m {} -o FILE.bnx)",
                    path.display(),
                    a.header.target.description,
                    a.header.source.path,
                    a.header.source.path
                )))
            }
            (_, Device::Cuda) => {
                return Err(RuntimeError::Artifact(format!(
                    "{}: this artifact holds CPU code; compile {} with --device cuda, or run that model with --device cuda",
                    path.display(),
                    a.header.source.path
                )))
            }
            _ => {}
        }
        if opts.backend == Backend::Interp {
            return Err(RuntimeError::Artifact(format!(
                "{}: an artifact holds compiled code only; run the interpreter on its source model ({})",
                path.display(),
                a.header.source.path
            )));
        }
        if opts.pinned.head_q8 && a.header.head != "q8" {
            return Err(fixed("--head"));
        }
        if opts.pinned.ternary.is_some() || opts.pinned.isa.is_some() {
            return Err(RuntimeError::Artifact(format!(
                "{}: its kernels and tiles were chosen when it was compiled; run it without --isa, or compile it again with it (bitnet compile -m {} --isa ISA -o FILE.bnx)",
                path.display(),
                a.header.source.path
            )));
        }
        let warnings = a.check_target(path)?;
        let compiled = a.compiled(path, opts.threads)?;
        let graphs = (compiled.graph(false).clone(), compiled.graph(true).clone());
        let header = a.header.clone();
        Self::assemble(a.model, graphs, (Some(compiled), None), opts, t0, warnings, Some(header))
    }

    fn load_cuda_artifact(path: &Path, a: Artifact, opts: &LoadOptions, t0: Instant) -> Result<Session, RuntimeError> {
        if opts.backend == Backend::Interp || opts.pinned.head_q8 || opts.pinned.ternary.is_some() || opts.pinned.isa.is_some() {
            return Err(RuntimeError::Artifact(format!(
                "{}: a CUDA artifact runs its compiled kernels as they are; drop --backend, --head and tile options",
                path.display()
            )));
        }
        let warnings = a.check_target(path)?;
        let (last, all, ptx, packed) = a.cuda(path)?;
        let graphs = (last.0.clone(), all.0.clone());
        let context = opts.context.unwrap_or(a.model.config.context).max(1);
        let cuda =
            CudaModel::new(&a.model, packed, last, all, Some(ptx), context).map_err(|e| RuntimeError::Artifact(format!("{}: {}", path.display(), e.0)))?;
        let header = a.header.clone();
        Self::assemble(a.model, graphs, (None, Some(cuda)), opts, t0, warnings, Some(header))
    }

    /// A session over a loaded model, its graphs (last position's logits,
    /// all logits) and the engine that runs them (none: the interpreter).
    fn assemble(
        model: Model,
        (graph_last, graph_all): (Graph, Graph),
        (compiled, cuda): (Option<CompiledModel>, Option<CudaModel>),
        opts: &LoadOptions,
        t0: Instant,
        warnings: Vec<String>,
        artifact: Option<Header>,
    ) -> Result<Session, RuntimeError> {
        let context = opts.context.unwrap_or(model.config.context).max(1);
        Ok(Session {
            tokenizer: Arc::new(model.tokenizer()?),
            context,
            model,
            graph_last,
            graph_all,
            compiled,
            cuda,
            kv: KvCache::with_capacity(context),
            tokens: Vec::new(),
            threads: opts.threads.max(1),
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            warnings,
            artifact,
        })
    }

    pub fn graph(&self, all_logits: bool) -> &Graph {
        if all_logits {
            &self.graph_all
        } else {
            &self.graph_last
        }
    }

    /// Tokens in the cache.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn reset(&mut self) {
        self.kv.clear();
        self.tokens.clear();
    }

    /// Forgets every cached token after the first `n`.
    pub fn rewind(&mut self, n: usize) {
        self.kv.truncate(n);
        self.tokens.truncate(n);
    }

    pub fn vocab(&self) -> usize {
        self.model.config.vocab
    }

    /// Evaluates `tokens` after those already cached. Returns logits, one
    /// row of `vocab` per token (`all_logits`) or for the last token only.
    pub fn eval(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>, RuntimeError> {
        self.eval_timed(tokens, all_logits, None)
    }

    /// Evaluates as [`Session::eval`] does, timing each kernel: the
    /// logits, and milliseconds and calls per kernel family, slowest first.
    /// Compiled backends only (the interpreter has no kernels to time).
    pub fn profile(&mut self, tokens: &[u32], all_logits: bool) -> Result<(Vec<f32>, KernelTimes), RuntimeError> {
        if self.backend() != Backend::Compiled {
            return Err(RuntimeError::Input("kernel timings need the compiled backend (--backend compiled)".into()));
        }
        let mut times = KernelTimes::default();
        let logits = self.eval_timed(tokens, all_logits, Some(&mut times))?;
        Ok((logits, times))
    }

    fn eval_timed(&mut self, tokens: &[u32], all_logits: bool, times: Option<&mut KernelTimes>) -> Result<Vec<f32>, RuntimeError> {
        if tokens.is_empty() {
            return Err(RuntimeError::Input("nothing to evaluate: the prompt is empty".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab()) {
            return Err(RuntimeError::Input(format!("token id {bad} is outside the model's vocabulary of {}", self.vocab())));
        }
        let start = self.tokens.len();
        if start + tokens.len() > self.context {
            return Err(RuntimeError::Input(format!(
                "{} tokens do not fit in the context: {start} already used of {} (raise it with -c)",
                tokens.len(),
                self.context
            )));
        }
        let ids = Tensor::ids(tokens.iter().map(|&t| t as i32).collect());
        let positions = Tensor::ids((start..start + tokens.len()).map(|p| p as i32).collect());
        let out = match (&mut self.compiled, &mut self.cuda) {
            (_, Some(c)) => {
                let (Tensor::I32 { data: ids, .. }, Tensor::I32 { data: pos, .. }) = (&ids, &positions) else { unreachable!() };
                // Timing launches one kernel at a time again, at the same
                // positions: the cache entries it writes are the same.
                c.eval(ids, pos, all_logits).and_then(|logits| match times {
                    Some(times) => c.profile(ids, pos, all_logits).map(|t| *times = t).map(|_| logits),
                    None => Ok(logits),
                })
            }
            (Some(c), None) => {
                let (Tensor::I32 { data: ids, .. }, Tensor::I32 { data: pos, .. }) = (&ids, &positions) else { unreachable!() };
                match times {
                    Some(times) => c.profile(&self.model, ids, pos, all_logits, &mut self.kv).map(|(logits, t)| {
                        *times = t;
                        logits
                    }),
                    None => c.eval(&self.model, ids, pos, all_logits, &mut self.kv),
                }
            }
            (None, None) => {
                let graph = if all_logits { &self.graph_all } else { &self.graph_last };
                let interp = Interpreter::new(&self.model, self.threads);
                interp.eval(graph, &[("tokens", ids), ("positions", positions)], &mut self.kv).and_then(|mut out| match out.pop() {
                    Some(Tensor::F32 { data, .. }) => Ok(data),
                    _ => Err(EvalError("the graph did not produce logits".into())),
                })
            }
        };
        match out {
            Ok(logits) => {
                self.tokens.extend_from_slice(tokens);
                Ok(logits)
            }
            Err(e) => {
                self.kv.truncate(start);
                Err(e.into())
            }
        }
    }

    pub fn backend(&self) -> Backend {
        if self.compiled.is_some() || self.cuda.is_some() {
            Backend::Compiled
        } else {
            Backend::Interp
        }
    }

    /// The model on the GPU, when it runs there.
    pub fn cuda(&self) -> Option<&CudaModel> {
        self.cuda.as_ref()
    }

    pub fn cuda_mut(&mut self) -> Option<&mut CudaModel> {
        self.cuda.as_mut()
    }

    /// The compiled graphs and schedules, when the backend is compiled.
    pub fn compiled(&self) -> Option<&CompiledModel> {
        self.compiled.as_ref()
    }

    /// Generates up to `opts.n_predict` tokens after `prompt`, calling
    /// `on_token` with each as it is chosen.
    pub fn generate(&mut self, prompt: &[u32], opts: &GenerateOptions, mut on_token: impl FnMut(u32)) -> Result<Generation, RuntimeError> {
        if prompt.len() + self.tokens.len() > self.context {
            return Err(RuntimeError::Input(format!(
                "the prompt is {} tokens, longer than the {} the context has left (context size {}; raise it with -c)",
                prompt.len(),
                self.context - self.tokens.len(),
                self.context
            )));
        }
        let mut sampler = Sampler::new(opts.sampler.clone());
        let mut gen = Generation { prompt_ids: prompt.to_vec(), ..Default::default() };
        let t0 = Instant::now();
        let mut logits = self.eval(prompt, opts.dump_logits)?;
        gen.prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        let vocab = self.vocab();
        let t1 = Instant::now();
        loop {
            let last = logits[logits.len() - vocab..].to_vec();
            if opts.dump_logits {
                gen.logits.extend_from_slice(&logits);
            }
            if gen.generated_ids.len() >= opts.n_predict {
                break;
            }
            let next = sampler.sample(&last, &self.tokens);
            gen.generated_ids.push(next);
            on_token(next);
            if !opts.ignore_eos && self.tokenizer.is_eog(next) {
                gen.stop = StopReason::EndOfGeneration;
                break;
            }
            if gen.generated_ids.len() >= opts.n_predict {
                break;
            }
            if self.tokens.len() >= self.context {
                gen.stop = StopReason::ContextFull;
                break;
            }
            logits = self.eval(&[next], opts.dump_logits)?;
            gen.decoded += 1;
        }
        gen.decode_ms = t1.elapsed().as_secs_f64() * 1e3;
        Ok(gen)
    }
}

/// The graph passes then the schedule: what `compile` does to a graph.
/// Tiles come from `pinned`, then `source`, then the heuristic.
pub fn lower(g: &Graph, pinned: &Pinned, source: Option<&dyn TileSource>) -> Result<(Graph, Schedule), RuntimeError> {
    let g = passes::optimize(g.clone(), None).map_err(|e| RuntimeError::Compile(e.to_string()))?;
    let s = schedule(&g, pinned, source).map_err(RuntimeError::Compile)?;
    Ok((g, s))
}

/// The tuning database's tiles for this machine and `threads`; problems
/// reading it become warnings, never errors.
pub fn tuned_tiles(threads: usize, warnings: &mut Vec<String>) -> Option<Tuned> {
    match Database::open_default() {
        Ok(db) => {
            let (tuned, problems) = db.source(&HostCpu::detect().fingerprint(), threads);
            warnings.extend(problems);
            Some(tuned)
        }
        Err(e) => {
            warnings.push(format!("tuning database: {e}; using default tiles"));
            None
        }
    }
}

/// Every distinct kernel workload with tile knobs in a model's graphs.
pub fn workloads(model: &Model) -> Result<Vec<Workload>, RuntimeError> {
    let mut out = Vec::new();
    for all in [false, true] {
        let (_, s) = lower(&model.graph(all)?, &Pinned::default(), None)?;
        for step in s.steps {
            match Workload::parse(&step.key) {
                Some(w) if !out.contains(&w) => out.push(w),
                _ => {}
            }
        }
    }
    Ok(out)
}

/// Every distinct matrix-product workload of a model's CUDA kernels.
pub fn cuda_workloads(model: &Model) -> Result<Vec<Workload>, RuntimeError> {
    let mut out = Vec::new();
    for all in [false, true] {
        let (_, p) = lower_cuda(&model.graph(all)?, bitnet_codegen::cuda::nvrtc::DEFAULT_SM, None)?;
        for (_, key, _) in p.tiles {
            match Workload::parse(&bitnet_codegen::schedule::WorkloadKey(key)) {
                Some(w) if !out.contains(&w) => out.push(w),
                _ => {}
            }
        }
    }
    Ok(out)
}

/// Lowers both graphs, then prepares the weights for the native kernels.
fn compile(model: &Model, last: &Graph, all: &Graph, opts: &LoadOptions, warnings: &mut Vec<String>) -> Result<CompiledModel, RuntimeError> {
    let threads = opts.threads.max(1);
    let tuned = if opts.tuning { tuned_tiles(threads, warnings) } else { None };
    let source = tuned.as_ref().map(|t| t as &dyn TileSource);
    Ok(CompiledModel::new(model, lower(last, &opts.pinned, source)?, lower(all, &opts.pinned, source)?, threads)?)
}

/// The graph passes, then lowering to CUDA kernels and launches for GPUs
/// of compute capability `sm`, with the tiles `tuned` measured for each
/// matrix product (else the heuristic's).
pub fn lower_cuda(g: &Graph, sm: u32, tuned: Option<&CudaTuned>) -> Result<(Graph, bitnet_codegen::cuda::Program), RuntimeError> {
    let g = passes::optimize_cuda(g.clone(), None).map_err(|e| RuntimeError::Compile(e.to_string()))?;
    let tiles = |key: &bitnet_codegen::schedule::WorkloadKey| tuned.map_or(PhaseTiles::heuristic(key, sm), |t| t.tiles(key, sm));
    let p = bitnet_codegen::cuda::lower(&g, &tiles).map_err(RuntimeError::Compile)?;
    Ok((g, p))
}

/// The tuning database's tiles for this machine's GPU, when it has one
/// (`bitnet autotune --device cuda` measures them).
pub fn cuda_tuned_tiles(warnings: &mut Vec<String>) -> Option<CudaTuned> {
    let (_, name) = crate::cuda::device().ok()?;
    match Database::open_default() {
        Ok(db) => {
            let (tuned, problems) = db.cuda_source(&crate::cuda::fingerprint(&name));
            warnings.extend(problems);
            Some(tuned)
        }
        Err(e) => {
            warnings.push(format!("tuning database: {e}; using default tiles"));
            None
        }
    }
}

fn compile_cuda(model: &Model, last: &Graph, all: &Graph, opts: &LoadOptions, context: usize, warnings: &mut Vec<String>) -> Result<CudaModel, RuntimeError> {
    if opts.pinned.head_q8 || opts.pinned.ternary.is_some() || opts.pinned.isa.is_some() {
        return Err(RuntimeError::Input("--head q8 and pinned CPU tiles are CPU options; the CUDA backend runs the stored head".into()));
    }
    let tuned = if opts.tuning { cuda_tuned_tiles(warnings) } else { None };
    // Without a device CudaModel::new says so; the lowering then is moot.
    let sm = crate::cuda::device_sm().unwrap_or(bitnet_codegen::cuda::nvrtc::DEFAULT_SM);
    let lower = |g| lower_cuda(g, sm, tuned.as_ref());
    Ok(CudaModel::new(model, Default::default(), lower(last)?, lower(all)?, None, context)?)
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub n_predict: usize,
    pub ignore_eos: bool,
    pub sampler: SamplerConfig,
    /// Keep the logits of every evaluated position.
    pub dump_logits: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StopReason {
    #[default]
    Length,
    EndOfGeneration,
    ContextFull,
}

#[derive(Clone, Debug, Default)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    /// Rows of logits (with `dump_logits`): the prompt positions, then one
    /// per generated token that was fed back.
    pub logits: Vec<f32>,
    pub prefill_ms: f64,
    /// Time from the first sampled token to the end.
    pub decode_ms: f64,
    /// Tokens evaluated one at a time after the prompt.
    pub decoded: usize,
    pub stop: StopReason,
}

impl Generation {
    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.prompt_ids.len(), self.prefill_ms)
    }
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.decoded, self.decode_ms)
    }
}

fn rate(n: usize, ms: f64) -> f64 {
    if n == 0 || ms <= 0.0 {
        0.0
    } else {
        n as f64 / (ms / 1e3)
    }
}
