//! Trend charts as inline SVG, drawn on the server from a series of `(time, value)` points: no
//! script, no image requests. A series longer than [`MAX_POINTS`] is bucketed (each bucket keeps
//! its highest value, so a spike or a rising counter is never averaged away), which bounds what one
//! chart costs whatever the history holds.

use maud::{html, Markup};

use shoal_controller_core::time::rfc3339_ms;

/// The most points one chart draws.
pub const MAX_POINTS: usize = 240;

/// `points` (time in Unix ms, value; oldest first) reduced to at most `max` points: consecutive
/// buckets of equal count, each drawn at its last time with its highest value.
pub fn downsample(points: &[(u64, f64)], max: usize) -> Vec<(u64, f64)> {
    let max = max.max(2);
    if points.len() <= max {
        return points.to_vec();
    }
    let per = points.len().div_ceil(max);
    points
        .chunks(per)
        .filter_map(|c| {
            let last = c.last()?;
            let peak = c.iter().map(|p| p.1).fold(f64::MIN, f64::max);
            Some((last.0, peak))
        })
        .collect()
}

/// The value range a chart shows: the data's, widened so a flat series sits mid-chart and a
/// rising one does not touch the frame; whole numbers for whole-number data (counters), and never
/// below zero for data that is not.
fn y_range(points: &[(u64, f64)]) -> (f64, f64) {
    let lo = points.iter().map(|p| p.1).fold(f64::MAX, f64::min);
    let hi = points.iter().map(|p| p.1).fold(f64::MIN, f64::max);
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    let pad = if (hi - lo).abs() < f64::EPSILON {
        1.0
    } else {
        (hi - lo) * 0.1
    };
    let (mut bottom, mut top) = (lo - pad, hi + pad);
    if points.iter().all(|p| p.1.fract() == 0.0) {
        (bottom, top) = (bottom.floor(), top.ceil());
    }
    if lo >= 0.0 {
        bottom = bottom.max(0.0);
    }
    (bottom, top)
}

/// A time as the axis shows it (UTC): `HH:MM:SS` on a chart spanning less than a day, else
/// `MM-DD HH:MM`.
fn axis_time(ms: u64, span_ms: u64) -> String {
    let t = rfc3339_ms(ms);
    let parts = if span_ms < 86_400_000 {
        t.get(11..19).map(str::to_owned)
    } else {
        t.get(5..10)
            .zip(t.get(11..16))
            .map(|(d, c)| format!("{d} {c}"))
    };
    parts.unwrap_or(t)
}

/// A number as an axis or tooltip shows it: integers without decimals.
fn number(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        format!("{v:.1}")
    }
}

/// SVG path data for `points` scaled into the box `(x0, y0, w, h)`.
fn path(points: &[(u64, f64)], x0: f64, y0: f64, w: f64, h: f64) -> String {
    let (lo, hi) = y_range(points);
    let t0 = points.first().map(|p| p.0).unwrap_or(0);
    let t1 = points.last().map(|p| p.0).unwrap_or(0);
    let span = t1.saturating_sub(t0).max(1) as f64;
    let mut d = String::new();
    for (i, (t, v)) in points.iter().enumerate() {
        let x = if points.len() == 1 {
            x0 + w / 2.0
        } else {
            x0 + (t.saturating_sub(t0) as f64 / span) * w
        };
        let y = y0 + h - ((v - lo) / (hi - lo)) * h;
        d.push_str(&format!("{}{x:.1},{y:.1}", if i == 0 { "M" } else { " L" }));
    }
    d
}

/// A line chart with a title, the latest value, the range's extremes and its time span.
/// `class` picks the line's colour from the stylesheet (`ok`, `warn`, `bad`, `info`).
pub fn line_chart(title: &str, unit: &str, points: &[(u64, f64)], class: &str) -> Markup {
    let points = downsample(points, MAX_POINTS);
    let (w, h) = (560.0, 160.0);
    let (left, top, right, bottom) = (44.0, 10.0, 10.0, 22.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let (lo, hi) = y_range(&points);
    let latest = points.last().map(|p| number(p.1)).unwrap_or_default();
    html! {
        figure.chart {
            figcaption {
                span.chart-title { (title) }
                @if !points.is_empty() {
                    span.chart-latest { (latest) " " (unit) }
                }
            }
            @if points.is_empty() {
                p.muted { "no samples yet" }
            } @else {
                svg viewBox=(format!("0 0 {w} {h}")) role="img"
                    aria-label=(format!("{title}: {} samples, latest {latest} {unit}", points.len())) {
                    @for frac in [0.0, 0.5, 1.0] {
                        @let y = top + ph * frac;
                        line.grid x1=(left) x2=(w - right) y1=(y) y2=(y) {}
                        text.axis x=(left - 6.0) y=(y + 4.0) text-anchor="end" {
                            (number(hi - (hi - lo) * frac))
                        }
                    }
                    path class=(format!("line {class}")) d=(path(&points, left, top, pw, ph)) {}
                    @if let (Some(first), Some(last)) = (points.first(), points.last()) {
                        @let span = last.0.saturating_sub(first.0);
                        text.axis x=(left) y=(h - 6.0) { (axis_time(first.0, span)) }
                        text.axis x=(w - right) y=(h - 6.0) text-anchor="end" { (axis_time(last.0, span)) }
                    }
                }
            }
        }
    }
}

/// A small chart without axes, for a table cell.
pub fn sparkline(points: &[(u64, f64)], class: &str) -> Markup {
    let points = downsample(points, 60);
    html! {
        @if points.len() > 1 {
            svg.spark viewBox="0 0 120 24" role="img"
                aria-label=(format!("{} samples", points.len())) {
                path class=(format!("line {class}")) d=(path(&points, 1.0, 2.0, 118.0, 20.0)) {}
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn long_series_are_bounded_and_keep_their_peaks() {
        let mut points: Vec<(u64, f64)> = (0..2016).map(|i| (i * 300_000, 30.0)).collect();
        points[1000].1 = 71.0;
        let d = downsample(&points, MAX_POINTS);
        assert!(d.len() <= MAX_POINTS, "{}", d.len());
        assert!(d.iter().any(|p| p.1 == 71.0), "the spike survives");
        assert_eq!(d.last().unwrap().0, points.last().unwrap().0);
        let short = &points[..10];
        assert_eq!(downsample(short, MAX_POINTS), short);
    }

    #[test]
    fn a_chart_scales_into_its_box_and_escapes_its_text() {
        let points = [(0, 0.0), (1_000, 5.0), (2_000, 10.0)];
        let d = path(&points, 0.0, 0.0, 100.0, 100.0);
        // Whole numbers: the range is 0 (not below, the data is not) to 11 (10 + 10 %, rounded up).
        assert_eq!(d, "M0.0,100.0 L50.0,54.5 L100.0,9.1");
        let d = path(&[(0, -2.5), (10, 2.5)], 0.0, 0.0, 100.0, 100.0);
        assert_eq!(
            d, "M0.0,91.7 L100.0,8.3",
            "10 % padding, below zero allowed"
        );
        assert_eq!(axis_time(90_061_000, 60_000), "01:01:01");
        assert_eq!(axis_time(90_061_000, 86_400_000), "01-02 01:01");
        let svg = line_chart("<b>temp</b>", "°C", &points, "info").into_string();
        assert!(svg.contains("&lt;b&gt;temp&lt;/b&gt;"), "{svg}");
        assert!(!svg.contains("<b>"), "{svg}");
        assert!(svg.contains("10 °C"), "latest value: {svg}");
        let flat = path(&[(0, 3.0), (10, 3.0)], 0.0, 0.0, 100.0, 100.0);
        let zero = path(&[(0, 0.0), (10, 0.0)], 0.0, 0.0, 100.0, 100.0);
        assert_eq!(
            zero, "M0.0,100.0 L100.0,100.0",
            "a counter at 0 sits on the axis"
        );
        assert_eq!(
            flat, "M0.0,50.0 L100.0,50.0",
            "a flat series sits mid-chart"
        );
        assert!(line_chart("x", "", &[], "ok")
            .into_string()
            .contains("no samples yet"));
    }
}
