//! One interface over what evaluates a step: the reference interpreter,
//! the compiled CPU plan, and the CUDA kernels.
//!
//! A step is a batch of rows, each a token at a position of some
//! sequence; the backend writes their keys and values to the KV store it
//! is given (a row's sequence is the store's business) and returns the
//! logits of the rows asked for. The engine builds steps and owns the
//! cache; a backend only computes.

#[cfg(feature = "native")]
use crate::compiled::CompiledModel;
#[cfg(feature = "native")]
use crate::cuda::CudaModel;
use crate::error::RuntimeError;
#[cfg(feature = "native")]
use bitnet_codegen::schedule::Pinned;
use bitnet_frontends::model::Model;
use bitnet_ir::interp::{EvalError, Interpreter, KvStore, Tensor};
use bitnet_ir::Graph;

/// What evaluates the graph.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendKind {
    /// The reference interpreter, on the graph as the frontend built it.
    Interp,
    /// The optimized, scheduled graph on the native kernels (CPU or GPU).
    #[default]
    Compiled,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Interp => "interp",
            BackendKind::Compiled => "compiled",
        }
    }
}

/// Where the compiled graph runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    /// The first NVIDIA GPU, through the CUDA driver.
    Cuda,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub threads: usize,
    pub backend: BackendKind,
    pub device: Device,
    /// Tiles fixed by the user for every ternary matmul.
    #[cfg(feature = "native")]
    pub pinned: Pinned,
    /// Context size per sequence; the model's training context when `None`.
    pub context: Option<usize>,
    /// Take tiles from the tuning database (measured by `bitnet autotune`
    /// on this machine for this thread count) where it has them.
    pub tuning: bool,
}

/// The rows of one step: `tokens[i]` at `positions[i]` of its sequence;
/// the logits wanted are those of rows `out_rows`, in that order.
#[derive(Clone, Copy, Debug)]
pub struct StepRows<'a> {
    pub tokens: &'a [i32],
    pub positions: &'a [i32],
    pub out_rows: &'a [i32],
}

pub trait Backend: Send {
    fn kind(&self) -> BackendKind;

    fn device(&self) -> Device {
        Device::Cpu
    }

    /// The graph it evaluates.
    fn graph(&self) -> &Graph;

    /// Makes room for the engine's `blocks` KV blocks where this backend
    /// keeps them, if not in the engine's pages (a GPU keeps its own copy
    /// of the pages and reads each row's block table from the store it is
    /// given): `true` if it did, and the engine then holds no host copy.
    fn own_kv_blocks(&mut self, _blocks: usize) -> Result<bool, RuntimeError> {
        Ok(false)
    }

    /// Evaluates one step: the logits of `rows.out_rows`, row-major. With
    /// `times`, each kernel is timed (compiled backends only).
    fn step(&mut self, model: &Model, rows: &StepRows, kv: &mut dyn KvStore, times: Option<&mut KernelTimes>) -> Result<Vec<f32>, RuntimeError>;

    #[cfg(feature = "native")]
    fn as_compiled(&self) -> Option<&CompiledModel> {
        None
    }

    #[cfg(feature = "native")]
    fn as_cuda(&mut self) -> Option<&mut CudaModel> {
        None
    }
}

/// The reference interpreter on the frontend's step graph.
pub struct InterpBackend {
    pub graph: Graph,
    pub threads: usize,
}

impl Backend for InterpBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Interp
    }

    fn graph(&self) -> &Graph {
        &self.graph
    }

    fn step(&mut self, model: &Model, rows: &StepRows, kv: &mut dyn KvStore, times: Option<&mut KernelTimes>) -> Result<Vec<f32>, RuntimeError> {
        if times.is_some() {
            return RuntimeError::input("kernel timings need the compiled backend (--backend compiled)");
        }
        let inputs = [
            ("tokens", Tensor::ids(rows.tokens.to_vec())),
            ("positions", Tensor::ids(rows.positions.to_vec())),
            ("out_rows", Tensor::ids(rows.out_rows.to_vec())),
        ];
        match Interpreter::new(model, self.threads).eval(&self.graph, &inputs, kv)?.pop() {
            Some(Tensor::F32 { data, .. }) => Ok(data),
            _ => Err(EvalError("the graph did not produce logits".into()).into()),
        }
    }
}

#[cfg(feature = "native")]
impl Backend for CompiledModel {
    fn kind(&self) -> BackendKind {
        BackendKind::Compiled
    }

    fn graph(&self) -> &Graph {
        CompiledModel::graph(self)
    }

    fn step(&mut self, model: &Model, rows: &StepRows, kv: &mut dyn KvStore, times: Option<&mut KernelTimes>) -> Result<Vec<f32>, RuntimeError> {
        Ok(self.eval(model, rows, kv, times)?)
    }

    fn as_compiled(&self) -> Option<&CompiledModel> {
        Some(self)
    }
}

/// The CUDA kernels, with the KV blocks on the GPU: a step is a ragged
/// batch as on the CPU, each row reading its sequence's block table.
#[cfg(feature = "native")]
pub struct CudaBackend(pub CudaModel);

#[cfg(feature = "native")]
// SAFETY: the one field that is not `Send` is the captured CUDA graph
// (raw driver handles, which belong to the context, not to a thread);
// the engine uses its backend from one thread at a time (under its step
// lock), and cudarc makes the context current before each call.
unsafe impl Send for CudaBackend {}

#[cfg(feature = "native")]
impl Backend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Compiled
    }

    fn device(&self) -> Device {
        Device::Cuda
    }

    fn graph(&self) -> &Graph {
        self.0.graph()
    }

    fn own_kv_blocks(&mut self, blocks: usize) -> Result<bool, RuntimeError> {
        self.0.allocate_kv(blocks)?;
        Ok(true)
    }

    fn step(&mut self, _: &Model, rows: &StepRows, kv: &mut dyn KvStore, times: Option<&mut KernelTimes>) -> Result<Vec<f32>, RuntimeError> {
        let tables = (0..rows.tokens.len())
            .map(|r| kv.table(r).ok_or_else(|| EvalError(format!("row {r} of the step has no KV block table: the CUDA kernels read a paged cache"))))
            .collect::<Result<Vec<_>, _>>()?;
        let step = crate::cuda::Step { tokens: rows.tokens, positions: rows.positions, out_rows: rows.out_rows, tables: &tables };
        let logits = self.0.eval(&step)?;
        if let Some(times) = times {
            // The same rows again, kernel by kernel: the cache entries it
            // writes are the same.
            *times = self.0.profile(&step)?;
        }
        Ok(logits)
    }

    fn as_cuda(&mut self) -> Option<&mut CudaModel> {
        Some(&mut self.0)
    }
}

/// Milliseconds and calls per kernel family, in the order found.
#[derive(Clone, Debug, Default)]
pub struct KernelTimes(pub Vec<(String, f64, usize)>);

impl KernelTimes {
    pub fn add(&mut self, family: &str, ms: f64) {
        match self.0.iter_mut().find(|f| f.0 == family) {
            Some(f) => {
                f.1 += ms;
                f.2 += 1;
            }
            None => self.0.push((family.to_string(), ms, 1)),
        }
    }

    /// The mean of `runs` (each the times of one step): milliseconds and
    /// calls per step, slowest first.
    pub fn mean(runs: &[KernelTimes]) -> KernelTimes {
        let mut all = KernelTimes::default();
        for (family, ms, calls) in runs.iter().flat_map(|r| &r.0) {
            match all.0.iter_mut().find(|f| &f.0 == family) {
                Some(f) => {
                    f.1 += ms;
                    f.2 += calls;
                }
                None => all.0.push((family.clone(), *ms, *calls)),
            }
        }
        let n = runs.len().max(1);
        for f in &mut all.0 {
            f.1 /= n as f64;
            f.2 = f.2.div_ceil(n);
        }
        all.0.sort_by(|a, b| b.1.total_cmp(&a.1));
        all
    }

    /// `"ternary_glu 812.40 (30), attention 95.10 (30), ..."`: a string, so
    /// that `bitnet bench --json` stays one flat object.
    pub fn summary(&self) -> String {
        self.0.iter().map(|(f, ms, n)| format!("{f} {ms:.3} ({n})")).collect::<Vec<_>>().join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::KernelTimes;

    #[test]
    fn mean_kernel_times_are_per_step_and_slowest_first() {
        let step = |glu: f64, norm: f64| KernelTimes(vec![("ternary_glu".into(), glu, 30), ("rms_norm_quant".into(), norm, 120)]);
        let mut late = step(2.0, 5.0);
        late.0.push(("attention".into(), 0.5, 30));
        let mean = KernelTimes::mean(&[step(10.0, 1.0), step(12.0, 2.0), late]);
        assert_eq!(mean.summary(), "ternary_glu 8.000 (30), rms_norm_quant 2.667 (120), attention 0.167 (10)");
        assert!(KernelTimes::mean(&[]).0.is_empty());
    }
}
