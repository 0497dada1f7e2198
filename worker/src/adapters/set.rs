//! Many adapters arranged for one batch: for every (layer, projection) one multi-LoRA bank of all
//! the LoRA adapters that touch it, and per MoE layer one table of all ESFT replacement experts.
//! A row of the batch carries its adapter's slot; the tables turn slots into bank indices.

use std::collections::{BTreeSet, HashMap};

use tandem_kernels::ops::{self, LoraBank};
use tandem_kernels::{DType, Device, Tensor};

use super::esft::{EsftAdapter, ExpertWeights};
use super::module::{ModuleKey, Proj};
use super::peft::LoraAdapter;
use crate::error::{Error, Result};
use crate::model::weights::stack;

/// An adapter of any kind.
#[derive(Clone, Debug)]
pub enum Adapter {
    Lora(LoraAdapter),
    Esft(EsftAdapter),
}

impl Adapter {
    /// The adapter in folder `dir`: ESFT when it holds `esft_config.json`, else PEFT LoRA
    /// (`adapter_config.json`, its weights in `lora_dtype`), checked against the base model's
    /// `cfg`.
    pub fn load_dir(dir: &std::path::Path, cfg: &crate::model::ModelConfig, lora_dtype: DType) -> Result<Adapter> {
        Ok(if dir.join("esft_config.json").exists() {
            Adapter::Esft(EsftAdapter::load(dir, cfg)?)
        } else {
            Adapter::Lora(LoraAdapter::load_as(dir, cfg, lora_dtype)?)
        })
    }

    /// Every weight tensor with its layer, in one fixed order: LoRA modules by key (A then Bᵀ),
    /// ESFT experts by (layer, expert) (gate, up, down). [`Adapter::with_weights`] reads it back.
    pub fn weights(&self) -> Vec<(usize, &Tensor)> {
        match self {
            Adapter::Lora(a) => a.modules.iter().flat_map(|(k, m)| [(k.layer, &m.a), (k.layer, &m.bt)]).collect(),
            Adapter::Esft(a) => {
                a.experts.iter().flat_map(|(&(l, _), w)| [(l, &w.gate), (l, &w.up), (l, &w.down)]).collect()
            }
        }
    }

    /// This adapter with its LoRA weights in `dtype` (ESFT's experts, multiplied as the base's
    /// experts are, stay as they are).
    pub fn with_lora_dtype(self, dtype: DType) -> Result<Adapter> {
        Ok(match self {
            Adapter::Lora(mut a) => {
                for m in a.modules.values_mut() {
                    m.a = m.a.clone().into_dtype(dtype)?;
                    m.bt = m.bt.clone().into_dtype(dtype)?;
                }
                Adapter::Lora(a)
            }
            esft => esft,
        })
    }

    /// This adapter with its weights replaced, in [`Adapter::weights`] order, by `weights`
    /// (same shapes; the paged copy of an adapter comes back this way).
    pub fn with_weights(&self, weights: Vec<Tensor>) -> Result<Adapter> {
        let shapes_match = weights.len() == self.weights().len()
            && self.weights().iter().zip(&weights).all(|((_, old), new)| old.shape() == new.shape());
        if !shapes_match {
            return Err(Error::InvalidRequest("adapter weights do not match its layout".into()));
        }
        let mut it = weights.into_iter();
        let mut next = || it.next().ok_or_else(|| Error::InvalidRequest("adapter weights ran out".into()));
        Ok(match self {
            Adapter::Lora(a) => {
                let mut out = a.clone();
                for m in out.modules.values_mut() {
                    m.a = next()?;
                    m.bt = next()?;
                }
                Adapter::Lora(out)
            }
            Adapter::Esft(a) => {
                let mut out = a.clone();
                for w in out.experts.values_mut() {
                    w.gate = next()?;
                    w.up = next()?;
                    w.down = next()?;
                }
                Adapter::Esft(out)
            }
        })
    }
}

/// The LoRA modules of one (layer, projection) across adapters.
#[derive(Debug)]
pub struct LoraTable {
    pub bank: LoraBank,
    /// (adapter slot, expert) -> bank index.
    index: HashMap<(usize, Option<usize>), i32>,
}

impl LoraTable {
    /// Adds the LoRA delta of each row's adapter to `y`. `slots[r]` is row r's adapter slot
    /// (-1: none); `experts[r]` its expert, for expert projections.
    pub fn apply(&self, y: &mut Tensor, x: &Tensor, slots: &[i32], experts: Option<&[u32]>) -> Result<()> {
        let idx = self.row_indices(slots, experts);
        if idx.iter().all(|&i| i < 0) {
            return Ok(());
        }
        // BGMV gathers each adapter's rows wherever they are, so an adapter's weights are read
        // once per call even when its requests are spread over the batch.
        Ok(ops::bgmv(y, x, &self.bank, &idx)?)
    }

    /// Each row's adapter index in the bank (-1: the row's adapter has no module here).
    pub fn row_indices(&self, slots: &[i32], experts: Option<&[u32]>) -> Vec<i32> {
        slots
            .iter()
            .enumerate()
            .map(|(r, &s)| {
                let expert = experts.map(|e| e[r] as usize);
                usize::try_from(s).ok().and_then(|s| self.index_of(s, expert)).map_or(-1, |i| i as i32)
            })
            .collect()
    }

    /// The bank index of adapter `slot`'s module (of `expert`, for expert projections).
    pub fn index_of(&self, slot: usize, expert: Option<usize>) -> Option<usize> {
        self.index.get(&(slot, expert)).map(|&i| i as usize)
    }
}

/// The ESFT experts of one MoE layer across adapters, stacked like the base experts.
#[derive(Debug)]
pub struct EsftTable {
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
    /// (adapter slot, base expert) -> index in the stacks.
    index: HashMap<(usize, usize), u32>,
}

impl EsftTable {
    /// Every (adapter slot, base expert) of the table, with its index in the stacks.
    pub fn entries(&self) -> impl Iterator<Item = ((usize, usize), u32)> + '_ {
        self.index.iter().map(|(&k, &i)| (k, i))
    }

    /// The replacement for `expert` under adapter `slot`, if that adapter has one: its index
    /// in the stacks.
    pub fn lookup(&self, slot: i32, expert: u32) -> Option<u32> {
        usize::try_from(slot).ok().and_then(|s| self.index.get(&(s, expert as usize)).copied())
    }
}

/// Adapters arranged for batched execution; slot `i` is the `i`-th adapter given to
/// [`AdapterSet::new`].
#[derive(Debug, Default)]
pub struct AdapterSet {
    lora: HashMap<(usize, Proj), LoraTable>,
    esft: HashMap<usize, EsftTable>,
    len: usize,
}

impl AdapterSet {
    /// The set of `adapters` (slot `i` is the `i`-th). On the CPU the banks share the adapters'
    /// tensors; on a GPU each adapter's modules are moved into their packed bank one (layer,
    /// projection) at a time, so packing never holds two full copies.
    pub fn new(adapters: Vec<Adapter>, device: Device) -> Result<Self> {
        let len = adapters.len();
        let mut lora_sources = Vec::new();
        let mut esft_sources = Vec::new();
        for (slot, adapter) in adapters.into_iter().enumerate() {
            match adapter {
                Adapter::Lora(a) => lora_sources.push((slot, a.modules)),
                Adapter::Esft(a) => esft_sources.push((slot, a.experts)),
            }
        }
        let tables: BTreeSet<(usize, Proj)> =
            lora_sources.iter().flat_map(|(_, m)| m.keys().map(|k| (k.layer, k.proj))).collect();
        let mut lora = HashMap::new();
        for (layer, proj) in tables {
            let range = ModuleKey { layer, proj, expert: None }..=ModuleKey { layer, proj, expert: Some(usize::MAX) };
            let mut entries = Vec::new();
            for (slot, modules) in &mut lora_sources {
                let keys: Vec<ModuleKey> = modules.range(range.clone()).map(|(k, _)| *k).collect();
                for k in keys {
                    if let Some(m) = modules.remove(&k) {
                        entries.push(((*slot, k.expert), m));
                    }
                }
            }
            let modules: Vec<_> = entries.iter().map(|(_, m)| (m.a.clone(), m.bt.clone(), m.scale)).collect();
            let bank = LoraBank::new(modules, device)?;
            let index = entries.iter().enumerate().map(|(i, (k, _))| (*k, i as i32)).collect();
            lora.insert((layer, proj), LoraTable { bank, index });
        }
        type LayerExperts = Vec<((usize, usize), ExpertWeights)>;
        let mut by_layer: HashMap<usize, LayerExperts> = HashMap::new();
        for (slot, experts) in esft_sources {
            for ((layer, e), w) in experts {
                by_layer.entry(layer).or_default().push(((slot, e), w));
            }
        }
        let esft = by_layer
            .into_iter()
            .map(|(layer, entries)| {
                let pick = |f: fn(&ExpertWeights) -> &Tensor| {
                    stack(&entries.iter().map(|(_, w)| f(w).clone()).collect::<Vec<_>>(), device)
                };
                let table = EsftTable {
                    gate: pick(|w| &w.gate)?,
                    up: pick(|w| &w.up)?,
                    down: pick(|w| &w.down)?,
                    index: entries.iter().enumerate().map(|(i, (k, _))| (*k, i as u32)).collect(),
                };
                Ok((layer, table))
            })
            .collect::<Result<_>>()?;
        Ok(AdapterSet { lora, esft, len })
    }

    /// Number of adapter slots.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every (layer, projection) some adapter of the set has a LoRA module on.
    pub fn lora_keys(&self) -> impl Iterator<Item = (usize, Proj)> + '_ {
        self.lora.keys().copied()
    }

    pub fn lora(&self, layer: usize, proj: Proj) -> Option<&LoraTable> {
        self.lora.get(&(layer, proj))
    }

    /// The ESFT tables, by layer.
    pub fn esft_tables(&self) -> impl Iterator<Item = (usize, &EsftTable)> + '_ {
        self.esft.iter().map(|(&l, t)| (l, t))
    }

    pub fn esft(&self, layer: usize) -> Option<&EsftTable> {
        self.esft.get(&layer)
    }
}
