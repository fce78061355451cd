//! `modelio verify / inspect / snapshots` and `modelio remote list / verify
//! --sharded` on sharded checkpoints, made in this process by two ranks
//! (two `ShardedIo` of one world) in a model folder and on a `file://` remote.
#![cfg(feature = "remote")]

mod common;

use common::sharded::open_rank;
use common::{printed, text};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use modelio::sharded::Part;
use tch::{Device, Kind, Tensor};

/// The command, with a `RANK` and `WORLD_SIZE` that a reader must ignore.
fn cli() -> Command {
    let mut c = Command::new(common::cli());
    c.env("RANK", "5").env("WORLD_SIZE", "2");
    c
}

fn run(args: &[&std::ffi::OsStr]) -> (Option<i32>, String, Output) {
    let out = cli().args(args).output().unwrap();
    (out.status.code(), printed(&out), out)
}

/// Steps 1, 2 and 3 of model `m` saved by two ranks: `w` [4, 2] split by
/// rows, `b` [3] whole on rank 0; losses 3, 2, 4 (step 2 is the global
/// backup), and a snapshot of step 2.
fn make(dir: &Path, url: &str) {
    let ranks = [0, 1].map(|r| open_rank(dir, url, r, 2, "cli", 20));
    for (step, loss) in [(1u64, 3.0), (2, 2.0), (3, 4.0)] {
        let w = Tensor::arange(8, (Kind::Float, Device::Cpu)).reshape([4, 2]) + step as f64;
        let b = Tensor::from_slice(&[step as f32; 3]);
        ranks[1].save(step, &[Part::rows("w", &w.narrow(0, 2, 2), 2, 4)]).unwrap();
        ranks[0].save_with_loss(step, &[Part::rows("w", &w.narrow(0, 0, 2), 0, 4), Part::whole("b", &b)], loss).unwrap();
        if step == 2 {
            assert!(ranks[0].snapshot());
        }
        assert!(ranks[1].flush(Duration::from_secs(30)).unwrap());
        assert!(ranks[0].flush(Duration::from_secs(30)).unwrap());
    }
    let steps: Vec<u64> = ranks[0].list().unwrap().iter().map(|m| m.iterations).collect();
    assert_eq!(steps, vec![1, 2, 3]);
}

fn sharded(dir: &Path) -> PathBuf {
    dir.join("m/sharded")
}

fn manifest(dir: &Path, step: u64) -> PathBuf {
    sharded(dir).join(format!("manifests/{step:020}.json"))
}

/// Rank `rank`'s shard of `step`.
fn shard(dir: &Path, step: u64, rank: usize) -> PathBuf {
    let prefix = format!("rank-{rank}-");
    std::fs::read_dir(sharded(dir).join(format!("steps/{step:020}")))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&prefix))
        .unwrap()
}

/// Flip a byte in the middle of a file.
fn flip_middle(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len() as usize;
    common::flip_byte(path, len / 2);
}

#[test]
fn verify_a_folder_that_holds_only_sharded_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    make(&dir, "");

    let (code, all, _) = run(&["verify".as_ref(), dir.as_os_str()]);
    assert_eq!(code, Some(0), "{all}");
    assert!(!all.contains("no model"), "{all}");
    for line in [
        "sharded step 1 (2 ranks): ok",
        "sharded step 2 (2 ranks): ok",
        "sharded step 3 (2 ranks): ok",
        "sharded backup, step 2 (2 ranks): ok",
        "sharded snapshot, step 2 (2 ranks): ok",
    ] {
        assert!(all.lines().any(|l| l == line), "missing `{line}`:\n{all}");
    }
    // The sharded folder itself, and one manifest file.
    let (code, all, _) = run(&["verify".as_ref(), sharded(&dir).as_os_str()]);
    assert_eq!(code, Some(0), "{all}");
    assert!(all.contains("sharded step 3 (2 ranks): ok"), "{all}");
    let out = cli().args(["verify", ".."]).current_dir(sharded(&dir).join("manifests")).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(text(&out.stdout).contains("sharded step 3 (2 ranks): ok"), "{}", printed(&out));
    let (code, all, _) = run(&["verify".as_ref(), manifest(&dir, 2).as_os_str()]);
    assert_eq!(code, Some(0), "{all}");
    assert_eq!(all.trim(), "sharded step 2 (2 ranks): ok");

    // Damage to rank 1's shard of the newest step: named, and the step before offered.
    flip_middle(&shard(&dir, 3, 1));
    let (code, all, _) = run(&["verify".as_ref(), dir.as_os_str()]);
    assert_eq!(code, Some(1), "{all}");
    assert!(all.lines().any(|l| l.starts_with("sharded step 3 (2 ranks): DAMAGED: rank 1: ")), "{all}");
    assert!(!all.contains("DAMAGED: rank 0"), "{all}");
    assert!(all.contains("sharded step 2 (2 ranks): ok"), "{all}");
    assert!(all.contains("the newest step 3 does not verify; the newest that does is step 2"), "{all}");
}

#[test]
fn a_missing_folder_is_an_error_and_is_not_created() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nothing");
    for args in [vec!["verify"], vec!["inspect"], vec!["snapshots"]] {
        let mut args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        args.push(missing.as_os_str());
        let (code, all, _) = run(&args);
        assert_eq!(code, Some(1), "{all}");
    }
    assert!(!missing.exists());
    // A sharded folder with no committed step: said so, exit 1.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(sharded(&empty).join("steps")).unwrap();
    let (code, all, _) = run(&["verify".as_ref(), empty.as_os_str()]);
    assert_eq!(code, Some(1), "{all}");
    assert!(all.contains("MISSING sharded `m`: no committed step"), "{all}");
    let (code, all, _) = run(&["inspect".as_ref(), sharded(&empty).as_os_str()]);
    assert_eq!(code, Some(1), "{all}");
    assert!(all.contains("no checkpoints"), "{all}");
    assert!(!sharded(&empty).join("manifests").exists(), "the command never creates folders");
}

#[test]
fn inspect_shows_a_step_its_shards_and_pieces_and_verifies_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    make(&dir, "");

    // The folder: its newest step.
    let (code, all, _) = run(&["inspect".as_ref(), sharded(&dir).as_os_str()]);
    assert_eq!(code, Some(0), "{all}");
    assert!(all.contains("sharded committed step of model `m`, 3 iterations, 2 ranks"), "{all}");
    assert!(all.contains("loss: 4 (lowest so far 2)"), "{all}");
    assert!(all.contains("rank 0") && all.contains("rank-1-"), "{all}");
    let line = |name: &str| all.lines().find(|l| l.trim_start().starts_with(&format!("{name} "))).unwrap_or_default().to_string();
    let w = line("w");
    assert!(w.contains("F32") && w.contains("[4, 2]") && w.contains("rank 0 rows 0..2, rank 1 rows 2..4"), "{all}");
    let b = line("b");
    assert!(b.contains("[3]") && b.contains("rank 0 whole"), "{all}");
    assert!(all.trim_end().ends_with("checksums: ok (2 shards, 2 tensors verified)"), "{all}");

    // A manifest, the backup and a snapshot by their files.
    let (code, all, _) = run(&["inspect".as_ref(), manifest(&dir, 1).as_os_str()]);
    assert_eq!(code, Some(0), "{all}");
    assert!(all.contains("committed step of model `m`, 1 iterations"), "{all}");
    let (code, all, _) = run(&["inspect".as_ref(), sharded(&dir).join("BACKUP").as_os_str()]);
    assert_eq!(code, Some(0), "{all}");
    assert!(all.contains("global backup of model `m`, 2 iterations"), "{all}");
    let snapshot = sharded(&dir).join(format!("snapshots/{:020}.json", 2));
    let (code, all, _) = run(&["inspect".as_ref(), snapshot.as_os_str()]);
    assert_eq!(code, Some(0), "{all}");
    assert!(all.contains("snapshot of model `m`, 2 iterations"), "{all}");
    // A relative path from inside the folder.
    let out = cli().args(["inspect", &format!("manifests/{:020}.json", 3)]).current_dir(sharded(&dir)).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    // JSON.
    let (code, all, out) = run(&["inspect".as_ref(), "--json".as_ref(), manifest(&dir, 3).as_os_str()]);
    assert_eq!(code, Some(0), "{all}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sharded"], true);
    assert_eq!(v["name"], "m");
    assert_eq!(v["iterations"], 3);
    assert_eq!(v["world_size"], 2);
    assert_eq!(v["loss"], 4.0);
    assert_eq!(v["shards"].as_array().unwrap().len(), 2);
    assert_eq!(v["shards"][1]["rank"], 1);
    assert_eq!(v["tensors"][1]["name"], "w");
    assert_eq!(v["tensors"][1]["dtype"], "F32");
    assert_eq!(v["tensors"][1]["shape"], serde_json::json!([4, 2]));
    assert_eq!(
        v["tensors"][1]["pieces"][1],
        serde_json::json!({"rank": 1, "rows": [2, 4], "offset": [2, 0], "shape": [2, 2], "bytes": 16})
    );
    assert_eq!(v["verified"], true);
    assert_eq!(v["damaged"], serde_json::json!([]));

    // A shard is an ordinary archive.
    let (code, all, _) = run(&["inspect".as_ref(), shard(&dir, 3, 1).as_os_str()]);
    assert_eq!(code, Some(0), "{all}");
    assert!(all.contains("model `m-rank-1`") && all.contains("checksums: ok (1 tensors verified)"), "{all}");

    // Damage: exit 1, naming the rank.
    flip_middle(&shard(&dir, 3, 1));
    let (code, all, _) = run(&["inspect".as_ref(), sharded(&dir).as_os_str()]);
    assert_eq!(code, Some(1), "{all}");
    assert!(all.lines().any(|l| l.starts_with("checksums: DAMAGED: rank 1: ")), "{all}");
    let (code, all, out) = run(&["inspect".as_ref(), "--json".as_ref(), manifest(&dir, 3).as_os_str()]);
    assert_eq!(code, Some(1), "{all}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified"], false);
    assert!(v["damaged"][0].as_str().unwrap().starts_with("rank 1: "), "{v}");
    // The step before is intact.
    let (code, all, _) = run(&["inspect".as_ref(), manifest(&dir, 2).as_os_str()]);
    assert_eq!(code, Some(0), "{all}");

    // A JSON file that is not a manifest.
    let other = tmp.path().join("other.json");
    std::fs::write(&other, "{\"a\": 1}").unwrap();
    let (code, all, _) = run(&["inspect".as_ref(), other.as_os_str()]);
    assert_eq!(code, Some(1), "{all}");
    assert!(all.contains("is not a global manifest"), "{all}");
}

#[test]
fn snapshots_lists_the_sharded_snapshots_and_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    make(&dir, "");

    let (code, all, _) = run(&["snapshots".as_ref(), dir.as_os_str()]);
    assert_eq!(code, Some(0), "{all}");
    assert!(!all.contains("no snapshots of"), "{all}");
    let row = |kind: &str| all.lines().find(|l| l.trim_start().starts_with(&format!("{kind} "))).unwrap_or_default().to_string();
    for kind in ["snapshot", "backup"] {
        let r = row(kind);
        assert!(r.contains("2 iterations") && r.contains("2 ranks") && r.contains("created ") && r.contains("ok"), "{kind}: {all}");
    }

    let (code, all, out) = run(&["snapshots".as_ref(), "--json".as_ref(), "--name".as_ref(), "m".as_ref(), dir.as_os_str()]);
    assert_eq!(code, Some(0), "{all}");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (r, kind) in rows.iter().zip(["snapshot", "backup"]) {
        assert_eq!(r["sharded"], true);
        assert_eq!(r["kind"], kind);
        assert_eq!(r["iterations"], 2);
        assert_eq!(r["world_size"], 2);
        assert_eq!(r["verifies"], true);
        assert!(r["created"].as_str().is_some_and(|c| !c.is_empty()));
    }

    // Damage to the snapshot's step: both copies of step 2 fail.
    flip_middle(&shard(&dir, 2, 1));
    let (code, all, out) = run(&["snapshots".as_ref(), "--json".as_ref(), dir.as_os_str()]);
    assert_eq!(code, Some(0), "{all}");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(rows.as_array().unwrap().iter().all(|r| r["verifies"] == false), "{rows}");
}

#[test]
fn remote_list_and_verify_sharded_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let url = format!("file://{}", store.display());
    make(&tmp.path().join("model"), &url);
    let remote = |args: &[&str]| {
        let out = cli().arg("remote").args(args).args(["--url", &url, "--name", "m"]).output().unwrap();
        (out.status.code(), printed(&out))
    };

    let (code, all) = remote(&["list", "--sharded"]);
    assert_eq!(code, Some(0), "{all}");
    assert!(all.contains(&format!("3 sharded steps at {url}/m/sharded")), "{all}");
    let lines: Vec<&str> = all.lines().skip(1).collect();
    assert_eq!(lines.len(), 5, "3 steps, the backup, 1 snapshot: {all}");
    assert!(lines[2].starts_with("* step") && lines[2].contains("3 iterations") && lines[2].contains("2 ranks"), "{all}");
    assert!(lines[3].contains("backup") && lines[3].contains("2 iterations"), "{all}");
    assert!(lines[4].contains("snapshot") && lines[4].contains("2 iterations"), "{all}");
    let out = cli().args(["remote", "list", "--sharded", "--json", "--url", &url, "--name", "m"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    let kinds: Vec<_> =
        rows.iter().map(|r| (r["kind"].as_str().unwrap(), r["iterations"].as_u64().unwrap(), r["latest"] == true)).collect();
    assert_eq!(kinds, [("step", 1, false), ("step", 2, false), ("step", 3, true), ("backup", 2, false), ("snapshot", 2, false)]);
    assert!(rows.iter().all(|r| r["world_size"] == 2 && r["bytes"].as_u64().is_some_and(|b| b > 0)), "{rows:?}");

    let (code, all) = remote(&["verify", "--sharded"]);
    assert_eq!(code, Some(0), "{all}");
    assert_eq!(all.trim(), "sharded step 3 (2 ranks): ok");
    let (code, all) = remote(&["verify", "--sharded", "--all"]);
    assert_eq!(code, Some(0), "{all}");
    assert_eq!(all.lines().filter(|l| l.ends_with(": ok")).count(), 5, "{all}");
    let (code, all) = remote(&["verify", "--sharded", "1"]);
    assert_eq!(code, Some(0), "{all}");
    assert_eq!(all.trim(), "sharded step 1 (2 ranks): ok");
    let (code, all) = remote(&["verify", "--sharded", "9"]);
    assert_eq!(code, Some(1), "{all}");
    assert!(all.contains("no sharded checkpoint of iteration `9`"), "{all}");

    // Rank 1's shard of step 3 damaged where it is stored.
    flip_middle(&shard(&store, 3, 1));
    let (code, all) = remote(&["verify", "--sharded"]);
    assert_eq!(code, Some(1), "{all}");
    assert!(all.lines().any(|l| l.starts_with("sharded step 3 (2 ranks): DAMAGED: rank 1: ")), "{all}");
    let (code, all) = remote(&["verify", "--sharded", "--all"]);
    assert_eq!(code, Some(1), "{all}");
    assert!(all.contains("sharded step 2 (2 ranks): ok"), "{all}");

    // A folder store that is not there is refused, and not created.
    let missing = tmp.path().join("missing");
    let out =
        cli().args(["remote", "list", "--sharded", "--url", &format!("file://{}", missing.display()), "--name", "m"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(printed(&out).contains("there is no folder"), "{}", printed(&out));
    assert!(!missing.exists());
    // A store without sharded checkpoints of the model.
    let (code, all) = {
        let out = cli().args(["remote", "list", "--sharded", "--url", &url, "--name", "other"]).output().unwrap();
        (out.status.code(), printed(&out))
    };
    assert_eq!(code, Some(0), "{all}");
    assert!(all.contains("no sharded checkpoints at"), "{all}");
}
