//! How long something took, written as the dashboard and Slack show it. Pure text from a
//! number of milliseconds: no clock, no I/O, so every view of a duration reads the same.

/// `850 ms`, `12.3 s`, `2 min 5 s`. A negative span (the clock stepped back between start
/// and end) reads `0 ms` rather than a time that never passed.
pub fn human(ms: i64) -> String {
    match ms {
        ..=0 => "0 ms".into(),
        1..=999 => format!("{ms} ms"),
        1000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_picks_its_unit() {
        assert_eq!(human(0), "0 ms");
        assert_eq!(human(-5), "0 ms");
        assert_eq!(human(850), "850 ms");
        assert_eq!(human(1_000), "1.0 s");
        assert_eq!(human(12_345), "12.3 s");
        assert_eq!(human(59_999), "60.0 s");
        assert_eq!(human(60_000), "1 min 0 s");
        assert_eq!(human(125_000), "2 min 5 s");
    }
}
