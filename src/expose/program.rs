//! Device rules (OCI `linux.resources.devices`, cgroup v1 syntax) and the
//! BPF_PROG_TYPE_CGROUP_DEVICE program that enforces them on cgroup v2. Pure: no syscalls.
//!
//! Model (as runc's devices emulator and youki's `program.rs`): the rules are applied in
//! order to a "default + exceptions" state — a full wildcard rule (`a *:* rwm`) sets the
//! default and clears the exceptions, a rule with the other verdict adds an exception, a
//! rule with the default's verdict removes (or narrows) matching exceptions. The program
//! then checks each exception and returns its verdict on the first match, else the default.
//!
//! Program context (`struct bpf_cgroup_dev_ctx`): `access_type` at 0 (type in the low 16
//! bits: 1 block, 2 char; access in the high 16: 1 mknod, 2 read, 4 write), `major` at 4,
//! `minor` at 8, all u32. Return 1 = allow, 0 = deny.
//!
//! Traps:
//! - An allow exception matches only when the request's access bits are a *subset* of the
//!   rule's (`open(O_RDWR)` asks r|w together); a deny exception matches when they
//!   *intersect*.
//! - Jump offsets count instructions after the jump; every block's length is known before
//!   it is emitted.
//! - runc appends its own defaults (mknod of anything, /dev/null…, /dev/pts, ptmx, tun)
//!   *after* the spec's rules; a program that replaces runc's must have them too
//!   ([`RUNC_DEFAULTS`]).

use serde::{Deserialize, Serialize};

pub const ACC_MKNOD: u8 = 1;
pub const ACC_READ: u8 = 2;
pub const ACC_WRITE: u8 = 4;
pub const ACC_ALL: u8 = 7;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DevType {
    All,
    Block,
    Char,
}

/// One rule: `b 7:3 rwm` allow, `a *:* rwm` deny, …
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevRule {
    pub allow: bool,
    pub kind: DevType,
    /// None = any.
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// ACC_* bits.
    pub access: u8,
}

impl DevRule {
    /// An exact allow rule for a block device, `b MAJ:MIN rwm`.
    pub fn block(major: u32, minor: u32) -> DevRule {
        DevRule {
            allow: true,
            kind: DevType::Block,
            major: Some(major),
            minor: Some(minor),
            access: ACC_ALL,
        }
    }

    fn is_wildcard(&self) -> bool {
        self.kind == DevType::All && self.major.is_none() && self.minor.is_none()
    }

    /// Parse a cgroup v1 rule (`b 7:3 rwm`, `c *:* m`, `a`); `allow` is the verdict.
    pub fn parse(s: &str, allow: bool) -> Option<DevRule> {
        let f: Vec<&str> = s.split_whitespace().collect();
        let kind = match *f.first()? {
            "a" => DevType::All,
            "b" => DevType::Block,
            "c" => DevType::Char,
            _ => return None,
        };
        if kind == DevType::All && f.len() == 1 {
            return Some(DevRule {
                allow,
                kind,
                major: None,
                minor: None,
                access: ACC_ALL,
            });
        }
        let (maj, min) = f.get(1)?.split_once(':')?;
        let num = |x: &str| -> Option<Option<u32>> {
            if x == "*" {
                Some(None)
            } else {
                x.parse().ok().map(Some)
            }
        };
        Some(DevRule {
            allow,
            kind,
            major: num(maj)?,
            minor: num(min)?,
            access: parse_access(f.get(2).copied().unwrap_or("rwm"))?,
        })
    }
}

fn parse_access(s: &str) -> Option<u8> {
    let mut a = 0;
    for c in s.chars() {
        a |= match c {
            'r' => ACC_READ,
            'w' => ACC_WRITE,
            'm' => ACC_MKNOD,
            _ => return None,
        };
    }
    Some(a)
}

impl std::fmt::Display for DevRule {
    /// cgroup v1 syntax without the verdict: `b 7:3 rwm`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = match self.kind {
            DevType::All => 'a',
            DevType::Block => 'b',
            DevType::Char => 'c',
        };
        let n = |x: Option<u32>| x.map_or("*".to_owned(), |v| v.to_string());
        let mut acc = String::new();
        for (bit, c) in [(ACC_READ, 'r'), (ACC_WRITE, 'w'), (ACC_MKNOD, 'm')] {
            if self.access & bit != 0 {
                acc.push(c);
            }
        }
        write!(f, "{t} {}:{} {acc}", n(self.major), n(self.minor))
    }
}

/// `linux.resources.devices` of an OCI runtime spec (`config.json`).
pub fn from_oci_spec(spec: &serde_json::Value) -> Option<Vec<DevRule>> {
    let list = spec
        .get("linux")?
        .get("resources")?
        .get("devices")?
        .as_array()?;
    let mut out = Vec::new();
    for d in list {
        let allow = d.get("allow")?.as_bool()?;
        let kind = match d.get("type").and_then(|t| t.as_str()).unwrap_or("a") {
            "a" | "" => DevType::All,
            "b" => DevType::Block,
            "c" | "u" => DevType::Char,
            _ => continue, // "p" (fifo): no device cgroup meaning
        };
        let num = |k: &str| -> Option<u32> {
            d.get(k)
                .and_then(|v| v.as_i64())
                .filter(|v| *v >= 0)
                .map(|v| v as u32)
        };
        out.push(DevRule {
            allow,
            kind,
            major: num("major"),
            minor: num("minor"),
            access: d
                .get("access")
                .and_then(|a| a.as_str())
                .map(|a| parse_access(a).unwrap_or(ACC_ALL))
                .unwrap_or(ACC_ALL),
        });
    }
    Some(out)
}

fn rules(list: &[(&str, bool)]) -> Vec<DevRule> {
    list.iter()
        .map(|(s, a)| DevRule::parse(s, *a).expect("valid built-in rule"))
        .collect()
}

/// Docker's default device rules (moby `oci/defaults.go`, 20.10–26): deny all, then
/// /dev/zero, null, urandom, random, tty, console allowed, fuse denied. Used only when the
/// container's bundle (`config.json`) cannot be found.
pub fn docker_defaults() -> Vec<DevRule> {
    rules(&[
        ("a *:* rwm", false),
        ("c 1:5 rwm", true),
        ("c 1:3 rwm", true),
        ("c 1:9 rwm", true),
        ("c 1:8 rwm", true),
        ("c 5:0 rwm", true),
        ("c 5:1 rwm", true),
        ("c 10:229 rwm", false),
    ])
}

/// runc's `AllowedDevices` (libcontainer/specconv), appended after the spec's rules.
pub fn runc_defaults() -> Vec<DevRule> {
    rules(RUNC_DEFAULTS)
}

pub const RUNC_DEFAULTS: &[(&str, bool)] = &[
    ("c *:* m", true),
    ("b *:* m", true),
    ("c 1:3 rwm", true),
    ("c 1:8 rwm", true),
    ("c 1:7 rwm", true),
    ("c 5:0 rwm", true),
    ("c 1:5 rwm", true),
    ("c 1:9 rwm", true),
    ("c 136:* rwm", true),
    ("c 5:2 rwm", true),
    ("c 10:200 rwm", true),
];

/// The rules reduced to a default verdict and ordered exceptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    pub default_allow: bool,
    pub exceptions: Vec<DevRule>,
}

/// Apply `rules` in order, starting from deny-all (runc's start state).
pub fn effective(rules: &[DevRule]) -> Effective {
    let mut e = Effective {
        default_allow: false,
        exceptions: Vec::new(),
    };
    for r in rules {
        if r.is_wildcard() && r.access == ACC_ALL {
            e.default_allow = r.allow;
            e.exceptions.clear();
        } else if r.allow != e.default_allow {
            if !e.exceptions.contains(r) {
                e.exceptions.push(r.clone());
            }
        } else {
            // Same verdict as the default: narrow or drop exceptions it covers exactly.
            e.exceptions.retain_mut(|x| {
                if x.kind == r.kind && x.major == r.major && x.minor == r.minor {
                    x.access &= !r.access;
                    x.access != 0
                } else {
                    true
                }
            });
        }
    }
    e
}

/// Does the effective rule set allow `access` on a block/char device? (For tests and
/// for "privileged needs no grant".)
pub fn allows(e: &Effective, kind: DevType, major: u32, minor: u32, access: u8) -> bool {
    for x in &e.exceptions {
        if (x.kind == DevType::All || x.kind == kind)
            && x.major.is_none_or(|m| m == major)
            && x.minor.is_none_or(|m| m == minor)
        {
            let hit = if x.allow {
                access & !x.access == 0
            } else {
                access & x.access != 0
            };
            if hit {
                return x.allow;
            }
        }
    }
    e.default_allow
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    /// dst in the low nibble, src in the high nibble.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const AND32_K: u8 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const RSH32_K: u8 = 0x74; // BPF_ALU | BPF_RSH | BPF_K
const MOV32_X: u8 = 0xbc; // BPF_ALU | BPF_MOV | BPF_X
const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

fn ins(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

/// The program for `rules` (see the module header).
pub fn emit(rules: &[DevRule]) -> Vec<Insn> {
    let e = effective(rules);
    let mut p = vec![
        ins(LDX_W, 2, 1, 0, 0),
        ins(AND32_K, 2, 0, 0, 0xffff),
        ins(LDX_W, 3, 1, 0, 0),
        ins(RSH32_K, 3, 0, 0, 16),
        ins(LDX_W, 4, 1, 4, 0),
        ins(LDX_W, 5, 1, 8, 0),
    ];
    for x in &e.exceptions {
        // Checks as (code, dst, imm) with a jump to the end of the block on mismatch.
        enum Step {
            Jne(u8, i32),
            Acc { mask: i32, jump_if_zero: bool },
        }
        let mut steps = Vec::new();
        match x.kind {
            DevType::All => {}
            DevType::Block => steps.push(Step::Jne(2, 1)),
            DevType::Char => steps.push(Step::Jne(2, 2)),
        }
        if x.access != ACC_ALL {
            if x.allow {
                // (req & ~rule) != 0 -> not a subset -> next block
                steps.push(Step::Acc {
                    mask: (!x.access & ACC_ALL) as i32,
                    jump_if_zero: false,
                });
            } else {
                // (req & rule) == 0 -> no intersection -> next block
                steps.push(Step::Acc {
                    mask: x.access as i32,
                    jump_if_zero: true,
                });
            }
        }
        if let Some(m) = x.major {
            steps.push(Step::Jne(4, m as i32));
        }
        if let Some(m) = x.minor {
            steps.push(Step::Jne(5, m as i32));
        }
        let len: usize = steps
            .iter()
            .map(|s| match s {
                Step::Jne(..) => 1,
                Step::Acc { .. } => 3,
            })
            .sum::<usize>()
            + 2;
        let start = p.len();
        for s in steps {
            match s {
                Step::Jne(reg, imm) => {
                    let off = (start + len) - (p.len() + 1);
                    p.push(ins(JNE_K, reg, 0, off as i16, imm));
                }
                Step::Acc { mask, jump_if_zero } => {
                    p.push(ins(MOV32_X, 1, 3, 0, 0));
                    p.push(ins(AND32_K, 1, 0, 0, mask));
                    let off = (start + len) - (p.len() + 1);
                    let code = if jump_if_zero { JEQ_K } else { JNE_K };
                    p.push(ins(code, 1, 0, off as i16, 0));
                }
            }
        }
        p.push(ins(MOV64_K, 0, 0, 0, x.allow as i32));
        p.push(ins(EXIT, 0, 0, 0, 0));
        debug_assert_eq!(p.len(), start + len);
    }
    p.push(ins(MOV64_K, 0, 0, 0, e.default_allow as i32));
    p.push(ins(EXIT, 0, 0, 0, 0));
    p
}

/// Run `prog` on a request, as the kernel would (a tiny interpreter of exactly the
/// instructions [`emit`] produces), for unit tests without root.
pub fn interpret(prog: &[Insn], kind: DevType, major: u32, minor: u32, access: u8) -> bool {
    let t = match kind {
        DevType::Block => 1u64,
        DevType::Char => 2,
        DevType::All => 0,
    };
    let ctx = [((access as u64) << 16) | t, major as u64, minor as u64];
    let mut r = [0u64; 11];
    let mut pc = 0usize;
    loop {
        let i = prog[pc];
        let (dst, src) = ((i.regs & 0x0f) as usize, (i.regs >> 4) as usize);
        pc += 1;
        match i.code {
            LDX_W => r[dst] = ctx[(i.off / 4) as usize] & 0xffff_ffff,
            AND32_K => r[dst] = (r[dst] as u32 & i.imm as u32) as u64,
            RSH32_K => r[dst] = ((r[dst] as u32) >> i.imm) as u64,
            MOV32_X => r[dst] = r[src] as u32 as u64,
            MOV64_K => r[dst] = i.imm as i64 as u64,
            JEQ_K => {
                if r[dst] == i.imm as i64 as u64 {
                    pc += i.off as usize
                }
            }
            JNE_K => {
                if r[dst] != i.imm as i64 as u64 {
                    pc += i.off as usize
                }
            }
            EXIT => return r[0] == 1,
            c => panic!("unexpected opcode {c:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docker_runc_plus(extra: &[DevRule]) -> Vec<DevRule> {
        let mut v = docker_defaults();
        v.extend(runc_defaults());
        v.extend_from_slice(extra);
        v
    }

    #[test]
    fn parse_and_print() {
        let r = DevRule::parse("b 7:3 rwm", true).unwrap();
        assert_eq!(r, DevRule::block(7, 3));
        assert_eq!(r.to_string(), "b 7:3 rwm");
        assert_eq!(
            DevRule::parse("c *:* m", true).unwrap().to_string(),
            "c *:* m"
        );
        assert!(DevRule::parse("a", false).unwrap().is_wildcard());
        assert!(DevRule::parse("x 1:2 r", true).is_none());
        assert!(DevRule::parse("b 1:2 rq", true).is_none());
    }

    #[test]
    fn exact_grant_opens_the_minor_and_not_its_neighbour() {
        let rules = docker_runc_plus(&[DevRule::block(7, 3), DevRule::block(259, 4)]);
        let p = emit(&rules);
        let rw = ACC_READ | ACC_WRITE;
        assert!(interpret(&p, DevType::Block, 7, 3, rw));
        assert!(interpret(&p, DevType::Block, 259, 4, ACC_READ));
        assert!(!interpret(&p, DevType::Block, 7, 4, rw));
        assert!(!interpret(&p, DevType::Block, 259, 5, ACC_READ));
        assert!(!interpret(&p, DevType::Block, 8, 0, ACC_READ));
        // mknod of anything (runc's default), but not open
        assert!(interpret(&p, DevType::Block, 7, 9, ACC_MKNOD));
        assert!(!interpret(&p, DevType::Block, 7, 9, ACC_MKNOD | ACC_READ));
        // the usual char devices; fuse stays denied
        assert!(interpret(&p, DevType::Char, 1, 3, rw));
        assert!(interpret(&p, DevType::Char, 136, 7, rw));
        assert!(!interpret(&p, DevType::Char, 10, 229, ACC_READ));
        // revoked: built again without it
        let p = emit(&docker_runc_plus(&[DevRule::block(259, 4)]));
        assert!(!interpret(&p, DevType::Block, 7, 3, ACC_READ));
        assert!(interpret(&p, DevType::Block, 259, 4, ACC_READ));
    }

    #[test]
    fn interpreter_agrees_with_the_model() {
        let rules = docker_runc_plus(&[
            DevRule::block(7, 3),
            DevRule::parse("c 4:* r", true).unwrap(),
            DevRule::parse("c 4:2 r", false).unwrap(),
        ]);
        let e = effective(&rules);
        let p = emit(&rules);
        for kind in [DevType::Block, DevType::Char] {
            for major in [1, 4, 5, 7, 10, 136, 259] {
                for minor in [0, 2, 3, 5, 229] {
                    for acc in 1..=7u8 {
                        assert_eq!(
                            interpret(&p, kind, major, minor, acc),
                            allows(&e, kind, major, minor, acc),
                            "{kind:?} {major}:{minor} {acc}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn privileged_allows_everything_without_exceptions() {
        let e = effective(&[DevRule::parse("a *:* rwm", true).unwrap()]);
        assert!(e.default_allow && e.exceptions.is_empty());
        assert_eq!(emit(&[DevRule::parse("a", true).unwrap()]).len(), 8);
    }

    #[test]
    fn oci_spec_rules() {
        let spec: serde_json::Value = serde_json::from_str(
            r#"{"linux":{"resources":{"devices":[
                {"allow":false,"access":"rwm"},
                {"allow":true,"type":"c","major":1,"minor":5,"access":"rwm"},
                {"allow":true,"type":"b","major":7,"minor":-1,"access":"rw"}]}}}"#,
        )
        .unwrap();
        let r = from_oci_spec(&spec).unwrap();
        assert_eq!(r.len(), 3);
        assert!(r[0].is_wildcard() && !r[0].allow);
        assert_eq!(r[2].to_string(), "b 7:* rw");
    }
}
