//! The inference engine of one process: continuous batching over a paged KV cache. Every step
//! builds one batch: first one decode token for each running sequence, then prefill chunks of
//! the sequences still reading their prompts, under a token budget; requests join as soon as
//! their KV blocks can be reserved and leave the moment they finish. Each request may use a
//! different adapter (or none) in the same batch.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tandem_kernels::DType;
use tandem_kernels::ops::SeqAttention;

use crate::adapters::{Adapter, AdapterSet};
use crate::error::{Error, Result};
use crate::model::{ForwardInput, KvCache, Model};
use crate::sampling::{FinishReason, Sampler, SamplingParams, StopChecker};
use crate::tokenizer::TextTokenizer;

/// Sizes of the engine's cache and batches.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// KV-cache blocks, and tokens per block.
    pub num_blocks: usize,
    pub block_size: usize,
    /// Tokens one step may process (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { num_blocks: 512, block_size: 16, max_batch_tokens: 512, max_running: 64 }
    }
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    /// Name of a loaded adapter, or `None` for the base model.
    pub adapter: Option<String>,
    pub params: SamplingParams,
}

/// A finished request.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationOutput {
    /// Index of the request in submission order.
    pub index: usize,
    pub prompt_tokens: usize,
    pub token_ids: Vec<u32>,
    /// Log-probability of each generated token (always computed; reporting is the caller's).
    pub logprobs: Vec<f32>,
    /// Decoded text (empty without a tokenizer), cut at a stop string.
    pub text: String,
    pub finish_reason: FinishReason,
}

struct Sequence {
    index: usize,
    prompt_len: usize,
    max_tokens: usize,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    adapter: i32,
    sampler: Sampler,
    stop: StopChecker,
    logprobs: Vec<f32>,
}

pub struct Engine {
    model: Arc<Model>,
    cache: KvCache,
    adapters: AdapterSet,
    adapter_slots: HashMap<String, i32>,
    tokenizer: Option<TextTokenizer>,
    eos: Vec<u32>,
    cfg: EngineConfig,
    free_blocks: Vec<u32>,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    submitted: usize,
}

impl Engine {
    /// An engine over `model` serving `adapters` (by name) and the base model.
    pub fn new(
        model: impl Into<Arc<Model>>,
        adapters: Vec<(String, Adapter)>,
        tokenizer: Option<TextTokenizer>,
        cfg: EngineConfig,
    ) -> Result<Self> {
        if cfg.block_size == 0 || cfg.num_blocks == 0 || cfg.max_batch_tokens == 0 || cfg.max_running == 0 {
            return Err(Error::InvalidRequest(format!("engine sizes must be positive: {cfg:?}")));
        }
        let model = model.into();
        let mut adapter_slots = HashMap::new();
        for (i, (name, _)) in adapters.iter().enumerate() {
            if adapter_slots.insert(name.clone(), i as i32).is_some() {
                return Err(Error::InvalidRequest(format!("adapter {name:?} given twice")));
            }
        }
        let set = AdapterSet::new(adapters.into_iter().map(|(_, a)| a).collect(), model.device)?;
        let cache = KvCache::new(&model, cfg.num_blocks, cfg.block_size, DType::F32)?;
        let mut eos = model.config.eos_token_ids.clone();
        if let Some(t) = &tokenizer {
            eos.extend(t.eos_token_ids());
        }
        eos.sort_unstable();
        eos.dedup();
        Ok(Engine {
            model,
            cache,
            adapters: set,
            adapter_slots,
            tokenizer,
            eos,
            free_blocks: (0..cfg.num_blocks as u32).rev().collect(),
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            submitted: 0,
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn tokenizer(&self) -> Option<&TextTokenizer> {
        self.tokenizer.as_ref()
    }

    /// Queues a request after checking it; returns its index.
    pub fn submit(&mut self, req: GenerationRequest) -> Result<usize> {
        req.params.validate()?;
        let c = &self.model.config;
        if req.prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::InvalidRequest(format!("token id {t} outside the vocabulary of {}", c.vocab_size)));
        }
        let total = req.prompt.len() + req.params.max_tokens;
        let capacity = (self.cfg.num_blocks * self.cfg.block_size).min(c.max_position_embeddings);
        if total > capacity {
            return Err(Error::InvalidRequest(format!(
                "prompt ({}) plus max_tokens ({}) exceeds the context of {capacity} tokens",
                req.prompt.len(),
                req.params.max_tokens
            )));
        }
        if !req.params.stop.is_empty() && self.tokenizer.is_none() {
            return Err(Error::InvalidRequest("stop strings need a tokenizer (tokenizer.json)".into()));
        }
        let adapter = match &req.adapter {
            None => -1,
            Some(name) => *self
                .adapter_slots
                .get(name)
                .ok_or_else(|| Error::InvalidRequest(format!("unknown adapter {name:?}")))?,
        };
        let index = self.submitted;
        self.submitted += 1;
        self.waiting.push_back(Sequence {
            index,
            prompt_len: req.prompt.len(),
            max_tokens: req.params.max_tokens,
            tokens: req.prompt,
            computed: 0,
            blocks: Vec::new(),
            adapter,
            sampler: Sampler::new(&req.params),
            stop: StopChecker::new(&req.params, &self.eos),
            logprobs: Vec::new(),
        });
        Ok(index)
    }

    /// Whether any request is queued or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Runs one batch; returns the requests that finished in it.
    pub fn step(&mut self) -> Result<Vec<GenerationOutput>> {
        self.admit();
        let (input, scheduled) = self.build_batch();
        if scheduled.is_empty() {
            return Ok(Vec::new());
        }
        let logits = self.model.forward(&input, &mut self.cache, &self.adapters)?.to_vec_f32()?;
        let vocab = self.model.config.vocab_size;
        let mut finished = Vec::new();
        let mut row = 0;
        for (i, chunk) in scheduled {
            let seq = &mut self.running[i];
            seq.computed += chunk;
            if seq.computed < seq.tokens.len() {
                continue; // a prefill chunk that did not reach the end of the prompt
            }
            let sampled = seq.sampler.sample(&logits[row * vocab..(row + 1) * vocab]);
            row += 1;
            seq.tokens.push(sampled.token);
            seq.logprobs.push(sampled.logprob);
            let generated = &seq.tokens[seq.prompt_len..];
            let text = match &self.tokenizer {
                Some(t) => t.decode(generated, true)?,
                None => String::new(),
            };
            if let Some(f) = seq.stop.check(generated, &text) {
                finished.push((i, f.reason, f.text.to_string()));
            }
        }
        // Remove finished sequences from the back so the indices stay valid.
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        let mut outputs = Vec::with_capacity(finished.len());
        for (i, reason, text) in finished {
            let seq = self.running.swap_remove(i);
            self.free_blocks.extend(&seq.blocks);
            outputs.push(GenerationOutput {
                index: seq.index,
                prompt_tokens: seq.prompt_len,
                token_ids: seq.tokens[seq.prompt_len..].to_vec(),
                logprobs: seq.logprobs,
                text,
                finish_reason: reason,
            });
        }
        Ok(outputs)
    }

    /// Runs until every queued request has finished; outputs in submission order.
    pub fn run_to_completion(&mut self) -> Result<Vec<GenerationOutput>> {
        let mut out = Vec::new();
        while self.has_work() {
            out.extend(self.step()?);
        }
        out.sort_by_key(|o| o.index);
        Ok(out)
    }

    /// Moves waiting requests into the running set, first come first served, while their
    /// blocks (prompt plus `max_tokens`, reserved up front so nothing is ever preempted) fit.
    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_running {
            let Some(seq) = self.waiting.front() else { break };
            let need = (seq.prompt_len + seq.max_tokens).div_ceil(self.cfg.block_size);
            if need > self.free_blocks.len() {
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else { break };
            seq.blocks = self.free_blocks.split_off(self.free_blocks.len() - need);
            self.running.push(seq);
        }
    }

    /// Decode tokens first, then prefill chunks, within the token budget. Returns the batch and
    /// (running index, tokens scheduled) per sequence in batch order.
    fn build_batch(&self) -> (ForwardInput, Vec<(usize, usize)>) {
        let mut budget = self.cfg.max_batch_tokens;
        let mut scheduled = Vec::new();
        let decoding = |s: &Sequence| s.computed >= s.prompt_len;
        let order = self
            .running
            .iter()
            .enumerate()
            .filter(|(_, s)| decoding(s))
            .chain(self.running.iter().enumerate().filter(|(_, s)| !decoding(s)));
        let mut input = ForwardInput::default();
        for (i, seq) in order {
            let chunk = (seq.tokens.len() - seq.computed).min(budget);
            if chunk == 0 {
                continue;
            }
            budget -= chunk;
            let (start, end) = (seq.computed, seq.computed + chunk);
            let bs = self.cfg.block_size;
            input.tokens.extend_from_slice(&seq.tokens[start..end]);
            input.positions.extend((start..end).map(|p| p as u32));
            input.slots.extend((start..end).map(|p| seq.blocks[p / bs] * bs as u32 + (p % bs) as u32));
            input.adapters.extend(std::iter::repeat_n(seq.adapter, chunk));
            input.seqs.push(SeqAttention { q_len: chunk, context_len: end, block_table: seq.blocks.clone() });
            if end == seq.tokens.len() {
                input.logit_rows.push((input.tokens.len() - 1) as u32);
            }
            scheduled.push((i, chunk));
        }
        (input, scheduled)
    }
}
