//! `tandem bench coserve`: inference of many adapters and fine-tuning of several jobs on one
//! engine, in real time. Requests arrive as a Poisson process over adapters of power-law
//! popularity, at several rates; at each rate four ways of running are measured one after the
//! other on the same arrivals: (a) inference alone, (b) fine-tuning alone, (c) naive time
//! slicing (one fine-tuning step of the jobs, then a burst of inference, alternating) and (d)
//! Tandem's co-serving (one loop, fine-tuning in what the latency budget leaves).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use serde::Serialize;
use tandem_kernels::Device;
use tandem_worker::adapters::{Adapter, LoraAdapter};
use tandem_worker::engine::{Engine, EngineConfig, GenerationRequest};
use tandem_worker::init_model::{Preset, write_model};
use tandem_worker::model::Model;
use tandem_worker::rng::Xoshiro256;
use tandem_worker::sampling::SamplingParams;
use tandem_worker::train::job::{Hyperparams, Job, Method, TrainSpec};
use tandem_worker::train::trainer::Trainer;

use crate::bench_finetune::random_examples;

#[derive(Args)]
pub struct CoserveArgs {
    /// The CPU cannot hold interesting request rates on `qwen2.5-0.5b`; `small` can.
    #[arg(long, default_value = "small")]
    preset: String,
    /// Request rates to measure, requests per second.
    #[arg(long, value_delimiter = ',', default_values_t = [2.0, 5.0, 10.0, 20.0])]
    rates: Vec<f64>,
    /// Seconds of arrivals per measurement.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Adapters the requests choose from (Zipf popularity, exponent 1), and their rank.
    #[arg(long, default_value_t = 100)]
    adapters: usize,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    output_len: usize,
    /// Time-per-output-token target, milliseconds.
    #[arg(long, default_value_t = 50)]
    tpot_ms: u64,
    /// Fine-tuning jobs: LoRA of rank 16 on all linear layers, microbatches of one sequence
    /// of `job_seq_len` tokens, `job_accumulation` microbatches per optimizer step.
    #[arg(long, default_value_t = 4)]
    jobs: usize,
    #[arg(long, default_value_t = 64)]
    job_seq_len: usize,
    #[arg(long, default_value_t = 4)]
    job_accumulation: usize,
    /// Naive time slicing: seconds of inference between two fine-tuning steps.
    #[arg(long, default_value_t = 1.0)]
    slice_seconds: f64,
    /// Pages of the engine's pool (KV blocks of 16 tokens and adapter weights).
    #[arg(long, default_value_t = 512)]
    pages: usize,
    /// Where the model is written (reused when present).
    #[arg(long, default_value = "target/bench-coserve")]
    dir: PathBuf,
    /// Write the results as JSON here (for `bench/plot_coserve.py`).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One way of running, at one rate.
#[derive(Clone, Debug, Default, Serialize)]
struct Outcome {
    /// Share of output tokens (after each request's first) within the TPOT target.
    slo: f64,
    /// Fine-tuning tokens per second over the measured seconds.
    finetune_tps: f64,
    /// Share of the measured seconds the engine had no request to work on.
    idle: f64,
    ttft_p50: f64,
    tpot_p99: f64,
    requests: usize,
}

#[derive(Serialize)]
struct RateResult {
    rate: f64,
    inference_alone: Outcome,
    time_slicing: Outcome,
    coserving: Outcome,
}

#[derive(Serialize)]
struct Report {
    preset: String,
    tpot_target_s: f64,
    finetune_alone_tps: f64,
    rates: Vec<RateResult>,
}

pub fn run(args: CoserveArgs) -> Result<()> {
    let preset: Preset = args.preset.parse()?;
    if args.rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) || args.seconds <= 0.0 {
        bail!("rates and seconds must be positive");
    }
    let model_dir = args.dir.join(preset.to_string());
    if !model_dir.join("config.json").exists() {
        eprintln!("writing the {preset} model to {}", model_dir.display());
        write_model(preset, &model_dir, 0)?;
    }
    let model = Arc::new(Model::load(&model_dir, Device::Cpu)?);
    let adapters = adapters(&args, &model)?;
    println!(
        "tandem bench coserve: {preset}, {} adapters of rank {} (Zipf popularity), {} + {} tokens per request, \
         TPOT target {} ms; {} fine-tuning jobs (rank 16, all linear layers, {} x {} tokens per step); {} s per measurement",
        args.adapters,
        args.rank,
        args.prompt_len,
        args.output_len,
        args.tpot_ms,
        args.jobs,
        args.job_accumulation,
        args.job_seq_len,
        args.seconds
    );
    println!("machine: {}", crate::bench::machine());

    let alone = measure(&args, &model, &adapters, &[], Mode::FinetuneAlone)?;
    println!("(b) fine-tuning alone: {:.1} tokens/s", alone.finetune_tps);
    println!();
    println!(
        "{:>6} | {:>24} | {:>24} | {:>24} | {:>10}",
        "rate", "(a) inference alone", "(c) time slicing", "(d) co-serving", "FT target"
    );
    println!(
        "{:>6} | {:>11} {:>12} | {:>11} {:>12} | {:>11} {:>12} | {:>10}",
        "req/s", "SLO", "idle", "SLO", "FT tok/s", "SLO", "FT tok/s", "tok/s"
    );
    let mut rates = Vec::new();
    for &rate in &args.rates {
        let arrivals = arrivals(&args, rate);
        let a = measure(&args, &model, &adapters, &arrivals, Mode::InferenceAlone)?;
        let c = measure(&args, &model, &adapters, &arrivals, Mode::TimeSlicing)?;
        let d = measure(&args, &model, &adapters, &arrivals, Mode::Coserving)?;
        let ft_target = 0.8 * alone.finetune_tps * a.idle;
        println!(
            "{rate:>6.1} | {:>10.2}% {:>11.0}% | {:>10.2}% {:>12.1} | {:>10.2}% {:>12.1} | {:>10.1}",
            100.0 * a.slo,
            100.0 * a.idle,
            100.0 * c.slo,
            c.finetune_tps,
            100.0 * d.slo,
            d.finetune_tps,
            ft_target
        );
        rates.push(RateResult { rate, inference_alone: a, time_slicing: c, coserving: d });
    }
    println!();
    for r in &rates {
        let (a, d) = (&r.inference_alone, &r.coserving);
        if a.slo >= 0.99 {
            let ft_target = 0.8 * alone.finetune_tps * a.idle;
            println!(
                "rate {:.1}: (a) meets the target ({:.2}%); (d) {} it ({:.2}%), fine-tuning {:.1} tokens/s {} 80% of the idle capacity ({:.1})",
                r.rate,
                100.0 * a.slo,
                if d.slo >= 0.99 { "meets" } else { "MISSES" },
                100.0 * d.slo,
                d.finetune_tps,
                if d.finetune_tps >= ft_target { ">=" } else { "< (MISSED)" },
                ft_target
            );
        } else {
            println!("rate {:.1}: (a) itself misses the target ({:.2}%): no claim", r.rate, 100.0 * a.slo);
        }
    }
    let report = Report {
        preset: preset.to_string(),
        tpot_target_s: args.tpot_ms as f64 / 1e3,
        finetune_alone_tps: alone.finetune_tps,
        rates,
    };
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        println!("results written to {}", path.display());
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    InferenceAlone,
    FinetuneAlone,
    TimeSlicing,
    Coserving,
}

/// A request and when it arrives (seconds from the start).
struct Arrival {
    at: f64,
    request: GenerationRequest,
}

/// Poisson arrivals at `rate` over `args.seconds`, adapters drawn with Zipf(1) popularity.
fn arrivals(args: &CoserveArgs, rate: f64) -> Vec<Arrival> {
    let mut rng = Xoshiro256::seed_from_u64((rate * 1000.0) as u64);
    let weights: Vec<f64> = (1..=args.adapters).map(|k| 1.0 / k as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut out = Vec::new();
    let mut t = 0.0;
    loop {
        t += -(1.0 - rng.uniform_f32(0.0, 1.0) as f64).max(1e-12).ln() / rate;
        if t >= args.seconds {
            return out;
        }
        let mut pick = rng.uniform_f32(0.0, 1.0) as f64 * total;
        let adapter = weights.iter().position(|w| {
            pick -= w;
            pick <= 0.0
        });
        let prompt = (0..args.prompt_len).map(|_| 1 + rng.below(200) as u32).collect();
        let params = SamplingParams {
            max_tokens: args.output_len,
            temperature: 0.0,
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let adapter = Some(format!("a{}", adapter.unwrap_or(args.adapters - 1)));
        out.push(Arrival { at: t, request: GenerationRequest { prompt, adapter, params } });
    }
}

fn adapters(args: &CoserveArgs, model: &Model) -> Result<Vec<(String, Adapter)>> {
    let config = serde_json::json!({
        "r": args.rank,
        "lora_alpha": 2 * args.rank,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    });
    (0..args.adapters)
        .map(|i| {
            let mut rng = Xoshiro256::seed_from_u64(5000 + i as u64);
            let a = LoraAdapter::init_random(&model.config, config.clone(), &mut rng, 0.05)?;
            Ok((format!("a{i}"), Adapter::Lora(a)))
        })
        .collect()
}

fn jobs(args: &CoserveArgs, model: &Model) -> Result<Vec<Job>> {
    (0..args.jobs)
        .map(|j| {
            let data = random_examples(4096, args.job_seq_len, model.config.vocab_size, 700 + j as u64);
            let spec = TrainSpec {
                name: format!("job{j}"),
                method: Method::Lora { rank: 16, alpha: 32.0, targets: vec!["all-linear".into()], rslora: false },
                hyper: Hyperparams {
                    epochs: 1,
                    batch_size: args.job_accumulation,
                    micro_batch_size: 1,
                    lr: 1e-4,
                    warmup_ratio: 0.0,
                    seed: j as u64,
                    ..Hyperparams::default()
                },
            };
            Ok(Job::new(spec, model, data)?)
        })
        .collect()
}

/// Runs one way of serving over `arrivals` in real time for `args.seconds` (then lets the
/// requests still running finish, fine-tuning stopped, so every request's latency counts).
fn measure(
    args: &CoserveArgs,
    model: &Arc<Model>,
    adapters: &[(String, Adapter)],
    arrivals: &[Arrival],
    mode: Mode,
) -> Result<Outcome> {
    let target = Duration::from_millis(args.tpot_ms);
    let cfg = EngineConfig {
        pages: args.pages,
        block_size: 16,
        max_batch_tokens: 256,
        max_running: 32,
        max_waiting: 4096,
        tpot_target: target,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(model.clone(), adapters.to_vec(), None, cfg)?;
    let mut trainer = None;
    match mode {
        Mode::Coserving | Mode::FinetuneAlone => {
            for job in jobs(args, model)? {
                engine.add_job(job)?;
            }
        }
        Mode::TimeSlicing => trainer = Some(Trainer::new(model, jobs(args, model)?)),
        Mode::InferenceAlone => {}
    }
    let start = Instant::now();
    let (mut next, mut idle, mut finetune_tokens) = (0, 0.0, 0usize);
    let mut next_slice = 0.0;
    let mut job_names: Vec<String> = engine.metrics().jobs.into_keys().collect();
    loop {
        let now = start.elapsed().as_secs_f64();
        let measuring = now < args.seconds;
        if !measuring {
            // Time is up: fine-tuning stops, the requests still running finish.
            for name in job_names.drain(..) {
                engine.cancel_job(&name)?;
            }
            if !engine.has_work() && next >= arrivals.len() {
                break;
            }
        }
        while next < arrivals.len() && arrivals[next].at <= now {
            engine.submit(arrivals[next].request.clone())?;
            next += 1;
        }
        if let (Some(t), true) = (trainer.as_mut(), measuring && now >= next_slice) {
            // Naive time slicing: one optimizer step of the jobs, then a slice of inference.
            loop {
                let pass = t.pass()?;
                finetune_tokens += pass.tokens;
                if !pass.steps.is_empty() || t.is_finished() {
                    break;
                }
            }
            next_slice = start.elapsed().as_secs_f64() + args.slice_seconds;
            continue;
        }
        if engine.has_work() {
            let had_requests = engine.has_requests();
            let t0 = Instant::now();
            engine.step()?;
            if !had_requests && measuring {
                idle += t0.elapsed().as_secs_f64();
            }
        } else {
            // Nothing to do until the next arrival (or the next fine-tuning slice).
            let mut wait = arrivals.get(next).map_or(0.001, |a| a.at - now);
            if measuring {
                wait = wait.min(args.seconds - now);
                if trainer.is_some() {
                    wait = wait.min(next_slice - now);
                }
            }
            let wait = wait.max(0.0001);
            if measuring {
                idle += wait;
            }
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }
    let m = engine.metrics();
    if mode != Mode::TimeSlicing {
        finetune_tokens = m.tokens.finetune as usize;
    }
    Ok(Outcome {
        slo: m.slo_attainment(),
        finetune_tps: finetune_tokens as f64 / args.seconds,
        idle: (idle / args.seconds).min(1.0),
        ttft_p50: m.time_to_first_token.p50,
        tpot_p99: m.time_per_output_token.p99,
        requests: arrivals.len(),
    })
}
