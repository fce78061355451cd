//! The remote tier's figures: an S3-protocol server on loopback (`s3s-fs`
//! from `.tools/bin`, which `make setup` installs; it stores each object as
//! a file), and uploads of one committed archive through modelio's
//! `Remote::upload` and through a plain `object_store` multipart put,
//! alternated.

use std::fs::{self, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use modelio::config::{RemoteConfig, UploadPolicy};
use modelio::{Error, Result};

use crate::bench::IoContext;

const ACCESS_KEY: &str = "modelio-bench";
const SECRET_KEY: &str = "modelio-bench-secret";
const BUCKET: &str = "bench";
const REGION: &str = "us-east-1";
/// How long the server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// What the server logs once it listens (followed by its address).
const LISTENING: &str = "server is running at http://";

/// The server binary: `<repo>/.tools/bin/s3s-fs`.
pub fn binary() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/s3s-fs")
}

/// A running `s3s-fs` holding the empty bucket [`BUCKET`], its data in a
/// temporary folder; killed on drop, the folder removed.
pub struct S3Server {
    port: u16,
    child: Child,
    tmp: tempfile::TempDir,
}

impl S3Server {
    /// CPU seconds the server process has used so far.
    pub fn cpu_secs(&self) -> f64 {
        crate::cpu::process_cpu_of(self.child.id())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3Server {
    /// Start a server on a free loopback port with its data in a temporary
    /// folder in `/dev/shm` when it has 4 GiB free, else under `parent`, and
    /// set its credentials and region in this process's environment (where
    /// the remote tier reads them). `Ok(None)` when the binary is missing.
    ///
    /// # Errors
    /// The folder cannot be created, or the server does not start (its log
    /// is in the message).
    pub fn start(parent: &Path) -> Result<Option<S3Server>> {
        let bin = binary();
        if !bin.is_file() {
            return Ok(None);
        }
        // The server stands in for another machine, whose disk the trainer
        // does not share: its objects go to memory where it can, so that its
        // writes and their writeback are not charged to the trainer's runs.
        // It holds a few copies of the archives uploaded at once (up to
        // 1 GiB of them at the default 1 GiB state, 256 MiB uploads).
        let shm = Path::new("/dev/shm");
        let parent = if free_bytes(shm) >= SHM_MIN { shm } else { parent };
        let tmp = tempfile::Builder::new().prefix("modelio-bench-s3-").tempdir_in(parent).at("create a folder in", parent)?;
        let data = tmp.path().join("data");
        fs::create_dir_all(data.join(BUCKET)).at("create", &data)?;
        let log_path = tmp.path().join("s3s-fs.log");
        let log = OpenOptions::new().create(true).append(true).open(&log_path).at("create", &log_path)?;
        let err = log.try_clone().at("open", &log_path)?;
        // Port 0: the system picks a free port and the server logs it.
        // The server stands in for another machine: here it shares the
        // trainer's cores, and at the lowest priority and under SCHED_IDLE
        // it runs only when training leaves a core idle (a remote server
        // takes no CPU from the trainer at all). The bench reports its CPU
        // time beside modelio's, and how many saves were uploaded.
        let mut command = Command::new(&bin);
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe syscalls between fork and exec,
            // with a parameter on the stack.
            unsafe {
                command.pre_exec(|| {
                    libc::setpriority(libc::PRIO_PROCESS, 0, 19);
                    let param = libc::sched_param { sched_priority: 0 };
                    libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
                    Ok(())
                });
            }
        }
        let child = command
            .args(["--host", "127.0.0.1", "--port", "0", "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&data)
            .env("RUST_LOG", "warn,s3s_fs=info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .at("start", &bin)?;
        let mut server = S3Server { port: 0, child, tmp };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(server.failed(format!("s3s-fs exited ({status})")));
            }
            if let Some(port) = listening_port(&log_path) {
                server.port = port;
                if TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), Duration::from_secs(1)).is_ok() {
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err(server.failed(format!("s3s-fs did not accept connections within {} s", START_TIMEOUT.as_secs())));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for (key, value) in [("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY), ("AWS_REGION", REGION)] {
            std::env::set_var(key, value);
        }
        Ok(Some(server))
    }

    fn failed(&self, what: String) -> Error {
        let log = fs::read_to_string(self.tmp.path().join("s3s-fs.log")).unwrap_or_default();
        Error::Io { op: "start", path: "s3s-fs".into(), source: std::io::Error::other(format!("{what}; its log:\n{log}")) }
    }

    /// Remove every object under `prefix` from the server's folder (what a
    /// phase left there, so that it does not hold memory for the rest).
    pub fn remove(&self, prefix: &str) {
        let _ = fs::remove_dir_all(self.tmp.path().join("data").join(BUCKET).join(prefix));
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `[remote]` for objects under `prefix` on this server: every save
    /// uploaded, the default part size and parts in flight.
    pub fn remote_config(&self, prefix: &str) -> RemoteConfig {
        RemoteConfig {
            url: format!("s3://{BUCKET}/{prefix}"),
            endpoint: self.endpoint(),
            allow_http: true,
            upload: UploadPolicy::Every,
            ..RemoteConfig::default()
        }
    }
}

/// The memory the server's objects may use in `/dev/shm` (else they go to disk).
const SHM_MIN: u64 = 4 << 30;

/// Bytes free to an unprivileged writer on the filesystem of `path` (0 when unknown).
fn free_bytes(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return 0 };
    // SAFETY: a NUL-terminated path and a zeroed struct the call fills.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return 0;
        }
        st.f_bavail.saturating_mul(st.f_frsize)
    }
}

/// The port of the server's startup line, once the whole line is logged.
fn listening_port(log: &Path) -> Option<u16> {
    let text = fs::read_to_string(log).ok()?;
    let rest = &text[text.find(LISTENING)? + LISTENING.len()..];
    rest[..rest.find('\n')?].trim().parse::<SocketAddr>().ok().map(|a| a.port())
}

#[cfg(feature = "remote")]
mod upload {
    use super::*;

    use std::fs::File;
    use std::io::Read;
    use std::sync::Arc;

    use bytes::Bytes;
    use futures::StreamExt;
    use object_store::aws::{AmazonS3, AmazonS3Builder};
    use object_store::path::Path as Key;
    use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};

    use modelio::remote::{Reason, Remote};

    use crate::bench::{median, settle, Report};

    /// An object-store failure, as an IO error on the object's address.
    fn store_err(op: &'static str, target: impl std::fmt::Display, e: object_store::Error) -> Error {
        Error::Io { op, path: PathBuf::from(target.to_string()), source: std::io::Error::other(e) }
    }

    /// The reference: `put_multipart` + `WriteMultipart` with the same part
    /// size and parts in flight, the file read in parts. Returns its size.
    async fn plain_put(store: &AmazonS3, key: &Key, path: &Path, part: usize, in_flight: usize) -> Result<u64> {
        let mut file = File::open(path).at("open", path)?;
        let upload = store.put_multipart(key).await.map_err(|e| store_err("start multipart upload of", key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part);
        let mut size = 0u64;
        loop {
            writer.wait_for_capacity(in_flight).await.map_err(|e| store_err("upload part of", key, e))?;
            let mut buf = vec![0u8; part];
            let mut n = 0;
            while n < part {
                match file.read(&mut buf[n..]).at("read", path)? {
                    0 => break,
                    k => n += k,
                }
            }
            if n == 0 {
                break;
            }
            buf.truncate(n);
            size += n as u64;
            writer.put(Bytes::from(buf));
        }
        writer.finish().await.map_err(|e| store_err("complete multipart upload of", key, e))?;
        Ok(size)
    }

    /// Delete every object under `prefix` (between measured uploads, so the
    /// server's folder never holds more than one copy).
    async fn delete_all(store: &AmazonS3, prefix: &Key) -> Result<()> {
        let metas: Vec<_> = store.list(Some(prefix)).collect().await;
        for meta in metas {
            let meta = meta.map_err(|e| store_err("list", prefix, e))?;
            store.delete(&meta.location).await.map_err(|e| store_err("delete", &meta.location, e))?;
        }
        Ok(())
    }

    /// Upload the committed `archive` (with its `state` file) `reps` times
    /// through `Remote::upload` and as many times through a plain multipart
    /// put, alternating which goes first; GB/s of each (the archive's bytes
    /// over the whole call: modelio's includes its manifest and `LATEST`).
    pub fn upload_phase(server: &S3Server, archive: &Path, state: &Path, reps: usize, r: &mut Report) -> Result<()> {
        let config = server.remote_config("bench-upload");
        let remote = Remote::connect(&config, "bench")?;
        let plain = AmazonS3Builder::new()
            .with_endpoint(server.endpoint())
            .with_bucket_name(BUCKET)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .with_region(REGION)
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .build()
            .map_err(|e| store_err("connect to", server.endpoint(), e))?;
        // The same kind of runtime as the remote tier's own.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .at("start a runtime for", Path::new(&server.endpoint()))?;
        let plain = Arc::new(plain);
        let (part, in_flight) = (config.part_size_mib << 20, config.parts_in_flight);
        let bytes = fs::metadata(archive).at("stat", archive)?.len() as f64;
        let (mut ours, mut reference) = (vec![], vec![]);
        let never = || false;
        for rep in 0..reps {
            for which in (0..2).map(|k| (k + rep) % 2) {
                settle();
                if which == 0 {
                    let start = Instant::now();
                    remote.upload(archive, state, Reason::Save, &never)?;
                    ours.push(bytes / start.elapsed().as_secs_f64() / 1e9);
                    rt.block_on(delete_all(&plain, &Key::from("bench-upload")))?;
                } else {
                    let key = Key::from(format!("bench-plain/archive-{rep}"));
                    let start = Instant::now();
                    let sent = rt.block_on(plain_put(&plain, &key, archive, part, in_flight))?;
                    reference.push(sent as f64 / start.elapsed().as_secs_f64() / 1e9);
                    rt.block_on(delete_all(&plain, &Key::from("bench-plain")))?;
                }
            }
        }
        r.insert("remote_upload_bytes".into(), bytes);
        r.insert("remote_upload_gbps".into(), median(ours));
        r.insert("plain_multipart_put_gbps".into(), median(reference));
        Ok(())
    }
}

#[cfg(feature = "remote")]
pub use upload::upload_phase;
