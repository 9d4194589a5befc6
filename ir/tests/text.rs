//! The text form: hand-written graphs parse, print back identically, and
//! malformed text or ill-typed graphs are rejected with a reason.

use bitnet_ir::{parse, verify, DType, Dim, Epilogue, Graph, Op, TensorType, UnaryOp};

const SMALL: &str = r#"graph "small" {
    v0 = input "tokens" : i32[seq]
    v1 = input "positions" : i32[seq]
    v2 = weight "token_embd.weight" : f16[16, 8]
    v3 = embed v2, v0 : f32[seq, 8]
    v4 = weight "norm" : f32[8]
    v5 = rms_norm v3, v4 eps=1e-5 : f32[seq, 8]
    v6 = rope v5, v1 mode=neox theta=500000.0 head_dim=4 : f32[seq, 8]
    v7 = attention v6, v5, v5, v1 layer=0 heads=2 kv_heads=2 head_dim=4 : f32[seq, 8]
    v8 = quantize_act v7 scheme=per_token : q8_row[seq, 8]
    v9 = weight "w" : tq2_0[3, 256]
    v10 = silu v7 : f32[seq, 8]
    v11 = add v10, v4 : f32[seq, 8]
    v12 = last_row v11 : f32[1, 8]
    v13 = matmul v12, v2 : f32[1, 16]
    v14 = cast v13 to=bf16 : bf16[1, 16]
    v15 = softmax v13 : f32[1, 16]
    output v14
    output v15
}
"#;

#[test]
fn text_round_trips() {
    let g = parse(SMALL).unwrap();
    assert_eq!(g.to_string(), SMALL);
    assert_eq!(parse(&g.to_string()).unwrap(), g);
    assert_eq!(g.nodes.len(), 16);
}

#[test]
fn floats_survive_printing_exactly() {
    for eps in [1e-5f32, 1e-6, 0.1, 3.0e-38, 123456.79] {
        let text = SMALL.replace("eps=1e-5", &format!("eps={eps:?}"));
        let g = parse(&text).unwrap();
        assert_eq!(g.nodes[5].op, Op::RmsNorm { eps });
        assert_eq!(parse(&g.to_string()).unwrap(), g);
    }
}

fn parse_err(text: &str) -> String {
    parse(text).expect_err("should not parse").to_string()
}

#[test]
fn malformed_text_is_rejected_with_a_reason() {
    assert!(parse_err(&SMALL.replace("rms_norm v3, v4 eps=1e-5", "rms_norm v3, v4")).contains("missing attribute eps"));
    assert!(parse_err(&SMALL.replace("embed v2, v0", "embed v2, v99")).contains("v99 is not defined"));
    assert!(parse_err(&SMALL.replace("silu v7", "frobnicate v7")).contains("unknown op frobnicate"));
    assert!(parse_err(&SMALL.replace("f16[16, 8]", "f17[16, 8]")).contains("unknown dtype f17"));
    let e = parse_err(&SMALL.replace("v10 = silu v7 : f32[seq, 8]", "v10 = silu v7 : f32[seq, 9]"));
    assert!(e.contains("declared type f32[seq, 9]"), "{e}");
    let e = parse_err(&SMALL.replace("v13 = matmul v12, v2 : f32[1, 16]", "v13 = matmul v12, v9 : f32[1, 3]"));
    assert!(e.contains("inner dims differ"), "{e}");
    assert!(parse_err(&SMALL.replace("    output v14\n    output v15\n", "")).contains("no outputs"));
    assert!(parse_err("graph \"x\" {\n v0 = input \"a\" : i32[seq]\n").contains("line"));
}

#[test]
fn builder_infers_types_and_rejects_bad_operands() {
    let mut g = Graph::new("t");
    let x = g.leaf(Op::Input { name: "x".into() }, TensorType::new(DType::F32, [Dim::Seq, Dim::Const(4)]));
    let y = g.add(Op::Unary(UnaryOp::Square), &[x]).unwrap();
    assert_eq!(g.ty(y), &TensorType::new(DType::F32, [Dim::Seq, Dim::Const(4)]));
    assert!(g.add(Op::TernaryMatMul(Epilogue::NONE), &[x, y]).is_err());
    assert!(g.add(Op::Embed, &[x]).is_err(), "arity is checked");
    g.outputs.push(y);
    verify(&g).unwrap();
}

const GATED: &str = r#"graph "gated" {
    v0 = input "x" : f32[seq, 256]
    v1 = quantize_act v0 scheme=per_token : q8_row[seq, 256]
    v2 = weight "gate" : i2_s[5, 256]
    v3 = weight "gate.scale" : f32[1]
    v4 = weight "up" : i2_s[5, 256]
    v5 = weight "up.scale" : f32[1]
    v6 = ternary_glu v1, v2, v3, v4, v5 act=relu2 epilogue=scale : f32[seq, 5]
    v7 = ternary_glu v1, v2, v4 act=silu : f32[seq, 5]
    output v6
    output v7
}
"#;

#[test]
fn ternary_glu_round_trips_and_checks_both_products() {
    let g = parse(GATED).unwrap();
    assert_eq!(g.to_string(), GATED);
    let e = parse_err(&GATED.replace("v4 = weight \"up\" : i2_s[5, 256]", "v4 = weight \"up\" : i2_s[6, 256]"));
    assert!(e.contains("ternary_glu: gate gives f32[seq, 5], up f32[seq, 6]"), "{e}");
    let e = parse_err(&GATED.replace("v1, v2, v4 act=silu", "v1, v2, v0, v4, v0 act=silu epilogue=residual"));
    assert!(e.contains("no residual"), "{e}");
    let e = parse_err(&GATED.replace("v1, v2, v4 act=silu", "v1, v2, v3 act=silu"));
    assert!(e.contains("up"), "{e}");
}

const SIDE_BY_SIDE: &str = r#"graph "qkv" {
    v0 = input "x" : f32[seq, 256]
    v1 = quantize_act v0 scheme=per_token : q8_row[seq, 256]
    v2 = weight "q" : tq2_0[8, 256]
    v3 = weight "q.scale" : f32[1]
    v4 = weight "k" : tq2_0[4, 256]
    v5 = weight "k.scale" : f32[1]
    v6 = ternary_cat v1, v2, v3, v4, v5 parts=2 epilogue=scale : f32[seq, 12]
    v7 = slice v6 start=0 len=8 : f32[seq, 8]
    v8 = slice v6 start=8 len=4 : f32[seq, 4]
    output v7
    output v8
}
"#;

#[test]
fn ternary_cat_and_slice_round_trip_and_check_their_operands() {
    let g = parse(SIDE_BY_SIDE).unwrap();
    assert_eq!(g.to_string(), SIDE_BY_SIDE);
    let e = parse_err(&SIDE_BY_SIDE.replace("start=8 len=4", "start=9 len=4"));
    assert!(e.contains("not within a row"), "{e}");
    let e = parse_err(&SIDE_BY_SIDE.replace("start=8 len=4", "start=18446744073709551615 len=4"));
    assert!(e.contains("not within a row"), "{e}");
    let e = parse_err(&SIDE_BY_SIDE.replace("parts=2", "parts=3"));
    assert!(e.contains("operands"), "{e}");
    let e = parse_err(&SIDE_BY_SIDE.replace("parts=2", "parts=18446744073709551615"));
    assert!(e.contains("operands"), "{e}");
    let e = parse_err(&SIDE_BY_SIDE.replace("v1, v2, v3, v4, v5 parts=2", "v1, v2, v3, v0, v5 parts=2"));
    assert!(e.contains("ternary_cat part 1"), "{e}");
}
