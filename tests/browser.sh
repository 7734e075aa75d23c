#!/bin/sh
# browser.sh [PYTHON] - the server's routing view in headless Chromium (part of make
# test). Starts python3 -m moas.server on a free loopback port with the tiny pooled
# model, runs tests/browser/routing_view.js (playwright-core, installed by
# `npm install --prefix tests/browser`), and leaves the screenshot in
# build/browser/routing-view.png (MODEL=... and OUT=... choose others). Says SKIP when chromium, node, playwright-core or
# aiohttp is missing.
set -eu
PY=${1:-python3}
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
skip() { echo "*** SKIP: browser test ($1) ***"; exit 0; }
[ -n "$CHROMIUM" ] || skip "chromium not found: apt-get install chromium"
command -v node >/dev/null 2>&1 || skip "node not found"
[ -d tests/browser/node_modules/playwright-core ] ||
    skip "playwright-core not installed: npm install --prefix tests/browser"
$PY -c 'import aiohttp' 2>/dev/null || skip "aiohttp not importable by $PY"
MODEL=${MODEL:-tests/data/tiny-pooled-bias.gguf}
OUT=${OUT:-build/browser/routing-view.png}
mkdir -p build/browser
log=build/browser/server.log
PYTHONPATH=bindings/python MOAS_LIBRARY=${MOAS_LIBRARY:-$(pwd)/lib/libmoas.so.1} \
    $PY -m moas.server -m "$MODEL" --port 0 --pool-mb 4 \
    --mode routed --step-delay 0.01 -t 1 >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
i=0
until grep -q "http://127.0.0.1:" "$log"; do
    i=$((i + 1))
    [ $i -lt 100 ] || { cat "$log"; echo "browser: FAIL: the server did not start"; exit 1; }
    sleep 0.1
done
url=$(sed -n 's|.*\(http://127.0.0.1:[0-9]*/\).*|\1|p' "$log")
node tests/browser/routing_view.js "$url" "$OUT" "$CHROMIUM"
