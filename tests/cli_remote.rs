//! `modelio remote ...`, run as a user runs it, against checkpoints a
//! trainer uploaded: to a local folder store (`file://`), and once to a real
//! S3 server (`common/s3.rs`).
#![cfg(feature = "remote")]

mod common;

use common::{printed, text};

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::s3::S3Server;
use common::{config, seeded_store};
use modelio::archive::ArchiveReader;
use modelio::remote::{Remote, RemoteManifest};
use modelio::{Config, ModelIo};

fn cli() -> Command {
    Command::new(common::cli())
}

/// Model `m` in `dir`, saving every iteration, uploading every save to `url`
/// and keeping every remote checkpoint.
fn remote_config(dir: &Path, url: &str) -> Config {
    let mut c = config(dir, "m");
    c.save.interval = 1;
    c.remote.url = url.into();
    c.remote.keep = 0;
    c
}

/// Open `c`, train `steps` iterations saving each and waiting for its
/// upload, then shut down.
fn train(c: &Config, steps: u64) {
    let (vs, _net) = seeded_store(1);
    let mut io = ModelIo::open(c.clone()).unwrap();
    for _ in 0..steps {
        io.record(1.0);
        tch::no_grad(|| {
            for (_, mut v) in vs.variables() {
                let _ = v.g_add_scalar_(0.25);
            }
        });
        io.save(&vs, None).unwrap().wait_blocking().unwrap();
        assert!(io.wait_remote_blocking(Duration::from_secs(30)), "upload did not finish");
    }
    io.shutdown_blocking().unwrap();
}

/// A trained model `m` in `<tmp>/model` whose `steps` saves are uploaded to
/// the folder store `<tmp>/store`; the store's URL.
fn uploaded(tmp: &Path, steps: u64) -> String {
    let url = format!("file://{}", tmp.join("store").display());
    train(&remote_config(&tmp.join("model"), &url), steps);
    url
}

fn checkpoints(url: &str) -> Vec<RemoteManifest> {
    let c = remote_config(Path::new("unused"), url);
    Remote::connect(&c.remote, "m").unwrap().list().unwrap()
}

/// `modelio remote <args> --url URL --name m`.
fn remote(args: &[&str], url: &str) -> Output {
    cli().arg("remote").args(args).args(["--url", url, "--name", "m"]).output().unwrap()
}

#[test]
fn list_shows_every_checkpoint_oldest_first_and_marks_the_latest() {
    let tmp = tempfile::tempdir().unwrap();
    let url = uploaded(tmp.path(), 3);
    let all = checkpoints(&url);
    assert_eq!(all.iter().map(|m| m.iterations).collect::<Vec<_>>(), [1, 2, 3]);

    let out = remote(&["list"], &url);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let stdout = text(&out.stdout);
    let rows: Vec<&str> = stdout.lines().filter(|l| l.contains(" iterations ")).collect();
    assert_eq!(rows.len(), 3, "{stdout}");
    for (row, m) in rows.iter().zip(&all) {
        assert!(row.ends_with(&m.id()), "oldest first, each with its id: {stdout}");
        assert!(row.contains(&format!(" {} iterations", m.iterations)) && row.contains("save") && row.contains("MiB"), "{row}");
        assert!(row.contains("optimizer no"), "{row}");
    }
    assert!(rows[2].starts_with('*'), "the latest is marked: {stdout}");
    assert!(rows[..2].iter().all(|r| r.starts_with(' ')), "only the latest is marked: {stdout}");

    // The same through a config file with a [modelio] table: url and name from there.
    let app = tmp.path().join("app.toml");
    std::fs::write(&app, format!("[train]\nlr = 0.1\n[modelio.model]\nname = \"m\"\n[modelio.remote]\nurl = \"{url}\"\n")).unwrap();
    let out = cli().args(["remote", "list", "--config"]).arg(&app).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(text(&out.stdout), stdout);

    // Another model: nothing there, said so, exit 0.
    let out = cli().args(["remote", "list", "--url", &url, "--name", "other"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(text(&out.stdout).starts_with("no checkpoints at ") && text(&out.stdout).contains("/other"), "{}", printed(&out));
}

#[test]
fn list_json_gives_every_checkpoint_oldest_first_with_the_latest_marked() {
    let tmp = tempfile::tempdir().unwrap();
    let url = uploaded(tmp.path(), 3);
    let all = checkpoints(&url);

    let out = remote(&["list", "--json"], &url);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", printed(&out)));
    assert_eq!(rows.len(), 3, "{}", printed(&out));
    for (i, (row, m)) in rows.iter().zip(&all).enumerate() {
        assert_eq!(row["id"], m.id().as_str());
        assert_eq!(row["iterations"], m.iterations);
        assert_eq!(row["kind"], "save");
        assert_eq!(row["created"], m.created.as_str());
        assert_eq!(row["bytes"], m.bytes());
        assert!(m.bytes() > 0);
        assert_eq!(row["with_optimizer"], false);
        assert_eq!(row["upload"], m.upload.as_str());
        assert_eq!(row["latest"], i == 2, "only the newest is the latest: {row}");
    }

    // Nothing there: an empty array, exit 0.
    let out = cli().args(["remote", "list", "--json", "--url", &url, "--name", "other"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(), serde_json::json!([]), "{}", printed(&out));
}

#[test]
fn pull_fills_an_empty_folder_with_a_checkpoint_that_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let url = uploaded(tmp.path(), 3);
    let all = checkpoints(&url);

    // The latest, into a folder that does not exist yet.
    let dir = tmp.path().join("pulled/latest");
    let out = cli().args(["remote", "pull", "--url", &url, "--name", "m", "--dir"]).arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(text(&out.stdout).contains(&format!("pulled {}", all[2].id())), "{}", printed(&out));
    assert_eq!(ArchiveReader::open(&dir.join("m.mio")).unwrap().manifest.iterations, 3);
    assert!(dir.join("m_state.json").is_file());
    let out = cli().arg("verify").arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "the pulled archive verifies: {}", printed(&out));

    // By iteration count, and by id.
    let by_count = tmp.path().join("pulled/two");
    let out = cli().args(["remote", "pull", "2", "--url", &url, "--name", "m", "--dir"]).arg(&by_count).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(ArchiveReader::open(&by_count.join("m.mio")).unwrap().manifest.iterations, 2);
    let by_id = tmp.path().join("pulled/one");
    let out = cli().args(["remote", "pull", &all[0].id(), "--url", &url, "--name", "m", "--dir"]).arg(&by_id).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(ArchiveReader::open(&by_id.join("m.mio")).unwrap().manifest.iterations, 1);

    // Nothing matches: an error naming what was asked for.
    let out = cli().args(["remote", "pull", "99", "--url", &url, "--name", "m", "--dir"]).arg(tmp.path().join("none")).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(text(&out.stderr).contains("no remote checkpoint `99`"), "{}", printed(&out));
}

#[test]
fn pull_refuses_a_folder_that_holds_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let url = uploaded(tmp.path(), 2);
    // The trainer's own folder: archive and state file at iteration 2.
    let dir = tmp.path().join("model");
    let before = std::fs::read(dir.join("m.mio")).unwrap();
    let out = cli().args(["remote", "pull", "1", "--url", &url, "--name", "m", "--dir"]).arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&dir.display().to_string()) && stderr.contains("m.mio"), "names the folder and file: {stderr}");
    assert!(stderr.contains("empty folder") && stderr.contains("move"), "says what to do: {stderr}");
    assert_eq!(std::fs::read(dir.join("m.mio")).unwrap(), before, "the archive is untouched");

    // A state file alone (a model whose archive is gone) is refused too.
    std::fs::remove_file(dir.join("m.mio")).unwrap();
    let out = cli().args(["remote", "pull", "--url", &url, "--name", "m", "--dir"]).arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(text(&out.stderr).contains("m_state.json"), "{}", printed(&out));
    assert!(!dir.join("m.mio").exists());
}

#[test]
fn verify_reports_ok_and_names_a_damaged_object() {
    let tmp = tempfile::tempdir().unwrap();
    let url = uploaded(tmp.path(), 2);
    let all = checkpoints(&url);

    let out = remote(&["verify"], &url);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(text(&out.stdout).trim(), format!("ok      {} (2 iterations)", all[1].id()));
    let out = remote(&["verify", "--all"], &url);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(text(&out.stdout).lines().filter(|l| l.starts_with("ok ")).count(), 2, "{}", printed(&out));

    // Flip a byte of the latest archive object in the store (keys are paths under its folder).
    let object = tmp.path().join("store").join(&all[1].object("archive").unwrap().key);
    let len = std::fs::metadata(&object).unwrap().len() as usize;
    common::flip_byte(&object, len / 2);
    let out = remote(&["verify"], &url);
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("DAMAGED") && stdout.contains(&all[1].id()) && stdout.contains("CRC-32C"), "{stdout}");
    let out = remote(&["verify", "--all"], &url);
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let stdout = text(&out.stdout);
    assert!(stdout.contains(&format!("ok      {}", all[0].id())), "the intact one is still checked: {stdout}");
    assert!(stdout.contains(&format!("DAMAGED {}", all[1].id())), "{stdout}");
    // The intact one by iteration count.
    let out = remote(&["verify", "1"], &url);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    // A pull of the damaged checkpoint commits nothing.
    let dir = tmp.path().join("pulled");
    let out = cli().args(["remote", "pull", "--url", &url, "--name", "m", "--dir"]).arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(text(&out.stderr).contains("CRC-32C"), "{}", printed(&out));
    assert!(!dir.join("m.mio").exists());
}

#[test]
fn status_prints_the_uploaders_counters() {
    let tmp = tempfile::tempdir().unwrap();
    let url = uploaded(tmp.path(), 3);
    let dir = tmp.path().join("model");
    assert!(dir.join("m_remote.json").is_file());

    // The name is inferred: the folder holds one model.
    let out = cli().args(["remote", "status"]).arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let stdout = text(&out.stdout);
    let last = checkpoints(&url).pop().unwrap();
    for line in [
        format!("location:        {url}/m"),
        "uploaded:        3".into(),
        format!("last uploaded:   iteration 3 ({})", last.id()),
        "pending:         none".into(),
        "skipped:         0".into(),
        "failed attempts: 0".into(),
        "last error:      none".into(),
    ] {
        assert!(stdout.contains(&line), "{line:?} in: {stdout}");
    }

    // A folder whose model never uploaded: said so, exit 0.
    let local = tmp.path().join("local");
    train(&remote_config(&local, ""), 1);
    let out = cli().args(["remote", "status"]).arg(&local).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(text(&out.stdout).contains("has not uploaded anything"), "{}", printed(&out));
}

#[test]
fn a_bad_or_missing_remote_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = cli().args(["remote", "list", "--url", "ftp://x/y"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("error: ") && stderr.contains("remote.url") && stderr.contains("ftp://x/y"), "{stderr}");

    let out = cli().args(["remote", "verify"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(text(&out.stderr).contains("--url"), "{}", printed(&out));

    // A folder store that does not exist is an error, and is not created.
    let missing = tmp.path().join("no-store");
    let out = cli().args(["remote", "list", "--url"]).arg(format!("file://{}", missing.display())).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(text(&out.stderr).contains(&missing.display().to_string()), "{}", printed(&out));
    assert!(!missing.exists());

    // The status of a folder that is not there.
    let out = cli().args(["remote", "status", "--name", "m"]).arg(&missing).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(text(&out.stderr).contains("could not list") && text(&out.stderr).contains("no-store"), "{}", printed(&out));

    // A status file that is not the uploader's: named, exit 1.
    let odd = tmp.path().join("odd");
    std::fs::create_dir(&odd).unwrap();
    for body in ["[]", "{\"uploaded\": \"many\"}", "not json"] {
        std::fs::write(odd.join("m_remote.json"), body).unwrap();
        let out = cli().args(["remote", "status", "--name", "m"]).arg(&odd).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{body}: {}", printed(&out));
        assert!(text(&out.stderr).contains("not a status file of modelio's uploader"), "{body}: {}", printed(&out));
    }

    // S3 without credentials names the variable.
    let out = cli()
        .args(["remote", "list", "--url", "s3://bucket/p"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_WEB_IDENTITY_TOKEN_FILE")
        .env_remove("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        .env_remove("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(text(&out.stderr).contains("AWS_ACCESS_KEY_ID"), "{}", printed(&out));
}

#[test]
fn list_and_verify_against_an_s3_server() {
    let server = S3Server::start();
    server.set_env();
    let tmp = tempfile::tempdir().unwrap();
    let url = server.url("cli/run");
    let mut c = remote_config(&tmp.path().join("model"), &url);
    c.remote.endpoint = server.endpoint();
    c.remote.allow_http = true;
    train(&c, 2);
    let all = Remote::connect(&c.remote, "m").unwrap().list().unwrap();
    assert_eq!(all.len(), 2);

    let run = |args: &[&str]| -> Output {
        let endpoint = server.endpoint();
        let flags = ["--url", url.as_str(), "--endpoint", endpoint.as_str(), "--allow-http", "--name", "m"];
        cli().arg("remote").args(args).args(flags).envs(server.env()).output().unwrap()
    };
    let out = run(&["list"]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", printed(&out), server.log());
    let stdout = text(&out.stdout);
    assert!(stdout.contains(&all[0].id()) && stdout.contains(&all[1].id()), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with('*') && l.ends_with(&all[1].id())), "{stdout}");
    let out = run(&["verify", "--all"]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", printed(&out), server.log());
    assert_eq!(text(&out.stdout).lines().filter(|l| l.starts_with("ok ")).count(), 2, "{}", printed(&out));

    // Without --allow-http the plain endpoint is refused, naming the setting.
    let out =
        cli().args(["remote", "list", "--url", &url, "--endpoint", &server.endpoint(), "--name", "m"]).envs(server.env()).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(text(&out.stderr).contains("allow_http"), "{}", printed(&out));
}
