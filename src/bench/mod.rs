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

/// The median of `v` (the mean of the middle two for an even count); `None` when empty.
/// `scripts/pytorch_step.py` computes its step time the same way, so rates set side by side
/// come from one statistic.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(s[n / 2]),
        _ => Some((s[n / 2 - 1] + s[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_takes_the_middle_or_the_mean_of_the_middle_two() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
