// swapd's web UI: Preact + htm as plain ES modules, no build step.
//
// It reads only swapd's public API (/api/events, /running, /api/gpus,
// /api/metrics/activity, /logs/stream, /v1/models, /upstream and the unload
// routes), always by URLs relative to swapd's root, so it also works behind a
// proxy at a sub-path. With apiKeys set it shows a key prompt and nothing else
// until a key is accepted; the key lives in sessionStorage and goes out as a
// Bearer header.
import { h, render } from "preact";
import { useCallback, useEffect, useMemo, useRef, useState } from "preact/hooks";
import htm from "htm";

const html = htm.bind(h);

// swapd's root: app.js is served at <root>/ui/app.js, whatever the page's own path.
const ROOT = new URL("../", import.meta.url);
const KEY_STORE = "swapd.apiKey";
const TABS = [
  ["models", "Models"],
  ["gpus", "GPUs"],
  ["activity", "Activity"],
  ["logs", "Logs"],
  ["playground", "Playground"],
];

// ---------------------------------------------------------------------------
// API client

let apiKey = sessionStorage.getItem(KEY_STORE) || "";
const authListeners = new Set();

class AuthError extends Error {}

function url(path) {
  return new URL(path, ROOT).toString();
}

function authHeaders(extra) {
  const out = { ...(extra || {}) };
  if (apiKey) out.Authorization = "Bearer " + apiKey;
  return out;
}

async function errorText(res) {
  const text = await res.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    if (body && body.error) return typeof body.error === "string" ? body.error : body.error.message || text;
  } catch (_) {
    /* not JSON */
  }
  return text.trim() || `${res.status} ${res.statusText}`;
}

async function api(path, opts = {}) {
  const res = await fetch(url(path), { cache: "no-store", ...opts, headers: authHeaders(opts.headers) });
  if (res.status === 401) {
    authListeners.forEach((fn) => fn());
    throw new AuthError("unauthorized");
  }
  return res;
}

async function getJSON(path, signal) {
  const res = await api(path, { signal });
  if (!res.ok) throw new Error(await errorText(res));
  return res.json();
}

// Yields decoded text chunks of a streamed response as they arrive.
async function* textChunks(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      yield decoder.decode(value, { stream: true });
    }
  } finally {
    reader.releaseLock();
  }
}

// Server-Sent Events over fetch (EventSource cannot send an Authorization header).
async function* sseEvents(res) {
  let buffer = "";
  for await (const chunk of textChunks(res)) {
    buffer += chunk.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = value;
        else if (field === "data") data.push(value);
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

// One /api/events connection for the whole page, shared by every view.
const DEFAULT_UI_CONFIG = { activity: { session_id: ["X-Session-ID", "X-Litellm-Session-Id"] } };

const events = {
  listeners: {
    modelStatus: new Set(),
    activity: new Set(),
    connected: new Set(),
    inflight: new Set(),
    uiConfig: new Set(),
  },
  // inflight: the requests in flight by id, kept from the snapshot, upsert and remove messages
  last: { modelStatus: null, inflight: new Map(), uiConfig: DEFAULT_UI_CONFIG },
  connected: false,
  controller: null,
  on(kind, fn) {
    this.listeners[kind].add(fn);
    if (kind === "modelStatus" && this.last.modelStatus) fn(this.last.modelStatus);
    if (kind === "inflight") fn([...this.last.inflight.values()]);
    if (kind === "uiConfig") fn(this.last.uiConfig);
    if (kind === "connected") fn(this.connected);
    return () => this.listeners[kind].delete(fn);
  },
  emit(kind, value) {
    if (kind === "modelStatus") this.last.modelStatus = value;
    if (kind === "uiConfig") this.last.uiConfig = value;
    this.listeners[kind].forEach((fn) => fn(value));
  },
  applyInflight(update) {
    const known = this.last.inflight;
    const seen = performance.now();
    if (update.operation === "snapshot") {
      known.clear();
      for (const r of update.requests || []) known.set(r.id, { ...r, seen });
    } else if (update.operation === "upsert" && update.request) {
      known.set(update.request.id, { ...update.request, seen });
    } else if (update.operation === "remove") {
      known.delete(update.id);
    }
    this.emit("inflight", [...known.values()]);
  },
  setConnected(value) {
    if (this.connected === value) return;
    this.connected = value;
    this.emit("connected", value);
  },
  start() {
    if (this.controller) return;
    const controller = (this.controller = new AbortController());
    (async () => {
      let delay = 500;
      while (!controller.signal.aborted) {
        try {
          // no-history: the log backlog (up to thousands of lines) is for the Logs view, which streams its own
          const res = await api("api/events?no-history", { signal: controller.signal });
          if (!res.ok) throw new Error(await errorText(res));
          this.setConnected(true);
          delay = 500;
          for await (const { data } of sseEvents(res)) {
            const msg = JSON.parse(data);
            if (msg.type === "modelStatus") this.emit("modelStatus", JSON.parse(msg.data));
            else if (msg.type === "activity") this.emit("activity", JSON.parse(msg.data));
            else if (msg.type === "inflight") this.applyInflight(JSON.parse(msg.data));
            else if (msg.type === "uiConfig") this.emit("uiConfig", JSON.parse(msg.data));
          }
        } catch (err) {
          if (err instanceof AuthError) break;
        }
        if (this.last.inflight.size) this.applyInflight({ operation: "snapshot", requests: [] }); // stale now
        this.setConnected(false);
        if (controller.signal.aborted) break;
        await new Promise((r) => setTimeout(r, delay));
        delay = Math.min(delay * 2, 5000);
      }
    })();
  },
  stop() {
    if (this.controller) this.controller.abort();
    this.controller = null;
    this.last.modelStatus = null;
    this.last.inflight.clear();
    this.setConnected(false);
  },
};

// ---------------------------------------------------------------------------
// Hooks and small helpers

// Calls fn now and every `ms` while the page is visible; fn gets an AbortSignal.
function usePoll(fn, ms, deps) {
  useEffect(() => {
    let timer = null;
    let controller = null;
    let stopped = false;
    const run = async () => {
      if (stopped) return;
      if (document.visibilityState === "visible") {
        controller = new AbortController();
        try {
          await fn(controller.signal);
        } catch (_) {
          /* shown by fn; try again next round */
        }
      }
      if (!stopped) timer = setTimeout(run, ms);
    };
    run();
    return () => {
      stopped = true;
      clearTimeout(timer);
      if (controller) controller.abort();
    };
  }, deps);
}

function useEvent(kind, fn, deps) {
  useEffect(() => events.on(kind, fn), deps);
}

function useNow(ms) {
  const [now, setNow] = useState(() => performance.now());
  useEffect(() => {
    const id = setInterval(() => setNow(performance.now()), ms);
    return () => clearInterval(id);
  }, [ms]);
  return now;
}

function useModels() {
  const [models, setModels] = useState(events.last.modelStatus || []);
  useEvent("modelStatus", setModels, []);
  return models;
}

function fmtMiB(mib) {
  if (mib === null || mib === undefined) return "–";
  if (mib >= 1024) return (mib / 1024).toFixed(mib >= 10240 ? 0 : 1) + " GiB";
  return Math.round(mib) + " MiB";
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return Math.round(s * 1000) + " ms";
  if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
  const m = Math.floor(s / 60);
  return `${m}m ${String(Math.floor(s % 60)).padStart(2, "0")}s`;
}

function fmtMs(ms) {
  return ms === null || ms === undefined || ms < 0 ? "–" : fmtSeconds(ms / 1000);
}

function fmtRate(v) {
  return v === null || v === undefined || v < 0 ? "–" : v.toFixed(v < 10 ? 2 : 1);
}

function fmtTime(iso) {
  const d = new Date(iso);
  return isNaN(d) ? String(iso || "") : d.toLocaleTimeString();
}

function modelColor(id) {
  let hash = 0;
  for (const c of id) hash = (hash * 31 + c.charCodeAt(0)) | 0;
  return `hsl(${Math.abs(hash) % 360} 62% 52%)`;
}

function modelLabel(m) {
  return (m.name && m.name.trim()) || m.id;
}

// ---------------------------------------------------------------------------
// The key prompt

function KeyPrompt({ onKey, error }) {
  const [value, setValue] = useState("");
  const [busy, setBusy] = useState(false);
  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    await onKey(value.trim());
    setBusy(false);
  };
  return html`<main class="prompt">
    <form class="card" onSubmit=${submit} data-testid="key-form">
      <h1>swapd</h1>
      <p>This swapd needs an API key. It is kept in this tab only and sent as a Bearer header.</p>
      <label for="key">API key</label>
      <input id="key" type="password" autocomplete="current-password" value=${value}
        onInput=${(e) => setValue(e.target.value)} autofocus />
      ${error && html`<p class="error" role="alert" data-testid="key-error">${error}</p>`}
      <button type="submit" disabled=${busy || !value.trim()}>Unlock</button>
    </form>
  </main>`;
}

// ---------------------------------------------------------------------------
// Models

function StateBadge({ state }) {
  const label = state || "peer";
  return html`<span class=${"badge state-" + label} data-testid="state">${label}</span>`;
}

function ModelsView() {
  const models = useModels();
  const [running, setRunning] = useState({ at: 0, byModel: {} });
  const [footprints, setFootprints] = useState({});
  const [pending, setPending] = useState({});
  const [errors, setErrors] = useState({});
  const now = useNow(1000);

  const loadRunning = useCallback(async (signal) => {
    const body = await getJSON("running", signal);
    const byModel = {};
    for (const r of body.running || []) byModel[r.model] = r;
    setRunning({ at: performance.now(), byModel });
  }, []);
  usePoll(loadRunning, 2000, []);
  usePoll(
    async (signal) => setFootprints((await getJSON("api/gpus", signal)).footprints || {}),
    10000,
    []
  );
  // A state change (start, ready, stop) refreshes the counts at once.
  useEvent("modelStatus", () => loadRunning().catch(() => {}), []);

  const act = async (id, action) => {
    setPending((p) => ({ ...p, [id]: action }));
    setErrors((e) => ({ ...e, [id]: "" }));
    try {
      const res =
        action === "load"
          ? await api(`upstream/${encodeURIComponent(id)}/health`)
          : await api(`api/models/unload/${encodeURIComponent(id)}`, { method: "POST" });
      if (res.status >= 500 || (action === "unload" && !res.ok)) {
        const text = await errorText(res);
        setErrors((e) => ({ ...e, [id]: text }));
      } else {
        await res.arrayBuffer().catch(() => null);
      }
    } catch (err) {
      if (!(err instanceof AuthError)) setErrors((e) => ({ ...e, [id]: String(err.message || err) }));
    } finally {
      setPending((p) => ({ ...p, [id]: "" }));
      loadRunning().catch(() => {});
    }
  };

  const visible = models.filter((m) => !m.unlisted);
  if (!visible.length) return html`<p class="empty">No models configured.</p>`;
  return html`<section>
    <div class="table-wrap"><table class="models">
      <thead><tr>
        <th>Model</th><th>State</th><th class="num">TTL</th><th class="num">In flight</th>
        <th class="num">VRAM now</th><th>Footprint</th><th></th>
      </tr></thead>
      <tbody>
        ${visible.map((m) => {
          const r = running.byModel[m.id];
          const peer = !!m.peerID || !!m.remote; // runs elsewhere: swapd neither loads nor unloads it
          let ttl = "–";
          if (r && r.ttl > 0) {
            ttl =
              r.ttl_remaining === null || r.ttl_remaining === undefined
                ? `${r.ttl}s (busy)`
                : fmtSeconds(Math.max(0, r.ttl_remaining - (now - running.at) / 1000));
          } else if (r) ttl = "never";
          const fp = (r && r.footprint) || footprints[m.id];
          const busy = m.state === "starting" || m.state === "stopping" || !!pending[m.id];
          const badge = m.remote ? "remote" : m.state;
          return html`<tr key=${m.id} data-model=${m.id} data-state=${m.remote ? "remote" : m.state || "peer"}>
            <td class="name">
              <div class="model-name"><span class="dot" style=${{ background: modelColor(m.id) }}></span>${modelLabel(m)}</div>
              ${m.name && m.name.trim() !== m.id && html`<div class="sub mono">${m.id}</div>`}
              ${m.description && html`<div class="sub">${m.description}</div>`}
              ${m.aliases && m.aliases.length > 0 && html`<div class="sub">aliases: ${m.aliases.join(", ")}</div>`}
              ${errors[m.id] && html`<div class="error" role="alert">${errors[m.id]}</div>`}
            </td>
            <td data-label="State"><${StateBadge} state=${badge} /></td>
            <td class="num" data-label="TTL" data-testid="ttl">${ttl}</td>
            <td class="num" data-label="In flight" data-testid="in-flight">${r ? r.in_flight : peer ? "–" : 0}</td>
            <td class="num" data-label="VRAM now">${r ? fmtMiB(r.vram_mib) : "–"}</td>
            <td data-label="Footprint">${fp && fp.source ? html`${fp.mib !== null && fp.mib !== undefined ? fmtMiB(fp.mib) + " " : ""}<span class="sub" title=${fp.detail || ""}>${fp.source}</span>` : "–"}</td>
            <td class="actions">
              ${!peer &&
              (m.state === "stopped"
                ? html`<button onClick=${() => act(m.id, "load")} disabled=${busy} data-testid="load">
                    ${pending[m.id] === "load" ? "Loading…" : "Load"}</button>`
                : html`<button class="secondary" onClick=${() => act(m.id, "unload")} disabled=${busy} data-testid="unload">
                    ${pending[m.id] === "unload" || m.state === "stopping" ? "Unloading…" : "Unload"}</button>`)}
            </td>
          </tr>`;
        })}
      </tbody>
    </table></div>
  </section>`;
}

// ---------------------------------------------------------------------------
// GPUs and the stop history

function GpuBar({ dev }) {
  const total = dev.total_mib || 1;
  const segments = dev.models.map((m) => ({ label: m.model, mib: m.vram_mib || 0, color: modelColor(m.model) }));
  const other = (dev.unattributed || []).reduce((s, p) => s + (p.vram_mib || 0), 0);
  if (other > 0) segments.push({ label: "other processes", mib: other, cls: "other" });
  const counted = segments.reduce((s, x) => s + x.mib, 0);
  const rest = Math.max(0, (dev.used_mib || 0) - counted);
  if (rest >= 1) segments.push({ label: "not attributed (driver, contexts)", mib: rest, cls: "rest" });
  return html`<div>
    <div class="bar" role="img" aria-label=${`${fmtMiB(dev.used_mib)} of ${fmtMiB(dev.total_mib)} used`}>
      ${segments.map(
        (s) => html`<span class=${"seg " + (s.cls || "")} title=${`${s.label}: ${fmtMiB(s.mib)}`}
          style=${{ width: `${(100 * s.mib) / total}%`, background: s.color || "" }}></span>`
      )}
    </div>
    <ul class="legend">
      ${segments.map(
        (s) => html`<li><span class=${"dot " + (s.cls || "")} style=${{ background: s.color || "" }}></span>${s.label} <b>${fmtMiB(s.mib)}</b></li>`
      )}
      <li><span class="dot free"></span>free <b>${fmtMiB(dev.free_mib)}</b></li>
    </ul>
  </div>`;
}

function GpusView() {
  const [status, setStatus] = useState(null);
  const [error, setError] = useState("");
  usePoll(
    async (signal) => {
      try {
        setStatus(await getJSON("api/gpus", signal));
        setError("");
      } catch (err) {
        if (!(err instanceof AuthError) && err.name !== "AbortError") setError(String(err.message || err));
      }
    },
    3000,
    []
  );
  if (!status) return html`<p class="empty">${error || "Reading the GPUs…"}</p>`;
  const stops = [...(status.stops || [])].reverse();
  return html`<section>
    ${error && html`<p class="error">${error}</p>`}
    ${!status.available &&
    html`<p class="notice">No GPU readings: ${status.reason || "NVML is not available"}. Stops are still recorded below.</p>`}
    ${(status.unfreed || []).map(
      (u) => html`<p class="alert" role="alert">${u.model}: about ${fmtMiB(u.remaining_mib)} of VRAM did not come back after its stop${u.pids && u.pids.length ? ` (pids ${u.pids.join(", ")})` : ""}.</p>`
    )}
    <div class="gpus">
      ${status.devices.map(
        (dev) => html`<article class="card gpu" data-testid="gpu">
          <header><h3>GPU ${dev.index}: ${dev.name}</h3>
            <span class="sub">${fmtMiB(dev.used_mib)} / ${fmtMiB(dev.total_mib)}</span></header>
          <${GpuBar} dev=${dev} />
          <dl class="facts">
            <div><dt>Temperature</dt><dd>${dev.temperature_c === null || dev.temperature_c === undefined ? "–" : dev.temperature_c + " °C"}</dd></div>
            <div><dt>Power</dt><dd>${dev.power_w === null || dev.power_w === undefined ? "–" : dev.power_w.toFixed(0) + " W"}${dev.power_limit_w ? ` / ${dev.power_limit_w.toFixed(0)} W` : ""}</dd></div>
            <div><dt>Utilisation</dt><dd>${dev.util_percent === null || dev.util_percent === undefined ? "–" : dev.util_percent + " %"}</dd></div>
            <div><dt>Persistence</dt><dd>${dev.persistence_mode === null || dev.persistence_mode === undefined ? "–" : dev.persistence_mode ? "on" : "off"}</dd></div>
            ${dev.throttle_reasons && dev.throttle_reasons.length > 0 && html`<div><dt>Throttled</dt><dd>${dev.throttle_reasons.join(", ")}</dd></div>`}
          </dl>
        </article>`
      )}
    </div>
    <h2>Stop history</h2>
    <p class="sub">Every stop of a model, with what NVML saw come back. vram check: ${status.vram_check}.
      Freed ${status.counters ? status.counters.freed : 0}, not freed ${status.counters ? status.counters.not_freed : 0}.</p>
    ${stops.length === 0
      ? html`<p class="empty">No model has been stopped yet.</p>`
      : html`<div class="table-wrap"><table class="stops">
          <thead><tr><th>Time</th><th>Model</th><th>Reason</th><th>Outcome</th><th class="num">Recovered</th>
            <th class="num">Held</th><th class="num">Stop took</th><th class="num">Verified in</th></tr></thead>
          <tbody>${stops.map(
            (s, i) => html`<tr key=${i} class=${s.outcome === "not_freed" ? "bad" : ""} data-testid="stop" data-outcome=${s.outcome}>
              <td>${fmtTime(s.at)}</td><td>${s.model}</td><td>${s.reason}</td>
              <td><span class=${"badge outcome-" + s.outcome} title=${s.detail || ""}>vram.${s.outcome}</span>
                ${s.detail && html`<div class="sub">${s.detail}</div>`}</td>
              <td class="num">${s.recovered_mib === undefined ? "–" : fmtMiB(s.recovered_mib)}</td>
              <td class="num">${s.held_mib === undefined ? "–" : fmtMiB(s.held_mib)}</td>
              <td class="num">${fmtSeconds(s.stop_seconds)}</td>
              <td class="num">${s.seconds === undefined ? "–" : fmtSeconds(s.seconds)}</td>
            </tr>`
          )}</tbody>
        </table></div>`}
  </section>`;
}

// ---------------------------------------------------------------------------
// Activity, with its two charts

function LineChart({ points, label, unit }) {
  const W = 600;
  const H = 160;
  const P = 30;
  if (points.length < 1) return html`<figure class="chart"><figcaption>${label}</figcaption><p class="empty">No data yet.</p></figure>`;
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs);
  const x1 = Math.max(...xs, x0 + 1);
  const y1 = Math.max(...ys, 1) * 1.1;
  const px = (x) => P + ((x - x0) / (x1 - x0)) * (W - P - 8);
  const py = (y) => H - P + 8 - (y / y1) * (H - P);
  const path = points.map((p, i) => `${i ? "L" : "M"}${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join("");
  return html`<figure class="chart"><figcaption>${label}</figcaption>
    <svg viewBox=${`0 0 ${W} ${H}`} role="img" aria-label=${label}>
      <line class="axis" x1=${P} y1=${H - P + 8} x2=${W - 8} y2=${H - P + 8} />
      <text class="tick" x=${P - 4} y=${py(y1 / 1.1) + 4} text-anchor="end">${Math.round(y1 / 1.1)}</text>
      <text class="tick" x=${P - 4} y=${H - P + 12} text-anchor="end">0</text>
      <text class="tick" x=${P} y=${H - 4}>${new Date(x0).toLocaleTimeString()}</text>
      <text class="tick" x=${W - 8} y=${H - 4} text-anchor="end">${new Date(x1).toLocaleTimeString()}</text>
      <path class="line" d=${path} />
      ${points.map((p) => html`<circle class="pt" cx=${px(p[0])} cy=${py(p[1])} r="2.5"><title>${p[1].toFixed(1)} ${unit}</title></circle>`)}
    </svg></figure>`;
}

function Histogram({ values, label }) {
  const W = 600;
  const H = 160;
  const P = 30;
  if (!values.length) return html`<figure class="chart"><figcaption>${label}</figcaption><p class="empty">No cold starts or swaps waited on yet.</p></figure>`;
  const max = Math.max(...values);
  const bins = Math.min(12, Math.max(3, Math.ceil(Math.sqrt(values.length))));
  const width = max / bins || 1;
  const counts = new Array(bins).fill(0);
  for (const v of values) counts[Math.min(bins - 1, Math.floor(v / width))]++;
  const top = Math.max(...counts);
  const bw = (W - P - 8) / bins;
  return html`<figure class="chart"><figcaption>${label}</figcaption>
    <svg viewBox=${`0 0 ${W} ${H}`} role="img" aria-label=${label}>
      <line class="axis" x1=${P} y1=${H - P + 8} x2=${W - 8} y2=${H - P + 8} />
      ${counts.map((c, i) => {
        const bh = (c / top) * (H - P - 4);
        return html`<rect class="binbar" x=${P + i * bw + 1} y=${H - P + 8 - bh} width=${bw - 2} height=${bh}>
          <title>${fmtMs(i * width)}–${fmtMs((i + 1) * width)}: ${c}</title></rect>`;
      })}
      <text class="tick" x=${P} y=${H - 4}>0</text>
      <text class="tick" x=${W - 8} y=${H - 4} text-anchor="end">${fmtMs(max)}</text>
      <text class="tick" x=${P - 4} y=${H - P - 4 - (H - P - 4) + 12} text-anchor="end">${top}</text>
    </svg></figure>`;
}

function waitedLabel(row) {
  if (!row.waited) return "–";
  const what = row.waited === "swap" ? "swap" : "cold start";
  return `${what} ${fmtMs(row.wait_ms)}`;
}

// The first of ui.activity.session_id's headers a request carried (llama-swap's UI reads it the same way).
function sessionOf(headers, names) {
  const lower = {};
  for (const [k, v] of Object.entries(headers || {})) lower[k.toLowerCase()] = v;
  for (const name of names || []) {
    const v = lower[name.toLowerCase()];
    if (v) return v;
  }
  return "";
}

function fmtBytes(n) {
  if (!n) return "0 B";
  if (n < 1024) return `${n} B`;
  return n < 1048576 ? `${(n / 1024).toFixed(1)} KB` : `${(n / 1048576).toFixed(1)} MB`;
}

// The requests being answered now (/api/events "inflight"), each with a Cancel button.
function InflightTable() {
  const [requests, setRequests] = useState([]);
  const [ui, setUi] = useState(DEFAULT_UI_CONFIG);
  const [cancelling, setCancelling] = useState({});
  const [error, setError] = useState("");
  useEvent("inflight", setRequests, []);
  useEvent("uiConfig", setUi, []);
  const now = useNow(500);
  if (!requests.length) return null;
  const names = (ui.activity && ui.activity.session_id) || [];
  const cancel = async (id) => {
    setCancelling((c) => ({ ...c, [id]: true }));
    try {
      const res = await api(`api/inflight/${encodeURIComponent(id)}/cancel`, { method: "POST" });
      // 404: it ended on its own meanwhile
      if (!res.ok && res.status !== 404) setError(await errorText(res));
      else setError("");
    } catch (err) {
      if (!(err instanceof AuthError)) setError(String(err.message || err));
    }
  };
  const sorted = [...requests].sort((a, b) => Number(a.id) - Number(b.id));
  return html`<div class="inflight" data-testid="inflight">
    <h3>In flight <span class="sub">${sorted.length}</span></h3>
    ${error && html`<p class="error">${error}</p>`}
    <div class="table-wrap"><table class="activity">
      <thead><tr><th></th><th class="num">Elapsed</th><th>Model</th><th>Request</th><th>Address</th><th>Session</th>
        <th class="num">Received</th></tr></thead>
      <tbody>${sorted.map(
        (r) => html`<tr key=${r.id} data-testid="inflight-row" data-id=${r.id}>
          <td><button class="secondary" data-testid="inflight-cancel" disabled=${!!cancelling[r.id]} onClick=${() => cancel(r.id)}
            title="Cancel this request: its client gets an error and the backend stops generating">Cancel</button></td>
          <td class="num">${fmtMs(r.elapsed_ms + Math.max(0, now - r.seen))}</td>
          <td>${r.model}</td><td class="mono">${r.method} ${r.req_path}</td><td class="mono">${r.remote_ip}</td>
          <td class="mono">${sessionOf(r.req_headers, names) || "–"}</td>
          <td class="num">${fmtBytes(r.resp_bytes)}</td>
        </tr>`
      )}</tbody></table></div>
  </div>`;
}

function ActivityView() {
  const models = useModels();
  const [model, setModel] = useState("");
  const [rows, setRows] = useState(null);
  const [error, setError] = useState("");
  const timer = useRef(null);

  const load = useCallback(async () => {
    const q = new URLSearchParams({ limit: "200" });
    if (model) q.set("model", model);
    try {
      const body = await getJSON("api/metrics/activity?" + q.toString());
      setRows(body.data || []);
      setError("");
    } catch (err) {
      if (!(err instanceof AuthError)) setError(String(err.message || err));
    }
  }, [model]);
  useEffect(() => {
    load();
  }, [load]);
  // Each finished request sends an activity event; a burst is fetched once.
  useEvent(
    "activity",
    () => {
      clearTimeout(timer.current);
      timer.current = setTimeout(load, 200);
    },
    [load]
  );
  useEffect(() => () => clearTimeout(timer.current), []);

  const list = rows || [];
  const chrono = [...list].reverse();
  const tps = chrono
    .filter((r) => r.tokens && r.tokens.tokens_per_second > 0)
    .map((r) => [Date.parse(r.timestamp), r.tokens.tokens_per_second]);
  const starts = list.filter((r) => r.waited && r.start_ms > 0).map((r) => r.start_ms);
  const sessions = list.some((r) => r.session_id); // the Session column shows only when a row has one
  return html`<section>
    <div class="toolbar">
      <label>Model <select value=${model} onChange=${(e) => setModel(e.target.value)} data-testid="activity-model">
        <option value="">all models</option>
        ${models.map((m) => html`<option value=${m.id}>${m.id}</option>`)}
      </select></label>
      <span class="sub">${list.length} request${list.length === 1 ? "" : "s"} shown, newest first; updates live.</span>
    </div>
    ${error && html`<p class="error">${error}</p>`}
    <${InflightTable} />
    <div class="charts">
      <${LineChart} points=${tps} label="Generation speed (tokens/s) over time" unit="tokens/s" />
      <${Histogram} values=${starts} label="Cold-start and swap times (model start)" />
    </div>
    ${rows === null
      ? html`<p class="empty">Loading…</p>`
      : list.length === 0
        ? html`<p class="empty">No requests yet.</p>`
        : html`<div class="table-wrap"><table class="activity">
          <thead><tr><th>Time</th><th>Model</th><th>Path</th><th class="num">Status</th><th>Waited on</th>
            <th class="num">In</th><th class="num">Out</th><th class="num">tok/s</th><th class="num">TTFT</th><th class="num">Duration</th>
            ${sessions && html`<th>Session</th>`}</tr></thead>
          <tbody>${list.map(
            (r) => html`<tr key=${r.id} data-testid="activity-row" data-model=${r.model} class=${r.resp_status_code >= 400 ? "bad" : ""}>
              <td>${fmtTime(r.timestamp)}</td><td>${r.model}</td><td class="mono">${r.req_path}</td>
              <td class="num" title=${r.error_msg || ""}>${r.resp_status_code}</td>
              <td>${waitedLabel(r)}</td>
              <td class="num">${r.tokens.input_tokens}</td><td class="num">${r.tokens.output_tokens}</td>
              <td class="num">${fmtRate(r.tokens.tokens_per_second)}</td>
              <td class="num">${fmtMs(r.ttft_ms)}</td><td class="num">${fmtMs(r.duration_ms)}</td>
              ${sessions && html`<td class="mono" data-testid="activity-session">${r.session_id || "–"}</td>`}
            </tr>`
          )}</tbody></table></div>`}
  </section>`;
}

// ---------------------------------------------------------------------------
// Logs

const MAX_LOG_CHARS = 400000;

function LogsView() {
  const models = useModels();
  const [source, setSource] = useState("proxy");
  const [text, setText] = useState("");
  const [follow, setFollow] = useState(true);
  const [paused, setPaused] = useState(false);
  const [held, setHeld] = useState(0);
  const [status, setStatus] = useState("connecting");
  const pausedRef = useRef(false);
  const heldRef = useRef("");
  const pre = useRef(null);

  useEffect(() => {
    const controller = new AbortController();
    setText("");
    heldRef.current = "";
    setHeld(0);
    (async () => {
      let delay = 500;
      while (!controller.signal.aborted) {
        try {
          const path = source === "all" ? "logs/stream" : `logs/stream/${encodeURIComponent(source)}`;
          const res = await api(path, { signal: controller.signal });
          if (!res.ok) throw new Error(await errorText(res));
          setStatus("live");
          for await (const chunk of textChunks(res)) {
            if (pausedRef.current) {
              heldRef.current += chunk;
              setHeld(heldRef.current.length);
            } else {
              setText((t) => (t + chunk).slice(-MAX_LOG_CHARS));
            }
          }
        } catch (err) {
          if (err instanceof AuthError || controller.signal.aborted) break;
          setStatus("reconnecting: " + String(err.message || err));
        }
        if (controller.signal.aborted) break;
        await new Promise((r) => setTimeout(r, delay));
        delay = Math.min(delay * 2, 5000);
        setText("");  // the stream sends its history again
      }
    })();
    return () => controller.abort();
  }, [source]);

  useEffect(() => {
    if (follow && pre.current) pre.current.scrollTop = pre.current.scrollHeight;
  }, [text, follow]);

  const togglePause = () => {
    const next = !paused;
    pausedRef.current = next;
    setPaused(next);
    if (!next && heldRef.current) {
      const more = heldRef.current;
      heldRef.current = "";
      setHeld(0);
      setText((t) => (t + more).slice(-MAX_LOG_CHARS));
    }
  };

  return html`<section class="logs">
    <div class="toolbar">
      <label>Source <select value=${source} onChange=${(e) => setSource(e.target.value)} data-testid="log-source">
        <option value="proxy">swapd</option>
        <option value="upstream">all models</option>
        <option value="all">everything</option>
        ${models.filter((m) => !m.peerID).map((m) => html`<option value=${m.id}>${m.id}</option>`)}
      </select></label>
      <label class="check"><input type="checkbox" checked=${follow} onChange=${(e) => setFollow(e.target.checked)} /> Follow</label>
      <button class="secondary" onClick=${togglePause} data-testid="log-pause">${paused ? `Resume${held ? " (new lines held)" : ""}` : "Pause"}</button>
      <button class="secondary" onClick=${() => setText("")}>Clear</button>
      <span class="sub">${status}</span>
    </div>
    <pre class="log" ref=${pre} data-testid="log-text">${text}</pre>
  </section>`;
}

// ---------------------------------------------------------------------------
// Playground

// "first token 120 ms · 45.2 tokens/s · 64 tokens" for a reply in progress or done.
function replyStats(r) {
  const parts = [];
  if (r.first) parts.push(`first token ${fmtMs(r.first - r.started)}`);
  const n = (r.usage && r.usage.completion_tokens) || r.tokens;
  const end = r.end || performance.now();
  if (r.first && n > 1 && end > r.first) parts.push(`${((n - 1) / ((end - r.first) / 1000)).toFixed(1)} tokens/s`);
  if (n) parts.push(`${n} tokens${r.usage ? "" : " (chunks)"}`);
  return parts.join(" · ");
}

function PlaygroundView() {
  const models = useModels();
  const usable = models.filter((m) => !m.unlisted);
  const [model, setModel] = useState("");
  const [system, setSystem] = useState("");
  const [input, setInput] = useState("");
  const [messages, setMessages] = useState([]);
  const [reply, setReply] = useState(null); // {text, started, first, end, tokens, error}
  const controller = useRef(null);
  // until the user picks one: a model that is already loaded, so the first message does not start another
  const fallback = usable.find((m) => m.state === "ready") || usable[0];
  const chosen = model || (fallback && fallback.id) || "";

  useEffect(() => () => controller.current && controller.current.abort(), []);

  const send = async (e) => {
    e.preventDefault();
    const content = input.trim();
    if (!content || !chosen || controller.current) return;
    const history = [...messages, { role: "user", content }];
    setMessages(history);
    setInput("");
    const c = (controller.current = new AbortController());
    const started = performance.now();
    const state = { text: "", started, first: 0, end: 0, tokens: 0, usage: null, error: "" };
    setReply({ ...state });
    const body = {
      model: chosen,
      stream: true,
      stream_options: { include_usage: true },
      messages: system.trim() ? [{ role: "system", content: system.trim() }, ...history] : history,
    };
    try {
      const res = await api("v1/chat/completions", {
        method: "POST",
        signal: c.signal,
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (!res.ok) throw new Error(await errorText(res));
      for await (const ev of sseEvents(res)) {
        if (ev.data === "[DONE]") break;
        let chunk;
        try {
          chunk = JSON.parse(ev.data);
        } catch (_) {
          continue;
        }
        if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
        if (chunk.usage) state.usage = chunk.usage;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        const piece = delta && (delta.content || delta.reasoning_content);
        if (piece) {
          if (!state.first) state.first = performance.now();
          state.text += piece;
          state.tokens += 1;
          setReply({ ...state });
        }
      }
    } catch (err) {
      if (!(err instanceof AuthError)) state.error = err.name === "AbortError" ? "stopped" : String(err.message || err);
    } finally {
      state.end = performance.now();
      controller.current = null;
      setReply(null);
      setMessages((m) => [...m, { role: "assistant", content: state.text, error: state.error, stats: replyStats(state) }]);
    }
  };

  const busy = !!reply;
  return html`<section class="playground">
    <div class="toolbar">
      <label>Model <select value=${chosen} onChange=${(e) => setModel(e.target.value)} data-testid="pg-model">
        ${usable.map((m) => html`<option value=${m.id}>${m.id}</option>`)}
      </select></label>
      <button class="secondary" onClick=${() => setMessages([])} disabled=${busy}>Clear</button>
    </div>
    <details><summary>System prompt</summary>
      <textarea rows="2" value=${system} onInput=${(e) => setSystem(e.target.value)} placeholder="You are a helpful assistant."></textarea>
    </details>
    <div class="chat" data-testid="pg-chat">
      ${messages.map((m, i) => html`<div key=${i} class=${"msg " + m.role} data-testid=${"pg-" + m.role}>
        <span class="who">${m.role}</span><div class="text">${m.content}</div>
        ${m.error && html`<p class="error" role="alert" data-testid="pg-error">${m.error}</p>`}
        ${m.stats && html`<p class="sub" data-testid="pg-stats">${m.stats}</p>`}</div>`)}
      ${reply && html`<div class="msg assistant live"><span class="who">assistant</span>
        <div class="text" data-testid="pg-reply">${reply.text}<span class="caret">▍</span></div>
        <p class="sub" data-testid="pg-live-stats">${replyStats(reply) || "waiting for the first token…"}</p></div>`}
    </div>
    <form class="composer" onSubmit=${send}>
      <textarea rows="3" value=${input} onInput=${(e) => setInput(e.target.value)} data-testid="pg-input"
        placeholder="Ask something… (Ctrl+Enter sends)" onKeyDown=${(e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(e); }}></textarea>
      ${busy
        ? html`<button type="button" class="secondary" onClick=${() => controller.current && controller.current.abort()}>Stop</button>`
        : html`<button type="submit" disabled=${!input.trim() || !chosen} data-testid="pg-send">Send</button>`}
    </form>
  </section>`;
}

// ---------------------------------------------------------------------------
// The shell: auth gate, header, tabs

function currentTab() {
  const hash = location.hash.replace(/^#\/?/, "");
  if (TABS.some(([id]) => id === hash)) return hash;
  const last = location.pathname.replace(/\/$/, "").split("/").pop();
  return TABS.some(([id]) => id === last) ? last : "models";
}

function Shell({ onLock }) {
  const [tab, setTab] = useState(currentTab());
  const [connected, setConnected] = useState(events.connected);
  const [version, setVersion] = useState("");
  useEffect(() => {
    const onHash = () => setTab(currentTab());
    window.addEventListener("hashchange", onHash);
    return () => window.removeEventListener("hashchange", onHash);
  }, []);
  useEvent("connected", setConnected, []);
  useEffect(() => {
    getJSON("api/version")
      .then((v) => setVersion(v.version || ""))
      .catch(() => {});
  }, []);
  const View = { models: ModelsView, gpus: GpusView, activity: ActivityView, logs: LogsView, playground: PlaygroundView }[tab];
  return html`<div class="shell">
    <header class="top">
      <div class="brand"><img src="icon.svg" alt="" width="22" height="22" /> swapd <span class="sub">${version}</span></div>
      <nav>${TABS.map(([id, label]) => html`<a href=${"#/" + id} class=${tab === id ? "active" : ""} data-tab=${id}>${label}</a>`)}</nav>
      <div class="status">
        <span class=${"live " + (connected ? "on" : "off")} title=${connected ? "live updates connected" : "live updates disconnected"}></span>
        ${apiKey && html`<button class="link" onClick=${onLock} title="Forget the API key in this tab">Lock</button>`}
      </div>
    </header>
    <main class="content" data-testid=${"view-" + tab}><${View} /></main>
  </div>`;
}

// Drops the key from memory and the tab's storage, and closes the live stream it opened.
function forgetKey() {
  apiKey = "";
  sessionStorage.removeItem(KEY_STORE);
  events.stop();
}

function App() {
  // "checking" until the first call answers; "locked" shows only the key prompt.
  const [phase, setPhase] = useState("checking");
  const [error, setError] = useState("");

  const check = useCallback(async (key) => {
    apiKey = key;
    try {
      const res = await fetch(url("v1/models"), { cache: "no-store", headers: authHeaders() });
      await res.arrayBuffer().catch(() => null);
      if (res.status === 401) {
        if (key) setError("That key was not accepted.");
        forgetKey();
        setPhase("locked");
        return false;
      }
      if (key) sessionStorage.setItem(KEY_STORE, key);
      setError(res.ok ? "" : await errorText(res));
      events.start();
      setPhase("open");
      return true;
    } catch (err) {
      setError("swapd did not answer: " + String(err.message || err));
      setPhase(key ? "locked" : "down");
      return false;
    }
  }, []);

  useEffect(() => {
    check(apiKey);
    const lost = () => {
      forgetKey();
      setError("The key is no longer accepted.");
      setPhase("locked");
    };
    authListeners.add(lost);
    return () => authListeners.delete(lost);
  }, [check]);

  if (phase === "checking") return html`<p class="boot">Connecting to swapd…</p>`;
  if (phase === "down") return html`<main class="prompt"><div class="card"><h1>swapd</h1><p class="error">${error}</p>
    <button onClick=${() => check(apiKey)}>Try again</button></div></main>`;
  if (phase === "locked") return html`<${KeyPrompt} onKey=${check} error=${error} />`;
  const lock = () => {
    forgetKey();
    setError("");
    setPhase("checking");
    check("");
  };
  return html`<${Shell} onLock=${lock} />`;
}

render(html`<${App} />`, document.getElementById("app"));
