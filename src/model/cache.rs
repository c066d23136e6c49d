//! What one forward attends over, passed into [`super::Qwen3::forward`] the way mlx-lm passes a
//! cache object into its one `__call__`. Each implementation supplies the positions of the new
//! tokens and each layer's attention:
//!
//! - [`NoCache`]: training and scoring: positions `0..T`, causal, nothing kept.
//! - [`KvCache`]: incremental decoding with one `[B, KV, capacity, hd]` K/V buffer per layer,
//!   written in place; optionally left-padded rows (each row its own positions, padding never
//!   seen).
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

/// Per-layer K/V of everything decoded so far, detached: each layer's keys and values sit in
/// buffers `[B, kv_heads, capacity, head_dim]` of which the first `len` positions are valid.
/// New positions are written in place; a full buffer grows by half (amortized O(1) copies per
/// token; the earlier `Tensor::cat` per token copied the whole cache, O(T) per token). Attention
/// reads the buffers in place (`flash_attention` takes K/V heads at the buffer's stride).
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<KvSlot>>,
    /// Left padding of each row (empty: no padding, positions shared by all rows).
    pad: Vec<usize>,
    mask: Option<Mask>,
}

/// One layer's K/V buffers and how many positions of them are valid.
#[derive(Debug)]
struct KvSlot {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// Capacity granularity: positions per allocation step (and the first buffer's minimum).
const KV_CHUNK: usize = 256;

impl KvSlot {
    fn valid(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k.narrow(2, 0, self.len)?,
            self.v.narrow(2, 0, self.len)?,
        ))
    }

    /// A slot that holds exactly `k`, `v` (`[B, KV, T, hd]`), copied into its own buffers.
    fn owning(k: &Tensor, v: &Tensor) -> Result<Self> {
        Ok(Self {
            len: k.dim(2)?,
            k: k.copy()?.detach(),
            v: v.copy()?.detach(),
        })
    }
}

impl KvCache {
    /// A deep copy of the valid positions: the copy's buffers are its own, so appending to
    /// either never writes into the other (speculative decoding branches a draft cache). Not
    /// `Clone`: copying a device tensor can fail.
    pub fn try_clone(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|slot| {
                slot.as_ref()
                    .map(|s| {
                        let (k, v) = s.valid()?;
                        KvSlot::owning(&k, &v)
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            pad: self.pad.clone(),
            mask: self.mask.clone(),
        })
    }
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
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
            Some(Some(s)) => s.len,
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
            let dev = slot.k.device().clone();
            let idx = Tensor::from_vec(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                rows.len(),
                &dev,
            )?;
            slot.k = slot.k.index_select(&idx, 0)?;
            slot.v = slot.v.index_select(&idx, 0)?;
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
            let dev = slot.k.device().clone();
            let idx: Vec<u32> = (0..prefix)
                .chain(keep.iter().copied())
                .map(|i| i as u32)
                .collect();
            let n = idx.len();
            let idx = Tensor::from_vec(idx, n, &dev)?;
            // From the whole buffer (contiguous, as index_select needs): every index < len.
            *slot = KvSlot {
                k: slot.k.index_select(&idx, 2)?,
                v: slot.v.index_select(&idx, 2)?,
                len: n,
            };
        }
        Ok(())
    }

    /// Drops everything after the first `len` positions (rollback).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for slot in self.layers.iter_mut().flatten() {
            slot.len = slot.len.min(len);
        }
        Ok(())
    }

    /// Sizes the cache for `layers` (a fresh cache may be made with any count).
    fn ensure_layers(&mut self, layers: usize) {
        if self.layers.len() != layers {
            self.layers = (0..layers).map(|_| None).collect();
        }
    }

    /// Appends the new k, v `[B, KV, T, hd]` of one layer in place; returns views of all of
    /// that layer's K/V (`[B, KV, len, hd]`, strided over the buffer).
    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = (k.detach().contiguous()?, v.detach().contiguous()?);
        let (b, kv, t, hd) = k.dims4()?;
        let slot = &mut self.layers[layer];
        let len = slot.as_ref().map_or(0, |s| s.len);
        let cap = slot.as_ref().map_or(0, |s| s.k.dim(2).unwrap_or(0));
        let mismatch = slot
            .as_ref()
            .is_some_and(|s| s.k.dims() != [b, kv, cap, hd] || s.k.dtype() != k.dtype());
        if mismatch {
            return Err(Error::Msg(format!(
                "KV cache: new k {:?} does not fit the cached {:?}",
                k.dims(),
                slot.as_ref().map(|s| s.k.dims().to_vec())
            )));
        }
        if len + t > cap {
            let new_cap = (len + t).max(cap + cap / 2).next_multiple_of(KV_CHUNK);
            let grow = |old: Option<Tensor>| -> Result<Tensor> {
                let buf = Tensor::zeros((b, kv, new_cap, hd), k.dtype(), k.device())?;
                if let Some(old) = old {
                    buf.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            let old = slot.take();
            *slot = Some(KvSlot {
                k: grow(old.as_ref().map(|s| s.k.clone()))?,
                v: grow(old.map(|s| s.v))?,
                len,
            });
        }
        let s = slot.as_mut().expect("allocated above");
        s.k.slice_set(&k, 2, len)?;
        s.v.slice_set(&v, 2, len)?;
        s.len = len + t;
        s.valid()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(b: usize, t: usize, seed: u32) -> Tensor {
        let n = b * 2 * t * 4;
        let v: Vec<f32> = (0..n as u32)
            .map(|i| (i * 7 + seed * 1000) as f32)
            .collect();
        Tensor::from_vec(v, (b, 2, t, 4), &Device::Cpu).unwrap()
    }

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Appends in pieces that cross the buffer's growth steps equal one concatenation, and the
    /// views attention reads hold exactly the valid positions.
    #[test]
    fn in_place_appends_across_growth_equal_concatenation() {
        let mut c = KvCache::new(1);
        let pieces: Vec<Tensor> = [100, 200, 1, 300, 7]
            .iter()
            .enumerate()
            .map(|(i, &t)| kv(2, t, i as u32))
            .collect();
        for (i, p) in pieces.iter().enumerate() {
            let (k, v) = c.append(0, p.clone(), (p * 2.0).unwrap()).unwrap();
            let want = Tensor::cat(&pieces[..=i].iter().collect::<Vec<_>>(), 2).unwrap();
            assert_eq!(vals(&k), vals(&want), "k after piece {i}");
            assert_eq!(vals(&v), vals(&(want * 2.0).unwrap()), "v after piece {i}");
            assert_eq!(c.len(), k.dim(2).unwrap());
        }
        assert_eq!(c.len(), 608);
    }

    /// A clone owns its buffers: appending to (or truncating and rewriting) one never changes
    /// the other.
    #[test]
    fn clones_and_truncation_never_share_writes() {
        let mut a = KvCache::new(1);
        a.append(0, kv(1, 5, 1), kv(1, 5, 1)).unwrap();
        let mut b = a.try_clone().unwrap();
        b.append(0, kv(1, 3, 2), kv(1, 3, 2)).unwrap();
        a.truncate(2).unwrap();
        a.append(0, kv(1, 3, 3), kv(1, 3, 3)).unwrap();
        let (bk, _) = b.layers[0].as_ref().unwrap().valid().unwrap();
        let want_b = Tensor::cat(&[&kv(1, 5, 1), &kv(1, 3, 2)], 2).unwrap();
        assert_eq!(vals(&bk), vals(&want_b));
        let (ak, _) = a.layers[0].as_ref().unwrap().valid().unwrap();
        let want_a =
            Tensor::cat(&[&kv(1, 5, 1).narrow(2, 0, 2).unwrap(), &kv(1, 3, 3)], 2).unwrap();
        assert_eq!(vals(&ak), vals(&want_a));
    }
}
