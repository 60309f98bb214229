"""The stylesheet and script inlined into report.html.

Both are inlined so the report works from `file://`, offline, and zipped with its videos. The script
carries no data: everything it needs is in escaped `data-*` attributes of the cards, so no job text
ever lands inside a `<script>`.
"""

CSS = """
:root { --bg: #f6f7f9; --card: #fff; --ink: #1d2330; --muted: #5d6677; --line: #dde1e8;
  --queued: #f0a830; --rendering: #3a78d6; --downloading: #27a37f; --remote: #9aa9c4;
  --failed: #d43f3f; --cancelled: #8a8f99; color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
  background: var(--bg); }
main { max-width: 1400px; margin: 0 auto; padding: 20px 24px 48px; }
h1 { font-size: 22px; margin: 0 0 2px; }
h2 { font-size: 16px; margin: 28px 0 10px; }
.sub { color: var(--muted); margin: 0 0 16px; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
.tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 10px; }
.tile { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.tile .k { color: var(--muted); font-size: 12px; }
.tile .v { font-size: 20px; font-weight: 600; }
.tile .n { color: var(--muted); font-size: 12px; }
.states { display: flex; flex-wrap: wrap; gap: 6px; margin-top: 10px; }
.badge { display: inline-block; border-radius: 999px; padding: 1px 9px; font-size: 12px; font-weight: 600;
  background: #e8ebf0; color: #394150; white-space: nowrap; }
.badge.done { background: #dcf3e9; color: #146347; }
.badge.failed { background: #fbe0e0; color: #9b2020; }
.badge.cancelled, .badge.pending { background: #eceef1; color: #5d6677; }
.badge.unknown { background: #fdf0d5; color: #7a4b00; }
.badge.queued, .badge.running, .badge.downloading, .badge.submitting { background: #e0ebfb; color: #1d4f9c; }
.panel { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.legend { display: flex; flex-wrap: wrap; gap: 16px; color: var(--muted); font-size: 12px; margin-bottom: 6px; }
.legend i { display: inline-block; width: 12px; height: 12px; border-radius: 2px; vertical-align: -2px;
  margin-right: 5px; }
svg.timeline { display: block; width: 100%; height: auto; }
svg .seg.queued, .legend .queued { fill: var(--queued); background: var(--queued); }
svg .seg.rendering, .legend .rendering { fill: var(--rendering); background: var(--rendering); }
svg .seg.downloading, .legend .downloading { fill: var(--downloading); background: var(--downloading); }
svg .seg.remote, .legend .remote { fill: var(--remote); background: var(--remote); }
.legend .failed { background: var(--failed); }
.legend .cancelled { background: var(--cancelled); }
svg .seg.open { opacity: .55; }
svg polygon.seg { opacity: .9; }
svg .mark.failed { fill: var(--failed); }
svg .mark.cancelled { fill: var(--cancelled); }
svg .stripe { fill: #f3f5f8; }
svg .grid { stroke: #e3e6ec; stroke-width: 1; }
svg .baseline { stroke: #c9ced8; stroke-width: 1; }
svg .run-start { stroke: #7b61c4; stroke-width: 1.2; stroke-dasharray: 4 3; }
svg text { fill: var(--muted); font-size: 11px; font-family: system-ui, sans-serif; }
svg .label { fill: var(--ink); }
svg a.row:hover rect.seg { filter: brightness(.85); }
details.runs { margin-top: 8px; color: var(--muted); }
table { border-collapse: collapse; font-size: 12px; margin-top: 6px; }
th, td { text-align: left; padding: 3px 12px 3px 0; border-bottom: 1px solid var(--line); }
.toolbar { display: flex; flex-wrap: wrap; align-items: center; gap: 6px; margin: 0 0 12px; position: sticky;
  top: 0; z-index: 2; background: var(--bg); padding: 8px 0; }
.toolbar button, .toolbar select { font: inherit; font-size: 13px; border: 1px solid var(--line); border-radius: 6px;
  background: var(--card); color: var(--ink); padding: 4px 10px; cursor: pointer; }
.toolbar button[aria-pressed="true"] { background: var(--ink); color: #fff; border-color: var(--ink); }
.toolbar .spacer { flex: 1; }
.toolbar label, .toolbar .count { color: var(--muted); font-size: 13px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 14px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; overflow: hidden;
  display: flex; flex-direction: column; content-visibility: auto; contain-intrinsic-size: auto 560px; }
.card[hidden] { display: none; }
.card.failed { border-color: #f0b3b3; }
.card:target { outline: 3px solid var(--rendering); }
.media { position: relative; background: #111; aspect-ratio: 16 / 9; display: flex; align-items: center;
  justify-content: center; color: #aab; font-size: 13px; }
.media video { width: 100%; height: 100%; display: block; background: #000; }
.media img { position: absolute; inset: 0; width: 100%; height: 100%; object-fit: contain; display: block; }
.media audio { width: 92%; }
.media .none { padding: 12px; text-align: center; }
.extra { font-size: 12px; padding: 4px 12px 0; }
.body { padding: 10px 12px 12px; display: flex; flex-direction: column; gap: 8px; }
.head { display: flex; align-items: center; justify-content: space-between; gap: 8px; }
.head h3 { margin: 0; font-size: 14px; overflow-wrap: anywhere; }
.start { display: flex; gap: 10px; align-items: flex-start; }
.start img { width: 72px; height: 72px; object-fit: cover; border-radius: 6px; background: #e8ebf0; flex: none; }
.start .ph { width: 72px; height: 72px; border-radius: 6px; background: #e8ebf0; color: var(--muted);
  font-size: 11px; display: flex; align-items: center; justify-content: center; text-align: center; flex: none; }
.prompt { margin: 0; overflow-wrap: anywhere; white-space: pre-wrap; }
details.prompt summary { cursor: pointer; white-space: normal; }
details.prompt[open] summary .short { display: none; }
details.prompt summary .more { color: var(--rendering); font-size: 12px; }
ol.shots { margin: 4px 0 0; padding-left: 18px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 10px; margin: 0; font-size: 12px; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
.badge.picked { background: #1a7f37; color: #fff; }
.badge.rejected { background: #b42318; color: #fff; }
.badge.gone { background: #fde68a; color: #5b4500; }
.badge.take, .badge.rating { background: #e8ebf0; color: #333; }
.note { font-style: italic; margin: 4px 0; }
.error { background: #fdeeee; color: #8a1c1c; border-radius: 6px; padding: 6px 8px; font-size: 12px;
  overflow-wrap: anywhere; }
.empty { color: var(--muted); }
footer { color: var(--muted); font-size: 12px; margin-top: 32px; }
"""

# Filter and sort the cards, and let videos fetch their metadata only when near the viewport: with
# 1,000 cards, `preload="metadata"` everywhere would open 1,000 file reads on load.
JS = """
(function () {
  "use strict";
  var grid = document.getElementById("cards");
  if (!grid) { return; }
  var cards = Array.prototype.slice.call(grid.querySelectorAll(".card"));
  var buttons = Array.prototype.slice.call(document.querySelectorAll("button[data-filter]"));
  var shown = document.getElementById("shown");

  function applyFilter(state) {
    var count = 0;
    buttons.forEach(function (b) { b.setAttribute("aria-pressed", String(b.dataset.filter === state)); });
    cards.forEach(function (c) {
      c.hidden = state !== "all" && c.dataset.state !== state;
      if (!c.hidden) { count += 1; }
    });
    if (shown) { shown.textContent = count + " of " + cards.length + " shown"; }
  }
  buttons.forEach(function (b) {
    b.addEventListener("click", function () { applyFilter(b.dataset.filter); });
  });

  // Cards without the sort key go last whatever the direction.
  function keyed(name, direction) {
    return function (a, b) {
      var x = parseFloat(a.dataset[name]), y = parseFloat(b.dataset[name]);
      if (isNaN(x) || isNaN(y)) { return (isNaN(x) ? 1 : 0) - (isNaN(y) ? 1 : 0); }
      return direction * (x - y);
    };
  }
  var orders = {
    "order": keyed("order", 1),
    "id": function (a, b) { return a.dataset.id < b.dataset.id ? -1 : a.dataset.id > b.dataset.id ? 1 : 0; },
    "cost-desc": keyed("cost", -1), "cost-asc": keyed("cost", 1),
    "render-desc": keyed("render", -1), "render-asc": keyed("render", 1)
  };
  var sort = document.getElementById("sort");
  if (sort) {
    sort.addEventListener("change", function () {
      var compare = orders[sort.value] || orders.order;
      var sorted = cards.slice().sort(function (a, b) { return compare(a, b) || keyed("order", 1)(a, b); });
      var fragment = document.createDocumentFragment();
      sorted.forEach(function (c) { fragment.appendChild(c); });
      grid.appendChild(fragment);
    });
  }

  function wake(card) {
    Array.prototype.forEach.call(card.querySelectorAll("video[preload=none]"), function (v) {
      v.preload = "metadata";
      if (v.readyState === 0) { v.load(); }
    });
  }
  if ("IntersectionObserver" in window) {
    var observer = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) {
        if (e.isIntersecting) { wake(e.target); observer.unobserve(e.target); }
      });
    }, { rootMargin: "600px 0px" });
    cards.forEach(function (c) { observer.observe(c); });
  } else {
    cards.forEach(wake);
  }
  applyFilter("all");
})();
"""
