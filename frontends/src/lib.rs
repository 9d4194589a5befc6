//! bitnet-frontends: from model files to IR.
//!
//! [`gguf`] reads and writes the container; [`model`] reads a model's
//! hyper-parameters and builds its IR graph ([`arch`]); [`tokenizer`] and
//! [`chat`] turn text into ids and back; [`synth`] writes random-weight
//! BitNet models for tests and benchmarks.
//!
//! ```
//! use bitnet_frontends::model::Model;
//!
//! let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/models/stories260K/stories260K.gguf");
//! let model = Model::open(path.as_ref())?;
//! assert_eq!(model.config.vocab, 512);
//! let ids = model.tokenizer()?.encode("Once upon a time", true, false)?;
//! assert_eq!(ids, [1, 403, 407, 261, 378]);
//! // The IR graph of one step, checked and printable.
//! let step = model.step_graph()?;
//! bitnet_ir::verify(&step)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

// Every unsafe block states what it relies on (clippy enforces it).
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod arch;
pub mod chat;
pub mod convert;
pub mod family;
pub mod gguf;
pub mod hf;
pub mod model;
pub mod synth;
pub mod tokenizer;
