//! Architectures: the IR graph of each supported model family.
//!
//! | GGUF arch | FFN activation | RoPE | block extras |
//! |---|---|---|---|
//! | `llama` | SiLU | interleaved pairs (the converter permuted Q/K rows) | none |
//! | `bitnet` (llama.cpp) | SiLU | NEOX | BitLinear, sub-norms |
//! | `bitnet-b1.58`, `bitnet-25` (bitnet.cpp) | squared ReLU | NEOX | BitLinear, sub-norms |
//! | `llama` with ternary projections (bitnet.cpp's Falcon3, Falcon-E, Llama3-8B-1.58) | SiLU | interleaved | BitLinear |
//!
//! A `<arch>.hidden_activation` key in the file wins over the default.
//! BitLinear: activations quantized per token to int8 (absmax), multiplied
//! by the ternary weight, rescaled by β/γ; optional `blk.N.<proj>.scale`
//! tensors multiply the projection's output, as llama.cpp applies them.

use crate::model::{invalid, Model, ModelError};
use bitnet_ir::{ActQuant, BinaryOp, DType, Dim, Epilogue, Graph, Op, RopeMode, TensorType, UnaryOp, Value};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    /// llama.cpp's `bitnet`.
    BitNet,
    /// bitnet.cpp's `bitnet-b1.58` (BitNet b1.58 2B4T).
    BitNetB158,
    /// bitnet.cpp's `bitnet-25`: 2B4T as its bf16 converter path writes it,
    /// the same graph as `bitnet-b1.58` (docs/model-families.md).
    BitNet25,
}

impl Arch {
    pub fn from_name(s: &str) -> Option<Arch> {
        Some(match s {
            "llama" => Arch::Llama,
            "bitnet" => Arch::BitNet,
            "bitnet-b1.58" => Arch::BitNetB158,
            "bitnet-25" => Arch::BitNet25,
            _ => return None,
        })
    }
    pub fn is_bitnet(self) -> bool {
        self != Arch::Llama
    }
    pub fn default_activation(self) -> Activation {
        match self {
            Arch::Llama | Arch::BitNet => Activation::Silu,
            Arch::BitNetB158 | Arch::BitNet25 => Activation::Relu2,
        }
    }
    pub fn rope_mode(self) -> RopeMode {
        match self {
            Arch::Llama => RopeMode::Interleaved,
            _ => RopeMode::Neox,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// Squared ReLU, BitNet b1.58 2B4T's.
    Relu2,
}

impl Activation {
    pub fn from_name(s: &str) -> Option<Activation> {
        match s {
            "silu" | "swish" => Some(Activation::Silu),
            "relu2" | "relu_sqr" | "relu_squared" | "squared_relu" => Some(Activation::Relu2),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::Relu2 => "relu2",
        }
    }
}

/// How matrix products see their activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ActivationMode {
    /// The model's own numerics: BitLinear inputs quantized per token to
    /// int8 (BitNet b1.58); f32 everywhere else.
    #[default]
    Model,
    /// What llama.cpp's CPU backend does, per weight type: `Q8_K` blocks of
    /// 256 for TQ and k-quant weights, f16 (bf16) rounding for f16 (bf16)
    /// weights, f32 otherwise. For comparing with llama.cpp where the math
    /// is the same.
    LlamaCpp,
}

/// Which rows of the final hidden state the head turns into logits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Logits {
    /// The last row only (`last_row`).
    #[default]
    Last,
    /// Every row.
    All,
    /// The rows the input `out_rows` names (`select_rows`): the graph a
    /// batched step runs, rows of several sequences side by side.
    Picked,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct GraphOptions {
    pub logits: Logits,
    pub activations: ActivationMode,
    /// Overrides the architecture's RoPE mode (for experiments, such as
    /// proving that a comparison notices the wrong one).
    pub rope_mode: Option<RopeMode>,
}

struct Builder<'m> {
    g: Graph,
    model: &'m Model,
    mode: ActivationMode,
    /// Activations already converted for a weight type, to share them.
    converted: HashMap<(Value, DType), Value>,
}

impl Builder<'_> {
    fn op(&mut self, op: Op, args: &[Value]) -> Result<Value, ModelError> {
        self.g.add(op, args).map_err(|e| ModelError::Invalid(format!("building the graph: {e}")))
    }

    /// A weight that must exist with exactly this shape.
    fn weight(&mut self, name: &str, shape: &[usize]) -> Result<Value, ModelError> {
        match self.model.tensor_shape(name) {
            None => invalid(format!("tensor {name} is missing")),
            Some((dtype, s)) if s == shape => Ok(self.g.leaf(Op::Weight { name: name.into() }, TensorType::fixed(dtype, s))),
            Some((_, s)) => invalid(format!("tensor {name} has shape {s:?}, expected {shape:?}")),
        }
    }

    fn optional_weight(&mut self, name: &str, shape: &[usize]) -> Result<Option<Value>, ModelError> {
        match self.model.tensor_shape(name) {
            None => Ok(None),
            Some(_) => self.weight(name, shape).map(Some),
        }
    }

    /// In llama.cpp mode, converts f32 activations the way llama.cpp does
    /// for a weight of type `w`.
    fn input_for(&mut self, x: Value, w: DType) -> Result<Value, ModelError> {
        if self.mode != ActivationMode::LlamaCpp || self.g.ty(x).dtype != DType::F32 {
            return Ok(x);
        }
        let op = match w {
            DType::TQ1_0 | DType::TQ2_0 | DType::I2S | DType::Q4K | DType::Q6K => Op::QuantizeAct { scheme: ActQuant::Q8K },
            DType::F16 | DType::BF16 => Op::Cast { to: w },
            _ => return Ok(x),
        };
        if let Some(&v) = self.converted.get(&(x, w)) {
            return Ok(v);
        }
        let v = self.op(op, &[x])?;
        self.converted.insert((x, w), v);
        Ok(v)
    }

    /// `x · Wᵀ` for projection `blk.L.<proj>` of shape `[n, k]`, times its
    /// optional scale. In BitNet models `x` is already int8 (`q8_row`).
    fn linear(&mut self, x: Value, layer: usize, proj: &str, n: usize, k: usize) -> Result<Value, ModelError> {
        let w = self.weight(&format!("blk.{layer}.{proj}.weight"), &[n, k])?;
        let x = self.input_for(x, self.g.ty(w).dtype)?;
        let ternary = self.g.ty(w).dtype.is_ternary();
        let x_int8 = self.g.ty(x).dtype == DType::Q8Row;
        if ternary && !x_int8 {
            return invalid(format!(
                "blk.{layer}.{proj}.weight is ternary but blk.0.attn_q.weight is not: a mix of ternary and float projections is not supported"
            ));
        }
        let y = self.op(if ternary { Op::TernaryMatMul(Epilogue::NONE) } else { Op::MatMul }, &[x, w])?;
        match self.optional_weight(&format!("blk.{layer}.{proj}.scale"), &[1])? {
            Some(s) => self.op(Op::Binary(BinaryOp::Mul), &[y, s]),
            None => Ok(y),
        }
    }

    fn norm(&mut self, x: Value, name: &str, n: usize) -> Result<Value, ModelError> {
        let w = self.weight(name, &[n])?;
        self.op(Op::RmsNorm { eps: self.model.config.norm_eps }, &[x, w])
    }
}

pub(crate) fn build_graph(model: &Model, opts: &GraphOptions) -> Result<Graph, ModelError> {
    let c = &model.config;
    let bitnet = c.bitlinear && opts.activations == ActivationMode::Model;
    let mut b = Builder { g: Graph::new(c.arch_name.clone()), model, mode: opts.activations, converted: HashMap::new() };
    let seq = TensorType::new(DType::I32, [Dim::Seq]);
    let tokens = b.g.leaf(Op::Input { name: "tokens".into() }, seq.clone());
    let positions = b.g.leaf(Op::Input { name: "positions".into() }, seq);
    let embd = b.weight("token_embd.weight", &[c.vocab, c.hidden])?;
    let mut x = b.op(Op::Embed, &[embd, tokens])?;
    let (q_dim, kv_dim) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
    // BitLinear inputs are int8 per token; plain models keep f32.
    let act_in = |b: &mut Builder, v: Value| if bitnet { b.op(Op::QuantizeAct { scheme: ActQuant::PerToken }, &[v]) } else { Ok(v) };
    for l in 0..c.layers {
        let a = b.norm(x, &format!("blk.{l}.attn_norm.weight"), c.hidden)?;
        let a = act_in(&mut b, a)?;
        let q = b.linear(a, l, "attn_q", q_dim, c.hidden)?;
        let k = b.linear(a, l, "attn_k", kv_dim, c.hidden)?;
        let v = b.linear(a, l, "attn_v", kv_dim, c.hidden)?;
        let rope = Op::Rope { mode: opts.rope_mode.unwrap_or(c.rope_mode), theta: c.rope_theta, head_dim: c.head_dim };
        let q = b.op(rope.clone(), &[q, positions])?;
        let k = b.op(rope, &[k, positions])?;
        let attn = Op::Attention { layer: l, heads: c.heads, kv_heads: c.kv_heads, head_dim: c.head_dim };
        let mut o = b.op(attn, &[q, k, v, positions])?;
        if c.sub_norms {
            o = b.norm(o, &format!("blk.{l}.attn_sub_norm.weight"), q_dim)?;
        }
        let o = act_in(&mut b, o)?;
        let o = b.linear(o, l, "attn_output", c.hidden, q_dim)?;
        let h = b.op(Op::Binary(BinaryOp::Add), &[x, o])?;

        let f = b.norm(h, &format!("blk.{l}.ffn_norm.weight"), c.hidden)?;
        let f = act_in(&mut b, f)?;
        let gate = b.linear(f, l, "ffn_gate", c.ffn, c.hidden)?;
        let up = b.linear(f, l, "ffn_up", c.ffn, c.hidden)?;
        let gate = match c.activation {
            Activation::Silu => b.op(Op::Unary(UnaryOp::Silu), &[gate])?,
            Activation::Relu2 => {
                let r = b.op(Op::Unary(UnaryOp::Relu), &[gate])?;
                b.op(Op::Unary(UnaryOp::Square), &[r])?
            }
        };
        let mut m = b.op(Op::Binary(BinaryOp::Mul), &[gate, up])?;
        if c.sub_norms {
            m = b.norm(m, &format!("blk.{l}.ffn_sub_norm.weight"), c.ffn)?;
        }
        let m = act_in(&mut b, m)?;
        let down = b.linear(m, l, "ffn_down", c.hidden, c.ffn)?;
        x = b.op(Op::Binary(BinaryOp::Add), &[h, down])?;
    }
    let mut y = b.norm(x, "output_norm.weight", c.hidden)?;
    match opts.logits {
        Logits::Last => y = b.op(Op::LastRow, &[y])?,
        Logits::All => {}
        Logits::Picked => {
            let rows = b.g.leaf(Op::Input { name: "out_rows".into() }, TensorType::new(DType::I32, [Dim::Out]));
            y = b.op(Op::SelectRows, &[y, rows])?;
        }
    }
    let head_name = if c.tied_head { "token_embd.weight" } else { "output.weight" };
    let head = if c.tied_head { embd } else { b.weight(head_name, &[c.vocab, c.hidden])? };
    if b.g.ty(head).dtype.is_ternary() {
        return invalid(format!("{head_name} is ternary; the output head must be a float or k-quant type"));
    }
    let y = b.input_for(y, b.g.ty(head).dtype)?;
    let logits = b.op(Op::MatMul, &[y, head])?;
    b.g.outputs.push(logits);
    bitnet_ir::verify(&b.g).map_err(|e| ModelError::Invalid(format!("graph check: {e}")))?;
    Ok(b.g)
}
