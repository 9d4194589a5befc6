//! The endpoints: OpenAI's chat and text completions (whole or streamed
//! as Server-Sent Events), models, llama-server's tokenize, detokenize and
//! health, the metrics and the chat page.

use crate::api::{self, ApiError, ChatRequest, CompletionRequest, DetokenizeRequest, Prompt, Sampling, TokenizeRequest};
use crate::responses::*;
use crate::scheduler::{Event, Finish, GenParams, Job, Request, TokenLogprob};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use bitnet_frontends::chat::Message;
use bitnet_runtime::{OutputFormat, Sampler, SamplerConfig};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{StreamExt, StreamMap};

type ApiResult = Result<Response, ApiError>;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|e| {
        let status = e.status().as_u16();
        if status == 413 {
            ApiError::status(413, "the request body is larger than the server accepts")
        } else {
            ApiError::status(status, format!("reading the request body: {e}"))
        }
    })
}

/// The chat page.
#[utoipa::path(get, path = "/", responses((status = 200, description = "The chat page: one self-contained HTML file", content_type = "text/html")))]
pub async fn page() -> impl IntoResponse {
    Html(include_str!("page.html"))
}

/// Whether the model is loaded; needs no key.
#[utoipa::path(get, path = "/health", responses(
    (status = 200, description = "The model is ready", body = Health),
    (status = 503, description = "The model is still loading", body = Health),
))]
pub async fn health() -> impl IntoResponse {
    Json(Health { status: "ok".into() })
}

/// The server's metrics in Prometheus' text format; needs no key.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain")))]
pub async fn metrics(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    st.metrics.set_load(st.scheduler.queued(), st.metrics.running.get() as usize, &st.engine.kv_usage());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], st.metrics.encode())
}

/// This description of the API (OpenAPI 3.1); needs no key.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "The OpenAPI 3.1 description of this server", content_type = "application/json")))]
pub async fn openapi() -> impl IntoResponse {
    static SPEC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let spec = SPEC.get_or_init(|| crate::openapi::spec().to_string());
    ([(header::CONTENT_TYPE, "application/json")], spec.as_str())
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::status(405, "this endpoint does not take that method (the API's endpoints take POST, the others GET)")
}

pub async fn not_found() -> ApiError {
    ApiError::status(
        404,
        "no such endpoint; this server has /v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize, /health, /metrics and /openapi.json",
    )
}

/// The one model this server serves.
#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList)))]
pub async fn models(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    let card = ModelCard {
        id: st.config.alias.clone(),
        object: "model".into(),
        created: st.created,
        owned_by: "bitnet-rs".into(),
        meta: ModelMeta { n_ctx: st.engine.context, n_vocab: st.engine.vocab() },
    };
    Json(ModelList { object: "list".into(), data: vec![card] })
}

/// Text to token ids, as llama-server's `/tokenize`.
#[utoipa::path(post, path = "/tokenize", request_body = TokenizeRequest, responses((status = 200, body = TokenizeResponse)))]
pub async fn tokenize(State(st): State<Arc<AppState>>, b: Result<Bytes, BytesRejection>) -> ApiResult {
    let req: TokenizeRequest = api::parse(&body(b)?)?;
    let tok = &st.engine.tokenizer;
    let ids = tok.encode(&req.content, req.add_special && tok.add_bos, false).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Json(TokenizeResponse { tokens: ids }).into_response())
}

/// Token ids to text, as llama-server's `/detokenize`.
#[utoipa::path(post, path = "/detokenize", request_body = DetokenizeRequest, responses((status = 200, body = DetokenizeResponse)))]
pub async fn detokenize(State(st): State<Arc<AppState>>, b: Result<Bytes, BytesRejection>) -> ApiResult {
    let req: DetokenizeRequest = api::parse(&body(b)?)?;
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= st.engine.vocab()) {
        return Err(ApiError::bad_request(format!("token id {bad} is outside the vocabulary of {}", st.engine.vocab())).param("tokens"));
    }
    Ok(Json(DetokenizeResponse { content: st.engine.tokenizer.decode_text(&req.tokens) }).into_response())
}

/// The token budget and the like of a request whose prompt is `prompt_len`
/// tokens (`default_max` when it names none), and its sampling settings.
fn gen_params(
    st: &AppState,
    s: &Sampling,
    prompt_len: usize,
    default_max: Option<u64>,
    logprobs: Option<usize>,
) -> Result<(GenParams, SamplerConfig), ApiError> {
    let context = st.engine.context;
    if prompt_len == 0 {
        return Err(ApiError::bad_request("the prompt is empty").param("prompt"));
    }
    if prompt_len >= context {
        return Err(ApiError::bad_request(format!(
            "the prompt is {prompt_len} tokens; the context holds {context}, with room for at least one generated token"
        ))
        .param("messages"));
    }
    let check = |ok: bool, name: &str, what: &str| if ok { Ok(()) } else { Err(ApiError::bad_request(format!("{name} must be {what}")).param(name)) };
    let t = s.temperature.unwrap_or(SamplerConfig::default().temperature);
    check(t.is_finite() && (0.0..=2.0).contains(&t), "temperature", "between 0 and 2")?;
    let top_p = s.top_p.unwrap_or(SamplerConfig::default().top_p);
    check(top_p > 0.0 && top_p <= 1.0, "top_p", "in (0, 1]")?;
    let min_p = s.min_p.unwrap_or(SamplerConfig::default().min_p);
    check((0.0..=1.0).contains(&min_p), "min_p", "in [0, 1]")?;
    let (pp, fp) = (s.presence_penalty.unwrap_or(0.0), s.frequency_penalty.unwrap_or(0.0));
    check((-2.0..=2.0).contains(&pp), "presence_penalty", "between -2 and 2")?;
    check((-2.0..=2.0).contains(&fp), "frequency_penalty", "between -2 and 2")?;
    if let Some(k) = logprobs {
        check(k <= 20, "top_logprobs", "at most 20")?;
    }
    let response_format = s.response_format.as_ref().map(OutputFormat::from_response_format).transpose();
    let response_format = response_format.map_err(|m| ApiError::bad_request(format!("response_format: {m}")).param("response_format"))?.flatten();
    let format = match (response_format, &s.json_schema, grammar(s)) {
        (f, None, None) => f,
        (None, Some(schema), None) => Some(OutputFormat::JsonSchema(schema.clone())),
        (None, None, Some(g)) => Some(OutputFormat::Grammar(g.clone())),
        _ => return Err(ApiError::bad_request("give one of response_format, json_schema and grammar").param(format_param(s))),
    };
    let logit_bias = logit_bias(s.logit_bias.as_ref())?;
    let room = (context - prompt_len) as u64;
    let max = s.max_completion_tokens.or(s.max_tokens).or(default_max).unwrap_or(room).min(room);
    let stop = s.stop.as_ref().map(|o| match o {
        api::OneOrMany::One(x) => vec![x.clone()],
        api::OneOrMany::Many(v) => v.clone(),
    });
    let stop = stop.unwrap_or_default();
    check(stop.len() <= 16, "stop", "at most 16 strings")?;
    let seed = s.seed.unwrap_or_else(SamplerConfig::clock_seed);
    let sampler = SamplerConfig {
        temperature: t,
        top_p,
        min_p,
        top_k: s.top_k.unwrap_or(SamplerConfig::default().top_k),
        presence_penalty: pp,
        frequency_penalty: fp,
        logit_bias,
        format,
        seed,
        ..SamplerConfig::default()
    };
    // What is left to check once the ranges above hold: the biases' tokens.
    st.engine.check_sampler(&sampler).map_err(|e| ApiError::bad_request(e.to_string()).param("logit_bias"))?;
    Ok((GenParams { max_tokens: max as usize, stop, logprobs, ignore_eos: s.ignore_eos }, sampler))
}

/// A request's GBNF grammar; an empty one is none.
fn grammar(s: &Sampling) -> Option<&String> {
    s.grammar.as_ref().filter(|g| !g.trim().is_empty())
}

/// The request field an output format came from, named in its errors.
fn format_param(s: &Sampling) -> &'static str {
    match (&s.json_schema, grammar(s)) {
        (Some(_), _) => "json_schema",
        (None, Some(_)) => "grammar",
        (None, None) => "response_format",
    }
}

/// The most choices one request may ask for (`n`).
const MAX_CHOICES: u64 = 16;

/// How many choices a request asks for (`n`, 1 unless given).
fn choices(s: &Sampling) -> Result<usize, ApiError> {
    match s.n.unwrap_or(1) {
        n @ 1..=MAX_CHOICES => Ok(n as usize),
        n => Err(ApiError::bad_request(format!("n = {n}: a request may ask for 1 to {MAX_CHOICES} choices")).param("n")),
    }
}

/// A request's sampler, its output format compiled once for all its
/// choices (a schema that does not compile is its 400). A format compiles
/// off the async workers: the first one also indexes the vocabulary.
async fn sampler(st: &Arc<AppState>, s: &Sampling, config: SamplerConfig) -> Result<Sampler, ApiError> {
    if config.format.is_none() {
        return st.engine.sampler(config).map_err(|e| ApiError::bad_request(e.to_string()));
    }
    let engine = st.engine.clone();
    let compiled = tokio::task::spawn_blocking(move || engine.sampler(config)).await;
    let param = format_param(s);
    match compiled {
        Ok(r) => r.map_err(|e| ApiError::bad_request(e.to_string()).param(param)),
        Err(_) => Err(ApiError::status(500, "compiling the response format failed").param(param)),
    }
}

/// OpenAI's `logit_bias` (token ids as strings, biases in [-100, 100]) as
/// the sampler's (whose tokens the engine checks against the vocabulary).
fn logit_bias(bias: Option<&std::collections::BTreeMap<String, f32>>) -> Result<Vec<(u32, f32)>, ApiError> {
    let bad = |m: String| ApiError::bad_request(format!("logit_bias: {m}")).param("logit_bias");
    let mut out = Vec::new();
    for (key, &b) in bias.into_iter().flatten() {
        let id = key.trim().parse::<u32>().map_err(|_| bad(format!("{key:?} is not a token id")))?;
        if !(-100.0..=100.0).contains(&b) {
            return Err(bad(format!("the bias of token {id} is {b}; it must be between -100 and 100")));
        }
        out.push((id, b));
    }
    Ok(out)
}

/// Queues one job for each of `n` choices, choice `i` drawing with the
/// request's seed plus `i` (so that they differ, and each is repeatable);
/// the events of choice `i` arrive on the `i`th receiver. The queue takes
/// them all or none.
fn submit(st: &AppState, prompt: Vec<u32>, params: GenParams, sampler: Sampler, n: usize) -> Result<Vec<mpsc::UnboundedReceiver<Event>>, ApiError> {
    let deadline = st.config.timeout.map(|t| Instant::now() + t);
    let seed = sampler.config.seed;
    let mut samplers: Vec<Sampler> = (1..n as u64).map(|i| sampler.with_seed(seed.wrapping_add(i))).collect();
    samplers.insert(0, sampler);
    let (mut jobs, mut receivers) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for sampler in samplers {
        let (tx, rx) = mpsc::unbounded_channel();
        jobs.push(Job { request: Request { prompt: prompt.clone(), params: params.clone(), events: tx, deadline }, sampler });
        receivers.push(rx);
    }
    st.scheduler.submit(jobs).map_err(|m| ApiError::status(503, m))?;
    st.metrics.prompt_tokens.inc_by(prompt.len() as u64);
    Ok(receivers)
}

/// A choice's tokens as generated: each id, the text it made printable and its logprobs.
type Tokens = Vec<(u32, String, Option<TokenLogprob>)>;

/// One completion as the scheduler reports it.
struct Collected {
    text: String,
    tokens: Tokens,
    finish: Finish,
    usage: (usize, usize, usize),
}

/// Every choice of a request, in order, and their usage: the prompt counted
/// once, as OpenAI does, the completions' tokens summed. The first choice
/// to fail fails the request at once, and the others are dropped with
/// their receivers.
async fn collect_all(receivers: Vec<mpsc::UnboundedReceiver<Event>>) -> Result<(Vec<Collected>, (usize, usize, usize)), ApiError> {
    let n = receivers.len();
    let mut events = StreamMap::new();
    for (index, rx) in receivers.into_iter().enumerate() {
        events.insert(index, UnboundedReceiverStream::new(rx));
    }
    let mut parts: Vec<(String, Tokens)> = vec![Default::default(); n];
    let mut done: Vec<Option<Collected>> = (0..n).map(|_| None).collect();
    while let Some((index, e)) = events.next().await {
        let (text, tokens) = &mut parts[index];
        match e {
            Event::Token { id, text: piece, logprob } => {
                *text += &piece;
                tokens.push((id, piece, logprob));
            }
            Event::Text(t) => *text += &t,
            Event::Done { finish, prompt_tokens, completion_tokens, cached_tokens } => {
                let (text, tokens) = std::mem::take(&mut parts[index]);
                done[index] = Some(Collected { text, tokens, finish, usage: (prompt_tokens, completion_tokens, cached_tokens) });
            }
            Event::Error { status, message } => return Err(ApiError::status(status, message)),
        }
    }
    let all: Vec<Collected> =
        done.into_iter().collect::<Option<_>>().ok_or_else(|| ApiError::status(500, "the scheduler stopped before the request finished"))?;
    let (prompt, cached) = all.first().map_or((0, 0), |c| (c.usage.0, c.usage.2));
    let usage = (prompt, all.iter().map(|c| c.usage.1).sum(), cached);
    Ok((all, usage))
}

fn usage((prompt, completion, cached): (usize, usize, usize)) -> Usage {
    Usage::new(prompt, completion, cached)
}

fn token_text(st: &AppState, id: u32) -> String {
    st.engine.tokenizer.decode(None, &[id])
}

/// OpenAI's chat logprobs entry for one token.
fn chat_logprob(st: &AppState, id: u32, lp: &TokenLogprob) -> LogprobEntry {
    let top = |&(id, logprob): &(u32, f32)| {
        let token = token_text(st, id);
        TopLogprob { bytes: token.as_bytes().to_vec(), token, logprob }
    };
    let token = token_text(st, id);
    LogprobEntry { bytes: token.as_bytes().to_vec(), token, logprob: lp.logprob, top_logprobs: lp.top.iter().map(top).collect() }
}

fn tokens_header(mut r: Response, n: usize) -> Response {
    if let Ok(v) = HeaderValue::from_str(&n.to_string()) {
        r.headers_mut().insert("x-bitnet-tokens", v);
    }
    r
}

/// OpenAI's chat completions: the messages rendered with the chat
/// template, whole or streamed as Server-Sent Events (`stream: true`).
#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatRequest, responses(
    (status = 200, description = "The completion; with `stream: true`, `chat.completion.chunk` objects as Server-Sent Events, then `data: [DONE]`",
     content((ChatCompletion = "application/json"), (ChatCompletionChunk = "text/event-stream"))),
))]
pub async fn chat_completions(State(st): State<Arc<AppState>>, b: Result<Bytes, BytesRejection>) -> ApiResult {
    let req: ChatRequest = api::parse(&body(b)?)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages is empty").param("messages"));
    }
    for (name, given) in [("tools", &req.tools), ("functions", &req.functions)] {
        if given.as_ref().is_some_and(|g| !g.is_empty()) {
            return Err(ApiError::bad_request(format!("{name} are not supported: this server does not do function calling")).param(name));
        }
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        let text = m.content.as_ref().map(|c| c.text()).transpose()?.unwrap_or_default();
        messages.push(Message::new(m.role.template_name(), &text));
    }
    let prompt = st.engine.chat_ids(&messages).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let logprobs = req.logprobs.then(|| req.top_logprobs.unwrap_or(0));
    let n = choices(&req.sampling)?;
    let (params, config) = gen_params(&st, &req.sampling, prompt.len(), None, logprobs)?;
    let sampler = sampler(&st, &req.sampling, config).await?;
    let receivers = submit(&st, prompt, params, sampler, n)?;
    let id = format!("chatcmpl-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    if req.sampling.stream {
        let include_usage = req.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let head = StreamHead { id, created: st.created_now(), model: st.config.alias.clone() };
        return Ok(stream(st, receivers, head, Kind::Chat { logprobs: logprobs.is_some() }, include_usage));
    }
    let (all, used) = collect_all(receivers).await?;
    let choice = |(index, c): (usize, Collected)| {
        let logprobs =
            logprobs.map(|_| ChatLogprobs { content: c.tokens.iter().filter_map(|(i, _, l)| l.as_ref().map(|l| chat_logprob(&st, *i, l))).collect() });
        ChatChoice { index: index as u32, message: AssistantMessage { role: "assistant".into(), content: c.text }, logprobs, finish_reason: c.finish }
    };
    let out = ChatCompletion {
        id,
        object: "chat.completion".into(),
        created: st.created_now(),
        model: st.config.alias.clone(),
        choices: all.into_iter().enumerate().map(choice).collect(),
        usage: usage(used),
    };
    Ok(tokens_header(Json(out).into_response(), used.0 + used.1))
}

/// OpenAI's (legacy) text completions: a text prompt (BOS added as the
/// model asks) or token ids (used verbatim), whole or streamed.
#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest, responses(
    (status = 200, description = "The completion; with `stream: true`, `text_completion` objects as Server-Sent Events, then `data: [DONE]`",
     content((TextCompletion = "application/json"), (TextCompletionChunk = "text/event-stream"))),
))]
pub async fn completions(State(st): State<Arc<AppState>>, b: Result<Bytes, BytesRejection>) -> ApiResult {
    let req: CompletionRequest = api::parse(&body(b)?)?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request("suffix is not supported: this server completes after the prompt only").param("suffix"));
    }
    if let Some(n) = req.best_of.filter(|&n| n != 1) {
        return Err(ApiError::bad_request(format!("best_of = {n}: this server draws one completion per request (best_of = 1)")).param("best_of"));
    }
    let tok = &st.engine.tokenizer;
    let encode = |t: &str| tok.encode(t, tok.add_bos, false).map_err(|e| ApiError::bad_request(e.to_string()).param("prompt"));
    let one = |n: usize| if n == 1 { Ok(()) } else { Err(ApiError::bad_request(format!("{n} prompts: send one prompt per request")).param("prompt")) };
    let prompt = match &req.prompt {
        Prompt::Text(t) => encode(t)?,
        Prompt::Ids(ids) => ids.clone(),
        Prompt::Texts(v) => {
            one(v.len())?;
            encode(&v[0])?
        }
        Prompt::IdLists(v) => {
            one(v.len())?;
            v[0].clone()
        }
    };
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= st.engine.vocab()) {
        return Err(ApiError::bad_request(format!("token id {bad} is outside the vocabulary of {}", st.engine.vocab())).param("prompt"));
    }
    let echo = if req.echo { tok.decode_text(&prompt) } else { String::new() };
    let n = choices(&req.sampling)?;
    let (params, config) = gen_params(&st, &req.sampling, prompt.len(), Some(16), req.logprobs)?;
    let sampler = sampler(&st, &req.sampling, config).await?;
    let receivers = submit(&st, prompt, params, sampler, n)?;
    let id = format!("cmpl-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    if req.sampling.stream {
        let include_usage = req.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let head = StreamHead { id, created: st.created_now(), model: st.config.alias.clone() };
        return Ok(stream(st, receivers, head, Kind::Text { echo, logprobs: req.logprobs.is_some() }, include_usage));
    }
    let (all, used) = collect_all(receivers).await?;
    let choice = |(index, c): (usize, Collected)| {
        let logprobs = req.logprobs.map(|_| text_logprobs(&st, &c.tokens, echo.len()));
        TextChoice { index: index as u32, text: echo.clone() + &c.text, logprobs, finish_reason: c.finish }
    };
    let out = TextCompletion {
        id,
        object: "text_completion".into(),
        created: st.created_now(),
        model: st.config.alias.clone(),
        choices: all.into_iter().enumerate().map(choice).collect(),
        usage: usage(used),
    };
    Ok(tokens_header(Json(out).into_response(), used.0 + used.1))
}

/// The legacy completions API's logprobs object.
fn text_logprobs(st: &AppState, tokens: &[(u32, String, Option<TokenLogprob>)], mut offset: usize) -> TextLogprobs {
    let mut out = TextLogprobs::default();
    for (id, text, lp) in tokens {
        if let Some(lp) = lp {
            out.tokens.push(token_text(st, *id));
            out.token_logprobs.push(lp.logprob);
            out.top_logprobs.push(lp.top.iter().map(|&(i, p)| (token_text(st, i), p)).collect());
            out.text_offset.push(offset);
        }
        offset += text.len();
    }
    out
}

enum Kind {
    Chat { logprobs: bool },
    Text { echo: String, logprobs: bool },
}

impl AppState {
    fn created_now(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
    }
}

/// What every chunk of one streamed completion shares.
struct StreamHead {
    id: String,
    created: u64,
    model: String,
}

impl StreamHead {
    fn chat(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> ChatCompletionChunk {
        ChatCompletionChunk { id: self.id.clone(), object: "chat.completion.chunk".into(), created: self.created, model: self.model.clone(), choices, usage }
    }

    fn text(&self, choices: Vec<TextChunkChoice>, usage: Option<Usage>) -> TextCompletionChunk {
        TextCompletionChunk { id: self.id.clone(), object: "text_completion".into(), created: self.created, model: self.model.clone(), choices, usage }
    }
}

fn sse<T: serde::Serialize>(value: &T) -> SseEvent {
    SseEvent::default().data(serde_json::to_string(value).unwrap_or_default())
}

/// Relays the scheduler's events of every choice as Server-Sent Events:
/// OpenAI's chunks (each of one choice, as its events come), then `data:
/// [DONE]`. A client that goes away drops the stream, which ends the relay
/// and with it the requests of all the choices.
fn stream(st: Arc<AppState>, receivers: Vec<mpsc::UnboundedReceiver<Event>>, head: StreamHead, kind: Kind, include_usage: bool) -> Response {
    let (tx, out) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        // One piece of choice `index` (with its token's logprobs), or its end.
        let piece = |index: u32, text: String, token: Option<(u32, &TokenLogprob)>, offset: usize, finish: Option<Finish>| match &kind {
            Kind::Chat { logprobs } => {
                let logprobs = token.filter(|_| *logprobs).map(|(id, l)| ChatLogprobs { content: vec![chat_logprob(&st, id, l)] });
                let delta = if finish.is_some() && text.is_empty() { Delta::default() } else { Delta { role: None, content: Some(text) } };
                sse(&head.chat(vec![ChatChunkChoice { index, delta, logprobs, finish_reason: finish }], None))
            }
            Kind::Text { logprobs, .. } => {
                let logprobs = token.filter(|_| *logprobs).map(|(id, l)| text_logprobs(&st, &[(id, text.clone(), Some(l.clone()))], offset));
                sse(&head.text(vec![TextChunkChoice { index, text, logprobs, finish_reason: finish }], None))
            }
        };
        let first = |index: u32| match &kind {
            Kind::Chat { .. } => {
                let delta = Delta { role: Some("assistant".into()), content: Some(String::new()) };
                sse(&head.chat(vec![ChatChunkChoice { index, delta, logprobs: None, finish_reason: None }], None))
            }
            Kind::Text { echo, .. } => sse(&head.text(vec![TextChunkChoice { index, text: echo.clone(), logprobs: None, finish_reason: None }], None)),
        };
        let mut events = StreamMap::new();
        for (index, rx) in receivers.into_iter().enumerate() {
            if tx.send(Ok(first(index as u32))).await.is_err() {
                return;
            }
            events.insert(index as u32, UnboundedReceiverStream::new(rx));
        }
        let echoed = match &kind {
            Kind::Text { echo, .. } => echo.len(),
            _ => 0,
        };
        // Each choice's length so far (text offsets), and the usage: the
        // prompt once, the completions' tokens summed.
        let mut offsets = vec![echoed; events.len()];
        let events_total = events.len();
        let (mut left, mut used) = (events_total, (0, 0, 0));
        let wants_logprobs = matches!(kind, Kind::Chat { logprobs: true } | Kind::Text { logprobs: true, .. });
        while let Some((index, e)) = events.next().await {
            let offset = &mut offsets[index as usize];
            let event = match e {
                Event::Token { id, text, logprob } => {
                    let start = *offset;
                    *offset += text.len();
                    let token = logprob.as_ref().filter(|_| wants_logprobs).map(|l| (id, l));
                    if text.is_empty() && token.is_none() {
                        continue;
                    }
                    piece(index, text, token, start, None)
                }
                Event::Text(text) => {
                    *offset += text.len();
                    piece(index, text, None, *offset, None)
                }
                Event::Done { finish, prompt_tokens, completion_tokens, cached_tokens } => {
                    if left == events_total {
                        // The first choice done: the prompt, counted once.
                        (used.0, used.2) = (prompt_tokens, cached_tokens);
                    }
                    used.1 += completion_tokens;
                    left -= 1;
                    piece(index, String::new(), None, *offset, Some(finish))
                }
                Event::Error { status, message } => {
                    left -= 1;
                    sse(&ApiError::status(status, message).body())
                }
            };
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
            if left == 0 {
                if include_usage {
                    let u = Some(usage(used));
                    let last = match &kind {
                        Kind::Chat { .. } => sse(&head.chat(vec![], u)),
                        Kind::Text { .. } => sse(&head.text(vec![], u)),
                    };
                    let _ = tx.send(Ok(last)).await;
                }
                break;
            }
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out)).keep_alive(KeepAlive::default()).into_response()
}
