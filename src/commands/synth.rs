//! `bitnet synth`: random-weight BitNet models of any shape.

use anyhow::Context;
use bitnet_frontends::arch::Activation;
use bitnet_frontends::family;
use bitnet_frontends::gguf::GgufFile;
use bitnet_frontends::synth::{self, SynthShape, SynthSpec};
use bitnet_ir::DType;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Sizes at --shape 2b4t: about 1.2 GB as i2_s or tq2_0 (with an f16 head), \
4.8 GB as f16 and 9.6 GB as f32 (whose head is f32 too).\n\n\
--family NAME --size full writes the family's published shape; the HF folders are as large as the published \
checkpoints: bitnet-2b4t 1.2 GB, bitnet-large 1.5 GB (f16 master weights; 0.3 GB as GGUF), bitnet-3b 6.4 GB \
(f16; no GGUF: its FFN rows of 8640 are not whole I2_S or TQ blocks; it runs from the folder or a compiled artifact), llama3-8b-1.58 3.9 GB, falcon3-1b 1.4 GB, \
falcon3-3b 2.2 GB, falcon3-7b 3.3 GB, falcon3-10b 4.0 GB; --format gguf needs the HF folder's size again while it \
converts. Falcon-E's published shape was not available: --size tiny only.")]
pub struct SynthArgs {
    /// Write a model with this published family's configuration instead of --shape:
    /// bitnet-2b4t, bitnet-large, bitnet-3b, llama3-8b-1.58, falcon3-1b, falcon3-3b, falcon3-7b,
    /// falcon3-10b, falcon-e-1b, falcon-e-3b. --format hf writes the family's checkpoint layout,
    /// gguf an I2_S file under the architecture name bitnet.cpp writes for it.
    #[arg(long, value_name = "NAME")]
    pub family: Option<String>,
    /// With --family: tiny (the same structure and settings, small dimensions) or full (the published shape).
    #[arg(long, default_value = "tiny")]
    pub size: String,
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
    if let Some(name) = &a.family {
        return synth_family(&a, name);
    }
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
    let size = output_size(&a.output);
    let kind = if a.format == "hf" {
        "Hugging Face BitNetForCausalLM, packed ternary, bf16".to_string()
    } else {
        format!("{}, {weight_type} weights, {head_type} head", spec.arch_name())
    };
    eprintln!("wrote {} ({kind}, {:.1} MB) in {:.1} s", a.output.display(), size as f64 / 1e6, started.elapsed().as_secs_f64());
    Ok(())
}

fn output_size(path: &std::path::Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path).map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
    } else {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }
}

fn synth_family(a: &SynthArgs, name: &str) -> anyhow::Result<()> {
    let family = family::by_name(name).with_context(|| format!("--family {name}: expected one of {}", family::names().join(", ")))?;
    let full = match a.size.as_str() {
        "tiny" => false,
        "full" => true,
        other => anyhow::bail!("--size {other}: expected tiny or full"),
    };
    let format = match a.format.as_str() {
        "hf" => synth::FamilyFormat::Hf,
        "gguf" => synth::FamilyFormat::Gguf,
        other => anyhow::bail!("--format {other}: expected gguf or hf"),
    };
    let started = std::time::Instant::now();
    let what = format!("writing {}", a.output.display());
    synth::write_family(family, full, format, a.seed, &a.output, super::progress(&what)).map_err(anyhow::Error::msg)?;
    let kind = match format {
        synth::FamilyFormat::Hf => format!("Hugging Face {}", family.hf_arch),
        synth::FamilyFormat::Gguf => format!("{}, i2_s", family.gguf_arch),
    };
    eprintln!(
        "wrote {} ({} {}, {kind}, {:.1} MB) in {:.1} s",
        a.output.display(),
        family.name,
        a.size,
        output_size(&a.output) as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
