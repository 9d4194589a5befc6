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
//!
//! A ternary product on the fastest kernels this CPU has, against the plain
//! reference kernel (integer dot products: the results are equal):
//!
//! ```
//! use bitnet_codegen::cpu::ternary::{matmul, Epilogue, PackedTernary, QuantActs, TernaryTiles};
//! use bitnet_codegen::cpu::{ops, Isa, Pool};
//!
//! let (n, k, tokens) = (6, 300, 3);
//! // Weights −1, 0, 1 with one scale, packed four rows to a tile.
//! let w = PackedTernary::from_rows(n, k, 4, 0.5, |r, row| row.iter_mut().enumerate().for_each(|(i, v)| *v = ((r + i) % 3) as i8 - 1));
//! let x: Vec<f32> = (0..tokens * k).map(|i| (i % 17) as f32 - 8.0).collect();
//! let mut acts = QuantActs::default();
//! ops::quantize_rows(&x, k, None, &mut acts); // int8 per token
//! let pool = Pool::new(2);
//! let run = |isa| {
//!     let mut out = vec![0f32; tokens * n];
//!     matmul(&pool, TernaryTiles::new(isa, 4, 2), &w, &acts, &mut out, Epilogue::default());
//!     out
//! };
//! assert_eq!(run(Isa::best()), run(Isa::Scalar));
//! ```

// Every unsafe block states what it relies on (clippy enforces it).
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cpu;
pub mod cuda;
pub mod schedule;
pub mod target;

pub use target::HostCpu;
