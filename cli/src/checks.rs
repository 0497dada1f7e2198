//! What the gateway checks with the model runtime (which the coordinator crate does not link):
//! a training file's form on upload, and an uploaded adapter against its base model.

use std::path::Path;

use tandem_coordinator::gateway::Checks;
use tandem_proto::contract::Invalid;
use tandem_worker::adapters::Adapter;
use tandem_worker::error::Error;
use tandem_worker::model::ModelConfig;
use tandem_worker::train::data::check_jsonl;

pub struct RuntimeChecks;

impl Checks for RuntimeChecks {
    fn training_file(&self, path: &Path) -> Result<u64, Invalid> {
        check_jsonl(path).map_err(|e| match e {
            Error::Data { line: 0, msg, .. } => Invalid(msg),
            Error::Data { line, msg, .. } => Invalid(format!("line {line}: {msg}")),
            other => Invalid(other.to_string()),
        })
    }

    fn adapter(&self, dir: &Path, model_uri: &str) -> Result<(), Invalid> {
        let cfg = ModelConfig::load(Path::new(model_uri)).map_err(|e| Invalid(format!("the base model: {e}")))?;
        Adapter::load_dir(dir, &cfg, tandem_kernels::DType::F32).map(drop).map_err(|e| Invalid(e.to_string()))
    }
}
