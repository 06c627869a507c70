// Keeps an open dashboard page current without reloading it: every event on /events
// re-reads this page and swaps in its <main>, keeping open log panels open. After the
// server restarts, EventSource reconnects by itself and the page catches up the same way.
// Without JavaScript the pages are complete; this only saves pressing reload.
(function () {
  "use strict";
  const region = () => document.getElementById("live-region");
  let timer = null;
  let inFlight = false;
  let again = false;

  function openPanels() {
    return new Set(Array.from(document.querySelectorAll("[data-stage] details[open]"))
      .map((d) => d.closest("[data-stage]").dataset.stage));
  }

  async function refresh() {
    if (inFlight) { again = true; return; }
    inFlight = true;
    try {
      const response = await fetch(location.href, { cache: "no-store", credentials: "same-origin" });
      if (!response.ok) return;
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.getElementById("live-region");
      if (!fresh || !region()) return;
      const open = openPanels();
      const console_ = region().querySelector("[data-console]");
      region().replaceChildren(...fresh.childNodes);
      const placeholder = region().querySelector("[data-console]");
      if (console_ && placeholder && placeholder.dataset.console === console_.dataset.console) {
        placeholder.replaceWith(console_);
      }
      open.forEach((name) => {
        const panel = document.querySelector(`[data-stage="${CSS.escape(name)}"] details`);
        if (panel) panel.open = true;
      });
      document.title = page.title;
      const icon = document.querySelector("link[rel=icon]");
      if (icon) icon.href = "/favicon.svg?t=" + Date.now();
      document.body.dataset.refreshedAt = String(Date.now());
    } catch (_) {
      // The server is away; the next event after it returns refreshes the page.
    } finally {
      inFlight = false;
      if (again) { again = false; schedule(); }
    }
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(refresh, 80);
  }

  function relative(ms) {
    const seconds = Math.max(0, Math.floor((Date.now() - ms) / 1000));
    if (seconds < 5) return "just now";
    if (seconds < 60) return seconds + " s ago";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h ago";
    const days = Math.floor(seconds / 86400);
    return days === 1 ? "1 day ago" : days + " days ago";
  }

  setInterval(() => {
    document.querySelectorAll("time[datetime]").forEach((t) => {
      const ms = Number(t.getAttribute("datetime"));
      if (ms) t.textContent = relative(ms);
    });
  }, 10000);

  if (!window.EventSource) return;

  // A running deployment's console: lines as they are printed, the newest kept in view
  // unless the reader scrolled up to read. Kept across the refreshes above; when the stream
  // ends (or the server goes away) the stages' own logs on the page take over.
  function followConsole() {
    const box = document.querySelector("[data-console]");
    if (!box || box.dataset.following) return;
    box.dataset.following = "yes";
    const pre = box.querySelector("pre");
    const stream = new EventSource(box.dataset.console);
    stream.addEventListener("lines", (event) => {
      const following = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
      pre.append(event.data);
      if (following) pre.scrollTop = pre.scrollHeight;
    });
    const stop = () => { stream.close(); box.dataset.following = "ended"; };
    stream.addEventListener("end", stop);
    stream.onerror = stop;
  }
  followConsole();

  let lostConnection = false;
  const events = new EventSource("/events");
  events.addEventListener("hello", () => {
    document.body.dataset.live = "connected";
    // What changed between this page's rendering and the stream's start (or while the
    // server was away) was never announced on it: catch up once.
    lostConnection = false;
    schedule();
  });
  events.onmessage = schedule;
  events.onerror = () => {
    lostConnection = true;
    document.body.dataset.live = "reconnecting";
  };
})();
