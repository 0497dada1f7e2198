//! ESFT adapters for MoE bases: replacement weights for a few (layer, expert) pairs. Format in
//! `docs/esft.md`: `esft_config.json` lists the pairs, `esft_model.safetensors` holds their
//! weights under the base checkpoint's per-expert names.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use tandem_kernels::{DType, Tensor};

use crate::error::{Error, Result, read_json};
use crate::model::config::ModelConfig;
use crate::model::weights::expert_names;
use crate::safetensors_file::{SafetensorsFile, write_safetensors};

/// One replaced expert: its gate and up (`[intermediate, hidden]`) and down
/// (`[hidden, intermediate]`) weights.
#[derive(Clone, Debug)]
pub struct ExpertWeights {
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
}

/// An ESFT adapter: only the experts it changed, keyed by (layer, expert).
#[derive(Clone, Debug)]
pub struct EsftAdapter {
    pub experts: BTreeMap<(usize, usize), ExpertWeights>,
}

impl EsftAdapter {
    pub fn load(dir: &Path, cfg: &ModelConfig) -> Result<Self> {
        let config_path = dir.join("esft_config.json");
        let raw: Value = read_json(&config_path)?;
        let bad = |msg: String| Error::Json { path: config_path.clone(), msg };
        if raw.get("format").and_then(Value::as_str) != Some("tandem-esft") {
            return Err(bad("`format` must be \"tandem-esft\"".into()));
        }
        if raw.get("version").and_then(Value::as_u64) != Some(1) {
            return Err(Error::Unsupported(format!("{}: ESFT format version other than 1", config_path.display())));
        }
        let listed =
            raw.get("experts").and_then(Value::as_object).ok_or_else(|| bad("`experts` must be an object".into()))?;
        let mut pairs = Vec::new();
        for (layer, ids) in listed {
            let layer: usize =
                layer.parse().map_err(|_| bad(format!("`experts` key {layer:?} is not a layer index")))?;
            let Some(moe) = cfg.moe_at(layer) else {
                return Err(bad(format!("layer {layer} of this base model has no experts")));
            };
            let ids = ids.as_array().ok_or_else(|| bad(format!("`experts.{layer}` must be a list")))?;
            for id in ids {
                let e = id.as_u64().map(|e| e as usize).filter(|&e| e < moe.num_experts).ok_or_else(|| {
                    bad(format!("`experts.{layer}` entry {id} is not an expert id below {}", moe.num_experts))
                })?;
                pairs.push((layer, e));
            }
        }
        if pairs.is_empty() {
            return Err(bad("`experts` lists no expert".into()));
        }
        let file = SafetensorsFile::open(&dir.join("esft_model.safetensors"))?;
        let names = tensor_names(cfg);
        let (h, mut experts) = (cfg.hidden_size, BTreeMap::new());
        for &(layer, e) in &pairs {
            let inter = cfg.moe_at(layer).map_or(0, |m| m.expert_intermediate);
            let [g, u, d] = names(layer, e);
            let read = |name: &str, shape: [usize; 2]| -> Result<Tensor> {
                let t = file.tensor(name)?;
                if t.shape() != shape {
                    return Err(Error::Format(format!(
                        "{}: {name} has shape {:?}, expected {shape:?}",
                        file.path().display(),
                        t.shape()
                    )));
                }
                Ok(t.into_dtype(DType::F32)?)
            };
            let w =
                ExpertWeights { gate: read(&g, [inter, h])?, up: read(&u, [inter, h])?, down: read(&d, [h, inter])? };
            experts.insert((layer, e), w);
        }
        if file.names().len() != 3 * experts.len() {
            return Err(Error::Format(format!(
                "{}: holds {} tensors but esft_config.json lists {} experts (3 tensors each)",
                file.path().display(),
                file.names().len(),
                experts.len()
            )));
        }
        Ok(EsftAdapter { experts })
    }

    pub fn save(&self, dir: &Path, cfg: &ModelConfig) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let names = tensor_names(cfg);
        let mut tensors = Vec::new();
        let mut listed: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (&(layer, e), w) in &self.experts {
            let [g, u, d] = names(layer, e);
            tensors.extend([(g, w.gate.clone()), (u, w.up.clone()), (d, w.down.clone())]);
            listed.entry(layer.to_string()).or_default().push(e);
        }
        write_safetensors(&dir.join("esft_model.safetensors"), &tensors)?;
        let config = serde_json::json!({ "format": "tandem-esft", "version": 1, "experts": listed });
        let path = dir.join("esft_config.json");
        let tmp = dir.join("esft_config.json.tmp");
        std::fs::write(&tmp, config.to_string()).map_err(Error::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(Error::io(&path))
    }
}

/// The checkpoint names of expert `e` of layer `l`: gate, up, down.
fn tensor_names(cfg: &ModelConfig) -> impl Fn(usize, usize) -> [String; 3] {
    let (block, names) = expert_names(cfg.arch);
    move |l, e| names.map(|n| format!("model.layers.{l}.{block}.experts.{e}.{n}.weight"))
}
