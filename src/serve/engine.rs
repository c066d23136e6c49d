//! Continuous batching over the paged KV cache: one scheduler steps every active sequence
//! together.
//!
//! Each [`Engine::step`] is ONE forward of the model over a flat row of tokens: the next token of
//! every sequence that is decoding, plus prompt chunks of sequences still prefilling (at most
//! `prefill_chunk` prompt tokens per step in all, so a long prompt is spread over several steps
//! and never stalls the decoders). New requests join between steps (up to `parallel` active,
//! the rest wait in FIFO order); a sequence that finishes (EOS, a stop string, max_tokens, the
//! context) or whose client went away (its sink refuses an event) leaves and frees its blocks.
//!
//! Every token of the row attends only to its own sequence's pages and the per-token work of the
//! model is row-wise, so a sequence's tokens do not depend on who shares its steps: greedy
//! output batched equals output alone (`tests/serve.rs`).

use super::text::TextStream;
use crate::decode::generate::{paged_forward, Finish};
use crate::decode::paged::{KvType, PagedKvCache, SeqId};
use crate::decode::sampler::{Sampler, SamplerConfig};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

/// What one request asks for (already tokenized).
#[derive(Debug, Clone, Default)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    /// New tokens at most (the context may end it sooner).
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Generation ends before the first occurrence of any of these (not included in the text).
    pub stop: Vec<String>,
    /// Keep generating past EOS (llama-server's `ignore_eos`: fixed-length runs for benchmarks).
    pub ignore_eos: bool,
    /// Report each generated token's log-probability and this many most likely alternatives
    /// (OpenAI's `logprobs` / `top_logprobs`); None: no log-probabilities.
    pub logprobs: Option<usize>,
}

/// A generated token's log-probability under the model (the raw logits: temperature 1, no
/// penalties, whatever the sampler did) and the `top` most likely tokens with theirs, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprob {
    /// Of `id` in the logits `row`, with the `top` best (one fused softmax + top-k pass).
    pub fn of(row: &[f32], id: u32, top: usize) -> Self {
        let t = crate::decode::topk::softmax_topk(row, top.max(1));
        let lp = |i: u32| {
            row.get(i as usize)
                .map_or(f32::NEG_INFINITY, |&x| x - t.lse)
        };
        Self {
            id,
            logprob: lp(id),
            top: t.ids.iter().take(top).map(|&i| (i, lp(i))).collect(),
        }
    }
}

/// What the engine tells a request's client, in order: text pieces, then one `Done` (or one
/// `Error`).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text (never cut inside a UTF-8 character or a possible stop string) and the ids of
    /// the tokens generated since the previous `Text` (all of them, in order, over the stream;
    /// EOS included, its text not).
    Text {
        text: String,
        tokens: Vec<u32>,
        /// When the request asked: one per token of `tokens`, except an EOS that ends the text.
        logprobs: Vec<TokenLogprob>,
    },
    Done(Done),
    Error(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub finish: Finish,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Where a request's events go; returning false means the client is gone (the request is
/// cancelled and its blocks freed).
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Sequences generating at once; more requests wait.
    pub parallel: usize,
    /// Tokens per sequence (prompt + generated) at most.
    pub ctx: usize,
    /// Prompt tokens fed per step across all prefilling sequences.
    pub prefill_chunk: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// How the cache stores K and V (exact f32 unless asked).
    pub kv_type: KvType,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            parallel: 4,
            ctx: 2048,
            prefill_chunk: 256,
            block_size: crate::decode::generate::DEFAULT_BLOCK,
            kv_type: KvType::F32,
        }
    }
}

/// Live counts for /health and the load test (read from any thread).
#[derive(Debug, Default)]
pub struct Stats {
    pub active: AtomicUsize,
    pub queued: AtomicUsize,
    pub kv_blocks_in_use: AtomicUsize,
    pub requests_done: AtomicUsize,
    pub requests_cancelled: AtomicUsize,
    pub tokens_generated: AtomicUsize,
}

struct Pending {
    req: GenRequest,
    sink: Sink,
}

struct Active {
    seq: SeqId,
    req: GenRequest,
    sink: Sink,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// Generated tokens.
    out: Vec<u32>,
    /// Generated tokens not yet named by a `Text` event, and their log-probabilities.
    unsent: Vec<u32>,
    unsent_logprobs: Vec<TokenLogprob>,
    sampler: Sampler,
    text: TextStream,
}

impl Active {
    fn prefilling(&self) -> bool {
        self.fed < self.req.prompt.len()
    }
}

pub struct Engine {
    model: Arc<Model>,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    cfg: EngineConfig,
    cache: PagedKvCache,
    active: Vec<Active>,
    queue: VecDeque<Pending>,
    stats: Arc<Stats>,
}

impl Engine {
    pub fn new(model: Arc<Model>, tokenizer: Arc<Tokenizer>, cfg: EngineConfig) -> Result<Self> {
        if cfg.parallel == 0 || cfg.ctx < 2 || cfg.prefill_chunk == 0 || cfg.block_size == 0 {
            return Err(Error::Msg(format!(
                "engine: parallel, prefill_chunk and block_size must be >= 1 and ctx >= 2, found {cfg:?}"
            )));
        }
        let c = &model.cfg;
        let mut cache = PagedKvCache::with_type(
            c.num_hidden_layers,
            c.kv_heads(),
            c.head_dim(),
            cfg.block_size,
            cfg.kv_type,
        );
        // Every sequence at full context: the pools never move while serving.
        cache.reserve_blocks(cfg.parallel * (cfg.ctx.div_ceil(cfg.block_size) + 1));
        // EOS: what the tokenizer names and what the model's config names.
        let mut eos = tokenizer.eos_ids();
        eos.extend(model.cfg.eos_ids());
        Ok(Self {
            eos,
            model,
            tokenizer,
            cfg,
            cache,
            active: Vec::new(),
            queue: VecDeque::new(),
            stats: Arc::new(Stats::default()),
        })
    }

    pub fn config(&self) -> EngineConfig {
        self.cfg
    }

    pub fn vocab(&self) -> usize {
        self.model.cfg.vocab_size
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The checks every request must pass ([`check_request`] with this engine's context).
    pub fn validate(&self, req: &GenRequest) -> Result<()> {
        check_request(req, self.cfg.ctx, self.model.cfg.vocab_size)
    }

    /// Queues a request; an invalid one gets its `Error` event at once.
    pub fn submit(&mut self, req: GenRequest, mut sink: Sink) {
        if let Err(e) = self.validate(&req) {
            sink(Event::Error(e.to_string()));
            return;
        }
        self.queue.push_back(Pending { req, sink });
        self.publish();
    }

    /// True while any request is active or waiting.
    pub fn busy(&self) -> bool {
        !self.active.is_empty() || !self.queue.is_empty()
    }

    /// KV blocks held by sequences (0 when idle: nothing leaks).
    pub fn kv_blocks_in_use(&self) -> usize {
        self.cache.blocks_in_use()
    }

    fn admit(&mut self) {
        while self.active.len() < self.cfg.parallel {
            let Some(p) = self.queue.pop_front() else {
                break;
            };
            let seq = self.cache.add_seq();
            let sampler = Sampler::new(p.req.sampler).with_history(&p.req.prompt);
            let text = TextStream::new(p.req.stop.clone());
            self.active.push(Active {
                seq,
                req: p.req,
                sink: p.sink,
                fed: 0,
                out: Vec::new(),
                unsent: Vec::new(),
                unsent_logprobs: Vec::new(),
                sampler,
                text,
            });
        }
    }

    /// The row of this step: every decoder's last token, then prompt chunks in arrival order.
    fn plan(&self) -> Vec<(usize, Vec<u32>)> {
        let mut batch = Vec::new();
        for (i, a) in self.active.iter().enumerate() {
            if !a.prefilling() {
                let last = *a.out.last().expect("a decoding sequence has a token");
                batch.push((i, vec![last]));
            }
        }
        let mut budget = self.cfg.prefill_chunk;
        for (i, a) in self.active.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if a.prefilling() {
                let n = (a.req.prompt.len() - a.fed).min(budget);
                batch.push((i, a.req.prompt[a.fed..a.fed + n].to_vec()));
                budget -= n;
            }
        }
        batch
    }

    /// One forward over every active sequence; returns false when there was nothing to do.
    pub fn step(&mut self) -> Result<bool> {
        self.admit();
        if self.active.is_empty() {
            self.publish();
            return Ok(false);
        }
        let plan = self.plan();
        let batch: Vec<(SeqId, Vec<u32>)> = plan
            .iter()
            .map(|(i, t)| (self.active[*i].seq, t.clone()))
            .collect();
        let logits = match paged_forward(&self.model, &batch, &mut self.cache) {
            Ok(l) => l,
            Err(e) => {
                // A failed forward leaves the cache in an unknown state for these sequences:
                // end them all with the error rather than serve wrong text.
                let msg = format!("the model failed: {e}");
                let failed = std::mem::take(&mut self.active);
                for a in &failed {
                    self.cache.free_seq(a.seq)?;
                }
                self.publish();
                for mut a in failed {
                    (a.sink)(Event::Error(msg.clone()));
                }
                return Err(e);
            }
        };
        let mut ended = Vec::new();
        for ((i, toks), row) in plan.iter().zip(&logits) {
            let a = &mut self.active[*i];
            if a.prefilling() {
                a.fed += toks.len();
                if a.prefilling() {
                    continue; // mid-prompt: these logits predict a token we already have
                }
            }
            let tok = a.sampler.sample(row);
            let lp = a.req.logprobs.map(|n| TokenLogprob::of(row, tok, n));
            self.stats.tokens_generated.fetch_add(1, Ordering::Relaxed);
            if let Some(finish) = self.advance(*i, tok, lp)? {
                ended.push((*i, finish));
            }
        }
        // Remove from the back so the indices stay valid. The counts are published before any
        // client hears `Done`, so a client that asks /health right after its answer sees its
        // blocks already freed.
        ended.sort_by_key(|e| std::cmp::Reverse(e.0));
        let mut done = Vec::new();
        for (i, finish) in ended {
            let a = self.active.swap_remove(i);
            self.cache.free_seq(a.seq)?;
            let counter = match finish {
                Some(_) => &self.stats.requests_done,
                None => &self.stats.requests_cancelled,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            done.extend(finish.map(|f| (a, f)));
        }
        self.publish();
        for (mut a, finish) in done {
            let d = Done {
                finish,
                prompt_tokens: a.req.prompt.len(),
                completion_tokens: a.out.len(),
            };
            (a.sink)(Event::Done(d));
        }
        Ok(true)
    }

    /// Records sequence `i`'s new token and sends its text. Returns `Some(Some(finish))` when the
    /// sequence is done, `Some(None)` when its client is gone, `None` to go on.
    fn advance(
        &mut self,
        i: usize,
        tok: u32,
        logprob: Option<TokenLogprob>,
    ) -> Result<Option<Option<Finish>>> {
        let ctx = self.cfg.ctx;
        let a = &mut self.active[i];
        a.out.push(tok);
        a.unsent.push(tok);
        let eos = !a.req.ignore_eos && self.eos.contains(&tok);
        if !eos {
            a.unsent_logprobs.extend(logprob);
        }
        let (text, finish) = if eos {
            // EOS ends the text; its own text is not sent.
            (a.text.finish(&self.tokenizer)?, Some(Finish::Eos))
        } else {
            let piece = a.text.push(tok, &self.tokenizer)?;
            let full = a.out.len() >= a.req.max_tokens || a.req.prompt.len() + a.out.len() >= ctx;
            if piece.stopped {
                (piece.text, Some(Finish::Stop))
            } else if full {
                (
                    piece.text + &a.text.finish(&self.tokenizer)?,
                    Some(Finish::Length),
                )
            } else {
                (piece.text, None)
            }
        };
        // Text goes out as soon as it is final; the last event carries every token left.
        if !text.is_empty() || (finish.is_some() && !a.unsent.is_empty()) {
            let tokens = std::mem::take(&mut a.unsent);
            let logprobs = std::mem::take(&mut a.unsent_logprobs);
            if !(a.sink)(Event::Text {
                text,
                tokens,
                logprobs,
            }) {
                return Ok(Some(None));
            }
        }
        Ok(finish.map(Some))
    }

    fn publish(&self) {
        let s = &self.stats;
        s.active.store(self.active.len(), Ordering::Relaxed);
        s.queued.store(self.queue.len(), Ordering::Relaxed);
        s.kv_blocks_in_use
            .store(self.cache.blocks_in_use(), Ordering::Relaxed);
    }

    /// Serves requests from `rx` until every sender is gone and the work is done. A failed step
    /// has already told its clients; the loop goes on serving the others.
    pub fn run(&mut self, rx: mpsc::Receiver<(GenRequest, Sink)>) {
        let mut open = true;
        loop {
            if !self.busy() {
                if !open {
                    return;
                }
                match rx.recv() {
                    Ok((req, sink)) => self.submit(req, sink),
                    Err(_) => return,
                }
            }
            while open {
                match rx.try_recv() {
                    Ok((req, sink)) => self.submit(req, sink),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => open = false,
                }
            }
            if let Err(e) = self.step() {
                tracing::error!("engine step failed: {e}");
            }
        }
    }
}

/// The checks every request must pass before it is queued (the HTTP layer answers 400 with the
/// message): a non-empty prompt inside the vocabulary that leaves room for `max_tokens >= 1` new
/// tokens in the context, and valid sampling values.
pub fn check_request(req: &GenRequest, ctx: usize, vocab: usize) -> Result<()> {
    let n = req.prompt.len();
    if n == 0 {
        return Err(Error::Msg("the prompt is empty".into()));
    }
    if req.max_tokens == 0 {
        return Err(Error::Msg("max_tokens must be at least 1".into()));
    }
    if n >= ctx {
        return Err(Error::Msg(format!(
            "the prompt has {n} tokens; the context is {ctx} (prompt + new tokens)"
        )));
    }
    if req.max_tokens + n > ctx {
        return Err(Error::Msg(format!(
            "max_tokens {} + the prompt's {n} tokens exceed the context of {ctx}",
            req.max_tokens
        )));
    }
    if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Msg(format!(
            "token id {t} is outside the vocabulary ({vocab})"
        )));
    }
    req.sampler.validate()
}
