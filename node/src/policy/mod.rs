//! ACL policies: Vault's policy language (HCL or JSON), the `default` and `root` policies, and
//! the evaluation of a token's policies against a request path.
//!
//! - [`parse`]: policy text -> [`Policy`] (`path "<glob>" { capabilities = [...] }`, the legacy
//!   `policy = "read"` shorthand, `*` suffix globs, `+` segment wildcards, and the
//!   `allowed_parameters` / `denied_parameters` / `required_parameters` constraints).
//! - [`Acl`]: the union of a token's policies; [`Acl::capabilities`] picks, among the matching
//!   rules, the most specific one by Vault's precedence (see [`priority_cmp`]);
//!   [`Acl::allows_request`] also applies that rule's parameter constraints to a write.
//! - [`store::PolicyStore`]: policies kept through the barrier at `sys/policy/<name>`.

pub(crate) mod store;

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde_json::{Map, Value};
use thiserror::Error;

/// One capability, as a bit (Vault's `logical` capability bits, same names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Capability {
    Deny,
    Create,
    Read,
    Update,
    Delete,
    List,
    Sudo,
    Patch,
}

impl Capability {
    pub fn parse(s: &str) -> Option<Capability> {
        Some(match s {
            "deny" => Capability::Deny,
            "create" => Capability::Create,
            "read" => Capability::Read,
            "update" => Capability::Update,
            "delete" => Capability::Delete,
            "list" => Capability::List,
            "sudo" => Capability::Sudo,
            "patch" => Capability::Patch,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Deny => "deny",
            Capability::Create => "create",
            Capability::Read => "read",
            Capability::Update => "update",
            Capability::Delete => "delete",
            Capability::List => "list",
            Capability::Sudo => "sudo",
            Capability::Patch => "patch",
        }
    }
    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// A set of capabilities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caps(u16);

impl Caps {
    pub fn has(self, c: Capability) -> bool {
        self.0 & c.bit() != 0
    }
    pub fn insert(&mut self, c: Capability) {
        self.0 |= c.bit();
    }
    pub fn union(self, o: Caps) -> Caps {
        Caps(self.0 | o.0)
    }
    pub fn is_denied(self) -> bool {
        self.has(Capability::Deny)
    }
    /// Vault's `capabilities` answer: sorted names, `["deny"]` when nothing is allowed.
    pub fn names(self) -> Vec<String> {
        const ALL: [Capability; 7] = [
            Capability::Create,
            Capability::Delete,
            Capability::List,
            Capability::Patch,
            Capability::Read,
            Capability::Sudo,
            Capability::Update,
        ];
        if self.is_denied() {
            return vec!["deny".into()];
        }
        let v: Vec<String> = ALL
            .iter()
            .filter(|c| self.has(**c))
            .map(|c| c.as_str().to_string())
            .collect();
        if v.is_empty() {
            vec!["deny".into()]
        } else {
            v
        }
    }
}

/// A request's operation, as ACLs see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Create,
    Read,
    Update,
    Patch,
    Delete,
    List,
}

impl Operation {
    pub fn capability(self) -> Capability {
        match self {
            Operation::Create => Capability::Create,
            Operation::Read => Capability::Read,
            Operation::Update => Capability::Update,
            Operation::Patch => Capability::Patch,
            Operation::Delete => Capability::Delete,
            Operation::List => Capability::List,
        }
    }
    /// The name in audit records (Vault's `logical.Operation`).
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Read => "read",
            Operation::Update => "update",
            Operation::Patch => "patch",
            Operation::Delete => "delete",
            Operation::List => "list",
        }
    }
}

/// A policy that failed to parse; the text is Vault's `failed to parse policy: ...`.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("failed to parse policy: {0}")]
pub(crate) struct PolicyParseError(pub String);

/// Vault's request-parameter constraints of a `path` stanza (`allowed_parameters`,
/// `denied_parameters`, `required_parameters`). Checked against the top-level keys of a
/// request's JSON body; a key's empty list means "any value", `*` stands for every key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParamRules {
    pub allowed: Option<BTreeMap<String, Vec<Value>>>,
    pub denied: Option<BTreeMap<String, Vec<Value>>>,
    pub required: Vec<String>,
}

impl ParamRules {
    pub fn is_empty(&self) -> bool {
        self.allowed.is_none() && self.denied.is_none() && self.required.is_empty()
    }

    /// Merges another policy's constraints for the same pattern (Vault's `acl.go`: maps are
    /// unioned; an empty list for a key, meaning any value, wins).
    fn merge(&mut self, o: &ParamRules) {
        fn merge_map(into: &mut Option<BTreeMap<String, Vec<Value>>>, from: &Option<BTreeMap<String, Vec<Value>>>) {
            let Some(from) = from else { return };
            let Some(into) = into else {
                *into = Some(from.clone());
                return;
            };
            for (k, v) in from {
                match into.get_mut(k) {
                    Some(existing) if existing.is_empty() || v.is_empty() => existing.clear(),
                    Some(existing) => existing.extend(v.iter().cloned()),
                    None => {
                        into.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        merge_map(&mut self.allowed, &o.allowed);
        merge_map(&mut self.denied, &o.denied);
        for r in &o.required {
            if !self.required.contains(r) {
                self.required.push(r.clone());
            }
        }
    }

    /// Does a request with these top-level parameters pass (Vault's `AllowOperation`)?
    pub fn permits(&self, params: &Map<String, Value>) -> bool {
        if self.is_empty() {
            return true;
        }
        if self.required.iter().any(|r| !params.contains_key(r)) {
            return false;
        }
        if let Some(denied) = &self.denied {
            if denied.get("*").is_some_and(|v| v.is_empty()) && !params.is_empty() {
                return false;
            }
            for (k, v) in params {
                if let Some(list) = denied.get(k).or_else(|| denied.get("*")) {
                    if list.is_empty() || value_in_list(v, list) {
                        return false;
                    }
                }
            }
        }
        if let Some(allowed) = &self.allowed {
            for (k, v) in params {
                match allowed.get(k).or_else(|| allowed.get("*")) {
                    None => return false,
                    Some(list) if !list.is_empty() && !value_in_list(v, list) => return false,
                    Some(_) => {}
                }
            }
        }
        true
    }
}

/// Is `v` (or, for a list, every element of it) one of `list`? Strings match globs with a
/// leading and/or trailing `*` (Vault's `GlobbedStringsMatch`).
fn value_in_list(v: &Value, list: &[Value]) -> bool {
    let one = |x: &Value| {
        list.iter().any(|l| match (l, x) {
            (Value::String(pat), Value::String(s)) => glob_str(pat, s),
            (l, x) => l == x,
        })
    };
    match v {
        Value::Array(items) => items.iter().all(one),
        other => one(other),
    }
}

fn glob_str(pat: &str, s: &str) -> bool {
    let (starts, ends) = (pat.starts_with('*'), pat.ends_with('*') && pat.len() > 1);
    let core = pat.trim_start_matches('*').trim_end_matches('*');
    match (starts, ends) {
        (true, true) => s.contains(core),
        (true, false) => s.ends_with(core),
        (false, true) => s.starts_with(core),
        (false, false) => pat == s,
    }
}

/// One `path` stanza.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathRule {
    /// The pattern as written (`secret/data/app/*`, `secret/+/x`).
    pub pattern: String,
    pub caps: Caps,
    pub params: ParamRules,
}

/// A parsed policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub rules: Vec<PathRule>,
}

/// Stanza keys vha does not implement. Refused rather than ignored: silently dropping a
/// wrapping or MFA requirement would grant more than the policy's author intended.
const UNSUPPORTED_KEYS: &[&str] = &["min_wrapping_ttl", "max_wrapping_ttl", "control_group", "mfa_methods"];

/// Maps the legacy `policy = "..."` shorthand to capabilities (Vault's `parsePaths`).
fn legacy_caps(p: &str) -> Option<&'static [Capability]> {
    use Capability::*;
    Some(match p {
        "deny" => &[Deny],
        "read" => &[Read, List],
        "write" => &[Read, List, Create, Update, Delete, Patch],
        "sudo" => &[Read, List, Create, Update, Delete, Patch, Sudo],
        _ => return None,
    })
}

fn validate_pattern(p: &str) -> Result<String, PolicyParseError> {
    let p = p.trim_start_matches('/');
    if let Some(i) = p.find('*') {
        if i != p.len() - 1 {
            return Err(PolicyParseError(format!(
                "path {p:?}: invalid use of wildcards ('*' is only allowed at the end of a path)"
            )));
        }
    }
    Ok(p.to_string())
}

fn param_map(pattern: &str, key: &str, v: &Value) -> Result<BTreeMap<String, Vec<Value>>, PolicyParseError> {
    // HCL's `allowed_parameters { ... }` block form may arrive as a one-element list.
    let v = match v {
        Value::Array(a) if a.len() == 1 && a[0].is_object() => &a[0],
        other => other,
    };
    let obj = v
        .as_object()
        .ok_or_else(|| PolicyParseError(format!("path {pattern:?}: {key} must be a map of lists")))?;
    let mut out = BTreeMap::new();
    for (k, vals) in obj {
        let list = match vals {
            Value::Array(a) => a.clone(),
            Value::Null => Vec::new(),
            other => vec![other.clone()],
        };
        out.insert(k.clone(), list);
    }
    Ok(out)
}

/// Interprets one stanza's body (already JSON-shaped, whatever the source format).
fn stanza(pattern: &str, body: &Value) -> Result<PathRule, PolicyParseError> {
    let pattern = validate_pattern(pattern)?;
    let body = body
        .as_object()
        .ok_or_else(|| PolicyParseError(format!("path {pattern:?}: must be an object")))?;
    let mut caps = Caps::default();
    let mut params = ParamRules::default();
    for (k, v) in body {
        match k.as_str() {
            "capabilities" => {
                let names = v.as_array().filter(|a| a.iter().all(Value::is_string)).ok_or_else(|| {
                    PolicyParseError(format!("path {pattern:?}: capabilities must be a list of strings"))
                })?;
                for n in names.iter().filter_map(Value::as_str) {
                    let c = Capability::parse(n).ok_or_else(|| {
                        PolicyParseError(format!("path {pattern:?}: path {pattern:?}: invalid capability {n:?}"))
                    })?;
                    caps.insert(c);
                }
            }
            "policy" => {
                let p = v
                    .as_str()
                    .ok_or_else(|| PolicyParseError(format!("path {pattern:?}: policy must be a string")))?;
                let l = legacy_caps(p)
                    .ok_or_else(|| PolicyParseError(format!("path {pattern:?}: invalid policy {p:?}")))?;
                for c in l {
                    caps.insert(*c);
                }
            }
            "allowed_parameters" => params.allowed = Some(param_map(&pattern, k, v)?),
            "denied_parameters" => params.denied = Some(param_map(&pattern, k, v)?),
            "required_parameters" => {
                params.required = v
                    .as_array()
                    .filter(|a| a.iter().all(Value::is_string))
                    .ok_or_else(|| {
                        PolicyParseError(format!(
                            "path {pattern:?}: required_parameters must be a list of strings"
                        ))
                    })?
                    .iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect();
            }
            k if UNSUPPORTED_KEYS.contains(&k) => {
                return Err(PolicyParseError(format!(
                    "path {pattern:?}: {k:?} is not supported by vha"
                )))
            }
            k => return Err(PolicyParseError(format!("path {pattern:?}: invalid key {k:?}"))),
        }
    }
    Ok(PathRule { pattern, caps, params })
}

/// Parses a policy: HCL, or JSON when the text starts with `{`. Both become the same
/// JSON shape (`{"path": {"<glob>": {...}}}`) before interpretation.
pub(crate) fn parse(name: &str, text: &str) -> Result<Policy, PolicyParseError> {
    let doc: Value = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| PolicyParseError(e.to_string()))?
    } else {
        let body = hcl::parse(text).map_err(|e| PolicyParseError(e.to_string()))?;
        let mut paths: Vec<(String, Value)> = Vec::new();
        for s in body.into_iter() {
            match s {
                hcl::Structure::Block(b) if b.identifier() == "path" => {
                    let [label] = b.labels() else {
                        return Err(PolicyParseError("path stanza needs exactly one label".into()));
                    };
                    let mut obj = Map::new();
                    for inner in b.body().iter() {
                        let (k, v) = match inner {
                            hcl::Structure::Attribute(a) => (
                                a.key().to_string(),
                                serde_json::to_value(hcl::Value::from(a.expr().clone()))
                                    .map_err(|e| PolicyParseError(e.to_string()))?,
                            ),
                            // `allowed_parameters { "a" = [] }`: the block form of a map.
                            hcl::Structure::Block(ib) => (
                                ib.identifier().to_string(),
                                hcl::from_body::<Value>(ib.body().clone())
                                    .map_err(|e| PolicyParseError(e.to_string()))?,
                            ),
                        };
                        obj.insert(k, v);
                    }
                    paths.push((label.as_str().to_string(), Value::Object(obj)));
                }
                hcl::Structure::Block(b) => {
                    return Err(PolicyParseError(format!("invalid key {:?}", b.identifier())));
                }
                hcl::Structure::Attribute(a) => {
                    // Vault tolerates a top-level `name = "..."`; anything else is an error.
                    if a.key() != "name" {
                        return Err(PolicyParseError(format!("invalid key {:?}", a.key())));
                    }
                }
            }
        }
        let mut rules = Vec::new();
        for (pattern, body) in paths {
            rules.push(stanza(&pattern, &body)?);
        }
        return Ok(Policy {
            name: name.to_string(),
            rules,
        });
    };
    let obj = doc
        .as_object()
        .ok_or_else(|| PolicyParseError("policy must be an object".into()))?;
    let mut rules = Vec::new();
    for (k, v) in obj {
        match k.as_str() {
            "name" => {}
            "path" => {
                let paths = v
                    .as_object()
                    .ok_or_else(|| PolicyParseError("path must be an object".into()))?;
                for (pattern, body) in paths {
                    rules.push(stanza(pattern, body)?);
                }
            }
            other => return Err(PolicyParseError(format!("invalid key {other:?}"))),
        }
    }
    Ok(Policy {
        name: name.to_string(),
        rules,
    })
}

/// Does `pattern` match `path`? `*` (only last) matches any suffix; `+` matches exactly one
/// segment (any characters but `/`).
pub(crate) fn glob_match(pattern: &str, path: &str) -> bool {
    let (pat, prefix) = match pattern.strip_suffix('*') {
        Some(p) => (p, true),
        None => (pattern, false),
    };
    if !pat.contains('+') {
        return if prefix { path.starts_with(pat) } else { path == pat };
    }
    // Segment-wise: each pattern segment is literal or `+`. With a trailing `*`, the last
    // pattern segment is a prefix of the corresponding path segment and the rest is free.
    let psegs: Vec<&str> = pat.split('/').collect();
    let mut rest = path;
    for (i, seg) in psegs.iter().enumerate() {
        let last = i == psegs.len() - 1;
        let (cur, tail) = match rest.find('/') {
            Some(j) => (&rest[..j], Some(&rest[j + 1..])),
            None => (rest, None),
        };
        if last {
            let seg_ok = if *seg == "+" {
                // `+` then `*`: the segment may be anything, and may continue.
                prefix || tail.is_none()
            } else if prefix {
                cur.starts_with(seg)
            } else {
                cur == *seg && tail.is_none()
            };
            return seg_ok;
        }
        if *seg != "+" && cur != *seg {
            return false;
        }
        match tail {
            Some(t) => rest = t,
            None => return false,
        }
    }
    false
}

/// Vault's precedence between two matching patterns (`Greater` = `a` wins):
/// 1. the first wildcard (`+` or `*`) occurring later wins;
/// 2. not ending in `*` wins over ending in `*`;
/// 3. fewer `+` segments wins;
/// 4. longer wins;
/// 5. lexicographically greater wins.
pub(crate) fn priority_cmp(a: &str, b: &str) -> Ordering {
    let first_wild = |p: &str| p.find(['+', '*']).unwrap_or(p.len());
    first_wild(a)
        .cmp(&first_wild(b))
        .then_with(|| b.ends_with('*').cmp(&a.ends_with('*')))
        .then_with(|| b.matches('+').count().cmp(&a.matches('+').count()))
        .then_with(|| a.len().cmp(&b.len()))
        .then_with(|| a.cmp(b))
}

/// The compiled union of a token's policies.
#[derive(Clone, Debug, Default)]
pub struct Acl {
    root: bool,
    /// Pattern -> capabilities and parameter constraints merged across policies (deny
    /// wins, see [`Acl::capabilities`]).
    rules: BTreeMap<String, (Caps, ParamRules)>,
}

impl Acl {
    /// The ACL of `policies`; `root` grants everything.
    pub fn new<'a>(policies: impl IntoIterator<Item = &'a Policy>, root: bool) -> Acl {
        let mut rules: BTreeMap<String, (Caps, ParamRules)> = BTreeMap::new();
        for p in policies {
            for r in &p.rules {
                let e = rules.entry(r.pattern.clone()).or_default();
                e.0 = e.0.union(r.caps);
                e.1.merge(&r.params);
            }
        }
        Acl { root, rules }
    }

    pub fn is_root(&self) -> bool {
        self.root
    }

    /// The highest-priority rule matching `path` (LIST also tries the path without its
    /// trailing slash when nothing matches it, as Vault).
    fn rule(&self, path: &str, op: Operation) -> Option<&(Caps, ParamRules)> {
        let find = |p: &str| {
            self.rules
                .iter()
                .filter(|(pat, _)| glob_match(pat, p))
                .max_by(|(a, _), (b, _)| priority_cmp(a, b))
        };
        let best = find(path);
        match best {
            None if op == Operation::List && path.ends_with('/') => find(path.trim_end_matches('/')),
            other => other,
        }
        .map(|(_, r)| r)
    }

    /// The capabilities on `path`: those of the highest-priority matching rule (empty when
    /// none matches).
    pub fn capabilities(&self, path: &str) -> Caps {
        if self.root {
            let mut c = Caps::default();
            for x in [
                Capability::Create,
                Capability::Read,
                Capability::Update,
                Capability::Delete,
                Capability::List,
                Capability::Sudo,
                Capability::Patch,
            ] {
                c.insert(x);
            }
            return c;
        }
        self.rule(path, Operation::Read).map(|r| r.0).unwrap_or_default()
    }

    /// Does any rule grant something at or below `prefix` (a mount path)? Used to decide
    /// whether a token may learn about a mount (`sys/internal/ui/mounts`).
    pub fn has_any_under(&self, prefix: &str) -> bool {
        self.root
            || self.rules.iter().any(|(p, (caps, _))| {
                !caps.is_denied() && *caps != Caps::default() && (p.starts_with(prefix) || glob_match(p, prefix))
            })
    }

    /// Is `op` on `path` allowed (plus sudo when `sudo`)? Ignores parameter constraints;
    /// see [`Acl::allows_request`].
    pub fn allows(&self, path: &str, op: Operation, sudo: bool) -> bool {
        self.allows_request(path, op, sudo, None)
    }

    /// [`Acl::allows`], plus the matched rule's parameter constraints checked against the
    /// request's top-level `params` (for writes; `None` skips them).
    pub fn allows_request(&self, path: &str, op: Operation, sudo: bool, params: Option<&Map<String, Value>>) -> bool {
        if self.root {
            return true;
        }
        let Some((caps, rules)) = self.rule(path, op) else {
            return false;
        };
        let caps_ok = !caps.is_denied() && caps.has(op.capability()) && (!sudo || caps.has(Capability::Sudo));
        caps_ok && params.is_none_or(|p| rules.permits(p))
    }
}

/// The text of the `default` policy created at init (Vault's, minus the endpoints vha does
/// not serve, so a token's `capabilities-self` answers stay truthful).
pub(crate) const DEFAULT_POLICY: &str = r#"
# Allow tokens to look up their own properties
path "auth/token/lookup-self" {
    capabilities = ["read"]
}

# Allow tokens to renew themselves
path "auth/token/renew-self" {
    capabilities = ["update"]
}

# Allow tokens to revoke themselves
path "auth/token/revoke-self" {
    capabilities = ["update"]
}

# Allow a token to look up its own capabilities on a path
path "sys/capabilities-self" {
    capabilities = ["update"]
}
"#;

#[cfg(test)]
mod tests;
