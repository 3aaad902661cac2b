//! Output: a human table (columns padded to the widest cell) or, with `--json`, an array
//! of objects keyed by the same column names in lower snake case. D-Bus values of unknown
//! shape (signal bodies, a{sv} limits, newer methods) go through [`to_json`].

use serde_json::{Map, Value as Json};
use zbus::zvariant::Value;

pub struct Table {
    cols: Vec<&'static str>,
    rows: Vec<Vec<Json>>,
}

impl Table {
    pub fn new(cols: &[&'static str]) -> Table {
        Table {
            cols: cols.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<Json>) {
        debug_assert_eq!(cells.len(), self.cols.len());
        self.rows.push(cells);
    }

    pub fn json(&self) -> Json {
        Json::Array(
            self.rows
                .iter()
                .map(|r| {
                    let mut m = Map::new();
                    for (c, v) in self.cols.iter().zip(r) {
                        m.insert(c.to_lowercase().replace(' ', "_"), v.clone());
                    }
                    Json::Object(m)
                })
                .collect(),
        )
    }

    pub fn print(&self, json: bool) {
        if json {
            println!("{}", self.json());
            return;
        }
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| r.iter().map(human).collect())
            .collect();
        let mut w: Vec<usize> = self.cols.iter().map(|c| c.len()).collect();
        for r in &cells {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |r: Vec<String>| {
            let n = r.len();
            let mut s = String::new();
            for (i, c) in r.into_iter().enumerate() {
                if i + 1 == n {
                    s.push_str(&c);
                } else {
                    let pad = w[i] - c.chars().count();
                    s.push_str(&c);
                    s.push_str(&" ".repeat(pad + 2));
                }
            }
            println!("{}", s.trim_end());
        };
        line(self.cols.iter().map(|c| c.to_uppercase()).collect());
        for r in cells {
            line(r);
        }
    }
}

/// A cell as a human reads it: strings bare, "" as "-", objects as k=v lists.
pub fn human(v: &Json) -> String {
    match v {
        Json::String(s) if s.is_empty() => "-".to_owned(),
        Json::String(s) => s.clone(),
        Json::Null => "-".to_owned(),
        Json::Object(m) if m.is_empty() => "-".to_owned(),
        Json::Object(m) => m
            .iter()
            .map(|(k, v)| format!("{k}={}", human(v)))
            .collect::<Vec<_>>()
            .join(","),
        Json::Array(a) if a.is_empty() => "-".to_owned(),
        Json::Array(a) => a.iter().map(human).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Any D-Bus value as JSON: dicts become objects (keys as strings), structs and arrays
/// arrays, variants their content.
pub fn to_json(v: &Value<'_>) -> Json {
    match v {
        Value::U8(x) => (*x).into(),
        Value::Bool(x) => (*x).into(),
        Value::I16(x) => (*x).into(),
        Value::U16(x) => (*x).into(),
        Value::I32(x) => (*x).into(),
        Value::U32(x) => (*x).into(),
        Value::I64(x) => (*x).into(),
        Value::U64(x) => (*x).into(),
        Value::F64(x) => (*x).into(),
        Value::Str(s) => s.as_str().into(),
        Value::Signature(s) => s.to_string().into(),
        Value::ObjectPath(p) => p.as_str().into(),
        Value::Value(b) => to_json(b),
        Value::Array(a) => Json::Array(a.iter().map(to_json).collect()),
        Value::Dict(d) => {
            let mut m = Map::new();
            for (k, v) in d.iter() {
                let key = match to_json(k) {
                    Json::String(s) => s,
                    other => other.to_string(),
                };
                m.insert(key, to_json(v));
            }
            Json::Object(m)
        }
        Value::Structure(s) => Json::Array(s.fields().iter().map(to_json).collect()),
        Value::Fd(_) => "<fd>".into(),
    }
}

/// A one-off result: JSON object with --json, else `key: value` lines (or just the values
/// when there is one).
pub fn result(json: bool, fields: &[(&str, Json)]) {
    if json {
        let mut m = Map::new();
        for (k, v) in fields {
            m.insert((*k).to_owned(), v.clone());
        }
        println!("{}", Json::Object(m));
    } else if fields.len() == 1 {
        let v = &fields[0].1;
        match v {
            Json::Array(a) => {
                for x in a {
                    println!("{}", human(x));
                }
            }
            _ => println!("{}", human(v)),
        }
    } else {
        for (k, v) in fields {
            println!("{k}: {}", human(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn json_rows_use_snake_case_column_names() {
        let mut t = Table::new(&["id", "host port", "state"]);
        t.row(vec!["a".into(), 8080.into(), "active".into()]);
        assert_eq!(
            t.json(),
            serde_json::json!([{"id": "a", "host_port": 8080, "state": "active"}])
        );
    }

    #[test]
    fn dbus_values_become_json() {
        let mut d: HashMap<String, Value<'_>> = HashMap::new();
        d.insert("memory_max".into(), Value::U64(1 << 30));
        let v = Value::from(d);
        assert_eq!(
            to_json(&v),
            serde_json::json!({"memory_max": 1073741824u64})
        );
        assert_eq!(human(&to_json(&v)), "memory_max=1073741824");
    }
}
