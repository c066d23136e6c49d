//! The OpenAI-compatible HTTP API on axum: POST /v1/chat/completions and /v1/completions
//! (`stream: true` = server-sent events ending in `data: [DONE]`), GET /v1/models, GET /health.
//!
//! Request fields as OpenAI and llama-server name them: messages | prompt, max_tokens
//! (max_completion_tokens, n_predict), temperature, top_p, top_k, min_p, seed, stop,
//! repeat_penalty, repeat_last_n, ignore_eos, stream; other fields are ignored, a known field of the wrong
//! type is a 400 naming it. Every response carries usage counts (a stream: in its last chunk).
//! Errors are OpenAI's JSON `{"error": {"message", "type", "param", "code"}}` with the status
//! that fits (400 bad request, 401 wrong key, 404, 413 body too large, 503 engine gone); a bad
//! request never reaches the engine, so the others keep being served.
//!
//! A handler tokenizes, checks the request against the context, hands it to the engine thread
//! through a channel and relays the engine's events. A client that goes away drops its
//! receiver; the engine's next event for it fails and the sequence is cancelled.

use super::engine::{check_request, Done, Event, GenRequest, Sink, Stats, TokenLogprob};
use super::template::{ChatTemplate, Message};
use crate::decode::generate::Finish;
use crate::decode::sampler::SamplerConfig;
use crate::tokenizer::Tokenizer;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::mpsc as tmpsc;

/// What the handlers share.
pub struct ServerState {
    /// To the engine thread.
    pub submit: mpsc::Sender<(GenRequest, Sink)>,
    pub tokenizer: Arc<Tokenizer>,
    pub template: ChatTemplate,
    /// The name /v1/models lists and responses carry.
    pub model_id: String,
    pub ctx: usize,
    pub vocab: usize,
    pub api_key: Option<String>,
    pub stats: Arc<Stats>,
    next_id: AtomicU64,
}

impl ServerState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        submit: mpsc::Sender<(GenRequest, Sink)>,
        tokenizer: Arc<Tokenizer>,
        template: ChatTemplate,
        model_id: String,
        ctx: usize,
        vocab: usize,
        api_key: Option<String>,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            submit,
            tokenizer,
            template,
            model_id,
            ctx,
            vocab,
            api_key,
            stats,
            next_id: AtomicU64::new(1),
        }
    }
}

/// Request bodies larger than this are refused with 413.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

pub fn router(state: Arc<ServerState>, body_limit: usize) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.status.as_u16(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

async fn health(State(s): State<Arc<ServerState>>) -> Json<Value> {
    let st = &s.stats;
    let get = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed);
    Json(json!({
        "status": "ok",
        "active": get(&st.active),
        "queued": get(&st.queued),
        "kv_blocks_in_use": get(&st.kv_blocks_in_use),
        "requests_done": get(&st.requests_done),
        "requests_cancelled": get(&st.requests_cancelled),
        "tokens_generated": get(&st.tokens_generated),
    }))
}

async fn models(State(s): State<Arc<ServerState>>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    authorize(&s, &headers)?;
    Ok(Json(json!({"object": "list", "data": [{
        "id": s.model_id, "object": "model", "created": now(), "owned_by": "tern",
        "meta": {"n_ctx": s.ctx, "n_vocab": s.vocab},
    }]})))
}

fn authorize(s: &ServerState, headers: &HeaderMap) -> ApiResult<()> {
    let Some(key) = &s.api_key else {
        return Ok(());
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid or missing API key (Authorization: Bearer KEY)",
        ))
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The body as a JSON object: a body over the limit is 413, anything but a JSON object 400.
fn json_body(body: std::result::Result<Bytes, BytesRejection>) -> ApiResult<Value> {
    let bytes = body.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad(format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("the body must be a JSON object"));
    }
    Ok(v)
}

/// A typed view of `v`; a field of the wrong type is a 400 naming the field.
fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> ApiResult<T> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let mut err = ApiError::bad(format!("field `{path}`: {}", e.inner()));
        err.param = Some(path);
        err
    })
}

/// `logprobs`: a count on /v1/completions, a switch on /v1/chat/completions (with `top_logprobs`).
#[derive(Deserialize, Clone, Copy)]
#[serde(untagged)]
enum LogprobsField {
    On(bool),
    Count(i64),
}

/// Most alternatives per token a request may ask for (OpenAI's limit).
const MAX_TOP_LOGPROBS: i64 = 20;

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The sampling and length fields both endpoints share.
#[derive(Deserialize, Default)]
struct Params {
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    n_predict: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    seed: Option<i64>,
    stop: Option<OneOrMany>,
    repeat_penalty: Option<f64>,
    repeat_last_n: Option<i64>,
    n: Option<i64>,
    stream: Option<bool>,
    ignore_eos: Option<bool>,
    logprobs: Option<LogprobsField>,
    top_logprobs: Option<i64>,
    /// llama-server's name for the completions count.
    n_probs: Option<i64>,
}

impl Params {
    /// The engine request for `prompt` (defaults: llama-server's sampling; max_tokens = the rest
    /// of the context), checked against the context.
    /// How many alternatives per token the request wants, or None for no log-probabilities.
    fn logprobs(&self, kind: Kind) -> ApiResult<Option<usize>> {
        let count = |name: &str, n: i64| {
            if (0..=MAX_TOP_LOGPROBS).contains(&n) {
                Ok(n as usize)
            } else {
                Err(ApiError::bad(format!(
                    "{name} must be between 0 and {MAX_TOP_LOGPROBS}, found {n}"
                )))
            }
        };
        match (kind, self.logprobs, self.top_logprobs) {
            (Kind::Chat, Some(LogprobsField::On(true)), top) => {
                Ok(Some(count("top_logprobs", top.unwrap_or(0))?))
            }
            (Kind::Chat, _, Some(_)) => Err(ApiError::bad("top_logprobs needs logprobs: true")),
            (Kind::Chat, Some(LogprobsField::Count(_)), None) => Err(ApiError::bad(
                "logprobs: a boolean on chat completions (with top_logprobs for alternatives)",
            )),
            (Kind::Chat, _, None) => Ok(None),
            (Kind::Completion, Some(LogprobsField::Count(n)), _) => Ok(Some(count("logprobs", n)?)),
            (Kind::Completion, Some(LogprobsField::On(true)), _) => Ok(Some(0)),
            (Kind::Completion, _, _) => match self.n_probs {
                Some(n) if n > 0 => Ok(Some(count("n_probs", n)?)),
                _ => Ok(None),
            },
        }
    }

    fn request(&self, prompt: Vec<u32>, s: &ServerState, kind: Kind) -> ApiResult<GenRequest> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad("n: only one choice per request is supported"));
        }
        let room = s.ctx.saturating_sub(prompt.len());
        let max_tokens = match self
            .max_tokens
            .or(self.max_completion_tokens)
            .or(self.n_predict.filter(|&n| n >= 0))
        {
            None => room.max(1),
            Some(n) if n < 1 => {
                return Err(ApiError::bad(format!("max_tokens must be >= 1, found {n}")))
            }
            Some(n) => n as usize,
        };
        let nonneg = |name: &str, v: Option<i64>, default: usize| -> ApiResult<usize> {
            match v {
                None => Ok(default),
                Some(x) if x < 0 => Err(ApiError::bad(format!("{name} must be >= 0, found {x}"))),
                Some(x) => Ok(x as usize),
            }
        };
        let sampler = SamplerConfig {
            temp: self.temperature.unwrap_or(0.8),
            top_k: nonneg("top_k", self.top_k, 40)?,
            top_p: self.top_p.unwrap_or(0.95),
            min_p: self.min_p.unwrap_or(0.05),
            seed: match self.seed {
                Some(x) if x >= 0 => x as u64,
                _ => rand::random(),
            },
            repeat_penalty: self.repeat_penalty.unwrap_or(1.0),
            repeat_last_n: nonneg("repeat_last_n", self.repeat_last_n, 64)?,
        };
        let stop = match &self.stop {
            None => vec![],
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        let req = GenRequest {
            prompt,
            max_tokens,
            sampler,
            stop,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            logprobs: self.logprobs(kind)?,
        };
        check_request(&req, s.ctx, s.vocab)
            .map_err(|e| ApiError::bad(api_names(&e.to_string())))?;
        Ok(req)
    }
}

/// The sampler's messages name llama-cli's flags; the API names the same values its own way.
fn api_names(msg: &str) -> String {
    [
        ("--temp", "temperature"),
        ("--top-p", "top_p"),
        ("--min-p", "min_p"),
        ("--repeat-penalty", "repeat_penalty"),
    ]
    .iter()
    .fold(msg.to_string(), |m, (flag, field)| m.replace(flag, field))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<ChatMessage>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: PromptField,
}

fn chat_messages(body: ChatBody) -> ApiResult<Vec<Message>> {
    if body.messages.is_empty() {
        return Err(ApiError::bad("messages: at least one message is required"));
    }
    body.messages
        .into_iter()
        .map(|m| {
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => parts
                    .into_iter()
                    .map(|p| match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => Ok(t),
                        (k, _) => Err(ApiError::bad(format!(
                            "messages: content part of type '{k}' is not supported (text only)"
                        ))),
                    })
                    .collect::<ApiResult<Vec<_>>>()?
                    .concat(),
            };
            Ok(Message {
                role: m.role,
                content,
            })
        })
        .collect()
}

/// Token ids of a prompt text, with BOS first when the tokenizer asks for one and the text does
/// not already start with it (chat templates often write it themselves).
pub fn encode_prompt(tok: &Tokenizer, text: &str) -> crate::Result<Vec<u32>> {
    let mut ids = tok.encode(text)?;
    if let Some(bos) = tok.bos_to_add() {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    Ok(ids)
}

/// What both completion endpoints start with: the key checked, the body as a JSON object, and
/// its shared sampling and length fields.
fn authorized_body(
    s: &ServerState,
    headers: &HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> ApiResult<(Value, Params)> {
    authorize(s, headers)?;
    let v = json_body(body)?;
    let params = typed(&v)?;
    Ok((v, params))
}

async fn chat_completions(
    State(s): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let (v, params) = authorized_body(&s, &headers, body)?;
    let messages = chat_messages(typed(&v)?)?;
    let text = s
        .template
        .render(&messages, true)
        .map_err(|e| ApiError::bad(e.to_string()))?;
    let req = params.request(encode(&s, &text)?, &s, Kind::Chat)?;
    respond(&s, req, params.stream.unwrap_or(false), Kind::Chat).await
}

async fn completions(
    State(s): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let (v, params) = authorized_body(&s, &headers, body)?;
    let body: CompletionBody = typed(&v)?;
    let prompt = match body.prompt {
        PromptField::Tokens(ids) => ids,
        PromptField::Text(t) => encode(&s, &t)?,
        PromptField::Texts(v) if v.len() == 1 => encode(&s, &v[0])?,
        PromptField::Texts(_) => {
            return Err(ApiError::bad("prompt: one prompt per request is supported"))
        }
    };
    let req = params.request(prompt, &s, Kind::Completion)?;
    respond(&s, req, params.stream.unwrap_or(false), Kind::Completion).await
}

fn encode(s: &ServerState, text: &str) -> ApiResult<Vec<u32>> {
    encode_prompt(&s.tokenizer, text).map_err(|e| ApiError::bad(e.to_string()))
}

#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Completion,
}

/// The fixed parts of every response or chunk of one request.
struct Reply {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    /// Set when the request asked for log-probabilities (token texts come from it).
    logprobs: Option<Arc<Tokenizer>>,
}

impl Reply {
    fn object(&self, stream: bool) -> &'static str {
        match (self.kind, stream) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, stream: bool, choice: Value, usage: Option<Value>) -> Value {
        let mut v = json!({
            "id": self.id, "object": self.object(stream), "created": self.created,
            "model": self.model, "choices": [choice],
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }

    /// A whole (non-streamed) response.
    fn full(&self, text: String, done: Done, lps: &[TokenLogprob]) -> Value {
        let logprobs = self.logprobs_json(lps, &mut Cursor::default());
        let choice = match self.kind {
            Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason(done.finish), "logprobs": logprobs}),
            Kind::Completion => json!({"index": 0, "text": text,
                "finish_reason": finish_reason(done.finish), "logprobs": logprobs}),
        };
        self.envelope(false, choice, Some(usage(done)))
    }

    /// A streamed chunk: text and its tokens' log-probabilities (`at`: the completion before
    /// them), and the finish reason in the last one.
    fn chunk(
        &self,
        text: Option<&str>,
        done: Option<Done>,
        lps: &[TokenLogprob],
        at: &mut Cursor,
    ) -> Value {
        let reason = done.map(|d| finish_reason(d.finish));
        let logprobs = if lps.is_empty() {
            Value::Null
        } else {
            self.logprobs_json(lps, at)
        };
        let choice = match self.kind {
            Kind::Chat => {
                let delta = text.map_or(json!({}), |t| json!({"content": t}));
                json!({"index": 0, "delta": delta, "finish_reason": reason, "logprobs": logprobs})
            }
            Kind::Completion => json!({"index": 0, "text": text.unwrap_or(""),
                "finish_reason": reason, "logprobs": logprobs}),
        };
        self.envelope(true, choice, done.map(usage))
    }

    /// OpenAI's `logprobs` object (null when not asked for): on chat `{"content": [{token,
    /// logprob, bytes, top_logprobs}]}`, on completions the parallel lists `tokens`,
    /// `token_logprobs`, `top_logprobs` (token -> logprob) and `text_offset`.
    fn logprobs_json(&self, lps: &[TokenLogprob], at: &mut Cursor) -> Value {
        let Some(tok) = &self.logprobs else {
            return Value::Null;
        };
        let mut content = vec![];
        let (mut tokens, mut offsets, mut tops) = (vec![], vec![], vec![]);
        for l in lps {
            // A token's text is what it adds after the tokens before it, as the text stream
            // decodes them (a lone token may decode without its leading space). The context is
            // decoded once for the token and its alternatives.
            let after = at.texts(tok);
            let text = |id: u32| after.text_of(id);
            let t = text(l.id);
            match self.kind {
                Kind::Chat => {
                    let entry = |t: String, lp: f32| json!({"bytes": t.as_bytes(), "token": t, "logprob": lp});
                    let mut e = entry(t.clone(), l.logprob);
                    e["top_logprobs"] = l.top.iter().map(|&(i, p)| entry(text(i), p)).collect();
                    content.push(e);
                }
                Kind::Completion => {
                    let top: serde_json::Map<String, Value> =
                        l.top.iter().map(|&(i, p)| (text(i), json!(p))).collect();
                    tops.push(Value::Object(top));
                    offsets.push(at.offset);
                    tokens.push(t.clone());
                }
            }
            at.offset += t.chars().count();
            at.prev.push(l.id);
        }
        match self.kind {
            Kind::Chat => json!({ "content": content }),
            Kind::Completion => {
                json!({"tokens": tokens, "text_offset": offsets, "top_logprobs": tops,
                    "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>()})
            }
        }
    }
}

/// Where a completion's log-probabilities have got to: its characters so far (`text_offset`)
/// and its tokens so far (the context a token's text is decoded in).
#[derive(Default)]
struct Cursor {
    offset: usize,
    prev: Vec<u32>,
}

impl Cursor {
    /// Tokens of context a token's text is decoded after (enough for any tokenizer's spacing and
    /// multi-token characters; bounded so long completions stay linear).
    const CONTEXT: usize = 8;

    /// The texts tokens add after the tokens so far (their context decoded once).
    fn texts<'a>(&self, tok: &'a Tokenizer) -> After<'a> {
        let ctx = self.prev[self.prev.len().saturating_sub(Self::CONTEXT)..].to_vec();
        let before = tok.decode(&ctx).unwrap_or_default();
        After { tok, ctx, before }
    }
}

/// A context and its decoded text, to read what one more token adds.
struct After<'a> {
    tok: &'a Tokenizer,
    ctx: Vec<u32>,
    before: String,
}

impl After<'_> {
    /// The text `id` adds after the context.
    fn text_of(&self, id: u32) -> String {
        let mut ids = self.ctx.clone();
        ids.push(id);
        let after = self.tok.decode(&ids).unwrap_or_default();
        match after.strip_prefix(self.before.as_str()) {
            Some(t) => t.to_string(),
            None => self.tok.decode(&[id]).unwrap_or_default(),
        }
    }
}

fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Eos | Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

fn usage(d: Done) -> Value {
    json!({"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
        "total_tokens": d.prompt_tokens + d.completion_tokens})
}

/// Queues the request on the engine and answers whole or as a stream of events.
async fn respond(
    s: &ServerState,
    req: GenRequest,
    stream: bool,
    kind: Kind,
) -> ApiResult<Response> {
    let req_logprobs = req.logprobs.is_some();
    let (tx, mut rx) = tmpsc::unbounded_channel::<Event>();
    let sink: Sink = Box::new(move |ev| tx.send(ev).is_ok());
    s.submit
        .send((req, sink))
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped"))?;
    let n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let reply = Reply {
        kind,
        id: match kind {
            Kind::Chat => format!("chatcmpl-{n}"),
            Kind::Completion => format!("cmpl-{n}"),
        },
        model: s.model_id.clone(),
        created: now(),
        logprobs: req_logprobs.then(|| s.tokenizer.clone()),
    };
    if !stream {
        let (mut text, mut lps) = (String::new(), vec![]);
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Text {
                    text: t, logprobs, ..
                } => {
                    text += &t;
                    lps.extend(logprobs);
                }
                Event::Done(d) => return Ok(Json(reply.full(text, d, &lps)).into_response()),
                Event::Error(m) => return Err(engine_error(m)),
            }
        }
        return Err(engine_error(
            "the engine stopped before the request ended".into(),
        ));
    }
    // First a chunk with the role (chat), then text, then the finish + usage, then [DONE].
    enum Phase {
        Start,
        Run,
        Finished,
        End,
    }
    let reply = Arc::new(reply);
    // The stream's state: the events, the phase, the completion so far (for log-probabilities'
    // token texts and offsets) and log-probabilities of tokens whose text is still held back.
    struct State {
        rx: tmpsc::UnboundedReceiver<Event>,
        phase: Phase,
        at: Cursor,
        pending: Vec<TokenLogprob>,
    }
    let start = State {
        rx,
        phase: Phase::Start,
        at: Cursor::default(),
        pending: vec![],
    };
    let events = futures_util::stream::unfold(start, move |mut st| {
        let reply = reply.clone();
        async move {
            let data = |v: Value| {
                Ok::<_, std::convert::Infallible>(SseEvent::default().data(v.to_string()))
            };
            match st.phase {
                Phase::Start => {
                    let first = match reply.kind {
                        Kind::Chat => {
                            let mut v = reply.chunk(None, None, &[], &mut Cursor::default());
                            v["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
                            v
                        }
                        Kind::Completion => {
                            reply.chunk(Some(""), None, &[], &mut Cursor::default())
                        }
                    };
                    st.phase = Phase::Run;
                    Some((data(first), st))
                }
                Phase::Run => match st.rx.recv().await {
                    Some(Event::Text { text, logprobs, .. }) if text.is_empty() => {
                        st.pending.extend(logprobs);
                        Some((Ok(SseEvent::default().comment("")), st))
                    }
                    Some(Event::Text { text, logprobs, .. }) => {
                        let mut lps = std::mem::take(&mut st.pending);
                        lps.extend(logprobs);
                        let v = reply.chunk(Some(&text), None, &lps, &mut st.at);
                        Some((data(v), st))
                    }
                    Some(Event::Done(d)) => {
                        let lps = std::mem::take(&mut st.pending);
                        let v = reply.chunk(None, Some(d), &lps, &mut st.at);
                        st.phase = Phase::Finished;
                        Some((data(v), st))
                    }
                    Some(Event::Error(m)) => {
                        st.phase = Phase::Finished;
                        Some((data(engine_error(m).body()), st))
                    }
                    None => {
                        st.phase = Phase::Finished;
                        Some((data(engine_error("the engine stopped".into()).body()), st))
                    }
                },
                Phase::Finished => {
                    st.phase = Phase::End;
                    Some((Ok(SseEvent::default().data("[DONE]")), st))
                }
                Phase::End => None,
            }
        }
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn engine_error(m: String) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m)
}
