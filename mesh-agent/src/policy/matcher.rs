//! Pre-parsed value matchers. Everything here is built once at load time so
//! that a decision never parses a string or allocates.

use std::cmp::Ordering;
use std::net::IpAddr;

use ipnet::IpNet;

/// One Istio string pattern: `abc` (exact), `abc*` (prefix), `*abc` (suffix)
/// or `*` (presence: any non-empty value, Istio generates the regex `.+`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pattern {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Presence,
}

/// Parses one Istio string value. A `*` anywhere but first or last (or on
/// both ends) is rejected: Istio would treat it literally or as a one-sided
/// wildcard, which is never what the author meant.
pub(crate) fn parse_pattern(value: &str) -> Result<Pattern, String> {
    if value.is_empty() {
        return Err("empty value (use \"*\" to match any value)".into());
    }
    if value == "*" {
        return Ok(Pattern::Presence);
    }
    let (pattern, rest) = if let Some(rest) = value.strip_prefix('*') {
        (Pattern::Suffix(rest.into()), rest)
    } else if let Some(rest) = value.strip_suffix('*') {
        (Pattern::Prefix(rest.into()), rest)
    } else {
        (Pattern::Exact(value.into()), value)
    };
    if rest.contains('*') {
        return Err(format!(
            "{value:?}: '*' is only allowed as the whole value, as a prefix or as a suffix"
        ));
    }
    Ok(pattern)
}

/// A set of patterns, ORed. Exact values are kept sorted for binary search.
#[derive(Debug, Clone, Default)]
pub(crate) struct StringMatcher {
    exact: Vec<Box<str>>,
    prefixes: Vec<Box<str>>,
    suffixes: Vec<Box<str>>,
    presence: bool,
    /// `*` on a header means "present", even with an empty value (Envoy
    /// `present_match`); elsewhere it means non-empty (regex `.+`).
    presence_includes_empty: bool,
    /// Hosts are matched case-insensitively (values are stored lowercase).
    ignore_case: bool,
}

impl StringMatcher {
    pub(crate) fn new(patterns: Vec<Pattern>, ignore_case: bool) -> Self {
        let mut m = StringMatcher {
            ignore_case,
            ..Default::default()
        };
        let fold = |s: Box<str>| -> Box<str> {
            if ignore_case {
                s.to_ascii_lowercase().into()
            } else {
                s
            }
        };
        for p in patterns {
            match p {
                Pattern::Exact(s) => m.exact.push(fold(s)),
                Pattern::Prefix(s) => m.prefixes.push(fold(s)),
                Pattern::Suffix(s) => m.suffixes.push(fold(s)),
                Pattern::Presence => m.presence = true,
            }
        }
        m.exact.sort_unstable();
        m.exact.dedup();
        m
    }

    pub(crate) fn with_presence_including_empty(mut self) -> Self {
        self.presence_includes_empty = true;
        self
    }

    pub(crate) fn matches(&self, value: &str) -> bool {
        if self.presence && (self.presence_includes_empty || !value.is_empty()) {
            return true;
        }
        let v = value.as_bytes();
        if self.ignore_case {
            self.exact
                .binary_search_by(|e| cmp_ignore_ascii_case(e.as_bytes(), v))
                .is_ok()
                || self
                    .prefixes
                    .iter()
                    .any(|p| v.len() >= p.len() && v[..p.len()].eq_ignore_ascii_case(p.as_bytes()))
                || self.suffixes.iter().any(|s| {
                    v.len() >= s.len() && v[v.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
                })
        } else {
            self.exact.binary_search_by(|e| e.as_bytes().cmp(v)).is_ok()
                || self.prefixes.iter().any(|p| value.starts_with(&**p))
                || self.suffixes.iter().any(|s| value.ends_with(&**s))
        }
    }
}

/// Compares `stored` (already lowercase) with `input` folded to lowercase.
fn cmp_ignore_ascii_case(stored: &[u8], input: &[u8]) -> Ordering {
    let folded = input.iter().map(u8::to_ascii_lowercase);
    stored.iter().copied().cmp(folded)
}

/// Parses `10.0.0.0/8`, `10.1.2.3` or `2001:db8::/32`. Host bits are masked
/// off like Go's `net.ParseCIDR` (which Istio uses) does.
pub(crate) fn parse_cidr(value: &str) -> Result<IpNet, String> {
    if let Ok(net) = value.parse::<IpNet>() {
        return Ok(canonical_net(net.trunc()));
    }
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Ok(canonical_net(IpNet::from(ip)));
    }
    Err(format!("{value:?} is not an IP address or CIDR"))
}

/// `::ffff:10.0.0.0/104` is stored as `10.0.0.0/8` so that one lookup (on the
/// canonical request address) covers both spellings.
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
    {
        return IpNet::V4(ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).expect("prefix <= 32"));
    }
    net
}

/// A set of CIDRs as merged, sorted, non-overlapping integer ranges: a
/// lookup is one binary search.
#[derive(Debug, Clone, Default)]
pub(crate) struct IpMatcher {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl IpMatcher {
    pub(crate) fn new(nets: &[IpNet]) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in nets {
            match net {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()))),
                IpNet::V6(n) => v6.push((u128::from(n.network()), u128::from(n.broadcast()))),
            }
        }
        IpMatcher {
            v4: merge_ranges(v4),
            v6: merge_ranges(v6),
        }
    }

    pub(crate) fn matches(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(a) => in_ranges(&self.v4, u32::from(a)),
            IpAddr::V6(a) => in_ranges(&self.v6, u128::from(a)),
        }
    }
}

fn merge_ranges<T: Ord + Copy>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            // CIDRs either nest or are disjoint, so "starts inside" is enough.
            Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out.shrink_to_fit();
    out
}

fn in_ranges<T: Ord + Copy>(ranges: &[(T, T)], x: T) -> bool {
    // Index of the first range starting after x; the candidate is the one before.
    let idx = ranges.partition_point(|&(lo, _)| lo <= x);
    idx > 0 && x <= ranges[idx - 1].1
}

/// Parses a port the way Istio does: a decimal number. 0 is rejected (it can
/// never be a destination port, so a rule naming it is a mistake).
pub(crate) fn parse_port(value: &str) -> Result<u16, String> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{value:?} is not a port"));
    }
    match value.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{value:?} is not a port (1-65535)")),
        Ok(p) => Ok(p),
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct PortMatcher {
    ports: Vec<u16>,
}

impl PortMatcher {
    pub(crate) fn new(mut ports: Vec<u16>) -> Self {
        ports.sort_unstable();
        ports.dedup();
        PortMatcher { ports }
    }

    pub(crate) fn matches(&self, port: u16) -> bool {
        self.ports.binary_search(&port).is_ok()
    }
}

/// Something that can test one attribute value.
pub(crate) trait Matcher<T: ?Sized> {
    fn test(&self, value: &T) -> bool;
}

impl Matcher<str> for StringMatcher {
    fn test(&self, value: &str) -> bool {
        self.matches(value)
    }
}

impl Matcher<IpAddr> for IpMatcher {
    fn test(&self, value: &IpAddr) -> bool {
        self.matches(*value)
    }
}

impl Matcher<u16> for PortMatcher {
    fn test(&self, value: &u16) -> bool {
        self.matches(*value)
    }
}

/// A field with its `notX` twin (or a condition's `values` / `notValues`).
/// Both present means both must hold (Istio ANDs them).
#[derive(Debug, Clone)]
pub(crate) struct Field<M> {
    pub(crate) values: Option<M>,
    pub(crate) not_values: Option<M>,
}

impl<M> Field<M> {
    pub(crate) fn is_set(&self) -> bool {
        self.values.is_some() || self.not_values.is_some()
    }

    /// `attr` is `None` when the request does not carry the attribute (no
    /// peer identity, header absent). As in Envoy's RBAC, a positive match on
    /// an absent attribute fails and a negative one (`notX`) succeeds.
    pub(crate) fn matches<T: ?Sized>(&self, attr: Option<&T>) -> bool
    where
        M: Matcher<T>,
    {
        if let Some(m) = &self.values {
            match attr {
                Some(v) if m.test(v) => {}
                _ => return false,
            }
        }
        if let Some(m) = &self.not_values
            && let Some(v) = attr
            && m.test(v)
        {
            return false;
        }
        true
    }
}

/// Strips the port (and a trailing dot) from an HTTP host: `Example.com.:8080`
/// -> `Example.com`, `[::1]:80` -> `[::1]`. Borrowed, never allocates.
pub(crate) fn host_without_port(host: &str) -> &str {
    let h = if host.starts_with('[') {
        match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    h.strip_suffix('.').unwrap_or(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sm(values: &[&str], ignore_case: bool) -> StringMatcher {
        StringMatcher::new(
            values.iter().map(|v| parse_pattern(v).unwrap()).collect(),
            ignore_case,
        )
    }

    #[test]
    fn string_patterns() {
        let cases: &[(&[&str], bool, &str, bool)] = &[
            (&["abc"], false, "abc", true),
            (&["abc"], false, "abcd", false),
            (&["abc"], false, "ABC", false),
            (&["abc*"], false, "abc", true),
            (&["abc*"], false, "abcd", true),
            (&["abc*"], false, "xabc", false),
            (&["*abc"], false, "abc", true),
            (&["*abc"], false, "xabc", true),
            (&["*abc"], false, "abcx", false),
            (&["*"], false, "x", true),
            (&["*"], false, "", false),
            (&["a", "b", "c"], false, "b", true),
            (&["a", "b", "c"], false, "d", false),
            (&["Example.COM"], true, "example.com", true),
            (&["*.Example.com"], true, "WWW.EXAMPLE.COM", true),
            (&["api.*"], true, "API.example.com", true),
            (&["example.com"], true, "example.co", false),
        ];
        for (values, ic, input, want) in cases {
            assert_eq!(
                sm(values, *ic).matches(input),
                *want,
                "{values:?} vs {input:?}"
            );
        }
    }

    #[test]
    fn bad_patterns() {
        for v in ["", "a*b", "*a*", "**"] {
            assert!(parse_pattern(v).is_err(), "{v:?} should be rejected");
        }
    }

    #[test]
    fn ip_sets() {
        let nets: Vec<IpNet> = ["10.0.0.0/8", "10.1.0.0/16", "192.168.1.7", "2001:db8::/32"]
            .iter()
            .map(|s| parse_cidr(s).unwrap())
            .collect();
        let m = IpMatcher::new(&nets);
        let cases = [
            ("10.255.0.1", true),
            ("11.0.0.0", false),
            ("9.255.255.255", false),
            ("192.168.1.7", true),
            ("192.168.1.8", false),
            ("::ffff:10.0.0.1", true),
            ("2001:db8::1", true),
            ("2001:db9::1", false),
        ];
        for (ip, want) in cases {
            assert_eq!(m.matches(ip.parse().unwrap()), want, "{ip}");
        }
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(
            parse_cidr("::ffff:10.0.0.0/104").unwrap().to_string(),
            "10.0.0.0/8"
        );
        for bad in ["10.0.0.0/33", "10.0.0", "", "x", "10.0.0.0/"] {
            assert!(parse_cidr(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ports() {
        assert_eq!(parse_port("80"), Ok(80));
        for bad in ["0", "65536", "80x", "", "-1", "+80", " 80", "*"] {
            assert!(parse_port(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hosts() {
        let cases = [
            ("example.com", "example.com"),
            ("example.com:8080", "example.com"),
            ("example.com.", "example.com"),
            ("example.com.:80", "example.com"),
            ("[::1]:80", "[::1]"),
            ("[::1]", "[::1]"),
            ("a:b", "a:b"),
        ];
        for (input, want) in cases {
            assert_eq!(host_without_port(input), want, "{input}");
        }
    }
}
