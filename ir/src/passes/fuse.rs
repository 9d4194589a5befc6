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
//!
//! `fuse-projections` (after `fuse`, CPU only) puts the products of one
//! activation side by side: see [`projections`].

use super::{remove_dead, use_counts};
use crate::{BinaryOp, DType, Dim, Epilogue, GateAct, Graph, Node, Op, TensorType, UnaryOp, Value};
use std::collections::{BTreeMap, HashMap, HashSet};

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

/// `fuse-projections`: the ternary products of one activation that are
/// not already joined (q, k and v) → one `ternary_cat`, each product read
/// back through a `slice` of it. The cat takes the place of the last
/// product, so a product read before that place stays alone; the products
/// must share an epilogue (a residual one excludes them: o and down are
/// alone anyway).
pub(super) fn projections(g: &mut Graph) {
    let n = g.nodes.len();
    let mut first_read = vec![usize::MAX; n];
    for (i, node) in g.nodes.iter().enumerate() {
        for a in &node.args {
            first_read[a.index()] = first_read[a.index()].min(i);
        }
    }
    // By activation and epilogue: the products that may join.
    let mut groups: BTreeMap<(Value, bool), Vec<usize>> = BTreeMap::new();
    for (i, node) in g.nodes.iter().enumerate() {
        match (&node.op, node.ty.shape.get(1)) {
            (Op::TernaryMatMul(e), Some(Dim::Const(_))) if !e.residual => groups.entry((node.args[0], e.scale)).or_default().push(i),
            _ => {}
        }
    }
    let groups: Vec<Vec<usize>> = groups
        .into_values()
        .map(|mut m| {
            let last = *m.last().unwrap();
            m.retain(|&i| i == last || first_read[i] > last);
            m
        })
        .filter(|m| m.len() >= 2)
        .collect();
    if groups.is_empty() {
        return;
    }
    let old = std::mem::take(&mut g.nodes);
    let last: HashMap<usize, &Vec<usize>> = groups.iter().map(|m| (*m.last().unwrap(), m)).collect();
    let fused: HashSet<usize> = groups.iter().flatten().copied().collect();
    let mut map = vec![Value(u32::MAX); n];
    for (i, node) in old.iter().enumerate() {
        if let Some(members) = last.get(&i) {
            let Op::TernaryMatMul(epilogue) = node.op else { unreachable!("members are ternary products") };
            let width = |m: usize| match old[m].ty.shape[1] {
                Dim::Const(w) => w,
                _ => unreachable!("members have fixed widths"),
            };
            let mut args = vec![map[node.args[0].index()]];
            args.extend(members.iter().flat_map(|&m| old[m].args[1..].iter().map(|a| map[a.index()])));
            let ty = TensorType::new(DType::F32, [node.ty.shape[0], Dim::Const(members.iter().map(|&m| width(m)).sum())]);
            g.nodes.push(Node { op: Op::TernaryCat { parts: members.len(), epilogue }, args, ty });
            let cat = Value(g.nodes.len() as u32 - 1);
            let mut start = 0;
            for &m in members.iter() {
                g.nodes.push(Node { op: Op::Slice { start, len: width(m) }, args: vec![cat], ty: old[m].ty.clone() });
                map[m] = Value(g.nodes.len() as u32 - 1);
                start += width(m);
            }
        } else if !fused.contains(&i) {
            let args = node.args.iter().map(|a| map[a.index()]).collect();
            g.nodes.push(Node { args, ..node.clone() });
            map[i] = Value(g.nodes.len() as u32 - 1);
        }
    }
    g.outputs = g.outputs.iter().map(|o| map[o.index()]).collect();
}
