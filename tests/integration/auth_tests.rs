//! Authorization: polkit policy + rules as installed, and the daemon's use of them.
//!
//! What the policy implies (polkit/org.dindhelper1.policy, polkit/50-dindhelper.rules):
//! - root: every action (polkit authorizes uid 0);
//! - dhtest-member (group dindhelper): every action, the `-others` ones included;
//! - dhtest-own (test-only rule): every base action, no `-others` action;
//! - dhtest-tenant (group dindhelper-tenant, the shipped rules): the base actions only;
//! - dhtest-othersonly (test-only rule): the `-others` actions only (which the daemon
//!   never accepts without the base action);
//! - dhtest-plain: nothing (defaults are auth_admin_keep for active sessions only and
//!   there is no session and no agent here), so every mutating call is NotAuthorized.

use crate::bed::{
    gv_str, Bed, DaemonLoop, ACTIONS, BUS_NAME, MANAGER_PATH, MEMBER, OTHERS_ONLY, OWN, PLAIN,
    TENANT,
};
use crate::Test;

const MIB: u64 = 1 << 20;

pub fn tests() -> Vec<Test> {
    let t = |name, needs_daemon, run| Test {
        name,
        needs_daemon,
        run,
    };
    vec![
        t(
            "polkit_policy_grants_group_members",
            false,
            polkit_policy_grants_group_members,
        ),
        t(
            "dbus_policy_admits_root_and_group_only",
            false,
            dbus_policy_admits_root_and_group_only,
        ),
        t(
            "plain_user_refused_on_every_mutating_method",
            true,
            plain_user_refused_on_every_mutating_method,
        ),
        t(
            "member_and_root_may_use_every_mutating_method",
            true,
            member_and_root_may_use_every_mutating_method,
        ),
        t(
            "reads_are_the_owners_or_the_groups",
            true,
            reads_are_the_owners_or_the_groups,
        ),
    ]
}

/// The real polkitd, reading the project's files, answers pkcheck as the policy says.
fn polkit_policy_grants_group_members(bed: &Bed) {
    // polkitd knows every action of the policy file.
    let out = bed
        .busctl(&[
            "call",
            "org.freedesktop.PolicyKit1",
            "/org/freedesktop/PolicyKit1/Authority",
            "org.freedesktop.PolicyKit1.Authority",
            "EnumerateActions",
            "s",
            "",
        ])
        .expect_ok("EnumerateActions");
    let data = out.json_data();
    let ids: Vec<String> = data[0]
        .as_array()
        .expect("a(ssssssuuua{ss})")
        .iter()
        .map(|a| a[0].as_str().unwrap_or_default().to_owned())
        .collect();
    for a in ACTIONS {
        assert!(ids.iter().any(|i| i == a), "polkitd does not know {a}");
    }
    let ours = ids
        .iter()
        .filter(|i| i.starts_with("org.dindhelper1."))
        .count();
    assert_eq!(
        ours,
        ACTIONS.len(),
        "unexpected org.dindhelper1 actions: {ids:?}"
    );

    for a in ACTIONS {
        let root = bed.pkcheck_as("root", a);
        assert_eq!(root.status, 0, "root, {a}: {root:?}");
        let member = bed.pkcheck_as(MEMBER, a);
        assert_eq!(member.status, 0, "{MEMBER}, {a}: {member:?}");
        // pkcheck: 1 = not authorized (allow_any=no, no session), 2 = challenge.
        let plain = bed.pkcheck_as(PLAIN, a);
        assert_eq!(plain.status, 1, "{PLAIN} must be refused {a}: {plain:?}");
        let own = bed.pkcheck_as(OWN, a);
        let want = if a.ends_with("-others") { 1 } else { 0 };
        assert_eq!(own.status, want, "{OWN}, {a}: {own:?}");
        let base = [
            "loop",
            "partitions",
            "ports",
            "capture",
            "devices",
            "instances",
        ]
        .iter()
        .any(|b| *a == format!("org.dindhelper1.{b}"));
        let tenant = bed.pkcheck_as(TENANT, a);
        assert_eq!(
            tenant.status,
            if base { 0 } else { 1 },
            "{TENANT} (shipped group dindhelper-tenant), {a}: {tenant:?}"
        );
        let oo = bed.pkcheck_as(OTHERS_ONLY, a);
        assert_eq!(oo.status, want ^ 1, "{OTHERS_ONLY}, {a}: {oo:?}");
    }
}

/// The plain user is refused (NotAuthorized) on every mutating method — also for names
/// and devices that exist, also with `interactive: true` (no agent) — and nothing changes.
fn plain_user_refused_on_every_mutating_method(bed: &Bed) {
    bed.create_image(MEMBER, "authz", 4 * MIB);
    let lp = DaemonLoop::attach(bed, MEMBER, "authz", &["partscan", "b", "true"]);
    let before = (bed.list_images(), bed.list_loops(), bed.image_files());
    let dev = gv_str(&lp.device);
    for opts in ["@a{sv} {}", "{'interactive': <true>}"] {
        let calls: [(&str, Vec<String>); 6] = [
            (
                "CreateImage",
                vec![gv_str("plain"), format!("uint64 {}", 4 * MIB)],
            ),
            ("DeleteImage", vec![gv_str("authz")]),
            ("AttachImage", vec![gv_str("authz")]),
            ("AttachImage", vec![gv_str("plain")]),
            ("Detach", vec![dev.clone()]),
            ("Rescan", vec![dev.clone()]),
        ];
        for (method, mut args) in calls {
            args.push(opts.to_owned());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            bed.expect_error(PLAIN, method, &args, "NotAuthorized");
        }
    }
    let out = bed.ctl_as(
        PLAIN,
        &["image", "create", "plainctl", &(4 * MIB).to_string()],
    );
    assert_ne!(out.status, 0, "dindhelperctl as {PLAIN}: {out:?}");
    assert!(
        out.stderr.contains("NotAuthorized"),
        "ctl names the error: {:?}",
        out.stderr
    );
    assert_eq!(
        before,
        (bed.list_images(), bed.list_loops(), bed.image_files()),
        "refused calls changed state"
    );
    assert!(!bed
        .state_dir
        .join("images")
        .join(bed.uid(PLAIN).to_string())
        .join("plain.img")
        .exists());
    lp.detach();
    bed.delete_image(MEMBER, "authz");
}

/// Group member and root may use every mutating method on their own resources.
fn member_and_root_may_use_every_mutating_method(bed: &Bed) {
    for user in [MEMBER, "root"] {
        let obj = bed.create_image(user, "every", 4 * MIB);
        assert!(obj.starts_with("/org/dindhelper1/"), "{obj}");
        assert!(bed.image_path(user, "every").exists(), "{user}: image file");
        let lp = DaemonLoop::attach(bed, user, "every", &["partscan", "b", "true"]);
        assert!(
            bed.rescan(user, &lp.device).is_empty(),
            "{user}: fresh image has no partitions"
        );
        // Both spellings of the device work.
        let short = lp.device.trim_start_matches("/dev/").to_owned();
        assert!(bed.rescan(user, &short).is_empty());
        let dev = lp.device.clone();
        std::mem::forget(lp);
        bed.detach(user, &short);
        assert!(
            !bed.kernel_loops_in_state().contains(&short),
            "{user}: {dev} still attached"
        );
        bed.delete_image(user, "every");
        assert!(
            !bed.image_path(user, "every").exists(),
            "{user}: image file left"
        );
    }
}

/// The live state is read by its owner and by the provisioning group (issue 9,
/// visibility; the bed's bus lets everyone through, so this is the daemon's filtering):
/// root and a member read the member's loop in GetManagedObjects and by property; users
/// outside the group (no group, the test-rule user) do not (see visibility_tests.rs for
/// tenants and the shipped bus policy).
fn reads_are_the_owners_or_the_groups(bed: &Bed) {
    bed.create_image(MEMBER, "visible", 4 * MIB);
    let lp = DaemonLoop::attach(bed, MEMBER, "visible", &[]);
    for user in [PLAIN, OWN] {
        let out = bed
            .managed_objects_at(&bed.address, user)
            .expect_ok(&format!("{user}: GetManagedObjects"));
        assert!(
            !out.stdout.contains(&lp.object),
            "{user}: {} (another uid's) in GetManagedObjects",
            lp.object
        );
        let dev = bed.busctl_as(
            user,
            &[
                "get-property",
                BUS_NAME,
                &lp.object,
                "org.dindhelper1.Loop",
                "Device",
            ],
        );
        assert!(!dev.ok(), "{user}: read another uid's Device: {dev:?}");
    }
    for user in ["root", MEMBER] {
        let out = bed
            .managed_objects_at(&bed.address, user)
            .expect_ok(&format!("{user}: GetManagedObjects"));
        assert!(
            out.stdout.contains(&lp.object),
            "{user}: {} not in GetManagedObjects",
            lp.object
        );
        bed.busctl_as(user, &["introspect", BUS_NAME, &lp.object])
            .expect_ok("introspect");
        let dev = bed
            .busctl_as(
                user,
                &[
                    "get-property",
                    BUS_NAME,
                    &lp.object,
                    "org.dindhelper1.Loop",
                    "Device",
                ],
            )
            .expect_ok("get-property Device");
        assert_eq!(dev.json_data(), serde_json::json!(lp.device));
    }
    lp.detach();
    bed.delete_image(MEMBER, "visible");
}

/// dbus/org.dindhelper1.conf on a system-like bus (default deny): only root may own
/// org.dindhelper1; the plain user's method calls are rejected by dbus-daemon itself
/// (AccessDenied) while members' calls get through; reading properties,
/// GetManagedObjects get through for the groups only, Introspect for `dindhelper` only (a
/// user in no group gets Peer only; the daemon filters what tenants read, see
/// visibility_tests.rs).
fn dbus_policy_admits_root_and_group_only(bed: &Bed) {
    let conf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dbus/org.dindhelper1.conf");
    let bus = bed.start_strict_bus(
        "strictbus",
        &format!("<include>{}</include>", conf.display()),
    );
    // Root owns the name with a bare zbus connection (no objects: calls that pass the
    // bus policy come back as UnknownObject/UnknownMethod from zbus, not AccessDenied).
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let _owner = rt
        .block_on(async {
            zbus::connection::Builder::address(bus.address.as_str())?
                .name(BUS_NAME)?
                .build()
                .await
                .inspect(|c| {
                    // Without an object server zbus leaves calls unanswered.
                    c.object_server();
                })
        })
        .expect("root may own org.dindhelper1");
    let call = |user: &str, method: &str| -> Option<String> {
        let out = bed.gdbus_raw(user, &bus.address, BUS_NAME, MANAGER_PATH, method, &[]);
        out.dbus_error()
    };
    let denied = Some("org.freedesktop.DBus.Error.AccessDenied".to_owned());
    for user in [PLAIN, OWN] {
        assert_eq!(
            call(user, "org.dindhelper1.Manager.ListLoops"),
            denied,
            "{user} → Manager"
        );
        assert_eq!(
            call(user, "org.dindhelper1.Loop.Anything"),
            denied,
            "{user} → Loop"
        );
    }
    for user in ["root", MEMBER, TENANT] {
        let out = bed.gdbus_raw(
            user,
            &bus.address,
            BUS_NAME,
            MANAGER_PATH,
            "org.dindhelper1.Manager.ListLoops",
            &[],
        );
        assert!(
            out.dbus_error() != denied && out.stderr.contains("org.freedesktop.DBus.Error.Unknown"),
            "{user} must reach the owner (which knows no objects): {out:?}"
        );
    }
    for user in [PLAIN, MEMBER, TENANT] {
        for m in [
            "org.freedesktop.DBus.ObjectManager.GetManagedObjects",
            "org.freedesktop.DBus.Introspectable.Introspect",
        ] {
            // Tenants may not introspect: zbus answers with the whole subtree.
            let allowed = user == MEMBER || (user == TENANT && !m.contains("Introspect"));
            if allowed {
                assert_ne!(call(user, m), denied, "{user} → {m}");
            } else {
                assert_eq!(call(user, m), denied, "{user} → {m}");
            }
        }
        assert_ne!(
            call(user, "org.freedesktop.DBus.Peer.Ping"),
            denied,
            "{user} → Peer"
        );
        let get = bed.gdbus_raw(
            user,
            &bus.address,
            BUS_NAME,
            MANAGER_PATH,
            "org.freedesktop.DBus.Properties.GetAll",
            &["'org.dindhelper1.Manager'"],
        );
        if user == PLAIN {
            assert_eq!(get.dbus_error(), denied, "{user} → Properties.GetAll");
        } else {
            assert_ne!(get.dbus_error(), denied, "{user} → Properties.GetAll");
        }
        let set = bed.gdbus_raw(
            user,
            &bus.address,
            BUS_NAME,
            MANAGER_PATH,
            "org.freedesktop.DBus.Properties.Set",
            &["'org.dindhelper1.Manager'", "'X'", "<1>"],
        );
        if user == PLAIN {
            assert_eq!(set.dbus_error(), denied, "{user} → Properties.Set");
        }
    }
}
