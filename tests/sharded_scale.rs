//! Sharded checkpoints at scale, simulated on this machine: 64 ranks
//! (threads, each holding its own handle) save three steps of a 64 x 16
//! matrix split by rows, against an in-process store that adds a latency to
//! every request and answers some with S3's 503 SlowDown, and against
//! `s3s-fs` behind a proxy that answers every fifth connection with a 503
//! SlowDown. The last rank holds each save back until the coordinator has
//! polled the step's folder twice. Every step commits, and the requests of
//! each commit are counted: one listing of the step's folder per poll, each
//! done-record read once, no HEAD per shard (bounded per commit attempt,
//! not per rank per poll); the time from the last done-record to the
//! manifest is measured.
//!
//! The figures are printed on lines starting with `scale:`
//! (`cargo test --test sharded_scale -- --nocapture`).
#![cfg(feature = "remote")]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::s3::S3Server;
use common::sharded::rank_config;
use common::Rng;
use futures::stream::{BoxStream, StreamExt};
use modelio::sharded::{Part, ShardedIo, Want};
use object_store::memory::InMemory;
use object_store::path::Path as Key;
use object_store::ObjectStore;
use tch::{Device, Kind as TchKind, Tensor};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Ranks, each a thread with a handle of its own.
const WORLD: usize = 64;
/// Columns of the matrix; each rank saves one row of it.
const COLS: usize = 16;
/// Steps saved and committed.
const STEPS: u64 = 3;
/// The coordinator's deadline for a step's records: far beyond the test.
const DEADLINE_SECS: u64 = 600;
/// The coordinator's pause between two polls of a step's folder.
const POLL_GAP: Duration = Duration::from_millis(100);
/// The successful polls of a step's folder the last rank waits for.
const HELD_FOR_POLLS: usize = 2;
/// How long any condition is waited for before the test fails.
const WAIT: Duration = Duration::from_secs(120);
/// The proxy answers every this many connections with a 503.
const SLOW_DOWN_EVERY: u64 = 5;
/// Requests of a commit that do not depend on the step or the ranks:
/// `LATEST` read and written, the manifests, snapshots and step folders
/// listed for retention, the backup looked for, the lowest loss.
const FIXED_PER_COMMIT: usize = 12;

/// The two parts share the machine's cores: one at a time, so that the
/// figures of one are not the load of the other.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// What a request asks of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    List,
    ListDelimited,
    Get,
    Head,
    Put,
    Multipart,
    Delete,
    Copy,
}

impl Kind {
    const ALL: [Kind; 8] = [Kind::List, Kind::ListDelimited, Kind::Get, Kind::Head, Kind::Put, Kind::Multipart, Kind::Delete, Kind::Copy];

    fn name(self) -> &'static str {
        match self {
            Kind::List => "list",
            Kind::ListDelimited => "list_with_delimiter",
            Kind::Get => "get",
            Kind::Head => "head",
            Kind::Put => "put",
            Kind::Multipart => "multipart",
            Kind::Delete => "delete",
            Kind::Copy => "copy",
        }
    }
}

/// What a request is about, from its key (or a listing's prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Class {
    /// A step's folder, listed.
    StepFolder,
    /// `steps/<n>/done-<r>.json`
    Done,
    /// `steps/<n>/rank-<r>-<upload>.mio`
    Shard,
    /// `manifests/` or one manifest in it.
    Manifest,
    Latest,
    Other,
}

/// The class of `key` and the step it belongs to.
fn classify(key: &str) -> (Class, Option<u64>) {
    let parts: Vec<&str> = key.trim_matches('/').split('/').collect();
    if parts.last() == Some(&"LATEST") {
        return (Class::Latest, None);
    }
    if let Some(i) = parts.iter().position(|p| *p == "steps") {
        if let Some(n) = parts.get(i + 1).and_then(|p| p.parse::<u64>().ok()) {
            return match parts.get(i + 2) {
                None => (Class::StepFolder, Some(n)),
                Some(f) if f.starts_with("done-") && f.ends_with(".json") => (Class::Done, Some(n)),
                Some(_) => (Class::Shard, Some(n)),
            };
        }
        return (Class::Other, None);
    }
    if let Some(i) = parts.iter().position(|p| *p == "manifests") {
        let n = parts.get(i + 1).and_then(|f| f.strip_suffix(".json")).and_then(|n| n.parse().ok());
        return (Class::Manifest, n);
    }
    (Class::Other, None)
}

/// One request, as the store (or the proxy) answered it.
#[derive(Debug, Clone)]
struct Request {
    kind: Kind,
    class: Class,
    step: Option<u64>,
    /// When it was answered.
    at: Instant,
    /// Answered with a 503 SlowDown.
    throttled: bool,
}

/// Every request answered, in order, and a signal for each.
#[derive(Default)]
struct Tally {
    log: Mutex<Vec<Request>>,
    changed: Condvar,
}

impl Tally {
    fn record(&self, kind: Kind, key: &str, throttled: bool) {
        let (class, step) = classify(key);
        self.log.lock().unwrap().push(Request { kind, class, step, at: Instant::now(), throttled });
        self.changed.notify_all();
    }

    fn len(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    fn between(&self, from: usize, to: usize) -> Vec<Request> {
        self.log.lock().unwrap()[from..to].to_vec()
    }

    /// Waits until the folder of `step` was listed successfully `polls` times.
    fn wait_for_polls(&self, step: u64, polls: usize) {
        let until = Instant::now() + WAIT;
        let mut log = self.log.lock().unwrap();
        loop {
            let listed =
                log.iter().filter(|r| r.kind == Kind::List && r.class == Class::StepFolder && r.step == Some(step) && !r.throttled).count();
            if listed >= polls {
                return;
            }
            let left = until.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the folder of step {step} was listed {listed} times, not {polls}, within {} s", WAIT.as_secs());
            log = self.changed.wait_timeout(log, left).unwrap().0;
        }
    }
}

impl std::fmt::Debug for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tally")
    }
}

/// S3's answer to too many requests.
fn slow_down(key: &str) -> object_store::Error {
    let source = format!("503 SlowDown on {key}: Please reduce your request rate.");
    object_store::Error::Generic { store: "Slow", source: source.into() }
}

/// An in-process store that answers every request after a few milliseconds
/// (2 to 6, the same sequence on every run), counts them in a [`Tally`],
/// and answers with a 503 SlowDown where the coordinator retries: every
/// third listing of a step's folder, the first read of the last rank's
/// done-record of each step, and the first put of each manifest. (A failed
/// read of a done-record makes the coordinator read again the records read
/// after it in the same poll, so only the last one read is throttled here;
/// the writers' puts and the requests of `open` are not retried above the
/// store, so none of them is throttled.)
#[derive(Debug)]
struct Slow {
    inner: Arc<InMemory>,
    tally: Arc<Tally>,
    ticks: AtomicU64,
    /// How many times each kind of request was made of each key.
    made: Mutex<HashMap<(Kind, String), u64>>,
}

impl std::fmt::Display for Slow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slow(InMemory)")
    }
}

impl Slow {
    fn new(tally: Arc<Tally>) -> Slow {
        Slow { inner: Arc::new(InMemory::new()), tally, ticks: AtomicU64::new(0), made: Mutex::new(HashMap::new()) }
    }

    /// The next request's latency.
    fn latency(&self) -> Duration {
        let tick = self.ticks.fetch_add(1, Ordering::Relaxed);
        Duration::from_micros(2_000 + Rng(0x5ca1e ^ tick).below(4_000))
    }

    /// Whether this request of `key` is answered with a 503 SlowDown.
    fn throttles(&self, kind: Kind, key: &str) -> bool {
        let nth = {
            let mut made = self.made.lock().unwrap();
            let n = made.entry((kind, key.to_string())).or_insert(0);
            *n += 1;
            *n
        };
        let last_record = format!("/done-{}.json", WORLD - 1);
        match (kind, classify(key).0) {
            (Kind::List, Class::StepFolder) => nth.is_multiple_of(3),
            (Kind::Get, Class::Done) => nth == 1 && key.ends_with(&last_record),
            (Kind::Put, Class::Manifest) => nth == 1,
            _ => false,
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for Slow {
    async fn put_opts(
        &self,
        location: &Key,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        tokio::time::sleep(self.latency()).await;
        if self.throttles(Kind::Put, location.as_ref()) {
            self.tally.record(Kind::Put, location.as_ref(), true);
            return Err(slow_down(location.as_ref()));
        }
        let put = self.inner.put_opts(location, payload, opts).await;
        self.tally.record(Kind::Put, location.as_ref(), false);
        put
    }

    async fn put_multipart_opts(
        &self,
        location: &Key,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        tokio::time::sleep(self.latency()).await;
        let upload = self.inner.put_multipart_opts(location, opts).await;
        self.tally.record(Kind::Multipart, location.as_ref(), false);
        upload
    }

    async fn get_opts(&self, location: &Key, options: object_store::GetOptions) -> object_store::Result<object_store::GetResult> {
        let kind = if options.head { Kind::Head } else { Kind::Get };
        tokio::time::sleep(self.latency()).await;
        if self.throttles(kind, location.as_ref()) {
            self.tally.record(kind, location.as_ref(), true);
            return Err(slow_down(location.as_ref()));
        }
        let got = self.inner.get_opts(location, options).await;
        self.tally.record(kind, location.as_ref(), false);
        got
    }

    fn delete_stream(&self, locations: BoxStream<'static, object_store::Result<Key>>) -> BoxStream<'static, object_store::Result<Key>> {
        let tally = self.tally.clone();
        let latency = self.latency();
        let counted = locations
            .then(move |location| {
                let tally = tally.clone();
                async move {
                    tokio::time::sleep(latency).await;
                    if let Ok(key) = &location {
                        tally.record(Kind::Delete, key.as_ref(), false);
                    }
                    location
                }
            })
            .boxed();
        self.inner.delete_stream(counted)
    }

    fn list(&self, prefix: Option<&Key>) -> BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        let key = prefix.map(|p| p.to_string()).unwrap_or_default();
        let throttled = self.throttles(Kind::List, &key);
        let (inner, tally, latency, prefix) = (self.inner.clone(), self.tally.clone(), self.latency(), prefix.cloned());
        futures::stream::once(async move {
            tokio::time::sleep(latency).await;
            if throttled {
                tally.record(Kind::List, &key, true);
                return futures::stream::once(async move { Err(slow_down(&key)) }).boxed();
            }
            let listing = inner.list(prefix.as_ref());
            tally.record(Kind::List, &key, false);
            listing
        })
        .flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Key>) -> object_store::Result<object_store::ListResult> {
        tokio::time::sleep(self.latency()).await;
        let listed = self.inner.list_with_delimiter(prefix).await;
        self.tally.record(Kind::ListDelimited, prefix.map(|p| p.as_ref()).unwrap_or_default(), false);
        listed
    }

    async fn copy_opts(&self, from: &Key, to: &Key, options: object_store::CopyOptions) -> object_store::Result<()> {
        tokio::time::sleep(self.latency()).await;
        let copied = self.inner.copy_opts(from, to, options).await;
        self.tally.record(Kind::Copy, to.as_ref(), false);
        copied
    }
}

/// The matrix every step saves: distinct values, exact in f32.
fn matrix(step: u64) -> Tensor {
    let n = (WORLD * COLS) as i64;
    (Tensor::arange(n, (TchKind::Float, Device::Cpu)) + (step * 10_000) as f64).reshape([WORLD as i64, COLS as i64])
}

/// A run id for one launch of every rank, new at each call.
fn launch() -> String {
    static LAUNCHES: AtomicU64 = AtomicU64::new(0);
    format!("scale-{}-{}", std::process::id(), LAUNCHES.fetch_add(1, Ordering::Relaxed))
}

/// What the coordinator's handle counted.
#[derive(Debug)]
struct Committed {
    committed: u64,
    already: u64,
    failed: u64,
}

/// The phases of a run, as positions in the tally and times.
struct Run {
    /// Every rank opened: the requests of the saves and commits follow.
    opened: usize,
    /// Every rank flushed (the coordinator: every step committed).
    flushed: usize,
    open_time: Duration,
    save_time: Duration,
    coordinator: Committed,
}

/// `WORLD` ranks on `url` (through `endpoint` when not empty) save `STEPS`
/// steps, the last rank each only once the coordinator has polled the
/// step's folder twice; every step must commit, and the last one reads back
/// bitwise on rank 0.
fn run_ranks(url: &str, endpoint: &str, tally: &Arc<Tally>) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let run = launch();
    let opened = Arc::new(Barrier::new(WORLD + 1));
    let go = Arc::new(Barrier::new(WORLD + 1));
    let started = Instant::now();
    let ranks: Vec<_> = (0..WORLD)
        .map(|r| {
            let mut c = rank_config(tmp.path(), url, r, WORLD, &run, DEADLINE_SECS);
            if !endpoint.is_empty() {
                c.remote.endpoint = endpoint.into();
                c.remote.allow_http = true;
            }
            let (opened, go, tally) = (opened.clone(), go.clone(), tally.clone());
            std::thread::Builder::new()
                .name(format!("rank-{r}"))
                .spawn(move || {
                    // Every rank meets the others even when it cannot open.
                    let io = ShardedIo::open(&c);
                    opened.wait();
                    go.wait();
                    let io = io.unwrap();
                    for step in 1..=STEPS {
                        let row = matrix(step).narrow(0, r as i64, 1);
                        if r == WORLD - 1 {
                            tally.wait_for_polls(step, HELD_FOR_POLLS);
                        }
                        io.save(step, &[Part::rows("w", &row, r, WORLD)]).unwrap();
                    }
                    assert!(io.flush(Duration::from_secs(DEADLINE_SECS)).unwrap(), "rank {r}: not flushed");
                    assert_eq!(io.stats().written.load(Ordering::Relaxed), STEPS, "rank {r}");
                    assert_eq!(io.stats().failed.load(Ordering::Relaxed), 0, "rank {r}");
                    (r == 0).then_some(io)
                })
                .unwrap()
        })
        .collect();
    opened.wait();
    let open_time = started.elapsed();
    let opened_at = tally.len();
    let saving = Instant::now();
    go.wait();
    let mut coordinator = None;
    for rank in ranks {
        if let Some(io) = rank.join().unwrap() {
            coordinator = Some(io);
        }
    }
    let save_time = saving.elapsed();
    let flushed = tally.len();
    let io = coordinator.unwrap();
    let stats = io.stats();
    let counted = Committed {
        committed: stats.committed.load(Ordering::Relaxed),
        already: stats.already_committed.load(Ordering::Relaxed),
        failed: stats.commit_failed.load(Ordering::Relaxed),
    };
    // Every step committed, by all ranks, and the last reads back whole.
    let all = io.list().unwrap();
    assert_eq!(all.iter().map(|m| m.iterations).collect::<Vec<_>>(), (1..=STEPS).collect::<Vec<_>>());
    assert!(all.iter().all(|m| m.world_size == WORLD && m.shards.len() == WORLD));
    let last = io.latest().unwrap().unwrap();
    assert_eq!(last.iterations, STEPS);
    let w = io.load(&last, &[Want::whole("w")]).unwrap().remove(0);
    assert!(common::bitwise_eq(&w, &matrix(STEPS)), "step {STEPS} read back differs");
    Run { opened: opened_at, flushed, open_time, save_time, coordinator: counted }
}

/// How many of `reqs` match `keep`, and how many of those were throttled.
fn count(reqs: &[&Request], keep: impl Fn(&Request) -> bool) -> (usize, usize) {
    let kept: Vec<&&Request> = reqs.iter().filter(|r| keep(r)).collect();
    (kept.len(), kept.iter().filter(|r| r.throttled).count())
}

/// The step whose objects `r` is about: its folder, shards, done-records,
/// and the put of its manifest (other requests of manifests are the
/// commit's fixed ones).
fn of_step(r: &Request) -> Option<u64> {
    match r.class {
        Class::StepFolder | Class::Done | Class::Shard => r.step,
        Class::Manifest if r.kind == Kind::Put => r.step,
        _ => None,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Prints the figures of `run` (lines starting with `scale: <label>`) and
/// checks the requests of each commit against their bounds.
fn check_and_print(label: &str, tally: &Tally, run: &Run) {
    let c = &run.coordinator;
    assert_eq!((c.committed, c.already, c.failed), (STEPS, 0, 0), "{label}: {c:?}");
    let open = tally.between(0, run.opened);
    let saves = tally.between(run.opened, run.flushed);
    eprintln!(
        "scale: {label}: {WORLD} ranks, {STEPS} steps of a {WORLD}x{COLS} f32 matrix, every step committed; \
         open {} ({} requests, {:.1} a rank), saves and commits {} (wall)",
        ms(run.open_time),
        open.len(),
        open.len() as f64 / WORLD as f64,
        ms(run.save_time),
    );
    let mut lags = Vec::new();
    for step in 1..=STEPS {
        let of: Vec<&Request> = saves.iter().filter(|r| of_step(r) == Some(step)).collect();
        let (polls, polls_throttled) = count(&of, |r| r.kind == Kind::List && r.class == Class::StepFolder);
        let (done_gets, done_gets_throttled) = count(&of, |r| r.kind == Kind::Get && r.class == Class::Done);
        let (done_puts, done_puts_throttled) = count(&of, |r| r.kind == Kind::Put && r.class == Class::Done);
        let (shard_puts, shard_puts_throttled) = count(&of, |r| r.kind == Kind::Put && r.class == Class::Shard);
        let (manifest_puts, manifest_puts_throttled) = count(&of, |r| r.kind == Kind::Put && r.class == Class::Manifest);
        let (heads, _) = count(&of, |r| r.kind == Kind::Head);
        let (gets, _) = count(&of, |r| r.kind == Kind::Get);
        let last_record = of.iter().filter(|r| r.kind == Kind::Put && r.class == Class::Done && !r.throttled).map(|r| r.at).max();
        let manifest = of.iter().filter(|r| r.kind == Kind::Put && r.class == Class::Manifest && !r.throttled).map(|r| r.at).min();
        let first_poll = of.iter().filter(|r| r.kind == Kind::List && r.class == Class::StepFolder).map(|r| r.at).min();
        let (Some(last_record), Some(manifest), Some(first_poll)) = (last_record, manifest, first_poll) else {
            panic!("{label}: step {step}: no done-record, manifest or poll among the requests");
        };
        let lag = manifest.saturating_duration_since(last_record);
        let window = manifest.saturating_duration_since(first_poll);
        lags.push(lag);
        let by_kind: Vec<String> = Kind::ALL
            .iter()
            .map(|k| (k, of.iter().filter(|r| r.kind == *k).count()))
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{} {n}", k.name()))
            .collect();
        eprintln!(
            "scale: {label} step {step}: {polls} polls ({polls_throttled} throttled) in {}; requests of the step: {}; \
             done-records read {done_gets} ({done_gets_throttled} throttled), other gets {}, heads {heads}; \
             last done-record -> manifest {}",
            ms(window),
            by_kind.join(", "),
            gets - done_gets,
            ms(lag),
        );
        // Each rank wrote its shard and its record once; one manifest.
        assert_eq!(shard_puts - shard_puts_throttled, WORLD, "{label}: step {step}: shards written");
        assert_eq!(done_puts - done_puts_throttled, WORLD, "{label}: step {step}: done-records written");
        assert_eq!(manifest_puts - manifest_puts_throttled, 1, "{label}: step {step}: manifests written");
        // Each done-record read once (again only after a 503), not at every poll.
        assert!(
            done_gets >= WORLD && done_gets <= WORLD + done_gets_throttled + 2,
            "{label}: step {step}: {done_gets} reads of done-records ({done_gets_throttled} throttled) for {WORLD} ranks"
        );
        // One listing per poll, and polls bounded by the time the commit
        // took (the coordinator pauses between them), not by the ranks.
        let most_polls = 1 + (window.as_millis() / POLL_GAP.as_millis()) as usize + polls_throttled;
        assert!(polls > HELD_FOR_POLLS, "{label}: step {step}: {polls} polls, the last rank waited for {HELD_FOR_POLLS}");
        assert!(polls <= most_polls, "{label}: step {step}: {polls} listings of the step's folder in {}", ms(window));
        assert!(polls < WORLD, "{label}: step {step}: {polls} listings of the step's folder for {WORLD} ranks");
        // No HEAD per shard or per record: shard sizes come from the listing.
        assert!(heads <= 1, "{label}: step {step}: {heads} HEAD requests");
    }
    // What the commits asked beside their steps' objects, per commit.
    let fixed: Vec<&Request> = saves.iter().filter(|r| of_step(r).is_none()).collect();
    let mut per_kind: BTreeMap<Kind, usize> = BTreeMap::new();
    for r in &fixed {
        *per_kind.entry(r.kind).or_default() += 1;
    }
    let per_commit: Vec<String> = per_kind.iter().map(|(k, n)| format!("{} {:.1}", k.name(), *n as f64 / STEPS as f64)).collect::<Vec<_>>();
    let heads = fixed.iter().filter(|r| r.kind == Kind::Head).count();
    eprintln!(
        "scale: {label}: other requests per commit (LATEST, manifests, retention): {} ({:.1} in all)",
        per_commit.join(", "),
        fixed.len() as f64 / STEPS as f64
    );
    assert!(fixed.len() <= FIXED_PER_COMMIT * STEPS as usize, "{label}: {} requests beside the steps' objects", fixed.len());
    assert!(heads <= STEPS as usize, "{label}: {heads} HEAD requests beside the steps' objects");
    let worst = lags.iter().max().copied().unwrap_or_default();
    let mean = lags.iter().sum::<Duration>() / lags.len().max(1) as u32;
    eprintln!("scale: {label}: last done-record -> manifest: mean {}, worst {}", ms(mean), ms(worst));
}

#[test]
fn sixty_four_ranks_commit_every_step_on_a_slow_throttling_store() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tally = Arc::new(Tally::default());
    let name = format!("scale-slow-{}", std::process::id());
    modelio::remote::register_store(&name, Arc::new(Slow::new(tally.clone())) as Arc<dyn ObjectStore>);
    let run = run_ranks(&format!("memory://{name}"), "", &tally);
    let saves = tally.between(run.opened, run.flushed);
    let throttled = saves.iter().filter(|r| r.throttled).count();
    // Each step: a listing, the last record's first read and the manifest's first put.
    assert!(throttled >= 3 * STEPS as usize, "{throttled} requests throttled");
    eprintln!("scale: memory: latency 2-6 ms a request; {throttled} requests answered 503 SlowDown");
    check_and_print("memory", &tally, &run);
}

/// A proxy in front of an S3 server that lets each connection carry one
/// request (its head gets `Connection: close`), so that it sees and counts
/// every request, and answers the first request of every
/// [`SLOW_DOWN_EVERY`]th connection with a 503 SlowDown instead of passing
/// it on (each request line at most once, so that every request succeeds
/// within the client's retries).
struct Proxy {
    port: u16,
    slow_downs: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

struct Relay {
    upstream: SocketAddr,
    tally: Arc<Tally>,
    slow_downs: Arc<AtomicU64>,
    /// Request lines already answered with a 503.
    throttled: Mutex<HashSet<String>>,
}

const SLOW_DOWN_BODY: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
    <Message>Please reduce your request rate.</Message></Error>";

impl Proxy {
    fn start(upstream: u16, tally: Arc<Tally>) -> Proxy {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let slow_downs = Arc::new(AtomicU64::new(0));
        let relay = Arc::new(Relay {
            upstream: SocketAddr::from(([127, 0, 0, 1], upstream)),
            tally,
            slow_downs: slow_downs.clone(),
            throttled: Mutex::new(HashSet::new()),
        });
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let mut accepted = 0u64;
            while let Ok((client, _)) = listener.accept().await {
                accepted += 1;
                let relay = relay.clone();
                tokio::spawn(async move {
                    let _ = relay.serve(client, accepted.is_multiple_of(SLOW_DOWN_EVERY)).await;
                });
            }
        });
        Proxy { port, slow_downs, _rt: rt }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// The value of query parameter `name` in `query`, if present.
fn param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

fn percent_decoded(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What an S3 request head asks, and of which key (a listing's prefix).
fn s3_request(method: &str, target: &str, headers: &[(String, String)]) -> (Kind, String) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let object = path.trim_start_matches('/').split_once('/').map(|(_, key)| percent_decoded(key)).unwrap_or_default();
    let has = |name: &str| param(query, name).is_some();
    let header = |name: &str| headers.iter().any(|(k, _)| k == name);
    match method {
        "HEAD" => (Kind::Head, object),
        "GET" if has("list-type") => {
            let prefix = percent_decoded(param(query, "prefix").unwrap_or_default());
            (if has("delimiter") { Kind::ListDelimited } else { Kind::List }, prefix)
        }
        "GET" => (Kind::Get, object),
        "PUT" if header("x-amz-copy-source") => (Kind::Copy, object),
        "PUT" if has("partNumber") => (Kind::Multipart, object),
        "PUT" => (Kind::Put, object),
        "POST" if has("delete") => (Kind::Delete, object),
        "POST" => (Kind::Multipart, object),
        _ => (Kind::Delete, object),
    }
}

impl Relay {
    async fn serve(&self, mut client: tokio::net::TcpStream, may_throttle: bool) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(8192);
        let mut chunk = [0u8; 8192];
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = client.read(&mut chunk).await?;
            if n == 0 || buf.len() > 64 << 10 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let line = lines.next().unwrap_or_default().to_string();
        let headers: Vec<(String, String)> =
            lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
        let mut words = line.split(' ');
        let (method, target) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
        let (kind, key) = s3_request(method, target, &headers);
        let value = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let chunked = value("transfer-encoding").is_some() || value("expect").is_some();
        if may_throttle && !chunked && self.throttled.lock().unwrap().insert(line.clone()) {
            // The body is read first, so that the client reads the answer.
            let length: usize = value("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            let mut left = length.saturating_sub(buf.len() - end);
            while left > 0 {
                let n = client.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                left = left.saturating_sub(n);
            }
            let body = if method == "HEAD" { "" } else { SLOW_DOWN_BODY };
            let answer = format!(
                "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                SLOW_DOWN_BODY.len()
            );
            client.write_all(answer.as_bytes()).await?;
            client.shutdown().await?;
            self.slow_downs.fetch_add(1, Ordering::Relaxed);
            self.tally.record(kind, &key, true);
            return Ok(());
        }
        let mut forwarded = format!("{line}\r\n");
        for l in head.split("\r\n").skip(1).filter(|l| !l.is_empty()) {
            let name = l.split(':').next().unwrap_or_default().trim().to_ascii_lowercase();
            if name != "connection" && name != "keep-alive" {
                forwarded.push_str(l);
                forwarded.push_str("\r\n");
            }
        }
        forwarded.push_str("Connection: close\r\n\r\n");
        let mut server = tokio::net::TcpStream::connect(self.upstream).await?;
        server.write_all(forwarded.as_bytes()).await?;
        server.write_all(&buf[end..]).await?;
        let relayed = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        self.tally.record(kind, &key, false);
        relayed.map(drop)
    }
}

#[test]
fn sixty_four_ranks_commit_every_step_on_s3_through_slow_downs() {
    if !common::s3::binary().is_file() {
        eprintln!("scale: s3s-fs: skipped: {} is missing (`make setup` installs it)", common::s3::binary().display());
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let server = S3Server::start();
    server.set_env();
    let tally = Arc::new(Tally::default());
    let proxy = Proxy::start(server.port, tally.clone());
    let run = run_ranks(&server.url("scale"), &proxy.endpoint(), &tally);
    let slow_downs = proxy.slow_downs.load(Ordering::Relaxed);
    let saves = tally.between(run.opened, run.flushed);
    let throttled_saves = saves.iter().filter(|r| r.throttled).count();
    eprintln!(
        "scale: s3s-fs: through a proxy answering every {SLOW_DOWN_EVERY}th connection 503 SlowDown: {slow_downs} answered so \
         ({throttled_saves} while saving and committing), each retried by the S3 client"
    );
    assert!(slow_downs > 0, "no request was answered 503 SlowDown");
    check_and_print("s3s-fs", &tally, &run);
}
