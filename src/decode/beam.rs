//! Batched beam search.
//!
//! Data layout: every live (unfinished) beam of every prompt is one row of the model's batch;
//! after each step the rows are re-gathered (`parents`) so the KV cache follows its beams (a row
//! may be duplicated when one beam has several surviving children, dropped when none survive or
//! when its beam finished). Finished beams hold no row: they are frozen and stay in the pool.
//!
//! One step, per prompt: every live beam is expanded with its top 2K tokens (fused softmax +
//! top-k; log-probability = logit - lse), total = accumulated + new; the candidates are pooled
//! with the finished beams and the best K kept by the length-penalized score
//! `total / gen_len^A` (gen_len counts generated tokens, EOS included, never the prompt; the
//! accumulated total itself is never modified). A candidate ending in EOS is finished. Search
//! stops when no live beam remains or after `max_new` tokens; the K beams come back best first.
//!
//! Cost per step: one batched forward over at most items*K rows, O(rows * V) for the top-k, a KV
//! gather of the surviving rows. On a GPU the gather is an index_select of the cache (or, with a
//! paged cache, a copy of block tables with copy-on-write).

use super::generate::last_logits;
use super::topk::softmax_topk;
use crate::error::{Error, Result};
use crate::model::{KvCache, Model};
use candle_core::Tensor;

/// What the search needs from a model: next-token logits per row, with rows re-gathered.
pub trait BeamModel {
    /// Prefills the prompts (one row each); returns the next-token logits of each.
    fn start(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>>;
    /// New rows: row r continues old row `parents[r]` with `tokens[r]`; returns their logits.
    fn step(&mut self, parents: &[usize], tokens: &[u32]) -> Result<Vec<Vec<f32>>>;
}

#[derive(Debug, Clone, PartialEq)]
pub struct BeamConfig {
    pub beams: usize,
    pub length_penalty: f64,
    pub max_new: usize,
    pub eos: Vec<u32>,
}

/// One returned hypothesis.
#[derive(Debug, Clone, PartialEq)]
pub struct Hyp {
    pub tokens: Vec<u32>,
    /// Sum of the log-probabilities of the generated tokens.
    pub logprob: f64,
    /// logprob / len^A.
    pub score: f64,
    pub finished: bool,
}

fn score(logprob: f64, len: usize, a: f64) -> f64 {
    if a == 0.0 {
        logprob
    } else {
        logprob / (len.max(1) as f64).powf(a)
    }
}

struct Beam {
    hyp: Hyp,
    row: Option<usize>,
}

/// Beam search for every prompt; returns the beams of each prompt, best first.
pub fn beam_search(
    model: &mut impl BeamModel,
    prompts: &[Vec<u32>],
    cfg: &BeamConfig,
) -> Result<Vec<Vec<Hyp>>> {
    let k = cfg.beams;
    if k == 0 {
        return Err(Error::Msg("--beams must be at least 1".into()));
    }
    if !(cfg.length_penalty.is_finite()) {
        return Err(Error::Msg(format!(
            "--length-penalty must be finite, found {}",
            cfg.length_penalty
        )));
    }
    let mut logits = model.start(prompts)?;
    let mut items: Vec<Vec<Beam>> = (0..prompts.len())
        .map(|i| {
            vec![Beam {
                hyp: Hyp {
                    tokens: vec![],
                    logprob: 0.0,
                    score: 0.0,
                    finished: false,
                },
                row: Some(i),
            }]
        })
        .collect();
    for step in 0..cfg.max_new {
        let (mut parents, mut tokens) = (Vec::new(), Vec::new());
        for beams in items.iter_mut() {
            // (hyp, parent row if it continues live)
            let mut pool: Vec<(Hyp, Option<usize>)> = Vec::new();
            for b in beams.iter() {
                match b.row {
                    Some(row) if !b.hyp.finished => {
                        let top = softmax_topk(&logits[row], 2 * k);
                        for (&t, lp) in top.ids.iter().zip(top.logprobs(&logits[row])) {
                            if !lp.is_finite() {
                                continue;
                            }
                            let mut toks = b.hyp.tokens.clone();
                            toks.push(t);
                            let total = b.hyp.logprob + lp as f64;
                            let finished = cfg.eos.contains(&t);
                            let s = score(total, toks.len(), cfg.length_penalty);
                            pool.push((
                                Hyp {
                                    tokens: toks,
                                    logprob: total,
                                    score: s,
                                    finished,
                                },
                                Some(row),
                            ));
                        }
                    }
                    _ => pool.push((b.hyp.clone(), None)),
                }
            }
            // Best K by score; a stable sort keeps earlier beams/better tokens first among ties.
            pool.sort_by(|a, b| b.0.score.total_cmp(&a.0.score));
            pool.truncate(k);
            *beams = pool
                .into_iter()
                .map(|(hyp, parent)| {
                    let row = match parent {
                        Some(p) if !hyp.finished => {
                            parents.push(p);
                            tokens.push(*hyp.tokens.last().expect("expanded"));
                            Some(parents.len() - 1)
                        }
                        _ => None,
                    };
                    Beam { hyp, row }
                })
                .collect();
        }
        if parents.is_empty() || step + 1 == cfg.max_new {
            break;
        }
        logits = model.step(&parents, &tokens)?;
    }
    Ok(items
        .into_iter()
        .map(|beams| beams.into_iter().map(|b| b.hyp).collect())
        .collect())
}

/// [`BeamModel`] over a frozen Qwen3 with the contiguous KV cache; prompts are left-padded.
pub struct QwenBeams<'a> {
    model: &'a Model,
    /// Holds each row's left padding too (that of its prompt), gathered with the rows.
    cache: KvCache,
}

impl<'a> QwenBeams<'a> {
    pub fn new(model: &'a Model) -> Self {
        Self {
            model,
            cache: KvCache::new(model.cfg.num_hidden_layers),
        }
    }
}

impl BeamModel for QwenBeams<'_> {
    fn start(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        super::generate::check_prompts(prompts, self.model.cfg.vocab_size)?;
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let pad: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
        let flat: Vec<u32> = prompts
            .iter()
            .zip(&pad)
            .flat_map(|(p, &n)| std::iter::repeat_n(0u32, n).chain(p.iter().copied()))
            .collect();
        self.cache = KvCache::with_padding(self.model.cfg.num_hidden_layers, pad);
        let ids = Tensor::from_vec(flat, (prompts.len(), longest), self.model.device())?;
        last_logits(self.model, &self.model.forward(&ids, &mut self.cache)?)
    }

    fn step(&mut self, parents: &[usize], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.cache.select_rows(parents)?;
        let ids = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), self.model.device())?;
        last_logits(self.model, &self.model.forward(&ids, &mut self.cache)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted model: logits are a function of the tokens generated so far in the row.
    struct Scripted<F: Fn(&[u32]) -> Vec<f32>> {
        f: F,
        rows: Vec<Vec<u32>>,
    }

    impl<F: Fn(&[u32]) -> Vec<f32>> BeamModel for Scripted<F> {
        fn start(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
            self.rows = vec![vec![]; prompts.len()];
            Ok(self.rows.iter().map(|r| (self.f)(r)).collect())
        }
        fn step(&mut self, parents: &[usize], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
            self.rows = parents
                .iter()
                .zip(tokens)
                .map(|(&p, &t)| [self.rows[p].clone(), vec![t]].concat())
                .collect();
            Ok(self.rows.iter().map(|r| (self.f)(r)).collect())
        }
    }

    fn logits_of(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    #[test]
    fn a_beam_that_ends_early_stays_in_the_pool_and_wins() {
        // Token 0 = EOS, vocabulary of 141. Step 1: EOS has log-probability -3.0, token 1 the
        // rest (~-0.051). After token 1 the next token is uniform: ln(1/141) = -4.949, so the
        // continuing beam reaches -5.0 after two tokens.
        let v = 141;
        let f = move |seq: &[u32]| -> Vec<f32> {
            let mut l = vec![-40f32; v];
            if seq.is_empty() {
                l[0] = -3.0;
                l[1] = (1.0 - (-3.0f64).exp()).ln() as f32;
            } else {
                l.iter_mut().for_each(|x| *x = 0.0);
            }
            l
        };
        let mut m = Scripted { f, rows: vec![] };
        let cfg = BeamConfig {
            beams: 2,
            length_penalty: 0.0,
            max_new: 2,
            eos: vec![0],
        };
        let out = beam_search(&mut m, &[vec![5]], &cfg).unwrap();
        let best = &out[0][0];
        assert_eq!(best.tokens, vec![0]);
        assert!(
            best.finished && (best.logprob + 3.0).abs() < 1e-5,
            "{best:?}"
        );
        let second = &out[0][1];
        assert_eq!(second.tokens.len(), 2);
        assert!((second.logprob + 5.0).abs() < 1e-3, "{second:?}");
    }

    #[test]
    fn length_penalty_divides_the_score_not_the_total() {
        let f = |seq: &[u32]| -> Vec<f32> {
            match seq.len() {
                0 => logits_of(&[0.3, 0.7]),
                _ => logits_of(&[0.9, 0.1]),
            }
        };
        let mut m = Scripted { f, rows: vec![] };
        let cfg = BeamConfig {
            beams: 2,
            length_penalty: 1.0,
            max_new: 3,
            eos: vec![0],
        };
        let out = beam_search(&mut m, &[vec![1]], &cfg).unwrap();
        for h in &out[0] {
            assert!((h.score - h.logprob / h.tokens.len() as f64).abs() < 1e-9);
        }
        // [1, 0]: ln .7 + ln .9 = -0.462 over 2 = -0.231 beats [0]: ln .3 = -1.204.
        assert_eq!(out[0][0].tokens, vec![1, 0]);
    }
}
