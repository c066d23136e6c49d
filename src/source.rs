//! The one place a model spec is resolved, for every command and for training:
//!
//! ```text
//! spec = a GGUF file (*.gguf)          -> gguf metadata, weights dequantized, its own tokenizer
//!      | an HF-layout directory         -> config.json, safetensors, tokenizer.json (+ _config)
//!      | a hub id (org/name)            -> hf-hub snapshot directory, then as above
//! ```
//!
//! [`resolve`] says which kind a spec is (without reading weights); [`load_latents`] gives the
//! architecture, the f32 latent weights and the tokenizer of any kind; [`load_tokenizer`] the
//! tokenizer alone. Inference of a packed GGUF (weights kept 2-bit) is `runtime`'s, on top of
//! [`Spec`].

use crate::error::{Error, Result};
use crate::gguf::{self, GgufFile};
use crate::hub::{resolve_model_dir, HubOptions, CONFIG_FILE, TOKENIZER_FILE};
use crate::model::{io::weight_files, load_checkpoint, ModelConfig, Params};
use crate::quant::{QuantConfig, ScaleRule};
use crate::tokenizer::{Tokenizer, TOKENIZER_CONFIG_FILE};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// What a model spec names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// A directory in Hugging Face layout (local, or a hub snapshot).
    Dir(PathBuf),
    /// A GGUF file.
    Gguf(PathBuf),
}

/// True for a path that names a GGUF file (by its extension).
pub fn is_gguf_path(spec: &str) -> bool {
    Path::new(spec)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Which kind of model `spec` names; hub ids are fetched (or found in the cache) here.
pub fn resolve(spec: &str, hub: &HubOptions) -> Result<Spec> {
    if is_gguf_path(spec) {
        let p = Path::new(spec);
        if !p.is_file() {
            return Err(Error::Msg(format!("model '{spec}': no such GGUF file")));
        }
        return Ok(Spec::Gguf(p.to_path_buf()));
    }
    Ok(Spec::Dir(resolve_model_dir(spec, hub)?))
}

/// A model as training, export and the KL base take it: f32 latents with their architecture.
pub struct Latents {
    pub spec: Spec,
    pub config: ModelConfig,
    /// The ternary settings the model was saved with (a tern checkpoint's `tern_quant`, a tern
    /// GGUF's `tern.*`), if any.
    pub quant: Option<QuantConfig>,
    pub params: Params,
    pub tokenizer: Option<Tokenizer>,
    /// Every file the weights, config and tokenizer were read from (outputs must not be these).
    pub inputs: Vec<PathBuf>,
}

impl Latents {
    /// A short name for the model: the directory's or the file's stem.
    pub fn name(&self) -> String {
        let p = match &self.spec {
            Spec::Dir(d) => d.file_name(),
            Spec::Gguf(f) => f.file_stem(),
        };
        p.map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "tern".into())
    }

    /// The directory of an HF-layout model (None for a GGUF).
    pub fn dir(&self) -> Option<&Path> {
        match &self.spec {
            Spec::Dir(d) => Some(d),
            Spec::Gguf(_) => None,
        }
    }
}

/// The tern quantization settings a GGUF records, when tern wrote it. An unknown
/// `tern.act_quant` is an error (training on with the wrong input scheme would go unnoticed).
fn gguf_quant(file: &GgufFile) -> Result<Option<QuantConfig>> {
    if file.get("tern.ternary").is_none() {
        return Ok(None);
    }
    let mut q = QuantConfig {
        ternary: gguf::is_ternary(file),
        ..QuantConfig::default()
    };
    // A key that is there but unreadable is an error, not the default: training on from this
    // file would otherwise quietly use another rule than the one that made it.
    let bad = |key: &str, expected: String, v: &crate::gguf::file::Value| {
        Error::Msg(format!(
            "GGUF {}: {key}: expected {expected}, found {v:?}",
            file.path.display()
        ))
    };
    if let Some(v) = file.get("tern.group_size") {
        let g = v.as_u64().filter(|&g| g > 0);
        q.group_size =
            g.ok_or_else(|| bad("tern.group_size", "a positive integer".into(), v))? as usize;
    }
    q.act_quant = crate::gguf::load::act_quant_of(file)?;
    if let Some(v) = file.get("tern.scale") {
        use clap::ValueEnum;
        let rule = v.as_str().and_then(|s| ScaleRule::from_str(s, false).ok());
        q.scale = rule.ok_or_else(|| {
            let names = ScaleRule::value_variants()
                .iter()
                .map(|r| format!("\"{r}\""));
            bad("tern.scale", names.collect::<Vec<_>>().join(" or "), v)
        })?;
    }
    Ok(Some(q))
}

/// The tokenizer of a GGUF: its own, else a tokenizer.json beside the file.
pub fn gguf_tokenizer(file: &GgufFile) -> Result<Option<Tokenizer>> {
    if let Some(t) = gguf::tokenizer_from_gguf(file)? {
        return Ok(Some(t));
    }
    let beside = file.path.with_file_name(TOKENIZER_FILE);
    beside
        .is_file()
        .then(|| Tokenizer::from_file(&beside))
        .transpose()
}

fn dir_tokenizer(dir: &Path) -> Result<Option<Tokenizer>> {
    let tok = dir.join(TOKENIZER_FILE);
    tok.is_file()
        .then(|| Tokenizer::from_file(&tok))
        .transpose()
}

/// Architecture, f32 latent weights (on `device`, in `dtype`) and tokenizer of any spec.
pub fn load_latents(spec: &str, dtype: DType, device: &Device) -> Result<Latents> {
    let kind = resolve(spec, &HubOptions::from_env())?;
    match &kind {
        Spec::Dir(dir) => {
            let ck = load_checkpoint(dir, dtype, device)?;
            let mut inputs = weight_files(dir)?;
            inputs.push(dir.join(CONFIG_FILE));
            for f in [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE] {
                if dir.join(f).is_file() {
                    inputs.push(dir.join(f));
                }
            }
            Ok(Latents {
                tokenizer: dir_tokenizer(dir)?,
                spec: kind.clone(),
                config: ck.config,
                quant: ck.quant,
                params: ck.params,
                inputs,
            })
        }
        Spec::Gguf(path) => {
            let file = GgufFile::read(path)?;
            let (config, params) = gguf::latents_from_gguf(&file)?;
            let params = params_on(params, device, dtype)?;
            let tokenizer = gguf_tokenizer(&file)?;
            let mut inputs = vec![path.clone()];
            inputs.extend(tokenizer.as_ref().map(|t| t.path.clone()));
            Ok(Latents {
                spec: kind.clone(),
                config,
                quant: gguf_quant(&file)?,
                params,
                tokenizer,
                inputs,
            })
        }
    }
}

/// `params` (f32 on the CPU, as GGUF latents are read) on `device` in `dtype`; no copy when they
/// already are.
pub fn params_on(params: Params, device: &Device, dtype: DType) -> Result<Params> {
    if device.is_cpu() && dtype == DType::F32 {
        return Ok(params);
    }
    Params::from_tensors(
        params
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_device(device)?.to_dtype(dtype)?)))
            .collect::<Result<Vec<_>>>()?,
    )
}

/// The tokenizer of a model spec (None when the model has none), without loading its weights.
pub fn load_tokenizer(spec: &str) -> Result<Option<Tokenizer>> {
    match resolve(spec, &HubOptions::from_env())? {
        Spec::Dir(dir) => dir_tokenizer(&dir),
        Spec::Gguf(path) => gguf_tokenizer(&GgufFile::read(&path)?),
    }
}

/// A tokenizer from a spec: a GGUF file's own, else a tokenizer.json path, a directory holding
/// one, or a hub id.
pub fn tokenizer_from_spec(spec: &str) -> Result<Tokenizer> {
    if is_gguf_path(spec) {
        return load_tokenizer(spec)?.ok_or_else(|| {
            Error::Msg(format!(
                "tokenizer '{spec}': the GGUF file carries no tokenizer"
            ))
        });
    }
    Tokenizer::load(spec, &HubOptions::from_env())
}
