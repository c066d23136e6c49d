//! One module per command: its flags (typed, clap derive) and a `run` that returns the exit
//! code. Errors carry context (anyhow) and are printed by `main`.

pub mod bench;
pub mod eval;
pub mod export;
pub mod generate;
pub mod info;
pub mod plot;
pub mod tokenizer;
pub mod train;
pub mod verify;

use anyhow::{Context, Result};
use std::path::Path;
use tern::runtime::{LoadedModel, Precision};
use tern::tokenizer::Tokenizer;

/// How eval, generate and the benches find their model and tokenizer.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// tern checkpoint dir, HF-layout dir, hub id, or an exported .gguf (CPU, packed).
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
            Some(spec) => Tokenizer::load(spec, &tern::hub::HubOptions::from_env())?,
            None => loaded.tokenizer.take().with_context(|| {
                format!(
                    "model '{}' has no tokenizer.json beside it; pass --tokenizer",
                    self.model
                )
            })?,
        };
        Ok((loaded, tok))
    }
}

/// A model for inference on `device` (`auto` puts a packed GGUF on the CPU, where it runs).
pub fn load_model(spec: &str, precision: Precision, device: &str) -> Result<LoadedModel> {
    let is_gguf = spec.to_ascii_lowercase().ends_with(".gguf");
    let device = if is_gguf && device == "auto" {
        candle_core::Device::Cpu
    } else {
        tern::device::parse_device(device)?
    };
    Ok(tern::runtime::load_for_inference(spec, precision, &device)?)
}

/// A checkpoint's latent weights (f32, CPU): for export and verify.
pub fn load_latents(spec: &str) -> Result<tern::model::Checkpoint> {
    let dir = tern::hub::resolve_model_dir(spec, &tern::hub::HubOptions::from_env())?;
    Ok(tern::model::load_checkpoint(
        &dir,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?)
}

/// True for a path that names a GGUF file.
pub fn is_gguf(path: &str) -> bool {
    Path::new(path)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// A value parser for counts that must be at least 1.
pub fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1 (0 is not a valid count)".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("expected a positive integer: {e}")),
    }
}
