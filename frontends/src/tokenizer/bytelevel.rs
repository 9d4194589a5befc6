//! GPT-2's byte-to-character map: byte-level BPE vocabularies spell every
//! byte as a printable character (space is `Ġ`, newline is `Ċ`).

use std::sync::OnceLock;

fn table() -> &'static ([char; 256], std::collections::HashMap<char, u8>) {
    static T: OnceLock<([char; 256], std::collections::HashMap<char, u8>)> = OnceLock::new();
    T.get_or_init(|| {
        let mut chars = ['\0'; 256];
        let mut n = 0u32;
        for b in 0..=255u8 {
            let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
            chars[b as usize] = if printable {
                b as char
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            };
        }
        let back = chars.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        (chars, back)
    })
}

/// The bytes a byte-level token spells; characters outside the map are
/// taken as their own UTF-8.
pub fn decode(piece: &str, out: &mut Vec<u8>) {
    let back = &table().1;
    for c in piece.chars() {
        match back.get(&c) {
            Some(&b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

/// The byte-level spelling of raw bytes.
pub fn encode(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| table().0[b as usize]).collect()
}
