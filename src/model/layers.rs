//! The model's layers: ternary linear and embedding (an f32 latent weight, projected on every
//! forward for training or once by `freeze` for inference, or packed 2-bit blocks from a GGUF
//! file), and RMSNorm. Which kernel computes each is `Kernels`' choice, passed in.

use crate::error::{Error, Result};
use crate::kernels::ternary_matmul::PackedMatrix;
use crate::kernels::Kernels;
use crate::quant::{ActQuant, QuantConfig};
use candle_core::{Device, Tensor, D};
use std::sync::OnceLock;

/// `y = x @ W^T` with a ternary `W: [out, in]` (Qwen3 projections have no bias), or, for the
/// embedding, rows of `W` looked up by token id. For inference
/// from a GGUF file the weight may instead be packed 2-bit blocks (`packed`), multiplied
/// directly; `weight` is then an empty placeholder.
#[derive(Debug, Clone)]
pub struct TernaryLinear {
    pub weight: Tensor,
    pub packed: Option<PackedMatrix>,
}

impl TernaryLinear {
    pub fn new(weight: Tensor) -> Self {
        Self {
            weight,
            packed: None,
        }
    }

    pub fn from_packed(m: PackedMatrix) -> Result<Self> {
        Ok(Self {
            weight: Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu)?,
            packed: Some(m),
        })
    }

    /// A packed weight quantizes `x` as its `act_quant` says, inside the kernel; a dense one
    /// sees `x` as `quant.act_quant` says ([`layer_input`]).
    pub fn forward(&self, x: &Tensor, quant: &QuantConfig, kernels: Kernels) -> Result<Tensor> {
        match &self.packed {
            Some(p) => packed_linear(x, p),
            None => {
                let x = layer_input(x, quant, kernels)?;
                kernels.ternary_linear(&x, &self.weight, quant)
            }
        }
    }

    /// The layer with its weight replaced by the detached effective weight; run it afterwards
    /// with `QuantConfig::full_precision()` (the projection is already applied).
    pub fn freeze(&self, quant: &QuantConfig, kernels: Kernels) -> Result<Self> {
        if self.packed.is_some() {
            return Ok(self.clone());
        }
        Ok(Self {
            weight: kernels.effective_weight(&self.weight, quant)?.detach(),
            packed: None,
        })
    }
}

/// The input a dense ternary layer multiplies: `x` itself, or with `act_quant = "per_token"`
/// `x` rounded to int8 steps per token with a straight-through gradient (what the packed
/// kernels then compute with).
pub fn layer_input(x: &Tensor, quant: &QuantConfig, kernels: Kernels) -> Result<Tensor> {
    match quant.act_quant {
        ActQuant::None => Ok(x.clone()),
        ActQuant::PerToken => kernels.fake_quant_per_token(x),
    }
}

/// `x @ W^T` with packed `W` (CPU, no gradient): `x: [..., in]`.
pub fn packed_linear(x: &Tensor, m: &PackedMatrix) -> Result<Tensor> {
    let mut out = packed_linear_many(x, &[m])?;
    Ok(out.pop().expect("one matrix, one output"))
}

/// `x @ W_m^T` for several packed matrices reading the same `x` (one activation quantization,
/// one parallel region: `ternary_matmul::matmul_many`).
fn packed_linear_many(x: &Tensor, mats: &[&PackedMatrix]) -> Result<Vec<Tensor>> {
    if !x.device().is_cpu() {
        return Err(Error::Msg(
            "packed (GGUF) weights run on the CPU only; use --device cpu".into(),
        ));
    }
    let dims = x.dims().to_vec();
    let n: usize = dims[..dims.len() - 1].iter().product();
    let flat = x
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let ys = crate::kernels::ternary_matmul::matmul_many(mats, &flat, n);
    ys.into_iter()
        .zip(mats)
        .map(|(y, m)| {
            let mut out_dims = dims.clone();
            *out_dims.last_mut().expect("rank >= 1") = m.rows;
            Ok(Tensor::from_vec(y, out_dims, &Device::Cpu)?)
        })
        .collect()
}

/// `x @ W^T` of several layers that read the same `x` (q/k/v, gate/up): packed ones share one
/// quantization of `x` and one parallel region; dense ones run one by one.
pub fn forward_many<const N: usize>(
    layers: [&TernaryLinear; N],
    x: &Tensor,
    quant: &QuantConfig,
    kernels: Kernels,
) -> Result<[Tensor; N]> {
    let packed: Vec<&PackedMatrix> = layers.iter().filter_map(|l| l.packed.as_ref()).collect();
    let out: Vec<Tensor> = if packed.len() == N {
        packed_linear_many(x, &packed)?
    } else {
        // One input quantization for all of them.
        let (x, quant) = (
            layer_input(x, quant, kernels)?,
            QuantConfig {
                act_quant: ActQuant::None,
                ..*quant
            },
        );
        layers
            .iter()
            .map(|l| l.forward(&x, &quant, kernels))
            .collect::<Result<_>>()?
    };
    out.try_into()
        .map_err(|_| Error::Msg("forward_many: one output per layer".into()))
}

/// The token embedding `[vocab, hidden]` is the same kind of matrix: its rows are looked up
/// ([`TernaryLinear::lookup`]), and as the tied LM head it multiplies like any other layer.
pub type TernaryEmbedding = TernaryLinear;

impl TernaryLinear {
    /// Rows for `ids: [B, T]`: `[B, T, hidden]`. Dense rows are looked up first and projected
    /// after (groups lie along rows, so this equals looking up the projected matrix) and no
    /// projected `[V, H]` copy is made.
    pub fn lookup(&self, ids: &Tensor, quant: &QuantConfig, kernels: Kernels) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let Some(m) = &self.packed else {
            let rows = self.weight.index_select(&ids.flatten_all()?, 0)?;
            let h = self.weight.dim(D::Minus1)?;
            return Ok(kernels.effective_weight(&rows, quant)?.reshape((b, t, h))?);
        };
        let ids = ids.flatten_all()?.to_vec1::<u32>()?;
        let mut v = Vec::with_capacity(ids.len() * m.cols);
        for id in ids {
            if id as usize >= m.rows {
                return Err(Error::Msg(format!(
                    "token id {id} is outside the vocabulary ({})",
                    m.rows
                )));
            }
            v.extend(m.row(id as usize));
        }
        Ok(Tensor::from_vec(v, (b, t, m.cols), &Device::Cpu)?)
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
    /// The weight's values on the host, read once, for the host forward (`model::host`), which
    /// runs inference models only: their weights never change.
    host: OnceLock<Vec<f32>>,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            eps,
            host: OnceLock::new(),
        }
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// The weight as host f32 values (read on the first call, kept after).
    pub fn host_weight(&self) -> Result<&[f32]> {
        if let Some(w) = self.host.get() {
            return Ok(w);
        }
        let w = self.weight.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        Ok(self.host.get_or_init(|| w))
    }

    pub fn forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        kernels.rms_norm(x, &self.weight, self.eps)
    }

    pub fn detached(&self) -> Self {
        Self::new(self.weight.detach(), self.eps)
    }
}
