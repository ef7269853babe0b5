//! TLS to the backends (`tls: { ca, server_name, cert, key }`): a real TLS backend
//! (Python's `http.server` wrapped by its `ssl` module) with a certificate from a test
//! CA made by `openssl`. The right CA and name work; a wrong CA is a 502 and a log
//! line that says what to check; a backend that asks for a client certificate gets
//! the configured one.

mod util;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use util::{Ca, Gateway, Issued, TempDir, message};

/// An HTTPS backend answering every GET with `tls-backend {path}`; with `client_ca`,
/// it requires a client certificate signed by that CA. Killed by its PID when dropped.
struct TlsBackend {
    child: Child,
    port: u16,
}

const SERVER: &str = r#"
import http.server, ssl, sys
cert, key, client_ca = sys.argv[1], sys.argv[2], sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        peer = self.connection.getpeercert()
        who = dict(x[0] for x in peer["subject"]).get("commonName", "?") if peer else "-"
        body = f"tls-backend {self.path} client={who}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
if client_ca != "-":
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(client_ca)
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", srv.server_address[1], flush=True)
srv.serve_forever()
"#;

impl TlsBackend {
    fn start(issued: &Issued, client_ca: Option<&Path>) -> TlsBackend {
        let mut child = Command::new("python3")
            .args(["-c", SERVER])
            .arg(&issued.cert)
            .arg(&issued.key)
            .arg(client_ca.map_or("-".into(), |p| p.display().to_string()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs the TLS backend");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).expect("the TLS backend starts");
        let port = line.trim().strip_prefix("ready ").and_then(|p| p.parse().ok()).expect("`ready PORT`");
        TlsBackend { child, port }
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn gateway(dir: &TempDir, port: u16, tls: &str) -> Gateway {
    let yaml = format!(
        "\
listeners:
  - address: 127.0.0.1:0
upstreams:
  web:
    tls: {tls}
    retries: {{ attempts: 1 }}
    backends: [ {{ address: 127.0.0.1:{port} }} ]
"
    );
    Gateway::with_config(&dir.write("gw.yaml", yaml), &dir.path().join("plugins"))
}

#[test]
fn tls_backend_with_its_ca_and_server_name() {
    let dir = TempDir::new();
    let ca = Ca::new(dir.path(), "backends");
    let backend = TlsBackend::start(&ca.issue("web", &["web.internal"]), None);
    let gw = gateway(&dir, backend.port, &format!("{{ ca: {}, server_name: web.internal }}", ca.cert.display()));
    for i in 0..3 {
        let (status, body) = util::get(gw.addr, &format!("/hello/{i}"));
        assert_eq!((status, body.as_str()), (200, format!("tls-backend /hello/{i} client=-").as_str()));
    }
}

#[test]
fn a_wrong_ca_or_name_is_a_502_and_a_clear_log_line() {
    let dir = TempDir::new();
    let ca = Ca::new(dir.path(), "backends");
    let other = Ca::new(dir.path(), "other");
    let backend = TlsBackend::start(&ca.issue("web", &["web.internal"]), None);

    let gw = gateway(&dir, backend.port, &format!("{{ ca: {}, server_name: web.internal }}", other.cert.display()));
    let (status, _) = util::get(gw.addr, "/");
    assert_eq!(status, 502);
    let line =
        gw.wait_for_log(Duration::from_secs(5), |l| message(l).starts_with("TLS handshake with the backend failed"));
    let text = line.to_string();
    assert!(text.contains("UnknownIssuer") && text.contains("tls.ca"), "{text}");
    drop(gw);

    let gw = gateway(&dir, backend.port, &format!("{{ ca: {}, server_name: not-web.internal }}", ca.cert.display()));
    assert_eq!(util::get(gw.addr, "/").0, 502);
    let line =
        gw.wait_for_log(Duration::from_secs(5), |l| message(l).starts_with("TLS handshake with the backend failed"));
    assert!(line.to_string().contains("not valid for name"), "{line}");
}

#[test]
fn a_client_certificate_is_presented_when_configured() {
    let dir = TempDir::new();
    let ca = Ca::new(dir.path(), "backends");
    let clients = Ca::new(dir.path(), "clients");
    let client = clients.issue("gateway-client", &["gateway.internal"]);
    let backend = TlsBackend::start(&ca.issue("web", &["web.internal"]), Some(&clients.cert));

    let gw = gateway(&dir, backend.port, &format!("{{ ca: {}, server_name: web.internal }}", ca.cert.display()));
    assert_eq!(util::get(gw.addr, "/").0, 502, "no client certificate: refused by the backend");
    drop(gw);

    let tls = format!(
        "{{ ca: {}, server_name: web.internal, cert: {}, key: {} }}",
        ca.cert.display(),
        client.cert.display(),
        client.key.display()
    );
    let gw = gateway(&dir, backend.port, &tls);
    let (status, body) = util::get(gw.addr, "/");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "tls-backend / client=gateway.internal");
}
