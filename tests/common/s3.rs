//! An S3-protocol server on loopback for the remote tier's tests: `s3s-fs`
//! (`make setup` installs it into `.tools/`), which stores each object as a
//! file (a bucket is a folder under its data folder) and checks request
//! signatures. Every server has the same credentials, region and bucket, so
//! tests that run in parallel agree on the process environment.
#![allow(dead_code)]

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub const ACCESS_KEY: &str = "modelio-test";
pub const SECRET_KEY: &str = "modelio-test-secret";
pub const BUCKET: &str = "ckpt";
pub const REGION: &str = "us-east-1";

/// How long a server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a restart retries while its port is still taken.
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);
/// What the server logs once it listens (followed by the address).
const LISTENING: &str = "server is running at http://";

/// The server binary: `.tools/bin/s3s-fs` in the repo.
pub fn binary() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/s3s-fs")
}

/// A running `s3s-fs` with bucket [`BUCKET`]; killed on drop, its temporary
/// folder (data and log) removed.
#[derive(Debug)]
pub struct S3Server {
    pub port: u16,
    /// The server's root: one folder per bucket, one file per object (its
    /// own bookkeeping lies in hidden files next to the bucket folders).
    pub data: PathBuf,
    child: Option<Child>,
    /// The secret key it expects (clients here sign with [`SECRET_KEY`]).
    secret: String,
    _tmp: Option<TempDir>,
}

impl S3Server {
    /// Starts a server on a free loopback port with a fresh data folder
    /// holding the empty bucket [`BUCKET`]; returns once it accepts
    /// connections.
    pub fn start() -> S3Server {
        S3Server::start_with_secret(SECRET_KEY)
    }

    /// [`S3Server::start`], expecting `secret` as the secret key: with
    /// another than [`SECRET_KEY`] it refuses every request (HTTP 403).
    pub fn start_with_secret(secret: &str) -> S3Server {
        let bin = binary();
        assert!(bin.is_file(), "{} is missing: `make setup` installs it (the S3 server of the remote tier's tests)", bin.display());
        let tmp = tempfile::Builder::new().prefix("modelio-s3-").tempdir().expect("create a temporary folder");
        let data = tmp.path().join("data");
        fs::create_dir_all(data.join(BUCKET)).expect("create the bucket folder");
        let mut server = S3Server { port: 0, data, child: None, secret: secret.into(), _tmp: Some(tmp) };
        // Port 0: the system picks a free port and the server logs it, so
        // no other process can take it between choosing and binding.
        if let Err(e) = server.spawn(0) {
            panic!("{e}\n{}", server.log());
        }
        server
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `s3://ckpt/<prefix>`
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The credentials and region, as environment variables for child processes.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()), ("AWS_REGION", REGION.into())]
    }

    /// Sets [`S3Server::env`] in this process (the same values for every
    /// server, so tests running in parallel set the same).
    pub fn set_env(&self) {
        for (key, value) in self.env() {
            std::env::set_var(key, value);
        }
    }

    /// A `[remote]` config section for objects under `prefix` on this server.
    pub fn remote_toml(&self, prefix: &str) -> String {
        format!("[remote]\nurl = \"{}\"\nendpoint = \"{}\"\nallow_http = true\n", self.url(prefix), self.endpoint())
    }

    /// Kills the server (SIGKILL) and waits for it to exit; the data stay.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server if it runs, and starts it again on the same port
    /// with the same data folder (retrying for a few seconds while the port
    /// is still taken).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + REBIND_TIMEOUT;
        loop {
            match self.spawn(self.port) {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => panic!("restarting s3s-fs on port {}: {e}\n{}", self.port, self.log()),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Whether the server was started and not killed, and accepts connections.
    pub fn is_running(&self) -> bool {
        self.child.is_some() && TcpStream::connect_timeout(&self.addr(), Duration::from_secs(1)).is_ok()
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        format!("--- {} ---\n{text}", self.log_path().display())
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    fn log_path(&self) -> PathBuf {
        self.data.parent().expect("the data folder lies in the temporary folder").join("s3s-fs.log")
    }

    /// Starts the binary on `port` (0: any free one) and waits until it
    /// listens; sets `self.port` to the port it listens on.
    fn spawn(&mut self, port: u16) -> Result<(), String> {
        let log = OpenOptions::new().create(true).append(true).open(self.log_path()).map_err(|e| format!("open the log: {e}"))?;
        let offset = log.metadata().map_err(|e| format!("read the log: {e}"))?.len();
        let err = log.try_clone().map_err(|e| format!("open the log: {e}"))?;
        let child = Command::new(binary())
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", ACCESS_KEY, "--secret-key", &self.secret])
            .arg(&self.data)
            // Its startup line names the address; warnings and errors as well.
            .env("RUST_LOG", "warn,s3s_fs=info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start {}: {e}", binary().display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let child = self.child.as_mut().ok_or("no child")?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!("s3s-fs exited ({status})"));
            }
            if let Some(listening) = self.listening_port(offset) {
                if port != 0 && listening != port {
                    self.kill();
                    return Err(format!("s3s-fs listens on port {listening}, not {port}"));
                }
                self.port = listening;
                if TcpStream::connect_timeout(&self.addr(), Duration::from_secs(1)).is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!("s3s-fs did not accept connections within {} s", START_TIMEOUT.as_secs()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port of the startup line the server logged after `offset`.
    fn listening_port(&self, offset: u64) -> Option<u16> {
        let mut file = fs::File::open(self.log_path()).ok()?;
        file.seek(SeekFrom::Start(offset)).ok()?;
        let mut text = String::new();
        file.read_to_string(&mut text).ok()?;
        let rest = &text[text.find(LISTENING)? + LISTENING.len()..];
        // Only a complete line: the address up to its end.
        let line = &rest[..rest.find('\n')?];
        line.trim().parse::<SocketAddr>().ok().map(|a| a.port())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}
