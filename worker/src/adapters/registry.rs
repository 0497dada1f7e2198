//! The adapters a worker can serve, by name, whatever their origin: an uploaded PEFT or ESFT
//! adapter, or a fine-tuning job that publishes its weights after every optimizer step. Every
//! change makes a new immutable version; a request holds the version it started with (an
//! `Arc`), so replacing or removing an adapter never disturbs a generation in flight, and an
//! old version's memory goes when its last request finishes.

use std::collections::HashMap;
use std::sync::Arc;

use super::set::Adapter;
use crate::error::{Error, Result};

/// Where an adapter's weights came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Uploaded (a PEFT LoRA or an ESFT adapter read from disk): the folder it was read from,
    /// where the other ranks of a worker group read it too.
    Upload { dir: Option<std::path::PathBuf> },
    /// A fine-tuning job in progress: the weights of its last completed optimizer step.
    Training { job: String, step: usize },
}

/// One immutable version of a named adapter.
#[derive(Debug)]
pub struct AdapterVersion {
    /// Unique over the registry's life, across names: what the page cache keys on.
    pub id: u64,
    pub name: String,
    /// 1 for the first version under this name, then counting up.
    pub version: u64,
    pub origin: Origin,
    pub adapter: Adapter,
}

#[derive(Debug, Default)]
pub struct AdapterRegistry {
    latest: HashMap<String, Arc<AdapterVersion>>,
    /// Last version number handed out per name, kept after removal so a name that comes back
    /// never reuses a version number.
    versions: HashMap<String, u64>,
    next_id: u64,
}

impl AdapterRegistry {
    /// Publishes `adapter` as the newest version of `name` (a new name starts at version 1);
    /// requests that already hold an older version keep it.
    pub fn publish(&mut self, name: &str, adapter: Adapter, origin: Origin) -> Result<Arc<AdapterVersion>> {
        validate_name(name)?;
        let version = self.versions.entry(name.to_string()).or_insert(0);
        *version += 1;
        self.next_id += 1;
        let v =
            Arc::new(AdapterVersion { id: self.next_id, name: name.to_string(), version: *version, origin, adapter });
        self.latest.insert(name.to_string(), v.clone());
        Ok(v)
    }

    /// Removes `name`; requests holding one of its versions finish with it.
    pub fn remove(&mut self, name: &str) -> Result<Arc<AdapterVersion>> {
        self.latest.remove(name).ok_or_else(|| unknown(name))
    }

    /// The newest version of `name`.
    pub fn resolve(&self, name: &str) -> Result<Arc<AdapterVersion>> {
        self.latest.get(name).cloned().ok_or_else(|| unknown(name))
    }

    /// The newest version of every adapter, sorted by name.
    pub fn list(&self) -> Vec<Arc<AdapterVersion>> {
        let mut all: Vec<_> = self.latest.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

fn unknown(name: &str) -> Error {
    Error::InvalidRequest(format!("unknown adapter {name:?}"))
}

/// Adapter names become file and URL path parts elsewhere: no separators, no `..`, no control
/// characters, nothing empty or huge.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.len() > 256
        || name == "."
        || name.contains("..")
        || name.chars().any(|c| c == '/' || c == '\\' || c.is_control());
    if bad {
        return Err(Error::InvalidRequest(format!(
            "adapter name {name:?} is not allowed (1-256 bytes, no '/', '\\', '..' or control characters)"
        )));
    }
    Ok(())
}
