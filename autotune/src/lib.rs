//! bitnet-autotune: per-machine tile search and the tuning database.
//!
//! - [`space`]: the candidates of each kernel family (the knobs the
//!   kernels expose: ISA, rows per tile, which fixes the weight layout,
//!   tokens per step), the heuristic's always first.
//! - [`harness`]: checks each candidate against the reference interpreter,
//!   then times the right ones by successive halving within a deadline.
//! - [`kernels`]: the real kernels on random weights of each shape, with
//!   the weights cold in cache for decode, as in a model.
//! - [`db`]: every measurement as JSON lines in the user's cache folder,
//!   safe with concurrent tuners; read back as a [`db::Tuned`] tile source
//!   that the scheduler consults after pinned tiles and before its heuristic.
//! - [`tune`]: a whole sweep within one budget.
//!
//! The CUDA matrix products are tuned the same way, with candidates from
//! [`space::cuda_candidates`] and records kept under the GPU's fingerprint
//! (read back as a [`db::CudaTuned`]); the runtime's `cuda_tune` runs
//! them on the GPU, as this crate has no driver.

pub mod db;
pub mod harness;
pub mod kernels;
pub mod space;
pub mod tune;

pub use db::{Database, Record, Tuned};
pub use space::{Phase, SPACE_VERSION};
