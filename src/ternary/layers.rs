//! Ternary layers: an f32 latent weight, projected on every forward (training) or once
//! (`freeze`, for inference). With `quant.ternary = false` the same latent runs in full precision.

use super::projection::{effective_weight, QuantConfig};
use crate::error::{Error, Result};
use crate::kernels::ternary_matmul::PackedMatrix;
use candle_core::{Device, Tensor, D};

/// `y = x @ W^T` with a ternary `W: [out, in]` (Qwen3 projections have no bias). For inference
/// from a GGUF file the weight may instead be packed 2-bit blocks (`packed`), multiplied
/// directly; `weight` is then an empty placeholder.
#[derive(Debug, Clone)]
pub struct TernaryLinear {
    pub weight: Tensor,
    pub packed: Option<PackedMatrix>,
}

impl TernaryLinear {
    pub fn new(weight: Tensor) -> Self {
        Self { weight, packed: None }
    }

    pub fn from_packed(m: PackedMatrix) -> Result<Self> {
        Ok(Self { weight: Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu)?, packed: Some(m) })
    }

    pub fn forward(&self, x: &Tensor, quant: &QuantConfig) -> Result<Tensor> {
        if let Some(p) = &self.packed {
            return packed_linear(x, p);
        }
        // Projection and GEMM in one op (re-projects in the backward), or the composed form.
        crate::kernels::ternary_linear::ternary_linear(x, &self.weight, quant)
    }

    /// The layer with its weight replaced by the detached effective weight; run it afterwards
    /// with `QuantConfig::full_precision()` (the projection is already applied).
    pub fn freeze(&self, quant: &QuantConfig) -> Result<Self> {
        if self.packed.is_some() {
            return Ok(self.clone());
        }
        Ok(Self { weight: effective_weight(&self.weight, quant)?.detach(), packed: None })
    }
}

/// `x @ W^T` with packed `W` (CPU, no gradient): `x: [..., in]`.
pub fn packed_linear(x: &Tensor, m: &PackedMatrix) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return Err(Error::Msg("packed (GGUF) weights run on the CPU only; use --device cpu".into()));
    }
    let dims = x.dims().to_vec();
    let in_dim = *dims.last().expect("rank >= 1");
    let n: usize = dims[..dims.len() - 1].iter().product();
    let flat = x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let y = m.matmul(&flat, n);
    debug_assert_eq!(in_dim, m.cols);
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = m.rows;
    Ok(Tensor::from_vec(y, out_dims, &Device::Cpu)?)
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
/// May be packed (GGUF inference), like [`TernaryLinear`].
#[derive(Debug, Clone)]
pub struct TernaryEmbedding {
    pub weight: Tensor,
    pub packed: Option<PackedMatrix>,
}

impl TernaryEmbedding {
    pub fn new(weight: Tensor) -> Self {
        Self { weight, packed: None }
    }

    pub fn from_packed(m: PackedMatrix) -> Result<Self> {
        Ok(Self { weight: Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu)?, packed: Some(m) })
    }

    /// Rows for `ids: [B, T]` from packed blocks: `[B, T, hidden]`.
    pub fn lookup_packed(m: &PackedMatrix, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let ids = ids.flatten_all()?.to_vec1::<u32>()?;
        let mut v = Vec::with_capacity(ids.len() * m.cols);
        for id in ids {
            if id as usize >= m.rows {
                return Err(Error::Msg(format!("token id {id} is outside the vocabulary ({})", m.rows)));
            }
            v.extend(m.row(id as usize));
        }
        Ok(Tensor::from_vec(v, (b, t, m.cols), &Device::Cpu)?)
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
        if self.packed.is_some() {
            return Ok(self.clone());
        }
        Ok(Self { weight: self.effective_weight(quant)?.detach(), packed: None })
    }
}
