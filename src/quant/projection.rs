//! Group-wise ternary projection and the straight-through estimator (STE).
//!
//! For a 2-D weight `[rows, cols]`, each row is cut into groups of `group_size` consecutive
//! weights (the last group of a row may be shorter and then uses only its own elements). For each
//! group: `s = mean(|w|)` (or `max(|w|)`), `t = clamp(round(w / s), -1, 1)`, projected value
//! `t * s`. Or, with the `twn` rule (Ternary Weight Networks, Li et al. 2016), the threshold
//! `d = 0.7 mean(|w|)`, `t = sign(w)` where `|w| > d` (else 0) and `s = mean(|w|)` over those
//! weights: the least-squares scale of those codes. An all-zero group has `s = 0` and projects to zeros (we divide by `max(s, tiny)`, so
//! `0 / tiny = 0`, never `0 / 0`).
//!
//! Backward: the projection is piecewise constant, so its true gradient is zero almost
//! everywhere. The STE pretends it is the identity: the forward uses
//! `w + lambda * (q - w).detach()`, so `dL/dw = dL/dq` with `s` treated as a constant. `lambda`
//! ramps the quantization in when starting from pretrained full-precision weights
//! (lambda = 0: full precision, lambda = 1: fully ternary).
//!
//! This module is composed of plain candle ops (it runs on every device and is the reference the
//! fused CPU kernel is checked against). Which of the two a model runs is decided in one place,
//! `kernels::Kernels::effective_weight`.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

/// How a group's scale is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRule {
    /// s = mean(|w|) over the group (BitNet b1.58; the default).
    #[default]
    #[value(name = "mean_abs")]
    MeanAbs,
    /// s = max(|w|) over the group (no weight is clipped; most weights round to 0).
    #[value(name = "max_abs")]
    MaxAbs,
    /// Ternary Weight Networks: threshold 0.7 mean(|w|), s = mean(|w|) of the weights above it.
    /// On SmolLM2's weights its squared error is 28% below mean_abs's (NOTES.md).
    #[value(name = "twn")]
    Twn,
}

/// TWN's threshold as a share of the group's mean |w|.
pub const TWN_THRESHOLD: f64 = 0.7;

impl std::fmt::Display for ScaleRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScaleRule::MeanAbs => "mean_abs",
            ScaleRule::MaxAbs => "max_abs",
            ScaleRule::Twn => "twn",
        })
    }
}

/// How a model's ternary layers run. One checkpoint can run either way (`ternary` switch).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QuantConfig {
    /// false: latent weights are used as they are (full precision).
    pub ternary: bool,
    pub group_size: usize,
    pub scale: ScaleRule,
    /// STE ramp: the forward uses w + ramp * (q - w). 1.0 = fully ternary.
    #[serde(skip, default = "one")]
    pub ramp: f64,
    /// The embedding and the LM head are ternary too (default); false keeps them in full
    /// precision (an ablation; such a model cannot be exported as Q2_0).
    #[serde(default = "yes")]
    pub embeddings: bool,
    /// CPU mixed precision (`train.dtype = "bf16"` on a CPU with AVX512-BF16 or AMX-BF16): the ternary layers'
    /// three GEMMs in bf16 with f32 accumulation (`kernels::gemm_bf16`); activations, latents
    /// and everything else stay f32. Run-time only, like `ramp`.
    #[serde(skip)]
    pub gemm_bf16: bool,
    /// How every ternary layer's input is quantized (`quant::activations`): recorded in the
    /// checkpoint, so inference from it sees what training saw.
    #[serde(default)]
    pub act_quant: crate::quant::ActQuant,
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self {
            ternary: true,
            group_size: 128,
            scale: ScaleRule::MeanAbs,
            ramp: 1.0,
            embeddings: true,
            gemm_bf16: false,
            act_quant: crate::quant::ActQuant::None,
        }
    }
}

impl QuantConfig {
    pub fn full_precision() -> Self {
        Self {
            ternary: false,
            ..Self::default()
        }
    }

    /// The settings for the embedding and the LM head.
    pub fn for_embeddings(&self) -> Self {
        if self.embeddings {
            *self
        } else {
            Self {
                ternary: false,
                ..*self
            }
        }
    }
    pub fn validate(&self) -> Result<()> {
        if self.group_size == 0 {
            return Err(Error::Msg(
                "group_size: expected a positive integer, found 0".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.ramp) {
            return Err(Error::Msg(format!(
                "ramp: expected a value in [0, 1], found {}",
                self.ramp
            )));
        }
        Ok(())
    }
}

/// Smallest scale we divide by; an all-zero group then yields 0 / tiny = 0.
const TINY: f64 = 1e-30;

/// Per-group scales of a `[rows, n, g]` tensor: `[rows, n, 1]` (mean_abs, max_abs).
fn group_scale(groups: &Tensor, rule: ScaleRule) -> Result<Tensor> {
    let a = groups.abs()?;
    Ok(match rule {
        ScaleRule::MeanAbs | ScaleRule::Twn => a.mean_keepdim(D::Minus1)?,
        ScaleRule::MaxAbs => a.max_keepdim(D::Minus1)?,
    })
}

/// A scale as the GGUF stores it: Q2_0 and PQ2_0 blocks hold an f16 `d`. Training, evaluation
/// and export all multiply by this value, so the model a checkpoint evaluates is the exported
/// model weight for weight (with f32 scales the file differed from its checkpoint by up to 2^-11
/// of every weight, which was most of the packed model's KL against it). The codes are still
/// decided by the unrounded scale, as before.
pub fn stored_scale(s: &Tensor) -> Result<Tensor> {
    Ok(s.to_dtype(DType::F16)?.to_dtype(s.dtype())?)
}

/// TWN codes and scales of `[rows, n, g]` groups: `sign(w)` above `0.7 mean(|w|)`, and the mean
/// |w| of those weights (0 for a group with none).
fn project_groups_twn(groups: &Tensor) -> Result<(Tensor, Tensor)> {
    let a = groups.abs()?;
    let thr = (a.mean_keepdim(D::Minus1)? * TWN_THRESHOLD)?;
    let keep = a.broadcast_gt(&thr)?.to_dtype(groups.dtype())?;
    let count = keep.sum_keepdim(D::Minus1)?;
    let s = (a * &keep)?
        .sum_keepdim(D::Minus1)?
        .broadcast_div(&count.clamp(1f64, f64::INFINITY)?)?;
    let sign = ((groups.ge(0f64)?.to_dtype(groups.dtype())? * 2.0)? - 1.0)?;
    Ok(((sign * keep)?, stored_scale(&s)?))
}

/// Projects `[rows, n, g]` groups: returns (codes t in {-1,0,1}, scales [rows, n, 1] as stored).
fn project_groups(groups: &Tensor, rule: ScaleRule) -> Result<(Tensor, Tensor)> {
    if rule == ScaleRule::Twn {
        return project_groups_twn(groups);
    }
    let s = group_scale(groups, rule)?;
    let t = groups
        .broadcast_div(&s.clamp(TINY, f64::INFINITY)?)?
        .round()?
        .clamp(-1f64, 1f64)?;
    Ok((t, stored_scale(&s)?))
}

/// Splits each row of `w: [rows, cols]` into its full groups and its trailing partial group.
/// Returns the parts as `[rows, n, g]` views (n = 1 for the partial part).
fn row_groups(w: &Tensor, group: usize) -> Result<Vec<Tensor>> {
    let (rows, cols) = w.dims2()?;
    let full = cols / group;
    let rem = cols % group;
    let mut parts = Vec::with_capacity(2);
    if full > 0 {
        parts.push(w.narrow(1, 0, full * group)?.reshape((rows, full, group))?);
    }
    if rem > 0 {
        parts.push(w.narrow(1, full * group, rem)?.reshape((rows, 1, rem))?);
    }
    Ok(parts)
}

/// Ternary codes and scales of a 2-D weight: codes `[rows, cols]` (values -1, 0, 1 as the weight's
/// dtype) and scales `[rows, ceil(cols / group)]`. Detached: no gradient flows through this.
pub fn codes_and_scales(w: &Tensor, group: usize, rule: ScaleRule) -> Result<(Tensor, Tensor)> {
    let w = w.detach();
    let (rows, _) = w.dims2()?;
    let mut codes = Vec::new();
    let mut scales = Vec::new();
    for part in row_groups(&w, group)? {
        let (_, n, g) = part.dims3()?;
        let (t, s) = project_groups(&part, rule)?;
        codes.push(t.reshape((rows, n * g))?);
        scales.push(s.reshape((rows, n))?);
    }
    Ok((Tensor::cat(&codes, 1)?, Tensor::cat(&scales, 1)?))
}

/// The projected weight `t * s` (same shape as `w`), detached.
pub fn project(w: &Tensor, group: usize, rule: ScaleRule) -> Result<Tensor> {
    if w.rank() != 2 {
        return Err(Error::Msg(format!(
            "ternary projection expects a 2-D weight, found shape {:?}",
            w.dims()
        )));
    }
    let w = w.detach();
    let (rows, _) = w.dims2()?;
    let mut out = Vec::with_capacity(2);
    for part in row_groups(&w, group)? {
        let (_, n, g) = part.dims3()?;
        let (t, s) = project_groups(&part, rule)?;
        out.push(t.broadcast_mul(&s)?.reshape((rows, n * g))?);
    }
    let q = if out.len() == 1 {
        out.pop().expect("one part")
    } else {
        Tensor::cat(&out, 1)?
    };
    Ok(q)
}

/// Straight-through estimator: value `w + lambda * (q - w)`, gradient identity w.r.t. `w`.
pub fn ste(w: &Tensor, q: &Tensor, lambda: f64) -> Result<Tensor> {
    let delta = (q - w.detach())?;
    let delta = if lambda == 1.0 {
        delta
    } else {
        (delta * lambda)?
    };
    Ok(w.add(&delta.detach())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2::<f32>().unwrap()
    }

    #[test]
    fn twn_keeps_the_weights_above_seven_tenths_of_the_mean_at_their_mean() {
        // mean |w| = 1.0; threshold 0.7: 2.0, -1.5 and 0.8 kept (mean 1.4333), 0.5 and -0.2 not.
        let w = Tensor::new(&[[2.0f32, -1.5, 0.8, 0.5, -0.2]], &candle_core::Device::Cpu).unwrap();
        let (t, s) = codes_and_scales(&w, 5, ScaleRule::Twn).unwrap();
        assert_eq!(
            t.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, -1.0, 1.0, 0.0, 0.0]]
        );
        let s = s.to_vec2::<f32>().unwrap()[0][0];
        assert_eq!(s, half::f16::from_f32(4.3 / 3.0).to_f32(), "stored as f16");
        // All-zero groups give zeros.
        let z = Tensor::zeros((1, 4), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let q = project(&z, 4, ScaleRule::Twn)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(q, vec![vec![0.0; 4]]);
    }

    #[test]
    fn every_group_is_minus_s_zero_plus_s_with_mean_abs_scale() {
        let w = Tensor::randn(0f32, 1.0, (5, 300), &Device::Cpu).unwrap();
        let q = rows(&project(&w, 128, ScaleRule::MeanAbs).unwrap());
        let wv = rows(&w);
        let mut rounded = 0;
        for (r, qr) in qr_pairs(&wv, &q) {
            // groups: [0,128), [128,256), [256,300) (a partial group of 44 uses only its own 44)
            for (a, b) in [(0, 128), (128, 256), (256, 300)] {
                let s: f32 = r[a..b].iter().map(|x| x.abs()).sum::<f32>() / (b - a) as f32;
                // Codes by the exact mean, values times the scale the GGUF stores (f16).
                let stored = half::f16::from_f32(s).to_f32();
                rounded += usize::from(stored != s);
                for j in a..b {
                    let v = qr[j];
                    assert!(
                        v == 0.0 || v == stored || v == -stored,
                        "{v} vs stored scale {stored}"
                    );
                    let expect = (r[j] / s).round().clamp(-1.0, 1.0) * stored;
                    assert!((v - expect).abs() <= 1e-6 * s);
                }
            }
        }
        assert!(rounded > 0, "the test must see scales that f16 rounds");
    }

    fn qr_pairs<'a>(
        w: &'a [Vec<f32>],
        q: &'a [Vec<f32>],
    ) -> impl Iterator<Item = (&'a Vec<f32>, &'a Vec<f32>)> {
        w.iter().zip(q.iter())
    }

    #[test]
    fn all_zero_group_projects_to_zero_and_max_abs_keeps_the_extreme() {
        let mut v = vec![0f32; 256];
        v[128] = 2.0;
        v[129] = -0.5;
        v[130] = 1.2;
        let w = Tensor::from_vec(v, (1, 256), &Device::Cpu).unwrap();
        let q = rows(&project(&w, 128, ScaleRule::MaxAbs).unwrap())[0].clone();
        assert!(q[..128].iter().all(|x| *x == 0.0 && x.is_finite()));
        assert_eq!(q[128], 2.0);
        assert_eq!(q[129], 0.0); // -0.5/2 = -0.25 rounds to 0
        assert_eq!(q[130], 2.0); // 0.6 rounds to 1
        let (t, s) = codes_and_scales(&w, 128, ScaleRule::MaxAbs).unwrap();
        assert_eq!(s.to_vec2::<f32>().unwrap(), vec![vec![0.0, 2.0]]);
        assert_eq!(t.to_vec2::<f32>().unwrap()[0][130], 1.0);
    }

    #[test]
    fn ste_gradient_is_identity_and_ramp_interpolates() {
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 8), &Device::Cpu).unwrap()).unwrap();
        let q = project(w.as_tensor(), 4, ScaleRule::MeanAbs).unwrap();
        let half = ste(w.as_tensor(), &q, 0.5).unwrap();
        let expect = ((w.as_tensor() + &q).unwrap() * 0.5).unwrap();
        let d = (half - expect)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6);
        let y = ste(w.as_tensor(), &q, 1.0).unwrap();
        let coef = Tensor::randn(0f32, 1.0, (3, 8), &Device::Cpu).unwrap();
        let g = (y * &coef).unwrap().sum_all().unwrap().backward().unwrap();
        let gw = g.get(w.as_tensor()).expect("latent gets a gradient");
        assert_eq!(rows(gw), rows(&coef));
    }
}
