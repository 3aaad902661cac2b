//! Exit codes per error class (documented in `--help` and the man page, see
//! `cli::AFTER_HELP`): a script can tell "not allowed" from "not there" from "in use"
//! without parsing messages.

use std::process::ExitCode;

pub const LOCAL: u8 = 1;

/// Context marking "the bus could not be reached" (set by `connect`).
#[derive(Debug)]
pub struct Unreachable;

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cannot reach the bus")
    }
}
pub const UNREACHABLE: u8 = 10;
pub const UNKNOWN_METHOD: u8 = 11;

/// The D-Bus error name behind an error, if it came from a method call.
pub fn dbus_error_name(e: &anyhow::Error) -> Option<String> {
    for cause in e.chain() {
        if let Some(z) = cause.downcast_ref::<zbus::Error>() {
            return match z {
                zbus::Error::MethodError(name, _, _) => Some(name.as_str().to_owned()),
                zbus::Error::FDO(f) => Some(fdo_name(f)),
                _ => None,
            };
        }
        if let Some(f) = cause.downcast_ref::<zbus::fdo::Error>() {
            return Some(fdo_name(f));
        }
    }
    None
}

fn fdo_name(f: &zbus::fdo::Error) -> String {
    use zbus::DBusError;
    f.name().as_str().to_owned()
}

/// Whether the error is "could not talk to the daemon at all".
fn is_unreachable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Unreachable>().is_some()
        || e.chain().any(|c| {
            matches!(
                c.downcast_ref::<zbus::Error>(),
                Some(
                    zbus::Error::InputOutput(_)
                        | zbus::Error::Address(_)
                        | zbus::Error::Handshake(_)
                )
            )
        })
}

/// The exit code for a D-Bus error name (None: not a daemon error).
pub fn code_for_name(name: &str) -> u8 {
    match name {
        "org.dindhelper1.Error.NotAuthorized" => 3,
        "org.dindhelper1.Error.InvalidArgs" => 4,
        "org.dindhelper1.Error.NotFound" => 5,
        "org.dindhelper1.Error.Busy" => 6,
        "org.dindhelper1.Error.Conflict" => 7,
        "org.dindhelper1.Error.NotSupported" => 8,
        "org.freedesktop.DBus.Error.ServiceUnknown"
        | "org.freedesktop.DBus.Error.NameHasNoOwner"
        | "org.freedesktop.DBus.Error.NoReply"
        | "org.freedesktop.DBus.Error.Disconnected" => UNREACHABLE,
        "org.freedesktop.DBus.Error.UnknownMethod"
        | "org.freedesktop.DBus.Error.UnknownInterface"
        | "org.freedesktop.DBus.Error.UnknownObject" => UNKNOWN_METHOD,
        "org.freedesktop.DBus.Error.AccessDenied" => 3,
        _ => 9,
    }
}

pub fn code(e: &anyhow::Error) -> ExitCode {
    let c = match dbus_error_name(e) {
        Some(n) => code_for_name(&n),
        None if is_unreachable(e) => UNREACHABLE,
        None => LOCAL,
    };
    ExitCode::from(c)
}

#[cfg(test)]
mod tests {
    use super::code_for_name;

    #[test]
    fn classes_have_distinct_codes() {
        let names = [
            "NotAuthorized",
            "InvalidArgs",
            "NotFound",
            "Busy",
            "Conflict",
            "NotSupported",
            "Failed",
        ];
        let codes: Vec<u8> = names
            .iter()
            .map(|n| code_for_name(&format!("org.dindhelper1.Error.{n}")))
            .collect();
        assert_eq!(codes, [3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(
            code_for_name("org.freedesktop.DBus.Error.ServiceUnknown"),
            10
        );
        assert_eq!(
            code_for_name("org.freedesktop.DBus.Error.UnknownMethod"),
            11
        );
    }
}
