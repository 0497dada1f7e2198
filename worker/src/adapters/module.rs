//! Names of the linear modules an adapter can target, in the form PEFT uses
//! (`model.layers.3.self_attn.q_proj`), and their place in Tandem's model.

use std::sync::LazyLock;

use regex::Regex;

use crate::model::config::{Arch, ModelConfig};
use crate::model::weights::expert_names;

/// A projection inside a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    /// Dense MLP (or, with `expert`, one expert's) gate / up / down.
    Gate,
    Up,
    Down,
    /// The MoE router.
    Router,
    SharedGate,
    SharedUp,
    SharedDown,
    /// Qwen2-MoE's `shared_expert_gate` (`[1, hidden]`).
    SharedExpertGate,
}

/// One linear module of the model: a projection of a layer, of one expert when `expert` is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleKey {
    pub layer: usize,
    pub proj: Proj,
    pub expert: Option<usize>,
}

static LAYER: LazyLock<Regex> = LazyLock::new(|| {
    #[allow(clippy::unwrap_used)] // a constant pattern
    Regex::new(r"^model\.layers\.(\d+)\.(.+)$").unwrap()
});

impl ModuleKey {
    /// Parses a module name of `cfg`'s architecture; `None` if it names no linear module of a
    /// decoder layer (e.g. `lm_head`, a norm, an out-of-range layer or expert).
    pub fn parse(cfg: &ModelConfig, name: &str) -> Option<ModuleKey> {
        let caps = LAYER.captures(name)?;
        let layer: usize = caps[1].parse().ok()?;
        if layer >= cfg.num_layers {
            return None;
        }
        let rest = &caps[2];
        let key = |proj, expert| Some(ModuleKey { layer, proj, expert });
        let attn = match rest {
            "self_attn.q_proj" => Some(Proj::Q),
            "self_attn.k_proj" => Some(Proj::K),
            "self_attn.v_proj" => Some(Proj::V),
            "self_attn.o_proj" => Some(Proj::O),
            _ => None,
        };
        if let Some(p) = attn {
            return key(p, None);
        }
        let Some(moe) = cfg.moe_at(layer) else {
            return match rest {
                "mlp.gate_proj" => key(Proj::Gate, None),
                "mlp.up_proj" => key(Proj::Up, None),
                "mlp.down_proj" => key(Proj::Down, None),
                _ => None,
            };
        };
        let (block, [g, u, d]) = expert_names(cfg.arch);
        let rest = rest.strip_prefix(block)?.strip_prefix('.')?;
        if rest == "gate" {
            return key(Proj::Router, None);
        }
        if let Some(expert) = rest.strip_prefix("experts.") {
            let (e, proj) = expert.split_once('.')?;
            let e: usize = e.parse().ok()?;
            if e >= moe.num_experts {
                return None;
            }
            let p = [(g, Proj::Gate), (u, Proj::Up), (d, Proj::Down)].into_iter().find(|(n, _)| *n == proj)?.1;
            return key(p, Some(e));
        }
        if cfg.arch == Arch::Qwen2Moe && moe.shared_expert_intermediate.is_some() {
            return match rest {
                "shared_expert.gate_proj" => key(Proj::SharedGate, None),
                "shared_expert.up_proj" => key(Proj::SharedUp, None),
                "shared_expert.down_proj" => key(Proj::SharedDown, None),
                "shared_expert_gate" => key(Proj::SharedExpertGate, None),
                _ => None,
            };
        }
        None
    }

    /// The module's name as PEFT and the checkpoint write it.
    pub fn name(&self, cfg: &ModelConfig) -> String {
        let (block, [g, u, d]) = expert_names(cfg.arch);
        let rest = match (self.proj, self.expert) {
            (Proj::Q, _) => "self_attn.q_proj".to_string(),
            (Proj::K, _) => "self_attn.k_proj".to_string(),
            (Proj::V, _) => "self_attn.v_proj".to_string(),
            (Proj::O, _) => "self_attn.o_proj".to_string(),
            (Proj::Gate, Some(e)) => format!("{block}.experts.{e}.{g}"),
            (Proj::Up, Some(e)) => format!("{block}.experts.{e}.{u}"),
            (Proj::Down, Some(e)) => format!("{block}.experts.{e}.{d}"),
            (Proj::Gate, None) => "mlp.gate_proj".to_string(),
            (Proj::Up, None) => "mlp.up_proj".to_string(),
            (Proj::Down, None) => "mlp.down_proj".to_string(),
            (Proj::Router, _) => format!("{block}.gate"),
            (Proj::SharedGate, _) => "mlp.shared_expert.gate_proj".to_string(),
            (Proj::SharedUp, _) => "mlp.shared_expert.up_proj".to_string(),
            (Proj::SharedDown, _) => "mlp.shared_expert.down_proj".to_string(),
            (Proj::SharedExpertGate, _) => "mlp.shared_expert_gate".to_string(),
        };
        format!("model.layers.{}.{rest}", self.layer)
    }

    /// `(in, out)` features of the module in `cfg`.
    pub fn features(&self, cfg: &ModelConfig) -> (usize, usize) {
        let h = cfg.hidden_size;
        let (q, kv) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let moe = cfg.moe_at(self.layer);
        let expert_i = moe.map_or(0, |m| m.expert_intermediate);
        let shared_i = moe.and_then(|m| m.shared_expert_intermediate).unwrap_or(0);
        let mlp_i = if self.expert.is_some() { expert_i } else { cfg.intermediate_size };
        match self.proj {
            Proj::Q => (h, q),
            Proj::K | Proj::V => (h, kv),
            Proj::O => (q, h),
            Proj::Gate | Proj::Up => (h, mlp_i),
            Proj::Down => (mlp_i, h),
            Proj::Router => (h, moe.map_or(0, |m| m.num_experts)),
            Proj::SharedGate | Proj::SharedUp => (h, shared_i),
            Proj::SharedDown => (shared_i, h),
            Proj::SharedExpertGate => (h, 1),
        }
    }

    /// Every linear module of the model (what PEFT's `"all-linear"` covers, `lm_head` excluded).
    pub fn all(cfg: &ModelConfig) -> Vec<ModuleKey> {
        let mut keys = Vec::new();
        for layer in 0..cfg.num_layers {
            let mut push = |proj, expert| keys.push(ModuleKey { layer, proj, expert });
            for p in [Proj::Q, Proj::K, Proj::V, Proj::O] {
                push(p, None);
            }
            match cfg.moe_at(layer) {
                None => [Proj::Gate, Proj::Up, Proj::Down].into_iter().for_each(|p| push(p, None)),
                Some(moe) => {
                    push(Proj::Router, None);
                    for e in 0..moe.num_experts {
                        [Proj::Gate, Proj::Up, Proj::Down].into_iter().for_each(|p| push(p, Some(e)));
                    }
                    if cfg.arch == Arch::Qwen2Moe && moe.shared_expert_intermediate.is_some() {
                        for p in [Proj::SharedGate, Proj::SharedUp, Proj::SharedDown, Proj::SharedExpertGate] {
                            push(p, None);
                        }
                    }
                }
            }
        }
        keys
    }
}
