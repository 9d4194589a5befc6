//! bitnet-ir: the tensor IR at the centre of bitnet-rs.
//!
//! Frontends build a [`Graph`] from a model file; passes rewrite it; code
//! generators lower it; the [`interp`] module runs it with plain scalar
//! code so that everything else has something trustworthy to compare with.
//! A graph prints as text and parses back ([`text`]); [`verify`] checks
//! that every node's declared type is what its op gives.

pub mod dtype;
pub mod graph;
pub mod interp;
pub mod op;
pub mod passes;
pub mod quant;
pub mod shape;
pub mod text;
mod verify;

pub use dtype::DType;
pub use graph::{Graph, GraphError, Node, Value};
pub use op::{ActQuant, BinaryOp, Epilogue, GateAct, Op, RopeMode, UnaryOp};
pub use shape::{Dim, Extent, TensorType};
pub use text::parse;
pub use verify::verify;
