//! One module per command: its flags (typed, clap derive) and a `run` that returns the exit
//! code. Errors carry context (anyhow) and are printed by `main`.

pub mod bench;
pub mod chat;
pub mod eval;
pub mod export;
pub mod generate;
pub mod info;
pub mod plot;
pub mod serve;
pub mod tokenizer;
pub mod train;
pub mod verify;

use anyhow::{Context, Result};
use tern::decode::sampler::SamplerConfig;
use tern::runtime::{LoadedModel, Precision};
use tern::tokenizer::Tokenizer;

/// How eval, generate and the benches find their model and tokenizer.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// tern checkpoint dir, HF-layout dir, hub id, or a .gguf (tern's ternary exports run packed on
    /// the CPU; other GGUFs, e.g. Q8_0/Q4_1/K-quants of Llama or Qwen3, are dequantized).
    #[arg(long)]
    pub model: String,
    /// `ternary` (default) or `full` precision (checkpoints).
    #[arg(long, value_enum, default_value_t = Precision::Ternary)]
    pub precision: Precision,
    /// tokenizer.json path or hub id (default: the model's own).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// auto | cpu | cuda[:N] | metal[:N]
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl ModelArgs {
    pub fn load(&self) -> Result<(LoadedModel, Tokenizer)> {
        let mut loaded = load_model(&self.model, self.precision, &self.device)?;
        let tok = match &self.tokenizer {
            Some(spec) => load_tokenizer(spec)?,
            None => loaded.tokenizer.take().with_context(|| {
                format!(
                    "model '{}' has no tokenizer (no tokenizer.json beside it, none in the GGUF); pass --tokenizer",
                    self.model
                )
            })?,
        };
        Ok((loaded, tok))
    }
}

/// The sampling flags of `tern generate` and `tern chat` (llama-cli's names and meanings).
#[derive(clap::Args, Debug)]
pub struct SamplingArgs {
    /// Temperature; 0 = greedy (default: 0 for generate, 0.8 for chat).
    #[arg(long)]
    pub temp: Option<f64>,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long = "top-k", default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling: smallest set with cumulative probability >= p (1 = off).
    #[arg(long = "top-p", default_value_t = 0.95)]
    pub top_p: f64,
    /// Drop tokens with probability < min_p * p(most likely) (0 = off).
    #[arg(long = "min-p", default_value_t = 0.05)]
    pub min_p: f64,
    /// Repetition penalty on the last --repeat-last-n tokens (1 = off, llama-cli's meaning).
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    pub repeat_penalty: f64,
    /// Tokens the repetition penalty looks back over (0 = off).
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Sampling seed (generate: prompt i uses seed + i; chat: turn i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The sampler these flags ask for (temperature `default_temp` unless given), checked.
    pub fn config(&self, default_temp: f64) -> Result<SamplerConfig> {
        let c = SamplerConfig {
            temp: self.temp.unwrap_or(default_temp),
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            seed: self.seed,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
        };
        c.validate()?;
        Ok(c)
    }
}

/// A tokenizer from a tokenizer.json path, a directory, a hub id, or a GGUF file's own.
pub fn load_tokenizer(spec: &str) -> Result<Tokenizer> {
    Ok(tern::source::tokenizer_from_spec(spec)?)
}

/// A model for inference on `device` (`auto` puts a packed GGUF on the CPU, where it runs).
pub fn load_model(spec: &str, precision: Precision, device: &str) -> Result<LoadedModel> {
    let device = if is_gguf(spec) && device == "auto" {
        candle_core::Device::Cpu
    } else {
        tern::device::parse_device(device)?
    };
    Ok(tern::runtime::load_for_inference(spec, precision, &device)?)
}

/// A model's latent weights (f32, CPU) from any spec: for export and verify.
pub fn load_latents(spec: &str) -> Result<tern::source::Latents> {
    Ok(tern::source::load_latents(
        spec,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?)
}

/// True for a path that names a GGUF file.
pub fn is_gguf(path: &str) -> bool {
    tern::source::is_gguf_path(path)
}

/// A value parser for counts that must be at least 1.
pub fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1 (0 is not a valid count)".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("expected a positive integer: {e}")),
    }
}
