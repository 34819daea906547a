//! Wires the command line to the library: turns flags into options, builds
//! the real or simulated environment, takes the lock, and calls one
//! operation per subcommand. Results go to stdout; the log goes to stderr
//! (see [`crate::logging`] for how each line shows once).

use crate::cli::{
    AttachArgs, Cli, Command, CompletionsArgs, DetachArgs, FirmwareArgs, FirmwareCommand, InitArgs,
    ManArgs, ServiceCommand, ServiceInstallArgs, StatusArgs, UpArgs, VmArgs,
};
use crate::logging::Output;
use crate::traced::{TracedBus, TracedXe};
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
use std::path::PathBuf;
use std::time::Duration;

/// Run the chosen subcommand.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let out = Output::new(cli.quiet);
    // Commands about the command line itself need no host at all.
    match &cli.command {
        Command::Completions(args) => return completions(args),
        Command::Man(args) => return man(args, &out),
        _ => {}
    }
    // The simulation starts from a power loss where the Coral needs firmware,
    // and from a ready Coral where the command expects one.
    let simulated_coral = match &cli.command {
        Command::Attach(_) | Command::Detach(_) | Command::Status(_) => CoralState::Ready,
        _ => CoralState::Uninitialized,
    };
    let env = Environment::new(cli.simulate.then_some(simulated_coral));
    match &cli.command {
        Command::Init(args) => run_init(&cli, &env, &out, args),
        Command::Attach(args) => run_attach(&cli, &env, &out, args),
        Command::Detach(args) => run_detach(&cli, &env, &out, args),
        Command::Status(args) => run_status(&env, &out, args),
        Command::Up(args) => run_up(&cli, &env, &out, args),
        Command::Firmware(FirmwareCommand::Show(args)) => {
            out.data(&firmware_cmd::show(&firmware_choice(args))?);
            Ok(())
        }
        Command::Firmware(FirmwareCommand::Install {
            file,
            allow_unknown_firmware,
            dir,
        }) => {
            out.result(&firmware_cmd::install(file, dir, *allow_unknown_firmware)?);
            Ok(())
        }
        Command::Firmware(FirmwareCommand::Fetch { dir }) => {
            out.result(&firmware_cmd::fetch(dir)?);
            Ok(())
        }
        Command::Service(ServiceCommand::Install(args)) => {
            out.result(&service::install(
                &service_spec(args)?,
                args.root.root.as_deref(),
            )?);
            Ok(())
        }
        Command::Service(ServiceCommand::Show(args)) => {
            out.data(&service::show(args.root.as_deref())?);
            Ok(())
        }
        Command::Service(ServiceCommand::Uninstall(args)) => {
            out.result(&service::uninstall(args.root.as_deref())?);
            Ok(())
        }
        Command::Completions(_) | Command::Man(_) => unreachable!("handled above"),
    }
}

/// `coral completions SHELL`: the completion script on stdout.
fn completions(args: &CompletionsArgs) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let mut command = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "coral", &mut script);
    write_stdout(&script)
}

/// Raw bytes to stdout; a reader that stopped early (`| head`) is no error.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// `coral man [--dir DIR]`: coral(1) on stdout, or every page written to DIR.
fn man(args: &ManArgs, out: &Output) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let command = Cli::command();
    match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(command.clone(), dir)
                .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
            // The top page again, with the ENVIRONMENT and EXIT STATUS sections.
            let mut page = Vec::new();
            render_man_page(command, &mut page)?;
            let path = dir.join("coral.1");
            std::fs::write(&path, page)
                .with_context(|| format!("cannot write {}", path.display()))?;
            out.result(&format!("wrote the man pages into {}", dir.display()));
        }
        None => {
            let mut page = Vec::new();
            render_man_page(command, &mut page)?;
            write_stdout(&page)?;
        }
    }
    Ok(())
}

/// coral(1): clap_mangen's sections, then ENVIRONMENT and EXIT STATUS.
fn render_man_page(command: clap::Command, page: &mut Vec<u8>) -> anyhow::Result<()> {
    // Without the --help epilogue: the same facts get sections of their own.
    let command = command.after_help("");
    let man = clap_mangen::Man::new(command);
    man.render_title(page)?;
    man.render_name_section(page)?;
    man.render_synopsis_section(page)?;
    man.render_description_section(page)?;
    man.render_options_section(page)?;
    man.render_subcommands_section(page)?;
    let mut extra = String::from(".SH ENVIRONMENT\n");
    for (name, what) in crate::cli::ENVIRONMENT {
        extra.push_str(&format!(".TP\n\\fB{}\\fR\n{}\n", roff(name), roff(what)));
    }
    extra.push_str(".SH \"EXIT STATUS\"\n");
    for (code, what) in EXIT_CODES {
        extra.push_str(&format!(".TP\n{code}\n{}\n", roff(what)));
    }
    extra.push_str(".SH FILES\n.TP\n/var/lib/coral/\nInstalled firmware images.\n.TP\n/run/coral.lock\nThe lock that serializes runs.\n.TP\n/etc/systemd/system/coral\\-up.service\nThe boot unit written by \\fBcoral service install\\fR.\n");
    page.extend_from_slice(extra.as_bytes());
    man.render_version_section(page)?;
    Ok(())
}

/// Exit codes as README.md documents them.
const EXIT_CODES: &[(u8, &str)] = &[
    (0, "done, or nothing to do"),
    (1, "other error"),
    (2, "bad command line"),
    (
        3,
        "no Coral found, or --device matches none / several Corals and no --device",
    ),
    (4, "no firmware image, or an image that fails verification"),
    (5, "USB / DFU failure"),
    (
        6,
        "a deadline passed: the Coral did not re-enumerate, XAPI did not list it",
    ),
    (7, "xe missing, failing or hanging; inventory unreadable"),
    (
        8,
        "VM problem: not found, ambiguous, wrong power state, Coral held by another VM",
    ),
    (9, "another coral run holds the lock"),
];

/// Plain text as roff: backslashes and hyphens escaped, no control line.
fn roff(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

/// Where USB and XAPI access go: the real host, or the built-in simulation.
enum Environment {
    Real {
        usb: RusbBus,
        clock: SystemClock,
        xe: XeCommand,
    },
    /// The simulated host lives as long as the process; its bus and `xe`
    /// are traced at `-vv` exactly as the real backends trace themselves.
    Simulated {
        host: &'static SimulatedHost,
        usb: TracedBus<'static>,
        xe: TracedXe<'static>,
    },
}

impl Environment {
    fn new(simulate: Option<CoralState>) -> Self {
        if let Some(coral) = simulate {
            let host: &'static SimulatedHost = Box::leak(Box::new(SimulatedHost::new(coral)));
            log::info!("{}", host.describe());
            Environment::Simulated {
                host,
                usb: TracedBus(host.bus()),
                xe: TracedXe(host.xe()),
            }
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
            Environment::Simulated { usb, .. } => usb,
        }
    }

    fn clock(&self) -> &dyn Clock {
        match self {
            Environment::Real { clock, .. } => clock,
            Environment::Simulated { host, .. } => host.clock(),
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
            Environment::Simulated { host, xe, .. } => Ok((xe, host.host_uuid().to_string())),
        }
    }

    fn is_simulated(&self) -> bool {
        matches!(self, Environment::Simulated { .. })
    }
}

fn run_init(cli: &Cli, env: &Environment, out: &Output, args: &InitArgs) -> anyhow::Result<()> {
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
            out.data(&coral.to_string());
        }
        return Ok(());
    }
    let _lock = take_lock(cli, env)?;
    let outcomes = init(env.usb(), env.clock(), &mut load, &opts)?;
    for outcome in &outcomes {
        match outcome {
            InitOutcome::AlreadyReady { device } => out.result(&format!(
                "Coral at {} is already ready (18d1:9302); nothing to do",
                device.path
            )),
            InitOutcome::Initialized { after, elapsed, .. } => out.result(&format!(
                "Coral ready at {} after {:.1} s",
                after.path,
                elapsed.as_secs_f64()
            )),
        }
    }
    Ok(())
}

fn run_attach(cli: &Cli, env: &Environment, out: &Output, args: &AttachArgs) -> anyhow::Result<()> {
    let opts = attach_options(&args.vm, args.device.device.clone())?;
    let (runner, host_uuid) = env.xapi()?;
    let xe = XeClient::new(runner, host_uuid, cli.dry_run);
    let _lock = take_lock(cli, env)?;
    let report = attach(env.usb(), &xe, env.clock(), &opts)?;
    print_planned(&xe, out);
    out.result(&report.to_string());
    Ok(())
}

fn run_detach(cli: &Cli, env: &Environment, out: &Output, args: &DetachArgs) -> anyhow::Result<()> {
    let opts = DetachOptions {
        vm: args.vm.clone(),
        device: args.device.device.clone(),
    };
    let (runner, host_uuid) = env.xapi()?;
    let xe = XeClient::new(runner, host_uuid, cli.dry_run);
    let _lock = take_lock(cli, env)?;
    let text = detach(env.usb(), &xe, &opts)?;
    print_planned(&xe, out);
    out.result(&text);
    Ok(())
}

fn run_status(env: &Environment, out: &Output, args: &StatusArgs) -> anyhow::Result<()> {
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
        out.data(&serde_json::to_string_pretty(&report)?);
    } else {
        out.data(&report.render_table());
    }
    Ok(())
}

fn run_up(cli: &Cli, env: &Environment, out: &Output, args: &UpArgs) -> anyhow::Result<()> {
    let opts = UpOptions {
        replug_timeout: seconds("--timeout", args.timeout)?,
        attach: attach_options(&args.vm, args.device.device.clone())?,
        dry_run: cli.dry_run,
    };
    let choice = firmware_choice(&args.firmware);
    let mut load = || load_firmware(&choice, env.is_simulated());
    let (runner, host_uuid) = env.xapi()?;
    let xe = XeClient::new(runner, host_uuid, cli.dry_run);
    let _lock = take_lock(cli, env)?;
    let report = up(env.usb(), &xe, env.clock(), &mut load, &opts)?;
    print_planned(&xe, out);
    if let Some(attach) = &report.attach {
        out.result(&attach.to_string());
    }
    out.result(&report.to_string());
    Ok(())
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

/// A dry run's plan is what the user asked to see: printed even with `-q`.
fn print_planned(xe: &XeClient, out: &Output) {
    for command in xe.planned_commands() {
        out.data(&format!("would run: {command}"));
    }
}
