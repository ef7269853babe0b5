//! Upgrades (WebSocket and friends): the handshake goes through the gateway to a
//! backend, and then the gateway tunnels bytes both ways until either side closes.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;
use util::Gateway;

/// A backend that accepts `Upgrade: echo` and then echoes every byte. Connections that
/// close without a request (the gateway's TCP health checks) are skipped.
fn echo_backend() -> (std::net::SocketAddr, std::thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let (mut stream, mut reader, head) = loop {
            let (stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            if !head.is_empty() {
                break (stream, reader, head);
            }
        };
        stream.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n").unwrap();
        let mut buf = [0u8; 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            stream.write_all(&buf[..n]).unwrap();
        }
        head
    });
    (addr, handle)
}

#[test]
fn upgraded_connections_are_tunnelled_both_ways() {
    let (backend, seen) = echo_backend();
    let gw = Gateway::start(&["--listen", "127.0.0.1:0", "--no-access-log", "-b", &backend.to_string()]);

    let mut client = TcpStream::connect(gw.addr).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    client
        .write_all(b"GET /chat HTTP/1.1\r\nHost: chat.example\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    let mut upgrade_header = false;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        upgrade_header |= line.to_ascii_lowercase().starts_with("upgrade: echo");
    }
    assert!(upgrade_header, "the 101 keeps its Upgrade header");

    for msg in ["hello", "through the gateway", "and back"] {
        client.write_all(msg.as_bytes()).unwrap();
        let mut buf = vec![0u8; msg.len()];
        reader.read_exact(&mut buf).unwrap();
        assert_eq!(String::from_utf8(buf).unwrap(), msg);
    }
    drop(reader);
    drop(client);

    let head = seen.join().unwrap().to_ascii_lowercase();
    assert!(head.contains("upgrade: echo"), "backend saw the upgrade request: {head}");
    assert!(head.contains("connection: upgrade"), "{head}");
    assert!(head.contains("x-forwarded-for: 127.0.0.1"), "{head}");
    assert!(head.contains("host: chat.example"), "{head}");
}
