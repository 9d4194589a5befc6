//! The verifier: checks that a graph is well formed. Passes run it on entry
//! and exit; the text parser runs it on what it reads.

use crate::{Graph, GraphError, Op};
use std::collections::HashSet;

pub fn verify(g: &Graph) -> Result<(), GraphError> {
    let err = |msg: String| Err(GraphError(msg));
    let mut inputs = HashSet::new();
    for (v, node) in g.iter() {
        for a in &node.args {
            if a >= &v {
                return err(format!("{v}: operand {a} is not defined before use"));
            }
        }
        match &node.op {
            Op::Input { name } => {
                if !inputs.insert(name.as_str()) {
                    return err(format!("{v}: input \"{name}\" is declared twice"));
                }
            }
            Op::Weight { name } => {
                if name.is_empty() {
                    return err(format!("{v}: weight has an empty name"));
                }
            }
            op => {
                let tys: Vec<_> = node.args.iter().map(|&a| g.ty(a)).collect();
                let inferred = op.infer(&tys).map_err(|e| GraphError(format!("{v}: {e}")))?;
                if inferred != node.ty {
                    return err(format!("{v}: declared type {} but {} gives {inferred}", node.ty, op.mnemonic()));
                }
            }
        }
        if node.op.is_leaf() && !node.args.is_empty() {
            return err(format!("{v}: {} takes no operands", node.op.mnemonic()));
        }
    }
    if g.outputs.is_empty() {
        return err("graph has no outputs".into());
    }
    for o in &g.outputs {
        if o.index() >= g.nodes.len() {
            return err(format!("output {o} does not exist"));
        }
    }
    Ok(())
}
