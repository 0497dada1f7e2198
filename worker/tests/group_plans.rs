//! An engine that leads a worker group hands every forward pass's plan to its sink before the
//! pass runs. The plans are complete: replayed on another copy of the model (its own KV cache,
//! the adapters the plans name), through their bytes, they give the logits the engine sampled
//! from; the sink changes nothing the engine answers; and a new ESFT job's choice and copy of
//! experts are planned before they run (training on groups: `group_training.rs`).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tandem_kernels::DType;
use tandem_worker::adapters::registry::AdapterVersion;
use tandem_worker::adapters::{Adapter, AdapterSet};
use tandem_worker::engine::group_plan::{AdapterRef, BatchPlan, ForwardPlan, PlanSink, TrainingRows};
use tandem_worker::engine::{Engine, EngineConfig, GenerationRequest};
use tandem_worker::init_model::Preset;
use tandem_worker::model::probe::mixed_adapters;
use tandem_worker::model::{ForwardInput, KvCache};
use tandem_worker::sampling::SamplingParams;
use tandem_worker::train::data::Example;
use tandem_worker::train::finetune::MethodChoice;
use tandem_worker::train::job::Method;

/// Keeps every forward and ESFT set-up plan, as the bytes a follower would get.
struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

impl PlanSink for Recorder {
    fn forward(
        &mut self,
        input: &ForwardInput,
        adapters: &[Arc<AdapterVersion>],
        training: Option<TrainingRows>,
        _: &[String],
    ) -> tandem_worker::Result<()> {
        let refs = adapters.iter().map(|v| AdapterRef { id: v.id, name: v.name.clone(), uri: String::new() }).collect();
        self.0.lock().unwrap().push(BatchPlan::Forward(Box::new(ForwardPlan::new(input, refs, training))).encode()?);
        Ok(())
    }

    fn backward(&mut self, _: u64, _: usize) -> tandem_worker::Result<()> {
        Ok(())
    }

    fn validate(&mut self, _: &Arc<AdapterVersion>, _: &[Example]) -> tandem_worker::Result<()> {
        Ok(())
    }

    fn published(&mut self, _: &Arc<AdapterVersion>, _: Adapter) {}

    fn select_experts(&mut self, threshold: f32, examples: &[Example]) -> tandem_worker::Result<()> {
        let plan = BatchPlan::SelectExperts { threshold, examples: examples.to_vec() };
        self.0.lock().unwrap().push(plan.encode()?);
        Ok(())
    }

    fn base_experts(&mut self, experts: &BTreeMap<usize, Vec<usize>>) -> tandem_worker::Result<()> {
        self.0.lock().unwrap().push(BatchPlan::BaseExperts { experts: experts.clone() }.encode()?);
        Ok(())
    }
}

fn request(prompt: Vec<u32>, adapter: Option<&str>) -> GenerationRequest {
    let params = SamplingParams { max_tokens: 10, temperature: 0.0, ignore_eos: true, ..SamplingParams::default() };
    GenerationRequest { prompt, adapter: adapter.map(str::to_string), params }
}

#[test]
fn replayed_plans_give_the_logits_the_engine_sampled_from() {
    let model = Arc::new(common::model(Preset::Tiny));
    let adapter = mixed_adapters(&model).unwrap().remove(0);
    // Small batches, so the prompt is read in several chunks.
    let cfg = EngineConfig { max_batch_tokens: 16, ..EngineConfig::default() };
    let engine = |adapters: Vec<(String, Adapter)>| Engine::new(model.clone(), adapters, None, cfg).unwrap();
    let prompt: Vec<u32> = (0..37).map(|i| (i * 7 + 3) % 500).collect();

    let plans = Arc::new(Mutex::new(Vec::new()));
    let mut leader = engine(vec![("a".into(), adapter.clone())]);
    leader.lead_group(Box::new(Recorder(plans.clone())));
    leader.submit(request(prompt.clone(), Some("a"))).unwrap();
    let out = leader.run_to_completion().unwrap().remove(0);
    // The same request without a sink: the same answer.
    let mut alone = engine(vec![("a".into(), adapter.clone())]);
    alone.submit(request(prompt, Some("a"))).unwrap();
    assert_eq!(alone.run_to_completion().unwrap().remove(0).token_ids, out.token_ids);

    // Replayed: every plan with a logit row gives the next token the engine sampled.
    let adapters = HashMap::from([("a".to_string(), adapter)]);
    let mut cache = KvCache::new(&model, cfg.pages, cfg.block_size, DType::F32).unwrap();
    let mut sampled = Vec::new();
    let plans = plans.lock().unwrap();
    assert!(plans.len() > 10, "the prompt in chunks, then one pass per token: {} plans", plans.len());
    for bytes in plans.iter() {
        let BatchPlan::Forward(plan) = BatchPlan::decode(bytes).unwrap() else { panic!("not a forward plan") };
        let set = plan.adapter_refs.iter().map(|r| adapters[&r.name].clone()).collect();
        let set = AdapterSet::new(set, model.device).unwrap();
        let logits = model.forward(&plan.input(), &mut cache, &set).unwrap().to_vec_f32().unwrap();
        let vocab = model.config.vocab_size;
        for row in logits.chunks(vocab) {
            let best = (0..vocab).max_by(|&i, &j| row[i].total_cmp(&row[j])).unwrap();
            sampled.push(best as u32);
        }
    }
    assert_eq!(sampled, out.token_ids);
}

#[test]
fn a_new_esft_job_plans_its_choice_and_copy_of_experts() {
    let model = Arc::new(common::model(Preset::TinyMoe));
    let plans = Arc::new(Mutex::new(Vec::new()));
    let mut e = Engine::new(model.clone(), vec![], None, EngineConfig::default()).unwrap();
    e.lead_group(Box::new(Recorder(plans.clone())));
    let data = common::examples(8, model.config.vocab_size, 1);
    let esft = MethodChoice::Esft { experts: None, threshold: 0.4 };
    e.add_new_job("j", &esft, common::hyper(4, 4, 1e-3, 1), data.clone()).unwrap();
    let Method::Esft { experts } = &e.job("j").unwrap().spec.method else { panic!("not an ESFT job") };
    let plans: Vec<BatchPlan> = plans.lock().unwrap().iter().map(|b| BatchPlan::decode(b).unwrap()).collect();
    assert_eq!(
        plans,
        [
            BatchPlan::SelectExperts { threshold: 0.4, examples: data.to_vec() },
            BatchPlan::BaseExperts { experts: experts.clone() },
        ]
    );
    // A job refused before it touches the model plans nothing (no follower starts a call).
    let plans = Arc::new(Mutex::new(Vec::new()));
    e.lead_group(Box::new(Recorder(plans.clone())));
    let bad = common::hyper(4, 4, -1.0, 1);
    assert!(e.add_new_job("k", &esft, bad, data).is_err());
    assert!(plans.lock().unwrap().is_empty());
}
