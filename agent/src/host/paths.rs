//! Where cleave keeps what it builds and caches (outside the repository).

use std::path::PathBuf;

/// `$CLEAVE_CACHE`, else `$HOME/.cache/cleave`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CLEAVE_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/cleave")
}

/// The manifest of the built-in default image.
pub fn default_image_manifest() -> PathBuf {
    cache_dir().join("images/default.json")
}
