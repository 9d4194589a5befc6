//! GGUF: writer → reader round trips, and bad input, including a seeded
//! mutation fuzzer that gets past the magic check.

use bitnet_frontends::gguf::{GgufError, GgufFile, GgufWriter, MetaType, MetaValue};
use bitnet_frontends::model::Model;
use bitnet_ir::{quant, DType};

fn every_metadata_type() -> Vec<(String, MetaValue)> {
    let v = vec![
        MetaValue::U8(200),
        MetaValue::I8(-100),
        MetaValue::U16(60000),
        MetaValue::I16(-30000),
        MetaValue::U32(4_000_000_000),
        MetaValue::I32(-2_000_000_000),
        MetaValue::F32(1.5e-5),
        MetaValue::Bool(true),
        MetaValue::String("héllo \"gguf\"".into()),
        MetaValue::U64(u64::MAX),
        MetaValue::I64(i64::MIN),
        MetaValue::F64(-0.1),
        MetaValue::Array(MetaType::String, vec![MetaValue::String("a".into()), MetaValue::String(String::new())]),
        MetaValue::Array(MetaType::I32, vec![MetaValue::I32(1), MetaValue::I32(-2)]),
        MetaValue::Array(MetaType::Array, vec![MetaValue::Array(MetaType::U8, vec![MetaValue::U8(7)])]),
        MetaValue::Array(MetaType::F32, vec![]),
    ];
    v.into_iter().enumerate().map(|(i, v)| (format!("test.key{i}"), v)).collect()
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) as f32 / 65536.0 - 0.5) * 3.0).collect()
}

/// A file with every metadata type and one tensor of every type.
fn sample_file() -> (GgufWriter, Vec<Vec<u8>>) {
    let mut w = GgufWriter::new();
    for (k, v) in every_metadata_type() {
        w.set(&k, v);
    }
    let mut data = Vec::new();
    for (i, t) in [DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4K, DType::Q6K, DType::TQ1_0, DType::TQ2_0, DType::I2S].into_iter().enumerate() {
        let shape = [3, 512];
        let x = values(3 * 512, i as u32);
        let x: Vec<f32> = if t.is_ternary() { x.iter().map(|v| (v * 1.2).round().clamp(-1.0, 1.0) * 0.25).collect() } else { x };
        w.add_tensor(&format!("t.{}", t.name()), t, &shape);
        data.push(quant::quantize(t, &x));
    }
    (w, data)
}

fn sample_bytes() -> Vec<u8> {
    let (w, data) = sample_file();
    w.to_bytes(|i| Ok(data[i].clone())).unwrap()
}

#[test]
fn writer_and_reader_round_trip_every_type() {
    let (w, data) = sample_file();
    let f = GgufFile::from_vec(sample_bytes()).unwrap();
    assert_eq!(f.version, 3);
    for (k, v) in every_metadata_type() {
        assert_eq!(f.get(&k), Some(&v), "{k}");
    }
    assert_eq!(f.tensors.len(), w.tensors.len());
    for (i, (name, dtype, shape)) in w.tensors.iter().enumerate() {
        let t = f.tensor(name).unwrap();
        assert_eq!((&t.dtype, &t.shape), (dtype, shape));
        assert_eq!(t.offset % 32, 0);
        assert_eq!(f.data(t), &data[i][..], "{name}");
    }
}

#[test]
fn alignment_is_honoured() {
    let (mut w, data) = sample_file();
    w.alignment = 64;
    let f = GgufFile::from_vec(w.to_bytes(|i| Ok(data[i].clone())).unwrap()).unwrap();
    assert_eq!(f.alignment, 64);
    assert!(f.tensors.iter().all(|t| t.offset % 64 == 0));
    assert_eq!(f.data(f.tensor("t.q6_k").unwrap()), &data[5][..]);
}

#[test]
fn version_2_reads_like_version_3() {
    let mut b = sample_bytes();
    b[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(GgufFile::from_vec(b).unwrap().version, 2);
}

#[test]
fn vocabulary_only_files_parse() {
    let mut w = GgufWriter::new();
    w.set("tokenizer.ggml.model", MetaValue::String("gpt2".into()));
    let f = GgufFile::from_vec(w.to_bytes(|_| unreachable!()).unwrap()).unwrap();
    assert!(f.tensors.is_empty());
    let e = Model::from_file(f).err().unwrap().to_string();
    assert!(e.contains("vocabulary-only"), "{e}");
}

fn err_of(b: Vec<u8>) -> String {
    match GgufFile::from_vec(b) {
        Err(GgufError::Format(m)) => m,
        Err(e) => panic!("unexpected error kind {e}"),
        Ok(_) => panic!("parsed"),
    }
}

#[test]
fn bad_headers_are_clear_errors() {
    let good = sample_bytes();
    assert!(err_of(b"GGU".to_vec()).contains("magic"));
    assert!(err_of(b"LLAMAxxxxxxxxxxxxxxxxxxxxxxxx".to_vec()).contains("magic"));
    let mut v = good.clone();
    v[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert!(err_of(v).contains("unknown GGUF version 9"));
    let mut v = good.clone();
    v[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(err_of(v).contains("v1"));
    let mut v = good.clone();
    v[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(err_of(v).contains("big-endian"));
    // Absurd counts are refused before allocating.
    let mut v = good.clone();
    v[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(err_of(v).contains("tensor count"));
    let mut v = good.clone();
    v[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(err_of(v).contains("metadata count"));
}

#[test]
fn truncation_anywhere_is_an_error() {
    let good = sample_bytes();
    for cut in (0..good.len()).step_by(97).chain([good.len() - 1]) {
        assert!(GgufFile::from_vec(good[..cut].to_vec()).is_err(), "cut at {cut} parsed");
    }
}

fn tensor_info_offset(b: &[u8], name: &str) -> usize {
    let needle = [&(name.len() as u64).to_le_bytes()[..], name.as_bytes()].concat();
    b.windows(needle.len()).position(|w| w == needle).unwrap() + needle.len()
}

#[test]
fn lying_tensor_infos_are_errors() {
    let good = sample_bytes();
    let at = tensor_info_offset(&good, "t.f32"); // n_dims u32, ne u64×2, type u32, offset u64
    let mut v = good.clone();
    v[at + 4..at + 12].copy_from_slice(&(1u64 << 62).to_le_bytes());
    let e = err_of(v);
    assert!(e.contains("overflows") || e.contains("past the end"), "{e}");
    let mut v = good.clone();
    v[at + 20..at + 24].copy_from_slice(&99u32.to_le_bytes());
    assert!(err_of(v).contains("unknown tensor type 99"));
    let mut v = good.clone();
    v[at + 20..at + 24].copy_from_slice(&2u32.to_le_bytes());
    assert!(err_of(v).contains("Q4_0"));
    let mut v = good.clone();
    v[at + 24..at + 32].copy_from_slice(&(1u64 << 50).to_le_bytes());
    assert!(err_of(v).contains("past the end"));
    let mut v = good.clone();
    v[at..at + 4].copy_from_slice(&7u32.to_le_bytes());
    assert!(err_of(v).contains("dims"));
}

/// A small deterministic generator for the fuzzer.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() as usize) % n.max(1)
    }
}

#[test]
fn mutated_files_never_panic() {
    let good = sample_bytes();
    let mut rng = Lcg(0x5eed);
    let mut parsed = 0;
    for _ in 0..4000 {
        let mut b = good.clone();
        for _ in 0..1 + rng.below(4) {
            match rng.below(5) {
                // Flip a byte, most often in the header where the structure is.
                0 | 1 => {
                    let limit = if rng.below(4) == 0 { b.len() } else { 1200.min(b.len()) };
                    let i = rng.below(limit);
                    b[i] ^= 1 << rng.below(8);
                }
                // Overwrite a u64 with a lie (count, length, dim or offset).
                2 => {
                    let i = 8 + rng.below(1200.min(b.len() - 16));
                    let lie = [0u64, 1, 255, 1 << 20, 1 << 33, u64::MAX, u64::MAX / 2][rng.below(7)];
                    b[i..i + 8].copy_from_slice(&lie.to_le_bytes());
                }
                3 => {
                    let cut = rng.below(b.len());
                    b.truncate(cut);
                }
                _ => {
                    let i = rng.below(b.len());
                    b.insert(i, rng.below(256) as u8);
                }
            }
        }
        if b.len() < 4 {
            continue;
        }
        if let Ok(f) = GgufFile::from_vec(b) {
            parsed += 1;
            // Whatever parses must be safe to read.
            for t in &f.tensors {
                let _ = f.data(t).len();
            }
        }
    }
    assert!(parsed > 0, "the mutations should leave some files valid");
}

/// Hundreds of thousands of tensors and keys parse in linear time (the
/// duplicate checks are hashed; models index their tensors by name): a
/// small lying file cannot make loading take minutes.
#[test]
fn many_tensors_and_keys_parse_and_look_up_in_linear_time() {
    let n = 300_000;
    let mut w = GgufWriter::new();
    for i in 0..n {
        w.metadata.push((format!("k{i}"), MetaValue::U8(1)));
        w.add_tensor(&format!("t{i}"), DType::F32, &[0]);
    }
    let bytes = w.to_bytes(|_| Ok(Vec::new())).unwrap();
    let f = GgufFile::from_vec(bytes).unwrap();
    assert_eq!((f.tensors.len(), f.metadata.len()), (n, n));
    assert!((0..n).step_by(997).all(|i| f.tensor(&format!("t{i}")).is_some_and(|t| t.name == format!("t{i}"))));
    let mut dup = GgufWriter::new();
    dup.add_tensor("same", DType::F32, &[0]);
    dup.add_tensor("same", DType::F32, &[0]);
    let e = GgufFile::from_vec(dup.to_bytes(|_| Ok(Vec::new())).unwrap()).err().expect("a duplicate name is refused").to_string();
    assert!(e.contains("appears twice"), "{e}");
}
