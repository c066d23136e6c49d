//! Checks that weights are what the ternary format promises: every group of a projected weight
//! is exactly {-s, 0, +s} for one s >= 0. Used at the end of training and by `tern verify`.

use crate::error::Result;
use candle_core::{DType, Tensor};
use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize)]
pub struct TernaryReport {
    pub groups: usize,
    pub bad_groups: usize,
    pub counts: [u64; 3],
    /// Largest |w/s - round(w/s)| over the tensor's nonzero groups (0 for a true projection).
    pub max_deviation: f64,
}

impl TernaryReport {
    pub fn shares(&self) -> [f64; 3] {
        let n = self.counts.iter().sum::<u64>().max(1) as f64;
        [
            self.counts[0] as f64 / n,
            self.counts[1] as f64 / n,
            self.counts[2] as f64 / n,
        ]
    }
    pub fn merge(&mut self, o: &TernaryReport) {
        self.groups += o.groups;
        self.bad_groups += o.bad_groups;
        for i in 0..3 {
            self.counts[i] += o.counts[i];
        }
        self.max_deviation = self.max_deviation.max(o.max_deviation);
    }
    pub fn ok(&self) -> bool {
        self.bad_groups == 0
    }
}

/// Verifies a projected 2-D weight `[rows, cols]` group by group (groups of `group` along rows,
/// last one partial). Relative tolerance `1e-6` on |w| == s.
pub fn verify_projected(w: &Tensor, group: usize) -> Result<TernaryReport> {
    let (rows, cols) = w.dims2()?;
    let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut r = TernaryReport::default();
    for row in 0..rows {
        let line = &data[row * cols..(row + 1) * cols];
        for g in line.chunks(group) {
            r.groups += 1;
            let s = g.iter().fold(0f32, |m, x| m.max(x.abs()));
            let mut bad = false;
            for &x in g {
                if x == 0.0 {
                    r.counts[1] += 1;
                    continue;
                }
                let dev = ((x.abs() - s).abs() / s) as f64;
                r.max_deviation = r.max_deviation.max(dev);
                if dev > 1e-6 || !x.is_finite() {
                    bad = true;
                }
                r.counts[if x > 0.0 { 2 } else { 0 }] += 1;
            }
            if bad {
                r.bad_groups += 1;
            }
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{project, ScaleRule};
    use candle_core::Device;

    #[test]
    fn projections_pass_and_tampered_weights_fail() {
        let w = Tensor::randn(0f32, 1.0, (4, 200), &Device::Cpu).unwrap();
        let q = project(&w, 128, ScaleRule::MeanAbs).unwrap();
        let r = verify_projected(&q, 128).unwrap();
        assert!(r.ok() && r.groups == 8, "{r:?}");
        let s = r.shares();
        assert!((s.iter().sum::<f64>() - 1.0).abs() < 1e-12 && s[1] > 0.1 && s[0] > 0.1);
        assert!(
            !verify_projected(&w, 128).unwrap().ok(),
            "raw weights are not ternary"
        );
    }
}
