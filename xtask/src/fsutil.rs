//! Small file-system helpers: modes, secrets, atomic writes.

use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use anyhow::{Context as _, Result};

pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// Writes `contents` to `path` via a temporary file and a rename, so readers never see half a file.
pub fn write_atomic(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// Reads a secret from `secrets/<name>`, generating it (mode 0600) on first use.
pub fn secret(dir: &Path, name: &str) -> Result<String> {
    let path = dir.join(name);
    if let Ok(existing) = std::fs::read_to_string(&path) {
        return Ok(existing.trim().to_string());
    }
    let value = random_token(32)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &value).with_context(|| format!("writing {}", tmp.display()))?;
    set_mode(&tmp, 0o600)?;
    std::fs::rename(&tmp, &path)?;
    Ok(value)
}

/// Reads an existing secret; unlike [`secret`] it never creates one.
pub fn read_secret(dir: &Path, name: &str) -> Result<String> {
    let path = dir.join(name);
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .with_context(|| format!("reading {} (created by `cargo xtask up`)", path.display()))
}

/// `len` characters from [A-Za-z0-9] (URL- and shell-safe), from the kernel's CSPRNG.
pub fn random_token(len: usize) -> Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut urandom = std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
    let mut out = String::with_capacity(len);
    let mut byte = [0u8; 1];
    while out.len() < len {
        urandom.read_exact(&mut byte)?;
        // Rejection sampling: 248 = 4 * 62 keeps the distribution uniform.
        if byte[0] < 248 {
            out.push(ALPHABET[usize::from(byte[0]) % ALPHABET.len()] as char);
        }
    }
    Ok(out)
}

/// `n` random bytes, for ids such as Kafka's cluster id.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).context("reading /dev/urandom")?;
    Ok(bytes)
}

/// The last `lines` lines of a file, for error messages ("postgres exited: ...").
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
