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
//! over an unfiltered one, and any other rule over a plain `allow` (no filter, no
//! alarm: a listing of what the profile may do) on the same register. Fail closed: on a page with rules, a register and access
//! kind no rule covers is denied (dropped, reads return 0, alarmed; rule number 0 in
//! alarms) unless the profile says `default = "allow"` (a register with only a
//! filtered rule falls back to allow when the filter does not apply). Two unfiltered rules,
//! or two filtered rules whose value sets can overlap, with different actions on the
//! same register and access kind, are refused at load.
//!
//! A profile is an array of rules, or a table with settings:
//!
//! ```toml
//! [profile.lab]
//! default = "allow"       # or "deny" (the default)
//! enforce = "off"         # this profile's switch (default: the file's `enforce`)
//! [[profile.lab.rules]]
//! register = "DEVICE_KEY"
//! access = "read"
//! action = "drop"
//! ```
//!
//! Pages with no rule in the active profile are mapped straight into the guest (no
//! exits); every access to a page with any rule traps and is decided per register.
//! With enforcement off, pages with rules are mapped straight through too. A page
//! whose rules are all plain `allow`s covering every word both ways restricts
//! nothing and is mapped too ([`Profile::page_restricts`]). A page without rules
//! that traps anyway because the VM traps every page (`--trap all`) gets the
//! profile's default ([`Profile::default_decision`]): fail closed there too.

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
    pub profile: BTreeMap<String, ProfileSpec>,
    /// What a breach does and what triggers one (`[breach]`, see [`super::breach`]);
    /// the same for every profile of the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breach: Option<super::breach::BreachSpec>,
}

fn yes() -> bool {
    true
}

/// What a trapped access no rule covers gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    /// Denied: dropped (reads return 0) with an alarm (fail closed).
    #[default]
    Deny,
    /// Allowed, no alarm (the old fail-open behaviour; say so explicitly).
    Allow,
}

/// A per-profile enforce switch: `"on"`/`"off"` (or `true`/`false`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(into = "String")]
pub struct OnOff(pub bool);

impl From<OnOff> for String {
    fn from(v: OnOff) -> String {
        if v.0 { "on" } else { "off" }.into()
    }
}

impl<'de> Deserialize<'de> for OnOff {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<OnOff, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = OnOff;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"on\" or \"off\" (or true/false)")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<OnOff, E> {
                Ok(OnOff(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OnOff, E> {
                match v {
                    "on" => Ok(OnOff(true)),
                    "off" => Ok(OnOff(false)),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// One profile as written: a plain array of rules (`[[profile.tenant]]`), or a
/// table with settings and its rules (`[profile.lab]` with `default = "allow"`,
/// `enforce = "off"` and `[[profile.lab.rules]]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum ProfileSpec {
    /// Just the rules (default deny, the file's enforce switch).
    Rules(Vec<RuleSpec>),
    /// Settings and rules.
    Table(ProfileTable),
}

/// A profile written as a table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileTable {
    /// What a trapped access without a rule gets (default: deny).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<DefaultAction>,
    /// This profile's enforce switch (default: the file's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforce: Option<OnOff>,
    /// The rules.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

impl ProfileSpec {
    /// The rules.
    pub fn rules(&self) -> &[RuleSpec] {
        match self {
            ProfileSpec::Rules(r) => r,
            ProfileSpec::Table(t) => &t.rules,
        }
    }

    /// The rules, to edit (e.g. to resolve register names against a description).
    pub fn rules_mut(&mut self) -> &mut Vec<RuleSpec> {
        match self {
            ProfileSpec::Rules(r) => r,
            ProfileSpec::Table(t) => &mut t.rules,
        }
    }
    fn default_action(&self) -> DefaultAction {
        match self {
            ProfileSpec::Rules(_) => DefaultAction::Deny,
            ProfileSpec::Table(t) => t.default.unwrap_or_default(),
        }
    }
    fn enforce(&self) -> Option<bool> {
        match self {
            ProfileSpec::Rules(_) => None,
            ProfileSpec::Table(t) => t.enforce.map(|e| e.0),
        }
    }
}

impl From<Vec<RuleSpec>> for ProfileSpec {
    fn from(r: Vec<RuleSpec>) -> ProfileSpec {
        ProfileSpec::Rules(r)
    }
}

// By hand rather than `untagged`, so errors inside a rule keep their message and place.
impl<'de> Deserialize<'de> for ProfileSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ProfileSpec, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ProfileSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of rules or a table with `rules`")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                a: A,
            ) -> Result<ProfileSpec, A::Error> {
                Vec::<RuleSpec>::deserialize(serde::de::value::SeqAccessDeserializer::new(a))
                    .map(ProfileSpec::Rules)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                a: A,
            ) -> Result<ProfileSpec, A::Error> {
                ProfileTable::deserialize(serde::de::value::MapAccessDeserializer::new(a))
                    .map(ProfileSpec::Table)
            }
        }
        d.deserialize_any(V)
    }
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
    /// Enforce switch (the profile's, else the file's; `--enforce` overrides it).
    /// Off: the pages with rules are mapped straight through like pages without
    /// rules (no trap, no alarm); accesses that still trap (`VmConfig::trap`) are
    /// allowed, alarms still counted.
    pub enforce: bool,
    /// What a trapped access without a rule gets.
    pub default: DefaultAction,
    /// Rules (with default deny, the last one is the synthetic default rule).
    pub rules: Vec<Rule>,
    /// The synthetic rule that denies accesses no rule covers (default deny).
    pub default_rule: Option<u16>,
    pages: Vec<Option<PageTable>>,
    /// Pages whose every word is plainly allowed both ways ([`Profile::page_restricts`]).
    open_pages: Vec<bool>,
    /// Reset values of the shadowed words, in shadow-store order.
    pub shadow_init: Vec<u32>,
    /// Register names of a described device (`devices::desc`); None: the reference
    /// device's register table.
    pub names: Option<std::sync::Arc<crate::policy::desc::RegisterNames>>,
    /// The file's `[breach]` table, compiled (empty: no breach triggers).
    pub breach: std::sync::Arc<super::breach::BreachConfig>,
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
    /// Whether `page` (0..16) traps: a rule touches it and enforcement is on. The
    /// other pages are mapped straight into the guest.
    pub fn page_traps(&self, page: usize) -> bool {
        self.enforce && self.page_restricts(page)
    }

    /// Whether `page` has rules that restrict something: rules, and not only plain
    /// `allow` rules covering every word both ways (such a page, a listing of what
    /// the profile may do, is mapped like a page without rules; it is decided by
    /// its rules only where it traps anyway, e.g. `--trap all`).
    pub fn page_restricts(&self, page: usize) -> bool {
        self.page_has_rules(page) && !self.open_pages.get(page).copied().unwrap_or(false)
    }

    /// Whether any rule touches `page` (whether or not enforcement is on).
    pub fn page_has_rules(&self, page: usize) -> bool {
        self.pages.get(page).is_some_and(|p| p.is_some())
    }

    /// The pages that trap (none with enforcement off).
    pub fn trapping_pages(&self) -> Vec<usize> {
        (0..PAGES).filter(|&p| self.page_traps(p)).collect()
    }

    /// The pages with restricting rules (trapping or, with enforcement off, mapped).
    pub fn rule_pages(&self) -> Vec<usize> {
        (0..PAGES).filter(|&p| self.page_restricts(p)).collect()
    }

    /// The decision for an access on a page without rules that traps only because
    /// the VM traps every page (`--trap all`): the profile's default — denied
    /// (dropped, reads 0, alarmed, rule 0) unless the profile says
    /// `default = "allow"` (fail closed).
    #[inline]
    pub fn default_decision(&self) -> Decision {
        match self.default_rule {
            None => Decision::ALLOW,
            Some(id) => Decision {
                action: if self.enforce {
                    self.rules[id as usize].action
                } else {
                    Action::Allow
                },
                rule: Some(id),
                alarm: true,
            },
        }
    }

    /// The alarm's rule number of rule `id`: 1-based as written, 0 for the
    /// synthetic default-deny rule.
    pub fn rule_number(&self, id: u16) -> usize {
        if Some(id) == self.default_rule {
            0
        } else {
            id as usize + 1
        }
    }

    /// Whether `new` lets through an access this profile keeps from the device:
    /// some register and access kind this profile does not always allow that `new`
    /// always allows (or `new` turns enforcement off). Returns the first such
    /// register and access, for the refusal.
    pub fn widened_by(&self, new: &Profile) -> Option<String> {
        if self.enforce && !new.enforce {
            return Some("enforcement turned off".into());
        }
        for w in (0..BAR0_SIZE as u32).step_by(4) {
            for write in [false, true] {
                let blocks = |p: &Profile| {
                    let (a, b) = p.lookup(w, write);
                    p.enforce
                        && [a, b]
                            .iter()
                            .any(|&id| id != NONE && p.rules[id as usize].action != Action::Allow)
                };
                let always_allows = |p: &Profile| !blocks(p);
                if blocks(self) && always_allows(new) {
                    return Some(format!(
                        "{} of {} would reach the device",
                        if write { "writes" } else { "reads" },
                        register_name(w)
                    ));
                }
            }
        }
        None
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
/// raises an alarm; then, on every page those rules make trap, the registers the
/// profile may access get an explicit `allow` rule (after the restrictive ones, so
/// their rule numbers stay), so that the default deny only meets offsets the table
/// does not give the profile.
pub fn default_policy() -> PolicyFile {
    use hilrig_device::regmap::{RuleAccess, RuleAction};
    let table = regmap::default_policy();
    let profile = regmap::Profile::ALL
        .into_iter()
        .map(|who| {
            let restricted = table.profile.get(who.name()).cloned().unwrap_or_default();
            let mut rules: Vec<RuleSpec> = restricted
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
            let pages: Vec<usize> = restricted.iter().map(|r| r.register.def().page()).collect();
            for def in regmap::REGISTERS {
                let last_page = ((def.end() as u64 - 1) / PAGE_SIZE) as usize;
                if !pages.contains(&def.page()) || !pages.contains(&last_page) {
                    continue;
                }
                let perm = who.perm(def);
                let access = match (perm.can_read(), perm.can_write()) {
                    (true, true) => AccessKind::Both,
                    (true, false) => AccessKind::Read,
                    (false, true) => AccessKind::Write,
                    (false, false) => continue,
                };
                rules.push(RuleSpec {
                    register: Some(def.name.to_string()),
                    access: Some(access),
                    action: Some(Action::Allow),
                    ..Default::default()
                });
            }
            // The pages it has no restriction on are the profile's to use: listed as
            // allowed (whole pages; such pages stay mapped), so that where they trap
            // anyway (`--trap all`) the default deny does not meet them.
            let mut p = 0;
            while p < PAGES {
                if pages.contains(&p) {
                    p += 1;
                    continue;
                }
                let start = p;
                while p < PAGES && !pages.contains(&p) {
                    p += 1;
                }
                rules.push(RuleSpec {
                    range: Some([start as u64 * PAGE_SIZE, p as u64 * PAGE_SIZE]),
                    access: Some(AccessKind::Both),
                    action: Some(Action::Allow),
                    ..Default::default()
                });
            }
            (who.name().to_string(), ProfileSpec::Rules(rules))
        })
        .collect();
    PolicyFile {
        enforce: table.enforce,
        profile,
        breach: None,
    }
}

/// The default policy as TOML (what `hilrig vm policy --defaults` prints).
pub fn default_policy_toml() -> String {
    // A typed value of plain fields always serializes; were it ever to fail, the file
    // would have no profiles and every load of it would be refused (fail closed).
    let body = toml::to_string(&default_policy()).unwrap_or_default();
    format!(
        "# Default MMIO policy, generated from the register table (docs/registers.md).\n\
         # Every access a profile may not make is dropped (reads return 0) with an alarm;\n\
         # on the pages that trap, the registers it may use are listed as `allow`, and\n\
         # anything else there is denied (default deny).\n\
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
        let spec = self.profile.get(profile).ok_or_else(|| {
            perr(
                None,
                format!(
                    "no profile {profile:?}; the file has: {}",
                    self.profile.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
        })?;
        let specs = spec.rules();
        if specs.len() + 1 >= NONE as usize {
            return Err(perr(
                None,
                format!("{} rules; at most {}", specs.len(), NONE - 2),
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
                        // A plain allow (no filter, no alarm) lists what a profile may
                        // do; a restrictive rule on the same register narrows it.
                        let plain_allow =
                            |x: &Rule| x.action == Action::Allow && !x.alarm && x.filter.is_none();
                        if !same && plain_allow(other) && !plain_allow(r) {
                            *target = id as u16;
                            continue;
                        }
                        if !same && plain_allow(r) {
                            continue;
                        }
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
        // A page whose every word both ways falls to a plain allow restricts nothing.
        let plain_allow = |id: u16| {
            id != NONE && {
                let r = &rules[id as usize];
                r.action == Action::Allow && !r.alarm && r.filter.is_none()
            }
        };
        let open_pages: Vec<bool> = pages
            .iter()
            .map(|t| {
                t.as_ref().is_some_and(|t| {
                    t.words
                        .iter()
                        .flatten()
                        .all(|&(plain, filtered)| filtered == NONE && plain_allow(plain))
                })
            })
            .collect();
        // Fail closed: on a page with rules, a register and access kind no rule
        // covers is denied (dropped, reads 0, alarmed) by a synthetic last rule;
        // on a page without rules that traps anyway (`--trap all`) too
        // ([`Profile::default_decision`]).
        let default = spec.default_action();
        let mut default_rule = None;
        if default == DefaultAction::Deny {
            let id = rules.len() as u16;
            rules.push(Rule {
                index: specs.len(),
                label: "(no rule: default deny)".into(),
                start: 0,
                end: BAR0_SIZE as u32,
                access: AccessKind::Both,
                action: Action::Drop,
                alarm: true,
                value: 0,
                filter: None,
                shadow_base: 0,
            });
            for t in pages.iter_mut().flatten() {
                for cell in t.words.iter_mut().flatten() {
                    if *cell == (NONE, NONE) {
                        cell.0 = id;
                    }
                }
            }
            default_rule = Some(id);
        }
        let breach = match &self.breach {
            Some(b) => std::sync::Arc::new(b.compile(file)?),
            None => Default::default(),
        };
        Ok(Profile {
            breach,
            name: profile.to_string(),
            source: file.to_string(),
            enforce: spec.enforce().unwrap_or(self.enforce),
            default,
            rules,
            default_rule,
            pages,
            open_pages,
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
        let scratch = t.decide(Reg::Scratch.offset(), true, 0);
        assert_eq!((scratch.action, scratch.alarm), (Action::Allow, false));
        assert!(scratch.rule.is_some(), "listed as allowed");
        assert_eq!(
            t.decide(Reg::DeviceKey.offset() + 4, false, 0).action,
            Action::Drop
        );
        assert_eq!(
            t.decide(Reg::Counter.offset(), false, 0).action,
            Action::Allow
        );
        assert_eq!(
            t.decide(Reg::Counter.offset(), true, 0).action,
            Action::Drop
        );
        let o = load_profile(None, "operator").unwrap();
        for (w, write) in [(hang, true), (Reg::DeviceKey.offset(), false)] {
            let d = o.decide(w, write, 0);
            assert_eq!((d.action, d.alarm), (Action::Allow, false));
        }
        assert!(!o.page_traps(4));
        // The generated TOML compiles to the same thing.
        let from_toml = compile(&default_policy_toml(), "tenant").unwrap();
        assert_eq!(from_toml.rules, t.rules);
        // Every register the tenant may not touch is denied with an alarm, every
        // one it may is allowed (listed where its page traps).
        for r in regmap::REGISTERS {
            for w in (r.offset..r.end()).step_by(4).take(2) {
                for (write, ok) in [(true, r.tenant.can_write()), (false, r.tenant.can_read())] {
                    let d = t.decide(w, write, 0);
                    assert_eq!(d.action == Action::Allow, ok, "{} write={write}", r.name);
                    assert_eq!(d.alarm, !ok, "{} write={write}", r.name);
                    assert_ne!(d.rule, t.default_rule, "{} is listed", r.name);
                }
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
        // No rule for CONTROL reads: denied (fail closed).
        assert_eq!(p.decide(c, false, 0x3).rule, p.default_rule);
        assert_eq!(p.decide(c, false, 0x3).action, Action::Drop);
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
    fn fail_closed_unless_the_profile_says_default_allow() {
        // One rule on page 3: every other register and hole of page 3 is denied.
        let one =
            "[[profile.t]]\nregister = \"DEVICE_KEY[0]\"\naccess = \"write\"\naction = \"drop\"\n";
        let p = compile(one, "t").unwrap();
        let key1 = Reg::DeviceKey.offset() + 4;
        let d = p.decide(key1, false, 0);
        assert_eq!((d.action, d.alarm), (Action::Drop, true));
        assert_eq!(d.rule, p.default_rule);
        assert_eq!(p.rule_number(d.rule.unwrap()), 0);
        assert_eq!(p.decide(0x3ffc, true, 0).action, Action::Drop, "a hole");
        assert_eq!(p.trapping_pages(), vec![3]);
        assert_eq!(
            p.decide(Reg::Scratch.offset(), true, 0),
            Decision::ALLOW,
            "page 0 has no rule"
        );
        // The table form with default = "allow": the old behaviour, said explicitly.
        let open = "[profile.t]\ndefault = \"allow\"\n[[profile.t.rules]]\nregister = \"DEVICE_KEY[0]\"\naccess = \"write\"\naction = \"drop\"\n";
        let q = compile(open, "t").unwrap();
        assert_eq!(q.decide(key1, false, 0), Decision::ALLOW);
        assert_eq!(q.default, DefaultAction::Allow);
        assert!(q.default_rule.is_none());
        // Widening: the open profile lets the key through where the closed one did not.
        let why = p.widened_by(&q).expect("widens");
        assert!(why.contains("reads of DEVICE_KEY"), "{why}");
        assert_eq!(q.widened_by(&p), None);
        assert_eq!(p.widened_by(&p), None);
        // The built-in tenant: a one-rule patch leaving the key readable widens it.
        let t = load_profile(None, "tenant").unwrap();
        let patch = compile("[profile.tenant]\ndefault = \"allow\"\n[[profile.tenant.rules]]\nregister = \"HANG_TRIGGER\"\naccess = \"write\"\naction = \"drop\"\n", "tenant").unwrap();
        assert!(t.widened_by(&patch).is_some());
        // An error inside a table-form rule keeps its message.
        let e = compile("[profile.t]\n[[profile.t.rules]]\nregister = \"CONTROL\"\naccess = \"write\"\naction = \"explode\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("unknown variant"), "{e}");
        let e = compile("[profile.t]\nenforce = \"maybe\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("\"on\" or \"off\""), "{e}");
    }

    #[test]
    fn trap_all_pages_get_the_default_and_listing_pages_stay_mapped() {
        // Default deny: a page without rules gets the default (drop, alarm, rule 0).
        let p = compile(
            "[[profile.t]]\nregister = \"DEVICE_KEY[0]\"\naccess = \"write\"\naction = \"drop\"\n",
            "t",
        )
        .unwrap();
        let d = p.default_decision();
        assert_eq!(
            (d.action, d.rule, d.alarm),
            (Action::Drop, p.default_rule, true)
        );
        assert_eq!(
            p.decide(0x4000, true, 0),
            Decision::ALLOW,
            "page 4 has no rules"
        );
        // Even with no rule at all.
        let empty = compile("[profile.t]\nrules = []\n", "t").unwrap();
        assert!(empty.default_rule.is_some() && empty.trapping_pages().is_empty());
        // default = "allow": allowed.
        let open = compile("[profile.t]\ndefault = \"allow\"\nrules = []\n", "t").unwrap();
        assert_eq!(open.default_decision(), Decision::ALLOW);
        // A page listed whole as allowed restricts nothing: mapped; a partial listing
        // traps (the rest is denied).
        let whole = compile(
            "[[profile.t]]\nrange = [0x4000, 0x5000]\naccess = \"both\"\naction = \"allow\"\n",
            "t",
        )
        .unwrap();
        assert!(whole.page_has_rules(4) && !whole.page_traps(4));
        assert!(whole.rule_pages().is_empty());
        let part = compile(
            "[[profile.t]]\nrange = [0x4000, 0x4800]\naccess = \"both\"\naction = \"allow\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(part.trapping_pages(), vec![4]);
        assert_eq!(part.decide(0x4800, false, 0).rule, part.default_rule);
        // The built-in profiles list their free pages: still mapped, allowed.
        for who in ["tenant", "operator"] {
            let b = default_policy().compile(who, "<builtin>").unwrap();
            for page in 4..PAGES {
                assert!(!b.page_traps(page), "{who} page {page}");
                let d = b.decide((page as u64 * PAGE_SIZE) as u32, true, 0);
                assert_eq!(d.action, Action::Allow, "{who} page {page}");
                assert!(d.rule.is_some(), "{who} page {page} is listed");
            }
        }
    }

    #[test]
    fn enforce_off_per_profile_maps_rule_pages_through() {
        let text = "enforce = true\n[profile.t]\nenforce = \"off\"\n[[profile.t.rules]]\nregister = \"HANG_TRIGGER\"\naccess = \"write\"\naction = \"drop\"\nalarm = true\n";
        let p = compile(text, "t").unwrap();
        assert!(!p.enforce);
        assert_eq!(p.trapping_pages(), Vec::<usize>::new());
        assert_eq!(p.rule_pages(), vec![0]);
        let on = compile(&text.replace("\"off\"", "\"on\""), "t").unwrap();
        assert_eq!(on.trapping_pages(), vec![0]);
        assert_eq!(on.widened_by(&p).as_deref(), Some("enforcement turned off"));
        let mut f = default_policy();
        f.enforce = false;
        assert!(f
            .compile("tenant", "x")
            .unwrap()
            .trapping_pages()
            .is_empty());
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
