//! The tunnel's CONNECT parsing (authority and Forwarded) on arbitrary
//! strings: `None` or an address that prints and parses back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::tunnel::{
    format_authority, format_forwarded, parse_authority, parse_forwarded_for,
};

fuzz_target!(|text: &str| {
    if let Some(addr) = parse_authority(text) {
        assert_eq!(
            parse_authority(&format_authority(addr)),
            Some(addr),
            "{text:?}"
        );
    }
    if let Some(ip) = parse_forwarded_for(text) {
        assert_eq!(
            parse_forwarded_for(&format_forwarded(ip)),
            Some(ip),
            "{text:?}"
        );
    }
});
