//! An adapter folder from outside (an upload, a fine-tuning export): its config and weights
//! checked against one of the oracle's base models, as the gateway checks an upload and a
//! worker loads it. Either it loads or it is an error, never a panic; a LoRA adapter that loads
//! has modules whose A and B agree on the rank.
//!
//! Input: byte 0 picks the base model, byte 1 the format (even: PEFT, odd: ESFT), bytes 2..6
//! the config's length (u32, little-endian), then the config, then the weights file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tandem_kernels::DType;
use tandem_worker::adapters::Adapter;
use tandem_worker::model::ModelConfig;

const BASES: [&str; 4] = ["llama", "mistral", "mixtral", "qwen2_moe"];

fuzz_target!(|data: &[u8]| {
    let Some((&[base, format, a, b, c, d], rest)) = data.split_first_chunk::<6>() else { return };
    let len = u32::from_le_bytes([a, b, c, d]) as usize;
    let Some((config, weights)) = (len <= rest.len()).then(|| rest.split_at(len)) else { return };
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/oracle/fixtures");
    let cfg = ModelConfig::load(&fixtures.join(BASES[base as usize % BASES.len()])).expect("an oracle base model");
    let dir = tandem_fuzz::scratch("adapter");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    let (config_name, weights_name) = match format % 2 {
        0 => ("adapter_config.json", "adapter_model.safetensors"),
        _ => ("esft_config.json", "esft_model.safetensors"),
    };
    tandem_fuzz::put(&dir.join(config_name), config);
    tandem_fuzz::put(&dir.join(weights_name), weights);
    if let Ok(Adapter::Lora(lora)) = Adapter::load_dir(&dir, &cfg, DType::F32) {
        for (key, m) in &lora.modules {
            assert_eq!(m.a.shape()[0], m.bt.shape()[0], "{key:?}: A and B disagree on the rank");
            assert!(m.scale.is_finite(), "{key:?}: scale {}", m.scale);
        }
    }
});
