// sdtrain serve's pages: plain JavaScript, no libraries. Changes go to the JSON API with the page's token.
"use strict";

const TOKEN = document.querySelector('meta[name="sdtrain-token"]').content;
const COLORS = ["#2f6fde", "#d9480f", "#2b8a3e", "#862e9c", "#c2255c", "#0b7285", "#5c940d"];
const $ = (selector, root = document) => root.querySelector(selector);

async function post(url, body) {
  const response = await fetch(url, {
    method: "POST", headers: {"Content-Type": "application/json", "X-Sdtrain-Token": TOKEN},
    body: JSON.stringify(body),
  });
  const type = response.headers.get("Content-Type") || "";
  const answer = type.startsWith("application/json") ? await response.json() : await response.blob();
  return {ok: response.ok, answer};
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
}

function svg(tag, attributes = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  return node;
}

function duration(seconds) {
  if (seconds == null) return "—";
  const s = Math.round(seconds), h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s % 60} s`;
}

function number(value, digits = 4) {
  return typeof value === "number" ? (Math.abs(value) < 1e-3 && value !== 0 ? value.toExponential(2) : value.toFixed(digits)) : "—";
}

// A line chart of series [{name, points: [[x, y], ...]}] in an <svg viewBox="0 0 W H">.
function chart(target, series) {
  const [, , width, height] = target.getAttribute("viewBox").split(" ").map(Number);
  const pad = {left: 56, right: 12, top: 12, bottom: 26};
  target.replaceChildren();
  const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  if (!all.length) {
    target.append(Object.assign(svg("text", {x: width / 2 - 40, y: height / 2}), {textContent: "no records yet"}));
    return;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y0 === y1) [y0, y1] = [y0 - 1e-9 - Math.abs(y0) * 0.1, y1 + 1e-9 + Math.abs(y1) * 0.1];
  const X = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const Y = (y) => height - pad.bottom - ((y - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
  target.append(svg("line", {class: "axis", x1: pad.left, y1: height - pad.bottom, x2: width - pad.right, y2: height - pad.bottom}));
  target.append(svg("line", {class: "axis", x1: pad.left, y1: pad.top, x2: pad.left, y2: height - pad.bottom}));
  for (const [value, y] of [[y1, pad.top + 10], [y0, height - pad.bottom]]) {
    target.append(Object.assign(svg("text", {x: 4, y}), {textContent: number(value)}));
  }
  for (const [value, anchor] of [[x0, "start"], [x1, "end"]]) {
    target.append(Object.assign(svg("text", {x: X(value), y: height - 8, "text-anchor": anchor}), {textContent: `step ${value}`}));
  }
  series.forEach((s, i) => {
    const points = s.points.filter((p) => Number.isFinite(p[1])).map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`);
    target.append(svg("polyline", {points: points.join(" "), fill: "none", stroke: COLORS[i % COLORS.length], "stroke-width": 2}));
  });
}

function message(text, ok) {
  const box = $("#message");
  box.textContent = text;
  box.className = ok ? "ok" : "error";
}

const pages = {
  index() {
    for (const span of document.querySelectorAll(".duration")) span.textContent = duration(Number(span.dataset.seconds));
    // the list and the queue, fresh while something runs (and nothing is being checked for a comparison)
    const live = [...document.querySelectorAll(".status")].some((s) => /running|queued|stopping/.test(s.className));
    if (live) setTimeout(() => { if (!document.querySelector("input[name=run]:checked")) location.reload(); }, 5000);
  },

  new() {
    $("#preset").addEventListener("change", (e) => { location.href = `/new?preset=${encodeURIComponent(e.target.value)}`; });
    const browse = async (path) => {
      const response = await fetch(`/api/browse?path=${encodeURIComponent(path)}`);
      const found = await response.json();
      const box = $("#browser");
      if (!response.ok) { box.textContent = `${path}: not a folder under the served folder`; return; }
      const list = el("ul", {class: "browser-list"});
      if (found.parent !== null) list.append(Object.assign(el("li", {"data-path": found.parent}, "↑ .."), {}));
      for (const name of found.folders) list.append(el("li", {"data-path": found.path === "." ? name : `${found.path}/${name}`}, `📁 ${name}`));
      list.addEventListener("click", (e) => { if (e.target.dataset.path !== undefined) browse(e.target.dataset.path); });
      const sizes = Object.entries(found.sizes).map(([size, n]) => `${size} × ${n}`).join(", ");
      const use = el("button", {id: "use-folder"}, `use ${found.path}`);
      use.addEventListener("click", () => { $("#data").value = found.path; });
      const captions = el("ul");
      for (const c of found.captions) captions.append(el("li", {}, el("b", {}, c.image), ` ${c.caption}`));
      box.replaceChildren(el("p", {}, el("b", {}, found.path), ` · ${found.images} images${sizes ? ` (${sizes})` : ""}`
        + (found.manifest ? ` · manifest ${found.manifest}` : "")), use, list, captions);
    };
    browse(".");
    const body = (estimate) => {
      const values = {};
      for (const input of document.querySelectorAll("[data-key]")) if (input.value.trim()) values[input.dataset.key] = input.value;
      return {preset: $("#preset").value, name: $("#name").value, data: $("#data").value, extra: $("#extra").value, values, estimate};
    };
    $("#check").addEventListener("click", async () => {
      message("checking the config and estimating its memory (the models are loaded on the CPU) ...", true);
      const {ok, answer} = await post("/api/check", body(true));
      if (!ok) return message(answer.error, false);
      const e = answer.estimate || {};
      const memory = e.error ? `memory estimate: ${e.error}` : `memory estimate ${number(e.total, 2)} GiB (weights ${number(e.weights, 2)}, `
        + `gradients ${number(e.gradients, 2)}, optimizer ${number(e.optimizer, 2)}, EMA ${number(e.ema, 2)}, frozen ${number(e.frozen, 2)}, activations ${number(e.activations, 2)})`;
      message(`config OK: ${answer.run}\n${memory}\nsdtrain ${answer.command.join(" ")}`, !e.error);
    });
    $("#start").addEventListener("click", async () => {
      $("#start").disabled = true;
      const {ok, answer} = await post("/api/runs", body(false));
      $("#start").disabled = false;
      if (!ok) return message(answer.error, false);
      location.href = `/run/${answer.run}`;
    });
  },

  run() {
    const run = $("#run").dataset.run;
    let curve = [];
    const source = new EventSource(`/events/run/${run}`);
    source.onmessage = (event) => {
      const state = JSON.parse(event.data), p = state.progress;
      curve = curve.slice(0, state.from).concat(state.records);
      $("#status").textContent = state.status || "—";
      $("#status").className = `status ${state.status}`;
      $("#step").textContent = p.num_steps ? `${p.step} / ${p.num_steps}` : p.step;
      $("#loss").textContent = number(p.loss);
      $("#lr").textContent = number(p.lr, 6);
      $("#speed").textContent = number(p.images_per_s, 1);
      $("#left").textContent = ["running", "queued"].includes(state.status) ? duration(p.seconds_left) : "—";
      $("#stop").disabled = !["running", "queued"].includes(state.status);
      $("#resume").disabled = !["stopped", "failed", "cancelled"].includes(state.status);
      chart($("#loss-chart"), [{name: "loss", points: curve.map((r) => [r.step, r.loss])}]);
      chart($("#lr-chart"), [{name: "lr", points: curve.map((r) => [r.step, r.lr])}]);
      if (state.samples.length) {
        $("#samples").replaceChildren(...state.samples.slice().reverse().map((s) =>
          el("figure", {}, el("figcaption", {}, `step ${s.step}`), el("img", {src: `/file/${s.file}`, alt: `samples at step ${s.step}`}))));
      }
      $("#scores").replaceChildren(...Object.entries(state.scores).map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, String(v)))));
      const log = $("#log"), atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.textContent = state.log;
      if (atEnd) log.scrollTop = log.scrollHeight;
      if (state.models.length && !document.querySelector("form.generate")) location.reload();  // the export appeared
    };
    for (const action of ["stop", "resume"]) {
      $(`#${action}`).addEventListener("click", async () => {
        const {ok, answer} = await post(`/api/runs/${action}/${run}`, {});
        message(ok ? `${action}: ${answer.state}` : answer.error, ok);
      });
    }
    for (const form of document.querySelectorAll("form.generate")) {
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        const asked = Object.fromEntries(new FormData(form).entries());
        const out = $(".generated", form);
        out.textContent = "drawing ...";
        const {ok, answer} = await post("/api/generate", {...asked, model: form.dataset.model});
        if (!ok) { out.textContent = answer.error; out.className = "generated error"; return; }
        out.className = "generated";
        out.replaceChildren(el("img", {src: URL.createObjectURL(answer), alt: `generated: ${asked.prompt}`}));
      });
    }
  },

  compare() {
    const target = $("#compare-chart");
    if (target) {
      const curves = JSON.parse(target.dataset.curves);
      const series = Object.entries(curves).map(([name, records]) => ({name, points: records.map((r) => [r.step, r.loss])}));
      chart(target, series);
      const legend = el("p", {class: "legend"}, ...series.map((s, i) => {
        const span = el("span", {}, `■ ${s.name}`);
        span.style.color = COLORS[i % COLORS.length];  // CSSOM, which the page's CSP allows (a style attribute it does not)
        return span;
      }));
      target.after(legend);
    }
    const toggle = $("#only-differences"), table = $("table.config");
    if (toggle && table) {
      const apply = () => table.classList.toggle("only", toggle.checked);
      toggle.addEventListener("change", apply);
      apply();
    }
  },

  captions() {
    const folder = $("#folder");
    if (!folder) return;
    for (const row of document.querySelectorAll("tr[data-image]")) {
      $(".save", row).addEventListener("click", async () => {
        const {ok, answer} = await post("/api/captions", {folder: folder.dataset.folder, image: row.dataset.image, caption: $("textarea", row).value});
        $(".saved", row).textContent = ok ? "saved" : answer.error;
      });
    }
    $("#add-trigger").addEventListener("click", async () => {
      const {ok, answer} = await post("/api/captions", {folder: folder.dataset.folder, trigger: $("#trigger").value});
      if (!ok) return message(answer.error, false);
      message(`${answer.changed} captions changed`, true);
      setTimeout(() => location.reload(), 600);
    });
  },
};

pages[document.body.dataset.page]?.();
