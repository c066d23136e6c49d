//! Per-token int8 fake quantization of a layer's input (`act_quant = "per_token"`) as one op:
//! one pass per row finds its absmax and writes the row rounded to its int8 steps; the backward
//! is the identity (straight-through).
//!
//! The reference (`quant::activations::fake_quant_per_token`) composes abs, max, scale, clamp,
//! divide, round, clamp, multiply, subtract and add: ten candle ops and their temporaries per
//! layer input. This op repeats its float operations in the same order (the step as candle's
//! affine computes `max / 127`, the division by the clamped step, rounding half away from zero,
//! and the final `x + (q - x)`), so the two agree bit for bit (a test checks).

use crate::error::Result;
use crate::quant::activations::{QMAX, STEP_FLOOR};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

struct FakeQuantPerToken;

/// `x + (q - x)` of one row, `q` its values rounded to steps of `max|x| / 127`.
fn quantize_row(x: &[f32], out: &mut [f32]) {
    let qmax = QMAX as f32;
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    // candle's `t / 127.0` is an affine op: a multiply by the f32 of 1 / 127, plus 0.
    let step = amax * (1.0 / QMAX) as f32 + 0.0;
    let floor = step.max(STEP_FLOOR as f32);
    for (o, &v) in out.iter_mut().zip(x) {
        let q = (v / floor).round().clamp(-qmax, qmax) * step;
        *o = v + (q - v);
    }
}

impl CustomOp1 for FakeQuantPerToken {
    fn name(&self) -> &'static str {
        "tern-fake-quant-per-token"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (Some((a, b)), CpuStorage::F32(v)) = (l.contiguous_offsets(), s) else {
            candle_core::bail!("fake quantization: a contiguous f32 tensor only");
        };
        let cols = *l.dims().last().unwrap_or(&1);
        let x = &v[a..b];
        let mut out = vec![0f32; x.len()];
        if cols > 0 {
            out.par_chunks_mut(cols)
                .zip(x.par_chunks(cols))
                .for_each(|(o, x)| quantize_row(x, o));
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// Straight-through: dL/dx = dL/d(quantized x).
    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}

/// Whether the fused op takes `x` (an f32 tensor on the CPU).
pub fn supported(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() >= 1
}

/// The fused per-token fake quantization of `x` (see [`supported`]).
pub fn fake_quant_per_token(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(FakeQuantPerToken)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::activations::fake_quant_per_token as reference;
    use candle_core::{Device, Var};

    fn input() -> Tensor {
        // Rows of mixed magnitudes, one of zeros, values that land on rounding ties.
        let mut v: Vec<f32> = (0..7 * 37)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i / 37) as f32))
            .collect();
        v[2 * 37..3 * 37].fill(0.0);
        v[5 * 37] = 127.0;
        v[5 * 37 + 1] = 2.5;
        v[5 * 37 + 2] = -0.5;
        Tensor::from_vec(v, (7, 37), &Device::Cpu).unwrap()
    }

    #[test]
    fn the_fused_op_equals_the_reference_bit_for_bit() {
        let x = input();
        let a = fake_quant_per_token(&x).unwrap().to_vec2::<f32>().unwrap();
        let b = reference(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(a, b);
        // And a 3-D, non-contiguous input (a transposed view).
        let x3 = input()
            .reshape((7, 37, 1))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let a = fake_quant_per_token(&x3).unwrap().to_vec3::<f32>().unwrap();
        let b = reference(&x3).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn the_fused_gradient_passes_straight_through_as_the_reference() {
        let x = Var::from_tensor(&input()).unwrap();
        let w = input().affine(0.5, 0.25).unwrap();
        let grad = |f: fn(&Tensor) -> crate::error::Result<Tensor>| {
            let y = (f(x.as_tensor()).unwrap() * &w).unwrap().sum_all().unwrap();
            let g = y.backward().unwrap();
            g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap()
        };
        assert_eq!(grad(fake_quant_per_token), grad(reference));
        assert_eq!(grad(fake_quant_per_token), w.to_vec2::<f32>().unwrap());
    }
}
