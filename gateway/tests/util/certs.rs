//! Test certificates made by the real `openssl` command line tool at test time: a CA
//! and leaf certificates it signs, with the DNS names and IPs a test asks for. No
//! private key is ever committed.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A certificate authority in a folder, and the certificates it issued.
#[derive(Debug)]
pub struct Ca {
    dir: PathBuf,
    /// The CA certificate (PEM): what a client trusts.
    pub cert: PathBuf,
    key: PathBuf,
}

/// A certificate and its private key (PEM files).
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key (PKCS#8).
    pub key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (install the `openssl` package): {e}"));
    assert!(out.status.success(), "openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Ca {
    /// A new CA (EC P-256) named `name`, its files in `dir`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let (cert, key) = (dir.join(format!("{name}-ca.pem")), dir.join(format!("{name}-ca.key")));
        openssl(dir, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key.to_str().unwrap()]);
        let subject = format!("/CN={name} test CA");
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                key.to_str().unwrap(),
                "-sha256",
                "-days",
                "2",
                "-subj",
                &subject,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-out",
                cert.to_str().unwrap(),
            ],
        );
        Ca { dir: dir.to_owned(), cert, key }
    }

    /// A server (and client) certificate for `names` (DNS names or IP addresses), signed
    /// by this CA; files `{file}.pem` and `{file}.key`.
    pub fn issue(&self, file: &str, names: &[&str]) -> Issued {
        let dir = &self.dir;
        let (cert, key) = (dir.join(format!("{file}.pem")), dir.join(format!("{file}.key")));
        let csr = dir.join(format!("{file}.csr"));
        let ext = dir.join(format!("{file}.ext"));
        let san: Vec<String> = names
            .iter()
            .map(|n| if n.parse::<std::net::IpAddr>().is_ok() { format!("IP:{n}") } else { format!("DNS:{n}") })
            .collect();
        std::fs::write(
            &ext,
            format!(
                "subjectAltName={}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n",
                san.join(",")
            ),
        )
        .unwrap();
        openssl(dir, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &format!("{file}.sec1")]);
        openssl(dir, &["pkcs8", "-topk8", "-nocrypt", "-in", &format!("{file}.sec1"), "-out", key.to_str().unwrap()]);
        let subject = format!("/CN={}", names.first().copied().unwrap_or(file));
        openssl(dir, &["req", "-new", "-key", key.to_str().unwrap(), "-subj", &subject, "-out", csr.to_str().unwrap()]);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                csr.to_str().unwrap(),
                "-CA",
                self.cert.to_str().unwrap(),
                "-CAkey",
                self.key.to_str().unwrap(),
                "-CAcreateserial",
                "-days",
                "2",
                "-sha256",
                "-extfile",
                ext.to_str().unwrap(),
                "-out",
                cert.to_str().unwrap(),
            ],
        );
        Issued { cert, key }
    }
}
