//! `--web.config.file`: TLS and basic auth for the metrics server, in the format of
//! Prometheus's exporter-toolkit (the same file node_exporter takes):
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: twtrace.crt         # PEM chain; relative paths are from this file's directory
//!   key_file: twtrace.key          # PEM private key
//!   client_auth_type: RequireAndVerifyClientCert   # optional
//!   client_ca_file: clients-ca.crt                 # then required
//! basic_auth_users:
//!   prometheus: $2y$10$...         # bcrypt hash (htpasswd -nBC 10 prometheus)
//! ```
//!
//! The file is read as hostile: at most [`MAX_CONFIG_BYTES`], a regular file only, unknown
//! fields and duplicate users refused, every error one line naming the file and the field.

use std::{
    collections::BTreeMap,
    fmt,
    fs::OpenOptions,
    io::{self, Read as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Deserializer, de};
use tokio_rustls::rustls::{
    self, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};

use super::auth::BasicAuth;
use crate::text::printable;

/// The config file at most.
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024;
/// A certificate, key or CA file at most.
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;
/// bcrypt costs accepted: below 4 bcrypt refuses; above 16 one check takes seconds, which
/// would let a few bad passwords hold the server.
pub const MIN_COST: u32 = 4;
pub const MAX_COST: u32 = 16;
/// User names at most this long.
const MAX_USER_BYTES: usize = 256;

#[derive(Debug, thiserror::Error)]
#[error("--web.config.file {path}: {reason}")]
pub struct WebConfigError {
    path: String,
    reason: String,
}

/// What the metrics server applies: nothing by default.
#[derive(Default)]
pub struct WebConfig {
    pub tls: Option<Arc<ServerConfig>>,
    pub auth: Option<BasicAuth>,
}

impl fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field("auth", &self.auth.is_some())
            .finish()
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Doc {
    #[serde(default)]
    tls_server_config: Option<TlsDoc>,
    #[serde(default)]
    basic_auth_users: Option<Users>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsDoc {
    cert_file: String,
    key_file: String,
    #[serde(default)]
    client_auth_type: Option<String>,
    #[serde(default)]
    client_ca_file: Option<String>,
}

/// `basic_auth_users`, a duplicate user refused (a map would keep the last silently).
struct Users(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for Users {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Users;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of user name to bcrypt hash")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut m: A) -> Result<Users, A::Error> {
                let mut users = BTreeMap::new();
                while let Some((user, hash)) = m.next_entry::<String, String>()? {
                    if users.contains_key(&user) {
                        return Err(de::Error::custom(format!(
                            "user {:?} is given twice",
                            printable(&user)
                        )));
                    }
                    users.insert(user, hash);
                }
                Ok(Users(users))
            }
        }
        d.deserialize_map(V)
    }
}

impl WebConfig {
    /// Reads and checks the file, and the certificate files it names.
    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        let err = |reason: String| WebConfigError {
            path: printable(&path.display().to_string()).into_owned(),
            reason,
        };
        let bytes = read_bounded(path, MAX_CONFIG_BYTES).map_err(|e| err(e.to_string()))?;
        let text = std::str::from_utf8(&bytes).map_err(|_| err("not UTF-8 text".into()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::parse(text, dir).map_err(err)
    }

    /// The file's text; relative paths in it are taken from `dir`.
    pub fn parse(text: &str, dir: &Path) -> Result<Self, String> {
        let doc: Doc = if text.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#')
        }) {
            Doc::default()
        } else {
            serde_norway::from_str(text).map_err(|e| printable(&e.to_string()).into_owned())?
        };
        let tls = doc
            .tls_server_config
            .map(|t| tls_config(&t, dir).map(Arc::new))
            .transpose()?;
        let users = doc.basic_auth_users.map(|u| u.0).unwrap_or_default();
        for (user, hash) in &users {
            check_user(user, hash)?;
        }
        let auth = BasicAuth::new(users);
        Ok(Self { tls, auth })
    }
}

fn check_user(user: &str, hash: &str) -> Result<(), String> {
    let shown = printable(user);
    if user.is_empty() || user.len() > MAX_USER_BYTES || user.contains(':') {
        return Err(format!(
            "basic_auth_users: user {shown:?}: a user name is 1 to {MAX_USER_BYTES} bytes without ':'"
        ));
    }
    if user.chars().any(char::is_control) {
        return Err(format!(
            "basic_auth_users: user {shown:?}: control characters are not allowed"
        ));
    }
    let parts: bcrypt::HashParts = hash.parse().map_err(|_| {
        format!(
            "basic_auth_users.{shown}: not a bcrypt hash (make one with `htpasswd -nBC 10 {shown}`)"
        )
    })?;
    let cost = parts.get_cost();
    if !(MIN_COST..=MAX_COST).contains(&cost) {
        return Err(format!(
            "basic_auth_users.{shown}: bcrypt cost {cost} is outside {MIN_COST}..{MAX_COST} (10 is usual)"
        ));
    }
    Ok(())
}

fn tls_config(t: &TlsDoc, dir: &Path) -> Result<ServerConfig, String> {
    let load = |field: &str, name: &str| -> Result<Vec<u8>, String> {
        let p = resolve(dir, name);
        read_bounded(&p, MAX_PEM_BYTES).map_err(|e| {
            format!(
                "tls_server_config.{field}: {}: {e}",
                printable(&p.display().to_string())
            )
        })
    };
    let cert = load("cert_file", &t.cert_file)?;
    let chain = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls_server_config.cert_file: not PEM certificates: {e}"))?;
    if chain.is_empty() {
        return Err("tls_server_config.cert_file: no PEM certificate in it".into());
    }
    let key = load("key_file", &t.key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key)
        .map_err(|e| format!("tls_server_config.key_file: no PEM private key in it: {e}"))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mode = t.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls_server_config: {e}"))?;
    let builder = match (mode, &t.client_ca_file) {
        ("" | "NoClientCert", None) => builder.with_no_client_auth(),
        ("" | "NoClientCert", Some(_)) => {
            return Err(
                "tls_server_config.client_ca_file is set but client_auth_type is not: set client_auth_type to RequireAndVerifyClientCert or VerifyClientCertIfGiven"
                    .into(),
            );
        }
        ("RequireAndVerifyClientCert" | "VerifyClientCertIfGiven", None) => {
            return Err(format!(
                "tls_server_config.client_ca_file: client_auth_type {mode} needs the CA that signs client certificates"
            ));
        }
        ("RequireAndVerifyClientCert" | "VerifyClientCertIfGiven", Some(ca)) => {
            let ca = load("client_ca_file", ca)?;
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&ca) {
                let c = c.map_err(|e| format!("tls_server_config.client_ca_file: not PEM: {e}"))?;
                roots
                    .add(c)
                    .map_err(|e| format!("tls_server_config.client_ca_file: {e}"))?;
            }
            if roots.is_empty() {
                return Err("tls_server_config.client_ca_file: no PEM certificate in it".into());
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let v = if mode == "VerifyClientCertIfGiven" {
                v.allow_unauthenticated()
            } else {
                v
            };
            builder.with_client_cert_verifier(
                v.build()
                    .map_err(|e| format!("tls_server_config.client_ca_file: {e}"))?,
            )
        }
        ("RequestClientCert" | "RequireAnyClientCert", _) => {
            return Err(format!(
                "tls_server_config.client_auth_type: {mode} (a client certificate nobody verifies) is not supported: use RequireAndVerifyClientCert or VerifyClientCertIfGiven with client_ca_file"
            ));
        }
        (other, _) => {
            return Err(format!(
                "tls_server_config.client_auth_type: unknown {:?}: use NoClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert",
                printable(other)
            ));
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        format!("tls_server_config: cert_file and key_file do not make a usable pair: {e}")
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn resolve(dir: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

/// A regular file's contents, refused past `max` bytes. Opened non-blocking so a FIFO cannot
/// hang start-up; symbolic links are followed (certificates are often mounted through them).
fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let mut buf = Vec::new();
    f.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(io::Error::other(format!(
            "larger than {} KiB, which is not a config of this kind",
            max / 1024
        )));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<WebConfig, String> {
        WebConfig::parse(text, Path::new("/nonexistent"))
    }

    fn hash() -> String {
        bcrypt::hash("pw", 4).unwrap()
    }

    #[test]
    fn empty_means_plain_http_without_auth() {
        for t in ["", "# nothing\n", "{}", "basic_auth_users: {}\n"] {
            let c = parse(t).unwrap();
            assert!(c.tls.is_none() && c.auth.is_none(), "{t:?}");
        }
    }

    #[test]
    fn users_with_bcrypt_hashes_turn_auth_on() {
        let c = parse(&format!("basic_auth_users:\n  prom: '{}'\n", hash())).unwrap();
        assert!(c.auth.is_some() && c.tls.is_none());
    }

    #[test]
    fn bad_files_are_one_line_naming_the_field() {
        let h = hash();
        let cases = [
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  min_versio: TLS13\n",
                "unknown field `min_versio`",
            ),
            (
                "basic_auth_user:\n  a: b\n",
                "unknown field `basic_auth_user`",
            ),
            (
                "http_server_config:\n  http2: false\n",
                "unknown field `http_server_config`",
            ),
            (
                "basic_auth_users:\n  prom: notahash\n",
                "basic_auth_users.prom: not a bcrypt hash",
            ),
            (
                &format!("basic_auth_users:\n  prom: '{h}'\n  prom: '{h}'\n"),
                "given twice",
            ),
            (
                &format!("basic_auth_users:\n  'a:b': '{h}'\n"),
                "without ':'",
            ),
            (
                "basic_auth_users:\n  p: '$2y$31$abcdefghijklmnopqrstuu5Ae1ZbQuvRmYBCyTyfFuv2kbDFEyLXK'\n",
                "cost 31",
            ),
            (
                "tls_server_config:\n  cert_file: a.crt\n",
                "missing field `key_file`",
            ),
            (
                "tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n",
                "tls_server_config.cert_file: /nonexistent/a.crt",
            ),
            ("basic_auth_users: [1, 2]\n", "basic_auth_users"),
            // A field named with an escape sequence (YAML's "\e") is shown escaped.
            ("\"\\e[2J\": 1\n", "unknown field `\\x1b[2J`"),
        ];
        for (text, want) in cases {
            let e = parse(text)
                .err()
                .unwrap_or_else(|| panic!("accepted {text:?}"));
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(
                !e.contains('\n') && !e.chars().any(char::is_control),
                "{e:?}"
            );
        }
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut t = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
        for i in 0..12 {
            let prev = if i == 0 {
                "a".to_string()
            } else {
                format!("b{}", i - 1)
            };
            t.push_str(&format!(
                "b{i}: &b{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
            ));
        }
        assert!(parse(&t).is_err());
    }

    #[test]
    fn files_are_bounded_and_must_be_regular() {
        let dir = std::env::temp_dir().join(format!("twtrace-webcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big.yml");
        std::fs::write(&big, vec![b'#'; MAX_CONFIG_BYTES as usize + 1]).unwrap();
        let e = WebConfig::load(&big).unwrap_err().to_string();
        assert!(
            e.contains("big.yml") && e.contains("larger than 64 KiB"),
            "{e}"
        );
        let e = WebConfig::load(&dir).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = WebConfig::load(&dir.join("missing.yml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--web.config.file ") && e.contains("missing.yml"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn client_auth_settings_must_agree() {
        let dir = std::env::temp_dir().join(format!("twtrace-webtls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(dir.join("c.crt"), cert.cert.pem()).unwrap();
        std::fs::write(dir.join("c.key"), cert.signing_key.serialize_pem()).unwrap();
        let base = "tls_server_config:\n  cert_file: c.crt\n  key_file: c.key\n";
        let ok = WebConfig::parse(base, &dir).unwrap();
        assert!(ok.tls.is_some());
        for (extra, want) in [
            ("  client_ca_file: c.crt\n", "client_auth_type is not"),
            (
                "  client_auth_type: RequireAndVerifyClientCert\n",
                "needs the CA",
            ),
            (
                "  client_auth_type: RequireAnyClientCert\n",
                "not supported",
            ),
            ("  client_auth_type: Whatever\n", "unknown \"Whatever\""),
        ] {
            let e = WebConfig::parse(&format!("{base}{extra}"), &dir)
                .err()
                .unwrap();
            assert!(e.contains(want), "{extra}: {e}");
        }
        let verify = format!(
            "{base}  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: c.crt\n"
        );
        assert!(WebConfig::parse(&verify, &dir).unwrap().tls.is_some());
        // A key that is not the certificate's.
        let other = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        std::fs::write(dir.join("o.key"), other.signing_key.serialize_pem()).unwrap();
        let e = WebConfig::parse(
            "tls_server_config:\n  cert_file: c.crt\n  key_file: o.key\n",
            &dir,
        )
        .err()
        .unwrap();
        assert!(e.contains("usable pair"), "{e}");
        let e = WebConfig::parse(
            "tls_server_config:\n  cert_file: c.key\n  key_file: c.key\n",
            &dir,
        )
        .err()
        .unwrap();
        assert!(e.contains("cert_file: no PEM certificate"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
