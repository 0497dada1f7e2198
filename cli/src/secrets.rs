//! Secrets on disk (the operator's API key): written 0600 from their creation on, and read only
//! from a file no one else can read. A secret never goes on a command line, where `ps` shows it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// Where a key comes from when no file is given.
pub const KEY_VAR: &str = "TANDEM_API_KEY";

/// The secret in `path`, trimmed; refused when others may read the file.
pub fn read(path: &Path) -> Result<String> {
    let mode = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?.permissions().mode();
    if mode & 0o077 != 0 {
        bail!("{} is readable by others (mode {:o}): chmod 600 it", path.display(), mode & 0o777);
    }
    let secret = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let secret = secret.trim();
    if secret.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(secret.to_string())
}

/// Writes `secret` to a new file `path`, mode 0600.
pub fn write(path: &Path, secret: &str) -> Result<()> {
    Ok(tandem_proto::tls::write_new(path, secret, 0o600)?)
}

/// The key in `file` when one is given, else the `TANDEM_API_KEY` environment variable.
pub fn key(file: Option<&Path>) -> Result<Option<String>> {
    match file {
        Some(f) => read(f).map(Some),
        None => Ok(std::env::var(KEY_VAR).ok().map(|k| k.trim().to_string()).filter(|k| !k.is_empty())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_written_private_and_read_only_when_private() {
        let dir = std::env::temp_dir().join(format!("tandem-secrets-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        write(&path, "tk-secret\n").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read(&path).unwrap(), "tk-secret");
        assert!(write(&path, "tk-other").is_err(), "a secret file was replaced");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("chmod 600"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
