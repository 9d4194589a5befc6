//! GGUF, the model container of llama.cpp and bitnet.cpp: versions 2 and 3
//! (the same layout; v1 used 32-bit counts and is refused), every metadata
//! value type, tensor data aligned to `general.alignment` (default 32).
//!
//! ```text
//! "GGUF" u32:version u64:n_tensors u64:n_kv
//! n_kv × (string:key u32:type value)
//! n_tensors × (string:name u32:n_dims u64×n_dims:ne (innermost first) u32:type u64:offset)
//! padding to alignment, then the data blob (offsets are relative to it)
//! ```
//!
//! Written by hand because no published GGUF crate knows bitnet.cpp's I2_S
//! (type 36, whose byte size is not a whole number of blocks).

mod reader;
mod value;
mod writer;

pub use reader::{GgufFile, TensorInfo};
pub use value::{MetaType, MetaValue};
pub use writer::GgufWriter;

use bitnet_ir::DType;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("not a GGUF file: {0}")]
    Format(String),
}

pub(crate) fn format_err<T>(msg: impl Into<String>) -> Result<T, GgufError> {
    Err(GgufError::Format(msg.into()))
}

/// GGUF tensor type ids (ggml's `ggml_type`; 36 is bitnet.cpp's I2_S).
const TYPE_IDS: [(u32, DType); 11] = [
    (0, DType::F32),
    (1, DType::F16),
    (8, DType::Q8_0),
    (12, DType::Q4K),
    (14, DType::Q6K),
    (24, DType::I8),
    (26, DType::I32),
    (30, DType::BF16),
    (34, DType::TQ1_0),
    (35, DType::TQ2_0),
    (36, DType::I2S),
];

pub fn dtype_from_id(id: u32) -> Result<DType, String> {
    if let Some(&(_, d)) = TYPE_IDS.iter().find(|(i, _)| *i == id) {
        return Ok(d);
    }
    let known = match id {
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        13 => "Q5_K",
        15 => "Q8_K",
        16..=23 | 29 => "an IQ type",
        25 => "I16",
        27 => "I64",
        28 => "F64",
        _ => return Err(format!("unknown tensor type {id}")),
    };
    Err(format!("tensor type {known} (id {id}) is not supported"))
}

pub fn dtype_id(d: DType) -> Option<u32> {
    TYPE_IDS.iter().find(|(_, t)| *t == d).map(|&(i, _)| i)
}
