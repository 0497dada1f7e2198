//! Sampling parameters and the per-request sampler.
//!
//! - [`SamplingParams`]: what a request asks for (OpenAI-like defaults), with [`SamplingParams::validate`].
//! - [`Sampler`]: turns one row of logits into a token: logit bias and presence / frequency
//!   penalties, then greedy, or temperature → top-k → top-p → inverse-CDF draw from a seeded PRNG
//!   (deterministic for a given seed); with the token's log-probability and the most likely
//!   alternatives when asked for.
//! - [`StopChecker`]: decides after each token whether generation ends (EOS, stop token ids, stop
//!   strings, `max_tokens`) and where the returned text ends (OpenAI semantics: a stop string is
//!   not part of the output).

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::{Xoshiro256, splitmix64};
use crate::structured::{Constraint, Grammar};
use tandem_kernels::ops;

/// What a request asks of the sampler and the stop conditions. Missing JSON fields take the
/// defaults of [`SamplingParams::default`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Most tokens to generate (at least 1).
    pub max_tokens: usize,
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 turns it off.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability sums to at
    /// least `top_p`; 1 turns it off. Must lie in (0, 1].
    pub top_p: f32,
    /// Seed of the request's PRNG; `None` draws a fresh seed per request.
    pub seed: Option<u64>,
    /// Strings that end generation; the matched string is not returned.
    pub stop: Vec<String>,
    /// Token ids that end generation (besides the model's EOS ids).
    pub stop_token_ids: Vec<u32>,
    /// Whether to return the log-probability of each sampled token.
    pub logprobs: bool,
    /// How many of the most likely tokens to return, with their log-probabilities, beside each
    /// sampled token (at most [`MAX_TOP_LOGPROBS`]).
    pub top_logprobs: usize,
    /// OpenAI's presence penalty, in [-2, 2]: subtracted once from the logit of every token
    /// generated so far.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty, in [-2, 2]: subtracted from a generated token's logit once for
    /// every time it was generated.
    pub frequency_penalty: f32,
    /// Added to the logits of these token ids before sampling, each in [-100, 100].
    pub logit_bias: Vec<(u32, f32)>,
    /// Hold the output to this grammar ([`crate::structured`]).
    pub grammar: Option<Grammar>,
    /// Keep generating past the model's EOS tokens (benchmarks use this for fixed lengths).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    /// OpenAI's defaults: 16 tokens, temperature 1, no top-k, top-p 1.
    fn default() -> Self {
        SamplingParams {
            max_tokens: 16,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            logprobs: false,
            top_logprobs: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            grammar: None,
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: argmax at every step.
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams { max_tokens, temperature: 0.0, ..SamplingParams::default() }
    }

    /// Whether the sampler takes the argmax instead of drawing.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Rejects parameters that cannot be served, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.max_tokens == 0 {
            return Err(invalid("max_tokens must be at least 1"));
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(invalid(format!("temperature must be a finite number >= 0, got {}", self.temperature)));
        }
        // NaN fails both comparisons, so test for membership rather than for violation.
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(invalid("stop strings must not be empty"));
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(invalid(format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {}", self.top_logprobs)));
        }
        for (name, penalty) in
            [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)]
        {
            if !(-2.0..=2.0).contains(&penalty) {
                return Err(invalid(format!("{name} must be in [-2, 2], got {penalty}")));
            }
        }
        if let Some((token, bias)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return Err(invalid(format!("logit_bias of token {token} must be in [-100, 100], got {bias}")));
        }
        Ok(())
    }

    /// Whether the logits are changed before sampling.
    fn adjusts_logits(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || !self.logit_bias.is_empty()
    }
}

/// Most alternatives a request may ask for beside each token (OpenAI's bound).
pub const MAX_TOP_LOGPROBS: usize = 20;

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidRequest(msg.into())
}

/// One sampled token.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// `log_softmax(logits)[token]` of the RAW logits: temperature 1, before bias, penalties,
    /// top-k and top-p, so the value is the model's own log-probability whatever the sampling
    /// settings (what vLLM's `logprobs` reports by default).
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens of the same raw distribution, most likely first
    /// (ties to the lower id), with their log-probabilities.
    pub top: Vec<(u32, f32)>,
}

/// The per-request sampler. Owns its PRNG so a seeded request is reproducible regardless of
/// what else is in the batch.
#[derive(Clone, Debug)]
pub struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    top_logprobs: usize,
    presence_penalty: f32,
    frequency_penalty: f32,
    logit_bias: Vec<(u32, f32)>,
    /// Whether bias or penalties change the logits.
    adjusts: bool,
    /// How often each token was sampled (kept only when a penalty reads it).
    counts: HashMap<u32, u32>,
    /// The row of logits after bias, penalties and the structured output's mask, reused from
    /// token to token.
    adjusted: Vec<f32>,
    /// The structured output's parser, and the token that ends the sequence when it fails.
    constraint: Option<(Constraint, u32)>,
    rng: Xoshiro256,
    /// Reused buffers of (token, scaled logit) candidates and their softmax weights, so sampling
    /// allocates once per request rather than once per token.
    candidates: Vec<(u32, f32)>,
    weights: Vec<f64>,
}

impl Sampler {
    /// A sampler for `params`; its PRNG is seeded from `params.seed`, or from a process-wide
    /// counter mixed with per-process entropy when no seed is given.
    pub fn new(params: &SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(next_unseeded_seed);
        Sampler {
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            top_logprobs: params.top_logprobs,
            presence_penalty: params.presence_penalty,
            frequency_penalty: params.frequency_penalty,
            logit_bias: params.logit_bias.clone(),
            adjusts: params.adjusts_logits(),
            counts: HashMap::new(),
            adjusted: Vec::new(),
            constraint: None,
            rng: Xoshiro256::seed_from_u64(seed),
            candidates: Vec::new(),
            weights: Vec::new(),
        }
    }

    /// The sampler held to `constraint` (its structured output), which ends with `eos` if its
    /// parser fails.
    pub fn constrained(self, constraint: Option<Constraint>, eos: u32) -> Self {
        Sampler { constraint: constraint.map(|c| (c, eos)), ..self }
    }

    /// Picks the next token from one row of logits (length = vocab size).
    ///
    /// NaN logits are never chosen. An empty row (a caller bug) gives token 0 with logprob -inf
    /// rather than a panic.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let mut adjusted = std::mem::take(&mut self.adjusted);
        let row = if self.adjusts || self.constraint.is_some() {
            self.adjust(logits, &mut adjusted);
            if let Some((c, eos)) = &mut self.constraint {
                c.mask(&mut adjusted, *eos);
            }
            &adjusted[..]
        } else {
            logits
        };
        let token = if self.temperature == 0.0 { argmax(row) } else { self.draw(row) };
        self.adjusted = adjusted;
        if let Some((c, _)) = &mut self.constraint {
            c.advance(token);
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            *self.counts.entry(token).or_default() += 1;
        }
        let lse = log_normalizer(logits);
        Sampled {
            token,
            logprob: log_softmax_at(logits, token as usize, lse),
            top: top(logits, self.top_logprobs, lse),
        }
    }

    /// `logits` with the bias added and OpenAI's penalties subtracted, into `out`:
    /// `l[j] + bias[j] - count[j] * frequency - (count[j] > 0) * presence`.
    fn adjust(&self, logits: &[f32], out: &mut Vec<f32>) {
        out.clear();
        out.extend_from_slice(logits);
        for &(token, bias) in &self.logit_bias {
            if let Some(l) = out.get_mut(token as usize) {
                *l += bias;
            }
        }
        for (&token, &count) in &self.counts {
            if let Some(l) = out.get_mut(token as usize) {
                *l -= count as f32 * self.frequency_penalty + self.presence_penalty;
            }
        }
    }

    /// Temperature → top-k → top-p → inverse-CDF draw.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        let inv_t = 1.0 / self.temperature;
        self.candidates.clear();
        self.candidates
            .extend(logits.iter().enumerate().filter(|(_, l)| !l.is_nan()).map(|(i, &l)| (i as u32, l * inv_t)));
        if self.candidates.is_empty() {
            return 0;
        }
        if self.top_k > 0 && self.top_k < self.candidates.len() {
            keep_top_k(&mut self.candidates, self.top_k);
        }
        if self.top_p < 1.0 {
            // The nucleus needs candidates by decreasing probability; without top-p any order
            // samples the same distribution, so the O(V log V) sort is skipped.
            self.candidates.sort_unstable_by(by_logit_desc_then_id);
        }
        softmax_weights(&self.candidates, &mut self.weights);
        if self.top_p < 1.0 {
            let kept = nucleus_len(&self.weights, self.top_p);
            self.weights.truncate(kept);
        }
        let index = inverse_cdf(&self.weights, self.rng.next_f64());
        self.candidates[index].0
    }
}

/// Index of the largest logit, lowest id on ties; NaN never wins. 0 for an empty or all-NaN row.
fn argmax(logits: &[f32]) -> u32 {
    ops::argmax(logits).map_or(0, |i| i as u32)
}

/// `log(sum(exp(logits)))` over the logits that are not NaN.
fn log_normalizer(logits: &[f32]) -> f32 {
    let lse = ops::log_sum_exp(logits);
    if lse.is_nan() {
        ops::log_sum_exp(&logits.iter().copied().filter(|l| !l.is_nan()).collect::<Vec<_>>())
    } else {
        lse
    }
}

/// `log_softmax(logits)[index]`, given the row's [`log_normalizer`] `lse`.
fn log_softmax_at(logits: &[f32], index: usize, lse: f32) -> f32 {
    match logits.get(index).filter(|l| !l.is_nan()) {
        Some(&chosen) if lse != f32::NEG_INFINITY => chosen - lse,
        _ => f32::NEG_INFINITY,
    }
}

/// The `k` most likely tokens of `logits` (NaN never), most likely first, with their
/// log-probabilities given the row's [`log_normalizer`] `lse`.
fn top(logits: &[f32], k: usize, lse: f32) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut candidates: Vec<(u32, f32)> =
        logits.iter().enumerate().filter(|(_, l)| !l.is_nan()).map(|(i, &l)| (i as u32, l)).collect();
    if k < candidates.len() {
        keep_top_k(&mut candidates, k);
    }
    candidates.sort_unstable_by(by_logit_desc_then_id);
    candidates.into_iter().map(|(i, _)| (i, log_softmax_at(logits, i as usize, lse))).collect()
}

/// Total order: larger logit first, then lower token id (so ties resolve like greedy).
fn by_logit_desc_then_id(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Keeps the `k` largest candidates (ties to the lower id), in no particular order.
fn keep_top_k(candidates: &mut Vec<(u32, f32)>, k: usize) {
    candidates.select_nth_unstable_by(k - 1, by_logit_desc_then_id);
    candidates.truncate(k);
}

/// Unnormalised softmax weights `exp(l - max)` in f64, into `out`.
fn softmax_weights(candidates: &[(u32, f32)], out: &mut Vec<f64>) {
    out.clear();
    let max = candidates.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        // All candidates are -inf: fall back to uniform rather than 0/0.
        out.resize(candidates.len(), 1.0);
        return;
    }
    let max = f64::from(max);
    out.extend(candidates.iter().map(|c| (f64::from(c.1) - max).exp()));
}

/// Length of the smallest prefix of `sorted_weights` (descending) holding at least `top_p` of
/// the total mass; at least 1.
fn nucleus_len(sorted_weights: &[f64], top_p: f32) -> usize {
    let total: f64 = sorted_weights.iter().sum();
    let threshold = f64::from(top_p) * total;
    let mut cumulative = 0.0;
    for (i, w) in sorted_weights.iter().enumerate() {
        cumulative += w;
        if cumulative >= threshold {
            return i + 1;
        }
    }
    sorted_weights.len().max(1)
}

/// Index whose cumulative weight first exceeds `u * total`, `u` in [0, 1).
fn inverse_cdf(weights: &[f64], u: f64) -> usize {
    let total: f64 = weights.iter().sum();
    let target = u * total;
    let mut cumulative = 0.0;
    for (i, w) in weights.iter().enumerate() {
        cumulative += w;
        if cumulative > target {
            return i;
        }
    }
    // Rounding can leave `target` at the very top; the last token with weight takes it.
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

/// A seed for a request without one: distinct per request (counter) and per process (entropy
/// from std's randomly keyed hasher, so no extra dependency).
fn next_unseeded_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static PROCESS_ENTROPY: OnceLock<u64> = OnceLock::new();
    let entropy = *PROCESS_ENTROPY.get_or_init(|| RandomState::new().build_hasher().finish());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    splitmix64(entropy ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Why a sequence finished. Serialises lowercase ("length", "stop", "eos"); OpenAI responses
/// report EOS as "stop", see [`FinishReason::as_openai_str`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// `max_tokens` reached (or the context is full).
    Length,
    /// A stop string or a stop token id.
    Stop,
    /// The model emitted one of its EOS tokens.
    Eos,
}

impl FinishReason {
    /// The `finish_reason` of an OpenAI response: EOS and stop conditions are both "stop".
    pub fn as_openai_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop | FinishReason::Eos => "stop",
        }
    }
}

/// The end of a sequence: why, and the text to return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finish<'t> {
    pub reason: FinishReason,
    /// The output text: cut before a stop string, or before the text of a final EOS / stop
    /// token; the whole text for `Length`.
    pub text: &'t str,
}

/// Per-request stop conditions. Call [`StopChecker::check`] once per generated token with the
/// whole output so far; it remembers how far it searched, so each call costs O(new text).
#[derive(Clone, Debug)]
pub struct StopChecker {
    max_tokens: usize,
    eos_token_ids: Vec<u32>,
    stop_token_ids: Vec<u32>,
    stop: Vec<String>,
    /// Longest stop string, in bytes: a match can start at most this far before new text.
    longest_stop: usize,
    /// Text length at the previous call: where the last token's text begins.
    previous_len: usize,
}

impl StopChecker {
    /// `eos_token_ids` are the model's (tokenizer / generation config); ignored with `ignore_eos`.
    pub fn new(params: &SamplingParams, eos_token_ids: &[u32]) -> Self {
        StopChecker {
            max_tokens: params.max_tokens,
            eos_token_ids: if params.ignore_eos { Vec::new() } else { eos_token_ids.to_vec() },
            stop_token_ids: params.stop_token_ids.clone(),
            stop: params.stop.clone(),
            longest_stop: params.stop.iter().map(String::len).max().unwrap_or(0),
            previous_len: 0,
        }
    }

    /// Whether generation ends after the last of `token_ids`, given `text`, the decoded output so
    /// far (all generated tokens, special tokens skipped). `None` means continue.
    ///
    /// Precedence: EOS, then stop token ids, then stop strings, then `max_tokens`. The text of a
    /// final EOS / stop token (what `text` grew by since the previous call) is not returned, as
    /// in vLLM; the earliest stop string match wins and is cut with everything after it.
    pub fn check<'t>(&mut self, token_ids: &[u32], text: &'t str) -> Option<Finish<'t>> {
        let before_last_token = floor_char_boundary(text, self.previous_len.min(text.len()));
        let search_from = floor_char_boundary(text, self.previous_len.saturating_sub(self.longest_stop));
        self.previous_len = text.len();

        if let Some(&last) = token_ids.last() {
            if self.eos_token_ids.contains(&last) {
                return Some(Finish { reason: FinishReason::Eos, text: &text[..before_last_token] });
            }
            if self.stop_token_ids.contains(&last) {
                return Some(Finish { reason: FinishReason::Stop, text: &text[..before_last_token] });
            }
        }
        if let Some(at) = self.earliest_stop_string(text, search_from) {
            return Some(Finish { reason: FinishReason::Stop, text: &text[..at] });
        }
        if token_ids.len() >= self.max_tokens {
            return Some(Finish { reason: FinishReason::Length, text });
        }
        None
    }

    /// How much of `text` can be streamed now: everything but a suffix that could still grow into
    /// a stop string (which must never reach the client).
    pub fn streamable_len(&self, text: &str) -> usize {
        let held = self.stop.iter().map(|s| longest_suffix_that_prefixes(text, s)).max().unwrap_or(0);
        text.len() - held
    }

    fn earliest_stop_string(&self, text: &str, from: usize) -> Option<usize> {
        let window = &text[from..];
        self.stop.iter().filter_map(|s| window.find(s.as_str())).min().map(|at| from + at)
    }
}

/// Length of the longest proper prefix of `stop` that `text` ends with.
fn longest_suffix_that_prefixes(text: &str, stop: &str) -> usize {
    (1..stop.len()).rev().find(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k])).unwrap_or(0)
}

/// The largest char boundary of `s` at or below `index` (std's is unstable).
fn floor_char_boundary(s: &str, index: usize) -> usize {
    let mut i = index.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_skips_nan_and_prefers_lowest_id() {
        assert_eq!(argmax(&[f32::NAN, 1.0, 3.0, 3.0]), 2);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NAN]), 0);
    }

    #[test]
    fn nucleus_keeps_at_least_one() {
        assert_eq!(nucleus_len(&[0.5, 0.3, 0.2], 1e-9), 1);
        assert_eq!(nucleus_len(&[0.5, 0.3, 0.2], 0.75), 2);
        assert_eq!(nucleus_len(&[0.5, 0.3, 0.2], 0.85), 3);
    }

    #[test]
    fn floor_char_boundary_steps_back_over_multibyte() {
        let s = "aé";
        assert_eq!(floor_char_boundary(s, 2), 1);
        assert_eq!(floor_char_boundary(s, 3), 3);
        assert_eq!(floor_char_boundary(s, 10), 3);
    }
}
