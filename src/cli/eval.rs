//! `tern eval --model M --data FILE [--ctx 512] [--stride S] [--scheme plain|llama] [--split all|val]`

use super::ModelArgs;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Instant;
use tern::eval::{bits_per_byte, bytes_per_token, perplexity, plan, score, scored_targets, Scheme};

/// Which tokens of `--data` are scored.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The whole file.
    All,
    /// The validation part `tern train` held out (needs the checkpoint's train_config.toml or --config).
    Val,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    /// UTF-8 text file to score.
    #[arg(long)]
    data: PathBuf,
    /// Context (window) length in tokens; at most the model's max_position_embeddings.
    #[arg(long, default_value_t = 512, value_parser = super::at_least_one)]
    ctx: usize,
    /// Sliding-window stride (< ctx): every token scored once with up to ctx-1 of context.
    #[arg(long)]
    stride: Option<usize>,
    /// `plain` (every token of non-overlapping windows) or `llama` (llama-perplexity).
    #[arg(long, value_enum, default_value_t = Scheme::Plain)]
    scheme: Scheme,
    #[arg(long, value_enum, default_value_t = Split::All)]
    split: Split,
    /// Training config whose [data] split to reproduce with --split val.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Windows per forward.
    #[arg(long, default_value_t = 4, value_parser = super::at_least_one)]
    batch: usize,
    /// Also compare against this base model on the same tokens: mean KL(base || model), its
    /// largest value and the share of tokens with the same top token (as llama-perplexity's
    /// --kl-divergence). Same tokenizer; e.g. a GGUF export against its checkpoint.
    #[arg(long = "kl-base")]
    kl_base: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<i32> {
    let (loaded, tok) = a.m.load()?;
    let max_pos = loaded.model.cfg.max_position_embeddings;
    anyhow::ensure!(
        a.ctx <= max_pos,
        "--ctx {}: the model '{}' has max_position_embeddings = {max_pos}; positions past it were never trained \
         (and would take long to score). Use --ctx {max_pos} or less",
        a.ctx,
        a.m.model
    );
    let tokens = match a.split {
        Split::All => tern::data::tokenize(&tok, &tern::data::read_text(&a.data)?)?,
        Split::Val => {
            let cfg = match &a.config {
                Some(p) => tern::train::TrainConfig::load(p, &[])?,
                None => loaded.train_config.clone().with_context(|| {
                    format!(
                        "--split val: model '{}' has no train_config.toml; pass --config",
                        a.m.model
                    )
                })?,
            };
            tern::data::load_split(&a.data, &tok, cfg.data.val_fraction, cfg.data.seq_len)?.val
        }
    };
    let windows = plan(tokens.len(), a.ctx, a.stride, a.scheme)?;
    let mut tokens = tokens;
    if let (Scheme::Llama, Some(bos)) = (a.scheme, tok.bos_to_add()) {
        // llama-perplexity puts BOS in each chunk's first place when the model asks for one
        // (that token is context only, never scored).
        for w in &windows {
            tokens[w.start] = bos;
        }
    }
    let t0 = Instant::now();
    let nll = score(&loaded.model, &tokens, &windows, a.batch)?;
    let secs = t0.elapsed().as_secs_f64();
    let p = perplexity(&nll);
    let bpt = bytes_per_token(
        &scored_targets(&tokens, &windows),
        &tok.token_byte_lengths(),
    );
    let bpb = bits_per_byte(p.nll, bpt);
    let tps = p.tokens as f64 / secs.max(1e-9);
    let kl = match &a.kl_base {
        Some(spec) => {
            let base = super::load_model(spec, a.m.precision, &a.m.device)
                .with_context(|| format!("--kl-base {spec}"))?;
            Some(tern::eval::kl_divergence(
                &loaded.model,
                &base.model,
                &tokens,
                &windows,
            )?)
        }
        None => None,
    };
    if a.json {
        let mut v = serde_json::json!({"ppl": p.ppl, "ppl_stderr": p.ppl_stderr, "nll": p.nll, "tokens": p.tokens, "tokens_per_sec": tps,
            "bpb": bpb, "bytes_per_token": bpt});
        if let Some(k) = &kl {
            v["kl"] = serde_json::to_value(k)?;
        }
        println!("{v}");
    } else {
        println!(
            "PPL = {:.4} +/- {:.4}, {bpb:.4} bits per byte ({bpt:.3} bytes per token)",
            p.ppl, p.ppl_stderr
        );
        println!(
            "{} tokens scored in {} windows, mean NLL {:.6}, {tps:.1} tokens/s",
            p.tokens,
            windows.len(),
            p.nll
        );
        if let Some(k) = &kl {
            println!(
                "KL(base || model) = {:.6} +/- {:.6} nats (max {:.4}); same top token {:.2}% of {} tokens",
                k.mean_kl,
                k.kl_stderr,
                k.max_kl,
                100.0 * k.same_top,
                k.tokens
            );
        }
    }
    Ok(0)
}
