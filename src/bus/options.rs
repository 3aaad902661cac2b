//! The `a{sv} options` argument every method takes: typed getters that name the bad key,
//! and a check that refuses keys the method does not know (a typo must not be ignored).

use super::error::BusError;
use std::collections::HashMap;
use zbus::zvariant::{OwnedValue, Value};

pub type Options = HashMap<String, OwnedValue>;

pub struct Opts<'a> {
    map: &'a Options,
    known: Vec<&'static str>,
}

impl<'a> Opts<'a> {
    pub fn new(map: &'a Options) -> Self {
        Opts {
            map,
            known: vec!["interactive"],
        }
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Value<'static>> {
        self.known.push(key);
        self.map.get(key).map(|v| {
            let v: &Value<'static> = v;
            // Unwrap a variant inside the variant (busctl `v v …`).
            match v {
                Value::Value(inner) => &**inner,
                other => other,
            }
        })
    }

    fn bad(key: &str, want: &str, v: &Value<'_>) -> BusError {
        BusError::InvalidArgs(format!(
            "option {key:?} must be of type {want}, got {}",
            v.value_signature()
        ))
    }

    /// The raw value of a key (marked as known), for methods that accept several types.
    pub fn value(&mut self, key: &'static str) -> Option<&'a Value<'static>> {
        self.get(key)
    }

    pub fn bool(&mut self, key: &'static str) -> Result<Option<bool>, BusError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(Self::bad(key, "b", v)),
        }
    }

    /// Any unsigned or non-negative signed integer type is accepted (busctl users write `t`,
    /// `u` or `i` interchangeably).
    pub fn u64(&mut self, key: &'static str) -> Result<Option<u64>, BusError> {
        let v = match self.get(key) {
            None => return Ok(None),
            Some(v) => v,
        };
        let n: i128 = match v {
            Value::U8(n) => *n as i128,
            Value::U16(n) => *n as i128,
            Value::U32(n) => *n as i128,
            Value::U64(n) => *n as i128,
            Value::I16(n) => *n as i128,
            Value::I32(n) => *n as i128,
            Value::I64(n) => *n as i128,
            v => return Err(Self::bad(key, "t (unsigned integer)", v)),
        };
        u64::try_from(n)
            .map(Some)
            .map_err(|_| BusError::InvalidArgs(format!("option {key:?} must not be negative")))
    }

    pub fn i64(&mut self, key: &'static str) -> Result<Option<i64>, BusError> {
        let v = match self.get(key) {
            None => return Ok(None),
            Some(v) => v,
        };
        match v {
            Value::U8(n) => Ok(Some(*n as i64)),
            Value::U16(n) => Ok(Some(*n as i64)),
            Value::U32(n) => Ok(Some(*n as i64)),
            Value::U64(n) => i64::try_from(*n)
                .map(Some)
                .map_err(|_| BusError::InvalidArgs(format!("option {key:?} is too large"))),
            Value::I16(n) => Ok(Some(*n as i64)),
            Value::I32(n) => Ok(Some(*n as i64)),
            Value::I64(n) => Ok(Some(*n)),
            v => Err(Self::bad(key, "x (integer)", v)),
        }
    }

    pub fn string(&mut self, key: &'static str) -> Result<Option<String>, BusError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s.to_string())),
            Some(v) => Err(Self::bad(key, "s", v)),
        }
    }

    /// The `interactive` option (default false).
    pub fn interactive(&self) -> Result<bool, BusError> {
        interactive(self.map)
    }

    /// Call after reading every option the method knows.
    pub fn finish(self) -> Result<(), BusError> {
        let mut unknown: Vec<&str> = self
            .map
            .keys()
            .map(String::as_str)
            .filter(|k| !self.known.contains(k))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        unknown.sort();
        let mut known = self.known.clone();
        known.sort();
        known.dedup();
        Err(BusError::InvalidArgs(format!(
            "unknown option(s) {unknown:?}; this method accepts {known:?}"
        )))
    }
}

/// Options as `key=value …` for the audit log, sorted by key.
pub fn describe(map: &Options) -> String {
    let mut v: Vec<String> = map
        .iter()
        .map(|(k, v)| {
            let v: &Value<'_> = v;
            format!("{k}={v}")
        })
        .collect();
    v.sort();
    v.join(" ")
}

/// Whether the caller allows polkit to ask for a password.
pub fn interactive(map: &Options) -> Result<bool, BusError> {
    Opts::new(map)
        .bool("interactive")
        .map(|b| b.unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, Value<'static>)]) -> Options {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OwnedValue::try_from(v.clone()).unwrap()))
            .collect()
    }

    #[test]
    fn typed_getters_and_unknown_keys() {
        let m = opts(&[
            ("read_only", Value::Bool(true)),
            ("offset", Value::U32(4096)),
            ("instance", Value::from("lab-1")),
        ]);
        let mut o = Opts::new(&m);
        assert_eq!(o.bool("read_only").unwrap(), Some(true));
        assert_eq!(o.u64("offset").unwrap(), Some(4096));
        assert_eq!(o.string("instance").unwrap(), Some("lab-1".into()));
        assert_eq!(o.bool("partscan").unwrap(), None);
        assert!(o.finish().is_ok());

        let m = opts(&[("red_only", Value::Bool(true))]);
        let mut o = Opts::new(&m);
        o.bool("read_only").unwrap();
        let e = o.finish().unwrap_err();
        assert!(matches!(e, BusError::InvalidArgs(ref s) if s.contains("red_only")));
    }

    #[test]
    fn wrong_types_and_negatives_are_named() {
        let m = opts(&[("offset", Value::from("x")), ("size", Value::I32(-1))]);
        let mut o = Opts::new(&m);
        assert!(matches!(o.u64("offset"), Err(BusError::InvalidArgs(s)) if s.contains("offset")));
        assert!(matches!(o.u64("size"), Err(BusError::InvalidArgs(s)) if s.contains("negative")));
    }
}
