//! Resource limits of an instance: validation and the pure translations to systemd
//! properties, cgroup v2 files and cgroup v1 files.
//!
//! Semantics shared by every backend:
//! - `None` means "no limit / the kernel's default". Applying a [`Limits`] is always a full
//!   replacement: a knob that is `None` is reset (systemd: `u64::MAX` = infinity/unset;
//!   cgroup files: `max`, `-1` or the default weight). The caller merges partial updates.
//! - `cpu_quota_percent`: 100 = one whole CPU. Period is 100 ms (systemd's default), so
//!   the quota is `percent * 1000` µs per period, `percent * 10000` µs per second.
//! - Weights use the cgroup v2 / systemd scale 1..=10000 (default 100); on cgroup v1 they
//!   are mapped the way systemd maps them (`cpu.shares = w * 1024 / 100`,
//!   `blkio.weight = w * 500 / 100` clamped to 10..=1000). Kernels without CFQ have only
//!   the BFQ files (`blkio.bfq.weight`, `io.bfq.weight`, range 1..=1000, default 100, and
//!   only in non-root cgroups); the weight then goes there with systemd's BFQ mapping.
//! - `memory_high` on cgroup v1 becomes `memory.soft_limit_in_bytes`, which only acts
//!   under global memory pressure (v1 has no throttling "high" limit).
//! - `memory_swap_max` is swap *in addition to* memory (v2/systemd semantics); on v1 it is
//!   written as `memory.memsw.limit_in_bytes = memory_max + memory_swap_max`, which needs
//!   `memory_max` and a kernel with swap accounting (the memsw files exist).
//! - `oom_score_adj` is not a cgroup knob: it is written to every process of an adopted
//!   container (default +500, so an instance dies before host processes).

use serde::{Deserialize, Serialize};

/// Smallest accepted `memory_max` / `memory_high`: below this a DinD instance cannot start.
pub const MEMORY_FLOOR: u64 = 16 << 20;
/// Default `oom_score_adj` for the processes of an instance.
pub const DEFAULT_OOM_SCORE_ADJ: i32 = 500;
/// CFS period used for CPU quotas (µs), the same as systemd's default.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Default weight on the v2/systemd scale.
pub const DEFAULT_WEIGHT: u64 = 100;

/// Names of the knobs, as accepted by [`Limits::set`] and named in errors.
pub const KNOBS: &[&str] = &[
    "cpu_quota_percent",
    "cpu_weight",
    "memory_max",
    "memory_high",
    "memory_swap_max",
    "tasks_max",
    "io_weight",
    "oom_score_adj",
];

/// The limits of one instance. Every knob is optional (`None` = unlimited / default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// CPU time as percent of one CPU (100 = one CPU, 250 = two and a half).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota_percent: Option<u32>,
    /// Relative CPU weight, 1..=10000 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u64>,
    /// Hard memory limit in bytes (OOM kill above it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<u64>,
    /// Memory throttling limit in bytes (v1: soft limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_high: Option<u64>,
    /// Swap allowed in addition to memory, in bytes (0 = no swap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_swap_max: Option<u64>,
    /// Maximum number of tasks (threads and processes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks_max: Option<u64>,
    /// Relative IO weight, 1..=10000 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_weight: Option<u64>,
    /// oom_score_adj of every adopted container process, -1000..=1000 (default +500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_score_adj: Option<i32>,
}

/// A knob has a value outside its range. Names the knob and says what is accepted.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("invalid limit {knob} = {value}: {why}")]
pub struct LimitError {
    pub knob: String,
    pub value: String,
    pub why: String,
}

impl crate::error::Classify for LimitError {
    fn kind(&self) -> crate::error::Kind {
        crate::error::Kind::InvalidArgs
    }
}

fn bad(knob: &str, value: impl ToString, why: impl Into<String>) -> LimitError {
    LimitError {
        knob: knob.to_owned(),
        value: value.to_string(),
        why: why.into(),
    }
}

/// Largest byte value a cgroup v1 file accepts (it parses a signed 64-bit number).
const BYTES_MAX: u64 = i64::MAX as u64;

impl Limits {
    /// Set one knob from any integer the caller sent (the bus layer passes every `a{sv}`
    /// entry here, whatever its integer type, so negative values get a message that names
    /// the knob instead of a type error). Range checks happen in [`Limits::validate`].
    pub fn set(&mut self, knob: &str, value: i128) -> Result<(), LimitError> {
        fn unsigned<T: TryFrom<i128>>(knob: &str, v: i128) -> Result<T, LimitError> {
            if v < 0 {
                return Err(bad(knob, v, "must not be negative"));
            }
            T::try_from(v).map_err(|_| bad(knob, v, "is too large"))
        }
        match knob {
            "cpu_quota_percent" => self.cpu_quota_percent = Some(unsigned(knob, value)?),
            "cpu_weight" => self.cpu_weight = Some(unsigned(knob, value)?),
            "memory_max" => self.memory_max = Some(unsigned(knob, value)?),
            "memory_high" => self.memory_high = Some(unsigned(knob, value)?),
            "memory_swap_max" => self.memory_swap_max = Some(unsigned(knob, value)?),
            "tasks_max" => self.tasks_max = Some(unsigned(knob, value)?),
            "io_weight" => self.io_weight = Some(unsigned(knob, value)?),
            "oom_score_adj" => {
                self.oom_score_adj = Some(
                    i32::try_from(value)
                        .map_err(|_| bad(knob, value, "must be in -1000..=1000"))?,
                )
            }
            _ => {
                return Err(bad(
                    knob,
                    value,
                    format!("unknown limit; known: {}", KNOBS.join(", ")),
                ))
            }
        }
        Ok(())
    }

    /// Check every knob. `ncpu` is the number of CPUs of the host (caps the CPU quota).
    pub fn validate(&self, ncpu: u32) -> Result<(), LimitError> {
        let ncpu = ncpu.max(1);
        if let Some(p) = self.cpu_quota_percent {
            let max = 100 * ncpu;
            if p == 0 || p > max {
                return Err(bad(
                    "cpu_quota_percent",
                    p,
                    format!("must be in 1..={max} (100 = one CPU, this host has {ncpu})"),
                ));
            }
        }
        for (knob, w) in [
            ("cpu_weight", self.cpu_weight),
            ("io_weight", self.io_weight),
        ] {
            if let Some(w) = w {
                if !(1..=10_000).contains(&w) {
                    return Err(bad(knob, w, "must be in 1..=10000 (default 100)"));
                }
            }
        }
        for (knob, m) in [
            ("memory_max", self.memory_max),
            ("memory_high", self.memory_high),
        ] {
            if let Some(m) = m {
                if m < MEMORY_FLOOR {
                    return Err(bad(
                        knob,
                        m,
                        format!("must be at least {MEMORY_FLOOR} bytes (16 MiB)"),
                    ));
                }
                if m > BYTES_MAX {
                    return Err(bad(knob, m, format!("must be at most {BYTES_MAX}")));
                }
            }
        }
        if let (Some(h), Some(m)) = (self.memory_high, self.memory_max) {
            if h > m {
                return Err(bad(
                    "memory_high",
                    h,
                    format!("must not exceed memory_max ({m})"),
                ));
            }
        }
        if let Some(s) = self.memory_swap_max {
            if s > BYTES_MAX {
                return Err(bad(
                    "memory_swap_max",
                    s,
                    format!("must be at most {BYTES_MAX}"),
                ));
            }
            if let Some(m) = self.memory_max {
                if m.checked_add(s).is_none_or(|t| t > BYTES_MAX) {
                    return Err(bad(
                        "memory_swap_max",
                        s,
                        "memory_max + memory_swap_max is too large",
                    ));
                }
            }
        }
        if let Some(t) = self.tasks_max {
            if t == 0 || t > BYTES_MAX {
                return Err(bad("tasks_max", t, "must be at least 1"));
            }
        }
        if let Some(o) = self.oom_score_adj {
            if !(-1000..=1000).contains(&o) {
                return Err(bad("oom_score_adj", o, "must be in -1000..=1000"));
            }
        }
        Ok(())
    }

    /// The oom_score_adj to give the processes of the instance.
    pub fn effective_oom_score_adj(&self) -> i32 {
        self.oom_score_adj.unwrap_or(DEFAULT_OOM_SCORE_ADJ)
    }

    /// CPU quota in µs per CFS period of [`CPU_PERIOD_US`].
    pub fn cpu_quota_per_period_us(&self) -> Option<u64> {
        self.cpu_quota_percent
            .map(|p| u64::from(p) * CPU_PERIOD_US / 100)
    }

    /// systemd unit properties (all of D-Bus type `t`), every knob present; `None` becomes
    /// `u64::MAX` (systemd's "infinity" / "unset"), so the list is a full replacement.
    pub fn to_systemd_properties(&self) -> Vec<SystemdProperty> {
        let inf = u64::MAX;
        let p = |name, value: Option<u64>| SystemdProperty {
            name,
            value: value.unwrap_or(inf),
        };
        vec![
            p(
                "CPUQuotaPerSecUSec",
                self.cpu_quota_percent.map(|p| u64::from(p) * 10_000),
            ),
            p("CPUWeight", self.cpu_weight),
            p("MemoryMax", self.memory_max),
            p("MemoryHigh", self.memory_high),
            p("MemorySwapMax", self.memory_swap_max),
            p("TasksMax", self.tasks_max),
            p("IOWeight", self.io_weight),
        ]
    }

    /// Writes for a cgroup v2 (unified) directory, in order. A write is `required` only
    /// when its knob is set: resetting a knob whose file is missing (controller not
    /// enabled, no swap accounting) is a no-op, since no limit can be in force there.
    pub fn to_cgroup_v2_files(&self) -> Vec<CgroupWrite> {
        let max = |v: Option<u64>| v.map_or_else(|| "max".to_owned(), |v| v.to_string());
        let w = |controller, file, value: String, required: bool| CgroupWrite {
            controller,
            file,
            value,
            fallback: None,
            required,
        };
        let cpu_max = match self.cpu_quota_per_period_us() {
            Some(q) => format!("{q} {CPU_PERIOD_US}"),
            None => format!("max {CPU_PERIOD_US}"),
        };
        let weight = self.io_weight.unwrap_or(DEFAULT_WEIGHT);
        vec![
            w("cpu", "cpu.max", cpu_max, self.cpu_quota_percent.is_some()),
            w(
                "cpu",
                "cpu.weight",
                self.cpu_weight.unwrap_or(DEFAULT_WEIGHT).to_string(),
                self.cpu_weight.is_some(),
            ),
            // No ordering rule on v2, but lowering max first would OOM-kill before high
            // could throttle: write high first.
            w(
                "memory",
                "memory.high",
                max(self.memory_high),
                self.memory_high.is_some(),
            ),
            w(
                "memory",
                "memory.max",
                max(self.memory_max),
                self.memory_max.is_some(),
            ),
            w(
                "memory",
                "memory.swap.max",
                max(self.memory_swap_max),
                self.memory_swap_max.is_some(),
            ),
            w(
                "pids",
                "pids.max",
                max(self.tasks_max),
                self.tasks_max.is_some(),
            ),
            CgroupWrite {
                controller: "io",
                file: "io.weight",
                value: format!("default {weight}"),
                fallback: Some(("io.bfq.weight", weight_to_bfq(weight).to_string())),
                required: self.io_weight.is_some(),
            },
        ]
    }

    /// Writes for cgroup v1 directories (one per controller hierarchy), in order;
    /// `required` as for v2. Fails when a knob cannot be expressed on v1 (swap limit
    /// without memory limit).
    pub fn to_cgroup_v1_files(&self) -> Result<Vec<CgroupWrite>, LimitError> {
        let signed = |v: Option<u64>| v.map_or_else(|| "-1".to_owned(), |v| v.to_string());
        let w = |controller, file, value: String, required: bool| CgroupWrite {
            controller,
            file,
            value,
            fallback: None,
            required,
        };
        if let (Some(s), None) = (self.memory_swap_max, self.memory_max) {
            return Err(bad(
                "memory_swap_max",
                s,
                "needs memory_max on cgroup v1 (memsw limits memory + swap together)",
            ));
        }
        let quota = self.cpu_quota_percent.is_some();
        let weight = self.io_weight.unwrap_or(DEFAULT_WEIGHT);
        let mut out = vec![
            w("cpu", "cpu.cfs_period_us", CPU_PERIOD_US.to_string(), quota),
            w(
                "cpu",
                "cpu.cfs_quota_us",
                self.cpu_quota_per_period_us()
                    .map_or_else(|| "-1".to_owned(), |q| q.to_string()),
                quota,
            ),
            w(
                "cpu",
                "cpu.shares",
                weight_to_cpu_shares(self.cpu_weight.unwrap_or(DEFAULT_WEIGHT)).to_string(),
                self.cpu_weight.is_some(),
            ),
            // memsw.limit must stay >= limit_in_bytes at every step: open it first, then
            // set the memory limit, then close memsw to memory + swap.
            w(
                "memory",
                "memory.memsw.limit_in_bytes",
                "-1".to_owned(),
                self.memory_swap_max.is_some(),
            ),
            w(
                "memory",
                "memory.limit_in_bytes",
                signed(self.memory_max),
                self.memory_max.is_some(),
            ),
        ];
        if let (Some(m), Some(s)) = (self.memory_max, self.memory_swap_max) {
            out.push(w(
                "memory",
                "memory.memsw.limit_in_bytes",
                (m + s).to_string(),
                true,
            ));
        }
        out.push(w(
            "memory",
            "memory.soft_limit_in_bytes",
            signed(self.memory_high),
            self.memory_high.is_some(),
        ));
        out.push(w(
            "pids",
            "pids.max",
            self.tasks_max
                .map_or_else(|| "max".to_owned(), |v| v.to_string()),
            self.tasks_max.is_some(),
        ));
        out.push(CgroupWrite {
            controller: "blkio",
            file: "blkio.weight",
            value: weight_to_blkio(weight).to_string(),
            fallback: Some(("blkio.bfq.weight", weight_to_bfq(weight).to_string())),
            required: self.io_weight.is_some(),
        });
        Ok(out)
    }
}

/// One systemd unit property of D-Bus type `t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemdProperty {
    pub name: &'static str,
    pub value: u64,
}

/// One write into a cgroup directory of the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupWrite {
    /// The controller whose hierarchy (v1) or whose files (v2) this is.
    pub controller: &'static str,
    pub file: &'static str,
    pub value: String,
    /// When `file` does not exist, write this file and value instead (the BFQ weight
    /// files, which have their own scale).
    pub fallback: Option<(&'static str, String)>,
    /// When neither file exists: `true` = error (an explicit limit cannot be applied),
    /// `false` = skip (a reset to the default on a kernel without that file).
    pub required: bool,
}

/// systemd's `cgroup_cpu_weight_to_shares`: weight 100 = 1024 shares, clamped to 2..=262144.
pub fn weight_to_cpu_shares(weight: u64) -> u64 {
    (weight.saturating_mul(1024) / DEFAULT_WEIGHT).clamp(2, 262_144)
}

/// systemd's `cgroup_weight_io_to_bfq`: linear 1..=100 -> 1..=100 and
/// 100..=10000 -> 100..=1000 (BFQ's range is 1..=1000, default 100).
pub fn weight_to_bfq(weight: u64) -> u64 {
    let w = weight.clamp(1, 10_000);
    if w <= DEFAULT_WEIGHT {
        w
    } else {
        (w - DEFAULT_WEIGHT) * 900 / 9_900 + 100
    }
}

/// systemd's `cgroup_weight_io_to_blkio`: weight 100 = 500, clamped to 10..=1000.
pub fn weight_to_blkio(weight: u64) -> u64 {
    (weight.saturating_mul(500) / DEFAULT_WEIGHT).clamp(10, 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Limits {
        Limits {
            cpu_quota_percent: Some(50),
            cpu_weight: Some(200),
            memory_max: Some(512 << 20),
            memory_high: Some(256 << 20),
            memory_swap_max: Some(64 << 20),
            tasks_max: Some(512),
            io_weight: Some(300),
            oom_score_adj: Some(800),
        }
    }

    fn err_knob(l: &Limits) -> String {
        l.validate(2).unwrap_err().knob
    }

    #[test]
    fn empty_and_full_limits_are_valid() {
        assert!(Limits::default().validate(1).is_ok());
        assert!(full().validate(2).is_ok());
    }

    #[test]
    fn zero_and_out_of_range_values_name_the_knob() {
        let cases: Vec<(Limits, &str)> = vec![
            (
                Limits {
                    cpu_quota_percent: Some(0),
                    ..Default::default()
                },
                "cpu_quota_percent",
            ),
            (
                Limits {
                    cpu_quota_percent: Some(201),
                    ..Default::default()
                },
                "cpu_quota_percent",
            ),
            (
                Limits {
                    cpu_weight: Some(0),
                    ..Default::default()
                },
                "cpu_weight",
            ),
            (
                Limits {
                    cpu_weight: Some(10_001),
                    ..Default::default()
                },
                "cpu_weight",
            ),
            (
                Limits {
                    io_weight: Some(0),
                    ..Default::default()
                },
                "io_weight",
            ),
            (
                Limits {
                    memory_max: Some(0),
                    ..Default::default()
                },
                "memory_max",
            ),
            (
                Limits {
                    memory_max: Some(MEMORY_FLOOR - 1),
                    ..Default::default()
                },
                "memory_max",
            ),
            (
                Limits {
                    memory_max: Some(u64::MAX),
                    ..Default::default()
                },
                "memory_max",
            ),
            (
                Limits {
                    memory_high: Some(1),
                    ..Default::default()
                },
                "memory_high",
            ),
            (
                Limits {
                    memory_max: Some(64 << 20),
                    memory_high: Some(65 << 20),
                    ..Default::default()
                },
                "memory_high",
            ),
            (
                Limits {
                    memory_max: Some(BYTES_MAX),
                    memory_swap_max: Some(1),
                    ..Default::default()
                },
                "memory_swap_max",
            ),
            (
                Limits {
                    tasks_max: Some(0),
                    ..Default::default()
                },
                "tasks_max",
            ),
            (
                Limits {
                    oom_score_adj: Some(1001),
                    ..Default::default()
                },
                "oom_score_adj",
            ),
            (
                Limits {
                    oom_score_adj: Some(-1001),
                    ..Default::default()
                },
                "oom_score_adj",
            ),
        ];
        for (l, knob) in cases {
            assert_eq!(err_knob(&l), knob, "{l:?}");
        }
        // The message tells what is accepted.
        let e = Limits {
            cpu_quota_percent: Some(300),
            ..Default::default()
        }
        .validate(2)
        .unwrap_err();
        assert!(e.to_string().contains("1..=200"), "{e}");
    }

    #[test]
    fn boundaries_are_accepted() {
        let l = Limits {
            cpu_quota_percent: Some(200),
            cpu_weight: Some(1),
            io_weight: Some(10_000),
            memory_max: Some(MEMORY_FLOOR),
            memory_high: Some(MEMORY_FLOOR),
            memory_swap_max: Some(0),
            tasks_max: Some(1),
            oom_score_adj: Some(-1000),
        };
        assert!(l.validate(2).is_ok());
        assert!(Limits {
            cpu_quota_percent: Some(1),
            ..Default::default()
        }
        .validate(1)
        .is_ok());
    }

    #[test]
    fn set_rejects_negative_unknown_and_huge_values() {
        let mut l = Limits::default();
        let e = l.set("memory_max", -1).unwrap_err();
        assert_eq!(e.knob, "memory_max");
        assert!(e.why.contains("negative"));
        assert_eq!(
            l.set("cpu_quota_percent", 1 << 40).unwrap_err().knob,
            "cpu_quota_percent"
        );
        assert!(l.set("bogus", 1).unwrap_err().why.contains("unknown"));
        l.set("oom_score_adj", -500).unwrap();
        l.set("memory_max", 1 << 30).unwrap();
        l.set("cpu_quota_percent", 150).unwrap();
        assert_eq!(l.oom_score_adj, Some(-500));
        assert_eq!(l.memory_max, Some(1 << 30));
        assert_eq!(l.cpu_quota_percent, Some(150));
        for k in KNOBS {
            assert!(Limits::default().set(k, 20 << 20).is_ok() || *k == "oom_score_adj");
        }
    }

    #[test]
    fn oom_score_adj_defaults_to_500() {
        assert_eq!(Limits::default().effective_oom_score_adj(), 500);
        assert_eq!(full().effective_oom_score_adj(), 800);
    }

    #[test]
    fn systemd_properties_convert_percent_to_usec_per_second() {
        let props = full().to_systemd_properties();
        let get = |n| props.iter().find(|p| p.name == n).unwrap().value;
        assert_eq!(get("CPUQuotaPerSecUSec"), 500_000);
        assert_eq!(get("CPUWeight"), 200);
        assert_eq!(get("MemoryMax"), 512 << 20);
        assert_eq!(get("MemoryHigh"), 256 << 20);
        assert_eq!(get("MemorySwapMax"), 64 << 20);
        assert_eq!(get("TasksMax"), 512);
        assert_eq!(get("IOWeight"), 300);
        // 200 % = two CPUs = 2 s per second, as in TESTBED's example (20 % = 200000).
        let two = Limits {
            cpu_quota_percent: Some(200),
            ..Default::default()
        };
        assert_eq!(two.to_systemd_properties()[0].value, 2_000_000);
    }

    #[test]
    fn systemd_properties_reset_unset_knobs_to_infinity() {
        let props = Limits::default().to_systemd_properties();
        assert_eq!(props.len(), 7);
        assert!(props.iter().all(|p| p.value == u64::MAX));
    }

    fn find<'a>(w: &'a [CgroupWrite], file: &str) -> &'a CgroupWrite {
        w.iter().rev().find(|w| w.file == file).unwrap()
    }

    #[test]
    fn cgroup_v2_files() {
        let w = full().to_cgroup_v2_files();
        assert_eq!(find(&w, "cpu.max").value, "50000 100000");
        assert_eq!(find(&w, "cpu.weight").value, "200");
        assert_eq!(find(&w, "memory.max").value, (512u64 << 20).to_string());
        assert_eq!(find(&w, "memory.high").value, (256u64 << 20).to_string());
        assert_eq!(find(&w, "memory.swap.max").value, (64u64 << 20).to_string());
        assert!(find(&w, "memory.swap.max").required);
        assert_eq!(find(&w, "pids.max").value, "512");
        assert_eq!(find(&w, "io.weight").value, "default 300");
        assert_eq!(find(&w, "io.weight").controller, "io");
        assert!(w.iter().all(|w| w.required), "every knob is set");
    }

    #[test]
    fn cgroup_v2_reset_values() {
        let w = Limits::default().to_cgroup_v2_files();
        assert_eq!(find(&w, "cpu.max").value, "max 100000");
        assert_eq!(find(&w, "cpu.weight").value, "100");
        assert_eq!(find(&w, "memory.max").value, "max");
        assert_eq!(find(&w, "memory.high").value, "max");
        assert_eq!(find(&w, "pids.max").value, "max");
        assert!(w.iter().all(|w| !w.required), "resets are never required");
        assert_eq!(find(&w, "io.weight").value, "default 100");
    }

    #[test]
    fn cgroup_v1_files() {
        let w = full().to_cgroup_v1_files().unwrap();
        assert_eq!(find(&w, "cpu.cfs_period_us").value, "100000");
        assert_eq!(find(&w, "cpu.cfs_quota_us").value, "50000");
        assert_eq!(find(&w, "cpu.shares").value, "2048");
        assert_eq!(
            find(&w, "memory.limit_in_bytes").value,
            (512u64 << 20).to_string()
        );
        assert_eq!(
            find(&w, "memory.memsw.limit_in_bytes").value,
            ((512u64 + 64) << 20).to_string()
        );
        assert_eq!(
            find(&w, "memory.soft_limit_in_bytes").value,
            (256u64 << 20).to_string()
        );
        assert_eq!(find(&w, "pids.max").value, "512");
        assert_eq!(find(&w, "blkio.weight").value, "1000");
        assert_eq!(
            find(&w, "blkio.weight").fallback,
            Some(("blkio.bfq.weight", "118".to_owned()))
        );
        assert!(find(&w, "blkio.weight").required);
    }

    #[test]
    fn cgroup_v1_memsw_is_opened_before_memory_and_closed_after() {
        let w = full().to_cgroup_v1_files().unwrap();
        let files: Vec<(&str, &str)> = w
            .iter()
            .filter(|w| w.controller == "memory")
            .map(|w| (w.file, w.value.as_str()))
            .collect();
        assert_eq!(files[0], ("memory.memsw.limit_in_bytes", "-1"));
        assert_eq!(files[1].0, "memory.limit_in_bytes");
        assert_eq!(files[2].0, "memory.memsw.limit_in_bytes");
    }

    #[test]
    fn cgroup_v1_reset_values_and_missing_memsw() {
        let w = Limits::default().to_cgroup_v1_files().unwrap();
        assert_eq!(find(&w, "cpu.cfs_quota_us").value, "-1");
        assert_eq!(find(&w, "cpu.shares").value, "1024");
        assert_eq!(find(&w, "memory.limit_in_bytes").value, "-1");
        assert_eq!(find(&w, "memory.soft_limit_in_bytes").value, "-1");
        assert_eq!(find(&w, "pids.max").value, "max");
        assert_eq!(find(&w, "blkio.weight").value, "500");
        // Resets of files a kernel may lack are optional.
        assert!(w.iter().all(|w| !w.required), "resets are never required");
        // Memory limit without swap limit: memsw stays open (-1), not required.
        let l = Limits {
            memory_max: Some(64 << 20),
            ..Default::default()
        };
        let w = l.to_cgroup_v1_files().unwrap();
        assert_eq!(find(&w, "memory.memsw.limit_in_bytes").value, "-1");
        assert!(!find(&w, "memory.memsw.limit_in_bytes").required);
    }

    #[test]
    fn cgroup_v1_swap_without_memory_is_rejected() {
        let l = Limits {
            memory_swap_max: Some(0),
            ..Default::default()
        };
        assert_eq!(l.to_cgroup_v1_files().unwrap_err().knob, "memory_swap_max");
    }

    #[test]
    fn weight_mappings_follow_systemd() {
        assert_eq!(weight_to_cpu_shares(100), 1024);
        assert_eq!(weight_to_cpu_shares(1), 10);
        assert_eq!(weight_to_cpu_shares(10_000), 102_400);
        assert_eq!(weight_to_blkio(100), 500);
        assert_eq!(weight_to_blkio(1), 10);
        assert_eq!(weight_to_blkio(10_000), 1000);
        assert_eq!(weight_to_bfq(1), 1);
        assert_eq!(weight_to_bfq(100), 100);
        assert_eq!(weight_to_bfq(10_000), 1000);
        assert_eq!(weight_to_bfq(300), 118);
    }

    #[test]
    fn serde_round_trip_and_unknown_fields() {
        let l = full();
        let s = serde_json::to_string(&l).unwrap();
        assert_eq!(serde_json::from_str::<Limits>(&s).unwrap(), l);
        assert_eq!(serde_json::to_string(&Limits::default()).unwrap(), "{}");
        assert!(serde_json::from_str::<Limits>(r#"{"cpu":1}"#).is_err());
    }
}
