//! Mutation test: `verify` is as strict as the readers the format promises.
//!
//! A real archive (model, optimizer, state; tensors of several dtypes) is
//! mutated 400 ways, seeded: byte flips anywhere and in the zip records, entry
//! CRC-32s, local header names, the end record's offsets, truncations, and
//! edits of the manifest, the safetensors headers, the tensors and the small
//! entries with every zip CRC-32 recomputed, so that only modelio's own
//! checksums can catch them. The property: every mutant `verify` accepts
//! loads exactly the original (names, dtypes, shapes, bytes, optimizer, JSON,
//! iterations, state), and Python's `zipfile` + `safetensors` accept it and
//! read the same; every mutant `verify` refuses after opening also fails to load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use modelio::archive::format::{DType, OptimizerRef, TensorRef};
use modelio::archive::zipread::{self, Directory, Entry};
use modelio::archive::{commit_archive, ArchiveReader};

mod common;

use common::Rng;

const MUTANTS: usize = 400;
const SEED: u64 = 0x6d6f_6465_6c69_6f21;

/// One tensor as saved: (dtype, shape, bytes).
type Saved = (DType, Vec<usize>, Vec<u8>);

/// Everything a load must give back.
struct Original {
    model: BTreeMap<String, Saved>,
    optimizer: BTreeMap<String, Saved>,
    kind: &'static str,
    json: serde_json::Value,
    json_bytes_crc: u32,
    state: Vec<u8>,
    iterations: u64,
}

fn tensors(rng: &mut Rng, specs: &[(&str, DType, &[usize])]) -> BTreeMap<String, Saved> {
    specs
        .iter()
        .map(|&(name, dtype, shape)| {
            let len = shape.iter().product::<usize>() * dtype.size();
            let data = (0..len).map(|_| if dtype == DType::Bool { (rng.next() & 1) as u8 } else { rng.next() as u8 }).collect();
            (name.to_string(), (dtype, shape.to_vec(), data))
        })
        .collect()
}

fn refs(tensors: &BTreeMap<String, Saved>) -> Vec<TensorRef<'_>> {
    tensors.iter().map(|(n, (d, s, b))| TensorRef { name: n, dtype: *d, shape: s, data: b, crc32c: None, crc32: None }).collect()
}

/// The archive under test, written by the crate, with its creation time
/// made constant so that every run mutates the same bytes.
fn original(dir: &Path) -> (Original, Vec<u8>) {
    let mut rng = Rng(SEED);
    let model = tensors(
        &mut rng,
        &[
            ("l1.weight", DType::F32, &[4, 8]),
            ("l1.bias", DType::F32, &[4]),
            ("emb", DType::BF16, &[3, 5]),
            ("half", DType::F16, &[2, 3]),
            ("steps", DType::I64, &[2]),
            ("scale", DType::F64, &[]),
            ("codes", DType::I8, &[5]),
            ("mask", DType::Bool, &[7]),
            ("empty", DType::F32, &[0, 3]),
        ],
    );
    let optimizer = tensors(
        &mut rng,
        &[
            ("l1.weight.exp_avg", DType::F32, &[4, 8]),
            ("l1.weight.exp_avg_sq", DType::F32, &[4, 8]),
            ("l1.bias.exp_avg", DType::F32, &[4]),
            ("step", DType::I64, &[1]),
        ],
    );
    let json = serde_json::json!({"lr": 0.001, "betas": [0.9, 0.999], "step": 12});
    let state = br#"{"model_name":"m","total_iterations":12,"sessions":[],"lowest_average_loss":0.5,"config":null}"#.to_vec();
    let path = dir.join("base.mio");
    let opt_refs = refs(&optimizer);
    let opt = OptimizerRef { kind: "adamw", json: &json, tensors: &opt_refs };
    // The manifest's length depends on the clock (digits of the time's
    // fraction, and of the checksum over it): write until it has the usual
    // length, so that every run mutates the same bytes.
    let mut tries = 0;
    let (mut bytes, manifest, text) = loop {
        commit_archive(&path, "m", 12, &refs(&model), Some(opt), Some(&state)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let manifest = zipread::read(&bytes).unwrap().get("manifest.json").unwrap().clone();
        let text = String::from_utf8(entry_data(&bytes, &manifest).to_vec()).unwrap();
        let digits = split_checksum(&text).map_or(10, |(s, e)| e - s);
        let created = text.split("\"created\": \"").nth(1).unwrap().split('"').next().unwrap();
        tries += 1;
        if (digits == 10 && created.len() == 35) || tries == 50 {
            break (bytes, manifest, text);
        }
    };
    let dir = zipread::read(&bytes).unwrap();
    let created = text.split("\"created\": \"").nth(1).unwrap().split('"').next().unwrap();
    // `YYYY-MM-DDTHH:MM:SS[.fraction]+00:00`, fraction length as the clock gave it.
    let fraction = if created.len() > 25 { format!(".{}", "0".repeat(created.len() - 26)) } else { String::new() };
    let fixed = format!("2026-01-01T00:00:00{fraction}+00:00");
    assert_eq!(fixed.len(), created.len(), "{created}");
    let text = text.replacen(created, &fixed, 1);
    let sealed = seal(&text, manifest.size as usize);
    put_entry(&mut bytes, &manifest, &sealed);
    let json_bytes_crc = crc32fast::hash(entry_data(&bytes, dir.get("optimizer.json").unwrap()));
    (Original { model, optimizer, kind: "adamw", json, json_bytes_crc, state, iterations: 12 }, bytes)
}

fn entry_data<'a>(bytes: &'a [u8], e: &Entry) -> &'a [u8] {
    &bytes[e.data_offset as usize..(e.data_offset + e.size) as usize]
}

/// Replace an entry's data (same length) and recompute its zip CRC-32 in the
/// central record and the data descriptor, as a forger would.
fn put_entry(bytes: &mut [u8], e: &Entry, data: &[u8]) {
    assert_eq!(data.len() as u64, e.size);
    bytes[e.data_offset as usize..(e.data_offset + e.size) as usize].copy_from_slice(data);
    recrc(bytes, e);
}

fn recrc(bytes: &mut [u8], e: &Entry) {
    let crc = crc32fast::hash(entry_data(bytes, e)).to_le_bytes();
    bytes[e.central_offset as usize + 16..][..4].copy_from_slice(&crc);
    if let Some(d) = e.descriptor_offset {
        bytes[d as usize + 4..][..4].copy_from_slice(&crc);
    }
}

/// The manifest checksum as docs/FORMAT.md defines it, written here from
/// the document: the CRC-32C of the file with the digits of the last
/// member's value (`checksum`) replaced by `0`. `None` without a checksum.
fn split_checksum(text: &str) -> Option<(usize, usize)> {
    let body = text.trim_end().strip_suffix('}')?.trim_end();
    let digits_end = body.len();
    let digits_start = body.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let before = body[..digits_start].trim_end().strip_suffix(':')?.trim_end();
    before.ends_with("\"checksum\"").then_some((digits_start, digits_end))
}

/// `text` with its checksum recomputed, made exactly `len` bytes long by
/// spaces after the number or fewer spaces of indentation (whitespace JSON
/// ignores and the checksum covers, so the fit is searched for).
fn seal(text: &str, len: usize) -> Vec<u8> {
    let Some((start, end)) = split_checksum(text) else {
        // A manifest without a checksum (format version 1): only the length.
        return fit(text, len).into_bytes();
    };
    for dropped in 0..4 {
        for pad in 0..4 {
            let head = unindent(&text[..start], dropped);
            let tail = format!("{}{}", " ".repeat(pad), &text[end..]);
            let crc = crc32c::crc32c(format!("{head}0{tail}").as_bytes());
            let sealed = format!("{head}{crc}{tail}");
            if sealed.len() == len {
                return sealed.into_bytes();
            }
        }
    }
    panic!("no layout of the manifest fits {len} bytes");
}

/// Remove `n` spaces of indentation (spaces right after a newline).
fn unindent(text: &str, mut n: usize) -> String {
    let mut out = String::with_capacity(text.len());
    let mut after_newline = false;
    for c in text.chars() {
        if c == ' ' && after_newline && n > 0 {
            n -= 1;
            continue;
        }
        after_newline = c == '\n' || (after_newline && c == ' ');
        out.push(c);
    }
    out
}

/// `text` made exactly `len` bytes: spaces inserted after the opening `{`,
/// or indentation removed. Panics when it cannot fit.
fn fit(text: &str, len: usize) -> String {
    if text.len() <= len {
        return text.replacen('{', &format!("{{{}", " ".repeat(len - text.len())), 1);
    }
    let out = unindent(text, text.len() - len);
    assert_eq!(out.len(), len, "edit does not fit");
    out
}

/// The byte ranges of zip records (headers, names, extra fields,
/// descriptors, central directory, end records): where a flip hits structure.
fn structure(dir: &Directory, len: usize) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<_> = dir.entries.iter().map(|e| e.header_offset as usize..e.data_offset as usize).collect();
    out.extend(dir.entries.iter().filter_map(|e| e.descriptor_offset.map(|d| d as usize..e.end as usize)));
    out.push(dir.central_offset as usize..len);
    out
}

/// Apply mutation number `i`; returns the mutant and what was done.
fn mutate(rng: &mut Rng, base: &[u8], dir: &Directory) -> (Vec<u8>, String) {
    let mut m = base.to_vec();
    let entry = |name: &str| dir.get(name).unwrap().clone();
    let any_entry = dir.entries[rng.index(dir.entries.len())].clone();
    let eocd = dir.end_offset as usize;
    match rng.index(100) {
        0..=24 => {
            let at = rng.index(m.len());
            m[at] ^= rng.mask();
            (m, format!("flip byte {at}"))
        }
        25..=39 => {
            let ranges = structure(dir, m.len());
            let r = rng.pick(&ranges).clone();
            let at = r.start + rng.index(r.len());
            m[at] ^= rng.mask();
            (m, format!("flip zip record byte {at}"))
        }
        40..=47 => {
            let e = any_entry;
            let delta = rng.next() as u32 | 1;
            let place = rng.index(3);
            let fields: Vec<usize> = match place {
                0 => vec![e.central_offset as usize + 16],
                1 => e.descriptor_offset.map(|d| d as usize + 4).into_iter().collect(),
                _ => [Some(e.central_offset as usize + 16), e.descriptor_offset.map(|d| d as usize + 4)].into_iter().flatten().collect(),
            };
            for f in fields {
                let old = u32::from_le_bytes(m[f..f + 4].try_into().unwrap());
                m[f..f + 4].copy_from_slice(&(old ^ delta).to_le_bytes());
            }
            (m, format!("CRC-32 of {} changed ({})", e.name, ["central", "descriptor", "both"][place]))
        }
        48..=52 => {
            let e = any_entry;
            let at = e.header_offset as usize + 30 + rng.index(e.name.len());
            let was = m[at];
            m[at] = if was == b'x' { b'y' } else { b'x' };
            (m, format!("local header name of {} changed", e.name))
        }
        53..=58 => {
            let field = *rng.pick(&[(16usize, "offset"), (12, "size"), (8, "count"), (10, "count")]);
            let at = eocd + field.0;
            let deltas: [i64; 6] = [1, -1, 64, -64, 4096, -(rng.index(200) as i64 + 2)];
            let delta = *rng.pick(&deltas);
            if field.1 == "count" {
                let old = u16::from_le_bytes([m[at], m[at + 1]]);
                m[at..at + 2].copy_from_slice(&old.wrapping_add(delta as u16).to_le_bytes());
            } else {
                let old = u32::from_le_bytes(m[at..at + 4].try_into().unwrap());
                m[at..at + 4].copy_from_slice(&old.wrapping_add(delta as u32).to_le_bytes());
            }
            (m, format!("end record {} {:+}", field.1, delta))
        }
        59..=64 => {
            let cut = rng.index(m.len());
            m.truncate(cut);
            (m, format!("truncated to {cut} bytes"))
        }
        65..=76 => manifest_edit(rng, m, &entry("manifest.json")),
        77..=81 => consistent_edit(rng, m, dir),
        82..=87 => {
            // A byte of a safetensors header (including its padding), CRC-32 recomputed.
            let e = entry(["model.safetensors", "optimizer.safetensors"][rng.index(2)]);
            let n = u64::from_le_bytes(entry_data(&m, &e)[..8].try_into().unwrap()) as usize;
            let at = e.data_offset as usize + 8 + rng.index(n);
            let to = *rng.pick(b"\t\n\r {0\"");
            m[at] = if m[at] == to { b'x' } else { to };
            recrc(&mut m, &e);
            (m, format!("{} header byte {at} set to {to:#04x}, CRC-32 recomputed", e.name))
        }
        88..=91 => {
            // A tensor byte, CRC-32 recomputed: only the CRC-32C can tell.
            let e = entry(["model.safetensors", "optimizer.safetensors"][rng.index(2)]);
            let n = u64::from_le_bytes(entry_data(&m, &e)[..8].try_into().unwrap()) as usize;
            let start = e.data_offset as usize + 8 + n;
            let at = start + rng.index(e.size as usize - 8 - n);
            m[at] ^= rng.mask();
            recrc(&mut m, &e);
            (m, format!("{} tensor byte {at} flipped, CRC-32 recomputed", e.name))
        }
        92..=95 => {
            let e = entry(["optimizer.json", "state.json"][rng.index(2)]);
            let at = e.data_offset as usize + rng.index(e.size as usize);
            m[at] = if m[at].is_ascii_digit() { b'0' + (m[at] - b'0' + 1) % 10 } else { m[at] ^ rng.mask() };
            recrc(&mut m, &e);
            (m, format!("{} byte {at} changed, CRC-32 recomputed", e.name))
        }
        96..=97 => {
            let extra: Vec<u8> = (0..rng.index(40) + 1).map(|_| rng.next() as u8).collect();
            let at = *rng.pick(&[m.len(), 0, any_entry.header_offset as usize]);
            m.splice(at..at, extra.iter().copied());
            (m, format!("{} bytes inserted at {at}", extra.len()))
        }
        _ => {
            let e = any_entry;
            let lh = e.header_offset as usize;
            let (field, value, what): (usize, u16, &str) = *rng.pick(&[
                (8, 8, "method deflate"),
                (6, 0x0009, "flags encrypted"),
                (14, 0x1234, "local CRC non-zero"),
                (28, 0, "extra length 0"),
                (4, 63, "version needed 6.3"),
            ]);
            m[lh + field..lh + field + 2].copy_from_slice(&value.to_le_bytes());
            (m, format!("{} local header: {what}", e.name))
        }
    }
}

/// Manifest edits with the zip CRC-32 recomputed (the manifest checksum left as it was).
fn manifest_edit(rng: &mut Rng, mut m: Vec<u8>, e: &Entry) -> (Vec<u8>, String) {
    let text = String::from_utf8(entry_data(&m, e).to_vec()).unwrap();
    let n = rng.index(8);
    let edited = match n {
        0 => {
            // "optimizer": null: resumes with a fresh optimizer unless caught.
            let start = text.find("\"optimizer\": {").unwrap() + "\"optimizer\": ".len();
            let mut depth = 0;
            let end = start
                + text[start..]
                    .char_indices()
                    .find(|&(_, c)| {
                        depth += match c {
                            '{' | '[' => 1,
                            '}' | ']' => -1,
                            _ => 0,
                        };
                        depth == 0
                    })
                    .unwrap()
                    .0
                + 1;
            format!("{}null{}", &text[..start], &text[end..])
        }
        1 => text.replacen("\"iterations\": 12", &format!("\"iterations\": {}", rng.index(100_000) + 13), 1),
        2 => text.replacen("\"kind\": \"adamw\"", "\"kind\": \"sgd\"", 1),
        3 => text.replacen("2026-01-01", "2027-01-01", 1),
        4 => bump_digit(&text, split_checksum(&text).map_or(0, |(s, _)| s)),
        5 => bump_digit(&text, value_at(&text, "\"state_crc32c\": ", 0)),
        6 => bump_digit(&text, value_at(&text, "\"json_crc32c\": ", 0)),
        // A tensor's CRC-32C.
        _ => bump_digit(&text, value_at(&text, "\"crc32c\": ", rng.index(13))),
    };
    put_entry(&mut m, e, fit(&edited, e.size as usize).as_bytes());
    (m, format!("manifest edit {n}, CRC-32 recomputed"))
}

/// Where the value of the `nth` occurrence of `key` starts (0 when absent,
/// so that the edit then changes the first byte).
fn value_at(text: &str, key: &str, nth: usize) -> usize {
    text.match_indices(key).nth(nth).map_or(0, |(at, _)| at + key.len())
}

/// `text` with the digit at `at` changed (the first digit of a number stays
/// non-zero, so the number keeps its length and stays canonical).
fn bump_digit(text: &str, at: usize) -> String {
    let mut b = text.as_bytes().to_vec();
    b[at] = match b[at] {
        b'9' => b'1',
        d @ b'0'..=b'8' => d + 1,
        other => other ^ 0x20,
    };
    String::from_utf8(b).unwrap()
}

/// Edits that keep the manifest and a safetensors header in agreement (a
/// dtype of the same size, or a shape transposed), every zip CRC-32
/// recomputed: only the manifest checksum stands in the way.
fn consistent_edit(rng: &mut Rng, mut m: Vec<u8>, dir: &Directory) -> (Vec<u8>, String) {
    let manifest = dir.get("manifest.json").unwrap();
    let model = dir.get("model.safetensors").unwrap();
    let text = String::from_utf8(entry_data(&m, manifest).to_vec()).unwrap();
    let header = entry_data(&m, model).to_vec();
    let transpose = rng.index(2) == 0;
    let (text, header, what) = if transpose {
        // l1.weight [4, 8] -> [8, 4]: pretty JSON in the manifest, compact in the header.
        let at = text.find("\"name\": \"l1.weight\"").unwrap();
        let shape_at = at + text[at..].find("\"shape\": [").unwrap();
        let end = shape_at + text[shape_at..].find(']').unwrap();
        let shape = text[shape_at..end].replacen('4', "#", 1).replacen('8', "4", 1).replacen('#', "8", 1);
        let text = format!("{}{}{}", &text[..shape_at], shape, &text[end..]);
        let header = replace_bytes(
            &header,
            b"\"l1.weight\":{\"dtype\":\"F32\",\"shape\":[4,8]",
            b"\"l1.weight\":{\"dtype\":\"F32\",\"shape\":[8,4]",
        );
        (text, header, "l1.weight transposed")
    } else {
        let at = text.find("\"name\": \"l1.weight\"").unwrap();
        let dtype_at = at + text[at..].find("\"F32\"").unwrap();
        let text = format!("{}\"I32\"{}", &text[..dtype_at], &text[dtype_at + 5..]);
        let header = replace_bytes(&header, b"\"l1.weight\":{\"dtype\":\"F32\"", b"\"l1.weight\":{\"dtype\":\"I32\"");
        (text, header, "l1.weight read as I32")
    };
    put_entry(&mut m, manifest, text.as_bytes());
    put_entry(&mut m, model, &header);
    (m, format!("{what} in manifest and header, CRC-32s recomputed"))
}

/// `bytes` with the first `from` replaced by `to` (same length); panics when absent.
fn replace_bytes(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes.windows(from.len()).position(|w| w == from).expect("pattern present");
    let mut out = bytes.to_vec();
    out[at..at + to.len()].copy_from_slice(to);
    out
}

/// Load every part of an accepted archive and compare it with the original.
fn loads_identically(r: &ArchiveReader, o: &Original) -> Result<(), String> {
    let read = |located: &[modelio::archive::Located]| -> Result<BTreeMap<String, Saved>, String> {
        located
            .iter()
            .map(|t| {
                let mut dst = vec![0u8; t.len];
                r.read_checked_into(t, &mut dst).map_err(|e| e.to_string())?;
                Ok((t.meta.name.clone(), (t.meta.dtype, t.meta.shape.clone(), dst)))
            })
            .collect()
    };
    if read(&r.model)? != o.model {
        return Err("model tensors differ".into());
    }
    let Some((located, json)) = &r.optimizer else { return Err("optimizer missing".into()) };
    if read(located)? != o.optimizer || json != &o.json {
        return Err("optimizer tensors or JSON differ".into());
    }
    if r.manifest.optimizer.as_ref().map(|o| o.kind.as_str()) != Some(o.kind) {
        return Err("optimizer kind differs".into());
    }
    if r.manifest.iterations != o.iterations || r.state.as_deref() != Some(&o.state[..]) {
        return Err("iterations or state differ".into());
    }
    Ok(())
}

/// True when opening succeeded but loading every tensor fails somewhere.
fn load_fails(r: &ArchiveReader) -> bool {
    let all = r.model.iter().chain(r.optimizer.iter().flat_map(|(l, _)| l.iter()));
    let mut failed = false;
    for t in all {
        let mut dst = vec![0u8; t.len];
        failed |= r.read_checked_into(t, &mut dst).is_err();
    }
    failed
}

fn torch_dtype(d: DType) -> &'static str {
    match d {
        DType::F64 => "float64",
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::I64 => "int64",
        DType::I32 => "int32",
        DType::I16 => "int16",
        DType::I8 => "int8",
        DType::U8 => "uint8",
        DType::Bool => "bool",
    }
}

/// What Python read of an entry's tensors equals the original.
fn python_matches(read: &serde_json::Value, entry: &str, tensors: &BTreeMap<String, Saved>) -> bool {
    let Some(got) = read[entry].as_object() else { return false };
    got.len() == tensors.len()
        && tensors.iter().all(|(name, (dtype, shape, bytes))| {
            let want = serde_json::json!([torch_dtype(*dtype), shape, crc32fast::hash(bytes)]);
            got.get(name) == Some(&want)
        })
}

fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(python.exists(), "{} missing: run `make setup` (make test does it)", python.display());
    python
}

#[test]
fn every_mutant_verify_accepts_loads_identically_and_python_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let (original, base) = original(tmp.path());
    let dir = zipread::read(&base).unwrap();
    let mutants_dir = tmp.path().join("mutants");
    std::fs::create_dir(&mutants_dir).unwrap();

    // The unmutated archive passes everything.
    std::fs::write(mutants_dir.join("base.mio"), &base).unwrap();
    let r = ArchiveReader::open(&mutants_dir.join("base.mio")).unwrap();
    assert!(r.verify().is_empty());
    loads_identically(&r, &original).unwrap();
    drop(r);

    let mut rng = Rng(SEED);
    let mut accepted = BTreeMap::new();
    let mut rejected = 0;
    let mut unchanged = 0;
    let mut failures = Vec::new();
    for i in 0..MUTANTS {
        let (bytes, what) = mutate(&mut rng, &base, &dir);
        if bytes == base {
            unchanged += 1;
        }
        let file = format!("m{i:03}.mio");
        let path = mutants_dir.join(&file);
        std::fs::write(&path, &bytes).unwrap();
        match ArchiveReader::open(&path) {
            Err(e) => {
                assert!(e.is_damaged(), "{file} ({what}): untyped error {e:?}");
                rejected += 1;
            }
            Ok(r) if !r.verify().is_empty() => {
                if !load_fails(&r) {
                    failures.push(format!("{file} ({what}): verify refuses it but every tensor loads"));
                }
                rejected += 1;
            }
            Ok(r) => {
                if let Err(e) = loads_identically(&r, &original) {
                    failures.push(format!("{file} ({what}): verify accepts it but {e}"));
                }
                accepted.insert(file, what);
            }
        }
    }

    // One Python process reads every mutant.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/check_mutants.py");
    let out = Command::new(python()).arg(&script).arg(&mutants_dir).output().unwrap();
    assert!(out.status.success(), "python failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let mut python_only = 0;
    let mut lines = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        lines += 1;
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let file = v["file"].as_str().unwrap().to_string();
        let python_ok = v["ok"].as_bool().unwrap();
        let is_accepted = accepted.contains_key(&file) || file == "base.mio";
        if !is_accepted {
            python_only += usize::from(python_ok);
            continue;
        }
        let what = accepted.get(&file).cloned().unwrap_or_default();
        if !python_ok {
            failures.push(format!("{file} ({what}): verify accepts it, Python refuses it: {}", v["error"]));
            continue;
        }
        let read = &v["read"];
        let same = python_matches(read, "model.safetensors", &original.model)
            && python_matches(read, "optimizer.safetensors", &original.optimizer)
            && read["iterations"] == original.iterations
            && read["optimizer_kind"] == original.kind
            && read["optimizer.json"] == original.json_bytes_crc
            && read["state.json"] == crc32fast::hash(&original.state);
        if !same {
            failures.push(format!("{file} ({what}): Python reads other content: {read}"));
        }
    }
    assert_eq!(lines, MUTANTS + 1, "Python must report every file");
    let python_refused_verify_accepted = failures.iter().filter(|f| f.contains("Python refuses")).count();
    println!(
        "{MUTANTS} mutants: {} accepted ({}), {rejected} rejected; {python_refused_verify_accepted} accepted by verify but refused by Python; \
         {python_only} refused by verify but accepted by Python (stricter); {unchanged} unchanged",
        accepted.len(),
        if failures.is_empty() { "all identical" } else { "NOT all identical" },
    );
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    // The test must exercise both outcomes to mean anything.
    assert!(accepted.len() >= 10 && rejected >= MUTANTS / 2, "{} accepted, {rejected} rejected", accepted.len());
}
