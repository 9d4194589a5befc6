//! bitnet-runtime: runs a model. A [`Session`] holds the memory-mapped
//! weights, the tokenizer, the model's graphs and the KV cache, evaluates
//! tokens with an executor (compiled for the CPU or an NVIDIA GPU, or the
//! reference interpreter) and drives
//! generation with a [`Sampler`].

pub mod artifact;
pub mod bench;
pub mod compiled;
pub mod cuda;
pub mod cuda_tune;
pub mod kv;
pub mod npy;
pub mod sampler;
pub mod session;

pub use sampler::{Sampler, SamplerConfig};
pub use session::{cuda_tuned_tiles, cuda_workloads, lower, lower_cuda, tuned_tiles, workloads, Backend, Device, GenerateOptions, Generation, LoadOptions, RuntimeError, Session, StopReason};
