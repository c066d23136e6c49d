//! Run checkpoints: `out_dir/checkpoints/step-NNNNNNNN/` holding the model in HF layout
//! (config.json, model.safetensors, tokenizer.json), `optimizer.safetensors`, `train_config.toml`
//! and `state.json` (step, data position, optimizer step count, counters).
//!
//! Atomicity: everything is written into `.tmp-step-NNNNNNNN/`, fsynced, and the directory is
//! renamed into place; `state.json` is written last. A crash or kill -9 mid-write leaves only a
//! `.tmp-*` directory, which resume ignores (and removes), so the previous checkpoint is intact.

use super::config::TrainConfig;
use super::optim::AdamW;
use crate::data::DataPosition;
use crate::error::{Error, Result};
use crate::files::write_atomic;
use crate::model::io::save_checkpoint;
use crate::model::{params::Params, ModelConfig};
use crate::quant::QuantConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const CONFIG_COPY: &str = "train_config.toml";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunState {
    pub format: u32,
    /// Optimizer steps completed.
    pub step: usize,
    pub data: DataPosition,
    pub data_seed: u64,
    pub adam_t: u64,
    pub tokens_seen: u64,
    pub bad_steps_in_a_row: usize,
    pub skipped_steps: usize,
    pub elapsed_s: f64,
}

pub fn checkpoints_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("checkpoints")
}

fn step_name(step: usize) -> String {
    format!("step-{step:08}")
}

/// Writes a complete checkpoint for `state.step`; returns its directory.
pub struct CheckpointParts<'a> {
    pub model_cfg: &'a ModelConfig,
    pub quant: &'a QuantConfig,
    pub params: &'a Params,
    pub tokenizer: Option<&'a crate::tokenizer::Tokenizer>,
    pub opt: &'a AdamW,
    pub train_cfg: &'a TrainConfig,
    pub state: &'a RunState,
}

pub fn save(out_dir: &Path, p: &CheckpointParts) -> Result<PathBuf> {
    let root = checkpoints_dir(out_dir);
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let name = step_name(p.state.step);
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    save_checkpoint(&tmp, p.model_cfg, p.quant, p.params, p.tokenizer)?;
    let opt_tmp = tmp.join(format!(".{OPTIMIZER_FILE}.tmp"));
    p.opt.save(&opt_tmp)?;
    fsync_file(&opt_tmp)?;
    std::fs::rename(&opt_tmp, tmp.join(OPTIMIZER_FILE)).map_err(|e| Error::io(&tmp, e))?;
    let cfg_text = toml::to_string_pretty(p.train_cfg)
        .map_err(|e| Error::Msg(format!("serializing config: {e}")))?;
    write_atomic(&tmp.join(CONFIG_COPY), cfg_text.as_bytes())?;
    let state = serde_json::to_string_pretty(p.state).expect("state serializes");
    write_atomic(&tmp.join(STATE_FILE), state.as_bytes())?;
    fsync_dir(&tmp)?;

    let dst = root.join(&name);
    if dst.exists() {
        // Re-saving the same step (e.g. the final save right after a periodic one): swap.
        let old = root.join(format!(".old-{name}"));
        std::fs::rename(&dst, &old).map_err(|e| Error::io(&dst, e))?;
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    }
    fsync_dir(&root)?;
    Ok(dst)
}

fn fsync_file(p: &Path) -> Result<()> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(p, e))
}

fn fsync_dir(p: &Path) -> Result<()> {
    // Directories can be fsynced on Unix; elsewhere this is best effort.
    match std::fs::File::open(p) {
        Ok(f) => {
            let _ = f.sync_all();
            Ok(())
        }
        Err(e) => Err(Error::io(p, e)),
    }
}

/// Complete checkpoints (those with a readable state.json) under `out_dir`, oldest first.
pub fn list(out_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let root = checkpoints_dir(out_dir);
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir(&root) else {
        return Ok(v);
    };
    for e in rd {
        let e = e.map_err(|e| Error::io(&root, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        let Some(num) = name.strip_prefix("step-") else {
            continue;
        };
        let Ok(step) = num.parse::<usize>() else {
            continue;
        };
        if read_state(&e.path()).is_ok() {
            v.push((step, e.path()));
        }
    }
    v.sort();
    Ok(v)
}

pub fn read_state(dir: &Path) -> Result<RunState> {
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| Error::checkpoint(&p, format!("invalid state: {e}")))
}

/// The newest complete checkpoint; partial `.tmp-*` directories are removed with a warning.
pub fn latest(out_dir: &Path) -> Result<Option<PathBuf>> {
    let root = checkpoints_dir(out_dir);
    if let Ok(rd) = std::fs::read_dir(&root) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(".tmp-") || name.starts_with(".old-") {
                tracing::warn!("removing incomplete checkpoint {}", e.path().display());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(list(out_dir)?.pop().map(|(_, p)| p))
}

/// Deletes the oldest complete checkpoints beyond `keep`.
pub fn prune(out_dir: &Path, keep: usize) -> Result<()> {
    let all = list(out_dir)?;
    let n = all.len();
    for (_, p) in all.into_iter().take(n.saturating_sub(keep)) {
        std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}
