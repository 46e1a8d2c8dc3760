//! What a setting of the agents costs a request, measured beside a
//! baseline in the same run: latency at a fixed rate and the agents' CPU
//! per 1,000 requests, for each setting, each round, the order of the
//! settings turned each round; the report gives medians over rounds and the
//! differences to the baseline (the first setting named).

use std::fmt::Write as _;

use anyhow::Result;
use mesh_testbed::Pod;
use serde_json::{Value, json};

use super::Tools;

/// One measurement: latency at the fixed rate, the agents' CPU.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub p50_us: f64,
    pub p99_us: f64,
    pub cpu_s_per_1k: f64,
}

/// Runs http-load with `args` in `client` and measures the agents `pids`.
pub fn measure(tools: &Tools, client: &Pod, agent_pids: &[u32], args: &[String]) -> Result<Sample> {
    let cpu_before = super::cpu_ticks(agent_pids)?;
    let perf = super::PerfStat::start(agent_pids, &super::bench_dir());
    let report = super::http_load(
        tools,
        client,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let cpu_s =
        (super::cpu_ticks(agent_pids)? - cpu_before) as f64 / super::clock_ticks_per_second();
    let requests = report["requests"].as_f64().unwrap_or(0.0).max(1.0);
    if let Some(perf) = perf {
        super::step(format!("  perf per request: {}", perf.stop(requests)));
    }
    let latency = &report["latency_us"];
    let us = |name: &str| latency[name].as_f64().unwrap_or(f64::NAN);
    Ok(Sample {
        p50_us: us("p50"),
        p99_us: us("p99"),
        cpu_s_per_1k: cpu_s / (requests / 1000.0),
    })
}

/// Every round's samples by setting.
pub struct SettingsCost {
    /// The paragraph above the table: what was measured, how.
    heading: String,
    /// The first column's title.
    column: &'static str,
    samples: Vec<(&'static str, Vec<Sample>)>,
}

impl SettingsCost {
    pub fn new(heading: String, column: &'static str) -> Self {
        Self {
            heading,
            column,
            samples: Vec::new(),
        }
    }

    pub fn push(&mut self, setting: &'static str, sample: Sample) {
        match self.samples.iter_mut().find(|(s, _)| *s == setting) {
            Some((_, samples)) => samples.push(sample),
            None => self.samples.push((setting, vec![sample])),
        }
    }

    fn median(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
        super::median(&samples.iter().map(f).collect::<Vec<_>>())
    }

    /// The table, with the differences to `baseline`; empty when nothing
    /// was measured.
    pub fn markdown(&self, baseline: &str) -> String {
        let mut t = String::new();
        let Some((_, base)) = self.samples.iter().find(|(s, _)| *s == baseline) else {
            return t;
        };
        let (p50_base, p99_base, cpu_base) = (
            Self::median(base, |s| s.p50_us),
            Self::median(base, |s| s.p99_us),
            Self::median(base, |s| s.cpu_s_per_1k),
        );
        let _ = writeln!(
            t,
            "\n{} (medians over {} rounds, the order of the settings turned each round):\n\n| {} | p50 | p99 | CPU s / 1k req | + p50 | + p99 | + CPU / 1k req |\n|---|---|---|---|---|---|---|",
            self.heading,
            base.len(),
            self.column
        );
        for (setting, samples) in &self.samples {
            let (p50, p99, cpu) = (
                Self::median(samples, |s| s.p50_us),
                Self::median(samples, |s| s.p99_us),
                Self::median(samples, |s| s.cpu_s_per_1k),
            );
            let _ = writeln!(
                t,
                "| {setting} | {p50:.0} µs | {p99:.0} µs | {cpu:.3} | {:+.0} µs | {:+.0} µs | {:+.3} s ({:+.0}%) |",
                p50 - p50_base,
                p99 - p99_base,
                cpu - cpu_base,
                (cpu / cpu_base - 1.0) * 100.0
            );
        }
        t
    }

    pub fn json(&self) -> Value {
        json!(
            self.samples
                .iter()
                .map(|(setting, samples)| json!({
                    "setting": setting,
                    "rounds": samples.iter().map(|s| json!({
                        "p50_us": s.p50_us, "p99_us": s.p99_us, "cpu_s_per_1k": s.cpu_s_per_1k,
                    })).collect::<Vec<_>>(),
                }))
                .collect::<Vec<_>>()
        )
    }
}

/// `settings` in the order measured in `round`: turned each round, so no
/// setting is always measured first (right after the previous part).
pub fn turned<T>(mut settings: Vec<T>, round: usize) -> Vec<T> {
    if !settings.is_empty() {
        let turn = round % settings.len();
        settings.rotate_left(turn);
    }
    settings
}
