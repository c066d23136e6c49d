//! Prefill and decode speed of greedy generation (batch 1, synthetic prompt ids), for any model
//! `runtime` loads: a checkpoint (dense f32 weights, projected once) or a GGUF (packed, decoded
//! by the host forward over the paged cache: `generate_auto`).

use crate::decode::generate::{generate_auto, GenerateConfig};
use crate::decode::paged::KvType;
use crate::decode::sampler::SamplerConfig;
use crate::error::Result;
use crate::model::Model;
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct DecodeSpeed {
    pub prompt_tokens: usize,
    /// Mean over the repetitions (each repetition's own rate, averaged, as llama-bench does).
    pub prefill_s: f64,
    pub prefill_tok_s: f64,
    pub prefill_tok_s_sd: f64,
    pub decode_tokens: usize,
    pub decode_tok_s: f64,
    pub decode_tok_s_sd: f64,
    pub reps: usize,
}

/// One warm-up, then `reps` times a timed prefill (1 new token) and a run of `n` new tokens
/// whose decode is timed from the first sampled token to the last (`n - 1` decode forwards, no
/// prefill in it). Rates are the mean and sample standard deviation of the repetitions' rates.
pub fn measure(
    model: &Model,
    prompt: usize,
    n: usize,
    reps: usize,
    kv: KvType,
) -> Result<DecodeSpeed> {
    let ids: Vec<u32> = (0..prompt as u32)
        .map(|i| (i * 7919 + 11) % model.cfg.vocab_size as u32)
        .collect();
    let cfg = GenerateConfig {
        max_new: n,
        sampler: SamplerConfig {
            temp: 0.0,
            ..Default::default()
        },
        eos: vec![],
    };
    // `on_token` runs as each token is sampled: the first right after the prefill, the next
    // ones after each decode forward, so decode is timed between the first and last token.
    let run = |max_new: usize, stamps: &mut Vec<Instant>| {
        generate_auto(
            model,
            std::slice::from_ref(&ids),
            &GenerateConfig {
                max_new,
                ..cfg.clone()
            },
            kv,
            |_, _| {
                stamps.push(Instant::now());
                false
            },
        )
    };
    run(2, &mut Vec::new())?;
    let (mut prefill, mut decode, mut prefill_s, mut decode_tokens) = (vec![], vec![], 0.0, 0);
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        run(1, &mut Vec::new())?;
        let p = t0.elapsed().as_secs_f64();
        let mut stamps = Vec::with_capacity(n);
        run(n, &mut stamps)?;
        decode_tokens = stamps.len().saturating_sub(1);
        let span = match (stamps.first(), stamps.last()) {
            (Some(a), Some(b)) => (*b - *a).as_secs_f64(),
            _ => 0.0,
        };
        prefill_s += p;
        prefill.push(prompt as f64 / p.max(1e-9));
        decode.push(decode_tokens as f64 / span.max(1e-9));
    }
    let (prefill_tok_s, prefill_tok_s_sd) = mean_sd(&prefill);
    let (decode_tok_s, decode_tok_s_sd) = mean_sd(&decode);
    Ok(DecodeSpeed {
        prompt_tokens: prompt,
        prefill_s: prefill_s / prefill.len() as f64,
        prefill_tok_s,
        prefill_tok_s_sd,
        decode_tokens,
        decode_tok_s,
        decode_tok_s_sd,
        reps: prefill.len(),
    })
}

/// Mean and sample standard deviation (0 for a single value).
fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    #[test]
    fn mean_and_sample_sd() {
        assert_eq!(super::mean_sd(&[3.0]), (3.0, 0.0));
        let (m, sd) = super::mean_sd(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((sd - 1.2909944).abs() < 1e-6);
    }
}
