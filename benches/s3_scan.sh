#!/usr/bin/env bash
# One 64 MB scan stored (`dispatch new --attach`) and read back (`dispatch attachment`) by the
# release binary, with the scans in local files and in a real S3 server (s3s-fs) on loopback;
# then the local node's scans moved to the bucket (`scans migrate --to s3`).
# Usage: cargo build --release && benches/s3_scan.sh   (s3s-fs from target/tools, as .ci/run builds it)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/communesync
S3S=target/tools/bin/s3s-fs
MB=${1:-64}
T=$(mktemp -d)
trap 'kill $S3PID 2>/dev/null || true; rm -rf "$T"' EXIT
head -c "${MB}M" /dev/urandom > "$T/scan.bin"
mkdir -p "$T/s3root/scans"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$S3S" --host 127.0.0.1 --port "$PORT" --access-key bench --secret-key bench-secret "$T/s3root" >/dev/null 2>&1 &
S3PID=$!
sleep 1
ms() { date +%s%3N; }
for store in local s3; do
    D="$T/$store"
    "$BIN" --data "$D" init --unit qn --role province >/dev/null
    if [ "$store" = s3 ]; then
        printf 'access_key_id = "bench"\nsecret_access_key = "bench-secret"\n' > "$D/s3.key"
        chmod 600 "$D/s3.key"
        printf '\n[scans]\nstore = "s3"\n\n[scans.s3]\nendpoint = "http://127.0.0.1:%s"\nbucket = "scans"\nprefix = "qn"\ncredentials_file = "s3.key"\n' "$PORT" >> "$D/config.toml"
    fi
    t0=$(ms)
    id=$("$BIN" --json --data "$D" dispatch new --ref 1/BENCH --summary bench --to qn/binhlieu --attach "$T/scan.bin" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    t1=$(ms)
    "$BIN" --data "$D" dispatch attachment "$id" scan.bin --out "$T/back-$store" >/dev/null
    t2=$(ms)
    cmp "$T/scan.bin" "$T/back-$store"
    echo "$store: ${MB} MB stored in $((t1 - t0)) ms ($((MB * 1000 / (t1 - t0 + 1))) MB/s), read back in $((t2 - t1)) ms ($((MB * 1000 / (t2 - t1 + 1))) MB/s)"
done
D="$T/local"
printf 'access_key_id = "bench"\nsecret_access_key = "bench-secret"\n' > "$D/s3.key"
chmod 600 "$D/s3.key"
printf '\n[scans.s3]\nendpoint = "http://127.0.0.1:%s"\nbucket = "scans"\nprefix = "moved"\ncredentials_file = "s3.key"\n' "$PORT" >> "$D/config.toml"
t0=$(ms)
"$BIN" --data "$D" scans migrate --to s3 >/dev/null
t1=$(ms)
echo "migrate: ${MB} MB moved to the bucket in $((t1 - t0)) ms ($((MB * 1000 / (t1 - t0 + 1))) MB/s)"
