// The dashboard in a real headless Chromium. Started by tests/it/browser.rs, which runs a
// real nonstop with the example app (one version already live) and passes, as env vars,
// where everything is. Each test saves screenshots into $NONSTOP_SHOTS.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const env = (name) => {
  const value = process.env[name];
  assert.ok(value, `${name} is not set: run these tests through tests/it/browser.rs`);
  return value;
};
const BASE = env("NONSTOP_BASE");
const PROXY = env("NONSTOP_PROXY");
const REPO = env("NONSTOP_REPO");
const SECRET = env("NONSTOP_SECRET");
const ADMIN_TOKEN = env("NONSTOP_ADMIN_TOKEN");
const REPOSITORY = env("NONSTOP_REPOSITORY");
const PORTS = env("NONSTOP_PORTS").split(",").map(Number);
const SHOTS = env("NONSTOP_SHOTS");
const HANDSHAKE = env("NONSTOP_HANDSHAKE"); // a folder tests/it/browser.rs watches
const DOCS = process.env.NONSTOP_DOCS_SHOTS; // set to refresh the README's screenshots
const WAIT = 90_000; // a deploy builds the example app: allow for a slow machine

const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

let browser;
before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: FLAGS });
});
after(async () => { await browser?.close(); });

function git(...args) {
  return execFileSync("git", ["-C", REPO, "-c", "user.name=Ada", "-c", "user.email=ada@localhost", ...args],
    { encoding: "utf8" }).trim();
}

function commit(message, change) {
  if (change) change();
  writeFileSync(join(REPO, "NOTES"), message);
  git("add", "--all");
  git("commit", "--quiet", "-m", message);
  return git("rev-parse", "HEAD");
}

async function push(sha) {
  const body = JSON.stringify({
    ref: "refs/heads/main", after: sha, deleted: false,
    repository: { full_name: REPOSITORY },
    head_commit: { id: sha, message: git("log", "-1", "--format=%s"), author: { name: "Ada", username: "ada" } },
  });
  const signature = "sha256=" + createHmac("sha256", SECRET).update(body).digest("hex");
  const response = await fetch(`${BASE}/hooks/github`, {
    method: "POST", body,
    headers: { "X-GitHub-Event": "push", "X-GitHub-Delivery": `browser-${sha}`,
      "X-Hub-Signature-256": signature, "Content-Type": "application/json" },
  });
  const answer = await response.text();
  assert.equal(response.status, 202, answer);
  return JSON.parse(answer).deployment_id;
}

// Reading the API needs the admin token (server.public_read is off).
const AS_ADMIN = { headers: { Authorization: `Bearer ${ADMIN_TOKEN}` } };

async function live() {
  return (await fetch(`${BASE}/api/apps/hello/live`, AS_ADMIN)).json();
}

async function served() {
  return (await (await fetch(`${PROXY}/`)).text()).trim();
}

async function shot(page, name) {
  const file = join(SHOTS, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  if (DOCS) writeFileSync(join(DOCS, `${name}.png`), readFileSync(file));
}

// A session cookie, from logging in with the admin token as the login form does.
async function sessionCookie() {
  const response = await fetch(`${BASE}/login`, {
    method: "POST", body: new URLSearchParams({ token: ADMIN_TOKEN }), redirect: "manual",
  });
  assert.equal(response.status, 303, await response.text());
  const [name, value] = response.headers.get("set-cookie").split(";")[0].split("=");
  return { name, value, url: BASE, httpOnly: true, sameSite: "Strict" };
}

// A page in a browser of its own: logged in (the dashboard is private by default), unless
// the test is about logging in.
async function newPage({ loggedIn = true } = {}) {
  const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
  if (loggedIn) await context.addCookies([await sessionCookie()]);
  const page = await context.newPage();
  page.on("pageerror", (err) => { throw err; });
  return page;
}

test("a push shows its stages turn green and the live card flip, with no reload", async () => {
  const before = await live();
  const overview = await newPage();
  await overview.goto(`${BASE}/`);
  await overview.waitForSelector("body[data-live=connected]");
  await overview.evaluate(() => { window.sameDocument = true; });
  const card = overview.locator('[data-app="hello"]');
  assert.equal(Number(await card.locator(".live-port").textContent()), before.port);

  const id = await push(commit("Browser push"));
  const detail = await newPage();
  await detail.goto(`${BASE}/deployments/${id}`);
  await detail.waitForSelector("body[data-live=connected]");
  await detail.evaluate(() => { window.sameDocument = true; });

  // The stages turn green on the open page, one after another, without a reload.
  await detail.waitForSelector('[data-stage="ValidateService"][data-stage-status="succeeded"]', { timeout: WAIT });
  await detail.waitForSelector('[data-deployment-status="succeeded"]', { timeout: WAIT });
  const statuses = await detail.$$eval("[data-stage]", (items) => items.map((i) => [i.dataset.stage, i.dataset.stageStatus]));
  // nonstop's four, CodeDeploy's seven hooks, and the app's own Release, BeforeSwitch, AfterSwitch.
  assert.equal(statuses.length, 14);
  for (const [stage, status] of statuses) {
    assert.ok(["succeeded", "skipped"].includes(status), `${stage} is ${status}`);
  }
  const expected = PORTS.find((p) => p !== before.port);
  assert.match(await detail.locator("[data-switch]").textContent(), new RegExp(`from ${before.port} to ${expected}`));
  assert.equal(await detail.evaluate(() => window.sameDocument), true, "the deployment page reloaded");

  // The live card flips to the other port on the overview that stayed open.
  await card.locator(`.live-port:text-is("${expected}")`).waitFor({ timeout: WAIT });
  assert.equal(await overview.evaluate(() => window.sameDocument), true, "the overview reloaded");
  assert.equal((await live()).port, expected);
  assert.equal(await card.locator(".live-version").textContent(), await served());
  await shot(overview, "overview");
  await shot(detail, "deployment");
});

test("after logging in, Roll back flips the card back and the proxy serves the old version", async () => {
  const page = await newPage({ loggedIn: false });
  await page.goto(`${BASE}/`);
  assert.equal(await page.locator("[data-action=rollback]").count(), 0, "actions shown without a login");

  await page.goto(`${BASE}/login`);
  await page.fill("input[name=token]", "not the token");
  await page.click("button:text('Log in')");
  await page.waitForSelector("text=That is not the admin token.");
  await page.fill("input[name=token]", ADMIN_TOKEN);
  await page.click("button:text('Log in')");
  await page.waitForURL(`${BASE}/`);

  const before = await live();
  const previous = PORTS.find((p) => p !== before.port);
  const oldVersion = (await (await fetch(`http://127.0.0.1:${previous}/`)).text()).trim();
  await page.click('[data-app="hello"] [data-action=rollback]');
  await page.waitForURL(/\/deployments\/\d+$/);
  await page.waitForSelector('[data-deployment-status="succeeded"]', { timeout: WAIT });
  await shot(page, "rollback");

  await page.goto(`${BASE}/`);
  const card = page.locator('[data-app="hello"]');
  await card.locator(`.live-port:text-is("${previous}")`).waitFor({ timeout: WAIT });
  assert.equal(await served(), oldVersion);
  assert.equal((await live()).port, previous);
  const undone = page.locator(`tr[data-deployment="${before.deployment_id}"] [data-status]`);
  assert.equal(await undone.getAttribute("data-status"), "rolled_back");
});

test("a failing deploy shows its failing stage and its output", async () => {
  const serving = await served();
  const sha = commit("Break the health check", () => {
    const main = join(REPO, "src/main.rs");
    const source = readFileSync(main, "utf8");
    const broken = source.replace("const HEALTHY: bool = true;", "const HEALTHY: bool = false;");
    assert.notEqual(broken, source, "the example app lost its HEALTHY switch");
    writeFileSync(main, broken);
  });
  const id = await push(sha);
  const page = await newPage();
  await page.goto(`${BASE}/deployments/${id}`);
  await page.waitForSelector('[data-deployment-status="failed"]', { timeout: WAIT });

  const alert = await page.locator("[role=alert]").textContent();
  assert.match(alert, /^ValidateService failed/);
  const stage = page.locator('[data-stage="ValidateService"]');
  assert.equal(await stage.getAttribute("data-stage-status"), "failed");
  const output = stage.locator("pre");
  assert.ok(await output.isVisible(), "the failing stage's output is open");
  assert.match(await output.textContent(), /503/);
  assert.equal(await page.locator('[data-stage="ApplicationStart"]').getAttribute("data-stage-status"), "succeeded");
  assert.equal(await served(), serving, "the previous version keeps serving");
  await shot(page, "failed-deployment");
});

// Asks tests/it/browser.rs to kill the server (SIGKILL) and start it again; resolves once it
// answers again.
test("a running build's lines appear in its Output panel as they are printed", async () => {
  const sha = commit("Slow build, healthy again", () => {
    writeFileSync(join(REPO, "SLOW_BUILD"), "30 lines\n");
    const main = join(REPO, "src/main.rs");
    writeFileSync(main, readFileSync(main, "utf8").replace("const HEALTHY: bool = false;", "const HEALTHY: bool = true;"));
  });
  const id = await push(sha);
  const page = await newPage();
  await page.goto(`${BASE}/deployments/${id}`);
  const output = page.locator("[data-console] pre");
  await output.filter({ hasText: "line 3\n" }).waitFor({ timeout: WAIT });
  // Shown while the build still runs.
  const shown = await output.textContent();
  const record = await (await fetch(`${BASE}/api/deployments/${id}`, AS_ADMIN)).json();
  assert.equal(record.stages.find((s) => s.name === "Build").status, "running", shown);
  assert.ok(!shown.includes("line 30\n"), shown);
  await shot(page, "console-while-building");
  await output.filter({ hasText: "line 30\n" }).waitFor({ timeout: WAIT });
  const lines = (await output.textContent()).split("\n").filter((l) => l.startsWith("line "));
  assert.deepEqual(lines, Array.from({ length: 30 }, (_, i) => `line ${i + 1}`));
  await page.waitForSelector("[data-deployment-status=succeeded]", { timeout: WAIT });
  git("rm", "--quiet", "SLOW_BUILD");
  git("commit", "--quiet", "-m", "Fast builds again");
  await page.context().close();
});

async function restartServer() {
  const done = join(HANDSHAKE, "restarted");
  rmSync(done, { force: true });
  writeFileSync(join(HANDSHAKE, "restart"), "");
  const deadline = Date.now() + WAIT;
  while (!existsSync(done)) {
    assert.ok(Date.now() < deadline, "the server was not restarted");
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

test("after the server restarts, an open page reconnects by itself and shows the next deploy", async () => {
  const page = await newPage();
  await page.goto(`${BASE}/`);
  await page.waitForSelector("body[data-live=connected]");
  await page.evaluate(() => {
    window.sameDocument = true;
    window.liveStates = [];
    new MutationObserver(() => window.liveStates.push(document.body.dataset.live))
      .observe(document.body, { attributes: true, attributeFilter: ["data-live"] });
  });

  await restartServer();
  // The page noticed the server was gone, then came back to it on its own.
  await page.waitForFunction(
    () => window.liveStates.includes("reconnecting") && document.body.dataset.live === "connected",
    null, { timeout: WAIT });

  const before = await live();
  const sha = commit("Healthy again, after a restart", () => {
    const main = join(REPO, "src/main.rs");
    writeFileSync(main, readFileSync(main, "utf8").replace("const HEALTHY: bool = false;", "const HEALTHY: bool = true;"));
  });
  await push(sha);
  const expected = PORTS.find((p) => p !== before.port);
  const card = page.locator('[data-app="hello"]');
  await card.locator(`.live-port:text-is("${expected}")`).waitFor({ timeout: WAIT });
  assert.equal(await card.locator(".live-version").textContent(), await served());
  assert.equal(await page.evaluate(() => window.sameDocument), true, "the overview reloaded");
});

test("a visit without a login lands on the login page and, logged in, goes on to the page it asked for", async () => {
  const [latest] = await (await fetch(`${BASE}/api/deployments?limit=1`, AS_ADMIN)).json();
  const asked = `/deployments/${latest.id}`;
  const page = await newPage({ loggedIn: false });
  await page.goto(`${BASE}${asked}`);
  assert.equal(page.url(), `${BASE}/login?next=${encodeURIComponent(asked)}`);
  assert.equal(await page.locator("[data-deployment-status]").count(), 0, "the deployment shown without a login");
  // Nothing the login page loads is refused (the favicon, the style sheet; no event stream).
  const refused = [];
  page.on("response", (r) => { if (r.status() >= 400) refused.push(`${r.status()} ${r.url()}`); });
  await page.reload();

  await page.fill("input[name=token]", "not the token");
  await page.click("button:text('Log in')");
  await page.waitForSelector("text=That is not the admin token.");
  refused.length = 0; // the wrong token's own 401
  await page.fill("input[name=token]", ADMIN_TOKEN);
  await page.click("button:text('Log in')");
  await page.waitForURL(`${BASE}${asked}`);
  await page.waitForSelector("[data-deployment-status]");
  assert.match(await page.locator("h1").textContent(), new RegExp(`^Deployment ${latest.id} `));
  // The event stream answers the logged-in page.
  await page.waitForSelector("body[data-live=connected]");
  assert.deepEqual(refused, []);
  await shot(page, "after-login");
});
