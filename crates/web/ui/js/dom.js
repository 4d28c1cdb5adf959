// A few DOM helpers: build elements, and keep keyed children in place across updates.

/** `h('div.card', {data-vm: 'g1'}, child, 'text', ...)`: an element with classes,
 *  attributes (`on*` functions become listeners) and children. */
export function h(spec, attrs = {}, ...children) {
  const [tag, ...classes] = spec.split('.');
  const el = document.createElementNS(SVG_TAGS.has(tag) ? SVG : HTML, tag);
  if (classes.length) el.setAttribute('class', classes.join(' '));
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

const HTML = 'http://www.w3.org/1999/xhtml';
const SVG = 'http://www.w3.org/2000/svg';
const SVG_TAGS = new Set(['svg', 'g', 'rect', 'line', 'circle', 'path', 'polyline', 'text', 'title']);

/** Replaces `el`'s children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** Makes `parent`'s children exactly `keys` in order: reuses the child whose key
 *  (`data-key`) matches (so focus and a drag in progress survive), takes missing ones
 *  from `make(key)` (which may hand back an element that lives elsewhere: it moves),
 *  removes the rest; returns the children by key. */
export function keyed(parent, keys, make) {
  const old = new Map();
  for (const c of parent.children) if (c.dataset.key !== undefined) old.set(c.dataset.key, c);
  const out = new Map();
  let at = parent.firstElementChild;
  for (const k of keys) {
    let el = old.get(k) ?? make(k);
    el.dataset.key = k;
    if (el !== at) parent.insertBefore(el, at);
    else at = at.nextElementSibling;
    out.set(k, el);
    old.delete(k);
  }
  for (const el of old.values()) el.remove();
  return out;
}
