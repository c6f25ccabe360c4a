// escrow console: progressive script over the same /v1 API as every program. No third-party
// code. Data from the API is only ever rendered as text (textContent), never as markup.
// State-changing requests carry the session's CSRF token.
"use strict";

(function () {
  let session = null;

  function failure(r, body) {
    const e = new Error(body && body.error ? body.error.message : "request failed (" + r.status + ")");
    e.status = r.status;
    e.code = body && body.error ? body.error.code : null;
    e.field = body && body.error ? body.error.field : undefined;
    return e;
  }

  function headers(extra, method) {
    const h = Object.assign({}, extra || {});
    if (method && method !== "GET" && session && session.csrf) h["x-csrf-token"] = session.csrf;
    return h;
  }

  async function api(path, options) {
    const opts = Object.assign({ credentials: "same-origin" }, options || {});
    opts.headers = headers(opts.headers, opts.method);
    if (opts.json !== undefined) {
      opts.body = JSON.stringify(opts.json);
      opts.headers["content-type"] = "application/json";
      delete opts.json;
    }
    const r = await fetch(path, opts);
    if (opts.raw && r.ok) return r;
    const text = await r.text();
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
    if (!r.ok) throw failure(r, body);
    return body;
  }

  function el(tag, attrs, children) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "text") n.textContent = v;
      else if (k === "on") for (const [ev, f] of Object.entries(v)) n.addEventListener(ev, f);
      else n.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children || []) if (c !== null && c !== undefined) n.append(c);
    return n;
  }

  function table(caption, columns, rows) {
    const head = el("tr", {}, columns.map((c) => el("th", { scope: "col", text: c.label })));
    const body = rows.map((r) => el("tr", {}, columns.map((c) => {
      const v = c.value(r);
      if (v instanceof Node) return el("td", {}, [v]);
      return el("td", c.num ? { class: "num", text: String(v) } : { text: v == null ? "" : String(v) });
    })));
    return el("div", { class: "table-wrap" }, [
      el("table", {}, [el("caption", { text: caption }), el("thead", {}, [head]), el("tbody", {}, body)]),
    ]);
  }

  let uid = 0;
  /** A labelled form field; `control` is an input or select element. */
  function field(label, control, attrs) {
    control.id = control.id || "f" + (++uid);
    return el("label", Object.assign({ for: control.id }, attrs), [label, control]);
  }

  function input(name, attrs) {
    return el("input", Object.assign({ name, type: "text", autocomplete: "off" }, attrs || {}));
  }

  function select(name, options, attrs) {
    return el("select", Object.assign({ name }, attrs || {}), optionsOf(options));
  }

  function optionsOf(options) {
    return options.map((o) => el("option", { value: o.value !== undefined ? o.value : o, text: o.label || o }));
  }

  function clearErrors(form) {
    for (const old of form.querySelectorAll(".field-error")) old.remove();
    for (const c of form.querySelectorAll("[aria-invalid]")) { c.removeAttribute("aria-invalid"); c.removeAttribute("aria-describedby"); }
  }

  /** Show an API error next to the field it is about (or the form). */
  function showError(form, e, fieldFor) {
    clearErrors(form);
    // The field an error is about: by its code, or for a rule refused whole
    // (`invalid_rule`), by the part of the rule its message names.
    const byMessage = e.code === "invalid_rule"
      ? ["grantee", "usage", "column", "population", "dataset"].find((w) => (e.message || "").includes(w))
      : null;
    // A refused role is about the whole form, not a field.
    const own = e.field && form.elements[e.field] ? e.field : null;
    const name = e.code === "forbidden" ? null : own || (fieldFor ? fieldFor(e.code, e.message || "", e.field) : null) ||
      ({ grantee: "to", usage: "usage", column: "column", population: "column", dataset: "dataset" }[byMessage]);
    const control = name ? form.elements[name] : null;
    const msg = el("p", { class: "field-error", role: "alert", id: "err" + (++uid), text: e.message });
    if (control) {
      control.setAttribute("aria-invalid", "true");
      control.setAttribute("aria-describedby", msg.id);
      control.closest("label").after(msg);
    } else {
      form.append(msg);
    }
  }

  /** Submit `form` to `action(formData)`; a refusal is shown next to its field (`fieldFor`). */
  function onSubmit(form, action, fieldFor) {
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        await action(new FormData(form), ev.submitter);
        clearErrors(form);
      } catch (e) {
        if (e.status === 401) return signedOut();
        showError(form, e, fieldFor);
      }
    });
  }

  /** A button that posts `body` to `path` and shows the page again; a refusal is shown by it. */
  function postButton(text, attrs, path, body) {
    const b = el("button", Object.assign({ type: "button", text }, attrs, { on: { click: async () => {
      try { await api(path, { method: "POST", json: body }); await show(); }
      catch (e) {
        if (e.status === 401) return signedOut();
        for (const old of b.parentNode.querySelectorAll(".error")) old.remove();
        b.after(el("p", { class: "error", role: "alert", text: e.message }));
      }
    } } }));
    return b;
  }

  /** Render what `work()` returns into `out`, saying `busy` meanwhile; a failure empties `out` and is passed on. */
  async function render(out, busy, work) {
    out.replaceChildren(el("p", { class: "muted", text: busy }));
    try { out.replaceChildren(...await work()); } catch (e) { out.replaceChildren(); throw e; }
  }

  function partnerOf(dataset) { return dataset.split(".")[0]; }

  /** The optional parts of an overlap question, their fields, and the fields their refusals concern. */
  const OVERLAP_PARTS = [["mine", "Your dataset (optional)"], ["theirs", "Their dataset (optional)"], ["by", "Break down by (optional)"]];
  const CO_SELLING_PARTS = [...OVERLAP_PARTS, ["my_customers", "Your customers (population, optional)"],
    ["my_opportunities", "Your open opportunities (optional)"], ["their_customers", "Their customers (optional)"],
    ["their_opportunities", "Their open opportunities (optional)"]];
  const overlapField = (code) => ({ unknown_column: "by", group_by_key: "by", ambiguous_dataset: "theirs" }[code]);
  function overlapRequest(f) {
    const body = { with: f.get("with") };
    for (const [k] of OVERLAP_PARTS) if (f.get(k)) body[k] = f.get(k);
    return body;
  }

  const pages = {
    async partners(view) {
      view.append(el("h1", { text: "Partners" }));
      const g = await api("/v1/policies");
      const names = new Set();
      for (const x of g.granted) names.add(x.to);
      for (const x of g.received) names.add(partnerOf(x.dataset));
      if (!names.size) {
        view.append(el("p", { class: "muted", text: "You share nothing with any partner yet, and no partner shares anything with you." }));
        return;
      }
      const cols = [
        { label: "Dataset", value: (x) => x.dataset },
        { label: "Use", value: (x) => x.usage },
        { label: "Column or population", value: (x) => x.population || x.column },
      ];
      for (const p of [...names].sort()) {
        const label = p === "*" ? "Every partner" : p;
        view.append(el("h2", { text: label }));
        const mine = g.granted.filter((x) => x.to === p);
        const theirs = g.received.filter((x) => partnerOf(x.dataset) === p);
        view.append(mine.length ? table("What you share with " + label, cols, mine)
          : el("p", { class: "muted", text: "You share nothing with " + label + "." }));
        if (p !== "*") {
          view.append(theirs.length ? table("What " + p + " shares with you", cols, theirs)
            : el("p", { class: "muted", text: p + " shares nothing with you." }));
        }
      }
    },

    async mapping(view) {
      view.append(el("h1", { text: "Account mapping" }));
      const g = await api("/v1/policies");
      const sharing = [...new Set(g.received.filter((x) => x.usage === "overlap").map((x) => partnerOf(x.dataset)))].sort();
      if (!sharing.length) {
        view.append(el("p", { class: "muted", text: "No partner shares overlap counts with you yet." }));
        return;
      }
      const form = el("form", { class: "inline", "aria-label": "Overlap question" }, [
        field("Partner", select("with", sharing)),
        ...OVERLAP_PARTS.map(([k, label]) => field(label, input(k))),
        el("button", { type: "submit", class: "primary", text: "Show overlap" }),
      ]);
      view.append(form, el("p", { class: "note", text:
        "A new question spends privacy budget with that partner; the same question on the same data versions again is free and gives the same answer. Counts carry noise; cells with too few companies are withheld." }));
      const out = el("div", { id: "mapping-result", "aria-live": "polite" });
      const history = el("section", { id: "mapping-history", "aria-live": "polite" });
      view.append(out, history);
      const showHistory = () => render(history, "Loading the history…", async () =>
        historyView(await api("/v1/overlaps/history?with=" + encodeURIComponent(form.elements.with.value))));
      form.elements.with.addEventListener("change", showHistory);
      // The co-selling report: one overlap question underneath (asked after the matrix of the
      // same datasets, it spends nothing).
      const report = el("form", { class: "inline", "aria-label": "Co-selling report" }, [
        field("Partner", select("with", sharing)),
        ...CO_SELLING_PARTS.map(([k, label]) => field(label, input(k))),
        el("button", { type: "submit", class: "primary", text: "Show co-selling report" }),
      ]);
      const reported = el("div", { id: "co-selling-result", "aria-live": "polite" });
      onSubmit(report, (f) => render(reported, "Counting…", async () => {
        const body = { with: f.get("with") };
        for (const [k] of CO_SELLING_PARTS) if (f.get(k)) body[k] = f.get(k);
        return coSellingView(await api("/v1/reports/co-selling", { method: "POST", json: body }), body);
      }), (code, message) => (code === "unknown_population" ? CO_SELLING_PARTS.map(([k]) => k).find((k) => message.includes(k.replace(/_/g, "-")) || message.includes(k)) : overlapField(code)));
      view.append(el("h2", { text: "Co-selling report" }), el("p", { class: "note", text:
        "Your customers among their open opportunities, and your open opportunities among their customers, from one overlap question: asked after the matrix of the same datasets, it spends nothing." }), report, reported);
      onSubmit(form, (f) => render(out, "Counting…", async () => {
        const body = overlapRequest(f);
        const view = overlapView(await api("/v1/overlaps", { method: "POST", json: body }), body);
        showHistory().catch(() => {});
        return view;
      }), overlapField);
      await showHistory();
    },

    async datasets(view) {
      view.append(el("h1", { text: "Datasets" }));
      const list = await api("/v1/datasets");
      if (!list.datasets.length) {
        view.append(el("p", { class: "muted", text: "No datasets yet." }));
      } else {
        view.append(table("Your datasets, latest version of each", [
          { label: "Name", value: (d) => d.name },
          { label: "Version", value: (d) => d.version, num: true },
          { label: "Rows", value: (d) => d.rows, num: true },
          { label: "Format", value: (d) => d.format },
          { label: "Key column", value: (d) => d.key_column || "none" },
          { label: "Uploaded", value: (d) => d.created_at },
          { label: "By", value: (d) => d.uploaded_by },
          { label: "Actions", value: (d) => el("span", { class: "actions" }, [
            el("button", { type: "button", text: "Versions of " + d.name, "aria-controls": "versions", on: { click: () => showVersions(d.name) } }),
            el("button", { type: "button", class: "danger", text: "Delete " + d.name, on: { click: () => confirmDelete(d.name) } }),
          ]) },
        ], list.datasets));
        view.append(el("section", { id: "versions", "aria-live": "polite" }));
      }
      view.append(el("h2", { text: "Upload a new dataset or version" }));
      view.append(uploadForm());
    },

    async questions(view) {
      view.append(el("h1", { text: "Questions" }));
      const sql = el("textarea", { name: "sql", rows: "6", cols: "80", spellcheck: "false", required: true });
      const form = el("form", { "aria-label": "Question" }, [
        field("SQL: one SELECT over partner.dataset tables; aggregates only", sql),
        el("p", {}, [
          el("button", { type: "submit", value: "explain", class: "", text: "Explain" }), " ",
          el("button", { type: "submit", value: "run", class: "primary", text: "Run" }),
        ]),
      ]);
      const out = el("div", { "aria-live": "polite" });
      view.append(form, el("p", { class: "note", text:
        "Explain shows every use the question makes and the grant that allows it, and what answering would cost, without reading data or spending anything. A question over another partner's data spends privacy budget; asking it again is free and gives the same answer." }), out);
      onSubmit(form, (f, submitter) => (submitter && submitter.value === "explain")
        ? render(out, "Checking…", async () => explainView(await api("/v1/queries/explain", { method: "POST", json: { sql: sql.value } })))
        : render(out, "Running…", async () => answerView(await api("/v1/queries", { method: "POST", json: { sql: sql.value, format: "json" } }))),
      () => "sql");
    },

    async policies(view) {
      await policyEditor(view);
      view.append(el("h2", { text: "History" }));
      const h = await api("/v1/policies/versions");
      const mayChange = ["admin", "compliance"].includes(session.role);
      if (!h.versions.length) {
        view.append(el("p", { class: "muted", text: "No changes yet." }));
        return;
      }
      const latest = h.versions[h.versions.length - 1].version;
      view.append(table("Policy versions, newest first", [
        { label: "Version", value: (v) => v.version, num: true },
        { label: "Time", value: (v) => v.time },
        { label: "By", value: (v) => v.by },
        { label: "Change", value: (v) => v.change },
        { label: "Diff", value: (v) => el("pre", { class: "diff", text: [...v.removed.map((l) => "- " + l), ...v.added.map((l) => "+ " + l)].join("\n") || "(no lines)" }) },
        { label: "Actions", value: (v) => (mayChange && v.version !== latest)
          ? postButton("Roll back to " + v.version, {}, "/v1/policies/rollback", { version: v.version })
          : "" },
      ], h.versions.slice().reverse()));
    },

    async users(view) {
      view.append(el("h1", { text: "Users" }));
      const list = await api("/v1/users");
      view.append(table("Users of " + list.partner + " and their roles", [
        { label: "User", value: (u) => u.user },
        { label: "Role", value: (u) => u.role },
        { label: "Actions", value: (u) => u.user === session.user ? "(you)"
          : postButton("Revoke " + u.user, { class: "danger" }, "/v1/users/revocations", { name: u.user }) },
      ], list.users));
      view.append(el("h2", { text: "Add a user" }));
      view.append(el("p", { class: "note", text:
        "A new user gets a certificate and its private key, so users are added with your certificate, not from the browser (a browser session must not become a lasting identity):" }));
      view.append(el("pre", { tabindex: "0", "aria-label": "Command to add a user", text: "escrow user add " + list.partner + " NAME --role analyst|uploader|compliance|admin --identity YOUR_BUNDLE --server " + window.location.origin }));
    },

    async audit(view) {
      view.append(el("h1", { text: "Audit" }));
      const status = el("p", { role: "status", class: "muted", text: "Verifying the chain…" });
      const since = el("input", { name: "since", type: "datetime-local" });
      const form = el("form", { class: "inline", "aria-label": "Filter the audit log" }, [
        field("Since (UTC)", since),
        field("Partner", input("partner")),
        field("Action", input("action")),
        field("Outcome", select("outcome", [{ value: "", label: "any" }, "ok", "refused", "failed"])),
        el("button", { type: "submit", class: "primary", text: "Filter" }),
        el("button", { type: "button", text: "Export the chain", on: { click: exportAudit } }),
      ]);
      const out = el("div", {});
      view.append(status, form, out);
      const load = async () => {
        const f = new FormData(form);
        const q = f.get("since") ? "?since=" + encodeURIComponent(new Date(f.get("since") + "Z").toISOString()) : "";
        const list = await api("/v1/audit" + q);
        const keep = (r) => (!f.get("partner") || (r.actor.partner || "") === f.get("partner") || (r.parties || []).includes(f.get("partner"))) &&
          (!f.get("action") || r.kind === f.get("action")) && (!f.get("outcome") || r.outcome === f.get("outcome"));
        const records = list.records.filter(keep).reverse();
        out.replaceChildren(table("Events you may see, newest first (" + records.length + ")", [
          { label: "#", value: (r) => r.seq, num: true },
          { label: "Time", value: (r) => r.time },
          { label: "Action", value: (r) => r.kind },
          { label: "Who", value: (r) => (r.actor.partner || "") + "/" + r.actor.user + (r.actor.via ? " (" + r.actor.via + ")" : "") },
          { label: "Outcome", value: (r) => r.outcome + (r.code ? ": " + r.code : "") },
        ], records.slice(0, 500)));
      };
      form.addEventListener("submit", async (ev) => { ev.preventDefault(); await load(); });
      await load();
      const v = await api("/v1/audit/verification");
      status.className = v.verified ? "" : "error";
      status.textContent = v.verified
        ? "Chain verified: " + v.records + " records (" + v.redacted + " of other partners redacted to their hashes), " + v.checkpoints + " signed checkpoints, head " + v.head.slice(0, 16) + "…"
        : "Chain verification FAILED at line " + v.line + ": " + v.reason;
    },
  };

  async function policyEditor(view) {
    view.append(el("h1", { text: "Policies" }));
    const [g, list, settings, pops] = await Promise.all([api("/v1/policies"), api("/v1/datasets"),
      api("/v1/policies/settings"), api("/v1/populations")]);
    view.append(g.granted.length ? table("Uses of your datasets you granted", [
      { label: "Dataset", value: (x) => x.dataset },
      { label: "To", value: (x) => x.to },
      { label: "Use", value: (x) => x.usage },
      { label: "Column or population", value: (x) => x.population || x.column },
      { label: "Actions", value: (x) => {
        const body = { dataset: x.dataset.split(".").slice(1).join("."), to: x.to, usage: x.usage };
        if (x.usage === "overlap") { if (x.population !== "*") body.population = x.population; } else if (x.column !== "*") body.column = x.column;
        return postButton("Revoke", { class: "danger", "aria-label": "Revoke " + x.usage + " of " + x.dataset + " to " + x.to }, "/v1/policies/revocations", body);
      } },
    ], g.granted) : el("p", { class: "muted", text: "You granted nothing yet." }));
    view.append(el("h2", { text: "Grant a use" }));
    const usages = ["join", "count", "dimension", "filter", "sum", "avg", "standalone", "overlap"];
    const form = el("form", { class: "inline", "aria-label": "Grant a use" }, [
      field("Dataset", select("dataset", list.datasets.map((d) => d.name))),
      field("To partner", input("to", { required: true })),
      field("Use", select("usage", usages)),
      field("Column (or population for overlap; empty: all)", input("column")),
      el("button", { type: "submit", class: "primary", text: "Grant" }),
    ]);
    onSubmit(form, async (f) => {
      const body = { dataset: f.get("dataset"), to: f.get("to"), usage: f.get("usage") };
      if (f.get("column")) body[f.get("usage") === "overlap" ? "population" : "column"] = f.get("column");
      await api("/v1/policies/grants", { method: "POST", json: body });
      await show();
    }, (code) => ({ unknown_column: "column", unknown_population: "column", unknown_dataset: "dataset", invalid_name: "to", unknown_partner: "to" }[code]));
    view.append(form);
    view.append(...settingsSection(list.datasets, Object.fromEntries(settings.datasets.map((d) => [d.dataset, d.settings]))));
    view.append(...populationsSection(list.datasets, pops.populations));
    // The partners you grant to or receive from, offered (not imposed) where a partner is named.
    const partners = new Set([...g.granted.map((x) => x.to), ...g.received.map((x) => partnerOf(x.dataset))]);
    partners.delete("*");
    partners.delete(session.partner);
    view.append(el("datalist", { id: "known-partners" }, [...partners].sort().map((p) => el("option", { value: p }))));
    view.append(...explainSection(), ...previewSection(list.datasets));
  }

  /** Show the page again, then say what changed under the heading `id`, and move there. */
  async function shown(id, message) {
    await show();
    const h = document.getElementById(id);
    if (!h) return;
    h.after(el("p", { role: "status", text: message }));
    h.focus();
  }

  /** A refusal made here, before asking the server, shaped as the server's and about `field`. */
  function refusal(code, field, message) {
    return Object.assign(new Error(message), { code, field });
  }

  // Protection settings: their names in the API and their labels (docs/API.md, "Protection
  // settings").
  const SETTINGS = [
    ["epsilon", "Epsilon per question"],
    ["budget", "Budget per partner (epsilon in all)"],
    ["min_entities", "Fewest companies per row (k)"],
    ["max_groups_per_entity", "Most groups per company (L)"],
  ];
  const WHOLE = ["min_entities", "max_groups_per_entity"];
  const isNumeric = (c) => /^u?(int|float|decimal|double)/i.test(c.type);

  /** A number typed for `field`, or a refusal next to it. */
  function numberIn(field, name, text, whole) {
    const n = Number(text);
    if (!text || !Number.isFinite(n) || (whole && !(Number.isSafeInteger(n) && n >= 0))) {
      throw refusal("invalid_setting", field, name + " must be " + (whole ? "a whole number" : "a finite number") + ", not " + JSON.stringify(text));
    }
    return n;
  }

  /** The form field a refused setting is about: the API names it (`field`), a column's bounds as `bounds.COLUMN`. */
  function settingField(code, message, apiField) {
    if (code !== "invalid_setting" || !apiField || !apiField.startsWith("bounds.")) return null;
    return message.startsWith("bounds need") ? "bounds_column" : "bounds_low";
  }

  function settingsSection(datasets, settings) {
    const parts = [el("h2", { id: "policy-settings", tabindex: "-1", text: "Protection settings" })];
    if (!datasets.length) return [...parts, el("p", { class: "muted", text: "No datasets yet." })];
    parts.push(el("p", { class: "note", text:
      "They apply to every question of another partner that reads the dataset: the noise of each answer (epsilon per question), " +
      "what each partner may spend on your data in all (epsilons add up in squares), the fewest companies a released row needs, " +
      "how many groups one company may count in, and the range a numeric column is clamped to (without bounds, partners may not SUM or AVG it)." }));
    const bounds = (name) => {
      const set = Object.entries(settings[name].bounds);
      return set.length ? el("ul", { class: "plain" }, set.map(([col, [lo, hi]]) => el("li", {}, [
        col + ": " + lo + " to " + hi + " ",
        postButton("Remove", { "aria-label": "Remove the bounds of " + col + " of " + name }, "/v1/policies/settings", { dataset: name, bounds: { [col]: null } }),
      ]))) : "none";
    };
    parts.push(table("Protection of your datasets now", [
      { label: "Dataset", value: (d) => d.name },
      ...SETTINGS.map(([k, label]) => ({ label, value: (d) => settings[d.name][k], num: true })),
      { label: "Bounds (for SUM and AVG)", value: (d) => bounds(d.name) },
    ], datasets));

    const dataset = select("dataset", datasets.map((d) => d.name));
    const column = select("bounds_column", []);
    const form = el("form", { class: "inline", "aria-label": "Change protection settings" }, [
      field("Dataset", dataset),
      ...SETTINGS.map(([k, label]) => field(label, input(k, { inputmode: WHOLE.includes(k) ? "numeric" : "decimal", size: "8" }))),
      field("Bounds of column", column),
      field("Lowest value", input("bounds_low", { inputmode: "decimal", size: "10" })),
      field("Highest value", input("bounds_high", { inputmode: "decimal", size: "10" })),
      el("button", { type: "submit", class: "primary", text: "Save settings" }),
    ]);
    const fillBounds = () => {
      const b = settings[dataset.value].bounds[column.value] || ["", ""];
      form.elements.bounds_low.value = b[0];
      form.elements.bounds_high.value = b[1];
    };
    const fill = () => {
      for (const [k] of SETTINGS) form.elements[k].value = settings[dataset.value][k];
      const numeric = datasets.find((d) => d.name === dataset.value).columns.filter(isNumeric).map((c) => c.name);
      column.replaceChildren(...optionsOf([{ value: "", label: numeric.length ? "(none)" : "(no numeric column)" }, ...numeric]));
      fillBounds();
    };
    dataset.addEventListener("change", fill);
    column.addEventListener("change", fillBounds);
    fill();
    onSubmit(form, async (f) => {
      const body = { dataset: f.get("dataset") };
      for (const [k] of SETTINGS) {
        const v = f.get(k).trim();
        if (v) body[k] = numberIn(k, k, v, WHOLE.includes(k));
      }
      const [col, lo, hi] = ["bounds_column", "bounds_low", "bounds_high"].map((k) => f.get(k).trim());
      if (!col && (lo || hi)) throw refusal("invalid_setting", "bounds_column", "bounds need a numeric column: choose which");
      if (col) body.bounds = { [col]: [numberIn("bounds_low", "the lowest value", lo), numberIn("bounds_high", "the highest value", hi)] };
      await api("/v1/policies/settings", { method: "POST", json: body });
      await shown("policy-settings", "Saved the protection of " + body.dataset + ".");
    }, settingField);
    parts.push(el("h3", { text: "Change them" }), form);
    return parts;
  }

  function populationsSection(datasets, populations) {
    const parts = [el("h2", { id: "policy-populations", tabindex: "-1", text: "Populations" }), el("p", { class: "note", text:
      "Named subsets of your datasets by a condition on their columns (never the key column). Overlap counts are counted between populations, " +
      "and an overlap grant shares them. With L = 1 (the default) a company counts only in the first of a dataset's populations it is in, in this order." })];
    parts.push(populations.length ? table("Populations of your datasets", [
      { label: "Dataset", value: (p) => p.dataset },
      { label: "Order", value: (p) => p.position, num: true },
      { label: "Name", value: (p) => p.name },
      { label: "Filter", value: (p) => el("code", { text: p.filter }) },
      { label: "Actions", value: (p) => el("button", { type: "button", class: "danger", text: "Remove", "aria-label": "Remove population " + p.name + " of " + p.dataset,
        on: { click: () => confirmDialog("Remove population " + p.name + " of " + p.dataset + "?",
          "The overlap grants that name it are removed with it (grants of every population stay): partners no longer see its overlap counts.",
          "Remove population", () => api("/v1/populations/removals", { method: "POST", json: { dataset: p.dataset, name: p.name } })) } }) },
    ], populations) : el("p", { class: "muted", text: "No populations yet." }));
    if (!datasets.length) return parts;
    const form = el("form", { class: "inline", "aria-label": "Define a population" }, [
      field("Dataset", select("dataset", datasets.map((d) => d.name))),
      field("Name", input("name", { required: true })),
      field("Filter: a condition on its columns", input("filter", { required: true, spellcheck: "false", placeholder: "status = 'customer'" }), { class: "wide" }),
      el("button", { type: "submit", class: "primary", text: "Define" }),
    ]);
    onSubmit(form, async (f) => {
      const body = { dataset: f.get("dataset"), name: f.get("name"), filter: f.get("filter") };
      const r = await api("/v1/populations", { method: "POST", json: body });
      await shown("policy-populations", (r.changed ? "Defined " : "Already defined: ") + body.name + " of " + body.dataset + ".");
    }, (code) => ({ invalid_name: "name", conflict: "name", too_many_populations: "dataset", not_found: "dataset",
      invalid_filter: "filter", population_names_key: "filter", unknown_column: "filter" }[code]));
    parts.push(el("h3", { text: "Define one" }), form);
    return parts;
  }

  function explainSection() {
    /** A question of `kind` ("SQL", "overlap"): its form, and the explanation under it. */
    const explainer = (kind, heading, controls, path, body, fieldFor) => {
      const out = el("section", { "aria-live": "polite", "aria-label": "Explanation of the " + kind + " question" });
      const form = el("form", { class: "inline", "aria-label": "Explain " + (kind === "SQL" ? "a SQL" : "an " + kind) + " question" },
        [...controls, el("button", { type: "submit", class: "primary", text: "Explain " + kind })]);
      onSubmit(form, (f) => render(out, "Checking…", async () => explainView(await api(path, { method: "POST", json: body(f) }))), fieldFor);
      return [el("h3", { text: heading }), form, out];
    };
    return [
      el("h2", { text: "Explain a question" }),
      el("p", { class: "note", text: "Whether a question would be answered if you asked it, rule by rule: the grant that allows each use or the one missing, " +
        "the protection that would apply and what it would cost. Nothing is read, run or spent." }),
      ...explainer("SQL", "A SQL question",
        [field("SQL question", el("textarea", { name: "sql", rows: "4", cols: "80", spellcheck: "false", required: true }), { class: "wide" })],
        "/v1/queries/explain", (f) => ({ sql: f.get("sql") }), () => "sql"),
      ...explainer("overlap", "An overlap question (account mapping)",
        [field("Partner", input("with", { required: true, list: "known-partners" })), ...OVERLAP_PARTS.map(([k, label]) => field(label, input(k)))],
        "/v1/overlaps/explain", overlapRequest, (code) => overlapField(code) || "with"),
    ];
  }

  function previewSection(datasets) {
    const out = el("section", { "aria-live": "polite", "aria-label": "What the partner can learn" });
    const form = el("form", { class: "inline", "aria-label": "Preview a partner" }, [
      field("Partner", input("partner", { required: true, list: "known-partners" })),
      field("Dataset", select("dataset", [{ value: "", label: "all of yours" }, ...datasets.map((d) => d.name)])),
      el("button", { type: "submit", class: "primary", text: "Preview" }),
    ]);
    onSubmit(form, (f) => render(out, "Looking…", async () => {
      const q = new URLSearchParams({ partner: f.get("partner") });
      if (f.get("dataset")) q.set("dataset", f.get("dataset"));
      return previewView(await api("/v1/policies/preview?" + q));
    }), (code, message) => (/dataset/.test(message) ? "dataset" : "partner"));
    return [
      el("h2", { text: "What a partner can learn" }),
      el("p", { class: "note", text: "What another partner can ask of your datasets now: the columns and uses you granted it, " +
        "the populations whose overlap counts it sees, the protection in force, its budget, and what that budget guarantees." }),
      form, out,
    ];
  }

  /** The overlap answer: a heatmap of your populations x theirs, protection and budget. */
  function overlapView(a, request) {
    const parts = [];
    const mine = a.populations.mine, theirs = a.populations.theirs;
    const counts = a.rows.filter((r) => !r.suppressed).map((r) => r.count);
    const max = Math.max(1, ...counts);
    if (!a.by) {
      const cell = (m, t) => a.rows.find((r) => r.mine === m && r.theirs === t);
      const head = el("tr", {}, [el("th", { scope: "col", text: "Yours \u2193 / theirs \u2192" }), ...theirs.map((t) => el("th", { scope: "col", text: t }))]);
      const rows = mine.map((m) => el("tr", {}, [el("th", { scope: "row", text: m }), ...theirs.map((t) => {
        const c = cell(m, t);
        if (!c || c.suppressed) {
          return el("td", { class: "cell suppressed", title: "Withheld: too few companies to say (it may hold a handful or none)", text: "withheld" });
        }
        const td = el("td", { class: "cell", text: String(c.count) });
        // Darker is more; two bands keep the text readable on either.
        const t01 = Math.max(0, c.count) / max;
        const light = t01 <= 0.5 ? 95 - 70 * t01 : 40 - 30 * (t01 - 0.5);
        td.style.backgroundColor = "hsl(210, 70%, " + light.toFixed(1) + "%)";
        td.style.color = light <= 40 ? "#ffffff" : "#1b1f24";
        return td;
      })]));
      parts.push(el("div", { class: "table-wrap heat" }, [el("table", {}, [
        el("caption", { text: "Companies in both lists: " + a.mine + " \u00d7 " + a.theirs }),
        el("thead", {}, [head]), el("tbody", {}, rows)])]));
      parts.push(el("p", { class: "legend" }, [
        el("span", {}, [el("span", { class: "swatch", "aria-hidden": "true" }), "darker: more companies (largest shown: " + max + ")"]),
        el("span", {}, [el("span", { class: "swatch suppressed-swatch", "aria-hidden": "true" }), "withheld: below the release threshold"]),
      ]));
    } else {
      parts.push(table("Companies in both lists by " + a.by + ": " + a.mine + " \u00d7 " + a.theirs, [
        { label: "Yours", value: (r) => r.mine },
        { label: "Theirs", value: (r) => r.theirs },
        { label: a.by, value: (r) => (a.by in r ? r[a.by] : r.value) },
        { label: "Companies", value: (r) => (r.suppressed ? "withheld" : r.count), num: true },
      ], a.rows));
    }
    parts.push(...countsNote(a), el("button", { type: "button", text: "Download CSV", on: { click: () => download("/v1/overlaps", request, "overlap") } }));
    return parts;
  }

  /** The noise, threshold and charge of an overlap-shaped answer, and its budget gauges. */
  function countsNote(a) {
    const p = a.protection || {};
    return [el("p", { class: "note", text:
      "Each count carries discrete Gaussian noise (standard deviation " + fmt(p.noise_sd) + "); a cell is shown only with at least " +
      p.min_entities + " companies and a noisy count of " + fmt(p.release_threshold) + " or more. This answer " +
      (a.repeated ? "repeats an earlier one and spent nothing." : "spent \u03b5 " + fmt(a.epsilon_spent) + ".") }),
      ...(a.budgets || []).map((b) => budgetGauge(b))];
  }

  /** The co-selling report: where you can introduce them, and where they can introduce you. */
  function coSellingView(r, request) {
    const parts = [el("h2", { text: "Co-selling with " + request.with + ": " + r.mine + " \u00d7 " + r.theirs })];
    const titles = ["Your customers among their open opportunities (you can introduce them)",
      "Your open opportunities among their customers (they can introduce you)"];
    r.sections.forEach((s, i) => {
      const caption = (titles[i] || "Section") + ": your " + s.mine + " \u00d7 their " + s.theirs;
      parts.push(table(caption, [
        ...(r.by ? [{ label: r.by, value: (c) => (r.by in c ? c[r.by] : c.value) }] : []),
        { label: "Companies (noisy)", value: (c) => (c.suppressed ? "withheld" : c.count), num: true },
      ], s.rows));
      const shown = s.rows.filter((c) => !c.suppressed);
      if (r.by && shown.length > 1 && shown.length <= 50) parts.push(barChart(r.by, "Companies", shown.map((c) => [String(r.by in c ? c[r.by] : c.value), c.count])));
    });
    parts.push(...countsNote(r), el("button", { type: "button", text: "Download the report as CSV", on: { click: () => download("/v1/reports/co-selling", request, "co-selling") } }));
    return parts;
  }


  /** Why a question would be answered or refused, as `escrow policy explain` prints it. */
  function explainView(x) {
    const parts = [el("p", { class: x.allowed ? "decision" : "decision error",
      text: x.allowed ? "Allowed: every use is granted." : "Refused by rule " + x.refusal.rule + ": " + x.refusal.message })];
    if (x.datasets.length) parts.push(el("p", { text: "Reads: " + x.datasets.join(", ") }));
    if (x.uses.length) {
      parts.push(table("Uses of each column or population, and what allows them", [
        { label: "Of", value: (u) => (u.column ? u.dataset + "." + u.column : u.population ? "population " + u.population + " of " + u.dataset : u.dataset) },
        { label: "As", value: (u) => u.usage },
        { label: "Decision", value: (u) => ({ owner: "your own data", granted: "granted", missing: "MISSING GRANT" }[u.decision] || u.decision) },
        { label: "Granting rule, or how to grant it", value: (u) => el("code", { text: u.rule || u.missing_grant || "" }) },
      ], x.uses));
    }
    const p = x.protection;
    if (p) parts.push(el("p", { text: "Protection: " + protection(p) + " (settings of " + p.from.join(", ") + ")." }));
    if (x.cost) {
      parts.push(el("p", { class: "note", text: x.cost.repeated ? "Answering now would repeat an earlier answer: free." : "Answering now would spend \u03b5 " + fmt(x.cost.epsilon_spent) + "." }));
      for (const b of x.cost.budgets) parts.push(budgetGauge(b, "Budget on " + b.dataset + " after it: " + fmt(b.spent) + " of " + fmt(b.budget) + " spent "));
    }
    return parts;
  }

  function protection(s) {
    return "rows need at least " + s.min_entities + " companies, \u03b5 " + s.epsilon + " per question, at most " +
      s.max_groups_per_entity + " group" + (s.max_groups_per_entity === 1 ? "" : "s") + " per company";
  }

  /** What a partner can ask of your datasets, as `escrow policy preview` prints it. */
  function previewView(p) {
    const who = p.partner;
    if (!p.datasets.length) return [el("p", { class: "muted", text: "You have no datasets." })];
    return p.datasets.flatMap((d) => {
      const parts = [
        el("h3", { text: d.dataset + " (version " + d.version + ")" }),
        el("p", { text: d.visible ? who + " can name it in queries." : who + " cannot see it." }),
      ];
      const uses = d.columns.flatMap((c) => c.usages.map((u) => Object.assign({ column: c.column }, u)));
      parts.push(uses.length ? table("Columns of " + d.dataset + " " + who + " may use", [
        { label: "Column", value: (u) => u.column },
        { label: "As", value: (u) => u.usage },
        { label: "Granted by", value: (u) => el("code", { text: u.rule }) },
      ], uses) : el("p", { class: "muted", text: "No column of it is granted to " + who + "." }));
      parts.push(el("p", { text: d.standalone ? "Standalone: yes (" + d.standalone + ")."
        : "Standalone: no (only joined to " + who + "'s own datasets)." }));
      if (d.populations.length) {
        parts.push(table("Populations of " + d.dataset, [
          { label: "Population", value: (x) => x.name },
          { label: "Overlap counts for " + who, value: (x) => (x.visible ? "visible" : "hidden") },
          { label: "Granted by", value: (x) => (x.rule ? el("code", { text: x.rule }) : "") },
        ], d.populations));
      }
      const bounds = Object.entries(d.settings.bounds).map(([c, [lo, hi]]) => c + " to " + lo + ".." + hi);
      parts.push(el("p", { text: "Protection: " + protection(d.settings) + "; SUM and AVG clamp " + (bounds.join(", ") || "no column (none may be summed)") + "." }));
      parts.push(budgetGauge(d.budget, who + " has spent " + fmt(d.budget.spent) + " of its budget of " + fmt(d.budget.budget) +
        " on your data; one more question may cost up to \u03b5 " + fmt(d.remaining) + " "));
      parts.push(el("p", { class: "guarantee" }, [el("strong", { text: "What the budget guarantees: " }), d.guarantee + "."]));
      if (d.notes.length) parts.push(el("ul", {}, d.notes.map((n) => el("li", { text: "Note: " + n }))));
      return parts;
    });
  }

  /** A query's answer: a table, and a bar chart when it has a label column and a number. */
  function answerView(a) {
    const cols = a.columns;
    const rows = a.rows.map((r, i) => ({ r, s: a.suppressed[i] }));
    const parts = [table("Answer" + (a.protection ? " (protected: noisy, thresholded)" : " (your own data only: exact)"), [
      ...cols.map((c, j) => ({ label: c.name, value: (x) => (x.s ? "withheld" : x.r[j]), num: /Int|Float|Decimal/.test(c.type) })),
    ], rows)];
    const label = cols.findIndex((c) => !/Int|Float|Decimal/.test(c.type));
    const value = cols.findIndex((c) => /Int|Float|Decimal/.test(c.type));
    const shown = rows.filter((x) => !x.s && typeof x.r[value] === "number");
    if (label >= 0 && value >= 0 && shown.length > 1 && shown.length <= 50) parts.push(barChart(cols[label].name, cols[value].name, shown.map((x) => [String(x.r[label]), x.r[value]])));
    if (a.protection) {
      parts.push(el("p", { class: "note", text: "Noise standard deviation " + fmt(a.protection.noise_sd) + "; rows need " + a.protection.min_entities +
        " companies and a noisy count of " + fmt(a.protection.release_threshold) + ". " + (a.repeated ? "A repeat: nothing spent." : "Spent \u03b5 " + fmt(a.epsilon_spent) + ".") }));
      for (const b of a.budgets || []) parts.push(budgetGauge(b));
    }
    return parts;
  }

  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, text) {
    const n = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
    if (text !== undefined) n.textContent = text;
    return n;
  }

  /**
   * The overlaps released with one partner before, over both sides' dataset versions: one cell
   * (your population x theirs) chosen at a time, as a table and a line chart. These are counts
   * you were already shown; nothing is counted or spent.
   */
  function historyView(h) {
    const parts = [el("h2", { text: "Overlap with " + h.with + " over dataset versions" })];
    if (!h.released.length) {
      return [...parts, el("p", { class: "muted", text: "No overlap with " + h.with + " released to you yet: answers appear here as you ask." })];
    }
    const pairs = [...new Set(h.released.flatMap((r) => r.cells.map((c) => c.mine + " \u00d7 " + c.theirs)))];
    const choice = select("cell", pairs);
    const shown = el("div");
    const draw = () => {
      const points = h.released.map((r) => {
        const c = r.cells.find((x) => x.mine + " \u00d7 " + x.theirs === choice.value);
        return { at: r.released_at, mine: r.mine, theirs: r.theirs, count: c ? c.count : undefined };
      });
      shown.replaceChildren(
        table("Released counts of " + choice.value + ", oldest first", [
          { label: "Released", value: (p) => when(p.at) },
          { label: "Your version", value: (p) => p.mine },
          { label: "Their version", value: (p) => p.theirs },
          { label: "Companies in both (noisy)", value: (p) => p.count === undefined ? "not asked" : p.count === null ? "withheld" : p.count, num: true },
        ], points),
        lineChart("Companies in both, " + choice.value, points.map((p) => [versionOf(p.mine) + " \u00d7 " + versionOf(p.theirs), p.count])));
    };
    choice.addEventListener("change", draw);
    draw();
    parts.push(el("form", { class: "inline", "aria-label": "Cell of the history" }, [field("Cell (yours \u00d7 theirs)", choice)]), shown);
    return parts;
  }

  /** An RFC 3339 time as people read it: `2026-12-05 12:54:28 UTC`. */
  function when(rfc3339) { return rfc3339.replace("T", " ").replace(/(\.\d+)?(Z|\+00:00)$/, " UTC"); }

  function versionOf(label) { return label.slice(label.lastIndexOf("@") + 1); }

  /** A line chart of `[label, value]` points in order; a null or missing value is a gap, marked. */
  function lineChart(valueName, data) {
    const known = data.map((d) => d[1]).filter((v) => typeof v === "number");
    const max = Math.max(1, ...known);
    const left = 60, top = 16, width = 620, height = 200, step = data.length > 1 ? width / (data.length - 1) : 0;
    const x = (i) => left + (data.length > 1 ? i * step : width / 2);
    const y = (v) => top + height - (height * Math.max(0, v)) / max;
    const chart = svg("svg", { role: "img", "aria-label": valueName + " by versions (line chart of the table above)",
      viewBox: "0 0 " + (left + width + 40) + " " + (top + height + 56), class: "chart" });
    chart.append(svg("line", { x1: left, y1: top + height, x2: left + width, y2: top + height, stroke: "#5f6b7a" }));
    chart.append(svg("text", { x: left - 8, y: top + 5, "text-anchor": "end", "font-size": 12, fill: "#1b1f24" }, fmt(max)));
    chart.append(svg("text", { x: left - 8, y: top + height, "text-anchor": "end", "font-size": 12, fill: "#1b1f24" }, "0"));
    let run = [];
    const flush = () => {
      if (run.length > 1) chart.append(svg("polyline", { points: run.join(" "), fill: "none", stroke: "#0b5cad", "stroke-width": 2 }));
      run = [];
    };
    data.forEach(([label, v], i) => {
      chart.append(svg("text", { x: x(i), y: top + height + 18, "text-anchor": "middle", "font-size": 12, fill: "#1b1f24" }, label));
      if (typeof v !== "number") {
        flush();
        chart.append(svg("text", { x: x(i), y: top + height - 6, "text-anchor": "middle", "font-size": 12, fill: "#5f6b7a" }, "withheld"));
        return;
      }
      run.push(x(i) + "," + y(v));
      chart.append(svg("circle", { cx: x(i), cy: y(v), r: 4, fill: "#0b5cad" }));
      chart.append(svg("text", { x: x(i), y: y(v) - 8, "text-anchor": "middle", "font-size": 12, fill: "#1b1f24" }, fmt(v)));
    });
    flush();
    return el("figure", {}, [chart, el("figcaption", { class: "muted", text: valueName + ", by your version \u00d7 theirs" })]);
  }

  function barChart(labelName, valueName, data) {
    const max = Math.max(1, ...data.map((d) => d[1]));
    const bar = 22, gap = 6, left = 160, width = 560;
    const chart = svg("svg", { role: "img", "aria-label": valueName + " by " + labelName + " (bar chart of the table above)",
      viewBox: "0 0 " + (left + width + 60) + " " + (data.length * (bar + gap)), class: "chart" });
    data.forEach(([l, v], i) => {
      const y = i * (bar + gap);
      chart.append(svg("text", { x: left - 8, y: y + bar * 0.7, "text-anchor": "end", "font-size": 13, fill: "#1b1f24" }, l.length > 22 ? l.slice(0, 21) + "…" : l));
      chart.append(svg("rect", { x: left, y, width: Math.max(1, (width * Math.max(0, v)) / max), height: bar, fill: "#0b5cad" }));
      chart.append(svg("text", { x: left + (width * Math.max(0, v)) / max + 6, y: y + bar * 0.7, "font-size": 13, fill: "#1b1f24" }, fmt(v)));
    });
    return el("figure", {}, [chart, el("figcaption", { class: "muted", text: valueName + " by " + labelName })]);
  }

  /** Every version of one of your datasets: a table, and how its rows matched as a chart. */
  async function showVersions(name) {
    const out = document.getElementById("versions");
    out.replaceChildren(el("p", { class: "muted", text: "Loading versions…" }));
    try {
      const v = await api("/v1/datasets/" + encodeURIComponent(name) + "/versions");
      const m = (x, k) => (x.matching ? x.matching[k] : "—");
      out.replaceChildren(
        el("h2", { text: "Versions of " + v.dataset }),
        table("Every version of " + v.dataset + ", oldest first", [
          { label: "Version", value: (x) => x.version, num: true },
          { label: "Uploaded", value: (x) => x.created_at },
          { label: "By", value: (x) => x.uploaded_by },
          { label: "Rows", value: (x) => x.rows, num: true },
          { label: "Bytes", value: (x) => x.source_bytes, num: true },
          { label: "Key column", value: (x) => x.key_column || "none" },
          { label: "Matched by domain", value: (x) => m(x, "by_domain"), num: true },
          { label: "Matched by name", value: (x) => m(x, "by_name"), num: true },
          { label: "Unmatched", value: (x) => m(x, "unmatched"), num: true },
        ], v.versions),
        matchingChart(v),
      );
    } catch (e) {
      if (e.status === 401) return signedOut();
      out.replaceChildren(el("p", { class: "error", role: "alert", text: e.message }));
    }
  }

  /** Rows of each version split by how they matched (stacked bars; a table above says the same). */
  function matchingChart(v) {
    const parts = [["by_domain", "by domain", "#0b5cad", "m-domain"], ["by_name", "by name", "#5b8fd1", "m-name"], ["unmatched", "unmatched", "#c9ced6", "m-unmatched"]];
    const max = Math.max(1, ...v.versions.map((x) => x.rows));
    const bar = 22, gap = 8, left = 60, width = 560;
    const chart = svg("svg", { role: "img", "aria-label": "Rows of each version of " + v.dataset + " by how their companies matched (stacked bar chart of the table above)",
      viewBox: "0 0 " + (left + width + 80) + " " + (v.versions.length * (bar + gap) + 24), class: "chart" });
    v.versions.forEach((x, i) => {
      const y = i * (bar + gap);
      chart.append(svg("text", { x: left - 8, y: y + bar * 0.7, "text-anchor": "end", "font-size": 13, fill: "#1b1f24" }, "v" + x.version));
      let at = left;
      const split = x.matching ? parts.map(([k, , c]) => [x.matching[k], c]) : [[x.rows, "#8a939e"]];
      for (const [n, color] of split) {
        const w = (width * n) / max;
        if (w > 0) chart.append(svg("rect", { x: at, y, width: w, height: bar, fill: color }));
        at += w;
      }
      chart.append(svg("text", { x: at + 6, y: y + bar * 0.7, "font-size": 13, fill: "#1b1f24" }, fmt(x.rows)));
    });
    const legend = el("ul", { class: "legend" }, parts.map(([, label, , cls]) =>
      el("li", {}, [el("span", { class: "swatch " + cls, "aria-hidden": "true" }), label])));
    return el("figure", {}, [chart, legend, el("figcaption", { class: "muted", text: "Rows per version, by how their companies matched" })]);
  }

  function budgetGauge(b, label) {
    const id = "budget" + (++uid);
    return el("p", {}, [
      el("label", { for: id, text: label || "Budget on " + b.dataset + ": " + fmt(b.spent) + " of " + fmt(b.budget) + " spent " }),
      el("meter", { id, min: "0", max: String(b.budget), value: String(b.spent), high: String(b.budget * 0.75), optimum: "0" }),
    ]);
  }

  async function exportAudit() {
    const r = await api("/v1/audit/export", { raw: true });
    const a = el("a", { href: URL.createObjectURL(await r.blob()), download: "escrow-audit.jsonl" });
    document.body.append(a);
    a.click();
    a.remove();
  }

  function fmt(x) { return typeof x === "number" ? String(Math.round(x * 1000) / 1000) : String(x); }

  async function download(path, request, name) {
    const r = await api(path, { method: "POST", json: Object.assign({}, request, { format: "csv" }), raw: true });
    const blob = await r.blob();
    const a = el("a", { href: URL.createObjectURL(blob), download: name + "-" + request.with + ".csv" });
    document.body.append(a);
    a.click();
    a.remove();
  }

  function uploadForm() {
    const file = el("input", { name: "file", type: "file", required: true, accept: ".csv,.parquet,.pq,.arrow,.arrows,.feather,.ipc" });
    const progress = el("progress", { max: "100", value: "0", hidden: true, "aria-label": "Upload progress" });
    const status = el("p", { class: "muted", role: "status" });
    const form = el("form", { class: "inline", "aria-label": "Upload" }, [
      field("File (CSV, Parquet, Arrow IPC)", file),
      field("Dataset name", input("name", { required: true, pattern: "[a-z][a-z0-9_]*" })),
      field("Key column", input("key_column", { value: "website" })),
      field("Name column (optional)", input("name_column")),
      el("button", { type: "submit", class: "primary", text: "Upload" }),
    ]);
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const f = new FormData(form);
      const chosen = file.files[0];
      const ext = chosen.name.split(".").pop().toLowerCase();
      const format = { csv: "csv", parquet: "parquet", pq: "parquet", arrow: "arrow", feather: "arrow", ipc: "arrow", arrows: "arrow-stream" }[ext] || "csv";
      const q = new URLSearchParams({ format });
      for (const k of ["key_column", "name_column"]) if (f.get(k)) q.set(k, f.get(k));
      // XMLHttpRequest: the only browser API that reports upload progress; the file is
      // streamed from disk, never read into memory.
      const x = new XMLHttpRequest();
      x.open("PUT", "/v1/datasets/" + encodeURIComponent(f.get("name")) + "?" + q);
      const h = headers({}, "PUT");
      for (const [k, v] of Object.entries(h)) x.setRequestHeader(k, v);
      progress.hidden = false;
      progress.value = 0;
      status.textContent = "Uploading " + chosen.name + "…";
      x.upload.addEventListener("progress", (e) => {
        if (e.lengthComputable) progress.value = Math.round((100 * e.loaded) / e.total);
      });
      x.addEventListener("load", async () => {
        let body = null;
        try { body = JSON.parse(x.responseText); } catch (_) { body = null; }
        if (x.status >= 200 && x.status < 300) {
          progress.value = 100;
          await show();
          const done = document.querySelector("[role=status]");
          const places = (body.places || []).length ? " Name links are checked against each company's place (" + body.places.join(", ") + ")." : "";
          if (done) done.textContent = "Uploaded " + body.dataset + " version " + body.version + ": " + body.rows + " rows sealed." + places;
        } else {
          progress.hidden = true;
          status.textContent = "";
          showError(form, failure({ status: x.status }, body), (code) => ({ bad_csv: "file", unknown_column: "key_column", invalid_name: "name" }[code]));
        }
      });
      x.addEventListener("error", () => { status.textContent = "The upload failed: the connection was lost."; });
      x.send(chosen);
    });
    return el("div", {}, [form, progress, status]);
  }

  function confirmDelete(name) {
    confirmDialog("Delete " + name + "?",
      "Every version of " + name + " is crypto-shredded: its keys are destroyed and nobody, you included, can read it again. This cannot be undone.",
      "Delete for good", () => api("/v1/datasets/" + encodeURIComponent(name), { method: "DELETE" }));
  }

  /** A modal confirmation; `action` runs on confirm, then the page is shown again. A refusal stays in the dialog. */
  function confirmDialog(title, text, label, action) {
    const id = "dlg" + (++uid);
    const dialog = el("dialog", { "aria-labelledby": id }, [el("h2", { id, text: title }), el("p", { text })]);
    const cancel = el("button", { type: "button", text: "Cancel", on: { click: () => dialog.close() } });
    const confirm = el("button", { type: "button", class: "danger", text: label, on: { click: async () => {
      try { await action(); dialog.close(); await show(); }
      catch (e) {
        if (e.status === 401) { dialog.close(); return signedOut(); }
        dialog.append(el("p", { class: "error", role: "alert", text: e.message }));
      }
    } } });
    dialog.append(el("p", {}, [cancel, " ", confirm]));
    dialog.addEventListener("close", () => dialog.remove());
    document.body.append(dialog);
    dialog.showModal();
    cancel.focus();
  }

  async function show() {
    const view = document.getElementById("view");
    const name = (window.location.hash || "#partners").slice(1);
    const page = pages[name] ? name : "partners";
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
