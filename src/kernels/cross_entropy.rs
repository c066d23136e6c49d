//! Cross-entropy fused with the LM head, computed in chunks of tokens.
//!
//! Plain version (the reference, [`reference_loss`]): `logits = h @ W^T` for all N tokens, then
//! log-softmax and NLL. With V = 151,936 and N = 1,024 that is 622 MB per intermediate, and
//! autograd keeps several of them alive for the backward.
//!
//! Fused version ([`lm_head_cross_entropy`]): for each chunk of `c` tokens, compute the chunk's
//! logits `[c, V]`, its log-sum-exp and NLL, and right away its gradient
//! `dlogits = (softmax - onehot) / N`, then `dh_chunk = dlogits @ W`; `dW = dlogits^T @ h` is
//! formed once per group of chunks (~256 MB of dlogits). The loss is returned as
//! `value + inject(h, dh) + inject(W, dW)`, where `inject` is a CustomOp whose forward is a scalar
//! zero and whose backward hands the stored gradient to autograd (the chain rule then carries it
//! on, through the STE into the latent embedding). Cost: the same three GEMMs as the plain
//! forward + backward, done during the forward. Time O(N V H), extra memory O(min(N, G) V + V H).
//!
//! On CPU the per-row softmax/NLL/gradient is one pass over the chunk's logits in plain Rust
//! (rows in parallel); elsewhere it is composed of candle ops. On a GPU this maps to one kernel
//! per chunk: a block per row doing max/sum reductions and writing dlogits in place.
//!
//! Distillation ([`Teacher`]): the same chunks also compute a frozen teacher's logits
//! `h_t @ W_t^T` and the loss becomes `(1 - a) CE + a T^2 KL(softmax(z_t/T) || softmax(z/T))`,
//! whose gradient per logit row is `(1 - a)(softmax(z) - onehot) + a T (softmax(z/T) -
//! softmax(z_t/T))` (Hinton et al.'s T^2 keeps the soft term's scale independent of T). Neither
//! model's `[N, V]` logits exist whole. Reference: [`distill_reference_loss`] (full logits,
//! composed candle ops).

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use rayon::prelude::*;

/// Rows per chunk: keeps the `[c, V]` logits buffer near 128 MB at Qwen3's vocabulary (220 rows).
/// Fewer, larger chunks matter on the CPU: every chunk re-packs the whole `[V, H]` head for the
/// GEMM, and at 32 MB (55 rows) that packing cost a tenth of a tiny-config step (perf).
pub fn default_chunk(vocab: usize) -> usize {
    ((128usize << 20) / (4 * vocab.max(1))).clamp(8, 1024)
}

/// A frozen teacher for logit distillation: its final hidden states `h: [N, H_t]` for the same
/// tokens, its head `w: [V, H_t]` (same vocabulary), the weight `alpha` of the soft term and the
/// temperature.
#[derive(Debug, Clone, Copy)]
pub struct Teacher<'a> {
    pub h: &'a Tensor,
    pub w: &'a Tensor,
    pub alpha: f64,
    pub temperature: f64,
}

/// The two terms of a distillation loss, means over tokens (for logging).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossParts {
    /// Mean next-token NLL of the student.
    pub ce: f64,
    /// Mean KL(teacher || student) at the temperature (0 without a teacher).
    pub kl: f64,
    /// Hidden-state distillation's term before its weight (the mean over layers of the residual
    /// streams' relative squared error; 0 when off). Set by `train::step`, not by the kernels.
    pub hidden: f64,
}

fn check_targets(targets: &[u32], vocab: usize) -> Result<()> {
    match targets.iter().find(|&&t| t as usize >= vocab) {
        Some(bad) => Err(Error::Msg(format!(
            "target id {bad} is outside the vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}

/// Plain reference: full logits, then candle's cross-entropy (mean over tokens).
pub fn reference_loss(h: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = h.matmul(&w.t()?)?;
    Ok(candle_nn::loss::cross_entropy(&logits, targets)?)
}

/// Plain reference of the distillation loss: full logits of both models, then
/// `(1 - a) CE + a T^2 mean_rows KL(softmax(z_t/T) || softmax(z/T))`.
pub fn distill_reference_loss(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    teacher: &Teacher,
) -> Result<Tensor> {
    let logits = h.matmul(&w.t()?)?;
    let ce = candle_nn::loss::cross_entropy(&logits, targets)?;
    let t = teacher.temperature;
    let zt = (teacher.h.matmul(&teacher.w.t()?)?.detach() / t)?;
    let log_pt = candle_nn::ops::log_softmax(&zt, D::Minus1)?;
    let log_q = candle_nn::ops::log_softmax(&(logits / t)?, D::Minus1)?;
    let n = h.dim(0)? as f64;
    let kl = ((log_pt.exp()? * (log_pt - log_q)?)?.sum_all()? / n)?;
    let a = teacher.alpha;
    Ok(((ce * (1.0 - a))? + (kl * (a * t * t))?)?)
}

/// e^x for f32 without a libm call, so loops over slices vectorize: x = n ln2 + r with
/// |r| <= ln2/2, e^r by a degree-7 polynomial (relative error < 2e-7), 2^n by exponent bits.
/// Inputs below -87.3 return ~1e-38 instead of 0 (harmless inside a softmax sum).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting rounds to an integer
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// For each row of a chunk of logits: NLL of its target and, when `out` is given,
/// dlogits = (softmax - onehot) * scale written into `out`. One exp per logit.
fn softmax_xent_cpu(
    logits: &[f32],
    vocab: usize,
    targets: &[u32],
    scale: f32,
    out: Option<&mut [f32]>,
) -> Vec<f64> {
    let row_nll = |row: &[f32], t: u32, d: &mut [f32]| -> f64 {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0f64;
        for (o, &x) in d.iter_mut().zip(row) {
            *o = exp_f32(x - max);
        }
        for part in d.chunks(1024) {
            sum += part.iter().sum::<f32>() as f64;
        }
        (max as f64 + sum.ln()) - row[t as usize] as f64
    };
    // Per-row values are collected in order and summed sequentially: a parallel reduction's
    // association order depends on work stealing and would make the loss non-reproducible.
    let per_row: Vec<f64> = match out {
        Some(out) => logits
            .par_chunks(vocab)
            .zip(out.par_chunks_mut(vocab))
            .zip(targets.par_iter())
            .map(|((row, d), &t)| {
                let nll = row_nll(row, t, d);
                let k = scale / d.iter().map(|&x| x as f64).sum::<f64>() as f32;
                d.iter_mut().for_each(|x| *x *= k);
                d[t as usize] -= scale;
                nll
            })
            .collect(),
        None => logits
            .par_chunks(vocab)
            .zip(targets.par_iter())
            .map_init(|| vec![0f32; vocab], |buf, (row, &t)| row_nll(row, t, buf))
            .collect(),
    };
    per_row
}

/// Distillation over a chunk, per row: the student's NLL of its target and
/// KL(softmax(zt/T) || softmax(z/T)), and `d = scale [(1 - a)(softmax(z) - onehot) + a T
/// (softmax(z/T) - softmax(zt/T))]` written into `out`.
#[allow(clippy::too_many_arguments)]
fn distill_cpu(
    logits: &[f32],
    teacher: &[f32],
    vocab: usize,
    targets: &[u32],
    alpha: f32,
    temp: f32,
    scale: f32,
    out: &mut [f32],
) -> Vec<(f64, f64)> {
    // softmax(x / t) written into `p`; returns log-sum-exp(x / t).
    let softmax_into = |x: &[f32], t: f32, p: &mut [f32]| -> f64 {
        let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) / t;
        let inv_t = 1.0 / t;
        for (o, &v) in p.iter_mut().zip(x) {
            *o = exp_f32(v * inv_t - max);
        }
        let sum: f64 = p.chunks(1024).map(|c| c.iter().sum::<f32>() as f64).sum();
        let k = (1.0 / sum) as f32;
        p.iter_mut().for_each(|v| *v *= k);
        max as f64 + sum.ln()
    };
    logits
        .par_chunks(vocab)
        .zip(teacher.par_chunks(vocab))
        .zip(out.par_chunks_mut(vocab))
        .zip(targets.par_iter())
        .map_init(
            || (vec![0f32; vocab], vec![0f32; vocab]),
            |(q, pt), (((z, zt), d), &tgt)| {
                let lse = softmax_into(z, 1.0, d); // d = softmax(z)
                let nll = lse - z[tgt as usize] as f64;
                let lse_q = if temp == 1.0 {
                    q.copy_from_slice(d);
                    lse
                } else {
                    softmax_into(z, temp, q)
                };
                let lse_t = softmax_into(zt, temp, pt);
                // KL = sum pt (log pt - log q) = sum pt (zt - z) / T + lse_q - lse_t.
                let cross: f64 = pt
                    .chunks(1024)
                    .zip(zt.chunks(1024).zip(z.chunks(1024)))
                    .map(|(p, (a, b))| {
                        p.iter()
                            .zip(a.iter().zip(b))
                            .map(|(&p, (&a, &b))| p * (a - b))
                            .sum::<f32>() as f64
                    })
                    .sum();
                let kl = (cross / temp as f64 + lse_q - lse_t).max(0.0);
                let (hard, soft) = (scale * (1.0 - alpha), scale * alpha * temp);
                for (o, (&qi, &pi)) in d.iter_mut().zip(q.iter().zip(pt.iter())) {
                    *o = hard * *o + soft * (qi - pi);
                }
                d[tgt as usize] -= hard;
                (nll, kl)
            },
        )
        .collect()
}

/// Distillation with candle ops (any device): per-row NLL and KL, and the logits' gradient.
fn distill_ops(
    logits: &Tensor,
    teacher_logits: &Tensor,
    targets: &Tensor,
    alpha: f64,
    temp: f64,
    scale: f64,
) -> Result<(Vec<f64>, Vec<f64>, Tensor)> {
    use candle_nn::ops::log_softmax;
    let log_p = log_softmax(logits, D::Minus1)?;
    let nll: Vec<f64> = log_p
        .gather(&targets.unsqueeze(1)?, 1)?
        .neg()?
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1()?;
    let log_q = log_softmax(&(logits / temp)?, D::Minus1)?;
    let log_pt = log_softmax(&(teacher_logits / temp)?, D::Minus1)?;
    let pt = log_pt.exp()?;
    let kl: Vec<f64> = (&pt * (&log_pt - &log_q)?)?
        .sum(D::Minus1)?
        .to_dtype(DType::F64)?
        .to_vec1()?;
    let hard = (log_p.exp()? * (scale * (1.0 - alpha)))?;
    let minus = Tensor::full(
        -(scale * (1.0 - alpha)) as f32,
        (targets.dim(0)?, 1),
        logits.device(),
    )?
    .to_dtype(hard.dtype())?;
    let hard = hard.scatter_add(&targets.unsqueeze(1)?, &minus, 1)?;
    let soft = ((log_q.exp()? - pt)? * (scale * alpha * temp))?;
    Ok((nll, kl, (hard + soft)?))
}

/// Same as [`softmax_xent_cpu`] with candle ops (any device).
fn softmax_xent_ops(
    logits: &Tensor,
    targets: &Tensor,
    scale: f64,
    grad: bool,
) -> Result<(Vec<f64>, Option<Tensor>)> {
    let lse = logits.max_keepdim(D::Minus1)?;
    let lse = (logits
        .broadcast_sub(&lse)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + lse)?;
    let picked = logits.gather(&targets.unsqueeze(1)?, 1)?;
    let nll: Vec<f64> = (lse.clone() - picked)?
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    if !grad {
        return Ok((nll, None));
    }
    let p = (logits.broadcast_sub(&lse)?.exp()? * scale)?;
    let minus =
        Tensor::full(-scale as f32, (targets.dim(0)?, 1), logits.device())?.to_dtype(p.dtype())?;
    Ok((nll, Some(p.scatter_add(&targets.unsqueeze(1)?, &minus, 1)?)))
}

/// Hands a precomputed gradient to autograd: the forward is a scalar zero (it never reads its
/// input), the backward returns `grad * upstream`. `x + inject(x, g)` has x's value and adds g to
/// x's gradient without materializing `x * g` the way a surrogate `sum(x * g)` term would.
struct InjectGrad {
    grad: Tensor,
}

impl candle_core::CustomOp1 for InjectGrad {
    fn name(&self) -> &'static str {
        "tern-inject-grad"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        _l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as C;
        let zero = match s {
            C::F32(_) => C::F32(vec![0.0]),
            C::F64(_) => C::F64(vec![0.0]),
            _ => candle_core::bail!("inject-grad: f32 or f64 only"),
        };
        Ok((zero, candle_core::Shape::from(())))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.grad.broadcast_mul(grad_res)?))
    }
}

fn inject(x: &Tensor, grad: Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        return Ok(x.apply_op1(InjectGrad { grad })?);
    }
    // Elsewhere: a surrogate whose gradient is `grad` and whose value is cancelled.
    let s = (x * &grad)?.sum_all()?;
    Ok((&s - s.detach())?)
}

/// Mean next-token NLL of hidden states `h: [N, H]` under head `w: [V, H]` for `targets: [N]`,
/// differentiable w.r.t. `h` and `w`, computed `chunk` tokens at a time. `dW` is formed with one
/// GEMM per group of chunks (~256 MB of dlogits), not one `[V, H]` addition per chunk.
pub fn lm_head_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    let group_rows = (256usize << 20) / (4 * w.dim(0)?.max(1));
    Ok(lm_head_cross_entropy_grouped(h, w, &w.detach(), targets, chunk, group_rows, None)?.0)
}

/// [`lm_head_cross_entropy`] under a ternary head given by its latent weight: the projected
/// head exists only while the loss is computed (not kept by autograd until the backward, 622 MB
/// at Qwen3's vocabulary and hidden 1024), and `dW` goes straight to the latent (STE).
pub fn lm_head_cross_entropy_ste(
    h: &Tensor,
    w_latent: &Tensor,
    quant: &crate::quant::QuantConfig,
    targets: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    // Mixed precision: the head GEMMs run in h's dtype (bf16), the softmax and dW in the latent's.
    let wq = super::Kernels::Fused
        .effective_weight(&w_latent.detach(), quant)?
        .to_dtype(h.dtype())?;
    let group_rows = (256usize << 20) / (4 * w_latent.dim(0)?.max(1));
    Ok(lm_head_cross_entropy_grouped(h, w_latent, &wq, targets, chunk, group_rows, None)?.0)
}

/// [`lm_head_cross_entropy_ste`] with a frozen teacher: the loss is `(1 - a) CE + a T^2 KL`,
/// chunked the same way; also returns the mean CE and KL.
pub fn lm_head_distill_ste(
    h: &Tensor,
    w_latent: &Tensor,
    quant: &crate::quant::QuantConfig,
    targets: &Tensor,
    chunk: usize,
    teacher: &Teacher,
) -> Result<(Tensor, LossParts)> {
    let wq = super::Kernels::Fused
        .effective_weight(&w_latent.detach(), quant)?
        .to_dtype(h.dtype())?;
    // Two [chunk, V] logit buffers per chunk: the groups of dlogits are halved to match.
    let group_rows = (128usize << 20) / (4 * w_latent.dim(0)?.max(1));
    lm_head_cross_entropy_grouped(h, w_latent, &wq, targets, chunk, group_rows, Some(teacher))
}

/// `w` receives the gradient; `w_compute` (detached, same shape) is what the logits use. With
/// mixed precision `h` and `w_compute` are bf16 and `w` f32: the GEMMs run in bf16, the logits'
/// softmax, the loss and the accumulated `dW` in f32. With a teacher, each chunk's teacher
/// logits are formed beside the student's and the loss is the distillation loss.
fn lm_head_cross_entropy_grouped(
    h: &Tensor,
    w: &Tensor,
    w_compute: &Tensor,
    targets: &Tensor,
    chunk: usize,
    group_rows: usize,
    teacher: Option<&Teacher>,
) -> Result<(Tensor, LossParts)> {
    let (n, _) = h.dims2()?;
    let (vocab, hidden) = w.dims2()?;
    if w_compute.dims() != w.dims() {
        return Err(Error::Msg(format!(
            "lm head: weight shapes {:?} and {:?} differ",
            w.dims(),
            w_compute.dims()
        )));
    }
    let hd = h.detach();
    let wd = w_compute.detach();
    let tgt_all = targets.to_dtype(DType::U32)?;
    let tgt_host: Vec<u32> = tgt_all.to_device(&Device::Cpu)?.to_vec1()?;
    check_targets(&tgt_host, vocab)?;
    let scale = 1.0 / n.max(1) as f64;
    let chunk = chunk.max(1);
    let group = group_rows.max(chunk) / chunk * chunk;
    let mut nll = 0f64;
    let mut kl = 0f64;
    let mut dh_parts = Vec::with_capacity(n.div_ceil(chunk));
    let mut dw: Option<Tensor> = None;
    let wt = wd.t()?;
    if let Some(t) = teacher {
        if t.h.dim(0)? != n || t.w.dim(0)? != vocab {
            return Err(Error::Msg(format!(
                "distillation: teacher hidden states {:?} / head {:?} do not match {n} tokens x vocabulary {vocab}",
                t.h.dims(),
                t.w.dims()
            )));
        }
    }
    let teacher_wt = teacher.map(|t| t.w.detach().t()).transpose()?;
    for g0 in (0..n).step_by(group) {
        let gn = group.min(n - g0);
        let mut dl_parts = Vec::with_capacity(gn.div_ceil(chunk));
        for start in (g0..g0 + gn).step_by(chunk) {
            let c = chunk.min(g0 + gn - start);
            let logits = hd.narrow(0, start, c)?.matmul(&wt)?.to_dtype(w.dtype())?;
            if let (Some(t), Some(twt)) = (teacher, &teacher_wt) {
                let zt =
                    t.h.detach()
                        .narrow(0, start, c)?
                        .matmul(twt)?
                        .to_dtype(w.dtype())?;
                let (a, temp) = (t.alpha, t.temperature);
                let (rows, dlogits) = if logits.device().is_cpu() && logits.dtype() == DType::F32 {
                    let z = logits.flatten_all()?.to_vec1::<f32>()?;
                    let zt = zt.flatten_all()?.to_vec1::<f32>()?;
                    drop(logits);
                    let mut d = vec![0f32; c * vocab];
                    let rows = distill_cpu(
                        &z,
                        &zt,
                        vocab,
                        &tgt_host[start..start + c],
                        a as f32,
                        temp as f32,
                        scale as f32,
                        &mut d,
                    );
                    (rows, Tensor::from_vec(d, (c, vocab), &Device::Cpu)?)
                } else {
                    let (nl, k, d) =
                        distill_ops(&logits, &zt, &tgt_all.narrow(0, start, c)?, a, temp, scale)?;
                    (nl.into_iter().zip(k).collect(), d)
                };
                for (nl, k) in rows {
                    nll += nl;
                    kl += k;
                }
                let dlogits = dlogits.to_dtype(wd.dtype())?;
                dh_parts.push(dlogits.matmul(&wd)?);
                dl_parts.push(dlogits);
                continue;
            }
            let (chunk_nll, dlogits) = if logits.device().is_cpu() && logits.dtype() == DType::F32 {
                let flat = logits.flatten_all()?.to_vec1::<f32>()?;
                drop(logits);
                let mut d = vec![0f32; c * vocab];
                let l: f64 = softmax_xent_cpu(
                    &flat,
                    vocab,
                    &tgt_host[start..start + c],
                    scale as f32,
                    Some(&mut d),
                )
                .iter()
                .sum();
                (l, Tensor::from_vec(d, (c, vocab), &Device::Cpu)?)
            } else {
                let (l, d) = softmax_xent_ops(&logits, &tgt_all.narrow(0, start, c)?, scale, true)?;
                (l.iter().sum::<f64>(), d.expect("grad requested"))
            };
            nll += chunk_nll;
            let dlogits = dlogits.to_dtype(wd.dtype())?;
            dh_parts.push(dlogits.matmul(&wd)?);
            dl_parts.push(dlogits);
        }
        let dl = if dl_parts.len() == 1 {
            dl_parts.pop().expect("one part")
        } else {
            Tensor::cat(&dl_parts, 0)?
        };
        drop(dl_parts);
        let part = dl
            .t()?
            .matmul(&hd.narrow(0, g0, gn)?)?
            .to_dtype(w.dtype())?;
        dw = Some(match dw {
            None => part,
            Some(acc) => (acc + part)?,
        });
    }
    let dh = Tensor::cat(&dh_parts, 0)?;
    let dw = match dw {
        Some(d) => d,
        None => Tensor::zeros((vocab, hidden), w.dtype(), w.device())?,
    };
    let parts = LossParts {
        ce: nll * scale,
        kl: kl * scale,
        hidden: 0.0,
    };
    let loss = match teacher {
        Some(t) => (1.0 - t.alpha) * parts.ce + t.alpha * t.temperature.powi(2) * parts.kl,
        None => parts.ce,
    };
    let value = Tensor::new(loss as f32, h.device())?.to_dtype(w.dtype())?;
    let through_h = inject(h, dh)?.to_dtype(w.dtype())?;
    Ok((((value + through_h)? + inject(w, dw)?)?, parts))
}

/// NLL of each row of already computed logits `[c, vocab]` (row-major) for `targets`.
pub fn nll_of_logits(logits: &[f32], vocab: usize, targets: &[u32]) -> Result<Vec<f64>> {
    check_targets(targets, vocab)?;
    Ok(softmax_xent_cpu(logits, vocab, targets, 1.0, None))
}

/// Next-token NLL of every row (no gradient), chunked: for evaluation.
pub fn lm_head_token_nll(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunk: usize,
) -> Result<Vec<f64>> {
    let (n, _) = h.dims2()?;
    let vocab = w.dim(0)?;
    let wt = w.detach().t()?;
    let tgt_all = targets.to_dtype(DType::U32)?;
    let tgt_host: Vec<u32> = tgt_all.to_device(&Device::Cpu)?.to_vec1()?;
    check_targets(&tgt_host, vocab)?;
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(chunk.max(1)) {
        let c = chunk.min(n - start);
        let logits = h.detach().narrow(0, start, c)?.matmul(&wt)?;
        out.extend(
            if logits.device().is_cpu() && logits.dtype() == DType::F32 {
                softmax_xent_cpu(
                    &logits.flatten_all()?.to_vec1::<f32>()?,
                    vocab,
                    &tgt_host[start..start + c],
                    1.0,
                    None,
                )
            } else {
                softmax_xent_ops(&logits, &tgt_all.narrow(0, start, c)?, 1.0, false)?.0
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::max_abs_diff;
    use candle_core::Var;

    fn check(n: usize, hidden: usize, vocab: usize, chunk: usize, group: usize) {
        let dev = Device::Cpu;
        let h = Var::from_tensor(
            &(Tensor::randn(0f32, 1.0, (n, hidden), &dev).unwrap() * 2.0).unwrap(),
        )
        .unwrap();
        let w =
            Var::from_tensor(&Tensor::randn(0f32, 0.5, (vocab, hidden), &dev).unwrap()).unwrap();
        let tgt: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % vocab as u32).collect();
        let tgt = Tensor::new(tgt.as_slice(), &dev).unwrap();
        let r = reference_loss(h.as_tensor(), w.as_tensor(), &tgt).unwrap();
        let f = lm_head_cross_entropy_grouped(
            h.as_tensor(),
            w.as_tensor(),
            &w.as_tensor().detach(),
            &tgt,
            chunk,
            group,
            None,
        )
        .unwrap()
        .0;
        let (rv, fv) = (r.to_scalar::<f32>().unwrap(), f.to_scalar::<f32>().unwrap());
        assert!(
            (rv - fv).abs() <= 1e-5 * rv.abs().max(1.0),
            "loss {rv} vs {fv}"
        );
        let nll: f64 = lm_head_token_nll(h.as_tensor(), w.as_tensor(), &tgt, chunk)
            .unwrap()
            .iter()
            .sum();
        assert!((nll / n as f64 - rv as f64).abs() < 1e-5 * (rv as f64).max(1.0));
        let (gr, gf) = (r.backward().unwrap(), f.backward().unwrap());
        for v in [&h, &w] {
            let a = gr.get(v.as_tensor()).unwrap();
            let b = gf.get(v.as_tensor()).unwrap();
            let d = max_abs_diff(a, b);
            assert!(d < 1e-5, "grad max |diff| {d} (n={n}, chunk={chunk})");
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        for i in 0..200_000 {
            let x = -87.0 + i as f32 * (87.0 + 88.0) / 200_000.0;
            let (a, b) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max((a - b).abs() / b);
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NEG_INFINITY) < 1e-37);
    }

    /// The chunked distillation loss equals the full-logits reference: value, the CE and KL parts,
    /// and the gradients of h and W (never of the frozen teacher), at T = 1 and T = 2.
    fn check_distill(
        n: usize,
        hidden: usize,
        vocab: usize,
        chunk: usize,
        group: usize,
        a: f64,
        t: f64,
    ) {
        let dev = Device::Cpu;
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.5, (n, hidden), &dev).unwrap()).unwrap();
        let w =
            Var::from_tensor(&Tensor::randn(0f32, 0.5, (vocab, hidden), &dev).unwrap()).unwrap();
        let ht = Tensor::randn(0f32, 1.5, (n, hidden + 3), &dev).unwrap();
        let wt = Tensor::randn(0f32, 0.5, (vocab, hidden + 3), &dev).unwrap();
        let tgt: Vec<u32> = (0..n as u32)
            .map(|i| (i * 7919 + 3) % vocab as u32)
            .collect();
        let tgt = Tensor::new(tgt.as_slice(), &dev).unwrap();
        let teacher = Teacher {
            h: &ht,
            w: &wt,
            alpha: a,
            temperature: t,
        };
        let r = distill_reference_loss(h.as_tensor(), w.as_tensor(), &tgt, &teacher).unwrap();
        let (f, parts) = lm_head_cross_entropy_grouped(
            h.as_tensor(),
            w.as_tensor(),
            &w.as_tensor().detach(),
            &tgt,
            chunk,
            group,
            Some(&teacher),
        )
        .unwrap();
        let (rv, fv) = (r.to_scalar::<f32>().unwrap(), f.to_scalar::<f32>().unwrap());
        assert!(
            (rv - fv).abs() <= 2e-5 * rv.abs().max(1.0),
            "loss {rv} vs {fv}"
        );
        let ce = reference_loss(h.as_tensor(), w.as_tensor(), &tgt)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            (parts.ce - ce as f64).abs() < 1e-4,
            "ce {} vs {ce}",
            parts.ce
        );
        let recombined = (1.0 - a) * parts.ce + a * t * t * parts.kl;
        assert!((recombined - rv as f64).abs() < 1e-4 * (rv as f64).max(1.0));
        assert!(parts.kl > 0.0);
        let (gr, gf) = (r.backward().unwrap(), f.backward().unwrap());
        for v in [&h, &w] {
            let a = gr.get(v.as_tensor()).unwrap();
            let b = gf.get(v.as_tensor()).unwrap();
            let d = max_abs_diff(a, b);
            assert!(
                d < 2e-5,
                "grad max |diff| {d} (n={n}, chunk={chunk}, T={t})"
            );
        }
    }

    #[test]
    fn chunked_distillation_equals_the_full_logits_reference() {
        check_distill(37, 16, 1000, 8, 16, 0.5, 1.0); // partial chunks and groups
        check_distill(37, 16, 1000, 64, 1 << 20, 0.3, 2.0); // one chunk, temperature 2
        check_distill(5, 8, 50, 1, 2, 1.0, 1.5); // the soft term alone
    }

    #[test]
    fn fused_chunks_equal_the_plain_loss_and_gradients() {
        check(37, 16, 1000, 8, 1 << 20); // last chunk partial, one group
        check(37, 16, 1000, 8, 16); // groups of 2 chunks, last group partial
        check(64, 24, 3001, 64, 1 << 20); // one chunk
        check(5, 8, 50, 1, 2);
    }
}
