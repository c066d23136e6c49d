//! Continuous batching without HTTP: `clients` requests of synthetic prompt ids submitted to the
//! serving engine at once, greedy, `ignore_eos`, stepped until all are done. Separates the
//! engine's speed (the model over the paged cache, scheduling, sampling, text streaming) from the
//! HTTP layer's when `scripts/bench_serve.sh` shows a gap.

use crate::error::Result;
use crate::model::Model;
use crate::serve::engine::{Engine, EngineConfig, Event, GenRequest};
use crate::tokenizer::Tokenizer;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Per request: when its first text arrived and how many tokens came.
type Arrivals = (Option<Instant>, usize);

#[derive(Debug, Clone, serde::Serialize)]
pub struct BatchSpeed {
    pub clients: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub steps: usize,
    pub wall_s: f64,
    /// New tokens over the whole wall time (what a load test calls aggregate tokens/s).
    pub tok_s: f64,
    /// Until every request has received its first text, as a streaming client sees it (all
    /// prompts prefilled; a token whose text is an incomplete UTF-8 character, common with
    /// random weights, is held back until the character completes).
    pub first_text_all_s: f64,
    /// New tokens after that point over the time after it: the batched decode rate.
    pub decode_tok_s: f64,
}

/// One warm-up run, then one timed run of `clients` requests of `prompt` tokens and `n` new
/// tokens each (distinct prompts, so nothing is shared between them).
pub fn measure(
    model: Arc<Model>,
    tokenizer: Arc<Tokenizer>,
    clients: usize,
    prompt: usize,
    n: usize,
    prefill_chunk: usize,
    kv_type: crate::decode::paged::KvType,
) -> Result<BatchSpeed> {
    let vocab = model.cfg.vocab_size as u32;
    let cfg = EngineConfig {
        parallel: clients,
        ctx: prompt + n + 1,
        prefill_chunk,
        kv_type,
        ..Default::default()
    };
    let run = |clients: usize| -> Result<BatchSpeed> {
        let mut engine = Engine::new(model.clone(), tokenizer.clone(), cfg)?;
        let got: Arc<Mutex<Vec<Arrivals>>> = Arc::new(Mutex::new(vec![(None, 0); clients]));
        let t0 = Instant::now();
        for c in 0..clients {
            let ids = (0..prompt as u32)
                .map(|i| (i * 7919 + c as u32 * 104_729 + 11) % vocab)
                .collect();
            let req = GenRequest {
                prompt: ids,
                max_tokens: n,
                sampler: Default::default(),
                ignore_eos: true,
                ..Default::default()
            };
            let got = got.clone();
            engine.submit(
                req,
                Box::new(move |e| {
                    if let Event::Text { tokens, .. } = e {
                        let mut g = got.lock().expect("no panics hold this lock");
                        g[c].0.get_or_insert_with(Instant::now);
                        g[c].1 += tokens.len();
                    }
                    true
                }),
            );
        }
        // After each step: when, and the tokens so far if every request has its first one.
        let mut steps = 0;
        let mut all_started: Option<(Instant, usize)> = None;
        while engine.busy() {
            engine.step()?;
            steps += 1;
            if all_started.is_none() {
                let g = got.lock().expect("no panics hold this lock");
                if g.iter().all(|r| r.0.is_some()) {
                    all_started = Some((Instant::now(), g.iter().map(|r| r.1).sum()));
                }
            }
        }
        let end = Instant::now();
        let wall_s = (end - t0).as_secs_f64();
        let new_tokens: usize = got
            .lock()
            .expect("no panics hold this lock")
            .iter()
            .map(|r| r.1)
            .sum();
        let (started, tokens_then) = all_started.unwrap_or((end, new_tokens));
        let first_text_all_s = (started - t0).as_secs_f64();
        let decode_s = (end - started).as_secs_f64();
        Ok(BatchSpeed {
            clients,
            prompt_tokens: clients * prompt,
            new_tokens,
            steps,
            wall_s,
            tok_s: new_tokens as f64 / wall_s,
            first_text_all_s,
            decode_tok_s: (new_tokens - tokens_then) as f64 / decode_s.max(1e-9),
        })
    };
    run(clients.min(2))?;
    run(clients)
}
