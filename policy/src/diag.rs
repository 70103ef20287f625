//! Diagnostics: every problem of a policy file, each as
//! `<file>:<line>:<col>: <message>` followed by the source line with the
//! offending text underlined.

use std::fmt;

use sqlparser::tokenizer::{Location, Span};

/// One problem in a source file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong, in words (lowercase, no trailing period).
    pub message: String,
    /// Byte range of the offending text in the source.
    pub range: std::ops::Range<usize>,
}

/// All the problems of one source file, in source order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostics {
    /// The file name the diagnostics are reported against.
    pub file: String,
    /// The file's text.
    pub source: String,
    /// The problems, sorted by position.
    pub items: Vec<Diagnostic>,
}

impl Diagnostics {
    pub(crate) fn new(file: &str, source: &str) -> Self {
        Diagnostics {
            file: file.to_owned(),
            source: source.to_owned(),
            items: Vec::new(),
        }
    }

    /// Adds a problem at a sqlparser span (end inclusive-or-exclusive is
    /// handled: at least one character is underlined).
    pub(crate) fn push(&mut self, span: Span, message: String) {
        let start = self.offset(span.start);
        let mut end = self.offset(span.end).max(start);
        if end == start {
            end = next_char_boundary(&self.source, start);
        }
        self.items.push(Diagnostic {
            line: span.start.line.max(1) as usize,
            column: span.start.column.max(1) as usize,
            message,
            range: start..end,
        });
    }

    /// Byte offset of a 1-based (line, column-in-chars) location.
    pub(crate) fn offset(&self, loc: Location) -> usize {
        let line = loc.line.max(1) as usize;
        let col = loc.column.max(1) as usize;
        let mut off = 0;
        for (i, l) in self.source.split_inclusive('\n').enumerate() {
            if i + 1 == line {
                return off
                    + l.char_indices()
                        .nth(col - 1)
                        .map_or(l.trim_end_matches('\n').len(), |(b, _)| b);
            }
            off += l.len();
        }
        self.source.len()
    }

    pub(crate) fn sort(&mut self) {
        self.items
            .sort_by(|a, b| (a.line, a.column, &a.message).cmp(&(b.line, b.column, &b.message)));
        self.items.dedup();
    }

    /// Whether there are no problems.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Only the `<file>:<line>:<col>: <message>` lines.
    pub fn summary_lines(&self) -> Vec<String> {
        self.items
            .iter()
            .map(|d| format!("{}:{}:{}: {}", self.file, d.line, d.column, d.message))
            .collect()
    }
}

fn next_char_boundary(s: &str, i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    let mut j = i + 1;
    while j < s.len() && !s.is_char_boundary(j) {
        j += 1;
    }
    j
}

impl fmt::Display for Diagnostics {
    /// Each problem: the summary line, then the source line with carets
    /// under the offending text (only its first line when it spans several).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, d) in self.items.iter().enumerate() {
            if k > 0 {
                writeln!(f)?;
            }
            writeln!(f, "{}:{}:{}: {}", self.file, d.line, d.column, d.message)?;
            let line_start = self.source[..d.range.start.min(self.source.len())]
                .rfind('\n')
                .map_or(0, |i| i + 1);
            let line_end = self.source[line_start..]
                .find('\n')
                .map_or(self.source.len(), |i| line_start + i);
            let text = &self.source[line_start..line_end];
            let pad = self.source[line_start..d.range.start.min(line_end)]
                .chars()
                .count();
            let width = self.source[d.range.start.min(line_end)..d.range.end.min(line_end)]
                .chars()
                .count()
                .max(1);
            let num = d.line.to_string();
            let gutter = " ".repeat(num.len());
            writeln!(f, "{gutter} |")?;
            writeln!(f, "{num} | {text}")?;
            write!(f, "{gutter} | {}{}", " ".repeat(pad), "^".repeat(width))?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}
