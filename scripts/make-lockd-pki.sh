#!/usr/bin/env bash
# Makes what an authenticated lockd deployment needs, with openssl, into OUT_DIR:
#   lockd-ca.pem                        CA that signs lockd's server certificate (nodes trust it:
#                                       tls_ca_file)
#   lockd.pem, lockd-key.pem            lockd's server certificate for LOCKD_NAME (--tls-cert-file,
#                                       --tls-key-file)
#   lockd-client-ca.pem                 CA that signs the clients' certificates (lockd's
#                                       --tls-client-ca-file)
#   <client>-lockd-client.pem, -key.pem one client certificate per CLIENT (tls_cert_file,
#                                       tls_key_file of that pair's storage "lockd" stanza)
#   lockd.token                         a random bearer token, mode 0600 (--token-file, token_file)
# The CA keys stay in OUT_DIR/private (0700): keep them offline once the certificates are made.
#
# usage: scripts/make-lockd-pki.sh OUT_DIR LOCKD_NAME CLIENT [CLIENT...]
#   LOCKD_NAME: the DNS name (or IP address) nodes use in storage "lockd" { address = ... }
#   CLIENT:     a name per node host, e.g. vha-1 vha-2 vha-3
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,16p' "$0" >&2
  exit 2
fi
out=$1
lockd_name=$2
shift 2
command -v openssl >/dev/null || { echo "make-lockd-pki: openssl is missing (apt-get install -y openssl)" >&2; exit 1; }
umask 077
mkdir -p "$out/private"
cd "$out"
days=825
if [[ "$lockd_name" =~ ^[0-9.]+$ || "$lockd_name" == *:* ]]; then
  san="IP:$lockd_name"
else
  san="DNS:$lockd_name"
fi

ca() { # name, common name
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
    -subj "/CN=$2" -keyout "private/$1-key.pem" -out "$1.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}
leaf() { # out-name, ca-name, common name, extensions
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=$3" -keyout "$1-key.pem" -out "private/$1.csr" 2>/dev/null
  openssl x509 -req -in "private/$1.csr" -CA "$2.pem" -CAkey "private/$2-key.pem" -CAcreateserial \
    -CAserial "private/$2.srl" -days "$days" -out "$1.pem" -extfile <(printf '%s\n' "$4") 2>/dev/null
  rm -f "private/$1.csr"
}

ca lockd-ca "vha lockd server CA"
ca lockd-client-ca "vha lockd client CA"
leaf lockd lockd-ca "$lockd_name" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san"
for c in "$@"; do
  leaf "$c-lockd-client" lockd-client-ca "$c" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
done
openssl rand -hex 32 > lockd.token
# Certificates are public; keys and the token stay 0600 (the umask made them so).
for f in ./*.pem; do
  case "$f" in *-key.pem) ;; *) chmod 0644 "$f" ;; esac
done
echo "made lockd PKI in $out: lockd-ca.pem, lockd.pem (for $lockd_name), lockd-client-ca.pem, $# client certificate(s), lockd.token"
