//! Prefill and decode speed of greedy generation (batch 1, synthetic prompt ids), for any model
//! `runtime` loads: a checkpoint (dense f32 weights, projected once) or a GGUF (packed).

use crate::decode::generate::{generate_batch, GenerateConfig};
use crate::decode::sampler::SamplerConfig;
use crate::error::Result;
use crate::model::Qwen3;
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct DecodeSpeed {
    pub prompt_tokens: usize,
    pub prefill_s: f64,
    pub prefill_tok_s: f64,
    pub decode_tokens: usize,
    pub decode_tok_s: f64,
}

/// One warm-up, then a timed prefill (1 new token) and a timed run of `n` new tokens; decode
/// speed excludes the prefill.
pub fn measure(model: &Qwen3, prompt: usize, n: usize) -> Result<DecodeSpeed> {
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
    let run = |max_new: usize| {
        generate_batch(
            model,
            std::slice::from_ref(&ids),
            &GenerateConfig {
                max_new,
                ..cfg.clone()
            },
            |_, _| false,
        )
    };
    run(2)?;
    let t0 = Instant::now();
    run(1)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let out = run(n)?;
    let total = t1.elapsed().as_secs_f64();
    let decode_tokens = out[0].0.len().saturating_sub(1);
    Ok(DecodeSpeed {
        prompt_tokens: prompt,
        prefill_s,
        prefill_tok_s: prompt as f64 / prefill_s.max(1e-9),
        decode_tokens,
        decode_tok_s: decode_tokens as f64 / (total - prefill_s).max(1e-9),
    })
}
