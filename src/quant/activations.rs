//! How the input of every ternary linear layer is quantized: the choice a model is trained
//! with, recorded in its checkpoint and GGUF (`tern.act_quant`), and read by the packed
//! kernels.
//!
//! - `none` (the default): training sees f32 inputs; packed inference quantizes them to int8
//!   per 32 values (llama.cpp's Q8_0 groups), close enough to f32 that a model trained without
//!   it loses little (NOTES.md: KL 3.5e-5 on the tiny default, 0.0036 on SmolLM2).
//! - `per_token`: one int8 absmax step per token (per row of the input), as BitNet b1.58
//!   trains and bitnet.cpp / ik_llama.cpp run. Training applies it with a straight-through
//!   estimator ([`fake_quant_per_token`]), so the model learns around it; packed inference
//!   then runs kernels with no float work per block (`kernels::ternary_matmul`). On a model
//!   trained without it the error is large (SmolLM2: KL 0.043, NOTES.md), hence not a free
//!   switch.

use crate::error::Result;
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

/// The input quantization of ternary layers (module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ActQuant {
    /// f32 in training; int8 per 32 values in packed inference.
    #[default]
    None,
    /// int8 with one absmax step per token, in training (STE) and in packed inference.
    PerToken,
}

impl ActQuant {
    /// The names configs, GGUF metadata, `tern --act-quant` and `TERN_ACT_QUANT` use.
    pub const NAMES: [&'static str; 2] = ["none", "per_token"];

    /// Its name in configs (as serde writes it), GGUF metadata and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            ActQuant::None => "none",
            ActQuant::PerToken => "per_token",
        }
    }

    /// The scheme [`ActQuant::name`] calls `name`.
    pub fn from_name(name: &str) -> Option<ActQuant> {
        [ActQuant::None, ActQuant::PerToken]
            .into_iter()
            .find(|a| a.name() == name)
    }

    /// What `TERN_ACT_QUANT` names (`tern --act-quant` sets it): an override of the mode a
    /// packed GGUF records, or `None` where unset or unknown (the binary refuses an unknown
    /// value before anything loads).
    pub fn override_from_env() -> Option<ActQuant> {
        std::env::var("TERN_ACT_QUANT")
            .ok()
            .and_then(|v| ActQuant::from_name(&v))
    }
}

/// Largest int8 code of an activation (symmetric: -127..=127).
pub(crate) const QMAX: f64 = 127.0;

/// The smallest step a row is divided by: an all-zero row gives 0 / tiny = 0, never 0 / 0.
pub(crate) const STEP_FLOOR: f64 = 1e-30;

/// `x` with each row (last dimension) rounded to int8 steps of `max|row| / 127`, half away from
/// zero as the packed kernels' quantizer rounds, with a straight-through gradient: the forward
/// is `x + (q - x).detach()`, so `dL/dx = dL/dq`. A row of zeros stays zeros.
/// The rounding runs in f32 whatever `x`'s dtype (bf16 cannot hold every step of 127 exactly
/// after the division).
pub fn fake_quant_per_token(x: &Tensor) -> Result<Tensor> {
    let xf = x.detach().to_dtype(DType::F32)?;
    let step = (xf.abs()?.max_keepdim(D::Minus1)? / QMAX)?;
    let q = xf
        .broadcast_div(&step.clamp(STEP_FLOOR, f64::INFINITY)?)?
        .round()?
        .clamp(-QMAX, QMAX)?
        .broadcast_mul(&step)?
        .to_dtype(x.dtype())?;
    Ok((x + (q - x)?.detach())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn every_row_lands_on_its_own_int8_grid() -> Result<()> {
        let x = Tensor::new(
            &[[0.5f32, -1.27, 0.004, 0.0], [0.0, 0.0, 0.0, 0.0]],
            &Device::Cpu,
        )?;
        let q = fake_quant_per_token(&x)?.to_vec2::<f32>()?;
        // Row 0: step 0.01, so 0.004 rounds to 0 and the max stays itself.
        let want = [0.5f32, -1.27, 0.0, 0.0];
        for (a, b) in q[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{:?}", q[0]);
        }
        assert_eq!(q[1], vec![0.0; 4], "a zero row stays zero");
        // Every value is an integer multiple of its row's step.
        for v in &q[0] {
            let k = v / 0.01;
            assert!((k - k.round()).abs() < 1e-3, "{v}");
        }
        Ok(())
    }

    #[test]
    fn the_gradient_passes_straight_through() -> Result<()> {
        let x = Var::from_tensor(&Tensor::new(&[[0.3f32, -0.7, 0.11]], &Device::Cpu)?)?;
        let w = Tensor::new(&[[2f32, 3.0, -5.0]], &Device::Cpu)?;
        let y = (fake_quant_per_token(x.as_tensor())? * &w)?.sum_all()?;
        let g = y.backward()?;
        let gx = g.get(x.as_tensor()).expect("x has a gradient");
        assert_eq!(gx.to_vec2::<f32>()?, vec![vec![2.0, 3.0, -5.0]]);
        Ok(())
    }

    #[test]
    fn names_round_trip() {
        for n in ActQuant::NAMES {
            let a = ActQuant::from_name(n).expect("every listed name parses");
            assert_eq!(a.name(), n);
            // Configs and checkpoints (serde) spell it the same way.
            assert_eq!(serde_json::to_value(a).unwrap(), serde_json::json!(n));
        }
        assert_eq!(ActQuant::from_name("row"), None);
    }
}
