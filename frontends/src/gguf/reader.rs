//! Parsing GGUF from bytes (a memory map or a buffer). Every count, length
//! and offset is checked against the bytes that remain before anything is
//! allocated, so a lying header is an error, never a huge allocation.

use super::{dtype_from_id, format_err, GgufError, MetaType, MetaValue, DEFAULT_ALIGNMENT, MAGIC};
use bitnet_ir::DType;
use std::path::Path;
use std::sync::Arc;

/// A tensor's entry in the header. `shape` is row-major (outermost
/// first), the reverse of GGUF's `ne` order.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Offset from the start of the data section.
    pub offset: usize,
    pub size: usize,
}

impl TensorInfo {
    pub fn elems(&self) -> usize {
        self.shape.iter().product()
    }
}

enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
    /// A GGUF that starts at an offset into a map shared with others
    /// (the weights section of a compiled artifact).
    Shared(Arc<memmap2::Mmap>, usize),
}

impl Bytes {
    fn get(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
            Bytes::Shared(m, at) => m.get(*at..).unwrap_or_default(),
        }
    }
}

/// A parsed GGUF file whose tensor data stays where it was (mapped).
pub struct GgufFile {
    pub version: u32,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: usize,
    data_start: usize,
    bytes: Bytes,
}

impl GgufFile {
    /// Memory-maps and parses a file.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let file = std::fs::File::open(path)?;
        // SAFETY: the map is read-only; a file changed underneath us while
        // mapped is outside what any reader of mapped files can defend against.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Self::parse(Bytes::Mapped(map))
    }

    /// Parses a file held in memory.
    pub fn from_vec(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        Self::parse(Bytes::Owned(bytes))
    }

    /// Parses the GGUF that starts `offset` bytes into a shared map.
    pub fn from_shared(map: Arc<memmap2::Mmap>, offset: usize) -> Result<GgufFile, GgufError> {
        Self::parse(Bytes::Shared(map, offset))
    }

    fn parse(bytes: Bytes) -> Result<GgufFile, GgufError> {
        let buf: &[u8] = bytes.get();
        let mut r = Reader { buf, pos: 0 };
        if r.take(4).map_err(|_| GgufError::Format("file is shorter than the 4-byte magic".into()))? != MAGIC {
            return format_err("bad magic (expected \"GGUF\")");
        }
        let version = r.u32()?;
        match version {
            2 | 3 => {}
            1 => return format_err("GGUF v1 is not supported (v2 and v3 are)"),
            v if v & 0xFFFF == 0 => return format_err(format!("version {v:#x} looks byte-swapped: big-endian GGUF is not supported")),
            v => return format_err(format!("unknown GGUF version {v}")),
        }
        let n_tensors = r.count("tensor count", 4 + 8 + 4 + 4 + 8)?;
        let n_kv = r.count("metadata count", 8 + 4 + 1)?;
        let mut metadata = Vec::with_capacity(n_kv);
        // Duplicates are found with a set: a file may hold millions of entries.
        let mut keys = std::collections::HashSet::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = r.string().map_err(|e| ctx(e, &format!("metadata entry {i}")))?;
            let ty = r.meta_type().map_err(|e| ctx(e, &format!("metadata {key}")))?;
            let value = r.value(ty, 0).map_err(|e| ctx(e, &format!("metadata {key}")))?;
            if !keys.insert(key.clone()) {
                return format_err(format!("metadata key {key} appears twice"));
            }
            metadata.push((key, value));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, MetaValue::U32(a))) if a.is_power_of_two() => *a as usize,
            Some((_, v)) => return format_err(format!("general.alignment must be a u32 power of two, got {v}")),
        };
        let mut tensors = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            tensors.push(r.tensor_info().map_err(|e| ctx(e, &format!("tensor {i}")))?);
        }
        let data_start = r.pos.next_multiple_of(alignment);
        let data_len = buf.len().saturating_sub(data_start);
        for t in &tensors {
            if t.offset % alignment != 0 {
                return format_err(format!("tensor {} offset {} is not aligned to {alignment}", t.name, t.offset));
            }
            match t.offset.checked_add(t.size) {
                Some(end) if end <= data_len => {}
                _ => {
                    return format_err(format!(
                        "tensor {} ({} bytes at offset {}) runs past the end of the file (data section is {data_len} bytes): truncated?",
                        t.name, t.size, t.offset
                    ))
                }
            }
        }
        let mut names = std::collections::HashSet::with_capacity(tensors.len());
        if let Some(t) = tensors.iter().find(|t| !names.insert(t.name.as_str())) {
            return format_err(format!("tensor name {} appears twice", t.name));
        }
        Ok(GgufFile { version, metadata, tensors, alignment, data_start, bytes })
    }

    fn buf(&self) -> &[u8] {
        self.bytes.get()
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of a tensor (checked to lie in the file at parse time).
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.buf()[self.data_start + t.offset..][..t.size]
    }

    /// Drops a tensor's pages from this process's memory when the file is
    /// mapped; they are read from the file again if the tensor is used.
    pub fn release(&self, t: &TensorInfo) {
        #[cfg(unix)]
        {
            let (m, at) = match &self.bytes {
                Bytes::Mapped(m) => (m, 0),
                Bytes::Shared(m, at) => (&**m, *at),
                Bytes::Owned(_) => return,
            };
            // SAFETY: the map is read-only and file-backed: dropped pages
            // fault back in with the same contents, so slices that borrow
            // them (here or in whoever shares the map) stay valid.
            let _ = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, at + self.data_start + t.offset, t.size) };
        }
        #[cfg(not(unix))]
        let _ = t;
    }

    pub fn file_size(&self) -> usize {
        self.buf().len()
    }
}

fn ctx(e: GgufError, what: &str) -> GgufError {
    match e {
        GgufError::Format(m) => GgufError::Format(format!("{what}: {m}")),
        other => other,
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return format_err(format!("truncated: needs {n} bytes at offset {}, file has {}", self.pos, self.buf.len()));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        Ok(self.take(N)?.try_into().unwrap())
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A u64 count of items that each take at least `min_size` bytes.
    fn count(&mut self, what: &str, min_size: usize) -> Result<usize, GgufError> {
        let n = self.u64()?;
        if n > (self.remaining() / min_size.max(1)) as u64 {
            return format_err(format!("{what} {n} is more than the {} remaining bytes can hold (truncated or corrupt?)", self.remaining()));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let len = self.count("string length", 1)?;
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| GgufError::Format(format!("string at offset {} is not UTF-8", self.pos - len)))
    }

    fn meta_type(&mut self) -> Result<MetaType, GgufError> {
        let id = self.u32()?;
        MetaType::from_id(id).ok_or_else(|| GgufError::Format(format!("unknown metadata value type {id}")))
    }

    fn value(&mut self, ty: MetaType, depth: usize) -> Result<MetaValue, GgufError> {
        Ok(match ty {
            MetaType::U8 => MetaValue::U8(self.array::<1>()?[0]),
            MetaType::I8 => MetaValue::I8(self.array::<1>()?[0] as i8),
            MetaType::U16 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            MetaType::I16 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            MetaType::U32 => MetaValue::U32(self.u32()?),
            MetaType::I32 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            MetaType::F32 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            MetaType::Bool => match self.array::<1>()?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return format_err(format!("bool value {b} is neither 0 nor 1")),
            },
            MetaType::String => MetaValue::String(self.string()?),
            MetaType::U64 => MetaValue::U64(self.u64()?),
            MetaType::I64 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            MetaType::F64 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            MetaType::Array => {
                if depth >= 4 {
                    return format_err("arrays nested more than 4 deep");
                }
                let elem = self.meta_type()?;
                let n = self.count("array length", elem.min_size())?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1)?);
                }
                MetaValue::Array(elem, v)
            }
        })
    }

    fn tensor_info(&mut self) -> Result<TensorInfo, GgufError> {
        let name = self.string()?;
        let err = |m: String| GgufError::Format(format!("tensor {name}: {m}"));
        let n_dims = self.u32()?;
        if n_dims > 4 {
            return Err(err(format!("{n_dims} dims (at most 4)")));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = self.u64()?;
            ne.push(usize::try_from(d).map_err(|_| err(format!("dim {d} is too large")))?);
        }
        let id = self.u32()?;
        let dtype = dtype_from_id(id).map_err(&err)?;
        let offset = self.u64()?;
        let offset = usize::try_from(offset).map_err(|_| err(format!("offset {offset} is too large")))?;
        let elems = ne.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| err(format!("shape {ne:?} overflows")))?;
        let row = ne.first().copied().unwrap_or(1);
        if row % dtype.block_elems() != 0 {
            return Err(err(format!("row length {row} is not a multiple of {}'s block of {}", dtype, dtype.block_elems())));
        }
        let size = dtype.bytes_for(elems).ok_or_else(|| err(format!("shape {ne:?} overflows")))?;
        ne.reverse();
        Ok(TensorInfo { name, dtype, shape: ne, offset, size })
    }
}
