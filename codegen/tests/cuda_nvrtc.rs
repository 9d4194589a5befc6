//! Every CUDA kernel family, at the 2B4T shapes and at awkward ones,
//! compiles with NVRTC and its PTX assembles with ptxas for sm_80 and
//! sm_90. No GPU is needed. Without NVRTC (or ptxas) the tests say so and
//! skip, unless `BITNET_REQUIRE_NVRTC=1` (set by CI, which installs both)
//! makes that a failure.

use bitnet_codegen::cuda::kernels::{self as k, Acts, Columns, CudaTiles, FloatType, TernaryEpilogue};
use bitnet_codegen::cuda::{nvrtc, padded};
use bitnet_ir::{BinaryOp, GateAct, RopeMode, UnaryOp};

fn nvrtc_or_skip(test: &str) -> bool {
    match nvrtc::library() {
        Ok(_) => true,
        Err(e) if std::env::var_os("BITNET_REQUIRE_NVRTC").is_some() => panic!("{test}: BITNET_REQUIRE_NVRTC is set but {e}"),
        Err(e) => {
            eprintln!("{test}: skipped: {e}");
            false
        }
    }
}

/// One module with every family at the shapes given: `(n, k)` matrix
/// products, rows of `hidden`, heads of `d`.
fn module(products: &[(usize, usize)], rows: &[usize], tiles: &[CudaTiles]) -> String {
    let mut src = String::from(k::PRELUDE);
    let mut i = 0;
    let mut add = |code: String| {
        src += &format!("extern \"C\" __global__ void kernel_{i}{code}\n");
        i += 1;
    };
    for &(n, kk) in products {
        for &t in tiles {
            for (scale, residual) in [(false, false), (true, false), (false, true), (true, true)] {
                add(k::ternary_matmul(n, padded(kk), TernaryEpilogue { scale, residual }, Acts::Given, t));
            }
            for (act, scale) in [(GateAct::Silu, false), (GateAct::Relu2, true)] {
                add(k::ternary_glu(n, padded(kk), act, scale, Acts::Given, t));
            }
            // q, k and v as one product: into buffers of their own, and side by side.
            let parts = [n, n.div_ceil(4), n.div_ceil(4)];
            let apart = parts.map(|width| Columns { width, start: 0 });
            let joined = [0, n, n + parts[1]].map(|start| Columns { width: parts.iter().sum(), start });
            add(k::ternary_cat(&parts, padded(kk), false, &apart, Acts::Given, t));
            add(k::ternary_cat(&parts, padded(kk), true, &joined, Acts::Given, t));
            // The one-token kernels that quantize their row themselves, and their many-token twins.
            for (norm, here) in [(Some(1e-5), true), (None, true), (Some(1e-6), false)] {
                let acts = Acts::Rows { k: kk, norm, here };
                add(k::ternary_matmul(n, padded(kk), TernaryEpilogue { scale: true, residual: true }, acts, t));
                add(k::ternary_glu(n, padded(kk), GateAct::Relu2, false, acts, t));
                add(k::ternary_cat(&parts, padded(kk), true, &apart, acts, t));
            }
            // The tensor cores run ternary products only.
            if !t.mma {
                add(k::int8_matmul(n, padded(kk), t));
                for ty in [FloatType::F32, FloatType::F16, FloatType::BF16] {
                    add(k::matmul(ty, n, kk, t));
                }
            }
        }
    }
    for &row in rows {
        add(k::rms_norm(row, 1e-5));
        add(k::quantize_rows(row, padded(row), Some(1e-6)));
        add(k::quantize_rows(row, padded(row), None));
        add(k::softmax(row));
        add(k::last_row(row));
        add(k::select_rows(row));
        add(k::slice(row, row / 3, row - row / 3));
        for act in [GateAct::Silu, GateAct::Relu2] {
            add(k::glu(act, row));
        }
        for u in UnaryOp::ALL {
            add(k::unary(u, row));
        }
        for op in BinaryOp::ALL {
            add(k::binary(op, row, None));
            add(k::binary(op, row, Some(row)));
            add(k::binary(op, row, Some(1)));
        }
        for ty in [FloatType::F32, FloatType::F16, FloatType::BF16] {
            add(k::embed(ty, 1000, row));
            add(k::cast(ty, row));
        }
    }
    for (heads, kv_heads, d) in [(20, 5, 128), (8, 4, 8), (3, 1, 2), (1, 1, 64)] {
        for shift in [0, 4, 8] {
            add(k::kv_store(kv_heads, d, shift));
            add(k::attention(heads, kv_heads, d, shift, None, k::DecodeSplit::DEFAULT.positions, false));
            add(k::attention(heads, kv_heads, d, shift, None, k::DecodeSplit::DEFAULT.positions, true));
            for mode in [RopeMode::Interleaved, RopeMode::Neox] {
                add(k::rope_kv_store(heads, kv_heads, d, mode, 500000.0, shift));
                for here in [false, true] {
                    add(k::attention(heads, kv_heads, d, shift, Some(k::OwnRope { mode, theta: 500000.0, here }), 256, false));
                    add(k::attention(heads, kv_heads, d, shift, Some(k::OwnRope { mode, theta: 500000.0, here }), 7, true));
                }
            }
        }
        for mode in [RopeMode::Interleaved, RopeMode::Neox] {
            add(k::rope(heads * d, d, mode, 500000.0));
        }
    }
    src
}

fn check(name: &str, src: &str) {
    for sm in [80, 90] {
        let ptx = nvrtc::compile(src, sm).unwrap_or_else(|e| panic!("{name}, sm_{sm}: {e}"));
        assert!(ptx.contains(&format!(".target sm_{sm}")), "{name}: PTX for another target");
        match nvrtc::ptxas() {
            Some(ptxas) => {
                let dir = std::env::temp_dir().join(format!("bitnet-ptxas-{}-{name}-{sm}", std::process::id()));
                std::fs::create_dir_all(&dir).unwrap();
                let file = dir.join("k.ptx");
                std::fs::write(&file, &ptx).unwrap();
                let out = std::process::Command::new(&ptxas).arg(format!("-arch=sm_{sm}")).arg(&file).arg("-o").arg(dir.join("k.cubin")).output().unwrap();
                let _ = std::fs::remove_dir_all(&dir);
                assert!(out.status.success(), "{name}, ptxas sm_{sm}: {}", String::from_utf8_lossy(&out.stderr));
            }
            None if std::env::var_os("BITNET_REQUIRE_NVRTC").is_some() => panic!("BITNET_REQUIRE_NVRTC is set but ptxas was not found"),
            None => eprintln!("{name}: ptxas not found; PTX not assembled"),
        }
    }
}

#[test]
fn kernels_at_2b4t_shapes_compile() {
    if !nvrtc_or_skip("kernels_at_2b4t_shapes_compile") {
        return;
    }
    let products = [(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912), (128256, 2560)];
    check("2b4t", &module(&products, &[2560, 6912, 128256], &[CudaTiles::DEFAULT, CudaTiles::MMA_DEFAULT]));
}

#[test]
fn kernels_at_awkward_shapes_and_every_tile_compile() {
    if !nvrtc_or_skip("kernels_at_awkward_shapes_and_every_tile_compile") {
        return;
    }
    let dp4a = CudaTiles::WARPS.iter().flat_map(|&warps| CudaTiles::TOKENS.map(|tokens| CudaTiles { warps, tokens, mma: false }));
    let mma = CudaTiles::WARPS.iter().flat_map(|&warps| CudaTiles::MMA_TOKENS.map(|tokens| CudaTiles { warps, tokens, mma: true }));
    let tiles: Vec<CudaTiles> = dp4a.chain(mma).collect();
    assert!(tiles.iter().all(CudaTiles::is_valid));
    let mut src = module(&[(1, 1), (3, 3), (2592, 2592)], &[1, 3, 783, 2592], &[CudaTiles::DEFAULT]);
    src += &module(&[(783, 783)], &[], &tiles)[k::PRELUDE.len()..].replace("kernel_", "tiled_");
    check("awkward", &src);
}

#[test]
fn nvrtc_rejects_bad_source_with_its_log() {
    if !nvrtc_or_skip("nvrtc_rejects_bad_source_with_its_log") {
        return;
    }
    let e = nvrtc::compile("extern \"C\" __global__ void f() { undefined_thing(); }", 80).unwrap_err();
    assert!(e.contains("undefined_thing"), "{e}");
}
