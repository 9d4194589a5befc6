//! The compiled CPU executor: runs an optimized, scheduled graph with the
//! native kernels of `bitnet-codegen`.
//!
//! Loading prepares each weight once for the kernels that read it
//! (ternary ones repacked into the layout their tiles imply, small float
//! ones expanded to f32, the rest read in place from the mapped file) and
//! plans memory: every computed value gets a buffer, reused once the value
//! is dead, so prefill of a long prompt holds a handful of activations,
//! not one per node. Evaluation walks the nodes in order and calls each
//! node's kernel; matrix products and attention fan out over the pool.

use crate::backend::{KernelTimes, StepRows};
use bitnet_codegen::cpu::blob::{self, Blob};
use bitnet_codegen::cpu::int4::{self, Int4Rows};
use bitnet_codegen::cpu::int8::{self, Int8Rows};
use bitnet_codegen::cpu::ternary::{self, PackedTernary, QuantActs};
use bitnet_codegen::cpu::{attention, float, ops, vmath, Isa, Pool};
use bitnet_codegen::schedule::{Schedule, Tiles};
use bitnet_ir::interp::{kernels, EvalError, KvStore, WeightSource};
use bitnet_ir::{ActQuant, DType, Extent, Graph, Op, Value};
use std::collections::HashMap;
use std::sync::Arc;

fn err<T>(msg: impl Into<String>) -> Result<T, EvalError> {
    Err(EvalError(msg.into()))
}

/// A weight made ready for its kernels.
pub(crate) enum Prepared {
    Packed(PackedTernary),
    /// Quantized to int8 rows for `Tiles::Int8`, under [`Form::Int8`].
    Int8(Int8Rows),
    /// Quantized to 4-bit groups for `Tiles::Int4`, under [`Form::Int4`].
    Int4(Int4Rows),
    Floats(Vec<f32>),
    /// Read in place through the weight source.
    Stored,
    /// The stored bytes copied into memory of the process's own (huge
    /// pages: see [`Blob`]), for a float matrix a product streams whole
    /// each step: read 40% faster than the file's small pages on a VM.
    Copied(Blob<u8>),
}

impl Prepared {
    /// Bytes this preparation holds of its own (none for a tensor read in
    /// place).
    fn bytes(&self) -> usize {
        match self {
            Prepared::Packed(p) => p.bytes(),
            Prepared::Int8(q) => q.bytes(),
            Prepared::Int4(q) => q.bytes(),
            Prepared::Floats(f) => f.len() * 4,
            Prepared::Stored => 0,
            Prepared::Copied(b) => b.len(),
        }
    }
}

/// Which preparation of a stored tensor a kernel reads: the tensor's own
/// (packed, expanded, read in place or copied), or a quantized copy kept
/// beside it (a tied head's quantized copy sits beside the table that the
/// embedding reads as stored).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub(crate) enum Form {
    Own,
    Int8,
    Int4,
}

impl Form {
    /// What follows the tensor's name in an artifact.
    fn suffix(self) -> &'static str {
        match self {
            Form::Own => "",
            Form::Int8 => "#int8",
            Form::Int4 => "#int4",
        }
    }

    /// What a kernel with these tiles reads.
    fn read_by(tiles: Option<Tiles>) -> Form {
        match tiles {
            Some(Tiles::Int8 { .. }) => Form::Int8,
            Some(Tiles::Int4 { .. }) => Form::Int4,
            _ => Form::Own,
        }
    }
}

/// A prepared weight: the graph's tensor name and the form of it.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) struct WeightKey {
    pub name: String,
    pub form: Form,
}

/// A [`WeightKey`] as borrowed parts, so that each step's lookups (`run`)
/// build no `String`: `(&str, Form)` finds the key of the same parts.
trait KeyParts {
    fn parts(&self) -> (&str, Form);
}

impl KeyParts for WeightKey {
    fn parts(&self) -> (&str, Form) {
        (&self.name, self.form)
    }
}

impl KeyParts for (&str, Form) {
    fn parts(&self) -> (&str, Form) {
        *self
    }
}

impl<'a> std::borrow::Borrow<dyn KeyParts + 'a> for WeightKey {
    fn borrow(&self) -> &(dyn KeyParts + 'a) {
        self
    }
}

// Both hash their parts, as `Borrow` requires.
impl std::hash::Hash for WeightKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state)
    }
}

impl std::hash::Hash for dyn KeyParts + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state)
    }
}

impl PartialEq for dyn KeyParts + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyParts + '_ {}

impl WeightKey {
    pub fn new(name: &str, form: Form) -> WeightKey {
        WeightKey { name: name.to_string(), form }
    }

    /// The key a kernel with these tiles reads `name` under.
    fn read_by(name: &str, tiles: Option<Tiles>) -> WeightKey {
        WeightKey::new(name, Form::read_by(tiles))
    }

    /// Its name in an artifact: the tensor's, with `#int8` or `#int4`
    /// after it for a quantized copy.
    pub fn artifact_name(&self) -> String {
        format!("{}{}", self.name, self.form.suffix())
    }

    /// The key of an artifact's weight `name` in `form`; `None` where the
    /// name does not say that form (see [`WeightKey::artifact_name`]).
    pub fn from_artifact_name(name: &str, form: Form) -> Option<WeightKey> {
        Some(WeightKey::new(name.strip_suffix(form.suffix())?, form))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    F32,
    I32,
    Q8,
}

enum Buf {
    F32(Vec<f32>),
    I32(Vec<i32>),
    Q8(QuantActs),
}

/// One graph, its schedule and its memory plan.
struct Plan {
    graph: Graph,
    schedule: Schedule,
    /// Each node's tiles, looked up once rather than per evaluation.
    tiles: Vec<Option<Tiles>>,
    /// The buffer each computed value lives in (`usize::MAX` for weights).
    slot: Vec<usize>,
    bufs: Vec<Buf>,
}

pub(crate) const NO_SLOT: usize = usize::MAX;

/// The buffer each computed value lives in (`NO_SLOT` for weights) and
/// each buffer's kind: a value's buffer is reused once the value is dead.
/// A result never shares a buffer with its own operands. `extra` lists
/// reads the graph does not show, `(value, at)`: a launch for `at` that
/// reads `value` (a fused kernel reading the operand of a node it does the
/// work of); `value` then lives until `at`.
pub(crate) fn assign_slots(graph: &Graph, extra: &[(Value, Value)]) -> (Vec<usize>, Vec<Kind>) {
    let n = graph.nodes.len();
    let mut last_use = vec![0usize; n];
    for (v, node) in graph.iter() {
        for a in &node.args {
            last_use[a.index()] = v.index();
        }
    }
    for &(x, at) in extra {
        last_use[x.index()] = last_use[x.index()].max(at.index());
    }
    for o in &graph.outputs {
        last_use[o.index()] = usize::MAX;
    }
    let mut slot = vec![NO_SLOT; n];
    let mut kinds: Vec<Kind> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    for (v, node) in graph.iter() {
        if matches!(node.op, Op::Weight { .. }) {
            continue;
        }
        let kind = match node.ty.dtype {
            DType::Q8Row => Kind::Q8,
            DType::I32 => Kind::I32,
            _ => Kind::F32,
        };
        slot[v.index()] = match free.iter().position(|&s| kinds[s] == kind) {
            Some(i) => free.swap_remove(i),
            None => {
                kinds.push(kind);
                kinds.len() - 1
            }
        };
        let read_here = extra.iter().filter(|e| e.1 == v).map(|e| e.0);
        for a in node.args.iter().copied().chain(read_here) {
            let s = slot[a.index()];
            if s != NO_SLOT && last_use[a.index()] == v.index() && !free.contains(&s) {
                free.push(s);
            }
        }
    }
    (slot, kinds)
}

impl Plan {
    fn new(graph: Graph, schedule: Schedule) -> Plan {
        let n = graph.nodes.len();
        let (slot, kinds) = assign_slots(&graph, &[]);
        let bufs = kinds
            .iter()
            .map(|k| match k {
                Kind::F32 => Buf::F32(Vec::new()),
                Kind::I32 => Buf::I32(Vec::new()),
                Kind::Q8 => Buf::Q8(QuantActs::default()),
            })
            .collect();
        let mut tiles = vec![None; n];
        for step in &schedule.steps {
            tiles[step.value.index()] = Some(step.tiles);
        }
        Plan { graph, schedule, tiles, slot, bufs }
    }
}

/// A value as a kernel reads it.
enum Arg<'a> {
    F32(&'a [f32]),
    I32(&'a [i32]),
    Q8(&'a QuantActs),
    Weight(&'a str, &'a Prepared),
}

pub struct CompiledModel {
    pool: Arc<Pool>,
    weights: HashMap<WeightKey, Prepared>,
    plan: Plan,
    /// Bytes of repacked and expanded weights held in memory.
    pub prepared_bytes: usize,
}

impl CompiledModel {
    /// Prepares the weights of an optimized, scheduled graph.
    pub fn new(weights: &dyn WeightSource, lowered: (Graph, Schedule), threads: usize) -> Result<CompiledModel, EvalError> {
        let mut prepared: HashMap<WeightKey, Prepared> = HashMap::new();
        prepare(&lowered.0, &lowered.1, weights, &mut prepared)?;
        Self::from_prepared(weights, prepared, lowered, threads)
    }

    /// Weights prepared earlier (read from an artifact), checked against
    /// what the graph's kernels will read.
    pub(crate) fn from_prepared(
        weights: &dyn WeightSource,
        prepared: HashMap<WeightKey, Prepared>,
        (graph, schedule): (Graph, Schedule),
        threads: usize,
    ) -> Result<CompiledModel, EvalError> {
        let mut prepared = prepared;
        copy_streamed(&graph, &schedule, weights, &mut prepared);
        check(&graph, &schedule, weights, &prepared)?;
        for key in prepared.iter().filter(|(_, p)| matches!(p, Prepared::Stored)).map(|(k, _)| k) {
            if let Some(view) = weights.weight(&key.name) {
                prefault(view.data);
            }
        }
        let prepared_bytes = prepared.values().map(Prepared::bytes).sum();
        Ok(CompiledModel { pool: Pool::shared(threads), weights: prepared, plan: Plan::new(graph, schedule), prepared_bytes })
    }

    /// How the ternary weights are packed for the kernels: `2bit` (four
    /// codes a byte), `1.6bit` (five), `mixed` where the tuning chose each
    /// matrix's, or `none` for a model without ternary weights.
    pub fn weight_layout(&self) -> &'static str {
        let mut packings = self.weights.values().filter_map(|p| match p {
            Prepared::Packed(p) => Some(p.packing),
            _ => None,
        });
        match packings.next() {
            None => "none",
            Some(first) if packings.all(|p| p == first) => first.name(),
            Some(_) => "mixed",
        }
    }

    /// This machine's read bandwidth with the model's workers, bytes a
    /// second (the best of three plain and three prefetched sums over
    /// 256 MiB).
    pub fn read_bandwidth(&self) -> f64 {
        bitnet_codegen::cpu::pool::read_bandwidth(&self.pool, 256 << 20, 3)
    }

    /// Weight bytes one decode step reads: every prepared weight, each
    /// stored matrix a product reads whole, and one row of each embedding
    /// table only looked up (a tied head reads its table whole).
    pub fn decode_bytes(&self, weights: &dyn WeightSource) -> usize {
        let mut whole = std::collections::HashSet::new();
        let mut rows = std::collections::HashSet::new();
        for (v, node) in self.plan.graph.iter() {
            for (i, a) in node.args.iter().enumerate() {
                let Op::Weight { name } = &self.plan.graph.node(*a).op else { continue };
                let key = WeightKey::read_by(name, self.plan.schedule.tiles(v));
                if matches!((&node.op, i, self.weights.get(&key)), (Op::Embed, 0, Some(Prepared::Stored | Prepared::Copied(_)))) {
                    rows.insert(key);
                } else {
                    whole.insert(key);
                }
            }
        }
        let bytes = |key: &WeightKey, one_row: bool| match self.weights.get(key) {
            Some(Prepared::Stored) | None => weights.weight(&key.name).map_or(0, |w| if one_row { w.data.len() / w.rows().max(1) } else { w.data.len() }),
            Some(p) => p.bytes(),
        };
        whole.iter().map(|k| bytes(k, false)).sum::<usize>() + rows.difference(&whole).map(|k| bytes(k, true)).sum::<usize>()
    }

    /// Each prepared weight under the name the graph uses and its form.
    pub(crate) fn prepared(&self) -> &HashMap<WeightKey, Prepared> {
        &self.weights
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    pub fn graph(&self) -> &Graph {
        &self.plan.graph
    }

    pub fn schedule(&self) -> &Schedule {
        &self.plan.schedule
    }

    /// Evaluates one step's rows; returns the graph's last output (the
    /// logits of the picked rows), row-major. With `times`, each node's
    /// kernel is timed: milliseconds and calls per kernel family (the op's
    /// mnemonic), slowest first, with "executor" for the time outside the
    /// kernels. For finding what to speed up.
    pub fn eval(&mut self, weights: &dyn WeightSource, rows: &StepRows, kv: &mut dyn KvStore, times: Option<&mut KernelTimes>) -> Result<Vec<f32>, EvalError> {
        let inputs: [(&str, &[i32]); 3] = [("tokens", rows.tokens), ("positions", rows.positions), ("out_rows", rows.out_rows)];
        let extent = Extent::new(rows.tokens.len(), rows.out_rows.len());
        let Some(times) = times else { return run(&mut self.plan, &self.pool, &self.weights, weights, &inputs, extent, kv, None) };
        let t0 = std::time::Instant::now();
        let logits = run(&mut self.plan, &self.pool, &self.weights, weights, &inputs, extent, kv, Some(times))?;
        // The walk over the graph itself: everything outside the kernels.
        let kernels: f64 = times.0.iter().map(|f| f.1).sum();
        times.add("executor", (t0.elapsed().as_secs_f64() * 1e3 - kernels).max(0.0));
        times.0.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(logits)
    }
}

/// Touches one byte of every page of `data`, a weight read in place from
/// a mapped file (the output head, the embedding table), so that the
/// page-table work of mapping it happens while loading, not inside the
/// first prefill that reads it.
fn prefault(data: &[u8]) {
    for i in (0..data.len()).step_by(4096) {
        // SAFETY: `i` is within `data`; the read is volatile so it is not optimized away.
        unsafe { std::ptr::read_volatile(data.as_ptr().add(i)) };
    }
}

fn prepare(g: &Graph, sched: &Schedule, weights: &dyn WeightSource, out: &mut HashMap<WeightKey, Prepared>) -> Result<(), EvalError> {
    for (v, node) in g.iter() {
        for (i, a) in node.args.iter().enumerate() {
            let Op::Weight { name } = &g.node(*a).op else { continue };
            let Some(view) = weights.weight(name) else { return err(format!("missing tensor {name}")) };
            let own = WeightKey::new(name, Form::Own);
            let want = match (&node.op, i) {
                _ if node.op.reads_packed(i) => {
                    let Some(Tiles::Ternary(t)) = sched.tiles(v) else { return err(format!("{v}: no ternary tiles scheduled")) };
                    match out.get(&own) {
                        Some(Prepared::Packed(p)) if p.rows == t.rows && p.packing == t.packing => continue,
                        Some(_) => return err(format!("tensor {name} is read by kernels that want different layouts")),
                        None => {
                            let p = PackedTernary::from_weight(&view, t.rows).map_err(|e| EvalError(format!("{name}: {e}")))?.with_packing(t.packing);
                            weights.release(name);
                            Prepared::Packed(p)
                        }
                    }
                }
                (Op::MatMul, 1) if matches!(sched.tiles(v), Some(Tiles::Int8 { .. } | Tiles::Int4 { .. })) => {
                    let tiles = sched.tiles(v);
                    out.entry(WeightKey::read_by(name, tiles)).or_insert_with(|| {
                        let q = match tiles {
                            Some(Tiles::Int4 { .. }) => Prepared::Int4(Int4Rows::quantize(&view)),
                            _ => Prepared::Int8(Int8Rows::quantize(&view)),
                        };
                        weights.release(name);
                        q
                    });
                    continue;
                }
                (Op::MatMul, 1) | (Op::Embed, 0) => Prepared::Stored,
                _ if out.contains_key(&own) => continue,
                _ => Prepared::Floats(view.to_f32()),
            };
            // A tensor read in place by one kernel may be expanded for another.
            if !matches!((out.get(&own), &want), (Some(Prepared::Stored), Prepared::Floats(_))) {
                out.insert(own, want);
            }
        }
    }
    Ok(())
}

/// Copies each stored float matrix that a product reads whole (the output
/// head) out of the model's file into memory of its own, releasing the
/// file's pages as it goes; lookups alone (an untied embedding) stay in
/// place. Only where the copy would be in huge pages ([`blob::in_huge_pages`]).
fn copy_streamed(g: &Graph, sched: &Schedule, weights: &dyn WeightSource, prepared: &mut HashMap<WeightKey, Prepared>) {
    if !blob::HUGE_PAGES {
        return;
    }
    for (v, node) in g.iter() {
        let Some(&a) = node.args.get(1) else { continue };
        let Op::Weight { name } = &g.node(a).op else { continue };
        let own = WeightKey::new(name, Form::Own);
        if !matches!(node.op, Op::MatMul) || !matches!(sched.tiles(v), Some(Tiles::Float { .. })) || !matches!(prepared.get(&own), Some(Prepared::Stored)) {
            continue;
        }
        // A missing tensor is `check`'s to report.
        let Some(view) = weights.weight(name) else { continue };
        if blob::in_huge_pages(view.data.len()) {
            let copy = Blob::copy_of(view.data, &mut || weights.release(name));
            prepared.insert(own, Prepared::Copied(copy));
        }
    }
}

/// That every weight a kernel will read is there, prepared as that kernel
/// needs it and of the graph's shape: kernels index without bounds checks.
fn check(g: &Graph, sched: &Schedule, weights: &dyn WeightSource, prepared: &HashMap<WeightKey, Prepared>) -> Result<(), EvalError> {
    for (v, node) in g.iter() {
        for (i, a) in node.args.iter().enumerate() {
            let Op::Weight { name } = &g.node(*a).op else { continue };
            let ty = &g.node(*a).ty;
            let dims = ty.resolve(Extent::FIXED);
            let nk = |n: usize, k: usize| dims.len() == 2 && dims[0] == n && dims[1] == k;
            let tiles = sched.tiles(v);
            let read = prepared.get(&WeightKey::read_by(name, tiles));
            let ok = match (&node.op, i, tiles) {
                (op, i, Some(Tiles::Ternary(t))) if op.reads_packed(i) => {
                    matches!(read, Some(Prepared::Packed(p)) if p.rows == t.rows && p.packing == t.packing && nk(p.n, p.k))
                }
                (Op::MatMul, 1, Some(Tiles::Int8 { .. })) => matches!(read, Some(Prepared::Int8(q)) if nk(q.n, q.k)),
                (Op::MatMul, 1, Some(Tiles::Int4 { .. })) => matches!(read, Some(Prepared::Int4(q)) if nk(q.n, q.k)),
                (Op::MatMul, 1, _) | (Op::Embed, 0, _) => {
                    let copied_whole = |w: &bitnet_ir::interp::WeightView| match read {
                        Some(Prepared::Copied(b)) => b.len() == w.data.len(),
                        other => other.is_some(),
                    };
                    matches!(weights.weight(name), Some(w) if copied_whole(&w) && w.dtype == ty.dtype && w.shape == dims && w.dtype.tensor_bytes(&w.shape).is_some_and(|b| b <= w.data.len()))
                }
                _ => matches!(read, Some(Prepared::Floats(f)) if f.len() == dims.iter().product::<usize>()),
            };
            if !ok {
                return err(format!("{v} = {}: weight {name} is missing or not prepared as {ty} for its kernel", node.op.mnemonic()));
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run(
    plan: &mut Plan,
    pool: &Pool,
    prepared: &HashMap<WeightKey, Prepared>,
    weights: &dyn WeightSource,
    inputs: &[(&str, &[i32])],
    extent: Extent,
    kv: &mut dyn KvStore,
    mut times: Option<&mut KernelTimes>,
) -> Result<Vec<f32>, EvalError> {
    for v in 0..plan.graph.nodes.len() {
        let node = &plan.graph.nodes[v];
        let s = plan.slot[v];
        if s == NO_SLOT {
            continue;
        }
        let mut out = std::mem::replace(&mut plan.bufs[s], Buf::I32(Vec::new()));
        let shape = node.ty.resolve(extent);
        let tiles = plan.tiles[v];
        let args: Vec<Arg> = node
            .args
            .iter()
            .map(|a| match &plan.graph.node(*a).op {
                Op::Weight { name } => Arg::Weight(name, &prepared[&(name.as_str(), Form::read_by(tiles)) as &dyn KeyParts]),
                _ => match &plan.bufs[plan.slot[a.index()]] {
                    Buf::F32(x) => Arg::F32(x),
                    Buf::I32(x) => Arg::I32(x),
                    Buf::Q8(x) => Arg::Q8(x),
                },
            })
            .collect();
        let started = times.is_some().then(std::time::Instant::now);
        let result = kernel(&node.op, &shape, &args, (tiles, plan.schedule.isa), &mut out, pool, weights, inputs, kv);
        if let (Some(times), Some(t0)) = (times.as_deref_mut(), started) {
            times.add(node.op.mnemonic(), t0.elapsed().as_secs_f64() * 1e3);
        }
        drop(args);
        plan.bufs[s] = out;
        result.map_err(|e| EvalError(format!("v{v} = {}: {}", node.op.mnemonic(), e.0)))?;
    }
    let o = plan.graph.outputs.last().expect("verified graphs have outputs");
    // A graph read from an artifact may name a weight as its output: no buffer holds it.
    match plan.bufs.get(plan.slot[o.index()]) {
        Some(Buf::F32(x)) => Ok(x.clone()),
        _ => err("the graph's output is not a computed f32 value"),
    }
}

fn f32_buf(out: &mut Buf, len: usize) -> &mut Vec<f32> {
    if !matches!(out, Buf::F32(_)) {
        *out = Buf::F32(Vec::new());
    }
    let Buf::F32(v) = out else { unreachable!() };
    v.resize(len, 0.0);
    v
}

fn q8_buf(out: &mut Buf) -> &mut QuantActs {
    if !matches!(out, Buf::Q8(_)) {
        *out = Buf::Q8(QuantActs::default());
    }
    let Buf::Q8(q) = out else { unreachable!() };
    q
}

fn floats<'a>(a: &Arg<'a>) -> Result<&'a [f32], EvalError> {
    match a {
        Arg::F32(x) => Ok(x),
        Arg::Weight(_, Prepared::Floats(x)) => Ok(x),
        _ => err("operand must be f32"),
    }
}

fn ids<'a>(a: &Arg<'a>) -> Result<&'a [i32], EvalError> {
    match a {
        Arg::I32(x) => Ok(x),
        _ => err("operand must be i32"),
    }
}

fn stored<'w>(a: &Arg<'w>, weights: &'w dyn WeightSource) -> Result<bitnet_ir::interp::WeightView<'w>, EvalError> {
    match a {
        Arg::Weight(name, p) => {
            let w = weights.weight(name).ok_or_else(|| EvalError(format!("missing tensor {name}")))?;
            Ok(match p {
                // `check` proved the copy as long as the stored bytes.
                Prepared::Copied(bytes) => bitnet_ir::interp::WeightView { data: bytes, ..w },
                _ => w,
            })
        }
        _ => err("operand must be a stored weight"),
    }
}

#[allow(clippy::too_many_arguments)]
fn kernel(
    op: &Op,
    shape: &[usize],
    args: &[Arg],
    (tiles, isa): (Option<Tiles>, Isa),
    out: &mut Buf,
    pool: &Pool,
    weights: &dyn WeightSource,
    inputs: &[(&str, &[i32])],
    kv: &mut dyn KvStore,
) -> Result<(), EvalError> {
    let len: usize = shape.iter().product();
    let cols = shape.last().copied().unwrap_or(1);
    match op {
        Op::Input { name } => {
            let Some((_, data)) = inputs.iter().find(|(n, _)| n == name) else { return err(format!("input \"{name}\" was not given")) };
            if !matches!(out, Buf::I32(_)) {
                *out = Buf::I32(Vec::new());
            }
            let Buf::I32(v) = out else { unreachable!() };
            v.clear();
            v.extend_from_slice(data);
        }
        Op::Weight { .. } => unreachable!("weights have no buffer"),
        Op::Embed => {
            let table = stored(&args[0], weights)?;
            let o = f32_buf(out, len);
            for (row, &id) in o.chunks_exact_mut(cols).zip(ids(&args[1])?) {
                if id < 0 || id as usize >= table.rows() {
                    return err(format!("token id {id} is outside the vocabulary of {}", table.rows()));
                }
                float::row_f32(isa, &table, id as usize, row);
            }
        }
        Op::RmsNorm { eps } => ops::rms_norm(isa, floats(&args[0])?, floats(&args[1])?, *eps, f32_buf(out, len)),
        Op::RmsNormQuant { eps, scheme: ActQuant::PerToken } => {
            ops::quantize_rows_on(pool, isa, floats(&args[0])?, cols, Some((floats(&args[1])?, *eps)), q8_buf(out))
        }
        Op::QuantizeAct { scheme: ActQuant::PerToken } => ops::quantize_rows_on(pool, isa, floats(&args[0])?, cols, None, q8_buf(out)),
        Op::QuantizeAct { .. } | Op::RmsNormQuant { .. } => return err("q8_k activations are not compiled"),
        Op::MatMul => match (tiles, &args[1]) {
            (Some(Tiles::Float { isa }), _) => float::matmul(pool, isa, &stored(&args[1], weights)?, floats(&args[0])?, f32_buf(out, len)),
            (Some(Tiles::Int8 { isa }), Arg::Weight(_, Prepared::Int8(w))) => {
                let mut x = QuantActs::default();
                ops::quantize_rows_on(pool, isa, floats(&args[0])?, w.k, None, &mut x);
                int8::matmul(pool, isa, w, &x, f32_buf(out, len));
            }
            (Some(Tiles::Int4 { isa }), Arg::Weight(_, Prepared::Int4(w))) => {
                let mut x = QuantActs::default();
                ops::quantize_rows_on(pool, isa, floats(&args[0])?, w.k, None, &mut x);
                int4::matmul(pool, isa, w, &x, f32_buf(out, len));
            }
            _ => return err("no float tiles scheduled"),
        },
        Op::TernaryMatMul(e) => {
            let Some(Tiles::Ternary(t)) = tiles else { return err("no ternary tiles scheduled") };
            let (Arg::Q8(x), Arg::Weight(_, Prepared::Packed(w))) = (&args[0], &args[1]) else { return err("operands must be q8_row and a packed weight") };
            let mut extra = args[2..].iter();
            let scale = if e.scale { Some(floats(extra.next().unwrap())?[0]) } else { None };
            let residual = if e.residual { Some(floats(extra.next().unwrap())?) } else { None };
            ternary::matmul(pool, t, w, x, f32_buf(out, len), ternary::Epilogue { scale, residual });
        }
        Op::TernaryGlu { act, epilogue } => {
            let Some(Tiles::Ternary(t)) = tiles else { return err("no ternary tiles scheduled") };
            let up = epilogue.glu_up();
            let (Arg::Q8(x), Arg::Weight(_, Prepared::Packed(wg)), Arg::Weight(_, Prepared::Packed(wu))) = (&args[0], &args[1], &args[up]) else {
                return err("operands must be q8_row and two packed weights");
            };
            let (sg, su) = if epilogue.scale { (Some(floats(&args[2])?[0]), Some(floats(&args[up + 1])?[0])) } else { (None, None) };
            ternary::matmul_glu(pool, t, *act, (wg, sg), (wu, su), x, f32_buf(out, len));
        }
        Op::TernaryCat { epilogue, .. } => {
            let Some(Tiles::Ternary(t)) = tiles else { return err("no ternary tiles scheduled") };
            let Arg::Q8(x) = &args[0] else { return err("operand 0 must be q8_row") };
            let mut parts = Vec::new();
            for part in args[1..].chunks(1 + epilogue.operands()) {
                let Arg::Weight(_, Prepared::Packed(w)) = &part[0] else { return err("ternary_cat parts must be packed weights") };
                parts.push((w, if epilogue.scale { Some(floats(&part[1])?[0]) } else { None }));
            }
            ternary::matmul_cat(pool, t, &parts, x, f32_buf(out, len));
        }
        Op::Slice { start, len: n } => {
            let x = floats(&args[0])?;
            let rows = len / n;
            let o = f32_buf(out, len);
            if let Some(width) = x.len().checked_div(rows) {
                for (o, x) in o.chunks_exact_mut(*n).zip(x.chunks_exact(width)) {
                    o.copy_from_slice(&x[*start..start + n]);
                }
            }
        }
        Op::Rope { mode, theta, head_dim } => ops::rope_on(pool, isa, floats(&args[0])?, f32_buf(out, len), cols, ids(&args[1])?, *mode, *theta, *head_dim),
        Op::Attention { layer, heads, kv_heads, head_dim } => {
            let a = attention::AttentionShape { layer: *layer, heads: *heads, kv_heads: *kv_heads, head_dim: *head_dim };
            attention::attention(pool, isa, a, floats(&args[0])?, floats(&args[1])?, floats(&args[2])?, ids(&args[3])?, kv, f32_buf(out, len))?;
        }
        Op::Unary(u) => {
            let x = floats(&args[0])?;
            f32_buf(out, len).iter_mut().zip(x).for_each(|(o, &x)| *o = kernels::unary(*u, x));
        }
        Op::Binary(b) => ops::binary_on(pool, isa, *b, floats(&args[0])?, floats(&args[1])?, f32_buf(out, len)),
        Op::Glu { act } => ops::glu_on(pool, isa, *act, floats(&args[0])?, floats(&args[1])?, f32_buf(out, len)),
        Op::Softmax => {
            let o = f32_buf(out, len);
            o.copy_from_slice(floats(&args[0])?);
            o.chunks_exact_mut(cols).for_each(|row| vmath::softmax(isa, row));
        }
        Op::LastRow => {
            let x = floats(&args[0])?;
            if x.len() < cols {
                return err("last_row of an empty tensor");
            }
            f32_buf(out, len).copy_from_slice(&x[x.len() - cols..]);
        }
        Op::SelectRows => {
            let x = floats(&args[0])?;
            let o = f32_buf(out, len);
            for (o, &r) in o.chunks_exact_mut(cols).zip(ids(&args[1])?) {
                match x.get(r.max(0) as usize * cols..).and_then(|x| x.get(..cols)) {
                    Some(row) if r >= 0 => o.copy_from_slice(row),
                    _ => return err(format!("select_rows: row {r} of {}", x.len() / cols.max(1))),
                }
            }
        }
        Op::Cast { to } => {
            let x = floats(&args[0])?;
            let o = f32_buf(out, len);
            for (o, &v) in o.iter_mut().zip(x) {
                *o = match to {
                    DType::F16 => half::f16::from_f32(v).to_f32(),
                    DType::BF16 => half::bf16::from_f32(v).to_f32(),
                    _ => v,
                };
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_keys_keep_their_form_through_an_artifact_name() {
        for form in [Form::Own, Form::Int8, Form::Int4] {
            let key = WeightKey::new("output.weight", form);
            assert_eq!(WeightKey::from_artifact_name(&key.artifact_name(), form), Some(key.clone()));
        }
        assert_eq!(WeightKey::new("output.weight", Form::Int4).artifact_name(), "output.weight#int4");
        // Quantized rows must say so in their name, and which rows they are.
        assert_eq!(WeightKey::from_artifact_name("output.weight", Form::Int8), None);
        assert_eq!(WeightKey::from_artifact_name("output.weight#int8", Form::Int4), None);
        // A tensor's own name is taken as it is.
        assert_eq!(WeightKey::from_artifact_name("odd#int8", Form::Own), Some(WeightKey::new("odd#int8", Form::Own)));
    }

    #[test]
    fn borrowed_parts_find_the_key_of_the_same_parts() {
        let map: HashMap<WeightKey, usize> =
            [(WeightKey::new("w", Form::Own), 1), (WeightKey::new("w", Form::Int8), 2), (WeightKey::new("v", Form::Int8), 3)].into();
        assert_eq!(map.get(&("w", Form::Own) as &dyn KeyParts), Some(&1));
        assert_eq!(map.get(&("w", Form::Int8) as &dyn KeyParts), Some(&2));
        assert_eq!(map.get(&("v", Form::Int8) as &dyn KeyParts), Some(&3));
        assert_eq!(map.get(&("v", Form::Own) as &dyn KeyParts), None);
        assert_eq!(map.get(&("w", Form::Int4) as &dyn KeyParts), None);
    }
}
