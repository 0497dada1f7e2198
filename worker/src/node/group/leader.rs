//! Rank 0 of a worker group: a worker's engine loop (`service::serve`: orders between steps,
//! requests' text streamed after each step, jobs trained, checkpointed and exported) over rank
//! 0's shard, leading the group: the plan of every model call that holds collectives is
//! broadcast before the call runs (the engine calls [`PlanSink`]); while there is nothing to run
//! an idle plan goes out every [`super::plan_interval`], so the followers never wait a whole
//! collective timeout; and a failed step ends the loop (the group is broken: every request in
//! flight gets an error, the coordinator re-forms the group and queues its jobs again).
//!
//! The followers hold the adapter versions the plans name, by id: an uploaded one read from
//! its folder, a job's (LoRA or ESFT) sent as weights the first time a plan uses it. Rank 0 keeps track of
//! what they hold, and tells them to forget a version once nothing here holds it any more.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;
use tonic::Status;

use super::{Ended, GroupSpec, plan_interval};
use crate::adapters::Adapter;
use crate::adapters::registry::{AdapterVersion, Origin};
use crate::collective::Collective;
use crate::engine::Engine;
use crate::engine::group_plan::{AdapterRef, BatchPlan, ForwardPlan, Layout, PlanSink, TrainingRows, weight_bytes};
use crate::error::{Error, Result};
use crate::model::{ForwardInput, Model};
use crate::node::engine_thread::{EngineThread, Lead, Order, Streams, TrainEvents, serve};
use crate::tokenizer::TextTokenizer;
use crate::train::data::Example;

/// What rank 0 sends, and what the followers hold.
struct Plans {
    comm: Arc<dyn Collective>,
    last_sent: Instant,
    /// The adapter versions the followers hold, by id.
    held: HashMap<u64, Weak<AdapterVersion>>,
    /// Jobs' versions not sent yet, with their weights for the whole model.
    unsent: HashMap<u64, (Weak<AdapterVersion>, Adapter)>,
}

impl Plans {
    fn send(&mut self, plan: &BatchPlan) -> Result<()> {
        self.broadcast(plan.encode()?)
    }

    fn broadcast(&mut self, mut bytes: Vec<u8>) -> Result<()> {
        self.comm.broadcast_bytes(&mut bytes, 0)?;
        self.last_sent = Instant::now();
        Ok(())
    }

    /// How the followers find `versions`: those they do not hold yet are read from their folder
    /// or, for a job's, sent now.
    fn refs(&mut self, versions: &[Arc<AdapterVersion>]) -> Result<Vec<AdapterRef>> {
        let mut refs = Vec::with_capacity(versions.len());
        for v in versions {
            let mut uri = String::new();
            if !self.held.contains_key(&v.id) {
                match (&v.origin, self.unsent.remove(&v.id)) {
                    (_, Some((_, whole))) => {
                        self.send(&BatchPlan::Weights { id: v.id, layout: Layout::of(&whole) })?;
                        self.broadcast(weight_bytes(&whole)?)?;
                    }
                    (Origin::Upload { dir: Some(dir) }, None) => uri = dir.to_string_lossy().into_owned(),
                    _ => {
                        return Err(Error::InvalidRequest(format!(
                            "adapter {:?}: no way to give it to the group",
                            v.name
                        )));
                    }
                }
                self.held.insert(v.id, Arc::downgrade(v));
            }
            refs.push(AdapterRef { id: v.id, name: v.name.clone(), uri });
        }
        Ok(refs)
    }

    /// The versions the followers hold that nothing here holds any more (they are dropped from
    /// the books as they are named).
    fn forget(&mut self) -> Vec<u64> {
        self.unsent.retain(|_, (v, _)| v.strong_count() > 0);
        let gone: Vec<u64> = self.held.iter().filter(|(_, v)| v.strong_count() == 0).map(|(&id, _)| id).collect();
        for id in &gone {
            self.held.remove(id);
        }
        gone
    }
}

/// The engine's end of [`Plans`].
struct SharedPlans(Arc<Mutex<Plans>>);

fn lock(plans: &Mutex<Plans>) -> Result<std::sync::MutexGuard<'_, Plans>> {
    plans.lock().map_err(|_| Error::collective("the plan sender is poisoned (a thread panicked)"))
}

impl PlanSink for SharedPlans {
    fn forward(
        &mut self,
        input: &ForwardInput,
        adapters: &[Arc<AdapterVersion>],
        training: Option<TrainingRows>,
        traces: &[String],
    ) -> Result<()> {
        let mut plans = lock(&self.0)?;
        let refs = plans.refs(adapters)?;
        let mut plan = ForwardPlan::new(input, refs, training);
        plan.forget = plans.forget();
        plan.traces = traces.to_vec();
        plans.send(&BatchPlan::Forward(Box::new(plan)))
    }

    fn backward(&mut self, id: u64, layers: usize) -> Result<()> {
        lock(&self.0)?.send(&BatchPlan::Backward { id, layers })
    }

    fn validate(&mut self, adapter: &Arc<AdapterVersion>, examples: &[Example]) -> Result<()> {
        let mut plans = lock(&self.0)?;
        let Some(adapter) = plans.refs(std::slice::from_ref(adapter))?.pop() else { return Ok(()) };
        plans.send(&BatchPlan::Validate { adapter, examples: examples.to_vec() })
    }

    fn published(&mut self, v: &Arc<AdapterVersion>, whole: Adapter) {
        if let Ok(mut plans) = lock(&self.0) {
            plans.unsent.insert(v.id, (Arc::downgrade(v), whole));
        }
    }

    fn select_experts(&mut self, threshold: f32, examples: &[Example]) -> Result<()> {
        lock(&self.0)?.send(&BatchPlan::SelectExperts { threshold, examples: examples.to_vec() })
    }

    fn base_experts(&mut self, experts: &BTreeMap<usize, Vec<usize>>) -> Result<()> {
        lock(&self.0)?.send(&BatchPlan::BaseExperts { experts: experts.clone() })
    }
}

/// Starts rank 0's engine over `model` on a thread of its own; requests and jobs go to the
/// handle, the jobs' progress to `train_events`.
pub(super) fn start(
    spec: GroupSpec,
    model: Model,
    comm: Arc<dyn Collective>,
    tokenizer: Option<TextTokenizer>,
    train_events: TrainEvents,
    ended: UnboundedSender<Ended>,
) -> Result<EngineThread> {
    let mut engine = Engine::new(model, Vec::new(), tokenizer, spec.engine)?;
    let plans = Plans { comm, last_sent: Instant::now(), held: HashMap::new(), unsent: HashMap::new() };
    let plans = Arc::new(Mutex::new(plans));
    engine.lead_group(Box::new(SharedPlans(plans.clone())));
    let (handle, orders) = EngineThread::of(&engine);
    let name = format!("group-{}-rank0", spec.group);
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let result = run(&spec, engine, &orders, &train_events, &plans);
            let _ = ended.send(Ended::of(&spec, &result));
        })
        .map_err(|e| Error::collective(format!("cannot start rank 0's engine thread: {e}")))?;
    Ok(handle)
}

/// The loop, and its end: every request still in flight is told why; a group asked to stop
/// (every handle dropped) tells the followers to leave.
fn run(
    spec: &GroupSpec,
    mut engine: Engine,
    orders: &mpsc::Receiver<Order>,
    train_events: &TrainEvents,
    plans: &Arc<Mutex<Plans>>,
) -> Result<()> {
    let mut streams = Streams::default();
    let interval = plan_interval(&spec.options);
    let idle = plans.clone();
    let keep_alive = Box::new(move || {
        let mut p = lock(&idle)?;
        if p.last_sent.elapsed() >= interval { p.send(&BatchPlan::Idle) } else { Ok(()) }
    });
    let result = serve(&mut engine, orders, train_events, &mut streams, Some(Lead { interval, keep_alive }));
    let why = match &result {
        Ok(()) => format!("worker group {:?} (epoch {}) was re-formed or removed; retry", spec.group, spec.epoch),
        Err(e) => format!("worker group {:?} (epoch {}) failed: {e}", spec.group, spec.epoch),
    };
    streams.fail_all(&Status::unavailable(why));
    if result.is_ok() {
        let _ = lock(plans).and_then(|mut p| p.send(&BatchPlan::Stop));
    }
    result
}
