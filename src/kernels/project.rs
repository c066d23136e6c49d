//! The ternary projection with its STE as one op: one pass over each group computes the scale
//! and writes `w + lambda * (t * s - w)`; the backward is the identity (straight-through).
//!
//! The composed reference (`ternary::projection::{project, ste}`) runs abs, mean, divide, round,
//! clamp, multiply, subtract, add: eight full-size temporaries of every weight per forward, and
//! autograd keeps some of them. This op keeps none: time O(weights), extra memory one output.
//! The scale is summed in f32 in row order, the way candle's CPU mean does, so the codes agree
//! with the reference bit for bit on ordinary data. On a GPU: one warp per group (reduction for
//! s, then the elementwise write), or one thread block per row.

use crate::error::Result;
use crate::quant::{QuantConfig, ScaleRule};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

pub(crate) struct ProjectSte {
    group: usize,
    rule: ScaleRule,
    lambda: f64,
}

impl ProjectSte {
    pub(crate) fn new(quant: &QuantConfig) -> Self {
        Self {
            group: quant.group_size,
            rule: quant.scale,
            lambda: quant.ramp,
        }
    }

    /// `w + lambda * (t * s - w)` of a row-major weight with rows of `cols`.
    pub(crate) fn run<T: num_like::Num>(&self, w: &[T], cols: usize) -> Vec<T> {
        let mut out = vec![T::zero(); w.len()];
        out.par_chunks_mut(cols)
            .zip(w.par_chunks(cols))
            .for_each(|(o_row, w_row)| {
                for (o, g) in o_row.chunks_mut(self.group).zip(w_row.chunks(self.group)) {
                    let lambda = T::from_f64(self.lambda);
                    let mean =
                        || g.iter().fold(T::zero(), |a, &x| a + x.abs()) / T::from_usize(g.len());
                    if self.rule == ScaleRule::Twn {
                        // Codes sign(w) above 0.7 mean|w|; scale the mean |w| of those.
                        let thr = mean() * T::from_f64(crate::quant::projection::TWN_THRESHOLD);
                        let (mut sum, mut n) = (T::zero(), 0usize);
                        for &x in g {
                            if x.abs() > thr {
                                sum = sum + x.abs();
                                n += 1;
                            }
                        }
                        let s = if n == 0 {
                            T::zero()
                        } else {
                            (sum / T::from_usize(n)).stored_scale()
                        };
                        for (oi, &x) in o.iter_mut().zip(g) {
                            let t = if x > thr {
                                T::from_f64(1.0)
                            } else if x < T::zero() - thr {
                                T::from_f64(-1.0)
                            } else {
                                T::zero()
                            };
                            *oi = x + lambda * (t * s - x);
                        }
                        continue;
                    }
                    let s = match self.rule {
                        ScaleRule::MaxAbs => g.iter().fold(T::zero(), |a, &x| a.max(x.abs())),
                        _ => mean(),
                    };
                    let div = s.max(T::tiny());
                    let stored = s.stored_scale();
                    for (oi, &x) in o.iter_mut().zip(g) {
                        let t = (x / div).ternary_step();
                        *oi = x + lambda * (t * stored - x);
                    }
                }
            });
        out
    }
}

/// Minimal float arithmetic for f32/f64 (kept local: two types, a handful of operations).
pub(crate) mod num_like {
    pub trait Num:
        Copy
        + PartialOrd
        + Send
        + Sync
        + std::ops::Add<Output = Self>
        + std::ops::Sub<Output = Self>
        + std::ops::Mul<Output = Self>
        + std::ops::Div<Output = Self>
    {
        fn zero() -> Self;
        fn abs(self) -> Self;
        fn max(self, o: Self) -> Self;
        /// `clamp(round(self), -1, 1)` (round half away from zero), by two comparisons: the
        /// same values (NaN gives 0), without a libm `roundf` call per weight on baseline x86-64.
        fn ternary_step(self) -> Self;
        /// Rounded to f16 and back, as the GGUF stores a scale
        /// (`quant::projection::stored_scale`).
        fn stored_scale(self) -> Self;
        fn from_usize(v: usize) -> Self;
        fn from_f64(v: f64) -> Self;
        fn tiny() -> Self;
    }
    macro_rules! imp {
        ($t:ty, $to_f16:path, $from_f16:ident) => {
            impl Num for $t {
                fn zero() -> Self {
                    0.0
                }
                fn abs(self) -> Self {
                    <$t>::abs(self)
                }
                fn max(self, o: Self) -> Self {
                    <$t>::max(self, o)
                }
                fn ternary_step(self) -> Self {
                    if self >= 0.5 {
                        1.0
                    } else if self <= -0.5 {
                        -1.0
                    } else {
                        0.0
                    }
                }
                fn stored_scale(self) -> Self {
                    $to_f16(self).$from_f16()
                }
                fn from_usize(v: usize) -> Self {
                    v as $t
                }
                fn from_f64(v: f64) -> Self {
                    v as $t
                }
                fn tiny() -> Self {
                    1e-30 as $t
                }
            }
        };
    }
    imp!(f32, half::f16::from_f32, to_f32);
    imp!(f64, half::f16::from_f64, to_f64);
}

impl CustomOp1 for ProjectSte {
    fn name(&self) -> &'static str {
        "tern-ternary-project-ste"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = match l.contiguous_offsets() {
            Some(x) => x,
            None => candle_core::bail!("ternary projection: weight must be contiguous"),
        };
        let cols = *l.dims().last().unwrap_or(&1);
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[a..b], cols)),
            CpuStorage::F64(v) => CpuStorage::F64(self.run(&v[a..b], cols)),
            _ => candle_core::bail!("ternary projection: f32 or f64 weights only"),
        };
        Ok((out, l.shape().clone()))
    }

    /// Straight-through: dL/dw = dL/d(projected).
    fn bwd(
        &self,
        _w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}

/// Whether [`project_ste`] can run on `w` (CPU, f32/f64, 2-D).
pub fn supported(w: &Tensor) -> bool {
    w.device().is_cpu() && matches!(w.dtype(), DType::F32 | DType::F64) && w.rank() == 2
}

/// `w + lambda * (project(w) - w)` with an identity gradient, in one pass (see [`supported`]).
pub fn project_ste(w: &Tensor, quant: &QuantConfig) -> Result<Tensor> {
    Ok(w.contiguous()?.apply_op1(ProjectSte::new(quant))?)
}

/// The composed reference of [`project_ste`]: `quant::projection`'s plain candle ops.
pub fn project_ste_reference(w: &Tensor, quant: &QuantConfig) -> Result<Tensor> {
    let q = crate::quant::projection::project(w, quant.group_size, quant.scale)?;
    crate::quant::projection::ste(w, &q, quant.ramp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::max_abs_diff;
    use crate::quant::projection::{project, ste};
    use candle_core::{Device, Var};

    #[test]
    fn ternary_step_equals_clamped_round_half_away_from_zero() {
        use num_like::Num;
        let mut xs = vec![
            0.5f32, -0.5, 0.4999999, -0.4999999, 1.5, -1.5, 0.0, -0.0, 3e38, -3e38,
        ];
        xs.extend((0..20_000).map(|i| (i as f32 - 10_000.0) * 3.1e-4));
        for x in xs {
            assert_eq!(x.ternary_step(), x.round().clamp(-1.0, 1.0), "{x}");
            let y = x as f64;
            assert_eq!(y.ternary_step(), y.round().clamp(-1.0, 1.0), "{y}");
        }
    }

    #[test]
    fn fused_projection_equals_the_composed_reference_and_passes_gradients_straight_through() {
        for rule in [ScaleRule::MeanAbs, ScaleRule::MaxAbs, ScaleRule::Twn] {
            for lambda in [1.0, 0.3] {
                let w =
                    Var::from_tensor(&Tensor::randn(0f32, 1.0, (9, 300), &Device::Cpu).unwrap())
                        .unwrap();
                let q = QuantConfig {
                    group_size: 128,
                    scale: rule,
                    ramp: lambda,
                    ternary: true,
                    ..Default::default()
                };
                let fused = project_ste(w.as_tensor(), &q).unwrap();
                let reference = ste(
                    w.as_tensor(),
                    &project(w.as_tensor(), 128, rule).unwrap(),
                    lambda,
                )
                .unwrap();
                let d = max_abs_diff(&fused, &reference);
                assert!(d < 1e-6, "{rule} lambda {lambda}");
                let c = Tensor::randn(0f32, 1.0, (9, 300), &Device::Cpu).unwrap();
                let g = (fused * &c).unwrap().sum_all().unwrap().backward().unwrap();
                let gw = g.get(w.as_tensor()).unwrap();
                assert_eq!(gw.to_vec2::<f32>().unwrap(), c.to_vec2::<f32>().unwrap());
            }
        }
        // An all-zero group projects to zeros, never NaN.
        let z = Tensor::zeros((2, 128), DType::F32, &Device::Cpu).unwrap();
        let p = project_ste(&z, &QuantConfig::default()).unwrap();
        assert!(p
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|x| *x == 0.0));
    }
}
