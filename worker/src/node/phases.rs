//! A request's phases on this worker as spans of its trace: the load of its adapter (with the
//! tier it came from), its queue wait, prefill and decode; and each optimizer step of a job as
//! a trace of its own. Recorded afterwards with the times the engine measured (it learns where
//! a phase ended only after the step that ended it).

use std::time::Instant;

use opentelemetry::KeyValue;
use tandem_proto::trace_context::Hindsight;

use crate::engine::{StepTrace, Timings};

/// Adapter `name` made ready for a request, from `tier` (`disk`, `host` or `resident`).
pub fn adapter_load(request: &tracing::Span, name: &str, tier: &'static str, start: Instant) {
    let attributes = vec![KeyValue::new("adapter", name.to_string()), KeyValue::new("tier", tier)];
    Hindsight::default().record(request, "adapter_load", (start, Instant::now()), attributes);
}

/// The queue wait, prefill and decode of a finished request.
pub fn finished(request: &tracing::Span, t: &Timings) {
    let spans = Hindsight::default();
    spans.record(request, "queue", (t.submitted, t.scheduled), Vec::new());
    spans.record(request, "prefill", (t.scheduled, t.first_token), Vec::new());
    let batches = vec![KeyValue::new("batches", i64::from(t.decode_batches))];
    spans.record(request, "decode", (t.first_token, t.finished), batches);
}

/// An optimizer step of a job: the step (`job`, `step`, `loss`), each microbatch whose
/// gradients it applied (`tokens`, from its forward pass to its gradients' hand-over), and under
/// each its `forward` pass and every slice of its `backward` (`layers`).
pub fn finetune_step(t: &StepTrace) {
    let (Some(start), Some(end)) =
        (t.microbatches.iter().map(|m| m.forward.0).min(), t.microbatches.iter().map(|m| m.done).max())
    else {
        return;
    };
    let spans = Hindsight::default();
    let attributes =
        vec![KeyValue::new("job", t.job.clone()), KeyValue::new("step", t.step as i64), KeyValue::new("loss", t.loss)];
    let step = spans.root("finetune_step", (start, end), attributes);
    for m in &t.microbatches {
        let tokens = vec![KeyValue::new("tokens", m.tokens as i64)];
        let microbatch = spans.child(&step, "microbatch", (m.forward.0, m.done), tokens);
        spans.child(&microbatch, "forward", m.forward, Vec::new());
        for &(start, end, layers) in &m.backward {
            spans.child(&microbatch, "backward", (start, end), vec![KeyValue::new("layers", layers as i64)]);
        }
    }
}
