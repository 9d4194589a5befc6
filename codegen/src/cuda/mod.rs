//! The CUDA target: an optimized graph lowered to one CUDA C module (its
//! kernels specialized to the graph's shapes and tiles) and the list of
//! launches that runs it, compiled to PTX by NVRTC.
//!
//! Lowering needs neither a GPU nor NVRTC: [`lower`] only writes source
//! and launch records. [`nvrtc`] compiles the source (a machine with the
//! NVRTC library and no GPU can do it, so `bitnet compile --device cuda`
//! and the CI checks work without one); the runtime loads the PTX on the
//! device and makes the launches.
//!
//! Kernels are named after their family and a hash of their source, so
//! equal work (the same shapes in thirty layers) is one kernel, and a
//! kernel's name changes whenever its code does.
//!
//! A matrix product has tiles for each phase ([`PhaseTiles`]): prefill's
//! (many tokens, on the integer tensor cores where the GPU has them) make
//! its kernel, and decode's, where they differ, a second kernel that a
//! one-token launch runs instead ([`Launch::one_token`]). The autotuner
//! measures both on the GPU (`bitnet autotune --device cuda`).

pub mod emulator;
pub mod kernels;
pub mod nvrtc;

use crate::schedule::HeadQuant;
use crate::target::fnv1a;
use bitnet_ir::{ActQuant, DType, Extent, Graph, Op, Value};
pub use kernels::{CudaTiles, FloatType};

/// What a kernel parameter is bound to at launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Arg {
    /// The node's operand `i`: one pointer, or three (codes, γ, Σq) for
    /// int8 activations.
    Operand(usize),
    /// Operand `j` of the node's operand `i` (a launch that does the work
    /// of the node before it too, which then has no launch of its own).
    OperandOf(usize, usize),
    /// β, the scale of the packed ternary weight that is operand `i` (f32).
    Beta(usize),
    /// The buffer of a one-token attention split over blocks
    /// ([`kernels::attention`]).
    Splits,
    /// Layer `l`'s key blocks (f32, `[kv_heads][blocks][positions][d]`).
    KeyCache(usize),
    /// Layer `l`'s value cache.
    ValueCache(usize),
    /// The node's result (three pointers for int8 activations).
    Output,
    /// The result of another node, which this launch computes (that node
    /// has no launch of its own): a product that writes its slices, a RoPE
    /// done by the attention's first launch.
    ResultOf(Value),
    /// The rows (tokens) of operand `i`, or of the result when `None` (i32).
    Rows(Option<usize>),
    /// Int8 activations of the launch's own (three pointers: codes, γ,
    /// Σq), for a product whose f32 input the launch before it quantizes.
    Scratch,
    /// The float weight that is operand `i` as int8 rows, quantized when
    /// the model is loaded (`--head q8`): two pointers, the codes (`[n,
    /// kp]`) and each row's scale (f32).
    Int8Rows(usize),
    /// The KV cache's block tables: three parameters, each row's blocks
    /// (i32, `width` a row, in position order), `width` and the blocks in
    /// the pool (i32 each).
    BlockTables,
}

/// How many blocks a launch has, from the rows `s` of its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Grid {
    /// One block per row of the result.
    PerRow,
    /// A fixed number of blocks.
    Fixed(u32),
    /// `ceil(s · row / block)` blocks, one thread per value.
    Elements { row: usize },
    /// `(heads, s)` blocks.
    HeadsByRows { heads: usize },
    /// `(blocks, ceil(s / tokens))` blocks: tiles of rows by tokens.
    RowsByTokens { blocks: u32, tokens: usize },
    /// `(heads, split.blocks_for(context))` blocks: each head's positions
    /// over blocks (one token's attention).
    HeadsBySplits { heads: usize, split: kernels::DecodeSplit },
}

impl Grid {
    /// The blocks of a launch whose result has `rows` rows, with `block`
    /// threads a block, in a KV cache of `context` positions.
    pub fn dims(self, rows: usize, block: u32, context: usize) -> (u32, u32, u32) {
        match self {
            Grid::HeadsBySplits { heads, split } => (heads as u32, split.blocks_for(context) as u32, 1),
            Grid::PerRow => (rows as u32, 1, 1),
            Grid::Fixed(n) => (n, 1, 1),
            Grid::Elements { row } => ((rows * row).div_ceil(block as usize) as u32, 1, 1),
            Grid::HeadsByRows { heads } => (heads as u32, rows as u32, 1),
            Grid::RowsByTokens { blocks, tokens } => (blocks, rows.div_ceil(tokens.max(1)) as u32, 1),
        }
    }
}

/// One kernel launch of a node (attention has two: store, then attend).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Launch {
    pub value: Value,
    pub entry: String,
    pub grid: Grid,
    pub block: u32,
    pub args: Vec<Arg>,
    /// A kernel of the same parameters tuned for one token (decode), run
    /// instead when the launch has one row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_token: Option<Variant>,
    /// A step of one row skips the launch: the one-token kernels of the
    /// launches that read its result do its work themselves.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_one_token: bool,
}

/// Another kernel for a launch: its entry and its own grid and block.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Variant {
    pub entry: String,
    pub grid: Grid,
    pub block: u32,
}

impl Launch {
    /// The kernel, grid and block that run `rows` tokens, if a step of
    /// that many runs the launch.
    pub fn for_rows(&self, rows: usize) -> Option<(&str, Grid, u32)> {
        match &self.one_token {
            _ if rows == 1 && self.skip_one_token => None,
            Some(v) if rows == 1 => Some((&v.entry, v.grid, v.block)),
            _ => Some((&self.entry, self.grid, self.block)),
        }
    }

    /// The values the launch writes, each once: its node's result, and
    /// those of the nodes whose work it does.
    pub fn writes(&self) -> impl Iterator<Item = Value> + '_ {
        let output = self.args.contains(&Arg::Output).then_some(self.value);
        output.into_iter().chain(self.args.iter().filter_map(|a| match *a {
            Arg::ResultOf(v) => Some(v),
            _ => None,
        }))
    }

    /// Every kernel entry the launch may run.
    pub fn entries(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.entry.as_str()).chain(self.one_token.as_ref().map(|v| v.entry.as_str()))
    }
}

/// The tiles of one matrix product: for many tokens (prefill) and for one
/// (decode). The autotuner measures each phase on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhaseTiles {
    pub prefill: CudaTiles,
    pub decode: CudaTiles,
}

impl PhaseTiles {
    /// The tiles before any tuning: dot products (`dp4a`) for one token;
    /// for many, the tensor cores where the GPU has integer `mma`
    /// (`sm` 80 and later) and the product is ternary.
    pub fn heuristic(key: &crate::schedule::WorkloadKey, sm: u32) -> PhaseTiles {
        let mma = sm >= 80 && key.is_ternary();
        PhaseTiles { prefill: if mma { CudaTiles::MMA_DEFAULT } else { CudaTiles::DEFAULT }, decode: CudaTiles::DEFAULT }
    }
}

impl std::fmt::Display for PhaseTiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefill == self.decode {
            write!(f, "{}", self.prefill)
        } else {
            write!(f, "prefill {}, decode {}", self.prefill, self.decode)
        }
    }
}

/// One generated kernel: its entry name and its CUDA C.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Kernel {
    pub name: String,
    pub source: String,
}

impl Kernel {
    /// The kernel `name` of a family's parameter list and body `code`
    /// (from [`kernels`]), for blocks of at most `block` threads.
    pub fn new(name: &str, block: u32, code: &str) -> Kernel {
        Kernel { name: name.to_string(), source: format!("extern \"C\" __global__ void __launch_bounds__({block}) {name}{code}\n") }
    }
}

/// A lowered graph: its kernels and the launches that run them, in graph
/// order.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Program {
    /// Positions in a KV block, as a power of two.
    pub block_shift: u32,
    pub kernels: Vec<Kernel>,
    pub launches: Vec<Launch>,
    /// Each matrix product's tiles, for display (`value`, key, tiles).
    pub tiles: Vec<(Value, String, String)>,
}

impl Program {
    /// The launches a step of `rows` tokens makes.
    pub fn launches_for(&self, rows: usize) -> usize {
        self.launches.iter().filter(|l| l.for_rows(rows).is_some()).count()
    }
}

/// One CUDA C module with every kernel of `programs`, each once.
pub fn module_source(programs: &[&Program]) -> String {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = String::from(kernels::PRELUDE);
    for k in programs.iter().flat_map(|p| &p.kernels) {
        if seen.insert(k.name.as_str()) {
            out += &k.source;
        }
    }
    out
}

/// The element type a float weight has on the device: f16 and bf16 as
/// stored, everything else (f32 and block-quantized float types)
/// expanded to f32 when uploaded.
pub fn device_float_type(dtype: DType) -> FloatType {
    match dtype {
        DType::F16 => FloatType::F16,
        DType::BF16 => FloatType::BF16,
        _ => FloatType::F32,
    }
}

/// Rounds `k` up to the packed ternary layout's chunk (128 weights).
pub fn padded(k: usize) -> usize {
    k.div_ceil(crate::cpu::ternary::CHUNK) * crate::cpu::ternary::CHUNK
}

struct Builder {
    kernels: Vec<Kernel>,
    launches: Vec<Launch>,
}

impl Builder {
    /// Adds a kernel of `family` with this parameter list and body (from
    /// [`kernels`]); returns its entry name.
    fn kernel(&mut self, family: &str, block: u32, code: String) -> String {
        let text = format!("__launch_bounds__({block}) {code}");
        let mut name = format!("{family}_{:016x}", fnv1a(text.as_bytes()));
        // Equal source, one kernel; a hash collision (never seen) gets a suffix.
        while let Some(k) = self.kernels.iter().find(|k| k.name == name) {
            if *k == Kernel::new(&name, block, &code) {
                return name;
            }
            name.push('x');
        }
        self.kernels.push(Kernel::new(&name, block, &code));
        name
    }

    fn launch(&mut self, value: Value, family: &str, code: String, grid: Grid, block: u32, args: Vec<Arg>) {
        let entry = self.kernel(family, block, code);
        self.launches.push(Launch { value, entry, grid, block, args, one_token: None, skip_one_token: false });
    }

    /// A matrix product's launch of `n` rows, one warp a row: `code(t,
    /// one)` is its kernel for tiles `t` (for one token with `one`), and a
    /// second kernel runs one token where that differs (other tiles, or
    /// the token's quantization done in the kernel).
    fn product(&mut self, value: Value, family: &str, n: usize, tiles: PhaseTiles, code: impl Fn(CudaTiles, bool) -> String, args: Vec<Arg>) {
        let (p, d) = (tiles.prefill, tiles.decode);
        let (many, one) = (code(p, false), code(d, true));
        self.launch(value, family, many.clone(), p.grid(n), p.block(), args);
        if (d, &one) != (p, &many) {
            let entry = self.kernel(family, d.block(), one);
            self.launches.last_mut().expect("just pushed").one_token = Some(Variant { entry, grid: d.grid(n), block: d.block() });
        }
    }
}

/// The operands a program reads as int8 rows (`--head q8`): `(node,
/// operand)` for each [`Arg::Int8Rows`] of its launches.
pub fn int8_reads(p: &Program) -> Vec<(Value, usize)> {
    let mut out = Vec::new();
    for l in &p.launches {
        for a in &l.args {
            if let Arg::Int8Rows(i) = *a {
                if !out.contains(&(l.value, i)) {
                    out.push((l.value, i));
                }
            }
        }
    }
    out
}

/// The attention nodes whose queries and keys are RoPE of the same
/// positions that nothing else reads: each with its two RoPE nodes, whose
/// work the attention's first launch does (then the keys go from the
/// registers to the cache, and the RoPE nodes get no launch).
fn rope_into_attention(g: &Graph) -> Vec<(Value, [Value; 2], bitnet_ir::RopeMode, f32)> {
    let uses = bitnet_ir::passes::use_counts(g);
    let mut out = Vec::new();
    for (v, node) in g.iter() {
        let Op::Attention { head_dim, .. } = node.op else { continue };
        let [q, kk, _, pos] = node.args[..] else { continue };
        let rope = |x: Value| match &g.node(x).op {
            Op::Rope { mode, theta, head_dim: d } if *d == head_dim && uses[x.index()] == 1 && g.node(x).args.get(1) == Some(&pos) => Some((*mode, *theta)),
            _ => None,
        };
        if let (Some(a), Some(b)) = (rope(q), rope(kk)) {
            if a.0 == b.0 && a.1.to_bits() == b.1.to_bits() && q != kk {
                out.push((v, [q, kk], a.0, a.1));
            }
        }
    }
    out
}

/// The `ternary_cat` nodes that write their parts straight into the
/// values of their slices (which then get no launch): those read only by
/// one slice of each part, the slices right after the cat in part order.
/// The launch writes them before their nodes: the buffer plan keeps what
/// it reads until the last of them (`slots` in the runtime). Each with its
/// slices.
fn cat_into_slices(g: &Graph) -> Vec<(Value, Vec<Value>)> {
    let uses = bitnet_ir::passes::use_counts(g);
    let mut out = Vec::new();
    for (v, node) in g.iter() {
        let Op::TernaryCat { parts, epilogue } = node.op else { continue };
        let widths = epilogue.cat_products(&node.args).iter().map(|p| g.ty(p[1]).shape[0].resolve(Extent::FIXED)).collect::<Vec<_>>();
        let slices: Vec<Value> = (1..=parts).map(|j| Value((v.index() + j) as u32)).collect();
        let mut start = 0;
        let exact = uses[v.index()] == parts
            && slices.iter().zip(&widths).all(|(s, &w)| {
                let ok = g.nodes.get(s.index()).is_some_and(|n| n.op == Op::Slice { start, len: w } && n.args == [v]);
                start += w;
                ok
            });
        if exact {
            out.push((v, slices));
        }
    }
    out
}

/// The per-token quantizations (with or without their RMSNorm) whose
/// every reader is a ternary product reading them as its activations: a
/// one-token step skips their launch, and the products' one-token kernels
/// quantize the row themselves (each block reads it, which costs less
/// than a launch when one token is all there is).
fn quantize_into_products(g: &Graph) -> Vec<Value> {
    let mut readers = vec![(0usize, true); g.nodes.len()];
    for (_, node) in g.iter() {
        let product = matches!(node.op, Op::TernaryMatMul(_) | Op::TernaryGlu { .. } | Op::TernaryCat { .. });
        for (i, a) in node.args.iter().enumerate() {
            let r = &mut readers[a.index()];
            *r = (r.0 + 1, r.1 && product && i == 0);
        }
    }
    g.iter()
        .filter(|(v, node)| {
            let quantizes = matches!(node.op, Op::RmsNormQuant { scheme: ActQuant::PerToken, .. } | Op::QuantizeAct { scheme: ActQuant::PerToken });
            quantizes && readers[v.index()].0 > 0 && readers[v.index()].1 && !g.outputs.contains(v)
        })
        .map(|(v, _)| v)
        .collect()
}

/// Lowers an optimized graph for CUDA. `tiles` gives each matrix
/// product's tiles from its workload key. Keys and values go to a paged
/// cache of blocks of `1 << block_shift` positions, which the rows of a
/// step (of any number of sequences) find through their block tables.
/// `head` says how the output head's weights are read: as stored, or
/// (`q8`) quantized to int8 rows when the model is loaded, with the
/// activations quantized per token as the CPU does. Attention takes its
/// positions in chunks, and a one-token step's over blocks, as `split`
/// says ([`kernels::DecodeSplit::DEFAULT`] but in tests).
pub fn lower(
    g: &Graph,
    tiles: &dyn Fn(&crate::schedule::WorkloadKey) -> PhaseTiles,
    block_shift: u32,
    head: HeadQuant,
    split: kernels::DecodeSplit,
) -> Result<Program, String> {
    use kernels as k;
    use Arg::*;
    let mut b = Builder { kernels: Vec::new(), launches: Vec::new() };
    let mut chosen = Vec::new();
    let (rb, eb, nb) = (k::ROW_BLOCK, k::ELEMENT_BLOCK, k::NORM_BLOCK);
    let rotated = rope_into_attention(g);
    let scattered = cat_into_slices(g);
    let folded = quantize_into_products(g);
    for (v, node) in g.iter() {
        let refuse = |why: &str| Err(format!("{v} = {}: the CUDA backend {why}", node.op.mnemonic()));
        let ty = &node.ty;
        if !node.op.is_leaf() && ty.rank() != 2 {
            return refuse(&format!("computes rank-2 values (rows of tokens) only, not {ty}"));
        }
        let cols = ty.shape.last().map_or(1, |d| d.resolve(Extent::FIXED));
        let arg_ty = |i: usize| g.ty(node.args[i]);
        let ops: Vec<Arg> = (0..node.args.len()).map(Operand).collect();
        let with = |extra: &[Arg]| -> Vec<Arg> { ops.iter().chain(extra).copied().collect() };
        // A product of activations quantized by a launch that a one-token
        // step skips: the f32 rows (and norm weight) its kernels take, and
        // what each of its kernels does with them.
        let quantized_here = node.args.first().is_some_and(|a| folded.contains(a));
        let (fold, norm) = match node.args.first().map(|&a| &g.node(a).op) {
            Some(Op::RmsNormQuant { eps, .. }) if quantized_here => (vec![OperandOf(0, 0), OperandOf(0, 1)], Some(*eps)),
            _ if quantized_here => (vec![OperandOf(0, 0)], None),
            _ => (vec![], None),
        };
        let acts = |k: usize, one: bool| if quantized_here { k::Acts::Rows { k, norm, here: one } } else { k::Acts::Given };
        match &node.op {
            Op::Input { .. } | Op::Weight { .. } => {}
            Op::TernaryCat { parts, epilogue } => {
                let weights: Vec<usize> = (0..*parts).map(|j| 1 + j * (1 + epilogue.operands())).collect();
                let rows: Vec<usize> = weights.iter().map(|&i| arg_ty(i).shape[0].resolve(Extent::FIXED)).collect();
                let kk = arg_ty(1).shape[1].resolve(Extent::FIXED);
                let key = crate::schedule::Workload::Ternary { n: cols, k: kk }.key();
                let t = tiles(&key);
                chosen.push((v, key.0.clone(), t.to_string()));
                let mut args = Vec::new();
                for &i in &weights {
                    args.extend([Operand(i), Beta(i)]);
                    args.extend((i + 1..i + 1 + epilogue.operands()).map(Operand));
                }
                args.push(Operand(0));
                args.extend(&fold);
                let outs: Vec<k::Columns> = match scattered.iter().find(|c| c.0 == v) {
                    Some((_, slices)) => {
                        args.extend(slices.iter().map(|&s| ResultOf(s)));
                        rows.iter().map(|&width| k::Columns { width, start: 0 }).collect()
                    }
                    None => {
                        args.extend(std::iter::repeat_n(Output, *parts));
                        rows.iter().scan(0, |s, &r| Some(k::Columns { width: cols, start: std::mem::replace(s, *s + r) })).collect()
                    }
                };
                args.push(Rows(None));
                let code = |t, one| k::ternary_cat(&rows, padded(kk), epilogue.scale, &outs, acts(kk, one), t);
                b.product(v, "ternary_cat", cols, t, code, args);
            }
            Op::Slice { .. } if scattered.iter().any(|c| c.1.contains(&v)) => {}
            Op::Slice { start, len } => {
                let width = arg_ty(0).shape[1].resolve(Extent::FIXED);
                b.launch(v, "slice", k::slice(width, *start, *len), Grid::PerRow, rb, with(&[Output, Rows(None)]));
            }
            Op::Embed => {
                let t = arg_ty(0);
                let (vocab, hidden) = (t.shape[0].resolve(Extent::FIXED), t.shape[1].resolve(Extent::FIXED));
                b.launch(v, "embed", k::embed(device_float_type(t.dtype), vocab, hidden), Grid::PerRow, rb, with(&[Output, Rows(None)]));
            }
            Op::RmsNorm { eps } => {
                b.launch(v, "rms_norm", k::rms_norm(cols, *eps), Grid::PerRow, nb, with(&[Output, Rows(None)]));
            }
            Op::RmsNormQuant { eps, scheme: ActQuant::PerToken } => {
                b.launch(v, "rms_norm_quant", k::quantize_rows(cols, padded(cols), Some(*eps)), Grid::PerRow, nb, with(&[Output, Rows(None)]));
                b.launches.last_mut().expect("just pushed").skip_one_token = folded.contains(&v);
            }
            Op::QuantizeAct { scheme: ActQuant::PerToken } => {
                b.launch(v, "quantize_act", k::quantize_rows(cols, padded(cols), None), Grid::PerRow, nb, with(&[Output, Rows(None)]));
                b.launches.last_mut().expect("just pushed").skip_one_token = folded.contains(&v);
            }
            Op::QuantizeAct { .. } | Op::RmsNormQuant { .. } => return refuse("quantizes activations per token only (not llama.cpp's q8_k blocks)"),
            Op::TernaryMatMul(e) => {
                let w = arg_ty(1);
                let (n, kk) = (w.shape[0].resolve(Extent::FIXED), w.shape[1].resolve(Extent::FIXED));
                let key = crate::schedule::Workload::Ternary { n, k: kk }.key();
                let t = tiles(&key);
                chosen.push((v, key.0.clone(), t.to_string()));
                let ep = k::TernaryEpilogue { scale: e.scale, residual: e.residual };
                let mut args = vec![Operand(1), Beta(1), Operand(0)];
                args.extend(&fold);
                args.extend((2..node.args.len()).map(Operand));
                args.extend([Output, Rows(None)]);
                b.product(v, "ternary_matmul", n, t, |t, one| k::ternary_matmul(n, padded(kk), ep, acts(kk, one), t), args);
            }
            Op::TernaryGlu { act, epilogue } => {
                let w = arg_ty(1);
                let (n, kk) = (w.shape[0].resolve(Extent::FIXED), w.shape[1].resolve(Extent::FIXED));
                let key = crate::schedule::Workload::Ternary { n, k: kk }.key();
                let t = tiles(&key);
                chosen.push((v, key.0.clone(), t.to_string()));
                let up = epilogue.glu_up();
                let mut args = vec![Operand(1), Beta(1)];
                args.extend((2..up).map(Operand));
                args.extend([Operand(up), Beta(up)]);
                args.extend((up + 1..node.args.len()).map(Operand));
                args.push(Operand(0));
                args.extend(&fold);
                args.extend([Output, Rows(None)]);
                let code = |t, one| k::ternary_glu(n, padded(kk), *act, epilogue.scale, acts(kk, one), t);
                b.product(v, "ternary_glu", n, t, code, args);
            }
            Op::MatMul => {
                let (x, w) = (arg_ty(0), arg_ty(1));
                if x.dtype != DType::F32 {
                    return refuse("multiplies float weights by f32 activations only");
                }
                let (n, kk) = (w.shape[0].resolve(Extent::FIXED), w.shape[1].resolve(Extent::FIXED));
                let key = crate::schedule::Workload::Float { n, k: kk, dtype: w.dtype }.key();
                let t = tiles(&key);
                chosen.push((v, key.0.clone(), t.to_string()));
                match (head, crate::schedule::is_head(g, v)) {
                    (HeadQuant::Stored, _) | (_, false) => {
                        let ty = device_float_type(w.dtype);
                        b.product(v, "matmul", n, t, |t, _| k::matmul(ty, n, kk, t), vec![Operand(1), Operand(0), Output, Rows(None)]);
                    }
                    (HeadQuant::Q8, true) => {
                        b.launch(v, "quantize_act", k::quantize_rows(kk, padded(kk), None), Grid::PerRow, nb, vec![Operand(0), Scratch, Rows(Some(0))]);
                        b.product(v, "int8_matmul", n, t, |t, _| k::int8_matmul(n, padded(kk), t), vec![Int8Rows(1), Scratch, Output, Rows(None)]);
                    }
                    (HeadQuant::Q4, true) => return refuse("reads the head as stored or as int8 rows (--head q8), not in 4 bits"),
                }
            }
            Op::Rope { .. } if rotated.iter().any(|r| r.1.contains(&v)) => {}
            Op::Rope { mode, theta, head_dim } => {
                b.launch(v, "rope", k::rope(cols, *head_dim, *mode, *theta), Grid::PerRow, rb, with(&[Output, Rows(None)]));
            }
            Op::Attention { layer, heads, kv_heads, head_dim } => {
                let cache = [BlockTables, KeyCache(*layer), ValueCache(*layer)];
                let (h, kvh, d) = (*heads, *kv_heads, *head_dim);
                let rope = rotated.iter().find(|r| r.0 == v);
                match rope {
                    Some(&(_, [q, _], mode, theta)) => {
                        // The queries' and keys' RoPE and the store in one launch,
                        // which a one-token step leaves to the attention's kernel.
                        let code = k::rope_kv_store(h, kvh, d, mode, theta, block_shift);
                        let args = [&[OperandOf(0, 0), OperandOf(1, 0), Operand(2), Operand(3)][..], &cache, &[ResultOf(q), Rows(None)]].concat();
                        b.launch(v, "rope_kv_store", code, Grid::PerRow, rb, args);
                        b.launches.last_mut().expect("just pushed").skip_one_token = true;
                    }
                    None => {
                        let store = [&[Operand(1), Operand(2), Operand(3)][..], &cache, &[Rows(None)]].concat();
                        b.launch(v, "kv_store", k::kv_store(kvh, d, block_shift), Grid::PerRow, rb, store);
                    }
                }
                // One token's attention splits its positions over blocks.
                let own = |here| rope.map(|&(_, _, mode, theta)| k::OwnRope { mode, theta, here });
                let entry = b.kernel("attention", rb, k::attention(h, kvh, d, block_shift, own(false), split.positions, false));
                let one_token = Some(Variant {
                    entry: b.kernel("attention", rb, k::attention(h, kvh, d, block_shift, own(true), split.positions, true)),
                    grid: Grid::HeadsBySplits { heads: h, split },
                    block: rb,
                });
                let unrotated: &[Arg] = if rope.is_some() { &[OperandOf(0, 0), OperandOf(1, 0)] } else { &[] };
                b.launches.push(Launch {
                    value: v,
                    entry,
                    grid: Grid::HeadsByRows { heads: h },
                    block: rb,
                    args: [&ops[..], unrotated, &cache, &[Splits, Output, Rows(None)]].concat(),
                    one_token,
                    skip_one_token: false,
                });
            }
            Op::Unary(u) => b.launch(v, "unary", k::unary(*u, cols), Grid::Elements { row: cols }, eb, with(&[Output, Rows(None)])),
            Op::Binary(op) => {
                let (a, y) = (arg_ty(0), arg_ty(1));
                let b_len = if y.shape == a.shape { None } else { Some(y.shape.iter().map(|d| d.resolve(Extent::FIXED)).product()) };
                b.launch(v, "binary", k::binary(*op, cols, b_len), Grid::Elements { row: cols }, eb, with(&[Output, Rows(None)]));
            }
            Op::Glu { act } => b.launch(v, "glu", k::glu(*act, cols), Grid::Elements { row: cols }, eb, with(&[Output, Rows(None)])),
            Op::Softmax => b.launch(v, "softmax", k::softmax(cols), Grid::PerRow, rb, with(&[Output, Rows(None)])),
            Op::LastRow => {
                let grid = Grid::Fixed(cols.div_ceil(eb as usize) as u32);
                b.launch(v, "last_row", k::last_row(cols), grid, eb, vec![Operand(0), Output, Rows(Some(0))]);
            }
            Op::SelectRows => b.launch(v, "select_rows", k::select_rows(cols), Grid::PerRow, rb, vec![Operand(0), Operand(1), Output, Rows(None)]),
            Op::Cast { to } => {
                let to = match to {
                    DType::F16 => FloatType::F16,
                    DType::BF16 => FloatType::BF16,
                    _ => FloatType::F32,
                };
                b.launch(v, "cast", k::cast(to, cols), Grid::Elements { row: cols }, eb, with(&[Output, Rows(None)]));
            }
        }
    }
    Ok(Program { block_shift, kernels: b.kernels, launches: b.launches, tiles: chosen })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lowered(text: &str) -> (Graph, Program) {
        let g = bitnet_ir::parse(text).unwrap();
        let tiles = |_: &crate::schedule::WorkloadKey| PhaseTiles { prefill: CudaTiles::MMA_DEFAULT, decode: CudaTiles::DEFAULT };
        let p = lower(&g, &tiles, 4, HeadQuant::Stored, kernels::DecodeSplit::DEFAULT).unwrap();
        (g, p)
    }

    const CAT: &str = r#"graph "cat" {
    v0 = input "x" : f32[seq, 256]
    v1 = weight "norm" : f32[256]
    v2 = rms_norm_quant v0, v1 eps=1e-5 scheme=per_token : q8_row[seq, 256]
    v3 = weight "a" : i2_s[128, 256]
    v4 = weight "b" : i2_s[64, 256]
    v5 = ternary_cat v2, v3, v4 parts=2 : f32[seq, 192]
    v6 = slice v5 start=0 len=128 : f32[seq, 128]
    v7 = slice v5 start=128 len=64 : f32[seq, 64]
    output v6
    output v7
}"#;

    /// A cat whose slices follow it writes their values and they get no
    /// launch; with anything between them, or a slice that is not a
    /// whole part, it writes its own columns and each slice is a copy.
    #[test]
    fn a_cat_writes_its_slices_only_when_they_follow_it() {
        let (g, p) = lowered(CAT);
        assert_eq!(p.launches.len(), 2, "{:?}", p.launches);
        let cat = &p.launches[1];
        assert!(cat.entry.starts_with("ternary_cat_"));
        assert_eq!(cat.writes().collect::<Vec<_>>(), [Value(6), Value(7)]);
        assert!(matches!(g.node(Value(6)).op, Op::Slice { .. }));
        let apart = CAT.replace("    v7 = slice v5 start=128 len=64", "    v8 = relu v6 : f32[seq, 128]\n    v7 = slice v5 start=128 len=64");
        let part = CAT.replace("start=128 len=64 : f32[seq, 64]", "start=100 len=64 : f32[seq, 64]");
        for text in [apart, part] {
            let (_, p) = lowered(&text);
            let cat = p.launches.iter().find(|l| l.entry.starts_with("ternary_cat_")).unwrap();
            assert_eq!(cat.args.iter().filter(|a| **a == Arg::Output).count(), 2, "{text}");
            assert_eq!(p.launches.iter().filter(|l| l.entry.starts_with("slice_")).count(), 2, "{text}");
        }
    }
}
