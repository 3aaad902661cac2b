//! Classic pcap file format (not pcapng): a 24-byte global header, then per packet a 16-byte
//! record header and the captured bytes. Written in host byte order, as libpcap does; readers
//! detect the order from the magic. Microsecond magic `a1b2c3d4`, nanosecond `a1b23c4d`.

use std::io::{self, Write};

/// DLT/LINKTYPE numbers used here.
pub const LINKTYPE_ETHERNET: u32 = 1;
pub const LINKTYPE_RAW: u32 = 101;
pub const LINKTYPE_LINUX_SLL: u32 = 113;

pub const MAGIC_MICROS: u32 = 0xa1b2_c3d4;
pub const MAGIC_NANOS: u32 = 0xa1b2_3c4d;

pub const GLOBAL_HEADER_LEN: u64 = 24;
pub const RECORD_HEADER_LEN: u64 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TsResolution {
    Micros,
    Nanos,
}

/// The 24-byte global header.
pub fn global_header(linktype: u32, snaplen: u32, res: TsResolution) -> [u8; 24] {
    let magic = match res {
        TsResolution::Micros => MAGIC_MICROS,
        TsResolution::Nanos => MAGIC_NANOS,
    };
    let mut h = [0u8; 24];
    h[0..4].copy_from_slice(&magic.to_ne_bytes());
    h[4..6].copy_from_slice(&2u16.to_ne_bytes()); // version major
    h[6..8].copy_from_slice(&4u16.to_ne_bytes()); // version minor
                                                  // 8..12 thiszone = 0, 12..16 sigfigs = 0
    h[16..20].copy_from_slice(&snaplen.to_ne_bytes());
    h[20..24].copy_from_slice(&linktype.to_ne_bytes());
    h
}

/// The 16-byte record header; `nsec` is converted to the file's resolution.
pub fn record_header(sec: u32, nsec: u32, caplen: u32, len: u32, res: TsResolution) -> [u8; 16] {
    let frac = match res {
        TsResolution::Micros => nsec / 1000,
        TsResolution::Nanos => nsec,
    };
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&sec.to_ne_bytes());
    h[4..8].copy_from_slice(&frac.to_ne_bytes());
    h[8..12].copy_from_slice(&caplen.to_ne_bytes());
    h[12..16].copy_from_slice(&len.to_ne_bytes());
    h
}

/// Streams pcap into any writer, counting bytes and packets written.
pub struct PcapWriter<W: Write> {
    out: W,
    res: TsResolution,
    snaplen: u32,
    pub bytes: u64,
    pub packets: u64,
}

impl<W: Write> PcapWriter<W> {
    pub fn new(mut out: W, linktype: u32, snaplen: u32, res: TsResolution) -> io::Result<Self> {
        out.write_all(&global_header(linktype, snaplen, res))?;
        Ok(PcapWriter {
            out,
            res,
            snaplen,
            bytes: GLOBAL_HEADER_LEN,
            packets: 0,
        })
    }

    /// Bytes one packet will take in the file (record header + data cut to snaplen).
    pub fn record_size(&self, data_len: usize) -> u64 {
        RECORD_HEADER_LEN + data_len.min(self.snaplen as usize) as u64
    }

    /// Write one packet made of `parts` (e.g. a synthesized link header + the payload),
    /// truncated to snaplen; `orig_len` is the length on the wire.
    pub fn write_packet(
        &mut self,
        sec: u32,
        nsec: u32,
        orig_len: u32,
        parts: &[&[u8]],
    ) -> io::Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let caplen = total.min(self.snaplen as usize);
        self.out.write_all(&record_header(
            sec,
            nsec,
            caplen as u32,
            orig_len.max(caplen as u32),
            self.res,
        ))?;
        let mut left = caplen;
        for p in parts {
            let n = p.len().min(left);
            self.out.write_all(&p[..n])?;
            left -= n;
        }
        self.bytes += RECORD_HEADER_LEN + caplen as u64;
        self.packets += 1;
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_header_bytes_micro_ethernet() {
        let h = global_header(LINKTYPE_ETHERNET, 65535, TsResolution::Micros);
        // little-endian host (x86_64): what `tcpdump -w` writes
        #[cfg(target_endian = "little")]
        assert_eq!(
            h,
            [
                0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 1, 0,
                0, 0
            ]
        );
        assert_eq!(
            u32::from_ne_bytes(h[0..4].try_into().unwrap()),
            MAGIC_MICROS
        );
    }

    #[test]
    fn global_header_bytes_nano_sll() {
        let h = global_header(LINKTYPE_LINUX_SLL, 262144, TsResolution::Nanos);
        #[cfg(target_endian = "little")]
        assert_eq!(
            h,
            [
                0x4d, 0x3c, 0xb2, 0xa1, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 113, 0, 0,
                0
            ]
        );
    }

    #[test]
    fn record_header_converts_resolution() {
        let m = record_header(10, 123_456_789, 60, 1500, TsResolution::Micros);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 10);
        assert_eq!(u32::from_ne_bytes(m[4..8].try_into().unwrap()), 123_456);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 60);
        assert_eq!(u32::from_ne_bytes(m[12..16].try_into().unwrap()), 1500);
        let n = record_header(10, 123_456_789, 60, 1500, TsResolution::Nanos);
        assert_eq!(u32::from_ne_bytes(n[4..8].try_into().unwrap()), 123_456_789);
    }

    #[test]
    fn writer_truncates_to_snaplen_and_counts() {
        let mut w =
            PcapWriter::new(Vec::new(), LINKTYPE_LINUX_SLL, 20, TsResolution::Micros).unwrap();
        w.write_packet(1, 2000, 100, &[&[0xaa; 16], &[0xbb; 84]])
            .unwrap();
        assert_eq!(w.packets, 1);
        assert_eq!(w.bytes, 24 + 16 + 20);
        let buf = w.into_inner();
        assert_eq!(buf.len(), 24 + 16 + 20);
        assert_eq!(u32::from_ne_bytes(buf[32..36].try_into().unwrap()), 20); // caplen
        assert_eq!(u32::from_ne_bytes(buf[36..40].try_into().unwrap()), 100); // len
        assert_eq!(&buf[40..56], &[0xaa; 16]);
        assert_eq!(&buf[56..60], &[0xbb; 4]);
    }
}
