//! Batched generation: prompts of different lengths are left-padded into one batch, prefilled
//! in one forward and decoded one token per step with the KV cache. Each row has its own
//! positions and never sees its padding, so every output equals running its prompt alone.

use super::paged::{KvType, PagedKvCache, PagedStep, SeqId};
use super::sampler::{Sampler, SamplerConfig};
use crate::error::{Error, Result};
use crate::model::{KvCache, Model};
use candle_core::DType;
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub max_new: usize,
    pub sampler: SamplerConfig,
    pub eos: Vec<u32>,
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Eos,
    Length,
    Stop,
}

/// Appends `tok` to a row and decides whether the row is done: EOS, a stop string (`stop()`),
/// or the last step.
fn record(
    row: &mut (Vec<u32>, Option<Finish>),
    tok: u32,
    step: usize,
    cfg: &GenerateConfig,
    stop: impl FnOnce() -> bool,
) {
    row.0.push(tok);
    row.1 = if cfg.eos.contains(&tok) {
        Some(Finish::Eos)
    } else if stop() {
        Some(Finish::Stop)
    } else if step + 1 == cfg.max_new {
        Some(Finish::Length)
    } else {
        None
    };
}

/// Logits `[B][vocab]` (f32) of the last position of each row of hidden states `h: [B, T, H]`:
/// the LM head runs on those rows only.
pub fn last_logits(model: &Model, h: &Tensor) -> Result<Vec<Vec<f32>>> {
    let t = h.dim(1)?;
    let last = h.narrow(1, t - 1, 1)?.squeeze(1)?;
    Ok(model.logits(&last)?.to_dtype(DType::F32)?.to_vec2()?)
}

/// One forward over the paged cache: appends each `(seq, tokens)` and returns the next-token
/// logits after each sequence's last new token. Use on a `freeze()`d model. A packed model runs
/// the host forward (`model::host`: the same values as [`paged_forward_reference`], without
/// candle between the matmuls).
pub fn paged_forward(
    model: &Model,
    batch: &[(SeqId, Vec<u32>)],
    cache: &mut PagedKvCache,
) -> Result<Vec<Vec<f32>>> {
    if !model.runs_on_host() {
        return paged_forward_reference(model, batch, cache);
    }
    let (mut step, ids) = PagedStep::new(cache, batch)?;
    model.host_logits(&ids, &mut step, &last_rows(batch))
}

/// [`paged_forward`] through the one forward, `Model::forward` (any model and device): the
/// reference the host forward is checked against.
pub fn paged_forward_reference(
    model: &Model,
    batch: &[(SeqId, Vec<u32>)],
    cache: &mut PagedKvCache,
) -> Result<Vec<Vec<f32>>> {
    let (mut step, ids) = PagedStep::new(cache, batch)?;
    let n = ids.len();
    let last: Vec<u32> = last_rows(batch).iter().map(|&r| r as u32).collect();
    let h = model.forward(&Tensor::from_vec(ids, (1, n), model.device())?, &mut step)?;
    let h = h
        .squeeze(0)?
        .index_select(&Tensor::new(last.as_slice(), model.device())?, 0)?;
    Ok(model.logits(&h)?.to_dtype(DType::F32)?.to_vec2()?)
}

/// The index of each sequence's last new token in the step's flattened tokens.
fn last_rows(batch: &[(SeqId, Vec<u32>)]) -> Vec<usize> {
    batch
        .iter()
        .scan(0, |end, (_, toks)| {
            *end += toks.len();
            Some(*end - 1)
        })
        .collect()
}

/// One sampler per row: row r draws with seed `seed + r`, its prompt seen by the repetition
/// penalty.
fn row_samplers(cfg: &SamplerConfig, prompts: &[Vec<u32>]) -> Vec<Sampler> {
    let seeded = |r: usize| SamplerConfig {
        seed: cfg.seed.wrapping_add(r as u64),
        ..*cfg
    };
    prompts
        .iter()
        .enumerate()
        .map(|(r, p)| Sampler::new(seeded(r)).with_history(p))
        .collect()
}

/// Every prompt non-empty and inside the vocabulary.
pub fn check_prompts(prompts: &[Vec<u32>], vocab: usize) -> Result<()> {
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(Error::Msg(format!(
            "prompt {} is empty after tokenization",
            i + 1
        )));
    }
    if let Some(bad) = prompts.iter().flatten().find(|&&t| t as usize >= vocab) {
        return Err(Error::Msg(format!(
            "token id {bad} is outside the model's vocabulary ({vocab})"
        )));
    }
    Ok(())
}

/// Generates for every prompt; `on_token(row, token)` is called as tokens arrive and may return
/// true to stop that row (stop strings). Returns the new tokens of each row and why it stopped.
/// Row r samples with seed `sampler.seed + r`.
pub fn generate_batch(
    model: &Model,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    mut on_token: impl FnMut(usize, u32) -> bool,
) -> Result<Vec<(Vec<u32>, Finish)>> {
    if prompts.is_empty() {
        return Ok(vec![]);
    }
    check_prompts(prompts, model.cfg.vocab_size)?;
    let b = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let pad: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let flat: Vec<u32> = prompts
        .iter()
        .zip(&pad)
        .flat_map(|(p, &n)| std::iter::repeat_n(0u32, n).chain(p.iter().copied()))
        .collect();
    let mut samplers = row_samplers(&cfg.sampler, prompts);
    let mut out: Vec<(Vec<u32>, Option<Finish>)> = vec![(Vec::new(), None); b];
    let mut cache = KvCache::with_padding(model.cfg.num_hidden_layers, pad);
    let mut rows = last_logits(
        model,
        &model.forward(
            &Tensor::from_vec(flat, (b, longest), model.device())?,
            &mut cache,
        )?,
    )?;
    for step in 0..cfg.max_new {
        let mut next = Vec::with_capacity(b);
        for (r, row) in rows.iter().enumerate() {
            if out[r].1.is_some() {
                next.push(cfg.eos.first().copied().unwrap_or(0));
                continue;
            }
            let tok = samplers[r].sample(row);
            record(&mut out[r], tok, step, cfg, || on_token(r, tok));
            next.push(tok);
        }
        if out.iter().all(|o| o.1.is_some()) {
            break;
        }
        rows = last_logits(
            model,
            &model.forward(&Tensor::from_vec(next, (b, 1), model.device())?, &mut cache)?,
        )?;
    }
    Ok(out
        .into_iter()
        .map(|(t, f)| (t, f.unwrap_or(Finish::Length)))
        .collect())
}

/// Positions per block of the paged cache where no size is named.
pub const DEFAULT_BLOCK: usize = 16;

/// Generation with the KV cache that suits the model: the paged one (storing `kv`) for a model
/// that [`Model::runs_on_host`] (its host forward attends over the paged cache, without candle
/// between the matmuls), the contiguous one otherwise. Same samplers and seeds either way.
pub fn generate_auto(
    model: &Model,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    kv: KvType,
    on_token: impl FnMut(usize, u32) -> bool,
) -> Result<Vec<(Vec<u32>, Finish)>> {
    if model.runs_on_host() {
        generate_paged(model, prompts, cfg, DEFAULT_BLOCK, kv, on_token)
    } else {
        generate_batch(model, prompts, cfg, on_token)
    }
}

/// [`generate_batch`] over the paged KV cache (`decode::paged`): no padding (each sequence has
/// its own block table and length), finished rows drop out of the batch and free their blocks.
/// Same samplers and seeds, so the same tokens (with an f32 cache, `kv`; f16 rounds K and V).
pub fn generate_paged(
    model: &Model,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    block_size: usize,
    kv: KvType,
    mut on_token: impl FnMut(usize, u32) -> bool,
) -> Result<Vec<(Vec<u32>, Finish)>> {
    if prompts.is_empty() {
        return Ok(vec![]);
    }
    check_prompts(prompts, model.cfg.vocab_size)?;
    let c = &model.cfg;
    let mut cache = PagedKvCache::with_type(
        c.num_hidden_layers,
        c.kv_heads(),
        c.head_dim(),
        block_size,
        kv,
    );
    let seqs: Vec<usize> = prompts.iter().map(|_| cache.add_seq()).collect();
    let mut samplers = row_samplers(&cfg.sampler, prompts);
    let mut out: Vec<(Vec<u32>, Option<Finish>)> = vec![(Vec::new(), None); prompts.len()];
    let mut batch: Vec<(usize, Vec<u32>)> = seqs
        .iter()
        .zip(prompts)
        .map(|(&s, p)| (s, p.clone()))
        .collect();
    let mut live: Vec<usize> = (0..prompts.len()).collect();
    for step in 0..cfg.max_new {
        let logits = paged_forward(model, &batch, &mut cache)?;
        let mut next_batch = Vec::new();
        let mut next_live = Vec::new();
        for (&r, row) in live.iter().zip(&logits) {
            let tok = samplers[r].sample(row);
            record(&mut out[r], tok, step, cfg, || on_token(r, tok));
            if out[r].1.is_some() {
                cache.free_seq(seqs[r])?;
            } else {
                next_batch.push((seqs[r], vec![tok]));
                next_live.push(r);
            }
        }
        if next_live.is_empty() {
            break;
        }
        batch = next_batch;
        live = next_live;
    }
    Ok(out
        .into_iter()
        .map(|(t, f)| (t, f.unwrap_or(Finish::Length)))
        .collect())
}
