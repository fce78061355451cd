//! Any bytes given to the archive reader give a typed result: never a panic,
//! a hang or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.mio");
    if let Ok(reader) = modelio::archive::ArchiveReader::from_bytes(path, data.to_vec()) {
        let damaged = reader.verify();
        for t in &reader.model {
            if !damaged.contains(&t.meta.name) {
                let _ = reader.checked_data(t);
            }
        }
        let _ = reader.tensor_bytes();
    }
});
