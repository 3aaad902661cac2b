//! Framing of `state.journal`: one line per batch of changes,
//! `<len: 8 hex> <crc32: 8 hex> <json>\n`, where `len` is the byte length of `<json>` and
//! `crc32` its CRC-32 (IEEE). Compact JSON never contains a raw newline, so a line is a
//! record and the file stays readable with `cut -c19-`.
//!
//! Traps:
//! - a crash in the middle of an append leaves a torn last line (short, no newline, or
//!   bytes the page cache never wrote as zeros after a power loss): the checksum and the
//!   length catch every such tail, and reading stops at the first bad record. Nothing
//!   after a bad record is trusted, so the writer must never append after a torn tail:
//!   it truncates back to the last good length when a write fails, and the store compacts
//!   (rewrites the snapshot, empties the journal) at start whenever it found a bad tail;
//! - `len` and `crc` are checked before the JSON is parsed: a line that happens to parse
//!   but was cut short (a prefix of valid JSON never is a whole object, but a number can
//!   be) is still refused.

/// Bytes before the JSON: `LLLLLLLL CCCCCCCC `.
const HEADER: usize = 18;

/// One framed record for `payload` (compact JSON without newlines).
pub fn frame(payload: &[u8]) -> Vec<u8> {
    debug_assert!(!payload.contains(&b'\n'));
    let mut out = Vec::with_capacity(HEADER + payload.len() + 1);
    out.extend_from_slice(
        format!("{:08x} {:08x} ", payload.len(), crc32fast::hash(payload)).as_bytes(),
    );
    out.extend_from_slice(payload);
    out.push(b'\n');
    out
}

/// The records of a journal: every good payload in order, and the byte length of the
/// good prefix (`valid < bytes.len()` means a torn or corrupt tail was left out).
pub struct Read<'a> {
    pub records: Vec<&'a [u8]>,
    pub valid: usize,
}

pub fn read(bytes: &[u8]) -> Read<'_> {
    let mut records = Vec::new();
    let mut pos = 0;
    while let Some(rec) = one(&bytes[pos..]) {
        records.push(rec);
        pos += HEADER + rec.len() + 1;
    }
    Read {
        records,
        valid: pos,
    }
}

/// The payload of the record at the start of `b`, when it is whole and its checksum holds.
fn one(b: &[u8]) -> Option<&[u8]> {
    if b.len() < HEADER || b[8] != b' ' || b[17] != b' ' {
        return None;
    }
    let hex = |s: &[u8]| {
        std::str::from_utf8(s)
            .ok()
            .and_then(|s| u32::from_str_radix(s, 16).ok())
    };
    let len = hex(&b[..8])? as usize;
    let crc = hex(&b[9..17])?;
    let end = HEADER.checked_add(len)?;
    if b.len() <= end || b[end] != b'\n' {
        return None;
    }
    let payload = &b[HEADER..end];
    (crc32fast::hash(payload) == crc).then_some(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_read_back_and_every_torn_tail_is_left_out() {
        let mut j = Vec::new();
        j.extend(frame(br#"[{"a":1}]"#));
        j.extend(frame(br#"[{"b":"x y"}]"#));
        let whole = j.len();
        let r = read(&j);
        assert_eq!(r.records, [&br#"[{"a":1}]"#[..], &br#"[{"b":"x y"}]"#[..]]);
        assert_eq!(r.valid, whole);
        // A third record cut at every possible byte: the first two survive, the cut one
        // is never returned.
        let third = frame(br#"[{"c":12345}]"#);
        for cut in 0..third.len() {
            let mut t = j.clone();
            t.extend(&third[..cut]);
            let r = read(&t);
            assert_eq!(r.records.len(), 2, "cut at {cut}");
            assert_eq!(r.valid, whole, "cut at {cut}");
        }
        // Zeros instead of the last record (power loss: size updated, data not written).
        let mut z = j.clone();
        z.extend(vec![0u8; third.len()]);
        assert_eq!(read(&z).records.len(), 2);
        // A flipped byte inside the payload: checksum mismatch, reading stops there.
        let mut f = j.clone();
        f.extend(&third);
        let at = whole + HEADER + 3;
        f[at] ^= 0x01;
        let r = read(&f);
        assert_eq!((r.records.len(), r.valid), (2, whole));
        // Nothing after a bad record is trusted.
        f.extend(frame(b"[]"));
        assert_eq!(read(&f).records.len(), 2);
    }
}
