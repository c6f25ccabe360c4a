//! A real S3-compatible server for the tests: moto's server (`pip install 'moto[server]'`),
//! started once per test process on a free port, or the server `ESCROW_TEST_S3` names
//! (`http://host:port`, any S3 that takes unsigned bucket creation or already has the
//! bucket). Each fixture gets a bucket of its own. The tests fail, never skip, when no
//! server can be started.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

struct Server {
    endpoint: String,
    /// moto, under a shell that kills it when this process exits (its stdin closes).
    _child: Option<Child>,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        if let Ok(endpoint) = std::env::var("ESCROW_TEST_S3") {
            return Server {
                endpoint: endpoint.trim_end_matches('/').to_string(),
                _child: None,
            };
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "python3 -m moto.server -H 127.0.0.1 -p {port} >/dev/null 2>&1 & pid=$!; read _; kill $pid"
            ))
            .stdin(Stdio::piped())
            .spawn()
            .expect("start moto's S3 server (pip install 'moto[server]')");
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        while request(&endpoint, "GET", "/").is_err() {
            assert!(
                Instant::now() < deadline,
                "moto's S3 server did not start on port {port}: is moto[server] installed (pip install 'moto[server]')?"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Server {
            endpoint,
            _child: Some(child),
        }
    })
}

/// One plain HTTP/1.1 request; the status code.
fn request(endpoint: &str, method: &str, path: &str) -> std::io::Result<u16> {
    let host = endpoint.trim_start_matches("http://");
    let mut s = TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP response"))
}

/// A bucket of the test's own on the test S3 server.
pub struct Bucket {
    pub name: String,
}

impl Bucket {
    pub fn new() -> Bucket {
        let server = server();
        let name = format!("escrow-test-{}", uuid::Uuid::new_v4().simple());
        let status = request(&server.endpoint, "PUT", &format!("/{name}")).expect("create bucket");
        assert_eq!(status, 200, "creating bucket {name}");
        Bucket { name }
    }

    /// `--objects` for this bucket.
    pub fn url(&self) -> String {
        format!("s3://{}/escrow", self.name)
    }

    /// What a process needs to reach the bucket: `ESCROW_OBJECTS` and the `AWS_*` settings.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("ESCROW_OBJECTS", self.url()),
            ("AWS_ENDPOINT_URL", server().endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "escrow-test".into()),
            ("AWS_SECRET_ACCESS_KEY", "escrow-test".into()),
        ]
    }

    /// The store, opened in this process (with the `AWS_*` settings given directly: the
    /// process environment is not the tests' to change).
    pub fn open(&self) -> escrow::objects::SharedObjects {
        let settings: Vec<(String, String)> = self
            .env()
            .into_iter()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        let objects = escrow::s3::S3Objects::connect_with(&self.url(), &settings).expect("connect");
        std::sync::Arc::new(objects)
    }
}
