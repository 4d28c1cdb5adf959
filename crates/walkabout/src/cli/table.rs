//! Tables for people: columns as wide as their widest cell, and every cell made safe
//! for a terminal (names come from users and from other hosts: a VM named
//! `"\x1b[2J"` must not clear the screen of whoever lists it).

use std::borrow::Cow;

/// A text made safe to print: each control character (terminal escapes, newlines,
/// tabs, C1 controls) and bidirectional override is shown as its Rust escape (`\u{1b}`) instead of acting, so
/// names stay distinct and one line stays one line.
pub fn clean(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.chars().map(|c| if unsafe_char(c) { c.escape_default().to_string() } else { c.to_string() }).collect())
}

/// A character that acts on a terminal instead of showing: controls, and the
/// bidirectional overrides and marks that reorder what follows them on the line.
fn unsafe_char(c: char) -> bool {
    c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A number a reply may lack (a downtime not yet known), or `-` when it has none.
pub fn num<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |n| n.to_string())
}

/// An enum's wire spelling (`drain_failed`), for states whose type has no `Display`.
pub fn wire(v: &impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".to_string(),
    }
}

/// How a column aligns its cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Text.
    Left,
    /// Numbers.
    Right,
}

/// A table printed as aligned columns under a header, two spaces apart.
#[derive(Debug, Clone)]
pub struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these columns.
    pub fn new(columns: &[(&'static str, Align)]) -> Table {
        Table { columns: columns.to_vec(), rows: vec![] }
    }

    /// Adds a row; each cell is [`clean`]ed. Missing cells are empty, extra ones dropped.
    pub fn row<S: AsRef<str>>(&mut self, cells: impl IntoIterator<Item = S>) {
        let mut row: Vec<String> = cells.into_iter().take(self.columns.len()).map(|c| clean(c.as_ref()).into_owned()).collect();
        row.resize(self.columns.len(), String::new());
        self.rows.push(row);
    }

    /// The table as lines of text, each ending in a newline.
    pub fn render(&self) -> String {
        let width = |i: usize| {
            let cells = self.rows.iter().map(|r| r[i].chars().count());
            cells.chain([self.columns[i].0.len()]).max().unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.columns.len()).map(width).collect();
        let header: Vec<String> = self.columns.iter().map(|(h, _)| (*h).to_string()).collect();
        let mut out = String::new();
        for row in std::iter::once(&header).chain(&self.rows) {
            let cells: Vec<String> = row
                .iter()
                .zip(&self.columns)
                .zip(&widths)
                .map(|((cell, (_, align)), w)| match align {
                    Align::Left => format!("{cell:<w$}"),
                    Align::Right => format!("{cell:>w$}"),
                })
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        out
    }

    /// Prints the table on stdout.
    pub fn print(&self) {
        print!("{}", self.render());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminal_escape_in_a_name_is_shown_not_obeyed() {
        let shown = clean("\x1b[2Jvm\x1b[31m1");
        assert!(!shown.contains('\x1b'), "{shown:?}");
        assert_eq!(shown, "\\u{1b}[2Jvm\\u{1b}[31m1");
    }

    #[test]
    fn a_newline_in_a_name_cannot_start_a_row_of_its_own() {
        let mut t = Table::new(&[("NAME", Align::Left), ("STATE", Align::Left)]);
        t.row(["g1\ng2  running", "stopped"]);
        assert_eq!(t.render().lines().count(), 2);
        assert!(t.render().contains("g1\\ng2  running"));
    }

    #[test]
    fn a_bidirectional_override_cannot_reverse_what_follows() {
        let shown = clean("vm\u{202e}1gnitsop");
        assert!(!shown.contains('\u{202e}'), "{shown:?}");
        assert_eq!(shown, "vm\\u{202e}1gnitsop");
    }

    #[test]
    fn plain_names_are_borrowed_untouched() {
        assert!(matches!(clean("g1-é"), Cow::Borrowed("g1-é")));
    }

    #[test]
    fn columns_grow_to_their_widest_cell_and_numbers_align_right() {
        let mut t = Table::new(&[("NAME", Align::Left), ("MEMORY", Align::Right), ("HOST", Align::Left)]);
        t.row(["a-rather-long-vm-name", "512", "h1"]);
        t.row(["g2", "2048", "h2"]);
        assert_eq!(
            t.render(),
            "NAME                   MEMORY  HOST\n\
             a-rather-long-vm-name     512  h1\n\
             g2                       2048  h2\n"
        );
    }
}
