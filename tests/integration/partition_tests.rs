//! Partition re-reads: sfdisk writes a table (GPT or dos with logical partitions)
//! WITHOUT telling the kernel (`--no-reread --no-tell-kernel`: libfdisk would otherwise
//! apply BLKPG itself and hide whether Rescan works); then Rescan must make the kernel's
//! view (/sys/block/loopN/loopNpK/{start,size}) equal `sfdisk --json`, return the same
//! partitions, and create the nodes. This kernel has no partition parsers, so only the
//! daemon's userspace parser + BLKPG can make the partitions appear.

use std::fs;
use std::os::unix::fs::FileTypeExt;

use std::time::{Duration, Instant};

use crate::bed::{
    gv_str, kernel_partitions, run, sfdisk, sysfs_dev, Bed, DaemonLoop, MountGuard, MEMBER,
};
use crate::Test;

const MIB: u64 = 1 << 20;

pub fn tests() -> Vec<Test> {
    let t = |name, run| Test {
        name,
        needs_daemon: true,
        run,
    };
    vec![
        t(
            "gpt_rescan_creates_partitions_that_hold_a_filesystem",
            gpt_rescan_creates_partitions_that_hold_a_filesystem,
        ),
        t(
            "gpt_delete_and_grow_while_another_is_mounted",
            gpt_delete_and_grow_while_another_is_mounted,
        ),
        t(
            "changing_a_mounted_partition_is_busy",
            changing_a_mounted_partition_is_busy,
        ),
        t(
            "dos_with_logical_partitions_rescan_matches_table",
            dos_with_logical_partitions_rescan_matches_table,
        ),
    ]
}

#[derive(Debug, Clone, PartialEq)]
struct TablePart {
    number: u32,
    start: u64, // sectors
    size: u64,  // sectors
    ptype: String,
    name: String,
    uuid: String,
    extended: bool,
}

/// The on-disk table as sfdisk reads it.
fn table(dev: &str) -> (String, Vec<TablePart>) {
    let out = run("sfdisk", &["--json", dev]).expect_ok("sfdisk --json");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("sfdisk json");
    let pt = &v["partitiontable"];
    assert_eq!(
        pt["sectorsize"].as_u64().unwrap_or(512),
        512,
        "tests assume 512-byte sectors"
    );
    let label = pt["label"].as_str().unwrap_or_default().to_owned();
    let parts = pt["partitions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let node = p["node"].as_str().expect("node");
            let number = node
                .rsplit_once('p')
                .expect("loopNpK")
                .1
                .parse()
                .expect("number");
            let ptype = p["type"].as_str().unwrap_or_default().to_owned();
            TablePart {
                number,
                start: p["start"].as_u64().expect("start"),
                size: p["size"].as_u64().expect("size"),
                extended: label == "dos" && matches!(ptype.as_str(), "5" | "f" | "85"),
                ptype,
                name: p["name"].as_str().unwrap_or_default().to_owned(),
                uuid: p["uuid"].as_str().unwrap_or_default().to_owned(),
            }
        })
        .collect();
    (label, parts)
}

/// The kernel's view equals the table. Data partitions: same numbers, starts and sizes.
/// A dos extended partition is registered the way Linux's own msdos parser and partx do
/// it: same start, 2 sectors (1 KiB) long.
#[track_caller]
fn assert_kernel_matches_table(dev: &str) {
    let (_, parts) = table(dev);
    let want: Vec<(u32, u64, u64)> = parts
        .iter()
        .map(|p| (p.number, p.start, if p.extended { 2 } else { p.size }))
        .collect();
    let got = kernel_partitions(dev);
    assert_eq!(
        got, want,
        "{dev}: kernel (number, start, sectors) vs sfdisk --json"
    );
}

/// Rescan's reply describes exactly the table's data partitions (bytes, node, dev).
#[track_caller]
fn assert_reply_matches_table(dev: &str, reply: &[serde_json::Value]) {
    let (label, parts) = table(dev);
    for p in parts.iter().filter(|p| !p.extended) {
        let row = reply
            .iter()
            .find(|r| r[0] == p.number)
            .unwrap_or_else(|| panic!("Rescan reply lacks partition {}: {reply:?}", p.number));
        assert_eq!(row[1], p.start * 512, "start bytes of {}", p.number);
        assert_eq!(row[2], p.size * 512, "size bytes of {}", p.number);
        assert!(
            row[3]
                .as_str()
                .unwrap_or_default()
                .eq_ignore_ascii_case(&p.ptype)
                || label == "dos"
                    && u64::from_str_radix(
                        row[3].as_str().unwrap_or("x").trim_start_matches("0x"),
                        16
                    )
                    .ok()
                        == u64::from_str_radix(&p.ptype, 16).ok(),
            "type of {}: {} vs {}",
            p.number,
            row[3],
            p.ptype
        );
        if label == "gpt" {
            assert_eq!(row[4], p.name.as_str(), "name of {}", p.number);
            assert!(
                row[5]
                    .as_str()
                    .unwrap_or_default()
                    .eq_ignore_ascii_case(&p.uuid),
                "uuid of {}: {} vs {}",
                p.number,
                row[5],
                p.uuid
            );
        }
        let node = format!("{dev}p{}", p.number);
        assert_eq!(row[6], node.as_str(), "node of {}", p.number);
        let (ma, mi) = sysfs_dev(&node).unwrap_or_else(|| panic!("{node} not in sysfs"));
        assert_eq!(
            (row[7].as_u64(), row[8].as_u64()),
            (Some(ma as u64), Some(mi as u64)),
            "major:minor of {node}"
        );
    }
    let data = parts.iter().filter(|p| !p.extended).count();
    let listed = reply
        .iter()
        .filter(|r| parts.iter().any(|p| !p.extended && r[0] == p.number))
        .count();
    assert_eq!(listed, data);
    assert!(
        reply.len() <= parts.len(),
        "Rescan returned partitions the table lacks: {reply:?}"
    );
}

/// Wait (devtmpfs is quick, but not synchronous for every kernel) for block nodes.
#[track_caller]
fn wait_nodes(dev: &str, numbers: &[u32]) {
    let t = Instant::now();
    loop {
        let missing: Vec<String> = numbers
            .iter()
            .map(|n| format!("{dev}p{n}"))
            .filter(|p| {
                !fs::metadata(p)
                    .map(|m| m.file_type().is_block_device())
                    .unwrap_or(false)
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "nodes missing after Rescan: {missing:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

const GPT4: &str = "label: gpt
size=8MiB, type=linux, name=alpha
size=8MiB, type=linux, name=beta
size=8MiB, type=swap, name=gamma
size=16MiB, type=linux, name=delta
";

fn setup_gpt<'b>(bed: &'b Bed, image: &str) -> DaemonLoop<'b> {
    bed.create_image(MEMBER, image, 64 * MIB);
    let lp = DaemonLoop::attach(bed, MEMBER, image, &["partscan", "b", "true"]);
    sfdisk(&lp.device, &[], &[], GPT4).expect_ok("sfdisk gpt");
    lp
}

/// GPT with 4 partitions → Rescan → kernel = table, reply = table, nodes exist;
/// mkfs.ext4 + mount + write + read a file on partition 2.
fn gpt_rescan_creates_partitions_that_hold_a_filesystem(bed: &Bed) {
    let lp = setup_gpt(bed, "gpt-fs");
    let dev = lp.device.clone();
    assert!(
        kernel_partitions(&dev).is_empty(),
        "the kernel must not know the table before Rescan"
    );
    let reply = bed.rescan(MEMBER, &dev);
    assert_eq!(reply.len(), 4, "{reply:?}");
    assert_kernel_matches_table(&dev);
    assert_reply_matches_table(&dev, &reply);
    wait_nodes(&dev, &[1, 2, 3, 4]);
    // The loop object's Partitions property shows the same.
    let prop = bed
        .busctl(&[
            "get-property",
            "org.dindhelper1",
            &lp.object,
            "org.dindhelper1.Loop",
            "Partitions",
        ])
        .expect_ok("Partitions");
    assert_eq!(
        prop.json_data().as_array().map(Vec::len),
        Some(4),
        "Partitions property: {}",
        prop.stdout
    );

    let p2 = format!("{dev}p2");
    run("mkfs.ext4", &["-q", "-F", &p2]).expect_ok("mkfs.ext4");
    let mnt = bed.scratch("mnt-gpt-fs");
    {
        let _m = MountGuard::mount(&p2, &mnt);
        fs::write(mnt.join("hello.txt"), b"written on a rescanned partition\n").expect("write");
        run("sync", &[]).expect_ok("sync");
        assert_eq!(
            fs::read(mnt.join("hello.txt")).expect("read"),
            b"written on a rescanned partition\n"
        );
    }
    // Rescan again without changes: idempotent, same answer.
    let again = bed.rescan(MEMBER, &dev);
    assert_eq!(reply, again, "Rescan of an unchanged table");
    assert_kernel_matches_table(&dev);

    lp.detach();
    let t = Instant::now();
    while !kernel_partitions(&dev).is_empty() && t.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        kernel_partitions(&dev).is_empty(),
        "partitions of {dev} left after Detach"
    );
    bed.delete_image(MEMBER, "gpt-fs");
}

/// With p2 mounted: delete p3, grow p4 to the end, add nothing → Rescan succeeds
/// (p2 is unchanged), kernel = table, the file on p2 is still there.
fn gpt_delete_and_grow_while_another_is_mounted(bed: &Bed) {
    let lp = setup_gpt(bed, "gpt-edit");
    let dev = lp.device.clone();
    bed.rescan(MEMBER, &dev);
    wait_nodes(&dev, &[1, 2, 3, 4]);
    let p2 = format!("{dev}p2");
    run("mkfs.ext4", &["-q", "-F", &p2]).expect_ok("mkfs.ext4");
    let mnt = bed.scratch("mnt-gpt-edit");
    let m = MountGuard::mount(&p2, &mnt);
    fs::write(mnt.join("keep.txt"), b"still here").expect("write");

    let before4 = kernel_partitions(&dev)
        .into_iter()
        .find(|p| p.0 == 4)
        .expect("p4");
    let out = run(
        "sfdisk",
        &[
            "--no-reread",
            "--no-tell-kernel",
            "--force",
            "--lock=no",
            "--delete",
            &dev,
            "3",
        ],
    );
    out.expect_ok("sfdisk --delete 3");
    sfdisk(&dev, &["-N", "4"], &[], ",+\n").expect_ok("grow p4");
    let (_, parts) = table(&dev);
    assert!(parts.iter().all(|p| p.number != 3), "table still has p3");
    let p4 = parts.iter().find(|p| p.number == 4).expect("p4 in table");
    assert!(p4.size > before4.2, "sfdisk did not grow p4");

    let reply = bed.rescan(MEMBER, &dev);
    assert_eq!(reply.len(), 3, "{reply:?}");
    assert_kernel_matches_table(&dev);
    assert_reply_matches_table(&dev, &reply);
    assert!(
        !std::path::Path::new(&format!("{dev}p3")).exists() || wait_gone(&format!("{dev}p3")),
        "{dev}p3 node stays"
    );
    assert_eq!(fs::read(mnt.join("keep.txt")).expect("read"), b"still here");
    drop(m);
    lp.detach();
    bed.delete_image(MEMBER, "gpt-edit");
}

fn wait_gone(node: &str) -> bool {
    let t = Instant::now();
    while std::path::Path::new(node).exists() {
        if t.elapsed() > Duration::from_secs(3) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Shrinking a partition that is mounted → Rescan is Busy and the kernel keeps the old
/// geometry; after umount the same Rescan succeeds.
fn changing_a_mounted_partition_is_busy(bed: &Bed) {
    let lp = setup_gpt(bed, "gpt-busy");
    let dev = lp.device.clone();
    bed.rescan(MEMBER, &dev);
    wait_nodes(&dev, &[1, 2, 3, 4]);
    let p1 = format!("{dev}p1");
    run("mkfs.ext4", &["-q", "-F", &p1]).expect_ok("mkfs.ext4");
    let mnt = bed.scratch("mnt-gpt-busy");
    let m = MountGuard::mount(&p1, &mnt);
    let kernel_before = kernel_partitions(&dev);
    sfdisk(&dev, &["-N", "1"], &[], ",4MiB\n").expect_ok("shrink p1");
    bed.expect_error(MEMBER, "Rescan", &[&gv_str(&dev), "@a{sv} {}"], "Busy");
    assert_eq!(
        kernel_partitions(&dev),
        kernel_before,
        "a Busy Rescan changed the kernel's view"
    );
    drop(m);
    let reply = bed.rescan(MEMBER, &dev);
    assert_kernel_matches_table(&dev);
    assert_reply_matches_table(&dev, &reply);
    lp.detach();
    bed.delete_image(MEMBER, "gpt-busy");
}

const DOS: &str = "label: dos
size=8MiB, type=83
size=8MiB, type=83
type=5
size=8MiB, type=83
size=8MiB, type=82
size=8MiB, type=83
";

/// dos label with two primaries, an extended one filling the rest and three logicals → Rescan → kernel =
/// table (extended as 1 KiB); then delete p2, grow p1 into the gap and delete the middle
/// logical partition (sfdisk renumbers p7 → p6) → Rescan → kernel = table again.
fn dos_with_logical_partitions_rescan_matches_table(bed: &Bed) {
    bed.create_image(MEMBER, "dos", 64 * MIB);
    let lp = DaemonLoop::attach(bed, MEMBER, "dos", &["partscan", "b", "true"]);
    let dev = lp.device.clone();
    sfdisk(&dev, &[], &[], DOS).expect_ok("sfdisk dos");
    let (label, parts) = table(&dev);
    assert_eq!(label, "dos");
    assert_eq!(
        parts.iter().map(|p| p.number).collect::<Vec<_>>(),
        vec![1, 2, 3, 5, 6, 7]
    );
    assert!(kernel_partitions(&dev).is_empty());

    let reply = bed.rescan(MEMBER, &dev);
    assert_kernel_matches_table(&dev);
    assert_reply_matches_table(&dev, &reply);
    wait_nodes(&dev, &[1, 2, 5, 6, 7]);
    let p6 = format!("{dev}p6");
    run("mkfs.ext4", &["-q", "-F", &p6]).expect_ok("mkfs.ext4 on a logical partition");
    {
        let mnt = bed.scratch("mnt-dos");
        let _m = MountGuard::mount(&p6, &mnt);
        fs::write(mnt.join("f"), b"logical").expect("write");
    }

    run(
        "sfdisk",
        &[
            "--no-reread",
            "--no-tell-kernel",
            "--force",
            "--lock=no",
            "--delete",
            &dev,
            "2",
        ],
    )
    .expect_ok("delete p2");
    sfdisk(&dev, &["-N", "1"], &[], ",+\n").expect_ok("grow p1");
    run(
        "sfdisk",
        &[
            "--no-reread",
            "--no-tell-kernel",
            "--force",
            "--lock=no",
            "--delete",
            &dev,
            "6",
        ],
    )
    .expect_ok("delete p6");
    let (_, parts) = table(&dev);
    assert_eq!(
        parts.iter().map(|p| p.number).collect::<Vec<_>>(),
        vec![1, 3, 5, 6],
        "sfdisk renumbered: {parts:?}"
    );
    assert_eq!(
        parts[0].size,
        16 * MIB / 512,
        "p1 grown up to the extended partition"
    );

    let reply = bed.rescan(MEMBER, &dev);
    assert_kernel_matches_table(&dev);
    assert_reply_matches_table(&dev, &reply);
    assert!(wait_gone(&format!("{dev}p7")), "{dev}p7 must be gone");
    lp.detach();
    bed.delete_image(MEMBER, "dos");
}
