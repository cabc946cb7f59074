//! Figures for a human: bytes in B, KiB, MiB or GiB, times in µs or ms,
//! flags as yes/no. Every human table (`vmm ctl --human`, `vmm ps`, `vmm top`,
//! the density summary) shows each figure through the one of these that
//! fits it; those that take an `Option` show `-` for a value that is not
//! known (yet). Pure text, no I/O.

use guest_abi::PAGE_SIZE;
use std::fmt::Display;

/// Binary units above a byte, smallest first.
const BYTE_UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// A size in the largest unit that keeps it at 1 or more: "512 B",
/// "32 KiB", "3.9 MiB", "2 GiB". Exact figures have no decimals; others
/// one.
pub fn bytes(n: impl Into<Option<u64>>) -> String {
    or_dash(n.into(), size)
}

/// A size given in KiB (e.g. `memmap_chunk_kib`).
pub fn kib(n: u64) -> String {
    size(n.saturating_mul(1 << 10))
}

/// A size given in MiB (e.g. `mem_size_mib`).
pub fn mib(n: u64) -> String {
    size(n.saturating_mul(1 << 20))
}

/// A count of guest pages, with the memory they make: "32768 (128 MiB)".
pub fn pages(n: u64) -> String {
    format!("{n} ({})", size(n.saturating_mul(PAGE_SIZE)))
}

/// A time in microseconds: "41.5 µs" under a millisecond, "2.00 ms" from
/// there on.
pub fn micros(us: impl Into<Option<f64>>) -> String {
    or_dash(us.into(), |us| {
        // 999.95 and up would print as "1000.0 µs".
        if us.abs() < 999.95 {
            format!("{us:.1} µs")
        } else {
            format!("{:.2} ms", us / 1000.0)
        }
    })
}

/// `part` as a share of `whole`: "1.6%", "0.05%", "0.0015%"; `-` when
/// `whole` is 0. Small shares keep two significant digits, so that an idle
/// VM's metadata does not read as "0.0%".
pub fn share(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".to_string();
    }
    let p = part as f64 * 100.0 / whole as f64;
    if p == 0.0 || p >= 1.0 {
        return format!("{p:.1}%");
    }
    // Decimals enough for two significant digits.
    let decimals = (1.0 - p.log10().floor()).clamp(1.0, 12.0) as usize;
    format!("{p:.decimals$}%")
}

/// A duration in whole seconds: "45s", "12m05s", "3h07m", "2d04h".
pub fn seconds(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// "yes" or "no".
pub fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// A count, a name or a message, as it is.
pub fn text(v: impl Display) -> String {
    v.to_string()
}

/// An enumeration's value as the API spells it in JSON (`"2M"`, `"None"`).
pub fn spelled(v: impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".to_string(),
    }
}

/// [`text`], or `-`.
pub fn text_or_dash<T: Display>(v: Option<T>) -> String {
    or_dash(v, text)
}

fn or_dash<T>(v: Option<T>, shown: impl FnOnce(T) -> String) -> String {
    v.map_or_else(|| "-".to_string(), shown)
}

/// [`bytes`] of a known size.
fn size(n: u64) -> String {
    if n < 1024 {
        return format!("{n} B");
    }
    // Step up while the figure would round to 1024.0 or more in this unit.
    let mut unit = 0;
    while unit + 1 < BYTE_UNITS.len() && n as f64 / scale(unit) >= 1023.95 {
        unit += 1;
    }
    let divisor = 1u64 << (10 * (unit + 1));
    if n.is_multiple_of(divisor) {
        format!("{} {}", n / divisor, BYTE_UNITS[unit])
    } else {
        // Precision loss above 2^53 bytes is irrelevant for display.
        format!("{:.1} {}", n as f64 / scale(unit), BYTE_UNITS[unit])
    }
}

/// 1024 to the power of `unit + 1`, as a float.
fn scale(unit: usize) -> f64 {
    (1u64 << (10 * (unit + 1))) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_take_the_unit_that_reads_best() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1 KiB");
        // An idle VM's memmap: not "0.0 MiB".
        assert_eq!(bytes(32 << 10), "32 KiB");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes((1 << 20) - 1), "1.0 MiB");
        assert_eq!(bytes(1 << 20), "1 MiB");
        assert_eq!(bytes(4_096_000), "3.9 MiB");
        assert_eq!(bytes(2 << 30), "2 GiB");
        assert_eq!(bytes((2 << 30) + (512 << 20)), "2.5 GiB");
        assert_eq!(bytes(u64::MAX), "16.0 EiB");
        assert_eq!(bytes(Some(5 << 20)), "5 MiB");
        assert_eq!(bytes(None), "-");
    }

    #[test]
    fn sizes_given_in_kib_mib_and_pages() {
        assert_eq!(kib(2048), "2 MiB");
        assert_eq!(mib(512), "512 MiB");
        assert_eq!(mib(2048), "2 GiB");
        assert_eq!(mib(u64::MAX), "16.0 EiB");
        assert_eq!(pages(524_288), "524288 (2 GiB)");
        assert_eq!(pages(8), "8 (32 KiB)");
    }

    #[test]
    fn shares_keep_two_significant_digits() {
        assert_eq!(share(1, 2), "50.0%");
        assert_eq!(share(3, 3), "100.0%");
        assert_eq!(share(0, 3), "0.0%");
        assert_eq!(share(1, 0), "-");
        assert_eq!(share(5, 1000), "0.50%");
        // An idle 2 GiB VM's 32 KiB of memmap.
        assert_eq!(share(32 << 10, 2 << 30), "0.0015%");
        assert_eq!(share(u64::MAX, u64::MAX), "100.0%");
    }

    #[test]
    fn uptimes_in_two_units() {
        assert_eq!(seconds(0), "0s");
        assert_eq!(seconds(59), "59s");
        assert_eq!(seconds(725), "12m05s");
        assert_eq!(seconds(3725), "1h02m");
        assert_eq!(seconds(86400 * 2 + 3600 * 4), "2d04h");
        assert!(seconds(u64::MAX).ends_with('h'));
    }

    #[test]
    fn times_in_us_then_ms() {
        assert_eq!(micros(0.0), "0.0 µs");
        assert_eq!(micros(41.5), "41.5 µs");
        assert_eq!(micros(999.9), "999.9 µs");
        assert_eq!(micros(999.96), "1.00 ms");
        assert_eq!(micros(2000.5), "2.00 ms");
        assert_eq!(micros(Some(7300.5)), "7.30 ms");
        assert_eq!(micros(None), "-");
    }

    #[test]
    fn flags_names_and_unknowns() {
        assert_eq!(yes_no(true), "yes");
        assert_eq!(yes_no(false), "no");
        assert_eq!(text(42), "42");
        assert_eq!(text_or_dash(Some("Halted")), "Halted");
        assert_eq!(text_or_dash(None::<i32>), "-");
    }
}
