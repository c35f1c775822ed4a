//! The plots of `hopscotch sweep`'s report, hand-written SVG: accuracy vs K per task (the models
//! fitted on it, K = 0 the original) and answer agreement with the original vs K, a panel per
//! task.

use std::fmt::Write as _;

use super::{variant_label, SweepReport, SweepRow};
use crate::plan::Method;

impl SweepReport {
    /// The plots: `accuracy-<task>.svg` per task (accuracy vs K of the models fitted on it,
    /// K = 0 the original) and `agreement.svg` (answer agreement vs K, a panel per task).
    pub fn svgs(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for t in &self.tasks {
            let series = self.series(&t.name, t.original.accuracy, |r| r.accuracy);
            let body = chart(
                0.0,
                &format!("{}: accuracy vs K (fitted on {})", t.name, t.name),
                &self.skips,
                &series,
            );
            out.push((format!("accuracy-{}.svg", t.name), svg(PANEL_H, &body)));
        }
        let mut body = String::new();
        for (i, t) in self.tasks.iter().enumerate() {
            let series = self.series(&t.name, 1.0, |r| r.paired.agreement);
            body += &chart(
                i as f64 * PANEL_H,
                &format!("{}: answer agreement with the original vs K", t.name),
                &self.skips,
                &series,
            );
        }
        out.push((
            "agreement.svg".to_string(),
            svg(PANEL_H * self.tasks.len().max(1) as f64, &body),
        ));
        out
    }

    /// One line per configuration fitted on `task`, from `(0, at_zero)`.
    fn series(&self, task: &str, at_zero: f64, value: impl Fn(&SweepRow) -> f64) -> Vec<Series> {
        let rows: Vec<&SweepRow> = self
            .rows
            .iter()
            .filter(|r| r.eval_task == task && r.fit_task == task)
            .collect();
        let mut out: Vec<Series> = Vec::new();
        for r in rows {
            let label = variant_label(&r.method, r.objective.as_deref(), r.train_scales);
            match out.iter_mut().find(|s| s.label == label) {
                Some(s) => s.points.push((r.k, value(r))),
                None => out.push(Series {
                    colour: colour(&r.method),
                    dash: dash(r.objective.as_deref(), r.train_scales),
                    label,
                    points: vec![(0, at_zero), (r.k, value(r))],
                }),
            }
        }
        out
    }
}

/// One line of a chart.
struct Series {
    label: String,
    colour: &'static str,
    dash: &'static str,
    points: Vec<(usize, f64)>,
}

fn colour(method: &str) -> &'static str {
    match method {
        m if m == Method::Hopscotch.name() => "#1f77b4",
        m if m == Method::AttnCosine.name() => "#ff7f0e",
        _ => "#7f7f7f",
    }
}

/// Solid for KL, dashed for CE; dotted without scalars.
fn dash(objective: Option<&str>, train_scales: bool) -> &'static str {
    match (objective, train_scales) {
        (Some("ce"), true) => "6 3",
        (Some("ce"), false) => "6 3 2 3",
        (_, false) => "2 3",
        _ => "",
    }
}

/// Height of one chart panel.
const PANEL_H: f64 = 300.0;
/// Width of every plot.
const WIDTH: f64 = 720.0;

fn svg(height: f64, body: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n"
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A line chart of fractions against K at vertical offset `y0`: axes, y ticks in percent, an x
/// tick per K, the lines with a dot per point, and the legend on the right.
fn chart(y0: f64, title: &str, skips: &[usize], series: &[Series]) -> String {
    let (left, right, top, bottom) = (60.0, 460.0, y0 + 40.0, y0 + 250.0);
    let values = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let (mut lo, mut hi) = if lo.is_finite() {
        ((lo - 0.02).max(0.0), (hi + 0.02).min(1.0))
    } else {
        (0.0, 1.0)
    };
    if hi - lo < 0.05 {
        let mid = (hi + lo) / 2.0;
        (lo, hi) = ((mid - 0.025).max(0.0), (mid + 0.025).min(1.0));
    }
    let k_max = skips.last().copied().unwrap_or(1).max(1) as f64;
    let x = |k: usize| left + (right - left) * k as f64 / k_max;
    let y = |v: f64| bottom - (bottom - top) * (v - lo) / (hi - lo).max(1e-9);
    let mut s = format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        (left + right) / 2.0,
        y0 + 22.0,
        escape(title)
    );
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{bottom}\" x2=\"{right}\" y2=\"{bottom}\" stroke=\"black\"/><line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{bottom}\" stroke=\"black\"/>"
    );
    for i in 0..=4 {
        let v = lo + (hi - lo) * i as f64 / 4.0;
        let _ = writeln!(
            s,
            "<line x1=\"{:.1}\" y1=\"{2:.1}\" x2=\"{right}\" y2=\"{2:.1}\" stroke=\"#eee\"/><text x=\"{1:.1}\" y=\"{3:.1}\" text-anchor=\"end\">{4:.1}%</text>",
            left + 1.0,
            left - 6.0,
            y(v),
            y(v) + 4.0,
            v * 100.0
        );
    }
    for k in std::iter::once(0).chain(skips.iter().copied()) {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{k}</text>",
            x(k),
            bottom + 16.0
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">K (attention blocks skipped; 0 = original)</text>",
        (left + right) / 2.0,
        bottom + 34.0
    );
    for (i, ser) in series.iter().enumerate() {
        let pts: Vec<String> = ser
            .points
            .iter()
            .map(|&(k, v)| format!("{:.1},{:.1}", x(k), y(v)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\" stroke-dasharray=\"{}\"/>",
            pts.join(" "),
            ser.colour,
            ser.dash
        );
        for &(k, v) in &ser.points {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"/>",
                x(k),
                y(v),
                ser.colour
            );
        }
        let ly = top + 16.0 * i as f64;
        let _ = writeln!(
            s,
            "<line x1=\"480\" y1=\"{ly:.1}\" x2=\"508\" y2=\"{ly:.1}\" stroke=\"{}\" stroke-width=\"2\" stroke-dasharray=\"{}\"/><text x=\"514\" y=\"{:.1}\">{}</text>",
            ser.colour,
            ser.dash,
            ly + 4.0,
            escape(&ser.label)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_escape_labels_and_draw_one_line_per_series() {
        let series = vec![
            Series {
                label: "a <b>".into(),
                colour: "red",
                dash: "",
                points: vec![(0, 0.5), (1, 0.4), (2, 0.3)],
            },
            Series {
                label: "c".into(),
                colour: "blue",
                dash: "6 3",
                points: vec![(0, 0.5), (2, 0.45)],
            },
        ];
        let s = svg(PANEL_H, &chart(0.0, "t & u", &[1, 2], &series));
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("a &lt;b&gt;") && s.contains("t &amp; u"));
        assert!(!s.contains("NaN"));
        // one point only: the range is widened, never divided by zero
        let flat = chart(0.0, "flat", &[1], &series[..1]);
        assert!(!flat.contains("NaN") && !flat.contains("inf"));
    }
}
