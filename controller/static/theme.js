// The page's theme: the system's (prefers-color-scheme) until the header's toggle picks light or
// dark, which sticks (localStorage). Loaded in <head> so the chosen theme is set before paint.
"use strict";
(() => {
  const KEY = "marco-theme";
  const root = document.documentElement;
  const system = window.matchMedia("(prefers-color-scheme: dark)");

  function stored() {
    try { const v = localStorage.getItem(KEY); return v === "light" || v === "dark" ? v : null; }
    catch (e) { return null; }                         // storage refused: the system's theme
  }

  function store(theme) {
    try { localStorage.setItem(KEY, theme); } catch (e) { /* not kept past this page */ }
  }

  const isDark = () => (root.dataset.theme || (system.matches ? "dark" : "light")) === "dark";

  function show(button) {
    if (button) button.setAttribute("aria-pressed", String(isDark()));
  }

  const chosen = stored();
  if (chosen) root.dataset.theme = chosen;

  document.addEventListener("DOMContentLoaded", () => {
    const button = document.getElementById("theme-toggle");
    if (!button) return;
    show(button);
    button.addEventListener("click", () => {
      root.dataset.theme = isDark() ? "light" : "dark";
      store(root.dataset.theme);
      show(button);
    });
    system.addEventListener("change", () => show(button));
  });
})();
