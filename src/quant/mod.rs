//! Quantization math, independent of models and kernels: every weight of a projection, the
//! embedding and the LM head is one of {-1, 0, +1} times a per-group scale.
//!
//! - [`projection`]: the group-wise projection `w -> t * s` and the straight-through estimator,
//!   composed of plain candle ops (the reference the fused kernels are checked against).
//! - [`codec`]: the 2-bit codes of GGUF Q2_0 / PQ2_0 blocks (pack, unpack, ggml type ids).
//! - [`verify`]: checks that projected weights are exactly {-s, 0, +s} per group.
//! - [`activations`]: how the layers' inputs are quantized (`act_quant`), and its
//!   straight-through fake quantization for training.
//!
//! Groups run along the contiguous (input) dimension of each row, `group_size` weights each, the
//! same layout as GGUF Q2_0 blocks, so export is a re-encoding and never a re-quantization.

pub mod activations;
pub mod codec;
pub mod projection;
pub mod verify;

pub use activations::ActQuant;
pub use projection::{project, ste, QuantConfig, ScaleRule};
