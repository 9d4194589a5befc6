//! The executor's launches run on the CPU (`cuda::emulator`), so that a
//! whole lowered step (the kernels, the parameters `params` binds for
//! them, the buffers as `slots` shares them, the weights as `host_weight`
//! lays them out, the paged cache and its block tables) is checked against the interpreter without a GPU.

use super::*;
use bitnet_codegen::cuda::emulator::{BlockOrder, Buffer, Module};
use bitnet_codegen::cuda::kernels::DecodeSplit;
use bitnet_codegen::schedule::HeadQuant;
use bitnet_frontends::model::Model;
use bitnet_ir::interp::{Interpreter, KvCache, Tensor};
use bitnet_ir::{DType, Value};

/// A lowered step graph run by the emulator over its own paged cache.
struct Emulated {
    graph: Graph,
    program: Program,
    module: Module,
    weights: HashMap<String, (Buffer, f32)>,
    int8: HashMap<String, [Buffer; 2]>,
    /// Each value's buffer (the GPU executor's plan: values share them)
    /// and each buffer's kind.
    slot: Vec<usize>,
    kinds: Vec<Kind>,
    bufs: Vec<Vec<Buffer>>,
    scratch: Vec<Buffer>,
    /// One-token attention's parts and counters, as the KV cache's.
    splits: Buffer,
    cache: Vec<[Buffer; 2]>,
    tables: Buffer,
    width: usize,
    blocks: usize,
    context: usize,
}

impl Emulated {
    /// The lowered step of `model` (as `lowering::lower_cuda` lowers it for
    /// sm_80), its one-token attention split over blocks as `split` says.
    fn new(model: &Model, head: HeadQuant, blocks: usize, context: usize, split: DecodeSplit) -> Option<Emulated> {
        let graph = bitnet_ir::passes::optimize(model.step_graph().unwrap(), None).unwrap();
        let tiles = |key: &bitnet_codegen::schedule::WorkloadKey| cuda::PhaseTiles::heuristic(key, 80);
        let program = cuda::lower(&graph, &tiles, crate::kv::BLOCK_POSITIONS.trailing_zeros(), head, split).unwrap();
        check(&graph, &program).unwrap();
        let module = Module::build_or_skip("the emulated step", cuda::kernels::PRELUDE, &program.kernels.iter().collect::<Vec<_>>())?;
        let (mut weights, mut int8) = (HashMap::new(), HashMap::new());
        let none = HashMap::new();
        for (key, layout, bytes) in layouts(&[(&graph, &program)], model, &none).unwrap() {
            let name = key.name;
            let w = host_weight(&name, layout, model, &none).unwrap();
            match w {
                HostWeight::Packed { data, scale } => drop(weights.insert(name, (Buffer::of(&data), scale))),
                HostWeight::Bytes(b) => drop(weights.insert(name, (Buffer::of(b), 0.0))),
                HostWeight::F32(v) => drop(weights.insert(name, (Buffer::of(&v), 0.0))),
                HostWeight::Int8(rows) => {
                    assert_eq!(bytes, rows.q.as_bytes().len() + 4 * rows.scale[..].len(), "{name}: the bytes layouts() counts");
                    int8.insert(name, [Buffer::of(rows.q.as_bytes()), Buffer::of(&rows.scale[..])]);
                }
            }
        }
        let positions = 1usize << program.block_shift;
        let mut cache = Vec::new();
        for (_, node) in graph.iter() {
            if let Op::Attention { kv_heads, head_dim, .. } = node.op {
                let bytes = 4 * blocks * positions * kv_heads * head_dim;
                cache.push([Buffer::zeroed(bytes), Buffer::zeroed(bytes)]);
            }
        }
        let width = context.div_ceil(positions);
        let tables = Buffer::zeroed(0);
        let (slot, kinds) = slots(&graph, &program);
        let splits = Buffer::zeroed(4 * split_size(&graph, &program, context));
        Some(Emulated {
            graph,
            program,
            module,
            weights,
            int8,
            slot,
            kinds,
            bufs: Vec::new(),
            scratch: Vec::new(),
            splits,
            cache,
            tables,
            width,
            blocks,
            context,
        })
    }

    /// One step's logits, as `CudaModel::eval` computes them.
    fn eval(&mut self, tokens: &[i32], positions: &[i32], out_rows: &[i32], tables: &[&[u32]]) -> Vec<f32> {
        let e = Extent::new(tokens.len(), out_rows.len());
        // Each buffer as large as the largest value it holds: codes, γ and
        // Σq bytes for int8 activations, else 4 bytes a value.
        let (elems, rows) = buffer_sizes(&self.graph, &self.slot, &self.kinds, e);
        self.bufs = self
            .kinds
            .iter()
            .enumerate()
            .map(|(s, k)| match k {
                Kind::Q8 => vec![Buffer::zeroed(elems[s]), Buffer::zeroed(4 * rows[s]), Buffer::zeroed(4 * rows[s])],
                _ => vec![Buffer::zeroed(4 * elems[s])],
            })
            .collect();
        for (v, node) in self.graph.iter() {
            if let Op::Input { name } = &node.op {
                self.bufs[self.slot[v.index()]][0].write(match name.as_str() {
                    "tokens" => tokens,
                    "positions" => positions,
                    _ => out_rows,
                });
            }
        }
        let (codes, rows) = scratch_size(&self.graph, &self.program, e);
        self.scratch = vec![Buffer::zeroed(codes), Buffer::zeroed(4 * rows), Buffer::zeroed(4 * rows)];
        self.tables = Buffer::of(&flat_tables(tables, self.width));
        for l in &self.program.launches {
            let Some(Geometry { entry, grid, block }) = geometry(l, &self.graph, e, self.context) else { continue };
            let params = params(&self.graph, l, e, self).unwrap();
            // SAFETY: `params` binds the kernel's parameters as the GPU's
            // executor does, to buffers sized for this step.
            unsafe { self.module.launch(entry, (grid.0, grid.1), block, &params) }.unwrap();
        }
        let o = *self.graph.outputs.last().unwrap();
        self.bufs[self.slot[o.index()]][0].read::<f32>(self.graph.ty(o).resolve(e).iter().product())
    }
}

impl Memory for Emulated {
    fn value(&self, v: Value) -> Result<Vec<u64>, EvalError> {
        if let Op::Weight { name } = &self.graph.node(v).op {
            return Ok(vec![self.weights[name].0.addr()]);
        }
        Ok(self.bufs[self.slot[v.index()]].iter().map(Buffer::addr).collect())
    }
    fn beta(&self, name: &str) -> Result<f32, EvalError> {
        Ok(self.weights[name].1)
    }
    fn int8_rows(&self, name: &str) -> Result<[u64; 2], EvalError> {
        let [q, s] = &self.int8[name];
        Ok([q.addr(), s.addr()])
    }
    fn cache(&self, layer: usize, values: bool) -> Result<u64, EvalError> {
        Ok(self.cache[layer][values as usize].addr())
    }
    fn scratch(&self) -> Result<[u64; 3], EvalError> {
        Ok([self.scratch[0].addr(), self.scratch[1].addr(), self.scratch[2].addr()])
    }
    fn splits(&self) -> Result<u64, EvalError> {
        Ok(self.splits.addr())
    }

    fn tables(&self) -> Result<(u64, usize, usize), EvalError> {
        Ok((self.tables.addr(), self.width, self.blocks))
    }
}

/// The interpreter on the same optimized graph: one sequence's rows.
fn reference(model: &Model, graph: &Graph, kv: &mut KvCache, tokens: &[i32], first: i32, out_rows: &[i32]) -> Vec<f32> {
    let positions: Vec<i32> = (first..first + tokens.len() as i32).collect();
    let inputs = [("tokens", Tensor::ids(tokens.to_vec())), ("positions", Tensor::ids(positions)), ("out_rows", Tensor::ids(out_rows.to_vec()))];
    match Interpreter::new(model, 1).eval(graph, &inputs, kv).unwrap().pop() {
        Some(Tensor::F32 { data, .. }) => data,
        _ => panic!("no logits"),
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(scale > 0.0, "{what}: all-zero logits");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 2e-3 * scale, "{what}: logit {i} is {g}, the interpreter's {w}");
    }
}

/// Two sequences through the lowered step, each in blocks of its own: a
/// prompt (the tensor-core kernels), a ragged step of the second's prompt
/// beside the first's next token, then a lone decode token (the one-token
/// kernels: `dp4a` products that quantize their row, attention split over
/// blocks). Every wanted row's logits are the interpreter's, with the
/// blocks of each launch run last first and (I2_S) first first.
#[test]
fn a_lowered_step_runs_as_the_interpreter_on_a_paged_cache() {
    for (dtype, order) in [(DType::I2S, BlockOrder::LastFirst), (DType::I2S, BlockOrder::FirstFirst), (DType::TQ1_0, BlockOrder::LastFirst)] {
        let (model, dir) = super::tests::model(dtype);
        // A chunk a position, two blocks a head, for the one-token attention:
        // its decode step at position 3 merges two chunks in each block and
        // adds the two blocks up.
        let split = DecodeSplit { positions: 1, blocks: 2 };
        let Some(mut gpu) = Emulated::new(&model, HeadQuant::Stored, 6, 64, split) else { return };
        gpu.module.set_block_order(order);
        let graph = gpu.graph.clone();
        let (mut kv0, mut kv1) = (KvCache::new(), KvCache::new());
        let (first, second): (&[u32], &[u32]) = (&[4], &[1, 5]);
        let prompt = [1, 17, 42, 99, 3];
        let got = gpu.eval(&prompt, &[0, 1, 2, 3, 4], &[0, 2, 4], &[first; 5]);
        assert_close(&format!("{dtype}, {order:?}: a prompt"), &got, &reference(&model, &graph, &mut kv0, &prompt, 0, &[0, 2, 4]));
        // The second sequence's 3-token prompt beside the first's next token.
        let got = gpu.eval(&[7, 8, 9, 11], &[0, 1, 2, 5], &[2, 3], &[second, second, second, first]);
        let want = [reference(&model, &graph, &mut kv1, &[7, 8, 9], 0, &[2]), reference(&model, &graph, &mut kv0, &[11], 5, &[0])].concat();
        assert_close(&format!("{dtype}, {order:?}: a ragged step"), &got, &want);
        let got = gpu.eval(&[12], &[3], &[0], &[second]);
        assert_close(&format!("{dtype}, {order:?}: a decode step"), &got, &reference(&model, &graph, &mut kv1, &[12], 3, &[0]));
        std::fs::remove_dir_all(dir).ok();
    }
}

/// `--head q8` through the lowered step: the head's own quantizing launch
/// and its int8 product over the rows `host_weight` quantizes. Its logits
/// are the stored head's within int8 rounding (the GPU test compares them
/// with the CPU's q8 head exactly).
#[test]
fn an_int8_head_runs_through_the_lowered_step() {
    let (model, dir) = super::tests::model(DType::I2S);
    let Some(mut q8) = Emulated::new(&model, HeadQuant::Q8, 2, 32, DecodeSplit::DEFAULT) else { return };
    let Some(mut stored) = Emulated::new(&model, HeadQuant::Stored, 2, 32, DecodeSplit::DEFAULT) else { return };
    let (tokens, positions, table): (&[i32], &[i32], &[u32]) = (&[5, 6, 7], &[0, 1, 2], &[1]);
    let got = q8.eval(tokens, positions, &[0, 2], &[table; 3]);
    let want = stored.eval(tokens, positions, &[0, 2], &[table; 3]);
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 0.03 * scale, "logit {i}: the int8 head's {g}, the stored head's {w}");
    }
    assert_ne!(got, want, "the int8 head rounds");
    std::fs::remove_dir_all(dir).ok();
}
