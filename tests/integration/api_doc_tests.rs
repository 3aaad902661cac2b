//! The documentation matches the code: every interface, method (with its in/out
//! signatures), property and signal that `dbus/org.dindhelper1.xml` documents is what the
//! running daemon exports, and the daemon exports nothing undocumented, for every
//! org.dindhelper1.* interface on the manager object and on live Loop and Image objects.

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
            name: "docker_host_other_than_a_unix_socket_is_a_startup_error",
            needs_daemon: false,
            run: docker_host_other_than_a_unix_socket_is_a_startup_error,
        },
    ]
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
