//! The CUDA backend. On a machine with an NVIDIA GPU: logits within a
//! float budget of the CPU backend's and greedy tokens equal to them, for
//! synthetic models in every ternary format and stories260K; when they
//! differ, every intermediate value is compared with the interpreter's to
//! name the first kernel that is off. Without a GPU those tests say so and
//! skip, and the CLI must say what is missing. Compiling the kernels with
//! NVRTC needs no GPU: CI runs those checks (`BITNET_REQUIRE_NVRTC=1`).

mod common;

use bitnet_codegen::schedule::HeadQuant;
use bitnet_frontends::arch::Activation;
use bitnet_ir::interp::{Interpreter, KvCache, Tensor};
use bitnet_ir::DType;
use bitnet_runtime::cuda::Step;
use bitnet_runtime::kv::BLOCK_POSITIONS;
use bitnet_runtime::{BackendKind, Device, Engine, EngineOptions, GenerateOptions, LoadOptions, SamplerConfig, Session};
use common::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn gpu_or_skip(test: &str) -> bool {
    match bitnet_runtime::cuda::device() {
        Ok((_, name)) => {
            eprintln!("{test}: running on {name}");
            true
        }
        Err(e) => {
            eprintln!("{test}: skipped, no GPU: {e}");
            false
        }
    }
}

fn nvrtc_or_skip(test: &str) -> bool {
    match bitnet_codegen::cuda::nvrtc::library() {
        Ok(_) => true,
        Err(e) if std::env::var_os("BITNET_REQUIRE_NVRTC").is_some() => panic!("{test}: BITNET_REQUIRE_NVRTC is set but {e}"),
        Err(e) => {
            eprintln!("{test}: skipped: {e}");
            false
        }
    }
}

fn load(path: &Path, device: Device, head: HeadQuant) -> Session {
    let mut opts = LoadOptions { threads: 2, backend: BackendKind::Compiled, device, ..Default::default() };
    opts.pinned.head = head;
    Session::load(path, &opts).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every f32 value of the GPU's run of `prompt` (then, with `next`, of
/// that one token after it: the one-token kernels) against the
/// interpreter's run of the same optimized graph: the first that is off
/// names the kernel.
fn first_disagreement(path: &Path, prompt: &[u32], next: Option<u32>, head: HeadQuant) -> String {
    let gpu = load(path, Device::Cuda, head);
    let ids: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let pos: Vec<i32> = (0..prompt.len() as i32).collect();
    // One sequence in the (fresh) engine's first blocks, every row's logits.
    let table: Vec<u32> = (0..(prompt.len() + 1).div_ceil(BLOCK_POSITIONS) as u32).collect();
    let tables = vec![table.as_slice(); prompt.len()];
    let step = Step { tokens: &ids, positions: &pos, out_rows: &pos, tables: &tables };
    let (next_ids, next_pos): (Vec<i32>, Vec<i32>) = (next.iter().map(|&t| t as i32).collect(), vec![prompt.len() as i32]);
    let (traced, mut g) = gpu.with_backend(|b| {
        let c = b.as_cuda().expect("a CUDA session");
        let mut traced = c.trace(&step).unwrap().1;
        if next.is_some() {
            let one = Step { tokens: &next_ids, positions: &next_pos, out_rows: &[0], tables: &[table.as_slice()] };
            traced = c.trace(&one).unwrap().1;
        }
        (traced, c.graph().clone())
    });
    let interp = Interpreter::new(&gpu.model, 2);
    g.outputs = traced.iter().map(|(v, _)| *v).collect();
    let mut kv = KvCache::new();
    let inputs = [("tokens", Tensor::ids(ids.clone())), ("positions", Tensor::ids(pos.clone())), ("out_rows", Tensor::ids(pos.clone()))];
    let mut want = interp.eval(&g, &inputs, &mut kv).unwrap();
    if next.is_some() {
        let inputs = [("tokens", Tensor::ids(next_ids.clone())), ("positions", Tensor::ids(next_pos.clone())), ("out_rows", Tensor::ids(vec![0]))];
        want = interp.eval(&g, &inputs, &mut kv).unwrap();
    }
    let mut report = String::new();
    for ((v, got), w) in traced.iter().zip(&want) {
        let w = w.as_f32().unwrap();
        let d = rel_diff(got, w);
        if d > 2e-3 || got.iter().any(|x| x.is_nan()) {
            report += &format!("{v} = {}: max rel diff {d}\n", g.node(*v).op.mnemonic());
            if report.lines().count() >= 8 {
                break;
            }
        }
    }
    report
}

/// The GPU against the CPU, both reading the head as `head` says.
fn compare(path: &Path, prompt: &[u32], head: HeadQuant) {
    let mut cpu = load(path, Device::Cpu, head);
    let mut gpu = load(path, Device::Cuda, head);
    let want = cpu.eval(prompt, true).unwrap();
    let got = gpu.eval(prompt, true).unwrap();
    let (d, c) = (rel_diff(&got, &want), cosine(&got, &want));
    if !(d < 2e-3 && c > 0.9999) {
        panic!(
            "{}: logits differ from the CPU's: max rel diff {d}, cosine {c}; first values off:\n{}",
            path.display(),
            first_disagreement(path, prompt, None, head)
        );
    }
    let next = [7u32];
    let (want, got) = (cpu.eval(&next, false).unwrap(), gpu.eval(&next, false).unwrap());
    if rel_diff(&got, &want) >= 2e-3 {
        let off = first_disagreement(path, prompt, Some(next[0]), head);
        panic!("{}: the decode step differs: {}; first values off:\n{off}", path.display(), rel_diff(&got, &want));
    }
    assert_eq!(greedy(&mut gpu, prompt, 12), greedy(&mut cpu, prompt, 12), "{}: greedy tokens differ", path.display());
}

#[test]
fn cuda_agrees_with_the_cpu_on_synthetic_models() {
    if !gpu_or_skip("cuda_agrees_with_the_cpu_on_synthetic_models") {
        return;
    }
    let dir = tmp_dir("cuda");
    each_small_ternary_model(&dir, |path| compare(path, &[1, 17, 42, 99, 3, 250, 8], HeadQuant::Stored));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn cuda_agrees_with_the_cpu_on_stories260k() {
    if !gpu_or_skip("cuda_agrees_with_the_cpu_on_stories260k") {
        return;
    }
    compare(&stories(), &[1, 403, 407, 261, 378], HeadQuant::Stored);
    // The known greedy continuation, through the CLI.
    let o = bitnet(&["run", "-m", stories().to_str().unwrap(), "-p", "Once upon a time", "-n", "24", "--temp", "0", "--device", "cuda"]);
    let cpu = bitnet(&["run", "-m", stories().to_str().unwrap(), "-p", "Once upon a time", "-n", "24", "--temp", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), stdout(&cpu));
}

/// Several sequences a step on the GPU (ragged batches over the paged
/// cache: prompts of awkward lengths, sequences leaving and joining
/// mid-way, a prefix shared by whole blocks) give each sequence the greedy
/// tokens the CPU gives it alone, and every block comes back.
#[test]
fn cuda_steps_many_sequences_as_the_cpu_runs_each_alone() {
    if !gpu_or_skip("cuda_steps_many_sequences_as_the_cpu_runs_each_alone") {
        return;
    }
    let path = stories();
    let open = |device| {
        let load = LoadOptions { threads: 2, backend: BackendKind::Compiled, device, ..Default::default() };
        Arc::new(Engine::open(&path, &EngineOptions { load, parallel: 3, ..Default::default() }).unwrap())
    };
    let (cpu, gpu) = (open(Device::Cpu), open(Device::Cuda));
    let greedy = |n| GenerateOptions { n_predict: n, ignore_eos: true, sampler: SamplerConfig { temperature: 0.0, ..Default::default() }, dump_logits: false };
    let shared: Vec<u32> = (0..BLOCK_POSITIONS as u32).map(|j| 1 + (j * 37) % 500).collect();
    let prompts: Vec<Vec<u32>> = [1usize, 3, 17, 40, 5, 21]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let own = (0..n as u32).map(|j| 1 + (j * 31 + i as u32 * 7) % 500);
            if i % 2 == 1 {
                shared.iter().copied().chain(own).collect()
            } else {
                own.collect()
            }
        })
        .collect();
    let ns = [9, 4, 12, 6, 1, 8];
    let want: Vec<Vec<u32>> = prompts.iter().zip(ns).map(|(p, n)| Session::new(cpu.clone()).generate(p, &greedy(n), |_| {}).unwrap().generated_ids).collect();
    let reqs: Vec<_> = prompts.iter().zip(ns).map(|(p, n)| (p.clone(), greedy(n))).collect();
    let mut got = vec![None; prompts.len()];
    gpu.generate_batch(&reqs, 3, |i, r| got[i] = Some(r.unwrap().generated_ids));
    for (i, w) in want.iter().enumerate() {
        assert_eq!(got[i].as_ref(), Some(w), "prompt {i}: the GPU's batched tokens differ from the CPU's alone");
    }
    assert_eq!(gpu.kv_usage().blocks_used, 0, "every block comes back");
}

/// `--head q8` on the GPU reads the same int8 rows as on the CPU: logits
/// within the float budget of the CPU's `--head q8`, the same decode step
/// and greedy tokens.
#[test]
fn cuda_int8_head_agrees_with_the_cpus() {
    if !gpu_or_skip("cuda_int8_head_agrees_with_the_cpus") {
        return;
    }
    let dir = tmp_dir("cuda-q8");
    let path = dir.join("m.gguf");
    write_synth(&small_spec(DType::I2S, Activation::Silu), &path);
    compare(&path, &[1, 17, 42, 99, 3, 250, 8], HeadQuant::Q8);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn without_a_gpu_the_cli_says_what_is_missing() {
    if bitnet_runtime::cuda::device().is_ok() {
        eprintln!("without_a_gpu_the_cli_says_what_is_missing: skipped, this machine has a GPU");
        return;
    }
    let m = stories();
    for cmd in ["run", "bench"] {
        let prompt = if cmd == "run" { "hi" } else { "4" };
        let o = bitnet(&[cmd, "-m", m.to_str().unwrap(), "-p", prompt, "-n", "2", "--device", "cuda"]);
        let e = stderr(&o);
        assert!(!o.status.success() && (e.contains("libcuda") || e.contains("no CUDA device")), "{cmd}: {e}");
        assert!(!e.contains("panicked"), "{cmd}: {e}");
    }
    let o = bitnet(&["run", "-m", m.to_str().unwrap(), "-p", "hi", "--device", "cuda", "--backend", "interp"]);
    assert!(!o.status.success() && stderr(&o).contains("CPU only"), "{}", stderr(&o));
    let o = bitnet(&["autotune", "--shapes", "2b4t", "--device", "cuda"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("autotune --device cuda") && (e.contains("libcuda") || e.contains("no CUDA device")), "{e}");
}

/// `autotune --device cuda` measures every candidate of a model's matrix
/// products on the GPU and keeps them under the GPU's name; `run` and
/// `compile` then lower with them (one kernel for prefill, another for
/// decode where those differ) and still give the CPU's greedy tokens.
#[test]
fn cuda_autotune_stores_tiles_that_run_and_compile_use() {
    if !gpu_or_skip("cuda_autotune_stores_tiles_that_run_and_compile_use") {
        return;
    }
    let dir = tmp_dir("cuda-tune");
    let m = dir.join("m.gguf");
    write_synth(&small_spec(DType::I2S, Activation::Relu2), &m);
    let cache = dir.join("cache");
    let with_cache = |args: &[&str]| {
        let o = bitnet_cached(&cache, args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        o
    };
    let o = with_cache(&["autotune", "-m", m.to_str().unwrap(), "--device", "cuda"]);
    let table = stdout(&o);
    eprintln!("{table}");
    assert!(table.contains("ternary_matmul n=256 k=256") && table.contains("decode") && table.contains("prefill"), "{table}");
    assert!(!table.contains("wrong") && !table.contains("skipped"), "{table}");
    let list = stdout(&with_cache(&["autotune", "list"]));
    assert!(list.contains("GPU ") && list.contains("isa=cuda"), "{list}");
    let lowered = stderr(&with_cache(&["compile", "-m", m.to_str().unwrap(), "--device", "cuda", "--dump-after", "schedule"]));
    assert!(!lowered.contains("warning"), "{lowered}");
    let ids = |o: std::process::Output| serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap()["generated_ids"].clone();
    let run = |device: &str| {
        with_cache(&["run", "-m", m.to_str().unwrap(), "--prompt-ids", "1,17,42,99,3", "-n", "12", "--temp", "0", "--ignore-eos", "--json", "--device", device])
    };
    assert_eq!(ids(run("cuda")), ids(run("cpu")));
    std::fs::remove_dir_all(dir).ok();
}

/// `bitnet compile --device cuda` lowers real models and compiles their
/// kernels with NVRTC, for sm_80 and sm_90, with no GPU.
#[test]
fn compile_device_cuda_compiles_every_model_kernel_without_a_gpu() {
    if !nvrtc_or_skip("compile_device_cuda_compiles_every_model_kernel_without_a_gpu") {
        return;
    }
    let dir = tmp_dir("cuda-compile");
    let mut models: Vec<PathBuf> = vec![stories()];
    for dtype in [DType::I2S, DType::TQ1_0] {
        let path = dir.join(format!("{dtype}.gguf"));
        write_synth(&small_spec(dtype, Activation::Silu), &path);
        models.push(path);
    }
    for m in &models {
        for sm in ["80", "90"] {
            for all in [false, true] {
                let mut args = vec!["compile", "-m", m.to_str().unwrap(), "--device", "cuda", "--dump-after", "schedule", "--sm", sm];
                if all {
                    args.push("--all-logits");
                }
                let o = bitnet(&args);
                assert!(o.status.success(), "{}: {}", m.display(), stderr(&o));
                assert!(stderr(&o).contains("compiled by NVRTC") && stderr(&o).contains(&format!("sm_{sm}")), "{}", stderr(&o));
                assert!(stdout(&o).contains("ternary_matmul_") || m == &stories(), "{}", stdout(&o));
                assert!(stdout(&o).contains("attention_"), "{}", stdout(&o));
            }
        }
    }
    let o = bitnet(&["compile", "-m", models[1].to_str().unwrap(), "--device", "cuda", "--head", "q8", "-o", dir.join("y.bnx").to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("--device cuda --head q8"), "{}", stderr(&o));
    let o = bitnet(&["compile", "-m", models[1].to_str().unwrap(), "--device", "cuda", "--head", "q4", "-o", dir.join("y.bnx").to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("CPU option"), "{}", stderr(&o));
    // The int8 head's launches, compiled: quantize the head's input, then the int8 product.
    let o = bitnet(&["compile", "-m", models[1].to_str().unwrap(), "--device", "cuda", "--head", "q8", "--dump-after", "schedule"]);
    assert!(o.status.success() && stdout(&o).contains("int8_matmul_") && stdout(&o).contains("quantize_act_"), "{}", stderr(&o));
    std::fs::remove_dir_all(dir).ok();
}

/// A CUDA artifact: written with no GPU, described by `inspect`, refused
/// on the CPU with a clear message, and never a panic when damaged.
#[test]
fn cuda_artifacts_are_written_without_a_gpu_and_refused_clearly() {
    if !nvrtc_or_skip("cuda_artifacts_are_written_without_a_gpu_and_refused_clearly") {
        return;
    }
    let dir = tmp_dir("cuda-artifact");
    let src = dir.join("m.gguf");
    write_synth(&small_spec(DType::TQ2_0, Activation::Relu2), &src);
    let bnx = dir.join("m.bnx");
    let o = bitnet(&["compile", "-m", src.to_str().unwrap(), "--device", "cuda", "--sm", "80", "-o", bnx.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = bitnet(&["inspect", bnx.to_str().unwrap()]);
    let text = stdout(&o);
    assert!(text.contains("target: cuda") && text.contains("CUDA kernels:") && text.contains("ternary_matmul n=256 k=256"), "{text}");
    let o = bitnet(&["run", "-m", bnx.to_str().unwrap(), "-p", "hi", "-n", "2"]);
    assert!(!o.status.success() && stderr(&o).contains("holds CUDA kernels"), "{}", stderr(&o));
    let bytes = std::fs::read(&bnx).unwrap();
    let damaged = dir.join("damaged.bnx");
    let header_end = 24 + u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    // The file ends in alignment padding: the last cut drops the last byte
    // of real data, not only padding.
    let data_end = bytes.iter().rposition(|&b| b != 0).unwrap();
    for cut in [30, header_end / 2, header_end + 10, bytes.len() / 2, data_end] {
        std::fs::write(&damaged, &bytes[..cut]).unwrap();
        let o = bitnet(&["run", "-m", damaged.to_str().unwrap(), "-p", "hi", "-n", "2", "--device", "cuda"]);
        assert!(!o.status.success() && !stderr(&o).contains("panicked"), "cut at {cut}: {}", stderr(&o));
    }
    // A launch that names an operand its node does not have.
    let text = String::from_utf8_lossy(&bytes[24..header_end]).replacen("{\"Operand\":1}", "{\"Operand\":9}", 1);
    let mut fixed = bytes[..16].to_vec();
    fixed.extend_from_slice(&(text.len() as u64).to_le_bytes());
    fixed.extend_from_slice(text.as_bytes());
    fixed.extend_from_slice(&bytes[header_end..]);
    std::fs::write(&damaged, &fixed).unwrap();
    let o = bitnet(&["run", "-m", damaged.to_str().unwrap(), "-p", "hi", "-n", "2", "--device", "cuda"]);
    let e = stderr(&o);
    assert!(!o.status.success() && !e.contains("panicked") && (e.contains("does not fit its node") || e.contains("libcuda")), "{e}");
    if bitnet_runtime::cuda::device().is_ok() {
        assert!(e.contains("does not fit its node"), "{e}");
        // Serialize, then reload: the artifact's tokens are the in-memory ones.
        let run = |m: &Path| {
            bitnet(&["run", "-m", m.to_str().unwrap(), "--prompt-ids", "1,17,42", "-n", "12", "--temp", "0", "--ignore-eos", "--device", "cuda", "--json"])
        };
        let (a, b) = (run(&bnx), run(&src));
        assert!(a.status.success(), "{}", stderr(&a));
        let ids = |o: &std::process::Output| serde_json::from_str::<serde_json::Value>(&stdout(o)).unwrap()["generated_ids"].clone();
        assert_eq!(ids(&a), ids(&b));
    }
    std::fs::remove_dir_all(dir).ok();
}
