//! Configuration errors that point at the file, line and field to fix.

use std::{fmt, path::PathBuf};

/// A configuration file that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The field's path in the document, e.g. `pods[2].netns`, when known.
    pub field: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            line: None,
            column: None,
            field: None,
            message: message.into(),
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn with_line(mut self, line: Option<usize>) -> Self {
        self.line = line;
        self
    }

    /// Turns a serde_yaml error into one that names file, line, column and field.
    pub fn from_yaml(file: impl Into<PathBuf>, err: &serde_yaml::Error) -> Self {
        let mut message = err.to_string();
        let (line, column) = match err.location() {
            Some(loc) => (Some(loc.line()), Some(loc.column())),
            None => (None, None),
        };
        // serde_yaml appends " at line L column C" which we show in front instead.
        if let Some(pos) = message.rfind(" at line ") {
            message.truncate(pos);
        }
        // serde_yaml prefixes the field path ("pods[0].nmae: unknown field ...").
        let mut field = None;
        if let Some((path, rest)) = message.split_once(": ")
            && !path.contains(' ')
            && !path.is_empty()
        {
            field = Some(path.to_string());
            message = rest.to_string();
        }
        Self {
            file: file.into(),
            line,
            column,
            field,
            message,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": ")?;
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Best-effort line of `key: value` in a YAML text, for errors found after parsing
/// (serde_yaml keeps no positions for values). Returns None if not exactly one match.
pub fn find_line(text: &str, key: &str, value: &str) -> Option<usize> {
    find_line_where(text, key, |v| v == value)
}

/// The 1-based line where `key` appears once, whatever its value.
pub fn find_key_line(text: &str, key: &str) -> Option<usize> {
    find_line_where(text, key, |_| true)
}

fn find_line_where(text: &str, key: &str, value: impl Fn(&str) -> bool) -> Option<usize> {
    let mut hits = text.lines().enumerate().filter(|(_, line)| {
        let line = line.trim_start().trim_start_matches("- ");
        line.strip_prefix(key)
            .and_then(|rest| rest.trim_start().strip_prefix(':'))
            .is_some_and(|v| value(v.trim().trim_matches(|c| c == '"' || c == '\'')))
    });
    let first = hits.next()?;
    match hits.next() {
        None => Some(first.0 + 1),
        Some(_) => None,
    }
}
