//! How one byte string carries several files: the parts of an input are
//! separated by [`PART_SEPARATOR`], a line no real file of these formats
//! contains, so that the mutator can change each file and keep them apart.

/// Separates the files of a multi-file input (an HF folder, a template and
/// its messages).
pub const PART_SEPARATOR: &[u8] = b"\n\x00--8<--\x00\n";

/// The parts of `data`, at most `max` (the last takes the rest).
pub fn split_parts(data: &[u8], max: usize) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while parts.len() + 1 < max {
        // memchr's search rather than a comparison at every offset: under
        // libFuzzer each slice comparison is an intercepted memcmp, which
        // took a third of the `hf` target's time on its 300 KB inputs.
        match memchr::memmem::find(rest, PART_SEPARATOR) {
            Some(at) => {
                parts.push(&rest[..at]);
                rest = &rest[at + PART_SEPARATOR.len()..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts
}

/// Joins files into one input (how the seeds are written).
pub fn join_parts(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(PART_SEPARATOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_split_and_join_back() {
        let joined = join_parts(&[b"a", b"", b"ccc"]);
        assert_eq!(split_parts(&joined, 3), [&b"a"[..], b"", b"ccc"]);
        assert_eq!(split_parts(&joined, 2), [&b"a"[..], &joined[1 + PART_SEPARATOR.len()..]]);
        assert_eq!(split_parts(b"plain", 4), [&b"plain"[..]]);
    }
}
