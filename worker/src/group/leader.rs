//! Rank 0 of a worker group: the engine loop of `service.rs` (orders between steps, every
//! request's text streamed after each step), over rank 0's shard, with three differences: each
//! forward pass's plan is broadcast before it runs (the engine calls [`PlanSink::forward`]);
//! while there is nothing to run an idle plan goes out every [`super::plan_interval`], so the
//! followers never wait a whole collective timeout; and a failed step ends the loop (the group
//! is broken: every request in flight gets an error, the coordinator re-forms the group).

use std::collections::HashMap;
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use tonic::Status;

use super::{Ended, GroupSpec, plan_interval};
use crate::adapters::registry::AdapterVersion;
use crate::collective::Collective;
use crate::engine::Engine;
use crate::engine::group_plan::{AdapterRef, BatchPlan, ForwardPlan, PlanSink};
use crate::error::{Error, Result};
use crate::model::{ForwardInput, Model};
use crate::service::{EngineThread, Order, Streams};
use crate::tokenizer::TextTokenizer;

/// What rank 0 sends, and when it last did.
struct Plans {
    comm: Arc<dyn Collective>,
    /// Where each adapter the engine loaded came from, by its engine name: followers load it
    /// from there.
    uris: HashMap<String, String>,
    last_sent: Instant,
}

impl Plans {
    fn send(&mut self, plan: &BatchPlan) -> Result<()> {
        let mut bytes = plan.encode()?;
        self.comm.broadcast_bytes(&mut bytes, 0).map_err(|e| Error::Collective(e.to_string()))?;
        self.last_sent = Instant::now();
        Ok(())
    }
}

/// The engine's end of [`Plans`].
struct SharedPlans(Arc<Mutex<Plans>>);

fn lock(plans: &Mutex<Plans>) -> Result<std::sync::MutexGuard<'_, Plans>> {
    plans.lock().map_err(|_| Error::Collective("the plan sender is poisoned (a thread panicked)".into()))
}

impl PlanSink for SharedPlans {
    fn forward(&mut self, input: &ForwardInput, adapters: &[Arc<AdapterVersion>]) -> Result<()> {
        let mut plans = lock(&self.0)?;
        let refs = (adapters.iter())
            .map(|v| AdapterRef { name: v.name.clone(), uri: plans.uris.get(&v.name).cloned().unwrap_or_default() })
            .collect();
        plans.send(&BatchPlan::Forward(ForwardPlan::new(input, refs)))
    }
}

/// Starts rank 0's engine over `model` on a thread of its own; requests go to the handle.
pub(super) fn start(
    spec: GroupSpec,
    model: Model,
    comm: Arc<dyn Collective>,
    tokenizer: Option<TextTokenizer>,
    ended: UnboundedSender<Ended>,
) -> Result<EngineThread> {
    let mut engine = Engine::new(model, Vec::new(), tokenizer, spec.engine)?;
    let plans = Arc::new(Mutex::new(Plans { comm, uris: HashMap::new(), last_sent: Instant::now() }));
    engine.lead_group(Box::new(SharedPlans(plans.clone())));
    let (orders, rx) = mpsc::channel();
    let name = format!("group-{}-rank0", spec.group);
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let result = run(&spec, engine, &rx, &plans);
            let _ = ended.send(Ended::of(&spec, &result));
        })
        .map_err(|e| Error::Collective(format!("cannot start rank 0's engine thread: {e}")))?;
    Ok(EngineThread::over(orders))
}

/// The loop, and its end: every request still in flight is told why; a group asked to stop
/// (every handle dropped) tells the followers to leave.
fn run(spec: &GroupSpec, mut engine: Engine, orders: &mpsc::Receiver<Order>, plans: &Mutex<Plans>) -> Result<()> {
    let mut streams = Streams::default();
    let result = serve(&mut engine, orders, plans, plan_interval(&spec.options), &mut streams);
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

fn serve(
    engine: &mut Engine,
    orders: &mpsc::Receiver<Order>,
    plans: &Mutex<Plans>,
    interval: Duration,
    streams: &mut Streams,
) -> Result<()> {
    loop {
        let mut next = if engine.has_work() {
            match orders.try_recv() {
                Ok(order) => Some(order),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => return Ok(()),
            }
        } else {
            match orders.recv_timeout(interval) {
                Ok(order) => Some(order),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        };
        while let Some(order) = next.take() {
            match order {
                Order::Generate { req, events } => {
                    // Where the adapter comes from, for the plans that name it.
                    if !req.adapter.is_empty() && !req.adapter_uri.is_empty() {
                        lock(plans)?.uris.insert(req.adapter.clone(), req.adapter_uri.clone());
                    }
                    streams.submit(engine, &req, events);
                }
                // The jobs agent does not run on group workers; an order that still comes is
                // refused by the engine (no fine-tuning on groups yet) and dropped here.
                Order::Train(t) => {
                    if let Err(e) = engine.add_job(t.job) {
                        eprintln!("worker group: {e}");
                    }
                }
                Order::Stop(_) => {}
            }
            next = orders.try_recv().ok();
        }
        streams.cancel_abandoned(engine);
        if engine.has_work() {
            let finished = engine.step()?;
            streams.deliver(engine, finished);
        }
        // The followers wait for the next plan only so long: tell them the group lives.
        let mut p = lock(plans)?;
        if p.last_sent.elapsed() >= interval {
            p.send(&BatchPlan::Idle)?;
        }
    }
}
