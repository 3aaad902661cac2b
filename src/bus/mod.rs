//! The D-Bus layer: interfaces, options, polkit, error mapping. Thin by design: each
//! method authorizes, converts, calls one `ops` function and maps the result.

pub mod auth;
pub mod capture;
pub mod devices;
pub mod error;
pub mod instances;
pub mod manager;
pub mod objects;
pub mod options;
pub mod ports;
pub mod visibility;

pub const BUS_NAME: &str = "org.dindhelper1";
pub const MANAGER_PATH: &str = "/org/dindhelper1";

/// Ask polkit for `action` on the caller's own resource, then check the `instance` tag
/// (see [`authorize_instance_tag`]).
pub async fn authorize_into_instance(
    auth: &auth::Authorizer,
    core: &crate::ops::Core,
    hdr: &zbus::message::Header<'_>,
    caller: &auth::Caller,
    action: auth::Action,
    instance: Option<&str>,
    interactive: bool,
) -> Result<(), error::BusError> {
    auth.check_caller(hdr, caller, action, false, interactive)
        .await?;
    authorize_instance_tag(auth, core, hdr, caller, instance, interactive).await
}

/// A resource tagged with `instance` joins that instance: DestroyInstance will remove it.
/// The instance must exist, and tagging into another uid's instance needs
/// `org.dindhelper1.instances-others` (else a user could make another user's teardown
/// remove, or fail on, their resources).
pub async fn authorize_instance_tag(
    auth: &auth::Authorizer,
    core: &crate::ops::Core,
    hdr: &zbus::message::Header<'_>,
    caller: &auth::Caller,
    instance: Option<&str>,
    interactive: bool,
) -> Result<(), error::BusError> {
    let Some(name) = instance else {
        return Ok(());
    };
    let rec = crate::ops::instances::get(core, name)
        .await
        .map_err(error::BusError::map)?;
    if rec.owner_uid != caller.uid {
        auth.check_caller(hdr, caller, auth::Action::Instances, true, interactive)
            .await?;
    }
    Ok(())
}

/// polkit details of a managed loop device: `device`, `owner` (uid), `image` and
/// `instance` when it has them.
pub fn loop_details(rec: &crate::state::LoopRecord) -> auth::Details {
    let mut d: auth::Details = vec![
        ("device", rec.device()),
        ("owner", rec.owner_uid.to_string()),
    ];
    if let Some((_, name)) = &rec.image {
        d.push(("image", name.clone()));
    }
    if let Some(i) = &rec.instance {
        d.push(("instance", i.clone()));
    }
    d
}

/// Authorize `action` on managed loop device `device` (as the caller named it): the base
/// action with the device's details for the caller's own device, the `-others` twin as
/// well for another uid's. A device that is not valid or not managed is reported only
/// after the base action was granted (with `device` as given), so a caller without the
/// action cannot probe which devices the daemon manages.
pub async fn authorize_loop(
    auth: &auth::Authorizer,
    core: &crate::ops::Core,
    hdr: &zbus::message::Header<'_>,
    caller: &auth::Caller,
    action: auth::Action,
    device: &str,
    interactive: bool,
) -> Result<crate::state::LoopRecord, error::BusError> {
    let found = match crate::loopdev::parse_device(device) {
        Ok(n) => crate::ops::loops::managed(core, n).await,
        Err(e) => Err(e.into()),
    };
    match found {
        Ok(rec) => {
            let others = rec.owner_uid != caller.uid;
            auth.check_with(
                hdr,
                caller,
                action,
                others,
                interactive,
                &loop_details(&rec),
            )
            .await?;
            Ok(rec)
        }
        Err(e) => {
            let details: auth::Details = vec![("device", device.to_owned())];
            auth.check_with(hdr, caller, action, false, interactive, &details)
                .await?;
            Err(error::BusError::map(e))
        }
    }
}

/// The call frame of every mutating method, written once: hold the gate shared (shutdown
/// takes it exclusively and so waits for calls in flight), identify the caller, run the
/// call, write the audit line with its outcome. A caller that cannot be identified is
/// refused before anything runs (no audit line: there is nobody to name).
pub(crate) async fn audited<T, F, Fut>(
    auth: &auth::Authorizer,
    gate: &tokio::sync::RwLock<()>,
    hdr: &zbus::message::Header<'_>,
    method: &str,
    args: &str,
    call: F,
) -> Result<T, error::BusError>
where
    F: FnOnce(auth::Caller) -> Fut,
    Fut: std::future::Future<Output = Result<T, error::BusError>>,
{
    // Shutdown holds (or waits for) the gate exclusively: a call whose handler starts
    // after that would wait for a gate that is never released again and the process would
    // exit without answering it (seen in the SIGTERM campaign). Answer it now instead:
    // nothing was done.
    let Ok(_g) = gate.try_read() else {
        return Err(error::BusError::from_kind(
            crate::error::Kind::Failed,
            format!("{method}: the daemon is shutting down; nothing was done"),
        ));
    };
    let caller = auth.caller(hdr).await?;
    let r = call(caller.clone()).await;
    audit(&caller, method, args, &r);
    r
}

/// The audit line of a mutating call: caller uid and bus name, method, arguments, outcome.
pub(crate) fn audit<T>(
    caller: &auth::Caller,
    method: &str,
    args: &str,
    r: &Result<T, error::BusError>,
) {
    match r {
        Ok(_) => tracing::info!(uid = caller.uid, caller = %caller.name, method, args, "ok"),
        Err(e) => tracing::info!(uid = caller.uid, caller = %caller.name, method, args,
            error = e.kind_name(), message = %e, "refused or failed"),
    }
}

/// The instance a container belongs to (the one that adopted it): (name, owner uid).
async fn container_owner(core: &crate::ops::Core, id: &str) -> Option<(String, u32)> {
    let st = core.state.lock().await;
    st.instances
        .iter()
        .find(|i| i.containers.iter().any(|c| c == id))
        .map(|i| (i.instance.name.clone(), i.owner_uid))
}

/// Authorize `action` on container `container` (as the caller named it), already resolved
/// to `id`: the base action when it belongs to one of the caller's own instances, the
/// `-others` twin (base checked first) when it belongs to another uid's instance or to
/// none. polkit gets `container`, `container_id`, `instance`, `instance_owner` plus
/// `extra`. Returns the details (for further checks of the same call).
#[allow(clippy::too_many_arguments)] // the call's identity plus the target's
pub async fn authorize_container_id(
    auth: &auth::Authorizer,
    core: &crate::ops::Core,
    hdr: &zbus::message::Header<'_>,
    caller: &auth::Caller,
    action: auth::Action,
    container: &str,
    id: &str,
    interactive: bool,
    extra: auth::Details,
) -> Result<auth::Details, error::BusError> {
    let owner = container_owner(core, id).await;
    let mut details: auth::Details = vec![
        ("container", container.to_owned()),
        ("container_id", id.to_owned()),
    ];
    if let Some((name, uid)) = &owner {
        details.push(("instance", name.clone()));
        details.push(("instance_owner", uid.to_string()));
    }
    details.extend(extra);
    let others = owner.is_none_or(|(_, uid)| uid != caller.uid);
    auth.check_with(hdr, caller, action, others, interactive, &details)
        .await?;
    Ok(details)
}

/// [`authorize_container_id`] after resolving `container` (name, id or `pid:N`) through
/// the container resolver. Returns the resolved id: callers pass it on instead of the
/// name, so the container checked is the container acted on.
#[allow(clippy::too_many_arguments)] // the call's identity plus the target's
pub async fn authorize_container(
    auth: &auth::Authorizer,
    core: &crate::ops::Core,
    hdr: &zbus::message::Header<'_>,
    caller: &auth::Caller,
    action: auth::Action,
    container: &str,
    interactive: bool,
    extra: auth::Details,
) -> Result<String, error::BusError> {
    let rc = crate::ops::instances::resolve_container(core, container)
        .await
        .map_err(error::BusError::map)?;
    authorize_container_id(
        auth,
        core,
        hdr,
        caller,
        action,
        container,
        &rc.id,
        interactive,
        extra,
    )
    .await?;
    Ok(rc.id)
}
