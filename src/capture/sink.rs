//! The capture sink: a writer thread with its own bounded queue between the session thread
//! and the file or caller's fd, so a sink that does not take data never blocks the
//! session (and through it Stop, DestroyInstance and daemon shutdown).
//!
//! Kernel interfaces: `write(2)` on the sink, `poll(2)` `POLLOUT`, `send(2)`
//! `MSG_DONTWAIT`, `fstat(2)` for the file type.
//!
//! Traps:
//! - The caller's fd shares its open file description with the caller: setting O_NONBLOCK
//!   on it would change the caller's copy too. So pipes/FIFOs are written after a
//!   `POLLOUT` in pieces of at most `PIPE_BUF` (a pipe with one free slot takes that much
//!   without blocking), sockets with `send(MSG_DONTWAIT)`; both poll in 100 ms steps and
//!   give up when the session is over.
//! - A regular file on FUSE (or a hung NFS mount) can block `write` for good; O_NONBLOCK
//!   means nothing for regular files. Then only the writer thread hangs: the session ends
//!   with `sink-stalled`, the daemon goes on; the thread ends when the write returns.
//! - "Stalled" = the queue is full (or the session is ending with data queued) and the
//!   writer has made no progress for [`STALL`]; the session then ends with reason
//!   `sink-stalled` and the queued data is dropped.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Bytes queued between the session and the writer thread.
pub const QUEUE_BYTES: usize = 8 << 20;
/// No progress for this long with a full queue ends the session (`sink-stalled`).
pub const STALL: Duration = Duration::from_secs(2);
/// How long the end of a session waits for the queue to drain.
pub const END_DRAIN: Duration = Duration::from_millis(500);

/// The error a stalled sink reports (its message is matched by [`is_stall`]).
const STALL_MSG: &str = "sink-stalled";

pub fn is_stall(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::TimedOut && e.to_string() == STALL_MSG
}

fn stall() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, STALL_MSG)
}

#[derive(Default)]
struct State {
    chunks: VecDeque<Vec<u8>>,
    queued: usize,
    /// No more data will come (the session ended).
    closed: bool,
    /// The writer thread stopped with this error (or finished).
    error: Option<(io::ErrorKind, String)>,
    writer_done: bool,
}

struct Shared {
    st: Mutex<State>,
    /// Signalled when data arrives or the queue is closed.
    data: Condvar,
    /// Signalled when the writer made progress or ended.
    space: Condvar,
    last_progress: Mutex<Instant>,
    cancel: AtomicBool,
}

impl Shared {
    fn progress(&self) {
        *self.last_progress.lock().expect("progress") = Instant::now();
    }
    fn idle_for(&self) -> Duration {
        self.last_progress.lock().expect("progress").elapsed()
    }
}

/// What kind of object the sink is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pipe,
    Socket,
    Other,
}

fn kind_of(f: &File) -> Kind {
    match nix::sys::stat::fstat(f.as_fd()) {
        Ok(st) => match st.st_mode & libc::S_IFMT {
            libc::S_IFIFO => Kind::Pipe,
            libc::S_IFSOCK => Kind::Socket,
            _ => Kind::Other,
        },
        Err(_) => Kind::Other,
    }
}

/// `io::Write` for the session thread: `write` collects, `flush` hands the collected
/// bytes to the writer thread (waiting at most [`STALL`] for room).
pub struct QueueSink {
    shared: Arc<Shared>,
    buf: Vec<u8>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The session's stop eventfd: a Stop while waiting for room ends the wait at once.
    stop: Option<Arc<std::os::fd::OwnedFd>>,
}

impl QueueSink {
    /// `stop`: an eventfd that, once readable, means "the session is ending" (waiting for
    /// room is cut short so Stop answers at once).
    pub fn new(file: File, stop: Option<Arc<std::os::fd::OwnedFd>>) -> io::Result<QueueSink> {
        let shared = Arc::new(Shared {
            st: Mutex::new(State::default()),
            data: Condvar::new(),
            space: Condvar::new(),
            last_progress: Mutex::new(Instant::now()),
            cancel: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("capture-sink".into())
            .spawn(move || writer(s, file))?;
        Ok(QueueSink {
            shared,
            buf: Vec::with_capacity(256 << 10),
            thread: Some(thread),
            stop,
        })
    }

    fn stop_requested(&self) -> bool {
        let Some(fd) = &self.stop else { return false };
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        unsafe { libc::poll(&mut p, 1, 0) == 1 && p.revents & libc::POLLIN != 0 }
    }

    /// Queue what is buffered. Err: the writer failed (its error) or is stalled.
    fn push(&mut self, wait: Duration) -> io::Result<()> {
        if self.buf.is_empty() {
            return self.writer_error();
        }
        let n = self.buf.len();
        let mut st = self.shared.st.lock().expect("sink");
        loop {
            if let Some((kind, msg)) = &st.error {
                return Err(io::Error::new(*kind, msg.clone()));
            }
            if st.queued == 0 {
                // The writer's clock starts when it has work again.
                self.shared.progress();
                break;
            }
            if st.queued + n <= QUEUE_BYTES {
                break;
            }
            let idle = self.shared.idle_for();
            if idle >= wait || self.stop_requested() {
                return Err(stall());
            }
            st = self
                .shared
                .space
                .wait_timeout(st, (wait - idle).min(Duration::from_millis(50)))
                .expect("sink")
                .0;
        }
        st.queued += n;
        st.chunks.push_back(std::mem::take(&mut self.buf));
        self.buf.reserve(256 << 10);
        drop(st);
        self.shared.data.notify_one();
        Ok(())
    }

    fn writer_error(&self) -> io::Result<()> {
        match &self.shared.st.lock().expect("sink").error {
            Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
            None => Ok(()),
        }
    }

    /// End of the session: queue the rest and wait up to [`END_DRAIN`] until the writer
    /// has written everything. A sink that does not take it is `sink-stalled` (the rest
    /// is dropped and the writer told to give up).
    pub fn finish(&mut self) -> io::Result<()> {
        let r = self.push(Duration::ZERO).and_then(|()| {
            let deadline = Instant::now() + END_DRAIN;
            let mut st = self.shared.st.lock().expect("sink");
            st.closed = true;
            self.shared.data.notify_one();
            loop {
                if let Some((kind, msg)) = &st.error {
                    return Err(io::Error::new(*kind, msg.clone()));
                }
                if st.queued == 0 {
                    return Ok(());
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(stall());
                }
                st = self
                    .shared
                    .space
                    .wait_timeout(st, deadline - now)
                    .expect("sink")
                    .0;
            }
        });
        self.close();
        r
    }

    fn close(&mut self) {
        {
            let mut st = self.shared.st.lock().expect("sink");
            st.closed = true;
            if st.queued > 0 {
                self.shared.cancel.store(true, Ordering::SeqCst);
            }
        }
        self.shared.data.notify_one();
        // Join only a writer that is done: one stuck in a FUSE write is left behind.
        if let Some(t) = self.thread.take() {
            if self.shared.st.lock().expect("sink").writer_done {
                let _ = t.join();
            }
        }
    }
}

impl Write for QueueSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.push(STALL)
    }
}

impl Drop for QueueSink {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shared.cancel.store(true, Ordering::SeqCst);
            self.close();
        }
    }
}

fn writer(shared: Arc<Shared>, mut file: File) {
    let kind = kind_of(&file);
    let result = loop {
        let chunk = {
            let mut st = shared.st.lock().expect("sink");
            loop {
                if shared.cancel.load(Ordering::SeqCst) {
                    break None;
                }
                if let Some(c) = st.chunks.pop_front() {
                    break Some(c);
                }
                if st.closed {
                    break None;
                }
                st = shared
                    .data
                    .wait_timeout(st, Duration::from_millis(100))
                    .expect("sink")
                    .0;
            }
        };
        let Some(chunk) = chunk else { break Ok(()) };
        let r = write_chunk(&shared, &mut file, kind, &chunk);
        {
            // The error is recorded in the same step as the count: whoever sees the
            // queue empty also sees why.
            let mut st = shared.st.lock().expect("sink");
            st.queued -= chunk.len();
            if let Err(e) = &r {
                st.error = Some((e.kind(), e.to_string()));
            }
        }
        shared.space.notify_all();
        if let Err(e) = r {
            break Err(e);
        }
    };
    let mut st = shared.st.lock().expect("sink");
    if let (Err(e), None) = (result, &st.error) {
        st.error = Some((e.kind(), e.to_string()));
    }
    st.writer_done = true;
    drop(st);
    shared.space.notify_all();
}

/// Write all of `data`, never blocking for long on a pipe or socket (see the header).
fn write_chunk(shared: &Shared, file: &mut File, kind: Kind, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        if shared.cancel.load(Ordering::SeqCst) {
            return Err(stall());
        }
        let n = match kind {
            Kind::Other => file.write(data),
            Kind::Pipe | Kind::Socket => {
                let mut p = libc::pollfd {
                    fd: file.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                let r = unsafe { libc::poll(&mut p, 1, 100) };
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if r == 0 {
                    continue;
                }
                if p.revents & (libc::POLLERR | libc::POLLHUP) != 0
                    && p.revents & libc::POLLOUT == 0
                {
                    return Err(io::Error::from(io::ErrorKind::BrokenPipe));
                }
                if kind == Kind::Pipe {
                    let len = data.len().min(libc::PIPE_BUF);
                    file.write(&data[..len])
                } else {
                    // SAFETY: send on a valid socket fd with a valid buffer.
                    let r = unsafe {
                        libc::send(
                            file.as_raw_fd(),
                            data.as_ptr().cast(),
                            data.len(),
                            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                        )
                    };
                    if r < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(r as usize)
                    }
                }
            }
        };
        match n {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => {
                data = &data[n..];
                shared.progress();
            }
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fds.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh fds we own.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn a_read_pipe_gets_every_byte() {
        let (mut r, w) = pipe();
        let mut s = QueueSink::new(w, None).unwrap();
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            r.read_to_end(&mut v).unwrap();
            v
        });
        for i in 0..64u8 {
            s.write_all(&[i; 10_000]).unwrap();
            s.flush().unwrap();
        }
        s.finish().unwrap();
        drop(s);
        let v = reader.join().unwrap();
        assert_eq!(v.len(), 640_000);
        assert!(v[..10_000].iter().all(|&b| b == 0) && v[630_000..].iter().all(|&b| b == 63));
    }

    #[test]
    fn a_pipe_nobody_reads_never_blocks_the_session() {
        let (_r, w) = pipe();
        let mut s = QueueSink::new(w, None).unwrap();
        let t = Instant::now();
        let mut err = None;
        // More than the queue and the pipe hold: the flush that finds no room fails
        // after STALL, never blocks for good.
        for _ in 0..20 {
            s.write_all(&vec![7u8; 1 << 20]).unwrap();
            if let Err(e) = s.flush() {
                err = Some(e);
                break;
            }
        }
        let e = err.expect("a stalled sink must fail");
        assert!(is_stall(&e), "{e}");
        assert!(
            t.elapsed() < STALL + Duration::from_secs(2),
            "{:?}",
            t.elapsed()
        );
        let t = Instant::now();
        assert!(s.finish().is_err());
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }

    #[test]
    fn a_closed_reader_is_an_error_not_a_stall() {
        let (r, w) = pipe();
        drop(r);
        let mut s = QueueSink::new(w, None).unwrap();
        s.write_all(b"abc").unwrap();
        s.flush().unwrap();
        let e = s.finish().unwrap_err();
        assert!(!is_stall(&e), "{e}");
    }
}
