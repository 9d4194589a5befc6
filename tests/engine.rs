//! Many sequences on one engine: batched steps give each sequence what it
//! would get alone; sequences join and leave mid-way; a shared prefix is
//! computed once; threads share one engine; the KV budget is enforced per
//! sequence and comes back when sequences are dropped.

mod common;

use bitnet_frontends::arch::Activation;
use bitnet_ir::DType;
use bitnet_runtime::{
    BackendKind, Engine, EngineOptions, GenerateOptions, KvType, LoadOptions, RuntimeError, SamplerConfig, Sequence, Session, TextGeneration,
};
use common::*;
use std::path::Path;
use std::sync::Arc;

fn engine(path: &Path, backend: BackendKind, parallel: usize, kv_budget: Option<usize>) -> Arc<Engine> {
    let load = LoadOptions { threads: 2, backend, ..Default::default() };
    Arc::new(Engine::open(path, &EngineOptions { load, parallel, kv_budget, ..Default::default() }).unwrap())
}

fn greedy_opts(n: usize) -> GenerateOptions {
    GenerateOptions { n_predict: n, ignore_eos: true, sampler: SamplerConfig { temperature: 0.0, ..Default::default() }, dump_logits: false }
}

/// Prompts of awkward lengths (1, 3, 17, 40: inside and across blocks).
fn prompts(vocab: u32) -> Vec<Vec<u32>> {
    [1usize, 3, 17, 40, 16, 5].iter().enumerate().map(|(i, &n)| (0..n as u32).map(|j| 1 + (j * 31 + i as u32 * 7) % (vocab - 1)).collect()).collect()
}

fn alone(e: &Arc<Engine>, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut s = Session::new(e.clone());
    s.generate(prompt, &greedy_opts(n), |_| {}).unwrap().generated_ids
}

fn batched_equals_alone(path: &Path, backend: BackendKind) {
    batched_equals_alone_on(engine(path, backend, 3, None), &format!("{} ({})", path.display(), backend.name()));
}

fn batched_equals_alone_on(e: Arc<Engine>, what: &str) {
    let ps = prompts(e.vocab() as u32);
    // Different lengths, so that sequences leave and others join mid-way.
    let ns = [9, 4, 12, 6, 1, 8];
    let want: Vec<Vec<u32>> = ps.iter().zip(ns).map(|(p, n)| alone(&e, p, n)).collect();
    let reqs: Vec<_> = ps.iter().zip(ns).map(|(p, n)| (p.clone(), greedy_opts(n))).collect();
    let mut got = vec![None; ps.len()];
    let mut order = Vec::new();
    e.generate_batch(&reqs, 3, |i, r| {
        order.push(i);
        got[i] = Some(r.unwrap().generated_ids);
    });
    for (i, w) in want.iter().enumerate() {
        assert_eq!(got[i].as_ref(), Some(w), "{what}: prompt {i} batched");
    }
    assert_ne!(order, (0..ps.len()).collect::<Vec<_>>(), "sequences finish out of order when they leave mid-way");
    assert_eq!(e.kv_usage().blocks_used, 0, "every block comes back");
}

#[test]
fn a_batch_gives_each_sequence_what_it_gets_alone() {
    batched_equals_alone(&stories(), BackendKind::Compiled);
    batched_equals_alone(&stories(), BackendKind::Interp);
    let dir = tmp_dir("engine-batch");
    let path = dir.join("m.gguf");
    write_synth(&small_spec(DType::I2S, Activation::Relu2), &path);
    batched_equals_alone(&path, BackendKind::Compiled);
    std::fs::remove_dir_all(dir).ok();
}

/// An f16 KV cache: a budget holds twice the blocks, a batch still gives
/// each sequence what it gets alone (the same rounded numbers either
/// way), and the logits stay within f16's rounding of the f32 cache's.
#[test]
fn an_f16_cache_holds_twice_the_positions() {
    let open = |kv_type, kv_budget| {
        let load = LoadOptions { threads: 2, ..Default::default() };
        Arc::new(Engine::open(&stories(), &EngineOptions { load, parallel: 3, kv_budget, kv_type, ..Default::default() }).unwrap())
    };
    let f32s = open(KvType::F32, None);
    let block = f32s.kv_usage().block_bytes;
    let f16s = open(KvType::F16, Some(6 * block));
    assert_eq!((f16s.kv_type(), 2 * f16s.kv_usage().block_bytes, f16s.kv_usage().blocks_total), (KvType::F16, block, 12));
    let prompt: Vec<u32> = (0..40).map(|j| 1 + (j * 31) % 500).collect();
    let opts = GenerateOptions { dump_logits: true, ..greedy_opts(8) };
    let [want, got] = [&f32s, &f16s].map(|e| Session::new(e.clone()).generate(&prompt, &opts, |_| {}).unwrap().logits);
    assert_eq!(want.len(), got.len());
    let worst = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst > 0.0 && worst < 0.05, "f16 against f32 logits: {worst}");
    batched_equals_alone_on(f16s, "an f16 cache");
}

/// Prompts longer than a batch step's budget (`BATCH_STEP_TOKENS`) go in
/// by chunks, decode rows of the others beside them: each sequence still
/// gets the tokens it gets alone, and every prompt position's logits.
#[test]
fn long_prompts_go_in_by_chunks() {
    let e = engine(&stories(), BackendKind::Compiled, 3, None);
    let vocab = e.vocab() as u32;
    let lens = [300usize, 8, 420];
    assert!(lens.iter().sum::<usize>() > bitnet_runtime::generate::BATCH_STEP_TOKENS);
    let ps: Vec<Vec<u32>> = lens.iter().enumerate().map(|(i, &n)| (0..n as u32).map(|j| 1 + (j * 13 + i as u32 * 5) % (vocab - 1)).collect()).collect();
    let opts = |n| GenerateOptions { dump_logits: true, ..greedy_opts(n) };
    let want: Vec<_> = ps
        .iter()
        .map(|p| {
            let mut s = Session::new(e.clone());
            s.generate(p, &opts(5), |_| {}).unwrap()
        })
        .collect();
    let reqs: Vec<_> = ps.iter().map(|p| (p.clone(), opts(5))).collect();
    let mut got = vec![None; ps.len()];
    // Computed again, not taken from the runs above: every position's logits.
    e.clear_prefix_cache();
    e.generate_batch(&reqs, 3, |i, r| got[i] = Some(r.unwrap()));
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        let g = g.as_ref().unwrap();
        assert_eq!(g.generated_ids, w.generated_ids, "prompt {i}");
        assert_eq!(g.logits.len(), w.logits.len(), "prompt {i}: every position's logits");
        assert_eq!(g.logits.len(), (lens[i] + 4) * vocab as usize);
        let worst = g.logits.iter().zip(&w.logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-3, "prompt {i}: logits differ by {worst}");
    }
    assert_eq!(e.kv_usage().blocks_used, 0, "every block comes back");
}

/// One step's rows from several sequences give the logits each gets in a
/// step of its own.
#[test]
fn batched_logits_match_single_steps() {
    let e = engine(&stories(), BackendKind::Compiled, 4, None);
    let ps = prompts(e.vocab() as u32);
    let single: Vec<Vec<f32>> = ps
        .iter()
        .map(|p| {
            let mut s = e.new_sequence(SamplerConfig::default()).unwrap();
            s.keep_all_logits = true;
            s.feed(p);
            e.step_one(&mut s).unwrap();
            s.logits().to_vec()
        })
        .collect();
    e.clear_prefix_cache();
    let mut seqs: Vec<Sequence> = ps.iter().map(|_| e.new_sequence(SamplerConfig::default()).unwrap()).collect();
    for (s, p) in seqs.iter_mut().zip(&ps) {
        s.keep_all_logits = true;
        s.feed(p);
    }
    let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
    assert!(e.step(&mut refs).iter().all(|r| r.is_ok()));
    for (i, (s, want)) in seqs.iter().zip(&single).enumerate() {
        assert_eq!(s.logits().len(), ps[i].len() * e.vocab());
        let d = rel_diff(s.logits(), want);
        assert!(d < 1e-4, "prompt {i}: batched logits differ by {d}");
    }
}

/// Prompts of one batch that open alike: the later ones wait for the first
/// to compute the whole blocks they share and take them from the prefix
/// cache, and generate what they generate alone.
#[test]
fn a_batch_computes_a_shared_opening_once() {
    let e = engine(&stories(), BackendKind::Compiled, 4, None);
    let opening: Vec<u32> = (0..40).map(|i| 1 + (i * 13) % 500).collect();
    let ps: Vec<Vec<u32>> = [vec![7, 8, 9], vec![100, 200], vec![3]].iter().map(|tail| [opening.as_slice(), tail].concat()).collect();
    let want: Vec<Vec<u32>> = ps.iter().map(|p| alone(&e, p, 6)).collect();
    e.clear_prefix_cache();
    let reqs: Vec<_> = ps.iter().map(|p| (p.clone(), greedy_opts(6))).collect();
    let mut got = vec![None; ps.len()];
    e.generate_batch(&reqs, 3, |i, r| got[i] = Some(r.unwrap()));
    let got: Vec<_> = got.into_iter().map(Option::unwrap).collect();
    assert_eq!(got.iter().map(|g| g.cached_tokens).collect::<Vec<_>>(), [0, 32, 32], "two whole blocks of the opening come from the cache");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(&g.generated_ids, w, "prompt {i}");
    }
    e.clear_prefix_cache();
    assert_eq!(e.kv_usage().blocks_used, 0, "every block comes back");
}

#[test]
fn a_shared_prefix_is_computed_once_and_rewinds_never_touch_it() {
    let e = engine(&stories(), BackendKind::Compiled, 4, None);
    let prefix: Vec<u32> = (0..40).map(|i| 1 + (i * 13) % 500).collect();
    let with = |tail: &[u32]| [prefix.as_slice(), tail].concat();
    let (a_ids, b_ids) = (with(&[7, 8, 9]), with(&[100, 200]));
    let want_b = alone(&e, &b_ids, 8);
    e.clear_prefix_cache();
    let mut a = e.new_sequence(SamplerConfig::default()).unwrap();
    a.feed(&a_ids);
    e.step_one(&mut a).unwrap();
    let mut b = Session::new(e.clone());
    let gen = b.generate(&b_ids, &greedy_opts(8), |_| {}).unwrap();
    assert_eq!(gen.cached_tokens, 32, "two whole blocks of the prefix come from the cache");
    assert_eq!(gen.generated_ids, want_b);
    // B rewinds into the second shared block and goes another way: that
    // block is A's too, so B computes its own copy from position 16.
    let c_ids = [&prefix[..20], &[300, 301, 302]].concat();
    let seq = b.sequence();
    seq.prompt(&c_ids);
    assert_eq!(seq.tokens().len(), 16);
    e.step_one(seq).unwrap();
    let got_c = seq.last_logits().unwrap().to_vec();
    e.clear_prefix_cache();
    let mut fresh = e.new_sequence(SamplerConfig::default()).unwrap();
    fresh.feed(&c_ids);
    e.step_one(&mut fresh).unwrap();
    assert_eq!(fresh.cached_tokens(), 16);
    let d = rel_diff(&got_c, fresh.last_logits().unwrap());
    assert!(d < 1e-5, "rewound sequence differs by {d}");
    // A's cache is as it was: its next step agrees with a fresh run.
    a.feed(&[5]);
    e.step_one(&mut a).unwrap();
    drop((b, fresh));
    e.clear_prefix_cache();
    let mut a2 = e.new_sequence(SamplerConfig::default()).unwrap();
    a2.feed(&[a_ids.as_slice(), &[5]].concat());
    e.step_one(&mut a2).unwrap();
    let d = rel_diff(a.last_logits().unwrap(), a2.last_logits().unwrap());
    assert!(d < 1e-5, "the sharer's cache changed: {d}");
    drop((a, a2));
    e.clear_prefix_cache();
    let u = e.kv_usage();
    assert_eq!((u.blocks_used, u.blocks_cached), (0, 0));
}

#[test]
fn threads_share_one_engine() {
    let e = engine(&stories(), BackendKind::Compiled, 8, None);
    let ps: Vec<Vec<u32>> = (0..8u32).map(|i| (0..(3 + 5 * i)).map(|j| 1 + (j * 17 + i * 29) % 500).collect()).collect();
    let want: Vec<Vec<u32>> = ps.iter().map(|p| alone(&e, p, 10)).collect();
    let got: Vec<Vec<u32>> = std::thread::scope(|scope| {
        let hs: Vec<_> = ps.iter().map(|p| scope.spawn(|| alone(&e, p, 10))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(got, want);
    assert_eq!(e.kv_usage().blocks_used, 0);
}

/// Threads that each generate on their own sequence (as the language
/// bindings do, through `TextGeneration` and `step_one`) share steps: the
/// outputs are their serial ones, in fewer steps than the serial runs took.
#[test]
fn concurrent_step_one_callers_share_steps() {
    let e = engine(&stories(), BackendKind::Compiled, 8, None);
    let ps: Vec<Vec<u32>> = (0..8u32).map(|i| (0..(4 + 3 * i)).map(|j| 1 + (j * 13 + i * 31) % 500).collect()).collect();
    let generate = |p: &Vec<u32>| {
        let g = TextGeneration::start(e.clone(), p, &greedy_opts(12), Vec::new()).unwrap();
        g.finish(|g| g.next_piece()).unwrap()
    };
    let before = e.steps_taken();
    let want: Vec<(String, Vec<u32>)> = ps.iter().map(generate).collect();
    let serial_steps = e.steps_taken() - before;
    let start = std::sync::Barrier::new(ps.len());
    let before = e.steps_taken();
    let got: Vec<(String, Vec<u32>)> = std::thread::scope(|scope| {
        let hs: Vec<_> = ps
            .iter()
            .map(|p| {
                let start = &start;
                let generate = &generate;
                scope.spawn(move || {
                    start.wait();
                    generate(p)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let together_steps = e.steps_taken() - before;
    assert_eq!(got, want);
    // TextGeneration chooses what Engine::generate chooses.
    assert_eq!(want[0].1, alone(&e, &ps[0], 12));
    assert!(together_steps < serial_steps, "{together_steps} steps together, {serial_steps} one after another: no step was shared");
    assert_eq!(e.kv_usage().blocks_used, 0);
}

#[test]
fn a_full_budget_fails_that_sequence_only() {
    let probe = engine(&stories(), BackendKind::Compiled, 1, None);
    let block = probe.kv_usage().block_bytes;
    drop(probe);
    let e = engine(&stories(), BackendKind::Compiled, 1, Some(3 * block));
    assert_eq!(e.kv_usage().blocks_total, 3);
    let mut small = e.new_sequence(SamplerConfig::default()).unwrap();
    let mut big = e.new_sequence(SamplerConfig::default()).unwrap();
    small.feed(&[1, 2, 3]);
    big.feed(&(1..60).collect::<Vec<u32>>());
    let r = e.step(&mut [&mut small, &mut big]);
    assert!(r[0].is_ok());
    match &r[1] {
        Err(RuntimeError::KvFull(full)) => assert!(full.to_string().contains("KV cache is full") && full.need == 4, "{full}"),
        other => panic!("expected a full KV cache, got {other:?}"),
    }
    assert!(big.pending().is_empty() && big.tokens().is_empty(), "a failed sequence is as it was");
    // The small one goes on; giving it back frees its block.
    small.feed(&[4]);
    e.step_one(&mut small).unwrap();
    assert_eq!(e.kv_usage().blocks_used, 1);
    drop(small);
    assert_eq!(e.kv_usage().blocks_used, 0);
    // Bad tokens and an overlong prompt are that sequence's errors too.
    let mut bad = e.new_sequence(SamplerConfig::default()).unwrap();
    bad.feed(&[1, 1_000_000]);
    assert!(e.step_one(&mut bad).unwrap_err().to_string().contains("outside the model's vocabulary"));
    // A budget smaller than one block is refused when the engine opens.
    let load = LoadOptions { threads: 1, ..Default::default() };
    let err = Engine::open(&stories(), &EngineOptions { load, parallel: 1, kv_budget: Some(block - 1), ..Default::default() }).err().unwrap();
    assert!(err.to_string().contains("holds no block"), "{err}");
}

#[test]
fn run_batches_a_prompts_file_in_input_order() {
    let dir = tmp_dir("engine-run");
    let file = dir.join("ids.txt");
    std::fs::write(&file, "1,403,407\n1,261\n1,2,x\n1,378,379,380,381\n").unwrap();
    let m = stories();
    let m = m.to_str().unwrap();
    let o = bitnet(&["run", "-m", m, "--prompt-ids-file", file.to_str().unwrap(), "--parallel", "2", "-n", "6", "--temp", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["index"], i);
    }
    assert!(lines[2]["error"].as_str().unwrap().contains("not a token id"), "{}", lines[2]);
    for (i, ids) in [(0, "1,403,407"), (3, "1,378,379,380,381")] {
        let one = bitnet(&["run", "-m", m, "--prompt-ids", ids, "-n", "6", "--temp", "0", "--json"]);
        let j: serde_json::Value = serde_json::from_str(&stdout(&one)).unwrap();
        assert_eq!(lines[i]["generated_ids"], j["generated_ids"], "prompt {i}");
        assert_eq!(lines[i]["generated_ids"].as_array().unwrap().len(), 6);
    }
    // Text prompts, one a line, with -f and --parallel.
    let text = dir.join("prompts.txt");
    std::fs::write(&text, "Once upon a time\nThe little dog\n").unwrap();
    let o = bitnet(&["run", "-m", m, "-f", text.to_str().unwrap(), "--parallel", "2", "-n", "5", "--temp", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    let one = bitnet(&["run", "-m", m, "-p", "The little dog", "-n", "5", "--temp", "0", "--json"]);
    let j: serde_json::Value = serde_json::from_str(&stdout(&one)).unwrap();
    assert_eq!(lines[1]["generated_ids"], j["generated_ids"]);
    assert_eq!(lines[1]["text"], j["text"]);
    std::fs::remove_dir_all(dir).ok();
}
