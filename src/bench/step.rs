//! The training step at a given architecture, scratch init: exactly `train::step::train_step`,
//! what `tern train` runs, with synthetic token ids.

use crate::error::{Error, Result};
use crate::kernels::Kernels;
use crate::model::{Model, ModelConfig, Params};
use crate::quant::QuantConfig;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::step::{train_step, StepConfig, StepReport};
use candle_core::{DType, Device, Tensor};

/// What to run.
#[derive(Debug, Clone)]
pub struct StepBench {
    pub arch: ModelConfig,
    pub quant: QuantConfig,
    pub kernels: Kernels,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub seed: u64,
    /// f32, or bf16 mixed precision (GPU).
    pub dtype: crate::kernels::ComputeDtype,
}

/// The model and optimizer built for the run, then one report per step.
pub struct StepRun {
    pub params: usize,
    pub tensors: usize,
    pub init_s: f64,
    pub rss_after_init: Option<u64>,
    pub steps: Vec<StepReport>,
}

impl StepBench {
    /// Runs the steps on `device`; `on_step` sees each report as it is made.
    pub fn run(
        &self,
        device: &Device,
        mut on_step: impl FnMut(usize, &StepReport),
    ) -> Result<StepRun> {
        self.quant.validate()?;
        if self.batch == 0 || self.seq == 0 || self.steps == 0 {
            return Err(Error::Msg(
                "--batch, --seq and --steps must be positive".into(),
            ));
        }
        let t0 = std::time::Instant::now();
        let params = Params::scratch(&self.arch, self.seed, DType::F32, device)?;
        let compute = self.dtype.for_device(device)?;
        let model = Model::new(&self.arch, compute.quant(self.quant), &params)?
            .with_kernels(self.kernels)
            .with_compute_dtype(compute.dtype);
        let mut opt = AdamW::new(AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        });
        opt.kernels = self.kernels;
        let init_s = t0.elapsed().as_secs_f64();
        let rss_after_init = crate::mem::rss_bytes();
        let n = self.batch * (self.seq + 1);
        let vocab = self.arch.vocab_size as u64;
        let ids: Vec<u32> = (0..n)
            .map(|i| ((i as u64 * 2_654_435_761 + self.seed) % vocab) as u32)
            .collect();
        let ids = Tensor::from_vec(ids, (self.batch, self.seq + 1), device)?;
        let cfg = StepConfig {
            lr: 1e-4,
            max_grad_norm: 1.0,
            inject_nan: false,
        };
        let mut steps = Vec::with_capacity(self.steps);
        for i in 0..self.steps {
            let t0 = std::time::Instant::now();
            let mut r = train_step(
                &model,
                &params,
                &mut opt,
                1,
                || Ok(ids.clone()),
                cfg,
                crate::train::step::Objective::CrossEntropy,
            )?;
            // GPU work is asynchronous: wait for the optimizer's kernels, and charge the wait to
            // the optimizer, so the phases add up to the step's wall time.
            device.synchronize()?;
            let wall = t0.elapsed().as_secs_f64();
            r.optimizer_s += (wall - r.total_s()).max(0.0);
            on_step(i, &r);
            steps.push(r);
        }
        Ok(StepRun {
            params: params.num_elements(),
            tensors: params.len(),
            init_s,
            rss_after_init,
            steps,
        })
    }
}
