//! The benchmark's latency plot: percentile lines per path, drawn as an SVG.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

/// One path's latency percentiles, in microseconds.
pub struct PathLatency {
    pub name: String, // e.g. "agent, across nodes, mTLS L4"
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

impl PathLatency {
    /// The percentiles in the order of [`PERCENTILES`], with values that do
    /// not fit a logarithmic axis clamped to 1 µs.
    fn values(&self) -> [f64; 4] {
        [self.p50_us, self.p90_us, self.p99_us, self.p999_us].map(clamp_us)
    }
}

/// The x axis categories.
const PERCENTILES: [&str; 4] = ["p50", "p90", "p99", "p99.9"];

const WIDTH: u32 = 900;
const HEIGHT: u32 = 500;

/// Values that cannot be drawn on a log scale (zero, negative, NaN,
/// infinite) become 1 µs.
fn clamp_us(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 { v } else { 1.0 }
}

/// A y axis label: at most three significant digits, no trailing zeros.
fn format_us(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = if v >= 10.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.2}")
        };
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// The y axis' labelled points (1, 2 and 5 times powers of ten, or only the
/// powers of ten on a wide axis) and its light grid lines (the other integer
/// multiples, left out on a very wide axis) for `lo..hi`.
fn y_key_points(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let decades = (hi / lo).log10();
    let labelled: &[u32] = if decades <= 3.5 { &[1, 2, 5] } else { &[1] };
    let (mut bold, mut light) = (Vec::new(), Vec::new());
    for exp in (lo.log10().floor() as i32)..=(hi.log10().ceil() as i32) {
        for m in 1..=9u32 {
            let v = f64::from(m) * 10f64.powi(exp);
            if v < lo || v > hi {
                continue;
            }
            if labelled.contains(&m) {
                bold.push(v);
            } else if decades <= 5.0 {
                light.push(v);
            }
        }
    }
    (bold, light)
}

/// Legend rows, as drawn with a 14 px label font, and the approximate
/// height of the plotting area (the image less caption, margins and x labels).
const LEGEND_ROW_PX: f64 = 18.0;
const LEGEND_PAD_PX: f64 = 20.0;
const PLOT_AREA_PX: f64 = 400.0;

/// The y axis range for the (clamped) values: some room below and above the
/// extremes, at least a factor 10 so that the axis has a few labels, and room
/// at the top for the legend above the p50 and p90 points, which are the
/// ones under the legend in the upper left corner.
fn y_range(values: &[[f64; 4]]) -> (f64, f64) {
    let (lo, hi, left) = values.iter().fold(
        (f64::INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY),
        |(lo, hi, left), v| {
            let (min, max) = v
                .iter()
                .fold((lo, hi), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            (min, max, left.max(v[0]).max(v[1]))
        },
    );
    if values.is_empty() {
        return (1.0, 10.0);
    }
    let (mut y_lo, mut y_hi) = (lo / 1.5, hi * 1.5);
    if y_hi / y_lo < 10.0 {
        let widen = (10.0 / (y_hi / y_lo)).sqrt();
        y_lo /= widen;
        y_hi *= widen;
    }
    // The legend takes this share of the plotting area's height, from the
    // top; with many paths it may still overlap the lines.
    let legend = ((values.len() as f64 * LEGEND_ROW_PX + LEGEND_PAD_PX) / PLOT_AREA_PX).min(0.6);
    let left_hi = left * 1.3;
    let needed = y_lo * (left_hi / y_lo).powf(1.0 / (1.0 - legend));
    (y_lo, y_hi.max(needed))
}

/// A series color: the plotters 99% accessibility palette without its light
/// colors (yellow, cyan, lime, pastels), which are hard to see on white.
fn series_color(i: usize) -> RGBColor {
    let dark: Vec<RGBColor> = Palette99::COLORS
        .iter()
        .filter(|(r, g, b)| {
            0.299 * f64::from(*r) + 0.587 * f64::from(*g) + 0.114 * f64::from(*b) < 170.0
        })
        .map(|&(r, g, b)| RGBColor(r, g, b))
        .collect();
    dark[i % dark.len()]
}

/// Draws latency percentile lines (x: percentile p50, p90, p99, p99.9 as
/// categories; y: latency in µs, logarithmic) with one line+points series per
/// path and a legend, titled `title`, into an SVG file at `out`.
pub fn latency_svg(title: &str, paths: &[PathLatency], out: &Path) -> Result<()> {
    let values: Vec<[f64; 4]> = paths.iter().map(PathLatency::values).collect();
    let (y_lo, y_hi) = y_range(&values);
    let (y_bold, y_light) = y_key_points(y_lo, y_hi);

    let root = SVGBackend::new(out, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (0u32..PERCENTILES.len() as u32 - 1).into_segmented(),
            (y_lo..y_hi)
                .log_scale()
                .with_key_points(y_bold)
                .with_light_points(y_light),
        )
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(PERCENTILES.len())
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => PERCENTILES
                .get(*i as usize)
                .map_or_else(String::new, |p| (*p).to_string()),
            SegmentValue::Last => String::new(),
        })
        .x_desc("percentile")
        .y_desc("latency (µs, log scale)")
        .y_label_formatter(&|y| format_us(*y))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;

    for (i, (path, values)) in paths.iter().zip(&values).enumerate() {
        let color = series_color(i);
        let points = values
            .iter()
            .enumerate()
            .map(|(x, &y)| (SegmentValue::CenterOf(x as u32), y));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(4))
            .map_err(|e| anyhow!("{e}"))?
            .label(path.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    if !paths.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }

    root.present()
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("writing {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_three_paths() {
        let paths = [
            PathLatency {
                name: "direct, same node".into(),
                p50_us: 38.0,
                p90_us: 52.5,
                p99_us: 91.0,
                p999_us: 240.0,
            },
            PathLatency {
                name: "agent, across nodes, mTLS L4".into(),
                p50_us: 120.0,
                p90_us: 180.0,
                p99_us: 410.0,
                p999_us: 1900.0,
            },
            PathLatency {
                name: "agent, across nodes, L7".into(),
                p50_us: 0.0,
                p90_us: 260.0,
                p99_us: 700.0,
                p999_us: 4200.0,
            },
        ];
        let out = std::env::temp_dir().join(format!(
            "xtask-latency-{}-{}.svg",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        ));
        let result = latency_svg("latency", &paths, &out);
        let svg = std::fs::read_to_string(&out);
        let _ = std::fs::remove_file(&out);
        result.unwrap();
        let svg = svg.unwrap();
        assert!(
            svg.starts_with("<svg"),
            "{}",
            svg.chars().take(80).collect::<String>()
        );
        for path in &paths {
            assert!(svg.contains(&path.name), "missing {}", path.name);
        }
        assert!(svg.contains("p99.9"));
    }
}
