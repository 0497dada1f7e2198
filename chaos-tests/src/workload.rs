//! The workload: OpenAI-style clients of a few tenants, each a thread that picks, by its seed,
//! a gateway and an operation (completions, streamed or not; adapter uploads, deletes and
//! reads over a few shared names, so operations on one adapter overlap; short fine-tuning jobs
//! made, cancelled and read by every client of their tenant), and records each in the
//! [`History`]. Bounded in count and in time; a client that finds its gateway gone goes on
//! with another, as a client with several endpoints does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::json;
use tandem_worker::rng::Xoshiro256;

use crate::client::{Request, Response, exchange, multipart};
use crate::cluster::MODEL;
use crate::history::{Answer, History, Op, Outcome};
use crate::models::JobState;

/// The adapter names each tenant's clients share.
pub const NAMES: [&str; 2] = ["a", "b"];
/// Fine-tuning jobs the clients of a tenant make in a run, at most (bar creates never
/// answered), so that training does not crowd out the rest.
const JOBS_PER_TENANT: usize = 8;
/// Epochs of those jobs over their tenant's training file (16 steps each): a second or two of
/// training, so cancels meet them queued, running and ended.
const SHORT_JOB_EPOCHS: u32 = 3;

/// A tenant and its API key.
#[derive(Clone, Debug)]
pub struct Tenant {
    pub name: String,
    pub key: String,
}

/// What the clients share.
#[derive(Clone)]
pub struct Workload {
    pub gateways: Vec<SocketAddr>,
    pub tenants: Vec<Tenant>,
    /// The adapter's files, uploaded as every version.
    pub adapter: Arc<Vec<(String, Vec<u8>)>>,
    pub history: History,
    /// Set to stop every client after its current operation.
    pub stop: Arc<AtomicBool>,
    /// At most this many operations per client.
    pub max_ops: usize,
    /// Streams are read this far and then dropped (clients that go away mid-stream).
    pub hang_up_after: Option<usize>,
    /// Every exchange's bound.
    pub timeout: Duration,
    /// Each tenant's training file (by tenant name), for the jobs its clients make.
    pub files: BTreeMap<String, String>,
    /// The jobs the clients made, by tenant name.
    pub jobs: Arc<Mutex<BTreeMap<String, Vec<String>>>>,
}

impl Workload {
    /// Starts `clients` clients, client `i` of tenant `i % tenants` with its own seed.
    pub fn spawn(&self, clients: usize, seed: u64) -> Vec<JoinHandle<()>> {
        (0..clients)
            .map(|i| {
                let w = self.clone();
                std::thread::spawn(move || w.client(i, Xoshiro256::seed_from_u64(seed.wrapping_mul(1000) + i as u64)))
            })
            .collect()
    }

    fn client(&self, i: usize, mut rng: Xoshiro256) {
        let tenant = &self.tenants[i % self.tenants.len()];
        for _ in 0..self.max_ops {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let gateway = self.gateways[rng.below(self.gateways.len() as u64) as usize];
            let name = NAMES[rng.below(NAMES.len() as u64) as usize];
            match rng.below(100) {
                0..40 => self.complete(i, gateway, &tenant.key, false),
                40..55 => self.complete(i, gateway, &tenant.key, true),
                55..70 => self.put_adapter(i, gateway, tenant, name),
                70..80 => self.delete_adapter(i, gateway, tenant, name),
                80..90 => self.list_adapters(i, gateway, tenant),
                _ => self.job_op(i, gateway, tenant, &mut rng),
            };
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A greedy completion of a few tokens.
    pub fn complete(&self, client: usize, gateway: SocketAddr, key: &str, stream: bool) -> Outcome {
        let body =
            json!({"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": stream}).to_string();
        let hang_up = self.hang_up_after.filter(|_| stream);
        self.history.record(client, gateway, Op::Complete { stream }, || {
            let result =
                exchange(gateway, &Request::json("POST", "/v1/completions", key, &body), self.timeout, hang_up);
            Outcome::of(result, |r| completed(r, stream))
        })
    }

    fn put_adapter(&self, client: usize, gateway: SocketAddr, tenant: &Tenant, name: &str) -> Outcome {
        let files: Vec<(&str, &str, &[u8])> =
            self.adapter.iter().map(|(f, b)| ("file", f.as_str(), b.as_slice())).collect();
        let (content_type, body) = multipart(&[("name", name), ("base_model", MODEL)], &files);
        let op = Op::PutAdapter { tenant: tenant.name.clone(), name: name.into() };
        self.history.record(client, gateway, op, || {
            let req = Request {
                method: "POST",
                path: "/v1/adapters",
                key: Some(&tenant.key),
                content_type: &content_type,
                body: &body,
            };
            Outcome::of(exchange(gateway, &req, self.timeout, None), |r| {
                r.json()["version"].as_u64().map(Answer::Version)
            })
        })
    }

    fn delete_adapter(&self, client: usize, gateway: SocketAddr, tenant: &Tenant, name: &str) -> Outcome {
        let op = Op::DeleteAdapter { tenant: tenant.name.clone(), name: name.into() };
        let path = format!("/v1/adapters/{name}");
        self.history.record(client, gateway, op, || {
            let result = exchange(gateway, &Request::json("DELETE", &path, &tenant.key, ""), self.timeout, None);
            match Outcome::of(result, |r| (r.json()["deleted"] == true).then_some(Answer::Deleted)) {
                // Not there when read (404), or gone by the time the delete applied (409).
                Outcome::Refused { status: 404 | 409, .. } => Outcome::Ok(Answer::NotFound),
                other => other,
            }
        })
    }

    /// An operation on the tenant's own jobs: a new one (the first, then one in ten while
    /// there are fewer than [`JOBS_PER_TENANT`]), or a cancel (three in ten) or a read of one.
    fn job_op(&self, client: usize, gateway: SocketAddr, tenant: &Tenant, rng: &mut Xoshiro256) -> Outcome {
        let made = self.jobs_of(&tenant.name);
        let roll = rng.below(10);
        if made.is_empty() || (roll == 0 && made.len() < JOBS_PER_TENANT) {
            let Some(file) = self.files.get(&tenant.name) else { return self.list_adapters(client, gateway, tenant) };
            let outcome = self.create_job(client, gateway, tenant, file, SHORT_JOB_EPOCHS, 16);
            if let Outcome::Ok(Answer::Made { id }) = &outcome {
                self.jobs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(tenant.name.clone())
                    .or_default()
                    .push(id.clone());
            }
            return outcome;
        }
        let job = &made[rng.below(made.len() as u64) as usize];
        if roll < 4 {
            self.cancel_job(client, gateway, tenant, job)
        } else {
            self.get_job(client, gateway, tenant, job)
        }
    }

    /// The jobs `tenant`'s clients made.
    pub fn jobs_of(&self, tenant: &str) -> Vec<String> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).get(tenant).cloned().unwrap_or_default()
    }

    /// Job `id` of `tenant`, read; recorded as client `client`.
    pub fn get_job(&self, client: usize, gateway: SocketAddr, tenant: &Tenant, id: &str) -> Outcome {
        let path = format!("/v1/fine_tuning/jobs/{id}");
        self.history.record(client, gateway, Op::GetJob { job: id.into() }, || {
            let result = exchange(gateway, &Request::json("GET", &path, &tenant.key, ""), self.timeout, None);
            match Outcome::of(result, job_shown) {
                Outcome::Refused { status: 404, .. } => Outcome::Ok(Answer::NotFound),
                other => other,
            }
        })
    }

    fn cancel_job(&self, client: usize, gateway: SocketAddr, tenant: &Tenant, id: &str) -> Outcome {
        let path = format!("/v1/fine_tuning/jobs/{id}/cancel");
        self.history.record(client, gateway, Op::CancelJob { job: id.into() }, || {
            let result = exchange(gateway, &Request::json("POST", &path, &tenant.key, ""), self.timeout, None);
            match Outcome::of(result, job_shown) {
                Outcome::Refused { status: 404, .. } => Outcome::Ok(Answer::NotFound),
                Outcome::Refused { status: 409, retry_after, body } => match ended_in(&body) {
                    Some(state) => Outcome::Ok(Answer::JobEnded(state)),
                    None => Outcome::Refused { status: 409, retry_after, body },
                },
                other => other,
            }
        })
    }

    /// Every adapter of `tenant`, latest versions; recorded as client `client`.
    pub fn list_adapters(&self, client: usize, gateway: SocketAddr, tenant: &Tenant) -> Outcome {
        let op = Op::ListAdapters { tenant: tenant.name.clone() };
        self.history.record(client, gateway, op, || {
            let result = exchange(gateway, &Request::json("GET", "/v1/adapters", &tenant.key, ""), self.timeout, None);
            Outcome::of(result, |r| {
                let data = r.json()["data"].as_array()?.clone();
                let latest: Option<BTreeMap<String, u64>> =
                    data.iter().map(|a| Some((a["id"].as_str()?.to_string(), a["version"].as_u64()?))).collect();
                latest.map(Answer::Adapters)
            })
        })
    }
}

/// The runner's own requests: files and jobs made once at the start, checkpoints watched.
impl Workload {
    /// An API key for `tenant`, made with the operator's key.
    pub fn create_key(&self, client: usize, gateway: SocketAddr, operator: &str, tenant: &str) -> Outcome {
        let body = json!({"tenant": tenant}).to_string();
        self.history.record(client, gateway, Op::CreateKey, || {
            let req = Request::json("POST", "/v1/admin/api-keys", operator, &body);
            Outcome::of(exchange(gateway, &req, self.timeout, None), |r| {
                r.json()["key"].as_str().map(|k| Answer::Key { key: k.into() })
            })
        })
    }

    /// Uploads `content` as a training file of `tenant`.
    pub fn upload_file(&self, client: usize, gateway: SocketAddr, tenant: &Tenant, content: &[u8]) -> Outcome {
        let (content_type, body) = multipart(&[("purpose", "fine-tune")], &[("file", "train.jsonl", content)]);
        self.history.record(client, gateway, Op::UploadFile { tenant: tenant.name.clone() }, || {
            let req = Request {
                method: "POST",
                path: "/v1/files",
                key: Some(&tenant.key),
                content_type: &content_type,
                body: &body,
            };
            Outcome::of(exchange(gateway, &req, self.timeout, None), made)
        })
    }

    /// A fine-tuning job of `tenant` on `file`: `epochs` over it, 4 examples a step, a
    /// checkpoint every `every` steps.
    pub fn create_job(
        &self,
        client: usize,
        gateway: SocketAddr,
        tenant: &Tenant,
        file: &str,
        epochs: u32,
        every: u64,
    ) -> Outcome {
        let hyper = json!({"n_epochs": epochs, "batch_size": 4, "checkpoint_every": every});
        let body = json!({"model": MODEL, "training_file": file, "seed": 1, "hyperparameters": hyper}).to_string();
        self.history.record(client, gateway, Op::CreateJob { tenant: tenant.name.clone() }, || {
            Outcome::of(
                exchange(
                    gateway,
                    &Request::json("POST", "/v1/fine_tuning/jobs", &tenant.key, &body),
                    self.timeout,
                    None,
                ),
                made,
            )
        })
    }

    /// The steps of job `id`'s checkpoints.
    pub fn list_checkpoints(&self, client: usize, gateway: SocketAddr, tenant: &Tenant, id: &str) -> Outcome {
        let path = format!("/v1/fine_tuning/jobs/{id}/checkpoints?limit=100");
        self.history.record(client, gateway, Op::ListCheckpoints { job: id.into() }, || {
            Outcome::of(exchange(gateway, &Request::json("GET", &path, &tenant.key, ""), self.timeout, None), |r| {
                let data = r.json()["data"].as_array()?.clone();
                let steps: Option<Vec<u64>> = data.iter().map(|c| c["step_number"].as_u64()).collect();
                steps.map(Answer::Checkpoints)
            })
        })
    }
}

/// The id of the object a 2xx made.
fn made(r: &Response) -> Option<Answer> {
    r.json()["id"].as_str().map(|id| Answer::Made { id: id.into() })
}

/// The state a job object shows.
fn job_shown(r: &Response) -> Option<Answer> {
    r.json()["status"].as_str().and_then(JobState::of_status).map(Answer::JobShown)
}

/// The state a cancel's 409 says the job had ended in (`job "ID" is succeeded already`).
fn ended_in(body: &str) -> Option<JobState> {
    let error: serde_json::Value = serde_json::from_str(body).ok()?;
    let message = error["error"]["message"].as_str()?.to_lowercase();
    let status = message.strip_suffix(" already")?.rsplit(' ').next()?;
    JobState::of_status(status).filter(|s| *s != JobState::Active)
}

/// Whether a 2xx completion is whole: a non-streamed one has its choice; a stream ends with
/// `[DONE]` and carries no error event (a worker that fails mid-stream is reported in-band).
fn completed(r: &Response, stream: bool) -> Option<Answer> {
    if !stream {
        return r.json()["choices"][0]["text"].is_string().then_some(Answer::Completed);
    }
    let events: Vec<&str> = r.body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    let whole = events.last() == Some(&"[DONE]") && !events.iter().any(|e| e.starts_with("{\"error\""));
    whole.then_some(Answer::Completed)
}
