//! Published ports against Docker's exact firewall layouts, without that Docker version's
//! daemon (root; run under the global lock).
//!
//! Each layout is a fixture in `tests/fixtures/docker-layouts/`, taken verbatim from moby's
//! golden documents (`integration/network/bridge/iptablesdoc/generated/*.md`, the
//! `iptables -S` output per table): Docker 28.0.0 (FORWARD → DOCKER through ipset
//! `docker-ext-bridges-v4`) and Docker 28.5.2 (FORWARD → DOCKER-FORWARD → DOCKER-BRIDGE →
//! DOCKER, raw PREROUTING drops for direct access), for a new daemon, a user network
//! with a published port, the same without ICC, and a routed-mode network.
//!
//! Per layout, in namespaces this test creates (never the host's):
//! - `h` ("the host", where dockerd would run) gets Docker's rules through
//!   `iptables-nft-restore` (checked byte for byte against the fixture with `iptables -S`),
//!   the bridge of the layout and a veth to a client namespace (`h` 10.99.0.1, client
//!   10.99.0.2);
//! - the container namespace on the bridge (192.0.2.2 or 172.17.0.2) runs TCP and UDP
//!   echo servers;
//! - the domain layer ([`PortsManager`]) publishes, with a table standing in for dockerd
//!   ([`Resolver`]); real TCP and UDP pass from the client; the container reaches its own
//!   published port (hairpin); Docker's own published port keeps working; direct access to
//!   the container's address stays dropped where Docker drops it;
//! - unpublish leaves `iptables -S` byte-identical to Docker's layout;
//! - Docker re-creating its rules (a dockerd restart flushes and rewrites them) drops
//!   ours; reconcile restores them and traffic passes again.
//!
//! Docker 29's nftables backend (`nftables-v29/*.nft`, from moby's
//! `integration/network/bridge/nftablesdoc/generated/*.md`; see [`run_nft_layout`]): the
//! same proofs, plus NotSupported naming `--bridge-accept-fwmark` while Docker's table has
//! no accept mark, the mark confined to DNATed packets (direct access stays dropped),
//! `nft -s list ruleset` byte-identical after unpublish, our table surviving Docker's
//! table being re-created, and reconcile after `nft flush ruleset`. One layout has IPv6
//! (`usernet-portmap-ipv6.nft`: Docker's `ip6 docker-bridges` beside its ip table, written
//! from moby's nftabler sources, see the fixture's header): the same proofs over IPv6
//! (client `2001:db8:99::2` to the host's `2001:db8:99::1`, container `2001:db8::2`).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dindhelper::docker::{ContainerInfo, DockerError, NetworkAttachment, PublishedPort};
use dindhelper::ports::resolver::DockerFut;
use dindhelper::ports::{
    Action, MappingState, NetnsContext, PortsManager, PublishRequest, Resolver,
};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/docker-layouts");
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The host's address towards the client in IPv6 layouts (client 2001:db8:99::2).
const HOST_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 1);
/// Ports we publish (host side) and the container's servers behind them.
const TCP_HOST: u16 = 9090;
const TCP_CTR: u16 = 90;
const UDP_HOST: u16 = 9091;
const UDP_CTR: u16 = 91;
/// Docker's own mapping in the usernet layouts: 8080 -> :80.
const DOCKER_HOST: u16 = 8080;
const DOCKER_CTR: u16 = 80;

/// One layout: the fixture and the network it describes.
struct Layout {
    fixture: &'static str,
    bridge: &'static str,
    gateway: &'static str,
    prefix: u8,
    container_ip: Ipv4Addr,
    /// Docker publishes 8080 -> container:80 in this layout.
    docker_port: bool,
    /// The layout matches on ipset docker-ext-bridges-v4 (Docker 28.0.0).
    ipset: bool,
    /// IPv6 on the network: the container's address and the bridge's (gateway), /64.
    container_ip6: Option<Ipv6Addr>,
    gateway6: &'static str,
}

const USERNET: Layout = Layout {
    fixture: "",
    bridge: "bridge1",
    gateway: "192.0.2.1",
    prefix: 24,
    container_ip: Ipv4Addr::new(192, 0, 2, 2),
    docker_port: true,
    ipset: false,
    container_ip6: None,
    gateway6: "",
};

const DEFAULT_BRIDGE: Layout = Layout {
    fixture: "",
    bridge: "docker0",
    gateway: "172.17.0.1",
    prefix: 16,
    container_ip: Ipv4Addr::new(172, 17, 0, 2),
    docker_port: false,
    ipset: false,
    container_ip6: None,
    gateway6: "",
};

fn sh(args: &[&str]) -> std::process::Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run a program inside the namespace file `ns` (nsenter, never `ip netns exec`).
fn in_ns(ns: &Path, args: &[&str]) -> std::process::Output {
    let mut a = vec!["nsenter".to_string(), format!("--net={}", ns.display())];
    a.extend(args.iter().map(|s| s.to_string()));
    let v: Vec<&str> = a.iter().map(String::as_str).collect();
    sh(&v)
}

fn in_ns_stdin(ns: &Path, args: &[&str], stdin: &str) {
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nsenter");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run `f` on a fresh thread that joined namespace `ns`; sockets it makes live there.
fn on_ns_thread<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(ns).expect("open netns");
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

/// The namespaces of one layout run; removed on drop.
struct Net {
    names: Vec<String>,
    /// A process in the container namespace: the "container's init" the resolver reports
    /// (the domain finds the container's veth through /proc/PID/ns/net).
    init: Option<std::process::Child>,
}

impl Net {
    fn path(&self, i: usize) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.names[i]))
    }
    fn host(&self) -> PathBuf {
        self.path(0)
    }
    fn ctr(&self) -> PathBuf {
        self.path(1)
    }
    fn client(&self) -> PathBuf {
        self.path(2)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(mut c) = self.init.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.names {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Docker's rules of `fixture`: per table, the `iptables -S` lines.
fn fixture_tables(fixture: &str) -> Vec<(String, Vec<String>)> {
    let text = std::fs::read_to_string(Path::new(FIXTURES).join(fixture))
        .unwrap_or_else(|e| panic!("fixture {fixture}: {e}"));
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for l in text.lines() {
        if l.starts_with('#') || l.trim().is_empty() {
            continue;
        }
        if let Some(t) = l.strip_prefix('*') {
            out.push((t.to_owned(), vec![]));
        } else {
            out.last_mut()
                .expect("a *table line first")
                .1
                .push(l.to_owned());
        }
    }
    out
}

/// `iptables -S` lines as `iptables-restore` input (a full restore: this namespace is
/// ours and the tables are exactly Docker's afterwards).
fn restore_text(tables: &[(String, Vec<String>)]) -> String {
    let mut s = String::new();
    for (t, lines) in tables {
        s.push_str(&format!("*{t}\n"));
        for l in lines {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["-P", chain, policy] => s.push_str(&format!(":{chain} {policy} [0:0]\n")),
                ["-N", chain] => s.push_str(&format!(":{chain} - [0:0]\n")),
                _ => s.push_str(&format!("{l}\n")),
            }
        }
        s.push_str("COMMIT\n");
    }
    s
}

/// The live `iptables-nft -S` of every table the fixture has.
fn live_tables(ns: &Path, tables: &[(String, Vec<String>)]) -> Vec<(String, Vec<String>)> {
    tables
        .iter()
        .map(|(t, _)| {
            let out = in_ns(ns, &["iptables-nft", "-w", "-t", t, "-S"]);
            (
                t.clone(),
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(str::to_owned)
                    .collect(),
            )
        })
        .collect()
}

fn load_docker_rules(net: &Net, layout: &Layout, tables: &[(String, Vec<String>)]) {
    if layout.ipset {
        // Docker 28.0.0 creates the set before its rules refer to it
        let h = net.host();
        let _ = Command::new("nsenter")
            .arg(format!("--net={}", h.display()))
            .args(["ipset", "create", "docker-ext-bridges-v4", "hash:net"])
            .status();
        for net in ["172.17.0.0/16", "192.0.2.0/24"] {
            in_ns(
                &h,
                &["ipset", "add", "-exist", "docker-ext-bridges-v4", net],
            );
        }
    }
    in_ns_stdin(
        &net.host(),
        &["iptables-nft-restore", "-w"],
        &restore_text(tables),
    );
}

fn setup(tag: &str, layout: &Layout) -> Net {
    let pid = std::process::id();
    let net = Net {
        names: ["h", "c", "cl"]
            .iter()
            .map(|r| format!("dhl-{pid}-{tag}-{r}"))
            .collect(),
        init: None,
    };
    for n in &net.names {
        let _ = Command::new("ip")
            .args(["netns", "del", n])
            .stderr(Stdio::null())
            .status();
        sh(&["ip", "netns", "add", n]);
        sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        if layout.container_ip6.is_some() {
            // no duplicate address detection on the links made next: their link-local
            // addresses would stay tentative for ~2 s and the first IPv6 connection
            // times out meanwhile
            let ns = PathBuf::from(format!("/run/netns/{n}"));
            in_ns(
                &ns,
                &["sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0"],
            );
        }
    }
    let (h, c, cl) = (&net.names[0], &net.names[1], &net.names[2]);
    // the bridge and the container behind it
    sh(&[
        "ip",
        "-n",
        h,
        "link",
        "add",
        layout.bridge,
        "type",
        "bridge",
    ]);
    let gw = format!("{}/{}", layout.gateway, layout.prefix);
    sh(&["ip", "-n", h, "addr", "add", &gw, "dev", layout.bridge]);
    sh(&["ip", "-n", h, "link", "set", layout.bridge, "up"]);
    sh(&[
        "ip", "-n", h, "link", "add", "vc", "type", "veth", "peer", "name", "eth0", "netns", c,
    ]);
    sh(&[
        "ip",
        "-n",
        h,
        "link",
        "set",
        "vc",
        "master",
        layout.bridge,
        "up",
    ]);
    let cip = format!("{}/{}", layout.container_ip, layout.prefix);
    sh(&["ip", "-n", c, "addr", "add", &cip, "dev", "eth0"]);
    sh(&["ip", "-n", c, "link", "set", "eth0", "up"]);
    sh(&[
        "ip",
        "-n",
        c,
        "route",
        "add",
        "default",
        "via",
        layout.gateway,
    ]);
    // the client, one hop away
    sh(&[
        "ip", "-n", h, "link", "add", "vcl", "type", "veth", "peer", "name", "eth0", "netns", cl,
    ]);
    sh(&["ip", "-n", h, "addr", "add", "10.99.0.1/24", "dev", "vcl"]);
    sh(&["ip", "-n", h, "link", "set", "vcl", "up"]);
    sh(&["ip", "-n", cl, "addr", "add", "10.99.0.2/24", "dev", "eth0"]);
    sh(&["ip", "-n", cl, "link", "set", "eth0", "up"]);
    // so the client can even try the container's address directly
    let subnet = format!("{}/{}", layout.container_ip, 32);
    sh(&["ip", "-n", cl, "route", "add", &subnet, "via", "10.99.0.1"]);
    in_ns(
        &net.host(),
        &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
    );
    if let Some(c6) = layout.container_ip6 {
        // the same over IPv6
        let gw6 = format!("{}/64", layout.gateway6);
        let c6net = format!("{c6}/64");
        let c6host = format!("{c6}/128");
        for (ns, addr, dev) in [
            (h, gw6.as_str(), layout.bridge),
            (c, c6net.as_str(), "eth0"),
            (h, "2001:db8:99::1/64", "vcl"),
            (cl, "2001:db8:99::2/64", "eth0"),
        ] {
            sh(&["ip", "-n", ns, "-6", "addr", "add", addr, "dev", dev]);
        }
        sh(&[
            "ip",
            "-n",
            c,
            "-6",
            "route",
            "add",
            "default",
            "via",
            layout.gateway6,
        ]);
        sh(&[
            "ip",
            "-n",
            cl,
            "-6",
            "route",
            "add",
            &c6host,
            "via",
            "2001:db8:99::1",
        ]);
        in_ns(
            &net.host(),
            &["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"],
        );
    }
    let mut net = net;
    net.init = Some(
        Command::new("nsenter")
            .arg(format!("--net={}", net.ctr().display()))
            .args(["sleep", "3600"])
            .spawn()
            .expect("container init"),
    );
    net
}

/// TCP servers answering `tcp<port>` and UDP servers echoing `udp<port>`, in the container.
fn serve(ctr: &Path, tcp: &[u16], udp: &[u16]) {
    let tcp = tcp.to_vec();
    let udp = udp.to_vec();
    let (ls, us) = on_ns_thread(ctr, move || {
        // "::" takes IPv4 too (bindv6only is 0 in a new namespace)
        let any = IpAddr::from(Ipv6Addr::UNSPECIFIED);
        let ls: Vec<(u16, TcpListener)> = tcp
            .iter()
            .map(|p| (*p, TcpListener::bind((any, *p)).expect("bind tcp")))
            .collect();
        let us: Vec<(u16, UdpSocket)> = udp
            .iter()
            .map(|p| (*p, UdpSocket::bind((any, *p)).expect("bind udp")))
            .collect();
        (ls, us)
    });
    for (p, l) in ls {
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let _ = s.write_all(format!("tcp{p}").as_bytes());
            }
        });
    }
    for (p, u) in us {
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((_, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(format!("udp{p}").as_bytes(), from);
            }
        });
    }
}

/// TCP from namespace `ns` to `to`: what the server said, None when it did not answer.
fn tcp_from(ns: &Path, to: SocketAddr) -> Option<String> {
    on_ns_thread(ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_millis(700)).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(700))).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })
}

/// One UDP datagram from namespace `ns` to `to` and its answer (retried 3 times).
fn udp_from(ns: &Path, to: SocketAddr) -> Option<String> {
    on_ns_thread(ns, move || {
        let any = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
        let u = UdpSocket::bind(any).ok()?;
        u.set_read_timeout(Some(Duration::from_millis(300))).ok()?;
        for _ in 0..3 {
            u.send_to(b"ping", to).ok()?;
            let mut buf = [0u8; 64];
            if let Ok((n, _)) = u.recv_from(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        None
    })
}

/// A table standing in for dockerd: one running container `c1`.
struct Table {
    info: ContainerInfo,
    docker_ports: Vec<PublishedPort>,
}

impl Resolver for Table {
    fn inspect<'a>(&'a self, container: &'a str) -> DockerFut<'a, ContainerInfo> {
        Box::pin(async move {
            if container == self.info.name || container == self.info.id {
                Ok(self.info.clone())
            } else {
                Err(DockerError::NotFound {
                    what: "container",
                    name: container.to_owned(),
                })
            }
        })
    }

    fn published_ports(&self) -> DockerFut<'_, Vec<PublishedPort>> {
        Box::pin(async move { Ok(self.docker_ports.clone()) })
    }
}

fn table(layout: &Layout, pid: u32) -> Arc<Table> {
    let network = if layout.bridge == "docker0" {
        "bridge"
    } else {
        "bridge1"
    };
    Arc::new(Table {
        info: ContainerInfo {
            id: "c1c1c1c1c1c1c1c1".into(),
            name: "c1".into(),
            running: true,
            pid,
            network_mode: network.into(),
            networks: vec![NetworkAttachment {
                network_name: network.into(),
                network_id: "n1".into(),
                ip: Some(layout.container_ip),
                ip6: layout.container_ip6,
                bridge_interface: Some(layout.bridge.into()),
            }],
        },
        docker_ports: if layout.docker_port {
            vec![PublishedPort {
                container_id: "c1c1c1c1c1c1c1c1".into(),
                ip: "0.0.0.0".into(),
                public_port: DOCKER_HOST,
                private_port: DOCKER_CTR,
                protocol: "tcp".into(),
            }]
        } else {
            vec![]
        },
    })
}

fn req(proto: &str, host: u16, ctr: u16) -> PublishRequest {
    PublishRequest {
        container: "c1".into(),
        protocol: proto.into(),
        host_port: host.into(),
        container_port: ctr.into(),
        owner_uid: 0,
        ..Default::default()
    }
}

fn host(port: u16) -> SocketAddr {
    SocketAddr::from((HOST_IP, port))
}

fn host6(port: u16) -> SocketAddr {
    SocketAddr::from((HOST_IP6, port))
}

/// Our ports answer over TCP and UDP from the client, and from the container itself.
fn assert_ports_work(net: &Net, what: &str) {
    assert_ports_work_at(net, what, host, "");
}

/// The same over IPv6: from the client to the host's IPv6 address, and hairpin.
fn assert_ports_work6(net: &Net, what: &str) {
    assert_ports_work_at(net, what, host6, " over IPv6");
}

/// TCP and UDP from the client and from the container (hairpin) to `at(port)`.
fn assert_ports_work_at(net: &Net, what: &str, at: fn(u16) -> SocketAddr, over: &str) {
    let hp = if over.is_empty() { "" } else { " IPv6" };
    assert_eq!(
        tcp_from(&net.client(), at(TCP_HOST)).as_deref(),
        Some("tcp90"),
        "{what}: TCP{over} from the client"
    );
    assert_eq!(
        udp_from(&net.client(), at(UDP_HOST)).as_deref(),
        Some("udp91"),
        "{what}: UDP{over} from the client"
    );
    assert_eq!(
        tcp_from(&net.ctr(), at(TCP_HOST)).as_deref(),
        Some("tcp90"),
        "{what}:{hp} hairpin (the container to its own published port)"
    );
    assert_eq!(
        udp_from(&net.ctr(), at(UDP_HOST)).as_deref(),
        Some("udp91"),
        "{what}: UDP{hp} hairpin"
    );
}

fn run_layout(tag: &str, layout: Layout) {
    let t0 = Instant::now();
    let tables = fixture_tables(layout.fixture);
    let net = setup(tag, &layout);
    load_docker_rules(&net, &layout, &tables);
    assert_eq!(
        live_tables(&net.host(), &tables),
        tables,
        "the namespace must hold exactly Docker's rules of {}",
        layout.fixture
    );
    serve(&net.ctr(), &[TCP_CTR, DOCKER_CTR], &[UDP_CTR]);
    assert_eq!(
        tcp_from(&net.client(), host(TCP_HOST)),
        None,
        "nothing published yet"
    );
    let docker_port_works = |what: &str| {
        if layout.docker_port {
            assert_eq!(
                tcp_from(&net.client(), host(DOCKER_HOST)).as_deref(),
                Some("tcp80"),
                "{what}: Docker's own published port"
            );
        }
    };
    docker_port_works("Docker's layout alone");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let netns = NetnsContext::open(&net.host()).unwrap();
        let m = PortsManager::with_resolver(
            table(&layout, net.init.as_ref().unwrap().id()),
            netns,
            "1a70u7",
        );
        let fw = m.firewall().await.expect("detect");
        println!("{}: {} ({})", layout.fixture, fw.name, fw.reason);
        assert_eq!(fw.name, "iptables-nft");
        let maps = m
            .publish_many(vec![
                req("tcp", TCP_HOST, TCP_CTR),
                req("udp", UDP_HOST, UDP_CTR),
            ])
            .await
            .expect("publish");
        // Docker's own mapping is a conflict, not a second rule
        if layout.docker_port {
            let e = m.publish(req("tcp", DOCKER_HOST, 81)).await.unwrap_err();
            assert!(e.to_string().contains("published by Docker"), "{e}");
        }
        assert_ports_work(&net, "published");
        docker_port_works("beside ours");
        if tables.iter().any(|(t, _)| t == "raw") {
            // Docker's direct-access drop still holds for the container's address
            let direct = SocketAddr::from((layout.container_ip, TCP_CTR));
            assert_eq!(
                tcp_from(&net.client(), direct),
                None,
                "direct access to the container must stay dropped (raw PREROUTING)"
            );
        }

        // unpublish: Docker's layout again, byte for byte
        m.unpublish_many(maps.iter().map(|x| x.id.clone()).collect())
            .await
            .expect("unpublish");
        assert_eq!(
            live_tables(&net.host(), &tables),
            tables,
            "after unpublish the rules must be Docker's exactly"
        );
        assert_eq!(tcp_from(&net.client(), host(TCP_HOST)), None, "unpublished");

        // Docker re-creates its rules (a dockerd restart): ours are gone; reconcile
        m.publish_many(vec![
            req("tcp", TCP_HOST, TCP_CTR),
            req("udp", UDP_HOST, UDP_CTR),
        ])
        .await
        .expect("publish again");
        assert_ports_work(&net, "published again");
        load_docker_rules(&net, &layout, &tables);
        assert_eq!(live_tables(&net.host(), &tables), tables);
        assert_eq!(
            tcp_from(&net.client(), host(TCP_HOST)),
            None,
            "rules flushed"
        );
        let ds = m.reconcile().await.expect("reconcile");
        assert!(
            ds.iter().all(|d| matches!(
                d.action,
                Action::Repaired {
                    added: 3,
                    removed: 0
                }
            )),
            "{ds:?}"
        );
        assert_ports_work(&net, "after reconcile");
        docker_port_works("after reconcile");
        // and a second reconcile changes nothing
        let ds = m.reconcile().await.unwrap();
        assert!(ds.iter().all(|d| d.action == Action::Unchanged), "{ds:?}");
        m.unpublish_many(m.mappings().into_iter().map(|x| x.id).collect())
            .await
            .unwrap();
        assert_eq!(live_tables(&net.host(), &tables), tables);
    });
    println!("{}: ok in {:?}", layout.fixture, t0.elapsed());
}

#[test]
fn docker_28_5_new_daemon_default_bridge() {
    run_layout(
        "n285",
        Layout {
            fixture: "iptables-v28.5.2/new-daemon.rules",
            ..DEFAULT_BRIDGE
        },
    );
}

#[test]
fn docker_28_5_usernet_portmap() {
    run_layout(
        "u285",
        Layout {
            fixture: "iptables-v28.5.2/usernet-portmap.rules",
            ..USERNET
        },
    );
}

#[test]
fn docker_28_5_usernet_portmap_noicc() {
    run_layout(
        "i285",
        Layout {
            fixture: "iptables-v28.5.2/usernet-portmap-noicc.rules",
            ..USERNET
        },
    );
}

#[test]
fn docker_28_5_usernet_portmap_routed() {
    run_layout(
        "r285",
        Layout {
            fixture: "iptables-v28.5.2/usernet-portmap-routed.rules",
            // routed mode: Docker writes no DNAT for its own port (direct routing)
            docker_port: false,
            ..USERNET
        },
    );
}

#[test]
fn docker_28_0_new_daemon_ipset_layout() {
    run_layout(
        "n280",
        Layout {
            fixture: "iptables-v28.0.0/new-daemon.rules",
            ipset: true,
            ..DEFAULT_BRIDGE
        },
    );
}

#[test]
fn docker_28_0_usernet_portmap_ipset_layout() {
    run_layout(
        "u280",
        Layout {
            fixture: "iptables-v28.0.0/usernet-portmap.rules",
            ipset: true,
            ..USERNET
        },
    );
}

// ---------------------------------------------------------------------------------------
// Docker 29, `--firewall-backend=nftables`
//
// Fixtures `nftables-v29/*.nft`: moby's `integration/network/bridge/nftablesdoc/generated`
// tables verbatim (`nft list table ip docker-bridges`, stateless). Docker writes them
// without an accept mark; with `--bridge-accept-fwmark=2/3` (moby's TestAcceptFwMark
// value) it adds `meta mark & 0x00000003 == 0x00000002 counter accept comment "ALLOW FW
// MARK"` to every filter-forward-in__<bridge> chain, after the conntrack (and routed ICMP)
// rules and before ICC (moby's nftabler: fwdInAcceptFwMarkRuleGroup). The tests insert
// exactly that line where Docker puts it.
//
// Trap: nft 1.0.6 (Debian 12) refuses `priority dstnat` on the output hook (newer nft
// accepts it, moby's document shows it); the loader writes the same value, -100, and the
// comparison normalises both sides.

const FWMARK_RULE: &str =
    "\t\tmeta mark & 0x00000003 == 0x00000002 counter accept comment \"ALLOW FW MARK\"";

/// Docker's table of `fixture` as `nft -s list ruleset` prints it, with or without the
/// accept-mark rule.
fn nft_fixture(fixture: &str, fwmark: bool) -> String {
    let text = std::fs::read_to_string(Path::new(FIXTURES).join(fixture))
        .unwrap_or_else(|e| panic!("fixture {fixture}: {e}"));
    let mut out = String::new();
    let mut chain = String::new();
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some(c) = l.trim().strip_prefix("chain ") {
            chain = c.trim_end_matches(" {").to_owned();
        }
        if fwmark && chain.starts_with("filter-forward-in__") && l.ends_with("comment \"ICC\"") {
            out.push_str(FWMARK_RULE);
            out.push('\n');
        }
        out.push_str(&normalise_nft(l));
        out.push('\n');
    }
    out
}

fn normalise_nft(l: &str) -> String {
    l.replace("hook output priority dstnat;", "hook output priority -100;")
}

fn nft_ruleset(ns: &Path) -> String {
    let out = in_ns(ns, &["nft", "-s", "list", "ruleset"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(normalise_nft)
        .map(|l| l + "\n")
        .collect()
}

/// Docker (re)creates its tables: the old ones out, the fixture's in.
fn load_docker_nft(net: &Net, text: &str) {
    let h = net.host();
    for family in ["ip", "ip6"] {
        let _ = Command::new("nsenter")
            .arg(format!("--net={}", h.display()))
            .args(["nft", "delete", "table", family, "docker-bridges"])
            .stderr(Stdio::null())
            .status();
    }
    in_ns_stdin(&h, &["nft", "-f", "-"], text);
}

fn run_nft_layout(tag: &str, layout: Layout) {
    let t0 = Instant::now();
    let plain = nft_fixture(layout.fixture, false);
    let docker = nft_fixture(layout.fixture, true);
    let net = setup(tag, &layout);
    serve(&net.ctr(), &[TCP_CTR, DOCKER_CTR], &[UDP_CTR]);
    let direct = SocketAddr::from((layout.container_ip, TCP_CTR));
    let v6 = layout.container_ip6.is_some();
    let docker_port_works = |what: &str| {
        if layout.docker_port {
            assert_eq!(
                tcp_from(&net.client(), host(DOCKER_HOST)).as_deref(),
                Some("tcp80"),
                "{what}: Docker's own published port"
            );
            if v6 {
                assert_eq!(
                    tcp_from(&net.client(), host6(DOCKER_HOST)).as_deref(),
                    Some("tcp80"),
                    "{what}: Docker's own published port over IPv6"
                );
            }
        }
    };
    // ours, over IPv4 and (IPv6 layouts) IPv6
    let ports_work = |what: &str| {
        assert_ports_work(&net, what);
        if v6 {
            assert_ports_work6(&net, what);
        }
    };
    let nothing_answers = |what: &str| {
        assert_eq!(tcp_from(&net.client(), host(TCP_HOST)), None, "{what}");
        if v6 {
            assert_eq!(
                tcp_from(&net.client(), host6(TCP_HOST)),
                None,
                "{what} (IPv6)"
            );
        }
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let netns = NetnsContext::open(&net.host()).unwrap();
        let m = PortsManager::with_resolver(
            table(&layout, net.init.as_ref().unwrap().id()),
            netns,
            "1a70u7",
        );

        // dockerd without --bridge-accept-fwmark: NotSupported naming the option
        load_docker_nft(&net, &plain);
        assert_eq!(
            nft_ruleset(&net.host()),
            plain,
            "the namespace must hold exactly Docker's table of {}",
            layout.fixture
        );
        docker_port_works("Docker's layout alone");
        let e = m.firewall().await.expect_err("no accept mark");
        let text = e.to_string();
        assert!(
            text.contains("--bridge-accept-fwmark") && text.contains("\"bridge-accept-fwmark\""),
            "{text}"
        );
        assert_eq!(
            dindhelper::error::Classify::kind(&e),
            dindhelper::error::Kind::NotSupported
        );
        let e = m
            .publish(req("tcp", TCP_HOST, TCP_CTR))
            .await
            .expect_err("publish without the mark");
        assert!(e.to_string().contains("--bridge-accept-fwmark"), "{e}");
        assert_eq!(nft_ruleset(&net.host()), plain, "nothing written");

        // dockerd restarted with --bridge-accept-fwmark=2/3
        load_docker_nft(&net, &docker);
        assert_eq!(nft_ruleset(&net.host()), docker);
        let fw = m.firewall().await.expect("detect");
        println!("{}: {} ({})", layout.fixture, fw.name, fw.reason);
        assert_eq!(fw.name, "nftables");
        assert!(fw.reason.contains("0x2/0x3"), "{}", fw.reason);
        // IPv6 exactly when Docker has its ip6 table
        assert_eq!(m.ipv6_now(), Some(v6), "{}", fw.reason);
        assert_eq!(
            fw.reason
                .contains("IPv6 too: Docker's table ip6 docker-bridges exists"),
            v6,
            "{}",
            fw.reason
        );
        nothing_answers("nothing published yet");
        let maps = m
            .publish_many(vec![
                req("tcp", TCP_HOST, TCP_CTR),
                req("udp", UDP_HOST, UDP_CTR),
            ])
            .await
            .expect("publish");
        if layout.docker_port {
            let e = m.publish(req("tcp", DOCKER_HOST, 81)).await.unwrap_err();
            assert!(e.to_string().contains("published by Docker"), "{e}");
        }
        for x in &maps {
            let want = layout.container_ip6;
            assert!(
                matches!(x.state, MappingState::Active { ip6, .. } if ip6 == want),
                "{x:?}"
            );
        }
        ports_work("published");
        docker_port_works("beside ours");
        // the mark is set on what we DNAT only: the container's address itself stays
        // behind Docker's drops (raw DROP DIRECT ACCESS, or UNPUBLISHED PORT DROP in
        // routed mode, where nothing else stops it)
        assert_eq!(
            tcp_from(&net.client(), direct),
            None,
            "direct access to the container's unpublished port must stay dropped"
        );
        if let Some(c6) = layout.container_ip6 {
            assert_eq!(
                tcp_from(&net.client(), SocketAddr::from((c6, TCP_CTR))),
                None,
                "direct IPv6 access to the container's unpublished port must stay dropped"
            );
        }

        // unpublish: Docker's table again, byte for byte, and no table of ours
        m.unpublish_many(maps.iter().map(|x| x.id.clone()).collect())
            .await
            .expect("unpublish");
        assert_eq!(
            nft_ruleset(&net.host()),
            docker,
            "after unpublish the ruleset must be Docker's exactly"
        );
        nothing_answers("unpublished");

        // Docker re-creates its table (dockerd restart): ours is a table of its own and
        // stays; reconcile finds nothing to do
        m.publish_many(vec![
            req("tcp", TCP_HOST, TCP_CTR),
            req("udp", UDP_HOST, UDP_CTR),
        ])
        .await
        .expect("publish again");
        ports_work("published again");
        load_docker_nft(&net, &docker);
        ports_work("after Docker re-created its tables");
        let ds = m.reconcile().await.expect("reconcile");
        assert!(ds.iter().all(|d| d.action == Action::Unchanged), "{ds:?}");

        // the whole ruleset flushed (nftables.service restart), Docker writes its table
        // again: ours is gone until reconcile restores it
        in_ns(&net.host(), &["nft", "flush", "ruleset"]);
        load_docker_nft(&net, &docker);
        assert_eq!(nft_ruleset(&net.host()), docker);
        nothing_answers("rules flushed");
        // one element per family and mapping
        let per_mapping = if v6 { 2 } else { 1 };
        let ds = m.reconcile().await.expect("reconcile");
        assert!(
            ds.len() == 2
                && ds.iter().all(|d| d.action
                    == Action::Repaired {
                        added: per_mapping,
                        removed: 0
                    }),
            "{ds:?}"
        );
        ports_work("after reconcile");
        docker_port_works("after reconcile");
        let ds = m.reconcile().await.unwrap();
        assert!(ds.iter().all(|d| d.action == Action::Unchanged), "{ds:?}");
        m.unpublish_many(m.mappings().into_iter().map(|x| x.id).collect())
            .await
            .unwrap();
        assert_eq!(nft_ruleset(&net.host()), docker);
        if v6 {
            ipv6_only_mappings(&m, &net, &docker).await;
        }
    });
    println!("{}: ok in {:?}", layout.fixture, t0.elapsed());
}

/// Family `ipv6` (IPv6 only, every address) and an IPv6 `host_ip` (IPv6 only, that
/// address): elements in our ip6 table only, IPv4 clients do not pass, the host address
/// restricts, impossible pairs are InvalidArgs, unpublish restores Docker's tables.
async fn ipv6_only_mappings(m: &Arc<PortsManager>, net: &Net, docker: &str) {
    use dindhelper::error::{Classify, Kind};
    use dindhelper::ports::Family;
    let with = |port: u16, host_ip: Option<&str>, family: Option<&str>| PublishRequest {
        host_ip: host_ip.map(Into::into),
        family: family.map(Into::into),
        ..req("tcp", port, TCP_CTR)
    };
    let all6 = m
        .publish(with(9092, None, Some("ipv6")))
        .await
        .expect("family ipv6");
    let one6 = m
        .publish(with(9093, Some("2001:db8:99::1"), None))
        .await
        .expect("an IPv6 host_ip");
    for (x, host) in [(&all6, None), (&one6, Some("2001:db8:99::1"))] {
        assert_eq!(x.family, Family::Ipv6, "{x:?}");
        assert_eq!(x.host_ip, host.map(|h| h.parse().unwrap()), "{x:?}");
        assert!(
            matches!(x.state, MappingState::Active { ip6: Some(_), .. }),
            "{x:?}"
        );
    }
    let ruleset = nft_ruleset(&net.host());
    assert!(
        ruleset.contains("table ip6 dindhelper-1a70u7 {")
            && !ruleset.contains("table ip dindhelper-1a70u7 {"),
        "IPv6-only mappings make no IPv4 table:\n{ruleset}"
    );
    for port in [9092, 9093] {
        assert_eq!(
            tcp_from(&net.client(), host6(port)).as_deref(),
            Some("tcp90"),
            "{port} over IPv6"
        );
        assert_eq!(
            tcp_from(&net.ctr(), host6(port)).as_deref(),
            Some("tcp90"),
            "{port}: IPv6 hairpin"
        );
        assert_eq!(
            tcp_from(&net.client(), host(port)),
            None,
            "{port}: an IPv6-only mapping must not forward IPv4"
        );
    }
    // the host's other IPv6 address (the bridge's): every address, or not the one given
    let gw6 = |port| SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), port));
    assert_eq!(tcp_from(&net.ctr(), gw6(9092)).as_deref(), Some("tcp90"));
    assert_eq!(
        tcp_from(&net.ctr(), gw6(9093)),
        None,
        "host_ip 2001:db8:99::1 must not match the host's other address"
    );
    // pairs no rule set can hold: InvalidArgs, nothing written
    for (host_ip, family, says) in [
        (
            Some("10.99.0.1"),
            Some("ipv6"),
            "cannot go with an IPv4 host_ip",
        ),
        (
            Some("2001:db8:99::1"),
            Some("ipv4"),
            "cannot go with an IPv6 host_ip",
        ),
        (
            Some("2001:db8:99::1"),
            Some("both"),
            "cannot go with an IPv6 host_ip",
        ),
        (Some("fe80::1"), None, "link-local"),
    ] {
        let e = m.publish(with(9094, host_ip, family)).await.unwrap_err();
        assert_eq!(e.kind(), Kind::InvalidArgs, "{host_ip:?} {family:?}: {e}");
        assert!(e.to_string().contains(says), "{e}");
    }
    assert_eq!(
        nft_ruleset(&net.host()),
        ruleset,
        "a refusal wrote something"
    );
    // the same port IPv4-only beside the IPv6-only mapping: no family in common, no
    // conflict; `auto` may gain IPv6, so it conflicts with an IPv6 mapping of its port
    let all4 = m
        .publish(with(9092, None, Some("ipv4")))
        .await
        .expect("IPv4-only beside IPv6-only on one port");
    assert_eq!(
        tcp_from(&net.client(), host(9092)).as_deref(),
        Some("tcp90")
    );
    assert_eq!(
        tcp_from(&net.client(), host6(9092)).as_deref(),
        Some("tcp90")
    );
    let e = m.publish(with(9093, None, None)).await.unwrap_err();
    assert_eq!(e.kind(), Kind::Conflict, "{e}");
    m.unpublish(&all4.id).await.expect("unpublish the IPv4 one");
    m.unpublish_many(vec![all6.id, one6.id])
        .await
        .expect("unpublish");
    assert_eq!(nft_ruleset(&net.host()), docker);
    // Docker restarted without IPv6: the next repair sees it, and the backend's reason
    // says so (it is read at each Get of FirewallBackendReason)
    let fw = m.firewall().await.expect("backend");
    assert!(fw.reason.contains("IPv6 too"), "{}", fw.reason);
    let out = in_ns(
        &net.host(),
        &["nft", "delete", "table", "ip6", "docker-bridges"],
    );
    assert!(out.status.success(), "{out:?}");
    m.reconcile().await.expect("reconcile");
    assert_eq!(m.ipv6_now(), Some(false));
    let fw = m.firewall().await.expect("backend");
    assert!(fw.reason.contains("IPv4 only"), "{}", fw.reason);
}

#[test]
fn docker_29_nftables_new_daemon_default_bridge() {
    run_nft_layout(
        "n29",
        Layout {
            fixture: "nftables-v29/new-daemon.nft",
            ..DEFAULT_BRIDGE
        },
    );
}

#[test]
fn docker_29_nftables_usernet_portmap() {
    run_nft_layout(
        "u29",
        Layout {
            fixture: "nftables-v29/usernet-portmap.nft",
            ..USERNET
        },
    );
}

#[test]
fn docker_29_nftables_usernet_portmap_noicc() {
    run_nft_layout(
        "i29",
        Layout {
            fixture: "nftables-v29/usernet-portmap-noicc.nft",
            ..USERNET
        },
    );
}

#[test]
fn docker_29_nftables_usernet_portmap_routed() {
    run_nft_layout(
        "r29",
        Layout {
            fixture: "nftables-v29/usernet-portmap-routed.nft",
            docker_port: false,
            ..USERNET
        },
    );
}

/// IPv6 on the nftables backend: Docker's `ip6 docker-bridges` beside its ip table (a user
/// network created with `--ipv6`); the mapping (family auto) gets an element in our `ip6`
/// table too: TCP and UDP over IPv6 from the client, hairpin over IPv6, Docker's own
/// IPv6 port untouched, direct IPv6 access dropped, both tables byte-identical after
/// unpublish, repair after `nft flush ruleset`.
#[test]
fn docker_29_nftables_usernet_portmap_ipv6() {
    run_nft_layout(
        "v29",
        Layout {
            fixture: "nftables-v29/usernet-portmap-ipv6.nft",
            container_ip6: Some(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2)),
            gateway6: "2001:db8::1",
            ..USERNET
        },
    );
}
