//! The text form of real model graphs prints and parses back to the same
//! graph, and the parsed graph evaluates to the same logits.

mod common;
use bitnet_frontends::arch::Activation;
use bitnet_frontends::model::Model;
use bitnet_ir::interp::{Interpreter, KvCache, Tensor};
use bitnet_ir::DType;
use common::*;

fn round_trip(model: &Model) {
    for all in [false, true] {
        let g = model.graph(all).unwrap();
        let text = g.to_string();
        let back = bitnet_ir::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back, g);
        assert_eq!(back.to_string(), text);
        let inputs = [("tokens", Tensor::ids(vec![1, 5, 9])), ("positions", Tensor::ids(vec![0, 1, 2]))];
        let interp = Interpreter::new(model, 1);
        let a = interp.eval(&g, &inputs, &mut KvCache::new()).unwrap();
        let b = interp.eval(&back, &inputs, &mut KvCache::new()).unwrap();
        assert_eq!(a, b);
    }
}

#[test]
fn stories_graph_round_trips() {
    round_trip(&Model::open(&stories()).unwrap());
}

#[test]
fn bitnet_graphs_round_trip() {
    let dir = tmp_dir("graph-text");
    for (t, act) in [(DType::I2S, Activation::Relu2), (DType::F16, Activation::Silu)] {
        let p = dir.join(format!("{}.gguf", t.name()));
        write_synth(&small_spec(t, act), &p);
        let m = Model::open(&p).unwrap();
        let text = m.graph(false).unwrap().to_string();
        assert!(text.contains(if t.is_ternary() { "ternary_matmul" } else { "matmul" }));
        assert!(text.contains("quantize_act"));
        round_trip(&m);
    }
}
