//! Fused kernels. Each one lives beside a plain reference composed of differentiable candle ops,
//! with a test that compares the two.
//!
//! - [`cross_entropy`]: next-token cross-entropy fused with the LM head, in chunks of tokens:
//!   never materializes the `[tokens, vocab]` logits (151,936 wide for Qwen3) for the batch.
//! - [`ternary_matmul`]: matmul straight from packed 2-bit ternary blocks (GGUF inference),
//!   beside dequantize-then-dense.
//! - [`norm`]: RMSNorm and LayerNorm as CPU CustomOps with a real backward from saved per-row
//!   statistics (the model's RMSNorm uses it).
//! - [`flash_attention`]: tiled attention with the online softmax, forward and backward, GQA
//!   without copying K/V, never an `[T, Tk]` matrix (the model's attention uses it on the CPU).
//! - [`project`]: the ternary projection + STE in one pass per group, identity backward (the
//!   model's ternary layers use it on the CPU).
//! - [`ternary_linear`]: projection + GEMM as one op that re-projects in the backward instead of
//!   keeping every projected weight alive (the model's ternary layers use it for training).
//! - [`rope`]: rotary embedding fused with the head transpose, with its backward.
//!
//! [`Kernels`] picks fused or plain for a whole model (`[train] kernels` in the config): the
//! plain path is what `tern bench` compares against.

pub mod bench;
pub mod cross_entropy;
pub mod flash_attention;
pub mod norm;
pub mod project;
pub mod rope;
pub mod ternary_linear;
pub mod ternary_matmul;

/// `data` as `layout` describes it, when that is one contiguous run: how the fused CPU ops read
/// their inputs in place.
pub(crate) fn contiguous_slice<'a, T>(data: &'a [T], layout: &candle_core::Layout, what: &str) -> candle_core::Result<&'a [T]> {
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
    let tensors = tensors.iter().map(|t| t.contiguous()).collect::<candle_core::Result<Vec<_>>>()?;
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

/// Which implementation the model uses for norms, RoPE, attention, the projection and the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
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
}

impl std::str::FromStr for Kernels {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::error::Result<Self> {
        match s {
            "fused" => Ok(Kernels::Fused),
            "reference" => Ok(Kernels::Reference),
            o => Err(crate::Error::Msg(format!("kernels: expected 'fused' or 'reference', found '{o}'"))),
        }
    }
}
