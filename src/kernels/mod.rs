//! Fused kernels. Each one lives beside a plain reference composed of differentiable candle ops,
//! with a test that compares the two. [`Kernels`] is the one place that decides which of the two
//! runs, per op, from the switch (`[train] kernels`), the device and the dtype: the model, the
//! trainer and the optimizer call `kernels.op(...)` and never pick for themselves.
//!
//! - [`act_quant`]: per-token int8 fake quantization of a layer's input in one pass, identity
//!   backward (training with `act_quant = "per_token"`).
//! - [`attention`]: the reference attention (GQA folding) and the per-forward mask.
//! - [`adamw`]: the AdamW update of one tensor, fused in one pass or composed.
//! - [`cross_entropy`]: next-token cross-entropy fused with the LM head, in chunks of tokens:
//!   never materializes the `[tokens, vocab]` logits (151,936 wide for Qwen3) for the batch.
//! - [`ternary_matmul`]: matmul straight from packed 2-bit ternary blocks (GGUF inference),
//!   beside dequantize-then-dense.
//! - [`gemm_bf16`]: bf16 GEMM with f32 accumulation on AMX or AVX512-BF16 (CPU mixed
//!   precision), beside round-then-f32.
//! - [`amx`]: Intel AMX detection, permission and tile configuration (platform, not a kernel).
//! - [`norm`]: RMSNorm and LayerNorm as CPU CustomOps with a real backward from saved per-row
//!   statistics (the model's RMSNorm uses it).
//! - [`flash_attention`]: tiled attention with the online softmax, forward and backward, GQA
//!   without copying K/V, never an `[T, Tk]` matrix (the model's attention uses it on the CPU).
//! - [`project`]: the ternary projection + STE in one pass per group, identity backward (the
//!   model's ternary layers use it on the CPU).
//! - [`ternary_linear`]: projection + GEMM as one op that re-projects in the backward instead of
//!   keeping every projected weight alive (the model's ternary layers use it for training).
//! - [`rope`]: rotary embedding fused with the head transpose, with its backward.
//! - [`swiglu`]: the MLP's `silu(gate) * up` in one pass, with its backward.
//! - [`spin_pool`]: workers for packed decoding's short parallel regions that stay awake
//!   between them; opt-in (`TERN_POOL=spin`), rayon measured faster (not a kernel: its
//!   reference is a sequential loop over the tasks).
//!
pub mod act_quant;
pub mod adamw;
pub mod amx;
pub mod attention;
pub mod cross_entropy;
pub mod flash_attention;
pub mod gemm_bf16;
pub mod norm;
pub mod project;
pub mod rope;
pub mod spin_pool;
pub mod swiglu;
pub mod ternary_linear;
pub mod ternary_matmul;

/// Test support shared by every kernel's comparison with its reference.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{DType, Tensor};

    /// The largest |a - b| over all elements, in f64 (any float dtype, any shape).
    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }
}

/// Whether a kernel may take its AVX-512F path: the CPU has it and `TERN_ISA` does not name a
/// 256-bit ternary kernel (`avx2`, `avxvnni`). So `TERN_ISA=avx2` runs every kernel (matmuls,
/// activation quantization, attention, SwiGLU, sampling, the bf16 GEMM) as a CPU without
/// AVX-512 runs it (AMD Zen 2/3, Intel client cores), and a benchmark on a larger CPU can stand
/// in for one beside a peer built the same way (`LLAMA_ISA=avx2 scripts/build_llama_cpp.sh`).
#[cfg(target_arch = "x86_64")]
pub fn avx512f() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        let capped = matches!(std::env::var("TERN_ISA").as_deref(), Ok("avx2" | "avxvnni"));
        is_x86_feature_detected!("avx512f") && !capped
    })
}

use crate::error::Result;
use crate::quant::QuantConfig;
use candle_core::{DType, Device, Tensor};

/// An f32 or f64 element that a fused CPU op computes in f64 (norms, SwiGLU's backward).
pub(crate) trait Elem: Copy + Send + Sync + candle_core::WithDType {
    fn f(self) -> f64;
    fn from(v: f64) -> Self;
}
impl Elem for f32 {
    fn f(self) -> f64 {
        self as f64
    }
    fn from(v: f64) -> Self {
        v as f32
    }
}
impl Elem for f64 {
    fn f(self) -> f64 {
        self
    }
    fn from(v: f64) -> Self {
        v
    }
}

/// `data` as `layout` describes it, when that is one contiguous run: how the fused CPU ops read
/// their inputs in place.
pub(crate) fn contiguous_slice<'a, T>(
    data: &'a [T],
    layout: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// Calls `f` with the values of CPU tensors of element type `T`, read in place (a strided tensor
/// is made contiguous first; no other copy). The storage locks are released when this returns,
/// so `f`'s result must own its data. `what` names the caller in errors.
pub(crate) fn with_cpu_slices<T: candle_core::WithDType, R>(
    tensors: &[&candle_core::Tensor],
    what: &str,
    f: impl FnOnce(&[&[T]]) -> R,
) -> candle_core::Result<R> {
    let tensors = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let data = match &**storage {
            candle_core::Storage::Cpu(cpu) => cpu.as_slice::<T>()?,
            _ => candle_core::bail!("{what}: CPU tensors only"),
        };
        slices.push(contiguous_slice(data, layout, what)?);
    }
    Ok(f(&slices))
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

/// dtype of activations and GEMMs in training (`[train] dtype`, `tern bench step --dtype`):
/// `bf16` is mixed precision (f32 latent weights, AdamW state, norms, softmax and loss; bf16
/// GEMMs). On a GPU activations are bf16 tensors; on a CPU with AVX512-BF16 or AMX-BF16 the
/// ternary layers' GEMMs run in bf16 (`gemm_bf16`) while tensors stay f32 (candle's CPU backend
/// has no bf16 GEMM: it widens to f32); other CPUs refuse it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[default]
    F32,
    Bf16,
}

impl ComputeDtype {
    pub fn dtype(self) -> DType {
        match self {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::Bf16 => DType::BF16,
        }
    }

    /// How to train with this dtype on `device`, or why not (bf16 on a CPU with neither
    /// AVX512-BF16 nor AMX-BF16).
    pub fn for_device(self, device: &Device) -> Result<Compute> {
        match self {
            ComputeDtype::Bf16 if device.is_cpu() => {
                if !gemm_bf16::available() {
                    return Err(crate::error::Error::Msg(
                        "dtype = \"bf16\" on the CPU needs AVX512-BF16 (Intel Xeon 3rd generation or later, \
                         AMD Zen 4 or later) or AMX-BF16, which this CPU lacks: use dtype = \"f32\" here, or a \
                         GPU (train.device = \"cuda\" or \"metal\")"
                            .into(),
                    ));
                }
                Ok(Compute {
                    dtype: DType::F32,
                    gemm_bf16: true,
                })
            }
            _ => Ok(Compute {
                dtype: self.dtype(),
                gemm_bf16: false,
            }),
        }
    }
}

/// What a [`ComputeDtype`] means on a device: the activations' dtype, and whether the ternary
/// layers' GEMMs run in bf16 on the CPU ([`QuantConfig::gemm_bf16`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compute {
    pub dtype: DType,
    pub gemm_bf16: bool,
}

impl Compute {
    /// `quant` with this precision's GEMM choice.
    pub fn quant(&self, quant: QuantConfig) -> QuantConfig {
        QuantConfig {
            gemm_bf16: self.gemm_bf16,
            ..quant
        }
    }
}

/// Which implementation runs for norms, RoPE, attention, SwiGLU, the projection, the ternary linear
/// layer, the LM-head loss and the optimizer. Fused kernels exist for the CPU (f32/f64); on
/// other devices and dtypes every op falls back to its reference, here and nowhere else.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// tern's fused CPU kernels (other devices fall back to the references).
    #[default]
    Fused,
    /// The plain references composed of differentiable candle ops.
    Reference,
}

impl Kernels {
    pub fn fused(self) -> bool {
        self == Kernels::Fused
    }

    /// RMSNorm over the last dim. Mixed precision (x in bf16, weight f32): computed in the
    /// weight's dtype and returned in x's, as autocast runs norms.
    pub fn rms_norm(self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        if x.dtype() != w.dtype() {
            let y = self.rms_norm(&x.to_dtype(w.dtype())?, w, eps)?;
            return Ok(y.to_dtype(x.dtype())?);
        }
        match self {
            Kernels::Fused => norm::rms_norm(x, w, eps),
            Kernels::Reference => norm::rms_norm_reference(x, w, eps),
        }
    }

    /// RoPE with the head transpose: `[B, T, H, d]` -> `[B, H, T, d]`.
    pub fn rope(self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        match self {
            Kernels::Fused => rope::rope_transposed(x, cos, sin),
            Kernels::Reference => rope::rope_transposed_reference(x, cos, sin),
        }
    }

    /// The MLP's activation `silu(gate) * up`.
    pub fn swiglu(self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if self.fused() && swiglu::supported(gate, up) {
            swiglu::swiglu(gate, up)
        } else {
            swiglu::swiglu_reference(gate, up)
        }
    }

    /// Whether attention over tensors of this dtype and device runs the flash kernel (then a
    /// causal [`attention::Mask`] needs no additive matrix).
    pub fn flash_attention_applies(self, dtype: DType, device: &Device) -> bool {
        self.fused() && device.is_cpu() && matches!(dtype, DType::F32 | DType::F64)
    }

    /// Attention of q `[B, H, T, hd]` over k/v `[B, KV, Tk, hd]` under `mask`: the flash kernel
    /// for causal masks where it applies, the reference (additive mask) otherwise.
    pub fn attention(
        self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &attention::Mask,
    ) -> Result<Tensor> {
        match &mask.additive {
            None if self.fused() && flash_attention::supported(q) => {
                flash_attention::flash_attention(q, k, v, &mask.flash)
            }
            additive => attention::attention(q, k, v, additive.as_ref(), k.dim(1)?),
        }
    }

    /// The weight a layer computes with under `quant`: the latent itself in full precision (or
    /// at ramp 0), else its STE-projected value.
    pub fn effective_weight(self, w: &Tensor, quant: &QuantConfig) -> Result<Tensor> {
        if !quant.ternary || quant.ramp == 0.0 {
            return Ok(w.clone());
        }
        if self.fused() && project::supported(w) {
            project::project_ste(w, quant)
        } else {
            project::project_ste_reference(w, quant)
        }
    }

    /// `x` rounded to int8 per token with a straight-through gradient (`act_quant =
    /// "per_token"`): one fused pass on the CPU in f32, else the composed reference.
    pub fn fake_quant_per_token(self, x: &Tensor) -> Result<Tensor> {
        if self.fused() && act_quant::supported(x) {
            act_quant::fake_quant_per_token(x)
        } else {
            crate::quant::activations::fake_quant_per_token(x)
        }
    }

    /// `x @ P(w)^T` of a ternary linear layer (`P` = projection + STE, or identity in full
    /// precision). Fused: one op that re-projects in the backward instead of keeping `P(w)`.
    /// Mixed precision (x in bf16, latent f32): the projection runs on the f32 latent and its
    /// result is cast to x's dtype for the GEMM (the gradient flows back through the cast).
    pub fn ternary_linear(self, x: &Tensor, w: &Tensor, quant: &QuantConfig) -> Result<Tensor> {
        if x.dtype() != w.dtype() {
            return linear(x, &self.effective_weight(w, quant)?.to_dtype(x.dtype())?);
        }
        if self.fused() && ternary_linear::supported(x, w, quant) {
            ternary_linear::ternary_linear(x, w, quant)
        } else {
            linear(x, &self.effective_weight(w, quant)?)
        }
    }

    /// Mean next-token cross-entropy of hidden states `h: [N, H]` under the LM head given by its
    /// latent weight `[V, H]` (projected under `quant`), for `targets: [N]`. Fused: chunked over
    /// tokens, the `[N, V]` logits never exist; reference: candle's cross-entropy over them.
    /// Mixed precision (h in bf16): the head GEMMs in bf16, the logits' softmax and the loss in
    /// the latent's dtype (f32), chunked or not alike.
    pub fn lm_head_loss(
        self,
        h: &Tensor,
        head_latent: &Tensor,
        quant: &QuantConfig,
        targets: &Tensor,
    ) -> Result<Tensor> {
        match self {
            Kernels::Fused => {
                let chunk = cross_entropy::default_chunk(head_latent.dim(0)?);
                cross_entropy::lm_head_cross_entropy_ste(h, head_latent, quant, targets, chunk)
            }
            Kernels::Reference => {
                let w = self
                    .effective_weight(head_latent, quant)?
                    .to_dtype(h.dtype())?;
                let logits = linear(h, &w)?.to_dtype(head_latent.dtype())?;
                Ok(candle_nn::loss::cross_entropy(&logits, targets)?)
            }
        }
    }

    /// [`Kernels::lm_head_loss`] with logit distillation from a frozen teacher: `(1 - a) CE +
    /// a T^2 KL(teacher || student)`. Fused: chunked over tokens (neither model's `[N, V]` logits
    /// exist), also returning the mean CE and KL; reference: full logits, composed ops.
    pub fn lm_head_distill_loss(
        self,
        h: &Tensor,
        head_latent: &Tensor,
        quant: &QuantConfig,
        targets: &Tensor,
        teacher: &cross_entropy::Teacher,
    ) -> Result<(Tensor, Option<cross_entropy::LossParts>)> {
        match self {
            Kernels::Fused => {
                let chunk = cross_entropy::default_chunk(head_latent.dim(0)?);
                let (loss, parts) = cross_entropy::lm_head_distill_ste(
                    h,
                    head_latent,
                    quant,
                    targets,
                    chunk,
                    teacher,
                )?;
                Ok((loss, Some(parts)))
            }
            Kernels::Reference => {
                let w = self
                    .effective_weight(head_latent, quant)?
                    .to_dtype(h.dtype())?;
                let h = h.to_dtype(head_latent.dtype())?;
                let w = w.to_dtype(head_latent.dtype())?;
                let loss = cross_entropy::distill_reference_loss(&h, &w, targets, teacher)?;
                Ok((loss, None))
            }
        }
    }

    /// One AdamW update of a parameter: new (w, m, v).
    pub fn adamw(
        self,
        w: &Tensor,
        g: &Tensor,
        m: Option<&Tensor>,
        v: Option<&Tensor>,
        s: adamw::AdamWScalars,
    ) -> Result<adamw::Updated> {
        if self.fused() && adamw::supported(w, g) {
            adamw::adamw_fused(w, g, m, v, s)
        } else {
            adamw::adamw_reference(w, g, m, v, s)
        }
    }
}
