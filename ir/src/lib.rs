//! bitnet-ir: the tensor IR at the centre of bitnet-rs.
//!
//! Frontends build a [`Graph`] from a model file; passes rewrite it; code
//! generators lower it; the [`interp`] module runs it with plain scalar
//! code so that everything else has something trustworthy to compare with.
//! A graph prints as text and parses back ([`text`]); [`verify`] checks
//! that every node's declared type is what its op gives.
//!
//! ```
//! use bitnet_ir::{parse, verify, DType, Dim, Graph, Op, TensorType, UnaryOp};
//!
//! // y = silu(x), for any number of rows of 4 values.
//! let mut g = Graph::new("example");
//! let x = g.leaf(Op::Input { name: "x".into() }, TensorType::new(DType::F32, [Dim::Seq, Dim::Const(4)]));
//! let y = g.add(Op::Unary(UnaryOp::Silu), &[x])?;
//! g.outputs.push(y);
//! verify(&g)?;
//! // The text form parses back to the same graph.
//! let text = g.to_string();
//! assert_eq!(parse(&text)?.to_string(), text);
//! # Ok::<(), bitnet_ir::GraphError>(())
//! ```

pub mod dtype;
pub mod graph;
pub mod interp;
pub mod names;
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
