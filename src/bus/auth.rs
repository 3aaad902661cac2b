//! Authorization: every mutating method asks polkit with the caller's unique bus name as
//! the subject (`system-bus-name`), never a PID. Any polkit error denies.
//!
//! uid 0 is not asked: polkitd itself answers "authorized" for every action when the
//! subject's uid is 0, before any rule or policy is read (`check_authorization_sync`,
//! "special case: uid 0, root, is _always_ authorized for anything"), so asking costs a
//! round trip to polkitd (about 0.9 ms) for an answer that cannot be anything else. The
//! uid is the one dbus-daemon reports for the unique name (GetConnectionUnixUser), the
//! same source polkitd uses; a sender that is gone cannot be identified and is refused
//! (the failure of CVE-2021-3560 was polkitd taking a vanished sender for uid 0).
//!
//! Rules that hold for every check (issue 9):
//! - an `-others` action is never enough on its own: the base action is asked first, so a
//!   rule that grants only `loop-others` grants nothing;
//! - a "yes" is reused (for [`GRANT_TTL`]) only when it was obtained without user
//!   interaction and only for a call that is itself non-interactive: an admin's password
//!   typed once for an interactive call must not silently authorize the scripted calls of
//!   the same connection;
//! - polkit gets the call's details (`container`, `container_id`, `instance`,
//!   `instance_owner`, `device`, `host_port`, `protocol`, `target`), and a cached grant is
//!   only reused for the same details.

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
    /// A negative oom_score_adj (an OOM-protected tenant); no `-others` twin.
    InstancesOomProtect,
    /// A host port below the configured floor (`privileged_port_floor`); no twin.
    PortsPrivileged,
}

impl Action {
    /// Whether the action has an `-others` twin.
    pub fn has_others(self) -> bool {
        !matches!(
            self,
            Action::CaptureHost | Action::InstancesOomProtect | Action::PortsPrivileged
        )
    }

    pub fn id(self, others: bool) -> String {
        let base = match self {
            Action::Loop => "loop",
            Action::Partitions => "partitions",
            Action::Ports => "ports",
            Action::Capture => "capture",
            Action::CaptureHost => "capture-host",
            Action::Devices => "devices",
            Action::Instances => "instances",
            Action::InstancesOomProtect => "instances-oom-protect",
            Action::PortsPrivileged => "ports-privileged",
        };
        if others && self.has_others() {
            format!("org.dindhelper1.{base}-others")
        } else {
            format!("org.dindhelper1.{base}")
        }
    }
}

/// polkit details of one check (key, value); documented in the policy file and README.
pub type Details = Vec<(&'static str, String)>;

/// Grants polkit gave without user interaction, per (unique bus name, action id,
/// details), each kept for [`GRANT_TTL`]. Pure bookkeeping, unit-tested below.
#[derive(Default)]
pub struct GrantCache {
    m: HashMap<(String, String, String), std::time::Instant>,
}

impl GrantCache {
    fn key(name: &str, id: &str, details: &Details) -> (String, String, String) {
        let mut d: Vec<String> = details.iter().map(|(k, v)| format!("{k}={v}")).collect();
        d.sort();
        (name.to_owned(), id.to_owned(), d.join("\n"))
    }

    /// A grant usable for this call: only non-interactive calls reuse anything.
    pub fn lookup(&mut self, name: &str, id: &str, details: &Details, interactive: bool) -> bool {
        if interactive {
            return false;
        }
        let key = Self::key(name, id, details);
        match self.m.get(&key) {
            Some(t) if t.elapsed() < GRANT_TTL => true,
            Some(_) => {
                self.m.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Remember a "yes" — only one polkit gave to a non-interactive check (an interactive
    /// one may stand for a password typed just now: never reused).
    pub fn store(&mut self, name: &str, id: &str, details: &Details, interactive: bool) {
        if interactive {
            return;
        }
        if self.m.len() >= UID_CACHE_MAX {
            self.m.retain(|_, t| t.elapsed() < GRANT_TTL);
            if self.m.len() >= UID_CACHE_MAX {
                self.m.clear();
            }
        }
        self.m
            .insert(Self::key(name, id, details), std::time::Instant::now());
    }
}

/// Who called: unique bus name and uid (from the bus daemon, not from the caller).
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub uid: u32,
}

/// The provisioning group: its members (and root) see every resource of every uid. The
/// one definition of "provisioning" for reads; the D-Bus policy (dbus/org.dindhelper1.conf)
/// and the shipped polkit rules name the same group for calls.
pub const PROVISIONING_GROUP: &str = "dindhelper";

/// What a caller may see (issue 9, visibility): uid 0 and members of
/// [`PROVISIONING_GROUP`] see everything; every other uid (tenants, and anyone the bus
/// lets through) sees only resources it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Viewer {
    pub uid: u32,
    pub all: bool,
}

impl Viewer {
    /// Whether a resource owned by `owner` is visible to this caller.
    pub fn sees(&self, owner: u32) -> bool {
        self.all || self.uid == owner
    }
}

/// Whether `uid` is root or a member of [`PROVISIONING_GROUP`], decided like dbus-daemon
/// decides `<policy group="…">`: the user database's group list of the uid (primary group
/// plus supplementary groups), not the groups of the calling process. A uid without a
/// passwd entry, or a missing group, is not a member. Blocking (NSS): call it off the
/// runtime.
pub fn sees_all(uid: u32) -> bool {
    use nix::unistd::{getgrouplist, Group, Uid, User};
    if uid == 0 {
        return true;
    }
    let Ok(Some(group)) = Group::from_name(PROVISIONING_GROUP) else {
        return false;
    };
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return false;
    };
    if user.gid == group.gid {
        return true;
    }
    let Ok(name) = std::ffi::CString::new(user.name) else {
        return false;
    };
    getgrouplist(&name, user.gid)
        .map(|gs| gs.contains(&group.gid))
        .unwrap_or(false)
}

pub struct Authorizer {
    conn: zbus::Connection,
    /// Positive non-interactive polkit answers; see [`GrantCache`].
    grants: std::sync::Mutex<GrantCache>,
    /// uid per unique bus name. A unique name is never reused during a bus's lifetime, so
    /// the bus daemon's answer stays true; bounded by clearing when full.
    uids: std::sync::Mutex<HashMap<String, u32>>,
    /// [`Viewer`] per unique bus name: group membership as it was when the connection was
    /// first seen (dbus-daemon also fixes a connection's groups when it connects); bounded
    /// like `uids`.
    viewers: std::sync::Mutex<HashMap<String, Viewer>>,
    dbus: tokio::sync::OnceCell<zbus::fdo::DBusProxy<'static>>,
    authority: tokio::sync::OnceCell<AuthorityProxy<'static>>,
}

impl Authorizer {
    pub fn new(conn: zbus::Connection) -> Self {
        Authorizer {
            conn,
            uids: std::sync::Mutex::new(HashMap::new()),
            viewers: std::sync::Mutex::new(HashMap::new()),
            grants: std::sync::Mutex::new(GrantCache::default()),
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

    /// What the sender of `hdr` may see (see [`Viewer`]); the answer is cached per unique
    /// bus name, so a property read costs one map lookup after the first.
    pub async fn viewer(&self, hdr: &Header<'_>) -> Result<Viewer, BusError> {
        let caller = self.caller(hdr).await?;
        let cached = self
            .viewers
            .lock()
            .expect("viewer cache")
            .get(&caller.name)
            .copied();
        if let Some(v) = cached {
            return Ok(v);
        }
        let uid = caller.uid;
        let all = tokio::task::spawn_blocking(move || sees_all(uid))
            .await
            .unwrap_or(false);
        let v = Viewer { uid, all };
        let mut m = self.viewers.lock().expect("viewer cache");
        if m.len() >= UID_CACHE_MAX {
            m.clear();
        }
        m.insert(caller.name, v);
        Ok(v)
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
    /// resource's owner is known). With `others`, the base action is checked first.
    pub async fn check_caller(
        &self,
        hdr: &Header<'_>,
        caller: &Caller,
        action: Action,
        others: bool,
        interactive: bool,
    ) -> Result<(), BusError> {
        self.check_with(hdr, caller, action, others, interactive, &Vec::new())
            .await
    }

    /// [`Authorizer::check_caller`] with polkit details.
    pub async fn check_with(
        &self,
        hdr: &Header<'_>,
        caller: &Caller,
        action: Action,
        others: bool,
        interactive: bool,
        details: &Details,
    ) -> Result<(), BusError> {
        if others && action.has_others() {
            // Never the twin alone: a rule granting only `-others` grants nothing.
            self.check_one(hdr, caller, &action.id(false), interactive, details)
                .await?;
        }
        self.check_one(hdr, caller, &action.id(others), interactive, details)
            .await
    }

    async fn check_one(
        &self,
        hdr: &Header<'_>,
        caller: &Caller,
        id: &str,
        interactive: bool,
        details: &Details,
    ) -> Result<(), BusError> {
        if caller.uid == 0 {
            // polkitd's own answer for uid 0 (module header)
            return Ok(());
        }
        if self
            .grants
            .lock()
            .expect("grant cache")
            .lookup(&caller.name, id, details, interactive)
        {
            return Ok(());
        }
        let answer = self.ask_polkit(hdr, id, interactive, details).await;
        if let Ok(true) = answer {
            self.grants
                .lock()
                .expect("grant cache")
                .store(&caller.name, id, details, interactive);
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
            Err(e) => {
                tracing::warn!(caller = %caller.name, uid = caller.uid, action = %id, error = %e,
                    "polkit cannot be asked; denying the caller");
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
        details: &Details,
    ) -> Result<bool, String> {
        let subject = Subject::new_for_message_header(hdr).map_err(|e| e.to_string())?;
        let authority = self.authority().await.map_err(|e| e.to_string())?;
        let flags = if interactive {
            CheckAuthorizationFlags::AllowUserInteraction.into()
        } else {
            Default::default()
        };
        let details: HashMap<&str, &str> = details.iter().map(|(k, v)| (*k, v.as_str())).collect();
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
            Action::InstancesOomProtect,
            Action::PortsPrivileged,
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

    #[test]
    fn grants_from_interactive_checks_are_never_reused() {
        let d: Details = vec![("instance", "a".into())];
        let mut c = GrantCache::default();
        // A yes obtained interactively (a password typed) is not kept...
        c.store(":1.5", "org.dindhelper1.loop", &d, true);
        assert!(!c.lookup(":1.5", "org.dindhelper1.loop", &d, false));
        // ...a non-interactive yes is, for non-interactive calls with the same details only.
        c.store(":1.5", "org.dindhelper1.loop", &d, false);
        assert!(c.lookup(":1.5", "org.dindhelper1.loop", &d, false));
        assert!(!c.lookup(":1.5", "org.dindhelper1.loop", &d, true));
        assert!(!c.lookup(":1.6", "org.dindhelper1.loop", &d, false));
        let other: Details = vec![("instance", "b".into())];
        assert!(!c.lookup(":1.5", "org.dindhelper1.loop", &other, false));
    }

    #[test]
    fn viewers_see_their_own_or_everything() {
        let tenant = Viewer {
            uid: 1000,
            all: false,
        };
        assert!(tenant.sees(1000));
        assert!(!tenant.sees(1001));
        assert!(!tenant.sees(0));
        let member = Viewer {
            uid: 1002,
            all: true,
        };
        assert!(member.sees(1000) && member.sees(0));
        assert!(sees_all(0));
        // No passwd entry: not a member of anything.
        assert!(!sees_all(4_000_000_000));
    }

    #[test]
    fn twinless_actions_ignore_others() {
        assert_eq!(
            Action::InstancesOomProtect.id(true),
            "org.dindhelper1.instances-oom-protect"
        );
        assert_eq!(
            Action::PortsPrivileged.id(true),
            "org.dindhelper1.ports-privileged"
        );
        assert_eq!(Action::CaptureHost.id(true), "org.dindhelper1.capture-host");
    }
}
