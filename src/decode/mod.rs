//! Decoding on a frozen model.
//!
//! - [`sampler`]: greedy / temperature / top-k / top-p / min-p (llama.cpp meanings and order).
//! - [`generate`]: batched generation over left-padded prompts with the contiguous KV cache
//!   (`model::KvCache`); each row equals its prompt run alone.
//!
//! A paged KV cache, fused softmax+top-k, beam search and speculative decoding are separate
//! issues and will live here.

pub mod beam;
pub mod generate;
pub mod paged;
pub mod sampler;
pub mod speculative;
pub mod topk;
