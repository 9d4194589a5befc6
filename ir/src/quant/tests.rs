use super::*;
use crate::DType;

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
}

fn ternary_values(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n).map(|_| (lcg(&mut s) * 1.49).round() * scale).collect()
}

#[test]
fn ternary_layouts_round_trip_codes_exactly() {
    let x = ternary_values(1024, 0.375, 7);
    for dtype in [DType::TQ1_0, DType::TQ2_0, DType::I2S] {
        let bytes = quantize(dtype, &x);
        assert_eq!(bytes.len(), dtype.bytes_for(1024).unwrap());
        let scale = if dtype == DType::I2S { i2s_scale(&bytes, 1024 / 4) } else { 1.0 };
        let row = RowView { dtype, bytes: &bytes[..dtype.bytes_for(1024).unwrap() - if dtype == DType::I2S { 32 } else { 0 }], tensor_scale: scale };
        let mut out = vec![0f32; 1024];
        row.dequantize(&mut out);
        assert_eq!(out, x, "{dtype}");
    }
}

#[test]
fn tq2_0_element_positions_match_the_documented_layout() {
    let mut codes = [0i8; 256];
    codes[200] = 1; // byte 32*1 + 200%32 = 40, shift 2*((200%128)/32) = 4
    let b = BlockTQ2_0::from_codes(&codes, 1.0);
    for (i, &q) in b.qs.iter().enumerate() {
        let expect = if i == 40 { 0b01_10_01_01 } else { 0b01_01_01_01 };
        assert_eq!(q, expect, "byte {i}");
    }
}

#[test]
fn i2s_element_positions_match_the_documented_layout() {
    let mut codes = [0i8; 128];
    codes[97] = -1; // byte 1, bits 1:0 -> code 0
    let b = BlockI2S::from_codes(&codes, 1.0);
    assert_eq!(b.qs[1], 0b01_01_01_00);
    assert_eq!(b.qs[0], 0b01_01_01_01);
}

#[test]
fn float_blocks_reconstruct_within_their_precision() {
    let mut s = 3u64;
    let x: Vec<f32> = (0..512).map(|_| lcg(&mut s)).collect();
    for (dtype, tol) in [(DType::F16, 1e-3), (DType::BF16, 1e-2), (DType::Q8_0, 1e-2), (DType::Q6K, 4e-2), (DType::Q4K, 0.15)] {
        let bytes = quantize(dtype, &x);
        let mut out = vec![0f32; 512];
        RowView { dtype, bytes: &bytes, tensor_scale: 1.0 }.dequantize(&mut out);
        let err = x.iter().zip(&out).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err < tol, "{dtype}: max error {err}");
    }
}

/// I2_S rows that are not whole 128-value blocks (bitnet_b1_58-3B's FFN of
/// 8640, in memory from an HF folder) are padded with zero weights: every
/// row reads back its own codes, on awkward lengths.
#[test]
fn i2s_rows_of_any_length_read_back_their_codes() {
    for k in [1usize, 3, 127, 128, 783, 2592, 8640] {
        let rows = 3;
        let mut seed = k as u64;
        let codes: Vec<i8> = (0..rows * k).map(|_| (lcg(&mut seed) * 1.49).round() as i8).collect();
        let bytes = pack_i2s_rows(&codes, k, 0.5);
        assert_eq!(Some(bytes.len()), DType::I2S.tensor_bytes(&[rows, k]), "k = {k}");
        if k % 128 == 0 {
            assert_eq!(bytes, pack_i2s(&codes, 0.5), "k = {k}: whole blocks are bitnet.cpp's I2_S");
        }
        let w = crate::interp::WeightView { dtype: DType::I2S, shape: vec![rows, k], data: &bytes };
        for r in 0..rows {
            let mut got = vec![0i8; k];
            let mut scales = Vec::new();
            w.row(r).ternary(&mut got, &mut scales);
            assert_eq!(got, codes[r * k..(r + 1) * k], "k = {k}, row {r}");
            assert_eq!(scales, [0.5]);
        }
    }
    assert_eq!(DType::I2S.tensor_bytes(&[2, 8640]), Some(2 * 68 * 32 + 32));
    assert_eq!(DType::TQ2_0.tensor_bytes(&[2, 8640]), None, "TQ2_0 rows are whole blocks or nothing");
}
