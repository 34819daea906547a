//! Wires the command line to the library: turns flags into options, builds
//! the real or simulated environment, takes the lock, and calls one
//! operation per subcommand. Results go to stdout; the log goes to stderr.

use crate::cli::{
    AttachArgs, Cli, Command, DetachArgs, FirmwareArgs, FirmwareCommand, InitArgs, ServiceCommand,
    ServiceInstallArgs, StatusArgs, UpArgs, VmArgs,
};
use anyhow::Context;
use coral::clock::{Clock, SystemClock};
use coral::error::{fail, FailureKind};
use coral::firmware::{self, FirmwareChoice, FirmwareImage, FirmwareSource, DEFAULT_INSTALL_DIR};
use coral::lock::{self, LockGuard, LockWait};
use coral::ops::attach::{attach, AttachOptions};
use coral::ops::detach::{detach, DetachOptions};
use coral::ops::init::{init, InitOptions, InitOutcome};
use coral::ops::status::status;
use coral::ops::up::{up, UpOptions};
use coral::ops::{firmware_cmd, service};
use coral::sim::host::{stand_in_firmware, SimulatedHost};
use coral::usb::rusb_backend::RusbBus;
use coral::usb::{CoralState, UsbBus};
use coral::xe::client::XeClient;
use coral::xe::command::XeCommand;
use coral::xe::inventory::{this_host_uuid, DEFAULT_INVENTORY};
use coral::xe::XeRunner;
use simplelog::{ColorChoice, ConfigBuilder, LevelFilter, TermLogger, TerminalMode};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

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
    // simplelog's "auto" only looks at TERM: colour only on a real terminal.
    let colour = if std::io::stderr().is_terminal() {
        ColorChoice::Auto
    } else {
        ColorChoice::Never
    };
    let _ = TermLogger::init(level, config, TerminalMode::Stderr, colour);
}

/// Run the chosen subcommand.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    // The simulation starts from a power loss where the Coral needs firmware,
    // and from a ready Coral where the command expects one.
    let simulated_coral = match &cli.command {
        Command::Attach(_) | Command::Detach(_) | Command::Status(_) => CoralState::Ready,
        _ => CoralState::Uninitialized,
    };
    let env = Environment::new(cli.simulate.then_some(simulated_coral));
    match &cli.command {
        Command::Init(args) => run_init(&cli, &env, args),
        Command::Attach(args) => run_attach(&cli, &env, args),
        Command::Detach(args) => run_detach(&cli, &env, args),
        Command::Status(args) => run_status(&env, args),
        Command::Up(args) => run_up(&cli, &env, args),
        Command::Firmware(FirmwareCommand::Show(args)) => {
            print(firmware_cmd::show(&firmware_choice(args))?)
        }
        Command::Firmware(FirmwareCommand::Install {
            file,
            allow_unknown_firmware,
            dir,
        }) => print(firmware_cmd::install(file, dir, *allow_unknown_firmware)?),
        Command::Firmware(FirmwareCommand::Fetch { dir }) => print(firmware_cmd::fetch(dir)?),
        Command::Service(ServiceCommand::Install(args)) => print(service::install(
            &service_spec(args)?,
            args.root.root.as_deref(),
        )?),
        Command::Service(ServiceCommand::Show(args)) => print(service::show(args.root.as_deref())?),
        Command::Service(ServiceCommand::Uninstall(args)) => {
            print(service::uninstall(args.root.as_deref())?)
        }
    }
}

/// Where USB and XAPI access go: the real host, or the built-in simulation.
enum Environment {
    Real {
        usb: RusbBus,
        clock: SystemClock,
        xe: XeCommand,
    },
    Simulated(Box<SimulatedHost>),
}

impl Environment {
    fn new(simulate: Option<CoralState>) -> Self {
        if let Some(coral) = simulate {
            let host = SimulatedHost::new(coral);
            log::info!("{}", host.describe());
            Environment::Simulated(Box::new(host))
        } else {
            Environment::Real {
                usb: RusbBus::new(),
                clock: SystemClock::new(),
                xe: XeCommand::from_env(),
            }
        }
    }

    fn usb(&self) -> &dyn UsbBus {
        match self {
            Environment::Real { usb, .. } => usb,
            Environment::Simulated(host) => host.bus(),
        }
    }

    fn clock(&self) -> &dyn Clock {
        match self {
            Environment::Real { clock, .. } => clock,
            Environment::Simulated(host) => host.clock(),
        }
    }

    /// The `xe` runner and this host's uuid.
    fn xapi(&self) -> anyhow::Result<(&dyn XeRunner, String)> {
        match self {
            Environment::Real { xe, .. } => {
                let inventory = std::env::var_os("CORAL_INVENTORY")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_INVENTORY));
                Ok((xe, this_host_uuid(&inventory)?))
            }
            Environment::Simulated(host) => Ok((host.xe(), host.host_uuid().to_string())),
        }
    }

    fn is_simulated(&self) -> bool {
        matches!(self, Environment::Simulated(_))
    }
}

fn run_init(cli: &Cli, env: &Environment, args: &InitArgs) -> anyhow::Result<()> {
    let opts = InitOptions {
        device: args.device.device.clone(),
        force: args.force,
        replug_timeout: seconds("--timeout", args.timeout)?,
    };
    let choice = firmware_choice(&args.firmware);
    let mut load = || load_firmware(&choice, env.is_simulated());
    if cli.dry_run {
        let image = load()?;
        log::info!(
            "dry run: firmware {} verified; no USB writes",
            image_name(&image)
        );
        for coral in env.usb().list_corals()? {
            println!("{coral}");
        }
        return Ok(());
    }
    let _lock = take_lock(cli, env)?;
    let outcomes = init(env.usb(), env.clock(), &mut load, &opts)?;
    for outcome in &outcomes {
        match outcome {
            InitOutcome::AlreadyReady { device } => {
                println!(
                    "Coral at {} is already ready (18d1:9302); nothing to do",
                    device.path
                )
            }
            InitOutcome::Initialized { after, elapsed, .. } => println!(
                "Coral ready at {} after {:.1} s",
                after.path,
                elapsed.as_secs_f64()
            ),
        }
    }
    Ok(())
}

fn run_attach(cli: &Cli, env: &Environment, args: &AttachArgs) -> anyhow::Result<()> {
    let opts = attach_options(&args.vm, args.device.device.clone())?;
    let (runner, host_uuid) = env.xapi()?;
    let xe = XeClient::new(runner, host_uuid, cli.dry_run).waiting_for_xapi(
        env.clock(),
        seconds("--xapi-timeout", args.vm.xapi_timeout)?,
    );
    let _lock = take_lock(cli, env)?;
    let report = attach(env.usb(), &xe, env.clock(), &opts)?;
    print_planned(&xe);
    print(report.to_string())
}

fn run_detach(cli: &Cli, env: &Environment, args: &DetachArgs) -> anyhow::Result<()> {
    let opts = DetachOptions {
        vm: args.vm.clone(),
        device: args.device.device.clone(),
    };
    let (runner, host_uuid) = env.xapi()?;
    let xe = XeClient::new(runner, host_uuid, cli.dry_run);
    let _lock = take_lock(cli, env)?;
    let text = detach(env.usb(), &xe, &opts)?;
    print_planned(&xe);
    print(text)
}

fn run_status(env: &Environment, args: &StatusArgs) -> anyhow::Result<()> {
    // Status still shows the USB side where xe is not available (not a dom0).
    let xapi = match env.xapi() {
        Ok(xapi) => Some(xapi),
        Err(err) => {
            log::warn!("XAPI not available ({err:#}); showing USB only");
            None
        }
    };
    let client = xapi
        .as_ref()
        .map(|(runner, host)| XeClient::new(*runner, host.clone(), false));
    let report = status(env.usb(), client.as_ref())?;
    if args.json {
        print(serde_json::to_string_pretty(&report)?)
    } else {
        print(report.render_table())
    }
}

fn run_up(cli: &Cli, env: &Environment, args: &UpArgs) -> anyhow::Result<()> {
    let opts = UpOptions {
        replug_timeout: seconds("--timeout", args.timeout)?,
        attach: attach_options(&args.vm, args.device.device.clone())?,
        dry_run: cli.dry_run,
    };
    let choice = firmware_choice(&args.firmware);
    let mut load = || load_firmware(&choice, env.is_simulated());
    let (runner, host_uuid) = env.xapi()?;
    let xe = XeClient::new(runner, host_uuid, cli.dry_run).waiting_for_xapi(
        env.clock(),
        seconds("--xapi-timeout", args.vm.xapi_timeout)?,
    );
    let _lock = take_lock(cli, env)?;
    let report = up(env.usb(), &xe, env.clock(), &mut load, &opts)?;
    print_planned(&xe);
    if let Some(attach) = &report.attach {
        println!("{attach}");
    }
    print(report.to_string())
}

/// The lock serializes every run that may change something; dry runs and the
/// in-process simulation change nothing real and take none.
fn take_lock(cli: &Cli, env: &Environment) -> anyhow::Result<Option<LockGuard>> {
    if cli.dry_run || env.is_simulated() {
        return Ok(None);
    }
    let wait = if cli.lock.no_wait {
        LockWait::NoWait
    } else {
        LockWait::UpTo(seconds("--lock-timeout", cli.lock.lock_timeout)?)
    };
    lock::acquire(&cli.lock.lock_file, wait, env.clock()).map(Some)
}

fn attach_options(vm: &VmArgs, device: Option<String>) -> anyhow::Result<AttachOptions> {
    Ok(AttachOptions {
        vm: vm.vm.clone(),
        device,
        start: vm.start,
        restart: vm.restart,
        force_shutdown: vm.force_shutdown,
        shutdown_timeout: seconds("--shutdown-timeout", vm.shutdown_timeout)?,
        scan_timeout: seconds("--scan-timeout", vm.scan_timeout)?,
    })
}

fn firmware_choice(args: &FirmwareArgs) -> FirmwareChoice {
    FirmwareChoice {
        explicit: args.firmware.clone(),
        allow_unknown: args.allow_unknown_firmware,
        install_dir: std::env::var_os("CORAL_FIRMWARE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_INSTALL_DIR)),
    }
}

fn load_firmware(choice: &FirmwareChoice, simulated: bool) -> anyhow::Result<FirmwareImage> {
    if simulated && firmware::nothing_configured(choice) {
        log::warn!(
            "simulation: no firmware configured, using a stand-in; a real run needs the image: {}",
            firmware::how_to_get_one(&choice.install_dir)
        );
        return Ok(stand_in_firmware());
    }
    let image = firmware::load(choice)?;
    log::info!(
        "firmware: {} ({} bytes, sha256 {}…)",
        image_name(&image),
        image.bytes.len(),
        &image.sha256[..12]
    );
    Ok(image)
}

fn image_name(image: &FirmwareImage) -> String {
    match (&image.known_name, &image.source) {
        (Some(name), _) => name.clone(),
        (None, FirmwareSource::Simulated) => "simulation stand-in".to_string(),
        (None, _) => "unknown image".to_string(),
    }
}

fn service_spec(args: &ServiceInstallArgs) -> anyhow::Result<service::ServiceSpec> {
    let exe = std::env::current_exe().context("cannot tell where this coral binary is")?;
    Ok(service::ServiceSpec {
        exe,
        vm: args.vm.clone(),
        start: args.start,
        restart: args.restart,
        device: args.device.clone(),
        firmware: args.firmware.clone(),
    })
}

/// A `--…` seconds flag as a duration; negative, NaN or absurd values are usage errors.
fn seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        fail(
            FailureKind::Other,
            format!("{flag} {value}: give a number of seconds, 0 or more"),
        )
    })
}

fn print_planned(xe: &XeClient) {
    for command in xe.planned_commands() {
        println!("would run: {command}");
    }
}

fn print(text: String) -> anyhow::Result<()> {
    if !text.is_empty() {
        println!("{text}");
    }
    Ok(())
}
