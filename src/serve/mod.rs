//! Serving a model: `tern serve` (the OpenAI HTTP API) and `tern chat` (a terminal) on one engine.
//!
//! - [`engine`]: continuous batching on the paged KV cache; one forward steps every active
//!   sequence, prompts are prefilled in chunks between decode tokens, clients that leave are
//!   cancelled.
//! - [`text`]: token ids -> streamed text (whole UTF-8 characters, stop strings held back).
//! - [`template`]: the model's chat template rendered as transformers renders it (minijinja).
//! - [`http`]: the OpenAI-compatible endpoints on axum; bad requests are answered with
//!   OpenAI-style JSON errors and never reach the engine.
//!
//! Threads: the engine runs on the caller's thread (a worker of the command's compute pool, so
//! the model's parallel ops start without a hand-off); HTTP runs on a small tokio runtime beside
//! it. They meet at a channel of requests and one channel of events per request.

pub mod engine;
pub mod http;
pub mod template;
pub mod text;

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use engine::Engine;
use std::future::Future;
use std::sync::{mpsc, Arc};
use template::ChatTemplate;

pub struct ServeOptions {
    /// The model name /v1/models lists.
    pub model_id: String,
    /// Requests must carry `Authorization: Bearer KEY` when set.
    pub api_key: Option<String>,
    /// Bodies over this many bytes get 413.
    pub body_limit: usize,
}

/// Serves HTTP on `listener` until `shutdown` resolves; the engine runs on this thread and
/// finishes the requests in flight before this returns.
pub fn serve(
    mut engine: Engine,
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
    opts: ServeOptions,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    let state = Arc::new(http::ServerState::new(
        tx,
        tokenizer,
        template,
        opts.model_id,
        engine.config().ctx,
        engine.vocab(),
        opts.api_key,
        engine.stats(),
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tern-http")
        .enable_all()
        .build()
        .map_err(|e| Error::Msg(format!("starting the HTTP runtime: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Msg(format!("listener: {e}")))?;
    let app = http::router(state, opts.body_limit);
    let server = rt.spawn(async move {
        let l = tokio::net::TcpListener::from_std(listener)?;
        axum::serve(l, app).with_graceful_shutdown(shutdown).await
    });
    // Returns when the server is down (its state, holding the sender, dropped) and idle.
    engine.run(rx);
    rt.block_on(server)
        .map_err(|e| Error::Msg(format!("HTTP server task: {e}")))?
        .map_err(|e| Error::Msg(format!("HTTP server: {e}")))
}
