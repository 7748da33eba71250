// Render the formulas that pymdownx.arithmatex marks (class "arithmatex", text
// "\(...\)" inline or "\[...\]" display) with the KaTeX shipped in assets/katex/.
// Material's `document$` fires on the first load and on each instant navigation.
function renderMath() {
  document.querySelectorAll(".arithmatex").forEach(function (element) {
    if (element.dataset.rendered) {
      return;
    }
    var text = element.textContent.trim();
    var display = text.startsWith("\\[");
    var tex = text.slice(2, -2);
    katex.render(tex, element, { displayMode: display, throwOnError: false });
    element.dataset.rendered = "true";
  });
}

if (typeof document$ !== "undefined") {
  document$.subscribe(renderMath);
} else {
  document.addEventListener("DOMContentLoaded", renderMath);
}
