//! tern: train, run and export ternary language models (Qwen3 and Llama families) on Candle.
//!
//! Every weight of every projection, the embedding and the LM head is one of {-1, 0, +1} times a
//! per-group scale; norms stay f32. See README.md for the commands and NOTES.md for measurements.
//!
//! # Module map: dependencies run one way
//!
//! Each line may use the modules on the lines above it and none below (modules on one line do
//! not use each other). `tests/architecture.rs` reads this list and fails on any `crate::` path
//! that goes sideways or up, outside test modules. The CLI (`src/main.rs`, `src/cli/`) is the
//! binary and sits on top of everything.
//!
//! ```text
//! error mem                     errors; heap and RSS readings
//! device files plot hub quant   devices; atomic writes; PNG plots; HF dirs and hub ids; quantization math
//! tokenizer kernels             BPE tokenizer (load, train); fused ops beside their references, the one choice
//! data model                    text -> batches; the model (names, layers, caches, forward, host forward, checkpoint IO)
//! gguf decode eval              GGUF format, export, packed load; generation; perplexity
//! source                        a model spec (HF dir | hub id | GGUF) -> config, weights, tokenizer
//! train                         config, optimizer, step, checkpoints, the loop
//! runtime                       load any model for inference
//! serve                         serving: continuous batching engine, HTTP API, chat templates
//! bench                         benchmarks (kernels, gemm, step, decode, top-k, the serving engine)
//! ```
//!
//! - [`quant`]: the projection, the straight-through estimator, the 2-bit codec, verification.
//! - [`kernels`]: fused kernels beside their plain references; `Kernels` picks one per op.
//! - [`model`]: the Qwen3/Llama decoder with one forward that takes its attention backend
//!   ([`model::Cache`]).
//! - [`source`]: the one resolution of a model spec (HF directory, hub id, GGUF file).
//! - [`gguf`]: GGUF reader/writer, export, verification, packed loading.
//! - [`decode`]: sampling, generation, paged KV cache, beam search, speculative decoding.
//! - [`train`]: the training config, loop and step; [`runtime`]: loading for inference.
//! - [`serve`]: continuous batching and the OpenAI-compatible HTTP API (`tern serve`, `tern chat`).

pub mod error;
pub mod mem;

pub mod device;
pub mod files;
pub mod hub;
pub mod plot;
pub mod quant;

pub mod kernels;
pub mod tokenizer;

pub mod data;
pub mod model;

pub mod decode;
pub mod eval;
pub mod gguf;

pub mod source;

pub mod train;

pub mod runtime;

pub mod serve;

pub mod bench;

pub use error::{Error, Result};
