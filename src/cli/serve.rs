//! `tern serve --model M [--host 127.0.0.1] [--port 8080] [--parallel N] [--ctx C] [--api-key K]`:
//! the OpenAI-compatible HTTP API with continuous batching (`tern::serve`).

use super::ModelArgs;
use anyhow::{Context, Result};
use std::sync::Arc;
use tern::decode::paged::KvType;
use tern::serve::engine::{Engine, EngineConfig};
use tern::serve::template::ChatTemplate;
use tern::serve::{http, ServeOptions};

/// The engine's flags, shared with `tern chat`.
#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    /// Tokens per sequence, prompt + generated (default: the model's maximum, at most 4096).
    #[arg(long, short = 'c', value_parser = super::at_least_one)]
    pub ctx: Option<usize>,
    /// Prompt tokens fed per step across all prompts being prefilled.
    #[arg(long = "prefill-chunk", default_value_t = 256, value_parser = super::at_least_one)]
    pub prefill_chunk: usize,
    /// Positions per block of the paged KV cache.
    #[arg(long = "block-size", default_value_t = tern::decode::generate::DEFAULT_BLOCK, value_parser = super::at_least_one)]
    pub block_size: usize,
    /// How the KV cache stores keys and values (llama.cpp's --cache-type-k/-v; f16 halves the
    /// cache's memory and its reads per token).
    #[arg(long = "cache-type", value_enum, default_value_t = KvType::F16)]
    pub cache_type: KvType,
}

impl EngineArgs {
    pub fn config(&self, model_max: usize, parallel: usize) -> Result<EngineConfig> {
        let ctx = self.ctx.unwrap_or(model_max.min(4096));
        anyhow::ensure!(
            ctx <= model_max,
            "--ctx {ctx} is beyond the model's {model_max} positions"
        );
        anyhow::ensure!(ctx >= 2, "--ctx must be at least 2, found {ctx}");
        Ok(EngineConfig {
            parallel,
            ctx,
            prefill_chunk: self.prefill_chunk,
            block_size: self.block_size,
            kv_type: self.cache_type,
        })
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    #[command(flatten)]
    engine: EngineArgs,
    /// Address to bind (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Sequences decoded together (more requests wait their turn).
    #[arg(long, short = 'P', default_value_t = 4, value_parser = super::at_least_one)]
    parallel: usize,
    /// Require `Authorization: Bearer KEY` on /v1/*.
    #[arg(long = "api-key")]
    api_key: Option<String>,
    /// The model name /v1/models reports (default: the --model argument).
    #[arg(long)]
    alias: Option<String>,
    /// Request bodies over this many bytes are refused (413).
    #[arg(long = "body-limit", default_value_t = http::DEFAULT_BODY_LIMIT)]
    body_limit: usize,
}

pub fn run(a: Args) -> Result<i32> {
    let (loaded, tok) = a.m.load()?;
    let model = Arc::new(loaded.model);
    let cfg = a
        .engine
        .config(model.cfg.max_position_embeddings, a.parallel)?;
    let template = ChatTemplate::for_tokenizer(&tok).context("the model's chat template")?;
    if template.fallback {
        eprintln!("tern serve: the model has no chat template; using ChatML");
    }
    let tok = Arc::new(tok);
    let engine = Engine::new(model, tok.clone(), cfg)?;
    let addr = format!("{}:{}", a.host, a.port);
    let listener = std::net::TcpListener::bind(&addr).with_context(|| format!("binding {addr}"))?;
    eprintln!(
        "tern serve: http://{} (model {}, ctx {}, parallel {}); Ctrl-C stops",
        listener.local_addr()?,
        a.m.model,
        cfg.ctx,
        cfg.parallel
    );
    let opts = ServeOptions {
        model_id: a.alias.unwrap_or_else(|| a.m.model.clone()),
        api_key: a.api_key,
        body_limit: a.body_limit,
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("tern serve: stopping (finishing the requests in flight)");
    };
    tern::serve::serve(engine, tok, template, opts, listener, shutdown)?;
    Ok(0)
}
