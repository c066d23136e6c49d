//! Training data: text file -> token stream -> train/validation split -> batches of windows.
//!
//! Leak-free by construction: the validation part is the TAIL of the token stream
//! (`val_fraction` of it, at least one window), and training windows are cut only from the part
//! before it, so no validation token can be inside any training window.
//!
//! Batches: windows of `seq_len + 1` tokens (inputs = first seq_len, targets = last seq_len).
//! Each epoch starts the window grid at a seeded offset in [0, seq_len] and visits the windows in
//! a seeded random order: windows never overlap within an epoch, and the order is a pure function
//! of (seed, epoch), so a (epoch, cursor) pair is the whole data position of a run.

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Reads a UTF-8 text file. Invalid UTF-8 is an error naming the byte offset (we do not guess an
/// encoding or silently replace bytes: the user should fix or convert the file).
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::Msg(format!(
            "data file {}: not found (scripts/fetch_assets.sh builds data/train_data.txt)",
            path.display()
        )),
        _ => Error::io(path, e),
    })?;
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Error::Msg(format!(
            "data file {}: is empty",
            path.display()
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        let off = e.utf8_error().valid_up_to();
        Error::Msg(format!(
            "data file {}: invalid UTF-8 at byte offset {off} (expected UTF-8 text; convert the file, e.g. with iconv)",
            path.display()
        ))
    })
}

/// Tokenizes text block by block (bounded memory) with the same ids as one call over the whole
/// text: blocks end between a letter and a single space followed by a letter ("word| next"),
/// where every byte-level pre-tokenizer tern knows (GPT-2's, SmolLM's, Qwen2's, Llama-3's)
/// ends one piece and starts the next (" next"). Blank lines are not such a place: GPT-2's rules
/// split "\n\nNext" into "\n", "\n", "Next" but a block ending in "\n\n" into "\n\n".
pub fn tokenize(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    const BLOCK: usize = 1 << 16;
    let mut ids = Vec::with_capacity(text.len() / 3);
    let mut rest = text;
    while !rest.is_empty() {
        let cut = if rest.len() <= BLOCK {
            rest.len()
        } else {
            block_end(rest, BLOCK)
        };
        ids.extend(tok.encode(&rest[..cut])?);
        rest = &rest[cut..];
    }
    Ok(ids)
}

/// The last "letter, space, letter" position at or before `max` bytes (the cut falls before the
/// space); without one, `max` moved to a character boundary.
fn block_end(text: &str, max: usize) -> usize {
    let b = text.as_bytes();
    let letter = |i: usize| b[i].is_ascii_alphabetic();
    (1..max.min(b.len() - 1))
        .rev()
        .find(|&i| b[i] == b' ' && letter(i - 1) && letter(i + 1))
        .unwrap_or_else(|| {
            let mut cut = max;
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
            cut
        })
}

#[derive(Debug, Clone)]
pub struct Split {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

/// Splits a token stream: validation = the last max(ceil(n * val_fraction), seq_len + 1) tokens.
pub fn split_tokens(
    tokens: Vec<u32>,
    val_fraction: f64,
    seq_len: usize,
    origin: &str,
) -> Result<Split> {
    let window = seq_len + 1;
    let n = tokens.len();
    let n_val = ((n as f64 * val_fraction).ceil() as usize).max(window);
    if n < n_val + window {
        return Err(Error::Msg(format!(
            "data {origin}: too short: {n} tokens, need at least {} (one training window of seq_len+1 = {window} \
             plus {n_val} validation tokens)",
            n_val + window
        )));
    }
    let mut train = tokens;
    let val = train.split_off(n - n_val);
    Ok(Split { train, val })
}

/// Reads, tokenizes and splits a training file: what `tern train` holds out is what
/// `tern eval --split val` scores.
pub fn load_split(
    path: &Path,
    tok: &Tokenizer,
    val_fraction: f64,
    seq_len: usize,
) -> Result<Split> {
    let text = read_text(path)?;
    let ids = tokenize(tok, &text)?;
    split_tokens(ids, val_fraction, seq_len, &path.display().to_string())
}

/// Position of a run in its data: which epoch, and how many windows of it were consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DataPosition {
    pub epoch: u64,
    pub cursor: usize,
}

pub struct Batcher {
    seq_len: usize,
    seed: u64,
    pub pos: DataPosition,
    plan: Option<(u64, usize, Vec<usize>)>,
}

impl Batcher {
    pub fn new(seq_len: usize, seed: u64) -> Self {
        Self {
            seq_len,
            seed,
            pos: DataPosition::default(),
            plan: None,
        }
    }

    /// (offset, window order) of an epoch: a pure function of (seed, epoch, stream length).
    fn plan_for(&self, epoch: u64, n: usize) -> (usize, Vec<usize>) {
        let window = self.seq_len + 1;
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch,
        );
        let slack = (n % window).min(window - 1);
        let offset = if slack == 0 {
            0
        } else {
            rng.gen_range(0..=slack)
        };
        let count = (n - offset) / window;
        let mut order: Vec<usize> = (0..count).collect();
        order.shuffle(&mut rng);
        (offset, order)
    }

    /// The next `batch` windows (each `seq_len + 1` tokens), row-major.
    pub fn next_batch(&mut self, tokens: &[u32], batch: usize) -> Vec<u32> {
        let window = self.seq_len + 1;
        let mut out = Vec::with_capacity(batch * window);
        for _ in 0..batch {
            let stale = !matches!(&self.plan, Some((e, _, _)) if *e == self.pos.epoch);
            if stale {
                let (off, order) = self.plan_for(self.pos.epoch, tokens.len());
                self.plan = Some((self.pos.epoch, off, order));
            }
            let (_, off, order) = self.plan.as_ref().expect("plan set above");
            let start = off + order[self.pos.cursor] * window;
            out.extend_from_slice(&tokens[start..start + window]);
            self.pos.cursor += 1;
            if self.pos.cursor == order.len() {
                self.pos = DataPosition {
                    epoch: self.pos.epoch + 1,
                    cursor: 0,
                };
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_validation_token_is_inside_any_training_window() {
        // Token ids = positions in the stream, so a window's ids say where it came from.
        let n = 10_007;
        let seq_len = 15;
        let split = split_tokens((0..n as u32).collect(), 0.1, seq_len, "t").unwrap();
        let n_train = split.train.len() as u32;
        assert!(split.val.iter().all(|&t| t >= n_train));
        assert_eq!(split.train.len() + split.val.len(), n);
        let mut b = Batcher::new(seq_len, 3);
        let per_epoch = split.train.len() / (seq_len + 1);
        for _ in 0..(3 * per_epoch / 4) {
            let w = b.next_batch(&split.train, 4);
            assert!(
                w.iter().all(|&t| t < n_train),
                "a training window reached validation tokens"
            );
        }
        assert!(b.pos.epoch >= 2, "ran over several epochs");
    }

    #[test]
    fn windows_do_not_overlap_within_an_epoch_and_are_deterministic() {
        let tokens: Vec<u32> = (0..1000).collect();
        let mut b = Batcher::new(9, 42);
        let mut seen = vec![false; 1000];
        let mut windows = 0;
        while b.pos.epoch == 0 {
            let w = b.next_batch(&tokens, 1);
            assert_eq!(w.len(), 10);
            assert!(
                w.windows(2).all(|p| p[1] == p[0] + 1),
                "window is contiguous"
            );
            for &t in &w {
                assert!(!seen[t as usize], "token {t} used twice in one epoch");
                seen[t as usize] = true;
            }
            windows += 1;
        }
        assert!(windows >= 99);
        let run = |seed| {
            let mut b = Batcher::new(9, seed);
            (0..30)
                .flat_map(|_| b.next_batch(&tokens, 2))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
        // Resuming from a position gives the same batches as running through.
        let mut a = Batcher::new(9, 5);
        let all: Vec<_> = (0..150).map(|_| a.next_batch(&tokens, 1)).collect();
        let mut r = Batcher::new(9, 5);
        for _ in 0..120 {
            r.next_batch(&tokens, 1);
        }
        let pos = r.pos;
        let mut resumed = Batcher::new(9, 5);
        resumed.pos = pos;
        let rest: Vec<_> = (120..150).map(|_| resumed.next_batch(&tokens, 1)).collect();
        assert_eq!(rest, all[120..].to_vec());
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let e = read_text(&d.path().join("none.txt"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.txt") && e.contains("not found"), "{e}");
        let p = d.path().join("empty.txt");
        std::fs::write(&p, "  \n").unwrap();
        assert!(read_text(&p).unwrap_err().to_string().contains("is empty"));
        let p = d.path().join("latin1.txt");
        std::fs::write(&p, b"caf\xe9 au lait").unwrap();
        let e = read_text(&p).unwrap_err().to_string();
        assert!(e.contains("invalid UTF-8 at byte offset 3"), "{e}");
        let e = split_tokens(vec![1; 20], 0.1, 16, "short.txt")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("short.txt") && e.contains("too short") && e.contains("20 tokens"),
            "{e}"
        );
    }
}
