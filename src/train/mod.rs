//! Training: its config, AdamW, the LR schedule, one training step, run checkpoints and the
//! trainer loop.
//!
//! - [`config`]: the TOML training config (defaults, `--set`, validation).
//! - [`optim`]: AdamW with f32 moments, decoupled weight decay (none on norms), clipping helpers.
//! - [`schedule`]: warmup + cosine/linear/constant LR, and the STE ramp.
//! - [`checkpoint`]: atomic run checkpoints (model + optimizer + data position) and resume.
//! - [`step`]: one step (micro-batches, loss, backward, NaN guard, clipping, AdamW), shared with
//!   `tern bench step`.
//! - [`trainer`]: the loop, evaluation, metrics, checkpoints, Ctrl-C.

pub mod checkpoint;
pub mod config;
pub mod optim;
pub mod schedule;
pub mod step;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{train, Control, StepMetrics, TrainOptions, TrainOutcome};
