//! A small SVG writer for the two kinds of plot the reproduction draws:
//! lines with markers (accuracy against time) and grouped bars with error
//! bars (the ablations). No dependencies; the output is plain SVG 1.1 that
//! browsers and converters (rsvg, Inkscape) read.

use std::fmt::Write;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;

/// Colours that stay distinct for colour-blind readers (Okabe and Ito).
const PALETTE: [&str; 7] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
];

fn colour(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// Escapes text for SVG character data and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Tick positions for the range `[lo, hi]`: about five, at 1, 2 or 5 times
/// a power of ten, and the range widened to whole ticks.
pub fn nice_ticks(lo: f64, hi: f64) -> (f64, f64, Vec<f64>) {
    let (lo, hi) = if !(lo.is_finite() && hi.is_finite()) {
        (0.0, 1.0)
    } else if hi - lo < 1e-12 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    };
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let start = (lo / step).floor() * step;
    let end = (hi / step).ceil() * step;
    let n = ((end - start) / step).round() as usize;
    let ticks = (0..=n).map(|i| start + i as f64 * step).collect();
    (start, end, ticks)
}

fn fmt_tick(v: f64) -> String {
    let r = (v * 1000.0).round() / 1000.0;
    if r == r.trunc() {
        format!("{}", r as i64)
    } else {
        format!("{r}")
    }
}

/// The parts every plot shares: the header, title, axes, grid and labels.
struct Frame {
    svg: String,
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Frame {
    fn new(
        title: &str,
        x_label: &str,
        y_label: &str,
        (y0, y1, yticks): (f64, f64, Vec<f64>),
    ) -> Self {
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">
<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
            (LEFT + WIDTH - RIGHT) / 2.0,
            escape(title)
        );
        let mut f = Frame {
            svg,
            x0: 0.0,
            x1: 1.0,
            y0,
            y1,
        };
        for t in yticks {
            let y = f.py(t);
            let _ = writeln!(
                f.svg,
                r##"<line x1="{LEFT}" y1="{y:.2}" x2="{:.2}" y2="{y:.2}" stroke="#dddddd"/>
<text x="{:.2}" y="{:.2}" text-anchor="end">{}</text>"##,
                WIDTH - RIGHT,
                LEFT - 6.0,
                y + 4.0,
                fmt_tick(t)
            );
        }
        let _ = writeln!(
            f.svg,
            r#"<text x="{:.2}" y="{:.2}" text-anchor="middle">{}</text>
<text x="16" y="{:.2}" text-anchor="middle" transform="rotate(-90 16 {:.2})">{}</text>"#,
            (LEFT + WIDTH - RIGHT) / 2.0,
            HEIGHT - 14.0,
            escape(x_label),
            (TOP + HEIGHT - BOTTOM) / 2.0,
            (TOP + HEIGHT - BOTTOM) / 2.0,
            escape(y_label)
        );
        f
    }

    fn px(&self, x: f64) -> f64 {
        LEFT + (x - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)
    }

    fn py(&self, y: f64) -> f64 {
        HEIGHT - BOTTOM - (y - self.y0) / (self.y1 - self.y0) * (HEIGHT - TOP - BOTTOM)
    }

    fn axes(&mut self) {
        let _ = writeln!(
            self.svg,
            r#"<line x1="{LEFT}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/>
<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{b}" stroke="black"/>"#,
            b = HEIGHT - BOTTOM,
            r = WIDTH - RIGHT
        );
    }

    /// One legend entry per name, in the colour of the same position in
    /// `colours` (the palette's `i`-th colour where `colours` is shorter).
    fn legend(&mut self, names: &[String], colours: &[usize]) {
        for (i, name) in names.iter().enumerate() {
            let y = TOP + 10.0 + i as f64 * 20.0;
            let x = WIDTH - RIGHT + 14.0;
            let _ = writeln!(
                self.svg,
                r#"<rect x="{x}" y="{:.2}" width="14" height="10" fill="{}"/>
<text x="{:.2}" y="{:.2}">{}</text>"#,
                y - 9.0,
                colour(colours.get(i).copied().unwrap_or(i)),
                x + 20.0,
                y,
                escape(name)
            );
        }
    }

    fn finish(mut self) -> String {
        self.svg.push_str("</svg>\n");
        self.svg
    }
}

/// One line of a [`LinePlot`].
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// The palette colour; by default the series' position in the plot.
    pub colour: Option<usize>,
    /// A dashed line without point markers (a reference value, not data).
    pub dashed: bool,
}

/// Lines through points, each point marked with a circle.
#[derive(Debug, Clone, Default)]
pub struct LinePlot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Whole-number x values (epochs): the axis spans at least 0..5, so
    /// its ticks fall on whole numbers.
    pub integer_x: bool,
}

impl LinePlot {
    /// The plot as an SVG document; one `<circle>` per point.
    pub fn to_svg(&self) -> String {
        let pts = || {
            self.series
                .iter()
                .flat_map(|s| s.points.iter())
                .filter(|(x, y)| x.is_finite() && y.is_finite())
        };
        let (mut xlo, mut xhi, mut ylo, mut yhi) = (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        );
        for &(x, y) in pts() {
            xlo = xlo.min(x);
            xhi = xhi.max(x);
            ylo = ylo.min(y);
            yhi = yhi.max(y);
        }
        // Time axes start at zero.
        let xhi = if self.integer_x { xhi.max(5.0) } else { xhi };
        let (x0, x1, xticks) = nice_ticks(xlo.min(0.0), xhi);
        let mut f = Frame::new(
            &self.title,
            &self.x_label,
            &self.y_label,
            nice_ticks(ylo, yhi),
        );
        f.x0 = x0;
        f.x1 = x1;
        for t in xticks {
            let x = f.px(t);
            let _ = writeln!(
                f.svg,
                r##"<line x1="{x:.2}" y1="{TOP}" x2="{x:.2}" y2="{:.2}" stroke="#eeeeee"/>
<text x="{x:.2}" y="{:.2}" text-anchor="middle">{}</text>"##,
                HEIGHT - BOTTOM,
                HEIGHT - BOTTOM + 16.0,
                fmt_tick(t)
            );
        }
        f.axes();
        let colours: Vec<usize> = (0..self.series.len())
            .map(|i| self.series[i].colour.unwrap_or(i))
            .collect();
        for (s, &c) in self.series.iter().zip(&colours) {
            let finite: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            if finite.len() > 1 {
                let path: Vec<String> = finite
                    .iter()
                    .map(|&(x, y)| format!("{:.2},{:.2}", f.px(x), f.py(y)))
                    .collect();
                let _ = writeln!(
                    f.svg,
                    r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{}/>"#,
                    path.join(" "),
                    colour(c),
                    if s.dashed {
                        r#" stroke-dasharray="6 4""#
                    } else {
                        ""
                    }
                );
            }
            if s.dashed {
                continue;
            }
            for &(x, y) in &finite {
                let _ = writeln!(
                    f.svg,
                    r#"<circle cx="{:.2}" cy="{:.2}" r="3.5" fill="{}"><title>{}: ({}, {})</title></circle>"#,
                    f.px(x),
                    f.py(y),
                    colour(c),
                    escape(&s.name),
                    fmt_tick(x),
                    fmt_tick(y)
                );
            }
        }
        f.legend(
            &self
                .series
                .iter()
                .map(|s| s.name.clone())
                .collect::<Vec<_>>(),
            &colours,
        );
        f.finish()
    }
}

/// One group of bars: a value (mean, error) per series, or none.
#[derive(Debug, Clone)]
pub struct BarGroup {
    pub label: String,
    pub bars: Vec<Option<(f64, f64)>>,
}

/// Grouped bars with error bars (mean ± error).
#[derive(Debug, Clone)]
pub struct BarPlot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<String>,
    pub groups: Vec<BarGroup>,
}

impl BarPlot {
    /// The plot as an SVG document; one `<rect class="bar">` per value.
    ///
    /// The value axis spans the values (with their errors), not zero to the
    /// largest, since ablations differ by tenths of a percent; its ticks are
    /// labelled.
    pub fn to_svg(&self) -> String {
        let vals = self
            .groups
            .iter()
            .flat_map(|g| g.bars.iter().flatten())
            .filter(|(m, _)| m.is_finite());
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for &(m, e) in vals {
            let e = if e.is_finite() { e } else { 0.0 };
            lo = lo.min(m - e);
            hi = hi.max(m + e);
        }
        let pad = if hi > lo { (hi - lo) * 0.3 } else { 1.0 };
        // Padding never takes the axis below zero when no value is negative
        // (an accuracy axis at -50 says nothing).
        let bottom = if lo >= 0.0 {
            (lo - pad).max(0.0)
        } else {
            lo - pad
        };
        let mut f = Frame::new(
            &self.title,
            &self.x_label,
            &self.y_label,
            nice_ticks(bottom, hi + pad * 0.2),
        );
        f.axes();
        let groups = self.groups.len().max(1) as f64;
        let slot = (WIDTH - LEFT - RIGHT) / groups;
        let nbars = self.series.len().max(1) as f64;
        let bar_w = slot * 0.8 / nbars;
        let base = HEIGHT - BOTTOM;
        for (gi, g) in self.groups.iter().enumerate() {
            let gx = LEFT + gi as f64 * slot + slot * 0.1;
            let _ = writeln!(
                f.svg,
                r#"<text x="{:.2}" y="{:.2}" text-anchor="middle">{}</text>"#,
                LEFT + (gi as f64 + 0.5) * slot,
                base + 16.0,
                escape(&g.label)
            );
            for (si, bar) in g.bars.iter().enumerate() {
                let Some((m, e)) = *bar else { continue };
                if !m.is_finite() {
                    continue;
                }
                let x = gx + si as f64 * bar_w;
                let top = f.py(m).min(base);
                let _ = writeln!(
                    f.svg,
                    r#"<rect class="bar" x="{x:.2}" y="{top:.2}" width="{:.2}" height="{:.2}" fill="{}"><title>{} {}: {}</title></rect>"#,
                    bar_w * 0.92,
                    base - top,
                    colour(si),
                    escape(&g.label),
                    escape(self.series.get(si).map_or("", String::as_str)),
                    fmt_tick(m)
                );
                if e.is_finite() && e > 0.0 {
                    let cx = x + bar_w * 0.46;
                    let (ya, yb) = (f.py(m - e).min(base), f.py(m + e));
                    let _ = writeln!(
                        f.svg,
                        r#"<path d="M{cx:.2},{ya:.2} V{yb:.2} M{:.2},{ya:.2} H{:.2} M{:.2},{yb:.2} H{:.2}" stroke="black" fill="none"/>"#,
                        cx - 4.0,
                        cx + 4.0,
                        cx - 4.0,
                        cx + 4.0
                    );
                }
            }
        }
        f.legend(&self.series, &[]);
        f.finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Checks that `svg` is well-formed as far as elements go: every tag
    /// closes in order, attributes are quoted, and the root is `<svg>`.
    pub(crate) fn well_formed(svg: &str) -> Result<(), String> {
        let mut stack: Vec<String> = vec![];
        let mut rest = svg;
        let mut roots = 0;
        while let Some(i) = rest.find('<') {
            let text = &rest[..i];
            if text.contains('>') {
                return Err(format!("stray '>' in text {text:?}"));
            }
            let end = rest[i..].find('>').ok_or("unclosed tag")? + i;
            let tag = &rest[i + 1..end];
            rest = &rest[end + 1..];
            if tag.starts_with('?') || tag.starts_with('!') {
                continue;
            }
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack.pop().ok_or(format!("</{name}> with nothing open"))?;
                if open != name.trim() {
                    return Err(format!("</{name}> closes <{open}>"));
                }
                continue;
            }
            let self_closing = tag.ends_with('/');
            let body = tag.trim_end_matches('/');
            let name = body
                .split_whitespace()
                .next()
                .ok_or("empty tag")?
                .to_string();
            if body.matches('"').count() & 1 == 1 {
                return Err(format!("unbalanced quotes in <{body}>"));
            }
            if stack.is_empty() {
                roots += 1;
                if name != "svg" {
                    return Err(format!("root element <{name}>"));
                }
            }
            if !self_closing {
                stack.push(name);
            }
        }
        if !stack.is_empty() {
            return Err(format!("unclosed {stack:?}"));
        }
        if roots != 1 {
            return Err(format!("{roots} root elements"));
        }
        Ok(())
    }

    #[test]
    fn checker_catches_errors() {
        assert!(well_formed("<svg><g></svg>").is_err());
        assert!(well_formed("<svg a=\"1></svg>").is_err());
        assert!(well_formed("<svg/><svg/>").is_err());
        assert!(well_formed("<?xml version=\"1.0\"?><svg><g/><text>a &lt; b</text></svg>").is_ok());
    }

    #[test]
    fn line_plot_is_well_formed_with_one_marker_per_point() {
        let plot = LinePlot {
            title: "Test accuracy <MNIST> & time".into(),
            x_label: "cumulative training time (s)".into(),
            y_label: "test accuracy (%)".into(),
            series: vec![
                Series {
                    name: "NoProp-CT".into(),
                    points: vec![(10.0, 90.0), (20.0, 95.0), (30.0, 96.5)],
                    ..Default::default()
                },
                Series {
                    name: "NoProp-FM".into(),
                    points: vec![(12.0, 91.0), (24.0, 97.0)],
                    ..Default::default()
                },
                Series {
                    name: "Adjoint".into(),
                    points: vec![(100.0, 98.0)],
                    ..Default::default()
                },
                Series {
                    name: "empty".into(),
                    points: vec![],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let svg = plot.to_svg();
        well_formed(&svg).unwrap();
        assert_eq!(svg.matches("<circle").count(), 6);
        // A single point draws no line.
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("&lt;MNIST&gt; &amp; time"));
    }

    #[test]
    fn bar_plot_is_well_formed_with_one_bar_per_value() {
        let plot = BarPlot {
            title: "Class probabilities".into(),
            x_label: "".into(),
            y_label: "test accuracy (%)".into(),
            series: vec!["softmax".into(), "radial".into()],
            groups: vec![
                BarGroup {
                    label: "MNIST one-hot".into(),
                    bars: vec![Some((99.4, 0.05)), Some((99.3, 0.1))],
                },
                BarGroup {
                    label: "MNIST dim=20".into(),
                    bars: vec![Some((99.5, f64::NAN)), None],
                },
            ],
        };
        let svg = plot.to_svg();
        well_formed(&svg).unwrap();
        assert_eq!(svg.matches("<rect class=\"bar\"").count(), 3);
        assert_eq!(svg.matches("<path").count(), 2);
    }

    /// Bars far apart (3.6% and 89.9%) keep the axis at zero or above.
    #[test]
    fn bar_axis_stays_non_negative_for_non_negative_values() {
        let plot = BarPlot {
            title: "Embedding initialisation".into(),
            x_label: "".into(),
            y_label: "test accuracy (%)".into(),
            series: vec!["orthogonal".into(), "normal".into()],
            groups: vec![BarGroup {
                label: "MNIST".into(),
                bars: vec![Some((3.6, 0.38)), Some((89.9, 0.55))],
            }],
        };
        let svg = plot.to_svg();
        well_formed(&svg).unwrap();
        assert!(svg.contains(">0</text>"), "the axis starts at zero");
        assert!(!svg.contains(">-"), "no negative tick: {svg}");
    }

    #[test]
    fn empty_plots_are_still_documents() {
        well_formed(
            &LinePlot {
                title: "t".into(),
                x_label: "x".into(),
                y_label: "y".into(),
                series: vec![],
                ..Default::default()
            }
            .to_svg(),
        )
        .unwrap();
        well_formed(
            &BarPlot {
                title: "t".into(),
                x_label: "".into(),
                y_label: "y".into(),
                series: vec![],
                groups: vec![],
            }
            .to_svg(),
        )
        .unwrap();
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let (lo, hi, t) = nice_ticks(91.3, 99.6);
        assert!(lo <= 91.3 && hi >= 99.6);
        assert_eq!(t, vec![90.0, 92.0, 94.0, 96.0, 98.0, 100.0]);
        let (lo, hi, t) = nice_ticks(0.0, 0.0);
        assert!(lo < 0.0 && hi > 0.0 && t.len() >= 2);
        let (_, _, t) = nice_ticks(0.0, 37.0);
        assert_eq!(t.first(), Some(&0.0));
        assert_eq!(t.last(), Some(&40.0));
    }
}
