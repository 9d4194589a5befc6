//! Writing GGUF v3: metadata, tensor infos laid out contiguously in order
//! (each padded to the alignment, as llama.cpp requires), then the data.
//! Tensor bytes are produced one tensor at a time, so a multi-gigabyte model
//! never has to exist in memory at once.

use super::{dtype_id, GgufError, MetaValue, DEFAULT_ALIGNMENT, MAGIC};
use bitnet_ir::DType;
use std::io::{self, Write};
use std::path::Path;

pub struct GgufWriter {
    pub metadata: Vec<(String, MetaValue)>,
    /// Name, dtype, row-major shape.
    pub tensors: Vec<(String, DType, Vec<usize>)>,
    pub alignment: usize,
}

impl Default for GgufWriter {
    fn default() -> Self {
        GgufWriter { metadata: Vec::new(), tensors: Vec::new(), alignment: DEFAULT_ALIGNMENT }
    }
}

fn put_str(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn put_value(w: &mut impl Write, v: &MetaValue) -> io::Result<()> {
    match v {
        MetaValue::U8(x) => w.write_all(&[*x]),
        MetaValue::I8(x) => w.write_all(&[*x as u8]),
        MetaValue::U16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::Bool(x) => w.write_all(&[*x as u8]),
        MetaValue::String(s) => put_str(w, s),
        MetaValue::U64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::Array(t, items) => {
            w.write_all(&(*t as u32).to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for it in items {
                put_value(w, it)?;
            }
            Ok(())
        }
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a metadata key, replacing an earlier value.
    pub fn set(&mut self, key: &str, value: MetaValue) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    pub fn add_tensor(&mut self, name: &str, dtype: DType, shape: &[usize]) {
        self.tensors.push((name.to_string(), dtype, shape.to_vec()));
    }

    fn sizes(&self) -> Result<Vec<usize>, GgufError> {
        self.tensors
            .iter()
            .map(|(name, dtype, shape)| {
                let n = shape.iter().product();
                dtype.bytes_for(n).ok_or_else(|| GgufError::Format(format!("tensor {name}: {n} elements is not a whole number of {dtype} blocks")))
            })
            .collect()
    }

    /// Writes the file to `w`; `data(i)` gives the bytes of tensor `i`.
    pub fn write<W: Write, B: AsRef<[u8]>>(&self, mut w: W, mut data: impl FnMut(usize) -> io::Result<B>) -> Result<(), GgufError> {
        let sizes = self.sizes()?;
        let mut head = Vec::new();
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        let mut metadata = self.metadata.clone();
        if self.alignment != DEFAULT_ALIGNMENT && !metadata.iter().any(|(k, _)| k == "general.alignment") {
            metadata.push(("general.alignment".into(), MetaValue::U32(self.alignment as u32)));
        }
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in &metadata {
            put_str(&mut head, k)?;
            head.extend_from_slice(&(v.ty() as u32).to_le_bytes());
            put_value(&mut head, v)?;
        }
        let mut offset = 0usize;
        for ((name, dtype, shape), size) in self.tensors.iter().zip(&sizes) {
            put_str(&mut head, name)?;
            head.extend_from_slice(&(shape.len() as u32).to_le_bytes());
            for d in shape.iter().rev() {
                head.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            let id = dtype_id(*dtype).ok_or_else(|| GgufError::Format(format!("{dtype} cannot be stored in GGUF")))?;
            head.extend_from_slice(&id.to_le_bytes());
            head.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += size.next_multiple_of(self.alignment);
        }
        head.resize(head.len().next_multiple_of(self.alignment), 0);
        w.write_all(&head)?;
        for (i, size) in sizes.iter().enumerate() {
            let bytes = data(i)?;
            let bytes = bytes.as_ref();
            if bytes.len() != *size {
                return Err(GgufError::Format(format!("tensor {}: got {} bytes, expected {size}", self.tensors[i].0, bytes.len())));
            }
            w.write_all(bytes)?;
            w.write_all(&vec![0u8; size.next_multiple_of(self.alignment) - size])?;
        }
        w.flush()?;
        Ok(())
    }

    /// Writes to a temporary file next to `path` and renames it into place,
    /// so a failure leaves nothing half-written.
    pub fn write_file(&self, path: &Path, data: impl FnMut(usize) -> io::Result<Vec<u8>>) -> Result<(), GgufError> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let result = (|| {
            let f = std::fs::File::create(&tmp)?;
            self.write(io::BufWriter::with_capacity(1 << 20, f), data)
        })();
        match result {
            Ok(()) => Ok(std::fs::rename(&tmp, path)?),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    pub fn to_bytes(&self, data: impl FnMut(usize) -> io::Result<Vec<u8>>) -> Result<Vec<u8>, GgufError> {
        let mut out = Vec::new();
        self.write(&mut out, data)?;
        Ok(out)
    }
}
