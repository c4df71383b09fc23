// After a failed submit, move keyboard and screen-reader focus to the list of problems; after a preview,
// to the preview. Nothing else runs here: the pages work without JavaScript.
(function () {
  var target = document.getElementById("form-errors") || document.getElementById("preview");
  if (target) { target.focus(); target.scrollIntoView({block: "start"}); }
})();
