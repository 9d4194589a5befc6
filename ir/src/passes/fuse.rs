//! `fuse`: ops that read what one other op just wrote become one op, so
//! the value never goes to memory in between:
//! - `rms_norm` then `quantize_act` → `rms_norm_quant`;
//! - `silu(g) * u` and `square(relu(g)) * u` → `glu`;
//! - `x + ternary_matmul(..)` → the matmul with a residual epilogue;
//! - `glu(ternary_matmul(x, gate), ternary_matmul(x, up))` → `ternary_glu`:
//!   the gate and up projections as one product over one activation, the
//!   gated unit applied while both results are in registers (a second
//!   sweep, once the first has made the `glu`).
//!
//! A producer is fused only when its result has no other reader.

use super::{remove_dead, use_counts};
use crate::{BinaryOp, Epilogue, GateAct, Graph, Node, Op, UnaryOp, Value};

pub(super) fn run(g: &mut Graph) {
    let uses = use_counts(g);
    for i in 0..g.nodes.len() {
        if let Some((op, args)) = fused(g, &g.nodes[i], &uses) {
            g.nodes[i].op = op;
            g.nodes[i].args = args;
        }
    }
    remove_dead(g); // the first sweep's leftovers still read the products
    let uses = use_counts(g);
    for i in 0..g.nodes.len() {
        if let Some((op, args)) = gated_product(g, &g.nodes[i], &uses) {
            g.nodes[i].op = op;
            g.nodes[i].args = args;
        }
    }
    remove_dead(g);
}

/// `glu` of two ternary products of one activation → `ternary_glu`.
fn gated_product(g: &Graph, node: &Node, uses: &[usize]) -> Option<(Op, Vec<Value>)> {
    let Op::Glu { act } = node.op else { return None };
    let only = |v: Value| (uses[v.index()] == 1).then(|| g.node(v));
    let (gate, up) = (only(node.args[0])?, only(node.args[1])?);
    match (&gate.op, &up.op) {
        (Op::TernaryMatMul(e), Op::TernaryMatMul(f)) if e == f && !e.residual && gate.args[0] == up.args[0] => {
            let args = gate.args.iter().chain(&up.args[1..]).copied().collect();
            Some((Op::TernaryGlu { act, epilogue: *e }, args))
        }
        _ => None,
    }
}

/// The fused replacement for `node`, if one applies.
fn fused(g: &Graph, node: &Node, uses: &[usize]) -> Option<(Op, Vec<Value>)> {
    let only = |v: Value| (uses[v.index()] == 1).then(|| g.node(v));
    match &node.op {
        Op::QuantizeAct { scheme } => {
            let norm = only(node.args[0])?;
            let Op::RmsNorm { eps } = norm.op else { return None };
            Some((Op::RmsNormQuant { eps, scheme: *scheme }, norm.args.clone()))
        }
        Op::Binary(BinaryOp::Mul) => {
            let (a, b) = (node.args[0], node.args[1]);
            if g.ty(a) != g.ty(b) {
                return None;
            }
            // Either operand may be the activated gate; multiplication commutes.
            [(a, b), (b, a)].into_iter().find_map(|(gate, up)| {
                let act = only(gate)?;
                match act.op {
                    Op::Unary(UnaryOp::Silu) => Some((Op::Glu { act: GateAct::Silu }, vec![act.args[0], up])),
                    Op::Unary(UnaryOp::Square) => {
                        let relu = only(act.args[0])?;
                        (relu.op == Op::Unary(UnaryOp::Relu)).then(|| (Op::Glu { act: GateAct::Relu2 }, vec![relu.args[0], up]))
                    }
                    _ => None,
                }
            })
        }
        Op::Binary(BinaryOp::Add) => {
            let (a, b) = (node.args[0], node.args[1]);
            if g.ty(a) != g.ty(b) {
                return None;
            }
            [(a, b), (b, a)].into_iter().find_map(|(residual, y)| {
                let mm = only(y)?;
                match mm.op {
                    Op::TernaryMatMul(e) if !e.residual => {
                        let mut args = mm.args.clone();
                        args.push(residual);
                        Some((Op::TernaryMatMul(Epilogue { residual: true, ..e }), args))
                    }
                    _ => None,
                }
            })
        }
        _ => None,
    }
}
