//! The documentation matches the code: every interface, method (with its in/out
//! signatures), property and signal that `dbus/org.dindhelper1.xml` documents is what the
//! running daemon exports, and the daemon exports nothing undocumented, for every
//! org.dindhelper1.* interface on the manager object and on live Loop and Image objects.
//!
//! Clients of other ecosystems parse the live introspection strictly: every object path's
//! XML goes through Python's xml.etree and a dbus-fast proxy is built from it
//! (`introspect_client.py`; zbus writes doc comments as XML comments, where `--` is
//! forbidden — busctl and GDBus do not mind, xml.etree does). The documented XML file is
//! parsed strictly as well.

use crate::bed::{Bed, BUS_NAME, MANAGER_PATH};
use crate::Test;
use std::collections::{BTreeMap, BTreeSet};

pub fn tests() -> Vec<Test> {
    vec![
        Test {
            name: "dbus_xml_documents_exactly_what_the_daemon_exports",
            needs_daemon: true,
            run: dbus_xml_documents_exactly_what_the_daemon_exports,
        },
        Test {
            name: "live_introspection_is_strict_xml_and_builds_a_python_dbus_fast_client",
            needs_daemon: true,
            run: live_introspection_is_strict_xml_and_builds_a_python_dbus_fast_client,
        },
        Test {
            name: "docker_host_other_than_a_unix_socket_is_a_startup_error",
            needs_daemon: false,
            run: docker_host_other_than_a_unix_socket_is_a_startup_error,
        },
        Test {
            name: "second_daemon_on_the_bus_refuses_naming_the_owner",
            needs_daemon: true,
            run: second_daemon_on_the_bus_refuses_naming_the_owner,
        },
    ]
}

/// Debian's interpreter: python3-dbus-fast is installed for it (a pyenv `python3` earlier
/// in PATH would not see the package).
const PYTHON: &str = "/usr/bin/python3";

/// Parse `xml` with xml.etree (strict); Err(message with line and text) when it is not
/// well-formed.
fn strict_parse(xml: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new(PYTHON)
        .args([
            "-c",
            "import sys, xml.etree.ElementTree as ET\n\
             d = sys.stdin.read()\n\
             try:\n    ET.fromstring(d)\n\
             except ET.ParseError as e:\n\
             \x20   l = e.position[0]\n\
             \x20   sys.exit(f'{e}: {d.splitlines()[l-1].strip()!r}')\n",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{PYTHON}: {e} (package python3)"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(xml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn live_introspection_is_strict_xml_and_builds_a_python_dbus_fast_client(bed: &Bed) {
    let doc_path = concat!(env!("CARGO_MANIFEST_DIR"), "/dbus/org.dindhelper1.xml");
    if let Err(e) = strict_parse(&std::fs::read_to_string(doc_path).unwrap()) {
        panic!("{doc_path} is not well-formed XML: {e}");
    }
    // One object of each kind the bed can make without dockerd.
    bed.create_image("root", "apistrict.img", 4 << 20);
    let (loop_obj, dev) = bed.attach_image("root", "apistrict.img", &[]);
    let image_obj = format!("{MANAGER_PATH}/image/u0/apistrict_2eimg");
    let inst = format!("dhapi{}", std::process::id());
    let inst_obj = bed
        .busctl(&[
            "call",
            BUS_NAME,
            MANAGER_PATH,
            "org.dindhelper1.Instances",
            "CreateInstance",
            "sa{sv}",
            &inst,
            "1",
            "tasks_max",
            "t",
            "64",
        ])
        .expect_ok("CreateInstance")
        .json_data()[0]
        .as_str()
        .map(str::to_owned);

    // Each path's XML as busctl gets it, through the strict parser, for a precise report.
    let mut bad = Vec::new();
    for path in [MANAGER_PATH, &loop_obj, &image_obj]
        .into_iter()
        .chain(inst_obj.as_deref())
    {
        let xml = bed
            .busctl(&["introspect", "--xml-interface", BUS_NAME, path])
            .expect_ok(&format!("introspect {path}"))
            .stdout;
        if let Err(e) = strict_parse(&xml) {
            bad.push(format!("{path}: {e}"));
        }
    }
    // The whole tree, walked and bound by the Python client.
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/integration/introspect_client.py"
    );
    let client = crate::bed::run(PYTHON, &[script, &bed.address, BUS_NAME]);

    bed.detach("root", &dev);
    bed.delete_image("root", "apistrict.img");
    if inst_obj.is_some() {
        bed.busctl(&[
            "call",
            BUS_NAME,
            MANAGER_PATH,
            "org.dindhelper1.Instances",
            "DestroyInstance",
            "sa{sv}",
            &inst,
            "0",
        ])
        .expect_ok("DestroyInstance");
    }

    assert!(
        bad.is_empty(),
        "live introspection is not well-formed XML:\n{}",
        bad.join("\n")
    );
    assert!(
        client.ok(),
        "the dbus-fast client failed (python3-dbus-fast installed?): {}",
        client.stderr
    );
    let report: serde_json::Value = serde_json::from_str(&client.stdout)
        .unwrap_or_else(|e| panic!("client output {:?}: {e}", client.stdout));
    let paths = report["paths"].as_object().expect("paths");
    for p in [MANAGER_PATH, &loop_obj, &image_obj]
        .into_iter()
        .chain(inst_obj.as_deref())
    {
        assert!(paths.contains_key(p), "client did not bind {p}: {paths:?}");
    }
    let manager = &paths[MANAGER_PATH];
    for iface in [
        "org.dindhelper1.Manager",
        "org.dindhelper1.Instances",
        "org.dindhelper1.Captures",
        "org.dindhelper1.Devices",
        "org.dindhelper1.Ports",
    ] {
        assert!(
            manager[iface].as_array().is_some_and(|m| !m.is_empty()),
            "{iface} not bound on {MANAGER_PATH}: {manager}"
        );
    }
    assert!(
        report["calls"]["ListLoops"].as_u64().unwrap_or(0) >= 1,
        "{report}"
    );
}

/// `--docker-host` has one parser: anything but `unix:///path` or `/path` stops the daemon
/// before it touches the bus or the kernel, with a message naming the flag.
fn docker_host_other_than_a_unix_socket_is_a_startup_error(bed: &Bed) {
    for bad in [
        "tcp://127.0.0.1:2375",
        "var/run/docker.sock",
        "unix://docker.sock",
    ] {
        let out = std::process::Command::new(Bed::daemon_bin())
            .args(["--bus-address", &bed.address])
            .args([
                "--state-dir",
                &bed.scratch("never-used").display().to_string(),
            ])
            .args(["--docker-host", bad])
            .output()
            .expect("run dindhelperd");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad}: daemon started");
        assert!(err.contains("--docker-host"), "{bad}: {err}");
        assert!(!bed.scratch("never-used").exists(), "{bad}: state dir made");
    }
}

/// interface -> set of member descriptions ("method M(in)->(out)", "property P t",
/// "signal S(args)").
type Api = BTreeMap<String, BTreeSet<String>>;

fn attr(tag: &str, name: &str) -> Option<String> {
    let key = format!("{name}=\"");
    let i = tag.find(&key)? + key.len();
    let j = tag[i..].find('"')? + i;
    Some(tag[i..j].to_owned())
}

/// A small parser for introspection XML (no comments inside tags, as both sides are).
fn parse(xml: &str) -> Api {
    // Drop comments first: the documentation lives in them.
    let mut text = String::new();
    let mut rest = xml;
    while let Some(i) = rest.find("<!--") {
        text.push_str(&rest[..i]);
        match rest[i..].find("-->") {
            Some(j) => rest = &rest[i + j + 3..],
            None => {
                rest = "";
                break;
            }
        }
    }
    text.push_str(rest);

    let mut api = Api::new();
    let mut iface: Option<String> = None;
    let mut member: Option<(String, String, Vec<String>, Vec<String>)> = None; // kind, name, in, out
    for raw in text.split('<').skip(1) {
        let tag = raw.split('>').next().unwrap_or("");
        let closing = tag.starts_with('/');
        let name = tag
            .trim_start_matches('/')
            .split(|c: char| c.is_whitespace() || c == '/')
            .next()
            .unwrap_or("");
        let self_closing = tag.trim_end().ends_with('/');
        match (name, closing) {
            ("interface", false) => iface = attr(tag, "name"),
            ("interface", true) => iface = None,
            ("method" | "signal", false) => {
                member = Some((
                    name.to_owned(),
                    attr(tag, "name").unwrap_or_default(),
                    vec![],
                    vec![],
                ));
                if self_closing {
                    finish(&mut api, &iface, member.take());
                }
            }
            ("method" | "signal", true) => finish(&mut api, &iface, member.take()),
            ("arg", false) => {
                if let Some((kind, _, ins, outs)) = member.as_mut() {
                    let ty = attr(tag, "type").unwrap_or_default();
                    let dir = attr(tag, "direction")
                        .unwrap_or_else(|| if kind == "signal" { "out" } else { "in" }.into());
                    if dir == "in" {
                        ins.push(ty)
                    } else {
                        outs.push(ty)
                    }
                }
            }
            ("property", false) => {
                if let Some(i) = &iface {
                    api.entry(i.clone()).or_default().insert(format!(
                        "property {} {} {}",
                        attr(tag, "name").unwrap_or_default(),
                        attr(tag, "type").unwrap_or_default(),
                        attr(tag, "access").unwrap_or_default()
                    ));
                }
            }
            _ => {}
        }
    }
    api.retain(|k, _| k.starts_with("org.dindhelper1."));
    api
}

fn finish(
    api: &mut Api,
    iface: &Option<String>,
    member: Option<(String, String, Vec<String>, Vec<String>)>,
) {
    if let (Some(i), Some((kind, name, ins, outs))) = (iface, member) {
        api.entry(i.clone()).or_default().insert(format!(
            "{kind} {name}({})->({})",
            ins.join(""),
            outs.join("")
        ));
    }
}

fn live(bed: &Bed, path: &str) -> Api {
    let out = bed
        .busctl(&["introspect", "--xml-interface", BUS_NAME, path])
        .expect_ok(&format!("introspect {path}"));
    parse(&out.stdout)
}

fn dbus_xml_documents_exactly_what_the_daemon_exports(bed: &Bed) {
    let doc_path = concat!(env!("CARGO_MANIFEST_DIR"), "/dbus/org.dindhelper1.xml");
    let documented = parse(&std::fs::read_to_string(doc_path).expect("read the xml"));
    assert!(
        documented.contains_key("org.dindhelper1.Manager"),
        "parser found no Manager in {doc_path}: {documented:?}"
    );

    // Live objects of every kind that needs no extra component.
    bed.create_image("root", "apidoc.img", 4 << 20);
    let (loop_obj, dev) = bed.attach_image("root", "apidoc.img", &[]);
    let image_obj = format!("{MANAGER_PATH}/image/u0/apidoc_2eimg");
    let mut exported = live(bed, MANAGER_PATH);
    exported.extend(live(bed, &loop_obj));
    exported.extend(live(bed, &image_obj));
    bed.detach("root", &dev);
    bed.delete_image("root", "apidoc.img");

    for (iface, members) in &exported {
        let doc = documented.get(iface).unwrap_or_else(|| {
            panic!("interface {iface} is exported but not documented in dbus/org.dindhelper1.xml")
        });
        let missing: Vec<_> = members.difference(doc).collect();
        let stale: Vec<_> = doc.difference(members).collect();
        assert!(
            missing.is_empty() && stale.is_empty(),
            "{iface}: exported but undocumented {missing:#?}; documented but not exported (or different) {stale:#?}"
        );
    }
}

/// The connect step refuses before touching the kernel when the name has an owner.
fn second_daemon_on_the_bus_refuses_naming_the_owner(bed: &Bed) {
    let dir = bed.scratch("second-daemon");
    let out = std::process::Command::new(Bed::daemon_bin())
        .args(["--bus-address", &bed.address])
        .args(["--state-dir", &dir.display().to_string()])
        .output()
        .expect("run dindhelperd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second daemon started");
    assert!(
        err.contains("already owned") && err.contains(":1."),
        "no owner named: {err}"
    );
    assert!(
        bed.name_has_owner(BUS_NAME),
        "the first daemon lost its name"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
