// The console in headless Chromium, driven by playwright-core (spec/console/browser_spec.lua
// starts serve and the plans, then this). One line per scenario on stdout: "ok NAME DETAIL" or
// "fail NAME MESSAGE". Screenshots go to $SHOTS. A Content-Security-Policy violation fails the
// scenario it happens in.
"use strict";
const fs = require("fs");
const path = require("path");
const { chromium } = require(process.env.PLAYWRIGHT_CORE);

const URL = process.env.URL;
const [ALICE, SERVE_TOKEN] = [process.env.ALICE, process.env.SERVE_TOKEN];
const [APPROVE, DENY] = process.env.PLANS.split(" ");
const SHOTS = process.env.SHOTS;
const WAIT = 30000;   // ms for anything to appear: generous, CI is slower than this machine

const violations = [];

function shot(page, name) { return page.screenshot({ path: path.join(SHOTS, name + ".png"), fullPage: true }); }

async function newPage(browser, options) {
  const context = await browser.newContext(options);
  const page = await context.newPage();
  page.on("console", (m) => { if (/Content.Security.Policy/i.test(m.text())) violations.push(m.text()); });
  return page;
}

// Alice's page, logged in once for the scenarios that act as her.
let alicePage;
async function alice(browser) {
  if (!alicePage) {
    alicePage = await newPage(browser);
    await login(alicePage, ALICE);
  }
  return alicePage;
}

async function login(page, token, name) {
  await page.goto(URL + "/login");
  await page.fill('input[name="token"]', token);
  if (name) await page.fill('input[name="name"]', name);
  await Promise.all([page.waitForURL(URL + "/"), page.click("form.login button")]);
}

async function startRun(params) {
  const r = await fetch(URL + "/v1/runs", { method: "POST", headers: { Authorization: "Bearer " + SERVE_TOKEN },
    body: JSON.stringify({ runbook: process.env.LIVE, params, by: "alice" }) });
  if (r.status !== 202) throw new Error("POST /v1/runs: " + r.status + " " + (await r.text()));
  return (await r.json()).run_id;
}

const scenarios = {
  async refused(browser) {
    const page = await newPage(browser);
    for (const p of ["/", "/plans/" + APPROVE]) {
      await page.goto(URL + p);
      if (new globalThis.URL(page.url()).pathname !== "/login") throw new Error(p + " went to " + page.url());
    }
    await page.fill('input[name="token"]', ALICE + "x");
    await page.click("form.login button");
    await page.waitForSelector("text=A wrong token.", { timeout: WAIT });
    await shot(page, "login-refused");
    const cookies = await page.context().cookies();
    if (cookies.some((c) => c.name === "rb_session")) throw new Error("a session cookie after a wrong token");
    return "/ and a plan went to /login; a wrong token was refused";
  },

  async live(browser) {
    const page = await alice(browser);
    const go = path.join(process.env.DIR, "go-" + Date.now());
    await page.goto(URL + "/");
    await page.waitForFunction(() => document.getElementById("live"), null, { timeout: WAIT });
    await page.evaluate(() => { window.listStillHere = true; });
    const id = await startRun({ go });
    // The list shows the new run by itself.
    await page.waitForSelector(`#live a[href="/runs/${id}"]`, { timeout: WAIT });
    if (!(await page.evaluate(() => window.listStillHere))) throw new Error("the list was reloaded");
    await page.goto(URL + "/runs/" + id);
    await page.waitForSelector('section.step[data-step="first"]', { timeout: WAIT });
    await page.evaluate(() => { window.stillHere = true; });
    const cookie = (await page.context().cookies()).find((c) => c.name === "rb_session");
    if (!cookie.httpOnly || cookie.sameSite !== "Strict") throw new Error("cookie: " + JSON.stringify(cookie));
    fs.writeFileSync(go + "1", "");
    const t0 = Date.now();
    await page.waitForSelector('section.step[data-step="second"]', { timeout: WAIT });
    const ms = Date.now() - t0;
    fs.writeFileSync(go + "2", "");
    await page.waitForSelector('#live[data-ended] table.summary .s-ok', { timeout: WAIT });
    await page.waitForSelector('svg.timeline g.bar[data-step="third"]', { timeout: WAIT });
    if (!(await page.evaluate(() => window.stillHere))) throw new Error("the page was reloaded");
    await shot(page, "run-done");
    return `the run appeared on the list, its second step ${ms} ms after its go file, without a reload`;
  },

  async approve(browser) {
    const page = await alice(browser);
    await page.goto(URL + "/plans/" + APPROVE);
    await shot(page, "plan-pending");
    await page.fill('textarea[name="comment"]', "checked the diff");
    await Promise.all([page.waitForURL(URL + "/plans/" + APPROVE), page.click("button.approve")]);
    await page.waitForSelector("table.approvals >> text=checked the diff", { timeout: WAIT });
    await page.waitForSelector("table.summary .state-approved", { timeout: WAIT });
    await Promise.all([page.waitForURL(/\/runs\/[\w-]+$/), page.click("text=Apply")]);
    const run = page.url().split("/").pop();
    await page.waitForSelector('#live[data-ended] table.summary .s-ok, table.summary .s-ok', { timeout: WAIT });
    await page.waitForSelector('section.step[data-step="third"]', { timeout: WAIT });
    await shot(page, "plan-applied-run");
    return "approved, applied: run " + run;
  },

  // Without JavaScript, on a phone's screen, with serve's token and a name.
  async deny(browser) {
    const page = await newPage(browser, { javaScriptEnabled: false, viewport: { width: 390, height: 844 },
      isMobile: true, hasTouch: true });
    await login(page, SERVE_TOKEN, "sam");
    await page.goto(URL + "/plans/" + DENY);
    await page.fill('textarea[name="comment"]', "not now");
    await Promise.all([page.waitForURL(URL + "/plans/" + DENY), page.click("button.deny")]);
    await page.waitForSelector("table.summary .state-denied", { timeout: WAIT });
    if (await page.$("button.approve")) throw new Error("a denied plan still offers Approve or Apply");
    const wide = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1);
    await shot(page, "phone-plan-denied");
    if (wide) throw new Error("the plan page is wider than a phone's screen");
    return "denied without JavaScript, on a phone's screen";
  },
};

(async () => {
  fs.mkdirSync(SHOTS, { recursive: true });
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--disable-dev-shm-usage"] });
  let failed = 0;
  for (const name of (process.env.ONLY || Object.keys(scenarios).join(" ")).split(" ")) {
    const t0 = Date.now();
    try {
      const detail = await scenarios[name](browser) + ` (${Date.now() - t0} ms)`;
      if (violations.length) throw new Error("CSP: " + violations.splice(0).join("; "));
      console.log(`ok ${name} ${detail}`);
    } catch (e) {
      failed++;
      violations.splice(0);
      console.log(`fail ${name} ${String(e.message || e).split("\n")[0]}`);
    }
  }
  await browser.close();
  process.exit(failed ? 1 : 0);
})().catch((e) => { console.log("fail launch " + String(e.message || e).split("\n")[0]); process.exit(2); });
