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
//!
//! The database keeps every measurement; what the scheduler asks is the
//! fastest correct tiles of each workload for this machine and thread
//! count:
//!
//! ```
//! use bitnet_autotune::{Database, Phase, Record, SPACE_VERSION};
//! use bitnet_codegen::cpu::ternary::TernaryTiles;
//! use bitnet_codegen::cpu::Isa;
//! use bitnet_codegen::schedule::{TileSource, Tiles, Workload};
//!
//! let key = Workload::Ternary { n: 2560, k: 6912 }.key();
//! let tiles = |rows| Tiles::Ternary(TernaryTiles { isa: Isa::Scalar, rows, tokens: 1, split: Default::default(), packing: Default::default() });
//! let measured = |rows, ns| Record {
//!     key: key.clone(), phase: Phase::Decode, fingerprint: "this-machine".into(), threads: 2,
//!     space: SPACE_VERSION, tiles: tiles(rows), ns: Some(ns), status: "ok".into(), at: 0,
//! };
//! let db = Database::at(std::env::temp_dir().join(format!("bitnet-doc-{}.jsonl", std::process::id())));
//! db.merge(&[measured(1, 900), measured(4, 700), measured(2, 800)])?;
//! let (tuned, warnings) = db.source("this-machine", 2);
//! assert!(warnings.is_empty());
//! assert_eq!(tuned.tiles(&key), Some(tiles(4)));
//! // Another machine, or another thread count, has measured nothing.
//! assert_eq!(db.source("another-machine", 2).0.tiles(&key), None);
//! db.clear()?;
//! # Ok::<(), String>(())
//! ```

pub mod calibrate;
pub mod db;
pub mod harness;
pub mod kernels;
pub mod space;
pub mod tune;

pub use db::{Database, Record, Tuned};
pub use space::{Phase, SPACE_VERSION};
