//! The guest kernel's command line rules: `key=value` words separated by
//! spaces, later words overriding earlier ones, sizes with binary units, and
//! the memmap words ([`memmap_words`]). In the contract because the VMM
//! reads the memmap words as the guest does, to compute the guest's layout
//! (`crate::layout`) from the same inputs.

use crate::{Strategy, DEFAULT_CHUNK_SIZE, MIN_CHUNK_SIZE, SECTION_SIZE};

/// Iterates over the `key=value` words of a command line; a word without `=`
/// yields an empty value.
pub fn words(cmdline: &str) -> impl Iterator<Item = (&str, &str)> {
    cmdline
        .split_ascii_whitespace()
        .map(|w| w.split_once('=').unwrap_or((w, "")))
}

/// The value of the last `key=...` word, if any (later words override earlier ones).
pub fn get<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    words(cmdline).filter(|(k, _)| *k == key).map(|(_, v)| v).last()
}

/// Parses a size such as `4096`, `128K`, `2M`, `1G` (binary units) into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

/// The memmap words of `cmdline` as the guest kernel takes them:
/// `memmap_init=` (a [`Strategy::name`]; default `ondemand`),
/// `memmap_chunk=` (a power-of-two size from [`MIN_CHUNK_SIZE`] to
/// [`SECTION_SIZE`]; default [`DEFAULT_CHUNK_SIZE`]) and `memmap_on_memory=`
/// (`on`, `1` or no value; `off`, `0`; default off). A bad value gives the
/// key, and the guest does not boot.
pub fn memmap_words(cmdline: &str) -> Result<(Strategy, u64, bool), &'static str> {
    let strategy = match get(cmdline, "memmap_init") {
        Some(v) => Strategy::from_name(v).ok_or("memmap_init")?,
        None => Strategy::OnDemand,
    };
    let chunk = match get(cmdline, "memmap_chunk") {
        Some(v) => parse_size(v)
            .filter(|n| n.is_power_of_two())
            .filter(|n| (MIN_CHUNK_SIZE..=SECTION_SIZE).contains(n))
            .ok_or("memmap_chunk")?,
        None => DEFAULT_CHUNK_SIZE,
    };
    let on_memory = match get(cmdline, "memmap_on_memory") {
        Some("on" | "1" | "") => true,
        Some("off" | "0") | None => false,
        Some(_) => return Err("memmap_on_memory"),
    };
    Ok((strategy, chunk, on_memory))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memmap_words_take_the_last_value_and_name_a_bad_one() {
        assert_eq!(memmap_words(""), Ok((Strategy::OnDemand, DEFAULT_CHUNK_SIZE, false)));
        let c = "memmap_init=ondemand memmap_chunk=2048K memmap_on_memory=on memmap_chunk=128K memmap_init=eager";
        assert_eq!(memmap_words(c), Ok((Strategy::Eager, 128 << 10, true)));
        assert_eq!(memmap_words("memmap_on_memory"), Ok((Strategy::OnDemand, DEFAULT_CHUNK_SIZE, true)));
        assert_eq!(memmap_words("memmap_on_memory=on memmap_on_memory=0").map(|w| w.2), Ok(false));
        assert_eq!(memmap_words("memmap_init=lazy"), Err("memmap_init"));
        for bad in ["3M", "64K", "256M", "x"] {
            assert_eq!(memmap_words(&std::format!("memmap_chunk={bad}")), Err("memmap_chunk"), "{bad}");
        }
        assert_eq!(memmap_words("memmap_on_memory=yes"), Err("memmap_on_memory"));
    }

    #[test]
    fn last_word_wins_and_bare_words_have_empty_values() {
        let c = "workload=wait quiet memmap_init=eager memmap_init=ondemand";
        assert_eq!(get(c, "memmap_init"), Some("ondemand"));
        assert_eq!(get(c, "quiet"), Some(""));
        assert_eq!(get(c, "cpl"), None);
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("128K"), Some(128 << 10));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("-1M"), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
        assert_eq!(parse_size("17179869184G"), None);
    }
}
