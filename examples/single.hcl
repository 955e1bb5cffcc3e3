# A single vha node on durable file storage (no HA): `vha server --config examples/single.hcl`
storage "file" {
  path = "/tmp/vha-single/data"
}

listener "tcp" {
  address     = "127.0.0.1:8200"
  tls_disable = true
}

api_addr  = "http://127.0.0.1:8200"
log_level = "info"
