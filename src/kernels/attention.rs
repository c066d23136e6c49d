//! Attention's plain reference and the mask a forward builds once for all its layers.
//!
//! The reference is scaled-dot-product attention composed of differentiable candle ops, with
//! GQA folding: the `g = heads / kv_heads` query heads that share a KV head are folded into the
//! row dimension (`[B, kv, g*T, hd]`), so one batched GEMM per KV head does it without copying
//! K/V. The fused kernel is [`super::flash_attention`]; `Kernels::attention` picks one.

use super::flash_attention::{additive_mask, FlashConfig};
use crate::error::Result;
use candle_core::{DType, Device, Tensor, D};

/// Plain (reference) scaled-dot-product attention with GQA folding.
/// q: `[B, H, T, hd]`, k/v: `[B, KV, Tk, hd]`, mask broadcastable to `[B, KV, H/KV, T, Tk]`.
/// Returns `[B, H, T, hd]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    kv_heads: usize,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let tk = k.dim(2)?;
    let g = nh / kv_heads;
    let q = q.reshape((b, kv_heads, g * t, hd))?;
    let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
    let scores = match mask {
        Some(m) => scores
            .reshape((b, kv_heads, g, t, tk))?
            .broadcast_add(m)?
            .reshape((b, kv_heads, g * t, tk))?,
        None => scores,
    };
    // Half-precision scores are normalized in f32 (as autocast does): exp and the row sum lose
    // too much in bf16's 8-bit mantissa.
    let p = match scores.dtype() {
        DType::BF16 | DType::F16 => {
            candle_nn::ops::softmax(&scores.to_dtype(DType::F32)?, D::Minus1)?
                .to_dtype(q.dtype())?
        }
        _ => candle_nn::ops::softmax(&scores, D::Minus1)?,
    };
    Ok(p.matmul(v)?.reshape((b, nh, t, hd))?)
}

/// Which keys each query sees in one forward, built once for all layers: the flash kernel's
/// description (causal, left padding) and, when the reference runs, the additive mask.
#[derive(Debug, Clone)]
pub struct Mask {
    pub(crate) flash: FlashConfig,
    /// Additive mask broadcastable to `[B, KV, H/KV, T, Tk]`; `None` with the flash kernel.
    pub(crate) additive: Option<Tensor>,
}

impl Mask {
    /// An explicit additive mask (0 or -inf) `[T, past + T]`, e.g. a tree mask; always runs the
    /// reference attention.
    pub fn additive(mask: Tensor) -> Self {
        Self {
            flash: FlashConfig::default(),
            additive: Some(mask),
        }
    }

    /// Causal attention of `t` queries after `past` cached positions; rows of `pad` (left
    /// padding per row, empty = none) never see their padding. `use_flash`: the fused kernel
    /// will run (then no additive mask is built).
    pub fn causal(
        t: usize,
        past: usize,
        pad: &[usize],
        use_flash: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let flash = FlashConfig {
            causal: true,
            kv_start: pad.to_vec(),
            ..FlashConfig::default()
        };
        let additive = if use_flash {
            None
        } else if !pad.is_empty() {
            Some(padded_mask(t, past, pad, dtype, device)?)
        } else if t > 1 {
            Some(additive_mask(1, t, past + t, &flash, dtype, device)?)
        } else {
            None
        };
        Ok(Self { flash, additive })
    }
}

/// The reference path's mask for left-padded rows `[B, 1, 1, T, Tk]`. A padding query sees only
/// itself (its output is never used; this avoids a row of all -inf, whose softmax is NaN). A
/// real query sees its row's real tokens up to itself.
fn padded_mask(
    t: usize,
    past: usize,
    pad: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let tk = past + t;
    let mut mask = Vec::with_capacity(pad.len() * t * tk);
    for &p in pad {
        for i in 0..t {
            let q = past + i;
            mask.extend((0..tk).map(|j| {
                let visible = if q < p { j == q } else { j >= p && j <= q };
                if visible {
                    0f32
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
    }
    Ok(Tensor::from_vec(mask, (pad.len(), 1, 1, t, tk), device)?.to_dtype(dtype)?)
}
