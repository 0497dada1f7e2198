//! What the clients did and saw: every operation's invocation and completion, timed from the
//! run's start, with its outcome classified by what it proves (it happened, it did not, or it
//! may have). The checkers read nothing else.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::{Failure, Response};
use crate::models::JobState;

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A completion of the base model, streamed or not.
    Complete {
        stream: bool,
    },
    /// Upload of adapter `name` (its next version).
    PutAdapter {
        tenant: String,
        name: String,
    },
    DeleteAdapter {
        tenant: String,
        name: String,
    },
    /// `GET /v1/adapters`: the latest version of every adapter of `tenant`.
    ListAdapters {
        tenant: String,
    },
    /// A tenant's API key made by the operator (the runner's probe of writes).
    CreateKey,
    /// A training file uploaded by `tenant`.
    UploadFile {
        tenant: String,
    },
    /// A fine-tuning job created by `tenant`.
    CreateJob {
        tenant: String,
    },
    /// A fine-tuning job cancelled by its tenant.
    CancelJob {
        job: String,
    },
    /// A fine-tuning job read by its tenant.
    GetJob {
        job: String,
    },
    /// A job's checkpoints, read.
    ListCheckpoints {
        job: String,
    },
}

impl Op {
    /// Whether it changes the replicated state.
    pub fn writes(&self) -> bool {
        matches!(
            self,
            Op::PutAdapter { .. }
                | Op::DeleteAdapter { .. }
                | Op::CreateKey
                | Op::UploadFile { .. }
                | Op::CreateJob { .. }
                | Op::CancelJob { .. }
        )
    }
}

/// What a successful operation answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A whole completion (a stream ended by `[DONE]`).
    Completed,
    /// The version an upload made.
    Version(u64),
    Deleted,
    /// A delete of a name that does not exist (404 before, or 409 at, the proposal); a job
    /// read or cancel of an id there is no job of (404).
    NotFound,
    /// Each adapter's latest version.
    Adapters(BTreeMap<String, u64>),
    /// A key.
    Key {
        key: String,
    },
    /// The id of a file or a job made.
    Made {
        id: String,
    },
    /// A job's checkpoints' steps.
    Checkpoints(Vec<u64>),
    /// A job's state, as a read or a cancel that took showed it.
    JobShown(JobState),
    /// A cancel refused (409) because the job had ended, in this state.
    JobEnded(JobState),
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok(Answer),
    /// An HTTP answer that says it was not done (a 4xx, a 503 before any effect is possible).
    Refused {
        status: u16,
        retry_after: bool,
        body: String,
    },
    /// It may or may not have taken effect: cut mid-answer, timed out, or a 5xx.
    Unknown(String),
    /// Never sent: no connection.
    NotSent(String),
}

impl Outcome {
    /// What an HTTP exchange's result says; `parse` reads a 2xx body into the answer.
    pub fn of(result: Result<Response, Failure>, parse: impl FnOnce(&Response) -> Option<Answer>) -> Outcome {
        match result {
            Err(Failure::Connect(e)) => Outcome::NotSent(e),
            Err(Failure::Cut(e)) => Outcome::Unknown(e),
            Ok(r) if (200..300).contains(&r.status) => match parse(&r) {
                Some(a) => Outcome::Ok(a),
                None => Outcome::Unknown(format!("{}: an answer that does not parse: {}", r.status, r.body)),
            },
            Ok(r) => {
                let retry_after = r.header("retry-after").is_some();
                Outcome::Refused { status: r.status, retry_after, body: r.body }
            }
        }
    }

    pub fn ok(&self) -> bool {
        matches!(self, Outcome::Ok(_))
    }

    /// Whether it may or may not have taken effect: no whole answer, or a 5xx.
    pub fn unknown(&self) -> bool {
        matches!(self, Outcome::Unknown(_) | Outcome::Refused { status: 500.., .. })
    }
}

/// One operation, as its client saw it.
#[derive(Clone, Debug)]
pub struct Event {
    pub client: usize,
    pub gateway: SocketAddr,
    pub op: Op,
    /// When it was invoked and when it returned, from the run's start.
    pub call: Duration,
    pub ret: Duration,
    pub outcome: Outcome,
}

/// The run's history, appended to by every client at once.
#[derive(Clone)]
pub struct History {
    start: Instant,
    events: Arc<Mutex<Vec<Event>>>,
}

impl History {
    pub fn new() -> Self {
        History { start: Instant::now(), events: Arc::default() }
    }

    /// Time since the run's start.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// `at` as time since the run's start.
    pub fn at(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.start)
    }

    /// Runs `f` as operation `op` of `client` against `gateway`, recording it.
    pub fn record(&self, client: usize, gateway: SocketAddr, op: Op, f: impl FnOnce() -> Outcome) -> Outcome {
        let call = self.now();
        let outcome = f();
        let event = Event { client, gateway, op, call, ret: self.now(), outcome: outcome.clone() };
        self.events.lock().unwrap_or_else(|e| e.into_inner()).push(event);
        outcome
    }

    /// Every event so far, in the order they returned.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}
