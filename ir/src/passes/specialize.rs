//! `specialize-ternary`: a ternary projection's scalar scale
//! (`blk.N.<proj>.scale`, a `mul` by a stored `[1]` after the matmul)
//! moves into the matmul's epilogue, so the kernel applies it while the
//! result is still in registers.
//!
//! The frontends already emit BitNet's `quantize_act` + `ternary_matmul`
//! pair: per-token int8 activations are part of the model's arithmetic,
//! not an optimization, so no pass may introduce or remove them. Weights
//! are repacked into each kernel's layout when the schedule has chosen
//! its tiles (the layout follows from them).

use super::{remove_dead, use_counts};
use crate::{BinaryOp, Dim, Epilogue, Graph, Op};

pub(super) fn run(g: &mut Graph) {
    let uses = use_counts(g);
    for i in 0..g.nodes.len() {
        let node = &g.nodes[i];
        let Op::Binary(BinaryOp::Mul) = node.op else { continue };
        let (y, s) = (node.args[0], node.args[1]);
        let scalar_weight = matches!(g.node(s).op, Op::Weight { .. }) && g.ty(s).shape == [Dim::Const(1)];
        if !scalar_weight || uses[y.index()] != 1 || g.node(y).op != Op::TernaryMatMul(Epilogue::NONE) {
            continue;
        }
        let mut args = g.node(y).args.clone();
        args.push(s);
        let n = &mut g.nodes[i];
        n.op = Op::TernaryMatMul(Epilogue { scale: true, residual: false });
        n.args = args;
    }
    remove_dead(g);
}
