//! bitnet-codegen: from an optimized graph to code for a machine.
//!
//! - [`target`]: the machine: architecture and ISA features detected at run
//!   time (never chosen at build time).
//! - [`schedule`]: the schedule pass: cuts the graph into kernels, gives
//!   each a workload key and its tiles (pinned → a [`schedule::TileSource`]
//!   such as the tuning database → heuristic).
//! - [`cpu`]: the native kernels and the thread pool they run on.
//! - [`cuda`]: the graph lowered to CUDA C kernels and their launches,
//!   compiled to PTX by NVRTC.

pub mod cpu;
pub mod cuda;
pub mod schedule;
pub mod target;

pub use target::HostCpu;
