//! The model's tokenizer: a Hugging Face `tokenizer.json`, from a path or a hub id.

use crate::error::{Error, Result};
use crate::hub::{looks_like_hub_id, resolve_file, HubOptions};
use std::path::{Path, PathBuf};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub path: PathBuf,
}

impl Tokenizer {
    /// `spec` is a tokenizer.json path, a directory holding one, or a hub id.
    pub fn load(spec: &str, hub: &HubOptions) -> Result<Self> {
        let p = Path::new(spec);
        let path = if p.is_file() {
            p.to_path_buf()
        } else if p.is_dir() {
            p.join("tokenizer.json")
        } else if looks_like_hub_id(spec) && !spec.ends_with(".json") {
            resolve_file(spec, "tokenizer.json", hub)?
        } else {
            return Err(Error::Msg(format!(
                "tokenizer '{spec}': no such file (run scripts/fetch_assets.sh to fetch Qwen3's tokenizer \
                 into data/tokenizer.json, or give a hub id)"
            )));
        };
        Self::from_file(&path)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Msg(format!("tokenizer {}: cannot load: {e}", path.display())))?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Msg(format!("tokenizing: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Msg(format!("decoding: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// End-of-sequence ids this tokenizer knows (Qwen3: <|endoftext|>, <|im_end|>).
    pub fn eos_ids(&self) -> Vec<u32> {
        ["<|endoftext|>", "<|im_end|>", "</s>"]
            .iter()
            .filter_map(|t| self.token_id(t))
            .collect()
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
