//! `tandem tp-rank`: one rank of a tensor-parallel group, as its own process joined to the
//! others over TCP (the CPU collectives): it shards the model, runs a fixed batch (prefill and
//! greedy decode steps) and prints the logits of every step and the bytes it sent at each place
//! in the model, as JSON. The parity tests run one process per rank and compare the logits with
//! a group of one; the same run gives the communication figures.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use serde_json::json;
use tandem_kernels::Device;
use tandem_worker::adapters::AdapterSet;
use tandem_worker::collective::{CollectiveOptions, TcpGroup};
use tandem_worker::model::Model;
use tandem_worker::model::probe::greedy_logits;

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
    /// How long a collective (and the group's set-up) may wait for a peer.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
}

pub fn run(args: TpRankArgs) -> Result<()> {
    let whole = Model::load(&args.model, Device::Cpu).with_context(|| format!("loading {}", args.model.display()))?;
    let prompts = (args.prompts.split(';'))
        .map(|p| p.split(',').map(|t| t.trim().parse::<u32>().map_err(|e| anyhow!("--prompts {p:?}: {e}"))).collect())
        .collect::<Result<Vec<Vec<u32>>>>()?;
    let model = if args.peers.len() > 1 {
        let timeout = Duration::from_secs(args.timeout_s.max(1));
        let options = CollectiveOptions { timeout, setup_timeout: timeout };
        let comm = TcpGroup::join(args.rank, &args.peers, &options).map_err(|e| anyhow!("{e}"))?;
        whole.shard(Arc::new(comm))?
    } else {
        whole
    };
    let adapters = AdapterSet::new(Vec::new(), model.device)?;
    let slots = vec![-1; prompts.len()];
    let logits = greedy_logits(&model, &adapters, &prompts, &slots, args.steps)?;
    let traffic = model.tp.as_ref().and_then(|tp| tp.traffic.lock().ok().map(|t| t.clone())).unwrap_or_default();
    let bytes: serde_json::Map<String, serde_json::Value> =
        traffic.bytes.iter().map(|(site, b)| (format!("{site:?}").to_lowercase(), json!(b))).collect();
    let out = json!({
        "rank": args.rank, "world": args.peers.len().max(1), "logits": logits, "bytes": bytes,
        "tokens": traffic.tokens, "logit_rows": traffic.logit_rows,
        "hidden_size": model.config.hidden_size, "layers": model.config.num_layers, "vocab_size": model.config.vocab_size,
    });
    println!("{out}");
    Ok(())
}
