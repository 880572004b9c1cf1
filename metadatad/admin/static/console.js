// metadatad console: live cluster page through server-sent events.  The server
// renders (and escapes) every fragment; this script only swaps them in.
"use strict";

document.addEventListener("DOMContentLoaded", function () {
  var section = document.getElementById("conductors");
  var ringBox = document.getElementById("ring-box");
  var state = document.getElementById("stream-state");
  if (!section || !ringBox || !window.EventSource) {
    return;
  }
  var source = new EventSource(section.getAttribute("data-stream"));
  source.addEventListener("open", function () {
    state.textContent = "live updates: on";
    state.className = "live-state on";
  });
  source.addEventListener("error", function () {
    state.textContent = "live updates: reconnecting";
    state.className = "live-state off";
  });
  source.addEventListener("cluster", function (event) {
    var fragments = JSON.parse(event.data);
    section.innerHTML = fragments.conductors;
    ringBox.innerHTML = fragments.ring;
    state.textContent = "live updates: on (" + new Date().toLocaleTimeString() + ")";
    state.className = "live-state on";
  });
});
