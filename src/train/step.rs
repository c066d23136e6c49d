//! One training step, the same for `tern train` and `tern bench step`: micro-batches of forward +
//! next-token loss + backward with gradients summed, the global gradient norm, the NaN/Inf
//! guard (a non-finite loss or gradient skips the update), clipping and AdamW.

use super::optim::{accumulate, clip, global_norm, AdamW, Grads};
use crate::error::Result;
use crate::kernels::cross_entropy::{LossParts, Teacher};
use crate::model::{Model, NoCache, Params};
use candle_core::{DType, Tensor};
use std::time::Instant;

/// Mean next-token cross-entropy of `inp: [B, T]` against `tgt` (`[B*T]` or `[B, T]`), through
/// the model's kernels (fused: the LM head inside a chunked loss; reference: candle's
/// cross-entropy over the full logits).
pub fn batch_loss(model: &Model, inp: &Tensor, tgt: &Tensor) -> Result<Tensor> {
    let h = model.forward(inp, &mut NoCache::new())?;
    model.kernels.lm_head_loss(
        &model.head_input(&h.flatten_to(1)?)?,
        &model.head_latent()?,
        &model.head_quant(),
        &tgt.flatten_all()?,
    )
}

/// Distillation from a frozen teacher (the starting model in full precision): the logits' soft
/// term (weight and temperature) and, optionally, the residual stream after every layer.
#[derive(Clone, Copy)]
pub struct Distill<'a> {
    pub teacher: &'a Model,
    pub alpha: f64,
    pub temperature: f64,
    /// Weight of the hidden-state term (0 = off): the mean over layers of
    /// `|x_student - x_teacher|^2 / |x_teacher|^2`, a dense signal at every layer where the
    /// logits give one at the end only (TernaryBERT's layer-wise distillation, normalized per
    /// layer so that no layer's scale dominates).
    pub hidden: f64,
}

/// `(1 - a) CE + a T^2 KL(teacher || student) [+ b hidden]` of `inp` against `tgt` (the teacher
/// runs on the same inputs, no graph), with its parts when the fused kernel computes them.
pub fn distill_batch_loss(
    model: &Model,
    d: &Distill,
    inp: &Tensor,
    tgt: &Tensor,
) -> Result<(Tensor, Option<LossParts>)> {
    let tapped = d.hidden > 0.0;
    let (mut taps_s, mut taps_t) = (Vec::new(), Vec::new());
    let h = model.forward_tapped(inp, &mut NoCache::new(), tapped.then_some(&mut taps_s))?;
    let ht = d
        .teacher
        .forward_tapped(inp, &mut NoCache::new(), tapped.then_some(&mut taps_t))?
        .flatten_to(1)?
        .to_dtype(d.teacher.dtype())?
        .detach();
    let wt = d.teacher.head_weight()?.detach();
    let teacher = Teacher {
        h: &ht,
        w: &wt,
        alpha: d.alpha,
        temperature: d.temperature,
    };
    let (loss, mut parts) = model.kernels.lm_head_distill_loss(
        &model.head_input(&h.flatten_to(1)?)?,
        &model.head_latent()?,
        &model.head_quant(),
        &tgt.flatten_all()?,
        &teacher,
    )?;
    if !tapped {
        return Ok((loss, parts));
    }
    let hidden = hidden_distill_loss(&taps_s, &taps_t)?;
    if let Some(p) = parts.as_mut() {
        p.hidden = hidden.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    let loss = (loss + (hidden * d.hidden)?.to_dtype(model.dtype())?)?;
    Ok((loss, parts))
}

/// The mean over layers of `sum (s - t)^2 / sum t^2` (f32; the teacher's states carry no graph).
pub fn hidden_distill_loss(student: &[Tensor], teacher: &[Tensor]) -> Result<Tensor> {
    if student.len() != teacher.len() || student.is_empty() {
        return Err(crate::error::Error::Msg(format!(
            "hidden-state distillation: {} student layers, {} teacher layers",
            student.len(),
            teacher.len()
        )));
    }
    let mut terms = Vec::with_capacity(student.len());
    for (s, t) in student.iter().zip(teacher) {
        let t = t.to_dtype(DType::F32)?.detach();
        let energy = t
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()?
            .max(f32::MIN_POSITIVE) as f64;
        let err = (s.to_dtype(DType::F32)? - &t)?.sqr()?.sum_all()?;
        terms.push((err / energy)?);
    }
    Ok((Tensor::stack(&terms, 0)?.sum_all()? / terms.len() as f64)?)
}

/// Mean next-token cross-entropy over windows `[B, T+1]` (inputs = all but the last token).
pub fn window_loss(model: &Model, windows: &Tensor) -> Result<Tensor> {
    let t = windows.dim(1)? - 1;
    batch_loss(model, &windows.narrow(1, 0, t)?, &windows.narrow(1, 1, t)?)
}

/// What one step did, with wall time and peak resident memory per phase (the benchmark's
/// figures; the trainer logs the loss and the norm).
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    /// Sum over micro-batches of each one's mean loss / micro-batches (the step's mean loss).
    pub loss: f64,
    /// With distillation: the step's mean CE and KL (the loss combines them).
    pub parts: Option<LossParts>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// False when the loss or the gradient was not finite and the update was skipped.
    pub applied: bool,
    /// Parameters that received a gradient (in the last micro-batch).
    pub params_with_grad: usize,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    pub peak_rss_after_forward: Option<u64>,
    pub peak_rss_after_backward: Option<u64>,
}

impl StepReport {
    /// Seconds of the whole step: forward, backward and optimizer.
    pub fn total_s(&self) -> f64 {
        self.forward_s + self.backward_s + self.optimizer_s
    }
}

/// Settings of one step.
#[derive(Debug, Clone, Copy)]
pub struct StepConfig {
    pub lr: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub max_grad_norm: f64,
    /// Fault injection for tests of the NaN guard: make this step's loss NaN.
    pub inject_nan: bool,
}

/// What a step minimizes: next-token cross-entropy, or the distillation loss.
#[derive(Clone, Copy)]
pub enum Objective<'a> {
    CrossEntropy,
    Distill(Distill<'a>),
}

/// Runs one optimizer step over `windows` (one `[B, T+1]` tensor per micro-batch, produced on
/// demand so only one is alive at a time).
pub fn train_step(
    model: &Model,
    params: &Params,
    opt: &mut AdamW,
    micro_batches: usize,
    mut windows: impl FnMut() -> Result<Tensor>,
    cfg: StepConfig,
    objective: Objective,
) -> Result<StepReport> {
    let mut r = StepReport::default();
    let mut grads = Grads::new();
    for _ in 0..micro_batches {
        let t0 = Instant::now();
        let ids = windows()?;
        let mut loss = match &objective {
            Objective::CrossEntropy => window_loss(model, &ids)?,
            Objective::Distill(d) => {
                let t = ids.dim(1)? - 1;
                let (loss, parts) =
                    distill_batch_loss(model, d, &ids.narrow(1, 0, t)?, &ids.narrow(1, 1, t)?)?;
                if let Some(p) = parts {
                    let acc = r.parts.get_or_insert_with(LossParts::default);
                    acc.ce += p.ce / micro_batches as f64;
                    acc.kl += p.kl / micro_batches as f64;
                    acc.hidden += p.hidden / micro_batches as f64;
                }
                loss
            }
        };
        loss = (loss / micro_batches as f64)?;
        if cfg.inject_nan {
            loss = (loss * f64::NAN)?;
        }
        r.loss += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let forward_s = t0.elapsed().as_secs_f64();
        r.forward_s += forward_s;
        // Phase marks for `RUST_LOG=tern::train=debug`: on a GPU the first step of a process
        // can sit for minutes (the driver compiling kernels), and these say in which phase.
        tracing::debug!("micro-batch forward done in {forward_s:.3}s");
        r.peak_rss_after_forward = crate::mem::peak_rss_bytes();
        let t1 = Instant::now();
        let store = loss.backward()?;
        drop(loss); // the graph: every activation of the forward
        let backward_s = t1.elapsed().as_secs_f64();
        r.backward_s += backward_s;
        tracing::debug!("micro-batch backward done in {backward_s:.3}s");
        r.peak_rss_after_backward = crate::mem::peak_rss_bytes();
        r.params_with_grad = params
            .iter()
            .filter(|(_, v)| store.get(v.as_tensor()).is_some())
            .count();
        accumulate(&mut grads, params, &store)?;
    }
    let t2 = Instant::now();
    r.grad_norm = global_norm(&grads)?;
    r.applied = r.loss.is_finite() && r.grad_norm.is_finite();
    if r.applied {
        clip(&mut grads, r.grad_norm, cfg.max_grad_norm)?;
        opt.step(params, &grads, cfg.lr)?;
    }
    r.optimizer_s = t2.elapsed().as_secs_f64();
    tracing::debug!("norm, clipping and AdamW done in {:.3}s", r.optimizer_s);
    Ok(r)
}
