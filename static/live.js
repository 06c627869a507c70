// Reload the page's data when something changes; the page reads fine without this script.
(function () {
  if (!window.EventSource) return;
  let pending = null;
  const source = new EventSource("/events");
  source.onmessage = function () {
    clearTimeout(pending);
    pending = setTimeout(function () { location.reload(); }, 150);
  };
})();
