"""The approvals page: one self-contained HTML document (inline CSS and vanilla JS).

Everything the page shows is set with ``textContent`` / ``setAttribute``, never as HTML:
statements, reasons and names are attacker-controlled. The server adds a per-response CSP
nonce (``{{NONCE}}``) so no other script can run. The bearer token is kept in
``sessionStorage`` (this tab only) and sent as an ``Authorization`` header, never a cookie,
so the API needs no CSRF defence.

Stable hooks for browser tests: ``#token``, ``#save-token``, ``#message``, ``#whoami``;
pending rows ``tr[data-request-id=ID]`` in ``#pending-body`` with ``#reason-ID``, ``#for-ID``,
``#approve-ID`` and ``#deny-ID``; decided rows in ``#recent-body`` (``data-status``); windows
in ``#windows-body`` with ``#revoke-WINDOWID``.
"""

from __future__ import annotations

from typing import Final

PAGE_TEMPLATE: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>pgguard approvals</title>
<style>
  :root { color-scheme: light dark; --muted: #777; --ok: #1a7f37; --bad: #cf222e; }
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; }
  header { display: flex; align-items: baseline; gap: 1rem; flex-wrap: wrap; }
  h1 { font-size: 1.3rem; margin: 0; }
  h2 { font-size: 1.05rem; margin: 1.5rem 0 .5rem; }
  #whoami { color: var(--muted); }
  form#token-form { display: flex; gap: .5rem; margin: 1rem 0; align-items: center; }
  #token { width: 28rem; max-width: 60vw; }
  table { border-collapse: collapse; width: 100%; }
  th, td { border-bottom: 1px solid #8884; padding: .35rem .5rem; text-align: left;
           vertical-align: top; }
  th { font-weight: 600; white-space: nowrap; }
  pre.sql { margin: 0; white-space: pre-wrap; word-break: break-word; max-height: 16rem;
            overflow: auto; font: 12px/1.35 ui-monospace, monospace; }
  .params { color: var(--muted); font: 12px ui-monospace, monospace; }
  .decide { display: grid; gap: .3rem; min-width: 15rem; }
  .decide .buttons { display: flex; gap: .3rem; }
  .approve { color: var(--ok); } .deny { color: var(--bad); }
  .status-approved { color: var(--ok); } .status-denied { color: var(--bad); }
  .status-expired, .status-withdrawn, .muted { color: var(--muted); }
  #message { min-height: 1.3em; margin: .3rem 0; }
  #message.error { color: var(--bad); } #message.ok { color: var(--ok); }
  .empty { color: var(--muted); font-style: italic; }
</style>
</head>
<body>
<header>
  <h1>pgguard approvals</h1>
  <span id="whoami">not signed in</span>
</header>
<form id="token-form" autocomplete="off">
  <label for="token">Bearer token</label>
  <input id="token" name="token" type="password" spellcheck="false"
         placeholder="paste a JWT (pgguard token mint …)">
  <button id="save-token" type="submit">Use token</button>
  <button id="forget-token" type="button">Forget</button>
</form>
<p id="message" role="status" aria-live="polite"></p>

<h2>Pending</h2>
<table id="pending">
  <thead><tr><th>Age</th><th>Requester</th><th>Rule</th><th>Prompt</th><th>Database</th>
  <th>Statement</th><th>Decision</th></tr></thead>
  <tbody id="pending-body"></tbody>
</table>
<p id="pending-empty" class="empty">No pending requests.</p>

<h2>Recently decided</h2>
<table id="recent">
  <thead><tr><th>Decided</th><th>Status</th><th>Requester</th><th>Rule</th><th>Decider</th>
  <th>Reason</th><th>Statement</th></tr></thead>
  <tbody id="recent-body"></tbody>
</table>

<h2>Active windows</h2>
<table id="windows">
  <thead><tr><th>User</th><th>Rule</th><th>Until</th><th>Granted by</th><th></th></tr></thead>
  <tbody id="windows-body"></tbody>
</table>

<script nonce="{{NONCE}}">
"use strict";
(function () {
  const KEY = "pgguard.approvals.token";
  const API = "/api/approvals";
  const $ = (id) => document.getElementById(id);
  const pendingRows = new Map();  // request id -> row; kept so typed reasons survive refreshes
  let busy = false;
  let currentUser = null;
  let refreshFailed = false;  // the message shows a refresh error (cleared by a good refresh)

  const token = () => sessionStorage.getItem(KEY) || "";

  function say(text, isError) {
    refreshFailed = false;
    const m = $("message");
    m.textContent = text;
    m.className = isError ? "error" : "ok";
  }

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") e.textContent = v == null ? "" : String(v);
      else e.setAttribute(k, String(v));
    }
    for (const c of children) e.append(c);
    return e;
  }

  function age(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
    return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
  }

  const when = (ts) => ts == null ? "" : new Date(ts * 1000).toLocaleString();
  const clip = (text, n) => (text || "").length > n ? text.slice(0, n - 1) + "\\u2026" : text;

  async function api(method, path, body) {
    const headers = { "Authorization": "Bearer " + token() };
    const init = { method: method, headers: headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const res = await fetch(path, init);
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (!res.ok) {
      const err = new Error((data && data.error) || ("HTTP " + res.status));
      err.status = res.status;
      throw err;
    }
    return data;
  }

  function statementCell(r) {
    const cell = el("td", {}, el("pre", { "class": "sql", text: r.statement }));
    if (r.params && r.params.length) {
      const shown = r.params.map((p, i) => "$" + (i + 1) + "=" + (p === null ? "NULL" : p));
      cell.append(el("div", { "class": "params", text: clip(shown.join(", "), 500) }));
    }
    return cell;
  }

  function decisionCell(r) {
    const id = r.id;
    if (!r.can_decide) {
      const why = r.requester === currentUser ? "your own request" : "you may not decide this";
      return el("td", { "class": "muted", text: why + " (approvers: " +
        (r.approvers || []).join(", ") + ")" });
    }
    const reason = el("input", { id: "reason-" + id, "class": "reason", type: "text",
      placeholder: "reason (required to deny)", "data-request-id": id, maxlength: "2000" });
    const forInput = el("input", { id: "for-" + id, "class": "for", type: "text",
      placeholder: "window, e.g. 30m (optional)", "data-request-id": id, size: "12" });
    const approve = el("button", { id: "approve-" + id, "class": "approve", type: "button",
      "data-request-id": id, "data-action": "approve", text: "Approve" });
    const deny = el("button", { id: "deny-" + id, "class": "deny", type: "button",
      "data-request-id": id, "data-action": "deny", text: "Deny" });
    return el("td", {}, el("div", { "class": "decide" }, reason, forInput,
      el("div", { "class": "buttons" }, approve, deny)));
  }

  function pendingRow(r) {
    const row = el("tr", { "data-request-id": r.id, id: "request-" + r.id,
      "data-can-decide": r.can_decide ? "1" : "0" });
    row.append(
      el("td", { "class": "age", text: age(r.age) }),
      el("td", { text: r.requester }),
      el("td", { text: r.rule }),
      el("td", { text: r.prompt_id || "" }),
      el("td", { text: r.database }),
      statementCell(r),
      decisionCell(r),
    );
    return row;
  }

  function renderPending(list) {
    const body = $("pending-body");
    const seen = new Set();
    list.forEach((r, index) => {
      seen.add(r.id);
      let row = pendingRows.get(r.id);
      if (!row) {
        row = pendingRow(r);
        pendingRows.set(r.id, row);
      } else {
        row.querySelector(".age").textContent = age(r.age);
        const can = r.can_decide ? "1" : "0";
        if (row.dataset.canDecide !== can) {  // e.g. another token: other buttons
          row.dataset.canDecide = can;
          row.lastElementChild.replaceWith(decisionCell(r));
        }
      }
      if (body.children[index] !== row) body.insertBefore(row, body.children[index] || null);
    });
    for (const [id, row] of pendingRows) {
      if (!seen.has(id)) { row.remove(); pendingRows.delete(id); }
    }
    $("pending-empty").hidden = list.length > 0;
  }

  function renderRecent(list) {
    const body = $("recent-body");
    body.replaceChildren(...list.map((r) => el("tr",
      { "data-request-id": r.id, "data-status": r.status },
      el("td", { text: when(r.decided_at) }),
      el("td", { "class": "status-" + r.status, text: r.status +
        (r.window_until ? " (window until " + when(r.window_until) + ")" : "") }),
      el("td", { text: r.requester }),
      el("td", { text: r.rule }),
      el("td", { text: r.decider || "" }),
      el("td", { text: r.reason || "" }),
      el("td", {}, el("pre", { "class": "sql", text: clip(r.statement, 300) })),
    )));
  }

  function renderWindows(list) {
    $("windows-body").replaceChildren(...list.map((w) => el("tr", { "data-window-id": w.id },
      el("td", { text: w.user }),
      el("td", { text: w.rule }),
      el("td", { text: when(w.until) }),
      el("td", { text: w.granted_by }),
      el("td", {}, el("button", { id: "revoke-" + w.id, type: "button", "class": "deny",
        "data-window-id": w.id, "data-action": "revoke", text: "Revoke" })),
    )));
  }

  function clearAll() {
    renderPending([]);
    renderRecent([]);
    renderWindows([]);
  }

  async function refresh() {
    if (!token()) {
      $("whoami").textContent = "not signed in";
      clearAll();
      return;
    }
    if (busy) return;
    busy = true;
    try {
      const [me, pending, recent, windows] = await Promise.all([
        api("GET", API + "/whoami"),
        api("GET", API + "?status=pending"),
        api("GET", API + "?status=decided&limit=20"),
        api("GET", API + "/windows"),
      ]);
      if (currentUser !== me.user) {  // another person: nothing typed carries over
        for (const row of pendingRows.values()) row.remove();
        pendingRows.clear();
        currentUser = me.user;
      }
      $("whoami").textContent = "signed in as " + me.user +
        (me.groups.length ? " (" + me.groups.join(", ") + ")" : "");
      renderPending(pending);
      renderRecent(recent);
      renderWindows(windows);
      if (refreshFailed) say("");
    } catch (e) {
      if (e.status === 401) {
        currentUser = null;
        $("whoami").textContent = "not signed in";
        clearAll();
      }
      say(e.message, true);
      refreshFailed = true;
    } finally {
      busy = false;
    }
  }

  async function decide(id, action, button) {
    const reasonInput = $("reason-" + id);
    const reason = reasonInput ? reasonInput.value.trim() : "";
    const body = {};
    if (reason) body.reason = reason;
    if (action === "approve") {
      const forInput = $("for-" + id);
      const span = forInput ? forInput.value.trim() : "";
      if (span) body["for"] = span;
    } else if (!reason) {
      say("A reason is required to deny a request.", true);
      if (reasonInput) reasonInput.focus();
      return;
    }
    const row = button.closest("tr");
    row.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    try {
      const r = await api("POST", API + "/" + encodeURIComponent(id) + "/" + action, body);
      say("Request " + r.id + " " + r.status + ".", false);
    } catch (e) {
      row.querySelectorAll("button").forEach((b) => { b.disabled = false; });
      say(e.message, true);
    }
    await refresh();
  }

  async function revoke(id, button) {
    button.disabled = true;
    try {
      await api("POST", API + "/windows/" + encodeURIComponent(id) + "/revoke", {});
      say("Window " + id + " revoked.", false);
    } catch (e) {
      button.disabled = false;
      say(e.message, true);
    }
    await refresh();
  }

  $("pending-body").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (button && !button.disabled) decide(button.dataset.requestId, button.dataset.action, button);
  });
  $("windows-body").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action=revoke]");
    if (button && !button.disabled) revoke(button.dataset.windowId, button);
  });
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (value) sessionStorage.setItem(KEY, value);
    $("token").value = "";
    say("");
    refresh();
  });
  $("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    say("Token forgotten.", false);
    refresh();
  });

  refresh();
  setInterval(refresh, 2000);
})();
</script>
</body>
</html>
"""
