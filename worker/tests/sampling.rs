//! Sampler and stop-condition behaviour.

// A failed call is a failed test; helpers outside `#[test]` fns unwrap too.
#![allow(clippy::unwrap_used)]

use tandem_worker::Error;
use tandem_worker::sampling::{FinishReason, Sampler, SamplingParams, StopChecker};

fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
    SamplingParams { temperature, top_k, top_p, seed: Some(seed), ..SamplingParams::default() }
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// Pseudo-random logits with a clear but not overwhelming maximum.
fn varied_logits(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 % 97) as f32 / 97.0) * 4.0 - 2.0).collect()
}

#[test]
fn greedy_picks_the_argmax_and_lowest_id_on_ties() {
    let mut sampler = Sampler::new(&SamplingParams::greedy(4));
    assert_eq!(sampler.sample(&[0.1, 2.0, -1.0, 1.9]).token, 1);
    assert_eq!(sampler.sample(&[0.1, 3.0, 3.0, 1.9]).token, 1);
    let logits = varied_logits(1000);
    let argmax = logits.iter().enumerate().fold(0, |best, (i, &l)| if l > logits[best] { i } else { best });
    assert_eq!(sampler.sample(&logits).token as usize, argmax);
}

#[test]
fn seeded_sampler_is_reproducible() {
    let logits = varied_logits(500);
    let run = |seed| {
        let mut s = Sampler::new(&params(0.8, 50, 0.9, seed));
        (0..64).map(|_| s.sample(&logits).token).collect::<Vec<_>>()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

#[test]
fn unseeded_samplers_differ() {
    let logits = vec![0.0; 1000];
    let draw = || {
        let mut s = Sampler::new(&SamplingParams::default());
        (0..16).map(|_| s.sample(&logits).token).collect::<Vec<_>>()
    };
    assert_ne!(draw(), draw());
}

#[test]
fn top_k_one_equals_greedy() {
    let logits = varied_logits(300);
    let mut greedy = Sampler::new(&SamplingParams::greedy(1));
    let expected = greedy.sample(&logits).token;
    let mut sampler = Sampler::new(&params(1.5, 1, 1.0, 3));
    for _ in 0..50 {
        assert_eq!(sampler.sample(&logits).token, expected);
    }
    // Ties resolve to the lowest id, as in greedy.
    let mut tied = Sampler::new(&params(1.0, 1, 1.0, 3));
    assert_eq!(tied.sample(&[0.0, 5.0, 1.0, 5.0]).token, 1);
}

#[test]
fn tiny_top_p_equals_greedy() {
    let logits = varied_logits(300);
    let expected = Sampler::new(&SamplingParams::greedy(1)).sample(&logits).token;
    let mut sampler = Sampler::new(&params(1.0, 0, 1e-6, 11));
    for _ in 0..50 {
        assert_eq!(sampler.sample(&logits).token, expected);
    }
}

#[test]
fn empirical_distribution_matches_softmax() {
    let logits = [1.0f32, 0.5, 0.0, -0.5, 2.0, -3.0];
    let expected: Vec<f64> = log_softmax(&logits).into_iter().map(f64::exp).collect();
    let mut sampler = Sampler::new(&params(1.0, 0, 1.0, 1234));
    let n = 20_000;
    let mut counts = [0usize; 6];
    for _ in 0..n {
        counts[sampler.sample(&logits).token as usize] += 1;
    }
    for (i, (&c, &p)) in counts.iter().zip(&expected).enumerate() {
        let freq = c as f64 / n as f64;
        assert!((freq - p).abs() < 0.02, "token {i}: frequency {freq}, softmax {p}");
    }
}

#[test]
fn top_k_and_top_p_restrict_the_support() {
    // Probabilities ≈ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps the first two.
    let logits = [3.0f32, 2.0, 1.0, 0.0];
    let mut nucleus = Sampler::new(&params(1.0, 0, 0.8, 5));
    let mut top2 = Sampler::new(&params(1.0, 2, 1.0, 5));
    for _ in 0..2000 {
        assert!(nucleus.sample(&logits).token < 2);
        assert!(top2.sample(&logits).token < 2);
    }
}

#[test]
fn logprob_is_log_softmax_of_raw_logits() {
    let logits = varied_logits(200);
    let expected = log_softmax(&logits);
    // Temperature, top-k and top-p do not change the reported value.
    for p in [SamplingParams::greedy(1), params(0.3, 5, 0.5, 9), params(2.0, 0, 1.0, 9)] {
        let mut sampler = Sampler::new(&p);
        for _ in 0..20 {
            let s = sampler.sample(&logits);
            assert!((s.logprob as f64 - expected[s.token as usize]).abs() < 1e-5);
        }
    }
}

/// Greedy tokens drawn over and over from the same row of logits, with `p`'s bias and penalties.
fn greedy_run(p: SamplingParams, logits: &[f32], steps: usize) -> Vec<u32> {
    let mut sampler = Sampler::new(&SamplingParams { temperature: 0.0, ..p });
    (0..steps).map(|_| sampler.sample(logits).token).collect()
}

#[test]
fn logit_bias_moves_the_choice() {
    let logits = [1.0, 0.9, 0.3, -2.0];
    let bias = |logit_bias| SamplingParams { logit_bias, ..SamplingParams::default() };
    assert_eq!(greedy_run(bias(vec![]), &logits, 2), [0, 0]);
    assert_eq!(greedy_run(bias(vec![(3, 100.0)]), &logits, 2), [3, 3]);
    assert_eq!(greedy_run(bias(vec![(0, -100.0)]), &logits, 2), [1, 1]);
    // A token id past the row (the engine refuses those) changes nothing here.
    assert_eq!(greedy_run(bias(vec![(9, 100.0)]), &logits, 1), [0]);
}

#[test]
fn penalties_follow_openais_formula() {
    // logit - count * frequency - (count > 0) * presence, over the tokens generated so far.
    let logits = [1.0, 0.9, 0.3];
    let frequency = SamplingParams { frequency_penalty: 0.2, ..SamplingParams::default() };
    // A: 1.0 | B: 0.9 > 0.8 | A: 0.8 > 0.7 | B: 0.7 > 0.6 | A
    assert_eq!(greedy_run(frequency, &logits, 5), [0, 1, 0, 1, 0]);
    let presence = SamplingParams { presence_penalty: 0.5, ..SamplingParams::default() };
    // A: 1.0 | B: 0.9 > 0.5 | A: 0.5 > 0.4 > 0.3 | A: presence counts once
    assert_eq!(greedy_run(presence, &logits, 5), [0, 1, 0, 0, 0]);
    let negative = SamplingParams { presence_penalty: -2.0, ..SamplingParams::default() };
    assert_eq!(greedy_run(negative, &[0.9, 1.0], 3), [1, 1, 1]);
}

#[test]
fn top_logprobs_are_the_raw_distributions_best() {
    let logits = varied_logits(300);
    let expected = log_softmax(&logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    // Bias and penalties change what is drawn, not the reported distribution.
    let p = SamplingParams {
        top_logprobs: 5,
        logit_bias: vec![(7, 50.0)],
        frequency_penalty: 1.0,
        ..params(0.7, 0, 1.0, 4)
    };
    let mut sampler = Sampler::new(&p);
    for _ in 0..3 {
        let s = sampler.sample(&logits);
        assert_eq!(s.token, 7);
        let ids: Vec<usize> = s.top.iter().map(|&(id, _)| id as usize).collect();
        assert_eq!(ids, order[..5]);
        for &(id, lp) in &s.top {
            assert!((lp as f64 - expected[id as usize]).abs() < 1e-5);
        }
        assert!((s.logprob as f64 - expected[7]).abs() < 1e-5);
    }
    assert!(Sampler::new(&SamplingParams::default()).sample(&logits).top.is_empty());
    // More asked for than the row holds: the whole row, NaN left out.
    let p = SamplingParams { top_logprobs: 4, ..SamplingParams::greedy(1) };
    let got = Sampler::new(&p).sample(&[f32::NAN, 0.0, 1.0]).top;
    assert_eq!(got.iter().map(|&(id, _)| id).collect::<Vec<_>>(), [2, 1]);
}

#[test]
fn nan_logits_are_never_sampled() {
    let logits = [f32::NAN, 0.0, f32::NAN, 0.0];
    let mut sampler = Sampler::new(&params(1.0, 0, 1.0, 2));
    for _ in 0..200 {
        let s = sampler.sample(&logits);
        assert!(s.token == 1 || s.token == 3);
        assert!((s.logprob - 0.5f32.ln()).abs() < 1e-6);
    }
}

#[test]
fn stop_string_truncates_before_the_match() {
    let p = SamplingParams { stop: vec!["STOP".into(), "\n\n".into()], max_tokens: 100, ..SamplingParams::default() };
    let mut checker = StopChecker::new(&p, &[]);
    assert_eq!(checker.check(&[1], "Hello"), None);
    assert_eq!(checker.check(&[1, 2], "Hello wor"), None);
    let finish = checker.check(&[1, 2, 3], "Hello world\n\nmore").unwrap();
    assert_eq!(finish.reason, FinishReason::Stop);
    assert_eq!(finish.text, "Hello world");
}

#[test]
fn stop_string_split_across_tokens_is_found() {
    let p = SamplingParams { stop: vec!["STOP".into()], max_tokens: 100, ..SamplingParams::default() };
    let mut checker = StopChecker::new(&p, &[]);
    assert_eq!(checker.check(&[1], "abc ST"), None);
    // While "ST" could begin the stop string, it is not streamed.
    assert_eq!(checker.streamable_len("abc ST"), 4);
    assert_eq!(checker.streamable_len("abc S"), 4);
    assert_eq!(checker.streamable_len("abc X"), 5);
    let finish = checker.check(&[1, 2], "abc STOP tail").unwrap();
    assert_eq!(finish.text, "abc ");
}

#[test]
fn eos_and_stop_tokens_end_without_their_text() {
    let p = SamplingParams { stop_token_ids: vec![42], max_tokens: 100, ..SamplingParams::default() };
    let mut checker = StopChecker::new(&p, &[2]);
    assert_eq!(checker.check(&[5], "Hi"), None);
    let eos = checker.check(&[5, 2], "Hi<eos>").unwrap();
    assert_eq!((eos.reason, eos.text), (FinishReason::Eos, "Hi"));

    let mut checker = StopChecker::new(&p, &[2]);
    assert_eq!(checker.check(&[5], "Hi").map(|f| f.reason), None);
    let stop = checker.check(&[5, 42], "Hi!").unwrap();
    assert_eq!((stop.reason, stop.text), (FinishReason::Stop, "Hi"));
}

#[test]
fn ignore_eos_runs_to_max_tokens() {
    let p = SamplingParams { ignore_eos: true, max_tokens: 3, ..SamplingParams::default() };
    let mut checker = StopChecker::new(&p, &[2]);
    assert_eq!(checker.check(&[2], "a"), None);
    assert_eq!(checker.check(&[2, 2], "ab"), None);
    let finish = checker.check(&[2, 2, 2], "abc").unwrap();
    assert_eq!((finish.reason, finish.text), (FinishReason::Length, "abc"));
}

#[test]
fn finish_reason_serialises_lowercase() {
    assert_eq!(serde_json::to_string(&FinishReason::Length).unwrap(), "\"length\"");
    assert_eq!(serde_json::to_string(&FinishReason::Stop).unwrap(), "\"stop\"");
    assert_eq!(FinishReason::Eos.as_openai_str(), "stop");
}

#[test]
fn params_deserialise_with_defaults() {
    let p: SamplingParams = serde_json::from_str(r#"{"max_tokens": 5, "stop": ["x"]}"#).unwrap();
    assert_eq!(p.max_tokens, 5);
    assert_eq!(p.temperature, 1.0);
    assert_eq!(p.top_p, 1.0);
    assert_eq!(p.stop, vec!["x".to_string()]);
    p.validate().unwrap();
}

#[test]
fn validation_rejects_bad_parameters() {
    let bad = [
        SamplingParams { max_tokens: 0, ..SamplingParams::default() },
        SamplingParams { temperature: f32::NAN, ..SamplingParams::default() },
        SamplingParams { temperature: -0.5, ..SamplingParams::default() },
        SamplingParams { temperature: f32::INFINITY, ..SamplingParams::default() },
        SamplingParams { top_p: 0.0, ..SamplingParams::default() },
        SamplingParams { top_p: 1.5, ..SamplingParams::default() },
        SamplingParams { top_p: f32::NAN, ..SamplingParams::default() },
        SamplingParams { stop: vec![String::new()], ..SamplingParams::default() },
        SamplingParams { top_logprobs: 21, ..SamplingParams::default() },
        SamplingParams { presence_penalty: 2.5, ..SamplingParams::default() },
        SamplingParams { frequency_penalty: f32::NAN, ..SamplingParams::default() },
        SamplingParams { logit_bias: vec![(3, 101.0)], ..SamplingParams::default() },
        SamplingParams { logit_bias: vec![(3, f32::NEG_INFINITY)], ..SamplingParams::default() },
    ];
    for p in bad {
        assert!(matches!(p.validate(), Err(Error::InvalidRequest(_))), "{p:?} should be rejected");
    }
    SamplingParams::default().validate().unwrap();
    SamplingParams::greedy(1).validate().unwrap();
}
