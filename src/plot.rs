//! `loss.png`: train and validation loss against step, redrawn at each evaluation.
//!
//! Text needs a TrueType font: tern uses `$TERN_FONT` or the first of a few common system fonts
//! (DejaVu, Liberation, Noto). Without one the curves are drawn with no labels and no grid, and
//! a warning is logged once (no font is bundled).

use crate::error::{Error, Result};
use plotters::coord::types::{RangedCoordf64, RangedCoordusize};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const FONT_PATHS: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a system font for plotters once; false when none is available.
fn font_available() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        let candidates = std::env::var("TERN_FONT")
            .into_iter()
            .chain(FONT_PATHS.iter().map(|s| s.to_string()));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        tracing::warn!(
            "no TrueType font found (set TERN_FONT=path.ttf): loss.png is drawn without labels"
        );
        false
    })
}

/// The chart both plots draw on: step on x, loss on y.
type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordusize, RangedCoordf64>>;

/// What a plot looks like around its curves.
struct Frame<'s> {
    size: (u32, u32),
    title: &'s str,
    y_desc: &'s str,
}

/// Keeps the finite points of a curve (a diverged run's NaN/inf would break the axes).
fn finite(v: &[(usize, f64)]) -> Vec<(usize, f64)> {
    v.iter().copied().filter(|p| p.1.is_finite()).collect()
}

/// Draws `frame` (caption, axes, mesh), lets `series` add the curves (it is told whether text,
/// and so labels, can be drawn), adds the legend and writes the PNG to `path` atomically. The axes
/// cover `points`; `Ok(false)` when there are none and nothing was written.
fn draw<'p>(
    path: &Path,
    frame: Frame,
    points: impl Iterator<Item = &'p (usize, f64)> + Clone,
    series: impl FnOnce(&mut Chart, bool) -> std::result::Result<(), String>,
) -> Result<bool> {
    draw_with_text(path, frame, points, series, font_available())
}

/// [`draw`], told whether text can be drawn (`text`: a font is registered).
fn draw_with_text<'p>(
    path: &Path,
    frame: Frame,
    points: impl Iterator<Item = &'p (usize, f64)> + Clone,
    series: impl FnOnce(&mut Chart, bool) -> std::result::Result<(), String>,
    text: bool,
) -> Result<bool> {
    let max_step = points.clone().map(|p| p.0).max().unwrap_or(1).max(1);
    let (lo, hi) = points.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), p| {
        (l.min(p.1), h.max(p.1))
    });
    if !lo.is_finite() {
        return Ok(false);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let tmp = path.with_extension("png.tmp.png");
    {
        let root = BitMapBackend::new(&tmp, frame.size).into_drawing_area();
        let e = |x: String| Error::Msg(format!("drawing {}: {x}", path.display()));
        root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .margin(20)
            .x_label_area_size(if text { 40 } else { 5 })
            .y_label_area_size(if text { 60 } else { 5 });
        if text {
            builder.caption(frame.title, ("sans-serif", 22));
        }
        let mut chart = builder
            .build_cartesian_2d(0usize..max_step, (lo - pad)..(hi + pad))
            .map_err(|x| e(x.to_string()))?;
        // No font: no mesh at all. Its grid comes from the axis labels, and asking plotters for
        // zero labels sends its integer key-point search into an endless loop (a hang of `tern
        // train` at its first evaluation on a machine with no fonts).
        if text {
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc(frame.y_desc)
                .draw()
                .map_err(|x| e(x.to_string()))?;
        }
        series(&mut chart, text).map_err(e)?;
        if text {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|x| e(x.to_string()))?;
        }
        root.present().map_err(|x| e(x.to_string()))?;
    }
    std::fs::rename(&tmp, path).map_err(|x| Error::io(path, x))?;
    Ok(true)
}

/// Draws train (every step) and validation losses to `path` (PNG), atomically; nothing when
/// there is no finite point yet.
pub fn plot_losses(path: &Path, train: &[(usize, f64)], val: &[(usize, f64)]) -> Result<()> {
    let (train, val) = (finite(train), finite(val));
    let frame = Frame {
        size: (900, 540),
        title: "tern: loss",
        y_desc: "cross-entropy (nats)",
    };
    draw(
        path,
        frame,
        train.iter().chain(val.iter()),
        |chart, text| {
            let train_series = chart
                .draw_series(LineSeries::new(train.iter().copied(), &BLUE))
                .map_err(|x| x.to_string())?;
            if text {
                train_series
                    .label("train")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
            }
            chart
                .draw_series(
                    val.iter()
                        .map(|&(x, y)| Circle::new((x, y), 4, RED.filled())),
                )
                .map_err(|x| x.to_string())?;
            let val_series = chart
                .draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)))
                .map_err(|x| x.to_string())?;
            if text {
                val_series
                    .label("validation")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
            }
            Ok(())
        },
    )?;
    Ok(())
}

/// Draws several named curves (e.g. the validation loss of each ablation run) to `path` (PNG),
/// atomically; one color per curve.
pub fn plot_curves(path: &Path, title: &str, curves: &[(String, Vec<(usize, f64)>)]) -> Result<()> {
    let curves: Vec<(&String, Vec<(usize, f64)>)> =
        curves.iter().map(|(n, v)| (n, finite(v))).collect();
    let frame = Frame {
        size: (1000, 620),
        title,
        y_desc: "validation cross-entropy (nats)",
    };
    let drawn = draw(
        path,
        frame,
        curves.iter().flat_map(|c| c.1.iter()),
        |chart, text| {
            for (i, (name, pts)) in curves.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                let s = chart
                    .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                    .map_err(|x| x.to_string())?;
                if text {
                    s.label(name.as_str()).legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                }
            }
            Ok(())
        },
    )?;
    if !drawn {
        return Err(Error::Msg("plot: no finite points to draw".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a font (GPU machines, containers) the chart is drawn with no text at all. Asking
    /// plotters for zero axis labels instead made its integer key-point search loop forever:
    /// `tern train` hung at its first evaluation on an H200 machine that has no fonts.
    #[test]
    fn a_chart_without_a_font_is_drawn_and_returns() {
        let dir = std::env::temp_dir().join(format!("tern-plot-nofont-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("loss.png");
        let done = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            // One validation point (step 0), then a few: the two shapes a run draws first.
            for points in [
                vec![(0usize, 12.1f64)],
                vec![(0, 12.1), (1, 11.0), (10, 7.5)],
            ] {
                let frame = Frame {
                    size: (300, 200),
                    title: "t",
                    y_desc: "y",
                };
                let drawn = draw_with_text(
                    &p,
                    frame,
                    points.iter(),
                    |chart, text| {
                        assert!(!text);
                        chart
                            .draw_series(LineSeries::new(points.iter().copied(), &BLUE))
                            .map(|_| ())
                            .map_err(|x| x.to_string())
                    },
                    false,
                );
                assert!(drawn.unwrap());
            }
            let _ = done.0.send(());
        });
        done.1
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("drawing without a font did not return within 60 s");
        assert!(std::fs::metadata(&path).unwrap().len() > 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
