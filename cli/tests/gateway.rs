//! The HTTP gateway over a coordinator and a worker process: OpenAI's completions and chat
//! completions, whole and streamed (SSE), answer what `tandem generate` answers; keys are
//! checked; bad requests get OpenAI's error body with the right status.

#![allow(clippy::unwrap_used)] // tests unwrap by design

mod common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tandem_proto::contract::{Command, Reply, sha256_hex};
use tandem_testkit::{MiniCluster, http};

use common::TANDEM;

const KEY: &str = "sk-test-admin";

fn post(addr: &str, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = http::http(addr, "POST", path, Some(KEY), Some(&body.to_string()));
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The `data:` payloads of an SSE body.
fn sse(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

#[test]
fn the_gateway_serves_openai_completions_from_a_worker() {
    let cluster = MiniCluster::builder(TANDEM, "gateway").gateway(KEY).start();
    let http_addr = cluster.http();

    cluster.register_model("tiny");
    let deadline = Instant::now() + Duration::from_secs(30);
    // Health needs no key; it reports the worker once registered.
    loop {
        let (status, body) = http::http(http_addr, "GET", "/health", None, None);
        if status == 200 && serde_json::from_str::<Value>(&body).unwrap()["workers_alive"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the worker never registered: {status} {body}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Keys.
    let (status, body) = http::http(http_addr, "GET", "/v1/models", None, None);
    assert_eq!(status, 401, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["type"], "authentication_error");
    assert_eq!(http::http(http_addr, "GET", "/v1/models", Some("sk-wrong"), None).0, 401);
    let (status, body) = http::http(http_addr, "GET", "/v1/models", Some(KEY), None);
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["data"][0]["id"], "tiny");
    let (status, body) = http::http(http_addr, "GET", "/v1/models/tiny", Some(KEY), None);
    let model: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((status, &model["id"], &model["owned_by"]), (200, &json!("tiny"), &json!("tandem")), "{body}");
    let (status, body) = http::http(http_addr, "GET", "/v1/models/no-such-model", Some(KEY), None);
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).unwrap()["error"]["code"].clone()),
        (404, json!("model_not_found"))
    );

    // A greedy completion equals `tandem generate`'s.
    let req = json!({"model": "tiny", "prompt": "The cat sat on the", "max_tokens": 12, "temperature": 0});
    let (status, out) = post(http_addr, "/v1/completions", req);
    assert_eq!(status, 200, "{out}");
    let want = TANDEM.generate_greedy(&cluster.model, "The cat sat on the", 12);
    assert_eq!(out["choices"][0]["text"], want["text"]);
    assert_eq!(out["object"], "text_completion");
    assert_eq!(out["usage"]["completion_tokens"], 12);
    assert_eq!(out["usage"]["prompt_tokens"], want["prompt_tokens"]);

    // A key made behind this gateway's back (straight through the cluster API, so the
    // gateway's view has not seen it) is accepted at once: a key the view lacks is looked up
    // again before it is refused; a key that does not exist still is.
    let key = "sk-made-elsewhere";
    let command =
        Command::CreateApiKey { tenant: "carol".into(), key_sha256: sha256_hex(key.as_bytes()), expires_at: None };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reply = rt.block_on(cluster.client().propose("test-key", command)).unwrap();
    assert_eq!(reply, Reply::Done);
    let body = json!({"model": "tiny", "prompt": "Hi", "max_tokens": 1}).to_string();
    let (status, text) = http::http(http_addr, "POST", "/v1/completions", Some(key), Some(&body));
    assert_eq!(status, 200, "{text}");
    assert_eq!(http::http(http_addr, "POST", "/v1/completions", Some("sk-never-made"), Some(&body)).0, 401);
    assert_eq!(out["choices"][0]["finish_reason"], "length");
    assert_eq!(out["choices"][0]["logprobs"], Value::Null, "not asked for");

    // With logprobs: each sampled token's text and log-probability, as the engine computed them.
    let req =
        json!({"model": "tiny", "prompt": "The cat sat on the", "max_tokens": 12, "temperature": 0, "logprobs": 0});
    let (status, out) = post(http_addr, "/v1/completions", req);
    assert_eq!(status, 200, "{out}");
    let logprobs = &out["choices"][0]["logprobs"];
    let got: Vec<f64> = logprobs["token_logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let want_lp: Vec<f64> = want["logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(got.len(), 12);
    assert!(got.iter().zip(&want_lp).all(|(a, b)| (a - b).abs() < 1e-4), "{got:?} vs {want_lp:?}");
    assert_eq!(logprobs["tokens"].as_array().unwrap().len(), 12);
    assert_eq!(logprobs["text_offset"][0], 0);
    let chat =
        json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logprobs": true});
    let (status, out) = post(http_addr, "/v1/chat/completions", chat);
    assert_eq!(status, 200, "{out}");
    let content = out["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(Some(content.len() as u64), out["usage"]["completion_tokens"].as_u64(), "{out}");
    assert!(content.iter().all(|t| t["logprob"].as_f64().unwrap() <= 0.0 && t["token"].is_string()), "{out}");

    // A chat completion, whole and streamed: the same text; the stream ends with the usage and
    // [DONE].
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 10, "temperature": 0});
    let (status, whole) = post(http_addr, "/v1/chat/completions", chat.clone());
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, body) = http::http(http_addr, "POST", "/v1/chat/completions", Some(KEY), Some(&streamed.to_string()));
    assert_eq!(status, 200, "{body}");
    let events = sse(&body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.len() > 2, "{body}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(chunks.last().unwrap()["usage"], whole["usage"]);

    // n seeded choices.
    let req = json!({"model": "tiny", "prompt": "Hi", "max_tokens": 4, "n": 2, "seed": 3});
    let (status, out) = post(http_addr, "/v1/completions", req);
    assert_eq!((status, out["choices"].as_array().unwrap().len()), (200, 2), "{out}");
    assert_eq!(out["usage"]["completion_tokens"], 8);

    // Bad requests: the right status and OpenAI's error body; the gateway goes on serving.
    let cases = [
        (json!({"model": "nope", "prompt": "Hi"}), 404, "model_not_found"),
        (json!({"model": "tiny", "prompt": "Hi", "max_tokens": 1_000_000}), 400, "invalid_request_error"),
        (json!({"model": "tiny", "prompt": "Hi", "n": 99}), 400, "invalid_request_error"),
        (json!({"model": "tiny"}), 400, "invalid_request_error"),
        (json!({"model": "tiny", "prompt": "Hi", "logprobs": true}), 400, "invalid_request_error"),
    ];
    for (req, want_status, want_code) in cases {
        let (status, out) = post(http_addr, "/v1/completions", req.clone());
        assert_eq!((status, out["error"]["code"].as_str()), (want_status, Some(want_code)), "{req}: {out}");
    }
    let (status, body) = http::http(http_addr, "POST", "/v1/completions", Some(KEY), Some("{not json"));
    assert_eq!(status, 400, "{body}");
    // Refusals axum makes itself (a method the route lacks, a query string it cannot read, a
    // route that does not exist) come in OpenAI's body too.
    for (method, path, want_status, want_code) in [
        ("DELETE", "/v1/models", 405, "method_not_allowed"),
        ("PUT", "/v1/completions", 405, "method_not_allowed"),
        ("GET", "/v1/files?limit=abc", 400, "invalid_request_error"),
        ("GET", "/v1/fine_tuning/jobs?limit=-1", 400, "invalid_request_error"),
        ("GET", "/v2/anything", 404, "not_found"),
    ] {
        let (status, out) = http::call_json(http_addr, method, path, KEY, None);
        assert_eq!((status, out["error"]["code"].as_str()), (want_status, Some(want_code)), "{method} {path}: {out}");
        assert!(!out["error"]["message"].as_str().unwrap().is_empty(), "{method} {path}: {out}");
    }
    let (status, out) =
        post(http_addr, "/v1/completions", json!({"model": "tiny", "prompt": "Hi", "max_tokens": 2, "seed": 3}));
    assert_eq!((status, out["usage"]["completion_tokens"].as_u64()), (200, Some(2)));
}

/// `base` with `extra`'s keys added (or replaced).
fn with(mut base: Value, extra: Value) -> Value {
    base.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    base
}

/// The `n`-th choice's sampled tokens and their log-probabilities (`logprobs` asked for).
fn tokens_of(out: &Value, n: usize) -> (Vec<String>, Vec<f64>) {
    let lp = &out["choices"][n]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    (tokens, lp["token_logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect())
}

#[test]
fn every_served_openai_parameter_does_what_it_says_and_the_rest_are_refused() {
    let cluster = MiniCluster::builder(TANDEM, "gateway-params").gateway(KEY).start();
    let addr = cluster.http();
    cluster.register_model("tiny");
    cluster.wait_alive(1);
    let complete = |extra: Value| {
        let req =
            with(json!({"model": "tiny", "prompt": "The cat sat on the", "max_tokens": 6, "temperature": 0}), extra);
        let (status, out) = post(addr, "/v1/completions", req.clone());
        assert_eq!(status, 200, "{req}: {out}");
        out
    };
    let want = TANDEM.generate_greedy(&cluster.model, "The cat sat on the", 6);

    // A batch of prompts, n each: choices prompt by prompt, each prompt's tokens counted once.
    let out = complete(json!({"prompt": ["The cat sat on the", "Hello"], "n": 2}));
    let texts: Vec<&str> = out["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!(texts.len(), 4, "{out}");
    assert_eq!((texts[0], texts[1]), (want["text"].as_str().unwrap(), want["text"].as_str().unwrap()));
    let hello = complete(json!({"prompt": "Hello"}));
    assert_eq!(texts[2], hello["choices"][0]["text"]);
    let indices: Vec<u64> = out["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(indices, [0, 1, 2, 3]);
    assert_eq!(
        out["usage"]["prompt_tokens"],
        want["prompt_tokens"].as_u64().unwrap() + hello["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(out["usage"]["completion_tokens"], 24);

    // Token-id prompts, one or a list.
    let ids: Vec<u64> = want["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let one = complete(json!({"prompt": ids[..4]}));
    assert_eq!(one["usage"]["prompt_tokens"], 4, "{one}");
    let two = complete(json!({"prompt": [ids[..4], ids[..2]]}));
    assert_eq!(two["choices"][0]["text"], one["choices"][0]["text"]);
    assert_eq!(two["usage"]["prompt_tokens"], 6, "{two}");

    // Alternatives: the sampled (greedy) token is the most likely of them.
    let out = complete(json!({"logprobs": 3}));
    let (tokens, logprobs) = tokens_of(&out, 0);
    let top = out["choices"][0]["logprobs"]["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), tokens.len());
    for ((alternatives, token), lp) in top.iter().zip(&tokens).zip(&logprobs) {
        let alternatives = alternatives.as_object().unwrap();
        assert!((1..=3).contains(&alternatives.len()), "{out}");
        if token.contains('\u{FFFD}') {
            continue; // a part of a character: other such tokens have the same text, and one key
        }
        let best = alternatives.values().map(|v| v.as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert!((best - lp).abs() < 1e-5 && (alternatives[token].as_f64().unwrap() - lp).abs() < 1e-5, "{out}");
    }
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
        "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let (status, out) = post(addr, "/v1/chat/completions", chat);
    assert_eq!(status, 200, "{out}");
    for t in out["choices"][0]["logprobs"]["content"].as_array().unwrap() {
        let alternatives = t["top_logprobs"].as_array().unwrap();
        assert_eq!(alternatives.len(), 2, "{out}");
        assert_eq!(alternatives[0]["logprob"], t["logprob"], "{out}");
    }

    // logit_bias: +100 makes a token the only choice; the log-probabilities stay the model's.
    // (A token that is a whole character: parts of characters share one text.)
    let (biased, tokens) = (1..256u64)
        .map(|i| ((ids[0] + i) % 256).to_string())
        .map(|id| (id.clone(), tokens_of(&complete(json!({"logit_bias": {id: 100}, "logprobs": 0})), 0).0))
        .find(|(_, tokens)| !tokens[0].contains('\u{FFFD}'))
        .unwrap();
    assert!(tokens.iter().all(|t| *t == tokens[0]), "{tokens:?}");
    let (plain, _) = tokens_of(&complete(json!({"logprobs": 0})), 0);
    assert_ne!(tokens, plain);

    // Penalties, OpenAI's formula: a bias makes the token the choice, until what the penalties
    // take for its count outweighs it (the random model's logits lie well within 1 of each other).
    let count = |extra: Value| {
        let (got, _) = tokens_of(&complete(with(json!({"max_tokens": 8, "logprobs": 0}), extra)), 0);
        (got[0] == tokens[0], got.iter().filter(|t| **t == tokens[0]).count())
    };
    assert_eq!(count(json!({"logit_bias": {&biased: 3}})), (true, 8));
    assert_eq!(count(json!({"logit_bias": {&biased: 3}, "frequency_penalty": 2})), (true, 2));
    assert_eq!(count(json!({"logit_bias": {&biased: 1}, "presence_penalty": 2})), (true, 1));
    assert_eq!(count(json!({"logit_bias": {&biased: 3}, "presence_penalty": 2})), (true, 8));

    // best_of: the candidate of highest mean log-probability, of those n = best_of gives with
    // the same seed.
    let all = complete(json!({"n": 3, "seed": 11, "temperature": 1, "logprobs": 0}));
    let mean = |i: usize| {
        let (_, lp) = tokens_of(&all, i);
        lp.iter().sum::<f64>() / lp.len() as f64
    };
    let best = (0..3).max_by(|&a, &b| mean(a).total_cmp(&mean(b))).unwrap();
    let out = complete(json!({"best_of": 3, "seed": 11, "temperature": 1}));
    assert_eq!(out["choices"].as_array().unwrap().len(), 1);
    assert_eq!(out["choices"][0]["text"], all["choices"][best]["text"], "{all}");
    assert_eq!(out["choices"][0]["logprobs"], Value::Null, "not asked for");
    assert_eq!(out["usage"]["completion_tokens"], 18, "every candidate is counted");

    // Chat without a bound runs to the end of the context, or to the end of its answer.
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0});
    let (status, out) = post(addr, "/v1/chat/completions", chat);
    assert_eq!(status, 200, "{out}");
    let used = out["usage"]["total_tokens"].as_u64().unwrap();
    match out["choices"][0]["finish_reason"].as_str().unwrap() {
        "length" => assert_eq!(used, 512, "the tiny model's context: {out}"),
        _ => assert!(out["usage"]["completion_tokens"].as_u64().unwrap() > 16, "{out}"),
    }

    // A streamed batch: every choice's chunks, each prompt's tokens once in the usage.
    let req = json!({"model": "tiny", "prompt": ["Hello", "Hi"], "n": 2, "max_tokens": 3, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true}, "user": "end-user-7"});
    let (status, body) = http::http(addr, "POST", "/v1/completions", Some(KEY), Some(&req.to_string()));
    assert_eq!(status, 200, "{body}");
    let events = sse(&body);
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let mut seen: Vec<u64> = chunks.iter().filter_map(|c| c["choices"][0]["index"].as_u64()).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, [0, 1, 2, 3], "{body}");
    let usage = &chunks.last().unwrap()["usage"];
    let single = |p: &str| complete(json!({"prompt": p}))["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(usage["prompt_tokens"].as_u64(), Some(single("Hello") + single("Hi")), "{body}");
    assert_eq!(usage["completion_tokens"], 12, "{body}");

    // Embeddings: unit vectors of the model's width, the same alone as in a batch, as numbers
    // or base64.
    let (status, out) = post(addr, "/v1/embeddings", json!({"model": "tiny", "input": ["Hello", "Hi", "Hello"]}));
    assert_eq!(status, 200, "{out}");
    let vectors: Vec<Vec<f64>> = (out["data"].as_array().unwrap().iter())
        .map(|d| d["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
        .collect();
    assert_eq!((vectors.len(), vectors[0].len(), &out["object"]), (3, 64, &json!("list")), "{out}");
    assert!(vectors.iter().all(|v| (v.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-4));
    assert_eq!(vectors[0], vectors[2]);
    assert_ne!(vectors[0], vectors[1]);
    assert_eq!(out["usage"]["prompt_tokens"].as_u64(), Some(2 * single("Hello") + single("Hi")), "{out}");
    let (status, alone) =
        post(addr, "/v1/embeddings", json!({"model": "tiny", "input": "Hello", "encoding_format": "base64"}));
    assert_eq!(status, 200, "{alone}");
    use base64::Engine as _;
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(alone["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let decoded: Vec<f64> = bytes.chunks(4).map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap()))).collect();
    assert!(decoded.iter().zip(&vectors[0]).all(|(a, b)| (a - b).abs() < 1e-5), "{decoded:?}");
    for (body, param) in [
        (json!({"model": "tiny", "input": "Hi", "dimensions": 8}), "dimensions"),
        (json!({"model": "tiny", "input": "Hi", "encoding_format": "hex"}), "encoding_format"),
        (json!({"model": "tiny", "input": []}), "input"),
        (json!({"model": "tiny", "input": vec!["a"; 65]}), "input"),
    ] {
        let (status, out) = post(addr, "/v1/embeddings", body.clone());
        assert_eq!((status, out["error"]["param"].as_str()), (400, Some(param)), "{body}: {out}");
    }

    // Structured outputs: the random model writes JSON its schema holds, sampled or greedy.
    let schema = json!({"type": "object", "properties": {"color": {"enum": ["red", "blue"]}, "n": {"type": "boolean"}},
        "required": ["color", "n"], "additionalProperties": false});
    for (format, temperature) in [
        (json!({"type": "json_schema", "json_schema": {"name": "pick", "schema": schema, "strict": true}}), 1.0),
        (json!({"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}}), 0.0),
    ] {
        let req = json!({"model": "tiny", "messages": [{"role": "user", "content": "Pick"}], "max_tokens": 40,
            "temperature": temperature, "response_format": format, "n": 2});
        let (status, out) = post(addr, "/v1/chat/completions", req);
        assert_eq!(status, 200, "{out}");
        for choice in out["choices"].as_array().unwrap() {
            let content: Value = serde_json::from_str(choice["message"]["content"].as_str().unwrap()).unwrap();
            assert!(["red", "blue"].contains(&content["color"].as_str().unwrap()) && content["n"].is_boolean());
        }
    }
    let req = json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200,
        "response_format": {"type": "json_object"}, "seed": 1});
    let (status, out) = post(addr, "/v1/chat/completions", req);
    assert_eq!(status, 200, "{out}");
    // An object, whole when it stopped (one cut by max_tokens is its beginning).
    let content = out["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.starts_with('{'), "{out}");
    if out["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(content).unwrap().is_object(), "{out}");
    }
    let bad = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}});
    let req = json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "response_format": bad});
    let (status, out) = post(addr, "/v1/chat/completions", req);
    assert_eq!(status, 400, "{out}");

    // Tools: a required call comes back as OpenAI's tool_calls, its arguments held to its schema,
    // whole or streamed; a conversation carries calls and their answers back.
    let pick = json!({"type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}},
        "required": ["city"], "additionalProperties": false});
    // (One tool: the tiny model's context holds little more than its signature.)
    let tools = json!([{"type": "function", "function": {"name": "weather", "parameters": pick}}]);
    let ask = |extra: Value| {
        let req = json!({"model": "tiny", "messages": [{"role": "user", "content": "Oslo?"}], "max_tokens": 100,
            "tools": tools});
        post(addr, "/v1/chat/completions", with(req, extra))
    };
    let weather_call = |call: &Value| {
        let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        call["type"] == "function"
            && call["function"]["name"] == "weather"
            && ["Oslo", "Rome"].contains(&args["city"].as_str().unwrap_or(""))
            && args.as_object().unwrap().len() == 1
            && call["id"].as_str().unwrap().starts_with("call")
    };
    let named = json!({"type": "function", "function": {"name": "weather"}});
    let (status, out) = ask(json!({"tool_choice": named, "parallel_tool_calls": false, "n": 2}));
    assert_eq!(status, 200, "{out}");
    for choice in out["choices"].as_array().unwrap() {
        let calls = choice["message"]["tool_calls"].as_array().unwrap();
        assert!(calls.len() == 1 && weather_call(&calls[0]), "{out}");
        assert_eq!((&choice["finish_reason"], &choice["message"]["content"]), (&json!("tool_calls"), &Value::Null));
    }
    let (status, out) = ask(json!({"tool_choice": "required", "seed": 3}));
    assert_eq!(status, 200, "{out}");
    let calls = out["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert!(!calls.is_empty() && calls.iter().all(weather_call), "{out}");
    // Streamed: each call whole in one delta, at its index.
    let req = json!({"model": "tiny", "messages": [{"role": "user", "content": "Oslo?"}], "max_tokens": 100,
        "tools": tools, "tool_choice": named, "stream": true});
    let (status, body) = http::http(addr, "POST", "/v1/chat/completions", Some(KEY), Some(&req.to_string()));
    assert_eq!(status, 200, "{body}");
    let chunks: Vec<Value> =
        sse(&body).iter().filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect();
    let streamed: Vec<&Value> =
        chunks.iter().flat_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array().into_iter().flatten()).collect();
    assert!(streamed.len() == 1 && streamed[0]["index"] == 0 && weather_call(streamed[0]), "{body}");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls", "{body}");
    let call = calls[0].clone();
    let conversation = json!([{"role": "user", "content": "Oslo?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]);
    let req =
        json!({"model": "tiny", "messages": conversation, "max_tokens": 4, "tools": tools, "tool_choice": "none"});
    let (status, out) = post(addr, "/v1/chat/completions", req);
    assert_eq!((status, &out["choices"][0]["finish_reason"]), (200, &json!("length")), "{out}");
    for (extra, param) in [
        (json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}), "tool_choice"),
        (json!({"tool_choice": "always"}), "tool_choice"),
        (json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}), "tools"),
        (json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}), "tools"),
        (json!({"tools": [], "tool_choice": "required"}), "tools"),
        (json!({"tools": null, "tool_choice": "required"}), "tool_choice"),
        (json!({"response_format": {"type": "json_object"}}), "response_format"),
        (json!({"messages": [{"role": "tool", "content": "x"}]}), "messages"),
        (json!({"messages": [{"role": "user", "content": null}]}), "messages"),
    ] {
        let (status, out) = ask(extra.clone());
        assert_eq!((status, out["error"]["param"].as_str()), (400, Some(param)), "{extra}: {out}");
    }

    // Parameters at OpenAI's defaults are welcome; any other that is not served is a 400 naming it.
    complete(json!({"echo": false, "suffix": null, "user": "u1", "stream": false}));
    let chat = |extra: Value| {
        let req = json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        post(addr, "/v1/chat/completions", with(req, extra))
    };
    assert_eq!(chat(json!({"store": false, "parallel_tool_calls": true, "modalities": ["text"]})).0, 200);
    let refused = [
        ("/v1/completions", json!({"suffix": "x"}), "suffix"),
        ("/v1/completions", json!({"echo": true}), "echo"),
        ("/v1/completions", json!({"temprature": 0.5}), "temprature"),
        ("/v1/completions", json!({"top_logprobs": 2}), "top_logprobs"),
        ("/v1/completions", json!({"logprobs": 21}), "logprobs"),
        ("/v1/completions", json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        ("/v1/completions", json!({"n": 2, "best_of": 1}), "best_of"),
        ("/v1/completions", json!({"best_of": 2, "stream": true}), "best_of"),
        ("/v1/completions", json!({"prompt": vec!["a"; 65]}), "prompt"),
        ("/v1/completions", json!({"prompt": [[]]}), "prompt"),
        ("/v1/completions", json!({"logit_bias": {"x": 1}}), "logit_bias"),
        ("/v1/completions", json!({"logit_bias": {"1": 101}}), "logit_bias"),
        ("/v1/completions", json!({"presence_penalty": 2.5}), "presence_penalty"),
        ("/v1/chat/completions", json!({"functions": [{"name": "f"}]}), "functions"),
        ("/v1/chat/completions", json!({"response_format": {"type": "xml"}}), "body"),
        (
            "/v1/chat/completions",
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}}),
            "response_format",
        ),
        ("/v1/chat/completions", json!({"store": true}), "store"),
        ("/v1/chat/completions", json!({"top_logprobs": 2}), "top_logprobs"),
        ("/v1/chat/completions", json!({"logprobs": true, "top_logprobs": 21}), "top_logprobs"),
        ("/v1/chat/completions", json!({"best_of": 2}), "best_of"),
    ];
    for (path, extra, param) in refused {
        let (status, out) = match path {
            "/v1/completions" => {
                post(addr, path, with(json!({"model": "tiny", "prompt": "Hi", "max_tokens": 2}), extra.clone()))
            }
            _ => chat(extra.clone()),
        };
        assert_eq!((status, out["error"]["param"].as_str()), (400, Some(param)), "{path} {extra}: {out}");
    }
    // A token id past the vocabulary is the worker's 400.
    let (status, out) =
        post(addr, "/v1/completions", json!({"model": "tiny", "prompt": "Hi", "logit_bias": {"99999": 1}}));
    assert_eq!(status, 400, "{out}");
}

#[test]
fn a_job_given_only_its_data_resolves_auto_from_it_and_reports_what_it_trained() {
    let cluster = MiniCluster::builder(TANDEM, "gateway-auto").gateway(KEY).start();
    let addr = cluster.http();
    cluster.register_model("tiny");
    cluster.wait_alive(1);
    let lines: String = (0..16)
        .map(|i| format!("{}\n", json!({"prompt": format!("n{i} ="), "completion": format!(" {}", i % 6)})))
        .collect();
    let upload = |name| {
        let (status, file) = http::upload(addr, KEY, name, &lines);
        assert_eq!(status, 200, "{file}");
        serde_json::from_str::<Value>(&file).unwrap()["id"].clone()
    };
    let create = json!({"model": "tiny", "training_file": upload("train.jsonl"),
        "validation_file": upload("valid.jsonl"), "method": {"type": "supervised"}});
    let (status, job) = post(addr, "/v1/fine_tuning/jobs", create);
    assert_eq!(status, 200, "{job}");
    let auto = json!({"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"});
    assert_eq!(job["hyperparameters"], auto, "{job}");
    assert_eq!((job["trained_tokens"].clone(), job["estimated_finish"].clone()), (Value::Null, Value::Null));
    let id = job["id"].as_str().unwrap().to_string();
    let job = tandem_testkit::wait_for(120, "the job to succeed", || {
        let (_, job) = http::call_json(addr, "GET", &format!("/v1/fine_tuning/jobs/{id}"), KEY, None);
        assert!(!["failed", "cancelled"].contains(&job["status"].as_str().unwrap()), "{job}");
        (job["status"] == "succeeded").then_some(job)
    });
    // 16 examples: batch 1, as many epochs as may be (100), a quarter of the learning rate.
    let resolved = json!({"n_epochs": 100, "batch_size": 1, "learning_rate_multiplier": 0.25});
    assert_eq!((&job["hyperparameters"], &job["total_steps"]), (&resolved, &json!(1600)), "{job}");
    let trained = job["trained_tokens"].as_u64().unwrap();
    assert!(trained.is_multiple_of(100) && trained >= 100 * 16 * 3, "{job}");
    let messages = http::job_events(addr, KEY, &id);
    assert!(messages.iter().any(|m| m.starts_with("Step 1600: validation loss=")), "{messages:?}");
}

#[test]
fn every_route_in_the_role_table_asks_for_its_role() {
    let cluster = MiniCluster::builder(TANDEM, "route-roles").gateway(KEY).start();
    let addr = cluster.http();
    cluster.wait_alive(1);
    let (status, made) = post(addr, "/v1/admin/api-keys", json!({"tenant": "t1"}));
    assert_eq!(status, 200, "{made}");
    let tenant = made["key"].as_str().unwrap().to_string();
    let rows = http::route_table();
    assert!(rows.len() >= 25, "{rows:?}");
    // The OpenAPI document the gateway serves has the same routes, each with its role.
    let (status, document) = http::http(addr, "GET", "/openapi.json", None, None);
    assert_eq!(status, 200, "{document}");
    let document: Value = serde_json::from_str(&document).unwrap();
    let mut documented: Vec<(String, String, String)> = Vec::new();
    for (path, operations) in document["paths"].as_object().unwrap() {
        for (method, op) in operations.as_object().unwrap() {
            let who = op["description"].as_str().unwrap().split("Who may call it: ").nth(1).unwrap();
            documented.push((method.to_uppercase(), path.clone(), who.trim_end_matches('.').to_string()));
        }
    }
    let (mut table, mut documented) = (rows.clone(), documented);
    table.sort();
    documented.sort();
    assert_eq!(documented, table, "the OpenAPI document and the role table in docs/security.md differ");
    for (method, path, who) in rows {
        // Any name in a path's braces: what it names need not exist, the role is checked first.
        let path: String =
            path.split('/').map(|p| if p.starts_with('{') { "x" } else { p }).collect::<Vec<_>>().join("/");
        let body = (method == "POST").then_some("{}");
        let call = |key: Option<&str>| http::http(addr, &method, &path, key, body).0;
        let (none, as_tenant, as_operator) = (call(None), call(Some(&tenant)), call(Some(KEY)));
        let what = format!("{method} {path} ({who}): no key {none}, tenant {as_tenant}, operator {as_operator}");
        match who.as_str() {
            "anyone" => assert!(![401, 403].contains(&none), "{what}"),
            "tenant" => assert!(none == 401 && ![401, 403].contains(&as_tenant), "{what}"),
            "operator" => assert!(none == 401 && as_tenant == 403, "{what}"),
            other => panic!("unknown role {other:?} in the table"),
        }
        assert!(![401, 403, 404, 405].contains(&as_operator) || path.contains("/x"), "{what}");
        assert!(as_operator < 500 || as_operator == 503, "{what}");
    }
}

/// What `GET /v1/admin/overview` answers the operator.
fn overview(addr: &str) -> Value {
    let (status, o) = http::call_json(addr, "GET", "/v1/admin/overview", KEY, None);
    assert_eq!(status, 200, "{o}");
    o
}

#[test]
fn the_overview_shows_the_cluster_and_a_drained_worker_gets_no_requests() {
    let cluster = MiniCluster::builder(TANDEM, "overview").gateway(KEY).start();
    let addr = cluster.http();
    cluster.register_model("tiny");
    cluster.wait_alive(1);
    let completion = json!({"model": "tiny", "prompt": "Hi", "max_tokens": 2, "temperature": 0});
    assert_eq!(post(addr, "/v1/completions", completion.clone()).0, 200);

    // The page is served to anyone and loads nothing from elsewhere; its data is the operator's.
    let (status, page) = http::http(addr, "GET", "/dashboard", None, None);
    assert!(status == 200 && page.contains("/v1/admin/overview"), "{status}");
    // (The SVG namespace is a name, not a place anything is loaded from.)
    let page = page.replace("http://www.w3.org/2000/svg", "");
    assert!(!page.contains("http://") && !page.contains("https://"), "the page names another origin");
    assert_eq!(http::http(addr, "GET", "/v1/admin/overview", None, None).0, 401);

    // The leader, and the worker with what its heartbeats carry (the engine's pool).
    let deadline = Instant::now() + Duration::from_secs(30);
    let o = loop {
        let o = overview(addr);
        if o["workers"][0]["load"]["pages"].as_u64().is_some_and(|p| p > 0) {
            break o;
        }
        assert!(Instant::now() < deadline, "no worker load in {o}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let (coordinator, worker) = (&o["coordinators"][0], &o["workers"][0]);
    assert_eq!((coordinator["leader"].as_bool(), coordinator["reachable"].as_bool()), (Some(true), Some(true)), "{o}");
    let (commit, applied) = (coordinator["commit"].as_u64().unwrap(), coordinator["applied"].as_u64().unwrap());
    assert!(commit >= 1 && applied <= commit, "{o}");
    assert_eq!((worker["alive"].as_bool(), worker["draining"].as_bool()), (Some(true), Some(false)), "{o}");
    assert!(worker["heard_seconds_ago"].as_f64().is_some_and(|s| s < 10.0), "{o}");
    assert_eq!(worker["models"], json!(["tiny"]), "{o}");
    assert_eq!(o["models"][0]["id"], "tiny", "{o}");
    for key in ["jobs", "groups", "api_keys", "events"] {
        assert!(o[key].is_array(), "{key}: {o}");
    }

    // Drained, it gets no request (there is no other worker: 503) until it is back in service.
    let id = worker["id"].as_str().unwrap().to_string();
    let drain = |on: bool| post(addr, &format!("/v1/admin/workers/{id}/drain"), json!({"drain": on}));
    assert_eq!(drain(true), (200, json!({"object": "worker", "id": id, "draining": true})));
    assert_eq!(overview(addr)["workers"][0]["draining"], true);
    let (status, refused) = post(addr, "/v1/completions", completion.clone());
    assert_eq!(status, 503, "{refused}");
    // Told when to come back, as every 503 is.
    assert_eq!(retry_after(addr, "/v1/completions", KEY, &completion.to_string()), Some(1));
    // The 503 is among the recent events.
    let events = overview(addr)["events"].to_string();
    assert!(events.contains("503 answered to admin"), "{events}");
    assert_eq!(drain(false).0, 200);
    assert_eq!(post(addr, "/v1/completions", completion).0, 200);
    let (status, missing) = post(addr, "/v1/admin/workers/nope/drain", json!({"drain": true}));
    assert_eq!(status, 404, "{missing}");
    let (status, bad) = post(addr, &format!("/v1/admin/workers/{id}/drain"), json!({"drain": "yes"}));
    assert_eq!(status, 400, "{bad}");
}

/// The `Retry-After` of the answer to a POST of `body` to `path` with `key`.
fn retry_after(addr: &str, path: &str, key: &str, body: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let head = raw.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    head.lines().find_map(|l| l.strip_prefix("retry-after:")).and_then(|v| v.trim().parse().ok())
}

#[test]
fn tenant_limits_answer_429_with_when_to_retry() {
    let cluster = MiniCluster::builder(TANDEM, "limits").gateway(KEY).start();
    let addr = cluster.http();
    cluster.register_model("tiny");
    cluster.wait_alive(1);
    let (_, made) = post(addr, "/v1/admin/api-keys", json!({"tenant": "t1"}));
    let t1 = made["key"].as_str().unwrap().to_string();
    let limits = json!({"requests_per_minute": 2, "max_files": 1});
    let (status, set) = http::call_json(addr, "PUT", "/v1/admin/tenants/t1/limits", KEY, Some(limits));
    assert_eq!(
        (status, &set["requests_per_minute"], &set["object"]),
        (200, &json!(2), &json!("tenant.limits")),
        "{set}"
    );
    let (status, _) = http::call_json(addr, "PUT", "/v1/admin/tenants/t1/limits", &t1, Some(json!({})));
    assert_eq!(status, 403, "a tenant sets no limits");
    let (status, bad) = http::call_json(addr, "PUT", "/v1/admin/tenants/t1/limits", KEY, Some(json!({"rpm": 1})));
    assert_eq!(status, 400, "{bad}");
    let (_, read) = http::call_json(addr, "GET", "/v1/admin/tenants/t1/limits", KEY, None);
    assert_eq!(read["max_files"], 1, "{read}");

    // Two completions a minute: the third is refused with when to retry; others are not held.
    let body = json!({"model": "tiny", "prompt": "Hi", "max_tokens": 1}).to_string();
    for _ in 0..2 {
        assert_eq!(http::http(addr, "POST", "/v1/completions", Some(&t1), Some(&body)).0, 200);
    }
    let (status, refused) = http::http(addr, "POST", "/v1/completions", Some(&t1), Some(&body));
    assert_eq!(status, 429, "{refused}");
    assert!(refused.contains("rate_limit_exceeded"), "{refused}");
    assert!(matches!(retry_after(addr, "/v1/completions", &t1, &body), Some(1..=30)));
    assert_eq!(http::http(addr, "POST", "/v1/completions", Some(KEY), Some(&body)).0, 200, "another tenant");

    // One training file at most.
    let line = r#"{"prompt": "a", "completion": "b"}"#;
    assert_eq!(http::upload(addr, &t1, "one.jsonl", line).0, 200);
    let (status, refused) = http::upload(addr, &t1, "two.jsonl", line);
    assert_eq!(status, 429, "{refused}");
    assert!(refused.contains("quota_exceeded"), "{refused}");
    // Lifted: the body is the whole set.
    let (status, _) = http::call_json(addr, "PUT", "/v1/admin/tenants/t1/limits", KEY, Some(json!({})));
    assert_eq!(status, 200);
    assert_eq!(http::upload(addr, &t1, "two.jsonl", line).0, 200);
}

#[test]
fn a_client_that_stalls_is_disconnected() {
    use std::io::{Read, Write};
    let cluster = MiniCluster::builder(TANDEM, "stall").gateway(KEY).start();
    let addr = cluster.http().to_string();
    cluster.wait_alive(1);
    // One says nothing; one sends a byte, one half an HTTP/2 preface, one half its headers, and
    // each stops there. Each is closed by the gateway's 10 s deadlines, not kept open forever.
    let stalls: Vec<_> = [&b""[..], b"G", b"PRI * HTTP/2.0\r\n", b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"]
        .into_iter()
        .map(|sent| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(&addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                s.write_all(sent).unwrap();
                let start = Instant::now();
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
                start.elapsed()
            })
        })
        .collect();
    for stall in stalls {
        let waited = stall.join().unwrap();
        assert!(waited >= Duration::from_secs(5) && waited < Duration::from_secs(20), "closed after {waited:?}");
    }
    // And the gateway still answers.
    assert_eq!(http::http(&addr, "GET", "/health", None, None).0, 200);
}
