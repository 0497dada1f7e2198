//! OpenAI's request and error shapes, as the gateway reads and writes them. Requests are parsed
//! by hand from the body (not by axum's extractor) so that every mistake gets OpenAI's error
//! body; a completion or chat parameter the gateway does not serve is refused naming it
//! ([`parse_served`]), never ignored. [`ApiError`] is that body
//! on the wire; where a failure of the cluster reaches a client, it is made from the crate's
//! [`Error`] ([`ApiError::cluster`]).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Error;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub code: &'static str,
    pub param: Option<String>,
    /// Seconds after which the refused request may succeed (`Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), code, param: None, retry_after: None }
    }

    pub fn bad_request(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// The cluster cannot serve the request now (no worker, no quorum, a coordinator out of
    /// reach): clients are told to come back in a second, by when an election or a worker's
    /// return has usually happened.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError { retry_after: Some(1), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", message) }
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// The blobs folder failed at `path` (a 500: the request was fine).
    pub fn storage(path: &std::path::Path, e: std::io::Error) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "storage_error", format!("{}: {e}", path.display()))
    }

    /// The cluster below the gateway failed with `e` while doing `what`: a request it finds
    /// invalid is a 400, what does not exist a 404, a refusal a 409, and anything else means it
    /// cannot serve the request now (503).
    pub fn cluster(what: &str, e: Error) -> Self {
        match e {
            Error::Invalid(m) => Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", m),
            Error::NotFound(m) => Self::not_found("not_found", m),
            Error::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m),
            other => Self::unavailable(format!("{what}: {other}")),
        }
    }

    /// Another tenant's model is not found either: its name says nothing.
    pub fn model_not_found(model: &str) -> Self {
        let msg = format!("the model {model:?} does not exist or you do not have access to it");
        ApiError { param: Some("model".into()), ..Self::not_found("model_not_found", msg) }
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message, "type": self.kind(), "param": self.param, "code": self.code,
        }});
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

/// Gives every refusal OpenAI's error body: those axum makes itself (405 with no body, a query
/// string or form it cannot read as plain text, ...) keep their status and headers (`Allow`)
/// and say what was wrong in the body clients parse. gRPC answers are left as they are.
pub async fn error_body(response: Response) -> Response {
    let status = response.status();
    let content_type = response.headers().get(axum::http::header::CONTENT_TYPE).map(|v| v.as_bytes().to_vec());
    let ours = content_type
        .as_deref()
        .is_some_and(|t| t.starts_with(b"application/json") || t.starts_with(b"application/grpc"));
    if !(status.is_client_error() || status.is_server_error()) || ours {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = match text.trim() {
        "" => status.canonical_reason().unwrap_or("refused").to_lowercase(),
        said => said.to_string(),
    };
    let code = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::LENGTH_REQUIRED => "length_required",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "headers_too_large",
        StatusCode::NOT_FOUND => "not_found",
        s if s.is_server_error() => "server_error",
        _ => "invalid_request_error",
    };
    let fresh = ApiError::new(status, code, message).into_response();
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.insert(axum::http::header::CONTENT_TYPE, "application/json".parse().expect("a valid header"));
    Response::from_parts(parts, fresh.into_body())
}

/// A string or a list of strings (`stop`).
#[derive(Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// A completion's `prompt`: a string, token ids, or a list of either (a batch of prompts).
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Prompts {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// One prompt of a completion request.
#[derive(Clone)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

impl Prompts {
    /// The prompts, each one not empty (`param` names the field in an error).
    pub fn to_vec(&self, param: &str) -> Result<Vec<Prompt>, ApiError> {
        let prompts = match self {
            Prompts::Text(s) => vec![Prompt::Text(s.clone())],
            Prompts::Texts(v) => v.iter().cloned().map(Prompt::Text).collect(),
            Prompts::Tokens(ids) => vec![Prompt::Tokens(ids.clone())],
            Prompts::TokenLists(v) => v.iter().cloned().map(Prompt::Tokens).collect(),
        };
        let empty = |p: &Prompt| matches!(p, Prompt::Tokens(ids) if ids.is_empty());
        if prompts.is_empty() || prompts.iter().any(empty) {
            return Err(ApiError::bad_request(
                param,
                format!("give at least one {param}, and no empty list of token ids"),
            ));
        }
        Ok(prompts)
    }
}

/// What completions and chat completions share.
#[derive(Deserialize)]
pub struct Sampling {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    pub n: Option<u32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string) to the bias added to its logit.
    pub logit_bias: Option<std::collections::HashMap<String, f32>>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// The caller's end user, recorded in the request's trace.
    pub user: Option<String>,
}

#[derive(Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompts,
    /// Candidates per prompt, of which the `n` most likely (by mean token log-probability) are
    /// returned.
    pub best_of: Option<u32>,
    /// How many alternatives to return beside each token's log-probability; absent: none.
    pub logprobs: Option<u32>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// The parameters of [`Sampling`], which completions and chat both serve.
pub const SAMPLING_PARAMS: &[&str] = &[
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "stream",
    "stream_options",
    "user",
];

/// The parameters of a completion request the gateway serves, besides [`SAMPLING_PARAMS`].
pub const COMPLETION_PARAMS: &[&str] = &["model", "prompt", "best_of", "logprobs"];

#[derive(Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    /// Chat's newer name for `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    /// Whether to return each token's log-probability.
    pub logprobs: Option<bool>,
    /// And how many alternatives beside it.
    pub top_logprobs: Option<u32>,
    /// Text (the default), any JSON object, or JSON that a schema holds.
    pub response_format: Option<ResponseFormat>,
    /// Functions the model may call.
    pub tools: Option<Vec<ToolSpec>>,
    /// `none`, `auto`, `required`, or `{"type": "function", "function": {"name": ...}}`: read
    /// by the gateway, for errors that say what is wrong.
    pub tool_choice: Option<Value>,
    /// Whether the model may make several calls in one answer (the default).
    pub parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// One of chat's `tools`: a function.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToolSpec {
    Function { function: FunctionSpec },
}

/// A function the model may call; `strict` is read and needs nothing (the arguments always
/// follow `parameters`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    pub name: String,
    pub description: Option<String>,
    /// Its arguments' JSON schema; absent: any object.
    pub parameters: Option<Value>,
    #[serde(default, rename = "strict")]
    _strict: Option<bool>,
}

/// A call an assistant message made, as the client sends it back.
#[derive(Deserialize)]
pub struct MessageToolCall {
    pub id: String,
    pub function: CalledFunction,
}

#[derive(Deserialize)]
pub struct CalledFunction {
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

/// Chat's `response_format`.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchema },
}

/// `response_format.json_schema`: its `name` (checked) and `schema`; `description` and
/// `strict` are read and need nothing (the output always follows the schema exactly).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchema {
    pub name: String,
    #[serde(default, rename = "description")]
    _description: Option<String>,
    /// Absent: any JSON object.
    #[serde(default)]
    pub schema: Option<Value>,
    #[serde(default, rename = "strict")]
    _strict: Option<bool>,
}

/// The parameters of a chat request the gateway serves, besides [`SAMPLING_PARAMS`].
pub const CHAT_PARAMS: &[&str] = &[
    "model",
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];

#[derive(Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: Prompts,
    /// `float` (the default) or `base64` (little-endian f32).
    pub encoding_format: Option<String>,
    /// The caller's end user, recorded in the request's trace.
    pub user: Option<String>,
}

/// The parameters of an embedding request the gateway serves.
pub const EMBEDDING_PARAMS: &[&str] = &["model", "input", "encoding_format", "user"];

/// Whether `value`, given for OpenAI's parameter `key` that the gateway does not serve, asks for
/// nothing: null, or OpenAI's own default (clients send those whatever the server). A key that
/// is no parameter of OpenAI's (a typo) asks for something unknown.
fn asks_nothing(key: &str, value: &Value) -> bool {
    const UNSERVED: &[&str] = &[
        "dimensions",
        "echo",
        "suffix",
        "audio",
        "function_call",
        "functions",
        "metadata",
        "modalities",
        "prediction",
        "reasoning_effort",
        "service_tier",
        "store",
        "web_search_options",
    ];
    UNSERVED.contains(&key)
        && match value {
            Value::Null => true,
            Value::Bool(b) => matches!((key, b), ("echo" | "store", false)),
            Value::String(s) => matches!((key, s.as_str()), ("suffix", "") | ("service_tier", "auto" | "default")),
            Value::Array(a) => key == "modalities" && a.len() == 1 && a[0] == "text",
            _ => false,
        }
}

/// A completion, chat or embedding body whose every key is in one of the lists `served` (or a
/// parameter given at a value that asks for nothing): an unknown or unserved parameter is a
/// 400 naming it.
pub fn parse_served<T: serde::de::DeserializeOwned>(body: &[u8], served: &[&[&str]]) -> Result<T, ApiError> {
    let request: T = parse(body)?;
    // `parse` took it, so it is an object.
    let keys: serde_json::Map<String, Value> = serde_json::from_slice(body).unwrap_or_default();
    let is_served = |key: &str| served.iter().any(|list| list.contains(&key));
    if let Some((key, _)) = keys.iter().find(|(k, v)| !is_served(k) && !asks_nothing(k, v)) {
        return Err(ApiError::bad_request(
            key,
            format!("the parameter {key:?} is not supported here (docs/gateway.md lists those that are)"),
        ));
    }
    Ok(request)
}

#[derive(Deserialize)]
pub struct Message {
    pub role: String,
    /// Absent or null only on an assistant message that called tools.
    pub content: Option<Content>,
    /// An assistant message's calls.
    pub tool_calls: Option<Vec<MessageToolCall>>,
    /// The call a tool message answers.
    pub tool_call_id: Option<String>,
}

/// Message content: a string, or parts of which the text ones count.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: String,
}

impl Content {
    pub fn text(&self) -> Result<String, ApiError> {
        match self {
            Content::Text(s) => Ok(s.clone()),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match p.kind.as_str() {
                    "text" => Ok(p.text.as_str()),
                    other => Err(ApiError::bad_request(
                        "messages",
                        format!("content parts of type {other:?} are not supported"),
                    )),
                })
                .collect(),
        }
    }
}

/// A request body within the route's size limit; past it, a 413 in OpenAI's shape.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state).await.map(Body).map_err(|e| {
            let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE { "request_too_large" } else { "bad_body" };
            ApiError::new(e.status(), code, format!("the request body: {}", e.body_text()))
        })
    }
}

/// Parses a JSON body into `T`, with OpenAI's error for a malformed one.
/// A request body: a JSON object of `T`'s fields (serde would also take a struct from an array
/// of its fields in order, which no client means), each key once.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let invalid = |e: String| ApiError::bad_request("body", format!("the request body is not valid: {e}"));
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(invalid("it must be a JSON object".into()));
    }
    serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))
}
