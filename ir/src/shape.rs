//! Tensor types: a dtype and a shape whose dims are concrete or the symbolic
//! sequence length `seq`, so one graph serves prefill and decode.

use crate::DType;
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dim {
    /// The number of tokens (rows) evaluated in one call.
    Seq,
    /// The number of rows picked for the output (`select_rows`): the rows
    /// whose logits a step wants.
    Out,
    Const(usize),
}

/// The sizes of the symbolic dims in one evaluation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extent {
    pub seq: usize,
    pub out: usize,
}

impl Extent {
    /// For types with no symbolic dims (weights).
    pub const FIXED: Extent = Extent { seq: 0, out: 0 };

    pub fn new(seq: usize, out: usize) -> Extent {
        Extent { seq, out }
    }
}

impl Dim {
    /// The concrete size in an evaluation of extent `e`.
    pub fn resolve(self, e: Extent) -> usize {
        match self {
            Dim::Seq => e.seq,
            Dim::Out => e.out,
            Dim::Const(n) => n,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Seq => f.write_str("seq"),
            Dim::Out => f.write_str("out"),
            Dim::Const(n) => write!(f, "{n}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: impl Into<Vec<Dim>>) -> Self {
        TensorType { dtype, shape: shape.into() }
    }

    /// A type whose dims are all concrete.
    pub fn fixed(dtype: DType, dims: &[usize]) -> Self {
        TensorType { dtype, shape: dims.iter().map(|&d| Dim::Const(d)).collect() }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The last dim, which every op here treats as the row length.
    pub fn last(&self) -> Option<Dim> {
        self.shape.last().copied()
    }

    pub fn resolve(&self, e: Extent) -> Vec<usize> {
        self.shape.iter().map(|d| d.resolve(e)).collect()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}
