//! The text form of a graph: printed by `Display`, read back by [`parse`].
//!
//! ```text
//! graph "llama" {
//!     v0 = input "tokens" : i32[seq]
//!     v1 = weight "token_embd.weight" : f32[512, 64]
//!     v2 = embed v1, v0 : f32[seq, 64]
//!     v3 = weight "blk.0.attn_norm.weight" : f32[64]
//!     v4 = rms_norm v2, v3 eps=1e-5 : f32[seq, 64]
//!     output v4
//! }
//! ```
//!
//! Floats print in Rust's shortest round-trip form, so `parse(print(g)) == g`.

use crate::op::{Epilogue, GateAct};
use crate::{verify, ActQuant, BinaryOp, DType, Dim, Graph, GraphError, Node, Op, RopeMode, TensorType, UnaryOp, Value};
use std::collections::HashMap;
use std::fmt;

impl Op {
    /// The attributes printed after the operands, as `key=value`.
    fn attrs(&self) -> Vec<(&'static str, String)> {
        match self {
            Op::RmsNorm { eps } => vec![("eps", format!("{eps:?}"))],
            Op::Rope { mode, theta, head_dim } => {
                vec![("mode", mode.name().into()), ("theta", format!("{theta:?}")), ("head_dim", head_dim.to_string())]
            }
            Op::Attention { layer, heads, kv_heads, head_dim } => {
                vec![("layer", layer.to_string()), ("heads", heads.to_string()), ("kv_heads", kv_heads.to_string()), ("head_dim", head_dim.to_string())]
            }
            Op::Cast { to } => vec![("to", to.name().into())],
            Op::QuantizeAct { scheme } => vec![("scheme", scheme.name().into())],
            Op::RmsNormQuant { eps, scheme } => vec![("eps", format!("{eps:?}")), ("scheme", scheme.name().into())],
            Op::TernaryMatMul(e) if *e != Epilogue::NONE => vec![("epilogue", e.name())],
            Op::Glu { act } => vec![("act", act.name().into())],
            Op::TernaryCat { parts, epilogue } => {
                let mut a = vec![("parts", parts.to_string())];
                if *epilogue != Epilogue::NONE {
                    a.push(("epilogue", epilogue.name()));
                }
                a
            }
            Op::Slice { start, len } => vec![("start", start.to_string()), ("len", len.to_string())],
            Op::TernaryGlu { act, epilogue } => {
                let mut a = vec![("act", act.name().into())];
                if *epilogue != Epilogue::NONE {
                    a.push(("epilogue", epilogue.name()));
                }
                a
            }
            _ => Vec::new(),
        }
    }
}

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.op.mnemonic())?;
        match &self.op {
            Op::Input { name } | Op::Weight { name } => write!(f, " {}", quote(name))?,
            _ => {}
        }
        for (i, a) in self.args.iter().enumerate() {
            write!(f, "{}{a}", if i == 0 { " " } else { ", " })?;
        }
        for (k, v) in self.op.attrs() {
            write!(f, " {k}={v}")?;
        }
        write!(f, " : {}", self.ty)
    }
}

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "graph {} {{", quote(&self.name))?;
        for (v, node) in self.iter() {
            writeln!(f, "    {v} = {node}")?;
        }
        for o in &self.outputs {
            writeln!(f, "    output {o}")?;
        }
        writeln!(f, "}}")
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    Punct(char),
}

struct Lexer {
    toks: Vec<(Tok, usize)>,
    pos: usize,
}

fn lex(src: &str) -> Result<Vec<(Tok, usize)>, GraphError> {
    let mut toks = Vec::new();
    let mut chars = src.chars().peekable();
    let mut line = 1;
    while let Some(&c) = chars.peek() {
        if c == '\n' {
            line += 1;
            chars.next();
        } else if c.is_whitespace() {
            chars.next();
        } else if c == ';' {
            // Comment to end of line.
            while chars.peek().is_some_and(|&c| c != '\n') {
                chars.next();
            }
        } else if c == '"' {
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some('n') => s.push('\n'),
                        Some(c @ ('"' | '\\')) => s.push(c),
                        other => return Err(GraphError(format!("line {line}: bad escape {other:?}"))),
                    },
                    Some('\n') | None => return Err(GraphError(format!("line {line}: unterminated string"))),
                    Some(c) => s.push(c),
                }
            }
            toks.push((Tok::Str(s), line));
        } else if "=:[],{}".contains(c) {
            chars.next();
            toks.push((Tok::Punct(c), line));
        } else if c.is_alphanumeric() || "_-+.".contains(c) {
            let mut w = String::new();
            while let Some(&c) = chars.peek() {
                let exp_sign = (c == '-' || c == '+') && w.ends_with(['e', 'E']) && w.starts_with(|c: char| c.is_ascii_digit() || c == '-');
                let joiner = c == '+' && w.starts_with(char::is_alphabetic); // scale+residual
                if c.is_alphanumeric() || "_.".contains(c) || exp_sign || joiner || (w.is_empty() && (c == '-' || c == '+')) {
                    w.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            toks.push((Tok::Word(w), line));
        } else {
            return Err(GraphError(format!("line {line}: unexpected character {c:?}")));
        }
    }
    Ok(toks)
}

impl Lexer {
    fn line(&self) -> usize {
        self.toks.get(self.pos).or(self.toks.last()).map_or(0, |t| t.1)
    }
    fn err<T>(&self, msg: impl fmt::Display) -> Result<T, GraphError> {
        Err(GraphError(format!("line {}: {msg}", self.line())))
    }
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.0)
    }
    fn next(&mut self) -> Result<Tok, GraphError> {
        match self.toks.get(self.pos) {
            Some(t) => {
                self.pos += 1;
                Ok(t.0.clone())
            }
            None => self.err("unexpected end of text"),
        }
    }
    fn word(&mut self) -> Result<String, GraphError> {
        match self.next()? {
            Tok::Word(w) => Ok(w),
            t => self.err(format!("expected a word, found {t:?}")),
        }
    }
    fn string(&mut self) -> Result<String, GraphError> {
        match self.next()? {
            Tok::Str(s) => Ok(s),
            t => self.err(format!("expected a string, found {t:?}")),
        }
    }
    fn punct(&mut self, p: char) -> Result<(), GraphError> {
        match self.next()? {
            Tok::Punct(c) if c == p => Ok(()),
            t => self.err(format!("expected '{p}', found {t:?}")),
        }
    }
    fn eat(&mut self, p: char) -> bool {
        if self.peek() == Some(&Tok::Punct(p)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
}

/// Reads a graph from its text form and verifies it.
pub fn parse(src: &str) -> Result<Graph, GraphError> {
    let mut lx = Lexer { toks: lex(src)?, pos: 0 };
    if lx.word()? != "graph" {
        return lx.err("expected 'graph'");
    }
    let mut g = Graph::new(lx.string()?);
    lx.punct('{')?;
    let mut names: HashMap<String, Value> = HashMap::new();
    loop {
        if lx.eat('}') {
            break;
        }
        let first = lx.word()?;
        if first == "output" {
            let v = lx.word()?;
            match names.get(&v) {
                Some(&v) => g.outputs.push(v),
                None => return lx.err(format!("output {v} is not defined")),
            }
            continue;
        }
        lx.punct('=')?;
        let node = parse_node(&mut lx, &names)?;
        if names.insert(first.clone(), Value(g.nodes.len() as u32)).is_some() {
            return lx.err(format!("{first} is defined twice"));
        }
        g.nodes.push(node);
    }
    if lx.peek().is_some() {
        return lx.err("text after the closing '}'");
    }
    verify(&g)?;
    Ok(g)
}

fn parse_node(lx: &mut Lexer, names: &HashMap<String, Value>) -> Result<Node, GraphError> {
    let mnemonic = lx.word()?;
    let leaf_name = if mnemonic == "input" || mnemonic == "weight" { Some(lx.string()?) } else { None };
    let mut args = Vec::new();
    let mut attrs: HashMap<String, String> = HashMap::new();
    while !matches!(lx.peek(), Some(Tok::Punct(':')) | None) {
        let w = lx.word()?;
        if lx.eat('=') {
            let value = lx.word()?;
            if attrs.insert(w.clone(), value).is_some() {
                return lx.err(format!("attribute {w} given twice"));
            }
        } else {
            match names.get(&w) {
                Some(&v) => args.push(v),
                None => return lx.err(format!("{w} is not defined")),
            }
            lx.eat(',');
        }
    }
    lx.punct(':')?;
    let ty = parse_type(lx)?;
    let op = make_op(&mnemonic, leaf_name, &mut attrs).or_else(|e| lx.err(e))?;
    if let Some(k) = attrs.keys().next() {
        return lx.err(format!("{mnemonic} has no attribute {k}"));
    }
    Ok(Node { op, args, ty })
}

fn parse_type(lx: &mut Lexer) -> Result<TensorType, GraphError> {
    let d = lx.word()?;
    let Some(dtype) = DType::from_name(&d) else { return lx.err(format!("unknown dtype {d}")) };
    lx.punct('[')?;
    let mut shape = Vec::new();
    while !lx.eat(']') {
        let w = lx.word()?;
        shape.push(match w.as_str() {
            "seq" => Dim::Seq,
            "out" => Dim::Out,
            n => match n.parse() {
                Ok(n) => Dim::Const(n),
                Err(_) => return lx.err(format!("bad dim {n}")),
            },
        });
        lx.eat(',');
    }
    Ok(TensorType { dtype, shape })
}

fn make_op(mnemonic: &str, leaf_name: Option<String>, attrs: &mut HashMap<String, String>) -> Result<Op, String> {
    fn take<T: std::str::FromStr>(attrs: &mut HashMap<String, String>, k: &str) -> Result<T, String> {
        let v = attrs.remove(k).ok_or_else(|| format!("missing attribute {k}"))?;
        v.parse().map_err(|_| format!("bad value {v} for {k}"))
    }
    /// The optional `epilogue=` of the ternary products (none when absent).
    fn epilogue(attrs: &mut HashMap<String, String>) -> Result<Epilogue, String> {
        match attrs.remove("epilogue") {
            None => Ok(Epilogue::NONE),
            Some(e) => Epilogue::from_name(&e).ok_or(format!("unknown epilogue {e}")),
        }
    }
    if let Some(u) = UnaryOp::ALL.into_iter().find(|u| u.name() == mnemonic) {
        return Ok(Op::Unary(u));
    }
    if let Some(b) = BinaryOp::ALL.into_iter().find(|b| b.name() == mnemonic) {
        return Ok(Op::Binary(b));
    }
    Ok(match mnemonic {
        "input" => Op::Input { name: leaf_name.unwrap() },
        "weight" => Op::Weight { name: leaf_name.unwrap() },
        "embed" => Op::Embed,
        "rms_norm" => Op::RmsNorm { eps: take(attrs, "eps")? },
        "quantize_act" => {
            let s: String = take(attrs, "scheme")?;
            Op::QuantizeAct { scheme: ActQuant::from_name(&s).ok_or(format!("unknown quantization scheme {s}"))? }
        }
        "matmul" => Op::MatMul,
        "ternary_matmul" => Op::TernaryMatMul(epilogue(attrs)?),
        "ternary_cat" => Op::TernaryCat { parts: take(attrs, "parts")?, epilogue: epilogue(attrs)? },
        "slice" => Op::Slice { start: take(attrs, "start")?, len: take(attrs, "len")? },
        "rms_norm_quant" => {
            let s: String = take(attrs, "scheme")?;
            Op::RmsNormQuant { eps: take(attrs, "eps")?, scheme: ActQuant::from_name(&s).ok_or(format!("unknown quantization scheme {s}"))? }
        }
        "glu" => {
            let a: String = take(attrs, "act")?;
            Op::Glu { act: GateAct::from_name(&a).ok_or(format!("unknown gate activation {a}"))? }
        }
        "ternary_glu" => {
            let a: String = take(attrs, "act")?;
            Op::TernaryGlu { act: GateAct::from_name(&a).ok_or(format!("unknown gate activation {a}"))?, epilogue: epilogue(attrs)? }
        }
        "rope" => {
            let mode: String = take(attrs, "mode")?;
            Op::Rope {
                mode: RopeMode::from_name(&mode).ok_or(format!("unknown rope mode {mode}"))?,
                theta: take(attrs, "theta")?,
                head_dim: take(attrs, "head_dim")?,
            }
        }
        "attention" => {
            Op::Attention { layer: take(attrs, "layer")?, heads: take(attrs, "heads")?, kv_heads: take(attrs, "kv_heads")?, head_dim: take(attrs, "head_dim")? }
        }
        "softmax" => Op::Softmax,
        "last_row" => Op::LastRow,
        "select_rows" => Op::SelectRows,
        "cast" => {
            let to: String = take(attrs, "to")?;
            Op::Cast { to: DType::from_name(&to).ok_or(format!("unknown dtype {to}"))? }
        }
        other => return Err(format!("unknown op {other}")),
    })
}
