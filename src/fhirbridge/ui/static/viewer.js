// The portal's image viewer: scroll through a series' images (slider, arrow keys, mouse wheel), step or play
// the frames of a multi-frame instance, change the window/level. Every image is a PNG the portal renders
// from the DICOM file; nothing is drawn or cached here. Without JavaScript the page shows one image.
(function () {
  "use strict";
  var viewer = document.getElementById("viewer");
  if (!viewer) { return; }
  var base = viewer.dataset.base;
  var frames = viewer.dataset.frames.split(",").map(Number);
  var sops = viewer.dataset.sops.split(",");
  var index = Number(viewer.dataset.index), frame = Number(viewer.dataset.frame);
  var wc = "", ww = "", timer = null;
  var img = document.getElementById("frame"), stage = document.getElementById("stage");
  var slice = document.getElementById("slice"), sliceOut = document.getElementById("slice-out");
  var frameBox = document.getElementById("frame-controls"), frameSlider = document.getElementById("frame-slider");
  var frameOut = document.getElementById("frame-out"), frameCount = document.getElementById("frame-count");
  var play = document.getElementById("play"), cannot = document.getElementById("cannot");
  var download = document.getElementById("download");

  function url() {
    var u = base + index + ".png?frame=" + frame;
    if (wc !== "" && ww !== "") { u += "&wc=" + encodeURIComponent(wc) + "&ww=" + encodeURIComponent(ww); }
    return u;
  }

  function setField(id, value) {
    var el = document.getElementById(id);
    if (el) { el.value = value; }
  }

  function show() {
    cannot.hidden = true;
    img.hidden = false;
    img.src = url();
    img.alt = "Image " + (index + 1) + " of " + frames.length + ", frame " + frame;
    slice.value = index + 1; sliceOut.textContent = index + 1;
    frameBox.hidden = frames[index] < 2;
    frameSlider.max = frames[index]; frameSlider.value = frame;
    frameOut.textContent = frame; frameCount.textContent = frames[index];
    download.href = base + index + ".dcm";
    setField("key-sop", sops[index]); setField("key-frame", frame); setField("key-i", index);
  }

  function goTo(i) {
    i = Math.max(0, Math.min(frames.length - 1, i));
    if (i !== index) { index = i; frame = 1; stopPlay(); show(); }
  }

  function toFrame(f) {
    var n = frames[index];
    frame = ((f - 1 + n) % n) + 1;
    show();
  }

  function stopPlay() {
    if (timer) { clearInterval(timer); timer = null; play.textContent = "Play"; }
  }

  // A frame that cannot be shown: the portal says why (e.g. no decoder for its transfer syntax).
  function cannotShow() {
    fetch(img.src, {credentials: "same-origin"}).then(function (r) { return r.text(); }).then(function (text) {
      cannot.textContent = text || "This image cannot be displayed here; download the DICOM file.";
      cannot.hidden = false;
      img.hidden = true;
    });
  }
  img.addEventListener("error", cannotShow);
  // The page's own first image may have failed before this script ran: its error event is gone by now.
  if (img.getAttribute("src") && img.complete && img.naturalWidth === 0) { cannotShow(); }

  // A series whose middle image cannot be rendered gets a label instead of a broken thumbnail.
  Array.prototype.forEach.call(document.querySelectorAll(".thumb"), function (t) {
    function broken() {
      var label = document.createElement("span");
      label.className = "no-preview";
      label.textContent = "no preview";
      t.replaceWith(label);
    }
    if (t.complete && t.naturalWidth === 0) { broken(); } else { t.addEventListener("error", broken); }
  });

  slice.addEventListener("input", function () { goTo(Number(slice.value) - 1); });
  frameSlider.addEventListener("input", function () { stopPlay(); toFrame(Number(frameSlider.value)); });
  play.addEventListener("click", function () {
    if (timer) { stopPlay(); return; }
    play.textContent = "Pause";
    timer = setInterval(function () { toFrame(frame + 1); }, 250);
  });
  stage.addEventListener("wheel", function (e) {
    e.preventDefault();
    goTo(index + (e.deltaY > 0 ? 1 : -1));
  }, {passive: false});
  stage.addEventListener("keydown", function (e) {
    var step = {ArrowDown: 1, ArrowRight: 1, PageDown: 10, ArrowUp: -1, ArrowLeft: -1, PageUp: -10}[e.key];
    if (e.key === "Home") { goTo(0); } else if (e.key === "End") { goTo(frames.length - 1); }
    else if (step) { goTo(index + step); } else { return; }
    e.preventDefault();
  });

  Array.prototype.forEach.call(document.querySelectorAll(".preset"), function (b) {
    b.addEventListener("click", function () {
      wc = b.dataset.center; ww = b.dataset.width;
      setField("wc", wc); setField("ww", ww);
      show();
    });
  });
  document.getElementById("apply-window").addEventListener("click", function () {
    var c = document.getElementById("wc").value, w = document.getElementById("ww").value;
    if (c !== "" && w !== "" && Number(w) >= 1) { wc = c; ww = w; show(); }
  });
})();
