//! Path normalisation: a table, then the bypass property against DENY rules.

use super::{R, ROOT, compile, workload};
use crate::policy::{PathError, normalize_path};

#[test]
fn normalisation_table() {
    use PathError::*;
    let cases: &[(&str, Result<&str, PathError>)] = &[
        ("/", Ok("/")),
        ("/a/b", Ok("/a/b")),
        ("//a///b", Ok("/a/b")),
        ("/a/./b", Ok("/a/b")),
        ("/a/../b", Ok("/b")),
        ("/../../b", Ok("/b")),
        ("/a/b/..", Ok("/a/")),
        ("/a/b/.", Ok("/a/b/")),
        ("/a/", Ok("/a/")),
        ("/..", Ok("/")),
        ("/a/%2e%2E/b", Ok("/b")),
        ("/%61%62%7E%2D%5f", Ok("/ab~-_")),
        ("/a%3f", Ok("/a%3F")),
        ("/a%20b", Ok("/a%20b")),
        ("/a%c3%a9", Ok("/a%C3%A9")),
        ("/%252e", Ok("/%252e")),
        ("/a?b=/../c", Ok("/a")),
        ("/a#frag", Ok("/a")),
        ("/a;x=1", Ok("/a;x=1")),
        ("/ADMIN", Ok("/ADMIN")),
        ("*", Ok("*")),
        ("", Err(Empty)),
        ("?a", Err(MissingLeadingSlash)),
        ("a/b", Err(MissingLeadingSlash)),
        ("http://h/a", Err(MissingLeadingSlash)),
        ("/a%2fb", Err(EncodedSlash)),
        ("/a%2Fb", Err(EncodedSlash)),
        ("/a%5cb", Err(EncodedSlash)),
        ("/a%5Cb", Err(EncodedSlash)),
        ("/a\\b", Err(Backslash)),
        ("/a b", Err(InvalidCharacter)),
        ("/a\tb", Err(InvalidCharacter)),
        ("/a\u{7f}", Err(InvalidCharacter)),
        ("/é", Err(InvalidCharacter)),
        ("/a%", Err(BadPercentEncoding)),
        ("/a%2", Err(BadPercentEncoding)),
        ("/a%zz", Err(BadPercentEncoding)),
    ];
    for (input, want) in cases {
        let got = normalize_path(input);
        assert_eq!(got.as_deref().map_err(|e| *e), *want, "{input:?}");
    }
}

#[test]
fn normalisation_is_idempotent() {
    for p in ["/a//b/../c/./d/", "/%41%2e/x", "/a%3f/%7e"] {
        let once = normalize_path(p).unwrap();
        assert_eq!(normalize_path(&once).unwrap(), once, "{p}");
    }
}

/// Each spelling of a denied path is, after normalisation, either matched by
/// the DENY rule or rejected (the agent answers 400): never let through.
#[test]
fn deny_rules_cannot_be_bypassed() {
    // Istio's idiom for "this path and everything below it".
    let both = "[/admin, /admin/*]";
    let cases: &[(&str, &[&str])] = &[
        (
            "[/admin]",
            &[
                "/admin",
                "//admin",
                "/a/../admin",
                "/%61dmin",
                "/%61%64%6D%69%6E",
                "/./admin",
                "/admin?x",
                "/admin#x",
                "/x/%2e%2e/admin",
                "/%2e/admin",
                "///admin",
                "/../admin",
            ],
        ),
        (
            "[/admin/*]",
            &[
                "/admin/",
                "/admin/x",
                "//admin//x",
                "/admin/./x",
                "/admin%2Fx",
                "/admin%2fx",
                "/admin%5Cx",
                "/admin\\x",
                "/%61dmin/x",
                "/admin/x?y",
                "/foo/../admin/x",
                "/admin/%78",
                "/admin/x/../y",
            ],
        ),
        (
            both,
            &[
                "/admin",
                "/admin/",
                "/admin/.",
                "/admin%2F",
                "/admin/..;/x",
                "/admin/users/..",
            ],
        ),
    ];
    for (paths, spellings) in cases {
        let yaml = format!(
            "metadata: {{name: deny-admin, namespace: foo}}\nspec: {{action: DENY, rules: [{{to: [{{operation: {{paths: {paths}}}}}]}}]}}"
        );
        let wp = compile(&yaml, ROOT).for_workload(&workload("foo", &[]));
        for raw in *spellings {
            let Ok(path) = normalize_path(raw) else {
                continue; // rejected with 400: not a bypass
            };
            let path: &'static str = Box::leak(path.into_boxed_str());
            let mut r = R::default();
            r.http().path = path;
            assert!(
                !r.decide_with(&wp).is_allow(),
                "paths {paths}: {raw:?} normalised to {path:?} escaped the DENY rule"
            );
        }
    }
}

/// Generated spellings: every combination of a prefix that resolves to
/// nothing, an encoding of the first letter and a suffix that resolves to
/// nothing must still be caught.
#[test]
fn generated_spellings_cannot_bypass() {
    let yaml = "metadata: {name: d, namespace: foo}\nspec: {action: DENY, rules: [{to: [{operation: {paths: [/admin, /admin/*]}}]}]}";
    let wp = compile(yaml, ROOT).for_workload(&workload("foo", &[]));
    let prefixes = ["", "/", "/.", "/%2e", "/x/..", "/x/%2E%2e", "//", "/./."];
    let first = ["a", "%61", "%41"]; // %41 is 'A': a different path, must not match
    let suffixes = ["", "/", "/.", "/x/..", "?q", "#f", "%2F", "/%2e"];
    let mut checked = 0;
    for p in prefixes {
        for f in first {
            for s in suffixes {
                let raw = format!("{p}/{f}dmin{s}");
                let Ok(path) = normalize_path(&raw) else {
                    continue;
                };
                let is_admin = path == "/admin" || path.starts_with("/admin/");
                if f == "%41" {
                    assert!(path.starts_with("/Admin"), "{raw:?} -> {path:?}");
                    continue;
                }
                assert!(is_admin, "{raw:?} normalised to {path:?}");
                let path: &'static str = Box::leak(path.into_boxed_str());
                let mut r = R::default();
                r.http().path = path;
                assert!(
                    !r.decide_with(&wp).is_allow(),
                    "{raw:?} -> {path:?} allowed"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 50, "only {checked} spellings checked");
}
