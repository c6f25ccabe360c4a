// escrow console: progressive script over the same /v1 API as every program. No third-party
// code. State-changing requests carry the session's CSRF token.
"use strict";

(function () {
  // The sign-in page moves on to the console by a navigation of this origin's own page, so
  // the SameSite=Strict session cookie goes with it.
  const onward = document.getElementById("continue");
  if (onward) {
    window.location.replace("/");
    return;
  }

  let session = null;

  async function api(path, options) {
    const opts = Object.assign({ credentials: "same-origin", headers: {} }, options || {});
    if (opts.method && opts.method !== "GET" && session && session.csrf) {
      opts.headers["x-csrf-token"] = session.csrf;
    }
    const r = await fetch(path, opts);
    const text = await r.text();
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
    if (!r.ok) {
      const e = new Error(body && body.error ? body.error.message : "request failed (" + r.status + ")");
      e.status = r.status;
      e.code = body && body.error ? body.error.code : null;
      throw e;
    }
    return body;
  }

  function el(tag, attrs, children) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") n.textContent = v; else n.setAttribute(k, v);
    }
    for (const c of children || []) n.append(c);
    return n;
  }

  function table(caption, columns, rows) {
    const head = el("tr", {}, columns.map((c) => el("th", { scope: "col", text: c.label })));
    const body = rows.map((r) => el("tr", {}, columns.map((c) => {
      const v = c.value(r);
      return el("td", c.num ? { class: "num", text: String(v) } : { text: v == null ? "" : String(v) });
    })));
    return el("div", { class: "table-wrap" }, [
      el("table", {}, [el("caption", { text: caption }), el("thead", {}, [head]), el("tbody", {}, body)]),
    ]);
  }

  const pages = {
    async datasets(view) {
      const list = await api("/v1/datasets");
      view.append(el("h1", { text: "Datasets" }));
      if (!list.datasets.length) {
        view.append(el("p", { class: "muted", text: "No datasets yet." }));
        return;
      }
      view.append(table("Your datasets, latest version of each", [
        { label: "Name", value: (d) => d.name },
        { label: "Version", value: (d) => d.version, num: true },
        { label: "Rows", value: (d) => d.rows, num: true },
        { label: "Format", value: (d) => d.format },
        { label: "Key column", value: (d) => d.key_column || "none" },
        { label: "Uploaded", value: (d) => d.created_at },
        { label: "By", value: (d) => d.uploaded_by },
      ], list.datasets));
    },
    async audit(view) {
      const list = await api("/v1/audit");
      view.append(el("h1", { text: "Audit" }));
      const records = list.records.slice(-200).reverse();
      view.append(table("Latest events you may see, newest first", [
        { label: "#", value: (r) => r.seq, num: true },
        { label: "Time", value: (r) => r.time },
        { label: "Action", value: (r) => r.kind },
        { label: "Who", value: (r) => (r.actor.partner || "") + "/" + r.actor.user + (r.actor.via ? " (" + r.actor.via + ")" : "") },
        { label: "Outcome", value: (r) => r.outcome + (r.code ? ": " + r.code : "") },
      ], records));
    },
  };

  async function show() {
    const view = document.getElementById("view");
    const name = (window.location.hash || "#datasets").slice(1);
    const page = pages[name] ? name : "datasets";
    for (const a of document.querySelectorAll("nav a")) {
      if (a.getAttribute("href") === "#" + page) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    view.replaceChildren();
    try {
      await pages[page](view);
    } catch (e) {
      if (e.status === 401) return signedOut();
      view.replaceChildren(el("p", { class: "error", role: "alert", text: e.message }));
    }
  }

  function signedOut() {
    session = null;
    document.getElementById("nav").hidden = true;
    document.getElementById("logout").hidden = true;
    document.getElementById("who").textContent = "";
    document.getElementById("view").replaceChildren();
    document.getElementById("signin").hidden = false;
  }

  async function start() {
    try {
      session = await api("/v1/console/session");
    } catch (e) {
      return signedOut();
    }
    document.getElementById("who").textContent = session.user + " · " + session.partner + " (" + session.role + ")";
    document.getElementById("nav").hidden = false;
    const out = document.getElementById("logout");
    out.hidden = false;
    out.addEventListener("click", async () => {
      try { await api("/v1/console/logout", { method: "POST" }); } finally { signedOut(); }
    });
    window.addEventListener("hashchange", show);
    await show();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
