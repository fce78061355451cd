//! The remote tier end to end against a real S3 server (`s3s-fs` on
//! loopback, see `common/s3.rs`): a fresh machine resumes from the remote
//! bitwise where the last run stopped, uploads go on through a server that
//! is killed and restarted mid-upload, and a trainer killed with SIGKILL
//! mid-upload leaves only whole checkpoints, which a later run completes
//! and cleans up after. The same on in-process stores is in `remote.rs`.
#![cfg(feature = "remote")]

mod common;

use common::Rng;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::s3::{S3Server, BUCKET};
use modelio::archive::ArchiveReader;
use modelio::config::RemoteConfig;
use modelio::folder::ModelPaths;
use modelio::policy::state::State;
use modelio::remote::{Remote, RemoteManifest};
use modelio::ModelIo;
use tch::nn::VarStore;
use tch::Device;

/// Generous: nothing here should take more than a few seconds.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The server's credentials in this process's environment (for `Remote`
/// and `ModelIo` here), written once: every server has the same, and tests
/// running in parallel read it.
fn set_env(server: &S3Server) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| server.set_env());
}

/// The `[remote]` settings of objects under `prefix` on `server`.
fn remote_config(server: &S3Server, prefix: &str) -> RemoteConfig {
    RemoteConfig { url: server.url(prefix), endpoint: server.endpoint(), allow_http: true, ..RemoteConfig::default() }
}

/// Polls `done` until it holds; panics naming `what` after [`TIMEOUT`], or
/// at once when `gave_up` says the other side stopped.
fn wait_for(what: &str, mut done: impl FnMut() -> bool, gave_up: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(!gave_up(), "the trainer stopped while waiting for {what}");
        assert!(started.elapsed() < TIMEOUT, "{what}: not within {} s", TIMEOUT.as_secs());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every file under `dir`, relative to it (s3s-fs may leave empty folders
/// behind deleted objects: only files are objects).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Every manifest of `remote` verifies, and each object it names is a file
/// in the server's bucket folder. Returns the manifests.
fn check_manifests(server: &S3Server, remote: &Remote) -> Vec<RemoteManifest> {
    let all = remote.list().unwrap();
    for m in &all {
        let problems = remote.verify(m).unwrap();
        assert!(problems.is_empty(), "{} does not verify: {problems:?}", m.id());
        for o in &m.objects {
            assert!(server.data.join(BUCKET).join(&o.key).is_file(), "{} names {}, which is missing", m.id(), o.key);
        }
    }
    all
}

// --- 1. A fresh machine resumes bitwise from the remote ---------------------

/// The demo trainer, built by `cargo test` beside this test.
fn demo() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().and_then(Path::parent).unwrap().join("examples/train");
    assert!(path.exists(), "{} missing: `cargo test` builds examples", path.display());
    path
}

/// A demo config file: the demo's `[train]`, a save every 5 iterations with
/// the optimizer (so a save that is not an exit save resumes exactly too),
/// and `remote`'s table when given.
fn demo_config(path: &Path, remote: Option<&RemoteConfig>) -> PathBuf {
    let mut text = String::from(
        "[train]\nbatch_size = 16\nlearning_rate = 0.001\nseed = 0\n\n\
         [modelio.model]\nname = \"model\"\n\n\
         [modelio.save]\ninterval = 5\noptimizer = \"always\"\n",
    );
    if let Some(r) = remote {
        text += &format!("\n[modelio.remote]\nurl = \"{}\"\nendpoint = \"{}\"\nallow_http = true\n", r.url, r.endpoint);
    }
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// Runs the demo for `iterations` into `dir`; returns its stderr.
fn run_demo(server: &S3Server, config: &Path, dir: &Path, iterations: u64) -> String {
    let out = Command::new(demo())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(server.env())
        .arg("--config")
        .arg(config)
        .arg("--model-dir")
        .arg(dir)
        .args(["--iterations", &iterations.to_string(), "--threads", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "demo failed: {stderr}");
    stderr
}

/// Every tensor of an archive (model and optimizer), by name, with its bytes.
fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    assert!(ArchiveReader::open(path).unwrap().optimizer.is_some(), "{} holds no optimizer state", path.display());
    common::archive_tensors(path)
}

#[test]
fn a_fresh_machine_resumes_bitwise_from_the_remote() {
    const A: u64 = 12;
    const B: u64 = 9;
    let server = S3Server::start();
    set_env(&server);
    let tmp = tempfile::tempdir().unwrap();
    let remote_cfg = remote_config(&server, "fresh");
    let with_remote = demo_config(&tmp.path().join("remote.toml"), Some(&remote_cfg));
    let local_only = demo_config(&tmp.path().join("local.toml"), None);

    // The first machine trains A iterations; its exit save is uploaded before it exits.
    let first = tmp.path().join("first/model");
    run_demo(&server, &with_remote, &first, A);
    let remote = Remote::connect(&remote_cfg, "model").unwrap();
    let latest = remote.latest().unwrap().expect("the first run uploaded nothing");
    assert_eq!((latest.iterations, latest.with_optimizer), (A, true), "{latest:?}");
    check_manifests(&server, &remote);
    std::fs::remove_dir_all(tmp.path().join("first")).unwrap();

    // A fresh machine: an empty folder, the same remote, B more iterations.
    let second = tmp.path().join("second/model");
    let stderr = run_demo(&server, &with_remote, &second, B);
    assert!(stderr.contains(&format!("resumed from {} at iteration {A}", second.join("model.mio").display())), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let state = State::read(&second.join("model_state.json")).unwrap();
    assert_eq!((state.total_iterations, state.sessions.len()), (A + B, 2), "the restored history goes on");
    let latest = remote.latest().unwrap().unwrap();
    assert_eq!(latest.iterations, A + B, "the second run's exit save is uploaded");
    check_manifests(&server, &remote);

    // One uninterrupted run of A + B iterations, without the remote tier.
    let one = tmp.path().join("one/model");
    run_demo(&server, &local_only, &one, A + B);
    let (a, b) = (tensors(&one.join("model.mio")), tensors(&second.join("model.mio")));
    assert_eq!(a.iter().map(|t| &t.0).collect::<Vec<_>>(), b.iter().map(|t| &t.0).collect::<Vec<_>>());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "tensor {name} differs between one run of {} and {A} + {B} resumed from the remote", A + B);
    }
}

// --- 2. The server killed and restarted mid-upload ------------------------

#[test]
fn uploads_go_on_through_a_server_killed_mid_upload() {
    const KILLS: usize = 4;
    let mut server = S3Server::start();
    set_env(&server);
    let tmp = tempfile::tempdir().unwrap();
    let mut c = common::config(&tmp.path().join("model"), "big");
    c.save.interval = 1;
    c.remote = remote_config(&server, "kills");
    c.remote.part_size_mib = 5;
    c.remote.retry_max_secs = 1;
    let remote_cfg = c.remote.clone();

    let stop = AtomicBool::new(false);
    let (saved, uploaded, failed) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (last, stats) = std::thread::scope(|s| {
        let trainer = s.spawn(|| {
            // 12 MiB: every archive is a multipart upload of 3 parts.
            let vs = VarStore::new(Device::Cpu);
            let mut w = vs.root().zeros_no_train("w", &[3 << 20]);
            let mut io = ModelIo::open(c).unwrap();
            let mut last = 0;
            while !stop.load(Ordering::SeqCst) {
                let n = io.iterations() + 1;
                tch::no_grad(|| {
                    let _ = w.fill_(n as f64);
                });
                io.record(1.0);
                // Training never notices the server: every save commits locally.
                let committed = io.save(&vs, None).unwrap().wait_blocking().unwrap();
                assert_eq!(committed.iterations, n);
                last = n;
                let st = io.remote_stats().unwrap();
                saved.store(n, Ordering::SeqCst);
                uploaded.store(st.uploaded, Ordering::SeqCst);
                failed.store(st.failed_attempts, Ordering::SeqCst);
            }
            assert!(io.wait_remote_blocking(TIMEOUT), "the last save was not uploaded after the server came back");
            let stats = io.remote_stats().unwrap();
            assert_eq!(io.stats().failed, 0, "{:?}", io.stats());
            io.shutdown_blocking().unwrap();
            (last, stats)
        });
        let gave_up = || trainer.is_finished();
        for kill in 0..KILLS {
            // The server works (an upload went through since it started),
            // and uploads are under way: the trainer saves continually.
            let before = uploaded.load(Ordering::SeqCst);
            wait_for(&format!("an upload before kill {kill}"), || uploaded.load(Ordering::SeqCst) > before, gave_up);
            std::thread::sleep(Duration::from_millis(rng.below(600)));
            let failures = failed.load(Ordering::SeqCst);
            server.kill();
            // Down until an upload failed for it, and a little longer.
            wait_for(&format!("a failed upload after kill {kill}"), || failed.load(Ordering::SeqCst) > failures, gave_up);
            std::thread::sleep(Duration::from_millis(100 + rng.below(400)));
            server.restart();
        }
        let before = (uploaded.load(Ordering::SeqCst), saved.load(Ordering::SeqCst));
        wait_for("an upload after the last restart", || uploaded.load(Ordering::SeqCst) > before.0, gave_up);
        wait_for("a save after the last restart", || saved.load(Ordering::SeqCst) > before.1, gave_up);
        stop.store(true, Ordering::SeqCst);
        trainer.join().unwrap()
    });
    assert!(stats.failed_attempts >= KILLS as u64, "{stats:?}");
    assert_eq!(stats.last_uploaded, Some(last), "{stats:?}");

    let remote = Remote::connect(&remote_cfg, "big").unwrap();
    assert_eq!(remote.latest().unwrap().map(|m| m.iterations), Some(last), "the newest save is the remote's latest");
    let all = check_manifests(&server, &remote);
    assert!(!all.is_empty() && all.iter().all(|m| m.object("archive").unwrap().size > 10 << 20), "multipart uploads: {all:?}");
}

// --- 3. The trainer killed (SIGKILL) mid-upload ----------------------------

/// The crash harness's helper (`examples/crash_helper.rs`), in its remote mode.
fn helper() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().and_then(Path::parent).unwrap().join("examples/crash_helper");
    assert!(path.exists(), "{} missing: `cargo test` builds examples", path.display());
    path
}

/// Runs the crash helper in remote mode until one of its first saves of
/// this run committed and an upload is under way (a record in `uploads`
/// that `leftovers` does not hold), lets it go on a moment longer, then
/// kills it with SIGKILL. Returns the newest save it reported committed.
fn run_helper_and_kill(server: &S3Server, url: &str, dir: &Path, uploads: &Path, leftovers: &[PathBuf], rng: &mut Rng) -> u64 {
    let mut child = Command::new(helper())
        .arg(dir)
        .args([url, &server.endpoint()])
        .envs(server.env())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (rx, reader) = common::read_lines(stdout);
    let committed = |line: &str| line.strip_prefix("committed ").and_then(|n| n.parse::<u64>().ok());
    let commits = 1 + rng.below(3);
    let mut newest = 0;
    let mut seen = 0;
    while seen < commits {
        let line = rx.recv_timeout(TIMEOUT).expect("the helper stopped committing");
        if let Some(n) = committed(&line) {
            newest = n;
            seen += 1;
        }
    }
    let uploading = || files_under(uploads).iter().any(|r| !leftovers.contains(r));
    let started = Instant::now();
    while !uploading() {
        assert!(child.try_wait().unwrap().is_none(), "the helper exited");
        assert!(started.elapsed() < TIMEOUT, "no upload started within {} s", TIMEOUT.as_secs());
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(rng.below(150)));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap();
    newest = rx.try_iter().filter_map(|l| committed(&l)).fold(newest, u64::max);
    newest
}

/// Pulls checkpoint `m` into a fresh folder, and checks that it holds save
/// `m.iterations` whole (every parameter of the helper holds its save's
/// iteration) and loads.
fn pull_and_load(remote: &Remote, m: &RemoteManifest, into: &Path) {
    let paths = ModelPaths::new(into, "crash");
    remote.pull(m, &paths).unwrap();
    let r = ArchiveReader::open(&paths.archive()).unwrap();
    assert!(r.verify().is_empty(), "{} pulled damaged: {:?}", m.id(), r.verify());
    assert_eq!(r.manifest.iterations, m.iterations);
    assert!(r.optimizer.is_some(), "{} holds no optimizer state", m.id());
    for t in &r.model {
        let v = modelio::tensors::read_tensor(&r, t).unwrap();
        let (min, max) = (v.min().double_value(&[]), v.max().double_value(&[]));
        assert!(min == m.iterations as f64 && max == min, "{}: {} holds {min}..{max}", m.id(), t.meta.name);
    }
    drop(r);
    let mut io = common::open(into, "crash");
    let vs = VarStore::new(Device::Cpu);
    for i in 0..4 {
        let _ = vs.root().zeros(&format!("w{i}"), &[256, 256]);
    }
    let _ = vs.root().zeros_no_train("big", &[3 << 19]);
    assert_eq!(io.load(&vs).unwrap().iterations, m.iterations);
    assert!(io.load_optimizer().unwrap().is_some());
    io.shutdown_blocking().unwrap();
}

#[test]
fn a_trainer_killed_mid_upload_leaves_whole_checkpoints() {
    const TRIALS: usize = 6;
    let server = S3Server::start();
    set_env(&server);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let remote_cfg = remote_config(&server, "sigkill");
    let remote = Remote::connect(&remote_cfg, "crash").unwrap();
    let root = server.data.join(BUCKET).join("sigkill/crash");
    let uploads = root.join("uploads");
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut in_flight = 0;
    for trial in 0..TRIALS {
        let records = files_under(&uploads);
        let committed = run_helper_and_kill(&server, &remote_cfg.url, &dir, &uploads, &records, &mut rng);
        // An upload the kill interrupted leaves its record behind.
        in_flight += usize::from(files_under(&uploads).iter().any(|r| !records.contains(r)));
        // Whatever the remote holds is whole: it verifies where it is, and
        // a pull of it loads.
        check_manifests(&server, &remote);
        if let Some(m) = remote.latest().unwrap() {
            assert!(m.iterations <= committed + 1, "trial {trial}: the remote holds {} of {committed} committed", m.iterations);
            pull_and_load(&remote, &m, &tmp.path().join(format!("pulled{trial}")));
        }
    }
    println!("{TRIALS} trials, {in_flight} killed with an upload under way");

    // The next run on the same folder uploads the newest local save if the
    // remote does not have it yet.
    let local = ArchiveReader::open(&dir.join("crash.mio")).unwrap().manifest.iterations;
    let behind = remote.is_behind(local).unwrap();
    let mut c = common::config(&dir, "crash");
    c.remote = remote_cfg.clone();
    let io = ModelIo::open(c).unwrap();
    assert_eq!(io.iterations(), local);
    assert!(io.wait_remote_blocking(TIMEOUT), "the catch-up upload did not finish");
    let stats = io.remote_stats().unwrap();
    io.shutdown_blocking().unwrap();
    let latest = remote.latest().unwrap().expect("nothing on the remote");
    assert_eq!(latest.iterations, local, "the newest local save is the remote's latest");
    if behind {
        assert_eq!((latest.kind.as_str(), stats.uploaded), ("catch-up", 1), "{stats:?}");
    }
    println!("the remote was {}behind the folder's save {local}", if behind { "" } else { "not " });
    let manifested: BTreeSet<String> = check_manifests(&server, &remote).iter().map(|m| m.id()).collect();

    // What the killed uploads left is removed, and nothing else.
    let orphans = remote.clean_orphans(Duration::ZERO).unwrap();
    println!("{orphans} partial uploads removed");
    assert_eq!(files_under(&uploads), Vec::<PathBuf>::new(), "records of uploads are left");
    let data: BTreeSet<String> =
        files_under(&root.join("data")).iter().map(|f| f.components().next().unwrap().as_os_str().to_string_lossy().into_owned()).collect();
    assert_eq!(data, manifested, "data prefixes without a manifest are left, or manifested data is gone");
    for id in &manifested {
        assert!(root.join("manifests").join(format!("{id}.json")).is_file(), "{id}");
    }
    assert_eq!(check_manifests(&server, &remote).len(), manifested.len());
}

// --- 4. Refused credentials and a missing bucket ---------------------------

/// Opening a fresh model folder against `remote` (which restores from it)
/// fails; the error.
fn open_error(remote: RemoteConfig) -> modelio::Error {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = common::config(&tmp.path().join("model"), "m");
    c.remote = remote;
    ModelIo::open(c).err().expect("opening against a store that refuses must fail")
}

#[test]
fn refused_credentials_and_a_missing_bucket_are_named_first_at_open() {
    let server = S3Server::start();
    set_env(&server);
    let mut missing = remote_config(&server, "runs");
    missing.url = "s3://no-such-bucket/runs".into();
    let e = open_error(missing);
    assert!(matches!(e, modelio::Error::RemoteNoBucket { .. }), "{e:?}");
    let text = e.report().to_string();
    assert!(text.starts_with("the bucket `no-such-bucket` of the remote tier"), "{text}");
    assert!(text.contains(&server.endpoint()) && text.len() < 400, "{} chars: {text}", text.len());

    // A server that expects another secret refuses every signed request.
    let refusing = S3Server::start_with_secret("another-secret");
    let e = open_error(remote_config(&refusing, "runs"));
    assert!(matches!(e, modelio::Error::RemoteDenied { status: 403, .. }), "{e:?}");
    let text = e.report().to_string();
    let start = format!("the remote tier at s3://{BUCKET}/runs/m refused the credentials (HTTP 403");
    assert!(text.starts_with(&start), "{text}");
    assert!(
        text.contains(&refusing.endpoint()) && text.contains("AWS_SECRET_ACCESS_KEY") && text.len() < 400,
        "{} chars: {text}",
        text.len()
    );
}
