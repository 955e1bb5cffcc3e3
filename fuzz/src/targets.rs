//! The fuzz targets: every decoder of untrusted input in vha, each with seeds, a dictionary
//! and the properties it must keep on any input (beyond "does not panic").

use std::path::Path;
use std::sync::OnceLock;

use vha_core::advert::Advertisement;
use vha_core::barrier::Keyring;
use vha_core::cluster_tls::ClusterIdentity;
use vha_core::config::{parse_str, MapEnv};
use vha_core::storage::lockd::protocol as wire;
use vha_proxy::route::{self, ForwardFailure, LocalRole, Route, RouteInput};

use crate::Target;

pub fn all() -> Vec<Target> {
    vec![
        Target {
            name: "hcl_config",
            seeds: hcl_seeds,
            dict: HCL_DICT,
            run: hcl_config,
        },
        Target {
            name: "advertisement",
            seeds: adv_seeds,
            dict: JSON_DICT,
            run: advertisement,
        },
        Target {
            name: "barrier_envelope",
            seeds: envelope_seeds,
            dict: &[],
            run: barrier_envelope,
        },
        Target {
            name: "lockd_protocol",
            seeds: lockd_seeds,
            dict: LOCKD_DICT,
            run: lockd_protocol,
        },
        Target {
            name: "lockd_wal",
            seeds: wal_seeds,
            dict: &[],
            run: lockd_wal,
        },
        Target {
            name: "proxy_route",
            seeds: route_seeds,
            dict: PATH_DICT,
            run: proxy_route,
        },
        Target {
            name: "kv_path",
            seeds: path_seeds,
            dict: PATH_DICT,
            run: kv_path,
        },
    ]
}

fn strs(v: &[&str]) -> Vec<Vec<u8>> {
    v.iter().map(|s| s.as_bytes().to_vec()).collect()
}

// ---- HCL configuration (`vha_core::config::parse_str`) ----

const HCL_DICT: &[&str] = &[
    "storage \"lockd\" {",
    "ha_storage \"etcd\" {",
    "listener \"tcp\" {",
    "}",
    "{",
    "\"",
    "=",
    "\n",
    "address = ",
    "api_addr = ",
    "cluster_addr = ",
    "lock_ttl = \"2s\"",
    "tls_disable = true",
    "max_request_size = -1",
    "${",
    "$${",
    "%{",
    "<<EOF\n",
    "EOF\n",
    "[",
    "]",
    "true",
    "1e999",
    "18446744073709551616",
    "#",
    "//",
    "/*",
    "*/",
    "proxy {",
    "seal \"shamir\" {}",
    "ui = true",
];

fn hcl_seeds() -> Vec<Vec<u8>> {
    strs(&[
        "storage \"lockd\" {\n  address = \"http://127.0.0.1:8201\"\n  lock_ttl = \"2s\"\n}\nlistener \"tcp\" {\n  address = \"127.0.0.1:8200\"\n  tls_disable = true\n}\napi_addr = \"http://127.0.0.1:8200\"\ncluster_addr = \"https://127.0.0.1:8201\"\n",
        "storage \"inmem\" {}\nlistener \"tcp\" { address = \"127.0.0.1:0\" tls_disable = \"true\" max_request_size = 1024 }\n",
        "storage \"file\" { path = \"/tmp/x\" }\nha_storage \"etcd\" { address = \"http://127.0.0.1:2379\" ha_enabled = \"true\" }\ndisable_mlock = true\n",
        "storage \"raft\" {}\nlistener \"unix\" { address = \"/tmp/s\" }\ndefault_lease_ttl = \"768h\"\nmax_lease_ttl = \"1h\"\nui = true\n",
        "step_down_wait = \"2s\"\nlog_level = \"debug\"\ntelemetry { prometheus_retention_time = \"30s\" }\n",
    ])
}

fn hcl_config(input: &[u8]) -> bool {
    // Invalid UTF-8 becomes U+FFFD: the parser still sees the rest (a config file is read
    // as UTF-8 text before parsing).
    let src = String::from_utf8_lossy(input);
    let src = src.as_ref();
    let env = MapEnv::default().with("VAULT_API_ADDR", "http://127.0.0.1:8200");
    // Errors are fine; a panic (or a hang) is not. A parsed config renders its errors with
    // positions, so exercise Display on the error path too.
    match parse_str(src, Path::new("fuzz.hcl"), &env) {
        Ok(_) => true,
        Err(e) => {
            let _ = e.to_string();
            // Past the HCL syntax: a semantic error (positioned) is deep enough.
            !e.to_string().contains("syntax")
        }
    }
}

// ---- Advertisement (JSON -> Advertisement -> ClusterIdentity, as a standby/proxy does) ----

const JSON_DICT: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ":",
    ",",
    "null",
    "true",
    "\"p521\"",
    "\"p256\"",
    "\"redirect_addr\"",
    "\"cluster_addr\"",
    "\"cluster_cert\"",
    "\"cluster_key_params\"",
    "\"type\"",
    "\"x\"",
    "\"y\"",
    "\"d\"",
    "\"AAAA\"",
    "\"====\"",
    "\\u0000",
    "\\ud800",
    "1e999",
    "-0",
];

fn identity() -> &'static ClusterIdentity {
    static ID: OnceLock<ClusterIdentity> = OnceLock::new();
    ID.get_or_init(|| ClusterIdentity::generate("fuzz-uuid").expect("generate identity"))
}

fn valid_adv() -> Advertisement {
    let id = identity();
    Advertisement {
        redirect_addr: "http://127.0.0.1:8200".into(),
        cluster_addr: "https://127.0.0.1:8201".into(),
        cluster_cert: id.cert_der.clone(),
        cluster_key_params: Some(id.params.clone()),
    }
}

fn adv_seeds() -> Vec<Vec<u8>> {
    let mut no_params = valid_adv();
    no_params.cluster_key_params = None;
    vec![
        serde_json::to_vec(&valid_adv()).unwrap(),
        serde_json::to_vec(&no_params).unwrap(),
        b"{\"redirect_addr\":\"\",\"cluster_addr\":\"\",\"cluster_cert\":\"\",\"cluster_key_params\":{\"type\":\"p521\",\"x\":\"\",\"y\":\"\",\"d\":\"\"}}".to_vec(),
    ]
}

fn advertisement(input: &[u8]) -> bool {
    let Ok(adv) = serde_json::from_slice::<Advertisement>(input) else {
        return serde_json::from_slice::<serde_json::Value>(input).is_ok();
    };
    let Ok(id) = ClusterIdentity::from_advertisement("fuzz-uuid", &adv) else {
        return true;
    };
    // Accepted key params must be exactly consistent: the public point matches the scalar.
    let p = adv.cluster_key_params.as_ref().expect("accepted without key params");
    assert_eq!(id.params.x, p.x, "accepted params whose x does not match d");
    assert_eq!(id.params.y, p.y, "accepted params whose y does not match d");
    // Building the TLS configs parses the (arbitrary) certificate: errors only, no panic.
    let _ = id.server_config();
    let _ = id.client_config(&[b"req_fw_sb-act_v1"]);
    true
}

// ---- Barrier envelopes (`Keyring::decrypt` on arbitrary bytes) ----

const ENVELOPE_PATH: &str = "core/leader/fuzz-uuid";

fn keyring() -> &'static Keyring {
    static K: OnceLock<Keyring> = OnceLock::new();
    K.get_or_init(|| Keyring::from_key(1, &[7u8; 32]))
}

/// The envelopes this keyring legitimately produced (only these may ever open).
fn genuine() -> &'static Vec<Vec<u8>> {
    static G: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    G.get_or_init(|| {
        let k = keyring();
        vec![
            k.encrypt(ENVELOPE_PATH, b"{\"redirect_addr\":\"x\"}"),
            k.encrypt(ENVELOPE_PATH, b""),
            k.encrypt(ENVELOPE_PATH, &[0u8; 300]),
        ]
    })
}

fn envelope_seeds() -> Vec<Vec<u8>> {
    let mut s = genuine().clone();
    s.push(vec![1, 0, 0, 0, 2]);
    s.push(Vec::new());
    s
}

fn barrier_envelope(input: &[u8]) -> bool {
    let k = keyring();
    let deep = input.len() > 21 && input[0] == 1;
    match k.decrypt(ENVELOPE_PATH, input) {
        // AEAD: only an envelope the key holder produced opens; any bit changed is refused.
        Ok(_) => assert!(genuine().iter().any(|g| g == input), "a forged envelope opened"),
        Err(e) => {
            let _ = e.to_string();
        }
    }
    // Another path (associated data) never opens it.
    assert!(
        k.decrypt("core/leader/other-uuid", input).is_err(),
        "envelope opened under another path"
    );
    // The serialized keyring decoder on the same bytes.
    let _ = Keyring::from_bytes(input);
    deep
}

// ---- lockd protocol (every request body the server decodes, with serde_json as it does) ----

const LOCKD_DICT: &[&str] = &[
    "{",
    "}",
    "\"key\"",
    "\"value\"",
    "\"fence\"",
    "\"lock\"",
    "\"token\"",
    "\"prefix\"",
    "\"ttl_ms\"",
    "\"wait_ms\"",
    "\"prev_revision\"",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "null",
    "\"\"",
    "\"core/lock\"",
    "\"AAAA\"",
    "\"=\"",
    ",",
    ":",
];

fn lockd_seeds() -> Vec<Vec<u8>> {
    strs(&[
        "{\"key\":\"core/lock\"}",
        "{\"key\":\"a/b\",\"value\":\"aGVsbG8=\",\"fence\":{\"lock\":\"core/lock\",\"token\":7}}",
        "{\"key\":\"a/b\",\"value\":\"aGVsbG8=\",\"prev_revision\":3}",
        "{\"key\":\"a/b\",\"fence\":{\"lock\":\"core/lock\",\"token\":7}}",
        "{\"prefix\":\"core/\"}",
        "{\"key\":\"core/lock\",\"value\":\"uuid\",\"ttl_ms\":2000,\"wait_ms\":1000}",
        "{\"key\":\"core/lock\",\"token\":7}",
        "{\"lock\":\"core/lock\"}",
        "{\"type\":\"put\",\"key\":\"x\"}",
        "{\"errors\":[\"fenced\"],\"code\":\"fenced\",\"token\":3}",
    ])
}

fn roundtrip<T>(input: &[u8]) -> bool
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = serde_json::from_slice::<T>(input) {
        // Whatever decodes re-encodes and decodes to the same value.
        let again: T = serde_json::from_slice(&serde_json::to_vec(&v).expect("encode")).expect("re-decode");
        assert_eq!(again, v, "wire type does not round-trip");
        return true;
    }
    false
}

fn lockd_protocol(input: &[u8]) -> bool {
    let results = [
        roundtrip::<wire::KeyRequest>(input),
        roundtrip::<wire::PutRequest>(input),
        roundtrip::<wire::DeleteRequest>(input),
        roundtrip::<wire::ListRequest>(input),
        roundtrip::<wire::AcquireRequest>(input),
        roundtrip::<wire::CancelRequest>(input),
        roundtrip::<wire::LeaseRequest>(input),
        roundtrip::<wire::WatchRequest>(input),
        // What the client decodes from the server (a hostile or corrupted lockd).
        roundtrip::<wire::GetResponse>(input),
        roundtrip::<wire::AcquireResponse>(input),
        roundtrip::<wire::HolderResponse>(input),
        roundtrip::<wire::WireEvent>(input),
        roundtrip::<wire::ErrorBody>(input),
    ];
    results.iter().any(|r| *r) || serde_json::from_slice::<serde_json::Value>(input).is_ok()
}

// ---- lockd write-ahead log records (`vha_lockd::log::decode_payload`) ----

fn wal_seeds() -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    for tag in 0u8..8 {
        let mut s = 1u64.to_le_bytes().to_vec();
        s.push(tag);
        s.extend_from_slice(&3u32.to_le_bytes());
        s.extend_from_slice(b"a/b");
        s.extend_from_slice(&[0u8; 24]);
        v.push(s);
    }
    v
}

fn lockd_wal(input: &[u8]) -> bool {
    vha_lockd::log::decode_payload(input).is_ok() || input.len() > 9
}

// ---- The proxy's route decision (`vha_proxy::route`, pure) ----

const PATH_DICT: &[&str] = &[
    "/v1/",
    "sys/",
    "secret/",
    "data/",
    "..",
    ".",
    "/",
    "//",
    "%2e%2e",
    "%2F",
    "%00",
    "%ff",
    "?",
    "#",
    "health",
    "seal-status",
    "leader",
    "metrics",
    "unseal",
    "init",
    "step-down",
    "\u{0}",
    "\u{202e}",
];

fn route_seeds() -> Vec<Vec<u8>> {
    strs(&[
        "\x00\x00/v1/secret/data/app?version=2",
        "\x01\x02/v1/sys/health",
        "\x02\x01/v1/sys/leader",
        "\x03\x00/v1/sys/seal-status",
        "\x04\x03/ui/",
        "\x05\x04/v1/sys/step-down",
    ])
}

fn proxy_route(input: &[u8]) -> bool {
    if input.len() < 2 {
        return false;
    }
    let (flags, choice, rest) = (input[0], input[1], &input[2..]);
    // Pingora hands the proxy the request target as text; invalid bytes become U+FFFD.
    let pq = String::from_utf8_lossy(rest);
    let pq = pq.as_ref();
    let path = pq.split('?').next().unwrap_or("");
    let local = match choice % 5 {
        0 => LocalRole::Down,
        1 => LocalRole::Sealed,
        2 => LocalRole::Standby,
        3 => LocalRole::Active,
        _ => LocalRole::Disabled,
    };
    let no_forward: Option<&[u8]> = match flags & 3 {
        0 => None,
        1 => Some(b""),
        2 => Some(b"true"),
        _ => Some(rest),
    };
    let active = (flags & 4 != 0).then_some("http://127.0.0.1:8200/");
    let i = RouteInput {
        path,
        path_and_query: pq,
        no_forward,
        local,
        disable_clustering: flags & 8 != 0,
        active_redirect: active,
    };
    let r = route::route(&i);
    // Properties of the decision:
    match &r {
        Route::Redirect(loc) => {
            // Only with a known active, and the Location keeps path and query byte for byte.
            assert!(active.is_some(), "redirect with no active known");
            assert_eq!(
                loc,
                &format!("http://127.0.0.1:8200{pq}"),
                "Location does not keep path and query"
            );
            assert!(!matches!(
                local,
                LocalRole::Active | LocalRole::Disabled | LocalRole::Sealed
            ));
        }
        Route::Forward => {
            assert!(active.is_some(), "forward with no active known");
            assert!(!route::is_local_only(path), "forwarded a local-only path");
        }
        Route::Hold => assert!(active.is_none(), "held although an active is known"),
        Route::Sealed => assert_eq!(local, LocalRole::Sealed),
        Route::Local => {}
    }
    // A local-only path is always answered locally, whatever the state.
    if route::is_local_only(path) {
        assert_eq!(r, Route::Local, "local-only path not served locally");
    }
    let _ = route::api_path(path);
    if let Some(a) = active {
        for f in [
            ForwardFailure::Tls,
            ForwardFailure::Unreachable,
            ForwardFailure::NotActive,
        ] {
            let _ = route::after_failure(f, a, pq);
        }
        let seen = Some(route::ActiveSeen { seq: 1, redirect_addr: a });
        let failed = route::Attempt::Forward { seq: 1, refused: false };
        assert!(matches!(
            route::at_bound(failed, seen, pq),
            route::Step::Answer(route::Answer::Redirect { .. })
        ));
    }
    // The hold bound always ends the wait.
    for attempt in [route::Attempt::First, route::Attempt::Local { unreachable: true }] {
        assert!(!matches!(route::at_bound(attempt, None, pq), route::Step::Wait));
    }
    true
}

// ---- KV / mount path parsing (`vha_node::mounts::normalize_path`) ----

fn path_seeds() -> Vec<Vec<u8>> {
    strs(&[
        "secret",
        "/secret/",
        "kv/v2/app",
        "a/../b",
        "./x",
        "a//b",
        "",
        "/",
        "x\u{7f}",
        "é/ü",
    ])
}

fn kv_path(input: &[u8]) -> bool {
    let p = String::from_utf8_lossy(input);
    let p = p.as_ref();
    if let Ok(n) = vha_node::mounts::normalize_path(p) {
        // Exactly one trailing slash, no leading slash, no empty/dot segments, no controls.
        assert!(n.ends_with('/') && !n.ends_with("//"), "bad trailing slash: {n:?}");
        assert!(!n.starts_with('/'), "leading slash: {n:?}");
        let body = &n[..n.len() - 1];
        assert!(
            body.split('/').all(|s| !s.is_empty() && s != "." && s != ".."),
            "dot or empty segment survived: {n:?}"
        );
        assert!(!n.chars().any(|c| c.is_control()), "control character survived: {n:?}");
        // Idempotent.
        assert_eq!(
            vha_node::mounts::normalize_path(&n).ok().as_deref(),
            Some(n.as_str()),
            "not idempotent"
        );
        return true;
    }
    false
}
