//! Host names on the command line (`--controller NAME:PORT`, `--api-name NAME`).

/// `s` as a DNS host name — labels of letters, digits and inner `-`, at most 63 bytes each and 253
/// in all, an optional final dot — lowercased and without the final dot; `None` otherwise. An
/// all-numeric name is refused: it is a mistyped IPv4 address, not a name.
pub fn dns_name(s: &str) -> Option<String> {
    let host = s.strip_suffix('.').unwrap_or(s);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let numeric = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    (host.len() <= 253 && host.split('.').all(label_ok) && !numeric)
        .then(|| host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::dns_name;

    #[test]
    fn names_are_checked_and_normalised() {
        assert_eq!(
            dns_name("Ctl-1.Example.org."),
            Some("ctl-1.example.org".into())
        );
        assert_eq!(dns_name("localhost"), Some("localhost".into()));
        let long = format!("{}.org", "a".repeat(64));
        for bad in [
            "",
            ".",
            "-a",
            "a-",
            "a..b",
            "a b",
            "a_b",
            "10.0.0.1",
            "*.example.org",
            &long,
        ] {
            assert_eq!(dns_name(bad), None, "{bad:?}");
        }
    }
}
