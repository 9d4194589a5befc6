//! The OpenAI request shapes the server reads, and its error shape. Fields
//! it does not know are ignored (SDKs send extras); fields of the wrong
//! type are a 400 that names them.

use crate::responses::{ErrorBody, ErrorResponse};
use serde::Deserialize;
use utoipa::ToSchema;

#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError { status: 400, message: message.into(), kind: "invalid_request_error", param: None, code: None }
    }

    pub fn param(mut self, p: &str) -> ApiError {
        self.param = Some(p.into());
        self
    }

    pub fn status(status: u16, message: impl Into<String>) -> ApiError {
        let (kind, code) = match status {
            401 => ("authentication_error", Some("invalid_api_key")),
            404 => ("invalid_request_error", Some("not_found")),
            405 => ("invalid_request_error", Some("method_not_allowed")),
            413 => ("invalid_request_error", Some("request_too_large")),
            503 => ("server_error", Some("server_overloaded")),
            504 => ("server_error", Some("timeout")),
            400..=499 => ("invalid_request_error", None),
            _ => ("server_error", None),
        };
        ApiError { status, message: message.into(), kind, param: None, code }
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse { error: ErrorBody { message: self.message.clone(), kind: self.kind.into(), param: self.param.clone(), code: self.code.map(Into::into) } }
    }
}

/// A string or a list of strings (`stop`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What chat and text completions share.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct Sampling {
    /// Tokens to generate at most; capped to what the context leaves
    /// (`finish_reason: length`). Default: the whole context for chat, 16
    /// for text completions.
    pub max_tokens: Option<u64>,
    /// The newer name of `max_tokens`; wins over it.
    pub max_completion_tokens: Option<u64>,
    /// 0 is greedy.
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f32>,
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub top_p: Option<f32>,
    /// 0 keeps every token.
    pub top_k: Option<usize>,
    #[schema(minimum = 0, maximum = 1)]
    pub min_p: Option<f32>,
    pub seed: Option<u64>,
    /// Up to 16 strings; the text ends before the first that appears, and
    /// the stop string is not part of it.
    pub stop: Option<OneOrMany>,
    #[schema(minimum = -2, maximum = 2)]
    pub presence_penalty: Option<f32>,
    #[schema(minimum = -2, maximum = 2)]
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string) to a bias between -100 and 100, added to the
    /// token's logit before sampling; -100 all but bans it, 100 all but
    /// forces it (OpenAI's `logit_bias`).
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    /// `{"type": "text"}`, `{"type": "json_object"}` or `{"type":
    /// "json_schema", "json_schema": {"name": ..., "schema": {...}}}`: the
    /// output is held to the schema as it is sampled.
    #[schema(value_type = Option<ResponseFormat>)]
    pub response_format: Option<serde_json::Value>,
    /// llama-server's spelling: the schema itself.
    #[schema(value_type = Option<Object>)]
    pub json_schema: Option<serde_json::Value>,
    /// llama-server's GBNF grammar (generation starts at its `root` rule);
    /// opening with `%llguidance`, llguidance's Lark syntax.
    pub grammar: Option<String>,
    /// Choices per request, each drawn with the request's seed plus its
    /// index (so that they differ, and each is repeatable); at most 16.
    #[schema(minimum = 1, maximum = 16)]
    pub n: Option<u64>,
    /// Go on past the end-of-generation token, as llama-server's
    /// `ignore_eos` (for benchmarks: every request generates `max_tokens`).
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
}

/// OpenAI's `response_format` (for the description; the server reads the
/// JSON through [`bitnet_runtime::OutputFormat::from_response_format`]).
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    #[schema(value_type = String, pattern = "^(text|json_object|json_schema)$")]
    pub kind: String,
    /// With `json_schema`: `{"name": ..., "schema": {...}, "strict": ...}`.
    #[schema(value_type = Option<Object>)]
    pub json_schema: Option<serde_json::Value>,
}

/// A message's content: text, or a list of parts of which the text ones count.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

impl Content {
    pub fn text(&self) -> Result<String, ApiError> {
        match self {
            Content::Text(t) => Ok(t.clone()),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => Ok(t.as_str()),
                    (kind, _) => {
                        Err(ApiError::bad_request(format!("content parts of type {kind:?} are not supported; this model reads text")).param("messages"))
                    }
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.concat()),
        }
    }
}

/// Who says a message; `developer` (OpenAI's newer name) is read as `system`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
}

impl Role {
    /// The role's name in chat templates.
    pub fn template_name(self) -> &'static str {
        match self {
            Role::System | Role::Developer => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatMessage {
    pub role: Role,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatRequest {
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub sampling: Sampling,
    #[serde(default)]
    pub logprobs: bool,
    /// With `logprobs`: alternatives per token.
    #[schema(maximum = 20)]
    pub top_logprobs: Option<usize>,
    /// Function calling is not supported: a request with tools is refused
    /// with a 400, not answered as if they were not there.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<serde_json::Value>>,
    /// The older form of `tools`: refused as they are.
    #[schema(value_type = Option<Vec<Object>>)]
    pub functions: Option<Vec<serde_json::Value>>,
}

/// A prompt: text, token ids, or a one-element list of either.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    #[serde(flatten)]
    pub sampling: Sampling,
    /// The legacy API's logprobs: how many alternatives per token.
    #[schema(maximum = 20)]
    pub logprobs: Option<usize>,
    #[serde(default)]
    pub echo: bool,
    /// Text after the completion (insertion): not supported, so a
    /// non-empty one is refused with a 400.
    pub suffix: Option<String>,
    /// Candidates to draw and rank: only 1.
    #[schema(minimum = 1, maximum = 1)]
    pub best_of: Option<u64>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    pub content: String,
    #[serde(default)]
    pub add_special: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    pub tokens: Vec<u32>,
}

/// Parses a JSON body into `T`, or a 400 that says what is wrong.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() { "the body is not valid JSON" } else { "the request does not have the expected fields and types" };
        ApiError::bad_request(format!("{what}: {e}"))
    })
}
