//! Root tests of `partitions::rescan` against real loop devices, sfdisk, mkfs.ext4 and
//! mount. They need root, losetup, sfdisk and mkfs.ext4; a missing prerequisite
//! fails the test loudly. Each test attaches its own loop device (`losetup -f --show
//! --partscan`) and a guard unmounts and detaches only what the test set up.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use dindhelper::error::{Classify, Kind};
use dindhelper::partitions::{list, rescan, PartError, Partition};

const M: u64 = 1 << 20;

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "partitions_root tests need root (BLKPG, losetup, mount)"
    );
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is required but could not run: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sfdisk(target: &Path, extra: &[&str], script: &str) {
    let mut child = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .args(extra)
        .arg(target)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sfdisk (package fdisk) is required");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sfdisk {extra:?} {script:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loop device over a sparse image, plus mounts; undone on drop.
struct Fixture {
    dev: PathBuf,
    image: PathBuf,
    mounts: Vec<PathBuf>,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(size: u64) -> Fixture {
        Fixture::attach(size, true)
    }

    fn attach(size: u64, partscan: bool) -> Fixture {
        Fixture::attach_with(size, partscan, 512)
    }

    fn attach_with(size: u64, partscan: bool, sector_size: u32) -> Fixture {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("dhq-parts-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let image = dir.path().join("disk.img");
        fs::File::create(&image).unwrap().set_len(size).unwrap();
        let ssz = sector_size.to_string();
        let mut args = vec!["-f", "--show", "--sector-size", ssz.as_str()];
        if partscan {
            args.push("--partscan");
        }
        args.push(image.to_str().unwrap());
        let dev = run("losetup", &args);
        Fixture {
            dev: PathBuf::from(dev.trim()),
            image,
            mounts: Vec::new(),
            dir,
        }
    }

    fn name(&self) -> String {
        self.dev.file_name().unwrap().to_string_lossy().into_owned()
    }

    /// (number, start bytes, size bytes) from /sys/block/loopN/loopNpM.
    fn sys_parts(&self) -> Vec<(u32, u64, u64)> {
        let base = PathBuf::from("/sys/block").join(self.name());
        let mut v = Vec::new();
        for e in fs::read_dir(&base).unwrap() {
            let p = e.unwrap().path();
            if !p.join("partition").exists() {
                continue;
            }
            let rd = |f: &str| -> u64 {
                fs::read_to_string(p.join(f))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap()
            };
            v.push((rd("partition") as u32, rd("start") * 512, rd("size") * 512));
        }
        v.sort();
        v
    }

    fn mount(&mut self, node: &Path) -> PathBuf {
        run("mkfs.ext4", &["-q", "-F", node.to_str().unwrap()]);
        let mnt = self.dir.path().join(format!("mnt-{}", self.mounts.len()));
        fs::create_dir(&mnt).unwrap();
        run("mount", &[node.to_str().unwrap(), mnt.to_str().unwrap()]);
        self.mounts.push(mnt.clone());
        fs::write(mnt.join("hello"), b"still here").unwrap();
        mnt
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg(m).status();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn view(parts: &[Partition]) -> Vec<(u32, u64, u64)> {
    parts.iter().map(|p| (p.number, p.start, p.size)).collect()
}

/// The table as sfdisk reads it, with the DOS extended container reduced to what the
/// kernel shows (1 KiB, or one sector when sectors are larger).
fn sfdisk_view(target: &Path) -> Vec<(u32, u64, u64)> {
    let json: serde_json::Value =
        serde_json::from_str(&run("sfdisk", &["--json", target.to_str().unwrap()])).unwrap();
    let ssz = json["partitiontable"]["sectorsize"].as_u64().unwrap_or(512);
    let mut v: Vec<(u32, u64, u64)> = json["partitiontable"]["partitions"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|j| {
            let node = j["node"].as_str().unwrap();
            let no: u32 = node
                .rsplit(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let size = j["size"].as_u64().unwrap() * ssz;
            let extended = matches!(j["type"].as_str(), Some("5" | "f" | "85"));
            (
                no,
                j["start"].as_u64().unwrap() * ssz,
                if extended {
                    size.min(ssz.max(1024))
                } else {
                    size
                },
            )
        })
        .collect();
    v.sort();
    v
}

fn check_nodes(parts: &[Partition]) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    for p in parts {
        let m = fs::metadata(&p.node).unwrap_or_else(|e| panic!("{}: {e}", p.node.display()));
        assert!(m.file_type().is_block_device());
        assert_eq!(
            (libc::major(m.rdev()), libc::minor(m.rdev())),
            (p.major, p.minor)
        );
    }
}

fn expect_busy(err: PartError, number: u32) {
    assert_eq!(err.kind(), Kind::Busy, "{err}");
    match &err {
        PartError::PartitionBusy {
            number: n, applied, ..
        } => {
            assert_eq!(*n, number, "{err}");
            assert_eq!(*applied, 0, "{err}");
        }
        other => panic!("expected PartitionBusy, got {other}"),
    }
}

#[test]
fn gpt_rescan_adds_resizes_deletes_and_keeps_mounted_partition() {
    let mut fx = Fixture::new(64 * M);
    // p1 1M+8M, gap until 17M so p1 can grow, p2 17M+16M (mounted), p3, p4.
    sfdisk(
        &fx.dev,
        &[],
        "label: gpt\n\
         start=2048, size=16384, name=one\n\
         start=34816, size=32768, name=two\n\
         start=67584, size=16384\n\
         start=83968, size=16384\n",
    );
    let parts = rescan(&fx.dev).expect("first rescan");
    assert_eq!(
        view(&parts),
        vec![
            (1, M, 8 * M),
            (2, 17 * M, 16 * M),
            (3, 33 * M, 8 * M),
            (4, 41 * M, 8 * M)
        ]
    );
    assert_eq!(view(&parts), fx.sys_parts());
    assert_eq!(view(&parts), sfdisk_view(&fx.dev));
    check_nodes(&parts);
    assert_eq!(parts[0].name, "one");
    assert_eq!(parts[0].part_type, "0fc63daf-8483-4772-8e79-3d69d8477de4");
    assert_eq!(
        parts[1].node,
        PathBuf::from(format!("/dev/{}p2", fx.name()))
    );

    let mnt = fx.mount(&parts[1].node.clone());

    // Unchanged table, p2 mounted: fine and idempotent.
    assert_eq!(
        view(&rescan(&fx.dev).expect("idempotent rescan")),
        fx.sys_parts()
    );

    // Change the table behind the loop device's back (on the image file): delete p3,
    // grow p1 into the gap, add a partition at 49M (sfdisk reuses slot 3: for the kernel
    // p3 moved, a delete + add). BLKFLSBUF makes the rescan see the new table.
    let image = fx.image.clone();
    Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel", "--delete"])
        .arg(&image)
        .arg("3")
        .status()
        .unwrap();
    sfdisk(&image, &["-N", "1"], "start=2048, size=32768\n");
    sfdisk(&image, &["-N", "5"], "start=100352, size=16384\n");
    let parts = rescan(&fx.dev).expect("rescan with p2 mounted");
    assert_eq!(
        view(&parts),
        vec![
            (1, M, 16 * M),
            (2, 17 * M, 16 * M),
            (3, 49 * M, 8 * M),
            (4, 41 * M, 8 * M)
        ]
    );
    assert_eq!(view(&parts), fx.sys_parts());
    assert_eq!(view(&parts), sfdisk_view(&fx.dev));
    check_nodes(&parts);
    assert_eq!(fs::read(mnt.join("hello")).unwrap(), b"still here");
    assert_eq!(list(&fx.dev).unwrap(), parts);

    // Changing the mounted p2 is Busy, and nothing is applied (not even the p4 delete).
    let before = fx.sys_parts();
    sfdisk(&image, &["-N", "2"], "start=34816, size=16384\n");
    Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel", "--delete"])
        .arg(&image)
        .arg("4")
        .status()
        .unwrap();
    expect_busy(rescan(&fx.dev).unwrap_err(), 2);
    assert_eq!(fx.sys_parts(), before);
    Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel", "--delete"])
        .arg(&image)
        .arg("2")
        .status()
        .unwrap();
    expect_busy(rescan(&fx.dev).unwrap_err(), 2);
    assert_eq!(fx.sys_parts(), before);

    // Another process holding the device's flock: Busy after a bounded wait.
    let f = fs::File::open(&fx.dev).unwrap();
    let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).unwrap();
    let t0 = std::time::Instant::now();
    let err = rescan(&fx.dev).unwrap_err();
    assert!(matches!(err, PartError::Locked { .. }), "{err}");
    assert_eq!(err.kind(), Kind::Busy);
    assert!(t0.elapsed() < std::time::Duration::from_secs(3));
    drop(lock);
}

#[test]
fn gpt_backup_fallback_and_blank_disk_on_real_device() {
    let fx = Fixture::new(32 * M);
    sfdisk(&fx.dev, &[], "label: gpt\nsize=4M\nsize=4M\nsize=4M\n");
    let parts = rescan(&fx.dev).unwrap();
    assert_eq!(parts.len(), 3);

    // A partition merely held open (not mounted, not O_EXCL) is found busy by the
    // kernel's EBUSY on delete; nothing before it was applied.
    let held = fs::File::open(&parts[2].node).unwrap();
    Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel", "--delete"])
        .arg(&fx.dev)
        .arg("3")
        .status()
        .unwrap();
    expect_busy(rescan(&fx.dev).unwrap_err(), 3);
    assert_eq!(fx.sys_parts().len(), 3);
    drop(held);
    let parts = rescan(&fx.dev).unwrap();
    assert_eq!(view(&parts), fx.sys_parts());
    assert_eq!(parts.len(), 2);

    // Corrupt the primary header (on the image file): the backup still gives 3.
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&fx.image).unwrap();
        f.write_all_at(b"XXXXXXXX", 512).unwrap();
    }
    assert_eq!(view(&rescan(&fx.dev).unwrap()), view(&parts));

    // Non-partition: a partition node and a missing device.
    let err = rescan(&parts[0].node).unwrap_err();
    assert_eq!(err.kind(), Kind::InvalidArgs, "{err}");

    // Both headers gone but the protective MBR left: corrupt table, nothing changes.
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&fx.image).unwrap();
        f.write_all_at(b"XXXXXXXX", 32 * M - 512).unwrap();
    }
    let err = rescan(&fx.dev).unwrap_err();
    assert_eq!(err.kind(), Kind::InvalidArgs, "{err}");
    assert!(err.to_string().contains("backup"), "{err}");
    assert_eq!(fx.sys_parts().len(), 2);

    // A blank disk has no partitions: the kernel's are deleted.
    // (wipefs would not do: with both headers broken it no longer sees the GPT and
    // leaves the protective MBR.)
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&fx.image).unwrap();
        f.write_all_at(&[0u8; 4096], 0).unwrap();
    }
    assert!(rescan(&fx.dev).unwrap().is_empty());
    assert!(fx.sys_parts().is_empty());
}

#[test]
fn dos_rescan_with_extended_and_logical_partitions() {
    let mut fx = Fixture::new(64 * M);
    // p1 1M+8M, gap to 17M, p2 17M+8M (mounted), p3 25M+4M, p4 extended 29M..63M with
    // three 8 MiB logicals.
    sfdisk(
        &fx.dev,
        &[],
        "label: dos\nlabel-id: 0x0badcafe\n\
         start=2048, size=16384, type=83\n\
         start=34816, size=16384, type=83\n\
         start=51200, size=8192, type=82\n\
         start=59392, size=69632, type=5\n\
         size=16384, type=83\n\
         size=16384, type=83\n\
         size=16384, type=c\n",
    );
    let parts = rescan(&fx.dev).expect("first rescan");
    let numbers: Vec<u32> = parts.iter().map(|p| p.number).collect();
    assert_eq!(numbers, vec![1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(view(&parts), fx.sys_parts());
    assert_eq!(view(&parts), sfdisk_view(&fx.dev));
    // The extended container is a 1 KiB partition in the kernel, like Linux shows it.
    assert_eq!((parts[3].start, parts[3].size), (59392 * 512, 1024));
    assert_eq!(parts[3].part_type, "0x05");
    assert_eq!(parts[6].part_type, "0x0c");
    assert_eq!(parts[4].uuid, "0badcafe-05");
    check_nodes(&parts);

    let mnt = fx.mount(&parts[1].node.clone());

    // Through the device this time: delete logical 6 (sfdisk renumbers 7 -> 6) and grow
    // p1 into the gap, with p2 mounted.
    Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel", "--delete"])
        .arg(&fx.dev)
        .arg("6")
        .status()
        .unwrap();
    sfdisk(&fx.dev, &["-N", "1"], "start=2048, size=32768\n");
    let parts = rescan(&fx.dev).expect("rescan with p2 mounted");
    let numbers: Vec<u32> = parts.iter().map(|p| p.number).collect();
    assert_eq!(numbers, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(parts[0].size, 16 * M);
    assert_eq!(view(&parts), fx.sys_parts());
    assert_eq!(view(&parts), sfdisk_view(&fx.dev));
    check_nodes(&parts);
    assert_eq!(fs::read(mnt.join("hello")).unwrap(), b"still here");

    // Deleting the mounted p2 is Busy; the kernel keeps its view.
    let before = fx.sys_parts();
    Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel", "--delete"])
        .arg(&fx.dev)
        .arg("2")
        .status()
        .unwrap();
    expect_busy(rescan(&fx.dev).unwrap_err(), 2);
    assert_eq!(fx.sys_parts(), before);
    // list() shows the kernel as it is; p2 has no table entry any more.
    let listed = list(&fx.dev).unwrap();
    assert_eq!(view(&listed), before);
    assert_eq!(listed[1].uuid, "");
    assert_eq!(listed[0].uuid, "0badcafe-01");
}

#[test]
fn loop_device_without_partscan_is_refused() {
    // BLKPG would work, but the loop driver drops partitions at detach only with
    // partscan on: they would outlive the device.
    let fx = Fixture::attach(16 * M, false);
    sfdisk(&fx.dev, &[], "label: gpt\nsize=4M\n");
    let err = rescan(&fx.dev).unwrap_err();
    assert!(matches!(err, PartError::PartscanOff { .. }), "{err}");
    assert_eq!(err.kind(), Kind::NotSupported);
    assert!(fx.sys_parts().is_empty());
}

#[test]
fn dos_on_4k_sector_loop_device() {
    // 4096-byte logical sectors: table units are 4 KiB, BLKPG wants 4 KiB multiples, and
    // the extended container is one logical sector (4 KiB) in the kernel.
    let fx = Fixture::attach_with(64 * M, true, 4096);
    sfdisk(
        &fx.dev,
        &[],
        "label: dos\nsize=8M\nsize=8M\nsize=4M\nsize=32M, type=5\nsize=8M\nsize=8M\n",
    );
    let parts = rescan(&fx.dev).expect("rescan");
    assert_eq!(view(&parts), fx.sys_parts());
    let numbers: Vec<u32> = parts.iter().map(|p| p.number).collect();
    assert_eq!(numbers, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(parts[3].size, 4096);
    assert_eq!(view(&parts), sfdisk_view(&fx.dev));
    assert_eq!(parts[0].size, 8 * M);
    check_nodes(&parts);
}
