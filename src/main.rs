//! The `tern` command line. Subcommands grow as the issues land; each one that exists works.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use clap::{Parser, Subcommand};
use std::time::Instant;
use tern::model::{params::Params, Qwen3, Qwen3Config};
use tern::ternary::{QuantConfig, ScaleRule};

#[derive(Parser)]
#[command(name = "tern", version, about = "Train, run and export ternary Qwen3 models")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Benchmarks (figures for NOTES.md).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// One training step (forward + loss + backward) at a given architecture, scratch init:
    /// prints wall time per phase and peak resident memory.
    Step {
        /// `qwen3-0.6b`, or a path to an HF config.json.
        #[arg(long, default_value = "qwen3-0.6b")]
        arch: String,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        /// Steps to time (the first one is reported separately as warm-up).
        #[arg(long, default_value_t = 2)]
        steps: usize,
        #[arg(long, default_value = "ternary")]
        precision: String,
        #[arg(long, default_value_t = 128)]
        group_size: usize,
        #[arg(long, default_value = "mean_abs")]
        scale: String,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn arch_config(arch: &str) -> Result<Qwen3Config> {
    match arch {
        "qwen3-0.6b" => Ok(Qwen3Config::qwen3_0_6b()),
        path => Ok(Qwen3Config::from_json_file(std::path::Path::new(path))
            .with_context(|| format!("--arch '{path}': expected 'qwen3-0.6b' or a config.json path"))?),
    }
}

fn parse_precision(p: &str) -> Result<bool> {
    match p {
        "ternary" => Ok(true),
        "full" => Ok(false),
        o => anyhow::bail!("--precision: expected 'ternary' or 'full', found '{o}'"),
    }
}

#[allow(clippy::too_many_arguments)]
fn bench_step(
    arch: &str,
    batch: usize,
    seq: usize,
    steps: usize,
    precision: &str,
    group_size: usize,
    scale: &str,
    device: &str,
    seed: u64,
) -> Result<()> {
    let cfg = arch_config(arch)?;
    let device = tern::device::parse_device(device)?;
    let quant = QuantConfig {
        ternary: parse_precision(precision)?,
        group_size,
        scale: scale.parse::<ScaleRule>()?,
        ramp: 1.0,
    };
    quant.validate()?;
    anyhow::ensure!(batch > 0 && seq > 0 && steps > 0, "--batch, --seq and --steps must be positive");
    let t0 = Instant::now();
    let params = Params::scratch(&cfg, seed, DType::F32, &device)?;
    let model = Qwen3::new(&cfg, quant, &params)?;
    let init_s = t0.elapsed().as_secs_f64();
    println!(
        "arch {arch}: {} params, {} layers, hidden {}, vocab {}; {} on {}; batch {batch} seq {seq}",
        params.num_elements(),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.vocab_size,
        precision,
        tern::device::device_name(&device)
    );
    println!("init {init_s:.2}s, rss after init {:.2} GiB", tern::mem::gib(tern::mem::rss_bytes().unwrap_or(0)));
    let n = batch * (seq + 1);
    let ids: Vec<u32> = (0..n).map(|i| ((i as u64 * 2_654_435_761 + seed) % cfg.vocab_size as u64) as u32).collect();
    let ids = Tensor::from_vec(ids, (batch, seq + 1), &device)?;
    let (inp, tgt) = (ids.narrow(1, 0, seq)?, ids.narrow(1, 1, seq)?);
    for step in 0..steps {
        let t = Instant::now();
        let logits = model.forward(&inp)?;
        let loss = candle_nn::loss::cross_entropy(&logits.flatten_to(1)?, &tgt.flatten_all()?)?;
        let loss_v = loss.to_scalar::<f32>()?;
        let fwd = t.elapsed().as_secs_f64();
        let grads = loss.backward()?;
        let total = t.elapsed().as_secs_f64();
        let with_grad = params.iter().filter(|(_, v)| grads.get(v.as_tensor()).is_some()).count();
        drop(grads);
        println!(
            "step {step}{}: loss {loss_v:.4}, forward {fwd:.2}s, backward {:.2}s, total {total:.2}s, \
             {:.0} tokens/s, params with grad {with_grad}/{}, peak rss {:.2} GiB",
            if step == 0 { " (warm-up)" } else { "" },
            total - fwd,
            (batch * seq) as f64 / total,
            params.len(),
            tern::mem::gib(tern::mem::peak_rss_bytes().unwrap_or(0)),
        );
    }
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Bench { what } => match what {
            BenchCmd::Step { arch, batch, seq, steps, precision, group_size, scale, device, seed } => {
                bench_step(&arch, batch, seq, steps, &precision, group_size, &scale, &device, seed)
            }
        },
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
