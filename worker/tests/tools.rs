//! Tool calling: a random-weight model, whose free output is noise, calls the request's tools
//! with arguments their schemas hold whenever the request requires a call, beside requests
//! that may answer in text, in the same batches; the calls are taken out of the text however
//! it streams; and the chat template shows tools and calls as transformers renders them.

#![allow(clippy::unwrap_used)] // tests unwrap fixtures and results by design

mod common;

use serde_json::{Value, json};
use tandem_proto::v1::{self, GenerateRequest, Tool, ToolCall, ToolChoice};
use tandem_worker::Error;
use tandem_worker::engine::{Engine, EngineConfig, GenerationRequest};
use tandem_worker::init_model::Preset;
use tandem_worker::model::Model;
use tandem_worker::sampling::SamplingParams;
use tandem_worker::tokenizer::TextTokenizer;
use tandem_worker::tools::{CallParser, ToolCalling};

fn tools() -> Vec<Tool> {
    let weather = json!({
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": false,
    });
    let add = json!({
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": false,
    });
    vec![
        Tool {
            name: "get_weather".into(),
            description: "The weather in a city.".into(),
            parameters: weather.to_string(),
        },
        Tool { name: "add".into(), description: String::new(), parameters: add.to_string() },
    ]
}

fn request(choice: ToolChoice, function: &str, single: bool) -> GenerateRequest {
    GenerateRequest {
        messages: vec![v1::ChatMessage {
            role: "user".into(),
            content: "Weather in Oslo?".into(),
            ..Default::default()
        }],
        tools: tools(),
        tool_choice: choice as i32,
        tool_function: function.into(),
        single_tool_call: single,
        ..GenerateRequest::default()
    }
}

/// Whether `call` names one of [`tools`] and its arguments follow that tool's schema.
fn valid(call: &ToolCall) -> bool {
    let args: Value = serde_json::from_str(&call.arguments).unwrap();
    let keys: Vec<&String> = args.as_object().unwrap().keys().collect();
    match call.name.as_str() {
        "get_weather" => {
            keys == ["city", "unit"]
                && ["Paris", "Oslo"].contains(&args["city"].as_str().unwrap_or(""))
                && ["C", "F"].contains(&args["unit"].as_str().unwrap_or(""))
        }
        // Integers of any size, as JSON's schema allows: read as written.
        "add" => {
            let raw: serde_json::Map<String, Value> = serde_json::from_str(&call.arguments).unwrap();
            let written: std::collections::HashMap<String, Box<serde_json::value::RawValue>> =
                serde_json::from_str(&call.arguments).unwrap();
            let integer = |k: &str| {
                let t = written[k].get();
                !t.is_empty() && t.strip_prefix('-').unwrap_or(t).chars().all(|c| c.is_ascii_digit())
            };
            raw.keys().collect::<Vec<_>>() == ["a", "b"] && integer("a") && integer("b")
        }
        _ => false,
    }
}

/// `text` through a parser in pieces of `piece` characters: the answer's text and the calls.
fn parse(text: &str, piece: usize, mut parser: CallParser) -> (String, Vec<ToolCall>) {
    let chars: Vec<char> = text.chars().collect();
    let (mut answer, mut calls) = (String::new(), Vec::new());
    for chunk in chars.chunks(piece) {
        let (t, c) = parser.push(&chunk.iter().collect::<String>());
        answer.push_str(&t);
        calls.extend(c);
    }
    let (t, c) = parser.finish("");
    answer.push_str(&t);
    calls.extend(c);
    (answer, calls)
}

#[test]
fn required_calls_follow_their_schemas_beside_free_answers() {
    let dir = common::model_dir(Preset::Tiny);
    let tokenizer = TextTokenizer::load(&dir).unwrap();
    let model = Model::load(&dir, tandem_kernels::Device::Cpu).unwrap();
    let mut engine =
        Engine::new(model, vec![], Some(TextTokenizer::load(&dir).unwrap()), EngineConfig::default()).unwrap();
    let cases = [
        request(ToolChoice::Required, "", false),
        request(ToolChoice::Function, "add", false),
        request(ToolChoice::Required, "", true),
        request(ToolChoice::Auto, "", false),
    ];
    let callings: Vec<ToolCalling> = cases.iter().map(|r| ToolCalling::of(r).unwrap().unwrap()).collect();
    // (The tiny model's context is too short for the tools' signatures: the grammar alone holds it.)
    let prompt = tokenizer.encode("Weather in Oslo?", true).unwrap();
    let seeds = 0..5u64;
    for seed in seeds.clone() {
        for calling in &callings {
            let params = SamplingParams {
                seed: Some(seed),
                max_tokens: 160,
                grammar: calling.grammar(),
                ..SamplingParams::default()
            };
            engine.submit(GenerationRequest { prompt: prompt.clone(), adapter: None, params }).unwrap();
        }
    }
    let outputs = engine.run_to_completion().unwrap();
    assert_eq!(outputs.len(), seeds.clone().count() * cases.len());
    let mut auto_called = 0;
    for out in &outputs {
        let i = out.index;
        let calling = &callings[i % cases.len()];
        let (answer, calls) = parse(&out.text, 1 + i % 7, calling.parser().unwrap());
        let ended = out.finish_reason.as_openai_str() == "stop";
        assert!(calls.iter().all(valid), "{calls:?}");
        match i % cases.len() {
            0 => assert!(!calls.is_empty() && (!ended || answer.is_empty()), "{:?}", out.text),
            1 => assert!(calls.len() == 1 && calls[0].name == "add" && answer.is_empty(), "{:?}", out.text),
            2 => assert!(calls.len() == 1 && answer.is_empty(), "{:?}", out.text),
            _ => match calls.is_empty() {
                true => assert!(!answer.starts_with("<tool_call>"), "{answer:?}"),
                false => auto_called += 1,
            },
        }
    }
    // Noise rarely opens a call by chance: `auto` leaves the model its choice.
    assert!(auto_called < seeds.clone().count(), "{auto_called}");
}

#[test]
fn calls_are_taken_out_of_the_text_however_it_streams() {
    let calling = ToolCalling::of(&request(ToolChoice::Auto, "", false)).unwrap().unwrap();
    let text = "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"note\": \"</tool_call> é\", \"a\": 1}}\n</tool_call>\n\
                <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>";
    for piece in 1..12 {
        let (answer, calls) = parse(text, piece, calling.parser().unwrap());
        assert_eq!(answer, "");
        let named: Vec<(&str, Value)> =
            calls.iter().map(|c| (c.name.as_str(), serde_json::from_str(&c.arguments).unwrap())).collect();
        assert_eq!(named, [("add", json!({"note": "</tool_call> é", "a": 1})), ("get_weather", json!({}))]);
    }
    // Text, whether or not it starts like a call; and a call cut short stays text.
    for text in ["<tool", "<tools are here", "It is sunny.", "<tool_call>\n{\"name\": \"add\", \"argu"] {
        let (answer, calls) = parse(text, 2, calling.parser().unwrap());
        assert_eq!((answer.as_str(), calls.len()), (text, 0));
    }
}

#[test]
fn bad_tools_are_the_requests_error() {
    let invalid = |req: GenerateRequest| matches!(ToolCalling::of(&req), Err(Error::InvalidRequest(_)));
    let with = |edit: &dyn Fn(&mut GenerateRequest)| {
        let mut req = request(ToolChoice::Auto, "", false);
        edit(&mut req);
        req
    };
    assert!(invalid(with(&|r| r.tools[1].name = "add two".into())));
    assert!(invalid(with(&|r| r.tools[1].name = "get_weather".into())));
    assert!(invalid(with(&|r| r.tools[0].parameters = "[1]".into())));
    assert!(invalid(with(&|r| r.tools[0].parameters = "{".into())));
    assert!(invalid(with(&|r| (r.tool_choice, r.tool_function) = (ToolChoice::Function as i32, "nope".into()))));
    assert!(invalid(with(&|r| r.tool_choice = 9)));
    assert!(invalid(with(&|r| r.json_schema = "{}".into())));
    assert!(invalid(with(&|r| r.messages.clear())));
    assert!(invalid(with(&|r| (r.tools.clear(), r.tool_choice = ToolChoice::Required as i32).1)));
    assert!(ToolCalling::of(&with(&|r| r.tools.clear())).unwrap().is_none());
    let none = ToolCalling::of(&with(&|r| r.tool_choice = ToolChoice::None as i32)).unwrap().unwrap();
    assert!(none.grammar().is_none() && none.parser().is_none());
}
