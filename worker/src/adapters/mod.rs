//! Adapters: PEFT LoRA and ESFT, read from disk and validated against the base model, and the
//! packed form a batch of many adapters runs with.

pub mod esft;
pub mod module;
pub mod peft;
pub mod registry;
pub mod set;

pub use esft::EsftAdapter;
pub use module::{ModuleKey, Proj};
pub use peft::{LoraAdapter, LoraModule};
pub use set::{Adapter, AdapterSet};
