//! Line charts as hand-written SVG: categorical x axis, linear or logarithmic y axis, one line
//! per series through the medians, with min–max error bars. No plotting crate: the figures are
//! few and the format is plain text that diffs well.

use crate::measure::Summary;
use std::fmt::Write as _;

/// How the y axis maps values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// From zero, evenly spaced ticks.
    Linear,
    /// Powers of ten (values must be positive).
    Log,
}

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Its legend text.
    pub name: String,
    /// Its colour (any SVG colour).
    pub color: &'static str,
    /// Drawn dashed (a baseline), or solid.
    pub dashed: bool,
    /// One point per category; `None` where it was not measured.
    pub points: Vec<Option<Summary>>,
}

/// One panel: axes and series.
#[derive(Debug, Clone)]
pub struct Chart {
    /// The panel's title.
    pub title: String,
    /// The x axis's label.
    pub x_label: String,
    /// The y axis's label.
    pub y_label: String,
    /// The x axis's categories, left to right.
    pub categories: Vec<String>,
    /// The y axis's scale.
    pub scale: Scale,
    /// Formats a y value for tick labels and tooltips.
    pub format_y: fn(f64) -> String,
    /// The lines.
    pub series: Vec<Series>,
}

const PANEL_W: f64 = 470.0;
const PANEL_H: f64 = 330.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 52.0;
const LEGEND_ROW: f64 = 18.0;
const HEADER: f64 = 30.0;

/// Renders `panels` side by side under `title`, as a standalone SVG document.
pub fn render(title: &str, panels: &[Chart]) -> String {
    let legend_rows = panels.iter().map(|p| p.series.len()).max().unwrap_or(0);
    let width = PANEL_W * panels.len().max(1) as f64;
    let height = HEADER + PANEL_H + 10.0 + LEGEND_ROW * legend_rows as f64 + 10.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{:.1}" y="20" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    for (i, panel) in panels.iter().enumerate() {
        draw_panel(&mut svg, panel, PANEL_W * i as f64, HEADER);
    }
    svg.push_str("</svg>\n");
    svg
}

fn draw_panel(svg: &mut String, chart: &Chart, x0: f64, y0: f64) {
    let (px, py) = (x0 + LEFT, y0 + TOP);
    let (pw, ph) = (PANEL_W - LEFT - RIGHT, PANEL_H - TOP - BOTTOM);
    let values: Vec<f64> = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().flatten())
        .flat_map(|p| [p.min, p.max, p.median])
        .filter(|v| v.is_finite() && (chart.scale == Scale::Linear || *v > 0.0))
        .collect();
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13" font-weight="bold">{}</text>"#,
        px + pw / 2.0,
        y0 + 18.0,
        escape(&chart.title)
    );
    let axis = YAxis::fit(chart.scale, &values);
    // Grid and y ticks.
    for tick in axis.ticks() {
        let y = py + ph - axis.frac(tick) * ph;
        let _ = writeln!(
            svg,
            r##"<line x1="{px:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            px + pw,
            px - 6.0,
            y + 4.0,
            escape(&(chart.format_y)(tick))
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{px:.1}" y="{py:.1}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="#444"/>"##
    );
    // X categories.
    let n = chart.categories.len().max(1) as f64;
    let cx = |i: usize| px + (i as f64 + 0.5) * pw / n;
    for (i, c) in chart.categories.iter().enumerate() {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            cx(i),
            py + ph + 16.0,
            escape(c)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        px + pw / 2.0,
        py + ph + 36.0,
        escape(&chart.x_label)
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        x0 + 14.0,
        py + ph / 2.0,
        escape(&chart.y_label)
    );
    // Series: error bars, line through medians, markers; nudged apart so bars do not overlap.
    let count = chart.series.len();
    for (si, s) in chart.series.iter().enumerate() {
        let nudge = (si as f64 - (count as f64 - 1.0) / 2.0) * 4.0;
        let dash = if s.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let y_of = |v: f64| py + ph - axis.frac(v) * ph;
        let mut path = String::new();
        let mut pen_down = false;
        for (i, p) in s.points.iter().enumerate() {
            match p.filter(|p| axis.shows(p.median)) {
                Some(p) => {
                    let x = cx(i) + nudge;
                    let _ = write!(
                        path,
                        "{}{x:.1},{:.1} ",
                        if pen_down { "L" } else { "M" },
                        y_of(p.median)
                    );
                    pen_down = true;
                    if axis.shows(p.min) && axis.shows(p.max) {
                        let _ = writeln!(
                            svg,
                            r#"<path d="M{x:.1},{:.1}V{:.1}M{:.1},{:.1}h8M{:.1},{:.1}h8" stroke="{}" stroke-width="1.2"/>"#,
                            y_of(p.min),
                            y_of(p.max),
                            x - 4.0,
                            y_of(p.min),
                            x - 4.0,
                            y_of(p.max),
                            s.color
                        );
                    }
                    let _ = writeln!(
                        svg,
                        r#"<circle cx="{x:.1}" cy="{:.1}" r="3.5" fill="{}"><title>{}: {} ({}–{})</title></circle>"#,
                        y_of(p.median),
                        s.color,
                        escape(&s.name),
                        escape(&(chart.format_y)(p.median)),
                        escape(&(chart.format_y)(p.min)),
                        escape(&(chart.format_y)(p.max))
                    );
                }
                None => pen_down = false,
            }
        }
        let _ = writeln!(
            svg,
            r#"<path d="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
            path.trim_end(),
            s.color
        );
        // Legend entry.
        let ly = y0 + PANEL_H + 10.0 + LEGEND_ROW * si as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            px,
            px + 28.0,
            s.color,
            px + 34.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
}

/// The y axis's range and mapping.
struct YAxis {
    scale: Scale,
    lo: f64,
    hi: f64,
}

impl YAxis {
    fn fit(scale: Scale, values: &[f64]) -> YAxis {
        let max = values.iter().copied().fold(f64::NAN, f64::max);
        let min = values.iter().copied().fold(f64::NAN, f64::min);
        match scale {
            Scale::Linear => {
                let top = if max.is_finite() && max > 0.0 {
                    max * 1.08
                } else {
                    1.0
                };
                let step = nice_step(top / 5.0);
                YAxis {
                    scale,
                    lo: 0.0,
                    hi: (top / step).ceil() * step,
                }
            }
            Scale::Log => {
                let (lo, hi) = if min.is_finite() && max.is_finite() {
                    (
                        10f64.powf(min.log10().floor()),
                        10f64.powf(max.log10().ceil().max(min.log10().floor() + 1.0)),
                    )
                } else {
                    (1.0, 10.0)
                };
                YAxis { scale, lo, hi }
            }
        }
    }

    fn frac(&self, v: f64) -> f64 {
        match self.scale {
            Scale::Linear => (v - self.lo) / (self.hi - self.lo),
            Scale::Log => (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10()),
        }
    }

    fn shows(&self, v: f64) -> bool {
        v.is_finite() && (self.scale == Scale::Linear || v > 0.0)
    }

    fn ticks(&self) -> Vec<f64> {
        match self.scale {
            Scale::Linear => {
                let step = nice_step(self.hi / 5.0);
                let n = (self.hi / step).round() as usize;
                (0..=n).map(|i| self.lo + step * i as f64).collect()
            }
            Scale::Log => {
                let (a, b) = (
                    self.lo.log10().round() as i32,
                    self.hi.log10().round() as i32,
                );
                (a..=b).map(|e| 10f64.powi(e)).collect()
            }
        }
    }
}

/// The 1, 2 or 5 times a power of ten at or above `x`.
fn nice_step(x: f64) -> f64 {
    if !(x.is_finite() && x > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|s| *s >= x)
        .unwrap_or(10.0 * p)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(scale: Scale) -> Chart {
        Chart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            categories: vec!["a".into(), "b".into()],
            scale,
            format_y: |v| format!("{v}"),
            series: vec![Series {
                name: "s <1>".into(),
                color: "red",
                dashed: true,
                points: vec![Some(Summary::of(&[1.0, 2.0, 3.0])), None],
            }],
        }
    }

    #[test]
    fn a_chart_is_one_escaped_svg_document() {
        let svg = render("a & b", &[chart(Scale::Linear), chart(Scale::Log)]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &amp; b") && svg.contains("s &lt;1&gt;"));
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn nice_steps_are_one_two_or_five_times_a_power_of_ten() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(1.3), 2.0);
        assert_eq!(nice_step(3000.0), 5000.0);
    }
}
