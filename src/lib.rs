//! tern: train, run and export ternary Qwen3 language models on Candle.
//!
//! Every weight of every projection, the embedding and the LM head is one of {-1, 0, +1} times a
//! per-group scale; norms stay f32. See README.md for the commands and NOTES.md for measurements.
//!
//! - [`ternary`]: the projection, the straight-through estimator and ternary layers.
//! - [`model`]: Qwen3 (training forward, cached decoding) and HF-layout checkpoint IO.
//! - [`hub`]: model sources (local directory or hub id through hf-hub).
//! - [`device`]: `--device auto|cpu|cuda|metal`.
//! - [`mem`]: resident-memory readings for benchmarks.

pub mod config;
pub mod data;
pub mod decode;
pub mod device;
pub mod error;
pub mod eval;
pub mod export;
pub mod hub;
pub mod kernels;
pub mod mem;
pub mod model;
pub mod plot;
pub mod runtime;
pub mod ternary;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
