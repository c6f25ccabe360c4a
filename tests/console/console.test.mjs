// The web console in a real browser (Debian's Chromium, headless, through playwright-core)
// against a real `escrow serve` on a fresh data directory: sign-in links, pages, roles,
// CSRF, expiry, logout; axe-core on every page; screenshots in tests/console/out/.
//
// Run: node --test tests/console/ (ESCROW_BIN: the escrow binary, default
// $CARGO_TARGET_DIR/debug/escrow; CHROMIUM: default /usr/bin/chromium).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, writeFileSync, rmSync, existsSync } from "node:fs";
import { createInterface } from "node:readline";
import { createServer } from "node:http";
import { tmpdir, homedir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);
const AXE = require.resolve("axe-core/axe.min.js");
const BIN = process.env.ESCROW_BIN ||
  join(process.env.CARGO_TARGET_DIR || join(homedir(), ".cache/escrow-ci-target"), "debug/escrow");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const OUT = join(here, "out");
const LINK_SECS = 5;

let tmp, data, server, url, browser, log = "";

function op(...args) {
  return execFileSync(BIN, args, { env: { ...process.env, ESCROW_DATA_DIR: data }, encoding: "utf8" });
}

function cli(partner, user, ...args) {
  return execFileSync(BIN, args, {
    env: {
      ...process.env,
      ESCROW_IDENTITY: join(data, "identities", partner, user),
      ESCROW_SERVER: url,
      ESCROW_DATA_DIR: "",
    },
    encoding: "utf8",
  });
}

/** A fresh sign-in link for `partner`'s `user`, as `escrow console --print` prints it. */
function link(partner, user = "admin") {
  const printed = cli(partner, user, "console", "--print").trim();
  assert.match(printed, /\/login\/[0-9a-f]{64}$/);
  assert.ok(printed.startsWith(url), printed);
  return printed;
}

/** Open a sign-in link and sign in on its page (opening alone signs in nobody). */
async function signIn(page, address) {
  const opened = await page.goto(address);
  await page.getByRole("button", { name: /^Sign in as / }).click();
  await page.waitForURL(`${url}/`);
  return opened;
}

/** `n` companies (the same websites for the same `tag`), status by `status(i)`. */
function csv(n, tag, status = (i) => i % 3) {
  let s = "account_id,company_name,website,status,region\n";
  for (let i = 0; i < n; i++) {
    s += `${tag}-${i},Zyqx${tag}Corp${i},https://www.zyqx${tag}${i}.example,${["customer", "opportunity", "prospect"][status(i)]},${["NA", "EMEA", "APAC"][i % 3]}\n`;
  }
  return s;
}

function populations(partner, dataset) {
  cli(partner, "admin", "population", "add", dataset, "customers", "--filter", "status = 'customer'");
  cli(partner, "admin", "population", "add", dataset, "opportunities", "--filter", "status = 'opportunity'");
}

async function axe(page, name) {
  await page.addScriptTag({ path: AXE });
  const result = await page.evaluate(async () => await window.axe.run(document, {
    resultTypes: ["violations"],
  }));
  const bad = result.violations.filter((v) => v.impact === "critical" || v.impact === "serious");
  assert.deepEqual(bad.map((v) => `${v.id}: ${v.help} (${v.nodes.length})`), [], `axe on ${name}`);
}

async function shot(page, name) {
  await page.screenshot({ path: join(OUT, `${name}.png`), fullPage: true });
}

/** A browser profile of its own: no certificate, no cookies. */
async function fresh(viewport = { width: 1280, height: 800 }) {
  // The server's certificate is from the escrow's own CA, which this profile does not
  // trust; bypassCSP lets axe-core's script in (the console allows scripts of its origin only).
  return browser.newContext({ ignoreHTTPSErrors: true, bypassCSP: true, viewport });
}

before(async () => {
  assert.ok(existsSync(BIN), `no escrow binary at ${BIN} (build it, or set ESCROW_BIN)`);
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM} (apt-get install chromium)`);
  rmSync(OUT, { recursive: true, force: true });
  mkdirSync(OUT, { recursive: true });
  tmp = mkdtempSync(join(tmpdir(), "escrow-console-"));
  data = join(tmp, "data");
  op("init");
  op("partner", "add", "acme");
  op("partner", "add", "globex");
  op("user", "add", "acme", "ann", "--role", "analyst");
  op("user", "add", "globex", "cora", "--role", "compliance");
  server = spawn(BIN, ["serve", "--listen", "127.0.0.1:0", "--console-link-secs", String(LINK_SECS)], {
    env: { ...process.env, ESCROW_DATA_DIR: data, ESCROW_LOG: "info" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  server.stderr.on("data", (d) => { log += d; });
  const first = await new Promise((resolve, reject) => {
    createInterface({ input: server.stdout }).once("line", resolve);
    server.once("exit", (c) => reject(new Error(`escrow serve exited ${c}:\n${log}`)));
  });
  url = first.replace("escrow listening on ", "").trim();
  assert.match(url, /^https:\/\/127\.0\.0\.1:\d+$/, first);
  const file = join(tmp, "acme.csv");
  writeFileSync(file, csv(30, "a"));
  cli("acme", "admin", "upload", file, "--dataset", "accounts", "--key-column", "website");
  // globex's list: the same 900 companies as acme's CRM export below, statuses spread so that
  // every pair of populations holds about 100 of them.
  const theirs = join(tmp, "globex.csv");
  writeFileSync(theirs, csv(900, "m", (i) => Math.floor(i / 3) % 3));
  cli("globex", "admin", "upload", theirs, "--dataset", "accounts", "--key-column", "website");
  populations("globex", "accounts");
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
});

after(async () => {
  await browser?.close();
  // The server records its shutdown in the audit log on SIGTERM: wait for it to exit before
  // removing its directory (removing it while it writes fails the hook with ENOTEMPTY).
  if (server && server.exitCode === null && server.signalCode === null) {
    const exited = new Promise((resolve) => server.once("exit", resolve));
    server.kill("SIGTERM");
    await exited;
  }
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

test("without a session the console asks to sign in and the API gives nothing", async () => {
  const ctx = await fresh();
  const page = await ctx.newPage();
  const r = await page.goto(`${url}/`);
  assert.equal(r.status(), 200);
  await page.getByRole("heading", { name: "Sign in" }).waitFor();
  assert.match(await page.locator("#signin").innerText(), /escrow console/);
  const api = await page.evaluate(async () => {
    const r = await fetch("/v1/datasets");
    return [r.status, (await r.json()).error.code];
  });
  assert.deepEqual(api, [401, "unauthenticated"]);
  await axe(page, "sign-in");
  await shot(page, "signin");
  await ctx.close();
});

test("a sign-in link opens the console; pages work by keyboard; logout ends the session", async () => {
  const ctx = await fresh();
  const page = await ctx.newPage();
  await signIn(page, link("acme"));
  await page.waitForURL(`${url}/`);
  await page.getByText("admin · acme (admin)").waitFor();
  const cookies = await ctx.cookies();
  const session = cookies.find((c) => c.name === "__Host-escrow_session");
  assert.ok(session, JSON.stringify(cookies));
  assert.equal(session.httpOnly, true);
  assert.equal(session.secure, true);
  assert.equal(session.sameSite, "Strict");
  assert.equal(await page.evaluate(() => document.cookie), "", "the session cookie is not readable by scripts");

  // Datasets: the upload made over mutual TLS, as a table.
  await page.goto(`${url}/#datasets`);
  const table = page.getByRole("table", { name: /Your datasets/ });
  await table.waitFor();
  const row = table.getByRole("row", { name: /accounts/ });
  assert.match(await row.innerText(), /accounts\s+1\s+30\s+csv\s+website/);
  await axe(page, "datasets");
  await shot(page, "datasets");

  // Keyboard: the skip link, then the sections.
  await page.keyboard.press("Tab");
  assert.equal(await page.evaluate(() => document.activeElement.textContent), "Skip to content");
  for (let i = 0; i < 6; i++) await page.keyboard.press("Tab");
  assert.equal(await page.evaluate(() => document.activeElement.textContent), "Audit");
  await page.keyboard.press("Enter");
  const audit = page.getByRole("table", { name: /Events you may see/ });
  await audit.waitFor();
  const login = audit.getByRole("row", { name: /console_login/ }).first();
  assert.match(await login.innerText(), /acme\/admin \(console\)\s+ok/);
  await axe(page, "audit");
  await shot(page, "audit");

  // A phone's width: still readable (no horizontal scroll of the page itself).
  await page.setViewportSize({ width: 390, height: 844 });
  await page.goto(`${url}/#datasets`);
  await page.getByRole("table", { name: /Your datasets/ }).waitFor();
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `page wider than the phone by ${overflow}px`);
  await shot(page, "datasets-phone");
  await page.setViewportSize({ width: 1280, height: 800 });

  await page.getByRole("button", { name: "Sign out" }).click();
  await page.getByRole("heading", { name: "Sign in" }).waitFor();
  const after = await page.evaluate(async () => (await fetch("/v1/whoami")).status);
  assert.equal(after, 401);
  await ctx.close();
});

test("a role sees what it may: an analyst is refused the audit log", async () => {
  const ctx = await fresh();
  const page = await ctx.newPage();
  await signIn(page, link("acme", "ann"));
  await page.getByText("ann · acme (analyst)").waitFor();
  await page.goto(`${url}/#audit`);
  const alert = page.getByRole("alert");
  await alert.waitFor();
  assert.match(await alert.innerText(), /role analyst of acme may not audit\.read/);
  await shot(page, "audit-analyst");
  await ctx.close();
});

test("used and expired links are refused", async () => {
  const used = link("globex");
  const ctx = await fresh();
  const page = await ctx.newPage();
  assert.equal((await signIn(page, used)).status(), 200);
  await page.getByText("admin · globex (admin)").waitFor();

  const other = await fresh();
  const second = await other.newPage();
  const again = await second.goto(used);
  assert.equal(again.status(), 403);
  await second.getByRole("heading", { name: "Sign-in link not valid" }).waitFor();
  assert.deepEqual(await other.cookies(), []);
  await axe(second, "link refused");
  await shot(second, "link-refused");

  const late = link("globex");
  await new Promise((r) => setTimeout(r, (LINK_SECS + 1) * 1000));
  const expired = await second.goto(late);
  assert.equal(expired.status(), 403);
  assert.deepEqual(await other.cookies(), []);
  await other.close();
  await ctx.close();
});

test("a cross-site form post changes nothing", async () => {
  // Another site (another origin) with a form that posts a grant to the escrow.
  const evil = createServer((req, res) => {
    res.setHeader("content-type", "text/html");
    res.end(`<!doctype html><html lang="en"><title>evil</title><body>
      <form id="f" method="POST" action="${url}/v1/policies/grants" enctype="text/plain">
      <input name='{"dataset":"accounts","to":"globex","usage":"join","column":"website","x":"' value='"}'>
      </form><script>document.getElementById("f").submit()</script></body></html>`);
  });
  await new Promise((r) => evil.listen(0, "127.0.0.1", r));
  const before = cli("acme", "admin", "policy", "list");
  const ctx = await fresh();
  const page = await ctx.newPage();
  await signIn(page, link("acme"));
  await page.getByText("admin · acme (admin)").waitFor();
  const posted = page.waitForResponse((r) => r.url().endsWith("/v1/policies/grants"));
  await page.goto(`http://127.0.0.1:${evil.address().port}/`);
  const r = await posted;
  assert.ok([401, 403].includes(r.status()), `cross-site post answered ${r.status()}`);
  assert.equal(cli("acme", "admin", "policy", "list"), before);
  // The session itself is still fine.
  await page.goto(`${url}/`);
  await page.getByText("admin · acme (admin)").waitFor();
  evil.close();

  // Login CSRF: another site makes the browser open, then post, another partner's link
  // (globex's own): the browser stays signed in as acme, and the link stays unused.
  const theirs = link("globex");
  const lure = createServer((req, res) => {
    res.setHeader("content-type", "text/html");
    res.end(`<!doctype html><html lang="en"><title>lure</title><body>
      <form id="f" method="POST" action="${theirs}"></form>
      <script>document.getElementById("f").submit()</script></body></html>`);
  });
  await new Promise((r) => lure.listen(0, "127.0.0.1", r));
  const signin = page.waitForResponse((r) => r.url() === theirs);
  await page.goto(`http://127.0.0.1:${lure.address().port}/`);
  assert.equal((await signin).status(), 403, "a cross-site sign-in post is refused");
  await page.goto(theirs);
  await page.getByRole("button", { name: "Sign in as admin · globex" }).waitFor();
  await page.goto(`${url}/`);
  await page.getByText("admin · acme (admin)").waitFor();
  lure.close();
  await ctx.close();
});

test("a compliance officer grants overlap; the other partner uploads in the browser and maps accounts", async () => {
  // globex's compliance officer grants acme the overlap counts of globex's populations.
  const cora = await fresh();
  const page = await cora.newPage();
  await signIn(page, link("globex", "cora"));
  await page.getByText("cora · globex (compliance)").waitFor();
  await page.goto(`${url}/#policies`);
  const form = page.getByRole("form", { name: "Grant a use" });
  await form.waitFor();
  await form.getByLabel("Dataset").selectOption("accounts");
  await form.getByLabel("To partner").fill("acme");
  await form.getByLabel("Use").selectOption("overlap");
  await form.getByRole("button", { name: "Grant" }).click();
  const granted = page.getByRole("table", { name: /you granted/ });
  await granted.getByRole("row", { name: /overlap/ }).waitFor();
  // An invalid change is refused whole, with the reason next to the field.
  await page.getByRole("form", { name: "Grant a use" }).getByLabel("To partner").fill("Not A Partner");
  await page.getByRole("form", { name: "Grant a use" }).getByRole("button", { name: "Grant" }).click();
  await page.getByRole("alert").waitFor();
  const to = page.getByRole("form", { name: "Grant a use" }).getByLabel("To partner");
  assert.equal(await to.getAttribute("aria-invalid"), "true", "the reason sits with the field");
  assert.match(await page.locator(`#${await to.getAttribute("aria-describedby")}`).innerText(), /not a valid name/);
  assert.equal(await granted.getByRole("row").count(), 2, "nothing else was granted");
  await axe(page, "policies");
  await shot(page, "policies");
  await cora.close();
  assert.match(cli("acme", "admin", "policy", "list"), /overlap/);

  // acme's admin uploads its CRM export in the browser, with a progress bar.
  const ctx = await fresh();
  const mine = await ctx.newPage();
  await signIn(mine, link("acme"));
  await mine.getByText("admin · acme (admin)").waitFor();
  await mine.goto(`${url}/#datasets`);
  const file = join(tmp, "crm.csv");
  writeFileSync(file, csv(900, "m"));
  const upload = mine.getByRole("form", { name: "Upload" });
  await upload.getByLabel(/^File/).setInputFiles(file);
  await upload.getByLabel("Dataset name").fill("crm");
  await upload.getByRole("button", { name: "Upload" }).click();
  await mine.getByText("Uploaded crm version 1: 900 rows sealed.").waitFor();
  await mine.getByRole("table", { name: /Your datasets/ }).getByRole("row", { name: /crm/ }).waitFor();
  await shot(mine, "datasets-uploaded");
  // Its versions: a table and a chart of how its rows matched, as `escrow datasets versions` says.
  await mine.getByRole("button", { name: "Versions of crm" }).click();
  const versions = mine.getByRole("table", { name: /Every version of crm/ });
  await versions.waitFor();
  const told = JSON.parse(cli("acme", "admin", "datasets", "versions", "crm", "--format", "json")).versions;
  const cells = await versions.locator("tbody tr td").allInnerTexts();
  assert.equal(cells[3], String(told[0].rows));
  assert.ok(told[0].matching && told[0].matching.by_domain > 0, JSON.stringify(told));
  assert.deepEqual(cells.slice(6, 9), ["by_domain", "by_name", "unmatched"].map((k) => String(told[0].matching[k])));
  await mine.getByRole("img", { name: /Rows of each version of crm/ }).waitFor();
  await axe(mine, "dataset versions");
  await shot(mine, "dataset-versions");
  populations("acme", "crm");

  // The account mapping: a heatmap, the same counts as `escrow overlap`.
  await mine.goto(`${url}/#mapping`);
  const ask = mine.getByRole("form", { name: "Overlap question" });
  await ask.waitFor();
  await ask.getByLabel("Partner").selectOption("globex");
  await ask.getByLabel("Your dataset (optional)").fill("crm");
  await ask.getByRole("button", { name: "Show overlap" }).click();
  const heat = mine.getByRole("table", { name: /Companies in both lists/ });
  await heat.waitFor();
  const shown = await heat.locator("tbody tr").evaluateAll((rows) => rows.map((r) =>
    [r.querySelector("th").textContent, ...[...r.querySelectorAll("td")].map((d) => d.textContent)]));
  const cli_answer = JSON.parse(cli("acme", "admin", "overlap", "--with", "globex", "--mine", "crm", "--format", "json"));
  assert.equal(cli_answer.repeated, true, "the CLI asked the same question: answered again, free");
  const expected = cli_answer.populations.mine.map((m) => [m, ...cli_answer.populations.theirs.map((t) => {
    const c = cli_answer.rows.find((r) => r.mine === m && r.theirs === t);
    return c.suppressed ? "withheld" : String(c.count);
  })]);
  assert.deepEqual(shown, expected);
  assert.ok(shown.flat().some((v) => /^\d+$/.test(v)), `no released cell: ${JSON.stringify(shown)}`);
  await mine.getByText(/Budget on globex\.accounts/).waitFor();
  // Below it, the overlap over dataset versions: the counts released before, as `escrow report history` lists them.
  const hist = JSON.parse(cli("acme", "admin", "report", "history", "--with", "globex", "--format", "json"));
  assert.equal(hist.released.length, 1, JSON.stringify(hist));
  const [release] = hist.released;
  const first = release.cells[0];
  const past = mine.getByRole("table", { name: `Released counts of ${first.mine} \u00d7 ${first.theirs}, oldest first` });
  await past.waitFor();
  const pastRows = await past.locator("tbody tr").evaluateAll((rows) => rows.map((r) => [...r.querySelectorAll("td")].map((d) => d.textContent)));
  assert.deepEqual(pastRows, [[release.released_at.replace("T", " ").replace(/(\.\d+)?Z$/, " UTC"), release.mine, release.theirs, first.count === null ? "withheld" : String(first.count)]]);
  await mine.getByRole("img", { name: /by versions \(line chart/ }).waitFor();
  // The co-selling report from the same overlap (free), as `escrow report co-selling` gives it.
  const co = mine.getByRole("form", { name: "Co-selling report" });
  await co.getByLabel("Partner").selectOption("globex");
  await co.getByLabel("Your dataset (optional)").fill("crm");
  await co.getByRole("button", { name: "Show co-selling report" }).click();
  const intro = mine.getByRole("table", { name: /^Your customers among their open opportunities/ });
  await intro.waitFor();
  const report = JSON.parse(cli("acme", "admin", "report", "co-selling", "--with", "globex", "--mine", "crm", "--format", "json"));
  assert.equal(report.repeated, true, "the same overlap underneath: free");
  for (const [i, name] of [[0, /^Your customers among their open opportunities/], [1, /^Your open opportunities among their customers/]]) {
    const shownCells = await mine.getByRole("table", { name }).locator("tbody td").allTextContents();
    const cell = report.sections[i].rows[0];
    assert.deepEqual(shownCells, [cell.suppressed ? "withheld" : String(cell.count)], JSON.stringify(report.sections[i]));
  }
  await axe(mine, "account mapping");
  await shot(mine, "mapping");

  // Partners: what each side shares.
  await mine.goto(`${url}/#partners`);
  await mine.getByRole("table", { name: "What globex shares with you" }).waitFor();
  await axe(mine, "partners");
  await shot(mine, "partners");

  // The audit page shows the browser's actions as the console's.
  await mine.goto(`${url}/#audit`);
  const audit = mine.getByRole("table", { name: /Events you may see/ });
  await audit.waitFor();
  const rows = await audit.locator("tbody tr").allInnerTexts();
  for (const kind of ["upload", "overlap"]) {
    assert.ok(rows.some((r) => r.split("\t")[2] === kind && r.includes("acme/admin (console)")),
      `no ${kind} from the console in:\n${rows.join("\n")}`);
  }
  await ctx.close();
});

test("an analyst is refused the policy editor's changes", async () => {
  const ctx = await fresh();
  const page = await ctx.newPage();
  await signIn(page, link("acme", "ann"));
  await page.getByText("ann · acme (analyst)").waitFor();
  await page.goto(`${url}/#policies`);
  const form = page.getByRole("form", { name: "Grant a use" });
  await form.getByLabel("To partner").fill("globex");
  await form.getByRole("button", { name: "Grant" }).click();
  const alert = page.getByRole("alert");
  await alert.waitFor();
  assert.match(await alert.innerText(), /role analyst of acme may not policy\.change/);
  await ctx.close();
});

test("questions: explain before running, answers as a table and a chart", async () => {
  const ctx = await fresh();
  const page = await ctx.newPage();
  await signIn(page, link("acme"));
  await page.getByText("admin · acme (admin)").waitFor();
  await page.goto(`${url}/#questions`);
  const form = page.getByRole("form", { name: "Question" });
  const sql = form.getByLabel(/^SQL/);
  await sql.fill("SELECT status, COUNT(DISTINCT website) AS companies FROM acme.crm GROUP BY status ORDER BY status");
  await form.getByRole("button", { name: "Explain" }).click();
  await page.getByText("Allowed: every use is granted.").waitFor();
  await page.getByRole("table", { name: /Uses of each column/ }).getByRole("row", { name: /status/ }).first().waitFor();
  await form.getByRole("button", { name: "Run" }).click();
  const answer = page.getByRole("table", { name: /Answer \(your own data only: exact\)/ });
  await answer.waitFor();
  const rows = await answer.locator("tbody tr").allInnerTexts();
  assert.deepEqual(rows.map((r) => r.split("\t")), [["customer", "300"], ["opportunity", "300"], ["prospect", "300"]]);
  await page.getByRole("img", { name: /companies by status/ }).waitFor();
  await axe(page, "questions");
  await shot(page, "questions");
  // A question the gate refuses says why, next to the SQL.
  await sql.fill("SELECT * FROM acme.crm");
  await form.getByRole("button", { name: "Run" }).click();
  const alert = page.getByRole("alert");
  await alert.waitFor();
  assert.equal(await sql.getAttribute("aria-invalid"), "true");
  assert.match(await alert.innerText(), /refused|aggregate/i);
  await ctx.close();
});

test("audit: filters, chain verification and export", async () => {
  const ctx = await fresh();
  const page = await ctx.newPage();
  await signIn(page, link("acme"));
  await page.getByText("admin · acme (admin)").waitFor();
  await page.goto(`${url}/#audit`);
  await page.getByText(/^Chain verified: \d+ records/).waitFor();
  const form = page.getByRole("form", { name: "Filter the audit log" });
  await form.getByLabel("Action").fill("console_login");
  await form.getByRole("button", { name: "Filter" }).click();
  const list = page.getByRole("table", { name: /Events you may see/ });
  // Wait for the filtered list itself: at least the sign-ins so far, and nothing else (an
  // empty or half-drawn table in between would pass an unguarded check).
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll("table")]
      .filter((t) => (t.caption ? t.caption.textContent : "").startsWith("Events you may see"))
      .flatMap((t) => [...t.querySelectorAll("tbody tr")]);
    return rows.length >= 3 && rows.every((r) => r.children[2] && r.children[2].textContent === "console_login");
  });
  const kinds = (await list.locator("tbody tr").allInnerTexts()).map((r) => r.split("\t")[2]);
  assert.ok(kinds.length >= 3, kinds.join());
  assert.deepEqual([...new Set(kinds)], ["console_login"]);
  await axe(page, "audit filtered");
  await shot(page, "audit-filtered");
  const download = page.waitForEvent("download");
  await form.getByRole("button", { name: "Export the chain" }).click();
  const file = join(tmp, "audit.jsonl");
  await (await download).saveAs(file);
  // The export verifies with the CLI, offline, as a partner would check it.
  const verified = execFileSync(BIN, ["audit", "verify", "--file", file], { encoding: "utf8" });
  assert.match(verified, /intact: \d+ records/);
  await ctx.close();
});

test("policy history: diffs, and a rollback by the compliance officer", async () => {
  const ctx = await fresh();
  const page = await ctx.newPage();
  await signIn(page, link("globex", "cora"));
  await page.getByText("cora · globex (compliance)").waitFor();
  await page.goto(`${url}/#policies`);
  const history = page.getByRole("table", { name: "Policy versions, newest first" });
  await history.waitFor();
  const newest = history.locator("tbody tr").first();
  assert.match(await newest.innerText(), /\+ p,acme,globex,accounts,\*,overlap/);
  const previous = Number((await history.locator("tbody tr").nth(1).locator("td").first().innerText()).trim());
  await axe(page, "policies history");
  await history.getByRole("button", { name: `Roll back to ${previous}` }).click();
  await page.getByRole("table", { name: "Policy versions, newest first" }).locator("tbody tr").first().getByText(/- p,acme,globex,accounts,\*,overlap/).waitFor();
  assert.doesNotMatch(cli("acme", "admin", "policy", "list"), /overlap/);
  await ctx.close();
});

test("users: an admin adds and revokes a user of its partner; others may not", async () => {
  const ctx = await fresh();
  const page = await ctx.newPage();
  await signIn(page, link("acme"));
  await page.getByText("admin · acme (admin)").waitFor();
  // A user is added with a certificate (the answer holds a private key), never by a session.
  const status = await page.evaluate(async () => {
    const { csrf } = await (await fetch("/v1/console/session")).json();
    const r = await fetch("/v1/users", { method: "POST", body: JSON.stringify({ name: "eve", role: "admin" }),
      headers: { "content-type": "application/json", "x-csrf-token": csrf } });
    return r.status;
  });
  assert.equal(status, 403, "a console session may not add a user");
  cli("acme", "admin", "user", "add", "acme", "bob", "--role", "uploader",
    "--identity", join(data, "identities", "acme", "admin"), "--data-dir", data, "--out", join(tmp, "bob-bundle"));
  await page.goto(`${url}/#users`);
  await page.getByText(/escrow user add acme NAME/).waitFor();
  const users = page.getByRole("table", { name: /Users of acme/ });
  assert.match(await users.getByRole("row", { name: /bob/ }).innerText(), /bob\s+uploader/);
  await axe(page, "users");
  await shot(page, "users");
  await users.getByRole("button", { name: "Revoke bob" }).click();
  await page.getByRole("table", { name: /Users of acme/ }).getByRole("row", { name: /bob/ }).waitFor({ state: "detached" });
  assert.match(cli("acme", "admin", "whoami"), /acme/);
  await ctx.close();

  const analyst = await fresh();
  const other = await analyst.newPage();
  await signIn(other, link("acme", "ann"));
  await other.getByText("ann · acme (analyst)").waitFor();
  await other.goto(`${url}/#users`);
  assert.match(await other.getByRole("alert").innerText(), /may not user\.manage/);
  await analyst.close();
});

// ---- Policies page: protection settings, populations, explain, preview (issue 19) ----------

/** The policies page of `partner`'s `user`, signed in, in a fresh profile. */
async function policiesPage(partner, user, viewport) {
  const ctx = await fresh(viewport);
  const page = await ctx.newPage();
  await signIn(page, link(partner, user));
  await page.getByText(new RegExp(`^${user} · ${partner} `)).waitFor();
  await page.goto(`${url}/#policies`);
  await page.getByRole("heading", { name: "History" }).waitFor(); // the page's last part: all of it is there
  return [ctx, page];
}

/** The error message a control's aria-describedby points to (it must be marked invalid). */
async function errorOf(page, control) {
  assert.equal(await control.getAttribute("aria-invalid"), "true", "the reason sits with its field");
  const msg = page.locator(`#${await control.getAttribute("aria-describedby")}`);
  assert.equal(await msg.getAttribute("role"), "alert");
  return msg.innerText();
}

test("protection settings: a compliance officer changes them; a refused change says why by its field and changes nothing", async () => {
  // globex's deals, with a numeric column to bound.
  const file = join(tmp, "deals.csv");
  let rows = "website,stage,arr_usd\n";
  for (let i = 0; i < 40; i++) rows += `https://www.zyqxd${i}.example,${i % 2 ? "won" : "open"},${i * 1000}\n`;
  writeFileSync(file, rows);
  cli("globex", "admin", "upload", file, "--dataset", "deals", "--key-column", "website");
  const protection = (d) => cli("globex", "admin", "policy", "preview", "--partner", "acme", "--dataset", d)
    .split("\n").find((l) => l.includes("protection:"));

  const [ctx, page] = await policiesPage("globex", "cora");
  const now = page.getByRole("table", { name: "Protection of your datasets now" });
  const row = (d) => now.getByRole("row", { name: new RegExp(`^${d} `) });
  assert.match(await row("accounts").innerText(), /^accounts\s+0\.125\s+0\.4\s+5\s+1\s+none$/, "the defaults");
  const form = page.getByRole("form", { name: "Change protection settings" });
  await form.getByLabel("Dataset").selectOption("accounts");
  assert.equal(await form.getByLabel("Epsilon per question").inputValue(), "0.125", "the form starts from the settings in force");
  await form.getByLabel("Epsilon per question").fill("0.25");
  await form.getByLabel(/^Budget/).fill("1");
  await form.getByRole("button", { name: "Save settings" }).click();
  await page.getByRole("status").filter({ hasText: "Saved the protection of accounts." }).waitFor();
  assert.match(await row("accounts").innerText(), /^accounts\s+0\.25\s+1\s+5\s+1\s+none$/);
  assert.match(protection("accounts"), /min_entities=5 epsilon=0\.25 max_groups_per_entity=1; budget 1\.0 /);

  // Refused whole: the budget typed with it does not apply either.
  await form.getByLabel("Dataset").selectOption("accounts");
  await form.getByLabel(/^Budget/).fill("2");
  await form.getByLabel("Epsilon per question").fill("0.0005");
  await form.getByRole("button", { name: "Save settings" }).click();
  await page.getByRole("alert").waitFor();
  assert.match(await errorOf(page, form.getByLabel("Epsilon per question")), /epsilon must be a multiple of 0\.001/);
  assert.equal(await form.getByLabel(/^Budget/).getAttribute("aria-invalid"), null);
  assert.match(protection("accounts"), /epsilon=0\.25 max_groups_per_entity=1; budget 1\.0 /, "nothing changed");
  assert.match(await row("accounts").innerText(), /^accounts\s+0\.25\s+1\s+5\s+1\s+none$/);

  // Bounds: only numeric columns are offered; low >= high is refused by the lowest value.
  await form.getByLabel("Dataset").selectOption("deals");
  assert.deepEqual(await form.getByLabel("Bounds of column").locator("option").allInnerTexts(), ["(none)", "arr_usd"]);
  await form.getByLabel("Bounds of column").selectOption("arr_usd");
  await form.getByLabel("Lowest value").fill("5");
  await form.getByLabel("Highest value").fill("1");
  await form.getByRole("button", { name: "Save settings" }).click();
  await page.getByRole("alert").filter({ hasText: /low < high/ }).waitFor();
  assert.match(await errorOf(page, form.getByLabel("Lowest value")), /bounds of arr_usd must have low < high/);
  assert.doesNotMatch(cli("globex", "admin", "policy", "export"), /^bounds,/m);
  await form.getByLabel("Lowest value").fill("0");
  await form.getByLabel("Highest value").fill("1000000");
  await form.getByRole("button", { name: "Save settings" }).click();
  await page.getByRole("status").filter({ hasText: "Saved the protection of deals." }).waitFor();
  assert.match(await row("deals").innerText(), /arr_usd: 0 to 1000000/);
  assert.match(cli("globex", "admin", "policy", "export"), /^bounds,globex,deals,arr_usd,0,1000000$/m);
  assert.equal(await form.getByLabel("Dataset").inputValue(), "accounts");
  await axe(page, "policies settings");
  await shot(page, "policies-settings");
  await now.getByRole("button", { name: "Remove the bounds of arr_usd of deals" }).click();
  await row("deals").getByText("none").waitFor();
  assert.doesNotMatch(cli("globex", "admin", "policy", "export"), /^bounds,/m);
  await ctx.close();
});

test("an analyst may not change protection settings: the server refuses and the page says so", async () => {
  const [ctx, page] = await policiesPage("acme", "ann");
  const form = page.getByRole("form", { name: "Change protection settings" });
  await form.getByLabel("Dataset").selectOption("accounts");
  await form.getByLabel("Epsilon per question").fill("0.5");
  await form.getByRole("button", { name: "Save settings" }).click();
  const alert = form.getByRole("alert");
  await alert.waitFor();
  assert.match(await alert.innerText(), /role analyst of acme may not policy\.change/);
  assert.match(cli("acme", "admin", "policy", "preview", "--partner", "globex", "--dataset", "accounts"), /epsilon=0\.125 /);
  await ctx.close();
});

test("populations: a compliance officer defines one and removes it after confirming", async () => {
  const listed = () => cli("globex", "cora", "population", "list");
  const [ctx, page] = await policiesPage("globex", "cora");
  const form = page.getByRole("form", { name: "Define a population" });
  await form.getByLabel("Dataset").selectOption("accounts");
  await form.getByLabel("Name").fill("prospects");
  // A population may not single companies out by their key.
  await form.getByLabel(/^Filter/).fill("website = 'https://www.zyqxm1.example'");
  await form.getByRole("button", { name: "Define" }).click();
  await page.getByRole("alert").waitFor();
  assert.match(await errorOf(page, form.getByLabel(/^Filter/)), /website identifies companies/);
  assert.doesNotMatch(listed(), /prospects/);
  await form.getByLabel(/^Filter/).fill("status = 'prospect'");
  await form.getByRole("button", { name: "Define" }).click();
  await page.getByRole("status").filter({ hasText: "Defined prospects of accounts." }).waitFor();
  const pops = page.getByRole("table", { name: "Populations of your datasets" });
  assert.match(await pops.getByRole("row", { name: /prospects/ }).innerText(), /^accounts\s+3\s+prospects\s+status = 'prospect'/);
  assert.match(listed(), /^accounts\.prospects {2}where status = 'prospect'$/m);

  // Removing asks first; Cancel keeps it.
  await pops.getByRole("button", { name: "Remove population prospects of accounts" }).click();
  const dialog = page.getByRole("dialog", { name: "Remove population prospects of accounts?" });
  await dialog.waitFor();
  assert.equal(await page.evaluate(() => document.activeElement.textContent), "Cancel", "focus starts on the safe choice");
  await axe(page, "population removal dialog");
  await shot(page, "policies-population-remove");
  await page.keyboard.press("Enter");
  await dialog.waitFor({ state: "detached" });
  assert.match(listed(), /prospects/);
  await pops.getByRole("button", { name: "Remove population prospects of accounts" }).click();
  await dialog.getByRole("button", { name: "Remove population" }).click();
  await pops.getByRole("row", { name: /prospects/ }).waitFor({ state: "detached" });
  assert.doesNotMatch(listed(), /prospects/);
  assert.match(listed(), /accounts\.customers/);
  await ctx.close();
});

test("explain a pasted question: SQL and overlap questions, allowed and refused, as the CLI explains them", async () => {
  const [ctx, page] = await policiesPage("acme", "admin");
  const sqlForm = page.getByRole("form", { name: "Explain a SQL question" });
  const sqlOut = page.getByRole("region", { name: "Explanation of the SQL question" });
  const overlapOut = page.getByRole("region", { name: "Explanation of the overlap question" });
  /** The decision `out` shows, once it says `text`. */
  const decision = async (out, text) => {
    const d = out.locator(".decision").filter({ hasText: text });
    await d.waitFor();
    return d.innerText();
  };
  const sql = "SELECT status, COUNT(DISTINCT website) AS companies FROM acme.crm GROUP BY status";
  await sqlForm.getByLabel("SQL question").fill(sql);
  await sqlForm.getByRole("button", { name: "Explain SQL" }).click();
  await decision(sqlOut, "Allowed: every use is granted.");
  assert.match(cli("acme", "admin", "policy", "explain", sql), /^allowed$/m);
  const uses = sqlOut.getByRole("table", { name: /Uses of each column/ });
  assert.match(await uses.getByRole("row", { name: /status/ }).innerText(), /^acme\.crm\.status\s+dimension\s+your own data/);
  assert.match(await sqlOut.getByText(/^Reads: /).innerText(), /^Reads: acme\.crm@v1$/);

  // Refused by the gate, and for want of a grant: the rule and its message, as the CLI says.
  for (const refused of ["SELECT * FROM acme.crm",
    "SELECT g.status, COUNT(DISTINCT c.website) AS n FROM acme.crm c JOIN globex.accounts g ON c.website = g.website GROUP BY g.status"]) {
    await sqlForm.getByLabel("SQL question").fill(refused);
    await sqlForm.getByRole("button", { name: "Explain SQL" }).click();
    const said = cli("acme", "admin", "policy", "explain", refused).split("\n")[0];
    const [, rule, message] = said.match(/^refused by rule (\w+): (.*)$/);
    assert.equal(await decision(sqlOut, `Refused by rule ${rule}: `), `Refused by rule ${rule}: ${message}`);
  }

  // An overlap question: refused while globex shares no overlap counts, allowed once it does.
  const overlap = page.getByRole("form", { name: "Explain an overlap question" });
  await overlap.getByLabel("Partner").fill("globex");
  await overlap.getByLabel("Your dataset (optional)").fill("crm");
  await overlap.getByRole("button", { name: "Explain overlap" }).click();
  await decision(overlapOut, "Refused by rule usage_not_granted");
  cli("globex", "admin", "policy", "grant", "accounts", "--to", "acme", "--usage", "overlap");
  await overlap.getByRole("button", { name: "Explain overlap" }).click();
  assert.equal(await decision(overlapOut, "Allowed"), "Allowed: every use is granted.");
  const pops = overlapOut.getByRole("table", { name: /Uses of each column or population/ });
  assert.match(await pops.getByRole("row", { name: /customers/ }).innerText(),
    /^population customers of globex\.accounts\s+overlap\s+granted\s+p,acme,globex,accounts,\*,overlap$/);
  // The strictest settings of both datasets, as the CLI says.
  const [, k, eps, l, from] = cli("acme", "admin", "policy", "explain", "--with", "globex", "--mine", "crm")
    .match(/^protection: min_entities=(\d+) epsilon=([\d.]+) max_groups_per_entity=(\d+) \(settings of (.*)\)$/m);
  assert.equal(await overlapOut.getByText(/^Protection: /).innerText(),
    `Protection: rows need at least ${k} companies, ε ${eps} per question, at most ${l} group per company (settings of ${from}).`);
  await axe(page, "policies explain");
  await shot(page, "policies-explain");
  await ctx.close();
});

test("preview what a partner can learn: grants, populations, protection and the guarantee in plain words", async () => {
  const [ctx, page] = await policiesPage("globex", "cora");
  const form = page.getByRole("form", { name: "Preview a partner" });
  // The partners granted to are offered.
  assert.deepEqual(await page.locator("#known-partners option").evaluateAll((o) => o.map((x) => x.value)), ["acme"]);
  await form.getByLabel("Partner").fill("nobody");
  await form.getByRole("button", { name: "Preview" }).click();
  await page.getByRole("alert").waitFor();
  assert.match(await errorOf(page, form.getByLabel("Partner")), /no partner named nobody/);

  await form.getByLabel("Partner").fill("acme");
  await form.getByLabel("Dataset").selectOption("accounts");
  await form.getByRole("button", { name: "Preview" }).click();
  await page.getByRole("heading", { name: "globex.accounts (version 1)" }).waitFor();
  assert.equal(await form.getByLabel("Partner").getAttribute("aria-invalid"), null, "the old refusal is gone");
  const printed = cli("globex", "cora", "policy", "preview", "--partner", "acme", "--dataset", "accounts");
  const guarantee = printed.match(/^ {2}guarantee: (.*)$/m)[1];
  assert.match(guarantee, /right at most 75\.0% of the time/, "budget 1, set in the settings test");
  const shown = page.locator(".guarantee");
  assert.equal(await shown.innerText(), `What the budget guarantees: ${guarantee}.`);
  await page.getByText("acme can name it in queries.").waitFor();
  const pops = page.getByRole("table", { name: /Populations of globex\.accounts/ });
  assert.match(await pops.getByRole("row", { name: /customers/ }).innerText(), /^customers\s+visible\s+p,acme,globex,accounts,\*,overlap$/);
  await page.getByText(/^acme has spent [\d.]+ of its budget of 1 on your data/).waitFor();
  await axe(page, "policies preview");
  await shot(page, "policies-preview");

  // A phone's width: every part readable, no sideways scrolling of the page.
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `policies page wider than the phone by ${overflow}px`);
  await shot(page, "policies-phone");
  await ctx.close();
});
