# Pair 1 of a 3-pair cluster on separate hosts (vha-1.example.internal, 10.0.0.11).
# Both processes of the pair read this file: `vha server --config` and `vha proxy --config`.
# The proxy owns the client-facing listener (TLS); the node serves its proxy on a private
# unix socket and runs the cluster listener (mTLS, P-521) only while active.

# lockd authenticates every client twice: a client certificate from lockd's client CA
# (mutual TLS) and a bearer token (README "Security model" shows how to make both).
storage "lockd" {
  address       = "https://lockd.example.internal:8300"
  lock_ttl      = "10s"
  tls_ca_file   = "/etc/vha/tls/lockd-ca.pem"
  tls_cert_file = "/etc/vha/tls/vha-1-lockd-client.pem"
  tls_key_file  = "/etc/vha/tls/vha-1-lockd-client-key.pem"
  token_file    = "/etc/vha/lockd.token"
}

listener "tcp" {
  address         = "0.0.0.0:8200"
  cluster_address = "0.0.0.0:8201"
  tls_cert_file   = "/etc/vha/tls/vha-1.pem"
  tls_key_file    = "/etc/vha/tls/vha-1-key.pem"
  x_forwarded_for_authorized_addrs = "10.0.0.0/24"
}

api_addr     = "https://vha-1.example.internal:8200"
cluster_addr = "https://vha-1.example.internal:8201"
cluster_name = "prod"
log_level    = "info"

proxy {
  node_socket     = "/run/vha/node.sock"
  metrics_address = "127.0.0.1:9102"
  hold_timeout    = "10s"
}
