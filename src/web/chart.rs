//! The traffic chart of a deployment page, drawn on the server as SVG so a page without
//! JavaScript shows it too: requests per second of each version around the switch (a line
//! each), their errors (5xx and upstream errors) in red below, and the switch as a dashed
//! line. Pure: data in, markup out; every text in it is escaped.

use std::fmt::Write;

use crate::metrics::TrafficChart;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 180.0;
const LEFT: f64 = 40.0;
const BOTTOM: f64 = 20.0;
const TOP: f64 = 24.0;
/// One colour per line, in order (the old version first, as it came first).
const COLOURS: [&str; 4] = ["#0969da", "#8250df", "#1a7f37", "#9a6700"];
const ERRORS: &str = "#cf222e";

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The chart as an `<svg>` element; `None` when there is nothing to draw.
pub fn svg(chart: &TrafficChart) -> Option<String> {
    let points = chart.lines.iter().flat_map(|l| l.points.iter());
    let (from, to) = points
        .clone()
        .fold((i64::MAX, i64::MIN), |(lo, hi), (at, ..)| {
            (lo.min(*at), hi.max(*at))
        });
    if from > to {
        return None;
    }
    let peak = points
        .map(|(_, ok, bad)| ok + bad)
        .max()
        .unwrap_or(0)
        .max(1);
    let span = (to - from).max(1) as f64;
    let x = |at: i64| LEFT + (at - from) as f64 / span * (WIDTH - LEFT - 8.0);
    let y = |n: u64| HEIGHT - BOTTOM - n as f64 / peak as f64 * (HEIGHT - BOTTOM - TOP);
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="requests per second of each version around the switch" data-traffic-chart>"#
    );
    let _ = write!(
        out,
        r##"<line x1="{LEFT}" y1="{b}" x2="{WIDTH}" y2="{b}" stroke="#d0d7de"/><text x="4" y="{t}" font-size="10" fill="#57606a">{peak}/s</text><text x="4" y="{b}" font-size="10" fill="#57606a">0</text>"##,
        b = HEIGHT - BOTTOM,
        t = TOP + 4.0,
    );
    if (from..=to).contains(&chart.switch_at) {
        let at = x(chart.switch_at);
        let _ = write!(
            out,
            r##"<line x1="{at:.1}" y1="{TOP}" x2="{at:.1}" y2="{b}" stroke="#57606a" stroke-dasharray="4 3"/><text x="{at:.1}" y="{ty}" font-size="10" fill="#57606a" text-anchor="middle">switch</text>"##,
            b = HEIGHT - BOTTOM,
            ty = HEIGHT - 6.0,
        );
    }
    for (index, line) in chart.lines.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let path = |value: fn(&(i64, u64, u64)) -> u64| -> String {
            line.points
                .iter()
                .map(|p| format!("{:.1},{:.1}", x(p.0), y(value(p))))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = write!(
            out,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}" data-version="{}"/>"#,
            path(|p| p.1 + p.2),
            escape(&line.version)
        );
        // One second of traffic is a dot, not a line.
        if let [(at, ok, bad)] = line.points[..] {
            let _ = write!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/><circle cx="{:.1}" cy="{:.1}" r="3" fill="{ERRORS}"/>"#,
                x(at),
                y(ok + bad),
                x(at),
                y(bad)
            );
        }
        if line.points.iter().any(|p| p.2 > 0) {
            let _ = write!(
                out,
                r#"<polyline fill="none" stroke="{ERRORS}" stroke-width="1.5" points="{}" data-errors="{}"/>"#,
                path(|p| p.2),
                escape(&line.version)
            );
        }
        let _ = write!(
            out,
            r#"<text x="{lx:.1}" y="12" font-size="11" fill="{colour}">■ {} on {}</text>"#,
            escape(&line.version),
            line.port,
            lx = LEFT + index as f64 * 260.0,
        );
    }
    let _ = write!(
        out,
        r#"<text x="{ex}" y="12" font-size="11" fill="{ERRORS}" text-anchor="end">■ errors</text></svg>"#,
        ex = WIDTH - 4.0
    );
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ChartLine;

    #[test]
    fn each_version_gets_a_line_its_errors_a_red_one_and_text_is_escaped() {
        let chart = TrafficChart {
            switch_at: 102,
            lines: vec![
                ChartLine {
                    port: 8081,
                    version: "v1".into(),
                    points: vec![(100, 50, 0), (101, 48, 0), (102, 10, 0)],
                },
                ChartLine {
                    port: 8082,
                    version: "v2<b>".into(),
                    points: vec![(102, 30, 15), (103, 31, 16)],
                },
            ],
        };

        let drawn = svg(&chart).unwrap();

        assert!(
            drawn.starts_with("<svg") && drawn.ends_with("</svg>"),
            "{drawn}"
        );
        assert_eq!(drawn.matches("<polyline").count(), 3, "{drawn}");
        assert!(drawn.contains(r#"data-errors="v2&lt;b&gt;""#), "{drawn}");
        assert!(!drawn.contains("<b>"), "{drawn}");
        assert!(drawn.contains(">switch</text>"), "{drawn}");
        assert!(drawn.contains("50/s"), "the peak labels the scale: {drawn}");
        assert_eq!(svg(&TrafficChart::default()), None);
    }
}
