//! Version stamps: `1.0.1-SNAPSHOT-{timestamp}` and friends. Pure functions, no I/O.
//!
//! `{timestamp}` is UTC `yyyyMMddHHmmss`. Versions of one app must be unique and sort in the
//! order they were made, so when the clock has not moved past the previous stamp's second
//! (two pushes in one second, or a clock step back) the stamp takes the next second instead.

use chrono::{DateTime, Duration, Utc};

/// The stamp time to use now, given the previous one of the same app.
pub fn next_stamp_time(now: DateTime<Utc>, previous: Option<DateTime<Utc>>) -> DateTime<Utc> {
    let now = truncate_to_second(now);
    match previous {
        Some(previous) if truncate_to_second(previous) >= now => {
            truncate_to_second(previous) + Duration::seconds(1)
        }
        _ => now,
    }
}

/// The placeholders a pattern may hold.
pub const PLACEHOLDERS: [&str; 3] = ["{timestamp}", "{sha}", "{branch}"];

/// Whether `c` may be in a version: a version names folders (`releases/<version>`) and
/// objects, so nothing that could make it a path (`/`) or need quoting.
pub fn is_version_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Whether every version `pattern` renders is made of `is_version_char`s only: its own text
/// is, and its placeholders are the known ones (which `render` fills with such characters).
/// With `{timestamp}` in it, a version is never `.` or `..` either.
pub fn is_safe_pattern(pattern: &str) -> bool {
    PLACEHOLDERS
        .iter()
        .fold(pattern.to_owned(), |text, placeholder| {
            text.replace(placeholder, "")
        })
        .chars()
        .all(is_version_char)
}

/// Fills `{timestamp}`, `{sha}` (7 chars) and `{branch}` into `pattern`. In the values,
/// every character that is not an `is_version_char` becomes `-`: a branch `feature/x` gives
/// `feature-x`, never a path separator.
pub fn render(pattern: &str, at: DateTime<Utc>, sha: &str, branch: &str) -> String {
    let safe = |text: &str| text.replace(|c: char| !is_version_char(c), "-");
    let short_sha = safe(sha.get(..7).unwrap_or(sha));
    pattern
        .replace("{timestamp}", &at.format("%Y%m%d%H%M%S").to_string())
        .replace("{sha}", &short_sha)
        .replace("{branch}", &safe(branch))
}

fn truncate_to_second(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(at.timestamp(), 0).expect("a whole second of a valid time is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn renders_the_classic_snapshot_version() {
        let version = render(
            "1.0.1-SNAPSHOT-{timestamp}",
            at("2026-11-05T09:03:07.5Z"),
            "0123456789abcdef0123456789abcdef01234567",
            "main",
        );
        assert_eq!(version, "1.0.1-SNAPSHOT-20261105090307");
    }

    #[test]
    fn fills_sha_and_a_path_safe_branch() {
        let version = render(
            "{branch}-{timestamp}-{sha}",
            at("2026-01-02T03:04:05Z"),
            "abcdef0123",
            "feat/x",
        );
        assert_eq!(version, "feat-x-20260102030405-abcdef0");
    }

    #[test]
    fn only_patterns_of_version_characters_and_known_placeholders_are_safe() {
        for safe in ["1.0.1-SNAPSHOT-{timestamp}", "{branch}_{timestamp}.{sha}"] {
            assert!(is_safe_pattern(safe), "{safe}");
        }
        for unsafe_ in [
            "../{timestamp}",
            "a/{timestamp}",
            "{timestamp} x",
            "{timestamp}-{user}",
            "{timestamp};rm",
        ] {
            assert!(!is_safe_pattern(unsafe_), "{unsafe_}");
        }
    }

    #[test]
    fn hostile_branches_and_shas_render_as_version_characters_only() {
        for (branch, sha) in [
            ("../../etc", "../../x"),
            ("a/b c;$(id)", "ab/cdef0"),
            ("..", ".."),
        ] {
            let version = render(
                "{branch}-{timestamp}-{sha}",
                at("2026-01-02T03:04:05Z"),
                sha,
                branch,
            );
            assert!(version.chars().all(is_version_char), "{version}");
            assert!(!version.contains('/'), "{version}");
        }
    }

    #[test]
    fn two_stamps_in_one_second_are_distinct_and_sorted() {
        let now = at("2026-11-25T14:00:00.100Z");
        let first = next_stamp_time(now, None);
        let second = next_stamp_time(now + Duration::milliseconds(300), Some(first));
        let third = next_stamp_time(now, Some(second));
        let versions: Vec<_> = [first, second, third]
            .iter()
            .map(|t| render("1.0.1-SNAPSHOT-{timestamp}", *t, "", "main"))
            .collect();
        assert_eq!(
            versions,
            [
                "1.0.1-SNAPSHOT-20261125140000",
                "1.0.1-SNAPSHOT-20261125140001",
                "1.0.1-SNAPSHOT-20261125140002"
            ]
        );
    }

    #[test]
    fn a_later_clock_is_used_as_is() {
        let previous = at("2026-11-25T14:00:00Z");
        assert_eq!(
            next_stamp_time(at("2026-11-25T14:05:00.9Z"), Some(previous)),
            at("2026-11-25T14:05:00Z")
        );
    }
}
