// MathJax configuration for pymdownx.arithmatex (generic mode). MathJax itself is served from
// the site (javascript/vendor/mathjax, see SOURCE.txt there), so the equations render offline.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
    // Only the extensions inside the served component: no "autoload"/"require" (they would fetch
    // files that are not shipped) and no "noundefined", so an unknown macro is a visible error.
    packages: { "[-]": ["autoload", "require", "noundefined"] }
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
    // The menu's extra features (speech, explorer) load components that are not shipped.
    enableMenu: false
  }
};

// Re-typeset after mkdocs-material's instant navigation swaps the page content.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => {
    if (window.MathJax && MathJax.startup && MathJax.startup.output) {
      MathJax.startup.output.clearCache();
      MathJax.typesetClear();
      MathJax.texReset();
      MathJax.typesetPromise();
    }
  });
}
