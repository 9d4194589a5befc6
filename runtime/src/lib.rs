//! bitnet-runtime: runs a model. An [`Engine`] holds the memory-mapped
//! weights, the tokenizer, the backend that evaluates the model's graph
//! (compiled for the CPU or an NVIDIA GPU, or the reference interpreter)
//! and a paged KV cache; many [`Sequence`]s (conversations) step through
//! it together. [`Session`] is one sequence on an engine of its own.

pub mod artifact;
pub mod backend;
pub mod bench;
pub mod compiled;
pub mod cuda;
pub mod cuda_tune;
pub mod engine;
pub mod error;
pub mod generate;
pub mod kv;
pub mod lowering;
pub mod npy;
pub mod sampler;
pub mod session;
pub mod stops;

pub use backend::{Backend, BackendKind, Device, LoadOptions, StepRows};
pub use engine::{Engine, EngineOptions, Sequence};
pub use error::RuntimeError;
pub use generate::{GenerateOptions, Generation, StopReason, TextGeneration};
pub use kv::KvUsage;
pub use lowering::{cuda_tuned_tiles, cuda_workloads, lower, lower_cuda, tuned_tiles, workloads};
pub use sampler::{Sampler, SamplerConfig};
pub use session::Session;
pub use stops::StopFilter;
