//! Running the gateway: one event loop per worker thread, each with its own
//! `SO_REUSEPORT` listener socket and upstream client; a control loop on the main thread
//! for health checks, the admin API and signals; graceful shutdown.

use crate::admin::{self, Auth, Extension};
use crate::gateway::Gateway;
use crate::health;
use crate::listener::{self, Listener};
use crate::metrics;
use crate::proxy;
use crate::reload::{self, Trigger};
use anyhow::Context as _;
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Socket, Type};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The accept loop's first pause after a failed `accept`; it doubles while they fail.
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(20);
/// The longest pause.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Binds `count` listening sockets to `addr` with `SO_REUSEPORT`, so the kernel spreads
/// connections over the workers. Port 0 picks one port for all of them.
pub fn bind(addr: SocketAddr, count: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_tcp_nodelay(true)?;
        socket.bind(&addr.into()).with_context(|| format!("cannot listen on {addr}"))?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

/// Runs the gateway until SIGTERM/SIGINT (or `stop` is cancelled), then stops
/// accepting and lets in-flight requests finish within the grace period.
pub fn run(
    gw: Arc<Gateway>,
    receiver: health::Receiver,
    extension: Option<Arc<dyn Extension>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let threads = gw.config.worker_threads();
    let max_connections =
        gw.config.listeners.iter().fold(0usize, |sum, l| sum.saturating_add(l.limits.max_connections));
    crate::fds::init(max_connections);
    let mut per_worker: Vec<Vec<(std::net::TcpListener, Arc<Listener>)>> = (0..threads).map(|_| Vec::new()).collect();
    let mut cert_stores = Vec::new();
    for l in &gw.config.listeners {
        let (listener, store) = Listener::build(l).map_err(|e| anyhow::anyhow!("listener {}: {e}", l.address))?;
        let sockets = bind(l.address, threads)?;
        let address = sockets[0].local_addr()?;
        match &store {
            Some(store) => {
                tracing::info!(%address, threads, tls = true, certificates = ?store.names(), "listening")
            }
            None if l.redirect_https.is_some() => {
                tracing::info!(%address, threads, redirect_https = l.redirect_https, "listening")
            }
            None => tracing::info!(%address, threads, proxy_protocol = l.proxy_protocol, "listening"),
        }
        cert_stores.extend(store);
        for (i, s) in sockets.into_iter().enumerate() {
            per_worker[i].push((s, listener.clone()));
        }
    }
    let admin_listener = match gw.config.admin.address {
        Some(addr) => {
            let auth = Auth::new(addr, gw.config.admin.token_file.as_deref(), gw.config.admin.public_metrics)?
                .with_registry_token(gw.config.registry.token_file.as_deref())?;
            Some((bind(addr, 1)?.remove(0), Arc::new(auth)))
        }
        None => None,
    };
    for up in &gw.view().upstreams {
        let plugin = up.selector.binding().plugin();
        if up.selector.is_chain() {
            tracing::info!(upstream = %up.name, backends = up.pool.load().members.len(), strategy = %up.selector.name(), "upstream ready");
        } else {
            tracing::info!(upstream = %up.name, backends = up.pool.load().members.len(), plugin = %plugin.name, origin = %plugin.origin, "upstream ready");
        }
    }

    let grace = gw.config.shutdown_grace;
    let workers: Vec<_> = per_worker
        .into_iter()
        .enumerate()
        .map(|(i, listeners)| {
            let (gw, stop) = (gw.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    metrics::enter_worker(i);
                    worker(gw, listeners, stop, grace)
                })
                .context("spawn worker thread")
        })
        .collect::<anyhow::Result<_>>()?;

    let control = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    control.block_on(async {
        gw.start_health_checks(&stop);
        gw.start_discovery(&stop);
        let lookup_gw = gw.clone();
        health::run_passive(Arc::new(move |name| lookup_gw.upstream(name)), receiver, stop.clone());
        if gw.plugins.watch_enabled() {
            crate::plugin::watch(gw.plugins.clone(), stop.clone());
        }
        reload::watch(gw.clone(), stop.clone());
        listener::tls::watch(cert_stores, stop.clone());
        if let Some((listener, auth)) = admin_listener {
            let addr = listener.local_addr()?;
            tracing::info!(address = %addr, stats_page = %format!("http://{addr}/"), token = auth.has_token(), "admin API listening");
            tokio::spawn(admin::serve(
                tokio::net::TcpListener::from_std(listener)?,
                gw.clone(),
                extension,
                auth,
                stop.clone(),
            ));
        }
        reload_on_sighup(gw.clone(), stop.clone());
        if let Some(log) = &gw.proxy.access_log {
            crate::access_log::reopen_on_sigusr1(log.clone(), stop.clone());
        }
        wait_for_signal(&stop).await;
        anyhow::Ok(())
    })?;
    stop.cancel();
    for w in workers {
        let _ = w.join();
    }
    if let Some(log) = &gw.proxy.access_log
        && !log.flush_all()
    {
        tracing::warn!("the access log's last lines could not be written within 2s");
    }
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP reloads the config file.
fn reload_on_sighup(gw: Arc<Gateway>, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                s = hup.recv() => if s.is_none() { return },
            }
            if gw.config_path.is_none() {
                tracing::warn!(
                    "SIGHUP: this gateway was started without --config FILE; there is no config file to reload"
                );
                continue;
            }
            let _ = reload::reload(&gw, Trigger::Signal).await;
        }
    });
}

async fn wait_for_signal(stop: &CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        stop.cancelled().await;
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = stop.cancelled() => return,
    };
    tracing::info!(signal = name, "shutting down: no new connections, finishing in-flight requests");
    stop.cancel();
}

fn worker(
    gw: Arc<Gateway>,
    listeners: Vec<(std::net::TcpListener, Arc<Listener>)>,
    stop: CancellationToken,
    grace: Duration,
) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start a worker event loop: {e}");
            stop.cancel();
            return;
        }
    };
    rt.block_on(async move {
        // Create this thread's plugin instances before the first request needs them.
        for up in &gw.view().upstreams {
            for binding in up.bindings() {
                if let Err(e) = binding.warm(&up.pool.snapshot()) {
                    tracing::warn!(upstream = %up.name, plugin = %binding.plugin().name, "warming the plugin failed: {e}");
                }
            }
        }
        // From here on, plugin instances are built off this worker's request path.
        tokio::spawn(crate::plugin::maintain_instances());
        // Access-log lines are buffered per thread: hand a partly filled buffer to the
        // writer thread every 100 ms, so a quiet gateway's lines still reach the disk.
        if let Some(log) = gw.proxy.access_log.clone() {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => log.flush_local(),
                    }
                }
                log.flush_local();
            });
        }
        // Warm new plugin versions on this thread before they are swapped in.
        let mut warmer = gw.plugins.warmer();
        let warm_gw = gw.clone();
        tokio::spawn(async move {
            while let Some(generation) = warmer.changed().await {
                for up in &warm_gw.view().upstreams {
                    for binding in up.bindings() {
                        binding.warm_staged(&up.pool.snapshot());
                    }
                }
                warmer.done(generation);
            }
        });
        // Each upstream's own connect timeout applies (`Conns::send`).
        let conns = proxy::Conns::new();
        // One Arc per request instead of cloning the gateway and the pool separately.
        let worker: listener::Worker = Arc::new((gw.clone(), conns));
        let graceful = GracefulShutdown::new();
        let (conn_tx, mut conn_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut http = Vec::with_capacity(listeners.len());
        for (index, (socket, settings)) in listeners.into_iter().enumerate() {
            http.push(settings.http());
            let socket = match tokio::net::TcpListener::from_std(socket) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("cannot use listener socket: {e}");
                    continue;
                }
            };
            let (tx, stop) = (conn_tx.clone(), stop.clone());
            tokio::spawn(async move {
                let mut throttle = crate::fds::Throttle::new(Duration::from_secs(10));
                let mut backoff = MIN_ACCEPT_BACKOFF;
                loop {
                    let accepted = tokio::select! {
                        _ = stop.cancelled() => return,
                        a = socket.accept() => a,
                    };
                    match accepted {
                        Ok((mut stream, peer)) => {
                            backoff = MIN_ACCEPT_BACKOFF;
                            // At `max_connections`, this connection waits for a slot and
                            // the loop stops accepting: the next ones wait in the kernel's
                            // backlog until one of this listener's connections ends. (A
                            // slot taken before `accept` would sit idle on a worker whose
                            // socket gets no connection while another worker's waits.)
                            let Some(slot) = settings.slot(&stop).await else { return };
                            if settings.proxy_protocol {
                                // Behind an L4 balancer: the client's address comes first, in
                                // a PROXY header read off the accept loop, before HTTP or TLS.
                                let (tx, settings) = (tx.clone(), settings.clone());
                                tokio::spawn(async move {
                                    let timeout = settings.limits.header_timeout;
                                    match crate::proxy_protocol::read_header(&mut stream, timeout).await {
                                        Ok(client) => {
                                            let _ = tx.send((stream, client.unwrap_or(peer), slot, settings, index));
                                        }
                                        Err(e) => {
                                            metrics::global().local().proxy_protocol_refused.inc();
                                            tracing::debug!(peer = %peer, "connection closed: {e}");
                                        }
                                    }
                                });
                                continue;
                            }
                            if tx.send((stream, peer, slot, settings.clone(), index)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            // Out of descriptors (EMFILE, ENFILE) and friends: back off
                            // instead of spinning, longer while it lasts, and say so at
                            // most every 10 s.
                            let exhausted = crate::fds::is_exhausted(&e);
                            if exhausted {
                                metrics::global().local().accept_out_of_descriptors.inc();
                            }
                            if let Some(left_out) = throttle.allow() {
                                if exhausted {
                                    tracing::warn!(address = %settings.address, repeated = left_out, "accept failed: {e}; the gateway is out of file descriptors, backing off (raise the open-file limit or lower max_connections)");
                                } else {
                                    tracing::warn!(address = %settings.address, repeated = left_out, "accept failed: {e}");
                                }
                            }
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                            continue;
                        }
                    }
                }
            });
        }
        drop(conn_tx);
        loop {
            let (stream, peer, slot, settings, index) = tokio::select! {
                _ = stop.cancelled() => break,
                c = conn_rx.recv() => match c { Some(c) => c, None => break },
            };
            let _ = stream.set_nodelay(true);
            if metrics::enabled() {
                metrics::global().local().connections.inc();
            }
            tokio::spawn(settings.serve(stream, peer, slot, http[index].clone(), graceful.watcher(), worker.clone()));
        }
        tokio::select! {
            _ = graceful.shutdown() => {}
            _ = tokio::time::sleep(grace) => {
                tracing::warn!(grace = ?grace, "grace period over: closing connections with requests still in flight");
            }
        }
    });
}
