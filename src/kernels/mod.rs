//! Fused kernels. Each one lives beside a plain reference composed of differentiable candle ops,
//! with a test that compares the two.
//!
//! - [`cross_entropy`]: next-token cross-entropy fused with the LM head, in chunks of tokens:
//!   never materializes the `[tokens, vocab]` logits (151,936 wide for Qwen3) for the batch.

pub mod cross_entropy;
