//! The Qwen3 model in tern: architecture config, the tensor-name table, parameters, layers, the
//! attention backends and checkpoint IO in Hugging Face layout.
//!
//! - [`config`]: `Qwen3Config`, read from HF `config.json` field names.
//! - [`params`]: the named trainable tensors (`Var`s), scratch init, and the one table of tensor
//!   names (HF and GGUF) and shapes.
//! - [`layers`]: ternary linear / embedding (dense latent or packed) and RMSNorm.
//! - [`cache`]: what a forward attends over (none, contiguous KV cache, draft tree).
//! - [`transformer`]: the model and its one forward.
//! - [`host`]: the same forward for packed models on host slices (inference on the CPU without
//!   candle between the matmuls), checked against the one forward.
//! - [`io`]: load and save HF-layout checkpoints (config.json + safetensors, sharded or not).

pub mod cache;
pub mod config;
pub mod host;
pub mod io;
pub mod layers;
pub mod params;
pub mod transformer;

pub use cache::{Cache, KvCache, NoCache, TreeStep};
pub use config::{Arch, ModelConfig};
pub use host::HostAttention;
pub use io::{load_checkpoint, save_checkpoint, Checkpoint};
pub use params::Params;
pub use transformer::Model;
