//! Policy parsing, glob matching (property-tested) and ACL precedence.

use proptest::prelude::*;

use super::*;

/// A policy in Vault's HCL parses into its path rules; bad capabilities, misplaced `*` and
/// unsupported keys are refused with Vault's message prefix.
#[test]
fn parses_hcl_and_rejects_bad_input() {
    let p = parse(
        "p",
        r#"
path "secret/data/app/*" { capabilities = ["read", "list"] }
path "secret/+/x" {
  capabilities = ["create", "update"]
}
path "legacy/*" { policy = "write" }
"#,
    )
    .unwrap();
    assert_eq!(p.rules.len(), 3);
    assert!(p.rules[0].caps.has(Capability::Read) && p.rules[0].caps.has(Capability::List));
    assert!(!p.rules[0].caps.has(Capability::Update));
    assert!(p.rules[2].caps.has(Capability::Delete));
    let e = parse("p", r#"path "x" { capabilities = ["foo"] }"#).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"failed to parse policy: path "x": path "x": invalid capability "foo""#
    );
    assert!(parse("p", r#"path "a/*/b" { capabilities = ["read"] }"#).is_err());
    assert!(parse("p", "garbage {{").is_err());
    assert!(parse(
        "p",
        "path \"x\" {\n capabilities = [\"read\"]\n min_wrapping_ttl = \"1h\"\n}"
    )
    .is_err());
    assert!(parse("p", "path \"x\" {\n capabilities = [\"read\"]\n bogus = 1\n}").is_err());
    let j = parse("p", r#"{"path": {"kv/*": {"capabilities": ["read"]}}}"#).unwrap();
    assert_eq!(j.rules[0].pattern, "kv/*");
    parse("default", DEFAULT_POLICY).unwrap();
}

fn params(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    v.as_object().cloned().unwrap_or_default()
}

/// Parameter constraints (attribute and block forms): denied keys and values refuse,
/// allowed lists restrict keys and values (globs on strings), required keys must be present;
/// reads ignore them.
#[test]
fn parameter_constraints() {
    let p = parse(
        "p",
        r#"
path "kv/cfg" {
  capabilities = ["create", "update", "read"]
  allowed_parameters = {
    "env" = ["dev", "stage-*"]
    "owner" = []
  }
  denied_parameters {
    owner = ["root"]
  }
  required_parameters = ["env"]
}
"#,
    )
    .unwrap();
    let acl = Acl::new([&p], false);
    let ok = |v: serde_json::Value| acl.allows_request("kv/cfg", Operation::Update, false, Some(&params(v)));
    assert!(ok(serde_json::json!({"env": "dev"})));
    assert!(ok(serde_json::json!({"env": "stage-2", "owner": "bob"})));
    assert!(!ok(serde_json::json!({"env": "prod"})), "value not allowed");
    assert!(!ok(serde_json::json!({"env": "dev", "other": 1})), "key not allowed");
    assert!(!ok(serde_json::json!({"env": "dev", "owner": "root"})), "denied value");
    assert!(!ok(serde_json::json!({"owner": "bob"})), "required key missing");
    assert!(acl.allows_request("kv/cfg", Operation::Read, false, None));
    let j = parse(
        "j",
        r#"{"path": {"kv/*": {"capabilities": ["update"], "denied_parameters": {"*": []}}}}"#,
    )
    .unwrap();
    let acl = Acl::new([&j], false);
    assert!(!acl.allows_request(
        "kv/x",
        Operation::Update,
        false,
        Some(&params(serde_json::json!({"a": 1})))
    ));
    assert!(acl.allows_request("kv/x", Operation::Update, false, Some(&params(serde_json::json!({})))));
}

/// `*` is a prefix match, `+` exactly one segment.
#[test]
fn glob_examples() {
    assert!(glob_match("secret/data/app/*", "secret/data/app/x"));
    assert!(glob_match("secret/data/app/*", "secret/data/app/x/y"));
    assert!(glob_match("secret/data/app*", "secret/data/apple"));
    assert!(!glob_match("secret/data/app/*", "secret/data/other"));
    assert!(glob_match("secret/+/x", "secret/data/x"));
    assert!(!glob_match("secret/+/x", "secret/data/y/x"));
    assert!(!glob_match("secret/+/x", "secret/x"));
    assert!(glob_match("secret/+/x/*", "secret/a/x/b/c"));
    assert!(glob_match("a/+", "a/b"));
    assert!(!glob_match("a/+", "a/b/c"));
    assert!(glob_match("a/+*", "a/b/c"));
}

/// The most specific rule wins (exact over glob, later wildcard over earlier), and `deny`
/// takes everything away; root allows all; LIST on `x/` also matches a rule for `x`.
#[test]
fn acl_precedence_and_deny() {
    let p = parse(
        "p",
        r#"
path "secret/*" { capabilities = ["read"] }
path "secret/data/app/*" { capabilities = ["read", "create", "update"] }
path "secret/data/app/locked" { capabilities = ["deny"] }
path "secret/+/team" { capabilities = ["list"] }
path "kv/metadata" { capabilities = ["list"] }
"#,
    )
    .unwrap();
    let acl = Acl::new([&p], false);
    assert!(acl.allows("secret/data/app/x", Operation::Update, false));
    assert!(!acl.allows("secret/data/app/x", Operation::Delete, false));
    assert!(!acl.allows("secret/data/app/locked", Operation::Read, false));
    assert!(acl.allows("secret/other", Operation::Read, false));
    assert!(!acl.allows("secret/other", Operation::Update, false));
    assert!(acl.allows("secret/x/team", Operation::List, false));
    assert!(!acl.allows("secret/data/app/x", Operation::Read, true), "no sudo");
    assert!(acl.allows("kv/metadata/", Operation::List, false));
    assert!(!acl.allows("sys/mounts", Operation::Read, false));
    assert!(Acl::new([], true).allows("sys/seal", Operation::Update, true));
    assert_eq!(acl.capabilities("secret/data/app/locked").names(), vec!["deny"]);
    assert_eq!(
        acl.capabilities("secret/data/app/x").names(),
        vec!["create", "read", "update"]
    );
}

/// The same pattern in two policies merges capabilities.
#[test]
fn policies_merge_on_same_pattern() {
    let a = parse("a", r#"path "kv/*" { capabilities = ["read"] }"#).unwrap();
    let b = parse("b", r#"path "kv/*" { capabilities = ["update"] }"#).unwrap();
    let acl = Acl::new([&a, &b], false);
    assert!(acl.allows("kv/x", Operation::Read, false) && acl.allows("kv/x", Operation::Update, false));
}

fn seg() -> impl Strategy<Value = String> {
    "[a-z0-9_-]{1,6}"
}

proptest! {
    /// A literal pattern matches exactly itself; its `*` form matches every extension; its
    /// `+` form (one segment replaced) matches the path and never one with a different
    /// number of segments.
    #[test]
    fn glob_properties(segs in proptest::collection::vec(seg(), 1..6), extra in seg(), idx in 0usize..6) {
        let path = segs.join("/");
        let longer = format!("{path}/{extra}");
        let glued = format!("{path}{extra}");
        let star = format!("{path}*");
        let slash_star = format!("{path}/*");
        prop_assert!(glob_match(&path, &path));
        prop_assert!(!glob_match(&path, &longer));
        prop_assert!(glob_match(&star, &glued));
        prop_assert!(glob_match(&slash_star, &longer));
        let i = idx % segs.len();
        let mut p = segs.clone();
        p[i] = "+".into();
        let plus = p.join("/");
        prop_assert!(glob_match(&plus, &path));
        prop_assert!(!glob_match(&plus, &longer));
        if segs.len() > 1 {
            prop_assert!(!glob_match(&plus, &segs[..segs.len() - 1].join("/")));
        }
    }

    /// Precedence is a total order consistent with equality, and a literal path always beats
    /// any glob that matches it.
    #[test]
    fn priority_is_consistent(a in "[a-z+/]{1,10}\\*?", b in "[a-z+/]{1,10}\\*?") {
        prop_assert_eq!(priority_cmp(&a, &b), priority_cmp(&b, &a).reverse());
        prop_assert_eq!(priority_cmp(&a, &a), std::cmp::Ordering::Equal);
        let lit = a.replace(['+', '*'], "x");
        if glob_match(&a, &lit) && a != lit {
            prop_assert_eq!(priority_cmp(&lit, &a), std::cmp::Ordering::Greater);
        }
    }
}
