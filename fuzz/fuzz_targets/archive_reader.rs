//! Any bytes given to the archive reader give a typed result: never a panic,
//! a hang or an unbounded allocation. When `verify` accepts them, reading
//! every tensor (which also checks each entry's zip CRC-32 on the last one)
//! succeeds and gives the bytes `verify` checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.mio");
    let _ = modelio::archive::zipread::read(data);
    if let Ok(reader) = modelio::archive::ArchiveReader::from_bytes(path, data.to_vec()) {
        let damaged = reader.verify();
        let optimizer = reader.optimizer.iter().flat_map(|(t, _)| t.iter());
        for t in reader.model.iter().chain(optimizer) {
            let mut dst = vec![0u8; t.len];
            let read = reader.read_checked_into(t, &mut dst);
            if damaged.is_empty() {
                assert!(read.is_ok(), "verify accepted what a read refuses: {read:?}");
                assert_eq!(reader.checked_data(t).ok(), Some(&dst[..]));
            }
        }
        let _ = reader.tensor_bytes();
    }
});
