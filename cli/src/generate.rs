//! `tandem generate`: run prompts through the inference engine, many adapters in one
//! continuously batched workload, and print the results (one JSON object per prompt with
//! `--json`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Deserialize;
use serde_json::json;
use tandem_kernels::Device;
use tandem_worker::adapters::Adapter;
use tandem_worker::engine::{Engine, EngineConfig, GenerationRequest};
use tandem_worker::model::{Model, ModelConfig};
use tandem_worker::sampling::SamplingParams;
use tandem_worker::tokenizer::TextTokenizer;

#[derive(Args)]
pub struct GenerateArgs {
    /// Model directory (HF format: config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Load an adapter: NAME=DIR (a PEFT LoRA adapter or an ESFT adapter). Repeatable.
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    adapters: Vec<String>,
    /// Prompt text (tokenized with the model's tokenizer).
    #[arg(long, conflicts_with_all = ["prompt_ids", "requests"])]
    prompt: Option<String>,
    /// Prompt as token ids, comma-separated.
    #[arg(long, value_delimiter = ',', conflicts_with = "requests")]
    prompt_ids: Option<Vec<u32>>,
    /// JSONL file, one request per line: {"prompt": TEXT | "prompt_ids": [..], "adapter": NAME,
    /// and optionally max_tokens, temperature, top_p, top_k, seed, stop}.
    #[arg(long)]
    requests: Option<PathBuf>,
    /// Adapter for --prompt / --prompt-ids (default: the base model).
    #[arg(long)]
    use_adapter: Option<String>,
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Report the log-probability of each generated token.
    #[arg(long)]
    logprobs: bool,
    /// One JSON object per prompt instead of plain text.
    #[arg(long)]
    json: bool,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// One line of a `--requests` file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestLine {
    prompt: Option<String>,
    prompt_ids: Option<Vec<u32>>,
    adapter: Option<String>,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    seed: Option<u64>,
    stop: Option<Vec<String>>,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let device: Device = args.device.parse()?;
    let config = ModelConfig::load(&args.model)?;
    let tokenizer =
        if args.model.join("tokenizer.json").exists() { Some(TextTokenizer::load(&args.model)?) } else { None };
    let adapters = args.adapters.iter().map(|spec| load_adapter(spec, &config)).collect::<Result<Vec<_>>>()?;
    let model = Model::load(&args.model, device).with_context(|| format!("loading {}", args.model.display()))?;
    let defaults = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        stop: args.stop.clone(),
        logprobs: args.logprobs,
        ..SamplingParams::default()
    };
    let requests = match (&args.requests, &args.prompt, &args.prompt_ids) {
        (Some(file), _, _) => read_requests(file, &defaults, tokenizer.as_ref())?,
        (None, Some(text), _) => {
            vec![GenerationRequest {
                prompt: encode(tokenizer.as_ref(), text)?,
                adapter: args.use_adapter.clone(),
                params: defaults,
            }]
        }
        (None, None, Some(ids)) => {
            vec![GenerationRequest { prompt: ids.clone(), adapter: args.use_adapter.clone(), params: defaults }]
        }
        (None, None, None) => bail!("give --prompt, --prompt-ids or --requests"),
    };
    let adapter_names: Vec<Option<String>> = requests.iter().map(|r| r.adapter.clone()).collect();
    let mut engine = Engine::new(model, adapters, tokenizer, EngineConfig::default())?;
    for (i, r) in requests.into_iter().enumerate() {
        engine.submit(r).with_context(|| format!("request {}", i + 1))?;
    }
    for out in engine.run_to_completion()? {
        if args.json {
            let mut obj = json!({
                "index": out.index,
                "adapter": adapter_names[out.index],
                "prompt_tokens": out.prompt_tokens,
                "token_ids": out.token_ids,
                "text": out.text,
                "finish_reason": out.finish_reason.as_openai_str(),
            });
            if args.logprobs {
                obj["logprobs"] = json!(out.logprobs);
            }
            println!("{obj}");
        } else {
            println!("{}", out.text);
        }
    }
    Ok(())
}

/// `NAME=DIR`: a PEFT LoRA adapter (adapter_config.json) or an ESFT adapter (esft_config.json).
pub fn load_adapter(spec: &str, config: &ModelConfig) -> Result<(String, Adapter)> {
    let Some((name, dir)) = spec.split_once('=') else { bail!("--adapter {spec:?}: expected NAME=DIR") };
    Ok((name.to_string(), Adapter::load_dir(Path::new(dir), config, tandem_kernels::DType::F32)?))
}

fn encode(tokenizer: Option<&TextTokenizer>, text: &str) -> Result<Vec<u32>> {
    let Some(t) = tokenizer else {
        bail!("--prompt needs tokenizer.json in the model directory (or use --prompt-ids)")
    };
    Ok(t.encode(text, true)?)
}

fn read_requests(
    path: &Path,
    defaults: &SamplingParams,
    tokenizer: Option<&TextTokenizer>,
) -> Result<Vec<GenerationRequest>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{}:{}", path.display(), n + 1);
        let r: RequestLine = serde_json::from_str(line).with_context(at)?;
        let prompt = match (r.prompt, r.prompt_ids) {
            (Some(text), None) => encode(tokenizer, &text).with_context(at)?,
            (None, Some(ids)) => ids,
            _ => bail!("{}: give exactly one of `prompt` and `prompt_ids`", at()),
        };
        let d = defaults.clone();
        let params = SamplingParams {
            max_tokens: r.max_tokens.unwrap_or(d.max_tokens),
            temperature: r.temperature.unwrap_or(d.temperature),
            top_p: r.top_p.unwrap_or(d.top_p),
            top_k: r.top_k.unwrap_or(d.top_k),
            seed: r.seed.or(d.seed),
            stop: r.stop.unwrap_or(d.stop),
            ..d
        };
        out.push(GenerationRequest { prompt, adapter: r.adapter, params });
    }
    if out.is_empty() {
        bail!("{}: no requests", path.display());
    }
    Ok(out)
}
