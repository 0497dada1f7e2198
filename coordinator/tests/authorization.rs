//! Authorization by role over mutual TLS (the testkit's in-process cluster, every process with
//! a certificate of the test's CA): what a worker's certificate may do at a coordinator and at
//! another worker, against what an operator's may.

#![allow(clippy::unwrap_used)] // tests unwrap by design

use tandem_proto::contract::{Command, JobReport, Proposal, Reply, WorkerRegistration, sha256_hex};
use tandem_proto::v1::raft_client::RaftClient;
use tandem_proto::v1::worker_client::WorkerClient;
use tandem_proto::v1::{GenerateRequest, RaftMessage};
use tandem_proto::{ClientError, Role};
use tandem_testkit::InProcessCluster;

fn registration(id: &str) -> WorkerRegistration {
    WorkerRegistration {
        worker_id: id.into(),
        addr: "127.0.0.1:1".into(),
        gpus: Vec::new(),
        collective_addr: String::new(),
    }
}

fn denied<T: std::fmt::Debug>(result: Result<T, ClientError>) {
    assert!(matches!(result, Err(ClientError::Denied(_))), "{result:?}");
}

#[test]
fn a_workers_certificate_acts_as_itself_only_and_an_operators_runs_the_cluster() {
    let cluster = InProcessCluster::start("authorization", 1, 2);
    let leader = cluster.leader();
    let w1 = cluster.client_as(leader, Role::Worker, "w1");
    let operator = cluster.client(leader);
    let key =
        Command::CreateApiKey { tenant: "mallory".into(), key_sha256: sha256_hex(b"tk-minted"), expires_at: None };
    cluster.block_on(async {
        // A worker reads the state and heartbeats as itself...
        assert!(w1.status(true).await.unwrap().state.is_some());
        w1.heartbeat("w1", None).await.unwrap();
        // ...and nothing as another worker, nor an operator's calls.
        denied(w1.heartbeat("w2", None).await);
        denied(w1.register_worker(registration("w2")).await);
        denied(w1.propose("mint", key.clone()).await);
        denied(w1.change_members(Vec::new(), vec![leader]).await);
        denied(w1.transfer_leader(leader).await);
        // A report of a job that is not its attempt is refused before it reaches the log.
        let report =
            Command::ReportJob { id: "job-x".into(), epoch: 1, report: JobReport::Running { step: 0, plan: None } };
        denied(w1.propose_as(Proposal::new("report", report)).await);

        // Raft messages come from coordinators only.
        let raft = cluster.security(Role::Worker, "w1").endpoint(w1.addr(), Role::Coordinator).unwrap();
        let mut raft = RaftClient::new(raft.connect().await.unwrap());
        let step = raft.step(RaftMessage { message: Vec::new(), from_addr: String::new() }).await.unwrap_err();
        assert_eq!(step.code(), tonic::Code::PermissionDenied, "{step}");

        // A worker's Generate answers the gateway's coordinators and operators, not a worker.
        let at = cluster.worker_addr("w2").to_string();
        let request = || GenerateRequest { prompt: "Hi".into(), max_tokens: Some(1), top_p: 1.0, ..Default::default() };
        let as_worker = cluster.security(Role::Worker, "w1").endpoint(&at, Role::Worker).unwrap();
        let refused = WorkerClient::new(as_worker.connect().await.unwrap()).generate(request()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
        let as_operator = cluster.security(Role::Operator, "operator").endpoint(&at, Role::Worker).unwrap();
        let mut events = WorkerClient::new(as_operator.connect().await.unwrap()).generate(request()).await.unwrap();
        assert!(events.get_mut().message().await.unwrap().is_some());

        // The operator's certificate does what the worker's could not.
        assert_eq!(operator.propose("mint", key).await.unwrap(), Reply::Done);
        operator.register_worker(registration("w9")).await.unwrap();
    });
    let state = cluster.state(leader).unwrap();
    assert_eq!(state.api_keys.len(), 1, "{:?}", state.api_keys);
}
