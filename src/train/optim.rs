//! AdamW (Loshchilov & Hutter) with f32 moments and decoupled weight decay, which is not applied
//! to RMSNorm weights. Its state is plain named tensors, so it is checkpointed like the model.
//!
//! The per-tensor update is a kernel (`kernels::adamw`: fused one-pass on the CPU, or the
//! composed reference), chosen by `Kernels::adamw`; a test here compares the two.

use crate::error::{Error, Result};
use crate::kernels::adamw::AdamWScalars;
use crate::kernels::Kernels;
use crate::model::params::{is_norm, Params};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Number of updates applied so far (bias correction uses it).
    pub t: u64,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
    /// Fused one-pass update where it applies (CPU, f32), or the composed reference.
    pub kernels: Kernels,
}

/// Gradients by parameter name.
pub type Grads = BTreeMap<String, Tensor>;

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        Self {
            cfg,
            t: 0,
            m: BTreeMap::new(),
            v: BTreeMap::new(),
            kernels: Kernels::default(),
        }
    }

    /// One update with learning rate `lr`: every parameter must have a gradient.
    pub fn step(&mut self, params: &Params, grads: &Grads, lr: f64) -> Result<()> {
        self.t += 1;
        let AdamWConfig {
            beta1: b1,
            beta2: b2,
            eps,
            weight_decay: wd,
        } = self.cfg;
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for (name, var) in params.iter() {
            let g = grads
                .get(name)
                .ok_or_else(|| Error::Msg(format!("no gradient for parameter '{name}'")))?;
            let decay = (wd > 0.0 && !is_norm(name)).then_some(1.0 - lr * wd);
            let s = AdamWScalars {
                beta1: b1,
                beta2: b2,
                bc1,
                bc2,
                eps,
                lr,
                decay,
            };
            // Taken out of the maps first, so the old moments are freed as soon as the new exist.
            let (m_old, v_old) = (self.m.remove(name), self.v.remove(name));
            let (w2, m2, v2) =
                self.kernels
                    .adamw(var.as_tensor(), g, m_old.as_ref(), v_old.as_ref(), s)?;
            drop((m_old, v_old));
            var.set(&w2)?;
            self.m.insert(name.clone(), m2);
            self.v.insert(name.clone(), v2);
        }
        Ok(())
    }

    /// Writes the moments as `m.<name>` / `v.<name>` tensors (the step count goes in state.json).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut out: HashMap<String, Tensor> = HashMap::new();
        for (k, t) in &self.m {
            out.insert(format!("m.{k}"), t.to_device(&Device::Cpu)?);
        }
        for (k, t) in &self.v {
            out.insert(format!("v.{k}"), t.to_device(&Device::Cpu)?);
        }
        if out.is_empty() {
            // safetensors needs at least a header; an empty state is a valid state.
            out.insert("empty".into(), Tensor::zeros(1, DType::F32, &Device::Cpu)?);
        }
        candle_core::safetensors::save(&out, path)?;
        Ok(())
    }

    pub fn load(
        cfg: AdamWConfig,
        t: u64,
        path: &Path,
        params: &Params,
        device: &Device,
    ) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, device)
            .map_err(|e| Error::checkpoint(path, format!("cannot read optimizer state: {e}")))?;
        let mut s = Self::new(cfg);
        s.t = t;
        if t == 0 {
            return Ok(s);
        }
        for (name, var) in params.iter() {
            for (prefix, map) in [("m", &mut s.m), ("v", &mut s.v)] {
                let key = format!("{prefix}.{name}");
                let ten = tensors.get(&key).ok_or_else(|| {
                    Error::checkpoint(path, format!("optimizer state lacks '{key}'"))
                })?;
                if ten.dims() != var.as_tensor().dims() {
                    return Err(Error::checkpoint(
                        path,
                        format!(
                            "'{key}': expected shape {:?}, found {:?}",
                            var.as_tensor().dims(),
                            ten.dims()
                        ),
                    ));
                }
                map.insert(name.clone(), ten.clone());
            }
        }
        Ok(s)
    }
}

/// Global L2 norm of all gradients (f64 accumulation).
pub fn global_norm(grads: &Grads) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.values() {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

/// Scales all gradients so their global norm is at most `max_norm` (0 = no clipping).
pub fn clip(grads: &mut Grads, norm: f64, max_norm: f64) -> Result<()> {
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(())
}

/// Adds `grads` of one micro-batch into the accumulator.
pub fn accumulate(
    acc: &mut Grads,
    params: &Params,
    store: &candle_core::backprop::GradStore,
) -> Result<()> {
    for (name, var) in params.iter() {
        let g = store
            .get(var.as_tensor())
            .ok_or_else(|| Error::Msg(format!("parameter '{name}' received no gradient")))?;
        let g = g.detach();
        match acc.get_mut(name) {
            Some(a) => *a = (&*a + g)?,
            None => {
                acc.insert(name.clone(), g);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::max_abs_diff;

    /// One AdamW step by hand: m = (1-b1) g, v = (1-b2) g^2, bias-corrected update = sign(g)
    /// (up to eps), decoupled decay w *= (1 - lr*wd) except on norms.
    /// The fused one-pass update equals the composed one over several steps.
    #[test]
    fn fused_update_matches_the_composed_update() {
        let dev = Device::Cpu;
        let init = |seed: u32| -> Vec<f32> {
            (0..5000)
                .map(|i| (((i * 7919 + seed * 104729) % 2001) as f32 / 1000.0) - 1.0)
                .collect()
        };
        let mk = || {
            Params::from_tensors([
                (
                    "a.weight".to_string(),
                    Tensor::from_vec(init(1), (50, 100), &dev).unwrap(),
                ),
                (
                    "x.input_layernorm.weight".to_string(),
                    Tensor::from_vec(init(2)[..100].to_vec(), 100, &dev).unwrap(),
                ),
            ])
            .unwrap()
        };
        let (pf, pc) = (mk(), mk());
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let (mut of, mut oc) = (AdamW::new(cfg), AdamW::new(cfg));
        oc.kernels = Kernels::Reference;
        for step in 0..4u32 {
            let mut grads = Grads::new();
            grads.insert(
                "a.weight".into(),
                Tensor::from_vec(init(10 + step), (50, 100), &dev).unwrap(),
            );
            grads.insert(
                "x.input_layernorm.weight".into(),
                Tensor::from_vec(init(20 + step)[..100].to_vec(), 100, &dev).unwrap(),
            );
            of.step(&pf, &grads, 1e-2).unwrap();
            oc.step(&pc, &grads, 1e-2).unwrap();
        }
        for ((n, a), (_, b)) in pf.iter().zip(pc.iter()) {
            let d = max_abs_diff(a.as_tensor(), b.as_tensor());
            assert!(d < 1e-6, "{n}: fused vs composed differ by {d}");
        }
    }

    #[test]
    fn first_step_matches_the_formula_and_skips_decay_on_norms() {
        let dev = Device::Cpu;
        let params = Params::from_tensors([
            (
                "a.weight".to_string(),
                Tensor::new(&[1.0f32, -2.0], &dev).unwrap(),
            ),
            (
                "x.input_layernorm.weight".to_string(),
                Tensor::new(&[1.0f32, 1.0], &dev).unwrap(),
            ),
        ])
        .unwrap();
        let mut grads = Grads::new();
        grads.insert(
            "a.weight".into(),
            Tensor::new(&[0.5f32, -0.25], &dev).unwrap(),
        );
        grads.insert(
            "x.input_layernorm.weight".into(),
            Tensor::new(&[0.1f32, 0.0], &dev).unwrap(),
        );
        let mut opt = AdamW::new(AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        });
        opt.step(&params, &grads, 0.01).unwrap();
        let a = params.tensor("a.weight").unwrap().to_vec1::<f32>().unwrap();
        assert!((a[0] - (1.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-6, "{a:?}");
        assert!((a[1] - (-2.0 * (1.0 - 0.001) + 0.01)).abs() < 1e-6, "{a:?}");
        let n = params
            .tensor("x.input_layernorm.weight")
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((n[0] - 0.99).abs() < 1e-6 && n[1] == 1.0, "{n:?}");
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let dev = Device::Cpu;
        let mut g = Grads::new();
        g.insert("a".into(), Tensor::new(&[3.0f32, 4.0], &dev).unwrap());
        let n = global_norm(&g).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        clip(&mut g, n, 1.0).unwrap();
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
    }
}
