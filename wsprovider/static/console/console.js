// The wsprovider console: a page built on the browser SDK (/sdk/wsprovider.js), served at /.
import { connect, defaultUrl } from "/sdk/wsprovider.js";

const $ = (id) => document.getElementById(id);
const wsPath = document.body.dataset.wsPath || "/ws";
let client = null;
const subscriptions = new Map(); // pattern -> Subscription

function log(kind, text) {
  const item = document.createElement("li");
  item.className = kind;
  item.textContent = `${new Date().toISOString().slice(11, 23)} ${text}`;
  $("log").append(item);
  $("log").scrollTop = $("log").scrollHeight;
}

function showBody(msg) {
  const text = new TextDecoder("utf-8", { fatal: false }).decode(msg.body);
  const printable = !text.includes("\ufffd") && !/[\x00-\x08\x0e-\x1f]/.test(text);
  return printable ? JSON.stringify(text) : `bytes ${[...msg.body].map((b) => b.toString(16).padStart(2, "0")).join(" ")}`;
}

function parseBody(text, hex) {
  if (!hex) return text;
  const clean = text.replace(/[^0-9a-fA-F]/g, "");
  if (clean.length % 2) throw new Error("hex body needs an even number of digits");
  return Uint8Array.from(clean.match(/../g) ?? [], (h) => parseInt(h, 16));
}

function describe(msg) {
  return `${msg.subject} ${showBody(msg)}${msg.replyTo ? ` reply_to=${msg.replyTo}` : ""}`;
}

function renderSubscriptions() {
  const list = $("subscriptions");
  list.replaceChildren();
  for (const [pattern, sub] of subscriptions) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "unsubscribe";
    button.addEventListener("click", () => {
      sub.unsubscribe();
      subscriptions.delete(pattern);
      renderSubscriptions();
    });
    item.append(`${pattern} `, button);
    list.append(item);
  }
}

function start() {
  if (client) client.close();
  subscriptions.clear();
  renderSubscriptions();
  const url = $("url").value.trim() || defaultUrl(wsPath);
  const token = $("token").value.trim() || undefined;
  client = connect(url, { token, protocol: $("protocol").value });
  client.on("state", ({ state }) => {
    $("state").textContent = state;
    $("state").className = state;
    log("state", `state: ${state}`);
  });
  client.on("welcome", (session) => {
    $("session-id").textContent = session.id;
    $("reply-to").textContent = session.replyTo;
    document.body.dataset.session = session.id;
    log("state", `welcome: session ${session.id} (${session.protocol})`);
  });
  client.on("message", (msg) => log("msg", `message ${describe(msg)}`));
  client.on("error", (e) => log("error", `error ${e.code}: ${e.message}`));
  client.on("close", ({ code, reason, willReconnect }) =>
    log("state", `closed ${code}${reason ? " " + reason : ""}${willReconnect ? "; reconnecting" : ""}`));
}

$("connect-form").addEventListener("submit", (e) => {
  e.preventDefault();
  start();
});
$("disconnect").addEventListener("click", () => client && client.close());
$("clear-log").addEventListener("click", () => $("log").replaceChildren());

$("subscribe-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const pattern = $("sub-pattern").value.trim();
  if (!client || !pattern || subscriptions.has(pattern)) return;
  const sub = client.subscribe(pattern, (msg) => log("msg", `message ${describe(msg)}`));
  subscriptions.set(pattern, sub);
  renderSubscriptions();
  sub.ready.then(
    () => log("state", `subscribed ${pattern}`),
    () => {
      subscriptions.delete(pattern);
      renderSubscriptions();
    },
  );
});

$("publish-form").addEventListener("submit", (e) => {
  e.preventDefault();
  try {
    client.publish($("pub-subject").value.trim(), parseBody($("pub-body").value, $("pub-hex").checked));
    log("state", `published to ${$("pub-subject").value.trim()}`);
  } catch (err) {
    log("error", `publish: ${err.code ?? ""} ${err.message}`);
  }
});

$("request-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const subject = $("req-subject").value.trim();
  try {
    const reply = await client.request(subject, $("req-body").value, { timeout: Number($("req-timeout").value) || 5000 });
    log("reply", `reply from ${subject}: ${showBody(reply)}`);
  } catch (err) {
    log("error", `request ${subject}: ${err.code ?? ""} ${err.message}`);
  }
});

// -- sessions, through the admin API (/admin/sessions, bearer ADMIN_TOKEN) --
let adminTimer = null;

async function admin(path, method = "GET") {
  const response = await fetch(path, { method, headers: { authorization: `Bearer ${$("admin-token").value}` } });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

async function loadSessions() {
  try {
    const { sessions, count } = await admin("/admin/sessions");
    $("admin-status").textContent = `${count} session(s) on this instance (refreshes every 2 s)`;
    const rows = sessions.map((s) => {
      const row = document.createElement("tr");
      const cells = [s.session_id, s.peer ?? "", s.connected_at ? new Date(s.connected_at * 1000).toLocaleTimeString() : ""];
      for (const text of cells) {
        const td = document.createElement("td");
        td.textContent = text;
        row.append(td);
      }
      const td = document.createElement("td");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "disconnect";
      button.addEventListener("click", async () => {
        try {
          await admin(`/admin/sessions/${encodeURIComponent(s.session_id)}`, "DELETE");
          log("state", `disconnected session ${s.session_id}`);
        } catch (err) {
          log("error", `disconnect: ${err.message}`);
        }
        loadSessions();
      });
      td.append(button);
      row.append(td);
      return row;
    });
    $("sessions").tBodies[0].replaceChildren(...rows);
  } catch (err) {
    $("admin-status").textContent = `sessions: ${err.message}`;
    clearInterval(adminTimer);
    adminTimer = null;
  }
}

$("admin-form").addEventListener("submit", (e) => {
  e.preventDefault();
  loadSessions();
  if (!adminTimer) adminTimer = setInterval(loadSessions, 2000);
});

$("url").value = defaultUrl(wsPath);
start();
