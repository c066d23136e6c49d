//! The Qwen3 model in tern: architecture config, parameters (HF names), the forward passes and
//! checkpoint IO in Hugging Face layout.
//!
//! - [`config`]: `Qwen3Config`, read from HF `config.json` field names.
//! - [`params`]: the named trainable tensors (`Var`s), scratch init, expected names and shapes.
//! - [`qwen3`]: the model: training forward (every position) and cached incremental decoding.
//! - [`io`]: load and save HF-layout checkpoints (config.json + safetensors, sharded or not).

pub mod config;
pub mod io;
pub mod params;
pub mod qwen3;

pub use config::Qwen3Config;
pub use io::{load_checkpoint, save_checkpoint, Checkpoint};
pub use params::Params;
pub use qwen3::{KvCache, Qwen3};
