//! Output of the client commands (`vmm ctl`, `vmm ps`): blocking, as a
//! pager or a slow pipe expects, but never a panic when the reader went away
//! (`println!` panics on EPIPE, and the build aborts on panics). The VM
//! process itself writes through [`vmm::out`], which never blocks for long.

use std::io::Write;

/// Writes `text` to stdout; a closed or failing stdout is ignored.
pub fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Writes a line to stderr; a closed or failing stderr is ignored.
pub fn eprint_line(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "{args}");
}
