//! How the commands write sizes and times, the same in every listing.

/// Bytes in MiB.
pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// An RFC 3339 time in UTC without its fraction of a second
/// (`2024-05-01T12:00:00Z`); any other text as it is.
pub(crate) fn short_time(t: &str) -> String {
    let utc = t.ends_with("+00:00") || t.ends_with('Z');
    match t.get(..19) {
        Some(seconds) if utc && t.as_bytes().get(10) == Some(&b'T') => format!("{seconds}Z"),
        _ => t.to_string(),
    }
}
