//! Kernel command line: `key=value` words separated by spaces.

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

#[cfg(test)]
mod tests {
    use super::*;

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
