//! Benchmarks behind `tern bench` (figures for NOTES.md). Each returns its measurements; the
//! CLI prints them.
//!
//! - [`kernels`]: every fused kernel against its plain reference (time and peak extra heap).
//! - [`step`]: the training step `tern train` runs (`train::step`), at any architecture.
//! - [`decode`]: prefill and decode speed of greedy generation, dense and packed.
//! - [`topk`]: fused softmax + top-k against full softmax + sort.
//! - [`batch`]: the serving engine's continuous batching, without HTTP.
//! - [`gemm`]: the packed ternary matmul alone, every kernel the CPU offers.

pub mod batch;
pub mod decode;
pub mod gemm;
pub mod kernels;
pub mod step;
pub mod topk;
