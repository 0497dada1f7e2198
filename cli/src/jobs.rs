//! `tandem submit`, `tandem jobs`, `tandem adapters` and `tandem keys`: a tenant's work in a
//! running cluster, through the gateway's gRPC job API (`tandem.v1.Api`, on the gateway's own
//! port), which answers with the gateway's JSON objects. Every call carries the caller's API
//! key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value, json};
use tandem_coordinator::gateway::MAX_API_MESSAGE;
use tandem_proto::v1::api_client::ApiClient;
use tandem_proto::v1::{
    AdapterFile, CreateJobRequest, CreateKeyRequest, DeleteAdapterRequest, JobRequest, ListAdaptersRequest,
    ListJobsRequest, ListKeysRequest, PutAdapterRequest, RevokeKeyRequest, UploadFileRequest,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Response, Status};

use crate::secrets;

/// The files of an adapter folder, by kind.
const PEFT_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];
const ESFT_FILES: [&str; 2] = ["esft_config.json", "esft_model.safetensors"];

/// Which gateway to ask, and as whom (accepted before or after the subcommand).
#[derive(Args)]
pub struct ApiArgs {
    /// The gateway's address (`tandem up --http`, `tandem coordinator --http`): its gRPC job
    /// API answers there beside the HTTP API. `https://HOST:PORT` for a gateway on HTTPS.
    #[arg(long, global = true, default_value = "127.0.0.1:8000")]
    gateway: String,
    /// The CA certificate (PEM) that signed an HTTPS gateway's certificate.
    #[arg(long, global = true)]
    ca_cert: Option<PathBuf>,
    /// Your API key (default: the TANDEM_API_KEY environment variable).
    #[arg(long, global = true)]
    api_key: Option<String>,
}

#[derive(Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    what: Submit,
}

#[derive(Subcommand)]
enum Submit {
    /// Upload a JSONL training file and create a fine-tuning job on it; prints the job's id.
    Finetune(FinetuneJobArgs),
}

#[derive(Args)]
struct FinetuneJobArgs {
    /// The base model (a model in the cluster's catalogue).
    #[arg(long)]
    model: String,
    /// Training data: JSONL, `{"messages": [...]}` or `{"prompt", "completion"}` per line.
    #[arg(long)]
    data: std::path::PathBuf,
    /// Validation data (same formats).
    #[arg(long)]
    validation: Option<std::path::PathBuf>,
    /// Passes over the data (default: the cluster's).
    #[arg(long)]
    epochs: Option<u32>,
    /// Sequences per optimizer step (default: the cluster's).
    #[arg(long)]
    batch_size: Option<u32>,
    /// Multiplies the cluster's base learning rate.
    #[arg(long)]
    lr_multiplier: Option<f64>,
    /// LoRA rank.
    #[arg(long)]
    rank: Option<u32>,
    /// Part of the fine-tuned model's name.
    #[arg(long)]
    suffix: Option<String>,
    #[arg(long)]
    seed: Option<u64>,
    /// Follow the job until it ends (as `tandem jobs watch`).
    #[arg(long)]
    watch: bool,
}

#[derive(Args)]
pub struct JobsArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: JobsCommand,
}

#[derive(Subcommand)]
enum JobsCommand {
    /// Your fine-tuning jobs, newest first.
    List,
    /// Follow a job with a progress bar until it ends; fails unless it succeeded.
    Watch { id: String },
    /// Cancel a job that has not finished.
    Cancel { id: String },
    /// A job's events, oldest first.
    Events { id: String },
}

#[derive(Args)]
pub struct AdaptersArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: AdaptersCommand,
}

#[derive(Subcommand)]
enum AdaptersCommand {
    /// Your adapters (the newest version of each).
    List,
    /// Add a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors) or an ESFT one
    /// (esft_config.json, esft_model.safetensors) as the next version of NAME, from SOURCE: a
    /// folder here (uploaded), an http(s):// or s3:// URL of one (read by the gateway), or
    /// file:///FOLDER on the gateway's machine (the operator's).
    Add {
        name: String,
        source: String,
        /// The base model it adapts.
        #[arg(long)]
        base_model: String,
    },
    /// Remove an adapter (every version).
    Rm { name: String },
}

#[derive(Args)]
pub struct KeysArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make an API key for a tenant (needs the operator's key); prints the key, shown once.
    Create {
        #[arg(long)]
        tenant: String,
        /// How long the key lasts: seconds, or a number with s, m, h or d (default: until
        /// revoked).
        #[arg(long, value_parser = parse_lifetime)]
        expires_in: Option<u64>,
    },
    /// Every tenant's keys, by id (never the key itself).
    List,
    /// Revoke a key by its id (as `tandem keys list` shows it): refused from then on.
    Revoke { id: String },
}

/// Seconds in `90`, `90s`, `15m`, `12h` or `30d`.
fn parse_lifetime(text: &str) -> Result<u64, String> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: a number of seconds, or one with s, m, h or d (30d)")),
    };
    let n: u64 = number.parse().map_err(|_| format!("{text:?}: no number"))?;
    n.checked_mul(scale).filter(|&s| s > 0).ok_or_else(|| format!("{text:?}: out of range"))
}

/// The gateway at `addr` (`HOST:PORT`, or `https://HOST:PORT` checked against the CA in
/// `ca_cert`).
fn gateway_endpoint(addr: &str, ca_cert: Option<&Path>) -> Result<Endpoint> {
    let Some(host_port) = addr.strip_prefix("https://") else {
        let plain = addr.strip_prefix("http://").unwrap_or(addr);
        return Endpoint::from_shared(format!("http://{plain}"))
            .with_context(|| format!("--gateway {addr:?} is not HOST:PORT"));
    };
    let ca =
        ca_cert.ok_or_else(|| anyhow!("--gateway {addr}: pass --ca-cert FILE, the CA that signed its certificate"))?;
    let pem = std::fs::read_to_string(ca).with_context(|| format!("--ca-cert {}", ca.display()))?;
    let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h).trim_matches(['[', ']']);
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)).domain_name(host);
    (Endpoint::from_shared(addr.to_string()).with_context(|| format!("--gateway {addr:?} is not https://HOST:PORT"))?)
        .tls_config(tls)
        .with_context(|| format!("--gateway {addr}"))
}

/// A connection to a gateway's job API, with the caller's key.
struct Client {
    api: ApiClient<Channel>,
    auth: MetadataValue<Ascii>,
    addr: String,
}

impl Client {
    async fn connect(args: &ApiArgs) -> Result<Self> {
        let key = match &args.api_key {
            Some(k) => k.clone(),
            // By hand: the workspace's clap has no `env` feature.
            None => std::env::var(secrets::KEY_VAR).unwrap_or_default(),
        };
        if key.trim().is_empty() {
            bail!("no API key: pass --api-key KEY or set {}", secrets::KEY_VAR);
        }
        let auth = format!("Bearer {}", key.trim())
            .parse()
            .map_err(|_| anyhow!("the API key has characters a request header cannot carry"))?;
        let addr = args.gateway.clone();
        let endpoint = gateway_endpoint(&addr, args.ca_cert.as_deref())?.connect_timeout(Duration::from_secs(5));
        let channel = endpoint.connect().await.with_context(|| format!("cannot reach the gateway at {addr}"))?;
        let api = ApiClient::new(channel)
            .max_encoding_message_size(MAX_API_MESSAGE)
            .max_decoding_message_size(MAX_API_MESSAGE);
        Ok(Client { api, auth, addr })
    }

    fn api(&self) -> ApiClient<Channel> {
        self.api.clone()
    }

    /// `msg` with the caller's key.
    fn req<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut().insert("authorization", self.auth.clone());
        req
    }

    fn reply<T>(&self, r: Result<Response<T>, Status>) -> Result<T> {
        r.map(Response::into_inner).map_err(|s| self.error(s))
    }

    /// The server's message, as it is: it names what was wrong.
    fn error(&self, s: Status) -> anyhow::Error {
        match s.code() {
            Code::Unimplemented => anyhow!("{} does not serve the job API: it is not a gateway", self.addr),
            // tonic's own words for a peer that is no gRPC server, or one that talks TLS.
            Code::Internal | Code::Unknown if s.message().starts_with("protocol error") => anyhow!(
                "{} does not answer as a gateway (`tandem up --http`, not `--grpc`): {}",
                self.addr,
                s.message()
            ),
            _ if s.message().is_empty() => anyhow!("the gateway at {} answered {:?}", self.addr, s.code()),
            Code::Unavailable => anyhow!("the gateway at {} is unavailable: {}", self.addr, s.message()),
            _ => anyhow!("{}", s.message()),
        }
    }
}

fn parse(json: &str) -> Result<Value> {
    serde_json::from_str(json).with_context(|| format!("the gateway's reply is not JSON: {json:?}"))
}

fn parse_all(list: &[String]) -> Result<Vec<Value>> {
    list.iter().map(|j| parse(j)).collect()
}

/// Runs `f` against the gateway `args` name.
fn with_client<T>(args: &ApiArgs, f: impl AsyncFnOnce(&Client) -> Result<T>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let client = Client::connect(args).await?;
        f(&client).await
    })
}

pub fn submit(args: SubmitArgs) -> Result<()> {
    let Submit::Finetune(job) = args.what;
    with_client(&args.api, async |c| {
        let training = upload(c, &job.data).await?;
        let validation = match &job.validation {
            Some(path) => Some(upload(c, path).await?),
            None => None,
        };
        let body = job_request(&job, &training, validation.as_deref());
        let created = c.reply(c.api().create_job(c.req(CreateJobRequest { request_json: body.to_string() })).await)?;
        let id = parse(&created.json)?["id"].as_str().unwrap_or_default().to_string();
        println!("{id}");
        if job.watch { watch(c, &id).await } else { Ok(()) }
    })
}

/// OpenAI's create body; hyperparameters left out are the cluster's defaults.
fn job_request(job: &FinetuneJobArgs, training: &str, validation: Option<&str>) -> Value {
    let mut hyper = Map::new();
    let mut set = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            hyper.insert(k.into(), v);
        }
    };
    set("n_epochs", job.epochs.map(Value::from));
    set("batch_size", job.batch_size.map(Value::from));
    set("learning_rate_multiplier", job.lr_multiplier.map(Value::from));
    set("lora_rank", job.rank.map(Value::from));
    json!({
        "model": job.model, "training_file": training, "validation_file": validation,
        "hyperparameters": hyper, "suffix": job.suffix, "seed": job.seed,
    })
}

/// Uploads a training file; returns its id.
async fn upload(c: &Client, path: &Path) -> Result<String> {
    let content = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if content.len() > MAX_API_MESSAGE - (1 << 20) {
        bail!(
            "{}: {} MiB is more than one upload may carry ({} MiB)",
            path.display(),
            content.len() >> 20,
            MAX_API_MESSAGE >> 20
        );
    }
    let filename = path.file_name().map_or("data.jsonl".into(), |n| n.to_string_lossy().into_owned());
    let req = UploadFileRequest { filename: filename.clone(), content };
    let file = parse(&c.reply(c.api().upload_file(c.req(req)).await)?.json)?;
    let id = file["id"].as_str().ok_or_else(|| anyhow!("the uploaded file has no id: {file}"))?.to_string();
    eprintln!("uploaded {filename} as {id}");
    Ok(id)
}

pub fn jobs(args: JobsArgs) -> Result<()> {
    with_client(&args.api, async |c| match &args.command {
        JobsCommand::List => {
            let jobs = parse_all(&c.reply(c.api().list_jobs(c.req(ListJobsRequest {})).await)?.json)?;
            print_jobs(&jobs);
            Ok(())
        }
        JobsCommand::Watch { id } => watch(c, id).await,
        JobsCommand::Cancel { id } => {
            let job = parse(&c.reply(c.api().cancel_job(c.req(JobRequest { id: id.clone() })).await)?.json)?;
            println!("job {id} {}", job["status"].as_str().unwrap_or("?"));
            Ok(())
        }
        JobsCommand::Events { id } => {
            let events = parse_all(&c.reply(c.api().job_events(c.req(JobRequest { id: id.clone() })).await)?.json)?;
            for e in events.iter().rev() {
                println!("{}  {}", utc(e["created_at"].as_u64().unwrap_or(0)), describe_event(e));
            }
            Ok(())
        }
    })
}

fn print_jobs(jobs: &[Value]) {
    let rows: Vec<[String; 5]> = jobs
        .iter()
        .map(|j| {
            let text = |k: &str| j[k].as_str().unwrap_or("-").to_string();
            [
                text("id"),
                text("status"),
                text("model"),
                text("fine_tuned_model"),
                utc(j["created_at"].as_u64().unwrap_or(0)),
            ]
        })
        .collect();
    table(["ID", "STATUS", "MODEL", "FINE-TUNED MODEL", "CREATED"], &rows);
}

/// Prints `rows` under `head`, each column as wide as its widest cell.
fn table<const N: usize>(head: [&str; N], rows: &[[String; N]]) {
    let mut widths = head.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(head.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` UTC (the civil calendar from days since 1970).
fn utc(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = tandem_worker::tokenizer::civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rem / 3600, rem / 60 % 60, rem % 60)
}

/// An event's message, with its throughput for a step.
fn describe_event(e: &Value) -> String {
    let message = e["message"].as_str().unwrap_or_default();
    match e["data"]["tokens_per_s"].as_f64() {
        Some(tps) if e["type"] == "metrics" => format!("{message} ({tps:.0} tokens/s)"),
        _ => message.to_string(),
    }
}

/// Follows job `id` until it ends: a progress bar (step, loss, tokens/s, time left) and its
/// events; then its final status and fine-tuned model. Fails unless the job succeeded.
async fn watch(c: &Client, id: &str) -> Result<()> {
    let mut updates = c.reply(c.api().watch_job(c.req(JobRequest { id: id.into() })).await)?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(500));
    let mut job = Value::Null;
    while let Some(update) = updates.message().await.map_err(|s| c.error(s))? {
        job = parse(&update.job_json)?;
        for e in parse_all(&update.events_json)? {
            show_event(&bar, &e);
        }
        if bar.length() == Some(0) {
            bar.set_message(job["status"].as_str().unwrap_or_default().to_string());
        }
    }
    bar.finish_and_clear();
    finished(id, &job)
}

fn show_event(bar: &ProgressBar, e: &Value) {
    let data = &e["data"];
    if e["type"] == "metrics" {
        let total = data["total_steps"].as_u64().unwrap_or(0);
        if bar.length() != Some(total) {
            // Training (re)started: the rate so far says nothing of the time left.
            bar.set_length(total);
            bar.reset_eta();
        }
        bar.set_position(data["step"].as_u64().unwrap_or(0));
        let (loss, tps) =
            (data["train_loss"].as_f64().unwrap_or(f64::NAN), data["tokens_per_s"].as_f64().unwrap_or(0.0));
        bar.set_message(format!("loss {loss:.4} {tps:.0} tok/s"));
    }
    // Without a terminal there is no bar: every event is a line, so logs show the progress.
    if bar.is_hidden() {
        eprintln!("{}", describe_event(e));
    } else if e["type"] != "metrics" {
        bar.println(describe_event(e));
    }
}

/// Prints how the job ended; an error unless it succeeded.
fn finished(id: &str, job: &Value) -> Result<()> {
    let status = job["status"].as_str().unwrap_or("unknown");
    match status {
        "succeeded" => {
            println!("job {id} succeeded");
            println!("fine-tuned model: {}", job["fine_tuned_model"].as_str().unwrap_or("-"));
            Ok(())
        }
        "failed" => {
            println!("job {id} failed");
            bail!("job {id} failed: {}", job["error"]["message"].as_str().unwrap_or("no reason given"))
        }
        "cancelled" => {
            println!("job {id} cancelled");
            bail!("job {id} was cancelled")
        }
        other => bail!("the gateway stopped sending updates of job {id} while it was {other}"),
    }
}

pub fn adapters(args: AdaptersArgs) -> Result<()> {
    with_client(&args.api, async |c| match &args.command {
        AdaptersCommand::List => {
            let list = parse_all(&c.reply(c.api().list_adapters(c.req(ListAdaptersRequest {})).await)?.json)?;
            let rows: Vec<[String; 4]> = list
                .iter()
                .map(|a| {
                    let checksum: String = a["checksum"].as_str().unwrap_or("-").chars().take(12).collect();
                    let text = |k: &str| a[k].as_str().map_or_else(|| a[k].to_string(), str::to_string);
                    [text("id"), text("version"), text("base_model"), checksum]
                })
                .collect();
            table(["NAME", "VERSION", "BASE MODEL", "CHECKSUM"], &rows);
            Ok(())
        }
        AdaptersCommand::Add { name, source, base_model } => {
            // A URL is the gateway's to read; anything else is a folder here, uploaded.
            let remote = ["http://", "https://", "s3://", "file://"].iter().any(|s| source.starts_with(s));
            let (files, source) = match remote {
                true => (Vec::new(), source.clone()),
                false => (adapter_files(Path::new(source))?, String::new()),
            };
            let req = PutAdapterRequest { name: name.clone(), base_model: base_model.clone(), files, source };
            let adapter = parse(&c.reply(c.api().put_adapter(c.req(req)).await)?.json)?;
            println!("added {name} version {} (base model {base_model})", adapter["version"]);
            Ok(())
        }
        AdaptersCommand::Rm { name } => {
            c.reply(c.api().delete_adapter(c.req(DeleteAdapterRequest { name: name.clone() })).await)?;
            println!("removed {name}");
            Ok(())
        }
    })
}

/// The files of a PEFT or ESFT adapter folder.
fn adapter_files(dir: &Path) -> Result<Vec<AdapterFile>> {
    if !dir.is_dir() {
        bail!("{}: no such folder", dir.display());
    }
    let complete = |names: &[&str]| names.iter().all(|n| dir.join(n).is_file());
    let names = match (complete(&PEFT_FILES), complete(&ESFT_FILES)) {
        (true, _) => PEFT_FILES,
        (false, true) => ESFT_FILES,
        (false, false) => bail!(
            "{}: neither a PEFT adapter ({}) nor an ESFT one ({})",
            dir.display(),
            PEFT_FILES.join(", "),
            ESFT_FILES.join(", ")
        ),
    };
    let read = |name: &str| {
        let path = dir.join(name);
        let content = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(AdapterFile { name: name.into(), content })
    };
    let files = names.iter().map(|n| read(n)).collect::<Result<Vec<_>>>()?;
    let total: usize = files.iter().map(|f| f.content.len()).sum();
    if total > MAX_API_MESSAGE - (1 << 20) {
        bail!(
            "{}: {} MiB is more than one upload may carry ({} MiB)",
            dir.display(),
            total >> 20,
            MAX_API_MESSAGE >> 20
        );
    }
    Ok(files)
}

pub fn keys(args: KeysArgs) -> Result<()> {
    with_client(&args.api, async |c| match &args.command {
        KeysCommand::Create { tenant, expires_in } => {
            let req = CreateKeyRequest { tenant: tenant.clone(), expires_in: *expires_in };
            let key = parse(&c.reply(c.api().create_key(c.req(req)).await)?.json)?;
            let until =
                key["expires_at"].as_u64().map_or_else(|| "until revoked".into(), |t| format!("until {}", utc(t)));
            let id = key["id"].as_str().unwrap_or("?");
            eprintln!("API key {id} for tenant {tenant}, {until} (shown once: keep it):");
            println!("{}", key["key"].as_str().ok_or_else(|| anyhow!("the reply has no key: {key}"))?);
            Ok(())
        }
        KeysCommand::List => {
            let list = parse_all(&c.reply(c.api().list_keys(c.req(ListKeysRequest {})).await)?.json)?;
            let time = |v: &Value| v.as_u64().map_or_else(|| "-".into(), utc);
            let rows: Vec<[String; 4]> = (list.iter())
                .map(|k| {
                    let text = |f: &str| k[f].as_str().unwrap_or_default().to_string();
                    [text("id"), text("tenant"), time(&k["created_at"]), time(&k["expires_at"])]
                })
                .collect();
            table(["ID", "TENANT", "CREATED", "EXPIRES"], &rows);
            Ok(())
        }
        KeysCommand::Revoke { id } => {
            c.reply(c.api().revoke_key(c.req(RevokeKeyRequest { id: id.clone() })).await)?;
            println!("revoked {id}");
            Ok(())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_read_units_and_refuse_the_rest() {
        assert_eq!(parse_lifetime("90"), Ok(90));
        assert_eq!(parse_lifetime("15m"), Ok(900));
        assert_eq!(parse_lifetime("30d"), Ok(2_592_000));
        for bad in ["", "0", "d", "1w", "-5", "1.5h", "99999999999999999999d"] {
            assert!(parse_lifetime(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn utc_dates_follow_the_calendar() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20");
    }
}
