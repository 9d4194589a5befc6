//! The reference interpreter: runs a graph with plain scalar code.
//!
//! Every op's meaning is written here once, as directly as possible; the
//! compiled kernels of later passes are tested against it. The only
//! concession to speed is that matrix products split their output rows
//! over threads, which does not change any result.

pub mod kernels;
pub mod kv;
pub mod math;

pub use kv::{KvCache, KvElem, KvHead, KvPages, KvStore, KvType, KvView, PagedRows};

use crate::quant::{i2s_scale, RowView};
use crate::{DType, Graph, Op, TensorType};
use std::collections::HashMap;

/// A stored tensor, borrowed from wherever the weights live (usually a
/// memory-mapped model file). `shape` is row-major: `[rows, row_len]`.
#[derive(Clone, Debug)]
pub struct WeightView<'a> {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

impl<'a> WeightView<'a> {
    pub fn elems(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
    pub fn rows(&self) -> usize {
        self.elems() / self.row_len().max(1)
    }
    /// Row `r`, ready to dequantize or unpack.
    pub fn row(&self, r: usize) -> RowView<'a> {
        let row_bytes = self.dtype.row_bytes(self.row_len()).expect("a checked weight's rows fit its type");
        let tensor_scale = if self.dtype == DType::I2S { i2s_scale(self.data, self.rows() * row_bytes) } else { 1.0 };
        RowView { dtype: self.dtype, bytes: &self.data[r * row_bytes..(r + 1) * row_bytes], tensor_scale }
    }
    /// The whole tensor as f32 (for small tensors: norms, scales).
    pub fn to_f32(&self) -> Vec<f32> {
        let k = self.row_len();
        let mut out = vec![0f32; self.elems()];
        for (r, o) in out.chunks_exact_mut(k.max(1)).enumerate() {
            self.row(r).dequantize(o);
        }
        out
    }
}

/// Where the interpreter finds weights by name.
pub trait WeightSource {
    fn weight(&self, name: &str) -> Option<WeightView<'_>>;

    /// Says the caller is done with a tensor's stored bytes for now (it
    /// made its own copy in another layout). A memory-mapped source may
    /// drop those pages; reading the tensor again brings them back.
    fn release(&self, _name: &str) {}
}

impl WeightSource for HashMap<String, (DType, Vec<usize>, Vec<u8>)> {
    fn weight(&self, name: &str) -> Option<WeightView<'_>> {
        self.get(name).map(|(dtype, shape, data)| WeightView { dtype: *dtype, shape: shape.clone(), data })
    }
}

/// A value computed by the interpreter.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    F32 {
        shape: Vec<usize>,
        data: Vec<f32>,
    },
    I32 {
        shape: Vec<usize>,
        data: Vec<i32>,
    },
    /// int8 values with one scale γ per `block` values of a row: `x ≈ q / γ`.
    Q8Row {
        shape: Vec<usize>,
        q: Vec<i8>,
        gamma: Vec<f32>,
        block: usize,
    },
}

impl Tensor {
    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32 { shape, .. } | Tensor::I32 { shape, .. } | Tensor::Q8Row { shape, .. } => shape,
        }
    }
    pub fn ids(data: Vec<i32>) -> Tensor {
        Tensor::I32 { shape: vec![data.len()], data }
    }
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor::F32 { shape, data }
    }
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            Tensor::F32 { data, .. } => Some(data),
            _ => None,
        }
    }
    fn dtype(&self) -> DType {
        match self {
            Tensor::F32 { .. } => DType::F32,
            Tensor::I32 { .. } => DType::I32,
            Tensor::Q8Row { .. } => DType::Q8Row,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(pub String);

fn eval_err<T>(msg: impl Into<String>) -> Result<T, EvalError> {
    Err(EvalError(msg.into()))
}

/// An evaluation-time value: computed, or a borrowed weight.
enum Slot<'w> {
    Empty,
    Tensor(Tensor),
    Weight(WeightView<'w>),
}

pub struct Interpreter<'w> {
    pub weights: &'w dyn WeightSource,
    pub threads: usize,
}

impl<'w> Interpreter<'w> {
    pub fn new(weights: &'w dyn WeightSource, threads: usize) -> Self {
        Interpreter { weights, threads: threads.max(1) }
    }

    /// Checks that every weight the graph reads exists with its declared
    /// dtype and shape, and holds enough bytes.
    pub fn check_weights(&self, g: &Graph) -> Result<(), EvalError> {
        for (v, node) in g.iter() {
            if let Op::Weight { name } = &node.op {
                self.lookup(name, &node.ty).map_err(|e| EvalError(format!("{v}: {}", e.0)))?;
            }
        }
        Ok(())
    }

    fn lookup(&self, name: &str, ty: &TensorType) -> Result<WeightView<'w>, EvalError> {
        let Some(w) = self.weights.weight(name) else { return eval_err(format!("missing tensor {name}")) };
        let want = ty.resolve(crate::shape::Extent::FIXED);
        if w.dtype != ty.dtype || w.shape != want {
            return eval_err(format!("tensor {name} is {}{:?}, the graph expects {ty}", w.dtype, w.shape));
        }
        match w.dtype.tensor_bytes(&w.shape) {
            Some(n) if n <= w.data.len() => Ok(w),
            _ => eval_err(format!("tensor {name} has {} bytes, too few for {}{:?}", w.data.len(), w.dtype, w.shape)),
        }
    }

    /// Evaluates the graph on named inputs; returns its outputs in order.
    pub fn eval(&self, g: &Graph, inputs: &[(&str, Tensor)], kv: &mut dyn KvStore) -> Result<Vec<Tensor>, EvalError> {
        let extent = input_extent(g, inputs.iter().map(|(n, t)| (*n, t.shape().first().copied().unwrap_or(0))));
        let mut slots: Vec<Slot<'w>> = Vec::with_capacity(g.nodes.len());
        let mut uses = vec![0usize; g.nodes.len()];
        for n in &g.nodes {
            for a in &n.args {
                uses[a.index()] += 1;
            }
        }
        for o in &g.outputs {
            uses[o.index()] += 1;
        }
        for (v, node) in g.iter() {
            let ctx = |e: EvalError| EvalError(format!("{v} = {}: {}", node.op.mnemonic(), e.0));
            let slot = match &node.op {
                Op::Input { name } => {
                    let Some((_, t)) = inputs.iter().find(|(n, _)| n == name) else {
                        return eval_err(format!("input \"{name}\" was not given"));
                    };
                    if t.dtype() != node.ty.dtype || t.shape() != node.ty.resolve(extent) {
                        return eval_err(format!("input \"{name}\" is {:?} {:?}, expected {}", t.dtype(), t.shape(), node.ty));
                    }
                    Slot::Tensor(t.clone())
                }
                Op::Weight { name } => Slot::Weight(self.lookup(name, &node.ty).map_err(ctx)?),
                op => {
                    let args: Vec<&Slot> = node.args.iter().map(|a| &slots[a.index()]).collect();
                    Slot::Tensor(kernels::run(op, &args, kv, self.threads).map_err(ctx)?)
                }
            };
            slots.push(slot);
            // Free operands no one else needs.
            for a in &node.args {
                uses[a.index()] -= 1;
                if uses[a.index()] == 0 {
                    slots[a.index()] = Slot::Empty;
                }
            }
        }
        let mut out = Vec::new();
        for o in &g.outputs {
            match std::mem::replace(&mut slots[o.index()], Slot::Empty) {
                Slot::Tensor(t) => out.push(t),
                _ => return eval_err(format!("output {o} is not a computed tensor")),
            }
        }
        Ok(out)
    }
}

/// The sizes of a graph's symbolic dims, read off its inputs' lengths:
/// the rows of an input typed `[seq, ..]` and of one typed `[out, ..]`.
pub fn input_extent<'a>(g: &Graph, lens: impl Iterator<Item = (&'a str, usize)>) -> crate::shape::Extent {
    let mut e = crate::shape::Extent::FIXED;
    for (name, len) in lens {
        let dim = g.nodes.iter().find(|n| matches!(&n.op, Op::Input { name: m } if m == name)).and_then(|n| n.ty.shape.first().copied());
        match dim {
            Some(crate::Dim::Seq) => e.seq = len,
            Some(crate::Dim::Out) => e.out = len,
            _ => {}
        }
    }
    e
}
