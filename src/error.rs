//! Typed errors for the library. The CLI wraps them with `anyhow` context; every message names
//! the file, key or tensor involved and what was expected versus what was found.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A model configuration (HF config.json or scratch architecture) is invalid.
    #[error("model config {origin}: {msg}")]
    ModelConfig { origin: String, msg: String },

    /// A checkpoint directory or safetensors file is missing pieces or is malformed.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },

    /// Hugging Face hub resolution failed (offline cache miss, network, missing file).
    #[error("hub model '{id}': {msg}")]
    Hub { id: String, msg: String },

    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
    pub fn checkpoint(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
    pub fn model_config(origin: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::ModelConfig {
            origin: origin.into(),
            msg: msg.into(),
        }
    }
    pub fn hub(id: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Hub {
            id: id.into(),
            msg: msg.into(),
        }
    }
}

/// Shorthand for building an [`Error::Msg`].
#[macro_export]
macro_rules! bail_msg {
    ($($arg:tt)*) => { return Err($crate::error::Error::Msg(format!($($arg)*))) };
}
