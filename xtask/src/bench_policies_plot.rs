//! The policy benchmark's plots ([`crate::bench_policies`]): a figure is a list of shapes
//! ([`Shape`]), written out as SVG ([`svg`]) and as PNG ([`png`]: drawn here, text in the
//! 8x8 bitmap font of the `font8x8` crate, encoded by the `png` crate; no system library).
//!
//! * the timeline of a workload: one panel per policy, the cores each guest holds over the
//!   run (solid steps) with its load (dashed: runnable threads, at most its maximum cores);
//! * the bars: per workload, each policy's makespan and wasted core time.

use std::fmt::Write as _;

use crate::bench_policies::{held_steps, Analysed, Run, GUESTS, POLICIES};

/// An RGB colour.
pub type Rgb = (u8, u8, u8);

pub const GUEST_COLOURS: [Rgb; 2] = [(0x6a, 0x3d, 0x9a), (0xe0, 0x7b, 0x00)];
pub const POLICY_COLOURS: [Rgb; 3] = [(0x88, 0x88, 0x88), (0x1f, 0x77, 0xb4), (0x2c, 0xa0, 0x2c)];
const BLACK: Rgb = (0, 0, 0);
const GRID: Rgb = (0xdd, 0xdd, 0xdd);

#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// A polyline of `width` pixels, dashed or not.
    Line {
        points: Vec<(f64, f64)>,
        colour: Rgb,
        width: f64,
        dashed: bool,
    },
    Rect {
        x: f64,
        y: f64,
        w: f64,
        h: f64,
        fill: Rgb,
    },
    /// Text of `size` pixels; `anchor` is "start", "middle" or "end".
    Text {
        x: f64,
        y: f64,
        size: f64,
        anchor: &'static str,
        text: String,
    },
}

/// A figure: its size in pixels and its shapes, back to front.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    pub width: u32,
    pub height: u32,
    pub shapes: Vec<Shape>,
}

fn hex((r, g, b): Rgb) -> String {
    format!("#{r:02x}{g:02x}{b:02x}")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn svg(figure: &Figure) -> String {
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"sans-serif\">\n<rect width=\"{w}\" height=\"{h}\" fill=\"#ffffff\"/>\n",
        w = figure.width,
        h = figure.height
    );
    for shape in &figure.shapes {
        match shape {
            Shape::Line {
                points,
                colour,
                width,
                dashed,
            } => {
                let pts: Vec<String> = points
                    .iter()
                    .map(|(x, y)| format!("{x:.1},{y:.1}"))
                    .collect();
                let _ = writeln!(
                    out,
                    "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"{width}\"{}/>",
                    pts.join(" "),
                    hex(*colour),
                    if *dashed { " stroke-dasharray=\"5,3\"" } else { "" }
                );
            }
            Shape::Rect { x, y, w, h, fill } => {
                let _ = writeln!(
                    out,
                    "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"{}\"/>",
                    hex(*fill)
                );
            }
            Shape::Text {
                x,
                y,
                size,
                anchor,
                text,
            } => {
                let _ = writeln!(
                    out,
                    "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"{size}\" text-anchor=\"{anchor}\">{}</text>",
                    escape(text)
                );
            }
        }
    }
    out.push_str("</svg>\n");
    out
}

fn text(x: f64, y: f64, size: f64, anchor: &'static str, text: impl Into<String>) -> Shape {
    Shape::Text {
        x,
        y,
        size,
        anchor,
        text: text.into(),
    }
}

fn line(points: Vec<(f64, f64)>, colour: Rgb, width: f64, dashed: bool) -> Shape {
    Shape::Line {
        points,
        colour,
        width,
        dashed,
    }
}

/// A "nice" tick step for a range: 1, 2 or 5 times a power of ten, about `count` ticks.
fn tick_step(range: f64, count: f64) -> f64 {
    let raw = (range / count).max(1e-9);
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power)
}

/// Steps of `values` over time as polyline points (horizontal, then vertical).
fn steps(
    values: &[(u64, f64)],
    end: u64,
    x: impl Fn(u64) -> f64,
    y: impl Fn(f64) -> f64,
) -> Vec<(f64, f64)> {
    let mut points = Vec::new();
    for (i, &(t, v)) in values.iter().enumerate() {
        let next = values.get(i + 1).map_or(end, |n| n.0).min(end);
        if t > end {
            break;
        }
        points.push((x(t), y(v)));
        points.push((x(next), y(v)));
    }
    points
}

/// The timeline of workload `name`: one panel per run (policy).
pub fn timeline(name: &str, runs: &[&Run]) -> Figure {
    const W: f64 = 900.0;
    const PANEL_H: f64 = 170.0;
    const TOP: f64 = 50.0;
    const LEFT: f64 = 60.0;
    const RIGHT: f64 = 20.0;
    const GAP: f64 = 45.0;
    let height = TOP + runs.len() as f64 * (PANEL_H + GAP) + 20.0;
    let mut shapes = vec![
        text(
            W / 2.0,
            22.0,
            16.0,
            "middle",
            format!(
                "{name}: cores held (solid) and load (dashed, runnable threads up to 2) per guest"
            ),
        ),
        text(
            W - RIGHT,
            40.0,
            12.0,
            "end",
            "virtual time (Bochs, clock sync=none)",
        ),
    ];
    let longest = runs
        .iter()
        .map(|r| r.end_us.saturating_sub(r.since_us))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        / 1000.0;
    for (i, run) in runs.iter().enumerate() {
        let top = TOP + i as f64 * (PANEL_H + GAP) + 15.0;
        let bottom = top + PANEL_H;
        let x = |t: u64| {
            LEFT + (t.saturating_sub(run.since_us) as f64 / 1000.0) / longest * (W - LEFT - RIGHT)
        };
        let y = |v: f64| bottom - v / 2.5 * PANEL_H;
        shapes.push(text(
            LEFT,
            top - 4.0,
            13.0,
            "start",
            format!(
                "{} (seed {}): makespan {:.0} ms, {} moves",
                run.policy, run.seed, run.metrics.makespan_ms, run.metrics.moves
            ),
        ));
        for v in [0.0, 1.0, 2.0] {
            shapes.push(line(
                vec![(LEFT, y(v)), (W - RIGHT, y(v))],
                GRID,
                1.0,
                false,
            ));
            shapes.push(text(LEFT - 6.0, y(v) + 4.0, 11.0, "end", format!("{v:.0}")));
        }
        let step = tick_step(longest, 8.0);
        let mut tick = 0.0;
        while tick <= longest + 1e-9 {
            let tx = LEFT + tick / longest * (W - LEFT - RIGHT);
            shapes.push(line(
                vec![(tx, bottom), (tx, bottom + 4.0)],
                BLACK,
                1.0,
                false,
            ));
            shapes.push(text(
                tx,
                bottom + 16.0,
                10.0,
                "middle",
                format!("{tick:.0}"),
            ));
            tick += step;
        }
        shapes.push(text(
            W - RIGHT,
            bottom + 30.0,
            10.0,
            "end",
            "ms since the policy switch",
        ));
        shapes.push(text(26.0, (top + bottom) / 2.0, 11.0, "middle", "cores"));
        let held = held_steps(run);
        for (g, colour) in GUEST_COLOURS.iter().enumerate() {
            let loads: Vec<(u64, f64)> = run.loads[g]
                .iter()
                .map(|l| (l.at_us.max(run.since_us), (l.runnable as f64).min(2.0)))
                .collect();
            shapes.push(line(steps(&loads, run.end_us, x, y), *colour, 1.5, true));
            let cores: Vec<(u64, f64)> = held.iter().map(|(t, h)| (*t, h[g])).collect();
            // Offset a little so equal values of both guests stay visible.
            let offset = if g == 0 { -1.5 } else { 1.5 };
            shapes.push(line(
                steps(&cores, run.end_us, x, |v| y(v) + offset),
                *colour,
                2.5,
                false,
            ));
        }
        shapes.push(line(
            vec![(LEFT, top), (LEFT, bottom), (W - RIGHT, bottom)],
            BLACK,
            1.0,
            false,
        ));
    }
    // The legend.
    for (g, colour) in GUEST_COLOURS.iter().enumerate() {
        let lx = LEFT + g as f64 * 140.0;
        shapes.push(line(
            vec![(lx, 36.0), (lx + 24.0, 36.0)],
            *colour,
            2.5,
            false,
        ));
        shapes.push(text(lx + 30.0, 40.0, 12.0, "start", GUESTS[g]));
    }
    Figure {
        width: W as u32,
        height: height as u32,
        shapes,
    }
}

/// A bar panel's title and the figure of a run it shows.
type BarMetric = (&'static str, fn(&Run) -> f64);

/// Bars of makespan and wasted core time: one group per workload, one bar per policy
/// (median over seeds).
pub fn bars(a: &Analysed) -> Figure {
    const W: f64 = 900.0;
    const PANEL_H: f64 = 200.0;
    const LEFT: f64 = 70.0;
    let mut workloads: Vec<&str> = Vec::new();
    for r in &a.runs {
        if !workloads.contains(&r.workload.as_str()) {
            workloads.push(&r.workload);
        }
    }
    let median = |w: &str, p: &str, get: fn(&Run) -> f64| -> f64 {
        let values: Vec<f64> = a
            .runs
            .iter()
            .filter(|r| r.workload == w && r.policy == p)
            .map(get)
            .collect();
        crate::bench_policies::spread(&values).map_or(0.0, |s| s.median)
    };
    let metrics: [BarMetric; 2] = [
        ("makespan (ms)", |r| r.metrics.makespan_ms),
        ("wasted core time (ms)", |r| r.metrics.wasted_ms),
    ];
    let mut shapes = vec![text(
        W / 2.0,
        22.0,
        16.0,
        "middle",
        "policies: median over seeds (virtual time, Bochs clock sync=none)",
    )];
    for (p, colour) in POLICY_COLOURS.iter().enumerate() {
        let lx = LEFT + p as f64 * 150.0;
        shapes.push(Shape::Rect {
            x: lx,
            y: 32.0,
            w: 14.0,
            h: 10.0,
            fill: *colour,
        });
        shapes.push(text(lx + 20.0, 42.0, 12.0, "start", POLICIES[p]));
    }
    for (k, (title, get)) in metrics.iter().enumerate() {
        let top = 70.0 + k as f64 * (PANEL_H + 60.0);
        let bottom = top + PANEL_H;
        let most = workloads
            .iter()
            .flat_map(|w| POLICIES.iter().map(move |p| (w, p)))
            .map(|(w, p)| median(w, p, *get))
            .fold(0.0, f64::max)
            .max(1e-9);
        let step = tick_step(most, 4.0);
        let top_value = (most / step).ceil() * step;
        let y = |v: f64| bottom - v / top_value * PANEL_H;
        shapes.push(text(LEFT, top - 8.0, 13.0, "start", *title));
        let mut tick = 0.0;
        while tick <= top_value + 1e-9 {
            shapes.push(line(
                vec![(LEFT, y(tick)), (W - 20.0, y(tick))],
                GRID,
                1.0,
                false,
            ));
            shapes.push(text(
                LEFT - 6.0,
                y(tick) + 4.0,
                10.0,
                "end",
                format!("{tick:.0}"),
            ));
            tick += step;
        }
        let group = (W - LEFT - 20.0) / workloads.len().max(1) as f64;
        let bar = group / (POLICIES.len() as f64 + 1.5);
        for (i, w) in workloads.iter().enumerate() {
            let gx = LEFT + i as f64 * group + bar * 0.75;
            for (p, colour) in POLICY_COLOURS.iter().enumerate() {
                let v = median(w, POLICIES[p], *get);
                shapes.push(Shape::Rect {
                    x: gx + p as f64 * bar,
                    y: y(v),
                    w: bar * 0.9,
                    h: bottom - y(v),
                    fill: *colour,
                });
                shapes.push(text(
                    gx + p as f64 * bar + bar * 0.45,
                    y(v) - 3.0,
                    9.0,
                    "middle",
                    format!("{v:.0}"),
                ));
            }
            shapes.push(text(gx + bar * 1.5, bottom + 16.0, 12.0, "middle", *w));
        }
        shapes.push(line(
            vec![(LEFT, top), (LEFT, bottom), (W - 20.0, bottom)],
            BLACK,
            1.0,
            false,
        ));
    }
    Figure {
        width: W as u32,
        height: (70.0 + 2.0 * (PANEL_H + 60.0)) as u32,
        shapes,
    }
}

/// An RGB image the figures are drawn into for PNG output.
struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: u32, height: u32) -> Canvas {
        let (width, height) = (width as usize, height as usize);
        Canvas {
            width,
            height,
            pixels: vec![0xff; width * height * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, (r, g, b): Rgb) {
        if x < 0 || y < 0 || x as usize >= self.width || y as usize >= self.height {
            return;
        }
        let at = (y as usize * self.width + x as usize) * 3;
        self.pixels[at..at + 3].copy_from_slice(&[r, g, b]);
    }

    fn fill(&mut self, x: f64, y: f64, w: f64, h: f64, colour: Rgb) {
        for py in y.round() as i64..(y + h).round() as i64 {
            for px in x.round() as i64..(x + w).round() as i64 {
                self.set(px, py, colour);
            }
        }
    }

    /// A polyline: squares of the line's width stamped every half pixel along it; dashed
    /// lines draw 5 pixels of every 8.
    fn line(&mut self, points: &[(f64, f64)], colour: Rgb, width: f64, dashed: bool) {
        let half = (width / 2.0).max(0.5);
        let mut along = 0.0;
        for pair in points.windows(2) {
            let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
            let length = ((x1 - x0).powi(2) + (y1 - y0).powi(2)).sqrt();
            let count = (length * 2.0).ceil().max(1.0) as usize;
            for i in 0..=count {
                let t = i as f64 / count as f64;
                if !dashed || (along + t * length) % 8.0 < 5.0 {
                    let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
                    self.fill(x - half, y - half, half * 2.0, half * 2.0, colour);
                }
            }
            along += length;
        }
    }

    /// Text in the 8x8 bitmap font; `y` is the baseline.
    fn text(&mut self, x: f64, y: f64, size: f64, anchor: &str, text: &str) {
        // The 8x8 glyphs are as wide as SVG text of about 14 pixels: doubled only for large text.
        let scale = if size >= 20.0 { 2 } else { 1 };
        let advance = 8 * scale;
        let width = advance * text.chars().count() as i64;
        let left = match anchor {
            "middle" => x as i64 - width / 2,
            "end" => x as i64 - width,
            _ => x as i64,
        };
        let top = y as i64 - 7 * scale;
        for (i, c) in text.chars().enumerate() {
            let glyph = font8x8::legacy::BASIC_LEGACY
                .get(c as usize)
                .copied()
                .unwrap_or([0; 8]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                self.set(
                                    left + i as i64 * advance + col * scale + dx,
                                    top + row as i64 * scale + dy,
                                    BLACK,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The figure as a PNG file (8-bit RGB; text in an 8x8 bitmap font).
pub fn png(figure: &Figure) -> anyhow::Result<Vec<u8>> {
    let mut canvas = Canvas::new(figure.width, figure.height);
    for shape in &figure.shapes {
        match shape {
            Shape::Line {
                points,
                colour,
                width,
                dashed,
            } => canvas.line(points, *colour, *width, *dashed),
            Shape::Rect { x, y, w, h, fill } => canvas.fill(*x, *y, *w, *h, *fill),
            Shape::Text {
                x,
                y,
                size,
                anchor,
                text,
            } => canvas.text(*x, *y, *size, anchor, text),
        }
    }
    let mut bytes = Vec::new();
    let mut encoder = ::png::Encoder::new(&mut bytes, figure.width, figure.height);
    encoder.set_color(::png::ColorType::Rgb);
    encoder.set_depth(::png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&canvas.pixels)?;
    writer.finish()?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(1000.0, 8.0), 200.0);
        assert_eq!(tick_step(7.0, 4.0), 2.0);
        assert_eq!(tick_step(0.3, 3.0), 0.1);
    }

    #[test]
    fn svg_has_every_shape_escaped() {
        let f = Figure {
            width: 10,
            height: 10,
            shapes: vec![
                text(1.0, 2.0, 10.0, "start", "a<b"),
                line(vec![(0.0, 0.0), (5.0, 5.0)], BLACK, 1.0, true),
                Shape::Rect {
                    x: 1.0,
                    y: 1.0,
                    w: 2.0,
                    h: 2.0,
                    fill: (255, 0, 0),
                },
            ],
        };
        let s = svg(&f);
        assert!(s.contains("a&lt;b"));
        assert!(s.contains("stroke-dasharray"));
        assert!(s.contains("fill=\"#ff0000\""));
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn png_is_drawn_and_decodes_back() {
        let f = Figure {
            width: 40,
            height: 20,
            shapes: vec![
                Shape::Rect {
                    x: 0.0,
                    y: 0.0,
                    w: 10.0,
                    h: 10.0,
                    fill: (255, 0, 0),
                },
                text(12.0, 18.0, 10.0, "start", "A"),
            ],
        };
        let bytes = png(&f).unwrap();
        let decoder = ::png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((info.width, info.height), (40, 20));
        // The rectangle's corner is red, a far corner white, and the glyph drew black.
        assert_eq!(&pixels[0..3], &[255, 0, 0]);
        assert_eq!(&pixels[pixels.len() - 3..], &[255, 255, 255]);
        assert!(pixels.chunks(3).any(|p| p == [0, 0, 0]));
    }
}
