//! Ternary layers: an f32 latent weight, projected on every forward (training) or once
//! (`freeze`, for inference). With `quant.ternary = false` the same latent runs in full precision.

use super::projection::{effective_weight, QuantConfig};
use crate::error::Result;
use candle_core::{Tensor, D};

/// `y = x @ W^T` with a ternary `W: [out, in]` (Qwen3 projections have no bias).
#[derive(Debug, Clone)]
pub struct TernaryLinear {
    pub weight: Tensor,
}

impl TernaryLinear {
    pub fn new(weight: Tensor) -> Self {
        Self { weight }
    }

    pub fn forward(&self, x: &Tensor, quant: &QuantConfig) -> Result<Tensor> {
        let w = effective_weight(&self.weight, quant)?;
        linear(x, &w)
    }

    /// The layer with its weight replaced by the detached effective weight; run it afterwards
    /// with `QuantConfig::full_precision()` (the projection is already applied).
    pub fn freeze(&self, quant: &QuantConfig) -> Result<Self> {
        Ok(Self { weight: effective_weight(&self.weight, quant)?.detach() })
    }
}

/// `x @ w^T` for `x: [..., in]`, `w: [out, in]`, flattening leading dims into one GEMM.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_dim = *dims.last().expect("rank >= 1");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, in_dim))?.matmul(&w.t()?)?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = w.dim(0)?;
    Ok(y.reshape(out_dims)?)
}

/// Token embedding `[vocab, hidden]` whose rows are ternary; doubles as the tied LM head.
#[derive(Debug, Clone)]
pub struct TernaryEmbedding {
    pub weight: Tensor,
}

impl TernaryEmbedding {
    pub fn new(weight: Tensor) -> Self {
        Self { weight }
    }

    pub fn effective_weight(&self, quant: &QuantConfig) -> Result<Tensor> {
        effective_weight(&self.weight, quant)
    }

    /// Looks up `ids: [B, T]` (u32) in an already-computed effective weight.
    pub fn lookup(w: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = w.dim(D::Minus1)?;
        Ok(w.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, h))?)
    }

    pub fn freeze(&self, quant: &QuantConfig) -> Result<Self> {
        Ok(Self { weight: self.effective_weight(quant)?.detach() })
    }
}
