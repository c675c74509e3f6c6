// pymdownx.arithmatex (generic mode) wraps maths in <span|div class="arithmatex"> with
// \( \) and \[ \] delimiters; typeset only those elements.
window.MathJax = {
  tex: { inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]] },
  options: { ignoreHtmlClass: "tex2jax_ignore|.*", processHtmlClass: "arithmatex" },
};
