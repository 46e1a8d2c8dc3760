//! Connection set-up with the client's address preserved
//! (`preserveSourceAddress`, the default) against without (deliveries from
//! 127.0.0.6): connect to the first byte back, one connection at a time,
//! a->b (same node) and a->c (across nodes, mTLS L4), the two settings
//! alternated in every round with the agents restarted between them.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use mesh_testbed::Pod;
use serde_json::{Value, json};

/// Connections per measurement.
pub const CONNECTIONS: u32 = 2_000;

/// The two settings, in the order measured each round.
pub const SETTINGS: [(&str, &str); 2] = [
    ("client's address", ""),
    ("agent's address", "preserveSourceAddress: false\n"),
];

/// p50 and p99 of one measurement, in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetupSample {
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Every round's samples, by target and setting.
#[derive(Default)]
pub struct SetupLatency {
    /// (target name, setting index) -> samples over rounds.
    pub samples: Vec<((&'static str, usize), Vec<SetupSample>)>,
}

impl SetupLatency {
    pub fn push(&mut self, target: &'static str, setting: usize, sample: SetupSample) {
        match self
            .samples
            .iter_mut()
            .find(|(key, _)| *key == (target, setting))
        {
            Some((_, samples)) => samples.push(sample),
            None => self.samples.push(((target, setting), vec![sample])),
        }
    }

    fn median(&self, target: &str, setting: usize, f: impl Fn(&SetupSample) -> f64) -> f64 {
        let values: Vec<f64> = self
            .samples
            .iter()
            .filter(|((t, s), _)| *t == target && *s == setting)
            .flat_map(|(_, samples)| samples.iter().map(&f))
            .collect();
        super::median(&values)
    }

    fn targets(&self) -> Vec<&'static str> {
        let mut targets: Vec<&'static str> = Vec::new();
        for ((target, _), _) in &self.samples {
            if !targets.contains(target) {
                targets.push(target);
            }
        }
        targets
    }

    pub fn markdown(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\nConnection set-up (connect to the first byte back, {CONNECTIONS} connections one at a time, python client; medians over rounds), deliveries from the client's address against from the agent's (`preserveSourceAddress: false`), alternated each round:\n\n| path | client's address p50 | p99 | agent's address p50 | p99 | × p50 | × p99 |\n|---|---|---|---|---|---|---|"
        );
        for target in self.targets() {
            let (p50, p99) = (
                self.median(target, 0, |s| s.p50_us),
                self.median(target, 0, |s| s.p99_us),
            );
            let (base50, base99) = (
                self.median(target, 1, |s| s.p50_us),
                self.median(target, 1, |s| s.p99_us),
            );
            let _ = writeln!(
                t,
                "| {target} | {p50:.0} µs | {p99:.0} µs | {base50:.0} µs | {base99:.0} µs | {:.2} | {:.2} |",
                p50 / base50,
                p99 / base99
            );
        }
        t
    }

    pub fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .samples
            .iter()
            .map(|((target, setting), samples)| {
                json!({
                    "path": target,
                    "delivered_from": SETTINGS[*setting].0,
                    "rounds": samples.iter().map(|s| json!({"p50_us": s.p50_us, "p99_us": s.p99_us})).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({"connections": CONNECTIONS, "rows": rows})
    }
}

/// One measurement from `client` to `target` (bench.py `setup`).
pub fn measure(
    run_script: impl Fn(&Pod, &[&str]) -> Result<String>,
    client: &Pod,
    target: &Pod,
    port: u16,
) -> Result<SetupSample> {
    let out = run_script(
        client,
        &[
            "setup",
            &target.ipv4().to_string(),
            &port.to_string(),
            &CONNECTIONS.to_string(),
        ],
    )?;
    let value = |key: &str| -> Result<f64> {
        let mut words = out.split_whitespace();
        while let Some(word) = words.next() {
            if word == key {
                return words
                    .next()
                    .context("no value")?
                    .parse()
                    .with_context(|| format!("{key} in {out:?}"));
            }
        }
        anyhow::bail!("no {key} in the set-up output {out:?}")
    };
    Ok(SetupSample {
        p50_us: value("p50_us")?,
        p99_us: value("p99_us")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_row_per_path_with_the_ratio_of_the_medians() {
        let mut setup = SetupLatency::default();
        for (p50, base) in [(100.0, 50.0), (300.0, 100.0), (200.0, 100.0)] {
            for (target, scale) in [("b", 1.0), ("c", 2.0)] {
                let sample = |p50: f64| SetupSample {
                    p50_us: p50 * scale,
                    p99_us: p50 * scale * 2.0,
                };
                setup.push(target, 0, sample(p50));
                setup.push(target, 1, sample(base));
            }
        }
        let table = setup.markdown();
        let rows: Vec<&str> = table
            .lines()
            .filter(|l| l.starts_with("| b") || l.starts_with("| c"))
            .collect();
        assert_eq!(rows.len(), 2, "{table}");
        // Medians: 200 vs 100 (b), 400 vs 200 (c): 2.00 both.
        assert_eq!(
            rows[0],
            "| b | 200 µs | 400 µs | 100 µs | 200 µs | 2.00 | 2.00 |"
        );
        assert_eq!(
            rows[1],
            "| c | 400 µs | 800 µs | 200 µs | 400 µs | 2.00 | 2.00 |"
        );
        assert_eq!(setup.json()["rows"].as_array().unwrap().len(), 4);
    }
}
