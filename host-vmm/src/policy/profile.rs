//! MMIO policy: which guest accesses to the device's BAR0 are allowed, dropped,
//! shadowed or faulted, and which raise alarms.
//!
//! A policy file (TOML) holds profiles (`tenant`, `operator`, ...) of rules. A rule
//! names a register from the register table (`register = "HANG_TRIGGER"`, or one
//! element: `"SCRATCH[3]"`), a raw `offset`, or a `range = [start, end]` (end
//! exclusive, 4-aligned); an `access` (`read`, `write`, `both`); an optional value
//! `filter`; an `action`; and `alarm = true|false`:
//!
//! ```toml
//! enforce = true
//! [[profile.tenant]]
//! register = "HANG_TRIGGER"
//! access = "write"
//! action = "drop"
//! alarm = true
//! [[profile.tenant]]
//! register = "CONTROL"
//! access = "write"
//! filter = { deny = [1], mask = 0x1 }
//! action = "fault"
//! ```
//!
//! Actions: `allow`; `drop` (a write is ignored, a read returns `value`, default 0);
//! `shadow` (a read returns the last value this guest wrote to the register, or its
//! reset value; writes go to the shadow only); `fault` (the guest receives an
//! exception). `alarm` combines with any action.
//!
//! Filters: `deny = [...]` — the rule applies when the (masked) value is listed;
//! `allow = [...]` — the rule applies when it is NOT listed. For writes the value
//! is the register's value after the write: for storage registers the written bytes
//! merged into the current value, for trigger registers the written bytes with zeros
//! elsewhere (as the device sees it), so a byte-by-byte write cannot slip past a
//! filter. Reads are filtered on the device's value.
//!
//! Precedence: for one register and access kind, a filtered rule that matches wins
//! over an unfiltered one; registers without a rule are allowed. Two unfiltered rules,
//! or two filtered rules whose value sets can overlap, with different actions on the
//! same register and access kind, are refused at load.
//!
//! Pages with no rule in the active profile are mapped straight into the guest (no
//! exits); every access to a page with any rule traps and is decided per register.

use hilrig_device::regmap::{self, Hw, Reg, RegisterDef, BAR0_SIZE, PAGES, PAGE_SIZE};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A policy problem, naming the file, the rule and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy {file}{}: {reason}", rule.as_ref().map(|r| format!(", {r}")).unwrap_or_default())]
pub struct PolicyError {
    /// The file (or `<builtin>`).
    pub file: String,
    /// The rule, as `profile tenant rule 3 (HANG_TRIGGER)`.
    pub rule: Option<String>,
    /// What is wrong.
    pub reason: String,
}

/// What happens to an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// The access reaches the device.
    Allow,
    /// Writes are ignored; reads return the rule's fixed value.
    Drop,
    /// Reads return the guest's shadow copy; writes update only the shadow.
    Shadow,
    /// The guest receives an exception; the access does not happen.
    Fault,
}

/// Which accesses a rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessKind {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Both.
    Both,
}

impl AccessKind {
    fn covers(self, write: bool) -> bool {
        matches!(
            (self, write),
            (AccessKind::Both, _) | (AccessKind::Read, false) | (AccessKind::Write, true)
        )
    }
}

/// A value filter as written in the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    /// The rule applies when the masked value is one of these.
    #[serde(default)]
    pub deny: Vec<u64>,
    /// The rule applies when the masked value is none of these.
    #[serde(default)]
    pub allow: Vec<u64>,
    /// Mask applied to the value before comparing (default: all 32 bits).
    pub mask: Option<u64>,
}

/// A rule as written in the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// A register name from the table, optionally with an element index.
    pub register: Option<String>,
    /// A raw BAR0 offset (one 32-bit register).
    pub offset: Option<u64>,
    /// A raw range [start, end), 4-aligned.
    pub range: Option<[u64; 2]>,
    /// read, write or both.
    pub access: Option<AccessKind>,
    /// What to do.
    pub action: Option<Action>,
    /// Raise an alarm.
    #[serde(default)]
    pub alarm: bool,
    /// For `drop`: the value reads return (default 0).
    pub value: Option<u64>,
    /// Value filter.
    pub filter: Option<FilterSpec>,
}

/// A policy file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Global enforce switch: off = everything allowed, alarms still counted.
    #[serde(default = "yes")]
    pub enforce: bool,
    /// Profiles by name.
    #[serde(default)]
    pub profile: BTreeMap<String, Vec<RuleSpec>>,
}

fn yes() -> bool {
    true
}

/// A compiled value filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// True: applies when listed (deny list); false: when not listed (allow list).
    pub when_listed: bool,
    /// The values.
    pub values: Vec<u32>,
    /// The mask.
    pub mask: u32,
}

impl Filter {
    /// Whether the rule applies to `v`.
    #[inline]
    pub fn applies(&self, v: u32) -> bool {
        self.values.contains(&(v & self.mask)) == self.when_listed
    }
}

/// A compiled rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Index in the profile (as written), for messages and alarm counters.
    pub index: usize,
    /// Human label, e.g. `HANG_TRIGGER` or `0x1000..0x2000`.
    pub label: String,
    /// First covered byte (4-aligned).
    pub start: u32,
    /// One past the last covered byte (4-aligned).
    pub end: u32,
    /// Access kinds.
    pub access: AccessKind,
    /// Action.
    pub action: Action,
    /// Alarm.
    pub alarm: bool,
    /// Fixed read value for `drop`.
    pub value: u32,
    /// Value filter.
    pub filter: Option<Filter>,
    /// Index of this rule's first word in the shadow store (shadow rules only).
    pub shadow_base: usize,
}

/// No rule for this word.
const NONE: u16 = u16::MAX;

/// Per-page decision tables: for each 32-bit word and access kind, the unfiltered rule
/// and the (at most one per word/kind) filtered rule that apply.
#[derive(Debug, Clone)]
struct PageTable {
    /// [word][write as usize] -> (unfiltered rule, filtered rule)
    words: Box<[[(u16, u16); 2]; (PAGE_SIZE / 4) as usize]>,
}

/// A compiled profile: what the engine consults on every trapped access.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Profile name.
    pub name: String,
    /// Where it came from.
    pub source: String,
    /// Global enforce switch.
    pub enforce: bool,
    /// Rules.
    pub rules: Vec<Rule>,
    pages: Vec<Option<PageTable>>,
    /// Reset values of the shadowed words, in shadow-store order.
    pub shadow_init: Vec<u32>,
    /// Register names of a described device (`devices::desc`); None: the reference
    /// device's register table.
    pub names: Option<std::sync::Arc<crate::devices::desc::RegisterNames>>,
}

/// The decision for one register-sized part of an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// What to do (`Allow` when no rule applies or enforce is off).
    pub action: Action,
    /// The rule that decided, if any.
    pub rule: Option<u16>,
    /// Raise an alarm.
    pub alarm: bool,
}

impl Decision {
    /// No rule: allowed, no alarm.
    pub const ALLOW: Decision = Decision {
        action: Action::Allow,
        rule: None,
        alarm: false,
    };
}

impl Profile {
    /// Whether any rule touches `page` (0..16): such pages trap, the others are mapped.
    pub fn page_traps(&self, page: usize) -> bool {
        self.pages.get(page).is_some_and(|p| p.is_some())
    }

    /// The pages that trap.
    pub fn trapping_pages(&self) -> Vec<usize> {
        (0..PAGES).filter(|&p| self.page_traps(p)).collect()
    }

    /// Whether deciding `(word, write)` needs the value (a filtered rule covers it).
    #[inline]
    pub fn needs_value(&self, word: u32, write: bool) -> bool {
        self.lookup(word, write).1 != NONE
    }

    #[inline]
    fn lookup(&self, word: u32, write: bool) -> (u16, u16) {
        let page = (word as u64 / PAGE_SIZE) as usize;
        match self.pages.get(page) {
            Some(Some(t)) => t.words[((word as u64 % PAGE_SIZE) / 4) as usize][write as usize],
            _ => (NONE, NONE),
        }
    }

    /// Decide one register-sized part of an access to the 4-aligned `word`. `value` is
    /// the value the filter sees (see the module docs); it is only consulted when
    /// [`Profile::needs_value`] says so. Allocates nothing.
    #[inline]
    pub fn decide(&self, word: u32, write: bool, value: u32) -> Decision {
        let (plain, filtered) = self.lookup(word, write);
        let id = if filtered != NONE
            && self.rules[filtered as usize]
                .filter
                .as_ref()
                .is_some_and(|f| f.applies(value))
        {
            filtered
        } else {
            plain
        };
        if id == NONE {
            return Decision::ALLOW;
        }
        let r = &self.rules[id as usize];
        Decision {
            action: if self.enforce {
                r.action
            } else {
                Action::Allow
            },
            rule: Some(id),
            alarm: r.alarm,
        }
    }

    /// Whether any rule (filtered or not) with action `fault` covers `(word, write)`.
    #[inline]
    pub fn may_fault(&self, word: u32, write: bool) -> bool {
        let (a, b) = self.lookup(word, write);
        [a, b]
            .iter()
            .any(|&id| id != NONE && self.rules[id as usize].action == Action::Fault)
    }

    /// The shadow-store index of `word` under shadow rule `rule`.
    #[inline]
    pub fn shadow_slot(&self, rule: u16, word: u32) -> usize {
        let r = &self.rules[rule as usize];
        r.shadow_base + ((word - r.start) / 4) as usize
    }
}

/// A register name that names no register of the table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterNameError {
    /// `NAME[...]` whose index is not a number.
    #[error("register {0:?}: index must be NAME[number]")]
    BadIndex(String),
    /// No register has this name.
    #[error("unknown register {0:?} (see docs/registers.md)")]
    Unknown(String),
    /// The index is past the array.
    #[error("{name} has {count} elements; index {index} is out of range")]
    OutOfRange {
        /// The register array.
        name: &'static str,
        /// Its elements.
        count: u32,
        /// The index asked for.
        index: u32,
    },
}

/// Resolve a register name (`NAME` or `NAME[i]`) to its byte range.
pub fn resolve_register(name: &str) -> Result<(u32, u32, &'static RegisterDef), RegisterNameError> {
    let (base, idx) = match name.split_once('[') {
        Some((b, rest)) => {
            let i = rest
                .strip_suffix(']')
                .and_then(|s| s.trim().parse::<u32>().ok())
                .ok_or_else(|| RegisterNameError::BadIndex(name.to_string()))?;
            (b.trim(), Some(i))
        }
        None => (name.trim(), None),
    };
    let def = regmap::REGISTERS
        .iter()
        .find(|r| r.name.eq_ignore_ascii_case(base))
        .ok_or_else(|| RegisterNameError::Unknown(base.to_string()))?;
    match idx {
        None => Ok((def.offset, def.end(), def)),
        Some(i) if i < def.count => Ok((def.offset + 4 * i, def.offset + 4 * i + 4, def)),
        Some(index) => Err(RegisterNameError::OutOfRange {
            name: def.name,
            count: def.count,
            index,
        }),
    }
}

/// The default profiles, generated from the register table's tenant and operator
/// columns: every access a profile may not make is dropped (reads return 0) and
/// raises an alarm.
pub fn default_policy() -> PolicyFile {
    use hilrig_device::regmap::{RuleAccess, RuleAction};
    let table = regmap::default_policy();
    let profile = table
        .profile
        .iter()
        .map(|(name, rules)| {
            let rules = rules
                .iter()
                .map(|r| RuleSpec {
                    register: Some(r.register.def().name.to_string()),
                    access: Some(match r.access {
                        RuleAccess::Read => AccessKind::Read,
                        RuleAccess::Write => AccessKind::Write,
                        RuleAccess::Both => AccessKind::Both,
                    }),
                    action: Some(match r.action {
                        RuleAction::Allow => Action::Allow,
                        RuleAction::Drop => Action::Drop,
                        RuleAction::Shadow => Action::Shadow,
                        RuleAction::Fault => Action::Fault,
                    }),
                    alarm: r.alarm,
                    value: r.value.map(u64::from),
                    ..Default::default()
                })
                .collect();
            (name.to_string(), rules)
        })
        .collect();
    PolicyFile {
        enforce: table.enforce,
        profile,
    }
}

/// The default policy as TOML (what `hilrig vm policy --defaults` prints).
pub fn default_policy_toml() -> String {
    // A typed value of plain fields always serializes; were it ever to fail, the file
    // would have no profiles and every load of it would be refused (fail closed).
    let body = toml::to_string(&regmap::default_policy()).unwrap_or_default();
    format!(
        "# Default MMIO policy, generated from the register table (docs/registers.md).\n\
         # Every access a profile may not make is dropped (reads return 0) with an alarm.\n\
         {body}"
    )
}

/// Largest policy file read (bytes); a larger one is refused before parsing.
pub const MAX_POLICY_BYTES: u64 = 1 << 20;

impl PolicyFile {
    /// Parse a policy file's text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<PolicyFile, PolicyError> {
        toml::from_str(text).map_err(|e| PolicyError {
            file: file.to_string(),
            rule: None,
            reason: e.to_string(),
        })
    }

    /// Load and parse a policy file: a regular file of at most
    /// [`MAX_POLICY_BYTES`], refused before parsing otherwise, read with that bound.
    pub fn load(path: &Path) -> Result<PolicyFile, PolicyError> {
        use hilrig_device::secure::{read_bounded, SecureFileError};
        let file = path.display().to_string();
        let text = read_bounded(path, MAX_POLICY_BYTES).map_err(|e| PolicyError {
            file: file.clone(),
            rule: None,
            reason: match e {
                SecureFileError::Io { source, .. } => source.to_string(),
                SecureFileError::NotRegular { kind, .. } => {
                    format!("{kind}, not a regular file")
                }
                SecureFileError::TooLarge { size, limit, .. } => {
                    format!("{size} bytes is over the limit of {limit} bytes for a policy file")
                }
                e => e.to_string(),
            },
        })?;
        Self::parse(&text, &file)
    }

    /// Compile one profile, validating every rule against the register table.
    pub fn compile(&self, profile: &str, file: &str) -> Result<Profile, PolicyError> {
        let perr = |rule: Option<String>, reason: String| PolicyError {
            file: file.to_string(),
            rule,
            reason,
        };
        let specs = self.profile.get(profile).ok_or_else(|| {
            perr(
                None,
                format!(
                    "no profile {profile:?}; the file has: {}",
                    self.profile.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
        })?;
        if specs.len() >= NONE as usize {
            return Err(perr(
                None,
                format!("{} rules; at most {}", specs.len(), NONE - 1),
            ));
        }
        let mut rules = Vec::with_capacity(specs.len());
        let mut shadow_init = Vec::new();
        for (i, s) in specs.iter().enumerate() {
            let what = s
                .register
                .clone()
                .or(s.offset.map(|o| format!("{o:#x}")))
                .or(s.range.map(|[a, b]| format!("{a:#x}..{b:#x}")))
                .unwrap_or_else(|| "?".into());
            let at = Some(format!("profile {profile} rule {} ({what})", i + 1));
            let bad = |reason: String| perr(at.clone(), reason);
            let (start, end, def) = match (&s.register, s.offset, s.range) {
                (Some(n), None, None) => {
                    let (a, b, d) = resolve_register(n).map_err(|e| bad(e.to_string()))?;
                    (a as u64, b as u64, Some(d))
                }
                (None, Some(o), None) => (
                    o,
                    o.saturating_add(4),
                    regmap::lookup(o.min(u32::MAX as u64) as u32),
                ),
                (None, None, Some([a, b])) => (a, b, None),
                _ => return Err(bad("name exactly one of register, offset or range".into())),
            };
            if start % 4 != 0 || end % 4 != 0 {
                return Err(bad(format!(
                    "{start:#x}..{end:#x} is not 4-byte aligned (registers are 32-bit)"
                )));
            }
            if start >= end || end > BAR0_SIZE {
                return Err(bad(format!(
                    "{start:#x}..{end:#x} is not a range inside BAR0 (0..0x10000)"
                )));
            }
            let access = s
                .access
                .ok_or_else(|| bad("missing access (read, write or both)".into()))?;
            let action = s
                .action
                .ok_or_else(|| bad("missing action (allow, drop, shadow or fault)".into()))?;
            let value = match s.value {
                None => 0,
                Some(v) if v <= u32::MAX as u64 => v as u32,
                Some(v) => {
                    return Err(bad(format!(
                        "value {v:#x} is wider than the 32-bit register"
                    )))
                }
            };
            if s.value.is_some() && action != Action::Drop {
                return Err(bad("`value` only applies to action drop".into()));
            }
            let filter = match &s.filter {
                None => None,
                Some(f) => {
                    let mask = f.mask.unwrap_or(u32::MAX as u64);
                    let wide = f
                        .deny
                        .iter()
                        .chain(&f.allow)
                        .chain(std::iter::once(&mask))
                        .find(|&&v| v > u32::MAX as u64);
                    if let Some(v) = wide {
                        return Err(bad(format!(
                            "filter value {v:#x} is wider than the 32-bit register"
                        )));
                    }
                    let (when_listed, values) = match (f.deny.is_empty(), f.allow.is_empty()) {
                        (false, true) => (true, &f.deny),
                        (true, false) => (false, &f.allow),
                        _ => return Err(bad("a filter needs exactly one of deny or allow".into())),
                    };
                    if let Some(v) = values.iter().find(|&&v| v & !mask != 0) {
                        return Err(bad(format!(
                            "filter value {v:#x} has bits outside the mask {mask:#x}"
                        )));
                    }
                    Some(Filter {
                        when_listed,
                        values: values.iter().map(|&v| v as u32).collect(),
                        mask: mask as u32,
                    })
                }
            };
            let shadow_base = shadow_init.len();
            if action == Action::Shadow {
                for w in (start..end).step_by(4) {
                    shadow_init.push(regmap::lookup(w as u32).map(|d| d.reset).unwrap_or(0));
                }
            }
            let label = match def {
                Some(d)
                    if s.register.is_some()
                        || (d.offset as u64 == start && d.end() as u64 == end) =>
                {
                    s.register.clone().unwrap_or_else(|| d.name.to_string())
                }
                Some(d) => d.element_name(start as u32),
                None => format!("{start:#x}..{end:#x}"),
            };
            rules.push(Rule {
                index: i,
                label,
                start: start as u32,
                end: end as u32,
                access,
                action,
                alarm: s.alarm,
                value,
                filter,
                shadow_base,
            });
        }
        // Build the page tables and refuse conflicting overlaps.
        let mut pages: Vec<Option<PageTable>> = vec![None; PAGES];
        for (id, r) in rules.iter().enumerate() {
            for w in (r.start..r.end).step_by(4) {
                let page = (w as u64 / PAGE_SIZE) as usize;
                let t = pages[page].get_or_insert_with(|| PageTable {
                    words: Box::new([[(NONE, NONE); 2]; (PAGE_SIZE / 4) as usize]),
                });
                let slot = &mut t.words[((w as u64 % PAGE_SIZE) / 4) as usize];
                for write in [false, true] {
                    if !r.access.covers(write) {
                        continue;
                    }
                    let cell = &mut slot[write as usize];
                    let target = if r.filter.is_some() {
                        &mut cell.1
                    } else {
                        &mut cell.0
                    };
                    if *target != NONE {
                        let other = &rules[*target as usize];
                        let same = other.action == r.action
                            && other.alarm == r.alarm
                            && other.value == r.value
                            && other.filter == r.filter;
                        if !same {
                            return Err(perr(
                                Some(format!("profile {profile} rule {} ({})", r.index + 1, r.label)),
                                format!(
                                    "conflicts with rule {} ({}) on {} of offset {w:#x}: overlapping rules with different actions",
                                    other.index + 1,
                                    other.label,
                                    if write { "writes" } else { "reads" }
                                ),
                            ));
                        }
                        continue;
                    }
                    *target = id as u16;
                }
            }
        }
        Ok(Profile {
            name: profile.to_string(),
            source: file.to_string(),
            enforce: self.enforce,
            rules,
            pages,
            shadow_init,
            names: None,
        })
    }
}

/// Load a policy (a file, or the built-in defaults when `path` is None) and compile
/// `profile`.
pub fn load_profile(path: Option<&Path>, profile: &str) -> Result<Profile, PolicyError> {
    match path {
        Some(p) => PolicyFile::load(p)?.compile(profile, &p.display().to_string()),
        None => default_policy().compile(profile, "<builtin defaults>"),
    }
}

/// Where a policy came from, for status output.
pub fn describe(path: Option<&PathBuf>) -> String {
    path.map(|p| p.display().to_string())
        .unwrap_or_else(|| "<builtin defaults>".into())
}

impl Profile {
    /// The register name for an offset in the device this profile is for: a
    /// described device's names, else the reference device's ([`register_name`]).
    pub fn register_name(&self, word: u32) -> String {
        match self.names.as_ref().and_then(|n| n.name(word)) {
            Some(n) => n.to_string(),
            None if self.names.is_some() => format!("{word:#06x}"),
            None => register_name(word),
        }
    }
}

/// The register name for an offset (e.g. `SCRATCH[3]`), or the hex offset.
pub fn register_name(word: u32) -> String {
    regmap::lookup(word)
        .map(|d| d.element_name(word & !3))
        .unwrap_or_else(|| format!("{word:#06x}"))
}

/// Whether the register at `word` stores written bytes (RW/W1C: filters see the merged
/// value) or acts on them (WO trigger: filters see the written bytes only).
pub fn merges_writes(word: u32) -> bool {
    regmap::lookup(word).is_some_and(|d| matches!(d.hw, Hw::Rw | Hw::W1c))
}

/// The register enum for a word, if any (for callers that want to match on it).
pub fn reg_of(word: u32) -> Option<Reg> {
    regmap::DECODER.decode(word & !3).map(|(r, _)| r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(text: &str, profile: &str) -> Result<Profile, PolicyError> {
        PolicyFile::parse(text, "t.toml")?.compile(profile, "t.toml")
    }

    #[test]
    fn defaults_follow_the_register_table() {
        let t = load_profile(None, "tenant").unwrap();
        // Page 0 mixed, 1 flash, 2 counters (writes), 3 key: trap; buffers never.
        assert_eq!(t.trapping_pages(), vec![0, 1, 2, 3]);
        let hang = Reg::HangTrigger.offset();
        assert_eq!(t.decide(hang, true, 0).action, Action::Drop);
        assert!(t.decide(hang, true, 0).alarm);
        assert_eq!(t.decide(Reg::Scratch.offset(), true, 0), Decision::ALLOW);
        assert_eq!(
            t.decide(Reg::DeviceKey.offset() + 4, false, 0).action,
            Action::Drop
        );
        assert_eq!(t.decide(Reg::Counter.offset(), false, 0), Decision::ALLOW);
        assert_eq!(
            t.decide(Reg::Counter.offset(), true, 0).action,
            Action::Drop
        );
        let o = load_profile(None, "operator").unwrap();
        assert_eq!(o.decide(hang, true, 0), Decision::ALLOW);
        assert_eq!(o.decide(Reg::DeviceKey.offset(), false, 0), Decision::ALLOW);
        assert!(!o.page_traps(4));
        // The generated TOML compiles to the same thing.
        let from_toml = compile(&default_policy_toml(), "tenant").unwrap();
        assert_eq!(from_toml.rules, t.rules);
        // Every register the tenant may not touch is covered, none that it may.
        for r in regmap::REGISTERS {
            for w in (r.offset..r.end()).step_by(4).take(2) {
                assert_eq!(
                    t.decide(w, true, 0).rule.is_some(),
                    !r.tenant.can_write(),
                    "{}",
                    r.name
                );
                assert_eq!(
                    t.decide(w, false, 0).rule.is_some(),
                    !r.tenant.can_read(),
                    "{}",
                    r.name
                );
            }
        }
    }

    #[test]
    fn filters_and_precedence() {
        let p = compile(
            r#"
            [[profile.x]]
            register = "CONTROL"
            access = "write"
            action = "shadow"
            [[profile.x]]
            register = "CONTROL"
            access = "write"
            filter = { deny = [1], mask = 1 }
            action = "fault"
            alarm = true
            "#,
            "x",
        )
        .unwrap();
        let c = Reg::Control.offset();
        assert!(p.needs_value(c, true));
        assert_eq!(p.decide(c, true, 0x3).action, Action::Fault);
        assert_eq!(p.decide(c, true, 0x2).action, Action::Shadow);
        assert_eq!(p.decide(c, false, 0x3), Decision::ALLOW);
        assert_eq!(p.shadow_init, vec![0]);
    }

    #[test]
    fn enforce_off_allows_but_still_alarms() {
        let mut f = default_policy();
        f.enforce = false;
        let t = f.compile("tenant", "x").unwrap();
        let d = t.decide(Reg::HangTrigger.offset(), true, 0);
        assert_eq!((d.action, d.alarm), (Action::Allow, true));
    }

    #[test]
    fn bad_policies_are_refused_with_file_rule_and_reason() {
        for (text, want) in [
            ("[[profile.t]]\nregister = \"NOPE\"\naccess = \"read\"\naction = \"drop\"", "unknown register \"NOPE\""),
            ("[[profile.t]]\nregister = \"SCRATCH[9]\"\naccess = \"read\"\naction = \"drop\"", "index 9 is out of range"),
            ("[[profile.t]]\nrange = [0xff00, 0x10010]\naccess = \"read\"\naction = \"drop\"", "inside BAR0"),
            ("[[profile.t]]\noffset = 0x2\naccess = \"read\"\naction = \"drop\"", "aligned"),
            ("[[profile.t]]\nregister = \"CONTROL\"\naccess = \"write\"\naction = \"fault\"\nfilter = { deny = [0x1_0000_0000] }", "wider than the 32-bit"),
            ("[[profile.t]]\nregister = \"CONTROL\"\naccess = \"write\"\naction = \"drop\"\nvalue = 0x1_0000_0000", "wider than the 32-bit"),
            ("[[profile.t]]\nregister = \"CONTROL\"\naccess = \"write\"\naction = \"fault\"\nfilter = { deny = [2], mask = 1 }", "outside the mask"),
            ("[[profile.t]]\nregister = \"CONTROL\"\naccess = \"write\"\naction = \"fault\"\n[[profile.t]]\nrange = [0, 0x20]\naccess = \"both\"\naction = \"drop\"", "conflicts with rule 1"),
            ("[[profile.t]]\nregister = \"CONTROL\"\naction = \"fault\"", "missing access"),
            ("[[profile.t]]\nregister = \"CONTROL\"\naccess = \"write\"\naction = \"explode\"", "unknown variant"),
            ("[[profile.t]]\nregister = \"CONTROL\"\noffset = 4\naccess = \"write\"\naction = \"drop\"", "exactly one of"),
            ("[[profile.other]]\nregister = \"CONTROL\"\naccess = \"write\"\naction = \"drop\"", "no profile \"t\""),
        ] {
            let e = compile(text, "t").unwrap_err();
            assert!(e.to_string().contains(want), "{text}\n=> {e}");
            assert!(e.to_string().starts_with("policy t.toml"), "{e}");
        }
        // Identical overlapping rules are fine.
        compile(
            "[[profile.t]]\nregister = \"CONTROL\"\naccess = \"write\"\naction = \"drop\"\n[[profile.t]]\noffset = 0xc\naccess = \"write\"\naction = \"drop\"",
            "t",
        )
        .unwrap();
    }
}
