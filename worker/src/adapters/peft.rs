//! PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`), read and written in
//! the format PEFT itself uses, and validated against the base model.

use std::collections::BTreeMap;
use std::path::Path;

use regex::Regex;
use serde_json::Value;
use tandem_kernels::{DType, Device, Tensor, ops};

use super::module::ModuleKey;
use crate::error::{Error, Result, read_json};
use crate::model::config::ModelConfig;
use crate::rng::Xoshiro256;
use crate::safetensors_file::{SafetensorsFile, write_safetensors};

/// The prefix PEFT puts before module names in adapter tensor keys.
const PREFIX: &str = "base_model.model.";

/// One LoRA module: `delta = scale · B·A`, kept as `A` `[r, in]` and `Bᵀ` `[r, out]`. PEFT's
/// `lora_B.weight` (`[out, r]`) is transposed once when read and back when written, so the
/// multi-LoRA kernels read every adapter in place, each product streaming whole weight rows.
#[derive(Clone, Debug)]
pub struct LoraModule {
    pub a: Tensor,
    pub bt: Tensor,
    pub scale: f32,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.a.shape()[0]
    }
}

/// A PEFT LoRA adapter, resolved against a base model.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    pub modules: BTreeMap<ModuleKey, LoraModule>,
    /// `adapter_config.json` as read (written back unchanged on save).
    pub config: Value,
}

/// A field of `adapter_config.json` that is malformed.
fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidRequest(msg.into())
}

/// A field of `adapter_config.json` that is well formed but not supported.
fn unsupported(msg: impl Into<String>) -> Error {
    Error::Unsupported(msg.into())
}

/// The fields of `adapter_config.json` Tandem acts on.
struct PeftConfig {
    r: usize,
    alpha: f32,
    rslora: bool,
    targets: Targets,
    exclude: Option<Targets>,
    layers: Option<Vec<usize>>,
    rank_pattern: Vec<(String, usize)>,
    alpha_pattern: Vec<(String, f32)>,
    /// Fused expert tensors targeted directly (`mlp.experts.gate_up_proj`, ...), in order.
    target_parameters: Vec<String>,
}

/// `target_modules` (or `exclude_modules`): names matched by suffix, one regex matched
/// against the whole name, or PEFT's `"all-linear"`.
enum Targets {
    Names(Vec<String>),
    Regex(Regex),
    AllLinear,
}

impl Targets {
    fn parse(v: &Value, field: &str) -> Result<Targets> {
        match v {
            Value::String(s) if s == "all-linear" => Ok(Targets::AllLinear),
            Value::String(s) => (Regex::new(&format!("^(?:{s})$")).map(Targets::Regex))
                .map_err(|e| invalid(format!("`{field}` regex: {e}"))),
            Value::Array(a) => a
                .iter()
                .map(|x| {
                    x.as_str().map(str::to_string).ok_or_else(|| invalid(format!("`{field}` entries must be strings")))
                })
                .collect::<Result<_>>()
                .map(Targets::Names),
            other => Err(invalid(format!("`{field}` must be a list, a regex string or \"all-linear\", got {other}"))),
        }
    }

    /// PEFT's rule: a listed name matches the whole module name or its last components.
    fn matches(&self, name: &str) -> bool {
        match self {
            Targets::AllLinear => true,
            Targets::Regex(re) => re.is_match(name),
            Targets::Names(names) => names.iter().any(|t| name == t || name.ends_with(&format!(".{t}"))),
        }
    }
}

impl PeftConfig {
    /// The config in `raw`: a field Tandem does not support (at a value that changes the math)
    /// is [`Error::Unsupported`], a malformed one [`Error::InvalidRequest`]; the message names
    /// the field.
    fn parse(raw: &Value) -> Result<PeftConfig> {
        let obj = raw.as_object().ok_or_else(|| invalid("the file is not a JSON object"))?;
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        if let Some(t) = get("peft_type").and_then(Value::as_str)
            && t != "LORA"
        {
            return Err(invalid(format!("`peft_type` is {t:?}; only LORA adapters are supported")));
        }
        // Fields that change the math: refused unless at their no-op value, never ignored.
        let refuse_true = ["use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"];
        for k in refuse_true {
            if get(k).and_then(Value::as_bool) == Some(true) {
                return Err(unsupported(format!("`{k}: true` is not supported")));
            }
        }
        for k in ["modules_to_save", "layer_replication", "trainable_token_indices"] {
            match get(k) {
                None => {}
                Some(Value::Array(a)) if a.is_empty() => {}
                Some(Value::Object(o)) if o.is_empty() => {}
                Some(v) => return Err(unsupported(format!("`{k}` is not supported (got {v})"))),
            }
        }
        if let Some(b) = get("bias").and_then(Value::as_str)
            && b != "none"
        {
            return Err(unsupported(format!("`bias: {b:?}` is not supported (only \"none\")")));
        }
        let r = get("r").and_then(Value::as_u64).ok_or_else(|| invalid("`r` is missing or not an integer"))? as usize;
        let alpha = get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0) as f32;
        let target_modules = get("target_modules").ok_or_else(|| invalid("`target_modules` is missing"))?;
        let targets = Targets::parse(target_modules, "target_modules")?;
        let exclude = get("exclude_modules").map(|v| Targets::parse(v, "exclude_modules")).transpose()?;
        let layers = match get("layers_to_transform") {
            None => None,
            Some(Value::Number(n)) => {
                Some(vec![n.as_u64().ok_or_else(|| invalid("`layers_to_transform` must be non-negative"))? as usize])
            }
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| {
                        let n = v.as_u64().ok_or_else(|| invalid("`layers_to_transform` entries must be integers"))?;
                        Ok(n as usize)
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(v) => return Err(invalid(format!("`layers_to_transform` must be an integer or a list, got {v}"))),
        };
        let pattern = |k: &str| -> Result<Vec<(String, f64)>> {
            match get(k) {
                None => Ok(Vec::new()),
                Some(Value::Object(o)) => o
                    .iter()
                    .map(|(key, v)| {
                        let x = v.as_f64().ok_or_else(|| invalid(format!("`{k}.{key}` must be a number")))?;
                        Ok((key.clone(), x))
                    })
                    .collect(),
                Some(v) => Err(invalid(format!("`{k}` must be an object, got {v}"))),
            }
        };
        Ok(PeftConfig {
            r,
            alpha,
            rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
            targets,
            exclude,
            layers,
            rank_pattern: pattern("rank_pattern")?.into_iter().map(|(k, v)| (k, v as usize)).collect(),
            alpha_pattern: pattern("alpha_pattern")?.into_iter().map(|(k, v)| (k, v as f32)).collect(),
            target_parameters: match get("target_parameters") {
                None => Vec::new(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| {
                        let name = v.as_str().ok_or_else(|| invalid("`target_parameters` entries must be strings"))?;
                        Ok(name.to_string())
                    })
                    .collect::<Result<_>>()?,
                Some(v) => return Err(invalid(format!("`target_parameters` must be a list, got {v}"))),
            },
        })
    }

    fn targets(&self, key: &ModuleKey, name: &str) -> bool {
        self.targets.matches(name)
            && !self.exclude.as_ref().is_some_and(|e| e.matches(name))
            && self.layers.as_ref().is_none_or(|l| l.contains(&key.layer))
    }

    /// Rank and scale of module `name`: `rank_pattern` / `alpha_pattern` keys match the end of
    /// the name (PEFT's `(.*\.)?key$`), else the adapter-wide `r` and `lora_alpha`.
    fn rank_and_scale(&self, name: &str) -> (usize, f32) {
        let find = |key: &str| Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).is_ok_and(|re| re.is_match(name));
        let r = self.rank_pattern.iter().find(|(k, _)| find(k)).map_or(self.r, |p| p.1);
        let alpha = self.alpha_pattern.iter().find(|(k, _)| find(k)).map_or(self.alpha, |p| p.1);
        let scale = if self.rslora { alpha / (r as f32).sqrt() } else { alpha / r as f32 };
        (r, scale)
    }
}

impl LoraAdapter {
    /// Reads the adapter in `dir` and checks it against the base model `cfg`: every module
    /// the config targets has its A and B, of the rank the config gives and the base's shapes,
    /// and there is no tensor the config does not account for.
    pub fn load(dir: &Path, cfg: &ModelConfig) -> Result<Self> {
        Self::load_as(dir, cfg, DType::F32)
    }

    /// [`LoraAdapter::load`] with the modules' weights in `dtype`, each converted as it is read
    /// (converting a whole adapter after it is read would leave its f32 copy's room behind in
    /// the heap, adapter after adapter).
    pub fn load_as(dir: &Path, cfg: &ModelConfig, dtype: DType) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        let raw: Value = read_json(&config_path)?;
        let peft = PeftConfig::parse(&raw).map_err(|e| match e {
            Error::Unsupported(msg) => Error::Unsupported(format!("{}: {msg}", config_path.display())),
            Error::InvalidRequest(msg) => Error::Json { path: config_path.clone(), msg },
            other => other,
        })?;
        let file = SafetensorsFile::open(&dir.join("adapter_model.safetensors"))?;
        let where_ = file.path().display().to_string();
        let mut modules = BTreeMap::new();
        let mut used = 0;
        // An adapter made against fused expert tensors (transformers 5) has no per-expert
        // modules even where its `target_modules` names would match the per-expert layout.
        let per_expert = file.names().iter().any(|n| is_per_expert(n));
        for key in ModuleKey::all(cfg) {
            let name = key.name(cfg);
            if !peft.targets(&key, &name) || (key.expert.is_some() && !per_expert) {
                continue;
            }
            let (r, scale) = peft.rank_and_scale(&name);
            let (inp, out) = key.features(cfg);
            let (a_name, b_name) = (format!("{PREFIX}{name}.lora_A.weight"), format!("{PREFIX}{name}.lora_B.weight"));
            let read = |tname: &str, shape: [usize; 2]| -> Result<Tensor> {
                let t = file.tensor(tname)?;
                if t.shape() != shape {
                    return Err(Error::Format(format!(
                        "{where_}: {tname} has shape {:?}, expected {shape:?} (rank {r} from adapter_config.json, \
                         base module {inp} -> {out})",
                        t.shape()
                    )));
                }
                Ok(t.into_dtype(DType::F32)?)
            };
            let (a, b) = (read(&a_name, [r, inp])?, read(&b_name, [out, r])?);
            used += 2;
            let (a, bt) = (a.into_dtype(dtype)?, ops::transpose(&b)?.into_dtype(dtype)?);
            modules.insert(key, LoraModule { a, bt, scale });
        }
        used += load_target_parameters(&peft, &file, cfg, &mut modules)?;
        if used != file.names().len() {
            let expected: Vec<String> = modules
                .keys()
                .flat_map(|k| ["lora_A", "lora_B"].map(|w| format!("{PREFIX}{}.{w}.weight", k.name(cfg))))
                .collect();
            let extra: Vec<String> = file.names().into_iter().filter(|n| !expected.contains(n)).take(3).collect();
            return Err(Error::Format(format!(
                "{where_}: tensors {extra:?} match no module that adapter_config.json targets in this base model"
            )));
        }
        if modules.is_empty() {
            return Err(Error::Format(format!("{}: the adapter targets no module of this base model", dir.display())));
        }
        Ok(LoraAdapter { modules, config: raw })
    }

    /// A fresh adapter for training, as PEFT initialises one: for every module `config` (an
    /// `adapter_config.json` value) targets in `cfg`, `A` uniform in ±1/sqrt(in) (PyTorch's
    /// Kaiming-uniform with a = sqrt(5)) and `B` zero, so training starts from the base model.
    pub fn init(cfg: &ModelConfig, config: Value, rng: &mut Xoshiro256) -> Result<Self> {
        let peft = PeftConfig::parse(&config).map_err(|e| match e {
            Error::Unsupported(msg) => Error::InvalidRequest(msg),
            other => other,
        })?;
        if !peft.target_parameters.is_empty() {
            return Err(Error::Unsupported("training an adapter of fused expert parameters".into()));
        }
        let mut modules = BTreeMap::new();
        for key in ModuleKey::all(cfg) {
            let name = key.name(cfg);
            if !peft.targets(&key, &name) {
                continue;
            }
            let (r, scale) = peft.rank_and_scale(&name);
            let (inp, out) = key.features(cfg);
            let bound = 1.0 / (inp as f32).sqrt();
            let a = (0..r * inp).map(|_| rng.uniform_f32(-bound, bound)).collect();
            let a = Tensor::from_vec(a, [r, inp])?;
            modules.insert(key, LoraModule { a, bt: Tensor::zeros([r, out], DType::F32, Device::Cpu)?, scale });
        }
        if modules.is_empty() {
            return Err(Error::InvalidRequest("the LoRA targets match no module of this base model".into()));
        }
        Ok(LoraAdapter { modules, config })
    }

    /// [`LoraAdapter::init`] with B random too, uniform in ±`b_bound`: a stand-in for a trained
    /// adapter in benchmarks and tests (PEFT's B = 0 would make every adapter the base model).
    pub fn init_random(cfg: &ModelConfig, config: Value, rng: &mut Xoshiro256, b_bound: f32) -> Result<Self> {
        let mut a = Self::init(cfg, config, rng)?;
        for m in a.modules.values_mut() {
            let data = (0..m.bt.elem_count()).map(|_| rng.uniform_f32(-b_bound, b_bound)).collect();
            m.bt = Tensor::from_vec(data, m.bt.shape().to_vec())?;
        }
        Ok(a)
    }

    /// Whether the adapter was read from fused expert parameters (it then cannot be written back
    /// in that layout).
    fn has_target_parameters(&self) -> bool {
        self.config.get("target_parameters").and_then(Value::as_array).is_some_and(|a| !a.is_empty())
    }

    /// Writes the adapter in PEFT's format: the config as read, and the tensors under PEFT's
    /// keys (atomically, file by file).
    pub fn save(&self, dir: &Path, cfg: &ModelConfig) -> Result<()> {
        if self.has_target_parameters() {
            return Err(Error::Unsupported(
                "saving an adapter of fused expert parameters (`target_parameters`)".into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let mut tensors = Vec::with_capacity(2 * self.modules.len());
        for (key, m) in &self.modules {
            let name = key.name(cfg);
            tensors.push((format!("{PREFIX}{name}.lora_A.weight"), m.a.clone()));
            tensors.push((format!("{PREFIX}{name}.lora_B.weight"), ops::transpose(&m.bt)?));
        }
        write_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
        let path = dir.join("adapter_config.json");
        let text = serde_json::to_string_pretty(&self.config)
            .map_err(|e| Error::Json { path: path.clone(), msg: e.to_string() })?;
        let tmp = dir.join("adapter_config.json.tmp");
        std::fs::write(&tmp, text).map_err(Error::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(Error::io(&path))
    }
}

/// Whether a tensor key belongs to one expert's own module (`...experts.3.w1.lora_A.weight`).
fn is_per_expert(key: &str) -> bool {
    key.split(".experts.").nth(1).and_then(|rest| rest.split('.').next()).is_some_and(|e| e.parse::<usize>().is_ok())
}

/// LoRA on fused expert tensors (`target_parameters`, PEFT's `ParamWrapper`), turned into
/// per-expert modules. For a parameter `[experts, out, in]` with rank `r` and `E` experts PEFT
/// stores `lora_A` `[r·E, in]` (expert `e` owns rows `e·r..(e+1)·r`) and `lora_B` `[out, r·E]`
/// (expert `e` owns the columns `j·E + e`), and `delta_e = scale · B_e · A_e`. `gate_up_proj`'s
/// output is gate rows then up rows, so its delta splits into the expert's gate and up modules
/// (sharing `A_e`). PEFT nests one wrapper per targeted parameter in the order the experts
/// module registers them (`gate_up_proj` before `down_proj`): the first is innermost and carries
/// one `base_layer.` segment per wrapper around it. Returns the number of tensors read.
fn load_target_parameters(
    peft: &PeftConfig,
    file: &SafetensorsFile,
    cfg: &ModelConfig,
    modules: &mut BTreeMap<ModuleKey, LoraModule>,
) -> Result<usize> {
    use super::module::Proj;
    let n = peft.target_parameters.len();
    let mut used = 0;
    for (i, param) in peft.target_parameters.iter().enumerate() {
        let fused_up = param.ends_with("experts.gate_up_proj");
        if !fused_up && !param.ends_with("experts.down_proj") {
            return Err(Error::Unsupported(format!(
                "target parameter {param:?} (supported: experts.gate_up_proj, experts.down_proj)"
            )));
        }
        for layer in 0..cfg.num_layers {
            let Some(moe) = cfg.moe_at(layer) else { continue };
            if peft.layers.as_ref().is_some_and(|l| !l.contains(&layer)) {
                continue;
            }
            // Fused expert tensors exist only in transformers 5, which names every MoE block
            // `mlp` (Mixtral's `block_sparse_moe` included).
            let module = format!("model.layers.{layer}.mlp.experts");
            let full = format!("{module}.{}", if fused_up { "gate_up_proj" } else { "down_proj" });
            if !(full == *param || full.ends_with(&format!(".{param}"))) {
                continue;
            }
            let (e, h, inter) = (moe.num_experts, cfg.hidden_size, moe.expert_intermediate);
            let (inp, out) = if fused_up { (h, 2 * inter) } else { (inter, h) };
            let (r, scale) = peft.rank_and_scale(&full);
            let nest = "base_layer.".repeat(n - 1 - i);
            let read = |w: &str, shape: [usize; 2]| -> Result<Vec<f32>> {
                let name = format!("{PREFIX}{module}.{nest}{w}.weight");
                let t = file.tensor(&name)?;
                if t.shape() != shape {
                    return Err(Error::Format(format!(
                        "{}: {name} has shape {:?}, expected {shape:?} (target parameter {param}, rank {r}, {e} experts)",
                        file.path().display(),
                        t.shape()
                    )));
                }
                Ok(t.to_vec_f32()?)
            };
            let (a, b) = (read("lora_A", [r * e, inp])?, read("lora_B", [out, r * e])?);
            used += 2;
            for x in 0..e {
                let a_x = Tensor::from_vec(a[x * r * inp..(x + 1) * r * inp].to_vec(), [r, inp])?;
                // Expert x's Bᵀ over output rows `rows`: column j is B's column j·E + x.
                let bt_cols = |rows: std::ops::Range<usize>| -> Result<Tensor> {
                    let len = rows.len();
                    let b = &b;
                    let data = (0..r).flat_map(|j| rows.clone().map(move |o| b[o * r * e + j * e + x])).collect();
                    Ok(Tensor::from_vec(data, [r, len])?)
                };
                let mut add = |proj, bt: Tensor| {
                    modules.insert(ModuleKey { layer, proj, expert: Some(x) }, LoraModule { a: a_x.clone(), bt, scale })
                };
                if fused_up {
                    add(Proj::Gate, bt_cols(0..inter)?);
                    add(Proj::Up, bt_cols(inter..2 * inter)?);
                } else {
                    add(Proj::Down, bt_cols(0..h)?);
                }
            }
        }
    }
    Ok(used)
}
