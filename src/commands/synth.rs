//! `bitnet synth`: random-weight BitNet models of any shape.

use anyhow::Context;
use bitnet_frontends::arch::Activation;
use bitnet_frontends::gguf::GgufFile;
use bitnet_frontends::synth::{self, SynthShape, SynthSpec};
use bitnet_ir::DType;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Sizes at --shape 2b4t: about 1.2 GB as i2_s or tq2_0 (with an f16 head), \
4.8 GB as f16 and 9.6 GB as f32 (whose head is f32 too).")]
pub struct SynthArgs {
    /// tiny: hidden 256, 4 layers, 8 heads, 2 KV heads, FFN 768, vocab 32000.
    /// 2b4t: BitNet b1.58 2B4T (hidden 2560, 30 layers, 20/5 heads, FFN 6912, vocab 128256).
    /// custom: give every dimension.
    #[arg(long, default_value = "tiny")]
    pub shape: String,
    #[arg(long)]
    pub hidden: Option<usize>,
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    #[arg(long)]
    pub kv_heads: Option<usize>,
    #[arg(long)]
    pub ffn: Option<usize>,
    #[arg(long)]
    pub vocab: Option<usize>,
    /// BitLinear weight type: i2_s, tq2_0, tq1_0, f16, bf16, f32.
    #[arg(long = "type", default_value = "i2_s")]
    pub weight_type: String,
    /// Embedding / tied head type: f16, q6_k, q8_0, q4_k, bf16, f32 [default: f16; f32 with --type f32].
    #[arg(long)]
    pub head_type: Option<String>,
    /// FFN activation: relu2 (BitNet b1.58 2B4T; arch bitnet-b1.58) or silu (arch bitnet).
    #[arg(long, default_value = "relu2")]
    pub act: String,
    /// Take the tokenizer from this GGUF (e.g. the LLaMA-3 vocabulary).
    #[arg(long, value_name = "FILE.gguf")]
    pub vocab_from: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Training context written into the file.
    #[arg(long, default_value_t = 4096)]
    pub ctx: usize,
    /// gguf, or hf: a Hugging Face folder in BitNet b1.58 2B4T's packed layout.
    #[arg(long, default_value = "gguf")]
    pub format: String,
    /// For --format hf: how weight_scale is stored: bitlinear (1/β, transformers' BitLinear) or autobitlinear (β).
    #[arg(long, default_value = "bitlinear")]
    pub linear_class: String,
    #[arg(short, long)]
    pub output: PathBuf,
}

fn dtype(s: &str, flag: &str) -> anyhow::Result<DType> {
    DType::from_name(&s.to_lowercase()).with_context(|| format!("{flag} {s}: unknown type"))
}

pub fn synth(a: SynthArgs) -> anyhow::Result<()> {
    let mut shape = match a.shape.as_str() {
        "tiny" => SynthShape::tiny(),
        "2b4t" => SynthShape::b2b4t(),
        "custom" => SynthShape { hidden: 0, layers: 0, heads: 0, kv_heads: 0, ffn: 0, vocab: 0 },
        other => anyhow::bail!("--shape {other}: expected tiny, 2b4t or custom"),
    };
    let custom = [
        (&mut shape.hidden, a.hidden, "hidden"),
        (&mut shape.layers, a.layers, "layers"),
        (&mut shape.heads, a.heads, "heads"),
        (&mut shape.ffn, a.ffn, "ffn"),
        (&mut shape.vocab, a.vocab, "vocab"),
    ];
    for (slot, value, name) in custom {
        if let Some(v) = value {
            *slot = v;
        } else if *slot == 0 {
            anyhow::bail!("--shape custom needs --{name}");
        }
    }
    shape.kv_heads = a.kv_heads.unwrap_or(if shape.kv_heads == 0 { shape.heads } else { shape.kv_heads });
    if a.shape == "2b4t" && shape.vocab != 128256 {
        anyhow::bail!("--shape 2b4t always has vocab 128256 (use --shape custom for another)");
    }
    let weight_type = dtype(&a.weight_type, "--type")?;
    let head_type = match &a.head_type {
        Some(h) => dtype(h, "--head-type")?,
        None if weight_type == DType::F32 => DType::F32,
        None => DType::F16,
    };
    let activation = Activation::from_name(&a.act).with_context(|| format!("--act {}: expected relu2 or silu", a.act))?;
    let spec = SynthSpec { shape, weight_type, head_type, activation, seed: a.seed, context: a.ctx, rope_theta: 500000.0 };
    let vocab = match &a.vocab_from {
        Some(p) => Some(GgufFile::open(p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    let started = std::time::Instant::now();
    let what = format!("writing {}", a.output.display());
    let progress = super::progress(&what);
    match a.format.as_str() {
        "gguf" => synth::write(&spec, vocab.as_ref(), &a.output, progress),
        "hf" => {
            let direction = match a.linear_class.as_str() {
                "bitlinear" => synth::ScaleDirection::Divide,
                "autobitlinear" => synth::ScaleDirection::Multiply,
                other => anyhow::bail!("--linear-class {other}: expected bitlinear or autobitlinear"),
            };
            synth::write_hf(&spec, vocab.as_ref(), &a.output, direction, progress)
        }
        other => anyhow::bail!("--format {other}: expected gguf or hf"),
    }
    .map_err(anyhow::Error::msg)?;
    let size = if a.output.is_dir() {
        std::fs::read_dir(&a.output)?.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()
    } else {
        std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0)
    };
    let kind = if a.format == "hf" {
        "Hugging Face BitNetForCausalLM, packed ternary, bf16".to_string()
    } else {
        format!("{}, {weight_type} weights, {head_type} head", spec.arch_name())
    };
    eprintln!("wrote {} ({kind}, {:.1} MB) in {:.1} s", a.output.display(), size as f64 / 1e6, started.elapsed().as_secs_f64());
    Ok(())
}
