//! Sizes as operators write them, and the default pin budget.
//!
//! Every size the mount accepts (`--pin-budget`, `--prefetch-window`, the
//! same keys in the configuration file and as mount options) goes through
//! [`parse_size`], so "4G" means the same bytes wherever it is written, and
//! the default budget is defined once, here, next to the parser that reads
//! the percentage it is given as.
//!
//! # Units
//!
//! A size is a number (digits, optionally one decimal point with digits on
//! both sides) followed by an optional unit, with optional spaces around and
//! between them. Units are case-insensitive.
//!
//! | unit | meaning | example |
//! |---|---|---|
//! | none, `B` | bytes | `1048576` |
//! | `K`, `M`, `G`, `T` | powers of 1024 (KiB ... TiB), as `dd`, `sort -S` and `numfmt --from=iec` read them | `512M` = 512 × 2²⁰ |
//! | `KiB`, `MiB`, `GiB`, `TiB` | powers of 1024 | `4GiB` = 4 × 2³⁰ |
//! | `KB`, `MB`, `GB`, `TB` | powers of 1000 (SI), as `dd` and disk vendors read them | `4GB` = 4 × 10⁹ |
//! | `%` | percent of total RAM (`MemTotal`), 0 to 100 | `25%` |
//!
//! This is the coreutils convention: a bare letter and the `i` forms are
//! binary, a `B` after the letter makes it decimal. The documented examples
//! (`4GiB`, `512MiB`, `256MiB`, `25%`) are binary or percentages, so they
//! mean the same under any convention; only `KB`...`TB` differ from a parser
//! that treats every unit as binary, and for them SI is what the letters
//! say.

use std::io;

/// The default pin budget, in percent of RAM (`MemTotal`): what the mount pins
/// when neither `--pin-budget` nor the configuration sets a budget (in bytes:
/// [`default_budget`]).
///
/// Pinned pages cannot be reclaimed, so whatever is pinned is taken from
/// everything else on the machine: the loaders need RAM for the models they
/// load (a loaded model is usually a private copy: tensors moved to the GPU
/// or converted in anonymous memory), and unpinned files still need page
/// cache. A quarter is enough to hold the shared base of a model family that
/// fits the machine at all, and leaves three quarters so that pinning never
/// makes the OOM killer choose a loader.
pub const DEFAULT_BUDGET_PERCENT: u64 = 25;

/// Why a size did not parse. [`SizeError::Meminfo`] says its cause in its
/// message and so does not also return it from `source()` (a chain printer
/// would show it twice).
#[derive(Debug, thiserror::Error)]
pub enum SizeError {
    /// Not a number with a known unit or a percentage; holds the text as given.
    #[error("invalid size {0:?}: expected a number with an optional unit (B, K, KiB, KB, M, MiB, MB, G, GiB, GB, T, TiB, TB) or a percentage of RAM (\"10%\")")]
    Syntax(String),
    /// The size does not fit in a `u64` of bytes; holds the text as given.
    #[error("size {0:?} is too large")]
    Overflow(String),
    /// A percentage above 100; holds the text as given.
    #[error("percentage {0:?} must be between 0 and 100")]
    Percent(String),
    /// A percentage was given but total RAM could not be read.
    #[error("reading total RAM from /proc/meminfo: {0}")]
    Meminfo(io::Error),
}

/// Parse a size: `4GiB`, `512M`, `1.5G`, `4GB`, `1000000`, or `10%` of total
/// RAM (read from /proc/meminfo only when a percentage is given).
///
/// Units follow coreutils (`sort -S`, `dd`): `K`, `M`, `G`, `T` and their
/// `KiB`...`TiB` forms are powers of 1024; `KB`, `MB`, `GB`, `TB` are powers
/// of 1000. Units are case-insensitive; a bare number is bytes. A fraction
/// (`1.5G`) needs digits on both sides of the point; a percentage must be
/// between 0 and 100.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    if text.trim().ends_with('%') {
        let ram = total_ram().map_err(SizeError::Meminfo)?;
        parse_size_of(text, ram)
    } else {
        // `total_ram` is only consulted for percentages.
        parse_size_of(text, 0)
    }
}

/// [`parse_size`] with the total RAM given, so it is a pure function.
pub fn parse_size_of(text: &str, total_ram: u64) -> Result<u64, SizeError> {
    let trimmed = text.trim();
    let syntax = || SizeError::Syntax(text.to_string());
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return Err(syntax());
    }
    let value: f64 = number.parse().map_err(|_| syntax())?;
    let unit = unit.trim();
    if unit == "%" {
        if value > 100.0 {
            return Err(SizeError::Percent(text.to_string()));
        }
        return Ok((total_ram as f64 * value / 100.0) as u64);
    }
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(syntax()),
    };
    if !number.contains('.') {
        // Exact integer arithmetic where possible: no rounding of large sizes.
        let integer: u64 = number.parse().map_err(|_| syntax())?;
        return integer
            .checked_mul(multiplier)
            .ok_or_else(|| SizeError::Overflow(text.to_string()));
    }
    let bytes = value * multiplier as f64;
    if bytes >= u64::MAX as f64 {
        return Err(SizeError::Overflow(text.to_string()));
    }
    Ok(bytes as u64)
}

/// Total RAM in bytes (`MemTotal` of /proc/meminfo).
pub fn total_ram() -> io::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    parse_mem_total(&meminfo).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "no MemTotal line in /proc/meminfo",
        )
    })
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut fields = line["MemTotal:".len()..].split_whitespace();
    let kib: u64 = fields.next()?.parse().ok()?;
    // The kernel always writes "kB" (meaning KiB).
    (fields.next()? == "kB").then_some(kib * 1024)
}

/// The budget for a machine with `total_ram` bytes: [`DEFAULT_BUDGET_PERCENT`]
/// of it.
pub fn default_budget_for(total_ram: u64) -> u64 {
    (u128::from(total_ram) * u128::from(DEFAULT_BUDGET_PERCENT) / 100) as u64
}

/// The budget when `--pin-budget` is not given: [`DEFAULT_BUDGET_PERCENT`] of
/// this machine's RAM. An unprivileged mount is further limited by
/// `RLIMIT_MEMLOCK` (mlock fails beyond it); the mount checks that, since only
/// it knows whether it holds `CAP_IPC_LOCK`.
pub fn default_budget() -> io::Result<u64> {
    Ok(default_budget_for(total_ram()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn units() {
        let cases = [
            ("4GiB", 4 * GIB),
            ("4G", 4 * GIB),
            ("4g", 4 * GIB),
            ("512M", 512 << 20),
            ("512MiB", 512 << 20),
            ("512MB", 512_000_000),
            ("64k", 64 << 10),
            ("1T", 1 << 40),
            ("1.5G", 3 * GIB / 2),
            ("1000", 1000),
            ("1000B", 1000),
            (" 2 GiB ", 2 * GIB),
            ("0", 0),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_size_of(text, 0).unwrap(), bytes, "{text}");
        }
    }

    #[test]
    fn si_units_are_powers_of_ten_iec_and_bare_letters_powers_of_two() {
        let cases = [
            ("1KB", 1_000),
            ("1kB", 1_000),
            ("1kb", 1_000),
            ("1KiB", 1 << 10),
            ("1kib", 1 << 10),
            ("1K", 1 << 10),
            ("1.5KB", 1_500),
            ("1.5KiB", 1_536),
            ("2MB", 2_000_000),
            ("2MiB", 2 << 20),
            ("2M", 2 << 20),
            ("2GB", 2_000_000_000),
            ("2GiB", 2 * GIB),
            ("2G", 2 * GIB),
            ("3TB", 3_000_000_000_000),
            ("3TiB", 3 << 40),
            ("3T", 3 << 40),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_size_of(text, 0).unwrap(), bytes, "{text}");
        }
    }

    #[test]
    fn documented_examples() {
        // The sizes docs/operations.md, the example configuration and the
        // `--help` texts show.
        for (text, bytes) in [
            ("4GiB", 4 * GIB),
            ("512MiB", 512 << 20),
            ("256MiB", 256 << 20),
            ("1048576", 1 << 20),
        ] {
            assert_eq!(parse_size(text).unwrap(), bytes, "{text}");
        }
        assert_eq!(parse_size_of("25%", 16 * GIB).unwrap(), 4 * GIB);
        assert_eq!(parse_size_of("5%", 20 * GIB).unwrap(), GIB);
    }

    #[test]
    fn percent_of_ram() {
        assert_eq!(parse_size_of("10%", 20 * GIB).unwrap(), 2 * GIB);
        assert_eq!(parse_size_of("25 %", 8 * GIB).unwrap(), 2 * GIB);
        assert_eq!(parse_size_of("0.5%", 200 * GIB).unwrap(), GIB);
        assert_eq!(parse_size_of("100%", GIB).unwrap(), GIB);
        assert_eq!(parse_size_of("0%", GIB).unwrap(), 0);
        for text in ["101%", "200%"] {
            assert!(
                matches!(parse_size_of(text, GIB), Err(SizeError::Percent(_))),
                "{text}"
            );
        }
    }

    #[test]
    fn rejects_garbage() {
        for text in [
            "",
            "G",
            "-1G",
            "-1GiB",
            "1.G",
            ".5G",
            "1..5G",
            "4 GiBs",
            "1e9",
            "4X",
            "lots",
            "4 parsecs",
            "4 %G",
        ] {
            assert!(
                matches!(parse_size_of(text, GIB), Err(SizeError::Syntax(_))),
                "{text}"
            );
        }
        assert!(matches!(
            parse_size_of("99999999999T", GIB),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn reads_meminfo() {
        let meminfo = "MemTotal:       24523564 kB\nMemFree:        23000000 kB\n";
        assert_eq!(parse_mem_total(meminfo), Some(24523564 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        // This machine's /proc/meminfo parses, and a percentage uses it.
        let ram = total_ram().unwrap();
        assert!(ram > 0);
        assert_eq!(parse_size("50%").unwrap(), ram / 2);
        assert_eq!(default_budget().unwrap(), default_budget_for(ram));
    }

    #[test]
    fn default_is_a_quarter() {
        assert_eq!(default_budget_for(16 * GIB), 4 * GIB);
        // The same bytes as the percentage written out, so a default budget
        // and `--pin-budget 25%` cannot differ.
        for ram in [16 * GIB, 24523564 * 1024, 3 * GIB + 4096] {
            let written = format!("{DEFAULT_BUDGET_PERCENT}%");
            assert_eq!(
                parse_size_of(&written, ram).unwrap(),
                default_budget_for(ram)
            );
        }
    }
}
