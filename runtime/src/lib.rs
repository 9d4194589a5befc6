//! bitnet-runtime: runs a model. An [`Engine`] holds the memory-mapped
//! weights, the tokenizer, the backend that evaluates the model's graph
//! (compiled for the CPU or an NVIDIA GPU, or the reference interpreter)
//! and a paged KV cache; many [`Sequence`]s (conversations) step through
//! it together. [`Session`] is one sequence on an engine of its own.
//!
//! ```
//! use bitnet_runtime::{Engine, EngineOptions, GenerateOptions, SamplerConfig};
//!
//! // stories260K, the small trained model the repository carries.
//! let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/models/stories260K/stories260K.gguf");
//! let engine = Engine::open(path.as_ref(), &EngineOptions::default())?;
//! let greedy = SamplerConfig { temperature: 0.0, ..Default::default() };
//! let mut seq = engine.new_sequence(greedy.clone())?;
//! let prompt = engine.tokenizer.encode("Once upon a time", true, false)?;
//! let opts = GenerateOptions { n_predict: 5, ignore_eos: true, sampler: greedy, dump_logits: false };
//! let out = engine.generate(&mut seq, &prompt, &opts, |_| {})?;
//! assert_eq!(out.generated_ids, [432, 383, 286, 261, 376]);
//! assert_eq!(engine.tokenizer.decode_text(&out.generated_ids), ", there was a little");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

// Every unsafe block states what it relies on (clippy enforces it).
#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(feature = "native")]
pub mod artifact;
pub mod backend;
#[cfg(feature = "native")]
pub mod bench;
#[cfg(feature = "native")]
pub mod compiled;
pub mod constraint;
#[cfg(feature = "native")]
pub mod cuda;
#[cfg(feature = "native")]
pub mod cuda_tune;
pub mod engine;
pub mod error;
pub mod gbnf;
pub mod generate;
pub mod kv;
#[cfg(feature = "native")]
pub mod lowering;
pub mod npy;
pub mod quality;
pub mod sampler;
pub mod session;
pub mod stops;

pub use backend::{Backend, BackendKind, Device, KernelTimes, LoadOptions, StepRows};
pub use bitnet_ir::interp::KvType;
pub use constraint::OutputFormat;
pub use engine::{Engine, EngineOptions, Sequence};
pub use error::RuntimeError;
pub use generate::{feed_prompt_chunks, GenerateOptions, Generation, PromptRest, StopReason, TextGeneration};
pub use kv::KvUsage;
#[cfg(feature = "native")]
pub use lowering::{cuda_tuned_tiles, cuda_workloads, lower, lower_cuda, tuned_tiles, workloads};
pub use sampler::{OutOfRange, Sampler, SamplerConfig, Setting};
pub use session::Session;
pub use stops::StopFilter;
