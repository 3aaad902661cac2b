//! GUID Partition Table parser (UEFI spec 2.10, chapter 5.3), written by hand rather than
//! with the `gpt` crate so that every check is ours and visible: protective MBR, header
//! CRC32, entry-array CRC32, backup-header fallback, usable-range and overlap checks.
//!
//! Mirrors the Linux `efi` parser (`block/partitions/efi.c`): a GPT is only considered when
//! LBA 0 holds an MBR with a 0xEE entry; the primary header at LBA 1 wins when valid; else
//! the backup (at the primary's `alternate_lba` when that header itself was sound, then at
//! the last LBA) is used. Entry N of the array is partition N+1 (unused entries leave gaps).

use std::io::{Read, Seek};

use super::{check_extents, read_at, Label, ParseError, Table, TablePart};

const SIGNATURE: &[u8; 8] = b"EFI PART";
const MIN_HEADER_SIZE: u32 = 92;
const MIN_ENTRY_SIZE: u32 = 128;
/// Upper bound for the entry array (128 bytes × 8192 entries); real tables use 16 KiB.
const MAX_ARRAY_BYTES: u64 = 1 << 20;

/// The fields of a GPT header this parser uses.
#[derive(Debug, Clone)]
struct Header {
    alternate_lba: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: [u8; 16],
    entries_lba: u64,
    num_entries: u32,
    entry_size: u32,
    entries_crc: u32,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Format a GUID stored in the on-disk mixed-endian layout as lowercase text
/// (`0fc63daf-8483-4772-8e79-3d69d8477de4`), as blkid prints it.
pub fn format_guid(g: &[u8; 16]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    )
}

/// Does LBA 0 hold a (protective or hybrid) MBR with a 0xEE entry?
fn has_protective_mbr(sector0: &[u8]) -> bool {
    sector0.len() >= 512
        && sector0[510] == 0x55
        && sector0[511] == 0xAA
        && (0..4).any(|i| sector0[0x1be + 16 * i + 4] == 0xEE)
}

/// Validate the header in `buf` (one sector read from `lba`).
fn parse_header(buf: &[u8], lba: u64, last_lba: u64, ssz: u64) -> Result<Header, String> {
    if &buf[0..8] != SIGNATURE {
        return Err(format!("no \"EFI PART\" signature at LBA {lba}"));
    }
    let header_size = u32_at(buf, 12);
    if header_size < MIN_HEADER_SIZE || u64::from(header_size) > ssz {
        return Err(format!(
            "header size {header_size} out of range at LBA {lba}"
        ));
    }
    let stored_crc = u32_at(buf, 16);
    let mut h = buf[..header_size as usize].to_vec();
    h[16..20].fill(0);
    let crc = crc32fast::hash(&h);
    if crc != stored_crc {
        return Err(format!(
            "header CRC32 mismatch at LBA {lba} (stored {stored_crc:#010x}, computed {crc:#010x})"
        ));
    }
    let my_lba = u64_at(buf, 24);
    if my_lba != lba {
        return Err(format!("header at LBA {lba} says it is at LBA {my_lba}"));
    }
    let hdr = Header {
        alternate_lba: u64_at(buf, 32),
        first_usable: u64_at(buf, 40),
        last_usable: u64_at(buf, 48),
        disk_guid: buf[56..72].try_into().expect("16 bytes"),
        entries_lba: u64_at(buf, 72),
        num_entries: u32_at(buf, 80),
        entry_size: u32_at(buf, 84),
        entries_crc: u32_at(buf, 88),
    };
    if hdr.last_usable > last_lba || hdr.first_usable > hdr.last_usable {
        return Err(format!(
            "usable range {}..={} does not fit a device of {} sectors (header at LBA {lba})",
            hdr.first_usable,
            hdr.last_usable,
            last_lba + 1
        ));
    }
    if hdr.entry_size < MIN_ENTRY_SIZE
        || hdr.entry_size % MIN_ENTRY_SIZE != 0
        || !(hdr.entry_size / MIN_ENTRY_SIZE).is_power_of_two()
    {
        return Err(format!(
            "partition entry size {} is invalid",
            hdr.entry_size
        ));
    }
    let bytes = u64::from(hdr.num_entries) * u64::from(hdr.entry_size);
    if bytes > MAX_ARRAY_BYTES {
        return Err(format!(
            "partition entry array of {bytes} bytes is too large"
        ));
    }
    let end = hdr
        .entries_lba
        .checked_mul(ssz)
        .and_then(|s| s.checked_add(bytes))
        .ok_or_else(|| "partition entry array position overflows".to_string())?;
    if hdr.entries_lba < 2 || end > (last_lba + 1) * ssz {
        return Err(format!(
            "partition entry array at LBA {} lies outside the device",
            hdr.entries_lba
        ));
    }
    Ok(hdr)
}

/// Read and CRC-check the entry array of `hdr`.
fn read_entries<R: Read + Seek>(r: &mut R, hdr: &Header, ssz: u64) -> Result<Vec<u8>, ParseError> {
    let len = u64::from(hdr.num_entries) * u64::from(hdr.entry_size);
    let buf = read_at(r, hdr.entries_lba * ssz, len as usize)?;
    let crc = crc32fast::hash(&buf);
    if crc != hdr.entries_crc {
        return Err(ParseError::Corrupt(format!(
            "partition entry array CRC32 mismatch at LBA {} (stored {:#010x}, computed {crc:#010x})",
            hdr.entries_lba, hdr.entries_crc
        )));
    }
    Ok(buf)
}

/// One header candidate: the header and its CRC-checked entries, or why not.
/// `Err((reason, header_if_sound))`.
type Candidate = Result<(Header, Vec<u8>), (String, Option<Header>)>;

fn try_header<R: Read + Seek>(
    r: &mut R,
    lba: u64,
    last_lba: u64,
    ssz: u64,
) -> Result<Candidate, ParseError> {
    let buf = read_at(r, lba * ssz, ssz as usize)?;
    let hdr = match parse_header(&buf, lba, last_lba, ssz) {
        Ok(h) => h,
        Err(e) => return Ok(Err((e, None))),
    };
    match read_entries(r, &hdr, ssz) {
        Ok(entries) => Ok(Ok((hdr, entries))),
        Err(ParseError::Corrupt(e)) => Ok(Err((e, Some(hdr)))),
        Err(e) => Err(e),
    }
}

/// Parse a GPT from `r` (the whole device: `dev_size` bytes, logical sectors of `ssz`
/// bytes). `Ok(None)`: no protective MBR, so no GPT. `Err(Corrupt)`: a protective MBR but
/// neither header (with its entries) is valid, or the entries are inconsistent.
pub fn parse<R: Read + Seek>(
    r: &mut R,
    ssz: u64,
    dev_size: u64,
) -> Result<Option<Table>, ParseError> {
    if ssz < 512 || !ssz.is_power_of_two() {
        return Err(ParseError::Corrupt(format!(
            "unsupported sector size {ssz}"
        )));
    }
    if dev_size < 3 * ssz {
        return Ok(None);
    }
    let sector0 = read_at(r, 0, ssz as usize)?;
    if !has_protective_mbr(&sector0) {
        return Ok(None);
    }
    let last_lba = dev_size / ssz - 1;

    let (hdr, entries) = match try_header(r, 1, last_lba, ssz)? {
        Ok(found) => found,
        Err((primary_err, primary_hdr)) => {
            let mut candidates = Vec::new();
            if let Some(h) = &primary_hdr {
                if h.alternate_lba > 1 && h.alternate_lba <= last_lba {
                    candidates.push(h.alternate_lba);
                }
            }
            if !candidates.contains(&last_lba) {
                candidates.push(last_lba);
            }
            let mut backup_errs = Vec::new();
            let mut found = None;
            for lba in candidates {
                match try_header(r, lba, last_lba, ssz)? {
                    Ok(f) => {
                        found = Some(f);
                        break;
                    }
                    Err((e, _)) => backup_errs.push(e),
                }
            }
            match found {
                Some(f) => {
                    tracing::warn!(
                        "primary GPT is invalid ({primary_err}); using the backup header"
                    );
                    f
                }
                None => {
                    return Err(ParseError::Corrupt(format!(
                        "GPT: primary header invalid ({primary_err}); backup header invalid ({})",
                        backup_errs.join("; ")
                    )))
                }
            }
        }
    };

    let mut parts = Vec::new();
    for i in 0..hdr.num_entries as usize {
        let e = &entries[i * hdr.entry_size as usize..][..MIN_ENTRY_SIZE as usize];
        let type_guid: [u8; 16] = e[0..16].try_into().expect("16 bytes");
        if type_guid == [0; 16] {
            continue;
        }
        let number = i as u32 + 1;
        let first = u64_at(e, 32);
        let last = u64_at(e, 40);
        if first > last || first < hdr.first_usable || last > hdr.last_usable {
            return Err(ParseError::Corrupt(format!(
                "GPT partition {number} (LBA {first}..={last}) lies outside the usable range {}..={}",
                hdr.first_usable, hdr.last_usable
            )));
        }
        let name_units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        parts.push(TablePart {
            number,
            start: first * ssz,
            size: (last - first + 1) * ssz,
            part_type: format_guid(&type_guid),
            name: String::from_utf16_lossy(&name_units),
            uuid: format_guid(e[16..32].try_into().expect("16 bytes")),
        });
    }
    check_extents(&parts, dev_size).map_err(ParseError::Corrupt)?;
    Ok(Some(Table {
        label: Label::Gpt,
        id: format_guid(&hdr.disk_guid),
        parts,
    }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;

    pub const LINUX_FS: &str = "0fc63daf-8483-4772-8e79-3d69d8477de4";

    /// Parse a textual GUID into the on-disk mixed-endian layout.
    pub fn guid_bytes(s: &str) -> [u8; 16] {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        let mut b = [0u8; 16];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
        }
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        b
    }

    /// In-memory GPT image builder with correct CRCs (primary + backup).
    pub struct GptBuilder {
        pub ssz: u64,
        pub sectors: u64,
        pub num_entries: u32,
        /// (index, type, unique, first, last, name)
        pub entries: Vec<(usize, String, String, u64, u64, String)>,
    }

    impl GptBuilder {
        pub fn new(ssz: u64, sectors: u64) -> Self {
            GptBuilder {
                ssz,
                sectors,
                num_entries: 128,
                entries: Vec::new(),
            }
        }

        pub fn part(mut self, index: usize, first: u64, last: u64, name: &str) -> Self {
            let uuid = format!("00000000-0000-4000-8000-{:012x}", index + 1);
            self.entries
                .push((index, LINUX_FS.into(), uuid, first, last, name.into()));
            self
        }

        fn array_sectors(&self) -> u64 {
            (u64::from(self.num_entries) * 128).div_ceil(self.ssz)
        }

        pub fn first_usable(&self) -> u64 {
            2 + self.array_sectors()
        }

        pub fn last_usable(&self) -> u64 {
            self.sectors - 2 - self.array_sectors()
        }

        pub fn build(&self) -> Vec<u8> {
            let ssz = self.ssz as usize;
            let mut img = vec![0u8; ssz * self.sectors as usize];
            // protective MBR
            let p = 0x1be;
            img[p + 4] = 0xEE;
            img[p + 8..p + 12].copy_from_slice(&1u32.to_le_bytes());
            let n = u32::try_from(self.sectors - 1).unwrap_or(u32::MAX);
            img[p + 12..p + 16].copy_from_slice(&n.to_le_bytes());
            img[510] = 0x55;
            img[511] = 0xAA;
            // entries
            let mut arr = vec![0u8; self.num_entries as usize * 128];
            for (idx, t, u, first, last, name) in &self.entries {
                let e = &mut arr[idx * 128..idx * 128 + 128];
                e[0..16].copy_from_slice(&guid_bytes(t));
                e[16..32].copy_from_slice(&guid_bytes(u));
                e[32..40].copy_from_slice(&first.to_le_bytes());
                e[40..48].copy_from_slice(&last.to_le_bytes());
                for (k, unit) in name.encode_utf16().enumerate().take(36) {
                    e[56 + 2 * k..58 + 2 * k].copy_from_slice(&unit.to_le_bytes());
                }
            }
            let crc = crc32fast::hash(&arr);
            let last_lba = self.sectors - 1;
            let backup_array = last_lba - self.array_sectors();
            for (my, alt, arr_lba) in [(1, last_lba, 2), (last_lba, 1, backup_array)] {
                let mut h = vec![0u8; 92];
                h[0..8].copy_from_slice(SIGNATURE);
                h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
                h[12..16].copy_from_slice(&92u32.to_le_bytes());
                h[24..32].copy_from_slice(&my.to_le_bytes());
                h[32..40].copy_from_slice(&alt.to_le_bytes());
                h[40..48].copy_from_slice(&self.first_usable().to_le_bytes());
                h[48..56].copy_from_slice(&self.last_usable().to_le_bytes());
                h[56..72].copy_from_slice(&guid_bytes("12345678-9abc-def0-1234-56789abcdef0"));
                h[72..80].copy_from_slice(&arr_lba.to_le_bytes());
                h[80..84].copy_from_slice(&self.num_entries.to_le_bytes());
                h[84..88].copy_from_slice(&128u32.to_le_bytes());
                h[88..92].copy_from_slice(&crc.to_le_bytes());
                let hcrc = crc32fast::hash(&h);
                h[16..20].copy_from_slice(&hcrc.to_le_bytes());
                let off = my as usize * ssz;
                img[off..off + 92].copy_from_slice(&h);
                let aoff = arr_lba as usize * ssz;
                img[aoff..aoff + arr.len()].copy_from_slice(&arr);
            }
            img
        }
    }

    fn parse_img(img: &[u8], ssz: u64) -> Result<Option<Table>, ParseError> {
        parse(&mut Cursor::new(img), ssz, img.len() as u64)
    }

    fn three_parts(ssz: u64) -> GptBuilder {
        let sectors = 8 * 1024 * 1024 / ssz; // 8 MiB
        let mib = 1024 * 1024 / ssz;
        GptBuilder::new(ssz, sectors)
            .part(0, mib, 2 * mib - 1, "boot")
            .part(1, 2 * mib, 4 * mib - 1, "root fs ✓")
            .part(3, 4 * mib, 6 * mib - 1, "")
    }

    #[test]
    fn guid_text_is_mixed_endian_lowercase() {
        let b = guid_bytes(LINUX_FS);
        assert_eq!(b[0], 0xaf); // first field little-endian on disk
        assert_eq!(format_guid(&b), LINUX_FS);
    }

    #[test]
    fn parses_valid_gpt_with_gap_in_numbers() {
        let t = parse_img(&three_parts(512).build(), 512).unwrap().unwrap();
        assert_eq!(t.label, Label::Gpt);
        assert_eq!(t.id, "12345678-9abc-def0-1234-56789abcdef0");
        let nums: Vec<u32> = t.parts.iter().map(|p| p.number).collect();
        assert_eq!(nums, vec![1, 2, 4]);
        let p2 = &t.parts[1];
        assert_eq!(p2.start, 2 << 20);
        assert_eq!(p2.size, 2 << 20);
        assert_eq!(p2.part_type, LINUX_FS);
        assert_eq!(p2.name, "root fs ✓");
        assert_eq!(p2.uuid, "00000000-0000-4000-8000-000000000002");
        assert_eq!(t.parts[2].name, "");
    }

    #[test]
    fn parses_4k_sector_gpt() {
        let t = parse_img(&three_parts(4096).build(), 4096)
            .unwrap()
            .unwrap();
        assert_eq!(t.parts.len(), 3);
        assert_eq!(t.parts[1].start, 2 << 20);
        assert_eq!(t.parts[1].size, 2 << 20);
    }

    #[test]
    fn no_protective_mbr_means_no_gpt() {
        let mut img = three_parts(512).build();
        img[0x1be + 4] = 0x83;
        assert!(parse_img(&img, 512).unwrap().is_none());
        assert!(parse_img(&[0u8; 1 << 16], 512).unwrap().is_none());
    }

    #[test]
    fn corrupt_primary_header_falls_back_to_backup() {
        let mut img = three_parts(512).build();
        img[512 + 40] ^= 0xff; // first_usable: header CRC now wrong
        let t = parse_img(&img, 512).unwrap().unwrap();
        assert_eq!(t.parts.len(), 3);
        assert_eq!(t.parts[0].name, "boot");
    }

    #[test]
    fn corrupt_primary_entries_fall_back_to_backup() {
        let mut img = three_parts(512).build();
        img[2 * 512 + 128 + 32] ^= 0x01; // p2 first_lba in the primary array
        let t = parse_img(&img, 512).unwrap().unwrap();
        assert_eq!(t.parts[1].start, 2 << 20);
    }

    #[test]
    fn both_headers_bad_is_an_error() {
        let mut img = three_parts(512).build();
        let n = img.len();
        img[512] = b'X';
        img[n - 512] = b'X';
        let err = parse_img(&img, 512).unwrap_err().to_string();
        assert!(err.contains("primary") && err.contains("backup"), "{err}");
    }

    #[test]
    fn primary_and_backup_entry_arrays_bad_is_an_error() {
        let mut img = three_parts(512).build();
        let n = img.len();
        img[2 * 512 + 32] ^= 1;
        img[n - 512 - 32 * 512 + 32] ^= 1;
        let err = parse_img(&img, 512).unwrap_err().to_string();
        assert!(err.contains("CRC32"), "{err}");
    }

    #[test]
    fn truncated_device_rejects_primary_and_finds_no_backup() {
        let img = three_parts(512).build();
        let short = &img[..img.len() - 1024 * 1024];
        let err = parse_img(short, 512).unwrap_err().to_string();
        assert!(err.contains("usable range"), "{err}");
    }

    #[test]
    fn grown_device_keeps_using_primary() {
        let mut img = three_parts(512).build();
        img.resize(img.len() + (1 << 20), 0);
        assert_eq!(parse_img(&img, 512).unwrap().unwrap().parts.len(), 3);
    }

    #[test]
    fn overlapping_entries_are_rejected() {
        let b = three_parts(512).part(5, 3 * 2048, 5 * 2048, "overlap");
        let err = parse_img(&b.build(), 512).unwrap_err().to_string();
        assert!(err.contains("overlap"), "{err}");
    }

    #[test]
    fn entry_outside_usable_range_is_rejected() {
        let b = GptBuilder::new(512, 16384);
        let last = b.last_usable();
        let b = b.part(0, 2048, last + 1, "too far");
        let err = parse_img(&b.build(), 512).unwrap_err().to_string();
        assert!(err.contains("usable range"), "{err}");
        let b = GptBuilder::new(512, 16384).part(0, 10, 2047, "too early");
        assert!(parse_img(&b.build(), 512).is_err());
    }

    #[test]
    fn empty_gpt_has_no_partitions() {
        let t = parse_img(&GptBuilder::new(512, 4096).build(), 512)
            .unwrap()
            .unwrap();
        assert!(t.parts.is_empty());
    }

    /// Real fixture: sfdisk writes a GPT into a sparse file; our view must equal
    /// `sfdisk --json`.
    #[test]
    fn matches_sfdisk_json_for_real_gpt() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("gpt.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let script = "label: gpt\n\
             size=8M, type=L, name=alpha\n\
             size=16M, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, name=swap\n\
             size=4M, type=L\n\
             type=L, name=rest\n";
        super::super::tests::sfdisk(&img, script);
        let json = super::super::tests::sfdisk_json(&img);
        let t = parse_img(&std::fs::read(&img).unwrap(), 512)
            .unwrap()
            .unwrap();
        let pt = &json["partitiontable"];
        assert_eq!(t.id, pt["id"].as_str().unwrap().to_lowercase());
        let jparts = pt["partitions"].as_array().unwrap();
        assert_eq!(t.parts.len(), jparts.len());
        for (p, j) in t.parts.iter().zip(jparts) {
            assert_eq!(p.start, j["start"].as_u64().unwrap() * 512);
            assert_eq!(p.size, j["size"].as_u64().unwrap() * 512);
            assert_eq!(p.part_type, j["type"].as_str().unwrap().to_lowercase());
            assert_eq!(p.uuid, j["uuid"].as_str().unwrap().to_lowercase());
            assert_eq!(p.name, j["name"].as_str().unwrap_or(""));
            let node = j["node"].as_str().unwrap();
            assert!(node.ends_with(&format!("img{}", p.number)), "{node}");
        }
    }
}
