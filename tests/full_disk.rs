//! A full disk: the save fails with a clear error, nothing committed is harmed,
//! and saving works again once space is freed. Needs a small tmpfs (mounted
//! here when permitted; otherwise the test says why and passes without running).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use modelio::archive::ArchiveReader;
use modelio::Work;
use modelio::{Error, ModelIo};
use tch::nn::VarStore;
use tch::Device;

struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Result<Mount, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(Mount(at.to_path_buf()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn store() -> VarStore {
    let vs = VarStore::new(Device::Cpu);
    for i in 0..4 {
        let _ = vs.root().zeros(&format!("w{i}"), &[128, 128]); // 64 KiB each
    }
    vs
}

fn temp_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().flatten().filter(|e| modelio::folder::durable::is_temp(&e.file_name().to_string_lossy())).count()
}

#[test]
fn enospc_is_reported_and_harmless() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk");
    let _mount = match Mount::tmpfs(&disk, "2m") {
        Ok(m) => m,
        Err(reason) => {
            println!("skipped: cannot mount a tmpfs here ({reason})");
            return;
        }
    };
    let dir = disk.join("model");
    let mut io = ModelIo::open(common::config(&dir, "m")).unwrap();
    let vs = store();
    // Save 1 sets the lowest loss, save 2 improves it: a backup exists.
    for loss in [2.0, 1.0] {
        io.record(loss);
        io.save(&vs, None).unwrap().wait_blocking().unwrap();
    }
    io.flush_blocking().unwrap();
    let archive = std::fs::read(dir.join("m.mio")).unwrap();
    let state = std::fs::read(dir.join("m_state.json")).unwrap();
    let backup = std::fs::read(dir.join("m.mio.bk")).unwrap();

    // Fill the disk so that the next archive cannot fit.
    let free = modelio::folder::durable::free_bytes(&dir).unwrap();
    let filler = disk.join("filler");
    std::fs::write(&filler, vec![1u8; (free - 100 * 1024) as usize]).unwrap();

    io.record(0.5);
    let err = io.save(&vs, None).unwrap().wait_blocking().unwrap_err();
    assert!(err.is_background() && err.is_retryable(), "{err:?}");
    let Error::Background { source, .. } = &err else { panic!("{err:?}") };
    let needed = match source.as_ref() {
        Error::NoSpace { path, needed, free } => {
            assert_eq!(path, &dir.join("m.mio"));
            assert!(free.is_some_and(|f| f < 200 * 1024), "{free:?}");
            needed.expect("the archive's size")
        }
        other => panic!("expected NoSpace, got {other:?}"),
    };
    let msg = err.report().to_string();
    assert!(msg.contains("m.mio") && msg.contains(&format!("{needed} bytes needed")) && msg.contains("bytes free"), "{msg}");
    assert_eq!(msg.matches("no space left").count(), 1, "the cause is printed once: {msg}");

    // Reported once, on its ticket: the next save is not refused for it.
    io.record(0.5);
    let dropped = io.save(&vs, None).expect("an earlier failure that its ticket reported is not reported again");
    drop(dropped); // this one fails too (the disk is still full): its failure goes to the next call
    io.record(0.5);
    while io.stats().failed < 2 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }

    assert_eq!(std::fs::read(dir.join("m.mio")).unwrap(), archive, "previous archive intact");
    assert_eq!(std::fs::read(dir.join("m_state.json")).unwrap(), state, "previous state file intact");
    assert_eq!(std::fs::read(dir.join("m.mio.bk")).unwrap(), backup, "backup intact");
    assert_eq!(temp_files(&dir), 0, "temporary files removed");

    // Space is freed. The next save reports the dropped save's failure, and
    // is itself queued and committed: a failure never costs a later save.
    std::fs::remove_file(&filler).unwrap();
    let err = io.save(&vs, None).expect_err("the dropped ticket's failure reaches the next call");
    assert!(err.is_background() && err.is_retryable(), "{err:?}");
    io.flush_blocking().expect("reported once: nothing left to report");
    let committed = ArchiveReader::open(&dir.join("m.mio")).unwrap();
    assert_eq!(committed.manifest.iterations, 5, "the save that reported the earlier failure was committed");
    let size = std::fs::metadata(dir.join("m.mio")).unwrap().len();
    assert!(needed.abs_diff(size) < 64, "reported {needed} bytes needed for an archive of {size} bytes");
    drop(committed);

    // A snapshot that cannot be written names the file being written and its size.
    let free = modelio::folder::durable::free_bytes(&dir).unwrap();
    std::fs::write(&filler, vec![1u8; (free - 20 * 1024) as usize]).unwrap();
    io.snapshot().unwrap();
    let err = io.flush_blocking().expect_err("the snapshot cannot fit");
    match err {
        Error::Background { what: Work::Snapshot, ref source } => match source.as_ref() {
            Error::NoSpace { path, needed, .. } => {
                assert!(path.ends_with("m.mio") || path.ends_with("m_state.json"), "{path:?}");
                assert!(needed.is_some_and(|n| n > 0), "{needed:?}");
            }
            other => panic!("expected NoSpace, got {other:?}"),
        },
        other => panic!("{other:?}"),
    }
    std::fs::remove_file(&filler).unwrap();
    io.shutdown_blocking().unwrap();
    assert!(
        !modelio::folder::snapshot::snapshot_dir(&dir, 5).exists()
            || ArchiveReader::open(&modelio::folder::snapshot::snapshot_dir(&dir, 5).join("m.mio")).is_ok()
    );
}
