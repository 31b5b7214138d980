//! One grammar for every size breakfs is given, by flag or config file:
//! `20GiB`, `500MB`, `64k`, `26Gi` (a Kubernetes quantity), `1.5G`,
//! `1048576`.
//!
//! A number (decimals allowed) and an optional unit, case ignored:
//! `B`; `k`/`KB` (10³) and `KiB`/`Ki` (2¹⁰); likewise `M`, `G` and `T`.
//! A lone `m` is a megabyte here, not Kubernetes' milli: a size in bytes
//! has no thousandths.

use crate::{Error, Result};

/// The forms a size may take, for error messages.
pub const SIZE_FORMS: &str = "a number of bytes with an optional unit: B, k/KB, KiB/Ki, \
     M/MB, MiB/Mi, G/GB, GiB/Gi, T/TB, TiB/Ti (e.g. 20GiB, 26Gi, 500MB, 1048576)";

/// `s` in bytes (rounded down), or an error naming `s` and [`SIZE_FORMS`].
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = |reason: &str| Error::BadSize {
        value: s.to_string(),
        reason: reason.to_string(),
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad("no number"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" | "ki" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" | "mi" => 1048576.0,
        "g" | "gb" => 1e9,
        "gib" | "gi" => 1073741824.0,
        "t" | "tb" => 1e12,
        "tib" | "ti" => 1099511627776.0,
        _ => return Err(bad("unknown unit")),
    };
    let bytes = n * mult;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad("too large"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sizes_of_every_form() {
        assert_eq!(parse_size("20GiB").unwrap(), 20 << 30);
        assert_eq!(parse_size("26Gi").unwrap(), 26 << 30);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("64k").unwrap(), 64_000);
        assert_eq!(parse_size("64K").unwrap(), 64_000);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("32Mi").unwrap(), 32 << 20);
        assert_eq!(parse_size("2mib").unwrap(), 2 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 1_500_000_000);
        assert_eq!(parse_size(" 8 MiB ").unwrap(), 8 << 20);
        assert_eq!(parse_size("1Ti").unwrap(), 1 << 40);
        assert_eq!(parse_size("3TB").unwrap(), 3_000_000_000_000);
        assert_eq!(parse_size("7B").unwrap(), 7);
    }

    #[test]
    fn errors_name_the_value_and_the_forms() {
        for bad in ["", "GiB", "12Q", "-1", "1e999", "5 parsecs"] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
            assert!(e.contains("KiB/Ki") && e.contains("20GiB"), "{e}");
        }
    }
}
