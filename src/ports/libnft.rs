//! libnftables in process: the library behind the `nft` program (`libnftables.so.1`,
//! shipped by the same package), loaded with `dlopen` so the daemon neither links against
//! it nor needs it for the iptables backends. The nftables backend writes through it; when
//! it cannot be loaded, through the `nft` program (same text, same semantics).
//!
//! Why: a write round through `nft -f -` costs one process start (~5 ms on a loaded
//! 2-core machine); the library call costs the netlink transaction only. With 10
//! concurrent callers the commit step runs ~100 rounds for 1000 Publish calls, so the
//! process start alone would eat the 0.3 s budget (measured in the ports bench).
//!
//! Traps:
//! - The netlink socket belongs to the network namespace of the thread that opens it, and
//!   libnftables may open it lazily. So one OS thread per context enters the namespace
//!   once and runs every command; callers talk to it through a channel (never a tokio
//!   worker in another namespace).
//! - An `nft_ctx` is not thread-safe: only that thread touches it.
//! - Output and errors are buffered in the context (`nft_ctx_buffer_output/error`); the
//!   pointers returned are valid until the next command, so they are copied at once.
//! - The text is the same as for `nft -f -`: the library parses it (one transaction per
//!   call; a failing line cancels all of it).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::mpsc;

use tokio::sync::oneshot;

use super::iptables::NetnsContext;

type Job = (String, oneshot::Sender<Result<String, String>>);

/// A libnftables context living on its own thread inside a network namespace.
#[derive(Debug)]
pub struct LibNft {
    tx: std::sync::Mutex<mpsc::Sender<Job>>,
}

struct Api {
    ctx: *mut c_void,
    free: unsafe extern "C" fn(*mut c_void),
    run: unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int,
    out: unsafe extern "C" fn(*mut c_void) -> *const c_char,
    err: unsafe extern "C" fn(*mut c_void) -> *const c_char,
}

impl Drop for Api {
    fn drop(&mut self) {
        // SAFETY: ctx came from nft_ctx_new and is freed once, on its own thread.
        unsafe { (self.free)(self.ctx) }
    }
}

unsafe fn sym(lib: *mut c_void, name: &CStr) -> Result<*mut c_void, String> {
    let p = libc::dlsym(lib, name.as_ptr());
    if p.is_null() {
        Err(format!("libnftables has no {name:?}"))
    } else {
        Ok(p)
    }
}

fn load() -> Result<Api, String> {
    // SAFETY: dlopen/dlsym with NUL-terminated names; the symbols are cast to the
    // signatures of libnftables' public API (nftables/libnftables.h); the library is
    // never closed (its code is referenced for the life of the process).
    unsafe {
        let lib = libc::dlopen(
            c"libnftables.so.1".as_ptr(),
            libc::RTLD_NOW | libc::RTLD_LOCAL,
        );
        if lib.is_null() {
            return Err("cannot load libnftables.so.1".into());
        }
        let new: unsafe extern "C" fn(u32) -> *mut c_void =
            std::mem::transmute(sym(lib, c"nft_ctx_new")?);
        let free: unsafe extern "C" fn(*mut c_void) =
            std::mem::transmute(sym(lib, c"nft_ctx_free")?);
        let buf_out: unsafe extern "C" fn(*mut c_void) -> c_int =
            std::mem::transmute(sym(lib, c"nft_ctx_buffer_output")?);
        let buf_err: unsafe extern "C" fn(*mut c_void) -> c_int =
            std::mem::transmute(sym(lib, c"nft_ctx_buffer_error")?);
        let run: unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int =
            std::mem::transmute(sym(lib, c"nft_run_cmd_from_buffer")?);
        let out: unsafe extern "C" fn(*mut c_void) -> *const c_char =
            std::mem::transmute(sym(lib, c"nft_ctx_get_output_buffer")?);
        let err: unsafe extern "C" fn(*mut c_void) -> *const c_char =
            std::mem::transmute(sym(lib, c"nft_ctx_get_error_buffer")?);
        let ctx = new(0); // NFT_CTX_DEFAULT
        if ctx.is_null() {
            return Err("nft_ctx_new failed".into());
        }
        let api = Api {
            ctx,
            free,
            run,
            out,
            err,
        };
        if buf_out(ctx) != 0 || buf_err(ctx) != 0 {
            return Err("cannot buffer libnftables output".into());
        }
        Ok(api)
    }
}

fn copy(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: libnftables returns a NUL-terminated buffer valid until the next command.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

impl LibNft {
    /// A context inside `netns` (its thread enters the namespace first).
    pub fn open(netns: &NetnsContext) -> Result<LibNft, String> {
        let ctx = netns.clone();
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        std::thread::Builder::new()
            .name("libnftables".into())
            .spawn(move || {
                if let Err(e) = ctx.enter() {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
                let api = match load() {
                    Ok(a) => a,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                for (text, reply) in rx {
                    let r = match CString::new(text) {
                        Err(_) => Err("NUL byte in nft commands".to_owned()),
                        Ok(c) => {
                            // SAFETY: ctx is live and used by this thread only.
                            let rc = unsafe { (api.run)(api.ctx, c.as_ptr()) };
                            let out = copy(unsafe { (api.out)(api.ctx) });
                            let err = copy(unsafe { (api.err)(api.ctx) });
                            if rc == 0 {
                                Ok(out)
                            } else {
                                Err(err.trim().to_owned())
                            }
                        }
                    };
                    let _ = reply.send(r);
                }
            })
            .map_err(|e| e.to_string())?;
        ready_rx
            .recv()
            .map_err(|_| "libnftables thread ended".to_owned())??;
        Ok(LibNft {
            tx: std::sync::Mutex::new(tx),
        })
    }

    /// Run `text` (what `nft -f -` would read) as one transaction.
    pub async fn run(&self, text: &str) -> Result<String, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .lock()
            .unwrap()
            .send((text.to_owned(), tx))
            .map_err(|_| "libnftables thread ended".to_owned())?;
        rx.await
            .map_err(|_| "libnftables thread ended".to_owned())?
    }
}
