//! `tandem tp-rank`: one rank of a tensor-parallel group, as its own process joined to the
//! others over TCP (the CPU collectives): it shards the model, runs a fixed batch (prefill and
//! greedy decode steps, the sequences on two adapters and the base) and one training step over
//! the prompts, and prints the logits of every step, the training losses and adapter
//! gradients, and the bytes it sent at each place in the model, as JSON. The parity tests run
//! one process per rank and compare with a group of one; the same run gives the communication
//! figures. The ranks talk under the cluster's TLS (`--certs`), as group workers do.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use serde_json::json;
use tandem_kernels::Device;
use tandem_worker::adapters::AdapterSet;
use tandem_worker::collective::{CollectiveOptions, TcpGroup};
use tandem_worker::model::probe::{adapter_gradients, greedy_logits, mixed_adapters};
use tandem_worker::model::{Model, MoeSplit};
use tandem_worker::train::data::Example;

use crate::certs::SecurityArgs;

#[derive(Args)]
pub struct TpRankArgs {
    /// Base model directory (HF format).
    #[arg(long)]
    model: PathBuf,
    /// This process's rank.
    #[arg(long, default_value_t = 0)]
    rank: usize,
    /// Every rank's HOST:PORT, in rank order (this rank listens on its own); none: a group of one.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Prompts as token ids, `1,2,3;4,5`.
    #[arg(long, default_value = "1,17,400,3,99;5,6,7,8,9,10,11,12;300,2,77")]
    prompts: String,
    /// Greedy decode steps after the prefill.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// How a MoE model's experts are split: `intermediate` (tensor parallelism inside every
    /// expert) or `experts` (expert parallelism: whole experts per rank, tokens sent to them).
    #[arg(long, default_value = "intermediate", value_parser = parse_moe_split)]
    moe_split: MoeSplit,
    /// How long a collective (and the group's set-up) may wait for a peer.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
    /// The ranks' connections run under the cluster's TLS: each rank holds a worker
    /// certificate (default name `rank{RANK}`).
    #[command(flatten)]
    security: SecurityArgs,
}

pub fn run(args: TpRankArgs) -> Result<()> {
    let whole = Model::load(&args.model, Device::Cpu).with_context(|| format!("loading {}", args.model.display()))?;
    let prompts = (args.prompts.split(';'))
        .map(|p| p.split(',').map(|t| t.trim().parse::<u32>().map_err(|e| anyhow!("--prompts {p:?}: {e}"))).collect())
        .collect::<Result<Vec<Vec<u32>>>>()?;
    let comm = if args.peers.len() > 1 {
        let timeout = Duration::from_secs(args.timeout_s.max(1));
        let options = CollectiveOptions { timeout, setup_timeout: timeout };
        let security = args.security.security(&format!("rank{}", args.rank))?;
        Some(TcpGroup::join(args.rank, &args.peers, &options, &security).map_err(|e| anyhow!("{e}"))?)
    } else {
        None
    };
    // The adapters are made (seeded) against the whole model, then cut for this shard.
    let adapters = mixed_adapters(&whole)?;
    let model = match comm {
        Some(comm) => whole.shard_with(Arc::new(comm), args.moe_split)?,
        None => whole,
    };
    let shards = adapters.iter().map(|a| model.shard_adapter(a)).collect::<Result<Vec<_>, _>>()?;
    let set = AdapterSet::new(shards, model.device)?;
    // Sequences on adapter 0, adapter 1 and the base, in turn.
    let slots: Vec<i32> = (0..prompts.len()).map(|i| [0, 1, -1][i % 3]).collect();
    let logits = greedy_logits(&model, &set, &prompts, &slots, args.steps)?;
    // Training: each prompt predicts its next tokens, on adapters 0 and 1 in turn.
    let examples: Vec<Example> = (prompts.iter())
        .map(|p| Example { tokens: p.clone(), targets: p[1..].iter().map(|&t| t as i32).chain([-1]).collect() })
        .collect();
    let train_slots: Vec<usize> = (0..examples.len()).map(|i| i % 2).collect();
    let train_tokens: usize = examples.iter().map(|e| e.tokens.len()).sum();
    let (losses, gradients) = adapter_gradients(&model, &adapters, &examples, &train_slots)?;
    let gradients: serde_json::Map<String, serde_json::Value> =
        gradients.into_iter().map(|(name, g)| (name, json!(g))).collect();
    let traffic = model.tp.as_ref().and_then(|tp| tp.traffic.lock().ok().map(|t| t.clone())).unwrap_or_default();
    let bytes: serde_json::Map<String, serde_json::Value> =
        traffic.bytes.iter().map(|(site, b)| (format!("{site:?}").to_lowercase(), json!(b))).collect();
    let out = json!({
        "rank": args.rank, "world": args.peers.len().max(1), "logits": logits, "bytes": bytes,
        "losses": losses, "gradients": gradients, "train_tokens": train_tokens,
        "tokens": traffic.tokens, "logit_rows": traffic.logit_rows,
        "hidden_size": model.config.hidden_size, "layers": model.config.num_layers, "vocab_size": model.config.vocab_size,
        "top_k": model.config.moe.as_ref().map(|m| m.top_k),
    });
    println!("{out}");
    Ok(())
}

fn parse_moe_split(s: &str) -> Result<MoeSplit> {
    match s {
        "intermediate" => Ok(MoeSplit::Intermediate),
        "experts" => Ok(MoeSplit::Experts),
        _ => Err(anyhow!("{s:?}: expected `intermediate` or `experts`")),
    }
}
