//! `tern tokenizer train --data FILE --vocab-size N --out tokenizer.json`: a byte-level BPE for
//! from-scratch models, fitted to their own text (Qwen3's pre-tokenization and added tokens, so
//! export and llama.cpp treat it exactly like Qwen3's).
//!
//! `tern tokenizer encode --tokenizer SPEC (--file F | -p TEXT)`: the token ids, printed as
//! `llama-tokenize --ids` prints them (a JSON list), from a tokenizer.json or a GGUF's own.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// Train a byte-level BPE on a UTF-8 text file.
    Train(TrainArgs),
    /// Print the token ids of a text (as `llama-tokenize --ids`: a JSON list, no BOS added).
    Encode(EncodeArgs),
}

#[derive(clap::Args, Debug)]
pub struct EncodeArgs {
    /// tokenizer.json path, directory, hub id, or a GGUF file (its own tokenizer).
    #[arg(long)]
    tokenizer: String,
    /// UTF-8 text file to encode (read verbatim).
    #[arg(short = 'f', long, conflicts_with = "prompt")]
    file: Option<PathBuf>,
    /// Text to encode.
    #[arg(short = 'p', long)]
    prompt: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// UTF-8 text to fit the vocabulary to.
    #[arg(long)]
    data: PathBuf,
    /// Tokens in all: 256 bytes + merges + Qwen3's 26 added tokens.
    #[arg(long = "vocab-size", value_parser = super::at_least_one)]
    vocab_size: usize,
    /// Output tokenizer.json (refused if it is --data).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(cmd: Cmd) -> Result<i32> {
    match cmd {
        Cmd::Train(a) => train(a),
        Cmd::Encode(a) => encode(a),
    }
}

fn encode(a: EncodeArgs) -> Result<i32> {
    let tok = super::load_tokenizer(&a.tokenizer)?;
    let text = match (&a.file, &a.prompt) {
        (Some(f), _) => tern::data::read_text(f)?,
        (None, Some(p)) => p.clone(),
        (None, None) => anyhow::bail!("give the text with --file F or -p TEXT"),
    };
    let ids = tok.encode(&text)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(0)
}

fn train(a: TrainArgs) -> Result<i32> {
    tern::files::ensure_not_an_input(&a.out, std::slice::from_ref(&a.data), "--out")?;
    let text = tern::data::read_text(&a.data)?;
    let t0 = Instant::now();
    let tk = tern::tokenizer::train_bpe(&text, a.vocab_size)?;
    let json = tk
        .to_string(true)
        .map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}"))?;
    tern::files::write_atomic(&a.out, json.as_bytes())
        .with_context(|| format!("writing {}", a.out.display()))?;
    let tok = tern::tokenizer::Tokenizer::from_file(&a.out)?;
    let ids = tern::data::tokenize(&tok, &text)?;
    println!(
        "{}: {} tokens ({} requested), trained in {:.1} s; {} encodes to {} tokens ({:.3} bytes per token)",
        a.out.display(),
        tok.vocab_size(),
        a.vocab_size,
        t0.elapsed().as_secs_f64(),
        a.data.display(),
        ids.len(),
        text.len() as f64 / ids.len().max(1) as f64
    );
    if tok.vocab_size() < a.vocab_size {
        println!(
            "note: the text has too few repeated pairs for {} tokens; a model's vocab_size may still be {}",
            a.vocab_size, a.vocab_size
        );
    }
    Ok(0)
}
