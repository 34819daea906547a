//! `coral` binary: parse, set up logging, run, report. The only place that exits.

mod app;
mod cli;
mod watch_runtime;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    app::init_logging(&cli);
    match app::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("coral: {err:#}");
            ExitCode::from(coral::error::exit_code_of(&err))
        }
    }
}
