//! Wires the command line to the library: builds the real or simulated
//! environment and calls one operation per subcommand.

use crate::cli::Cli;
use simplelog::{ColorChoice, ConfigBuilder, LevelFilter, TermLogger, TerminalMode};

/// Log to stderr: no timestamps (the journal adds them), no colour off a terminal.
pub fn init_logging(cli: &Cli) {
    let level = if cli.quiet {
        LevelFilter::Error
    } else {
        match cli.verbose {
            0 => LevelFilter::Info,
            1 => LevelFilter::Debug,
            _ => LevelFilter::Trace,
        }
    };
    let config = ConfigBuilder::new()
        .set_time_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .set_target_level(LevelFilter::Off)
        .set_location_level(LevelFilter::Off)
        .build();
    let _ = TermLogger::init(level, config, TerminalMode::Stderr, ColorChoice::Auto);
}

/// Run the chosen subcommand.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let _ = cli;
    anyhow::bail!("not implemented yet")
}
