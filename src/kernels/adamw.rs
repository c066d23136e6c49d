//! The AdamW update of one parameter tensor: the plain one composed of candle tensor ops (about
//! a dozen full-size temporaries), and a fused one on the CPU that reads w, g, m, v once and
//! writes the new w, m, v in one parallel pass. `Kernels::adamw` picks one; a test in
//! `train::optim` compares them over several steps.

use super::with_cpu_slices;
use crate::error::Result;
use candle_core::{DType, Tensor};

/// Scalars of one update (f64, as the composed update uses them; the fused one rounds to f32).
#[derive(Debug, Clone, Copy)]
pub struct AdamWScalars {
    pub beta1: f64,
    pub beta2: f64,
    /// Bias corrections 1 - beta^t.
    pub bc1: f64,
    pub bc2: f64,
    pub eps: f64,
    pub lr: f64,
    /// Decoupled weight decay factor `1 - lr * wd`, when this parameter decays.
    pub decay: Option<f64>,
}

/// New `(w, m, v)`; `m`/`v` are absent on a parameter's first update.
pub type Updated = (Tensor, Tensor, Tensor);

/// Whether [`adamw_fused`] applies: f32 weight and gradient of one shape, on the CPU.
pub fn supported(w: &Tensor, g: &Tensor) -> bool {
    w.device().is_cpu()
        && w.dtype() == DType::F32
        && g.dtype() == DType::F32
        && w.dims() == g.dims()
}

/// The fused update in one pass over the four tensors.
pub fn adamw_fused(
    w: &Tensor,
    g: &Tensor,
    m: Option<&Tensor>,
    v: Option<&Tensor>,
    s: AdamWScalars,
) -> Result<Updated> {
    let mut inputs = vec![w, g];
    if let (Some(m), Some(v)) = (m, v) {
        inputs.extend([m, v]);
    }
    let (w2, m2, v2) = with_cpu_slices(&inputs, "fused AdamW", |x| {
        fused_update(x[0], x[1], x.get(2).copied(), x.get(3).copied(), s)
    })?;
    let (shape, dev) = (w.shape(), w.device());
    Ok((
        Tensor::from_vec(w2, shape, dev)?,
        Tensor::from_vec(m2, shape, dev)?,
        Tensor::from_vec(v2, shape, dev)?,
    ))
}

fn fused_update(
    w: &[f32],
    g: &[f32],
    m: Option<&[f32]>,
    v: Option<&[f32]>,
    s: AdamWScalars,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let (b1, b2, bc1, bc2) = (s.beta1 as f32, s.beta2 as f32, s.bc1 as f32, s.bc2 as f32);
    let (eps, lr, decay) = (s.eps as f32, s.lr as f32, s.decay.unwrap_or(1.0) as f32);
    let n = w.len();
    let (mut w2, mut m2, mut v2) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    const CH: usize = 1 << 14;
    w2.par_chunks_mut(CH)
        .zip(m2.par_chunks_mut(CH))
        .zip(v2.par_chunks_mut(CH))
        .enumerate()
        .for_each(|(c, ((wo, mo), vo))| {
            let base = c * CH;
            for i in 0..wo.len() {
                let j = base + i;
                let gi = g[j];
                let mi = m.map_or(0.0, |m| m[j] * b1) + gi * (1.0 - b1);
                let vi = v.map_or(0.0, |v| v[j] * b2) + gi * gi * (1.0 - b2);
                let update = (mi / bc1) / ((vi / bc2).sqrt() + eps);
                wo[i] = w[j] * decay - update * lr;
                mo[i] = mi;
                vo[i] = vi;
            }
        });
    (w2, m2, v2)
}

/// The composed reference: the same update as candle tensor ops, on any device and dtype.
pub fn adamw_reference(
    w: &Tensor,
    g: &Tensor,
    m: Option<&Tensor>,
    v: Option<&Tensor>,
    s: AdamWScalars,
) -> Result<Updated> {
    let m = match m {
        Some(m) => ((m * s.beta1)? + (g * (1.0 - s.beta1))?)?,
        None => (g * (1.0 - s.beta1))?,
    };
    let v = match v {
        Some(v) => ((v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?,
        None => (g.sqr()? * (1.0 - s.beta2))?,
    };
    let update = ((&m / s.bc1)? / ((&v / s.bc2)?.sqrt()? + s.eps)?)?;
    let mut w = w.detach();
    if let Some(d) = s.decay {
        w = (w * d)?;
    }
    Ok(((w - (update * s.lr)?)?, m, v))
}
