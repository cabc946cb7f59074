//! `vmm top`: the `vmm ps` view refreshed live in the terminal, as
//! `docker stats` or `virt-top`: one line per VM (the rows of
//! [`ps::gather`], drawn with the cells of [`render::ps_line`]), the fleet's
//! totals pinned at the bottom, and the host's `MemAvailable` on top.
//!
//! A collector thread gathers the rows every `--interval` (a VM that does
//! not answer costs it its deadline, never the screen); the main thread
//! draws with ratatui on crossterm and reads keys. `q`, Esc and Ctrl-C quit;
//! so do SIGTERM, SIGINT and SIGHUP (which `main` blocks; they arrive
//! through [`vmm::signals::forward_to`]). Either way the terminal is
//! restored: raw mode off, the main screen and the cursor back.

use crate::fleet::{Row, Totals};
use crate::ps::{self, FleetArgs, SortColumn};
use crate::render::{self, PS_HEADER};
use api::units::bytes;
use api::ErrorChain;
use clap::ValueEnum;
use lab::host::Meminfo;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Cell, Row as TableRow, Table};
use ratatui::Frame;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, SystemTime};

const TOP_EXAMPLES: &str = "\
Examples:
  vmm top                         the VMs in the runtime directory, every 2 s
  vmm top --sort pss --interval 1
  vmm top --dir /tmp/lab

Keys: q, Esc or Ctrl-C quit; Up, Down, PgUp, PgDn, Home and End scroll.";

/// Arguments of `vmm top`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = TOP_EXAMPLES)]
pub struct TopArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Seconds between refreshes (0.1 to 3600).
    #[arg(long, default_value = "2", value_name = "SECONDS", value_parser = interval)]
    pub interval: Duration,
}

/// `--interval`: seconds, fractions allowed.
fn interval(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(0.1..=3600.0).contains(&secs) {
        return Err(format!("{s} s is out of range: give 0.1 to 3600 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// One refresh: the rows, their totals, and the host's memory.
#[derive(Debug)]
struct Snapshot {
    rows: Vec<Row>,
    totals: Totals,
    /// The host's `/proc/meminfo` (`None` if it could not be read).
    host: Option<Meminfo>,
    /// Why the rows are missing, if a directory could not be listed.
    error: Option<String>,
    taken: SystemTime,
}

/// What the screen shows.
#[derive(Debug)]
struct View {
    dirs: Vec<PathBuf>,
    interval: Duration,
    sort: SortColumn,
    /// The latest snapshot (none before the first).
    snapshot: Option<Snapshot>,
    /// First VM line shown.
    scroll: usize,
}

/// Runs `vmm top`; the exit code.
pub fn run(args: TopArgs) -> u8 {
    if !std::io::stdout().is_terminal() {
        eprintln!("vmm: error: vmm top draws on a terminal; use vmm ps (or vmm ps --json) for a pipe or a file");
        return 1;
    }
    let dirs = ps::dirs(&args.fleet.dir);
    let (tx, snapshots) = mpsc::channel();
    let (stop, stopped) = mpsc::channel::<()>();
    {
        let dirs = dirs.clone();
        let (sort, every) = (args.fleet.sort, args.interval);
        let spawned = std::thread::Builder::new().name("top-collector".into()).spawn(move || collect(&dirs, sort, every, &tx, &stopped));
        if let Err(e) = spawned {
            eprintln!("vmm: error: cannot start the collector thread: {e}");
            return 1;
        }
    }
    let (signal_tx, signals) = mpsc::channel();
    vmm::signals::forward_to(signal_tx);

    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            ratatui::restore();
            eprintln!("vmm: error: cannot set up the terminal: {e}");
            return 1;
        }
    };
    let mut view = View { dirs, interval: args.interval, sort: args.fleet.sort, snapshot: None, scroll: 0 };
    let result = (|| -> std::io::Result<()> {
        let mut dirty = true;
        loop {
            if dirty {
                terminal.draw(|f| draw(f, &mut view))?;
                dirty = false;
            }
            if signals.try_recv().is_ok() {
                return Ok(());
            }
            while let Ok(s) = snapshots.try_recv() {
                view.snapshot = Some(s);
                dirty = true;
            }
            match wait_for_terminal(Duration::from_millis(100)) {
                TerminalWait::HungUp => return Ok(()),
                TerminalWait::Quiet => continue,
                TerminalWait::Ready => {}
            }
            // Everything crossterm has (it may have read several events at once).
            while event::poll(Duration::ZERO)? {
                match event::read()? {
                    Event::Key(key) if key.kind != KeyEventKind::Release => {
                        let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c');
                        if ctrl_c || matches!(key.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc) {
                            return Ok(());
                        }
                        dirty |= view.scroll_by(key.code);
                    }
                    Event::Resize(..) => dirty = true,
                    _ => {}
                }
            }
        }
    })();
    // The collector may be waiting on a VM; it is not waited for.
    drop(stop);
    ratatui::restore();
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vmm: error: vmm top: {}", ErrorChain(&e));
            1
        }
    }
}

/// What [`wait_for_terminal`] saw.
#[derive(Debug, PartialEq, Eq)]
enum TerminalWait {
    /// Input (or nothing to wait on but crossterm's own poll said so).
    Ready,
    /// Nothing within the timeout.
    Quiet,
    /// The terminal went away (its pty closed): `vmm top` ends.
    HungUp,
}

/// Waits up to `timeout` for input on the terminal. crossterm's own poll
/// spins forever on a terminal whose pty has gone (a closed tmux pane or ssh
/// session), ignoring signals; `poll(2)` on standard input says `POLLHUP`.
fn wait_for_terminal(timeout: Duration) -> TerminalWait {
    if !std::io::stdin().is_terminal() {
        // crossterm reads /dev/tty then; its poll is the only wait there is.
        return match event::poll(timeout) {
            Ok(true) => TerminalWait::Ready,
            Ok(false) => TerminalWait::Quiet,
            Err(_) => TerminalWait::HungUp,
        };
    }
    let mut fd = libc::pollfd { fd: libc::STDIN_FILENO, events: libc::POLLIN, revents: 0 };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd, on the stack for the whole call.
    let n = unsafe { libc::poll(&raw mut fd, 1, ms) };
    terminal_wait_of(n, fd.revents)
}

/// Decodes `poll(2)`'s answer for standard input.
fn terminal_wait_of(n: libc::c_int, revents: libc::c_short) -> TerminalWait {
    match n {
        0 => TerminalWait::Quiet,
        // EINTR (a signal): the loop looks at the signals next.
        n if n < 0 => TerminalWait::Quiet,
        _ if revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 => TerminalWait::HungUp,
        _ => TerminalWait::Ready,
    }
}

/// The collector thread: a snapshot now, then one every `every`, until
/// `stop` is dropped or the screen is gone.
fn collect(dirs: &[PathBuf], sort: SortColumn, every: Duration, tx: &Sender<Snapshot>, stop: &Receiver<()>) {
    loop {
        let (rows, error) = match ps::gather(dirs, sort) {
            Ok(rows) => (rows, None),
            Err(e) => (Vec::new(), Some(ErrorChain(&e).to_string())),
        };
        let totals = Totals::of(&rows);
        let snapshot = Snapshot { rows, totals, host: lab::host::meminfo().ok(), error, taken: SystemTime::now() };
        if tx.send(snapshot).is_err() {
            return;
        }
        match stop.recv_timeout(every) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

impl View {
    /// Scrolls for `key`; whether anything moved.
    fn scroll_by(&mut self, key: KeyCode) -> bool {
        let before = self.scroll;
        self.scroll = match key {
            KeyCode::Up | KeyCode::Char('k') => self.scroll.saturating_sub(1),
            KeyCode::Down | KeyCode::Char('j') => self.scroll.saturating_add(1),
            KeyCode::PageUp => self.scroll.saturating_sub(10),
            KeyCode::PageDown => self.scroll.saturating_add(10),
            KeyCode::Home => 0,
            KeyCode::End => usize::MAX,
            _ => self.scroll,
        };
        // Clamped when drawn, against the lines that fit.
        self.scroll != before
    }

    /// The line above the table.
    fn title(&self) -> String {
        let dirs: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
        let sort = self.sort.to_possible_value().map_or_else(String::new, |v| v.get_name().to_string());
        let mut title = format!("vmm top  {}  every {:.1} s, sorted by {sort}", dirs.join(", "), self.interval.as_secs_f64());
        match &self.snapshot {
            None => title += "  gathering...",
            Some(s) => {
                let host = s.host.map_or_else(
                    || "host MemAvailable -".to_string(),
                    |m| format!("host MemAvailable {} of {}", bytes(m.available), bytes(m.total)),
                );
                let ago = s.taken.elapsed().map_or(0, |d| d.as_secs());
                title += &format!("  {} VMs, {} answered  {host}  ({ago} s ago)", s.totals.vms, s.totals.answered);
            }
        }
        title + "  q quits"
    }
}

/// Draws the view: the title line, the VMs (from `view.scroll` on) under
/// their header, and the totals on the last line.
fn draw(frame: &mut Frame, view: &mut View) {
    let [top, table, bottom] = Layout::vertical([Constraint::Length(1), Constraint::Min(1), Constraint::Length(1)]).areas(frame.area());
    frame.render_widget(Line::from(view.title()).style(Style::new().add_modifier(Modifier::REVERSED)), top);
    let Some(snapshot) = &view.snapshot else { return };
    if let Some(error) = &snapshot.error {
        frame.render_widget(Line::from(format!("vmm: error: {error}")), table);
        return;
    }
    let lines: Vec<Vec<String>> = snapshot.rows.iter().map(render::ps_line).collect();
    let totals = render::ps_totals(&snapshot.totals);
    let widths = column_widths(&lines, &totals);
    // The header takes one line of the table's area.
    let fit = usize::from(table.height.saturating_sub(1)).max(1);
    view.scroll = view.scroll.min(lines.len().saturating_sub(fit));
    let header = TableRow::new(PS_HEADER.map(Cell::from)).style(Style::new().add_modifier(Modifier::BOLD));
    let shown = lines.iter().skip(view.scroll).take(fit).map(|l| TableRow::new(l.iter().map(|c| Cell::from(c.as_str()))));
    frame.render_widget(Table::new(shown, widths.clone()).header(header).column_spacing(2), table);
    let total_row = TableRow::new(totals.iter().map(|c| Cell::from(c.as_str()))).style(Style::new().add_modifier(Modifier::BOLD));
    frame.render_widget(Table::new([total_row], widths).column_spacing(2), Rect { height: 1, ..bottom });
}

/// Each column as wide as its widest cell (header, VM lines and totals), so
/// that the VMs' table and the totals' line up.
fn column_widths(lines: &[Vec<String>], totals: &[String]) -> Vec<Constraint> {
    let width = |s: &str| u16::try_from(s.chars().count()).unwrap_or(u16::MAX);
    PS_HEADER
        .iter()
        .enumerate()
        .map(|(i, head)| {
            let cells = lines.iter().filter_map(|l| l.get(i)).chain(totals.get(i));
            Constraint::Length(cells.fold(width(head), |w, c| w.max(width(c))))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hung_up_terminal_ends_top_and_a_signal_does_not() {
        assert_eq!(terminal_wait_of(1, libc::POLLHUP), TerminalWait::HungUp);
        assert_eq!(terminal_wait_of(1, libc::POLLIN | libc::POLLHUP), TerminalWait::HungUp);
        assert_eq!(terminal_wait_of(1, libc::POLLERR), TerminalWait::HungUp);
        assert_eq!(terminal_wait_of(1, libc::POLLIN), TerminalWait::Ready);
        assert_eq!(terminal_wait_of(0, 0), TerminalWait::Quiet);
        assert_eq!(terminal_wait_of(-1, 0), TerminalWait::Quiet);
    }
    use crate::fleet::Reach;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;
    use std::path::Path;

    fn screen(view: &mut View, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|f| draw(f, view)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..height)
            .map(|y| (0..width).map(|x| buffer[(x, y)].symbol().to_string()).collect::<String>().trim_end().to_string())
            .collect()
    }

    fn view(ids: &[&str]) -> View {
        let rows: Vec<Row> = ids
            .iter()
            .map(|id| Row {
                mem_size_mib: Some(256),
                vmm_pss_bytes: Some(1 << 20),
                ..Row::without_figures((*id).into(), Path::new(id), Reach::Answered)
            })
            .collect();
        let totals = Totals::of(&rows);
        let host = Some(Meminfo { total: 24 << 30, available: 20 << 30 });
        let snapshot = Snapshot { rows, totals, host, error: None, taken: SystemTime::now() };
        View { dirs: vec!["/run/vmm".into()], interval: Duration::from_secs(2), sort: SortColumn::Id, snapshot: Some(snapshot), scroll: 0 }
    }

    #[test]
    fn the_screen_shows_the_host_the_vms_and_the_totals_last() {
        let mut v = view(&["alpha", "beta"]);
        let lines = screen(&mut v, 160, 10);
        assert!(lines[0].contains("sorted by id  2 VMs, 2 answered  host MemAvailable 20 GiB of 24 GiB"), "{lines:#?}");
        assert!(lines[1].starts_with("ID ") && lines[1].contains("VMM PSS"), "{lines:#?}");
        assert!(lines[2].starts_with("alpha ") && lines[2].contains("256 MiB"), "{lines:#?}");
        assert!(lines[3].starts_with("beta "), "{lines:#?}");
        assert!(lines[9].starts_with("TOTAL (2 VMs)") && lines[9].contains("512 MiB") && lines[9].contains("2 MiB"), "{lines:#?}");
        // The totals' figures stand under the VMs' columns.
        assert_eq!(lines[9].find("512 MiB"), lines[2].find("256 MiB"), "{lines:#?}");
    }

    #[test]
    fn more_vms_than_lines_scroll_and_keep_the_totals() {
        let ids: Vec<String> = (0..20).map(|i| format!("vm{i:02}")).collect();
        let mut v = view(&ids.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(v.scroll_by(KeyCode::End));
        let lines = screen(&mut v, 160, 8);
        // 8 lines: title, header, 5 VMs, totals; the last five VMs shown.
        assert!(lines[2].starts_with("vm15 ") && lines[6].starts_with("vm19 "), "{lines:#?}");
        assert!(lines[7].starts_with("TOTAL (20 VMs)"), "{lines:#?}");
        assert_eq!(v.scroll, 15);
        assert!(v.scroll_by(KeyCode::Home));
        assert!(!v.scroll_by(KeyCode::Home));
        assert!(screen(&mut v, 160, 8)[2].starts_with("vm00 "));
    }

    #[test]
    fn before_the_first_snapshot_the_title_says_so() {
        let mut v = view(&[]);
        v.snapshot = None;
        let lines = screen(&mut v, 120, 4);
        assert!(lines[0].contains("gathering..."), "{lines:#?}");
        assert!(lines[1].is_empty(), "{lines:#?}");
    }

    #[test]
    fn intervals_are_seconds_in_range() {
        assert_eq!(interval("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(interval("2"), Ok(Duration::from_secs(2)));
        assert!(interval("0").is_err());
        assert!(interval("nan").is_err());
        assert!(interval("x").is_err());
        assert!(interval("1e9").is_err());
    }
}
