// The cdp-stream console: a client of the JSON API, nothing more (see console/__init__.py).
// The API token is kept in this tab's sessionStorage and sent as a Bearer header; it never
// goes into a URL. Every piece of data is put into the page as text (never as HTML).
"use strict";

const TOKEN = "cdp_console_token";
const SVG = "http://www.w3.org/2000/svg";
const main = document.getElementById("main");

// --- small helpers -------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const when = (iso) => (iso ? new Date(iso).toLocaleString() : "—");
const short = (id) => String(id).slice(0, 8);
const shown = (v) => (typeof v === "string" ? v : JSON.stringify(v));
const clip = (text, n) => (text.length > n ? text.slice(0, n - 1) + "…" : text);

class ApiError extends Error {
  constructor(status, body) {
    const detail = body && body.detail;
    super(typeof detail === "string" ? detail : (body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, body) {
  const headers = { authorization: `Bearer ${sessionStorage.getItem(TOKEN) || ""}` };
  if (body !== undefined) headers["content-type"] = "application/json";
  const r = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  const data = r.status === 204 ? null : await r.json().catch(() => null);
  if (r.status === 401) {
    sessionStorage.removeItem(TOKEN);
    route();
  }
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}
const get = (path) => api("GET", path);
const ref = (text) => encodeURIComponent(text);

function table(headers, rows, caption) {
  return h(
    "table",
    {},
    caption ? h("caption", { class: "muted" }, caption) : null,
    h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col", class: t.num ? "num" : null }, t.num ? t.text : t)))),
    h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c) => (c instanceof Node && c.tagName === "TD" ? c : h("td", {}, c)))))),
  );
}
const num = (n) => h("td", { class: "num" }, n === null || n === undefined ? "—" : Number(n).toLocaleString());

function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function page(title, ...content) {
  main.replaceChildren(h("h1", { tabindex: "-1" }, title), ...content);
  document.title = `${title} · cdp-stream console`;
  main.querySelector("h1").focus();
}

function failure(err) {
  return h("p", { class: "error", role: "alert" }, err instanceof ApiError ? `${err.status}: ${err.message}` : String(err));
}

// --- routing -------------------------------------------------------------------------

const routes = [
  [/^#\/find$/, findPage],
  [/^#\/person\/(.+)$/, personPage],
  [/^#\/audiences$/, audiencesPage],
  [/^#\/audiences\/new$/, () => audienceForm(null)],
  [/^#\/audiences\/([0-9a-f-]{36})$/, audiencePage],
  [/^#\/dmp$/, dmpPage],
  [/^#\/health$/, healthPage],
];

let polling = null;

async function route() {
  if (polling) clearTimeout(polling);
  polling = null;
  const nav = document.getElementById("nav");
  if (!sessionStorage.getItem(TOKEN)) {
    nav.hidden = true;
    return loginPage();
  }
  nav.hidden = false;
  const hash = location.hash || "#/find";
  for (const a of nav.querySelectorAll("a")) {
    const here = hash.startsWith(a.getAttribute("href")) || (hash.startsWith("#/person") && a.getAttribute("href") === "#/find");
    if (here) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  for (const [pattern, render] of routes) {
    const m = hash.match(pattern);
    if (m) {
      try {
        await render(...m.slice(1).map(decodeURIComponent));
      } catch (err) {
        page("Something went wrong", failure(err));
      }
      return;
    }
  }
  location.hash = "#/find";
}

window.addEventListener("hashchange", route);
document.getElementById("signout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN);
  location.hash = "#/find";
  route();
});

// --- sign in ---------------------------------------------------------------------------

function loginPage() {
  const input = h("input", { id: "token", type: "password", autocomplete: "off", required: true, size: 40 });
  const message = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    {
      onsubmit: async (e) => {
        e.preventDefault();
        sessionStorage.setItem(TOKEN, input.value.trim());
        try {
          await get("/v1/audiences"); // any read: does the token work?
          route();
        } catch (err) {
          sessionStorage.removeItem(TOKEN);
          message.replaceChildren(failure(err));
        }
      },
    },
    h("label", { for: "token" }, "API token"),
    input,
    " ",
    h("button", { type: "submit" }, "Sign in"),
    message,
  );
  page(
    "Sign in",
    h("p", {}, "Sign in with an API token (scope profiles:read; profiles:write to unmerge, profiles:delete to delete, audiences:write to define audiences). It is kept in this browser tab only, until you sign out or close the tab."),
    form,
  );
}

// --- find a person -----------------------------------------------------------------------

// What the box holds, as the API's ref: "type:value", a profile id, or an email as typed.
function asRef(text) {
  const t = text.trim();
  if (/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(t) || /^[a-z_]+:/i.test(t)) return t;
  if (t.includes("@")) return `email:${t}`;
  if (/^\+?[0-9 ()-]{6,}$/.test(t)) return `phone:${t}`;
  return `user_id:${t}`;
}

function findPage() {
  const input = h("input", { id: "who", type: "search", autocomplete: "off", size: 48, "aria-describedby": "who-help" });
  const matches = h("ul", { class: "matches", "aria-label": "Matching identifiers" });
  const message = h("div", { "aria-live": "polite" });
  let timer = null;
  let asked = 0; // only the answer to the latest keystroke is shown
  input.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const r = asRef(input.value);
      const colon = r.indexOf(":");
      const [type, prefix] = [r.slice(0, colon), r.slice(colon + 1)];
      if (colon < 1 || prefix.length < 2) return matches.replaceChildren();
      const mine = ++asked;
      try {
        const found = await get(`/v1/profiles?starts_with=${ref(`${type}:${prefix}`)}&limit=8`);
        if (mine !== asked) return;
        matches.replaceChildren(
          ...found.map((m) => h("li", {}, h("a", { href: `#/person/${m.profile_id}` }, `${m.type}:${m.value}`))),
        );
      } catch {
        matches.replaceChildren();
      }
    }, 200);
  });
  const form = h(
    "form",
    {
      role: "search",
      onsubmit: async (e) => {
        e.preventDefault();
        try {
          const profile = await get(`/v1/profiles/${ref(asRef(input.value))}`);
          location.hash = `#/person/${profile.id}`;
        } catch (err) {
          message.replaceChildren(err.status === 404 ? h("p", { class: "error", role: "alert" }, `No person found for ${asRef(input.value)}`) : failure(err));
        }
      },
    },
    h("label", { for: "who" }, "Email, user id, phone, anonymous id or profile id"),
    input,
    " ",
    h("button", { type: "submit" }, "Find"),
    h("p", { id: "who-help", class: "muted" }, "Type email:, user_id:, phone: or anonymous_id: and the start of a value to see matches; an address with @ is an email."),
    matches,
    message,
  );
  page("Find a person", form);
  input.focus();
}

// --- a person ------------------------------------------------------------------------------

// ``notice``: what the last action did (an unmerge), shown above the refreshed page.
async function personPage(who, notice) {
  const profile = await get(`/v1/profiles/${ref(who)}`);
  const id = profile.id;
  const [traits, graph, audiences, consent] = await Promise.all([
    get(`/v1/profiles/${id}/traits`),
    get(`/v1/profiles/${id}/graph`),
    get(`/v1/profiles/${id}/audiences`),
    get(`/v1/profiles/${id}/consent`),
  ]);
  const email = profile.identities.find((i) => i.type === "email");
  const title = email ? email.value : `Profile ${short(id)}`;
  const actions = h("div", { "aria-live": "polite" }, notice);
  page(
    title,
    facts([
      ["Profile id", h("code", {}, id)],
      ["Identifiers", profile.identities.map((i) => `${i.type}:${i.value}`).join(", ") || "—"],
      ["Merged from", profile.merged_from.length ? profile.merged_from.map(short).join(", ") : "—"],
      ["First created", when(profile.created_at)],
      ["Updated", when(profile.updated_at)],
    ]),
    h(
      "div",
      { class: "pager" },
      h("button", { type: "button", class: "secondary", onclick: () => confirmUnmerge(id, actions) }, "Unmerge…"),
      h("button", { type: "button", class: "danger", onclick: () => confirmDelete(id, actions) }, "Delete person…"),
    ),
    actions,
    h("h2", {}, "Traits"),
    traits.length
      ? table(
          ["Trait", "Value", "Last set", "Source"],
          traits.map((t) => [t.name, h("span", { class: "mono" }, shown(t.value)), when(t.set_at) + (t.set_once ? " (set once)" : ""), t.source_id || "—"]),
        )
      : h("p", { class: "muted" }, "No traits yet."),
    h("h2", {}, "Computed traits"),
    computedTraits(profile.computed),
    h("h2", {}, "Identity graph"),
    identityGraph(graph),
    h("h2", {}, "Timeline"),
    timeline(id),
    h("h2", {}, "Audiences"),
    audiences.length
      ? table(["Audience", "Member since"], audiences.map((a) => [h("a", { href: `#/audiences/${a.id}` }, a.name), when(a.entered_at)]))
      : h("p", { class: "muted" }, "In no audience."),
    h("h2", {}, "Consent"),
    facts([
      ["consent trait", consent.trait === null ? "—" : h("span", { class: "mono" }, shown(consent.trait))],
      ["latest context.consent", consent.context === null ? "—" : h("span", { class: "mono" }, `${shown(consent.context)} (${when(consent.context_at)})`)],
      ["DMP counts", consent.opted_out ? h("span", { class: "error" }, "left out: refused marketing or advertising") : h("span", { class: "ok" }, "counted")],
    ]),
    h("h2", {}, "CRM"),
    await crm(profile),
  );
}

// The computed traits (resolver/computed.py): order totals, first / last seen, touches.
function computedTraits(c) {
  const touch = (t) => (t ? [t.source, t.medium, t.campaign].filter(Boolean).join(" / ") || (t.referrer ? `referrer ${t.referrer}` : "direct") : "—");
  const revenue = c.total_revenue === undefined ? "—" : `${c.total_revenue} ${c.currency || ""}`;
  const known = new Set(["orders", "order_count", "currency", "total_revenue", "average_order_value", "first_touch", "last_touch", "first_seen", "last_seen", "last_order_at"]);
  return facts([
    ["Orders", shown(c.order_count ?? 0)],
    ["Revenue", revenue],
    ["Average order", c.average_order_value === undefined ? "—" : `${c.average_order_value} ${c.currency || ""}`],
    ["Last order", when(c.last_order_at)],
    ["First seen", when(c.first_seen)],
    ["Last seen", when(c.last_seen)],
    ["First touch", touch(c.first_touch)],
    ["Last touch", touch(c.last_touch)],
    ...Object.entries(c).filter(([k]) => !known.has(k)).map(([k, v]) => [k, h("span", { class: "mono" }, shown(v))]),
  ]);
}

async function crm(profile) {
  // A contact exists only for a profile with an email or a user id (activation/crm/contacts.py).
  if (!profile.identities.some((i) => i.type === "email" || i.type === "user_id")) {
    return h("p", { class: "muted" }, "No CRM contact: the person has no email or user id yet.");
  }
  try {
    const [contact, interactions] = await Promise.all([
      get(`/v1/crm/contacts/${profile.id}`),
      get(`/v1/crm/contacts/${profile.id}/interactions?limit=10`),
    ]);
    const name = [contact.first_name, contact.last_name].filter(Boolean).join(" ") || "—";
    return h(
      "div",
      {},
      facts([
        ["Name", name],
        ["Lifecycle stage", contact.lifecycle_stage],
        ["First touch", contact.first_touch_source || "—"],
        ["Last activity", when(contact.last_activity_at)],
      ]),
      h("h3", {}, "Interactions (newest 10)"),
      interactions.items.length
        ? table(["When", "Kind", "Details"], interactions.items.map((i) => [when(i.occurred_at), i.kind, h("span", { class: "mono" }, clip(JSON.stringify(i.details), 120))]))
        : h("p", { class: "muted" }, "None."),
    );
  } catch (err) {
    if (err.status === 404) return h("p", { class: "muted" }, "No CRM contact yet.");
    return failure(err);
  }
}

function confirmUnmerge(id, where) {
  where.replaceChildren(
    h(
      "div",
      { class: "confirm", role: "group", "aria-label": "Confirm unmerge" },
      h("p", {}, "Undo this profile's last merge? The profile it absorbed becomes a person of its own again, with its identifiers and events."),
      h("button", {
        type: "button",
        class: "danger",
        onclick: async () => {
          try {
            const done = await api("POST", `/v1/profiles/${id}/unmerge`);
            await personPage(
              id,
              h(
                "div",
                { class: "card", role: "status", tabindex: "-1" },
                h("p", { class: "ok" }, `Merge ${done.undone_merge} undone: now two profiles.`),
                h("ul", {}, [done.profile, done.restored].map((p) =>
                  h("li", {}, h("a", { href: `#/person/${p.id}` }, `Profile ${short(p.id)}`), ": ", p.identities.map((i) => `${i.type}:${i.value}`).join(", ") || "no identifiers"))),
              ),
            );
            main.querySelector("[role=status]").focus();
          } catch (err) {
            where.replaceChildren(failure(err));
          }
        },
      }, "Unmerge"),
      " ",
      h("button", { type: "button", class: "secondary", onclick: () => where.replaceChildren() }, "Cancel"),
    ),
  );
  where.querySelector("button").focus();
}

function confirmDelete(id, where) {
  const typed = h("input", { id: "delete-confirm", autocomplete: "off" });
  const go = h("button", {
    type: "button",
    class: "danger",
    disabled: true,
    onclick: async () => {
      try {
        await api("DELETE", `/v1/profiles/${id}`);
        page("Person deleted", h("p", { role: "status" }, `Profile ${id} and everything about the person were erased; their identifiers are suppressed.`), h("a", { href: "#/find" }, "Find another person"));
      } catch (err) {
        where.append(failure(err));
      }
    },
  }, "Delete everywhere");
  typed.addEventListener("input", () => (go.disabled = typed.value.trim() !== "DELETE"));
  where.replaceChildren(
    h(
      "div",
      { class: "confirm", role: "group", "aria-label": "Confirm deletion" },
      h("p", {}, "This erases the person everywhere (profile, events, CRM, audiences) and cannot be undone."),
      h("label", { for: "delete-confirm" }, "Type DELETE to confirm"),
      typed,
      " ",
      go,
      " ",
      h("button", { type: "button", class: "secondary", onclick: () => where.replaceChildren() }, "Cancel"),
    ),
  );
  typed.focus();
}

// The group as a picture: each profile merged into this one is a node (the canonical one
// filled) with the identifiers it brought below it; merges are the arcs between profiles,
// with their time; refused links are drawn apart, below, in red.
function identityGraph(graph) {
  const atoms = graph.atoms;
  const COL = 270;
  const W = Math.max(760, COL * atoms.length);
  const Y = 50 + 24 * Math.min(graph.merges.length, 6);
  const place = new Map(atoms.map((a, i) => [a.id, [40 + i * COL, Y]]));
  const tallest = Math.max(0, ...atoms.map((a) => a.identities.length));
  const refusedTop = Y + 50 + 26 * tallest + 20;
  const height = refusedTop + (graph.refusals.length ? 40 + 26 * graph.refusals.length : 0);
  const svg = s("svg", { viewBox: `0 0 ${W} ${height}`, width: "100%", role: "img", "aria-labelledby": "graph-title" },
    s("title", { id: "graph-title" }, `Identity graph: ${atoms.length} profile(s), ${graph.merges.length} merge(s), ${graph.refusals.length} refused link(s)`));
  graph.merges.forEach((m, k) => {
    const [a, b] = [place.get(m.canonical_id), place.get(m.merged_id)];
    if (!a || !b) return;
    const lift = 22 + 24 * (k % 6);
    const mid = (a[0] + b[0]) / 2;
    svg.append(
      s("path", { d: `M ${a[0]} ${a[1] - 22} C ${a[0]} ${Y - 22 - lift} ${b[0]} ${Y - 22 - lift} ${b[0]} ${b[1] - 22}`, fill: "none", stroke: m.undone_at ? "#6b7280" : "#1f4e8c", "stroke-width": 2.5, "stroke-dasharray": m.undone_at ? "6 4" : "" }),
      s("text", { x: mid, y: Y - 22 - lift * 0.75 - 4, "text-anchor": "middle", class: "small" }, `${m.undone_at ? "undone " : ""}merge ${when(m.created_at)}`),
    );
  });
  for (const a of atoms) {
    const [x, y] = place.get(a.id);
    a.identities.forEach((i, k) => {
      const iy = y + 56 + 26 * k;
      svg.append(
        s("path", { d: `M ${x - 30} ${y + 22} V ${iy} H ${x - 20}`, fill: "none", stroke: "#9aa3af" }),
        s("rect", { x: x - 20, y: iy - 5, width: 10, height: 10, fill: "#1d6b35" }),
        s("text", { x: x - 5, y: iy + 4, class: "small" }, clip(`${i.type}:${i.value}`, 32)),
      );
    });
    svg.append(
      s("circle", { cx: x, cy: y, r: 22, fill: a.id === graph.canonical_id ? "#1f4e8c" : "#ffffff", stroke: "#1f4e8c", "stroke-width": 3 }),
      s("text", { x: x + 28, y: y + 4 }, `profile ${short(a.id)}`),
    );
  }
  if (graph.refusals.length) {
    svg.append(
      s("line", { x1: 10, y1: refusedTop, x2: W - 10, y2: refusedTop, stroke: "#c9ced6" }),
      s("text", { x: 10, y: refusedTop + 20 }, "Refused links (kept apart)"),
    );
    graph.refusals.forEach((r, k) => {
      const y = refusedTop + 44 + 26 * k;
      svg.append(
        s("rect", { x: 14, y: y - 9, width: 12, height: 12, fill: "#ffffff", stroke: "#a11d1d", "stroke-width": 2, "stroke-dasharray": "3 2" }),
        s("text", { x: 34, y: y + 2 }, clip(`${r.type}:${r.value} — ${r.reason} (${when(r.created_at)})`, 100)),
      );
    });
  }
  return h(
    "div",
    {},
    svg,
    h("h3", {}, "Merges"),
    graph.merges.length
      ? table(["When", "Joined", "Reason", "State"], graph.merges.map((m) => [
          when(m.created_at),
          `profile ${short(m.merged_id)} into ${short(m.canonical_id)}`,
          m.message_id ? `event ${m.message_id} from source ${m.source_id} carried identifiers of both` : "—",
          m.undone_at ? `undone ${when(m.undone_at)}` : "in effect",
        ]))
      : h("p", { class: "muted" }, "No merges: one profile from the start."),
    h("h3", {}, "Refused links"),
    graph.refusals.length
      ? table(["When", "Identifier", "Reason", "Held by"], graph.refusals.map((r) => [when(r.created_at), `${r.type}:${r.value}`, r.reason, r.other_profile_id ? h("a", { href: `#/person/${r.other_profile_id}` }, `profile ${short(r.other_profile_id)}`) : "—"]))
      : h("p", { class: "muted" }, "None."),
  );
}

function timeline(id) {
  const PAGE = 20;
  const type = h("select", { id: "tl-type" }, ["", "page", "track", "identify", "screen", "group", "alias"].map((t) => h("option", { value: t }, t || "any type")));
  const channel = h("select", { id: "tl-channel" }, ["", "website", "email", "purchase", "other"].map((c) => h("option", { value: c }, c || "any channel")));
  const body = h("div", { "aria-live": "polite" });
  const cursors = [null]; // the cursor of each page shown so far
  const newer = h("button", { type: "button", class: "secondary", disabled: true }, "Newer");
  const older = h("button", { type: "button", class: "secondary", disabled: true }, "Older");
  const where = h("span", { class: "muted" });
  async function show(index) {
    const q = new URLSearchParams({ limit: PAGE });
    if (cursors[index]) q.set("cursor", cursors[index]);
    if (type.value) q.set("type", type.value);
    if (channel.value) q.set("channel", channel.value);
    try {
      const got = await get(`/v1/profiles/${id}/events?${q}`);
      cursors.length = index + 1;
      if (got.next) cursors.push(got.next);
      body.replaceChildren(
        got.items.length
          ? table(["When", "Type", "Event", "Channel", "Source"], got.items.map((e) => [when(e.timestamp), e.type, e.event || (e.payload.properties && e.payload.properties.path) || "—", e.channel, e.source_id]))
          : h("p", { class: "muted" }, "No events."),
      );
      newer.disabled = index === 0;
      older.disabled = !got.next;
      where.textContent = `page ${index + 1}`;
      current = index;
    } catch (err) {
      body.replaceChildren(failure(err));
    }
  }
  let current = 0;
  newer.addEventListener("click", () => show(current - 1));
  older.addEventListener("click", () => show(current + 1));
  const refilter = () => { cursors.length = 1; show(0); };
  type.addEventListener("change", refilter);
  channel.addEventListener("change", refilter);
  show(0);
  return h(
    "div",
    { id: "timeline" },
    h("div", { class: "pager" }, h("label", { for: "tl-type", class: "inline" }, "Type"), type, h("label", { for: "tl-channel", class: "inline" }, "Channel"), channel),
    body,
    h("div", { class: "pager" }, newer, older, where),
  );
}

// --- audiences -----------------------------------------------------------------------------

function backfillText(b) {
  if (!b || !b.status) return "—";
  if (b.status === "done") return `done (${b.processed} profiles)`;
  if (b.status === "failed") return `failed: ${b.error || "see the logs"}`;
  return `${b.status} ${b.processed || 0} / ${b.total ?? "?"}`;
}

function backfillBar(b) {
  const value = b && b.total ? b.processed : 0;
  return h("progress", { max: (b && b.total) || 1, value: b && b.status === "done" ? (b.total || 1) : value, "aria-label": "back-fill progress" });
}

async function audiencesPage() {
  const list = await get("/v1/audiences");
  page(
    "Audiences",
    h("p", {}, h("a", { href: "#/audiences/new", class: "button" }, "New audience")),
    list.length
      ? table(["Audience", { text: "Members", num: true }, "Back-fill", "Created"], list.map((a) => [
          h("a", { href: `#/audiences/${a.id}` }, a.name), num(a.size), h("span", {}, backfillBar(a.backfill), " ", backfillText(a.backfill)), when(a.created_at),
        ]))
      : h("p", { class: "muted" }, "No audiences yet."),
  );
}

async function audiencePage(id) {
  const a = await get(`/v1/audiences/${id}`);
  const sizes = await get(`/v1/audiences/${id}/sizes?step=minute&points=500`);
  const size = h("span", { class: "stat", id: "audience-size" }, a.size.toLocaleString());
  const progress = h("span", { id: "backfill" }, backfillBar(a.backfill), " ", backfillText(a.backfill));
  const chart = h("div", {}, sizeChart(sizes));
  page(
    a.name,
    h("div", { class: "row", "aria-live": "polite" },
      h("div", { class: "card" }, h("p", { class: "muted" }, "Members now"), size),
      h("div", { class: "card" }, h("p", { class: "muted" }, "Back-fill (existing profiles)"), progress)),
    h("h2", {}, "Size over time"),
    chart,
    h("h2", {}, "Edit"),
    await audienceEditor(a),
  );
  // Watch it while the back-fill runs (and a little after: the consumer keeps it current).
  const watch = async (rounds) => {
    try {
      const now = await get(`/v1/audiences/${id}`);
      size.textContent = now.size.toLocaleString();
      progress.replaceChildren(backfillBar(now.backfill), " ", backfillText(now.backfill));
      chart.replaceChildren(sizeChart(await get(`/v1/audiences/${id}/sizes?step=minute&points=500`)));
      const running = now.backfill && now.backfill.status !== "done" && now.backfill.status !== "failed";
      if ((running || rounds > 0) && location.hash === `#/audiences/${id}`) polling = setTimeout(() => watch(running ? 5 : rounds - 1), 1000);
    } catch {
      /* the next visit shows it */
    }
  };
  polling = setTimeout(() => watch(5), 1000);
}

function sizeChart(points) {
  if (!points.length) return h("p", { class: "muted" }, "No members have entered yet.");
  const W = 760, H = 220, L = 56, B = 30;
  const t0 = new Date(points[0].at).getTime();
  const t1 = Math.max(new Date(points[points.length - 1].at).getTime() + 60000, t0 + 60000);
  const max = Math.max(...points.map((p) => p.size), 1);
  const x = (t) => L + ((W - L - 10) * (t - t0)) / (t1 - t0);
  const y = (v) => H - B - ((H - B - 10) * v) / max;
  // A step line: the size holds until the next change.
  let d = `M ${x(t0)} ${y(0)}`;
  let level = y(0);
  for (const p of points) {
    const at = x(new Date(p.at).getTime());
    d += ` L ${at} ${level}`;
    level = y(p.size);
    d += ` L ${at} ${level}`;
  }
  d += ` L ${x(t1)} ${level}`;
  const last = points[points.length - 1];
  return s("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img", "aria-label": `Size over time: from ${points[0].size} at ${when(points[0].at)} to ${last.size} at ${when(last.at)}, at most ${max}` },
    s("line", { x1: L, y1: H - B, x2: W - 10, y2: H - B, stroke: "#4a5361" }),
    s("line", { x1: L, y1: 10, x2: L, y2: H - B, stroke: "#4a5361" }),
    s("text", { x: L - 6, y: y(max) + 4, "text-anchor": "end" }, max.toLocaleString()),
    s("text", { x: L - 6, y: y(0) + 4, "text-anchor": "end" }, "0"),
    s("text", { x: L, y: H - 8 }, when(points[0].at)),
    s("text", { x: W - 10, y: H - 8, "text-anchor": "end" }, when(new Date(t1).toISOString())),
    s("path", { d, fill: "none", stroke: "#1f4e8c", "stroke-width": 2 }),
  );
}

const EXAMPLE_RULE = { and: [{ trait: "plan", eq: "pro" }, { computed: "order_count", gte: 1 }] };

// The form for a new audience (existing: null) or an edit; each error is shown at its field.
async function audienceForm(existing) {
  page("New audience", await audienceEditor(existing));
}

async function audienceEditor(existing) {
  const name = h("input", { id: "aud-name", value: existing ? existing.name : "", required: true, size: 40, "aria-describedby": "aud-name-error" });
  const rule = h("textarea", { id: "aud-rule", rows: 8, "aria-describedby": "aud-rule-help aud-rule-error" });
  rule.value = JSON.stringify(existing ? existing.rule : EXAMPLE_RULE, null, 2);
  const nameError = h("div", { id: "aud-name-error", class: "field-error" });
  const ruleError = h("div", { id: "aud-rule-error", class: "field-error" });
  const message = h("div", { "aria-live": "polite" });
  const clear = () => [nameError, ruleError, message].forEach((e) => e.replaceChildren());
  return h(
    "form",
    {
      onsubmit: async (e) => {
        e.preventDefault();
        clear();
        let parsed;
        try {
          parsed = JSON.parse(rule.value);
        } catch (err) {
          ruleError.replaceChildren(h("p", { role: "alert" }, `The rule is not JSON: ${err.message}`));
          rule.setAttribute("aria-invalid", "true");
          return rule.focus();
        }
        try {
          const body = { name: name.value, rule: parsed };
          if (existing) {
            await api("PATCH", `/v1/audiences/${existing.id}`, body);
            route();
          } else {
            const made = await api("POST", "/v1/audiences", body);
            location.hash = `#/audiences/${made.id}`;
          }
        } catch (err) {
          showFieldErrors(err, { name: [name, nameError], rule: [rule, ruleError] }, message);
        }
      },
    },
    h("label", { for: "aud-name" }, "Name"),
    name,
    nameError,
    h("label", { for: "aud-rule" }, "Rule (JSON)"),
    h("p", { id: "aud-rule-help", class: "muted" }, 'Conditions on traits ({"trait": "plan", "eq": "pro"}), computed traits ({"computed": "order_count", "gte": 1}) and events ({"event": {"type": "track", "name": "Order Completed", "within": "30d"}}), combined with and / or / not (README: Activation).'),
    rule,
    ruleError,
    h("p", {}, h("button", { type: "submit" }, existing ? "Save and back-fill again" : "Create and back-fill")),
    message,
  );
}

// A 422's problems, each under the field it names (loc ["body", field, ...]).
function showFieldErrors(err, fields, message) {
  const problems = err.body && Array.isArray(err.body.detail) ? err.body.detail : null;
  if (!problems) {
    const [input, box] = err.status === 409 ? fields.name : [null, message];
    box.replaceChildren(failure(err));
    if (input) input.setAttribute("aria-invalid", "true");
    return;
  }
  for (const p of problems) {
    const field = p.loc && p.loc[0] === "body" ? p.loc[1] : null;
    const [input, box] = fields[field] || [null, message];
    const where = p.path ? `${p.path}: ` : "";
    box.append(h("p", { role: "alert" }, `${where}${p.msg}`));
    if (input) input.setAttribute("aria-invalid", "true");
  }
  const first = Object.values(fields).find(([input]) => input.getAttribute("aria-invalid"));
  if (first) first[0].focus();
}

// --- DMP counts ---------------------------------------------------------------------------

async function dmpPage() {
  const [anon, audiences, counts] = await Promise.all([
    get("/v1/dmp/anonymization"),
    get("/v1/audiences"),
    get("/v1/dmp/audience-counts?limit=10000"),
  ]);
  const eps = anon.epsilon === null ? "no noise (exact counts)" : `Laplace noise, ε = ${anon.epsilon} per count`;
  const picker = h("select", { id: "dmp-window" }, anon.windows.map((w) => h("option", { value: w }, `per ${w}`)));
  const body = h("div", {});
  const draw = () => {
    const window = picker.value;
    const sections = [];
    for (const a of audiences) {
      const rows = counts.items.filter((c) => c.audience_id === a.id && c.window === window);
      const start = rows.length ? rows.map((c) => c.window_start).sort().slice(-1)[0] : null;
      const cells = rows.filter((c) => c.window_start === start);
      const overall = cells.find((c) => c.dimension === "overall");
      sections.push(h("h2", {}, a.name));
      if (!overall) {
        sections.push(h("p", { class: "suppressed" }, `Whole audience: suppressed (fewer than k = ${anon.k} consenting members), or not counted yet in this window.`));
        continue;
      }
      sections.push(
        h("p", {}, `Window from ${when(start)}. Whole audience: `, h("strong", {}, overall.count.toLocaleString())),
        h("div", { class: "row" }, Object.entries(anon.dimensions).map(([dimension, vocabulary]) =>
          bucketChart(`${a.id}-${dimension}`, dimension, vocabulary, cells.filter((c) => c.dimension === dimension), overall.count, anon.k))),
      );
    }
    body.replaceChildren(...(sections.length ? sections : [h("p", { class: "muted" }, "No audiences yet.")]));
  };
  picker.addEventListener("change", draw);
  draw();
  page(
    "DMP audience counts",
    h("p", {}, `What the DMP receives: counts per window and bucket, nothing else. Buckets of fewer than k = ${anon.k} profiles are suppressed (shown as suppressed, never as zero), and so is the smallest published bucket when the suppressed ones would add up to fewer than k; ${eps}.`),
    h("p", { class: "muted" }, "Consent: people who refused marketing or advertising are not counted."),
    h("div", { class: "pager" }, h("label", { for: "dmp-window", class: "inline" }, "Window"), picker),
    body,
  );
}

function bucketChart(key, dimension, vocabulary, cells, overall, k) {
  const published = new Map(cells.map((c) => [c.bucket, c.count]));
  const rows = [...published.entries()].sort((a, b) => b[1] - a[1]).map(([bucket, n]) => ({ bucket, n }));
  const hidden = vocabulary.filter((b) => !published.has(b));
  if (vocabulary.length <= 12) rows.push(...hidden.map((bucket) => ({ bucket, n: null })));
  else if (hidden.length) rows.push({ bucket: `${hidden.length} others`, n: null });
  const W = 340, R = 22, L = 90;
  const max = Math.max(overall, 1);
  const svg = s("svg", { viewBox: `0 0 ${W} ${rows.length * R + 6}`, width: "100%", role: "img", "aria-labelledby": `t-${key}` },
    s("title", { id: `t-${key}` }, `${dimension}: ${rows.map((r) => `${r.bucket} ${r.n === null ? "suppressed" : r.n}`).join(", ")}`));
  rows.forEach((r, i) => {
    const y = 3 + i * R;
    svg.append(s("text", { x: L - 6, y: y + 14, "text-anchor": "end" }, r.bucket));
    if (r.n === null) {
      svg.append(
        s("rect", { x: L, y: y + 2, width: 110, height: 15, fill: "#ffffff", stroke: "#6b7280", "stroke-dasharray": "4 3" }),
        s("text", { x: L + 6, y: y + 14, class: "small" }, `suppressed (< ${k})`),
      );
    } else {
      const w = Math.max(2, ((W - L - 50) * r.n) / max);
      svg.append(s("rect", { x: L, y: y + 2, width: w, height: 15, fill: "#1f4e8c" }), s("text", { x: L + w + 5, y: y + 14 }, r.n.toLocaleString()));
    }
  });
  return h("figure", { class: "card" }, h("figcaption", {}, h("strong", {}, dimension)), svg,
    h("details", {}, h("summary", {}, "As a table"),
      table(["Bucket", { text: "Count", num: true }], rows.map((r) => [r.bucket, r.n === null ? h("td", { class: "num suppressed" }, "suppressed") : num(r.n)]))));
}

// --- health --------------------------------------------------------------------------------

async function healthPage() {
  const st = await get("/v1/status");
  page(
    "Health",
    h("div", { class: "row" },
      h("div", { class: "card" }, h("p", { class: "muted" }, "Events accepted, last hour"), h("span", { class: "stat" }, st.accepted_last_hour.toLocaleString())),
      h("div", { class: "card" }, h("p", { class: "muted" }, "Events rejected, last hour"), h("span", { class: "stat" }, st.rejected_last_hour === null ? "—" : st.rejected_last_hour.toLocaleString()),
        st.rejected_last_hour === null ? h("p", { class: "muted" }, "On the Kafka topic cdp.events.rejected.") : null),
      h("div", { class: "card" }, h("p", { class: "muted" }, "Dead letters"), h("span", { class: "stat" }, Object.values(st.dead_letters).reduce((a, b) => a + b, 0).toLocaleString()))),
    h("h2", {}, "Consumer lag"),
    st.lag === null
      ? h("p", { class: "muted" }, "Kept by Kafka: kafka-consumer-groups.sh --describe --all-groups shows it.")
      : table(["Consumer group", "Topic", { text: "Records behind", num: true }], st.lag.map((l) => [l.group, l.topic, num(l.lag)])),
    h("h2", {}, "Rejected events (newest)"),
    st.rejections && st.rejections.length
      ? table(["Received", "Source", "messageId", "Reason"], st.rejections.map((r) => [when(r.receivedAt), r.sourceId || "—", r.messageId || "—", r.reason || "—"]))
      : h("p", { class: "muted" }, "None in the last hour."),
    h("h2", {}, "Dead letters (newest)"),
    st.recent_dead_letters.length
      ? table(["When", "Consumer", "Record", "Reason"], st.recent_dead_letters.map((d) => [when(d.created_at), d.consumer, d.origin, d.reason]))
      : h("p", { class: "muted" }, "None: every record was applied."),
    h("p", { class: "muted" }, `Counted since ${when(st.since)}.`),
  );
}

route();
