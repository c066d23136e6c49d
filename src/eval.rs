//! Held-out perplexity.
//!
//! A scoring plan is a list of windows over the token stream; inside a window every scored token
//! is predicted from the earlier tokens of that window only.
//! - plain (default): consecutive non-overlapping windows of `ctx` tokens; every token after the
//!   first of each window is scored.
//! - plain with `stride < ctx`: sliding windows (Hugging Face's recipe): windows start every
//!   `stride` tokens, and each scores only the tokens not scored before, so every token is scored
//!   once with up to ctx-1 tokens of context.
//! - llama: what llama-perplexity does: chunks of `ctx` (a trailing partial chunk dropped), only
//!   the second half of each chunk scored (tokens ctx/2+1 .. ctx-1 of the chunk).
//!
//! PPL = exp(mean NLL); its error is exp(mean) * stderr(NLL), as llama.cpp prints it.

use crate::error::{Error, Result};
use crate::model::{Model, NoCache};
use candle_core::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scheme {
    Plain,
    Llama,
}

/// Tokens `[start, start + len)` of the stream; positions `score_from..len` are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub len: usize,
    pub score_from: usize,
}

pub fn plan(n: usize, ctx: usize, stride: Option<usize>, scheme: Scheme) -> Result<Vec<Window>> {
    if ctx < 2 {
        return Err(Error::Msg(format!(
            "--ctx: expected at least 2, found {ctx}"
        )));
    }
    let mut v = Vec::new();
    match (scheme, stride) {
        (Scheme::Llama, Some(_)) => {
            return Err(Error::Msg(
                "--stride applies to the plain scheme only".into(),
            ))
        }
        (Scheme::Llama, None) => {
            let first = ctx / 2;
            for k in 0..n / ctx {
                v.push(Window {
                    start: k * ctx,
                    len: ctx,
                    score_from: first + 1,
                });
            }
        }
        (Scheme::Plain, None) => {
            let mut start = 0;
            while start + 2 <= n {
                let len = ctx.min(n - start);
                v.push(Window {
                    start,
                    len,
                    score_from: 1,
                });
                start += ctx;
            }
        }
        (Scheme::Plain, Some(s)) => {
            if s == 0 || s > ctx {
                return Err(Error::Msg(format!(
                    "--stride: expected 1..={ctx} (the context), found {s}"
                )));
            }
            let (mut begin, mut prev_end) = (0usize, 0usize);
            while begin < n {
                let end = (begin + ctx).min(n);
                let len = end - begin;
                let new = end - prev_end;
                if len >= 2 {
                    v.push(Window {
                        start: begin,
                        len,
                        score_from: (len - new).max(1),
                    });
                }
                prev_end = end;
                if end == n {
                    break;
                }
                begin += s;
            }
        }
    }
    if v.is_empty() {
        return Err(Error::Msg(format!(
            "{n} tokens are too few to score with ctx {ctx}"
        )));
    }
    Ok(v)
}

/// NLL of every scored token, windows batched `batch` at a time (same-length windows together).
pub fn score(model: &Model, tokens: &[u32], windows: &[Window], batch: usize) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < windows.len() {
        let len = windows[i].len;
        let mut j = i;
        while j < windows.len() && j - i < batch.max(1) && windows[j].len == len {
            j += 1;
        }
        let group = &windows[i..j];
        let flat: Vec<u32> = group
            .iter()
            .flat_map(|w| tokens[w.start..w.start + len].iter().copied())
            .collect();
        let ids = Tensor::from_vec(flat, (group.len(), len), model.device())?;
        let inp = ids.narrow(1, 0, len - 1)?;
        let tgt = ids.narrow(1, 1, len - 1)?.flatten_all()?;
        let h = model.forward(&inp, &mut NoCache::new())?;
        let nll = model.token_nll(&h.flatten_to(1)?, &tgt)?;
        for (g, w) in group.iter().enumerate() {
            // Row p predicts the token at window position p + 1.
            let row = &nll[g * (len - 1)..(g + 1) * (len - 1)];
            out.extend_from_slice(&row[w.score_from - 1..]);
        }
        i = j;
    }
    Ok(out)
}

/// How far a model's next-token distributions are from a base model's on the same tokens (what
/// `llama-perplexity --kl-divergence` reports).
#[derive(Debug, Clone, serde::Serialize)]
pub struct KlStats {
    /// Mean over scored tokens of KL(base || model), in nats.
    pub mean_kl: f64,
    /// Standard error of that mean.
    pub kl_stderr: f64,
    /// Largest per-token KL.
    pub max_kl: f64,
    /// Share of scored tokens where both models rank the same token first.
    pub same_top: f64,
    pub tokens: usize,
}

/// Index of the largest logit (the first on ties).
fn top(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |best, (i, &v)| if v > row[best] { i } else { best })
}

/// Log-softmax of one row of logits, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
    let z = row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
    row.iter().map(|&v| v as f64 - z).collect()
}

/// Compares `model` against `base` on the scored positions of `windows`, one window at a time
/// (the full `[T, vocab]` logits of both exist for one window only).
pub fn kl_divergence(
    model: &Model,
    base: &Model,
    tokens: &[u32],
    windows: &[Window],
) -> Result<KlStats> {
    if model.cfg.vocab_size != base.cfg.vocab_size {
        return Err(Error::Msg(format!(
            "--kl-base: vocabularies differ ({} vs {})",
            model.cfg.vocab_size, base.cfg.vocab_size
        )));
    }
    let (mut kls, mut same) = (Vec::new(), 0usize);
    for w in windows {
        let ids = &tokens[w.start..w.start + w.len - 1];
        let logits = |m: &Model| -> Result<Vec<Vec<f32>>> {
            let ids = Tensor::new(ids, m.device())?.unsqueeze(0)?;
            let h = m.forward(&ids, &mut NoCache::new())?.squeeze(0)?;
            let h = h.narrow(0, w.score_from - 1, w.len - w.score_from)?;
            Ok(m.logits(&h)?.to_dtype(candle_core::DType::F32)?.to_vec2()?)
        };
        for (a, b) in logits(model)?.iter().zip(logits(base)?.iter()) {
            let (la, lb) = (log_softmax(a), log_softmax(b));
            kls.push(
                lb.iter()
                    .zip(&la)
                    .map(|(pb, pa)| pb.exp() * (pb - pa))
                    .sum::<f64>()
                    .max(0.0),
            );
            same += usize::from(top(a) == top(b));
        }
    }
    let n = kls.len().max(1) as f64;
    let mean = kls.iter().sum::<f64>() / n;
    let var = kls.iter().map(|k| (k - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    Ok(KlStats {
        mean_kl: mean,
        kl_stderr: (var / n).sqrt(),
        max_kl: kls.iter().fold(0f64, |a, &b| a.max(b)),
        same_top: same as f64 / n,
        tokens: kls.len(),
    })
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    pub ppl_stderr: f64,
    pub nll: f64,
    pub tokens: usize,
}

/// Target token of every scored position, in [`score`]'s order.
pub fn scored_targets(tokens: &[u32], windows: &[Window]) -> Vec<u32> {
    windows
        .iter()
        .flat_map(|w| {
            tokens[w.start + w.score_from..w.start + w.len]
                .iter()
                .copied()
        })
        .collect()
}

/// Mean bytes of text per scored token (`byte_len` from `Tokenizer::token_byte_lengths`): bits
/// per byte = mean NLL / (ln 2 x this). Unlike perplexity it compares across tokenizers.
pub fn bytes_per_token(targets: &[u32], byte_len: &[u32]) -> f64 {
    let bytes: u64 = targets
        .iter()
        .map(|&t| byte_len.get(t as usize).copied().unwrap_or(0) as u64)
        .sum();
    bytes as f64 / targets.len().max(1) as f64
}

/// Bits per byte of a mean NLL (nats per token).
pub fn bits_per_byte(mean_nll: f64, bytes_per_token: f64) -> f64 {
    mean_nll / (std::f64::consts::LN_2 * bytes_per_token)
}

pub fn perplexity(nll: &[f64]) -> Perplexity {
    let n = nll.len().max(1) as f64;
    let mean = nll.iter().sum::<f64>() / n;
    let mean2 = nll.iter().map(|x| x * x).sum::<f64>() / n;
    let err = if nll.len() > 1 {
        ((mean2 - mean * mean).max(0.0) / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    let ppl = mean.exp();
    Perplexity {
        ppl,
        ppl_stderr: ppl * err,
        nll: mean,
        tokens: nll.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(n: usize, w: &[Window]) -> Vec<usize> {
        let mut c = vec![0; n];
        for x in w {
            for p in x.score_from..x.len {
                c[x.start + p] += 1;
            }
        }
        c
    }

    #[test]
    fn plain_scores_every_token_but_each_window_start_once() {
        let w = plan(10, 4, None, Scheme::Plain).unwrap();
        assert_eq!(w.len(), 3); // [0,4) [4,8) [8,10)
        assert_eq!(scored(10, &w), vec![0, 1, 1, 1, 0, 1, 1, 1, 0, 1]);
    }

    #[test]
    fn stride_scores_each_token_once_after_the_first() {
        let w = plan(23, 8, Some(3), Scheme::Plain).unwrap();
        let c = scored(23, &w);
        assert_eq!(c[0], 0);
        assert!(c[1..].iter().all(|&x| x == 1), "{c:?}");
        // every scored token had at most ctx-1 tokens of context inside its window
        assert!(w.iter().all(|x| x.len <= 8));
    }

    #[test]
    fn llama_scores_the_second_half_of_full_chunks() {
        let w = plan(21, 8, None, Scheme::Llama).unwrap();
        assert_eq!(w.len(), 2);
        let c = scored(21, &w);
        assert_eq!(&c[..8], &[0, 0, 0, 0, 0, 1, 1, 1]);
        assert!(c[16..].iter().all(|&x| x == 0));
    }

    #[test]
    fn bits_per_byte_counts_the_scored_targets_bytes() {
        // Windows [0,4) scoring 1..4 and [4,6) scoring 5: targets are tokens 1,2,3,5.
        let w = plan(6, 4, None, Scheme::Plain).unwrap();
        let tokens = [0, 1, 2, 3, 4, 5];
        assert_eq!(scored_targets(&tokens, &w), vec![1, 2, 3, 5]);
        let byte_len = [9, 1, 2, 3, 100, 2];
        assert_eq!(bytes_per_token(&[1, 2, 3, 5], &byte_len), 2.0);
        // ln 2 nats per token over 2 bytes per token = half a bit per byte.
        assert!((bits_per_byte(std::f64::consts::LN_2, 2.0) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn perplexity_and_its_error() {
        let p = perplexity(&[1.0, 1.0, 1.0]);
        assert!((p.ppl - std::f64::consts::E).abs() < 1e-12 && p.ppl_stderr == 0.0);
        let p = perplexity(&[0.0, 2.0]);
        assert!((p.ppl - std::f64::consts::E).abs() < 1e-12);
        assert!((p.ppl_stderr - std::f64::consts::E * 1.0).abs() < 1e-12);
    }
}
