//! The HBONE request metadata: `:authority` and `Forwarded`.
//!
//! ztunnel puts the original destination `ip:port` in `:authority` (IPv6 in
//! brackets, as `SocketAddr`'s `Display` does) and the original client in an
//! RFC 7239 `Forwarded: for=...` header.

use std::net::{IpAddr, SocketAddr};

/// `:authority` for a destination: `10.0.0.1:80` or `[2001:db8::1]:80`.
pub fn format_authority(addr: SocketAddr) -> String {
    addr.to_string()
}

/// Parses an `:authority` as an IP socket address; host names are refused
/// because the receiving agent must not resolve names on a peer's behalf.
pub fn parse_authority(authority: &str) -> Option<SocketAddr> {
    authority.parse().ok()
}

/// `Forwarded` value for the original client: `for="10.0.0.1"` or
/// `for="[2001:db8::1]"` (RFC 7239 §6 requires IPv6 to be bracketed and
/// quoted; quoting IPv4 too is allowed and keeps one form).
pub fn format_forwarded(client: IpAddr) -> String {
    match client {
        IpAddr::V4(ip) => format!("for=\"{ip}\""),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    }
}

/// The client address of the first `for=` in a `Forwarded` value: the first
/// element is the one the original sender added. Accepts quoted or bare
/// tokens, brackets, and an optional port; obfuscated identifiers
/// (`for=unknown`, `for=_hidden`) give `None`.
pub fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    for element in value.split(',') {
        for pair in element.split(';') {
            let Some((name, val)) = pair.split_once('=') else {
                continue;
            };
            if !name.trim().eq_ignore_ascii_case("for") {
                continue;
            }
            return parse_node(val.trim());
        }
    }
    None
}

fn parse_node(node: &str) -> Option<IpAddr> {
    let node = node
        .strip_prefix('"')
        .and_then(|n| n.strip_suffix('"'))
        .unwrap_or(node);
    if let Some(rest) = node.strip_prefix('[') {
        // "[v6]" or "[v6]:port"
        let (ip, _) = rest.split_once(']')?;
        return ip.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    // "v4:port"
    node.parse::<SocketAddr>().ok().map(|sa| sa.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_round_trip() {
        let v4: SocketAddr = "10.1.2.3:8080".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(format_authority(v4), "10.1.2.3:8080");
        assert_eq!(format_authority(v6), "[2001:db8::1]:443");
        assert_eq!(parse_authority("10.1.2.3:8080"), Some(v4));
        assert_eq!(parse_authority("[2001:db8::1]:443"), Some(v6));
        assert_eq!(parse_authority("example.com:80"), None);
        assert_eq!(parse_authority("10.1.2.3"), None);
        assert_eq!(parse_authority("2001:db8::1:443"), None);
    }

    #[test]
    fn forwarded_format_and_parse() {
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(format_forwarded(v4), "for=\"192.0.2.7\"");
        assert_eq!(format_forwarded(v6), "for=\"[2001:db8::1]\"");
        for ip in [v4, v6] {
            assert_eq!(parse_forwarded_for(&format_forwarded(ip)), Some(ip));
        }
        assert_eq!(parse_forwarded_for("for=192.0.2.7"), Some(v4));
        assert_eq!(parse_forwarded_for("For=\"192.0.2.7:4711\""), Some(v4));
        assert_eq!(
            parse_forwarded_for("proto=tcp; for=\"[2001:db8::1]:4711\""),
            Some(v6)
        );
        assert_eq!(
            parse_forwarded_for("for=192.0.2.7, for=198.51.100.1"),
            Some(v4)
        );
        assert_eq!(parse_forwarded_for("for=unknown"), None);
        assert_eq!(parse_forwarded_for("by=192.0.2.7"), None);
        assert_eq!(parse_forwarded_for(""), None);
    }
}
