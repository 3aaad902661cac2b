//! Loop devices against the real kernel. Needs root and /dev/loop-control: every test
//! FAILS (does not skip) when they are missing. Every device attached here is detached by a
//! Drop guard, by identity (never a device someone else re-used).
//!
//! Run: `cargo test --test loopdev_kernel -- --nocapture` (prints the round-trip timing).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dindhelper::error::{Classify, Kind};
use dindhelper::loopdev::images::{ImageStore, Limits};
use dindhelper::loopdev::{self, ioctl, AttachOptions, Detached, LoopInfo};

fn require_root() {
    assert!(
        Path::new("/dev/loop-control").exists(),
        "/dev/loop-control is missing: these tests need the loop driver"
    );
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (loop ioctls)"
    );
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("dhl-loop-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn sparse(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

fn rw(p: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(p).unwrap()
}

fn identity(f: &File) -> (u64, u64) {
    let st = nix::sys::stat::fstat(f.as_fd()).unwrap();
    (st.st_dev, st.st_ino)
}

/// Detaches on drop, only if still bound to our file.
struct Guard(LoopInfo);

impl Drop for Guard {
    fn drop(&mut self) {
        match loopdev::detach_checked(self.0.number, self.0.backing_dev, self.0.backing_inode) {
            Ok(_) => {}
            Err(e) if e.kind() == Kind::NotFound => {}
            Err(e) => eprintln!("cleanup of {:?} failed: {e}", self.0.device),
        }
    }
}

fn attach(f: &File, opts: &AttachOptions) -> Guard {
    Guard(loopdev::attach_file(f, opts).expect("attach"))
}

fn ours(ids: &[(u64, u64)]) -> Vec<LoopInfo> {
    loopdev::list_attached()
        .unwrap()
        .into_iter()
        .filter(|l| ids.contains(&(l.backing_dev, l.backing_inode)))
        .collect()
}

/// Wait until none of these files is bound. A detach is immediate unless someone holds the
/// device open at that moment (e.g. another test's `list_attached`, which opens each device
/// for LOOP_GET_STATUS64): then the kernel clears it at that holder's close.
fn assert_none_bound(ids: &[(u64, u64)]) {
    let t = Instant::now();
    loop {
        let left = ours(ids);
        if left.is_empty() {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(2), "leaked: {left:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn sysfs(n: u32, rel: &str) -> String {
    std::fs::read_to_string(format!("/sys/block/loop{n}/{rel}"))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn write_through_device_reads_back_from_file() {
    require_root();
    let d = tmpdir();
    let p = sparse(d.path(), "rt.img", 4 << 20);
    let f = rw(&p);
    let g = attach(
        &f,
        &AttachOptions {
            label: "dhl-rt".into(),
            ..Default::default()
        },
    );
    let i = &g.0;
    assert_eq!(i.device, PathBuf::from(format!("/dev/loop{}", i.number)));
    assert_eq!(i.backing_file, p);
    assert_eq!((i.backing_dev, i.backing_inode), identity(&f));
    assert_eq!(i.size, 4 << 20);
    assert!(!i.read_only && !i.partscan && !i.autoclear);
    assert!(i.is_ours());
    assert_eq!(i.label, "dindhelper:dhl-rt");
    assert_eq!(loopdev::info(i.number).unwrap().as_ref(), Some(i));

    let data: Vec<u8> = (0..8192u32).map(|x| (x * 7 + 3) as u8).collect();
    {
        let mut dev = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&i.device)
            .unwrap();
        // O_DIRECT needs an aligned buffer: use a page-aligned Vec via a larger allocation.
        let mut buf = vec![0u8; 8192 + 4096];
        let off = buf.as_ptr().align_offset(4096);
        buf[off..off + 8192].copy_from_slice(&data);
        dev.seek(SeekFrom::Start(65536)).unwrap();
        dev.write_all(&buf[off..off + 8192]).unwrap();
        dev.sync_all().unwrap();
    }
    let mut back = vec![0u8; 8192];
    File::open(&p)
        .unwrap()
        .read_exact_at(&mut back, 65536)
        .unwrap();
    assert_eq!(back, data);

    let n = i.number;
    assert_eq!(loopdev::detach(n).unwrap(), Detached::Cleared);
    assert_none_bound(&[identity(&f)]);
    // Twice: NotFound (checked, so a device re-used meanwhile by someone else is left alone).
    let e = loopdev::detach_checked(n, i.backing_dev, i.backing_inode).unwrap_err();
    assert_eq!(e.kind(), Kind::NotFound);
}

#[test]
fn readonly_fd_gives_readonly_device() {
    require_root();
    let d = tmpdir();
    let p = sparse(d.path(), "ro.img", 2 << 20);
    let f = File::open(&p).unwrap(); // O_RDONLY, read_only not asked
    let g = attach(&f, &AttachOptions::default());
    assert!(g.0.read_only);
    assert_eq!(sysfs(g.0.number, "ro"), "1");
    // Writing must fail: either the open for writing or the write itself.
    let res = OpenOptions::new()
        .write(true)
        .open(&g.0.device)
        .and_then(|mut dev| dev.write_all(&[1u8; 512]).and_then(|_| dev.sync_all()));
    assert!(res.is_err(), "write to a read-only loop device succeeded");

    // Asked read-only on a read-write fd: also read-only.
    let f2 = rw(&p);
    let g2 = attach(
        &f2,
        &AttachOptions {
            read_only: true,
            ..Default::default()
        },
    );
    assert!(g2.0.read_only);
    assert_eq!(sysfs(g2.0.number, "ro"), "1");
}

#[test]
fn partscan_flag_visible_in_sysfs() {
    require_root();
    let d = tmpdir();
    let p = sparse(d.path(), "ps.img", 2 << 20);
    let f = rw(&p);
    let g = attach(
        &f,
        &AttachOptions {
            partscan: true,
            ..Default::default()
        },
    );
    assert!(g.0.partscan);
    assert_eq!(sysfs(g.0.number, "loop/partscan"), "1");
    let g2 = attach(&f, &AttachOptions::default());
    assert!(!g2.0.partscan);
    assert_eq!(sysfs(g2.0.number, "loop/partscan"), "0");
}

#[test]
fn offset_and_size_are_honored() {
    require_root();
    let d = tmpdir();
    let p = sparse(d.path(), "off.img", 4 << 20);
    let f = rw(&p);
    let marker = b"dindhelper offset marker";
    f.write_all_at(marker, 1 << 20).unwrap();
    f.sync_all().unwrap();
    let g = attach(
        &f,
        &AttachOptions {
            offset: 1 << 20,
            size_limit: 1 << 20,
            ..Default::default()
        },
    );
    assert_eq!(g.0.offset, 1 << 20);
    assert_eq!(g.0.size_limit, 1 << 20);
    assert_eq!(g.0.size, 1 << 20);
    assert_eq!(sysfs(g.0.number, "loop/offset"), (1u64 << 20).to_string());
    assert_eq!(
        sysfs(g.0.number, "loop/sizelimit"),
        (1u64 << 20).to_string()
    );
    let mut buf = vec![0u8; marker.len()];
    File::open(&g.0.device)
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    assert_eq!(&buf, marker);

    for (off, lim) in [(100, 0), (0, 1000), (4 << 20, 0), (3 << 20, 2 << 20)] {
        let e = loopdev::attach_file(
            &f,
            &AttachOptions {
                offset: off,
                size_limit: lim,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(e.kind(), Kind::InvalidArgs, "{off} {lim}: {e}");
    }
    assert_eq!(ours(&[identity(&f)]).len(), 1);
}

#[test]
fn non_regular_fds_are_rejected_without_leaking() {
    require_root();
    let d = tmpdir();
    let opts = AttachOptions {
        label: "dhl-bad".into(),
        ..Default::default()
    };
    let count = || {
        loopdev::list_attached()
            .unwrap()
            .iter()
            .filter(|l| l.label == "dindhelper:dhl-bad")
            .count()
    };
    let before = count();

    let dir = File::open(d.path()).unwrap();
    let (s1, _s2) = std::os::unix::net::UnixStream::pair().unwrap();
    let sock = File::from(OwnedFd::from(s1));
    let null = rw(Path::new("/dev/null"));
    let fifo_p = d.path().join("fifo");
    nix::unistd::mkfifo(&fifo_p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let fifo = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo_p)
        .unwrap();
    let img = sparse(d.path(), "wo.img", 1 << 20);
    let wo = OpenOptions::new().write(true).open(&img).unwrap();
    let opath = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(&img)
        .unwrap();
    let empty = File::open(sparse(d.path(), "empty.img", 0)).unwrap();
    // A block device: one of our own loop devices.
    let backing = rw(&sparse(d.path(), "blk.img", 1 << 20));
    let g = attach(&backing, &AttachOptions::default());
    let blk = File::open(&g.0.device).unwrap();

    for (what, f, needle) in [
        ("directory", &dir, "a directory"),
        ("socket", &sock, "a socket"),
        ("/dev/null", &null, "a character device"),
        ("fifo", &fifo, "a FIFO"),
        ("block device", &blk, "a block device"),
        ("write-only", &wo, "write-only"),
        ("O_PATH", &opath, "O_PATH"),
        ("empty", &empty, "empty"),
    ] {
        let e = loopdev::attach_file(f, &opts).unwrap_err();
        assert_eq!(e.kind(), Kind::InvalidArgs, "{what}: {e}");
        assert!(e.to_string().contains(needle), "{what}: {e}");
        println!("{what}: {e}");
    }
    assert_eq!(count(), before, "a device was left attached");
}

#[test]
fn detach_of_open_device_is_deferred_until_last_close() {
    require_root();
    let d = tmpdir();
    let p = sparse(d.path(), "hold.img", 1 << 20);
    let f = rw(&p);
    let g = attach(&f, &AttachOptions::default());
    let holder = File::open(&g.0.device).unwrap();
    assert_eq!(loopdev::detach(g.0.number).unwrap(), Detached::Deferred);
    let now = loopdev::info(g.0.number).unwrap().unwrap();
    assert!(now.autoclear, "kernel should have set autoclear");
    drop(holder);
    let t = Instant::now();
    while !ours(&[identity(&f)]).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "not cleared after last close"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(loopdev::detach(999_999).unwrap_err().kind(), Kind::NotFound);
}

#[test]
fn concurrent_attach_detach_leaks_nothing() {
    require_root();
    let d = tmpdir();
    const THREADS: usize = 8;
    const ROUNDS: usize = 20;
    let files: Vec<File> = (0..THREADS + 1)
        .map(|t| rw(&sparse(d.path(), &format!("c{t}.img"), 1 << 20)))
        .collect();
    let ids: Vec<_> = files.iter().map(identity).collect();
    assert!(ours(&ids).is_empty());
    let retries_before = loopdev::busy_retries_total();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        // A "foreign process": raw GET_FREE + LOOP_CONFIGURE outside our attach lock, so the
        // free-device race really happens.
        let foreign = &files[THREADS];
        let stop = &stop;
        let thief = s.spawn(move || {
            let ctl = rw(Path::new("/dev/loop-control"));
            let mut won = 0;
            let mut busy = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n = ioctl::ctl_get_free(ctl.as_fd()).unwrap();
                let Ok(dev) = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(format!("/dev/loop{n}"))
                else {
                    continue;
                };
                let mut cfg = ioctl::empty_config();
                cfg.fd = std::os::fd::AsRawFd::as_raw_fd(foreign) as u32;
                ioctl::set_file_name(&mut cfg.info, "dindhelper:dhl-thief");
                match ioctl::configure(dev.as_fd(), &cfg) {
                    Ok(()) => {
                        won += 1;
                        drop(dev);
                        let st = identity(foreign);
                        loopdev::detach_checked(n, st.0, st.1).unwrap();
                    }
                    Err(nix::errno::Errno::EBUSY) => busy += 1,
                    Err(e) => panic!("thief: {e}"),
                }
            }
            (won, busy)
        });
        let workers: Vec<_> = files[..THREADS]
            .iter()
            .map(|f| {
                s.spawn(move || {
                    for _ in 0..ROUNDS {
                        let i = loopdev::attach_file(f, &AttachOptions::default()).unwrap();
                        let r = loopdev::detach_checked(i.number, i.backing_dev, i.backing_inode)
                            .unwrap();
                        assert_eq!(r, Detached::Cleared);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (won, busy) = thief.join().unwrap();
        println!(
            "concurrency: {} attaches by {THREADS} threads; foreign thread won {won}, saw EBUSY {busy}; \
             our retries after losing the race: {}",
            THREADS * ROUNDS,
            loopdev::busy_retries_total() - retries_before
        );
    });
    assert_none_bound(&ids);
}

#[test]
fn round_trip_time_vs_losetup() {
    require_root();
    let d = tmpdir();
    let p = sparse(d.path(), "bench.img", 16 << 20);
    let f = rw(&p);
    const N: u32 = 50;
    // warm-up
    let i = loopdev::attach_file(&f, &AttachOptions::default()).unwrap();
    loopdev::detach_checked(i.number, i.backing_dev, i.backing_inode).unwrap();

    let (mut t_attach, mut t_detach) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..N {
        let t = Instant::now();
        let i = loopdev::attach_file(&f, &AttachOptions::default()).unwrap();
        t_attach += t.elapsed();
        let _g = Guard(i.clone());
        let t = Instant::now();
        assert_eq!(
            loopdev::detach_checked(i.number, i.backing_dev, i.backing_inode).unwrap(),
            Detached::Cleared
        );
        t_detach += t.elapsed();
    }
    let ours_us = (t_attach + t_detach).as_micros() / N as u128;

    let t = Instant::now();
    for _ in 0..N {
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8(out.stdout).unwrap();
        let st = std::process::Command::new("losetup")
            .args(["-d", dev.trim()])
            .status()
            .unwrap();
        assert!(st.success());
    }
    let losetup_us = t.elapsed().as_micros() / N as u128;
    println!(
        "attach+detach round trip: loopdev {ours_us} us (attach {} us, detach {} us), losetup -f --show + losetup -d {losetup_us} us \
         (ratio {:.3}, {N} runs each)",
        t_attach.as_micros() / N as u128,
        t_detach.as_micros() / N as u128,
        ours_us as f64 / losetup_us as f64
    );
    assert_none_bound(&[identity(&f)]);
}

#[test]
fn image_store_attach_and_delete_busy() {
    require_root();
    let d = tmpdir();
    let store = ImageStore::new(d.path().join("images"), Limits::default()).unwrap();
    let img = store.create(12345, "disk", 2 << 20).unwrap();
    let p = d.path().join("images/12345/disk.img");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&p).unwrap().uid(), 12345);
    let f = store.open(12345, "disk", false).unwrap();
    let g = attach(
        &f,
        &AttachOptions {
            label: "12345:disk".into(),
            ..Default::default()
        },
    );
    assert_eq!((g.0.backing_dev, g.0.backing_inode), (img.dev, img.inode));
    assert_eq!(
        store
            .find_by_identity(g.0.backing_dev, g.0.backing_inode)
            .unwrap()
            .map(|i| i.name),
        Some("disk".to_owned())
    );
    let e = store.delete(12345, "disk").unwrap_err();
    assert_eq!(e.kind(), Kind::Busy, "{e}");
    drop(g);
    store.delete(12345, "disk").unwrap();
    assert!(!p.exists());
}
