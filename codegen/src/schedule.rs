//! The schedule pass: which kernel computes each node of an optimized
//! graph, and with which tiles.
//!
//! A kernel with tile knobs (today the matrix products) gets a workload key,
//! the canonical description of its work (op, weight type, dims), and tiles
//! from the first of: the user's pinned choice, a [`TileSource`] (the tuning
//! database), the heuristic. The step records where its tiles came from.
//! Ops the native kernels do not cover are refused here, with the reason,
//! before any weight is touched.

use crate::cpu::ternary::{Packing, TernaryTiles};
use crate::cpu::Isa;
use bitnet_ir::{ActQuant, DType, Extent, Graph, Op, Value};
use std::fmt;

/// The canonical description of a kernel's work: equal keys, same best tiles.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct WorkloadKey(pub String);

impl WorkloadKey {
    /// Whether the work is a ternary product (else a float one).
    pub fn is_ternary(&self) -> bool {
        self.0.starts_with("ternary_matmul")
    }
}

impl fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A kernel with tile knobs and the dims of its work. Every ternary type
/// is repacked into one layout, so the weight's stored type is not part
/// of a ternary workload; a float weight's type is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    /// `[s, k]` int8 activations times a packed ternary `[n, k]`.
    Ternary { n: usize, k: usize },
    /// `[s, k]` f32 activations times a float `[n, k]` weight.
    Float { n: usize, k: usize, dtype: DType },
}

impl Workload {
    pub fn key(&self) -> WorkloadKey {
        WorkloadKey(match self {
            Workload::Ternary { n, k } => format!("ternary_matmul n={n} k={k}"),
            Workload::Float { n, k, dtype } => format!("matmul n={n} k={k} w={dtype}"),
        })
    }

    /// The workload a key describes; `None` for a key this build does not know.
    pub fn parse(key: &WorkloadKey) -> Option<Workload> {
        let mut words = key.0.split(' ');
        let op = words.next()?;
        let mut field = |name: &str| words.next()?.strip_prefix(name)?.strip_prefix('=').map(String::from);
        let n = field("n")?.parse().ok()?;
        let k = field("k")?.parse().ok()?;
        let w = match op {
            "ternary_matmul" => Workload::Ternary { n, k },
            "matmul" => Workload::Float { n, k, dtype: DType::from_name(&field("w")?)? },
            _ => return None,
        };
        (words.next().is_none() && n > 0 && k > 0 && w.key() == *key).then_some(w)
    }

    pub fn is_ternary(&self) -> bool {
        matches!(self, Workload::Ternary { .. })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Tiles {
    Ternary(TernaryTiles),
    Float {
        isa: Isa,
    },
    /// A float weight quantized to int8 per row at load (`--head q8`): lossy.
    Int8 {
        isa: Isa,
    },
    /// A float weight quantized to 4 bits in groups of 32 at load
    /// (`--head q4`): lossy.
    Int4 {
        isa: Isa,
    },
    /// A matrix product on an NVIDIA GPU.
    Cuda(crate::cuda::CudaTiles),
}

impl Tiles {
    /// The CPU instruction set the tiles' kernel is written for (none for
    /// a GPU's).
    pub fn isa(&self) -> Option<Isa> {
        match *self {
            Tiles::Ternary(t) => Some(t.isa),
            Tiles::Float { isa } | Tiles::Int8 { isa } | Tiles::Int4 { isa } => Some(isa),
            Tiles::Cuda(_) => None,
        }
    }

    /// Whether this CPU has a kernel for these tiles.
    pub fn runs_here(&self) -> bool {
        match self {
            Tiles::Ternary(t) => t.is_valid(),
            Tiles::Float { isa } | Tiles::Int8 { isa } | Tiles::Int4 { isa } => isa.available(),
            Tiles::Cuda(_) => false,
        }
    }
}

impl fmt::Display for Tiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tiles::Ternary(t) => write!(f, "{t}"),
            Tiles::Float { isa } => write!(f, "isa={}", isa.name()),
            Tiles::Int8 { isa } => write!(f, "isa={} weights=int8", isa.name()),
            Tiles::Int4 { isa } => write!(f, "isa={} weights=int4", isa.name()),
            Tiles::Cuda(t) => write!(f, "{t}"),
        }
    }
}

/// Where a step's tiles came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TileOrigin {
    Pinned,
    Database,
    /// The heuristic's tiles with the ISA and packing this machine's
    /// calibration chose (a tuning database without this workload).
    Calibrated,
    Heuristic,
}

impl TileOrigin {
    pub fn name(self) -> &'static str {
        match self {
            TileOrigin::Pinned => "pinned",
            TileOrigin::Database => "database",
            TileOrigin::Calibrated => "calibrated",
            TileOrigin::Heuristic => "heuristic",
        }
    }
}

/// Tiles measured elsewhere, e.g. the autotuner's database.
pub trait TileSource {
    fn tiles(&self, key: &WorkloadKey) -> Option<Tiles>;

    /// The ISA and packing of the ternary products it has no tiles for:
    /// the machine's calibration, if it has one.
    fn ternary_default(&self) -> Option<TernaryTiles> {
        None
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Step {
    pub value: Value,
    pub key: WorkloadKey,
    pub tiles: Tiles,
    pub origin: TileOrigin,
}

/// The tiled steps of a graph, in graph order, and the instruction set of
/// the kernels without tile knobs (norms, RoPE, attention, elementwise
/// ops, the embedding lookup), which have no step.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    pub steps: Vec<Step>,
    pub isa: Isa,
}

impl Default for Schedule {
    fn default() -> Schedule {
        Schedule { steps: Vec::new(), isa: Isa::best() }
    }
}

impl Schedule {
    pub fn tiles(&self, v: Value) -> Option<Tiles> {
        self.steps.iter().find(|s| s.value == v).map(|s| s.tiles)
    }

    /// How the output head is read: quantized where a step reads
    /// quantized weights (only the head may be).
    pub fn head(&self) -> HeadQuant {
        self.steps
            .iter()
            .find_map(|s| match s.tiles {
                Tiles::Int8 { .. } => Some(HeadQuant::Q8),
                Tiles::Int4 { .. } => Some(HeadQuant::Q4),
                _ => None,
            })
            .unwrap_or_default()
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "schedule isa={} {{", self.isa.name())?;
        for s in &self.steps {
            writeln!(f, "    {} {}: {} ({})", s.value, s.key, s.tiles, s.origin.name())?;
        }
        writeln!(f, "}}")
    }
}

/// Choices fixed by the user; they win over everything else.
#[derive(Clone, Debug, Default)]
pub struct Pinned {
    pub ternary: Option<TernaryTiles>,
    pub isa: Option<Isa>,
    /// How the output head's weights are read.
    pub head: HeadQuant,
    /// How every ternary matrix is packed, whatever the tiles' source says.
    pub packing: Option<Packing>,
}

/// Whether `v` is the output head, the one product `--head` quantizes: a
/// float matrix product whose result is a graph output.
pub fn is_head(g: &Graph, v: Value) -> bool {
    let node = g.node(v);
    g.outputs.contains(&v) && matches!(node.op, Op::MatMul) && matches!(g.ty(node.args[1]).dtype, DType::F16 | DType::BF16 | DType::F32)
}

/// The output head as stored, or quantized when the model is loaded
/// (lossy: `bitnet perplexity --kl-divergence` measures by how much).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HeadQuant {
    #[default]
    Stored,
    /// int8 per row (`--head q8`): half the bytes of an f16 head.
    Q8,
    /// 4 bits in groups of 32 with f16 scales (`--head q4`): 28% of them.
    Q4,
}

/// A head's quantization by its name, or an error that lists the names.
impl std::str::FromStr for HeadQuant {
    type Err = String;

    fn from_str(s: &str) -> Result<HeadQuant, String> {
        bitnet_ir::names::parse_name("head", s, &HeadQuant::ALL, HeadQuant::name)
    }
}

impl HeadQuant {
    pub const ALL: [HeadQuant; 3] = [HeadQuant::Stored, HeadQuant::Q8, HeadQuant::Q4];

    pub fn name(self) -> &'static str {
        match self {
            HeadQuant::Stored => "stored",
            HeadQuant::Q8 => "q8",
            HeadQuant::Q4 => "q4",
        }
    }

    pub fn from_name(s: &str) -> Option<HeadQuant> {
        s.parse().ok()
    }

    /// The tiles a head read this way gets, if it is quantized.
    fn tiles(self, isa: Isa) -> Option<Tiles> {
        match self {
            HeadQuant::Stored => None,
            HeadQuant::Q8 => Some(Tiles::Int8 { isa }),
            HeadQuant::Q4 => Some(Tiles::Int4 { isa }),
        }
    }
}

/// The tiles a step gets when nothing else decides: the widest ISA, four
/// rows per step, and in prefill (or many sequences' decode) two tokens per
/// step on AVX2, four on AVX-512 VNNI, whose 32 registers hold the sixteen
/// accumulators (each ISA's fastest at the 2B4T shapes here: `cargo bench
/// -p bitnet-codegen --bench kernels -- ternary_gemm`).
pub fn heuristic(key: &WorkloadKey, isa: Isa) -> Tiles {
    if key.is_ternary() {
        Tiles::Ternary(ternary_heuristic(isa))
    } else {
        Tiles::Float { isa }
    }
}

/// [`heuristic`]'s tiles of a ternary product on `isa` (2-bit packing).
pub fn ternary_heuristic(isa: Isa) -> TernaryTiles {
    TernaryTiles::new(isa, 4, if isa == Isa::Avx512Vnni { 4 } else { 2 })
}

/// Schedules every node of `g` for the host CPU.
pub fn schedule(g: &Graph, pinned: &Pinned, source: Option<&dyn TileSource>) -> Result<Schedule, String> {
    let isa = pinned.isa.unwrap_or_else(Isa::best);
    isa.require()?;
    let mut steps = Vec::new();
    for (v, node) in g.iter() {
        let refuse = |why: &str| Err(format!("{v} = {}: the compiled backend {why}; run it with --backend interp", node.op.mnemonic()));
        let key = match &node.op {
            Op::QuantizeAct { scheme: ActQuant::Q8K } | Op::RmsNormQuant { scheme: ActQuant::Q8K, .. } => {
                return refuse("quantizes activations per token only (not llama.cpp's q8_k blocks)")
            }
            Op::TernaryMatMul(_) | Op::TernaryGlu { .. } | Op::TernaryCat { .. } | Op::MatMul => {
                let w = g.ty(node.args[1]);
                if matches!(node.op, Op::MatMul) && g.ty(node.args[0]).dtype == DType::Q8Row {
                    return refuse("multiplies float weights by float activations only");
                }
                // The rows of all of a ternary_cat's matrices are its work.
                let (n, k) = (node.ty.shape[1].resolve(Extent::FIXED), w.shape[1].resolve(Extent::FIXED));
                match node.op {
                    Op::MatMul => Workload::Float { n, k, dtype: w.dtype }.key(),
                    _ => Workload::Ternary { n, k }.key(),
                }
            }
            _ => continue,
        };
        let quantized_head = if is_head(g, v) { pinned.head.tiles(isa) } else { None };
        let (mut tiles, mut origin) = match (&node.op, pinned.ternary, quantized_head) {
            (Op::TernaryMatMul(_) | Op::TernaryGlu { .. } | Op::TernaryCat { .. }, Some(t), _) => (Tiles::Ternary(t), TileOrigin::Pinned),
            (Op::MatMul, _, Some(t)) => (t, TileOrigin::Pinned),
            // A pinned ISA takes the database's tiles only where they are of that ISA.
            // A pinned packing, likewise, takes them only where their ISA reads it.
            _ => {
                match source.and_then(|s| s.tiles(&key)).filter(|t| valid(t, &key) && pinned.isa.is_none_or(|i| t.isa() == Some(i)) && reads(t, pinned.packing))
                {
                    Some(t) => (t, TileOrigin::Database),
                    None => match source.and_then(|s| s.ternary_default()) {
                        Some(c) if key.is_ternary() && c.is_valid() && pinned.isa.is_none_or(|i| i == c.isa) => {
                            (Tiles::Ternary(TernaryTiles { packing: c.packing, ..ternary_heuristic(c.isa) }), TileOrigin::Calibrated)
                        }
                        _ => (heuristic(&key, isa), TileOrigin::Heuristic),
                    },
                }
            }
        };
        if let (Tiles::Ternary(t), Some(packing)) = (&mut tiles, pinned.packing) {
            (t.packing, origin) = (packing, TileOrigin::Pinned);
            if !t.is_valid() {
                return Err(format!(
                    "the {} kernels read {} weights only; {} weights need avx2, avx512vnni or scalar",
                    t.isa.name(),
                    Packing::Bits2.name(),
                    packing.name()
                ));
            }
        }
        if !valid(&tiles, &key) {
            return Err(format!("{v}: tiles {tiles} cannot run {key} on this CPU"));
        }
        steps.push(Step { value: v, key, tiles, origin });
    }
    Ok(Schedule { steps, isa })
}

/// Whether the kernels of `t` read weights packed as `packing` (any, if none is asked).
fn reads(t: &Tiles, packing: Option<Packing>) -> bool {
    match (t, packing) {
        (Tiles::Ternary(t), Some(packing)) => TernaryTiles { packing, ..*t }.is_valid(),
        _ => true,
    }
}

fn valid(t: &Tiles, key: &WorkloadKey) -> bool {
    matches!(t, Tiles::Ternary(_)) == key.is_ternary() && t.runs_here()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnet_ir::{Dim, TensorType};

    /// `x` quantized, times a ternary `[n, k]`.
    fn ternary_graph(n: usize, k: usize) -> Graph {
        let mut g = Graph::new("t");
        let x = g.leaf(Op::Input { name: "x".into() }, TensorType::new(DType::F32, [Dim::Seq, Dim::Const(k)]));
        let q = g.add(Op::QuantizeAct { scheme: ActQuant::PerToken }, &[x]).unwrap();
        let w = g.leaf(Op::Weight { name: "w".into() }, TensorType::fixed(DType::I2S, &[n, k]));
        let y = g.add(Op::TernaryMatMul(bitnet_ir::Epilogue { scale: false, residual: false }), &[q, w]).unwrap();
        g.outputs.push(y);
        g
    }

    /// The same tiles for every key, and a calibration.
    struct Fixed(Option<Tiles>, Option<TernaryTiles>);

    impl TileSource for Fixed {
        fn tiles(&self, _: &WorkloadKey) -> Option<Tiles> {
            self.0
        }
        fn ternary_default(&self) -> Option<TernaryTiles> {
            self.1
        }
    }

    /// A pinned packing takes the database's tiles only where their ISA
    /// reads it, else the calibration's; the calibration's ISA and packing
    /// go to a product the database lacks.
    #[test]
    fn pinned_packings_and_the_calibration_choose_readable_tiles() {
        let g = ternary_graph(256, 512);
        let ternary = |s: &Schedule| match s.steps[0].tiles {
            Tiles::Ternary(t) => (t, s.steps[0].origin),
            t => panic!("{t}"),
        };
        let base3 = Pinned { packing: Some(Packing::Base3), ..Default::default() };
        let calibrated = TernaryTiles { packing: Packing::Base3, ..TernaryTiles::new(Isa::Scalar, 2, 1) };
        if Isa::Cranelift.available() {
            let cranelift = Fixed(Some(Tiles::Ternary(TernaryTiles::new(Isa::Cranelift, 1, 1))), Some(calibrated));
            let (t, origin) = ternary(&schedule(&g, &base3, Some(&cranelift)).unwrap());
            assert!(t.isa != Isa::Cranelift && t.packing == Packing::Base3 && t.is_valid() && origin == TileOrigin::Pinned, "{t}");
            let (t, origin) = ternary(&schedule(&g, &Pinned::default(), Some(&cranelift)).unwrap());
            assert_eq!((t.isa, t.packing, origin), (Isa::Cranelift, Packing::Bits2, TileOrigin::Database));
        }
        let only_calibrated = Fixed(None, Some(calibrated));
        let (t, origin) = ternary(&schedule(&g, &Pinned::default(), Some(&only_calibrated)).unwrap());
        assert_eq!((t.isa, t.packing, origin), (Isa::Scalar, Packing::Base3, TileOrigin::Calibrated));
        // A pinned ISA other than the calibration's keeps the heuristic's tiles.
        let avx = Pinned { isa: Some(Isa::Cranelift), ..Default::default() };
        if Isa::Cranelift.available() {
            let (t, origin) = ternary(&schedule(&g, &avx, Some(&only_calibrated)).unwrap());
            assert_eq!((t.isa, t.packing, origin), (Isa::Cranelift, Packing::Bits2, TileOrigin::Heuristic));
        }
    }

    #[test]
    fn workload_keys_parse_back() {
        for w in [Workload::Ternary { n: 2560, k: 6912 }, Workload::Float { n: 128256, k: 2560, dtype: DType::F16 }] {
            assert_eq!(Workload::parse(&w.key()), Some(w));
        }
        for bad in
            ["", "ternary_matmul", "ternary_matmul n=0 k=3", "ternary_matmul n=1 k=2 w=f16", "matmul n=1 k=2 w=nope", "matmul k=2 n=1 w=f16", "conv n=1 k=1"]
        {
            assert_eq!(Workload::parse(&WorkloadKey(bad.into())), None, "{bad}");
        }
    }
}
