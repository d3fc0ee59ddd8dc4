// Small DOM helpers: elements built from text only (never parsed as HTML).

export function el(tag, options = {}, children = []) {
  const node = document.createElement(tag);
  if (options.text !== undefined) node.textContent = String(options.text);
  if (options.className) node.className = options.className;
  if (options.title) node.title = options.title;
  for (const [name, value] of Object.entries(options.data || {})) node.dataset[name] = value;
  for (const child of children) node.append(child);
  return node;
}

export function row(cells) {
  return el("tr", {}, cells.map((cell) => (cell instanceof Node ? el("td", {}, [cell]) : el("td", { text: cell }))));
}

// A key the user can click to see its history.
export function keyLink(key, onKey) {
  const button = el("button", { text: key, className: "key", title: `history of ${key}` });
  button.type = "button";
  button.addEventListener("click", () => onKey(key));
  return button;
}

export function clock(date) {
  return date.toLocaleTimeString([], { hour12: false }) + "." + String(date.getMilliseconds()).padStart(3, "0");
}
