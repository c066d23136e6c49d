//! The `tern` command line. Subcommands grow as the issues land; each one that exists works.

// Candle allocates and frees large tensors every op; the system allocator returns them to the OS
// (mmap/munmap) and page-faults them back in, which cost more CPU time than the math itself.
// Wrapped in a counter of live heap bytes for `tern bench kernels`.
#[global_allocator]
static GLOBAL: tern::mem::Counting<mimalloc::MiMalloc> = tern::mem::Counting(mimalloc::MiMalloc);

/// `mi_option_purge_delay` in mimalloc 2's `mi_option_e` (include/mimalloc.h).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Even mimalloc gives freed pages back to the OS after 10 ms by default, and a training step
/// frees and re-allocates the same hundreds of MiB every few ms: the kernel then spends ~7% of
/// the step zeroing fresh pages (perf: clear_page_erms). Never purging keeps those pages; peak
/// RSS is what it was (measured in NOTES.md).
fn keep_freed_pages() {
    // SAFETY: sets one integer option of the allocator; valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tern::model::{params::Params, Qwen3, Qwen3Config};
use tern::ternary::{QuantConfig, ScaleRule};

#[derive(Parser)]
#[command(name = "tern", version, about = "Train, run and export ternary Qwen3 models")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Beam search and speculative decoding flags of `tern generate`.
#[derive(clap::Args, Debug, Clone)]
struct SearchArgs {
    /// Beam search with this many beams (0 = off; sampling flags are then ignored).
    #[arg(long, default_value_t = 0)]
    beams: usize,
    /// Beam score = total log-probability / generated_length^A.
    #[arg(long = "length-penalty", default_value_t = 1.0)]
    length_penalty: f64,
    /// Beams to print per prompt (default: all).
    #[arg(long = "num-return")]
    num_return: Option<usize>,
    /// Tree speculative decoding (greedy, one prompt): drafts from `ngram` (prompt lookup) or
    /// from `model` (--draft-model).
    #[arg(long)]
    speculative: Option<String>,
    /// The smaller tern model that drafts for `--speculative model` (same tokenizer).
    #[arg(long = "draft-model")]
    draft_model: Option<String>,
    /// Draft tree depth (tokens per branch).
    #[arg(long = "draft-depth", default_value_t = 4)]
    draft_depth: usize,
    /// Draft tree width (branches).
    #[arg(long = "draft-width", default_value_t = 2)]
    draft_width: usize,
    /// KV cache for plain generation: `contiguous` (one tensor per layer, padded batch) or
    /// `paged` (blocks from a pool, a block table per sequence, no padding).
    #[arg(long = "kv-cache", default_value = "contiguous")]
    kv_cache: String,
    /// Positions per block of the paged KV cache.
    #[arg(long = "block-size", default_value_t = 16)]
    block_size: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train (or fine-tune) a ternary Qwen3 model from a TOML config.
    Train {
        /// The TOML config (see configs/).
        #[arg(long)]
        config: PathBuf,
        /// Override a config value: --set section.key=value (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
        /// Continue from the newest checkpoint in DIR (default: the config's train.out_dir).
        #[arg(long, num_args = 0..=1, default_missing_value = "")]
        resume: Option<String>,
        /// No progress bar (log lines only).
        #[arg(long)]
        quiet: bool,
    },
    /// Held-out perplexity of a model on a text file.
    Eval {
        #[command(flatten)]
        m: ModelArgs,
        /// UTF-8 text file to score.
        #[arg(long)]
        data: PathBuf,
        /// Context (window) length in tokens.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Sliding-window stride (< ctx): every token scored once with up to ctx-1 of context.
        #[arg(long)]
        stride: Option<usize>,
        /// `plain` (every token of non-overlapping windows) or `llama` (llama-perplexity).
        #[arg(long, default_value = "plain")]
        scheme: String,
        /// `all` the file, or the `val` part `tern train` held out (needs the checkpoint's
        /// train_config.toml or --config).
        #[arg(long, default_value = "all")]
        split: String,
        /// Training config whose [data] split to reproduce with --split val.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Windows per forward.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Generate text (greedy by default; llama-cli sampling flags).
    Generate {
        #[command(flatten)]
        m: ModelArgs,
        /// A prompt (repeatable: several prompts run as one batch).
        #[arg(long = "prompt", short = 'p')]
        prompts: Vec<String>,
        /// A file whose whole text is one prompt (repeatable).
        #[arg(long = "prompt-file", short = 'f')]
        prompt_files: Vec<PathBuf>,
        /// Tokens to generate per prompt.
        #[arg(short = 'n', long = "max-tokens", default_value_t = 128)]
        max_tokens: usize,
        /// Temperature; 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temp: f64,
        /// Keep the k most likely tokens (0 = all).
        #[arg(long = "top-k", default_value_t = 40)]
        top_k: usize,
        /// Nucleus sampling: smallest set with cumulative probability >= p (1 = off).
        #[arg(long = "top-p", default_value_t = 0.95)]
        top_p: f64,
        /// Drop tokens with probability < min_p * p(most likely) (0 = off).
        #[arg(long = "min-p", default_value_t = 0.05)]
        min_p: f64,
        /// Sampling seed (prompt i uses seed + i).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop when the generated text contains this string (repeatable); it is not printed.
        #[arg(long)]
        stop: Vec<String>,
        #[command(flatten)]
        search: SearchArgs,
    },
    /// Export a checkpoint to GGUF (packed Q2_0 by default) for llama.cpp.
    Export {
        /// tern checkpoint dir, HF-layout dir or hub id.
        #[arg(long)]
        model: String,
        #[arg(long)]
        out: PathBuf,
        /// q2_0 (ggml type 42), pq2_0 (PrismML type 142), f16 or f32.
        #[arg(long, default_value = "q2_0")]
        format: String,
        #[arg(long, default_value = "ternary")]
        precision: String,
    },
    /// Check that a model's weights are ternary: a checkpoint's projection, or a GGUF's blocks
    /// (against the source checkpoint with --source). Exit 0 only when everything holds.
    Verify {
        /// Checkpoint dir / hub id, or a .gguf file.
        #[arg(long)]
        model: String,
        /// For a GGUF: the checkpoint it was exported from.
        #[arg(long)]
        source: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Draws the validation-loss curves of several runs into one PNG (ablations).
    Plot {
        /// Output PNG.
        #[arg(long)]
        out: PathBuf,
        /// NAME=RUN_DIR (its metrics.jsonl), repeatable.
        #[arg(long = "run")]
        runs: Vec<String>,
        #[arg(long, default_value = "tern: validation loss")]
        title: String,
    },
    /// Benchmarks (figures for NOTES.md).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

/// How eval and generate find their model and tokenizer.
#[derive(clap::Args)]
struct ModelArgs {
    /// tern checkpoint dir, HF-layout dir, hub id, or an exported .gguf (CPU, packed).
    #[arg(long)]
    model: String,
    /// `ternary` (default) or `full` precision (checkpoints).
    #[arg(long, default_value = "ternary")]
    precision: String,
    /// tokenizer.json path or hub id (default: the model's own).
    #[arg(long)]
    tokenizer: Option<String>,
    /// auto | cpu | cuda[:N] | metal[:N]
    #[arg(long, default_value = "auto")]
    device: String,
}

impl ModelArgs {
    fn load(&self) -> Result<(tern::runtime::LoadedModel, tern::tokenizer::Tokenizer)> {
        let mut device = tern::device::parse_device(&self.device)?;
        if self.model.to_ascii_lowercase().ends_with(".gguf") && self.device == "auto" {
            device = candle_core::Device::Cpu; // packed GGUF inference runs on the CPU
        }
        let mut loaded = tern::runtime::load_for_inference(&self.model, self.precision.parse()?, &device)?;
        let tok = match &self.tokenizer {
            Some(spec) => tern::tokenizer::Tokenizer::load(spec, &tern::hub::HubOptions::from_env())?,
            None => loaded
                .tokenizer
                .take()
                .with_context(|| format!("model '{}' has no tokenizer.json beside it; pass --tokenizer", self.model))?,
        };
        Ok((loaded, tok))
    }
}

#[derive(Subcommand)]
enum BenchCmd {
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
        /// `tiny` (configs/tiny.toml's sizes) or `qwen3-0.6b` (one layer at batch 1, seq 512).
        #[arg(long, default_value = "tiny")]
        size: String,
        /// Timed repetitions per kernel (after one warm-up).
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// Decode speed: tokens/s of greedy generation from a checkpoint (dense f32 weights,
    /// projected once) and from its packed GGUF export (2-bit codes multiplied directly).
    Decode {
        /// A tern checkpoint dir (dense).
        #[arg(long)]
        model: String,
        /// Its .gguf export (packed).
        #[arg(long)]
        gguf: Option<PathBuf>,
        /// Prompt length in tokens (synthetic ids).
        #[arg(long, default_value_t = 32)]
        prompt: usize,
        #[arg(short = 'n', long, default_value_t = 64)]
        tokens: usize,
    },
    /// One training step (forward + loss + backward + clipping + AdamW) at a given architecture,
    /// scratch init: prints wall time per phase and peak resident memory.
    Step {
        /// `qwen3-0.6b`, a tern .toml config (its scratch architecture) or an HF config.json.
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
        /// `fused` (tern's kernels) or `reference` (plain candle ops: composed norms, RoPE and
        /// attention, candle's cross-entropy over the full logits).
        #[arg(long, default_value = "fused")]
        kernels: String,
    },
}

fn arch_config(arch: &str) -> Result<Qwen3Config> {
    match arch {
        "qwen3-0.6b" => Ok(Qwen3Config::qwen3_0_6b()),
        path if path.ends_with(".toml") => {
            // A tern training config: its scratch architecture (e.g. configs/tiny.toml).
            let cfg = tern::config::TrainConfig::load(std::path::Path::new(path), &[])?;
            Ok(cfg.model.scratch_config())
        }
        path => Ok(Qwen3Config::from_json_file(std::path::Path::new(path))
            .with_context(|| format!("--arch '{path}': expected 'qwen3-0.6b', a tern .toml config or a config.json path"))?),
    }
}

fn parse_precision(p: &str) -> Result<bool> {
    match p {
        "ternary" => Ok(true),
        "full" => Ok(false),
        o => anyhow::bail!("--precision: expected 'ternary' or 'full', found '{o}'"),
    }
}

fn cmd_plot(out: &std::path::Path, runs: &[String], title: &str) -> Result<i32> {
    anyhow::ensure!(!runs.is_empty(), "give at least one --run NAME=RUN_DIR");
    let mut curves = Vec::new();
    for r in runs {
        let (name, dir) = r.split_once('=').with_context(|| format!("--run '{r}': expected NAME=RUN_DIR"))?;
        let path = std::path::Path::new(dir).join("metrics.jsonl");
        let text = std::fs::read_to_string(&path).with_context(|| format!("--run {name}: reading {}", path.display()))?;
        let mut pts = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            if let (Some(step), Some(loss)) = (v.get("step").and_then(|s| s.as_u64()), v.get("val_loss").and_then(|s| s.as_f64())) {
                pts.push((step as usize, loss));
            }
        }
        anyhow::ensure!(!pts.is_empty(), "{}: no val_loss rows", path.display());
        curves.push((name.to_string(), pts));
    }
    tern::plot::plot_curves(out, title, &curves)?;
    println!("wrote {}", out.display());
    Ok(0)
}

fn bench_topk(vocab: usize, batch: usize, reps: usize) -> Result<()> {
    use tern::decode::topk::{softmax_topk_batch, softmax_topk_reference};
    use rand::{Rng, SeedableRng};
    anyhow::ensure!(vocab > 0 && batch > 0 && reps > 0, "--vocab, --batch and --reps must be positive");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let logits: Vec<f32> = (0..vocab * batch).map(|_| rng.gen_range(-10.0f32..10.0)).collect();
    let median = |f: &mut dyn FnMut()| {
        tern::kernels::bench::measure(reps, || {
            f();
            Ok(())
        })
        .map(|(secs, _)| secs)
    };
    println!("softmax + top-k, vocab {vocab}, batch {batch}, median of {reps}\n");
    println!("| k | fused ms | full softmax + sort ms | speed-up |\n|---:|---:|---:|---:|");
    for k in [1usize, 10, 50, 500] {
        let fused = median(&mut || {
            std::hint::black_box(softmax_topk_batch(&logits, vocab, k));
        })?;
        let plain = median(&mut || {
            use rayon::prelude::*;
            let r: Vec<_> = logits.par_chunks(vocab).map(|row| softmax_topk_reference(row, k)).collect();
            std::hint::black_box(r);
        })?;
        println!("| {k} | {:.2} | {:.2} | {:.1}x |", fused * 1e3, plain * 1e3, plain / fused);
    }
    Ok(())
}

fn bench_kernels(size: &str, reps: usize) -> Result<()> {
    use tern::kernels::bench;
    anyhow::ensure!(reps > 0, "--reps must be positive");
    let sizes = bench::Sizes::parse(size)?;
    println!("kernels at {} sizes ({sizes:?}), {reps} reps, median\n", sizes.name);
    let rows = bench::run(sizes, reps)?;
    print!("{}", bench::markdown(&rows));
    Ok(())
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
    kernels: &str,
) -> Result<()> {
    let cfg = arch_config(arch)?;
    let device = tern::device::parse_device(device)?;
    let quant = QuantConfig {
        ternary: parse_precision(precision)?,
        group_size,
        scale: scale.parse::<ScaleRule>()?,
        kernels: kernels.parse()?,
        ..QuantConfig::default()
    };
    quant.validate()?;
    anyhow::ensure!(batch > 0 && seq > 0 && steps > 0, "--batch, --seq and --steps must be positive");
    let t0 = Instant::now();
    let params = Params::scratch(&cfg, seed, DType::F32, &device)?;
    let model = Qwen3::new(&cfg, quant, &params)?;
    let mut opt = tern::train::optim::AdamW::new(tern::train::optim::AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 });
    opt.fused = quant.kernels.fused();
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
        let loss = tern::train::trainer::batch_loss(&model, &inp, &tgt)?;
        let loss_v = loss.to_scalar::<f32>()?;
        let fwd = t.elapsed().as_secs_f64();
        let peak = || tern::mem::gib(tern::mem::peak_rss_bytes().unwrap_or(0));
        let peak_fwd = peak();
        let store = loss.backward()?;
        drop(loss); // the graph: every activation of the forward
        let bwd = t.elapsed().as_secs_f64() - fwd;
        let peak_bwd = peak();
        let with_grad = params.iter().filter(|(_, v)| store.get(v.as_tensor()).is_some()).count();
        // The rest of a training step, as `tern train` runs it: collect, clip, AdamW.
        let mut grads = tern::train::optim::Grads::new();
        tern::train::optim::accumulate(&mut grads, &params, &store)?;
        drop(store);
        let norm = tern::train::optim::global_norm(&grads)?;
        tern::train::optim::clip(&mut grads, norm, 1.0)?;
        opt.step(&params, &grads, 1e-4)?;
        drop(grads);
        let total = t.elapsed().as_secs_f64();
        println!(
            "step {step}{}: loss {loss_v:.4}, forward {fwd:.2}s, backward {bwd:.2}s, optimizer {:.2}s, total {total:.2}s, \
             {:.0} tokens/s, params with grad {with_grad}/{}, peak rss {:.2} GiB \
             (after forward {peak_fwd:.2}, after backward {peak_bwd:.2})",
            if step == 0 { " (warm-up)" } else { "" },
            total - fwd - bwd,
            (batch * seq) as f64 / total,
            params.len(),
            tern::mem::gib(tern::mem::peak_rss_bytes().unwrap_or(0)),
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn cmd_eval(
    m: &ModelArgs,
    data: &std::path::Path,
    ctx: usize,
    stride: Option<usize>,
    scheme: &str,
    split: &str,
    config: Option<PathBuf>,
    batch: usize,
    json: bool,
) -> Result<i32> {
    use tern::eval::{perplexity, plan, score, Scheme};
    let scheme: Scheme = scheme.parse()?;
    let model = &m.model;
    let (loaded, tok) = m.load()?;
    let tokens = match split {
        "all" => tern::data::tokenize(&tok, &tern::data::read_text(data)?)?,
        "val" => {
            let cfg = match config {
                Some(p) => tern::config::TrainConfig::load(&p, &[])?,
                None => loaded.train_config.clone().with_context(|| {
                    format!("--split val: model '{model}' has no train_config.toml; pass --config")
                })?,
            };
            tern::data::load_split(data, &tok, cfg.data.val_fraction, cfg.data.seq_len)?.val
        }
        o => anyhow::bail!("--split: expected 'all' or 'val', found '{o}'"),
    };
    let windows = plan(tokens.len(), ctx, stride, scheme)?;
    let t0 = Instant::now();
    let nll = score(&loaded.model, &tokens, &windows, batch)?;
    let secs = t0.elapsed().as_secs_f64();
    let p = perplexity(&nll);
    let tps = p.tokens as f64 / secs.max(1e-9);
    if json {
        println!(
            "{}",
            serde_json::json!({"ppl": p.ppl, "ppl_stderr": p.ppl_stderr, "nll": p.nll, "tokens": p.tokens, "tokens_per_sec": tps})
        );
    } else {
        println!("PPL = {:.4} +/- {:.4}", p.ppl, p.ppl_stderr);
        println!("{} tokens scored in {} windows, mean NLL {:.6}, {:.1} tokens/s", p.tokens, windows.len(), p.nll, tps);
    }
    Ok(0)
}

fn cmd_generate(
    m: &ModelArgs,
    mut prompts: Vec<String>,
    prompt_files: Vec<PathBuf>,
    max_tokens: usize,
    sampler: tern::decode::sampler::SamplerConfig,
    stop: Vec<String>,
    search: &SearchArgs,
) -> Result<i32> {
    use std::io::Write;
    use tern::decode::generate::{generate_batch, GenerateConfig};
    sampler.validate()?;
    for f in prompt_files {
        prompts.push(std::fs::read_to_string(&f).with_context(|| format!("--prompt-file {}", f.display()))?);
    }
    anyhow::ensure!(!prompts.is_empty(), "give at least one --prompt or --prompt-file");
    let (loaded, tok) = m.load()?;
    let ids = prompts.iter().map(|p| tok.encode(p)).collect::<tern::Result<Vec<_>>>()?;
    let mut eos = tok.eos_ids();
    eos.extend(loaded.model.cfg.eos_ids());
    if search.beams > 0 {
        anyhow::ensure!(search.speculative.is_none(), "--beams and --speculative cannot be combined");
        return print_beams(&loaded.model, &tok, &prompts, &ids, max_tokens, eos, search);
    }
    if let Some(kind) = &search.speculative {
        anyhow::ensure!(sampler.temp == 0.0, "--speculative verifies greedily: drop --temp (or set it to 0)");
        anyhow::ensure!(ids.len() == 1, "--speculative takes one prompt, found {}", ids.len());
        return print_speculative(&loaded.model, &tok, &prompts[0], &ids[0], max_tokens, &eos, kind, search, &m.device);
    }
    let cfg = GenerateConfig { max_new: max_tokens, sampler, eos };
    let stream = prompts.len() == 1;
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut printed = 0usize;
    if stream {
        print!("{}", prompts[0]);
    }
    let t0 = Instant::now();
    let paged = match search.kv_cache.as_str() {
        "contiguous" => false,
        "paged" => true,
        o => anyhow::bail!("--kv-cache: expected 'contiguous' or 'paged', found '{o}'"),
    };
    anyhow::ensure!(search.block_size > 0, "--block-size must be positive");
    let on_token = |row: usize, t: u32| {
        generated[row].push(t);
        let text = tok.decode(&generated[row]).unwrap_or_default();
        let hit = stop.iter().filter_map(|s| text.find(s.as_str())).min();
        if stream {
            // Print what is final: up to a stop string, holding back a possible partial one.
            let hold = stop.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
            let upto = hit.unwrap_or(text.len().saturating_sub(hold));
            let upto = (0..=upto).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
            if upto > printed {
                print!("{}", &text[printed..upto]);
                let _ = std::io::stdout().flush();
                printed = upto;
            }
        }
        hit.is_some()
    };
    let results = if paged {
        tern::decode::generate::generate_paged(&loaded.model, &ids, &cfg, search.block_size, on_token)?
    } else {
        generate_batch(&loaded.model, &ids, &cfg, on_token)?
    };
    let secs = t0.elapsed().as_secs_f64();
    let n_new: usize = results.iter().map(|r| r.0.len()).sum();
    for (i, (toks, finish)) in results.iter().enumerate() {
        let text = tok.decode(toks)?;
        let cut = stop.iter().filter_map(|s| text.find(s.as_str())).min().unwrap_or(text.len());
        if stream {
            if cut > printed {
                print!("{}", &text[printed..cut]);
            }
            println!();
        } else {
            println!("=== prompt {} ({finish:?}) ===\n{}{}", i + 1, prompts[i], &text[..cut]);
        }
    }
    eprintln!("{n_new} tokens in {secs:.2} s ({:.1} tokens/s, prefill included)", n_new as f64 / secs.max(1e-9));
    Ok(0)
}

#[allow(clippy::too_many_arguments)]
fn print_speculative(
    model: &Qwen3,
    tok: &tern::tokenizer::Tokenizer,
    prompt: &str,
    ids: &[u32],
    max_tokens: usize,
    eos: &[u32],
    kind: &str,
    search: &SearchArgs,
    device: &str,
) -> Result<i32> {
    use tern::decode::speculative::{generate_speculative, Drafter};
    let draft_loaded;
    let mut drafter = match kind {
        "ngram" => {
            anyhow::ensure!(search.draft_model.is_none(), "--draft-model is only used with --speculative model");
            Drafter::Ngram
        }
        "model" => {
            let spec = search.draft_model.as_deref().context("--speculative model needs --draft-model PATH")?;
            let dev = tern::device::parse_device(device)?;
            draft_loaded = tern::runtime::load_for_inference(spec, tern::runtime::Precision::Ternary, &dev)
                .with_context(|| format!("--draft-model {spec}"))?;
            Drafter::Model { model: &draft_loaded.model, cache: tern::model::KvCache::new(draft_loaded.model.cfg.num_hidden_layers) }
        }
        o => anyhow::bail!("--speculative: expected 'ngram' or 'model', found '{o}'"),
    };
    let t0 = Instant::now();
    let (toks, stats) = generate_speculative(model, &mut drafter, ids, max_tokens, search.draft_depth, search.draft_width, eos)?;
    let secs = t0.elapsed().as_secs_f64();
    println!("{prompt}{}", tok.decode(&toks)?);
    eprintln!(
        "{} tokens in {secs:.2} s ({:.1} tokens/s); {} target forwards, mean accepted length {:.2} \
         (draft tokens accepted {}/{})",
        toks.len(),
        toks.len() as f64 / secs.max(1e-9),
        stats.rounds,
        stats.mean_accepted_length(),
        stats.accepted,
        stats.drafted
    );
    Ok(0)
}

fn print_beams(
    model: &Qwen3,
    tok: &tern::tokenizer::Tokenizer,
    prompts: &[String],
    ids: &[Vec<u32>],
    max_tokens: usize,
    eos: Vec<u32>,
    search: &SearchArgs,
) -> Result<i32> {
    use tern::decode::beam::{beam_search, BeamConfig, QwenBeams};
    let r = search.num_return.unwrap_or(search.beams);
    anyhow::ensure!(r >= 1 && r <= search.beams, "--num-return must be between 1 and --beams ({}), found {r}", search.beams);
    let cfg = BeamConfig { beams: search.beams, length_penalty: search.length_penalty, max_new: max_tokens, eos };
    let t0 = Instant::now();
    let results = beam_search(&mut QwenBeams::new(model), ids, &cfg)?;
    for (i, hyps) in results.iter().enumerate() {
        for (j, h) in hyps.iter().take(r).enumerate() {
            println!(
                "=== prompt {}, beam {} of {}: score {:.4} (log-prob {:.4}, {} tokens{}) ===\n{}{}",
                i + 1,
                j + 1,
                hyps.len(),
                h.score,
                h.logprob,
                h.tokens.len(),
                if h.finished { ", ended by EOS" } else { "" },
                prompts[i],
                tok.decode(&h.tokens)?
            );
        }
    }
    eprintln!("beam search ({} beams) in {:.2} s", search.beams, t0.elapsed().as_secs_f64());
    Ok(0)
}

fn load_latents(spec: &str) -> Result<tern::model::Checkpoint> {
    let dir = tern::hub::resolve_model_dir(spec, &tern::hub::HubOptions::from_env())?;
    Ok(tern::model::load_checkpoint(&dir, DType::F32, &candle_core::Device::Cpu)?)
}

fn cmd_export(model: &str, out: &std::path::Path, format: &str, precision: &str) -> Result<i32> {
    let format: tern::export::Format = format.parse()?;
    let precision: tern::runtime::Precision = precision.parse()?;
    let ck = load_latents(model)?;
    let quant = QuantConfig {
        ternary: precision == tern::runtime::Precision::Ternary,
        ..ck.quant.unwrap_or_default()
    };
    let name = ck.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "tern".into());
    let r = tern::export::export_gguf(&ck.config, &quant, &ck.params, ck.tokenizer.as_deref(), format, &name, out)?;
    println!("wrote {} ({} bytes, {:.2} MiB)", out.display(), r.bytes, r.bytes as f64 / (1u64 << 20) as f64);
    println!(
        "{} weights: {:.3} bits per weight in tensor data, {:.3} over the whole file (metadata and tokenizer \
         included); {:.3}x the size of the same model as F16 GGUF ({} bytes)",
        r.weights, r.data_bits_per_weight, r.bits_per_weight, r.ratio_to_f16, r.f16_bytes
    );
    Ok(0)
}

fn cmd_verify(model: &str, source: Option<String>, json: bool) -> Result<i32> {
    let mut rows: Vec<(String, usize, [f64; 3], f64, Vec<String>)> = Vec::new();
    if model.to_ascii_lowercase().ends_with(".gguf") {
        let file = tern::export::gguf::GgufFile::read(std::path::Path::new(model))?;
        let src = source.as_deref().map(load_latents).transpose()?;
        let q = src.as_ref().map(|c| c.quant.unwrap_or_default());
        let checks = tern::export::verify_gguf(&file, src.as_ref().map(|c| &c.params).zip(q.as_ref()))?;
        anyhow::ensure!(!checks.is_empty(), "{model}: no Q2_0/PQ2_0 tensors to verify");
        for c in checks {
            rows.push((c.name, c.groups, c.shares, 0.0, c.problems));
        }
    } else {
        anyhow::ensure!(source.is_none(), "--source applies to a .gguf --model only");
        let ck = load_latents(model)?;
        let q = ck.quant.unwrap_or_default();
        let (_, per) = tern::train::trainer::verify_model(&ck.params, &q)?;
        for (name, r) in per {
            let problems = if r.ok() { vec![] } else { vec![format!("{} groups are not {{-s, 0, +s}}", r.bad_groups)] };
            rows.push((name, r.groups, r.shares(), r.max_deviation, problems));
        }
    }
    let failed = rows.iter().filter(|r| !r.4.is_empty()).count();
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| serde_json::json!({"tensor": r.0, "groups": r.1, "share_minus1": r.2[0], "share_zero": r.2[1],
                "share_plus1": r.2[2], "max_deviation": r.3, "problems": r.4}))
            .collect();
        println!("{}", serde_json::json!({"ok": failed == 0, "tensors": v}));
    } else {
        println!("{:<44} {:>9} {:>7} {:>7} {:>7} {:>10}  status", "tensor", "groups", "-1", "0", "+1", "max dev");
        for r in &rows {
            println!(
                "{:<44} {:>9} {:>7.4} {:>7.4} {:>7.4} {:>10.2e}  {}",
                r.0, r.1, r.2[0], r.2[1], r.2[2], r.3,
                if r.4.is_empty() { "ok".to_string() } else { format!("FAIL: {}", r.4.join("; ")) }
            );
        }
        println!("{} tensors checked, {failed} failed", rows.len());
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

fn bench_decode(model: &str, gguf: Option<&std::path::Path>, prompt: usize, n: usize) -> Result<i32> {
    use tern::decode::generate::{generate_batch, GenerateConfig};
    use tern::decode::sampler::SamplerConfig;
    let cpu = candle_core::Device::Cpu;
    let mut runs: Vec<(String, tern::model::Qwen3)> = Vec::new();
    let rss0 = tern::mem::rss_bytes().unwrap_or(0);
    let dense = tern::runtime::load_for_inference(model, tern::runtime::Precision::Ternary, &cpu)?;
    runs.push(("dense f32 (projected once)".into(), dense.model));
    if let Some(g) = gguf {
        let packed = tern::runtime::load_for_inference(&g.display().to_string(), tern::runtime::Precision::Ternary, &cpu)?;
        runs.push((format!("packed {}", g.display()), packed.model));
    }
    println!("rss after loading: {:.1} MiB (from {:.1} MiB)", tern::mem::rss_bytes().unwrap_or(0) as f64 / 1048576.0, rss0 as f64 / 1048576.0);
    for (name, m) in &runs {
        let ids: Vec<u32> = (0..prompt as u32).map(|i| (i * 7919 + 11) % m.cfg.vocab_size as u32).collect();
        let cfg = GenerateConfig { max_new: n, sampler: SamplerConfig { temp: 0.0, ..Default::default() }, eos: vec![] };
        // Warm-up, then a timed run: prefill separately from decode.
        generate_batch(m, std::slice::from_ref(&ids), &GenerateConfig { max_new: 2, ..cfg.clone() }, |_, _| false)?;
        let t0 = Instant::now();
        generate_batch(m, std::slice::from_ref(&ids), &GenerateConfig { max_new: 1, ..cfg.clone() }, |_, _| false)?;
        let prefill = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let out = generate_batch(m, std::slice::from_ref(&ids), &cfg, |_, _| false)?;
        let total = t1.elapsed().as_secs_f64();
        let decode_tps = (out[0].0.len() - 1) as f64 / (total - prefill).max(1e-9);
        println!("{name}: prefill {prompt} tokens {prefill:.3} s; decode {decode_tps:.1} tokens/s ({} tokens)", out[0].0.len());
    }
    Ok(0)
}

/// Exit code of a run stopped by Ctrl-C (128 + SIGINT), after its checkpoint is saved.
const EXIT_INTERRUPTED: i32 = 130;

fn cmd_train(config: PathBuf, set: Vec<String>, resume: Option<String>, quiet: bool) -> Result<i32> {
    let cfg = tern::config::TrainConfig::load(&config, &set)?;
    let interrupt = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupt.clone();
        ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                eprintln!("second Ctrl-C: exiting without a checkpoint");
                std::process::exit(EXIT_INTERRUPTED);
            }
            eprintln!("Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to quit now)");
        })
        .context("installing the Ctrl-C handler")?;
    }
    let resume = resume.map(|r| if r.is_empty() { cfg.train.out_dir.clone() } else { PathBuf::from(r) });
    let opts = tern::train::TrainOptions {
        resume,
        interrupt,
        progress: !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ..Default::default()
    };
    let out = tern::train::train(&cfg, opts)?;
    print_summary(&out.summary);
    if out.interrupted {
        eprintln!("interrupted at step {}; resume with --resume", out.last_step);
        return Ok(EXIT_INTERRUPTED);
    }
    Ok(0)
}

fn print_summary(s: &serde_json::Value) {
    let f = |k: &str| s.get(k).and_then(|v| v.as_f64()).map(|v| format!("{v:.4}")).unwrap_or("-".into());
    println!("steps {} | tokens seen {} | {} tokens/s | wall {} s", s["steps"], s["tokens_seen"], f("tokens_per_sec"), f("elapsed_s"));
    println!("train loss {} -> {} (mean of last 10: {})", f("train_loss_first"), f("train_loss_last"), f("train_loss_last10_mean"));
    println!("val loss {} -> {} | val PPL {} -> {}", f("val_loss_first"), f("val_loss"), f("val_ppl_first"), f("val_ppl"));
    let t = &s["ternary_check"];
    println!(
        "ternary check: {} ({} groups, {} bad) | share -1 {:.3}, 0 {:.3}, +1 {:.3}",
        if t["ok"].as_bool() == Some(true) { "ok" } else { "FAILED" },
        t["groups"], t["bad_groups"],
        t["share_minus1"].as_f64().unwrap_or(0.0), t["share_zero"].as_f64().unwrap_or(0.0), t["share_plus1"].as_f64().unwrap_or(0.0)
    );
    if let Some(samples) = s["samples"].as_array() {
        for x in samples {
            println!("sample: {}{}", x["prompt"].as_str().unwrap_or(""), x["text"].as_str().unwrap_or(""));
        }
    }
    println!("checkpoint: {}", s["checkpoint"].as_str().unwrap_or("-"));
}

fn main() {
    keep_freed_pages();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Train { config, set, resume, quiet } => cmd_train(config, set, resume, quiet),
        Cmd::Generate { m, prompts, prompt_files, max_tokens, temp, top_k, top_p, min_p, seed, stop, search } => cmd_generate(
            &m,
            prompts,
            prompt_files,
            max_tokens,
            tern::decode::sampler::SamplerConfig { temp, top_k, top_p, min_p, seed },
            stop,
            &search,
        ),
        Cmd::Export { model, out, format, precision } => cmd_export(&model, &out, &format, &precision),
        Cmd::Verify { model, source, json } => cmd_verify(&model, source, json),
        Cmd::Eval { m, data, ctx, stride, scheme, split, config, batch, json } => {
            cmd_eval(&m, &data, ctx, stride, &scheme, &split, config, batch, json)
        }
        Cmd::Plot { out, runs, title } => cmd_plot(&out, &runs, &title),
        Cmd::Bench { what } => match what {
            BenchCmd::Topk { vocab, batch, reps } => bench_topk(vocab, batch, reps).map(|_| 0),
            BenchCmd::Kernels { size, reps } => bench_kernels(&size, reps).map(|_| 0),
            BenchCmd::Decode { model, gguf, prompt, tokens } => bench_decode(&model, gguf.as_deref(), prompt, tokens),
            BenchCmd::Step { arch, batch, seq, steps, precision, group_size, scale, device, seed, kernels } => {
                bench_step(&arch, batch, seq, steps, &precision, group_size, &scale, &device, seed, &kernels).map(|_| 0)
            }
        },
    };
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
