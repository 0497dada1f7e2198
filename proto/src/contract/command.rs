//! Every change the coordinator replicates ([`Command`]), as proposed to its log
//! ([`Proposal`]), and what applying it returned ([`Reply`]).

use serde::{Deserialize, Serialize};

use super::Invalid;
use super::cluster::{File, Gpu, Placement};
use super::job::{JobReport, JobSpec};
use super::names::{check_addr, check_name, check_tenant, check_uri};

/// A change to the state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    RegisterWorker {
        id: String,
        addr: String,
        gpus: Vec<Gpu>,
        /// Its collective address: a group worker (see [`super::Worker::collective_addr`]).
        #[serde(default)]
        collective_addr: String,
    },
    /// Its lease expired: its jobs go back to the queue (from their last checkpoint) and its
    /// place in each worker group goes to the alive group worker holding the fewest shards, at
    /// the group's next epoch (the group is dropped when there is none).
    MarkWorkerDead {
        id: String,
    },
    /// Drains worker `id` (`drain`), or puts it back in service: see [`super::Worker::draining`].
    DrainWorker {
        id: String,
        drain: bool,
    },
    RegisterModel {
        name: String,
        uri: String,
    },
    /// Forgets base model `name`; refused while a job not yet ended, a worker group or an
    /// adapter uses it.
    RemoveModel {
        name: String,
    },
    /// A new version of a tenant's adapter (version 1 for a new name).
    PutAdapter {
        tenant: String,
        name: String,
        base_model: String,
        checksum: String,
        uri: String,
    },
    DeleteAdapter {
        tenant: String,
        name: String,
    },
    SubmitJob {
        id: String,
        tenant: String,
        spec: JobSpec,
        /// The adapter its success registers (a new version when the name exists).
        #[serde(default)]
        adapter: Option<String>,
    },
    /// Starts a new attempt of a queued job on `worker`, with the next epoch.
    PlaceJob {
        id: String,
        worker: String,
    },
    /// What an attempt reports; refused unless `epoch` is the job's current one.
    ReportJob {
        id: String,
        epoch: u64,
        report: JobReport,
    },
    CancelJob {
        id: String,
    },
    SetPlacement {
        group: String,
        placement: Placement,
    },
    /// A tenant's API key, known by its SHA-256 (hex): the key itself is never stored.
    CreateApiKey {
        tenant: String,
        key_sha256: String,
        /// Unix seconds after which the key is refused; none: it lasts until revoked.
        #[serde(default)]
        expires_at: Option<u64>,
    },
    /// Forgets the key whose [`super::ApiKey::id`] is `id`: every gateway refuses it from its
    /// next view of the state on.
    RevokeApiKey {
        id: String,
    },
    /// Sets what `tenant` may use (all unset: no limits).
    SetLimits {
        tenant: String,
        limits: super::TenantLimits,
    },
    PutFile {
        id: String,
        file: File,
    },
    DeleteFile {
        tenant: String,
        id: String,
    },
    RemovePlacement {
        group: String,
    },
    /// Places base `model` as a tensor-parallel group of `size` ranks over the alive group
    /// workers that are in no group yet (by id), at epoch 1.
    CreateGroup {
        group: String,
        model: String,
        size: usize,
        /// Spread a MoE model's experts whole over the ranks (see [`Placement::expert_parallel`]).
        #[serde(default)]
        expert_parallel: bool,
    },
    /// A member of `group` saw the group's collectives fail at `epoch`; `blame` is the rank
    /// the error named, if it named one. The group is formed again at the next epoch, with the
    /// blamed rank (and any dead member) replaced by a spare group worker where there is one.
    /// Refused for another epoch: the failure of an older formation is old news.
    GroupFailed {
        group: String,
        epoch: u64,
        #[serde(default)]
        blame: Option<usize>,
    },
    /// Rank 0 of `group` is connected to every rank at `epoch`: the group serves.
    GroupFormed {
        group: String,
        epoch: u64,
    },
}

impl Command {
    /// Checks every identifier, name, path and address the command would write into the
    /// replicated state; what it refers to (a job that exists, an alive worker) is the state
    /// machine's to check.
    pub fn validate(&self) -> Result<(), Invalid> {
        match self {
            Command::RegisterWorker { id, addr, gpus, collective_addr } => {
                check_name("worker id", id)?;
                check_addr("worker address", addr, false)?;
                check_addr("collective address", collective_addr, true)?;
                for model in gpus.iter().flat_map(|g| &g.models) {
                    check_name("model", model)?;
                }
                Ok(())
            }
            Command::MarkWorkerDead { id } | Command::DrainWorker { id, .. } => check_name("worker id", id),
            Command::RegisterModel { name, uri } => {
                check_name("model", name)?;
                check_uri("model uri", uri)
            }
            Command::RemoveModel { name } => check_name("model", name),
            Command::PutAdapter { tenant, name, base_model, checksum, uri } => {
                check_tenant(tenant)?;
                check_name("adapter", name)?;
                check_name("model", base_model)?;
                if checksum.len() > 128 || !checksum.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(Invalid(format!("checksum {checksum:?} is not hex")));
                }
                check_uri("adapter uri", uri)
            }
            Command::DeleteAdapter { tenant, name } => {
                check_tenant(tenant)?;
                check_name("adapter", name)
            }
            Command::SubmitJob { id, tenant, spec, adapter } => {
                check_name("job id", id)?;
                check_tenant(tenant)?;
                if let Some(a) = adapter {
                    check_name("adapter", a)?;
                }
                spec.validate()
            }
            Command::PlaceJob { id, worker } => {
                check_name("job id", id)?;
                check_name("worker id", worker)
            }
            Command::ReportJob { id, report, .. } => {
                check_name("job id", id)?;
                report.validate()
            }
            Command::CancelJob { id } => check_name("job id", id),
            Command::SetPlacement { group, placement } => {
                check_name("group", group)?;
                check_name("model", &placement.model)?;
                placement.workers.iter().try_for_each(|w| check_name("worker id", w))
            }
            Command::CreateApiKey { tenant, key_sha256, .. } => {
                check_tenant(tenant)?;
                match key_sha256.len() == 64 && key_sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                    true => Ok(()),
                    false => Err(Invalid("key_sha256 must be 64 hex digits".into())),
                }
            }
            Command::RevokeApiKey { id } => check_name("key id", id),
            Command::SetLimits { tenant, .. } => check_tenant(tenant),
            Command::PutFile { id, file } => {
                check_name("file id", id)?;
                check_tenant(&file.tenant)?;
                check_uri("file uri", &file.uri)
            }
            Command::DeleteFile { tenant, id } => {
                check_tenant(tenant)?;
                check_name("file id", id)
            }
            Command::RemovePlacement { group } => check_name("group", group),
            Command::CreateGroup { group, model, .. } => {
                check_name("group", group)?;
                check_name("model", model)
            }
            Command::GroupFailed { group, .. } | Command::GroupFormed { group, .. } => check_name("group", group),
        }
    }
}

/// A command as proposed to the log: the client's request id makes a retry apply once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub request_id: String,
    pub command: Command,
    /// When it was proposed (Unix seconds, the proposer's clock): apply reads no clock, so the
    /// times it records come from here.
    #[serde(default)]
    pub at: u64,
}

impl Proposal {
    /// A proposal stamped with this machine's time.
    pub fn new(request_id: impl Into<String>, command: Command) -> Self {
        Proposal { request_id: request_id.into(), command, at: unix_now() }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A request id no other request has: what it is for, and the time in nanoseconds.
pub fn fresh_id(what: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{what}-{nanos}")
}

/// What applying a proposal returned (the same for every replica).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    Done,
    /// The adapter version created.
    Version {
        version: u64,
    },
    /// The attempt's epoch.
    Epoch {
        epoch: u64,
    },
    /// Refused; the state did not change.
    Refused {
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_with_bad_fields_are_invalid() {
        let ok = Command::RegisterWorker {
            id: "w1".into(),
            addr: "127.0.0.1:9".into(),
            gpus: vec![],
            collective_addr: String::new(),
        };
        assert!(ok.validate().is_ok());
        let bad = Command::RegisterWorker {
            id: "../w1".into(),
            addr: "127.0.0.1:9".into(),
            gpus: vec![],
            collective_addr: String::new(),
        };
        assert!(bad.validate().is_err());
        let key = Command::CreateApiKey { tenant: "acme".into(), key_sha256: "not-a-hash".into(), expires_at: None };
        assert!(key.validate().is_err());
        let model = Command::RegisterModel { name: "tiny".into(), uri: "/models/../../etc".into() };
        assert!(model.validate().is_err());
    }
}
