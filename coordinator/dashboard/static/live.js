// Live views: an element with data-live-src gets its inner HTML replaced by each "update"
// server-sent event (a fragment rendered on the server). No framework, no CDN.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("[data-live-src]").forEach(function (target) {
    var source = new EventSource(target.getAttribute("data-live-src"));
    source.addEventListener("update", function (event) {
      target.innerHTML = event.data;
      target.setAttribute("data-live-updated", String(Date.now()));
    });
    source.addEventListener("end", function () { source.close(); });
  });
});
