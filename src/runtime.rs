//! Loading a model for inference (eval, generate, the KL base, the draft model): any spec
//! `source` resolves (a tern checkpoint, an HF-layout directory, a hub id, a GGUF file), in
//! ternary or full precision, frozen (projected once, detached). tern's own ternary GGUF exports
//! run packed (2-bit codes multiplied directly, CPU); other GGUFs are dequantized.

use crate::error::{Error, Result};
use crate::hub::HubOptions;
use crate::model::{load_checkpoint, Model};
use crate::quant::QuantConfig;
use crate::source::{gguf_tokenizer, resolve, Spec};
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
    pub model: Model,
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
    match resolve(spec, &HubOptions::from_env())? {
        Spec::Gguf(path) => load_gguf(spec, &path, precision, device),
        Spec::Dir(dir) => load_dir(dir, precision, device),
    }
}

/// A GGUF: tern's ternary exports as they are (packed 2-bit or projected dense, CPU); any other
/// (F16, Q8_0, Q4_1, K-quants, ...) as dequantized latents, projected unless `--precision full`.
fn load_gguf(
    spec: &str,
    path: &std::path::Path,
    precision: Precision,
    device: &Device,
) -> Result<LoadedModel> {
    let file = crate::gguf::GgufFile::read(path)?;
    let tokenizer = gguf_tokenizer(&file)?;
    let dir = path.parent().map(PathBuf::from).unwrap_or_default();
    let (model, quant) = if crate::gguf::is_ternary(&file) {
        if !device.is_cpu() {
            return Err(Error::Msg(format!(
                "model '{spec}': packed GGUF models run on the CPU only (--device cpu)"
            )));
        }
        let model = crate::gguf::load_model(&file)?;
        let quant = model.quant;
        (model, quant)
    } else {
        let (cfg, params) = crate::gguf::latents_from_gguf(&file)?;
        let params = crate::source::params_on(params, device, DType::F32)?;
        let quant = QuantConfig {
            ternary: precision == Precision::Ternary,
            ..QuantConfig::default()
        };
        (Model::new(&cfg, quant, &params)?.freeze()?, quant)
    };
    Ok(LoadedModel {
        model,
        quant,
        tokenizer,
        dir,
        train_config: None,
    })
}

/// An HF-layout directory (a tern checkpoint brings its training config along).
fn load_dir(dir: PathBuf, precision: Precision, device: &Device) -> Result<LoadedModel> {
    let ck = load_checkpoint(&dir, DType::F32, device)?;
    let quant = QuantConfig {
        ternary: precision == Precision::Ternary,
        ..ck.quant.unwrap_or_default()
    };
    let model = Model::new(&ck.config, quant, &ck.params)?.freeze()?;
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
