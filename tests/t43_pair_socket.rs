//! The pair socket between a node and its proxy, attacked from the same host by processes
//! of other users (real `vha server` / `vha proxy` processes; the attackers are `python3`
//! children that drop to another uid).
//!
//! These tests need root: they switch the children's uid (`CommandExt::uid`) and chown
//! nothing else. CI runs them as root; run as another user they fail at once with a message
//! saying so (they never skip).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use vha_testkit::prometheus::series_value;
use vha_testkit::{wait_until, wait_until_async, ChildProc, TestNode, TestProxy};

/// The unprivileged user the attacking children run as (`nobody` on Debian).
const OTHER_UID: u32 = 65534;
/// A second unprivileged uid (no passwd entry needed: the kernel only needs a number).
const THIRD_UID: u32 = 65533;
/// Bound on one attacker's attempt (its socket timeout is 10 s).
const CHILD_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for a node restart to show its socket again (debug build, 2 busy cores).
const SOCKET_BOUND: Duration = Duration::from_secs(30);
/// Node starts watched by [`socket_never_reachable_during_start_up`].
const START_UPS: usize = 5;
/// Hard cap on the start-up watchers' running time, whatever happens to the test.
const WATCH_CAP: Duration = Duration::from_secs(180);

/// One attempt at the pair socket: connect, send `request`, read until the end, a line
/// after the response head, or 10 s. Prints `{"connected", "received", "error"}`.
const ATTEMPT: &str = r#"
import json, socket, sys
path, request = sys.argv[1], sys.argv[2].encode()
out = {"connected": False, "received": "", "error": None}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
data = b""
try:
    s.connect(path)
    out["connected"] = True
    s.sendall(request)
    while len(data) < 1 << 20:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep and b"\n" in body:
            break
except Exception as e:
    out["error"] = type(e).__name__
finally:
    s.close()
out["received"] = data.decode("latin-1")
print(json.dumps(out))
"#;

/// Connects to the socket path over and over (each time sending the state request) until
/// the stop file exists or 180 s passed. Prints `{"attempts", "connected", "received"}`.
const HAMMER: &str = r#"
import json, os, socket, sys, time
path, stop = sys.argv[1], sys.argv[2]
request = b"GET /vha/local/state HTTP/1.0\r\n\r\n"
attempts = connected = received = 0
deadline = time.monotonic() + 180
while not os.path.exists(stop) and time.monotonic() < deadline:
    attempts += 1
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(path)
        connected += 1
        s.sendall(request)
        received += len(s.recv(65536))
    except Exception:
        pass
    finally:
        s.close()
print(json.dumps({"attempts": attempts, "connected": connected, "received": received}))
"#;

/// A process that took over the socket path: answers the state request with an unsealed
/// active state and anything else with a 200 of its own; counts connections and the bytes
/// it was sent. Runs until the stop file exists (or 180 s). Prints its counts at the end.
const IMPOSTOR: &str = r#"
import json, os, socket, sys, time
path, stop = sys.argv[1], sys.argv[2]
state = {"initialized": True, "sealed": False, "role": "active", "keyring": None,
         "fence": None, "pid": os.getpid(), "disable_clustering": False}
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(64)
srv.settimeout(0.05)
print("listening", flush=True)
connections = received = 0
deadline = time.monotonic() + 180
while not os.path.exists(stop) and time.monotonic() < deadline:
    try:
        c, _ = srv.accept()
    except socket.timeout:
        continue
    connections += 1
    c.settimeout(1)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
    except Exception:
        pass
    received += len(data)
    try:
        if b"/vha/local/state" in data:
            c.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + json.dumps(state).encode() + b"\n")
        elif data:
            body = b'{"impostor": true}'
            c.sendall(b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    except Exception:
        pass
    c.close()
print(json.dumps({"connections": connections, "received": received}), flush=True)
"#;

/// Panics unless the test runs as root (it must switch its children's uid).
fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test must run as root: it starts attacker processes under other uids (CI runs as root)"
    );
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// A `python3 -I -c script args...` command running as `uid` (its gid too; Rust drops the
/// supplementary groups when root sets a uid).
fn python_as(uid: u32, script: &str, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new("python3");
    cmd.arg("-I").arg("-c").arg(script).args(args).uid(uid).gid(uid);
    cmd
}

/// Runs one [`ATTEMPT`] as `uid`: `request` at the socket; returns its report.
async fn attempt_as(uid: u32, socket: &Path, request: &str) -> Value {
    let std_cmd = python_as(uid, ATTEMPT, &[&socket.to_string_lossy(), request]);
    let mut cmd = tokio::process::Command::from(std_cmd);
    cmd.kill_on_drop(true);
    let out = tokio::time::timeout(CHILD_TIMEOUT, cmd.output())
        .await
        .expect("attacker finished in time")
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "attacker output {text:?} ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

const STATE_REQUEST: &str = "GET /vha/local/state HTTP/1.0\r\nHost: x\r\n\r\n";
const API_REQUEST: &str = "GET /v1/sys/seal-status HTTP/1.0\r\nHost: x\r\n\r\n";

/// `vha_node_local_socket_refused_total{reason}` as the node reports it (through its proxy).
async fn refused(node: &TestNode, token: &str, reason: &str) -> f64 {
    let (st, _, v) = node
        .request_full("GET", "sys/metrics?format=prometheus", Some(token), None, &[])
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let text = v.as_str().unwrap_or_default();
    assert!(
        text.contains(&format!("vha_node_local_socket_refused_total{{reason=\"{reason}\"}}")),
        "the refusal counter is exported from the start:\n{text}"
    );
    series_value(text, "vha_node_local_socket_refused_total", &[("reason", reason)])
}

/// A node behind its own proxy (as root), initialized and unsealed through the proxy, with
/// `proxy_extra` in its proxy block; its directory opened for traversal (0711), so that
/// only the socket's own mode and the node's credential check stand in the way.
async fn pair(proxy_extra: &str) -> (TestNode, TestProxy, String) {
    let node = TestNode::builder()
        .behind_proxy()
        .proxy_extra(proxy_extra)
        .start()
        .await;
    chmod(node.dir(), 0o711);
    let listen = format!("127.0.0.1:{}", node.port).parse().expect("listen address");
    let proxy = TestProxy::start(&node.config_path, listen);
    let keys = node.init_unsealed().await;
    (node, proxy, keys.root_token)
}

/// Property: a process of another user that reaches the socket file (here the file mode
/// lets everyone connect, as it does when `allowed_uid` names some other user) gets nothing:
/// the node drops the connection on its peer credentials before reading or writing a byte,
/// for the state stream (no keyring, no state) and for an API call alike; each refusal is
/// counted in `vha_node_local_socket_refused_total{reason="uid"}` and logged with the uid.
/// The same request as the node's own user receives the state with the keyring, so the
/// attacker's empty answer is the check at work, not a broken client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_user_refused_by_peer_credentials_and_counted() {
    require_root();
    let (node, _proxy, token) = pair(&format!("allowed_uid = {THIRD_UID}")).await;
    let socket = node.socket.clone().expect("pair socket");
    let meta = std::fs::metadata(&socket).expect("socket exists");
    assert_eq!(
        meta.mode() & 0o777,
        0o666,
        "with another allowed_uid the file mode lets anyone connect"
    );
    let before = refused(&node, &token, "uid").await;

    for request in [STATE_REQUEST, API_REQUEST] {
        let r = attempt_as(OTHER_UID, &socket, request).await;
        assert_eq!(
            r["connected"], true,
            "file permissions let uid {OTHER_UID} connect: {r}"
        );
        assert_eq!(r["received"], "", "uid {OTHER_UID} received bytes for {request:?}: {r}");
    }
    wait_until_async(
        || async { (refused(&node, &token, "uid").await >= before + 2.0).then_some(()) },
        "both refusals counted",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(refused(&node, &token, "uid").await, before + 2.0);
    node.wait_log_line(&format!("uid={OTHER_UID}"), Duration::from_secs(10))
        .await;

    // Control: the node's own user is served the state, keyring included.
    let own = attempt_as(0, &socket, STATE_REQUEST).await;
    let received = own["received"].as_str().unwrap_or_default();
    assert!(received.starts_with("HTTP/1.0 200"), "{own}");
    assert!(
        received.contains("\"sealed\":false") && received.contains("\"keyring\":\""),
        "{own}"
    );
}

/// Property: by default the socket file is mode 0600, owned by the node's user, so a
/// process of another user that can reach the directory is stopped by the filesystem
/// already (EACCES at connect; the node sees no connection and counts nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_socket_mode_stops_other_users() {
    require_root();
    let (node, _proxy, token) = pair("").await;
    let socket = node.socket.clone().expect("pair socket");
    let meta = std::fs::metadata(&socket).expect("socket exists");
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), 0, "owned by the node's user");
    for request in [STATE_REQUEST, API_REQUEST] {
        let r = attempt_as(OTHER_UID, &socket, request).await;
        assert_eq!(r["connected"], false, "{r}");
        assert_eq!(r["error"], "PermissionError", "{r}");
        assert_eq!(r["received"], "", "{r}");
    }
    assert_eq!(refused(&node, &token, "uid").await, 0.0);
}

/// Property: `proxy { allowed_uid = N }` lets user N in (the check is not "always refuse"):
/// N is served the state stream with the keyring and answered API calls, without a
/// refusal counted; another user is still refused on the same socket. (An allowed_uid that
/// is the kernel's overflow uid is logged as a warning.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_uid_lets_the_configured_user_in() {
    require_root();
    let (node, _proxy, token) = pair(&format!("allowed_uid = {OTHER_UID}")).await;
    let socket = node.socket.clone().expect("pair socket");
    let state = attempt_as(OTHER_UID, &socket, STATE_REQUEST).await;
    let received = state["received"].as_str().unwrap_or_default();
    assert!(received.starts_with("HTTP/1.0 200"), "{state}");
    assert!(
        received.contains("\"sealed\":false") && received.contains("\"keyring\":\""),
        "{state}"
    );
    let api = attempt_as(OTHER_UID, &socket, API_REQUEST).await;
    let received = api["received"].as_str().unwrap_or_default();
    assert!(received.starts_with("HTTP/1.0 200"), "{api}");
    assert!(received.contains("\"sealed\":false"), "{api}");
    assert_eq!(refused(&node, &token, "uid").await, 0.0);

    // 65534 is also the kernel's usual overflow uid (what an unmapped uid of another user
    // namespace shows as): the node warns about such an allowed_uid.
    let overflow = std::fs::read_to_string("/proc/sys/kernel/overflowuid").unwrap_or_default();
    if overflow.trim() == OTHER_UID.to_string() {
        node.wait_log_line("overflow uid", Duration::from_secs(10)).await;
    }

    let other = attempt_as(THIRD_UID, &socket, STATE_REQUEST).await;
    assert_eq!(
        (&other["connected"], &other["received"]),
        (&Value::Bool(true), &Value::from("")),
        "{other}"
    );
    assert_eq!(refused(&node, &token, "uid").await, 1.0);
}

/// What the stat watcher saw at the socket path.
#[derive(Default)]
struct Seen {
    samples: u64,
    present: u64,
    /// Every (mode, uid, is a socket) seen while the path existed.
    kinds: std::collections::BTreeSet<(u32, u32, bool)>,
}

/// Watches `path` with `lstat` in a tight loop until `stop` is set (or [`WATCH_CAP`]).
fn watch_path(path: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Seen> {
    std::thread::spawn(move || {
        use std::os::unix::fs::FileTypeExt;
        let mut seen = Seen::default();
        let deadline = Instant::now() + WATCH_CAP;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            seen.samples += 1;
            if let Ok(m) = std::fs::symlink_metadata(&path) {
                seen.present += 1;
                seen.kinds
                    .insert((m.mode() & 0o7777, m.uid(), m.file_type().is_socket()));
            }
        }
        seen
    })
}

/// Property: the socket is never reachable by another user while the node starts, not even
/// for an instant. The node runs under umask 000 (so a socket bound in place would be
/// created 0777) in a world-readable directory, and starts [`START_UPS`] times while a
/// watcher `lstat`s the path in a tight loop and a process of another user tries to connect
/// in a loop: every sighting of the path is a socket of mode 0600 owned by the node's user,
/// and the other user never connects nor receives a byte. (Both watchers sample: a window
/// of a few microseconds after a bind in place would be caught often, not always; the
/// design that closes it, bind in a private 0700 directory and rename, leaves no window.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_never_reachable_during_start_up() {
    require_root();
    let dir = tempfile::Builder::new()
        .prefix("vha-pairsock-")
        .tempdir()
        .expect("tempdir");
    chmod(dir.path(), 0o755);
    let socket = dir.path().join("node.sock");
    let stop_file = dir.path().join("stop");
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_path(socket.clone(), stop.clone());
    let mut hammer = ChildProc::spawn(
        "hammer",
        python_as(
            OTHER_UID,
            HAMMER,
            &[&socket.to_string_lossy(), &stop_file.to_string_lossy()],
        ),
        &dir.path().join("hammer.log"),
    );
    let mut node = TestNode::builder()
        .behind_proxy()
        .node_socket(&socket)
        .umask(0o000)
        .start()
        .await;
    for i in 0..START_UPS {
        if i > 0 {
            node.restart().await;
        }
        wait_until(
            || socket.exists().then_some(()),
            "the node's socket is in place",
            SOCKET_BOUND,
        );
    }
    stop.store(true, Ordering::Relaxed);
    std::fs::write(&stop_file, b"").expect("stop file");
    let seen = watcher.join().expect("watcher");
    hammer
        .wait_exit(Duration::from_secs(30))
        .expect("hammer stops on the stop file");
    let report: Value = serde_json::from_str(hammer.output().trim()).expect("hammer report");

    assert!(
        seen.present > 0 && seen.samples > seen.present,
        "watched the path appear"
    );
    let kinds: Vec<String> = seen
        .kinds
        .iter()
        .map(|(mode, uid, sock)| format!("mode {mode:04o} uid {uid} socket {sock}"))
        .collect();
    assert_eq!(
        kinds,
        vec!["mode 0600 uid 0 socket true".to_string()],
        "the path was only ever the node's 0600 socket"
    );
    assert!(report["attempts"].as_u64().unwrap_or(0) > 100, "{report}");
    assert_eq!(report["connected"], 0, "{report}");
    assert_eq!(report["received"], 0, "{report}");
}

/// Property: the proxy talks to nothing but its node. A process of another user that took
/// over the socket path (the node is down) and plays an unsealed active node gets no
/// request from the proxy (it sees connections, never a byte: no token, no body), and its
/// answers reach no client: the local-only paths answer 503 instead of the impostor's 200,
/// and the proxy logs whom it refused. Once the real node is back, the same requests are
/// answered by it, through the same proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_refuses_an_impostor_at_the_node_socket() {
    require_root();
    let dir = tempfile::Builder::new()
        .prefix("vha-pairsock-")
        .tempdir()
        .expect("tempdir");
    // Writable by the attacker, so that it can put its own socket at the path.
    chmod(dir.path(), 0o777);
    let socket = dir.path().join("node.sock");
    let mut node = TestNode::builder().behind_proxy().node_socket(&socket).start().await;
    let listen = format!("127.0.0.1:{}", node.port).parse().expect("listen address");
    let proxy = TestProxy::start(&node.config_path, listen);
    let keys = node.init_unsealed().await;
    let token = keys.root_token.clone();

    node.stop(Duration::from_secs(15));
    wait_until(
        || (!socket.exists()).then_some(()),
        "the node removed its socket",
        SOCKET_BOUND,
    );
    let stop_file = dir.path().join("stop");
    let mut impostor = ChildProc::spawn(
        "impostor",
        python_as(
            OTHER_UID,
            IMPOSTOR,
            &[&socket.to_string_lossy(), &stop_file.to_string_lossy()],
        ),
        &dir.path().join("impostor.log"),
    );
    wait_until(
        || impostor.output().contains("listening").then_some(()),
        "the impostor listens at the node's path",
        CHILD_TIMEOUT,
    );
    for path in ["sys/health", "sys/seal-status"] {
        let (st, v) = node.request("GET", path, Some(&token), None).await;
        assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{path}: {v}");
        assert!(!v.to_string().contains("impostor"), "{path}: {v}");
    }
    let log_line = wait_until(
        || {
            proxy
                .output()
                .lines()
                .find(|l| l.contains(&format!("runs as uid {OTHER_UID}")))
                .map(str::to_string)
        },
        "the proxy logs the refused impostor",
        Duration::from_secs(10),
    );
    assert!(log_line.contains("not as the node's uid 0"), "{log_line}");
    std::fs::write(&stop_file, b"").expect("stop file");
    impostor
        .wait_exit(Duration::from_secs(30))
        .expect("impostor stops on the stop file");
    let out = impostor.output();
    let report: Value = serde_json::from_str(out.lines().last().unwrap_or_default()).expect("impostor report");
    assert!(
        report["connections"].as_u64().unwrap_or(0) >= 1,
        "the proxy did connect: {report}"
    );
    assert_eq!(report["received"], 0, "the impostor was sent nothing: {report}");

    // The real node again: served through the same proxy.
    std::fs::remove_file(&socket).expect("remove the impostor's socket");
    node.restart().await;
    node.unseal(&keys.keys).await;
    wait_until_async(
        || async { (node.request("GET", "sys/health", None, None).await.0 == StatusCode::OK).then_some(()) },
        "the real node answers through the proxy",
        SOCKET_BOUND,
    )
    .await;
}

/// Restarts watched by [`socket_accepts_once_the_node_answers`].
const RESTARTS: usize = 3;

/// Property: once any part of a (re)started node answers, its pair socket accepts too.
/// After a kill -9 the old socket file stays behind and refuses connections; a watcher
/// connects to the node's TCP listener in a tight loop while the node restarts and, the
/// first moment that succeeds, connects to the socket: it must be taken. Broken (the socket
/// bound after the TCP listener), a proxy in front answers 503 "local node unavailable" to
/// requests that reach it right after the node came back (seen as an unseal refused after a
/// restart in t95).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_accepts_once_the_node_answers() {
    let mut node = TestNode::builder().behind_proxy().start().await;
    let socket = node.socket.clone().expect("behind a proxy");
    let tcp: std::net::SocketAddr = node
        .node_addr
        .strip_prefix("http://")
        .expect("http address")
        .parse()
        .expect("node address");
    for round in 0..RESTARTS {
        node.kill();
        wait_until(
            || std::net::TcpStream::connect(tcp).is_err().then_some(()),
            "the killed node's TCP listener is gone",
            SOCKET_BOUND,
        );
        assert!(socket.exists(), "kill -9 leaves the socket file behind");
        let (path, deadline) = (socket.clone(), Instant::now() + SOCKET_BOUND);
        let watcher = std::thread::spawn(move || {
            while Instant::now() < deadline {
                if std::net::TcpStream::connect(tcp).is_ok() {
                    return Some(std::os::unix::net::UnixStream::connect(&path).map(drop));
                }
            }
            None
        });
        node.restart().await;
        match watcher.join().expect("watcher") {
            Some(Ok(())) => {}
            Some(Err(e)) => panic!("round {round}: the node answered on TCP while its socket refused: {e}"),
            None => panic!("round {round}: the node's TCP listener never answered"),
        }
    }
}
