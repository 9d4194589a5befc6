//! `canonicalize`: dead nodes go, and identical nodes (same op, attributes,
//! operands and type) become one. Attention is never merged: each call
//! writes its layer's KV cache.

use super::rebuild;
use crate::{Graph, Op, Value};
use std::collections::HashMap;

pub(super) fn run(g: &mut Graph) {
    let mut replace: Vec<Value> = Vec::with_capacity(g.nodes.len());
    let mut seen: HashMap<String, Value> = HashMap::new();
    for (v, node) in g.iter() {
        // The node's text with operands already merged is its identity.
        let mut key = node.clone();
        key.args = key.args.iter().map(|a| replace[a.index()]).collect();
        let keep = if matches!(node.op, Op::Attention { .. }) { v } else { *seen.entry(key.to_string()).or_insert(v) };
        replace.push(keep);
    }
    rebuild(g, &replace);
}
