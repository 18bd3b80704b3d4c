//! The analysis report: everything `qmix analyze` measured, as JSON (ordered lists, metric name
//! and direction, settings), as a plain-text top-N table for the terminal, and as one
//! self-contained HTML page (inline SVG charts drawn with `plotters`, no script, no network):
//! whole-model checks, per-layer sensitivity, per-layer MSE, quantizer ranges, histograms of the
//! most sensitive layers, the placement table.

use std::fmt::Write as _;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use serde_json::{Value, json};

use crate::analysis::{LayerMse, RangeEntry, TensorHistogram};
use crate::sensitivity::{LayerScore, ModelChecks};

/// Everything one analysis produced.
#[derive(Debug, Clone)]
pub struct AnalysisReport {
    /// Model name or path.
    pub model: String,
    /// Settings (config, scheme, precisions, samples, threads…), as given.
    pub settings: Value,
    /// Sensitivity metric's name.
    pub metric: String,
    /// Whether a higher sensitivity score means a layer hurts less.
    pub higher_is_better: bool,
    /// Whole-model checks.
    pub checks: ModelChecks,
    /// Extra named results (e.g. FP32 and simulated top-1).
    pub evaluations: Vec<(String, f64)>,
    /// Op type per layer name.
    pub layer_ops: Vec<(String, String)>,
    /// Enable-one scores, topological order.
    pub enable_one: Vec<LayerScore>,
    /// Disable-one scores, topological order, if computed.
    pub disable_one: Option<Vec<LayerScore>>,
    /// Per-layer output MSE.
    pub mse: Vec<LayerMse>,
    /// Quantizer ranges.
    pub ranges: Vec<RangeEntry>,
    /// Histograms of the most sensitive layers.
    pub histograms: Vec<TensorHistogram>,
    /// The placement table (`Placement::report`).
    pub placement: Value,
    /// Seconds per step.
    pub seconds: Vec<(String, f64)>,
}

/// Most sensitive first (ties in topological order).
fn ranked(scores: &[LayerScore]) -> Vec<&LayerScore> {
    let mut r: Vec<&LayerScore> = scores.iter().collect();
    r.sort_by(|a, b| b.sensitivity().total_cmp(&a.sensitivity()));
    r
}

/// `name` cut to at most `max` characters, keeping its start and its end.
fn short(name: &str, max: usize) -> String {
    let chars: Vec<char> = name.chars().collect();
    if chars.len() <= max {
        return name.to_string();
    }
    let half = (max - 1) / 2;
    let head: String = chars[..half].iter().collect();
    let tail: String = chars[chars.len() - (max - 1 - half)..].iter().collect();
    format!("{head}…{tail}")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

impl AnalysisReport {
    fn op_of(&self, layer: &str) -> &str {
        self.layer_ops.iter().find(|(l, _)| l == layer).map_or("", |(_, o)| o.as_str())
    }

    /// A score as text: fixed point, or scientific for error-like metrics and tiny values; a
    /// score that stands for non-finite simulated outputs says so.
    pub fn format_score(&self, v: f64) -> String {
        let text = if !self.higher_is_better || (v != 0.0 && v.abs() < 0.01) {
            format!("{v:.3e}")
        } else {
            format!("{v:.3}")
        };
        if self.is_non_finite(v) { format!("{text} (non-finite outputs)") } else { text }
    }

    /// Whether a score means the simulation produced NaN or infinity: a non-finite score, or
    /// AIMET's PSNR floor of −100 dB, which it gives exactly then.
    pub fn is_non_finite(&self, score: f64) -> bool {
        !score.is_finite() || (self.metric.contains("psnr") && score <= -100.0)
    }

    /// The layers whose enable-one run produced non-finite outputs.
    pub fn non_finite_layers(&self) -> Vec<&str> {
        self.enable_one.iter().filter(|l| self.is_non_finite(l.score)).map(|l| l.layer.as_str()).collect()
    }

    fn mse_of(&self, layer: &str) -> Option<f64> {
        self.mse.iter().find(|m| m.layer == layer).map(|m| m.mse)
    }

    /// AIMET's `layer_sensitivity.json`: `{layer: score}` of enable-one, in layer order.
    pub fn layer_sensitivity_json(&self) -> String {
        let entries: Vec<String> = self
            .enable_one
            .iter()
            .map(|s| format!("    {}: {}", Value::String(s.layer.clone()), serde_json::json!(s.score)))
            .collect();
        format!("{{\n{}\n}}\n", entries.join(",\n"))
    }

    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        let scores = |s: &[LayerScore]| s.iter().map(|l| json!([l.layer, l.score])).collect::<Vec<_>>();
        json!({
            "model": self.model,
            "settings": self.settings,
            "metric": {"name": self.metric, "higher_is_better": self.higher_is_better},
            "checks": {"all": self.checks.all, "weights_only": self.checks.weights_only, "activations_only": self.checks.activations_only},
            "evaluations": self.evaluations.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
            "enable_one": {"scores": scores(&self.enable_one), "ranked": ranked(&self.enable_one).iter().map(|l| json!([l.layer, l.score])).collect::<Vec<_>>(), "non_finite": self.non_finite_layers()},
            "disable_one": self.disable_one.as_ref().map(|d| json!({"scores": scores(d)})),
            "per_layer_mse": self.mse.iter().map(|m| json!({"layer": m.layer, "op": m.op, "mse": m.mse})).collect::<Vec<_>>(),
            "ranges": self.ranges.iter().map(|r| json!({
                "tensor": r.tensor, "kind": r.kind, "precision": r.precision, "channels": r.channels,
                "encoding_min": r.encoding_min, "encoding_max": r.encoding_max, "delta": r.delta,
                "observed_min": r.observed.map(|o| o.0), "observed_max": r.observed.map(|o| o.1),
            })).collect::<Vec<_>>(),
            "histograms": self.histograms.iter().map(|h| json!({
                "tensor": h.tensor, "layer": h.layer, "kind": h.kind, "lo": h.lo, "hi": h.hi, "counts": h.counts,
                "encoding": h.encoding.map(|(a, b)| json!([a, b])),
            })).collect::<Vec<_>>(),
            "placement": self.placement,
            "seconds": self.seconds.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
        })
    }

    /// The `n` most sensitive layers as a plain-text table.
    pub fn top_table(&self, n: usize) -> String {
        let width = self.metric.len().max(9);
        let mut out =
            format!("{:>4}  {:>width$}  {:>11}  {:<18} layer\n", "rank", &self.metric, "output MSE", "op");
        for (k, l) in ranked(&self.enable_one).into_iter().take(n).enumerate() {
            let mse = self.mse_of(&l.layer).map_or("-".into(), |m| format!("{m:.3e}"));
            let _ = writeln!(
                out,
                "{:>4}  {:>width$}  {:>11}  {:<18} {}",
                k + 1,
                self.format_score(l.score),
                mse,
                self.op_of(&l.layer),
                short(&l.layer, 90)
            );
        }
        out
    }

    /// The report as one self-contained HTML page.
    pub fn to_html(&self) -> String {
        let mut h = String::new();
        let _ = write!(
            h,
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Quantization analysis — {}</title><style>\
             body{{font-family:sans-serif;margin:24px;max-width:1200px;color:#222}}\
             table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;overflow-wrap:anywhere}}\
             th{{background:#f0f0f0}}td.n{{text-align:right;font-variant-numeric:tabular-nums}}\
             .grid{{display:flex;flex-wrap:wrap;gap:8px}}h2{{margin-top:32px;border-bottom:1px solid #ddd}}\
             .note{{color:#555;font-size:13px}}</style></head><body>",
            esc(&self.model)
        );
        let _ = write!(h, "<h1>Quantization analysis</h1><p><b>{}</b></p>", esc(&self.model));
        let _ = write!(h, "<p class=\"note\">settings: <code>{}</code></p>", esc(&self.settings.to_string()));
        // Whole-model checks.
        let _ = write!(
            h,
            "<h2>Whole model</h2><table><tr><th>quantizers on</th><th>{}</th></tr>\
             <tr><td>all</td><td class=n>{}</td></tr><tr><td>weights only</td><td class=n>{}</td></tr>\
             <tr><td>activations only</td><td class=n>{}</td></tr>",
            &self.metric,
            self.format_score(self.checks.all),
            self.format_score(self.checks.weights_only),
            self.format_score(self.checks.activations_only)
        );
        for (k, v) in &self.evaluations {
            let _ = write!(h, "<tr><td>{}</td><td class=n>{v:.4}</td></tr>", esc(k));
        }
        h.push_str("</table>");
        let weights_worse = if self.higher_is_better {
            self.checks.weights_only < self.checks.activations_only
        } else {
            self.checks.weights_only > self.checks.activations_only
        };
        let worse = if weights_worse { "weights" } else { "activations" };
        let _ = write!(
            h,
            "<p class=\"note\">Most of the damage comes from the {worse} ({} {} is worse).</p>",
            if self.higher_is_better { "lower" } else { "higher" },
            &self.metric
        );
        // Sensitivity.
        h.push_str("<h2>Per-layer sensitivity</h2>");
        let _ = write!(
            h,
            "<p class=\"note\">Enable one: {} with only that layer's quantizers on, layers in topological order; the ten most sensitive in red.{}</p>",
            &self.metric,
            if self.disable_one.is_some() {
                " Disable one (everything on but that layer) as the orange line."
            } else {
                ""
            }
        );
        h.push_str(
            &self
                .sensitivity_svg()
                .unwrap_or_else(|e| format!("<p>chart failed: {}</p>", esc(&e.to_string()))),
        );
        let broken = self.non_finite_layers();
        if !broken.is_empty() {
            let names: Vec<String> = broken.iter().map(|l| esc(&short(l, 80))).collect();
            let _ = write!(
                h,
                "<p class=\"note\"><b>Non-finite outputs</b> when quantized alone (black bars): {}. \
                 Usually a quantizer there rounds to zero a value that a division, reciprocal \
                 square root or log downstream needs non-zero; disable it or give it more bits.</p>",
                names.join(", ")
            );
        }
        h.push_str("<table><tr><th>rank</th><th>score</th><th>output MSE</th><th>op</th><th>layer</th></tr>");
        for (k, l) in ranked(&self.enable_one).into_iter().take(15).enumerate() {
            let mse = self.mse_of(&l.layer).map_or("-".into(), |m| format!("{m:.3e}"));
            let _ = write!(
                h,
                "<tr><td class=n>{}</td><td class=n>{}</td><td class=n>{mse}</td><td>{}</td><td title=\"{}\">{}</td></tr>",
                k + 1,
                self.format_score(l.score),
                esc(self.op_of(&l.layer)),
                esc(&l.layer),
                esc(&short(&l.layer, 110))
            );
        }
        h.push_str("</table>");
        // MSE.
        h.push_str("<h2>Per-layer output MSE</h2><p class=\"note\">Every quantizer on; each layer's first output against FP32 (log scale).</p>");
        h.push_str(
            &self.mse_svg().unwrap_or_else(|e| format!("<p>chart failed: {}</p>", esc(&e.to_string()))),
        );
        // Ranges.
        h.push_str("<h2>Quantizer ranges</h2><p class=\"note\">Activation encodings [min, max] (blue) with the extremes calibration observed (black ticks).</p>");
        h.push_str(
            &self.ranges_svg().unwrap_or_else(|e| format!("<p>chart failed: {}</p>", esc(&e.to_string()))),
        );
        // Histograms.
        h.push_str("<h2>Histograms of the most sensitive layers</h2><p class=\"note\">FP32 values; red lines: encoding bounds.</p><div class=\"grid\">");
        for hist in &self.histograms {
            h.push_str(
                &histogram_svg(hist)
                    .unwrap_or_else(|e| format!("<p>chart failed: {}</p>", esc(&e.to_string()))),
            );
        }
        h.push_str("</div>");
        // Placement.
        h.push_str("<h2>Quantizer placement</h2><table><tr><th>tensor</th><th>producer</th><th>kind</th><th>enabled</th><th>precision</th><th>symmetric</th><th>granularity</th></tr>");
        for q in self.placement["quantizers"].as_array().into_iter().flatten() {
            let _ = write!(
                h,
                "<tr><td title=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(q["tensor"].as_str().unwrap_or("")),
                esc(&short(q["tensor"].as_str().unwrap_or(""), 80)),
                esc(q["producer"].as_str().unwrap_or("")),
                esc(q["kind"].as_str().unwrap_or("")),
                q["enabled"],
                esc(q["precision"].as_str().unwrap_or("")),
                q["symmetric"],
                esc(&q["granularity"].to_string())
            );
        }
        h.push_str("</table>");
        let times: Vec<String> = self.seconds.iter().map(|(k, v)| format!("{k} {v:.1} s")).collect();
        let _ = writeln!(h, "<p class=\"note\">{}</p></body></html>", esc(&times.join(", ")));
        h
    }

    fn sensitivity_svg(&self) -> DrawResult<String> {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (1150, 420)).into_drawing_area();
            root.fill(&WHITE)?;
            let all = self
                .enable_one
                .iter()
                .map(|l| l.score)
                .chain(self.disable_one.iter().flatten().map(|l| l.score));
            let (lo, hi) = finite_range(all);
            let mut chart = indexed_chart(
                &root,
                self.enable_one.len(),
                padded(lo.min(0.0), hi),
                "layer (topological order)",
                &self.metric,
                &|y| {
                    if hi.abs().max(lo.abs()) < 1.0 {
                        format!("{y:.1e}")
                    } else if hi - lo < 10.0 {
                        format!("{y:.2}")
                    } else {
                        format!("{y:.0}")
                    }
                },
            )?;
            let worst: Vec<&str> =
                ranked(&self.enable_one).iter().take(10).map(|l| l.layer.as_str()).collect();
            // Bars grow from the harmless end of the axis towards each score, so the most
            // sensitive layer has the longest bar; non-finite results span the whole axis in
            // black and are labelled.
            let axis = padded(lo.min(0.0), hi);
            let (base, far) =
                if self.higher_is_better { (axis.end, axis.start) } else { (axis.start, axis.end) };
            chart.draw_series(self.enable_one.iter().enumerate().map(|(i, l)| {
                let (end, color) = if self.is_non_finite(l.score) {
                    (far, BLACK.mix(0.85))
                } else if worst.contains(&l.layer.as_str()) {
                    (l.score, RED.mix(0.8))
                } else {
                    (l.score, BLUE.mix(0.6))
                };
                Rectangle::new([(i as f64 - 0.4, base), (i as f64 + 0.4, end)], color.filled())
            }))?;
            let label = ("sans-serif", 12).into_font().color(&BLACK);
            chart.draw_series(
                self.enable_one
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| self.is_non_finite(l.score))
                    .map(|(i, _)| Text::new("non-finite", (i as f64 + 0.5, far), label.clone())),
            )?;
            if let Some(d) = &self.disable_one {
                chart.draw_series(LineSeries::new(
                    d.iter()
                        .enumerate()
                        .filter(|(_, l)| l.score.is_finite())
                        .map(|(i, l)| (i as f64, l.score)),
                    RGBColor(230, 120, 0).stroke_width(2),
                ))?;
            }
            root.present()?;
        }
        Ok(svg)
    }

    fn mse_svg(&self) -> DrawResult<String> {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (1150, 360)).into_drawing_area();
            root.fill(&WHITE)?;
            let logs: Vec<f64> = self.mse.iter().map(|m| m.mse.max(1e-30).log10()).collect();
            let (lo, hi) = finite_range(logs.iter().copied());
            let mut chart =
                indexed_chart(&root, logs.len(), padded(lo, hi), "layer (topological order)", "MSE", &|y| {
                    format!("{:.1e}", 10f64.powf(*y))
                })?;
            let base = padded(lo, hi).start;
            chart.draw_series(logs.iter().enumerate().map(|(i, &y)| {
                Rectangle::new([(i as f64 - 0.4, base), (i as f64 + 0.4, y)], GREEN.mix(0.6).filled())
            }))?;
            root.present()?;
        }
        Ok(svg)
    }

    fn ranges_svg(&self) -> DrawResult<String> {
        let acts: Vec<&RangeEntry> = self.ranges.iter().filter(|r| r.kind != "param").collect();
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (1150, 380)).into_drawing_area();
            root.fill(&WHITE)?;
            let (lo, hi) = finite_range(acts.iter().flat_map(|r| [r.encoding_min, r.encoding_max]));
            let mut chart = indexed_chart(
                &root,
                acts.len(),
                padded(lo, hi),
                "activation quantizer (tensor order)",
                "range",
                &|y| format!("{y:.1}"),
            )?;
            chart.draw_series(acts.iter().enumerate().map(|(i, r)| {
                Rectangle::new(
                    [(i as f64 - 0.3, r.encoding_min), (i as f64 + 0.3, r.encoding_max)],
                    BLUE.mix(0.5).filled(),
                )
            }))?;
            chart.draw_series(
                acts.iter().enumerate().filter_map(|(i, r)| r.observed.map(|o| (i, o))).flat_map(
                    |(i, (a, b))| {
                        [a, b].map(|y| {
                            PathElement::new(
                                vec![(i as f64 - 0.4, y), (i as f64 + 0.4, y)],
                                BLACK.stroke_width(1),
                            )
                        })
                    },
                ),
            )?;
            root.present()?;
        }
        Ok(svg)
    }
}

type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;

/// A chart with one slot per item along x (`n` items) and `y` up, its mesh drawn.
fn indexed_chart<'a, DB: DrawingBackend + 'a>(
    root: &'a DrawingArea<DB, plotters::coord::Shift>,
    n: usize,
    y: std::ops::Range<f64>,
    x_desc: &str,
    y_desc: &str,
    y_format: &dyn Fn(&f64) -> String,
) -> DrawResult<ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>>
where
    DB::ErrorType: 'static,
{
    let mut chart = ChartBuilder::on(root)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..n.max(1) as f64 - 0.5, y)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(y_desc)
        .y_label_formatter(y_format)
        .draw()?;
    Ok(chart)
}

fn finite_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
    if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) }
}

fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let pad = ((hi - lo) * 0.05).max(1e-9);
    (lo - pad)..(hi + pad)
}

fn histogram_svg(h: &TensorHistogram) -> DrawResult<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (560, 260)).into_drawing_area();
        root.fill(&WHITE)?;
        let top = h.counts.iter().copied().max().unwrap_or(1).max(1) as f64;
        let title = format!("{} {}", h.kind, short(&h.tensor, 70));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 13))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(50)
            .build_cartesian_2d(h.lo..h.hi, 0f64..top * 1.05)?;
        chart.configure_mesh().disable_mesh().draw()?;
        let w = (h.hi - h.lo) / h.counts.len().max(1) as f64;
        chart.draw_series(h.counts.iter().enumerate().map(|(i, &c)| {
            let x = h.lo + i as f64 * w;
            Rectangle::new([(x, 0.0), (x + w, c as f64)], BLUE.mix(0.6).filled())
        }))?;
        if let Some((a, b)) = h.encoding {
            for x in [a, b] {
                chart.draw_series(std::iter::once(PathElement::new(
                    vec![(x, 0.0), (x, top * 1.05)],
                    RED.stroke_width(2),
                )))?;
            }
        }
        root.present()?;
    }
    Ok(svg)
}
