//! Graph-level passes, run in order as one pipeline.
//!
//! Each pass is data: a name, one line saying what it does, and a function
//! that rewrites the graph. [`optimize`] verifies the graph on entry to and
//! exit from every pass, so a broken rewrite is caught at the pass that made
//! it, and it can stop after any pass (`bitnet compile --dump-after NAME`).
//! Every rewrite keeps the interpreter's results bit for bit: fused ops are
//! defined in the interpreter as exactly the ops they replace.
//!
//! Scheduling (kernels, tiles) comes after these, in `bitnet-codegen`.

mod canonicalize;
mod fuse;
mod specialize;

use crate::{verify, Graph, GraphError, Node, Op, Value};

/// One named graph rewrite.
pub struct Pass {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&mut Graph),
}

/// The graph passes, in the order they run.
pub const PIPELINE: &[Pass] = &[
    Pass { name: "canonicalize", about: "remove dead nodes, merge duplicate nodes", run: canonicalize::run },
    Pass { name: "specialize-ternary", about: "move each projection's scale into its ternary matmul's epilogue", run: specialize::run },
    Pass {
        name: "fuse",
        about: "rms_norm + quantize_act; act(gate) * up; residual adds into the matmul epilogue; gate and up products with their glu",
        run: fuse::run,
    },
    Pass {
        name: "fuse-projections",
        about: "ternary products of one activation (q, k, v) as one ternary_cat, read back through slices",
        run: fuse::projections,
    },
];

/// The names of the passes, in order.
pub fn names() -> impl Iterator<Item = &'static str> {
    PIPELINE.iter().map(|p| p.name)
}

/// Runs the pipeline on `g`, stopping after the pass named `stop_after`
/// (an unknown name is an error that lists the known ones).
pub fn optimize(mut g: Graph, stop_after: Option<&str>) -> Result<Graph, GraphError> {
    if let Some(s) = stop_after {
        if !PIPELINE.iter().any(|p| p.name == s) {
            return Err(GraphError(format!("no graph pass named {s}; the passes are: {}", names().collect::<Vec<_>>().join(", "))));
        }
    }
    verify(&g).map_err(|e| GraphError(format!("before the passes: {e}")))?;
    for pass in PIPELINE {
        (pass.run)(&mut g);
        verify(&g).map_err(|e| GraphError(format!("after pass {}: {e}", pass.name)))?;
        if stop_after == Some(pass.name) {
            break;
        }
    }
    Ok(g)
}

/// How many times each value is read, by nodes and as an output.
pub fn use_counts(g: &Graph) -> Vec<usize> {
    let mut uses = vec![0; g.nodes.len()];
    for a in g.nodes.iter().flat_map(|n| &n.args).chain(&g.outputs) {
        uses[a.index()] += 1;
    }
    uses
}

/// Ops that must run even when nothing reads their result.
fn has_effects(op: &Op) -> bool {
    matches!(op, Op::Attention { .. } | Op::Input { .. })
}

/// Rebuilds the graph keeping only live nodes, with `replace[i]` standing
/// in for node `i` wherever it is read (`replace[i] == i` keeps it).
pub(crate) fn rebuild(g: &mut Graph, replace: &[Value]) {
    let n = g.nodes.len();
    let mut live = vec![false; n];
    for o in &g.outputs {
        live[replace[o.index()].index()] = true;
    }
    for i in (0..n).rev() {
        if replace[i].index() == i && has_effects(&g.nodes[i].op) {
            live[i] = true;
        }
        if live[i] {
            for a in &g.nodes[i].args {
                live[replace[a.index()].index()] = true;
            }
        }
    }
    let mut map = vec![Value(u32::MAX); n];
    let mut nodes: Vec<Node> = Vec::with_capacity(n);
    for (i, node) in std::mem::take(&mut g.nodes).into_iter().enumerate() {
        if replace[i].index() != i {
            map[i] = map[replace[i].index()];
        } else if live[i] {
            let args = node.args.iter().map(|a| map[a.index()]).collect();
            map[i] = Value(nodes.len() as u32);
            nodes.push(Node { args, ..node });
        }
    }
    g.outputs = g.outputs.iter().map(|o| map[o.index()]).collect();
    g.nodes = nodes;
}

/// Drops nodes that nothing reads.
pub(crate) fn remove_dead(g: &mut Graph) {
    let identity: Vec<Value> = (0..g.nodes.len() as u32).map(Value).collect();
    rebuild(g, &identity);
}

#[cfg(test)]
mod tests;
