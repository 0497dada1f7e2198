//! A rank other than 0: it receives each plan rank 0 broadcasts and runs the same forward
//! pass on its shard (the hidden states into its own KV cache, of the same geometry as rank
//! 0's, then the logits, whose all-gather it must join), discarding the result. The adapters
//! the plans name are read once from their folders, against the whole model, and cut for this
//! shard. It leaves on a stop plan, when asked (after the plan it waits for), or on an error.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tandem_kernels::DType;
use tokio::sync::mpsc::UnboundedSender;

use super::{Ended, GroupSpec};
use crate::adapters::{Adapter, AdapterSet};
use crate::collective::Collective;
use crate::engine::group_plan::{AdapterRef, BatchPlan, ForwardPlan};
use crate::error::{Error, Result};
use crate::model::{KvCache, Model};
use crate::service::read_adapter;

pub(super) fn start(
    spec: GroupSpec,
    model: Model,
    comm: Arc<dyn Collective>,
    stop: Arc<AtomicBool>,
    ended: UnboundedSender<Ended>,
) -> Result<()> {
    let cache = KvCache::new(&model, spec.engine.pages, spec.engine.block_size, DType::F32)?;
    let name = format!("group-{}-rank{}", spec.group, spec.rank);
    let mut follower = Follower { model, cache, comm, adapters: HashMap::new(), set: None };
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let result = follower.run(&stop);
            let _ = ended.send(Ended::of(&spec, &result));
        })
        .map_err(|e| Error::Collective(format!("cannot start the follower thread: {e}")))?;
    Ok(())
}

struct Follower {
    model: Model,
    cache: KvCache,
    comm: Arc<dyn Collective>,
    /// Adapters read so far, cut for this shard, by engine name.
    adapters: HashMap<String, Adapter>,
    /// The packed adapters of the last pass, by name in slot order: reused while they match.
    set: Option<(Vec<String>, AdapterSet)>,
}

impl Follower {
    fn run(&mut self, stop: &AtomicBool) -> Result<()> {
        loop {
            let mut bytes = Vec::new();
            self.comm.broadcast_bytes(&mut bytes, 0).map_err(|e| Error::Collective(e.to_string()))?;
            match BatchPlan::decode(&bytes)? {
                BatchPlan::Idle => {}
                BatchPlan::Stop => return Ok(()),
                BatchPlan::Forward(plan) => self.forward(&plan)?,
            }
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
        }
    }

    fn forward(&mut self, plan: &ForwardPlan) -> Result<()> {
        let names: Vec<String> = plan.adapter_refs.iter().map(|r| r.name.clone()).collect();
        if self.set.as_ref().is_none_or(|(cached, _)| *cached != names) {
            let adapters = (plan.adapter_refs.iter()).map(|r| self.adapter(r)).collect::<Result<Vec<_>>>()?;
            self.set = Some((names, AdapterSet::new(adapters, self.model.device)?));
        }
        let Some((_, set)) = &self.set else { return Err(Error::InvalidRequest("follower: no adapter set".into())) };
        let input = plan.input();
        let hidden = self.model.hidden_states(&input, &mut self.cache, set, &mut drop)?;
        self.model.logits(&hidden, &input.logit_rows)?;
        Ok(())
    }

    fn adapter(&mut self, r: &AdapterRef) -> Result<Adapter> {
        if let Some(a) = self.adapters.get(&r.name) {
            return Ok(a.clone());
        }
        if r.uri.is_empty() {
            return Err(Error::InvalidRequest(format!("rank 0's plan names adapter {:?} without its folder", r.name)));
        }
        let adapter = read_adapter(&self.model, Path::new(&r.uri))?;
        self.adapters.insert(r.name.clone(), adapter.clone());
        Ok(adapter)
    }
}
