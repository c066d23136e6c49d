//! The training loop, nanoGPT-style: one function you can read top to bottom.
//!
//! per step: lambda (STE ramp) and lr from the schedule -> grad_accum_steps micro-batches of
//! forward + cross-entropy + backward, gradients summed -> global grad norm (logged before
//! clipping) -> NaN/Inf guard (skip the update; stop after 5 in a row) -> clip -> AdamW ->
//! metrics -> periodic eval and checkpoint -> Ctrl-C check.

use super::checkpoint::{self, CheckpointParts, RunState};
use super::config::TrainConfig;
use super::optim::{AdamW, AdamWConfig};
use super::schedule::{lr_at, ramp_for};
use super::step::{train_step, Distill, Objective, StepConfig};
use crate::data::{load_split, Batcher};
use crate::device::parse_device;
use crate::error::{Error, Result};
use crate::model::params::{is_norm, Params};
use crate::model::{load_checkpoint, Model, ModelConfig};
use crate::quant::verify::{verify_projected, TernaryReport};
use crate::quant::QuantConfig;
use crate::source;
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Non-finite updates in a row after which the run stops.
pub const MAX_BAD_STEPS: usize = 5;

/// Prompts of the samples printed at the end of a run.
pub const SAMPLE_PROMPTS: [&str; 3] = [
    "A compiler is",
    "The Internet",
    "In computer science, a stack",
];

#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    Continue,
    Stop,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub tokens_per_sec: f64,
    pub elapsed_s: f64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// With distillation: the step's mean cross-entropy and KL(teacher || student).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ce: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    /// With hidden-state distillation: its term before the weight.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden: Option<f64>,
}

/// A callback after every step (tests stop runs with it).
pub type OnStep = Box<dyn FnMut(&StepMetrics) -> Control>;

/// (step, value) pairs of a metric.
pub type Curve = Vec<(usize, f64)>;

pub struct TrainOptions {
    /// Resume from the newest checkpoint under this out_dir (or this checkpoint directory).
    pub resume: Option<PathBuf>,
    /// Set by Ctrl-C: finish the current step, save a checkpoint, return `interrupted`.
    pub interrupt: Arc<AtomicBool>,
    /// Called after every step; `Control::Stop` ends the run like an interrupt.
    pub on_step: Option<OnStep>,
    pub progress: bool,
    /// Generate the end-of-run samples (needs the tokenizer's decoder).
    pub samples: bool,
    /// Fault injection for tests of the NaN guard: the loss of these steps is made NaN.
    pub fault_nan_steps: BTreeSet<usize>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            resume: None,
            interrupt: Arc::new(AtomicBool::new(false)),
            on_step: None,
            progress: false,
            samples: true,
            fault_nan_steps: BTreeSet::new(),
        }
    }
}

#[derive(Debug)]
pub struct TrainOutcome {
    pub last_step: usize,
    /// (step, loss) of every step this invocation ran.
    pub losses: Vec<(usize, f64)>,
    pub val_loss: f64,
    pub val_ppl: f64,
    /// Bits per byte of the validation text (val_loss over ln 2 x bytes per scored token).
    pub val_bpb: f64,
    pub interrupted: bool,
    pub checkpoint: PathBuf,
    pub summary: serde_json::Value,
}

/// Mean NLL of the validation tokens under `windows` (the plain scheme of `tern eval` with
/// ctx = seq_len + 1), on a frozen (graph-free) copy of the model.
pub fn evaluate(
    model: &Model,
    val: &[u32],
    windows: &[crate::eval::Window],
    batch: usize,
) -> Result<f64> {
    let nll = crate::eval::score(&model.freeze()?, val, windows, batch)?;
    Ok(crate::eval::perplexity(&nll).nll)
}

/// Verifies the projection of every ternary weight (what export writes).
pub fn verify_model(
    params: &Params,
    quant: &QuantConfig,
) -> Result<(TernaryReport, Vec<(String, TernaryReport)>)> {
    let mut total = TernaryReport::default();
    let mut per = Vec::new();
    let q = QuantConfig {
        ternary: true,
        ramp: 1.0,
        ..*quant
    };
    for (name, var) in params.iter() {
        if is_norm(name) {
            continue;
        }
        // The projection itself, as export writes it: the training forward's STE value
        // `w + (t * s - w)` differs from `t * s` by float rounding (up to ~1e-6 relative, which
        // failed 4 of 1.1M groups of a 256-step SmolLM2 run).
        let w = crate::quant::project(&var.as_tensor().detach(), q.group_size, q.scale)?;
        let r = verify_projected(&w, q.group_size)?;
        total.merge(&r);
        per.push((name.clone(), r));
    }
    Ok((total, per))
}

struct Metrics {
    file: std::fs::File,
}

impl Metrics {
    /// Opens out_dir/metrics.jsonl; on resume, drops records after the resumed step.
    fn open(out_dir: &Path, keep_up_to: Option<usize>) -> Result<Self> {
        let path = out_dir.join("metrics.jsonl");
        let kept: Vec<String> = match keep_up_to {
            Some(step) => std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_some_and(|s| s as usize <= step)
                })
                .map(str::to_string)
                .collect(),
            None => vec![],
        };
        let mut file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        for l in kept {
            writeln!(file, "{l}").map_err(|e| Error::io(&path, e))?;
        }
        Ok(Self { file })
    }

    fn write(&mut self, v: &serde_json::Value) {
        // Metrics are best effort: a full disk must not kill a training run.
        let _ = writeln!(self.file, "{v}");
        let _ = self.file.flush();
    }
}

/// Records of metrics.jsonl: (step, loss) pairs and (step, val_loss) pairs.
pub fn read_metrics(out_dir: &Path) -> (Curve, Curve) {
    let text = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap_or_default();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let step = v.get("step").and_then(|s| s.as_u64()).unwrap_or(0) as usize;
        if let Some(l) = v.get("loss").and_then(|x| x.as_f64()) {
            train.push((step, l));
        }
        if let Some(l) = v.get("val_loss").and_then(|x| x.as_f64()) {
            val.push((step, l));
        }
    }
    (train, val)
}

/// Where the model comes from at the start of a run.
fn initial_params(
    cfg: &TrainConfig,
    tok: &Tokenizer,
    device: &Device,
) -> Result<(ModelConfig, Params)> {
    let m = &cfg.model;
    if m.is_scratch() {
        let mut arch = m.scratch_config();
        // A scratch model's BOS/EOS are its tokenizer's (a corpus-trained one numbers them 0 and 2).
        let id = |t: &str| tok.token_id(t).map(|i| serde_json::json!(i));
        arch.bos_token_id = id("<|endoftext|>").or(arch.bos_token_id);
        arch.eos_token_id = id("<|im_end|>")
            .or(id("<|endoftext|>"))
            .or(arch.eos_token_id);
        let params = Params::scratch(&arch, cfg.train.seed, DType::F32, device)?;
        return Ok((arch, params));
    }
    let src = source::load_latents(&m.source, DType::F32, device)?;
    Ok((src.config, src.params))
}

/// The training tokenizer: `data.tokenizer`, else the source model's own.
fn training_tokenizer(cfg: &TrainConfig) -> Result<Tokenizer> {
    match cfg.data.tokenizer_spec(&cfg.model) {
        Some(spec) => source::tokenizer_from_spec(&spec),
        None => source::load_tokenizer(&cfg.model.source)?.ok_or_else(|| {
            Error::Msg(format!(
                "model.source '{}' has no tokenizer (no tokenizer.json, none in the GGUF): set data.tokenizer",
                cfg.model.source
            ))
        }),
    }
}

/// The distillation teacher: the source model in full precision, frozen.
fn teacher_model(cfg: &TrainConfig, arch: &ModelConfig, device: &Device) -> Result<Model> {
    let src = source::load_latents(&cfg.model.source, DType::F32, device)?;
    if src.config.vocab_size != arch.vocab_size {
        return Err(Error::Msg(format!(
            "distillation: the teacher '{}' has vocab_size {}, the student {}",
            cfg.model.source, src.config.vocab_size, arch.vocab_size
        )));
    }
    Model::new(&src.config, QuantConfig::full_precision(), &src.params)?
        .with_kernels(cfg.train.kernels)
        .freeze()
}

fn resume_dir(path: &Path) -> Result<PathBuf> {
    if path.join(checkpoint::STATE_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    checkpoint::latest(path)?.ok_or_else(|| {
        Error::Msg(format!(
            "--resume: no complete checkpoint under {}",
            checkpoint::checkpoints_dir(path).display()
        ))
    })
}

pub fn train(cfg: &TrainConfig, mut opts: TrainOptions) -> Result<TrainOutcome> {
    let t = &cfg.train;
    let out_dir = t.out_dir.clone();
    std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
    let device = parse_device(&t.device)?;
    let tok = training_tokenizer(cfg)?;

    // Model, optimizer and position: fresh or from a checkpoint.
    let adam_cfg = AdamWConfig {
        beta1: t.beta1,
        beta2: t.beta2,
        eps: t.eps,
        weight_decay: t.weight_decay,
    };
    let resumed = opts.resume.as_deref().map(resume_dir).transpose()?;
    let (arch, params, mut opt, mut state) = match &resumed {
        Some(dir) => {
            let st = checkpoint::read_state(dir)?;
            let ck = load_checkpoint(dir, DType::F32, &device)?;
            let opt = AdamW::load(
                adam_cfg,
                st.adam_t,
                &dir.join(checkpoint::OPTIMIZER_FILE),
                &ck.params,
                &device,
            )?;
            tracing::info!("resuming from {} (step {})", dir.display(), st.step);
            (ck.config, ck.params, opt, st)
        }
        None => {
            let (arch, params) = initial_params(cfg, &tok, &device)?;
            let st = RunState {
                format: 1,
                step: 0,
                data: Default::default(),
                data_seed: cfg.data.seed,
                adam_t: 0,
                tokens_seen: 0,
                bad_steps_in_a_row: 0,
                skipped_steps: 0,
                elapsed_s: 0.0,
            };
            (arch, params, AdamW::new(adam_cfg), st)
        }
    };
    opt.kernels = cfg.train.kernels;
    let tok_max = tok.vocab_size();
    if tok_max > arch.vocab_size {
        return Err(Error::Msg(format!(
            "tokenizer {} has {tok_max} tokens but the model's vocab_size is {}",
            tok.path.display(),
            arch.vocab_size
        )));
    }
    let compute = cfg.train.dtype.for_device(&device)?;
    if compute.gemm_bf16 {
        // Which instruction: on some CPUs without AMX, vdpbf16ps runs at half the f32 FMA
        // rate (NOTES.md, scripts/dot_peak.c), so bf16 there is for its numerics, not speed.
        let kernel = crate::kernels::gemm_bf16::Bf16Kernel::detect().map(|k| k.name());
        tracing::info!("bf16 GEMMs on the CPU: {}", kernel.unwrap_or("none"));
    }
    let mut model = Model::new(&arch, compute.quant(cfg.model.quant()), &params)?
        .with_kernels(cfg.train.kernels)
        .with_compute_dtype(compute.dtype);
    let teacher = if t.distill_alpha > 0.0 || t.distill_hidden > 0.0 {
        Some(teacher_model(cfg, &arch, &device)?)
    } else {
        None
    };
    let objective = match &teacher {
        Some(teacher) => Objective::Distill(Distill {
            teacher,
            alpha: t.distill_alpha,
            temperature: t.distill_temperature,
            hidden: t.distill_hidden,
        }),
        None => Objective::CrossEntropy,
    };

    let split = load_split(
        &cfg.data.train_file,
        &tok,
        cfg.data.val_fraction,
        cfg.data.seq_len,
    )?;
    // Validation = `tern eval --split val --ctx <seq_len+1>` (all of it when eval.batches = 0).
    let all_val = crate::eval::plan(
        split.val.len(),
        cfg.data.seq_len + 1,
        None,
        crate::eval::Scheme::Plain,
    )?;
    let n_val = if cfg.eval.batches == 0 {
        all_val.len()
    } else {
        (cfg.eval.batches * t.batch_size).min(all_val.len())
    };
    let val = &all_val[..n_val];
    // Bits per byte = val loss / (ln 2 x bytes per scored token): comparable across tokenizers.
    let val_bpt = crate::eval::bytes_per_token(
        &crate::eval::scored_targets(&split.val, val),
        &tok.token_byte_lengths(),
    );
    let bpb = |loss: f64| crate::eval::bits_per_byte(loss, val_bpt);
    let mut batcher = Batcher::new(cfg.data.seq_len, cfg.data.seed);
    batcher.pos = state.data;
    let tokens_per_step = (t.batch_size * cfg.data.seq_len * t.grad_accum_steps) as u64;
    tracing::info!(
        "{} params ({}), {} train / {} val tokens, {} tokens per step",
        params.num_elements(),
        if cfg.model.ternary {
            "ternary"
        } else {
            "full precision"
        },
        split.train.len(),
        split.val.len(),
        tokens_per_step
    );

    let mut metrics = Metrics::open(&out_dir, resumed.as_ref().map(|_| state.step))?;
    let eval_and_log = |model: &Model, step: usize, metrics: &mut Metrics| -> Result<(f64, f64)> {
        let t0 = Instant::now();
        let loss = evaluate(model, &split.val, val, t.batch_size)?;
        tracing::debug!(
            "evaluation at step {step} done in {:.3}s",
            t0.elapsed().as_secs_f64()
        );
        let ppl = loss.exp();
        metrics
            .write(&json!({"step": step, "val_loss": loss, "val_ppl": ppl, "val_bpb": bpb(loss)}));
        let (train_curve, val_curve) = read_metrics(&out_dir);
        if let Err(e) =
            crate::plot::plot_losses(&out_dir.join("loss.png"), &train_curve, &val_curve)
        {
            tracing::warn!("loss.png not drawn: {e}");
        }
        Ok((loss, ppl))
    };
    let mut last_val = if resumed.is_none() {
        Some(eval_and_log(&model, 0, &mut metrics)?)
    } else {
        None
    };

    let pb = progress_bar(opts.progress, t.steps, state.step);
    let save = |state: &RunState, opt: &AdamW, model: &Model| -> Result<PathBuf> {
        let parts = CheckpointParts {
            model_cfg: &arch,
            quant: &model.quant,
            params: &params,
            tokenizer: Some(&tok),
            opt,
            train_cfg: cfg,
            state,
        };
        let dir = checkpoint::save(&out_dir, &parts)?;
        checkpoint::prune(&out_dir, cfg.checkpoint.keep)?;
        Ok(dir)
    };

    let run_start = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut losses = Vec::new();
    let mut interrupted = false;
    let mut last_ckpt = None;
    while state.step < t.steps {
        let step = state.step + 1;
        let step_start = Instant::now();
        tracing::debug!("step {step}: start");
        model.quant.ramp = ramp_for(step, t);
        let lr = lr_at(step, t);

        let batch = |batcher: &mut Batcher| -> Result<Tensor> {
            let flat = batcher.next_batch(&split.train, t.batch_size);
            Ok(Tensor::from_vec(
                flat,
                (t.batch_size, cfg.data.seq_len + 1),
                &device,
            )?)
        };
        let step_cfg = StepConfig {
            lr,
            max_grad_norm: t.max_grad_norm,
            inject_nan: opts.fault_nan_steps.contains(&step),
        };
        let r = train_step(
            &model,
            &params,
            &mut opt,
            t.grad_accum_steps,
            || batch(&mut batcher),
            step_cfg,
            objective,
        )?;
        let (loss_sum, grad_norm, finite) = (r.loss, r.grad_norm, r.applied);
        if finite {
            state.bad_steps_in_a_row = 0;
        } else {
            state.bad_steps_in_a_row += 1;
            state.skipped_steps += 1;
            say(&pb, format!("step {step}: non-finite loss or gradient (loss {loss_sum}, grad norm {grad_norm}); update skipped"));
        }
        state.step = step;
        state.tokens_seen += tokens_per_step;
        state.data = batcher.pos;
        state.adam_t = opt.t;
        state.elapsed_s = elapsed_before + run_start.elapsed().as_secs_f64();
        let dt = step_start.elapsed().as_secs_f64();
        let m = StepMetrics {
            step,
            loss: loss_sum,
            lr,
            grad_norm,
            tokens: state.tokens_seen,
            tokens_per_sec: tokens_per_step as f64 / dt,
            elapsed_s: state.elapsed_s,
            skipped: !finite,
            ce: r.parts.map(|p| p.ce),
            kl: r.parts.map(|p| p.kl),
            hidden: r.parts.map(|p| p.hidden).filter(|_| t.distill_hidden > 0.0),
        };
        metrics.write(&serde_json::to_value(&m).expect("metrics serialize"));
        losses.push((step, loss_sum));
        pb.set_position(step as u64);
        let line = format!(
            "loss {loss_sum:.4} lr {lr:.2e} gnorm {grad_norm:.3} {:.0} tok/s",
            m.tokens_per_sec
        );
        if pb.is_hidden() {
            if step % 10 == 0 || step == 1 {
                tracing::info!("step {step}/{}: {line}", t.steps);
            }
        } else {
            pb.set_message(line);
        }

        if state.bad_steps_in_a_row >= MAX_BAD_STEPS {
            let dir = save(&state, &opt, &model)?;
            pb.abandon();
            return Err(Error::Msg(format!(
                "stopping: {MAX_BAD_STEPS} steps in a row had a non-finite loss or gradient (last at step {step}); \
                 checkpoint saved at {} (try a lower train.lr or train.max_grad_norm, then --resume)",
                dir.display()
            )));
        }
        if cfg.eval.every > 0 && step % cfg.eval.every == 0 && step < t.steps {
            let (vl, vp) = eval_and_log(&model, step, &mut metrics)?;
            say(
                &pb,
                format!(
                    "step {step}: val loss {vl:.4}, val PPL {vp:.2}, {:.4} bits per byte",
                    bpb(vl)
                ),
            );
            last_val = Some((vl, vp));
        }
        if cfg.checkpoint.every > 0 && step % cfg.checkpoint.every == 0 {
            last_ckpt = Some(save(&state, &opt, &model)?);
        }
        let stop_requested = opts.on_step.as_mut().map(|f| f(&m)) == Some(Control::Stop);
        if stop_requested || opts.interrupt.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
    }
    pb.finish_and_clear();

    // End of run (or interruption): evaluate, save, verify, sample, summarize.
    let (val_loss, val_ppl) = match (interrupted, last_val) {
        (true, Some(v)) => v,
        (true, None) => (f64::NAN, f64::NAN),
        (false, _) => eval_and_log(&model, state.step, &mut metrics)?,
    };
    let ckpt = match last_ckpt {
        Some(dir) if dir.ends_with(format!("step-{:08}", state.step)) => dir,
        _ => save(&state, &opt, &model)?,
    };
    let (report, _) = verify_model(&params, &model.quant)?;
    let samples = if opts.samples && !interrupted {
        samples(&model, &tok)?
    } else {
        vec![]
    };
    let summary = summarize(
        cfg,
        &state,
        &out_dir,
        (val_loss, val_bpt),
        &report,
        &samples,
        &ckpt,
    );
    crate::files::write_atomic(
        &out_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)
            .expect("json")
            .as_bytes(),
    )?;
    Ok(TrainOutcome {
        last_step: state.step,
        losses,
        val_loss,
        val_ppl,
        val_bpb: bpb(val_loss),
        interrupted,
        checkpoint: ckpt,
        summary,
    })
}

/// Settings of the sampled end-of-run continuations: llama-cli's defaults (temperature 0.8,
/// top-k 40, top-p 0.95, min-p 0.05) with a fixed seed.
pub const SAMPLED: crate::decode::sampler::SamplerConfig = crate::decode::sampler::SamplerConfig {
    temp: 0.8,
    top_k: 40,
    top_p: 0.95,
    min_p: 0.05,
    seed: 1234,
    repeat_penalty: 1.0,
    repeat_last_n: 64,
};

/// One end-of-run sample: the prompt, its greedy continuation and a sampled one ([`SAMPLED`]).
pub struct Sample {
    pub prompt: String,
    pub greedy: String,
    pub sampled: String,
}

fn samples(model: &Model, tok: &Tokenizer) -> Result<Vec<Sample>> {
    use crate::decode::generate::{generate_batch, GenerateConfig};
    let frozen = model.freeze()?;
    let mut eos = tok.eos_ids();
    eos.extend(model.cfg.eos_ids());
    let prompts = SAMPLE_PROMPTS
        .iter()
        .map(|p| tok.encode(p))
        .collect::<Result<Vec<_>>>()?;
    let run = |sampler| -> Result<Vec<String>> {
        let cfg = GenerateConfig {
            max_new: 40,
            sampler,
            eos: eos.clone(),
        };
        let out = generate_batch(&frozen, &prompts, &cfg, |_, _| false)?;
        out.iter().map(|(ids, _)| tok.decode(ids)).collect()
    };
    let greedy = run(crate::decode::sampler::SamplerConfig {
        temp: 0.0,
        ..Default::default()
    })?;
    let sampled = run(SAMPLED)?;
    Ok(SAMPLE_PROMPTS
        .iter()
        .zip(greedy.into_iter().zip(sampled))
        .map(|(p, (greedy, sampled))| Sample {
            prompt: p.to_string(),
            greedy,
            sampled,
        })
        .collect())
}

/// summary.json; the validation PPL is exp(val_loss), as every evaluation computes it, and bits
/// per byte is val_loss / (ln 2 x `val_bpt`, the validation bytes per scored token).
fn summarize(
    cfg: &TrainConfig,
    state: &RunState,
    out_dir: &Path,
    (val_loss, val_bpt): (f64, f64),
    report: &TernaryReport,
    samples: &[Sample],
    ckpt: &Path,
) -> serde_json::Value {
    let (train, val) = read_metrics(out_dir);
    let tail: Vec<f64> = train.iter().rev().take(10).map(|x| x.1).collect();
    let shares = report.shares();
    json!({
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "skipped_steps": state.skipped_steps,
        "ternary": cfg.model.ternary,
        "train_loss_first": train.first().map(|x| x.1),
        "train_loss_last": train.last().map(|x| x.1),
        "train_loss_last10_mean": if tail.is_empty() { None } else { Some(tail.iter().sum::<f64>() / tail.len() as f64) },
        "val_loss_first": val.first().map(|x| x.1),
        "val_ppl_first": val.first().map(|x| x.1.exp()),
        "val_loss": val_loss,
        "val_ppl": val_loss.exp(),
        "val_bpb_first": val.first().map(|x| crate::eval::bits_per_byte(x.1, val_bpt)),
        "val_bpb": crate::eval::bits_per_byte(val_loss, val_bpt),
        "val_bytes_per_token": val_bpt,
        "elapsed_s": state.elapsed_s,
        "tokens_per_sec": state.tokens_seen as f64 / state.elapsed_s.max(1e-9),
        "peak_rss_gib": crate::mem::peak_rss_bytes().map(crate::mem::gib),
        "ternary_check": {
            "groups": report.groups,
            "bad_groups": report.bad_groups,
            "ok": report.ok(),
            "share_minus1": shares[0],
            "share_zero": shares[1],
            "share_plus1": shares[2],
        },
        "samples": samples.iter().map(|x| sample_json(&x.prompt, &x.greedy)).collect::<Vec<_>>(),
        "samples_sampled": samples.iter().map(|x| sample_json(&x.prompt, &x.sampled)).collect::<Vec<_>>(),
        "samples_sampled_settings": {"temp": SAMPLED.temp, "top_k": SAMPLED.top_k, "top_p": SAMPLED.top_p,
            "min_p": SAMPLED.min_p, "seed": SAMPLED.seed},
        "checkpoint": ckpt.display().to_string(),
    })
}

/// A sample with its degeneracy measures over its first 32 words: the share of distinct words
/// and the longest run of one word repeated ("the the the" = 3).
fn sample_json(prompt: &str, text: &str) -> serde_json::Value {
    let (distinct, run) = word_stats(text, 32);
    json!({"prompt": prompt, "text": text, "distinct_word_share": distinct, "longest_word_run": run})
}

/// (distinct words / words, longest run of one repeated word) over the first `n` words.
fn word_stats(text: &str, n: usize) -> (f64, usize) {
    let words: Vec<&str> = text.split_whitespace().take(n).collect();
    let distinct: std::collections::HashSet<&str> = words.iter().copied().collect();
    let (mut run, mut longest) = (0, 0);
    for (i, w) in words.iter().enumerate() {
        run = if i > 0 && words[i - 1] == *w {
            run + 1
        } else {
            1
        };
        longest = longest.max(run);
    }
    (distinct.len() as f64 / words.len().max(1) as f64, longest)
}

/// A line for the user: above the progress bar, or in the log when there is none.
fn say(pb: &indicatif::ProgressBar, msg: String) {
    if pb.is_hidden() {
        tracing::info!("{msg}");
    } else {
        pb.println(msg);
    }
}

fn progress_bar(show: bool, steps: usize, start: usize) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(steps as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise} ETA {eta}]",
        )
        .expect("valid template"),
    );
    pb.set_position(start as u64);
    pb
}

#[cfg(test)]
mod tests {
    use super::word_stats;

    #[test]
    fn word_stats_measure_distinct_words_and_the_longest_repeat() {
        assert_eq!(word_stats("the the the cat", 32), (0.5, 3));
        assert_eq!(word_stats("a b c d", 32), (1.0, 1));
        // Only the first n words count; no words at all is not a division by zero.
        assert_eq!(word_stats("x y y y y y", 3), (2.0 / 3.0, 2));
        assert_eq!(word_stats("", 32), (0.0, 0));
    }
}
