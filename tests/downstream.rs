//! The README's "Using modelio from your own crate", followed as a user would.
//!
//! `examples/downstream/` is copied into a fresh folder beside a link named
//! `modelio` to this checkout (its `path = "../modelio"`), and the README's
//! commands run there as written, with one stand-in: instead of
//! `pip install torch==2.11.0` the new virtualenv gets a `.pth` file that
//! finds this repo's torch. The folder lies outside this repo, so that this
//! repo's `.cargo/config.toml` cannot fill in for the crate's own.
//!
//! The crate builds into the target folder of the build that runs this test,
//! so it reuses the dependencies that build just compiled (the crate's
//! profile and features match this package's: only modelio, the crate and
//! `tracing-subscriber`, which the tests use with more features, compile).
//! For that the user's shell exports this repo's `LIBTORCH`, the README's
//! other way to give it: torch-sys's build script reruns whenever its value
//! changes, and with the crate's own value (`<crate>/.venv/torch`) the two
//! builds would take turns rebuilding libtorch's bindings (minutes each). The
//! crate's `.cargo/config.toml` is checked to name the torch the README's
//! link command made.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use modelio::policy::state::State;

const SECTION: &str = "## Using modelio from your own crate";
/// The one README command the test does not run, and what stands in for it.
const PIP: &str = ".venv/bin/pip install torch==2.11.0";
/// The README's other way to give LIBTORCH.
const EXPORT: &str = "export LIBTORCH=$PWD/.venv/torch";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The README's section, up to the next section.
fn section() -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme.find(SECTION).expect("README.md has a section \"Using modelio from your own crate\"");
    let rest = &readme[start + SECTION.len()..];
    rest[..rest.find("\n## ").unwrap_or(rest.len())].to_string()
}

/// The section's fenced code blocks: (language, text).
fn blocks() -> Vec<(String, String)> {
    let section = section();
    let mut lines = section.lines();
    let mut blocks = Vec::new();
    while let Some(line) = lines.next() {
        if let Some(lang) = line.strip_prefix("```") {
            let text: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
            blocks.push((lang.to_string(), text.join("\n") + "\n"));
        }
    }
    let langs: Vec<&str> = blocks.iter().map(|(lang, _)| lang.as_str()).collect();
    assert_eq!(langs, ["toml", "toml", "rust", "sh"], "the section's blocks: Cargo.toml lines, .cargo/config.toml, build.rs, commands");
    blocks
}

fn shipped(file: &str) -> String {
    std::fs::read_to_string(repo().join("examples/downstream").join(file)).unwrap()
}

/// What the README tells a user to write is what the crate built below holds.
#[test]
fn readme_shows_the_shipped_files() {
    let blocks = blocks();
    let manifest = shipped("Cargo.toml");
    assert!(manifest.contains(&blocks[0].1), "examples/downstream/Cargo.toml does not hold the README's lines:\n{}", blocks[0].1);
    // Beyond those lines, only what `cargo new` writes and `[workspace]`.
    for line in manifest.replacen(&blocks[0].1, "", 1).lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let known =
            ["[package]", "[workspace]"].contains(&line) || ["name = ", "version = ", "edition = "].iter().any(|k| line.starts_with(k));
        assert!(known, "examples/downstream/Cargo.toml has `{line}`, which the README does not show");
    }
    assert_eq!(blocks[1].1, shipped(".cargo/config.toml"), "README vs examples/downstream/.cargo/config.toml");
    assert_eq!(blocks[2].1, shipped("build.rs"), "README vs examples/downstream/build.rs");
    let main = shipped("src/main.rs");
    let subscriber = "tracing_subscriber::fmt().init();";
    assert!(section().contains(&format!("`{subscriber}`")) && main.contains(subscriber), "README and main.rs install the same subscriber");
    assert!(main.contains("use modelio::tch::"), "main.rs uses modelio's tch");
    assert!(section().contains(&format!("`{EXPORT}`")), "README offers `{EXPORT}`");
}

/// Like a user's shell: nothing inherited from the cargo that runs this test
/// (which sets LIBTORCH from this repo's config) reaches the user's commands.
fn user_command(program: &str, dir: &Path) -> Command {
    let mut c = Command::new(program);
    c.current_dir(dir);
    for var in [
        "LD_LIBRARY_PATH",
        "LIBTORCH",
        "LIBTORCH_LIB",
        "LIBTORCH_INCLUDE",
        "LIBTORCH_USE_PYTORCH",
        "LIBTORCH_CXX11_ABI",
        "LIBTORCH_STATIC",
        "LIBTORCH_BYPASS_VERSION_CHECK",
        "TORCH_CUDA_VERSION",
        "VIRTUAL_ENV",
    ] {
        c.env_remove(var);
    }
    c
}

/// The target folder of the build that runs this test (its `tmp/` is
/// `CARGO_TARGET_TMPDIR`).
fn target_dir() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("CARGO_TARGET_TMPDIR is <target>/tmp")
}

/// The `LIBTORCH` this test's own build saw (the value torch-sys's build
/// script ran with), exported in the user's shell so that the crate's build
/// shares this build's compiled dependencies.
fn shared_libtorch() -> String {
    std::env::var("LIBTORCH").expect("cargo sets LIBTORCH for the tests (this repo's .cargo/config.toml)")
}

/// Run a README command line with `sh` in the crate: the cargo that runs this
/// test first on PATH, this test's target folder as the build cache (with
/// the `LIBTORCH` it was built with), and the crates already downloaded for
/// this repo (the same Cargo.lock) used offline.
fn shell(line: &str, dir: &Path) -> Output {
    let cargo = PathBuf::from(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    let mut path = cargo.parent().map(|p| vec![p.to_path_buf()]).unwrap_or_default();
    path.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    user_command("sh", dir)
        .args(["-c", line])
        .env("PATH", std::env::join_paths(path).unwrap())
        .env("CARGO_TARGET_DIR", target_dir())
        .env("LIBTORCH", shared_libtorch())
        .env("CARGO_NET_OFFLINE", "true")
        .output()
        .unwrap()
}

/// The folder the crate's `.cargo/config.toml` points `LIBTORCH` at.
fn configured_libtorch(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(dir.join(".cargo/config.toml")).unwrap();
    let config: toml::Table = text.parse().unwrap();
    let entry = &config["env"]["LIBTORCH"];
    let value = entry["value"].as_str().expect("env.LIBTORCH.value");
    assert_eq!(entry.get("relative").and_then(toml::Value::as_bool), Some(true), "LIBTORCH is relative to the crate's folder");
    // `relative`: to the folder holding `.cargo/`.
    dir.join(value)
}

/// Standard output of a command that must succeed; everything it said if not.
fn succeeded(what: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{what}: {}\n--- stdout\n{stdout}\n--- stderr\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The line of `out` that starts with `prefix`, without it.
fn line_after<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines().find_map(|l| l.strip_prefix(prefix)).unwrap_or_else(|| panic!("no line `{prefix}...` in:\n{out}"))
}

/// `trained to iteration N, loss A -> B`: (N, A, B).
fn trained(out: &str) -> (u64, f64, f64) {
    let rest = line_after(out, "trained to iteration ");
    let (n, losses) = rest.split_once(", loss ").unwrap();
    let (a, b) = losses.split_once(" -> ").unwrap();
    (n.parse().unwrap(), a.parse().unwrap(), b.parse().unwrap())
}

/// The iterations of the save lines modelio logged.
fn saves(out: &str) -> Vec<u64> {
    let at = |l: &str| l.split_once("saved models/model/model.mio at iteration ")?.1.split(',').next()?.parse().ok();
    out.lines().filter_map(at).collect()
}

#[test]
fn builds_and_resumes_as_the_readme_says() {
    let started = Instant::now();
    let commands = blocks()[3].1.clone();
    let lines: Vec<&str> = commands.lines().collect();
    let [venv, link, run] = lines[..] else { panic!("the README's commands: virtualenv, link, cargo run; got {lines:?}") };
    assert!(venv.contains(PIP), "the README's set-up no longer runs `{PIP}`: update this test's stand-in");

    // The user's folder: the crate and a checkout of modelio side by side.
    // Always the same path (a path dependency's build is cached by its path),
    // outside any folder with a .cargo/config.toml.
    let name = format!("modelio-downstream{}", repo().display().to_string().replace(['/', '\\', ' ', ':'], "-"));
    let work = std::env::temp_dir().join(name);
    let _ = std::fs::remove_dir_all(&work);
    let dir = work.join("downstream");
    std::fs::create_dir_all(&work).unwrap();
    std::os::unix::fs::symlink(repo(), work.join("modelio")).unwrap();
    copy_dir(&repo().join("examples/downstream"), &dir);
    std::fs::copy(repo().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    for folder in dir.ancestors().skip(1) {
        let config = folder.join(".cargo/config.toml");
        assert!(!config.exists() || folder == home_dir(), "{} would apply to the user's crate too", config.display());
    }

    // The README's commands, `pip install` replaced by a path to this repo's torch.
    let torch = std::fs::canonicalize(repo().join(".venv/torch")).expect("this repo's .venv (`make setup`)");
    let site = torch.parent().unwrap().display().to_string();
    assert!(!site.contains('\''));
    let pth = format!(".venv/bin/python -c 'import sys, sysconfig; open(sysconfig.get_path(\"purelib\") + \"/modelio-test.pth\", \"w\").write(sys.argv[1])' '{site}'");
    for line in [venv.replace(PIP, &pth).as_str(), link] {
        succeeded(line, &shell(line, &dir));
    }
    // The crate's own LIBTORCH (used when none is exported) is the torch
    // the README's link points at.
    let configured = configured_libtorch(&dir);
    assert_eq!(std::fs::canonicalize(&configured).unwrap(), torch, "{} is this repo's torch", configured.display());
    assert_eq!(configured, dir.join(".venv/torch"), "the README's `{EXPORT}` names the same folder");
    let first = succeeded(run, &shell(run, &dir));
    let built = started.elapsed();

    // The binary again, straight (not under `cargo run`) and with no LD_LIBRARY_PATH.
    let bin = target_dir().join("debug/downstream");
    let second = succeeded("second run", &user_command(bin.to_str().unwrap(), &dir).arg("models/model").output().unwrap());

    assert_eq!(line_after(&first, "new model at iteration "), "0");
    assert!(line_after(&second, "resumed from ").ends_with("models/model/model.mio at iteration 40"), "{second}");
    let ((n1, loss_start, _), (n2, _, loss_end)) = (trained(&first), trained(&second));
    assert_eq!((n1, n2), (40, 80));
    assert!(loss_end < loss_start / 4.0, "the loss went from {loss_start} to {loss_end} in 80 iterations");
    // The subscriber shows modelio's save lines: the schedule's, then the exit save.
    assert_eq!(saves(&first), [1, 10, 20, 30, 40, 40], "{first}");
    assert_eq!(saves(&second), [50, 60, 70, 80, 80], "{second}");
    let state = State::read(&dir.join("models/model/model_state.json")).unwrap();
    assert_eq!((state.total_iterations, state.sessions.len()), (80, 2));

    // --no-as-needed kept libtorch_cuda, which nothing names by symbol.
    if torch.join("lib/libtorch_cuda.so").exists() {
        match Command::new("readelf").arg("-d").arg(&bin).output() {
            Ok(out) => assert!(
                String::from_utf8_lossy(&out.stdout).contains("[libtorch_cuda.so]"),
                "{} does not load libtorch_cuda.so",
                bin.display()
            ),
            Err(e) => eprintln!("readelf: {e}; libtorch_cuda.so's NEEDED entry not checked"),
        }
    }
    eprintln!(
        "downstream crate set up, built and run once in {:.1} s; all done in {:.1} s",
        built.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    std::fs::remove_dir_all(&work).unwrap();
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default()
}

/// Copy a folder's files, skipping what a build in place may have left there.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if [".venv", "target", "models", "Cargo.lock"].iter().any(|skip| name == *skip) {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(&name));
        } else {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
}
