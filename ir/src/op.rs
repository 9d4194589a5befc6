//! The closed set of operations.
//!
//! An [`Op`] holds only its attributes; operands live in the [`crate::Node`]
//! so that passes can walk any node's inputs without matching on the op.
//! Each op's type rule is in [`Op::infer`], its meaning in the interpreter.

use crate::{DType, Dim, TensorType};
use serde::{Deserialize, Serialize};

/// How RoPE pairs the dims of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RopeMode {
    /// Adjacent pairs `(2i, 2i + 1)` (llama.cpp's NORM, GGUF `llama`).
    Interleaved,
    /// Halves `(i, i + d/2)`, "rotate half" (llama.cpp's NEOX, HF).
    Neox,
}

impl RopeMode {
    pub fn name(self) -> &'static str {
        match self {
            RopeMode::Interleaved => "interleaved",
            RopeMode::Neox => "neox",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        [RopeMode::Interleaved, RopeMode::Neox].into_iter().find(|m| m.name() == s)
    }
}

/// How activations are quantized to int8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ActQuant {
    /// BitNet's: one scale per row (token), γ = 127 / max|x|, round half
    /// away from zero, clamp to [-128, 127].
    PerToken,
    /// llama.cpp's `Q8_K`, used for its TQ and k-quant dot products: one
    /// scale per 256 values, γ = -127 / x_m where x_m is the signed value of
    /// largest magnitude, round half to even, clamp above at 127.
    Q8K,
}

impl ActQuant {
    pub fn name(self) -> &'static str {
        match self {
            ActQuant::PerToken => "per_token",
            ActQuant::Q8K => "q8_k",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        [ActQuant::PerToken, ActQuant::Q8K].into_iter().find(|m| m.name() == s)
    }
}

/// What a ternary matmul does to its result before storing it, in order:
/// times a stored scalar (`blk.N.<proj>.scale`), plus a residual. Each
/// present part adds one operand after the weight, in that order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Epilogue {
    pub scale: bool,
    pub residual: bool,
}

impl Epilogue {
    pub const NONE: Epilogue = Epilogue { scale: false, residual: false };

    /// `scale+residual`, `scale`, `residual`, or `none`.
    pub fn name(self) -> String {
        let parts: Vec<&str> = [(self.scale, "scale"), (self.residual, "residual")].iter().filter(|p| p.0).map(|p| p.1).collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join("+")
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        let mut e = Epilogue::NONE;
        for part in s.split('+') {
            match part {
                "scale" if !e.scale => e.scale = true,
                "residual" if !e.residual => e.residual = true,
                "none" if s == "none" => {}
                _ => return None,
            }
        }
        Some(e)
    }
    /// The operands the epilogue adds after the weight.
    pub fn operands(self) -> usize {
        self.scale as usize + self.residual as usize
    }

    /// In a `ternary_glu` with this epilogue, the index of the up weight:
    /// after the activations, the gate weight and the gate's epilogue
    /// operands.
    pub fn glu_up(self) -> usize {
        2 + self.operands()
    }

    /// A `ternary_cat`'s operands as those of its `ternary_matmul`s:
    /// `(x, w₁, ..)`, `(x, w₂, ..)`, ….
    pub fn cat_products<T: Copy>(self, args: &[T]) -> Vec<Vec<T>> {
        args[1..].chunks(1 + self.operands()).map(|part| [&args[..1], part].concat()).collect()
    }

    /// A `ternary_glu`'s operands as those of its two `ternary_matmul`s:
    /// `(x, gate, ..)` and `(x, up, ..)`.
    pub fn glu_products<T: Copy>(self, args: &[T]) -> (Vec<T>, Vec<T>) {
        let up = self.glu_up();
        (args[..up].to_vec(), [&args[..1], &args[up..]].concat())
    }
}

/// The activation of a gated unit: `act(gate) * up`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GateAct {
    Silu,
    /// Squared ReLU, BitNet b1.58's.
    Relu2,
}

impl GateAct {
    pub fn name(self) -> &'static str {
        match self {
            GateAct::Silu => "silu",
            GateAct::Relu2 => "relu2",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        [GateAct::Silu, GateAct::Relu2].into_iter().find(|m| m.name() == s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UnaryOp {
    Silu,
    Relu,
    Square,
    Exp,
    Neg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// A graph input, bound by name at evaluation (`tokens`, `positions`).
    Input {
        name: String,
    },
    /// A stored tensor, looked up by name in the weight source.
    Weight {
        name: String,
    },
    /// `(table [V, H], ids i32[S]) -> f32[S, H]`: rows of the table.
    Embed,
    /// `(x f32[.., H], w [H]) -> f32`: `x / sqrt(mean(x²) + eps) * w` per row.
    RmsNorm {
        eps: f32,
    },
    /// `x f32[S, K] -> q8_row[S, K]`: int8 values with scales, per row
    /// (BitNet's activations) or per block of 256 (llama.cpp's `Q8_K`).
    QuantizeAct {
        scheme: ActQuant,
    },
    /// `(x f32|f16|bf16|q8_row [S, K], w [N, K]) -> f32[S, N]`: `x · wᵀ`, weights
    /// dequantized; f16/bf16 activations are f32 values rounded to that type.
    MatMul,
    /// `(x q8_row[S, K], w ternary[N, K], [scale [1]], [residual f32[S, N]]) -> f32[S, N]`:
    /// integer dot products of codes and int8 activations, times the weight
    /// scale, over γ; then the [`Epilogue`].
    TernaryMatMul(Epilogue),
    /// `(x q8_row[S, K], w₁ ternary[N₁, K], [s₁ [1]], w₂, [s₂], …) -> f32[S, N₁ + N₂ + …]`:
    /// the products of one activation with `parts` weights, their results
    /// side by side in each row: `ternary_matmul(x, wᵢ, sᵢ)` for each, as
    /// one product (q, k and v; made by the fuse pass, read back through
    /// `slice`). The epilogue (scale only) applies to every part.
    TernaryCat {
        parts: usize,
        epilogue: Epilogue,
    },
    /// `(x f32[S, N]) -> f32[S, len]`: the columns `start..start + len`.
    Slice {
        start: usize,
        len: usize,
    },
    /// `(x q8_row[S, K], gate ternary[N, K], [gate scale [1]], up ternary[N, K],
    /// [up scale [1]]) -> f32[S, N]`: `glu(act, ternary_matmul(x, gate),
    /// ternary_matmul(x, up))`, the gate and up projections as one product
    /// over one activation, with the gated unit in its epilogue (made by the
    /// fuse pass). The epilogue (scale only) applies to both products.
    TernaryGlu {
        act: GateAct,
        epilogue: Epilogue,
    },
    /// `(x f32[S, K], w [K]) -> q8_row[S, K]`: `rms_norm` then `quantize_act`,
    /// one pass over each row (made by the fuse pass).
    RmsNormQuant {
        eps: f32,
        scheme: ActQuant,
    },
    /// `(gate f32, up f32) -> f32`: `act(gate) * up`, elementwise (made by
    /// the fuse pass).
    Glu {
        act: GateAct,
    },
    /// `(x f32[S, H*D], positions i32[S]) -> f32[S, H*D]`.
    Rope {
        mode: RopeMode,
        theta: f32,
        head_dim: usize,
    },
    /// `(q f32[S, H*D], k f32[S, KV*D], v f32[S, KV*D], positions i32[S]) -> f32[S, H*D]`.
    /// Stores k and v into layer `layer`'s cache at `positions`, then each
    /// query attends causally to every cached position up to its own.
    Attention {
        layer: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    },
    Unary(UnaryOp),
    /// Elementwise; the right operand may also be a row `[N]` or a scalar `[1]`.
    Binary(BinaryOp),
    /// Softmax over the last axis.
    Softmax,
    /// `f32[S, N] -> f32[1, N]`: the last row only.
    LastRow,
    /// `f32[S, N], i32[O] -> f32[O, N]`: the rows named by the indices, in
    /// their order (the rows of a batch whose logits are wanted).
    SelectRows,
    /// Converts between float types.
    Cast {
        to: DType,
    },
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 5] = [UnaryOp::Silu, UnaryOp::Relu, UnaryOp::Square, UnaryOp::Exp, UnaryOp::Neg];
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Silu => "silu",
            UnaryOp::Relu => "relu",
            UnaryOp::Square => "square",
            UnaryOp::Exp => "exp",
            UnaryOp::Neg => "neg",
        }
    }
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 4] = [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div];
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
        }
    }
}

impl Op {
    /// The op's name in the text form.
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Weight { .. } => "weight",
            Op::Embed => "embed",
            Op::RmsNorm { .. } => "rms_norm",
            Op::QuantizeAct { .. } => "quantize_act",
            Op::MatMul => "matmul",
            Op::TernaryMatMul(_) => "ternary_matmul",
            Op::TernaryGlu { .. } => "ternary_glu",
            Op::TernaryCat { .. } => "ternary_cat",
            Op::Slice { .. } => "slice",
            Op::RmsNormQuant { .. } => "rms_norm_quant",
            Op::Glu { .. } => "glu",
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::Softmax => "softmax",
            Op::LastRow => "last_row",
            Op::SelectRows => "select_rows",
            Op::Cast { .. } => "cast",
        }
    }

    /// Leaves carry a declared type instead of an inferred one.
    pub fn is_leaf(&self) -> bool {
        matches!(self, Op::Input { .. } | Op::Weight { .. })
    }

    /// Whether operand `i` is a ternary weight that the kernels read in
    /// their packed layout.
    pub fn reads_packed(&self, i: usize) -> bool {
        match self {
            Op::TernaryMatMul(_) => i == 1,
            Op::TernaryGlu { epilogue, .. } => i == 1 || i == epilogue.glu_up(),
            Op::TernaryCat { epilogue, .. } => i >= 1 && (i - 1).is_multiple_of(1 + epilogue.operands()),
            _ => false,
        }
    }

    /// The number of operands the op takes.
    pub fn arity(&self) -> usize {
        match self {
            Op::Input { .. } | Op::Weight { .. } => 0,
            Op::QuantizeAct { .. } | Op::Unary(_) | Op::Softmax | Op::LastRow | Op::Cast { .. } | Op::Slice { .. } => 1,
            Op::Embed | Op::SelectRows | Op::RmsNorm { .. } | Op::RmsNormQuant { .. } | Op::MatMul | Op::Rope { .. } | Op::Binary(_) | Op::Glu { .. } => 2,
            Op::TernaryMatMul(e) => 2 + e.operands(),
            Op::TernaryGlu { epilogue, .. } => 2 * epilogue.glu_up() - 1,
            Op::TernaryCat { parts, epilogue } => parts.saturating_mul(1 + epilogue.operands()).saturating_add(1),
            Op::Attention { .. } => 4,
        }
    }

    /// The result type of this op on operands of the given types.
    pub fn infer(&self, args: &[&TensorType]) -> Result<TensorType, String> {
        if args.len() != self.arity() {
            return Err(format!("{} takes {} operands, got {}", self.mnemonic(), self.arity(), args.len()));
        }
        let f32_rows = |t: &TensorType, what: &str| -> Result<(), String> {
            if t.dtype != DType::F32 || t.rank() != 2 {
                return Err(format!("{what} must be f32[rows, n], got {t}"));
            }
            Ok(())
        };
        let positions = |t: &TensorType, rows: Dim| -> Result<(), String> {
            if t.dtype != DType::I32 || t.shape != [rows] {
                return Err(format!("positions must be i32[{rows}], got {t}"));
            }
            Ok(())
        };
        match self {
            Op::Input { .. } | Op::Weight { .. } => Err(format!("{} has a declared type", self.mnemonic())),
            Op::Embed => {
                let (table, ids) = (args[0], args[1]);
                if !table.dtype.is_weight() || table.rank() != 2 {
                    return Err(format!("embedding table must be a 2-d weight, got {table}"));
                }
                if ids.dtype != DType::I32 || ids.rank() != 1 {
                    return Err(format!("embedding ids must be i32[n], got {ids}"));
                }
                Ok(TensorType::new(DType::F32, [ids.shape[0], table.shape[1]]))
            }
            Op::RmsNorm { .. } | Op::RmsNormQuant { .. } => {
                let (x, w) = (args[0], args[1]);
                if x.dtype != DType::F32 || x.rank() == 0 {
                    return Err(format!("rms_norm input must be f32, got {x}"));
                }
                if !w.dtype.is_float() || w.shape != [x.last().unwrap()] {
                    return Err(format!("rms_norm weight must be a float [{}], got {w}", x.last().unwrap()));
                }
                match self {
                    Op::RmsNormQuant { scheme, .. } => Op::QuantizeAct { scheme: *scheme }.infer(&[x]),
                    _ => Ok(x.clone()),
                }
            }
            Op::QuantizeAct { scheme } => {
                f32_rows(args[0], "quantize_act input")?;
                if *scheme == ActQuant::Q8K && !matches!(args[0].shape[1], Dim::Const(k) if k % 256 == 0) {
                    return Err(format!("quantize_act q8_k needs rows of a multiple of 256, got {}", args[0]));
                }
                Ok(TensorType::new(DType::Q8Row, args[0].shape.clone()))
            }
            Op::TernaryGlu { act: _, epilogue } => {
                if epilogue.residual {
                    return Err("ternary_glu has no residual epilogue".into());
                }
                let (gate, up) = epilogue.glu_products(args);
                let g = Op::TernaryMatMul(*epilogue).infer(&gate).map_err(|e| format!("ternary_glu gate: {e}"))?;
                let u = Op::TernaryMatMul(*epilogue).infer(&up).map_err(|e| format!("ternary_glu up: {e}"))?;
                if g != u {
                    return Err(format!("ternary_glu: gate gives {g}, up {u}"));
                }
                Ok(g)
            }
            Op::TernaryCat { parts, epilogue } => {
                if epilogue.residual || *parts == 0 {
                    return Err("ternary_cat takes one or more parts and has no residual epilogue".into());
                }
                let mut n = 0;
                for (i, part) in epilogue.cat_products(args).iter().enumerate() {
                    let y = Op::TernaryMatMul(*epilogue).infer(part).map_err(|e| format!("ternary_cat part {i}: {e}"))?;
                    let Dim::Const(c) = y.shape[1] else { return Err(format!("ternary_cat part {i} has no fixed width: {y}")) };
                    n += c;
                }
                Ok(TensorType::new(DType::F32, [args[0].shape[0], Dim::Const(n)]))
            }
            Op::Slice { start, len } => {
                f32_rows(args[0], "slice input")?;
                match args[0].shape[1] {
                    Dim::Const(n) if *len > 0 && start.checked_add(*len).is_some_and(|end| end <= n) => {
                        Ok(TensorType::new(DType::F32, [args[0].shape[0], Dim::Const(*len)]))
                    }
                    w => Err(format!("slice of {len} from {start} is not within a row of {w}")),
                }
            }
            Op::MatMul | Op::TernaryMatMul(_) => {
                let (x, w) = (args[0], args[1]);
                let ternary = matches!(self, Op::TernaryMatMul(_));
                let x_ok = if ternary { x.dtype == DType::Q8Row } else { matches!(x.dtype, DType::F32 | DType::F16 | DType::BF16 | DType::Q8Row) };
                if !x_ok || x.rank() != 2 {
                    return Err(format!("{} activations have the wrong type {x}", self.mnemonic()));
                }
                let w_ok = if ternary { w.dtype.is_ternary() } else { w.dtype.is_weight() };
                if !w_ok || w.rank() != 2 {
                    return Err(format!("{} weight has the wrong type {w}", self.mnemonic()));
                }
                if x.shape[1] != w.shape[1] {
                    return Err(format!("{}: inner dims differ: {x} · {w}ᵀ", self.mnemonic()));
                }
                let y = TensorType::new(DType::F32, [x.shape[0], w.shape[0]]);
                if let Op::TernaryMatMul(e) = self {
                    let mut extra = args[2..].iter();
                    if e.scale {
                        let s = extra.next().unwrap();
                        if !s.dtype.is_float() || s.shape != [Dim::Const(1)] {
                            return Err(format!("ternary_matmul scale must be a float [1], got {s}"));
                        }
                    }
                    if e.residual {
                        let r = extra.next().unwrap();
                        if **r != y {
                            return Err(format!("ternary_matmul residual must be {y}, got {r}"));
                        }
                    }
                }
                Ok(y)
            }
            Op::Rope { head_dim, .. } => {
                let x = args[0];
                f32_rows(x, "rope input")?;
                positions(args[1], x.shape[0])?;
                match x.shape[1] {
                    Dim::Const(n) if *head_dim > 0 && head_dim % 2 == 0 && n % head_dim == 0 => Ok(x.clone()),
                    _ => Err(format!("rope: row {} is not a whole number of heads of even size {head_dim}", x.shape[1])),
                }
            }
            Op::Attention { heads, kv_heads, head_dim, .. } => {
                let (q, k, v) = (args[0], args[1], args[2]);
                for (t, what) in [(q, "q"), (k, "k"), (v, "v")] {
                    f32_rows(t, what)?;
                    if t.shape[0] != q.shape[0] {
                        return Err(format!("attention: {what} has {} rows, q has {}", t.shape[0], q.shape[0]));
                    }
                }
                positions(args[3], q.shape[0])?;
                if *kv_heads == 0 || heads % kv_heads != 0 {
                    return Err(format!("attention: {heads} heads is not a multiple of {kv_heads} kv heads"));
                }
                if q.shape[1] != Dim::Const(heads * head_dim) {
                    return Err(format!("attention: q row is {}, expected {heads}×{head_dim}", q.shape[1]));
                }
                for t in [k, v] {
                    if t.shape[1] != Dim::Const(kv_heads * head_dim) {
                        return Err(format!("attention: k/v row is {}, expected {kv_heads}×{head_dim}", t.shape[1]));
                    }
                }
                Ok(q.clone())
            }
            Op::Unary(_) | Op::Softmax => {
                if args[0].dtype != DType::F32 {
                    return Err(format!("{} needs f32, got {}", self.mnemonic(), args[0]));
                }
                Ok(args[0].clone())
            }
            Op::Binary(_) => {
                let (a, b) = (args[0], args[1]);
                if a.dtype != DType::F32 || !b.dtype.is_float() {
                    return Err(format!("{}: needs f32 and a float, got {a} and {b}", self.mnemonic()));
                }
                let broadcast = b.shape == a.shape || b.shape == [Dim::Const(1)] || (b.rank() == 1 && a.last() == b.last());
                if !broadcast {
                    return Err(format!("{}: {b} does not broadcast to {a}", self.mnemonic()));
                }
                Ok(a.clone())
            }
            Op::Glu { .. } => {
                let (gate, up) = (args[0], args[1]);
                if gate.dtype != DType::F32 || gate != up {
                    return Err(format!("glu needs two f32 operands of one shape, got {gate} and {up}"));
                }
                Ok(gate.clone())
            }
            Op::LastRow => {
                f32_rows(args[0], "last_row input")?;
                Ok(TensorType::new(DType::F32, [Dim::Const(1), args[0].shape[1]]))
            }
            Op::SelectRows => {
                f32_rows(args[0], "select_rows input")?;
                if args[1].dtype != DType::I32 || args[1].rank() != 1 {
                    return Err(format!("select_rows takes i32 row indices, got {}", args[1]));
                }
                Ok(TensorType::new(DType::F32, [args[1].shape[0], args[0].shape[1]]))
            }
            Op::Cast { to } => {
                if !args[0].dtype.is_float() || !to.is_float() {
                    return Err(format!("cast is between float types, got {} to {to}", args[0]));
                }
                Ok(TensorType::new(*to, args[0].shape.clone()))
            }
        }
    }
}
