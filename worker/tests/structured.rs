//! Structured outputs: a random-weight model, whose free output is noise, writes JSON that its
//! schema holds whenever the request gives one, at any temperature, beside requests with other
//! schemas and none in the same batches.

#![allow(clippy::unwrap_used)] // tests unwrap fixtures and results by design

mod common;

use serde_json::{Value, json};
use tandem_worker::Error;
use tandem_worker::engine::{Engine, EngineConfig, GenerationRequest};
use tandem_worker::init_model::Preset;
use tandem_worker::model::Model;
use tandem_worker::sampling::SamplingParams;
use tandem_worker::structured::Grammar;
use tandem_worker::tokenizer::TextTokenizer;

fn engine() -> (Engine, TextTokenizer) {
    let dir = common::model_dir(Preset::Tiny);
    let tokenizer = TextTokenizer::load(&dir).unwrap();
    let model = Model::load(&dir, tandem_kernels::Device::Cpu).unwrap();
    let engine = Engine::new(model, vec![], Some(TextTokenizer::load(&dir).unwrap()), EngineConfig::default()).unwrap();
    (engine, tokenizer)
}

#[test]
fn the_output_parses_and_follows_its_schema_in_a_mixed_batch() {
    let (mut engine, tokenizer) = engine();
    let colors = json!({
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
        "required": ["color", "ok"], "additionalProperties": false,
    });
    let list = json!({"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 2, "maxItems": 4});
    let prompt = tokenizer.encode("Answer:", true).unwrap();
    let request = |schema: Option<&Value>, seed| GenerationRequest {
        prompt: prompt.clone(),
        adapter: None,
        params: SamplingParams {
            seed: Some(seed),
            max_tokens: 64,
            grammar: schema.cloned().map(Grammar::JsonSchema),
            ..SamplingParams::default()
        },
    };
    for seed in 0..6 {
        engine.submit(request(Some(&colors), seed)).unwrap();
        engine.submit(request(None, seed)).unwrap();
        engine.submit(request(Some(&list), seed)).unwrap();
    }
    let outputs = engine.run_to_completion().unwrap();
    for out in outputs.chunks(3) {
        let object: Value = serde_json::from_str(&out[0].text).unwrap_or_else(|e| panic!("{:?}: {e}", out[0].text));
        assert!(["red", "green", "blue"].contains(&object["color"].as_str().unwrap()), "{object}");
        assert!(object["ok"].is_boolean() && object.as_object().unwrap().len() == 2, "{object}");
        assert!(serde_json::from_str::<Value>(&out[1].text).is_err(), "free text is noise: {:?}", out[1].text);
        let items: Vec<Value> = serde_json::from_str(&out[2].text).unwrap_or_else(|e| panic!("{:?}: {e}", out[2].text));
        assert!((2..=4).contains(&items.len()) && items.iter().all(|i| [1, 2, 3].contains(&i.as_i64().unwrap())));
    }
}

#[test]
fn a_schema_that_cannot_compile_is_the_requests_error() {
    let (mut engine, tokenizer) = engine();
    let bad = json!({"type": "object", "properties": {"a": {"type": "no-such-type"}}});
    let params = SamplingParams { grammar: Some(Grammar::JsonSchema(bad)), ..SamplingParams::default() };
    let req = GenerationRequest { prompt: tokenizer.encode("x", true).unwrap(), adapter: None, params };
    assert!(matches!(engine.submit(req), Err(Error::InvalidRequest(m)) if m.contains("JSON schema")));
}
