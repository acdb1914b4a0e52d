//! Charts with `plotters` (bitmap and SVG backends): metrics over the number of edits, and the
//! edit time of every edit call. Labels need a TrueType font: the first of `$KEDIT_CHART_FONT`
//! and a few common system fonts (DejaVu, Liberation, Noto) is registered; without any, the charts
//! are drawn without text rather than not at all.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

/// One line of a chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
    /// Palette index; `None` takes the series' own index (related series share a color).
    pub color: Option<usize>,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Fixed y range (metrics live in [0, 1]); `None` fits the data.
    pub y_range: Option<(f64, f64)>,
    /// Draw points as well as lines (few points).
    pub points: bool,
    /// Place x on a log10 scale (points' x must be positive; ticks still show x itself), for
    /// x spanning orders of magnitude such as T = 1, 10, 100, 500 edits.
    pub x_log10: bool,
}

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a font for "sans-serif" once; whether one is available.
pub(crate) fn font_available() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        let env = std::env::var("KEDIT_CHART_FONT").ok();
        for path in env.iter().map(String::as_str).chain(FONT_CANDIDATES.iter().copied()) {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    tracing::debug!("chart font: {path}");
                    return true;
                }
            }
        }
        tracing::warn!("no TrueType font found for chart labels (set KEDIT_CHART_FONT); drawing charts without text");
        false
    })
}

const COLORS: &[RGBColor] = &[
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &Chart) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let text = font_available();
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("cannot draw the chart: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    // On a log axis the chart is drawn in log10(x) and the tick labels turned back into x.
    let place = |x: f64| if chart.x_log10 { x.log10() } else { x };
    let placed: Vec<Vec<(f64, f64)>> = chart
        .series
        .iter()
        .map(|s| s.points.iter().map(|&(x, y)| (place(x), y)).collect())
        .collect();
    let all = placed.iter().flatten();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        if x.is_finite() && y.is_finite() {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x0 -= 0.5;
        x1 += 0.5;
    } else if chart.x_log10 {
        // Room for the first and last points' markers.
        let pad = (x1 - x0) * 0.04;
        x0 -= pad;
        x1 += pad;
    }
    let (y0, y1) = match chart.y_range {
        Some(r) => r,
        None => {
            let pad = ((y1 - y0) * 0.1).max(1e-3);
            ((y0 - pad).min(0.0f64.max(y0 - pad)), y1 + pad)
        }
    };
    let mut builder = ChartBuilder::on(&root);
    builder.margin(15);
    if text {
        builder
            .caption(&chart.title, ("sans-serif", 22))
            .x_label_area_size(45)
            .y_label_area_size(60);
    }
    let mut ctx = builder.build_cartesian_2d(x0..x1, y0..y1).map_err(err)?;
    let mut mesh = ctx.configure_mesh();
    let log_tick = |x: &f64| {
        let v = 10f64.powf(*x);
        if v >= 10.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    };
    if chart.x_log10 {
        mesh.x_label_formatter(&log_tick);
    }
    if text {
        mesh.x_desc(chart.x_label.as_str())
            .y_desc(chart.y_label.as_str())
            .label_style(("sans-serif", 14));
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw().map_err(err)?;
    for (i, (s, placed)) in chart.series.iter().zip(&placed).enumerate() {
        let color = COLORS[s.color.unwrap_or(i) % COLORS.len()];
        let style = color.stroke_width(2);
        let points: Vec<(f64, f64)> = placed
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        let drawn = if s.dashed {
            ctx.draw_series(DashedLineSeries::new(points.clone(), 6, 4, style))
                .map_err(err)?
        } else {
            ctx.draw_series(LineSeries::new(points.clone(), style))
                .map_err(err)?
        };
        if text {
            // Dashed series get a dashed legend sample (two short strokes).
            let dashed = s.dashed;
            drawn.label(s.name.as_str()).legend(move |(x, y)| {
                let (first, gap) = if dashed { (8, 12) } else { (20, 20) };
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (first, 0)], color.stroke_width(2))
                    + PathElement::new(vec![(gap, 0), (20, 0)], color.stroke_width(2))
            });
        }
        if chart.points {
            ctx.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
    }
    if text && !chart.series.is_empty() {
        ctx.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(legend_corner(&placed, (x0, x1), (y0, y1), chart.series.len()).position())
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// A corner of the plot for the legend box.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Corner {
    LowerRight,
    UpperRight,
    LowerLeft,
    UpperLeft,
}

impl Corner {
    fn position(self) -> SeriesLabelPosition {
        match self {
            Corner::LowerRight => SeriesLabelPosition::LowerRight,
            Corner::UpperRight => SeriesLabelPosition::UpperRight,
            Corner::LowerLeft => SeriesLabelPosition::LowerLeft,
            Corner::UpperLeft => SeriesLabelPosition::UpperLeft,
        }
    }
}

/// The corner whose legend-sized box the lines cross least (samples along every segment),
/// so the legend does not hide the points it names; ties go to the lower right.
fn legend_corner(
    series: &[Vec<(f64, f64)>],
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
    n_labels: usize,
) -> Corner {
    // The legend's share of the plot: about a third of the width, one line per label.
    let (w, h) = (0.35, ((n_labels as f64 * 22.0 + 12.0) / 440.0).min(0.8));
    let unit = |(x, y): (f64, f64)| ((x - x0) / (x1 - x0), (y - y0) / (y1 - y0));
    let mut samples = Vec::new();
    for line in series {
        let pts: Vec<(f64, f64)> = line
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&p| unit(p))
            .collect();
        samples.extend(pts.iter().copied());
        for pair in pts.windows(2) {
            let ((ax, ay), (bx, by)) = (pair[0], pair[1]);
            for k in 1..20 {
                let t = k as f64 / 20.0;
                samples.push((ax + (bx - ax) * t, ay + (by - ay) * t));
            }
        }
    }
    let inside = |corner: Corner| {
        let (right, upper) = match corner {
            Corner::LowerRight => (true, false),
            Corner::UpperRight => (true, true),
            Corner::LowerLeft => (false, false),
            Corner::UpperLeft => (false, true),
        };
        samples
            .iter()
            .filter(|&&(x, y)| {
                let in_x = if right { x >= 1.0 - w } else { x <= w };
                let in_y = if upper { y >= 1.0 - h } else { y <= h };
                in_x && in_y
            })
            .count()
    };
    [
        Corner::LowerRight,
        Corner::UpperRight,
        Corner::LowerLeft,
        Corner::UpperLeft,
    ]
    .into_iter()
    .min_by_key(|&c| inside(c))
    .unwrap_or(Corner::LowerRight)
}

/// Writes `stem.png` and `stem.svg` into `dir`.
pub fn write_chart(dir: &Path, stem: &str, chart: &Chart) -> Result<()> {
    let size = (900, 540);
    let png = dir.join(format!("{stem}.png"));
    draw(BitMapBackend::new(&png, size).into_drawing_area(), chart)?;
    let svg = dir.join(format!("{stem}.svg"));
    draw(SVGBackend::new(&svg, size).into_drawing_area(), chart)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_legend_goes_to_the_corner_the_lines_leave_free() {
        // Metrics rising from the lower left to the upper right: the lower right is free.
        let rising = vec![vec![(0.0, 0.1), (1.0, 0.5), (2.0, 0.95)]];
        assert_eq!(
            legend_corner(&rising, (0.0, 2.0), (0.0, 1.0), 3),
            Corner::LowerRight
        );
        // Lines ending low on the right (as WISE's Rel at T = 500) and Loc across the top
        // leave the lower left free.
        let falling = vec![
            vec![(0.0, 1.0), (1.0, 0.9), (2.0, 0.75)],
            vec![(0.0, 0.9), (1.0, 0.5), (2.0, 0.25)],
            vec![(0.0, 0.5), (1.0, 0.3), (2.0, 0.15)],
        ];
        assert_eq!(
            legend_corner(&falling, (0.0, 2.0), (0.0, 1.0), 6),
            Corner::LowerLeft
        );
    }

    #[test]
    fn charts_are_written_as_png_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let chart = Chart {
            title: "metrics".into(),
            x_label: "edits".into(),
            y_label: "value".into(),
            series: vec![
                Series {
                    name: "a".into(),
                    points: vec![(1.0, 0.2), (2.0, 0.5), (3.0, f64::NAN)],
                    dashed: false,
                    color: None,
                },
                Series {
                    name: "b".into(),
                    points: vec![(1.0, 1.0)],
                    dashed: true,
                    color: None,
                },
            ],
            y_range: Some((0.0, 1.05)),
            points: true,
            x_log10: false,
        };
        write_chart(dir.path(), "m", &chart).unwrap();
        let png = std::fs::read(dir.path().join("m.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let svg = std::fs::read_to_string(dir.path().join("m.svg")).unwrap();
        assert!(svg.contains("<svg"), "{svg}");
    }
}
