//! Wires the command line to the library: builds the real or simulated
//! environment and calls one operation per subcommand.

use crate::cli::{Cli, Command, FirmwareCommand, ServiceCommand};
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
    match &cli.command {
        Command::Init(_args) => anyhow::bail!("init: not wired yet"),
        Command::Attach(_args) => anyhow::bail!("attach: not wired yet"),
        Command::Detach(_args) => anyhow::bail!("detach: not wired yet"),
        Command::Status(_args) => anyhow::bail!("status: not wired yet"),
        Command::Up(_args) => anyhow::bail!("up: not wired yet"),
        Command::Firmware(FirmwareCommand::Show(_args)) => {
            anyhow::bail!("firmware show: not wired yet")
        }
        Command::Firmware(FirmwareCommand::Install { .. }) => {
            anyhow::bail!("firmware install: not wired yet")
        }
        Command::Firmware(FirmwareCommand::Fetch { .. }) => {
            anyhow::bail!("firmware fetch: not wired yet")
        }
        Command::Service(ServiceCommand::Install(_args)) => {
            anyhow::bail!("service install: not wired yet")
        }
        Command::Service(ServiceCommand::Show(_args)) => {
            anyhow::bail!("service show: not wired yet")
        }
        Command::Service(ServiceCommand::Uninstall(_args)) => {
            anyhow::bail!("service uninstall: not wired yet")
        }
    }
}
