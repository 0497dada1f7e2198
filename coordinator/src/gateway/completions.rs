//! Completions, chat completions and embeddings. A request runs one sequence per prompt and
//! candidate (`best_of`, else `n`; an embedding, one per input), all on the worker that takes the
//! first; the answer is whole, or streamed as OpenAI's chunks. Parameters are checked before the
//! request is routed, so a malformed request is a 400 whether or not a worker serves its model
//! yet.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tandem_proto::contract::{check_function_name, check_role, fresh_id, unix_now};
use tandem_proto::v1::{ChatMessage, GenerateEvent, GenerateRequest, Tool, ToolCall, ToolChoice, TopLogprobs};
use tokio_stream::StreamExt;
use tracing::Instrument;

use super::openai::{
    ApiError, Body, CHAT_PARAMS, COMPLETION_PARAMS, ChatRequest, CompletionRequest, EMBEDDING_PARAMS, EmbeddingRequest,
    Message, Prompt, ResponseFormat, SAMPLING_PARAMS, Sampling, ToolSpec, parse_served,
};
use super::{Caller, Gateway, Target, history, limits, view};

/// Most sequences (prompts × candidates) one request may run.
const MAX_SEQUENCES: u32 = 64;
/// Most stop strings one request may give (OpenAI's bound).
const MAX_STOPS: usize = 4;
/// Most tools one chat request may give (OpenAI's bound).
const MAX_TOOLS: usize = 128;
/// Most alternatives per token (OpenAI's bound, and the engine's).
const MAX_TOP_LOGPROBS: u32 = 20;
/// Tokens a completion generates when `max_tokens` is not given (OpenAI's default); chat
/// generates until the context is full.
const COMPLETION_MAX_TOKENS: u32 = 16;
/// How long a worker may stay silent, before a request's first event (its queue wait and
/// prefill) and between events; past it the worker is taken for failed.
const WORKER_SILENCE: Duration = Duration::from_secs(120);

/// What a request runs, and how its answer is shaped.
struct Shape {
    kind: Kind,
    /// Prompts (chat: one).
    prompts: u32,
    /// Choices returned per prompt.
    n: u32,
    /// Sequences run per prompt (`best_of`, at least `n`): the `n` most likely are returned.
    candidates: u32,
    /// Whether the answer shows each token's log-probability, and with how many alternatives.
    logprobs: Option<u32>,
    stream: bool,
    include_usage: bool,
}

impl Shape {
    fn new(kind: Kind, prompts: usize, s: &Sampling, best_of: Option<u32>, logprobs: Option<u32>) -> Self {
        let n = s.n.unwrap_or(1);
        Shape {
            kind,
            prompts: u32::try_from(prompts).unwrap_or(u32::MAX),
            n,
            candidates: best_of.unwrap_or(n),
            logprobs,
            stream: s.stream,
            include_usage: s.stream_options.as_ref().is_some_and(|o| o.include_usage),
        }
    }

    fn sequences(&self) -> u32 {
        self.prompts.saturating_mul(self.candidates)
    }

    /// Checks the shape and what completions and chat share.
    fn check(&self, s: &Sampling) -> Result<(), ApiError> {
        if self.n == 0 {
            return Err(ApiError::bad_request("n", "n must be at least 1"));
        }
        if self.candidates < self.n {
            return Err(ApiError::bad_request("best_of", "best_of must be at least n"));
        }
        if self.stream && self.candidates > self.n {
            return Err(ApiError::bad_request(
                "best_of",
                "best_of above n cannot be streamed: the best are known last",
            ));
        }
        if self.sequences() > MAX_SEQUENCES {
            let param = if self.prompts > 1 { "prompt" } else { "n" };
            let msg = format!("a request runs at most {MAX_SEQUENCES} sequences: prompts × best_of (or n)");
            return Err(ApiError::bad_request(param, msg));
        }
        if self.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            let param = if matches!(self.kind, Kind::Chat) { "top_logprobs" } else { "logprobs" };
            return Err(ApiError::bad_request(param, format!("at most {MAX_TOP_LOGPROBS} alternatives per token")));
        }
        if s.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
            return Err(ApiError::bad_request("temperature", "temperature must be between 0 and 2"));
        }
        if s.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return Err(ApiError::bad_request("top_p", "top_p must be above 0 and at most 1"));
        }
        for (param, penalty) in [("presence_penalty", s.presence_penalty), ("frequency_penalty", s.frequency_penalty)] {
            if penalty.is_some_and(|p| !(-2.0..=2.0).contains(&p)) {
                return Err(ApiError::bad_request(param, format!("{param} must be between -2 and 2")));
            }
        }
        let stops = s.stop.as_ref().map(|st| st.to_vec()).unwrap_or_default();
        if stops.len() > MAX_STOPS || stops.iter().any(String::is_empty) {
            return Err(ApiError::bad_request("stop", format!("give at most {MAX_STOPS} stop strings, none empty")));
        }
        logit_bias(s).map(drop)
    }
}

/// `logit_bias` as token ids to biases, each in [-100, 100].
fn logit_bias(s: &Sampling) -> Result<HashMap<u32, f32>, ApiError> {
    let bad = |token: &str| {
        ApiError::bad_request("logit_bias", format!("{token:?}: give token ids, each with a bias from -100 to 100"))
    };
    (s.logit_bias.iter().flatten())
        .map(|(token, &bias)| match token.parse::<u32>() {
            Ok(id) if (-100.0..=100.0).contains(&bias) => Ok((id, bias)),
            _ => Err(bad(token)),
        })
        .collect()
}

/// The worker request every sequence of a request starts from (its parameters checked).
fn template(s: &Sampling, shape: &Shape, max_tokens: Option<u32>) -> Result<GenerateRequest, ApiError> {
    if max_tokens == Some(0) {
        return Err(ApiError::bad_request("max_tokens", "max_tokens must be at least 1"));
    }
    Ok(GenerateRequest {
        max_tokens,
        temperature: s.temperature.unwrap_or(1.0),
        top_p: s.top_p.unwrap_or(1.0),
        stop: s.stop.as_ref().map(|st| st.to_vec()).unwrap_or_default(),
        // best_of keeps the candidates of highest log-probability.
        logprobs: shape.logprobs.is_some() || shape.candidates > shape.n,
        top_logprobs: shape.logprobs.unwrap_or(0),
        presence_penalty: s.presence_penalty.unwrap_or(0.0),
        frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
        logit_bias: logit_bias(s)?,
        ..GenerateRequest::default()
    })
}

/// Sequence `candidate` of a prompt for `target`, from `template`: the candidates of a seeded
/// request differ, and repeat with the seed.
fn sequence(template: &GenerateRequest, seed: Option<u64>, target: &Target, candidate: u32) -> GenerateRequest {
    let (adapter, adapter_uri) = target.adapter.clone().unwrap_or_default();
    GenerateRequest {
        adapter,
        adapter_uri,
        seed: seed.map(|s| s.wrapping_add(u64::from(candidate))),
        ..template.clone()
    }
}

pub(super) async fn completions(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_served(&body, &[COMPLETION_PARAMS, SAMPLING_PARAMS])?;
    let prompts = req.prompt.to_vec("prompt")?;
    let s = &req.sampling;
    let shape = Shape::new(Kind::Completion, prompts.len(), s, req.best_of, req.logprobs);
    shape.check(s)?;
    let template = template(s, &shape, Some(s.max_tokens.unwrap_or(COMPLETION_MAX_TOKENS)))?;
    let make = |t: &Target, i: u32| {
        with_prompt(sequence(&template, s.seed, t, i % shape.candidates), &prompts[(i / shape.candidates) as usize])
    };
    gw.respond(&shape, &caller, &req.model, s.user.as_deref(), make).await
}

/// `req` for `prompt` (text or token ids).
fn with_prompt(mut req: GenerateRequest, prompt: &Prompt) -> GenerateRequest {
    match prompt {
        Prompt::Text(text) => req.prompt = text.clone(),
        Prompt::Tokens(ids) => req.prompt_token_ids = ids.clone(),
    }
    req
}

/// Each input's embedding: the mean of its last hidden states (after the final norm) through
/// the model it names, scaled to length 1, computed in the engine's batches.
pub(super) async fn embeddings(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let req: EmbeddingRequest = parse_served(&body, &[EMBEDDING_PARAMS])?;
    let inputs = req.input.to_vec("input")?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            let msg = format!("encoding_format {other:?}: float or base64");
            return Err(ApiError::bad_request("encoding_format", msg));
        }
    };
    let shape = Shape {
        kind: Kind::Embedding { base64 },
        prompts: u32::try_from(inputs.len()).unwrap_or(u32::MAX),
        n: 1,
        candidates: 1,
        logprobs: None,
        stream: false,
        include_usage: false,
    };
    if shape.sequences() > MAX_SEQUENCES {
        return Err(ApiError::bad_request("input", format!("at most {MAX_SEQUENCES} inputs a request")));
    }
    let make = |t: &Target, i: u32| {
        let embed = GenerateRequest { embed: true, ..sequence(&GenerateRequest::default(), None, t, 0) };
        with_prompt(embed, &inputs[i as usize])
    };
    gw.respond(&shape, &caller, &req.model, req.user.as_deref(), make).await
}

pub(super) async fn chat_completions(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_served(&body, &[CHAT_PARAMS, SAMPLING_PARAMS])?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages", "messages must not be empty"));
    }
    let messages = req.messages.iter().map(chat_message).collect::<Result<Vec<_>, ApiError>>()?;
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (true, top) => Some(top.unwrap_or(0)),
        (false, None | Some(0)) => None,
        (false, Some(_)) => return Err(ApiError::bad_request("top_logprobs", "top_logprobs needs logprobs: true")),
    };
    let s = &req.sampling;
    let shape = Shape::new(Kind::Chat, 1, s, None, logprobs);
    shape.check(s)?;
    // Without a bound, the answer may take the rest of the context.
    let mut template = template(s, &shape, req.max_completion_tokens.or(s.max_tokens))?;
    template.json_schema = match &req.response_format {
        None | Some(ResponseFormat::Text) => String::new(),
        Some(ResponseFormat::JsonObject) => json!({"type": "object"}).to_string(),
        Some(ResponseFormat::JsonSchema { json_schema }) => match &json_schema.schema {
            _ if let Err(e) = check_function_name("json_schema.name", &json_schema.name) => {
                return Err(ApiError::bad_request("response_format", e.0));
            }
            Some(schema @ Value::Object(_)) => schema.to_string(),
            Some(_) => return Err(ApiError::bad_request("response_format", "json_schema.schema must be an object")),
            None => json!({"type": "object"}).to_string(),
        },
    };
    (template.tools, template.tool_choice, template.tool_function) = tool_calling(&req)?;
    template.single_tool_call = req.parallel_tool_calls == Some(false);
    let make = |t: &Target, i: u32| GenerateRequest { messages: messages.clone(), ..sequence(&template, s.seed, t, i) };
    gw.respond(&shape, &caller, &req.model, s.user.as_deref(), make).await
}

/// A chat message as workers take it, held to OpenAI's rules for what each role carries.
fn chat_message(m: &Message) -> Result<ChatMessage, ApiError> {
    let bad = |msg: &str| ApiError::bad_request("messages", msg);
    check_role(&m.role).map_err(|e| bad(&e.0))?;
    let calls = m.tool_calls.as_deref().unwrap_or_default();
    if !calls.is_empty() && m.role != "assistant" {
        return Err(bad("only assistant messages have tool_calls"));
    }
    let content = match &m.content {
        Some(content) => content.text()?,
        None if !calls.is_empty() => String::new(),
        None => return Err(bad("a message needs content (only an assistant message that calls tools may omit it)")),
    };
    let tool_call_id = match (m.role.as_str(), &m.tool_call_id) {
        ("tool", Some(id)) => id.clone(),
        ("tool", None) => return Err(bad("a tool message needs the tool_call_id of the call it answers")),
        (_, Some(_)) => return Err(bad("only tool messages have a tool_call_id")),
        (_, None) => String::new(),
    };
    let tool_calls = (calls.iter())
        .map(|c| ToolCall { id: c.id.clone(), name: c.function.name.clone(), arguments: c.function.arguments.clone() })
        .collect();
    Ok(ChatMessage { role: m.role.clone(), content, tool_calls, tool_call_id })
}

/// A chat request's tools, whether it must call them, and which (for a named choice): OpenAI's
/// rules, checked before routing (the worker checks them again).
fn tool_calling(req: &ChatRequest) -> Result<(Vec<Tool>, i32, String), ApiError> {
    let specs = req.tools.as_deref().unwrap_or_default();
    if req.tools.is_some() && !(1..=MAX_TOOLS).contains(&specs.len()) {
        let msg = format!("give 1 to {MAX_TOOLS} tools (or none: leave tools out)");
        return Err(ApiError::bad_request("tools", msg));
    }
    let mut tools: Vec<Tool> = Vec::with_capacity(specs.len());
    for ToolSpec::Function { function: f } in specs {
        check_function_name("function", &f.name).map_err(|e| ApiError::bad_request("tools", e.0))?;
        if tools.iter().any(|t| t.name == f.name) {
            return Err(ApiError::bad_request("tools", format!("function {:?} is given twice", f.name)));
        }
        let parameters = match &f.parameters {
            None => String::new(),
            Some(schema @ Value::Object(_)) => schema.to_string(),
            Some(_) => {
                let msg = format!("function {:?}: parameters must be a JSON schema object", f.name);
                return Err(ApiError::bad_request("tools", msg));
            }
        };
        let description = f.description.clone().unwrap_or_default();
        tools.push(Tool { name: f.name.clone(), description, parameters });
    }
    let bad_choice = || {
        let msg = r#"tool_choice: "none", "auto", "required", or {"type": "function", "function": {"name": ...}}"#;
        ApiError::bad_request("tool_choice", msg)
    };
    let (choice, function) = match &req.tool_choice {
        None | Some(Value::Null) => (ToolChoice::Auto, String::new()),
        Some(Value::String(mode)) => match mode.as_str() {
            "none" => (ToolChoice::None, String::new()),
            "auto" => (ToolChoice::Auto, String::new()),
            "required" => (ToolChoice::Required, String::new()),
            _ => return Err(bad_choice()),
        },
        Some(Value::Object(named)) => match (named.get("type"), named.get("function").and_then(|f| f.get("name"))) {
            (Some(kind), Some(Value::String(name))) if kind == "function" && named.len() == 2 => {
                (ToolChoice::Function, name.clone())
            }
            _ => return Err(bad_choice()),
        },
        Some(_) => return Err(bad_choice()),
    };
    if tools.is_empty() && matches!(choice, ToolChoice::Required | ToolChoice::Function) {
        return Err(ApiError::bad_request("tool_choice", "tool_choice needs tools to call"));
    }
    if choice == ToolChoice::Function && !tools.iter().any(|t| t.name == function) {
        let msg = format!("tool_choice names {function:?}, which is not among the tools");
        return Err(ApiError::bad_request("tool_choice", msg));
    }
    let json_answer =
        matches!(req.response_format, Some(ResponseFormat::JsonObject | ResponseFormat::JsonSchema { .. }));
    if json_answer && !tools.is_empty() && choice != ToolChoice::None {
        let msg = "give response_format or tools to call, not both (unless tool_choice is none)";
        return Err(ApiError::bad_request("response_format", msg));
    }
    Ok((tools, choice as i32, function))
}

impl Gateway {
    /// Resolves `model` for the caller, runs the request's sequences on the first worker that
    /// answers, and responds whole or as a stream of chunks; counts the request, whatever its
    /// outcome. `user` (the caller's end user) goes in the request's trace.
    async fn respond(
        &self,
        shape: &Shape,
        caller: &Caller,
        model: &str,
        user: Option<&str>,
        make: impl Fn(&Target, u32) -> GenerateRequest,
    ) -> Result<Response, ApiError> {
        let arrived = Instant::now();
        let mut routed = None;
        let result = async {
            let route = tracing::info_span!("route", user = user.unwrap_or_default());
            let (target, workers) = self.route(caller, model).instrument(route).await?;
            let answer = self.run(shape, model, arrived, &target, &workers, |i| make(&target, i)).await;
            routed = Some(target);
            answer
        }
        .await;
        let status = result.as_ref().map_or_else(|e| e.status, |_| StatusCode::OK);
        let adapter = (routed.as_ref().and_then(|t| t.adapter.as_ref()))
            .map(|(version, _)| version.split_once('@').map_or(version.as_str(), |(name, _)| name));
        self.metrics.request(&caller.tenant, routed.as_ref().map(|t| t.base.as_str()), adapter, status);
        if let Err(e) = &result
            && status.is_server_error()
        {
            let (tenant, status, message) = (caller.tenant.clone(), status.as_u16(), e.message.clone());
            let model = model.to_string();
            let event = history::ErrorEvent { at: unix_now(), tenant, model, status, message, count: 1 };
            self.history.error(event);
        }
        result
    }

    /// [`start`] on `workers` (the view's); when none of them could take it, once more on those a
    /// linearizable read names and the view did not: the view may be [`view::REFRESH`] behind a
    /// worker just drained and stopped, or another just back in service.
    async fn start_routed(
        &self,
        target: &Target,
        workers: &[String],
        req: GenerateRequest,
    ) -> Result<(Events, String), ApiError> {
        match start(&self.view, workers, req.clone()).await {
            Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => {
                let fresh = self.workers_for(&*self.state().await?, target).unwrap_or_default();
                let untried: Vec<String> = fresh.into_iter().filter(|w| !workers.contains(w)).collect();
                if untried.is_empty() {
                    return Err(e);
                }
                start(&self.view, &untried, req).await
            }
            answer => answer,
        }
    }

    async fn run(
        &self,
        shape: &Shape,
        model: &str,
        arrived: Instant,
        target: &Target,
        workers: &[String],
        make: impl Fn(u32) -> GenerateRequest,
    ) -> Result<Response, ApiError> {
        let limits = self.view.state().limits.get(&target.tenant).cloned().unwrap_or_default();
        let permit = self.limiter.admit(&target.tenant, &limits)?;
        let charge = Charge { permit, limits, limiter: self.limiter.clone() };
        // Every sequence's stream gives its first event before anything is answered, so a
        // refused request is an error status, not a broken stream, and a worker that fails first
        // is replaced by the next. The first sequence finds a worker; the others go there at
        // once (its adapter is resident there now).
        let (first, worker) = self.start_routed(target, workers, make(0)).await?;
        let mut workers = workers.to_vec();
        if let Some(at) = workers.iter().position(|w| *w == worker) {
            workers.rotate_left(at);
        }
        let others =
            futures_util::future::try_join_all((1..shape.sequences()).map(|i| start(&self.view, &workers, make(i))));
        let streams: Vec<Events> =
            std::iter::once(first).chain(others.await?.into_iter().map(|(stream, _)| stream)).collect();
        // Every sequence has given its first token.
        let first_token = arrived.elapsed();
        if let (Some((key, _)), Ok(mut affinity)) = (&target.adapter, self.affinity.lock()) {
            affinity.insert(key.clone(), worker);
        }
        let id = fresh_id(shape.kind.id_prefix());
        let sequences = shape.sequences();
        let metrics = self.metrics.clone();
        let (tenant, base) = (target.tenant.clone(), target.base.clone());
        let count = move |prompt, completion| {
            metrics.tokens(&tenant, &base, prompt, completion);
            metrics.latency(&base, arrived, first_token, completion / sequences);
            charge.tokens(&tenant, prompt + completion);
        };
        let head = Head { kind: shape.kind, id, model: model.to_string(), created: unix_now() };
        if shape.stream {
            return Ok(stream_chunks(head, shape, streams, count));
        }
        let mut outcomes = Vec::new();
        for stream in streams {
            outcomes.push(collect(stream).await?);
        }
        if let Kind::Embedding { base64 } = shape.kind {
            let prompt_tokens = outcomes.iter().map(|o| o.prompt_tokens).sum();
            count(prompt_tokens, 0);
            let data: Vec<Value> = (outcomes.iter().enumerate())
                .map(|(i, o)| json!({"object": "embedding", "index": i, "embedding": embedding(&o.embedding, base64)}))
                .collect();
            let usage = json!({"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens});
            return Ok(
                axum::Json(json!({"object": "list", "data": data, "model": model, "usage": usage})).into_response()
            );
        }
        let (choices, prompt_tokens, completion_tokens) = best_choices(shape, outcomes);
        count(prompt_tokens, completion_tokens);
        Ok(axum::Json(head.body(choices, usage(prompt_tokens, completion_tokens), false)).into_response())
    }
}

/// The choices of a whole answer, in order (prompt by prompt, `n` each: the most likely of its
/// candidates), and the tokens used: each prompt's once, every candidate's completion.
fn best_choices(shape: &Shape, outcomes: Vec<Outcome>) -> (Vec<Value>, u32, u32) {
    let (mut choices, mut prompt_tokens, mut completion_tokens) = (Vec::new(), 0, 0);
    for candidates in outcomes.chunks(shape.candidates as usize) {
        prompt_tokens += candidates.first().map_or(0, |c| c.prompt_tokens);
        completion_tokens += candidates.iter().map(|c| c.completion_tokens).sum::<u32>();
        let mut ranked: Vec<&Outcome> = candidates.iter().collect();
        if shape.candidates > shape.n {
            ranked.sort_by(|a, b| b.mean_logprob().total_cmp(&a.mean_logprob()));
        }
        for c in ranked.into_iter().take(shape.n as usize) {
            let logprobs = match shape.logprobs {
                Some(_) => shape.kind.logprobs(&c.tokens, &c.logprobs, &c.top_logprobs, 0),
                None => Value::Null,
            };
            let index = choices.len();
            let calls = tool_calls(&c.tool_calls, index, 0, false);
            choices.push(shape.kind.choice(index, &c.text, calls, logprobs, Some(&c.finish_reason), None));
        }
    }
    (choices, prompt_tokens, completion_tokens)
}

fn status_to_error(s: tonic::Status) -> ApiError {
    match s.code() {
        tonic::Code::InvalidArgument => ApiError::bad_request("body", s.message()),
        // A full queue drains in about a second at the rates a worker serves.
        tonic::Code::ResourceExhausted => {
            ApiError { retry_after: Some(1), ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", s.message()) }
        }
        _ => ApiError::unavailable(format!("the worker failed: {}", s.message())),
    }
}

/// A worker's events for one sequence.
type Events = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<GenerateEvent, tonic::Status>> + Send>>;

/// Opens a stream for `req` on the first of `workers` that gives its first event: a worker
/// that cannot be reached or fails before anything was sent is left for the next. A refusal
/// (bad request, full queue) is final. Returns the stream and the worker.
async fn start(view: &view::View, workers: &[String], req: GenerateRequest) -> Result<(Events, String), ApiError> {
    let mut last = None;
    for worker in workers {
        let attempt = async {
            let mut client = view.worker(worker)?;
            let mut stream = client.generate(req.clone()).await?.into_inner();
            let first = stream.message().await?;
            Ok::<_, tonic::Status>((first, stream))
        };
        let attempt = attempt.instrument(tracing::info_span!("worker", worker = %worker));
        let name = worker.clone();
        let silent =
            move || tonic::Status::deadline_exceeded(format!("worker {name} was silent for {WORKER_SILENCE:?}"));
        match tokio::time::timeout(WORKER_SILENCE, attempt).await.unwrap_or_else(|_| Err(silent())) {
            Ok((first, rest)) => {
                let rest = rest.timeout(WORKER_SILENCE).map(move |event| event.unwrap_or_else(|_| Err(silent())));
                let events: Events = Box::pin(tokio_stream::iter(first.map(Ok)).chain(rest));
                return Ok((events, worker.clone()));
            }
            Err(s) if matches!(s.code(), tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted) => {
                return Err(status_to_error(s));
            }
            Err(s) => last = Some(s),
        }
    }
    Err(last.map_or_else(|| ApiError::unavailable("no worker to send it to"), status_to_error))
}

/// An embedding as OpenAI writes it: numbers, or base64 of their little-endian f32 bytes.
fn embedding(values: &[f32], base64: bool) -> Value {
    use base64::Engine as _;
    match base64 {
        false => json!(values),
        true => {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            json!(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}

/// One sequence, whole.
#[derive(Default)]
struct Outcome {
    text: String,
    finish_reason: String,
    prompt_tokens: u32,
    completion_tokens: u32,
    /// Each token's text and log-probability, and the alternatives, when asked for.
    tokens: Vec<String>,
    logprobs: Vec<f32>,
    top_logprobs: Vec<TopLogprobs>,
    /// An embedding request's embedding.
    embedding: Vec<f32>,
    /// The calls of tools it made.
    tool_calls: Vec<ToolCall>,
}

impl Outcome {
    /// Its mean token log-probability: how `best_of` ranks candidates (OpenAI's rule).
    fn mean_logprob(&self) -> f32 {
        self.logprobs.iter().sum::<f32>() / self.logprobs.len().max(1) as f32
    }
}

async fn collect(mut stream: Events) -> Result<Outcome, ApiError> {
    let mut outcome = Outcome::default();
    while let Some(e) = stream.next().await.transpose().map_err(status_to_error)? {
        outcome.text.push_str(&e.text);
        outcome.tokens.extend(e.tokens);
        outcome.logprobs.extend(e.logprobs);
        outcome.top_logprobs.extend(e.top_logprobs);
        outcome.embedding.extend(e.embedding);
        outcome.tool_calls.extend(e.tool_calls);
        if !e.finish_reason.is_empty() {
            outcome.finish_reason = e.finish_reason;
            outcome.prompt_tokens = e.prompt_tokens;
            outcome.completion_tokens = e.completion_tokens;
        }
    }
    Ok(outcome)
}

/// What differs between the endpoints' responses.
#[derive(Clone, Copy)]
enum Kind {
    Completion,
    Chat,
    /// Embeddings (as base64 or numbers): whole answers only, with no choices.
    Embedding {
        base64: bool,
    },
}

impl Kind {
    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
            Kind::Embedding { .. } => "embd",
        }
    }

    /// OpenAI's `logprobs` of a choice (or chunk) whose tokens are `tokens`, the first at byte
    /// `offset` of the completion, with the alternatives at each (`top`, empty when none were
    /// asked for).
    fn logprobs(self, tokens: &[String], logprobs: &[f32], top: &[TopLogprobs], offset: usize) -> Value {
        match self {
            Kind::Embedding { .. } => Value::Null,
            Kind::Completion => {
                let offsets: Vec<usize> =
                    tokens.iter().scan(offset, |at, t| Some(std::mem::replace(at, *at + t.len()))).collect();
                let top: Option<Vec<HashMap<&String, f32>>> = (!top.is_empty())
                    .then(|| top.iter().map(|t| t.tokens.iter().zip(t.logprobs.iter().copied()).collect()).collect());
                json!({"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets})
            }
            Kind::Chat => {
                let entry = |t: &String, lp: f32| json!({"token": t, "logprob": lp, "bytes": t.as_bytes()});
                let content: Vec<Value> = (tokens.iter().zip(logprobs).enumerate())
                    .map(|(i, (t, &lp))| {
                        let alternatives: Vec<Value> = (top.get(i).into_iter())
                            .flat_map(|a| a.tokens.iter().zip(a.logprobs.iter().copied()))
                            .map(|(t, lp)| entry(t, lp))
                            .collect();
                        let mut e = entry(t, lp);
                        e["top_logprobs"] = json!(alternatives);
                        e
                    })
                    .collect();
                json!({"content": content, "refusal": null})
            }
        }
    }

    /// Choice `index` holding `text` and (chat) `calls` of tools ([`tool_calls`]): whole, or a
    /// streamed chunk's delta (`Some(first)`: whether it is the choice's first chunk, which
    /// names the role). A chat answer made only of calls has no content (null).
    fn choice(
        self,
        index: usize,
        text: &str,
        calls: Vec<Value>,
        logprobs: Value,
        finish: Option<&str>,
        chunk: Option<bool>,
    ) -> Value {
        let content = match text.is_empty() && !calls.is_empty() {
            true => Value::Null,
            false => json!(text),
        };
        match (self, chunk) {
            // (An embedding's answer has no choices.)
            (Kind::Completion | Kind::Embedding { .. }, _) => {
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
            }
            (Kind::Chat, chunk) => {
                let mut message = json!({"content": content});
                if !calls.is_empty() {
                    message["tool_calls"] = json!(calls);
                }
                if chunk.is_none_or(|first| first) {
                    message["role"] = json!("assistant");
                }
                let key = if chunk.is_some() { "delta" } else { "message" };
                json!({"index": index, key: message, "logprobs": logprobs, "finish_reason": finish})
            }
        }
    }

    /// The `object` of a whole response or of a streamed chunk.
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Kind::Embedding { .. }, _) => "list",
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }
}

/// `calls` of choice `choice` in OpenAI's shape, named by the gateway; in a streamed chunk
/// (`delta`) each with its place among the choice's calls, the first at `first`.
fn tool_calls(calls: &[ToolCall], choice: usize, first: usize, delta: bool) -> Vec<Value> {
    // Most streamed events carry no call: no id is made for them.
    if calls.is_empty() {
        return Vec::new();
    }
    let id = fresh_id("call");
    (calls.iter().enumerate())
        .map(|(k, c)| {
            let mut call = json!({
                "id": format!("{id}-{choice}-{}", first + k), "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            });
            if delta {
                call["index"] = json!(first + k);
            }
            call
        })
        .collect()
}

/// What every body of one answer (whole, or each chunk) begins with.
struct Head {
    kind: Kind,
    id: String,
    /// The model as the caller named it.
    model: String,
    created: u64,
}

impl Head {
    fn body(&self, choices: Vec<Value>, usage: Value, chunk: bool) -> Value {
        json!({
            "id": self.id, "object": self.kind.object(chunk), "created": self.created, "model": self.model,
            "choices": choices, "usage": usage,
        })
    }
}

fn usage(prompt_tokens: u32, completion_tokens: u32) -> Value {
    json!({
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// An admitted request's place under its tenant's limits, held until the answer (or stream)
/// ends, and what it used charged to the tenant then.
struct Charge {
    permit: limits::Permit,
    limits: tandem_proto::contract::TenantLimits,
    limiter: Arc<limits::Limiter>,
}

impl Charge {
    fn tokens(self, tenant: &str, tokens: u32) {
        self.limiter.charge(tenant, &self.limits, u64::from(tokens));
        drop(self.permit);
    }
}

/// The sequences' events as OpenAI's chunks (sequence i is choice i: a streamed request has no
/// more candidates than choices), then the usage when asked for, then `[DONE]`; `count` gets
/// the tokens used once the streams end.
fn stream_chunks(
    head: Head,
    shape: &Shape,
    streams: Vec<Events>,
    count: impl FnOnce(u32, u32) + Send + 'static,
) -> Response {
    let (kind, n, logprobs, include_usage) =
        (shape.kind, shape.n as usize, shape.logprobs.is_some(), shape.include_usage);
    let mut merged = tokio_stream::StreamMap::from_iter(streams.into_iter().enumerate());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let chunk =
        move |choices: Vec<Value>, usage: Value| Event::default().data(head.body(choices, usage, true).to_string());
    // Relaying goes on after the handler returns: in a span of its own, in the request's trace.
    let relay = async move {
        let mut started = std::collections::HashSet::new();
        // Bytes of text each choice has sent (completions' `text_offset`), and calls.
        let mut offsets = HashMap::new();
        let mut calls_sent: HashMap<usize, usize> = HashMap::new();
        let (mut prompt_tokens, mut completion_tokens) = (0u32, 0u32);
        while let Some((i, event)) = merged.next().await {
            let e = match event {
                Ok(e) => e,
                Err(s) => {
                    let error =
                        json!({"error": {"message": s.message(), "type": "server_error", "code": "worker_failed"}});
                    let _ = tx.send(Event::default().data(error.to_string()));
                    break;
                }
            };
            let finish = (!e.finish_reason.is_empty()).then_some(e.finish_reason.as_str());
            if finish.is_some() {
                // Each prompt's tokens once: those of its first choice.
                prompt_tokens += if i % n == 0 { e.prompt_tokens } else { 0 };
                completion_tokens += e.completion_tokens;
            }
            let offset = offsets.entry(i).or_insert(0usize);
            let shown = match logprobs {
                true => kind.logprobs(&e.tokens, &e.logprobs, &e.top_logprobs, *offset),
                false => Value::Null,
            };
            *offset += e.tokens.iter().map(String::len).sum::<usize>();
            let sent = calls_sent.entry(i).or_insert(0);
            let calls = tool_calls(&e.tool_calls, i, *sent, true);
            *sent += calls.len();
            let choice = kind.choice(i, &e.text, calls, shown, finish, Some(started.insert(i)));
            if tx.send(chunk(vec![choice], Value::Null)).is_err() {
                return; // the client went away
            }
        }
        count(prompt_tokens, completion_tokens);
        if include_usage {
            let _ = tx.send(chunk(Vec::new(), usage(prompt_tokens, completion_tokens)));
        }
        let _ = tx.send(Event::default().data("[DONE]"));
    };
    tokio::spawn(relay.instrument(tracing::info_span!("stream")));
    Sse::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(Ok::<_, Infallible>)).into_response()
}
