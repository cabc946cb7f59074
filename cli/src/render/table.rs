//! The two table shapes of `vmm ctl --human`, drawn by comfy-table with no
//! borders and no colors: a `field  value` listing, and titled blocks of text
//! side by side (the guest's view beside the host's).

use comfy_table::{presets, ColumnConstraint, Table, Width};

/// One line of a listing: a field's name and its value, shown.
pub type Field = (&'static str, String);

/// Spaces between a field's name and its value.
const FIELD_GAP: u16 = 2;
/// Spaces between blocks set side by side.
const BLOCK_GAP: u16 = 4;
/// Widest a value is shown on one line; a longer one (a note, a failure
/// reason) wraps at spaces onto more lines, so that blocks side by side stay
/// within a terminal's width.
const VALUE_WIDTH: u16 = 40;

/// `name  value` lines, the values in one column.
pub fn fields(list: &[Field]) -> String {
    let mut table = borderless();
    table.add_rows(list.iter().map(|(name, value)| [*name, value.as_str()]));
    if let Some(values) = table.column_mut(1) {
        values.set_constraint(ColumnConstraint::UpperBoundary(Width::Fixed(VALUE_WIDTH)));
    }
    finish(table, FIELD_GAP)
}

/// `name  value` lines like [`fields`], each value on one line however long
/// (for a few lines read first, such as a summary).
pub fn long_fields(list: &[Field]) -> String {
    let mut table = borderless();
    table.add_rows(list.iter().map(|(name, value)| [*name, value.as_str()]));
    finish(table, FIELD_GAP)
}

/// A header line, then one line per row, each value in its column.
pub fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut table = borderless();
    table.set_header(header.iter().copied());
    table.add_rows(rows.iter().map(|row| row.iter().map(String::as_str)));
    finish(table, FIELD_GAP)
}

/// Each `(title, text)` block under its title, the blocks side by side.
pub fn side_by_side(blocks: &[(&str, String)]) -> String {
    let mut table = borderless();
    table.set_header(blocks.iter().map(|(title, _)| *title));
    table.add_row(blocks.iter().map(|(_, text)| text.trim_end()));
    finish(table, BLOCK_GAP)
}

/// A table with no lines at all.
fn borderless() -> Table {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table
}

/// The table as text, `gap` spaces between columns, no trailing spaces, and
/// a final newline.
fn finish(mut table: Table, gap: u16) -> String {
    let last = table.column_count().saturating_sub(1);
    for (i, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, if i == last { 0 } else { gap }));
    }
    let mut out = table.trim_fmt();
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_line_up_their_values() {
        let out = fields(&[("id", "vm0".into()), ("vmm_version", "0.1.0".into())]);
        assert_eq!(out, "id           vm0\nvmm_version  0.1.0\n");
    }

    #[test]
    fn blocks_stand_side_by_side_under_their_titles() {
        let left = fields(&[("a", "1".into()), ("bb", "2".into()), ("c", "3".into())]);
        let right = fields(&[("x", "9".into())]);
        let out = side_by_side(&[("LEFT", left), ("RIGHT SIDE", right)]);
        assert_eq!(out, "LEFT     RIGHT SIDE\na   1    x  9\nbb  2\nc   3\n");
    }

    #[test]
    fn long_values_wrap_in_their_column() {
        let note = "estimate from registered memory: KVM's reverse map (8 bytes per 4 KiB page) and large-page tracking";
        let out = fields(&[("kvm_estimate_note", note.into()), ("next", "1".into())]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "kvm_estimate_note  estimate from registered memory: KVM's"
        );
        assert!(lines.len() > 3, "{out}");
        for line in &lines[1..lines.len() - 1] {
            assert!(
                line.starts_with(&" ".repeat(19)) && line.len() <= 19 + 40,
                "{out}"
            );
        }
        assert_eq!(lines[lines.len() - 1], "next               1");
        let rejoined: Vec<&str> = lines[..lines.len() - 1]
            .iter()
            .map(|l| l[19..].trim())
            .collect();
        assert_eq!(rejoined.join(" "), note);
    }

    #[test]
    fn no_escape_sequences() {
        let out = side_by_side(&[("T", fields(&[("k", "µs".into())]))]);
        assert!(!out.contains('\x1b'), "{out:?}");
    }
}
