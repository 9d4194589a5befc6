//! Tensor types: a dtype and a shape whose dims are concrete or the symbolic
//! sequence length `seq`, so one graph serves prefill and decode.

use crate::DType;
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dim {
    /// The number of tokens evaluated in one call.
    Seq,
    Const(usize),
}

impl Dim {
    /// The concrete size, given the sequence length of this evaluation.
    pub fn resolve(self, seq: usize) -> usize {
        match self {
            Dim::Seq => seq,
            Dim::Const(n) => n,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Seq => f.write_str("seq"),
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

    pub fn resolve(&self, seq: usize) -> Vec<usize> {
        self.shape.iter().map(|d| d.resolve(seq)).collect()
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
