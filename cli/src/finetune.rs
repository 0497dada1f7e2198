//! `tandem finetune`: train one LoRA or ESFT adapter on a JSONL file on this machine, with a
//! progress bar (step, loss, tokens/s, time left), checkpoints and a PEFT export.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tandem_kernels::Device;
use tandem_proto::contract::AutoHyperparams;
use tandem_worker::model::Model;
use tandem_worker::tokenizer::TextTokenizer;
use tandem_worker::train::finetune::{self, Event, FinetuneOptions, MethodChoice};
use tandem_worker::train::job::{Hyperparams, Method};

#[derive(Args)]
pub struct FinetuneArgs {
    /// Base model directory (HF format, with its tokenizer).
    #[arg(long)]
    model: PathBuf,
    /// Training data: JSONL, `{"messages": [...]}` or `{"prompt", "completion"}` per line.
    #[arg(long)]
    data: PathBuf,
    /// Validation data (same formats): its loss is reported during and after training.
    #[arg(long)]
    validation: Option<PathBuf>,
    /// Held-out examples: after training, greedy generation must reproduce each one's
    /// completion exactly; the share it gets right is reported.
    #[arg(long)]
    test: Option<PathBuf>,
    /// Output folder: adapter/ (PEFT export), checkpoints/, log.jsonl, summary.json.
    #[arg(long)]
    out: PathBuf,
    /// `lora` or `esft` (MoE bases: train chosen experts).
    #[arg(long, default_value = "lora")]
    method: String,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    #[arg(long, default_value_t = 32.0)]
    alpha: f32,
    /// Modules to adapt: comma-separated names (q_proj,v_proj,...) or all-linear.
    #[arg(long, default_value = "all-linear", value_delimiter = ',')]
    targets: Vec<String>,
    /// Scale by alpha/sqrt(rank) instead of alpha/rank.
    #[arg(long)]
    rslora: bool,
    /// ESFT experts to train, `LAYER:E,E;LAYER:E` (default: chosen from the data).
    #[arg(long)]
    esft_experts: Option<String>,
    /// ESFT: train the experts that receive this share of each layer's routed tokens.
    #[arg(long, default_value_t = 0.2)]
    esft_threshold: f32,
    /// Passes over the data (default: chosen from its size, as a job's "auto").
    #[arg(long)]
    epochs: Option<usize>,
    /// Peak learning rate (default: chosen from the batch size, as a job's "auto").
    #[arg(long)]
    lr: Option<f32>,
    /// Sequences per optimizer step (default: chosen from the data's size and tokens, as a
    /// job's "auto").
    #[arg(long)]
    batch_size: Option<usize>,
    /// Sequences per forward/backward pass (gradients accumulate); default: the batch size.
    #[arg(long)]
    micro_batch_size: Option<usize>,
    #[arg(long, default_value_t = 0.05)]
    warmup_ratio: f32,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Gradient clipping by global norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Longest sequence accepted (default: the model's context length).
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// Save a checkpoint every N optimizer steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    checkpoint_every: u64,
    /// Report the validation loss every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    eval_every: u64,
    /// Continue from the newest checkpoint in OUT/checkpoints.
    #[arg(long)]
    resume: bool,
    /// Job name (the adapter's `base_model_name_or_path` tag and the log's `job`).
    #[arg(long, default_value = "finetune")]
    name: String,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(args: FinetuneArgs) -> Result<()> {
    let device: Device = args.device.parse()?;
    let model = Model::load(&args.model, device).with_context(|| format!("loading {}", args.model.display()))?;
    let tokenizer = TextTokenizer::load(&args.model)?;
    let method = match args.method.as_str() {
        "lora" => MethodChoice::Lora { rank: args.rank, alpha: args.alpha, targets: args.targets, rslora: args.rslora },
        "esft" => MethodChoice::Esft {
            experts: args.esft_experts.as_deref().map(parse_experts).transpose()?,
            threshold: args.esft_threshold,
        },
        other => bail!("--method must be lora or esft, got {other:?}"),
    };
    let defaults = Hyperparams::default();
    let batch_size = args.batch_size.unwrap_or(defaults.batch_size);
    let hyper = Hyperparams {
        epochs: args.epochs.unwrap_or(defaults.epochs),
        batch_size,
        micro_batch_size: args.micro_batch_size.unwrap_or(batch_size),
        lr: args.lr.unwrap_or(defaults.lr),
        warmup_ratio: args.warmup_ratio,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        seed: args.seed,
        ..Hyperparams::default()
    };
    let opts = FinetuneOptions {
        name: args.name,
        data: args.data,
        validation: args.validation,
        test: args.test,
        out: args.out,
        method,
        hyper,
        auto: AutoHyperparams {
            n_epochs: args.epochs.is_none(),
            batch_size: args.batch_size.is_none(),
            learning_rate_multiplier: args.lr.is_none(),
        },
        max_seq_len: args.max_seq_len.unwrap_or(model.config.max_position_embeddings),
        checkpoint_every: args.checkpoint_every,
        eval_every: args.eval_every,
        resume: args.resume,
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(500));
    let summary = finetune::run(Arc::new(model), &tokenizer, &opts, &mut |event| match event {
        Event::Started { total_steps, step, examples, method, hyper } => {
            bar.set_length(total_steps);
            bar.set_position(step);
            bar.reset_eta();
            let what = match method {
                Method::Lora { rank, targets, .. } => format!("LoRA rank {rank} on {}", targets.join(",")),
                Method::Esft { experts } => format!("ESFT experts {experts:?}"),
            };
            // Printed whether or not the bar shows (it does not without a terminal).
            bar.suspend(|| {
                println!(
                    "{examples} examples, {} epochs of batch {}, lr {:.2e}: {total_steps} steps, {what}",
                    hyper.epochs, hyper.batch_size, hyper.lr
                )
            });
            if step > 0 {
                bar.println(format!("resumed at step {step}"));
            }
        }
        Event::Step { report, tokens_per_s } => {
            bar.set_position(report.step);
            bar.set_message(format!("loss {:.4} lr {:.2e} {:.0} tok/s", report.loss, report.lr, tokens_per_s));
        }
        Event::Validation { step, loss } => bar.println(format!("step {step}: validation loss {loss:.4}")),
        Event::Checkpoint { path } => bar.set_message(format!("checkpoint {}", path.display())),
    })?;
    bar.finish();
    if let (Some(first), Some(last)) = (summary.first_loss, summary.last_loss) {
        println!("loss {first:.4} -> {last:.4} over {} steps ({:.0} s)", summary.steps, summary.seconds);
    }
    if let Some(v) = summary.validation_loss {
        println!("validation loss {v:.4}");
    }
    if let Some((right, total)) = summary.test_exact {
        println!("held-out exact match: {right}/{total} ({:.1}%)", 100.0 * right as f64 / total.max(1) as f64);
    }
    println!("adapter: {}", summary.adapter.display());
    Ok(())
}

/// `0:1,3;1:2` -> {0: [1, 3], 1: [2]}.
fn parse_experts(s: &str) -> Result<BTreeMap<usize, Vec<usize>>> {
    let mut out = BTreeMap::new();
    for part in s.split(';').filter(|p| !p.trim().is_empty()) {
        let (layer, ids) =
            part.split_once(':').with_context(|| format!("--esft-experts: {part:?} is not LAYER:E,E"))?;
        let layer: usize = layer.trim().parse().with_context(|| format!("--esft-experts: layer {layer:?}"))?;
        let ids = ids
            .split(',')
            .map(|e| e.trim().parse::<usize>().with_context(|| format!("--esft-experts: expert {e:?}")))
            .collect::<Result<Vec<_>>>()?;
        out.insert(layer, ids);
    }
    Ok(out)
}
