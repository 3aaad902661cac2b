//! The kernel's view of a disk's partitions, from sysfs:
//! `/sys/dev/block/MAJ:MIN` → the disk's directory; each partition is a subdirectory
//! (`loop3p1`) holding `partition` (its number), `start` and `size` (512-byte sectors,
//! whatever the logical sector size) and `dev` (`MAJ:MIN`). Partitions of loop devices get
//! the extended major 259, so their minors are not derived from the disk's.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::KernelPart;

/// One partition as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SysPart {
    pub part: KernelPart,
    /// Kernel name (`loop3p1`); the node is `/dev/<name>`.
    pub name: String,
    pub major: u32,
    pub minor: u32,
}

fn read_trimmed(p: &Path) -> io::Result<String> {
    Ok(fs::read_to_string(p)?.trim().to_string())
}

fn parse_num<T: std::str::FromStr>(p: &Path) -> io::Result<T> {
    let s = read_trimmed(p)?;
    s.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: unexpected content {s:?}", p.display()),
        )
    })
}

/// Parse `MAJ:MIN`.
pub(crate) fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The sysfs directory of the block device `major:minor`.
pub(crate) fn disk_dir(sys_root: &Path, major: u32, minor: u32) -> io::Result<PathBuf> {
    fs::canonicalize(sys_root.join(format!("dev/block/{major}:{minor}")))
}

/// Every partition of the disk at `disk_dir`, sorted by number.
pub(crate) fn partitions(disk_dir: &Path) -> io::Result<Vec<SysPart>> {
    let mut out = Vec::new();
    for ent in fs::read_dir(disk_dir)? {
        let ent = ent?;
        let dir = ent.path();
        let pfile = dir.join("partition");
        if !pfile.is_file() {
            continue;
        }
        let dev = read_trimmed(&dir.join("dev"))?;
        let (major, minor) = parse_dev(&dev).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}/dev: unexpected content {dev:?}", dir.display()),
            )
        })?;
        let start: u64 = parse_num(&dir.join("start"))?;
        let size: u64 = parse_num(&dir.join("size"))?;
        out.push(SysPart {
            part: KernelPart {
                number: parse_num(&pfile)?,
                start: start * 512,
                size: size * 512,
            },
            name: ent.file_name().to_string_lossy().into_owned(),
            major,
            minor,
        });
    }
    out.sort_by_key(|p| p.part.number);
    Ok(out)
}

/// An optional numeric attribute of the disk (`ext_range`, `partscan`).
pub(crate) fn disk_attr(disk_dir: &Path, name: &str) -> Option<u64> {
    parse_num(&disk_dir.join(name)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_partitions_from_a_fake_sysfs_tree() {
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("loop9");
        for (name, no, start, size, dev) in [
            ("loop9p2", 2, 18432, 2, "259:5"),
            ("loop9p1", 1, 2048, 16384, "259:4"),
        ] {
            let p = disk.join(name);
            fs::create_dir_all(&p).unwrap();
            fs::write(p.join("partition"), format!("{no}\n")).unwrap();
            fs::write(p.join("start"), format!("{start}\n")).unwrap();
            fs::write(p.join("size"), format!("{size}\n")).unwrap();
            fs::write(p.join("dev"), format!("{dev}\n")).unwrap();
        }
        fs::create_dir_all(disk.join("queue")).unwrap();
        fs::write(disk.join("ext_range"), "256\n").unwrap();
        let parts = partitions(&disk).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "loop9p1");
        assert_eq!(
            parts[0].part,
            KernelPart {
                number: 1,
                start: 2048 * 512,
                size: 16384 * 512
            }
        );
        assert_eq!((parts[1].major, parts[1].minor), (259, 5));
        assert_eq!(parts[1].part.size, 1024);
        assert_eq!(disk_attr(&disk, "ext_range"), Some(256));
        assert_eq!(disk_attr(&disk, "partscan"), None);
    }

    #[test]
    fn parses_dev_numbers() {
        assert_eq!(parse_dev("7:3\n"), Some((7, 3)));
        assert_eq!(parse_dev("7"), None);
        assert_eq!(parse_dev("a:b"), None);
    }
}
