//! What each subcommand does.

use anyhow::Context as _;
use gateway::cli::RunArgs;
use gateway::config::{self, Backend, Config, Upstream};
use gateway::demo::DemoBackends;
use gateway::gateway::Gateway;
use gateway::plugin::{self, Origin, PluginHost};
use gateway::server;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let config = args.to_config()?;
    let (gw, receiver) = Gateway::build_from(config, args.config.clone())?;
    server::run(gw, receiver, None, CancellationToken::new())?;
    Ok(ExitCode::SUCCESS)
}

pub fn demo(port: u16, admin: SocketAddr) -> anyhow::Result<ExitCode> {
    let backends = Arc::new(DemoBackends::start(3)?);
    let mut upstream = Upstream::with_backends(
        backends
            .addrs()
            .iter()
            .enumerate()
            .map(|(i, a)| Backend { id: Some(format!("backend-{}", i + 1)), ..Backend::at(a.to_string()) })
            .collect(),
    );
    upstream.health_check.path = Some("/healthz".into());
    upstream.health_check.interval = Duration::from_secs(1);
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let mut config = Config::single(listen, upstream);
    config.admin.address = Some(admin);
    let (gw, receiver) = Gateway::build(config)?;
    let plugin = gw.view().upstreams[0].selector.binding().plugin();
    let list: Vec<String> =
        backends.addrs().iter().enumerate().map(|(i, a)| format!("backend-{} {a}", i + 1)).collect();
    println!(
        "\nDemo book store: the gateway on http://{listen} balances three backends ({}),\n\
         choosing with the Wasm plugin `{}` ({}); health checks GET /healthz every second.\n\n\
         Live stats page (open it in a browser):  http://{admin}/\n\n\
         Try it:\n    for i in 1 2 3 4; do curl -s http://{listen}/book/dune; done\n\n\
         Stop backend 3 and watch the gateway route around it on the stats page (start brings it back):\n    \
         curl -X POST http://{admin}/demo/backends/3/stop\n    curl -s http://{admin}/api/upstreams\n    \
         curl -X POST http://{admin}/demo/backends/3/start\n\n\
         Prometheus metrics:  curl -s http://{admin}/metrics\n\nCtrl-C stops the demo.\n",
        list.join(", "),
        plugin.name,
        plugin.origin,
    );
    let ext: Arc<dyn gateway::admin::Extension> = backends;
    server::run(gw, receiver, Some(ext), CancellationToken::new())?;
    Ok(ExitCode::SUCCESS)
}

pub fn config_check(file: &Path) -> anyhow::Result<ExitCode> {
    let config = match config::load(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("invalid: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    // What only the start checked: a registry upstream needs the admin listener.
    if let Err(e) = config::check_registry_listener(&config) {
        eprintln!("invalid: {}: {e}", file.display());
        return Ok(ExitCode::FAILURE);
    }
    // Plugins: every strategy must load and accept its params, as at start. The
    // compiled cache is used, so a plugin compiled before is checked quickly.
    let host = PluginHost::new(&config.plugins)?;
    for (name, up) in &config.upstreams {
        for (step, s) in up.strategy.steps().iter().enumerate() {
            let checked = host.resolve(&s.plugin).and_then(|p| host.bind_step(name, step, p, &s.params));
            if let Err(e) = checked {
                let field = match up.strategy.is_chain() {
                    true => format!("upstreams.{name}.strategy[{step}]"),
                    false => format!("upstreams.{name}.strategy"),
                };
                eprintln!("invalid: {}: {field}: {e}", file.display());
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    if let Some(addr) = config.admin.address
        && let Err(e) = gateway::admin::Auth::new(addr, config.admin.token_file.as_deref(), config.admin.public_metrics)
    {
        eprintln!("invalid: {}: admin: {e}", file.display());
        return Ok(ExitCode::FAILURE);
    }
    let backends: usize = config.upstreams.values().map(|u| u.backends.len()).sum();
    println!(
        "ok: {} is valid ({} upstream(s), {backends} backend(s), {} route(s); every strategy loaded and accepted its params)",
        file.display(),
        config.upstreams.len(),
        config.effective_routes().len(),
    );
    Ok(ExitCode::SUCCESS)
}

pub fn plugin_check(file: &Path, params: &str, smoke: bool, pool: Option<&Path>) -> anyhow::Result<ExitCode> {
    let params: serde_json::Value =
        serde_json::from_str(params).with_context(|| format!("--params `{params}` is not JSON"))?;
    let host = PluginHost::new(&config::Plugins::default())?;
    let name = file.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin");
    let result = host.load_file(name, file).and_then(|p| {
        let size = p.size;
        let compile = p.compile_time;
        host.bind("check", p, &params).map(|b| (size, compile, b))
    });
    let (size, compile, binding) = match result {
        Ok(ok) => ok,
        Err(e) => {
            eprintln!("invalid: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let smoked = if smoke {
        match gateway::replay::smoke(&binding, pool) {
            Ok(lines) => lines,
            Err(e) => {
                eprintln!("invalid: {} loads and accepts {params}, but {e}", file.display());
                return Ok(ExitCode::FAILURE);
            }
        }
    } else {
        Vec::new()
    };
    println!(
        "ok: {} is a valid strategy for {} ({} KiB, compiled in {:.0?}; configure accepted {params})",
        file.display(),
        plugin::WORLD,
        size.div_ceil(1024),
        compile
    );
    for line in &smoked {
        println!("  {line}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn plugin_list(dir: &Path) -> anyhow::Result<ExitCode> {
    let cfg = config::Plugins { dir: dir.into(), ..Default::default() };
    let host = PluginHost::new(&cfg)?;
    let mut rows = Vec::new();
    let mut names: Vec<String> = plugin::builtin_names().into_iter().map(str::to_owned).collect();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "wasm")
                && let Some(stem) = p.file_stem().and_then(|s| s.to_str())
                && !names.iter().any(|n| n == stem)
            {
                names.push(stem.to_owned());
            }
        }
    }
    names.sort();
    for name in names {
        match host.resolve(&name) {
            Ok(p) => {
                let source = match &p.origin {
                    Origin::Builtin(_) => "built-in".to_owned(),
                    Origin::File(f) if plugin::builtin_bytes(&name).is_some() => {
                        format!("{} (overrides built-in)", f.display())
                    }
                    Origin::File(f) => f.display().to_string(),
                };
                rows.push([name, source, p.hash[..12].to_owned(), format!("{:.1?}", p.compile_time), "-".into()]);
            }
            Err(e) => rows.push([name, format!("{}", dir.display()), "-".into(), "-".into(), e.to_string()]),
        }
    }
    print_table(&["NAME", "SOURCE", "SHA256", "LOAD", "ERROR"], &rows);
    Ok(ExitCode::SUCCESS)
}

pub fn plugin_new(
    name: &str,
    lang: gateway::scaffold::Lang,
    dir: Option<std::path::PathBuf>,
) -> anyhow::Result<ExitCode> {
    let dest = dir.unwrap_or_else(|| std::path::PathBuf::from(name));
    let files = gateway::scaffold::create(name, lang, &dest)?;
    println!("created {} ({} files); build it as its README.md says:", dest.display(), files.len());
    let readme = std::fs::read_to_string(dest.join("README.md")).unwrap_or_default();
    if let Some(block) = readme.split("```sh").nth(1).and_then(|b| b.split("```").next()) {
        println!("    cd {}", dest.display());
        for line in block.lines().filter(|l| !l.trim().is_empty()) {
            println!("    {}", line.trim());
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn plugin_export(name: &str, output: &Path) -> anyhow::Result<ExitCode> {
    let bytes = plugin::builtin_bytes(name)
        .with_context(|| format!("no built-in plugin `{name}` (built-in: {})", plugin::builtin_names().join(", ")))?;
    std::fs::write(output, bytes).with_context(|| format!("cannot write {}", output.display()))?;
    println!("wrote built-in `{name}` to {} ({} bytes)", output.display(), bytes.len());
    Ok(ExitCode::SUCCESS)
}

pub fn replay(args: &gateway::cli::ReplayArgs) -> anyhow::Result<ExitCode> {
    let report = gateway::replay::replay(&args.options()?)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        gateway::replay::print(&report);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn plugin_componentize(module: &Path, output: &Path) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(module).with_context(|| format!("cannot read {}", module.display()))?;
    if bytes.starts_with(b"\0asm") && bytes.get(4..8) != Some(&[1, 0, 0, 0][..]) {
        anyhow::bail!("{} is already a component: `gateway plugin check` it as it is", module.display());
    }
    let component = wit_component::ComponentEncoder::default()
        .module(&bytes)
        .and_then(|e| e.validate(true).encode())
        .map_err(|e| {
        anyhow::anyhow!(
            "cannot wrap {} as a component: {e:#}\n  hint: link the bindings' `*_component_type.o` into the module \
                 (the C template's build.sh does), and import nothing but the gateway's interfaces",
            module.display()
        )
    })?;
    std::fs::write(output, &component).with_context(|| format!("cannot write {}", output.display()))?;
    println!(
        "wrote {} ({} bytes); check it with `gateway plugin check {}`",
        output.display(),
        component.len(),
        output.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
