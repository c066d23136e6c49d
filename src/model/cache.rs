//! What one forward attends over, passed into [`super::Qwen3::forward`] the way mlx-lm passes a
//! cache object into its one `__call__`. Each implementation supplies the positions of the new
//! tokens and each layer's attention:
//!
//! - [`NoCache`]: training and scoring: positions `0..T`, causal, nothing kept.
//! - [`KvCache`]: incremental decoding with one contiguous `[B, KV, T, hd]` K/V tensor per
//!   layer; optionally left-padded rows (each row its own positions, padding never seen).
//! - [`TreeStep`]: one verification forward of a draft tree: explicit positions and an explicit
//!   tree mask over a [`KvCache`].
//! - `decode::paged::PagedStep`: the paged KV cache (block pool, block tables).

use crate::error::{Error, Result};
use crate::kernels::attention::Mask;
use crate::kernels::Kernels;
use candle_core::{DType, Device, Tensor};

/// RoPE positions of the new tokens.
#[derive(Debug, Clone)]
pub enum Positions {
    /// One position per new token, the same for every row: `[T]`.
    Shared(Vec<u32>),
    /// Row-major `[B * T]`: each row its own positions (left-padded batches).
    PerRow(Vec<u32>),
}

/// What a forward's layers need to know about the tensors they attend with.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo<'a> {
    pub batch: usize,
    pub new_tokens: usize,
    pub layers: usize,
    pub dtype: DType,
    pub device: &'a Device,
    pub kernels: Kernels,
}

/// An attention backend: one per cache layout.
pub trait Cache {
    /// Called once per forward before the layers: the positions of the new tokens (and any
    /// per-forward state, such as the mask).
    fn begin(&mut self, step: &StepInfo) -> Result<Positions>;
    /// One layer's attention: q `[B, H, T, hd]` and the new k, v `[B, KV, T, hd]` (RoPE
    /// applied) to the output `[B, H, T, hd]`.
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        kernels: Kernels,
    ) -> Result<Tensor>;
}

/// Training and scoring: every position of `ids` from 0, causal, nothing cached.
#[derive(Debug, Default)]
pub struct NoCache {
    mask: Option<Mask>,
}

impl NoCache {
    pub fn new() -> Self {
        Self::default()
    }
}

fn causal(step: &StepInfo, past: usize, pad: &[usize]) -> Result<Mask> {
    let flash = step
        .kernels
        .flash_attention_applies(step.dtype, step.device);
    Mask::causal(step.new_tokens, past, pad, flash, step.dtype, step.device)
}

fn prepared(mask: &Option<Mask>) -> Result<&Mask> {
    mask.as_ref()
        .ok_or_else(|| Error::Msg("attention before Cache::begin".into()))
}

impl Cache for NoCache {
    fn begin(&mut self, step: &StepInfo) -> Result<Positions> {
        self.mask = Some(causal(step, 0, &[])?);
        Ok(Positions::Shared((0..step.new_tokens as u32).collect()))
    }

    fn attend(
        &mut self,
        _layer: usize,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        kernels: Kernels,
    ) -> Result<Tensor> {
        kernels.attention(q, &k, &v, prepared(&self.mask)?)
    }
}

/// Per-layer K/V of everything decoded so far: `[B, kv_heads, T_past, head_dim]`, detached.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Left padding of each row (empty: no padding, positions shared by all rows).
    pad: Vec<usize>,
    mask: Option<Mask>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            pad: vec![],
            mask: None,
        }
    }

    /// A cache for a batch of left-padded rows: row b starts with `pad[b]` padding positions
    /// (in the ids of the first forward, and so in the cache). Each row gets its own positions
    /// (0 at its first real token) and never attends to its padding, so its logits equal those
    /// of the row run alone.
    pub fn with_padding(num_layers: usize, pad: Vec<usize>) -> Self {
        Self {
            pad,
            ..Self::new(num_layers)
        }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-gathers the batch: new row r is old row `rows[r]` (rows may repeat or be dropped); the
    /// padding follows its rows.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        for slot in self.layers.iter_mut().flatten() {
            let dev = slot.0.device().clone();
            let idx = Tensor::from_vec(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                rows.len(),
                &dev,
            )?;
            *slot = (slot.0.index_select(&idx, 0)?, slot.1.index_select(&idx, 0)?);
        }
        if !self.pad.is_empty() {
            self.pad = rows.iter().map(|&r| self.pad[r]).collect();
        }
        Ok(())
    }

    /// Keeps the first `prefix` positions and then only the positions `keep` (absolute indices,
    /// increasing), dropping the rest: the accepted path of a verified draft tree.
    pub fn keep(&mut self, prefix: usize, keep: &[usize]) -> Result<()> {
        for slot in self.layers.iter_mut().flatten() {
            let dev = slot.0.device().clone();
            let idx: Vec<u32> = (0..prefix)
                .chain(keep.iter().copied())
                .map(|i| i as u32)
                .collect();
            let n = idx.len();
            let idx = Tensor::from_vec(idx, n, &dev)?;
            *slot = (slot.0.index_select(&idx, 2)?, slot.1.index_select(&idx, 2)?);
        }
        Ok(())
    }

    /// Drops everything after the first `len` positions (rollback).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for slot in self.layers.iter_mut() {
            if let Some((k, v)) = slot {
                if len < k.dim(2)? {
                    *slot = Some((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?));
                }
            }
        }
        Ok(())
    }

    /// Sizes the cache for `layers` (a fresh cache may be made with any count).
    fn ensure_layers(&mut self, layers: usize) {
        if self.layers.len() != layers {
            self.layers = vec![None; layers];
        }
    }

    /// Appends the new k, v of one layer; returns all of that layer's K/V.
    fn append(&mut self, layer: usize, mut k: Tensor, mut v: Tensor) -> Result<(Tensor, Tensor)> {
        let slot = &mut self.layers[layer];
        if let Some((pk, pv)) = slot.as_ref() {
            k = Tensor::cat(&[pk, &k], 2)?;
            v = Tensor::cat(&[pv, &v], 2)?;
        }
        *slot = Some((k.detach(), v.detach()));
        Ok((k, v))
    }
}

impl Cache for KvCache {
    fn begin(&mut self, step: &StepInfo) -> Result<Positions> {
        self.ensure_layers(step.layers);
        let (past, t) = (self.len(), step.new_tokens);
        self.mask = Some(causal(step, past, &self.pad)?);
        if self.pad.is_empty() {
            return Ok(Positions::Shared(
                (past as u32..(past + t) as u32).collect(),
            ));
        }
        if self.pad.len() != step.batch {
            return Err(Error::Msg(format!(
                "KV cache: {} pad entries for {} rows",
                self.pad.len(),
                step.batch
            )));
        }
        Ok(Positions::PerRow(
            self.pad
                .iter()
                .flat_map(|&p| (past..past + t).map(move |q| q.saturating_sub(p) as u32))
                .collect(),
        ))
    }

    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        kernels: Kernels,
    ) -> Result<Tensor> {
        let (k, v) = self.append(layer, k, v)?;
        kernels.attention(q, &k, &v, prepared(&self.mask)?)
    }
}

/// Tree verification: `ids: [1, T]` after what `cache` holds, at explicit `positions`, under an
/// explicit additive `mask: [T, past + T]` (each node sees the context, its ancestors and
/// itself); their K/V are appended to `cache`.
pub struct TreeStep<'a> {
    pub cache: &'a mut KvCache,
    pub positions: Vec<u32>,
    pub mask: Tensor,
    prepared: Option<Mask>,
}

impl<'a> TreeStep<'a> {
    pub fn new(cache: &'a mut KvCache, positions: Vec<u32>, mask: Tensor) -> Self {
        Self {
            cache,
            positions,
            mask,
            prepared: None,
        }
    }
}

impl Cache for TreeStep<'_> {
    fn begin(&mut self, step: &StepInfo) -> Result<Positions> {
        self.cache.ensure_layers(step.layers);
        self.prepared = Some(Mask::additive(self.mask.to_dtype(step.dtype)?));
        Ok(Positions::Shared(self.positions.clone()))
    }

    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        kernels: Kernels,
    ) -> Result<Tensor> {
        let (k, v) = self.cache.append(layer, k, v)?;
        kernels.attention(q, &k, &v, prepared(&self.prepared)?)
    }
}
