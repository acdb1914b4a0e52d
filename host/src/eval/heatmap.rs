//! Heatmaps for causal tracing, drawn like ROME's Figure 1: one panel per kind of restored state,
//! rows = tokens (top to bottom), columns = layers, a white-to-dark colour scale with its bar.
//! Drawn cell by cell with `plotters` primitives (a chart mesh cannot label rows with tokens),
//! as PNG and SVG; without a font (see [`super::chart`]) the cells are drawn without text.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::chart::font_available;

/// One grid of values with its labels.
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub row_labels: Vec<String>,
    /// `values[row][column]`; non-finite values are drawn grey.
    pub values: Vec<Vec<f64>>,
    /// The colour scale's ends (values outside are clipped).
    pub vmin: f64,
    pub vmax: f64,
    /// The colour of `vmax` (`vmin` is white).
    pub color: RGBColor,
    pub colorbar_label: String,
}

pub struct Heatmap {
    pub title: String,
    pub panels: Vec<Panel>,
}

/// ROME's colour maps: Purples for hidden states, Greens for MLP, Reds for attention.
pub const PURPLE: RGBColor = RGBColor(63, 0, 125);
pub const GREEN: RGBColor = RGBColor(0, 68, 27);
pub const RED: RGBColor = RGBColor(103, 0, 13);

const FONT: u32 = 13;
const CELL_H: i32 = 20;
const TITLE_H: i32 = 44;
const SUBTITLE_H: i32 = 40;
const XAXIS_H: i32 = 48;
const BAR_W: i32 = 86;
const GAP: i32 = 24;

fn shade(color: RGBColor, t: f64) -> RGBColor {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let mix = |c: u8| (255.0 + (c as f64 - 255.0) * t).round() as u8;
    RGBColor(mix(color.0), mix(color.1), mix(color.2))
}

fn columns(p: &Panel) -> usize {
    p.values.iter().map(Vec::len).max().unwrap_or(0)
}

fn cell_w(p: &Panel) -> i32 {
    (440 / columns(p).max(1) as i32).clamp(8, 28)
}

/// Width of the token labels: a rough 7.5 px per character of a 13 px sans-serif font.
fn label_w(p: &Panel) -> i32 {
    let chars = p
        .row_labels
        .iter()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(0);
    (chars as f64 * 7.5) as i32 + 12
}

fn panel_w(p: &Panel) -> i32 {
    label_w(p) + columns(p) as i32 * cell_w(p) + BAR_W
}

fn size(h: &Heatmap) -> (u32, u32) {
    let w: i32 = h.panels.iter().map(panel_w).sum::<i32>() + GAP * (h.panels.len() as i32 + 1);
    let rows = h.panels.iter().map(|p| p.values.len()).max().unwrap_or(0) as i32;
    let height = TITLE_H + SUBTITLE_H + rows * CELL_H + XAXIS_H;
    (w.max(420) as u32, height as u32)
}

fn fmt_value(v: f64, span: f64) -> String {
    if span >= 0.1 {
        format!("{v:.2}")
    } else if span >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.1e}")
    }
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, h: &Heatmap) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let text = font_available();
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("cannot draw the heatmap: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let style = |size: u32, h: HPos, v: VPos| {
        TextStyle::from(("sans-serif", size).into_font())
            .color(&BLACK)
            .pos(Pos::new(h, v))
    };
    if text {
        let (w, _) = root.dim_in_pixel();
        root.draw(&Text::new(
            h.title.clone(),
            (w as i32 / 2, TITLE_H / 2),
            style(16, HPos::Center, VPos::Center),
        ))
        .map_err(err)?;
    }
    let mut x = GAP;
    for p in &h.panels {
        let (cw, lw, cols) = (cell_w(p), label_w(p), columns(p) as i32);
        let top = TITLE_H + SUBTITLE_H;
        let left = x + lw;
        let span = p.vmax - p.vmin;
        let scale = |v: f64| if span > 0.0 { (v - p.vmin) / span } else { 1.0 };
        for (r, row) in p.values.iter().enumerate() {
            let y = top + r as i32 * CELL_H;
            for (c, &v) in row.iter().enumerate() {
                let x0 = left + c as i32 * cw;
                let fill = if v.is_finite() {
                    shade(p.color, scale(v))
                } else {
                    RGBColor(200, 200, 200)
                };
                root.draw(&Rectangle::new(
                    [(x0, y), (x0 + cw, y + CELL_H)],
                    fill.filled(),
                ))
                .map_err(err)?;
            }
            if text {
                let label = p.row_labels.get(r).map(String::as_str).unwrap_or("");
                root.draw(&Text::new(
                    label.to_string(),
                    (left - 6, y + CELL_H / 2),
                    style(FONT, HPos::Right, VPos::Center),
                ))
                .map_err(err)?;
            }
        }
        let bottom = top + p.values.len() as i32 * CELL_H;
        root.draw(&Rectangle::new(
            [(left, top), (left + cols * cw, bottom)],
            BLACK.stroke_width(1),
        ))
        .map_err(err)?;
        // Colour bar: 40 steps from vmin (bottom) to vmax (top).
        let bx = left + cols * cw + 12;
        let steps = 40;
        let bar_h = (bottom - top).max(CELL_H);
        for i in 0..steps {
            let y0 = bottom - (i + 1) * bar_h / steps;
            let y1 = bottom - i * bar_h / steps;
            let t = (i as f64 + 0.5) / steps as f64;
            root.draw(&Rectangle::new(
                [(bx, y0), (bx + 12, y1)],
                shade(p.color, t).filled(),
            ))
            .map_err(err)?;
        }
        if text {
            let sub = style(FONT, HPos::Center, VPos::Center);
            root.draw(&Text::new(
                p.title.clone(),
                (x + panel_w(p) / 2, TITLE_H + SUBTITLE_H / 2),
                sub.clone(),
            ))
            .map_err(err)?;
            for (frac, v) in [(0.0, p.vmin), (0.5, (p.vmin + p.vmax) / 2.0), (1.0, p.vmax)] {
                let y = bottom - (frac * bar_h as f64) as i32;
                root.draw(&Text::new(
                    fmt_value(v, span),
                    (bx + 16, y),
                    style(11, HPos::Left, VPos::Center),
                ))
                .map_err(err)?;
            }
            root.draw(&Text::new(
                p.colorbar_label.clone(),
                (bx + 6, bottom + 22),
                style(11, HPos::Center, VPos::Center),
            ))
            .map_err(err)?;
            // Layer ticks: every layer when they fit, else every fifth.
            let every = if cw >= 18 { 1 } else { 5 };
            for c in (0..cols).step_by(every) {
                let cx = left + c * cw + cw / 2;
                root.draw(&PathElement::new(
                    vec![(cx, bottom), (cx, bottom + 4)],
                    BLACK.stroke_width(1),
                ))
                .map_err(err)?;
                root.draw(&Text::new(
                    c.to_string(),
                    (cx, bottom + 12),
                    style(11, HPos::Center, VPos::Center),
                ))
                .map_err(err)?;
            }
            root.draw(&Text::new(
                p.x_label.clone(),
                (left + cols * cw / 2, bottom + 34),
                style(12, HPos::Center, VPos::Center),
            ))
            .map_err(err)?;
        }
        x += panel_w(p) + GAP;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Writes `stem.png` and `stem.svg` into `dir`.
pub fn write_heatmap(dir: &Path, stem: &str, heatmap: &Heatmap) -> Result<()> {
    let size = size(heatmap);
    let png = dir.join(format!("{stem}.png"));
    draw(BitMapBackend::new(&png, size).into_drawing_area(), heatmap)?;
    let svg = dir.join(format!("{stem}.svg"));
    draw(SVGBackend::new(&svg, size).into_drawing_area(), heatmap)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heatmaps_are_written_as_png_and_svg_with_escaped_labels() {
        let dir = tempfile::tempdir().unwrap();
        let panel = |color| Panel {
            title: "restored".into(),
            x_label: "layer".into(),
            row_labels: vec!["<s>".into(), " Eiffel*".into(), " of".into()],
            values: vec![
                vec![0.1, 0.2, 0.3],
                vec![0.5, f64::NAN, 0.9],
                vec![0.0, 0.0, 1.0],
            ],
            vmin: 0.0,
            vmax: 1.0,
            color,
            colorbar_label: "p(Paris)".into(),
        };
        let h = Heatmap {
            title: "The Eiffel Tower is located in the city of → Paris".into(),
            panels: vec![panel(PURPLE), panel(GREEN), panel(RED)],
        };
        write_heatmap(dir.path(), "t", &h).unwrap();
        let png = std::fs::read(dir.path().join("t.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let svg = std::fs::read_to_string(dir.path().join("t.svg")).unwrap();
        assert!(svg.contains("<svg"), "{svg}");
        assert!(!svg.contains("<s>"), "token labels must be escaped in SVG");
    }

    #[test]
    fn shades_run_from_white_to_the_panel_colour() {
        assert_eq!(shade(RED, 0.0), RGBColor(255, 255, 255));
        assert_eq!(shade(RED, 1.0), RED);
        assert_eq!(shade(RED, 7.0), RED);
        assert_eq!(shade(RED, f64::NAN), RGBColor(255, 255, 255));
    }
}
