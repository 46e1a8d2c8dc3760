//! `pod-tool` as the test bed finds it. No root needed.
//!
//! Being an integration test of this package, this also makes `cargo test`
//! build the binary (into `target/<profile>/`) before any test runs.

use std::path::Path;

#[test]
fn the_test_bed_finds_the_binary_cargo_built() {
    let built = Path::new(env!("CARGO_BIN_EXE_pod-tool"));
    let found = mesh_testbed::tool::path().unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(found.canonicalize().unwrap(), built.canonicalize().unwrap());
}

#[test]
fn every_subcommand_answers_help() {
    let out = mesh_testbed::tool::command(&["--help"])
        .unwrap()
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 10, "{help}");
    for command in commands {
        let out = mesh_testbed::tool::command(&[command, "--help"])
            .unwrap()
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pod-tool {command} --help: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
