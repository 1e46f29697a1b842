//! Human-readable quantities in configuration files.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A number of bytes, written in TOML as an integer or as a string such as `"512MiB"` or `"16G"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl From<ByteSize> for u64 {
    fn from(size: ByteSize) -> u64 {
        size.0
    }
}

impl ByteSize {
    /// Parses `"16GiB"`, `"512 MiB"`, `"1.5G"`, `"100MB"`, `"4096"`. `K/M/G/T` and `KiB`.. are powers
    /// of 1024, `KB/MB/GB/TB` powers of 1000.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let number: f64 = number.parse().map_err(|_| {
            format!("expected a size such as \"512MiB\" or \"16G\", found \"{text}\"")
        })?;
        let multiplier: u64 = match unit.trim() {
            "" | "B" => 1,
            "K" | "KiB" => 1 << 10,
            "M" | "MiB" => 1 << 20,
            "G" | "GiB" => 1 << 30,
            "T" | "TiB" => 1 << 40,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            other => {
                return Err(format!(
                    "unknown size unit \"{other}\" in \"{text}\"; use B, KiB, MiB, GiB, TiB (or K, M, G, T), KB, MB, GB, TB"
                ))
            }
        };
        let bytes = number * multiplier as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(format!("size \"{text}\" is out of range"));
        }
        Ok(Self(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 || value.fract() == 0.0 {
            write!(f, "{} {}", value as u64, UNITS[unit])
        } else {
            write!(f, "{value:.1} {}", UNITS[unit])
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a size: a number of bytes or a string such as \"512MiB\"",
            )
        })? {
            Raw::Int(n) => Ok(Self(n)),
            Raw::Text(t) => Self::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_units() {
        assert_eq!(ByteSize::parse("16GiB").unwrap().0, 16 << 30);
        assert_eq!(ByteSize::parse("512 MiB").unwrap().0, 512 << 20);
        assert_eq!(ByteSize::parse("1.5G").unwrap().0, 3 << 29);
        assert_eq!(ByteSize::parse("100MB").unwrap().0, 100_000_000);
        assert_eq!(ByteSize::parse("4096").unwrap().0, 4096);
    }

    #[test]
    fn rejects_unknown_units_naming_them() {
        let e = ByteSize::parse("3 parsecs").unwrap_err();
        assert!(e.contains("\"parsecs\""), "{e}");
    }

    #[test]
    fn displays_in_binary_units() {
        assert_eq!(ByteSize(16 << 30).to_string(), "16 GiB");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1.5 GiB");
        assert_eq!(ByteSize(12).to_string(), "12 B");
    }
}
