//! The graph: nodes in SSA form, each producing one value, in an order
//! where every operand comes before its user.

use crate::{Op, TensorType};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A node's result. Prints as `v7`, as the text form writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Value(pub u32);

impl Value {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub args: Vec<Value>,
    pub ty: TensorType,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    pub outputs: Vec<Value>,
}

/// An error from building or checking a graph.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GraphError(pub String);

impl Graph {
    pub fn new(name: impl Into<String>) -> Self {
        Graph { name: name.into(), nodes: Vec::new(), outputs: Vec::new() }
    }

    pub fn node(&self, v: Value) -> &Node {
        &self.nodes[v.index()]
    }

    pub fn ty(&self, v: Value) -> &TensorType {
        &self.node(v).ty
    }

    /// Adds an input or weight with its declared type.
    pub fn leaf(&mut self, op: Op, ty: TensorType) -> Value {
        assert!(op.is_leaf(), "leaf() takes input or weight ops");
        self.push_node(Node { op, args: Vec::new(), ty })
    }

    /// Adds an op, inferring its type; an operand of the wrong type is an error.
    pub fn add(&mut self, op: Op, args: &[Value]) -> Result<Value, GraphError> {
        for a in args {
            if a.index() >= self.nodes.len() {
                return Err(GraphError(format!("{}: operand {a} does not exist", op.mnemonic())));
            }
        }
        let tys: Vec<&TensorType> = args.iter().map(|&a| self.ty(a)).collect();
        let ty = op.infer(&tys).map_err(GraphError)?;
        Ok(self.push_node(Node { op, args: args.to_vec(), ty }))
    }

    fn push_node(&mut self, node: Node) -> Value {
        self.nodes.push(node);
        Value(self.nodes.len() as u32 - 1)
    }

    /// Values in order, with their nodes.
    pub fn iter(&self) -> impl Iterator<Item = (Value, &Node)> {
        self.nodes.iter().enumerate().map(|(i, n)| (Value(i as u32), n))
    }

    /// The names of all weights the graph reads.
    pub fn weight_names(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().filter_map(|n| match &n.op {
            Op::Weight { name } => Some(name.as_str()),
            _ => None,
        })
    }
}
