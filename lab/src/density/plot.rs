//! The SVG plots of a density run, drawn with `plotters`' SVG backend. No
//! font files are needed: without a font feature plotters estimates text
//! sizes itself and the SVG names a generic `sans-serif` family that every
//! viewer has.
//!
//! - `host_memory.svg`: host memory used (the `MemAvailable` drop) against
//!   the number of VMs running, one line per strategy, and the floor;
//! - `footprint.svg`: each strategy's per-VM footprint as a stacked bar
//!   (KVM + kernel, VMM process, guest kernel, memmap, workload);
//! - `time_to_ready.svg`: the distribution (empirical CDF) of spawn → ready
//!   per strategy;
//! - `host_memory_over_time.svg`: the `MemAvailable` drop over each run's
//!   time, one line per strategy and reclaim mode, with a marker where each
//!   stage began (ramp, phases, settling, steady, stop), so a phased
//!   workload's peaks and what reclaim gave back show.

use super::output::Report;
use plotters::drawing::DrawingAreaErrorKind;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// What plotters' SVG backend fails with (it writes the file as it draws).
type DrawError = DrawingAreaErrorKind<std::io::Error>;

/// Draws one plot of a report into an SVG file.
type Draw = fn(&Path, &Report) -> Result<(), DrawError>;

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Drawing or writing the SVG file failed.
    #[error("cannot draw {path:?}")]
    Draw {
        path: PathBuf,
        #[source]
        source: DrawError,
    },
}

const SIZE: (u32, u32) = (960, 560);
const FONT: &str = "sans-serif";

/// Colors of the runs (strategy and reclaim mode), in run order.
const SERIES: [RGBColor; 8] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x17, 0xbe, 0xcf),
];
/// Colors of the footprint parts, in [`super::footprint::Breakdown::parts`] order.
const PARTS: [RGBColor; 5] = [
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x1f, 0x77, 0xb4),
];

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

/// Draws the three plots into `dir`.
pub fn all(dir: &Path, report: &Report) -> Result<(), PlotError> {
    let plots: [(&str, Draw); 4] = [
        ("host_memory.svg", host_memory),
        ("footprint.svg", footprint),
        ("time_to_ready.svg", time_to_ready),
        ("host_memory_over_time.svg", host_memory_over_time),
    ];
    for (name, draw) in plots {
        let path = dir.join(name);
        draw(&path, report).map_err(|source| PlotError::Draw { path, source })?;
    }
    Ok(())
}

fn color(i: usize) -> RGBColor {
    SERIES[i % SERIES.len()]
}

fn host_memory(path: &Path, report: &Report) -> Result<(), DrawError> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let lines: Vec<(String, Vec<(f64, f64)>)> = report
        .strategies
        .iter()
        .map(|s| {
            let mut pts = vec![(0.0, 0.0)];
            pts.extend(s.steps.iter().map(|st| (st.sums.vms as f64, st.sums.mem_available_drop as f64 / GIB)));
            (s.label(), pts)
        })
        .collect();
    // The floor, as memory used above the initial baseline.
    let floor_used = (report.initial_mem_available_bytes as f64 - report.settings.floor_bytes as f64) / GIB;
    let x_max = lines.iter().flat_map(|l| l.1.iter().map(|p| p.0)).fold(1.0, f64::max) * 1.05;
    let y_max = lines.iter().flat_map(|l| l.1.iter().map(|p| p.1)).fold(floor_used.max(0.1), f64::max) * 1.08;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Host memory used vs VMs ({} MiB guests)", report.settings.mem_mib), (FONT, 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        ?;
    chart
        .configure_mesh()
        .x_desc("VMs running")
        .y_desc("MemAvailable drop (GiB)")
        .label_style((FONT, 14))
        .draw()
        ?;
    for (i, (name, pts)) in lines.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            ?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().skip(1).map(|&p| Circle::new(p, 3, c.filled())))
            ?;
    }
    if floor_used > 0.0 {
        chart
            .draw_series(LineSeries::new([(0.0, floor_used), (x_max, floor_used)], BLACK.stroke_width(1)))
            ?
            .label(format!("floor ({} MiB left)", report.settings.floor_bytes >> 20))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    }
    finish(&mut chart, &root, SeriesLabelPosition::LowerRight)
}

fn footprint(path: &Path, report: &Report) -> Result<(), DrawError> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let bars: Vec<(String, [(&'static str, f64); 5])> = report
        .strategies
        .iter()
        .filter_map(|s| {
            let b = s.footprint?;
            let n = s.fit.measured;
            Some((format!("{} ({n} VMs)", s.label()), b.parts().map(|(k, v)| (k, v / MIB))))
        })
        .collect();
    let n = bars.len().max(1) as f64;
    // Parts can be slightly negative (noise in a difference); they are
    // drawn as zero, and the total above each bar is the measured one.
    let y_max = bars.iter().map(|b| b.1.iter().map(|p| p.1.max(0.0)).sum::<f64>()).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Per-VM host footprint ({} MiB guests, idle unless a workload is set)", report.settings.mem_mib), (FONT, 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..n, 0.0..y_max)
        ?;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 { names.get(i).cloned().unwrap_or_default() } else { String::new() }
        })
        .y_desc("MiB per VM")
        .label_style((FONT, 14))
        .draw()
        ?;
    for (k, &c) in PARTS.iter().enumerate() {
        let rects: Vec<Rectangle<(f64, f64)>> = bars
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let below: f64 = b.1[..k].iter().map(|p| p.1.max(0.0)).sum();
                let h = b.1[k].1.max(0.0);
                Rectangle::new([(i as f64 + 0.25, below), (i as f64 + 0.75, below + h)], c.filled())
            })
            .collect();
        let label = bars.first().map_or("", |b| b.1[k].0);
        chart
            .draw_series(rects)
            ?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled()));
    }
    let totals = report.strategies.iter().filter_map(|s| s.footprint).enumerate().map(|(i, b)| {
        let top: f64 = b.parts().iter().map(|p| p.1.max(0.0) / MIB).sum();
        Text::new(format!("{:.1} MiB", b.total / MIB), (i as f64 + 0.40, top + y_max * 0.03), (FONT, 16))
    });
    chart.draw_series(totals)?;
    finish(&mut chart, &root, SeriesLabelPosition::UpperRight)
}

fn time_to_ready(path: &Path, report: &Report) -> Result<(), DrawError> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let curves: Vec<(String, Vec<(f64, f64)>)> = report
        .strategies
        .iter()
        .map(|s| {
            let mut ms: Vec<f64> = s.vms.iter().filter_map(|v| v.ready.map(|r| r.spawn_to_ready_ms)).collect();
            ms.sort_by(f64::total_cmp);
            let n = ms.len() as f64;
            let pts = ms.iter().enumerate().map(|(i, &v)| (v, (i + 1) as f64 / n)).collect();
            let label = match s.time_to_ready_ms {
                Some(d) => format!("{}: p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms", s.label(), d.p50, d.p90, d.p99),
                None => s.label(),
            };
            (label, pts)
        })
        .collect();
    let x_max = curves.iter().flat_map(|c| c.1.iter().map(|p| p.0)).fold(1.0, f64::max) * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Time to ready, spawn to guest ready ({} launches in flight)", report.settings.parallel), (FONT, 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..1.02)
        ?;
    chart
        .configure_mesh()
        .x_desc("ms from spawn to ready")
        .y_desc("fraction of VMs ready")
        .label_style((FONT, 14))
        .draw()
        ?;
    for (i, (label, pts)) in curves.iter().enumerate() {
        let c = color(i);
        // A step function: each VM raises the curve at its time.
        let mut steps = vec![(0.0, 0.0)];
        let mut prev = 0.0;
        for &(x, y) in pts {
            steps.push((x, prev));
            steps.push((x, y));
            prev = y;
        }
        chart
            .draw_series(LineSeries::new(steps, c.stroke_width(2)))
            ?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    finish(&mut chart, &root, SeriesLabelPosition::LowerRight)
}

/// The marker of each stage in [`host_memory_over_time`] (the first letter
/// of its name, drawn on the line where the stage began).
fn stage_letter(stage: &str) -> &'static str {
    match stage {
        "ramp" => "R",
        "phases" => "P",
        "settling" => "S",
        "steady" => "M",
        _ => "X",
    }
}

fn host_memory_over_time(path: &Path, report: &Report) -> Result<(), DrawError> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let runs: Vec<_> = report.strategies.iter().chain(&report.peer.strategies).collect();
    let line = |s: &super::output::StrategyRun| -> Vec<(f64, f64)> {
        s.timeline.samples.iter().map(|&(t, drop)| (t, drop as f64 / GIB)).collect()
    };
    let lines: Vec<(String, Vec<(f64, f64)>)> = runs
        .iter()
        .map(|s| (if s.vmm == "vmm" { s.label() } else { format!("{} {}", s.vmm, s.label()) }, line(s)))
        .collect();
    let x_max = lines.iter().flat_map(|l| l.1.iter().map(|p| p.0)).fold(1.0, f64::max) * 1.02;
    let y_min = lines.iter().flat_map(|l| l.1.iter().map(|p| p.1)).fold(0.0, f64::min);
    let y_max = lines.iter().flat_map(|l| l.1.iter().map(|p| p.1)).fold(0.1, f64::max) * 1.1;
    let workload = report.settings.workload_text.as_deref().unwrap_or("no phased workload");
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Host memory over each run ({} MiB guests, {workload})", report.settings.mem_mib), (FONT, 20))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, y_min..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the run's start (R ramp, P phases, S settling, M steady-state measure, X stop)")
        .y_desc("MemAvailable drop (GiB)")
        .label_style((FONT, 14))
        .draw()?;
    for (i, ((name, pts), s)) in lines.iter().zip(&runs).enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        // Each stage's letter on the line, at the sample nearest its start.
        let marks = s.timeline.marks.iter().filter_map(|&(t, stage)| {
            let y = pts.iter().min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs()))?.1;
            Some(Text::new(stage_letter(stage), (t, y), (FONT, 13).into_font().color(&c)))
        });
        chart.draw_series(marks)?;
    }
    finish(&mut chart, &root, SeriesLabelPosition::UpperRight)
}

/// Draws the legend at `position` and writes the SVG out.
fn finish<'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    root: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    position: SeriesLabelPosition,
) -> Result<(), DrawError> {
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        ?;
    root.present()
}
