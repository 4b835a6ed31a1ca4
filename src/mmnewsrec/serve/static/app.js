// The page: build a click history, ask /recommend, show the news as cards. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
// user: the id whose history the server keeps (clicks on cards are then logged as events);
// shown: the news ids of the list on screen, logged as the impression's shown news.
const state = { history: [], unknown: new Set(), user: null, shown: [] };

function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
}

async function api(path, options) {
  const response = await fetch(path, options);
  if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
  return response.json();
}

function addToHistory(newsId, title) {
  if (!newsId || state.history.some((h) => h.news_id === newsId)) return;
  state.history.push({ news_id: newsId, title: title || newsId });
  renderHistory();
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren(...state.history.map((h, i) => {
    const remove = el("button", { type: "button", textContent: "×", title: "remove" });
    remove.onclick = () => { state.history.splice(i, 1); renderHistory(); };
    const label = el("span", { textContent: h.title, title: h.news_id });
    const item = el("li", {}, [label, remove]);
    if (state.unknown.has(h.news_id)) item.classList.add("unknown");
    return item;
  }));
  $("history-empty").hidden = state.history.length > 0;
}

let searchTimer;
function onSearch() {
  clearTimeout(searchTimer);
  const q = $("search").value.trim();
  if (!q) { $("search-results").replaceChildren(); return; }
  searchTimer = setTimeout(async () => {
    const found = await api(`/news/search?q=${encodeURIComponent(q)}&limit=10`);
    $("search-results").replaceChildren(...found.map((n) => {
      const item = el("li", { textContent: n.title, title: `${n.news_id} · ${n.category}` });
      item.onclick = () => addToHistory(n.news_id, n.title);
      return item;
    }));
  }, 150);
}

async function addTypedIds() {
  const typed = $("ids").value.split(/[\s,]+/).filter(Boolean);
  $("ids").value = "";
  for (const id of typed) {
    try {
      addToHistory(id, (await api(`/news/${encodeURIComponent(id)}`)).title);
    } catch {
      state.unknown.add(id);
      addToHistory(id);
    }
  }
}

function card(item) {
  const picture = item.has_image
    ? el("img", { src: `/news/${encodeURIComponent(item.news_id)}/image`, alt: item.title, loading: "lazy" })
    : el("div", { className: "noimage", textContent: "no image" });
  const where = item.recall_rank ? `${item.stage} · recall #${item.recall_rank}` : item.stage;
  const meta = el("div", { className: "meta" }, [
    el("span", { className: `badge ${item.stage}`, textContent: where }),
    el("span", { textContent: `score ${item.score.toFixed(3)}` }),
    el("span", { textContent: `${item.category} / ${item.subcategory}` }),
  ]);
  const body = el("div", { className: "body" }, [el("div", { className: "title", textContent: item.title }), meta]);
  const node = el("article", { className: "card", title: `${item.news_id}: click to add to the history` }, [picture, body]);
  node.dataset.newsId = item.news_id;
  node.onclick = () => (state.user ? clickAsUser(item.news_id) : addToHistory(item.news_id, item.title));
  return node;
}

const JSON_POST = { method: "POST", headers: { "Content-Type": "application/json" } };

async function useUser() {
  state.user = $("user").value.trim() || null;
  if (!state.user) {
    $("user-status").textContent = "No user: recommendations for the history below; clicks are not logged.";
    return;
  }
  await loadUser();
  await recommend();
}

async function loadUser() {
  const user = await api(`/users/${encodeURIComponent(state.user)}`);
  state.history = user.history.map((news_id, i) => ({ news_id, title: user.titles[i] }));
  state.unknown.clear();
  renderHistory();
  $("user-status").textContent = user.known
    ? `${user.user_id}: ${user.history.length} clicks; clicking a card logs the click.`
    : `${user.user_id}: a new user; clicking a card logs the click.`;
}

async function clickAsUser(newsId) {
  const event = {
    impression_id: `web-${Date.now()}-${Math.random().toString(36).slice(2, 10)}`,
    user_id: state.user,
    shown: state.shown,
    clicked: [newsId],
  };
  try {
    await api("/events", { ...JSON_POST, body: JSON.stringify(event) });
    await loadUser();
    await recommend();
  } catch (err) {
    $("message").textContent = `Click not logged: ${err.message}`;
  }
}

async function recommend() {
  $("message").textContent = "…";
  const body = { k: Number($("k").value) || 10, exclude_history: $("exclude").checked };
  if (state.user) body.user_id = state.user;
  else body.history = state.history.map((h) => h.news_id);
  try {
    const result = await api("/recommend", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    state.unknown = new Set(result.unknown);
    renderHistory();
    $("cards").replaceChildren(...result.items.map(card));
    state.shown = result.items.map((item) => item.news_id);
    const t = result.timings_ms;
    $("timings").textContent = `${result.items.length} news · ${t.total.toFixed(1)} ms`;
    $("message").textContent = result.unknown.length
      ? `Unknown ids ignored: ${result.unknown.join(", ")}`
      : result.cold_start ? "No clicks yet: the most popular and freshest news." : "";
  } catch (err) {
    $("message").textContent = `Request failed: ${err.message}`;
  }
}

async function showHealth() {
  try {
    const h = await api("/health");
    $("health").textContent = `model ${h.model} · ${h.counts.news} news · ${h.vectors.dim}-d vectors · recall ${h.recall_k}`;
  } catch (err) {
    $("health").textContent = `service unavailable (${err.message})`;
  }
}

$("search").addEventListener("input", onSearch);
$("add-ids").addEventListener("click", addTypedIds);
$("ids").addEventListener("keydown", (e) => { if (e.key === "Enter") addTypedIds(); });
$("submit").addEventListener("click", recommend);
$("sign-in").addEventListener("click", useUser);
$("user").addEventListener("keydown", (e) => { if (e.key === "Enter") useUser(); });
$("clear").addEventListener("click", () => { state.history = []; state.unknown.clear(); renderHistory(); });
renderHistory();
showHealth();
