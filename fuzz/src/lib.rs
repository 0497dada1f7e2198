//! What the fuzz targets share: a scratch folder per fuzzing process, and the tiny model the
//! gateway serves and whose tokenizer reads training data.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tandem_worker::init_model::{Preset, write_model};
use tandem_worker::tokenizer::TextTokenizer;

/// `name` in this process's scratch folder (libFuzzer may run several processes at once).
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    dir.join(name)
}

/// The tiny random-weight model, written once per process.
pub fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch("tiny");
        write_model(Preset::Tiny, &dir, 7).expect("the tiny model");
        dir
    })
}

pub fn tokenizer() -> &'static TextTokenizer {
    static TOKENIZER: OnceLock<TextTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| TextTokenizer::load(model_dir()).expect("the tiny model's tokenizer"))
}

/// Writes `bytes` to `path`, replacing what was there.
pub fn put(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("a scratch file");
}
