//! Element types of the IR.
//!
//! Plain scalars (`f32`, `f16`, `bf16`, `i8`, `i32`), the block-quantized
//! layouts that GGUF files store (`q8_0`, `q4_k`, `q6_k`), the packed ternary
//! layouts (`tq1_0`, `tq2_0`, `i2_s`), and `q8_row`: activations quantized
//! to int8 with one f32 scale per row (per token), the input of BitLinear.
//!
//! The byte layout of each packed type is a block struct in [`crate::quant`],
//! whose size is checked at compile time.

use crate::quant::{self, QuantBlock};
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    F16,
    BF16,
    I8,
    I32,
    Q8_0,
    Q4K,
    Q6K,
    TQ1_0,
    TQ2_0,
    I2S,
    /// int8 values with one f32 scale γ per row: `x ≈ q / γ`.
    Q8Row,
}

impl DType {
    pub const ALL: [DType; 12] =
        [DType::F32, DType::F16, DType::BF16, DType::I8, DType::I32, DType::Q8_0, DType::Q4K, DType::Q6K, DType::TQ1_0, DType::TQ2_0, DType::I2S, DType::Q8Row];

    /// The name used by the text form and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I8 => "i8",
            DType::I32 => "i32",
            DType::Q8_0 => "q8_0",
            DType::Q4K => "q4_k",
            DType::Q6K => "q6_k",
            DType::TQ1_0 => "tq1_0",
            DType::TQ2_0 => "tq2_0",
            DType::I2S => "i2_s",
            DType::Q8Row => "q8_row",
        }
    }

    pub fn from_name(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == s)
    }

    /// Elements per block (1 for scalars). Rows must be a multiple of it.
    pub fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 | DType::I8 | DType::I32 | DType::Q8Row => 1,
            DType::Q8_0 => quant::BlockQ8_0::ELEMS,
            DType::Q4K => quant::BlockQ4K::ELEMS,
            DType::Q6K => quant::BlockQ6K::ELEMS,
            DType::TQ1_0 => quant::BlockTQ1_0::ELEMS,
            DType::TQ2_0 => quant::BlockTQ2_0::ELEMS,
            DType::I2S => quant::BlockI2S::ELEMS,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I8 | DType::Q8Row => 1,
            DType::Q8_0 => quant::BlockQ8_0::BYTES,
            DType::Q4K => quant::BlockQ4K::BYTES,
            DType::Q6K => quant::BlockQ6K::BYTES,
            DType::TQ1_0 => quant::BlockTQ1_0::BYTES,
            DType::TQ2_0 => quant::BlockTQ2_0::BYTES,
            DType::I2S => quant::BlockI2S::BYTES,
        }
    }

    pub fn is_ternary(self) -> bool {
        matches!(self, DType::TQ1_0 | DType::TQ2_0 | DType::I2S)
    }

    /// Scalar float types that hold values directly.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// Types a weight may be stored in and dequantized from.
    pub fn is_weight(self) -> bool {
        !matches!(self, DType::I8 | DType::I32 | DType::Q8Row)
    }

    /// Bytes of one stored row of `k` elements, or `None` if the type
    /// cannot hold such rows. I2_S rows are whole 128-value blocks: a row
    /// of another length is padded with zero weights to whole blocks (such
    /// rows come only from Hugging Face folders, in memory: bitnet.cpp's
    /// I2_S cannot hold them, and `convert` refuses them).
    pub fn row_bytes(self, k: usize) -> Option<usize> {
        match self {
            DType::I2S => k.div_ceil(quant::BlockI2S::ELEMS).checked_mul(quant::BlockI2S::BYTES),
            _ => self.bytes_for(k),
        }
    }

    /// Bytes of a tensor of this shape (rows of its last dimension), with
    /// I2_S's rows as [`DType::row_bytes`] gives them and its scale.
    pub fn tensor_bytes(self, shape: &[usize]) -> Option<usize> {
        let k = shape.last().copied().unwrap_or(1);
        let rows = shape[..shape.len().saturating_sub(1)].iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        let body = rows.checked_mul(self.row_bytes(k)?)?;
        match self {
            DType::I2S => body.checked_add(32),
            _ => Some(body),
        }
    }

    /// Bytes taken by `n` elements, or `None` if `n` is not a whole number
    /// of blocks. I2_S adds its per-tensor f32 scale, padded to 32 bytes.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_elems()) {
            return None;
        }
        let body = (n / self.block_elems()).checked_mul(self.block_bytes())?;
        match self {
            DType::I2S => body.checked_add(32),
            _ => Some(body),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
