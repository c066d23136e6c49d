//! Decoding on a frozen model.
//!
//! - [`sampler`]: greedy / temperature / top-k / top-p / min-p (llama.cpp meanings and order);
//!   top-k candidates come from [`topk`].
//! - [`topk`]: fused softmax + top-k over the vocabulary (one pass, never a probability vector);
//!   [`topk_cuda`] is its CUDA kernel (`--features cuda`).
//! - [`generate`]: batched generation over left-padded prompts with the contiguous KV cache
//!   (`model::KvCache`), or over the [`paged`] KV cache without padding; each row equals its
//!   prompt run alone.
//! - [`paged`]: block pool + block tables, refcounted fork with copy-on-write, rollback; its
//!   `PagedStep` is the model's attention backend over it.
//! - [`beam`]: batched beam search with length penalty and finished-beam retention.
//! - [`speculative`]: tree speculative decoding with greedy verification (prompt-lookup or
//!   draft-model trees), output identical to greedy decoding.

pub mod beam;
pub mod generate;
pub mod paged;
pub mod sampler;
pub mod speculative;
pub mod topk;
#[cfg(feature = "cuda")]
pub mod topk_cuda;
