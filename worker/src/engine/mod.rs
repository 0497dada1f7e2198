//! The inference engine of one process: continuous batching over a paged KV cache. Every step
//! builds one batch: first one decode token for each running sequence, then prefill chunks of
//! the sequences still reading their prompts, under a token budget; requests join as soon as
//! their KV pages (and their adapter's, when it is not resident) can be had and leave the moment
//! they finish. Each request may use a different adapter (or none) in the same batch; it holds
//! the adapter version it was submitted with until it finishes.

mod paged;
pub mod pool;

use std::collections::VecDeque;
use std::sync::Arc;

use tandem_kernels::DType;
use tandem_kernels::ops::SeqAttention;

use paged::PagedAdapters;
pub use paged::{CacheStats, adapter_pages};
use pool::{PagePool, PageUse, PoolUsage};

use crate::adapters::registry::{AdapterRegistry, AdapterVersion, Origin};
use crate::adapters::{Adapter, AdapterSet};
use crate::error::{Error, Result};
use crate::model::{ForwardInput, KvCache, Model};
use crate::sampling::{FinishReason, Sampler, SamplingParams, StopChecker};
use crate::tokenizer::TextTokenizer;

/// Sizes of the engine's cache and batches.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Pages of the unified pool (each one KV block of `block_size` tokens in every layer; KV
    /// blocks and resident adapters' weights share them).
    pub pages: usize,
    pub block_size: usize,
    /// Tokens one step may process (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Requests that may wait for admission; past this, [`Engine::submit`] refuses with
    /// [`Error::Overloaded`].
    pub max_waiting: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { pages: 512, block_size: 16, max_batch_tokens: 512, max_running: 64, max_waiting: 1024 }
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
    adapter: Option<Arc<AdapterVersion>>,
    sampler: Sampler,
    stop: StopChecker,
    logprobs: Vec<f32>,
}

pub struct Engine {
    model: Arc<Model>,
    cache: KvCache,
    pool: PagePool,
    paged: PagedAdapters,
    registry: AdapterRegistry,
    /// The packed adapters of the last batch, by adapter version id in slot order: reused while
    /// the batches use the same versions.
    batch_adapters: Option<(Vec<u64>, AdapterSet)>,
    tokenizer: Option<TextTokenizer>,
    eos: Vec<u32>,
    cfg: EngineConfig,
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
        if cfg.block_size == 0 || cfg.pages == 0 || cfg.max_batch_tokens == 0 || cfg.max_running == 0 {
            return Err(Error::InvalidRequest(format!("engine sizes must be positive: {cfg:?}")));
        }
        let model = model.into();
        let mut registry = AdapterRegistry::default();
        for (name, adapter) in adapters {
            if registry.resolve(&name).is_ok() {
                return Err(Error::InvalidRequest(format!("adapter {name:?} given twice")));
            }
            registry.publish(&name, adapter, Origin::Upload)?;
        }
        let cache = KvCache::new(&model, cfg.pages, cfg.block_size, DType::F32)?;
        let mut eos = model.config.eos_token_ids.clone();
        if let Some(t) = &tokenizer {
            eos.extend(t.eos_token_ids());
        }
        eos.sort_unstable();
        eos.dedup();
        Ok(Engine {
            model,
            cache,
            pool: PagePool::new(cfg.pages),
            paged: PagedAdapters::default(),
            registry,
            batch_adapters: None,
            tokenizer,
            eos,
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

    pub fn registry(&self) -> &AdapterRegistry {
        &self.registry
    }

    /// Publishes a new version of adapter `name` (or its first); requests submitted from now on
    /// use it, requests already submitted finish with the version they hold.
    pub fn publish_adapter(&mut self, name: &str, adapter: Adapter, origin: Origin) -> Result<Arc<AdapterVersion>> {
        let v = self.registry.publish(name, adapter, origin)?;
        self.paged.drop_unused(&mut self.pool);
        Ok(v)
    }

    /// Removes adapter `name`; requests already submitted on it finish.
    pub fn remove_adapter(&mut self, name: &str) -> Result<()> {
        self.registry.remove(name)?;
        self.paged.drop_unused(&mut self.pool);
        Ok(())
    }

    /// Pool pages in use by kind.
    pub fn pool_usage(&self) -> PoolUsage {
        self.pool.usage()
    }

    pub fn adapter_cache_stats(&self) -> CacheStats {
        self.paged.stats
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
        let capacity = (self.cfg.pages * self.cfg.block_size).min(c.max_position_embeddings);
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
        let adapter = req.adapter.as_deref().map(|name| self.registry.resolve(name)).transpose()?;
        let adapter_pages = adapter.as_ref().map_or(0, |v| adapter_pages(&v.adapter, c, self.cfg.block_size));
        if total.div_ceil(self.cfg.block_size) + adapter_pages > self.cfg.pages {
            return Err(Error::InvalidRequest(format!(
                "the request's KV cache plus its adapter need more than the {} pages of the pool",
                self.cfg.pages
            )));
        }
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err(Error::Overloaded(format!("{} requests are already waiting", self.waiting.len())));
        }
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
        self.admit()?;
        let (input, scheduled) = self.build_batch()?;
        if scheduled.is_empty() {
            return Ok(Vec::new());
        }
        let Some((_, adapters)) = &self.batch_adapters else {
            return Err(Error::InvalidRequest("engine: batch built without its adapters".into()));
        };
        let logits = self.model.forward(&input, &mut self.cache, adapters)?.to_vec_f32()?;
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
            let mut seq = self.running.swap_remove(i);
            self.pool.release(&seq.blocks, PageUse::Kv);
            if let Some(id) = seq.adapter.take().map(|v| v.id) {
                self.paged.release(id, &mut self.pool); // after dropping our hold on the version
            }
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

    /// Moves waiting requests into the running set, first come first served, while their KV
    /// pages (prompt plus `max_tokens`, reserved up front so nothing is ever preempted) and their
    /// adapter's pages fit, evicting idle adapters for room. Then pages in the adapters of the
    /// requests next in line, into free pages only.
    fn admit(&mut self) -> Result<()> {
        while self.running.len() < self.cfg.max_running {
            let Some(seq) = self.waiting.front() else { break };
            let need = (seq.prompt_len + seq.max_tokens).div_ceil(self.cfg.block_size);
            let adapter = seq.adapter.clone();
            if let Some(v) = &adapter
                && !self.paged.acquire(v, &mut self.pool, &mut self.cache)?
            {
                break;
            }
            let blocks = match self.paged.make_room(need, &mut self.pool) {
                true => self.pool.alloc(need, PageUse::Kv),
                false => None,
            };
            let Some(blocks) = blocks else {
                if let Some(v) = &adapter {
                    self.paged.release(v.id, &mut self.pool);
                }
                break;
            };
            let Some(mut seq) = self.waiting.pop_front() else { break };
            seq.blocks = blocks;
            self.running.push(seq);
        }
        for seq in self.waiting.iter().take(self.cfg.max_running) {
            if let Some(v) = &seq.adapter {
                self.paged.prefetch(v, &mut self.pool, &mut self.cache)?;
            }
        }
        Ok(())
    }

    /// Decode tokens first, then prefill chunks, within the token budget. Returns the batch and
    /// (running index, tokens scheduled) per sequence in batch order.
    /// The batch's adapters are packed (from their pages) into `batch_adapters`.
    fn build_batch(&mut self) -> Result<(ForwardInput, Vec<(usize, usize)>)> {
        let mut budget = self.cfg.max_batch_tokens;
        let mut ids: Vec<u64> = Vec::new();
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
            let slot = match &seq.adapter {
                None => -1,
                Some(v) => match ids.iter().position(|&id| id == v.id) {
                    Some(p) => p as i32,
                    None => {
                        ids.push(v.id);
                        ids.len() as i32 - 1
                    }
                },
            };
            input.adapters.extend(std::iter::repeat_n(slot, chunk));
            input.seqs.push(SeqAttention { q_len: chunk, context_len: end, block_table: seq.blocks.clone() });
            if end == seq.tokens.len() {
                input.logit_rows.push((input.tokens.len() - 1) as u32);
            }
            scheduled.push((i, chunk));
        }
        if self.batch_adapters.as_ref().is_none_or(|(cached, _)| *cached != ids) {
            let adapters = ids.iter().map(|&id| self.paged.load(id, &self.cache)).collect::<Result<Vec<_>>>()?;
            self.batch_adapters = Some((ids, AdapterSet::new(adapters, self.model.device)?));
        }
        Ok((input, scheduled))
    }
}
