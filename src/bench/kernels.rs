//! `tern bench kernels`: every fused kernel against its plain reference, forward + backward, at
//! training sizes: median wall time and peak extra heap (needs the binary's counting allocator,
//! `mem::Counting`; elsewhere the memory column reads 0).

use crate::error::Result;
use crate::kernels::rope::Rope;
use crate::kernels::{cross_entropy, flash_attention, norm, rope, Kernels};
use crate::quant::QuantConfig;
use crate::train::optim::{AdamW, AdamWConfig, Grads};
use candle_core::{DType, Device, Tensor, Var};
use std::time::Instant;

/// Sizes of one benchmark run.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub name: &'static str,
    pub batch: usize,
    pub seq: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
}

impl Sizes {
    /// configs/tiny.toml's model and batch (its own 8,192-token vocabulary since session 5).
    pub fn tiny() -> Self {
        Self {
            name: "tiny",
            batch: 8,
            seq: 128,
            hidden: 128,
            intermediate: 384,
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            vocab: 8_192,
        }
    }
    /// One Qwen3-0.6B layer (and its head) at batch 1, seq 512.
    pub fn qwen3_0_6b() -> Self {
        Self {
            name: "qwen3-0.6b",
            batch: 1,
            seq: 512,
            hidden: 1024,
            intermediate: 3072,
            heads: 16,
            kv_heads: 8,
            head_dim: 128,
            vocab: 151_936,
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(Self::tiny()),
            "qwen3-0.6b" => Ok(Self::qwen3_0_6b()),
            o => Err(crate::Error::Msg(format!(
                "--size: expected 'tiny' or 'qwen3-0.6b', found '{o}'"
            ))),
        }
    }
}

/// One measured kernel: fused and reference, seconds (median) and peak extra heap bytes.
#[derive(Debug, Clone)]
pub struct Row {
    pub kernel: String,
    pub shape: String,
    pub fused_s: f64,
    pub reference_s: f64,
    pub fused_bytes: usize,
    pub reference_bytes: usize,
}

fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

fn var(shape: &[usize], seed: u64) -> Result<Var> {
    Ok(Var::from_tensor(&randn(shape, seed)?)?)
}

/// Runs `f` (e.g. forward + backward) `reps` times after one warm-up: median seconds, peak extra heap.
pub fn measure(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, usize)> {
    f()?;
    let mut times = Vec::with_capacity(reps);
    let base = crate::mem::heap_now();
    crate::mem::reset_heap_peak();
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    let peak = crate::mem::heap_peak().saturating_sub(base);
    times.sort_by(|a, b| a.total_cmp(b));
    Ok((times[times.len() / 2], peak))
}

/// Forward, a loss that weights every output differently, backward.
fn fwd_bwd(out: Tensor, w: &Tensor) -> Result<()> {
    let loss = (out * w)?.sum_all()?;
    let g = loss.backward()?;
    drop(g);
    Ok(())
}

fn row(
    kernel: &str,
    shape: String,
    reps: usize,
    mut fused: impl FnMut() -> Result<()>,
    mut reference: impl FnMut() -> Result<()>,
) -> Result<Row> {
    let (fused_s, fused_bytes) = measure(reps, &mut fused)?;
    let (reference_s, reference_bytes) = measure(reps, &mut reference)?;
    Ok(Row {
        kernel: kernel.into(),
        shape,
        fused_s,
        reference_s,
        fused_bytes,
        reference_bytes,
    })
}

/// Every kernel at `s`, `reps` timed repetitions each.
pub fn run(s: Sizes, reps: usize) -> Result<Vec<Row>> {
    let n = s.batch * s.seq;
    let mut rows = Vec::new();

    let x = var(&[n, s.hidden], 1)?;
    let g = var(&[s.hidden], 2)?;
    let b = var(&[s.hidden], 3)?;
    let wy = randn(&[n, s.hidden], 4)?;
    rows.push(row(
        "rms_norm",
        format!("[{n}, {}]", s.hidden),
        reps,
        || fwd_bwd(norm::rms_norm(x.as_tensor(), g.as_tensor(), 1e-6)?, &wy),
        || {
            fwd_bwd(
                norm::rms_norm_reference(x.as_tensor(), g.as_tensor(), 1e-6)?,
                &wy,
            )
        },
    )?);
    rows.push(row(
        "layer_norm",
        format!("[{n}, {}]", s.hidden),
        reps,
        || {
            fwd_bwd(
                norm::layer_norm(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5)?,
                &wy,
            )
        },
        || {
            fwd_bwd(
                norm::layer_norm_reference(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5)?,
                &wy,
            )
        },
    )?);

    let (nh, kv, hd) = (s.heads, s.kv_heads, s.head_dim);
    let xr = var(&[s.batch, s.seq, nh, hd], 5)?;
    let positions: Vec<u32> = (0..s.seq as u32).collect();
    let (cos, sin) = Rope::new(hd, 1e6).cos_sin(&positions, DType::F32, &Device::Cpu)?;
    let wr = randn(&[s.batch, nh, s.seq, hd], 6)?;
    rows.push(row(
        "rope (+ head transpose)",
        format!("[{}, {}, {nh}, {hd}]", s.batch, s.seq),
        reps,
        || fwd_bwd(rope::rope_transposed(xr.as_tensor(), &cos, &sin)?, &wr),
        || {
            fwd_bwd(
                rope::rope_transposed_reference(xr.as_tensor(), &cos, &sin)?,
                &wr,
            )
        },
    )?);

    let q = var(&[s.batch, nh, s.seq, hd], 7)?;
    let k = var(&[s.batch, kv, s.seq, hd], 8)?;
    let v = var(&[s.batch, kv, s.seq, hd], 9)?;
    let cfg = flash_attention::FlashConfig::default();
    rows.push(row(
        "flash attention (causal, GQA)",
        format!("q [{}, {nh}, {}, {hd}], kv {kv}", s.batch, s.seq),
        reps,
        || {
            fwd_bwd(
                flash_attention::flash_attention(
                    q.as_tensor(),
                    k.as_tensor(),
                    v.as_tensor(),
                    &cfg,
                )?,
                &wr,
            )
        },
        || {
            fwd_bwd(
                flash_attention::attention_reference(
                    q.as_tensor(),
                    k.as_tensor(),
                    v.as_tensor(),
                    &cfg,
                )?,
                &wr,
            )
        },
    )?);

    let h = var(&[n, s.hidden], 10)?;
    let head = Var::from_tensor(&(randn(&[s.vocab, s.hidden], 11)? * 0.05)?)?;
    let targets = Tensor::from_vec(
        (0..n as u32)
            .map(|i| (i * 7919) % s.vocab as u32)
            .collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )?;
    let chunk = cross_entropy::default_chunk(s.vocab);
    let quant = QuantConfig::default();
    let one = Tensor::new(1f32, &Device::Cpu)?;
    rows.push(row(
        "LM head + cross-entropy (ternary head)",
        format!("h [{n}, {}], W [{}, {}]", s.hidden, s.vocab, s.hidden),
        reps,
        || {
            fwd_bwd(
                cross_entropy::lm_head_cross_entropy_ste(
                    h.as_tensor(),
                    head.as_tensor(),
                    &quant,
                    &targets,
                    chunk,
                )?,
                &one,
            )
        },
        || {
            let wq = Kernels::Reference.effective_weight(head.as_tensor(), &quant)?;
            fwd_bwd(
                cross_entropy::reference_loss(h.as_tensor(), &wq, &targets)?,
                &one,
            )
        },
    )?);

    let w = Var::from_tensor(&(randn(&[s.intermediate, s.hidden], 12)? * 0.05)?)?;
    let ww = randn(&[s.intermediate, s.hidden], 13)?;
    rows.push(row(
        "ternary projection + STE",
        format!("[{}, {}]", s.intermediate, s.hidden),
        reps,
        || fwd_bwd(Kernels::Fused.effective_weight(w.as_tensor(), &quant)?, &ww),
        || {
            fwd_bwd(
                Kernels::Reference.effective_weight(w.as_tensor(), &quant)?,
                &ww,
            )
        },
    )?);
    let wl = randn(&[n, s.intermediate], 14)?;
    rows.push(row(
        "ternary linear (projection + GEMM)",
        format!(
            "x [{n}, {}], W [{}, {}]",
            s.hidden, s.intermediate, s.hidden
        ),
        reps,
        || {
            fwd_bwd(
                Kernels::Fused.ternary_linear(x.as_tensor(), w.as_tensor(), &quant)?,
                &wl,
            )
        },
        || {
            fwd_bwd(
                Kernels::Reference.ternary_linear(x.as_tensor(), w.as_tensor(), &quant)?,
                &wl,
            )
        },
    )?);

    let params = crate::model::params::Params::from_tensors([(
        "model.embed_tokens.weight".to_string(),
        randn(&[s.vocab, s.hidden], 15)?,
    )])?;
    let mut grads = Grads::new();
    grads.insert(
        "model.embed_tokens.weight".into(),
        randn(&[s.vocab, s.hidden], 16)?,
    );
    let adam = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let (mut fused_opt, mut plain_opt) = (AdamW::new(adam), AdamW::new(adam));
    plain_opt.kernels = Kernels::Reference;
    rows.push(row(
        "AdamW step",
        format!("[{}, {}]", s.vocab, s.hidden),
        reps,
        || fused_opt.step(&params, &grads, 1e-3),
        || plain_opt.step(&params, &grads, 1e-3),
    )?);
    Ok(rows)
}

/// The rows as a markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    let mut out = String::from(
        "| kernel (fwd+bwd) | shape | fused ms | reference ms | speed-up | fused peak MiB | reference peak MiB |\n|---|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2}x | {:.1} | {:.1} |\n",
            r.kernel,
            r.shape,
            r.fused_s * 1e3,
            r.reference_s * 1e3,
            r.reference_s / r.fused_s.max(1e-12),
            mib(r.fused_bytes),
            mib(r.reference_bytes)
        ));
    }
    out
}
