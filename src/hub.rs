//! Model sources: a local HF-layout directory, or a Hugging Face hub id resolved through hf-hub
//! into a snapshot directory of the hub cache (then loaded by the very same directory loader).
//!
//! Environment, as huggingface_hub reads it: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`; `HF_ENDPOINT`; and
//! `HF_HUB_OFFLINE=1`, under which nothing touches the network: files come from the cache or the
//! load fails naming the missing file and the cache path.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The files of a Hugging Face layout model directory.
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

#[derive(Debug, Clone)]
pub struct HubOptions {
    pub cache_dir: PathBuf,
    pub offline: bool,
    pub revision: String,
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE"
    )
}

impl HubOptions {
    pub fn from_env() -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cache_dir = if let Some(c) = env("HF_HUB_CACHE") {
            PathBuf::from(c)
        } else if let Some(h) = env("HF_HOME") {
            PathBuf::from(h).join("hub")
        } else if let Some(x) = env("XDG_CACHE_HOME") {
            PathBuf::from(x).join("huggingface").join("hub")
        } else {
            hf_hub::Cache::default().path().clone()
        };
        let offline = env("HF_HUB_OFFLINE").map(|v| truthy(&v)).unwrap_or(false);
        Self {
            cache_dir,
            offline,
            revision: "main".into(),
        }
    }
}

/// `org/name` with the characters hub ids allow.
pub fn looks_like_hub_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// Resolves a model source to a local directory in HF layout.
pub fn resolve_model_dir(source: &str, opts: &HubOptions) -> Result<PathBuf> {
    let p = Path::new(source);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if p.exists() {
        return Err(Error::Msg(format!(
            "model '{source}': is a file, expected a checkpoint directory or a hub id"
        )));
    }
    if !looks_like_hub_id(source) {
        return Err(Error::Msg(format!(
            "model '{source}': no such directory, and not a hub id of the form org/name"
        )));
    }
    let config = resolve_file(source, CONFIG_FILE, opts)?;
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    // Weights: the sharded index (and every shard it names) or the single file.
    let files = if opts.offline {
        weight_names_offline(source, opts)?
    } else {
        weight_names_online(source, opts)?
    };
    for f in files {
        resolve_file(source, &f, opts)?;
    }
    // The tokenizer is optional for a model; fetch it when the repo has one.
    let _ = resolve_file(source, TOKENIZER_FILE, opts);
    Ok(dir)
}

fn cache_repo(id: &str, opts: &HubOptions) -> hf_hub::CacheRepo {
    hf_hub::Cache::new(opts.cache_dir.clone()).repo(hf_hub::Repo::with_revision(
        id.to_string(),
        hf_hub::RepoType::Model,
        opts.revision.clone(),
    ))
}

fn api(opts: &HubOptions) -> Result<hf_hub::api::sync::Api> {
    hf_hub::api::sync::ApiBuilder::from_env()
        .with_cache_dir(opts.cache_dir.clone())
        .with_progress(true)
        .build()
        .map_err(|e| Error::Msg(format!("cannot start the hub client: {e}")))
}

/// One file of a hub repo as a local path (from the cache, or downloaded into it).
pub fn resolve_file(id: &str, file: &str, opts: &HubOptions) -> Result<PathBuf> {
    if let Some(p) = cache_repo(id, opts).get(file) {
        return Ok(p);
    }
    if opts.offline {
        return Err(Error::hub(
            id,
            format!(
                "HF_HUB_OFFLINE is set and '{file}' is not in the hub cache at {} \
                 (download it once with network access, or point --model at a local directory)",
                opts.cache_dir.display()
            ),
        ));
    }
    let repo = hf_hub::Repo::with_revision(
        id.to_string(),
        hf_hub::RepoType::Model,
        opts.revision.clone(),
    );
    api(opts)?
        .repo(repo)
        .get(file)
        .map_err(|e| Error::hub(id, format!("downloading '{file}': {e}")))
}

fn shard_names(index_path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(index_path, format!("invalid JSON: {e}")))?;
    let mut names: Vec<String> = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::checkpoint(index_path, "missing the object 'weight_map'"))?
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

fn weight_names_offline(id: &str, opts: &HubOptions) -> Result<Vec<String>> {
    let repo = cache_repo(id, opts);
    if let Some(index) = repo.get(INDEX_FILE) {
        let mut v = shard_names(&index)?;
        v.push(INDEX_FILE.into());
        return Ok(v);
    }
    Ok(vec![WEIGHTS_FILE.into()])
}

fn weight_names_online(id: &str, opts: &HubOptions) -> Result<Vec<String>> {
    let repo = hf_hub::Repo::with_revision(
        id.to_string(),
        hf_hub::RepoType::Model,
        opts.revision.clone(),
    );
    let info = api(opts)?
        .repo(repo)
        .info()
        .map_err(|e| Error::hub(id, format!("listing files: {e}")))?;
    let has = |f: &str| info.siblings.iter().any(|s| s.rfilename == f);
    if has(INDEX_FILE) {
        let index = resolve_file(id, INDEX_FILE, opts)?;
        let mut v = shard_names(&index)?;
        v.push(INDEX_FILE.into());
        Ok(v)
    } else if has(WEIGHTS_FILE) {
        Ok(vec![WEIGHTS_FILE.into()])
    } else {
        Err(Error::hub(
            id,
            format!("the repo has neither {WEIGHTS_FILE} nor {INDEX_FILE}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_recognized() {
        assert!(looks_like_hub_id("Qwen/Qwen3-0.6B"));
        assert!(!looks_like_hub_id("Qwen3-0.6B"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("../x"));
        assert!(truthy("1") && truthy("true") && !truthy("0"));
    }
}
