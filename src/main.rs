//! `coral` binary: parse, set up logging, run, report. The only place that exits.

mod app;
mod cli;
mod logging;
mod traced;
mod watch_runtime;
mod wording;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Before anything can fail: how flags and next steps read on this command line.
    coral::error::set_wording(&wording::CliWording);
    // Bad values (`--timeout 0`, `--vm ""`) end here with exit 2, before any
    // USB request or `xe` call.
    let cli = cli::Cli::parse();
    wording::set_simulated(cli.simulate);
    logging::init(cli.quiet, cli.verbose);
    match app::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            logging::error_line(&format!("coral: {err:#}"));
            ExitCode::from(coral::error::exit_code_of(&err))
        }
    }
}
