// run-engine serve: live updates through server-sent events. The server sends HTML it
// rendered and escaped itself; nothing here builds markup from data.
(function () {
  "use strict";
  function state(text, cls) {
    var el = document.getElementById("live-state");
    if (el) { el.textContent = text; el.className = "live " + (cls || ""); }
  }
  function follow(url, name, apply) {
    var source = new EventSource(url);
    source.addEventListener(name, function (e) { apply(e.data); state("live", "on"); });
    source.onopen = function () { state("live", "on"); };
    source.onerror = function () { state("reconnecting…", "off"); };
    return source;
  }
  document.addEventListener("DOMContentLoaded", function () {
    var run = document.getElementById("run");
    if (run && run.dataset.events) {
      follow(run.dataset.events, "run", function (html) { run.innerHTML = html; });
    }
    var log = document.getElementById("log");
    if (log && log.dataset.events) {
      follow(log.dataset.events, "lines", function (html) {
        var atEnd = window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
        log.insertAdjacentHTML("beforeend", html);
        // Keep at most 5000 lines on the page.
        while (log.childElementCount > 5000) { log.removeChild(log.firstElementChild); }
        if (atEnd) { window.scrollTo(0, document.body.scrollHeight); }
      });
    }
  });
})();
