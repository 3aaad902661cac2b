//! `ops::instances` against a real dockerd (tests/common/dockerd.rs) without D-Bus: the
//! container resolver (`ops::containers`) finds containers by name, adopt records
//! the full id, and `on_container_start` (the hook for Docker `start` events) re-applies
//! oom_score_adj after `docker restart`. The instances live under their own cgroupfs root
//! `dhj-ops-<pid>` (not `dind`), removed at the end.
//!
//! Run (root): `cargo test --test instances_ops_docker`

mod common;

use std::path::Path;
use std::sync::Arc;

use dindhelper::instances::cgroupfs::CgroupfsBackend;
use dindhelper::instances::{Limits, SliceBackend};
use dindhelper::ops::instances::{self, InstanceCtx};
use dindhelper::ops::Core;
use dindhelper::state::StateStore;

fn oom(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_by_name_and_reapply_on_container_start() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root (dockerd, cgroups)"
    );
    let d = common::dockerd::Dockerd::start();
    let docker =
        dindhelper::docker::Docker::from_host(&format!("unix://{}", d.socket.display())).unwrap();
    let root = format!("dhj-ops-{}", std::process::id());
    let backend: Arc<dyn SliceBackend> = Arc::new(CgroupfsBackend::detect(&root).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let state = store.load_or_init().unwrap();
    let core = Arc::new(Core {
        cfg: Default::default(),
        store,
        state: tokio::sync::Mutex::new(state),
        images: dindhelper::loopdev::images::ImageStore::new(
            dir.path().join("images"),
            dindhelper::loopdev::images::Limits {
                max_size: 1 << 30,
                max_count: 4,
                max_total_bytes: 1 << 30,
            },
        )
        .unwrap(),
        instances: InstanceCtx::new(Ok(backend.clone()), None),
        ports: dindhelper::ops::ports::manager_for(docker.clone()),
        containers: dindhelper::ops::containers::Containers::new(docker),
    });

    let rec = instances::create(
        &core,
        0,
        "web",
        Limits {
            oom_score_adj: Some(321),
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
    assert_eq!(rec.instance.cgroup_parent, format!("/{root}/web"));
    let id = d.run_web(
        "dhjo1",
        "/www",
        &["--cgroup-parent", &rec.instance.cgroup_parent],
    );
    let (got, a) = instances::adopt(&core, "web", "dhjo1").await.unwrap();
    assert_eq!(got, id);
    let pid = d.docker_ok(&["inspect", "-f", "{{.State.Pid}}", "dhjo1"]);
    assert!(a.pids.contains(&pid.parse().unwrap()), "{a:?}");
    assert_eq!(oom(&pid), "321");
    assert_eq!(
        instances::get(&core, "web").await.unwrap().containers,
        vec![id.clone()]
    );

    // Restart: new processes start with the default; the hook re-applies.
    d.docker_ok(&["restart", "-t", "0", "dhjo1"]);
    let pid2 = d.docker_ok(&["inspect", "-f", "{{.State.Pid}}", "dhjo1"]);
    assert_ne!(pid, pid2);
    assert_eq!(oom(&pid2), "0");
    assert_eq!(
        instances::on_container_start(&core, &id).await.unwrap(),
        Some("web".to_owned())
    );
    assert_eq!(oom(&pid2), "321");
    // A container no instance adopted: nothing to do.
    assert_eq!(
        instances::on_container_start(&core, "0123456789ab")
            .await
            .unwrap(),
        None
    );

    d.docker_ok(&["rm", "-f", "dhjo1"]);
    let done = instances::destroy(&core, "web", Default::default(), &Default::default())
        .await
        .unwrap();
    assert!(
        done.iter().any(|x| x.starts_with("removed cgroup")),
        "{done:?}"
    );
    // The root directory of this test in every hierarchy.
    for e in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let p = e.path().join(&root);
        if p.is_dir() {
            std::fs::remove_dir(&p).unwrap_or_else(|e| panic!("rmdir {}: {e}", p.display()));
        }
    }
    assert!(!Path::new("/sys/fs/cgroup/pids").join(&root).exists());
}
