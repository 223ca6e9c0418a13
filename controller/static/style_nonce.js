"use strict";
// The page's Content-Security-Policy allows no inline style (style-src 'self' plus this
// response's nonce). xterm.js's DOM renderer makes <style> elements (xterm.js issue #4445) and
// sets truecolour cells' colours with setAttribute("style", ...): so every <style> made by
// script gets the nonce before it is inserted, and a style attribute set by script goes
// through the CSSOM (element.style.cssText), which CSP does not govern. Markup injected into
// the page still has neither. The nonce's meta is removed once read.
(() => {
  const meta = document.querySelector('meta[name="marco-style-nonce"]');
  if (!meta) return;
  const nonce = meta.content;
  meta.remove();
  const createElement = Document.prototype.createElement;
  Document.prototype.createElement = function (tag, options) {
    const element = createElement.call(this, tag, options);
    if (String(tag).toLowerCase() === "style") element.nonce = nonce;
    return element;
  };
  const setAttribute = Element.prototype.setAttribute;
  Element.prototype.setAttribute = function (name, value) {
    if (String(name).toLowerCase() === "style" && this.style) {
      this.style.cssText = String(value);
      return;
    }
    setAttribute.call(this, name, value);
  };
})();
