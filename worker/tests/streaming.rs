//! Streaming: the text each step settles, followed by the rest of the final output, is the
//! whole output; no streamed text ever holds a stop string or its beginning before the match.

#![allow(clippy::unwrap_used)] // tests unwrap fixtures and results by design

mod common;

use std::collections::BTreeMap;

use tandem_worker::engine::{Engine, EngineConfig, GenerationOutput, GenerationRequest};
use tandem_worker::init_model::Preset;
use tandem_worker::model::Model;
use tandem_worker::sampling::SamplingParams;
use tandem_worker::tokenizer::TextTokenizer;

/// Runs `params` on every prompt at once; each request's outputs and streamed texts.
fn run(prompts: &[&str], params: &SamplingParams) -> Vec<(GenerationOutput, String)> {
    let dir = common::model_dir(Preset::Tiny);
    let tokenizer = TextTokenizer::load(&dir).unwrap();
    let model = Model::load(&dir, tandem_kernels::Device::Cpu).unwrap();
    let prompts: Vec<Vec<u32>> = prompts.iter().map(|p| tokenizer.encode(p, false).unwrap()).collect();
    let mut engine = Engine::new(model, vec![], Some(tokenizer), EngineConfig::default()).unwrap();
    for prompt in prompts {
        engine.submit(GenerationRequest { prompt, adapter: None, params: params.clone() }).unwrap();
    }
    let mut streamed: BTreeMap<usize, String> = BTreeMap::new();
    let mut done = Vec::new();
    while engine.has_work() {
        let finished = engine.step().unwrap();
        for p in engine.progress() {
            streamed.entry(p.index).or_default().push_str(&p.text);
        }
        done.extend(finished);
    }
    done.sort_by_key(|o| o.index);
    done.into_iter().map(|o| (streamed.remove(&o.index).unwrap_or_default(), o)).map(|(s, o)| (o, s)).collect()
}

#[test]
fn streamed_text_is_a_prefix_of_the_output_and_never_shows_a_stop_string() {
    let prompts = ["The cat sat on", "Once upon a time", "Hello"];
    let free = SamplingParams { max_tokens: 24, temperature: 1.0, seed: Some(7), ..SamplingParams::default() };
    let runs = run(&prompts, &free);
    for (out, streamed) in &runs {
        assert!(out.text.starts_with(streamed.as_str()), "{streamed:?} vs {:?}", out.text);
        assert!(!streamed.is_empty() || out.token_ids.len() <= 1, "nothing streamed for {:?}", out.text);
    }
    // A stop string taken from the middle of the first output: the same seeded run stops there,
    // and the streamed text never contained any of it.
    let text = &runs[0].0.text;
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 6, "output too short to cut: {text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = SamplingParams { stop: vec![stop.clone()], ..free };
    let (out, streamed) = &run(&prompts[..1], &cut)[0];
    assert_eq!(out.text, text[..text.find(&stop).unwrap()]);
    assert!(out.text.starts_with(streamed.as_str()));
    assert!(!streamed.contains(&stop));
}
