//! Learning-rate schedule and STE ramp, as pure functions of the (1-based) step.

use super::config::{RampShape, Schedule, TrainSection};

/// LR at optimizer step `step` (1-based): linear warmup to `lr`, then cosine / linear decay to
/// `min_lr` at the last step, or constant.
pub fn lr_at(step: usize, t: &TrainSection) -> f64 {
    let (lr, min_lr) = (t.lr, t.min_lr());
    if t.warmup_steps > 0 && step <= t.warmup_steps {
        return lr * step as f64 / t.warmup_steps as f64;
    }
    let span = t.steps.saturating_sub(t.warmup_steps).max(1) as f64;
    let progress = ((step - t.warmup_steps.min(step)) as f64 / span).clamp(0.0, 1.0);
    match t.schedule {
        Schedule::Constant => lr,
        Schedule::Linear => lr - (lr - min_lr) * progress,
        Schedule::Cosine => {
            min_lr + (lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// STE ramp lambda at step `step` (1-based): min(step / ramp_steps, 1); 1 when the ramp is off.
pub fn ramp_at(step: usize, ramp_steps: usize) -> f64 {
    if ramp_steps == 0 {
        1.0
    } else {
        (step as f64 / ramp_steps as f64).min(1.0)
    }
}

/// The ramp of `t` at `step`: linear, or cosine-shaped `(1 - cos(pi x)) / 2` of the linear
/// progress x (slow at both ends: the last steps before fully ternary move least).
pub fn ramp_for(step: usize, t: &TrainSection) -> f64 {
    let x = ramp_at(step, t.ste_ramp_steps);
    match t.ste_ramp_shape {
        RampShape::Linear => x,
        RampShape::Cosine => 0.5 * (1.0 - (std::f64::consts::PI * x).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_min_lr() {
        let t = TrainSection {
            steps: 110,
            warmup_steps: 10,
            lr: 1.0,
            min_lr: Some(0.1),
            ..Default::default()
        };
        assert!((lr_at(1, &t) - 0.1).abs() < 1e-12);
        assert!((lr_at(10, &t) - 1.0).abs() < 1e-12);
        assert!((lr_at(60, &t) - 0.55).abs() < 1e-12);
        assert!((lr_at(110, &t) - 0.1).abs() < 1e-12);
        let l = TrainSection {
            schedule: Schedule::Linear,
            ..t.clone()
        };
        assert!((lr_at(60, &l) - 0.55).abs() < 1e-12);
        let c = TrainSection {
            schedule: Schedule::Constant,
            ..t
        };
        assert_eq!(lr_at(100, &c), 1.0);
        assert_eq!(ramp_at(5, 0), 1.0);
        assert_eq!(ramp_at(5, 10), 0.5);
        let r = TrainSection {
            ste_ramp_steps: 10,
            ste_ramp_shape: RampShape::Cosine,
            ..Default::default()
        };
        assert!((ramp_for(5, &r) - 0.5).abs() < 1e-12);
        assert!(ramp_for(1, &r) < ramp_at(1, 10) && ramp_for(10, &r) == 1.0);
        assert_eq!(ramp_at(50, 10), 1.0);
    }
}
