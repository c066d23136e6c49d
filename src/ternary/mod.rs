//! Ternary weights: every weight of a projection, the embedding and the LM head is one of
//! {-1, 0, +1} times a per-group scale.
//!
//! - [`projection`]: the group-wise projection `w -> t * s` and the straight-through estimator.
//! - [`layers`]: `TernaryLinear` / `TernaryEmbedding`, f32 latent weights projected on the fly.
//!
//! Groups run along the contiguous (input) dimension of each row, `group_size` weights each, the
//! same layout as GGUF Q2_0 blocks, so export is a re-encoding and never a re-quantization.

pub mod layers;
pub mod verify;
pub mod projection;

pub use layers::{TernaryEmbedding, TernaryLinear};
pub use projection::{project, ste, QuantConfig, ScaleRule};
