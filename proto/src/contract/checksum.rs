//! Checksums as the cluster records them: API keys by their SHA-256 (never in clear), and an
//! adapter by the SHA-256 of its folder, the same for an upload and for a job's export.

use sha2::Digest;

/// `bytes` in lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    to_hex(&sha2::Sha256::digest(bytes))
}

/// An adapter's checksum: SHA-256 over its folder's files in name order, each name then its
/// bytes.
pub fn dir_checksum(dir: &std::path::Path) -> std::io::Result<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    files.sort();
    let mut hasher = sha2::Sha256::new();
    for f in files.iter().filter(|f| f.is_file()) {
        hasher.update(f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
        hasher.update(std::fs::read(f)?);
    }
    Ok(to_hex(&hasher.finalize()))
}
