//! The binary these tests run, for tandem-testkit's process harness: only this crate's tests
//! know where cargo built it.

use tandem_testkit::Tandem;

pub const TANDEM: Tandem = Tandem::new(env!("CARGO_BIN_EXE_tandem"));

/// Writes a random LoRA adapter (rank 4 on q and v) for the model in `model` into `dir`.
#[allow(dead_code)] // not every test binary makes an adapter
pub fn random_adapter(model: &std::path::Path, dir: &std::path::Path) {
    use tandem_worker::adapters::LoraAdapter;
    use tandem_worker::model::ModelConfig;
    use tandem_worker::rng::Xoshiro256;

    let cfg = ModelConfig::load(model).unwrap();
    let config = serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]});
    let adapter = LoraAdapter::init_random(&cfg, config, &mut Xoshiro256::seed_from_u64(7), 0.05).unwrap();
    adapter.save(dir, &cfg).unwrap();
}
