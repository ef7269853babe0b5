//! The `gateway` binary: parse arguments, build, run. Nothing else.

use clap::Parser;
use gateway::cli::{Cli, Command, ConfigCommand, PluginCommand};
use gateway::config::LogFormat;
use std::io::IsTerminal as _;
use std::process::ExitCode;

mod commands;

// glibc's malloc took ~4k of the ~43k instructions a proxied request cost (callgrind, ~15
// allocations); with mimalloc's thread-local free lists the gateway spent ~25% less user
// CPU per request (README, Performance).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    let format = cli.log_format();
    init_logging(format);
    cli.run.log_format = Some(format);
    if !matches!(cli.command, Some(Command::Plugin { command: PluginCommand::CompileIntoCache { .. } })) {
        // Plugin files compile in a child process (this binary again), so the compiler's
        // memory, and any crash, stay out of this one.
        let exe = std::path::Path::new("/proc/self/exe");
        if let Some(exe) = exe.exists().then(|| exe.to_path_buf()).or_else(|| std::env::current_exe().ok()) {
            gateway::plugin::compile_in_child(exe);
        }
        gateway::plugin::release_memory_with(release_memory);
    }
    let result = match cli.command {
        None => commands::run(&cli.run),
        Some(Command::Demo { port, admin }) => commands::demo(port, admin),
        Some(Command::Config { command: ConfigCommand::Check { file } }) => commands::config_check(&file),
        Some(Command::Register(args)) => {
            args.options().and_then(gateway::discovery::sidecar::run).map(|()| ExitCode::SUCCESS)
        }
        Some(Command::Replay(args)) => commands::replay(&args),
        Some(Command::Plugin { command }) => match command {
            PluginCommand::Check { file, params, smoke, pool } => {
                commands::plugin_check(&file, &params, smoke || pool.is_some(), pool.as_deref())
            }
            PluginCommand::List { plugins } => commands::plugin_list(&plugins),
            PluginCommand::Export { name, output } => commands::plugin_export(&name, &output),
            PluginCommand::Componentize { module, output } => commands::plugin_componentize(&module, &output),
            PluginCommand::New { name, lang, dir } => commands::plugin_new(&name, lang, dir),
            PluginCommand::CompileIntoCache { dir } => Ok(gateway::plugin::compile_child_main(&dir)),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// mimalloc's own API (linked with the allocator above).
#[allow(unsafe_code)]
unsafe extern "C" {
    // SAFETY: `mi_collect(bool)` takes a plain flag and only walks mimalloc's own heaps and
    // arenas; any thread may call it at any time.
    safe fn mi_collect(force: bool);
}

/// Returns memory mimalloc holds freed but resident to the OS now, instead of at the
/// freeing thread's next allocations (after a plugin load: tens of MB).
fn release_memory() {
    mi_collect(true);
}

/// Process logs on stderr: text (coloured only on a terminal) or one flat JSON object per line.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
