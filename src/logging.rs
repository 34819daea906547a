//! Where lines go: the log on stderr, results on stdout, each line once.
//!
//! - Log lines are `[LEVEL] message` on a terminal or in a file, and
//!   `<N>message` (sd-daemon priority prefixes) when stderr is the journal:
//!   systemd sets `JOURNAL_STREAM=DEVICE:INODE` for the stream it connected,
//!   and only a stderr with that device and inode is the journal (a child
//!   whose stderr was redirected inherits the variable but not the stream).
//! - Results go to stdout. When stdout and stderr are the same open file (a
//!   terminal, the journal, `>out 2>&1`), a result line the log already
//!   showed is not printed again. `-q` silences results on success; data the
//!   user asked for (`status`, `show`, `--dry-run` plans) is always printed.
//! - What the logger remembers for that is bounded ([`REMEMBERED_LINES`]
//!   hashes of the latest lines): the watcher logs for months.
//!
//! Not built on `simplelog`: its `CombinedLogger` combines several sinks,
//! and coral has one (stderr). The journal's `<N>` prefixes on every line of
//! a message and the memory of shown lines would be a `SharedLogger` of our
//! own either way, and its `SimpleLogger` writes `00:00:00 [LEVEL] module:`
//! before each message unless configured away; what is left would be a
//! crate (and its `time` dependency) wrapping one logger.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::collections::hash_map::DefaultHasher;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::{Mutex, OnceLock};

/// The process's logger (set once by [`init`]).
static LOGGER: OnceLock<StderrLogger> = OnceLock::new();

/// How many of the latest lines shown (info and above) the logger
/// remembers, so that a result line the log already showed is not printed
/// again. A command's result follows its own log lines closely (`up` of
/// every entry logs about a dozen lines per entry); the bound keeps a
/// watcher that logs for months at a fixed 8 KiB.
pub const REMEMBERED_LINES: usize = 1024;

/// The latest lines shown, as 64-bit hashes (a line costs 8 bytes however
/// long it is; a false match, one in 2^64, would only drop a repeated line).
#[derive(Debug, Default)]
struct ShownLines(VecDeque<u64>);

impl ShownLines {
    fn hash(line: &str) -> u64 {
        let mut hasher = DefaultHasher::new();
        line.hash(&mut hasher);
        hasher.finish()
    }

    /// Remember `line`, forgetting the oldest beyond [`REMEMBERED_LINES`].
    fn remember(&mut self, line: &str) {
        let hash = Self::hash(line);
        if let Some(at) = self.0.iter().position(|&h| h == hash) {
            self.0.remove(at);
        }
        self.0.push_back(hash);
        while self.0.len() > REMEMBERED_LINES {
            self.0.pop_front();
        }
    }

    fn contains(&self, line: &str) -> bool {
        self.0.contains(&Self::hash(line))
    }
}

/// Writes log records to stderr and remembers which lines it showed.
struct StderrLogger {
    level: LevelFilter,
    journal: bool,
    shown: Mutex<ShownLines>,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        let mut stderr = std::io::stderr().lock();
        for line in message.lines() {
            let _ = if self.journal {
                writeln!(stderr, "<{}>{line}", priority(record.level()))
            } else {
                writeln!(stderr, "[{}] {line}", record.level())
            };
        }
        if record.level() <= Level::Info {
            if let Ok(mut shown) = self.shown.lock() {
                message.lines().for_each(|line| shown.remember(line));
            }
        }
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// syslog priority of a log level (sd-daemon(3) prefixes).
fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// Device and inode of an open stream.
fn identity(stream: impl AsFd) -> Option<(u64, u64)> {
    let fd = stream.as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// True when `JOURNAL_STREAM` names the stream stderr is connected to.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let parsed = value.to_str().and_then(|v| {
        let (dev, ino) = v.split_once(':')?;
        Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?))
    });
    parsed.is_some() && parsed == identity(std::io::stderr())
}

/// Install the logger: errors only with `quiet`, else info, debug (`-v`),
/// trace (`-vv`: every USB request and `xe` call).
pub fn init(quiet: bool, verbose: u8) {
    let level = match (quiet, verbose) {
        (true, _) => LevelFilter::Error,
        (false, 0) => LevelFilter::Info,
        (false, 1) => LevelFilter::Debug,
        (false, _) => LevelFilter::Trace,
    };
    let logger = LOGGER.get_or_init(|| StderrLogger {
        level,
        journal: stderr_is_journal(),
        shown: Mutex::new(ShownLines::default()),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

/// The final error line, with the journal's error priority when stderr is the journal.
pub fn error_line(text: &str) {
    let journal = LOGGER
        .get()
        .map_or_else(stderr_is_journal, |logger| logger.journal);
    let mut stderr = std::io::stderr().lock();
    for line in text.lines() {
        let _ = if journal {
            writeln!(stderr, "<3>{line}")
        } else {
            writeln!(stderr, "{line}")
        };
    }
}

/// Whether the log already showed this line.
fn already_shown(line: &str) -> bool {
    LOGGER
        .get()
        .and_then(|logger| logger.shown.lock().ok().map(|s| s.contains(line)))
        .unwrap_or(false)
}

/// How results reach stdout.
#[derive(Clone, Copy, Debug)]
pub struct Output {
    quiet: bool,
    same_file: bool,
}

impl Output {
    /// For this process: `quiet` from `-q`; whether stdout and stderr are one file.
    pub fn new(quiet: bool) -> Self {
        let stdout = identity(std::io::stdout());
        Output {
            quiet,
            same_file: stdout.is_some() && stdout == identity(std::io::stderr()),
        }
    }

    /// What a command did: nothing under `-q`; lines the log already showed
    /// on this same output are not repeated.
    pub fn result(&self, text: &str) {
        if self.quiet {
            return;
        }
        let mut stdout = std::io::stdout().lock();
        for line in text.lines() {
            if !(self.same_file && already_shown(line)) {
                let _ = writeln!(stdout, "{line}");
            }
        }
    }

    /// What the user asked to see (a table, a unit, a plan): always printed.
    pub fn data(&self, text: &str) {
        if !text.is_empty() {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{text}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(priority(Level::Error), 3);
        assert_eq!(priority(Level::Warn), 4);
        assert_eq!(priority(Level::Info), 6);
        assert_eq!(priority(Level::Trace), 7);
    }

    #[test]
    fn the_memory_of_shown_lines_is_bounded_and_keeps_the_latest() {
        let mut shown = ShownLines::default();
        // A watcher's months of distinct lines.
        for i in 0..100_000 {
            shown.remember(&format!("watch: VM 'frigate' recovered ({i})"));
        }
        assert_eq!(shown.0.len(), REMEMBERED_LINES);
        assert!(shown.contains("watch: VM 'frigate' recovered (99999)"));
        assert!(shown.contains(&format!(
            "watch: VM 'frigate' recovered ({})",
            100_000 - REMEMBERED_LINES
        )));
        assert!(!shown.contains("watch: VM 'frigate' recovered (0)"));
        // A line shown again is the latest again, not a second copy.
        shown.remember("watch: VM 'frigate' recovered (99999)");
        assert_eq!(shown.0.len(), REMEMBERED_LINES);
        assert!(!shown.contains("never shown"));
    }
}
