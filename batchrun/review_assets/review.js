"use strict";
// The review app's page. Everything shown comes from /api/jobs and is put in with textContent, never
// as HTML. Every request carries the session token; every decision is POSTed at once.
(function () {
  const token = document.body.dataset.token;
  const groupsEl = document.getElementById("groups");
  const statusEl = document.getElementById("status");
  let data = { groups: [], can_reroll: false, refresh_seconds: 4 };
  const shown = new Map(); // group id -> signature of what is drawn
  let showing = "all"; // which takes are shown: all, review (done, undecided), picked, rejected

  function visible(t) {
    if (showing === "review") return t.state === "done" && !t.decision;
    if (showing === "picked" || showing === "rejected") return t.decision === showing;
    return true;
  }
  function applyFilter() {
    for (const section of groupsEl.querySelectorAll("section.group")) {
      let any = false;
      for (const card of section.querySelectorAll("article.take")) {
        const t = findTake(card.dataset.id);
        card.hidden = !(t && visible(t));
        any = any || !card.hidden;
      }
      section.hidden = !any;
    }
  }
  for (const button of document.querySelectorAll("button[data-show]")) {
    button.addEventListener("click", () => {
      showing = button.dataset.show;
      for (const b of document.querySelectorAll("button[data-show]")) {
        b.setAttribute("aria-pressed", String(b === button));
      }
      applyFilter();
    });
  }

  function api(path) { return path + "?token=" + encodeURIComponent(token); }
  function say(text, bad) { statusEl.textContent = text; statusEl.classList.toggle("bad", !!bad); }
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }
  function findTake(id) {
    for (const g of data.groups) for (const t of g.takes) if (t.id === id) return t;
    return null;
  }

  async function post(path, body) {
    const response = await fetch(api(path), {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(answer.error || ("HTTP " + response.status));
    return answer;
  }

  async function decide(id, change) {
    const take = findTake(id);
    if (!take || take.state === "asked") return;
    try {
      const saved = await post("/api/decide", Object.assign({ id: id }, change));
      Object.assign(take, { decision: saved.decision, rating: saved.rating, note: saved.note || "" });
      redrawTake(id);
      say("saved " + id);
      drawCounts();
    } catch (err) { say("not saved: " + err.message, true); }
  }

  async function reroll(groupId, count) {
    try {
      const answer = await post("/api/reroll", { id: groupId, takes: count });
      say("asked for " + answer.asked.join(", ") + "; the next run submits them");
      await refresh(true);
    } catch (err) { say("re-roll not recorded: " + err.message, true); }
  }

  const IMAGE_EXT = new Set(["png", "jpg", "jpeg", "webp", "gif", "avif", "heic", "heif"]);
  const AUDIO_EXT = new Set(["wav", "mp3", "m4a", "aac", "ogg", "oga", "flac"]);

  function takeCard(t) {
    const card = el("article", { class: "take " + (t.decision || ""), tabindex: "0", "data-id": t.id,
                                 "data-state": t.state, "data-decision": t.decision || "",
                                 "data-rating": t.rating == null ? "" : String(t.rating) });
    if (t.videos.length) {
      // Image and audio models' outputs are shown as what they are, by the extension they were saved with.
      const ext = (t.videos[0].split("?")[0].split(".").pop() || "").toLowerCase();
      if (IMAGE_EXT.has(ext)) {
        card.append(el("img", { src: t.videos[0], alt: t.id, loading: "lazy" }));
      } else if (AUDIO_EXT.has(ext)) {
        card.append(el("audio", { src: t.videos[0], controls: "", preload: "metadata" }));
      } else {
        const attrs = { src: t.videos[0], controls: "", preload: "metadata", playsinline: "" };
        if (t.poster) attrs.poster = t.poster;
        card.append(el("video", attrs));
      }
    } else {
      const why = t.state === "asked" ? "asked for: the next run submits it" :
        t.state === "done" ? "no video file" : t.state;
      card.append(el("div", { class: "novideo", text: why }));
    }
    const bar = el("div", { class: "bar" }, el("span", { class: "label", text: t.id }));
    bar.append(el("span", { class: "badge " + t.state, text: t.state }));
    if (t.gone) bar.append(el("span", { class: "badge gone", text: "not in the manifest",
                                        title: "this job is no longer in the manifest" }));
    if (t.state === "done" || t.decision) {
      const pick = el("button", { type: "button", class: "pick", "aria-pressed": String(t.decision === "picked"),
                                  title: "pick (p)", text: "pick" });
      pick.addEventListener("click", () => decide(t.id, { decision: t.decision === "picked" ? null : "picked" }));
      const reject = el("button", { type: "button", class: "reject", title: "reject (x)",
                                    "aria-pressed": String(t.decision === "rejected"), text: "reject" });
      reject.addEventListener("click", () => decide(t.id, { decision: t.decision === "rejected" ? null : "rejected" }));
      bar.append(pick, reject);
      for (let n = 1; n <= 5; n++) {
        const star = el("button", { type: "button", class: "rate", "data-rating": String(n), title: "rate " + n,
                                    "aria-pressed": String(t.rating === n), text: String(n) });
        star.addEventListener("click", () => decide(t.id, { rating: t.rating === n ? null : n }));
        bar.append(star);
      }
    }
    card.append(bar);
    if (t.error) card.append(el("div", { class: "error", text: t.error }));
    for (const flag of t.flags || []) card.append(el("div", { class: "error flag", text: flag }));
    if (t.media) card.append(el("div", { class: "facts", text: t.media }));
    if (t.state !== "asked") {
      const note = el("textarea", { rows: "1", placeholder: "note (n)", "aria-label": "note on " + t.id });
      note.value = t.note || "";
      const save = () => { if (note.value !== (t.note || "")) decide(t.id, { note: note.value || null }); };
      note.addEventListener("change", save);
      note.addEventListener("keydown", (e) => {
        if ((e.key === "Enter" && !e.shiftKey) || e.key === "Escape") {
          e.preventDefault(); save(); card.focus();
        }
      });
      card.append(note);
    }
    return card;
  }

  function groupSection(g) {
    const head = el("div", { class: "group-head" });
    if (g.image) head.append(el("img", { src: g.image, alt: "start image of " + g.id }));
    else head.append(el("div", { class: "noimg", text: g.image_note || "no start image" }));
    head.append(el("div", { class: "prompt" }, el("b", { text: g.id }), document.createTextNode(" · " + g.model),
                   el("div", { text: g.prompt })));
    if (data.can_reroll) {
      const button = el("button", { type: "button", class: "reroll", title: "ask for one more take (r)",
                                    text: "re-roll" });
      button.addEventListener("click", () => reroll(g.id, 1));
      head.append(button);
    }
    const takes = el("div", { class: "takes" });
    for (const t of g.takes) takes.append(takeCard(t));
    // An input with nothing to watch yet (pending, failed) takes one short row, not a screen of empty players.
    const waiting = g.takes.every((t) => !t.videos.length);
    return el("section", { class: "group" + (waiting ? " waiting" : ""), "data-group": g.id }, head, takes);
  }

  function redrawTake(id) {
    const old = groupsEl.querySelector('article.take[data-id="' + CSS.escape(id) + '"]');
    if (!old) return;
    const hadFocus = old.contains(document.activeElement);
    const fresh = takeCard(findTake(id));
    const video = old.querySelector("video");
    if (video) fresh.querySelector("video").replaceWith(video); // keeps playback where it was
    old.replaceWith(fresh);
    if (hadFocus) fresh.focus();
    applyFilter();
  }

  function drawCounts() {
    let picked = 0, rejected = 0, unrated = 0, inputs = 0;
    for (const g of data.groups) {
      inputs++;
      for (const t of g.takes) {
        if (t.decision === "picked") picked++; else if (t.decision === "rejected") rejected++;
        else if (t.state === "done") unrated++;
      }
    }
    document.getElementById("counts").textContent =
      inputs + " inputs · " + picked + " picked · " + rejected + " rejected · " + unrated + " to review";
  }

  function busy(section) {
    if (section.contains(document.activeElement) && document.activeElement.tagName === "TEXTAREA") return true;
    return Array.from(section.querySelectorAll("video")).some((v) => !v.paused);
  }

  function draw() {
    if (!data.groups.length) {
      groupsEl.replaceChildren(el("p", { class: "empty", text: "No jobs in this ledger yet." }));
      return;
    }
    groupsEl.querySelector("p.empty")?.remove();
    let previous = null;
    for (const g of data.groups) {
      const signature = JSON.stringify(g);
      let section = groupsEl.querySelector('section.group[data-group="' + CSS.escape(g.id) + '"]');
      if (!section || (shown.get(g.id) !== signature && !busy(section))) {
        const focused = section && section.contains(document.activeElement) ? document.activeElement.dataset.id : null;
        const fresh = groupSection(g);
        if (section) section.replaceWith(fresh); else if (previous) previous.after(fresh); else groupsEl.prepend(fresh);
        section = fresh;
        shown.set(g.id, signature);
        if (focused) fresh.querySelector('article.take[data-id="' + CSS.escape(focused) + '"]')?.focus();
      }
      previous = section;
    }
    // Keep the server's order (inputs with videos first) when an input's first video arrives.
    const want = data.groups.map((g) => g.id);
    const have = Array.from(groupsEl.querySelectorAll("section.group")).map((s) => s.dataset.group);
    if (want.join("\n") !== have.join("\n")) {
      for (const id of want) groupsEl.append(groupsEl.querySelector('section.group[data-group="' + CSS.escape(id) + '"]'));
    }
    applyFilter();
    drawCounts();
  }

  async function refresh(force) {
    try {
      const response = await fetch(api("/api/jobs"));
      if (!response.ok) throw new Error("HTTP " + response.status);
      data = await response.json();
      if (force) shown.clear();
      draw();
      if (!document.activeElement || document.activeElement === document.body) {
        groupsEl.querySelector("article.take")?.focus();
      }
    } catch (err) { say("could not load the jobs: " + err.message, true); }
  }

  function cards() {
    return Array.from(groupsEl.querySelectorAll("article.take")).filter((c) => !c.hidden && !c.closest("section").hidden);
  }
  function move(card, step) {
    const all = cards();
    const next = all[Math.max(0, Math.min(all.length - 1, all.indexOf(card) + step))];
    if (next) { next.focus(); next.scrollIntoView({ block: "nearest" }); }
  }
  function moveGroup(card, step) {
    const sections = Array.from(groupsEl.querySelectorAll("section.group")).filter((s) => !s.hidden);
    const section = card.closest("section.group");
    const index = Array.from(section.querySelectorAll("article.take")).filter((c) => !c.hidden).indexOf(card);
    const target = sections[sections.indexOf(section) + step];
    if (!target) return;
    const takes = Array.from(target.querySelectorAll("article.take")).filter((c) => !c.hidden);
    const next = takes[Math.min(index, takes.length - 1)];
    if (next) { next.focus(); next.scrollIntoView({ block: "nearest" }); }
  }

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const tag = e.target.tagName;
    if (tag === "TEXTAREA" || tag === "INPUT" || tag === "SELECT") return;
    const card = e.target.closest ? e.target.closest("article.take") : null;
    if (!card) {
      if (["ArrowRight", "ArrowDown", "j"].includes(e.key)) { cards()[0]?.focus(); e.preventDefault(); }
      return;
    }
    const id = card.dataset.id;
    const take = findTake(id);
    const key = e.key;
    if (key === "ArrowRight" || key === "j") move(card, 1);
    else if (key === "ArrowLeft" || key === "k") move(card, -1);
    else if (key === "ArrowDown") moveGroup(card, 1);
    else if (key === "ArrowUp") moveGroup(card, -1);
    else if ("pxu012345".includes(key) && key.length === 1 && !(take && (take.state === "done" || take.decision))) {
      say(id + " has no video to judge yet (" + (take ? take.state : "unknown") + ")");
    } else if (key === "p") decide(id, { decision: "picked" });
    else if (key === "x") decide(id, { decision: "rejected" });
    else if (key === "u") decide(id, { decision: null });
    else if (key >= "1" && key <= "5") decide(id, { rating: Number(key) });
    else if (key === "0") decide(id, { rating: null });
    else if (key === "n") card.querySelector("textarea")?.focus();
    else if (key === "r" && data.can_reroll && take) reroll(card.closest("section.group").dataset.group, 1);
    else if (key === " ") {
      const video = card.querySelector("video");
      if (video) { if (video.paused) video.play(); else video.pause(); }
    } else return;
    e.preventDefault();
  });

  // The server says how often to ask again (a run going adds takes); the next ask waits for this one.
  async function poll() {
    await refresh(false);
    setTimeout(poll, Math.max(0.2, data.refresh_seconds || 4) * 1000);
  }
  poll();
})();
