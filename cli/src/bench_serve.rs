//! `tandem bench serve`: a mixed-adapter serving workload on a random-weight model, measured
//! against (a) the same workload with no adapters (or over a few adapters,
//! `--baseline-adapters`: many distinct adapters against few), (b) transformers + PEFT on the
//! same model, adapters and prompts (the peer script `bench/peft_serve.py`), and (c) this
//! machine's GEMM peak, all in one run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

use crate::bench::{Floor, check_floor_names, check_floors};
use tandem_kernels::ops::{self, MatmulDims};
use tandem_kernels::{DType, Device, Tensor};
use tandem_worker::adapters::{Adapter, LoraAdapter, LoraModule, ModuleKey};
use tandem_worker::engine::{Engine, EngineConfig, GenerationRequest, adapter_pages};
use tandem_worker::init_model::{Preset, write_model};
use tandem_worker::model::weights::open_checkpoint;
use tandem_worker::model::{KvCache, Model, ModelConfig, weight_dtype};
use tandem_worker::sampling::SamplingParams;

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long, default_value = "qwen2.5-0.5b")]
    preset: String,
    #[arg(long, default_value_t = 32)]
    adapters: usize,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// The modules every adapter targets, as PEFT names them.
    #[arg(long, value_delimiter = ',', default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")]
    targets: Vec<String>,
    /// The run to compare with serves the same requests over this many of the adapters (request
    /// `i`'s adapter modulo it); 0: with no adapters.
    #[arg(long, default_value_t = 0)]
    baseline_adapters: usize,
    #[arg(long, default_value_t = 64)]
    requests: usize,
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    output_len: usize,
    /// Where the model, adapters and workload are written (reused when present).
    #[arg(long, default_value = "target/bench-serve")]
    dir: PathBuf,
    /// Python with transformers + peft (e.g. tools/oracle/.venv/bin/python) to run the peer.
    #[arg(long)]
    peer_python: Option<PathBuf>,
    /// The dtype the peer holds the model in and computes with: `float32`, or `bfloat16` (all
    /// of torch's arithmetic in bf16, its AMX GEMMs where the CPU has them).
    #[arg(long, default_value = "float32", value_parser = ["float32", "bfloat16"])]
    peer_dtype: String,
    /// Our two runs alternate this many times, and each keeps its fastest: other work on a
    /// shared machine only ever slows a run down, so the fastest of a few is the steadiest.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Tokens one engine step may process.
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    #[arg(long = "floor", value_name = "RATIO=MIN")]
    floors: Vec<Floor>,
}

/// The ratios `bench serve` reports, higher is better: tokens/s with adapters over the baseline
/// run's, the bytes it must hold (weights, adapters, KV pool) over its peak RSS, and tokens/s
/// over the peer's with adapters (only with `--peer-python`).
const RATIOS: [&str; 3] = ["adapters/baseline", "resident/peak-rss", "tandem/peer"];

pub fn run(args: ServeArgs) -> Result<()> {
    // The run without adapters is always measured beside the run with them.
    for (flag, n) in [
        ("--adapters", args.adapters),
        ("--requests", args.requests),
        ("--output-len", args.output_len),
        ("--repeat", args.repeat),
    ] {
        if n == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    if args.baseline_adapters >= args.adapters {
        bail!("--baseline-adapters must be fewer than --adapters");
    }
    check_floor_names(&args.floors, &RATIOS)?;
    let preset: Preset = args.preset.parse()?;
    let model_dir = args.dir.join(preset.to_string());
    if !model_dir.join("config.json").exists() {
        eprintln!("writing the {preset} model to {}", model_dir.display());
        write_model(preset, &model_dir, 0)?;
    }
    let cfg = ModelConfig::load(&model_dir)?;
    let adapter_dirs = write_adapters(&args, &cfg)?;
    let workload = workload(&args);
    let workload_file = args.dir.join("workload.jsonl");
    std::fs::write(&workload_file, workload.iter().map(Value::to_string).collect::<Vec<_>>().join("\n"))?;
    let tokens = args.requests * (args.prompt_len + args.output_len);
    println!(
        "tandem bench serve: {preset}, {} adapters of rank {} on {}, {} requests ({} prompt + {} output tokens), greedy",
        args.adapters,
        args.rank,
        args.targets.join(","),
        args.requests,
        args.prompt_len,
        args.output_len
    );
    println!("machine: {}", crate::bench::machine());

    let Peaks { f32: peak, tiles: tiles_peak } = peaks(&cfg, &model_dir)?;
    let (mut with, mut without) = (None::<Measured>, None::<Measured>);
    for _ in 0..args.repeat {
        for (best, n) in [(&mut with, args.adapters), (&mut without, args.baseline_adapters)] {
            let run = serve(&args, &model_dir, &adapter_dirs, &workload, n)?;
            *best = Some(match best.take() {
                // The peak RSS is the process's: the first run's is the only one of its own.
                Some(b) if run.secs < b.secs => Measured { peak_rss: b.peak_rss, ..run },
                Some(b) => b,
                None => run,
            });
        }
    }
    let (Some(with), Some(without)) = (with, without) else { bail!("--repeat must be at least 1") };
    let flops = workload_flops(&cfg, &args);
    let rate = |secs: f64| tokens as f64 / secs;
    println!();
    println!("{:<34} {:>10} {:>12}", "", "tokens/s", "seconds");
    let with_label = format!("tandem, {} adapters", args.adapters);
    println!("{:<34} {:>10.1} {:>12.1}", with_label, rate(with.secs), with.secs);
    let baseline_label = match args.baseline_adapters {
        0 => "tandem, no adapters".to_string(),
        n => format!("tandem, {n} adapters"),
    };
    println!("{:<34} {:>10.1} {:>12.1}", baseline_label, rate(without.secs), without.secs);
    if args.baseline_adapters == 0 {
        println!("adapter overhead: {:.1}% (target <= 7%)", 100.0 * (with.secs / without.secs - 1.0));
    } else {
        println!(
            "{} adapters keep {:.1}% of the throughput of {} (target >= 90%)",
            args.adapters,
            100.0 * without.secs / with.secs,
            args.baseline_adapters
        );
    }
    let achieved = flops / with.secs / 1e9;
    println!(
        "FLOP rate with adapters: {achieved:.1} GFLOP/s = {:.0}% of this machine's f32 GEMM peak of {peak:.1} GFLOP/s (target >= 70%)",
        100.0 * achieved / peak,
    );
    if let Some(tiles) = tiles_peak {
        println!(
            "  and {:.0}% of its bf16-weight GEMM peak (AMX tiles) of {tiles:.1} GFLOP/s",
            100.0 * achieved / tiles
        );
    }
    println!(
        "peak RSS {:.2} GiB = {:.2}x the weights + adapters + KV pool ({:.2} GiB) (target <= 1.2x)",
        gib(with.peak_rss),
        with.peak_rss as f64 / with.resident_bytes as f64,
        gib(with.resident_bytes)
    );
    let mut ratios = vec![
        ("adapters/baseline", without.secs / with.secs),
        ("resident/peak-rss", with.resident_bytes as f64 / with.peak_rss as f64),
    ];
    if let Some(python) = &args.peer_python {
        let peer = run_peer(python, &args.peer_dtype, &model_dir, &adapter_dirs, &workload_file, true)?;
        let peer_base = run_peer(python, &args.peer_dtype, &model_dir, &adapter_dirs, &workload_file, false)?;
        let peer_label = format!("transformers + PEFT ({}), {} adapters", args.peer_dtype, args.adapters);
        println!("{:<34} {:>10.1} {:>12.1}", peer_label, rate(peer), peer);
        let base_label = format!("transformers + PEFT ({}), no adapters", args.peer_dtype);
        println!("{:<34} {:>10.1} {:>12.1}", base_label, rate(peer_base), peer_base);
        println!("tandem / transformers+PEFT with adapters: {:.2}x (target >= 1.8x)", peer / with.secs);
        ratios.push(("tandem/peer", peer / with.secs));
    } else {
        println!("(peer not run: pass --peer-python tools/oracle/.venv/bin/python)");
    }
    check_floors(&args.floors, &ratios)
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Random PEFT adapters of rank `r` on the target modules, written once as PEFT would write
/// them so the peer loads exactly the same weights.
fn write_adapters(args: &ServeArgs, cfg: &ModelConfig) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for i in 0..args.adapters {
        let dir = args.dir.join(format!("adapters/{}-r{}/a{i:04}", args.targets.join("-"), args.rank));
        if !dir.join("adapter_config.json").exists() {
            let mut seed = 1000 + i as u64;
            let mut rand = |n: usize, scale: f32| -> Vec<f32> {
                (0..n)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ((seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
                    })
                    .collect()
            };
            let r = args.rank;
            let mut modules = std::collections::BTreeMap::new();
            for key in targeted_modules(args, cfg) {
                let (inp, out) = key.features(cfg);
                let a = Tensor::from_vec(rand(r * inp, 1.0 / (inp as f32).sqrt()), [r, inp])?;
                let bt = Tensor::from_vec(rand(r * out, 0.02), [r, out])?;
                modules.insert(key, LoraModule { a, bt, scale: 2.0 });
            }
            let config = json!({
                "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
                "target_modules": args.targets,
                "bias": "none", "lora_dropout": 0.0, "use_rslora": false, "base_model_name_or_path": args.preset,
            });
            LoraAdapter { modules, config }.save(&dir, cfg)?;
        }
        dirs.push(dir);
    }
    Ok(dirs)
}

/// The modules of `cfg` that `--targets` names.
fn targeted_modules<'a>(args: &'a ServeArgs, cfg: &'a ModelConfig) -> impl Iterator<Item = ModuleKey> + 'a {
    let all = ModuleKey::all(cfg);
    all.into_iter().filter(|key| args.targets.iter().any(|t| key.name(cfg).ends_with(&format!(".{t}"))))
}

/// Prompts of random token ids (from the tokenizer's real range), adapters drawn uniformly.
fn workload(args: &ServeArgs) -> Vec<Value> {
    let mut s = 42u64;
    let mut next = |n: u64| {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 33) % n
    };
    (0..args.requests)
        .map(|_| {
            let prompt: Vec<u64> = (0..args.prompt_len).map(|_| next(500)).collect();
            json!({ "prompt_ids": prompt, "adapter": next(args.adapters as u64), "max_tokens": args.output_len })
        })
        .collect()
}

struct Measured {
    secs: f64,
    peak_rss: usize,
    resident_bytes: usize,
}

fn serve(
    args: &ServeArgs,
    model_dir: &Path,
    adapter_dirs: &[PathBuf],
    workload: &[Value],
    n_adapters: usize,
) -> Result<Measured> {
    let model = Model::load(model_dir, Device::Cpu)?;
    let adapters: Vec<(String, Adapter)> = adapter_dirs[..n_adapters]
        .iter()
        .enumerate()
        .map(|(i, d)| {
            Ok((i.to_string(), Adapter::Lora(LoraAdapter::load_as(d, &model.config, model.serving_lora_dtype())?)))
        })
        .collect::<Result<_>>()?;
    let c = &model.config;
    let block_size = 16;
    let per_request = (args.prompt_len + args.output_len).div_ceil(block_size);
    let kv_pages = per_request * args.requests;
    // Room for twice as many adapters as requests can run at once: beyond that, adapters wait
    // on the host tier and are paged in (prefetched for queued requests) as they come up.
    let resident = n_adapters.min(2 * args.requests);
    let resident_pages = adapters.first().map_or(0, |(_, a)| resident * adapter_pages(a, c, block_size));
    let ecfg = EngineConfig {
        pages: kv_pages + resident_pages,
        block_size,
        max_batch_tokens: args.max_batch_tokens,
        max_running: args.requests,
        max_waiting: args.requests,
        // Throughput, not latency: the batch size is what `--max-batch-tokens` says.
        tpot_target: std::time::Duration::MAX,
        ..EngineConfig::default()
    };
    let kv_bytes = kv_pages * KvCache::page_bytes(c, block_size, DType::F32);
    let weight_bytes = tensor_bytes(&model);
    let adapter_bytes: usize = adapters.iter().flat_map(|(_, a)| a.weights()).map(|(_, t)| bytes(t)).sum();
    let mut engine = Engine::new(model, adapters, None, ecfg)?;
    for w in workload {
        let prompt =
            w["prompt_ids"].as_array().context("prompt_ids")?.iter().map(|v| v.as_u64().unwrap_or(0) as u32).collect();
        let adapter = w["adapter"].as_u64().filter(|_| n_adapters > 0).map(|a| (a % n_adapters as u64).to_string());
        let params = SamplingParams {
            max_tokens: args.output_len,
            temperature: 0.0,
            ignore_eos: true,
            ..SamplingParams::default()
        };
        engine.submit(GenerationRequest { prompt, adapter, params })?;
    }
    let start = Instant::now();
    let out = engine.run_to_completion()?;
    let secs = start.elapsed().as_secs_f64();
    if out.iter().any(|o| o.token_ids.len() != args.output_len) {
        bail!("a request stopped early");
    }
    eprintln!("  tandem ({n_adapters} adapters): {secs:.1} s");
    Ok(Measured { secs, peak_rss: peak_rss()?, resident_bytes: weight_bytes + adapter_bytes + kv_bytes })
}

fn bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

fn tensor_bytes(model: &Model) -> usize {
    let w = &model.weights;
    let mut n = bytes(&w.embed) + bytes(&w.norm) + w.lm_head.as_ref().map_or(0, bytes);
    for l in &w.layers {
        n += bytes(&l.input_norm) + bytes(&l.post_attention_norm);
        for lin in [&l.q, &l.k, &l.v, &l.o] {
            n += bytes(&lin.weight) + lin.bias.as_ref().map_or(0, bytes);
        }
        if let tandem_worker::model::weights::Mlp::Dense(m) = &l.mlp {
            n += bytes(&m.gate.weight) + bytes(&m.up.weight) + bytes(&m.down.weight);
        }
    }
    n
}

/// FLOPs of the workload's matmuls: every prompt and generated token through every linear
/// layer, attention over its context, the LM head for the tokens that are sampled, and the
/// LoRA deltas.
fn workload_flops(cfg: &ModelConfig, args: &ServeArgs) -> f64 {
    let (h, i, v) = (cfg.hidden_size as f64, cfg.intermediate_size as f64, cfg.vocab_size as f64);
    let (q, kv) = ((cfg.num_heads * cfg.head_dim) as f64, (cfg.num_kv_heads * cfg.head_dim) as f64);
    let per_token_linear = 2.0 * cfg.num_layers as f64 * (h * q + 2.0 * h * kv + q * h + 3.0 * h * i);
    let lora: f64 = targeted_modules(args, cfg)
        .map(|key| key.features(cfg))
        .map(|(inp, out)| 2.0 * args.rank as f64 * (inp + out) as f64)
        .sum();
    let tokens = (args.requests * (args.prompt_len + args.output_len)) as f64;
    let total_len = (args.prompt_len + args.output_len) as f64;
    // Each token attends to about half the sequence on average: QK and PV, 2 FLOPs each.
    let attention = 4.0 * cfg.num_layers as f64 * q * tokens * total_len / 2.0;
    let head = 2.0 * h * v * (args.requests * args.output_len) as f64;
    tokens * (per_token_linear + lora) + attention + head
}

/// The GEMM peaks a run's FLOP rate is measured against: f32, and, where the model's weights
/// are held in bf16 on this machine, bf16 weights on the AMX tiles.
pub(crate) struct Peaks {
    pub f32: f64,
    pub tiles: Option<f64>,
}

/// Measures the [`Peaks`] for the model in `model_dir`, printing the dtype its weights are held
/// in.
pub(crate) fn peaks(cfg: &ModelConfig, model_dir: &Path) -> Result<Peaks> {
    let weights = weight_dtype(cfg, &open_checkpoint(model_dir)?, Device::Cpu);
    let tiles = weights == DType::BF16;
    println!("weights held in {weights}{}", if tiles { " (multiplied on the AMX tiles)" } else { "" });
    Ok(Peaks { f32: gemm_peak(DType::F32)?, tiles: if tiles { Some(gemm_peak(weights)?) } else { None } })
}

/// This machine's GEMM rate with the weight held in `dtype` (f32 activations): the largest
/// shape of `tandem bench kernels` (2048 x 4096 x 4096).
fn gemm_peak(dtype: DType) -> Result<f64> {
    let (m, d) = (2048, 4096);
    let a = Tensor::from_vec(vec![0.01; m * d], [m, d])?;
    let w = Tensor::from_vec(vec![0.01; d * d], [d, d])?.into_dtype(dtype)?;
    let dims = MatmulDims { batch: 1, m, n: d, k: d, trans_a: false, trans_b: true, b_batched: false };
    ops::matmul(&a, &w, false, true)?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        ops::matmul(&a, &w, false, true)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(dims.flops() / best / 1e9)
}

/// Peak resident memory of this process (`VmHWM`), in bytes.
pub(crate) fn peak_rss() -> Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .context("VmHWM in /proc/self/status")?;
    Ok(kb * 1024)
}

/// Runs `bench/peft_serve.py` and returns its wall time in seconds.
fn run_peer(
    python: &Path,
    dtype: &str,
    model: &Path,
    adapters: &[PathBuf],
    workload: &Path,
    use_adapters: bool,
) -> Result<f64> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/peft_serve.py");
    let mut cmd = Command::new(python);
    cmd.arg(&script).arg("--model").arg(model).arg("--workload").arg(workload).arg("--dtype").arg(dtype);
    if use_adapters {
        for a in adapters {
            cmd.arg("--adapter").arg(a);
        }
    }
    let out = cmd.output().with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!("peer failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.lines().last().unwrap_or("")).context("peer output")?;
    v["seconds"].as_f64().context("peer output has no `seconds`")
}
