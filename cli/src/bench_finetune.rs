//! `tandem bench finetune`: LoRA training throughput and memory on a random-weight model,
//! against transformers + PEFT + torch on the same model and batch (the peer script
//! `bench/peft_finetune.py`), and several small jobs trained in one batch against the same jobs
//! trained one after another. Each measurement runs in its own process (this binary, again,
//! with `--child`), so each peak RSS is its own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use tandem_kernels::Device;
use tandem_worker::init_model::{Preset, write_model};
use tandem_worker::model::{Model, ModelConfig};
use tandem_worker::rng::Xoshiro256;
use tandem_worker::train::data::Example;
use tandem_worker::train::job::{Hyperparams, Job, Method, TrainSpec};
use tandem_worker::train::trainer::Trainer;

use crate::bench::{Floor, check_floor_names, check_floors};
use crate::bench_serve::{Peaks, peak_rss, peaks};

#[derive(Args)]
pub struct FinetuneArgs {
    #[arg(long, default_value = "qwen2.5-0.5b")]
    preset: String,
    /// LoRA rank, on every linear layer.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Sequences per step, and their length.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Timed optimizer steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// The many-jobs measurement: jobs, each one sequence of `job_seq_len` tokens per step,
    /// `job_steps` steps each.
    #[arg(long, default_value_t = 4)]
    jobs: usize,
    #[arg(long, default_value_t = 64)]
    job_seq_len: usize,
    #[arg(long, default_value_t = 6)]
    job_steps: usize,
    /// The many-jobs measurement's two runs alternate this many times, and each keeps its
    /// fastest: other work on a shared machine only ever slows a run down.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Where the model is written (reused when present).
    #[arg(long, default_value = "target/bench-finetune")]
    dir: PathBuf,
    /// Python with transformers + peft + torch (e.g. tools/oracle/.venv/bin/python) for the peer.
    #[arg(long)]
    peer_python: Option<PathBuf>,
    /// Internal: run one measurement (`single`, `together`, `sequential`) and print it as JSON.
    #[arg(long, hide = true)]
    child: Option<String>,
    #[arg(long = "floor", value_name = "RATIO=MIN")]
    floors: Vec<Floor>,
}

/// The ratios `bench finetune` reports, higher is better: the small jobs' tokens/s trained in
/// one batch over one after another, and tokens/s over the peer's (only with `--peer-python`).
const RATIOS: [&str; 2] = ["batch/sequential", "tandem/peer"];

pub fn run(args: FinetuneArgs) -> Result<()> {
    let preset: Preset = args.preset.parse()?;
    let model_dir = args.dir.join(preset.to_string());
    if let Some(what) = &args.child {
        let m = measure(&args, &model_dir, what)?;
        println!("{}", json!({ "seconds": m.0, "tokens": m.1, "peak_rss_bytes": peak_rss()? }));
        return Ok(());
    }
    check_floor_names(&args.floors, &RATIOS)?;
    if !model_dir.join("config.json").exists() {
        eprintln!("writing the {preset} model to {}", model_dir.display());
        write_model(preset, &model_dir, 0)?;
    }
    let cfg = ModelConfig::load(&model_dir)?;
    println!(
        "tandem bench finetune: {preset}, LoRA rank {} on all linear layers, AdamW, batch {} x {} tokens, {} timed steps",
        args.rank, args.batch, args.seq_len, args.steps
    );
    println!("machine: {}", crate::bench::machine());
    let Peaks { f32: peak, tiles: tiles_peak } = peaks(&cfg, &model_dir)?;
    let flops_per_token = train_flops_per_token(&cfg, args.rank, args.seq_len);
    let ours = child(&args, "single")?;
    let rate = |v: &Value| v["tokens"].as_f64().unwrap_or(0.0) / v["seconds"].as_f64().unwrap_or(f64::INFINITY);
    let gib = |v: &Value| v["peak_rss_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64;
    let share = |v: &Value| 100.0 * rate(v) * flops_per_token / 1e9 / peak;
    println!();
    println!("{:<28} {:>10} {:>14} {:>14}", "", "tokens/s", "% GEMM peak", "peak RSS GiB");
    println!("{:<28} {:>10.1} {:>14.0} {:>14.2}", "tandem", rate(&ours), share(&ours), gib(&ours));
    let mut ratios = Vec::new();
    if let Some(python) = &args.peer_python {
        let peer = run_peer(python, &args, &model_dir)?;
        println!(
            "{:<28} {:>10.1} {:>14.0} {:>14.2}",
            "transformers + PEFT + torch",
            rate(&peer),
            share(&peer),
            gib(&peer)
        );
        println!("tandem / peer tokens/s: {:.2}x (target >= 1.3x)", rate(&ours) / rate(&peer));
        ratios.push(("tandem/peer", rate(&ours) / rate(&peer)));
        println!("tandem / peer peak RSS: {:.2} (target <= 0.5)", gib(&ours) / gib(&peer));
    } else {
        println!("(peer not run: pass --peer-python tools/oracle/.venv/bin/python)");
    }
    println!("(GEMM peak of this machine: {peak:.1} GFLOP/s; {:.2} GFLOP per trained token)", flops_per_token / 1e9);
    if let Some(tiles) = tiles_peak {
        println!(
            "(bf16-weight GEMM peak on the AMX tiles: {tiles:.1} GFLOP/s; tandem at {:.0}% of it)",
            share(&ours) * peak / tiles
        );
    }

    let (mut together, mut sequential) = (None::<Value>, None::<Value>);
    for _ in 0..args.repeat.max(1) {
        for (best, what) in [(&mut together, "together"), (&mut sequential, "sequential")] {
            let run = child(&args, what)?;
            if best.as_ref().is_none_or(|b| rate(&run) > rate(b)) {
                *best = Some(run);
            }
        }
    }
    let (Some(together), Some(sequential)) = (together, sequential) else { bail!("no many-jobs measurement ran") };
    println!();
    println!("{} jobs, each 1 x {} tokens per step, {} steps each:", args.jobs, args.job_seq_len, args.job_steps);
    println!("{:<28} {:>10.1}", "trained in one batch", rate(&together));
    println!("{:<28} {:>10.1}", "trained one after another", rate(&sequential));
    println!("one batch / one after another: {:.2}x (target >= 1.5x)", rate(&together) / rate(&sequential));
    ratios.push(("batch/sequential", rate(&together) / rate(&sequential)));
    check_floors(&args.floors, &ratios)
}

/// Runs this binary again for one measurement.
fn child(args: &FinetuneArgs, what: &str) -> Result<Value> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["bench", "finetune", "--child", what, "--preset", &args.preset]);
    for (flag, v) in [
        ("--rank", args.rank),
        ("--batch", args.batch),
        ("--seq-len", args.seq_len),
        ("--steps", args.steps),
        ("--jobs", args.jobs),
        ("--job-seq-len", args.job_seq_len),
        ("--job-steps", args.job_steps),
    ] {
        cmd.arg(flag).arg(v.to_string());
    }
    cmd.arg("--dir").arg(&args.dir);
    parse_last_line(cmd.output().context("running the measurement")?, what)
}

fn run_peer(python: &Path, args: &FinetuneArgs, model_dir: &Path) -> Result<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/peft_finetune.py");
    let out = Command::new(python)
        .arg(script)
        .arg("--model")
        .arg(model_dir)
        .args(["--batch", &args.batch.to_string(), "--seq-len", &args.seq_len.to_string()])
        .args(["--steps", &args.steps.to_string(), "--rank", &args.rank.to_string()])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    parse_last_line(out, "peer")
}

fn parse_last_line(out: std::process::Output, what: &str) -> Result<Value> {
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.lines().last().unwrap_or("")).with_context(|| format!("{what} output"))?;
    eprintln!("  {what}: {:.1} s", v["seconds"].as_f64().unwrap_or(0.0));
    Ok(v)
}

/// One measurement in this process: (timed seconds, tokens trained in them).
fn measure(args: &FinetuneArgs, model_dir: &Path, what: &str) -> Result<(f64, usize)> {
    let model = Model::load(model_dir, Device::Cpu)?;
    let vocab = model.config.vocab_size;
    let spec = |name: String, batch: usize, seed: u64| TrainSpec {
        name,
        method: Method::Lora {
            rank: args.rank,
            alpha: 2.0 * args.rank as f32,
            targets: vec!["all-linear".into()],
            rslora: false,
        },
        hyper: Hyperparams {
            epochs: 1,
            batch_size: batch,
            micro_batch_size: batch,
            lr: 1e-4,
            warmup_ratio: 0.0,
            seed,
            ..Hyperparams::default()
        },
    };
    match what {
        "single" => {
            let data = random_examples(args.batch * (args.steps + 1), args.seq_len, vocab, 0);
            let job = Job::new(spec("single".into(), args.batch, 0), &model, data)?;
            let mut trainer = Trainer::new(&model, vec![job]);
            trainer.pass()?; // warm-up step
            timed(&mut trainer)
        }
        "together" | "sequential" => {
            let jobs: Vec<Job> = (0..args.jobs)
                .map(|j| {
                    let data = random_examples(args.job_steps + 1, args.job_seq_len, vocab, 100 + j as u64);
                    Job::new(spec(format!("job{j}"), 1, j as u64), &model, data)
                })
                .collect::<tandem_worker::Result<_>>()?;
            if what == "together" {
                let mut trainer = Trainer::new(&model, jobs);
                trainer.pass()?; // warm-up step of every job
                timed(&mut trainer)
            } else {
                let (mut secs, mut tokens) = (0.0, 0);
                for job in jobs {
                    let mut trainer = Trainer::new(&model, vec![job]);
                    trainer.pass()?;
                    let (s, t) = timed(&mut trainer)?;
                    (secs, tokens) = (secs + s, tokens + t);
                }
                Ok((secs, tokens))
            }
        }
        other => bail!("unknown measurement {other:?}"),
    }
}

/// Runs the trainer to the end; (seconds, tokens).
fn timed(trainer: &mut Trainer<'_>) -> Result<(f64, usize)> {
    let start = Instant::now();
    let mut tokens = 0;
    while !trainer.is_finished() {
        tokens += trainer.pass()?.tokens;
    }
    Ok((start.elapsed().as_secs_f64(), tokens))
}

/// `n` sequences of `len` random token ids with a loss on every next token (the peer's
/// `labels=input_ids`).
pub(crate) fn random_examples(n: usize, len: usize, vocab: usize, seed: u64) -> Arc<Vec<Example>> {
    let mut rng = Xoshiro256::seed_from_u64(seed);
    let data = (0..n)
        .map(|_| {
            let tokens: Vec<u32> = (0..len).map(|_| rng.below(vocab as u64) as u32).collect();
            let targets = (0..len).map(|i| if i + 1 < len { tokens[i + 1] as i32 } else { -100 }).collect();
            Example { tokens, targets }
        })
        .collect();
    Arc::new(data)
}

/// FLOPs to train one token of a LoRA over a frozen base: the forward (2 per weight of every
/// linear layer and the LM head, plus attention over half the sequence on average) and the
/// backward to the activations (as much again; no weight gradients for the base), plus the
/// LoRA's own forward and backward (three times its forward).
fn train_flops_per_token(cfg: &ModelConfig, rank: usize, seq_len: usize) -> f64 {
    let (h, i, v) = (cfg.hidden_size as f64, cfg.intermediate_size as f64, cfg.vocab_size as f64);
    let (q, kv) = ((cfg.num_heads * cfg.head_dim) as f64, (cfg.num_kv_heads * cfg.head_dim) as f64);
    let layers = cfg.num_layers as f64;
    let linear = layers * (h * q + 2.0 * h * kv + q * h + 3.0 * h * i) + h * v;
    let attention = layers * 4.0 * q * seq_len as f64 / 2.0;
    let lora = layers * rank as f64 * ((h + q) + 2.0 * (h + kv) + (q + h) + 3.0 * (h + i));
    2.0 * (2.0 * (linear + attention) + 3.0 * lora)
}
