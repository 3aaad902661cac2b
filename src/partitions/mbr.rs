//! DOS (MBR) partition-table parser, mirroring the Linux `msdos` parser
//! (`block/partitions/msdos.c`) so the kernel view we build with BLKPG equals what a
//! kernel with that parser would show:
//! - sector 0 needs the 0x55AA signature, and every boot indicator must be 0x00 or 0x80
//!   (otherwise it is a FAT boot sector or garbage: no table);
//! - a 0xEE entry anywhere means GPT: the DOS parser stays out;
//! - primaries are partitions 1–4 (entries with a size of 0 are skipped, gaps stay);
//! - an extended partition (0x05, 0x0f, 0x85) appears in the kernel as a partition of
//!   `min(size, max(sector, 1 KiB))` — 2 sectors (1 KiB) with 512-byte sectors — so that
//!   nobody runs mkfs on the container; `partx` does the same. Its logical partitions
//!   follow the EBR chain and are numbered from 5 in chain order. In each EBR, the data
//!   entries are relative to the EBR, the link entry relative to the extended start; the
//!   3rd/4th entries count only if they lie inside the current EBR's extent.
//! - The chain stops at an EBR without the 0x55AA signature (a fresh extended partition).
//!
//! Stricter than the kernel, because BLKPG cannot add what the kernel's own parser would
//! silently accept: a cyclic EBR chain, a partition reaching beyond the device, and
//! overlapping partitions are errors instead of duplicates/truncation. Not supported: BSD,
//! Solaris, UnixWare and Minix sub-labels inside DOS partitions.
//! PARTUUIDs follow blkid: `<disk id as 8 hex digits>-<number as 2 hex digits>`, none when
//! the disk id is 0.

use std::collections::HashSet;
use std::io::{Read, Seek};

use super::{check_extents, read_at, Label, ParseError, Table, TablePart};

const MAX_EBRS: usize = 512;
/// The kernel's `DISK_MAX_PARTS` is 256: partition numbers 1..=255.
const MAX_PARTNO: u32 = 255;

fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0f | 0x85)
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    boot: u8,
    kind: u8,
    start: u64, // sectors, relative
    size: u64,  // sectors
}

fn entries(sector: &[u8]) -> [Entry; 4] {
    std::array::from_fn(|i| {
        let e = &sector[0x1be + 16 * i..0x1be + 16 * (i + 1)];
        Entry {
            boot: e[0],
            kind: e[4],
            start: u64::from(u32::from_le_bytes(e[8..12].try_into().expect("4 bytes"))),
            size: u64::from(u32::from_le_bytes(e[12..16].try_into().expect("4 bytes"))),
        }
    })
}

fn has_signature(sector: &[u8]) -> bool {
    sector[510] == 0x55 && sector[511] == 0xAA
}

struct Parser<'a, R> {
    r: &'a mut R,
    ssz: u64,
    dev_size: u64,
    disk_id: String,
    parts: Vec<TablePart>,
}

impl<R: Read + Seek> Parser<'_, R> {
    fn push(&mut self, number: u32, start_sec: u64, size_bytes: u64, kind: u8) {
        let uuid = if self.disk_id.is_empty() {
            String::new()
        } else {
            format!("{}-{:02x}", self.disk_id, number)
        };
        self.parts.push(TablePart {
            number,
            start: start_sec * self.ssz,
            size: size_bytes,
            part_type: format!("0x{kind:02x}"),
            name: String::new(),
            uuid,
        });
    }

    /// Follow the EBR chain of the extended partition at `first` (sectors, `size` long).
    fn extended(
        &mut self,
        first: u64,
        first_size: u64,
        next_no: &mut u32,
    ) -> Result<(), ParseError> {
        let mut seen = HashSet::new();
        let (mut this, mut this_size) = (first, first_size);
        loop {
            if !seen.insert(this) {
                return Err(ParseError::Corrupt(format!(
                    "DOS: the EBR chain loops back to sector {this}"
                )));
            }
            if seen.len() > MAX_EBRS {
                return Err(ParseError::Corrupt(format!(
                    "DOS: more than {MAX_EBRS} EBRs in the extended partition at sector {first}"
                )));
            }
            if (this + 1) * self.ssz > self.dev_size {
                return Err(ParseError::Corrupt(format!(
                    "DOS: EBR at sector {this} lies beyond the end of the device"
                )));
            }
            let sector = read_at(self.r, this * self.ssz, self.ssz as usize)?;
            if !has_signature(&sector) {
                return Ok(());
            }
            let ents = entries(&sector);
            for (i, e) in ents.iter().enumerate() {
                if e.size == 0 || is_extended(e.kind) {
                    continue;
                }
                let next = this + e.start;
                if i >= 2
                    && (e.start + e.size > this_size
                        || next < first
                        || next + e.size > first + first_size)
                {
                    continue; // kernel: "these sometimes contain random garbage"
                }
                if *next_no > MAX_PARTNO {
                    return Err(ParseError::Corrupt(format!(
                        "DOS: more logical partitions than the kernel allows (numbers up to {MAX_PARTNO})"
                    )));
                }
                let no = *next_no;
                self.push(no, next, e.size * self.ssz, e.kind);
                *next_no += 1;
            }
            match ents.iter().find(|e| e.size != 0 && is_extended(e.kind)) {
                Some(link) => {
                    this = first + link.start;
                    this_size = link.size;
                }
                None => return Ok(()),
            }
        }
    }
}

/// Parse a DOS partition table from `r` (`dev_size` bytes, logical sectors of `ssz`).
/// `Ok(None)`: no DOS table (no signature, invalid boot flags, or a protective MBR).
pub fn parse<R: Read + Seek>(
    r: &mut R,
    ssz: u64,
    dev_size: u64,
) -> Result<Option<Table>, ParseError> {
    if ssz < 512 || dev_size < ssz {
        return Ok(None);
    }
    let sector0 = read_at(r, 0, ssz as usize)?;
    if !has_signature(&sector0) {
        return Ok(None);
    }
    let prim = entries(&sector0);
    if prim.iter().any(|e| e.boot != 0 && e.boot != 0x80) || prim.iter().any(|e| e.kind == 0xEE) {
        return Ok(None);
    }
    let id = u32::from_le_bytes(sector0[440..444].try_into().expect("4 bytes"));
    let mut p = Parser {
        r,
        ssz,
        dev_size,
        disk_id: if id == 0 {
            String::new()
        } else {
            format!("{id:08x}")
        },
        parts: Vec::new(),
    };
    let mut next_no = 5;
    for (i, e) in prim.iter().enumerate() {
        if e.size == 0 {
            continue;
        }
        let slot = i as u32 + 1;
        if is_extended(e.kind) {
            // Kernel: n = min(size, max(sector_size / 512, 2)) in 512-byte units.
            let container = (e.size * ssz).min(ssz.max(1024));
            let first_logical = p.parts.len();
            p.push(slot, e.start, container, e.kind);
            let idx = first_logical;
            p.extended(e.start, e.size, &mut next_no)?;
            // A logical partition starting 1 sector after its EBR would overlap the
            // 2-sector container (the kernel's parser allows that; BLKPG does not):
            // shrink the container to the gap.
            let cstart = p.parts[idx].start;
            if let Some(min_logical) = p.parts[idx + 1..]
                .iter()
                .map(|l| l.start)
                .filter(|&s| s > cstart)
                .min()
            {
                let c = &mut p.parts[idx];
                c.size = c.size.min(min_logical - cstart);
            }
        } else {
            p.push(slot, e.start, e.size * ssz, e.kind);
        }
    }
    let mut parts = p.parts;
    parts.sort_by_key(|x| x.number);
    check_extents(&parts, dev_size).map_err(ParseError::Corrupt)?;
    Ok(Some(Table {
        label: Label::Dos,
        id: p.disk_id,
        parts,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const MIB: u64 = 2048; // sectors

    fn set_entry(img: &mut [u8], sector: u64, i: usize, kind: u8, start: u64, size: u64) {
        let off = sector as usize * 512 + 0x1be + 16 * i;
        img[off + 4] = kind;
        img[off + 8..off + 12].copy_from_slice(&(start as u32).to_le_bytes());
        img[off + 12..off + 16].copy_from_slice(&(size as u32).to_le_bytes());
        let s = sector as usize * 512;
        img[s + 510] = 0x55;
        img[s + 511] = 0xAA;
    }

    /// 64 MiB: p1 8 MiB, p2 extended 40 MiB with 3 logicals, p3 4 MiB; disk id 0xdeadbeef.
    fn dos_image() -> Vec<u8> {
        let mut img = vec![0u8; 64 << 20];
        img[440..444].copy_from_slice(&0xdeadbeefu32.to_le_bytes());
        set_entry(&mut img, 0, 0, 0x83, MIB, 8 * MIB);
        let ext = 9 * MIB;
        set_entry(&mut img, 0, 1, 0x0f, ext, 40 * MIB);
        set_entry(&mut img, 0, 2, 0x82, 49 * MIB, 4 * MIB);
        // EBR chain: each logical 8 MiB, data 1 MiB after its EBR.
        for k in 0..3u64 {
            let ebr = ext + k * 10 * MIB;
            set_entry(&mut img, ebr, 0, 0x83, MIB, 8 * MIB);
            if k < 2 {
                set_entry(&mut img, ebr, 1, 0x05, (k + 1) * 10 * MIB, 10 * MIB);
            }
        }
        img
    }

    fn parse_img(img: &[u8]) -> Result<Option<Table>, ParseError> {
        parse(&mut Cursor::new(img), 512, img.len() as u64)
    }

    #[test]
    fn parses_primaries_extended_and_logicals() {
        let t = parse_img(&dos_image()).unwrap().unwrap();
        assert_eq!(t.label, Label::Dos);
        assert_eq!(t.id, "deadbeef");
        let got: Vec<(u32, u64, u64, &str, &str)> = t
            .parts
            .iter()
            .map(|p| {
                (
                    p.number,
                    p.start / 512,
                    p.size / 512,
                    p.part_type.as_str(),
                    p.uuid.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (1, MIB, 8 * MIB, "0x83", "deadbeef-01"),
                (2, 9 * MIB, 2, "0x0f", "deadbeef-02"), // container: 1 KiB, like Linux
                (3, 49 * MIB, 4 * MIB, "0x82", "deadbeef-03"),
                (5, 10 * MIB, 8 * MIB, "0x83", "deadbeef-05"),
                (6, 20 * MIB, 8 * MIB, "0x83", "deadbeef-06"),
                (7, 30 * MIB, 8 * MIB, "0x83", "deadbeef-07"),
            ]
        );
    }

    #[test]
    fn cyclic_ebr_chain_is_an_error() {
        let mut img = dos_image();
        // third EBR links back to the first
        set_entry(&mut img, 9 * MIB + 20 * MIB, 1, 0x05, 0, 10 * MIB);
        let err = parse_img(&img).unwrap_err().to_string();
        assert!(err.contains("loops back"), "{err}");
        // an EBR linking to itself
        let mut img = dos_image();
        set_entry(&mut img, 9 * MIB, 1, 0x05, 0, 10 * MIB);
        assert!(parse_img(&img).is_err());
    }

    #[test]
    fn extended_without_ebr_has_no_logicals() {
        let mut img = vec![0u8; 16 << 20];
        set_entry(&mut img, 0, 0, 0x05, MIB, 8 * MIB);
        let t = parse_img(&img).unwrap().unwrap();
        assert_eq!(t.id, "");
        assert_eq!(t.parts.len(), 1);
        assert_eq!(t.parts[0].uuid, "");
        assert_eq!(t.parts[0].size, 1024);
    }

    #[test]
    fn container_shrinks_when_logical_starts_next_sector() {
        let mut img = vec![0u8; 16 << 20];
        set_entry(&mut img, 0, 0, 0x85, MIB, 8 * MIB);
        set_entry(&mut img, MIB, 0, 0x83, 1, 100);
        let t = parse_img(&img).unwrap().unwrap();
        assert_eq!(t.parts[0].size, 512);
        assert_eq!(t.parts[1].number, 5);
        assert_eq!(t.parts[1].start, (MIB + 1) * 512);
    }

    #[test]
    fn no_signature_bad_boot_flag_or_protective_means_no_table() {
        assert!(parse_img(&vec![0u8; 1 << 20]).unwrap().is_none());
        let mut img = dos_image();
        img[0x1be] = 0x12;
        assert!(parse_img(&img).unwrap().is_none());
        let mut img = dos_image();
        img[0x1be + 16 * 3 + 4] = 0xEE;
        img[0x1be + 16 * 3 + 12] = 1;
        assert!(parse_img(&img).unwrap().is_none());
    }

    #[test]
    fn partition_beyond_device_or_overlapping_is_an_error() {
        let mut img = vec![0u8; 16 << 20];
        set_entry(&mut img, 0, 0, 0x83, MIB, 64 * MIB);
        let err = parse_img(&img).unwrap_err().to_string();
        assert!(err.contains("end of the device"), "{err}");
        let mut img = vec![0u8; 16 << 20];
        set_entry(&mut img, 0, 0, 0x83, MIB, 4 * MIB);
        set_entry(&mut img, 0, 1, 0x83, 2 * MIB, 4 * MIB);
        let err = parse_img(&img).unwrap_err().to_string();
        assert!(err.contains("overlap"), "{err}");
    }

    #[test]
    fn garbage_in_ebr_slots_3_and_4_is_ignored_like_linux() {
        let mut img = dos_image();
        // outside this EBR's extent: ignored
        set_entry(&mut img, 9 * MIB, 2, 0x83, 500 * MIB, 8 * MIB);
        let t = parse_img(&img).unwrap().unwrap();
        assert_eq!(t.parts.len(), 6);
    }

    /// Real fixture: sfdisk writes a dos label with an extended partition and three
    /// logicals; our table must equal `sfdisk --json` (except the container's size,
    /// which we report as the kernel shows it).
    #[test]
    fn matches_sfdisk_json_for_real_dos_label() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("dos.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let script = "label: dos\nlabel-id: 0x1234abcd\n\
             ,8M,83\n,4M,82\n,4M,83\n,40M,5\n,8M,83\n,8M,83\n,8M,c\n";
        super::super::tests::sfdisk(&img, script);
        let json = super::super::tests::sfdisk_json(&img);
        let t = parse_img(&std::fs::read(&img).unwrap()).unwrap().unwrap();
        assert_eq!(t.id, "1234abcd");
        let jparts = json["partitiontable"]["partitions"].as_array().unwrap();
        assert_eq!(t.parts.len(), jparts.len());
        let mut logicals = 0;
        for j in jparts {
            let node = j["node"].as_str().unwrap();
            let no: u32 = node.rsplit("img").next().unwrap().parse().unwrap();
            let p = t.parts.iter().find(|p| p.number == no).unwrap();
            let jtype = u8::from_str_radix(j["type"].as_str().unwrap(), 16).unwrap();
            assert_eq!(p.part_type, format!("0x{jtype:02x}"));
            assert_eq!(p.start, j["start"].as_u64().unwrap() * 512);
            assert_eq!(p.uuid, format!("1234abcd-{no:02x}"));
            if is_extended(jtype) {
                assert_eq!(p.size, 1024);
            } else {
                assert_eq!(p.size, j["size"].as_u64().unwrap() * 512);
            }
            logicals += u32::from(no >= 5);
        }
        assert_eq!(logicals, 3);
    }
}
