//! bitnet-frontends: from model files to IR.
//!
//! [`gguf`] reads and writes the container; [`model`] reads a model's
//! hyper-parameters and builds its IR graph ([`arch`]); [`tokenizer`] and
//! [`chat`] turn text into ids and back; [`synth`] writes random-weight
//! BitNet models for tests and benchmarks.

pub mod arch;
pub mod chat;
pub mod convert;
pub mod gguf;
pub mod hf;
pub mod model;
pub mod synth;
pub mod tokenizer;
