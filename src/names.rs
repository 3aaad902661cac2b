//! Validation of caller-supplied names. Names never become paths before they pass here.

/// Error for a name that does not follow the rules.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {what} {name:?}: {why}")]
pub struct NameError {
    pub what: &'static str,
    pub name: String,
    pub why: &'static str,
}

impl crate::error::Classify for NameError {
    fn kind(&self) -> crate::error::Kind {
        crate::error::Kind::InvalidArgs
    }
}

/// Image and capture names: `[A-Za-z0-9._-]{1,64}`, no leading dot.
pub fn check_file_name(what: &'static str, name: &str) -> Result<(), NameError> {
    let err = |why| {
        Err(NameError {
            what,
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() {
        return err("must not be empty");
    }
    if name.len() > 64 {
        return err("must be at most 64 characters");
    }
    if name.starts_with('.') {
        return err("must not start with a dot");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return err("may contain only A-Z a-z 0-9 . _ -");
    }
    Ok(())
}

/// Instance names: `[a-z0-9-]{1,48}`.
pub fn check_instance_name(name: &str) -> Result<(), NameError> {
    let err = |why| {
        Err(NameError {
            what: "instance name",
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() {
        return err("must not be empty");
    }
    if name.len() > 48 {
        return err("must be at most 48 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return err("may contain only a-z 0-9 -");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        assert!(check_file_name("image name", "disk-1.img_x").is_ok());
        for bad in [
            "",
            ".hidden",
            "a/b",
            "..",
            "../x",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(check_file_name("image name", bad).is_err(), "{bad:?}");
        }
        assert!(check_file_name("image name", &"x".repeat(64)).is_ok());
    }

    #[test]
    fn instance_names() {
        assert!(check_instance_name("lab-01").is_ok());
        for bad in ["", "Lab", "a_b", "a.b", &"x".repeat(49)] {
            assert!(check_instance_name(bad).is_err(), "{bad:?}");
        }
    }
}
