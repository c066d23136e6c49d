//! Training: AdamW, the LR schedule, run checkpoints and the trainer loop.
//!
//! - [`optim`]: AdamW with f32 moments, decoupled weight decay (none on norms), clipping helpers.
//! - [`schedule`]: warmup + cosine/linear/constant LR, and the STE ramp.
//! - [`checkpoint`]: atomic run checkpoints (model + optimizer + data position) and resume.
//! - [`trainer`]: the loop, evaluation, metrics, NaN guard, Ctrl-C.

pub mod checkpoint;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use trainer::{train, Control, StepMetrics, TrainOptions, TrainOutcome};
