//! Compiled artifacts (`.bnx`): what `bitnet compile -o` writes and
//! `bitnet run -m X.bnx` maps and runs.
//!
//! ```text
//! "BITNETRS"         8 bytes, magic
//! format version     u32 LE
//! reserved           u32 LE, zero
//! header length      u64 LE
//! header             JSON: compiler, source, target, graphs, schedules, weights
//! zero padding       to a page boundary
//! weights            a GGUF file aligned to pages: the model's metadata
//!                    (hyper-parameters, tokenizer, chat template), weights
//!                    the kernels read as stored, and each prepared weight
//!                    in the layout its kernel reads
//! ```
//!
//! The weights section reuses the GGUF container (and its checked parser)
//! rather than inventing another: everything in it is page-aligned, so the
//! runtime maps the file and hands the kernels slices of it, and nothing
//! is converted at load. Where the weights a step streams can live in huge
//! pages (Linux: see `bitnet_codegen::cpu::blob`), they are copied there
//! from the map, the map's pages released as the copy goes (a copy, not a
//! conversion: a few hundred milliseconds for 2B4T); elsewhere the kernels
//! read the map in place and processes running the same artifact share
//! its pages.
//!
//! The header names its format version; an artifact of another version,
//! or one whose kernels this CPU cannot run, is refused with a message
//! that says how to compile it again. One whose tiles were chosen on
//! another CPU runs, with a warning.

use crate::compiled::{CompiledModel, Form, Prepared, WeightKey};
use crate::error::RuntimeError;
use bitnet_autotune::db::CudaTuned;
use bitnet_codegen::cpu::blob::{self, Blob, Plain, SharedBytes};
use bitnet_codegen::cpu::int4::{self, Int4Rows};
use bitnet_codegen::cpu::int8::Int8Rows;
use bitnet_codegen::cpu::ternary::{PackedTernary, Packing};
use bitnet_codegen::cuda;
use bitnet_codegen::schedule::{Schedule, Tiles};
use bitnet_codegen::target::HostCpu;
use bitnet_frontends::arch::Arch;
use bitnet_frontends::convert;
use bitnet_frontends::gguf::{GgufFile, GgufWriter};
use bitnet_frontends::model::{Model, ModelSource};
use bitnet_ir::interp::WeightSource;
use bitnet_ir::{DType, Graph};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

pub const MAGIC: &[u8; 8] = b"BITNETRS";
/// Bumped whenever the header or a prepared layout changes meaning.
pub const FORMAT_VERSION: u32 = 4;
const PREFIX: usize = 24;
const PAGE: usize = 4096;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Header {
    pub format: u32,
    /// `bitnet-rs <version>` of the compiler that wrote it.
    pub compiler: String,
    pub source: SourceInfo,
    pub target: TargetInfo,
    /// `stored` or `q8`.
    pub head: String,
    /// The optimized step graph (the logits of the rows asked for).
    pub graphs: Vec<CompiledGraph>,
    pub weights: Vec<WeightEntry>,
    /// For a CUDA artifact (`target.device` is `cuda`): the kernels'
    /// launches and their PTX.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda: Option<CudaSection>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CudaSection {
    /// The architecture the PTX targets (`compute_<sm>`).
    pub sm: u32,
    /// NVRTC's version, `major.minor`.
    pub nvrtc: String,
    pub ptx: String,
    /// The step graph's launches. Absent from artifacts written before
    /// the CUDA kernels ran many sequences (they held two graphs).
    #[serde(default)]
    pub step: Option<bitnet_codegen::cuda::Program>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SourceInfo {
    pub path: String,
    pub bytes: u64,
    /// A fast 64-bit content hash (not cryptographic) of the source files.
    pub hash: String,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TargetInfo {
    pub device: String,
    pub fingerprint: String,
    /// The CPU, in words.
    pub description: String,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CompiledGraph {
    /// The optimized graph in its text form.
    pub graph: String,
    pub schedule: Schedule,
}

/// A prepared weight and the GGUF tensors that hold it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct WeightEntry {
    /// The name the graph's kernels look it up by.
    pub name: String,
    pub layout: Layout,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "layout", rename_all = "snake_case")]
pub enum Layout {
    /// Tensor `<name>#packed`: i8 bytes in the ternary kernels' layout.
    PackedTernary {
        n: usize,
        k: usize,
        rows: usize,
        scale: f32,
        /// Absent in artifacts written before the 1.6-bit packing: 2 bits.
        #[serde(default)]
        packing: Packing,
    },
    /// Tensors `<name>` (i8 `[n, kp]`) and `<name>.scale` (f32 `[n]`).
    Int8Rows { n: usize, k: usize },
    /// Tensors `<name>` (the nibbles, i8 `[n, kp / 2]`) and `<name>.scale`
    /// (f16 `[n, kp / 32]`): 4-bit groups.
    Int4Rows { n: usize, k: usize },
    /// Tensor `<name>` as stored, expanded to f32 at load (norms, scales).
    Floats,
    /// Tensor `<name>` as stored, read in place (embedding, float head).
    Stored,
}

fn packed_name(name: &str) -> String {
    format!("{name}#packed")
}

fn scale_name(name: &str) -> String {
    format!("{name}.scale")
}

fn artifact_err<T>(path: &Path, msg: impl std::fmt::Display) -> Result<T, RuntimeError> {
    Err(RuntimeError::Artifact(format!("{}: {msg}", path.display())))
}

/// Whether `path` starts like an artifact (and is not a folder).
pub fn is_artifact(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    path.is_file() && std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == MAGIC
}

/// What `write` did.
pub struct WriteReport {
    pub bytes: u64,
    pub tensors: usize,
}

/// Writes the compiled `model` (loaded from `source`) to `out`: to a
/// temporary file first, renamed into place when complete.
pub fn write(out: &Path, source: &Path, model: &Model, compiled: &CompiledModel) -> Result<WriteReport, RuntimeError> {
    let cpu = HostCpu::detect();
    let mut keys: Vec<&WeightKey> = compiled.prepared().keys().collect();
    keys.sort();
    let items = keys
        .into_iter()
        .map(|key| {
            let item = match &compiled.prepared()[key] {
                Prepared::Packed(p) => Item::Packed(p),
                Prepared::Int8(q) => Item::Int8(q),
                Prepared::Int4(q) => Item::Int4(q),
                Prepared::Floats(_) => Item::Model { floats: true },
                Prepared::Stored | Prepared::Copied(_) => Item::Model { floats: false },
            };
            (key.artifact_name(), item)
        })
        .collect();
    let graph = CompiledGraph { graph: compiled.graph().to_string(), schedule: compiled.schedule().clone() };
    let target = TargetInfo { device: "cpu".into(), fingerprint: cpu.fingerprint(), description: cpu.to_string() };
    let parts = Parts { target, head: compiled.schedule().head().name().into(), graphs: vec![graph], cuda: None };
    write_parts(out, source, model, parts, items)
}

/// A weight as it goes into an artifact.
pub(crate) enum Item<'a> {
    Packed(&'a PackedTernary),
    Int8(&'a Int8Rows),
    Int4(&'a Int4Rows),
    /// The model's tensor as stored; expanded to f32 at load (`floats`) or
    /// read in place.
    Model {
        floats: bool,
    },
}

/// The header's parts that differ between targets.
pub(crate) struct Parts {
    pub target: TargetInfo,
    pub head: String,
    pub graphs: Vec<CompiledGraph>,
    pub cuda: Option<CudaSection>,
}

/// Writes an artifact of `parts` and the weights `items` to `out`: to a
/// temporary file first, renamed into place when complete.
pub(crate) fn write_parts(out: &Path, source: &Path, model: &Model, parts: Parts, items: Vec<(String, Item)>) -> Result<WriteReport, RuntimeError> {
    let io = |e: std::io::Error| RuntimeError::Artifact(format!("writing {}: {e}", out.display()));
    let (bytes, hash) = content_hash(source).map_err(|e| RuntimeError::Artifact(format!("reading {}: {e}", source.display())))?;
    let mut gguf = GgufWriter::new();
    gguf.alignment = PAGE;
    match &model.source {
        ModelSource::Gguf(f) => f.metadata.iter().filter(|(k, _)| k != "general.alignment").for_each(|(k, v)| gguf.set(k, v.clone())),
        ModelSource::Hf(_) => {
            let arch = if model.config.arch == Arch::Llama { "llama" } else { "bitnet" };
            convert::metadata(model, arch).map_err(RuntimeError::Artifact)?.into_iter().for_each(|(k, v)| gguf.set(&k, v));
        }
    }
    let mut entries = Vec::new();
    let mut data: Vec<&[u8]> = Vec::new();
    for (name, item) in &items {
        let layout = match item {
            Item::Packed(p) => {
                gguf.add_tensor(&packed_name(name), DType::I8, &[p.bytes()]);
                data.push(p.data().as_bytes());
                Layout::PackedTernary { n: p.n, k: p.k, rows: p.rows, scale: p.scale, packing: p.packing }
            }
            Item::Int8(q) => {
                gguf.add_tensor(name, DType::I8, &[q.n, q.kp]);
                gguf.add_tensor(&scale_name(name), DType::F32, &[q.n]);
                data.push(q.q.as_bytes());
                data.push(q.scale.as_bytes());
                Layout::Int8Rows { n: q.n, k: q.k }
            }
            Item::Int4(q) => {
                gguf.add_tensor(name, DType::I8, &[q.n, q.kp / 2]);
                gguf.add_tensor(&scale_name(name), DType::F16, &[q.n, q.kp / int4::GROUP]);
                data.push(q.q.as_bytes());
                data.push(q.scale.as_bytes());
                Layout::Int4Rows { n: q.n, k: q.k }
            }
            Item::Model { floats } => {
                let Some(t) = model.tensor(name) else { return artifact_err(source, format!("tensor {name} is prepared but not in the model")) };
                gguf.add_tensor(name, t.dtype, &t.shape);
                data.push(model.data(t));
                if *floats {
                    Layout::Floats
                } else {
                    Layout::Stored
                }
            }
        };
        entries.push(WeightEntry { name: name.clone(), layout });
    }
    let header = Header {
        format: FORMAT_VERSION,
        compiler: compiler(),
        source: SourceInfo { path: source.display().to_string(), bytes, hash },
        target: parts.target,
        head: parts.head,
        graphs: parts.graphs,
        weights: entries,
        cuda: parts.cuda,
    };
    let json = serde_json::to_vec(&header).map_err(|e| RuntimeError::Artifact(e.to_string()))?;
    let mut prefix = Vec::with_capacity(PREFIX + json.len() + PAGE);
    prefix.extend_from_slice(MAGIC);
    prefix.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    prefix.extend_from_slice(&0u32.to_le_bytes());
    prefix.extend_from_slice(&(json.len() as u64).to_le_bytes());
    prefix.extend_from_slice(&json);
    prefix.resize(prefix.len().next_multiple_of(PAGE), 0);

    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| -> Result<(), RuntimeError> {
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp).map_err(io)?);
        f.write_all(&prefix).map_err(io)?;
        gguf.write(&mut f, |i| Ok(data[i])).map_err(|e| RuntimeError::Artifact(format!("writing {}: {e}", out.display())))?;
        f.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)?;
        std::fs::rename(&tmp, out).map_err(io)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    let bytes = std::fs::metadata(out).map_err(io)?.len();
    Ok(WriteReport { bytes, tensors: gguf.tensors.len() })
}

/// Writes a CUDA artifact of `model`: the step graph lowered to CUDA
/// kernels (with the `tuned` tiles, if any), compiled by NVRTC to PTX for
/// `compute_<sm>`, and the ternary weights packed as the kernels read
/// them. Needs NVRTC, not a GPU.
pub fn write_cuda(out: &Path, source: &Path, model: &Model, sm: u32, tuned: Option<&CudaTuned>) -> Result<WriteReport, RuntimeError> {
    use crate::cuda::{layouts, Layout as DevLayout};
    let (step, program) = crate::lowering::lower_cuda(&model.step_graph()?, sm, tuned, bitnet_codegen::schedule::HeadQuant::Stored)?;
    let nvrtc = |e: String| RuntimeError::Compile(e);
    let ptx = bitnet_codegen::cuda::nvrtc::compile(&bitnet_codegen::cuda::module_source(&[&program]), sm).map_err(nvrtc)?;
    let (major, minor) = bitnet_codegen::cuda::nvrtc::version().map_err(nvrtc)?;
    let list = layouts(&[(&step, &program)], model, &HashMap::new())?;
    let mut packed = Vec::new();
    for (key, layout, _) in &list {
        if *layout == DevLayout::Packed {
            let name = &key.name;
            let view = model.weight(name).ok_or_else(|| RuntimeError::Artifact(format!("tensor {name} is missing")))?;
            packed.push((name.clone(), PackedTernary::from_weight(&view, 1).map_err(|e| RuntimeError::Artifact(format!("{name}: {e}")))?));
        }
    }
    let items = list
        .iter()
        .map(|(key, layout, _)| {
            let item = match layout {
                DevLayout::Packed => Item::Packed(&packed.iter().find(|p| p.0 == key.name).expect("packed above").1),
                DevLayout::Stored => Item::Model { floats: false },
                DevLayout::F32 => Item::Model { floats: true },
                DevLayout::Int8 => return Err(RuntimeError::Artifact(format!("{}: CUDA artifacts hold the head as stored", key.name))),
            };
            Ok((key.artifact_name(), item))
        })
        .collect::<Result<_, _>>()?;
    let graph = |g: &Graph| CompiledGraph { graph: g.to_string(), schedule: Schedule::default() };
    let target = TargetInfo {
        device: "cuda".into(),
        fingerprint: format!("sm_{sm}"),
        description: format!("PTX for compute_{sm} and later GPUs, from NVRTC {major}.{minor}"),
    };
    let cuda = CudaSection { sm, nvrtc: format!("{major}.{minor}"), ptx, step: Some(program) };
    let parts = Parts { target, head: "stored".into(), graphs: vec![graph(&step)], cuda: Some(cuda) };
    write_parts(out, source, model, parts, items)
}

pub fn compiler() -> String {
    format!("bitnet-rs {}", env!("CARGO_PKG_VERSION"))
}

/// A mapped artifact: its header and its weights section as a model.
pub struct Artifact {
    pub header: Header,
    /// The weights section: metadata, tokenizer and stored tensors.
    pub model: Model,
    map: Arc<memmap2::Mmap>,
}

impl Artifact {
    pub fn open(path: &Path) -> Result<Artifact, RuntimeError> {
        let file = std::fs::File::open(path).or_else(|e| artifact_err(path, e))?;
        // SAFETY: mapped read-only; see GgufFile::open.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.or_else(|e| artifact_err(path, e))?);
        let header = read_header(path, &map)?;
        let start = (PREFIX + header.1).next_multiple_of(PAGE);
        if start > map.len() {
            return artifact_err(path, "truncated: the weights section is missing");
        }
        let gguf = GgufFile::from_shared(map.clone(), start).or_else(|e| artifact_err(path, format!("weights section: {e}")))?;
        let model = Model::from_file(gguf).or_else(|e| artifact_err(path, format!("weights section: {e}")))?;
        Ok(Artifact { header: header.0, model, map })
    }

    /// Problems that make it unusable here, as errors, and ones worth a
    /// warning. `path` is for the messages.
    pub fn check_target(&self, path: &Path) -> Result<Vec<String>, RuntimeError> {
        let h = &self.header;
        let again = format!("compile it again here: bitnet compile -m {} -o {}", h.source.path, path.display());
        if h.target.device == "cuda" {
            return Ok(Vec::new());
        }
        if h.target.device != "cpu" {
            return artifact_err(path, format!("compiled for {}, which this build cannot run; {again}", h.target.device));
        }
        let isas = h.graphs.iter().map(|g| &g.schedule).flat_map(|s| s.steps.iter().filter_map(|step| step.tiles.isa()).chain([s.isa]));
        for isa in isas {
            if !isa.available() {
                return artifact_err(
                    path,
                    format!("its kernels use {} instructions, which this CPU lacks (it was compiled on {}); {again}", isa.name(), h.target.description),
                );
            }
        }
        let mut warnings = Vec::new();
        let here = HostCpu::detect();
        if h.target.fingerprint != here.fingerprint() {
            warnings.push(format!(
                "{} was compiled for another CPU ({}); its tiles may not be the best here: run `bitnet autotune`, then {again}",
                path.display(),
                h.target.description
            ));
        }
        if let Ok(meta) = std::fs::metadata(&h.source.path) {
            if meta.is_file() && meta.len() != h.source.bytes {
                warnings.push(format!("{} has changed since {} was compiled from it; {again}", h.source.path, path.display()));
            }
        }
        Ok(warnings)
    }

    /// A CUDA artifact's step graph and its launches, its PTX and the
    /// architecture it targets, and its packed weights over the mapped file.
    #[allow(clippy::type_complexity)]
    pub fn cuda(&self, path: &Path) -> Result<((Graph, cuda::Program), (String, u32), HashMap<String, PackedTernary>), RuntimeError> {
        let Some(c) = &self.header.cuda else { return artifact_err(path, "it says it is for CUDA but holds no CUDA kernels") };
        let Some(program) = &c.step else {
            return artifact_err(path, format!("its CUDA kernels run one sequence at a time (an earlier bitnet-rs wrote it): compile it again with `bitnet compile -m {} --device cuda -o FILE.bnx`", self.header.source.path));
        };
        let [step] = &self.header.graphs[..] else {
            return artifact_err(path, format!("a CUDA artifact holds 1 graph, this one {}", self.header.graphs.len()));
        };
        let step = (bitnet_ir::text::parse(&step.graph).or_else(|e| artifact_err(path, format!("graph: {e}")))?, program.clone());
        let mut packed = HashMap::new();
        for e in &self.header.weights {
            if let Layout::PackedTernary { n, k, rows, scale, packing } = e.layout {
                let bad = |m: String| RuntimeError::Artifact(format!("{}: weight {}: {m}", path.display(), e.name));
                if packing != Packing::Bits2 {
                    return Err(bad(format!("the CUDA kernels read 2-bit weights, not {}", packing.name())));
                }
                let (at, len) = self.tensor(path, &packed_name(&e.name), DType::I8)?;
                let blob = Blob::mapped(self.map.clone() as SharedBytes, at, len).map_err(bad)?;
                packed.insert(e.name.clone(), PackedTernary::from_parts(n, k, rows, packing, scale, blob).map_err(bad)?);
            }
        }
        Ok((step, (c.ptx.clone(), c.sm), packed))
    }

    /// Where tensor `name` of type `dtype` lies in the mapped file.
    fn tensor(&self, path: &Path, name: &str, dtype: DType) -> Result<(usize, usize), RuntimeError> {
        let Some(w) = self.model.weight(name) else { return artifact_err(path, format!("tensor {name} is missing")) };
        if w.dtype != dtype {
            return artifact_err(path, format!("tensor {name} is {}, expected {dtype}", w.dtype));
        }
        Ok((w.data.as_ptr() as usize - self.map.as_ptr() as usize, w.data.len()))
    }

    /// The graphs, checked, and the weights prepared from the mapped file.
    pub fn compiled(&self, path: &Path, threads: usize) -> Result<CompiledModel, RuntimeError> {
        let graph = |c: &CompiledGraph| -> Result<(Graph, Schedule), RuntimeError> {
            let g = bitnet_ir::text::parse(&c.graph).or_else(|e| artifact_err(path, format!("graph: {e}")))?;
            for step in &c.schedule.steps {
                if step.value.index() >= g.nodes.len() {
                    return artifact_err(path, format!("the schedule names {}, which the graph does not have", step.value));
                }
                if let Tiles::Ternary(t) = step.tiles {
                    if !t.is_valid() {
                        return artifact_err(path, format!("{}: tiles {t} are not valid here", step.value));
                    }
                }
            }
            Ok((g, c.schedule.clone()))
        };
        let [step] = &self.header.graphs[..] else { return artifact_err(path, format!("a CPU artifact holds 1 graph, this one {}", self.header.graphs.len())) };
        let step = graph(step)?;
        let shared: SharedBytes = self.map.clone();
        let tensor = |name: &str, dtype: DType| self.tensor(path, name, dtype);
        let mut prepared = HashMap::new();
        for e in &self.header.weights {
            let bad = |m: String| RuntimeError::Artifact(format!("{}: weight {}: {m}", path.display(), e.name));
            let p = match &e.layout {
                Layout::PackedTernary { n, k, rows, scale, packing } => {
                    let (at, len) = tensor(&packed_name(&e.name), DType::I8)?;
                    let blob = streamed(&self.map, at, len, &mut || self.model.release(&packed_name(&e.name))).map_err(bad)?;
                    Prepared::Packed(PackedTernary::from_parts(*n, *k, *rows, *packing, *scale, blob).map_err(bad)?)
                }
                Layout::Int8Rows { n, k } => {
                    let (qa, ql) = tensor(&e.name, DType::I8)?;
                    let (sa, sl) = tensor(&scale_name(&e.name), DType::F32)?;
                    let q = streamed(&self.map, qa, ql, &mut || self.model.release(&e.name)).map_err(bad)?;
                    let s = Blob::mapped(shared.clone(), sa, sl / 4).map_err(bad)?;
                    Prepared::Int8(Int8Rows::from_parts(*n, *k, q, s).map_err(bad)?)
                }
                Layout::Int4Rows { n, k } => {
                    let (qa, ql) = tensor(&e.name, DType::I8)?;
                    let (sa, sl) = tensor(&scale_name(&e.name), DType::F16)?;
                    let q = streamed(&self.map, qa, ql, &mut || self.model.release(&e.name)).map_err(bad)?;
                    let s = Blob::mapped(shared.clone(), sa, sl / 2).map_err(bad)?;
                    Prepared::Int4(Int4Rows::from_parts(*n, *k, q, s).map_err(bad)?)
                }
                Layout::Floats => match self.model.weight(&e.name) {
                    Some(w) if !w.dtype.is_weight() => return Err(bad(format!("{} values cannot be expanded to floats", w.dtype))),
                    Some(w) if w.dtype.bytes_for(w.elems()).is_some_and(|b| b <= w.data.len()) => Prepared::Floats(w.to_f32()),
                    _ => return Err(bad("missing or truncated".into())),
                },
                Layout::Stored => Prepared::Stored,
            };
            let form = match p {
                Prepared::Int8(_) => Form::Int8,
                Prepared::Int4(_) => Form::Int4,
                _ => Form::Own,
            };
            let Some(key) = WeightKey::from_artifact_name(&e.name, form) else {
                return Err(bad("quantized rows under a name the kernels do not look up".into()));
            };
            prepared.insert(key, p);
        }
        CompiledModel::from_prepared(&self.model, prepared, step, threads.max(1)).or_else(|e| artifact_err(path, e))
    }
}

/// `len` values of `T` at byte `at` of the map, for kernels that stream
/// them each step: copied into huge pages where weights can live there
/// (`release` drops the map's pages of the tensor as the copy goes), else
/// read in place.
fn streamed<T: Plain>(map: &Arc<memmap2::Mmap>, at: usize, len: usize, release: &mut dyn FnMut()) -> Result<Blob<T>, String> {
    let mapped = Blob::<T>::mapped(map.clone() as SharedBytes, at, len)?;
    Ok(if blob::in_huge_pages(std::mem::size_of_val(&mapped[..])) { Blob::copy_of(&mapped, release) } else { mapped })
}

/// The header and its length, or why the file is not a usable artifact.
fn read_header(path: &Path, map: &[u8]) -> Result<(Header, usize), RuntimeError> {
    if map.len() < PREFIX || &map[..8] != MAGIC {
        return artifact_err(path, "not a bitnet-rs artifact (bad magic)");
    }
    let version = u32::from_le_bytes(map[8..12].try_into().unwrap());
    let len = u64::from_le_bytes(map[16..24].try_into().unwrap());
    let Some(json) = usize::try_from(len).ok().and_then(|l| map.get(PREFIX..PREFIX.checked_add(l)?)) else {
        return artifact_err(path, format!("truncated: the header says {len} bytes, the file has {}", map.len()));
    };
    if version != FORMAT_VERSION {
        let by = serde_json::from_slice::<serde_json::Value>(json).ok().and_then(|v| v["compiler"].as_str().map(String::from));
        return artifact_err(
            path,
            format!(
                "artifact format v{version}{}; this {} reads v{FORMAT_VERSION}: compile it again with `bitnet compile -m SOURCE -o {}`",
                by.map(|b| format!(" (written by {b})")).unwrap_or_default(),
                compiler(),
                path.display()
            ),
        );
    }
    let header: Header = serde_json::from_slice(json).or_else(|e| artifact_err(path, format!("corrupt header: {e}")))?;
    if header.format != version {
        return artifact_err(path, format!("corrupt header: it says format {} inside a v{version} file", header.format));
    }
    Ok((header, json.len()))
}

/// Size and a fast content hash of a model file, or of a model folder's
/// files in name order.
fn content_hash(path: &Path) -> std::io::Result<(u64, String)> {
    let mut files = vec![path.to_path_buf()];
    if path.is_dir() {
        files = std::fs::read_dir(path)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
        files.sort();
    }
    let (mut bytes, mut h) = (0u64, 0x243f_6a88_85a3_08d3u64);
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut r = std::fs::File::open(f)?;
        loop {
            let n = read_full(&mut r, &mut buf)?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
            let (words, tail) = buf[..n].split_at(n / 8 * 8);
            for w in words.chunks_exact(8) {
                h = (h.rotate_left(23) ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            }
            for &b in tail {
                h = (h.rotate_left(23) ^ b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            }
        }
    }
    Ok((bytes, format!("{:016x}", h ^ bytes)))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            m => n += m,
        }
    }
    Ok(n)
}
