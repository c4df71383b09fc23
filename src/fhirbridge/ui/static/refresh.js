// The dashboard refreshes itself without losing the user's place: every few seconds it asks
// /dashboard/changes.json (same origin) whether the Cases or the banner changed, and if so reloads the page
// at the same URL (filters, sort and page are all in its query string) and scroll position. It waits while
// the user is typing in a form or has a cancel form open. The pages work without it.
(function () {
  var state = document.getElementById("refresh-state");
  if (!state || !window.fetch) { return; }
  var url = state.getAttribute("data-url"), seconds = Number(state.getAttribute("data-seconds")) || 10;
  var key = "fhirbridge-scroll:" + location.pathname + location.search, seen = null;
  var saved = sessionStorage.getItem(key);
  if (saved !== null) { sessionStorage.removeItem(key); window.scrollTo(0, Number(saved)); }
  function busy() {
    var el = document.activeElement;
    return (el && /^(INPUT|SELECT|TEXTAREA)$/.test(el.tagName)) || document.querySelector("details.cancel[open]");
  }
  function poll() {
    fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (body) {
        if (!body) { return; }
        var now = body.cases + "#" + body.banner;
        if (seen !== null && now !== seen && !busy()) {
          sessionStorage.setItem(key, String(window.scrollY));
          location.reload();
          return;
        }
        if (!busy()) { seen = now; }
      })
      .catch(function () {})
      .then(function () { setTimeout(poll, seconds * 1000); });
  }
  poll();
})();
