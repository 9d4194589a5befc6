//! The CUDA executor: runs the launches of a lowered graph
//! ([`bitnet_codegen::cuda::Program`]) on an NVIDIA GPU through the driver
//! API (cudarc, loaded at run time).
//!
//! Loading finds the driver (clear errors when there is no libcuda, no
//! device, or too little memory), compiles the module with NVRTC (or takes
//! PTX compiled earlier), and uploads each weight once in the layout its
//! kernel reads: ternary weights packed as the CPU's one-row tiles, f16 and
//! bf16 matrices as stored, everything else as f32. Activations live in
//! one buffer per slot of the same plan the CPU executor uses, grown when a
//! longer step needs more. The KV cache is the engine's paged cache kept on
//! the device: the same blocks, laid out as the CPU's, which each row of a
//! step finds through its sequence's block table. A step (the rows of any
//! number of sequences) uploads the token ids, positions, the rows whose
//! logits are wanted and the block tables, makes every launch on one
//! stream (or replays a captured CUDA graph for a decode step), and copies
//! the logits back.

use crate::backend::KernelTimes;
use crate::compiled::{assign_slots, Form, Kind, WeightKey, NO_SLOT};
use bitnet_codegen::cpu::int8::Int8Rows;
use bitnet_codegen::cpu::ternary::PackedTernary;
use bitnet_codegen::cuda::emulator::Param;
use bitnet_codegen::cuda::{self, device_float_type, Arg, FloatType, Grid, Launch, Program};
use bitnet_ir::interp::{EvalError, WeightSource};
use bitnet_ir::{Extent, Graph, Op};
use cudarc::driver::{CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::sync::Arc;

fn err<T>(msg: impl Into<String>) -> Result<T, EvalError> {
    Err(EvalError(msg.into()))
}

fn driver<T>(what: &str, r: Result<T, cudarc::driver::DriverError>) -> Result<T, EvalError> {
    r.map_err(|e| EvalError(format!("CUDA {what}: {e:?}")))
}

/// The GPU to run on, or why there is none: no driver library, no device.
pub fn device() -> Result<(Arc<CudaContext>, String), String> {
    // SAFETY: probing loads libcuda if it is there; it has no preconditions.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no NVIDIA driver: libcuda.so (libcuda.so.1) was not found on the library path (LD_LIBRARY_PATH, /etc/ld.so.cache); \
                    --device cuda needs an NVIDIA GPU and its driver"
            .into());
    }
    let count = CudaContext::device_count().map_err(|e| format!("the NVIDIA driver is there but cannot start: {e:?}"))?;
    if count < 1 {
        return Err("the NVIDIA driver found no CUDA device".into());
    }
    let ctx = CudaContext::new(0).map_err(|e| format!("cannot open CUDA device 0: {e:?}"))?;
    // One stream: the launches are ordered already.
    // SAFETY: nothing here uses a second stream.
    unsafe { ctx.disable_event_tracking() };
    let name = ctx.name().unwrap_or_else(|_| "an NVIDIA GPU".into());
    let (major, minor) = ctx.compute_capability().unwrap_or((0, 0));
    Ok((ctx.clone(), format!("{name} (sm_{major}{minor})")))
}

/// The compute capability of the GPU [`device`] opens, as `major · 10 + minor`.
pub fn device_sm() -> Result<u32, String> {
    let (ctx, _) = device()?;
    let (major, minor) = ctx.compute_capability().map_err(|e| format!("compute capability: {e:?}"))?;
    Ok((major * 10 + minor) as u32)
}

/// The tuning database's name for a GPU, from [`device`]'s description
/// ("cuda NVIDIA H200 (sm_90)").
pub fn fingerprint(device: &str) -> String {
    format!("cuda {device}")
}

/// The compute capability at the end of a [`fingerprint`].
pub fn fingerprint_sm(fingerprint: &str) -> Option<u32> {
    fingerprint.strip_suffix(')')?.rsplit_once("(sm_")?.1.parse().ok()
}

/// Each f32 value copied back by [`CudaModel::trace`], as the launches write them.
pub type Traced = Vec<(bitnet_ir::Value, Vec<f32>)>;

/// A weight on the device.
enum DevWeight {
    Packed {
        data: CudaSlice<u8>,
        scale: f32,
    },
    /// Int8 rows (`--head q8`) and their scales.
    Int8 {
        q: CudaSlice<u8>,
        scale: CudaSlice<f32>,
    },
    Bytes(CudaSlice<u8>),
    F32(CudaSlice<f32>),
}

enum DevBuf {
    F32(CudaSlice<f32>),
    I32(CudaSlice<i32>),
    Q8 { q: CudaSlice<i8>, gamma: CudaSlice<f32>, sum: CudaSlice<i32> },
}

struct DevPlan {
    graph: Graph,
    program: Program,
    slot: Vec<usize>,
    kinds: Vec<Kind>,
    bufs: Vec<Option<DevBuf>>,
    /// Elements each buffer holds now (codes for int8 buffers).
    capacity: Vec<usize>,
    /// Rows each buffer holds now (γ and Σq of int8 buffers).
    rows: Vec<usize>,
    /// Int8 activations for the launches that quantize their own input
    /// ([`Arg::Scratch`]), and the codes and rows it holds.
    scratch: Option<DevBuf>,
    scratch_size: (usize, usize),
    /// Bumped whenever a buffer moves: a captured graph holds pointers.
    generation: u64,
}

/// One step's rows: `tokens[i]` at `positions[i]` of the sequence whose KV
/// blocks are `tables[i]` (in position order); the logits of the rows
/// `out_rows`.
#[derive(Clone, Copy, Debug)]
pub struct Step<'a> {
    pub tokens: &'a [i32],
    pub positions: &'a [i32],
    pub out_rows: &'a [i32],
    pub tables: &'a [&'a [u32]],
}

impl Step<'_> {
    /// The sizes of the symbolic dims: rows, and rows whose logits are wanted.
    fn extent(&self) -> Extent {
        Extent::new(self.tokens.len(), self.out_rows.len())
    }
}

/// The KV cache on the device: each layer's key and value blocks, and each
/// row's block table for the step being run.
struct DevKv {
    keys: Vec<CudaSlice<f32>>,
    values: Vec<CudaSlice<f32>>,
    blocks: usize,
    /// `[rows][width]` block ids, `width` = the most blocks a sequence can
    /// hold, so that a captured graph's parameters stay valid.
    tables: CudaSlice<i32>,
    width: usize,
    table_rows: usize,
    /// One-token attention's parts and counters ([`Arg::Splits`]).
    splits: CudaSlice<f32>,
}

pub struct CudaModel {
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    functions: HashMap<String, CudaFunction>,
    weights: HashMap<WeightKey, DevWeight>,
    plan: DevPlan,
    /// `kv_heads · head_dim` of each layer.
    kv_rows: Vec<usize>,
    kv: Option<DevKv>,
    context: usize,
    /// Decode steps (every row's logits wanted) captured as CUDA graphs,
    /// one per number of rows, with the buffers' generation they hold.
    captured: HashMap<usize, (u64, CudaGraph)>,
    pub device: String,
    /// Bytes of weights on the device.
    pub weight_bytes: usize,
    /// Whether decode steps replay a captured CUDA graph (one launch a
    /// step instead of one a kernel); turned off, with the reason in
    /// `graph_error`, if capturing fails.
    pub graphs: bool,
    pub graph_error: Option<String>,
}

/// Decode steps of up to this many rows are captured as CUDA graphs.
const CAPTURED_ROWS: usize = 64;

impl CudaModel {
    /// Uploads the weights of the lowered step graph and loads its module:
    /// `ptx` compiled earlier, or the program's source compiled now with
    /// NVRTC for this device. The KV blocks come with
    /// [`CudaModel::allocate_kv`], once the engine has sized its budget.
    ///
    /// `prepacked` holds ternary weights packed already (from an artifact);
    /// the rest are packed from `weights` as they are uploaded.
    pub fn new(
        weights: &dyn WeightSource,
        prepacked: HashMap<String, PackedTernary>,
        step: (Graph, Program),
        ptx: Option<(String, u32)>,
        context: usize,
    ) -> Result<CudaModel, EvalError> {
        check(&step.0, &step.1)?;
        let (ctx, device) = self::device().map_err(EvalError)?;
        let (major, minor) = driver("compute capability", ctx.compute_capability())?;
        let here = (major * 10 + minor) as u32;
        let ptx = match ptx {
            Some((_, sm)) if sm > here => return err(format!("its PTX is for sm_{sm} and later; {device} is sm_{here}: compile it again with --sm {here}")),
            Some((p, _)) => p,
            None => cuda::nvrtc::compile(&cuda::module_source(&[&step.1]), here).map_err(EvalError)?,
        };
        // A stream of its own: the legacy default stream cannot be captured
        // into a CUDA graph.
        let stream = driver("creating a stream", ctx.new_stream())?;
        let module = driver("loading the PTX", ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)))?;
        let mut functions = HashMap::new();
        for entry in step.1.launches.iter().flat_map(|l| l.entries()) {
            if !functions.contains_key(entry) {
                let f = driver(&format!("kernel {entry}"), module.load_function(entry))?;
                functions.insert(entry.to_string(), f);
            }
        }
        let mut kv_rows: Vec<usize> = Vec::new();
        for (_, node) in step.0.iter() {
            if let Op::Attention { layer, kv_heads, head_dim, .. } = node.op {
                if kv_rows.len() <= layer {
                    kv_rows.resize(layer + 1, 0);
                }
                kv_rows[layer] = kv_heads * head_dim;
            }
        }
        let layouts = layouts(&[(&step.0, &step.1)], weights, &prepacked)?;
        let weight_bytes: usize = layouts.iter().map(|l| l.2).sum();
        if let Ok((free, _)) = ctx.mem_get_info() {
            if weight_bytes > free {
                return err(format!("the model's weights need {:.2} GiB on the GPU and {:.2} GiB are free", gib(weight_bytes), gib(free)));
            }
        }
        let weights = upload(&stream, &layouts, weights, &prepacked)?;
        Ok(CudaModel {
            stream,
            _module: module,
            functions,
            weights,
            plan: DevPlan::new(step),
            kv_rows,
            kv: None,
            context,
            captured: HashMap::new(),
            device,
            weight_bytes,
            graphs: true,
            graph_error: None,
        })
    }

    /// Makes the KV cache on the device: `blocks` blocks of every layer's
    /// keys and values (the engine's budget; its block ids index them).
    pub fn allocate_kv(&mut self, blocks: usize) -> Result<(), EvalError> {
        let positions = 1usize << self.plan.program.block_shift;
        let floats: Vec<usize> = self.kv_rows.iter().map(|r| blocks * positions * r).collect();
        let bytes = 2 * 4 * floats.iter().sum::<usize>();
        if let Ok((free, _)) = self.stream.context().mem_get_info() {
            if bytes > free {
                return err(format!(
                    "a KV cache of {blocks} blocks of {positions} positions needs {:.2} GiB on the GPU beside {:.2} GiB of weights, and {:.2} GiB are free; \
                     a smaller --kv-budget, context (-c) or --parallel shrinks it",
                    gib(bytes),
                    gib(self.weight_bytes),
                    gib(free)
                ));
            }
        }
        let alloc = "allocating the KV cache";
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for &f in &floats {
            keys.push(driver(alloc, self.stream.alloc_zeros::<f32>(f.max(1)))?);
            values.push(driver(alloc, self.stream.alloc_zeros::<f32>(f.max(1)))?);
        }
        let width = self.context.div_ceil(positions).max(1);
        let tables = driver(alloc, self.stream.alloc_zeros::<i32>(width))?;
        let splits = driver(alloc, self.stream.alloc_zeros::<f32>(split_size(&self.plan.graph, &self.plan.program, self.context).max(1)))?;
        self.kv = Some(DevKv { keys, values, blocks, tables, width, table_rows: 1, splits });
        self.captured.clear();
        Ok(())
    }

    /// The device's copy bandwidth in bytes/s (bytes read plus bytes
    /// written), the median of several device-to-device copies of 512 MiB
    /// (less when memory is short): the roofline decode is measured
    /// against. A driver copy, so it needs no NVRTC.
    pub fn copy_bandwidth(&self) -> Result<f64, EvalError> {
        let free = self.stream.context().mem_get_info().map(|m| m.0).unwrap_or(0);
        let bytes = (512usize << 20).min(free / 4).max(16 << 20);
        let a = driver("allocating", self.stream.alloc_zeros::<u8>(bytes))?;
        let mut b = driver("allocating", self.stream.alloc_zeros::<u8>(bytes))?;
        let mut times = Vec::new();
        for i in 0..8 {
            let t0 = std::time::Instant::now();
            driver("copying", self.stream.memcpy_dtod(&a, &mut b))?;
            driver("copying", self.stream.synchronize())?;
            if i > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        times.sort_by(|x, y| x.total_cmp(y));
        Ok(2.0 * bytes as f64 / times[times.len() / 2])
    }

    pub fn program(&self) -> &Program {
        &self.plan.program
    }

    /// The kernel launches a step of `rows` tokens makes.
    pub fn launches_for(&self, rows: usize) -> usize {
        self.plan.program.launches_for(rows)
    }

    pub fn graph(&self) -> &Graph {
        &self.plan.graph
    }

    /// Evaluates one step; returns the logits of its `out_rows`, row-major.
    pub fn eval(&mut self, step: &Step) -> Result<Vec<f32>, EvalError> {
        self.run(step, None)
    }

    /// Evaluates as [`CudaModel::eval`] does and also copies back every
    /// f32 value as soon as its node has run (before its buffer is reused),
    /// to find the first kernel that disagrees with the interpreter.
    pub fn trace(&mut self, step: &Step) -> Result<(Vec<f32>, Traced), EvalError> {
        let mut values = Vec::new();
        let logits = self.run(step, Some(&mut values))?;
        Ok((logits, values))
    }

    /// Checks a step's rows and uploads them: ids, positions, the rows
    /// asked for and each row's block table.
    fn upload_step(&mut self, step: &Step) -> Result<(), EvalError> {
        let rows = step.tokens.len();
        if rows == 0 || step.positions.len() != rows || step.tables.len() != rows {
            return err(format!(
                "{rows} tokens at {} positions with {} block tables: need one of each per row, and a row",
                step.positions.len(),
                step.tables.len()
            ));
        }
        // The kernels index without checking; say here what is out of range.
        for (_, node) in self.plan.graph.iter().filter(|(_, n)| n.op == Op::Embed) {
            let vocab = self.plan.graph.ty(node.args[0]).shape[0].resolve(Extent::FIXED);
            if let Some(&bad) = step.tokens.iter().find(|&&t| t < 0 || t as usize >= vocab) {
                return err(format!("token id {bad} is outside the vocabulary of {vocab}"));
            }
        }
        if step.out_rows.len() > rows {
            return err(format!("{} rows asked for of {rows}", step.out_rows.len()));
        }
        if let Some(&r) = step.out_rows.iter().find(|&&r| r < 0 || r as usize >= rows) {
            return err(format!("out row {r} of {rows}"));
        }
        let Some(kv) = &mut self.kv else { return err("the KV cache is not on the device yet (CudaModel::allocate_kv)") };
        let shift = self.plan.program.block_shift;
        for (i, (&p, table)) in step.positions.iter().zip(step.tables).enumerate() {
            if p < 0 || p as usize >= self.context {
                return err(format!("position {p} is outside the context of {}", self.context));
            }
            if table.len() > kv.width || (p as usize >> shift) >= table.len() || table.iter().any(|&b| b as usize >= kv.blocks) {
                return err(format!("row {i}: position {p} with a block table of {} blocks (of {} on the device)", table.len(), kv.blocks));
            }
        }
        let flat = flat_tables(step.tables, kv.width);
        let alloc = "allocating block tables";
        if kv.table_rows < rows {
            kv.tables = driver(alloc, self.stream.alloc_zeros::<i32>(rows * kv.width))?;
            kv.table_rows = rows;
            self.plan.generation += 1;
        }
        driver("uploading block tables", self.stream.memcpy_htod(&flat, &mut kv.tables.slice_mut(..flat.len())))?;
        self.plan.reserve(&self.stream, rows)?;
        let plan = &mut self.plan;
        for (v, node) in plan.graph.iter() {
            if let Op::Input { name } = &node.op {
                let data = match name.as_str() {
                    "tokens" => step.tokens,
                    "positions" => step.positions,
                    "out_rows" => step.out_rows,
                    _ => return err(format!("input \"{name}\" was not given")),
                };
                let Some(DevBuf::I32(buf)) = &mut plan.bufs[plan.slot[v.index()]] else { return err("an i32 input has no i32 buffer") };
                driver("uploading inputs", self.stream.memcpy_htod(data, &mut buf.slice_mut(..data.len())))?;
            }
        }
        Ok(())
    }

    fn run(&mut self, step: &Step, mut trace: Option<&mut Traced>) -> Result<Vec<f32>, EvalError> {
        self.upload_step(step)?;
        let e = step.extent();
        let o = *self.plan.graph.outputs.last().expect("verified graphs have outputs");
        let decode = e.seq == e.out && e.seq <= CAPTURED_ROWS;
        if trace.is_none() && decode && self.graphs && self.replay(e)? {
            return self.download(o, e)?.ok_or_else(|| EvalError("the graph's output is not f32".into()));
        }
        let launches = self.plan.program.launches.clone();
        for l in &launches {
            if !self.launch(l, e)? {
                continue;
            }
            if let Some(values) = trace.as_deref_mut() {
                for v in l.writes() {
                    if let Some(x) = self.download(v, e)? {
                        values.push((v, x));
                    }
                }
            }
        }
        self.download(o, e)?.ok_or_else(|| EvalError("the graph's output is not f32".into()))
    }

    /// Evaluates as [`CudaModel::eval`] does (kernel by kernel, no graph)
    /// and times each launch with CUDA events: milliseconds and launches
    /// per kernel family, slowest first. For finding what to speed up.
    pub fn profile(&mut self, step: &Step) -> Result<KernelTimes, EvalError> {
        let ctx = self.stream.context().clone();
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let (graphs, mut by_family) = (std::mem::replace(&mut self.graphs, false), KernelTimes::default());
        // The first run sizes the buffers and uploads the inputs; the second is timed.
        let first = self.run(step, None);
        self.graphs = graphs;
        first?;
        let launches = self.plan.program.launches.clone();
        for l in &launches {
            let (start, end) = (driver("an event", ctx.new_event(timing))?, driver("an event", ctx.new_event(timing))?);
            driver("recording an event", start.record(&self.stream))?;
            if !self.launch(l, step.extent())? {
                continue;
            }
            driver("recording an event", end.record(&self.stream))?;
            let ms = driver("timing a kernel", start.elapsed_ms(&end))? as f64;
            by_family.add(l.entry.rsplit_once('_').map_or(l.entry.as_str(), |(f, _)| f), ms);
        }
        by_family.0.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(by_family)
    }

    /// Runs a decode step of `e.seq` rows as a CUDA graph, capturing it
    /// first if there is none for that many rows or the buffers moved since.
    /// `false` (and graphs off) if capturing failed: the caller then
    /// launches each kernel itself.
    fn replay(&mut self, e: Extent) -> Result<bool, EvalError> {
        let generation = self.plan.generation;
        if let Some((g_at, g)) = self.captured.get(&e.seq) {
            if *g_at == generation {
                driver("replaying a decode graph", g.launch())?;
                return Ok(true);
            }
        }
        let launches = self.plan.program.launches.clone();
        let mode = cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        if let Err(err) = self.stream.begin_capture(mode) {
            self.graphs = false;
            self.graph_error = Some(format!("starting a CUDA graph capture failed ({err:?}); launching each kernel instead"));
            return Ok(false);
        }
        let recorded = launches.iter().try_for_each(|l| self.launch(l, e).map(|_| ()));
        let captured = self.stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        match (recorded, captured) {
            (Ok(()), Ok(Some(g))) => {
                driver("replaying a decode graph", g.launch())?;
                self.captured.insert(e.seq, (generation, g));
                Ok(true)
            }
            (recorded, captured) => {
                let why = match (recorded, captured) {
                    (Err(e), _) => e.0,
                    (_, Err(e)) => format!("{e:?}"),
                    _ => "the capture was empty".into(),
                };
                self.graphs = false;
                self.graph_error = Some(format!("capturing a decode step as a CUDA graph failed ({why}); launching each kernel instead"));
                Ok(false)
            }
        }
    }

    /// The f32 value `v` as it is now on the device.
    fn download(&self, v: bitnet_ir::Value, e: Extent) -> Result<Option<Vec<f32>>, EvalError> {
        let plan = &self.plan;
        let len: usize = plan.graph.ty(v).resolve(e).iter().product();
        let Some(DevBuf::F32(buf)) = &plan.bufs[plan.slot[v.index()]] else { return Ok(None) };
        let mut out = vec![0f32; len];
        driver("copying a result back", self.stream.memcpy_dtoh(&buf.slice(..len), &mut out))?;
        Ok(Some(out))
    }

    /// Launches `l` for a step of extent `e`; `false` where the step has
    /// no work for it.
    fn launch(&self, l: &Launch, e: Extent) -> Result<bool, EvalError> {
        let Some(Geometry { entry, grid, block }) = geometry(l, &self.plan.graph, e, self.context) else { return Ok(false) };
        let params = params(&self.plan.graph, l, e, self)?;
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        let Some(f) = self.functions.get(entry) else { return err(format!("kernel {entry} is not in the module")) };
        let mut b = self.stream.launch_builder(f);
        for p in &params {
            match p {
                Param::Ptr(x) => b.arg(x),
                Param::F32(x) => b.arg(x),
                Param::I32(x) => b.arg(x),
            };
        }
        // SAFETY: the arguments follow the kernel's parameter list (the
        // launch's `args`, written with it by the lowering), every buffer
        // holds the rows of the step (`DevPlan::reserve`), and every block
        // table entry names a block of the pool (`upload_step`).
        driver(&format!("launching {entry}"), unsafe { b.launch(cfg) })?;
        Ok(true)
    }
}

/// Where the parameters of a launch point: an executor's buffers, by
/// what the lowering binds them to ([`Arg`]). The GPU's are device
/// addresses; the tests' emulated executor's are host ones.
pub(crate) trait Memory {
    /// A value's buffer: one pointer, or three (codes, γ, Σq) for int8
    /// activations; a weight's data.
    fn value(&self, v: bitnet_ir::Value) -> Result<Vec<u64>, EvalError>;
    /// β of the packed ternary weight `name`.
    fn beta(&self, name: &str) -> Result<f32, EvalError>;
    /// The int8 rows of the float weight `name`: codes and scales.
    fn int8_rows(&self, name: &str) -> Result<[u64; 2], EvalError>;
    /// Layer `layer`'s key (or, with `values`, value) blocks.
    fn cache(&self, layer: usize, values: bool) -> Result<u64, EvalError>;
    /// The int8 activations of launches that quantize their own input.
    fn scratch(&self) -> Result<[u64; 3], EvalError>;
    /// The block tables, their width and the blocks in the pool.
    fn tables(&self) -> Result<(u64, usize, usize), EvalError>;
    /// The buffer of one-token attention split over blocks, its counters
    /// zero ([`split_size`] floats).
    fn splits(&self) -> Result<u64, EvalError>;
}

/// The parameters of launch `l` for a step of extent `e`, in the kernel's
/// order (its `args`, written with it by the lowering).
pub(crate) fn params(g: &Graph, l: &Launch, e: Extent, mem: &dyn Memory) -> Result<Vec<Param>, EvalError> {
    let node = g.node(l.value);
    let rows_of = |v: bitnet_ir::Value| g.ty(v).resolve(e).first().copied().unwrap_or(1);
    let weight = |i: usize, what: &str| match &g.node(node.args[i]).op {
        Op::Weight { name } => Ok(name.clone()),
        _ => err(format!("{what} of a computed value")),
    };
    let ptrs = |p: &[u64]| p.iter().map(|&p| Param::Ptr(p)).collect::<Vec<_>>();
    let mut out = Vec::new();
    for a in &l.args {
        match *a {
            Arg::Operand(i) => out.extend(ptrs(&mem.value(node.args[i])?)),
            Arg::OperandOf(i, j) => out.extend(ptrs(&mem.value(g.node(node.args[i]).args[j])?)),
            Arg::Output => out.extend(ptrs(&mem.value(l.value)?)),
            Arg::ResultOf(v) => out.extend(ptrs(&mem.value(v)?)),
            Arg::Beta(i) => out.push(Param::F32(mem.beta(&weight(i, "β")?)?)),
            Arg::KeyCache(layer) => out.push(Param::Ptr(mem.cache(layer, false)?)),
            Arg::ValueCache(layer) => out.push(Param::Ptr(mem.cache(layer, true)?)),
            Arg::Scratch => out.extend(ptrs(&mem.scratch()?)),
            Arg::Splits => out.push(Param::Ptr(mem.splits()?)),
            Arg::Int8Rows(i) => out.extend(ptrs(&mem.int8_rows(&weight(i, "int8 rows")?)?)),
            Arg::BlockTables => {
                let (tables, width, blocks) = mem.tables()?;
                out.push(Param::Ptr(tables));
                for n in [width, blocks] {
                    out.push(Param::I32(i32::try_from(n).map_err(|_| EvalError(format!("{n} KV blocks do not fit the kernels' 32-bit indices")))?));
                }
            }
            Arg::Rows(i) => out.push(Param::I32(rows_of(i.map_or(l.value, |i| node.args[i])) as i32)),
        }
    }
    Ok(out)
}

impl Memory for CudaModel {
    fn value(&self, v: bitnet_ir::Value) -> Result<Vec<u64>, EvalError> {
        let plan = &self.plan;
        if let Op::Weight { name } = &plan.graph.node(v).op {
            let Some(w) = self.weights.get(&WeightKey::new(name, Form::Own)) else { return err(format!("weight {name} is not on the device")) };
            return Ok(vec![match w {
                DevWeight::Packed { data, .. } | DevWeight::Bytes(data) | DevWeight::Int8 { q: data, .. } => ptr(data, &self.stream),
                DevWeight::F32(data) => ptr(data, &self.stream),
            }]);
        }
        match &plan.bufs[plan.slot[v.index()]] {
            Some(DevBuf::F32(b)) => Ok(vec![ptr(b, &self.stream)]),
            Some(DevBuf::I32(b)) => Ok(vec![ptr(b, &self.stream)]),
            Some(DevBuf::Q8 { q, gamma, sum }) => Ok(vec![ptr(q, &self.stream), ptr(gamma, &self.stream), ptr(sum, &self.stream)]),
            None => err(format!("{v} has no buffer")),
        }
    }

    fn beta(&self, name: &str) -> Result<f32, EvalError> {
        match self.weights.get(&WeightKey::new(name, Form::Own)) {
            Some(DevWeight::Packed { scale, .. }) => Ok(*scale),
            _ => err(format!("{name} is not a packed ternary weight")),
        }
    }

    fn int8_rows(&self, name: &str) -> Result<[u64; 2], EvalError> {
        match self.weights.get(&WeightKey::new(name, Form::Int8)) {
            Some(DevWeight::Int8 { q, scale }) => Ok([ptr(q, &self.stream), ptr(scale, &self.stream)]),
            _ => err(format!("{name} has no int8 rows on the device")),
        }
    }

    fn cache(&self, layer: usize, values: bool) -> Result<u64, EvalError> {
        let Some(kv) = &self.kv else { return err("the KV cache is not on the device yet") };
        match (if values { &kv.values } else { &kv.keys }).get(layer) {
            Some(c) => Ok(ptr(c, &self.stream)),
            None => err(format!("no KV cache for layer {layer}")),
        }
    }

    fn scratch(&self) -> Result<[u64; 3], EvalError> {
        match &self.plan.scratch {
            Some(DevBuf::Q8 { q, gamma, sum }) => Ok([ptr(q, &self.stream), ptr(gamma, &self.stream), ptr(sum, &self.stream)]),
            _ => err("no int8 scratch buffer"),
        }
    }

    fn tables(&self) -> Result<(u64, usize, usize), EvalError> {
        let Some(kv) = &self.kv else { return err("the KV cache is not on the device yet") };
        Ok((ptr(&kv.tables, &self.stream), kv.width, kv.blocks))
    }

    fn splits(&self) -> Result<u64, EvalError> {
        let Some(kv) = &self.kv else { return err("the KV cache is not on the device yet") };
        Ok(ptr(&kv.splits, &self.stream))
    }
}

pub(crate) fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p
}

fn gib(b: usize) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Each value's buffer and each buffer's kind for running `program`: the
/// CPU's plan, with the reads of fused launches, and inputs in buffers of
/// their own (they are uploaded before the first launch, and outside a
/// captured graph). A launch that writes values of later nodes (a product
/// writing its slices) keeps what it reads until the last of them, so
/// that none of them takes a buffer it reads.
pub(crate) fn slots(graph: &Graph, program: &Program) -> (Vec<usize>, Vec<Kind>) {
    let mut extra = Vec::new();
    for l in &program.launches {
        let node = graph.node(l.value);
        let until = l.writes().chain([l.value]).max_by_key(|v| v.index()).unwrap_or(l.value);
        for a in &l.args {
            match *a {
                Arg::OperandOf(i, j) => extra.push((graph.node(node.args[i]).args[j], until)),
                Arg::Operand(i) if until != l.value => extra.push((node.args[i], until)),
                _ => {}
            }
        }
    }
    let (mut slot, mut kinds) = assign_slots(graph, &extra);
    for (v, node) in graph.iter() {
        let s = slot[v.index()];
        if matches!(node.op, Op::Input { .. }) && slot.iter().enumerate().any(|(i, &o)| o == s && i != v.index()) {
            kinds.push(kinds[s]);
            slot[v.index()] = kinds.len() - 1;
        }
    }
    (slot, kinds)
}

/// What each buffer of the plan `slot`/`kinds` holds at most in a step of
/// extent `e`: elements (codes for int8 activations) and rows.
pub(crate) fn buffer_sizes(graph: &Graph, slot: &[usize], kinds: &[Kind], e: Extent) -> (Vec<usize>, Vec<usize>) {
    let mut need = vec![0usize; kinds.len()];
    let mut need_rows = vec![0usize; kinds.len()];
    for (v, node) in graph.iter() {
        let s = slot[v.index()];
        if s == NO_SLOT {
            continue;
        }
        let shape = node.ty.resolve(e);
        let rows = if shape.len() >= 2 { shape[0] } else { 1 };
        let elems = match kinds[s] {
            Kind::Q8 => rows * cuda::padded(*shape.last().unwrap_or(&1)),
            _ => shape.iter().product(),
        };
        need[s] = need[s].max(elems);
        need_rows[s] = need_rows[s].max(rows);
    }
    (need, need_rows)
}

/// The codes and rows of the int8 activations of launches that quantize
/// their own input ([`Arg::Scratch`]), in a step of extent `e`.
pub(crate) fn scratch_size(graph: &Graph, program: &Program, e: Extent) -> (usize, usize) {
    let mut scratch = (0usize, 0usize);
    for l in program.launches.iter().filter(|l| l.args.contains(&Arg::Scratch)) {
        let Some(&x) = graph.nodes.get(l.value.index()).and_then(|n| n.args.first()) else { continue };
        let shape = graph.ty(x).resolve(e);
        let rows = if shape.len() >= 2 { shape[0] } else { 1 };
        scratch = (scratch.0.max(rows * cuda::padded(*shape.last().unwrap_or(&1))), scratch.1.max(rows));
    }
    scratch
}

/// The floats of the buffer the one-token attention launches of
/// `program` share ([`Arg::Splits`]), in a context of `context` positions.
pub(crate) fn split_size(graph: &Graph, program: &Program, context: usize) -> usize {
    let mut most = 0;
    for l in program.launches.iter().filter(|l| l.args.contains(&Arg::Splits)) {
        if let (Op::Attention { heads, head_dim, .. }, Some(Grid::HeadsBySplits { split, .. })) =
            (&graph.node(l.value).op, l.one_token.as_ref().map(|v| v.grid))
        {
            most = most.max(cuda::kernels::split_floats(*heads, *head_dim, split.blocks_for(context)));
        }
    }
    most
}

/// Each row's block table side by side, `width` entries a row (zeros past
/// a table's end).
pub(crate) fn flat_tables(tables: &[&[u32]], width: usize) -> Vec<i32> {
    let mut flat = vec![0i32; tables.len() * width];
    for (row, table) in flat.chunks_exact_mut(width.max(1)).zip(tables) {
        row.iter_mut().zip(*table).for_each(|(o, &b)| *o = b as i32);
    }
    flat
}

/// How launch `l` runs a step of extent `e` in a KV cache of `context`
/// positions: its kernel, grid and block; `None` where the step has no
/// work for it. No kernel takes dynamic shared memory.
pub(crate) fn geometry<'a>(l: &'a Launch, g: &Graph, e: Extent, context: usize) -> Option<Geometry<'a>> {
    let rows = g.ty(l.value).resolve(e).first().copied().unwrap_or(1);
    let (entry, grid, block) = l.for_rows(rows)?;
    let grid = grid.dims(rows, block, context);
    (grid.0 > 0 && grid.1 > 0).then_some(Geometry { entry, grid, block })
}

/// A launch's kernel, its blocks and threads a block.
pub(crate) struct Geometry<'a> {
    pub entry: &'a str,
    pub grid: (u32, u32, u32),
    pub block: u32,
}

impl DevPlan {
    fn new((graph, program): (Graph, Program)) -> DevPlan {
        let (slot, kinds) = slots(&graph, &program);
        let n = kinds.len();
        DevPlan {
            graph,
            program,
            slot,
            kinds,
            bufs: (0..n).map(|_| None).collect(),
            capacity: vec![0; n],
            rows: vec![0; n],
            scratch: None,
            scratch_size: (0, 0),
            generation: 0,
        }
    }

    /// Grows the buffers to what `seq` tokens need.
    fn reserve(&mut self, stream: &Arc<CudaStream>, seq: usize) -> Result<(), EvalError> {
        let e = Extent::new(seq, seq);
        let (need, need_rows) = buffer_sizes(&self.graph, &self.slot, &self.kinds, e);
        let scratch = scratch_size(&self.graph, &self.program, e);
        if scratch.0 > self.scratch_size.0 || scratch.1 > self.scratch_size.1 {
            let alloc = "allocating int8 activations";
            self.scratch = Some(DevBuf::Q8 {
                q: driver(alloc, stream.alloc_zeros(scratch.0.max(1)))?,
                gamma: driver(alloc, stream.alloc_zeros(scratch.1.max(1)))?,
                sum: driver(alloc, stream.alloc_zeros(scratch.1.max(1)))?,
            });
            self.scratch_size = scratch;
            self.generation += 1;
        }
        for s in 0..self.kinds.len() {
            if need[s] <= self.capacity[s] && need_rows[s] <= self.rows[s] && self.bufs[s].is_some() {
                continue;
            }
            let (e, r) = (need[s].max(1), need_rows[s].max(1));
            let alloc = "allocating activations";
            self.bufs[s] = Some(match self.kinds[s] {
                Kind::F32 => DevBuf::F32(driver(alloc, stream.alloc_zeros(e))?),
                Kind::I32 => DevBuf::I32(driver(alloc, stream.alloc_zeros(e))?),
                Kind::Q8 => DevBuf::Q8 {
                    q: driver(alloc, stream.alloc_zeros(e))?,
                    gamma: driver(alloc, stream.alloc_zeros(r))?,
                    sum: driver(alloc, stream.alloc_zeros(r))?,
                },
            });
            self.capacity[s] = e;
            self.rows[s] = r;
            self.generation += 1;
        }
        Ok(())
    }
}

/// How a weight is laid out on the device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Layout {
    /// Packed ternary, one row per tile (`crate::cpu::ternary`'s layout).
    Packed,
    /// f16 or bf16, as stored.
    Stored,
    /// Expanded to f32.
    F32,
    /// Quantized to int8 rows with a scale each (`--head q8`).
    Int8,
}

/// That every launch's arguments exist in its graph: the executor
/// indexes operands by them (a damaged artifact must not crash it).
fn check(g: &Graph, p: &Program) -> Result<(), EvalError> {
    if 1usize.checked_shl(p.block_shift) != Some(crate::kv::BLOCK_POSITIONS) {
        return err(format!("the kernels read KV blocks of 2^{} positions; this runtime's blocks hold {}", p.block_shift, crate::kv::BLOCK_POSITIONS));
    }
    for l in &p.launches {
        let Some(node) = g.nodes.get(l.value.index()) else { return err(format!("a launch names {}, which the graph does not have", l.value)) };
        let operand_ok = |i: usize| i < node.args.len();
        let ok = [l.block].into_iter().chain(l.one_token.as_ref().map(|v| v.block)).all(|b| b > 0 && b <= 1024)
            && l.args.iter().all(|a| match *a {
                Arg::Operand(i) | Arg::Beta(i) | Arg::Int8Rows(i) | Arg::Rows(Some(i)) => operand_ok(i),
                Arg::OperandOf(i, j) => operand_ok(i) && g.nodes.get(node.args[i].index()).is_some_and(|n| j < n.args.len()),
                Arg::ResultOf(v) => g.nodes.get(v.index()).is_some_and(|n| !n.op.is_leaf()),
                Arg::KeyCache(_) | Arg::ValueCache(_) | Arg::BlockTables | Arg::Scratch | Arg::Splits | Arg::Output | Arg::Rows(None) => true,
            });
        if !ok {
            return err(format!("the launch of {} for {} does not fit its node", l.entry, l.value));
        }
        for a in &l.args {
            if let Arg::Beta(i) | Arg::Int8Rows(i) = a {
                if !matches!(g.node(node.args[*i]).op, Op::Weight { .. }) {
                    return err(format!("{}: the scales of a computed value", l.value));
                }
            }
        }
    }
    Ok(())
}

/// Each weight the graphs read, its layout and its bytes on the device.
pub(crate) fn layouts(
    programs: &[(&Graph, &Program)],
    weights: &dyn WeightSource,
    prepacked: &HashMap<String, PackedTernary>,
) -> Result<Vec<(WeightKey, Layout, usize)>, EvalError> {
    let mut out: Vec<(WeightKey, Layout, usize)> = Vec::new();
    for (g, p) in programs {
        let int8 = cuda::int8_reads(p);
        for (v, node) in g.iter() {
            for (i, a) in node.args.iter().enumerate() {
                let Op::Weight { name } = &g.node(*a).op else { continue };
                if int8.contains(&(v, i)) {
                    // A copy of its own: a tied head's table is also read as stored.
                    let key = WeightKey::new(name, Form::Int8);
                    if !out.iter().any(|w| w.0 == key) {
                        let Some(view) = weights.weight(name) else { return err(format!("missing tensor {name}")) };
                        out.push((key, Layout::Int8, view.rows() * (cuda::padded(view.row_len()) + 4)));
                    }
                    continue;
                }
                let want = match (&node.op, i) {
                    _ if node.op.reads_packed(i) => Some(Layout::Packed),
                    (Op::MatMul, 1) | (Op::Embed, 0) => None,
                    _ => Some(Layout::F32),
                };
                let own = WeightKey::new(name, Form::Own);
                if let Some(seen) = out.iter().find(|w| w.0 == own) {
                    if want.is_some_and(|l| l != seen.1) || (want.is_none() && seen.1 == Layout::Packed) {
                        return err(format!("tensor {name} is read by kernels that want different layouts"));
                    }
                    continue;
                }
                if let (true, Some(p)) = (node.op.reads_packed(i), prepacked.get(name)) {
                    let dims = g.node(*a).ty.resolve(Extent::FIXED);
                    if p.rows != 1 || dims != [p.n, p.k] {
                        return err(format!("packed weight {name} is not the graph's {} in one-row tiles", g.node(*a).ty));
                    }
                    out.push((own, Layout::Packed, p.bytes()));
                    continue;
                }
                let Some(view) = weights.weight(name) else { return err(format!("missing tensor {name}")) };
                let elems = view.elems();
                let layout = match (&node.op, i) {
                    _ if node.op.reads_packed(i) => Layout::Packed,
                    (Op::MatMul, 1) | (Op::Embed, 0) if device_float_type(view.dtype) != FloatType::F32 => Layout::Stored,
                    (Op::MatMul, 1) | (Op::Embed, 0) => Layout::F32,
                    _ if view.dtype.is_float() => Layout::F32,
                    _ => return err(format!("{name}: a {} tensor cannot be an operand of {} on the GPU", view.dtype, node.op.mnemonic())),
                };
                let bytes = match layout {
                    Layout::Packed => view.rows() * cuda::padded(view.row_len()) / 4,
                    Layout::Stored => elems * 2,
                    Layout::F32 | Layout::Int8 => elems * 4,
                };
                out.push((own, layout, bytes));
            }
        }
    }
    Ok(out)
}

/// A weight in the layout its kernels read, still on the host.
pub(crate) enum HostWeight<'a> {
    Packed { data: std::borrow::Cow<'a, [u8]>, scale: f32 },
    Int8(Int8Rows),
    Bytes(&'a [u8]),
    F32(Vec<f32>),
}

/// Weight `name` in `layout`: packed ternary from `prepacked` or packed
/// now (dropping the mapped source pages), int8 rows, as stored, or f32.
pub(crate) fn host_weight<'a>(
    name: &str,
    layout: Layout,
    weights: &'a dyn WeightSource,
    prepacked: &'a HashMap<String, PackedTernary>,
) -> Result<HostWeight<'a>, EvalError> {
    if let (Layout::Packed, Some(p)) = (layout, prepacked.get(name)) {
        return Ok(HostWeight::Packed { data: p.data().as_bytes().into(), scale: p.scale });
    }
    let Some(view) = weights.weight(name) else { return err(format!("missing tensor {name}")) };
    Ok(match layout {
        // The same rows the CPU's `--head q8` reads.
        Layout::Int8 => HostWeight::Int8(Int8Rows::quantize(&view)),
        Layout::Packed => {
            let p = PackedTernary::from_weight(&view, 1).map_err(|e| EvalError(format!("{name}: {e}")))?;
            weights.release(name);
            HostWeight::Packed { data: p.data().as_bytes().to_vec().into(), scale: p.scale }
        }
        Layout::Stored => HostWeight::Bytes(view.data),
        Layout::F32 => HostWeight::F32(view.to_f32()),
    })
}

/// Puts each weight on the device once, in its layout; drops the mapped
/// source pages of each ternary weight once it is packed.
fn upload(
    stream: &Arc<CudaStream>,
    layouts: &[(WeightKey, Layout, usize)],
    weights: &dyn WeightSource,
    prepacked: &HashMap<String, PackedTernary>,
) -> Result<HashMap<WeightKey, DevWeight>, EvalError> {
    let mut out = HashMap::new();
    let up = "uploading weights";
    for (key, layout, _) in layouts {
        let w = match host_weight(&key.name, *layout, weights, prepacked)? {
            HostWeight::Packed { data, scale } => DevWeight::Packed { data: driver(up, stream.clone_htod(&data[..]))?, scale },
            HostWeight::Int8(rows) => {
                DevWeight::Int8 { q: driver(up, stream.clone_htod(rows.q.as_bytes()))?, scale: driver(up, stream.clone_htod(&rows.scale[..]))? }
            }
            HostWeight::Bytes(b) => DevWeight::Bytes(driver(up, stream.clone_htod(b))?),
            HostWeight::F32(v) => DevWeight::F32(driver(up, stream.clone_htod(&v))?),
        };
        out.insert(key.clone(), w);
    }
    Ok(out)
}

#[cfg(test)]
mod emulated;

#[cfg(test)]
mod tests {
    //! The host side of the executor, which needs no GPU: launch checks,
    //! weight layouts and the buffer plan, on a small synthetic model.
    use super::*;
    use bitnet_codegen::schedule::HeadQuant;
    use bitnet_frontends::arch::Activation;
    use bitnet_frontends::model::Model;
    use bitnet_frontends::synth::{self, SynthShape, SynthSpec};
    use bitnet_ir::DType;

    pub(super) fn model(weight_type: DType) -> (Model, std::path::PathBuf) {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("bitnet-cuda-host-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.gguf");
        let spec = SynthSpec {
            shape: SynthShape { hidden: 256, layers: 2, heads: 4, kv_heads: 2, ffn: 512, vocab: 100 },
            weight_type,
            head_type: DType::F16,
            activation: Activation::Relu2,
            seed: 3,
            context: 64,
            rope_theta: 10000.0,
        };
        synth::write(&spec, None, &path, |_, _| {}).unwrap();
        (Model::open(&path).unwrap(), dir)
    }

    #[test]
    fn launches_are_checked_against_their_graph() {
        let (m, dir) = model(DType::TQ2_0);
        let (g, p) = crate::lowering::lower_cuda(&m.step_graph().unwrap(), 80, None, HeadQuant::Stored).unwrap();
        check(&g, &p).unwrap();
        let mut bad = p.clone();
        let l = bad.launches.iter_mut().find(|l| l.args.contains(&Arg::Operand(1))).unwrap();
        l.args.push(Arg::Operand(7));
        assert!(check(&g, &bad).unwrap_err().0.contains("does not fit its node"));
        let mut bad = p.clone();
        bad.launches[0].value = bitnet_ir::Value(100_000);
        assert!(check(&g, &bad).is_err());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn weights_get_one_layout_each_with_its_device_bytes() {
        for dtype in [DType::I2S, DType::TQ2_0, DType::TQ1_0] {
            let (m, dir) = model(dtype);
            let (step, p) = crate::lowering::lower_cuda(&m.step_graph().unwrap(), 80, None, HeadQuant::Stored).unwrap();
            let list = layouts(&[(&step, &p)], &m, &HashMap::new()).unwrap();
            let get = |name: &str| list.iter().find(|w| w.0 == WeightKey::new(name, Form::Own)).unwrap_or_else(|| panic!("{name} missing"));
            // A ternary matrix: rows of 128 codes in 32 bytes; the f16 table as stored.
            assert_eq!(get("blk.0.ffn_down.weight").1, Layout::Packed);
            assert_eq!(get("blk.0.ffn_down.weight").2, 256 * 512 / 4);
            assert_eq!(get("token_embd.weight").1, Layout::Stored);
            assert_eq!(get("token_embd.weight").2, m.config.vocab * 256 * 2);
            assert_eq!(get("blk.1.attn_norm.weight").1, Layout::F32);
            assert_eq!(list.iter().filter(|w| w.0.name == "token_embd.weight").count(), 1);
            std::fs::remove_dir_all(dir).ok();
        }
    }

    #[test]
    fn inputs_have_buffers_of_their_own() {
        let (m, dir) = model(DType::I2S);
        let plan = DevPlan::new(crate::lowering::lower_cuda(&m.step_graph().unwrap(), 80, None, HeadQuant::Stored).unwrap());
        let inputs: Vec<_> = plan.graph.iter().filter(|(_, n)| matches!(n.op, Op::Input { .. })).map(|(v, _)| v).collect();
        assert_eq!(inputs.len(), 3, "tokens, positions, out_rows");
        for v in inputs {
            let s = plan.slot[v.index()];
            assert_eq!(plan.slot.iter().filter(|&&o| o == s).count(), 1, "{v} shares its buffer");
        }
        std::fs::remove_dir_all(dir).ok();
    }

    /// That `p`'s module compiles for sm_80 with every kernel in it, where
    /// NVRTC is (CI has it and sets `BITNET_REQUIRE_NVRTC`).
    fn compiles(p: &Program, what: &str) {
        match cuda::nvrtc::library() {
            Ok(_) => {
                let ptx = cuda::nvrtc::compile(&cuda::module_source(&[p]), 80).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert!(p.kernels.iter().all(|k| ptx.contains(&format!(".entry {}", k.name))), "{what}: a kernel is missing from the PTX");
            }
            Err(e) if std::env::var_os("BITNET_REQUIRE_NVRTC").is_some() => panic!("BITNET_REQUIRE_NVRTC is set but {e}"),
            Err(e) => eprintln!("{what} not compiled: {e}"),
        }
    }

    /// The step graph (a ragged batch: rows of several sequences, the
    /// logits of the rows asked for) on the paged cache: every kv_store
    /// and attention reads the block tables, select_rows picks the wanted
    /// rows, and the module compiles (where NVRTC is; CI has it).
    #[test]
    fn the_ragged_step_lowers_for_the_paged_cache() {
        let (m, dir) = model(DType::I2S);
        let (g, p) = crate::lowering::lower_cuda(&m.step_graph().unwrap(), 80, None, HeadQuant::Stored).unwrap();
        let count = |family: &str| p.launches.iter().filter(|l| l.entry.starts_with(family)).count();
        let layers = m.config.layers;
        // RoPE of the queries and keys goes into the store's launch: no RoPE of its own.
        let fused = count("rope_kv_store_");
        assert_eq!((fused, count("rope_") - fused, count("attention_"), count("select_rows_"), count("last_row_")), (layers, 0, layers, 1, 0));
        for l in p.launches.iter().filter(|l| l.entry.starts_with("rope_kv_store_") || l.entry.starts_with("attention_")) {
            assert!(l.args.contains(&Arg::BlockTables), "{}", l.entry);
        }
        check(&g, &p).unwrap();
        let mut other = p.clone();
        other.block_shift += 1;
        assert!(check(&g, &other).unwrap_err().0.contains("KV blocks"));
        compiles(&p, "the step's module");
        std::fs::remove_dir_all(dir).ok();
    }

    /// `--head q8` on the GPU: the head's activations are quantized by a
    /// launch of their own, the product reads int8 rows that are a copy of
    /// their own (the tied embedding table is still read as stored), and
    /// the module compiles. The head's bytes: int8 codes and a scale a row.
    #[test]
    fn an_int8_head_reads_rows_of_its_own() {
        let (m, dir) = model(DType::TQ2_0);
        let (g, p) = crate::lowering::lower_cuda(&m.step_graph().unwrap(), 80, None, HeadQuant::Q8).unwrap();
        check(&g, &p).unwrap();
        let head = *g.outputs.last().unwrap();
        let launches: Vec<&Launch> = p.launches.iter().filter(|l| l.value == head).collect();
        assert_eq!(launches.len(), 2, "quantize, then the int8 product");
        assert!(launches[0].entry.starts_with("quantize_act_") && launches[0].args.contains(&Arg::Scratch));
        assert!(launches[1].entry.starts_with("int8_matmul_") && launches[1].args.contains(&Arg::Int8Rows(1)));
        let list = layouts(&[(&g, &p)], &m, &HashMap::new()).unwrap();
        let (vocab, hidden) = (m.config.vocab, 256);
        let int8: Vec<_> = list.iter().filter(|w| w.1 == Layout::Int8).collect();
        assert_eq!(int8.len(), 1);
        assert_eq!(int8[0].2, vocab * (cuda::padded(hidden) + 4));
        assert!(
            list.iter().any(|w| w.0 == WeightKey::new("token_embd.weight", Form::Own) && w.1 == Layout::Stored),
            "the embedding still reads the table as stored"
        );
        assert!(crate::lowering::lower_cuda(&m.step_graph().unwrap(), 80, None, HeadQuant::Q4).is_err());
        compiles(&p, "the q8 head's module");
        std::fs::remove_dir_all(dir).ok();
    }

    /// Launches that read the operands of their operands (the attention's
    /// first, which does the queries' and keys' RoPE; the products whose
    /// one-token kernels quantize their row): those keep their buffers
    /// until the launch has run.
    #[test]
    fn fused_launches_read_buffers_nothing_else_takes() {
        let (m, dir) = model(DType::I2S);
        let (g, p) = crate::lowering::lower_cuda(&m.step_graph().unwrap(), 80, None, HeadQuant::Stored).unwrap();
        let (slot, _) = slots(&g, &p);
        let mut fused = 0;
        for l in &p.launches {
            for a in &l.args {
                let Arg::OperandOf(i, j) = *a else { continue };
                let x = g.node(g.node(l.value).args[i]).args[j];
                for w in (x.index() + 1..l.value.index()).filter(|&w| slot[w] != NO_SLOT) {
                    assert_ne!(slot[w], slot[x.index()], "{} takes the buffer of {x}, which {} reads", bitnet_ir::Value(w as u32), l.value);
                }
                fused += l.entry.starts_with("rope_kv_store_") as usize;
            }
        }
        assert_eq!(fused, 2 * m.config.layers, "queries and keys of every layer");
        std::fs::remove_dir_all(dir).ok();
    }

    /// A one-token step skips the four quantizing launches of each layer
    /// (each product's one-token kernel quantizes its row) and the RoPE
    /// and KV store (the attention's one-token kernel does them); a step
    /// of more rows runs them all.
    #[test]
    fn a_one_token_step_skips_the_launches_the_next_do_the_work_of() {
        let (m, dir) = model(DType::I2S);
        let (g, p) = crate::lowering::lower_cuda(&m.step_graph().unwrap(), 80, None, HeadQuant::Stored).unwrap();
        assert_eq!(p.launches_for(2), p.launches.len());
        assert_eq!(p.launches_for(1), p.launches.len() - 5 * m.config.layers);
        for l in p.launches.iter().filter(|l| l.skip_one_token) {
            let readers: Vec<&Launch> = match g.node(l.value).op {
                Op::RmsNormQuant { .. } => p.launches.iter().filter(|r| g.node(r.value).args.first() == Some(&l.value)).collect(),
                Op::Attention { .. } => p.launches.iter().filter(|r| r.value == l.value && !r.skip_one_token).collect(),
                _ => panic!("{} skipped", l.entry),
            };
            assert!(!readers.is_empty());
            for r in readers {
                assert!(r.args.contains(&Arg::OperandOf(0, 0)) && r.one_token.is_some(), "{} does not do the work of {}", r.entry, l.entry);
            }
        }
        std::fs::remove_dir_all(dir).ok();
    }

    /// q, k and v are one product (`ternary_cat`) whose launch writes the
    /// three slices, which get no launch of their own. It writes them
    /// before their nodes: no value alive from the product to a slice may
    /// hold that slice's buffer.
    #[test]
    fn one_product_writes_q_k_and_v_into_buffers_nothing_else_holds() {
        let (m, dir) = model(DType::I2S);
        let (g, p) = crate::lowering::lower_cuda(&m.step_graph().unwrap(), 80, None, HeadQuant::Stored).unwrap();
        check(&g, &p).unwrap();
        let (slot, _) = slots(&g, &p);
        let mut last_use: Vec<usize> = (0..g.nodes.len()).collect();
        for (v, node) in g.iter() {
            node.args.iter().for_each(|a| last_use[a.index()] = v.index());
        }
        let mut early = 0;
        for l in &p.launches {
            let node = g.node(l.value);
            let reads: Vec<usize> = l
                .args
                .iter()
                .filter_map(|a| match *a {
                    Arg::Operand(i) => Some(node.args[i].index()),
                    Arg::OperandOf(i, j) => Some(g.node(node.args[i]).args[j].index()),
                    _ => None,
                })
                .collect();
            for x in l.writes().filter(|x| x.index() > l.value.index()) {
                assert!(matches!(g.node(x).op, Op::Slice { .. }) && matches!(node.op, Op::TernaryCat { .. }), "{} writes {x}", l.value);
                for w in (0..g.nodes.len()).filter(|&w| w != x.index() && slot[w] == slot[x.index()]) {
                    let alive = w <= x.index() && last_use[w] >= l.value.index();
                    assert!(!alive && !reads.contains(&w), "{} holds the buffer of {x}, which the launch of {} writes", bitnet_ir::Value(w as u32), l.value);
                }
                early += 1;
            }
        }
        assert_eq!(early, 3 * m.config.layers, "q, k and v of every layer");
        assert!(p.launches.iter().all(|l| !l.entry.starts_with("slice_")), "no slice is copied");
        std::fs::remove_dir_all(dir).ok();
    }

    /// A one-token product reads the f32 row its quantization would have
    /// read; when nothing after it reads that row, its slices, which it
    /// writes, must still not take the row's buffer.
    #[test]
    fn slices_never_take_a_buffer_their_product_reads() {
        let g = bitnet_ir::parse(
            r#"graph "g" {
    v0 = input "x" : f32[seq, 256]
    v1 = relu v0 : f32[seq, 256]
    v2 = weight "norm" : f32[256]
    v3 = rms_norm_quant v1, v2 eps=1e-5 scheme=per_token : q8_row[seq, 256]
    v4 = weight "a" : i2_s[128, 256]
    v5 = weight "b" : i2_s[64, 256]
    v6 = ternary_cat v3, v4, v5 parts=2 : f32[seq, 192]
    v7 = slice v6 start=0 len=128 : f32[seq, 128]
    v8 = slice v6 start=128 len=64 : f32[seq, 64]
    output v7
    output v8
}"#,
        )
        .unwrap();
        let tiles = |key: &bitnet_codegen::schedule::WorkloadKey| bitnet_codegen::cuda::PhaseTiles::heuristic(key, 80);
        let p = bitnet_codegen::cuda::lower(&g, &tiles, 4, HeadQuant::Stored, cuda::kernels::DecodeSplit::DEFAULT).unwrap();
        let cat = p.launches.iter().find(|l| l.entry.starts_with("ternary_cat_")).unwrap();
        assert!(cat.args.contains(&Arg::OperandOf(0, 0)) && cat.writes().count() == 2, "{cat:?}");
        let (slot, _) = slots(&g, &p);
        for s in [7, 8] {
            assert_ne!(slot[s], slot[1], "v{s} takes the buffer of v1, which the product reads");
        }
    }

    #[test]
    fn fingerprints_give_back_their_compute_capability() {
        assert_eq!(fingerprint_sm(&fingerprint("NVIDIA H200 (sm_90)")), Some(90));
        assert_eq!(fingerprint_sm("cuda an NVIDIA GPU"), None);
    }

    /// Tuned decode tiles that differ from the prefill ones give a second
    /// kernel, which a one-token launch runs with its own grid and block.
    #[test]
    fn tuned_decode_tiles_get_a_kernel_of_their_own() {
        use bitnet_autotune::db::{CudaTuned, Record};
        use bitnet_autotune::{Phase, SPACE_VERSION};
        use bitnet_codegen::cuda::{CudaTiles, Grid};
        use bitnet_codegen::schedule::{Tiles, Workload};
        let (m, dir) = model(DType::I2S);
        let record = |n, k, phase, tiles| Record {
            key: Workload::Ternary { n, k }.key(),
            phase,
            fingerprint: "cuda test".into(),
            threads: 1,
            space: SPACE_VERSION,
            tiles: Tiles::Cuda(tiles),
            ns: Some(1),
            status: "ok".into(),
            at: 0,
        };
        let (decode, prefill) = (CudaTiles { warps: 8, tokens: 1, mma: false }, CudaTiles { warps: 2, tokens: 8, mma: false });
        let tuned = CudaTuned::new(&[record(256, 512, Phase::Decode, decode), record(256, 512, Phase::Prefill, prefill)], "cuda test");
        // sm_75: no integer mma, so the heuristic's tiles are one kernel a product.
        let (g, p) = crate::lowering::lower_cuda(&m.step_graph().unwrap(), 75, Some(&tuned), HeadQuant::Stored).unwrap();
        check(&g, &p).unwrap();
        let down: Vec<&Launch> =
            p.launches.iter().filter(|l| l.entry.starts_with("ternary_") && l.one_token.as_ref().is_some_and(|v| v.block == decode.block())).collect();
        assert_eq!(down.len(), 2, "one ffn_down product a layer");
        for l in down {
            assert_eq!(l.for_rows(5), Some((l.entry.as_str(), Grid::Fixed(128), 64)));
            let (entry, grid, block) = l.for_rows(1).unwrap();
            assert!(entry != l.entry && grid == Grid::Fixed(32) && block == 256);
            assert_eq!(l.entries().count(), 2);
        }
        // Every other product keeps the default tiles (its one-token kernel
        // differs in quantizing its row itself): ffn_down's two kernels are
        // all that is new.
        let (_, untuned) = crate::lowering::lower_cuda(&m.step_graph().unwrap(), 75, None, HeadQuant::Stored).unwrap();
        let default = CudaTiles::DEFAULT;
        assert!(untuned.launches.iter().filter(|l| l.entry.starts_with("ternary_")).filter_map(|l| l.one_token.as_ref()).all(|v| v.block == default.block()));
        let new: Vec<&str> = p.kernels.iter().filter(|k| !untuned.kernels.contains(k)).map(|k| k.name.as_str()).collect();
        assert_eq!(new.len(), 2, "{new:?}");
        // From sm_80 every ternary product prefills on the tensor cores and
        // decodes with dot products; the float head has one kernel.
        let (g, p) = crate::lowering::lower_cuda(&m.step_graph().unwrap(), 80, None, HeadQuant::Stored).unwrap();
        check(&g, &p).unwrap();
        for l in &p.launches {
            let ternary = matches!(g.node(l.value).op, Op::TernaryMatMul(_) | Op::TernaryGlu { .. } | Op::TernaryCat { .. });
            assert_eq!(l.one_token.is_some(), ternary || l.entry.starts_with("attention_"), "{}", l.entry);
            assert_eq!(matches!(l.grid, Grid::RowsByTokens { tokens: 32, .. }), ternary, "{}", l.entry);
        }
        std::fs::remove_dir_all(dir).ok();
    }
}
