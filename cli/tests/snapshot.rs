//! Backup and restore: the state of a three-coordinator group (models, keys, files, jobs,
//! adapters) saved with `tandem snapshot save`, the group's folders wiped, three fresh
//! coordinators seeded with `tandem snapshot restore`: everything is back, the tenant's key
//! still opens the gateway and reads its file, and the new group goes on writing.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use tandem_proto::contract::{Command, FileRef, JobSpec, MethodChoice, Reply};
use tandem_testkit::http::{self, call_json as call};
use tandem_testkit::{CoordinatorOptions, Coordinators, free_addr, secret_file, wait_for};

use common::TANDEM;

const ADMIN: &str = "sk-admin-snapshot";
const TRAINING: &str = "{\"prompt\": \"a\", \"completion\": \"b\"}\n";

fn gateway_up(addr: &str) -> Option<()> {
    std::net::TcpStream::connect(addr).ok()?;
    (http::http(addr, "GET", "/health", None, None).0 == 200).then_some(())
}

#[test]
fn a_saved_state_restored_into_three_fresh_coordinators_is_all_back() {
    let mut group = Coordinators::start(TANDEM, "snapshot", CoordinatorOptions::default());
    let dir = group.dir().to_path_buf();
    let (blobs, key_file, http_addr) = (dir.join("blobs"), secret_file(&dir.join("admin-key"), ADMIN), free_addr());
    let gateway =
        ["--http", &http_addr, "--api-key-file", key_file.to_str().unwrap(), "--blobs", blobs.to_str().unwrap()];
    group.kill(1);
    group.spawn(1, &gateway);
    wait_for(60, "the gateway", || gateway_up(&http_addr));

    // A tenant's key and file through the gateway; a model, a job and an adapter as commands.
    let key = http::tenant_key(&http_addr, ADMIN, "alice");
    let (status, file) = http::upload(&http_addr, &key, "train.jsonl", TRAINING);
    assert_eq!(status, 200, "{file}");
    let file: serde_json::Value = serde_json::from_str(&file).unwrap();
    let file_id = file["id"].as_str().unwrap().to_string();
    let training_file =
        FileRef { id: file_id.clone(), uri: blobs.join("files").join(&file_id).to_string_lossy().into() };
    let commands = [
        Command::RegisterModel { name: "m".into(), uri: "/models/m".into() },
        Command::SubmitJob {
            id: "ftjob-1".into(),
            tenant: "alice".into(),
            spec: JobSpec::new("m", MethodChoice::lora(8), training_file),
            adapter: Some("tuned".into()),
        },
        Command::PutAdapter {
            tenant: "alice".into(),
            name: "a1".into(),
            base_model: "m".into(),
            checksum: "c0ffee".into(),
            uri: "/blobs/adapters/a1".into(),
        },
    ];
    for (i, command) in commands.into_iter().enumerate() {
        let reply = group.propose(2, &format!("setup-{i}"), command);
        assert!(matches!(reply, Reply::Done | Reply::Version { .. }), "{reply:?}");
    }
    let before = group.block_on(group.client(2).state()).unwrap();

    let backup = dir.join("backup.json");
    let mut save = vec!["snapshot".to_string(), "save".into(), backup.to_str().unwrap().into()];
    save.extend(["--coordinator".into(), group.addr(3).to_string()]);
    save.extend(group.operator_args());
    let (ok, out, err) = TANDEM.run(&save.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert!(out.contains("jobs 1, files 1, adapters 1, API keys 1, models 1"), "{out}");
    assert_eq!(std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777, 0o600, "it holds key hashes");

    // The whole group is lost; the blobs folder (backed up on its own) is not.
    for id in 1..=3 {
        group.kill(id);
        std::fs::remove_dir_all(dir.join(id.to_string())).unwrap();
    }
    let restore = |id: u64| {
        let data = dir.join(id.to_string());
        TANDEM.run(&["snapshot", "restore", backup.to_str().unwrap(), "--data-dir", data.to_str().unwrap()])
    };
    for id in 1..=3 {
        let (ok, out, err) = restore(id);
        assert!(ok, "{err}");
        assert!(out.contains(&format!("seeded with the state at log index {}", before.applied)), "{out}");
    }
    for id in 2..=3 {
        group.spawn(id, &[]);
    }
    group.spawn(1, &gateway);

    let after = wait_for(60, "the restored group's state", || group.block_on(group.client(1).state()).ok());
    assert_eq!(after.models, before.models);
    assert_eq!(after.jobs, before.jobs);
    assert_eq!(after.files, before.files);
    assert_eq!(after.adapters, before.adapters);
    assert_eq!(after.api_keys, before.api_keys);
    assert!(after.applied >= before.applied, "the new log goes on from where the backup was taken");
    wait_for(60, "the gateway", || gateway_up(&http_addr));
    let (status, listed) = call(&http_addr, "GET", "/v1/files", &key, None);
    assert_eq!(status, 200, "the tenant's key opens the restored gateway: {listed}");
    assert_eq!(listed["data"][0]["id"], file_id.as_str(), "{listed}");
    let (status, content) = http::http(&http_addr, "GET", &format!("/v1/files/{file_id}/content"), Some(&key), None);
    assert_eq!((status, content.as_str()), (200, TRAINING));
    let (status, job) = call(&http_addr, "GET", "/v1/fine_tuning/jobs/ftjob-1", &key, None);
    assert_eq!((status, job["status"].as_str()), (200, Some("queued")), "{job}");

    // The group goes on writing after the restored index, and every member follows.
    assert_eq!(group.propose(3, "after", Command::RegisterModel { name: "m2".into(), uri: "/m2".into() }), Reply::Done);
    for id in 1..=3 {
        let state = wait_for(30, "each member to apply", || {
            group.block_on(group.client(id).status(true)).ok()?.state.filter(|s| s.models.contains_key("m2"))
        });
        assert!(state.applied > before.applied);
    }

    // A folder with a log is never overwritten; a cut backup is refused.
    let (ok, _, err) = restore(1);
    assert!(!ok && err.contains("holds a coordinator's log already"), "{err}");
    let cut = dir.join("cut.json");
    let bytes = std::fs::read(&backup).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, _, err) = TANDEM.run(&["snapshot", "restore", cut.to_str().unwrap(), "--data-dir", "/tmp/unused"]);
    assert!(!ok && err.contains("is not a Tandem backup"), "{err}");
    assert!(!std::path::Path::new("/tmp/unused").exists());
}
