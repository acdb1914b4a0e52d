//! abi_stable explains a layout mismatch with a dump of both type layouts — thousands of lines in
//! which the actual reason sits in a few trailing `Error:` blocks. The user needs only those.

/// The most lines a trimmed message keeps.
pub const MAX_ABI_ERROR_LINES: usize = 10;

/// Longest line kept; an `Expected:` value can be a whole type layout on one line.
const MAX_LINE_CHARS: usize = 160;

/// Keeps the trailing `Error:` blocks of an abi_stable error text (at most `max_lines` non-empty
/// lines, starting at an `Error:` line where possible). Texts without `Error:` lines keep their
/// last `max_lines` non-empty lines.
pub fn trim_abi_error(text: &str, max_lines: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let is_error_line = |l: &&str| l.trim_start().starts_with("Error:");
    let error_starts: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| is_error_line(l))
        .map(|(i, _)| i)
        .collect();

    let start = match error_starts.last() {
        None => lines.len().saturating_sub(max_lines),
        Some(&last) => error_starts
            .iter()
            .copied()
            .find(|&s| lines.len() - s <= max_lines)
            .unwrap_or(last),
    };
    let end = (start + max_lines).min(lines.len());
    let kept = &lines[start..end];
    // Keep the layout's own indentation (values under `Expected:`), minus what all lines share.
    let common = kept
        .iter()
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    kept.iter()
        .map(|l| shorten(&l[common..], MAX_LINE_CHARS))
        .collect::<Vec<_>>()
        .join("\n")
}

fn shorten(line: &str, max_chars: usize) -> String {
    if line.chars().count() <= max_chars {
        line.to_string()
    } else {
        let kept: String = line.chars().take(max_chars).collect();
        format!("{kept}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout_dump(lines: usize) -> String {
        (0..lines)
            .map(|i| format!("    field_{i}: SomeType<'a, T> {{ size: {i}, align: 8 }}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn keeps_only_the_trailing_error_blocks_of_a_layout_dump() {
        let text = format!(
            "\nCompared <this>:\n{}\nTo <other>:\n{}\n1 error(s)inside:\n    <other>\n\n\
             Error:incompatible type size\nExpected:\n    16\nFound:\n    24\n\n\
             Error:too many fields\nExpected:\n    4\nFound:\n    5\n",
            layout_dump(3000),
            layout_dump(3000)
        );
        let trimmed = trim_abi_error(&text, MAX_ABI_ERROR_LINES);
        let lines: Vec<&str> = trimmed.lines().collect();
        assert!(lines.len() <= MAX_ABI_ERROR_LINES, "{trimmed}");
        assert_eq!(lines[0], "Error:incompatible type size");
        assert!(trimmed.contains("Error:too many fields"));
        assert!(!trimmed.contains("field_"), "{trimmed}");
    }

    #[test]
    fn many_error_blocks_keep_the_last_ones() {
        let block = "Error:mismatched type\nExpected:\n    A\nFound:\n    B\n";
        let text = format!("{}\n{}", layout_dump(100), block.repeat(20));
        let trimmed = trim_abi_error(&text, 10);
        assert_eq!(trimmed.lines().count(), 10);
        assert!(trimmed.starts_with("Error:"));
    }

    #[test]
    fn text_without_error_lines_keeps_its_tail_and_long_lines_are_cut() {
        let long = "x".repeat(1000);
        let text = format!("{}\n{long}", layout_dump(50));
        let trimmed = trim_abi_error(&text, 3);
        assert_eq!(trimmed.lines().count(), 3);
        assert!(trimmed.lines().last().unwrap().chars().count() <= MAX_LINE_CHARS + 1);
    }
}
