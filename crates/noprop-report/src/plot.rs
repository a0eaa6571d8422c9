//! The two kinds of plot the reproduction draws, on `plotters`' SVG back
//! end: lines with markers (accuracy against time or epoch) and grouped
//! bars with error bars (the ablations). The output is plain SVG that
//! browsers and converters (rsvg, Inkscape) read.

use plotters::coord::Shift;
use plotters::prelude::*;

const WIDTH: u32 = 640;
const HEIGHT: u32 = 400;
/// Room on the right for the legend.
const LEGEND: u32 = 170;
/// The text size asked of plotters (whose SVG text comes out at 12 px for it).
const FONT: f64 = 15.0;
/// The error bars' colour.
const ERROR_BAR: RGBColor = RGBColor(0x33, 0x33, 0x33);

/// Colours that stay distinct for colour-blind readers (Okabe and Ito).
const PALETTE: [RGBColor; 7] = [
    RGBColor(0x00, 0x72, 0xB2),
    RGBColor(0xD5, 0x5E, 0x00),
    RGBColor(0x00, 0x9E, 0x73),
    RGBColor(0xCC, 0x79, 0xA7),
    RGBColor(0xE6, 0x9F, 0x00),
    RGBColor(0x56, 0xB4, 0xE9),
    RGBColor(0x00, 0x00, 0x00),
];

fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
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

fn fmt_tick(v: &f64) -> String {
    let r = (v * 1000.0).round() / 1000.0;
    if r == r.trunc() {
        format!("{}", r as i64)
    } else {
        format!("{r}")
    }
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Chart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// Draws a plot into an SVG string: `draw` gets the whole area (white, the
/// legend's room on the right) and returns what it could not draw. A
/// drawing error leaves the document as far as it went, still well formed.
fn svg(draw: impl FnOnce(&Area<'_>) -> Result<(), Box<dyn std::error::Error>>) -> String {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, HEIGHT)).into_drawing_area();
        let _ = root.fill(&WHITE).map_err(|e| e.to_string());
        let _ = draw(&root).map_err(|e| e.to_string());
        let _ = root.present();
    }
    out
}

/// The frame every plot shares, on `plot` (the area left of the legend):
/// title, axes with ticks at `x` and `y` (ranges from [`nice_ticks`]),
/// horizontal grid lines, axis labels.
fn frame<'a, 'b>(
    plot: &'a Area<'b>,
    title: &str,
    (x_label, x): (&str, (f64, f64, Vec<f64>)),
    (y_label, y): (&str, (f64, f64, Vec<f64>)),
) -> Result<Chart<'a, 'b>, Box<dyn std::error::Error>> {
    let mut chart = ChartBuilder::on(plot)
        .caption(title, ("sans-serif", FONT * 1.25))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(x.0..x.1, y.0..y.1)?;
    chart
        .configure_mesh()
        .x_labels(x.2.len())
        .y_labels(y.2.len())
        .x_label_formatter(&fmt_tick)
        .y_label_formatter(&fmt_tick)
        .x_desc(x_label)
        .y_desc(y_label)
        .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
        .light_line_style(TRANSPARENT)
        .label_style(("sans-serif", FONT))
        .draw()?;
    Ok(chart)
}

/// One legend entry per name, a thick stroke in its colour, in the room on the right.
fn legend(root: &Area, entries: &[(String, RGBColor)]) -> Result<(), Box<dyn std::error::Error>> {
    let x = (WIDTH - LEGEND + 10) as i32;
    for (i, (name, c)) in entries.iter().enumerate() {
        let y = 40 + 20 * i as i32;
        root.draw(&PathElement::new(
            vec![(x, y), (x + 14, y)],
            c.stroke_width(8),
        ))?;
        root.draw(&Text::new(
            name.clone(),
            (x + 20, y - 6),
            ("sans-serif", FONT),
        ))?;
    }
    Ok(())
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
    /// The plot as an SVG document: a line (`stroke-width="2"`) per series
    /// of two points or more, one `<circle>` per point of a solid series.
    pub fn to_svg(&self) -> String {
        let finite = |s: &Series| -> Vec<(f64, f64)> {
            s.points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect()
        };
        let all: Vec<(f64, f64)> = self.series.iter().flat_map(finite).collect();
        let fold = |f: fn(f64, f64) -> f64, init: f64, pick: fn(&(f64, f64)) -> f64| {
            all.iter().map(pick).fold(init, f)
        };
        let (xlo, xhi) = (
            fold(f64::min, f64::INFINITY, |p| p.0),
            fold(f64::max, f64::NEG_INFINITY, |p| p.0),
        );
        let (ylo, yhi) = (
            fold(f64::min, f64::INFINITY, |p| p.1),
            fold(f64::max, f64::NEG_INFINITY, |p| p.1),
        );
        // Time axes start at zero.
        let xhi = if self.integer_x { xhi.max(5.0) } else { xhi };
        let x = nice_ticks(xlo.min(0.0), xhi);
        svg(|root| {
            let (plot, _) = root.split_horizontally(WIDTH - LEGEND);
            let y = nice_ticks(ylo, yhi);
            let mut chart = frame(&plot, &self.title, (&self.x_label, x), (&self.y_label, y))?;
            let mut entries = vec![];
            for (i, s) in self.series.iter().enumerate() {
                let c = colour(s.colour.unwrap_or(i));
                let pts = finite(s);
                entries.push((s.name.clone(), c));
                if pts.len() > 1 && s.dashed {
                    chart.draw_series(DashedLineSeries::new(
                        pts.clone(),
                        6,
                        4,
                        c.stroke_width(2),
                    ))?;
                } else if pts.len() > 1 {
                    chart.draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?;
                }
                if !s.dashed {
                    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3.5, c.filled())))?;
                }
            }
            legend(root, &entries)
        })
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
    /// The plot as an SVG document: a bar per value in its series' colour,
    /// an I-beam for each finite error above 0, the group's label under it.
    ///
    /// The value axis spans the values (with their errors), not zero to the
    /// largest, since ablations differ by tenths of a percent; padding never
    /// takes it below zero when no value is negative.
    pub fn to_svg(&self) -> String {
        let vals = || {
            self.groups
                .iter()
                .flat_map(|g| g.bars.iter().flatten())
                .filter(|(m, _)| m.is_finite())
        };
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for &(m, e) in vals() {
            let e = if e.is_finite() { e } else { 0.0 };
            lo = lo.min(m - e);
            hi = hi.max(m + e);
        }
        let pad = if hi > lo { (hi - lo) * 0.3 } else { 1.0 };
        let bottom = if lo >= 0.0 {
            (lo - pad).max(0.0)
        } else {
            lo - pad
        };
        let y = nice_ticks(bottom, hi + pad * 0.2);
        let base = y.0;
        let groups = self.groups.len().max(1) as f64;
        let bar_w = 0.8 / self.series.len().max(1) as f64;
        svg(|root| {
            let x = (0.0, groups, vec![]);
            let (plot, _) = root.split_horizontally(WIDTH - LEGEND);
            let mut chart = frame(&plot, &self.title, (&self.x_label, x), (&self.y_label, y))?;
            for (gi, g) in self.groups.iter().enumerate() {
                let (px, py) = chart.backend_coord(&(gi as f64 + 0.5, base));
                root.draw(&Text::new(
                    g.label.clone(),
                    (px - 3 * g.label.len() as i32, py + 6),
                    ("sans-serif", FONT),
                ))?;
                for (si, bar) in g.bars.iter().enumerate() {
                    let Some((m, e)) = *bar else { continue };
                    if !m.is_finite() {
                        continue;
                    }
                    let x0 = gi as f64 + 0.1 + si as f64 * bar_w;
                    let x1 = x0 + bar_w * 0.92;
                    chart.draw_series([Rectangle::new(
                        [(x0, base), (x1, m)],
                        colour(si).filled(),
                    )])?;
                    if e.is_finite() && e > 0.0 {
                        let (cx, cap) = ((x0 + x1) / 2.0, bar_w * 0.15);
                        let (a, b) = ((m - e).max(base), m + e);
                        chart.draw_series([
                            PathElement::new(vec![(cx, a), (cx, b)], ERROR_BAR),
                            PathElement::new(vec![(cx - cap, a), (cx + cap, a)], ERROR_BAR),
                            PathElement::new(vec![(cx - cap, b), (cx + cap, b)], ERROR_BAR),
                        ])?;
                    }
                }
            }
            let entries: Vec<(String, RGBColor)> = self
                .series
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), colour(i)))
                .collect();
            legend(root, &entries)
        })
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

    /// The elements `<tag` of `svg` that carry `attr` (e.g. `stroke-width="2"`).
    pub(crate) fn count(svg: &str, tag: &str, attr: &str) -> usize {
        svg.split('<')
            .filter(|e| e.starts_with(tag) && e.contains(attr))
            .count()
    }

    /// The bars of a [`BarPlot`]: rectangles in a palette colour.
    pub(crate) fn bars(svg: &str) -> usize {
        PALETTE
            .iter()
            .map(|c| {
                count(
                    svg,
                    "rect",
                    &format!("fill=\"#{:02X}{:02X}{:02X}\"", c.0, c.1, c.2),
                )
            })
            .sum()
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
        assert_eq!(count(&svg, "polyline", "stroke-width=\"2\""), 2);
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
        assert_eq!(bars(&svg), 3);
        // Two finite errors above 0, three strokes each.
        assert_eq!(count(&svg, "polyline", "stroke=\"#333333\""), 6);
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
        assert!(
            svg.contains(">\n0\n</text>"),
            "the axis starts at zero: {svg}"
        );
        assert!(!svg.contains(">\n-"), "no negative tick: {svg}");
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
