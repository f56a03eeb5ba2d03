/*! cdp.js: the cdp-stream website library. Apache-2.0.
 *
 * Loaded by the copy-paste loader (loader.html next to this file), which leaves a stub
 * array on `window.cdp` recording calls made before this file arrives; they are replayed
 * here, with the time they were made.
 *
 * Delivery: events queue in memory and in localStorage (one key per tab), go out as
 * text/plain batches to the collector's /v1/batch (a CORS "simple" request: no preflight)
 * by count and by time, and leave the queue only when the collector answered. Network
 * errors, 5xx, 408 and 429 are retried with exponential backoff and jitter (Retry-After
 * honoured); other 4xx mean the batch can never succeed and it is dropped. On pagehide
 * the queue goes out by navigator.sendBeacon and stays stored: the next page of the site
 * sends it once more if the beacon was lost. Every event's messageId is fixed when it is
 * made, so the resolver keeps one copy however often it is sent.
 */
((w, d) => {
  "use strict";
  const stub = w.cdp;
  if (stub && stub.loaded) return;

  const VERSION = "1.0.0";
  const script = d.currentScript;
  const cfg = {
    host: script && script.src ? new URL(script.src).origin : location.origin,
    writeKey: null,
    flushAt: 20, // send when this many events wait...
    flushInterval: 1000, // ...or this many ms after the first one
    maxBatchBytes: 60000, // under the 64 KB limit of keepalive fetches and beacons
    maxQueue: 1000, // the oldest events beyond this are dropped (and counted)
    retryBase: 1000,
    retryMax: 60000,
    timeout: 10000, // a send that has no answer by then is retried
    sessionTimeout: 30 * 60 * 1000,
    cookieDomain: null, // e.g. ".example.com" to share the id across subdomains
    cookieDays: 365,
    defaultCategory: "analytics", // the consent category of calls that name none
    requireConsent: false, // true: hold events (and store nothing) until consent is given
    ...(stub && stub.config),
  };

  // --- storage: every access guarded (storage may be disabled or full) ------------------
  const store = {
    get(key) {
      try {
        return JSON.parse(w.localStorage.getItem(key));
      } catch {
        return null;
      }
    },
    set(key, value) {
      try {
        w.localStorage.setItem(key, JSON.stringify(value));
      } catch {}
    },
    del(key) {
      try {
        w.localStorage.removeItem(key);
      } catch {}
    },
  };

  const readCookie = (name) => {
    const m = d.cookie.match(new RegExp(`(?:^|; )${name}=([^;]*)`));
    return m ? decodeURIComponent(m[1]) : null;
  };

  const writeCookie = (name, value) => {
    let c = `${name}=${encodeURIComponent(value)}; path=/; SameSite=Lax`;
    c += `; max-age=${Math.round(cfg.cookieDays * 86400)}`;
    if (cfg.cookieDomain) c += `; domain=${cfg.cookieDomain}`;
    if (location.protocol === "https:") c += "; Secure";
    d.cookie = c;
  };

  // crypto.randomUUID exists only on https pages; getRandomValues everywhere.
  const uuid = () => {
    const b = w.crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 15) | 64;
    b[8] = (b[8] & 63) | 128;
    const h = Array.from(b, (x) => (x + 256).toString(16).slice(1)).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  };

  // --- consent: category -> true (granted) / false (declined); unknown = undecided ---------
  const consent = store.get("cdp_consent") || {};
  const granted = (v) => v === true || v === 1 || /^(granted|yes|true|on|accepted|allow)$/i.test(v);
  const decided = (category) =>
    category in consent ? consent[category] : cfg.requireConsent ? undefined : true;
  const mayStore = () => !cfg.requireConsent || Object.values(consent).some(Boolean);

  // --- who and when: anonymous id (cookie + localStorage), user id, session ----------------
  let anonymousId = readCookie("cdp_aid") || store.get("cdp_aid") || uuid();
  let userId = store.get("cdp_uid");
  let session = store.get("cdp_session");

  const persistIds = () => {
    if (!mayStore()) return;
    writeCookie("cdp_aid", anonymousId);
    store.set("cdp_aid", anonymousId);
    if (userId) store.set("cdp_uid", userId);
    else store.del("cdp_uid");
  };

  const sessionId = (now) => {
    let s = (mayStore() && store.get("cdp_session")) || session; // another tab may have moved it
    if (!s || now - s.last > cfg.sessionTimeout) s = { id: uuid(), start: now };
    s.last = now;
    session = s;
    if (mayStore()) store.set("cdp_session", s);
    return s.id;
  };

  const pageFacts = () => ({
    url: location.href,
    path: location.pathname,
    referrer: d.referrer,
    title: d.title,
    search: location.search,
  });

  const context = (now, extra) => {
    const campaign = {};
    for (const [k, v] of new URLSearchParams(location.search)) {
      if (k.startsWith("utm_")) campaign[k === "utm_campaign" ? "name" : k.slice(4)] = v;
    }
    const ctx = {
      library: { name: "cdp.js", version: VERSION },
      page: pageFacts(),
      userAgent: navigator.userAgent,
      locale: navigator.language,
      screen: { width: w.screen.width, height: w.screen.height, density: w.devicePixelRatio },
      timezone: Intl.DateTimeFormat().resolvedOptions().timeZone,
      sessionId: sessionId(now),
    };
    if (Object.keys(campaign).length) ctx.campaign = campaign;
    if (Object.keys(consent).length) ctx.consent = { categoryPreferences: { ...consent } };
    return { ...ctx, ...extra };
  };

  // --- the queue: entries {c: consent category, e: event} ---------------------------------
  let tab;
  try {
    tab = w.sessionStorage.getItem("cdp_tab") || uuid(); // survives reloads of this tab
    w.sessionStorage.setItem("cdp_tab", tab);
  } catch {
    tab = uuid();
  }
  const queueKey = `cdp_q_${tab}`;
  let queue = [];
  let held = []; // undecided categories under requireConsent: memory only, never sent
  let sending = false;
  let attempts = 0;
  let timer = null;
  let callTime = null; // the time of a replayed stub call
  let dropped = 0;

  const save = (hidden) => {
    if (!mayStore()) return;
    if (queue.length) store.set(queueKey, { t: Date.now(), q: queue, h: hidden ? 1 : 0 });
    else store.del(queueKey);
  };

  // This tab's own stored queue, and those of tabs that were closed (or silent for 10 min).
  const adoptStored = () => {
    try {
      for (const key of Object.keys(w.localStorage)) {
        if (!key.startsWith("cdp_q_")) continue;
        const v = store.get(key);
        if (key === queueKey || !v || v.h || Date.now() - v.t > 600000) {
          queue = queue.concat((v && v.q) || []);
          if (key !== queueKey) store.del(key);
        }
      }
    } catch {}
  };

  const schedule = (ms) => {
    if (timer) return;
    timer = setTimeout(() => {
      timer = null;
      flush();
    }, ms);
  };

  const route = (entry) => {
    const ok = decided(entry.c);
    if (ok === false) return; // declined: never sent, never stored
    if (ok === undefined) return void held.push(entry);
    queue.push(entry);
    if (queue.length > cfg.maxQueue) dropped += queue.splice(0, queue.length - cfg.maxQueue).length;
    save();
    if (queue.length >= cfg.flushAt && !attempts) flush();
    else schedule(cfg.flushInterval);
  };

  const make = (type, fields, options = {}) => {
    const now = callTime || Date.now();
    const event = {
      type,
      messageId: uuid(),
      timestamp: new Date(now).toISOString(),
      anonymousId,
      context: context(now, options.context),
      ...(userId ? { userId } : {}),
      ...fields,
    };
    route({ c: options.category || cfg.defaultCategory, e: event });
  };

  // The queue's entries from ``from`` whose batch stays under maxBatchBytes, and its body.
  const nextBatch = (from) => {
    const events = [];
    let size = 200;
    for (const { e } of queue.slice(from)) {
      const n = JSON.stringify(e).length + 1;
      if (events.length && size + n > cfg.maxBatchBytes) break;
      events.push(e);
      size += n;
    }
    const body = JSON.stringify({ batch: events, sentAt: new Date().toISOString(), writeKey: cfg.writeKey });
    return { events, body };
  };

  const forget = (events) => {
    const sent = new Set(events.map((e) => e.messageId));
    queue = queue.filter((x) => !sent.has(x.e.messageId));
  };

  // Answers after which a batch is done: delivered, or refused for good (no retry can help).
  const settled = (status) => status < 300 || (status >= 400 && status < 500 && status !== 408 && status !== 429);

  function flush() {
    queue = queue.filter((x) => decided(x.c) !== false); // consent withdrawn since the call
    if (sending || !queue.length) return;
    const batch = nextBatch(0);
    sending = true;
    fetch(`${cfg.host}/v1/batch`, {
      method: "POST",
      body: batch.body,
      headers: { "Content-Type": "text/plain" },
      credentials: "omit",
      keepalive: new Blob([batch.body]).size < 65000,
      signal: AbortSignal.timeout(cfg.timeout),
    })
      .then((r) => {
        if (!settled(r.status)) throw r;
        sending = false;
        attempts = 0;
        forget(batch.events);
        save();
        if (queue.length) flush();
      })
      .catch((r) => {
        sending = false;
        attempts++;
        const after = r instanceof Response ? Number(r.headers.get("Retry-After")) : 0;
        const backoff = Math.min(cfg.retryMax, cfg.retryBase * 2 ** (attempts - 1));
        schedule(after > 0 ? after * 1000 : backoff * (0.5 + Math.random() / 2));
      });
  }

  // The tab is going away (or into the back/forward cache): beacon everything, keep it stored.
  w.addEventListener("pagehide", () => {
    for (let i = 0; i < queue.length; ) {
      const batch = nextBatch(i);
      const blob = new Blob([batch.body], { type: "text/plain" });
      if (!navigator.sendBeacon || !navigator.sendBeacon(`${cfg.host}/v1/batch`, blob)) break;
      i += batch.events.length;
    }
    save(true);
  });
  w.addEventListener("pageshow", (e) => {
    if (e.persisted) save(); // back from the cache: this tab owns its queue again
  });
  d.addEventListener("visibilitychange", () => {
    if (d.visibilityState === "hidden") flush(); // keepalive: survives a tab killed later
  });

  // --- the API -----------------------------------------------------------------------------
  const isObject = (x) => typeof x === "object" && x !== null;
  const api = {
    loaded: true,
    VERSION,
    page(name, properties, options) {
      if (isObject(name)) [name, properties, options] = [undefined, name, properties];
      const fields = { properties: { ...pageFacts(), ...properties } };
      if (name) fields.name = String(name);
      make("page", fields, options);
    },
    track(event, properties, options) {
      if (typeof event !== "string" || !event) return console.warn("cdp.track: an event name is needed");
      make("track", { event, properties: properties || {} }, options);
    },
    identify(id, traits, options) {
      if (isObject(id)) [id, traits, options] = [null, id, traits];
      if (id !== null && id !== undefined && id !== "") {
        userId = String(id);
        persistIds();
      }
      make("identify", { traits: traits || {} }, options);
    },
    alias(to, from, options) {
      const previousId = from ? String(from) : userId || anonymousId;
      userId = String(to);
      persistIds();
      make("alias", { userId, previousId }, options);
    },
    reset() {
      userId = null;
      anonymousId = uuid();
      session = null;
      store.del("cdp_session");
      persistIds();
    },
    // {analytics: true, marketing: false} ("granted"/"denied" too), or the granted ones: ["analytics"]
    consent(categories) {
      const entries = Array.isArray(categories)
        ? categories.map((c) => [c, true])
        : Object.entries(categories || {}).map(([c, v]) => [c, granted(v)]);
      Object.assign(consent, Object.fromEntries(entries));
      store.set("cdp_consent", consent);
      persistIds();
      const waiting = held;
      held = [];
      waiting.forEach(route);
      flush();
    },
    flush,
    user: () => ({ anonymousId, userId, sessionId: session && session.id }),
    stats: () => ({ queued: queue.length, held: held.length, dropped, attempts }),
  };

  persistIds();
  adoptStored();
  const calls = Array.isArray(stub) ? stub.slice() : [];
  w.cdp = api;
  if (stub) Object.assign(stub, api); // code holding the stub reaches the library too
  for (const [method, args, time] of calls) {
    if (typeof api[method] !== "function") continue;
    callTime = time || null;
    api[method](...args);
    callTime = null;
  }
  if (queue.length) schedule(0);
})(window, document);
