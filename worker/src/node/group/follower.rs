//! A rank other than 0: it receives each plan rank 0 broadcasts and makes the same model call
//! on its shard ([`Model::pass`], the same pass rank 0's engine runs), discarding what only
//! rank 0 needs: a forward pass (into its own KV cache, of the same geometry as rank 0's), more
//! layers of a backward pass (kept by id between plans, with the adapters of its forward pass),
//! a validation pass, or a new ESFT job's choice and copy of experts. The adapter versions the
//! plans name are read once from their folders or received as weights, against the whole
//! model, and cut for this shard; rank 0 says when to forget them. It leaves on a stop plan,
//! when asked (after the plan it waits for), or on an error.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tandem_kernels::{DType, Device, Tensor};
use tandem_proto::trace_context;
use tokio::sync::mpsc::UnboundedSender;

use super::{Ended, GroupSpec};
use crate::adapters::esft::{EsftAdapter, ExpertWeights};
use crate::adapters::peft::LoraAdapter;
use crate::adapters::{Adapter, AdapterSet};
use crate::collective::Collective;
use crate::engine::group_plan::{AdapterRef, BatchPlan, ForwardPlan, Layout};
use crate::error::{Error, Result};
use crate::model::{AdapterGrads, KvCache, Model, ModelConfig, PendingBackward};
use crate::node::engine_thread::read_adapter;
use crate::rng::Xoshiro256;
use crate::train::data::Example;
use crate::train::esft_select::select_experts;
use crate::train::trainer::validation_loss;

pub(super) fn start(
    spec: GroupSpec,
    model: Model,
    comm: Arc<dyn Collective>,
    stop: Arc<AtomicBool>,
    ended: UnboundedSender<Ended>,
) -> Result<()> {
    let cache = KvCache::new(&model, spec.engine.pages, spec.engine.block_size, DType::F32)?;
    let name = format!("group-{}-rank{}", spec.group, spec.rank);
    let mut follower = Follower {
        rank: spec.rank,
        model,
        cache,
        comm,
        adapters: HashMap::new(),
        set: None,
        backwards: HashMap::new(),
    };
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let result = follower.run(&stop);
            let _ = ended.send(Ended::of(&spec, &result));
        })
        .map_err(|e| Error::collective(format!("cannot start the follower thread: {e}")))?;
    Ok(())
}

struct Follower {
    rank: usize,
    model: Model,
    cache: KvCache,
    comm: Arc<dyn Collective>,
    /// The adapter versions the plans may name, cut for this shard, by id.
    adapters: HashMap<u64, Adapter>,
    /// The packed adapters of the last inference pass, by version id in slot order: reused
    /// while they match.
    set: Option<(Vec<u64>, AdapterSet)>,
    /// Fine-tuning rows whose backward is not finished, by id, with their forward's adapters.
    backwards: HashMap<u64, (PendingBackward, AdapterSet)>,
}

impl Follower {
    fn run(&mut self, stop: &AtomicBool) -> Result<()> {
        loop {
            match BatchPlan::decode(&self.receive()?)? {
                BatchPlan::Idle => {}
                BatchPlan::Stop => return Ok(()),
                BatchPlan::Weights { id, layout } => self.weights(id, layout)?,
                BatchPlan::Forward(plan) => {
                    // Its part of the pass, in the traces of the requests the pass serves.
                    let span = match plan.traces.is_empty() {
                        true => tracing::Span::none(),
                        false => tracing::info_span!("rank_forward", rank = self.rank, tokens = plan.tokens.len()),
                    };
                    trace_context::join_batch(&span, &plan.traces);
                    let _in = span.enter();
                    self.forward(*plan)?
                }
                BatchPlan::Backward { id, layers } => self.backward(id, layers)?,
                BatchPlan::Validate { adapter, examples } => self.validate(&adapter, &examples)?,
                // A new ESFT job's calls: rank 0 answers for the job; a call that fails before
                // its collectives fails alike on every rank (the same checks of the same
                // input), and only a collective's failure ends the follower.
                BatchPlan::SelectExperts { threshold, examples } => {
                    collective_only(select_experts(&self.model, &examples, threshold))?;
                }
                BatchPlan::BaseExperts { experts } => collective_only(self.model.base_experts(&experts))?,
            }
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
        }
    }

    fn receive(&self) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.comm.broadcast_bytes(&mut bytes, 0)?;
        Ok(bytes)
    }

    /// A job's version `id`: its weights, the next broadcast, laid out as `layout` says for
    /// the whole model.
    fn weights(&mut self, id: u64, layout: Layout) -> Result<()> {
        let bytes = self.receive()?;
        // (Made afresh each time: about as much work as reading the weights, once per version.)
        let layout = empty_adapter(self.model.whole_config(), layout)?;
        let mut values = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let mut tensors = Vec::new();
        for (_, t) in layout.weights() {
            let data: Vec<f32> = values.by_ref().take(t.elem_count()).collect();
            if data.len() != t.elem_count() {
                return Err(Error::Format(format!("adapter version {id}: rank 0 sent too few weights")));
            }
            tensors.push(Tensor::from_vec(data, t.shape().to_vec())?);
        }
        if bytes.len() % 4 != 0 || values.next().is_some() {
            return Err(Error::Format(format!("adapter version {id}: rank 0 sent more weights than its layout holds")));
        }
        let adapter = self.model.shard_adapter(&layout.with_weights(tensors)?)?;
        self.adapters.insert(id, adapter);
        Ok(())
    }

    fn adapter(&mut self, r: &AdapterRef) -> Result<Adapter> {
        if let Some(a) = self.adapters.get(&r.id) {
            return Ok(a.clone());
        }
        if r.uri.is_empty() {
            return Err(Error::InvalidRequest(format!("rank 0's plan names adapter {:?} it never gave", r.name)));
        }
        let adapter = read_adapter(&self.model, Path::new(&r.uri))?;
        self.adapters.insert(r.id, adapter.clone());
        Ok(adapter)
    }

    fn packed(&mut self, refs: &[AdapterRef]) -> Result<AdapterSet> {
        let adapters = refs.iter().map(|r| self.adapter(r)).collect::<Result<Vec<_>>>()?;
        AdapterSet::new(adapters, self.model.device)
    }

    /// The pass rank 0 runs: only its logits' all-gather and, for fine-tuning rows, their
    /// backward (kept for the plans that run it) matter here.
    fn forward(&mut self, plan: ForwardPlan) -> Result<()> {
        for id in &plan.forget {
            self.adapters.remove(id);
        }
        let input = plan.input();
        let Some(training) = plan.training else {
            let ids: Vec<u64> = plan.adapter_refs.iter().map(|r| r.id).collect();
            if self.set.as_ref().is_none_or(|(cached, _)| *cached != ids) {
                self.set = Some((ids, self.packed(&plan.adapter_refs)?));
            }
            let Some((_, set)) = &self.set else {
                return Err(Error::Internal("follower: no adapter set".into()));
            };
            self.model.pass(&input, &mut self.cache, set, None)?;
            return Ok(());
        };
        let set = self.packed(&plan.adapter_refs)?;
        let pass = self.model.pass(&input, &mut self.cache, &set, Some(&training.rows))?;
        let trained = pass.trained.ok_or_else(|| Error::Internal("follower: a training pass kept no rows".into()))?;
        self.backwards.insert(training.id, (trained.backward, set));
        Ok(())
    }

    fn backward(&mut self, id: u64, layers: usize) -> Result<()> {
        let Some((pending, set)) = self.backwards.get_mut(&id) else {
            return Err(Error::InvalidRequest(format!(
                "rank 0's plan names backward {id}, which is not in flight here"
            )));
        };
        // The gradients are gathered on every rank; only rank 0's jobs use them.
        let done = self.model.backward_layers(pending, &self.cache, set, &mut AdapterGrads::default(), layers)?;
        if done {
            self.backwards.remove(&id);
        }
        Ok(())
    }

    fn validate(&mut self, r: &AdapterRef, examples: &[Example]) -> Result<()> {
        let adapter = self.adapter(r)?;
        validation_loss(&self.model, adapter, examples)?;
        Ok(())
    }
}

/// `result`, its error only if a collective failed.
fn collective_only<T>(result: Result<T>) -> Result<()> {
    match result {
        Err(e @ Error::Collective { .. }) => Err(e),
        _ => Ok(()),
    }
}

/// An adapter of `layout` for a model of `config`, its weights to be replaced.
fn empty_adapter(config: &ModelConfig, layout: Layout) -> Result<Adapter> {
    Ok(match layout {
        Layout::Lora(peft) => Adapter::Lora(LoraAdapter::init(config, peft, &mut Xoshiro256::seed_from_u64(0))?),
        Layout::Esft(pairs) => {
            let mut experts = BTreeMap::new();
            for (layer, e) in pairs {
                let moe = config
                    .moe_at(layer)
                    .ok_or_else(|| Error::Format(format!("ESFT layout: layer {layer} has no experts")))?;
                let (inter, h) = (moe.expert_intermediate, config.hidden_size);
                let zeros = |shape: [usize; 2]| Tensor::zeros(shape.to_vec(), DType::F32, Device::Cpu);
                experts.insert(
                    (layer, e),
                    ExpertWeights { gate: zeros([inter, h])?, up: zeros([inter, h])?, down: zeros([h, inter])? },
                );
            }
            Adapter::Esft(EsftAdapter { experts })
        }
    })
}
