//! Wires the command line to the library: turns flags into options, builds
//! the real or simulated environment, takes the lock, and calls one
//! operation per subcommand. Results go to stdout; the log goes to stderr
//! (see [`crate::logging`] for how each line shows once).

use crate::cli::{
    AttachArgs, Cli, Command, CompletionsArgs, DetachArgs, DoctorArgs, FirmwareArgs,
    FirmwareCommand, InitArgs, ManArgs, ServiceCommand, StatusArgs, UpArgs, VmArgs, WatchArgs,
};
use crate::logging::Output;
use crate::traced::{TracedBus, TracedXe};
use anyhow::Context;
use coral::clock::{Clock, SystemClock};
use coral::config::ConfigPath;
use coral::error::{fail, FailureKind};
use coral::firmware::{self, FirmwareChoice, FirmwareImage, FirmwareSource};
use coral::lock::{self, LockGuard, LockWait};
use coral::mapping_state::StateStore;
use coral::ops::attach::{attach, AttachOptions};
use coral::ops::detach::{detach, DetachOptions};
use coral::ops::init::{init, InitOptions, InitOutcome};
use coral::ops::status::status;
use coral::ops::up::{up, UpOptions};
use coral::ops::{boot, doctor, firmware_cmd, service};
use coral::simulate::{
    sim_paths, stand_in_firmware, SimPaths, SimulatedHost, SIMULATED_USB_POLICY,
};
use coral::usb::rusb_backend::RusbBus;
use coral::usb::{CoralState, UsbBus};
use coral::xe::client::XeClient;
use coral::xe::command::XeCommand;
use coral::xe::inventory::{this_host_uuid, DEFAULT_INVENTORY};
use coral::xe::XeRunner;
use coral::DATA_DIR;
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
    // One story: whatever the first command, a new simulated world starts
    // from a power loss (the Coral a boot loader at 1-4, needing firmware).
    let env = Environment::new(cli.simulate, writes_simulated_world(&cli))?;
    let result = run_command(&cli, &env, &out);
    // The simulated world lives on in its state file (not after a dry run,
    // nor after a command that only reads: those write nothing at all).
    if let Environment::Simulated { host, paths, .. } = &env {
        if changes_simulated_host(&cli.command) && !cli.dry_run {
            host.save(&paths.state)?;
        }
    }
    result
}

/// Whether this run may write into the simulated world: a command that
/// changes it, not under --dry-run.
fn writes_simulated_world(cli: &Cli) -> bool {
    let changes = changes_simulated_host(&cli.command)
        || matches!(
            cli.command,
            Command::Service(ServiceCommand::Install(_) | ServiceCommand::Uninstall(_))
        );
    changes && !cli.dry_run
}

/// The commands that change the simulated Coral or pool (kept in the state
/// file); `service install|uninstall` change only the simulated host's files.
fn changes_simulated_host(command: &Command) -> bool {
    matches!(
        command,
        Command::Init(_)
            | Command::Attach(_)
            | Command::Detach(_)
            | Command::Up(_)
            | Command::Watch(_)
    )
}

fn run_command(cli: &Cli, env: &Environment, out: &Output) -> anyhow::Result<()> {
    match &cli.command {
        Command::Init(args) => run_init(cli, env, out, args),
        Command::Attach(args) => run_attach(cli, env, out, args),
        Command::Detach(args) => run_detach(cli, env, out, args),
        Command::Status(args) => run_status(cli, env, out, args),
        Command::Up(args) => run_up(cli, env, out, args),
        Command::Watch(args) => run_watch(cli, env, args),
        Command::Firmware(FirmwareCommand::Show(args)) => {
            let choice = firmware_choice(args);
            // The simulation shows the image its up and doctor would use.
            let shown = if env.is_simulated() && firmware::nothing_configured(&choice) {
                firmware_cmd::describe(&load_firmware(&choice, true)?)
            } else {
                firmware_cmd::show(&choice)?
            };
            out.data(&shown);
            Ok(())
        }
        Command::Firmware(FirmwareCommand::Install {
            file,
            allow_unknown_firmware,
            dir,
        }) => {
            out.result(&firmware_cmd::install(
                file,
                dir,
                *allow_unknown_firmware,
                cli.dry_run || cli.simulate,
            )?);
            Ok(())
        }
        Command::Firmware(FirmwareCommand::Fetch { dir }) => {
            out.result(&firmware_cmd::fetch(dir, cli.dry_run || cli.simulate)?);
            Ok(())
        }
        Command::Service(command) => run_service(cli, env, out, command),
        Command::Doctor(args) => run_doctor(cli, env, out, args),
        Command::Completions(_) | Command::Man(_) => unreachable!("handled before the host"),
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
            coral::atomic_file::write(&path, &page, MAN_PAGE_MODE)
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

/// The mode of the man pages `coral man --dir` writes.
const MAN_PAGE_MODE: u32 = 0o644;

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
    extra.push_str(&format!(
        ".SH FILES\n.TP\n{}/\nInstalled firmware images.\n.TP\n{}\nThe lock that serializes runs.\n.TP\n/etc/systemd/system/coral\\-up.service\nThe boot unit written by \\fBcoral service install\\fR.\n",
        roff(DATA_DIR),
        roff(coral::lock::DEFAULT_LOCK_FILE)
    ));
    page.extend_from_slice(extra.as_bytes());
    man.render_version_section(page)?;
    one_preamble(page);
    Ok(())
}

/// clap_mangen starts every section it renders with the same two-line
/// quote-string preamble (`.ie \n(.g .ds Aq …`); a page needs it once.
fn one_preamble(page: &mut Vec<u8>) {
    let text = String::from_utf8_lossy(page).into_owned();
    let mut seen = std::collections::HashSet::new();
    let kept: Vec<&str> = text
        .split_inclusive('\n')
        .filter(|line| {
            let preamble = line.starts_with(".ie \\n(.g .ds Aq") || line.starts_with(".el .ds Aq");
            !preamble || seen.insert(line.to_string())
        })
        .collect();
    *page = kept.concat().into_bytes();
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

/// Where `service` and `doctor` look: under --simulate the simulated host's
/// own root (never the real /etc), else --root or `/`.
fn service_place(cli: &Cli, env: &Environment, root: Option<&std::path::Path>) -> service::Place {
    let root = if let Some(sim) = env.sim_paths() {
        Some(sim.root.clone())
    } else {
        root.map(PathBuf::from)
    };
    let config = match &root {
        // $CORAL_CONFIG names a real file: the simulation keeps its own.
        Some(sim) if cli.simulate => ConfigPath {
            file: sim.join(coral::config::DEFAULT_PATH.trim_start_matches('/')),
            from_env: None,
        },
        _ => ConfigPath::resolve(root.as_deref()),
    };
    service::Place {
        root,
        config,
        dry_run: cli.dry_run,
    }
}

fn unit_spec(place: &service::Place) -> anyhow::Result<service::UnitSpec> {
    Ok(service::UnitSpec {
        exe: std::env::current_exe().context("cannot tell where this coral binary is")?,
        config_env: place.config.from_env.clone(),
    })
}

fn run_service(
    cli: &Cli,
    env: &Environment,
    out: &Output,
    command: &ServiceCommand,
) -> anyhow::Result<()> {
    match command {
        ServiceCommand::Install(args) => {
            let place = service_place(cli, env, args.root.root.as_deref());
            let spec = unit_spec(&place)?;
            let (runner, host_uuid) = env.xapi()?;
            let xe = XeClient::new(runner, host_uuid, true);
            if args.vm.force_shutdown {
                return Err(fail(
                    FailureKind::Other,
                    "--force-shutdown is not for the boot service or the watcher: they never hard-stop a VM",
                ));
            }
            let request = service::InstallRequest {
                vm: args.vm.vm.clone().unwrap_or_default(),
                device: args.device.device.clone(),
                start: args.vm.start,
                restart: args.vm.restart,
                deadlines: entry_deadlines(&args.vm, &args.replug),
                replace: args.replace,
            };
            out.result(&service::install(&xe, &place, &spec, &request)?);
            Ok(())
        }
        ServiceCommand::Show(args) => {
            let place = service_place(cli, env, args.root.root.as_deref());
            let spec = unit_spec(&place)?;
            let request = args.vm.as_ref().map(|vm| service::InstallRequest {
                vm: vm.clone(),
                device: args.device.clone(),
                start: args.start,
                restart: args.restart,
                deadlines: Default::default(),
                replace: args.replace,
            });
            let xapi = request.as_ref().and_then(|_| env.xapi().ok());
            let xe = xapi
                .as_ref()
                .map(|(runner, host)| XeClient::new(*runner, host.clone(), true));
            out.data(&service::show(
                xe.as_ref(),
                &place,
                &spec,
                request.as_ref(),
            )?);
            Ok(())
        }
        ServiceCommand::Uninstall(args) => {
            let place = service_place(cli, env, args.root.root.as_deref());
            out.result(&service::uninstall(&place, args.vm.as_deref())?);
            Ok(())
        }
    }
}

fn run_doctor(cli: &Cli, env: &Environment, out: &Output, args: &DoctorArgs) -> anyhow::Result<()> {
    let place = service_place(cli, env, args.root.root.as_deref());
    let spec = unit_spec(&place)?;
    let choice = firmware_choice(&FirmwareArgs::default());
    let mut load = || {
        firmware::load(&choice).or_else(|err| {
            if env.is_simulated() && firmware::nothing_configured(&choice) {
                Ok(stand_in_firmware())
            } else {
                Err(err)
            }
        })
    };
    let usb_policy = std::env::var_os(doctor::USB_POLICY_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            place
                .root
                .clone()
                .unwrap_or_else(|| PathBuf::from("/"))
                .join(doctor::USB_POLICY.trim_start_matches('/'))
        });
    let report = doctor::doctor(doctor::DoctorInputs {
        binary: (spec.exe.clone(), env!("CARGO_PKG_VERSION").to_string()),
        load_firmware: &mut load,
        usb: env.usb(),
        xapi: env.xapi(),
        config: place.config.clone(),
        root: place.root.clone(),
        systemd: place.systemd(),
        usb_policy,
        usb_policy_when_absent: cli.simulate.then_some(SIMULATED_USB_POLICY),
        lock_file: cli.lock.lock_file.clone(),
        state: state_store(env),
    });
    if args.json {
        out.data(&serde_json::to_string_pretty(&report)?);
    } else {
        out.data(&report.to_string());
    }
    if report.passed {
        Ok(())
    } else {
        let failed = report
            .checks
            .iter()
            .filter(|c| c.verdict == doctor::Verdict::Fail)
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        Err(fail(
            FailureKind::Other,
            format!("doctor: failed: {failed}; each check above says the fix"),
        ))
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
        /// Where it is kept between runs.
        paths: SimPaths,
        usb: TracedBus<'static>,
        xe: TracedXe<'static>,
    },
}

impl Environment {
    /// The host; a simulated one is prepared on disk (its private
    /// directory, its root's usb-policy.conf) only when the command `writes`:
    /// a read or a dry run leaves no trace.
    fn new(simulate: bool, writes: bool) -> anyhow::Result<Self> {
        if simulate {
            let paths = sim_paths()?;
            let host = SimulatedHost::load_or_new(&paths.state, CoralState::Uninitialized)?;
            if writes {
                paths.prepare()?;
                seed_sim_root(&paths.root)?;
            }
            log::info!("{} (state: {})", host.describe(), paths.state.display());
            let host: &'static SimulatedHost = Box::leak(Box::new(host));
            Ok(Environment::Simulated {
                host,
                paths,
                usb: TracedBus(host.bus()),
                xe: TracedXe(host.xe()),
            })
        } else {
            Ok(Environment::Real {
                usb: RusbBus::new(),
                clock: SystemClock::new(),
                xe: XeCommand::from_env(),
            })
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

    /// Where the simulated host is kept (None on the real host).
    fn sim_paths(&self) -> Option<&SimPaths> {
        match self {
            Environment::Simulated { paths, .. } => Some(paths),
            Environment::Real { .. } => None,
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
        replug_timeout: seconds("--timeout", args.replug.timeout)?,
        wait_device: seconds("--wait-device", args.wait_device)?,
    };
    let choice = firmware_choice(&args.firmware);
    let mut load = || load_firmware(&choice, env.is_simulated());
    if cli.dry_run {
        let image = load()?;
        let corals = env.usb().list_corals()?;
        let chosen = corals.iter().filter(|c| {
            opts.device
                .as_ref()
                .is_none_or(|d| c.path.to_string() == *d)
        });
        for coral in chosen {
            out.data(&match coral.state {
                CoralState::Ready if !opts.force => format!(
                    "the Coral at {} is already ready (18d1:9302); would do nothing",
                    coral.path
                ),
                _ => format!(
                    "would upload {} bytes of firmware ({}, verified) to the Coral at {} and wait until it is ready",
                    image.bytes.len(),
                    image_name(&image),
                    coral.path
                ),
            });
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
    let xe = XeClient::new(runner, host_uuid, cli.dry_run).waiting_for_xapi(
        env.clock(),
        seconds("--xapi-timeout", args.vm.xapi_timeout)?,
    );
    let mut opts = opts;
    opts.intent = intent_store(cli, env);
    let _lock = take_lock(cli, env)?;
    let report = attach(env.usb(), &xe, env.clock(), &opts);
    finish_unfinished(cli, env, &xe, env.clock());
    let report = report?;
    print_planned(&xe, out);
    out.result(&report.to_string());
    set_paused(cli, env, &report.vm_uuid, &opts.vm, false);
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
    let report = detach(env.usb(), &xe, &opts)?;
    print_planned(&xe, out);
    out.result(&report.line);
    // The admin's decision stands: `coral watch` leaves this mapping alone
    // until `coral attach` or `coral up` for the VM resumes it.
    set_paused(cli, env, &report.vm_uuid, &opts.vm, true);
    Ok(())
}

fn run_status(cli: &Cli, env: &Environment, out: &Output, args: &StatusArgs) -> anyhow::Result<()> {
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
    let mut report = status(env.usb(), client.as_ref())?;
    // The mappings and what `coral watch` last did (a broken config or
    // state file does not hide the rest of the status).
    let config =
        coral::config::load(&service_place(cli, env, None).config.file).unwrap_or_else(|e| {
            log::warn!("{e:#}");
            None
        });
    let store = if cli.dry_run {
        state_store(env).read_only()
    } else {
        state_store(env)
    };
    coral::ops::status::add_mappings(&mut report, client.as_ref(), config.as_ref(), &store);
    if args.json {
        out.data(&serde_json::to_string_pretty(&report)?);
    } else {
        out.data(&report.render_table());
    }
    Ok(())
}

fn run_up(cli: &Cli, env: &Environment, out: &Output, args: &UpArgs) -> anyhow::Result<()> {
    if args.vm.vm.is_none() {
        return run_up_all(cli, env, out, args);
    }
    let opts = UpOptions {
        replug_timeout: seconds("--timeout", args.replug.timeout)?,
        attach: attach_options(&args.vm, args.device.device.clone())?,
        dry_run: cli.dry_run,
        wait_device: seconds("--wait-device", args.wait_device)?,
    };
    let choice = firmware_choice(&args.firmware);
    let mut load = || load_firmware(&choice, env.is_simulated());
    let (runner, host_uuid) = env.xapi()?;
    // SIGTERM and SIGINT stop it between steps (what has begun is finished).
    let clock = stoppable(env)?;
    let xe = XeClient::new(runner, host_uuid, cli.dry_run)
        .waiting_for_xapi(
            clock.as_ref(),
            seconds("--xapi-timeout", args.vm.xapi_timeout)?,
        )
        .bounded_by(clock.as_ref());
    let mut opts = opts;
    opts.attach.intent = intent_store(cli, env);
    let _lock = take_lock(cli, env)?;
    let report = up(env.usb(), &xe, clock.as_ref(), &mut load, &opts);
    finish_unfinished(cli, env, &xe, clock.as_ref());
    let report = report.map_err(stopped_then_up)?;
    print_planned(&xe, out);
    if let Some(attach) = &report.attach {
        out.result(&attach.to_string());
        set_paused(cli, env, &attach.vm_uuid, &opts.attach.vm, false);
    }
    out.result(&report.to_string());
    Ok(())
}

/// `coral up` without --vm: every config entry, within the boot budget. The
/// config is read and checked before any USB or `xe` call.
fn run_up_all(cli: &Cli, env: &Environment, out: &Output, args: &UpArgs) -> anyhow::Result<()> {
    let place = service_place(cli, env, None);
    let config = coral::config::load(&place.config.file)?.ok_or_else(|| {
        fail(
            FailureKind::Other,
            format!(
                "no --vm and no config at {}; pass --vm VM, or add an entry with `coral service install --vm VM`",
                place.config.file.display()
            ),
        )
    })?;
    // A mapping paused by `coral detach` stays as the admin left it.
    let store = if cli.dry_run {
        state_store(env).read_only()
    } else {
        state_store(env)
    };
    let states = store.load_or_recover();
    let mut config = config;
    config.entries.retain(|entry| {
        let paused = states
            .mappings
            .get(&entry.vm_uuid)
            .is_some_and(|state| state.paused);
        if paused {
            log::info!(
                "{}: paused by `coral detach`; skipped (`coral up --vm {}` resumes it)",
                entry.label(),
                entry.vm_uuid
            );
        }
        !paused
    });
    if config.entries.is_empty() && !states.mappings.is_empty() {
        out.result("up: every entry is paused by `coral detach`; nothing to do");
        return Ok(());
    }
    let choice = firmware_choice(&args.firmware);
    let mut load = || load_firmware(&choice, env.is_simulated());
    let (runner, host_uuid) = env.xapi()?;
    let stop_aware = stoppable(env)?;
    let _lock = take_lock(cli, env)?;
    // One deadline from here on, for every wait and every `xe` call.
    let clock = boot::boot_clock(stop_aware.as_ref());
    let xe = XeClient::new(runner, host_uuid, cli.dry_run).bounded_by(&clock);
    let intent = intent_store(cli, env);
    let report = boot::up_all(
        env.usb(),
        &xe,
        &clock,
        &mut load,
        &config,
        cli.dry_run,
        intent.as_ref(),
    );
    finish_unfinished(cli, env, &xe, &clock);
    let report = report?;
    print_planned(&xe, out);
    for outcome in &report.outcomes {
        if let Ok(up) = &outcome.result {
            out.result(&format!("{}: {up}", outcome.entry.label()));
        }
    }
    report.into_result()
}

/// Give a simulated host its /etc/xensource/usb-policy.conf (XCP-ng's
/// defaults as the fact sheet gives them) when its world is first written.
fn seed_sim_root(root: &std::path::Path) -> anyhow::Result<()> {
    let policy = root.join(doctor::USB_POLICY.trim_start_matches('/'));
    if policy.exists() {
        return Ok(());
    }
    coral::config::write_file(&policy, SIMULATED_USB_POLICY.as_bytes())
}

fn run_watch(cli: &Cli, env: &Environment, args: &WatchArgs) -> anyhow::Result<()> {
    use crate::watch_runtime::{CancellableClock, HostWakeups, SimulatedWakeups};
    use coral::ops::watch::{watch, LockAttempt, Mapping, Wakeups, WatchEnv, WatchOptions};

    // The mappings: --vm, else every entry of the config (read and checked
    // before anything else; a broken config is the one thing that ends the watcher).
    if args.vm.force_shutdown {
        return Err(fail(
            FailureKind::Other,
            "--force-shutdown is not for the watcher: it never hard-stops a VM",
        ));
    }
    let mappings = match &args.vm.vm {
        Some(vm) => vec![Mapping {
            vm: vm.clone(),
            name: None,
            device: args.device.device.clone(),
            start: args.vm.start,
            restart: args.vm.restart,
            deadlines: Default::default(),
        }],
        None => config_mappings(&service_place(cli, env, None).config.file)?,
    };
    // SIGHUP: the config again (a --vm watcher keeps its one mapping).
    let reload: crate::watch_runtime::Reload = match &args.vm.vm {
        Some(_) => {
            let same = mappings.clone();
            Box::new(move || Ok(same.clone()))
        }
        None => {
            let file = service_place(cli, env, None).config.file;
            Box::new(move || config_mappings(&file))
        }
    };
    let opts = WatchOptions {
        mappings,
        max_restarts_per_hour: args.max_restarts_per_hour,
        usb_poll: coral::ops::watch::DEFAULT_USB_POLL,
        xapi_check: seconds("--xapi-check", args.xapi_check)?,
        recovery: UpOptions {
            wait_device: Duration::ZERO,
            replug_timeout: seconds("--timeout", args.replug.timeout)?,
            attach: attach_options(&args.vm, None)?,
            dry_run: cli.dry_run,
        },
    };
    let choice = firmware_choice(&args.firmware);
    let mut load = || load_firmware(&choice, env.is_simulated());
    let (runner, host_uuid) = env.xapi()?;
    let xapi_timeout = seconds("--xapi-timeout", args.vm.xapi_timeout)?;
    // A dry run checks every mapping once, writes nothing (not even the
    // watcher's record) and prints what a recovery would run.
    let state = if cli.dry_run {
        state_store(env).read_only()
    } else {
        state_store(env)
    };
    let lock_file = cli.lock.lock_file.clone();
    let simulated_or_dry = env.is_simulated() || cli.dry_run;
    let lock = move || {
        if simulated_or_dry {
            return Ok(LockAttempt::Held(None));
        }
        Ok(match lock::try_acquire(&lock_file)? {
            Some(guard) => LockAttempt::Held(Some(guard)),
            None => LockAttempt::Busy,
        })
    };
    let (wakeups, clock): (Box<dyn Wakeups + '_>, Box<dyn Clock + '_>) = match env {
        _ if cli.dry_run => (Box::new(StopAtOnce), Box::new(ClockRef(env.clock()))),
        Environment::Simulated { host, .. } => (
            Box::new(SimulatedWakeups::new(host)),
            Box::new(ClockRef(host.clock())),
        ),
        Environment::Real { .. } => {
            let wakeups = HostWakeups::start(reload)?;
            let clock = CancellableClock::new(wakeups.stop_flag());
            (Box::new(wakeups), Box::new(clock))
        }
    };
    // After a stop, every `xe` call ends by the stop's deadline.
    let xe = XeClient::new(runner, host_uuid, cli.dry_run)
        .waiting_for_xapi(clock.as_ref(), xapi_timeout)
        .bounded_by(clock.as_ref());
    let mut watch_env = WatchEnv {
        usb: env.usb(),
        xe: &xe,
        clock: clock.as_ref(),
        load_firmware: &mut load,
        lock: &lock,
        state: &state,
    };
    watch(&mut watch_env, wakeups.as_ref(), &opts);
    Ok(())
}

/// The clock `coral up` runs on: on the real host, one that SIGTERM and
/// SIGINT stop between steps (the lifetime owner, `watch_runtime`).
fn stoppable(env: &Environment) -> anyhow::Result<Box<dyn Clock + '_>> {
    Ok(match env {
        Environment::Real { .. } => Box::new(crate::watch_runtime::stoppable_clock()?),
        Environment::Simulated { .. } => Box::new(ClockRef(env.clock())),
    })
}

/// A stop before a step, as the one error line with its next step.
fn stopped_then_up(err: anyhow::Error) -> anyhow::Error {
    if coral::clock::is_stopped(&err) {
        coral::error::fail_then(
            FailureKind::Other,
            format!("{err:#}"),
            coral::error::NextStep::Up,
        )
    } else {
        err
    }
}

/// The watcher's mappings: every entry of the config at `file`.
fn config_mappings(file: &std::path::Path) -> anyhow::Result<Vec<coral::ops::watch::Mapping>> {
    let config = coral::config::load(file)?.ok_or_else(|| {
        fail(
            FailureKind::Other,
            format!(
                "no --vm and no config at {}; pass --vm VM, or add an entry with `coral service install --vm VM`",
                file.display()
            ),
        )
    })?;
    Ok(config
        .entries
        .iter()
        .map(|entry| coral::ops::watch::Mapping {
            vm: entry.vm_uuid.clone(),
            name: Some(entry.vm_name.clone()),
            device: entry.device.clone(),
            start: entry.start,
            restart: entry.restart,
            deadlines: entry.deadlines,
        })
        .collect())
}

/// `--dry-run watch`: one check, then stop.
struct StopAtOnce;

impl coral::ops::watch::Wakeups for StopAtOnce {
    fn wait(&self, _timeout: Duration) -> coral::ops::watch::Wake {
        coral::ops::watch::Wake::Stop
    }
}

/// A borrowed clock as a boxed one.
struct ClockRef<'a>(&'a dyn Clock);

impl Clock for ClockRef<'_> {
    fn now(&self) -> Duration {
        self.0.now()
    }
    fn sleep(&self, duration: Duration) {
        self.0.sleep(duration)
    }
}

/// Where each mapping's state lives: `$CORAL_STATE_DIR` (default
/// [`DATA_DIR`]), or under --simulate the simulated host's own root.
fn state_store(env: &Environment) -> StateStore {
    if let Some(sim) = env.sim_paths() {
        StateStore::in_dir(&sim.root.join(DATA_DIR.trim_start_matches('/')))
    } else {
        StateStore::from_env()
    }
}

/// Where a restart's intent is written before its shutdown (None in a dry run).
fn intent_store(cli: &Cli, env: &Environment) -> Option<StateStore> {
    (!cli.dry_run).then(|| state_store(env))
}

/// After the command's own work (whatever came of it), under its lock:
/// start a VM a previous run halted and left down (its restart intent is
/// still recorded). A stop does not end it: it finishes what coral began.
fn finish_unfinished(cli: &Cli, env: &Environment, xe: &XeClient, clock: &dyn Clock) {
    let store = if cli.dry_run {
        state_store(env).read_only()
    } else {
        state_store(env)
    };
    coral::ops::unfinished::finish_unfinished(xe, clock, &store);
}

/// Pause (`detach`) or resume (`attach`, `up`) a VM's mapping for `coral
/// watch`. A dry run changes nothing; a failure to record is only logged.
fn set_paused(cli: &Cli, env: &Environment, vm_uuid: &str, vm_name: &str, paused: bool) {
    if cli.dry_run || vm_uuid.is_empty() {
        return;
    }
    let store = state_store(env);
    match store.set_paused(vm_uuid, vm_name, paused) {
        Ok(()) if paused => log::info!(
            "coral watch leaves VM '{vm_name}' alone until `coral attach` or `coral up` for it"
        ),
        Ok(()) => {}
        Err(e) => log::warn!("cannot record the pause in {}: {e}", store.path().display()),
    }
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
        vm: vm.vm.clone().unwrap_or_default(),
        device,
        start: vm.start,
        restart: vm.restart,
        force_shutdown: vm.force_shutdown,
        shutdown_timeout: seconds("--shutdown-timeout", vm.shutdown_timeout)?,
        scan_timeout: seconds("--scan-timeout", vm.scan_timeout)?,
        guest_lost: false,
        intent: None,
    })
}

fn firmware_choice(args: &FirmwareArgs) -> FirmwareChoice {
    FirmwareChoice {
        explicit: args.firmware.clone(),
        allow_unknown: args.allow_unknown_firmware,
        install_dir: std::env::var_os("CORAL_FIRMWARE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DATA_DIR)),
    }
}

fn load_firmware(choice: &FirmwareChoice, simulated: bool) -> anyhow::Result<FirmwareImage> {
    if simulated && firmware::nothing_configured(choice) {
        // Said once per process: the watcher loads the image on every recovery.
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            log::warn!(
                "simulation: no firmware configured, using a stand-in; a real run needs the image: {}",
                firmware::how_to_get_one(&choice.install_dir)
            );
        } else {
            log::debug!("simulation: the stand-in firmware again");
        }
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

/// A config entry's own deadlines: those given on the command line that
/// differ from the defaults (the defaults stay implicit in the file).
fn entry_deadlines(vm: &VmArgs, replug: &crate::cli::ReplugArgs) -> coral::config::Deadlines {
    let own = |value: f64, default: Duration| (value != default.as_secs_f64()).then_some(value);
    coral::config::Deadlines {
        replug_timeout: own(replug.timeout, coral::ops::init::DEFAULT_REPLUG_TIMEOUT),
        scan_timeout: own(vm.scan_timeout, coral::ops::attach::DEFAULT_SCAN_TIMEOUT),
        shutdown_timeout: own(
            vm.shutdown_timeout,
            coral::ops::attach::DEFAULT_SHUTDOWN_TIMEOUT,
        ),
    }
}

/// A `--…` seconds flag as a duration. clap already checked it with the
/// same rule ([`coral::clock::checked_seconds`]); a value that slips past is
/// still a usage error (exit 2), never a panic.
fn seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    coral::clock::checked_seconds(value, true)
        .map_err(|why| fail(FailureKind::Usage, format!("{flag} {value}: {why}")))
}

/// A dry run's plan is what the user asked to see: printed even with `-q`.
fn print_planned(xe: &XeClient, out: &Output) {
    for command in xe.planned_commands() {
        out.data(&format!("would run: {command}"));
    }
}
