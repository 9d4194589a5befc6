//! From a model's graph to what a backend runs: the graph passes, the
//! schedule and tiles (from the user, the tuning database or the
//! heuristic), and the prepared weights.

use crate::compiled::CompiledModel;
use crate::cuda::CudaModel;
use crate::error::RuntimeError;
use crate::kv::BLOCK_POSITIONS;
use crate::LoadOptions;
use bitnet_autotune::db::CudaTuned;
use bitnet_autotune::{calibrate, Database, Tuned};
use bitnet_codegen::cuda::PhaseTiles;
use bitnet_codegen::schedule::{schedule, HeadQuant, Pinned, Schedule, TileSource, Workload};
use bitnet_codegen::target::HostCpu;
use bitnet_frontends::model::Model;
use bitnet_ir::passes;
use bitnet_ir::Graph;

/// The graph passes then the schedule: what `compile` does to a graph.
/// Tiles come from `pinned`, then `source`, then the heuristic.
pub fn lower(g: &Graph, pinned: &Pinned, source: Option<&dyn TileSource>) -> Result<(Graph, Schedule), RuntimeError> {
    let g = passes::optimize(g.clone(), None).map_err(|e| RuntimeError::Compile(e.to_string()))?;
    let s = schedule(&g, pinned, source).map_err(RuntimeError::Compile)?;
    Ok((g, s))
}

/// The tuning database's tiles for this machine and `threads`; problems
/// reading it become warnings, never errors. Unless `pinned` fixes both
/// what it would choose, a machine and thread count the database has not
/// seen are calibrated first (well under a second; a progress line on
/// stderr), once a process even where the database cannot keep the result:
/// see [`bitnet_autotune::calibrate`].
pub fn tuned_tiles(threads: usize, pinned: &Pinned, warnings: &mut Vec<String>) -> Option<Tuned> {
    static TRIED: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());
    match Database::open_default() {
        Ok(db) => {
            let fingerprint = HostCpu::detect().fingerprint();
            let (mut tuned, problems) = db.source(&fingerprint, threads);
            warnings.extend(problems);
            let pinned_both = pinned.isa.is_some() && pinned.packing.is_some();
            let first_try = || {
                let mut tried = TRIED.lock().unwrap_or_else(|e| e.into_inner());
                let first = !tried.contains(&threads);
                tried.push(threads);
                first
            };
            if !tuned.is_calibrated() && !pinned_both && calibrate::candidates().len() > 1 && first_try() {
                eprint!("calibrating the CPU kernels for {threads} threads on this machine (once) ... ");
                match calibrate::calibrate(&db, threads) {
                    Ok(Some(c)) => match c.batch {
                        Some(b) => eprintln!("{} {} (batched steps: {} {})", c.decode.isa.name(), c.decode.packing.name(), b.isa.name(), b.packing.name()),
                        None => eprintln!("{} {}", c.decode.isa.name(), c.decode.packing.name()),
                    },
                    Ok(None) => eprintln!("nothing timed"),
                    Err(e) => {
                        eprintln!("failed");
                        warnings.push(format!("calibration: {e}; using the default ISA and packing"));
                    }
                }
                tuned = db.source(&fingerprint, threads).0;
            }
            Some(tuned)
        }
        Err(e) => {
            warnings.push(format!("tuning database: {e}; using default tiles"));
            None
        }
    }
}

/// Every distinct kernel workload with tile knobs in a model's step graph.
pub fn workloads(model: &Model) -> Result<Vec<Workload>, RuntimeError> {
    let mut out = Vec::new();
    let (_, s) = lower(&model.step_graph()?, &Pinned::default(), None)?;
    for step in s.steps {
        match Workload::parse(&step.key) {
            Some(w) if !out.contains(&w) => out.push(w),
            _ => {}
        }
    }
    Ok(out)
}

/// Every distinct matrix-product workload of a model's CUDA kernels.
pub fn cuda_workloads(model: &Model) -> Result<Vec<Workload>, RuntimeError> {
    let mut out = Vec::new();
    let (_, p) = lower_cuda(&model.step_graph()?, bitnet_codegen::cuda::nvrtc::DEFAULT_SM, None, HeadQuant::Stored)?;
    for (_, key, _) in p.tiles {
        match Workload::parse(&bitnet_codegen::schedule::WorkloadKey(key)) {
            Some(w) if !out.contains(&w) => out.push(w),
            _ => {}
        }
    }
    Ok(out)
}

/// Lowers the step graph, then prepares the weights for the native kernels
/// of an engine that steps up to `parallel` sequences at once (more than
/// one: the packing the calibration found fastest for batched steps).
pub(crate) fn compile_cpu(model: &Model, step: &Graph, opts: &LoadOptions, parallel: usize, warnings: &mut Vec<String>) -> Result<CompiledModel, RuntimeError> {
    let threads = opts.threads.max(1);
    let tuned = if opts.tuning { tuned_tiles(threads, &opts.pinned, warnings) } else { None };
    let tuned = tuned.map(|t| if parallel > 1 { t.for_batches() } else { t });
    let source = tuned.as_ref().map(|t| t as &dyn TileSource);
    Ok(CompiledModel::new(model, lower(step, &opts.pinned, source)?, threads)?)
}

/// The graph passes, then lowering to CUDA kernels and launches for GPUs
/// of compute capability `sm`, with the tiles `tuned` measured for each
/// matrix product (else the heuristic's), keys and values in the
/// engine's paged KV cache (blocks of [`BLOCK_POSITIONS`]), the output
/// head read as `head` says (stored, or int8 rows with `q8`).
pub fn lower_cuda(g: &Graph, sm: u32, tuned: Option<&CudaTuned>, head: HeadQuant) -> Result<(Graph, bitnet_codegen::cuda::Program), RuntimeError> {
    let g = passes::optimize(g.clone(), None).map_err(|e| RuntimeError::Compile(e.to_string()))?;
    let tiles = |key: &bitnet_codegen::schedule::WorkloadKey| tuned.map_or(PhaseTiles::heuristic(key, sm), |t| t.tiles(key, sm));
    let p = bitnet_codegen::cuda::lower(&g, &tiles, BLOCK_POSITIONS.trailing_zeros(), head, bitnet_codegen::cuda::kernels::DecodeSplit::DEFAULT)
        .map_err(RuntimeError::Compile)?;
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

/// The CUDA kernels of the step graph.
pub(crate) fn compile_cuda(model: &Model, opts: &LoadOptions, context: usize, warnings: &mut Vec<String>) -> Result<CudaModel, RuntimeError> {
    if opts.pinned.head == HeadQuant::Q4 || opts.pinned.ternary.is_some() || opts.pinned.isa.is_some() {
        return RuntimeError::input("--head q4 and pinned CPU tiles are CPU options; the CUDA backend reads the head as stored or as int8 rows (--head q8)");
    }
    let tuned = if opts.tuning { cuda_tuned_tiles(warnings) } else { None };
    // Without a device CudaModel::new says so; the lowering then is moot.
    let sm = crate::cuda::device_sm().unwrap_or(bitnet_codegen::cuda::nvrtc::DEFAULT_SM);
    Ok(CudaModel::new(model, Default::default(), lower_cuda(&model.step_graph()?, sm, tuned.as_ref(), opts.pinned.head)?, None, context)?)
}
