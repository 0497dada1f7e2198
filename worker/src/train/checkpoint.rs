//! Checkpoints of a job, and its export.
//!
//! A checkpoint is a folder `step-NNNNNN` holding everything a resumed job needs to continue
//! bit for bit as if it had never stopped: the adapter (`adapter/`, in the export format),
//! AdamW's moments (`optimizer.safetensors`) and `state.json` (the job's spec, its step, its
//! data order and position, its PRNG state). It is written under a temporary name, every file
//! synced, then renamed into place, so a crash leaves either the whole checkpoint or none (each
//! of those steps between failpoints named `checkpoint-...`: `tandem_proto::durable`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tandem_proto::durable;

use super::data::Example;
use super::job::{Job, Progress, TrainSpec, Weights};
use crate::adapters::{EsftAdapter, LoraAdapter};
use crate::error::{Error, Result, read_json};
use crate::model::ModelConfig;
use crate::safetensors_file::{SafetensorsFile, write_safetensors};

#[derive(Serialize, Deserialize)]
struct State {
    spec: TrainSpec,
    progress: Progress,
}

/// Writes the job's adapter in its exchange format: PEFT (`adapter_config.json`,
/// `adapter_model.safetensors`) for LoRA, Tandem's ESFT format for experts.
pub fn export(job: &Job, cfg: &ModelConfig, out: &Path) -> Result<()> {
    match &job.weights {
        Weights::Lora(a) => a.save(out, cfg),
        Weights::Esft(e) => e.save(out, cfg),
    }
}

/// Saves a checkpoint of `job` (which must be between optimizer steps) under `dir`; returns
/// its folder.
pub fn save(job: &Job, cfg: &ModelConfig, dir: &Path) -> Result<PathBuf> {
    if !job.at_step_boundary() {
        return Err(Error::InvalidRequest(format!("job {}: checkpoint in the middle of a step", job.name())));
    }
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let name = format!("step-{:06}", job.progress.step);
    let (tmp, done) = (dir.join(format!("{name}.tmp")), dir.join(&name));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(Error::io(&tmp))?;
    }
    export(job, cfg, &tmp.join("adapter"))?;
    let moments: Vec<(String, tandem_kernels::Tensor)> = job
        .moments()
        .iter()
        .enumerate()
        .flat_map(|(i, (m, v))| [(format!("m.{i}"), m.clone()), (format!("v.{i}"), v.clone())])
        .collect();
    write_safetensors(&tmp.join("optimizer.safetensors"), &moments)?;
    let state = State { spec: job.spec.clone(), progress: job.progress.clone() };
    let path = tmp.join("state.json");
    let text = serde_json::to_string(&state).map_err(|e| Error::Json { path: path.clone(), msg: e.to_string() })?;
    std::fs::write(&path, text).map_err(Error::io(&path))?;
    for f in [&tmp.join("adapter"), &tmp] {
        sync_dir_files(f)?;
    }
    if done.exists() {
        std::fs::remove_dir_all(&done).map_err(Error::io(&done))?;
    }
    durable::step("checkpoint", "rename", || std::fs::rename(&tmp, &done)).map_err(Error::io(&done))?;
    sync(dir)?;
    Ok(done)
}

/// The newest complete checkpoint under `dir`, if any.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(None) };
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in entries {
        let path = entry.map_err(Error::io(dir))?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse().ok());
        if let Some(step) = step
            && best.as_ref().is_none_or(|(b, _)| step > *b)
        {
            best = Some((step, path));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// The job saved in checkpoint `path`, over its training `data` (the same examples it was
/// trained on).
pub fn load(path: &Path, cfg: &ModelConfig, data: Arc<Vec<Example>>) -> Result<Job> {
    let state: State = read_json(&path.join("state.json"))?;
    let adapter = path.join("adapter");
    let weights = match state.spec.method {
        super::job::Method::Lora { .. } => Weights::Lora(LoraAdapter::load(&adapter, cfg)?),
        super::job::Method::Esft { .. } => Weights::Esft(EsftAdapter::load(&adapter, cfg)?),
    };
    let file = SafetensorsFile::open(&path.join("optimizer.safetensors"))?;
    let count = file.names().len() / 2;
    let moments = (0..count)
        .map(|i| Ok((file.tensor(&format!("m.{i}"))?, file.tensor(&format!("v.{i}"))?)))
        .collect::<Result<_>>()?;
    Job::with_state(state.spec, weights, state.progress, Some(moments), data)
}

/// Syncs every file directly in `dir`, then `dir` itself.
fn sync_dir_files(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(Error::io(dir))? {
        let path = entry.map_err(Error::io(dir))?.path();
        if path.is_file() {
            durable::step("checkpoint", "fsync", || File::open(&path)?.sync_all()).map_err(Error::io(&path))?;
        }
    }
    sync(dir)
}

fn sync(dir: &Path) -> Result<()> {
    durable::step("checkpoint", "dirsync", || File::open(dir)?.sync_all()).map_err(Error::io(dir))
}
