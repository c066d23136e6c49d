//! Loading a model for inference (eval, generate): a tern checkpoint directory, an HF-layout
//! directory or a hub id, in ternary or full precision, frozen (projected once, detached).

use crate::error::{Error, Result};
use crate::hub::{resolve_model_dir, HubOptions};
use crate::model::{load_checkpoint, Qwen3};
use crate::quant::QuantConfig;
use crate::tokenizer::Tokenizer;
use crate::train::checkpoint::CONFIG_COPY;
use crate::train::TrainConfig;
use candle_core::{DType, Device};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    Ternary,
    Full,
}

pub struct LoadedModel {
    pub model: Qwen3,
    pub quant: QuantConfig,
    pub tokenizer: Option<Tokenizer>,
    pub dir: PathBuf,
    /// The training config saved beside a tern checkpoint (train_config.toml), if any.
    pub train_config: Option<TrainConfig>,
}

pub fn load_for_inference(
    spec: &str,
    precision: Precision,
    device: &Device,
) -> Result<LoadedModel> {
    if spec.to_ascii_lowercase().ends_with(".gguf") {
        if !device.is_cpu() {
            return Err(Error::Msg(format!(
                "model '{spec}': GGUF models run on the CPU only (--device cpu)"
            )));
        }
        let file = crate::gguf::GgufFile::read(std::path::Path::new(spec))?;
        let model = crate::gguf::load_model(&file)?;
        // A tokenizer.json beside the file is used when present (else pass --tokenizer).
        let dir = std::path::Path::new(spec)
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default();
        let tok = dir.join("tokenizer.json");
        let tokenizer = if tok.is_file() {
            Some(Tokenizer::from_file(&tok)?)
        } else {
            None
        };
        let quant = model.quant;
        return Ok(LoadedModel {
            model,
            quant,
            tokenizer,
            dir,
            train_config: None,
        });
    }
    let dir = resolve_model_dir(spec, &HubOptions::from_env())?;
    let ck = load_checkpoint(&dir, DType::F32, device)?;
    let quant = QuantConfig {
        ternary: precision == Precision::Ternary,
        ..ck.quant.unwrap_or_default()
    };
    let model = Qwen3::new(&ck.config, quant, &ck.params)?.freeze()?;
    let tokenizer = ck
        .tokenizer
        .as_deref()
        .map(Tokenizer::from_file)
        .transpose()?;
    let cfg_path = dir.join(CONFIG_COPY);
    let train_config = if cfg_path.is_file() {
        Some(TrainConfig::load(&cfg_path, &[])?)
    } else {
        None
    };
    Ok(LoadedModel {
        model,
        quant,
        tokenizer,
        dir,
        train_config,
    })
}
