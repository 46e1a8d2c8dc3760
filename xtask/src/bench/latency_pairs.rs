//! Latencies measured two ways side by side in one run (each round
//! alternating the two), reported as p50/p99 per path and their ratio:
//! connection set-up with the client's address preserved against from the
//! agent's address, and a DNS lookup through the agent against a direct one.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use mesh_testbed::Pod;
use serde_json::{Value, json};

/// Connections (or lookups) per measurement.
pub const COUNT: u32 = 2_000;

/// Connection set-up: the two settings (node.yaml lines), in the order
/// measured each round.
pub const SETUP_SETTINGS: [(&str, &str); 2] = [
    ("client's address", ""),
    ("agent's address", "preserveSourceAddress: false\n"),
];

/// p50 and p99 of one measurement, in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct LatencySample {
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Every round's samples, by path and setting.
pub struct LatencyPairs {
    /// What was measured and how, the table's introduction.
    title: String,
    /// The names of the two settings (the second is the baseline).
    settings: [&'static str; 2],
    /// (path, setting index) -> samples over rounds.
    samples: Vec<((&'static str, usize), Vec<LatencySample>)>,
}

impl LatencyPairs {
    pub fn new(title: String, settings: [&'static str; 2]) -> Self {
        Self {
            title,
            settings,
            samples: Vec::new(),
        }
    }

    pub fn push(&mut self, target: &'static str, setting: usize, sample: LatencySample) {
        match self
            .samples
            .iter_mut()
            .find(|(key, _)| *key == (target, setting))
        {
            Some((_, samples)) => samples.push(sample),
            None => self.samples.push(((target, setting), vec![sample])),
        }
    }

    fn median(&self, target: &str, setting: usize, f: impl Fn(&LatencySample) -> f64) -> f64 {
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
        if self.samples.is_empty() {
            return t;
        }
        let [first, second] = self.settings;
        let _ = writeln!(
            t,
            "\n{}\n\n| path | {first} p50 | p99 | {second} p50 | p99 | × p50 | × p99 |\n|---|---|---|---|---|---|---|",
            self.title
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
                    "setting": self.settings[*setting],
                    "rounds": samples.iter().map(|s| json!({"p50_us": s.p50_us, "p99_us": s.p99_us})).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({"count": COUNT, "rows": rows})
    }
}

/// One measurement from `client` (bench.py `setup` or `dns`): `args`
/// follow the command, the count is added.
pub fn measure(
    run_script: impl Fn(&Pod, &[&str]) -> Result<String>,
    client: &Pod,
    command: &str,
    args: &[&str],
) -> Result<LatencySample> {
    let count = COUNT.to_string();
    let mut all = vec![command];
    all.extend_from_slice(args);
    all.push(&count);
    let out = run_script(client, &all)?;
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
        anyhow::bail!("no {key} in the output of {command}: {out:?}")
    };
    Ok(LatencySample {
        p50_us: value("p50_us")?,
        p99_us: value("p99_us")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_row_per_path_with_the_ratio_of_the_medians() {
        let mut setup = LatencyPairs::new("Set-up".into(), ["client's address", "agent's address"]);
        for (p50, base) in [(100.0, 50.0), (300.0, 100.0), (200.0, 100.0)] {
            for (target, scale) in [("b", 1.0), ("c", 2.0)] {
                let sample = |p50: f64| LatencySample {
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
