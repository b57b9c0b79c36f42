//! `/etc/modelfs/config.toml`: the one file an operator edits. Every key is
//! also a command-line flag; flags win. Unknown keys are errors that name the
//! key, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

/// Where the configuration is read from when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/modelfs/config.toml";

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Store directory.
    pub store: Option<PathBuf>,
    /// Mount point for `modelfs mount` without an argument.
    pub mountpoint: Option<PathBuf>,
    /// Memory budget for pinning shared chunks ("4GiB", "512MiB", "25%").
    pub pin_budget: Option<String>,
    /// How far a load-trace replay may read ahead of the loader ("256MiB"; "0": no replay).
    pub prefetch_window: Option<String>,
    /// "auto" or "off".
    pub passthrough: Option<String>,
    /// FUSE worker threads.
    pub threads: Option<usize>,
    /// Readahead of the mount, KiB.
    pub read_ahead_kb: Option<u32>,
    /// Let every user read the mount.
    pub allow_other: Option<bool>,
    /// Prometheus metrics address, e.g. "127.0.0.1:9477". Absent: off.
    pub metrics: Option<String>,
    /// Seconds open files may keep reading after SIGTERM.
    pub shutdown_grace: Option<f64>,
    /// Log filter in RUST_LOG syntax, e.g. "info" or "modelfs_fs=debug".
    pub log: Option<String>,
}

/// A key that failed validation: which and why.
fn bad(key: &str, why: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("key `{key}`: {why}")
}

impl FileConfig {
    /// Read and validate a configuration file.
    pub fn load(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        // toml's errors name the key (unknown field `x`, or the key whose
        // value has the wrong type) and show the line.
        let cfg: FileConfig =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e))?;
        cfg.validate()
            .with_context(|| format!("{}", path.display()))?;
        Ok(cfg)
    }

    /// The configuration `--config` names, else the default file if it
    /// exists, else nothing.
    pub fn discover(explicit: Option<&Path>) -> Result<(Option<PathBuf>, FileConfig)> {
        match explicit {
            Some(p) => Ok((Some(p.to_path_buf()), FileConfig::load(p)?)),
            None if Path::new(DEFAULT_PATH).is_file() => {
                let p = PathBuf::from(DEFAULT_PATH);
                let cfg = FileConfig::load(&p)?;
                Ok((Some(p), cfg))
            }
            None => Ok((None, FileConfig::default())),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(p) = &self.store {
            if !p.is_absolute() {
                return Err(bad(
                    "store",
                    format!("{} is not an absolute path", p.display()),
                ));
            }
        }
        if let Some(p) = &self.mountpoint {
            if !p.is_absolute() {
                return Err(bad(
                    "mountpoint",
                    format!("{} is not an absolute path", p.display()),
                ));
            }
        }
        if let Some(b) = &self.pin_budget {
            parse_size(b).map_err(|e| bad("pin_budget", e))?;
        }
        if let Some(w) = &self.prefetch_window {
            parse_size(w).map_err(|e| bad("prefetch_window", e))?;
        }
        if let Some(p) = &self.passthrough {
            if p != "auto" && p != "off" {
                return Err(bad(
                    "passthrough",
                    format!("{p:?} is not \"auto\" or \"off\""),
                ));
            }
        }
        if let Some(t) = self.threads {
            if !(1..=64).contains(&t) {
                return Err(bad("threads", format!("{t} is not between 1 and 64")));
            }
        }
        if let Some(k) = self.read_ahead_kb {
            if !(4..=1 << 20).contains(&k) {
                return Err(bad(
                    "read_ahead_kb",
                    format!("{k} is not between 4 and 1048576"),
                ));
            }
        }
        if let Some(m) = &self.metrics {
            m.parse::<SocketAddr>().map_err(|e| {
                bad(
                    "metrics",
                    format!("{m:?} is not an address like 127.0.0.1:9477 ({e})"),
                )
            })?;
        }
        if let Some(g) = self.shutdown_grace {
            if !(0.0..=3600.0).contains(&g) {
                return Err(bad(
                    "shutdown_grace",
                    format!("{g} is not between 0 and 3600 seconds"),
                ));
            }
        }
        if let Some(l) = &self.log {
            tracing_subscriber::EnvFilter::try_new(l).map_err(|e| bad("log", e))?;
        }
        Ok(())
    }
}

/// Sizes (`pin_budget`, `prefetch_window`, and the same flags) are read by
/// the cache crate's parser, the one the mount's budget is defined with: see
/// [`modelfs_cache::parse_size`] for the units (`K`/`KiB` = 1024, `KB` = 1000).
pub use modelfs_cache::parse_size;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("64KB").unwrap(), 64_000);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert!(parse_size("10%").unwrap() > 0);
        assert!(parse_size("4 parsecs").is_err());
        assert!(parse_size("200%").is_err());
    }

    #[test]
    fn bad_sizes_name_their_key() {
        for (text, key) in [
            ("pin_budget = \"lots\"", "pin_budget"),
            ("pin_budget = \"200%\"", "pin_budget"),
            ("prefetch_window = \"-1MiB\"", "prefetch_window"),
        ] {
            let c: FileConfig = toml::from_str(text).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("key `{key}`")), "{e}");
        }
        let c: FileConfig = toml::from_str("pin_budget = \"4GB\"").unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn unknown_and_invalid_keys_are_named() {
        let e = toml::from_str::<FileConfig>("pin_budgt = \"1G\"").unwrap_err();
        assert!(e.to_string().contains("pin_budgt"), "{e}");
        let c: FileConfig = toml::from_str("threads = 0").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("threads"));
        let c: FileConfig = toml::from_str("metrics = \"localhost\"").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("metrics"));
    }
}
