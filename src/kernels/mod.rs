//! Fused kernels. Each one lives beside a plain reference composed of differentiable candle ops,
//! with a test that compares the two.
//!
//! - [`cross_entropy`]: next-token cross-entropy fused with the LM head, in chunks of tokens:
//!   never materializes the `[tokens, vocab]` logits (151,936 wide for Qwen3) for the batch.
//! - [`ternary_matmul`]: matmul straight from packed 2-bit ternary blocks (GGUF inference),
//!   beside dequantize-then-dense.
//! - [`norm`]: RMSNorm and LayerNorm as CPU CustomOps with a real backward from saved per-row
//!   statistics (the model's RMSNorm uses it).
//! - [`project`]: the ternary projection + STE in one pass per group, identity backward (the
//!   model's ternary layers use it on the CPU).

pub mod cross_entropy;
pub mod norm;
pub mod project;
pub mod ternary_matmul;
