//! Checkpoints in Hugging Face layout: `config.json`, then either `model.safetensors` or
//! `model.safetensors.index.json` + shards, and optionally `tokenizer.json`.
//!
//! The same loader serves hub downloads (a snapshot directory in the hub cache), local HF
//! directories and tern's own checkpoints. Every tensor is checked by name and shape against the
//! architecture; bf16/f16/f64 tensors become f32 latents. tern writes its ternary settings into
//! config.json under `tern_quant` (ignored by transformers), so a checkpoint remembers its mode.

use super::config::ModelConfig;
use super::params::{expected_shapes, Params, LM_HEAD};
use crate::error::{Error, Result};
use crate::files::{sync_and_rename, write_atomic};
use crate::hub::{CONFIG_FILE, INDEX_FILE, TOKENIZER_FILE, WEIGHTS_FILE};
use crate::quant::QuantConfig;
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A loaded checkpoint: architecture, parameters and where it came from.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    /// The ternary settings the checkpoint was saved with (`tern_quant`), if any.
    pub quant: Option<QuantConfig>,
    pub params: Params,
    pub tokenizer: Option<PathBuf>,
}

/// Safetensors files that make up the weights of `dir`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::checkpoint(&index, format!("invalid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::checkpoint(&index, "missing the object 'weight_map'"))?;
        let mut files: Vec<String> = map
            .values()
            .map(|f| f.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::checkpoint(&index, "weight_map values must be file names"))?;
        files.sort();
        files.dedup();
        let mut out = Vec::new();
        for f in files {
            if f.contains('/') || f.contains("..") {
                return Err(Error::checkpoint(
                    &index,
                    format!("shard name '{f}' is not a plain file name"),
                ));
            }
            let p = dir.join(&f);
            if !p.is_file() {
                return Err(Error::checkpoint(
                    &index,
                    format!("lists shard '{f}', which does not exist"),
                ));
            }
            out.push(p);
        }
        return Ok(out);
    }
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::checkpoint(
        dir,
        format!("no {WEIGHTS_FILE} and no {INDEX_FILE}"),
    ))
}

fn open_safetensors(path: &Path) -> Result<MmapedSafetensors> {
    // SAFETY: the file is mapped read-only; tern never writes a file it has mapped (checkpoints
    // are written to a new name and renamed into place).
    unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
        Error::checkpoint(
            path,
            format!("cannot read safetensors (truncated or not a safetensors file?): {e}"),
        )
    })
}

/// Reads `tern_quant` from a config.json, when tern wrote one.
fn read_quant(config_path: &Path) -> Result<Option<QuantConfig>> {
    let text = std::fs::read_to_string(config_path).map_err(|e| Error::io(config_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(config_path, format!("invalid JSON: {e}")))?;
    match v.get("tern_quant") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(q) => serde_json::from_value(q.clone())
            .map(Some)
            .map_err(|e| Error::checkpoint(config_path, format!("key 'tern_quant': {e}"))),
    }
}

/// Loads an HF-layout checkpoint directory onto `device`, latents in `dtype` (f32 for training).
pub fn load_checkpoint(dir: &Path, dtype: DType, device: &Device) -> Result<Checkpoint> {
    if !dir.is_dir() {
        return Err(Error::checkpoint(dir, "not a directory"));
    }
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        return Err(Error::checkpoint(dir, format!("missing {CONFIG_FILE}")));
    }
    let config = ModelConfig::from_json_file(&config_path)?;
    let quant = read_quant(&config_path)?;
    let files = weight_files(dir)?;
    let params = load_params(&files, &config, dtype, device)?;
    let tok = dir.join(TOKENIZER_FILE);
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        config,
        quant,
        params,
        tokenizer: tok.is_file().then_some(tok),
    })
}

/// Loads and checks every tensor of `cfg` from the given safetensors files.
pub fn load_params(
    files: &[PathBuf],
    cfg: &ModelConfig,
    dtype: DType,
    device: &Device,
) -> Result<Params> {
    let mut maps = Vec::with_capacity(files.len());
    let mut owner: HashMap<String, usize> = HashMap::new();
    for (i, f) in files.iter().enumerate() {
        let st = open_safetensors(f)?;
        for (name, _) in st.tensors() {
            if let Some(prev) = owner.insert(name.clone(), i) {
                return Err(Error::checkpoint(
                    f,
                    format!("tensor '{name}' also appears in {}", files[prev].display()),
                ));
            }
        }
        maps.push(st);
    }
    let where_ = || {
        files
            .first()
            .and_then(|f| f.parent())
            .map(Path::to_path_buf)
            .unwrap_or_default()
    };

    let expected = expected_shapes(cfg);
    let expected_names: BTreeMap<&str, &Vec<usize>> =
        expected.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let missing: Vec<&str> = expected_names
        .keys()
        .copied()
        .filter(|n| !owner.contains_key(*n))
        .collect();
    if !missing.is_empty() {
        return Err(Error::checkpoint(
            where_(),
            format!("missing {} tensor(s): {}", missing.len(), list(&missing)),
        ));
    }
    let mut unexpected: Vec<&str> = Vec::new();
    for name in owner.keys() {
        if expected_names.contains_key(name.as_str()) {
            continue;
        }
        if is_ignorable(name, cfg) {
            tracing::warn!("ignoring tensor '{name}' (tied LM head or rotary buffer)");
            continue;
        }
        unexpected.push(name);
    }
    if !unexpected.is_empty() {
        unexpected.sort();
        return Err(Error::checkpoint(
            where_(),
            format!(
                "{} unexpected tensor(s) for this architecture: {}",
                unexpected.len(),
                list(&unexpected)
            ),
        ));
    }

    let mut tensors = Vec::with_capacity(expected.len());
    for (name, shape) in &expected {
        let file = &files[owner[name]];
        let st = &maps[owner[name]];
        let view = st
            .get(name)
            .map_err(|e| Error::checkpoint(file, format!("tensor '{name}': {e}")))?;
        if view.shape() != shape.as_slice() {
            return Err(Error::checkpoint(
                file,
                format!(
                    "tensor '{name}': expected shape {shape:?}, found {:?}",
                    view.shape()
                ),
            ));
        }
        let t = st
            .load(name, device)
            .map_err(|e| Error::checkpoint(file, format!("tensor '{name}': {e}")))?;
        let t = t.to_dtype(dtype)?;
        check_finite(&t, name, file)?;
        tensors.push((name.clone(), t));
    }
    Params::from_tensors(tensors)
}

/// Tensors a Qwen3 checkpoint may carry that tern does not need.
fn is_ignorable(name: &str, cfg: &ModelConfig) -> bool {
    (name == LM_HEAD && cfg.tie_word_embeddings) || name.ends_with("rotary_emb.inv_freq")
}

fn check_finite(t: &Tensor, name: &str, file: &Path) -> Result<()> {
    let s = t
        .to_dtype(DType::F32)?
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?;
    if !s.is_finite() {
        return Err(Error::checkpoint(
            file,
            format!("tensor '{name}' holds NaN or Inf values"),
        ));
    }
    Ok(())
}

fn list(names: &[&str]) -> String {
    let shown: Vec<&str> = names.iter().take(8).copied().collect();
    let more = names.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} (and {more} more)", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// The config.json tern writes: the HF fields transformers reads, plus `tern_quant`.
pub fn config_json(cfg: &ModelConfig, quant: &QuantConfig) -> Result<serde_json::Value> {
    let mut v =
        serde_json::to_value(cfg).map_err(|e| Error::Msg(format!("serializing config: {e}")))?;
    let obj = v.as_object_mut().expect("config serializes to an object");
    obj.insert(
        "architectures".into(),
        serde_json::json!([cfg.arch.hf_class()]),
    );
    obj.insert("model_type".into(), serde_json::json!(cfg.arch.name()));
    obj.insert("hidden_act".into(), serde_json::json!("silu"));
    obj.insert("attention_bias".into(), serde_json::json!(false));
    if cfg.arch == crate::model::config::Arch::Llama {
        obj.insert("mlp_bias".into(), serde_json::json!(false));
    }
    obj.insert("torch_dtype".into(), serde_json::json!("float32"));
    obj.insert("head_dim".into(), serde_json::json!(cfg.head_dim()));
    obj.insert(
        "num_key_value_heads".into(),
        serde_json::json!(cfg.kv_heads()),
    );
    obj.insert(
        "tern_quant".into(),
        serde_json::to_value(quant).expect("quant serializes"),
    );
    Ok(v)
}

/// Writes an HF-layout checkpoint into `dir` (created if needed): config.json, model.safetensors
/// (f32) and the tokenizer when given (tokenizer.json, and tokenizer_config.json with its special
/// tokens and chat template). Files are written under temporary names and
/// renamed, so an interrupted save never leaves a half-written file under a real name.
pub fn save_checkpoint(
    dir: &Path,
    cfg: &ModelConfig,
    quant: &QuantConfig,
    params: &Params,
    tokenizer: Option<&crate::tokenizer::Tokenizer>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, var) in params.iter() {
        tensors.insert(
            name.clone(),
            var.as_tensor()
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?,
        );
    }
    let weights = dir.join(WEIGHTS_FILE);
    let tmp = dir.join(format!(".{WEIGHTS_FILE}.tmp"));
    candle_core::safetensors::save(&tensors, &tmp)?;
    sync_and_rename(&tmp, &weights)?;

    let json = serde_json::to_string_pretty(&config_json(cfg, quant)?).expect("json");
    write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())?;
    if let Some(tok) = tokenizer {
        tok.save_into(dir)?;
    }
    Ok(())
}
