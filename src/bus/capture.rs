//! `org.dindhelper1.Captures` at `/org/dindhelper1` (StartCapture, StartCaptureFd,
//! ListCaptures, signal Finished) and one `org.dindhelper1.Capture` object per session at
//! `/org/dindhelper1/capture/<id>` (properties, Stop). Each method: authorize, convert,
//! call one `ops::capture` function, export, map the error, audit-log.
//!
//! Counters are read live on every property read; while a session runs, a task emits
//! PropertiesChanged for Packets/Bytes/Dropped once a second when they moved, and at the end
//! State/Reason/counters plus the Finished signal. A finished session stays exported for
//! `ops::capture::FINISHED_KEEP`.

use super::auth::{Action, Authorizer, Caller};
use super::error::BusError;
use super::options::{describe, interactive, Options, Opts};
use crate::capture::CaptureOptions;
use crate::ops::capture::{Captures, Session, Sink, StartRequest, TargetSpec, FINISHED_KEEP};
use std::fs::File;
use std::sync::Arc;
use std::time::Duration;
use zbus::interface;
use zbus::message::Header;
use zbus::object_server::{ObjectServer, SignalEmitter};
use zbus::zvariant::{OwnedFd, OwnedObjectPath};

pub fn capture_path(id: u64) -> OwnedObjectPath {
    OwnedObjectPath::try_from(format!("/org/dindhelper1/capture/{id}")).expect("valid path")
}

/// ListCaptures row: object, target, owner uid, state, path, instance.
pub type CaptureRow = (OwnedObjectPath, String, u32, String, String, String);

pub struct CaptureManager {
    pub core: Arc<crate::ops::Core>,
    pub captures: Captures,
    pub auth: Arc<Authorizer>,
    pub gate: Arc<tokio::sync::RwLock<()>>,
}

/// Parse the capture options shared by both start methods.
fn start_options(
    o: &mut Opts<'_>,
) -> Result<(CaptureOptions, Option<Duration>, Option<String>), BusError> {
    let mut c = CaptureOptions {
        interface: o
            .string("interface")?
            .filter(|s| !s.is_empty() && s != "any"),
        filter: o.string("filter")?.filter(|s| !s.trim().is_empty()),
        ..CaptureOptions::default()
    };
    if let Some(s) = o.u64("snaplen")? {
        c.snaplen = u32::try_from(s)
            .map_err(|_| BusError::InvalidArgs(format!("snaplen {s} is out of range")))?;
    }
    let duration = match o.u64("duration")? {
        None => None,
        Some(0) => {
            return Err(BusError::InvalidArgs(
                "option \"duration\" must be at least 1 (seconds)".into(),
            ))
        }
        Some(s) => Some(Duration::from_secs(s)),
    };
    c.max_bytes = o.u64("max_bytes")?;
    c.max_packets = o.u64("max_packets")?;
    let instance = o.string("instance")?;
    if let Some(i) = &instance {
        crate::names::check_instance_name(i).map_err(BusError::map)?;
    }
    Ok((c, duration, instance))
}

impl CaptureManager {
    async fn do_start(
        &self,
        hdr: &Header<'_>,
        caller: &Caller,
        emitter: &SignalEmitter<'_>,
        target: &str,
        options: &Options,
        fd: Option<File>,
    ) -> Result<Arc<Session>, BusError> {
        let mut o = Opts::new(options);
        let (copts, duration, instance) = start_options(&mut o)?;
        let name = if fd.is_none() {
            o.string("name")?
        } else {
            None
        };
        let inter = interactive(options)?;
        o.finish()?;
        let spec = TargetSpec::parse(target).map_err(BusError::map)?;
        self.auth
            .check_caller(hdr, caller, Action::Capture, false, inter)
            .await?;
        if spec.is_admin() {
            self.auth
                .check_caller(hdr, caller, Action::CaptureHost, false, inter)
                .await?;
        }
        super::authorize_instance_tag(
            &self.auth,
            &self.core,
            hdr,
            caller,
            instance.as_deref(),
            inter,
        )
        .await?;
        let resolved = self.captures.resolve(&spec).await.map_err(BusError::map)?;
        if let Some(id) = &resolved.container_id {
            // Owned targets: a container of another uid's instance, or of none, needs
            // capture-others.
            super::authorize_container_id(
                &self.auth,
                &self.core,
                hdr,
                caller,
                Action::Capture,
                target,
                id,
                inter,
                vec![("target", target.to_owned())],
            )
            .await?;
        }
        if resolved.host_netns && !spec.is_admin() {
            // A container on the host network sees the host's traffic.
            self.auth
                .check_caller(hdr, caller, Action::CaptureHost, false, inter)
                .await?;
        }
        let sink = match fd {
            Some(f) => Sink::Fd(f),
            None => Sink::File { name },
        };
        let req = StartRequest {
            uid: caller.uid,
            options: copts,
            duration,
            instance,
        };
        let s = self
            .captures
            .start(resolved, target, req, sink)
            .await
            .map_err(BusError::map)?;
        self.export(emitter, s.clone()).await;
        Ok(s)
    }

    /// Export the session object and watch it until it ends.
    async fn export(&self, emitter: &SignalEmitter<'_>, s: Arc<Session>) {
        let server = emitter.connection().object_server();
        let path = capture_path(s.id);
        if let Err(e) = server
            .at(
                &path,
                CaptureObject {
                    session: s.clone(),
                    captures: self.captures.clone(),
                    auth: self.auth.clone(),
                    gate: self.gate.clone(),
                },
            )
            .await
        {
            tracing::error!(error = %e, %path, "cannot export capture object");
        }
        let server = server.clone();
        let emitter = emitter.to_owned();
        let captures = self.captures.clone();
        tokio::spawn(async move {
            watch_session(server, emitter, captures, s).await;
        });
    }
}

async fn watch_session(
    server: ObjectServer,
    emitter: SignalEmitter<'static>,
    captures: Captures,
    s: Arc<Session>,
) {
    let path = capture_path(s.id);
    let iref = match server.interface::<_, CaptureObject>(&path).await {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, %path, "capture object vanished");
            return;
        }
    };
    let mut last = s.stats();
    let fin = loop {
        tokio::select! {
            f = s.wait() => break f,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                let now = s.stats();
                if now != last {
                    let obj = iref.get().await;
                    let em = iref.signal_emitter();
                    let _ = obj.packets_changed(em).await;
                    let _ = obj.bytes_changed(em).await;
                    let _ = obj.dropped_changed(em).await;
                    last = now;
                }
            }
        }
    };
    {
        let obj = iref.get().await;
        let em = iref.signal_emitter();
        let _ = obj.packets_changed(em).await;
        let _ = obj.bytes_changed(em).await;
        let _ = obj.dropped_changed(em).await;
        let _ = obj.state_changed(em).await;
        let _ = obj.reason_changed(em).await;
    }
    let reason = crate::ops::capture::reason_text(&fin.reason);
    if let Err(e) = CaptureManager::finished(
        &emitter,
        path.clone(),
        fin.stats.packets,
        fin.stats.bytes,
        fin.stats.dropped,
        reason,
    )
    .await
    {
        tracing::warn!(error = %e, %path, "cannot emit Finished");
    }
    tokio::time::sleep(FINISHED_KEEP).await;
    let _ = server.remove::<CaptureObject, _>(&path).await;
    captures.forget(s.id);
}

fn row(s: &Session) -> CaptureRow {
    (
        capture_path(s.id),
        s.target.clone(),
        s.owner_uid,
        s.state().to_owned(),
        s.path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        s.instance.clone().unwrap_or_default(),
    )
}

#[interface(name = "org.dindhelper1.Captures")]
impl CaptureManager {
    /// Capture in a container's network namespace (`pid:N` and `host` need the
    /// capture-host action) into `<state>/captures/<uid>/<name>.pcap`, owned by the caller,
    /// mode 0600. Options: interface s, filter s, snaplen u, duration u (seconds, default
    /// 60, capped by config), max_bytes t, max_packets t, name s, instance s.
    #[zbus(out_args("session", "path"))]
    async fn start_capture(
        &self,
        target: String,
        options: Options,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(OwnedObjectPath, String), BusError> {
        let args = format!("{target} {}", describe(&options));
        let (hdr, emitter) = (&hdr, &emitter);
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "StartCapture",
            &args,
            |caller| async move {
                self.do_start(hdr, &caller, emitter, &target, &options, None)
                    .await
                    .map(|s| {
                        (
                            capture_path(s.id),
                            s.path
                                .as_ref()
                                .map(|p| p.display().to_string())
                                .unwrap_or_default(),
                        )
                    })
            },
        )
        .await
    }

    /// Capture like StartCapture but stream the pcap into `fd` (a pipe: `| tcpdump -r -`).
    /// The session ends with reason `error: sink: …` when the reader goes away.
    async fn start_capture_fd(
        &self,
        target: String,
        fd: OwnedFd,
        options: Options,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<OwnedObjectPath, BusError> {
        let args = format!("{target} {}", describe(&options));
        let (hdr, emitter) = (&hdr, &emitter);
        let file = File::from(std::os::fd::OwnedFd::from(fd));
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "StartCaptureFd",
            &args,
            |caller| async move {
                self.do_start(hdr, &caller, emitter, &target, &options, Some(file))
                    .await
                    .map(|s| capture_path(s.id))
            },
        )
        .await
    }

    /// Delete one of the caller's capture files (`name` without .pcap); option
    /// `owner_uid` u: another uid's file (needs capture-others). Busy while a session
    /// still writes it. This is what frees the per-uid byte quota.
    async fn delete_capture(
        &self,
        name: String,
        options: Options,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), BusError> {
        let args = format!("{name} {}", describe(&options)).to_string();
        let hdr = &hdr;
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "DeleteCapture",
            &args,
            |caller| async move {
                let mut o = Opts::new(&options);
                let owner = match o.u64("owner_uid")? {
                    None => caller.uid,
                    Some(u) => u32::try_from(u).map_err(|_| {
                        BusError::InvalidArgs(format!("owner_uid {u} is out of range"))
                    })?,
                };
                let inter = interactive(&options)?;
                o.finish()?;
                let details: super::auth::Details =
                    vec![("capture", name.clone()), ("owner", owner.to_string())];
                self.auth
                    .check_with(
                        hdr,
                        &caller,
                        Action::Capture,
                        owner != caller.uid,
                        inter,
                        &details,
                    )
                    .await?;
                self.captures
                    .delete_file(owner, &name)
                    .await
                    .map_err(BusError::map)?;
                Ok(())
            },
        )
        .await
    }

    /// Sessions (running and recently finished): object, target, owner uid, state
    /// ("running"/"finished"), file path ("" for fd sessions), instance.
    /// Callers outside the provisioning group get their own sessions only.
    async fn list_captures(
        &self,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Vec<CaptureRow>, BusError> {
        let who = self.auth.viewer(&hdr).await?;
        Ok(self
            .captures
            .list()
            .iter()
            .filter(|s| who.sees(s.owner_uid))
            .map(|s| row(s))
            .collect())
    }

    /// A session ended: its object, final packets, bytes (file size), kernel drops and the
    /// reason (stopped, duration, max-packets, max-bytes, target-exited, error: …).
    #[zbus(signal)]
    async fn finished(
        emitter: &SignalEmitter<'_>,
        session: OwnedObjectPath,
        packets: u64,
        bytes: u64,
        dropped: u64,
        reason: String,
    ) -> zbus::Result<()>;
}

pub struct CaptureObject {
    session: Arc<Session>,
    captures: Captures,
    /// Also the guard of every getter: owner-only (see [`super::visibility`]).
    auth: Arc<Authorizer>,
    /// Shared with every interface: Stop runs in the one call frame (`audited`).
    gate: Arc<tokio::sync::RwLock<()>>,
}

impl CaptureObject {
    async fn shown(&self, hdr: Option<&Header<'_>>) -> zbus::fdo::Result<()> {
        super::visibility::owner_only(&self.auth, hdr, self.session.owner_uid).await
    }
}

#[interface(name = "org.dindhelper1.Capture")]
impl CaptureObject {
    /// End the session (owner: capture; another uid: capture-others). Returns when the
    /// last block is written; the file is then complete.
    async fn stop(
        &self,
        options: Options,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), BusError> {
        let path = capture_path(self.session.id).to_string();
        let hdr = &hdr;
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "Stop",
            &path,
            |caller| async move {
                let inter = interactive(&options)?;
                Opts::new(&options).finish()?;
                let s = self.captures.get(self.session.id).map_err(BusError::map)?;
                let mut details: super::auth::Details = vec![
                    ("target", s.target.clone()),
                    ("owner", s.owner_uid.to_string()),
                ];
                if let Some(i) = &s.instance {
                    details.push(("instance", i.clone()));
                }
                let others = s.owner_uid != caller.uid;
                self.auth
                    .check_with(hdr, &caller, Action::Capture, others, inter, &details)
                    .await?;
                s.stop();
                let _ = tokio::time::timeout(Duration::from_secs(10), s.wait()).await;
                Ok(())
            },
        )
        .await
    }

    /// "running" or "finished".
    #[zbus(property)]
    async fn state(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.session.state().to_owned())
    }
    /// The target as given to StartCapture.
    #[zbus(property)]
    async fn target(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.session.target.clone())
    }
    /// Packets written.
    #[zbus(property)]
    async fn packets(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<u64> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.session.stats().packets)
    }
    /// Bytes written, pcap headers included (= the file size).
    #[zbus(property)]
    async fn bytes(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<u64> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.session.stats().bytes)
    }
    /// Packets the kernel dropped (ring full).
    #[zbus(property)]
    async fn dropped(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<u64> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.session.stats().dropped)
    }
    /// The capture file ("" for StartCaptureFd).
    #[zbus(property)]
    async fn path(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok({
            self.session
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        })
    }
    #[zbus(property)]
    async fn owner_uid(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<u32> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.session.owner_uid)
    }
    /// DinD instance ("" for none).
    #[zbus(property)]
    async fn instance(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.session.instance.clone().unwrap_or_default())
    }
    /// "" while running, then why it ended.
    #[zbus(property)]
    async fn reason(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.session.reason())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::zvariant::{OwnedValue, Value};

    fn opts(pairs: &[(&str, Value<'static>)]) -> Options {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OwnedValue::try_from(v.clone()).unwrap()))
            .collect()
    }

    #[test]
    fn start_options_parse_and_refuse() {
        let m = opts(&[
            ("interface", Value::from("eth0")),
            ("filter", Value::from("tcp port 80")),
            ("snaplen", Value::U32(1500)),
            ("duration", Value::U32(5)),
            ("max_packets", Value::U64(3)),
            ("instance", Value::from("lab-1")),
        ]);
        let mut o = Opts::new(&m);
        let (c, d, i) = start_options(&mut o).unwrap();
        o.finish().unwrap();
        assert_eq!(c.interface.as_deref(), Some("eth0"));
        assert_eq!(c.filter.as_deref(), Some("tcp port 80"));
        assert_eq!(c.snaplen, 1500);
        assert_eq!(c.max_packets, Some(3));
        assert_eq!(d, Some(Duration::from_secs(5)));
        assert_eq!(i.as_deref(), Some("lab-1"));

        // "any" and "" mean all interfaces; an empty filter means none.
        let m = opts(&[
            ("interface", Value::from("any")),
            ("filter", Value::from(" ")),
        ]);
        let (c, d, _) = start_options(&mut Opts::new(&m)).unwrap();
        assert_eq!((c.interface, c.filter, d), (None, None, None));

        for bad in [
            opts(&[("duration", Value::U32(0))]),
            opts(&[("snaplen", Value::U64(1 << 40))]),
            opts(&[("instance", Value::from("Bad Name"))]),
            opts(&[("filter", Value::U32(1))]),
        ] {
            assert!(
                matches!(
                    start_options(&mut Opts::new(&bad)),
                    Err(BusError::InvalidArgs(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn capture_paths() {
        assert_eq!(capture_path(7).as_str(), "/org/dindhelper1/capture/7");
    }
}
