#!/usr/bin/env bash
# The console of runbook serve (issue 29), measured in one run:
# - `/` with 1,000 runs in the history (a real run's journal of 20 steps
#   copied under 1,000 ids, a second apart): the first GET, then 100 one
#   after another on one keep-alive connection, p50 and p99 (the goal: under
#   100 ms); the same with a status filter that matches none (every run's row
#   looked at) and one that matches all;
# - a live run's page in headless Chromium (playwright-core, as the browser
#   spec): 20 times, a step's journal line (step_start, seen by inotify on the
#   journal) to that step's section in the page's DOM, p50 and max (the goal:
#   within 200 ms).
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
export RUNBOOK_STATE_DIR="$tmp/state"
token=bench-console-token-0123456789
echo "$token" >"$tmp/token"
echo "alice approver alice-bench-token-0123456789" >"$tmp/users"
cat >"$tmp/steps.lua" <<'LUA'
name = "steps" description = "20 steps, each waiting for its go file when go is set"
param "go" { default = "" }
for i = 1, 20 do
  step("step" .. i) { run = function(ctx)
    log.info("step " .. i)
    if ctx.params.go ~= "" then
      time.wait_until({ timeout = "60s", every = "5ms", what = "go " .. i },
        function() return fs.exists(ctx.params.go .. i) end)
    end
  end }
end
LUA
cat >"$tmp/rules.yml" <<YAML
rules:
  - name: none
    match: {alertname: None}
    runbook: $tmp/steps.lua
    mode: plan
runs: [$tmp/steps.lua]
YAML
./runbook run "$tmp/steps.lua" --yes >/dev/null
python3 - "$RUNBOOK_STATE_DIR/runs" <<'PY'
import os, sys, time
runs = sys.argv[1]
[src] = os.listdir(runs)
old = src[:-len(".jsonl")]
text = open(os.path.join(runs, src)).read()
t0 = time.time() - 2000
for i in range(1000):
    new = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t0 + i)) + "-%08x" % i
    open(os.path.join(runs, new + ".jsonl"), "w").write(text.replace(old, new))
os.remove(os.path.join(runs, src))
PY
./runbook serve --rules "$tmp/rules.yml" --listen 127.0.0.1:0 --token-file "$tmp/token" --users "$tmp/users" \
  >"$tmp/out" 2>"$tmp/err" &
serve=$!
trap 'kill $serve; rm -rf "$tmp"' EXIT
i=0; until grep -q listening "$tmp/out" || [ $i -ge 200 ]; do sleep 0.05; i=$((i+1)); done
port=$(sed -n 's/.*127\.0\.0\.1:\([0-9]*\).*/\1/p' "$tmp/out")
echo "$(ls "$RUNBOOK_STATE_DIR/runs" | wc -l) runs in the history"
python3 - "$port" <<'PY'
import http.client, re, sys, time
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=60)
def get(path, cookie=""):
    c.request("GET", path, headers={"Cookie": cookie})
    r = c.getresponse(); body = r.read()
    return r, body.decode()
r, page = get("/login")
pre = re.search(r"rb_login=(\w+)", r.getheader("Set-Cookie")).group(1)
c.request("POST", "/login", "csrf=%s&token=alice-bench-token-0123456789" % pre,
          {"Cookie": "rb_login=" + pre, "Content-Type": "application/x-www-form-urlencoded"})
r = c.getresponse(); r.read()
cookie = "rb_session=" + re.search(r"rb_session=(\w+)", r.getheader("Set-Cookie")).group(1)
def measure(path, n=100):
    t = time.perf_counter()
    get(path, cookie)
    cold = (time.perf_counter() - t) * 1000
    times = []
    for _ in range(n):
        t = time.perf_counter()
        r, body = get(path, cookie)
        times.append((time.perf_counter() - t) * 1000)
        assert r.status == 200 and "<h1>Runs</h1>" in body, (r.status, body[:200])
    times.sort()
    return "first %.1f ms, then p50 %.1f ms, p99 %.1f ms (%d rows)" % (cold, times[n // 2], times[n * 99 // 100],
        max(0, body.count("<tr>") - 1))
# The first request reads the 50 newest journals; serve keeps an ended run's row while its journal keeps its size.
print("GET /:               " + measure("/"))
print("GET /?status=failed: " + measure("/?status=failed", 20) + ", every run's row looked at")
print("GET /?status=ok:     " + measure("/?status=ok"))
PY
node - "$port" "$tmp" <<'JS'
const fs = require("fs"), path = require("path");
const { chromium } = require(process.cwd() + "/build/node/node_modules/playwright-core");
const [port, tmp] = process.argv.slice(2);
const url = "http://127.0.0.1:" + port;
(async () => {
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--no-sandbox", "--disable-gpu",
    "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage"] });
  const page = await browser.newPage();
  await page.goto(url + "/login");
  await page.fill('input[name="token"]', "alice-bench-token-0123456789");
  await Promise.all([page.waitForURL(url + "/"), page.click("form.login button")]);
  const go = path.join(tmp, "go");
  const r = await fetch(url + "/v1/runs", { method: "POST", headers: { Authorization: "Bearer " + fs.readFileSync(
    path.join(tmp, "token"), "utf8").trim() }, body: JSON.stringify({ runbook: path.join(tmp, "steps.lua"), params: { go } }) });
  const id = (await r.json()).run_id;
  await page.goto(url + "/runs/" + id);
  await page.waitForSelector('section.step[data-step="step1"]', { timeout: 60000 });
  // The page marks when each step's section first appears, on the same clock as ours.
  await page.evaluate(() => {
    window.seen = {};
    new MutationObserver(() => {
      for (const s of document.querySelectorAll("section.step")) {
        if (!(s.dataset.step in window.seen)) window.seen[s.dataset.step] = performance.timeOrigin + performance.now();
      }
    }).observe(document.getElementById("live"), { childList: true, subtree: true });
  });
  const journal = path.join(process.env.RUNBOOK_STATE_DIR, "runs", id + ".jsonl");
  const lines = {};
  const watcher = fs.watch(journal, () => {
    const now = performance.timeOrigin + performance.now();
    for (const line of fs.readFileSync(journal, "utf8").split("\n")) {
      const e = line.includes("step_start") && JSON.parse(line);
      if (e && e.event === "step_start" && !(e.step in lines)) lines[e.step] = now;
    }
  });
  const delays = [];
  for (let i = 1; i < 20; i++) {
    fs.writeFileSync(go + i, "");
    const step = "step" + (i + 1);
    await page.waitForFunction((s) => window.seen && s in window.seen, step, { timeout: 60000, polling: 10 });
    const seen = await page.evaluate((s) => window.seen[s], step);
    if (lines[step] === undefined) { console.error("no journal line seen for " + step); continue; }
    delays.push(seen - lines[step]);
  }
  watcher.close();
  delays.sort((a, b) => a - b);
  console.log(`a step's journal line to its section on the live page: p50 ${delays[delays.length >> 1].toFixed(0)} ms,`
    + ` max ${delays[delays.length - 1].toFixed(0)} ms (${delays.length} steps)`);
  await browser.close();
})().catch((e) => { console.error(e); process.exit(1); });
JS
uptime
