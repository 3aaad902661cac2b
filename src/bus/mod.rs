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
