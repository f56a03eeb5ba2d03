// Drives Debian's Chromium with playwright-core for the Python tests (tests/collector/chromium.py).
// One JSON command per stdin line, one JSON answer per stdout line: {id, value} or {id, error}.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

// axe-core (npm), run inside a page for the console's accessibility checks.
const AXE = readFileSync(createRequire(import.meta.url).resolve("axe-core/axe.min.js"), "utf8");

const browser = await chromium.launch({
  executablePath: process.env.CDP_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    // Sites on subdomains (cookie domain tests) without a DNS server: all on this machine.
    "--host-resolver-rules=MAP *.cdp.test 127.0.0.1",
  ],
});
const contexts = new Map();
const pages = new Map();
let next = 0;
const log = [];
// Every request a page made, as "<status or failed> <method> <url>" once it ended, to show
// what left for where and how it was answered.
const requests = new Map();

const ops = {
  // A new visitor: its own cookies and storage.
  async context() {
    const id = `c${next++}`;
    contexts.set(id, await browser.newContext());
    return id;
  },
  async page({ context }) {
    const id = `p${next++}`;
    const page = await contexts.get(context).newPage();
    page.on("console", (m) => {
      const where = m.location().url; // which request, for the browser's own failed-load lines
      log.push(`[${id}] ${m.type()}: ${m.text()}${where ? ` <${where}>` : ""}`);
    });
    page.on("pageerror", (e) => log.push(`[${id}] pageerror: ${e.message}`));
    requests.set(id, []);
    const ended = (status, r) => requests.get(id).push(`${status} ${r.method()} ${r.url()}`);
    page.on("response", (r) => ended(r.status(), r.request()));
    page.on("requestfailed", (r) => ended("failed", r));
    pages.set(id, page);
    return id;
  },
  async goto({ page, url, referer }) {
    await pages.get(page).goto(url, { waitUntil: "load", referer });
    return pages.get(page).url();
  },
  async reload({ page }) {
    await pages.get(page).reload({ waitUntil: "load" });
    return true;
  },
  // An expression evaluated in the page (a promise is awaited).
  async eval({ page, expression }) {
    return await pages.get(page).evaluate(expression);
  },
  // Closing the tab as a visitor would: unload handlers (pagehide) run.
  async close({ page }) {
    await pages.get(page).close({ runBeforeUnload: true });
    pages.delete(page);
    return true;
  },
  // As a user does it: wait for the element, then click / type into it / pick an option.
  async click({ page, selector }) {
    await pages.get(page).locator(selector).click();
    return true;
  },
  async fill({ page, selector, value }) {
    await pages.get(page).locator(selector).fill(value);
    return true;
  },
  async select({ page, selector, value }) {
    await pages.get(page).locator(selector).selectOption(value);
    return true;
  },
  async press({ page, key }) {
    await pages.get(page).keyboard.press(key);
    return true;
  },
  // The text of the first element matching, once it is visible (or only in the document:
  // state "attached") and holds ``text``, if given.
  async text({ page, selector, text, timeout, state }) {
    const found = pages.get(page).locator(selector, text ? { hasText: text } : {}).first();
    await found.waitFor({ state: state || "visible", timeout: timeout || 15000 });
    return await found.textContent();
  },
  async screenshot({ page, path }) {
    await pages.get(page).screenshot({ path, fullPage: true });
    return path;
  },
  // axe-core's violations of the given rule tags on the page as it is now.
  async axe({ page, tags }) {
    const p = pages.get(page);
    if (!(await p.evaluate("typeof window.axe === 'object'"))) await p.evaluate(AXE);
    const result = await p.evaluate((only) => window.axe.run(document, { runOnly: only }), tags);
    return result.violations.map((v) => ({
      id: v.id,
      help: v.help,
      nodes: v.nodes.map((n) => n.target.join(" ")),
    }));
  },
  async cookies({ context }) {
    return await contexts.get(context).cookies();
  },
  async log() {
    return log.splice(0);
  },
  // The requests the page made since it opened (a reload and navigations included).
  async requests({ page }) {
    return requests.get(page);
  },
  async version() {
    return browser.version();
  },
};

const send = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
send({ id: 0, value: "ready" });
for await (const line of createInterface({ input: process.stdin })) {
  const { id, op, ...args } = JSON.parse(line);
  try {
    send({ id, value: (await ops[op](args)) ?? null });
  } catch (e) {
    send({ id, error: String((e && e.stack) || e) });
  }
}
await browser.close();
