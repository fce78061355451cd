//! The zip layer of an archive, read strictly (`docs/FORMAT.md`, "What a
//! reader checks").
//!
//! The format promises that Python's `zipfile` reads every archive modelio
//! accepts, so this reader refuses at least everything `zipfile` refuses, and
//! more: it reads the layout modelio's writer produces and nothing looser.
//! Where `zipfile` silently adjusts (an end record pointing elsewhere than
//! where the central directory is, a local header that disagrees with its
//! central record, bytes between entries), this reader refuses, so that one
//! reading of the bytes is the only reading. A general zip library was not
//! used because each is lenient in its own places, and those places are
//! exactly where a damaged archive slips through.
//!
//! It checks structure only: the CRC-32 of each entry's data is checked by
//! whoever reads the data (see `reader.rs`), in the same pass.

use std::collections::HashSet;

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const DESCRIPTOR_SIG: u32 = 0x0807_4b50;

const LOCAL_LEN: u64 = 30;
const CENTRAL_LEN: u64 = 46;
const EOCD_LEN: u64 = 22;
const ZIP64_EOCD_LEN: u64 = 56;
const ZIP64_LOCATOR_LEN: u64 = 20;

/// General-purpose flag bits an entry may have: sizes and CRC in a data
/// descriptor (bit 3), UTF-8 name (bit 11). Anything else (encryption,
/// patched data, ...) is refused.
const FLAG_DESCRIPTOR: u16 = 1 << 3;
const FLAG_UTF8: u16 = 1 << 11;
/// The highest "version needed to extract" accepted: 4.5, zip64.
const MAX_VERSION_NEEDED: u16 = 45;
/// A 32-bit field holding this says "see the zip64 record".
const SENTINEL32: u64 = 0xFFFF_FFFF;
const ZIP64_EXTRA_ID: u16 = 0x0001;

/// One entry of a checked archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its name (printable ASCII, a plain relative path).
    pub name: String,
    /// Offset of its local header.
    pub header_offset: u64,
    /// Offset of its first data byte.
    pub data_offset: u64,
    /// Bytes of data (stored, so compressed and uncompressed sizes agree).
    pub size: u64,
    /// The zip CRC-32 of its data, as the central directory states it.
    pub crc32: u32,
    /// Offset of its central directory record.
    pub central_offset: u64,
    /// Offset of its data descriptor, when it has one.
    pub descriptor_offset: Option<u64>,
    /// Offset just past the entry (data and descriptor).
    pub end: u64,
}

/// The checked directory of an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directory {
    /// The entries, in file order (which is also central directory order).
    pub entries: Vec<Entry>,
    /// Offset of the central directory.
    pub central_offset: u64,
    /// Offset of the zip64 end-of-central-directory record, when there is one.
    pub zip64_end_offset: Option<u64>,
    /// Offset of the end-of-central-directory record (22 bytes before the end).
    pub end_offset: u64,
}

impl Directory {
    /// The entry named `name`.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }
}

/// Bounds-checked little-endian reads of a file of `file_len` bytes, by
/// offset in the file, from the bytes at `base..` that are at hand (the whole
/// file, or the part a ranged read fetched); every miss is a message, never a
/// panic.
struct Bytes<'a> {
    bytes: &'a [u8],
    base: u64,
    file_len: u64,
}

impl<'a> Bytes<'a> {
    /// The whole file.
    fn whole(bytes: &'a [u8]) -> Self {
        Bytes { bytes, base: 0, file_len: bytes.len() as u64 }
    }
    /// The bytes from offset `base` of a file of `file_len` bytes.
    fn part(bytes: &'a [u8], base: u64, file_len: u64) -> Self {
        Bytes { bytes, base, file_len }
    }
    fn slice(&self, at: u64, len: u64, what: &str) -> Result<&'a [u8], String> {
        let Some(end) = at.checked_add(len).filter(|&e| e <= self.file_len) else {
            return Err(format!("{what} at {at} ({len} bytes) runs past the end of the file ({} bytes)", self.file_len));
        };
        // Inside the file; for a part, also inside the bytes fetched.
        let held = |abs: u64| abs.checked_sub(self.base).and_then(|rel| usize::try_from(rel).ok());
        match (held(at), held(end)) {
            (Some(start), Some(stop)) if stop <= self.bytes.len() => Ok(&self.bytes[start..stop]),
            _ => Err(format!("{what} at {at} ({len} bytes) lies outside the {} bytes read at {}", self.bytes.len(), self.base)),
        }
    }
    fn u16(&self, at: u64, what: &str) -> Result<u16, String> {
        let b = self.slice(at, 2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&self, at: u64, what: &str) -> Result<u32, String> {
        let b = self.slice(at, 4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&self, at: u64, what: &str) -> Result<u64, String> {
        let b = self.slice(at, 8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

/// Read and check the directory of the zip archive `bytes`.
///
/// # Errors
/// A message naming the first broken record.
pub fn read(bytes: &[u8]) -> Result<Directory, String> {
    let b = Bytes::whole(bytes);
    let end = end_records(&b)?;
    let mut entries: Vec<Entry> = Vec::new();
    central_directory(&b, &end, |c| {
        let local = local_header(&b, c)?;
        let data_offset = local.check(&b, c)?;
        entries.push(entry(&b, c, &local, data_offset)?);
        Ok(())
    })?;
    // Entries tile the file from its first byte to the central directory, in
    // order: no bytes between or under them that no check covers.
    let mut expect = 0;
    for e in &entries {
        if e.header_offset != expect {
            return Err(format!("entry `{}` starts at {}, where {expect} was expected", e.name, e.header_offset));
        }
        expect = e.end;
    }
    if expect != end.cd_offset {
        return Err(format!("the entries end at {expect}, the central directory starts at {}", end.cd_offset));
    }
    Ok(Directory { entries, central_offset: end.cd_offset, zip64_end_offset: end.zip64_end_offset, end_offset: end.end_offset })
}

/// The end records (at most this many bytes at the end of the file): the end
/// record, and the zip64 locator and zip64 end record when there are some.
const END_RECORDS_LEN: u64 = EOCD_LEN + ZIP64_LOCATOR_LEN + ZIP64_EOCD_LEN;

/// What the end records say, checked.
struct End {
    /// The number of entries.
    count: u64,
    /// Where the central directory starts.
    cd_offset: u64,
    /// Where it ends: at the zip64 end record, or at the end record.
    cd_end: u64,
    zip64_end_offset: Option<u64>,
    end_offset: u64,
}

/// Parse and check the end records of the file `b`, which holds at least its
/// last [`END_RECORDS_LEN`] bytes.
fn end_records(b: &Bytes<'_>) -> Result<End, String> {
    let len = b.file_len;
    // The end record is the last 22 bytes: modelio writes no archive comment,
    // and with none `zipfile` also finds it there.
    let end_offset = len.checked_sub(EOCD_LEN).ok_or_else(|| format!("{len} bytes is too short for a zip archive"))?;
    if b.u32(end_offset, "end of central directory")? != EOCD_SIG {
        return Err("no end-of-central-directory record at the end of the file".into());
    }
    if b.u16(end_offset + 20, "archive comment length")? != 0 {
        return Err("the archive has a comment (modelio writes none)".into());
    }
    if b.u16(end_offset + 4, "disk number")? != 0 || b.u16(end_offset + 6, "disk number")? != 0 {
        return Err("the end record names another disk; multi-disk archives are not supported".into());
    }
    let count16 = b.u16(end_offset + 8, "entry count")?;
    if b.u16(end_offset + 10, "entry count")? != count16 {
        return Err("the end record's two entry counts differ".into());
    }
    let size32 = b.u32(end_offset + 12, "central directory size")?;
    let offset32 = b.u32(end_offset + 16, "central directory offset")?;

    // A zip64 locator right before the end record (where `zipfile` looks)
    // replaces the end record's fields with the zip64 record's.
    let locator = end_offset.checked_sub(ZIP64_LOCATOR_LEN);
    let has_locator = match locator {
        Some(at) => b.u32(at, "zip64 locator")? == ZIP64_LOCATOR_SIG,
        None => false,
    };
    let (count, cd_size, cd_offset, cd_end, zip64_end_offset) = match locator {
        Some(loc) if has_locator => {
            let z = loc.checked_sub(ZIP64_EOCD_LEN).ok_or("a zip64 locator without room for its record")?;
            if b.u32(loc + 4, "zip64 locator")? != 0 || b.u32(loc + 16, "zip64 locator")? != 1 {
                return Err("the zip64 locator names another disk; multi-disk archives are not supported".into());
            }
            if b.u64(loc + 8, "zip64 locator")? != z {
                return Err(format!("the zip64 locator points at {}, the zip64 end record is at {z}", b.u64(loc + 8, "zip64 locator")?));
            }
            if b.u32(z, "zip64 end record")? != ZIP64_EOCD_SIG || b.u64(z + 4, "zip64 end record")? != ZIP64_EOCD_LEN - 12 {
                return Err("the zip64 end-of-central-directory record is missing or has extensible data".into());
            }
            if b.u16(z + 14, "zip64 end record")? > MAX_VERSION_NEEDED {
                return Err("the zip64 end record needs a newer zip version".into());
            }
            if b.u32(z + 16, "zip64 end record")? != 0 || b.u32(z + 20, "zip64 end record")? != 0 {
                return Err("the zip64 end record names another disk; multi-disk archives are not supported".into());
            }
            let count = b.u64(z + 24, "zip64 entry count")?;
            if b.u64(z + 32, "zip64 entry count")? != count {
                return Err("the zip64 end record's two entry counts differ".into());
            }
            let size = b.u64(z + 40, "zip64 central directory size")?;
            let offset = b.u64(z + 48, "zip64 central directory offset")?;
            // The 16- and 32-bit fields hold the value, or all ones when it does not fit.
            let agrees = |small: u64, big: u64, max: u64| small == big.min(max);
            if !agrees(count16.into(), count, 0xFFFF)
                || !agrees(size32.into(), size, SENTINEL32)
                || !agrees(offset32.into(), offset, SENTINEL32)
            {
                return Err("the end record disagrees with the zip64 end record".into());
            }
            (count, size, offset, z, Some(z))
        }
        _ => (u64::from(count16), u64::from(size32), u64::from(offset32), end_offset, None),
    };
    // Where the central directory really ends must be where the end record
    // says it does: `zipfile` would otherwise shift every offset by the difference.
    if cd_offset.checked_add(cd_size) != Some(cd_end) {
        return Err(format!("the end record places the central directory at {cd_offset} ({cd_size} bytes), but it ends at {cd_end}"));
    }
    Ok(End { count, cd_offset, cd_end, zip64_end_offset, end_offset })
}

/// What a central directory record says of its entry, checked.
#[derive(Clone)]
struct Central {
    name: String,
    flags: u16,
    method: u16,
    crc32: u32,
    /// Bytes of data (zip64 values in place of the 32-bit fields of all ones).
    size: u64,
    header_offset: u64,
    /// Offset of the record itself.
    central_offset: u64,
}

/// Parse and check every record of the central directory that `end` places,
/// which `b` holds; each record is given to `each` before the next is read.
fn central_directory(b: &Bytes<'_>, end: &End, mut each: impl FnMut(&Central) -> Result<(), String>) -> Result<(), String> {
    let mut names = HashSet::new();
    let mut at = end.cd_offset;
    while at < end.cd_end {
        let (record, next) = central_record(b, at, end.cd_end)?;
        each(&record)?;
        if !names.insert(record.name.clone()) {
            return Err(format!("entry `{}` appears twice", record.name));
        }
        at = next;
    }
    if at != end.cd_end {
        return Err("the last central directory record runs past the central directory".into());
    }
    if names.len() as u64 != end.count {
        return Err(format!("the end record counts {} entries, the central directory holds {}", end.count, names.len()));
    }
    Ok(())
}

/// One central directory record at `at`, checked; returns it and where the
/// next record starts.
fn central_record(b: &Bytes<'_>, at: u64, cd_end: u64) -> Result<(Central, u64), String> {
    if at + CENTRAL_LEN > cd_end || b.u32(at, "central directory record")? != CENTRAL_SIG {
        return Err(format!("no central directory record at {at}"));
    }
    let version_needed = b.u16(at + 6, "central record")?;
    let flags = b.u16(at + 8, "central record")?;
    let method = b.u16(at + 10, "central record")?;
    let crc32 = b.u32(at + 16, "central record")?;
    let mut compressed = u64::from(b.u32(at + 20, "central record")?);
    let mut size = u64::from(b.u32(at + 24, "central record")?);
    let name_len = u64::from(b.u16(at + 28, "central record")?);
    let extra_len = u64::from(b.u16(at + 30, "central record")?);
    let comment_len = u64::from(b.u16(at + 32, "central record")?);
    let disk = b.u16(at + 34, "central record")?;
    let mut header_offset = u64::from(b.u32(at + 42, "central record")?);
    let next = at + CENTRAL_LEN + name_len + extra_len + comment_len;
    if next > cd_end {
        return Err(format!("the central directory record at {at} runs past the central directory"));
    }
    let raw_name = b.slice(at + CENTRAL_LEN, name_len, "entry name")?;
    let name = plain_name(raw_name)?;
    if version_needed > MAX_VERSION_NEEDED {
        return Err(format!("entry `{name}` needs zip version {}.{}", version_needed / 10, version_needed % 10));
    }
    if flags & !(FLAG_DESCRIPTOR | FLAG_UTF8) != 0 {
        return Err(format!("entry `{name}` has flags {flags:#06x} (encrypted or otherwise unsupported)"));
    }
    if method != 0 {
        return Err(format!("entry `{name}` is compressed (method {method}); entries must be stored"));
    }
    if disk != 0 {
        return Err(format!("entry `{name}` starts on another disk"));
    }

    // Zip64 values replace the 32-bit fields that hold all ones, in this
    // order (as `zipfile` reads them).
    let extra = b.slice(at + CENTRAL_LEN + name_len, extra_len, "extra field")?;
    let mut zip64_seen = false;
    for (id, data) in extra_fields(extra).map_err(|e| format!("entry `{name}`: {e}"))? {
        if id != ZIP64_EXTRA_ID {
            continue;
        }
        if zip64_seen {
            return Err(format!("entry `{name}` has two zip64 extra fields"));
        }
        zip64_seen = true;
        let mut fields = data.chunks(8);
        for value in [&mut size, &mut compressed, &mut header_offset] {
            if *value == SENTINEL32 {
                let bytes = fields.next().filter(|f| f.len() == 8).ok_or_else(|| format!("entry `{name}`: zip64 extra field too short"))?;
                let mut a = [0u8; 8];
                a.copy_from_slice(bytes);
                *value = u64::from_le_bytes(a);
            }
        }
        if fields.next().is_some() {
            return Err(format!("entry `{name}`: zip64 extra field longer than its values"));
        }
    }
    if !zip64_seen && [size, compressed, header_offset].contains(&SENTINEL32) {
        return Err(format!("entry `{name}` has a 32-bit field of all ones but no zip64 extra field"));
    }
    if compressed != size {
        return Err(format!("entry `{name}` is stored but its compressed size {compressed} differs from its size {size}"));
    }
    Ok((Central { name, flags, method, crc32, size, header_offset, central_offset: at }, next))
}

/// The fixed fields of a local header.
struct Local {
    flags: u16,
    method: u16,
    crc32: u32,
    compressed: u32,
    size: u32,
    name_len: u64,
    extra_len: u64,
}

/// The fixed fields of the local header of `c`, which `b` holds.
fn local_header(b: &Bytes<'_>, c: &Central) -> Result<Local, String> {
    let (name, lh) = (&c.name, c.header_offset);
    if b.u32(lh, "local header")? != LOCAL_SIG {
        return Err(format!("entry `{name}`: no local header at {lh}"));
    }
    Ok(Local {
        flags: b.u16(lh + 6, "local header")?,
        method: b.u16(lh + 8, "local header")?,
        crc32: b.u32(lh + 14, "local header")?,
        compressed: b.u32(lh + 18, "local header")?,
        size: b.u32(lh + 22, "local header")?,
        name_len: u64::from(b.u16(lh + 26, "local header")?),
        extra_len: u64::from(b.u16(lh + 28, "local header")?),
    })
}

impl Local {
    /// Check that the local header says what the central record `c` says:
    /// its name, flags and method, and a well-formed extra field (`b` holds
    /// the name and the extra field). Returns where the entry's data starts.
    fn check(&self, b: &Bytes<'_>, c: &Central) -> Result<u64, String> {
        let (name, lh) = (&c.name, c.header_offset);
        if b.slice(lh + LOCAL_LEN, self.name_len, "local header name")? != name.as_bytes() {
            return Err(format!("entry `{name}`: the local header names another file"));
        }
        if self.flags != c.flags || self.method != c.method {
            return Err(format!("entry `{name}`: the local header's flags or method differ from the central record's"));
        }
        let l_extra = b.slice(lh + LOCAL_LEN + self.name_len, self.extra_len, "local extra field")?;
        extra_fields(l_extra).map_err(|e| format!("entry `{name}` (local header): {e}"))?;
        Ok(lh + LOCAL_LEN + self.name_len + self.extra_len)
    }
}

/// The length of the data descriptor of an entry of `size` bytes whose
/// `flags` call for one (0 when they do not): 64-bit sizes exactly when a
/// size does not fit 32 bits (as the writer does).
fn descriptor_len(flags: u16, size: u64) -> u64 {
    match (flags & FLAG_DESCRIPTOR != 0, size >= SENTINEL32) {
        (false, _) => 0,
        (true, true) => 24,
        (true, false) => 16,
    }
}

/// The entry of the central record `c` and its local header `l`, whose data
/// starts at `data_offset`: checks that the data lies in the file and that
/// the data descriptor, or the local header without one, repeats the
/// central record's CRC-32 and sizes (`b` holds the data and the descriptor).
fn entry(b: &Bytes<'_>, c: &Central, l: &Local, data_offset: u64) -> Result<Entry, String> {
    let (name, size, crc32) = (&c.name, c.size, c.crc32);
    let data_end = data_offset.checked_add(size).ok_or_else(|| format!("entry `{name}`: size overflows"))?;
    b.slice(data_offset, size, "entry data").map_err(|e| format!("entry `{name}`: {e}"))?;

    let (descriptor_offset, end) = if c.flags & FLAG_DESCRIPTOR != 0 {
        if (l.crc32, l.compressed, l.size) != (0, 0, 0) {
            return Err(format!("entry `{name}`: the local header has a data descriptor but non-zero CRC or sizes"));
        }
        let d = data_end;
        if b.u32(d, "data descriptor")? != DESCRIPTOR_SIG {
            return Err(format!("entry `{name}`: no data descriptor after its data"));
        }
        let len = descriptor_len(c.flags, size);
        let (d_crc, d_compressed, d_size) = if len == 24 {
            (b.u32(d + 4, "data descriptor")?, b.u64(d + 8, "data descriptor")?, b.u64(d + 16, "data descriptor")?)
        } else {
            let c = u64::from(b.u32(d + 8, "data descriptor")?);
            (b.u32(d + 4, "data descriptor")?, c, u64::from(b.u32(d + 12, "data descriptor")?))
        };
        if (d_crc, d_compressed, d_size) != (crc32, size, size) {
            return Err(format!("entry `{name}`: the data descriptor disagrees with the central record"));
        }
        (Some(d), d + len)
    } else {
        if size >= SENTINEL32 {
            return Err(format!("entry `{name}`: an entry of 4 GiB or more needs a data descriptor"));
        }
        if (u64::from(l.crc32), u64::from(l.compressed), u64::from(l.size)) != (u64::from(crc32), size, size) {
            return Err(format!("entry `{name}`: the local header's CRC or sizes differ from the central record's"));
        }
        (None, data_end)
    };
    Ok(Entry {
        name: name.clone(),
        header_offset: c.header_offset,
        data_offset,
        size,
        crc32,
        central_offset: c.central_offset,
        descriptor_offset,
        end,
    })
}

/// The (id, data) pairs of an extra field, which must be exactly a sequence of them.
fn extra_fields(mut extra: &[u8]) -> Result<Vec<(u16, &[u8])>, String> {
    let mut out = Vec::new();
    while !extra.is_empty() {
        if extra.len() < 4 {
            return Err("truncated extra field".into());
        }
        let id = u16::from_le_bytes([extra[0], extra[1]]);
        let len = usize::from(u16::from_le_bytes([extra[2], extra[3]]));
        let data = extra.get(4..4 + len).ok_or_else(|| format!("extra field {id:#06x} runs past its header"))?;
        out.push((id, data));
        extra = &extra[4 + len..];
    }
    Ok(out)
}

/// The name as a string when it is a plain relative path of printable ASCII
/// (which `zipfile` decodes the same way with or without the UTF-8 flag):
/// no `..`, no leading `/`, no `\` or `:`, no empty component.
fn plain_name(raw: &[u8]) -> Result<String, String> {
    let printable = raw.iter().all(|c| (0x20..0x7f).contains(c));
    let name = String::from_utf8_lossy(raw).into_owned();
    let plain = printable && !name.is_empty() && !name.contains(['\\', ':']) && name.split('/').all(|c| !c.is_empty() && c != "..");
    if plain {
        Ok(name)
    } else {
        Err(format!("entry name {name:?} is not a plain relative name"))
    }
}

/// Read the data of one entry of an archive of `len` bytes that is read only
/// through `read(range)` (ranged requests to an object store): the end
/// records, the central directory, the entry's local header and its data, a
/// few small reads whatever the archive's size. The end records and every
/// central directory record are checked by the same code as [`read`] checks
/// them, and so are the entry's local header and data descriptor; the
/// entry's CRC-32 is checked too. The other entries' local headers and data
/// are not read, so this is no substitute for checking the whole file.
///
/// # Errors
/// A message naming the first broken record, or the failed read.
pub async fn read_entry_ranged<F, Fut>(len: u64, name: &str, read: F) -> Result<Vec<u8>, String>
where
    F: Fn(std::ops::Range<u64>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<u8>, String>>,
{
    // The end records are the last 98 bytes at most (modelio writes no comment).
    let tail_at = len - len.min(END_RECORDS_LEN);
    let tail = read(tail_at..len).await?;
    let end = end_records(&Bytes::part(&tail, tail_at, len))?;
    let cd = read(end.cd_offset..end.cd_end).await?;
    let mut found = None;
    central_directory(&Bytes::part(&cd, end.cd_offset, len), &end, |c| {
        if c.name == name {
            found = Some(c.clone());
        }
        Ok(())
    })?;
    let c = found.ok_or_else(|| format!("no entry `{name}`"))?;
    // The entry's records and data lie before the central directory: each
    // read stops there.
    let before_cd = |at: u64, len: u64| at.checked_add(len).filter(|&e| e <= end.cd_offset);
    let past_the_entries = || format!("entry `{name}`: local header past the entries");
    let header_end = before_cd(c.header_offset, LOCAL_LEN).ok_or_else(past_the_entries)?;
    let header = read(c.header_offset..header_end).await?;
    let local = local_header(&Bytes::part(&header, c.header_offset, len), &c)?;
    let names_end = before_cd(header_end, local.name_len + local.extra_len).ok_or_else(past_the_entries)?;
    let names = read(header_end..names_end).await?;
    let data_at = local.check(&Bytes::part(&names, header_end, len), &c)?;
    let data_end = c
        .size
        .checked_add(descriptor_len(c.flags, c.size))
        .and_then(|n| before_cd(data_at, n))
        .ok_or_else(|| format!("entry `{name}`: data runs past the entries"))?;
    // The data and its data descriptor, in one read.
    let mut data = read(data_at..data_end).await?;
    let b = Bytes::part(&data, data_at, len);
    let stored = b.slice(data_at, c.size, "entry data").ok().filter(|d| crc32fast::hash(d) == c.crc32);
    let size = stored.ok_or_else(|| format!("entry `{name}`: CRC-32 or size differs from the central record's"))?.len();
    entry(&b, &c, &local, data_at)?;
    data.truncate(size);
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(names: &[&str]) -> Vec<u8> {
        let mut zip = rawzip::ZipArchiveWriter::new(Vec::new());
        for name in names {
            let (mut entry, _config) = zip.new_file(rawzip::path::EntryPath::verbatim(name.as_bytes())).start().unwrap();
            std::io::Write::write_all(&mut entry, name.as_bytes()).unwrap();
            entry.finish(rawzip::DataDescriptorOutput::new(crc32fast::hash(name.as_bytes()), name.len() as u64)).unwrap();
        }
        zip.finish().unwrap()
    }

    #[test]
    fn reads_what_the_writer_writes() {
        let bytes = archive(&["a.json", "dir/b.bin"]);
        let dir = read(&bytes).unwrap();
        assert_eq!(dir.entries.len(), 2);
        let b = dir.get("dir/b.bin").unwrap();
        assert_eq!(&bytes[b.data_offset as usize..(b.data_offset + b.size) as usize], b"dir/b.bin");
        assert_eq!(b.crc32, crc32fast::hash(b"dir/b.bin"));
        assert_eq!(dir.entries[0].header_offset, 0);
        assert_eq!(b.end, dir.central_offset);
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = archive(&["a", "b"]);
        for cut in 0..bytes.len() {
            assert!(read(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn names_must_be_plain() {
        for bad in ["../x", "/abs", "a/../b", "C:x", "a\\b", "", "a//b", "dir/", "caf\u{e9}"] {
            let err = read(&archive(&["ok", bad])).unwrap_err();
            assert!(err.contains("not a plain relative name"), "{bad}: {err}");
        }
    }

    #[test]
    fn end_record_must_point_at_the_central_directory() {
        let mut bytes = archive(&["a", "b"]);
        let at = bytes.len() - 22 + 16;
        bytes[at] ^= 1;
        assert!(read(&bytes).unwrap_err().contains("central directory"));
    }

    /// `read_entry_ranged` over bytes in memory, counting the requests and bytes read.
    fn ranged(bytes: &[u8], name: &str) -> (Result<Vec<u8>, String>, usize, u64) {
        let reads = std::cell::Cell::new((0usize, 0u64));
        let read = |r: std::ops::Range<u64>| {
            let (n, total) = reads.get();
            reads.set((n + 1, total + (r.end - r.start)));
            let out = bytes.get(r.start as usize..r.end as usize).map(<[u8]>::to_vec).ok_or_else(|| "out of range".to_string());
            std::future::ready(out)
        };
        let got = futures::executor::block_on(read_entry_ranged(bytes.len() as u64, name, read));
        let (n, total) = reads.get();
        (got, n, total)
    }

    #[test]
    fn one_entry_is_read_with_a_few_small_ranged_reads() {
        let mut names: Vec<String> = (0..40).map(|i| format!("entry{i}")).collect();
        names.push("manifest.json".into());
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let bytes = archive(&refs);
        let (got, requests, fetched) = ranged(&bytes, "manifest.json");
        assert_eq!(got.unwrap(), b"manifest.json");
        assert_eq!(requests, 5, "tail, central directory, local header, its name, the data");
        let dir = read_dir_len(&bytes);
        assert!(fetched < dir + 200, "{fetched} bytes read for a {dir}-byte central directory");
        assert!(ranged(&bytes, "missing").0.unwrap_err().contains("no entry"));
        // Damage in what is read is caught: the end record, the data.
        let mut bad = bytes.clone();
        let at = bad.len() - 22 + 16;
        bad[at] ^= 1;
        assert!(ranged(&bad, "manifest.json").0.is_err());
        let data_at = read(&bytes).unwrap().get("manifest.json").unwrap().data_offset as usize;
        let mut bad = bytes.clone();
        bad[data_at] ^= 1;
        assert!(ranged(&bad, "manifest.json").0.unwrap_err().contains("CRC-32"));
        for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(ranged(&bytes[..cut], "manifest.json").0.is_err(), "cut at {cut}");
        }
    }

    fn read_dir_len(bytes: &[u8]) -> u64 {
        let d = read(bytes).unwrap();
        d.end_offset - d.central_offset
    }

    // Hand-built archives: each record written field by field, so that the
    // zip64 records (which the writer only uses past 4 GiB), extra fields and
    // comments (which it never writes in the central directory) are exercised
    // with a few bytes of data.

    /// One entry of a hand-built archive. The default is what the writer
    /// writes for small data: stored, sizes in a data descriptor.
    #[derive(Clone)]
    struct Spec {
        name: &'static str,
        data: Vec<u8>,
        version_needed: u16,
        flags: u16,
        /// The local header's flags and method, when they differ from the central record's.
        local_flags: Option<u16>,
        local_method: u16,
        /// Which of size, compressed size and header offset hold all ones in
        /// the central record, their values in a zip64 extra field.
        sentinels: [bool; 3],
        /// The central record's extra field; `None`: the zip64 field the sentinels call for.
        central_extra: Option<Vec<u8>>,
        local_extra: Vec<u8>,
        comment: Vec<u8>,
        disk: u16,
    }

    impl Default for Spec {
        fn default() -> Self {
            Spec {
                name: "entry",
                data: b"some data".to_vec(),
                version_needed: 20,
                flags: FLAG_DESCRIPTOR,
                local_flags: None,
                local_method: 0,
                sentinels: [false; 3],
                central_extra: None,
                local_extra: Vec::new(),
                comment: Vec::new(),
                disk: 0,
            }
        }
    }

    fn zip64_spec(name: &'static str, data: &[u8]) -> Spec {
        Spec { name, data: data.to_vec(), version_needed: 45, sentinels: [true; 3], ..Spec::default() }
    }

    fn put16(out: &mut Vec<u8>, v: u16) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    fn put32(out: &mut Vec<u8>, v: u32) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    fn put64(out: &mut Vec<u8>, v: u64) {
        out.extend_from_slice(&v.to_le_bytes());
    }

    /// An extra field record: id, length, data.
    fn extra_field(id: u16, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put16(&mut out, id);
        put16(&mut out, data.len() as u16);
        out.extend_from_slice(data);
        out
    }

    fn zip64_extra(values: &[u64]) -> Vec<u8> {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        extra_field(ZIP64_EXTRA_ID, &data)
    }

    /// The archive of `specs`, with the zip64 end record and locator when `zip64_end`.
    fn build(specs: &[Spec], zip64_end: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for s in specs {
            let offset = out.len() as u64;
            let size = s.data.len() as u64;
            let crc = crc32fast::hash(&s.data);
            let descriptor = s.flags & FLAG_DESCRIPTOR != 0;
            put32(&mut out, LOCAL_SIG);
            put16(&mut out, s.version_needed);
            put16(&mut out, s.local_flags.unwrap_or(s.flags));
            put16(&mut out, s.local_method);
            put32(&mut out, 0); // time, date
            for v in if descriptor { [0; 3] } else { [crc, size as u32, size as u32] } {
                put32(&mut out, v);
            }
            put16(&mut out, s.name.len() as u16);
            put16(&mut out, s.local_extra.len() as u16);
            out.extend_from_slice(s.name.as_bytes());
            out.extend_from_slice(&s.local_extra);
            out.extend_from_slice(&s.data);
            if descriptor {
                for v in [DESCRIPTOR_SIG, crc, size as u32, size as u32] {
                    put32(&mut out, v);
                }
            }
            let values = [size, size, offset];
            let wide: Vec<u64> = (0..3).filter(|&i| s.sentinels[i]).map(|i| values[i]).collect();
            let extra = s.central_extra.clone().unwrap_or_else(|| if wide.is_empty() { Vec::new() } else { zip64_extra(&wide) });
            let small = |i: usize| if s.sentinels[i] { SENTINEL32 as u32 } else { values[i] as u32 };
            put32(&mut central, CENTRAL_SIG);
            put16(&mut central, 0x0300 | s.version_needed); // made by: unix
            put16(&mut central, s.version_needed);
            put16(&mut central, s.flags);
            put16(&mut central, 0); // stored
            put32(&mut central, 0); // time, date
            put32(&mut central, crc);
            put32(&mut central, small(1));
            put32(&mut central, small(0));
            put16(&mut central, s.name.len() as u16);
            put16(&mut central, extra.len() as u16);
            put16(&mut central, s.comment.len() as u16);
            put16(&mut central, s.disk);
            put16(&mut central, 0); // internal attributes
            put32(&mut central, 0); // external attributes
            put32(&mut central, small(2));
            central.extend_from_slice(s.name.as_bytes());
            central.extend_from_slice(&extra);
            central.extend_from_slice(&s.comment);
        }
        let cd_offset = out.len() as u64;
        let cd_size = central.len() as u64;
        out.extend_from_slice(&central);
        let n = specs.len() as u64;
        if zip64_end {
            let z = out.len() as u64;
            put32(&mut out, ZIP64_EOCD_SIG);
            put64(&mut out, ZIP64_EOCD_LEN - 12);
            put16(&mut out, 45); // made by
            put16(&mut out, 45); // needed
            put32(&mut out, 0); // this disk
            put32(&mut out, 0); // disk of the central directory
            for v in [n, n, cd_size, cd_offset] {
                put64(&mut out, v);
            }
            put32(&mut out, ZIP64_LOCATOR_SIG);
            put32(&mut out, 0); // disk of the zip64 end record
            put64(&mut out, z);
            put32(&mut out, 1); // disks in all
        }
        put32(&mut out, EOCD_SIG);
        put32(&mut out, 0); // this disk, disk of the central directory
        put16(&mut out, n as u16);
        put16(&mut out, n as u16);
        put32(&mut out, cd_size as u32);
        put32(&mut out, cd_offset as u32);
        put16(&mut out, 0); // comment length
        out
    }

    /// `bytes` with the little-endian `value` written at `at`.
    fn patched<const N: usize>(bytes: &[u8], at: usize, value: [u8; N]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        out[at..at + N].copy_from_slice(&value);
        out
    }

    /// Every entry's data as `read` finds it, checked against its CRC-32.
    fn contents(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
        let dir = read(bytes).unwrap();
        dir.entries
            .iter()
            .map(|e| {
                let data = bytes[e.data_offset as usize..(e.data_offset + e.size) as usize].to_vec();
                assert_eq!(crc32fast::hash(&data), e.crc32, "{}", e.name);
                (e.name.clone(), data)
            })
            .collect()
    }

    fn assert_refused(bytes: &[u8], expect: &str) {
        let err = read(bytes).unwrap_err();
        assert!(err.contains(expect), "expected {expect:?}, got {err:?}");
    }

    /// An archive whose first entry, `big.bin`, holds `SENTINEL32 + 7` zero
    /// bytes (a hole of a sparse file), with a 64-bit data descriptor, and
    /// whose second, `small.json`, starts past 4 GiB: both need zip64 fields,
    /// as a checkpoint over 4 GiB does. Returns the file and the big entry's CRC-32.
    fn sparse_zip64(dir: &std::path::Path) -> (std::path::PathBuf, u32) {
        use std::io::{Seek, SeekFrom, Write};
        let big = SENTINEL32 + 7;
        let mut crc = crc32fast::Hasher::new();
        let zeros = vec![0u8; 1 << 20];
        let mut left = big;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            crc.update(&zeros[..n]);
            left -= n as u64;
        }
        let big_crc = crc.finalize();
        let local = |name: &str, flags: u16, crc: u32, size: u32| {
            let mut out = Vec::new();
            put32(&mut out, LOCAL_SIG);
            put16(&mut out, 45);
            put16(&mut out, flags);
            put16(&mut out, 0);
            put32(&mut out, 0);
            for v in [crc, size, size] {
                put32(&mut out, v);
            }
            put16(&mut out, name.len() as u16);
            put16(&mut out, 0);
            out.extend_from_slice(name.as_bytes());
            out
        };
        let central = |out: &mut Vec<u8>, name: &str, flags: u16, crc: u32, size: u64, offset: u64| {
            let wide: Vec<u64> =
                [(size, true), (size, true), (offset, false)].iter().filter(|(v, _)| *v >= SENTINEL32).map(|(v, _)| *v).collect();
            let small = |v: u64| if v >= SENTINEL32 { SENTINEL32 as u32 } else { v as u32 };
            let extra = if wide.is_empty() { Vec::new() } else { zip64_extra(&wide) };
            put32(out, CENTRAL_SIG);
            put16(out, 0x0300 | 45);
            put16(out, 45);
            put16(out, flags);
            put16(out, 0);
            put32(out, 0);
            put32(out, crc);
            put32(out, small(size));
            put32(out, small(size));
            put16(out, name.len() as u16);
            put16(out, extra.len() as u16);
            put16(out, 0);
            put16(out, 0);
            put16(out, 0);
            put32(out, 0);
            put32(out, small(offset));
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&extra);
        };
        let path = dir.join("big.zip");
        let mut file = std::fs::File::create(&path).unwrap();
        let head = local("big.bin", FLAG_DESCRIPTOR, 0, 0);
        file.write_all(&head).unwrap();
        let data_end = head.len() as u64 + big;
        file.seek(SeekFrom::Start(data_end)).unwrap();
        let mut tail = Vec::new();
        put32(&mut tail, DESCRIPTOR_SIG);
        put32(&mut tail, big_crc);
        put64(&mut tail, big);
        put64(&mut tail, big);
        let small_at = data_end + tail.len() as u64;
        let small_data = b"{\"small\": true}";
        let small_crc = crc32fast::hash(small_data);
        tail.extend_from_slice(&local("small.json", 0, small_crc, small_data.len() as u32));
        tail.extend_from_slice(small_data);
        let cd_offset = data_end + tail.len() as u64;
        let mut cd = Vec::new();
        central(&mut cd, "big.bin", FLAG_DESCRIPTOR, big_crc, big, 0);
        central(&mut cd, "small.json", 0, small_crc, small_data.len() as u64, small_at);
        let cd_size = cd.len() as u64;
        tail.extend_from_slice(&cd);
        let z = cd_offset + cd_size;
        put32(&mut tail, ZIP64_EOCD_SIG);
        put64(&mut tail, ZIP64_EOCD_LEN - 12);
        put16(&mut tail, 45);
        put16(&mut tail, 45);
        put32(&mut tail, 0);
        put32(&mut tail, 0);
        for v in [2, 2, cd_size, cd_offset] {
            put64(&mut tail, v);
        }
        put32(&mut tail, ZIP64_LOCATOR_SIG);
        put32(&mut tail, 0);
        put64(&mut tail, z);
        put32(&mut tail, 1);
        put32(&mut tail, EOCD_SIG);
        put32(&mut tail, 0);
        // The 16- and 32-bit fields hold the value where it fits, as writers do.
        put16(&mut tail, 2);
        put16(&mut tail, 2);
        put32(&mut tail, cd_size as u32);
        put32(&mut tail, SENTINEL32 as u32);
        put16(&mut tail, 0);
        file.write_all(&tail).unwrap();
        (path, big_crc)
    }

    #[test]
    fn an_entry_of_4_gib_or_more_and_one_past_4_gib_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let (path, big_crc) = sparse_zip64(dir.path());
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: the test's own file, not changed while mapped; only its
        // records are read (the big entry's data is a hole, never touched).
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        let d = read(&map).unwrap();
        let big = d.get("big.bin").unwrap();
        assert_eq!((big.header_offset, big.data_offset, big.size, big.crc32), (0, 37, SENTINEL32 + 7, big_crc));
        assert_eq!(big.descriptor_offset, Some(37 + SENTINEL32 + 7));
        assert_eq!(big.end, 37 + SENTINEL32 + 7 + 24, "a 64-bit data descriptor is 24 bytes");
        let small = d.get("small.json").unwrap();
        assert_eq!(small.header_offset, big.end);
        assert_eq!(&map[small.data_offset as usize..small.end as usize], b"{\"small\": true}");
        // The ranged reader finds the entry past 4 GiB through the zip64 records.
        let read_at = |r: std::ops::Range<u64>| std::future::ready(Ok(map[r.start as usize..r.end as usize].to_vec()));
        let got = futures::executor::block_on(read_entry_ranged(map.len() as u64, "small.json", read_at)).unwrap();
        assert_eq!(got, b"{\"small\": true}");
        // The descriptor's 64-bit sizes and CRC are checked.
        let d_at = big.descriptor_offset.unwrap();
        drop(map);
        for (at, value) in [(4, 1u64), (8, SENTINEL32 + 8), (16, 7)] {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.seek(SeekFrom::Start(d_at + at)).unwrap();
            let old = if at == 4 { u64::from(big_crc) } else { SENTINEL32 + 7 };
            let width = if at == 4 { 4 } else { 8 };
            f.write_all(&value.to_le_bytes()[..width]).unwrap();
            drop(f);
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: as above.
            let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
            assert!(read(&map).unwrap_err().contains("data descriptor disagrees"), "descriptor field at +{at}");
            drop(map);
            let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.seek(SeekFrom::Start(d_at + at)).unwrap();
            f.write_all(&old.to_le_bytes()[..width]).unwrap();
        }
    }

    #[test]
    fn the_hand_built_archive_is_what_the_writer_writes() {
        // The builder agrees with the writer where both apply, so the
        // archives below differ from real ones only where a test says so.
        let spec = |name| Spec { name, data: name.as_bytes().to_vec(), ..Spec::default() };
        let ours = read(&build(&[spec("a.json"), spec("dir/b.bin")], false)).unwrap();
        let theirs = read(&archive(&["a.json", "dir/b.bin"])).unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn zip64_archives_are_read() {
        let specs = [zip64_spec("a", b"first"), zip64_spec("dir/b", b"second entry")];
        let bytes = build(&specs, true);
        let dir = read(&bytes).unwrap();
        let len = bytes.len() as u64;
        assert_eq!(dir.end_offset, len - EOCD_LEN);
        assert_eq!(dir.zip64_end_offset, Some(len - EOCD_LEN - ZIP64_LOCATOR_LEN - ZIP64_EOCD_LEN));
        assert_eq!(dir.central_offset + 2 * (CENTRAL_LEN + 28) + 1 + 5, dir.zip64_end_offset.unwrap());
        let b = dir.get("dir/b").unwrap();
        assert_eq!(b.header_offset, dir.entries[0].end);
        assert_eq!(b.size, 12);
        assert_eq!(b.descriptor_offset, Some(b.data_offset + 12));
        assert_eq!(b.end, dir.central_offset);
        assert_eq!(contents(&bytes), [("a".to_string(), b"first".to_vec()), ("dir/b".to_string(), b"second entry".to_vec())]);
        for (name, data) in [("a", &b"first"[..]), ("dir/b", b"second entry")] {
            assert_eq!(ranged(&bytes, name).0.unwrap(), data, "{name}");
        }
    }

    #[test]
    fn zip64_extra_fields_replace_only_the_fields_of_all_ones() {
        // Each subset of (size, compressed size, header offset), on the
        // second entry so that its offset differs from its size.
        for mask in 1..8 {
            let sentinels = [mask & 1 != 0, mask & 2 != 0, mask & 4 != 0];
            let specs = [
                Spec { name: "first", ..Spec::default() },
                Spec { name: "second", data: b"0123456789abcdef".to_vec(), sentinels, ..Spec::default() },
            ];
            let bytes = build(&specs, false);
            let e = read(&bytes).unwrap().entries[1].clone();
            assert_eq!((e.header_offset, e.size), (read(&bytes).unwrap().entries[0].end, 16), "{sentinels:?}");
            assert_eq!(contents(&bytes)[1].1, b"0123456789abcdef", "{sentinels:?}");
            assert_eq!(ranged(&bytes, "second").0.unwrap(), b"0123456789abcdef", "{sentinels:?}");
        }
    }

    #[test]
    fn zip64_extra_fields_are_checked() {
        let two = [zip64_spec("a", b"first"), zip64_spec("b", b"second")];
        let with_extra = |extra: Vec<u8>| {
            let mut specs = two.clone();
            specs[1].central_extra = Some(extra);
            build(&specs, true)
        };
        let offset = read(&build(&two, true)).unwrap().entries[1].header_offset;
        assert!(read(&with_extra(zip64_extra(&[6, 6, offset]))).is_ok());
        let twice = [zip64_extra(&[6, 6, offset]), zip64_extra(&[6, 6, offset])].concat();
        assert_refused(&with_extra(twice), "two zip64 extra fields");
        assert_refused(&with_extra(zip64_extra(&[6, 6])), "zip64 extra field too short");
        let ragged = extra_field(ZIP64_EXTRA_ID, &[zip64_extra(&[6, 6])[4..].to_vec(), vec![0; 4]].concat());
        assert_refused(&with_extra(ragged), "zip64 extra field too short");
        assert_refused(&with_extra(zip64_extra(&[6, 6, offset, 0])), "longer than its values");
        assert_refused(&with_extra(extra_field(0xCAFE, &[0; 24])), "no zip64 extra field");
        assert_refused(&with_extra(zip64_extra(&[6, 7, offset])), "compressed size 7 differs from its size 6");
        assert_refused(&with_extra(zip64_extra(&[6, 6, offset + 1])), "no local header");
        // The ranged reader takes the same values.
        assert!(ranged(&with_extra(zip64_extra(&[6, 6, offset + 1])), "b").0.is_err());
        assert!(ranged(&with_extra(zip64_extra(&[6, 6])), "b").0.unwrap_err().contains("too short"));
        assert!(ranged(&with_extra(zip64_extra(&[5, 5, offset])), "b").0.unwrap_err().contains("CRC-32 or size"));
    }

    /// Offsets of the end records of a zip64 archive of `len` bytes: (zip64 end record, locator, end record).
    fn end_records(len: usize) -> (usize, usize, usize) {
        let end = len - EOCD_LEN as usize;
        let loc = end - ZIP64_LOCATOR_LEN as usize;
        (loc - ZIP64_EOCD_LEN as usize, loc, end)
    }

    #[test]
    fn zip64_end_records_are_checked() {
        let bytes = build(&[zip64_spec("a", b"first"), zip64_spec("b", b"second")], true);
        let (z, loc, end) = end_records(bytes.len());
        let elsewhere = format!("points at {}", z - 1);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (patched(&bytes, loc + 4, 1u32.to_le_bytes()), "locator names another disk"),
            (patched(&bytes, loc + 16, 2u32.to_le_bytes()), "locator names another disk"),
            (patched(&bytes, loc + 8, (z as u64 - 1).to_le_bytes()), &elsewhere),
            (patched(&bytes, z, 0x0606_4b51u32.to_le_bytes()), "missing or has extensible data"),
            (patched(&bytes, z + 4, 45u64.to_le_bytes()), "missing or has extensible data"),
            (patched(&bytes, z + 14, 46u16.to_le_bytes()), "needs a newer zip version"),
            (patched(&bytes, z + 16, 1u32.to_le_bytes()), "zip64 end record names another disk"),
            (patched(&bytes, z + 20, 1u32.to_le_bytes()), "zip64 end record names another disk"),
            (patched(&bytes, z + 32, 3u64.to_le_bytes()), "two entry counts differ"),
            (patched(&patched(&bytes, z + 24, 3u64.to_le_bytes()), z + 32, 3u64.to_le_bytes()), "disagrees with the zip64"),
            (patched(&patched(&bytes, end + 8, 3u16.to_le_bytes()), end + 10, 3u16.to_le_bytes()), "disagrees with the zip64"),
            (patched(&bytes, end + 12, 1u32.to_le_bytes()), "disagrees with the zip64"),
            (patched(&bytes, end + 16, 1u32.to_le_bytes()), "disagrees with the zip64"),
            (patched(&bytes, z + 40, 1u64.to_le_bytes()), "disagrees with the zip64"),
            (patched(&bytes, z + 48, 1u64.to_le_bytes()), "disagrees with the zip64"),
        ];
        for (bad, expect) in &cases {
            assert_refused(bad, expect);
        }
        // The zip64 record's counts and places are the ones used: both
        // records agreeing on a wrong value is still refused.
        let count = patched(&patched(&patched(&bytes, z + 24, 3u64.to_le_bytes()), z + 32, 3u64.to_le_bytes()), end + 8, [3, 0, 3, 0]);
        assert_refused(&count, "counts 3 entries");
        let cd = u64::from_le_bytes(bytes[z + 48..z + 56].try_into().unwrap());
        let moved = patched(&patched(&bytes, z + 48, (cd + 1).to_le_bytes()), end + 16, ((cd + 1) as u32).to_le_bytes());
        assert_refused(&moved, "places the central directory");
        // The ranged reader finds the central directory through the zip64 records too.
        assert!(ranged(&patched(&bytes, z, 0x0606_4b51u32.to_le_bytes()), "a").0.unwrap_err().contains("zip64 end"));
        assert!(ranged(&patched(&bytes, z + 48, (cd + 1).to_le_bytes()), "a").0.is_err());
        assert!(ranged(&patched(&bytes, z + 40, 1u64.to_le_bytes()), "a").0.is_err());
    }

    #[test]
    fn extra_fields_and_entry_comments_as_other_tools_write_them() {
        // Python's `zipfile` (extra fields in both headers, a comment in the
        // central record), Info-ZIP (a timestamp field) and zipalign (local
        // padding) all write these; the data is still found, whole and ranged.
        let spec = |name, data: &[u8], central: Vec<u8>, local: Vec<u8>, comment: &[u8]| Spec {
            name,
            data: data.to_vec(),
            flags: 0,
            central_extra: Some(central),
            local_extra: local,
            comment: comment.to_vec(),
            ..Spec::default()
        };
        let timestamp = extra_field(0x5455, &[3, 1, 2, 3, 4]);
        let specs = [
            spec("first", b"one", timestamp.clone(), timestamp.clone(), b"a comment"),
            spec("second", b"two!", Vec::new(), extra_field(0xD935, &[0; 7]), b""),
            spec("third", b"three", [timestamp.clone(), extra_field(0xCAFE, b"xyz")].concat(), timestamp, b"another comment"),
        ];
        let bytes = build(&specs, false);
        let want: Vec<(String, Vec<u8>)> = specs.iter().map(|s| (s.name.to_string(), s.data.clone())).collect();
        assert_eq!(contents(&bytes), want);
        for (name, data) in &want {
            assert_eq!(&ranged(&bytes, name).0.unwrap(), data, "{name}");
        }
        // With zip64 values after another field, and zip64 end records.
        let mut z = zip64_spec("z", b"zip64 data");
        z.central_extra = Some([extra_field(0xCAFE, b"xyz"), zip64_extra(&[10, 10, 0])].concat());
        z.local_extra = extra_field(0xD935, &[0; 3]);
        z.comment = b"zip64 and a comment".to_vec();
        let last = Spec { name: "last", data: b"last data".to_vec(), comment: b"c".to_vec(), ..Spec::default() };
        let bytes = build(&[z, last], true);
        assert_eq!(contents(&bytes)[0].1, b"zip64 data");
        assert_eq!(ranged(&bytes, "z").0.unwrap(), b"zip64 data");
        assert_eq!(ranged(&bytes, "last").0.unwrap(), b"last data");
    }

    #[test]
    fn the_utf8_name_flag_is_accepted_and_other_flags_are_refused() {
        let with_flags = |flags| build(&[Spec { flags, ..Spec::default() }], false);
        for flags in [0, FLAG_DESCRIPTOR, FLAG_UTF8, FLAG_UTF8 | FLAG_DESCRIPTOR] {
            assert_eq!(contents(&with_flags(flags))[0].1, b"some data", "{flags:#x}");
        }
        for bit in [0, 1, 2, 4, 5, 6, 13] {
            assert_refused(&with_flags(FLAG_DESCRIPTOR | (1 << bit)), "encrypted or otherwise unsupported");
        }
    }

    #[test]
    fn the_local_header_must_repeat_the_flags_and_method() {
        let local_flags = Spec { local_flags: Some(FLAG_DESCRIPTOR | FLAG_UTF8), ..Spec::default() };
        assert_refused(&build(&[local_flags], false), "flags or method differ");
        let local_method = Spec { local_method: 8, ..Spec::default() };
        assert_refused(&build(&[local_method], false), "flags or method differ");
    }

    #[test]
    fn zip_version_4_5_is_the_newest_accepted() {
        assert!(read(&build(&[Spec { version_needed: 45, ..Spec::default() }], false)).is_ok());
        assert_refused(&build(&[Spec { version_needed: 46, ..Spec::default() }], false), "needs zip version 4.6");
        assert_refused(&build(&[Spec { version_needed: 63, ..Spec::default() }], false), "needs zip version 6.3");
    }

    #[test]
    fn other_disks_are_refused_in_every_field() {
        let bytes = build(&[Spec::default()], false);
        let end = bytes.len() - EOCD_LEN as usize;
        assert!(read(&bytes).is_ok());
        assert_refused(&patched(&bytes, end + 4, 1u16.to_le_bytes()), "another disk");
        assert_refused(&patched(&bytes, end + 6, 1u16.to_le_bytes()), "another disk");
        assert_refused(&build(&[Spec { disk: 1, ..Spec::default() }], false), "starts on another disk");
    }

    #[test]
    fn a_bad_central_directory_signature_is_refused() {
        let bytes = build(&[Spec { name: "a", ..Spec::default() }, Spec { name: "b", ..Spec::default() }], false);
        for e in read(&bytes).unwrap().entries {
            let at = e.central_offset as usize;
            let bad = patched(&bytes, at, (CENTRAL_SIG ^ (1 << 24)).to_le_bytes());
            assert_refused(&bad, &format!("no central directory record at {at}"));
            assert!(ranged(&bad, "b").0.unwrap_err().contains("no central directory record"));
        }
    }

    #[test]
    fn an_archive_comment_is_refused() {
        let mut bytes = build(&[Spec::default()], false);
        let end = bytes.len() - EOCD_LEN as usize;
        bytes[end + 20] = 2;
        bytes.extend_from_slice(b"hi");
        assert_refused(&bytes, "no end-of-central-directory record");
        // Where the comment length is read: the end record at its usual place, a comment length.
        let bytes = build(&[Spec::default()], false);
        assert_refused(&patched(&bytes, end + 20, 1u16.to_le_bytes()), "has a comment");
    }

    #[test]
    fn a_ranged_read_refuses_what_a_whole_read_refuses_and_says_the_same() {
        let one = |spec: Spec| build(&[spec], false);
        let plain = one(Spec::default());
        let end = plain.len() - EOCD_LEN as usize;
        let descriptor = read(&plain).unwrap().entries[0].descriptor_offset.unwrap() as usize;
        let zip64 = build(&[zip64_spec("entry", b"some data")], true);
        let (z, _, _) = end_records(zip64.len());
        let cases = [
            // The end records.
            patched(&plain, end + 4, 1u16.to_le_bytes()),
            patched(&plain, end + 10, 2u16.to_le_bytes()),
            patched(&zip64, z + 14, 46u16.to_le_bytes()),
            patched(&zip64, z + 32, 2u64.to_le_bytes()),
            // The central directory: every record, not only the entry's.
            build(&[Spec { name: "other", version_needed: 46, ..Spec::default() }, Spec::default()], false),
            build(&[Spec { name: "other", disk: 1, ..Spec::default() }, Spec::default()], false),
            build(&[Spec::default(), Spec::default()], false),
            one(Spec { flags: FLAG_DESCRIPTOR | 1, ..Spec::default() }),
            one(Spec { central_extra: Some(extra_field(0xCAFE, &[0; 3])[..5].to_vec()), ..Spec::default() }),
            // The entry's local header and data descriptor.
            one(Spec { local_flags: Some(FLAG_DESCRIPTOR | FLAG_UTF8), ..Spec::default() }),
            one(Spec { local_method: 8, ..Spec::default() }),
            one(Spec { local_extra: extra_field(0xCAFE, &[0; 3])[..5].to_vec(), ..Spec::default() }),
            patched(&plain, descriptor, 0u32.to_le_bytes()),
            patched(&plain, descriptor + 8, 10u32.to_le_bytes()),
        ];
        for (i, bad) in cases.iter().enumerate() {
            let whole = read(bad).err().unwrap_or_else(|| panic!("case {i} is read whole"));
            assert_eq!(ranged(bad, "entry").0, Err(whole.clone()), "{whole}");
        }
    }

    #[test]
    fn a_ranged_read_that_returns_fewer_bytes_than_asked_is_refused() {
        let bytes = archive(&["a.json", "b.json"]);
        let dir = read(&bytes).unwrap();
        let b = dir.get("b.json").unwrap();
        let name_at = b.header_offset + LOCAL_LEN;
        // The read starting at `at` comes back `missing` bytes short.
        let bytes = &bytes[..];
        let short = |at: u64, missing: u64| {
            let read = move |r: std::ops::Range<u64>| {
                let end = if r.start == at { r.end - missing } else { r.end };
                std::future::ready(Ok(bytes[r.start as usize..end as usize].to_vec()))
            };
            futures::executor::block_on(read_entry_ranged(bytes.len() as u64, "b.json", read)).unwrap_err()
        };
        let tail_at = bytes.len() as u64 - END_RECORDS_LEN;
        for at in [tail_at, dir.central_offset, b.header_offset, name_at, b.data_offset] {
            let e = short(at, 1);
            assert!(e.contains("lies outside the"), "read at {at}: {e}");
        }
        let e = short(b.data_offset, b.end - b.data_offset);
        assert!(e.contains("CRC-32 or size"), "{e}");
    }
}
