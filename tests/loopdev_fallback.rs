//! The pre-5.8 attach path (LOOP_SET_FD + LOOP_SET_STATUS64), forced on this kernel. Its
//! own test binary because the switch is process-wide. Needs root and /dev/loop-control
//! (fails, does not skip, without them).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use dindhelper::error::{Classify, Kind};
use dindhelper::loopdev::{self, AttachOptions, Detached};

#[test]
fn legacy_attach_honors_every_option() {
    assert!(
        Path::new("/dev/loop-control").exists(),
        "/dev/loop-control is missing"
    );
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    loopdev::use_legacy_attach(true);

    let d = tempfile::Builder::new()
        .prefix("dhl-loopfb-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let p = d.path().join("fb.img");
    let f = File::create(&p).unwrap();
    f.set_len(4 << 20).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    f.write_all_at(b"legacy marker", 1 << 20).unwrap();
    let st = nix::sys::stat::fstat(f.as_fd()).unwrap();

    // read-write, offset + size, partscan, label
    let i = loopdev::attach_file(
        &f,
        &AttachOptions {
            partscan: true,
            offset: 1 << 20,
            size_limit: 2 << 20,
            label: "dhl-fallback".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let cleanup = |i: &loopdev::LoopInfo| {
        let _ = loopdev::detach_checked(i.number, i.backing_dev, i.backing_inode);
    };
    let res = std::panic::catch_unwind(|| {
        assert_eq!((i.backing_dev, i.backing_inode), (st.st_dev, st.st_ino));
        assert_eq!(i.size, 2 << 20);
        assert_eq!((i.offset, i.size_limit), (1 << 20, 2 << 20));
        assert!(i.partscan && !i.read_only);
        assert_eq!(i.label, "dindhelper:dhl-fallback");
        let mut buf = [0u8; 13];
        File::open(&i.device).unwrap().read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"legacy marker");
        let mut dev = OpenOptions::new().write(true).open(&i.device).unwrap();
        dev.write_all(&[0xAB; 512]).unwrap();
        dev.sync_all().unwrap();
        let mut back = [0u8; 512];
        f.read_exact_at(&mut back, 1 << 20).unwrap();
        assert_eq!(back, [0xAB; 512]);
    });
    cleanup(&i);
    res.unwrap();

    // read-only asked on a read-write fd: the fallback reopens the file read-only.
    let i = loopdev::attach_file(
        &f,
        &AttachOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let res = std::panic::catch_unwind(|| {
        assert!(i.read_only);
        let w = OpenOptions::new()
            .write(true)
            .open(&i.device)
            .and_then(|mut d| d.write_all(&[1u8; 512]).and_then(|_| d.sync_all()));
        assert!(w.is_err(), "write to read-only device succeeded");
    });
    assert_eq!(
        loopdev::detach_checked(i.number, i.backing_dev, i.backing_inode).unwrap(),
        Detached::Cleared
    );
    res.unwrap();

    // Bad fds are still rejected before any ioctl.
    let dir = File::open(d.path()).unwrap();
    assert_eq!(
        loopdev::attach_file(&dir, &AttachOptions::default())
            .unwrap_err()
            .kind(),
        Kind::InvalidArgs
    );
}
