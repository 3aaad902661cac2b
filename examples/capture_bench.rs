//! Capture benchmark helper (root). Two modes:
//!   capture_bench flood ADDR:PORT PPS SECS [SIZE] UDP sender (run inside the sending netns)
//!   capture_bench capture PID SECS FILE FILTER  capture in PID's netns, print stats
//! Driven by `bench/capture.sh`, which runs tcpdump on the same traffic in the same run.

use std::fs::File;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use dindhelper::capture::{self, CaptureOptions};
use dindhelper::netns::Target;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(String::as_str) {
        Some("flood") => {
            let pps: u64 = a[3].parse().unwrap();
            let secs: f64 = a[4].parse().unwrap();
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(&a[2]).unwrap();
            let size: usize = a.get(5).map_or(64, |s| s.parse().unwrap());
            let buf = vec![0x5au8; size];
            let t0 = Instant::now();
            let end = Duration::from_secs_f64(secs);
            let mut sent = 0u64;
            while t0.elapsed() < end {
                // pps == 0: as fast as possible
                let due = if pps == 0 {
                    sent + 64
                } else {
                    (t0.elapsed().as_secs_f64() * pps as f64) as u64
                };
                while sent < due {
                    let _ = s.send(&buf);
                    sent += 1;
                }
                if pps != 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            println!("sent {sent} in {:.2}s", t0.elapsed().as_secs_f64());
        }
        Some("capture") => {
            let pid: i32 = a[2].parse().unwrap();
            let secs: f64 = a[3].parse().unwrap();
            let h = capture::start(
                Target::of_pid(pid).unwrap(),
                CaptureOptions {
                    filter: Some(a[5].clone()),
                    duration: Some(Duration::from_secs_f64(secs)),
                    ..Default::default()
                },
                File::create(&a[4]).unwrap(),
            )
            .unwrap();
            let f = h.wait();
            println!(
                "dindhelper: {} packets captured, {} dropped by kernel ({:?})",
                f.stats.packets, f.stats.dropped, f.reason
            );
        }
        _ => eprintln!("usage: see the header of examples/capture_bench.rs"),
    }
}
