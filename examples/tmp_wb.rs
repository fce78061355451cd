use std::io::{Seek, SeekFrom, Write, BufWriter};
use std::time::Instant;
fn main() {
    let bufs: Vec<Vec<u8>> = (0..16).map(|i| vec![i as u8 + 1; 64 << 20]).collect();
    for round in 0..3 {
        for m in 0..3 {
            unsafe { libc::sync() };
            std::thread::sleep(std::time::Duration::from_millis(500));
            let path = format!("target/wb{m}.bin");
            let t = Instant::now();
            let f = std::fs::File::create(&path).unwrap();
            match m {
                0 => { let mut f = f; for b in &bufs { f.write_all(b).unwrap(); } f.sync_all().unwrap(); }
                1 => { let mut f = f; for b in &bufs { f.write_all(b).unwrap(); } f.seek(SeekFrom::Start(14)).unwrap(); f.write_all(&[1u8; 12]).unwrap(); f.seek(SeekFrom::End(0)).unwrap(); f.sync_all().unwrap(); }
                _ => { let mut z = zip::ZipWriter::new(BufWriter::with_capacity(1 << 20, f));
                       let o = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored).with_alignment(64);
                       z.start_file("a", o).unwrap(); for b in &bufs { z.write_all(b).unwrap(); }
                       let w = z.finish().unwrap(); let f = w.into_inner().unwrap(); f.sync_all().unwrap(); }
            }
            println!("round {round} method {m}: {:.3} GB/s", (1u64 << 30) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
    }
}
