//! `tern generate --model M -p PROMPT [-n 128] [--temp 0] [--top-k 40] [--top-p 0.95] ...`:
//! plain (contiguous or paged KV cache), beam search or tree speculative decoding.

use super::ModelArgs;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use tern::decode::generate::{generate_auto, generate_batch, generate_paged, GenerateConfig};
use tern::model::Model;
use tern::tokenizer::Tokenizer;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvCacheKind {
    /// Paged for packed (GGUF) models, which then decode without candle between the matmuls;
    /// contiguous otherwise.
    Auto,
    /// One tensor per layer, padded batch.
    Contiguous,
    /// Blocks from a pool, a block table per sequence, no padding.
    Paged,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DraftSource {
    /// Prompt lookup: continuations of earlier matches of the last tokens.
    Ngram,
    /// A smaller tern model sharing the tokenizer (--draft-model).
    Model,
}

#[derive(clap::Args, Debug)]
pub struct Args {
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
    #[command(flatten)]
    sampling: super::SamplingArgs,
    /// Stop when the generated text contains this string (repeatable); it is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// KV cache for plain generation.
    #[arg(long = "kv-cache", value_enum, default_value_t = KvCacheKind::Auto)]
    kv_cache: KvCacheKind,
    /// What the paged KV cache stores: f16 (half the reads per token; llama.cpp's default and
    /// `tern serve`'s) or f32 (exactly what the model computed).
    #[arg(long = "cache-type", value_enum, default_value_t = tern::decode::paged::KvType::F16)]
    cache_type: tern::decode::paged::KvType,
    /// Positions per block of the paged KV cache.
    #[arg(long = "block-size", default_value_t = tern::decode::generate::DEFAULT_BLOCK, value_parser = super::at_least_one)]
    block_size: usize,
    /// Beam search with this many beams (sampling flags are then ignored).
    #[arg(long, value_parser = super::at_least_one)]
    beams: Option<usize>,
    /// Beam score = total log-probability / generated_length^A.
    #[arg(long = "length-penalty", default_value_t = 1.0)]
    length_penalty: f64,
    /// Beams to print per prompt (default: all).
    #[arg(long = "num-return", value_parser = super::at_least_one)]
    num_return: Option<usize>,
    /// Tree speculative decoding (greedy, one prompt), drafts from `ngram` or `model`.
    #[arg(long, value_enum)]
    speculative: Option<DraftSource>,
    /// The smaller tern model that drafts for `--speculative model` (same tokenizer).
    #[arg(long = "draft-model")]
    draft_model: Option<String>,
    /// Draft tree depth (tokens per branch).
    #[arg(long = "draft-depth", default_value_t = 4, value_parser = super::at_least_one)]
    draft_depth: usize,
    /// Draft tree width (branches).
    #[arg(long = "draft-width", default_value_t = 2, value_parser = super::at_least_one)]
    draft_width: usize,
}

pub fn run(mut a: Args) -> Result<i32> {
    let sampler = a.sampling.config(0.0)?;
    for f in &a.prompt_files {
        a.prompts.push(
            std::fs::read_to_string(f).with_context(|| format!("--prompt-file {}", f.display()))?,
        );
    }
    anyhow::ensure!(
        !a.prompts.is_empty(),
        "give at least one --prompt or --prompt-file"
    );
    anyhow::ensure!(
        !(a.beams.is_some() && a.speculative.is_some()),
        "--beams and --speculative cannot be combined"
    );
    let (loaded, tok) = a.m.load()?;
    // A BOS first when the tokenizer asks for one (add_bos_token), as llama-cli does.
    let bos: Vec<u32> = tok.bos_to_add().into_iter().collect();
    let ids = a
        .prompts
        .iter()
        .map(|p| Ok([bos.clone(), tok.encode(p)?].concat()))
        .collect::<tern::Result<Vec<_>>>()?;
    let mut eos = tok.eos_ids();
    eos.extend(loaded.model.cfg.eos_ids());
    if let Some(beams) = a.beams {
        return print_beams(&loaded.model, &tok, &a, &ids, beams, eos);
    }
    if let Some(kind) = a.speculative {
        anyhow::ensure!(
            sampler.temp == 0.0,
            "--speculative verifies greedily: drop --temp (or set it to 0)"
        );
        anyhow::ensure!(
            ids.len() == 1,
            "--speculative takes one prompt, found {}",
            ids.len()
        );
        return print_speculative(&loaded.model, &tok, &a, &ids[0], &eos, kind);
    }
    let cfg = GenerateConfig {
        max_new: a.max_tokens,
        sampler,
        eos,
    };
    let (prompts, stop) = (&a.prompts, &a.stop);
    let stream = prompts.len() == 1;
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut printed = 0usize;
    if stream {
        print!("{}", prompts[0]);
    }
    let t0 = Instant::now();
    let on_token = |row: usize, t: u32| {
        generated[row].push(t);
        let text = tok.decode(&generated[row]).unwrap_or_default();
        let hit = stop.iter().filter_map(|s| text.find(s.as_str())).min();
        if stream {
            // Print what is final: up to a stop string, holding back a possible partial one.
            let hold = stop
                .iter()
                .map(|s| s.len().saturating_sub(1))
                .max()
                .unwrap_or(0);
            let upto = hit.unwrap_or(text.len().saturating_sub(hold));
            let upto = (0..=upto)
                .rev()
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
            if upto > printed {
                print!("{}", &text[printed..upto]);
                let _ = std::io::stdout().flush();
                printed = upto;
            }
        }
        hit.is_some()
    };
    let results = match a.kv_cache {
        KvCacheKind::Paged => generate_paged(
            &loaded.model,
            &ids,
            &cfg,
            a.block_size,
            a.cache_type,
            on_token,
        )?,
        KvCacheKind::Contiguous => generate_batch(&loaded.model, &ids, &cfg, on_token)?,
        KvCacheKind::Auto => generate_auto(&loaded.model, &ids, &cfg, a.cache_type, on_token)?,
    };
    let secs = t0.elapsed().as_secs_f64();
    let n_new: usize = results.iter().map(|r| r.0.len()).sum();
    for (i, (toks, finish)) in results.iter().enumerate() {
        let text = tok.decode(toks)?;
        let cut = stop
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
            .unwrap_or(text.len());
        if stream {
            if cut > printed {
                print!("{}", &text[printed..cut]);
            }
            println!();
        } else {
            println!(
                "=== prompt {} ({finish:?}) ===\n{}{}",
                i + 1,
                prompts[i],
                &text[..cut]
            );
        }
    }
    eprintln!(
        "{n_new} tokens in {secs:.2} s ({:.1} tokens/s, prefill included)",
        n_new as f64 / secs.max(1e-9)
    );
    Ok(0)
}

fn print_speculative(
    model: &Model,
    tok: &Tokenizer,
    a: &Args,
    ids: &[u32],
    eos: &[u32],
    kind: DraftSource,
) -> Result<i32> {
    use tern::decode::speculative::{generate_speculative, Drafter};
    let draft_loaded;
    let mut drafter = match kind {
        DraftSource::Ngram => {
            anyhow::ensure!(
                a.draft_model.is_none(),
                "--draft-model is only used with --speculative model"
            );
            Drafter::Ngram
        }
        DraftSource::Model => {
            let spec = a
                .draft_model
                .as_deref()
                .context("--speculative model needs --draft-model PATH")?;
            draft_loaded = super::load_model(spec, tern::runtime::Precision::Ternary, &a.m.device)
                .with_context(|| format!("--draft-model {spec}"))?;
            Drafter::Model {
                model: &draft_loaded.model,
                cache: tern::model::KvCache::new(draft_loaded.model.cfg.num_hidden_layers),
            }
        }
    };
    let t0 = Instant::now();
    let (toks, stats) = generate_speculative(
        model,
        &mut drafter,
        ids,
        a.max_tokens,
        a.draft_depth,
        a.draft_width,
        eos,
    )?;
    let secs = t0.elapsed().as_secs_f64();
    println!("{}{}", a.prompts[0], tok.decode(&toks)?);
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
    model: &Model,
    tok: &Tokenizer,
    a: &Args,
    ids: &[Vec<u32>],
    beams: usize,
    eos: Vec<u32>,
) -> Result<i32> {
    use tern::decode::beam::{beam_search, BeamConfig, QwenBeams};
    let r = a.num_return.unwrap_or(beams);
    anyhow::ensure!(
        r <= beams,
        "--num-return must be between 1 and --beams ({beams}), found {r}"
    );
    let cfg = BeamConfig {
        beams,
        length_penalty: a.length_penalty,
        max_new: a.max_tokens,
        eos,
    };
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
                a.prompts[i],
                tok.decode(&h.tokens)?
            );
        }
    }
    eprintln!(
        "beam search ({beams} beams) in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(0)
}
