//! `tern chat --model M`: a conversation in the terminal on the serving engine (the model's chat
//! template, streamed replies). `/reset` forgets the conversation, `/exit` (or end of input)
//! leaves; when the conversation outgrows the context its oldest turns are dropped.

use super::serve::EngineArgs;
use super::ModelArgs;
use anyhow::{Context, Result};
use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex};
use tern::decode::sampler::SamplerConfig;
use tern::serve::engine::{Engine, Event, GenRequest};
use tern::serve::http::encode_prompt;
use tern::serve::template::{ChatTemplate, Message};
use tern::tokenizer::Tokenizer;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    #[command(flatten)]
    engine: EngineArgs,
    /// A system message opening the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Tokens per reply at most.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 512, value_parser = super::at_least_one)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: super::SamplingArgs,
}

pub fn run(a: Args) -> Result<i32> {
    let sampler = a.sampling.config(0.8)?;
    let (loaded, tok) = a.m.load()?;
    let model = Arc::new(loaded.model);
    let cfg = a.engine.config(model.cfg.max_position_embeddings, 1)?;
    let template = ChatTemplate::for_tokenizer(&tok).context("the model's chat template")?;
    let tok = Arc::new(tok);
    let mut engine = Engine::new(model, tok.clone(), cfg)?;
    let base: Vec<Message> = a.system.iter().map(|s| Message::new("system", s)).collect();
    let mut history = base.clone();
    eprintln!("tern chat: {} (ctx {}); /reset, /exit", a.m.model, cfg.ctx);
    let stdin = std::io::stdin();
    let mut turn = 0u64;
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            println!();
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history = base.clone();
                println!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", line));
        let prompt = match fit(
            &template,
            &tok,
            &mut history,
            base.len(),
            a.max_tokens,
            cfg.ctx,
        ) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e:#}");
                history.pop();
                continue;
            }
        };
        let max_tokens = a.max_tokens.min(cfg.ctx - prompt.len());
        let reply = Arc::new(Mutex::new(String::new()));
        let sink_reply = reply.clone();
        let sink = Box::new(move |ev: Event| {
            match ev {
                Event::Text { text, .. } => {
                    print!("{text}");
                    let _ = std::io::stdout().flush();
                    if let Ok(mut r) = sink_reply.lock() {
                        r.push_str(&text);
                    }
                }
                Event::Done(_) => println!(),
                Event::Error(m) => eprintln!("\nerror: {m}"),
            }
            true
        });
        let req = GenRequest {
            prompt,
            max_tokens,
            sampler: SamplerConfig {
                seed: sampler.seed.wrapping_add(turn),
                ..sampler
            },
            ..Default::default()
        };
        turn += 1;
        engine.submit(req, sink);
        while engine.busy() {
            engine.step()?;
        }
        let text = reply.lock().map(|r| r.clone()).unwrap_or_default();
        history.push(Message::new("assistant", &text));
    }
    Ok(0)
}

/// The prompt of the conversation, dropping its oldest turns (never the system message or the
/// newest user message) until it leaves room for a reply.
fn fit(
    template: &ChatTemplate,
    tok: &Tokenizer,
    history: &mut Vec<Message>,
    keep: usize,
    reply: usize,
    ctx: usize,
) -> Result<Vec<u32>> {
    let room = reply.min(ctx / 2).max(1);
    loop {
        let ids = encode_prompt(tok, &template.render(history, true)?)?;
        if ids.len() + room <= ctx {
            return Ok(ids);
        }
        anyhow::ensure!(
            history.len() > keep + 1,
            "the message ({} tokens with the template) leaves no room for a reply in the context of {ctx}",
            ids.len()
        );
        history.remove(keep);
    }
}
