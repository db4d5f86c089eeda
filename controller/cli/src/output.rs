//! How shoalctl prints, in one place: `-o table|wide|json` and `--no-headers` (global flags, so
//! every command takes them), aligned tables, relative ages, and the JSON of what a command read
//! or changed.
//!
//! A command hands [`Out::show`] the object the API returned and the lines it prints for a person;
//! with `-o json` the object is printed instead, so a mutating command's JSON is the created or
//! changed object as the API sent it. Tables go through [`Out::table`], which drops the wide-only
//! columns unless `-o wide`, and the header under `--no-headers`.

use std::time::{Duration, SystemTime};

use clap::ValueEnum;
use serde::Serialize;

use crate::printable::printable;

/// `-o`: the output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Format {
    /// Aligned columns or sentences, for a person.
    #[default]
    Table,
    /// Tables with more columns (full timestamps, keys, ids).
    Wide,
    /// The API's JSON: the listed, created or changed object(s).
    Json,
}

/// The global output flags.
#[derive(Debug, Clone, clap::Args)]
pub struct OutputArgs {
    /// Output format: table, wide (tables with more columns) or json.
    #[arg(short, long, value_enum, default_value_t, global = true)]
    pub output: Format,
    /// Print tables without their header line.
    #[arg(long, global = true)]
    pub no_headers: bool,
}

/// Where a command's output goes and in which form.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    /// The format.
    pub format: Format,
    /// Tables without their header.
    pub no_headers: bool,
    /// "Now" for ages, taken once so every row of a table is aged from the same instant.
    now: SystemTime,
}

impl Out {
    /// The output the flags ask for.
    pub fn new(args: &OutputArgs) -> Out {
        Out {
            format: args.output,
            no_headers: args.no_headers,
            now: SystemTime::now(),
        }
    }

    /// Whether `-o json`.
    pub fn is_json(&self) -> bool {
        self.format == Format::Json
    }

    /// `value` as JSON with `-o json`, else whatever `text` prints.
    pub fn show<T: Serialize + ?Sized>(
        &self,
        value: &T,
        text: impl FnOnce(),
    ) -> anyhow::Result<()> {
        if self.is_json() {
            print_json(value)
        } else {
            text();
            Ok(())
        }
    }

    /// Aligned columns. Every cell goes through [`printable`] before widths are taken.
    pub fn table(&self, header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
        self.table_wide(header, &[], rows);
    }

    /// Aligned columns whose rows hold `header` cells then `wide` cells; the `wide` columns are
    /// printed only with `-o wide`.
    pub fn table_wide(
        &self,
        header: &[&str],
        wide: &[&str],
        rows: impl Iterator<Item = Vec<String>>,
    ) {
        let n = if self.format == Format::Wide {
            header.len() + wide.len()
        } else {
            header.len()
        };
        let header: Vec<&str> = header.iter().chain(wide).take(n).copied().collect();
        let rows: Vec<Vec<String>> = rows
            .map(|row| {
                row.iter()
                    .take(n)
                    .map(|c| printable(c).into_owned())
                    .collect()
            })
            .collect();
        for line in render(&header, &rows, !self.no_headers) {
            println!("{line}");
        }
    }

    /// How long ago an RFC 3339 time was, as kubectl says it (`45s`, `3m`, `2h`, `5d`); a future
    /// time is `in 3m`. Text that is not a time is returned as it is.
    pub fn age(&self, rfc3339: &str) -> String {
        let Ok(t) = humantime::parse_rfc3339_weak(rfc3339) else {
            return rfc3339.to_owned();
        };
        match self.now.duration_since(t) {
            Ok(ago) => human_duration(ago),
            Err(e) => format!("in {}", human_duration(e.duration())),
        }
    }

    /// [`Out::age`] of an optional time, `none` when absent.
    pub fn age_or(&self, rfc3339: Option<&str>, none: &str) -> String {
        rfc3339
            .map(|t| self.age(t))
            .unwrap_or_else(|| none.to_owned())
    }
}

/// JSON as the API sent it: agent-supplied text stays faithful (C0 controls come out as `\u001b`).
pub fn print_json<T: Serialize + ?Sized>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// The lines of a table: columns padded to their widest cell, two spaces apart, the last one
/// unpadded.
fn render(header: &[&str], rows: &[Vec<String>], with_header: bool) -> Vec<String> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let pad = w.saturating_sub(cell.chars().count());
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.trim_end().to_owned()
    };
    let mut lines = Vec::with_capacity(rows.len() + 1);
    if with_header {
        let h: Vec<String> = header.iter().map(|h| h.to_string()).collect();
        lines.push(line(&h));
    }
    lines.extend(rows.iter().map(|r| line(r)));
    lines
}

/// kubectl's `HumanDuration`: exact when short, coarser as it grows (`59s`, `2m30s`, `12m`,
/// `5h20m`, `20h`, `3d4h`, `45d`, `2y30d`, `8y`).
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (m, h, day, year) = (60, 3600, 86_400, 365 * 86_400);
    if s < 2 * m {
        format!("{s}s")
    } else if s < 10 * m {
        match s % m {
            0 => format!("{}m", s / m),
            r => format!("{}m{r}s", s / m),
        }
    } else if s < 3 * h {
        format!("{}m", s / m)
    } else if s < 8 * h {
        match (s % h) / m {
            0 => format!("{}h", s / h),
            r => format!("{}h{r}m", s / h),
        }
    } else if s < 2 * day {
        format!("{}h", s / h)
    } else if s < 8 * day {
        match (s % day) / h {
            0 => format!("{}d", s / day),
            r => format!("{}d{r}h", s / day),
        }
    } else if s < 2 * year {
        format!("{}d", s / day)
    } else if s < 8 * year {
        match (s % year) / day {
            0 => format!("{}y", s / year),
            r => format!("{}y{r}d", s / year),
        }
    } else {
        format!("{}y", s / year)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectl() {
        let cases = [
            (0, "0s"),
            (59, "59s"),
            (119, "119s"),
            (120, "2m"),
            (150, "2m30s"),
            (600, "10m"),
            (3 * 3600 - 1, "179m"),
            (3 * 3600, "3h"),
            (5 * 3600 + 20 * 60, "5h20m"),
            (20 * 3600, "20h"),
            (3 * 86_400 + 4 * 3600, "3d4h"),
            (5 * 86_400, "5d"),
            (45 * 86_400, "45d"),
            (2 * 365 * 86_400 + 30 * 86_400, "2y30d"),
            (9 * 365 * 86_400, "9y"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(Duration::from_secs(secs)), want, "{secs}s");
        }
    }

    #[test]
    fn ages_are_taken_from_one_now_and_future_times_say_in() {
        let out = Out {
            format: Format::Table,
            no_headers: false,
            now: humantime::parse_rfc3339("2026-03-01T12:00:00Z").unwrap(),
        };
        assert_eq!(out.age("2026-03-01T11:57:00Z"), "3m");
        assert_eq!(out.age("2026-03-01T10:00:00.123Z"), "119m");
        assert_eq!(out.age("2026-02-24T12:00:00Z"), "5d");
        assert_eq!(out.age("2026-03-01T14:00:00Z"), "in 120m");
        assert_eq!(out.age("never"), "never");
        assert_eq!(out.age_or(None, "-"), "-");
    }

    #[test]
    fn tables_align_drop_the_header_on_request_and_end_without_padding() {
        let rows = vec![
            vec!["a".to_owned(), "long cell".to_owned(), "x".to_owned()],
            vec!["bbbb".to_owned(), "c".to_owned(), "".to_owned()],
        ];
        assert_eq!(
            render(&["ID", "NAME", "LAST"], &rows, true),
            ["ID    NAME       LAST", "a     long cell  x", "bbbb  c"]
        );
        assert_eq!(
            render(&["ID", "NAME", "LAST"], &rows, false),
            ["a     long cell  x", "bbbb  c"]
        );
    }
}
