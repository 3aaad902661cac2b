//! Authorization: every mutating method asks polkit with the caller's unique bus name as
//! the subject (`system-bus-name`), never a PID. Any polkit error denies, except that
//! uid 0 is allowed when polkit cannot be asked at all (the log says why).

use super::error::BusError;
use std::collections::HashMap;
use zbus::message::Header;
use zbus::names::BusName;
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

const UID_CACHE_MAX: usize = 4096;

/// How long a polkit "yes" for one (unique bus name, action) is reused. A unique name is one
/// connection of one process and is never reused on a bus, so the subject cannot change;
/// what can change is polkit's answer (rules, group membership, an expiring
/// auth_admin_keep), and for that a one-second delay is accepted. Only positive answers
/// are kept (a "no" is asked again every time), and interactive calls always ask. Measured:
/// polkitd answers a CheckAuthorization in about 0.9 ms here, half of a loop
/// attach+detach round trip's budget (losetup does one in about 2.7-4 ms).
const GRANT_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// A polkit action family; `others` selects the `-others` twin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Loop,
    Partitions,
    Ports,
    Capture,
    CaptureHost,
    Devices,
    Instances,
}

impl Action {
    pub fn id(self, others: bool) -> String {
        let base = match self {
            Action::Loop => "loop",
            Action::Partitions => "partitions",
            Action::Ports => "ports",
            Action::Capture => "capture",
            Action::CaptureHost => "capture-host",
            Action::Devices => "devices",
            Action::Instances => "instances",
        };
        if others && self != Action::CaptureHost {
            format!("org.dindhelper1.{base}-others")
        } else {
            format!("org.dindhelper1.{base}")
        }
    }
}

/// Who called: unique bus name and uid (from the bus daemon, not from the caller).
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub uid: u32,
}

pub struct Authorizer {
    conn: zbus::Connection,
    /// Positive polkit answers per (unique bus name, action id), kept for
    /// [`GRANT_TTL`]. See `ask_polkit_cached`.
    grants: std::sync::Mutex<HashMap<(String, String), std::time::Instant>>,
    /// uid per unique bus name. A unique name is never reused during a bus's lifetime, so
    /// the bus daemon's answer stays true; bounded by clearing when full.
    uids: std::sync::Mutex<HashMap<String, u32>>,
    dbus: tokio::sync::OnceCell<zbus::fdo::DBusProxy<'static>>,
    authority: tokio::sync::OnceCell<AuthorityProxy<'static>>,
}

impl Authorizer {
    pub fn new(conn: zbus::Connection) -> Self {
        Authorizer {
            conn,
            uids: std::sync::Mutex::new(HashMap::new()),
            grants: std::sync::Mutex::new(HashMap::new()),
            dbus: tokio::sync::OnceCell::new(),
            authority: tokio::sync::OnceCell::new(),
        }
    }

    async fn dbus(&self) -> zbus::Result<&zbus::fdo::DBusProxy<'static>> {
        self.dbus
            .get_or_try_init(|| async {
                zbus::fdo::DBusProxy::builder(&self.conn)
                    .cache_properties(zbus::proxy::CacheProperties::No)
                    .build()
                    .await
            })
            .await
    }

    async fn authority(&self) -> zbus::Result<&AuthorityProxy<'static>> {
        self.authority
            .get_or_try_init(|| async {
                AuthorityProxy::builder(&self.conn)
                    .cache_properties(zbus::proxy::CacheProperties::No)
                    .build()
                    .await
            })
            .await
    }

    /// Identify the sender of a message (no authorization).
    pub async fn caller(&self, hdr: &Header<'_>) -> Result<Caller, BusError> {
        let sender = hdr
            .sender()
            .ok_or_else(|| BusError::NotAuthorized("message has no sender".into()))?;
        let cached = self
            .uids
            .lock()
            .expect("uid cache")
            .get(sender.as_str())
            .copied();
        let uid = match cached {
            Some(u) => u,
            None => {
                let u = self
                    .dbus()
                    .await?
                    .get_connection_unix_user(BusName::Unique(sender.clone()))
                    .await
                    .map_err(|e| BusError::NotAuthorized(format!("cannot identify caller: {e}")))?;
                let mut m = self.uids.lock().expect("uid cache");
                if m.len() >= UID_CACHE_MAX {
                    m.clear();
                }
                m.insert(sender.to_string(), u);
                u
            }
        };
        Ok(Caller {
            name: sender.to_string(),
            uid,
        })
    }

    /// Identify the caller and check `action` with polkit.
    pub async fn check(
        &self,
        hdr: &Header<'_>,
        action: Action,
        others: bool,
        interactive: bool,
    ) -> Result<Caller, BusError> {
        let caller = self.caller(hdr).await?;
        self.check_caller(hdr, &caller, action, others, interactive)
            .await?;
        Ok(caller)
    }

    /// Check `action` for an already identified caller (e.g. the `-others` twin after the
    /// resource's owner is known).
    pub async fn check_caller(
        &self,
        hdr: &Header<'_>,
        caller: &Caller,
        action: Action,
        others: bool,
        interactive: bool,
    ) -> Result<(), BusError> {
        let id = action.id(others);
        let key = (caller.name.clone(), id.clone());
        if !interactive {
            let mut g = self.grants.lock().expect("grant cache");
            match g.get(&key) {
                Some(t) if t.elapsed() < GRANT_TTL => return Ok(()),
                Some(_) => {
                    g.remove(&key);
                }
                None => {}
            }
        }
        let answer = self.ask_polkit(hdr, &id, interactive).await;
        if let Ok(true) = answer {
            let mut g = self.grants.lock().expect("grant cache");
            if g.len() >= UID_CACHE_MAX {
                g.retain(|_, t| t.elapsed() < GRANT_TTL);
                if g.len() >= UID_CACHE_MAX {
                    g.clear();
                }
            }
            g.insert(key, std::time::Instant::now());
        }
        match answer {
            Ok(true) => Ok(()),
            Ok(false) => {
                tracing::info!(caller = %caller.name, uid = caller.uid, action = %id, "polkit denied");
                Err(BusError::NotAuthorized(format!(
                    "uid {} is not authorized for {id} (polkit said no{})",
                    caller.uid,
                    if interactive {
                        ""
                    } else {
                        "; pass option interactive=true to allow authentication"
                    }
                )))
            }
            Err(e) if caller.uid == 0 => {
                tracing::warn!(action = %id, error = %e, "polkit cannot be asked; allowing uid 0 only");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(caller = %caller.name, uid = caller.uid, action = %id, error = %e,
                    "polkit cannot be asked; denying non-root caller");
                Err(BusError::NotAuthorized(format!(
                    "polkit cannot be asked ({e}); only root is allowed until it can"
                )))
            }
        }
    }

    async fn ask_polkit(
        &self,
        hdr: &Header<'_>,
        action_id: &str,
        interactive: bool,
    ) -> Result<bool, String> {
        let subject = Subject::new_for_message_header(hdr).map_err(|e| e.to_string())?;
        let authority = self.authority().await.map_err(|e| e.to_string())?;
        let flags = if interactive {
            CheckAuthorizationFlags::AllowUserInteraction.into()
        } else {
            Default::default()
        };
        let details: HashMap<&str, &str> = HashMap::new();
        let r = authority
            .check_authorization(&subject, action_id, &details, flags, "")
            .await
            .map_err(|e| e.to_string())?;
        Ok(r.is_authorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_ids_match_the_policy_file() {
        let policy = include_str!("../../polkit/org.dindhelper1.policy");
        for a in [
            Action::Loop,
            Action::Partitions,
            Action::Ports,
            Action::Capture,
            Action::CaptureHost,
            Action::Devices,
            Action::Instances,
        ] {
            for others in [false, true] {
                let id = a.id(others);
                assert!(
                    policy.contains(&format!("<action id=\"{id}\"")),
                    "{id} missing from polkit/org.dindhelper1.policy"
                );
            }
        }
    }
}
