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
(function (w, d) {
  "use strict";
  var stub = w.cdp;
  if (stub && stub.loaded) return;

  var VERSION = "1.0.0";
  var script = d.currentScript;
  var cfg = Object.assign(
    {
      host: script && script.src ? new URL(script.src).origin : location.origin,
      writeKey: null,
      flushAt: 20, // send when this many events wait...
      flushInterval: 1000, // ...or this many ms after the first one
      maxBatchBytes: 60000, // under the 64 KB limit of keepalive fetches and beacons
      maxQueue: 1000, // the oldest events beyond this are dropped (and counted)
      retryBase: 1000,
      retryMax: 60000,
      sessionTimeout: 30 * 60 * 1000,
      cookieDomain: null, // e.g. ".example.com" to share the id across subdomains
      cookieDays: 365,
      defaultCategory: "analytics", // the consent category of calls that name none
      requireConsent: false, // true: hold events (and store nothing) until consent is given
    },
    stub && stub.config
  );

  // --- storage: every access guarded (storage may be disabled or full) ------------------
  var store = {
    get: function (k) {
      try {
        return JSON.parse(w.localStorage.getItem(k));
      } catch (e) {
        return null;
      }
    },
    set: function (k, v) {
      try {
        w.localStorage.setItem(k, JSON.stringify(v));
      } catch (e) {}
    },
    del: function (k) {
      try {
        w.localStorage.removeItem(k);
      } catch (e) {}
    },
  };

  function readCookie(name) {
    var m = d.cookie.match(new RegExp("(?:^|; )" + name + "=([^;]*)"));
    return m ? decodeURIComponent(m[1]) : null;
  }

  function writeCookie(name, value) {
    var c = name + "=" + encodeURIComponent(value) + "; path=/; SameSite=Lax";
    c += "; max-age=" + Math.round(cfg.cookieDays * 86400);
    if (cfg.cookieDomain) c += "; domain=" + cfg.cookieDomain;
    if (location.protocol === "https:") c += "; Secure";
    d.cookie = c;
  }

  function uuid() {
    var b = w.crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 15) | 64;
    b[8] = (b[8] & 63) | 128;
    var h = "";
    for (var i = 0; i < 16; i++) h += (b[i] + 256).toString(16).slice(1);
    return [h.slice(0, 8), h.slice(8, 12), h.slice(12, 16), h.slice(16, 20), h.slice(20)].join("-");
  }

  // --- consent: category -> true (granted) / false (declined); unknown = undecided ---------
  var consent = store.get("cdp_consent") || {};

  function decided(category) {
    var v = consent[category];
    return v === undefined ? (cfg.requireConsent ? undefined : true) : v;
  }

  function mayStore() {
    if (!cfg.requireConsent) return true;
    for (var k in consent) if (consent[k]) return true;
    return false;
  }

  // --- who and when: anonymous id (cookie + localStorage), user id, session ----------------
  var anonymousId = readCookie("cdp_aid") || store.get("cdp_aid") || uuid();
  var userId = store.get("cdp_uid");
  var session = store.get("cdp_session");

  function persistIds() {
    if (!mayStore()) return;
    writeCookie("cdp_aid", anonymousId);
    store.set("cdp_aid", anonymousId);
    if (userId) store.set("cdp_uid", userId);
    else store.del("cdp_uid");
  }

  function sessionId(now) {
    var s = (mayStore() && store.get("cdp_session")) || session; // another tab may have moved it
    if (!s || now - s.last > cfg.sessionTimeout) s = { id: uuid(), start: now };
    s.last = now;
    session = s;
    if (mayStore()) store.set("cdp_session", s);
    return s.id;
  }

  function pageFacts() {
    return {
      url: location.href,
      path: location.pathname,
      referrer: d.referrer,
      title: d.title,
      search: location.search,
    };
  }

  function context(now, extra) {
    var campaign = {};
    new URLSearchParams(location.search).forEach(function (v, k) {
      if (k.indexOf("utm_") === 0) campaign[k === "utm_campaign" ? "name" : k.slice(4)] = v;
    });
    var ctx = {
      library: { name: "cdp.js", version: VERSION },
      page: pageFacts(),
      userAgent: navigator.userAgent,
      locale: navigator.language,
      screen: { width: w.screen.width, height: w.screen.height, density: w.devicePixelRatio },
      timezone: Intl.DateTimeFormat().resolvedOptions().timeZone,
      sessionId: sessionId(now),
    };
    if (Object.keys(campaign).length) ctx.campaign = campaign;
    if (Object.keys(consent).length) ctx.consent = { categoryPreferences: consent };
    return Object.assign(ctx, extra);
  }

  // --- the queue: entries {c: consent category, e: event} ---------------------------------
  var tab = null;
  try {
    tab = w.sessionStorage.getItem("cdp_tab") || uuid(); // survives reloads of this tab
    w.sessionStorage.setItem("cdp_tab", tab);
  } catch (e) {
    tab = uuid();
  }
  var queueKey = "cdp_q_" + tab;
  var queue = [];
  var held = []; // undecided categories under requireConsent: memory only, never sent
  var sending = false;
  var attempts = 0;
  var timer = null;
  var callTime = null; // the time of a replayed stub call
  var dropped = 0;

  function save(hidden) {
    if (!mayStore()) return;
    if (queue.length) store.set(queueKey, { t: Date.now(), q: queue, h: hidden ? 1 : 0 });
    else store.del(queueKey);
  }

  // This tab's own stored queue, and those of tabs that were closed (or silent for 10 min).
  function adoptStored() {
    try {
      for (var i = w.localStorage.length - 1; i >= 0; i--) {
        var k = w.localStorage.key(i);
        if (!k || k.indexOf("cdp_q_") !== 0) continue;
        var v = store.get(k);
        if (k === queueKey || !v || v.h || Date.now() - v.t > 600000) {
          queue = queue.concat((v && v.q) || []);
          if (k !== queueKey) store.del(k);
        }
      }
    } catch (e) {}
  }

  function make(type, fields, options) {
    options = options || {};
    var now = callTime || Date.now();
    var event = Object.assign(
      {
        type: type,
        messageId: uuid(),
        timestamp: new Date(now).toISOString(),
        anonymousId: anonymousId,
        context: context(now, options.context),
      },
      userId ? { userId: userId } : {},
      fields
    );
    route({ c: options.category || cfg.defaultCategory, e: event });
  }

  function route(entry) {
    var ok = decided(entry.c);
    if (ok === false) return; // declined: never sent, never stored
    if (ok === undefined) return void held.push(entry);
    queue.push(entry);
    if (queue.length > cfg.maxQueue) dropped += queue.splice(0, queue.length - cfg.maxQueue).length;
    save();
    if (queue.length >= cfg.flushAt && !attempts) flush();
    else schedule(cfg.flushInterval);
  }

  function schedule(ms) {
    if (timer) return;
    timer = setTimeout(function () {
      timer = null;
      flush();
    }, ms);
  }

  // The first entries of the queue whose batch stays under maxBatchBytes, and its body.
  function nextBatch(from) {
    var events = [];
    var size = 200;
    for (var i = from; i < queue.length; i++) {
      var n = JSON.stringify(queue[i].e).length + 1;
      if (events.length && size + n > cfg.maxBatchBytes) break;
      events.push(queue[i].e);
      size += n;
    }
    var body = JSON.stringify({ batch: events, sentAt: new Date().toISOString(), writeKey: cfg.writeKey });
    return { events: events, body: body };
  }

  function forget(events) {
    var sent = {};
    events.forEach(function (e) {
      sent[e.messageId] = 1;
    });
    queue = queue.filter(function (x) {
      return !sent[x.e.messageId];
    });
  }

  function flush() {
    queue = queue.filter(function (x) {
      return decided(x.c) !== false; // consent withdrawn since the call
    });
    if (sending || !queue.length) return;
    var batch = nextBatch(0);
    sending = true;
    fetch(cfg.host + "/v1/batch", {
      method: "POST",
      body: batch.body,
      headers: { "Content-Type": "text/plain" },
      credentials: "omit",
      keepalive: new Blob([batch.body]).size < 65000,
    })
      .then(function (r) {
        if (r.ok || (r.status >= 400 && r.status < 500 && r.status !== 408 && r.status !== 429)) {
          return r; // delivered, or refused for good (a retry cannot succeed)
        }
        throw r;
      })
      .then(
        function () {
          sending = false;
          attempts = 0;
          forget(batch.events);
          save();
          if (queue.length) flush();
        },
        function (r) {
          sending = false;
          attempts++;
          var after = r && r.headers ? Number(r.headers.get("Retry-After")) : 0;
          var backoff = Math.min(cfg.retryMax, cfg.retryBase * Math.pow(2, attempts - 1));
          schedule(after > 0 ? after * 1000 : backoff * (0.5 + Math.random() / 2));
        }
      );
  }

  // The tab is going away (or into the back/forward cache): beacon everything, keep it stored.
  function onPageHide() {
    for (var i = 0; i < queue.length; ) {
      var batch = nextBatch(i);
      var blob = new Blob([batch.body], { type: "text/plain" });
      if (!navigator.sendBeacon || !navigator.sendBeacon(cfg.host + "/v1/batch", blob)) break;
      i += batch.events.length;
    }
    save(true);
  }

  w.addEventListener("pagehide", onPageHide);
  w.addEventListener("pageshow", function (e) {
    if (e.persisted) save(); // back from the cache: this tab owns its queue again
  });
  d.addEventListener("visibilitychange", function () {
    if (d.visibilityState === "hidden") flush(); // keepalive: survives a tab killed later
  });

  // --- the API -----------------------------------------------------------------------------
  var api = {
    loaded: true,
    VERSION: VERSION,
    page: function (name, properties, options) {
      if (typeof name === "object" && name !== null) {
        options = properties;
        properties = name;
        name = undefined;
      }
      var fields = { properties: Object.assign(pageFacts(), properties) };
      if (name) fields.name = String(name);
      make("page", fields, options);
    },
    track: function (event, properties, options) {
      make("track", { event: String(event), properties: properties || {} }, options);
    },
    identify: function (id, traits, options) {
      if (typeof id === "object" && id !== null) {
        options = traits;
        traits = id;
        id = null;
      }
      if (id !== null && id !== undefined && id !== "") {
        userId = String(id);
        persistIds();
      }
      make("identify", { traits: traits || {} }, options);
    },
    alias: function (to, from, options) {
      var previousId = from ? String(from) : userId || anonymousId;
      userId = String(to);
      persistIds();
      make("alias", { userId: userId, previousId: previousId }, options);
    },
    reset: function () {
      userId = null;
      anonymousId = uuid();
      session = null;
      store.del("cdp_session");
      persistIds();
    },
    consent: function (categories) {
      if (Array.isArray(categories)) {
        categories = categories.reduce(function (o, c) {
          o[c] = true;
          return o;
        }, {});
      }
      Object.assign(consent, categories);
      store.set("cdp_consent", consent);
      persistIds();
      var waiting = held;
      held = [];
      waiting.forEach(route);
      flush();
    },
    flush: flush,
    user: function () {
      return { anonymousId: anonymousId, userId: userId, sessionId: session && session.id };
    },
    stats: function () {
      return { queued: queue.length, held: held.length, dropped: dropped, attempts: attempts };
    },
  };

  persistIds();
  adoptStored();
  var calls = Array.isArray(stub) ? stub.slice() : [];
  w.cdp = api;
  if (stub) Object.assign(stub, api); // code holding the stub reaches the library too
  calls.forEach(function (call) {
    if (typeof api[call[0]] !== "function") return;
    callTime = call[2] || null;
    api[call[0]].apply(api, call[1]);
    callTime = null;
  });
  if (queue.length) schedule(0);
})(window, document);
