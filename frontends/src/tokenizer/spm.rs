//! llama.cpp's SentencePiece tokenizer (`tokenizer.ggml.model = llama`):
//! start from UTF-8 characters, repeatedly merge the adjacent pair whose
//! concatenation is the vocabulary token with the highest score (ties go to
//! the leftmost pair), then spell any piece that is not a token with byte
//! tokens `<0xXX>`.

use std::collections::{BinaryHeap, HashMap};

pub struct Spm {
    pub ids: HashMap<String, u32>,
    pub scores: Vec<f32>,
}

#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    size: usize,
}

impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// Higher score first; on a tie, the smaller left index first.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score.total_cmp(&o.score).then_with(|| o.left.cmp(&self.left))
    }
}

struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    /// Tokenizes text that is already escaped (spaces as U+2581).
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let mut syms: Vec<Symbol> = Vec::new();
        for (i, (start, c)) in text.char_indices().enumerate() {
            syms.push(Symbol { start, len: c.len_utf8(), prev: i.checked_sub(1), next: Some(i + 1) });
        }
        if let Some(last) = syms.last_mut() {
            last.next = None;
        }
        let mut heap = BinaryHeap::new();
        let try_add = |heap: &mut BinaryHeap<Bigram>, syms: &[Symbol], l: Option<usize>, r: Option<usize>| {
            let (Some(l), Some(r)) = (l, r) else { return };
            let piece = &text[syms[l].start..syms[r].start + syms[r].len];
            if let Some(&id) = self.ids.get(piece) {
                heap.push(Bigram { score: self.scores[id as usize], left: l, size: piece.len() });
            }
        };
        for i in 1..syms.len() {
            try_add(&mut heap, &syms, Some(i - 1), Some(i));
        }
        while let Some(b) = heap.pop() {
            let l = b.left;
            let Some(r) = syms[l].next else { continue };
            // Skip bigrams made stale by an earlier merge.
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != b.size {
                continue;
            }
            syms[l].len += syms[r].len;
            syms[r].len = 0;
            syms[l].next = syms[r].next;
            if let Some(n) = syms[r].next {
                syms[n].prev = Some(l);
            }
            try_add(&mut heap, &syms, syms[l].prev, Some(l));
            try_add(&mut heap, &syms, Some(l), syms[l].next);
        }
        let mut i = if syms.is_empty() { None } else { Some(0) };
        while let Some(s) = i {
            let piece = &text[syms[s].start..syms[s].start + syms[s].len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        if let Some(&id) = self.ids.get(&format!("<0x{b:02X}>")) {
                            out.push(id);
                        }
                    }
                }
            }
            i = syms[s].next;
        }
    }
}
