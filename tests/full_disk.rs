//! A full disk: the save fails with a clear error, nothing committed is harmed,
//! and saving works again once space is freed. Needs a small tmpfs (mounted
//! here when permitted; otherwise the test says why and passes without running).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use modelio::archive::ArchiveReader;
use modelio::{Error, ModelIo};
use tch::nn::VarStore;
use tch::Device;

struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Result<Mount, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).output().map_err(|e| e.to_string())?;
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
    std::fs::read_dir(dir).unwrap().flatten().filter(|e| modelio::durable::is_temp(&e.file_name().to_string_lossy())).count()
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
        io.save(&vs, None, false).unwrap().wait_blocking().unwrap();
    }
    io.flush_blocking().unwrap();
    let archive = std::fs::read(dir.join("m.mio")).unwrap();
    let state = std::fs::read(dir.join("m_state.json")).unwrap();
    let backup = std::fs::read(dir.join("m.mio.bk")).unwrap();

    // Fill the disk so that the next archive cannot fit.
    let free = modelio::durable::free_bytes(&dir).unwrap();
    let filler = disk.join("filler");
    std::fs::write(&filler, vec![1u8; (free - 100 * 1024) as usize]).unwrap();

    io.record(0.5);
    let err = io.save(&vs, None, false).unwrap().wait_blocking().unwrap_err();
    let Error::Background { source, .. } = &err else { panic!("{err:?}") };
    match source.as_ref() {
        Error::NoSpace { path, needed, free } => {
            assert_eq!(path, &dir.join("m.mio"));
            assert!(needed.is_some_and(|n| n > 4 * 128 * 128 * 4), "{needed:?}");
            assert!(free.is_some_and(|f| f < 200 * 1024), "{free:?}");
        }
        other => panic!("expected NoSpace, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("m.mio") && msg.contains("bytes needed") && msg.contains("bytes free"), "{msg}");
    // The next call reports it too; training goes on meanwhile.
    io.record(0.5);
    assert!(io.save(&vs, None, false).is_err());
    io.record(0.5);

    assert_eq!(std::fs::read(dir.join("m.mio")).unwrap(), archive, "previous archive intact");
    assert_eq!(std::fs::read(dir.join("m_state.json")).unwrap(), state, "previous state file intact");
    assert_eq!(std::fs::read(dir.join("m.mio.bk")).unwrap(), backup, "backup intact");
    assert_eq!(temp_files(&dir), 0, "temporary files removed");

    std::fs::remove_file(&filler).unwrap();
    let c = io.save(&vs, None, false).unwrap().wait_blocking().unwrap();
    assert_eq!(c.iterations, 5);
    io.shutdown_blocking().unwrap();
    assert_eq!(ArchiveReader::open(&dir.join("m.mio")).unwrap().manifest.iterations, 5);
}
