//! Knowledge-circuit graphs as PNG and SVG, drawn with `plotters` primitives from the layered
//! layout of [`super::circuit_render::layout`] (Graphviz is not needed): one row per layer,
//! a box per node, edges as lines whose width follows |score|. Without a font (see
//! [`super::chart`]) the boxes are drawn without labels.

use std::path::Path;

use super::circuit_graph::Node;
use super::circuit_render::Layout;
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::chart::font_available;

const TITLE_H: f64 = 40.0;

fn fill_of(node: Node) -> RGBColor {
    match node {
        Node::Head { .. } => RGBColor(255, 236, 200),
        Node::Mlp { .. } => RGBColor(214, 236, 214),
        Node::Input | Node::Logits => RGBColor(225, 225, 240),
    }
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, title: &str, l: &Layout) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let text = font_available();
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("cannot draw the graph: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let style = |size: u32, h: HPos| {
        TextStyle::from(("sans-serif", size).into_font())
            .color(&BLACK)
            .pos(Pos::new(h, VPos::Center))
    };
    let pt = |x: f64, y: f64| (x.round() as i32, (y + TITLE_H).round() as i32);
    if text {
        root.draw(&Text::new(
            title.to_string(),
            ((l.width / 2.0) as i32, (TITLE_H / 2.0) as i32),
            style(15, HPos::Center),
        ))
        .map_err(err)?;
        for (y, label) in &l.row_labels {
            root.draw(&Text::new(
                label.clone(),
                pt(12.0, *y),
                style(12, HPos::Left),
            ))
            .map_err(err)?;
        }
    }
    for e in &l.edges {
        let (r, g, b) = e.color;
        root.draw(&PathElement::new(
            vec![pt(e.from.0, e.from.1), pt(e.to.0, e.to.1)],
            RGBColor(r, g, b).stroke_width(e.width.round().max(1.0) as u32),
        ))
        .map_err(err)?;
    }
    let (hw, hh) = (l.box_w / 2.0, l.box_h / 2.0);
    for n in &l.nodes {
        let corners = [pt(n.x - hw, n.y - hh), pt(n.x + hw, n.y + hh)];
        root.draw(&Rectangle::new(corners, fill_of(n.node).filled()))
            .map_err(err)?;
        root.draw(&Rectangle::new(corners, BLACK.stroke_width(1)))
            .map_err(err)?;
        if text {
            root.draw(&Text::new(
                n.label.clone(),
                pt(n.x, n.y),
                style(12, HPos::Center),
            ))
            .map_err(err)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Writes `stem.png` and `stem.svg` into `dir`.
pub fn write_graph(dir: &Path, stem: &str, title: &str, layout: &Layout) -> Result<()> {
    let size = (
        layout.width.ceil() as u32,
        (layout.height + TITLE_H).ceil() as u32,
    );
    let png = dir.join(format!("{stem}.png"));
    draw(
        BitMapBackend::new(&png, size).into_drawing_area(),
        title,
        layout,
    )?;
    let svg = dir.join(format!("{stem}.svg"));
    draw(
        SVGBackend::new(&svg, size).into_drawing_area(),
        title,
        layout,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::circuit_graph::{nodes_of, Edge};
    use crate::eval::circuit_render::layout;

    #[test]
    fn graphs_are_written_as_png_and_svg() {
        let a = Node::Head { layer: 0, head: 1 };
        let edges = vec![
            Edge {
                from: Node::Input,
                to: a,
                score: -1.0,
            },
            Edge {
                from: a,
                to: Node::Logits,
                score: 0.5,
            },
        ];
        let nodes = nodes_of(&edges);
        let dir = tempfile::tempdir().unwrap();
        write_graph(dir.path(), "g", "a <b> & c", &layout(&nodes, &edges)).unwrap();
        let svg = std::fs::read_to_string(dir.path().join("g.svg")).unwrap();
        assert!(svg.contains("<svg"));
        assert!(svg.matches("<rect").count() >= 6, "{svg}");
        assert!(std::fs::metadata(dir.path().join("g.png")).unwrap().len() > 0);
    }
}
