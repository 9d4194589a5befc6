//! The endpoints: OpenAI's chat and text completions (whole or streamed
//! as Server-Sent Events), models, llama-server's tokenize, detokenize and
//! health, the metrics and the chat page.

use crate::api::{self, ApiError, ChatRequest, CompletionRequest, DetokenizeRequest, Prompt, Sampling, TokenizeRequest};
use crate::scheduler::{Event, Finish, GenParams, Job, TokenLogprob};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use bitnet_frontends::chat::Message;
use bitnet_runtime::SamplerConfig;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

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

pub async fn page() -> impl IntoResponse {
    Html(include_str!("page.html"))
}

pub async fn health() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

pub async fn metrics(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    st.metrics.set_load(st.scheduler.queued(), st.metrics.running.get() as usize, &st.engine.kv_usage());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], st.metrics.encode())
}

pub async fn not_found() -> ApiError {
    ApiError::status(404, "no such endpoint; this server has /v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize, /health and /metrics")
}

pub async fn models(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    Json(json!({
        "object": "list",
        "data": [{ "id": st.config.alias, "object": "model", "created": st.created, "owned_by": "bitnet-rs",
                   "meta": { "n_ctx": st.engine.context, "n_vocab": st.engine.vocab() } }],
    }))
}

pub async fn tokenize(State(st): State<Arc<AppState>>, b: Result<Bytes, BytesRejection>) -> ApiResult {
    let req: TokenizeRequest = api::parse(&body(b)?)?;
    let tok = &st.engine.tokenizer;
    let ids = tok.encode(&req.content, req.add_special && tok.add_bos, false).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Json(json!({ "tokens": ids })).into_response())
}

pub async fn detokenize(State(st): State<Arc<AppState>>, b: Result<Bytes, BytesRejection>) -> ApiResult {
    let req: DetokenizeRequest = api::parse(&body(b)?)?;
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= st.engine.vocab()) {
        return Err(ApiError::bad_request(format!("token id {bad} is outside the vocabulary of {}", st.engine.vocab())).param("tokens"));
    }
    Ok(Json(json!({ "content": st.engine.tokenizer.decode_text(&req.tokens) })).into_response())
}

/// Sampling settings and the token budget of a request whose prompt is
/// `prompt_len` tokens; `default_max` when it names none.
fn gen_params(st: &AppState, s: &Sampling, prompt_len: usize, default_max: Option<u64>, logprobs: Option<usize>) -> Result<GenParams, ApiError> {
    if let Some(n) = s.n.filter(|&n| n != 1) {
        return Err(ApiError::bad_request(format!("n = {n}: this server returns one choice per request (n = 1)")).param("n"));
    }
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
    let room = (context - prompt_len) as u64;
    let max = s.max_completion_tokens.or(s.max_tokens).or(default_max).unwrap_or(room).min(room);
    let stop = s.stop.as_ref().map(|o| match o {
        api::OneOrMany::One(x) => vec![x.clone()],
        api::OneOrMany::Many(v) => v.clone(),
    });
    let stop = stop.unwrap_or_default();
    check(stop.len() <= 16, "stop", "at most 16 strings")?;
    let seed = s.seed.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
    let sampler = SamplerConfig {
        temperature: t,
        top_p,
        min_p,
        top_k: s.top_k.unwrap_or(SamplerConfig::default().top_k),
        presence_penalty: pp,
        frequency_penalty: fp,
        seed,
        ..SamplerConfig::default()
    };
    Ok(GenParams { max_tokens: max as usize, sampler, stop, logprobs })
}

/// Queues a job; its events arrive on the receiver.
fn submit(st: &AppState, prompt: Vec<u32>, params: GenParams) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let prompt_len = prompt.len();
    let deadline = st.config.timeout.map(|t| Instant::now() + t);
    st.scheduler.submit(Job { prompt, params, events: tx, deadline }).map_err(|m| ApiError::status(503, m))?;
    st.metrics.prompt_tokens.inc_by(prompt_len as u64);
    Ok(rx)
}

/// One completion as the scheduler reports it.
#[derive(Default)]
struct Collected {
    text: String,
    tokens: Vec<(u32, String, Option<TokenLogprob>)>,
    finish: Option<Finish>,
    usage: (usize, usize, usize),
}

async fn collect(mut rx: mpsc::UnboundedReceiver<Event>) -> Result<Collected, ApiError> {
    let mut c = Collected::default();
    while let Some(e) = rx.recv().await {
        match e {
            Event::Token { id, text, logprob } => {
                c.text += &text;
                c.tokens.push((id, text, logprob));
            }
            Event::Text(t) => c.text += &t,
            Event::Done { finish, prompt_tokens, completion_tokens, cached_tokens } => {
                c.finish = Some(finish);
                c.usage = (prompt_tokens, completion_tokens, cached_tokens);
                return Ok(c);
            }
            Event::Error { status, message } => return Err(ApiError::status(status, message)),
        }
    }
    Err(ApiError::status(500, "the scheduler stopped before the request finished"))
}

fn usage((prompt, completion, cached): (usize, usize, usize)) -> Value {
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": { "cached_tokens": cached } })
}

fn token_text(st: &AppState, id: u32) -> String {
    st.engine.tokenizer.decode(None, &[id])
}

/// OpenAI's chat logprobs entry for one token.
fn chat_logprob(st: &AppState, id: u32, lp: &TokenLogprob) -> Value {
    let entry = |id: u32, logprob: f32| {
        let t = token_text(st, id);
        json!({ "token": t, "logprob": logprob, "bytes": t.as_bytes() })
    };
    let mut e = entry(id, lp.logprob);
    e["top_logprobs"] = lp.top.iter().map(|&(i, l)| entry(i, l)).collect();
    e
}

fn tokens_header(mut r: Response, n: usize) -> Response {
    if let Ok(v) = HeaderValue::from_str(&n.to_string()) {
        r.headers_mut().insert("x-bitnet-tokens", v);
    }
    r
}

pub async fn chat_completions(State(st): State<Arc<AppState>>, b: Result<Bytes, BytesRejection>) -> ApiResult {
    let req: ChatRequest = api::parse(&body(b)?)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages is empty").param("messages"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer") {
            return Err(ApiError::bad_request(format!("role {:?}: messages are system, user or assistant", m.role)).param("messages"));
        }
        let role = if m.role == "developer" { "system" } else { m.role.as_str() };
        let text = m.content.as_ref().map(|c| c.text()).transpose()?.unwrap_or_default();
        messages.push(Message::new(role, &text));
    }
    let prompt = st.engine.chat_ids(&messages).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let logprobs = req.logprobs.then(|| req.top_logprobs.unwrap_or(0));
    let params = gen_params(&st, &req.sampling, prompt.len(), None, logprobs)?;
    let rx = submit(&st, prompt, params)?;
    let id = format!("chatcmpl-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let head = json!({ "id": id, "created": st.created_now(), "model": st.config.alias });
    if req.sampling.stream {
        let include_usage = req.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
        return Ok(stream(st, rx, head, Kind::Chat { logprobs: logprobs.is_some() }, include_usage));
    }
    let c = collect(rx).await?;
    let lp = logprobs.map(|_| json!({ "content": c.tokens.iter().filter_map(|(i, _, l)| l.as_ref().map(|l| chat_logprob(&st, *i, l))).collect::<Vec<_>>() }));
    let mut out = head;
    out["object"] = "chat.completion".into();
    out["choices"] = json!([{ "index": 0, "message": { "role": "assistant", "content": c.text }, "logprobs": lp,
                              "finish_reason": c.finish.map(|f| f.name()) }]);
    out["usage"] = usage(c.usage);
    Ok(tokens_header(Json(out).into_response(), c.usage.0 + c.usage.1))
}

pub async fn completions(State(st): State<Arc<AppState>>, b: Result<Bytes, BytesRejection>) -> ApiResult {
    let req: CompletionRequest = api::parse(&body(b)?)?;
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
    let params = gen_params(&st, &req.sampling, prompt.len(), Some(16), req.logprobs)?;
    let rx = submit(&st, prompt, params)?;
    let id = format!("cmpl-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let head = json!({ "id": id, "created": st.created_now(), "model": st.config.alias });
    if req.sampling.stream {
        let include_usage = req.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
        return Ok(stream(st, rx, head, Kind::Text { echo, logprobs: req.logprobs.is_some() }, include_usage));
    }
    let c = collect(rx).await?;
    let lp = req.logprobs.map(|_| text_logprobs(&st, &c.tokens, echo.len()));
    let mut out = head;
    out["object"] = "text_completion".into();
    out["choices"] = json!([{ "index": 0, "text": echo + &c.text, "logprobs": lp, "finish_reason": c.finish.map(|f| f.name()) }]);
    out["usage"] = usage(c.usage);
    Ok(tokens_header(Json(out).into_response(), c.usage.0 + c.usage.1))
}

/// The legacy completions API's logprobs object.
fn text_logprobs(st: &AppState, tokens: &[(u32, String, Option<TokenLogprob>)], mut offset: usize) -> Value {
    let (mut toks, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for (id, text, lp) in tokens {
        toks.push(token_text(st, *id));
        lps.push(lp.as_ref().map(|l| l.logprob));
        tops.push(lp.as_ref().map(|l| l.top.iter().map(|&(i, p)| (token_text(st, i), json!(p))).collect::<serde_json::Map<_, _>>()));
        offsets.push(offset);
        offset += text.len();
    }
    json!({ "tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets })
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

/// Relays the scheduler's events as Server-Sent Events: OpenAI's chunks,
/// then `data: [DONE]`. A client that goes away drops the stream, which
/// ends the relay and with it the request.
fn stream(st: Arc<AppState>, mut rx: mpsc::UnboundedReceiver<Event>, head: Value, kind: Kind, include_usage: bool) -> Response {
    let (tx, out) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let chunk = |choice: Value, usage: Option<Value>| {
            let mut c = head.clone();
            c["object"] = match kind {
                Kind::Chat { .. } => "chat.completion.chunk",
                Kind::Text { .. } => "text_completion",
            }
            .into();
            c["choices"] = if choice.is_null() { json!([]) } else { json!([choice]) };
            if let Some(u) = usage {
                c["usage"] = u;
            } else if include_usage {
                c["usage"] = Value::Null;
            }
            SseEvent::default().data(c.to_string())
        };
        let piece = |text: &str, lp: Option<Value>, finish: Option<&str>| match &kind {
            Kind::Chat { .. } => {
                let delta = if finish.is_some() && text.is_empty() { json!({}) } else { json!({ "content": text }) };
                json!({ "index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish })
            }
            Kind::Text { .. } => json!({ "index": 0, "text": text, "logprobs": lp, "finish_reason": finish }),
        };
        let first = match &kind {
            Kind::Chat { .. } => json!({ "index": 0, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }),
            Kind::Text { echo, .. } => json!({ "index": 0, "text": echo, "logprobs": null, "finish_reason": null }),
        };
        if tx.send(Ok(chunk(first, None))).await.is_err() {
            return;
        }
        let mut offset = match &kind {
            Kind::Text { echo, .. } => echo.len(),
            _ => 0,
        };
        while let Some(e) = rx.recv().await {
            let event = match e {
                Event::Token { id, text, logprob } => {
                    let lp = match (&kind, &logprob) {
                        (Kind::Chat { logprobs: true }, Some(l)) => Some(json!({ "content": [chat_logprob(&st, id, l)] })),
                        (Kind::Text { logprobs: true, .. }, Some(_)) => Some(text_logprobs(&st, &[(id, text.clone(), logprob.clone())], offset)),
                        _ => None,
                    };
                    offset += text.len();
                    if text.is_empty() && lp.is_none() {
                        continue;
                    }
                    chunk(piece(&text, lp, None), None)
                }
                Event::Text(text) => chunk(piece(&text, None, None), None),
                Event::Done { finish, prompt_tokens, completion_tokens, cached_tokens } => {
                    let _ = tx.send(Ok(chunk(piece("", None, Some(finish.name())), None))).await;
                    if include_usage {
                        let _ = tx.send(Ok(chunk(Value::Null, Some(usage((prompt_tokens, completion_tokens, cached_tokens)))))).await;
                    }
                    break;
                }
                Event::Error { status, message } => SseEvent::default().data(ApiError::status(status, message).body().to_string()),
            };
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out)).keep_alive(KeepAlive::default()).into_response()
}
