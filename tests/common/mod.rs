//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod s3;
#[cfg(feature = "remote")]
pub mod sharded;

use std::path::{Path, PathBuf};

use modelio::{Config, ModelIo};
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

/// A config saving model `name` into `dir`.
pub fn config(dir: &Path, name: &str) -> Config {
    let mut c = Config::default();
    c.model.dir = dir.to_path_buf();
    c.model.name = name.into();
    c
}

/// A small model: two linear layers and a batch-norm (with non-trainable buffers).
#[derive(Debug)]
pub struct Net {
    pub l1: nn::Linear,
    pub l2: nn::Linear,
}

pub fn net(vs: &VarStore) -> Net {
    let root = vs.root();
    Net { l1: nn::linear(&root / "l1", 8, 16, Default::default()), l2: nn::linear(&root / "l2", 16, 4, Default::default()) }
}

impl Module for Net {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.l2.forward(&self.l1.forward(x).relu())
    }
}

/// A VarStore with `net` filled with values derived from `seed` alone
/// (not from libtorch's global generator, which parallel tests share).
pub fn seeded_store(seed: i64) -> (VarStore, Net) {
    let vs = VarStore::new(Device::Cpu);
    let n = net(&vs);
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (i, (_, mut v)) in vars.into_iter().enumerate() {
            let values =
                (Tensor::arange(v.numel() as i64, (Kind::Double, Device::Cpu)) * (0.37 + 0.11 * seed as f64) + i as f64 + seed as f64)
                    .sin()
                    * 0.5;
            v.copy_(&values.to_kind(v.kind()).reshape(v.size()));
        }
    });
    (vs, n)
}

/// Whether two stores hold bitwise equal variables.
pub fn stores_equal(a: &VarStore, b: &VarStore) -> bool {
    let (va, vb) = (a.variables(), b.variables());
    va.len() == vb.len() && va.iter().all(|(k, t)| vb.get(k).map(|u| bitwise_eq(t, u)).unwrap_or(false))
}

/// Bitwise equality (NaN-safe) of two tensors of the same kind.
pub fn bitwise_eq(a: &Tensor, b: &Tensor) -> bool {
    if a.kind() != b.kind() || a.size() != b.size() {
        return false;
    }
    let mut x = Vec::new();
    let mut y = Vec::new();
    modelio::tensors::copy_bytes(a, &mut x).unwrap();
    modelio::tensors::copy_bytes(b, &mut y).unwrap();
    x == y
}

/// One deterministic training step of `net` on batch `i`.
pub fn batch(i: u64) -> (Tensor, Tensor) {
    let x = Tensor::arange(64, (Kind::Float, Device::Cpu)).reshape([8, 8]) * (0.01 * (i as f64 + 1.0)).sin();
    let y = x.narrow(1, 0, 4).cos();
    (x, y)
}

/// The `modelio` command, built from its own package (`cli/`, which builds
/// the library without libtorch) into `target/cli` on first use.
pub fn cli() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let target = root.join("target/cli");
            let out = std::process::Command::new(env!("CARGO"))
                .args(["build", "--quiet", "--manifest-path"])
                .arg(root.join("cli/Cargo.toml"))
                .arg("--target-dir")
                .arg(&target)
                .output()
                .expect("run cargo");
            assert!(out.status.success(), "building the modelio command failed:\n{}", String::from_utf8_lossy(&out.stderr));
            target.join("debug/modelio")
        })
        .clone()
}

pub fn open(dir: &Path, name: &str) -> ModelIo {
    ModelIo::open(config(dir, name)).unwrap()
}

/// Flip one byte of a file in place (tests only: simulates disk damage).
pub fn flip_byte(path: &Path, offset: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

/// A command's output as text (lossy).
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Everything a command printed, stdout then stderr.
pub fn printed(out: &std::process::Output) -> String {
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

/// Every tensor of an archive (model and optimizer), by name, with its
/// bytes, each checked against its checksum.
pub fn archive_tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let r = modelio::archive::ArchiveReader::open(path).unwrap();
    let opt = r.optimizer.iter().flat_map(|(t, _)| t.iter());
    let mut all: Vec<(String, Vec<u8>)> =
        r.model.iter().chain(opt).map(|t| (t.meta.name.clone(), r.checked_data(t).unwrap().to_vec())).collect();
    all.sort();
    all
}

/// splitmix64: a small seeded generator, the same on every machine, for
/// kill moments, delays, random bytes and mutations.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The next value below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// The next index below `n` (0 when `n` is 0).
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// A byte that is not 0: what flips at least one bit when xored in.
    pub fn mask(&mut self) -> u8 {
        (self.index(255) + 1) as u8
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }
}

/// The lines a child process prints on `stdout`, as they come, from a
/// thread of their own (the channel closes when the child's output does).
pub fn read_lines(stdout: std::process::ChildStdout) -> (std::sync::mpsc::Receiver<String>, std::thread::JoinHandle<()>) {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (rx, reader)
}
