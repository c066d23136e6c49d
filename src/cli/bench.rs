//! `tern bench step|kernels|topk|decode|batch`: the measurements behind NOTES.md.

use anyhow::{Context, Result};
use std::path::PathBuf;
use tern::bench::{self, median};
use tern::kernels::{ComputeDtype, Kernels};
use tern::mem::gib;
use tern::model::ModelConfig;
use tern::quant::{QuantConfig, ScaleRule};
use tern::runtime::Precision;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelSize {
    /// configs/tiny.toml's sizes.
    Tiny,
    /// One Qwen3-0.6B layer at batch 1, seq 512.
    #[value(name = "qwen3-0.6b")]
    Qwen3_0_6b,
}

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// Fused softmax + top-k vs full softmax + sort over a Qwen3-sized vocabulary.
    Topk {
        #[arg(long, default_value_t = 151_936)]
        vocab: usize,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// Every fused kernel against its plain reference (forward + backward): median time and
    /// peak extra heap, as a markdown table.
    Kernels {
        #[arg(long, value_enum, default_value_t = KernelSize::Tiny)]
        size: KernelSize,
        /// Timed repetitions per kernel (after one warm-up).
        #[arg(long, default_value_t = 5, value_parser = super::at_least_one)]
        reps: usize,
    },
    /// The packed ternary matmul alone (`[tokens, cols] @ W^T`, W `[rows, cols]`), with every
    /// kernel this CPU offers: median time and multiply-adds per second.
    Gemm {
        #[arg(long, default_value_t = 3072)]
        rows: usize,
        #[arg(long, default_value_t = 1024)]
        cols: usize,
        /// Tokens (activation rows): 1 is decode, more is prefill or a batch.
        #[arg(short = 'n', long, default_value_t = 64, value_parser = super::at_least_one)]
        tokens: usize,
        #[arg(short = 'r', long, default_value_t = 20, value_parser = super::at_least_one)]
        reps: usize,
        /// Only these kernels (comma-separated: amx, avx512vnni, avxvnni, avx2, neondot,
        /// portable, dense-f32, dense-bf16-amx, dense-bf16-avx512bf16); default: all.
        #[arg(long, value_delimiter = ',')]
        kernels: Vec<String>,
    },
    /// Decode speed: prefill and decode tokens/s of greedy generation (batch 1, synthetic prompt
    /// ids) from a checkpoint (dense f32 weights, projected once) and/or a GGUF (packed 2-bit
    /// weights, int8 activations).
    Decode {
        /// A tern checkpoint dir (dense).
        #[arg(long)]
        model: Option<String>,
        /// A .gguf export (packed).
        #[arg(long)]
        gguf: Option<PathBuf>,
        /// Prompt length in tokens (synthetic ids).
        #[arg(long, default_value_t = 32, value_parser = super::at_least_one)]
        prompt: usize,
        #[arg(short = 'n', long, default_value_t = 64, value_parser = super::at_least_one)]
        tokens: usize,
        /// Timed repetitions (after one warm-up); rates are their mean and standard deviation.
        #[arg(short = 'r', long, default_value_t = 1, value_parser = super::at_least_one)]
        reps: usize,
        /// One JSON line per model instead of text.
        #[arg(long)]
        json: bool,
        /// What a packed model's paged KV cache stores (llama-bench's default is f16; a dense
        /// model decodes over the contiguous cache in its own dtype).
        #[arg(long = "cache-type", value_enum, default_value_t = tern::decode::paged::KvType::F16)]
        cache_type: tern::decode::paged::KvType,
    },
    /// The serving engine without HTTP: CLIENTS requests of synthetic prompt ids at once (greedy,
    /// EOS ignored) stepped to the end by continuous batching: aggregate tokens/s, the time until
    /// every request had its first text, and the batched decode rate after it.
    Batch {
        #[command(flatten)]
        m: super::ModelArgs,
        /// Requests at once (the 1-client rate is the baseline to compare with).
        #[arg(long, default_value = "1,8", value_delimiter = ',', value_parser = super::at_least_one)]
        clients: Vec<usize>,
        /// Prompt length in tokens (synthetic ids).
        #[arg(long, default_value_t = 64, value_parser = super::at_least_one)]
        prompt: usize,
        #[arg(short = 'n', long, default_value_t = 64, value_parser = super::at_least_one)]
        tokens: usize,
        /// Prompt tokens per step (as `tern serve --prefill-chunk`).
        #[arg(long = "prefill-chunk", default_value_t = 256, value_parser = super::at_least_one)]
        prefill_chunk: usize,
        /// KV cache storage (as `tern serve --cache-type`).
        #[arg(long = "cache-type", value_enum, default_value_t = tern::decode::paged::KvType::F16)]
        cache_type: tern::decode::paged::KvType,
    },
    /// Writes a scratch-initialized checkpoint of an architecture (random weights, for speed
    /// measurements at the real shape): config.json, model.safetensors, tokenizer.json if given.
    MakeModel {
        /// `qwen3-0.6b`, a tern .toml config or an HF config.json.
        #[arg(long, default_value = "qwen3-0.6b")]
        arch: String,
        #[arg(long)]
        out: PathBuf,
        /// tokenizer.json to copy beside it (needed by export and llama.cpp).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// One training step as `tern train` runs it (forward + loss + backward + clipping + AdamW)
    /// at a given architecture, scratch init: wall time per phase and peak resident memory.
    Step {
        /// `qwen3-0.6b`, a tern .toml config (its scratch architecture) or an HF config.json.
        #[arg(long, default_value = "qwen3-0.6b")]
        arch: String,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        /// Steps to time (the first one is reported as warm-up).
        #[arg(long, default_value_t = 2)]
        steps: usize,
        #[arg(long, value_enum, default_value_t = Precision::Ternary)]
        precision: Precision,
        #[arg(long, default_value_t = 128)]
        group_size: usize,
        #[arg(long, value_enum, default_value_t = ScaleRule::MeanAbs)]
        scale: ScaleRule,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// `fused` (tern's kernels) or `reference` (plain candle ops: composed norms, RoPE and
        /// attention, candle's cross-entropy over the full logits, composed AdamW).
        #[arg(long, value_enum, default_value_t = Kernels::Fused)]
        kernels: Kernels,
        /// `f32`, or `bf16` mixed precision (GPU only).
        #[arg(long, value_enum, default_value_t = ComputeDtype::F32)]
        dtype: ComputeDtype,
        /// Also print one JSON line: median tokens/s of the steps after the warm-up, and more.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: Cmd) -> Result<i32> {
    match cmd {
        Cmd::Topk { vocab, batch, reps } => {
            let rows = bench::topk::run(vocab, batch, reps)?;
            println!("softmax + top-k, vocab {vocab}, batch {batch}, median of {reps}\n");
            print!("{}", bench::topk::markdown(&rows));
        }
        Cmd::Gemm {
            rows,
            cols,
            tokens,
            reps,
            kernels,
        } => {
            println!(
                "packed gemm [{tokens} x {cols}] @ [{rows} x {cols}]^T, {} threads, median of {reps}",
                rayon::current_num_threads()
            );
            for s in bench::gemm::measure(rows, cols, tokens, reps, &kernels)? {
                println!(
                    "{:>11}: {:8.3} ms  {:7.1} GMAC/s",
                    s.isa, s.median_ms, s.gmac_s
                );
            }
        }
        Cmd::Kernels { size, reps } => {
            let sizes = bench::kernels::Sizes::parse(match size {
                KernelSize::Tiny => "tiny",
                KernelSize::Qwen3_0_6b => "qwen3-0.6b",
            })?;
            println!(
                "kernels at {} sizes ({sizes:?}), {reps} reps, median\n",
                sizes.name
            );
            print!(
                "{}",
                bench::kernels::markdown(&bench::kernels::run(sizes, reps)?)
            );
        }
        Cmd::Decode {
            model,
            gguf,
            prompt,
            tokens,
            reps,
            json,
            cache_type,
        } => decode(model, gguf, prompt, tokens, reps, json, cache_type)?,
        Cmd::Batch {
            m,
            clients,
            prompt,
            tokens,
            prefill_chunk,
            cache_type,
        } => {
            let (loaded, tok) = m.load()?;
            let (model, tok) = (std::sync::Arc::new(loaded.model), std::sync::Arc::new(tok));
            for c in clients {
                let s = bench::batch::measure(
                    model.clone(),
                    tok.clone(),
                    c,
                    prompt,
                    tokens,
                    prefill_chunk,
                    cache_type,
                )?;
                println!("{}", serde_json::to_string(&s)?);
            }
        }
        Cmd::MakeModel {
            arch,
            out,
            tokenizer,
            seed,
        } => make_model(&arch, &out, tokenizer.as_deref(), seed)?,
        Cmd::Step {
            arch,
            batch,
            seq,
            steps,
            precision,
            group_size,
            scale,
            device,
            seed,
            kernels,
            dtype,
            json,
        } => {
            let quant = QuantConfig {
                ternary: precision == Precision::Ternary,
                group_size,
                scale,
                ..QuantConfig::default()
            };
            let b = bench::step::StepBench {
                arch: arch_config(&arch)?,
                quant,
                kernels,
                batch,
                seq,
                steps,
                seed,
                dtype,
            };
            step(&b, &arch, &device, json)?;
        }
    }
    Ok(0)
}

fn arch_config(arch: &str) -> Result<ModelConfig> {
    match arch {
        "qwen3-0.6b" => Ok(ModelConfig::qwen3_0_6b()),
        "smollm2-135m" => Ok(ModelConfig::smollm2_135m()),
        path if path.ends_with(".toml") => Ok(tern::train::TrainConfig::load(
            std::path::Path::new(path),
            &[],
        )?
        .model
        .scratch_config()),
        path => ModelConfig::from_json_file(std::path::Path::new(path)).with_context(|| {
            format!(
                "--arch '{path}': expected 'qwen3-0.6b', 'smollm2-135m', a tern .toml config or a config.json path"
            )
        }),
    }
}

fn step(b: &bench::step::StepBench, arch: &str, device: &str, json: bool) -> Result<()> {
    let device = tern::device::parse_device(device)?;
    let (cfg, peak) = (&b.arch, |x: Option<u64>| gib(x.unwrap_or(0)));
    println!(
        "arch {arch}: {} layers, hidden {}, vocab {}; {} in {:?} on {}; batch {} seq {}",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.vocab_size,
        if b.quant.ternary { "ternary" } else { "full" },
        b.dtype,
        tern::device::device_name(&device),
        b.batch,
        b.seq
    );
    let run = b.run(&device, |i, r| {
        let total = r.total_s();
        println!(
            "step {i}{}: loss {:.4}, forward {:.2}s, backward {:.2}s, optimizer {:.2}s, total {total:.2}s, {:.0} tokens/s, \
             params with grad {}, peak rss {:.2} GiB (after forward {:.2}, after backward {:.2})",
            if i == 0 { " (warm-up)" } else { "" },
            r.loss,
            r.forward_s,
            r.backward_s,
            r.optimizer_s,
            (b.batch * b.seq) as f64 / total,
            r.params_with_grad,
            peak(tern::mem::peak_rss_bytes()),
            peak(r.peak_rss_after_forward),
            peak(r.peak_rss_after_backward),
        );
    })?;
    println!(
        "{} params in {} tensors; init {:.2}s, rss after init {:.2} GiB",
        run.params,
        run.tensors,
        run.init_s,
        peak(run.rss_after_init)
    );
    if json {
        // The median step time after the warm-up (the mean of the middle two for an even count),
        // as scripts/pytorch_step.py computes it: the rates beside PyTorch's use one statistic.
        let times: Vec<f64> = run.steps.iter().skip(1).map(|r| r.total_s()).collect();
        let tokens_per_s = median(&times).map(|t| (b.batch * b.seq) as f64 / t);
        let v = serde_json::json!({
            "arch": arch, "device": tern::device::device_name(&device), "dtype": b.dtype,
            "ternary": b.quant.ternary, "kernels": b.kernels, "batch": b.batch, "seq": b.seq,
            "timed_steps": times.len(), "tokens_per_s": tokens_per_s,
            "loss_first": run.steps.first().map(|r| r.loss), "loss_last": run.steps.last().map(|r| r.loss),
            "params_with_grad": run.steps.last().map(|r| r.params_with_grad), "tensors": run.tensors,
            "peak_rss_gib": tern::mem::peak_rss_bytes().map(gib),
        });
        println!("{v}");
    }
    Ok(())
}

fn decode(
    model: Option<String>,
    gguf: Option<PathBuf>,
    prompt: usize,
    n: usize,
    reps: usize,
    json: bool,
    kv: tern::decode::paged::KvType,
) -> Result<()> {
    anyhow::ensure!(
        model.is_some() || gguf.is_some(),
        "give --model CHECKPOINT and/or --gguf FILE"
    );
    let mut specs: Vec<(&str, String)> = Vec::new();
    specs.extend(model.map(|m| ("dense f32 (projected once)", m)));
    specs.extend(gguf.map(|g| ("packed 2-bit, int8 activations", g.display().to_string())));
    for (kind, spec) in specs {
        let rss0 = tern::mem::rss_bytes().unwrap_or(0);
        let t0 = std::time::Instant::now();
        let m = super::load_model(&spec, Precision::Ternary, "cpu")?.model;
        let load_s = t0.elapsed().as_secs_f64();
        let rss = tern::mem::rss_bytes().unwrap_or(0);
        let s = bench::decode::measure(&m, prompt, n, reps, kv)?;
        let isa = tern::kernels::ternary_matmul::Isa::detect().name();
        let (bits, bytes, scales) = resident_weights(&m);
        let act = m.quant.act_quant.name();
        // A packed model decodes over the paged cache (`generate_auto`), a dense one over the
        // contiguous cache in its own dtype.
        let cache = if m.runs_on_host() {
            format!("paged {kv:?}").to_lowercase()
        } else {
            "contiguous".into()
        };
        if json {
            let v = serde_json::json!({"model": spec, "kind": kind, "threads": rayon::current_num_threads(),
                "kernel": if m.is_packed() { isa } else { "dense f32" }, "load_s": load_s,
                "rss_after_load_mib": rss as f64 / 1048576.0, "rss_before_load_mib": rss0 as f64 / 1048576.0,
                "prompt_tokens": s.prompt_tokens, "prefill_s": s.prefill_s, "prefill_tok_s": s.prefill_tok_s,
                "prefill_tok_s_sd": s.prefill_tok_s_sd, "decode_tokens": s.decode_tokens,
                "decode_tok_s": s.decode_tok_s, "decode_tok_s_sd": s.decode_tok_s_sd, "reps": s.reps,
                "resident_bits_per_weight": bits, "resident_weight_bytes": bytes, "scales": scales,
                "act_quant": act, "cache_type": cache});
            println!("{v}");
        } else {
            println!(
                "{kind} {spec} ({}; {} threads{}; inputs act_quant {act}; kv cache {cache}): load {load_s:.2} s, rss {:.1} MiB; prefill {prompt} tokens {:.3} s \
                 ({:.1} +/- {:.1} tokens/s); decode {:.1} +/- {:.1} tokens/s ({} tokens; {} reps)",
                if m.is_packed() { isa } else { "dense" },
                rayon::current_num_threads(),
                bits.map_or(String::new(), |b| format!("; {b:.3} bits per weight resident, scales {}", scales.join("+"))),
                rss as f64 / 1048576.0,
                s.prefill_s,
                s.prefill_tok_s,
                s.prefill_tok_s_sd,
                s.decode_tok_s,
                s.decode_tok_s_sd,
                s.decode_tokens,
                s.reps
            );
        }
    }
    Ok(())
}

/// A packed model's resident bits per weight (codes and scales), the bytes they take (what a
/// decoded token reads) and its matrices' scale formats; `None` and 0 for a dense model.
fn resident_weights(m: &tern::model::Model) -> (Option<f64>, usize, Vec<String>) {
    let mats = m.packed_matrices();
    let bytes: usize = mats.iter().map(|p| p.bytes()).sum();
    let weights: usize = mats.iter().map(|p| p.rows * p.cols).sum();
    let mut formats: Vec<String> = mats.iter().map(|p| p.scale_format()).collect();
    formats.sort();
    formats.dedup();
    (
        (weights > 0).then(|| 8.0 * bytes as f64 / weights as f64),
        bytes,
        formats,
    )
}

fn make_model(
    arch: &str,
    out: &std::path::Path,
    tokenizer: Option<&std::path::Path>,
    seed: u64,
) -> Result<()> {
    let cfg = arch_config(arch)?;
    let tokenizer = tokenizer
        .map(|t| super::load_tokenizer(&t.display().to_string()))
        .transpose()?;
    let cpu = candle_core::Device::Cpu;
    let params = tern::model::Params::scratch(&cfg, seed, candle_core::DType::F32, &cpu)?;
    tern::model::save_checkpoint(
        out,
        &cfg,
        &QuantConfig::default(),
        &params,
        tokenizer.as_ref(),
    )?;
    println!(
        "wrote {} ({} parameters, scratch init, seed {seed})",
        out.display(),
        params.num_elements()
    );
    Ok(())
}
