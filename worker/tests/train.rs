//! Training jobs end to end on random-weight presets: resuming from a checkpoint is bit for bit
//! the uninterrupted run; jobs trained together in one multi-LoRA batch end where each job
//! trained alone ends; ESFT trains only its experts; the schedule and bad settings.

#![allow(clippy::unwrap_used)] // tests unwrap by design

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::{examples, hyper, lora, model, rel_diff, spec, values};
use tandem_worker::init_model::Preset;
use tandem_worker::train::checkpoint;
use tandem_worker::train::esft_select::select_experts;
use tandem_worker::train::job::{Hyperparams, Job, Method, Weights};
use tandem_worker::train::trainer::Trainer;

fn run(trainer: &mut Trainer<'_>, until: impl Fn(&Trainer<'_>) -> bool) {
    while !trainer.is_finished() && !until(trainer) {
        trainer.pass().unwrap();
    }
}

fn bits(job: &Job) -> Vec<Vec<u32>> {
    let mut out: Vec<Vec<u32>> = values(&job.weights).iter().map(|v| v.iter().map(|x| x.to_bits()).collect()).collect();
    for (m, v) in job.moments() {
        out.push(m.to_vec_f32().unwrap().iter().chain(&v.to_vec_f32().unwrap()).map(|x| x.to_bits()).collect());
    }
    out
}

#[test]
fn resume_from_checkpoint_is_bit_for_bit() {
    let model = model(Preset::Tiny);
    let data = examples(20, model.config.vocab_size, 1);
    // 20 examples in batches of 6 in microbatches of 4: steps of 4 + 2 sequences, and a short
    // last step of each epoch; 2 epochs = 8 steps.
    let job_spec = spec("r", lora(4, &["q_proj", "v_proj", "down_proj"]), hyper(6, 4, 1e-2, 7));
    let mut whole = Trainer::new(&model, vec![Job::new(job_spec.clone(), &model, data.clone()).unwrap()]);
    run(&mut whole, |_| false);
    assert_eq!(whole.jobs[0].progress.step, 8);

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("resume-checkpoints");
    let _ = std::fs::remove_dir_all(&dir);
    let mut first = Trainer::new(&model, vec![Job::new(job_spec, &model, data.clone()).unwrap()]);
    run(&mut first, |t| t.jobs[0].progress.step == 5 && t.jobs[0].at_step_boundary());
    let saved = checkpoint::save(&first.jobs[0], &model.config, &dir).unwrap();
    assert!(saved.ends_with("step-000005"));
    // A half-written checkpoint (a crash mid-save) is never taken for the newest one.
    std::fs::create_dir_all(dir.join("step-000009.tmp")).unwrap();
    assert_eq!(checkpoint::latest(&dir).unwrap().unwrap(), saved);
    drop(first);

    let resumed = checkpoint::load(&saved, &model.config, data.clone()).unwrap();
    let mut second = Trainer::new(&model, vec![resumed]);
    run(&mut second, |_| false);
    assert_eq!(second.jobs[0].progress, whole.jobs[0].progress);
    assert!(
        bits(&second.jobs[0]) == bits(&whole.jobs[0]),
        "resumed weights or moments differ from the uninterrupted run"
    );

    // The check can fail: resuming without the optimizer state ends elsewhere.
    let mut lossy = checkpoint::load(&saved, &model.config, data.clone()).unwrap();
    let fresh = Job::with_state(lossy.spec.clone(), lossy.weights, lossy.progress.clone(), None, data).unwrap();
    lossy = fresh;
    let mut third = Trainer::new(&model, vec![lossy]);
    run(&mut third, |_| false);
    assert!(bits(&third.jobs[0]) != bits(&whole.jobs[0]));
}

#[test]
fn jobs_trained_together_match_each_trained_alone() {
    for preset in [Preset::Tiny, Preset::TinyMoe] {
        let model = model(preset);
        let vocab = model.config.vocab_size;
        let mut specs = vec![
            (spec("a", lora(4, &["q_proj", "v_proj"]), hyper(4, 2, 1e-2, 1)), examples(12, vocab, 11)),
            (spec("b", lora(8, &["all-linear"]), hyper(3, 3, 5e-3, 2)), examples(9, vocab, 12)),
            (spec("c", lora(2, &["o_proj", "down_proj"]), hyper(5, 5, 2e-2, 3)), examples(13, vocab, 13)),
        ];
        if preset == Preset::TinyMoe {
            let experts = BTreeMap::from([(0, vec![1, 2]), (1, vec![5])]);
            specs.push((spec("esft", Method::Esft { experts }, hyper(4, 4, 1e-3, 4)), examples(10, vocab, 14)));
        }
        let jobs = || specs.iter().map(|(s, d)| Job::new(s.clone(), &model, d.clone()).unwrap()).collect::<Vec<_>>();
        let mut together = Trainer::new(&model, jobs());
        let mut passes = 0;
        while !together.is_finished() {
            let report = together.pass().unwrap();
            passes += 1;
            assert!(report.steps.iter().all(|s| s.loss.is_finite()));
        }
        let mut alone_passes = Vec::new();
        for (i, job) in jobs().into_iter().enumerate() {
            let steps = job.progress.total_steps;
            let mut alone = Trainer::new(&model, vec![job]);
            let mut n = 0;
            while !alone.is_finished() {
                alone.pass().unwrap();
                n += 1;
            }
            alone_passes.push(n);
            let together_job = &together.jobs[i];
            assert_eq!(together_job.progress.step, steps);
            let d = rel_diff(&together_job.weights, &alone.jobs[0].weights);
            eprintln!("{}/{}: together vs alone {d:.2e}", preset.name(), together_job.name());
            // Not bit for bit: a GEMM over a different set of rows may round differently, and
            // AdamW's normalisation turns last-bit differences of tiny gradients into visible
            // (still tiny) weight differences over the steps.
            assert!(d < 1e-4, "{}/{}: together vs alone differ by {d:.2e}", preset.name(), together_job.name());
            // And training moved the weights at all.
            let init = Job::new(specs[i].0.clone(), &model, specs[i].1.clone()).unwrap();
            assert!(rel_diff(&init.weights, &alone.jobs[0].weights) > 1e-3);
        }
        // One pass runs a microbatch of every job: together takes as many passes as the
        // longest job alone, not their sum.
        assert_eq!(passes, alone_passes.into_iter().max().unwrap());
    }
}

#[test]
fn esft_trains_only_its_experts_and_selection_follows_the_router() {
    let model = model(Preset::TinyMoe);
    let data = examples(16, model.config.vocab_size, 5);
    let all = select_experts(&model, &data, 1.0).unwrap();
    let some = select_experts(&model, &data, 0.3).unwrap();
    for (layer, chosen) in &some {
        let everything = &all[layer];
        assert!(!chosen.is_empty() && chosen.len() < everything.len(), "layer {layer}: {chosen:?} of {everything:?}");
        assert!(chosen.iter().all(|e| everything.contains(e)));
    }
    assert!(select_experts(&model, &data, 0.0).is_err());
    let method = Method::Esft { experts: some.clone() };
    let mut trainer =
        Trainer::new(&model, vec![Job::new(spec("e", method, hyper(8, 4, 1e-3, 0)), &model, data).unwrap()]);
    let first = trainer.pass().unwrap();
    assert!(first.steps.is_empty(), "the first of two microbatches takes no step");
    run(&mut trainer, |_| false);
    let Weights::Esft(e) = &trainer.jobs[0].weights else { panic!("not ESFT") };
    let trained: BTreeMap<usize, Vec<usize>> = e.experts.keys().fold(BTreeMap::new(), |mut m, &(l, x)| {
        m.entry(l).or_insert_with(Vec::new).push(x);
        m
    });
    assert_eq!(trained, some);
}

#[test]
fn schedule_warms_up_then_decays_and_bad_settings_are_refused() {
    let h = Hyperparams { lr: 1.0, warmup_ratio: 0.1, min_lr_ratio: 0.1, ..Hyperparams::default() };
    assert_eq!(h.lr_at(1, 100), 0.1);
    assert_eq!(h.lr_at(10, 100), 1.0);
    assert!((h.lr_at(55, 100) - 0.55).abs() < 1e-6);
    assert!((h.lr_at(100, 100) - 0.1).abs() < 1e-6);
    let model = model(Preset::Tiny);
    let data = examples(4, model.config.vocab_size, 0);
    for bad in [
        Hyperparams { lr: -1.0, ..Hyperparams::default() },
        Hyperparams { batch_size: 0, ..Hyperparams::default() },
        Hyperparams { warmup_ratio: 2.0, ..Hyperparams::default() },
        Hyperparams { beta2: 1.0, ..Hyperparams::default() },
    ] {
        assert!(Job::new(spec("x", lora(4, &["q_proj"]), bad), &model, data.clone()).is_err());
    }
    let err = Job::new(spec("x", lora(4, &["no_such_proj"]), Hyperparams::default()), &model, data.clone());
    assert!(err.err().unwrap().to_string().contains("match no module"));
    let err = Job::new(
        spec("x", Method::Esft { experts: BTreeMap::from([(0, vec![1])]) }, Hyperparams::default()),
        &model,
        data,
    );
    assert!(err.err().unwrap().to_string().contains("no experts"));
}
